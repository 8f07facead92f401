//! A 16,384-token packed row trains in memory linear in its length: one
//! forward and backward pass of a tiny model, with the process's peak
//! resident memory held under a bound computed from the shapes.
//!
//! The bound counts every tensor the pass keeps alive, per position, times
//! two for the allocator and for tensors that briefly overlap. The old
//! attention needed a `[len × len]` mask and score matrices per head: 1 GiB
//! for the mask alone at this length, and several GiB of scores per layer.
//!
//! This file holds one test so that the process's peak is this pass's.

use lw_model::ModelConfig;
use lw_train::model::{Batch, TrainModel};
use serde_json::json;

const LEN: usize = 16_384;
const HIDDEN: usize = 32;
const LAYERS: usize = 2;
const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const HEAD_DIM: usize = 8;
const INTER: usize = 64;
const VOCAB: usize = 256;

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
fn peak_rss() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .expect("VmHWM in /proc/self/status");
    let kb: usize = line
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .expect("a number of kB");
    kb * 1024
}

#[test]
fn a_16k_token_row_trains_in_memory_linear_in_its_length() {
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM,
        "max_position_embeddings": LEN,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
    });
    let cfg = ModelConfig::from_json(&config.to_string()).unwrap();
    let model = TrainModel::init(cfg, config, 3).unwrap();
    // Two sequences of 8,192 tokens packed in one row, positions reset.
    let inputs: Vec<u32> = (0..LEN)
        .map(|i| ((i * 7 + i / 13) % VOCAB) as u32)
        .collect();
    let targets: Vec<u32> = (0..LEN).map(|i| ((i * 7 + 7) % VOCAB) as u32).collect();
    let half = LEN / 2;
    let batch = Batch {
        rows: 1,
        len: LEN,
        inputs,
        targets,
        weights: vec![1.0 / LEN as f32; LEN],
        positions: (0..LEN).map(|i| (i % half) as u32).collect(),
        segments: (0..LEN).map(|i| (i / half) as u32).collect(),
    };
    let before = peak_rss();
    let (loss, grads) = lw_train::gradients(&model, &batch, None).unwrap();
    let peak = peak_rss();
    assert!(
        loss.is_finite() && (loss - (VOCAB as f32).ln()).abs() < 0.5,
        "loss {loss}"
    );
    assert!(
        grads.iter().all(|(_, g)| g.is_some()),
        "every parameter has a gradient"
    );

    // Floats kept per position: per layer the residual input, two norms'
    // inputs, outputs and inverse scales, q/k/v before and after rope (with
    // the rope's halves and products), the attention output and its
    // transposed copy, the gate, up, activation and product of the MLP,
    // the two projections' outputs and the residual sums; then the final
    // norm and the logits with their softmax in the backward pass; and the
    // gradients of all of these, which are the same shapes again.
    let qkv = (HEADS + 2 * KV_HEADS) * HEAD_DIM;
    let per_layer = 8 * HIDDEN + 5 * qkv + 3 * HEADS * HEAD_DIM + 5 * INTER + HEADS;
    let per_position = LAYERS * per_layer + 4 * HIDDEN + 3 * VOCAB + 4 * HEAD_DIM;
    let activations = LEN * per_position * 4 * 2;
    let bound = before + 2 * activations;
    eprintln!(
        "peak RSS {:.1} MiB (before the pass {:.1} MiB), bound {:.1} MiB",
        peak as f64 / 1048576.0,
        before as f64 / 1048576.0,
        bound as f64 / 1048576.0
    );
    assert!(
        peak <= bound,
        "peak RSS {} MiB over the bound {} MiB",
        peak >> 20,
        bound >> 20
    );
}
