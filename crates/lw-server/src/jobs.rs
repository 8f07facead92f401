//! Long-writing jobs: the same AgentWrite runs as `longwriter write`, each on
//! a thread of its own, reaching the model through the batching scheduler and
//! keeping their state in the job store. Live progress goes out as events;
//! a subscriber first gets a snapshot, then every event after it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use lw_core::Counter;
use lw_engine::Batcher;
use lw_write::{BatchedModel, Event, Plan, WriteError, WriteOptions};
use tokio::sync::broadcast;

use crate::job_wire::{Current, Job, JobEvent, JobUsage, Numbered, PlanPoint, Section};

use crate::store::{JobRow, JobRun, JobStore, Status, StoreError};

/// Live state of a running job.
struct Live {
    stop: AtomicBool,
    events: broadcast::Sender<Numbered>,
    /// Event sequence number and the text of the section being written.
    progress: Mutex<Progress>,
}

#[derive(Default)]
pub struct Progress {
    seq: u64,
    section: Option<usize>,
    partial: String,
}

impl Progress {
    /// The section being written and its text, after `event`.
    fn advance(&mut self, event: &JobEvent) {
        match event {
            JobEvent::SectionStart { index, .. } => {
                self.section = Some(*index);
                self.partial.clear();
            }
            JobEvent::Delta { text, .. } => self.partial.push_str(text),
            JobEvent::SectionRetry { .. } => self.partial.clear(),
            JobEvent::SectionDone { .. } => {
                self.section = None;
                self.partial.clear();
            }
            _ => {}
        }
    }
}

pub struct Jobs {
    store: Arc<JobStore>,
    batcher: Batcher,
    model_name: String,
    counter: Counter,
    live: Mutex<HashMap<String, Arc<Live>>>,
}

/// What a subscriber gets: the job as it stands and the events after it.
pub struct Subscription {
    pub snapshot: Job,
    pub events: Option<broadcast::Receiver<Numbered>>,
}

impl Jobs {
    pub fn new(store: Arc<JobStore>, batcher: Batcher, model_name: String) -> Arc<Self> {
        Arc::new(Jobs {
            store,
            batcher,
            model_name,
            counter: Counter::Unicode,
            live: Mutex::new(HashMap::new()),
        })
    }

    pub fn store(&self) -> &JobStore {
        &self.store
    }

    /// Starts every job that was queued or running when the server stopped.
    pub fn resume_open(self: &Arc<Self>) -> Result<usize, StoreError> {
        let open = self.store.open_jobs()?;
        for id in &open {
            self.spawn(id.clone());
        }
        Ok(open.len())
    }

    /// Jobs of `owner` that are queued or running.
    pub fn open_count(&self, owner: &str) -> usize {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        live.keys()
            .filter(|id| {
                self.store
                    .get(id)
                    .ok()
                    .flatten()
                    .is_some_and(|j| j.owner == owner && j.status.is_open())
            })
            .count()
    }

    /// Stores a new job and starts it.
    pub fn submit(
        self: &Arc<Self>,
        id: String,
        owner: &str,
        created: u64,
        request: &lw_write::Request,
        plan: Option<&Plan>,
    ) -> Result<(), StoreError> {
        self.store.create(&id, owner, created, request, plan)?;
        self.spawn(id);
        Ok(())
    }

    /// Asks a running job to stop after saving what is finished.
    pub fn cancel(&self, id: &str) -> bool {
        let live = self.live.lock().unwrap_or_else(|p| p.into_inner());
        match live.get(id) {
            Some(l) => {
                l.stop.store(true, Ordering::SeqCst);
                true
            }
            None => false,
        }
    }

    pub fn subscribe(&self, job: &JobRow) -> Result<Subscription, StoreError> {
        let live = self
            .live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&job.id)
            .cloned();
        let sections = self.store.sections(&job.id)?;
        match live {
            None => Ok(Subscription {
                snapshot: self.describe(job, &sections, None),
                events: None,
            }),
            Some(l) => {
                // Under the progress lock no event is sent: the snapshot and
                // the subscription start at the same point.
                let p = l.progress.lock().unwrap_or_else(|p| p.into_inner());
                let job = self.store.get(&job.id)?.unwrap_or_else(|| job.clone());
                let sections = self.store.sections(&job.id)?;
                let mut snap = self.describe(&job, &sections, Some(&p));
                snap.seq = Some(p.seq);
                Ok(Subscription {
                    snapshot: snap,
                    events: Some(l.events.subscribe()),
                })
            }
        }
    }

    /// The job: request, state, plan, finished sections, figures.
    pub fn describe(
        &self,
        job: &JobRow,
        sections: &[(usize, String)],
        progress: Option<&Progress>,
    ) -> Job {
        let sections: Vec<Section> = sections
            .iter()
            .map(|(i, t)| Section {
                index: *i,
                text: t.clone(),
                words: self.counter.count(t),
            })
            .collect();
        Job {
            id: job.id.clone(),
            object: "longwrite.job",
            created: job.created,
            status: job.status.as_str(),
            instruction: job.request.instruction.clone(),
            mode: job.request.mode.name(),
            language: job.request.language.code(),
            model: job.request.model.clone(),
            asked_words: job.request.asked_words,
            planned_words: job.plan.as_ref().map(|p| p.total_words()),
            delivered_words: sections.iter().map(|s| s.words).sum(),
            plan: job.plan.as_ref().map(PlanPoint::of),
            sections,
            usage: JobUsage {
                prompt_tokens: job.state.usage.prompt_tokens,
                cached_prompt_tokens: job.state.usage.cached_prompt_tokens,
                completion_tokens: job.state.usage.completion_tokens,
            },
            error: job.error.clone(),
            current: progress.map(|p| Current {
                index: p.section,
                text: p.partial.clone(),
            }),
            seq: None,
        }
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let (tx, _) = broadcast::channel(4096);
        let live = Arc::new(Live {
            stop: AtomicBool::new(false),
            events: tx,
            progress: Mutex::new(Progress::default()),
        });
        self.live
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), live.clone());
        let jobs = self.clone();
        std::thread::Builder::new()
            .name(format!("job-{id}"))
            .spawn(move || {
                jobs.run(&id, &live);
                jobs.live
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(&id);
            })
            .expect("spawning a job thread");
    }

    fn run(&self, id: &str, live: &Live) {
        let emit = |event: JobEvent| {
            let mut p = live.progress.lock().unwrap_or_else(|p| p.into_inner());
            p.advance(&event);
            p.seq += 1;
            let _ = live.events.send(Numbered { seq: p.seq, event });
        };
        let failed = |error: String| JobEvent::Failed { error };
        if let Err(e) = self.store.set_status(id, Status::Running, None) {
            emit(failed(e.to_string()));
            return;
        }
        let mut model = BatchedModel::new(self.batcher.clone(), self.model_name.clone());
        let run = JobRun {
            store: &self.store,
            id,
        };
        let opts = WriteOptions {
            counter: self.counter,
            ..Default::default()
        };
        let result = lw_write::write(&mut model, &run, &opts, &live.stop, &mut |event| {
            if let Some(event) = job_event(event, &run) {
                emit(event);
            }
        });
        match result {
            Ok(summary) => {
                let words = self.counter.count(&summary.document);
                match self.store.set_status(id, Status::Finished, None) {
                    Ok(()) => emit(JobEvent::Finished { words }),
                    Err(e) => emit(failed(e.to_string())),
                }
            }
            Err(WriteError::Cancelled) => {
                let _ = self.store.set_status(id, Status::Cancelled, None);
                emit(JobEvent::Cancelled);
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = self.store.set_status(id, Status::Failed, Some(&msg));
                emit(failed(msg));
            }
        }
    }
}

/// The subscribers' event for a writer's event (none for the ones they do
/// not see).
fn job_event(event: Event, run: &JobRun) -> Option<JobEvent> {
    Some(match event {
        Event::PlanReady { plan, .. } => JobEvent::Plan {
            plan: PlanPoint::of(plan),
            planned_words: plan.total_words(),
        },
        Event::SectionStart {
            index,
            total,
            asked_words,
        } => JobEvent::SectionStart {
            index,
            total,
            asked_words,
        },
        Event::Delta { index, text } => JobEvent::Delta {
            index,
            text: text.to_owned(),
        },
        Event::SectionRetry { index, reason, .. } => JobEvent::SectionRetry {
            index,
            reason: reason.to_owned(),
        },
        Event::SectionDone {
            record,
            resumed: false,
        } => JobEvent::SectionDone {
            index: record.index,
            // The saved text rides along: a subscriber that fell behind and
            // lost deltas still ends up with it.
            text: lw_write::RunStore::section(run, record.index)
                .ok()
                .flatten()
                .unwrap_or_default(),
            words: record.delivered_words,
            asked_words: record.asked_words,
        },
        Event::SectionDone { resumed: true, .. }
        | Event::Finished { .. }
        | Event::TextCut { .. } => return None,
    })
}
