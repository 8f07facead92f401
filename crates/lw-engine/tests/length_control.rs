//! Length control's push to end (`end_after`): past that many tokens the
//! generation ends at the next sentence end, under a grammar too (where
//! the grammar may end there).

use lw_core::{Constraint, GenerationParams, SamplingParams};
use lw_engine::{Engine, LoadOptions};

mod common;
use common::{fixture, fixtures, ids};

#[test]
fn past_its_budget_a_constrained_generation_ends_at_the_next_sentence_end() {
    let mut engine = Engine::load(
        &fixtures().join("models/llama3-untied"),
        &LoadOptions::default(),
    )
    .unwrap();
    let prompt = ids(&fixture("llama3-untied")["prompt_ids"]);
    // Short sentences, so a boundary comes every few tokens.
    let mut p = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(120),
        constraint: Some(Constraint::Gbnf("root ::= ([a-z ]{1,6} \".\")*".into())),
        ..Default::default()
    };
    let free = engine.generate(&prompt, &p, |_| true).unwrap();
    p.end_after = Some(8);
    engine.reset();
    let pushed = engine.generate(&prompt, &p, |_| true).unwrap();
    assert_eq!(
        free.tokens[..pushed.tokens.len()],
        pushed.tokens[..],
        "the same choices up to the end"
    );
    assert!(
        pushed.tokens.len() >= 8 && pushed.tokens.len() < free.tokens.len(),
        "{} of {} tokens: {:?}",
        pushed.tokens.len(),
        free.tokens.len(),
        free.text
    );
    assert!(pushed.text.ends_with('.'), "{:?}", pushed.text);
    assert_eq!(pushed.finish_reason, lw_core::FinishReason::Stop);
    // It ended at the first sentence end at or past 8 tokens.
    let mut text = String::new();
    let mut ends_at = None;
    for n in 1..=free.tokens.len() {
        text = engine
            .shared()
            .tokenizer()
            .decode(&free.tokens[..n])
            .unwrap();
        if n >= 8 && text.ends_with('.') {
            ends_at = Some(n);
            break;
        }
    }
    assert_eq!(ends_at, Some(pushed.tokens.len()), "{text:?}");
}
