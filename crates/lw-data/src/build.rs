//! The builder: workers take pending items from the store and run AgentWrite
//! on them against a set of endpoints (round-robin, each with its own cap on
//! jobs in flight). A run that fails because its endpoint failed is put
//! back, and the endpoint rests (exponential backoff) while the others carry
//! on; the item later continues, on any endpoint, from its saved sections.
//! Finished runs go through the quality gates.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use lw_core::SamplingParams;
use lw_write::{
    Event, Language, LanguageModel, Mode, ModelCallError, Request, RunStore, Usage, WriteError,
    WriteOptions,
};

use crate::gates::{Gates, Rejection};
use crate::store::{now, DataStore, ItemRow, ItemRun, Status};
use crate::DataError;

/// A place to run models: a server, or the local engine.
pub struct Endpoint {
    pub name: String,
    /// Most items in flight on it at once.
    pub cap: usize,
    /// A client for one worker.
    pub make: Box<dyn Fn() -> Box<dyn LanguageModel + Send> + Send + Sync>,
}

/// Token budgets of one build invocation; when one is spent, no new item
/// starts and the items in flight finish.
#[derive(Debug, Clone, Default)]
pub struct Limits {
    pub max_output_tokens: Option<usize>,
    pub max_tokens: Option<usize>,
}

/// The model items' plans are asked of, where not their endpoint's (a
/// strong model plans, the endpoints write): a client per item.
#[derive(Clone)]
pub struct Planner {
    pub name: String,
    pub make: std::sync::Arc<dyn Fn() -> Box<dyn LanguageModel + Send> + Send + Sync>,
}

impl std::fmt::Debug for Planner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Planner").field("name", &self.name).finish()
    }
}

#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Items in flight at once, over all endpoints.
    pub concurrency: usize,
    /// Sampling of every call; each item's seed is derived from this seed,
    /// its content and its round, so a rerun writes the same text.
    pub sampling: SamplingParams,
    /// Recorded in each item's request.
    pub model_name: String,
    pub write: WriteOptions,
    pub gates: Gates,
    pub limits: Limits,
    /// First rest of a failed endpoint; doubled per consecutive failure.
    pub cooldown: Duration,
    pub max_cooldown: Duration,
    /// Plans from this model instead of each item's endpoint.
    pub planner: Option<Planner>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            concurrency: 4,
            sampling: SamplingParams::default(),
            model_name: "default".into(),
            write: WriteOptions::default(),
            gates: Gates::default(),
            limits: Limits::default(),
            cooldown: Duration::from_secs(2),
            max_cooldown: Duration::from_secs(60),
            planner: None,
        }
    }
}

/// What happens during a build, for progress displays.
#[derive(Debug)]
pub enum BuildEvent<'a> {
    ItemStarted {
        item: &'a ItemRow,
        endpoint: &'a str,
    },
    SectionDone {
        endpoint: &'a str,
        words: usize,
        usage: &'a Usage,
    },
    ItemFinished {
        item: &'a ItemRow,
        status: Status,
        rejection: Option<&'a Rejection>,
        words: usize,
    },
    /// The endpoint failed; the item went back to the queue.
    EndpointDown {
        endpoint: &'a str,
        error: &'a str,
        rest: Duration,
    },
    EndpointUp {
        endpoint: &'a str,
    },
    LimitReached {
        what: &'static str,
    },
}

/// What one build invocation did.
#[derive(Debug, Clone, Default)]
pub struct BuildSummary {
    pub accepted: usize,
    pub rejected: usize,
    /// Items still pending (stopped, drained, or out of budget).
    pub pending: usize,
    pub usage: Usage,
    pub seconds: f64,
}

struct EndpointState {
    in_flight: usize,
    failures: u32,
    resting_until: Option<Instant>,
}

struct Shared<'a> {
    store: &'a DataStore,
    endpoints: &'a [Endpoint],
    opts: &'a BuildOptions,
    sched: Mutex<Sched>,
    session: i64,
    drain: &'a AtomicBool,
    stop: &'a AtomicBool,
    out_tokens: AtomicUsize,
    all_tokens: AtomicUsize,
    limit_hit: AtomicBool,
    summary: Mutex<BuildSummary>,
    fatal: Mutex<Option<DataError>>,
    on_event: &'a (dyn Fn(BuildEvent) + Sync),
}

struct Sched {
    endpoints: Vec<EndpointState>,
    next: usize,
    items_in_flight: usize,
}

/// The seed of an item's round: the same item, seed and round always give
/// the same seed, whatever endpoint or worker runs it.
fn item_seed(base: u64, id: &str, round: u32) -> u64 {
    let h = u64::from_str_radix(&id[..16.min(id.len())], 16).unwrap_or(0);
    base ^ h ^ (round as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Runs pending items until none is left (or `drain`/`stop` is set, or a
/// token budget is spent). `drain` lets the items in flight finish; `stop`
/// cuts them short (their finished sections stay saved).
pub fn build(
    store: &DataStore,
    endpoints: &[Endpoint],
    opts: &BuildOptions,
    drain: &AtomicBool,
    stop: &AtomicBool,
    on_event: &(dyn Fn(BuildEvent) + Sync),
) -> Result<BuildSummary, DataError> {
    if endpoints.is_empty() {
        return Err(DataError::Invalid("no endpoint to run models on".into()));
    }
    let started = Instant::now();
    let _lock = store.lock_for_build()?;
    store.recover()?;
    let session = store.start_session()?;
    let shared = Shared {
        store,
        endpoints,
        opts,
        sched: Mutex::new(Sched {
            endpoints: endpoints
                .iter()
                .map(|_| EndpointState {
                    in_flight: 0,
                    failures: 0,
                    resting_until: None,
                })
                .collect(),
            next: 0,
            items_in_flight: 0,
        }),
        session,
        drain,
        stop,
        out_tokens: AtomicUsize::new(0),
        all_tokens: AtomicUsize::new(0),
        limit_hit: AtomicBool::new(false),
        summary: Mutex::new(BuildSummary::default()),
        fatal: Mutex::new(None),
        on_event,
    };
    let workers = opts
        .concurrency
        .max(1)
        .min(endpoints.iter().map(|e| e.cap.max(1)).sum());
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| worker(&shared));
        }
    });
    store.touch_session(session)?;
    if let Some(e) = shared.fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    let mut summary = shared
        .summary
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    summary.pending = store.count(Status::Pending)?;
    summary.seconds = started.elapsed().as_secs_f64();
    Ok(summary)
}

impl Shared<'_> {
    fn halted(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || self.drain.load(Ordering::SeqCst)
            || self.limit_hit.load(Ordering::SeqCst)
            || self.fatal.lock().map(|f| f.is_some()).unwrap_or(true)
    }

    fn fail(&self, e: DataError) {
        let mut f = self.fatal.lock().unwrap_or_else(|p| p.into_inner());
        f.get_or_insert(e);
    }

    /// An endpoint with room, round-robin; its slot is taken.
    fn take_endpoint(&self) -> Option<usize> {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        let n = self.endpoints.len();
        let now = Instant::now();
        for k in 0..n {
            let i = (s.next + k) % n;
            let e = &s.endpoints[i];
            let resting = e.resting_until.is_some_and(|t| t > now);
            if !resting && e.in_flight < self.endpoints[i].cap.max(1) {
                s.endpoints[i].in_flight += 1;
                s.next = (i + 1) % n;
                return Some(i);
            }
        }
        None
    }

    fn release(&self, ep: usize, item_done: bool) {
        let mut s = self.sched.lock().unwrap_or_else(|p| p.into_inner());
        s.endpoints[ep].in_flight -= 1;
        if item_done {
            s.items_in_flight -= 1;
        }
    }

    fn count_tokens(&self, usage: &Usage) {
        let out = self
            .out_tokens
            .fetch_add(usage.completion_tokens, Ordering::SeqCst)
            + usage.completion_tokens;
        let all = self.all_tokens.fetch_add(
            usage.completion_tokens + usage.prefilled_tokens(),
            Ordering::SeqCst,
        ) + usage.completion_tokens
            + usage.prefilled_tokens();
        let limits = &self.opts.limits;
        let what = if limits.max_output_tokens.is_some_and(|m| out >= m) {
            Some("output tokens")
        } else if limits.max_tokens.is_some_and(|m| all >= m) {
            Some("tokens")
        } else {
            None
        };
        if let Some(what) = what {
            if !self.limit_hit.swap(true, Ordering::SeqCst) {
                (self.on_event)(BuildEvent::LimitReached { what });
            }
        }
    }
}

fn worker(sh: &Shared) {
    loop {
        if sh.halted() {
            return;
        }
        let Some(ep) = sh.take_endpoint() else {
            // Every endpoint is full or resting: wait, unless nothing is left.
            if nothing_left(sh) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
            continue;
        };
        let claimed = match sh.store.claim(&sh.endpoints[ep].name) {
            Ok(c) => c,
            Err(e) => {
                sh.release(ep, false);
                sh.fail(e);
                return;
            }
        };
        let Some(item) = claimed else {
            sh.release(ep, false);
            // Items in flight elsewhere may still come back to the queue.
            if nothing_left(sh) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
            continue;
        };
        sh.sched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .items_in_flight += 1;
        let result = run_item(sh, ep, item);
        sh.release(ep, true);
        if let Err(e) = result {
            sh.fail(e);
            return;
        }
    }
}

fn nothing_left(sh: &Shared) -> bool {
    let in_flight = sh
        .sched
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .items_in_flight;
    in_flight == 0
        && sh
            .store
            .count(Status::Pending)
            .map(|n| n == 0)
            .unwrap_or(true)
}

fn run_item(sh: &Shared, ep: usize, mut item: ItemRow) -> Result<(), DataError> {
    let endpoint = &sh.endpoints[ep];
    let started = now();
    if item.request.is_none() {
        let request = Request {
            instruction: item.prompt.clone(),
            asked_words: lw_write::requested_length(&item.prompt),
            language: Language::detect(&item.prompt),
            mode: Mode::AgentWrite,
            sampling: SamplingParams {
                seed: item_seed(sh.opts.sampling.seed, &item.id, item.round),
                ..sh.opts.sampling.clone()
            },
            model: sh.opts.model_name.clone(),
        };
        sh.store.set_request(&item.id, &request)?;
        item.request = Some(request);
    }
    (sh.on_event)(BuildEvent::ItemStarted {
        item: &item,
        endpoint: &endpoint.name,
    });
    let run = ItemRun {
        store: sh.store,
        id: item.id.clone(),
    };
    let before = item.state.usage.clone();
    let mut sections_usage = Usage::default();
    let mut model = (endpoint.make)();
    // Text cut out of a loop is no training data: such an item is rejected.
    let write_opts = WriteOptions {
        salvage_loops: false,
        ..sh.opts.write.clone()
    };
    let mut planner = sh.opts.planner.as_ref().map(|p| (p.make)());
    let planner = planner.as_deref_mut().map(|p| p as &mut dyn LanguageModel);
    let result = lw_write::write_with_planner(
        model.as_mut(),
        planner,
        &run,
        &write_opts,
        sh.stop,
        &mut |ev| {
            if let Event::SectionDone {
                record,
                resumed: false,
            } = ev
            {
                sections_usage.add(&record.usage);
                sh.count_tokens(&record.usage);
                (sh.on_event)(BuildEvent::SectionDone {
                    endpoint: &endpoint.name,
                    words: record.delivered_words,
                    usage: &record.usage,
                });
            }
        },
    );
    // Tokens of this attempt: the saved state's growth (the plan's included).
    let spent = run.state()?.usage.since(&before);
    // The sections' tokens were counted as they finished; the rest now.
    sh.count_tokens(&spent.since(&sections_usage));
    sh.summary
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .usage
        .add(&spent);
    let record = |outcome: &str, error: Option<&str>| {
        sh.store.record_attempt(
            &item,
            sh.session,
            &endpoint.name,
            started,
            outcome,
            error,
            &spent,
        )
    };
    let verdict: Result<usize, Rejection> = match result {
        Ok(_) => {
            let plan = run.plan()?.ok_or_else(|| {
                DataError::Invalid(format!("item {}: finished without a plan", item.id))
            })?;
            let mut texts = vec![None; plan.paragraphs.len()];
            for (i, text) in sh.store.sections(&item.id)? {
                if let Some(slot) = texts.get_mut(i) {
                    *slot = Some(text);
                }
            }
            sh.opts.gates.check(&item.prompt, &plan, &texts)
        }
        Err(WriteError::Cancelled) => {
            sh.store.requeue(&item.id)?;
            return record("stopped", None);
        }
        Err(WriteError::Model {
            step,
            source: ModelCallError::Backend(msg),
        }) => {
            // The endpoint failed (down, overloaded beyond the retries):
            // the item waits for any endpoint.
            sh.store.requeue(&item.id)?;
            let error = format!("{step}: {msg}");
            let rest = {
                let mut s = sh.sched.lock().unwrap_or_else(|p| p.into_inner());
                let e = &mut s.endpoints[ep];
                e.failures += 1;
                let rest = sh
                    .opts
                    .cooldown
                    .saturating_mul(1 << (e.failures - 1).min(16))
                    .min(sh.opts.max_cooldown);
                e.resting_until = Some(Instant::now() + rest);
                rest
            };
            (sh.on_event)(BuildEvent::EndpointDown {
                endpoint: &endpoint.name,
                error: &error,
                rest,
            });
            return record("endpoint-failed", Some(&error));
        }
        Err(WriteError::Model {
            step,
            source:
                ModelCallError::Refused {
                    status: 401 | 403 | 404,
                    message,
                },
        }) => {
            // Wrong key, model name or URL: every item would fail the same
            // way, so the build stops (the item waits for the next run).
            sh.store.requeue(&item.id)?;
            record("refused", Some(&message))?;
            return Err(DataError::Invalid(format!(
                "endpoint {}: {step}: {message}",
                endpoint.name
            )));
        }
        Err(WriteError::Model { step, source }) => {
            let code = match source {
                ModelCallError::ContextLength { .. } | ModelCallError::ContextLengthServer(_) => {
                    "context-length"
                }
                ModelCallError::ContentFilter(_) => "content-filter",
                _ => "model-error",
            };
            Err(Rejection::new(code, format!("{step}: {source}")))
        }
        Err(e @ WriteError::Plan { .. }) => Err(Rejection::new("no-plan", e.to_string())),
        Err(e @ WriteError::Degenerate { .. }) => Err(Rejection::new("loop", e.to_string())),
        Err(WriteError::RunDir(e)) => {
            let _ = sh.store.requeue(&item.id);
            return Err(e.into());
        }
    };
    {
        let mut s = sh.sched.lock().unwrap_or_else(|p| p.into_inner());
        let e = &mut s.endpoints[ep];
        if e.failures > 0 {
            e.failures = 0;
            e.resting_until = None;
            drop(s);
            (sh.on_event)(BuildEvent::EndpointUp {
                endpoint: &endpoint.name,
            });
        }
    }
    let (status, rejection, words) = match &verdict {
        Ok(words) => (Status::Accepted, None, *words),
        Err(r) => (Status::Rejected, Some(r), 0),
    };
    sh.store.finish(
        &item.id,
        status,
        rejection.map(|r| (r.code, r.detail.as_str())),
        Some(words),
    )?;
    record(status.as_str(), rejection.map(|r| r.detail.as_str()))?;
    {
        let mut s = sh.summary.lock().unwrap_or_else(|p| p.into_inner());
        match status {
            Status::Accepted => s.accepted += 1,
            _ => s.rejected += 1,
        }
    }
    (sh.on_event)(BuildEvent::ItemFinished {
        item: &item,
        status,
        rejection,
        words,
    });
    Ok(())
}
