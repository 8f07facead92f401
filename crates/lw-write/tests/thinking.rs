//! A reasoning model that thinks before it answers, through the whole
//! writing loop: its thinking never reaches the plan's parser or the
//! document, and with `keep_thinking` each section's thinking is kept in
//! the run's `thinking/` folder.

use std::sync::atomic::AtomicBool;

use lw_core::{Counter, FinishReason, SamplingParams};
use lw_write::{
    write, ChatRequest, ChatResponse, Language, LanguageModel, Mode, ModelCallError, Request,
    RunDir, Usage, WriteOptions,
};

/// Thinks aloud (with a line that looks like a plan line, which must not
/// count), then plans two paragraphs or writes one.
struct Reasoner {
    calls: usize,
}

impl LanguageModel for Reasoner {
    fn name(&self) -> String {
        "reasoner".into()
    }

    fn complete(
        &mut self,
        request: &ChatRequest,
        on_text: &mut dyn FnMut(&str) -> bool,
    ) -> Result<ChatResponse, ModelCallError> {
        self.calls += 1;
        let planning = request.messages[0].content.starts_with("You are planning");
        let text = if planning {
            "<think>\nTwo parts. Paragraph 9 - Main Point: a draft line - Word Count: 5 words\n\
             </think>\n\n\
             Paragraph 1 - Main Point: the source - Word Count: 200 words\n\
             Paragraph 2 - Main Point: the sea - Word Count: 200 words"
                .to_string()
        } else {
            format!(
                "<think>\nsection {} needs water words\n</think>\n\n\
                 The river runs past stones and reeds and fields of grain, \
                 under bridges, past towns, and on into the wide grey sea.",
                self.calls - 1
            )
        };
        on_text(&text);
        Ok(ChatResponse {
            text,
            finish_reason: FinishReason::Stop,
            usage: Usage::default(),
        })
    }
}

fn run(keep_thinking: bool) -> (String, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "lw-thinking-{}-{keep_thinking}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    let request = Request {
        instruction: "Write a 400-word piece about a river.".into(),
        asked_words: Some(400),
        language: Language::English,
        mode: Mode::AgentWrite,
        sampling: SamplingParams::greedy(),
        model: "reasoner".into(),
    };
    let run = RunDir::create(&dir, &request).unwrap();
    let opts = WriteOptions {
        counter: Counter::Unicode,
        keep_thinking,
        ..Default::default()
    };
    let summary = write(
        &mut Reasoner { calls: 0 },
        &run,
        &opts,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    (summary.document, dir)
}

#[test]
fn thinking_stays_out_of_the_plan_and_the_document() {
    let (document, dir) = run(true);
    assert!(!document.contains("think"), "{document}");
    assert!(!document.contains("water words"), "{document}");
    // Two paragraphs were planned: the draft line inside the thinking did
    // not count as a third.
    let plan = std::fs::read_to_string(dir.join("plan.json")).unwrap();
    assert!(
        plan.contains("the source") && plan.contains("the sea"),
        "{plan}"
    );
    assert!(!plan.contains("a draft line"), "{plan}");
    assert_eq!(document.matches("The river runs").count(), 2);
    for n in 1..=2 {
        let kept = std::fs::read_to_string(dir.join(format!("thinking/00{n}.md"))).unwrap();
        assert_eq!(kept, format!("section {n} needs water words"));
    }
    let (document, dir) = run(false);
    assert!(!document.contains("think"), "{document}");
    assert!(!dir.join("thinking").exists());
}
