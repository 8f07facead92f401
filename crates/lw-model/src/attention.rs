//! Attention of one query over the cache, computed directly on the cache
//! buffers: no tensor ops, no copies of keys or values, and no score matrix
//! beyond one row, so long contexts cost memory only for the cache itself.

use half::f16;
use half::slice::HalfFloatSliceExt;

/// Cached numbers of one layer, in the cache's format.
#[derive(Clone, Copy)]
pub enum KvSlice<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

/// Shapes of the cache buffers: `[kv_heads, capacity, head_dim]`.
pub struct CacheView<'a> {
    pub keys: KvSlice<'a>,
    pub values: KvSlice<'a>,
    pub capacity: usize,
    /// Valid positions (the new token's included).
    pub len: usize,
}

/// Attention of one query head `qh` (rope applied) over kv head `kv` of the
/// view's first `len` positions, written to `out` (`[head_dim]`). Keys older
/// than `window` positions are skipped. Every position of every sequence goes
/// through this one function, prefill and decode alike, so a position's
/// result never depends on how positions were grouped into steps.
pub fn attend_head(
    qh: &[f32],
    cache: &CacheView,
    kv: usize,
    head_dim: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    match (cache.keys, cache.values) {
        (KvSlice::F32(k), KvSlice::F32(v)) => attend(qh, k, v, cache, kv, head_dim, window, out),
        (KvSlice::F16(k), KvSlice::F16(v)) => {
            attend_f16(qh, k, v, cache, kv, head_dim, window, out)
        }
        _ => unreachable!("keys and values share a format"),
    }
}

#[allow(clippy::too_many_arguments)]
fn attend(
    qh: &[f32],
    keys: &[f32],
    values: &[f32],
    cache: &CacheView,
    kv: usize,
    head_dim: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let first = window.map_or(0, |w| cache.len.saturating_sub(w));
    let base = kv * cache.capacity * head_dim;
    let at = |t: usize| base + t * head_dim..base + (t + 1) * head_dim;
    let mut scores: Vec<f32> = (first..cache.len)
        .map(|t| dot(qh, &keys[at(t)]) * scale)
        .collect();
    let inv = softmax(&mut scores);
    out.fill(0.0);
    for (i, &p) in scores.iter().enumerate() {
        axpy(p * inv, &values[at(first + i)], out);
    }
}

/// [`attend`] over f16 entries, widened a row at a time (F16C where the CPU
/// has it).
#[allow(clippy::too_many_arguments)]
fn attend_f16(
    qh: &[f32],
    keys: &[f16],
    values: &[f16],
    cache: &CacheView,
    kv: usize,
    head_dim: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let first = window.map_or(0, |w| cache.len.saturating_sub(w));
    let base = kv * cache.capacity * head_dim;
    let at = |t: usize| base + t * head_dim..base + (t + 1) * head_dim;
    let mut row = vec![0f32; head_dim];
    let mut scores: Vec<f32> = (first..cache.len)
        .map(|t| {
            keys[at(t)].convert_to_f32_slice(&mut row);
            dot(qh, &row) * scale
        })
        .collect();
    let inv = softmax(&mut scores);
    out.fill(0.0);
    for (i, &p) in scores.iter().enumerate() {
        values[at(first + i)].convert_to_f32_slice(&mut row);
        axpy(p * inv, &row, out);
    }
}

/// Exponentiates `scores` in place (minus their maximum); returns 1 / sum.
fn softmax(scores: &mut [f32]) -> f32 {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for s in scores.iter_mut() {
        *s = (*s - max).exp();
        sum += *s;
    }
    1.0 / sum
}

#[inline]
fn axpy(p: f32, x: &[f32], out: &mut [f32]) {
    for (acc, &v) in out.iter_mut().zip(x) {
        *acc += p * v;
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::linear::dot_lanes(a, b)
}
