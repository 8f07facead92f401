//! Activations quantized to i8 (per 32 values, or per 256 with sums per
//! 16): the scalar definition and its AVX2 twin, which gives the same bits.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An activation row quantized to i8.
#[derive(Default)]
pub struct QuantRow {
    /// One scale per `group` values.
    pub scales: Vec<f32>,
    pub values: Vec<i8>,
    /// Sum of the i8 values of each run of 16 (at most 16 · 127): the
    /// offsets of Q4_1, Q5_1 and the K-quants take theirs from them.
    pub sums16: Vec<i16>,
}

/// Quantizes `x` with one scale per `group` values, rounding as llama.cpp's
/// AVX2 build does for the same products, so both engines multiply the same
/// integers:
/// - 32 (Q8_0 weights): `id = 127 / amax`, values `round(x · id)`, and the
///   scale `amax / 127` kept as f16, as in a Q8_0 block;
/// - 256 (K-quant weights, llama.cpp's Q8_K): `s = 127 / amax`, values
///   `round(x · s)`, scale `1 / s` in f32.
///
/// Rounding is to nearest, halves to even. `x.len()` is a multiple of
/// `group`.
pub fn quantize_row(x: &[f32], group: usize) -> QuantRow {
    let mut row = QuantRow::default();
    quantize_row_into(x, group, &mut row);
    row
}

/// [`quantize_row`] into `row`, reusing its buffers (no allocation once
/// they have the room).
pub fn quantize_row_into(x: &[f32], group: usize, row: &mut QuantRow) {
    row.scales.resize(x.len() / group, 0.0);
    row.values.resize(x.len(), 0);
    #[cfg(target_arch = "x86_64")]
    if super::available() {
        // SAFETY: the features were just checked; the lengths match.
        unsafe { quantize_avx2(x, group, &mut row.scales, &mut row.values) };
        row.fill_sums();
        return;
    }
    quantize_scalar(x, group, &mut row.scales, &mut row.values);
    row.fill_sums();
}

/// [`quantize_row`] one value at a time (CPUs without the kernels, and the
/// reference for the vector version).
fn quantize_scalar(x: &[f32], group: usize, scales: &mut [f32], values: &mut [i8]) {
    for ((chunk, out), scale) in x
        .chunks(group)
        .zip(values.chunks_mut(group))
        .zip(scales.iter_mut())
    {
        let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        if amax == 0.0 {
            out.fill(0);
            *scale = 0.0;
            continue;
        }
        let id = 127.0 / amax;
        for (o, v) in out.iter_mut().zip(chunk) {
            *o = (v * id).round_ties_even().clamp(-127.0, 127.0) as i8;
        }
        *scale = if group == 32 {
            half::f16::from_f32(amax / 127.0).to_f32()
        } else {
            1.0 / id
        };
    }
}

impl QuantRow {
    /// The sums per 16 of the values (the products of types with offsets
    /// take them from these; a sum per 32 is two of them).
    fn fill_sums(&mut self) {
        self.sums16.clear();
        self.sums16.extend(
            self.values
                .chunks(16)
                .map(|c| c.iter().map(|&v| v as i16).sum::<i16>()),
        );
    }
}

/// [`quantize_row`] eight lanes at a time: the same products and the same
/// rounding (the conversion's default mode, nearest-even).
///
/// # Safety
/// AVX2 is available; `values.len() == x.len() == scales.len() * group`,
/// and `group` is a multiple of 32.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_avx2(x: &[f32], group: usize, scales: &mut [f32], values: &mut [i8]) {
    let abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (g, scale) in scales.iter_mut().enumerate() {
        let src = x.as_ptr().add(g * group);
        let mut m = _mm256_setzero_ps();
        for j in (0..group).step_by(8) {
            m = _mm256_max_ps(m, _mm256_and_ps(_mm256_loadu_ps(src.add(j)), abs_mask));
        }
        let m4 = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        let amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        let dst = values.as_mut_ptr().add(g * group);
        if amax == 0.0 {
            std::ptr::write_bytes(dst, 0, group);
            *scale = 0.0;
            continue;
        }
        let id = 127.0 / amax;
        let idv = _mm256_set1_ps(id);
        for j in (0..group).step_by(32) {
            let q: [__m256i; 4] = std::array::from_fn(|k| {
                _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(src.add(j + 8 * k)), idv))
            });
            // Saturating packs keep ±127 (|x · id| ≤ 127 up to rounding);
            // the permutation undoes their lane interleaving.
            let q16a = _mm256_packs_epi32(q[0], q[1]);
            let q16b = _mm256_packs_epi32(q[2], q[3]);
            let q8 = _mm256_packs_epi16(q16a, q16b);
            let q8 = _mm256_permutevar8x32_epi32(q8, order);
            let q8 = _mm256_max_epi8(q8, _mm256_set1_epi8(-127));
            _mm256_storeu_si256(dst.add(j) as *mut __m256i, q8);
        }
        *scale = if group == 32 {
            half::f16::from_f32(amax / 127.0).to_f32()
        } else {
            1.0 / id
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::available;

    /// The vector quantizer gives the scalar one's bits, ties included.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_quantizer_matches_the_scalar_one() {
        if !available() {
            return;
        }
        let mut s = 11u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (s >> 33) as f32 / (1u64 << 31) as f32 * 2.0 - 1.0
        };
        let mut x: Vec<f32> = (0..4096).map(|_| next() * 3.0).collect();
        // A group of exact halves after scaling (amax 127: x · id = x), a
        // group of zeros and one with a single value.
        for (i, v) in x[..256].iter_mut().enumerate() {
            *v = (i as f32 - 128.0) + 0.5;
        }
        x[0] = 127.0;
        x[255] = 0.0;
        x[256..512].fill(0.0);
        x[512..768].fill(0.0);
        x[600] = -2.5;
        for group in [32, 256] {
            let mut scales = vec![0f32; x.len() / group];
            let mut values = vec![0i8; x.len()];
            quantize_scalar(&x, group, &mut scales, &mut values);
            let mut vscales = vec![1f32; x.len() / group];
            let mut vvalues = vec![1i8; x.len()];
            // SAFETY: checked above; the lengths match.
            unsafe { quantize_avx2(&x, group, &mut vscales, &mut vvalues) };
            assert_eq!(values, vvalues, "group {group}");
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&scales), bits(&vscales), "group {group}");
            // Halves went to even: 0.5 → 0, 1.5 → 2, -0.5 → 0 (group 256
            // holds x[0..256] with amax 127).
            if group == 256 {
                assert_eq!(&values[128..131], &[0, 2, 2]);
                assert_eq!(values[127], 0);
            }
        }
    }
}
