//! The plan: paragraphs, each with a main point and a word budget, parsed
//! from whatever shape a model writes it in, and checked against the length
//! the instruction asks for.

use std::fmt::Write as _;
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// Budgets per paragraph are clamped to this range (as in the original
/// method), except that a short piece may have a shorter paragraph.
pub const MIN_WORDS: u32 = 200;
pub const MAX_WORDS: u32 = 1000;
/// A plan may miss the asked length by this much before it is re-asked.
pub const LOW_RATIO: f64 = 0.8;
pub const HIGH_RATIO: f64 = 1.3;
/// Longer plans are refused (the original skipped them).
pub const MAX_PARAGRAPHS: usize = 50;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Paragraph {
    pub main_point: String,
    /// Word budget (characters for Chinese).
    pub words: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    pub paragraphs: Vec<Paragraph>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("no paragraphs found: write one line per paragraph, e.g. `Paragraph 1 - Main Point: … - Word Count: 400 words`")]
    NoParagraphs,
    #[error("paragraph {paragraph} has no word count: \"{text}\"")]
    MissingWordCount { paragraph: usize, text: String },
    #[error("the plan has {count} paragraphs; at most {MAX_PARAGRAPHS} are allowed")]
    TooManyParagraphs { count: usize },
    #[error("the paragraphs add up to {planned} words, less than {min} (80% of the {asked} asked for)", min = (*asked as f64 * LOW_RATIO).ceil() as u32)]
    TooShort { planned: u32, asked: u32 },
    #[error("the paragraphs add up to {planned} words, more than {max} (130% of the {asked} asked for)", max = (*asked as f64 * HIGH_RATIO).floor() as u32)]
    TooLong { planned: u32, asked: u32 },
}

impl Plan {
    pub fn total_words(&self) -> u32 {
        self.paragraphs.iter().map(|p| p.words).sum()
    }

    /// Checks the total against the asked length (80%–130%).
    pub fn check_length(&self, asked: Option<u32>) -> Result<(), PlanError> {
        let Some(asked) = asked else { return Ok(()) };
        let planned = self.total_words();
        if (planned as f64) < asked as f64 * LOW_RATIO {
            return Err(PlanError::TooShort { planned, asked });
        }
        if (planned as f64) > asked as f64 * HIGH_RATIO {
            return Err(PlanError::TooLong { planned, asked });
        }
        Ok(())
    }

    /// Scales the budgets so they add up to `asked`: each paragraph gets
    /// half its share of the planned total and half an even share (a small
    /// model's numbers are mostly noise; a large one's proportions still
    /// show), kept within [`MIN_WORDS`]–[`MAX_WORDS`] (the minimum lowered
    /// for short pieces) with what the bounds cut spread over the others,
    /// and rounded to 10 words. The main points stay.
    pub fn normalise(&mut self, asked: u32) {
        let n = self.paragraphs.len();
        if n == 0 {
            return;
        }
        let total = self.total_words().max(1) as f64;
        let min = MIN_WORDS.min(asked / n as u32).max(10) as f64;
        let max = MAX_WORDS as f64;
        let mut want: Vec<f64> = self
            .paragraphs
            .iter()
            .map(|p| asked as f64 * (0.5 * p.words as f64 / total + 0.5 / n as f64))
            .collect();
        // Clamp, then stretch the unclamped ones to the total again.
        for _ in 0..8 {
            want.iter_mut().for_each(|w| *w = w.clamp(min, max));
            let fixed: f64 = want.iter().filter(|&&w| w <= min || w >= max).sum();
            let free: f64 = want.iter().filter(|&&w| w > min && w < max).sum();
            if free <= 0.0 {
                break;
            }
            let scale = (asked as f64 - fixed).max(0.0) / free;
            want.iter_mut()
                .filter(|w| **w > min && **w < max)
                .for_each(|w| *w *= scale);
        }
        for (p, w) in self.paragraphs.iter_mut().zip(want) {
            p.words = (((w.clamp(min, max) / 10.0).round() as u32) * 10).max(10);
        }
    }

    /// The plan in the canonical one-line-per-paragraph form (what `plan`
    /// prints and `--plan FILE` reads back).
    pub fn to_text(&self) -> String {
        self.paragraphs
            .iter()
            .enumerate()
            .map(|(i, p)| {
                format!(
                    "Paragraph {} - Main Point: {} - Word Count: {} words\n",
                    i + 1,
                    p.main_point,
                    p.words
                )
            })
            .collect()
    }
}

/// Words per paragraph a constrained plan aims at: the paragraph count is
/// the asked length over this.
pub const TARGET_WORDS: u32 = 400;

/// The paragraph count of a constrained plan for `asked` words.
pub fn paragraph_count(asked: Option<u32>) -> usize {
    match asked {
        Some(n) => ((n as f64 / TARGET_WORDS as f64).round() as usize).clamp(1, MAX_PARAGRAPHS),
        None => 5,
    }
}

/// The longest main point of a constrained plan of `n` paragraphs: 160
/// characters, fewer for long plans (about 1,500 in all, at least 30
/// each), so the whole plan fits a small model's context.
fn point_chars(n: usize) -> usize {
    (1500 / n.max(1)).clamp(30, 160)
}

/// Tokens to allow a constrained plan for `asked` words: every line at its
/// longest, at 3 tokens a character (Chinese text in a tokenizer made for
/// English takes that many): at most about 4,800.
pub fn plan_max_tokens(asked: Option<u32>) -> usize {
    let n = paragraph_count(asked);
    n * (point_chars(n) * 3 + 40) + 64
}

/// A GBNF grammar whose every sentence is a plan of `paragraph_count(asked)`
/// lines in the form [`Plan::to_text`] writes (the Chinese form for
/// Chinese), each main point one sentence of 4–161 characters (fewer in
/// long plans) ended by its stop, without `-`, brackets or angle brackets
/// (it ends with the space before ` - Word Count`), and each budget a
/// whole number from 10 to 9999: a plan decoded under it always parses.
pub fn plan_grammar(asked: Option<u32>, lang: crate::length::Language) -> String {
    let n = paragraph_count(asked);
    // The point runs up to the "-" of its label (no "-" inside it), so
    // the label cannot start inside it and the point is one lexeme.
    let (head, point, count, unit) = match lang {
        crate::length::Language::English => {
            ("Paragraph ", " - Main Point: ", "- Word Count: ", " words")
        }
        crate::length::Language::Chinese => ("段落", " - 主要内容：", "- 字数要求：", "字"),
    };
    let mut g = String::from("root ::=");
    for i in 1..=n {
        g.push_str(&format!(" line{i}"));
    }
    g.push('\n');
    for i in 1..=n {
        g.push_str(&format!(
            "line{i} ::= \"{head}{i}{point}\" point \"{count}\" budget \"{unit}\\n\"\n"
        ));
    }
    // One sentence, ended by its stop and the space before the label; no
    // brackets or angle brackets, so a small model cannot copy the prompt's
    // placeholder ("[what this paragraph says]") or its text markers.
    let (body, stop) = match lang {
        crate::length::Language::English => ("[^\\n\\-\\[\\]<>.!?]", "[.!?]"),
        crate::length::Language::Chinese => ("[^\\n\\-\\[\\]<>【】。！？]", "[。！？]"),
    };
    let _ = writeln!(g, "point ::= {body}{{3,{}}} {stop} \" \"", point_chars(n));
    g.push_str("budget ::= [1-9] [0-9] [0-9]? [0-9]?\n");
    g
}

/// A plan exactly in the form [`plan_grammar`] makes (English or Chinese
/// lines, nothing else): main points may hold anything, numbers and
/// "paragraph" included, which the tolerant parser would read as structure.
/// `None` when the text is not in that form (a server ignored the grammar).
pub fn parse_strict(text: &str) -> Option<Plan> {
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| {
        Regex::new(r"^(?:Paragraph (\d+) - Main Point: (.*?) ?- Word Count: (\d+) words|段落(\d+) - 主要内容：(.*?) ?- 字数要求：(\d+)字)$")
            .expect("valid regex")
    });
    let mut paragraphs = Vec::new();
    for (i, line) in text.lines().filter(|l| !l.trim().is_empty()).enumerate() {
        let c = re.captures(line.trim_end())?;
        let at = |a: usize, b: usize| c.get(a).or_else(|| c.get(b)).map(|m| m.as_str());
        if at(1, 4)?.parse::<usize>().ok()? != i + 1 {
            return None;
        }
        paragraphs.push(Paragraph {
            main_point: at(2, 5)?.trim().to_string(),
            words: at(3, 6)?.parse().ok()?,
        });
    }
    (!paragraphs.is_empty()).then_some(Plan { paragraphs })
}

/// How an item of the list starts, strongest first: a document's items are
/// the lines of the strongest kind it contains; weaker ones continue an item.
fn markers() -> &'static [Regex; 4] {
    static RE: OnceLock<[Regex; 4]> = OnceLock::new();
    RE.get_or_init(|| {
        let re = |s: &str| Regex::new(s).expect("valid regex");
        [
            re(r"(?i)^(?:#+\s*)?(?:[-*+•]\s*)?(?:\*\*|__)?\s*(?:paragraph|para\.?|section|part|step)\s*#?\s*\d+\b(?:\*\*|__)?\s*[:：.\-–—)]?|^(?:#+\s*)?(?:[-*+•]\s*)?(?:\*\*)?\s*(?:段落|第)\s*[0-9一二三四五六七八九十百]+\s*(?:段|部分|节|章)?(?:\*\*)?\s*[:：.\-–—、]?"),
            re(r"^(?:#+\s*)?(?:\*\*)?\d+\s*[.)、．:：]\s*(?:\*\*)?"),
            re(r"^[-*+•]\s+"),
            re(r"^#{1,6}\s+"),
        ]
    })
}

/// Summary lines after the list ("Total: 10000 words") end the list.
fn trailer() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"(?i)^(?:[-*#\s]|\*\*)*(?:total|overall|in total|sum|总计|合计|总字数|共计)")
            .expect("valid regex")
    })
}

/// A labelled count ("Word Count: 300", "字数要求：500字", "~400 words").
fn count_patterns() -> &'static [Regex; 2] {
    static RE: OnceLock<[Regex; 2]> = OnceLock::new();
    RE.get_or_init(|| {
        let num = r"(\d[\d,]*)(?:\s*(?:-|–|—|~|～|to|至|到)\s*(\d[\d,]*))?";
        [
            Regex::new(&format!(
                r"(?i)(?:word\s*count|words|length|字数要求|字数|字數|篇幅)\s*(?:\*\*)?\s*[:：]?\s*(?:\*\*)?\s*(?:about|approximately|approx\.?|around|roughly|约|大约|左右)?\s*~?\s*{num}"
            ))
            .expect("valid regex"),
            Regex::new(&format!(r"(?i)(?:about|approximately|approx\.?|around|roughly|约|大约)?\s*~?\s*{num}\s*(?:words?\b|字|词|個字|个字)")).expect("valid regex"),
        ]
    })
}

/// Labels and filler removed from a main point.
fn label_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)(?:main\s*point|主要内容|主要內容|要点|要點|内容|內容|主题|主題|topic)\s*[:：]",
        )
        .expect("valid regex")
    })
}

/// Parses a plan from model output. Budgets are clamped to
/// [`MIN_WORDS`]–[`MAX_WORDS`] (the minimum lowered to `asked` for short pieces).
pub fn parse_plan(text: &str, asked: Option<u32>) -> Result<Plan, PlanError> {
    let lines: Vec<String> = text
        .lines()
        .map(|l| l.trim().to_string())
        .filter(|l| !l.starts_with("```"))
        .collect();
    let kind = markers()
        .iter()
        .position(|re| {
            lines
                .iter()
                .any(|l| re.is_match(l) && !trailer().is_match(l))
        })
        .ok_or(PlanError::NoParagraphs)?;
    let marker = &markers()[kind];
    let mut items: Vec<(String, String)> = Vec::new(); // (marker text, body)
    let mut open = false;
    for line in &lines {
        if trailer().is_match(line) {
            open = false;
            continue;
        }
        if let Some(m) = marker.find(line) {
            items.push((m.as_str().to_string(), line[m.end()..].to_string()));
            open = true;
        } else if open && !line.is_empty() {
            let last = items.last_mut().expect("an item is open");
            last.1.push(' ');
            last.1.push_str(line);
        }
    }
    if items.is_empty() {
        return Err(PlanError::NoParagraphs);
    }
    if items.len() > MAX_PARAGRAPHS {
        return Err(PlanError::TooManyParagraphs { count: items.len() });
    }
    let min = asked.map_or(MIN_WORDS, |a| a.min(MIN_WORDS)).max(1);
    let mut paragraphs = Vec::with_capacity(items.len());
    for (i, (_, body)) in items.iter().enumerate() {
        let (words, span) = find_count(body).ok_or_else(|| PlanError::MissingWordCount {
            paragraph: i + 1,
            text: body.trim().to_string(),
        })?;
        let mut point = body.clone();
        point.replace_range(span, " ");
        paragraphs.push(Paragraph {
            main_point: clean_point(&point).unwrap_or_else(|| format!("Paragraph {}", i + 1)),
            words: words.clamp(min, MAX_WORDS),
        });
    }
    Ok(Plan { paragraphs })
}

/// The word count of an item and the span of text that states it. A labelled
/// count wins; otherwise the last "N words" in the item.
fn find_count(body: &str) -> Option<(u32, std::ops::Range<usize>)> {
    let [labelled, unit] = count_patterns();
    let caps = labelled
        .captures(body)
        .or_else(|| unit.captures_iter(body).last())?;
    let n = |i: usize| {
        caps.get(i)
            .and_then(|m| m.as_str().replace(',', "").parse::<f64>().ok())
    };
    let low = n(1)?;
    let value = match n(2) {
        Some(high) => (low + high) / 2.0,
        None => low,
    };
    let whole = caps.get(0)?;
    // Take the enclosing brackets and the unit along with the count.
    let mut start = whole.start();
    let mut end = whole.end();
    let rest = &body[end..];
    for unit in ["words", "word", "个字", "字", "词"] {
        if let Some(r) = rest.trim_start().strip_prefix(unit) {
            end = body.len() - r.len();
            break;
        }
    }
    let before = body[..start].trim_end();
    let after = body[end..].trim_start();
    if let (Some(o), Some(c)) = (before.chars().last(), after.chars().next()) {
        if matches!(
            (o, c),
            ('(', ')') | ('（', '）') | ('[', ']') | ('【', '】')
        ) {
            start = before.len() - o.len_utf8();
            end = body.len() - after.len() + c.len_utf8();
        }
    }
    Some((value.round() as u32, start..end))
}

fn clean_point(text: &str) -> Option<String> {
    let s = label_pattern().replace_all(text, " ");
    let s = s.replace("**", "").replace("__", "");
    let s: String = s
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace(" :", ":")
        .replace(" ：", "：");
    let trimmed =
        s.trim_matches(|c: char| c.is_whitespace() || "-–—:：|,，;；.。()（）[]".contains(c));
    // Separators left between removed parts (" - - ") collapse.
    let collapsed = trimmed.replace(" - -", " -").replace("- -", "-");
    let out = collapsed
        .trim_end_matches(['-', '–', '—', ' '])
        .trim()
        .to_string();
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn words(plan: &Plan) -> Vec<u32> {
        plan.paragraphs.iter().map(|p| p.words).collect()
    }

    #[test]
    fn the_original_form() {
        let p = parse_plan(
            "Paragraph 1 - Main Point: Introduce the printing press and why it matters - Word Count: 400 words\n\
             Paragraph 2 - Main Point: Gutenberg's workshop in Mainz - Word Count: 700 words",
            None,
        )
        .unwrap();
        assert_eq!(words(&p), [400, 700]);
        assert_eq!(
            p.paragraphs[0].main_point,
            "Introduce the printing press and why it matters"
        );
        assert_eq!(p.paragraphs[1].main_point, "Gutenberg's workshop in Mainz");
    }

    /// Real-world shapes: (plan text, expected budgets or the error).
    #[test]
    fn a_table_of_plan_shapes() {
        type Want = Result<Vec<u32>, fn(&PlanError) -> bool>;
        let cases: Vec<(&str, Want)> = vec![
            // 1. Original form with a preamble and a trailer.
            ("Here is the plan:\nParagraph 1 - Main Point: A - Word Count: 300 words\nParagraph 2 - Main Point: B - Word Count: 500 words\nTotal: 800 words", Ok(vec![300, 500])),
            // 2. Ranges take the midpoint.
            ("Paragraph 1 - Main Point: A - Word Count: 300-400 words\nParagraph 2 - Main Point: B - Word Count: 500–700 words", Ok(vec![350, 600])),
            // 3. Markdown bold labels.
            ("**Paragraph 1** - **Main Point:** Origins - **Word Count:** 450 words\n**Paragraph 2** - **Main Point:** Spread - **Word Count:** 550 words", Ok(vec![450, 550])),
            // 4. Numbered list with counts in parentheses.
            ("1. Introduction (400 words): what the essay covers\n2. History (800 words)\n3. Conclusion (300 words)", Ok(vec![400, 800, 300])),
            // 5. Numbered with ")" and "~".
            ("1) Background ~ 600 words\n2) Method ~ 900 words", Ok(vec![600, 900])),
            // 6. Markdown bullets.
            ("- Opening scene — 500 words\n- The storm — 700 words\n- Aftermath — 400 words", Ok(vec![500, 700, 400])),
            // 7. Headings with counts.
            ("## The river (600 words)\nWhere it rises.\n## The delta (500 words)\nWhere it ends.", Ok(vec![600, 500])),
            // 8. Multi-line items: sub-bullets carry the main point and the count.
            ("Paragraph 1:\n- Main Point: Early life\n- Word Count: 400 words\nParagraph 2:\n- Main Point: Later years\n- Word Count: 600 words", Ok(vec![400, 600])),
            // 9. Chinese, original form.
            ("段落1 - 主要内容：介绍造纸术的起源 - 字数要求：500字\n段落2 - 主要内容：蔡伦改进造纸术 - 字数要求：800字", Ok(vec![500, 800])),
            // 10. Chinese 第N段 with a range.
            ("第1段 - 要点：开篇 - 字数：300-500字\n第2段 - 要点：发展 - 字数：600字", Ok(vec![400, 600])),
            // 11. Chinese numbered list with full-width parentheses.
            ("1、引言（约400字）\n2、正文（800字）\n3、结语（300字）", Ok(vec![400, 800, 300])),
            // 12. Counts with thousands separators are clamped to 1000.
            ("Paragraph 1 - Main Point: Everything - Word Count: 1,500 words", Ok(vec![1000])),
            // 13. Tiny budgets are raised to 200.
            ("Paragraph 1 - Main Point: A - Word Count: 50 words\nParagraph 2 - Main Point: B - Word Count: 300 words", Ok(vec![200, 300])),
            // 14. "Word count" without a unit.
            ("Paragraph 1 - Main Point: A - Word Count: 350\nParagraph 2 - Main Point: B - Word Count: 450", Ok(vec![350, 450])),
            // 15. "approximately".
            ("Paragraph 1: The harbour at dawn, approximately 400 words\nParagraph 2: The market, approximately 500 words", Ok(vec![400, 500])),
            // 16. Code fence around the plan.
            ("```\nParagraph 1 - Main Point: A - Word Count: 300 words\n```", Ok(vec![300])),
            // 17. Junk lines between items are continuation text, not items.
            ("Paragraph 1 - Main Point: A - Word Count: 300 words\n(this one sets the tone)\nParagraph 2 - Main Point: B - Word Count: 400 words", Ok(vec![300, 400])),
            // 18. Sub-numbering under "Paragraph N" does not make items.
            ("Paragraph 1 - Word Count: 500 words\n1. point a\n2. point b\nParagraph 2 - Word Count: 600 words", Ok(vec![500, 600])),
            // 19. Missing count: an error naming the paragraph.
            ("Paragraph 1 - Main Point: A - Word Count: 300 words\nParagraph 2 - Main Point: B", Err(|e| matches!(e, PlanError::MissingWordCount { paragraph: 2, .. }))),
            // 20. No list at all.
            ("I'm sorry, I can't help with that.", Err(|e| matches!(e, PlanError::NoParagraphs))),
            // 21. Empty output.
            ("", Err(|e| matches!(e, PlanError::NoParagraphs))),
            // 22. Counts inside the sentence.
            ("Paragraph 1 - Main Point: A, around 350 words.\nParagraph 2 - Main Point: B, around 450 words.", Ok(vec![350, 450])),
            // 23. Step N form and "words" spelled singular.
            ("Step 1: set the scene (250 word)\nStep 2: the journey (750 words)", Ok(vec![250, 750])),
            // 24. Traditional Chinese 字數.
            ("段落1 - 主要內容：開場 - 字數：450字", Ok(vec![450])),
        ];
        for (i, (text, want)) in cases.into_iter().enumerate() {
            let got = parse_plan(text, None);
            match want {
                Ok(budgets) => {
                    let plan = got.unwrap_or_else(|e| panic!("case {}: {e}\n{text}", i + 1));
                    assert_eq!(words(&plan), budgets, "case {}:\n{text}", i + 1);
                    assert!(plan.paragraphs.iter().all(|p| !p.main_point.is_empty()));
                }
                Err(check) => {
                    let e = got
                        .err()
                        .unwrap_or_else(|| panic!("case {} should fail:\n{text}", i + 1));
                    assert!(check(&e), "case {}: {e:?}", i + 1);
                }
            }
        }
        let long: String = (1..=60)
            .map(|i| format!("Paragraph {i} - Main Point: x - Word Count: 300 words\n"))
            .collect();
        assert!(matches!(
            parse_plan(&long, None),
            Err(PlanError::TooManyParagraphs { count: 60 })
        ));
    }

    #[test]
    fn main_points_lose_their_labels_and_counts() {
        let p = parse_plan(
            "1. **Introduction** (400 words): what the essay covers",
            None,
        )
        .unwrap();
        assert_eq!(
            p.paragraphs[0].main_point,
            "Introduction: what the essay covers"
        );
        let p = parse_plan("段落1 - 主要内容：介绍造纸术的起源 - 字数要求：500字", None).unwrap();
        assert_eq!(p.paragraphs[0].main_point, "介绍造纸术的起源");
    }

    #[test]
    fn short_pieces_may_have_short_paragraphs() {
        let p = parse_plan(
            "Paragraph 1 - Main Point: A poem - Word Count: 120 words",
            Some(120),
        )
        .unwrap();
        assert_eq!(words(&p), [120]);
    }

    #[test]
    fn totals_are_checked_against_the_asked_length() {
        let plan = |n: u32| Plan {
            paragraphs: vec![Paragraph {
                main_point: "x".into(),
                words: n,
            }],
        };
        assert!(plan(800).check_length(Some(1000)).is_ok());
        assert!(plan(1300).check_length(Some(1000)).is_ok());
        assert!(matches!(
            plan(799).check_length(Some(1000)),
            Err(PlanError::TooShort {
                planned: 799,
                asked: 1000
            })
        ));
        assert!(matches!(
            plan(1301).check_length(Some(1000)),
            Err(PlanError::TooLong { .. })
        ));
        assert!(plan(5).check_length(None).is_ok());
        let msg = plan(500).check_length(Some(1000)).unwrap_err().to_string();
        assert!(msg.contains("500") && msg.contains("1000"), "{msg}");
    }

    #[test]
    fn canonical_text_parses_back_to_the_same_plan() {
        let p = parse_plan("1. Origins (400 words)\n2. 发展（600字）", None).unwrap();
        assert_eq!(parse_plan(&p.to_text(), None).unwrap(), p);
    }

    /// Feeds `text` byte by byte through `grammar` on a one-byte-per-token
    /// vocabulary; whether the grammar accepts it whole.
    pub(crate) fn accepts(grammar: &str, text: &str) -> bool {
        use lw_engine::TokenText;
        let mut tokens: Vec<TokenText> = (0..=255u8).map(|b| TokenText::Bytes(vec![b])).collect();
        tokens.push(TokenText::Special("<eos>".into()));
        let g = lw_engine::Grammars::new(tokens, 256).unwrap();
        let mut guide = g.guide(&lw_core::Constraint::Gbnf(grammar.into())).unwrap();
        let bytes = text.as_bytes();
        for (i, &b) in bytes.iter().enumerate() {
            let mut logits = vec![0.0f32; 257];
            guide.mask(&mut logits, &[256], false).unwrap();
            if logits[b as usize] == f32::NEG_INFINITY {
                return false;
            }
            let done = guide.take(b as u32).unwrap();
            if done {
                return i + 1 == bytes.len();
            }
        }
        let mut logits = vec![0.0f32; 257];
        guide.mask(&mut logits, &[256], false).unwrap();
        logits[256] == 0.0
    }

    #[test]
    fn the_plan_grammar_accepts_exactly_plans_of_the_asked_shape() {
        use crate::length::Language;
        assert_eq!(paragraph_count(Some(2000)), 5);
        assert_eq!(paragraph_count(Some(100)), 1);
        assert_eq!(paragraph_count(Some(100_000)), MAX_PARAGRAPHS);
        // Every plan's allowance fits an 8k context with its prompt.
        for asked in (100..=30_000).step_by(100) {
            assert!(plan_max_tokens(Some(asked)) <= 7000, "{asked}");
        }
        let g = plan_grammar(Some(800), Language::English);
        let plan = Plan {
            paragraphs: vec![
                Paragraph {
                    main_point: "The river at dawn, seen from the bridge.".into(),
                    words: 350,
                },
                Paragraph {
                    main_point: "What the flood took?".into(),
                    words: 450,
                },
            ],
        };
        assert!(accepts(&g, &plan.to_text()));
        // Parsed back whole.
        assert_eq!(parse_strict(&plan.to_text()).unwrap(), plan);
        // Wrong count, wrong numbering, a missing budget: refused.
        assert!(!accepts(
            &g,
            &plan
                .to_text()
                .lines()
                .next()
                .map(|l| format!("{l}\n"))
                .unwrap()
        ));
        assert!(!accepts(
            &g,
            &plan.to_text().replace("Paragraph 2", "Paragraph 3")
        ));
        assert!(!accepts(
            &g,
            &plan.to_text().replace("450 words", "many words")
        ));
        let zh = plan_grammar(Some(800), Language::Chinese);
        let text = "段落1 - 主要内容：清晨的河流。 - 字数要求：400字\n段落2 - 主要内容：洪水带走了什么？ - 字数要求：400字\n";
        assert!(accepts(&zh, text));
        assert_eq!(
            words(&parse_strict(text).unwrap()),
            words(&parse_plan(text, None).unwrap())
        );
        // Main points that look like structure are still main points.
        let tricky = "段落1 - 主要内容：第3段 4,660, 段落9。 - 字数要求：400字\n\
                      段落2 - 主要内容：Paragraph 2, Word Count: 5 words。 - 字数要求：300字\n";
        assert!(accepts(&zh, tricky));
        let p = parse_strict(tricky).unwrap();
        assert_eq!(words(&p), [400, 300]);
        assert_eq!(p.paragraphs[0].main_point, "第3段 4,660, 段落9。");
        // A point without its stop, or with the prompt's placeholder, is refused.
        assert!(!accepts(&zh, &tricky.replace("段落9。", "段落9")));
        assert!(!accepts(
            &g,
            &plan
                .to_text()
                .replace("What the flood took?", "[what this paragraph says].")
        ));
        // (A point may not hold " - " followed by other text: the lexer
        // takes " - " as the start of the budget's label; see gbnf.rs.)
        assert!(!accepts(
            &zh,
            &tricky.replace("Paragraph 2,", "Paragraph 2 -")
        ));
        assert!(parse_strict("Paragraph 2 - Main Point: x - Word Count: 5 words").is_none());
        let tight =
            parse_strict("Paragraph 1 - Main Point: The river's- Word Count: 2000 words").unwrap();
        assert_eq!(tight.paragraphs[0].main_point, "The river's");
        let parsed = parse_plan(text, Some(800)).unwrap();
        assert_eq!(words(&parsed), [400, 400]);
        assert_eq!(parsed.paragraphs[1].main_point, "洪水带走了什么？");
    }

    #[test]
    fn normalised_budgets_add_up_to_the_asked_length() {
        let mut p = Plan {
            paragraphs: vec![
                Paragraph {
                    main_point: "a".into(),
                    words: 10,
                },
                Paragraph {
                    main_point: "b".into(),
                    words: 30,
                },
                Paragraph {
                    main_point: "c".into(),
                    words: 20,
                },
            ],
        };
        p.normalise(1800);
        assert_eq!(words(&p), [450, 750, 600]);
        assert!(p.check_length(Some(1800)).is_ok());
        // Clamped to the per-paragraph range.
        let mut p = Plan {
            paragraphs: vec![
                Paragraph {
                    main_point: "a".into(),
                    words: 1,
                },
                Paragraph {
                    main_point: "b".into(),
                    words: 99,
                },
            ],
        };
        p.normalise(1000);
        assert_eq!(words(&p), [260, 750]);
        // What a bound cuts goes to the others.
        let mut p = Plan {
            paragraphs: vec![
                Paragraph {
                    main_point: "a".into(),
                    words: 9999,
                },
                Paragraph {
                    main_point: "b".into(),
                    words: 10,
                },
                Paragraph {
                    main_point: "c".into(),
                    words: 10,
                },
            ],
        };
        p.normalise(2400);
        assert_eq!(words(&p), [1000, 700, 700]);
    }
}
