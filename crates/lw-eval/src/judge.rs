//! The quality judge: its instructions, and a forgiving parser for what
//! judges actually answer (fenced JSON, commentary around it, scores as
//! strings or "4/5", nested `{"score": 4}` objects, keys spelled a little
//! differently). An answer that misses a dimension or gives a score outside
//! 1–5 is an error, so the caller asks again, and reports the item if it
//! never parses.

use serde::Serialize;
use serde_json::{Map, Value};

/// The six dimensions, in report order.
pub const DIMENSIONS: [&str; 6] = [
    "Relevance",
    "Accuracy",
    "Coherence",
    "Clarity",
    "Breadth and Depth",
    "Reading Experience",
];

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JudgeParseError {
    #[error("no JSON object in the answer")]
    NoJson,
    #[error("the answer has no score for \"{0}\"")]
    Missing(&'static str),
    #[error("the score for \"{dimension}\" is {value}, outside 1–5")]
    OutOfRange { dimension: &'static str, value: f64 },
    #[error("the score for \"{dimension}\" is not a number: {value}")]
    NotANumber {
        dimension: &'static str,
        value: String,
    },
}

/// Scores 1–5 in the order of [`DIMENSIONS`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Judgement {
    pub scores: [f64; 6],
}

/// The judge's instructions for one response.
pub fn judge_prompt(instruction: &str, response: &str) -> String {
    let keys = DIMENSIONS
        .iter()
        .map(|d| format!("\"{d}\": <1-5>"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "You are grading a piece of writing produced for the instruction below. \
         Be strict and do not reward length: judge only how well it is written and \
         how well it serves the instruction. Give each of six dimensions a whole \
         score from 1 (very poor) to 5 (excellent):\n\
         - Relevance: does it do what the instruction asks?\n\
         - Accuracy: are its facts and reasoning correct?\n\
         - Coherence: does it hold together from start to end?\n\
         - Clarity: is each part easy to follow?\n\
         - Breadth and Depth: does it cover the subject fully and with insight?\n\
         - Reading Experience: is it engaging and pleasant to read?\n\n\
         [Instruction]\n{instruction}\n\n[Response]\n{response}\n\n\
         Answer with one JSON object and nothing else: {{{keys}}}"
    )
}

/// Lower-case letters only, without "and": "Breadth & Depth" and
/// "breadth_and_depth" both become "breadthdepth".
fn norm(key: &str) -> String {
    let letters: String = key
        .chars()
        .filter(|c| c.is_alphanumeric() || c.is_whitespace() || *c == '_')
        .collect::<String>()
        .to_lowercase()
        .replace('_', " ");
    letters
        .split_whitespace()
        .filter(|w| *w != "and")
        .collect::<String>()
}

/// Every balanced `{…}` span of `text` (strings respected), outermost first.
fn json_candidates(text: &str) -> Vec<&str> {
    let b = text.as_bytes();
    let mut out = Vec::new();
    for (start, &c) in b.iter().enumerate() {
        if c != b'{' {
            continue;
        }
        let (mut depth, mut in_str, mut esc) = (0i32, false, false);
        for (i, &d) in b.iter().enumerate().skip(start) {
            if in_str {
                match (esc, d) {
                    (true, _) => esc = false,
                    (false, b'\\') => esc = true,
                    (false, b'"') => in_str = false,
                    _ => {}
                }
                continue;
            }
            match d {
                b'"' => in_str = true,
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        out.push(&text[start..=i]);
                        break;
                    }
                }
                _ => {}
            }
        }
    }
    out
}

/// The score in a value: 4, 4.5, "4", "4/5", "Score: 4", {"score": 4}.
fn score_of(v: &Value) -> Option<Result<f64, String>> {
    match v {
        Value::Number(n) => n.as_f64().map(Ok),
        Value::String(s) => {
            let t = s.trim();
            let first: String = t
                .trim_start_matches(|c: char| !c.is_ascii_digit())
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            Some(first.parse::<f64>().map_err(|_| s.clone()))
        }
        Value::Object(m) => m
            .iter()
            .find(|(k, _)| matches!(norm(k).as_str(), "score" | "rating" | "value"))
            .and_then(|(_, v)| score_of(v)),
        other => Some(Err(other.to_string())),
    }
}

/// Finds the dimension scores in one object (or one nested level down).
fn from_object(m: &Map<String, Value>) -> Option<Result<Judgement, JudgeParseError>> {
    let find = |m: &Map<String, Value>, dim: &str| -> Option<Value> {
        let want = norm(dim);
        m.iter()
            .find(|(k, _)| norm(k) == want)
            .map(|(_, v)| v.clone())
    };
    let hits = |m: &Map<String, Value>| DIMENSIONS.iter().filter(|d| find(m, d).is_some()).count();
    let m = if hits(m) > 0 {
        m
    } else {
        m.values()
            .filter_map(Value::as_object)
            .find(|inner| hits(inner) > 0)?
    };
    let mut scores = [0f64; 6];
    for (i, dim) in DIMENSIONS.iter().enumerate() {
        let Some(v) = find(m, dim) else {
            return Some(Err(JudgeParseError::Missing(dim)));
        };
        match score_of(&v) {
            None => return Some(Err(JudgeParseError::Missing(dim))),
            Some(Err(value)) => {
                return Some(Err(JudgeParseError::NotANumber {
                    dimension: dim,
                    value,
                }))
            }
            Some(Ok(x)) if !(1.0..=5.0).contains(&x) => {
                return Some(Err(JudgeParseError::OutOfRange {
                    dimension: dim,
                    value: x,
                }))
            }
            Some(Ok(x)) => scores[i] = x,
        }
    }
    Some(Ok(Judgement { scores }))
}

/// Parses a judge's answer.
pub fn parse_judgement(answer: &str) -> Result<Judgement, JudgeParseError> {
    let mut first_err = None;
    for cand in json_candidates(answer) {
        let Ok(Value::Object(m)) = serde_json::from_str::<Value>(cand) else {
            continue;
        };
        match from_object(&m) {
            Some(Ok(j)) => return Ok(j),
            Some(Err(e)) => {
                first_err.get_or_insert(e);
            }
            None => {}
        }
    }
    Err(first_err.unwrap_or(JudgeParseError::NoJson))
}

/// S_q per dimension ((mean − 1) × 25) and overall (their mean) over the
/// judged items.
pub fn quality_scores(judged: &[Judgement]) -> Option<([f64; 6], f64)> {
    if judged.is_empty() {
        return None;
    }
    let mut dims = [0f64; 6];
    for j in judged {
        for (d, s) in dims.iter_mut().zip(j.scores) {
            *d += s;
        }
    }
    for d in &mut dims {
        *d = (*d / judged.len() as f64 - 1.0) * 25.0;
    }
    let overall = dims.iter().sum::<f64>() / 6.0;
    Some((dims, overall))
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLEAN: &str = r#"{"Relevance": 4, "Accuracy": 3, "Coherence": 5, "Clarity": 4, "Breadth and Depth": 2, "Reading Experience": 3}"#;
    const WANT: [f64; 6] = [4.0, 3.0, 5.0, 4.0, 2.0, 3.0];

    #[test]
    fn a_table_of_judge_answers() {
        let ok = |s: &str| parse_judgement(s).map(|j| j.scores);
        type Case = (&'static str, String, Result<[f64; 6], JudgeParseError>);
        let cases: Vec<Case> = vec![
            ("clean JSON", CLEAN.into(), Ok(WANT)),
            ("fenced", format!("```json\n{CLEAN}\n```"), Ok(WANT)),
            (
                "commentary around",
                format!("Here is my evaluation:\n{CLEAN}\nOverall a decent piece."),
                Ok(WANT),
            ),
            (
                "scores as strings",
                CLEAN.replace(": 4", ": \"4\"").replace(": 3", ": \"3\""),
                Ok(WANT),
            ),
            ("x/5 strings", CLEAN.replace(": 4,", ": \"4/5\","), Ok(WANT)),
            (
                "snake_case keys",
                CLEAN
                    .replace("Breadth and Depth", "breadth_and_depth")
                    .replace("Reading Experience", "reading_experience"),
                Ok(WANT),
            ),
            (
                "ampersand key",
                CLEAN.replace("Breadth and Depth", "Breadth & Depth"),
                Ok(WANT),
            ),
            (
                "nested object",
                format!("{{\"scores\": {CLEAN}, \"comment\": \"fine\"}}"),
                Ok(WANT),
            ),
            (
                "score objects",
                CLEAN.replace(
                    ": 5,",
                    ": {\"score\": 5, \"reason\": \"tight {structure}\"},",
                ),
                Ok(WANT),
            ),
            (
                "half points",
                CLEAN.replace(": 2,", ": 2.5,"),
                Ok([4.0, 3.0, 5.0, 4.0, 2.5, 3.0]),
            ),
            (
                "missing a key",
                CLEAN.replace(", \"Clarity\": 4", ""),
                Err(JudgeParseError::Missing("Clarity")),
            ),
            (
                "out of range high",
                CLEAN.replace(": 5,", ": 7,"),
                Err(JudgeParseError::OutOfRange {
                    dimension: "Coherence",
                    value: 7.0,
                }),
            ),
            (
                "out of range zero",
                CLEAN.replace(": 2,", ": 0,"),
                Err(JudgeParseError::OutOfRange {
                    dimension: "Breadth and Depth",
                    value: 0.0,
                }),
            ),
            (
                "ten-point scale",
                CLEAN.replace(": 4,", ": 8,"),
                Err(JudgeParseError::OutOfRange {
                    dimension: "Relevance",
                    value: 8.0,
                }),
            ),
            (
                "word score",
                CLEAN.replace(": 3}", ": \"good\"}"),
                Err(JudgeParseError::NotANumber {
                    dimension: "Reading Experience",
                    value: "good".into(),
                }),
            ),
            (
                "garbage",
                "I cannot evaluate this.".into(),
                Err(JudgeParseError::NoJson),
            ),
            (
                "broken JSON",
                CLEAN[..40].into(),
                Err(JudgeParseError::NoJson),
            ),
            ("empty", String::new(), Err(JudgeParseError::NoJson)),
            (
                "unrelated JSON then the scores",
                format!("{{\"note\": 1}} then {CLEAN}"),
                Ok(WANT),
            ),
            (
                "braces inside strings",
                CLEAN.replace(
                    "{\"Relevance\"",
                    "{\"comment\": \"uses } and { oddly\", \"Relevance\"",
                ),
                Ok(WANT),
            ),
        ];
        assert!(cases.len() >= 15);
        for (what, answer, want) in cases {
            assert_eq!(ok(&answer), want, "{what}: {answer}");
        }
    }

    #[test]
    fn quality_is_the_rescaled_mean() {
        let a = Judgement { scores: [5.0; 6] };
        let b = Judgement {
            scores: [1.0, 2.0, 3.0, 4.0, 5.0, 3.0],
        };
        let (dims, overall) = quality_scores(&[a, b]).unwrap();
        assert_eq!(dims[0], 50.0);
        assert_eq!(dims[4], 100.0);
        assert!((overall - dims.iter().sum::<f64>() / 6.0).abs() < 1e-12);
        assert!(quality_scores(&[]).is_none());
        let p = judge_prompt("Write.", "Text.");
        assert!(DIMENSIONS.iter().all(|d| p.contains(d)));
    }
}
