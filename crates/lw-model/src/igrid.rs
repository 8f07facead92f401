//! The grid i-quants (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S,
//! IQ1_M) in portable Rust: one row's dequantization, and its product with
//! an activation row quantized to i8 per 256 values ([`QuantRow`]). It owns
//! the formats' layouts and grids (`igrid_tables.rs`, generated); the
//! activations' quantization is [`crate::kernels`]'s.
//!
//! Every type stores 256 weights per block as 32 groups of eight. A group
//! is one entry of a fixed grid (eight levels, or two entries of four for
//! IQ3), signs (IQ2, IQ3), and a sub-block scale `ls`; all seven reduce to
//! a weight `d·(2·ls + 1)·unit·q` with a small signed integer `q` per weight:
//! - IQ2_XXS, IQ2_XS, IQ2_S: `q = ±level`, level in {8, 25, 43}, unit 1/8;
//! - IQ3_XXS: `q = ±level`, level in {4, 12, …, 62}, unit 1/4;
//! - IQ3_S: `q = ±level`, level odd in 1..=15, unit 1;
//! - IQ1_S, IQ1_M: `q = 8·level ± 1`, level in {−1, 0, 1}, unit 1/8 (the
//!   `± 1` is the format's ±1/8 shift of the group).
//!
//! So a product keeps [`crate::portable`]'s design: per block one exact
//! integer sum `Σ (2·ls + 1)·Σ q·x` (at most 31 · 62 · 127 · 256, well
//! inside i32), then one f32 multiply by `d`, the activations' scale and the
//! unit; blocks in order, so a row's result does not depend on batching.
//! Dequantization instead follows the `gguf` Python package's numpy
//! reference operation for operation, so it gives the same bits.
//!
//! Layouts (ggml's `ggml-common.h`), little-endian; group `g` is weights
//! `8g..8g + 8`, sub-block `s` (32 weights) is groups `4s..4s + 4`:
//! - IQ2_XXS, 66 bytes: `d` (f16), then per sub-block two u32: four grid
//!   indices (bytes), and four 7-bit sign indices (bits `7l..7l + 7`) with
//!   `ls` in bits 28..32.
//! - IQ2_XS, 74: `d`, 32 u16 (grid index in bits 0..9, sign index in
//!   9..16), 8 bytes of scales (per sub-block: low nibble for groups 0–1,
//!   high for 2–3).
//! - IQ2_S, 82: `d`, 32 bytes of grid indices' low bits, 32 bytes of signs
//!   (one per group), 8 bytes of high bits (2 per group), scales as IQ2_XS.
//! - IQ3_XXS, 98: `d`, 64 grid indices (two per group), then per sub-block
//!   a u32 of signs and `ls` as IQ2_XXS's.
//! - IQ3_S, 110: `d`, 64 grid indices' low bits, 8 bytes of their ninth
//!   bits, 32 bytes of signs, 4 bytes of scales (a nibble per sub-block).
//! - IQ1_S, 50: `d`, 32 grid indices' low bits, then per sub-block a u16:
//!   3 high bits per group, `ls` in bits 12..15, the shift's sign in bit 15.
//! - IQ1_M, 56: 32 grid indices' low bits, 16 bytes of a nibble per group
//!   (3 high bits, the shift's sign), then four u16 of 3-bit scales per 16
//!   weights whose top nibbles together are `d`'s bits.
//!
//! A sign index selects a byte of [`igrid_tables::KSIGNS`] (seven free
//! signs, the eighth making their count even). Every index is masked to its
//! table's size, so any bytes decode without a panic.

#[path = "igrid_tables.rs"]
mod igrid_tables;

use self::igrid_tables::{
    IQ1S_GRID, IQ2S_GRID, IQ2XS_GRID, IQ2XXS_GRID, IQ3S_GRID, IQ3XXS_GRID, KSIGNS,
};
use crate::kernels::QuantRow;
use crate::qtype::QType;

/// Weights per block, for every type here.
const BLOCK: usize = 256;

fn f16_at(b: &[u8], at: usize) -> f32 {
    half::f16::from_le_bytes([b[at], b[at + 1]]).to_f32()
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One block decoded: the scale `d`, each group's sub-block scale `ls`, and
/// the weights as the small integers `q` of the module's top comment.
struct Block {
    d: f32,
    ls: [u8; 32],
    q: [i8; BLOCK],
}

impl Block {
    /// Group `g` as `levels` (eight, byte `j` is weight `j`'s) with the
    /// weights whose bit is set in `signs` negated.
    fn set_signed(&mut self, g: usize, ls: u8, levels: u64, signs: u8) {
        self.ls[g] = ls;
        for (j, q) in self.q[8 * g..8 * g + 8].iter_mut().enumerate() {
            let level = (levels >> (8 * j)) as u8 as i8;
            *q = if signs >> j & 1 == 1 { -level } else { level };
        }
    }

    /// IQ1 group `g`: `levels` (eight i8 in {−1, 0, 1}) shifted by −1/8 if
    /// `minus` else +1/8, in eighths.
    fn set_shifted(&mut self, g: usize, ls: u8, levels: u64, minus: bool) {
        self.ls[g] = ls;
        let shift = if minus { -1 } else { 1 };
        for (j, q) in self.q[8 * g..8 * g + 8].iter_mut().enumerate() {
            *q = 8 * ((levels >> (8 * j)) as u8 as i8) + shift;
        }
    }
}

/// Two IQ3 grid entries of four levels as one group of eight.
fn iq3_pair(grid: &[u32], first: usize, second: usize) -> u64 {
    grid[first] as u64 | (grid[second] as u64) << 32
}

fn decode(qtype: QType, b: &[u8]) -> Block {
    let mut blk = Block {
        d: 0.0,
        ls: [0; 32],
        q: [0; BLOCK],
    };
    match qtype {
        QType::IQ2XXS => {
            blk.d = f16_at(b, 0);
            for s in 0..8 {
                let at = 2 + 8 * s;
                let aux = u32_at(b, at + 4);
                let ls = (aux >> 28) as u8;
                for l in 0..4 {
                    let signs = KSIGNS[(aux >> (7 * l) & 127) as usize];
                    let levels = IQ2XXS_GRID[b[at + l] as usize];
                    blk.set_signed(4 * s + l, ls, levels, signs);
                }
            }
        }
        QType::IQ2XS => {
            blk.d = f16_at(b, 0);
            for g in 0..32 {
                let qs = u16_at(b, 2 + 2 * g);
                let ls = b[66 + g / 4] >> (4 * (g / 2 % 2)) & 15;
                let signs = KSIGNS[(qs >> 9) as usize];
                blk.set_signed(g, ls, IQ2XS_GRID[(qs & 511) as usize], signs);
            }
        }
        QType::IQ2S => {
            blk.d = f16_at(b, 0);
            for g in 0..32 {
                let high = (b[66 + g / 4] >> (2 * (g % 4)) & 3) as usize;
                let index = b[2 + g] as usize | high << 8;
                let ls = b[74 + g / 4] >> (4 * (g / 2 % 2)) & 15;
                blk.set_signed(g, ls, IQ2S_GRID[index], b[34 + g]);
            }
        }
        QType::IQ3XXS => {
            blk.d = f16_at(b, 0);
            for s in 0..8 {
                let aux = u32_at(b, 66 + 4 * s);
                let ls = (aux >> 28) as u8;
                for l in 0..4 {
                    let g = 4 * s + l;
                    let signs = KSIGNS[(aux >> (7 * l) & 127) as usize];
                    let (i0, i1) = (b[2 + 2 * g] as usize, b[3 + 2 * g] as usize);
                    blk.set_signed(g, ls, iq3_pair(&IQ3XXS_GRID, i0, i1), signs);
                }
            }
        }
        QType::IQ3S => {
            blk.d = f16_at(b, 0);
            let index =
                |i: usize| b[2 + i] as usize | ((b[66 + i / 8] >> (i % 8) & 1) as usize) << 8;
            for g in 0..32 {
                let ls = b[106 + g / 8] >> (4 * (g / 4 % 2)) & 15;
                let levels = iq3_pair(&IQ3S_GRID, index(2 * g), index(2 * g + 1));
                blk.set_signed(g, ls, levels, b[74 + g]);
            }
        }
        QType::IQ1S => {
            blk.d = f16_at(b, 0);
            for s in 0..8 {
                let qh = u16_at(b, 34 + 2 * s);
                let ls = (qh >> 12 & 7) as u8;
                for l in 0..4 {
                    let g = 4 * s + l;
                    let index = b[2 + g] as usize | ((qh >> (3 * l) & 7) as usize) << 8;
                    blk.set_shifted(g, ls, IQ1S_GRID[index], qh & 0x8000 != 0);
                }
            }
        }
        QType::IQ1M => {
            let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
            let bits =
                sc[0] >> 12 | (sc[1] >> 8 & 0x00F0) | (sc[2] >> 4 & 0x0F00) | (sc[3] & 0xF000);
            blk.d = half::f16::from_bits(bits).to_f32();
            for g in 0..32 {
                let nibble = b[32 + g / 2] >> (4 * (g % 2)) & 15;
                let index = b[g] as usize | ((nibble & 7) as usize) << 8;
                // Scales per 16 weights: half `h` of the block's 16.
                let h = g / 2;
                let ls = (sc[h / 4] >> (3 * (h % 4)) & 7) as u8;
                blk.set_shifted(g, ls, IQ1S_GRID[index], nibble & 8 != 0);
            }
        }
        _ => unreachable!("{} is not a grid i-quant", qtype.name()),
    }
    blk
}

/// Row `bytes` of `qtype` as f32 values, computed as the `gguf` package's
/// numpy reference does (the same operations in the same order, so the
/// same bits).
pub(crate) fn dequantize_row(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    for (b, o) in bytes
        .chunks_exact(qtype.block_bytes())
        .zip(out.chunks_exact_mut(BLOCK))
    {
        let blk = decode(qtype, b);
        for (g, (o, q)) in o.chunks_exact_mut(8).zip(blk.q.chunks_exact(8)).enumerate() {
            let ls = blk.ls[g];
            // The group's scale as the reference writes it: `ls` as f32
            // where it adds 0.5, as an integer where it is `2·ls + 1`.
            let dl = match qtype {
                QType::IQ2XXS | QType::IQ2XS | QType::IQ2S => blk.d * (0.5 + ls as f32) * 0.25,
                QType::IQ3XXS => blk.d * (0.5 + ls as f32) * 0.5,
                _ => blk.d * (1 + 2 * ls) as f32,
            };
            for (o, &q) in o.iter_mut().zip(q) {
                *o = match qtype {
                    // `level ± 1/8` exactly, as the reference adds them.
                    QType::IQ1S | QType::IQ1M => dl * (q as f32 * 0.125),
                    _ => dl * q as f32,
                };
            }
        }
    }
}

/// The fixed factor of a weight `d·(2·ls + 1)·unit·q` (module comment).
fn unit(qtype: QType) -> f32 {
    match qtype {
        QType::IQ3XXS => 0.25,
        QType::IQ3S => 1.0,
        _ => 0.125,
    }
}

/// `Σ_i w[i]·x[i]` for one weight row (`w`, whole blocks of `qtype`) and
/// one activation row quantized per 256.
pub(crate) fn dot(qtype: QType, w: &[u8], x: &QuantRow) -> f32 {
    let unit = unit(qtype);
    let mut acc = 0f32;
    let blocks = w
        .chunks_exact(qtype.block_bytes())
        .zip(x.values.chunks_exact(BLOCK))
        .zip(&x.scales);
    for ((b, xs), &dx) in blocks {
        let blk = decode(qtype, b);
        let mut sum = 0i32;
        for (g, (q, xs)) in blk.q.chunks_exact(8).zip(xs.chunks_exact(8)).enumerate() {
            let part: i32 = q.iter().zip(xs).map(|(&q, &v)| q as i32 * v as i32).sum();
            sum += (2 * blk.ls[g] as i32 + 1) * part;
        }
        acc += blk.d * dx * sum as f32 * unit;
    }
    acc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::quantize_row;

    const TYPES: [QType; 7] = [
        QType::IQ2XXS,
        QType::IQ2XS,
        QType::IQ2S,
        QType::IQ3XXS,
        QType::IQ3S,
        QType::IQ1S,
        QType::IQ1M,
    ];

    /// Random but valid blocks: every byte random but the f16 scale, kept
    /// small and finite (IQ1_M's in its scales' top nibbles).
    fn random_row(qtype: QType, blocks: usize, seed: u64) -> Vec<u8> {
        let bb = qtype.block_bytes();
        let mut bytes = crate::test_bytes(blocks * bb, seed);
        for b in bytes.chunks_exact_mut(bb) {
            let d = 0.01 + (b[5] as f32) / 4096.0;
            let bits = half::f16::from_f32(if b[7] & 1 == 0 { d } else { -d }).to_bits();
            if qtype == QType::IQ1M {
                for i in 0..4 {
                    let at = bb - 8 + 2 * i;
                    let u = u16_at(b, at) & 0x0FFF | (bits >> (4 * i) & 15) << 12;
                    b[at..at + 2].copy_from_slice(&u.to_le_bytes());
                }
            } else {
                b[0..2].copy_from_slice(&bits.to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    fn products_match_the_dequantized_weights() {
        for qtype in TYPES {
            let n = 1024;
            let w = random_row(qtype, n / BLOCK, 7 + qtype.ggml_id() as u64);
            let mut wf = vec![0f32; n];
            dequantize_row(qtype, &w, &mut wf);
            assert!(wf.iter().all(|v| v.is_finite()), "{}", qtype.name());
            let xq = quantize_row(&crate::test_values(n, 3), BLOCK);
            // The reference: the dequantized weights times the activations
            // as the kernels see them (after their own quantization).
            let want: f64 = (0..n)
                .map(|i| wf[i] as f64 * xq.values[i] as f64 * xq.scales[i / BLOCK] as f64)
                .sum();
            let got = dot(qtype, &w, &xq) as f64;
            let scale: f64 = (0..n)
                .map(|i| (wf[i] as f64 * xq.values[i] as f64 * xq.scales[i / BLOCK] as f64).abs())
                .sum();
            assert!(
                (got - want).abs() <= 1e-4 * scale,
                "{}: {got} vs {want}",
                qtype.name()
            );
        }
    }

    /// The blocks and the f32 bits of `gguf.quants.dequantize` for them,
    /// from scripts/igrid_reference.py.
    #[test]
    fn dequantization_matches_the_gguf_reference_bit_for_bit() {
        let text = include_str!(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/igrid.json"
        ));
        let fixture: serde_json::Value = serde_json::from_str(text).unwrap();
        let cases = fixture["cases"].as_array().unwrap();
        assert_eq!(cases.len(), TYPES.len());
        for case in cases {
            let name = case["type"].as_str().unwrap();
            let qtype = QType::parse(name).unwrap();
            assert!(TYPES.contains(&qtype), "{name}");
            let hex = case["blocks"].as_str().unwrap();
            let bytes: Vec<u8> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
                .collect();
            let want: Vec<u32> = case["bits"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap() as u32)
                .collect();
            let blocks = bytes.len() / qtype.block_bytes();
            assert_eq!(want.len(), blocks * BLOCK, "{name}");
            let mut got = vec![0f32; want.len()];
            dequantize_row(qtype, &bytes, &mut got);
            for (i, (g, &w)) in got.iter().zip(&want).enumerate() {
                assert_eq!(
                    g.to_bits(),
                    w,
                    "{name} weight {i}: {g} vs {}",
                    f32::from_bits(w)
                );
            }
        }
    }

    #[test]
    fn tables_equal_llama_cpps() {
        // First, middle and last entries of ggml-common.h's tables.
        assert_eq!(KSIGNS[..4], [0, 129, 130, 3]);
        assert_eq!(KSIGNS[127], 255);
        assert_eq!(IQ2XXS_GRID[1], 0x080808080808082b);
        assert_eq!(IQ2XXS_GRID[129], 0x082b2b08082b0808);
        assert_eq!(IQ2XXS_GRID[255], 0x2b2b2b1908081908);
        assert_eq!(IQ2XS_GRID[3], 0x0808080808082b08);
        assert_eq!(IQ2XS_GRID[257], 0x1908080808082b19);
        assert_eq!(IQ2XS_GRID[511], 0x2b2b2b2b2b2b2b2b);
        assert_eq!(IQ2S_GRID[2], 0x0808080808081919);
        assert_eq!(IQ2S_GRID[513], 0x1908081919080819);
        assert_eq!(IQ2S_GRID[1020], 0x2b2b2b2b082b082b);
        assert_eq!(IQ2S_GRID[1023], 0x2b2b2b2b2b2b2b2b);
        assert_eq!(IQ3XXS_GRID[5], 0x04040c3e);
        assert_eq!(IQ3XXS_GRID[129], 0x141c3e24);
        assert_eq!(IQ3XXS_GRID[255], 0x3e341c04);
        assert_eq!(IQ3S_GRID[3], 0x0101010b);
        assert_eq!(IQ3S_GRID[257], 0x05090705);
        assert_eq!(IQ3S_GRID[511], 0x0f0f0101);
        assert_eq!(IQ1S_GRID[1], 0xffffffffffffff01);
        assert_eq!(IQ1S_GRID[1025], 0x000000000000ffff);
        assert_eq!(IQ1S_GRID[2047], 0x0101010101010101);
        // Each sign byte: the index's seven signs, the eighth making an
        // even count.
        for (i, &s) in KSIGNS.iter().enumerate() {
            assert_eq!(s & 127, i as u8);
            assert_eq!(s.count_ones() % 2, 0);
        }
    }

    #[test]
    fn any_bytes_decode_without_a_panic() {
        for qtype in TYPES {
            let bb = qtype.block_bytes();
            for fill in [0x00u8, 0xFF, 0x7F, 0x80] {
                let mut w = vec![fill; 2 * bb + 3];
                w.extend(random_row(qtype, 1, fill as u64 + 1));
                let mut out = vec![0f32; 3 * BLOCK];
                dequantize_row(qtype, &w, &mut out);
                // A row shorter than the weights, and the reverse.
                dequantize_row(qtype, &w, &mut out[..BLOCK + 5]);
                let xq = quantize_row(&crate::test_values(2 * BLOCK, 5), BLOCK);
                let _ = dot(qtype, &w, &xq);
                let _ = dot(qtype, &w[..bb], &xq);
            }
        }
    }
}
