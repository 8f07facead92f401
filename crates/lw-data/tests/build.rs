//! The builder end to end on a real job store, with a scripted model whose
//! answers are crafted per instruction: each quality gate rejects its item
//! with its reason; a failing endpoint's items move to the other one; a
//! token budget stops new items.

use std::sync::atomic::AtomicBool;
use std::sync::Mutex;
use std::time::Duration;

use lw_core::FinishReason;
use lw_data::{build, BuildEvent, BuildOptions, DataStore, Endpoint, Instruction, Limits, Status};
use lw_write::{ChatRequest, ChatResponse, LanguageModel, ModelCallError, Usage};

/// Plans two 200-word paragraphs, then writes each as the instruction's
/// `[case]` asks.
struct Scripted {
    calls: usize,
    fail: bool,
}

fn varied(n: usize, salt: usize) -> String {
    (0..n)
        .map(|i| format!("w{}q{}", (i * 7919 + salt * 104_729) % 100_003, i % 11))
        .collect::<Vec<_>>()
        .join(" ")
}

fn case_of(prompt: &str) -> &str {
    let start = prompt.find('[').map(|i| i + 1).unwrap_or(0);
    let end = prompt[start..]
        .find(']')
        .map(|i| start + i)
        .unwrap_or(start);
    &prompt[start..end]
}

impl LanguageModel for Scripted {
    fn name(&self) -> String {
        "scripted".into()
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        self.calls += 1;
        let prompt = &request.messages[0].content;
        let case = case_of(prompt).to_string();
        let planning = prompt.starts_with("You are planning");
        if self.fail && !planning {
            return Err(ModelCallError::Backend("connection refused".into()));
        }
        let section = self.calls - 1; // 1, 2 after the plan
        let text = if planning {
            if case == "noplan" {
                "I would rather not plan.".to_string()
            } else {
                "Paragraph 1 - Main Point: the opening - Word Count: 200 words\n\
                 Paragraph 2 - Main Point: the close - Word Count: 200 words"
                    .to_string()
            }
        } else {
            let salt = request.sampling.seed as usize % 1000 + section;
            match (case.as_str(), section) {
                ("short", _) => varied(40, salt),
                ("empty", 2) => String::new(),
                ("refusal", 2) => format!("{} I'm sorry, but I can't continue.", varied(193, salt)),
                ("sentinel", 2) => format!("{} <|im_end|>", varied(199, salt)),
                ("error", 2) => format!("{} {{\"error\": {{\"code\": 500}}}}", varied(195, salt)),
                ("repetition", _) => {
                    let block = varied(60, 7);
                    format!("{block} {block} {block} {}", varied(20, salt))
                }
                ("loop", n) if n >= 2 => format!(
                    "{} {}",
                    varied(100, salt),
                    "round and round we go ".repeat(20)
                ),
                ("chinese", _) => (0..200)
                    .map(|i| char::from_u32(0x4E00 + ((i + salt) * 7919 % 20_000) as u32).unwrap())
                    .collect(),
                _ => varied(200, salt),
            }
        };
        if !on_text(&text) {
            // The writer stopped the call (a loop): as a real backend does.
            return Err(ModelCallError::Cancelled);
        }
        Ok(ChatResponse {
            usage: Usage {
                prompt_tokens: prompt.len() / 4,
                cached_prompt_tokens: 0,
                completion_tokens: text.split_whitespace().count(),
            },
            text,
            finish_reason: FinishReason::Stop,
        })
    }
}

fn endpoint(name: &str, cap: usize, fail: bool) -> Endpoint {
    Endpoint {
        name: name.into(),
        cap,
        make: Box::new(move || Box::new(Scripted { calls: 0, fail })),
    }
}

fn store(tag: &str, cases: &[&str]) -> DataStore {
    let dir = std::env::temp_dir().join(format!("lw-data-build-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let s = DataStore::open(&dir).unwrap();
    let ins: Vec<Instruction> = cases
        .iter()
        .enumerate()
        .map(|(i, c)| Instruction {
            prompt: format!("Write a 400-word piece about rivers [{c}] (item {i})."),
            meta: Default::default(),
        })
        .collect();
    s.add(&ins).unwrap();
    s
}

fn opts() -> BuildOptions {
    BuildOptions {
        concurrency: 3,
        cooldown: Duration::from_millis(20),
        ..Default::default()
    }
}

#[test]
fn each_gate_rejects_its_crafted_item_with_its_reason() {
    let cases = [
        ("good", None),
        ("short", Some("length")),
        ("empty", Some("empty-section")),
        ("refusal", Some("refusal")),
        ("sentinel", Some("sentinel")),
        ("error", Some("error-text")),
        ("repetition", Some("repetition")),
        ("chinese", Some("language")),
        ("noplan", Some("no-plan")),
        ("loop", Some("loop")),
    ];
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let s = store("gates", &names);
    let (drain, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let summary = build(
        &s,
        &[endpoint("e", 3, false)],
        &opts(),
        &drain,
        &stop,
        &|_| {},
    )
    .unwrap();
    let seen: Vec<_> = s
        .items(None)
        .unwrap()
        .into_iter()
        .map(|i| (i.reason, i.detail))
        .collect();
    assert_eq!(
        (summary.accepted, summary.rejected, summary.pending),
        (1, 9, 0),
        "{seen:?}"
    );
    for (item, (case, reason)) in s.items(None).unwrap().iter().zip(cases) {
        assert_eq!(item.reason.as_deref(), reason, "{case}: {:?}", item.detail);
        let want = if reason.is_some() {
            Status::Rejected
        } else {
            Status::Accepted
        };
        assert_eq!(item.status, want, "{case}");
    }
    let good = &s.items(Some(Status::Accepted)).unwrap()[0];
    assert_eq!(good.words, Some(400));
    assert_eq!(
        good.document
            .as_deref()
            .map(|d| d.split_whitespace().count()),
        Some(400)
    );

    // A retry gives the rejected items a new round; the gates still hold.
    assert_eq!(s.retry_rejected().unwrap(), 9);
    let again = build(
        &s,
        &[endpoint("e", 3, false)],
        &opts(),
        &drain,
        &stop,
        &|_| {},
    )
    .unwrap();
    assert_eq!((again.accepted, again.rejected), (0, 9));
    // Tokens of both rounds are on record.
    let total = s.stats().unwrap().usage;
    assert_eq!(
        total.completion_tokens,
        summary.usage.completion_tokens + again.usage.completion_tokens
    );
    assert!(total.completion_tokens > 0);
    assert!(s
        .items(Some(Status::Rejected))
        .unwrap()
        .iter()
        .all(|i| i.round == 1));
}

#[test]
fn a_failing_endpoint_rests_and_its_items_finish_on_the_other() {
    let s = store("failover", &["good"; 8]);
    let (drain, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let downs = Mutex::new(0);
    let summary = build(
        &s,
        &[endpoint("down", 2, true), endpoint("up", 2, false)],
        &BuildOptions {
            concurrency: 4,
            ..opts()
        },
        &drain,
        &stop,
        &|ev| {
            if let BuildEvent::EndpointDown { endpoint, .. } = ev {
                assert_eq!(endpoint, "down");
                *downs.lock().unwrap() += 1;
            }
        },
    )
    .unwrap();
    assert_eq!((summary.accepted, summary.pending), (8, 0));
    assert!(*downs.lock().unwrap() >= 1);
    let items = s.items(None).unwrap();
    assert!(items.iter().all(|i| i.endpoint.as_deref() == Some("up")));
    let stats = s.stats().unwrap();
    assert!(stats.endpoint_failures >= 1 && stats.attempts == 8 + stats.endpoint_failures);
    assert_eq!(s.max_section_writes().unwrap(), 1);
}

#[test]
fn a_spent_token_budget_starts_no_new_item() {
    let s = store("budget", &["good"; 5]);
    let (drain, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let limited = BuildOptions {
        concurrency: 1,
        limits: Limits {
            max_output_tokens: Some(150),
            max_tokens: None,
        },
        ..opts()
    };
    let reached = AtomicBool::new(false);
    let summary = build(
        &s,
        &[endpoint("e", 1, false)],
        &limited,
        &drain,
        &stop,
        &|ev| {
            if let BuildEvent::LimitReached { what } = ev {
                assert_eq!(what, "output tokens");
                reached.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        },
    )
    .unwrap();
    // The first item's first section crosses 150 output tokens; the item
    // finishes, no other starts.
    assert!(reached.into_inner());
    assert_eq!((summary.accepted, summary.pending), (1, 4));
    assert!(summary.usage.completion_tokens >= 150);
}

/// Answers every call with an HTTP 401 refusal.
struct Unauthorized;

impl LanguageModel for Unauthorized {
    fn name(&self) -> String {
        "unauthorized".into()
    }

    fn complete(
        &mut self,
        _: &ChatRequest,
        _: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        Err(ModelCallError::Refused {
            status: 401,
            message: "HTTP 401: invalid key (check --api-key or OPENAI_API_KEY)".into(),
        })
    }
}

#[test]
fn a_refused_key_stops_the_build_with_the_endpoint_named_and_loses_nothing() {
    let s = store("refused", &["good"; 3]);
    let (drain, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let bad = Endpoint {
        name: "http://gpu9:8000/v1".into(),
        cap: 2,
        make: Box::new(|| Box::new(Unauthorized)),
    };
    let err = build(&s, &[bad], &opts(), &drain, &stop, &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("http://gpu9:8000/v1") && err.contains("check --api-key"),
        "{err}"
    );
    // Nothing was rejected for it: the items wait for a corrected run.
    let stats = s.stats().unwrap();
    assert_eq!((stats.pending, stats.rejected), (3, 0));
    let again = build(
        &s,
        &[endpoint("e", 2, false)],
        &opts(),
        &drain,
        &stop,
        &|_| {},
    )
    .unwrap();
    assert_eq!(again.accepted, 3);
}

/// A scripted model for one role: plans only, or sections only (a call
/// for the other role is an error), counting its calls.
struct Role {
    inner: Scripted,
    plans: bool,
    calls: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl LanguageModel for Role {
    fn name(&self) -> String {
        format!("role-{}", if self.plans { "planner" } else { "writer" })
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let planning = request.messages[0].content.starts_with("You are planning");
        if planning != self.plans {
            return Err(ModelCallError::Backend(format!(
                "{} asked for the other role's work",
                self.name()
            )));
        }
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.complete(request, on_text)
    }
}

#[test]
fn a_planner_plans_every_item_while_the_endpoints_write() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let s = store("planner", &["good", "good", "good"]);
    let (plans, sections) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let counted = sections.clone();
    let writer = Endpoint {
        name: "writer".into(),
        cap: 2,
        make: Box::new(move || {
            Box::new(Role {
                inner: Scripted {
                    calls: 1,
                    fail: false,
                },
                plans: false,
                calls: counted.clone(),
            })
        }),
    };
    let counted = plans.clone();
    let planner = lw_data::Planner {
        name: "planner".into(),
        make: Arc::new(move || {
            Box::new(Role {
                inner: Scripted {
                    calls: 0,
                    fail: false,
                },
                plans: true,
                calls: counted.clone(),
            })
        }),
    };
    let (drain, stop) = (AtomicBool::new(false), AtomicBool::new(false));
    let summary = build(
        &s,
        &[writer],
        &BuildOptions {
            planner: Some(planner),
            ..opts()
        },
        &drain,
        &stop,
        &|_| {},
    )
    .unwrap();
    let items = s.items(None).unwrap();
    assert_eq!(
        summary.accepted,
        3,
        "{:?}",
        items.iter().map(|i| &i.detail).collect::<Vec<_>>()
    );
    assert_eq!(plans.load(Ordering::SeqCst), 3);
    assert_eq!(sections.load(Ordering::SeqCst), 6);
}
