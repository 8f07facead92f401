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
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the feature was just checked.
        return unsafe { attend_avx2(q, keys, values, rows, out) };
    }
    attend_body::<E, false>(q, keys, values, rows, out)
}

/// [`attend_body`] compiled for AVX2: the same operations in the same order
/// (no fused multiply-adds), eight lanes wide, so the same bits.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn attend_avx2<E: KvElem>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    rows: &Rows,
    out: &mut [f32],
) {
    attend_body::<E, true>(q, keys, values, rows, out)
}

/// Positions whose values are widened together, and the width of an output
/// slice kept in registers while they are summed.
const CHUNK: usize = 32;
const SLICE: usize = 64;

/// `AVX2`: the caller checked that the CPU has it.
#[inline(always)]
fn attend_body<E: KvElem, const AVX2: bool>(
    q: &[f32],
    keys: &[E],
    values: &[E],
    rows: &Rows,
    out: &mut [f32],
) {
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
            scores[h * m + i] = dot_for::<AVX2>(&q[h * hd..(h + 1) * hd], k) * scale;
        }
    }
    let inv: Vec<f32> = scores.chunks_mut(m.max(1)).map(softmax).collect();
    out.fill(0.0);
    if !hd.is_multiple_of(SLICE) {
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
        return;
    }
    // The same sums, position by position into each output element, but a
    // slice of one head's output stays in registers over a chunk of
    // positions instead of being loaded and stored per position.
    let mut vbuf = vec![0f32; CHUNK * hd];
    let mut p = [0f32; CHUNK];
    for c0 in (0..m).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(m);
        for i in c0..c1 {
            let v = E::as_f32(&values[rows.at(rows.first + i)], &mut buf);
            vbuf[(i - c0) * hd..(i - c0 + 1) * hd].copy_from_slice(v);
        }
        for h in 0..heads {
            let p = &mut p[..c1 - c0];
            for (pi, i) in p.iter_mut().zip(c0..c1) {
                *pi = scores[h * m + i] * inv[h];
            }
            for s0 in (0..hd).step_by(SLICE) {
                let o = &mut out[h * hd + s0..h * hd + s0 + SLICE];
                let mut acc = [0f32; SLICE];
                acc.copy_from_slice(o);
                for (i, &pi) in p.iter().enumerate() {
                    let v = &vbuf[i * hd + s0..i * hd + s0 + SLICE];
                    for d in 0..SLICE {
                        acc[d] += pi * v[d];
                    }
                }
                o.copy_from_slice(&acc);
            }
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

#[inline(always)]
fn axpy(p: f32, x: &[f32], out: &mut [f32]) {
    for (acc, &v) in out.iter_mut().zip(x) {
        *acc += p * v;
    }
}

/// [`dot`], with explicit AVX2 when `AVX2` is set (the caller checked the
/// feature): the same products and sums in the same order, so the same bits.
#[inline(always)]
fn dot_for<const AVX2: bool>(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if AVX2 && a.len().is_multiple_of(8) && a.len() == b.len() {
        // SAFETY: `AVX2` is set only where the feature was detected; the
        // lengths were just checked.
        return unsafe { dot_avx2(a, b) };
    }
    dot(a, b)
}

/// [`dot`] for lengths that are a multiple of 8: one register of eight
/// lanes, each summed in order (multiply, then add: no fused steps), then
/// `((l0 + l4) + (l1 + l5)) + ((l2 + l6) + (l3 + l7))` and the empty tail.
///
/// # Safety
/// AVX2 is available; `a` and `b` have the same length, a multiple of 8.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = _mm256_setzero_ps();
    for c in (0..a.len()).step_by(8) {
        let p = _mm256_mul_ps(
            _mm256_loadu_ps(a.as_ptr().add(c)),
            _mm256_loadu_ps(b.as_ptr().add(c)),
        );
        acc = _mm256_add_ps(acc, p);
    }
    // [l0 + l4, l1 + l5, l2 + l6, l3 + l7], then pairs, then the two pairs.
    let s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_hadd_ps(s, s);
    _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h))) + 0.0
}

/// A dot product in eight lanes: head sizes (16 to 256) are short, and
/// eight independent sums vectorise into one AVX register.
#[inline(always)]
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// The chunked, register-blocked sum over values (head sizes that are
    /// multiples of 64) gives the bits of the plain position-by-position
    /// loop, for both cache formats and for window-skipped positions.
    #[test]
    fn blocked_value_sums_match_the_plain_loop() {
        for (hd, len, first) in [(64, 1, 0), (64, 77, 0), (128, 70, 5)] {
            let heads = 3;
            let q = values(heads * hd, 1);
            let k = values(len * hd, 2);
            let v = values(len * hd, 3);
            let rows = Rows {
                base: 0,
                first,
                len,
                head_dim: hd,
            };
            let plain = |k: &[f32], v: &[f32]| {
                let m = len - first;
                let scale = 1.0 / (hd as f32).sqrt();
                let mut scores = vec![0f32; heads * m];
                for i in 0..m {
                    for h in 0..heads {
                        scores[h * m + i] = dot(
                            &q[h * hd..(h + 1) * hd],
                            &k[(first + i) * hd..(first + i + 1) * hd],
                        ) * scale;
                    }
                }
                let inv: Vec<f32> = scores.chunks_mut(m).map(softmax).collect();
                let mut out = vec![0f32; heads * hd];
                for i in 0..m {
                    for h in 0..heads {
                        axpy(
                            scores[h * m + i] * inv[h],
                            &v[(first + i) * hd..(first + i + 1) * hd],
                            &mut out[h * hd..(h + 1) * hd],
                        );
                    }
                }
                out
            };
            let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            let mut out = vec![0f32; heads * hd];
            attend(&q, &k, &v, &rows, &mut out);
            assert_eq!(bits(&out), bits(&plain(&k, &v)), "f32, head size {hd}");
            assert!(out.iter().any(|&x| x != 0.0));
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let kw: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let vw: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            attend(&q, &k16, &v16, &rows, &mut out);
            assert_eq!(bits(&out), bits(&plain(&kw, &vw)), "f16, head size {hd}");
        }
    }
}
