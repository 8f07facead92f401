//! Pieces the K-quant GEMM kernels share: eight activation rows
//! interleaved in one tile, and the inner step over a run of weights.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

use super::isa::Ints;
use super::quantize::QuantRow;

/// Activation rows for the GEMM kernels, eight per tile, interleaved four bytes
/// at a time: byte `k` of row `i` is at `(k / 4 · 8 + i) · 4 + k % 4`, so one
/// 32-byte load holds four consecutive values of all eight rows.
pub struct ActTile {
    pub(super) bytes: Vec<i8>,
    /// `[group][row]`: each row's scale per 32 or 256.
    pub(super) scales: Vec<f32>,
    /// `[block][sixteenth][row]`: each row's sums per 16 (rows quantized
    /// per 256).
    pub(super) sums16: Vec<i32>,
}

impl ActTile {
    /// Eight rows quantized alike (per 32 or per 256).
    pub fn new(rows: &[QuantRow]) -> ActTile {
        assert_eq!(rows.len(), 8, "a tile holds eight rows");
        let k = rows[0].values.len();
        let groups = rows[0].scales.len();
        let sixteenths = rows[0].sums16.len();
        let mut bytes = vec![0i8; 8 * k];
        for (i, row) in rows.iter().enumerate() {
            for (g, four) in row.values.chunks_exact(4).enumerate() {
                let at = (g * 8 + i) * 4;
                bytes[at..at + 4].copy_from_slice(four);
            }
        }
        let scales = (0..groups * 8).map(|x| rows[x % 8].scales[x / 8]).collect();
        let sums16 = (0..sixteenths * 8)
            .map(|x| rows[x % 8].sums16[x / 8] as i32)
            .collect();
        ActTile {
            bytes,
            scales,
            sums16,
        }
    }
}

/// An 8 × 8 matrix of 32-bit elements, one row per vector, transposed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn transpose8x32(v: [__m256i; 8]) -> [__m256i; 8] {
    let t: [__m256i; 8] = std::array::from_fn(|i| {
        let (a, b) = (v[i / 2 * 2], v[i / 2 * 2 + 1]);
        if i % 2 == 0 {
            _mm256_unpacklo_epi32(a, b)
        } else {
            _mm256_unpackhi_epi32(a, b)
        }
    });
    // u[k] for k = 0..4: elements k and k + 4 of rows 0..4; u[4 + k]: of rows 4..8.
    let u: [__m256i; 8] = std::array::from_fn(|i| {
        let base = if i < 4 { 0 } else { 4 };
        let k = i % 4;
        let (a, b) = (t[base + k / 2], t[base + 2 + k / 2]);
        if k % 2 == 0 {
            _mm256_unpacklo_epi64(a, b)
        } else {
            _mm256_unpackhi_epi64(a, b)
        }
    });
    std::array::from_fn(|j| {
        let k = j % 4;
        if j < 4 {
            _mm256_permute2x128_si256(u[k], u[4 + k], 0x20)
        } else {
            _mm256_permute2x128_si256(u[k], u[4 + k], 0x31)
        }
    })
}

/// The GEMM kernels' inner step: weights `k0..k0 + 4·groups` of two
/// unpacked rows (each four bytes broadcast to all lanes) times the tiles'
/// interleaved activations, summed in i16 lanes (one activation row per
/// lane pair), then multiplied by each row's scale for the run and added to
/// `isum` in i32.
///
/// # Safety
/// As for [`q4k_gemm`]; the run lies within the rows and tiles, and its
/// sums fit an i16 lane.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn scaled_run<I: Ints, const T: usize>(
    q: [*const u8; 2],
    a: [*const i8; T],
    k0: usize,
    groups: usize,
    scales: [i16; 2],
    isum: &mut [[__m256i; T]; 2],
) {
    let mut acc16 = [[_mm256_setzero_si256(); T]; 2];
    for g in 0..groups {
        let k = k0 + 4 * g;
        let av: [__m256i; T] =
            std::array::from_fn(|t| _mm256_loadu_si256(a[t].add(k * 8) as *const __m256i));
        for r in 0..2 {
            let wv = _mm256_set1_epi32((q[r].add(k) as *const i32).read_unaligned());
            for t in 0..T {
                acc16[r][t] = I::dot(acc16[r][t], wv, av[t]);
            }
        }
    }
    for r in 0..2 {
        let s = I::scale(scales[r]);
        for t in 0..T {
            isum[r][t] = I::scaled(isum[r][t], acc16[r][t], s);
        }
    }
}
