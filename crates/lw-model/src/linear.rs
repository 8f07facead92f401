//! Linear layers and the matrix-vector kernel that decoding spends its time in.
//!
//! Decoding one token multiplies a single activation row by every weight
//! matrix: it is bound by how fast the weights stream from memory. The kernel
//! here reads each weight row once for all (few) activation rows, converts
//! half-precision weights to f32 in registers (so bf16/f16 weights cost half
//! the bandwidth of f32 ones), and splits the rows over the thread pool.
//! Longer inputs (prefill) take the same kernel: each output is the same dot
//! product, summed in the same order, whatever the number of input rows, so a
//! position's result does not depend on how it was batched.

use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Storage, Tensor};
use half::{bf16, f16};

use crate::error::ModelError;
use crate::quant::QMatrix;

/// A weight element the kernel can widen to f32.
pub(crate) trait Element: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}
impl Element for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}
impl Element for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: a shift, which vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}
impl Element for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// A weight matrix `[out, in]`: dense in its load dtype, or block-quantized.
#[derive(Debug, Clone)]
pub enum Weight {
    Dense(Tensor),
    Quant(QMatrix),
}

impl Weight {
    /// `(out, in)`.
    pub fn dims(&self) -> Result<(usize, usize), ModelError> {
        match self {
            Weight::Dense(t) => Ok(t.dims2()?),
            Weight::Quant(q) => Ok((q.rows(), q.cols())),
        }
    }

    /// Bytes read per product (what decoding streams from memory).
    pub fn size_bytes(&self) -> usize {
        match self {
            Weight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Weight::Quant(q) => q.bytes().len(),
        }
    }

    /// Row `r` (`[in]`) as f32 values, into `out`.
    pub fn row_into(&self, r: usize, out: &mut [f32]) -> Result<(), ModelError> {
        match self {
            Weight::Quant(q) => q.dequantize_row(r, out),
            Weight::Dense(w) => {
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    return Err(candle_core::Error::Msg("weights must be on the CPU".into()).into());
                };
                let k = out.len();
                let at = layout.start_offset() + r * k;
                fn widen<T: Element>(src: &[T], out: &mut [f32]) {
                    out.iter_mut().zip(src).for_each(|(o, &v)| *o = v.widen())
                }
                match w.dtype() {
                    DType::F32 => out.copy_from_slice(&cpu.as_slice::<f32>()?[at..at + k]),
                    DType::BF16 => widen(&cpu.as_slice::<bf16>()?[at..at + k], out),
                    DType::F16 => widen(&cpu.as_slice::<f16>()?[at..at + k], out),
                    other => {
                        return Err(candle_core::Error::Msg(format!(
                            "unsupported weight dtype {other:?}"
                        ))
                        .into())
                    }
                }
            }
        }
        Ok(())
    }

    /// `[rows, in]` f32 values → `[rows, out]` f32 values.
    fn product(&self, xs: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let (n, _) = self.dims()?;
        let mut out = vec![0f32; rows * n];
        self.product_into(xs, rows, &mut out)?;
        Ok(out)
    }

    /// [`Weight::product`] into `out` (`[rows, out]`).
    fn product_into(&self, xs: &[f32], rows: usize, out: &mut [f32]) -> Result<(), ModelError> {
        let (n, k) = self.dims()?;
        let out = &mut out[..rows * n];
        match self {
            Weight::Quant(q) => q.matmul(xs, out),
            Weight::Dense(w) => {
                let (storage, layout) = w.storage_and_layout();
                let Storage::Cpu(cpu) = &*storage else {
                    return Err(candle_core::Error::Msg(
                        "linear: weights must be on the CPU".into(),
                    )
                    .into());
                };
                let start = layout.start_offset();
                match w.dtype() {
                    DType::F32 => {
                        small_matmul(&cpu.as_slice::<f32>()?[start..], xs, out, rows, n, k)
                    }
                    DType::BF16 => {
                        small_matmul(&cpu.as_slice::<bf16>()?[start..], xs, out, rows, n, k)
                    }
                    DType::F16 => {
                        small_matmul(&cpu.as_slice::<f16>()?[start..], xs, out, rows, n, k)
                    }
                    other => {
                        return Err(candle_core::Error::Msg(format!(
                            "linear: unsupported weight dtype {other:?}"
                        ))
                        .into())
                    }
                }
            }
        }
        Ok(())
    }
}

/// Weight bytes the products have read since the process started: each
/// product reads its whole matrix once, whatever the number of rows. What a
/// decoded token streams from memory (mixtures of experts: only the experts
/// that ran).
static WEIGHT_BYTES_READ: AtomicU64 = AtomicU64::new(0);

/// [`WEIGHT_BYTES_READ`]'s count.
pub fn weight_bytes_read() -> u64 {
    WEIGHT_BYTES_READ.load(Ordering::Relaxed)
}

/// `y = x · Wᵀ + b` with `W` of shape `[out, in]`, kept in its load format.
/// `W` may be several matrices stacked by rows (`[q; k; v]`) that are kept
/// apart because their formats differ (a Q4_K_M file mixes Q4_K and Q6_K).
#[derive(Debug, Clone)]
pub struct Linear {
    parts: Vec<Weight>,
    bias: Option<Tensor>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear {
            parts: vec![Weight::Dense(weight)],
            bias,
        }
    }

    /// Stacked parts with the same input width.
    pub fn from_parts(parts: Vec<Weight>, bias: Option<Tensor>) -> Self {
        Linear { parts, bias }
    }

    pub fn parts(&self) -> &[Weight] {
        &self.parts
    }

    /// Bytes of weights one product reads.
    pub fn size_bytes(&self) -> usize {
        self.parts.iter().map(Weight::size_bytes).sum()
    }

    /// `x`: `[rows, in]` → `[rows, out]` f32 ([`Linear::forward_into`]).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let rows = x.dims2()?.0;
        let x = x.to_dtype(DType::F32)?;
        let mut out = Vec::new();
        with_f32(&x, |xs| self.forward_into(xs, rows, &mut out))??;
        let width = out.len() / rows.max(1);
        Ok(Tensor::from_vec(out, (rows, width), &Device::Cpu)?)
    }

    /// `x`: `[rows, in]` f32 → `out`: `[rows, out]` f32 (resized to it; no
    /// allocation once it has the room, unless the parts' formats differ
    /// and there are several rows).
    pub fn forward_into(
        &self,
        x: &[f32],
        rows: usize,
        out: &mut Vec<f32>,
    ) -> Result<(), ModelError> {
        WEIGHT_BYTES_READ.fetch_add(self.size_bytes() as u64, Ordering::Relaxed);
        let mut total = 0;
        for p in &self.parts {
            let (n, k) = p.dims()?;
            if x.len() != rows * k {
                return Err(candle_core::Error::Msg(format!(
                    "linear: {} inputs for {rows} rows of a weight of shape [{n}, {k}]",
                    x.len()
                ))
                .into());
            }
            total += n;
        }
        out.resize(rows * total, 0.0);
        // The parts as quantized matrices, on the stack (no allocation).
        let mut quant: [Option<&QMatrix>; 4] = [None; 4];
        for (q, p) in quant.iter_mut().zip(&self.parts) {
            *q = match p {
                Weight::Quant(m) => Some(m),
                Weight::Dense(_) => None,
            };
        }
        let stacked = match quant {
            _ if self.parts.len() < 2 || self.parts.len() > 4 => false,
            [Some(a), Some(b), None, None] => QMatrix::matmul_stacked(&[a, b], x, out),
            [Some(a), Some(b), Some(c), None] => QMatrix::matmul_stacked(&[a, b, c], x, out),
            [Some(a), Some(b), Some(c), Some(d)] => QMatrix::matmul_stacked(&[a, b, c, d], x, out),
            _ => false,
        };
        if self.parts.len() == 1 {
            self.parts[0].product_into(x, rows, out)?;
        } else if !stacked {
            let mut col = 0;
            for p in &self.parts {
                let n = p.dims()?.0;
                if rows == 1 {
                    p.product_into(x, 1, &mut out[col..col + n])?;
                } else {
                    let part = p.product(x, rows)?;
                    for r in 0..rows {
                        out[r * total + col..r * total + col + n]
                            .copy_from_slice(&part[r * n..(r + 1) * n]);
                    }
                }
                col += n;
            }
        }
        if let Some(b) = &self.bias {
            with_f32(b, |b| {
                for row in out.chunks_mut(total) {
                    for (o, &b) in row.iter_mut().zip(b) {
                        *o += b;
                    }
                }
            })?;
        }
        Ok(())
    }
}

/// `f` on an f32 tensor's values in row-major order: read in place where
/// they lie contiguous on the CPU, copied out otherwise.
pub(crate) fn with_f32<R>(x: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R, ModelError> {
    {
        let (storage, layout) = x.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            if let Ok(values) = cpu.as_slice::<f32>() {
                return Ok(f(&values[start..end]));
            }
        }
    }
    Ok(f(&x.flatten_all()?.to_vec1::<f32>()?))
}

/// `out[r][j] = Σ_i x[r][i] · w[j][i]` for all rows `r` of `x`, reading each
/// weight row once. Rows of `w` are split over the rayon pool.
fn small_matmul<T: Element>(w: &[T], x: &[f32], out: &mut [f32], rows: usize, n: usize, k: usize) {
    let threads = rayon::current_num_threads().max(1);
    // Enough blocks to balance, few enough that scheduling stays cheap; a
    // multiple of 4 so the 4-row kernel covers whole blocks (which rows it
    // covers then depends on `n` alone, so results do not depend on the
    // block size). With many input rows each block is re-read once per pair
    // of rows: keep it small enough to stay in the core's L2 cache.
    let mut block = (n / (threads * 4)).clamp(16, 4096).div_ceil(4) * 4;
    if rows > 8 {
        let fits = (96 * 1024 / (k * 4).max(1)).max(4) / 4 * 4;
        block = block.min(fits);
    }
    let blocks = n.div_ceil(block);
    // Each block writes its own columns of every output row: disjoint.
    let dst = crate::pool::SharedOut(out.as_mut_ptr());
    crate::pool::for_each(blocks, |bi| {
        let j0 = bi * block;
        let count = block.min(n - j0);
        let wblock = &w[j0 * k..(j0 + count) * k];
        let put = |r: usize, vals: &[f32]| {
            // SAFETY: row `r`, columns `j0..j0 + count` of `out` belong to
            // this block alone, and `out` outlives the parallel loop.
            unsafe {
                std::ptr::copy_nonoverlapping(vals.as_ptr(), dst.at(r * n + j0), count);
            }
        };
        if rows > 8 && std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
            // Widen the block once instead of once per pair of rows. The
            // widening is exact, so the sums are the same bits.
            let wide: Vec<f32> = wblock.iter().map(|v| v.widen()).collect();
            block_rows(&wide, x, rows, k, put);
        } else {
            block_rows(wblock, x, rows, k, put);
        }
    });
}

/// Every input row of `x` against the weight block `w`, handing each row's
/// results to `put`. Two input rows per pass (prefill): each weight load
/// serves both, and every dot product is summed in the same order as when
/// its row comes alone.
fn block_rows<T: Element>(w: &[T], x: &[f32], rows: usize, k: usize, put: impl Fn(usize, &[f32])) {
    // Two rows of results, kept per thread (a decoded token allocates
    // nothing here).
    thread_local! {
        static TMP: std::cell::RefCell<(Vec<f32>, Vec<f32>)> = std::cell::RefCell::default();
    }
    crate::pool::with_local(&TMP, |(tmp, tmp1)| {
        let count = w.len() / k;
        tmp.resize(count, 0.0);
        tmp1.resize(count, 0.0);
        block_rows_with(w, x, rows, k, put, tmp, tmp1)
    })
}

/// [`block_rows`] with its result rows.
fn block_rows_with<T: Element>(
    w: &[T],
    x: &[f32],
    rows: usize,
    k: usize,
    put: impl Fn(usize, &[f32]),
    tmp: &mut [f32],
    tmp1: &mut [f32],
) {
    let mut r = 0;
    while r + 2 <= rows {
        dot_rows2(
            w,
            &x[r * k..(r + 1) * k],
            &x[(r + 1) * k..(r + 2) * k],
            tmp,
            tmp1,
        );
        put(r, tmp);
        put(r + 1, tmp1);
        r += 2;
    }
    if r < rows {
        dot_rows(w, &x[r * k..(r + 1) * k], tmp);
        put(r, tmp);
    }
}

/// `out[j] = w[j] · x` for each row `j` of the row-major block `w`.
fn dot_rows<T: Element>(w: &[T], x: &[f32], out: &mut [f32]) {
    let k = x.len();
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were detected at run time.
            unsafe { avx2::dot_rows(w, x, out) };
            return;
        }
    }
    for (j, o) in out.iter_mut().enumerate() {
        *o = dot_lanes(&w[j * k..(j + 1) * k], x);
    }
}

/// [`dot_rows`] for two input rows at once, bit for bit the same results.
fn dot_rows2<T: Element>(w: &[T], x0: &[f32], x1: &[f32], out0: &mut [f32], out1: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features were detected at run time.
            unsafe { avx2::dot_rows2(w, x0, x1, out0, out1) };
            return;
        }
    }
    dot_rows(w, x0, out0);
    dot_rows(w, x1, out1);
}

/// Explicit AVX2 + FMA: four 8-wide accumulators, weights widened in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::Element;

    /// Loads 8 weights as 8 f32 lanes.
    pub trait Load8: Element {
        /// # Safety
        /// `p` points to 8 readable elements; AVX2 and F16C are available.
        unsafe fn load8(p: *const Self) -> __m256;
    }

    impl Load8 for f32 {
        #[inline(always)]
        unsafe fn load8(p: *const f32) -> __m256 {
            _mm256_loadu_ps(p)
        }
    }

    impl Load8 for half::bf16 {
        #[inline(always)]
        unsafe fn load8(p: *const half::bf16) -> __m256 {
            let h = _mm_loadu_si128(p as *const __m128i);
            _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
        }
    }

    impl Load8 for half::f16 {
        #[inline(always)]
        unsafe fn load8(p: *const half::f16) -> __m256 {
            _mm256_cvtph_ps(_mm_loadu_si128(p as *const __m128i))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows<T: Element>(w: &[T], x: &[f32], out: &mut [f32]) {
        // Dispatch on the element type without a second trait bound upstream.
        use std::any::TypeId;
        let id = TypeId::of::<T>();
        let (p, n) = (w.as_ptr(), w.len());
        if id == TypeId::of::<f32>() {
            rows_typed(std::slice::from_raw_parts(p as *const f32, n), x, out)
        } else if id == TypeId::of::<half::bf16>() {
            rows_typed(
                std::slice::from_raw_parts(p as *const half::bf16, n),
                x,
                out,
            )
        } else {
            rows_typed(std::slice::from_raw_parts(p as *const half::f16, n), x, out)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_rows2<T: Element>(
        w: &[T],
        x0: &[f32],
        x1: &[f32],
        out0: &mut [f32],
        out1: &mut [f32],
    ) {
        use std::any::TypeId;
        let id = TypeId::of::<T>();
        let (p, n) = (w.as_ptr(), w.len());
        if id == TypeId::of::<f32>() {
            rows2_typed(
                std::slice::from_raw_parts(p as *const f32, n),
                x0,
                x1,
                out0,
                out1,
            )
        } else if id == TypeId::of::<half::bf16>() {
            rows2_typed(
                std::slice::from_raw_parts(p as *const half::bf16, n),
                x0,
                x1,
                out0,
                out1,
            )
        } else {
            rows2_typed(
                std::slice::from_raw_parts(p as *const half::f16, n),
                x0,
                x1,
                out0,
                out1,
            )
        }
    }

    /// Four weight rows against two input rows: eight accumulators, one per
    /// dot product, each summed exactly as [`rows_typed`] sums it.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows2_typed<T: Load8>(
        w: &[T],
        x0: &[f32],
        x1: &[f32],
        out0: &mut [f32],
        out1: &mut [f32],
    ) {
        let k = x0.len();
        let rows = out0.len();
        let (xp, yp) = (x0.as_ptr(), x1.as_ptr());
        let mut j = 0;
        if k.is_multiple_of(8) {
            while j + 4 <= rows {
                let p0 = w.as_ptr().add(j * k);
                let (p1, p2, p3) = (p0.add(k), p0.add(2 * k), p0.add(3 * k));
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let (mut b0, mut b1, mut b2, mut b3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut i = 0;
                while i < k {
                    let xv = _mm256_loadu_ps(xp.add(i));
                    let yv = _mm256_loadu_ps(yp.add(i));
                    let w0 = T::load8(p0.add(i));
                    a0 = _mm256_fmadd_ps(w0, xv, a0);
                    b0 = _mm256_fmadd_ps(w0, yv, b0);
                    let w1 = T::load8(p1.add(i));
                    a1 = _mm256_fmadd_ps(w1, xv, a1);
                    b1 = _mm256_fmadd_ps(w1, yv, b1);
                    let w2 = T::load8(p2.add(i));
                    a2 = _mm256_fmadd_ps(w2, xv, a2);
                    b2 = _mm256_fmadd_ps(w2, yv, b2);
                    let w3 = T::load8(p3.add(i));
                    a3 = _mm256_fmadd_ps(w3, xv, a3);
                    b3 = _mm256_fmadd_ps(w3, yv, b3);
                    i += 8;
                }
                out0[j] = hsum(a0);
                out0[j + 1] = hsum(a1);
                out0[j + 2] = hsum(a2);
                out0[j + 3] = hsum(a3);
                out1[j] = hsum(b0);
                out1[j + 1] = hsum(b1);
                out1[j + 2] = hsum(b2);
                out1[j + 3] = hsum(b3);
                j += 4;
            }
        }
        while j < rows {
            out0[j] = dot_typed(&w[j * k..(j + 1) * k], x0);
            out1[j] = dot_typed(&w[j * k..(j + 1) * k], x1);
            j += 1;
        }
    }

    /// Four rows at a time: each load of `x` serves four weight streams, and
    /// four streams keep more memory requests in flight than one.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn rows_typed<T: Load8>(w: &[T], x: &[f32], out: &mut [f32]) {
        let k = x.len();
        let rows = out.len();
        let xp = x.as_ptr();
        let mut j = 0;
        if k.is_multiple_of(8) {
            while j + 4 <= rows {
                let p0 = w.as_ptr().add(j * k);
                let (p1, p2, p3) = (p0.add(k), p0.add(2 * k), p0.add(3 * k));
                // Named accumulators stay in registers (an indexed array may not).
                let (mut a0, mut a1, mut a2, mut a3) = (
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                    _mm256_setzero_ps(),
                );
                let mut i = 0;
                // Ask for the next four rows while these stream in.
                let ahead = p0.add(8 * k) as *const i8;
                let ahead_bytes = 4 * k * std::mem::size_of::<T>();
                let mut off = 0;
                while i < k {
                    if off < ahead_bytes {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(off));
                        _mm_prefetch::<_MM_HINT_T0>(ahead.add(off + 64));
                        off += 128;
                    }
                    let xv = _mm256_loadu_ps(xp.add(i));
                    a0 = _mm256_fmadd_ps(T::load8(p0.add(i)), xv, a0);
                    a1 = _mm256_fmadd_ps(T::load8(p1.add(i)), xv, a1);
                    a2 = _mm256_fmadd_ps(T::load8(p2.add(i)), xv, a2);
                    a3 = _mm256_fmadd_ps(T::load8(p3.add(i)), xv, a3);
                    i += 8;
                }
                out[j] = hsum(a0);
                out[j + 1] = hsum(a1);
                out[j + 2] = hsum(a2);
                out[j + 3] = hsum(a3);
                j += 4;
            }
        }
        while j < rows {
            out[j] = dot_typed(&w[j * k..(j + 1) * k], x);
            j += 1;
        }
    }

    #[inline(always)]
    unsafe fn hsum(s: __m256) -> f32 {
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dot_typed<T: Load8>(w: &[T], x: &[f32]) -> f32 {
        let n = w.len().min(x.len());
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let o = i + 8 * j;
                *a = _mm256_fmadd_ps(T::load8(wp.add(o)), _mm256_loadu_ps(xp.add(o)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(T::load8(wp.add(i)), _mm256_loadu_ps(xp.add(i)), acc[0]);
            i += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let mut total = hsum(s);
        while i < n {
            total += w[i].widen() * x[i];
            i += 1;
        }
        total
    }
}

/// Portable fallback: 32 independent accumulators so the loop vectorises.
#[inline(always)]
pub(crate) fn dot_lanes<T: Element>(w: &[T], x: &[f32]) -> f32 {
    const L: usize = 32;
    let mut acc = [0f32; L];
    let full = w.len() / L * L;
    for (wc, xc) in w[..full].chunks_exact(L).zip(x[..full].chunks_exact(L)) {
        for i in 0..L {
            acc[i] += wc[i].widen() * xc[i];
        }
    }
    let mut tail = 0f32;
    for i in full..w.len() {
        tail += w[i].widen() * x[i];
    }
    let mut width = L;
    while width > 1 {
        width /= 2;
        for i in 0..width {
            acc[i] += acc[i + width];
        }
    }
    acc[0] + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference(w: &[f32], x: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for r in 0..rows {
            for j in 0..n {
                out[r * n + j] = (0..k)
                    .map(|i| (w[j * k + i] as f64) * (x[r * k + i] as f64))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    #[test]
    fn small_and_blocked_paths_agree_with_a_plain_sum() {
        let (n, k) = (70, 101);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 50.0)
            .collect();
        let weight = Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap();
        for rows in [1, 3, 8, 9, 20] {
            let x: Vec<f32> = (0..rows * k)
                .map(|i| ((i * 13 % 29) as f32 - 14.0) / 14.0)
                .collect();
            let xt = Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu).unwrap();
            for dtype in [DType::F32, DType::BF16, DType::F16] {
                let lin = Linear::new(weight.to_dtype(dtype).unwrap(), None);
                let wq: Vec<f32> = weight
                    .to_dtype(dtype)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let want = reference(&wq, &x, rows, n, k);
                let got: Vec<f32> = lin
                    .forward(&xt)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                for (a, b) in got.iter().zip(&want) {
                    assert!((a - b).abs() < 1e-4, "rows {rows} {dtype:?}: {a} vs {b}");
                }
            }
        }
    }
}
