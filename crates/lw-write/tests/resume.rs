//! A run killed between saving a section and saving its record: on resume
//! the section is kept (never written again) and its record is rebuilt, so
//! the finished state lists every section.

use std::sync::atomic::AtomicBool;

use lw_core::{Counter, FinishReason, SamplingParams};
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
