//! Synthetic AgentWrite training data from plain text: a "document" is a run
//! of consecutive paragraphs (blank-line separated; single lines when the
//! text has no blank lines); its plan gives each paragraph's first sentence
//! as the main point and its real length as the budget; the instruction asks
//! for the document's total length. Each document yields the conversations
//! the method has with a model: one planning turn, then one writing turn per
//! paragraph, with exactly the prompts `write` sends.

use lw_core::words::Counter;

use crate::length::Language;
use crate::plan::{Paragraph, Plan};
use crate::prompts::{plan_prompt, write_prompt};

/// How documents are cut from a text.
#[derive(Debug, Clone)]
pub struct SynthOptions {
    /// Paragraphs per document (inclusive range).
    pub min_paragraphs: usize,
    pub max_paragraphs: usize,
    /// Paragraphs outside this length (words; characters for Chinese) are
    /// not used, and end the current document.
    pub min_words: usize,
    pub max_words: usize,
}

impl Default for SynthOptions {
    fn default() -> Self {
        SynthOptions {
            min_paragraphs: 3,
            max_paragraphs: 5,
            min_words: 30,
            max_words: 250,
        }
    }
}

/// One training conversation: (user prompt, assistant answer).
pub type Turn = (String, String);

/// A document cut from the text, with its plan and instruction.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub instruction: String,
    pub language: Language,
    pub plan: Plan,
    pub paragraphs: Vec<String>,
}

impl Document {
    /// The planning turn, then one writing turn per paragraph.
    pub fn turns(&self) -> Vec<Turn> {
        let total = self.plan.total_words();
        let mut out = vec![(
            plan_prompt(&self.instruction, Some(total), self.language, None),
            self.plan.to_text(),
        )];
        let mut written = String::new();
        for (i, p) in self.paragraphs.iter().enumerate() {
            let prompt = write_prompt(&self.instruction, &self.plan, &written, i, self.language);
            out.push((prompt, p.clone()));
            if !written.is_empty() {
                written.push_str("\n\n");
            }
            written.push_str(p);
        }
        out
    }
}

/// The first sentence of a paragraph, at most `max` words (characters).
fn first_sentence(p: &str, lang: Language) -> String {
    let ends: &[char] = match lang {
        Language::English => &['.', '!', '?', ';'],
        Language::Chinese => &['。', '！', '？', '；', '\n'],
    };
    let flat = p.split_whitespace().collect::<Vec<_>>().join(" ");
    let cut = flat
        .char_indices()
        .find(|(_, c)| ends.contains(c))
        .map(|(i, c)| i + c.len_utf8())
        .unwrap_or(flat.len());
    let s = flat[..cut].trim().to_string();
    match lang {
        Language::English => {
            let words: Vec<&str> = s.split_whitespace().collect();
            if words.len() > 30 {
                format!("{} …", words[..30].join(" "))
            } else {
                s
            }
        }
        Language::Chinese => {
            if s.chars().count() > 40 {
                format!("{}…", s.chars().take(40).collect::<String>())
            } else {
                s
            }
        }
    }
}

fn instruction_for(first: &str, total: u32, lang: Language) -> String {
    match lang {
        Language::English => {
            format!("Write a {total}-word passage that begins with this idea: {first}")
        }
        Language::Chinese => format!("写一篇约{total}字的文章，开头的内容是：{first}"),
    }
}

/// Cuts `text` (paragraphs separated by blank lines; for Chinese, a single
/// newline also separates) into documents. `start` varies where the first
/// document begins, so different seeds give different cuts.
pub fn documents(text: &str, opts: &SynthOptions, start: usize) -> Vec<Document> {
    let lang = Language::detect(text);
    let counter = Counter::default();
    let sep = if text.contains("\n\n") { "\n\n" } else { "\n" };
    let paragraphs: Vec<String> = match lang {
        Language::English => text
            .split(sep)
            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect(),
        // Chinese keeps its line breaks (a poem's lines, its title line).
        Language::Chinese => text.split(sep).map(|p| p.trim().to_string()).collect(),
    };
    let max_run = opts.max_paragraphs.max(opts.min_paragraphs).max(1);
    let mut out = Vec::new();
    let mut run: Vec<String> = Vec::new();
    let mut want = opts.min_paragraphs + start % (max_run - opts.min_paragraphs + 1);
    let flush = |run: &mut Vec<String>, out: &mut Vec<Document>| {
        if run.len() >= opts.min_paragraphs.max(1) {
            let plan = Plan {
                paragraphs: run
                    .iter()
                    .map(|p| Paragraph {
                        main_point: first_sentence(p, lang),
                        words: counter.count(p) as u32,
                    })
                    .collect(),
            };
            let instruction =
                instruction_for(&plan.paragraphs[0].main_point, plan.total_words(), lang);
            out.push(Document {
                instruction,
                language: lang,
                plan,
                paragraphs: std::mem::take(run),
            });
        }
        run.clear();
    };
    for p in paragraphs.into_iter().skip(start % 3) {
        let n = counter.count(&p);
        if n < opts.min_words || n > opts.max_words {
            flush(&mut run, &mut out);
            continue;
        }
        run.push(p);
        if run.len() == want {
            flush(&mut run, &mut out);
            want = opts.min_paragraphs + (out.len() + start) % (max_run - opts.min_paragraphs + 1);
        }
    }
    flush(&mut run, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::parse_plan;

    fn para(i: usize) -> String {
        format!(
            "Paragraph number {i} opens here. {}",
            "It goes on with more words in the middle of the text. ".repeat(4)
        )
    }

    #[test]
    fn documents_have_real_budgets_and_parseable_plans() {
        let text: Vec<String> = (0..12).map(para).collect();
        let docs = documents(&text.join("\n\n"), &SynthOptions::default(), 0);
        assert!(!docs.is_empty());
        let counter = Counter::default();
        for d in &docs {
            assert!((3..=5).contains(&d.paragraphs.len()));
            for (p, planned) in d.paragraphs.iter().zip(&d.plan.paragraphs) {
                assert_eq!(planned.words as usize, counter.count(p));
                assert!(p.starts_with(planned.main_point.as_str()));
            }
            let total = d.plan.total_words();
            assert!(d.instruction.contains(&format!("{total}-word")));
            // The plan the model learns to write parses back (budgets below
            // the writer's minimum are raised by the parser, points are kept).
            let turns = d.turns();
            let back = parse_plan(&turns[0].1, Some(total)).unwrap();
            assert_eq!(back.paragraphs.len(), d.plan.paragraphs.len());
            for (b, p) in back.paragraphs.iter().zip(&d.plan.paragraphs) {
                assert!(p.main_point.starts_with(&b.main_point), "{b:?} vs {p:?}");
            }
            assert_eq!(turns.len(), d.paragraphs.len() + 1);
            // Step k sees exactly the paragraphs before it.
            assert!(turns[2].0.contains(&d.paragraphs[0]));
            assert!(!turns[2].0.contains(&d.paragraphs[1]));
        }
    }

    #[test]
    fn short_or_long_paragraphs_break_documents() {
        let mut text: Vec<String> = (0..4).map(para).collect();
        text.insert(2, "Too short.".into());
        let docs = documents(&text.join("\n\n"), &SynthOptions::default(), 0);
        assert!(
            docs.is_empty(),
            "two-paragraph runs are too short: {docs:?}"
        );
    }

    #[test]
    fn chinese_documents_count_characters() {
        let p = |i: usize| {
            format!(
                "第{i}段开始了。{}",
                "这是一段用来测试的中文内容，".repeat(4)
            )
        };
        let text: Vec<String> = (0..6).map(p).collect();
        let docs = documents(&text.join("\n"), &SynthOptions::default(), 0);
        assert!(!docs.is_empty());
        assert_eq!(docs[0].language, Language::Chinese);
        assert!(docs[0].instruction.contains("字"));
        assert!(docs[0].plan.paragraphs[0].main_point.ends_with('。'));
    }
}
