//! Tokenizers shipped as a tiktoken rank file (`tokenizer.model`: one line
//! per token, its bytes in base64 and its rank), as the original GLM-4
//! checkpoints (LongWriter-glm4-9b among them) ship theirs.
//!
//! tiktoken's BPE repeatedly merges the adjacent pair whose concatenation has
//! the lowest rank. That is a byte-level BPE whose merges are, for every
//! token, each split of it into two tokens, ordered by the token's rank; the
//! tokenizer is built as such, with the GLM-4 split pattern and the special
//! tokens that follow the ranks.

use std::collections::HashMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::EngineError;

/// GLM-4's pre-tokenizer split (the same as Llama 3's).
pub const GLM4_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// GLM-4's special tokens, numbered from the first id after the ranks.
pub const GLM4_SPECIALS: &[&str] = &[
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
];

/// Whether `path` looks like a tiktoken rank file (its first line is
/// base64, a space, and a number).
pub fn is_tiktoken(path: &Path) -> bool {
    let Ok(text) = std::fs::read(path) else {
        return false;
    };
    let first = text.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(first) else {
        return false;
    };
    matches!(line.split_once(' '), Some((b, r)) if decode_base64(b).is_some() && r.trim().parse::<u32>().is_ok())
}

/// Builds the tokenizer of rank file `path`; `specials` are (id, token)
/// pairs (the checkpoint's added tokens, or GLM-4's after the ranks when
/// it names none).
pub fn load(path: &Path, specials: &[(u32, String)]) -> Result<tokenizers::Tokenizer, EngineError> {
    let bad = |reason: String| EngineError::file(path, reason);
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut ranks: Vec<(Vec<u8>, u32)> = Vec::new();
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let (b64, rank) = line
            .split_once(' ')
            .ok_or_else(|| bad(format!("line {}: expected `BASE64 RANK`", n + 1)))?;
        let bytes = decode_base64(b64)
            .ok_or_else(|| bad(format!("line {}: `{b64}` is not base64", n + 1)))?;
        let rank: u32 = rank
            .trim()
            .parse()
            .map_err(|_| bad(format!("line {}: `{rank}` is not a rank", n + 1)))?;
        ranks.push((bytes, rank));
    }
    let unicode = byte_to_unicode();
    let as_str = |bytes: &[u8]| -> String { bytes.iter().map(|&b| unicode[b as usize]).collect() };
    let by_bytes: HashMap<&[u8], u32> = ranks.iter().map(|(b, r)| (b.as_slice(), *r)).collect();
    let mut vocab = serde_json::Map::new();
    for (bytes, rank) in &ranks {
        vocab.insert(as_str(bytes), json!(rank));
    }
    // Every split of every token into two tokens, by the token's rank.
    let mut order: Vec<&(Vec<u8>, u32)> = ranks.iter().filter(|(b, _)| b.len() > 1).collect();
    order.sort_by_key(|(_, r)| *r);
    let mut merges = Vec::new();
    for (bytes, _) in order {
        let mut local: Vec<(u32, u32, usize)> = (1..bytes.len())
            .filter_map(|i| Some((*by_bytes.get(&bytes[..i])?, *by_bytes.get(&bytes[i..])?, i)))
            .collect();
        local.sort();
        for (_, _, i) in local {
            merges.push(Value::String(format!(
                "{} {}",
                as_str(&bytes[..i]),
                as_str(&bytes[i..])
            )));
        }
    }
    // Added tokens keep their ids only if the model's vocabulary has them.
    for (id, tok) in specials {
        vocab.insert(tok.clone(), json!(id));
    }
    let added: Vec<Value> = specials
        .iter()
        .map(|(id, tok)| {
            json!({"id": id, "content": tok, "single_word": false, "lstrip": false,
                   "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let pre_tokenizer = split_then_bytes(GLM4_SPLIT);
    byte_level_bpe(added, pre_tokenizer, Value::Null, vocab, merges, true)
        .map_err(|e| bad(format!("the tokenizer it describes does not build: {e}")))
}

/// The byte-level pre-tokenizer of GPT-2 (`use_regex`: with its own split).
pub fn byte_level(use_regex: bool) -> Value {
    json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": use_regex})
}

/// A regex split, then byte-level mapping (Llama 3, Qwen2, GLM-4).
pub fn split_then_bytes(pattern: &str) -> Value {
    json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": false},
        byte_level(false)
    ]})
}

/// A byte-level BPE tokenizer from its parts (the `tokenizers` JSON form).
pub fn byte_level_bpe(
    added: Vec<Value>,
    pre_tokenizer: Value,
    post_processor: Value,
    vocab: serde_json::Map<String, Value>,
    merges: Vec<Value>,
    ignore_merges: bool,
) -> Result<tokenizers::Tokenizer, String> {
    let spec = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": byte_level(true),
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": false, "byte_fallback": false, "ignore_merges": ignore_merges,
            "vocab": vocab, "merges": merges,
        },
    });
    tokenizers::Tokenizer::from_bytes(spec.to_string().as_bytes()).map_err(|e| e.to_string())
}

/// GPT-2's reversible map from bytes to printable characters, which
/// byte-level BPE vocabularies are written in.
pub fn byte_to_unicode() -> [char; 256] {
    let mut map = ['\0'; 256];
    let mut extra = 0u32;
    for b in 0..256u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        map[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            extra += 1;
            char::from_u32(255 + extra).unwrap()
        };
    }
    map
}

/// Standard base64 (with or without `=` padding).
fn decode_base64(s: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let s = s.trim().trim_end_matches('=').as_bytes();
    if s.is_empty() || s.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    for chunk in s.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_decodes() {
        assert_eq!(decode_base64("IQ==").unwrap(), b"!");
        assert_eq!(decode_base64("aGVsbG8").unwrap(), b"hello");
        assert_eq!(decode_base64("5Lit5paH").unwrap(), "中文".as_bytes());
        assert!(decode_base64("a").is_none());
        assert!(decode_base64("@@@@").is_none());
    }

    #[test]
    fn the_byte_map_is_gpt2s() {
        let m = byte_to_unicode();
        assert_eq!(m[b'A' as usize], 'A');
        assert_eq!(m[b' ' as usize], 'Ġ');
        assert_eq!(m[b'\n' as usize], 'Ċ');
        let distinct: std::collections::HashSet<char> = m.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
