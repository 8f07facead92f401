//! Attention over the cache, computed directly on the cache buffers: no
//! tensor ops, no copies of keys or values, and no score matrix beyond one
//! row per query head, so long contexts cost memory only for the cache.
//!
//! The query heads that share a key/value head (grouped-query attention) are
//! handled together, so each cached key and value is read once per group
//! rather than once per head: at long contexts that read is what a decoded
//! token costs.

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

/// Attention of the query heads `q` (`[group, head_dim]`, rope applied) that
/// share kv head `kv`, over the view's first `len` positions, written to
/// `out` (`[group, head_dim]`). Keys older than `window` positions are
/// skipped. Every position of every sequence goes through this one
/// function, prefill and decode alike, so a position's result never depends
/// on how positions were grouped into steps.
pub fn attend_group(
    q: &[f32],
    cache: &CacheView,
    kv: usize,
    head_dim: usize,
    window: Option<usize>,
    out: &mut [f32],
) {
    let first = window.map_or(0, |w| cache.len.saturating_sub(w));
    let base = kv * cache.capacity * head_dim;
    let rows = Rows {
        base,
        first,
        len: cache.len,
        head_dim,
    };
    match (cache.keys, cache.values) {
        (KvSlice::F32(k), KvSlice::F32(v)) => attend(q, k, v, &rows, out),
        (KvSlice::F16(k), KvSlice::F16(v)) => attend(q, k, v, &rows, out),
        _ => unreachable!("keys and values share a format"),
    }
}

/// A cached number format, read as f32.
trait KvElem: Sized {
    /// `row` as f32: itself, or widened into `buf`.
    fn as_f32<'s>(row: &'s [Self], buf: &'s mut [f32]) -> &'s [f32];
}

impl KvElem for f32 {
    fn as_f32<'s>(row: &'s [f32], _buf: &'s mut [f32]) -> &'s [f32] {
        row
    }
}

impl KvElem for f16 {
    /// Widened with F16C where the CPU has it.
    fn as_f32<'s>(row: &'s [f16], buf: &'s mut [f32]) -> &'s [f32] {
        row.convert_to_f32_slice(buf);
        buf
    }
}

/// Where the rows of one kv head lie in a layer's buffer.
struct Rows {
    base: usize,
    first: usize,
    len: usize,
    head_dim: usize,
}

impl Rows {
    fn at(&self, t: usize) -> std::ops::Range<usize> {
        self.base + t * self.head_dim..self.base + (t + 1) * self.head_dim
    }
}

fn attend<E: KvElem>(q: &[f32], keys: &[E], values: &[E], rows: &Rows, out: &mut [f32]) {
    let hd = rows.head_dim;
    let heads = q.len() / hd;
    let m = rows.len - rows.first;
    let scale = 1.0 / (hd as f32).sqrt();
    // scores[h * m + i]: head h, position first + i.
    let mut scores = vec![0f32; heads * m];
    let mut buf = vec![0f32; hd];
    for i in 0..m {
        let k = E::as_f32(&keys[rows.at(rows.first + i)], &mut buf);
        for h in 0..heads {
            scores[h * m + i] = dot(&q[h * hd..(h + 1) * hd], k) * scale;
        }
    }
    let inv: Vec<f32> = scores.chunks_mut(m.max(1)).map(softmax).collect();
    out.fill(0.0);
    for i in 0..m {
        let v = E::as_f32(&values[rows.at(rows.first + i)], &mut buf);
        for h in 0..heads {
            axpy(
                scores[h * m + i] * inv[h],
                v,
                &mut out[h * hd..(h + 1) * hd],
            );
        }
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

/// A dot product in eight lanes: head sizes (16 to 256) are short, and
/// eight independent sums vectorise into one AVX register.
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    const L: usize = 8;
    let mut acc = [0f32; L];
    let full = a.len() / L * L;
    for (ca, cb) in a[..full].chunks_exact(L).zip(b[..full].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += ca[i] * cb[i];
        }
    }
    let mut tail = 0f32;
    for i in full..a.len() {
        tail += a[i] * b[i];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}
