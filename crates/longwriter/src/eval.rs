//! `longwriter eval`: generate responses for a benchmark (`run`), score
//! their length (`length`), have a judge score their quality (`quality`),
//! read the length ruler (`ruler`).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Mutex;

use anyhow::Context;
use clap::{Args, Subcommand};
use lw_core::{Counter, Message, SamplingParams};
use lw_eval::judge::{judge_prompt, parse_judgement, quality_scores, Judgement, DIMENSIONS};
use lw_eval::{read_items, read_predictions, LengthReport, Prediction, Repetition};
use lw_write::{ChatRequest, Mode};
use serde_json::json;

use crate::progress;
use crate::write::BackendArgs;

#[derive(Subcommand)]
pub enum EvalCommand {
    /// Generate a response for every benchmark item into DIR/pred.jsonl (resumable).
    Run(RunArgs),
    /// Length score S_l per item, per length bucket, per type and overall,
    /// with repetition metrics.
    Length(LengthArgs),
    /// Quality score S_q from a judge model (any backend) on six dimensions.
    Quality(QualityArgs),
    /// Produced against required length per model: the length ruler.
    Ruler(RulerArgs),
    /// A Markdown report with PNG and SVG charts over one or more runs.
    Report(ReportArgs),
    /// Multiple-choice accuracy by log-likelihood (lm-evaluation-harness's
    /// `acc` and `acc_norm`) on a local model: JSON lines {"prompt",
    /// "choices", "answer"} (`answer` a choice index or text).
    Mc(McArgs),
}

#[derive(Args)]
pub struct McArgs {
    #[command(flatten)]
    model: crate::ModelArgs,
    /// Task file(s): JSON lines {"prompt", "choices", "answer"[, "id"]}.
    #[arg(required = true)]
    tasks: Vec<PathBuf>,
    /// Per-question scores (choices' log-probability sums, token counts,
    /// picks) as JSON lines, one file per task: OUT/<task>.jsonl.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only the first N questions of each task.
    #[arg(long)]
    limit: Option<usize>,
    /// Print the summary as JSON (one object per task).
    #[arg(long)]
    json: bool,
    #[arg(long)]
    quiet: bool,
}

#[derive(Args)]
pub struct ReportArgs {
    /// Run directories of `eval run` (or pred.jsonl files); judge.jsonl
    /// beside the predictions adds quality.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Where report.md and the charts go.
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value = "longbench", value_parser = ["longbench", "unicode"])]
    counter: String,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    model: BackendArgs,
    /// Benchmark file: JSON lines {"prompt", "type", "length"} (e.g. data/eval/longbench-lw.jsonl).
    #[arg(long)]
    bench: PathBuf,
    /// Output directory (pred.jsonl; runs/ in agentwrite mode). Rerun to resume.
    #[arg(long)]
    out: PathBuf,
    /// `direct`: one call per item; `agentwrite`: plan, then write.
    #[arg(long, default_value = "direct")]
    mode: Mode,
    /// Items in flight at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    #[arg(long, default_value_t = 0.5)]
    temperature: f32,
    #[arg(long, default_value_t = 0.8)]
    top_p: f32,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Largest answer in direct mode, in tokens (with a local model, at
    /// most what its context leaves after the prompt).
    #[arg(long, default_value_t = 32768)]
    max_tokens: usize,
    /// Only the first N items.
    #[arg(long)]
    limit: Option<usize>,
    /// Counter for the lengths stored with predictions.
    #[arg(long, default_value = "longbench", value_parser = ["longbench", "unicode"])]
    counter: String,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
    /// DRY strength against repeated phrases (0 = off, the benchmark's
    /// setting).
    #[arg(long, default_value_t = 0.0)]
    dry_multiplier: f32,
    /// AgentWrite mode without the plan grammar and section length control.
    #[arg(long)]
    no_constrain: bool,
}

#[derive(Args)]
pub struct LengthArgs {
    /// Predictions: ours (pred.jsonl) or the original benchmark's files.
    pred: PathBuf,
    /// `longbench` (the benchmark's definition, for comparable scores) or `unicode`.
    #[arg(long, default_value = "longbench", value_parser = ["longbench", "unicode"])]
    counter: String,
    /// One JSON object: overall, by_bucket, by_type, items.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct QualityArgs {
    /// The judge: a local model (--model) or a server (--api-base).
    #[command(flatten)]
    judge: BackendArgs,
    /// Predictions to judge.
    pred: PathBuf,
    /// Where judgements go (default: judge.jsonl beside the predictions).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Asks per item before it is reported as unparsed.
    #[arg(long, default_value_t = 5)]
    tries: usize,
    /// Items judged at once.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Largest judge answer, in tokens.
    #[arg(long, default_value_t = 512)]
    max_tokens: usize,
    /// Counter for S_l in the combined score.
    #[arg(long, default_value = "longbench", value_parser = ["longbench", "unicode"])]
    counter: String,
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct RulerArgs {
    /// One predictions file per model (ruler runs).
    #[arg(required = true)]
    preds: Vec<PathBuf>,
    #[arg(long, default_value = "longbench", value_parser = ["longbench", "unicode"])]
    counter: String,
    #[arg(long)]
    json: bool,
}

pub fn run(cmd: &EvalCommand) -> anyhow::Result<()> {
    match cmd {
        EvalCommand::Run(a) => eval_run(a),
        EvalCommand::Length(a) => length(a),
        EvalCommand::Quality(a) => quality(a),
        EvalCommand::Ruler(a) => ruler(a),
        EvalCommand::Report(a) => report(a),
        EvalCommand::Mc(a) => mc(a),
    }
}

fn mc(a: &McArgs) -> anyhow::Result<()> {
    let tasks: Vec<(PathBuf, Vec<lw_eval::McItem>)> = a
        .tasks
        .iter()
        .map(|t| {
            let mut items = lw_eval::read_mc_items(t)?;
            items.truncate(a.limit.unwrap_or(usize::MAX));
            Ok((t.clone(), items))
        })
        .collect::<anyhow::Result<_>>()?;
    let mut engine = crate::run::load_engine(&a.model)?;
    if let Some(dir) = &a.out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    for (path, items) in &tasks {
        let name = path
            .file_stem()
            .map_or("task".into(), |s| s.to_string_lossy().into_owned());
        let bar = progress::bar_unless(a.quiet || a.json, items.len() as u64, "questions");
        let results = score_mc(&mut engine, path, items, &bar)?;
        bar.finish_and_clear();
        let summary = lw_eval::summarize(&results);
        if let Some(dir) = &a.out {
            let file = dir.join(format!("{name}.jsonl"));
            let mut text = String::new();
            for r in &results {
                text.push_str(&serde_json::to_string(r)?);
                text.push('\n');
            }
            lw_core::fs::write_atomic(&file, text.as_bytes())
                .with_context(|| format!("writing {}", file.display()))?;
        }
        if a.json {
            let mut v = serde_json::to_value(&summary)?;
            v["task"] = json!(name);
            println!("{v}");
        } else {
            println!(
                "{name}: {} questions, acc {:.4} ± {:.4}, acc_norm {:.4} ± {:.4}",
                summary.items,
                summary.acc,
                summary.acc_stderr,
                summary.acc_norm,
                summary.acc_norm_stderr
            );
        }
    }
    Ok(())
}

/// A question's context and its choices' continuation tokens, as the
/// harness scores them: a chat question's context is its prompt rendered
/// as a user turn with the generation prompt (special tokens read from the
/// text), any other's the raw prompt (an empty one read as the
/// end-of-text token).
pub(crate) fn mc_tokens(
    model: &lw_engine::Model,
    item: &lw_eval::McItem,
) -> Result<(Vec<u32>, Vec<Vec<u32>>), String> {
    use lw_eval::mc::{continuation_tokens, split_context};
    type Encode<'a> = Box<dyn FnMut(&str) -> Result<Vec<u32>, String> + 'a>;
    let (context, mut encode): (String, Encode) = if item.chat {
        let text = model
            .chat_prompt(&[Message::user(item.prompt.as_str())], true)
            .map_err(|e| e.to_string())?;
        let tok = model.tokenizer();
        (
            text,
            Box::new(move |t: &str| tok.encode(t, false).map_err(|e| e.to_string())),
        )
    } else {
        (
            split_context(&item.prompt, "").0,
            Box::new(|t: &str| model.encode_raw(t).map_err(|e| e.to_string())),
        )
    };
    let ctx = encode(&context)?;
    let continuations: Vec<String> = item
        .choices
        .iter()
        .map(|choice| {
            if item.chat {
                choice.clone()
            } else {
                split_context(&item.prompt, choice).1
            }
        })
        .collect();
    let joint = continuations
        .iter()
        .map(|c| continuation_tokens(&mut *encode, &context, &ctx, c))
        .collect::<Result<Vec<_>, _>>();
    // Where a choice merges into the prompt's last token (a Chinese
    // character completing a word the vocabulary holds whole), no token of
    // the joint text is the choice's own: then every choice of the question
    // is tokenized by itself, after the prompt's tokens.
    let conts = match joint {
        Ok(c) => c,
        Err(_) => continuations
            .iter()
            .map(|c| {
                let ids = model
                    .tokenizer()
                    .encode(c, false)
                    .map_err(|e| e.to_string())?;
                if ids.is_empty() {
                    return Err(format!("{c:?} has no tokens"));
                }
                Ok(ids)
            })
            .collect::<Result<Vec<_>, _>>()?,
    };
    // A prompt of no tokens is read after the tokenizer's end-of-text
    // token, as the harness does.
    if ctx.is_empty() {
        let tokenizer = model.tokenizer();
        let start = tokenizer
            .eos_token()
            .and_then(|t| tokenizer.token_id(t))
            .or_else(|| model.eos_ids().first().copied())
            .unwrap_or(0);
        return Ok((vec![start], conts));
    }
    Ok((ctx, conts))
}

/// Scores every question of a task file (`path` names it in errors).
pub(crate) fn score_mc(
    engine: &mut lw_engine::Engine,
    path: &Path,
    items: &[lw_eval::McItem],
    bar: &indicatif::ProgressBar,
) -> anyhow::Result<Vec<lw_eval::McResult>> {
    let model = engine.shared().clone();
    let mut results = Vec::with_capacity(items.len());
    for item in items {
        let where_ = |e: String| anyhow::anyhow!("{}: question {}: {e}", path.display(), item.id);
        let (ctx, conts) = mc_tokens(&model, item).map_err(where_)?;
        let logprobs = engine
            .continuation_logprobs(&ctx, &conts)
            .map_err(|e| where_(e.to_string()))?;
        let sums = logprobs.iter().map(|l| l.iter().sum()).collect();
        results.push(lw_eval::McResult::new(item, sums, conts));
        bar.inc(1);
    }
    Ok(results)
}

fn eval_run(a: &RunArgs) -> anyhow::Result<()> {
    let mut items = read_items(&a.bench)?;
    if let Some(n) = a.limit {
        items.truncate(n);
    }
    let opts = lw_eval::RunOptions {
        mode: a.mode,
        concurrency: a.concurrency.max(1),
        sampling: SamplingParams {
            temperature: a.temperature,
            top_p: a.top_p,
            seed: a.seed,
            dry_multiplier: a.dry_multiplier,
            ..Default::default()
        },
        max_new_tokens: a.max_tokens,
        counter: a.counter.parse().map_err(anyhow::Error::msg)?,
        constrain: !a.no_constrain,
    };
    let factory = a.model.factory(opts.concurrency)?;
    // Ctrl-C: the run ends after the items in flight.
    let stop = crate::interrupt::install();
    let bar = progress::bar_unless(a.quiet, items.len() as u64, "items");
    let failed = Mutex::new(0usize);
    let summary = lw_eval::run(&items, &a.out, &opts, &*factory, stop, &|p: &Prediction| {
        if p.error.is_some() {
            *failed.lock().unwrap() += 1;
        }
        bar.inc(1);
        bar.set_message(format!(
            "{}: {} of {} words{}",
            p.id,
            p.response_length,
            p.length,
            if p.error.is_some() { " (failed)" } else { "" }
        ));
    })?;
    bar.finish_and_clear();
    let path = lw_eval::run::predictions_path(&a.out);
    eprintln!(
        "{}: {} items, {} resumed, {} generated now, {} failed{}",
        path.display(),
        summary.total,
        summary.resumed,
        summary.generated,
        summary.failed,
        if summary.stopped {
            "; stopped (rerun the same command to resume)"
        } else {
            ""
        }
    );
    let preds = lw_eval::latest_predictions(read_predictions(&path)?);
    let r = LengthReport::new(&preds, opts.counter);
    eprintln!(
        "S_l = {:.1} over {} items ({} counter)",
        r.overall, r.items_scored, r.counter
    );
    if summary.stopped {
        anyhow::bail!("stopped before the end; rerun the same command to resume");
    }
    Ok(())
}

fn load_preds(path: &Path) -> anyhow::Result<Vec<Prediction>> {
    let preds = lw_eval::latest_predictions(read_predictions(path)?);
    if preds.is_empty() {
        anyhow::bail!("{}: no predictions", path.display());
    }
    Ok(preds)
}

fn length(a: &LengthArgs) -> anyhow::Result<()> {
    let counter: Counter = a.counter.parse().map_err(anyhow::Error::msg)?;
    let preds = load_preds(&a.pred)?;
    let r = LengthReport::new(&preds, counter);
    let reps: Vec<Repetition> = preds.iter().map(|p| Repetition::of(&p.response)).collect();
    let degenerate: Vec<&str> = preds
        .iter()
        .zip(&reps)
        .filter(|(_, r)| r.degenerate)
        .map(|(p, _)| p.id.as_str())
        .collect();
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        for (item, rep) in v["items"]
            .as_array_mut()
            .expect("items")
            .iter_mut()
            .zip(&reps)
        {
            item["repetition"] = serde_json::to_value(rep)?;
        }
        v["degenerate"] = json!(degenerate);
        println!("{v}");
        return Ok(());
    }
    println!(
        "S_l = {:.2} over {} items ({} counter)",
        r.overall, r.items_scored, r.counter
    );
    if r.failed > 0 {
        println!("  {} items failed to generate (scored 0)", r.failed);
    }
    println!("by required length:");
    for (b, g) in &r.by_bucket {
        println!("  {b:<10} {:>4} items  S_l {:>6.2}", g.items, g.score);
    }
    println!("by type:");
    for (t, g) in &r.by_type {
        println!("  {t:<14} {:>4} items  S_l {:>6.2}", g.items, g.score);
    }
    let mean = |f: &dyn Fn(&Repetition) -> f64| reps.iter().map(f).sum::<f64>() / reps.len() as f64;
    println!(
        "repetition: seq-rep-4 {:.3}, distinct-2 {:.3} (means); {} degenerate{}",
        mean(&|r| r.seq_rep_4),
        mean(&|r| r.distinct_2),
        degenerate.len(),
        if degenerate.is_empty() {
            String::new()
        } else {
            format!(": {}", degenerate.join(", "))
        }
    );
    Ok(())
}

/// One item's judgement (`None` if no answer parsed), the asks it took, and
/// what was wrong with the answers that did not parse.
type Judged = (Option<Judgement>, usize, Vec<String>);

fn judge_one(
    model: &mut dyn lw_write::LanguageModel,
    p: &Prediction,
    tries: usize,
    max_tokens: usize,
) -> Judged {
    let mut problems = Vec::new();
    for attempt in 0..tries.max(1) {
        let req = ChatRequest {
            messages: vec![Message::user(judge_prompt(&p.prompt, &p.response))],
            max_tokens,
            sampling: SamplingParams {
                temperature: if attempt == 0 { 0.0 } else { 0.7 },
                seed: attempt as u64,
                ..Default::default()
            },
            stop: vec![],
            ..Default::default()
        };
        match model.complete(&req, &mut |_| true) {
            Ok(r) => match parse_judgement(&r.text) {
                Ok(j) => return (Some(j), attempt + 1, problems),
                Err(e) => problems.push(format!("try {}: {e}", attempt + 1)),
            },
            Err(e) => problems.push(format!("try {}: {e}", attempt + 1)),
        }
    }
    (None, tries.max(1), problems)
}

/// `eval quality`: judge every prediction, write judge.jsonl, report S_q.
fn quality(a: &QualityArgs) -> anyhow::Result<()> {
    let counter: Counter = a.counter.parse().map_err(anyhow::Error::msg)?;
    let preds = load_preds(&a.pred)?;
    let out = a
        .out
        .clone()
        .unwrap_or_else(|| a.pred.with_file_name("judge.jsonl"));
    let factory = a.judge.factory(a.concurrency.max(1))?;
    let results = judge_all(a, &preds, &*factory)?;
    write_judgements(&out, &preds, &results)?;
    let judged: Vec<Judgement> = results.iter().filter_map(|r| r.1 .0.clone()).collect();
    let unparsed: Vec<&str> = results
        .iter()
        .filter(|r| r.1 .0.is_none())
        .map(|r| preds[r.0].id.as_str())
        .collect();
    let s_l = LengthReport::new(&preds, counter).overall;
    let q = quality_scores(&judged);
    let report = QualityReport {
        judged: judged.len(),
        items: preds.len(),
        unparsed,
        tries: a.tries,
        q,
        s_l,
        out: &out,
    };
    if a.json {
        report.print_json();
    } else {
        report.print_text();
    }
    if judged.is_empty() {
        anyhow::bail!("no item could be judged");
    }
    Ok(())
}

/// Judges the predictions on --concurrency workers, each with its own
/// judge model, with a progress bar; the judgements in prediction order.
fn judge_all(
    a: &QualityArgs,
    preds: &[Prediction],
    factory: &(dyn Fn() -> Result<Box<dyn lw_write::LanguageModel + Send>, String> + Sync),
) -> anyhow::Result<Vec<(usize, Judged)>> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Judged)>> = Mutex::new(Vec::new());
    let bar = progress::bar(preds.len() as u64, "judged");
    let open_error: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..a.concurrency.clamp(1, preds.len()) {
            s.spawn(|| {
                let mut model = match factory() {
                    Ok(m) => m,
                    Err(e) => {
                        open_error.lock().unwrap().get_or_insert(e);
                        return;
                    }
                };
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(p) = preds.get(i) else { return };
                    let judged = judge_one(model.as_mut(), p, a.tries, a.max_tokens);
                    results.lock().unwrap().push((i, judged));
                    bar.inc(1);
                }
            });
        }
    });
    bar.finish_and_clear();
    if let Some(e) = open_error.into_inner().unwrap() {
        anyhow::bail!("cannot open the judge: {e}");
    }
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|r| r.0);
    Ok(results)
}

/// judge.jsonl: per item its scores by dimension, or the problems of the
/// answers that never parsed; written atomically.
fn write_judgements(
    out: &Path,
    preds: &[Prediction],
    results: &[(usize, Judged)],
) -> anyhow::Result<()> {
    let mut lines = String::new();
    for (i, (j, attempts, problems)) in results {
        let p = &preds[*i];
        let v = match j {
            Some(j) => {
                json!({"id": p.id, "scores": DIMENSIONS.iter().zip(j.scores).map(|(d, s)| (d.to_string(), json!(s))).collect::<serde_json::Map<_, _>>(), "attempts": attempts})
            }
            None => json!({"id": p.id, "scores": null, "attempts": attempts, "problems": problems}),
        };
        lines.push_str(&v.to_string());
        lines.push('\n');
    }
    lw_core::write_atomic(out, lines.as_bytes())?;
    Ok(())
}

/// The figures `eval quality` reports.
struct QualityReport<'a> {
    /// Items with a usable judgement, of `items`.
    judged: usize,
    items: usize,
    /// Ids of the items that never gave one, after `tries` asks.
    unparsed: Vec<&'a str>,
    tries: usize,
    /// Mean score per dimension and S_q (none when nothing was judged).
    q: Option<([f64; 6], f64)>,
    s_l: f64,
    /// judge.jsonl.
    out: &'a Path,
}

impl QualityReport<'_> {
    /// One JSON object on stdout.
    fn print_json(&self) {
        let (q, s_l) = (self.q, self.s_l);
        let v = json!({
            "judged": self.judged,
            "unparsed": self.unparsed,
            "by_dimension": q.map(|(d, _)| DIMENSIONS.iter().zip(d).map(|(k, v)| (k.to_string(), json!(v))).collect::<serde_json::Map<_, _>>()),
            "s_q": q.map(|(_, o)| o),
            "s_l": s_l,
            "overall": q.map(|(_, o)| (s_l + o) / 2.0),
            "judgements": self.out,
        });
        println!("{v}");
    }

    /// Text on stdout: counts, unparsed items, scores by dimension.
    fn print_text(&self) {
        println!(
            "judged {} of {} items (judgements: {})",
            self.judged,
            self.items,
            self.out.display()
        );
        if !self.unparsed.is_empty() {
            println!(
                "  {} items never gave a usable judgement after {} tries: {}",
                self.unparsed.len(),
                self.tries,
                self.unparsed.join(", ")
            );
        }
        if let Some((dims, overall)) = self.q {
            for (d, v) in DIMENSIONS.iter().zip(dims) {
                println!("  {d:<20} {v:>6.2}");
            }
            let s_l = self.s_l;
            println!(
                "S_q = {overall:.2}, S_l = {s_l:.2}, (S_l + S_q)/2 = {:.2}",
                (s_l + overall) / 2.0
            );
        }
    }
}

fn ruler(a: &RulerArgs) -> anyhow::Result<()> {
    let counter: Counter = a.counter.parse().map_err(anyhow::Error::msg)?;
    let mut models = Vec::new();
    for path in &a.preds {
        let preds = load_preds(path).with_context(|| format!("reading {}", path.display()))?;
        let mut by_len: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
        for p in &preds {
            by_len
                .entry(p.length)
                .or_default()
                .push(counter.count(&p.response) as u64);
        }
        let rows: Vec<(u64, f64, u64)> = by_len
            .into_iter()
            .map(|(req, v)| {
                (
                    req,
                    v.iter().sum::<u64>() as f64 / v.len() as f64,
                    *v.iter().max().unwrap_or(&0),
                )
            })
            .collect();
        let max_reached = preds
            .iter()
            .map(|p| counter.count(&p.response) as u64)
            .max()
            .unwrap_or(0);
        models.push((path.display().to_string(), rows, max_reached));
    }
    if a.json {
        let v: Vec<_> = models
            .iter()
            .map(|(name, rows, max)| json!({"run": name, "max_length": max, "rows": rows.iter().map(|(r, m, x)| json!({"required": r, "mean_produced": m, "max_produced": x})).collect::<Vec<_>>()}))
            .collect();
        println!("{}", json!({"counter": counter.name(), "runs": v}));
        return Ok(());
    }
    for (name, rows, max) in &models {
        println!(
            "{name}: longest output {max} words ({} counter)",
            counter.name()
        );
        for (r, m, x) in rows {
            println!(
                "  required {r:>6}: mean {m:>8.0}, max {x:>6}  ({:.2}x)",
                m / *r as f64
            );
        }
    }
    Ok(())
}

fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let counter: Counter = a.counter.parse().map_err(anyhow::Error::msg)?;
    let mut runs = Vec::new();
    for path in &a.runs {
        let (pred_path, name) = if path.is_dir() {
            (
                lw_eval::run::predictions_path(path),
                path.file_name().map(|n| n.to_string_lossy().into_owned()),
            )
        } else {
            (
                path.clone(),
                path.parent()
                    .and_then(|p| p.file_name())
                    .map(|n| n.to_string_lossy().into_owned()),
            )
        };
        let preds = load_preds(&pred_path)?;
        let judge_path = pred_path.with_file_name("judge.jsonl");
        let judgements = if judge_path.exists() {
            Some(read_judgements(&judge_path, &preds)?)
        } else {
            None
        };
        runs.push(lw_eval::report::RunData {
            name: name.unwrap_or_else(|| pred_path.display().to_string()),
            preds,
            judgements,
        });
    }
    let path = lw_eval::report::write_report(&runs, counter, &a.out)?;
    println!("{}", path.display());
    Ok(())
}

/// judge.jsonl, aligned with the predictions (None where never parsed).
fn read_judgements(path: &Path, preds: &[Prediction]) -> anyhow::Result<Vec<Option<Judgement>>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut by_id = std::collections::HashMap::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let v: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}:{}: invalid JSON", path.display(), i + 1))?;
        let id = v["id"].as_str().map(String::from).unwrap_or_default();
        let j = v["scores"].as_object().and_then(|m| {
            let mut scores = [0f64; 6];
            for (k, d) in DIMENSIONS.iter().enumerate() {
                scores[k] = m.get(*d)?.as_f64()?;
            }
            Some(Judgement { scores })
        });
        by_id.insert(id, j);
    }
    Ok(preds
        .iter()
        .map(|p| by_id.get(&p.id).cloned().flatten())
        .collect())
}
