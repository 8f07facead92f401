//! Q6_K (256 weights in 210 bytes): the decode tile over a group of eight
//! rows and the prefill GEMM over unpacked rows.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::*;
use super::quantize::QuantRow;
use super::tile::*;

/// A Q6_K row (`w`, whole blocks as in a GGUF file) times an activation row
/// quantized per 256 with sums per 16: the product's definition, which
/// [`q6k8_tile`] and [`q6k_gemm`] keep bit for bit, and the product itself
/// where the vector kernels do not run.
///
/// A block (210 bytes) is 128 bytes of low nibbles `ql`, 64 bytes of high
/// bit pairs `qh`, sixteen i8 scales (one per 16 consecutive weights), then
/// `d` (f16). In half `h` (weights `128h..128h + 128`), weight
/// `128h + 32k + l` (`k` < 4, `l` < 32) takes its low four bits from the low
/// nibble of `ql[64h + l]` (k = 0), of `ql[64h + 32 + l]` (k = 1), or the
/// high nibbles of those two (k = 2, 3), and its top two bits from bits
/// `2k..2k + 2` of `qh[32h + l]`; it is `d·scale·(q − 32)`.
///
/// Per block, one exact integer sum `Σ scale · (q − 32) · activation` (the
/// kernels take the unsigned `q` and subtract `32 · Σ scale · (sum of the
/// 16 activations)` from the sums per 16; at most 256 · 64 · 128 · 127,
/// within i32, and exact in any order), then one fused multiply-add,
/// `acc = fma(d · dx, sum, acc)`, blocks in order into one accumulator:
/// the vector kernels' f32 steps, so their bits.
pub(crate) fn dot(w: &[u8], x: &QuantRow) -> f32 {
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(210).enumerate() {
        let xs = &x.values[256 * i..256 * (i + 1)];
        let (ql, qh, scales) = (&b[..128], &b[128..192], &b[192..208]);
        let mut sum = 0i32;
        for (j, &sc) in scales.iter().enumerate() {
            let mut part = 0i32;
            for e in 0..16 {
                let n = 16 * j + e;
                let (h, k, l) = (n / 128, n % 128 / 32, n % 32);
                let byte = ql[64 * h + 32 * (k % 2) + l];
                let low = if k < 2 { byte & 0x0F } else { byte >> 4 };
                let top = (qh[32 * h + l] >> (2 * k)) & 3;
                let q = (low | top << 4) as i32 - 32;
                part += q * xs[n] as i32;
            }
            sum += sc as i8 as i32 * part;
        }
        let d = half::f16::from_le_bytes([b[208], b[209]]).to_f32();
        acc = (d * x.scales[i]).mul_add(sum as f32, acc);
    }
    acc
}

for_each_isa! {
    /// Eight Q6_K rows, held as a group ([`crate::repack`]), against `R`
    /// activation rows (quantized per 256): the decode product, and prefill's
    /// rows that do not fill a tile.
    ///
    /// Q6_K, 256 weights in 210 bytes: 128 bytes of low nibbles, 64 bytes of
    /// high 2-bit pairs, 16 i8 scales (one per 16 weights), then `d` (f16). Each
    /// half of 128 weights uses 64 low-nibble bytes `ql`, 32 high bytes `qh` and
    /// 8 scales; its weight `l + 32k` (k = 0..3) takes the low or high nibble of
    /// `ql[l]` or `ql[l + 32]` and bits `2k..2k + 2` of `qh[l]`, and is
    /// `d·scale·(q − 32)`.
    ///
    /// The rows sit in the eight 32-bit lanes, as in [`q4k8_tile`]. The
    /// products take the unsigned `q` (0..63): two of them per 16-bit lane, two
    /// steps summed (at most 4 · 63 · 127 = 32,004) before one multiply by the
    /// rows' scales. The offset is one correction per block, `32 · Σ scale ·
    /// (sum of the 16 activations)`, from the row's sums per 16 (exact integers
    /// either way); then one fused multiply-add per block, as in [`q6k_gemm`],
    /// so a row's result has the same bits whichever kernel computed it.
    /// Returns `[activation row][weight row]`.
    ///
    /// # Safety
    /// As for [`q4k8_tile`], with a Q6_K group.
    pub unsafe fn q6k8_tile<const R: usize>(
        group: *const u8,
        xs: [&QuantRow; R]
    ) -> [[f32; 8]; R] = q6k8_tile_in, wide q6k8_tile_zmm if R == 1;
}

/// The body of [`q6k8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k8_tile_in<I: Ints, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::q6k::{GROUP_BLOCK, QS, SCALES};
    let blocks = xs[0].scales.len();
    let spread = scale_spread();
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm256_setzero_si256(); R];
        for h in 0..2 {
            let steps = I::Q6K_STEPS;
            for gp in 0..8 / steps {
                let mut acc16 = [[_mm256_setzero_si256(); R]; 4];
                for g in steps * gp..steps * (gp + 1) {
                    let w = q6k_values(rec.add(QS + (h * 8 + g) * 96));
                    for i in 0..R {
                        let y = ys[i].add(b * 256 + h * 128 + 4 * g);
                        for k in 0..4 {
                            let yv =
                                _mm256_set1_epi32((y.add(32 * k) as *const i32).read_unaligned());
                            acc16[k][i] = I::dot(acc16[k][i], w[k], yv);
                        }
                    }
                }
                // Weights 4g.. of quarter k use scale 8h + 2k + (g ≥ 4).
                for (k, a) in acc16.iter().enumerate() {
                    let pairs =
                        scale_pairs(rec.add(SCALES + (4 * h + k) * 16), spread[steps * gp / 4]);
                    let sc = I::scales(pairs);
                    for i in 0..R {
                        isum[i] = I::scaled(isum[i], a[i], sc);
                    }
                }
            }
        }
        q6k_block_end::<I, R>(rec, b, &isum, (sums, dys), &mut acc);
    }
    std::array::from_fn(|i| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[i]);
        out
    })
}

/// The end of a block of the Q6_K group kernels: the offset `32 · Σ scale ·
/// (sum of the 16 activations)` off each row's exact sum `isum`, then
/// `acc = fma(d · dy, sum, acc)` per activation row.
///
/// # Safety
/// As for the kernels: `rec` is block `b` of a group, and the rows have it.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k_block_end<I: Ints, const R: usize>(
    rec: *const u8,
    b: usize,
    isum: &[__m256i; R],
    (sums, dys): ([*const i16; R], [*const f32; R]),
    acc: &mut [__m256; R],
) {
    use crate::repack::q6k::{D, SCALES};
    let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i));
    for i in 0..R {
        let s = sums[i].add(b * 16);
        let mut offset = _mm256_setzero_si256();
        for p in 0..8 {
            let pair = _mm256_set1_epi32(
                (*s.add(2 * p) as u16 as i32) | ((*s.add(2 * p + 1) as i32) << 16),
            );
            let sc =
                _mm256_cvtepi8_epi16(_mm_loadu_si128(rec.add(SCALES + 16 * p) as *const __m128i));
            offset = I::madd(offset, sc, pair);
        }
        let tot = _mm256_sub_epi32(isum[i], _mm256_slli_epi32(offset, 5));
        let dy = _mm256_set1_ps(*dys[i].add(b));
        acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(tot), acc[i]);
    }
}

/// [`q6k8_tile`] on 512-bit registers against one activation row (decode;
/// against several, the AVX-512 VNNI build folds each activation broadcast
/// into its dot product as an embedded `{1to8}` operand, which the permutes
/// here cannot, and executes fewer instructions): two steps of the eight
/// rows per
/// register (lanes 0–7 step `g`, 8–15 step `g + 1`, each half loaded from
/// its own step), unpacked together; the activation's matching groups of
/// four bytes are spread to the two halves by one permute. A quarter's runs
/// over four steps are multiplied by the rows' scales repeated in both
/// halves, and a block's two halves, partial sums of the same rows, are
/// added (exactly) before the offset and the f32 steps, which are the
/// 256-bit kernel's: the same bits.
///
/// # Safety
/// As for [`q6k8_tile`], and the CPU has AVX-512 F, VL, BW and VNNI (the
/// caller is compiled with them).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k8_tile_zmm<const R: usize>(group: *const u8, xs: [&QuantRow; R]) -> [[f32; 8]; R] {
    use crate::repack::q6k::{GROUP_BLOCK, QS, SCALES};
    let blocks = xs[0].scales.len();
    let spread = scale_spread();
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    // Four-byte groups g and g + 1 of 32 activation bytes to the halves.
    let pick: [__m512i; 4] = std::array::from_fn(|p| {
        let (a, b) = (2 * p as i32, 2 * p as i32 + 1);
        _mm512_setr_epi32(a, a, a, a, a, a, a, a, b, b, b, b, b, b, b, b)
    });
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm512_setzero_si512(); R];
        for h in 0..2 {
            // Quarter k's 32 activation bytes of this half, per row.
            let yq: [[__m512i; 4]; R] = std::array::from_fn(|i| {
                std::array::from_fn(|k| {
                    let y = ys[i].add(b * 256 + h * 128 + 32 * k) as *const __m256i;
                    _mm512_castsi256_si512(_mm256_loadu_si256(y))
                })
            });
            for (gp, spread) in spread.iter().enumerate() {
                let mut runs = [[_mm512_setzero_si512(); R]; 4];
                for (p, pick) in pick.iter().enumerate().skip(2 * gp).take(2) {
                    let at = rec.add(QS + (h * 8 + 2 * p) * 96);
                    let w = q6k_values_zmm(at, at.add(96));
                    for i in 0..R {
                        for k in 0..4 {
                            let y = _mm512_permutexvar_epi32(*pick, yq[i][k]);
                            runs[k][i] = _mm512_dpbusd_epi32(runs[k][i], w[k], y);
                        }
                    }
                }
                // Weights 4g.. of quarter k use scale 8h + 2k + (g ≥ 4).
                for (k, run) in runs.iter().enumerate() {
                    let pairs = scale_pairs(rec.add(SCALES + (4 * h + k) * 16), *spread);
                    let sc = both_halves(Vnni::scales(pairs));
                    for i in 0..R {
                        isum[i] = _mm512_add_epi32(isum[i], _mm512_mullo_epi32(run[i], sc));
                    }
                }
            }
        }
        let isum: [__m256i; R] = std::array::from_fn(|i| fold_halves(isum[i]));
        q6k_block_end::<Vnni, R>(rec, b, &isum, (sums, dys), &mut acc);
    }
    std::array::from_fn(|i| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[i]);
        out
    })
}

/// [`q6k_values`] of two steps at once (`at`, `next`: their `a`, `b` and
/// `c` loads), the first in lanes 0–7 and the second in 8–15.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k_values_zmm(at: *const u8, next: *const u8) -> [__m512i; 4] {
    let six = _mm512_set1_epi8(0x3F);
    let load = |o: usize| {
        let first = _mm256_loadu_si256(at.add(o) as *const __m256i);
        let second = _mm256_loadu_si256(next.add(o) as *const __m256i);
        _mm512_inserti64x4::<1>(_mm512_castsi256_si512(first), second)
    };
    let (a, b, c) = (load(0), load(32), load(64));
    let top = |v: __m512i| _mm512_andnot_si512(six, v);
    let q3 = _mm512_or_si512(
        _mm512_or_si512(
            _mm512_srli_epi16::<6>(top(a)),
            _mm512_srli_epi16::<4>(top(b)),
        ),
        _mm512_srli_epi16::<2>(top(c)),
    );
    [
        _mm512_and_si512(a, six),
        _mm512_and_si512(b, six),
        _mm512_and_si512(c, six),
        q3,
    ]
}

/// The four value vectors of one step of a Q6_K group (`at`: its `a`, `b`
/// and `c` loads, see [`crate::repack`]): quarter `k`'s weights `4g..4g + 4`
/// of the eight rows, 0..63 each. Three take a mask; the fourth gathers its
/// bit pairs from the top of each byte (masked first, so the 16-bit shifts
/// move nothing across bytes).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k_values(at: *const u8) -> [__m256i; 4] {
    let six = _mm256_set1_epi8(0x3F);
    let a = _mm256_loadu_si256(at as *const __m256i);
    let b = _mm256_loadu_si256(at.add(32) as *const __m256i);
    let c = _mm256_loadu_si256(at.add(64) as *const __m256i);
    let top = |v: __m256i| _mm256_andnot_si256(six, v);
    let q3 = _mm256_or_si256(
        _mm256_or_si256(_mm256_srli_epi16(top(a), 6), _mm256_srli_epi16(top(b), 4)),
        _mm256_srli_epi16(top(c), 2),
    );
    [
        _mm256_and_si256(a, six),
        _mm256_and_si256(b, six),
        _mm256_and_si256(c, six),
        q3,
    ]
}

/// Shuffles that take scale `2p + e` of each row from a pair's 16 bytes
/// (`[row][2]`, in both halves of a vector) into the high byte of both
/// 16-bit halves of the row's lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale_spread() -> [__m256i; 2] {
    std::array::from_fn(|e| {
        let mut m = [-1i8; 32];
        for r in 0..8 {
            m[4 * r + 1] = (2 * r + e) as i8;
            m[4 * r + 3] = (2 * r + e) as i8;
        }
        _mm256_loadu_si256(m.as_ptr() as *const __m256i)
    })
}

/// The eight rows' signed scales as 16-bit pairs `[s_r, s_r]` per lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn scale_pairs(pair: *const u8, spread: __m256i) -> __m256i {
    let v = _mm256_broadcastsi128_si256(_mm_loadu_si128(pair as *const __m128i));
    _mm256_srai_epi16(_mm256_shuffle_epi8(v, spread), 8)
}

/// One Q6_K row unpacked for [`q6k_gemm`]: a byte (0..63) per weight, the
/// sixteen scales per block widened, and the block scale.
#[derive(Default)]
pub struct Q6kRow {
    q: Vec<u8>,
    scales: Vec<i32>,
    d: Vec<f32>,
}

impl Q6kRow {
    /// Unpacks the eight rows of a Q6_K group of `blocks` blocks
    /// ([`crate::repack`]), reusing the rows' buffers.
    ///
    /// # Safety
    /// `group` holds `blocks` group blocks; AVX2 and F16C are available.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn unpack_group(rows: &mut [Q6kRow; 8], group: *const u8, blocks: usize) {
        use crate::repack::q6k::{D, GROUP_BLOCK, QS, SCALES};
        for row in rows.iter_mut() {
            row.q.resize(blocks * 256, 0);
            row.scales.clear();
            row.d.clear();
        }
        for b in 0..blocks {
            let rec = group.add(b * GROUP_BLOCK);
            let mut d = [0f32; 8];
            _mm256_storeu_ps(
                d.as_mut_ptr(),
                _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i)),
            );
            for (r, row) in rows.iter_mut().enumerate() {
                row.d.push(d[r]);
                for j in 0..16 {
                    let s = *rec.add(SCALES + (j / 2) * 16 + 2 * r + j % 2) as i8;
                    row.scales.push(s as i32);
                }
            }
            for h in 0..2 {
                let w: [[__m256i; 4]; 8] =
                    std::array::from_fn(|g| q6k_values(rec.add(QS + (h * 8 + g) * 96)));
                for k in 0..4 {
                    // Quarter k's 32 weights of each row: four per step.
                    let t = transpose8x32(w.map(|step| step[k]));
                    for (row, v) in rows.iter_mut().zip(t) {
                        let out = row.q.as_mut_ptr().add(b * 256 + h * 128 + 32 * k);
                        _mm256_storeu_si256(out as *mut __m256i, v);
                    }
                }
            }
        }
    }
}

for_each_isa! {
    /// Two unpacked Q6_K rows against `T` tiles of eight activation rows, as
    /// [`q4k_gemm`]: products of eight weights (at most 4 · 63 · 127 = 32,004
    /// per i16 lane) share a scale and are summed before one multiply by it;
    /// the −32 offset is one correction per block from the rows' sums per 16.
    /// Per block, the exact integer sums take the same fused step as
    /// [`q6k8_tile`], so every result has the same bits as there.
    ///
    /// # Safety
    /// As for [`q4k_gemm`].
    pub unsafe fn q6k_gemm<const T: usize>(
        w: [&Q6kRow; 2],
        tiles: [&ActTile; T]
    ) -> [[[f32; 8]; T]; 2] = q6k_gemm_in;
}

/// The body of [`q6k_gemm`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k_gemm_in<I: Ints, const T: usize>(
    w: [&Q6kRow; 2],
    tiles: [&ActTile; T],
) -> [[[f32; 8]; T]; 2] {
    let blocks = w[0].d.len();
    let mut acc = [[_mm256_setzero_ps(); T]; 2];
    let a_base: [*const i8; T] = tiles.map(|t| t.bytes.as_ptr());
    let q_base: [*const u8; 2] = w.map(|r| r.q.as_ptr());
    for b in 0..blocks {
        let mut isum = [[_mm256_setzero_si256(); T]; 2];
        let steps = I::Q6K_STEPS;
        for e in 0..64 / steps {
            let scales = w.map(|r| r.scales[b * 16 + e * steps / 4] as i16);
            scaled_run::<I, T>(
                q_base,
                a_base,
                b * 256 + e * 4 * steps,
                steps,
                scales,
                &mut isum,
            );
        }
        for t in 0..T {
            let dy = _mm256_loadu_ps(tiles[t].scales.as_ptr().add(b * 8));
            let sums = tiles[t].sums16.as_ptr().add(b * 128);
            for r in 0..2 {
                let mut offset = _mm256_setzero_si256();
                for j in 0..16 {
                    let s = _mm256_loadu_si256(sums.add(j * 8) as *const __m256i);
                    let sc = _mm256_set1_epi32(w[r].scales[b * 16 + j]);
                    offset = _mm256_add_epi32(offset, _mm256_mullo_epi32(sc, s));
                }
                let tot = _mm256_sub_epi32(isum[r][t], _mm256_slli_epi32(offset, 5));
                let d = _mm256_mul_ps(_mm256_set1_ps(w[r].d[b]), dy);
                acc[r][t] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(tot), acc[r][t]);
            }
        }
    }
    let mut out = [[[0f32; 8]; T]; 2];
    for r in 0..2 {
        for t in 0..T {
            _mm256_storeu_ps(out[r][t].as_mut_ptr(), acc[r][t]);
        }
    }
    out
}
