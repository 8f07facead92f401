//! f32 matrix products for training on AVX-512 (`C = A·B`, any strides),
//! and the projection `y = x·Wᵀ` as an operation whose backward pass uses
//! them too (`dx = dy·W`, `dW = dyᵀ·x`).
//!
//! The product packs B in blocks of `KC` rows × `NR` = 32 columns and A in
//! strips of `MR` = 12 rows × `KC`, then runs a 12 × 32 register tile (24
//! zmm accumulators, two loads of B and one broadcast of A per step) over
//! each pair. Threads split C's rows. Where the CPU has no AVX-512, the
//! model keeps candle's matrix multiply ([`available`] is false).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

const MR: usize = 12;
const NR: usize = 32;
const KC: usize = 256;
const NC: usize = 1024;

/// Whether this CPU runs the AVX-512 product.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A matrix view: element `(i, j)` at `data[i * rs + j * cs]`.
#[derive(Clone, Copy)]
pub struct View<'a> {
    pub data: &'a [f32],
    pub rs: usize,
    pub cs: usize,
}

impl View<'_> {
    #[inline(always)]
    fn at(&self, i: usize, j: usize) -> f32 {
        self.data[i * self.rs + j * self.cs]
    }
}

/// `C = A·B` (or `C += A·B` with `accumulate`): A is `m × k`, B `k × n`,
/// C row-major `m × n`. Panics where the CPU lacks AVX-512 ([`available`]).
pub fn sgemm(m: usize, n: usize, k: usize, a: View, b: View, c: &mut [f32], accumulate: bool) {
    assert!(available(), "sgemm needs AVX-512");
    assert_eq!(c.len(), m * n, "C is m × n");
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        if !accumulate {
            c.fill(0.0);
        }
        return;
    }
    let threads = rayon::current_num_threads().max(1);
    // Rows per task: whole register strips, at least a few of them.
    let per = m.div_ceil(threads).div_ceil(MR).max(2) * MR;
    c.par_chunks_mut(per * n).enumerate().for_each(|(t, c)| {
        let m0 = t * per;
        let rows = c.len() / n;
        // SAFETY: `available()` checked AVX-512F above.
        unsafe { block(m0, rows, n, k, a, b, c, accumulate) };
    });
}

/// Rows `m0 .. m0 + rows` of the product into `c` (those rows of C).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn block(
    m0: usize,
    rows: usize,
    n: usize,
    k: usize,
    a: View,
    b: View,
    c: &mut [f32],
    accumulate: bool,
) {
    let mut bp = vec![0f32; KC * NC.min(n.div_ceil(NR) * NR)];
    let mut ap = vec![0f32; MR * KC];
    let mut tile = [0f32; MR * NR];
    for k0 in (0..k).step_by(KC) {
        let kc = KC.min(k - k0);
        let add = accumulate || k0 > 0;
        for j0 in (0..n).step_by(NC) {
            let nc = NC.min(n - j0);
            let strips = nc.div_ceil(NR);
            // Pack B[k0.., j0..] as strips of NR columns, kc rows each.
            for s in 0..strips {
                let dst = &mut bp[s * kc * NR..(s + 1) * kc * NR];
                let cols = NR.min(nc - s * NR);
                let j = j0 + s * NR;
                if cols < NR {
                    dst.fill(0.0);
                }
                if b.rs == 1 {
                    // Columns are contiguous (B = Wᵀ): read along them.
                    for jj in 0..cols {
                        let src = &b.data[(j + jj) * b.cs + k0..(j + jj) * b.cs + k0 + kc];
                        for (kk, &x) in src.iter().enumerate() {
                            dst[kk * NR + jj] = x;
                        }
                    }
                } else if b.cs == 1 {
                    for kk in 0..kc {
                        let at = (k0 + kk) * b.rs + j;
                        dst[kk * NR..kk * NR + cols].copy_from_slice(&b.data[at..at + cols]);
                    }
                } else {
                    for kk in 0..kc {
                        for jj in 0..cols {
                            dst[kk * NR + jj] = b.at(k0 + kk, j + jj);
                        }
                    }
                }
            }
            for i0 in (0..rows).step_by(MR) {
                let mr = MR.min(rows - i0);
                if mr < MR {
                    ap.fill(0.0);
                }
                let i = m0 + i0;
                if a.cs == 1 {
                    // Rows are contiguous (A = x): read along them.
                    for ii in 0..mr {
                        let src = &a.data[(i + ii) * a.rs + k0..(i + ii) * a.rs + k0 + kc];
                        for (kk, &x) in src.iter().enumerate() {
                            ap[kk * MR + ii] = x;
                        }
                    }
                } else if a.rs == 1 {
                    for kk in 0..kc {
                        let at = (k0 + kk) * a.cs + i;
                        ap[kk * MR..kk * MR + mr].copy_from_slice(&a.data[at..at + mr]);
                    }
                } else {
                    for kk in 0..kc {
                        for ii in 0..mr {
                            ap[kk * MR + ii] = a.at(i + ii, k0 + kk);
                        }
                    }
                }
                for s in 0..strips {
                    let cols = NR.min(nc - s * NR);
                    let bs = &bp[s * kc * NR..(s + 1) * kc * NR];
                    let c0 = i0 * n + j0 + s * NR;
                    if mr == MR && cols == NR {
                        kernel(kc, &ap, bs, c[c0..].as_mut_ptr(), n, add);
                    } else {
                        // An edge: through a full tile, then the part that fits.
                        for ii in 0..mr {
                            tile[ii * NR..ii * NR + cols]
                                .copy_from_slice(&c[c0 + ii * n..c0 + ii * n + cols]);
                        }
                        kernel(kc, &ap, bs, tile.as_mut_ptr(), NR, add);
                        for ii in 0..mr {
                            c[c0 + ii * n..c0 + ii * n + cols]
                                .copy_from_slice(&tile[ii * NR..ii * NR + cols]);
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
#[allow(clippy::too_many_arguments)]
unsafe fn block(_: usize, _: usize, _: usize, _: usize, _: View, _: View, _: &mut [f32], _: bool) {
    unreachable!("sgemm is only called where AVX-512 runs")
}

/// The 12 × 32 tile: `C[12 × 32] (+)= Ap[kc × 12]ᵀ-packed · Bp[kc × 32]`,
/// C at `c` with row stride `ldc`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn kernel(kc: usize, ap: &[f32], bp: &[f32], c: *mut f32, ldc: usize, add: bool) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    let (mut pa, mut pb) = (ap.as_ptr(), bp.as_ptr());
    for _ in 0..kc {
        let b0 = _mm512_loadu_ps(pb);
        let b1 = _mm512_loadu_ps(pb.add(16));
        for (ii, acc) in acc.iter_mut().enumerate() {
            let x = _mm512_set1_ps(*pa.add(ii));
            acc[0] = _mm512_fmadd_ps(x, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(x, b1, acc[1]);
        }
        pa = pa.add(MR);
        pb = pb.add(NR);
    }
    for (ii, acc) in acc.iter().enumerate() {
        let row = c.add(ii * ldc);
        for (h, v) in acc.iter().enumerate() {
            let p = row.add(16 * h);
            let v = if add {
                _mm512_add_ps(*v, _mm512_loadu_ps(p))
            } else {
                *v
            };
            _mm512_storeu_ps(p, v);
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn kernel(_: usize, _: &[f32], _: &[f32], _: *mut f32, _: usize, _: bool) {
    unreachable!("sgemm is only called where AVX-512 runs")
}

/// `y = x·Wᵀ` for `x` `[n, in]` and `W` `[out, in]`, with its backward
/// pass through the same product.
pub struct Project;

fn dims2(l: &Layout, what: &str) -> candle_core::Result<(usize, usize)> {
    match l.dims() {
        &[r, c] => Ok((r, c)),
        d => Err(candle_core::Error::Msg(format!(
            "project: {what} must be 2-D, not {d:?}"
        ))),
    }
}

impl CustomOp2 for Project {
    fn name(&self) -> &'static str {
        "project"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (x, w) = (
            crate::storage::contiguous_f32(s1, l1, "project: x")?,
            crate::storage::contiguous_f32(s2, l2, "project: W")?,
        );
        let ((n, inp), (out, inp2)) = (dims2(l1, "x")?, dims2(l2, "W")?);
        if inp != inp2 {
            return Err(candle_core::Error::Msg(format!(
                "project: x has {inp} columns, W {inp2}"
            )));
        }
        let mut y = vec![0f32; n * out];
        // A = x (n × in, row-major); B = Wᵀ (in × out): element (k, j) = W[j, k].
        sgemm(
            n,
            out,
            inp,
            View {
                data: x,
                rs: inp,
                cs: 1,
            },
            View {
                data: w,
                rs: 1,
                cs: inp,
            },
            &mut y,
            false,
        );
        Ok((CpuStorage::F32(y), Shape::from((n, out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, inp) = x.dims2()?;
        let (out, _) = w.dims2()?;
        let xs = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let ws = w.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dys = dy.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        // dx = dy·W: (n × out)·(out × in).
        let mut dx = vec![0f32; n * inp];
        sgemm(
            n,
            inp,
            out,
            View {
                data: &dys,
                rs: out,
                cs: 1,
            },
            View {
                data: &ws,
                rs: inp,
                cs: 1,
            },
            &mut dx,
            false,
        );
        // dW = dyᵀ·x: (out × n)·(n × in).
        let mut dw = vec![0f32; out * inp];
        sgemm(
            out,
            inp,
            n,
            View {
                data: &dys,
                rs: 1,
                cs: out,
            },
            View {
                data: &xs,
                rs: inp,
                cs: 1,
            },
            &mut dw,
            false,
        );
        Ok((
            Some(Tensor::from_vec(dx, (n, inp), x.device())?),
            Some(Tensor::from_vec(dw, (out, inp), w.device())?),
        ))
    }
}

/// `x·Wᵀ` through [`Project`] where AVX-512 runs, candle's product elsewhere.
pub fn project(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    if available() && x.rank() == 2 {
        x.contiguous()?.apply_op2(&w.contiguous()?, Project)
    } else {
        x.matmul(&w.t()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, n: usize, k: usize, a: View, b: View) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0f64;
                for kk in 0..k {
                    s += a.at(i, kk) as f64 * b.at(kk, j) as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn products_of_every_edge_and_stride_match_the_definition() {
        if !available() {
            eprintln!("no AVX-512 here: the product is not used, nothing to check");
            return;
        }
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((seed >> 33) as f32 / (1u64 << 31) as f32) - 0.5
        };
        // Edges in every direction: rows not a multiple of 12, columns not
        // of 32 or of the 1,024 block, depths past one 256 block.
        for &(m, n, k) in &[
            (1, 1, 1),
            (12, 32, 256),
            (13, 33, 257),
            (50, 70, 300),
            (7, 1100, 40),
            (200, 96, 600),
        ] {
            let a: Vec<f32> = (0..m * k).map(|_| next()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| next()).collect();
            for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
                let av = if ta {
                    View {
                        data: &a,
                        rs: 1,
                        cs: m,
                    }
                } else {
                    View {
                        data: &a,
                        rs: k,
                        cs: 1,
                    }
                };
                let bv = if tb {
                    View {
                        data: &b,
                        rs: 1,
                        cs: k,
                    }
                } else {
                    View {
                        data: &b,
                        rs: n,
                        cs: 1,
                    }
                };
                let want = naive(m, n, k, av, bv);
                let mut c = vec![0f32; m * n];
                sgemm(m, n, k, av, bv, &mut c, false);
                let worst = c
                    .iter()
                    .zip(&want)
                    .fold(0f32, |w, (x, y)| w.max((x - y).abs()));
                assert!(worst < 1e-4, "{m}×{n}×{k} ta {ta} tb {tb}: off by {worst}");
                // Accumulating adds the same product again.
                sgemm(m, n, k, av, bv, &mut c, true);
                let worst = c
                    .iter()
                    .zip(&want)
                    .fold(0f32, |w, (x, y)| w.max((x - 2.0 * y).abs()));
                assert!(worst < 2e-4, "{m}×{n}×{k} accumulated: off by {worst}");
            }
        }
    }
}
