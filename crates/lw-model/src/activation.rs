//! The gated activation of the feed-forward block, `silu(gate) · up`, in one
//! pass over the fused gate/up projection's output.

use crate::attention::exp_nonpositive;

/// `silu(g) · u` for each row of `gate_up` (`[rows, 2 · inter]`, the gate
/// half first): `[rows, inter]`.
///
/// `silu(g) = g · σ(g)`, and `σ(g)` comes from `e = e^{-|g|}`, which never
/// overflows: `1 / (1 + e)` for `g >= 0`, `e / (1 + e)` below. Eight values
/// at a time with AVX2, the same operations in the same order, so a value
/// has the same bits whichever path computed it.
pub fn silu_mul(gate_up: &[f32], inter: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let rows = gate_up.len() / (2 * inter);
    let mut out = vec![0f32; rows * inter];
    if rows == 1 {
        silu_mul_row(gate_up, &mut out);
    } else {
        out.par_chunks_mut(inter)
            .zip(gate_up.par_chunks(2 * inter))
            .for_each(|(o, row)| silu_mul_row(row, o));
    }
    out
}

/// One row: `row` holds the gate half, then the up half.
fn silu_mul_row(row: &[f32], o: &mut [f32]) {
    let (g, u) = row.split_at(o.len());
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just detected.
        done = unsafe { silu_mul_avx2(g, u, o) };
    }
    for i in done..o.len() {
        o[i] = silu_mul_one(g[i], u[i]);
    }
}

#[inline(always)]
fn silu_mul_one(g: f32, u: f32) -> f32 {
    let e = exp_nonpositive(-g.abs());
    let num = if g < 0.0 { e } else { 1.0 };
    (g * (num / (1.0 + e))) * u
}

/// [`silu_mul_one`] over the whole eights of `g`; returns how many values
/// it wrote.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn silu_mul_avx2(g: &[f32], u: &[f32], o: &mut [f32]) -> usize {
    use std::arch::x86_64::*;
    let full = g.len() / 8 * 8;
    let one = _mm256_set1_ps(1.0);
    let sign = _mm256_set1_ps(-0.0);
    for c in (0..full).step_by(8) {
        let gv = _mm256_loadu_ps(g.as_ptr().add(c));
        // -|g|: the sign bit set.
        let e = crate::attention::exp8_avx2(_mm256_or_ps(gv, sign));
        let negative = _mm256_cmp_ps(gv, _mm256_setzero_ps(), _CMP_LT_OQ);
        let num = _mm256_blendv_ps(one, e, negative);
        let s = _mm256_div_ps(num, _mm256_add_ps(one, e));
        let v = _mm256_mul_ps(_mm256_mul_ps(gv, s), _mm256_loadu_ps(u.as_ptr().add(c)));
        _mm256_storeu_ps(o.as_mut_ptr().add(c), v);
    }
    full
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the definition in f64, over the range activations take and
    /// beyond it; and the vector and scalar paths agree bit for bit.
    #[test]
    fn silu_mul_matches_the_definition() {
        let inter = 37; // four whole eights and a tail of five
        let rows = 300;
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
        let out = silu_mul(&gate_up, inter);
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
                assert_eq!(
                    got as f32,
                    silu_mul_one(row[i], row[inter + i]),
                    "g {g}: the vector path differs from the scalar one"
                );
            }
        }
        // Far below the exponential's floor, silu is zero; far above, it is g.
        let big = silu_mul(&[-200.0, 200.0, 3.0, 3.0], 2);
        assert_eq!(big, vec![0.0, 600.0]);
    }
}
