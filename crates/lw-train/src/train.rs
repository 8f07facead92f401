//! The training loop shared by pretraining and fine-tuning: gradient
//! accumulation, global-norm clipping, AdamW with decoupled weight decay,
//! linear warmup then cosine decay, periodic validation, checkpoints that
//! resume exactly, and a JSONL loss log.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::error::{file_error, TrainError};
use crate::model::{Batch, Rng, TrainModel};

/// Where the batches of a run come from. Batches are a function of the step,
/// so a resumed run sees the same data as an uninterrupted one.
pub trait BatchSource {
    /// Micro-batch `micro` (of `accum`) of optimizer step `step`.
    fn batch(&self, step: u64, micro: usize, accum: usize) -> Batch;
    /// Held-out batches for the validation loss (may be empty).
    fn validation(&self) -> Vec<Batch>;
}

/// Optimizer and schedule settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OptimSpec {
    /// Peak learning rate.
    pub lr: f64,
    /// Learning rate at the end of the cosine decay.
    pub min_lr: f64,
    pub warmup_steps: u64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled weight decay, on matrices only (not norms or biases).
    pub weight_decay: f64,
    /// Global gradient-norm limit (0 = no clipping).
    pub clip: f64,
}

impl Default for OptimSpec {
    fn default() -> Self {
        OptimSpec {
            lr: 1e-3,
            min_lr: 1e-4,
            warmup_steps: 100,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
        }
    }
}

impl OptimSpec {
    /// The learning rate of `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1) as f64;
        let t = ((step - self.warmup_steps) as f64 / span).min(1.0);
        self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    pub steps: u64,
    pub accum: usize,
    pub optim: OptimSpec,
    pub seed: u64,
    /// Validation every this many steps (0 = only at the end).
    pub eval_every: u64,
    /// A checkpoint every this many steps (0 = only at the end).
    pub save_every: u64,
    /// Checkpoints kept besides the selected ones.
    pub keep_last: usize,
    /// Checkpoints at multiples of this step are never deleted (0 = none).
    pub keep_every: u64,
    pub out: PathBuf,
    /// Files copied into every checkpoint (tokenizer.json, tokenizer_config.json, …).
    pub extra_files: Vec<PathBuf>,
    /// "pretrain" or "sft", recorded in trainer_state.json.
    pub kind: String,
}

/// AdamW moments, one pair of buffers per trainable tensor.
pub struct AdamW {
    pub step: u64,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

impl AdamW {
    pub fn new(sizes: &[usize]) -> Self {
        AdamW {
            step: 0,
            m: sizes.iter().map(|&n| vec![0.0; n]).collect(),
            v: sizes.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    /// One update in place (PyTorch's AdamW: decay, then the Adam step).
    pub fn update(
        &mut self,
        spec: &OptimSpec,
        lr: f64,
        params: &mut [Vec<f32>],
        grads: &[Vec<f32>],
        decay: &[bool],
    ) {
        self.step += 1;
        let t = self.step as f64;
        let bc1 = 1.0 - spec.beta1.powf(t);
        let bc2_sqrt = (1.0 - spec.beta2.powf(t)).sqrt();
        let step_size = (lr / bc1) as f32;
        let (b1, b2) = (spec.beta1 as f32, spec.beta2 as f32);
        let eps = spec.eps as f32;
        let bc2_sqrt = bc2_sqrt as f32;
        for (i, p) in params.iter_mut().enumerate() {
            let keep = if decay[i] {
                (1.0 - lr * spec.weight_decay) as f32
            } else {
                1.0
            };
            let (m, v, g) = (&mut self.m[i], &mut self.v[i], &grads[i]);
            for j in 0..p.len() {
                m[j] = b1 * m[j] + (1.0 - b1) * g[j];
                v[j] = b2 * v[j] + (1.0 - b2) * g[j] * g[j];
                let denom = v[j].sqrt() / bc2_sqrt + eps;
                p[j] = p[j] * keep - step_size * m[j] / denom;
            }
        }
    }
}

/// What the loop reports after each step.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct StepLog {
    pub step: u64,
    pub loss: f32,
    pub lr: f64,
    pub grad_norm: f32,
    /// Tokens fed so far (padding excluded).
    pub tokens: u64,
    pub tokens_per_s: f64,
    /// Seconds since this process started training (a resumed run restarts at 0).
    #[serde(default)]
    pub elapsed_s: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub val_loss: Option<f32>,
}

/// Progress events for a display.
#[derive(Debug, Clone)]
pub enum TrainEvent {
    Step(StepLog),
    Checkpoint(PathBuf),
    Resumed { step: u64, from: PathBuf },
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub steps_done: u64,
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
    pub final_loss: Option<f32>,
    pub val_loss: Option<f32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TrainerState {
    step: u64,
    tokens: u64,
    seed: u64,
    accum: usize,
    kind: String,
}

/// Each trainable tensor's name and gradient (`None` where none reached it).
pub type Gradients = Vec<(String, Option<Vec<f32>>)>;

/// Runs one forward and backward pass and returns the loss and the gradients
/// (recomputing each layer's activations where the model has checkpointing on).
pub fn gradients(
    model: &TrainModel,
    batch: &Batch,
    dropout: Option<Rng>,
) -> Result<(f32, Gradients), TrainError> {
    let to_vec =
        |g: &Tensor| -> Result<Vec<f32>, TrainError> { Ok(g.flatten_all()?.to_vec1::<f32>()?) };
    if model.checkpointing() {
        let (value, grads) = model.checkpointed_gradients(batch, dropout)?;
        let mut out = Vec::with_capacity(grads.len());
        for (name, g) in grads {
            out.push((name, g.as_ref().map(to_vec).transpose()?));
        }
        return Ok((value, out));
    }
    let loss = model.loss(batch, dropout)?;
    let value = loss.to_scalar::<f32>()?;
    let grads = loss.backward()?;
    let mut out = Vec::new();
    for (name, var) in model.trainable() {
        out.push((name, grads.get(var.as_tensor()).map(to_vec).transpose()?));
    }
    Ok((value, out))
}

/// Mean loss over the validation batches (each batch's weights sum to one).
pub fn validation_loss(model: &TrainModel, batches: &[Batch]) -> Result<Option<f32>, TrainError> {
    if batches.is_empty() {
        return Ok(None);
    }
    let mut sum = 0.0f64;
    for b in batches {
        sum += model.loss_value(b)? as f64;
    }
    Ok(Some((sum / batches.len() as f64) as f32))
}

fn checkpoint_name(step: u64) -> String {
    format!("checkpoint-{step:07}")
}

/// The checkpoints in `out`, oldest first.
pub fn checkpoints(out: &Path) -> Vec<(u64, PathBuf)> {
    let mut found: Vec<(u64, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse().ok()?;
            e.path()
                .join("trainer_state.json")
                .exists()
                .then(|| (step, e.path()))
        })
        .collect();
    found.sort();
    found
}

fn write_json(path: &Path, value: &serde_json::Value) -> Result<(), TrainError> {
    let text = serde_json::to_string_pretty(value).map_err(|e| file_error(path, e))?;
    std::fs::write(path, text + "\n").map_err(|e| file_error(path, e))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<(), TrainError> {
    candle_core::safetensors::save(tensors, path).map_err(|e| file_error(path, e))
}

/// Files of a model directory that travel with its weights: the tokenizer
/// and the sampling defaults.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
];

/// Those of [`TOKENIZER_FILES`] present in `dir`.
pub fn tokenizer_files(dir: &Path) -> Vec<PathBuf> {
    TOKENIZER_FILES
        .iter()
        .map(|f| dir.join(f))
        .filter(|p| p.exists())
        .collect()
}

/// Writes the model (or its adapters) into `dir`: config.json and
/// model.safetensors, or adapter_config.json and adapter_model.safetensors.
pub fn save_model(
    model: &TrainModel,
    dir: &Path,
    extra_files: &[PathBuf],
) -> Result<(), TrainError> {
    std::fs::create_dir_all(dir).map_err(|e| file_error(dir, e))?;
    match model.lora() {
        None => {
            write_json(&dir.join("config.json"), &model.config_json)?;
            let tensors: HashMap<String, Tensor> = model.tensors().into_iter().collect();
            save_tensors(&dir.join("model.safetensors"), &tensors)?;
        }
        Some(spec) => {
            let config = json!({
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": spec.rank,
                "lora_alpha": spec.alpha,
                "lora_dropout": spec.dropout,
                "target_modules": spec.targets,
                "bias": "none",
                "fan_in_fan_out": false,
                "inference_mode": true,
            });
            write_json(&dir.join("adapter_config.json"), &config)?;
            let tensors: HashMap<String, Tensor> = model
                .trainable()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().clone()))
                .collect();
            save_tensors(&dir.join("adapter_model.safetensors"), &tensors)?;
        }
    }
    for f in extra_files {
        if let Some(name) = f.file_name() {
            std::fs::copy(f, dir.join(name)).map_err(|e| file_error(f, e))?;
        }
    }
    Ok(())
}

fn sync_dir(dir: &Path) {
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
}

struct Run<'a> {
    model: &'a TrainModel,
    spec: &'a TrainSpec,
    params: Vec<(String, candle_core::Var)>,
    values: Vec<Vec<f32>>,
    opt: AdamW,
    tokens: u64,
}

impl Run<'_> {
    fn save_checkpoint(&self, step: u64) -> Result<PathBuf, TrainError> {
        let out = &self.spec.out;
        let final_dir = out.join(checkpoint_name(step));
        let tmp = out.join(format!(".tmp-{}", checkpoint_name(step)));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| file_error(&tmp, e))?;
        }
        save_model(self.model, &tmp, &self.spec.extra_files)?;
        let mut state = HashMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            let n = self.opt.m[i].len();
            state.insert(
                format!("m.{name}"),
                Tensor::from_slice(&self.opt.m[i], n, &Device::Cpu)?,
            );
            state.insert(
                format!("v.{name}"),
                Tensor::from_slice(&self.opt.v[i], n, &Device::Cpu)?,
            );
        }
        save_tensors(&tmp.join("optimizer.safetensors"), &state)?;
        let ts = TrainerState {
            step,
            tokens: self.tokens,
            seed: self.spec.seed,
            accum: self.spec.accum,
            kind: self.spec.kind.clone(),
        };
        write_json(
            &tmp.join("trainer_state.json"),
            &serde_json::to_value(&ts).expect("state serializes"),
        )?;
        for entry in std::fs::read_dir(&tmp)
            .map_err(|e| file_error(&tmp, e))?
            .flatten()
        {
            if let Ok(f) = std::fs::File::open(entry.path()) {
                let _ = f.sync_all();
            }
        }
        if final_dir.exists() {
            std::fs::remove_dir_all(&final_dir).map_err(|e| file_error(&final_dir, e))?;
        }
        std::fs::rename(&tmp, &final_dir).map_err(|e| file_error(&final_dir, e))?;
        sync_dir(out);
        // Keep the last `keep_last` and the selected ones.
        let all = checkpoints(out);
        let n = all.len();
        for (i, (s, path)) in all.into_iter().enumerate() {
            let recent = i + self.spec.keep_last.max(1) >= n;
            let selected = self.spec.keep_every > 0 && s % self.spec.keep_every == 0;
            if !recent && !selected {
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(final_dir)
    }

    fn restore(&mut self, dir: &Path) -> Result<u64, TrainError> {
        let state_path = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&state_path).map_err(|e| file_error(&state_path, e))?;
        let ts: TrainerState =
            serde_json::from_str(&text).map_err(|e| file_error(&state_path, e))?;
        if ts.seed != self.spec.seed || ts.accum != self.spec.accum || ts.kind != self.spec.kind {
            return Err(TrainError::Setting(format!(
                "{} was made with seed {}, accumulation {} ({}); resume with the same settings",
                dir.display(),
                ts.seed,
                ts.accum,
                ts.kind
            )));
        }
        let weights_file = if self.model.lora().is_some() {
            dir.join("adapter_model.safetensors")
        } else {
            dir.join("model.safetensors")
        };
        self.model.load_trainable(&weights_file)?;
        let opt_file = dir.join("optimizer.safetensors");
        let opt = candle_core::safetensors::load(&opt_file, &Device::Cpu)
            .map_err(|e| file_error(&opt_file, e))?;
        for (i, (name, var)) in self.params.iter().enumerate() {
            self.values[i] = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            for (prefix, buf) in [("m", &mut self.opt.m[i]), ("v", &mut self.opt.v[i])] {
                let key = format!("{prefix}.{name}");
                let t = opt.get(&key).ok_or_else(|| TrainError::File {
                    path: opt_file.clone(),
                    reason: format!("tensor \"{key}\" is missing"),
                })?;
                *buf = t.to_vec1::<f32>()?;
            }
        }
        self.opt.step = ts.step;
        self.tokens = ts.tokens;
        Ok(ts.step)
    }
}

/// Keeps the loss log's first `steps` entries (a resumed run rewrites the rest).
fn truncate_log(path: &Path, steps: u64) -> Result<(), TrainError> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<StepLog>(l)
                .map(|s| s.step <= steps)
                .unwrap_or(false)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, kept).map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| file_error(path, e))
}

/// Reads a loss log written by [`train`].
pub fn read_loss_log(path: &Path) -> Result<Vec<StepLog>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|e| file_error(path, e))?;
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}

/// Trains `model` for `spec.steps` optimizer steps. With `resume`, the
/// weights, optimizer state and step come from that checkpoint first. When
/// `stop` is set the loop saves a checkpoint after the current step and returns.
pub fn train(
    model: &TrainModel,
    source: &dyn BatchSource,
    spec: &TrainSpec,
    resume: Option<&Path>,
    stop: &AtomicBool,
    on_event: &mut dyn FnMut(TrainEvent),
) -> Result<TrainSummary, TrainError> {
    if spec.accum == 0 || spec.steps == 0 {
        return Err(TrainError::Setting(
            "steps and gradient accumulation must be positive".into(),
        ));
    }
    std::fs::create_dir_all(&spec.out).map_err(|e| file_error(&spec.out, e))?;
    let params = model.trainable();
    let sizes: Vec<usize> = params.iter().map(|(_, v)| v.elem_count()).collect();
    let decay: Vec<bool> = params.iter().map(|(_, v)| v.rank() >= 2).collect();
    let values = params
        .iter()
        .map(|(_, v)| Ok(v.as_tensor().flatten_all()?.to_vec1::<f32>()?))
        .collect::<Result<Vec<_>, TrainError>>()?;
    let mut run = Run {
        model,
        spec,
        params,
        values,
        opt: AdamW::new(&sizes),
        tokens: 0,
    };
    let log_path = spec.out.join("loss.jsonl");
    let mut start = 0;
    if let Some(dir) = resume {
        start = run.restore(dir)?;
        truncate_log(&log_path, start)?;
        on_event(TrainEvent::Resumed {
            step: start,
            from: dir.to_path_buf(),
        });
    } else if log_path.exists() {
        std::fs::remove_file(&log_path).map_err(|e| file_error(&log_path, e))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| file_error(&log_path, e))?;
    let validation = source.validation();
    let mut summary = TrainSummary {
        steps_done: start,
        interrupted: false,
        last_checkpoint: None,
        final_loss: None,
        val_loss: None,
    };
    let began = Instant::now();
    let tokens_at_start = run.tokens;
    for step in start..spec.steps {
        let lr = spec.optim.lr_at(step, spec.steps);
        let mut grads: Vec<Vec<f32>> = sizes.iter().map(|&n| vec![0.0; n]).collect();
        let mut loss_sum = 0.0f64;
        for micro in 0..spec.accum {
            let batch = source.batch(step, micro, spec.accum);
            run.tokens += batch.weights.len() as u64
                - batch.segments.iter().filter(|&&s| s == u32::MAX).count() as u64;
            let index = step * spec.accum as u64 + micro as u64;
            let (loss, g) = gradients(model, &batch, Some(Rng::derive(spec.seed, 3, index)))?;
            if !loss.is_finite() {
                return Err(TrainError::Diverged { step, loss });
            }
            loss_sum += loss as f64;
            for (i, (name, g)) in g.into_iter().enumerate() {
                let g = g.ok_or_else(|| {
                    TrainError::Setting(format!("tensor \"{name}\" received no gradient"))
                })?;
                for (a, b) in grads[i].iter_mut().zip(g) {
                    *a += b;
                }
            }
        }
        let inv = 1.0 / spec.accum as f32;
        let mut sq = 0.0f64;
        for g in grads.iter_mut() {
            for x in g.iter_mut() {
                *x *= inv;
                sq += (*x as f64) * (*x as f64);
            }
        }
        let norm = sq.sqrt();
        if spec.optim.clip > 0.0 && norm > spec.optim.clip {
            let c = (spec.optim.clip / (norm + 1e-6)) as f32;
            grads.iter_mut().flatten().for_each(|x| *x *= c);
        }
        run.opt
            .update(&spec.optim, lr, &mut run.values, &grads, &decay);
        for (i, (_, var)) in run.params.iter().enumerate() {
            let t = Tensor::from_slice(&run.values[i], var.dims(), &Device::Cpu)?;
            var.set(&t)?;
        }
        let done = step + 1;
        let loss = (loss_sum / spec.accum as f64) as f32;
        let last = done == spec.steps;
        let val_loss = if last || (spec.eval_every > 0 && done % spec.eval_every == 0) {
            validation_loss(model, &validation)?
        } else {
            None
        };
        let elapsed = began.elapsed().as_secs_f64().max(1e-9);
        let entry = StepLog {
            step: done,
            loss,
            lr,
            grad_norm: norm as f32,
            tokens: run.tokens,
            tokens_per_s: (run.tokens - tokens_at_start) as f64 / elapsed,
            elapsed_s: elapsed,
            val_loss,
        };
        let line = serde_json::to_string(&entry).expect("log entry serializes");
        writeln!(log, "{line}").map_err(|e| file_error(&log_path, e))?;
        log.flush().map_err(|e| file_error(&log_path, e))?;
        summary.steps_done = done;
        summary.final_loss = Some(loss);
        if val_loss.is_some() {
            summary.val_loss = val_loss;
        }
        on_event(TrainEvent::Step(entry));
        let interrupted = stop.load(Ordering::SeqCst) && !last;
        if last || interrupted || (spec.save_every > 0 && done % spec.save_every == 0) {
            let _ = log.sync_all();
            let path = run.save_checkpoint(done)?;
            on_event(TrainEvent::Checkpoint(path.clone()));
            summary.last_checkpoint = Some(path);
        }
        if interrupted {
            summary.interrupted = true;
            break;
        }
    }
    Ok(summary)
}

/// The newest checkpoint of a run directory, if any.
pub fn latest_checkpoint(out: &Path) -> Option<PathBuf> {
    checkpoints(out).pop().map(|(_, p)| p)
}
