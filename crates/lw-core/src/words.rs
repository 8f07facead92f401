//! Word counting: the one place lengths are measured.
//!
//! - [`Counter::LongBench`] is LongBench-Write's definition, reproduced
//!   exactly for comparable scores: CJK ideographs (U+4E00–U+9FFF) plus runs
//!   of ASCII letters that stand between word boundaries (a word character is
//!   alphanumeric or `_`). So "don't" counts 2, "GPT4" 0, "café" 0.
//! - [`Counter::Unicode`] is what a reader would call words: runs of letters
//!   and digits (with inner apostrophes and hyphens) in space-separated
//!   scripts, and one per character in Chinese and Japanese. It is the
//!   default for word budgets.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Counter {
    LongBench,
    #[default]
    Unicode,
}

impl Counter {
    pub fn count(self, text: &str) -> usize {
        match self {
            Counter::LongBench => count_longbench(text),
            Counter::Unicode => count_unicode(text),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Counter::LongBench => "longbench",
            Counter::Unicode => "unicode",
        }
    }
}

impl std::str::FromStr for Counter {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "longbench" => Ok(Counter::LongBench),
            "unicode" => Ok(Counter::Unicode),
            other => Err(format!(
                "unknown counter \"{other}\" (use longbench or unicode)"
            )),
        }
    }
}

/// A word character in Python's `re` sense (`\w` on str).
fn is_word_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// The ideographs LongBench-Write counts.
fn is_longbench_cjk(c: char) -> bool {
    ('\u{4E00}'..='\u{9FFF}').contains(&c)
}

/// LongBench-Write's count: ideographs plus bounded runs of ASCII letters.
pub fn count_longbench(text: &str) -> usize {
    let chars: Vec<char> = text.chars().collect();
    let mut count = chars.iter().filter(|&&c| is_longbench_cjk(c)).count();
    let mut i = 0;
    while i < chars.len() {
        if !chars[i].is_ascii_alphabetic() {
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && chars[i].is_ascii_alphabetic() {
            i += 1;
        }
        // A match of \b[a-zA-Z]+\b must span a whole run of ASCII letters,
        // with no word character on either side.
        let open = start == 0 || !is_word_char(chars[start - 1]);
        let close = i == chars.len() || !is_word_char(chars[i]);
        if open && close {
            count += 1;
        }
    }
    count
}

/// Scripts written without spaces: every character is a word.
/// Chinese and Japanese characters: written without spaces, one word each.
pub fn is_unspaced_script(c: char) -> bool {
    matches!(c as u32,
        0x3040..=0x30FF      // Hiragana, Katakana
        | 0x3400..=0x4DBF    // CJK Extension A
        | 0x4E00..=0x9FFF    // CJK Unified Ideographs
        | 0xF900..=0xFAFF    // CJK Compatibility Ideographs
        | 0x20000..=0x3FFFF  // CJK Extensions B and later
    )
}

/// Words as a reader counts them (see the module comment).
pub fn count_unicode(text: &str) -> usize {
    let mut count = 0;
    let mut in_word = false;
    let mut prev_joiner = false;
    for c in text.chars() {
        if is_unspaced_script(c) {
            count += 1;
            in_word = false;
        } else if c.is_alphanumeric() || c == '_' {
            if !in_word {
                count += 1;
                in_word = true;
            }
            prev_joiner = false;
            continue;
        } else if in_word && matches!(c, '\'' | '’' | '-') && !prev_joiner {
            // An apostrophe or hyphen inside a word keeps it one word.
            prev_joiner = true;
            continue;
        } else {
            in_word = false;
        }
        prev_joiner = false;
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longbench_edge_cases_from_the_benchmark_definition() {
        for (text, n) in [
            ("don't", 2),
            ("e.g.", 2),
            ("GPT4", 0),
            ("3D", 0),
            ("café", 0),
            ("中文English中文", 4),
            ("", 0),
            ("Hello, world!", 2),
            ("snake_case words", 1),
            ("一万字的文章", 6),
            ("The 中文 text", 4),
            ("x2 y", 1),
            ("naïve approach", 1),
        ] {
            assert_eq!(count_longbench(text), n, "{text:?}");
        }
    }

    #[test]
    fn longbench_mixed_paragraph() {
        let p = "长文本生成（long-form generation）是一个难题。We plan first, then write: 100 words each.";
        // 10 ideographs; long, form, generation, We, plan, first, then, write, words, each.
        assert_eq!(count_longbench(p), 10 + 10);
    }

    /// A second formulation of the definition: per maximal run of word
    /// characters, its ideographs, plus one if the run is ASCII letters only.
    fn longbench_by_runs(text: &str) -> usize {
        text.split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|run| !run.is_empty())
            .map(|run| {
                let ideographs = run.chars().filter(|&c| is_longbench_cjk(c)).count();
                ideographs + usize::from(run.chars().all(|c| c.is_ascii_alphabetic()))
            })
            .sum()
    }

    #[test]
    fn longbench_on_long_mixed_texts_agrees_with_a_second_formulation() {
        let pieces = [
            "river",
            "河流",
            "don't",
            "GPT4",
            "café",
            "e.g.",
            "3D",
            "中文English中文",
            "naïve",
            "snake_case",
            "—",
            "，",
            "。",
            "(note)",
            "x2",
            "Ünïcode",
            "全角ＡＢＣ",
            "tab\tsep",
            "\n\n",
            "1990s",
            "U.S.A.",
            "emoji🙂word",
            "日本語かな",
            "ok",
        ];
        let mut x = 0x2545f4914f6cdd1du64;
        let mut text = String::new();
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            text.push_str(pieces[(x % pieces.len() as u64) as usize]);
            if x & 0x30 != 0 {
                text.push(' ');
            }
        }
        assert!(text.chars().count() > 80_000);
        assert_eq!(count_longbench(&text), longbench_by_runs(&text));
        // Counting is additive over paragraphs.
        let para = "长文本生成（long-form generation）是一个难题。We plan first, then write.";
        let doc = vec![para; 500].join("\n\n");
        assert_eq!(count_longbench(&doc), 500 * count_longbench(para));
    }

    #[test]
    fn unicode_counter_counts_what_readers_count() {
        for (text, n) in [
            ("don't", 1),
            ("e.g.", 2),
            ("GPT4", 1),
            ("3D", 1),
            ("café", 1),
            ("中文English中文", 5),
            ("well-known state-of-the-art", 2),
            ("  spaced   out\n\nlines ", 3),
            ("Привет, мир", 2),
            ("こんにちは", 5),
            ("-- dash --", 1),
            ("", 0),
        ] {
            assert_eq!(count_unicode(text), n, "{text:?}");
        }
    }

    #[test]
    fn counters_parse_from_their_names() {
        assert_eq!("longbench".parse::<Counter>().unwrap(), Counter::LongBench);
        assert!("words".parse::<Counter>().is_err());
    }
}

/// LongBench-Write's length score of one item: 100 when the produced length
/// `y` equals the required `x`, falling linearly to 0 at 4·x above and x/3
/// below (0 for an empty output).
pub fn length_score(required: f64, produced: f64) -> f64 {
    if required <= 0.0 {
        return 0.0;
    }
    if produced > required {
        100.0 * (1.0 - (produced / required - 1.0) / 3.0).max(0.0)
    } else if produced <= 0.0 {
        0.0
    } else {
        100.0 * (1.0 - (required / produced - 1.0) / 2.0).max(0.0)
    }
}

#[cfg(test)]
mod score_tests {
    use super::length_score;

    #[test]
    fn the_benchmark_checks() {
        let close = |a: f64, b: f64| (a - b).abs() < 0.01;
        assert!(close(length_score(1000.0, 2000.0), 66.67));
        assert!(close(length_score(1000.0, 4000.0), 0.0));
        assert!(close(length_score(1000.0, 500.0), 50.0));
        assert!(close(length_score(1000.0, 333.0), 0.0));
        assert!(close(length_score(1000.0, 1000.0), 100.0));
        assert_eq!(length_score(1000.0, 0.0), 0.0);
    }
}
