//! Loading a model from the command line's options, streaming a generation
//! to the terminal, and the interactive chat.

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::Context;
use lw_core::{GenerationParams, Message, SamplingParams};
use lw_engine::{Engine, Generation, LoadOptions};
use lw_model::DType;

use crate::{ModelArgs, SamplingArgs, WeightDtype};

/// Loads the model the flags name (with any draft model or prompt lookup)
/// and reports its size, speed-relevant figures and KV cache on stderr.
pub fn load_engine(m: &ModelArgs) -> anyhow::Result<Engine> {
    lw_model::set_threads(m.engine.threads.unwrap_or_else(lw_model::default_threads));
    let dir = model_dir(m)?;
    let started = Instant::now();
    let opts = load_options(m);
    let mut engine =
        Engine::load(&dir, &opts).with_context(|| format!("loading model {}", dir.display()))?;
    let cfg = engine.model().config();
    eprintln!(
        "loaded {} ({}, {:.1}M parameters, weights {}, {:.1} MB read per token, context {}) in {:.2}s",
        dir.display(),
        cfg.model_type,
        cfg.parameter_count() as f64 / 1e6,
        engine.model().weight_format(),
        engine.model().weight_bytes_per_token() as f64 / 1e6,
        engine.context_length(),
        started.elapsed().as_secs_f64()
    );
    if let Some(lora) = &opts.lora {
        eprintln!("LoRA adapter {} merged into the weights", lora.display());
    }
    add_speculation(&mut engine, m, &opts)?;
    report_kv_cache(&engine, m);
    Ok(engine)
}

/// The model's directory or file: resolved (downloaded if need be), or the
/// shipped tiny model with a warning when allowed and the hub is out of reach.
fn model_dir(m: &ModelArgs) -> anyhow::Result<std::path::PathBuf> {
    if m.fallback_to_tiny {
        let (dir, warning) =
            lw_engine::resolve_model_or_tiny(&m.model, &|note| eprintln!("{note}"))?;
        if let Some(w) = warning {
            eprintln!("warning: {w}");
        }
        Ok(dir)
    } else {
        Ok(lw_engine::resolve_model(&m.model)?)
    }
}

/// How to load the weights, from the engine flags.
fn load_options(m: &ModelArgs) -> LoadOptions {
    LoadOptions {
        dtype: m.engine.dtype.map(|d| match d {
            WeightDtype::F32 => DType::F32,
            WeightDtype::F16 => DType::F16,
            WeightDtype::Bf16 => DType::BF16,
        }),
        prefill_chunk: m.engine.prefill_chunk,
        quantize: m.engine.quantize,
        chat_format: m.engine.chat_format,
        kv_cache: m.engine.kv_cache,
        memory_limit: None,
        thinking: m.engine.thinking.map(|s| s == crate::Switch::On),
        context: m.engine.ctx_size,
        lora: m.engine.lora.clone(),
    }
}

/// Speculative decoding as asked: a draft model (loaded like the main one,
/// its own chat format) or prompt lookup; none otherwise.
fn add_speculation(engine: &mut Engine, m: &ModelArgs, opts: &LoadOptions) -> anyhow::Result<()> {
    if let Some(draft) = &m.engine.draft_model {
        let dir = lw_engine::resolve_model(draft)?;
        let draft_opts = LoadOptions {
            chat_format: lw_engine::ChatFormat::Auto,
            // The adapter is the main model's.
            lora: None,
            ..opts.clone()
        };
        let draft_engine = Engine::load(&dir, &draft_opts)
            .with_context(|| format!("loading draft model {}", dir.display()))?;
        let params = draft_engine.model().config().parameter_count();
        let spec = lw_engine::Speculation::draft_model(draft_engine, engine, m.engine.draft_max)?;
        engine.set_speculation(Some(spec));
        eprintln!(
            "speculative decoding: draft model {} ({:.1}M parameters), up to {} tokens per step",
            dir.display(),
            params as f64 / 1e6,
            m.engine.draft_max
        );
    } else if m.engine.prompt_lookup {
        engine.set_speculation(Some(lw_engine::Speculation::prompt_lookup(
            m.engine.draft_max,
        )));
        eprintln!(
            "speculative decoding: prompt lookup, up to {} tokens per step",
            m.engine.draft_max
        );
    }
    Ok(())
}

/// The KV cache's size per token and at the full context, with a warning
/// when the full context would not fit in the memory available.
fn report_kv_cache(engine: &Engine, m: &ModelArgs) {
    let per_token = engine.model().kv_bytes_per_token();
    let full = engine.model().kv_bytes_for(engine.context_length()) as f64;
    let windows = &engine.model().config().sliding_window;
    let sliding = windows.iter().flatten().count();
    eprintln!(
        "KV cache ({}): {:.1} KB per token, {:.2} GB at the full context of {} tokens{}{}",
        m.engine.kv_cache.name(),
        per_token as f64 / 1024.0,
        full / 1e9,
        engine.context_length(),
        match windows.iter().flatten().max() {
            Some(w) if sliding > 0 => format!(
                " ({sliding} of {} layers slide and keep their window of {w} positions)",
                windows.len()
            ),
            _ => String::new(),
        },
        match lw_engine::available_memory() {
            Some(avail) if full > avail as f64 => format!(
                " (more than the {:.1} GB of memory available: long generations will run out first)",
                avail as f64 / 1e9
            ),
            _ => String::new(),
        }
    );
}

/// The user's sampling flags over the model's own defaults.
pub fn generation_params(engine: &Engine, s: &SamplingArgs) -> anyhow::Result<GenerationParams> {
    let d = engine.default_sampling();
    let seed = s.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|t| t.as_nanos() as u64)
            .unwrap_or(0)
    });
    let constraint = s.constraint()?;
    if let Some(c) = &constraint {
        // A bad grammar is an error now, before the prompt is computed.
        engine.grammars()?.check(c)?;
    }
    Ok(GenerationParams {
        sampling: SamplingParams {
            temperature: s.temperature.unwrap_or(d.temperature),
            top_k: s.top_k.unwrap_or(d.top_k),
            top_p: s.top_p.unwrap_or(d.top_p),
            min_p: s.min_p.unwrap_or(d.min_p),
            repetition_penalty: s.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed,
            presence_penalty: s.presence_penalty,
            frequency_penalty: s.frequency_penalty,
            logit_bias: s.logit_bias.clone(),
            dry_multiplier: s.dry_multiplier,
            dry_base: s.dry_base,
            dry_allowed_length: s.dry_allowed_length,
            dry_penalty_last_n: s.dry_penalty_last_n,
            dry_sequence_breakers: if s.dry_sequence_breakers.is_empty() {
                lw_core::dry_sequence_breakers()
            } else {
                s.dry_sequence_breakers.clone()
            },
        },
        max_tokens: Some(s.max_tokens),
        stop: s.stop.clone(),
        ignore_eos: false,
        no_speculation: false,
        min_tokens: s.min_tokens,
        constraint,
        end_after: None,
    })
}

/// Generates, writing each text delta to stdout as it arrives.
pub fn stream_to_stdout(
    engine: &mut Engine,
    ids: &[u32],
    params: &GenerationParams,
) -> anyhow::Result<Generation> {
    let stdout = std::io::stdout();
    let mut write_failed = None;
    let out = engine.generate(ids, params, |delta| {
        let mut lock = stdout.lock();
        match lock.write_all(delta.as_bytes()).and_then(|_| lock.flush()) {
            Ok(()) => true,
            Err(e) => {
                // A closed pipe (`| head`) ends the generation quietly.
                write_failed = Some(e);
                false
            }
        }
    })?;
    if let Some(e) = write_failed {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            return Err(e).context("writing to stdout");
        }
    }
    Ok(out)
}

pub fn print_stats(out: &Generation, seed: u64) {
    let s = &out.stats;
    eprintln!();
    eprintln!(
        "prompt tokens: {} ({} reused), generated tokens: {}, prefill: {:.1} tok/s, decode: {:.1} tok/s, finish: {}, seed: {}",
        s.prompt_tokens,
        s.cached_prompt_tokens,
        s.generated_tokens,
        s.prefill_tok_s(),
        s.decode_tok_s(),
        out.finish_reason.as_str(),
        seed
    );
    if s.mask_seconds > 0.0 && s.generated_tokens > 0 {
        eprintln!(
            "grammar masks: {:.0} µs per token on the decoding path ({:.1}% of decode time); \
             {:.0} µs per token computed, ahead of it while the model runs",
            1e6 * s.mask_seconds / s.generated_tokens as f64,
            100.0 * s.mask_seconds / s.decode_seconds.max(1e-9),
            1e6 * s.mask_compute_seconds / s.generated_tokens as f64,
        );
    }
    if let Some(rate) = s.acceptance_rate() {
        eprintln!(
            "speculative decoding: {} of {} drafted tokens accepted ({:.0}%)",
            s.accepted_draft_tokens,
            s.draft_tokens,
            100.0 * rate
        );
    }
}

/// A multi-turn conversation on stdin/stdout. The KV cache of the previous
/// turns is reused, so each turn only computes its new tokens.
pub fn chat(m: &ModelArgs, s: &SamplingArgs, system: Option<&str>) -> anyhow::Result<()> {
    let mut engine = load_engine(m)?;
    // Fail early, before the user types, if there is no template.
    engine.chat_prompt(&[Message::user("test")], true)?;
    let mut messages = Vec::new();
    if let Some(sys) = system {
        messages.push(Message::system(sys));
    }
    let base = messages.clone();
    let mut params = generation_params(&engine, s)?;
    eprintln!("Type a message and press Enter. /reset starts over, /exit (or Ctrl-D) quits.");
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        eprint!("> ");
        line.clear();
        if stdin.lock().read_line(&mut line)? == 0 {
            eprintln!();
            return Ok(());
        }
        let text = line.trim();
        match text {
            "" => continue,
            "/exit" | "/quit" => return Ok(()),
            "/reset" => {
                messages = base.clone();
                engine.reset();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        messages.push(Message::user(text));
        let ids = match engine.encode_chat(&messages) {
            Ok(ids) => ids,
            Err(e) => {
                messages.pop();
                eprintln!("error: {e}");
                continue;
            }
        };
        match stream_to_stdout(&mut engine, &ids, &params) {
            Ok(out) => {
                println!();
                print_stats(&out, params.sampling.seed);
                messages.push(Message::assistant(out.text));
            }
            Err(e) => {
                // A full context or similar: keep the session alive.
                messages.pop();
                eprintln!("error: {e:#}");
            }
        }
        params.sampling.seed = params.sampling.seed.wrapping_add(1);
    }
}
