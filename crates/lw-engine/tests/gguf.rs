//! GGUF files written by `convert` from the fixture checkpoints, loaded back:
//! the same logits as `transformers` (f32), close ones when quantized, the
//! same tokens and chat prompts from the GGUF tokenizer, and clear errors
//! for broken files.

use std::path::{Path, PathBuf};

use lw_core::{Message, Role};
use lw_engine::gguf::{convert, Target};
use lw_engine::{Engine, LoadOptions};
use lw_model::QType;
use serde_json::Value;

const MODELS: &[&str] = &[
    "llama3-untied",
    "llama31-tied-rope-scaling",
    "llama2-head-dim",
    "mistral",
    "qwen2",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir(name: &str) -> PathBuf {
    root().join("tests/fixtures/models").join(name)
}

fn fixture(name: &str) -> Value {
    let path = root().join(format!("tests/fixtures/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lw-gguf-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn to_gguf(dir: &Path, out: &Path, target: Target) -> PathBuf {
    convert(dir, out, target, |_, _, _| {}).unwrap();
    out.to_path_buf()
}

fn load(path: &Path) -> Engine {
    Engine::load(path, &LoadOptions::default()).unwrap()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> usize {
    v.iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap()
        .0
}

#[test]
fn f32_gguf_files_match_transformers_for_every_architecture() {
    let tmp = scratch("f32");
    for &name in MODELS {
        let fx = fixture(name);
        let path = to_gguf(
            &model_dir(name),
            &tmp.join(format!("{name}.gguf")),
            Target::Uniform(QType::F32),
        );
        let mut engine = load(&path);
        // The tokenizer rebuilt from the GGUF metadata gives the same ids.
        let prompt = engine.encode_raw(fx["prompt"].as_str().unwrap()).unwrap();
        let want_ids: Vec<u32> = fx["prompt_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(
            prompt, want_ids,
            "{name}: prompt ids from the GGUF tokenizer"
        );
        let rows = engine.score(&prompt).unwrap();
        let want = fx["logits"].as_array().unwrap();
        let worst = rows
            .iter()
            .zip(want)
            .map(|(r, w)| max_abs_diff(r, &floats(w)))
            .fold(0.0, f32::max);
        assert!(worst < 1e-4, "{name}: GGUF logits differ by {worst}");
    }
}

#[test]
fn the_gguf_tokenizer_and_template_match_the_directory() {
    let tmp = scratch("tok");
    for name in ["qwen2", "llama3-untied"] {
        let dir = model_dir(name);
        let path = to_gguf(
            &dir,
            &tmp.join(format!("{name}.gguf")),
            Target::Uniform(QType::F16),
        );
        let from_dir = load(&dir);
        let from_gguf = load(&path);
        let text = "Rivers run 3,456 miles — naïve café, 東京 and emoji 🙂.\n\n  Done!";
        let a = from_dir.encode_raw(text).unwrap();
        let b = from_gguf.encode_raw(text).unwrap();
        assert_eq!(a, b, "{name}: token ids");
        assert_eq!(
            from_gguf.tokenizer().decode(&b).unwrap(),
            from_dir.tokenizer().decode(&a).unwrap()
        );
        let messages = vec![
            Message {
                role: Role::System,
                content: "Be brief.".into(),
            },
            Message {
                role: Role::User,
                content: "Write about rivers.".into(),
            },
        ];
        if from_dir.tokenizer().chat_template().is_some() {
            assert_eq!(
                from_gguf.encode_chat(&messages).unwrap(),
                from_dir.encode_chat(&messages).unwrap(),
                "{name}: chat prompt"
            );
        }
        assert_eq!(
            from_gguf.eos_ids(),
            from_dir.eos_ids(),
            "{name}: end-of-sequence ids"
        );
    }
}

#[test]
fn quantized_files_stay_close_to_the_full_precision_model() {
    let tmp = scratch("q");
    let dir = root().join("models/longwriter-tiny");
    let reference = load(&dir);
    let text = "The river ran past the old mill, and the children of the village \
                followed it down to the sea every summer, counting the boats.";
    let prompt = reference.encode_raw(text).unwrap();
    let mut reference = reference;
    let want = reference.score(&prompt).unwrap();
    for (target, max_rel, min_agree) in [
        (Target::Uniform(QType::Q8_0), 0.02, 0.95),
        (Target::Q4KM, 0.2, 0.8),
        (Target::Uniform(QType::Q6K), 0.05, 0.9),
    ] {
        let path = to_gguf(&dir, &tmp.join(format!("{}.gguf", target.name())), target);
        let mut engine = load(&path);
        let rows = engine.score(&prompt).unwrap();
        let scale = want.iter().flatten().map(|v| v.abs()).fold(0.0, f32::max);
        let worst = rows
            .iter()
            .zip(&want)
            .map(|(r, w)| max_abs_diff(r, w))
            .fold(0.0, f32::max);
        let agree = rows
            .iter()
            .zip(&want)
            .filter(|(r, w)| argmax(r) == argmax(w))
            .count() as f64
            / rows.len() as f64;
        eprintln!(
            "{}: max |Δlogit| {worst:.4} (scale {scale:.2}), top-1 agreement {agree:.3}",
            target.name()
        );
        assert!(
            worst / scale < max_rel,
            "{}: {worst} of {scale}",
            target.name()
        );
        assert!(
            worst > 0.0,
            "{}: quantization changed nothing",
            target.name()
        );
        assert!(
            agree >= min_agree,
            "{}: top-1 agreement {agree}",
            target.name()
        );
    }
    // Quantizing on load gives the same numbers as the quantized file.
    let mut on_load = Engine::load(
        &dir,
        &LoadOptions {
            quantize: Some(QType::Q8_0),
            ..Default::default()
        },
    )
    .unwrap();
    let mut file = load(&tmp.join("Q8_0.gguf"));
    let a = on_load.score(&prompt).unwrap();
    let b = file.score(&prompt).unwrap();
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| max_abs_diff(x, y))
        .fold(0.0, f32::max);
    assert!(worst < 1e-3, "--quantize q8_0 vs the Q8_0 file: {worst}");
}
