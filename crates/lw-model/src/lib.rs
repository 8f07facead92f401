//! Transformer architectures on candle: checkpoint config, weight loading
//! (memory-mapped safetensors), the KV cache, and the forward pass.
//!
//! This crate computes logits from token ids. It knows nothing of
//! tokenizers, text, sampling or HTTP.

pub mod cache;
pub mod config;
pub mod error;
pub mod linear;
pub mod llama;
pub mod weights;

pub use cache::KvCache;
pub use candle_core::DType;
pub use config::ModelConfig;
pub use error::ModelError;
pub use llama::{Llama, Logits};
pub use weights::Weights;

/// Sets the number of threads the kernels use. Call once, before any model work.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    // candle's gemm reads this variable; rayon's global pool is ours to size.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
}

/// Physical cores of this machine (threads beyond them slow memory-bound decoding).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}
