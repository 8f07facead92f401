//! Fine-tuning a GGUF file: the trainer's model dequantized from llama.cpp's
//! GGUF files gives the engine's logits on the same file, for a Llama file
//! (q and k rows stored in rotary pairs, put back in halves) and a Qwen2 one
//! (stored as is); a LoRA adapter trained on the GGUF runs on it with
//! `--lora` and gives the trainer's logits.

use std::path::PathBuf;

use candle_core::Tensor;
use lw_engine::{Engine, LoadOptions};
use lw_train::model::{Batch, LoraSpec, TrainModel};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models")
}

const PROMPT: [u32; 9] = [5, 17, 42, 3, 99, 7, 61, 28, 11];

/// The trainer's logits for `PROMPT`, `[len][vocab]`.
fn train_logits(model: &TrainModel) -> Vec<Vec<f32>> {
    let n = PROMPT.len();
    let batch = Batch {
        rows: 1,
        len: n,
        inputs: PROMPT.to_vec(),
        targets: vec![0; n],
        weights: vec![0.0; n],
        positions: (0..n as u32).collect(),
        segments: vec![0; n],
    };
    model
        .forward(&batch, None)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap()
}

fn engine_logits(file: &std::path::Path, lora: Option<PathBuf>) -> Vec<Vec<f32>> {
    let mut engine = Engine::load(
        file,
        &LoadOptions {
            lora,
            ..Default::default()
        },
    )
    .unwrap();
    engine.score(&PROMPT).unwrap()
}

fn worst(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0f32, f32::max)
}

#[test]
fn a_gguf_file_trains_from_the_weights_the_engine_runs() {
    for base in ["llama3-untied", "qwen2"] {
        let file = fixtures().join(format!("{base}.llama-cpp.gguf"));
        let model = TrainModel::load_gguf(&file, None, 1).unwrap();
        let ours = train_logits(&model);
        let engine = engine_logits(&file, None);
        let d = worst(&ours, &engine);
        assert!(d < 1e-4, "{base}: trainer and engine differ by {d}");
        // The same model from its checkpoint directory: the rows put back
        // in halves are the checkpoint's own.
        let dir = TrainModel::load(&fixtures().join(base), None, 1).unwrap();
        let d = worst(&ours, &train_logits(&dir));
        assert!(d < 1e-4, "{base}: GGUF and checkpoint differ by {d}");
    }
}

#[test]
fn an_adapter_trained_on_a_gguf_file_runs_on_it() {
    let file = fixtures().join("llama3-untied.llama-cpp.gguf");
    let spec = LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
    };
    let model = TrainModel::load_gguf(&file, Some(spec), 1).unwrap();
    // B starts at zero; give every adapter tensor values, as training would.
    for (i, (_, var)) in model.trainable().into_iter().enumerate() {
        let t = var.as_tensor();
        let n = t.elem_count();
        let values: Vec<f32> = (0..n)
            .map(|j| (((j * 37 + i * 11) % 23) as f32 - 11.0) * 0.01)
            .collect();
        var.set(&Tensor::from_vec(values, t.shape(), t.device()).unwrap())
            .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("lw-gguf-lora-{}", std::process::id()));
    lw_train::train::save_model(&model, &dir, &[]).unwrap();
    let ours = train_logits(&model);
    let with = engine_logits(&file, Some(dir.clone()));
    let without = engine_logits(&file, None);
    std::fs::remove_dir_all(&dir).ok();
    let d = worst(&ours, &with);
    assert!(
        d < 1e-4,
        "adapter on the GGUF: trainer and engine differ by {d}"
    );
    let moved = worst(&with, &without);
    assert!(moved > 0.05, "the adapter moves the logits by only {moved}");
}

#[test]
fn a_gguf_file_of_an_untrainable_family_is_a_clear_error() {
    let file = fixtures().join("qwen3.llama-cpp.gguf");
    let err = TrainModel::load_gguf(&file, None, 1)
        .err()
        .expect("Qwen3's per-head norms are refused")
        .to_string();
    assert!(err.contains("training a qwen3 model"), "{err}");
}
