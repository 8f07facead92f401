//! `data synth`: AgentWrite training conversations (plan, then one turn
//! per paragraph) cut from existing long documents, no model needed.

use std::path::{Path, PathBuf};

use anyhow::Context;

fn range_arg(s: &str, flag: &str) -> anyhow::Result<(usize, usize)> {
    let parse = |x: &str| x.trim().parse::<usize>().ok();
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (parse(a), parse(b)),
        None => (parse(s), parse(s)),
    };
    match (lo, hi) {
        (Some(lo), Some(hi)) if lo >= 1 && lo <= hi => Ok((lo, hi)),
        _ => anyhow::bail!("{flag} must be MIN-MAX with 1 <= MIN <= MAX, not \"{s}\""),
    }
}

/// The texts of a corpus file: a .jsonl file's "text" fields joined by blank
/// lines, any other file whole.
fn corpus_text(path: &Path) -> anyhow::Result<String> {
    let raw =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    if path.extension().is_some_and(|e| e == "jsonl") {
        let mut parts = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line)
                .with_context(|| format!("{}, line {}: not JSON", path.display(), i + 1))?;
            if let Some(t) = v.get("text").and_then(|t| t.as_str()) {
                parts.push(t.to_string());
            }
        }
        Ok(parts.join("\n\n"))
    } else {
        Ok(raw)
    }
}

pub fn data_synth(
    files: &[PathBuf],
    out: &Path,
    max_documents: Option<usize>,
    paragraphs: &str,
    words: &str,
    seed: u64,
) -> anyhow::Result<()> {
    let (min_paragraphs, max_paragraphs) = range_arg(paragraphs, "--paragraphs")?;
    let (min_words, max_words) = range_arg(words, "--words")?;
    let opts = lw_write::synth::SynthOptions {
        min_paragraphs,
        max_paragraphs,
        min_words,
        max_words,
    };
    let mut docs = Vec::new();
    for f in files {
        let text = corpus_text(f)?;
        let found = lw_write::synth::documents(&text, &opts, seed as usize);
        eprintln!("{}: {} documents", f.display(), found.len());
        docs.extend(found);
    }
    lw_train::Rng::derive(seed, 7, 0).shuffle(&mut docs);
    if let Some(n) = max_documents {
        docs.truncate(n);
    }
    if docs.is_empty() {
        anyhow::bail!(
            "no documents: no run of {min_paragraphs}+ paragraphs of {min_words}-{max_words} words"
        );
    }
    let mut text = String::new();
    let mut conversations = 0;
    for d in &docs {
        for (i, (user, assistant)) in d.turns().into_iter().enumerate() {
            let line = serde_json::json!({
                "messages": [
                    {"role": "user", "content": user},
                    {"role": "assistant", "content": assistant},
                ],
                "kind": if i == 0 { "plan" } else { "write" },
                "language": d.language.code(),
            });
            text.push_str(&line.to_string());
            text.push('\n');
            conversations += 1;
        }
    }
    lw_core::write_atomic(out, text.as_bytes())?;
    eprintln!(
        "{} documents, {conversations} conversations: {}",
        docs.len(),
        out.display()
    );
    Ok(())
}
