//! Helpers shared by the engine's test files: the committed fixtures and
//! comparisons of logit rows.
#![allow(dead_code)]

use std::path::PathBuf;

use serde_json::Value;

/// The fixture checkpoints, one per architecture variant.
pub const MODELS: &[&str] = &[
    "llama3-untied",
    "llama31-tied-rope-scaling",
    "llama2-head-dim",
    "mistral",
    "qwen2",
    "glm4",
];

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A fixture file `tests/fixtures/NAME.json`.
pub fn fixture(name: &str) -> Value {
    let text = std::fs::read_to_string(fixtures().join(format!("{name}.json"))).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

pub fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest difference between logit rows and a fixture's `logits`
/// (the same number of rows).
pub fn worst_logit_diff(rows: &[Vec<f32>], fx: &Value) -> f32 {
    let want = fx["logits"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    rows.iter()
        .zip(want)
        .map(|(r, w)| max_abs_diff(r, &floats(w)))
        .fold(0.0, f32::max)
}

/// The messages of a fixture's chat case.
pub fn messages(case: &Value) -> Vec<lw_core::Message> {
    case["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let role: lw_core::Role = serde_json::from_value(m["role"].clone()).unwrap();
            lw_core::Message::new(role, m["content"].as_str().unwrap())
        })
        .collect()
}

/// llama.cpp's `models/` directory (vocabulary files with test cases), from
/// `LONGWRITER_LLAMA_CPP_SRC` (the llama.cpp source tree) or the copy
/// `.ci/run` unpacks from the llama-cpp-python 0.3.36 source package. `None`
/// when absent, which fails under CI (`CI` set): `.ci/run` must fetch it.
pub fn llama_cpp_models() -> Option<PathBuf> {
    let dir = match std::env::var_os("LONGWRITER_LLAMA_CPP_SRC") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
            .join(".cache/longwriter/llama-cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"),
    };
    let models = dir.join("models");
    if models.is_dir() {
        return Some(models);
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{} is missing: .ci/run must fetch llama.cpp's source (llama-cpp-python 0.3.36) into ~/.cache/longwriter/llama-cpp, or set LONGWRITER_LLAMA_CPP_SRC",
        models.display()
    );
    eprintln!(
        "SKIPPED: no llama.cpp source at {} (set LONGWRITER_LLAMA_CPP_SRC)",
        dir.display()
    );
    None
}
