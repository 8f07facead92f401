//! Continuous batching: many generations share one model. Sequences join
//! and leave the running batch at token boundaries; each decoding step feeds
//! one token of every running sequence through the model together, so the
//! weights are read once per step rather than once per sequence.
//!
//! A new request is prefilled one chunk per step beside the decoding ones (a
//! long prompt does not stall everyone else), on a KV cache that already
//! holds the longest common prefix if an idle one does. Positions compute
//! to the same bits however they are grouped, so a request's output does not
//! depend on what else runs with it.
//!
//! The scheduler runs on a thread of its own; callers submit a prompt and
//! receive its text deltas and result on a channel. A caller that drops its
//! receiver cancels its sequence, whose slot frees at the next step.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use lw_core::{FinishReason, GenerationParams, GenerationStats};
use lw_model::{KvCache, Logits};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::engine::{common_prefix, Decoding, Engine, Generation};
use crate::error::EngineError;

/// Limits of the scheduler.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Sequences decoding together.
    pub max_batch: usize,
    /// Requests waiting for a place in the batch before new ones are refused.
    pub max_queue: usize,
    /// Idle KV caches kept for prefix reuse.
    pub idle_caches: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        BatchOptions {
            max_batch: 16,
            max_queue: 64,
            idle_caches: 16,
        }
    }
}

/// What a submitted request receives.
#[derive(Debug)]
pub enum BatchEvent {
    /// Newly released text (whole characters, stop strings held back).
    Delta(String),
    /// The end: the whole generation, or what went wrong.
    Done(Result<Generation, EngineError>),
}

/// The queue is full: try again later.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error(
    "the server is busy: {waiting} requests are already waiting (limit {limit}); retry shortly"
)]
pub struct Busy {
    pub waiting: usize,
    pub limit: usize,
}

struct Job {
    prompt: Vec<u32>,
    params: GenerationParams,
    tx: UnboundedSender<BatchEvent>,
    submitted: Instant,
}

/// Running and waiting counts, for health checks and tests.
#[derive(Debug, Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
}

/// A handle to the scheduler thread. Cloning shares the scheduler.
#[derive(Clone)]
pub struct Batcher {
    engine: Arc<Engine>,
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
    max_queue: usize,
}

impl Batcher {
    /// Starts the scheduler thread over `engine`.
    pub fn start(engine: Arc<Engine>, opts: BatchOptions) -> Self {
        let (jobs, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let worker = Scheduler {
            engine: engine.clone(),
            opts: opts.clone(),
            load: load.clone(),
            waiting: VecDeque::new(),
            active: Vec::new(),
            idle: Vec::new(),
        };
        std::thread::Builder::new()
            .name("longwriter-batch".into())
            .spawn(move || worker.run(rx))
            .expect("spawning the scheduler thread");
        Batcher {
            engine,
            jobs,
            load,
            max_queue: opts.max_queue,
        }
    }

    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn load(&self) -> &Load {
        &self.load
    }

    /// Queues a generation. Prompt errors (empty, too long) arrive as the
    /// `Done` event; a full queue is refused here.
    pub fn submit(
        &self,
        prompt: Vec<u32>,
        params: GenerationParams,
    ) -> Result<UnboundedReceiver<BatchEvent>, Busy> {
        let waiting = self.load.waiting.fetch_add(1, Ordering::SeqCst);
        if waiting >= self.max_queue {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(Busy {
                waiting,
                limit: self.max_queue,
            });
        }
        let (tx, rx) = unbounded_channel();
        let job = Job {
            prompt,
            params,
            tx,
            submitted: Instant::now(),
        };
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = job.tx.send(BatchEvent::Done(Err(EngineError::Stopped)));
        }
        Ok(rx)
    }

    /// Runs a generation to the end on the calling (blocking) thread,
    /// passing deltas to `on_text`; `false` from it cancels.
    pub fn generate_blocking(
        &self,
        prompt: Vec<u32>,
        params: GenerationParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Result<Generation, EngineError>, Busy> {
        let mut rx = self.submit(prompt, params)?;
        while let Some(event) = rx.blocking_recv() {
            match event {
                BatchEvent::Delta(d) => {
                    if !on_text(&d) {
                        // Dropping the receiver cancels the sequence.
                        return Ok(Err(EngineError::Cancelled));
                    }
                }
                BatchEvent::Done(result) => return Ok(result),
            }
        }
        Ok(Err(EngineError::Stopped))
    }
}

struct Slot {
    cache: KvCache,
    /// Tokens whose keys and values the cache holds, in order.
    cached: Vec<u32>,
}

enum Phase {
    /// Prompt positions still to compute, from `next`.
    Prefill { next: usize },
    /// Logits of the next token are ready.
    Decode { logits: Vec<f32> },
}

struct Running {
    job: Job,
    slot: Slot,
    phase: Phase,
    decoding: Decoding,
    stats: GenerationStats,
    decode_start: Option<Instant>,
}

struct Scheduler {
    engine: Arc<Engine>,
    opts: BatchOptions,
    load: Arc<Load>,
    waiting: VecDeque<Job>,
    active: Vec<Running>,
    idle: Vec<Slot>,
}

impl Scheduler {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        loop {
            if self.active.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(job) => self.waiting.push_back(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.waiting.push_back(job);
            }
            self.admit();
            self.step();
        }
    }

    /// Moves waiting jobs into the batch while there is room.
    fn admit(&mut self) {
        while self.active.len() < self.opts.max_batch.max(1) {
            let Some(job) = self.waiting.pop_front() else {
                break;
            };
            self.load.waiting.fetch_sub(1, Ordering::SeqCst);
            if job.tx.is_closed() {
                continue;
            }
            if let Err(e) = self.engine.check_prompt(&job.prompt) {
                let _ = job.tx.send(BatchEvent::Done(Err(e)));
                continue;
            }
            let mut slot = self.take_slot(&job.prompt);
            // At least one prompt position is computed, for its logits.
            let common = common_prefix(&slot.cached, &job.prompt).min(job.prompt.len() - 1);
            slot.cache.truncate(common);
            slot.cached.truncate(common);
            let decoding = Decoding::new(&job.params, &job.prompt, self.engine.id_bound());
            let stats = GenerationStats {
                prompt_tokens: job.prompt.len(),
                cached_prompt_tokens: common,
                ..Default::default()
            };
            self.active.push(Running {
                job,
                slot,
                phase: Phase::Prefill { next: common },
                decoding,
                stats,
                decode_start: None,
            });
        }
        self.load.running.store(self.active.len(), Ordering::SeqCst);
    }

    /// The idle cache sharing the longest prefix with `prompt`, or a new one.
    fn take_slot(&mut self, prompt: &[u32]) -> Slot {
        let best = self
            .idle
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (common_prefix(&s.cached, prompt), *i))
            .map(|(i, _)| i);
        match best {
            Some(i) => self.idle.remove(i),
            None => Slot {
                cache: self.engine.model().new_cache(),
                cached: Vec::new(),
            },
        }
    }

    fn release(&mut self, slot: Slot) {
        self.idle.push(slot);
        // The oldest idle cache goes first.
        while self.idle.len() > self.opts.idle_caches {
            self.idle.remove(0);
        }
    }

    /// One step: sample every sequence with logits, feed the continuing ones
    /// through the model together, and advance one prefill by a chunk.
    fn step(&mut self) {
        let engine = self.engine.clone();
        let tok = engine.tokenizer();
        let mut ended: Vec<(usize, Result<FinishReason, EngineError>)> = Vec::new();
        let mut feed: Vec<usize> = Vec::new();
        for (i, r) in self.active.iter_mut().enumerate() {
            if r.job.tx.is_closed() {
                ended.push((i, Ok(FinishReason::Cancelled)));
                continue;
            }
            let Phase::Decode { logits } = &mut r.phase else {
                continue;
            };
            if let Some(f) = r.decoding.finished_before_start() {
                ended.push((i, Ok(f)));
                continue;
            }
            match r.decoding.step(logits, tok, engine.eos_ids()) {
                Err(e) => ended.push((i, Err(e))),
                Ok((ready, done)) => {
                    if !ready.is_empty() && r.job.tx.send(BatchEvent::Delta(ready)).is_err() {
                        ended.push((i, Ok(FinishReason::Cancelled)));
                    } else if let Some(f) = done {
                        ended.push((i, Ok(f)));
                    } else if r.slot.cache.len() + 1 > engine.context_length() {
                        ended.push((i, Ok(FinishReason::ContextFull)));
                    } else {
                        feed.push(i);
                    }
                }
            }
        }
        if !feed.is_empty() {
            let tokens: Vec<u32> = feed
                .iter()
                .map(|&i| self.active[i].decoding.last_token())
                .collect();
            let mut caches: Vec<&mut KvCache> = Vec::with_capacity(feed.len());
            for (i, r) in self.active.iter_mut().enumerate() {
                if feed.contains(&i) {
                    caches.push(&mut r.slot.cache);
                }
            }
            match engine.model().forward_batch(&tokens, &mut caches) {
                Ok(out) => match out.to_vec2::<f32>() {
                    Ok(rows) => {
                        for ((&i, row), &t) in feed.iter().zip(rows).zip(&tokens) {
                            let r = &mut self.active[i];
                            r.slot.cached.push(t);
                            r.phase = Phase::Decode { logits: row };
                        }
                    }
                    Err(e) => {
                        ended.extend(
                            feed.iter()
                                .map(|&i| (i, Err(EngineError::Step(e.to_string())))),
                        );
                    }
                },
                Err(e) => {
                    ended.extend(
                        feed.iter()
                            .map(|&i| (i, Err(EngineError::Step(e.to_string())))),
                    );
                }
            }
        }
        // One prefill chunk, for the sequence that has waited longest.
        let chunk = engine.prefill_chunk();
        if let Some((i, r)) = self
            .active
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| !ended.iter().any(|(e, _)| e == i))
            .find(|(_, r)| matches!(r.phase, Phase::Prefill { .. }))
        {
            let Phase::Prefill { next } = r.phase else {
                unreachable!()
            };
            let end = (next + chunk).min(r.job.prompt.len());
            let part = &r.job.prompt[next..end];
            match engine
                .model()
                .forward(part, &mut r.slot.cache, Logits::Last)
            {
                Ok(out) => {
                    r.slot.cached.extend_from_slice(part);
                    if end == r.job.prompt.len() {
                        match lw_model::llama::last_row(&out) {
                            Ok(logits) => {
                                r.stats.prefill_seconds = r.job.submitted.elapsed().as_secs_f64();
                                r.decode_start = Some(Instant::now());
                                r.phase = Phase::Decode { logits };
                            }
                            Err(e) => ended.push((i, Err(e.into()))),
                        }
                    } else {
                        r.phase = Phase::Prefill { next: end };
                    }
                }
                Err(e) => ended.push((i, Err(e.into()))),
            }
        }
        ended.sort_by_key(|(i, _)| std::cmp::Reverse(*i));
        ended.dedup_by_key(|(i, _)| *i);
        for (i, outcome) in ended {
            let mut r = self.active.swap_remove(i);
            let result = outcome.and_then(|reason| {
                let rest = r.decoding.finish(reason, tok)?;
                if !rest.is_empty() {
                    let _ = r.job.tx.send(BatchEvent::Delta(rest));
                }
                r.stats.generated_tokens = r.decoding.tokens.len();
                r.stats.decode_seconds = r.decode_start.map_or(0.0, |t| t.elapsed().as_secs_f64());
                Ok(Generation {
                    text: std::mem::take(&mut r.decoding.text),
                    tokens: std::mem::take(&mut r.decoding.tokens),
                    finish_reason: reason,
                    stats: r.stats.clone(),
                })
            });
            let _ = r.job.tx.send(BatchEvent::Done(result));
            self.release(r.slot);
        }
        self.load.running.store(self.active.len(), Ordering::SeqCst);
    }
}
