//! The one decoding step. Every generation, the one-sequence engine's as
//! well as the batching scheduler's, is a [`Running`] sequence advanced by
//! [`step`]: sample each sequence that has logits (checking drafted guesses
//! when it speculates), feed the continuing ones through the model together
//! (one read of the weights for all of them), and compute one prefill chunk
//! of the sequence that has waited longest. The engine runs a batch of one.
//!
//! A sequence that speculates feeds its drafted guesses with its token and
//! keeps the positions of the guesses it accepts; the verification rule
//! ([`crate::sampler::Sampler::choose`]) keeps greedy output identical to
//! plain decoding and sampled output identically distributed.

use std::time::Instant;

use lw_core::{FinishReason, GenerationParams, GenerationStats};

use crate::error::EngineError;
use crate::model::Model;
use crate::sampler::Sampler;
use crate::sequence::Sequence;
use crate::speculative::Drafter;
use crate::stop::StopMatcher;
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

/// Where a sequence's text goes.
pub(crate) trait Sink {
    /// Passes released text on; `false` when the receiver is gone (the
    /// sequence is cancelled).
    fn text(&mut self, delta: String) -> bool;
    /// Whether the receiver went away between steps.
    fn closed(&self) -> bool {
        false
    }
}

/// A callback that returns `false` to cancel.
impl<F: FnMut(&str) -> bool> Sink for F {
    fn text(&mut self, delta: String) -> bool {
        self(&delta)
    }
}

enum Phase {
    /// Prompt positions still to compute, from `next`.
    Prefill { next: usize },
    /// `rows[j]` is the next-token distribution after the j-th token fed
    /// last; `drafts[j]` is the guess it checks (none for the last row).
    /// `base` is the sequence's length before that feed.
    Decode {
        rows: Vec<Vec<f32>>,
        drafts: Vec<u32>,
        base: usize,
    },
}

/// A generation in progress: its prompt, its sequence on the model, the
/// sampler's state, its drafter (when it speculates) and where text goes.
pub(crate) struct Running<S> {
    pub(crate) sink: S,
    /// The prompt, then (when the sequence speculates) the tokens taken, as
    /// far as the drafter has seen them.
    history: Vec<u32>,
    prompt_len: usize,
    seq: Sequence,
    drafter: Option<Drafter>,
    phase: Phase,
    decoding: Decoding,
    stats: GenerationStats,
    submitted: Instant,
    decode_start: Option<Instant>,
}

/// How a sequence ended in a step (its index in the batch, and why).
pub(crate) type Ended = (usize, Result<FinishReason, EngineError>);

impl<S: Sink> Running<S> {
    /// Starts `prompt` on `seq`, reusing the prefix it shares. The prompt
    /// was checked ([`Model::check_prompt`]).
    pub(crate) fn new(
        model: &Model,
        prompt: Vec<u32>,
        params: &GenerationParams,
        mut seq: Sequence,
        drafter: Option<Drafter>,
        sink: S,
        submitted: Instant,
    ) -> Self {
        let common = seq.reuse(&prompt);
        let decoding = Decoding::new(params, &prompt, model.id_bound());
        let stats = GenerationStats {
            prompt_tokens: prompt.len(),
            cached_prompt_tokens: common,
            ..Default::default()
        };
        Running {
            sink,
            prompt_len: prompt.len(),
            history: prompt,
            seq,
            drafter,
            phase: Phase::Prefill { next: common },
            decoding,
            stats,
            submitted,
            decode_start: None,
        }
    }

    /// Ends the generation: releases held text (unless it stopped or was
    /// cancelled) and returns the result, the sequence (for prefix reuse)
    /// and the drafter.
    pub(crate) fn finish(
        mut self,
        outcome: Result<FinishReason, EngineError>,
        tok: &Tokenizer,
    ) -> (
        Result<Generation, EngineError>,
        Sequence,
        Option<Drafter>,
        S,
    ) {
        let result = outcome.and_then(|reason| {
            let rest = self.decoding.finish(reason, tok)?;
            if !rest.is_empty() {
                self.sink.text(rest);
            }
            self.stats.generated_tokens = self.decoding.tokens.len();
            self.stats.decode_seconds =
                self.decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
            Ok(Generation {
                text: std::mem::take(&mut self.decoding.text),
                tokens: std::mem::take(&mut self.decoding.tokens),
                finish_reason: reason,
                stats: self.stats.clone(),
            })
        });
        (result, self.seq, self.drafter, self.sink)
    }

    /// Samples from the rows of the last feed; `Ok(None)` to go on.
    fn sample(&mut self, model: &Model) -> Result<Option<FinishReason>, EngineError> {
        let Phase::Decode { rows, drafts, base } = &mut self.phase else {
            return Ok(None);
        };
        if let Some(f) = self.decoding.finished_before_start() {
            return Ok(Some(f));
        }
        let mut kept = 0;
        let mut finish = None;
        for (j, row) in rows.iter_mut().enumerate() {
            let draft = drafts.get(j).copied();
            let (ready, done, is_draft) =
                self.decoding
                    .step_draft(row, model.tokenizer(), model.eos_ids(), draft)?;
            if !ready.is_empty() && !self.sink.text(ready) {
                finish = Some(FinishReason::Cancelled);
                break;
            }
            if done.is_some() {
                finish = done;
                break;
            }
            if !is_draft {
                break;
            }
            kept += 1;
        }
        if !drafts.is_empty() {
            let kept = kept.min(drafts.len());
            self.stats.draft_tokens += drafts.len();
            self.stats.accepted_draft_tokens += kept;
            // Keep the fed token and the accepted guesses; the rest of the
            // pass was computed for tokens that were not taken.
            self.seq.truncate(*base + 1 + kept);
        }
        if finish.is_none() && self.seq.len() + 1 > model.context_length() {
            finish = Some(FinishReason::ContextFull);
        }
        Ok(finish)
    }

    /// The tokens to feed next: the token taken last, then any guesses.
    fn next_feed(&mut self, model: &Model) -> Result<Vec<u32>, EngineError> {
        let mut feed = vec![self.decoding.last_token()];
        // Room for guesses in the context, and in max_tokens after the token
        // fed now and one more from the last row.
        let room = (model.context_length() - self.seq.len() - 1)
            .min(self.decoding.remaining().saturating_sub(1));
        if let Some(drafter) = self.drafter.as_mut() {
            if room > 0 {
                let seen = self.history.len() - self.prompt_len;
                self.history
                    .extend_from_slice(&self.decoding.tokens[seen..]);
                feed.extend(drafter.propose(&self.history, room)?);
            }
        }
        Ok(feed)
    }

    /// Computes the next chunk of the prompt; at its end the first logits.
    fn prefill_chunk(&mut self, model: &Model) -> Result<(), EngineError> {
        let Phase::Prefill { next } = self.phase else {
            return Ok(());
        };
        let end = (next + model.prefill_chunk()).min(self.prompt_len);
        let logits = self
            .seq
            .feed_last(model.model(), &self.history[next..end])?;
        self.phase = if end == self.prompt_len {
            self.stats.prefill_seconds = self.submitted.elapsed().as_secs_f64();
            self.decode_start = Some(Instant::now());
            Phase::Decode {
                rows: vec![logits],
                drafts: Vec::new(),
                base: self.seq.len() - 1,
            }
        } else {
            Phase::Prefill { next: end }
        };
        Ok(())
    }
}

/// One step of every sequence in `active`; returns those that ended.
pub(crate) fn step<S: Sink>(model: &Model, active: &mut [Running<S>]) -> Vec<Ended> {
    let mut ended: Vec<Ended> = Vec::new();
    // One token each: fed together. More (with guesses): fed one by one.
    let mut single: Vec<(usize, u32)> = Vec::new();
    let mut several: Vec<(usize, Vec<u32>)> = Vec::new();
    for (i, r) in active.iter_mut().enumerate() {
        if r.sink.closed() {
            ended.push((i, Ok(FinishReason::Cancelled)));
            continue;
        }
        if !matches!(r.phase, Phase::Decode { .. }) {
            continue;
        }
        match r.sample(model).and_then(|done| match done {
            Some(f) => Ok(Err(f)),
            None => r.next_feed(model).map(Ok),
        }) {
            Err(e) => ended.push((i, Err(e))),
            Ok(Err(f)) => ended.push((i, Ok(f))),
            Ok(Ok(feed)) if feed.len() == 1 => single.push((i, feed[0])),
            Ok(Ok(feed)) => several.push((i, feed)),
        }
    }
    if !single.is_empty() {
        let tokens: Vec<u32> = single.iter().map(|&(_, t)| t).collect();
        let fed = single.iter().map(|&(i, _)| i);
        let seqs = active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| single.iter().any(|(j, _)| j == i))
            .map(|(_, r)| &mut r.seq);
        let mut caches = Sequence::caches(seqs);
        let out = model
            .model()
            .forward_batch(&tokens, &mut caches)
            .and_then(|t| Ok(t.to_vec2::<f32>()?));
        match out {
            Ok(rows) => {
                for ((i, row), t) in fed.zip(rows).zip(tokens) {
                    let r = &mut active[i];
                    let base = r.seq.len();
                    r.seq.push_computed(t);
                    r.phase = Phase::Decode {
                        rows: vec![row],
                        drafts: Vec::new(),
                        base,
                    };
                }
            }
            Err(e) => ended.extend(fed.map(|i| (i, Err(EngineError::Step(e.to_string()))))),
        }
    }
    for (i, feed) in several {
        let r = &mut active[i];
        let base = r.seq.len();
        match r.seq.feed_all(model.model(), &feed) {
            Ok(rows) => {
                r.phase = Phase::Decode {
                    rows,
                    drafts: feed[1..].to_vec(),
                    base,
                }
            }
            Err(e) => ended.push((i, Err(e))),
        }
    }
    // One prefill chunk, for the sequence that has waited longest.
    if let Some((i, r)) = active
        .iter_mut()
        .enumerate()
        .filter(|(i, _)| !ended.iter().any(|(e, _)| e == i))
        .find(|(_, r)| matches!(r.phase, Phase::Prefill { .. }))
    {
        if let Err(e) = r.prefill_chunk(model) {
            ended.push((i, Err(e)));
        }
    }
    ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
    ended.dedup_by_key(|(i, _)| *i);
    ended
}

/// The per-sequence side of decoding: sampling, end conditions, text
/// assembly (whole characters only) and stop strings.
struct Decoding {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    text: String,
    tokens: Vec<u32>,
    seen: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
}

impl Decoding {
    fn new(params: &GenerationParams, prompt: &[u32], id_bound: usize) -> Self {
        Decoding {
            sampler: Sampler::new(params.sampling.clone(), id_bound),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            text: String::new(),
            tokens: Vec::new(),
            seen: if params.sampling.repetition_penalty != 1.0 {
                prompt.to_vec()
            } else {
                Vec::new()
            },
            max_tokens: params.max_tokens.unwrap_or(usize::MAX),
            ignore_eos: params.ignore_eos,
        }
    }

    /// `Length` when no token may be generated at all.
    fn finished_before_start(&self) -> Option<FinishReason> {
        (self.max_tokens == 0).then_some(FinishReason::Length)
    }

    /// Samples the next token from `logits` (given a drafted guess for it)
    /// and takes it: returns the text it releases, why the sequence ends
    /// here (if it does) and whether the token taken is the draft.
    fn step_draft(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        eos: &[u32],
        draft: Option<u32>,
    ) -> Result<(String, Option<FinishReason>, bool), EngineError> {
        let (next, is_draft) = self.sampler.choose(logits, &self.seen, draft);
        let (ready, done) = self.take(next, tok, eos)?;
        Ok((ready, done, is_draft))
    }

    /// Tokens that may still be generated.
    fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.tokens.len())
    }

    fn take(
        &mut self,
        next: u32,
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<(String, Option<FinishReason>), EngineError> {
        if !self.ignore_eos && eos.contains(&next) {
            return Ok((String::new(), Some(FinishReason::Stop)));
        }
        self.tokens.push(next);
        self.seen.push(next);
        let mut ready = String::new();
        if let Some(delta) = self.decoder.push(tok, next)? {
            let (r, hit) = self.stops.push(&delta);
            self.text.push_str(&r);
            ready = r;
            if hit {
                return Ok((ready, Some(FinishReason::Stop)));
            }
        }
        if self.tokens.len() >= self.max_tokens {
            return Ok((ready, Some(FinishReason::Length)));
        }
        Ok((ready, None))
    }

    /// The token taken last (the next one to feed the model).
    fn last_token(&self) -> u32 {
        *self.tokens.last().expect("a token was taken")
    }

    /// Text still held when the sequence ends for a reason other than a stop
    /// or a cancel (a partial character or a partial stop-string match).
    fn finish(&mut self, reason: FinishReason, tok: &Tokenizer) -> Result<String, EngineError> {
        if reason == FinishReason::Stop || reason == FinishReason::Cancelled {
            return Ok(String::new());
        }
        let mut rest = String::new();
        if let Some(held) = self.decoder.finish(tok)? {
            let (ready, hit) = self.stops.push(&held);
            rest.push_str(&ready);
            if hit {
                self.stops.flush();
            }
        }
        rest.push_str(&self.stops.flush());
        self.text.push_str(&rest);
        Ok(rest)
    }
}
