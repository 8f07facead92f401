//! Token shards: a corpus tokenized once into flat files of little-endian
//! u32 ids that training memory-maps. Documents are separated by the
//! end-of-text id; a deterministic share of documents (by content hash) goes
//! to the validation split.
//!
//! ```text
//! NAME.bin: "LWTOKENS" | version u32 = 1 | bytes per token u32 = 4 |
//!           token count u64 | reserved u64 | count × u32 (little-endian)
//! DIR/meta.json: tokenizer, vocabulary size, end-of-text id, counts, shards
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};

use crate::error::{file_error, TrainError};

const MAGIC: &[u8; 8] = b"LWTOKENS";
const HEADER: usize = 32;

/// Writes `tokens` as one shard, atomically (temporary file, then rename).
pub fn write_shard(path: &Path, tokens: &[u32]) -> Result<(), TrainError> {
    let tmp = path.with_extension("bin.tmp");
    let mut f =
        std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(|e| file_error(&tmp, e))?);
    let mut header = Vec::with_capacity(HEADER);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&1u32.to_le_bytes());
    header.extend_from_slice(&4u32.to_le_bytes());
    header.extend_from_slice(&(tokens.len() as u64).to_le_bytes());
    header.extend_from_slice(&0u64.to_le_bytes());
    f.write_all(&header).map_err(|e| file_error(&tmp, e))?;
    for t in tokens {
        f.write_all(&t.to_le_bytes())
            .map_err(|e| file_error(&tmp, e))?;
    }
    let f = f.into_inner().map_err(|e| file_error(&tmp, e.error()))?;
    f.sync_all().map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// A memory-mapped shard.
pub struct Shard {
    map: memmap2::Mmap,
    len: usize,
    path: PathBuf,
}

impl Shard {
    pub fn open(path: &Path) -> Result<Self, TrainError> {
        let f = std::fs::File::open(path).map_err(|e| file_error(path, e))?;
        // SAFETY: mapped read-only; shards are written once (atomically) and
        // not modified while training reads them.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| file_error(path, e))?;
        if map.len() < HEADER || &map[..8] != MAGIC {
            return Err(file_error(path, "not a token shard (bad header)"));
        }
        let word = |at: usize| u32::from_le_bytes(map[at..at + 4].try_into().expect("4 bytes"));
        if word(8) != 1 || word(12) != 4 {
            return Err(file_error(
                path,
                format!(
                    "unsupported shard version {} / token width {}",
                    word(8),
                    word(12)
                ),
            ));
        }
        let len = u64::from_le_bytes(map[16..24].try_into().expect("8 bytes")) as usize;
        if map.len() != HEADER + 4 * len {
            return Err(file_error(
                path,
                format!(
                    "truncated: the header says {len} tokens, the file holds {}",
                    (map.len() - HEADER) / 4
                ),
            ));
        }
        Ok(Shard {
            map,
            len,
            path: path.to_path_buf(),
        })
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Token `i`.
    pub fn get(&self, i: usize) -> u32 {
        let at = HEADER + 4 * i;
        u32::from_le_bytes(self.map[at..at + 4].try_into().expect("4 bytes"))
    }

    /// Tokens `start..start + n` (copied out; little-endian on any host).
    pub fn window(&self, start: usize, n: usize) -> Vec<u32> {
        (start..(start + n).min(self.len))
            .map(|i| self.get(i))
            .collect()
    }
}

/// What `tokenize_corpus` wrote.
#[derive(Debug, Clone)]
pub struct CorpusSummary {
    pub documents: usize,
    pub train_tokens: usize,
    pub val_tokens: usize,
    pub shards: Vec<PathBuf>,
}

/// The documents of one input: each line's `text` of a `.jsonl` file, or
/// the whole file.
pub(crate) fn documents(path: &Path) -> Result<Vec<String>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    if path.extension().and_then(|e| e.to_str()) != Some("jsonl") {
        return Ok(vec![text]);
    }
    let mut docs = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: Value = serde_json::from_str(line)
            .map_err(|e| file_error(path, format!("line {}: invalid JSON: {e}", i + 1)))?;
        match v.get("text").and_then(Value::as_str) {
            Some(t) => docs.push(t.to_string()),
            None => {
                return Err(file_error(
                    path,
                    format!("line {}: no \"text\" field", i + 1),
                ))
            }
        }
    }
    Ok(docs)
}

fn fnv(text: &str) -> u64 {
    let mut h = 0xcbf29ce484222325u64;
    for b in text.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

/// Tokenizes `inputs` with the tokenizer in `tokenizer_dir` into
/// `out/train-NNNNN.bin`, `out/val-NNNNN.bin` and `out/meta.json`.
pub fn tokenize_corpus(
    tokenizer_dir: &Path,
    inputs: &[PathBuf],
    out: &Path,
    val_fraction: f64,
    shard_tokens: usize,
) -> Result<CorpusSummary, TrainError> {
    if inputs.is_empty() {
        return Err(TrainError::NoFiles);
    }
    let tok_path = tokenizer_dir.join("tokenizer.json");
    let tok = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| file_error(&tok_path, e))?;
    let eot = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .ok_or_else(|| {
            file_error(
                &tok_path,
                "no end-of-text token (<|endoftext|>, </s>, <|end_of_text|> or <|im_end|>)",
            )
        })?;
    std::fs::create_dir_all(out).map_err(|e| file_error(out, e))?;
    let shard_tokens = shard_tokens.max(1);
    let mut summary = CorpusSummary {
        documents: 0,
        train_tokens: 0,
        val_tokens: 0,
        shards: Vec::new(),
    };
    let mut buffers: [(Vec<u32>, usize, &str); 2] =
        [(Vec::new(), 0, "train"), (Vec::new(), 0, "val")];
    let flush = |buf: &mut (Vec<u32>, usize, &str),
                 summary: &mut CorpusSummary|
     -> Result<(), TrainError> {
        let path = out.join(format!("{}-{:05}.bin", buf.2, buf.1));
        write_shard(&path, &buf.0)?;
        summary.shards.push(path);
        buf.0.clear();
        buf.1 += 1;
        Ok(())
    };
    for input in inputs {
        for doc in documents(input)? {
            if doc.trim().is_empty() {
                continue;
            }
            let enc = tok
                .encode(doc.as_str(), false)
                .map_err(|e| file_error(input, format!("tokenizing: {e}")))?;
            let val = (fnv(&doc) % 1_000_000) as f64 / 1_000_000.0 < val_fraction;
            let buf = &mut buffers[usize::from(val)];
            buf.0.extend_from_slice(enc.get_ids());
            buf.0.push(eot);
            if val {
                summary.val_tokens += enc.get_ids().len() + 1;
            } else {
                summary.train_tokens += enc.get_ids().len() + 1;
            }
            summary.documents += 1;
            if buf.0.len() >= shard_tokens {
                flush(buf, &mut summary)?;
            }
        }
    }
    for buf in buffers.iter_mut() {
        if !buf.0.is_empty() {
            flush(buf, &mut summary)?;
        }
    }
    if summary.documents == 0 {
        return Err(file_error(&inputs[0], "no text in the inputs"));
    }
    let meta = json!({
        "tokenizer": tokenizer_dir,
        "vocab_size": tok.get_vocab_size(true),
        "eot": eot,
        "documents": summary.documents,
        "train_tokens": summary.train_tokens,
        "val_tokens": summary.val_tokens,
        "shards": summary.shards.iter().map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned())).collect::<Vec<_>>(),
    });
    let meta_path = out.join("meta.json");
    std::fs::write(
        &meta_path,
        serde_json::to_string_pretty(&meta).expect("json"),
    )
    .map_err(|e| file_error(&meta_path, e))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_round_trip_and_truncation_is_named() {
        let dir = std::env::temp_dir().join(format!("lw-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.bin");
        let tokens: Vec<u32> = (0..1000).map(|i| i * 7919 % 65_537).collect();
        write_shard(&p, &tokens).unwrap();
        let s = Shard::open(&p).unwrap();
        assert_eq!(s.len(), 1000);
        assert_eq!(s.window(0, 1000), tokens);
        assert_eq!(s.window(995, 10), tokens[995..].to_vec());
        // Cut the file short: the error names it and both counts.
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 6]).unwrap();
        let e = Shard::open(&p).err().unwrap().to_string();
        assert!(e.contains("a.bin") && e.contains("1000 tokens"), "{e}");
        std::fs::write(&p, b"hello").unwrap();
        assert!(Shard::open(&p)
            .err()
            .unwrap()
            .to_string()
            .contains("bad header"));
    }
}
