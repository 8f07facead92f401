//! Where the forward pass gets its tensors: safetensors checkpoints (held in
//! f32/f16/bf16, or quantized as they load) and GGUF files (each tensor kept
//! in the file's own format, memory-mapped).
//!
//! Tensors are asked for by their Hugging Face names; a GGUF source maps
//! them to llama.cpp's names ([`gguf_name`]).

use candle_core::{DType, Device, Tensor};

use crate::error::ModelError;
use crate::gguf::GgufFile;
use crate::linear::Weight;
use crate::quant::{dequantize_row, QMatrix, QType};
use crate::weights::Weights;

/// Tensors by Hugging Face name.
pub trait TensorSource {
    fn contains(&self, name: &str) -> bool;

    /// Small tensors (norms, biases) as f32, stacked along the first
    /// dimension when several names are given.
    fn vector(&self, names: &[&str], lens: &[usize]) -> Result<Tensor, ModelError>;

    /// Weight matrices `[outs[i], inp]` stacked by rows: one matrix where the
    /// formats allow it, otherwise one part per name.
    fn matrices(
        &self,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError>;

    /// The `[out, inp]` matrix of each of `count` experts, from one tensor
    /// `[count, out, inp]` (GGUF's `ffn_*_exps`).
    fn expert_matrices(
        &self,
        name: &str,
        count: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError>;
}

/// A safetensors checkpoint, held in `dtype`, or quantized to `quantize`
/// (matrices whose rows are whole blocks of it; the rest stay in `dtype`).
pub struct SafetensorsSource<'a> {
    pub weights: &'a Weights,
    pub dtype: DType,
    pub quantize: Option<QType>,
}

impl TensorSource for SafetensorsSource<'_> {
    fn contains(&self, name: &str) -> bool {
        self.weights.contains(name)
    }

    /// Checkpoints on the hub name each expert's matrices; one tensor for
    /// all experts is read as it is, held in the load dtype.
    fn expert_matrices(
        &self,
        name: &str,
        count: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        let all = self.weights.get(name, &[count, out, inp], self.dtype)?;
        (0..count).map(|e| Ok(Weight::Dense(all.get(e)?))).collect()
    }

    fn vector(&self, names: &[&str], lens: &[usize]) -> Result<Tensor, ModelError> {
        let shapes: Vec<[usize; 1]> = lens.iter().map(|&l| [l]).collect();
        let parts: Vec<(&str, &[usize])> = names
            .iter()
            .zip(&shapes)
            .map(|(n, s)| (*n, &s[..]))
            .collect();
        self.weights.get_stacked(&parts, DType::F32)
    }

    fn matrices(
        &self,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        let shapes: Vec<[usize; 2]> = outs.iter().map(|&o| [o, inp]).collect();
        let parts: Vec<(&str, &[usize])> = names
            .iter()
            .zip(&shapes)
            .map(|(n, s)| (*n, &s[..]))
            .collect();
        // Rows that are not whole blocks take llama-quantize's fallback type.
        match self.quantize.map(|q| q.fallback(inp)) {
            Some(q) if q.is_quantized() => {
                let t = self.weights.get_stacked(&parts, DType::F32)?;
                let rows = outs.iter().sum();
                let values = t.flatten_all()?.to_vec1::<f32>()?;
                drop(t);
                let m = QMatrix::quantize(q, &values, rows, inp)
                    .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", names[0])))?;
                Ok(vec![Weight::Quant(m)])
            }
            _ => Ok(vec![Weight::Dense(
                self.weights.get_stacked(&parts, self.dtype)?,
            )]),
        }
    }
}

/// A GGUF file; tensors keep the file's format.
pub struct GgufSource<'a> {
    pub file: &'a GgufFile,
}

impl GgufSource<'_> {
    fn info(&self, hf: &str, shape: &[usize]) -> Result<&crate::gguf::TensorInfo, ModelError> {
        let name = gguf_name(hf).unwrap_or_else(|| hf.to_string());
        let info = self
            .file
            .tensor(&name)
            .ok_or_else(|| ModelError::MissingTensor {
                name: name.clone(),
                files: self.file.path().display().to_string(),
            })?;
        if info.shape != shape {
            return Err(ModelError::Shape {
                name,
                path: self.file.path().to_path_buf(),
                actual: info.shape.clone(),
                expected: shape.to_vec(),
            });
        }
        Ok(info)
    }
}

impl TensorSource for GgufSource<'_> {
    fn expert_matrices(
        &self,
        name: &str,
        count: usize,
        out: usize,
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        let info = self.info(name, &[count, out, inp])?;
        let bytes = self.file.data(info);
        let each = info.qtype.row_bytes(inp) * out;
        (0..count)
            .map(|e| weight(info, bytes.part(e * each, each), out, inp))
            .collect()
    }

    fn contains(&self, name: &str) -> bool {
        let n = gguf_name(name).unwrap_or_else(|| name.to_string());
        self.file.tensor(&n).is_some()
    }

    fn vector(&self, names: &[&str], lens: &[usize]) -> Result<Tensor, ModelError> {
        let mut values = Vec::new();
        for (name, &len) in names.iter().zip(lens) {
            let info = self.info(name, &[len])?;
            let mut v = vec![0f32; len];
            dequantize_row(info.qtype, self.file.data(info).as_slice(), &mut v);
            values.extend(v);
        }
        let n = values.len();
        Ok(Tensor::from_vec(values, n, &Device::Cpu)?)
    }

    fn matrices(
        &self,
        names: &[&str],
        outs: &[usize],
        inp: usize,
    ) -> Result<Vec<Weight>, ModelError> {
        names
            .iter()
            .zip(outs)
            .map(|(name, &out)| {
                let info = self.info(name, &[out, inp])?;
                weight(info, self.file.data(info), out, inp)
            })
            .collect()
    }
}

/// An `[out, inp]` matrix of tensor `info` in its file format (`bytes`:
/// the whole tensor, or one expert's part of it).
fn weight(
    info: &crate::gguf::TensorInfo,
    bytes: crate::quant::Bytes,
    out: usize,
    inp: usize,
) -> Result<Weight, ModelError> {
    Ok(match info.qtype {
        q if q.is_quantized() => Weight::Quant(
            QMatrix::new(q, out, inp, bytes)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", info.name)))?,
        ),
        q => {
            let dtype = match q {
                QType::F32 => DType::F32,
                QType::F16 => DType::F16,
                _ => DType::BF16,
            };
            Weight::Dense(Tensor::from_raw_buffer(
                bytes.as_slice(),
                dtype,
                &[out, inp],
                &Device::Cpu,
            )?)
        }
    })
}

/// llama.cpp's name for a Hugging Face tensor name of the Llama family.
pub fn gguf_name(hf: &str) -> Option<String> {
    let fixed = match hf {
        "model.embed_tokens.weight" => Some("token_embd.weight"),
        "model.norm.weight" => Some("output_norm.weight"),
        "lm_head.weight" => Some("output.weight"),
        _ => None,
    };
    if let Some(f) = fixed {
        return Some(f.to_string());
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = rest.rsplit_once('.')?;
    let short = match module {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "self_attn.qkv_proj" => "attn_qkv",
        // GLM-4-0414's norms on the attention's and the MLP's outputs.
        "post_self_attn_layernorm" => "post_attention_norm",
        "post_mlp_layernorm" => "post_ffw_norm",
        // Qwen3's per-head query and key norms.
        "self_attn.q_norm" => "attn_q_norm",
        "self_attn.k_norm" => "attn_k_norm",
        // GLM-4's fused gate and up projection; llama.cpp keeps it whole.
        "mlp.gate_up_proj" => "ffn_up",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        // Experts: the router, and each projection of all experts as one
        // tensor (names of the stacked tensors as this crate spells them).
        "mlp.gate" | "block_sparse_moe.gate" => "ffn_gate_inp",
        "mlp.experts.gate_proj" => "ffn_gate_exps",
        "mlp.experts.up_proj" => "ffn_up_exps",
        "mlp.experts.down_proj" => "ffn_down_exps",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_to_llama_cpp() {
        assert_eq!(
            gguf_name("model.layers.3.self_attn.q_proj.bias").as_deref(),
            Some("blk.3.attn_q.bias")
        );
        assert_eq!(
            gguf_name("model.layers.12.mlp.down_proj.weight").as_deref(),
            Some("blk.12.ffn_down.weight")
        );
        assert_eq!(
            gguf_name("lm_head.weight").as_deref(),
            Some("output.weight")
        );
        assert_eq!(gguf_name("model.layers.x.mlp.up_proj.weight"), None);
    }
}
