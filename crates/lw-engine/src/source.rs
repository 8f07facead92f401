//! Where a model comes from: a local directory, or a hub id (`org/name`)
//! downloaded into the standard Hugging Face cache (`HF_HOME`, honouring
//! `HF_ENDPOINT` and `HF_HUB_OFFLINE`).

use std::path::{Path, PathBuf};

use crate::error::EngineError;

/// Files of a model directory besides the weights.
const FILES: &[(&str, bool)] = &[
    ("config.json", true),
    // One of these two: the original GLM-4 checkpoints ship only a tiktoken
    // `tokenizer.model`.
    ("tokenizer.json", false),
    ("tokenizer.model", false),
    ("tokenizer_config.json", false),
    ("generation_config.json", false),
];

/// Names of the small model shipped in the repository (`models/longwriter-tiny`).
pub const TINY_NAMES: &[&str] = &["tiny", "longwriter-tiny"];

/// The model `write` uses when none is named: small enough for a laptop CPU.
/// When the hub cannot be reached it falls back to the shipped tiny model.
pub const DEFAULT_MODEL: &str = "Qwen/Qwen2.5-0.5B-Instruct";

/// The shipped tiny model's directory: `$LONGWRITER_TINY_DIR`, then
/// `models/longwriter-tiny` under the working directory, beside the
/// executable's checkout (`target/release/..`), or in the source tree the
/// binary was built from.
pub fn shipped_tiny() -> Option<PathBuf> {
    let mut candidates = Vec::new();
    if let Some(d) = std::env::var_os("LONGWRITER_TINY_DIR") {
        candidates.push(PathBuf::from(d));
    }
    candidates.push(PathBuf::from("models/longwriter-tiny"));
    if let Ok(exe) = std::env::current_exe() {
        for up in exe.ancestors().skip(1).take(4) {
            candidates.push(up.join("models/longwriter-tiny"));
        }
    }
    candidates.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/longwriter-tiny"));
    candidates
        .into_iter()
        .find(|d| d.join("config.json").is_file())
}

/// Resolves `--model` to a local directory, downloading it when it is a hub id.
/// `tiny` names the shipped model.
pub fn resolve_model(spec: &str) -> Result<PathBuf, EngineError> {
    if TINY_NAMES.contains(&spec) && !Path::new(spec).exists() {
        return shipped_tiny().ok_or_else(|| EngineError::ModelNotFound {
            model: format!("{spec} (models/longwriter-tiny is not beside this binary; set LONGWRITER_TINY_DIR)"),
        });
    }
    let path = Path::new(spec);
    if path.exists() {
        if is_gguf(path) {
            return Ok(path.to_path_buf());
        }
        if path.is_file() {
            return Err(EngineError::file(
                path,
                "expected a model directory (config.json, *.safetensors, tokenizer.json) or a .gguf file, found another file",
            ));
        }
        return Ok(path.to_path_buf());
    }
    if !looks_like_hub_id(spec) {
        return Err(EngineError::ModelNotFound { model: spec.into() });
    }
    download(spec)
}

/// The tokenizer of a resolved model (a directory or a GGUF file), without
/// its weights: a vocabulary-only GGUF file will do.
pub fn load_tokenizer(model: &Path) -> Result<crate::Tokenizer, EngineError> {
    if is_gguf(model) {
        let file = lw_model::GgufFile::open(model)?;
        return crate::gguf::tokenizer_from_gguf(&file);
    }
    crate::Tokenizer::from_dir(model)
}

/// A `.gguf` file (by its name).
pub fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
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
    if let Some(dir) = from_cache(id).filter(|d| {
        d.join("model.safetensors").exists() || d.join("model.safetensors.index.json").exists()
    }) {
        return Ok(dir);
    }
    reachable().map_err(hub_err)?;
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
    if !dir.join("tokenizer.json").exists() && !dir.join("tokenizer.model").exists() {
        return Err(hub_err(
            "the repository has neither tokenizer.json nor tokenizer.model".into(),
        ));
    }
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

/// A quick check that the hub's host accepts connections, so an unreachable
/// hub fails in seconds rather than after the system's connect timeout.
fn reachable() -> Result<(), String> {
    use std::net::{TcpStream, ToSocketAddrs};
    let endpoint =
        std::env::var("HF_ENDPOINT").unwrap_or_else(|_| "https://huggingface.co".to_string());
    let rest = endpoint
        .split_once("://")
        .map_or(endpoint.as_str(), |(_, r)| r);
    let host = rest.split('/').next().unwrap_or(rest);
    let with_port = if host.contains(':') {
        host.to_string()
    } else if endpoint.starts_with("http://") {
        format!("{host}:80")
    } else {
        format!("{host}:443")
    };
    let addrs = with_port
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = format!("no address for {host}");
    for a in addrs {
        match TcpStream::connect_timeout(&a, std::time::Duration::from_secs(5)) {
            Ok(_) => return Ok(()),
            Err(e) => last = format!("cannot connect to {endpoint}: {e}"),
        }
    }
    Err(last)
}

/// `resolve_model`, falling back to the shipped tiny model when `spec` is a
/// hub id that cannot be fetched. The second value is the warning to show.
pub fn resolve_model_or_tiny(spec: &str) -> Result<(PathBuf, Option<String>), EngineError> {
    match resolve_model(spec) {
        Ok(dir) => Ok((dir, None)),
        Err(EngineError::Hub { model, reason }) => match shipped_tiny() {
            Some(dir) => {
                let warning = format!(
                    "could not fetch {spec} from the Hugging Face hub ({reason}); using the shipped toy model {} instead — its text is not useful writing. Pass --model DIR or --api-base URL for a real model.",
                    dir.display()
                );
                Ok((dir, Some(warning)))
            }
            None => Err(EngineError::Hub { model, reason }),
        },
        Err(e) => Err(e),
    }
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
