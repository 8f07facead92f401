//! Throughput of the linear kernel on many input rows (prefill), in GFLOP/s.
//!
//!     cargo run --release -p lw-model --example prefill_linear -- [threads] [rows]

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use lw_model::linear::Linear;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    lw_model::set_threads(threads);
    for (n, k) in [(576 * 2, 576), (3072, 576), (576, 1536)] {
        let w = Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu)?;
        let x = Tensor::randn(0f32, 1.0, (rows, k), &Device::Cpu)?;
        for dtype in [DType::F32, DType::BF16] {
            let lin = Linear::new(w.to_dtype(dtype)?, None);
            lin.forward(&x)?;
            let reps = 5;
            let t = Instant::now();
            for _ in 0..reps {
                lin.forward(&x)?;
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            let gemm = {
                let wt = w.t()?;
                x.matmul(&wt)?;
                let t = Instant::now();
                for _ in 0..reps {
                    x.matmul(&wt)?;
                }
                t.elapsed().as_secs_f64() / reps as f64
            };
            let flops = 2.0 * (n * k * rows) as f64;
            println!(
                "{n:>5}x{k:<5} {dtype:?}: {:.1} GFLOP/s (candle f32 matmul {:.1})",
                flops / secs / 1e9,
                flops / gemm / 1e9
            );
        }
    }
    Ok(())
}
