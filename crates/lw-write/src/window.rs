//! The text so far inside the model's context.
//!
//! Each AgentWrite step shows the model everything written before it. With
//! a small model's context (SmolLM2's 8,192 tokens) a 10,000-word piece
//! outgrows it halfway; the step would then be refused. Instead the text
//! so far is cut from the front, at a paragraph (else a sentence, else a
//! space), and the cut is marked. The cut point only moves forward and
//! moves in strides (the kept text drops to [`REFILL`] of the room), so
//! consecutive steps share their prompt's prefix and the local engine's
//! prefix cache keeps working between strides.

use lw_core::Message;

use crate::model::LanguageModel;

/// Share of the room for the text so far that a fresh cut leaves filled.
const REFILL: f64 = 0.6;

/// Marks where the kept text starts when earlier text was cut.
pub const CUT_MARK: &str = "[…]\n\n";

/// One step's prompt fitted to the context.
#[derive(Debug, Clone, PartialEq)]
pub struct Fitted {
    pub prompt: String,
    /// The answer's token budget, lowered only where the prompt without
    /// any text so far already leaves less room.
    pub max_tokens: usize,
    /// Byte offset in the text so far where the shown text starts.
    pub start: usize,
}

/// Builds the prompt from `written[start..]` (cut further where prompt plus
/// `answer` tokens exceed the model's context). `build` makes the prompt
/// from the text so far as shown. Where the prompt without any text so far
/// leaves less than `answer`, the answer is lowered, never below
/// `min_answer` (the call then fails with the sizes named). Models that do
/// not say their context (servers) get the whole text, as before.
pub fn fit_written(
    model: &dyn LanguageModel,
    build: &dyn Fn(&str) -> String,
    written: &str,
    start: usize,
    answer: usize,
    min_answer: usize,
) -> Fitted {
    let shown = |from: usize| -> String {
        if from == 0 {
            written.to_string()
        } else {
            format!("{CUT_MARK}{}", &written[from..])
        }
    };
    let count = |shown: &str| model.prompt_room(&[Message::user(build(shown))]);
    let start = start.min(written.len());
    let unchanged = |start| Fitted {
        prompt: build(&shown(start)),
        max_tokens: answer,
        start,
    };
    let Some((mut tokens, context)) = count(&shown(start)) else {
        return unchanged(start);
    };
    if tokens + answer <= context {
        return unchanged(start);
    }
    // The prompt with no text so far: what the answer may use at most.
    let base = count(CUT_MARK).map_or(0, |(t, _)| t);
    let answer = answer.min(context.saturating_sub(base).max(min_answer));
    let room = context.saturating_sub(base + answer);
    let mut start = start;
    let mut target = (room as f64 * REFILL) as usize;
    for _ in 0..12 {
        let tail_tokens = tokens.saturating_sub(base);
        if start >= written.len() || (tail_tokens <= target.max(1) && start > 0) {
            break;
        }
        // Tokens are about proportional to bytes: cut the excess share.
        let tail = written.len() - start;
        let keep = (tail as f64 * target as f64 / tail_tokens.max(1) as f64) as usize;
        let next = snap_forward(written, written.len() - keep.min(tail));
        start = if next > start {
            next
        } else {
            snap_forward(written, start + 1)
        };
        target = (target as f64 * 0.95) as usize;
        tokens = count(&shown(start)).map_or(0, |(t, _)| t);
    }
    Fitted {
        prompt: build(&shown(start)),
        max_tokens: answer,
        start,
    }
}

/// The first paragraph start at or after `at`; else the first sentence
/// start within 2,000 bytes; else the next word; else the end.
fn snap_forward(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at += 1;
    }
    if at == 0 {
        return 0;
    }
    let rest = &text[at..];
    if let Some(i) = rest.find("\n\n") {
        let skip = rest[i..].len() - rest[i..].trim_start_matches('\n').len();
        return at + i + skip;
    }
    let window = &rest[..floor_boundary(rest, 2000)];
    let sentence = window
        .char_indices()
        .find(|&(_, c)| matches!(c, '.' | '!' | '?' | '。' | '！' | '？'))
        .map(|(i, c)| i + c.len_utf8());
    if let Some(i) = sentence {
        let after = &rest[i..];
        return at + i + (after.len() - after.trim_start().len());
    }
    match rest.find(char::is_whitespace) {
        Some(i) => {
            let after = &rest[i..];
            at + i + (after.len() - after.trim_start().len())
        }
        None => text.len(),
    }
}

fn floor_boundary(text: &str, at: usize) -> usize {
    let mut at = at.min(text.len());
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ChatRequest, ChatResponse, ModelCallError};

    /// A model whose tokens are whitespace-separated words, with a context.
    struct Words(usize);

    impl LanguageModel for Words {
        fn name(&self) -> String {
            "words".into()
        }
        fn prompt_room(&self, messages: &[Message]) -> Option<(usize, usize)> {
            let n = messages
                .iter()
                .map(|m| m.content.split_whitespace().count())
                .sum();
            Some((n, self.0))
        }
        fn complete(
            &mut self,
            _: &ChatRequest,
            _: &mut dyn FnMut(&str) -> bool,
        ) -> Result<ChatResponse, ModelCallError> {
            unreachable!("only counted")
        }
    }

    fn build(text: &str) -> String {
        format!("task words here\n<<<\n{text}\n>>>\nwrite on")
    }

    fn paragraphs(n: usize) -> String {
        (0..n)
            .map(|i| format!("Paragraph {i} has exactly seven words here."))
            .collect::<Vec<_>>()
            .join("\n\n")
    }

    #[test]
    fn text_that_fits_is_shown_whole() {
        let written = paragraphs(10);
        let f = fit_written(&Words(1000), &build, &written, 0, 100, 100);
        assert_eq!(f.start, 0);
        assert_eq!(f.prompt, build(&written));
        assert_eq!(f.max_tokens, 100);
    }

    #[test]
    fn overflowing_text_is_cut_at_a_paragraph_and_marked() {
        // 200 paragraphs of 7 words: 1,400 words; the context holds 500.
        let written = paragraphs(200);
        let f = fit_written(&Words(500), &build, &written, 0, 100, 100);
        let tokens = f.prompt.split_whitespace().count();
        assert!(tokens + 100 <= 500, "{tokens} tokens");
        // A fresh cut leaves room to grow: about 60% of the room is used.
        assert!(tokens < 300, "{tokens} tokens");
        assert!(f.prompt.contains(&format!("<<<\n{CUT_MARK}Paragraph ")));
        assert!(written[f.start..].starts_with("Paragraph "));
        assert!(f.prompt.contains("Paragraph 199 has"));
        assert_eq!(f.max_tokens, 100);
    }

    #[test]
    fn the_cut_stays_while_the_text_fits_so_prompts_share_a_prefix() {
        let mut written = paragraphs(200);
        let first = fit_written(&Words(500), &build, &written, 0, 100, 100);
        written.push_str("\n\nOne more paragraph of seven words here.");
        let second = fit_written(&Words(500), &build, &written, first.start, 100, 100);
        assert_eq!(second.start, first.start);
        let shared = first.prompt.trim_end_matches("\n>>>\nwrite on");
        assert!(second.prompt.starts_with(shared));
    }

    #[test]
    fn a_prompt_too_long_without_any_text_lowers_the_answer() {
        let f = fit_written(&Words(60), &build, &paragraphs(20), 0, 100, 10);
        let tokens = f.prompt.split_whitespace().count();
        assert!(tokens + f.max_tokens <= 60, "{tokens} + {}", f.max_tokens);
        assert!(f.max_tokens < 60);
        // Never below the least answer asked for: the call fails instead.
        let f = fit_written(&Words(60), &build, &paragraphs(20), 0, 100, 80);
        assert_eq!(f.max_tokens, 80);
    }

    #[test]
    fn text_without_paragraphs_is_cut_at_a_sentence() {
        let written = "One two three four. ".repeat(300);
        let f = fit_written(&Words(400), &build, &written, 0, 50, 50);
        assert!(f.prompt.split_whitespace().count() + 50 <= 400);
        assert!(written[f.start..].starts_with("One two"));
        let chinese = "河水流向大海。".repeat(50);
        let at = snap_forward(&chinese, 4);
        assert!(chinese[at..].starts_with("河水"), "{at}");
    }
}
