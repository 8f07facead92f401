//! A study's `results.jsonl`: one JSON object per finished piece of work,
//! read back on a rerun (what is in it is not done again) and rewritten
//! atomically after each piece.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde_json::Value;

/// Creates `dir` and reads `dir/results.jsonl` (nothing where it does not
/// exist; a torn last line is dropped): its path and rows.
pub fn open(dir: &Path) -> anyhow::Result<(PathBuf, Vec<Value>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join("results.jsonl");
    let rows = std::fs::read_to_string(&path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    Ok((path, rows))
}

/// Writes `rows` to `path` as JSON lines, atomically.
pub fn save(path: &Path, rows: &[Value]) -> anyhow::Result<()> {
    let mut text = String::new();
    for r in rows {
        text.push_str(&r.to_string());
        text.push('\n');
    }
    lw_core::fs::write_atomic(path, text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
