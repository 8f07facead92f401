//! The checkpoint fine-tuning study: how pretraining and fine-tuning
//! interact. `study mc-tasks` makes multiple-choice tasks from a corpus;
//! `study checkpoints` evaluates every checkpoint of a pretraining run on
//! them, fine-tunes each checkpoint on one task with a fixed recipe, and
//! evaluates the fine-tuned model again: the gain on the task fine-tuned
//! on, and what the others gain or lose (forgetting), by pretraining step.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::Args;
use lw_study::tasks::{make_tasks, sentences, TASKS};
use serde_json::{json, Value};

#[derive(Args)]
pub struct McTasksArgs {
    /// Corpus files: JSON lines with a "text" per document (as
    /// scripts/fetch_corpus.sh writes them), or plain text files (one
    /// document each); a directory stands for the .jsonl and .txt files in it.
    #[arg(required = true)]
    corpus: Vec<PathBuf>,
    /// Output directory: train/TASK.jsonl and test/TASK.jsonl.
    #[arg(long)]
    out: PathBuf,
    /// Training questions per task (half English, half Chinese).
    #[arg(long, default_value_t = 2000)]
    train: usize,
    /// Test questions per task.
    #[arg(long, default_value_t = 200)]
    test: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Args)]
pub struct CheckpointsArgs {
    /// A `train pretrain` output directory: every checkpoint-NNNNNNN in it
    /// (train with --save-every and --keep-every to keep several).
    #[arg(long)]
    pretrain_run: PathBuf,
    /// The tasks: an `mc-tasks` output directory.
    #[arg(long)]
    tasks: PathBuf,
    /// The task every checkpoint is fine-tuned on (its train split).
    #[arg(long, default_value = "instruct")]
    sft_task: String,
    /// Comma-separated tasks evaluated before and after fine-tuning (their
    /// test splits); default: every task in --tasks.
    #[arg(long)]
    eval_tasks: Option<String>,
    /// Report directory: results.jsonl (a rerun keeps what is in it),
    /// sft/CHECKPOINT/ (the fine-tuned models), report.md and charts.
    #[arg(long)]
    out: PathBuf,
    /// Fine-tuning steps per checkpoint.
    #[arg(long, default_value_t = 100)]
    sft_steps: u64,
    /// Fine-tuning peak learning rate (cosine decay to a tenth).
    #[arg(long, default_value_t = 1e-3)]
    sft_lr: f64,
    /// Packed rows per fine-tuning step.
    #[arg(long, default_value_t = 8)]
    sft_batch: usize,
    /// Tokens per packed fine-tuning row.
    #[arg(long, default_value_t = 256)]
    sft_seq_len: usize,
    /// Only the first N test questions of each task.
    #[arg(long)]
    eval_limit: Option<usize>,
    /// Seed of the fine-tuning's data order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    engine: crate::EngineArgs,
}

/// The documents of the corpus files (see [`McTasksArgs::corpus`]).
fn read_corpus(paths: &[PathBuf]) -> anyhow::Result<Vec<String>> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut inner: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|x| x == "jsonl" || x == "txt"))
                .collect();
            inner.sort();
            if inner.is_empty() {
                anyhow::bail!("{}: no .jsonl or .txt files", p.display());
            }
            files.extend(inner);
        } else {
            files.push(p.clone());
        }
    }
    let mut docs = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        if f.extension().is_some_and(|x| x == "jsonl") {
            for (n, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let v: Value = serde_json::from_str(line)
                    .with_context(|| format!("{}:{}: invalid JSON", f.display(), n + 1))?;
                let t = v
                    .get("text")
                    .and_then(Value::as_str)
                    .with_context(|| format!("{}:{}: no \"text\" string", f.display(), n + 1))?;
                docs.push(t.to_string());
            }
        } else {
            docs.push(text);
        }
    }
    Ok(docs)
}

pub fn mc_tasks(a: &McTasksArgs) -> anyhow::Result<()> {
    if a.train == 0 || a.test == 0 {
        anyhow::bail!("--train and --test must be positive");
    }
    let docs = read_corpus(&a.corpus)?;
    let sents = sentences(&docs);
    let tasks = make_tasks(&sents, a.train, a.test, a.seed)?;
    for task in &tasks {
        for (split, qs) in [("train", &task.train), ("test", &task.test)] {
            let dir = a.out.join(split);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            crate::results::save(&dir.join(format!("{}.jsonl", task.name)), qs)?;
        }
    }
    eprintln!(
        "{} documents, {} sentences; {} tasks ({}) of {} training and {} test questions in {}",
        docs.len(),
        sents.len(),
        tasks.len(),
        TASKS.join(", "),
        a.train,
        a.test,
        a.out.display()
    );
    Ok(())
}

/// One evaluation: a task's accuracy for a checkpoint, before or after
/// fine-tuning.
fn result_line(label: &str, step: u64, phase: &str, task: &str, s: &lw_eval::McSummary) -> Value {
    json!({
        "checkpoint": label,
        "step": step,
        "phase": phase,
        "task": task,
        "items": s.items,
        "acc": s.acc,
        "acc_norm": s.acc_norm,
        "acc_stderr": s.acc_stderr,
    })
}

fn has(results: &[Value], label: &str, phase: &str, task: &str) -> bool {
    results
        .iter()
        .any(|r| r["checkpoint"] == label && r["phase"] == phase && r["task"] == task)
}

pub fn checkpoints(a: &CheckpointsArgs) -> anyhow::Result<()> {
    let task_file = |split: &str, t: &str| a.tasks.join(split).join(format!("{t}.jsonl"));
    let eval_names: Vec<String> = match &a.eval_tasks {
        Some(list) => list
            .split(',')
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
            .collect(),
        None => TASKS
            .iter()
            .filter(|t| task_file("test", t).exists())
            .map(|t| t.to_string())
            .collect(),
    };
    if eval_names.is_empty() {
        anyhow::bail!(
            "{}: no test/TASK.jsonl files (make them with `longwriter study mc-tasks`)",
            a.tasks.display()
        );
    }
    let mut eval_tasks = Vec::new();
    for t in &eval_names {
        let path = task_file("test", t);
        let mut items = lw_eval::read_mc_items(&path)?;
        items.truncate(a.eval_limit.unwrap_or(usize::MAX));
        eval_tasks.push((t.clone(), path, items));
    }
    let sft_path = task_file("train", &a.sft_task);
    let sft_items = lw_eval::read_mc_items(&sft_path)?;
    let models = crate::train::run_checkpoints(&a.pretrain_run)?;
    let (results_path, mut results) = crate::results::open(&a.out)?;
    let model_args = |dir: &Path| crate::ModelArgs {
        model: dir.display().to_string(),
        fallback_to_tiny: false,
        engine: a.engine.clone(),
    };
    for (label, step, dir) in &models {
        for phase in ["before", "after"] {
            let missing: Vec<usize> = (0..eval_tasks.len())
                .filter(|&i| !has(&results, label, phase, &eval_tasks[i].0))
                .collect();
            if missing.is_empty() {
                eprintln!("{label}: {phase} fine-tuning: done before, kept");
                continue;
            }
            let model_dir = if phase == "before" {
                dir.clone()
            } else {
                let ft = a.out.join("sft").join(label);
                if ft.join("final").join("config.json").exists() {
                    ft.join("final")
                } else {
                    let engine = crate::run::load_engine(&model_args(dir))?;
                    let model = engine.shared().clone();
                    drop(engine);
                    let mut seqs = Vec::with_capacity(sft_items.len());
                    for item in &sft_items {
                        let (ctx, conts) = crate::eval::mc_tokens(&model, item).map_err(|e| {
                            anyhow::anyhow!("{}: question {}: {e}", sft_path.display(), item.id)
                        })?;
                        let answer = &conts[item.answer];
                        let mut tokens = ctx.clone();
                        tokens.extend_from_slice(answer);
                        let mut supervised = vec![false; ctx.len()];
                        supervised.resize(tokens.len(), true);
                        seqs.push(lw_train::data::Tokenized { tokens, supervised });
                    }
                    eprintln!(
                        "{label}: fine-tuning on {} ({} questions, {} steps)",
                        a.sft_task,
                        seqs.len(),
                        a.sft_steps
                    );
                    let recipe = crate::train::Recipe {
                        steps: a.sft_steps,
                        lr: a.sft_lr,
                        batch: a.sft_batch,
                        seq_len: a.sft_seq_len,
                        seed: a.seed,
                        threads: a.engine.threads,
                    };
                    match crate::train::finetune(dir, seqs, &recipe, &ft)? {
                        Some(done) => done,
                        None => {
                            eprintln!("interrupted; rerun the same command to continue");
                            return Ok(());
                        }
                    }
                }
            };
            let mut engine = crate::run::load_engine(&model_args(&model_dir))?;
            for i in missing {
                let (task, path, items) = &eval_tasks[i];
                let results_now = crate::eval::score_mc(
                    &mut engine,
                    path,
                    items,
                    &indicatif::ProgressBar::hidden(),
                )?;
                let s = lw_eval::summarize(&results_now);
                eprintln!(
                    "{label}: {phase} fine-tuning: {task} acc {:.3} ({} questions)",
                    s.acc, s.items
                );
                results.push(result_line(label, *step, phase, task, &s));
                crate::results::save(&results_path, &results)?;
            }
        }
    }
    let chance: Vec<(String, f64)> = eval_tasks
        .iter()
        .map(|(t, _, items)| {
            let c = items
                .iter()
                .map(|q| 1.0 / q.choices.len() as f64)
                .sum::<f64>()
                / items.len().max(1) as f64;
            (t.clone(), c)
        })
        .collect();
    report(a, &models, &chance, &results)?;
    eprintln!("report: {}", a.out.join("report.md").display());
    Ok(())
}

fn acc_of(results: &[Value], label: &str, phase: &str, task: &str) -> Option<f64> {
    results
        .iter()
        .find(|r| r["checkpoint"] == label && r["phase"] == phase && r["task"] == task)
        .and_then(|r| r["acc"].as_f64())
}

/// report.md and its charts: accuracy per task and checkpoint before and
/// after fine-tuning, the gain on the task fine-tuned on and the change on
/// the others.
fn report(
    a: &CheckpointsArgs,
    models: &[(String, u64, PathBuf)],
    chance: &[(String, f64)],
    results: &[Value],
) -> anyhow::Result<()> {
    let mut md = format!(
        "# Fine-tuning every pretraining checkpoint\n\n\
         Pretraining run `{}`; every checkpoint evaluated on the test splits of the tasks \
         (accuracy by log-likelihood, `eval mc`), fine-tuned on the training split of \
         **{}** ({} steps, peak learning rate {}, {} packed rows of {} tokens, all weights, \
         loss on the answer only), and evaluated again. Gain = after − before; on the tasks \
         not fine-tuned on, a negative gain is forgetting.\n\n\
         | checkpoint | step | task | chance | before | after | gain |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        a.pretrain_run.display(),
        a.sft_task,
        a.sft_steps,
        a.sft_lr,
        a.sft_batch,
        a.sft_seq_len
    );
    let f = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    let g = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:+.3}"));
    for (label, step, _) in models {
        for (task, c) in chance {
            let before = acc_of(results, label, "before", task);
            let after = acc_of(results, label, "after", task);
            let name = if *task == a.sft_task {
                format!("**{task}** (fine-tuned)")
            } else {
                task.clone()
            };
            md.push_str(&format!(
                "| {label} | {step} | {name} | {c:.3} | {} | {} | {} |\n",
                f(before),
                f(after),
                g(after.zip(before).map(|(x, y)| x - y))
            ));
        }
    }
    md.push_str(
        "\n| checkpoint | step | gain on the task fine-tuned on | mean change on the others | \
         largest loss on another |\n| --- | --- | --- | --- | --- |\n",
    );
    for (label, step, _) in models {
        let gain = |t: &str| {
            acc_of(results, label, "after", t)
                .zip(acc_of(results, label, "before", t))
                .map(|(x, y)| x - y)
        };
        let others: Vec<f64> = chance
            .iter()
            .filter(|(t, _)| *t != a.sft_task)
            .filter_map(|(t, _)| gain(t))
            .collect();
        let mean = (!others.is_empty()).then(|| others.iter().sum::<f64>() / others.len() as f64);
        let worst = others.iter().copied().reduce(f64::min);
        md.push_str(&format!(
            "| {label} | {step} | {} | {} | {} |\n",
            g(gain(&a.sft_task)),
            g(mean),
            g(worst)
        ));
    }
    let series = |phase: &str| -> Vec<(String, Vec<(f64, f64)>)> {
        chance
            .iter()
            .map(|(t, _)| {
                let pts = models
                    .iter()
                    .filter_map(|(label, step, _)| {
                        let y = match phase {
                            "gain" => acc_of(results, label, "after", t)
                                .zip(acc_of(results, label, "before", t))
                                .map(|(x, y)| x - y),
                            p => acc_of(results, label, p, t),
                        }?;
                        Some((*step as f64, y))
                    })
                    .collect();
                (t.clone(), pts)
            })
            .collect()
    };
    for (phase, title, ylabel) in [
        ("before", "Accuracy before fine-tuning", "accuracy"),
        ("after", "Accuracy after fine-tuning", "accuracy"),
        ("gain", "Gain from fine-tuning", "after − before"),
    ] {
        let name = format!("checkpoints-{phase}");
        lw_eval::report::line_chart(
            &a.out,
            &name,
            title,
            "pretraining step",
            ylabel,
            &series(phase),
        )?;
        md.push_str(&format!("\n![{title}]({name}.svg)\n"));
    }
    let path = a.out.join("report.md");
    lw_core::fs::write_atomic(&path, md.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}
