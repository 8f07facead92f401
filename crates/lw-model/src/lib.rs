//! Transformer architectures on candle: checkpoint config, weight loading
//! (memory-mapped safetensors), the KV cache, and the forward pass.
//!
//! This crate computes logits from token ids. It knows nothing of
//! tokenizers, text, sampling or HTTP.

mod activation;
mod attention;
mod cache;
pub mod config;
mod error;
mod ffn;
pub mod gguf;
pub mod gguf_model;
mod igrid;
pub mod kernels;
pub mod linear;
pub mod llama;
pub mod loader;
pub mod lora;
mod mmap;
mod pool;
mod portable;
mod qtype;
pub mod quant;
pub mod repack;
pub mod weights;

pub use cache::{KvCache, KvDtype};
pub use candle_core::DType;
pub use config::ModelConfig;
pub use error::ModelError;
pub use gguf::GgufFile;
pub use llama::{Llama, Logits};
pub use lora::{Adapter, LoraSource};
pub use quant::QType;
pub use weights::Weights;

/// Sets the number of threads the kernels use. Call once, before any model work.
pub fn set_threads(n: usize) {
    let n = n.max(1);
    // candle's gemm reads this variable; rayon's global pool is ours to size.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    pool::set_threads(n);
}

/// Runs `f` on a thread of the pool. Parallel loops started there split
/// their work with the other threads directly; started from outside the
/// pool, each loop would instead put the calling thread to sleep and wake it
/// at the end, which a decoded token, with a hundred such loops, pays for
/// every time.
pub(crate) fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    let mut out = None;
    rayon::scope(|_| out = Some(f()));
    out.expect("the scope ran its body")
}

/// Memory read bandwidth in GB/s with the current thread pool: the best of
/// five passes summing a buffer of `bytes` (far larger than the caches), a
/// STREAM-like read test. Decoding reads every weight once per token, so
/// this bounds its speed: tokens/s ≤ bandwidth / bytes per token.
pub fn read_bandwidth(bytes: usize) -> f64 {
    use rayon::prelude::*;
    let n = (bytes / 8).max(1 << 16);
    let buf: Vec<u64> = (0..n as u64).collect();
    let mut best = 0f64;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let sum = buf
            .par_chunks(1 << 16)
            .map(|c| c.iter().fold(0u64, |a, &x| a.wrapping_add(x)))
            .reduce(|| 0, u64::wrapping_add);
        std::hint::black_box(sum);
        best = best.max((n * 8) as f64 / started.elapsed().as_secs_f64() / 1e9);
    }
    best
}

/// Physical cores of this machine (threads beyond them slow memory-bound
/// decoding), bounded by the CPUs this process may use.
pub fn default_threads() -> usize {
    let logical = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    physical_cores().map_or(logical, |p| p.min(logical)).max(1)
}

/// Distinct (package, core) pairs in /proc/cpuinfo.
fn physical_cores() -> Option<usize> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    let mut cores = std::collections::HashSet::new();
    let mut package = None;
    for line in info.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => package = Some(v.to_string()),
            (Some("core id"), Some(v)) => {
                cores.insert((package.clone(), v.to_string()));
            }
            _ => {}
        }
    }
    (!cores.is_empty()).then_some(cores.len())
}

/// Deterministic test bytes (xorshift; `seed` picks the stream, not 0).
#[cfg(test)]
pub(crate) fn test_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            s as u8
        })
        .collect()
}

/// Deterministic test values in [-1, 1) (an LCG; `seed` picks the stream).
#[cfg(test)]
pub(crate) fn test_values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    /// `on_pool` moves work from an outside thread onto a pool thread, runs
    /// it in place when already there, and parallel loops inside it still
    /// reach every element.
    #[test]
    fn on_pool_runs_on_a_pool_thread() {
        assert_eq!(
            rayon::current_thread_index(),
            None,
            "tests start outside the pool"
        );
        let (index, nested, sum) = super::on_pool(|| {
            let index = rayon::current_thread_index();
            let nested = super::on_pool(rayon::current_thread_index);
            let sum: u64 = (0..10_000u64).into_par_iter().sum();
            (index, nested, sum)
        });
        assert!(index.is_some());
        assert_eq!(nested, index, "a nested call stays on its thread");
        assert_eq!(sum, 10_000 * 9_999 / 2);
    }
}
