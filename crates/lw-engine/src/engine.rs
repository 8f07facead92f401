//! The one-sequence engine ([`Engine`]): a shared [`Model`] and the
//! [`Sequence`] of its last generation.
//!
//! A generation runs prompt → (reused prefix + chunked prefill) → sample →
//! decode, streaming complete text deltas, until an end-of-sequence token, a
//! stop string, `max_tokens` or the context limit, on the same step as the
//! batching scheduler's (`decode::step`, a batch of one here).
//!
//! The engine keeps the KV cache of its last sequence. A new prompt that
//! starts with the same tokens reuses those positions and only computes the
//! rest, which is what makes plan-then-write linear in the document length.

use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use lw_core::GenerationParams;

use crate::decode::{self, Generation, Running};
use crate::error::EngineError;
use crate::model::{LoadOptions, Model};
use crate::sequence::Sequence;
use crate::speculative::{Drafter, Speculation};

/// One sequence at a time on a model: the sequence of the last generation
/// is kept, so the next prompt reuses the prefix it shares.
pub struct Engine {
    model: Arc<Model>,
    seq: Option<Sequence>,
    /// Speculative decoding in [`Engine::generate`], when set.
    speculation: Option<Speculation>,
    /// The last generation's drafter (a draft model keeps its cache).
    drafter: Option<Drafter>,
}

impl Deref for Engine {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.model
    }
}

impl Engine {
    /// Loads a model directory (config, weights, tokenizer, generation
    /// config) or a GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        Ok(Engine::on(Arc::new(Model::load(dir, opts)?)))
    }

    /// An engine on a loaded model.
    pub fn on(model: Arc<Model>) -> Self {
        Engine {
            model,
            seq: None,
            speculation: None,
            drafter: None,
        }
    }

    /// The shared model (for a scheduler, or as a draft model).
    pub fn shared(&self) -> &Arc<Model> {
        &self.model
    }

    /// Turns speculative decoding on (or off with `None`) for `generate`.
    pub fn set_speculation(&mut self, speculation: Option<Speculation>) {
        self.speculation = speculation;
        self.drafter = None;
    }

    /// The speculative decoding set, if any.
    pub fn speculation(&self) -> Option<&Speculation> {
        self.speculation.as_ref()
    }

    fn seq(&mut self) -> &mut Sequence {
        let model = &self.model;
        self.seq.get_or_insert_with(|| model.new_sequence())
    }

    /// Drops the kept KV cache (the next prompt is computed from scratch).
    pub fn reset(&mut self) {
        if let Some(seq) = self.seq.as_mut() {
            seq.clear();
        }
    }

    /// Computes logits of every position of `prompt` from scratch.
    pub fn score(&mut self, prompt: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.check_prompt(prompt)?;
        let model = self.model.clone();
        let seq = self.seq();
        seq.clear();
        let mut rows = Vec::with_capacity(prompt.len());
        for chunk in prompt.chunks(model.prefill_chunk()) {
            rows.extend(seq.feed_all(model.model(), chunk)?);
        }
        Ok(rows)
    }

    /// The log-probability of each token of each continuation after
    /// `context` (natural log, from the logits' log-softmax in f64): the
    /// context is computed once and each continuation after it, the cache
    /// cut back to the context between them. A multiple-choice scorer's
    /// step (`eval mc`).
    pub fn continuation_logprobs(
        &mut self,
        context: &[u32],
        continuations: &[Vec<u32>],
    ) -> Result<Vec<Vec<f64>>, EngineError> {
        self.check_prompt(context)?;
        for c in continuations {
            let mut whole = context.to_vec();
            whole.extend_from_slice(c);
            self.check_prompt(&whole)?;
        }
        let model = self.model.clone();
        let chunk = model.prefill_chunk();
        let seq = self.seq();
        seq.clear();
        let mut last = Vec::new();
        for part in context.chunks(chunk) {
            last = seq.feed_last(model.model(), part)?;
        }
        let mut out = Vec::with_capacity(continuations.len());
        for cont in continuations {
            seq.truncate(context.len());
            if seq.len() < context.len() {
                // A sliding layer dropped keys the context needs: again.
                seq.clear();
                for part in context.chunks(chunk) {
                    seq.feed_last(model.model(), part)?;
                }
            }
            let mut rows = vec![last.clone()];
            if cont.len() > 1 {
                for part in cont[..cont.len() - 1].chunks(chunk) {
                    rows.extend(seq.feed_all(model.model(), part)?);
                }
            }
            out.push(
                cont.iter()
                    .zip(&rows)
                    .map(|(&t, row)| log_softmax_at(row, t as usize))
                    .collect(),
            );
        }
        Ok(out)
    }

    /// Generates a continuation of `prompt`. `on_text` receives each complete
    /// text delta and returns `false` to stop (finish reason `Cancelled`).
    /// This is the scheduler's step over a batch of one.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt)?;
        let started = Instant::now();
        // The whole generation's cache at once: no copies while it runs, and
        // a clear error now rather than running out of memory later.
        if let Some(max) = params.max_tokens {
            let positions = (prompt.len() + max).min(self.context_length());
            self.reserve_cache(positions)?;
        }
        let model = self.model.clone();
        let guide = params
            .constraint
            .as_ref()
            .map(|c| model.guide(c))
            .transpose()?;
        let seq = self.seq.take().unwrap_or_else(|| model.new_sequence());
        let drafter =
            Speculation::drafter_for(self.speculation.as_ref(), params, self.drafter.take());
        let run = Running::new(
            &model,
            prompt.to_vec(),
            params,
            seq,
            drafter,
            on_text,
            started,
        )
        .with_guide(guide);
        let mut batch = [run];
        let outcome = loop {
            if let Some((_, outcome)) = decode::step(&model, &mut batch).pop() {
                break outcome;
            }
        };
        let [run] = batch;
        let (result, seq, drafter, _) = run.finish(outcome, model.tokenizer());
        self.seq = Some(seq);
        if drafter.is_some() {
            self.drafter = drafter;
        }
        result
    }

    /// Allocates the KV cache for `positions` positions, unless that takes
    /// more memory than there is.
    pub fn reserve_cache(&mut self, positions: usize) -> Result<(), EngineError> {
        let available = self.model.memory_available();
        self.seq().reserve(positions, available)
    }
}

/// The engine's model, shared (for a scheduler or as a draft model).
impl From<Engine> for Arc<Model> {
    fn from(engine: Engine) -> Self {
        engine.model
    }
}

/// `log softmax(row)[at]` in f64.
fn log_softmax_at(row: &[f32], at: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let sum: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    row.get(at)
        .map_or(f64::NEG_INFINITY, |&x| x as f64 - max - sum.ln())
}
