//! The Llama family: Llama 2/3/3.1/3.2, Mistral and Qwen2/2.5 are one
//! computation with flags (qkv bias, rope scaling, tied embeddings, sliding
//! window, grouped-query attention), all read from `config.json`.
//!
//! Per layer: rmsnorm → q, k, v → rope → attention over the cache → output
//! projection → residual → rmsnorm → SwiGLU → residual. Then the final norm
//! and the classifier. Activations are f32; weights stay in their load dtype.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::cache::KvCache;
use crate::config::{rope_inv_freq, ModelConfig};
use crate::error::ModelError;
use crate::linear::Linear;
use crate::weights::Weights;

/// q, k and v projections stacked into one matrix (one pass over the input).
struct Attention {
    qkv: Linear,
    o: Linear,
}

/// gate and up projections stacked into one matrix.
struct Mlp {
    gate_up: Linear,
    down: Linear,
}

struct Layer {
    attn_norm: Tensor,
    attn: Attention,
    mlp_norm: Tensor,
    mlp: Mlp,
    window: Option<usize>,
}

/// Which positions the caller wants logits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// Only the last position (generation).
    Last,
    /// Every input position (scoring, tests).
    All,
}

pub struct Llama {
    cfg: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    weight_dtype: DType,
}

impl Llama {
    /// Loads a model directory's `config.json` and weights; weights are held
    /// in `weight_dtype` (f32, f16 or bf16), activations are computed in f32.
    pub fn load_dir(dir: &Path, weight_dtype: DType) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::from_dir(dir)?;
        Self::load(cfg, &weights, weight_dtype)
    }

    pub fn load(cfg: ModelConfig, w: &Weights, weight_dtype: DType) -> Result<Self, ModelError> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        let linear =
            |name: &str, out: usize, inp: usize, bias: bool| -> Result<Linear, ModelError> {
                let weight = w.get(&format!("{name}.weight"), &[out, inp], weight_dtype)?;
                let bias = if bias {
                    Some(w.get(&format!("{name}.bias"), &[out], DType::F32)?)
                } else {
                    None
                };
                Ok(Linear::new(weight, bias))
            };
        // Stacks projections that read the same input: [q; k; v] and [gate; up].
        let stacked = |names: &[&str],
                       outs: &[usize],
                       inp: usize,
                       bias: bool|
         -> Result<Linear, ModelError> {
            let wn: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
            let shapes: Vec<[usize; 2]> = outs.iter().map(|&o| [o, inp]).collect();
            let parts: Vec<(&str, &[usize])> = wn
                .iter()
                .zip(&shapes)
                .map(|(n, s)| (n.as_str(), &s[..]))
                .collect();
            let weight = w.get_stacked(&parts, weight_dtype)?;
            let bias = if bias {
                let bn: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
                let shapes: Vec<[usize; 1]> = outs.iter().map(|&o| [o]).collect();
                let parts: Vec<(&str, &[usize])> = bn
                    .iter()
                    .zip(&shapes)
                    .map(|(n, s)| (n.as_str(), &s[..]))
                    .collect();
                Some(w.get_stacked(&parts, DType::F32)?)
            } else {
                None
            };
            Ok(Linear::new(weight, bias))
        };
        let embed = w.get(
            "model.embed_tokens.weight",
            &[cfg.vocab_size, h],
            weight_dtype,
        )?;
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            layers.push(Layer {
                attn_norm: w.get(&format!("{p}.input_layernorm.weight"), &[h], DType::F32)?,
                attn: Attention {
                    qkv: stacked(
                        &[
                            &format!("{p}.self_attn.q_proj"),
                            &format!("{p}.self_attn.k_proj"),
                            &format!("{p}.self_attn.v_proj"),
                        ],
                        &[nq, nkv, nkv],
                        h,
                        cfg.qkv_bias,
                    )?,
                    o: linear(&format!("{p}.self_attn.o_proj"), h, nq, cfg.o_bias)?,
                },
                mlp_norm: w.get(
                    &format!("{p}.post_attention_layernorm.weight"),
                    &[h],
                    DType::F32,
                )?,
                mlp: Mlp {
                    gate_up: stacked(
                        &[&format!("{p}.mlp.gate_proj"), &format!("{p}.mlp.up_proj")],
                        &[i, i],
                        h,
                        cfg.mlp_bias,
                    )?,
                    down: linear(&format!("{p}.mlp.down_proj"), h, i, cfg.mlp_bias)?,
                },
                window: cfg.sliding_window[l],
            });
        }
        let norm = w.get("model.norm.weight", &[h], DType::F32)?;
        // Some tied checkpoints still ship lm_head.weight; untied ones must.
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::new(embed.clone(), None)
        } else {
            linear("lm_head", cfg.vocab_size, h, false)?
        };
        Ok(Llama {
            inv_freq: rope_inv_freq(&cfg),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            weight_dtype,
        })
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn weight_dtype(&self) -> DType {
        self.weight_dtype
    }

    /// The longest sequence (prompt + generated) the model takes.
    pub fn context_length(&self) -> usize {
        self.cfg.max_position_embeddings
    }

    /// A cache sized for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.context_length(),
        )
    }

    /// Runs `tokens` after the positions already in `cache`, appends their keys
    /// and values to it, and returns logits `[positions, vocab]` (f32).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor, ModelError> {
        let n = tokens.len();
        if n == 0 {
            return Err(candle_core::Error::Msg("forward: no tokens".into()).into());
        }
        let start = cache.len();
        let needed = start + n;
        if needed > self.context_length() {
            return Err(ModelError::ContextFull {
                needed,
                limit: self.context_length(),
            });
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.cfg.vocab_size,
            });
        }
        let dev = Device::Cpu;
        let ids = Tensor::from_slice(tokens, n, &dev)?;
        let mut x = self.embed.index_select(&ids, 0)?.to_dtype(DType::F32)?;
        let (cos, sin) = self.rope_tables(start, n)?;
        let eps = self.cfg.rms_norm_eps as f32;
        for (l, layer) in self.layers.iter().enumerate() {
            let h = candle_nn::ops::rms_norm(&x, &layer.attn_norm, eps)?;
            let a = self.attention(layer, l, &h, &cos, &sin, cache, start)?;
            x = (x + a)?;
            let h = candle_nn::ops::rms_norm(&x, &layer.mlp_norm, eps)?;
            let m = &layer.mlp;
            let gate_up = m.gate_up.forward(&h)?;
            let inter = self.cfg.intermediate_size;
            let gated = (candle_nn::ops::silu(&gate_up.narrow(1, 0, inter)?)?
                * gate_up.narrow(1, inter, inter)?)?;
            x = (x + m.down.forward(&gated)?)?;
        }
        cache.advance(n);
        if logits == Logits::Last {
            x = x.narrow(0, n - 1, 1)?;
        }
        let x = candle_nn::ops::rms_norm(&x, &self.norm, eps)?;
        self.lm_head.forward(&x)
    }

    /// cos and sin of (position × inverse frequency), `[n, head_dim / 2]`.
    fn rope_tables(&self, start: usize, n: usize) -> Result<(Tensor, Tensor), ModelError> {
        let half = self.inv_freq.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in start..start + n {
            for &f in &self.inv_freq {
                let angle = p as f32 * f;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
        let dev = Device::Cpu;
        Ok((
            Tensor::from_vec(cos, (n, half), &dev)?,
            Tensor::from_vec(sin, (n, half), &dev)?,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        index: usize,
        h: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        cache: &mut KvCache,
        start: usize,
    ) -> Result<Tensor, ModelError> {
        let cfg = &self.cfg;
        let (n, hd) = (h.dim(0)?, cfg.head_dim);
        let (nh, nkv, group) = (cfg.num_heads, cfg.num_kv_heads, cfg.group_size());
        let heads = |t: Tensor, count: usize| -> Result<Tensor, ModelError> {
            Ok(t.reshape((n, count, hd))?
                .transpose(0, 1)?
                .contiguous()?
                .unsqueeze(0)?)
        };
        let qkv = layer.attn.qkv.forward(h)?;
        let q = heads(qkv.narrow(1, 0, nh * hd)?, nh)?;
        let k = heads(qkv.narrow(1, nh * hd, nkv * hd)?, nkv)?;
        let v = heads(qkv.narrow(1, (nh + nkv) * hd, nkv * hd)?, nkv)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?.squeeze(0)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?.squeeze(0)?;
        let (keys, values) = cache.append(index, &k, &v.squeeze(0)?)?;
        let total = start + n;
        if n == 1 {
            // Decoding: straight over the cache buffers.
            let qv = q.flatten_all()?.to_vec1::<f32>()?;
            let out = cache.attend(index, total, &qv, group, layer.window)?;
            return layer
                .attn
                .o
                .forward(&Tensor::from_vec(out, (1, nh * hd), &Device::Cpu)?);
        }
        // Grouped-query: the `group` query heads of one kv head attend together,
        // so keys and values are never copied per query head.
        let q = q.reshape((nkv, group * n, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mut scores = (q.matmul(&keys.t()?)? * scale)?;
        if let Some(mask) = causal_mask(n, start, layer.window)? {
            scores = scores
                .reshape((nkv, group, n, total))?
                .broadcast_add(&mask)?
                .reshape((nkv, group * n, total))?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let out = probs.matmul(&values)?; // [nkv, group * n, hd]
        let out = out
            .reshape((nh, n, hd))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((n, nh * hd))?;
        layer.attn.o.forward(&out)
    }
}

/// Additive mask `[n, start + n]`: query `i` (at position `start + i`) sees key
/// `j` when `j <= start + i` and, with a window, `start + i - j < window`.
/// `None` when nothing is masked (one query, no window in reach).
fn causal_mask(
    n: usize,
    start: usize,
    window: Option<usize>,
) -> Result<Option<Tensor>, ModelError> {
    let total = start + n;
    let windowed = window.is_some_and(|w| total > w);
    if n == 1 && !windowed {
        return Ok(None);
    }
    let mut m = vec![0f32; n * total];
    for i in 0..n {
        let pos = start + i;
        for j in 0..total {
            let future = j > pos;
            let too_old = window.is_some_and(|w| pos - j.min(pos) >= w);
            if future || too_old {
                m[i * total + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Some(Tensor::from_vec(m, (n, total), &Device::Cpu)?))
}

/// The last row of a `[positions, vocab]` logits tensor.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>, ModelError> {
    let rows = logits.dim(0)?;
    Ok(logits.get(rows - 1)?.to_vec1::<f32>()?)
}
