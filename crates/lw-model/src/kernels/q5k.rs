//! Q5_K (256 weights in 176 bytes): the decode tile over a group of eight
//! rows; its scales and block end are Q4_K's.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::*;
use super::q4k::{k_block_end, row_scales};
use super::quantize::QuantRow;

for_each_isa! {
    /// Eight Q5_K rows, held as a group ([`crate::repack::q5k`]), against
    /// `R` activation rows (quantized per 256): decode and prefill.
    ///
    /// [`q4k8_tile`]'s steps, each value load's weights taking their fifth
    /// bits from the matching load of the fifth-bit bytes (bit `2c` for the
    /// low nibbles of chunk `c`, `2c + 1` for the high ones, shifted to bit
    /// 4). A sub-block's byte products are summed in 16-bit lanes four
    /// loads at a time (at most 4 · 2 · 31 · 127 = 31,496), so two runs per
    /// sub-block, each multiplied by the eight rows' scales. Per block,
    /// `fma(d · dy, sum, acc)` and `fma(dmin · dy, msum, macc)`, and at the
    /// end `acc − macc`: the steps of [`crate::portable::q5k_dot`], so the
    /// same bits. Returns `[activation row][weight row]`.
    ///
    /// # Safety
    /// The CPU runs `isa`; `group` points at a group of `xs[0].scales.len()`
    /// blocks, and every row of `xs` has that many blocks.
    pub unsafe fn q5k8_tile<const R: usize>(
        group: *const u8,
        xs: [&QuantRow; R]
    ) -> [[f32; 8]; R] = q5k8_tile_in;
}

/// The body of [`q5k8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q5k8_tile_in<I: Ints, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::q5k::{GROUP_BLOCK, QH, QS, SCALES};
    let blocks = xs[0].scales.len();
    let low = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    // Bit `bit` of each byte to bit 4 (16-bit shifts of at most four
    // places carry nothing into bit 4 of the neighbouring byte).
    let to_bit4 = |v: __m256i, bit: i32| {
        let moved = if bit <= 4 {
            _mm256_sll_epi16(v, _mm_cvtsi32_si128(4 - bit))
        } else {
            _mm256_srl_epi16(v, _mm_cvtsi32_si128(bit - 4))
        };
        _mm256_and_si256(moved, fifth)
    };
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    let mut macc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * GROUP_BLOCK);
        let mut isum = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            let s_lo = I::scales(row_scales(rec.add(SCALES + 2 * c * 8)));
            let s_hi = I::scales(row_scales(rec.add(SCALES + (2 * c + 1) * 8)));
            for run in 0..2 {
                let mut lo16 = [_mm256_setzero_si256(); R];
                let mut hi16 = [_mm256_setzero_si256(); R];
                for g in 4 * run..4 * run + 4 {
                    let q = _mm256_loadu_si256(rec.add(QS + (c * 8 + g) * 32) as *const __m256i);
                    let h = _mm256_loadu_si256(rec.add(QH + g * 32) as *const __m256i);
                    let q_lo = _mm256_or_si256(_mm256_and_si256(q, low), to_bit4(h, 2 * c as i32));
                    let q_hi = _mm256_or_si256(
                        _mm256_and_si256(_mm256_srli_epi16(q, 4), low),
                        to_bit4(h, 2 * c as i32 + 1),
                    );
                    for i in 0..R {
                        let y = ys[i].add(b * 256 + c * 64 + 4 * g);
                        let ya = _mm256_set1_epi32((y as *const i32).read_unaligned());
                        let yb = _mm256_set1_epi32((y.add(32) as *const i32).read_unaligned());
                        lo16[i] = I::dot(lo16[i], q_lo, ya);
                        hi16[i] = I::dot(hi16[i], q_hi, yb);
                    }
                }
                for i in 0..R {
                    isum[i] = I::scaled(I::scaled(isum[i], lo16[i], s_lo), hi16[i], s_hi);
                }
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
