//! The gated activation of the feed-forward block, `act(gate) · up`, in one
//! pass over the fused gate/up projection's output: SwiGLU's `silu`, or
//! GeGLU's tanh-approximated `gelu` (Gemma).

/// The gate's function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    Silu,
    /// `gelu` with the tanh approximation (`gelu_pytorch_tanh`).
    GeluTanh,
}

/// `act(g) · u` per row, as [`silu_mul_into`] does for `silu`.
pub fn gate_mul_into(gate: Gate, gate_up: &[f32], inter: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    match gate {
        Gate::Silu => silu_mul_into(gate_up, inter, out),
        Gate::GeluTanh => out
            .par_chunks_mut(inter)
            .zip(gate_up.par_chunks(2 * inter))
            .for_each(|(o, row)| {
                let (g, u) = row.split_at(inter);
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = gelu_tanh(g) * u;
                }
            }),
    }
}

/// `0.5 · x · (1 + tanh(√(2/π) · (x + 0.044715 · x³)))`.
fn gelu_tanh(x: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044_715 * x * x * x)).tanh())
}

/// `silu(g) · u` for each row of `gate_up` (`[rows, 2 · inter]`, the gate
/// half first) into `out` (`[rows, inter]`).
///
/// `silu(g) = g / (1 + e^{-g})` with the C library's `expf`, the operations
/// of candle's `silu` followed by a multiply, so the results have the same
/// bits as before this pass was fused (llama.cpp's agreement with us on
/// near-tied logits is that sensitive); rows in parallel.
pub fn silu_mul_into(gate_up: &[f32], inter: usize, out: &mut [f32]) {
    use rayon::prelude::*;
    if out.len() == inter {
        silu_mul_row(gate_up, out);
    } else {
        out.par_chunks_mut(inter)
            .zip(gate_up.par_chunks(2 * inter))
            .for_each(|(o, row)| silu_mul_row(row, o));
    }
}

/// One row: `row` holds the gate half, then the up half.
fn silu_mul_row(row: &[f32], o: &mut [f32]) {
    let (g, u) = row.split_at(o.len());
    for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition in f64, over the range activations take and
    /// beyond it, for one row and for several (the parallel path).
    #[test]
    fn silu_mul_matches_the_definition() {
        let inter = 37;
        for rows in [1, 300] {
            let mut gate_up = Vec::with_capacity(rows * 2 * inter);
            for r in 0..rows {
                for i in 0..2 * inter {
                    let t = (r * 2 * inter + i) as f32;
                    let g = (t * 0.618_034).fract() * 40.0 - 20.0;
                    gate_up.push(if i < inter {
                        g * (1.0 + r as f32 / 30.0)
                    } else {
                        g / 7.0
                    });
                }
            }
            let mut out = vec![0f32; rows * inter];
            silu_mul_into(&gate_up, inter, &mut out);
            for r in 0..rows {
                let row = &gate_up[r * 2 * inter..(r + 1) * 2 * inter];
                for i in 0..inter {
                    let (g, u) = (row[i] as f64, row[inter + i] as f64);
                    let want = g / (1.0 + (-g).exp()) * u;
                    let got = out[r * inter + i] as f64;
                    assert!(
                        (got - want).abs() <= 4.0 * f32::EPSILON as f64 * want.abs() + 1e-30,
                        "g {g}, u {u}: {got} vs {want}"
                    );
                }
            }
        }
        // GeGLU against its definition in f64.
        let mut out = vec![0f32; inter];
        gate_mul_into(Gate::GeluTanh, &gate_up_row(inter), inter, &mut out);
        for (i, (&o, (&g, &u))) in out
            .iter()
            .zip(
                gate_up_row(inter)[..inter]
                    .iter()
                    .zip(&gate_up_row(inter)[inter..]),
            )
            .enumerate()
        {
            let g = g as f64;
            let want = 0.5
                * g
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (g + 0.044715 * g * g * g)).tanh())
                * u as f64;
            assert!(
                (o as f64 - want).abs() <= 1e-5 * want.abs().max(1.0),
                "{i}: {o} vs {want}"
            );
        }
        // Far below zero, silu is (minus) zero; far above, it is g.
        let mut big = [f32::NAN; 2];
        silu_mul_into(&[-200.0, 200.0, 3.0, 3.0], 2, &mut big);
        assert_eq!(big, [0.0, 600.0]);
    }

    fn gate_up_row(inter: usize) -> Vec<f32> {
        (0..2 * inter)
            .map(|i| ((i as f32 * 0.618_034).fract() - 0.5) * 12.0)
            .collect()
    }
}
