//! `longwriter lora merge`: folds PEFT LoRA adapters into the base weights,
//! `W' = W + (alpha / r) · B A`, and writes a complete model directory.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use lw_model::Weights;
use serde_json::Value;

use crate::error::{file_error, TrainError};
use crate::model::param_shapes;
use crate::train::TOKENIZER_FILES;

/// What a merge did.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeSummary {
    pub merged_modules: usize,
    pub dtype: String,
}

/// Merges the adapters in `adapter_dir` into the model in `base_dir` and
/// writes the result to `out` (config, tokenizer and `model.safetensors` in
/// the base's dtype).
pub fn merge(base_dir: &Path, adapter_dir: &Path, out: &Path) -> Result<MergeSummary, TrainError> {
    let cfg = lw_model::ModelConfig::from_file(&base_dir.join("config.json"))?;
    let cfg_path = adapter_dir.join("adapter_config.json");
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| file_error(&cfg_path, e))?;
    let acfg: Value = serde_json::from_str(&text).map_err(|e| file_error(&cfg_path, e))?;
    let field = |k: &str| {
        acfg.get(k)
            .and_then(Value::as_f64)
            .ok_or_else(|| file_error(&cfg_path, format!("field `{k}` is missing or not a number")))
    };
    let (rank, alpha) = (field("r")?, field("lora_alpha")?);
    if rank <= 0.0 {
        return Err(file_error(&cfg_path, "field `r` must be positive"));
    }
    let scale = alpha / rank;
    let adapter_path = adapter_dir.join("adapter_model.safetensors");
    let adapters = candle_core::safetensors::load(&adapter_path, &Device::Cpu)
        .map_err(|e| file_error(&adapter_path, e))?;
    let weights = Weights::from_dir(base_dir)?;
    let dtype = weights.stored_dtype();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut merged = 0;
    for (name, shape) in param_shapes(&cfg) {
        let w = weights.get(&name, &shape, DType::F32)?;
        let module = name.strip_suffix(".weight").unwrap_or(&name);
        let a_name = format!("base_model.model.{module}.lora_A.weight");
        let b_name = format!("base_model.model.{module}.lora_B.weight");
        let w = match (adapters.get(&a_name), adapters.get(&b_name)) {
            (Some(a), Some(b)) => {
                let delta = b
                    .to_dtype(DType::F32)?
                    .matmul(&a.to_dtype(DType::F32)?)
                    .map_err(|e| file_error(&adapter_path, format!("{a_name}: {e}")))?;
                if delta.dims() != w.dims() {
                    return Err(file_error(
                        &adapter_path,
                        format!(
                            "adapter for \"{name}\" gives shape {:?}, the weight is {:?}",
                            delta.dims(),
                            w.dims()
                        ),
                    ));
                }
                merged += 1;
                (w + (delta * scale)?)?
            }
            (None, None) => w,
            _ => {
                return Err(file_error(
                    &adapter_path,
                    format!("only one of lora_A / lora_B is present for \"{module}\""),
                ))
            }
        };
        tensors.insert(name, w.to_dtype(dtype)?);
    }
    if merged == 0 {
        return Err(file_error(
            &adapter_path,
            "no adapter tensor matches a weight of the base model",
        ));
    }
    std::fs::create_dir_all(out).map_err(|e| file_error(out, e))?;
    let target = out.join("model.safetensors");
    let tmp = out.join(".model.safetensors.tmp");
    candle_core::safetensors::save(&tensors, &tmp).map_err(|e| file_error(&tmp, e))?;
    std::fs::rename(&tmp, &target).map_err(|e| file_error(&target, e))?;
    // The base's config; the tokenizer files saved with the adapters, else the base's.
    let side = std::iter::once("config.json").chain(TOKENIZER_FILES.iter().copied());
    for f in side {
        let src = if f != "config.json" && adapter_dir.join(f).exists() {
            adapter_dir.join(f)
        } else {
            base_dir.join(f)
        };
        if src.exists() {
            std::fs::copy(&src, out.join(f)).map_err(|e| file_error(&src, e))?;
        }
    }
    Ok(MergeSummary {
        merged_modules: merged,
        dtype: format!("{dtype:?}").to_lowercase(),
    })
}
