//! Training numerics against PyTorch (`scripts/train_oracle.py`): the same
//! initial weights and packed batch give the same loss, the same gradient for
//! every parameter (full and LoRA), and the same weights after two clipped
//! AdamW steps.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

use candle_core::{Device, Tensor};
use lw_train::model::{Batch, LoraSpec, TrainModel};
use lw_train::train::{gradients, train, BatchSource, OptimSpec, TrainSpec};
use serde_json::Value;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/oracle")
}

fn batch_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("batch.json")).unwrap()).unwrap()
}

fn load_batch() -> Batch {
    let v = batch_json();
    let u32s = |k: &str| -> Vec<u32> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    Batch {
        rows: v["rows"].as_u64().unwrap() as usize,
        len: v["len"].as_u64().unwrap() as usize,
        inputs: u32s("inputs"),
        targets: u32s("targets"),
        weights: v["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect(),
        positions: u32s("positions"),
        segments: u32s("segments"),
    }
}

fn reference(file: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join(file), &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// max |a − b| / max |b|; +∞ on any NaN or infinity.
fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    lw_core::compare::max_rel_diff(a, b)
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        rank: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: vec!["q_proj".into(), "v_proj".into(), "down_proj".into()],
    }
}

fn check(model: &TrainModel, reference_file: &str, expect_tensors: usize) {
    let expected = reference(reference_file);
    let (loss, grads) = gradients(model, &load_batch(), None).unwrap();
    let want = values(&expected["loss"])[0];
    let rel = ((loss - want) / want).abs();
    assert!(
        rel < 1e-5,
        "loss {loss} vs PyTorch {want} (relative {rel:e})"
    );
    assert_eq!(grads.len(), expect_tensors);
    for (name, g) in grads {
        let g = g.unwrap_or_else(|| panic!("{name} received no gradient"));
        let r = expected
            .get(&format!("grad.{name}"))
            .unwrap_or_else(|| panic!("no reference gradient for {name}"));
        let err = rel_err(&g, &values(r));
        assert!(err < 1e-4, "{name}: relative gradient error {err:e}");
        assert!(g.iter().any(|x| *x != 0.0), "{name}: zero gradient");
    }
}

#[test]
fn full_loss_and_gradients_match_pytorch() {
    let model = TrainModel::load(&fixture().join("model"), None, 0).unwrap();
    // embed, 9 per layer × 2, final norm, lm_head
    check(&model, "full.safetensors", 21);
}

#[test]
fn lora_loss_and_gradients_match_pytorch() {
    let model = TrainModel::load(&fixture().join("model"), Some(lora_spec()), 0).unwrap();
    model
        .load_trainable(&fixture().join("lora/adapter_model.safetensors"))
        .unwrap();
    // 3 modules × 2 layers × (A, B)
    check(&model, "lora.safetensors", 12);
}

#[test]
fn fresh_lora_adapters_start_as_the_base_model_and_b_gets_a_gradient() {
    let base = TrainModel::load(&fixture().join("model"), None, 0).unwrap();
    let lora = TrainModel::load(&fixture().join("model"), Some(lora_spec()), 7).unwrap();
    let batch = load_batch();
    let a = values(&base.loss(&batch, None).unwrap());
    let b = values(&lora.loss(&batch, None).unwrap());
    assert_eq!(a, b, "B = 0 must leave the model unchanged");
    let (_, grads) = gradients(&lora, &batch, None).unwrap();
    for (name, g) in grads {
        let g = g.unwrap();
        let nonzero = g.iter().any(|x| *x != 0.0);
        // With B = 0 no gradient reaches A yet; B's is non-zero.
        assert_eq!(nonzero, name.contains("lora_B"), "{name}");
    }
}

struct Fixed(Batch);

impl BatchSource for Fixed {
    fn batch(&self, _: u64, _: usize, _: usize) -> Batch {
        self.0.clone()
    }
    fn validation(&self) -> Vec<Batch> {
        Vec::new()
    }
}

#[test]
fn two_clipped_adamw_steps_match_pytorch() {
    let opt = &batch_json()["optim"];
    let lr = opt["lr"].as_f64().unwrap();
    let spec = TrainSpec {
        steps: 2,
        accum: 1,
        optim: OptimSpec {
            lr,
            min_lr: lr,
            warmup_steps: 0,
            beta1: opt["betas"][0].as_f64().unwrap(),
            beta2: opt["betas"][1].as_f64().unwrap(),
            eps: opt["eps"].as_f64().unwrap(),
            weight_decay: opt["weight_decay"].as_f64().unwrap(),
            clip: opt["clip"].as_f64().unwrap(),
        },
        seed: 0,
        eval_every: 0,
        save_every: 0,
        keep_last: 1,
        keep_every: 0,
        out: PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("oracle-adamw"),
        extra_files: Vec::new(),
        kind: "pretrain".into(),
    };
    let model = TrainModel::load(&fixture().join("model"), None, 0).unwrap();
    let summary = train(
        &model,
        &Fixed(load_batch()),
        &spec,
        None,
        &AtomicBool::new(false),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(summary.steps_done, 2);
    let expected = reference("adamw.safetensors");
    let before = TrainModel::load(&fixture().join("model"), None, 0).unwrap();
    for ((name, t), (_, t0)) in model.tensors().into_iter().zip(before.tensors()) {
        let want = values(&expected[&name]);
        let got = values(&t);
        // Compare the update, not the weights, so a small step is not hidden.
        // Adam divides each gradient element by its own magnitude, so the
        // 1e-5-level gradient differences of near-zero elements grow here:
        // most tensors agree to ~3e-5, the worst to ~1e-3.
        let start = values(&t0);
        let d_got: Vec<f32> = got.iter().zip(&start).map(|(a, b)| a - b).collect();
        let d_want: Vec<f32> = want.iter().zip(&start).map(|(a, b)| a - b).collect();
        let err = rel_err(&d_got, &d_want);
        assert!(err < 5e-3, "{name}: relative update error {err:e}");
    }
}
