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
use lw_model::Logits;

use crate::error::EngineError;
use crate::grammar::Guide;
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
    fn text(&mut self, delta: &str) -> bool;
    /// Whether the receiver went away between steps.
    fn closed(&self) -> bool {
        false
    }
}

/// A callback that returns `false` to cancel.
impl<F: FnMut(&str) -> bool> Sink for F {
    fn text(&mut self, delta: &str) -> bool {
        self(delta)
    }
}

enum Phase {
    /// Prompt positions still to compute, from `next`.
    Prefill { next: usize },
    /// The sequence's `logits` hold `rows` rows: row `j` is the next-token
    /// distribution after the j-th token fed last, and `drafts[j]` the
    /// guess it checks (none for the last row). `base` is the sequence's
    /// length before that feed.
    Decode { rows: usize, base: usize },
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
    /// The logits of the last feed (`[rows, vocab]`), the guesses fed with
    /// its token, and what the step feeds next (when `feeding`): buffers
    /// kept for the whole generation, so a decoded token allocates none.
    logits: Vec<f32>,
    drafts: Vec<u32>,
    feed: Vec<u32>,
    feeding: bool,
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
        let mut decoding = Decoding::new(params, &prompt, model.id_bound());
        if params.sampling.dry_multiplier > 0.0 {
            let breakers = model.dry_breakers(&params.sampling.dry_sequence_breakers);
            decoding.sampler.set_breakers(breakers);
        }
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
            logits: Vec::new(),
            drafts: Vec::new(),
            feed: Vec::new(),
            feeding: false,
            decoding,
            stats,
            submitted,
            decode_start: None,
        }
    }

    /// Decodes under `guide` (structured decoding), when there is one.
    pub(crate) fn with_guide(mut self, guide: Option<Guide>) -> Self {
        self.decoding.guide = guide;
        self
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
                self.sink.text(&rest);
            }
            self.stats.generated_tokens = self.decoding.tokens.len();
            if let Some(g) = &self.decoding.guide {
                self.stats.mask_seconds = g.seconds;
                self.stats.mask_compute_seconds = g.compute_seconds;
            }
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
        let Phase::Decode { rows, base } = self.phase else {
            return Ok(None);
        };
        if let Some(f) = self.decoding.finished_before_start() {
            return Ok(Some(f));
        }
        let mut kept = 0;
        let mut finish = None;
        let width = self.logits.len() / rows;
        for (j, row) in self.logits.chunks_exact_mut(width).enumerate() {
            let draft = self.drafts.get(j).copied();
            let (done, is_draft) =
                self.decoding
                    .step_draft(row, model.tokenizer(), model.eos_ids(), draft)?;
            let ready = &self.decoding.ready;
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
        if !self.drafts.is_empty() {
            let kept = kept.min(self.drafts.len());
            self.stats.draft_tokens += self.drafts.len();
            self.stats.accepted_draft_tokens += kept;
            // Keep the fed token and the accepted guesses; the rest of the
            // pass was computed for tokens that were not taken.
            self.seq.truncate(base + 1 + kept);
        }
        if finish.is_none() && self.seq.len() + 1 > model.context_length() {
            finish = Some(FinishReason::ContextFull);
        }
        Ok(finish)
    }

    /// Sets `feed` to the tokens to feed next: the token taken last, then
    /// any guesses.
    fn next_feed(&mut self, model: &Model) -> Result<(), EngineError> {
        self.feed.clear();
        self.feed.push(self.decoding.last_token());
        // Room for guesses in the context, and in max_tokens after the token
        // fed now and one more from the last row.
        let room = (model.context_length() - self.seq.len() - 1)
            .min(self.decoding.remaining().saturating_sub(1));
        if let Some(drafter) = self.drafter.as_mut() {
            if room > 0 {
                let seen = self.history.len() - self.prompt_len;
                self.history
                    .extend_from_slice(&self.decoding.tokens[seen..]);
                self.feed.extend(drafter.propose(&self.history, room)?);
            }
        }
        Ok(())
    }

    /// Feeds `feed` through the model on its own (guesses included).
    fn feed_alone(&mut self, model: &Model) -> Result<(), EngineError> {
        let base = self.seq.len();
        let rows = self
            .seq
            .feed(model.model(), &self.feed, Logits::All, &mut self.logits)?;
        self.drafts.clear();
        self.drafts.extend_from_slice(&self.feed[1..]);
        self.phase = Phase::Decode { rows, base };
        Ok(())
    }

    /// Computes the next chunk of the prompt; at its end the first logits.
    fn prefill_chunk(&mut self, model: &Model) -> Result<(), EngineError> {
        let Phase::Prefill { next } = self.phase else {
            return Ok(());
        };
        let end = (next + model.prefill_chunk()).min(self.prompt_len);
        self.seq.feed(
            model.model(),
            &self.history[next..end],
            Logits::Last,
            &mut self.logits,
        )?;
        self.phase = if end == self.prompt_len {
            self.stats.prefill_seconds = self.submitted.elapsed().as_secs_f64();
            self.decode_start = Some(Instant::now());
            self.drafts.clear();
            Phase::Decode {
                rows: 1,
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
    let mut singles = 0;
    for (i, r) in active.iter_mut().enumerate() {
        r.feeding = false;
        if r.sink.closed() {
            ended.push((i, Ok(FinishReason::Cancelled)));
            continue;
        }
        if !matches!(r.phase, Phase::Decode { .. }) {
            continue;
        }
        match r.sample(model).and_then(|done| match done {
            Some(f) => Ok(Some(f)),
            None => r.next_feed(model).map(|()| None),
        }) {
            Err(e) => ended.push((i, Err(e))),
            Ok(Some(f)) => ended.push((i, Ok(f))),
            Ok(None) => {
                r.feeding = true;
                singles += usize::from(r.feed.len() == 1);
            }
        }
    }
    // One token each: fed together (one read of the weights for all).
    // More (with guesses), or a single one alone: fed on their own.
    if singles > 1 {
        feed_together(model, active, &mut ended);
    }
    for (i, r) in active.iter_mut().enumerate() {
        if r.feeding {
            r.feeding = false;
            if let Err(e) = r.feed_alone(model) {
                ended.push((i, Err(e)));
            }
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

/// Feeds the sequences that feed one token this step through the model
/// together, and marks them fed.
fn feed_together<S: Sink>(model: &Model, active: &mut [Running<S>], ended: &mut Vec<Ended>) {
    let together = |r: &Running<S>| r.feeding && r.feed.len() == 1;
    let fed: Vec<usize> = (0..active.len())
        .filter(|&i| together(&active[i]))
        .collect();
    let tokens: Vec<u32> = fed.iter().map(|&i| active[i].feed[0]).collect();
    // The step's logits (`[sequences, vocab]`), in a buffer kept for the
    // next step: megabytes for a large batch.
    let mut out = BATCH_LOGITS.take();
    let mut caches = Sequence::caches(
        active
            .iter_mut()
            .filter(|r| together(r))
            .map(|r| &mut r.seq),
    );
    let result = model
        .model()
        .forward_batch_into(&tokens, &mut caches, &mut out);
    drop(caches);
    let width = out.len() / fed.len().max(1);
    for (n, &i) in fed.iter().enumerate() {
        let r = &mut active[i];
        r.feeding = false;
        match &result {
            Ok(()) => {
                let base = r.seq.len();
                r.seq.push_computed(tokens[n]);
                r.logits.clear();
                r.logits.extend_from_slice(&out[n * width..(n + 1) * width]);
                r.drafts.clear();
                r.phase = Phase::Decode { rows: 1, base };
            }
            Err(e) => ended.push((i, Err(EngineError::Step(e.to_string())))),
        }
    }
    BATCH_LOGITS.set(out);
}

thread_local! {
    static BATCH_LOGITS: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Whether `text` ends a sentence or a paragraph (closing quotes and
/// brackets after the mark included).
fn at_boundary(text: &str) -> bool {
    if text.ends_with('\n') {
        return !text.trim().is_empty();
    }
    let t = text.trim_end_matches([' ', '"', '\'', '”', '’', ')', '」', '』', '*']);
    t.ends_with(['.', '!', '?', '。', '！', '？', '…'])
}

/// The per-sequence side of decoding: sampling, end conditions, text
/// assembly (whole characters only) and stop strings.
struct Decoding {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    /// The text the last token released (after stop strings), and the
    /// decoder's delta before them: buffers reused token after token.
    ready: String,
    delta: String,
    text: String,
    tokens: Vec<u32>,
    seen: Vec<u32>,
    max_tokens: usize,
    /// End-of-sequence ids are masked until this many tokens are taken.
    min_tokens: usize,
    ignore_eos: bool,
    /// Past this many tokens, an end-of-sequence token is forced at the
    /// next sentence or paragraph end.
    end_after: usize,
    /// The grammar the output follows (structured decoding).
    guide: Option<Guide>,
    /// The grammar is complete: the generation stopped there, with all of
    /// its text (none of it was a stop string).
    complete: bool,
}

impl Decoding {
    fn new(params: &GenerationParams, prompt: &[u32], id_bound: usize) -> Self {
        Decoding {
            sampler: Sampler::new(params.sampling.clone(), id_bound),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            ready: String::new(),
            delta: String::new(),
            text: String::new(),
            tokens: Vec::new(),
            seen: if params.sampling.repetition_penalty != 1.0
                || params.sampling.dry_multiplier > 0.0
            {
                prompt.to_vec()
            } else {
                Vec::new()
            },
            max_tokens: params.max_tokens.unwrap_or(usize::MAX),
            min_tokens: params.min_tokens,
            ignore_eos: params.ignore_eos,
            end_after: params.end_after.unwrap_or(usize::MAX),
            guide: None,
            complete: false,
        }
    }

    /// `Length` when no token may be generated at all.
    fn finished_before_start(&self) -> Option<FinishReason> {
        (self.max_tokens == 0).then_some(FinishReason::Length)
    }

    /// Samples the next token from `logits` (given a drafted guess for it)
    /// and takes it: the text it releases is in `ready`; returns why the
    /// sequence ends here (if it does) and whether the token taken is the
    /// draft.
    fn step_draft(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        eos: &[u32],
        draft: Option<u32>,
    ) -> Result<(Option<FinishReason>, bool), EngineError> {
        let early = self.tokens.len() < self.min_tokens;
        // Length control: the budget is spent and a sentence just ended;
        // end here (under a grammar, where it may end here).
        let push_end =
            self.tokens.len() >= self.end_after && !eos.is_empty() && at_boundary(&self.text);
        let end = match self.guide.as_mut() {
            Some(guide) => {
                guide.mask(logits, eos, early && !push_end)?;
                eos.iter()
                    .copied()
                    .find(|&e| logits.get(e as usize).is_some_and(|l| l.is_finite()))
                    .filter(|_| push_end)
            }
            None => {
                if early {
                    for &e in eos {
                        if let Some(l) = logits.get_mut(e as usize) {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
                push_end.then_some(eos[0])
            }
        };
        if let Some(end) = end.map(|e| e as usize).filter(|&e| e < logits.len()) {
            for (i, l) in logits.iter_mut().enumerate() {
                if i != end {
                    *l = f32::NEG_INFINITY;
                }
            }
            logits[end] = 0.0;
        }
        let (next, is_draft) = self.sampler.choose(logits, &self.seen, draft);
        let done = self.take(next, tok, eos)?;
        Ok((done, is_draft))
    }

    /// Tokens that may still be generated.
    fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.tokens.len())
    }

    /// Takes token `next`: the text it releases goes to `ready`.
    fn take(
        &mut self,
        next: u32,
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<Option<FinishReason>, EngineError> {
        self.ready.clear();
        if !self.ignore_eos && eos.contains(&next) {
            return Ok(Some(FinishReason::Stop));
        }
        self.tokens.push(next);
        self.seen.push(next);
        self.sampler.observe(next);
        let complete = match self.guide.as_mut() {
            Some(guide) => guide.take(next)?,
            None => false,
        };
        self.delta.clear();
        if self.decoder.push(tok, next, &mut self.delta)? {
            let hit = self.stops.push(&self.delta, &mut self.ready);
            self.text.push_str(&self.ready);
            if hit {
                return Ok(Some(FinishReason::Stop));
            }
        }
        if complete {
            // Nothing may follow: the text is whole (what the stop matcher
            // still holds is released by `finish`).
            self.complete = true;
            return Ok(Some(FinishReason::Stop));
        }
        if self.tokens.len() >= self.max_tokens {
            return Ok(Some(FinishReason::Length));
        }
        Ok(None)
    }

    /// The token taken last (the next one to feed the model).
    fn last_token(&self) -> u32 {
        *self.tokens.last().expect("a token was taken")
    }

    /// Text still held when the sequence ends for a reason other than a stop
    /// or a cancel (a partial character or a partial stop-string match).
    fn finish(&mut self, reason: FinishReason, tok: &Tokenizer) -> Result<String, EngineError> {
        let cut = reason == FinishReason::Stop && !self.complete;
        if cut || reason == FinishReason::Cancelled {
            return Ok(String::new());
        }
        let mut rest = String::new();
        let mut held = String::new();
        if self.decoder.finish(tok, &mut held)? && self.stops.push(&held, &mut rest) {
            self.stops.flush();
        }
        rest.push_str(&self.stops.flush());
        self.text.push_str(&rest);
        Ok(rest)
    }
}
