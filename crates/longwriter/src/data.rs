//! `longwriter data build | export | stats | select`: long-output SFT data
//! built with AgentWrite against servers or the local engine, in a
//! crash-safe job store, with a progress display and a graceful Ctrl-C.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use indicatif::ProgressBar;
use lw_core::Counter;
use lw_data::{BuildEvent, BuildOptions, DataStore, Gates, Limits, Status};
use lw_write::{Usage, WriteOptions};

use crate::progress;
use crate::write::{BackendArgs, StyleArgs};

#[derive(Args)]
pub struct BuildArgs {
    /// The build's directory: its job store is DIR/data.sqlite. Rerun the
    /// same command after a crash or a stop to continue.
    #[arg(long)]
    out: PathBuf,
    /// Instructions to add: JSONL with a "prompt" per line (other fields
    /// are kept as metadata). Instructions already in the store (same
    /// text) are not added again.
    #[arg(long)]
    instructions: Option<PathBuf>,
    /// Items in flight at once, over all endpoints.
    #[arg(long, short = 'c', default_value_t = 4)]
    concurrency: usize,
    /// Put the rejected items back in the queue for a new attempt (a new
    /// round: new seed, plan and sections).
    #[arg(long)]
    retry_rejected: bool,
    /// Accept an item when delivered ÷ planned words lies in MIN,MAX.
    #[arg(long, default_value = "0.7,1.5")]
    length_band: String,
    /// Reject an item whose seq-rep-4 (share of repeated 4-grams) reaches this.
    #[arg(long, default_value_t = lw_eval::repetition::DEGENERATE_SEQ_REP_4)]
    max_seq_rep: f64,
    /// Start no new item once this many output tokens were spent in this run.
    #[arg(long)]
    max_output_tokens: Option<usize>,
    /// Start no new item once this many tokens (computed prompt + output)
    /// were spent in this run.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Seconds a failed endpoint rests before it gets work again (doubled
    /// per consecutive failure, at most 60).
    #[arg(long, default_value_t = 2.0)]
    endpoint_rest: f64,
    /// No progress display or item lines.
    #[arg(long, short = 'q')]
    quiet: bool,
    #[command(flatten)]
    model: BackendArgs,
    #[command(flatten)]
    planner: crate::write::PlannerArgs,
    #[command(flatten)]
    style: StyleArgs,
}

#[derive(Args)]
pub struct ExportArgs {
    /// The build's directory.
    dir: PathBuf,
    /// Output JSONL: {"messages": [user, assistant]} per accepted item.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// General SFT data (chat JSONL) to mix in.
    #[arg(long)]
    mix: Option<PathBuf>,
    /// General examples per long-output example.
    #[arg(long, default_value_t = 1.0, requires = "mix")]
    mix_ratio: f64,
    /// Shuffle with this seed (mixed data is always shuffled; seed 0 by default).
    #[arg(long)]
    seed: Option<u64>,
}

#[derive(Args)]
pub struct StatsArgs {
    /// The build's directory.
    dir: PathBuf,
    /// Print the figures as one JSON object.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct SelectArgs {
    /// Instructions JSONL ("prompt" per line).
    #[arg(long)]
    input: PathBuf,
    /// Where to write the selected lines.
    #[arg(long, short = 'o')]
    output: PathBuf,
    /// Keep instructions that state a length of at least this many words
    /// (characters for Chinese).
    #[arg(long, default_value_t = 2000)]
    min_words: u32,
}

fn open_store(dir: &std::path::Path) -> anyhow::Result<DataStore> {
    if !dir.join("data.sqlite").is_file() {
        anyhow::bail!("{}: no data build here (no data.sqlite)", dir.display());
    }
    Ok(DataStore::open(dir)?)
}

fn parse_band(s: &str) -> anyhow::Result<(f64, f64)> {
    let bad = || format!("--length-band {s}: expected MIN,MAX with 0 ≤ MIN ≤ MAX, e.g. 0.7,1.5");
    let (a, b) = s.split_once(',').with_context(bad)?;
    let (a, b): (f64, f64) = (
        a.trim().parse().ok().with_context(bad)?,
        b.trim().parse().ok().with_context(bad)?,
    );
    if !(0.0 <= a && a <= b) {
        anyhow::bail!(bad());
    }
    Ok((a, b))
}

/// Live figures of a build for the display.
struct Progress {
    total: usize,
    accepted: usize,
    rejected: usize,
    in_flight: usize,
    /// Attempts put back because their endpoint failed.
    endpoint_failures: usize,
    words: usize,
    usage: Usage,
    started: Instant,
    done_at_start: usize,
}

impl Progress {
    fn line(&self) -> String {
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let done = self.accepted + self.rejected;
        let finished_now = done - self.done_at_start;
        let left = self.total.saturating_sub(done);
        let eta = if finished_now > 0 {
            let per_item = secs / finished_now as f64;
            format_duration(per_item * left as f64)
        } else {
            "?".into()
        };
        let failures = match self.endpoint_failures {
            0 => String::new(),
            n => format!(" · {n} endpoint failures"),
        };
        format!(
            "{done}/{} done ({} accepted, {} rejected) · {} in flight{failures} · {:.0} words/s · tokens in {} out {} · ETA {eta}",
            self.total,
            self.accepted,
            self.rejected,
            self.in_flight,
            self.words as f64 / secs,
            self.usage.prefilled_tokens(),
            self.usage.completion_tokens,
        )
    }
}

fn format_duration(s: f64) -> String {
    let s = s.max(0.0) as u64;
    if s >= 3600 {
        format!("{}h{:02}m", s / 3600, (s % 3600) / 60)
    } else if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// `data build`: fill the store, write the pending items on the
/// endpoints with a live display and Ctrl-C handling, then the summary.
pub fn build(a: &BuildArgs) -> anyhow::Result<()> {
    if a.style.language.is_some() {
        anyhow::bail!(
            "--language is not for data build: each item is written in its instruction's language"
        );
    }
    let store = DataStore::open(&a.out)?;
    add_instructions(&store, a)?;
    let mut opts = build_options(a)?;
    opts.planner = a.planner.factory(&a.model, a.concurrency)?;
    let stats = store.stats()?;
    if stats.pending + stats.running == 0 {
        say_nothing_to_do(&stats);
        return Ok(());
    }
    let endpoints = a.model.endpoints(a.concurrency)?;
    eprintln!(
        "{} items to write ({} accepted, {} rejected so far) on {} endpoint{}, {} at a time",
        stats.pending + stats.running,
        stats.accepted,
        stats.rejected,
        endpoints.len(),
        if endpoints.len() == 1 { "" } else { "s" },
        opts.concurrency
    );
    // Ctrl-C: the first press drains, the second stops.
    crate::interrupt::install();
    let live = Live::new(a.quiet, &stats);
    let summary = run_build(&store, &endpoints, &opts, &live)?;
    live.bar.finish_and_clear();
    print_summary(&summary, &store.stats()?);
    Ok(())
}

/// Adds --instructions to the store and, with --retry-rejected, queues the
/// rejected items again.
fn add_instructions(store: &DataStore, a: &BuildArgs) -> anyhow::Result<()> {
    if let Some(path) = &a.instructions {
        let instructions = lw_data::read_instructions(path)?;
        let (added, present) = store.add(&instructions)?;
        eprintln!(
            "{}: {added} instructions added, {present} already in the store",
            path.display()
        );
    }
    if a.retry_rejected {
        eprintln!("{} rejected items queued again", store.retry_rejected()?);
    }
    Ok(())
}

/// The build's settings from the flags (counter, gates, budgets, rest).
fn build_options(a: &BuildArgs) -> anyhow::Result<BuildOptions> {
    let counter: Counter = a.style.counter.parse().map_err(anyhow::Error::msg)?;
    let (lo, hi) = parse_band(&a.length_band)?;
    if !(a.endpoint_rest.is_finite() && a.endpoint_rest >= 0.0) {
        anyhow::bail!("--endpoint-rest must be a number of seconds ≥ 0");
    }
    Ok(BuildOptions {
        concurrency: a.concurrency.max(1),
        sampling: a.style.sampling(),
        model_name: a.model.model_name(),
        write: WriteOptions {
            counter,
            ..a.style.write_options()
        },
        gates: Gates {
            min_length_ratio: lo,
            max_length_ratio: hi,
            max_seq_rep_4: a.max_seq_rep,
            counter,
        },
        limits: Limits {
            max_output_tokens: a.max_output_tokens,
            max_tokens: a.max_tokens,
        },
        cooldown: Duration::from_secs_f64(a.endpoint_rest),
        ..Default::default()
    })
}

/// The store's counts when no item is left to write.
fn say_nothing_to_do(stats: &lw_data::Stats) {
    eprintln!(
        "nothing to do: {} items, {} accepted, {} rejected{}",
        stats.items,
        stats.accepted,
        stats.rejected,
        if stats.items == 0 {
            " (add instructions with --instructions FILE)"
        } else {
            ""
        }
    );
}

/// The terminal side of a running build: a spinner with the live figures
/// (on a terminal, unless --quiet) and one line per finished item.
struct Live {
    bar: ProgressBar,
    /// Lines go through the spinner (a terminal) or straight to stderr.
    tty: bool,
    quiet: bool,
    progress: Mutex<Progress>,
}

impl Live {
    fn new(quiet: bool, stats: &lw_data::Stats) -> Self {
        let tty = std::io::stderr().is_terminal() && !quiet;
        Live {
            bar: progress::spinner_unless(!tty),
            tty,
            quiet,
            progress: Mutex::new(Progress {
                total: stats.items,
                accepted: stats.accepted,
                rejected: stats.rejected,
                in_flight: 0,
                endpoint_failures: 0,
                words: 0,
                usage: Usage::default(),
                started: Instant::now(),
                done_at_start: stats.accepted + stats.rejected,
            }),
        }
    }

    /// A line above the spinner (nothing with --quiet).
    fn say(&self, line: String) {
        if self.quiet {
            return;
        }
        if self.tty {
            self.bar.println(line);
        } else {
            eprintln!("{line}");
        }
    }

    /// Counts an event, says what needs saying, and refreshes the spinner.
    fn on_event(&self, ev: BuildEvent) {
        let mut p = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        match ev {
            BuildEvent::ItemStarted { .. } => p.in_flight += 1,
            BuildEvent::SectionDone { words, usage, .. } => {
                p.words += words;
                p.usage.add(usage);
            }
            BuildEvent::ItemFinished {
                item,
                status,
                rejection,
                words,
            } => {
                p.in_flight = p.in_flight.saturating_sub(1);
                let what = match (status, rejection) {
                    (Status::Accepted, _) => format!("accepted, {words} words"),
                    (_, Some(r)) => format!("rejected ({}: {})", r.code, r.detail),
                    _ => status.as_str().to_string(),
                };
                match status {
                    Status::Accepted => p.accepted += 1,
                    _ => p.rejected += 1,
                }
                let done = p.accepted + p.rejected;
                self.say(format!(
                    "[{done}/{}] {}: {what}",
                    p.total,
                    short(&item.prompt)
                ));
            }
            BuildEvent::EndpointDown {
                endpoint,
                error,
                rest,
            } => {
                p.in_flight = p.in_flight.saturating_sub(1);
                p.endpoint_failures += 1;
                self.say(format!(
                    "endpoint {endpoint} failed ({error}); its item is queued again, the endpoint rests {:.0} s",
                    rest.as_secs_f64()
                ));
            }
            BuildEvent::EndpointUp { endpoint } => {
                self.say(format!("endpoint {endpoint} works again"))
            }
            BuildEvent::LimitReached { what } => self.say(format!(
                "the {what} budget is spent: no new items start; those in flight finish"
            )),
        }
        self.bar.set_message(p.line());
    }
}

/// Runs the build, with a thread that turns Ctrl-C presses into a drain
/// (the first) and a stop (the second) until the build returns.
fn run_build(
    store: &DataStore,
    endpoints: &[lw_data::Endpoint],
    opts: &BuildOptions,
    live: &Live,
) -> anyhow::Result<lw_data::BuildSummary> {
    let drain = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let watch_done = AtomicBool::new(false);
    let on_event = |ev: BuildEvent| live.on_event(ev);
    let summary = std::thread::scope(|s| {
        s.spawn(|| watch_presses(&watch_done, &drain, &stop, live));
        let r = lw_data::build(store, endpoints, opts, &drain, &stop, &on_event);
        watch_done.store(true, Ordering::SeqCst);
        r
    })?;
    Ok(summary)
}

/// Polls the Ctrl-C count until `done`: one press sets `drain`, more set `stop`.
fn watch_presses(done: &AtomicBool, drain: &AtomicBool, stop: &AtomicBool, live: &Live) {
    let mut seen = 0;
    while !done.load(Ordering::SeqCst) {
        let n = crate::interrupt::presses();
        if n != seen {
            seen = n;
            if n == 1 {
                drain.store(true, Ordering::SeqCst);
                live.say("draining: the items in flight finish; Ctrl-C again to stop them now (their finished sections are kept)".into());
            } else {
                stop.store(true, Ordering::SeqCst);
                live.say("stopping now".into());
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// This run's results and the whole store's counts.
fn print_summary(summary: &lw_data::BuildSummary, all: &lw_data::Stats) {
    eprintln!(
        "this run: {} accepted, {} rejected in {}; tokens in {} (cached {}) out {}",
        summary.accepted,
        summary.rejected,
        format_duration(summary.seconds),
        summary.usage.prompt_tokens,
        summary.usage.cached_prompt_tokens,
        summary.usage.completion_tokens
    );
    eprintln!(
        "store: {} items: {} accepted, {} rejected, {} pending",
        all.items, all.accepted, all.rejected, all.pending
    );
    if summary.pending > 0 {
        eprintln!("rerun the same command to continue");
    }
}

fn short(s: &str) -> String {
    let one_line = s.split_whitespace().collect::<Vec<_>>().join(" ");
    if one_line.chars().count() > 60 {
        format!("{}…", one_line.chars().take(59).collect::<String>())
    } else {
        one_line
    }
}

pub fn export(a: &ExportArgs) -> anyhow::Result<()> {
    let store = open_store(&a.dir)?;
    let done = lw_data::export(
        &store,
        &lw_data::ExportOptions {
            output: a.output.clone(),
            mix: a.mix.clone(),
            mix_ratio: a.mix_ratio,
            seed: a.seed,
        },
    )?;
    eprintln!(
        "{}: {} long-output examples{}",
        a.output.display(),
        done.long,
        if a.mix.is_some() {
            format!(" and {} general ones, shuffled", done.general)
        } else {
            String::new()
        }
    );
    Ok(())
}

pub fn select(a: &SelectArgs) -> anyhow::Result<()> {
    let (kept, read) = lw_data::select(&a.input, &a.output, a.min_words)?;
    eprintln!(
        "{}: {kept} of {read} instructions ask for at least {} words",
        a.output.display(),
        a.min_words
    );
    Ok(())
}

pub fn stats(a: &StatsArgs) -> anyhow::Result<()> {
    let store = open_store(&a.dir)?;
    let s = store.stats()?;
    if a.json {
        let mut v = serde_json::to_value(&s)?;
        v["items_per_hour"] = serde_json::json!(s.items_per_hour());
        v["output_tokens_per_second"] = serde_json::json!(s.output_tokens_per_second());
        v["section_max_writes"] = serde_json::json!(store.max_section_writes()?);
        println!("{v}");
        return Ok(());
    }
    println!(
        "items      {} (accepted {}, rejected {}, pending {}, running {})",
        s.items, s.accepted, s.rejected, s.pending, s.running
    );
    if !s.reasons.is_empty() {
        println!("rejected because");
        for (code, n) in &s.reasons {
            println!("  {code:<16} {n}");
        }
    }
    println!(
        "tokens     prompt {} (cached {}), output {}; {} attempts, {} endpoint failures",
        s.usage.prompt_tokens,
        s.usage.cached_prompt_tokens,
        s.usage.completion_tokens,
        s.attempts,
        s.endpoint_failures
    );
    match (s.items_per_hour(), s.output_tokens_per_second()) {
        (Some(ih), Some(ts)) => println!(
            "throughput {ih:.1} items/hour, {ts:.1} output tokens/s over {} of builds",
            format_duration(s.session_seconds)
        ),
        _ => println!("throughput (no build has run yet)"),
    }
    if !s.accepted_words.is_empty() {
        println!("length of accepted items (words)");
        for line in histogram(&s.accepted_words, 10, 40) {
            println!("  {line}");
        }
    }
    Ok(())
}

/// A text bar chart of `values` in `bins` equal-width bins.
fn histogram(values: &[usize], bins: usize, width: usize) -> Vec<String> {
    let (lo, hi) = (
        *values.iter().min().unwrap_or(&0),
        *values.iter().max().unwrap_or(&0),
    );
    let step = ((hi - lo) / bins).max(1) + usize::from((hi - lo) % bins.max(1) != 0);
    let bins = ((hi - lo) / step + 1).min(bins.max(1));
    let mut counts = vec![0usize; bins];
    for &v in values {
        counts[((v - lo) / step).min(bins - 1)] += 1;
    }
    let most = *counts.iter().max().unwrap_or(&1);
    counts
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let from = lo + i * step;
            let to = if i + 1 == bins { hi } else { from + step - 1 };
            let bar = "█".repeat((n * width).div_ceil(most.max(1)));
            format!("{from:>7}–{to:<7} {bar} {n}")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_histogram_counts_every_value_once() {
        let values = [100, 150, 180, 900, 1000, 1000];
        let lines = histogram(&values, 4, 10);
        let total: usize = lines
            .iter()
            .map(|l| l.rsplit(' ').next().unwrap().parse::<usize>().unwrap())
            .sum();
        assert_eq!(total, values.len());
        assert!(lines[0].starts_with("    100–"), "{lines:?}");
        assert_eq!(histogram(&[5, 5], 10, 10).len(), 1);
    }

    #[test]
    fn the_progress_line_shows_counts_tokens_and_failures() {
        let mut p = Progress {
            total: 10,
            accepted: 3,
            rejected: 1,
            in_flight: 2,
            endpoint_failures: 0,
            words: 0,
            usage: Usage {
                prompt_tokens: 500,
                cached_prompt_tokens: 200,
                completion_tokens: 120,
            },
            started: Instant::now(),
            done_at_start: 0,
        };
        let line = p.line();
        assert!(
            line.starts_with("4/10 done (3 accepted, 1 rejected) · 2 in flight ·"),
            "{line}"
        );
        assert!(line.contains("tokens in 300 out 120"), "{line}");
        assert!(!line.contains("failures"), "{line}");
        p.endpoint_failures = 2;
        assert!(p.line().contains("· 2 endpoint failures ·"), "{}", p.line());
    }

    #[test]
    fn length_bands_are_checked() {
        assert_eq!(parse_band("0.5, 2").unwrap(), (0.5, 2.0));
        assert!(parse_band("2,1").is_err());
        assert!(parse_band("x").is_err());
    }
}
