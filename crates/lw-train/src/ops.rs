//! Fused operations with their own backward pass, for the parts of training
//! where candle's elementary ops make many full passes over large tensors.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Per-row `weight · (logsumexp(logits) − logits[target])` of `[n, vocab]`
/// logits, in one pass forward and one backward:
/// `∂/∂logits = grad · weight · (softmax − onehot(target))`.
pub struct WeightedNll {
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

fn logsumexp(row: &[f32], scratch: &mut Vec<f32>) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    scratch.clear();
    scratch.extend(row.iter().map(|&x| x - max));
    crate::attention::exp_slice(scratch);
    let sum: f32 = scratch.iter().sum();
    max + sum.ln()
}

fn rows_of<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    name: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let data = crate::storage::contiguous_f32(storage, layout, &format!("{name}: logits"))?;
    let dims = layout.dims();
    if dims.len() != 2 {
        return Err(candle_core::Error::Msg(format!(
            "{name}: logits must be [n, vocab]"
        )));
    }
    Ok((data, dims[0], dims[1]))
}

impl CustomOp1 for WeightedNll {
    fn name(&self) -> &'static str {
        "weighted-nll"
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (data, n, v) = rows_of(storage, layout, self.name())?;
        if n != self.targets.len() || n != self.weights.len() {
            return Err(candle_core::Error::Msg(format!(
                "weighted-nll: {n} rows but {} targets and {} weights",
                self.targets.len(),
                self.weights.len()
            )));
        }
        let out: Vec<f32> = data
            .par_chunks(v)
            .zip(self.targets.par_iter().zip(self.weights.par_iter()))
            .map_init(Vec::new, |scratch, (row, (&t, &w))| {
                if w == 0.0 {
                    0.0
                } else {
                    w * (logsumexp(row, scratch) - row[t as usize])
                }
            })
            .collect();
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let arg = arg.contiguous()?;
        let (storage, layout) = arg.storage_and_layout();
        let (data, n, v) = match &*storage {
            candle_core::Storage::Cpu(s) => rows_of(s, layout, self.name())?,
            _ => return Err(candle_core::Error::Msg("weighted-nll: CPU only".into())),
        };
        let g = grad_res.flatten_all()?.to_vec1::<f32>()?;
        let mut out = vec![0f32; n * v];
        out.par_chunks_mut(v)
            .zip(data.par_chunks(v))
            .enumerate()
            .for_each(|(i, (o, row))| {
                let scale = g[i] * self.weights[i];
                if scale == 0.0 {
                    return;
                }
                let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
                for (o, &x) in o.iter_mut().zip(row) {
                    *o = x - max;
                }
                crate::attention::exp_slice(o);
                let sum: f32 = o.iter().sum();
                let k = scale / sum;
                o.iter_mut().for_each(|x| *x *= k);
                o[self.targets[i] as usize] -= scale;
            });
        drop(storage);
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}

/// The f32 data of a contiguous CPU tensor, copied out.
fn values(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.flatten_all()?.to_vec1::<f32>()
}

/// RMSNorm of each row of `x` `[n, h]` times `weight` `[h]`:
/// `y = x · w / √(mean(x²) + eps)`, in one pass, and its backward:
/// with `r = 1/√(mean(x²) + eps)` and `g = dy · w`,
/// `dx = r·g − x · r³ · mean(g · x)`, `dw = Σ_rows dy · x · r`.
pub struct RmsNorm {
    pub eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ss: f32 = row.iter().map(|x| x * x).sum();
    1.0 / (ss / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = crate::storage::contiguous_f32(s1, l1, "rms-norm: x")?;
        let w = crate::storage::contiguous_f32(s2, l2, "rms-norm: weight")?;
        let h = w.len();
        if h == 0 || x.len() % h != 0 {
            return Err(candle_core::Error::Msg(format!(
                "rms-norm: {} values do not make rows of {h}",
                x.len()
            )));
        }
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(h)
            .zip(x.par_chunks(h))
            .for_each(|(o, row)| {
                let r = inv_rms(row, self.eps);
                for ((o, x), w) in o.iter_mut().zip(row).zip(w) {
                    *o = x * r * w;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (xs, ws, dy) = (values(x)?, values(w)?, values(grad_res)?);
        let h = ws.len();
        let mut dx = vec![0f32; xs.len()];
        // Rows in chunks, each with its own sum for dw, added at the end.
        let rows_per = (xs.len() / h)
            .div_ceil(rayon::current_num_threads() * 4)
            .max(1);
        let dw = dx
            .par_chunks_mut(h * rows_per)
            .zip(xs.par_chunks(h * rows_per).zip(dy.par_chunks(h * rows_per)))
            .map(|(dx, (x, dy))| {
                let mut dw = vec![0f32; h];
                for ((dx, x), dy) in dx.chunks_mut(h).zip(x.chunks(h)).zip(dy.chunks(h)) {
                    let r = inv_rms(x, self.eps);
                    let mut gx = 0f32;
                    for ((dy, w), x) in dy.iter().zip(&ws).zip(x) {
                        gx += dy * w * x;
                    }
                    let k = r * r * r * gx / h as f32;
                    for j in 0..h {
                        dx[j] = r * dy[j] * ws[j] - x[j] * k;
                        dw[j] += dy[j] * x[j] * r;
                    }
                }
                dw
            })
            .reduce(
                || vec![0f32; h],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        Ok((
            Some(Tensor::from_vec(dx, x.shape(), x.device())?),
            Some(Tensor::from_vec(dw, w.shape(), w.device())?),
        ))
    }
}

/// SwiGLU's product `silu(gate) · up`, in one pass, and its backward:
/// `d gate = dy · up · σ(g)(1 + g(1 − σ(g)))`, `d up = dy · silu(g)`.
pub struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = crate::storage::contiguous_f32(s1, l1, "silu-mul: gate")?;
        let u = crate::storage::contiguous_f32(s2, l2, "silu-mul: up")?;
        if g.len() != u.len() {
            return Err(candle_core::Error::Msg(format!(
                "silu-mul: {} gate values for {} up values",
                g.len(),
                u.len()
            )));
        }
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(4096)
            .zip(g.par_chunks(4096).zip(u.par_chunks(4096)))
            .for_each(|(o, (g, u))| {
                for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
                    *o = g / (1.0 + (-g).exp()) * u;
                }
            });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u, dy) = (values(gate)?, values(up)?, values(grad_res)?);
        let mut dg = vec![0f32; g.len()];
        let mut du = vec![0f32; g.len()];
        dg.par_chunks_mut(4096)
            .zip(du.par_chunks_mut(4096))
            .zip(
                g.par_chunks(4096)
                    .zip(u.par_chunks(4096).zip(dy.par_chunks(4096))),
            )
            .for_each(|((dg, du), (g, (u, dy)))| {
                for i in 0..g.len() {
                    let s = 1.0 / (1.0 + (-g[i]).exp());
                    du[i] = dy[i] * g[i] * s;
                    dg[i] = dy[i] * u[i] * s * (1.0 + g[i] * (1.0 - s));
                }
            });
        Ok((
            Some(Tensor::from_vec(dg, gate.shape(), gate.device())?),
            Some(Tensor::from_vec(du, up.shape(), up.device())?),
        ))
    }
}
