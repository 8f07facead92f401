//! Q8_0 (32 weights in 34 bytes: an f16 scale, then 32 × i8): the
//! decode tile over a group of eight rows and the prefill GEMM.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::*;
use super::quantize::QuantRow;

/// A Q8_0 row (`w`, whole blocks as in a GGUF file: `d` as f16, then 32 ×
/// i8) times an activation row quantized per 32: the product's definition,
/// which [`q8_0x8_tile`] and [`q8_0_gemm`] keep bit for bit, and the
/// product itself where the vector kernels do not run.
///
/// Each block is two halves of 16 weights. A half's products with the
/// activations are summed exactly in integers (at most 16 · 128 · 127, so
/// its conversion to f32 is exact too), and the half takes one fused
/// multiply-add, `acc[h] = fma(d · dx, sum, acc[h])`, into its own
/// accumulator, `d` being the block's scale widened from f16 and `dx` the
/// activation's (`d · dx` rounded to f32 first). The two accumulators run
/// over all blocks in order and are added once at the end,
/// `acc[0] + acc[1]`. The vector kernels take exactly these f32 steps (two
/// accumulators, so that two chains of fused adds run side by side), so
/// they give these bits.
pub(crate) fn dot(w: &[u8], x: &QuantRow) -> f32 {
    let mut acc = [0f32; 2];
    for (i, b) in w.chunks_exact(34).enumerate() {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() * x.scales[i];
        for (h, acc) in acc.iter_mut().enumerate() {
            let ws = &b[2 + 16 * h..18 + 16 * h];
            let xs = &x.values[32 * i + 16 * h..32 * i + 16 * h + 16];
            let sum: i32 = ws
                .iter()
                .zip(xs)
                .map(|(&q, &v)| q as i8 as i32 * v as i32)
                .sum();
            *acc = d.mul_add(sum as f32, *acc);
        }
    }
    acc[0] + acc[1]
}

/// Activation rows for [`q8_0_gemm`], eight per tile, widened to 16 bits and
/// interleaved two values at a time: value `k` of row `i` is at
/// `(k / 2 · 8 + i) · 2 + k % 2`, so one 32-byte load holds two consecutive
/// values of all eight rows.
pub struct WideTile {
    values: Vec<i16>,
    /// `[block][row]`: each row's scale per 32.
    scales: Vec<f32>,
}

impl WideTile {
    /// Eight rows quantized per 32.
    pub fn new(rows: &[QuantRow]) -> WideTile {
        assert_eq!(rows.len(), 8, "a tile holds eight rows");
        let k = rows[0].values.len();
        let blocks = rows[0].scales.len();
        let mut values = vec![0i16; 8 * k];
        for (i, row) in rows.iter().enumerate() {
            for (p, two) in row.values.chunks_exact(2).enumerate() {
                let at = (p * 8 + i) * 2;
                values[at] = two[0] as i16;
                values[at + 1] = two[1] as i16;
            }
        }
        let scales = (0..blocks * 8).map(|x| rows[x % 8].scales[x / 8]).collect();
        WideTile { values, scales }
    }
}

/// Q8_0 rows widened to 16 bits for [`q8_0_gemm`]: `values[r][k]`, and each
/// row's block scales in f32.
#[derive(Default)]
pub struct WideRows {
    values: Vec<i16>,
    scales: Vec<f32>,
    k: usize,
}

impl WideRows {
    /// Widens the rows of the Q8_0 groups ([`crate::repack`]) of `k`
    /// values that `groups` point at, eight rows each, reusing the buffers.
    ///
    /// # Safety
    /// Each pointer is at a whole Q8_0 group of `k / 32` blocks.
    pub unsafe fn fill_groups(
        &mut self,
        k: usize,
        groups: impl ExactSizeIterator<Item = *const u8>,
    ) {
        use crate::repack::q8_0::{D, GROUP_BLOCK, QS};
        let blocks = k / 32;
        let n = groups.len() * 8;
        self.k = k;
        self.values.resize(n * k, 0);
        self.scales.resize(n * blocks, 0.0);
        for (gi, group) in groups.enumerate() {
            for b in 0..blocks {
                let rec = std::slice::from_raw_parts(group.add(b * GROUP_BLOCK), GROUP_BLOCK);
                for r in 0..8 {
                    let row = gi * 8 + r;
                    let bits = u16::from_le_bytes([rec[D + 2 * r], rec[D + 2 * r + 1]]);
                    self.scales[row * blocks + b] = half::f16::from_bits(bits).to_f32();
                    let dst = &mut self.values[row * k + b * 32..row * k + b * 32 + 32];
                    for g in 0..8 {
                        let src = &rec[QS + (g * 8 + r) * 4..QS + (g * 8 + r) * 4 + 4];
                        for e in 0..4 {
                            dst[4 * g + e] = src[e] as i8 as i16;
                        }
                    }
                }
            }
        }
    }
}

/// `R` Q8_0 rows (`rows[r]`: row `first + r` of `w`) against `T` tiles of
/// eight activation rows (quantized per 32): the prefill product. Both sides
/// are widened to 16 bits, so `madd` takes them as they are: each lane of a
/// product holds one activation row, and two weights, broadcast to all
/// lanes, multiply two values of every row. A block's two halves of 16
/// weights are summed exactly, each takes one fused multiply-add into its
/// own accumulator, and the two are added at the end: the same steps as the
/// lanes of [`q8_0x8_tile`], so every result has the same bits as there. The
/// halves run as two passes, so that only one half's accumulators are live.
/// Returns `[weight row][tile][activation row]`.
///
/// # Safety
/// The CPU runs `isa`; `w` holds rows `first..first + R`, and the tiles
/// have as many values per row as `w`.
#[cfg(target_arch = "x86_64")]
pub unsafe fn q8_0_gemm<const R: usize, const T: usize>(
    isa: Isa,
    w: &WideRows,
    first: usize,
    tiles: [&WideTile; T],
) -> [[[f32; 8]; T]; R] {
    let mut acc = GemmAcc::<R, T>::default();
    q8_0_gemm_blocks(isa, w, first, tiles, 0..w.k / 32, &mut acc);
    acc.sum()
}

/// The two halves' accumulators of a [`q8_0_gemm`] in progress, so that its
/// blocks can run a span at a time (each span's activations then stay in
/// the first-level cache) with the same steps, and so the same bits, as in
/// one pass: `[half][weight row][tile][activation row]`.
pub struct GemmAcc<const R: usize, const T: usize>([[[[f32; 8]; T]; R]; 2]);

impl<const R: usize, const T: usize> Default for GemmAcc<R, T> {
    fn default() -> Self {
        GemmAcc([[[[0.0; 8]; T]; R]; 2])
    }
}

impl<const R: usize, const T: usize> GemmAcc<R, T> {
    /// The finished products, `[weight row][tile][activation row]`: the
    /// halves added.
    pub fn sum(&self) -> [[[f32; 8]; T]; R] {
        std::array::from_fn(|r| {
            std::array::from_fn(|t| {
                std::array::from_fn(|i| self.0[0][r][t][i] + self.0[1][r][t][i])
            })
        })
    }
}

for_each_isa! {
    /// Blocks `blocks` of [`q8_0_gemm`], continuing `acc`.
    ///
    /// # Safety
    /// As for [`q8_0_gemm`]; `blocks` lies within the rows' blocks.
    pub unsafe fn q8_0_gemm_blocks<const R: usize, const T: usize>(
        w: &WideRows,
        first: usize,
        tiles: [&WideTile; T],
        blocks: std::ops::Range<usize>,
        acc: &mut GemmAcc<R, T>
    ) = q8_0_gemm_blocks_in;
}

/// The body of [`q8_0_gemm_blocks`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0_gemm_blocks_in<I: Ints, const R: usize, const T: usize>(
    w: &WideRows,
    first: usize,
    tiles: [&WideTile; T],
    blocks: std::ops::Range<usize>,
    acc: &mut GemmAcc<R, T>,
) {
    for (h, acc) in acc.0.iter_mut().enumerate() {
        q8_0_gemm_half::<I, R, T>(w, first, tiles, blocks.clone(), h, acc);
    }
}

/// One half (`h`: each block's first or last 16 weights) of [`q8_0_gemm`],
/// over `blocks`: only this half's accumulators are live.
///
/// # Safety
/// As for [`q8_0_gemm_blocks`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0_gemm_half<I: Ints, const R: usize, const T: usize>(
    w: &WideRows,
    first: usize,
    tiles: [&WideTile; T],
    blocks: std::ops::Range<usize>,
    h: usize,
    out: &mut [[[f32; 8]; T]; R],
) {
    let k = w.k;
    let a_base: [*const i16; T] = tiles.map(|t| t.values.as_ptr().add(h * 16 * 8));
    let dy_base: [*const f32; T] = tiles.map(|t| t.scales.as_ptr());
    let w_base: [*const i16; R] =
        std::array::from_fn(|r| w.values.as_ptr().add((first + r) * k + h * 16));
    let dw_base: [*const f32; R] =
        std::array::from_fn(|r| w.scales.as_ptr().add((first + r) * (k / 32)));
    let mut acc: [[__m256; T]; R] =
        std::array::from_fn(|r| std::array::from_fn(|t| _mm256_loadu_ps(out[r][t].as_ptr())));
    for b in blocks {
        let mut isum = [[_mm256_setzero_si256(); T]; R];
        for p in 0..8 {
            let av: [__m256i; T] = std::array::from_fn(|t| {
                _mm256_loadu_si256(a_base[t].add((b * 16 + p) * 16) as *const __m256i)
            });
            for r in 0..R {
                let pair = (w_base[r].add(b * 32 + 2 * p) as *const i32).read_unaligned();
                let wv = _mm256_set1_epi32(pair);
                for t in 0..T {
                    isum[r][t] = I::madd(isum[r][t], wv, av[t]);
                }
            }
        }
        for r in 0..R {
            let dw = _mm256_set1_ps(*dw_base[r].add(b));
            for t in 0..T {
                let d = _mm256_mul_ps(dw, _mm256_loadu_ps(dy_base[t].add(b * 8)));
                acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum[r][t]), acc[r][t]);
            }
        }
    }
    for r in 0..R {
        for t in 0..T {
            _mm256_storeu_ps(out[r][t].as_mut_ptr(), acc[r][t]);
        }
    }
}

for_each_isa! {
    /// Eight Q8_0 rows, held as a group ([`crate::repack`]), against `R`
    /// activation rows (quantized per 32): decode, and prefill's rows that do
    /// not fill a tile of [`q8_0_gemm`].
    ///
    /// The rows sit in the eight 32-bit lanes: one load holds four weights of
    /// every row, four activation bytes are broadcast to all lanes, and their
    /// signs are moved onto the activations so that `maddubs` can take the
    /// weights unsigned. A block's two halves of 16 weights are summed exactly,
    /// each takes one fused multiply-add with the eight rows' scales times the
    /// activation's, into its own accumulator, and the two are added at the
    /// end: the steps of [`q8_0_gemm`], so a row's result has
    /// the same bits whichever computed it; and no horizontal sums, since every
    /// lane is a row. Returns `[activation row][weight row]`.
    ///
    /// # Safety
    /// The CPU runs `isa`; `group` points at a group of `xs[0].scales.len()`
    /// blocks, and every row of `xs` has that many blocks.
    pub unsafe fn q8_0x8_tile<const R: usize>(
        group: *const u8,
        xs: [&QuantRow; R]
    ) -> [[f32; 8]; R] = q8_0x8_tile_in, wide q8_0x8_tile_zmm;
}

/// [`q8_0x8_tile`] on 512-bit registers: one load holds two steps of four
/// weights of the eight rows (lanes 0–7 the first, 8–15 the second), the
/// activation's two matching groups of four bytes are spread to the two
/// halves by one permute, and since AVX-512 has no byte `sign`, the
/// weights' signs move onto the activations by a masked subtraction. A
/// half-block's two lane halves hold partial sums of the same rows; they
/// are added (exactly) before the f32 steps, which are the 256-bit
/// kernel's, so the bits are the same.
///
/// # Safety
/// As for [`q8_0x8_tile`], and the CPU has AVX-512 F, VL, BW and VNNI
/// (the caller is compiled with them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0x8_tile_zmm<const R: usize>(group: *const u8, xs: [&QuantRow; R]) -> [[f32; 8]; R] {
    use crate::repack::q8_0::{D, GROUP_BLOCK, QS};
    let blocks = xs[0].scales.len();
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    // Four-byte groups 0 and 1 (then 2 and 3) of a half to the lane halves.
    let spread = [
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1),
        _mm512_setr_epi32(2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3),
    ];
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i));
        for (h, acc_h) in acc.iter_mut().enumerate() {
            let yv: [__m512i; R] = std::array::from_fn(|i| {
                let y = ys[i].add(b * 32 + h * 16) as *const __m128i;
                _mm512_castsi128_si512(_mm_loadu_si128(y))
            });
            let mut isum = [zero; R];
            for (p, spread) in spread.iter().enumerate() {
                let w = _mm512_loadu_si512(rec.add(QS + (h * 4 + 2 * p) * 32) as *const _);
                let wabs = _mm512_abs_epi8(w);
                let negative = _mm512_movepi8_mask(w);
                for i in 0..R {
                    let ya = _mm512_permutexvar_epi32(*spread, yv[i]);
                    let signed = _mm512_mask_sub_epi8(ya, negative, zero, ya);
                    isum[i] = _mm512_dpbusd_epi32(isum[i], wabs, signed);
                }
            }
            for i in 0..R {
                let sum = fold_halves(isum[i]);
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*dys[i].add(b)));
                acc_h[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(sum), acc_h[i]);
            }
        }
    }
    let mut out = [[0f32; 8]; R];
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), _mm256_add_ps(acc[0][i], acc[1][i]));
    }
    out
}

/// The body of [`q8_0x8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q8_0x8_tile_in<I: Ints, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::q8_0::{D, GROUP_BLOCK, QS};
    let blocks = xs[0].scales.len();
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    let mut acc = [[_mm256_setzero_ps(); R]; 2];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i));
        for (h, acc_h) in acc.iter_mut().enumerate() {
            let mut isum = [_mm256_setzero_si256(); R];
            for g in 0..4 {
                let w = _mm256_loadu_si256(rec.add(QS + (h * 4 + g) * 32) as *const __m256i);
                let wabs = _mm256_sign_epi8(w, w);
                for i in 0..R {
                    let y = ys[i].add(b * 32 + h * 16 + 4 * g);
                    let ya = _mm256_set1_epi32((y as *const i32).read_unaligned());
                    isum[i] = I::dot4(isum[i], wabs, _mm256_sign_epi8(ya, w));
                }
            }
            for i in 0..R {
                let d = _mm256_mul_ps(dw, _mm256_set1_ps(*dys[i].add(b)));
                acc_h[i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum[i]), acc_h[i]);
            }
        }
    }
    let mut out = [[0f32; 8]; R];
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), _mm256_add_ps(acc[0][i], acc[1][i]));
    }
    out
}
