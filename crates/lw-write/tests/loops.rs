//! A section that falls into a loop: retried with a stronger DRY, and when
//! every attempt loops, kept without its loop (or, for data builds, the
//! run stops with the reason).

use std::sync::atomic::AtomicBool;

use lw_core::{Counter, FinishReason, SamplingParams};
use lw_write::{
    write, ChatRequest, ChatResponse, Language, LanguageModel, Mode, ModelCallError, Request,
    RunDir, Usage, WriteError, WriteOptions,
};

/// Plans one paragraph, then loops in every attempt at it; records the DRY
/// multiplier of each attempt.
#[derive(Default)]
struct Looping {
    dry: Vec<f32>,
}

impl LanguageModel for Looping {
    fn name(&self) -> String {
        "looping".into()
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        if request.messages[0].content.starts_with("You are planning") {
            let text = "Paragraph 1 - Main Point: the river - Word Count: 300 words".to_string();
            on_text(&text);
            return Ok(ChatResponse {
                text,
                finish_reason: FinishReason::Stop,
                usage: Usage::default(),
            });
        }
        self.dry.push(request.sampling.dry_multiplier);
        let mut text = String::new();
        for piece in std::iter::once("The river rose in spring. It was cold. ")
            .chain(std::iter::repeat("and the water came and went "))
            .take(40)
        {
            text.push_str(piece);
            if !on_text(piece) {
                return Err(ModelCallError::Cancelled);
            }
        }
        Ok(ChatResponse {
            text,
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        })
    }
}

fn run(tag: &str, salvage_loops: bool) -> (Result<lw_write::Summary, WriteError>, Looping) {
    let dir = std::env::temp_dir().join(format!("lw-loops-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let request = Request {
        instruction: "Write a 300-word piece about a river.".into(),
        asked_words: Some(300),
        language: Language::English,
        mode: Mode::AgentWrite,
        sampling: SamplingParams::greedy(),
        model: "looping".into(),
    };
    let run = RunDir::create(&dir, &request).unwrap();
    let opts = WriteOptions {
        counter: Counter::Unicode,
        constrain: false,
        salvage_loops,
        ..Default::default()
    };
    let mut model = Looping::default();
    let out = write(
        &mut model,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    );
    (out, model)
}

#[test]
fn a_section_that_always_loops_is_kept_without_its_loop() {
    let (out, model) = run("salvage", true);
    let summary = out.unwrap();
    assert_eq!(summary.document, "The river rose in spring. It was cold.");
    // Off (greedy) at first, then DRY at 0.8, then doubled.
    assert_eq!(model.dry, [0.0, 0.8, 1.6]);
}

#[test]
fn without_salvage_a_looping_section_stops_the_run_with_the_reason() {
    let (out, model) = run("strict", false);
    match out {
        Err(e @ WriteError::Degenerate { .. }) => {
            assert!(e.to_string().contains("paragraph 1"), "{e}")
        }
        other => panic!("expected a loop error, got {other:?}"),
    }
    assert_eq!(model.dry.len(), 3);
}
