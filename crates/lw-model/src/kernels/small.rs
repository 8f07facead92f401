//! The 32-weight types held in groups of eight rows (Q4_0, Q4_1, Q5_0,
//! Q5_1, IQ4_NL): one decode tile for all of them.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::*;
use super::quantize::QuantRow;

for_each_isa! {
    /// Eight rows of a 32-weight type (`T`, a [`crate::repack::small`]
    /// code: Q4_0, Q4_1, Q5_0, Q5_1 or IQ4_NL), held as a group, against
    /// `R` activation rows (quantized per 32): decode, and prefill.
    ///
    /// The rows sit in the eight 32-bit lanes. A load holds four nibble
    /// bytes of every row: masked, they are four weights of each (the fifth
    /// bits shifted in for Q5_0 and Q5_1); shifted, four more. Each takes one
    /// four-byte product with four activation bytes broadcast to all lanes,
    /// unsigned weights times signed activations (IQ4_NL's levels, signed,
    /// move their signs onto the activations). Q4_0's and Q5_0's offsets come
    /// off the exact sum as 8 or 16 times the activations' sum. Per block,
    /// each row's sum takes one fused multiply-add with `d · dx` (and Q4_1's
    /// and Q5_1's `m · dx` one more with the activations' sum): the steps of
    /// [`crate::portable`]'s row product, so the same bits. Returns
    /// `[activation row][weight row]`.
    ///
    /// # Safety
    /// The CPU runs `isa`; `group` points at a group of `xs[0].scales.len()`
    /// blocks of type `T`, and every row of `xs` has that many blocks.
    pub unsafe fn small8_tile<const T: usize, const R: usize>(
        group: *const u8,
        xs: [&QuantRow; R]
    ) -> [[f32; 8]; R] = small8_tile_in;
}

/// The body of [`small8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn small8_tile_in<I: Ints, const T: usize, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::small;
    let blocks = xs[0].scales.len();
    let rec_bytes = small::group_block(T);
    let low = _mm256_set1_epi8(0x0F);
    let fifth = _mm256_set1_epi8(0x10);
    let levels = _mm256_broadcastsi128_si256(_mm_loadu_si128(
        crate::qtype::IQ4_LEVELS.as_ptr() as *const __m128i
    ));
    let ys: [*const i8; R] = xs.map(|x| x.values.as_ptr());
    let dys: [*const f32; R] = xs.map(|x| x.scales.as_ptr());
    let sums: [*const i16; R] = xs.map(|x| x.sums16.as_ptr());
    let mut acc = [_mm256_setzero_ps(); R];
    for b in 0..blocks {
        let rec = group.add(b * rec_bytes);
        let qh = if small::has_qh(T) {
            _mm256_loadu_si256(rec.add(small::qh(T)) as *const __m256i)
        } else {
            _mm256_setzero_si256()
        };
        // Per row, the low nibbles' and the high nibbles' sums: two chains.
        let mut lo_sum = [_mm256_setzero_si256(); R];
        let mut hi_sum = [_mm256_setzero_si256(); R];
        for c in 0..4 {
            let v = _mm256_loadu_si256(rec.add(small::qs(T) + 32 * c) as *const __m256i);
            let mut lo = _mm256_and_si256(v, low);
            let mut hi = _mm256_and_si256(_mm256_srli_epi16::<4>(v), low);
            if small::has_qh(T) {
                // Bit c of each byte is a low nibble's fifth bit, bit c + 4
                // a high one's: both to bit 4 (16-bit shifts carry nothing
                // into bit 4 of the neighbouring byte).
                let up = _mm256_sll_epi16(qh, _mm_cvtsi32_si128(4 - c as i32));
                let down = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(c as i32));
                lo = _mm256_or_si256(lo, _mm256_and_si256(up, fifth));
                hi = _mm256_or_si256(hi, _mm256_and_si256(down, fifth));
            }
            if T == small::IQ4_NL {
                lo = _mm256_shuffle_epi8(levels, lo);
                hi = _mm256_shuffle_epi8(levels, hi);
            }
            for i in 0..R {
                let y = ys[i].add(b * 32 + 4 * c);
                let ya = _mm256_set1_epi32((y as *const i32).read_unaligned());
                let yb = _mm256_set1_epi32((y.add(16) as *const i32).read_unaligned());
                if T == small::IQ4_NL {
                    let (la, ha) = (_mm256_sign_epi8(lo, lo), _mm256_sign_epi8(hi, hi));
                    lo_sum[i] = I::dot4(lo_sum[i], la, _mm256_sign_epi8(ya, lo));
                    hi_sum[i] = I::dot4(hi_sum[i], ha, _mm256_sign_epi8(yb, hi));
                } else {
                    lo_sum[i] = I::dot4(lo_sum[i], lo, ya);
                    hi_sum[i] = I::dot4(hi_sum[i], hi, yb);
                }
            }
        }
        let dw = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(small::D) as *const __m128i));
        for i in 0..R {
            let xsum = *sums[i].add(2 * b) as i32 + *sums[i].add(2 * b + 1) as i32;
            let mut isum = _mm256_add_epi32(lo_sum[i], hi_sum[i]);
            if T == small::Q4_0 {
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(8 * xsum));
            } else if T == small::Q5_0 {
                isum = _mm256_sub_epi32(isum, _mm256_set1_epi32(16 * xsum));
            }
            let dx = _mm256_set1_ps(*dys[i].add(b));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(dw, dx), _mm256_cvtepi32_ps(isum), acc[i]);
            if small::has_m(T) {
                let mw = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(small::M) as *const __m128i));
                let xs = _mm256_set1_ps(xsum as f32);
                acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(mw, dx), xs, acc[i]);
            }
        }
    }
    let mut out = [[0f32; 8]; R];
    for i in 0..R {
        _mm256_storeu_ps(out[i].as_mut_ptr(), acc[i]);
    }
    out
}
