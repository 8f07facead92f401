//! Attention of one new token over the cache, computed directly on the cache
//! buffers: no tensor ops, no copies of keys or values, heads in parallel.
//! Decoding calls this once per layer per token; at long contexts it is the
//! part of the step that grows.

use rayon::prelude::*;

/// Shapes of the cache buffers: `[kv_heads, capacity, head_dim]`.
pub struct CacheView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
    pub capacity: usize,
    /// Valid positions (the new token's included).
    pub len: usize,
}

/// `q`: `[heads * head_dim]` (rope applied). Returns `[heads * head_dim]`.
/// Query head `h` reads kv head `h / group` (grouped-query attention). Keys
/// older than `window` positions are skipped.
pub fn attend_one(
    q: &[f32],
    cache: &CacheView,
    heads: usize,
    group: usize,
    head_dim: usize,
    window: Option<usize>,
) -> Vec<f32> {
    let scale = 1.0 / (head_dim as f32).sqrt();
    let first = window.map_or(0, |w| cache.len.saturating_sub(w));
    let mut out = vec![0f32; heads * head_dim];
    out.par_chunks_mut(head_dim).enumerate().for_each(|(h, o)| {
        let kv = h / group;
        let base = kv * cache.capacity * head_dim;
        let qh = &q[h * head_dim..(h + 1) * head_dim];
        let mut scores: Vec<f32> = (first..cache.len)
            .map(|t| {
                let k = &cache.keys[base + t * head_dim..base + (t + 1) * head_dim];
                dot(qh, k) * scale
            })
            .collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for s in scores.iter_mut() {
            *s = (*s - max).exp();
            sum += *s;
        }
        let inv = 1.0 / sum;
        for (i, &p) in scores.iter().enumerate() {
            let t = first + i;
            let v = &cache.values[base + t * head_dim..base + (t + 1) * head_dim];
            let p = p * inv;
            for (acc, &x) in o.iter_mut().zip(v) {
                *acc += p * x;
            }
        }
    });
    out
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let tail: f32 = a[chunks..]
        .iter()
        .zip(&b[chunks..])
        .map(|(x, y)| x * y)
        .sum();
    acc.iter().sum::<f32>() + tail
}
