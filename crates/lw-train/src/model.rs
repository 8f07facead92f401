//! The Llama family (Llama, Mistral, Qwen2) as a differentiable graph on
//! candle, with the tensor names of a Hugging Face checkpoint, so what it saves
//! the engine loads.
//!
//! Only ops with a backward pass are used: rmsnorm, rope, softmax and the
//! log-softmax of the loss are written out of elementary ops, because candle's
//! fused versions return no gradient. Packed rows are supported: every token
//! carries its position (reset per sequence) and a segment id, and attention
//! is causal within a segment only (block-diagonal).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use lw_model::config::{rope_inv_freq, ModelConfig};
use lw_model::Weights;
use serde_json::Value;

use crate::attention::{Dims, FlashAttention, Rope};
use crate::error::{file_error, TrainError};

/// A small deterministic generator (lw-core's SplitMix64, the sampler's): initial
/// weights, data order and dropout masks are functions of the seed alone,
/// which is what makes a resumed run repeat an uninterrupted one.
#[derive(Debug, Clone)]
pub struct Rng(lw_core::Rng);

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(lw_core::Rng::new(seed))
    }

    /// A generator for one purpose at one step, independent of the others.
    pub fn derive(seed: u64, stream: u64, index: u64) -> Self {
        let start = seed ^ stream.wrapping_mul(GOLDEN);
        let mixed = lw_core::Rng::new(start).next_u64();
        Rng::new(start.wrapping_add(GOLDEN) ^ mixed ^ index.wrapping_mul(0xBF58_476D_1CE4_E5B9))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in 0..n.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n.max(1) as u64) as usize
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f32 {
        let u1 = ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        let u2 = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    pub fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i + 1);
            items.swap(i, j);
        }
    }
}

/// Low-rank adapters on chosen projections (the PEFT LoRA recipe):
/// `y = W x + (alpha / rank) · B A dropout(x)`, A random, B zero at start.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    /// Module names, e.g. `q_proj`, `v_proj`, `down_proj`.
    pub targets: Vec<String>,
}

impl LoraSpec {
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// The projections a LoRA target may name.
pub const LORA_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// One packed micro-batch: `rows` rows of `len` tokens, flattened row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub rows: usize,
    pub len: usize,
    pub inputs: Vec<u32>,
    /// The token each position should predict (any id where `weights` is 0).
    pub targets: Vec<u32>,
    /// Each position's share of the loss; the loss is `Σ weight · nll`.
    pub weights: Vec<f32>,
    /// Rotary position of each token (restarts at 0 for each packed sequence).
    pub positions: Vec<u32>,
    /// Tokens attend to earlier tokens of the same segment only.
    pub segments: Vec<u32>,
}

impl Batch {
    /// Supervised positions (weight > 0).
    pub fn supervised(&self) -> usize {
        self.weights.iter().filter(|w| **w > 0.0).count()
    }
}

/// Positions per slice of the output head in [`TrainModel::checkpointed_gradients`]:
/// its logits are `HEAD_ROWS × vocab` floats (200 MB for a 49k vocabulary).
const HEAD_ROWS: usize = 1024;

/// Each trainable tensor's name and gradient (`None` where none reached it).
pub type TensorGradients = Vec<(String, Option<Tensor>)>;

/// A parameter: frozen ones are plain tensors, trainable ones variables.
struct Param {
    value: Tensor,
    var: Option<Var>,
}

pub struct TrainModel {
    pub cfg: ModelConfig,
    /// The checkpoint's `config.json`, written back unchanged with checkpoints.
    pub config_json: Value,
    names: Vec<String>,
    params: HashMap<String, Param>,
    lora: Option<LoraSpec>,
    /// Module path (`model.layers.0.self_attn.q_proj`) → (A, B).
    adapters: Vec<(String, Var, Var)>,
    inv_freq: Vec<f32>,
    device: Device,
    /// Recompute activations in the backward pass ([`TrainModel::checkpointed_gradients`]).
    checkpointing: bool,
}

/// Every tensor of a checkpoint with this config, in a fixed order, with its shape.
pub fn param_shapes(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let (h, i, v) = (cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size);
    let q = cfg.num_heads * cfg.head_dim;
    let kv = cfg.num_kv_heads * cfg.head_dim;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![v, h])];
    for l in 0..cfg.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        for (m, rows) in [("q_proj", q), ("k_proj", kv), ("v_proj", kv)] {
            out.push((format!("{p}.self_attn.{m}.weight"), vec![rows, h]));
            if cfg.qkv_bias {
                out.push((format!("{p}.self_attn.{m}.bias"), vec![rows]));
            }
        }
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if cfg.o_bias {
            out.push((format!("{p}.self_attn.o_proj.bias"), vec![h]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        for (m, shape) in [
            ("gate_proj", vec![i, h]),
            ("up_proj", vec![i, h]),
            ("down_proj", vec![h, i]),
        ] {
            let rows = shape[0];
            out.push((format!("{p}.mlp.{m}.weight"), shape));
            if cfg.mlp_bias {
                out.push((format!("{p}.mlp.{m}.bias"), vec![rows]));
            }
        }
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![v, h]));
    }
    out
}

/// The inverse of [`lw_model::gguf_model::halves_to_pairs`]: rows of each
/// head from adjacent rotary pairs (`2i`, `2i + 1`) back to halves (`i`,
/// `i + d/2`). `cols` values per row.
pub fn pairs_to_halves(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let halves = h * head_dim + j * half + i;
                let pairs = h * head_dim + 2 * i + j;
                out[halves * cols..(halves + 1) * cols]
                    .copy_from_slice(&values[pairs * cols..(pairs + 1) * cols]);
            }
        }
    }
    out
}

/// A `transformers` `config.json` for a trainable config (the Llama family
/// and Qwen2), as written with checkpoints of a model loaded from GGUF.
pub fn hf_config(cfg: &ModelConfig) -> Value {
    let architecture = match cfg.model_type.as_str() {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let mut v = serde_json::json!({
        "architectures": [architecture],
        "model_type": cfg.model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "attention_bias": cfg.qkv_bias,
        "mlp_bias": cfg.mlp_bias,
        "torch_dtype": "float32",
    });
    if let Some(b) = cfg.bos_token_id {
        v["bos_token_id"] = b.into();
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [one] => v["eos_token_id"] = (*one).into(),
        many => v["eos_token_id"] = many.to_vec().into(),
    }
    v
}

fn check_trainable(cfg: &ModelConfig) -> Result<(), TrainError> {
    if cfg.sliding_window.iter().any(|w| w.is_some()) {
        return Err(TrainError::Setting(
            "training with sliding-window attention is not supported".into(),
        ));
    }
    let unsupported = [
        (cfg.qk_norm, "per-head query and key norms"),
        (
            !matches!(cfg.model_type.as_str(), "llama" | "mistral" | "qwen2"),
            "outside the Llama family and Qwen2",
        ),
        (
            cfg.rotary_dim != cfg.head_dim,
            "rotary embeddings on part of each head",
        ),
        (
            cfg.attention_scale.is_some()
                || cfg.attn_softcap.is_some()
                || cfg.final_softcap.is_some(),
            "its own attention scale or soft-capping",
        ),
        (cfg.moe.is_some(), "a mixture of experts"),
        (cfg.post_norms, "norms after attention and MLP"),
        (
            cfg.embed_scale || cfg.norm_offset != 0.0,
            "Gemma's scalings",
        ),
    ];
    if let Some((_, what)) = unsupported.iter().find(|(has, _)| *has) {
        return Err(TrainError::Setting(format!(
            "training a {} model ({what}) is not supported yet",
            cfg.model_type
        )));
    }
    Ok(())
}

impl TrainModel {
    /// A new model: matrices and embeddings drawn from N(0, 0.02²) (the
    /// Hugging Face `initializer_range`), biases zero, norm weights one.
    pub fn init(cfg: ModelConfig, config_json: Value, seed: u64) -> Result<Self, TrainError> {
        check_trainable(&cfg)?;
        let mut rng = Rng::derive(seed, 1, 0);
        let mut tensors = HashMap::new();
        for (name, shape) in param_shapes(&cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> =
                if name.ends_with("layernorm.weight") || name == "model.norm.weight" {
                    vec![1.0; n]
                } else if name.ends_with(".bias") {
                    vec![0.0; n]
                } else {
                    (0..n).map(|_| 0.02 * rng.normal()).collect()
                };
            tensors.insert(name, Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        Self::from_tensors(cfg, config_json, tensors, None, seed)
    }

    /// Loads an HF checkpoint directory (weights converted to f32).
    pub fn load(dir: &Path, lora: Option<LoraSpec>, seed: u64) -> Result<Self, TrainError> {
        let config_path = dir.join("config.json");
        let text =
            std::fs::read_to_string(&config_path).map_err(|e| file_error(&config_path, e))?;
        let config_json: Value =
            serde_json::from_str(&text).map_err(|e| file_error(&config_path, e))?;
        let cfg = ModelConfig::from_file(&config_path)?;
        check_trainable(&cfg)?;
        let weights = Weights::from_dir(dir)?;
        let mut tensors = HashMap::new();
        for (name, shape) in param_shapes(&cfg) {
            tensors.insert(name.clone(), weights.get(&name, &shape, DType::F32)?);
        }
        Self::from_tensors(cfg, config_json, tensors, lora, seed)
    }

    /// Loads a GGUF file (any tensor type the engine reads, dequantized to
    /// f32). llama.cpp stores the Llama architecture's q and k rows in
    /// adjacent rotary pairs; they are put back in the halves layout that
    /// training (and `transformers`) uses, so an adapter trained here applies
    /// to the file as to the original checkpoint.
    pub fn load_gguf(path: &Path, lora: Option<LoraSpec>, seed: u64) -> Result<Self, TrainError> {
        let file = lw_model::GgufFile::open(path)?;
        let mut cfg = lw_model::gguf_model::config(&file)?;
        let pairs = cfg.rope_interleaved;
        cfg.rope_interleaved = false;
        check_trainable(&cfg)?;
        let mut tensors = HashMap::new();
        for (name, shape) in param_shapes(&cfg) {
            let gguf = lw_model::loader::gguf_name(&name).unwrap_or_else(|| name.clone());
            let info = file.tensor(&gguf).ok_or_else(|| {
                TrainError::Setting(format!(
                    "{}: tensor \"{gguf}\" ({name}) is missing",
                    path.display()
                ))
            })?;
            if info.shape != shape {
                return Err(TrainError::Setting(format!(
                    "{}: tensor \"{gguf}\" has shape {:?}, expected {shape:?}",
                    path.display(),
                    info.shape
                )));
            }
            let cols = *shape.last().unwrap_or(&1);
            let rows: usize = shape.iter().product::<usize>() / cols.max(1);
            let bytes = file.data(info);
            let bytes = bytes.as_slice();
            let row_bytes = info.qtype.row_bytes(cols);
            let mut values = vec![0f32; rows * cols];
            for (r, out) in values.chunks_mut(cols).enumerate() {
                let row = &bytes[r * row_bytes..(r + 1) * row_bytes];
                lw_model::quant::dequantize_row(info.qtype, row, out);
            }
            if pairs {
                let heads = if name.ends_with("self_attn.q_proj.weight")
                    || name.ends_with("self_attn.q_proj.bias")
                {
                    Some(cfg.num_heads)
                } else if name.ends_with("self_attn.k_proj.weight")
                    || name.ends_with("self_attn.k_proj.bias")
                {
                    Some(cfg.num_kv_heads)
                } else {
                    None
                };
                if let Some(heads) = heads {
                    let per_row = values.len() / (heads * cfg.head_dim);
                    values = pairs_to_halves(&values, heads, cfg.head_dim, per_row);
                }
            }
            tensors.insert(name, Tensor::from_vec(values, shape, &Device::Cpu)?);
        }
        let config_json = hf_config(&cfg);
        Self::from_tensors(cfg, config_json, tensors, lora, seed)
    }

    /// Builds a model from named f32 tensors. With `lora`, the tensors are
    /// frozen and only new adapters train.
    pub fn from_tensors(
        cfg: ModelConfig,
        config_json: Value,
        mut tensors: HashMap<String, Tensor>,
        lora: Option<LoraSpec>,
        seed: u64,
    ) -> Result<Self, TrainError> {
        let mut names = Vec::new();
        let mut params = HashMap::new();
        for (name, shape) in param_shapes(&cfg) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| TrainError::Setting(format!("tensor \"{name}\" is missing")))?;
            if t.dims() != shape.as_slice() {
                return Err(TrainError::Setting(format!(
                    "tensor \"{name}\" has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let t = t.to_dtype(DType::F32)?;
            let param = if lora.is_some() {
                Param {
                    value: t,
                    var: None,
                }
            } else {
                let var = Var::from_tensor(&t)?;
                Param {
                    value: var.as_tensor().clone(),
                    var: Some(var),
                }
            };
            names.push(name.clone());
            params.insert(name, param);
        }
        let mut adapters = Vec::new();
        if let Some(spec) = &lora {
            if spec.rank == 0 {
                return Err(TrainError::Setting("the LoRA rank must be positive".into()));
            }
            if !(0.0..1.0).contains(&spec.dropout) {
                return Err(TrainError::Setting(format!(
                    "LoRA dropout {} is outside [0, 1)",
                    spec.dropout
                )));
            }
            for t in &spec.targets {
                if !LORA_MODULES.contains(&t.as_str()) {
                    return Err(TrainError::Setting(format!(
                        "unknown LoRA target module \"{t}\" (known: {})",
                        LORA_MODULES.join(", ")
                    )));
                }
            }
            let mut rng = Rng::derive(seed, 2, 0);
            for name in &names {
                let Some(module) = name.strip_suffix(".weight") else {
                    continue;
                };
                let short = module.rsplit('.').next().unwrap_or("");
                if !spec.targets.iter().any(|t| t == short) {
                    continue;
                }
                let dims = params[name].value.dims().to_vec();
                let (out_f, in_f) = (dims[0], dims[1]);
                // PEFT's default: A ~ kaiming-uniform(a = √5) = U(±1/√in), B = 0.
                let bound = 1.0 / (in_f as f32).sqrt();
                let a: Vec<f32> = (0..spec.rank * in_f)
                    .map(|_| (2.0 * rng.uniform() - 1.0) * bound)
                    .collect();
                let a = Var::from_vec(a, (spec.rank, in_f), &Device::Cpu)?;
                let b = Var::zeros((out_f, spec.rank), DType::F32, &Device::Cpu)?;
                adapters.push((module.to_string(), a, b));
            }
            if adapters.is_empty() {
                return Err(TrainError::Setting(
                    "no LoRA target module matched the model".into(),
                ));
            }
        }
        let inv_freq = rope_inv_freq(&cfg);
        Ok(TrainModel {
            cfg,
            config_json,
            names,
            params,
            lora,
            adapters,
            inv_freq,
            device: Device::Cpu,
            checkpointing: false,
        })
    }

    /// Activation checkpointing for [`crate::gradients`]: off by default.
    pub fn set_checkpointing(&mut self, on: bool) {
        self.checkpointing = on;
    }

    pub fn checkpointing(&self) -> bool {
        self.checkpointing
    }

    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// The trainable tensors with their checkpoint names: every parameter in
    /// full training; the adapters (PEFT names) with LoRA.
    pub fn trainable(&self) -> Vec<(String, Var)> {
        if self.lora.is_some() {
            let mut out = Vec::new();
            for (module, a, b) in &self.adapters {
                out.push((
                    format!("base_model.model.{module}.lora_A.weight"),
                    a.clone(),
                ));
                out.push((
                    format!("base_model.model.{module}.lora_B.weight"),
                    b.clone(),
                ));
            }
            out
        } else {
            self.names
                .iter()
                .filter_map(|n| Some((n.clone(), self.params[n].var.clone()?)))
                .collect()
        }
    }

    /// Sets the trainable tensors from a safetensors file with their names
    /// (a checkpoint's `model.safetensors`, or a PEFT `adapter_model.safetensors`).
    pub fn load_trainable(&self, path: &Path) -> Result<(), TrainError> {
        let stored =
            candle_core::safetensors::load(path, &self.device).map_err(|e| file_error(path, e))?;
        for (name, var) in self.trainable() {
            let t = stored.get(&name).ok_or_else(|| TrainError::File {
                path: path.to_path_buf(),
                reason: format!("tensor \"{name}\" is missing"),
            })?;
            if t.dims() != var.dims() {
                return Err(TrainError::File {
                    path: path.to_path_buf(),
                    reason: format!(
                        "tensor \"{name}\" has shape {:?}, the model's is {:?}",
                        t.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// Number of trainable values.
    pub fn trainable_count(&self) -> usize {
        self.trainable().iter().map(|(_, v)| v.elem_count()).sum()
    }

    /// The base weights by checkpoint name.
    pub fn tensors(&self) -> Vec<(String, Tensor)> {
        self.names
            .iter()
            .map(|n| (n.clone(), self.params[n].value.clone()))
            .collect()
    }

    fn get(&self, name: &str) -> &Tensor {
        &self.params[name].value
    }

    fn linear(
        &self,
        x: &Tensor,
        module: &str,
        rng: &mut Option<Rng>,
    ) -> Result<Tensor, TrainError> {
        let w = self.get(&format!("{module}.weight"));
        let mut y = crate::gemm::project(x, w)?;
        if let Some(b) = self.params.get(&format!("{module}.bias")) {
            y = y.broadcast_add(&b.value)?;
        }
        if let Some((_, a, b)) = self.adapters.iter().find(|(m, _, _)| m == module) {
            let spec = self.lora.as_ref().expect("adapters imply a LoRA spec");
            let xd = match rng {
                Some(rng) if spec.dropout > 0.0 => {
                    let keep = 1.0 / (1.0 - spec.dropout);
                    let mask: Vec<f32> = (0..x.elem_count())
                        .map(|_| {
                            if rng.uniform() < spec.dropout {
                                0.0
                            } else {
                                keep
                            }
                        })
                        .collect();
                    (x * Tensor::from_vec(mask, x.dims(), &self.device)?)?
                }
                _ => x.clone(),
            };
            let low =
                crate::gemm::project(&crate::gemm::project(&xd, a.as_tensor())?, b.as_tensor())?;
            y = (y + (low * spec.scale() as f64)?)?;
        }
        Ok(y)
    }

    fn rms_norm(&self, x: &Tensor, weight: &str) -> Result<Tensor, TrainError> {
        let op = crate::ops::RmsNorm {
            eps: self.cfg.rms_norm_eps as f32,
        };
        Ok(x.contiguous()?
            .apply_op2(&self.get(weight).contiguous()?, op)?)
    }

    /// Logits for every position, `[rows·len, vocab]`. `dropout` is the
    /// generator for LoRA dropout (`None`: evaluation, no dropout).
    pub fn forward(&self, batch: &Batch, dropout: Option<Rng>) -> Result<Tensor, TrainError> {
        let mut rng = dropout;
        let attention = self.attention(batch)?;
        let mut x = self.embed(batch)?;
        for layer in 0..self.cfg.num_layers {
            x = self.layer(layer, &x, &attention, &mut rng)?;
        }
        self.head(&x)
    }

    /// `Σ weight · (−log p(target))` over the batch, as a scalar tensor.
    pub fn loss(&self, batch: &Batch, dropout: Option<Rng>) -> Result<Tensor, TrainError> {
        let logits = self.forward(batch, dropout)?;
        weighted_nll(&logits, batch)
    }

    /// The loss without a graph for a backward pass: each layer's output is
    /// detached, so only one layer's activations are alive at a time.
    pub fn loss_value(&self, batch: &Batch) -> Result<f32, TrainError> {
        let attention = self.attention(batch)?;
        let mut x = self.embed(batch)?.detach();
        for layer in 0..self.cfg.num_layers {
            x = self.layer(layer, &x, &attention, &mut None)?.detach();
        }
        let logits = self.head(&x)?.detach();
        Ok(weighted_nll(&logits, batch)?.to_scalar::<f32>()?)
    }

    /// The loss and every trainable tensor's gradient, keeping only each
    /// layer's input from the forward pass and recomputing the layer's
    /// activations when the backward pass reaches it (activation
    /// checkpointing): memory for the activations of one layer instead of
    /// all, for one more forward pass of the layers. The output head runs
    /// on [`HEAD_ROWS`] positions at a time. Each layer's dropout
    /// masks are drawn again from the generator state it started from, so
    /// the gradients are those of [`TrainModel::loss`]'s backward pass, up
    /// to the order of floating-point sums.
    pub fn checkpointed_gradients(
        &self,
        batch: &Batch,
        dropout: Option<Rng>,
    ) -> Result<(f32, TensorGradients), TrainError> {
        let trainable = self.trainable();
        let mut sums: Vec<Option<Tensor>> = vec![None; trainable.len()];
        let mut collect = |grads: &candle_core::backprop::GradStore| -> Result<(), TrainError> {
            for ((_, var), sum) in trainable.iter().zip(sums.iter_mut()) {
                if let Some(g) = grads.get(var.as_tensor()) {
                    *sum = Some(match sum.take() {
                        Some(s) => (s + g)?,
                        None => g.clone(),
                    });
                }
            }
            Ok(())
        };
        let layers = self.cfg.num_layers;
        let attention = self.attention(batch)?;
        let mut rng = dropout;
        let mut x = self.embed(batch)?.detach();
        let mut inputs = Vec::with_capacity(layers);
        for layer in 0..layers {
            inputs.push((x.clone(), rng.clone()));
            x = self.layer(layer, &x, &attention, &mut rng)?.detach();
        }
        // The head in slices of rows: logits and their gradient for
        // HEAD_ROWS positions at a time instead of the whole row's.
        let n = batch.rows * batch.len;
        let mut value = 0.0f64;
        let mut pieces = Vec::with_capacity(n.div_ceil(HEAD_ROWS));
        for start in (0..n).step_by(HEAD_ROWS) {
            let end = (start + HEAD_ROWS).min(n);
            let rows = Var::from_tensor(&x.narrow(0, start, end - start)?)?;
            let loss = rows_nll(
                &self.head(rows.as_tensor())?,
                &batch.targets[start..end],
                &batch.weights[start..end],
            )?;
            value += loss.to_scalar::<f32>()? as f64;
            let grads = loss.backward()?;
            drop(loss);
            collect(&grads)?;
            pieces.push(input_gradient(&grads, &rows)?);
        }
        drop(x);
        let mut upstream = Tensor::cat(&pieces, 0)?;
        drop(pieces);
        let value = value as f32;
        for layer in (0..layers).rev() {
            let (input, mut rng) = inputs.pop().expect("one input per layer");
            let input = Var::from_tensor(&input)?;
            let y = self.layer(layer, input.as_tensor(), &attention, &mut rng)?;
            // d(Σ y·g)/dθ = gᵀ·∂y/∂θ: the chain rule from this layer down.
            let grads = (y * &upstream)?.sum_all()?.backward()?;
            collect(&grads)?;
            upstream = input_gradient(&grads, &input)?;
        }
        if self.params["model.embed_tokens.weight"].var.is_some() {
            let grads = (self.embed(batch)? * &upstream)?.sum_all()?.backward()?;
            collect(&grads)?;
        }
        let out = trainable
            .into_iter()
            .zip(sums)
            .map(|((name, _), g)| (name, g))
            .collect();
        Ok((value, out))
    }

    /// Block-diagonal causal attention for this batch in tiles, rotary
    /// embeddings applied inside: no [len × len] matrix, no transposed copies.
    fn attention(&self, batch: &Batch) -> Result<FlashAttention, TrainError> {
        let (b, l) = (batch.rows, batch.len);
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim);
        if let Some(&bad) = batch.inputs.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(TrainError::Setting(format!(
                "token id {bad} is outside the model's vocabulary of {}",
                cfg.vocab_size
            )));
        }
        // Rotary tables for these positions, one cos/sin per frequency.
        let half = hd / 2;
        let n = b * l;
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for &p in &batch.positions {
            for f in &self.inv_freq[..half] {
                let a = p as f32 * f;
                cos.push(a.cos());
                sin.push(a.sin());
            }
        }
        FlashAttention::new(
            Dims {
                rows: b,
                heads: nh,
                kv_heads: nkv,
                len: l,
                head_dim: hd,
            },
            &batch.segments,
            (1.0 / (hd as f64).sqrt()) as f32,
        )?
        .with_rope(Rope { cos, sin })
    }

    /// The input embeddings of the batch's tokens, `[rows·len, hidden]`.
    fn embed(&self, batch: &Batch) -> Result<Tensor, TrainError> {
        let ids = Tensor::from_slice(&batch.inputs, batch.rows * batch.len, &self.device)?;
        Ok(self
            .get("model.embed_tokens.weight")
            .index_select(&ids, 0)?)
    }

    /// One decoder layer: attention and MLP, each a residual branch.
    fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        attention: &FlashAttention,
        rng: &mut Option<Rng>,
    ) -> Result<Tensor, TrainError> {
        let p = format!("model.layers.{layer}");
        let h = self.rms_norm(x, &format!("{p}.input_layernorm.weight"))?;
        let q = self.linear(&h, &format!("{p}.self_attn.q_proj"), rng)?;
        let k = self.linear(&h, &format!("{p}.self_attn.k_proj"), rng)?;
        let v = self.linear(&h, &format!("{p}.self_attn.v_proj"), rng)?;
        let attn = attention.for_layer().apply(&q, &k, &v)?;
        let o = self.linear(&attn, &format!("{p}.self_attn.o_proj"), rng)?;
        let x = (x + o)?;
        let h = self.rms_norm(&x, &format!("{p}.post_attention_layernorm.weight"))?;
        let gate = self.linear(&h, &format!("{p}.mlp.gate_proj"), rng)?;
        let up = self.linear(&h, &format!("{p}.mlp.up_proj"), rng)?;
        let act = gate
            .contiguous()?
            .apply_op2(&up.contiguous()?, crate::ops::SiluMul)?;
        let down = self.linear(&act, &format!("{p}.mlp.down_proj"), rng)?;
        Ok((x + down)?)
    }

    /// The final norm and the output projection: logits `[rows·len, vocab]`.
    fn head(&self, x: &Tensor) -> Result<Tensor, TrainError> {
        let x = self.rms_norm(x, "model.norm.weight")?;
        let head = if self.cfg.tie_word_embeddings {
            "model.embed_tokens.weight"
        } else {
            "lm_head.weight"
        };
        Ok(crate::gemm::project(&x, self.get(head))?)
    }
}

/// The gradient a backward pass left on a layer's input.
fn input_gradient(
    grads: &candle_core::backprop::GradStore,
    input: &Var,
) -> Result<Tensor, TrainError> {
    grads
        .get(input.as_tensor())
        .cloned()
        .ok_or_else(|| TrainError::Setting("no gradient reached a layer's input".into()))
}

/// The weighted negative log-likelihood of `targets` under `logits` `[n, vocab]`.
pub fn weighted_nll(logits: &Tensor, batch: &Batch) -> Result<Tensor, TrainError> {
    rows_nll(logits, &batch.targets, &batch.weights)
}

/// [`weighted_nll`] for logits of some rows, with those rows' targets and weights.
fn rows_nll(logits: &Tensor, targets: &[u32], weights: &[f32]) -> Result<Tensor, TrainError> {
    let op = crate::ops::WeightedNll {
        targets: targets.to_vec(),
        weights: weights.to_vec(),
    };
    Ok(logits.contiguous()?.apply_op1(op)?.sum_all()?)
}
