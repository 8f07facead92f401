//! A loaded model ([`Model`]: weights, tokenizer, end-of-sequence ids,
//! defaults; shared, immutable) and the one-sequence engine on top of it
//! ([`Engine`]: a [`Model`] and the [`Sequence`] of its last generation).
//!
//! A generation runs prompt → (reused prefix + chunked prefill) → sample →
//! decode, streaming complete text deltas, until an end-of-sequence token, a
//! stop string, `max_tokens` or the context limit, on the same step as the
//! batching scheduler's (`decode::step`, a batch of one here).
//!
//! The engine keeps the KV cache of its last sequence. A new prompt that
//! starts with the same tokens reuses those positions and only computes the
//! rest, which is what makes plan-then-write linear in the document length.

use std::ops::Deref;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use lw_core::{FinishReason, GenerationParams, GenerationStats, Message, SamplingParams};
use lw_model::loader::SafetensorsSource;
use lw_model::{DType, GgufFile, KvDtype, Llama, ModelConfig, QType};
use serde_json::Value;

use crate::decode::{self, Running};
use crate::error::EngineError;
use crate::sequence::Sequence;
use crate::speculative::{Drafter, Speculation};
use crate::template::{ChatFormat, GLM4_STOP_TOKENS};
use crate::tokenizer::Tokenizer;

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

/// A loaded model: the weights, tokenizer, end-of-sequence ids and sampling
/// defaults, shared by every sequence that runs on it.
pub struct Model {
    model: Llama,
    tokenizer: Tokenizer,
    dir: PathBuf,
    eos_ids: Vec<u32>,
    defaults: SamplingParams,
    prefill_chunk: usize,
    memory_limit: Option<u64>,
}

impl Model {
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
        Ok(Model {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            eos_ids,
            defaults,
            prefill_chunk: opts.prefill_chunk.max(1),
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
        Ok(Model {
            model,
            tokenizer,
            dir: path.to_path_buf(),
            eos_ids,
            defaults: SamplingParams::default(),
            prefill_chunk: opts.prefill_chunk.max(1),
            memory_limit: opts.memory_limit,
        })
    }

    pub fn model(&self) -> &Llama {
        &self.model
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

    /// The one check of a prompt's length: it must leave room in the
    /// context for at least one generated token.
    pub fn check_prompt(&self, prompt: &[u32]) -> Result<(), EngineError> {
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

    /// Memory a generation's KV cache may take: the limit set at load, or
    /// what the system reports available now.
    pub fn memory_available(&self) -> Option<u64> {
        self.memory_limit.or_else(available_memory)
    }

    /// An empty sequence on this model.
    pub fn new_sequence(&self) -> Sequence {
        Sequence::new(&self.model)
    }
}

/// One sequence at a time on a model: the sequence of the last generation
/// is kept, so the next prompt reuses the prefix it shares.
pub struct Engine {
    model: Arc<Model>,
    seq: Option<Sequence>,
    /// Speculative decoding in [`Engine::generate`], when set.
    speculation: Option<Speculation>,
    /// The last generation's drafter (a draft model keeps its cache).
    drafter: Option<Drafter>,
}

impl Deref for Engine {
    type Target = Model;
    fn deref(&self) -> &Model {
        &self.model
    }
}

impl Engine {
    /// Loads a model directory (config, weights, tokenizer, generation
    /// config) or a GGUF file.
    pub fn load(dir: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        Ok(Engine::on(Arc::new(Model::load(dir, opts)?)))
    }

    /// An engine on a loaded model.
    pub fn on(model: Arc<Model>) -> Self {
        Engine {
            model,
            seq: None,
            speculation: None,
            drafter: None,
        }
    }

    /// The shared model (for a scheduler, or as a draft model).
    pub fn shared(&self) -> &Arc<Model> {
        &self.model
    }

    /// Turns speculative decoding on (or off with `None`) for `generate`.
    pub fn set_speculation(&mut self, speculation: Option<Speculation>) {
        self.speculation = speculation;
        self.drafter = None;
    }

    /// The speculative decoding set, if any.
    pub fn speculation(&self) -> Option<&Speculation> {
        self.speculation.as_ref()
    }

    fn seq(&mut self) -> &mut Sequence {
        let model = &self.model;
        self.seq.get_or_insert_with(|| model.new_sequence())
    }

    /// Drops the kept KV cache (the next prompt is computed from scratch).
    pub fn reset(&mut self) {
        if let Some(seq) = self.seq.as_mut() {
            seq.clear();
        }
    }

    /// Computes logits of every position of `prompt` from scratch.
    pub fn score(&mut self, prompt: &[u32]) -> Result<Vec<Vec<f32>>, EngineError> {
        self.check_prompt(prompt)?;
        let model = self.model.clone();
        let seq = self.seq();
        seq.clear();
        let mut rows = Vec::with_capacity(prompt.len());
        for chunk in prompt.chunks(model.prefill_chunk) {
            rows.extend(seq.feed_all(model.model(), chunk)?);
        }
        Ok(rows)
    }

    /// Generates a continuation of `prompt`. `on_text` receives each complete
    /// text delta and returns `false` to stop (finish reason `Cancelled`).
    /// This is the scheduler's step over a batch of one.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerationParams,
        on_text: impl FnMut(&str) -> bool,
    ) -> Result<Generation, EngineError> {
        self.check_prompt(prompt)?;
        let started = Instant::now();
        // The whole generation's cache at once: no copies while it runs, and
        // a clear error now rather than running out of memory later.
        if let Some(max) = params.max_tokens {
            let positions = (prompt.len() + max).min(self.context_length());
            self.reserve_cache(positions)?;
        }
        let model = self.model.clone();
        let seq = self.seq.take().unwrap_or_else(|| model.new_sequence());
        let drafter = match &self.speculation {
            Some(_) if params.no_speculation => None,
            Some(spec) => Some(self.drafter.take().unwrap_or_else(|| spec.drafter())),
            None => None,
        };
        let run = Running::new(
            &model,
            prompt.to_vec(),
            params,
            seq,
            drafter,
            on_text,
            started,
        );
        let mut batch = [run];
        let outcome = loop {
            if let Some((_, outcome)) = decode::step(&model, &mut batch).pop() {
                break outcome;
            }
        };
        let [run] = batch;
        let (result, seq, drafter, _) = run.finish(outcome, model.tokenizer());
        self.seq = Some(seq);
        if drafter.is_some() {
            self.drafter = drafter;
        }
        result
    }

    /// Allocates the KV cache for `positions` positions, unless that takes
    /// more memory than there is.
    pub fn reserve_cache(&mut self, positions: usize) -> Result<(), EngineError> {
        let available = self.model.memory_available();
        self.seq().reserve(positions, available)
    }
}

/// MemAvailable of /proc/meminfo, in bytes (Linux; `None` elsewhere).
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
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
