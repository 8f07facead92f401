//! The instruction sets the kernels are compiled for, and the integer
//! steps that differ between them.

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

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
    /// AVX-512 VNNI on 512-bit registers where a kernel has a wide body (the
    /// decode groups of Q8_0 and Q4_K: two steps of a group's eight rows in
    /// one register, their halves added exactly at the end), the 256-bit
    /// bodies elsewhere. Chosen by itself only where a 512-bit operation
    /// costs what a 256-bit one does ([`wide_pays`]: Intel's cores, AMD's
    /// Zen 5); Zen 4 splits each into two and stays on
    /// [`Isa::Avx512Vnni`].
    Avx512Zmm,
}

impl Isa {
    /// The name `LONGWRITER_KERNELS` takes and benchmarks print.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx2 => "avx2",
            Isa::AvxVnni => "avx-vnni",
            Isa::Avx512Vnni => "avx512-vnni",
            Isa::Avx512Zmm => "avx512-zmm",
        }
    }

    /// Every set, slowest first.
    pub const ALL: [Isa; 4] = [Isa::Avx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Avx512Zmm];

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
                Isa::Avx512Zmm => {
                    has!("avx512f") && has!("avx512vl") && has!("avx512bw") && has!("avx512vnni")
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The best set this CPU runs (`None`: none, and the products fall back
    /// to the plain-Rust definitions the kernels keep, with the same bits),
    /// made once per process: the 512-bit set only where it pays
    /// ([`wide_pays`]). `LONGWRITER_KERNELS` names a set to stop at (`avx2`
    /// holds a VNNI machine to AVX2, to compare the two; `avx512-zmm` takes
    /// the 512-bit set wherever it runs); a name that is not a set is
    /// reported on stderr and ignored.
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
            Isa::best(named.or(if wide_pays() {
                None
            } else {
                Some(Isa::Avx512Vnni)
            }))
        })
    }

    /// The set `name` names.
    pub fn parse(name: &str) -> Option<Isa> {
        Isa::ALL.into_iter().find(|i| i.name() == name)
    }

    /// The best set this CPU runs, at most `cap`.
    fn best(cap: Option<Isa>) -> Option<Isa> {
        let cap = cap.unwrap_or(Isa::Avx512Zmm);
        Isa::ALL.into_iter().rfind(|&i| i <= cap && i.runs_here())
    }
}

/// Whether this CPU runs a 512-bit vector operation at the cost of a
/// 256-bit one: Intel's cores with AVX-512 (Skylake-SP and later, whose
/// server parts have two 512-bit multiply-add ports) and AMD's from Zen 5
/// (family 1Ah) on. Zen 4 (family 19h) runs each 512-bit operation as two
/// 256-bit halves, so its wide kernels only add the cost of combining the
/// halves.
pub fn wide_pays() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: CPUID leaves 0 and 1 exist on every x86-64 CPU (the
        // intrinsic is safe in newer Rust, unsafe in older).
        #[allow(unused_unsafe)]
        let (vendor, signature) = unsafe { (__cpuid(0), __cpuid(1).eax) };
        let name: Vec<u8> = [vendor.ebx, vendor.edx, vendor.ecx]
            .iter()
            .flat_map(|r| r.to_le_bytes())
            .collect();
        // The family as CPUID reports it: base, plus the extended family
        // where the base is 0Fh.
        let base = (signature >> 8) & 0xF;
        let family = if base == 0xF {
            base + ((signature >> 20) & 0xFF)
        } else {
            base
        };
        match &name[..] {
            b"GenuineIntel" => true,
            b"AuthenticAMD" | b"HygonGenuine" => family >= 0x1A,
            _ => false,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// The two 256-bit halves of `v` added lane by lane: a wide kernel's partial
/// sums of the same eight rows brought together (exact in integers).
///
/// # Safety
/// The caller is compiled with AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn fold_halves(v: __m512i) -> __m256i {
    _mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64::<1>(v))
}

/// `v` in both 256-bit halves (each row's value in lanes r and 8 + r).
///
/// # Safety
/// The caller is compiled with AVX-512 F.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(super) unsafe fn both_halves(v: __m256i) -> __m512i {
    _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v), v)
}

/// The integer steps of the kernels, per instruction set. AVX2 sums a run
/// of byte products in 16-bit lanes and widens the run with its multiply by
/// the scales; VNNI sums the bytes' products straight into 32-bit lanes and
/// multiplies those. Within the bounds the kernels keep (no 16-bit sum
/// saturates), both are the exact integer sums.
#[cfg(target_arch = "x86_64")]
pub(super) trait Ints {
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
pub(super) struct Avx2;

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
        pub(super) struct $set;

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
        // Without a cap, the 512-bit set only where it pays.
        if std::env::var_os("LONGWRITER_KERNELS").is_none() {
            let expected = if wide_pays() {
                best
            } else {
                Isa::best(Some(Isa::Avx512Vnni))
            };
            assert_eq!(Isa::detect(), expected);
        }
        for cap in Isa::ALL {
            let chosen = Isa::best(Some(cap));
            assert!(chosen.is_none_or(|c| c <= cap && c.runs_here()), "{cap:?}");
            assert_eq!(chosen.is_some(), available(), "{cap:?}");
        }
        if available() {
            assert_eq!(Isa::best(Some(Isa::Avx2)), Some(Isa::Avx2));
        }
    }
}
