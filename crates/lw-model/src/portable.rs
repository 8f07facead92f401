//! The block types Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, IQ4_NL and IQ4_XS
//! (the grid i-quants are in [`crate::igrid`]) in portable Rust: one row's
//! dequantization, and its product with an activation row quantized to i8
//! ([`QuantRow`]). These products are the definition the vector kernels
//! keep: the 32-weight types' group kernel
//! ([`crate::kernels::small8_tile`]) and the AVX2 row products of Q2_K,
//! Q3_K and IQ4_XS below give the same bits.
//!
//! A product keeps the design of the vector kernels: per block, one exact
//! integer sum of weight × activation integers, then one f32
//! multiply-add by the block's scales, blocks in order. So a row's result
//! does not depend on how many rows are computed together (prefill, batch
//! and decode give the same bits).
//!
//! Activations are quantized per 32 values for the 32-weight types and per
//! 256 (with sums per 16) for the 256-weight ones, as
//! [`crate::kernels::quantize_row`] does for Q8_0 and the K-quants.
//!
//! Layouts (ggml's `ggml-common.h`), little-endian:
//! - Q4_1, 32 in 20 bytes: `d`, `m` (f16), 16 bytes of nibbles (low nibbles
//!   are weights 0..16, high 16..32); a weight is `d·q + m`.
//! - Q5_0, 32 in 22: `d`, `qh` (u32: bit `j` is weight `j`'s fifth bit),
//!   nibbles as Q4_1; a weight is `d·(q − 16)`.
//! - Q5_1, 32 in 24: `d`, `m`, `qh`, nibbles; a weight is `d·q + m`.
//! - Q2_K, 256 in 84: 16 bytes of scale (low nibble) and min (high), 64
//!   bytes of 2-bit values, `d`, `dmin`; weight `128n + 32j + l` is bits
//!   `2j..2j+2` of byte `32n + l`, in sub-block `8n + 2j + l/16`; a weight is
//!   `d·sc·q − dmin·m`.
//! - Q3_K, 256 in 110: 32 bytes of high bits (`hmask`), 64 of 2-bit values
//!   (placed as Q2_K's), 12 of 6-bit scales, `d`; weight `128n + 32j + l`
//!   has its high bit in bit `4n + j` of `hmask[l]`; a weight is
//!   `d·(sc − 32)·(q − 4·(1 − high))`.
//! - IQ4_NL, 32 in 18: `d`, nibbles as Q4_1 indexing a table of 16
//!   non-uniform levels; a weight is `d·level`.
//! - IQ4_XS, 256 in 136: `d`, 16 bits of scales' high pairs, 4 bytes of
//!   scales' low nibbles, then eight sub-blocks of 32 as IQ4_NL's nibbles; a
//!   weight is `d·(sc − 32)·level`.

use crate::kernels::QuantRow;
use crate::qtype::{QType, IQ4_LEVELS};

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Whether this module handles `qtype`.
pub(crate) fn handles(qtype: QType) -> bool {
    matches!(
        qtype,
        QType::Q4_0
            | QType::Q4_1
            | QType::Q5_0
            | QType::Q5_1
            | QType::Q2K
            | QType::Q3K
            | QType::IQ4NL
            | QType::IQ4XS
    )
}

/// The integer values of one 32-weight block (Q4_1, Q5_0, Q5_1, IQ4_NL),
/// and its scale and offset: a weight is `d·q[i] + m`.
fn small_block(qtype: QType, b: &[u8]) -> ([i32; 32], f32, f32) {
    let mut q = [0i32; 32];
    let (d, m, nib, high) = match qtype {
        QType::Q4_0 => (f16_at(b, 0), 0.0, &b[2..18], None),
        QType::Q4_1 => (f16_at(b, 0), f16_at(b, 2), &b[4..20], None),
        QType::Q5_0 => (f16_at(b, 0), 0.0, &b[6..22], Some(u32_at(b, 2))),
        QType::Q5_1 => (f16_at(b, 0), f16_at(b, 2), &b[8..24], Some(u32_at(b, 4))),
        QType::IQ4NL => (f16_at(b, 0), 0.0, &b[2..18], None),
        _ => unreachable!("not a 32-weight type of this module"),
    };
    for (j, &byte) in nib.iter().enumerate() {
        q[j] = (byte & 0x0F) as i32;
        q[j + 16] = (byte >> 4) as i32;
    }
    if let Some(h) = high {
        for (j, v) in q.iter_mut().enumerate() {
            *v |= (((h >> j) & 1) << 4) as i32;
        }
    }
    match qtype {
        QType::Q4_0 => q.iter_mut().for_each(|v| *v -= 8),
        QType::Q5_0 => q.iter_mut().for_each(|v| *v -= 16),
        QType::IQ4NL => q
            .iter_mut()
            .for_each(|v| *v = IQ4_LEVELS[*v as usize] as i32),
        _ => {}
    }
    (q, d, m)
}

/// Q3_K's sixteen 6-bit scales, each less 32.
fn q3k_scales(s: &[u8]) -> [i32; 16] {
    let mut out = [0i32; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let low = if i < 8 { s[i] & 0x0F } else { s[i - 8] >> 4 };
        let high = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (low | (high << 4)) as i32 - 32;
    }
    out
}

/// The integer values of one 256-weight block (Q2_K, Q3_K, IQ4_XS) and, per
/// sub-block, its integer scale and integer min (16 sub-blocks of 16 for
/// Q2_K and Q3_K, 8 of 32 for IQ4_XS); a weight is `d·sc·q − dmin·m`.
struct BigBlock {
    q: [i32; 256],
    sc: [i32; 16],
    m: [i32; 16],
    sub: usize,
    d: f32,
    dmin: f32,
}

fn big_block(qtype: QType, b: &[u8]) -> BigBlock {
    let mut blk = BigBlock {
        q: [0; 256],
        sc: [0; 16],
        m: [0; 16],
        sub: 16,
        d: 0.0,
        dmin: 0.0,
    };
    match qtype {
        QType::Q2K => {
            for (i, &byte) in b[..16].iter().enumerate() {
                blk.sc[i] = (byte & 0x0F) as i32;
                blk.m[i] = (byte >> 4) as i32;
            }
            two_bit_values(&b[16..80], &mut blk.q);
            blk.d = f16_at(b, 80);
            blk.dmin = f16_at(b, 82);
        }
        QType::Q3K => {
            two_bit_values(&b[32..96], &mut blk.q);
            let hmask = &b[0..32];
            for (i, v) in blk.q.iter_mut().enumerate() {
                let (n, j, l) = (i / 128, i % 128 / 32, i % 32);
                if hmask[l] & (1 << (4 * n + j)) == 0 {
                    *v -= 4;
                }
            }
            blk.sc = q3k_scales(&b[96..108]);
            blk.d = f16_at(b, 108);
        }
        QType::IQ4XS => {
            blk.d = f16_at(b, 0);
            let high = u16::from_le_bytes([b[2], b[3]]);
            blk.sub = 32;
            for ib in 0..8 {
                let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
                let hi = ((high >> (2 * ib)) & 3) as u8;
                blk.sc[ib] = (low | (hi << 4)) as i32 - 32;
                for (j, &byte) in b[8 + 16 * ib..24 + 16 * ib].iter().enumerate() {
                    blk.q[32 * ib + j] = IQ4_LEVELS[(byte & 0x0F) as usize] as i32;
                    blk.q[32 * ib + j + 16] = IQ4_LEVELS[(byte >> 4) as usize] as i32;
                }
            }
        }
        _ => unreachable!("not a 256-weight type of this module"),
    }
    blk
}

/// Q2_K's and Q3_K's 2-bit values: weight `128n + 32j + l` is bits
/// `2j..2j+2` of byte `32n + l`.
fn two_bit_values(qs: &[u8], q: &mut [i32; 256]) {
    for (i, v) in q.iter_mut().enumerate() {
        let (n, j, l) = (i / 128, i % 128 / 32, i % 32);
        *v = ((qs[32 * n + l] >> (2 * j)) & 3) as i32;
    }
}

/// Row `bytes` of `qtype` as f32 values, computed as the `gguf` package's
/// numpy reference does (the same operations in the same order, so the
/// same bits).
pub(crate) fn dequantize_row(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    let bb = qtype.block_bytes();
    let be = qtype.block_elems();
    for (b, o) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(be)) {
        if be == 32 {
            let (q, d, m) = small_block(qtype, b);
            for (o, &q) in o.iter_mut().zip(&q) {
                *o = if matches!(qtype, QType::Q4_1 | QType::Q5_1) {
                    d * q as f32 + m
                } else {
                    d * q as f32
                };
            }
            continue;
        }
        let blk = big_block(qtype, b);
        for (i, o) in o.iter_mut().enumerate() {
            let s = i / blk.sub;
            // Scale first, then the value: the reference's order.
            let dl = blk.d * blk.sc[s] as f32;
            *o = match qtype {
                QType::Q2K => dl * blk.q[i] as f32 - blk.dmin * blk.m[s] as f32,
                _ => dl * blk.q[i] as f32,
            };
        }
    }
}

/// `Σ_i w[i]·x[i]` for one weight row (`w`, whole blocks of `qtype`) and
/// one activation row quantized per 32 (32-weight types) or per 256 with
/// sums per 16 (256-weight types).
pub(crate) fn dot(qtype: QType, w: &[u8], x: &QuantRow) -> f32 {
    if qtype.block_elems() == 32 {
        return small_dot(qtype, w, x);
    }
    if qtype == QType::Q5K {
        return q5k_dot(w, x);
    }
    #[cfg(target_arch = "x86_64")]
    if crate::kernels::available() {
        // SAFETY (both): AVX2 and F16C were just checked; `w` holds whole
        // blocks and `x` a value per weight, with its sums per 16.
        match qtype {
            QType::IQ4XS => return unsafe { iq4xs_dot_avx2(w, x) },
            QType::Q2K | QType::Q3K => return unsafe { k_low_dot_avx2(qtype, w, x) },
            _ => {}
        }
    }
    big_dot(qtype, w, x)
}

/// A Q5_K row (`w`, whole blocks) times an activation row quantized per
/// 256 with sums per 16: per block, the exact integer sums
/// `Σ scale · (weights × activations)` and `Σ min · activations` over the
/// eight sub-blocks, `acc = fma(d · dx, sum, acc)` and
/// `macc = fma(dmin · dx, msum, macc)`, and at the end `acc − macc`. This is
/// the product's definition, which the group kernel
/// ([`crate::kernels::q5k8_tile`]) keeps bit for bit. Layout (176 bytes):
/// `d`, `dmin` (f16), 12 bytes of 6-bit scales and mins (as Q4_K's), 32
/// bytes of fifth bits (bit `2c` of byte `l` is weight `64c + l`'s, bit
/// `2c + 1` weight `64c + 32 + l`'s), 128 bytes of nibbles (byte `32c + l`:
/// weight `64c + l` low, `64c + 32 + l` high).
pub(crate) fn q5k_dot(w: &[u8], x: &QuantRow) -> f32 {
    let (mut acc, mut macc) = (0f32, 0f32);
    for (i, b) in w.chunks_exact(176).enumerate() {
        let xs = &x.values[i * 256..(i + 1) * 256];
        let (mut sum, mut msum) = (0i32, 0i32);
        for c in 0..4 {
            for half in 0..2 {
                let s = 2 * c + half;
                let (sc, m) = crate::repack::scale_min(&b[4..16], s);
                let mut part = 0i32;
                for l in 0..32 {
                    let byte = b[48 + 32 * c + l];
                    let nib = if half == 0 { byte & 0x0F } else { byte >> 4 };
                    let high = (b[16 + l] >> s) & 1;
                    let q = (nib | high << 4) as i32;
                    part += q * xs[64 * c + 32 * half + l] as i32;
                }
                sum += sc as i32 * part;
                let xsum = x.sums16[i * 16 + 2 * s] as i32 + x.sums16[i * 16 + 2 * s + 1] as i32;
                msum += m as i32 * xsum;
            }
        }
        let dx = x.scales[i];
        acc = (f16_at(b, 0) * dx).mul_add(sum as f32, acc);
        macc = (f16_at(b, 2) * dx).mul_add(msum as f32, macc);
    }
    acc - macc
}

/// [`dot`] for the 256-weight types, one block at a time: the exact integer
/// sums of scale × (weights × activations) and of minimum × activations,
/// then `dx · (d · sum − dmin · msum)` in f32.
fn big_dot(qtype: QType, w: &[u8], x: &QuantRow) -> f32 {
    let (bb, be) = (qtype.block_bytes(), qtype.block_elems());
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(bb).enumerate() {
        let xs = &x.values[i * be..(i + 1) * be];
        let dx = x.scales[i];
        let blk = big_block(qtype, b);
        let (mut sum, mut msum) = (0i32, 0i32);
        for s in 0..256 / blk.sub {
            let r = s * blk.sub..(s + 1) * blk.sub;
            let part: i32 = blk.q[r.clone()]
                .iter()
                .zip(&xs[r])
                .map(|(&q, &v)| q * v as i32)
                .sum();
            sum += blk.sc[s] * part;
            if blk.m[s] != 0 {
                msum += blk.m[s] * x.sums16[i * 16 + s] as i32;
            }
        }
        acc += dx * (blk.d * sum as f32 - blk.dmin * msum as f32);
    }
    acc
}

/// A row of 32-weight blocks (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL) times an
/// activation row quantized per 32: per block, the exact integer sum of
/// weights times activations takes one fused multiply-add with `d · dx`,
/// and for the types with an offset the activations' sum one more with
/// `m · dx`, blocks in order. This is the product's definition: the group
/// kernel ([`crate::kernels::small8_tile`]), which keeps eight rows in the
/// lanes of a vector, takes the same steps, so a row's result has the same
/// bits whichever computed it and whatever rows are beside it.
pub(crate) fn small_dot(qtype: QType, w: &[u8], x: &QuantRow) -> f32 {
    let offset = matches!(qtype, QType::Q4_1 | QType::Q5_1);
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(qtype.block_bytes()).enumerate() {
        let xs = &x.values[i * 32..(i + 1) * 32];
        let dx = x.scales[i];
        let (q, d, m) = small_block(qtype, b);
        let sum: i32 = q.iter().zip(xs).map(|(&q, &v)| q * v as i32).sum();
        acc = (d * dx).mul_add(sum as f32, acc);
        if offset {
            let xsum = x.sums16[2 * i] as i32 + x.sums16[2 * i + 1] as i32;
            acc = (m * dx).mul_add(xsum as f32, acc);
        }
    }
    acc
}

/// [`dot`] for IQ4_XS in AVX2: per sub-block of 32, the weights through
/// the level table by a byte shuffle, `|w| · sign(x, w)` summed in 32-bit
/// lanes and multiplied by the sub-block's integer scale; a block's lanes
/// add up to the portable loop's exact integer sum (at most
/// 8 · 32 · 32 · 127 · 127, within i32), which then takes the same f32
/// steps, so the same bits.
///
/// # Safety
/// AVX2 and F16C are available; `w` holds whole IQ4_XS blocks and `x` a
/// value per weight.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn iq4xs_dot_avx2(w: &[u8], x: &QuantRow) -> f32 {
    use std::arch::x86_64::*;
    let table = _mm256_broadcastsi128_si256(_mm_loadu_si128(IQ4_LEVELS.as_ptr() as *const __m128i));
    let low = _mm256_set1_epi8(0x0F);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(136).enumerate() {
        let high = u16::from_le_bytes([b[2], b[3]]);
        let mut lanes = _mm256_setzero_si256();
        for ib in 0..8 {
            let lo = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0x0F;
            let hi = ((high >> (2 * ib)) & 3) as u8;
            let sc = (lo | (hi << 4)) as i32 - 32;
            let packed = _mm_loadu_si128(b.as_ptr().add(8 + 16 * ib) as *const __m128i);
            let nib = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(packed, 4), packed), low);
            let q = _mm256_shuffle_epi8(table, nib);
            let xv = _mm256_loadu_si256(x.values.as_ptr().add(256 * i + 32 * ib) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
            let part = _mm256_madd_epi16(pairs, ones16);
            lanes = _mm256_add_epi32(lanes, _mm256_mullo_epi32(part, _mm256_set1_epi32(sc)));
        }
        let h = _mm_add_epi32(
            _mm256_castsi256_si128(lanes),
            _mm256_extracti128_si256(lanes, 1),
        );
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01)));
        // The portable loop's f32 steps: IQ4_XS has no minimums, and
        // subtracting their +0.0 leaves every value's bits as they are.
        acc += x.scales[i] * (f16_avx(b.as_ptr()) * sum as f32);
    }
    acc
}

/// [`dot`] for Q2_K and Q3_K in AVX2. Per run of 32 weights `g` (bits
/// `2j..2j+2` of bytes `32n..32n + 32`, `g = 4n + j`), the 2-bit values,
/// less 4 where Q3_K's high bit is clear, times the activations in 32-bit
/// lanes: lanes 0–3 are sub-block `2g`, lanes 4–7 sub-block `2g + 1`, each
/// multiplied by its integer scale. A block's lanes add up to the portable
/// loop's exact integer sum; the minimums' sum comes from the activations'
/// sums per 16, as there; then the same f32 steps, so the same bits.
///
/// # Safety
/// AVX2 and F16C are available; `w` holds whole blocks of `qtype` (Q2_K or
/// Q3_K) and `x` a value per weight, with its sums per 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn k_low_dot_avx2(qtype: QType, w: &[u8], x: &QuantRow) -> f32 {
    use std::arch::x86_64::*;
    let q3 = qtype == QType::Q3K;
    let (bb, qs_at) = if q3 { (110, 32) } else { (84, 16) };
    let three = _mm256_set1_epi8(3);
    let ones16 = _mm256_set1_epi16(1);
    let mut acc = 0f32;
    for (i, b) in w.chunks_exact(bb).enumerate() {
        let (mut sc, mut m) = ([0i32; 16], [0i32; 16]);
        let (d, dmin) = if q3 {
            sc = q3k_scales(&b[96..108]);
            (f16_avx(b.as_ptr().add(108)), 0.0)
        } else {
            for (s, &byte) in b[..16].iter().enumerate() {
                sc[s] = (byte & 0x0F) as i32;
                m[s] = (byte >> 4) as i32;
            }
            (f16_avx(b.as_ptr().add(80)), f16_avx(b.as_ptr().add(82)))
        };
        let hmask = _mm256_loadu_si256(b.as_ptr() as *const __m256i);
        let mut lanes = _mm256_setzero_si256();
        for g in 0..8 {
            let (n, j) = (g / 4, g % 4);
            let bytes = _mm256_loadu_si256(b.as_ptr().add(qs_at + 32 * n) as *const __m256i);
            let mut q = _mm256_and_si256(
                _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(2 * j as i32)),
                three,
            );
            if q3 {
                let bit = _mm256_set1_epi8((1u8 << g) as i8);
                let clear = _mm256_cmpeq_epi8(_mm256_and_si256(hmask, bit), _mm256_setzero_si256());
                q = _mm256_add_epi8(q, _mm256_and_si256(clear, _mm256_set1_epi8(-4)));
            }
            let xv = _mm256_loadu_si256(x.values.as_ptr().add(256 * i + 32 * g) as *const __m256i);
            let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(q, q), _mm256_sign_epi8(xv, q));
            let part = _mm256_madd_epi16(pairs, ones16);
            let (s0, s1) = (sc[2 * g], sc[2 * g + 1]);
            let scales = _mm256_setr_epi32(s0, s0, s0, s0, s1, s1, s1, s1);
            lanes = _mm256_add_epi32(lanes, _mm256_mullo_epi32(part, scales));
        }
        let h = _mm_add_epi32(
            _mm256_castsi256_si128(lanes),
            _mm256_extracti128_si256(lanes, 1),
        );
        let h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0b01_00_11_10));
        let sum = _mm_cvtsi128_si32(_mm_add_epi32(h, _mm_shuffle_epi32(h, 0b10_11_00_01)));
        let msum: i32 = (0..16)
            .filter(|&s| m[s] != 0)
            .map(|s| m[s] * x.sums16[i * 16 + s] as i32)
            .sum();
        acc += x.scales[i] * (d * sum as f32 - dmin * msum as f32);
    }
    acc
}

/// The f16 at `at`, widened by F16C.
///
/// # Safety
/// F16C is available; two bytes are readable at `at`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
#[inline]
unsafe fn f16_avx(at: *const u8) -> f32 {
    use std::arch::x86_64::*;
    let bits = (at as *const u16).read_unaligned() as i32;
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits)))
}

/// Activation rows per 32 values or per 256, as `qtype`'s products want.
pub(crate) fn activation_group(qtype: QType) -> usize {
    if qtype.block_elems() == 32 {
        32
    } else {
        256
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantize_row;

    /// Random but valid blocks: f16 scales kept small and finite.
    fn random_row(qtype: QType, blocks: usize, seed: u64) -> Vec<u8> {
        let mut bytes = crate::test_bytes(blocks * qtype.block_bytes(), seed);
        let scale = |b: &mut [u8], at: usize, v: f32| {
            b[at..at + 2].copy_from_slice(&half::f16::from_f32(v).to_le_bytes())
        };
        for b in bytes.chunks_exact_mut(qtype.block_bytes()) {
            let v = 0.01 + (b[5] as f32) / 4096.0;
            match qtype {
                QType::Q4_1 | QType::Q5_1 => {
                    scale(b, 0, v);
                    scale(b, 2, -v * 4.0);
                }
                QType::Q4_0 | QType::Q5_0 | QType::IQ4NL | QType::IQ4XS => scale(b, 0, v),
                QType::Q2K => {
                    scale(b, 80, v);
                    scale(b, 82, v / 2.0);
                }
                QType::Q3K => scale(b, 108, v),
                _ => unreachable!(),
            }
        }
        bytes
    }

    const TYPES: [QType; 8] = [
        QType::Q4_0,
        QType::Q4_1,
        QType::Q5_0,
        QType::Q5_1,
        QType::Q2K,
        QType::Q3K,
        QType::IQ4NL,
        QType::IQ4XS,
    ];

    #[test]
    fn products_match_the_dequantized_weights() {
        for qtype in TYPES {
            let blocks = 512 / qtype.block_elems();
            let w = random_row(qtype, blocks, 7 + qtype.ggml_id() as u64);
            let mut wf = vec![0f32; 512];
            dequantize_row(qtype, &w, &mut wf);
            assert!(wf.iter().all(|v| v.is_finite()), "{}", qtype.name());
            let x = crate::test_values(512, 3);
            let xq = quantize_row(&x, activation_group(qtype));
            // The reference: the dequantized weights times the activations
            // as the kernels see them (after their own quantization).
            let g = activation_group(qtype);
            let want: f64 = (0..512)
                .map(|i| wf[i] as f64 * xq.values[i] as f64 * xq.scales[i / g] as f64)
                .sum();
            let got = dot(qtype, &w, &xq) as f64;
            let norm: f64 = wf.iter().map(|v| v.abs() as f64).sum::<f64>() / 512.0;
            assert!(
                (got - want).abs() < 1e-4 * norm * 512.0,
                "{}: {got} vs {want}",
                qtype.name()
            );
        }
    }

    #[test]
    fn k_low_vector_sums_give_the_portable_bits() {
        for qtype in [QType::Q2K, QType::Q3K, QType::IQ4XS] {
            let w = random_row(qtype, 6, 31 + qtype.ggml_id() as u64);
            let x = quantize_row(&crate::test_values(6 * 256, 13), 256);
            let portable = big_dot(qtype, &w, &x);
            assert_eq!(
                dot(qtype, &w, &x).to_bits(),
                portable.to_bits(),
                "{}",
                qtype.name()
            );
        }
    }

    #[test]
    fn q3k_scales_unpack_as_six_bits() {
        // Scale i = low nibble (byte i or i-8's high nibble) | two high bits
        // from byte 8 + i % 4 at bit 2·(i / 4).
        let mut s = [0u8; 12];
        s[0] = 0x21; // scale 0 low = 1, scale 8 low = 2
        s[8] = 0b0000_0011; // scale 0 high = 3
        s[9] = 0b1100_0000; // scale 13 high = 3
        let sc = q3k_scales(&s);
        assert_eq!(sc[0], (1 | (3 << 4)) - 32);
        assert_eq!(sc[8], 2 - 32);
        assert_eq!(sc[13], (3 << 4) - 32);
        assert_eq!(sc[1], -32);
    }
}
