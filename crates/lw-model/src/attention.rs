//! Attention of one query over the cache, computed directly on the cache
//! buffers: no tensor ops, no copies of keys or values, and no score matrix
//! beyond one row, so long contexts cost memory only for the cache itself.

/// Shapes of the cache buffers: `[kv_heads, capacity, head_dim]`.
pub struct CacheView<'a> {
    pub keys: &'a [f32],
    pub values: &'a [f32],
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
    let scale = 1.0 / (head_dim as f32).sqrt();
    let first = window.map_or(0, |w| cache.len.saturating_sub(w));
    let base = kv * cache.capacity * head_dim;
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
    out.fill(0.0);
    for (i, &p) in scores.iter().enumerate() {
        let t = first + i;
        let v = &cache.values[base + t * head_dim..base + (t + 1) * head_dim];
        let p = p * inv;
        for (acc, &x) in out.iter_mut().zip(v) {
            *acc += p * x;
        }
    }
}

#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    crate::linear::dot_lanes(a, b)
}
