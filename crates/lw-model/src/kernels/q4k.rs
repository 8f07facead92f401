//! Q4_K (256 weights in 144 bytes): the decode tile over a group of eight
//! rows and the prefill GEMM over unpacked rows.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::*;
use super::quantize::QuantRow;
use super::tile::*;

/// A Q4_K row (`w`, whole blocks as in a GGUF file) times an activation row
/// quantized per 256 with sums per 16: the product's definition, which
/// [`q4k8_tile`] and [`q4k_gemm`] keep bit for bit, and the product itself
/// where the vector kernels do not run.
///
/// A block (144 bytes) is `d` and `dmin` (f16), 12 bytes of 6-bit scales
/// and mins for eight sub-blocks of 32 ([`crate::repack::scale_min`]), then
/// 128 bytes of nibbles: byte `32c + l` holds weight `64c + l` (sub-block
/// `2c`) in its low nibble and weight `64c + 32 + l` (sub-block `2c + 1`)
/// in its high one. A weight is `d·sc·q − dmin·m`.
///
/// Per block, two exact integer sums: `Σ sc · (weights × activations)` over
/// the sub-blocks, and `Σ m · (the sub-block's activations)`, the latter
/// from the activations' sums per 16. Each takes one fused multiply-add
/// into its own accumulator, `acc = fma(d · dx, sum, acc)` and
/// `macc = fma(dmin · dx, msum, macc)`, blocks in order, and the result is
/// `acc − macc`. Integer sums are exact in any order (at most
/// 256 · 15 · 127 · 63, within i32), so only the f32 steps fix the bits, and
/// they are the vector kernels' steps.
pub(crate) fn dot(w: &[u8], x: &QuantRow) -> f32 {
    let (mut acc, mut macc) = (0f32, 0f32);
    for (i, b) in w.chunks_exact(144).enumerate() {
        let xs = &x.values[256 * i..256 * (i + 1)];
        let sums16 = &x.sums16[16 * i..16 * (i + 1)];
        let (mut sum, mut msum) = (0i32, 0i32);
        for s in 0..8 {
            let (sc, m) = crate::repack::scale_min(&b[4..16], s);
            let (c, high) = (s / 2, s % 2 == 1);
            let part: i32 = b[16 + 32 * c..48 + 32 * c]
                .iter()
                .zip(&xs[32 * s..32 * (s + 1)])
                .map(|(&byte, &v)| {
                    let q = if high { byte >> 4 } else { byte & 0x0F };
                    q as i32 * v as i32
                })
                .sum();
            sum += sc as i32 * part;
            msum += m as i32 * (sums16[2 * s] as i32 + sums16[2 * s + 1] as i32);
        }
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        let dx = x.scales[i];
        acc = (d * dx).mul_add(sum as f32, acc);
        macc = (dmin * dx).mul_add(msum as f32, macc);
    }
    acc - macc
}

for_each_isa! {
    /// Eight Q4_K rows, held as a group ([`crate::repack`]), against `R`
    /// activation rows (quantized per 256): the decode product, and prefill's
    /// rows that do not fill a tile.
    ///
    /// The rows sit in the eight 32-bit lanes. For each four activation bytes
    /// (broadcast to all lanes), one `maddubs` multiplies them with four weights
    /// of every row; a sub-block's eight such products are summed in 16-bit
    /// lanes (at most 8 · 2 · 15 · 127 = 30,480) and then multiplied by the
    /// eight rows' scales at once. Per block, each row's exact integer sum then
    /// takes one fused multiply-add, `fma(d · dy, sum, acc)`, and the mins one
    /// more, as in [`q4k_gemm`], so a row's result has the same bits whichever
    /// kernel computed it. Returns `[activation row][weight row]`.
    ///
    /// # Safety
    /// The CPU runs `isa`; `group` points at a group of `xs[0].scales.len()`
    /// blocks, and every row of `xs` has that many blocks.
    pub unsafe fn q4k8_tile<const R: usize>(
        group: *const u8,
        xs: [&QuantRow; R]
    ) -> [[f32; 8]; R] = q4k8_tile_in, wide q4k8_tile_zmm if R == 1;
}

/// [`q4k8_tile`] on 512-bit registers against one activation row (decode;
/// against several, the AVX-512 VNNI build, whose embedded broadcasts make
/// it as short): one load holds two steps of four
/// bytes of the eight rows (lanes 0–7 the first, 8–15 the second); the
/// activation's matching groups of four bytes are spread to the two halves
/// by one permute each. A sub-block's runs are multiplied by the rows'
/// scales repeated in both halves, and the halves of a block's sum, partial
/// sums of the same rows, are added (exactly) before the block's f32 steps,
/// which are the 256-bit kernel's: the same bits.
///
/// # Safety
/// As for [`q4k8_tile`], and the CPU has AVX-512 F, VL, BW and VNNI (the
/// caller is compiled with them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4k8_tile_zmm<const R: usize>(group: *const u8, xs: [&QuantRow; R]) -> [[f32; 8]; R] {
    use crate::repack::q4k::{GROUP_BLOCK, QS, SCALES};
    let blocks = xs[0].scales.len();
    let low = _mm512_set1_epi8(0x0F);
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    // Four-byte groups 2p and 2p + 1 of 32 activation bytes to the halves.
    let spread: [__m512i; 4] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    });
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm512_setzero_si512(); R];
        for c in 0..4 {
            let ya: [__m512i; R] = std::array::from_fn(|i| {
                let y = ys[i].add(b * 256 + c * 64) as *const __m256i;
                _mm512_castsi256_si512(_mm256_loadu_si256(y))
            });
            let yb: [__m512i; R] = std::array::from_fn(|i| {
                let y = ys[i].add(b * 256 + c * 64 + 32) as *const __m256i;
                _mm512_castsi256_si512(_mm256_loadu_si256(y))
            });
            let mut lo = [_mm512_setzero_si512(); R];
            let mut hi = [_mm512_setzero_si512(); R];
            for (p, spread) in spread.iter().enumerate() {
                let q = _mm512_loadu_si512(rec.add(QS + (c * 8 + 2 * p) * 32) as *const _);
                let q_lo = _mm512_and_si512(q, low);
                let q_hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), low);
                for i in 0..R {
                    let a = _mm512_permutexvar_epi32(*spread, ya[i]);
                    let b = _mm512_permutexvar_epi32(*spread, yb[i]);
                    lo[i] = _mm512_dpbusd_epi32(lo[i], q_lo, a);
                    hi[i] = _mm512_dpbusd_epi32(hi[i], q_hi, b);
                }
            }
            let s_lo = both_halves(Vnni::scales(row_scales(rec.add(SCALES + 2 * c * 8))));
            let s_hi = both_halves(Vnni::scales(row_scales(rec.add(SCALES + (2 * c + 1) * 8))));
            for i in 0..R {
                let part = _mm512_add_epi32(
                    _mm512_mullo_epi32(lo[i], s_lo),
                    _mm512_mullo_epi32(hi[i], s_hi),
                );
                isum[i] = _mm512_add_epi32(isum[i], part);
            }
        }
        let isum: [__m256i; R] = std::array::from_fn(|i| fold_halves(isum[i]));
        k_block_end::<Vnni, R>(rec, b, &isum, (sums, dys), (&mut acc, &mut macc));
    }
    std::array::from_fn(|i| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc[i], macc[i]));
        out
    })
}

/// The body of [`q4k8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4k8_tile_in<I: Ints, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::q4k::{GROUP_BLOCK, QS, SCALES};
    let blocks = xs[0].scales.len();
    let low = _mm256_set1_epi8(0x0F);
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            let mut lo16 = [_mm256_setzero_si256(); R];
            let mut hi16 = [_mm256_setzero_si256(); R];
            for g in 0..8 {
                let q = _mm256_loadu_si256(rec.add(QS + (c * 8 + g) * 32) as *const __m256i);
                let q_lo = _mm256_and_si256(q, low);
                let q_hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), low);
                for i in 0..R {
                    let y = ys[i].add(b * 256 + c * 64 + 4 * g);
                    let ya = _mm256_set1_epi32((y as *const i32).read_unaligned());
                    let yb = _mm256_set1_epi32((y.add(32) as *const i32).read_unaligned());
                    lo16[i] = I::dot(lo16[i], q_lo, ya);
                    hi16[i] = I::dot(hi16[i], q_hi, yb);
                }
            }
            let s_lo = I::scales(row_scales(rec.add(SCALES + 2 * c * 8)));
            let s_hi = I::scales(row_scales(rec.add(SCALES + (2 * c + 1) * 8)));
            for i in 0..R {
                isum[i] = I::scaled(I::scaled(isum[i], lo16[i], s_lo), hi16[i], s_hi);
            }
        }
        k_block_end::<I, R>(rec, b, &isum, (sums, dys), (&mut acc, &mut macc));
    }
    std::array::from_fn(|i| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), _mm256_sub_ps(acc[i], macc[i]));
        out
    })
}

/// From eight scale bytes at `p` (one per row), the 16-bit pairs
/// `[s_r, s_r]` of row r's lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn row_scales(p: *const u8) -> __m256i {
    let spread = _mm256_setr_epi8(
        0, -1, 0, -1, 1, -1, 1, -1, 2, -1, 2, -1, 3, -1, 3, -1, 4, -1, 4, -1, 5, -1, 5, -1, 6, -1,
        6, -1, 7, -1, 7, -1,
    );
    _mm256_shuffle_epi8(
        _mm256_set1_epi64x((p as *const i64).read_unaligned()),
        spread,
    )
}

/// The end of a block of the Q4_K and Q5_K group kernels (their `d`,
/// `dmin` and mins sit at the same offsets): Σ min · (sum of the sub-block's
/// activations), two sub-blocks per `madd` (mins are stored in pairs per
/// row), then `acc = fma(d · dy, isum, acc)` and
/// `macc = fma(dmin · dy, msum, macc)` for each activation row.
///
/// # Safety
/// As for the kernels: `rec` is block `b` of a group, and the rows have it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn k_block_end<I: Ints, const R: usize>(
    rec: *const u8,
    b: usize,
    isum: &[__m256i; R],
    (sums, dys): ([*const i16; R], [*const f32; R]),
    (acc, macc): (&mut [__m256; R], &mut [__m256; R]),
) {
    use crate::repack::q4k::{D, DMIN, MINS};
    let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i));
    let dmin = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(DMIN) as *const __m128i));
    for i in 0..R {
        let s = sums[i].add(b * 16);
        let mut msum = _mm256_setzero_si256();
        for p in 0..4 {
            let y0 = *s.add(4 * p) as i32 + *s.add(4 * p + 1) as i32;
            let y1 = *s.add(4 * p + 2) as i32 + *s.add(4 * p + 3) as i32;
            let pair = _mm256_set1_epi32((y0 & 0xFFFF) | (y1 << 16));
            let m = _mm256_cvtepu8_epi16(_mm_loadu_si128(rec.add(MINS + 16 * p) as *const __m128i));
            msum = I::madd(msum, m, pair);
        }
        let dy = _mm256_set1_ps(*dys[i].add(b));
        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(isum[i]), acc[i]);
        macc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dmin, dy), _mm256_cvtepi32_ps(msum), macc[i]);
    }
}

/// One Q4_K row unpacked for [`q4k_gemm`]: a byte per weight, the 6-bit
/// scales and mins decoded, and the block scales widened.
#[derive(Default)]
pub struct Q4kRow {
    q: Vec<u8>,
    scales: Vec<u8>,
    mins: Vec<i32>,
    d: Vec<f32>,
    dmin: Vec<f32>,
}

impl Q4kRow {
    /// Unpacks the eight rows of a group of `blocks` blocks
    /// ([`crate::repack`]), reusing the rows' buffers.
    ///
    /// # Safety
    /// `group` holds `blocks` group blocks; AVX2 and F16C are available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unpack_group(rows: &mut [Q4kRow; 8], group: *const u8, blocks: usize) {
        use crate::repack::q4k::{D, DMIN, GROUP_BLOCK, MINS, QS, SCALES};
        for row in rows.iter_mut() {
            row.q.resize(blocks * 256, 0);
            row.scales.clear();
            row.mins.clear();
            row.d.clear();
            row.dmin.clear();
        }
        let low = _mm256_set1_epi8(0x0F);
        for b in 0..blocks {
            let rec = group.add(b * GROUP_BLOCK);
            let mut d = [0f32; 8];
            let mut dmin = [0f32; 8];
            _mm256_storeu_ps(
                d.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i)),
            );
            _mm256_storeu_ps(
                dmin.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(rec.add(DMIN) as *const __m128i)),
            );
            for (r, row) in rows.iter_mut().enumerate() {
                row.d.push(d[r]);
                row.dmin.push(dmin[r]);
                for j in 0..8 {
                    row.scales.push(*rec.add(SCALES + j * 8 + r));
                    row.mins
                        .push(*rec.add(MINS + (j / 2) * 16 + 2 * r + j % 2) as i32);
                }
            }
            for c in 0..4 {
                // Eight loads hold four bytes of every row each: transposed,
                // each row's 32 bytes of this sub-block pair.
                let v: [__m256i; 8] = std::array::from_fn(|g| {
                    _mm256_loadu_si256(rec.add(QS + (c * 8 + g) * 32) as *const __m256i)
                });
                for (r, t) in transpose8x32(v).into_iter().enumerate() {
                    let out = rows[r].q.as_mut_ptr().add(b * 256 + c * 64);
                    let lo = _mm256_and_si256(t, low);
                    let hi = _mm256_and_si256(_mm256_srli_epi16(t, 4), low);
                    _mm256_storeu_si256(out as *mut __m256i, lo);
                    _mm256_storeu_si256(out.add(32) as *mut __m256i, hi);
                }
            }
        }
    }
}

for_each_isa! {
    /// Two unpacked Q4_K rows against `T` tiles of eight activation rows: the
    /// prefill product. Each lane of a 32-byte product holds one activation
    /// row, so the products of a 32-weight sub-block share one scale and are
    /// summed in i16 (at most 8 · 2 · 15 · 127 = 30,480) before one
    /// multiply by it. Per block, the exact integer sums then take the same
    /// fused steps as [`q4k8_tile`], so every result has the same bits as there.
    /// Returns `[weight row][tile][activation row]`.
    ///
    /// # Safety
    /// The CPU runs `isa`; the rows and tiles have the same number of blocks.
    pub unsafe fn q4k_gemm<const T: usize>(
        w: [&Q4kRow; 2],
        tiles: [&ActTile; T]
    ) -> [[[f32; 8]; T]; 2] = q4k_gemm_in;
}

/// The body of [`q4k_gemm`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q4k_gemm_in<I: Ints, const T: usize>(
    w: [&Q4kRow; 2],
    tiles: [&ActTile; T],
) -> [[[f32; 8]; T]; 2] {
    let blocks = w[0].d.len();
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let mut macc = [[_mm256_setzero_ps(); T]; 2];
    let a_base: [*const i8; T] = tiles.map(|t| t.bytes.as_ptr());
    let q_base: [*const u8; 2] = w.map(|r| r.q.as_ptr());
    for b in 0..blocks {
        let mut isum = [[_mm256_setzero_si256(); T]; 2];
        for j in 0..8 {
            let scales = w.map(|r| r.scales[b * 8 + j] as i16);
            scaled_run::<I, T>(q_base, a_base, b * 256 + j * 32, 8, scales, &mut isum);
        }
        for t in 0..T {
            let dy = _mm256_loadu_ps(tiles[t].scales.as_ptr().add(b * 8));
            let sums = tiles[t].sums16.as_ptr().add(b * 128);
            for r in 0..2 {
                let mut msum = _mm256_setzero_si256();
                for j in 0..8 {
                    // Sub-block j's sums per 32: two sums per 16.
                    let s = _mm256_add_epi32(
                        _mm256_loadu_si256(sums.add(2 * j * 8) as *const __m256i),
                        _mm256_loadu_si256(sums.add((2 * j + 1) * 8) as *const __m256i),
                    );
                    let m = _mm256_set1_epi32(w[r].mins[b * 8 + j]);
                    msum = _mm256_add_epi32(msum, _mm256_mullo_epi32(m, s));
                }
                let d = _mm256_mul_ps(_mm256_set1_ps(w[r].d[b]), dy);
                acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(isum[r][t]), acc[r][t]);
                let dmin = _mm256_mul_ps(_mm256_set1_ps(w[r].dmin[b]), dy);
                macc[r][t] = _mm256_fmadd_ps(dmin, _mm256_cvtepi32_ps(msum), macc[r][t]);
            }
        }
    }
    let mut out = [[[0f32; 8]; T]; 2];
    for r in 0..2 {
        for t in 0..T {
            _mm256_storeu_ps(out[r][t].as_mut_ptr(), _mm256_sub_ps(acc[r][t], macc[r][t]));
        }
    }
    out
}
