//! Shared by the long-row memory tests: each runs one pass in its own
//! process and reads that process's peak resident memory.

use lw_model::ModelConfig;
use lw_train::model::{Batch, TrainModel};
use serde_json::json;

/// Peak resident memory of this process so far (`VmHWM`), in bytes.
pub fn peak_rss() -> usize {
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

/// Shapes of a tiny Llama with a long context.
pub struct Shape {
    pub len: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub inter: usize,
    pub vocab: usize,
}

/// A random-weight model of these shapes (tied embeddings).
pub fn model(s: &Shape) -> TrainModel {
    let config = json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": s.vocab,
        "hidden_size": s.hidden,
        "intermediate_size": s.inter,
        "num_hidden_layers": s.layers,
        "num_attention_heads": s.heads,
        "num_key_value_heads": s.kv_heads,
        "head_dim": s.head_dim,
        "max_position_embeddings": s.len,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "tie_word_embeddings": true,
        "hidden_act": "silu",
    });
    let cfg = ModelConfig::from_json(&config.to_string()).unwrap();
    TrainModel::init(cfg, config, 3).unwrap()
}

/// One row of `s.len` tokens packed from sequences of `sequence` tokens
/// (positions reset at each), every position weighted equally.
pub fn packed_row(s: &Shape, sequence: usize) -> Batch {
    let (len, vocab) = (s.len, s.vocab);
    Batch {
        rows: 1,
        len,
        inputs: (0..len)
            .map(|i| ((i * 7 + i / 13) % vocab) as u32)
            .collect(),
        targets: (0..len).map(|i| ((i * 7 + 7) % vocab) as u32).collect(),
        weights: vec![1.0 / len as f32; len],
        positions: (0..len).map(|i| (i % sequence) as u32).collect(),
        segments: (0..len).map(|i| (i / sequence) as u32).collect(),
    }
}
