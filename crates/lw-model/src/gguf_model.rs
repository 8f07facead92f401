//! The Llama family in GGUF files: the model config from llama.cpp's
//! metadata keys, and the other direction, writing a checkpoint as GGUF
//! (`longwriter convert`) in the layout llama.cpp reads.

use crate::config::{supported_architectures, ModelConfig, MoeConfig, RopeScaling, FAMILIES};
use crate::error::ModelError;
use crate::gguf::{GgufError, GgufFile, Value};
use crate::quant::dequantize_row;

/// The longest context a GGUF header may claim (2^28 positions, far above
/// any model's): beyond it the number is a broken header, not a model.
const MAX_CONTEXT: usize = 1 << 28;

/// The model config a GGUF file describes.
pub fn config(file: &GgufFile) -> Result<ModelConfig, ModelError> {
    config_of(file).map_err(|e| file.err(e))
}

fn config_of(file: &GgufFile) -> Result<ModelConfig, GgufError> {
    let h = file.header();
    let arch = h.require("general.architecture", h.string("general.architecture"))?;
    if !supported_architectures().contains(&arch) {
        return Err(GgufError::Architecture {
            name: arch.to_string(),
            supported: supported_architectures().join(", "),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<usize, GgufError> {
        let name = key(k);
        match h.uint(&name)? {
            None => Err(GgufError::MissingKey(name)),
            Some(0) => Err(GgufError::Metadata {
                key: name,
                reason: "0, where a model needs at least 1".into(),
            }),
            Some(v) => usize::try_from(v).map_err(|_| GgufError::Metadata {
                key: name,
                reason: format!("{v} does not fit this machine's address space"),
            }),
        }
    };
    let hidden_size = need("embedding_length")?;
    let num_heads = need("attention.head_count")?;
    let num_kv_heads = match h.uint(&key("attention.head_count_kv"))? {
        Some(v) if v > 0 => v as usize,
        _ => num_heads,
    };
    let bad = |key: String, reason: String| GgufError::Metadata { key, reason };
    if num_heads > hidden_size {
        return Err(bad(
            key("attention.head_count"),
            format!("{num_heads} heads for an embedding of {hidden_size}"),
        ));
    }
    if num_heads % num_kv_heads != 0 {
        return Err(bad(
            key("attention.head_count_kv"),
            format!("{num_kv_heads} does not divide the {num_heads} query heads"),
        ));
    }
    let head_dim = match h.uint(&key("attention.key_length"))? {
        Some(d) if d > 0 => d as usize,
        _ => hidden_size / num_heads,
    };
    if head_dim == 0 || head_dim % 2 != 0 {
        return Err(bad(
            key("attention.key_length"),
            format!("head size {head_dim} must be even and positive"),
        ));
    }
    let embd = file
        .tensor("token_embd.weight")
        .ok_or_else(|| GgufError::MissingKey("tensor token_embd.weight".into()))?;
    if embd.shape.len() != 2 || embd.shape[1] != hidden_size {
        return Err(GgufError::TensorShape {
            name: "token_embd.weight".into(),
            reason: format!(
                "shape {:?} does not match embedding_length {hidden_size}",
                embd.shape
            ),
        });
    }
    let vocab_size = embd.shape[0];
    let num_layers = need("block_count")?;
    // Every layer has tensors named blk.N.*: a count beyond them is a
    // broken (or hostile) header, refused before anything is sized by it.
    let blocks = h
        .tensors
        .iter()
        .filter(|t| t.name.starts_with("blk."))
        .count();
    if num_layers > blocks {
        return Err(bad(
            key("block_count"),
            format!("{num_layers} layers, but the file holds {blocks} layer tensors"),
        ));
    }
    let rotary_dim = match h.uint(&key("rope.dimension_count"))? {
        Some(d) if d > 0 && d % 2 == 0 && d as usize <= head_dim => d as usize,
        None => head_dim,
        Some(d) => {
            return Err(bad(
                key("rope.dimension_count"),
                format!("{d} rotated dimensions of {head_dim}: must be even, positive and at most the head size"),
            ))
        }
    };
    let glm = arch == "chatglm";
    let rope_scaling = match h.string(&key("rope.scaling.type"))? {
        Some("linear") => Some(RopeScaling::Linear {
            factor: h.float(&key("rope.scaling.factor"))?.unwrap_or(1.0) as f32,
        }),
        Some("none") | None => None,
        Some(other) => {
            return Err(bad(
                key("rope.scaling.type"),
                format!("rope scaling \"{other}\" is not supported"),
            ))
        }
    };
    // Per-frequency factors arrive as tensors: Llama 3.1's rescaling
    // (`rope_freqs`), Phi-3's LongRoPE (a long and a short set).
    let factors = |name: &str| -> Result<Option<Vec<f32>>, GgufError> {
        match file.tensor(name) {
            None => Ok(None),
            Some(t) if t.shape == [rotary_dim / 2] => {
                let mut f = vec![0f32; rotary_dim / 2];
                dequantize_row(t.qtype, file.data(t).as_slice(), &mut f);
                Ok(Some(f))
            }
            Some(t) => Err(GgufError::TensorShape {
                name: name.into(),
                reason: format!("shape {:?}, expected [{}]", t.shape, rotary_dim / 2),
            }),
        }
    };
    let rope_scaling = factors("rope_freqs.weight")?
        .map(RopeScaling::Factors)
        .or(rope_scaling);
    let rope_scaling = match (
        factors("rope_factors_long.weight")?,
        factors("rope_factors_short.weight")?,
    ) {
        (Some(long), Some(short)) => {
            let original = need("rope.scaling.original_context_length")?;
            let context = need("context_length")?;
            let attention_factor = match h.float(&key("rope.scaling.attn_factor"))? {
                Some(a) => a as f32,
                None => crate::config::longrope_attention_factor(
                    context as f64 / original as f64,
                    original,
                ),
            };
            Some(RopeScaling::LongRope {
                short,
                long,
                original,
                attention_factor,
                use_long: context > original,
            })
        }
        (None, None) => rope_scaling,
        _ => return Err(GgufError::MissingKey(
            "tensor rope_factors_long.weight or rope_factors_short.weight (LongRoPE needs both)"
                .into(),
        )),
    };
    let has = |n: &str| file.tensor(n).is_some();
    let mut eos_token_ids = Vec::new();
    for k in [
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.eot_token_id",
        "tokenizer.ggml.eom_token_id",
    ] {
        if let Some(id) = h.uint(k)? {
            eos_token_ids.push(id as u32);
        }
    }
    let intermediate_size = need("feed_forward_length")?;
    let moe = match h.uint(&key("expert_count"))? {
        Some(experts) if experts > 0 => {
            let experts = experts as usize;
            let active = need("expert_used_count")?;
            if active > experts {
                return Err(bad(
                    key("expert_used_count"),
                    format!("{active} active experts of {experts}"),
                ));
            }
            let intermediate = match h.uint(&key("expert_feed_forward_length"))? {
                Some(v) if v > 0 => v as usize,
                _ => intermediate_size,
            };
            Some(MoeConfig {
                experts,
                active,
                intermediate,
                // llama.cpp renormalises the chosen experts' weights for
                // these architectures.
                normalize: h.bool(&key("expert_weights_norm"))?.unwrap_or(true),
                layers: (0..num_layers)
                    .map(|l| has(&format!("blk.{l}.ffn_gate_inp.weight")))
                    .collect(),
            })
        }
        _ => None,
    };
    let gemma = match arch {
        "gemma2" | "gemma3" => Some(gemma_config(file, arch, num_layers)?),
        _ => None,
    };
    let gemma_ref = gemma.as_ref();
    Ok(ModelConfig {
        // The first family the architecture names (Mixtral: `llama` with
        // experts).
        model_type: match arch {
            "llama" if moe.is_some() => "mixtral",
            _ => FAMILIES
                .iter()
                .find(|(_, a)| *a == Some(arch))
                .map_or("llama", |(t, _)| t),
        }
        .into(),
        vocab_size,
        hidden_size,
        intermediate_size,
        num_layers,
        num_heads,
        num_kv_heads,
        head_dim,
        rms_norm_eps: h
            .float(&key("attention.layer_norm_rms_epsilon"))?
            .unwrap_or(1e-5),
        rope_theta: h.float(&key("rope.freq_base"))?.unwrap_or(10000.0) as f32,
        rope_scaling,
        max_position_embeddings: match need("context_length")? {
            n if n > MAX_CONTEXT => {
                return Err(bad(
                    key("context_length"),
                    format!("{n} positions; at most {MAX_CONTEXT} are supported"),
                ))
            }
            n => n,
        },
        tie_word_embeddings: !has("output.weight"),
        qkv_bias: has("blk.0.attn_q.bias") || has("blk.0.attn_qkv.bias"),
        o_bias: has("blk.0.attn_output.bias"),
        mlp_bias: has("blk.0.ffn_up.bias"),
        sliding_window: gemma_ref.map_or_else(|| vec![None; num_layers], |g| g.windows.clone()),
        bos_token_id: h.uint("tokenizer.ggml.bos_token_id")?.map(|v| v as u32),
        eos_token_ids,
        torch_dtype: None,
        // llama.cpp's Llama graph rotates adjacent pairs (its converter
        // permutes q and k rows to match), as GLM-4 does natively; Qwen2
        // and Qwen3 keep the halves layout.
        rope_interleaved: arch == "llama" || glm || arch == "glm4",
        rotary_dim,
        qk_norm: has("blk.0.attn_q_norm.weight"),
        moe,
        post_norms: has("blk.0.post_attention_norm.weight"),
        // Gemma's norms scale by 1 + w; llama.cpp's converter stores 1 + w.
        embed_scale: gemma.is_some(),
        norm_offset: 0.0,
        gate: if gemma.is_some() {
            crate::activation::Gate::GeluTanh
        } else {
            crate::activation::Gate::Silu
        },
        attention_scale: gemma_ref.and_then(|g| g.attention_scale),
        local_rope_theta: gemma_ref.and_then(|g| g.local_rope_theta),
        attn_softcap: gemma_ref.and_then(|g| g.attn_softcap),
        final_softcap: gemma_ref.and_then(|g| g.final_softcap),
        layout: crate::config::WeightLayout::Hf,
    })
}

/// What Gemma 2 and 3 files carry beyond the Llama layout, read as
/// llama.cpp reads them.
struct GemmaConfig {
    windows: Vec<Option<usize>>,
    attention_scale: Option<f32>,
    local_rope_theta: Option<f32>,
    attn_softcap: Option<f32>,
    final_softcap: Option<f32>,
}

fn gemma_config(file: &GgufFile, arch: &str, num_layers: usize) -> Result<GemmaConfig, GgufError> {
    let h = file.header();
    let key = |k: &str| format!("{arch}.{k}");
    let gemma2 = arch == "gemma2";
    let cap = |k: &str, default: Option<f64>| -> Result<Option<f32>, GgufError> {
        match h.float(&key(k))?.or(default) {
            Some(c) if c.is_finite() && c > 0.0 => Ok(Some(c as f32)),
            // Gemma 3 writes 0 for no cap.
            Some(c) if c == 0.0 && !gemma2 => Ok(None),
            None => Ok(None),
            Some(c) => Err(GgufError::Metadata {
                key: key(k),
                reason: format!("soft-cap {c}: must be positive"),
            }),
        }
    };
    let attn_softcap = if gemma2 {
        cap("attn_logit_softcapping", Some(50.0))?
    } else {
        None
    };
    let final_softcap = cap("final_logit_softcapping", gemma2.then_some(30.0))?;
    // Sliding layers: every second layer (Gemma 2) or five of every six
    // (Gemma 3), unless the file lists them; Gemma 3 files without a window
    // have none.
    let window = match h.uint(&key("attention.sliding_window"))? {
        Some(w) if w > 0 => Some(w as usize),
        Some(_) => None,
        None => gemma2.then_some(4096),
    };
    let pattern_key = key("attention.sliding_window_pattern");
    let windows = match window {
        None => vec![None; num_layers],
        Some(w) => match h.get(&pattern_key) {
            Some(Value::Array(flags)) => {
                if flags.len() != num_layers {
                    return Err(GgufError::Metadata {
                        key: pattern_key,
                        reason: format!("{} entries for {num_layers} layers", flags.len()),
                    });
                }
                flags
                    .iter()
                    .map(|f| match f {
                        Value::Bool(true) => Ok(Some(w)),
                        Value::Bool(false) => Ok(None),
                        other => Err(GgufError::MetadataType {
                            key: pattern_key.clone(),
                            expected: "an array of bools",
                            found: other.type_name(),
                        }),
                    })
                    .collect::<Result<_, _>>()?
            }
            _ => {
                let n = h.uint(&pattern_key)?.unwrap_or(if gemma2 { 2 } else { 6 }) as usize;
                (0..num_layers)
                    .map(|l| (n == 0 || l % n < n - 1).then_some(w))
                    .collect()
            }
        },
    };
    // The sliding layers' rotary base: Gemma 3's own (10,000 unless the
    // file names it), Gemma 2's the full layers' one.
    let local_rope_theta = match h.float(&key("rope.freq_base_swa"))? {
        Some(b) => Some(b as f32),
        None if !gemma2 => Some(10_000.0),
        None => None,
    }
    .filter(|_| window.is_some());
    // Scores scale by 1/√head_dim, except in the 27B models, whose
    // query_pre_attn_scalar is hidden / heads (llama.cpp tells them by
    // their layer counts).
    let big = (gemma2 && num_layers == 46) || (!gemma2 && num_layers == 62);
    let attention_scale = if big {
        let hidden = h.uint(&key("embedding_length"))?.unwrap_or(0) as f32;
        let heads = h.uint(&key("attention.head_count"))?.unwrap_or(1).max(1) as f32;
        Some((hidden / heads).powf(-0.5))
    } else {
        None
    };
    Ok(GemmaConfig {
        windows,
        attention_scale,
        local_rope_theta,
        attn_softcap,
        final_softcap,
    })
}

/// Reorders the rows of each of `heads` heads of `head_dim` rows from the
/// halves layout (`i`, `i + d/2` rotate together) to adjacent pairs (`2i`,
/// `2i + 1`): how llama.cpp's converter stores Llama-architecture q and k
/// matrices. `cols` is 1 for a bias.
pub fn halves_to_pairs(values: &[f32], heads: usize, head_dim: usize, cols: usize) -> Vec<f32> {
    let half = head_dim / 2;
    let mut out = vec![0f32; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = h * head_dim + j * half + i;
                let dst = h * head_dim + 2 * i + j;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&values[src * cols..(src + 1) * cols]);
            }
        }
    }
    out
}

/// llama.cpp's architecture name for a config.
pub fn gguf_architecture(cfg: &ModelConfig) -> &'static str {
    FAMILIES
        .iter()
        .find(|(t, _)| *t == cfg.model_type)
        .and_then(|(_, a)| *a)
        .unwrap_or("llama")
}

/// Metadata values for a config, in llama.cpp's keys (tokenizer keys aside).
pub fn config_metadata(cfg: &ModelConfig, name: &str) -> Vec<(String, Value)> {
    let arch = gguf_architecture(cfg);
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        (
            "general.architecture".to_string(),
            Value::String(arch.into()),
        ),
        ("general.name".to_string(), Value::String(name.into())),
        (
            k("context_length"),
            Value::U32(cfg.max_position_embeddings as u32),
        ),
        (k("embedding_length"), Value::U32(cfg.hidden_size as u32)),
        (k("block_count"), Value::U32(cfg.num_layers as u32)),
        (
            k("feed_forward_length"),
            Value::U32(cfg.intermediate_size as u32),
        ),
        (k("attention.head_count"), Value::U32(cfg.num_heads as u32)),
        (
            k("attention.head_count_kv"),
            Value::U32(cfg.num_kv_heads as u32),
        ),
        (k("attention.key_length"), Value::U32(cfg.head_dim as u32)),
        (k("attention.value_length"), Value::U32(cfg.head_dim as u32)),
        (k("rope.dimension_count"), Value::U32(cfg.rotary_dim as u32)),
        (k("rope.freq_base"), Value::F32(cfg.rope_theta)),
        (
            k("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
    ];
    if let Some(RopeScaling::Linear { factor }) = cfg.rope_scaling {
        m.push((k("rope.scaling.type"), Value::String("linear".into())));
        m.push((k("rope.scaling.factor"), Value::F32(factor)));
    }
    // LongRoPE: the factors travel as tensors (`rope_factors_long`,
    // `rope_factors_short`), as llama.cpp's converter writes them.
    if let Some(RopeScaling::LongRope {
        original,
        attention_factor,
        ..
    }) = cfg.rope_scaling
    {
        m.push((
            k("rope.scaling.original_context_length"),
            Value::U32(original as u32),
        ));
        m.push((k("rope.scaling.attn_factor"), Value::F32(attention_factor)));
    }
    if let Some(moe) = &cfg.moe {
        m.push((k("expert_count"), Value::U32(moe.experts as u32)));
        m.push((k("expert_used_count"), Value::U32(moe.active as u32)));
        if arch != "llama" {
            m.push((
                k("expert_feed_forward_length"),
                Value::U32(moe.intermediate as u32),
            ));
        }
    }
    if matches!(arch, "gemma2" | "gemma3") {
        // The window, and which layers slide, as a per-layer list.
        if let Some(w) = cfg.sliding_window.iter().flatten().next() {
            m.push((k("attention.sliding_window"), Value::U32(*w as u32)));
            m.push((
                k("attention.sliding_window_pattern"),
                Value::Array(
                    cfg.sliding_window
                        .iter()
                        .map(|w| Value::Bool(w.is_some()))
                        .collect(),
                ),
            ));
        }
        if let Some(base) = cfg.local_rope_theta {
            m.push((k("rope.freq_base_swa"), Value::F32(base)));
        }
        if let Some(c) = cfg.attn_softcap {
            m.push((k("attn_logit_softcapping"), Value::F32(c)));
        }
        if let Some(c) = cfg.final_softcap {
            m.push((k("final_logit_softcapping"), Value::F32(c)));
        }
    }
    m
}

#[cfg(test)]
mod hostile {
    use super::*;
    use crate::gguf::{write, OutTensor};
    use crate::QType;

    /// A header-only Llama GGUF (an embedding and one layer's norm) with
    /// `edit` applied to its metadata; the config read from it.
    fn config_with(tag: &str, edit: impl FnOnce(&mut Vec<(String, Value)>)) -> String {
        let mut meta = vec![
            (
                "general.architecture".to_string(),
                Value::String("llama".into()),
            ),
            ("llama.embedding_length".into(), Value::U32(8)),
            ("llama.attention.head_count".into(), Value::U32(2)),
            ("llama.block_count".into(), Value::U32(1)),
            ("llama.feed_forward_length".into(), Value::U32(16)),
            ("llama.context_length".into(), Value::U64(128)),
        ];
        edit(&mut meta);
        let tensors = vec![
            OutTensor {
                name: "token_embd.weight".into(),
                shape: vec![4, 8],
                qtype: QType::F32,
                data: vec![0; 4 * 8 * 4],
            },
            OutTensor {
                name: "blk.0.attn_norm.weight".into(),
                shape: vec![8],
                qtype: QType::F32,
                data: vec![0; 8 * 4],
            },
        ];
        let path =
            std::env::temp_dir().join(format!("lw-hostile-{tag}-{}.gguf", std::process::id()));
        let mut bytes = Vec::new();
        write(&mut bytes, &meta, &tensors).unwrap();
        std::fs::write(&path, bytes).unwrap();
        let file = GgufFile::open(&path).unwrap();
        let out = match config(&file) {
            Ok(c) => format!(
                "ok: {} layers, context {}",
                c.num_layers, c.max_position_embeddings
            ),
            Err(e) => e.to_string(),
        };
        std::fs::remove_file(&path).ok();
        out
    }

    fn set(meta: &mut [(String, Value)], key: &str, v: Value) {
        meta.iter_mut().find(|(k, _)| k == key).unwrap().1 = v;
    }

    #[test]
    fn the_plain_header_loads() {
        assert_eq!(config_with("plain", |_| {}), "ok: 1 layers, context 128");
    }

    #[test]
    fn zero_heads_are_refused_by_name() {
        let msg = config_with("heads0", |m| {
            set(m, "llama.attention.head_count", Value::U32(0))
        });
        assert!(
            msg.contains("llama.attention.head_count") && msg.contains("at least 1"),
            "{msg}"
        );
        let msg = config_with("heads-many", |m| {
            set(m, "llama.attention.head_count", Value::U32(1 << 30))
        });
        assert!(
            msg.contains("llama.attention.head_count")
                && msg.contains("heads for an embedding of 8"),
            "{msg}"
        );
    }

    #[test]
    fn a_billion_layers_are_refused_before_anything_is_sized_by_them() {
        let msg = config_with("blocks", |m| {
            set(m, "llama.block_count", Value::U32(1_000_000_000))
        });
        assert!(
            msg.contains("llama.block_count") && msg.contains("1000000000 layers"),
            "{msg}"
        );
    }

    #[test]
    fn a_context_of_two_to_the_63_is_refused() {
        let msg = config_with("context", |m| {
            set(m, "llama.context_length", Value::U64(1 << 63))
        });
        assert!(
            msg.contains("llama.context_length") && msg.contains("at most"),
            "{msg}"
        );
    }
}
