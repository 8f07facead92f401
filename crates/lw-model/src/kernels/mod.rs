//! Hand-written dot products for the weight types that carry most
//! quantized models: Q8_0, Q4_K and Q6_K, each compiled for AVX2, AVX-VNNI,
//! AVX-512 VNNI and AVX-512 on 512-bit registers ([`Isa`]; the integer
//! steps that differ are `Ints`'s,
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
//!
//! Each type's file also has its row product in plain Rust ([`q8_0_dot`],
//! [`q4k_dot`], [`q6k_dot`], compiled everywhere): the definition the
//! vector kernels keep bit for bit (the same exact integer sums, then the
//! same f32 steps in the same order), and the product on CPUs without them.

/// Defines kernel `$name`, taking the [`Isa`] first: the body `$body`
/// (generic over [`Ints`], always inlined) compiled once for each set, and
/// the one for `isa` called. A kernel with a 512-bit body names it after
/// `wide` (with a condition on the constants after `if`, where it pays only
/// for some); [`Isa::Avx512Zmm`] runs that one, else the AVX-512 VNNI build
/// itself (compiling the 256-bit body again with AVX-512 BW enabled gives
/// LLVM room to split `vpdpwssd` back into two instructions: the Q8_0 GEMM
/// then executed 83% more instructions).
macro_rules! for_each_isa {
    (@zmm $body:ident, [$($c:ident),*], [$($arg:ident),*]) => {
        vnni::<$($c),*>($($arg),*)
    };
    (@zmm $body:ident $wide:ident, [$($c:ident),*], [$($arg:ident),*]) => {
        $wide::<$($c),*>($($arg),*)
    };
    (@zmm $body:ident $wide:ident ($cond:expr), [$($c:ident),*], [$($arg:ident),*]) => {
        if $cond {
            $wide::<$($c),*>($($arg),*)
        } else {
            vnni::<$($c),*>($($arg),*)
        }
    };
    ($(#[$doc:meta])* pub unsafe fn $name:ident<$(const $c:ident: usize),*>
        ($($arg:ident: $ty:ty),*) $(-> $ret:ty)? = $body:ident
        $(, wide $wide:ident $(if $cond:expr)?)?;) => {
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
            #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
            unsafe fn zmm<$(const $c: usize),*>($($arg: $ty),*) $(-> $ret)? {
                for_each_isa!(@zmm $body $($wide $(($cond))?)?, [$($c),*], [$($arg),*])
            }
            match isa {
                Isa::Avx2 => avx2::<$($c),*>($($arg),*),
                Isa::AvxVnni => avx_vnni::<$($c),*>($($arg),*),
                Isa::Avx512Vnni => vnni::<$($c),*>($($arg),*),
                Isa::Avx512Zmm => zmm::<$($c),*>($($arg),*),
            }
        }
    };
}

mod isa;
mod q4k;
mod q5k;
mod q6k;
mod q8_0;
mod quantize;
mod small;
mod tile;

pub use isa::{available, wide_pays, Isa};
pub(crate) use q4k::dot as q4k_dot;
#[cfg(target_arch = "x86_64")]
pub use q4k::{q4k8_tile, q4k_gemm, Q4kRow};
#[cfg(target_arch = "x86_64")]
pub use q5k::q5k8_tile;
pub(crate) use q6k::dot as q6k_dot;
#[cfg(target_arch = "x86_64")]
pub use q6k::{q6k8_tile, q6k_gemm, Q6kRow};
pub(crate) use q8_0::dot as q8_0_dot;
#[cfg(target_arch = "x86_64")]
pub use q8_0::{q8_0_gemm, q8_0_gemm_blocks, q8_0x8_tile, GemmAcc, WideRows, WideTile};
pub use quantize::{quantize_row, quantize_row_into, QuantRow};
#[cfg(target_arch = "x86_64")]
pub use small::small8_tile;
#[cfg(target_arch = "x86_64")]
pub use tile::ActTile;
