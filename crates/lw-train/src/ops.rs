//! Fused operations with their own backward pass, for the parts of training
//! where candle's elementary ops make many full passes over large tensors.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Per-row `weight · (logsumexp(logits) − logits[target])` of `[n, vocab]`
/// logits, in one pass forward and one backward:
/// `∂/∂logits = grad · weight · (softmax − onehot(target))`.
pub struct WeightedNll {
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
}

fn logsumexp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x));
    let sum: f32 = row.iter().map(|&x| (x - max).exp()).sum();
    max + sum.ln()
}

fn rows_of<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    name: &str,
) -> candle_core::Result<(&'a [f32], usize, usize)> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::Msg(format!(
            "{name}: logits must be f32"
        )));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::Msg(format!(
            "{name}: logits must be contiguous"
        )));
    };
    let dims = layout.dims();
    if dims.len() != 2 {
        return Err(candle_core::Error::Msg(format!(
            "{name}: logits must be [n, vocab]"
        )));
    }
    Ok((&data[start..end], dims[0], dims[1]))
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
            .map(|(row, (&t, &w))| {
                if w == 0.0 {
                    0.0
                } else {
                    w * (logsumexp(row) - row[t as usize])
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
                let mut sum = 0.0f32;
                for (o, &x) in o.iter_mut().zip(row) {
                    let e = (x - max).exp();
                    *o = e;
                    sum += e;
                }
                let k = scale / sum;
                o.iter_mut().for_each(|x| *x *= k);
                o[self.targets[i] as usize] -= scale;
            });
        drop(storage);
        Ok(Some(Tensor::from_vec(out, (n, v), arg.device())?))
    }
}
