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
    "qwen3",
    "qwen3-moe",
    "mixtral",
    "glm4",
    "glm4-0414",
    "phi3",
    "phi3-longrope",
    "gemma2",
    "gemma3",
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

/// max |a − b|, +∞ on any NaN or infinity (lw_core's one comparison).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    lw_core::compare::max_abs_diff(a, b)
}

/// The largest difference between logit rows and a fixture's `logits`
/// (the same number of rows).
pub fn worst_logit_diff(rows: &[Vec<f32>], fx: &Value) -> f32 {
    let want = fx["logits"].as_array().unwrap();
    assert_eq!(rows.len(), want.len());
    lw_core::compare::worst(
        rows.iter()
            .zip(want)
            .map(|(r, w)| max_abs_diff(r, &floats(w))),
    )
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

pub mod llama_cpp;
#[allow(unused_imports)] // not every test file that includes this module asks for them
pub use llama_cpp::llama_cpp_models;

/// Reads a scheduled generation to its end: the result and the streamed
/// text.
pub fn receive(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<lw_engine::BatchEvent>,
) -> (lw_engine::Generation, String) {
    let mut streamed = String::new();
    loop {
        match rx.blocking_recv().expect("the scheduler answers") {
            lw_engine::BatchEvent::Delta(d) => streamed.push_str(&d),
            lw_engine::BatchEvent::Done(r) => return (r.unwrap(), streamed),
        }
    }
}
