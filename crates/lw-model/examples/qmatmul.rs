//! Prefill throughput of the quantized products, in GMAC/s, for the
//! projection shapes of a Llama-3.2-1B-sized model.
//!
//!     cargo run --release -p lw-model --example qmatmul -- [threads] [rows] [types]
//!
//! `types` is a comma-separated list (default `q8_0,q4_k,q6_k`). With
//! `KERNEL_ONLY=1`, the group kernels alone (a group of eight weight rows
//! against four inputs, and against one, as in decode) on cache-resident
//! rows, then the Q8_0 prefill kernel in the shapes it can take
//! (the product uses four weight rows against one tile of eight inputs), in
//! cycles of a 2.48 GHz clock per 32 multiply-adds.

use std::time::Instant;

use lw_model::quant::QMatrix;
use lw_model::QType;

/// Deterministic values in [-1, 1).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let threads: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(2);
    let rows: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(512);
    let types = args.next().unwrap_or_else(|| "q8_0,q4_k,q6_k".into());
    lw_model::set_threads(threads);
    #[cfg(target_arch = "x86_64")]
    if std::env::var_os("KERNEL_ONLY").is_some() && lw_model::kernels::available() {
        kernel_only();
        return Ok(());
    }
    for name in types.split(',') {
        let qtype = QType::parse(name).ok_or_else(|| format!("unknown type {name}"))?;
        let mut total = (0.0, 0.0);
        for (n, k) in [(2048, 2048), (8192, 2048), (2048, 8192)] {
            let w = QMatrix::quantize(qtype, &values(n * k, 1), n, k)?;
            let x = values(rows * k, 2);
            let mut out = vec![0f32; rows * n];
            w.matmul(&x, &mut out);
            let reps = 3;
            let t = Instant::now();
            for _ in 0..reps {
                w.matmul(&x, &mut out);
            }
            let secs = t.elapsed().as_secs_f64() / reps as f64;
            let macs = (rows * n * k) as f64;
            total.0 += macs;
            total.1 += secs;
            println!(
                "{:>5} {n:>5}×{k:<5} rows {rows:>4}: {:7.2} GMAC/s ({:.1} ms)",
                qtype.name(),
                macs / secs / 1e9,
                secs * 1e3
            );
        }
        println!(
            "{:>5} all shapes: {:7.2} GMAC/s",
            qtype.name(),
            total.0 / total.1 / 1e9
        );
    }
    Ok(())
}

/// Kernel passes over cache-resident rows of 2048 (a group of eight)
/// against four inputs, then against one, in cycles of a 2.48 GHz clock per
/// 32 multiply-adds.
#[cfg(target_arch = "x86_64")]
pub fn kernel_only() {
    use lw_model::kernels::{q4k8_tile, q6k8_tile, q8_0x8_tile, quantize_row, Isa, QuantRow};
    let isa = Isa::detect().expect("the caller checked the kernels run here");
    println!("kernels: {}", isa.name());
    let k = 2048;
    for qtype in [QType::Q8_0, QType::Q4K, QType::Q6K] {
        let w = QMatrix::quantize(qtype, &values(8 * k, 1), 8, k).unwrap();
        let group = if qtype == QType::Q8_0 { 32 } else { 256 };
        let xs: Vec<_> = (0..4)
            .map(|i| quantize_row(&values(k, 3 + i), group))
            .collect();
        let rb = qtype.row_bytes(k);
        let rows: [*const u8; 4] = std::array::from_fn(|i| w.bytes()[i * rb..].as_ptr());
        // Four input rows (a prefill tile) and one (decode).
        fn time<const R: usize>(
            isa: Isa,
            qtype: QType,
            rows: [*const u8; 4],
            xs: &[QuantRow],
            k: usize,
        ) {
            let reps = 80000 / R;
            let mut sink = 0f32;
            let weight_rows = 8;
            // The best of seven passes: the machine's other load only ever
            // slows a pass down.
            let mut secs = f64::INFINITY;
            for _ in 0..7 {
                let t = Instant::now();
                sink = 0.0;
                for _ in 0..reps {
                    let xr: [&QuantRow; R] = std::array::from_fn(|i| &xs[i]);
                    // SAFETY: `isa` runs here; rows hold k / group
                    // blocks (K-quants: one packed group, at the first row's pointer).
                    sink += unsafe {
                        match qtype {
                            QType::Q8_0 => q8_0x8_tile::<R>(isa, rows[0], xr)[0][0],
                            QType::Q4K => q4k8_tile::<R>(isa, rows[0], xr)[0][0],
                            _ => q6k8_tile::<R>(isa, rows[0], xr)[0][0],
                        }
                    };
                }
                secs = secs.min(t.elapsed().as_secs_f64());
            }
            let macs = reps as f64 * weight_rows as f64 * R as f64 * k as f64;
            let per32 = secs * 2.48e9 / (macs / 32.0);
            println!(
                "{:>5} tile {weight_rows}×{R} in cache: {per32:.2} cycles per 32 MACs ({sink})",
                qtype.name()
            );
        }
        time::<4>(isa, qtype, rows, &xs, k);
        time::<1>(isa, qtype, rows, &xs, k);
    }
    // The Q8_0 prefill kernel: R weight rows against T tiles of eight, widened
    // to 16 bits, on 512 values (a tile stays in the first-level cache).
    let k = 512;
    gemm_time::<4, 1>(k);
    gemm_time::<2, 2>(k);
    gemm_time::<1, 4>(k);
    gemm_time::<6, 1>(k);
}

#[cfg(target_arch = "x86_64")]
fn gemm_time<const R: usize, const T: usize>(k: usize) {
    use lw_model::kernels::{q8_0_gemm, quantize_row, Isa, WideRows, WideTile};
    let isa = Isa::detect().expect("the caller checked the kernels run here");
    let w = QMatrix::quantize(QType::Q8_0, &values(R * k, 1), R, k).unwrap();
    let mut rows = WideRows::default();
    // SAFETY: the matrix holds R rows of k values, in one group of eight.
    unsafe { rows.fill_groups(k, std::iter::once(w.bytes().as_ptr())) };
    let xs: Vec<_> = (0..8 * T)
        .map(|i| quantize_row(&values(k, 3 + i as u64), 32))
        .collect();
    let tiles: Vec<WideTile> = xs.chunks(8).map(WideTile::new).collect();
    let reps = 160000 / (R * T);
    let t = Instant::now();
    let mut sink = 0f32;
    for _ in 0..reps {
        // SAFETY: `isa` runs here; rows and tiles hold k / 32
        // blocks, and R <= 8.
        let v = unsafe { q8_0_gemm::<R, T>(isa, &rows, 0, std::array::from_fn(|i| &tiles[i])) };
        sink += v.iter().flatten().flatten().sum::<f32>();
    }
    let secs = t.elapsed().as_secs_f64();
    let macs = (reps * R * T * 8 * k) as f64;
    let per32 = secs * 2.48e9 / (macs / 32.0);
    println!(
        " Q8_0 gemm {R}×{} in cache: {per32:.2} cycles per 32 MACs ({sink})",
        8 * T
    );
}
