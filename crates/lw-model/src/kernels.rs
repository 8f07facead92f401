//! Hand-written dot products for the weight types that carry most
//! quantized models: Q8_0, Q4_K and Q6_K, each compiled for AVX2, AVX-VNNI
//! and AVX-512 VNNI ([`Isa`]; the integer steps that differ are `Ints`'s,
//! and the 16-bit bounds the comments give are AVX2's). Decoding keeps the
//! eight rows of a group ([`crate::repack`]) in the lanes of one vector, so
//! every activation load serves eight rows and the block scales are widened
//! in registers (F16C); prefill has GEMM kernels over tiles of eight
//! activation rows.
//!
//! Block layouts (ggml's):
//! - Q8_0, 32 weights in 34 bytes: scale `d` (f16), then 32 × i8.
//! - Q4_K, 256 weights in 144 bytes: `d` (f16), `dmin` (f16), 12 bytes of
//!   6-bit scales and mins for eight sub-blocks of 32, then 128 bytes of
//!   4-bit values; bytes `32c..32c + 32` hold sub-block `2c` in their low
//!   nibbles and `2c + 1` in their high ones. A weight is `d·sc·q − dmin·m`.
//!
//! Activations are quantized to i8 with one f32 scale per 32 values (Q8_0
//! weights) or per 256 values with sums per 16 (K-quant weights: the sums
//! carry Q4_K's `dmin·m` term and Q6_K's offset).

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
    if available() {
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

/// Whether this CPU runs the kernels here.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The instruction sets the products are written for. Every kernel exists
/// for each, with the same steps, so a product has the same bits under
/// either; only the speed differs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Isa {
    /// AVX2 with FMA and F16C: byte products summed in 16-bit lanes
    /// (`vpmaddubsw`), widened by a multiply (`vpmaddwd`).
    Avx2,
    /// AVX2's kernels with the VEX-encoded VNNI dot products (AVX-VNNI:
    /// Intel's Alder Lake and later without AVX-512, AMD's Zen 5): byte and
    /// 16-bit products summed straight into 32-bit lanes (`vpdpbusd`,
    /// `vpdpwssd`), one instruction where AVX2 takes two or three.
    AvxVnni,
    /// The same dot products in their AVX-512 VNNI encoding on 256-bit
    /// registers (AVX-512 CPUs with VNNI: AMD's Zen 4, Intel's Ice Lake and
    /// later server parts).
    Avx512Vnni,
}

impl Isa {
    /// The name `LONGWRITER_KERNELS` takes and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
        }
    }

    /// Every set, slowest first.
    pub const ALL: [Isa; 3] = [Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni];

    /// Whether this CPU runs the set.
    pub fn runs_here(self) -> bool {
        if !available() {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            use std::arch::is_x86_feature_detected as has;
            match self {
                Isa::Avx2 => true,
                Isa::AvxVnni => has!("avxvnni"),
                Isa::Avx512Vnni => has!("avx512f") && has!("avx512vl") && has!("avx512vnni"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The best set this CPU runs (`None`: none, and the products fall back
    /// to candle's), made once per process. `LONGWRITER_KERNELS` names a
    /// set to stop at (`avx2` holds a VNNI machine to AVX2, to compare the
    /// two); a name that is not a set is reported on stderr and ignored.
    pub fn detect() -> Option<Isa> {
        static CHOSEN: std::sync::OnceLock<Option<Isa>> = std::sync::OnceLock::new();
        *CHOSEN.get_or_init(|| {
            let cap = std::env::var("LONGWRITER_KERNELS").ok();
            let named = cap.as_deref().and_then(Isa::parse);
            if let (Some(name), None) = (&cap, named) {
                let sets: Vec<&str> = Isa::ALL.iter().map(|i| i.name()).collect();
                eprintln!(
                    "warning: LONGWRITER_KERNELS={name} is not a kernel set ({}); ignored",
                    sets.join(", ")
                );
            }
            Isa::best(named)
        })
    }

    /// The set `name` names.
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The best set this CPU runs, at most `cap`.
    fn best(cap: Option<Isa>) -> Option<Isa> {
        let cap = cap.unwrap_or(Isa::Avx512Vnni);
        Isa::ALL.into_iter().rfind(|&i| i <= cap && i.runs_here())
    }
}

/// The integer steps of the kernels, per instruction set. AVX2 sums a run
/// of byte products in 16-bit lanes and widens the run with its multiply by
/// the scales; VNNI sums the bytes' products straight into 32-bit lanes and
/// multiplies those. Within the bounds the kernels keep (no 16-bit sum
/// saturates), both are the exact integer sums.
#[cfg(target_arch = "x86_64")]
trait Ints {
    /// Steps of four Q6_K weights that one run sums before its scale: two
    /// where runs are 16-bit (at most 4 · 63 · 127 = 32,004), four (all
    /// sixteen weights of a scale) where they are 32-bit.
    const Q6K_STEPS: usize;
    /// `run` plus the products of unsigned bytes `u` and signed bytes `s`
    /// (a run starts at zero).
    unsafe fn dot(run: __m256i, u: __m256i, s: __m256i) -> __m256i;
    /// Scales for [`Ints::scaled`], from a 16-bit scale repeated in both
    /// halves of each 32-bit lane.
    unsafe fn scales(pairs: __m256i) -> __m256i;
    /// One scale for [`Ints::scaled`], in every lane.
    unsafe fn scale(s: i16) -> __m256i;
    /// `isum` plus a finished run times `scales`, per 32-bit lane.
    unsafe fn scaled(isum: __m256i, run: __m256i, scales: __m256i) -> __m256i;
    /// `isum` plus the sums of pairs of 16-bit products.
    unsafe fn madd(isum: __m256i, a: __m256i, b: __m256i) -> __m256i;
    /// `isum` plus the sums of four products of unsigned bytes `u` and
    /// signed bytes `s` (at most 2 · 128 · 127 per pair).
    unsafe fn dot4(isum: __m256i, u: __m256i, s: __m256i) -> __m256i;
}

/// [`Ints`] in AVX2.
#[cfg(target_arch = "x86_64")]
struct Avx2;

#[cfg(target_arch = "x86_64")]
impl Ints for Avx2 {
    const Q6K_STEPS: usize = 2;
    #[inline(always)]
    unsafe fn dot(run: __m256i, u: __m256i, s: __m256i) -> __m256i {
        _mm256_add_epi16(run, _mm256_maddubs_epi16(u, s))
    }
    #[inline(always)]
    unsafe fn scales(pairs: __m256i) -> __m256i {
        pairs
    }
    #[inline(always)]
    unsafe fn scale(s: i16) -> __m256i {
        _mm256_set1_epi16(s)
    }
    #[inline(always)]
    unsafe fn scaled(isum: __m256i, run: __m256i, scales: __m256i) -> __m256i {
        _mm256_add_epi32(isum, _mm256_madd_epi16(run, scales))
    }
    #[inline(always)]
    unsafe fn madd(isum: __m256i, a: __m256i, b: __m256i) -> __m256i {
        _mm256_add_epi32(isum, _mm256_madd_epi16(a, b))
    }
    #[inline(always)]
    unsafe fn dot4(isum: __m256i, u: __m256i, s: __m256i) -> __m256i {
        let pairs = _mm256_maddubs_epi16(u, s);
        _mm256_add_epi32(isum, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }
}

/// [`Ints`] for a VNNI encoding: byte dot products `$dpbusd`, runs are
/// 32-bit, and `madd` as given.
macro_rules! vnni_ints {
    ($(#[$doc:meta])* $set:ident, $dpbusd:ident,
        madd($isum:ident, $a:ident, $b:ident) = $madd:expr) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        struct $set;

        #[cfg(target_arch = "x86_64")]
        impl Ints for $set {
            const Q6K_STEPS: usize = 4;
            #[inline(always)]
            unsafe fn dot(run: __m256i, u: __m256i, s: __m256i) -> __m256i {
                $dpbusd(run, u, s)
            }
            #[inline(always)]
            unsafe fn scales(pairs: __m256i) -> __m256i {
                _mm256_srai_epi32(pairs, 16)
            }
            #[inline(always)]
            unsafe fn scale(s: i16) -> __m256i {
                _mm256_set1_epi32(s as i32)
            }
            #[inline(always)]
            unsafe fn scaled(isum: __m256i, run: __m256i, scales: __m256i) -> __m256i {
                _mm256_add_epi32(isum, _mm256_mullo_epi32(run, scales))
            }
            #[inline(always)]
            unsafe fn madd($isum: __m256i, $a: __m256i, $b: __m256i) -> __m256i {
                $madd
            }
            #[inline(always)]
            unsafe fn dot4(isum: __m256i, u: __m256i, s: __m256i) -> __m256i {
                $dpbusd(isum, u, s)
            }
        }
    };
}

vnni_ints!(
    /// [`Ints`] in AVX-VNNI. Its 16-bit dot product stays AVX2's pair:
    /// LLVM splits the VEX `vpdpwssd` back into those two wherever the
    /// accumulator chain is long (its tuning for CPUs without a fast
    /// `vpdpwssd`), leaving only the zeroing it added.
    AvxVnni,
    _mm256_dpbusd_avx_epi32,
    madd(isum, a, b) = _mm256_add_epi32(isum, _mm256_madd_epi16(a, b))
);
vnni_ints!(
    /// [`Ints`] in AVX-512 VNNI (256-bit registers).
    Vnni,
    _mm256_dpbusd_epi32,
    madd(isum, a, b) = _mm256_dpwssd_epi32(isum, a, b)
);

/// Defines kernel `$name`, taking the [`Isa`] first: the body `$body`
/// (generic over [`Ints`], always inlined) compiled once for each set, and
/// the one for `isa` called.
macro_rules! for_each_isa {
    ($(#[$doc:meta])* pub unsafe fn $name:ident<$(const $c:ident: usize),*>
        ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident;) => {
        $(#[$doc])*
        #[cfg(target_arch = "x86_64")]
        #[inline]
        pub unsafe fn $name<$(const $c: usize),*>(isa: Isa, $($arg: $ty),*) $(-> $ret)? {
            #[target_feature(enable = "avx2,fma,f16c")]
            unsafe fn avx2<$(const $c: usize),*>($($arg: $ty),*) $(-> $ret)? {
                $body::<Avx2, $($c),*>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
            unsafe fn avx_vnni<$(const $c: usize),*>($($arg: $ty),*) $(-> $ret)? {
                $body::<AvxVnni, $($c),*>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
            unsafe fn vnni<$(const $c: usize),*>($($arg: $ty),*) $(-> $ret)? {
                $body::<Vnni, $($c),*>($($arg),*)
            }
            match isa {
                Isa::Avx2 => avx2::<$($c),*>($($arg),*),
                Isa::AvxVnni => avx_vnni::<$($c),*>($($arg),*),
                Isa::Avx512Vnni => vnni::<$($c),*>($($arg),*),
            }
        }
    };
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
    ) -> [[f32; 8]; R] = q8_0x8_tile_in;
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
        crate::portable::IQ4_LEVELS.as_ptr() as *const __m128i
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
    ) -> [[f32; 8]; R] = q4k8_tile_in;
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
unsafe fn row_scales(p: *const u8) -> __m256i {
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
unsafe fn k_block_end<I: Ints, const R: usize>(
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

/// Activation rows for the GEMM kernels, eight per tile, interleaved four bytes
/// at a time: byte `k` of row `i` is at `(k / 4 · 8 + i) · 4 + k % 4`, so one
/// 32-byte load holds four consecutive values of all eight rows.
pub struct ActTile {
    bytes: Vec<i8>,
    /// `[group][row]`: each row's scale per 32 or 256.
    scales: Vec<f32>,
    /// `[block][sixteenth][row]`: each row's sums per 16 (rows quantized
    /// per 256).
    sums16: Vec<i32>,
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

/// An 8 × 8 matrix of 32-bit elements, one row per vector, transposed.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose8x32(v: [__m256i; 8]) -> [__m256i; 8] {
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
unsafe fn scaled_run<I: Ints, const T: usize>(
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
    ) -> [[f32; 8]; R] = q6k8_tile_in;
}

/// The body of [`q6k8_tile`].
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn q6k8_tile_in<I: Ints, const R: usize>(
    group: *const u8,
    xs: [&QuantRow; R],
) -> [[f32; 8]; R] {
    use crate::repack::q6k::{D, GROUP_BLOCK, QS, SCALES};
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
        let d = _mm256_cvtph_ps(_mm_loadu_si128(rec.add(D) as *const __m128i));
        for i in 0..R {
            let s = sums[i].add(b * 16);
            let mut offset = _mm256_setzero_si256();
            for p in 0..8 {
                let pair = _mm256_set1_epi32(
                    (*s.add(2 * p) as u16 as i32) | ((*s.add(2 * p + 1) as i32) << 16),
                );
                let sc = _mm256_cvtepi8_epi16(_mm_loadu_si128(
                    rec.add(SCALES + 16 * p) as *const __m128i
                ));
                offset = I::madd(offset, sc, pair);
            }
            let tot = _mm256_sub_epi32(isum[i], _mm256_slli_epi32(offset, 5));
            let dy = _mm256_set1_ps(*dys[i].add(b));
            acc[i] = _mm256_fmadd_ps(_mm256_mul_ps(d, dy), _mm256_cvtepi32_ps(tot), acc[i]);
        }
    }
    std::array::from_fn(|i| {
        let mut out = [0f32; 8];
        _mm256_storeu_ps(out.as_mut_ptr(), acc[i]);
        out
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Names round-trip, a cap holds, and without one the best set this
    /// CPU runs is chosen.
    #[test]
    fn kernel_sets_are_chosen_by_the_cpu_and_the_cap() {
        for isa in Isa::ALL {
            assert_eq!(Isa::parse(isa.name()), Some(isa));
        }
        assert_eq!(Isa::parse("avx-2"), None);
        let best = Isa::ALL.into_iter().filter(|i| i.runs_here()).max();
        assert_eq!(Isa::best(None), best);
        assert_eq!(best.is_some(), available());
        for cap in Isa::ALL {
            let chosen = Isa::best(Some(cap));
            assert!(chosen.is_none_or(|c| c <= cap && c.runs_here()), "{cap:?}");
            assert_eq!(chosen.is_some(), available(), "{cap:?}");
        }
        if available() {
            assert_eq!(Isa::best(Some(Isa::Avx2)), Some(Isa::Avx2));
        }
    }

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
