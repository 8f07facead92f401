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
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::store::{JobRow, JobRun, JobStore, Status, StoreError};

/// Live state of a running job.
struct Live {
    stop: AtomicBool,
    events: broadcast::Sender<Value>,
    /// Event sequence number and the text of the section being written.
    progress: Mutex<Progress>,
}

#[derive(Default)]
pub struct Progress {
    seq: u64,
    section: Option<usize>,
    partial: String,
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
    pub snapshot: Value,
    pub events: Option<broadcast::Receiver<Value>>,
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
                snap["seq"] = json!(p.seq);
                Ok(Subscription {
                    snapshot: snap,
                    events: Some(l.events.subscribe()),
                })
            }
        }
    }

    /// The job as JSON: request, state, plan, finished sections, figures.
    pub fn describe(
        &self,
        job: &JobRow,
        sections: &[(usize, String)],
        progress: Option<&Progress>,
    ) -> Value {
        let planned = job.plan.as_ref().map(|p| p.total_words());
        let delivered: usize = sections.iter().map(|(_, t)| self.counter.count(t)).sum();
        let plan = job.plan.as_ref().map(|p| {
            p.paragraphs
                .iter()
                .map(|q| json!({"main_point": q.main_point, "words": q.words}))
                .collect::<Vec<_>>()
        });
        let mut v = json!({
            "id": job.id,
            "object": "longwrite.job",
            "created": job.created,
            "status": job.status.as_str(),
            "instruction": job.request.instruction,
            "mode": job.request.mode.name(),
            "language": job.request.language.code(),
            "model": job.request.model,
            "asked_words": job.request.asked_words,
            "planned_words": planned,
            "delivered_words": delivered,
            "plan": plan,
            "sections": sections.iter().map(|(i, t)| json!({"index": i, "text": t, "words": self.counter.count(t)})).collect::<Vec<_>>(),
            "usage": {
                "prompt_tokens": job.state.usage.prompt_tokens,
                "cached_prompt_tokens": job.state.usage.cached_prompt_tokens,
                "completion_tokens": job.state.usage.completion_tokens,
            },
            "error": job.error,
        });
        if let Some(p) = progress {
            v["current"] = json!({"index": p.section, "text": p.partial});
        }
        v
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
        let emit = |mut ev: Value, update: &dyn Fn(&mut Progress)| {
            let mut p = live.progress.lock().unwrap_or_else(|p| p.into_inner());
            update(&mut p);
            p.seq += 1;
            ev["seq"] = json!(p.seq);
            let _ = live.events.send(ev);
        };
        if let Err(e) = self.store.set_status(id, Status::Running, None) {
            emit(json!({"type": "failed", "error": e.to_string()}), &|_| {});
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
        let counter = self.counter;
        let result = lw_write::write(
            &mut model,
            &run,
            &opts,
            &live.stop,
            &mut |event| match event {
                Event::PlanReady { plan, .. } => emit(
                    json!({"type": "plan", "plan": plan.paragraphs.iter().map(|q| json!({"main_point": q.main_point, "words": q.words})).collect::<Vec<_>>(), "planned_words": plan.total_words()}),
                    &|_| {},
                ),
                Event::SectionStart {
                    index,
                    total,
                    asked_words,
                } => emit(
                    json!({"type": "section_start", "index": index, "total": total, "asked_words": asked_words}),
                    &|p| {
                        p.section = Some(index);
                        p.partial.clear();
                    },
                ),
                Event::Delta { index, text } => emit(
                    json!({"type": "delta", "index": index, "text": text}),
                    &|p| p.partial.push_str(text),
                ),
                Event::SectionRetry { index, reason, .. } => emit(
                    json!({"type": "section_retry", "index": index, "reason": reason}),
                    &|p| p.partial.clear(),
                ),
                Event::SectionDone { record, resumed } => {
                    if !resumed {
                        // The saved text rides along: a subscriber that fell
                        // behind and lost deltas still ends up with it.
                        let text = lw_write::RunStore::section(&run, record.index)
                            .ok()
                            .flatten()
                            .unwrap_or_default();
                        emit(
                            json!({"type": "section_done", "index": record.index, "text": text, "words": record.delivered_words, "asked_words": record.asked_words}),
                            &|p| {
                                p.section = None;
                                p.partial.clear();
                            },
                        )
                    }
                }
                Event::Finished { words } => {
                    let _ = words;
                }
            },
        );
        match result {
            Ok(summary) => {
                let status = self.store.set_status(id, Status::Finished, None);
                let words = counter.count(&summary.document);
                match status {
                    Ok(()) => emit(json!({"type": "finished", "words": words}), &|_| {}),
                    Err(e) => emit(json!({"type": "failed", "error": e.to_string()}), &|_| {}),
                }
            }
            Err(WriteError::Cancelled) => {
                let _ = self.store.set_status(id, Status::Cancelled, None);
                emit(json!({"type": "cancelled"}), &|_| {});
            }
            Err(e) => {
                let msg = e.to_string();
                let _ = self.store.set_status(id, Status::Failed, Some(&msg));
                emit(json!({"type": "failed", "error": msg}), &|_| {});
            }
        }
    }
}
