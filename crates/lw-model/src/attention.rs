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
    Q8(Q8Slice<'a>),
}

/// Numbers held as llama.cpp's Q8_0 holds them: blocks of 32 i8 values
/// `q`, each with a scale `d` (f16); a number is `d · q`.
#[derive(Clone, Copy)]
pub struct Q8Slice<'a> {
    pub q: &'a [i8],
    /// One per 32 numbers.
    pub d: &'a [f16],
}

/// Shapes of the cache buffers: `[kv_heads, capacity, head_dim]`, slot
/// `p - offset` holding position `p`.
pub struct CacheView<'a> {
    pub keys: KvSlice<'a>,
    pub values: KvSlice<'a>,
    pub capacity: usize,
    /// The position held in slot 0 (a sliding layer's dropped positions).
    pub offset: usize,
    /// Valid positions (the new token's included).
    pub len: usize,
}

/// A head's size and how its scores are formed: `q·k / √dim`, then, where
/// the model caps them (Gemma 2), `cap · tanh(s / cap)`.
#[derive(Clone, Copy, Debug)]
pub struct Head {
    pub dim: usize,
    pub softcap: Option<f32>,
}

/// Positions per part of an attention: the positions a query attends to are
/// cut at multiples of `PART` (counted from the sequence's start), each
/// part is attended to on its own, and the parts are merged ([`merge`]).
/// Where the parts fall depends only on the positions, never on threads or
/// batching, so a position's result has the same bits however it was
/// computed; a caller may run the parts of one query on different threads
/// (decode at depth, where the kv heads are fewer than the threads). Below
/// `PART` positions there is one part, computed as in one pass.
pub const PART: usize = 4096;

/// The parts of attention over positions `first..len` ([`PART`]).
pub fn parts(first: usize, len: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let mut at = first;
    std::iter::from_fn(move || {
        (at < len).then(|| {
            let end = ((at / PART + 1) * PART).min(len);
            let part = at..end;
            at = end;
            part
        })
    })
}

/// The first position a query at `len - 1` attends to, given the window.
pub fn first_position(len: usize, window: Option<usize>) -> usize {
    window.map_or(0, |w| len.saturating_sub(w))
}

/// Attention of the query heads `q` (`[group, head_dim]`, rope applied) that
/// share kv head `kv`, over the view's first `len` positions, written to
/// `out` (`[group, head_dim]`). Keys older than `window` positions are
/// skipped. Every position of every sequence goes through this one
/// function or through [`attend_part`] and [`merge`] with the same parts,
/// prefill and decode alike, so a position's result never depends on how
/// positions were grouped into steps.
pub fn attend_group(
    q: &[f32],
    cache: &CacheView,
    kv: usize,
    head: Head,
    window: Option<usize>,
    out: &mut [f32],
) {
    let head_dim = head.dim;
    let heads = q.len() / head_dim;
    let first = first_position(cache.len, window);
    let count = parts(first, cache.len).count();
    let slot = slot_len(heads, head_dim);
    crate::pool::with_local(&SLOTS, |slots| {
        slots.resize(count.max(1) * slot, 0.0);
        if count <= 1 {
            let part = parts(first, cache.len).next().unwrap_or(0..0);
            let stats = &mut slots[heads * head_dim..slot];
            return attend_part(q, cache, kv, head, part, out, stats);
        }
        for (part, o) in parts(first, cache.len).zip(slots.chunks_mut(slot)) {
            let (o, stats) = o.split_at_mut(heads * head_dim);
            attend_part(q, cache, kv, head, part, o, stats);
        }
        merge(&slots[..count * slot], head_dim, out);
    })
}

thread_local! {
    /// [`attend_group`]'s parts before they are merged, kept per thread.
    static SLOTS: std::cell::RefCell<Vec<f32>> = std::cell::RefCell::default();
}

/// Numbers per part that [`merge`] takes for `heads` query heads: the
/// part's output (`[heads, head_dim]`), then its `[max, inv]` per head.
pub fn slot_len(heads: usize, head_dim: usize) -> usize {
    heads * (head_dim + 2)
}

/// Attention of the query heads `q` that share kv head `kv` over positions
/// `part` of the view (one of [`parts`]): each head's output over the part
/// alone, softmax-normalized, to `out` (`[group, head_dim]`), and per head
/// the largest score and the inverse of the sum of the exponentials to
/// `stats` (`[max, inv]` per head), which [`merge`] takes.
pub fn attend_part(
    q: &[f32],
    cache: &CacheView,
    kv: usize,
    head: Head,
    part: std::ops::Range<usize>,
    out: &mut [f32],
    stats: &mut [f32],
) {
    if part.is_empty() {
        out.fill(0.0);
        stats.fill(0.0);
        return;
    }
    assert!(
        part.start >= cache.offset,
        "position {} was dropped from a sliding layer's cache (it holds {} on)",
        part.start,
        cache.offset
    );
    // Positions to slots: the view's buffers start at position `offset`.
    let rows = Rows {
        base: kv * cache.capacity * head.dim,
        first: part.start - cache.offset,
        len: part.end - cache.offset,
        head_dim: head.dim,
        softcap: head.softcap,
    };
    match (cache.keys, cache.values) {
        (KvSlice::F32(k), KvSlice::F32(v)) => attend(q, k, v, &rows, out, stats),
        (KvSlice::F16(k), KvSlice::F16(v)) => attend(q, k, v, &rows, out, stats),
        (KvSlice::Q8(k), KvSlice::Q8(v)) => attend(q, k, v, &rows, out, stats),
        _ => unreachable!("keys and values share a format"),
    }
}

/// The parts' results `slots` (one [`slot_len`] per part, in part order:
/// [`attend_part`]'s output, then its stats) merged into the attention over
/// all of them, `out` (`[group, head_dim]`). Per head, with `M` the largest
/// of the parts' maxima, part `j` weighs `e^(m_j − M) / inv_j` (its sum of
/// exponentials rescaled to `M`), the weights are summed in part order, and
/// the output is the sum of each part's output times its weight over that
/// total, in part order.
pub fn merge(slots: &[f32], head_dim: usize, out: &mut [f32]) {
    let heads = out.len() / head_dim;
    let slot = slot_len(heads, head_dim);
    let n = slots.len() / slot;
    for (h, o) in out.chunks_mut(head_dim).enumerate() {
        let stat = |j: usize| {
            let at = j * slot + heads * head_dim + 2 * h;
            (slots[at], slots[at + 1])
        };
        let top = (0..n).map(|j| stat(j).0).fold(f32::NEG_INFINITY, f32::max);
        let weight = |j: usize| {
            let (m, inv) = stat(j);
            exp_nonpositive(m - top) / inv
        };
        let total: f32 = (0..n).map(weight).sum();
        o.fill(0.0);
        for j in 0..n {
            let w = weight(j);
            let part = &slots[j * slot + h * head_dim..j * slot + (h + 1) * head_dim];
            axpy(w / total, part, o);
        }
    }
}

impl KvSlice<'_> {
    /// Numbers `range` as f32, written to `out` (of the range's length):
    /// the numbers attention reads, bit for bit.
    pub fn widen_into(self, range: Span, out: &mut [f32]) {
        match self {
            KvSlice::F32(v) => out.copy_from_slice(&v[range]),
            KvSlice::F16(v) => {
                v.as_f32::<false>(range, out);
            }
            KvSlice::Q8(v) => {
                v.as_f32::<false>(range, out);
            }
        }
    }
}

/// A range of numbers in a cache buffer.
type Span = std::ops::Range<usize>;

/// Cached numbers in one format, read as f32.
trait KvRows: Copy {
    /// Numbers `range` as f32: themselves, or widened into `buf` (of the
    /// range's length). `AVX2`: the caller checked AVX2 and F16C, and
    /// explicit vectors give the same numbers.
    fn as_f32<'s, const AVX2: bool>(self, range: Span, buf: &'s mut [f32]) -> &'s [f32]
    where
        Self: 's;
}

impl KvRows for &[f32] {
    #[inline(always)]
    fn as_f32<'s, const AVX2: bool>(self, range: Span, _buf: &'s mut [f32]) -> &'s [f32]
    where
        Self: 's,
    {
        &self[range]
    }
}

impl KvRows for &[f16] {
    /// Widened with F16C, eight at a time in the caller's code where it
    /// has the features (a conversion is exact either way).
    #[inline(always)]
    fn as_f32<'s, const AVX2: bool>(self, range: Span, buf: &'s mut [f32]) -> &'s [f32]
    where
        Self: 's,
    {
        let src = &self[range];
        #[cfg(target_arch = "x86_64")]
        if AVX2 && src.len().is_multiple_of(8) {
            // SAFETY: `AVX2` is set only where AVX2 and F16C were detected.
            unsafe { widen_f16_avx2(src, buf) };
            return buf;
        }
        src.convert_to_f32_slice(buf);
        buf
    }
}

/// `src` widened into `buf` (of its length, a multiple of 8). A function
/// compiled with the features itself: written inline in the generic
/// reader, each eight numbers went through a store and a reload on the
/// stack, which cost a fifth of f16 attention's time when the cache sits in
/// the L3 cache.
///
/// # Safety
/// AVX2 and F16C are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen_f16_avx2(src: &[f16], buf: &mut [f32]) {
    use std::arch::x86_64::*;
    for (o, h) in buf.chunks_exact_mut(8).zip(src.chunks_exact(8)) {
        let v = _mm_loadu_si128(h.as_ptr() as *const __m128i);
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_cvtph_ps(v));
    }
}

impl KvRows for Q8Slice<'_> {
    /// `d · q`, a block of 32 at a time (ranges start and end on blocks:
    /// whole positions of a head size that is a multiple of 32), eight at a
    /// time where the caller has AVX2 (the same multiplies).
    #[inline(always)]
    fn as_f32<'s, const AVX2: bool>(self, range: Span, buf: &'s mut [f32]) -> &'s [f32]
    where
        Self: 's,
    {
        let q = &self.q[range.clone()];
        let d = &self.d[range.start / 32..range.end / 32];
        for ((out, block), d) in buf.chunks_exact_mut(32).zip(q.chunks_exact(32)).zip(d) {
            let d = d.to_f32();
            #[cfg(target_arch = "x86_64")]
            if AVX2 {
                // SAFETY: `AVX2` is set only where AVX2 and F16C were
                // detected.
                unsafe { widen_q8_avx2(d, block, out) };
                continue;
            }
            for (o, &x) in out.iter_mut().zip(block) {
                *o = d * x as f32;
            }
        }
        buf
    }
}

/// `d · block` (32 numbers) into `out`, eight at a time (compiled as
/// [`widen_f16_avx2`] is, for the same reason).
///
/// # Safety
/// AVX2 and F16C are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn widen_q8_avx2(d: f32, block: &[i8], out: &mut [f32]) {
    use std::arch::x86_64::*;
    for (o, b) in out.chunks_exact_mut(8).zip(block.chunks_exact(8)) {
        let v = _mm_loadl_epi64(b.as_ptr() as *const __m128i);
        let f = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(_mm256_set1_ps(d), f));
    }
}

/// Quantizes `x` (a multiple of 32 long) to Q8_0 blocks: per 32, the scale
/// `d = amax / 127` kept as f16, and values `round(x / d)`.
pub fn quantize_q8(x: &[f32], q: &mut [i8], d: &mut [f16]) {
    for ((x, q), d) in x.chunks_exact(32).zip(q.chunks_exact_mut(32)).zip(d) {
        let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        *d = f16::from_f32(amax / 127.0);
        let scale = d.to_f32();
        let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(x) {
            *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
        }
    }
}

/// Where the rows of one kv head lie in a layer's buffer.
struct Rows {
    base: usize,
    first: usize,
    len: usize,
    head_dim: usize,
    softcap: Option<f32>,
}

impl Rows {
    fn at(&self, t: usize) -> std::ops::Range<usize> {
        self.base + t * self.head_dim..self.base + (t + 1) * self.head_dim
    }
}

/// Scores and widened keys of one attention task, kept per thread and
/// reused (a decoded token allocates nothing here once they have grown).
#[derive(Default)]
struct Buffers {
    scores: Vec<f32>,
    buf: Vec<f32>,
    inv: Vec<f32>,
}

thread_local! {
    static BUFFERS: std::cell::RefCell<Buffers> = std::cell::RefCell::default();
}

fn attend<E: KvRows>(
    q: &[f32],
    keys: E,
    values: E,
    rows: &Rows,
    out: &mut [f32],
    stats: &mut [f32],
) {
    crate::pool::with_local(&BUFFERS, |b| {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were just checked.
            return unsafe { attend_avx2(q, keys, values, rows, (out, stats), b) };
        }
        attend_body::<E, false>(q, keys, values, rows, (out, stats), b)
    })
}

/// [`attend_body`] compiled for AVX2: the same operations in the same order
/// (no fused multiply-adds), eight lanes wide, so the same bits.
///
/// # Safety
/// AVX2 and F16C are available.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn attend_avx2<E: KvRows>(
    q: &[f32],
    keys: E,
    values: E,
    rows: &Rows,
    out: (&mut [f32], &mut [f32]),
    b: &mut Buffers,
) {
    attend_body::<E, true>(q, keys, values, rows, out, b)
}

/// Positions whose values are widened together, and the width of an output
/// slice kept in registers while they are summed.
const CHUNK: usize = 32;
const SLICE: usize = 64;

/// `AVX2`: the caller checked that the CPU has AVX2 and F16C.
#[inline(always)]
fn attend_body<E: KvRows, const AVX2: bool>(
    q: &[f32],
    keys: E,
    values: E,
    rows: &Rows,
    (out, stats): (&mut [f32], &mut [f32]),
    b: &mut Buffers,
) {
    let hd = rows.head_dim;
    let heads = q.len() / hd;
    let m = rows.len - rows.first;
    let scale = 1.0 / (hd as f32).sqrt();
    // Positions `i0..i1` of a buffer, as f32 (widened into `buf` if need be).
    let span =
        |i0: usize, i1: usize| rows.at(rows.first + i0).start..rows.at(rows.first + i1).start;
    // scores[h * m + i]: head h, position first + i.
    b.scores.resize(heads * m, 0.0);
    b.buf.resize(CHUNK * hd, 0.0);
    b.inv.resize(heads, 0.0);
    let (scores, buf, inv) = (
        &mut b.scores[..heads * m],
        &mut b.buf[..CHUNK * hd],
        &mut b.inv[..heads],
    );
    for c0 in (0..m).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(m);
        let ks = keys.as_f32::<AVX2>(span(c0, c1), &mut buf[..(c1 - c0) * hd]);
        for h in 0..heads {
            let qh = &q[h * hd..(h + 1) * hd];
            let row = &mut scores[h * m + c0..h * m + c1];
            let mut i = 0;
            while i + 8 <= c1 - c0 {
                let d = dots8_for::<AVX2>(qh, &ks[i * hd..(i + 8) * hd]);
                for (s, d) in row[i..i + 8].iter_mut().zip(d) {
                    *s = d * scale;
                }
                i += 8;
            }
            for (j, s) in row.iter_mut().enumerate().skip(i) {
                *s = dot(qh, &ks[j * hd..(j + 1) * hd]) * scale;
            }
        }
    }
    if let Some(cap) = rows.softcap {
        for s in scores.iter_mut() {
            *s = cap * (*s / cap).tanh();
        }
    }
    // A plain loop, so that the softmax is compiled for this function's
    // features (an iterator adapter would be compiled without them).
    for (h, i) in inv.iter_mut().enumerate() {
        let (max, sum_inv) = softmax_for::<AVX2>(&mut scores[h * m..(h + 1) * m]);
        *i = sum_inv;
        stats[2 * h] = max;
        stats[2 * h + 1] = sum_inv;
    }
    out.fill(0.0);
    if !hd.is_multiple_of(SLICE) {
        for i in 0..m {
            let v = values.as_f32::<AVX2>(span(i, i + 1), &mut buf[..hd]);
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
    let mut p = [0f32; CHUNK];
    for c0 in (0..m).step_by(CHUNK) {
        let c1 = (c0 + CHUNK).min(m);
        let vs = values.as_f32::<AVX2>(span(c0, c1), &mut buf[..(c1 - c0) * hd]);
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
                    let v = &vs[i * hd + s0..i * hd + s0 + SLICE];
                    for d in 0..SLICE {
                        acc[d] += pi * v[d];
                    }
                }
                o.copy_from_slice(&acc);
            }
        }
    }
}

/// Exponentiates `scores` in place (minus their maximum); returns the
/// maximum and 1 / sum.
/// The sum runs in eight lanes (score `i` into lane `i % 8`), then as in
/// [`tree8`]; with `AVX2` (the caller checked the feature), eight scores at
/// a time in explicit AVX2 with the same operations, so the same bits.
#[inline(always)]
fn softmax_for<const AVX2: bool>(scores: &mut [f32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if AVX2 {
        // SAFETY: `AVX2` is set only where the feature was detected.
        return unsafe { softmax_avx2(scores) };
    }
    softmax(scores)
}

/// [`softmax_for`] without explicit vectors.
fn softmax(scores: &mut [f32]) -> (f32, f32) {
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut lanes = [0f32; 8];
    for (i, s) in scores.iter_mut().enumerate() {
        *s = exp_nonpositive(*s - max);
        lanes[i % 8] += *s;
    }
    (max, 1.0 / tree8(lanes))
}

/// [`softmax`] eight scores at a time.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn softmax_avx2(scores: &mut [f32]) -> (f32, f32) {
    use std::arch::x86_64::*;
    let full = scores.len() / 8 * 8;
    let p = scores.as_mut_ptr();
    let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
    for c in (0..full).step_by(8) {
        vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(c)));
    }
    let mut m8 = [0f32; 8];
    _mm256_storeu_ps(m8.as_mut_ptr(), vmax);
    let max = scores[full..]
        .iter()
        .chain(&m8)
        .copied()
        .fold(f32::NEG_INFINITY, f32::max);
    let vm = _mm256_set1_ps(max);
    let mut sum = _mm256_setzero_ps();
    for c in (0..full).step_by(8) {
        let e = exp8_avx2(_mm256_sub_ps(_mm256_loadu_ps(p.add(c)), vm));
        _mm256_storeu_ps(p.add(c), e);
        sum = _mm256_add_ps(sum, e);
    }
    let mut lanes = [0f32; 8];
    _mm256_storeu_ps(lanes.as_mut_ptr(), sum);
    for (l, s) in lanes.iter_mut().zip(&mut scores[full..]) {
        *s = exp_nonpositive(*s - max);
        *l += *s;
    }
    (max, 1.0 / tree8(lanes))
}

/// [`exp_nonpositive`] of eight lanes, step for step.
///
/// # Safety
/// AVX2 is available.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn exp8_avx2(x: std::arch::x86_64::__m256) -> std::arch::x86_64::__m256 {
    use std::arch::x86_64::*;
    let set = _mm256_set1_ps;
    let floor = set(EXP_FLOOR);
    // `max(x, floor)` as `f32::max` gives it for numbers.
    let xc = _mm256_max_ps(x, floor);
    let t = _mm256_add_ps(
        _mm256_mul_ps(xc, set(std::f32::consts::LOG2_E)),
        set(EXP_MAGIC),
    );
    let n = _mm256_sub_ps(t, set(EXP_MAGIC));
    let r = _mm256_sub_ps(
        _mm256_sub_ps(xc, _mm256_mul_ps(n, set(EXP_LN2_HI))),
        _mm256_mul_ps(n, set(EXP_LN2_LO)),
    );
    let mut p = set(EXP_POLY[0]);
    for &c in &EXP_POLY[1..] {
        p = _mm256_add_ps(_mm256_mul_ps(p, r), set(c));
    }
    let e = _mm256_add_ps(
        _mm256_add_ps(_mm256_mul_ps(p, _mm256_mul_ps(r, r)), r),
        set(1.0),
    );
    let n_int = _mm256_sub_epi32(
        _mm256_castps_si256(t),
        _mm256_set1_epi32(EXP_MAGIC.to_bits() as i32),
    );
    let scale = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(n_int, _mm256_set1_epi32(127)),
        23,
    ));
    let keep = _mm256_cmp_ps(x, floor, _CMP_GE_OQ);
    _mm256_and_ps(_mm256_mul_ps(e, scale), keep)
}

/// `((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7))`.
#[inline(always)]
fn tree8(l: [f32; 8]) -> f32 {
    ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7]))
}

/// `e^x` for `x <= 0` (a score minus the maximum), within two units in the
/// last place; `0` below `-87` (under `1e-38`, where a softmax term no
/// longer counts). Written in plain arithmetic, without branches or fused
/// steps, so every build gives the same bits and [`exp8_avx2`] can repeat
/// it step for step, eight lanes at a time.
///
/// `x = n · ln 2 + r` with `n` the nearest integer to `x / ln 2` (rounded
/// with the `1.5 · 2^23` trick, whose low bits then hold `n`), `ln 2` split
/// in two so that `n · LN2_HI` is exact, and `e^r` on `|r| <= ln 2 / 2` a
/// degree-7 polynomial (Cephes' `expf` coefficients).
#[inline(always)]
fn exp_nonpositive(x: f32) -> f32 {
    let xc = x.max(EXP_FLOOR);
    let t = xc * std::f32::consts::LOG2_E + EXP_MAGIC;
    let n = t - EXP_MAGIC;
    let r = (xc - n * EXP_LN2_HI) - n * EXP_LN2_LO;
    let mut p = EXP_POLY[0];
    for &c in &EXP_POLY[1..] {
        p = p * r + c;
    }
    let e = (p * (r * r) + r) + 1.0;
    // The low bits of `t` hold `n` (-126..=0): 2^n from its exponent field.
    let n_int = t.to_bits() as i32 - EXP_MAGIC.to_bits() as i32;
    let scale = f32::from_bits(((n_int + 127) as u32) << 23);
    if x >= EXP_FLOOR {
        e * scale
    } else {
        0.0
    }
}

const EXP_FLOOR: f32 = -87.0;
const EXP_MAGIC: f32 = 12_582_912.0;
const EXP_LN2_HI: f32 = 0.693_359_4;
const EXP_LN2_LO: f32 = -2.121_944_4e-4;
/// `e^r ≈ 1 + r + r² · p(r)`, `p` highest power first.
const EXP_POLY: [f32; 6] = [
    1.987_569_1e-4,
    1.398_199_9e-3,
    8.333_452e-3,
    4.166_579_6e-2,
    0.166_666_65,
    0.5,
];

#[inline(always)]
fn axpy(p: f32, x: &[f32], out: &mut [f32]) {
    for (acc, &v) in out.iter_mut().zip(x) {
        *acc += p * v;
    }
}

/// [`dot`] of `q` with each of the eight rows of `keys` (`8 · q.len()`
/// values), with explicit AVX2 when `AVX2` is set (the caller checked the
/// feature): the same products and sums in the same order, so the same bits.
#[inline(always)]
fn dots8_for<const AVX2: bool>(q: &[f32], keys: &[f32]) -> [f32; 8] {
    let hd = q.len();
    #[cfg(target_arch = "x86_64")]
    if AVX2 && hd.is_multiple_of(8) && keys.len() == 8 * hd {
        // SAFETY: `AVX2` is set only where the feature was detected; the
        // lengths were just checked.
        return unsafe { dots8_avx2(q, keys) };
    }
    std::array::from_fn(|j| dot(q, &keys[j * hd..(j + 1) * hd]))
}

/// [`dot`] of `q` with eight keys at once, for lengths that are a multiple
/// of 8: one register of eight lane sums per key (multiply, then add: no
/// fused steps), then the eight registers reduced together by pairwise
/// horizontal adds, which add the lanes in [`dot`]'s order.
///
/// # Safety
/// AVX2 is available; `q.len()` is a multiple of 8 and `keys` holds eight
/// rows of that length.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn dots8_avx2(q: &[f32], keys: &[f32]) -> [f32; 8] {
    use std::arch::x86_64::*;
    let hd = q.len();
    let kp = keys.as_ptr();
    let mut acc = [_mm256_setzero_ps(); 8];
    for c in (0..hd).step_by(8) {
        let qv = _mm256_loadu_ps(q.as_ptr().add(c));
        for (j, a) in acc.iter_mut().enumerate() {
            let p = _mm256_mul_ps(qv, _mm256_loadu_ps(kp.add(j * hd + c)));
            *a = _mm256_add_ps(*a, p);
        }
    }
    // Per key: lanes [0+1, 2+3, ... | 4+5, 6+7, ...], then
    // [(0+1)+(2+3) of keys 0-3 | (4+5)+(6+7) of keys 0-3], and the halves
    // of keys 0-3 and 4-7 brought together and added.
    let h01 = _mm256_hadd_ps(acc[0], acc[1]);
    let h23 = _mm256_hadd_ps(acc[2], acc[3]);
    let h45 = _mm256_hadd_ps(acc[4], acc[5]);
    let h67 = _mm256_hadd_ps(acc[6], acc[7]);
    let lo = _mm256_hadd_ps(h01, h23);
    let hi = _mm256_hadd_ps(h45, h67);
    let first = _mm256_permute2f128_ps(lo, hi, 0x20);
    let second = _mm256_permute2f128_ps(lo, hi, 0x31);
    let mut out = [0f32; 8];
    _mm256_storeu_ps(out.as_mut_ptr(), _mm256_add_ps(first, second));
    out.map(|x| x + 0.0)
}

/// A dot product in eight lanes: head sizes (16 to 256) are short, and
/// eight independent sums vectorise into one AVX register. The lanes are
/// added as in [`tree8`], then the tail.
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
    tree8(acc) + tail
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
                softcap: None,
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
                let inv: Vec<f32> = scores.chunks_mut(m).map(|s| softmax(s).1).collect();
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
            let mut stats = vec![0f32; 2 * heads];
            attend(&q, &k[..], &v[..], &rows, &mut out, &mut stats);
            assert_eq!(bits(&out), bits(&plain(&k, &v)), "f32, head size {hd}");
            assert!(out.iter().any(|&x| x != 0.0));
            let k16: Vec<f16> = k.iter().map(|&x| f16::from_f32(x)).collect();
            let v16: Vec<f16> = v.iter().map(|&x| f16::from_f32(x)).collect();
            let kw: Vec<f32> = k16.iter().map(|x| x.to_f32()).collect();
            let vw: Vec<f32> = v16.iter().map(|x| x.to_f32()).collect();
            attend(&q, &k16[..], &v16[..], &rows, &mut out, &mut stats);
            assert_eq!(bits(&out), bits(&plain(&kw, &vw)), "f16, head size {hd}");
            if hd % 32 == 0 {
                let q8 = |x: &[f32]| {
                    let mut q = vec![0i8; x.len()];
                    let mut d = vec![f16::ZERO; x.len() / 32];
                    quantize_q8(x, &mut q, &mut d);
                    let wide: Vec<f32> = q
                        .iter()
                        .enumerate()
                        .map(|(i, &v)| d[i / 32].to_f32() * v as f32)
                        .collect();
                    (q, d, wide)
                };
                let (kq, kd, kw) = q8(&k);
                let (vq, vd, vw) = q8(&v);
                // Within half a step (values within ±1: a step is at most
                // 1/127, and the f16 scale is within 0.1% of amax/127).
                for (x, w) in k.iter().zip(&kw) {
                    assert!((x - w).abs() <= 0.5 * 1.001 / 127.0 + 1e-6, "{x} {w}");
                }
                let (ks, vs) = (Q8Slice { q: &kq, d: &kd }, Q8Slice { q: &vq, d: &vd });
                attend(&q, ks, vs, &rows, &mut out, &mut stats);
                assert_eq!(bits(&out), bits(&plain(&kw, &vw)), "q8, head size {hd}");
            }
        }
    }

    /// A long attention is cut into parts at multiples of [`PART`] and
    /// merged: it matches the softmax computed in f64, with and without a
    /// window, and parts computed on their own (in any order, as threads
    /// would) merge to the same bits as [`attend_group`].
    #[test]
    fn long_attention_is_merged_from_parts_and_matches_the_plain_softmax() {
        assert_eq!(parts(0, 1).collect::<Vec<_>>(), vec![0..1]);
        assert_eq!(
            parts(1000, 2 * PART + 52).collect::<Vec<_>>(),
            vec![1000..PART, PART..2 * PART, 2 * PART..2 * PART + 52]
        );
        assert_eq!(parts(5, 5).count(), 0);
        let (hd, heads, len) = (64, 3, 2 * PART + 300);
        let q: Vec<f32> = values(heads * hd, 4).iter().map(|x| 4.0 * x).collect();
        let k = values(len * hd, 5);
        let v = values(len * hd, 6);
        let cache = CacheView {
            keys: KvSlice::F32(&k),
            values: KvSlice::F32(&v),
            capacity: len,
            offset: 0,
            len,
        };
        let bits = |x: &[f32]| x.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        for (window, softcap) in [
            (None, None),
            (Some(1500), None),
            (Some(100), None),
            (None, Some(0.5f32)),
        ] {
            let head = Head { dim: hd, softcap };
            let mut out = vec![0f32; heads * hd];
            attend_group(&q, &cache, 0, head, window, &mut out);
            let first = first_position(len, window);
            for h in 0..heads {
                let qh = &q[h * hd..(h + 1) * hd];
                let scores: Vec<f64> = (first..len)
                    .map(|t| {
                        let kt = &k[t * hd..(t + 1) * hd];
                        qh.iter()
                            .zip(kt)
                            .map(|(&a, &b)| a as f64 * b as f64)
                            .sum::<f64>()
                            / (hd as f64).sqrt()
                    })
                    .map(|s| softcap.map_or(s, |c| c as f64 * (s / c as f64).tanh()))
                    .collect();
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for d in 0..hd {
                    let want: f64 = (first..len)
                        .zip(&e)
                        .map(|(t, &w)| w * v[t * hd + d] as f64)
                        .sum::<f64>()
                        / sum;
                    let got = out[h * hd + d] as f64;
                    assert!(
                        (got - want).abs() <= 2e-5 * (1.0 + want.abs()),
                        "window {window:?} cap {softcap:?} head {h} element {d}: {got} against {want}"
                    );
                }
            }
            let all: Vec<_> = parts(first, len).collect();
            assert_eq!(all.len() > 1, window != Some(100), "{all:?}");
            if softcap.is_some() {
                // The cap changes the result (scores here reach ±2).
                let mut plain_out = vec![0f32; heads * hd];
                let plain = Head {
                    dim: hd,
                    softcap: None,
                };
                attend_group(&q, &cache, 0, plain, window, &mut plain_out);
                assert_ne!(bits(&plain_out), bits(&out));
            }
            let slot = slot_len(heads, hd);
            let mut slots = vec![0f32; all.len() * slot];
            for (i, part) in all.iter().enumerate().rev() {
                let (o, stats) = slots[i * slot..(i + 1) * slot].split_at_mut(heads * hd);
                attend_part(&q, &cache, 0, head, part.clone(), o, stats);
            }
            let mut merged = vec![0f32; heads * hd];
            merge(&slots, hd, &mut merged);
            assert_eq!(bits(&merged), bits(&out), "window {window:?}");
        }
    }

    /// The branch-free exponential stays within two units in the last
    /// place of the library's over the range softmax uses, and is exactly
    /// 1 at 0 and 0 far below.
    #[test]
    fn exp_matches_the_library_within_two_ulps() {
        let mut worst = 0u32;
        for i in 0..=870_000 {
            let x = -(i as f32) * 1e-4;
            let (ours, lib) = (exp_nonpositive(x), x.exp());
            let ulps = (ours.to_bits() as i64 - lib.to_bits() as i64).unsigned_abs() as u32;
            worst = worst.max(ulps);
            assert!(ulps <= 2, "e^{x}: {ours} against {lib}");
        }
        assert!(worst >= 1, "the comparison ran");
        assert_eq!(exp_nonpositive(0.0), 1.0);
        assert_eq!(exp_nonpositive(-100.0), 0.0);
        assert_eq!(exp_nonpositive(f32::NEG_INFINITY), 0.0);
    }

    /// Eight keys at once give each key the bits of the one-key product.
    #[test]
    fn eight_key_dots_match_single_dots() {
        #[cfg(target_arch = "x86_64")]
        let avx2 = std::arch::is_x86_feature_detected!("avx2");
        #[cfg(not(target_arch = "x86_64"))]
        let avx2 = false;
        for hd in [8, 64, 128, 12] {
            let q = values(hd, 4);
            let keys = values(8 * hd, 5);
            let eight = if avx2 {
                dots8_for::<true>(&q, &keys)
            } else {
                dots8_for::<false>(&q, &keys)
            };
            for (j, d) in eight.iter().enumerate() {
                assert_eq!(d.to_bits(), dot(&q, &keys[j * hd..(j + 1) * hd]).to_bits());
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// Timing only: `cargo test --release -p lw-model --lib attention::speed -- --ignored --nocapture`.
    /// Every layer has its own cache, so reads come from memory.
    #[test]
    #[ignore]
    fn attend_speed_at_depth() {
        let (hd, heads, kvh, len, cap, layers) = (64, 3, 3, 6000, 8192, 30);
        let q: Vec<f32> = crate::test_values(heads * hd, 3);
        let mut out = vec![0f32; heads * hd];
        let n = kvh * cap * hd;
        let k: Vec<Vec<f32>> = (0..layers)
            .map(|l| crate::test_values(n, 10 + l as u64))
            .collect();
        let v: Vec<Vec<f32>> = (0..layers)
            .map(|l| crate::test_values(n, 100 + l as u64))
            .collect();
        let w16 = |x: &Vec<Vec<f32>>| -> Vec<Vec<f16>> {
            x.iter()
                .map(|x| x.iter().map(|&x| f16::from_f32(x)).collect())
                .collect()
        };
        let (k16, v16) = (w16(&k), w16(&v));
        let w8 = |x: &Vec<Vec<f32>>| -> Vec<(Vec<i8>, Vec<f16>)> {
            x.iter()
                .map(|x| {
                    let mut q = vec![0i8; x.len()];
                    let mut d = vec![f16::ZERO; x.len() / 32];
                    quantize_q8(x, &mut q, &mut d);
                    (q, d)
                })
                .collect()
        };
        let (k8, v8) = (w8(&k), w8(&v));
        let head = Head {
            dim: hd,
            softcap: None,
        };
        for (name, bytes) in [("f32", 4.0), ("f16", 2.0), ("q8_0", 34.0 / 32.0)] {
            let cache = |l: usize| {
                let (keys, values) = match name {
                    "f32" => (KvSlice::F32(&k[l]), KvSlice::F32(&v[l])),
                    "f16" => (KvSlice::F16(&k16[l]), KvSlice::F16(&v16[l])),
                    _ => (
                        KvSlice::Q8(Q8Slice {
                            q: &k8[l].0,
                            d: &k8[l].1,
                        }),
                        KvSlice::Q8(Q8Slice {
                            q: &v8[l].0,
                            d: &v8[l].1,
                        }),
                    ),
                };
                CacheView {
                    keys,
                    values,
                    capacity: cap,
                    offset: 0,
                    len,
                }
            };
            let mut run = || {
                for l in 0..layers {
                    let c = cache(l);
                    for kv in 0..kvh {
                        attend_group(&q, &c, kv, head, None, &mut out);
                    }
                }
            };
            run();
            let dt = (0..7)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..3 {
                        run();
                    }
                    t.elapsed().as_secs_f64() / 3.0
                })
                .fold(f64::INFINITY, f64::min);
            let gb = (layers * kvh * len * hd * 2) as f64 * bytes / 1e9;
            println!(
                "{name}: {:.2} ms per token, {:.1} GB/s (1 thread)",
                dt * 1e3,
                gb / dt
            );
        }
    }
}
