//! Resumed runs: a section saved without its record is kept (never written
//! again) and its record rebuilt; a resume shows the model the same window
//! of the text so far as the run never interrupted did.

use std::sync::atomic::AtomicBool;

use lw_core::{Counter, FinishReason, Message, SamplingParams};
use lw_write::{
    write, ChatRequest, ChatResponse, Language, LanguageModel, Mode, ModelCallError, Request,
    RunDir, Usage, WriteOptions,
};

/// Plans three paragraphs and writes each; counts the calls per paragraph.
#[derive(Default)]
struct Counting {
    written: Vec<usize>,
}

impl LanguageModel for Counting {
    fn name(&self) -> String {
        "counting".into()
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let prompt = &request.messages[0].content;
        let text = if prompt.starts_with("You are planning") {
            (1..=3)
                .map(|i| format!("Paragraph {i} - Main Point: part {i} - Word Count: 200 words\n"))
                .collect()
        } else {
            let step = (1..=3)
                .find(|i| prompt.contains(&format!("Now write paragraph {i} of 3")))
                .expect("a paragraph step");
            self.written.push(step);
            format!("Section {step} tells of the river and the reeds along its banks.")
        };
        on_text(&text);
        Ok(ChatResponse {
            text,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                prompt_tokens: 10,
                cached_prompt_tokens: 0,
                completion_tokens: 12,
            },
        })
    }
}

#[test]
fn a_section_saved_without_its_record_is_kept_and_its_record_rebuilt() {
    let dir = std::env::temp_dir().join(format!("lw-resume-record-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let request = Request {
        instruction: "Write a 600-word piece about a river.".into(),
        asked_words: Some(600),
        language: Language::English,
        mode: Mode::AgentWrite,
        sampling: SamplingParams::greedy(),
        model: "counting".into(),
    };
    let run = RunDir::create(&dir, &request).unwrap();
    let opts = WriteOptions {
        counter: Counter::Unicode,
        constrain: false,
        ..Default::default()
    };
    let mut first = Counting::default();
    let whole = write(
        &mut first,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(first.written, [1, 2, 3]);

    // The state as a kill after section 2's file and before its record
    // left it: sections 1 and 2 on disk, only section 1's record.
    let state_path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let records = state["sections"].as_array_mut().unwrap();
    let lost = records.remove(1);
    records.truncate(1);
    state["finished"] = false.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    std::fs::remove_file(dir.join("sections/003.md")).unwrap();
    std::fs::remove_file(dir.join("document.md")).unwrap();

    let (run, _) = RunDir::open(&dir).unwrap();
    let mut resumed = Counting::default();
    let again = write(
        &mut resumed,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(resumed.written, [3], "only the unsaved section is written");
    assert_eq!(again.document, whole.document);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["finished"], true);
    let records = state["sections"].as_array().unwrap();
    let indices: Vec<u64> = records
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1, 2]);
    assert_eq!(records[1]["delivered_words"], lost["delivered_words"]);
    assert_eq!(records[1]["asked_words"], lost["asked_words"]);
    assert_eq!(records[1]["finish_reason"], "recovered");
}

/// Ten paragraphs of 200 words, each written as three paragraphs of 40
/// words; tokens are words and the context holds 1,200, so the text so far
/// is cut after a few steps, and a cut then holds for the next step. Keeps every section prompt.
#[derive(Default)]
struct Windowed {
    prompts: Vec<(usize, String)>,
}

impl LanguageModel for Windowed {
    fn name(&self) -> String {
        "windowed".into()
    }

    fn prompt_room(&self, messages: &[Message]) -> Option<(usize, usize)> {
        let n = messages
            .iter()
            .map(|m| m.content.split_whitespace().count())
            .sum();
        Some((n, 1200))
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let prompt = &request.messages[0].content;
        let text = if prompt.starts_with("You are planning") {
            (1..=10)
                .map(|i| format!("Paragraph {i} - Main Point: part {i} - Word Count: 200 words\n"))
                .collect()
        } else {
            let step = (1..=10)
                .find(|i| prompt.contains(&format!("Now write paragraph {i} of 10")))
                .expect("a paragraph step");
            self.prompts.push((step, prompt.clone()));
            (0..3)
                .map(|p| {
                    let words: Vec<String> = (0..40).map(|w| format!("s{step}p{p}w{w}")).collect();
                    format!("{}.", words.join(" "))
                })
                .collect::<Vec<_>>()
                .join("\n\n")
        };
        on_text(&text);
        Ok(ChatResponse {
            text,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                completion_tokens: 120,
                ..Usage::default()
            },
        })
    }
}

#[test]
fn a_resume_shows_the_model_the_window_the_uninterrupted_run_showed() {
    let dir = std::env::temp_dir().join(format!("lw-resume-window-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let request = Request {
        instruction: "Write a 2000-word piece about a river.".into(),
        asked_words: Some(2000),
        language: Language::English,
        mode: Mode::AgentWrite,
        sampling: SamplingParams::greedy(),
        model: "windowed".into(),
    };
    let run = RunDir::create(&dir, &request).unwrap();
    let opts = WriteOptions {
        counter: Counter::Unicode,
        constrain: false,
        ..Default::default()
    };
    let mut first = Windowed::default();
    let whole = write(
        &mut first,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    const STEPS: usize = 10;
    assert_eq!(first.prompts.len(), STEPS);
    // What follows the cut mark: where the shown text starts.
    let shown = |p: &str| p.split_once("[…]").map(|(_, rest)| rest[..60].to_string());
    let first_cut = first
        .prompts
        .iter()
        .position(|(_, p)| shown(p).is_some())
        .expect("the text so far was cut");
    // The kill: right after the first cut step, whose cut the next step
    // kept (a resume starting over from the whole text would cut afresh).
    let kept = first_cut + 1;
    assert!(kept < STEPS, "cut too late to prove anything: step {kept}");
    assert_eq!(
        shown(&first.prompts[kept].1),
        shown(&first.prompts[first_cut].1),
        "the cut held for one step"
    );
    let state_path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    state["sections"].as_array_mut().unwrap().truncate(kept);
    state["finished"] = false.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    for i in kept..STEPS {
        std::fs::remove_file(dir.join(format!("sections/{:03}.md", i + 1))).unwrap();
    }
    std::fs::remove_file(dir.join("document.md")).unwrap();

    let (run, _) = RunDir::open(&dir).unwrap();
    let mut resumed = Windowed::default();
    let again = write(
        &mut resumed,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(again.document, whole.document);
    assert_eq!(resumed.prompts.len(), STEPS - kept);
    for (got, want) in resumed.prompts.iter().zip(&first.prompts[kept..]) {
        assert_eq!(got, want, "step {} saw another window", want.0);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
