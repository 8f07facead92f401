//! Batches for the training loop: random windows of token shards for
//! pretraining; chat conversations rendered with the model's template,
//! supervised on assistant tokens only and packed greedily into fixed-length
//! rows for fine-tuning.

use std::path::{Path, PathBuf};

use lw_core::{Message, Role};
use lw_engine::Tokenizer;
use serde_json::Value;

use crate::error::{file_error, TrainError};
use crate::model::{Batch, Rng};
use crate::shards::Shard;
use crate::train::BatchSource;

/// Segment id of padding positions.
pub const PAD_SEGMENT: u32 = u32::MAX;

/// Random windows of `len + 1` tokens from the training shards of a
/// `data tokenize` directory; validation windows evenly spaced over its
/// validation shards.
pub struct PretrainData {
    train: Vec<Shard>,
    val: Vec<Shard>,
    pub rows: usize,
    pub len: usize,
    pub seed: u64,
    pub val_batches: usize,
    /// The tokenizer the shards were made with, as meta.json names it.
    pub tokenizer: Option<PathBuf>,
    pub vocab_size: Option<usize>,
}

impl PretrainData {
    pub fn open(dir: &Path, rows: usize, len: usize, seed: u64) -> Result<Self, TrainError> {
        let meta_path = dir.join("meta.json");
        let text = std::fs::read_to_string(&meta_path).map_err(|e| file_error(&meta_path, e))?;
        let meta: Value = serde_json::from_str(&text).map_err(|e| file_error(&meta_path, e))?;
        let shards = meta["shards"]
            .as_array()
            .ok_or_else(|| file_error(&meta_path, "field `shards` is missing or not a list"))?;
        let (mut train, mut val) = (Vec::new(), Vec::new());
        for s in shards {
            let name = s
                .as_str()
                .ok_or_else(|| file_error(&meta_path, "field `shards` holds a non-string"))?;
            let shard = Shard::open(&dir.join(name))?;
            if name.starts_with("val-") {
                val.push(shard);
            } else if shard.len() > len {
                train.push(shard);
            }
        }
        if train.is_empty() {
            return Err(TrainError::NoData(format!(
                "{} has no training shard longer than the row length {len}",
                dir.display()
            )));
        }
        Ok(PretrainData {
            train,
            val,
            rows,
            len,
            seed,
            val_batches: 8,
            tokenizer: meta["tokenizer"].as_str().map(PathBuf::from),
            vocab_size: meta["vocab_size"].as_u64().map(|v| v as usize),
        })
    }

    pub fn train_tokens(&self) -> usize {
        self.train.iter().map(|s| s.len()).sum()
    }

    fn window_batch(&self, windows: Vec<Vec<u32>>) -> Batch {
        let (rows, len) = (windows.len(), self.len);
        let mut b = Batch {
            rows,
            len,
            inputs: Vec::with_capacity(rows * len),
            targets: Vec::with_capacity(rows * len),
            weights: vec![1.0 / (rows * len) as f32; rows * len],
            positions: Vec::with_capacity(rows * len),
            segments: vec![0; rows * len],
        };
        for w in windows {
            b.inputs.extend_from_slice(&w[..len]);
            b.targets.extend_from_slice(&w[1..=len]);
            b.positions.extend(0..len as u32);
        }
        b
    }
}

impl BatchSource for PretrainData {
    fn batch(&self, step: u64, micro: usize, accum: usize) -> Batch {
        let mut rng = Rng::derive(self.seed, 4, step * accum as u64 + micro as u64);
        let total: usize = self.train.iter().map(|s| s.len() - self.len).sum();
        let windows = (0..self.rows)
            .map(|_| {
                let mut at = rng.below(total);
                for s in &self.train {
                    let room = s.len() - self.len;
                    if at < room {
                        return s.window(at, self.len + 1);
                    }
                    at -= room;
                }
                unreachable!("the offset lies within the shards")
            })
            .collect();
        self.window_batch(windows)
    }

    fn validation(&self) -> Vec<Batch> {
        let mut windows = Vec::new();
        for s in &self.val {
            let mut at = 0;
            while at + self.len < s.len() {
                windows.push(s.window(at, self.len + 1));
                at += self.len + 1;
            }
        }
        let want = self.val_batches * self.rows;
        if windows.len() > want {
            let stride = windows.len() as f64 / want as f64;
            windows = (0..want)
                .map(|i| windows[(i as f64 * stride) as usize].clone())
                .collect();
        }
        windows
            .chunks(self.rows)
            .filter(|c| c.len() == self.rows)
            .map(|c| self.window_batch(c.to_vec()))
            .collect()
    }
}

/// How the loss of a packed batch is normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// LongAlign: each sequence's mean token loss, averaged over the sequences
    /// of the batch (long answers do not drown short ones, nor the reverse).
    SequenceMean,
    /// Every supervised token counts the same.
    TokenMean,
}

/// Removes zero-width characters (U+200B–U+200D, U+2060, U+FEFF).
pub fn strip_zero_width(s: &str) -> String {
    s.chars()
        .filter(|c| !matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}'))
        .collect()
}

/// A conversation's tokens and which of them are supervised (assistant text
/// and the end-of-turn marker after it).
#[derive(Debug, Clone, PartialEq)]
pub struct Tokenized {
    pub tokens: Vec<u32>,
    pub supervised: Vec<bool>,
}

/// Renders `messages` with the tokenizer's chat template and marks the
/// assistant turns. Each assistant turn must render as the text that asking
/// for it (`add_generation_prompt`) gives, plus its own text.
pub fn tokenize_conversation(tok: &Tokenizer, messages: &[Message]) -> Result<Tokenized, String> {
    let template = tok
        .chat_template()
        .ok_or("the tokenizer has no chat template")?;
    let mut out = Tokenized {
        tokens: Vec::new(),
        supervised: Vec::new(),
    };
    let mut done = 0; // bytes of rendered text already tokenized
    let push = |text: &str, sup: bool, out: &mut Tokenized| -> Result<(), String> {
        let ids = tok.encode(text, false).map_err(|e| e.to_string())?;
        out.supervised.extend(std::iter::repeat_n(sup, ids.len()));
        out.tokens.extend(ids);
        Ok(())
    };
    for (i, m) in messages.iter().enumerate() {
        if m.role != Role::Assistant {
            continue;
        }
        let prompt = template
            .render(&messages[..i], true)
            .map_err(|e| e.to_string())?;
        let full = template
            .render(&messages[..=i], false)
            .map_err(|e| e.to_string())?;
        if !full.starts_with(&prompt) || prompt.len() < done {
            return Err(
                "the chat template does not render an assistant turn as the prompt that asks for it plus the answer"
                    .into(),
            );
        }
        push(&prompt[done..], false, &mut out)?;
        push(&full[prompt.len()..], true, &mut out)?;
        done = full.len();
    }
    if done == 0 {
        return Err("the conversation has no assistant turn".into());
    }
    Ok(out)
}

/// One line of a chat JSONL file that could not be used.
#[derive(Debug, Clone, PartialEq)]
pub struct BadLine {
    pub line: usize,
    pub reason: String,
}

fn parse_messages(v: &Value) -> Result<Vec<Message>, String> {
    let list = v
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("field `messages` is missing or not a list")?;
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let role = m
            .get("role")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("messages[{i}].role is missing or not a string"))?;
        let content = m
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| format!("messages[{i}].content is missing or not a string"))?;
        let role = match role {
            "system" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            other => return Err(format!("messages[{i}].role \"{other}\" is unknown")),
        };
        let content = if role == Role::Assistant {
            strip_zero_width(content)
        } else {
            content.to_string()
        };
        out.push(Message { role, content });
    }
    if !out.iter().any(|m| m.role == Role::Assistant) {
        return Err("the conversation has no assistant turn".into());
    }
    Ok(out)
}

/// Reads `{"messages": [{"role", "content"}, …]}` lines. Unusable lines are
/// fatal unless `skip_bad`, in which case they are returned with their reason.
pub fn read_conversations(
    path: &Path,
    skip_bad: bool,
) -> Result<(Vec<Vec<Message>>, Vec<BadLine>), TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    let mut convs = Vec::new();
    let mut bad = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let parsed = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("not JSON: {e}"))
            .and_then(|v| parse_messages(&v));
        match parsed {
            Ok(m) => convs.push(m),
            Err(reason) if skip_bad => bad.push(BadLine {
                line: i + 1,
                reason,
            }),
            Err(reason) => {
                return Err(TrainError::Line {
                    path: path.to_path_buf(),
                    line: i + 1,
                    reason,
                })
            }
        }
    }
    Ok((convs, bad))
}

/// A packed row: inputs, targets, supervision flags, positions and segments.
#[derive(Debug, Clone)]
struct Row {
    inputs: Vec<u32>,
    targets: Vec<u32>,
    supervised: Vec<bool>,
    positions: Vec<u32>,
    segments: Vec<u32>,
}

/// What packing did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PackStats {
    pub sequences: usize,
    /// Longer than a row: skipped.
    pub too_long: usize,
    pub rows: usize,
    pub tokens: usize,
    pub supervised: usize,
}

/// Conversations packed into rows for supervised fine-tuning.
pub struct SftData {
    rows: Vec<Row>,
    val: Vec<Row>,
    pub rows_per_batch: usize,
    pub len: usize,
    pub mode: LossMode,
    pub seed: u64,
    pub stats: PackStats,
}

impl SftData {
    /// Packs tokenized conversations greedily (first fit, in a seeded random
    /// order) into rows of `len` positions. A held-out share of the rows
    /// (one in twenty, at most 16) gives the validation loss.
    pub fn pack(
        seqs: Vec<Tokenized>,
        len: usize,
        rows_per_batch: usize,
        mode: LossMode,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let mut stats = PackStats::default();
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        Rng::derive(seed, 6, 0).shuffle(&mut order);
        let mut rows: Vec<Row> = Vec::new();
        for i in order {
            let s = &seqs[i];
            let n = s.tokens.len().saturating_sub(1);
            if n == 0 || !s.supervised[1..].iter().any(|&x| x) {
                continue;
            }
            if n > len {
                stats.too_long += 1;
                continue;
            }
            stats.sequences += 1;
            stats.tokens += n;
            stats.supervised += s.supervised[1..].iter().filter(|&&x| x).count();
            let slot = rows.iter().position(|r| r.inputs.len() + n <= len);
            let row = match slot {
                Some(r) => &mut rows[r],
                None => {
                    rows.push(Row {
                        inputs: Vec::with_capacity(len),
                        targets: Vec::with_capacity(len),
                        supervised: Vec::with_capacity(len),
                        positions: Vec::with_capacity(len),
                        segments: Vec::with_capacity(len),
                    });
                    rows.last_mut().expect("just pushed")
                }
            };
            let seg = row.segments.last().map_or(0, |s| s + 1);
            row.inputs.extend_from_slice(&s.tokens[..n]);
            row.targets.extend_from_slice(&s.tokens[1..]);
            row.supervised.extend_from_slice(&s.supervised[1..]);
            row.positions.extend(0..n as u32);
            row.segments.extend(std::iter::repeat_n(seg, n));
        }
        if rows.is_empty() {
            return Err(TrainError::NoData(format!(
                "no conversation fits in a row of {len} tokens ({} too long)",
                stats.too_long
            )));
        }
        stats.rows = rows.len();
        let held = (rows.len() / 20).min(16);
        let val = rows.split_off(rows.len() - held);
        Ok(SftData {
            rows,
            val,
            rows_per_batch,
            len,
            mode,
            seed,
            stats,
        })
    }

    /// Rows used for training (the rest are held out).
    pub fn train_rows(&self) -> usize {
        self.rows.len()
    }

    fn make_batch(&self, rows: &[&Row]) -> Batch {
        let len = self.len;
        let n = rows.len() * len;
        let mut b = Batch {
            rows: rows.len(),
            len,
            inputs: vec![0; n],
            targets: vec![0; n],
            weights: vec![0.0; n],
            positions: vec![0; n],
            segments: vec![PAD_SEGMENT; n],
        };
        // Supervised tokens per (row, segment).
        let mut counts: Vec<Vec<usize>> = Vec::new();
        for (r, row) in rows.iter().enumerate() {
            let at = r * len;
            let k = row.inputs.len();
            b.inputs[at..at + k].copy_from_slice(&row.inputs);
            b.targets[at..at + k].copy_from_slice(&row.targets);
            b.positions[at..at + k].copy_from_slice(&row.positions);
            b.segments[at..at + k].copy_from_slice(&row.segments);
            let segs = row.segments.last().map_or(0, |s| s + 1) as usize;
            let mut c = vec![0usize; segs];
            for (s, &sup) in row.segments.iter().zip(&row.supervised) {
                if sup {
                    c[*s as usize] += 1;
                }
            }
            counts.push(c);
        }
        let sequences = counts.iter().flatten().filter(|&&c| c > 0).count().max(1);
        let total: usize = counts.iter().flatten().sum::<usize>().max(1);
        for (r, row) in rows.iter().enumerate() {
            for (j, (&s, &sup)) in row.segments.iter().zip(&row.supervised).enumerate() {
                if sup {
                    b.weights[r * len + j] = match self.mode {
                        LossMode::TokenMean => 1.0 / total as f32,
                        LossMode::SequenceMean => 1.0 / (counts[r][s as usize] * sequences) as f32,
                    };
                }
            }
        }
        b
    }
}

impl BatchSource for SftData {
    fn batch(&self, step: u64, micro: usize, accum: usize) -> Batch {
        let n = self.rows.len();
        let first = (step * accum as u64 + micro as u64) * self.rows_per_batch as u64;
        let mut cached: Option<(u64, Vec<usize>)> = None;
        let picked: Vec<&Row> = (0..self.rows_per_batch as u64)
            .map(|k| {
                let i = first + k;
                let epoch = i / n as u64;
                if cached.as_ref().map(|c| c.0) != Some(epoch) {
                    let mut order: Vec<usize> = (0..n).collect();
                    Rng::derive(self.seed, 5, epoch).shuffle(&mut order);
                    cached = Some((epoch, order));
                }
                let order = &cached.as_ref().expect("set above").1;
                &self.rows[order[(i % n as u64) as usize]]
            })
            .collect();
        self.make_batch(&picked)
    }

    fn validation(&self) -> Vec<Batch> {
        self.val
            .chunks(self.rows_per_batch)
            .map(|c| self.make_batch(&c.iter().collect::<Vec<_>>()))
            .collect()
    }
}

/// Steps in `epochs` passes over the training rows.
pub fn steps_for_epochs(rows: usize, rows_per_batch: usize, accum: usize, epochs: f64) -> u64 {
    let per_step = (rows_per_batch * accum).max(1) as f64;
    ((rows as f64 * epochs) / per_step).ceil().max(1.0) as u64
}
