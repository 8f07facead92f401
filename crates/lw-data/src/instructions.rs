//! Instruction files in: reading `{"prompt": …}` JSONL and selecting the
//! instructions that ask for long outputs.

use std::io::{BufRead, BufReader};
use std::path::Path;

use serde_json::{Map, Value};

use crate::DataError;

/// One instruction: its text and the line's other fields, kept as metadata.
#[derive(Debug, Clone, PartialEq)]
pub struct Instruction {
    pub prompt: String,
    pub meta: Map<String, Value>,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Non-empty lines of a JSONL file as (line number, JSON value).
pub(crate) fn jsonl(path: &Path) -> Result<Vec<(usize, Value)>, DataError> {
    let file = std::fs::File::open(path).map_err(io(path))?;
    let mut out = Vec::new();
    for (i, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| DataError::Input {
            path: path.to_path_buf(),
            line: i + 1,
            reason: format!("not JSON: {e}"),
        })?;
        out.push((i + 1, v));
    }
    Ok(out)
}

/// Reads instructions: one JSON object per line with a non-empty string
/// `prompt` (`instruction` is accepted too); other fields are metadata.
pub fn read_instructions(path: &Path) -> Result<Vec<Instruction>, DataError> {
    let bad = |line, reason: &str| DataError::Input {
        path: path.to_path_buf(),
        line,
        reason: reason.to_string(),
    };
    let mut out = Vec::new();
    for (line, v) in jsonl(path)? {
        let Value::Object(mut meta) = v else {
            return Err(bad(line, "expected a JSON object"));
        };
        let key = if meta.contains_key("prompt") {
            "prompt"
        } else {
            "instruction"
        };
        let prompt = match meta.remove(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => s,
            Some(Value::String(_)) => return Err(bad(line, "\"prompt\" is empty")),
            Some(_) => return Err(bad(line, "\"prompt\" is not a string")),
            None => return Err(bad(line, "no \"prompt\" field")),
        };
        out.push(Instruction { prompt, meta });
    }
    Ok(out)
}

/// Keeps the instructions that state a length of at least `min_words`
/// (words; characters for Chinese). Returns (kept, read).
pub fn select(input: &Path, output: &Path, min_words: u32) -> Result<(usize, usize), DataError> {
    let all = read_instructions(input)?;
    let mut text = String::new();
    let mut kept = 0;
    for ins in &all {
        if lw_write::requested_length(&ins.prompt).is_some_and(|n| n >= min_words) {
            let mut obj = ins.meta.clone();
            obj.insert("prompt".into(), Value::String(ins.prompt.clone()));
            text.push_str(&Value::Object(obj).to_string());
            text.push('\n');
            kept += 1;
        }
    }
    lw_core::write_atomic(output, text.as_bytes())?;
    Ok((kept, all.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("lw-data-ins-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn instructions_keep_their_metadata_and_bad_lines_are_named() {
        let d = scratch("read");
        let p = d.join("in.jsonl");
        std::fs::write(
            &p,
            "{\"prompt\": \"Write 3000 words.\", \"id\": 7}\n\n{\"instruction\": \"写一万字\"}\n",
        )
        .unwrap();
        let v = read_instructions(&p).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[0].meta["id"], 7);
        assert_eq!(v[1].prompt, "写一万字");
        std::fs::write(&p, "{\"prompt\": \"ok\"}\n{\"text\": 1}\n").unwrap();
        let e = read_instructions(&p).unwrap_err().to_string();
        assert!(
            e.contains("in.jsonl:2") && e.contains("no \"prompt\""),
            "{e}"
        );
        std::fs::write(&p, "{\"prompt\": \"ok\"}\nnot json\n").unwrap();
        assert!(read_instructions(&p)
            .unwrap_err()
            .to_string()
            .contains("in.jsonl:2: not JSON"));
    }

    #[test]
    fn select_keeps_instructions_that_ask_for_long_outputs() {
        let d = scratch("select");
        let (input, output) = (d.join("all.jsonl"), d.join("long.jsonl"));
        std::fs::write(
            &input,
            "{\"prompt\": \"Write a 10000-word novel.\", \"src\": \"a\"}\n\
             {\"prompt\": \"Write a haiku.\"}\n\
             {\"prompt\": \"Write 500 words on tea.\"}\n\
             {\"prompt\": \"写一篇5000字的小说\"}\n",
        )
        .unwrap();
        assert_eq!(select(&input, &output, 2000).unwrap(), (2, 4));
        let kept = read_instructions(&output).unwrap();
        assert_eq!(kept[0].prompt, "Write a 10000-word novel.");
        assert_eq!(kept[0].meta["src"], "a");
        assert_eq!(kept[1].prompt, "写一篇5000字的小说");
    }
}
