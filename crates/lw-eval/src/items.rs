//! Benchmark items and predictions, as JSON lines.
//!
//! An item is `{"prompt", "type", "length"}` (LongBench-Write and
//! LongWrite-Ruler's format); other fields are kept. A prediction adds the
//! response and its figures. The original benchmark's prediction files
//! (`length`, `response`, `response_length`) read as predictions too; their
//! `response_length` is ignored and the response recounted.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: {reason}", path.display())]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("{}: no items", path.display())]
    Empty { path: PathBuf },
}

/// One benchmark prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Item {
    /// A stable id: the file's `id` field, or the line number.
    pub id: String,
    pub prompt: String,
    /// The genre or task type (`type` in the file).
    pub kind: String,
    /// Required length in words (characters for Chinese).
    pub length: u64,
    /// Fields the file had beyond these.
    pub extra: Map<String, Value>,
}

/// One generated response with its figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub id: String,
    pub prompt: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// Required length.
    pub length: u64,
    pub response: String,
    /// Produced length, by the counter named in `counter`.
    #[serde(default)]
    pub response_length: u64,
    #[serde(default)]
    pub counter: String,
    #[serde(default)]
    pub mode: String,
    #[serde(default)]
    pub prompt_tokens: u64,
    #[serde(default)]
    pub completion_tokens: u64,
    #[serde(default)]
    pub seconds: f64,
    /// Set when generation failed: the response is empty and the reason is here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub extra: Map<String, Value>,
}

/// A JSON object and the line it came from (from 1).
pub type NumberedObject = (usize, Map<String, Value>);

/// Each non-blank line of a JSONL file as a JSON object. With
/// `torn_tail`, a last line without its newline that does not parse (the
/// writer died mid-line) is skipped instead of refused.
pub fn objects(path: &Path, torn_tail: bool) -> Result<Vec<NumberedObject>, EvalError> {
    let text = std::fs::read_to_string(path).map_err(|source| EvalError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line: i + 1,
            reason,
        };
        match serde_json::from_str::<Value>(line) {
            Ok(Value::Object(m)) => out.push((i + 1, m)),
            Ok(_) => return Err(bad("not a JSON object".into())),
            Err(_) if torn_tail && i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => return Err(bad(format!("invalid JSON: {e}"))),
        }
    }
    Ok(out)
}

pub(crate) fn take_string(m: &mut Map<String, Value>, key: &str) -> Option<String> {
    match m.remove(key) {
        Some(Value::String(s)) => Some(s),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            m.insert(key.to_string(), other);
            None
        }
        None => None,
    }
}

/// A length given as a number or a numeric string.
fn take_length(m: &mut Map<String, Value>, key: &str) -> Result<u64, String> {
    match m.remove(key) {
        Some(Value::Number(n)) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64))
            .ok_or_else(|| format!("`{key}` must be a non-negative number, not {n}")),
        Some(Value::String(s)) => s
            .trim()
            .parse()
            .map_err(|_| format!("`{key}` must be a number, not \"{s}\"")),
        Some(other) => Err(format!("`{key}` must be a number, not {other}")),
        None => Err(format!("missing `{key}`")),
    }
}

/// Reads benchmark items (`prompt`, `type`, `length`; others kept).
pub fn read_items(path: &Path) -> Result<Vec<Item>, EvalError> {
    let mut items = Vec::new();
    for (line, mut m) in objects(path, false)? {
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let prompt = take_string(&mut m, "prompt").ok_or_else(|| bad("missing `prompt`".into()))?;
        if prompt.trim().is_empty() {
            return Err(bad("`prompt` is empty".into()));
        }
        let length = take_length(&mut m, "length").map_err(bad)?;
        if length == 0 {
            return Err(bad("`length` must be at least 1".into()));
        }
        let kind = take_string(&mut m, "type").unwrap_or_else(|| "unknown".into());
        let id = take_string(&mut m, "id").unwrap_or_else(|| line.to_string());
        items.push(Item {
            id,
            prompt,
            kind,
            length,
            extra: m,
        });
    }
    if items.is_empty() {
        return Err(EvalError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut seen = std::collections::HashSet::new();
    for it in &items {
        if !seen.insert(it.id.as_str()) {
            return Err(EvalError::Line {
                path: path.to_path_buf(),
                line: 0,
                reason: format!("the id \"{}\" appears twice", it.id),
            });
        }
    }
    Ok(items)
}

/// Reads predictions: ours, or the original benchmark's files. A last line
/// cut short (a crash mid-write) is skipped, not an error.
pub fn read_predictions(path: &Path) -> Result<Vec<Prediction>, EvalError> {
    let mut out = Vec::new();
    for (line, mut m) in objects(path, true)? {
        let bad = |reason: String| EvalError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        };
        let response =
            take_string(&mut m, "response").ok_or_else(|| bad("missing `response`".into()))?;
        let length = take_length(&mut m, "length").map_err(bad)?;
        let prompt = take_string(&mut m, "prompt").unwrap_or_default();
        let kind = take_string(&mut m, "type").unwrap_or_else(|| "unknown".into());
        let id = take_string(&mut m, "id").unwrap_or_else(|| line.to_string());
        let num = |m: &mut Map<String, Value>, k: &str| {
            m.remove(k).and_then(|v| v.as_f64()).unwrap_or(0.0)
        };
        // Recounted by whoever scores; the stored figure is informational.
        let response_length = num(&mut m, "response_length") as u64;
        let counter = take_string(&mut m, "counter").unwrap_or_default();
        let mode = take_string(&mut m, "mode").unwrap_or_default();
        let prompt_tokens = num(&mut m, "prompt_tokens") as u64;
        let completion_tokens = num(&mut m, "completion_tokens") as u64;
        let seconds = num(&mut m, "seconds");
        let error = take_string(&mut m, "error");
        let extra = match m.remove("extra") {
            Some(Value::Object(e)) => e,
            _ => m,
        };
        out.push(Prediction {
            id,
            prompt,
            kind,
            length,
            response,
            response_length,
            counter,
            mode,
            prompt_tokens,
            completion_tokens,
            seconds,
            error,
            extra,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str, text: &str) -> PathBuf {
        let p = std::env::temp_dir().join(format!("lw-eval-{}-{name}", std::process::id()));
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn items_keep_extra_fields_and_bad_lines_are_named() {
        let p = tmp("items.jsonl", "{\"prompt\": \"Write.\", \"type\": \"story\", \"length\": 500, \"lang\": \"en\"}\n\n{\"prompt\": \"写。\", \"length\": \"800\"}\n");
        let items = read_items(&p).unwrap();
        assert_eq!(items.len(), 2);
        assert_eq!(items[0].id, "1");
        assert_eq!(items[0].extra["lang"], "en");
        assert_eq!(items[1].length, 800);
        assert_eq!(items[1].kind, "unknown");
        for (bad, needle) in [
            ("{\"prompt\": \"x\"}\n", ":1: missing `length`"),
            ("{\"length\": 3}\n", ":1: missing `prompt`"),
            ("{\"prompt\": \"x\", \"length\": -3}\n", "non-negative"),
            (
                "{\"prompt\": \"x\", \"length\": 10}\n[1]\n",
                ":2: not a JSON object",
            ),
            ("{\"prompt\": \"x\", \"length\": 10\n", ":1: invalid JSON"),
            ("\n", "no items"),
        ] {
            let p = tmp("bad.jsonl", bad);
            let e = read_items(&p).unwrap_err().to_string();
            assert!(
                e.contains(needle) && e.contains("bad.jsonl"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn original_prediction_files_read_and_a_torn_last_line_is_skipped() {
        let p = tmp(
            "pred.jsonl",
            "{\"prompt\": \"p\", \"type\": \"t\", \"length\": 100, \"response\": \"word word\", \"response_length\": 999}\n{\"prompt\": \"q\", \"length\": 5, \"respon",
        );
        let preds = read_predictions(&p).unwrap();
        assert_eq!(preds.len(), 1);
        assert_eq!(preds[0].response, "word word");
        assert_eq!(preds[0].length, 100);
        // A broken line in the middle is an error.
        let p = tmp(
            "pred2.jsonl",
            "{\"broken\n{\"length\": 1, \"response\": \"\"}\n",
        );
        assert!(read_predictions(&p)
            .unwrap_err()
            .to_string()
            .contains(":1:"));
    }
}
