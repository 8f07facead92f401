//! The length an instruction asks for ("10000-word", "5,000 words",
//! "一万字", "3000字", "10k words", "3000-5000 words") and its language.

use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};

/// The language prompts are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    English,
    Chinese,
}

impl Language {
    /// `en` or `zh`.
    pub fn code(self) -> &'static str {
        match self {
            Language::English => "en",
            Language::Chinese => "zh",
        }
    }

    /// Chinese when a fifth or more of the letters are CJK ideographs.
    pub fn detect(text: &str) -> Language {
        let (mut cjk, mut letters) = (0usize, 0usize);
        for c in text.chars().filter(|c| c.is_alphabetic()) {
            letters += 1;
            if ('\u{4E00}'..='\u{9FFF}').contains(&c) {
                cjk += 1;
            }
        }
        if letters > 0 && cjk * 5 >= letters {
            Language::Chinese
        } else {
            Language::English
        }
    }
}

impl std::str::FromStr for Language {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "en" | "english" => Ok(Language::English),
            "zh" | "chinese" => Ok(Language::Chinese),
            other => Err(format!("unknown language \"{other}\" (use en or zh)")),
        }
    }
}

fn arabic_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(
            r"(?i)(\d[\d,]*(?:\.\d+)?)\s*([k万千])?(?:\s*(?:-|–|—|~|～|to|至|到)\s*(\d[\d,]*(?:\.\d+)?)\s*([k万千])?)?\s*[-‐]?\s*(?:words?\b|字|词|個字|个字)",
        )
        .expect("valid regex")
    })
}

fn chinese_pattern() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    RE.get_or_init(|| {
        Regex::new(r"([零一二两三四五六七八九十百千万]+)\s*(?:个)?字").expect("valid regex")
    })
}

fn number(digits: &str, scale: Option<&str>) -> Option<f64> {
    let v: f64 = digits.replace(',', "").parse().ok()?;
    let m = match scale.map(|s| s.to_lowercase()) {
        Some(s) if s == "k" || s == "千" => 1000.0,
        Some(s) if s == "万" => 10000.0,
        _ => 1.0,
    };
    Some(v * m)
}

/// Parses Chinese numerals such as 一万, 两千五百, 三千, 十二.
pub fn chinese_number(s: &str) -> Option<u32> {
    let digit = |c: char| {
        "零一二三四五六七八九"
            .find(c)
            .map(|i| (i / 3) as u32)
            .or(if c == '两' { Some(2) } else { None })
    };
    let (mut total, mut section, mut current) = (0u32, 0u32, 0u32);
    let mut any = false;
    for c in s.chars() {
        if let Some(d) = digit(c) {
            current = d;
            any = true;
            continue;
        }
        let unit = match c {
            '十' => 10,
            '百' => 100,
            '千' => 1000,
            '万' => 10000,
            _ => return None,
        };
        any = true;
        if unit == 10000 {
            total += (section + current.max(if section == 0 { 1 } else { 0 })) * 10000;
            section = 0;
        } else {
            section += current.max(1) * unit;
        }
        current = 0;
    }
    any.then_some(total + section + current)
}

/// The length in words (characters for Chinese) an instruction asks for, if
/// it states one. A range gives its midpoint.
pub fn requested_length(instruction: &str) -> Option<u32> {
    if let Some(c) = arabic_pattern().captures(instruction) {
        let low = number(&c[1], c.get(2).map(|m| m.as_str()))?;
        let high = match c.get(3) {
            Some(h) => number(h.as_str(), c.get(4).or(c.get(2)).map(|m| m.as_str()))?,
            None => low,
        };
        let v = ((low + high) / 2.0).round();
        if v >= 1.0 {
            return Some(v as u32);
        }
    }
    let c = chinese_pattern().captures(instruction)?;
    chinese_number(&c[1]).filter(|&n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_stated_in_instructions() {
        for (text, want) in [
            (
                "Write a 10000-word guide to the printing press.",
                Some(10000),
            ),
            ("Write about rivers in 5,000 words.", Some(5000)),
            ("An essay of about 10k words on tea.", Some(10000)),
            ("Write 3000-5000 words on glaciers.", Some(4000)),
            ("请写一篇一万字的文章，介绍造纸术。", Some(10000)),
            ("写一篇3000字的散文", Some(3000)),
            ("写一篇1.5万字的小说", Some(15000)),
            ("写一篇两千五百字的报告", Some(2500)),
            ("写一篇2万字的综述", Some(20000)),
            ("写一篇五千字左右的游记", Some(5000)),
            ("Write a story set in 2024.", None),
            ("Write a long story.", None),
            ("a 300 word poem", Some(300)),
        ] {
            assert_eq!(requested_length(text), want, "{text:?}");
        }
    }

    #[test]
    fn chinese_numerals() {
        for (s, n) in [
            ("一万", 10000),
            ("两千", 2000),
            ("三千五百", 3500),
            ("十二", 12),
            ("一万五千", 15000),
            ("十万", 100000),
        ] {
            assert_eq!(chinese_number(s), Some(n), "{s}");
        }
    }

    #[test]
    fn language_follows_the_instruction() {
        assert_eq!(
            Language::detect("请写一篇关于 AI 的文章"),
            Language::Chinese
        );
        assert_eq!(
            Language::detect("Write about 中国 history"),
            Language::English
        );
    }
}
