//! `longwriter plan` and `longwriter write`: the AgentWrite run on the
//! command line, with a progress display, JSON events, Ctrl-C and resume.

use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use indicatif::ProgressBar;
use lw_core::{Counter, SamplingParams};
use lw_write::{Event, Language, LanguageModel, LocalModel, Mode, Request, RunDir, WriteOptions};

use crate::progress;
use crate::ModelArgs;

/// The local engine (`--model`) or an OpenAI-compatible server (`--api-base`).
#[derive(Args)]
pub(crate) struct BackendArgs {
    /// Local model: a Hugging Face model directory, a hub id (org/name), or
    /// `tiny` (the toy model shipped in models/longwriter-tiny). Default:
    /// Qwen/Qwen2.5-0.5B-Instruct, or `tiny` with a warning when the hub
    /// cannot be reached.
    #[arg(long, short = 'm', env = "LONGWRITER_MODEL")]
    model: Option<String>,
    #[command(flatten)]
    engine: crate::EngineArgs,
    /// An OpenAI-compatible server instead of the local engine, e.g.
    /// http://127.0.0.1:8000/v1 (vLLM, SGLang, llama.cpp, Ollama, OpenAI).
    /// `data build` takes several (repeat the flag), each optionally capped
    /// at N jobs in flight with a `#N` suffix: http://gpu1:8000/v1#16.
    #[arg(long, conflicts_with = "model")]
    api_base: Vec<String>,
    /// Model name on the server.
    #[arg(long, requires = "api_base", default_value = "default")]
    api_model: String,
    /// Bearer token for the server.
    #[arg(long, env = "OPENAI_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Context size to ask the server for (Ollama's num_ctx; without it
    /// Ollama silently truncates prompts at 2,048 tokens).
    #[arg(long, requires = "api_base")]
    context_size: Option<usize>,
    /// Retries on 429, 5xx and connection errors (exponential backoff).
    #[arg(long, default_value_t = 5)]
    retries: usize,
    /// The server's kind, for grammars and length control beyond OpenAI's
    /// API: auto (OpenAI's fields for api.openai.com, llama.cpp's for any
    /// other server, longwriter's own included), llama.cpp, vllm, sglang,
    /// openai (plans parsed and re-asked, no grammar).
    #[arg(long, requires = "api_base", default_value = "auto")]
    api_flavor: lw_write::http::ApiFlavor,
}

/// `m` loaded behind the batching scheduler with room for `sequences` at
/// once, and the model's name.
fn start_batcher(m: ModelArgs, sequences: usize) -> anyhow::Result<(lw_engine::Batcher, String)> {
    let engine = crate::run::load_engine(&m)?;
    let n = sequences.max(1);
    let batcher = lw_engine::Batcher::start(
        engine,
        lw_engine::BatchOptions {
            max_batch: n,
            max_queue: n * 2,
            idle_caches: n,
        },
    );
    Ok((batcher, m.model))
}

/// A model for each of several workers (eval run).
pub(crate) type Factory = Box<dyn Fn() -> Result<Box<dyn LanguageModel + Send>, String> + Sync>;

impl BackendArgs {
    /// Several models at once: HTTP clients each, or one local engine behind
    /// the batching scheduler, shared by `workers` sequences.
    pub(crate) fn factory(&self, workers: usize) -> anyhow::Result<Factory> {
        if let Some(base) = self.single_api_base()? {
            let opts = self.http_options(base);
            return Ok(Box::new(move || {
                Ok(Box::new(lw_write::HttpModel::new(opts.clone()))
                    as Box<dyn LanguageModel + Send>)
            }));
        }
        let (batcher, name) = self.batcher(workers)?;
        Ok(Box::new(move || {
            Ok(
                Box::new(lw_write::BatchedModel::new(batcher.clone(), name.clone()))
                    as Box<dyn LanguageModel + Send>,
            )
        }))
    }

    fn local_args(&self) -> anyhow::Result<ModelArgs> {
        Ok(ModelArgs {
            model: self
                .model
                .clone()
                .unwrap_or_else(|| lw_engine::DEFAULT_MODEL.to_string()),
            fallback_to_tiny: self.model.is_none(),
            engine: self.engine.clone(),
        })
    }

    /// The local engine behind the batching scheduler, with room for
    /// `sequences` at once, and the model's name.
    fn batcher(&self, sequences: usize) -> anyhow::Result<(lw_engine::Batcher, String)> {
        start_batcher(self.local_args()?, sequences)
    }

    /// The one server of a command that talks to one.
    fn single_api_base(&self) -> anyhow::Result<Option<&String>> {
        match self.api_base.as_slice() {
            [] => Ok(None),
            [one] => Ok(Some(one)),
            _ => anyhow::bail!("only one --api-base here (several are for `data build`)"),
        }
    }

    /// HTTP options for a server.
    fn http_options(&self, base: &str) -> lw_write::HttpOptions {
        let mut opts = lw_write::HttpOptions::new(base.to_string(), self.api_model.clone());
        opts.api_key = self.api_key.clone();
        opts.context_size = self.context_size;
        opts.retries = self.retries;
        opts.flavor = self.api_flavor;
        opts
    }

    /// Endpoints of a data build: each `--api-base` (capped by its `#N`
    /// suffix, else `concurrency`), or the local engine behind the batching
    /// scheduler with room for `concurrency` sequences.
    pub(crate) fn endpoints(&self, concurrency: usize) -> anyhow::Result<Vec<lw_data::Endpoint>> {
        let mut out = Vec::new();
        for raw in &self.api_base {
            let (base, cap) = match raw.rsplit_once('#') {
                Some((base, n)) => {
                    let cap: usize = n.parse().ok().filter(|&c| c > 0).with_context(|| {
                        format!("--api-base {raw}: the part after # must be a job cap ≥ 1")
                    })?;
                    (base, cap)
                }
                None => (raw.as_str(), concurrency),
            };
            let opts = self.http_options(base);
            out.push(lw_data::Endpoint {
                name: base.to_string(),
                cap,
                make: Box::new(move || Box::new(lw_write::HttpModel::new(opts.clone()))),
            });
        }
        if out.is_empty() {
            let (batcher, name) = self.batcher(concurrency)?;
            out.push(lw_data::Endpoint {
                name: format!("local:{name}"),
                cap: concurrency.max(1),
                make: Box::new(move || {
                    Box::new(lw_write::BatchedModel::new(batcher.clone(), name.clone()))
                }),
            });
        }
        Ok(out)
    }

    /// The model name recorded in requests.
    pub(crate) fn model_name(&self) -> String {
        if self.api_base.is_empty() {
            self.model
                .clone()
                .unwrap_or_else(|| lw_engine::DEFAULT_MODEL.to_string())
        } else {
            self.api_model.clone()
        }
    }

    fn open(&self) -> anyhow::Result<Box<dyn LanguageModel>> {
        if let Some(base) = self.single_api_base()? {
            return Ok(Box::new(lw_write::HttpModel::new(self.http_options(base))));
        }
        let m = self.local_args()?;
        let engine = crate::run::load_engine(&m)?;
        Ok(Box::new(LocalModel::new(engine, m.model)))
    }
}

#[derive(Args)]
pub struct PlanArgs {
    #[command(flatten)]
    model: BackendArgs,
    #[command(flatten)]
    style: StyleArgs,
    /// The writing instruction; `-` reads it from stdin.
    instruction: String,
}

#[derive(Args)]
pub struct WriteArgs {
    #[command(flatten)]
    model: BackendArgs,
    #[command(flatten)]
    style: StyleArgs,
    /// Run directory (default: ./longwriter-runs/<instruction>-<time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Continue the run in this directory (finished sections are kept).
    #[arg(long, conflicts_with_all = ["out", "instruction", "plan"])]
    resume: Option<PathBuf>,
    /// Write from this plan (as printed by `longwriter plan`) instead of asking for one.
    #[arg(long)]
    plan: Option<PathBuf>,
    /// agentwrite: plan, then write paragraph by paragraph; direct: one pass.
    #[arg(long, default_value = "agentwrite")]
    mode: Mode,
    /// No progress display.
    #[arg(long, short = 'q')]
    quiet: bool,
    /// Machine-readable events on stdout, one JSON object per line.
    #[arg(long)]
    json: bool,
    /// Keep a reasoning model's thinking (its `<think>` blocks, which never
    /// enter the document) in the run directory's `thinking/` folder, one
    /// file per section.
    #[arg(long)]
    keep_thinking: bool,
    #[command(flatten)]
    planner: PlannerArgs,
    /// Parameters of the writing model, for the compute estimate where the
    /// backend cannot say (a server): 135M, 1.5B, 70B, or a number.
    #[arg(long, value_parser = parse_parameters)]
    params: Option<u64>,
    /// The writing instruction; `-` reads it from stdin.
    #[arg(required_unless_present = "resume")]
    instruction: Option<String>,
}

/// Mini–giant collaboration: the plan from another model (a strong one,
/// often far away) while --model or --api-base writes the sections. The
/// summary then gives each role's tokens, estimated compute (2 × parameters
/// per token computed) and network traffic.
#[derive(Args)]
pub(crate) struct PlannerArgs {
    /// The planner as a local model (directory, GGUF file or hub id; it
    /// runs with the writer's engine settings).
    #[arg(long, conflicts_with = "plan_api_base")]
    plan_model: Option<String>,
    /// The planner on an OpenAI-compatible server.
    #[arg(long)]
    plan_api_base: Option<String>,
    /// Model name on the planner's server.
    #[arg(long, requires = "plan_api_base", default_value = "default")]
    plan_api_model: String,
    /// Bearer token for the planner's server (default: the writer's).
    #[arg(long, requires = "plan_api_base", hide_env_values = true)]
    plan_api_key: Option<String>,
    /// The planner server's kind (as --api-flavor).
    #[arg(long, requires = "plan_api_base", default_value = "auto")]
    plan_api_flavor: lw_write::http::ApiFlavor,
    /// Parameters of the planner, for the compute estimate where the
    /// backend cannot say (a server): 135M, 1.5B, 70B, or a number.
    #[arg(long, value_parser = parse_parameters)]
    plan_params: Option<u64>,
}

/// A parameter count as people write it: `135M`, `1.5B`, `70b`, `7e9`,
/// `500000`.
pub(crate) fn parse_parameters(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (number, scale) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 1e3),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('B') => (&t[..t.len() - 1], 1e9),
        Some('T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    match number.parse::<f64>() {
        Ok(n) if n > 0.0 && n.is_finite() => Ok((n * scale).round() as u64),
        _ => Err(format!(
            "\"{s}\" is not a parameter count (e.g. 135M, 1.5B, 70B)"
        )),
    }
}

/// Language and sampling of plan and write calls.
#[derive(Args)]
pub(crate) struct StyleArgs {
    /// Prompt language (default: the instruction's).
    #[arg(long)]
    pub(crate) language: Option<Language>,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.8)]
    temperature: f32,
    /// Nucleus sampling threshold.
    #[arg(long, default_value_t = 0.95)]
    top_p: f32,
    /// Penalise repeated tokens (1 = off).
    #[arg(long, default_value_t = 1.05)]
    repetition_penalty: f32,
    /// Random seed: the same seed and model give the same document.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Plans asked for before giving up.
    #[arg(long, default_value_t = 3)]
    pub(crate) plan_tries: usize,
    /// Word counter for budgets and lengths.
    #[arg(long, default_value = "unicode", value_parser = ["unicode", "longbench"])]
    pub(crate) counter: String,
    /// Plain AgentWrite: no plan grammar, no length control of sections
    /// (by default the plan decodes under a grammar of the asked shape and
    /// each section is held to 90–140% of its budget, where the backend
    /// allows: the local engine, llama.cpp's server, vLLM, SGLang).
    #[arg(long)]
    pub(crate) no_constrain: bool,
    /// DRY strength against repeated phrases (0 = off). The default is
    /// twice llama.cpp's usual 0.8: on SmolLM2-135M it halved the repeated
    /// 4-grams of AgentWrite's documents and kept their length.
    #[arg(long, default_value_t = lw_write::SECTION_DRY_MULTIPLIER)]
    dry_multiplier: f32,
    /// No DRY penalty (the same as --dry-multiplier 0).
    #[arg(long)]
    no_dry: bool,
}

impl StyleArgs {
    pub(crate) fn sampling(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            dry_multiplier: if self.no_dry {
                0.0
            } else {
                self.dry_multiplier
            },
            ..Default::default()
        }
    }

    pub(crate) fn write_options(&self) -> WriteOptions {
        WriteOptions {
            plan_tries: self.plan_tries,
            constrain: !self.no_constrain,
            ..Default::default()
        }
    }
}

fn read_instruction(s: &str) -> anyhow::Result<String> {
    let text = if s == "-" {
        let mut t = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut t).context("reading stdin")?;
        t
    } else {
        s.to_string()
    };
    let text = text.trim().to_string();
    if text.is_empty() {
        anyhow::bail!("the instruction is empty");
    }
    Ok(text)
}

pub fn plan(a: &PlanArgs) -> anyhow::Result<()> {
    let instruction = read_instruction(&a.instruction)?;
    let lang = a
        .style
        .language
        .unwrap_or_else(|| Language::detect(&instruction));
    let asked = lw_write::requested_length(&instruction);
    let mut model = a.model.open()?;
    let mut usage = lw_write::Usage::default();
    let plan = lw_write::make_plan(
        model.as_mut(),
        &instruction,
        asked,
        lang,
        &a.style.sampling(),
        &a.style.write_options(),
        &mut usage,
    )?;
    print!("{}", plan.to_text());
    eprintln!(
        "{} paragraphs, {} words planned{}",
        plan.paragraphs.len(),
        plan.total_words(),
        asked.map(|n| format!(" ({n} asked)")).unwrap_or_default()
    );
    Ok(())
}

/// `write`: open or create the run directory, write with a progress
/// display (or JSON events), then the summary.
pub fn write(a: &WriteArgs) -> anyhow::Result<()> {
    let counter: Counter = a.style.counter.parse().map_err(anyhow::Error::msg)?;
    let mut model = a.model.open()?;
    let mut planner = a.planner.open(&a.model)?;
    let dir = run_dir(a, model.as_ref())?;
    // Ctrl-C: the run stops after saving what is finished.
    let stop = crate::interrupt::install();
    if !a.json {
        eprintln!("run directory: {}", dir.path().display());
    }
    let mut display = Display::new(a.quiet || a.json, a.json, counter);
    let opts = WriteOptions {
        counter,
        keep_thinking: a.keep_thinking,
        ..a.style.write_options()
    };
    let result = lw_write::write_with_planner(
        model.as_mut(),
        planner.as_deref_mut().map(|p| p as &mut dyn LanguageModel),
        &dir,
        &opts,
        stop,
        &mut |e| display.event(e),
    );
    display.finish();
    let summary = match result {
        Ok(s) => s,
        Err(e) => {
            if a.json {
                println!(
                    "{}",
                    serde_json::json!({"event": "failed", "error": e.to_string(), "run_dir": dir.path()})
                );
            }
            return Err(
                anyhow::Error::new(e).context(format!("run directory {}", dir.path().display()))
            );
        }
    };
    let roles = Roles {
        writer: (model.name(), a.params.or(model.parameters())),
        planner: planner
            .as_ref()
            .map(|p| (p.name(), a.planner.plan_params.or(p.parameters()))),
    };
    print_summary(a.json, &dir, &summary, &roles);
    Ok(())
}

impl PlannerArgs {
    /// The planner's server, where one is given (key, retries from the
    /// writer's flags unless its own are).
    fn http_options(&self, writer: &BackendArgs) -> Option<lw_write::HttpOptions> {
        let base = self.plan_api_base.as_ref()?;
        let mut opts = lw_write::HttpOptions::new(base.clone(), self.plan_api_model.clone());
        opts.api_key = self.plan_api_key.clone().or_else(|| writer.api_key.clone());
        opts.retries = writer.retries;
        opts.flavor = self.plan_api_flavor;
        Some(opts)
    }

    /// The planner as a local model, where one is given (the writer's
    /// engine settings).
    fn local_args(&self, writer: &BackendArgs) -> Option<ModelArgs> {
        Some(ModelArgs {
            model: self.plan_model.clone()?,
            fallback_to_tiny: false,
            engine: writer.engine.clone(),
        })
    }

    /// A planner for many workers at once (`data build`): HTTP clients, or
    /// one local engine behind the batching scheduler with room for
    /// `workers` sequences.
    pub(crate) fn factory(
        &self,
        writer: &BackendArgs,
        workers: usize,
    ) -> anyhow::Result<Option<lw_data::Planner>> {
        if let Some(opts) = self.http_options(writer) {
            return Ok(Some(lw_data::Planner {
                name: opts.api_base.clone(),
                make: std::sync::Arc::new(move || {
                    Box::new(lw_write::HttpModel::new(opts.clone()))
                        as Box<dyn LanguageModel + Send>
                }),
            }));
        }
        let Some(m) = self.local_args(writer) else {
            return Ok(None);
        };
        let (batcher, name) = start_batcher(m, workers)?;
        Ok(Some(lw_data::Planner {
            name: name.clone(),
            make: std::sync::Arc::new(move || {
                Box::new(lw_write::BatchedModel::new(batcher.clone(), name.clone()))
                    as Box<dyn LanguageModel + Send>
            }),
        }))
    }

    /// The planner, where one is asked for.
    fn open(&self, writer: &BackendArgs) -> anyhow::Result<Option<Box<dyn LanguageModel>>> {
        if let Some(opts) = self.http_options(writer) {
            return Ok(Some(Box::new(lw_write::HttpModel::new(opts))));
        }
        let Some(m) = self.local_args(writer) else {
            return Ok(None);
        };
        let engine = crate::run::load_engine(&m)?;
        Ok(Some(Box::new(LocalModel::new(engine, m.model))))
    }
}

/// Who planned and who wrote, with their parameter counts where known.
struct Roles {
    writer: (String, Option<u64>),
    planner: Option<(String, Option<u64>)>,
}

/// One role's figures: tokens, estimated compute, traffic.
fn role_figures(
    name: &str,
    params: Option<u64>,
    usage: &lw_write::Usage,
    traffic: lw_write::Traffic,
) -> serde_json::Value {
    let computed = usage.prefilled_tokens() + usage.completion_tokens;
    serde_json::json!({
        "model": name,
        "parameters": params,
        "usage": usage,
        "flops": params.map(|p| 2.0 * p as f64 * computed as f64),
        "bytes_sent": traffic.sent,
        "bytes_received": traffic.received,
    })
}

/// The run directory: --resume's, or a new one (--out, else a name from
/// the instruction and the time) holding the request and any --plan.
fn run_dir(a: &WriteArgs, model: &dyn LanguageModel) -> anyhow::Result<RunDir> {
    if let Some(path) = &a.resume {
        return Ok(RunDir::open(path)?.0);
    }
    let instruction = read_instruction(a.instruction.as_deref().unwrap_or("-"))?;
    let language = a
        .style
        .language
        .unwrap_or_else(|| Language::detect(&instruction));
    let request = Request {
        asked_words: lw_write::requested_length(&instruction),
        instruction,
        language,
        mode: a.mode,
        sampling: a.style.sampling(),
        model: model.name(),
    };
    let out = a.out.clone().unwrap_or_else(|| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        PathBuf::from("longwriter-runs")
            .join(lw_write::run::default_run_name(&request.instruction, now))
    });
    let plan = match &a.plan {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let plan = lw_write::parse_plan(&text, request.asked_words)
                .with_context(|| format!("{}: not a usable plan", p.display()))?;
            Some(plan)
        }
        None => None,
    };
    Ok(RunDir::create_with_plan(&out, &request, plan.as_ref())?)
}

/// The finished run: a "summary" JSON event on stdout, or text on stderr.
fn print_summary(json: bool, dir: &RunDir, summary: &lw_write::Summary, roles: &Roles) {
    let write_usage = summary.usage.since(&summary.plan_usage);
    let (plan_name, plan_params) = roles.planner.clone().unwrap_or(roles.writer.clone());
    let plan = role_figures(
        &plan_name,
        plan_params,
        &summary.plan_usage,
        summary.plan_traffic,
    );
    let write = role_figures(
        &roles.writer.0,
        roles.writer.1,
        &write_usage,
        summary.write_traffic,
    );
    let score = summary.asked_words.map(|x| {
        lw_core::words::length_score(
            x as f64,
            lw_core::words::count_longbench(&summary.document) as f64,
        )
    });
    if json {
        println!(
            "{}",
            serde_json::json!({
                "event": "summary",
                "run_dir": dir.path(),
                "document": dir.document_path(),
                "asked_words": summary.asked_words,
                "planned_words": summary.planned_words,
                "delivered_words": summary.delivered_words,
                "length_score": score,
                "usage": summary.usage,
                "roles": {"plan": plan, "write": write},
                "seconds": summary.seconds,
            })
        );
    } else {
        if roles.planner.is_some() {
            for (role, v) in [("planned", &plan), ("wrote", &write)] {
                let flops = v["flops"]
                    .as_f64()
                    .map_or("compute unknown (--params)".into(), |f| {
                        format!("~{:.3} TFLOP", f / 1e12)
                    });
                eprintln!(
                    "{role}: {}: tokens in {}, out {}; {flops}; {} bytes sent, {} received",
                    v["model"].as_str().unwrap_or(""),
                    v["usage"]["prompt_tokens"],
                    v["usage"]["completion_tokens"],
                    v["bytes_sent"],
                    v["bytes_received"],
                );
            }
        }
        eprintln!(
            "done: {} words delivered ({} planned{}){}; tokens in {} ({} reused), out {}; {:.1}s\ndocument: {}",
            summary.delivered_words,
            summary.planned_words,
            summary.asked_words.map(|n| format!(", {n} asked")).unwrap_or_default(),
            score.map(|s| format!("; length score {s:.1}")).unwrap_or_default(),
            summary.usage.prompt_tokens,
            summary.usage.cached_prompt_tokens,
            summary.usage.completion_tokens,
            summary.seconds,
            dir.document_path().display()
        );
    }
}

/// Progress bar (words written / words planned) or JSON events.
struct Display {
    bar: Option<ProgressBar>,
    json: bool,
    counter: Counter,
    done_words: u64,
    current: String,
    /// Tokens generated and seconds spent by the sections written in this process.
    tokens: usize,
    seconds: f64,
}

impl Display {
    fn new(hidden: bool, json: bool, counter: Counter) -> Self {
        Display {
            bar: (!hidden).then(|| progress::bar(0, "words")),
            json,
            counter,
            done_words: 0,
            current: String::new(),
            tokens: 0,
            seconds: 0.0,
        }
    }

    /// Shows one event of the run: a JSON line with --json, else on the bar.
    fn event(&mut self, e: Event) {
        if self.json {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{}", json_event(&e));
            let _ = out.flush();
            return;
        }
        let Some(bar) = &self.bar else { return };
        match e {
            Event::PlanReady { plan, reused } => show_plan(bar, plan, reused),
            Event::SectionStart { index, total, .. } => {
                self.current.clear();
                let speed = if self.seconds > 0.0 {
                    format!(", {:.1} tok/s", self.tokens as f64 / self.seconds)
                } else {
                    String::new()
                };
                bar.set_message(format!("section {}/{}{speed}", index + 1, total));
            }
            Event::Delta { text, .. } => {
                self.current.push_str(text);
                bar.set_position(self.done_words + self.counter.count(&self.current) as u64);
            }
            Event::TextCut {
                index, shown_from, ..
            } => {
                bar.println(format!(
                    "section {}: the text so far outgrew the model's context; \
                     it is shown from byte {shown_from} on",
                    index + 1
                ));
            }
            Event::SectionRetry {
                index,
                attempt,
                reason,
            } => {
                self.current.clear();
                bar.println(format!(
                    "section {}: {reason}, retrying (attempt {})",
                    index + 1,
                    attempt + 1
                ));
            }
            Event::SectionDone { record, resumed } => {
                self.done_words += record.delivered_words as u64;
                bar.set_position(self.done_words);
                if !resumed {
                    self.tokens += record.usage.completion_tokens;
                    self.seconds += record.seconds;
                }
                if resumed {
                    bar.set_message(format!("section {} (kept)", record.index + 1));
                }
            }
            Event::Finished { .. } => {}
        }
    }

    fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// An event as the JSON object `write --json` prints for it.
fn json_event(e: &Event) -> serde_json::Value {
    match e {
        Event::PlanReady { plan, reused } => {
            serde_json::json!({"event": "plan", "reused": reused, "paragraphs": plan.paragraphs})
        }
        Event::SectionStart {
            index,
            total,
            asked_words,
        } => {
            serde_json::json!({"event": "section_start", "index": index, "total": total, "asked_words": asked_words})
        }
        Event::Delta { index, text } => {
            serde_json::json!({"event": "delta", "index": index, "text": text})
        }
        Event::SectionRetry {
            index,
            attempt,
            reason,
        } => {
            serde_json::json!({"event": "section_retry", "index": index, "attempt": attempt, "reason": reason})
        }
        Event::TextCut {
            index,
            shown_from,
            written,
        } => {
            serde_json::json!({"event": "text_cut", "index": index, "shown_from": shown_from, "written": written})
        }
        Event::SectionDone { record, resumed } => {
            serde_json::json!({"event": "section_done", "resumed": resumed, "section": record})
        }
        Event::Finished { words } => {
            serde_json::json!({"event": "finished", "words": words})
        }
    }
}

/// The plan above the bar, a line per paragraph; its words become the
/// bar's length.
fn show_plan(bar: &ProgressBar, plan: &lw_write::Plan, reused: bool) {
    bar.println(format!(
        "plan{}: {} paragraphs, {} words",
        if reused {
            " (from the run directory)"
        } else {
            ""
        },
        plan.paragraphs.len(),
        plan.total_words()
    ));
    for (i, p) in plan.paragraphs.iter().enumerate() {
        bar.println(format!(
            "  {:>2}. [{} words] {}",
            i + 1,
            p.words,
            p.main_point
        ));
    }
    bar.set_length(plan.total_words() as u64);
}
