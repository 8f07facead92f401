//! Quality gates an item passes before it is accepted: every planned
//! section present and non-empty, the delivered length within a band of the
//! planned total, repetition (seq-rep-4) below a threshold, no refusal,
//! error or sentinel text, and the answer in the instruction's language.

use lw_core::Counter;
use lw_write::{Language, Plan};

/// Thresholds of the gates.
#[derive(Debug, Clone)]
pub struct Gates {
    /// Delivered words ÷ planned words must lie in this band.
    pub min_length_ratio: f64,
    pub max_length_ratio: f64,
    /// seq-rep-4 of the document must stay below this.
    pub max_seq_rep_4: f64,
    pub counter: Counter,
}

impl Default for Gates {
    fn default() -> Self {
        Gates {
            min_length_ratio: 0.7,
            max_length_ratio: 1.5,
            max_seq_rep_4: lw_eval::repetition::DEGENERATE_SEQ_REP_4,
            counter: Counter::Unicode,
        }
    }
}

/// Why an item was not accepted: a short code for counting, and a detail.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    pub code: &'static str,
    pub detail: String,
}

impl Rejection {
    pub fn new(code: &'static str, detail: impl Into<String>) -> Self {
        Rejection {
            code,
            detail: detail.into(),
        }
    }
}

/// Phrases of refusals, API errors and leaked special tokens; none of them
/// belongs in training data. Matched case-insensitively.
const SENTINELS: &[(&str, &str)] = &[
    ("refusal", "i'm sorry, but i can"),
    ("refusal", "i am sorry, but i can"),
    ("refusal", "i cannot fulfill"),
    ("refusal", "i can't fulfill"),
    ("refusal", "i can't assist with"),
    ("refusal", "i cannot assist with"),
    ("refusal", "as an ai language model"),
    ("refusal", "抱歉，我无法"),
    ("refusal", "很抱歉，我不能"),
    ("refusal", "作为一个人工智能"),
    ("error-text", "internal server error"),
    ("error-text", "rate limit exceeded"),
    ("error-text", "traceback (most recent call last)"),
    ("error-text", "\"error\": {"),
    ("error-text", "{\"error\""),
    ("error-text", "[error]"),
    ("error-text", "bad gateway"),
    ("error-text", "service unavailable"),
    ("sentinel", "<|endoftext|>"),
    ("sentinel", "<|im_end|>"),
    ("sentinel", "<|im_start|>"),
    ("sentinel", "<|eot_id|>"),
    ("sentinel", "<|user|>"),
    ("sentinel", "<|assistant|>"),
    ("sentinel", "</s>"),
    ("sentinel", "[/inst]"),
];

impl Gates {
    /// Checks a finished item. `sections` holds each planned section's text
    /// (`None` where none was saved).
    pub fn check(
        &self,
        instruction: &str,
        plan: &Plan,
        sections: &[Option<String>],
    ) -> Result<usize, Rejection> {
        for (i, s) in sections.iter().enumerate().take(plan.paragraphs.len()) {
            match s {
                None => {
                    return Err(Rejection::new(
                        "missing-section",
                        format!(
                            "section {} of {} was never written",
                            i + 1,
                            plan.paragraphs.len()
                        ),
                    ))
                }
                Some(t) if t.trim().is_empty() => {
                    return Err(Rejection::new(
                        "empty-section",
                        format!("section {} of {} is empty", i + 1, plan.paragraphs.len()),
                    ))
                }
                Some(_) => {}
            }
        }
        if sections.len() < plan.paragraphs.len() {
            return Err(Rejection::new(
                "missing-section",
                format!(
                    "{} of {} planned sections written",
                    sections.len(),
                    plan.paragraphs.len()
                ),
            ));
        }
        let document = sections
            .iter()
            .flatten()
            .map(|s| s.trim())
            .collect::<Vec<_>>()
            .join("\n\n");
        let lower = document.to_lowercase();
        if let Some((code, phrase)) = SENTINELS.iter().find(|(_, p)| lower.contains(p)) {
            return Err(Rejection::new(code, format!("contains \"{phrase}\"")));
        }
        let words = self.counter.count(&document);
        let planned = plan.total_words().max(1) as f64;
        let ratio = words as f64 / planned;
        if ratio < self.min_length_ratio || ratio > self.max_length_ratio {
            return Err(Rejection::new(
                "length",
                format!(
                    "{words} words for {} planned ({ratio:.2}; band {:.2}–{:.2})",
                    plan.total_words(),
                    self.min_length_ratio,
                    self.max_length_ratio
                ),
            ));
        }
        let rep = lw_eval::repetition::seq_rep(&lw_eval::repetition::units(&document), 4);
        if rep >= self.max_seq_rep_4 {
            return Err(Rejection::new(
                "repetition",
                format!("seq-rep-4 {rep:.3} (limit {:.3})", self.max_seq_rep_4),
            ));
        }
        let (asked, got) = (Language::detect(instruction), Language::detect(&document));
        if asked != got {
            return Err(Rejection::new(
                "language",
                format!(
                    "the instruction is {}, the answer {}",
                    asked.code(),
                    got.code()
                ),
            ));
        }
        Ok(words)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lw_write::Paragraph;

    fn plan(words: &[u32]) -> Plan {
        Plan {
            paragraphs: words
                .iter()
                .map(|&w| Paragraph {
                    main_point: "a point".into(),
                    words: w,
                })
                .collect(),
        }
    }

    /// Varied English prose of about `n` words.
    fn prose(n: usize, salt: usize) -> String {
        (0..n)
            .map(|i| format!("w{}x{}", (i * 7919 + salt * 31) % 100_003, i % 13))
            .collect::<Vec<_>>()
            .join(" ")
    }

    #[test]
    fn a_good_item_passes_and_each_gate_names_its_reason() {
        let g = Gates::default();
        let p = plan(&[100, 100]);
        let ok = [Some(prose(100, 1)), Some(prose(100, 2))];
        assert_eq!(g.check("Write 200 words about rivers.", &p, &ok), Ok(200));

        let code = |s: &[Option<String>], ins: &str| g.check(ins, &p, s).unwrap_err().code;
        let en = "Write 200 words about rivers.";
        assert_eq!(code(&[Some(prose(100, 1)), None], en), "missing-section");
        assert_eq!(code(&[Some(prose(100, 1))], en), "missing-section");
        assert_eq!(
            code(&[Some(prose(100, 1)), Some("  ".into())], en),
            "empty-section"
        );
        assert_eq!(
            code(&[Some(prose(30, 1)), Some(prose(30, 2))], en),
            "length"
        );
        assert_eq!(
            code(&[Some(prose(300, 1)), Some(prose(300, 2))], en),
            "length"
        );
        let looped = "the river rose again and ".repeat(20);
        assert_eq!(
            code(&[Some(looped.clone()), Some(looped)], en),
            "repetition"
        );
        let refusal = format!("{} I'm sorry, but I can't help with that.", prose(95, 3));
        assert_eq!(code(&[Some(prose(100, 1)), Some(refusal)], en), "refusal");
        let leaked = format!("{} <|im_end|>", prose(99, 3));
        assert_eq!(code(&[Some(prose(100, 1)), Some(leaked)], en), "sentinel");
        let api = format!(
            "{} {{\"error\": {{\"message\": \"overloaded\"}}}}",
            prose(95, 3)
        );
        assert_eq!(code(&[Some(prose(100, 1)), Some(api)], en), "error-text");
        assert_eq!(code(&ok, "写一篇两百字的关于河流的文章。"), "language");
    }
}
