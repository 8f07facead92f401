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
//!
//! The step is the engine's ([`crate::decode::step`]): a sequence may
//! speculate (draft model or prompt lookup, set on the engine the scheduler
//! starts with, per request unless it opts out), feeding its guesses beside
//! the other sequences' single tokens.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;

use lw_core::GenerationParams;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use crate::decode::Generation;
use crate::decode::{self, Running, Sink};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::model::Model;
use crate::sequence::Sequence;
use crate::speculative::{Drafter, Speculation};

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

/// Running and waiting counts, and the generations finished so far (ended
/// in any way, a client's disconnect included), for health checks and tests.
#[derive(Debug, Default)]
pub struct Load {
    pub waiting: AtomicUsize,
    pub running: AtomicUsize,
    pub finished: std::sync::atomic::AtomicU64,
}

/// A handle to the scheduler thread. Cloning shares the scheduler.
#[derive(Clone)]
pub struct Batcher {
    model: Arc<Model>,
    speculation: Option<Speculation>,
    jobs: mpsc::Sender<Job>,
    load: Arc<Load>,
    max_queue: usize,
}

impl Batcher {
    /// Starts the scheduler thread over `engine`'s model, speculating as
    /// the engine does.
    pub fn start(engine: Engine, opts: BatchOptions) -> Self {
        let model = engine.shared().clone();
        let speculation = engine.speculation().cloned();
        let (jobs, rx) = mpsc::channel();
        let load = Arc::new(Load::default());
        let worker = Scheduler {
            model: model.clone(),
            speculation: speculation.clone(),
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
            model,
            speculation,
            jobs,
            load,
            max_queue: opts.max_queue,
        }
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    /// Whether sequences speculate (unless a request opts out).
    pub fn speculates(&self) -> bool {
        self.speculation.is_some()
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

/// A sequence between requests, kept for prefix reuse, with its drafter.
struct Slot {
    seq: Sequence,
    drafter: Option<Drafter>,
}

/// A request's receiver: deltas go there; a dropped receiver cancels.
struct JobSink {
    tx: UnboundedSender<BatchEvent>,
}

impl Sink for JobSink {
    fn text(&mut self, delta: &str) -> bool {
        self.tx.send(BatchEvent::Delta(delta.to_owned())).is_ok()
    }
    fn closed(&self) -> bool {
        self.tx.is_closed()
    }
}

struct Scheduler {
    model: Arc<Model>,
    speculation: Option<Speculation>,
    opts: BatchOptions,
    load: Arc<Load>,
    waiting: VecDeque<Job>,
    active: Vec<Running<JobSink>>,
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
            if let Err(e) = self.model.check_prompt(&job.prompt) {
                let _ = job.tx.send(BatchEvent::Done(Err(e)));
                continue;
            }
            let guide = match job.params.constraint.as_ref().map(|c| self.model.guide(c)) {
                Some(Err(e)) => {
                    let _ = job.tx.send(BatchEvent::Done(Err(e)));
                    continue;
                }
                guide => guide.and_then(Result::ok),
            };
            let slot = self.take_slot(&job.prompt);
            let drafter =
                Speculation::drafter_for(self.speculation.as_ref(), &job.params, slot.drafter);
            let sink = JobSink { tx: job.tx };
            self.active.push(
                Running::new(
                    &self.model,
                    job.prompt,
                    &job.params,
                    slot.seq,
                    drafter,
                    sink,
                    job.submitted,
                )
                .with_guide(guide),
            );
        }
        self.load.running.store(self.active.len(), Ordering::SeqCst);
    }

    /// The idle sequence sharing the longest prefix with `prompt`, or a new one.
    fn take_slot(&mut self, prompt: &[u32]) -> Slot {
        let best = self
            .idle
            .iter()
            .enumerate()
            .max_by_key(|(i, s)| (s.seq.shared_prefix(prompt), *i))
            .map(|(i, _)| i);
        match best {
            Some(i) => self.idle.remove(i),
            None => Slot {
                seq: self.model.new_sequence(),
                drafter: None,
            },
        }
    }

    fn release(&mut self, slot: Slot) {
        self.idle.push(slot);
        // The oldest idle sequence goes first.
        while self.idle.len() > self.opts.idle_caches {
            self.idle.remove(0);
        }
    }

    /// One step of the batch; ended sequences report and free their slots.
    fn step(&mut self) {
        let model = self.model.clone();
        for (i, outcome) in decode::step(&model, &mut self.active) {
            let r = self.active.swap_remove(i);
            let (result, seq, drafter, sink) = r.finish(outcome, model.tokenizer());
            let _ = sink.tx.send(BatchEvent::Done(result));
            self.release(Slot { seq, drafter });
            self.load.finished.fetch_add(1, Ordering::SeqCst);
        }
        self.load.running.store(self.active.len(), Ordering::SeqCst);
    }
}
