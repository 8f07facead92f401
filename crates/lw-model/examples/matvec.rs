//! Streaming speed of the decode matvec kernel, in GB/s of weights read.
//!
//!     cargo run --release -p lw-model --example matvec -- [threads]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lw_model::linear::Linear;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let threads: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(2);
    lw_model::set_threads(threads);
    for (n, k) in [
        (576, 576),
        (1536, 576),
        (576, 1536),
        (49152, 576),
        (233_000, 576),
    ] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (1, k), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let lin = Linear::new(w.to_dtype(dtype)?, None);
            let bytes = (n * k * dtype.size_in_bytes()) as f64;
            let reps = (2e9 / bytes).clamp(3.0, 2000.0) as usize;
            lin.forward(&x)?;
            let t = Instant::now();
            for _ in 0..reps {
                lin.forward(&x)?;
            }
            let dt = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "{n:>6}x{k:<5} {dtype:?}: {:7.1} us  {:5.1} GB/s",
                dt * 1e6,
                bytes / dt / 1e9
            );
        }
    }
    Ok(())
}
