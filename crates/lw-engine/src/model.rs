//! A loaded model ([`Model`]): weights, tokenizer, end-of-sequence ids and
//! sampling defaults, shared (behind an `Arc`) and never changed by a
//! generation; every sequence that runs on it holds a [`Sequence`] of its own.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use lw_core::{Message, SamplingParams};
use lw_model::loader::SafetensorsSource;
use lw_model::{DType, GgufFile, KvDtype, Llama, ModelConfig, QType};
use serde_json::Value;

use crate::error::EngineError;
use crate::grammar::{Grammars, Guide};
use crate::sequence::Sequence;
use crate::template::{ChatFormat, TemplateInputs, GLM4_STOP_TOKENS};
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
    /// `enable_thinking` for chat templates that read it (Qwen3 and other
    /// reasoning models): `Some(false)` asks for an answer without a
    /// `<think>` block; `None` leaves the template's default.
    pub thinking: Option<bool>,
    /// The most tokens (prompt and answer) a sequence may hold, below the
    /// model's own context; `None`: the model's own.
    pub context: Option<usize>,
    /// A LoRA adapter directory (PEFT layout) merged into the weights as
    /// they load.
    pub lora: Option<PathBuf>,
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
            thinking: None,
            context: None,
            lora: None,
        }
    }
}

/// The LoRA adapter `opts` names, read.
fn adapter(opts: &LoadOptions) -> Result<Option<lw_model::Adapter>, EngineError> {
    Ok(match &opts.lora {
        Some(dir) => Some(lw_model::Adapter::load(dir)?),
        None => None,
    })
}

/// Tokens that a DRY repeat cannot run across.
pub type BreakerIds = Arc<HashSet<u32>>;

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
    thinking: Option<bool>,
    context_limit: Option<usize>,
    /// DRY's breaker tokens per list of breaker strings, found once per
    /// list (a scan of the whole vocabulary).
    breakers: Mutex<Vec<(Vec<String>, BreakerIds)>>,
    /// The grammar compiler over this vocabulary, built when a generation
    /// first asks for structured decoding.
    grammars: OnceLock<Result<Grammars, String>>,
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
        let mut model = match adapter(opts)? {
            Some(a) => Llama::load_adapted(cfg, &src, &a, dtype)?,
            None => Llama::load_from(cfg, &src, dtype)?,
        };
        model.set_kv_dtype(opts.kv_cache)?;
        fit_context(&mut model, opts.context);
        Ok(Model {
            model,
            tokenizer,
            dir: dir.to_path_buf(),
            eos_ids,
            defaults,
            prefill_chunk: opts.prefill_chunk.max(1),
            memory_limit: opts.memory_limit,
            thinking: opts.thinking,
            context_limit: opts.context,
            breakers: Mutex::default(),
            grammars: OnceLock::new(),
        })
    }

    /// Loads a GGUF file: the model, its tokenizer and chat template.
    fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<Self, EngineError> {
        let file = GgufFile::open(path)?;
        let mut tokenizer = crate::gguf::tokenizer_from_gguf(&file)?;
        let mut model = Llama::load_gguf_adapted(&file, adapter(opts)?.as_ref())?;
        model.set_kv_dtype(opts.kv_cache)?;
        fit_context(&mut model, opts.context);
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
            thinking: opts.thinking,
            context_limit: opts.context,
            breakers: Mutex::default(),
            grammars: OnceLock::new(),
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

    /// The longest sequence (prompt and answer) this model takes: its own
    /// context, or the smaller one it was loaded with.
    pub fn context_length(&self) -> usize {
        let own = self.model.context_length();
        self.context_limit.map_or(own, |n| n.clamp(1, own))
    }

    /// Ids of the tokens whose text contains one of `breakers` (DRY's
    /// sequence breakers), scanned once per list and kept.
    pub fn dry_breakers(&self, breakers: &[String]) -> Arc<HashSet<u32>> {
        let mut known = self.breakers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, ids)) = known.iter().find(|(b, _)| b == breakers) {
            return ids.clone();
        }
        let ids: Arc<HashSet<u32>> = Arc::new(
            (0..self.id_bound() as u32)
                .filter(|&id| {
                    self.tokenizer.piece(id).is_ok_and(|p| {
                        breakers
                            .iter()
                            .any(|b| !b.is_empty() && p.contains(b.as_str()))
                    })
                })
                .collect(),
        );
        known.push((breakers.to_vec(), ids.clone()));
        ids
    }

    /// The grammar compiler over this model's vocabulary (built on first
    /// use: a pass over the vocabulary).
    pub fn grammars(&self) -> Result<&Grammars, EngineError> {
        self.grammars
            .get_or_init(|| {
                let eos = self.eos_ids.first().copied().unwrap_or(0);
                Grammars::new(self.tokenizer.token_texts(), eos).map_err(|e| e.to_string())
            })
            .as_ref()
            .map_err(|e| EngineError::Grammar(e.clone()))
    }

    /// Compiles `constraint` for one generation on this model.
    pub fn guide(&self, constraint: &lw_core::Constraint) -> Result<Guide, EngineError> {
        self.grammars()?.guide(constraint)
    }

    /// Renders a conversation with the model's chat template (and the
    /// thinking switch it was loaded with).
    pub fn chat_prompt(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, EngineError> {
        self.chat_prompt_with(messages, &self.template_inputs(add_generation_prompt, None))
    }

    /// Renders a conversation with the model's chat template and `inputs`.
    pub fn chat_prompt_with(
        &self,
        messages: &[Message],
        inputs: &TemplateInputs,
    ) -> Result<String, EngineError> {
        let tmpl = self
            .tokenizer
            .chat_template()
            .ok_or_else(|| EngineError::NoChatTemplate(self.dir.join("tokenizer_config.json")))?;
        tmpl.render_with(messages, inputs)
    }

    /// The template's inputs: the generation prompt, and `enable_thinking`
    /// from `thinking` or else the model's setting.
    pub fn template_inputs(
        &self,
        add_generation_prompt: bool,
        thinking: Option<bool>,
    ) -> TemplateInputs {
        let inputs = TemplateInputs::new(add_generation_prompt);
        match thinking.or(self.thinking) {
            Some(yes) => inputs.enable_thinking(yes),
            None => inputs,
        }
    }

    /// Token ids of a raw prompt (with the tokenizer's BOS, if it adds one).
    pub fn encode_raw(&self, text: &str) -> Result<Vec<u32>, EngineError> {
        self.tokenizer.encode(text, true)
    }

    /// Token ids of a rendered chat prompt (its special tokens are in the text).
    pub fn encode_chat(&self, messages: &[Message]) -> Result<Vec<u32>, EngineError> {
        self.encode_chat_with(messages, &self.template_inputs(true, None))
    }

    /// [`Model::encode_chat`] with the template's `inputs`.
    pub fn encode_chat_with(
        &self,
        messages: &[Message],
        inputs: &TemplateInputs,
    ) -> Result<Vec<u32>, EngineError> {
        let text = self.chat_prompt_with(messages, inputs)?;
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
        ChatFormat::Auto
            if tokenizer.chat_template().is_none()
                && matches!(cfg.model_type.as_str(), "glm" | "glm4") =>
        {
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
    if matches!(cfg.model_type.as_str(), "glm" | "glm4") {
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

/// The rotary scaling fitted to the context a model is loaded with (its
/// own, or a smaller `--ctx-size`).
fn fit_context(model: &mut Llama, limit: Option<usize>) {
    let own = model.context_length();
    model.fit_context(limit.map_or(own, |n| n.clamp(1, own)));
}
