//! One sequence's state on a model: its KV cache and the tokens whose keys
//! and values the cache holds, in order. The one-sequence engine, every slot
//! of the batching scheduler and a draft model's drafter each hold one.
//!
//! A new prompt that starts with the tokens already held reuses those
//! positions and only computes the rest ([`Sequence::reuse`]), which is what
//! makes plan-then-write linear in the document length.

use lw_model::{KvCache, Llama, Logits};

use crate::error::EngineError;

pub struct Sequence {
    cache: KvCache,
    tokens: Vec<u32>,
}

impl Sequence {
    /// An empty sequence with a cache in `model`'s KV format.
    pub fn new(model: &Llama) -> Self {
        Sequence {
            cache: model.new_cache(),
            tokens: Vec::new(),
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Keeps the first `len` positions, or none where a sliding layer has
    /// already dropped keys the positions after them would read
    /// ([`KvCache::truncate`]); [`Sequence::len`] says which.
    pub fn truncate(&mut self, len: usize) {
        self.cache.truncate(len);
        self.tokens.truncate(self.cache.len());
    }

    pub fn clear(&mut self) {
        self.truncate(0);
    }

    /// Positions shared with the start of `prompt`.
    pub fn shared_prefix(&self, prompt: &[u32]) -> usize {
        common_prefix(&self.tokens, prompt)
    }

    /// Keeps the longest prefix shared with `prompt`, short of its last
    /// token (at least one position is computed, for its logits), and
    /// returns its length: where computing `prompt` starts.
    pub fn reuse(&mut self, prompt: &[u32]) -> usize {
        let common = self
            .shared_prefix(prompt)
            .min(prompt.len().saturating_sub(1));
        self.truncate(common);
        self.len()
    }

    /// Computes `tokens` after the positions held; their logits go to `out`
    /// (`[rows, vocab]`, its room reused: every new position's with
    /// `Logits::All`, the last one's with `Logits::Last`). Returns the
    /// number of rows.
    pub fn feed(
        &mut self,
        model: &Llama,
        tokens: &[u32],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<usize, EngineError> {
        let rows = model.forward_into(tokens, &mut self.cache, logits, out)?;
        self.tokens.extend_from_slice(tokens);
        Ok(rows)
    }

    /// Computes `tokens` after the positions held; the logits of every new
    /// position, in order.
    pub fn feed_all(
        &mut self,
        model: &Llama,
        tokens: &[u32],
    ) -> Result<Vec<Vec<f32>>, EngineError> {
        let mut out = Vec::new();
        let rows = self.feed(model, tokens, Logits::All, &mut out)?;
        Ok(out
            .chunks_exact(out.len() / rows)
            .map(<[f32]>::to_vec)
            .collect())
    }

    /// Computes `tokens` after the positions held; the last one's logits.
    pub fn feed_last(&mut self, model: &Llama, tokens: &[u32]) -> Result<Vec<f32>, EngineError> {
        let mut out = Vec::new();
        self.feed(model, tokens, Logits::Last, &mut out)?;
        Ok(out)
    }

    /// Brings the sequence to `prompt`: keeps the shared prefix and computes
    /// the rest in chunks. Returns the last position's logits and the number
    /// of positions reused.
    pub fn prefill(
        &mut self,
        model: &Llama,
        prompt: &[u32],
        chunk: usize,
    ) -> Result<(Vec<f32>, usize), EngineError> {
        let common = self.reuse(prompt);
        let mut logits = Vec::new();
        for part in prompt[common..].chunks(chunk.max(1)) {
            logits = self.feed_last(model, part)?;
        }
        Ok((logits, common))
    }

    /// Allocates the cache for `positions` positions, unless that takes more
    /// memory than `available` (when known).
    pub fn reserve(&mut self, positions: usize, available: Option<u64>) -> Result<(), EngineError> {
        let extra = self
            .cache
            .bytes_for(positions)
            .saturating_sub(self.cache.bytes()) as u64;
        if extra == 0 {
            return Ok(());
        }
        if let Some(available) = available {
            if extra > available {
                return Err(EngineError::KvCacheTooLarge {
                    positions,
                    bytes: self.cache.bytes_for(positions) as u64,
                    available,
                    dtype: self.cache.dtype().name(),
                });
            }
        }
        self.cache.reserve_exact(positions);
        Ok(())
    }

    /// The caches of `seqs`, for a step that feeds them together.
    pub(crate) fn caches<'a>(seqs: impl Iterator<Item = &'a mut Sequence>) -> Vec<&'a mut KvCache> {
        seqs.map(|s| &mut s.cache).collect()
    }

    /// Records `token` as computed (its keys and values were written to the
    /// cache by a batched step).
    pub(crate) fn push_computed(&mut self, token: u32) {
        self.tokens.push(token);
    }
}

pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}
