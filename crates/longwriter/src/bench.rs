//! `longwriter bench`: prefill and decode speed (median of several runs) and
//! peak memory, on a random prompt of a given length.

use anyhow::Context;
use clap::Args;
use lw_core::{GenerationParams, SamplingParams};
use lw_engine::sampler::Rng;

use crate::run::load_engine;
use crate::ModelArgs;

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Tokens in the (random) prompt.
    #[arg(long, default_value_t = 512)]
    prompt_tokens: usize,
    /// Use this file's text as the prompt instead of random tokens (e.g. a
    /// passage the answer quotes, for --prompt-lookup); --prompt-tokens is
    /// then ignored.
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<std::path::PathBuf>,
    /// Tokens to generate after it (end-of-sequence is ignored).
    #[arg(long, default_value_t = 128)]
    gen_tokens: usize,
    /// Measured runs; the median is reported. One warm-up run comes first.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Also measure memory read bandwidth (a STREAM-like pass over 1 GiB,
    /// same threads) and report decode speed as a share of the bound it sets.
    #[arg(long)]
    bandwidth: bool,
    /// Instead: aggregate generation speed with this many concurrent
    /// sequences through the batching scheduler (the server's path), e.g.
    /// `--concurrency 1,4,16`. Each sequence has its own random prompt.
    #[arg(long, value_delimiter = ',', value_name = "N,N,...")]
    concurrency: Vec<usize>,
    /// Instead: decode speed at this depth, after a KV cache of this many
    /// positions filled with random keys and values (no prefill: a decoded
    /// token's cost at depth is reading the cache, whatever it holds), e.g.
    /// `--depth 16384`; decode speed at depth 0 is printed beside it.
    #[arg(long, value_name = "POSITIONS")]
    depth: Option<usize>,
}

/// Speeds at one sequence (or, with --concurrency, through the batching
/// scheduler), printed as text or one JSON object.
pub fn run(a: &BenchArgs) -> anyhow::Result<()> {
    check_counts(a)?;
    let mut engine = load_engine(&a.model)?;
    let (prompt, bound) = bench_prompt(a, &engine)?;
    let params = GenerationParams {
        sampling: SamplingParams::greedy(),
        max_tokens: Some(a.gen_tokens),
        ignore_eos: true,
        ..Default::default()
    };
    if !a.concurrency.is_empty() {
        return batched(a, engine, bound, &params);
    }
    if let Some(depth) = a.depth {
        return at_depth(a, &engine, depth);
    }
    let speeds = measure(a, &mut engine, &prompt, &params)?;
    let figures = Figures::of(a, &engine, prompt.len(), speeds);
    if a.json {
        print_json(a, &engine, &figures);
    } else {
        print_text(a, &engine, &figures);
    }
    Ok(())
}

/// Refuses an empty prompt, fewer than two generated tokens or no runs.
fn check_counts(a: &BenchArgs) -> anyhow::Result<()> {
    if a.prompt_tokens == 0 || a.gen_tokens < 2 || a.runs == 0 {
        anyhow::bail!(
            "--prompt-tokens must be at least 1, --gen-tokens at least 2 and --runs at least 1"
        );
    }
    Ok(())
}

/// The prompt (the file's tokens, else random non-EOS ids below the
/// bound), checked against the context, and that bound on token ids.
fn bench_prompt(a: &BenchArgs, engine: &lw_engine::Engine) -> anyhow::Result<(Vec<u32>, u64)> {
    let limit = engine.context_length();
    let file_prompt = match &a.prompt_file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            Some(engine.encode_raw(&text)?)
        }
        None => None,
    };
    let prompt_tokens = file_prompt.as_ref().map_or(a.prompt_tokens, Vec::len);
    if prompt_tokens + a.gen_tokens > limit {
        anyhow::bail!(
            "{prompt_tokens} prompt tokens + --gen-tokens {} exceed the model's context of {limit} tokens",
            a.gen_tokens
        );
    }
    let bound = engine
        .tokenizer()
        .id_bound()
        .min(engine.model().config().vocab_size) as u64;
    let prompt = file_prompt.unwrap_or_else(|| {
        random_prompt(&mut Rng::new(42), a.prompt_tokens, bound, engine.eos_ids())
    });
    Ok((prompt, bound))
}

/// `len` random token ids below `bound`, none of them in `eos`.
fn random_prompt(rng: &mut Rng, len: usize, bound: u64, eos: &[u32]) -> Vec<u32> {
    (0..len)
        .map(|_| loop {
            let id = (rng.next_u64() % bound) as u32;
            if !eos.contains(&id) {
                break id;
            }
        })
        .collect()
}

/// Medians over the measured runs, and the last run's draft acceptance.
struct Speeds {
    prefill_tok_s: f64,
    decode_tok_s: f64,
    acceptance: Option<f64>,
}

/// One warm-up run, then --runs measured ones, each reported on stderr
/// unless --json.
fn measure(
    a: &BenchArgs,
    engine: &mut lw_engine::Engine,
    prompt: &[u32],
    params: &GenerationParams,
) -> anyhow::Result<Speeds> {
    let mut prefill = Vec::new();
    let mut decode = Vec::new();
    let mut acceptance = None;
    for i in 0..=a.runs {
        engine.reset();
        let out = engine.generate(prompt, params, |_| true)?;
        if i > 0 {
            prefill.push(out.stats.prefill_tok_s());
            decode.push(out.stats.decode_tok_s());
            acceptance = out.stats.acceptance_rate();
        }
        if !a.json {
            eprintln!(
                "{} prefill {:.1} tok/s, decode {:.1} tok/s{}",
                if i == 0 { "warm-up:" } else { "run:    " },
                out.stats.prefill_tok_s(),
                out.stats.decode_tok_s(),
                match out.stats.acceptance_rate() {
                    Some(r) => format!(
                        ", {} of {} drafted tokens accepted ({:.0}%)",
                        out.stats.accepted_draft_tokens,
                        out.stats.draft_tokens,
                        100.0 * r
                    ),
                    None => String::new(),
                }
            );
        }
    }
    Ok(Speeds {
        prefill_tok_s: median(&mut prefill),
        decode_tok_s: median(&mut decode),
        acceptance,
    })
}

/// Everything the report shows beside the model's own description.
struct Figures {
    prompt_tokens: usize,
    speeds: Speeds,
    peak_rss_mb: Option<f64>,
    weight_bytes: usize,
    threads: usize,
    /// The quantized products' instruction set (candle's own code without
    /// one); none for a model without quantized matrices.
    kernels: Option<&'static str>,
    /// Measured read bandwidth, GB/s (--bandwidth).
    bandwidth: Option<f64>,
    /// Decode can go no faster than the weights stream: tok/s at that bandwidth.
    bound: Option<f64>,
}

impl Figures {
    /// Peak memory first: the bandwidth pass allocates a large buffer.
    fn of(a: &BenchArgs, engine: &lw_engine::Engine, prompt_tokens: usize, speeds: Speeds) -> Self {
        let peak_rss_mb = peak_rss_bytes().map(|b| b as f64 / (1024.0 * 1024.0));
        let weight_bytes = engine.model().weight_bytes_per_token();
        let threads = rayon_threads();
        let kernels = engine
            .model()
            .has_quantized_weights()
            .then(|| lw_model::kernels::Isa::detect().map_or("candle", |i| i.name()));
        let bandwidth = a.bandwidth.then(|| lw_model::read_bandwidth(1 << 30));
        let bound = bandwidth.map(|gb| gb * 1e9 / weight_bytes as f64);
        Figures {
            prompt_tokens,
            speeds,
            peak_rss_mb,
            weight_bytes,
            threads,
            kernels,
            bandwidth,
            bound,
        }
    }

    /// GB/s of weights read at the decode speed.
    fn decode_gb_s(&self) -> f64 {
        self.speeds.decode_tok_s * self.weight_bytes as f64 / 1e9
    }
}

/// The figures as one JSON object on stdout.
fn print_json(a: &BenchArgs, engine: &lw_engine::Engine, f: &Figures) {
    let cfg = engine.model().config();
    let decode_tok_s = f.speeds.decode_tok_s;
    let v = serde_json::json!({
        "model": a.model.model,
        "model_type": cfg.model_type,
        "parameters": cfg.parameter_count(),
        "weights": engine.model().weight_format(),
        "threads": f.threads,
        "kernels": f.kernels,
        "prompt_tokens": f.prompt_tokens,
        "gen_tokens": a.gen_tokens,
        "draft_acceptance": f.speeds.acceptance,
        "runs": a.runs,
        "prefill_tok_s": f.speeds.prefill_tok_s,
        "decode_tok_s": decode_tok_s,
        "peak_rss_mb": f.peak_rss_mb,
        "decode_weight_bytes_per_token": f.weight_bytes,
        "decode_effective_gb_s": f.decode_gb_s(),
        "read_bandwidth_gb_s": f.bandwidth,
        "decode_bound_tok_s": f.bound,
        "decode_share_of_bound": f.bound.map(|b| decode_tok_s / b),
    });
    println!("{v}");
}

/// The figures as text on stdout.
fn print_text(a: &BenchArgs, engine: &lw_engine::Engine, f: &Figures) {
    let cfg = engine.model().config();
    let threads = f.threads;
    let prompt_tokens = f.prompt_tokens;
    let prefill_tok_s = f.speeds.prefill_tok_s;
    let decode_tok_s = f.speeds.decode_tok_s;
    println!(
        "model:   {} ({}, {:.1}M parameters, {} weights, {threads} threads{})",
        a.model.model,
        cfg.model_type,
        cfg.parameter_count() as f64 / 1e6,
        engine.model().weight_format(),
        f.kernels
            .map_or(String::new(), |k| format!(", {k} kernels"))
    );
    println!(
        "prefill: {prefill_tok_s:.1} tok/s ({prompt_tokens} prompt tokens, median of {})",
        a.runs
    );
    println!(
        "decode:  {decode_tok_s:.1} tok/s ({} tokens; {:.1} GB/s of weights streamed)",
        a.gen_tokens,
        f.decode_gb_s()
    );
    if let (Some(gb), Some(b)) = (f.bandwidth, f.bound) {
        println!(
            "memory:  {gb:.1} GB/s read bandwidth ({threads} threads): decode bound {b:.1} tok/s, reached {:.0}%",
            100.0 * decode_tok_s / b
        );
    }
    if let Some(r) = f.speeds.acceptance {
        println!(
            "speculative decoding: {:.0}% of drafted tokens accepted",
            100.0 * r
        );
    }
    match f.peak_rss_mb {
        Some(mb) => println!("peak memory: {mb:.0} MiB"),
        None => println!("peak memory: unknown on this platform"),
    }
}

/// Aggregate tok/s at each concurrency: all sequences submitted at once,
/// timed from submission until the last one ends (prefills included).
fn batched(
    a: &BenchArgs,
    engine: lw_engine::Engine,
    bound: u64,
    params: &GenerationParams,
) -> anyhow::Result<()> {
    if a.concurrency.contains(&0) {
        anyhow::bail!("--concurrency values must be at least 1");
    }
    let most = *a.concurrency.iter().max().expect("not empty");
    let eos = engine.eos_ids().to_vec();
    let batcher = lw_engine::Batcher::start(
        engine,
        lw_engine::BatchOptions {
            max_batch: most,
            max_queue: most * 2,
            idle_caches: 0,
        },
    );
    let mut rng = Rng::new(7);
    let mut prompt = || random_prompt(&mut rng, a.prompt_tokens, bound, &eos);
    let mut rows = Vec::new();
    // A warm-up sequence first (page faults, thread pool).
    batcher
        .generate_blocking(prompt(), params.clone(), |_| true)
        .map_err(anyhow::Error::msg)??;
    for &n in &a.concurrency {
        let started = std::time::Instant::now();
        let receivers = (0..n)
            .map(|_| batcher.submit(prompt(), params.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        let mut generated = 0;
        for mut rx in receivers {
            while let Some(ev) = rx.blocking_recv() {
                if let lw_engine::BatchEvent::Done(r) = ev {
                    generated += r?.tokens.len();
                    break;
                }
            }
        }
        let secs = started.elapsed().as_secs_f64();
        rows.push((n, generated, secs, generated as f64 / secs));
    }
    print_batched(a, &rows);
    Ok(())
}

/// The batched rows (concurrency, tokens generated, seconds, aggregate
/// tok/s), each against the first, as JSON or text on stdout.
fn print_batched(a: &BenchArgs, rows: &[(usize, usize, f64, f64)]) {
    let base = rows[0].3;
    if a.json {
        let v: Vec<_> = rows
            .iter()
            .map(|&(n, g, s, r)| serde_json::json!({"concurrency": n, "generated_tokens": g, "seconds": s, "aggregate_tok_s": r, "vs_first": r / base}))
            .collect();
        println!(
            "{}",
            serde_json::json!({"model": a.model.model, "prompt_tokens": a.prompt_tokens, "gen_tokens": a.gen_tokens, "threads": rayon_threads(), "batched": v})
        );
    } else {
        println!(
            "batched generation: {} prompt + {} new tokens per sequence, {} threads",
            a.prompt_tokens,
            a.gen_tokens,
            rayon_threads()
        );
        for &(n, g, s, r) in rows {
            println!(
                "  concurrency {n:>3}: {r:>8.1} tok/s aggregate ({g} tokens in {s:.2}s), {:.2}x concurrency {}",
                r / base,
                a.concurrency[0]
            );
        }
    }
}

fn median(xs: &mut [f64]) -> f64 {
    xs.sort_by(f64::total_cmp);
    let n = xs.len();
    if n % 2 == 1 {
        xs[n / 2]
    } else {
        (xs[n / 2 - 1] + xs[n / 2]) / 2.0
    }
}

fn rayon_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// High-water mark of resident memory (Linux: VmHWM).
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Decode speed after `depth` cached positions of random keys and values,
/// and from an empty cache, --runs times each (median), greedy tokens fed
/// back through the model's forward pass.
fn at_depth(a: &BenchArgs, engine: &lw_engine::Engine, depth: usize) -> anyhow::Result<()> {
    let model = engine.model();
    let cfg = model.config();
    let limit = engine.context_length();
    if depth + a.gen_tokens > limit {
        anyhow::bail!(
            "--depth {depth} + --gen-tokens {} exceed the model's context of {limit} tokens",
            a.gen_tokens
        );
    }
    let width = cfg.num_kv_heads * cfg.head_dim;
    let mut rng = Rng::new(7);
    let mut rows = vec![0f32; 2 * width];
    let decode = |filled: usize, rng: &mut Rng, rows: &mut [f32]| -> anyhow::Result<f64> {
        let mut cache = model.new_cache();
        cache.reserve_exact(filled + a.gen_tokens + 1);
        for pos in 0..filled {
            for l in 0..cfg.num_layers {
                for v in rows.iter_mut() {
                    *v = (rng.next_f64() * 2.0 - 1.0) as f32;
                }
                let (k, v) = rows.split_at(width);
                cache.write(l, pos, k, v);
            }
        }
        cache.advance(filled);
        let mut token = 1u32;
        let started = std::time::Instant::now();
        for _ in 0..a.gen_tokens {
            let logits = model.forward(&[token], &mut cache, lw_model::Logits::Last)?;
            let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            token = row
                .iter()
                .enumerate()
                .max_by(|x, y| x.1.total_cmp(y.1))
                .map_or(0, |(i, _)| i as u32);
        }
        Ok(a.gen_tokens as f64 / started.elapsed().as_secs_f64())
    };
    let mut speeds = [Vec::new(), Vec::new()];
    for run in 0..=a.runs {
        for (side, filled) in [0, depth].into_iter().enumerate() {
            let s = decode(filled, &mut rng, &mut rows)?;
            if run > 0 {
                speeds[side].push(s);
            }
        }
    }
    let (d0, dd) = (median(&mut speeds[0]), median(&mut speeds[1]));
    if a.json {
        println!(
            "{}",
            serde_json::json!({"model": a.model.model, "threads": rayon_threads(), "depth": depth,
                "gen_tokens": a.gen_tokens, "kv_cache": model.kv_dtype().name(),
                "decode_tok_s_depth_0": d0, "decode_tok_s_at_depth": dd, "ratio": dd / d0})
        );
    } else {
        println!(
            "decode of {} tokens, {} threads, {} KV cache: {d0:.1} tok/s at depth 0, {dd:.1} tok/s at depth {depth} ({:.2}×; median of {})",
            a.gen_tokens,
            rayon_threads(),
            model.kv_dtype().name(),
            dd / d0,
            a.runs
        );
    }
    Ok(())
}
