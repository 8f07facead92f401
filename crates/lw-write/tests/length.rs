//! Section length control learns the model's tokens per word from the
//! run's own sections, and sections lose the prompt's marks the model
//! copied.

use std::sync::atomic::AtomicBool;

use lw_core::{Counter, FinishReason, SamplingParams};
use lw_write::{
    write, ChatRequest, ChatResponse, Language, LanguageModel, Mode, ModelCallError, Request,
    RunDir, Usage, WriteOptions,
};

/// Plans under the grammar, then writes each section as the asked number of
/// words spending two tokens a word (where its tokenizer's sample prose
/// says one), opening with the prompt's `<<<` as a small model does;
/// records each section request's `min_tokens`.
#[derive(Default)]
struct Wordy {
    floors: Vec<usize>,
}

impl LanguageModel for Wordy {
    fn name(&self) -> String {
        "wordy".into()
    }

    fn tokens_per_word(&self, _lang: Language) -> Option<f64> {
        Some(1.0)
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        let plan = request.end_after.is_none();
        let text = if plan {
            "Paragraph 1 - Main Point: The river in spring. - Word Count: 300 words\n\
             Paragraph 2 - Main Point: The flood. - Word Count: 300 words\n"
                .to_string()
        } else {
            self.floors.push(request.min_tokens);
            let words = 400;
            let body: Vec<String> = (0..words).map(|i| format!("w{i}")).collect();
            format!("<<<\n\n{}\n>>>", body.join(" "))
        };
        on_text(&text);
        let completion_tokens = if plan { 60 } else { 800 };
        Ok(ChatResponse {
            text,
            finish_reason: FinishReason::Stop,
            usage: Usage {
                completion_tokens,
                ..Usage::default()
            },
        })
    }
}

#[test]
fn the_second_sections_floor_follows_what_the_first_one_spent() {
    let dir = std::env::temp_dir().join(format!("lw-length-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let request = Request {
        instruction: "Write an 800-word piece about a river.".into(),
        asked_words: Some(800),
        language: Language::English,
        mode: Mode::AgentWrite,
        sampling: SamplingParams::greedy(),
        model: "wordy".into(),
    };
    let run = RunDir::create(&dir, &request).unwrap();
    let opts = WriteOptions {
        counter: Counter::Unicode,
        ..Default::default()
    };
    let mut model = Wordy::default();
    let summary = write(
        &mut model,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    // Budgets 400 + 400 (scaled to the asked 800). The first floor is 90%
    // of 400 tokens at the sample's one token a word; the first section
    // spent 800 tokens on 400 words, so the second takes
    // (1 · 100 + 800) / (100 + 400) = 1.8 tokens a word: 90% of 720.
    assert_eq!(model.floors, [360, 648]);
    // The copied marks are gone from the sections and the document.
    assert!(!summary.document.contains("<<<") && !summary.document.contains(">>>"));
    assert!(
        summary.document.starts_with("w0 w1"),
        "{}",
        summary.document
    );
    assert_eq!(summary.delivered_words, 800);

    // A kill after the second section's record and before its text: the
    // resume writes it again from the first section's record alone, with
    // the floor the uninterrupted run had.
    std::fs::remove_file(dir.join("sections/002.md")).unwrap();
    std::fs::remove_file(dir.join("document.md")).unwrap();
    let state_path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    assert_eq!(state["sections"].as_array().unwrap().len(), 2);
    state["finished"] = false.into();
    std::fs::write(&state_path, state.to_string()).unwrap();
    let (run, _) = RunDir::open(&dir).unwrap();
    let mut resumed = Wordy::default();
    let again = write(
        &mut resumed,
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(resumed.floors, [648], "the stale record taught nothing");
    assert_eq!(again.document, summary.document);
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state_path).unwrap()).unwrap();
    let indices: Vec<u64> = state["sections"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indices, [0, 1]);
    let _ = std::fs::remove_dir_all(&dir);
}
