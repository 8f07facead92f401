//! The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2/2.5 and GLM-4 are one
//! computation with flags (qkv bias, rope scaling, partial and interleaved
//! rotary, tied embeddings, sliding window, grouped-query attention), all
//! read from `config.json` or GGUF metadata.
//!
//! Per layer: rmsnorm → q, k, v → rope → attention over the cache → output
//! projection → residual → rmsnorm → SwiGLU → residual. Then the final norm
//! and the classifier. Activations are f32; weights stay in their load dtype.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use rayon::prelude::*;

use crate::attention::{
    attend_group, attend_part, first_position, merge, parts, slot_len, CacheView, Head, KvSlice,
};
use crate::cache::{KvCache, KvDtype};
use crate::config::{rope_inv_freq, ModelConfig};
use crate::error::ModelError;
use crate::ffn::{Ffn, Mlp, Moe};
use crate::gguf::GgufFile;
use crate::linear::{Linear, Weight};
use crate::loader::{GgufSource, SafetensorsSource, TensorSource};
use crate::weights::Weights;

/// q, k and v projections stacked into one matrix (one pass over the input).
struct Attention {
    qkv: Linear,
    o: Linear,
    /// Weights of the per-head RMS norms of queries and keys (Qwen3).
    qk_norm: Option<(Vec<f32>, Vec<f32>)>,
}

struct Layer {
    attn_norm: Vec<f32>,
    attn: Attention,
    mlp_norm: Vec<f32>,
    ffn: Ffn,
    /// Norms of the attention's and the feed-forward's outputs (GLM-4-0414).
    post_norms: Option<(Vec<f32>, Vec<f32>)>,
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
    embed: Weight,
    layers: Vec<Layer>,
    norm: Vec<f32>,
    lm_head: Linear,
    inv_freq: Vec<f32>,
    /// The sliding-window layers' frequencies, where their rotary base
    /// differs (Gemma 3).
    inv_freq_local: Option<Vec<f32>>,
    weight_dtype: DType,
    kv_dtype: KvDtype,
}

impl Llama {
    /// Loads a model directory's `config.json` and weights; weights are held
    /// in `weight_dtype` (f32, f16 or bf16), activations are computed in f32.
    pub fn load_dir(dir: &Path, weight_dtype: DType) -> Result<Self, ModelError> {
        let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
        let weights = Weights::for_config(dir, &cfg)?;
        Self::load(cfg, &weights, weight_dtype)
    }

    /// A safetensors checkpoint held in `weight_dtype`.
    pub fn load(cfg: ModelConfig, w: &Weights, weight_dtype: DType) -> Result<Self, ModelError> {
        let src = SafetensorsSource {
            weights: w,
            dtype: weight_dtype,
            quantize: None,
        };
        Self::load_from(cfg, &src, weight_dtype)
    }

    /// A GGUF file: config from its metadata, tensors in the file's formats.
    pub fn load_gguf(file: &GgufFile) -> Result<Self, ModelError> {
        Self::load_gguf_adapted(file, None)
    }

    /// A GGUF file with a LoRA adapter applied to the matrices it names
    /// (see [`crate::lora`]).
    pub fn load_gguf_adapted(
        file: &GgufFile,
        adapter: Option<&crate::lora::Adapter>,
    ) -> Result<Self, ModelError> {
        let cfg = crate::gguf_model::config(file)?;
        let src = GgufSource { file };
        let Some(adapter) = adapter else {
            return Self::load_from(cfg, &src, DType::F32);
        };
        let mut lora = crate::lora::LoraSource::new(&src, adapter);
        // llama.cpp's converter stores Llama-architecture q and k rows in
        // adjacent pairs.
        if crate::gguf_model::gguf_architecture(&cfg) == "llama" && cfg.rope_interleaved {
            lora = lora.with_pairs_layout(cfg.num_heads, cfg.num_kv_heads);
        }
        Self::load_through(cfg, &lora, DType::F32)
    }

    /// Builds the model from `w` with `adapter` applied; an error names the
    /// adapter's matrices the model does not have.
    pub fn load_adapted(
        cfg: ModelConfig,
        w: &dyn TensorSource,
        adapter: &crate::lora::Adapter,
        weight_dtype: DType,
    ) -> Result<Self, ModelError> {
        Self::load_through(cfg, &crate::lora::LoraSource::new(w, adapter), weight_dtype)
    }

    /// Builds the model through `lora`, then checks that every matrix the
    /// adapter names was one of the model's.
    fn load_through(
        cfg: ModelConfig,
        lora: &crate::lora::LoraSource,
        weight_dtype: DType,
    ) -> Result<Self, ModelError> {
        let model = Self::load_from(cfg, lora, weight_dtype)?;
        lora.adapter.check_applied(&lora.applied())?;
        Ok(model)
    }

    /// Builds the model from any tensor source.
    pub fn load_from(
        cfg: ModelConfig,
        w: &dyn TensorSource,
        weight_dtype: DType,
    ) -> Result<Self, ModelError> {
        let (h, i, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.head_dim);
        let (nq, nkv) = (cfg.num_heads * hd, cfg.num_kv_heads * hd);
        // Projections that read the same input are stacked: [q; k; v] and [gate; up].
        let linear = |names: &[String], outs: &[usize], inp: usize, bias: bool| {
            let weights: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
            let wn: Vec<&str> = weights.iter().map(String::as_str).collect();
            let parts = w.matrices(&wn, outs, inp)?;
            let bias = if bias {
                let biases: Vec<String> = names.iter().map(|n| format!("{n}.bias")).collect();
                let bn: Vec<&str> = biases.iter().map(String::as_str).collect();
                Some(w.vector(&bn, outs)?)
            } else {
                None
            };
            Ok::<_, ModelError>(Linear::from_parts(parts, bias))
        };
        // Gemma's norms scale by `1 + w`: the offset is added once here.
        let norm_of = |name: String, len: usize| -> Result<Vec<f32>, ModelError> {
            let mut v = w
                .vector(&[&name], &[len])?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            if cfg.norm_offset != 0.0 {
                v.iter_mut().for_each(|x| *x += cfg.norm_offset);
            }
            Ok(v)
        };
        let norm = |name: String| norm_of(name, h);
        let mut embed = w.matrices(&["model.embed_tokens.weight"], &[cfg.vocab_size], h)?;
        let embed = embed.remove(0);
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("model.layers.{l}");
            let a = |m: &str| format!("{p}.self_attn.{m}");
            // Fused q/k/v (ChatGLM, llama.cpp's attn_qkv) or separate.
            let qkv = if w.contains(&format!("{}.weight", a("qkv_proj"))) {
                linear(&[a("qkv_proj")], &[nq + 2 * nkv], h, cfg.qkv_bias)?
            } else {
                linear(
                    &[a("q_proj"), a("k_proj"), a("v_proj")],
                    &[nq, nkv, nkv],
                    h,
                    cfg.qkv_bias,
                )?
            };
            let ffn = match &cfg.moe {
                Some(moe) if moe.layers[l] => Ffn::Experts(experts(w, &cfg, moe, &p)?),
                _ => {
                    let m = |m: &str| format!("{p}.mlp.{m}");
                    // GLM-4 stores gate and up as one matrix, gate rows first.
                    // GLM-4 and Phi-3 store gate and up as one matrix, gate
                    // rows first.
                    let gate_up = if matches!(cfg.model_type.as_str(), "glm" | "glm4" | "phi3") {
                        linear(&[m("gate_up_proj")], &[2 * i], h, cfg.mlp_bias)?
                    } else {
                        linear(&[m("gate_proj"), m("up_proj")], &[i, i], h, cfg.mlp_bias)?
                    };
                    Ffn::Dense(Mlp {
                        gate_up,
                        down: linear(&[m("down_proj")], &[h], i, cfg.mlp_bias)?,
                        intermediate: i,
                        gate: cfg.gate,
                    })
                }
            };
            layers.push(Layer {
                attn_norm: norm(format!("{p}.input_layernorm.weight"))?,
                attn: Attention {
                    qkv,
                    o: linear(&[a("o_proj")], &[h], nq, cfg.o_bias)?,
                    qk_norm: if cfg.qk_norm {
                        Some((
                            norm_of(format!("{}.weight", a("q_norm")), hd)?,
                            norm_of(format!("{}.weight", a("k_norm")), hd)?,
                        ))
                    } else {
                        None
                    },
                },
                mlp_norm: norm(format!("{p}.post_attention_layernorm.weight"))?,
                ffn,
                post_norms: if cfg.post_norms {
                    Some((
                        norm(format!("{p}.post_self_attn_layernorm.weight"))?,
                        norm(format!("{p}.post_mlp_layernorm.weight"))?,
                    ))
                } else {
                    None
                },
                window: cfg.sliding_window[l],
            });
        }
        let norm = norm("model.norm.weight".into())?;
        // Some tied checkpoints still ship lm_head.weight; untied ones must.
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            Linear::from_parts(vec![embed.clone()], None)
        } else {
            linear(&["lm_head".into()], &[cfg.vocab_size], h, false)?
        };
        Ok(Llama {
            inv_freq: rope_inv_freq(&cfg),
            inv_freq_local: cfg.local_rope_theta.map(|theta| {
                rope_inv_freq(&ModelConfig {
                    rope_theta: theta,
                    rope_scaling: None,
                    ..cfg.clone()
                })
            }),
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            weight_dtype,
            kv_dtype: KvDtype::F32,
        })
    }

    /// Bytes of KV cache one position takes (keys and values, all layers).
    pub fn kv_bytes_per_token(&self) -> usize {
        let numbers = self.cfg.num_kv_heads * self.cfg.head_dim;
        2 * self.cfg.num_layers * self.kv_dtype.bytes(numbers)
    }

    /// Bytes of KV cache a sequence of `positions` positions takes, sliding
    /// layers holding only their window.
    pub fn kv_bytes_for(&self, positions: usize) -> usize {
        self.new_cache().bytes_for(positions)
    }

    /// The format new caches hold keys and values in. Q8_0 needs a head
    /// size that is a multiple of 32.
    pub fn set_kv_dtype(&mut self, dtype: KvDtype) -> Result<(), ModelError> {
        if !dtype.holds_head_dim(self.cfg.head_dim) {
            return Err(ModelError::KvFormat {
                format: dtype.name(),
                head_dim: self.cfg.head_dim,
            });
        }
        self.kv_dtype = dtype;
        Ok(())
    }

    /// Fits the rotary scaling to a context of `positions` (LongRoPE's
    /// long factors beyond its pretrained context, its short ones within);
    /// call it before the first step.
    pub fn fit_context(&mut self, positions: usize) {
        crate::config::fit_rope_to_context(&mut self.cfg.rope_scaling, positions);
        self.inv_freq = rope_inv_freq(&self.cfg);
    }

    pub fn kv_dtype(&self) -> KvDtype {
        self.kv_dtype
    }

    /// Whether any matrix is quantized (its products then run the
    /// quantized kernels, [`crate::kernels::Isa`]).
    pub fn has_quantized_weights(&self) -> bool {
        self.linears()
            .any(|l| l.parts().iter().any(|p| matches!(p, Weight::Quant(_))))
    }

    /// The formats the weight matrices are held in, most bytes first, e.g.
    /// `Q4_K 78%, Q6_K 22%` or `BF16`.
    pub fn weight_format(&self) -> String {
        let mut by: Vec<(String, usize)> = Vec::new();
        let mut add = |l: &Linear| {
            for p in l.parts() {
                let name = match p {
                    Weight::Dense(t) => format!("{:?}", t.dtype()).to_uppercase(),
                    Weight::Quant(q) => q.qtype().name().to_string(),
                };
                match by.iter_mut().find(|(n, _)| *n == name) {
                    Some(e) => e.1 += p.size_bytes(),
                    None => by.push((name, p.size_bytes())),
                }
            }
        };
        self.linears().for_each(&mut add);
        by.sort_by_key(|b| std::cmp::Reverse(b.1));
        let total: usize = by.iter().map(|b| b.1).sum::<usize>().max(1);
        if by.len() == 1 {
            return by.remove(0).0;
        }
        by.iter()
            .map(|(n, b)| format!("{n} {:.0}%", 100.0 * *b as f64 / total as f64))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bytes of weights read per decoded token (every matrix once; the
    /// embedding row is negligible).
    pub fn weight_bytes_per_token(&self) -> usize {
        let attention: usize = self
            .layers
            .iter()
            .map(|l| l.attn.qkv.size_bytes() + l.attn.o.size_bytes() + l.ffn.bytes_per_token())
            .sum();
        attention + self.lm_head.size_bytes()
    }

    /// Every weight matrix (all experts'), the classifier last.
    fn linears(&self) -> impl Iterator<Item = &Linear> {
        self.layers
            .iter()
            .flat_map(|l| [&l.attn.qkv, &l.attn.o].into_iter().chain(l.ffn.linears()))
            .chain(std::iter::once(&self.lm_head))
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
        KvCache::with_dtype(
            self.cfg.num_layers,
            self.cfg.num_kv_heads,
            self.cfg.head_dim,
            self.context_length(),
            self.kv_dtype,
        )
        .with_windows(&self.cfg.sliding_window, crate::cache::SLIDING_SLACK)
    }

    /// Runs `tokens` after the positions already in `cache`, appends their keys
    /// and values to it, and returns logits `[positions, vocab]` (f32).
    pub fn forward(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
    ) -> Result<Tensor, ModelError> {
        let mut out = Vec::new();
        let rows = self.forward_into(tokens, cache, logits, &mut out)?;
        Ok(Tensor::from_vec(
            out,
            (rows, self.cfg.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// [`Llama::forward`] into `out` (`[rows, vocab]`, its room reused):
    /// returns the number of rows. A decode step on buffers that have
    /// grown allocates nothing.
    pub fn forward_into(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<usize, ModelError> {
        let n = tokens.len();
        self.step(tokens, &mut [(cache, n)], logits, out)
    }

    /// One decoding step for several sequences at once: `tokens[i]` follows
    /// the positions in `caches[i]`. Returns logits `[sequences, vocab]`.
    /// Every weight matrix is read once for the whole batch, and each row's
    /// result is bit-for-bit what [`Llama::forward`] gives that sequence alone.
    pub fn forward_batch(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
    ) -> Result<Tensor, ModelError> {
        let mut out = Vec::new();
        self.forward_batch_into(tokens, caches, &mut out)?;
        Ok(Tensor::from_vec(
            out,
            (tokens.len(), self.cfg.vocab_size),
            &Device::Cpu,
        )?)
    }

    /// [`Llama::forward_batch`] into `out` (`[sequences, vocab]`, its room
    /// reused).
    pub fn forward_batch_into(
        &self,
        tokens: &[u32],
        caches: &mut [&mut KvCache],
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        if tokens.len() != caches.len() {
            return Err(candle_core::Error::Msg(format!(
                "forward_batch: {} tokens for {} sequences",
                tokens.len(),
                caches.len()
            ))
            .into());
        }
        if let [cache] = caches {
            // One sequence: no list of them to build.
            self.step(tokens, &mut [(&mut **cache, 1)], Logits::Last, out)?;
            return Ok(());
        }
        let mut seqs: Vec<(&mut KvCache, usize)> =
            caches.iter_mut().map(|c| (&mut **c, 1)).collect();
        self.step(tokens, &mut seqs, Logits::Last, out)?;
        Ok(())
    }

    /// The forward pass over rows that belong to one or more sequences:
    /// `seqs[s].1` consecutive rows of `tokens` extend `seqs[s].0`. With
    /// `Logits::Last`, one row of logits per sequence. The logits go to
    /// `out`; returns their number of rows.
    fn step(
        &self,
        tokens: &[u32],
        seqs: &mut [(&mut KvCache, usize)],
        logits: Logits,
        out: &mut Vec<f32>,
    ) -> Result<usize, ModelError> {
        crate::on_pool(|| self.step_on_pool(tokens, seqs, logits, out, None))
    }

    /// The residual stream of `tokens` (run after the positions in `cache`,
    /// whose keys and values they join): the embeddings, then each layer's
    /// output, each `[tokens, hidden]` row-major (before the final norm).
    /// What a probe reads.
    pub fn hidden_states(
        &self,
        tokens: &[u32],
        cache: &mut KvCache,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        let n = tokens.len();
        let mut captured = Vec::new();
        let mut out = Vec::new();
        crate::on_pool(|| {
            self.step_on_pool(
                tokens,
                &mut [(cache, n)],
                Logits::Last,
                &mut out,
                Some(&mut captured),
            )
        })?;
        let size = n * self.cfg.hidden_size;
        Ok(captured.chunks_exact(size).map(<[f32]>::to_vec).collect())
    }

    fn step_on_pool(
        &self,
        tokens: &[u32],
        seqs: &mut [(&mut KvCache, usize)],
        logits: Logits,
        out: &mut Vec<f32>,
        capture: Option<&mut Vec<f32>>,
    ) -> Result<usize, ModelError> {
        let n = tokens.len();
        if n == 0 || seqs.iter().any(|(_, c)| *c == 0) {
            return Err(candle_core::Error::Msg("forward: no tokens".into()).into());
        }
        if seqs.iter().map(|(_, c)| c).sum::<usize>() != n {
            return Err(candle_core::Error::Msg("forward: rows do not add up".into()).into());
        }
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= self.cfg.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: self.cfg.vocab_size,
            });
        }
        for (cache, count) in seqs.iter_mut() {
            let needed = cache.len() + *count;
            if needed > self.context_length() {
                return Err(ModelError::ContextFull {
                    needed,
                    limit: self.context_length(),
                });
            }
            cache.reserve(needed);
        }
        crate::pool::with_local(&SCRATCH, |s| {
            // Which sequence and position each row is.
            let mut rows = std::mem::take(&mut s.rows);
            rows.clear();
            for (i, (cache, count)) in seqs.iter().enumerate() {
                rows.extend((cache.len()..cache.len() + count).map(|p| (i, p)));
            }
            let done = self.layers_over(tokens, seqs, &rows, s, capture);
            s.rows = rows;
            done?;
            self.classify(seqs, logits, s, out)
        })
    }

    /// Every layer over the step's rows (`rows[r]`: sequence and position of
    /// row `r`), leaving the residual stream in `s.x`; with `capture`, the
    /// stream is appended there after the embeddings and after each layer.
    fn layers_over(
        &self,
        tokens: &[u32],
        seqs: &mut [(&mut KvCache, usize)],
        rows: &[(usize, usize)],
        s: &mut Scratch,
        mut capture: Option<&mut Vec<f32>>,
    ) -> Result<(), ModelError> {
        let n = tokens.len();
        let cfg = &self.cfg;
        let eps = cfg.rms_norm_eps as f32;
        let positions = || rows.iter().map(|&(_, p)| p);
        self.rope_tables(positions(), &self.inv_freq, &mut s.cos, &mut s.sin);
        if let Some(local) = &self.inv_freq_local {
            self.rope_tables(positions(), local, &mut s.cos_local, &mut s.sin_local);
        }
        self.embed_rows(tokens, sized(&mut s.x, n * cfg.hidden_size))?;
        if let Some(c) = capture.as_deref_mut() {
            c.extend_from_slice(&s.x);
        }
        for (l, layer) in self.layers.iter().enumerate() {
            rms_norm(&s.x, &layer.attn_norm, eps, sized(&mut s.h, s.x.len()));
            layer.attn.qkv.forward_into(&s.h, n, &mut s.qkv)?;
            // Gemma 3's sliding layers rotate with their own base.
            let tables = match (&self.inv_freq_local, layer.window) {
                (Some(_), Some(_)) => (&s.cos_local[..], &s.sin_local[..]),
                _ => (&s.cos[..], &s.sin[..]),
            };
            self.rope_and_store(l, &mut s.qkv, tables, rows, seqs);
            self.attend(l, layer, &s.qkv, rows, seqs, &mut s.attn);
            layer.attn.o.forward_into(&s.attn, n, &mut s.proj)?;
            if let Some((after_attn, _)) = &layer.post_norms {
                rms_norm_in_place(&mut s.proj, after_attn, eps);
            }
            add(&mut s.x, &s.proj);
            rms_norm(&s.x, &layer.mlp_norm, eps, sized(&mut s.h, s.x.len()));
            layer.ffn.forward(&s.h, n, &mut s.proj, &mut s.ffn)?;
            if let Some((_, after_ffn)) = &layer.post_norms {
                rms_norm_in_place(&mut s.proj, after_ffn, eps);
            }
            add(&mut s.x, &s.proj);
            if let Some(c) = capture.as_deref_mut() {
                c.extend_from_slice(&s.x);
            }
        }
        for (cache, count) in seqs.iter_mut() {
            cache.advance(*count);
        }
        Ok(())
    }

    /// Rotary embedding of the step's queries and keys (`qkv`, `[rows,
    /// (heads + 2 · kv heads) · head_dim]`), each head normalised first
    /// where the layer has query and key norms, and the keys and values
    /// written to each row's cache at layer `l`.
    fn rope_and_store(
        &self,
        l: usize,
        qkv: &mut [f32],
        (cos, sin): (&[f32], &[f32]),
        rows: &[(usize, usize)],
        seqs: &mut [(&mut KvCache, usize)],
    ) {
        let cfg = &self.cfg;
        let (hd, nh, nkv) = (cfg.head_dim, cfg.num_heads, cfg.num_kv_heads);
        let half = self.inv_freq.len();
        let eps = cfg.rms_norm_eps as f32;
        for (r, row) in qkv.chunks_mut((nh + 2 * nkv) * hd).enumerate() {
            let (c, s) = (
                &cos[r * half..(r + 1) * half],
                &sin[r * half..(r + 1) * half],
            );
            if let Some((qn, kn)) = &self.layers[l].attn.qk_norm {
                let (q, k) = row[..(nh + nkv) * hd].split_at_mut(nh * hd);
                rms_norm_in_place(q, qn, eps);
                rms_norm_in_place(k, kn, eps);
            }
            for head in row[..(nh + nkv) * hd].chunks_mut(hd) {
                if cfg.rope_interleaved {
                    rope_pairs(&mut head[..cfg.rotary_dim], c, s);
                } else {
                    rope(&mut head[..cfg.rotary_dim], c, s);
                }
            }
            // Attention divides scores by √head_dim; a model with its own
            // scale has its queries rescaled to give that instead.
            if let Some(scale) = cfg.attention_scale {
                let q_scale = scale * (hd as f32).sqrt();
                row[..nh * hd].iter_mut().for_each(|v| *v *= q_scale);
            }
            let (seq, pos) = rows[r];
            let kv = &row[nh * hd..];
            seqs[seq].0.write(l, pos, &kv[..nkv * hd], &kv[nkv * hd..]);
        }
    }

    /// Attention of every row's query heads over its sequence's cache at
    /// layer `l` (the row's own position included), into `out` (`[rows,
    /// heads · head_dim]`). One task per (row, kv head): its query heads
    /// read each cached key and value once.
    fn attend(
        &self,
        l: usize,
        layer: &Layer,
        qkv: &[f32],
        rows: &[(usize, usize)],
        seqs: &[(&mut KvCache, usize)],
        out: &mut Vec<f32>,
    ) {
        let cfg = &self.cfg;
        let (hd, nh, nkv, group) = (
            cfg.head_dim,
            cfg.num_heads,
            cfg.num_kv_heads,
            cfg.group_size(),
        );
        let width = (nh + 2 * nkv) * hd;
        let head = Head {
            dim: hd,
            softcap: cfg.attn_softcap,
        };
        // Many rows of one sequence read its cache widened once (prefill).
        let wide: Vec<Option<WideLayer>> = if rows.len() >= WideLayer::MIN_ROWS {
            seqs.iter()
                .map(|(c, count)| WideLayer::new(c, l, c.len() + count, *count, (nkv, hd)))
                .collect()
        } else {
            Vec::new()
        };
        let out = sized(out, rows.len() * nh * hd);
        let view_of = |r: usize| {
            let (seq, pos) = rows[r];
            match wide.get(seq) {
                Some(Some(w)) => w.view(pos + 1),
                _ => seqs[seq].0.view(l, pos + 1),
            }
        };
        let q_of = |r: usize, kv: usize| {
            let q0 = r * width + kv * group * hd;
            &qkv[q0..q0 + group * hd]
        };
        // Few rows (decode): each (row, kv head) is also split into its
        // parts, so that a long cache is read by every thread even where the
        // kv heads are fewer than the threads; the parts are then merged.
        // The same parts and merge as inside `attend_group`: the same bits.
        let split = rows.len() * nkv < Self::SPLIT_BELOW
            && rows.iter().any(|&(_, pos)| {
                parts(first_position(pos + 1, layer.window), pos + 1)
                    .nth(1)
                    .is_some()
            });
        if !split {
            crate::pool::for_each_chunk(out, group * hd, |i, o| {
                let (r, kv) = (i / nkv, i % nkv);
                attend_group(q_of(r, kv), &view_of(r), kv, head, layer.window, o);
            });
            return;
        }
        let slot = slot_len(group, hd);
        crate::pool::with_local(&PART_WORK, |w: &mut PartWork| {
            w.tasks.clear();
            w.first.clear();
            w.first.push(0);
            for i in 0..rows.len() * nkv {
                let (r, kv) = (i / nkv, i % nkv);
                let len = rows[r].1 + 1;
                let each = parts(first_position(len, layer.window), len);
                w.tasks.extend(each.map(|p| (r, kv, p)));
                w.first.push(w.tasks.len());
            }
            w.slots.resize(w.tasks.len() * slot, 0.0);
            let tasks = &w.tasks;
            crate::pool::for_each_chunk(&mut w.slots[..], slot, |t, o| {
                let (r, kv, ref part) = tasks[t];
                let (o, stats) = o.split_at_mut(group * hd);
                attend_part(q_of(r, kv), &view_of(r), kv, head, part.clone(), o, stats);
            });
            // Each (row, kv head)'s parts lie together, in order.
            let (slots, first) = (&w.slots[..], &w.first);
            crate::pool::for_each_chunk(out, group * hd, |i, o| {
                merge(&slots[first[i] * slot..first[i + 1] * slot], hd, o);
            });
        });
    }

    /// Below this many (row, kv head) attention tasks in a step, each is
    /// split into its parts across the threads.
    const SPLIT_BELOW: usize = 64;

    /// The final norm and the classifier over the residual stream `s.x`:
    /// logits of every row, or of each sequence's last.
    fn classify(
        &self,
        seqs: &[(&mut KvCache, usize)],
        logits: Logits,
        s: &mut Scratch,
        out: &mut Vec<f32>,
    ) -> Result<usize, ModelError> {
        let h = self.cfg.hidden_size;
        let x: &[f32] = if logits == Logits::Last && seqs.len() * h != s.x.len() {
            let last = sized(&mut s.h, seqs.len() * h);
            let mut end = 0;
            for ((_, count), o) in seqs.iter().zip(last.chunks_mut(h)) {
                end += count;
                o.copy_from_slice(&s.x[(end - 1) * h..end * h]);
            }
            last
        } else {
            &s.x
        };
        let rows = x.len() / h;
        let normed = sized(&mut s.proj, x.len());
        rms_norm(x, &self.norm, self.cfg.rms_norm_eps as f32, normed);
        self.lm_head.forward_into(normed, rows, out)?;
        if let Some(cap) = self.cfg.final_softcap {
            out.iter_mut().for_each(|v| *v = cap * (*v / cap).tanh());
        }
        Ok(rows)
    }

    /// Embedding rows of `tokens` into `out` (`[n, hidden]`).
    fn embed_rows(&self, tokens: &[u32], out: &mut [f32]) -> Result<(), ModelError> {
        let h = self.cfg.hidden_size;
        // Gemma scales its embeddings by √hidden (rounded to f32 first).
        let scale = (h as f32).sqrt();
        for (row, &t) in out.chunks_mut(h).zip(tokens) {
            self.embed.row_into(t as usize, row)?;
            if self.cfg.embed_scale {
                row.iter_mut().for_each(|v| *v *= scale);
            }
        }
        Ok(())
    }

    /// cos and sin of (position × inverse frequency), `[rows, head_dim / 2]`.
    fn rope_tables(
        &self,
        positions: impl Iterator<Item = usize>,
        inv_freq: &[f32],
        cos: &mut Vec<f32>,
        sin: &mut Vec<f32>,
    ) {
        cos.clear();
        sin.clear();
        // LongRoPE scales cos and sin (so queries and keys) by its factor.
        let m = self
            .cfg
            .rope_scaling
            .as_ref()
            .map_or(1.0, |r| r.attention_factor());
        for p in positions {
            for &f in inv_freq {
                // × 1.0 is exact: other models keep their bits.
                let angle = p as f32 * f;
                cos.push(angle.cos() * m);
                sin.push(angle.sin() * m);
            }
        }
    }
}

/// The activations of a step, kept per thread and reused: once they have
/// grown to a step's size, later steps (every decoded token) allocate
/// nothing here.
#[derive(Default)]
struct Scratch {
    /// The residual stream, `[rows, hidden]`.
    x: Vec<f32>,
    /// A normed copy of it (the projections' input).
    h: Vec<f32>,
    qkv: Vec<f32>,
    /// Attention's output, `[rows, heads · head_dim]`.
    attn: Vec<f32>,
    /// The output projection's or the feed-forward's result.
    proj: Vec<f32>,
    ffn: crate::ffn::Buffers,
    cos: Vec<f32>,
    sin: Vec<f32>,
    /// The sliding-window layers' tables, where their base differs.
    cos_local: Vec<f32>,
    sin_local: Vec<f32>,
    /// Sequence and position of each row.
    rows: Vec<(usize, usize)>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::default();
    /// A step's split attention, kept per thread.
    static PART_WORK: std::cell::RefCell<PartWork> = std::cell::RefCell::default();
}

/// The tasks of a step's split attention (row, kv head, part), where each
/// (row, kv head)'s parts begin among them, and their results before they
/// are merged.
#[derive(Default)]
struct PartWork {
    tasks: Vec<(usize, usize, std::ops::Range<usize>)>,
    first: Vec<usize>,
    slots: Vec<f32>,
}

/// The router and experts of layer `p` (`model.layers.N`): each expert's
/// matrices by their own names (checkpoints on the hub; Mixtral's `w1`,
/// `w3`, `w2` under `block_sparse_moe`), or all experts' in one tensor per
/// projection (GGUF's `ffn_*_exps`).
fn experts(
    w: &dyn TensorSource,
    cfg: &ModelConfig,
    moe: &crate::config::MoeConfig,
    p: &str,
) -> Result<Moe, ModelError> {
    let (h, mi, n) = (cfg.hidden_size, moe.intermediate, moe.experts);
    let (block, gate, up, down) = if w.contains(&format!("{p}.block_sparse_moe.gate.weight")) {
        ("block_sparse_moe", "w1", "w3", "w2")
    } else {
        ("mlp", "gate_proj", "up_proj", "down_proj")
    };
    let one = |names: &[String], outs: &[usize], inp: usize| {
        let weights: Vec<String> = names.iter().map(|n| format!("{n}.weight")).collect();
        let names: Vec<&str> = weights.iter().map(String::as_str).collect();
        Ok::<_, ModelError>(Linear::from_parts(w.matrices(&names, outs, inp)?, None))
    };
    let router = one(&[format!("{p}.{block}.gate")], &[n], h)?;
    let experts = if w.contains(&format!("{p}.{block}.experts.0.{gate}.weight")) {
        (0..n)
            .map(|e| {
                let x = |k: &str| format!("{p}.{block}.experts.{e}.{k}");
                Ok(Mlp {
                    gate_up: one(&[x(gate), x(up)], &[mi, mi], h)?,
                    down: one(&[x(down)], &[h], mi)?,
                    intermediate: mi,
                    gate: cfg.gate,
                })
            })
            .collect::<Result<Vec<_>, ModelError>>()?
    } else {
        let all = |k: &str, out: usize, inp: usize| {
            w.expert_matrices(&format!("{p}.mlp.experts.{k}.weight"), n, out, inp)
        };
        let (gates, ups, downs) = (
            all("gate_proj", mi, h)?,
            all("up_proj", mi, h)?,
            all("down_proj", h, mi)?,
        );
        gates
            .into_iter()
            .zip(ups)
            .zip(downs)
            .map(|((g, u), d)| Mlp {
                gate_up: Linear::from_parts(vec![g, u], None),
                down: Linear::from_parts(vec![d], None),
                intermediate: mi,
                gate: cfg.gate,
            })
            .collect()
    };
    Ok(Moe {
        router,
        experts,
        active: moe.active,
        normalize: moe.normalize,
    })
}

/// `v` holding `len` values (zeros where it grew), as a slice.
fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    v.resize(len, 0.0);
    v
}

/// `x += y`, element by element.
fn add(x: &mut [f32], y: &[f32]) {
    for (a, b) in x.iter_mut().zip(y) {
        *a += b;
    }
}

/// RMS norm of each row of `x` (rows of `w.len()`), times `w`, into `out`:
/// `x / sqrt(mean(x²) + eps) · w`, the sum of squares in order, as candle's
/// `rms_norm` computes it (so the same bits).
fn rms_norm(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
    let n = w.len();
    for (row, o) in x.chunks_exact(n).zip(out.chunks_exact_mut(n)) {
        let sum2: f32 = row.iter().map(|&v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for ((o, &v), &w) in o.iter_mut().zip(row).zip(w) {
            *o = v / m * w;
        }
    }
}

/// [`rms_norm`] of each `w.len()` values of `x`, in place.
fn rms_norm_in_place(x: &mut [f32], w: &[f32], eps: f32) {
    let n = w.len();
    for row in x.chunks_exact_mut(n) {
        let sum2: f32 = row.iter().map(|&v| v * v).sum();
        let m = (sum2 / n as f32 + eps).sqrt();
        for (v, &w) in row.iter_mut().zip(w) {
            *v = *v / m * w;
        }
    }
}

/// Rotary embedding of one head in place (the halves layout: element `i`
/// pairs with element `i + head_dim / 2`).
fn rope(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    let half = cos.len();
    let (a, b) = head.split_at_mut(half);
    for i in 0..half {
        let (x1, x2) = (a[i], b[i]);
        a[i] = x1 * cos[i] - x2 * sin[i];
        b[i] = x2 * cos[i] + x1 * sin[i];
    }
}

/// Rotary embedding of one head in place, llama.cpp's layout for Llama
/// GGUF files: element `2i` pairs with element `2i + 1`.
fn rope_pairs(head: &mut [f32], cos: &[f32], sin: &[f32]) {
    for (i, pair) in head.chunks_exact_mut(2).enumerate() {
        let (x1, x2) = (pair[0], pair[1]);
        pair[0] = x1 * cos[i] - x2 * sin[i];
        pair[1] = x2 * cos[i] + x1 * sin[i];
    }
}

/// The last row of a `[positions, vocab]` logits tensor.
pub fn last_row(logits: &Tensor) -> Result<Vec<f32>, ModelError> {
    let rows = logits.dim(0)?;
    Ok(logits.get(rows - 1)?.to_vec1::<f32>()?)
}

/// One layer of an f16 or Q8_0 cache widened to f32 for a step of many rows
/// (prefill): each row's attention would otherwise widen every key and value
/// it reads, so a key would be widened once per later row. Widening gives
/// the numbers attention reads from the cache, bit for bit, so attention
/// sums the same numbers either way.
struct WideLayer {
    keys: Vec<f32>,
    values: Vec<f32>,
    /// Positions held per kv head.
    held: usize,
    /// The first position held.
    offset: usize,
}

impl WideLayer {
    /// Rows in a step from which widening once pays.
    const MIN_ROWS: usize = 16;
    /// The most bytes a widened layer may take.
    const MAX_BYTES: usize = 64 << 20;

    /// Layer `layer` of `cache` (`kv_heads` heads of `head_dim`) up to
    /// `len` positions, widened when the cache is not f32, the step has `rows`
    /// rows of this sequence, and the copy stays small.
    fn new(
        cache: &KvCache,
        layer: usize,
        len: usize,
        rows: usize,
        (kv_heads, head_dim): (usize, usize),
    ) -> Option<WideLayer> {
        if rows < Self::MIN_ROWS || 2 * kv_heads * len * head_dim * 4 > Self::MAX_BYTES {
            return None;
        }
        let view = cache.view(layer, len);
        if let KvSlice::F32(_) = view.keys {
            return None;
        }
        // The positions the layer holds: from its offset (a sliding layer's
        // dropped positions) to `len`.
        let held = len - view.offset;
        let widen = |src: KvSlice| {
            let mut out = vec![0f32; kv_heads * held * head_dim];
            out.par_chunks_mut(held * head_dim)
                .enumerate()
                .for_each(|(h, o)| {
                    let at = h * view.capacity * head_dim;
                    src.widen_into(at..at + held * head_dim, o);
                });
            out
        };
        Some(WideLayer {
            keys: widen(view.keys),
            values: widen(view.values),
            held,
            offset: view.offset,
        })
    }

    /// The widened layer with its first `len` positions valid.
    fn view(&self, len: usize) -> CacheView<'_> {
        CacheView {
            keys: KvSlice::F32(&self.keys),
            values: KvSlice::F32(&self.values),
            capacity: self.held,
            offset: self.offset,
            len,
        }
    }
}
