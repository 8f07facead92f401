//! LoRA adapters applied as a model loads (`--lora DIR`): a PEFT adapter
//! directory (`adapter_config.json`, `adapter_model.safetensors`, as `peft`
//! and `longwriter train --lora` write them) adds `scale · B A` to each
//! matrix it names, with `scale = lora_alpha / r` (`/ √r` with
//! `use_rslora`). Matrices stored in a quantized type are dequantized,
//! changed and quantized again in their own type (Q8_0 where that type can
//! only be read here); the others are changed in place. The merged model
//! runs exactly as fast as the base: nothing is added to the forward pass.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use crate::error::ModelError;
use crate::gguf_model::halves_to_pairs;
use crate::linear::Weight;
use crate::loader::TensorSource;
use crate::quant::QMatrix;
use crate::QType;

/// One adapted matrix: `A` (`[rank, in]`) and `B` (`[out, rank]`), f32.
struct Pair {
    a: Vec<f32>,
    b: Vec<f32>,
    rank: usize,
}

/// A LoRA adapter, read from a PEFT directory.
pub struct Adapter {
    dir: PathBuf,
    scale: f32,
    /// By the weight's `transformers` name (`model.layers.0.self_attn.q_proj.weight`).
    pairs: HashMap<String, Pair>,
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`.
    pub fn load(dir: &Path) -> Result<Adapter, ModelError> {
        let cfg_path = dir.join("adapter_config.json");
        let bad = |path: &Path, reason: String| ModelError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| ModelError::io(&cfg_path, e))?;
        let cfg: Value =
            serde_json::from_str(&text).map_err(|e| bad(&cfg_path, format!("not JSON: {e}")))?;
        let number = |k: &str| {
            cfg.get(k)
                .and_then(Value::as_f64)
                .ok_or_else(|| bad(&cfg_path, format!("field `{k}` is missing or not a number")))
        };
        let (rank, alpha) = (number("r")?, number("lora_alpha")?);
        if rank <= 0.0 {
            return Err(bad(
                &cfg_path,
                format!("field `r` is {rank}; it must be positive"),
            ));
        }
        for k in ["rank_pattern", "alpha_pattern"] {
            if cfg
                .get(k)
                .and_then(Value::as_object)
                .is_some_and(|m| !m.is_empty())
            {
                return Err(bad(
                    &cfg_path,
                    format!(
                        "field `{k}` gives modules their own rank or alpha, which is not supported"
                    ),
                ));
            }
        }
        let rslora = cfg
            .get("use_rslora")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        let scale = if rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        } as f32;
        let path = dir.join("adapter_model.safetensors");
        let tensors = candle_core::safetensors::load(&path, &Device::Cpu).map_err(|e| {
            ModelError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            }
        })?;
        let values = |t: &Tensor| -> Result<(Vec<usize>, Vec<f32>), ModelError> {
            Ok((
                t.dims().to_vec(),
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            ))
        };
        let mut pairs = HashMap::new();
        for (name, a) in &tensors {
            let Some(module) = name
                .strip_suffix(".lora_A.weight")
                .map(|m| m.strip_prefix("base_model.model.").unwrap_or(m))
            else {
                continue;
            };
            let b_name = name.replace(".lora_A.weight", ".lora_B.weight");
            let b = tensors
                .get(&b_name)
                .ok_or_else(|| bad(&path, format!("{name} has no {b_name}")))?;
            let ((ad, av), (bd, bv)) = (values(a)?, values(b)?);
            if ad.len() != 2 || bd.len() != 2 || ad[0] != bd[1] {
                return Err(bad(
                    &path,
                    format!(
                        "{name} is {ad:?} and {b_name} is {bd:?}; expected [r, in] and [out, r]"
                    ),
                ));
            }
            pairs.insert(
                format!("{module}.weight"),
                Pair {
                    a: av,
                    b: bv,
                    rank: ad[0],
                },
            );
        }
        if pairs.is_empty() {
            return Err(bad(&path, "no lora_A / lora_B tensor pairs".into()));
        }
        Ok(Adapter {
            dir: dir.to_path_buf(),
            scale,
            pairs,
        })
    }

    /// Matrices the adapter changes.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Fails, naming them, where some of the adapter's matrices are not
    /// among the `applied` ones (the model has no such matrix).
    pub fn check_applied(&self, applied: &[String]) -> Result<(), ModelError> {
        let mut missing: Vec<&String> =
            self.pairs.keys().filter(|n| !applied.contains(n)).collect();
        if missing.is_empty() {
            return Ok(());
        }
        missing.sort();
        let shown: Vec<&str> = missing.iter().take(3).map(|n| n.as_str()).collect();
        Err(ModelError::Config {
            path: self.dir.join("adapter_model.safetensors"),
            reason: format!(
                "{} of its {} adapted matrices are not in this model: {}{}",
                missing.len(),
                self.pairs.len(),
                shown.join(", "),
                if missing.len() > shown.len() {
                    ", …"
                } else {
                    ""
                }
            ),
        })
    }

    /// `scale · B A` for `name` (`[out, inp]`, row-major).
    fn delta(&self, name: &str, out: usize, inp: usize) -> Result<Vec<f32>, ModelError> {
        let p = &self.pairs[name];
        if p.a.len() != p.rank * inp || p.b.len() != out * p.rank {
            return Err(ModelError::Shape {
                name: name.to_string(),
                path: self.dir.join("adapter_model.safetensors"),
                actual: vec![p.b.len() / p.rank.max(1), p.a.len() / p.rank.max(1)],
                expected: vec![out, inp],
            });
        }
        let mut delta = vec![0f32; out * inp];
        for (o, row) in delta.chunks_exact_mut(inp).enumerate() {
            for k in 0..p.rank {
                let s = self.scale * p.b[o * p.rank + k];
                for (w, &a) in row.iter_mut().zip(&p.a[k * inp..(k + 1) * inp]) {
                    *w += s * a;
                }
            }
        }
        Ok(delta)
    }
}

/// A tensor source with an adapter applied to the matrices it names.
pub struct LoraSource<'a> {
    pub inner: &'a dyn TensorSource,
    pub adapter: &'a Adapter,
    applied: RefCell<Vec<String>>,
    /// Query and key heads whose rows the source holds in adjacent pairs
    /// (a Llama-architecture GGUF file); the adapter's rows are in the
    /// halves layout of `transformers` and are reordered to match.
    pairs_layout: Option<(usize, usize)>,
}

impl<'a> LoraSource<'a> {
    pub fn new(inner: &'a dyn TensorSource, adapter: &'a Adapter) -> Self {
        LoraSource {
            inner,
            adapter,
            applied: RefCell::new(Vec::new()),
            pairs_layout: None,
        }
    }

    /// The source holds q and k rows in adjacent pairs (`heads`, `kv_heads`).
    pub fn with_pairs_layout(mut self, heads: usize, kv_heads: usize) -> Self {
        self.pairs_layout = Some((heads, kv_heads));
        self
    }

    /// Names of the matrices changed so far (all of the adapter's, once the
    /// model has loaded, unless it names matrices this model does not have).
    pub fn applied(&self) -> Vec<String> {
        self.applied.borrow().clone()
    }

    /// `w` (rows `first..first + sum(outs)` of the stacked names) with the
    /// adapter's changes for `names`.
    fn changed(
        &self,
        w: Weight,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> Result<Weight, ModelError> {
        if !names.iter().any(|n| self.adapter.pairs.contains_key(*n)) {
            return Ok(w);
        }
        let (mut values, requantize, dtype) = match &w {
            Weight::Dense(t) => (
                t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                None,
                t.dtype(),
            ),
            Weight::Quant(q) => (q.dequantize(), Some(q.qtype()), DType::F32),
        };
        let mut at = 0;
        for (name, &out) in names.iter().zip(outs) {
            if self.adapter.pairs.contains_key(*name) {
                let mut delta = self.adapter.delta(name, out, inp)?;
                match self.pairs_layout {
                    Some((heads, _)) if name.ends_with("self_attn.q_proj.weight") => {
                        delta = halves_to_pairs(&delta, heads, out / heads, inp)
                    }
                    Some((_, kv_heads)) if name.ends_with("self_attn.k_proj.weight") => {
                        delta = halves_to_pairs(&delta, kv_heads, out / kv_heads, inp)
                    }
                    _ => {}
                }
                for (w, d) in values[at * inp..(at + out) * inp].iter_mut().zip(&delta) {
                    *w += d;
                }
                self.applied.borrow_mut().push(name.to_string());
            }
            at += out;
        }
        let rows = at;
        match requantize {
            Some(q) if q.is_quantized() => {
                // Its own type where it can be written here, else Q8_0.
                let target = if q.encodable() { q } else { QType::Q8_0 };
                let target = target.fallback(inp);
                if target.is_quantized() {
                    let m = QMatrix::quantize(target, &values, rows, inp)
                        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", names[0])))?;
                    return Ok(Weight::Quant(m));
                }
                Ok(Weight::Dense(Tensor::from_vec(
                    values,
                    (rows, inp),
                    &Device::Cpu,
                )?))
            }
            _ => Ok(Weight::Dense(
                Tensor::from_vec(values, (rows, inp), &Device::Cpu)?.to_dtype(dtype)?,
            )),
        }
    }
}

impl TensorSource for LoraSource<'_> {
    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }

    fn vector(&self, names: &[&str], lens: &[usize]) -> Result<Tensor, ModelError> {
        self.inner.vector(names, lens)
    }

    fn matrices(
        &self,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        let parts = self.inner.matrices(names, outs, inp)?;
        if parts.len() == names.len() {
            // One part per name.
            return parts
                .into_iter()
                .zip(names.iter().zip(outs))
                .map(|(w, (n, o))| self.changed(w, &[n], &[*o], inp))
                .collect();
        }
        // One matrix for all names, stacked by rows.
        parts
            .into_iter()
            .map(|w| self.changed(w, names, outs, inp))
            .collect()
    }

    fn expert_matrices(
        &self,
        name: &str,
        count: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        self.inner.expert_matrices(name, count, out, inp)
    }
}
