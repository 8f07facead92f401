//! Where a model comes from: a local directory, or a hub id (`org/name`)
//! downloaded into the standard Hugging Face cache (`HF_HOME`, honouring
//! `HF_ENDPOINT` and `HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

use crate::error::EngineError;

/// Files of a model directory besides the weights.
const FILES: &[(&str, bool)] = &[
    ("config.json", true),
    ("tokenizer.json", true),
    ("tokenizer_config.json", false),
    ("generation_config.json", false),
];

/// Resolves `--model` to a local directory, downloading it when it is a hub id.
pub fn resolve_model(spec: &str) -> Result<PathBuf, EngineError> {
    let path = Path::new(spec);
    if path.exists() {
        if path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            return Err(EngineError::GgufUnsupported {
                path: path.to_path_buf(),
            });
        }
        if path.is_file() {
            return Err(EngineError::file(
                path,
                "expected a model directory (config.json, *.safetensors, tokenizer.json), found a file",
            ));
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(EngineError::ModelNotFound { model: spec.into() });
    }
    download(spec)
}

fn looks_like_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
                && !p.starts_with('.')
        })
}

fn download(id: &str) -> Result<PathBuf, EngineError> {
    let hub_err = |reason: String| EngineError::Hub {
        model: id.to_string(),
        reason,
    };
    let offline =
        std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    if offline {
        return from_cache(id).ok_or_else(|| {
            hub_err("HF_HUB_OFFLINE is set and the model is not in the local cache".into())
        });
    }
    let api = hf_hub::api::sync::ApiBuilder::from_env()
        .with_progress(true)
        .build()
        .map_err(|e| hub_err(e.to_string()))?;
    let repo = api.model(id.to_string());
    let mut dir = None;
    for &(name, required) in FILES {
        match repo.get(name) {
            Ok(p) => dir = p.parent().map(Path::to_path_buf),
            Err(e) if required => return Err(hub_err(format!("{name}: {e}"))),
            Err(_) => {}
        }
    }
    let dir = dir.ok_or_else(|| hub_err("no files".into()))?;
    match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            for shard in lw_model::weights::safetensors_files(index.parent().unwrap_or(&dir))?
                .iter()
                .filter_map(|p| p.file_name().and_then(|n| n.to_str()).map(str::to_string))
            {
                repo.get(&shard)
                    .map_err(|e| hub_err(format!("{shard}: {e}")))?;
            }
        }
        Err(_) => {
            repo.get("model.safetensors")
                .map_err(|e| hub_err(format!("model.safetensors: {e}")))?;
        }
    }
    Ok(dir)
}

/// The snapshot directory of a cached model, if its config is there.
fn from_cache(id: &str) -> Option<PathBuf> {
    let cache = hf_hub::Cache::from_env();
    let repo = cache.model(id.to_string());
    repo.get("config.json")
        .and_then(|p| p.parent().map(Path::to_path_buf))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_are_recognised() {
        assert!(looks_like_hub_id("THUDM/LongWriter-glm4-9b"));
        assert!(looks_like_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(!looks_like_hub_id("model"));
        assert!(!looks_like_hub_id("./a/b"));
        assert!(!looks_like_hub_id("a/b/c"));
    }
}
