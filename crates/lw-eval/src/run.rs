//! `eval run`: a response for every benchmark item, from any backend, with
//! several items in flight. Each prediction is appended to `pred.jsonl` (and
//! synced) as soon as it is finished, so a run that is killed resumes
//! without generating a finished item again; in AgentWrite mode each item
//! also keeps a run directory, so even an unfinished item resumes where it
//! stopped.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use lw_core::{Counter, Message, SamplingParams};
use lw_write::{ChatRequest, Language, LanguageModel, Mode, RunDir, WriteError, WriteOptions};

use crate::items::{read_predictions, EvalError, Item, Prediction};

/// How to run an evaluation.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub mode: Mode,
    /// Items in flight at once (each with its own model connection).
    pub concurrency: usize,
    /// Sampling for every call; the seed is varied per item.
    pub sampling: SamplingParams,
    /// Largest answer in direct mode, in tokens (a local model's is also
    /// held to what its context leaves after the prompt).
    pub max_new_tokens: usize,
    /// Counter for the produced length stored with each prediction.
    pub counter: Counter,
    /// AgentWrite mode: plan grammar and section length control
    /// ([`WriteOptions::constrain`]).
    pub constrain: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            mode: Mode::Direct,
            concurrency: 1,
            // The benchmark's generation settings.
            sampling: SamplingParams {
                temperature: 0.5,
                top_p: 0.8,
                seed: 42,
                ..Default::default()
            },
            max_new_tokens: 32_768,
            counter: Counter::LongBench,
            constrain: true,
        }
    }
}

/// A model for one worker; called once per worker thread.
pub type ModelFactory<'a> = dyn Fn() -> Result<Box<dyn LanguageModel + Send>, String> + Sync + 'a;

/// What a run did.
#[derive(Debug, Clone, Default)]
pub struct RunSummary {
    pub total: usize,
    /// Finished before this invocation (skipped).
    pub resumed: usize,
    pub generated: usize,
    pub failed: usize,
    pub stopped: bool,
}

/// `pred.jsonl` of an output directory.
pub fn predictions_path(out: &Path) -> PathBuf {
    out.join("pred.jsonl")
}

fn io(path: &Path, source: std::io::Error) -> EvalError {
    EvalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Appends one line and syncs it; a line cut short by an earlier crash is
/// ended first, so it never swallows this one.
fn append_line(path: &Path, line: &str) -> Result<(), EvalError> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
        .map_err(|e| io(path, e))?;
    let len = f.metadata().map_err(|e| io(path, e))?.len();
    if len > 0 {
        use std::io::{Read, Seek, SeekFrom};
        let mut last = [0u8];
        f.seek(SeekFrom::Start(len - 1)).map_err(|e| io(path, e))?;
        f.read_exact(&mut last).map_err(|e| io(path, e))?;
        if last[0] != b'\n' {
            f.write_all(b"\n").map_err(|e| io(path, e))?;
        }
    }
    f.write_all(line.as_bytes())
        .and_then(|_| f.write_all(b"\n"))
        .and_then(|_| f.sync_data())
        .map_err(|e| io(path, e))
}

fn seed_for(base: u64, id: &str) -> u64 {
    // FNV-1a of the id: the same item gets the same seed on every run.
    let mut h = 0xcbf29ce484222325u64;
    for b in id.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    base ^ h
}

/// Generates one item's response: `Ok(text, prompt tokens, completion tokens)`.
fn generate(
    model: &mut dyn LanguageModel,
    item: &Item,
    out: &Path,
    opts: &RunOptions,
    stop: &AtomicBool,
) -> Result<(String, u64, u64), String> {
    let sampling = SamplingParams {
        seed: seed_for(opts.sampling.seed, &item.id),
        ..opts.sampling.clone()
    };
    match opts.mode {
        Mode::Direct => {
            let messages = vec![Message::user(item.prompt.clone())];
            // At most what the model's context leaves after the prompt.
            let max_tokens = match model.prompt_room(&messages) {
                Some((prompt, context)) => opts.max_new_tokens.min(context.saturating_sub(prompt)),
                None => opts.max_new_tokens,
            }
            .max(1);
            let req = ChatRequest {
                messages,
                max_tokens,
                sampling,
                stop: vec![],
                ..Default::default()
            };
            let r = model
                .complete(&req, &mut |_| !stop.load(Ordering::SeqCst))
                .map_err(|e| e.to_string())?;
            Ok((
                r.text.trim().to_string(),
                r.usage.prompt_tokens as u64,
                r.usage.completion_tokens as u64,
            ))
        }
        Mode::AgentWrite => {
            let dir_path = out.join("runs").join(sanitize(&item.id));
            let dir = if dir_path.join("request.json").exists() {
                RunDir::open(&dir_path).map_err(|e| e.to_string())?.0
            } else {
                let request = lw_write::Request {
                    instruction: item.prompt.clone(),
                    asked_words: Some(item.length.min(u32::MAX as u64) as u32),
                    language: Language::detect(&item.prompt),
                    mode: Mode::AgentWrite,
                    sampling,
                    model: model.name(),
                };
                RunDir::create(&dir_path, &request).map_err(|e| e.to_string())?
            };
            let wopts = WriteOptions {
                counter: Counter::Unicode,
                constrain: opts.constrain,
                ..Default::default()
            };
            match lw_write::write(model, &dir, &wopts, stop, &mut |_| {}) {
                Ok(s) => Ok((
                    s.document,
                    s.usage.prompt_tokens as u64,
                    s.usage.completion_tokens as u64,
                )),
                Err(WriteError::Cancelled) => Err("stopped".into()),
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

/// A file-name-safe form of an item id.
fn sanitize(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs (or resumes) the evaluation of `items` into `out`. `on_done` hears
/// of each finished prediction (for progress). `stop` ends the run after
/// the items in flight.
pub fn run(
    items: &[Item],
    out: &Path,
    opts: &RunOptions,
    make_model: &ModelFactory,
    stop: &AtomicBool,
    on_done: &(dyn Fn(&Prediction) + Sync),
) -> Result<RunSummary, EvalError> {
    std::fs::create_dir_all(out).map_err(|e| io(out, e))?;
    let pred_path = predictions_path(out);
    let done: HashSet<String> = if pred_path.exists() {
        read_predictions(&pred_path)?
            .into_iter()
            .filter(|p| p.error.is_none())
            .map(|p| p.id)
            .collect()
    } else {
        HashSet::new()
    };
    let pending: Vec<&Item> = items.iter().filter(|i| !done.contains(&i.id)).collect();
    let summary = Mutex::new(RunSummary {
        total: items.len(),
        resumed: items.len() - pending.len(),
        ..Default::default()
    });
    let next = AtomicUsize::new(0);
    let file_lock = Mutex::new(());
    let first_error: Mutex<Option<EvalError>> = Mutex::new(None);
    let workers = opts.concurrency.clamp(1, pending.len().max(1));
    std::thread::scope(|scope| {
        for _ in 0..workers {
            scope.spawn(|| {
                let mut model = match make_model() {
                    Ok(m) => m,
                    Err(e) => {
                        first_error.lock().unwrap().get_or_insert(EvalError::Line {
                            path: out.to_path_buf(),
                            line: 0,
                            reason: format!("cannot open the model: {e}"),
                        });
                        return;
                    }
                };
                loop {
                    if stop.load(Ordering::SeqCst) || first_error.lock().unwrap().is_some() {
                        return;
                    }
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(item) = pending.get(i) else { return };
                    let started = Instant::now();
                    let result = generate(model.as_mut(), item, out, opts, stop);
                    if stop.load(Ordering::SeqCst) && result.is_err() {
                        summary.lock().unwrap().stopped = true;
                        return;
                    }
                    let (response, pt, ct, error) = match result {
                        Ok((t, p, c)) => (t, p, c, None),
                        Err(e) => (String::new(), 0, 0, Some(e)),
                    };
                    let pred = Prediction {
                        id: item.id.clone(),
                        prompt: item.prompt.clone(),
                        kind: item.kind.clone(),
                        length: item.length,
                        response_length: opts.counter.count(&response) as u64,
                        response,
                        counter: opts.counter.name().to_string(),
                        mode: opts.mode.name().into(),
                        prompt_tokens: pt,
                        completion_tokens: ct,
                        seconds: started.elapsed().as_secs_f64(),
                        error,
                        extra: item.extra.clone(),
                    };
                    let line = serde_json::to_string(&pred).expect("predictions serialise");
                    let written = {
                        let _g = file_lock.lock().unwrap();
                        append_line(&pred_path, &line)
                    };
                    if let Err(e) = written {
                        first_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                    {
                        let mut s = summary.lock().unwrap();
                        s.generated += 1;
                        if pred.error.is_some() {
                            s.failed += 1;
                        }
                    }
                    on_done(&pred);
                }
            });
        }
    });
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    let mut s = summary.into_inner().unwrap();
    s.stopped |= stop.load(Ordering::SeqCst);
    Ok(s)
}

/// The latest prediction of each id, in file order of first appearance
/// (a failed item retried later is replaced by its retry).
pub fn latest_predictions(preds: Vec<Prediction>) -> Vec<Prediction> {
    let mut order: Vec<String> = Vec::new();
    let mut by_id: std::collections::HashMap<String, Prediction> = Default::default();
    for p in preds {
        if !by_id.contains_key(&p.id) {
            order.push(p.id.clone());
        }
        by_id.insert(p.id.clone(), p);
    }
    order
        .into_iter()
        .filter_map(|id| by_id.remove(&id))
        .collect()
}
