//! The generation loop: prompt → (reused prefix + chunked prefill) → sample →
//! decode one token at a time, streaming complete text deltas, until an
//! end-of-sequence token, a stop string, `max_tokens` or the context limit.
//!
//! The engine keeps the KV cache of its last sequence. A new prompt that
//! starts with the same tokens reuses those positions and only computes the
//! rest, which is what makes plan-then-write linear in the document length.

use std::path::{Path, PathBuf};
use std::time::Instant;

use lw_core::{FinishReason, GenerationParams, GenerationStats, Message, SamplingParams};
use lw_model::loader::SafetensorsSource;
use lw_model::{DType, GgufFile, KvCache, KvDtype, Llama, Logits, ModelConfig, QType};
use serde_json::Value;

use crate::error::EngineError;
use crate::sampler::Sampler;
use crate::speculative::Speculation;
use crate::template::{ChatFormat, GLM4_STOP_TOKENS};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Dtype the weights are held in; `None` keeps the checkpoint's own
    /// (f32, f16 or bf16). Activations are always computed in f32.
    pub dtype: Option<DType>,
    /// Prompt tokens per prefill step.
    pub prefill_chunk: usize,
    /// Quantize the weight matrices of a safetensors checkpoint as they load
    /// (Q8_0, Q4_K…), so a bf16 or f32 checkpoint decodes at quantized speed.
    /// GGUF files keep their own types.
    pub quantize: Option<QType>,
    /// How chat messages become a prompt.
    pub chat_format: ChatFormat,
    /// The format of cached keys and values (f16 halves their memory).
    pub kv_cache: KvDtype,
    /// Memory a generation's KV cache may take; `None`: what the system
    /// reports available (MemAvailable) when the generation starts.
    pub memory_limit: Option<u64>,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            dtype: None,
            prefill_chunk: 512,
            quantize: None,
            chat_format: ChatFormat::Auto,
            kv_cache: KvDtype::F32,
            memory_limit: None,
        }
    }
}

/// What a generation produced.
#[derive(Debug, Clone)]
pub struct Generation {
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: FinishReason,
    pub stats: GenerationStats,
}

pub struct Engine {
    model: Llama,
    tokenizer: Tokenizer,
    dir: PathBuf,
    eos_ids: Vec<u32>,
    defaults: SamplingParams,
    cache: KvCache,
    /// Tokens whose keys and values are in `cache`, in order.
    cached: Vec<u32>,
    prefill_chunk: usize,
    /// Speculative decoding in [`Engine::generate`], when set.
    speculation: Option<Speculation>,
    memory_limit: Option<u64>,
}

impl Engine {
    /// Loads a model directory (config, weights, tokenizer, generation
    /// config) or a GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        if crate::source::is_gguf(dir) {
            return Self::load_gguf(dir, opts);
        }
        let config_path = dir.join("config.json");
        let cfg = ModelConfig::from_file(&config_path)?;
        let mut tokenizer = Tokenizer::from_dir(dir)?;
        apply_chat_format(&mut tokenizer, &cfg, opts.chat_format, dir)?;
        let tok_vocab = tokenizer.id_bound();
        if tok_vocab > cfg.vocab_size {
            return Err(EngineError::VocabMismatch {
                tokenizer_path: dir.join("tokenizer.json"),
                config_path,
                tokenizer: tok_vocab,
                model: cfg.vocab_size,
            });
        }
        let weights = lw_model::Weights::for_config(dir, &cfg)?;
        let dtype = opts.dtype.unwrap_or_else(|| match weights.stored_dtype() {
            DType::BF16 => DType::BF16,
            DType::F16 => DType::F16,
            _ => DType::F32,
        });
        let (gen_eos, defaults) = read_generation_config(&dir.join("generation_config.json"))?;
        let mut eos_ids = cfg.eos_token_ids.clone();
        eos_ids.extend(gen_eos);
        let eos_ids = with_tokenizer_eos(eos_ids, &tokenizer, &cfg);
        let src = SafetensorsSource {
            weights: &weights,
            dtype,
            quantize: opts.quantize,
        };
        let mut model = Llama::load_from(cfg, &src, dtype)?;
        model.set_kv_dtype(opts.kv_cache)?;
        let cache = model.new_cache();
        Ok(Engine {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            eos_ids,
            defaults,
            cache,
            cached: Vec::new(),
            prefill_chunk: opts.prefill_chunk.max(1),
            speculation: None,
            memory_limit: opts.memory_limit,
        })
    }

    /// Loads a GGUF file: the model, its tokenizer and chat template.
    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let file = GgufFile::open(path)?;
        let mut tokenizer = crate::gguf::tokenizer_from_gguf(&file)?;
        let mut model = Llama::load_gguf(&file)?;
        model.set_kv_dtype(opts.kv_cache)?;
        apply_chat_format(&mut tokenizer, model.config(), opts.chat_format, path)?;
        let tok_vocab = tokenizer.id_bound();
        if tok_vocab > model.config().vocab_size {
            return Err(EngineError::VocabMismatch {
                tokenizer_path: path.to_path_buf(),
                config_path: path.to_path_buf(),
                tokenizer: tok_vocab,
                model: model.config().vocab_size,
            });
        }
        let eos_ids = with_tokenizer_eos(
            model.config().eos_token_ids.clone(),
            &tokenizer,
            model.config(),
        );
        let cache = model.new_cache();
        Ok(Engine {
            model,
            tokenizer,
            dir: path.to_path_buf(),
            eos_ids,
            defaults: SamplingParams::default(),
            cache,
            cached: Vec::new(),
            prefill_chunk: opts.prefill_chunk.max(1),
            speculation: None,
            memory_limit: opts.memory_limit,
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
    }

    /// The model alone (a draft model for another engine).
    pub fn into_model(self) -> Llama {
        self.model
    }

    /// Turns speculative decoding on (or off with `None`) for `generate`.
    pub fn set_speculation(&mut self, speculation: Option<Speculation>) {
        self.speculation = speculation;
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    pub fn model_dir(&self) -> &Path {
        &self.dir
    }

    /// End-of-sequence ids from config.json, generation_config.json and the tokenizer.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// Sampling settings the checkpoint recommends (generation_config.json).
    pub fn default_sampling(&self) -> &SamplingParams {
        &self.defaults
    }

    pub fn context_length(&self) -> usize {
        self.model.context_length()
    }

    /// Renders a conversation with the model's chat template.
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .tokenizer
            .chat_template()
            .ok_or_else(|| EngineError::NoChatTemplate(self.dir.join("tokenizer_config.json")))?;
        tmpl.render(messages, add_generation_prompt)
    }

    /// Token ids of a raw prompt (with the tokenizer's BOS, if it adds one).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text, true)
    }

    /// Token ids of a rendered chat prompt (its special tokens are in the text).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        let text = self.chat_prompt(messages, true)?;
        self.tokenizer.encode(&text, false)
    }

    /// Drops the kept KV cache (the next prompt is computed from scratch).
    pub fn reset(&mut self) {
        self.cache.clear();
        self.cached.clear();
    }

    /// Computes logits of every position of `prompt` from scratch.
    pub fn score(&mut self, prompt: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.check_prompt(prompt)?;
        self.reset();
        let mut rows = Vec::with_capacity(prompt.len());
        for chunk in prompt.chunks(self.prefill_chunk) {
            let logits = self.model.forward(chunk, &mut self.cache, Logits::All)?;
            self.cached.extend_from_slice(chunk);
            for r in 0..chunk.len() {
                rows.push(
                    logits
                        .get(r)
                        .and_then(|t| t.to_vec1::<f32>())
                        .map_err(lw_model::ModelError::from)?,
                );
            }
        }
        Ok(rows)
    }

    pub(crate) fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
        if prompt.is_empty() {
            return Err(EngineError::EmptyPrompt);
        }
        if prompt.len() >= self.context_length() {
            return Err(EngineError::PromptTooLong {
                tokens: prompt.len(),
                limit: self.context_length(),
            });
        }
        Ok(())
    }

    /// Generates a continuation of `prompt`. `on_text` receives each complete
    /// text delta and returns `false` to stop (finish reason `Cancelled`).
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        mut on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt)?;
        let started = Instant::now();
        // The whole generation's cache at once: no copies while it runs, and
        // a clear error now rather than running out of memory later.
        if let Some(max) = params.max_tokens {
            let positions = (prompt.len() + max).min(self.context_length());
            self.reserve_cache(positions)?;
        }
        let (logits, common) = prefill(
            &self.model,
            &mut self.cache,
            &mut self.cached,
            prompt,
            self.prefill_chunk,
        )?;
        let mut stats = GenerationStats {
            prompt_tokens: prompt.len(),
            cached_prompt_tokens: common,
            prefill_seconds: started.elapsed().as_secs_f64(),
            ..Default::default()
        };
        let decode_start = Instant::now();
        let mut seq = Decoding::new(params, prompt, self.id_bound());
        let mut finish = seq.finished_before_start();
        // `rows[j]` is the next-token distribution after the j-th token fed
        // last; `drafts[j]` is the guess it checks (none for the last row).
        let mut rows = vec![logits];
        let mut drafts: Vec<u32> = Vec::new();
        // Cache length before the last forward pass.
        let mut base = self.cache.len();
        let mut history: Vec<u32> = Vec::new();
        while finish.is_none() {
            let mut kept = 0;
            for (j, row) in rows.iter_mut().enumerate() {
                let draft = drafts.get(j).copied();
                let (ready, done, is_draft) =
                    seq.step_draft(row, &self.tokenizer, &self.eos_ids, draft)?;
                if !ready.is_empty() && !on_text(&ready) {
                    finish = Some(FinishReason::Cancelled);
                    break;
                }
                if done.is_some() {
                    finish = done;
                    break;
                }
                if !is_draft {
                    break;
                }
                kept += 1;
            }
            stats.draft_tokens += drafts.len();
            stats.accepted_draft_tokens += kept.min(drafts.len());
            if !drafts.is_empty() {
                // Keep the fed token and the accepted guesses; the rest of
                // the pass was computed for tokens that were not taken.
                let valid = base + 1 + kept.min(drafts.len());
                self.cache.truncate(valid);
                self.cached.truncate(valid);
            }
            if finish.is_some() {
                break;
            }
            if self.cache.len() + 1 > self.context_length() {
                finish = Some(FinishReason::ContextFull);
                break;
            }
            let next = seq.last_token();
            drafts.clear();
            // Room for guesses in the context, and in max_tokens after the
            // token fed now and one more from the last row.
            let room = (self.context_length() - self.cache.len() - 1)
                .min(seq.remaining().saturating_sub(1));
            if let Some(spec) = self.speculation.as_mut() {
                if room > 0 {
                    history.clear();
                    history.extend_from_slice(prompt);
                    history.extend_from_slice(&seq.tokens);
                    drafts = spec.propose(&history, room)?;
                }
            }
            base = self.cache.len();
            let mut feed = Vec::with_capacity(1 + drafts.len());
            feed.push(next);
            feed.extend_from_slice(&drafts);
            let which = if drafts.is_empty() {
                Logits::Last
            } else {
                Logits::All
            };
            let out = self.model.forward(&feed, &mut self.cache, which)?;
            self.cached.extend_from_slice(&feed);
            rows = out.to_vec2::<f32>().map_err(lw_model::ModelError::from)?;
        }
        let finish = finish.unwrap_or(FinishReason::Stop);
        let rest = seq.finish(finish, &self.tokenizer)?;
        if !rest.is_empty() {
            on_text(&rest);
        }
        stats.generated_tokens = seq.tokens.len();
        stats.decode_seconds = decode_start.elapsed().as_secs_f64();
        Ok(Generation {
            text: seq.text,
            tokens: seq.tokens,
            finish_reason: finish,
            stats,
        })
    }

    /// Allocates the KV cache for `positions` positions, unless that takes
    /// more memory than there is.
    pub fn reserve_cache(&mut self, positions: usize) -> Result<(), EngineError> {
        let extra = self
            .cache
            .bytes_for(positions)
            .saturating_sub(self.cache.bytes()) as u64;
        if extra == 0 {
            return Ok(());
        }
        if let Some(available) = self.memory_limit.or_else(available_memory) {
            if extra > available {
                return Err(EngineError::KvCacheTooLarge {
                    positions,
                    bytes: self.cache.bytes_for(positions) as u64,
                    available,
                    dtype: self.cache.dtype().name(),
                });
            }
        }
        self.cache.reserve_exact(positions);
        Ok(())
    }

    /// Prompt tokens per prefill step.
    pub fn prefill_chunk(&self) -> usize {
        self.prefill_chunk
    }

    /// Token ids the sampler may pick: the tokenizer's, within the embedding.
    pub fn id_bound(&self) -> usize {
        self.tokenizer
            .id_bound()
            .min(self.model.config().vocab_size)
    }
}

/// The per-sequence side of decoding: sampling, end conditions, text
/// assembly (whole characters only) and stop strings. The engine's own loop
/// and the batching scheduler both drive sequences through it.
pub(crate) struct Decoding {
    sampler: Sampler,
    decoder: StreamDecoder,
    stops: StopMatcher,
    pub(crate) text: String,
    pub(crate) tokens: Vec<u32>,
    seen: Vec<u32>,
    max_tokens: usize,
    ignore_eos: bool,
}

impl Decoding {
    pub(crate) fn new(params: &GenerationParams, prompt: &[u32], id_bound: usize) -> Self {
        Decoding {
            sampler: Sampler::new(params.sampling.clone(), id_bound),
            decoder: StreamDecoder::new(),
            stops: StopMatcher::new(&params.stop),
            text: String::new(),
            tokens: Vec::new(),
            seen: if params.sampling.repetition_penalty != 1.0 {
                prompt.to_vec()
            } else {
                Vec::new()
            },
            max_tokens: params.max_tokens.unwrap_or(usize::MAX),
            ignore_eos: params.ignore_eos,
        }
    }

    /// `Length` when no token may be generated at all.
    pub(crate) fn finished_before_start(&self) -> Option<FinishReason> {
        (self.max_tokens == 0).then_some(FinishReason::Length)
    }

    /// Samples the next token from `logits` and takes it: returns the text it
    /// releases and, when the sequence ends here, why.
    pub(crate) fn step(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<(String, Option<FinishReason>), EngineError> {
        self.step_draft(logits, tok, eos, None)
            .map(|(ready, done, _)| (ready, done))
    }

    /// [`Decoding::step`] given a drafted guess for the token; also says
    /// whether the token taken is the draft.
    pub(crate) fn step_draft(
        &mut self,
        logits: &mut [f32],
        tok: &Tokenizer,
        eos: &[u32],
        draft: Option<u32>,
    ) -> Result<(String, Option<FinishReason>, bool), EngineError> {
        let (next, is_draft) = self.sampler.choose(logits, &self.seen, draft);
        let (ready, done) = self.take(next, tok, eos)?;
        Ok((ready, done, is_draft))
    }

    /// Tokens that may still be generated.
    pub(crate) fn remaining(&self) -> usize {
        self.max_tokens.saturating_sub(self.tokens.len())
    }

    fn take(
        &mut self,
        next: u32,
        tok: &Tokenizer,
        eos: &[u32],
    ) -> Result<(String, Option<FinishReason>), EngineError> {
        if !self.ignore_eos && eos.contains(&next) {
            return Ok((String::new(), Some(FinishReason::Stop)));
        }
        self.tokens.push(next);
        self.seen.push(next);
        let mut ready = String::new();
        if let Some(delta) = self.decoder.push(tok, next)? {
            let (r, hit) = self.stops.push(&delta);
            self.text.push_str(&r);
            ready = r;
            if hit {
                return Ok((ready, Some(FinishReason::Stop)));
            }
        }
        if self.tokens.len() >= self.max_tokens {
            return Ok((ready, Some(FinishReason::Length)));
        }
        Ok((ready, None))
    }

    /// The token taken last (the next one to feed the model).
    pub(crate) fn last_token(&self) -> u32 {
        *self.tokens.last().expect("a token was taken")
    }

    /// Text still held when the sequence ends for a reason other than a stop
    /// or a cancel (a partial character or a partial stop-string match).
    pub(crate) fn finish(
        &mut self,
        reason: FinishReason,
        tok: &Tokenizer,
    ) -> Result<String, EngineError> {
        if reason == FinishReason::Stop || reason == FinishReason::Cancelled {
            return Ok(String::new());
        }
        let mut rest = String::new();
        if let Some(held) = self.decoder.finish(tok)? {
            let (ready, hit) = self.stops.push(&held);
            rest.push_str(&ready);
            if hit {
                self.stops.flush();
            }
        }
        rest.push_str(&self.stops.flush());
        self.text.push_str(&rest);
        Ok(rest)
    }
}

/// MemAvailable of /proc/meminfo, in bytes (Linux; `None` elsewhere).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Brings a cache holding `cached` to `tokens`: keeps their longest common
/// prefix (at least one token is recomputed, so there are logits) and
/// computes the rest in chunks. Returns the last position's logits and the
/// number of positions reused.
pub(crate) fn prefill(
    model: &Llama,
    cache: &mut KvCache,
    cached: &mut Vec<u32>,
    tokens: &[u32],
    chunk: usize,
) -> Result<(Vec<f32>, usize), EngineError> {
    let common = common_prefix(cached, tokens).min(tokens.len() - 1);
    cache.truncate(common);
    cached.truncate(common);
    let mut logits = Vec::new();
    for part in tokens[common..].chunks(chunk) {
        let out = model.forward(part, cache, Logits::Last)?;
        cached.extend_from_slice(part);
        logits = lw_model::llama::last_row(&out)?;
    }
    Ok((logits, common))
}

pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// Chooses the chat template: the checkpoint's own, or a built-in format
/// (asked for, or GLM-4's when a GLM checkpoint ships none).
fn apply_chat_format(
    tokenizer: &mut Tokenizer,
    cfg: &ModelConfig,
    format: ChatFormat,
    source: &Path,
) -> Result<(), EngineError> {
    let format = match format {
        ChatFormat::Auto if tokenizer.chat_template().is_none() && cfg.model_type == "glm" => {
            ChatFormat::Glm4
        }
        ChatFormat::Template if tokenizer.chat_template().is_none() => {
            return Err(EngineError::NoChatTemplate(source.to_path_buf()))
        }
        other => other,
    };
    let bos = tokenizer.bos_token().unwrap_or("").to_string();
    let eos = tokenizer.eos_token().unwrap_or("").to_string();
    if let Some(t) = format.builtin(&bos, &eos) {
        tokenizer.set_chat_template(Some(t));
    }
    Ok(())
}

/// End-of-sequence ids: the config's, the tokenizer's EOS and other stop
/// tokens (a GGUF file's end-of-turn), and for GLM-4 the turn markers that
/// end an answer.
fn with_tokenizer_eos(mut ids: Vec<u32>, tokenizer: &Tokenizer, cfg: &ModelConfig) -> Vec<u32> {
    if let Some(id) = tokenizer.eos_token().and_then(|t| tokenizer.token_id(t)) {
        ids.push(id);
    }
    ids.extend_from_slice(tokenizer.stop_ids());
    if cfg.model_type == "glm" {
        ids.extend(
            GLM4_STOP_TOKENS
                .iter()
                .filter_map(|t| tokenizer.token_id(t)),
        );
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// eos ids and sampling defaults from `generation_config.json` (optional file).
fn read_generation_config(path: &Path) -> Result<(Vec<u32>, SamplingParams), EngineError> {
    let mut defaults = SamplingParams::default();
    if !path.exists() {
        return Ok((vec![], defaults));
    }
    let text = std::fs::read_to_string(path).map_err(|e| EngineError::file(path, e.to_string()))?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| EngineError::file(path, format!("invalid JSON: {e}")))?;
    let eos = lw_model::config::token_ids(json.get("eos_token_id"), "eos_token_id")
        .map_err(|e| EngineError::file(path, e))?;
    let num = |k: &str| json.get(k).and_then(Value::as_f64);
    if json.get("do_sample").and_then(Value::as_bool) == Some(false) {
        defaults.temperature = 0.0;
    } else if let Some(t) = num("temperature") {
        defaults.temperature = t as f32;
    }
    if let Some(p) = num("top_p") {
        defaults.top_p = p as f32;
    }
    if let Some(k) = num("top_k") {
        defaults.top_k = k as usize;
    }
    if let Some(p) = num("min_p") {
        defaults.min_p = p as f32;
    }
    if let Some(r) = num("repetition_penalty") {
        defaults.repetition_penalty = r as f32;
    }
    Ok((eos, defaults))
}

/// Holds back text that might be the start of a stop string, and reports
/// when one appears (the stop string and what follows are never released).
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        StopMatcher {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns what can be released and whether a stop string was hit.
    pub fn push(&mut self, delta: &str) -> (String, bool) {
        self.pending.push_str(delta);
        if self.stops.is_empty() {
            return (std::mem::take(&mut self.pending), false);
        }
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
        {
            let ready = self.pending[..at].to_string();
            self.pending.clear();
            return (ready, true);
        }
        // Keep the longest suffix that is a prefix of some stop string.
        let keep_from = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.pending[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.pending.len());
        let ready = self.pending[..keep_from].to_string();
        self.pending.drain(..keep_from);
        (ready, false)
    }

    /// Releases whatever is held (the generation ended for another reason).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_strings_split_across_deltas_are_caught_and_not_emitted() {
        let mut m = StopMatcher::new(&["</end>".to_string()]);
        let mut out = String::new();
        let mut hit = false;
        for d in ["Hello </", "en", "d> tail"] {
            let (r, h) = m.push(d);
            out.push_str(&r);
            if h {
                hit = true;
                break;
            }
        }
        assert!(hit);
        assert_eq!(out, "Hello ");
    }

    #[test]
    fn near_misses_are_released() {
        let mut m = StopMatcher::new(&["STOP".to_string()]);
        assert_eq!(m.push("a ST"), ("a ".to_string(), false));
        assert_eq!(m.push("OOP"), ("STOOP".to_string(), false));
        assert_eq!(m.push("x S"), ("x ".to_string(), false));
        assert_eq!(m.flush(), "S");
    }

    #[test]
    fn multibyte_text_is_held_at_character_boundaries() {
        let mut m = StopMatcher::new(&["。结束".to_string()]);
        assert_eq!(m.push("你好。"), ("你好".to_string(), false));
        assert_eq!(m.push("结束了"), ("".to_string(), true));
    }
}
