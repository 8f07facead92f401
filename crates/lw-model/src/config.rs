//! `config.json` of a Hugging Face checkpoint, read into the flags of the one
//! Llama-family implementation (Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5, Qwen3, and
//! GLM-4 in both its `transformers` layout and the original ChatGLM one).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::error::ModelError;

/// The families this crate runs: `config.json`'s `model_type`, and the
/// architecture a GGUF file names it by (llama.cpp's names; Mistral and
/// Mixtral are `llama`, the latter with experts), where GGUF files of it
/// are read. Both error messages for an unknown family list this table.
pub const FAMILIES: &[(&str, Option<&str>)] = &[
    ("llama", Some("llama")),
    ("mistral", Some("llama")),
    ("mixtral", Some("llama")),
    ("phi3", Some("phi3")),
    ("qwen2", Some("qwen2")),
    ("qwen3", Some("qwen3")),
    ("qwen3_moe", Some("qwen3moe")),
    ("glm", Some("chatglm")),
    ("glm4", Some("glm4")),
    ("chatglm", Some("chatglm")),
    ("gemma2", Some("gemma2")),
    ("gemma3_text", Some("gemma3")),
];

/// The `model_type`s of [`FAMILIES`].
pub fn supported_model_types() -> Vec<&'static str> {
    FAMILIES.iter().map(|&(t, _)| t).collect()
}

/// The GGUF architectures of [`FAMILIES`], each once.
pub fn supported_architectures() -> Vec<&'static str> {
    let mut archs: Vec<&str> = Vec::new();
    for &(_, arch) in FAMILIES {
        if let Some(a) = arch.filter(|a| !archs.contains(a)) {
            archs.push(a);
        }
    }
    archs
}

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightLayout {
    /// `transformers` names (`model.layers.N.self_attn.q_proj.weight`, …).
    Hf,
    /// The original ChatGLM names (`transformer.encoder.layers.N.self_attention
    /// .query_key_value.weight`, …), mapped to `transformers` names at load.
    ChatGlm,
    /// Gemma's four norms per layer, known at load by the names of the
    /// Llama layout's slots ([`gemma_to_slots`]).
    Gemma,
}

/// How rotary frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Llama 3.1's piecewise rescaling: high frequencies kept, low ones divided
    /// by `factor`, a smooth blend in between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// Positions divided by `factor` (all frequencies divided by it).
    Linear { factor: f32 },
    /// Each frequency divided by its own factor (llama.cpp's `rope_freqs`
    /// tensor, which is how GGUF files carry Llama 3.1's rescaling).
    Factors(Vec<f32>),
    /// Phi-3's LongRoPE (`longrope`, once `su`): each frequency divided by
    /// its own factor, from `long` where the context is longer than the
    /// `original` one it was pretrained with (`use_long`), from `short`
    /// otherwise; cos and sin are multiplied by `attention_factor`.
    LongRope {
        short: Vec<f32>,
        long: Vec<f32>,
        original: usize,
        attention_factor: f32,
        use_long: bool,
    },
}

impl RopeScaling {
    /// The factor cos and sin are multiplied by (1 but for LongRoPE).
    pub fn attention_factor(&self) -> f32 {
        match self {
            RopeScaling::LongRope {
                attention_factor, ..
            } => *attention_factor,
            _ => 1.0,
        }
    }
}

/// LongRoPE's default scale of cos and sin for a context stretched
/// `factor` times past the pretrained `original` one: √(1 + ln s / ln n₀),
/// or 1 where it is not stretched.
pub fn longrope_attention_factor(factor: f64, original: usize) -> f32 {
    if factor <= 1.0 {
        1.0
    } else {
        (1.0 + factor.ln() / (original as f64).ln()).sqrt() as f32
    }
}

/// Picks LongRoPE's long or short factors for a context of `positions`
/// (the long ones beyond the pretrained context, as llama.cpp does for its
/// context size); other scalings are left as they are.
pub fn fit_rope_to_context(scaling: &mut Option<RopeScaling>, positions: usize) {
    if let Some(RopeScaling::LongRope {
        original, use_long, ..
    }) = scaling
    {
        *use_long = positions > *original;
    }
}

/// A mixture of experts in place of the MLP: a router scores every expert
/// for each token, the `active` best run (each an MLP of `intermediate`
/// hidden units), and their outputs are summed weighted by the router's
/// softmax (renormalised over the chosen ones when `normalize`).
#[derive(Debug, Clone, PartialEq)]
pub struct MoeConfig {
    pub experts: usize,
    pub active: usize,
    pub intermediate: usize,
    pub normalize: bool,
    /// Which layers have experts (the others keep a dense MLP).
    pub layers: Vec<bool>,
}

/// Everything the forward pass needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Bias on the q, k and v projections (Qwen2; Llama's `attention_bias`).
    pub qkv_bias: bool,
    /// Bias on the output projection (Llama's `attention_bias` only).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Attention window per layer (`None` = full causal attention).
    pub sliding_window: Vec<Option<usize>>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype`), if any.
    pub torch_dtype: Option<String>,
    /// Rotary pairs are adjacent elements (`2i`, `2i + 1`), as in llama.cpp's
    /// Llama GGUF files and GLM-4, instead of the two halves of a head.
    pub rope_interleaved: bool,
    /// Leading dimensions of each head that are rotated (GLM-4 rotates half);
    /// the rest pass through unchanged.
    pub rotary_dim: usize,
    /// Each query and key head is RMS-normalised (its own weights, one
    /// vector for all query heads and one for all key heads) before the
    /// rotary embedding (Qwen3).
    pub qk_norm: bool,
    /// Experts in place of the MLP (Qwen3-MoE, Mixtral).
    pub moe: Option<MoeConfig>,
    /// RMS norms on the attention's and the MLP's outputs before each
    /// residual add (GLM-4-0414, Gemma 3).
    pub post_norms: bool,
    /// Embeddings multiplied by √hidden (Gemma).
    pub embed_scale: bool,
    /// Added to every norm's weights: Gemma's norms scale by `1 + w`.
    pub norm_offset: f32,
    /// The feed-forward gate's function.
    pub gate: crate::activation::Gate,
    /// Attention scores scaled by this instead of `1/√head_dim` (Gemma's
    /// `query_pre_attn_scalar^-½`).
    pub attention_scale: Option<f32>,
    /// Rotary base of the sliding-window layers, when it differs from the
    /// full layers' `rope_theta` (Gemma 3).
    pub local_rope_theta: Option<f32>,
    /// Attention scores soft-capped to `(-c, c)` as `c · tanh(s / c)`
    /// before the softmax (Gemma 2's `attn_logit_softcapping`).
    pub attn_softcap: Option<f32>,
    /// Logits soft-capped the same way (Gemma 2's
    /// `final_logit_softcapping`).
    pub final_softcap: Option<f32>,
    /// Tensor names of the checkpoint.
    pub layout: WeightLayout,
}

#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    rms_norm_eps: Option<f64>,
    rope_theta: Option<f64>,
    rope_scaling: Option<Value>,
    /// transformers ≥ 5 spelling: theta and scaling in one object.
    rope_parameters: Option<Value>,
    max_position_embeddings: Option<usize>,
    original_max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    mlp_bias: Option<bool>,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    max_window_layers: Option<usize>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
    dtype: Option<String>,
    partial_rotary_factor: Option<f64>,
    /// Gemma 3's attention scale, layer kinds and activation.
    query_pre_attn_scalar: Option<f64>,
    layer_types: Option<Vec<String>>,
    sliding_window_pattern: Option<usize>,
    rope_local_base_freq: Option<f64>,
    hidden_activation: Option<String>,
    final_logit_softcapping: Option<f64>,
    attn_logit_softcapping: Option<f64>,
    /// Qwen3-MoE's experts.
    num_experts: Option<usize>,
    /// Mixtral's experts.
    num_local_experts: Option<usize>,
    num_experts_per_tok: Option<usize>,
    moe_intermediate_size: Option<usize>,
    norm_topk_prob: Option<bool>,
    decoder_sparse_step: Option<usize>,
    mlp_only_layers: Option<Vec<usize>>,
}

/// The original ChatGLM `config.json` (LongWriter-glm4-9b, glm-4-9b-chat).
#[derive(Deserialize)]
struct ChatGlmConfig {
    padded_vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    ffn_hidden_size: Option<usize>,
    num_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    kv_channels: Option<usize>,
    multi_query_attention: Option<bool>,
    multi_query_group_num: Option<usize>,
    layernorm_epsilon: Option<f64>,
    seq_length: Option<usize>,
    rope_ratio: Option<f64>,
    add_qkv_bias: Option<bool>,
    add_bias_linear: Option<bool>,
    rmsnorm: Option<bool>,
    apply_residual_connection_post_layernorm: Option<bool>,
    post_layer_norm: Option<bool>,
    original_rope: Option<bool>,
    tie_word_embeddings: Option<bool>,
    bos_token_id: Option<Value>,
    eos_token_id: Option<Value>,
    torch_dtype: Option<String>,
}

fn need(v: Option<usize>, name: &str) -> Result<usize, String> {
    match v {
        Some(0) => Err(format!("field `{name}` must be positive")),
        Some(v) => Ok(v),
        None => Err(format!("missing field `{name}`")),
    }
}

impl ModelConfig {
    /// Reads and checks `config.json`.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        Self::from_json(&text).map_err(|reason| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        })
    }

    /// Parses the JSON text of a `config.json`; the error says which field is wrong.
    pub fn from_json(text: &str) -> Result<Self, String> {
        let raw: RawConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let model_type = raw
            .model_type
            .clone()
            .ok_or_else(|| "missing field `model_type`".to_string())?;
        if !supported_model_types().contains(&model_type.as_str()) {
            return Err(format!(
                "unsupported model_type \"{model_type}\" (supported: {})",
                supported_model_types().join(", ")
            ));
        }
        if model_type == "chatglm" {
            return Self::from_chatglm(text);
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = need(
            raw.num_key_value_heads.or(Some(num_heads)),
            "num_key_value_heads",
        )?;
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_heads}) is not a multiple of num_key_value_heads ({num_kv_heads})"
            ));
        }
        let head_dim = match raw.head_dim {
            Some(d) => need(Some(d), "head_dim")?,
            None => {
                if hidden_size % num_heads != 0 {
                    return Err(format!(
                        "hidden_size ({hidden_size}) is not a multiple of num_attention_heads ({num_heads}) and no head_dim is given"
                    ));
                }
                hidden_size / num_heads
            }
        };
        if head_dim % 2 != 0 {
            return Err(format!(
                "head_dim ({head_dim}) must be even for rotary embeddings"
            ));
        }
        let num_layers = need(raw.num_hidden_layers, "num_hidden_layers")?;
        let is_qwen2 = model_type == "qwen2";
        let is_qwen3 = matches!(model_type.as_str(), "qwen3" | "qwen3_moe");
        // GLM-4 (`glm`) and GLM-4-0414 (`glm4`, which adds norms after
        // attention and after the MLP).
        let is_glm = matches!(model_type.as_str(), "glm" | "glm4");
        // GLM-4 has q/k/v biases by default and never an output bias.
        let attention_bias = raw.attention_bias.unwrap_or(is_glm);
        let partial = raw
            .partial_rotary_factor
            .or_else(|| {
                raw.rope_parameters
                    .as_ref()?
                    .get("partial_rotary_factor")?
                    .as_f64()
            })
            .unwrap_or(if is_glm { 0.5 } else { 1.0 });
        let rotary_dim = rotary_dim(head_dim, partial)?;
        let window = match model_type.as_str() {
            "mistral" | "mixtral" | "phi3" => raw.sliding_window,
            "qwen2" | "qwen3" | "qwen3_moe" if raw.use_sliding_window.unwrap_or(false) => {
                raw.sliding_window
            }
            _ => None,
        };
        // Qwen2 and Qwen3 apply their window only from layer
        // `max_window_layers` on.
        let first_windowed = if is_qwen2 || is_qwen3 {
            raw.max_window_layers.unwrap_or(0)
        } else {
            0
        };
        let sliding_window = (0..num_layers)
            .map(|l| window.filter(|_| l >= first_windowed))
            .collect();
        let intermediate_size = need(raw.intermediate_size, "intermediate_size")?;
        let gemma3 = model_type == "gemma3_text";
        let gemma2 = model_type == "gemma2";
        let gemma = gemma2 || gemma3;
        let post_norms = model_type == "glm4" || gemma;
        let (rope_theta, rope_scaling, local_rope_theta, sliding_window) = if gemma3 {
            gemma_rope_and_windows(&raw, num_layers)?
        } else {
            (
                raw.rope_theta
                    .or_else(|| raw.rope_parameters.as_ref()?.get("rope_theta")?.as_f64())
                    .unwrap_or(10000.0) as f32,
                parse_rope_scaling(
                    raw.rope_scaling.as_ref().or(raw.rope_parameters.as_ref()),
                    &raw,
                )?,
                None,
                if gemma2 {
                    // Gemma 2: every other layer slides, the first among them.
                    let window = need(raw.sliding_window, "sliding_window")?;
                    layer_windows(&raw, num_layers, window, 2)?
                } else {
                    sliding_window
                },
            )
        };
        // Gemma 2 caps both; Gemma 3 dropped the attention cap, and a
        // checkpoint may still name the final one.
        let softcap = |cap: Option<f64>, field: &str| -> Result<Option<f32>, String> {
            match cap {
                None => Ok(None),
                Some(c) if c > 0.0 && c.is_finite() => Ok(Some(c as f32)),
                Some(c) => Err(format!(
                    "`{field}` is {c}: a soft-cap must be positive (or absent)"
                )),
            }
        };
        let (attn_softcap, final_softcap) = if gemma {
            // Gemma 2's defaults where its config leaves them out.
            let (attn, fin) = if gemma2 {
                (
                    raw.attn_logit_softcapping.or(Some(50.0)),
                    raw.final_logit_softcapping.or(Some(30.0)),
                )
            } else {
                (raw.attn_logit_softcapping, raw.final_logit_softcapping)
            };
            let attn = softcap(attn, "attn_logit_softcapping")?;
            if gemma3 && attn.is_some() {
                return Err(
                    "`attn_logit_softcapping` is set, but Gemma 3 has no attention soft-cap".into(),
                );
            }
            (attn, softcap(fin, "final_logit_softcapping")?)
        } else {
            (None, None)
        };
        let gate = match raw.hidden_activation.as_deref() {
            Some("gelu_pytorch_tanh") => crate::activation::Gate::GeluTanh,
            None | Some("silu") => crate::activation::Gate::Silu,
            Some(other) => {
                return Err(format!(
                    "hidden_activation \"{other}\" is not supported (silu, gelu_pytorch_tanh)"
                ))
            }
        };
        let moe = moe_config(&model_type, &raw, num_layers, intermediate_size)?;
        Ok(ModelConfig {
            vocab_size: need(raw.vocab_size, "vocab_size")?,
            hidden_size,
            intermediate_size,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(4096),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: is_qwen2 || attention_bias,
            o_bias: !is_qwen2 && !is_glm && attention_bias,
            mlp_bias: raw.mlp_bias.unwrap_or(false),
            sliding_window,
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
            torch_dtype: raw.torch_dtype.or(raw.dtype),
            model_type,
            rope_interleaved: is_glm,
            rotary_dim,
            qk_norm: is_qwen3 || gemma3,
            moe,
            post_norms,
            embed_scale: gemma,
            norm_offset: if gemma { 1.0 } else { 0.0 },
            gate,
            attention_scale: if gemma {
                Some((raw.query_pre_attn_scalar.unwrap_or(256.0) as f32).powf(-0.5))
            } else {
                None
            },
            local_rope_theta,
            attn_softcap,
            final_softcap,
            layout: if gemma {
                WeightLayout::Gemma
            } else {
                WeightLayout::Hf
            },
        })
    }

    /// An original ChatGLM config, read into the same fields as `transformers`'
    /// Glm config (as its GLM conversion script does).
    fn from_chatglm(text: &str) -> Result<Self, String> {
        let raw: ChatGlmConfig = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let unsupported =
            |what: &str| Err(format!("ChatGLM checkpoints with {what} are not supported"));
        if raw.rmsnorm == Some(false) {
            return unsupported("LayerNorm (`rmsnorm: false`)");
        }
        if raw.apply_residual_connection_post_layernorm == Some(true) {
            return unsupported("`apply_residual_connection_post_layernorm: true`");
        }
        if raw.post_layer_norm == Some(false) {
            return unsupported("`post_layer_norm: false`");
        }
        if raw.original_rope == Some(false) {
            return unsupported("`original_rope: false`");
        }
        let hidden_size = need(raw.hidden_size, "hidden_size")?;
        let num_heads = need(raw.num_attention_heads, "num_attention_heads")?;
        let num_kv_heads = if raw.multi_query_attention.unwrap_or(false) {
            need(raw.multi_query_group_num, "multi_query_group_num")?
        } else {
            num_heads
        };
        if num_heads % num_kv_heads != 0 {
            return Err(format!(
                "num_attention_heads ({num_heads}) is not a multiple of multi_query_group_num ({num_kv_heads})"
            ));
        }
        let head_dim = need(
            raw.kv_channels.or(Some(hidden_size / num_heads)),
            "kv_channels",
        )?;
        let num_layers = need(raw.num_layers, "num_layers")?;
        let linear_bias = raw.add_bias_linear.unwrap_or(false);
        Ok(ModelConfig {
            model_type: "glm".into(),
            vocab_size: need(raw.padded_vocab_size, "padded_vocab_size")?,
            hidden_size,
            intermediate_size: need(raw.ffn_hidden_size, "ffn_hidden_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            rms_norm_eps: raw.layernorm_epsilon.unwrap_or(1e-5),
            // ChatGLM scales the rotary base by `rope_ratio`.
            rope_theta: (10000.0 * raw.rope_ratio.unwrap_or(1.0)) as f32,
            rope_scaling: None,
            max_position_embeddings: raw.seq_length.unwrap_or(8192),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            qkv_bias: raw.add_qkv_bias.unwrap_or(false) || linear_bias,
            o_bias: linear_bias,
            mlp_bias: linear_bias,
            sliding_window: vec![None; num_layers],
            bos_token_id: token_ids(raw.bos_token_id.as_ref(), "bos_token_id")?
                .first()
                .copied(),
            eos_token_ids: token_ids(raw.eos_token_id.as_ref(), "eos_token_id")?,
            torch_dtype: raw.torch_dtype,
            rope_interleaved: true,
            // ChatGLM rotates the first half of each head.
            rotary_dim: rotary_dim(head_dim, 0.5)?,
            qk_norm: false,
            moe: None,
            post_norms: false,
            embed_scale: false,
            norm_offset: 0.0,
            gate: crate::activation::Gate::Silu,
            attention_scale: None,
            local_rope_theta: None,
            attn_softcap: None,
            final_softcap: None,
            layout: WeightLayout::ChatGlm,
        })
    }

    /// Query heads per key/value head (grouped-query attention).
    pub fn group_size(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Number of parameters, embeddings included once when tied.
    pub fn parameter_count(&self) -> usize {
        let (h, i, v) = (self.hidden_size, self.intermediate_size, self.vocab_size);
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = h * q + 2 * h * kv + q * h;
        let ffn = |l: usize| match &self.moe {
            Some(m) if m.layers[l] => m.experts * (3 * h * m.intermediate + h),
            _ => 3 * h * i,
        };
        let layers: usize = (0..self.num_layers).map(|l| attn + ffn(l) + 2 * h).sum();
        let head = if self.tie_word_embeddings { 0 } else { v * h };
        v * h + layers + h + head
    }
}

/// The experts of a Qwen3-MoE or Mixtral config (none for other families).
fn moe_config(
    model_type: &str,
    raw: &RawConfig,
    num_layers: usize,
    intermediate_size: usize,
) -> Result<Option<MoeConfig>, String> {
    let (experts, field, intermediate, normalize) = match model_type {
        // transformers 5 writes Qwen3-MoE's count as `num_local_experts`.
        "qwen3_moe" => (
            raw.num_experts.or(raw.num_local_experts),
            "num_experts",
            need(raw.moe_intermediate_size, "moe_intermediate_size")?,
            raw.norm_topk_prob.unwrap_or(false),
        ),
        "mixtral" => (
            raw.num_local_experts.or(Some(8)),
            "num_local_experts",
            intermediate_size,
            true,
        ),
        _ => return Ok(None),
    };
    let experts = need(experts, field)?;
    let active = need(raw.num_experts_per_tok, "num_experts_per_tok")?;
    if active > experts {
        return Err(format!(
            "num_experts_per_tok ({active}) is more than the {experts} experts ({field})"
        ));
    }
    let step = raw.decoder_sparse_step.unwrap_or(1).max(1);
    let dense = raw.mlp_only_layers.clone().unwrap_or_default();
    let layers = (0..num_layers)
        .map(|l| !dense.contains(&l) && (l + 1) % step == 0)
        .collect();
    Ok(Some(MoeConfig {
        experts,
        active,
        intermediate,
        normalize,
        layers,
    }))
}

/// Gemma 3's rotary bases and windows: the full layers' base and scaling
/// (`rope_parameters.full_attention`), the sliding layers' base
/// (`rope_parameters.sliding_attention`, or `rope_local_base_freq`), and
/// each layer's window (`layer_types`, or every sixth layer full).
#[allow(clippy::type_complexity)]
fn gemma_rope_and_windows(
    raw: &RawConfig,
    num_layers: usize,
) -> Result<(f32, Option<RopeScaling>, Option<f32>, Vec<Option<usize>>), String> {
    let kind = |k: &str| raw.rope_parameters.as_ref().and_then(|p| p.get(k));
    let theta = |k: &str| {
        kind(k)
            .and_then(|p| p.get("rope_theta"))
            .and_then(Value::as_f64)
    };
    let global = theta("full_attention")
        .or(raw.rope_theta)
        .unwrap_or(1_000_000.0) as f32;
    let local = theta("sliding_attention")
        .or(raw.rope_local_base_freq)
        .unwrap_or(10_000.0) as f32;
    let scaling = parse_rope_scaling(kind("full_attention").or(raw.rope_scaling.as_ref()), raw)?;
    let window = need(raw.sliding_window, "sliding_window")?;
    let windows = layer_windows(raw, num_layers, window, 6)?;
    Ok((global, scaling, Some(local), windows))
}

/// Each layer's window where sliding and full layers interleave (Gemma):
/// from `layer_types`, or else every `pattern`-th layer full
/// (`sliding_window_pattern`, defaulting to the family's).
fn layer_windows(
    raw: &RawConfig,
    num_layers: usize,
    window: usize,
    pattern: usize,
) -> Result<Vec<Option<usize>>, String> {
    let pattern = raw.sliding_window_pattern.unwrap_or(pattern).max(1);
    match &raw.layer_types {
        Some(types) if types.len() == num_layers => Ok(types
            .iter()
            .map(|t| (t == "sliding_attention").then_some(window))
            .collect()),
        Some(types) => Err(format!(
            "layer_types has {} entries for {num_layers} layers",
            types.len()
        )),
        None => Ok((0..num_layers)
            .map(|l| ((l + 1) % pattern != 0).then_some(window))
            .collect()),
    }
}

/// Gemma's norms by the names of the slots they fill: its norm on the
/// attention's output is the slot after attention, its norm before the MLP
/// the Llama layout's `post_attention_layernorm`, its norm on the MLP's
/// output the slot after the MLP.
pub fn gemma_to_slots(name: &str) -> Option<String> {
    for (gemma, slot) in [
        (".post_attention_layernorm.", ".post_self_attn_layernorm."),
        (".pre_feedforward_layernorm.", ".post_attention_layernorm."),
        (".post_feedforward_layernorm.", ".post_mlp_layernorm."),
    ] {
        if name.contains(gemma) {
            return Some(name.replace(gemma, slot));
        }
    }
    None
}

/// Rotated dimensions of a head: an even number, at most `head_dim`.
fn rotary_dim(head_dim: usize, factor: f64) -> Result<usize, String> {
    let d = (head_dim as f64 * factor) as usize;
    if d == 0 || !d.is_multiple_of(2) || d > head_dim {
        return Err(format!(
            "partial_rotary_factor {factor} gives {d} rotated dimensions of {head_dim}; they must be even and positive"
        ));
    }
    Ok(d)
}

/// The `transformers` name of a tensor stored under an original ChatGLM
/// name; `None` for tensors the forward pass does not read.
pub fn chatglm_to_hf(name: &str) -> Option<String> {
    match name {
        "transformer.embedding.word_embeddings.weight" => {
            return Some("model.embed_tokens.weight".into())
        }
        "transformer.encoder.final_layernorm.weight" => return Some("model.norm.weight".into()),
        "transformer.output_layer.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("transformer.encoder.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let hf = match module {
        "input_layernorm" => "input_layernorm",
        "post_attention_layernorm" => "post_attention_layernorm",
        "self_attention.query_key_value" => "self_attn.qkv_proj",
        "self_attention.dense" => "self_attn.o_proj",
        "mlp.dense_h_to_4h" => "mlp.gate_up_proj",
        "mlp.dense_4h_to_h" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{kind}"))
}

/// `bos_token_id` / `eos_token_id` may be a number, a list of numbers or null.
pub fn token_ids(v: Option<&Value>, field: &str) -> Result<Vec<u32>, String> {
    let as_id = |x: &Value| {
        x.as_u64()
            .and_then(|n| u32::try_from(n).ok())
            .ok_or_else(|| format!("field `{field}` holds {x}, not a token id"))
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(items)) => items.iter().map(as_id).collect(),
        Some(x) => Ok(vec![as_id(x)?]),
    }
}

fn parse_rope_scaling(v: Option<&Value>, raw: &RawConfig) -> Result<Option<RopeScaling>, String> {
    let Some(obj) = v.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = obj
        .get("rope_type")
        .or_else(|| obj.get("type"))
        .and_then(Value::as_str)
        .ok_or_else(|| "rope_scaling has no `rope_type`".to_string())?;
    let num = |key: &str| -> Result<f64, String> {
        obj.get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope_scaling of type {kind} needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")? as f32,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")? as f32,
            low_freq_factor: num("low_freq_factor")? as f32,
            high_freq_factor: num("high_freq_factor")? as f32,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        "longrope" | "su" => {
            let factors = |key: &str| -> Result<Vec<f32>, String> {
                obj.get(key)
                    .and_then(Value::as_array)
                    .and_then(|a| a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect())
                    .ok_or_else(|| {
                        format!("rope_scaling of type {kind} needs a list of numbers `{key}`")
                    })
            };
            let (short, long) = (factors("short_factor")?, factors("long_factor")?);
            if short.len() != long.len() || short.iter().chain(&long).any(|f| *f <= 0.0) {
                return Err(format!(
                    "rope_scaling: `short_factor` ({}) and `long_factor` ({}) must be as long as each other and positive",
                    short.len(),
                    long.len()
                ));
            }
            let original = obj
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .map(|v| v as usize)
                .or(raw.original_max_position_embeddings)
                .filter(|&v| v > 1)
                .ok_or_else(|| {
                    "rope_scaling of type longrope needs `original_max_position_embeddings`"
                        .to_string()
                })?;
            let max = raw.max_position_embeddings.unwrap_or(original);
            // The paper's scale of attention, from how far the context was
            // stretched, unless the checkpoint names its own.
            let factor = obj
                .get("factor")
                .and_then(Value::as_f64)
                .unwrap_or(max as f64 / original as f64);
            let attention_factor = obj
                .get("attention_factor")
                .and_then(Value::as_f64)
                .map_or_else(|| longrope_attention_factor(factor, original), |a| a as f32);
            Ok(Some(RopeScaling::LongRope {
                short,
                long,
                original,
                attention_factor,
                use_long: max > original,
            }))
        }
        other => Err(format!(
            "rope_scaling type \"{other}\" is not supported (supported: default, linear, llama3, longrope)"
        )),
    }
}

/// Rotary inverse frequencies, one per pair of head dimensions, with the
/// checkpoint's scaling applied. Computed in f32 like the reference.
pub fn rope_inv_freq(cfg: &ModelConfig) -> Vec<f32> {
    let d = cfg.rotary_dim;
    let base: Vec<f32> = (0..d / 2)
        .map(|i| 1.0 / cfg.rope_theta.powf((2 * i) as f32 / d as f32))
        .collect();
    match cfg.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::LongRope {
            ref short,
            ref long,
            use_long,
            ..
        }) => {
            let factors = if use_long { long } else { short };
            (0..d / 2)
                .map(|i| {
                    let s = factors.get(i).copied().unwrap_or(1.0);
                    1.0 / (s * cfg.rope_theta.powf((2 * i) as f32 / d as f32))
                })
                .collect()
        }
        Some(RopeScaling::Factors(ref factors)) => base
            .iter()
            .zip(factors.iter().chain(std::iter::repeat(&1.0)))
            .map(|(f, s)| f / s)
            .collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        }) => {
            let old = original_max_position_embeddings as f32;
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f32::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":64,
        "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"eos_token_id":[1,2],"bos_token_id":0}"#;

    /// LongRoPE: long factors where the context exceeds the pretrained
    /// one, short ones within it, cos/sin scaled by √(1 + ln s / ln n₀)
    /// with s the stretch; both spellings of the type; bad lists refused.
    #[test]
    fn longrope_picks_its_factors_by_context() {
        let cfg = |scaling: &str| {
            ModelConfig::from_json(&format!(
                r#"{{"model_type":"phi3","vocab_size":100,"hidden_size":64,
                "intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,
                "max_position_embeddings":4096,"original_max_position_embeddings":256,
                "rope_theta":10000.0,"rope_scaling":{scaling}}}"#
            ))
        };
        let ok = cfg(r#"{"type":"su","short_factor":[1,1,1,1,1,1,1,1],
            "long_factor":[1,2,3,4,5,6,7,8]}"#)
        .unwrap();
        let Some(RopeScaling::LongRope {
            attention_factor,
            use_long,
            original,
            ..
        }) = ok.rope_scaling.clone()
        else {
            panic!("{:?}", ok.rope_scaling)
        };
        assert_eq!((original, use_long), (256, true));
        let want = (1.0 + 16f64.ln() / 256f64.ln()).sqrt() as f32;
        assert!((attention_factor - want).abs() < 1e-6, "{attention_factor}");
        let long = rope_inv_freq(&ok);
        let mut short_cfg = ok.clone();
        fit_rope_to_context(&mut short_cfg.rope_scaling, 256);
        let short = rope_inv_freq(&short_cfg);
        let plain = rope_inv_freq(&ModelConfig {
            rope_scaling: None,
            ..ok.clone()
        });
        for i in 0..8 {
            assert!((short[i] - plain[i]).abs() <= f32::EPSILON * plain[i]);
            let want = 1.0 / ((i + 1) as f32 * 10000f32.powf((2 * i) as f32 / 16.0));
            assert_eq!(long[i], want, "frequency {i}");
        }
        fit_rope_to_context(&mut short_cfg.rope_scaling, 257);
        assert_eq!(rope_inv_freq(&short_cfg), long);
        for bad in [
            r#"{"type":"longrope","short_factor":[1,1],"long_factor":[1]}"#,
            r#"{"type":"longrope","short_factor":[1,0],"long_factor":[1,1]}"#,
            r#"{"type":"longrope","long_factor":[1,1]}"#,
        ] {
            let e = cfg(bad).unwrap_err();
            assert!(e.contains("factor"), "{bad}: {e}");
        }
    }

    /// Experts from either spelling of their count; which layers have
    /// them; and a clear error for more active experts than there are.
    #[test]
    fn mixtures_of_experts_are_read_and_checked() {
        let moe = |extra: &str| {
            let j = LLAMA.replace("\"llama\"", "\"qwen3_moe\"").replace(
                "\"bos_token_id\":0",
                &format!("\"bos_token_id\":0,\"moe_intermediate_size\":40{extra}"),
            );
            ModelConfig::from_json(&j)
        };
        let c =
            moe(",\"num_experts\":4,\"num_experts_per_tok\":2,\"mlp_only_layers\":[0]").unwrap();
        let m = c.moe.clone().unwrap();
        assert_eq!((m.experts, m.active, m.intermediate), (4, 2, 40));
        assert_eq!(m.layers, [false, true]);
        assert!(c.qk_norm);
        let c = moe(",\"num_local_experts\":6,\"num_experts_per_tok\":2,\"norm_topk_prob\":true")
            .unwrap();
        assert_eq!(
            c.moe.as_ref().map(|m| (m.experts, m.normalize)),
            Some((6, true))
        );
        let e = moe(",\"num_experts\":4,\"num_experts_per_tok\":5").unwrap_err();
        assert!(
            e.contains("num_experts_per_tok (5)") && e.contains("4 experts"),
            "{e}"
        );
        let e = moe(",\"num_experts_per_tok\":2").unwrap_err();
        assert!(e.contains("num_experts"), "{e}");
        // Mixtral: the dense MLP's width is each expert's.
        let j = LLAMA.replace("\"llama\"", "\"mixtral\"").replace(
            "\"bos_token_id\":0",
            "\"bos_token_id\":0,\"num_local_experts\":8,\"num_experts_per_tok\":2",
        );
        let c = ModelConfig::from_json(&j).unwrap();
        assert_eq!(
            c.moe.map(|m| (m.experts, m.intermediate, m.normalize)),
            Some((8, 128, true))
        );
    }

    #[test]
    fn defaults_and_flags() {
        let c = ModelConfig::from_json(LLAMA).unwrap();
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.group_size(), 2);
        assert_eq!(c.eos_token_ids, vec![1, 2]);
        assert_eq!(c.bos_token_id, Some(0));
        assert!(!c.qkv_bias && !c.tie_word_embeddings);
        let q = LLAMA.replace("\"llama\"", "\"qwen2\"");
        let c = ModelConfig::from_json(&q).unwrap();
        assert!(c.qkv_bias && !c.o_bias);
    }

    #[test]
    fn unknown_model_type_is_named() {
        let e = ModelConfig::from_json(&LLAMA.replace("\"llama\"", "\"gpt_neox\"")).unwrap_err();
        assert!(e.contains("gpt_neox") && e.contains("llama"), "{e}");
    }

    #[test]
    fn missing_field_is_named() {
        let e = ModelConfig::from_json(&LLAMA.replace("\"hidden_size\":64,", "")).unwrap_err();
        assert!(e.contains("hidden_size"), "{e}");
    }

    #[test]
    fn llama3_scaling_keeps_high_and_divides_low_frequencies() {
        let mut c = ModelConfig::from_json(LLAMA).unwrap();
        c.rope_theta = 500000.0;
        let plain = rope_inv_freq(&c);
        c.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64,
        });
        let scaled = rope_inv_freq(&c);
        assert_eq!(scaled[0], plain[0]);
        let last = plain.len() - 1;
        assert!((scaled[last] - plain[last] / 8.0).abs() < 1e-12);
    }
}
