//! `longwriter train pretrain|sft` and `longwriter lora merge`.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::ProgressBar;
use lw_train::data::{steps_for_epochs, LossMode, PretrainData, SftData};
use lw_train::model::{LoraSpec, TrainModel};
use lw_train::train::{self, latest_checkpoint, BatchSource, OptimSpec, TrainEvent, TrainSpec};

use crate::progress;

#[derive(Subcommand)]
pub enum TrainCommand {
    /// Pretrain a Llama-architecture model from scratch (or continue one) on
    /// token shards made by `longwriter data tokenize`.
    Pretrain(PretrainArgs),
    /// Supervised fine-tuning on chat JSONL ({"messages": [...]}, the
    /// LongWriter-6k format): assistant tokens only, packed rows, full or LoRA.
    Sft(SftArgs),
}

#[derive(Subcommand)]
pub enum LoraCommand {
    /// Fold LoRA adapters (PEFT layout) into their base model and write a
    /// complete model directory the engine loads.
    Merge(MergeArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The base model directory the adapters were trained on.
    #[arg(long)]
    base: PathBuf,
    /// Directory with adapter_config.json and adapter_model.safetensors.
    #[arg(long)]
    adapter: PathBuf,
    /// Output directory.
    #[arg(long)]
    out: PathBuf,
}

/// Settings shared by both kinds of training.
#[derive(Args)]
pub struct LoopArgs {
    /// Output directory: checkpoint-NNNNNNN/, final/, loss.jsonl, loss.png.
    #[arg(long)]
    out: PathBuf,
    /// Rows (sequences) per micro-batch.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    /// Micro-batches per optimizer step (gradient accumulation).
    #[arg(long, default_value_t = 1)]
    accum: usize,
    /// Peak learning rate (default: 1e-3 for pretraining; 2e-5 for full
    /// fine-tuning, 2e-4 for LoRA).
    #[arg(long)]
    lr: Option<f64>,
    /// Final learning rate of the cosine decay (default: lr / 10).
    #[arg(long)]
    min_lr: Option<f64>,
    /// Linear warmup steps (default: 5% of the steps, at most 500 in pretraining).
    #[arg(long)]
    warmup: Option<u64>,
    /// Decoupled weight decay (matrices only).
    #[arg(long, default_value_t = 0.1)]
    weight_decay: f64,
    /// AdamW beta2.
    #[arg(long, default_value_t = 0.95)]
    beta2: f64,
    /// Clip the global gradient norm to this (0 = off).
    #[arg(long, default_value_t = 1.0)]
    clip: f64,
    /// Validation loss every N steps (0 = at the end only).
    #[arg(long, default_value_t = 100)]
    eval_every: u64,
    /// Checkpoint every N steps (0 = at the end only). Ctrl-C also saves one.
    #[arg(long, default_value_t = 200)]
    save_every: u64,
    /// Keep this many most recent checkpoints.
    #[arg(long, default_value_t = 2)]
    keep_last: usize,
    /// Also keep checkpoints at multiples of this step (0 = none).
    #[arg(long, default_value_t = 0)]
    keep_every: u64,
    /// Seed for initialisation, data order and dropout.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Continue from a checkpoint directory; alone (or `latest`): the newest in --out.
    #[arg(long, num_args = 0..=1, default_missing_value = "latest", value_name = "CHECKPOINT")]
    resume: Option<PathBuf>,
    /// Worker threads (default: the number of physical cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Activation checkpointing: keep only each layer's input from the
    /// forward pass and recompute the layer's activations in the backward
    /// pass. Memory for long rows falls from every layer's activations to
    /// one layer's, for one more forward pass of the layers (about a third
    /// more time); gradients are the same.
    #[arg(long)]
    gradient_checkpointing: bool,
    /// No progress bar; one line per evaluation.
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct PretrainArgs {
    /// Directory from `longwriter data tokenize` (meta.json and shards).
    #[arg(long)]
    data: PathBuf,
    /// Model size preset: 1m, 3m, 5m, 10m, 25m, 50m, 100m.
    #[arg(long, default_value = "5m", conflicts_with_all = ["config", "init"])]
    preset: String,
    /// A config.json to build the model from instead of a preset.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Start from this model directory's weights instead of random ones.
    #[arg(long)]
    init: Option<PathBuf>,
    /// Tokenizer directory (default: the one meta.json names).
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Tokens per row.
    #[arg(long, default_value_t = 256)]
    seq_len: usize,
    /// Optimizer steps.
    #[arg(long, default_value_t = 1000)]
    steps: u64,
    /// Validation batches.
    #[arg(long, default_value_t = 8)]
    eval_batches: usize,
    #[command(flatten)]
    run: LoopArgs,
}

#[derive(Args)]
pub struct SftArgs {
    /// The model to fine-tune: a directory (config, weights, tokenizer with a
    /// chat template) or a GGUF file, whose weights are dequantized to f32
    /// and whose tokenizer and chat template are used as the engine uses
    /// them. From a GGUF file only LoRA trains (`--lora-rank`); the adapter
    /// runs on the same file with `--lora DIR`.
    #[arg(long)]
    model: PathBuf,
    /// Chat JSONL: one {"messages": [{"role", "content"}, …]} per line.
    #[arg(long)]
    data: PathBuf,
    /// Tokens per packed row; longer conversations are skipped and counted.
    #[arg(long, default_value_t = 2048)]
    seq_len: usize,
    /// Passes over the data (ignored when --steps is given).
    #[arg(long, default_value_t = 1.0)]
    epochs: f64,
    /// Optimizer steps (default: from --epochs).
    #[arg(long)]
    steps: Option<u64>,
    /// Loss normalisation: `sequence` (LongAlign: mean per sequence, then over
    /// sequences) or `token` (mean over all supervised tokens).
    #[arg(long, default_value = "sequence")]
    loss: String,
    /// Skip malformed lines (reported with their numbers) instead of stopping.
    #[arg(long)]
    skip_bad_lines: bool,
    /// Train LoRA adapters of this rank instead of all weights (0 = full fine-tuning).
    #[arg(long, default_value_t = 0)]
    lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / rank).
    #[arg(long, default_value_t = 16.0)]
    lora_alpha: f32,
    /// LoRA dropout on the adapters' input.
    #[arg(long, default_value_t = 0.05)]
    lora_dropout: f32,
    /// Comma-separated modules to adapt.
    #[arg(
        long,
        default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )]
    lora_targets: String,
    #[command(flatten)]
    run: LoopArgs,
}

/// Training allocates and frees the same large activation buffers every
/// step; served from fresh mmap'd pages each time, the kernel spends a
/// quarter of the run zeroing pages. Keep freed memory in the heap instead.
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tunables; called before the
    // training threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

impl LoopArgs {
    fn spec(
        &self,
        steps: u64,
        optim: OptimSpec,
        extra_files: Vec<PathBuf>,
        kind: &str,
    ) -> TrainSpec {
        TrainSpec {
            steps,
            accum: self.accum,
            optim,
            seed: self.seed,
            eval_every: self.eval_every,
            save_every: self.save_every,
            keep_last: self.keep_last,
            keep_every: self.keep_every,
            out: self.out.clone(),
            extra_files,
            kind: kind.into(),
        }
    }
}

fn optim(a: &LoopArgs, lr: f64, warmup: u64) -> OptimSpec {
    let lr = a.lr.unwrap_or(lr);
    OptimSpec {
        lr,
        min_lr: a.min_lr.unwrap_or(lr / 10.0),
        warmup_steps: a.warmup.unwrap_or(warmup),
        beta2: a.beta2,
        weight_decay: a.weight_decay,
        clip: a.clip,
        ..OptimSpec::default()
    }
}

fn resume_dir(a: &LoopArgs) -> anyhow::Result<Option<PathBuf>> {
    match &a.resume {
        None => Ok(None),
        Some(p) if p.as_os_str() == "latest" => latest_checkpoint(&a.out)
            .map(Some)
            .ok_or_else(|| anyhow::anyhow!("--resume: no checkpoint in {}", a.out.display())),
        Some(p) => Ok(Some(p.clone())),
    }
}

fn check_vocab(
    model: &TrainModel,
    tok: &lw_engine::Tokenizer,
    tokenizer_dir: &Path,
) -> anyhow::Result<()> {
    if tok.id_bound() > model.cfg.vocab_size {
        return Err(lw_train::TrainError::VocabMismatch {
            path: tokenizer_dir.join("tokenizer.json"),
            tokenizer: tok.id_bound(),
            model: model.cfg.vocab_size,
        }
        .into());
    }
    Ok(())
}

/// Runs the loop with a progress bar and writes final/ and the loss chart.
fn run_loop(
    model: &TrainModel,
    source: &dyn BatchSource,
    spec: &TrainSpec,
    a: &LoopArgs,
) -> anyhow::Result<()> {
    let resume = resume_dir(a)?;
    let stop = crate::interrupt::install();
    let mut display = StepDisplay::new(a.quiet, spec.steps);
    let summary = train::train(model, source, spec, resume.as_deref(), stop, &mut |e| {
        display.event(e)
    })?;
    display.bar.finish_and_clear();
    write_loss_chart(&spec.out)?;
    if summary.interrupted {
        eprintln!(
            "interrupted at step {}; continue with the same command and --resume ({})",
            summary.steps_done,
            summary
                .last_checkpoint
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        return Ok(());
    }
    save_final(model, spec, &summary)
}

/// A training run's progress: a bar over the steps with the latest loss,
/// or with --quiet one line per evaluation.
struct StepDisplay {
    bar: ProgressBar,
    quiet: bool,
    steps: u64,
    /// The latest validation loss, shown until the next one.
    last_val: Option<f32>,
}

impl StepDisplay {
    fn new(quiet: bool, steps: u64) -> Self {
        StepDisplay {
            bar: progress::bar_unless(quiet, steps, "steps"),
            quiet,
            steps,
            last_val: None,
        }
    }

    /// A line above the bar, or on stderr when there is none.
    fn say(&self, line: String) {
        if self.quiet {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    fn event(&mut self, e: TrainEvent) {
        match e {
            TrainEvent::Step(s) => {
                self.bar.set_position(s.step);
                if s.val_loss.is_some() {
                    self.last_val = s.val_loss;
                }
                let val = self
                    .last_val
                    .map(|v| format!(" val {v:.3}"))
                    .unwrap_or_default();
                self.bar.set_message(format!(
                    "loss {:.3}{val} lr {:.2e} {:.0} tok/s",
                    s.loss, s.lr, s.tokens_per_s
                ));
                if self.quiet && s.val_loss.is_some() {
                    eprintln!(
                        "step {}/{}: loss {:.4}, validation {:.4}, {:.0} tok/s",
                        s.step,
                        self.steps,
                        s.loss,
                        s.val_loss.unwrap_or(f32::NAN),
                        s.tokens_per_s
                    );
                }
            }
            TrainEvent::Checkpoint(p) => self.say(format!("saved {}", p.display())),
            TrainEvent::Resumed { step, from } => {
                self.bar.set_position(step);
                self.bar.reset_eta();
                self.say(format!("resumed at step {step} from {}", from.display()));
            }
        }
    }
}

/// loss.png and loss.svg in `out` from its loss.jsonl: training and
/// validation loss by step.
fn write_loss_chart(out: &Path) -> anyhow::Result<()> {
    let log = train::read_loss_log(&out.join("loss.jsonl"))?;
    let series = vec![
        (
            "training".to_string(),
            log.iter().map(|s| (s.step as f64, s.loss as f64)).collect(),
        ),
        (
            "validation".to_string(),
            log.iter()
                .filter_map(|s| Some((s.step as f64, s.val_loss? as f64)))
                .collect(),
        ),
    ];
    lw_eval::report::line_chart(out, "loss", "Loss", "step", "loss", &series)?;
    Ok(())
}

/// Saves the trained model (or LoRA adapters) in final/ and says so.
fn save_final(
    model: &TrainModel,
    spec: &TrainSpec,
    summary: &train::TrainSummary,
) -> anyhow::Result<()> {
    let final_dir = spec.out.join("final");
    train::save_model(model, &final_dir, &spec.extra_files)?;
    let what = match model.lora() {
        Some(_) => format!(
            "LoRA adapters in {} (run them with `--lora {}` on the base model, or merge them into a checkpoint directory with `longwriter lora merge --base MODEL --adapter {} --out DIR`)",
            final_dir.display(),
            final_dir.display(),
            final_dir.display()
        ),
        None => format!("model in {}", final_dir.display()),
    };
    eprintln!(
        "done: {} steps, loss {:.4}{}; {what}",
        summary.steps_done,
        summary.final_loss.unwrap_or(f32::NAN),
        summary
            .val_loss
            .map(|v| format!(", validation loss {v:.4}"))
            .unwrap_or_default(),
    );
    Ok(())
}

pub fn pretrain(a: &PretrainArgs) -> anyhow::Result<()> {
    lw_model::set_threads(a.run.threads.unwrap_or_else(lw_model::default_threads));
    keep_freed_memory();
    let mut data = PretrainData::open(&a.data, a.run.batch, a.seq_len, a.run.seed)?;
    data.val_batches = a.eval_batches;
    let tokenizer = a
        .tokenizer
        .clone()
        .or_else(|| data.tokenizer.clone())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "{}/meta.json names no tokenizer; pass --tokenizer",
                a.data.display()
            )
        })?;
    let tok = lw_engine::Tokenizer::from_dir(&tokenizer)?;
    let bos = tok.bos_token().and_then(|t| tok.token_id(t));
    let eos = tok.eos_token().and_then(|t| tok.token_id(t));
    let mut model = if let Some(dir) = &a.init {
        TrainModel::load(dir, None, a.run.seed)?
    } else {
        let json = match &a.config {
            Some(p) => serde_json::from_str(
                &std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            )
            .with_context(|| format!("{}: not JSON", p.display()))?,
            None => lw_train::presets::preset_config(
                &a.preset,
                tok.id_bound(),
                a.seq_len.max(2048),
                bos,
                eos,
            )
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "unknown preset \"{}\" (known: {})",
                    a.preset,
                    lw_train::presets::preset_names().join(", ")
                )
            })?,
        };
        let cfg = lw_model::ModelConfig::from_json(&json.to_string())
            .map_err(|e| anyhow::anyhow!("model config: {e}"))?;
        TrainModel::init(cfg, json, a.run.seed)?
    };
    model.set_checkpointing(a.run.gradient_checkpointing);
    check_vocab(&model, &tok, &tokenizer)?;
    let spec = a.run.spec(
        a.steps,
        optim(&a.run, 1e-3, (a.steps / 20).clamp(1, 500)),
        train::tokenizer_files(&tokenizer),
        "pretrain",
    );
    let per_step = (a.run.batch * a.seq_len * a.run.accum) as u64;
    eprintln!(
        "model: {:.2}M parameters ({} layers, hidden {}); data: {} training tokens; {} steps × {} tokens = {:.1}M tokens",
        model.cfg.parameter_count() as f64 / 1e6,
        model.cfg.num_layers,
        model.cfg.hidden_size,
        data.train_tokens(),
        a.steps,
        per_step,
        (a.steps * per_step) as f64 / 1e6
    );
    run_loop(&model, &data, &spec, &a.run)
}

pub fn sft(a: &SftArgs) -> anyhow::Result<()> {
    lw_model::set_threads(a.run.threads.unwrap_or_else(lw_model::default_threads));
    keep_freed_memory();
    let mode = match a.loss.as_str() {
        "sequence" | "longalign" => LossMode::SequenceMean,
        "token" => LossMode::TokenMean,
        other => anyhow::bail!("--loss must be `sequence` or `token`, not \"{other}\""),
    };
    let lora = (a.lora_rank > 0).then(|| LoraSpec {
        rank: a.lora_rank,
        alpha: a.lora_alpha,
        dropout: a.lora_dropout,
        targets: a
            .lora_targets
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect(),
    });
    let gguf = lw_engine::source::is_gguf(&a.model);
    if gguf && lora.is_none() {
        anyhow::bail!(
            "{}: a GGUF file trains with LoRA only: pass --lora-rank N (the adapter then runs on this file with --lora), or fine-tune the original checkpoint directory",
            a.model.display()
        );
    }
    let mut model = if gguf {
        TrainModel::load_gguf(&a.model, lora, a.run.seed)?
    } else {
        TrainModel::load(&a.model, lora, a.run.seed)?
    };
    model.set_checkpointing(a.run.gradient_checkpointing);
    let tok = lw_engine::source::load_tokenizer(&a.model)?;
    check_vocab(&model, &tok, &a.model)?;
    let (convs, bad) = lw_train::read_conversations(&a.data, a.skip_bad_lines)?;
    for b in bad.iter().take(10) {
        eprintln!(
            "{}, line {}: skipped: {}",
            a.data.display(),
            b.line,
            b.reason
        );
    }
    if bad.len() > 10 {
        eprintln!("… {} more lines skipped", bad.len() - 10);
    }
    let mut seqs = Vec::with_capacity(convs.len());
    for (i, c) in convs.iter().enumerate() {
        seqs.push(
            lw_train::tokenize_conversation(&tok, c).map_err(|e| {
                anyhow::anyhow!("{}: conversation {}: {e}", a.data.display(), i + 1)
            })?,
        );
    }
    let data = SftData::pack(seqs, a.seq_len, a.run.batch, mode, a.run.seed)?;
    let st = &data.stats;
    eprintln!(
        "data: {} conversations ({} skipped as malformed, {} longer than {} tokens) packed into {} rows of {} ({} tokens, {} supervised)",
        st.sequences,
        bad.len(),
        st.too_long,
        a.seq_len,
        st.rows,
        a.seq_len,
        st.tokens,
        st.supervised
    );
    let steps = a
        .steps
        .unwrap_or_else(|| steps_for_epochs(data.train_rows(), a.run.batch, a.run.accum, a.epochs));
    let lr = if model.lora().is_some() { 2e-4 } else { 2e-5 };
    let spec = a.run.spec(
        steps,
        optim(&a.run, lr, (steps / 20).max(1)),
        train::tokenizer_files(&a.model),
        "sft",
    );
    eprintln!(
        "{} trainable values ({}); {steps} steps",
        model.trainable_count(),
        match model.lora() {
            Some(l) => format!("LoRA rank {} on {}", l.rank, l.targets.join(",")),
            None => "all weights".into(),
        }
    );
    run_loop(&model, &data, &spec, &a.run)
}

/// A fixed fine-tuning recipe for studies: all weights, token-mean loss,
/// packed rows, no checkpoints but the one an interrupt saves.
pub struct Recipe {
    pub steps: u64,
    pub lr: f64,
    pub batch: usize,
    pub seq_len: usize,
    pub seed: u64,
    pub threads: Option<usize>,
}

/// Fine-tunes the model in `model_dir` on `seqs` with `r` into `out`
/// (resuming from a checkpoint an interrupt left there); returns the
/// directory of the fine-tuned model, or `None` when interrupted.
pub fn finetune(
    model_dir: &Path,
    seqs: Vec<lw_train::data::Tokenized>,
    r: &Recipe,
    out: &Path,
) -> anyhow::Result<Option<PathBuf>> {
    lw_model::set_threads(r.threads.unwrap_or_else(lw_model::default_threads));
    keep_freed_memory();
    let a = LoopArgs {
        out: out.to_path_buf(),
        batch: r.batch,
        accum: 1,
        lr: Some(r.lr),
        min_lr: None,
        warmup: None,
        weight_decay: 0.1,
        beta2: 0.95,
        clip: 1.0,
        eval_every: 0,
        save_every: 0,
        keep_last: 1,
        keep_every: 0,
        seed: r.seed,
        resume: latest_checkpoint(out).map(|_| PathBuf::from("latest")),
        threads: r.threads,
        gradient_checkpointing: false,
        quiet: true,
    };
    let model = TrainModel::load(model_dir, None, r.seed)?;
    let data = SftData::pack(seqs, r.seq_len, r.batch, LossMode::TokenMean, r.seed)?;
    let spec = a.spec(
        r.steps,
        optim(&a, r.lr, (r.steps / 20).max(1)),
        train::tokenizer_files(model_dir),
        "sft",
    );
    run_loop(&model, &data, &spec, &a)?;
    let done = out.join("final");
    Ok(done.join("config.json").exists().then_some(done))
}

pub fn merge(a: &MergeArgs) -> anyhow::Result<()> {
    let s = lw_train::lora::merge(&a.base, &a.adapter, &a.out)?;
    eprintln!(
        "merged {} adapted matrices into {} ({} weights)",
        s.merged_modules,
        a.out.display(),
        s.dtype
    );
    Ok(())
}

/// The checkpoints of a training run: `(name, step, dir)` in step order.
pub fn run_checkpoints(run: &Path) -> anyhow::Result<Vec<(String, u64, PathBuf)>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(run).with_context(|| format!("reading {}", run.display()))? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if let Some(step) = name
            .strip_prefix("checkpoint-")
            .and_then(|n| n.parse().ok())
        {
            out.push((name.to_string(), step, path));
        }
    }
    out.sort_by_key(|m| m.1);
    if out.is_empty() {
        anyhow::bail!(
            "{}: no checkpoint-NNNNNNN directories (train with --save-every and --keep-every)",
            run.display()
        );
    }
    Ok(out)
}
