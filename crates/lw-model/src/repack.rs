//! Quantized matrices (Q4_K, Q5_K, Q6_K, Q8_0 and the 32-weight types Q4_0, Q4_1,
//! Q5_0, Q5_1, IQ4_NL) rearranged at load time so that decoding can keep
//! eight weight rows in the lanes of one vector.
//!
//! In a file, a row is a run of blocks of 256 weights (see
//! [`crate::kernels`]). A product that walks rows one by one has to scale
//! every sub-block of every row with its own multiply. Here eight consecutive
//! rows form a group, and block `b` of the eight rows is stored together as
//! one record, values interleaved four bytes at a time: four bytes of row 0,
//! then of row 1, …, row 7. So one 32-byte load holds the same four byte
//! positions of all eight rows, and a sub-block's products for the eight rows
//! are summed in 16-bit lanes before one multiply by their eight scales (see
//! [`crate::kernels::q4k8_tile`] and [`crate::kernels::q6k8_tile`]).
//!
//! Q4_K ([`q4k`], 1184 bytes against the file's 8 × 144 = 1152: the 6-bit
//! scales and mins take a byte each):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `dmin` of rows 0..8 (f16) |
//! | 32..96 | scales, `[sub-block][row]` |
//! | 96..160 | mins, `[sub-block pair][row][2]` |
//! | 160..1184 | the 128 value bytes of each row, interleaved |
//!
//! A value load's low nibbles are four weights of sub-block `2c`, its high
//! nibbles four of sub-block `2c + 1`.
//!
//! Q5_K ([`q5k`], 1440 bytes against the file's 8 × 176 = 1408): Q4_K's
//! layout with the 32 bytes of fifth bits of each row before the values,
//! interleaved four bytes at a time as they are (load `u` holds bytes
//! `4u..4u + 4` of every row: bit `2c` of byte `l` is weight `64c + l`'s,
//! bit `2c + 1` weight `64c + 32 + l`'s).
//!
//! Q6_K ([`q6k`], 1680 bytes, as in the file):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..144 | the sixteen i8 scales, `[pair][row][2]` |
//! | 144..1680 | per half `h` and step `g` (0..8), three loads of 32 bytes, `a`, `b` and `c`, each four bytes of each row |
//!
//! The 6-bit values are re-encoded so that three of every four take one
//! mask to unpack. A half's weight `l + 32k` (`l` < 32, `k` < 4) is its
//! quarter `k`'s value `q_k`; for `l = 4g + i`, byte `i` of a row's four in
//! `a` holds `q_0` in its low six bits and bits 0–1 of `q_3` in its top
//! two, `b` holds `q_1` and bits 2–3 of `q_3`, `c` holds `q_2` and bits
//! 4–5 of `q_3` (see `q6k_encode`). The file keeps the low nibbles of
//! `q_0` and `q_2` in `ql[64h + l]`, of `q_1` and `q_3` in
//! `ql[64h + 32 + l]`, and the four top pairs in `qh[32h + l]`.
//!
//! Q8_0 ([`q8_0`], 272 bytes, as in the file; see
//! [`crate::kernels::q8_0x8_tile`]):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..272 | the 32 value bytes of each row, interleaved |
//!
//! The 32-weight types ([`small`], as many bytes as in the file):
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `m` of rows 0..8 (f16; Q4_1 and Q5_1 only) |
//! | next 32 | the fifth bits, a 32-bit word per row (Q5_0 and Q5_1 only) |
//! | last 128 | the 16 nibble bytes of each row, interleaved |
//!
//! Load `c` of the values holds nibble bytes `4c..4c + 4` of every row:
//! their low nibbles are weights `4c..4c + 4`, their high ones weights
//! `16 + 4c..20 + 4c`. A row's fifth bits are re-encoded so that bit `c` of
//! byte `t` is weight `4c + t`'s: one shift and one mask put the fifth bits
//! of a load's low (or high) nibbles in place (see `qh_encode`).
//!
//! A matrix whose row count is not a multiple of eight is padded with zero
//! rows, which are never read back.

use rayon::prelude::*;

use crate::qtype::QType;

/// Rows per group.
pub const GROUP: usize = 8;

/// Offsets within a Q4_K group block.
pub mod q4k {
    /// Bytes of one block of a group (eight rows, 256 weights each).
    pub const GROUP_BLOCK: usize = 1184;
    pub const D: usize = 0;
    pub const DMIN: usize = 16;
    pub const SCALES: usize = 32;
    pub const MINS: usize = 96;
    pub const QS: usize = 160;
}

/// Offsets within a Q5_K group block: Q4_K's, with the fifth bits before
/// the values.
pub mod q5k {
    /// Bytes of one block of a group (eight rows, 256 weights each).
    pub const GROUP_BLOCK: usize = 1440;
    pub const D: usize = 0;
    pub const DMIN: usize = 16;
    pub const SCALES: usize = 32;
    pub const MINS: usize = 96;
    pub const QH: usize = 160;
    pub const QS: usize = 416;
}

/// Offsets within a Q6_K group block.
pub mod q6k {
    /// Bytes of one block of a group (eight rows, 256 weights each).
    pub const GROUP_BLOCK: usize = 1680;
    pub const D: usize = 0;
    pub const SCALES: usize = 16;
    pub const QS: usize = 144;
}

/// Offsets within a Q8_0 group block.
pub mod q8_0 {
    /// Bytes of one block of a group (eight rows, 32 weights each).
    pub const GROUP_BLOCK: usize = 272;
    pub const D: usize = 0;
    pub const QS: usize = 16;
}

/// Offsets within a group block of the 32-weight types, by the type's code
/// ([`small::code`]: the group kernel's constant parameter).
pub mod small {
    use crate::qtype::QType;

    pub const Q4_0: usize = 0;
    pub const Q4_1: usize = 1;
    pub const Q5_0: usize = 2;
    pub const Q5_1: usize = 3;
    pub const IQ4_NL: usize = 4;
    pub const D: usize = 0;
    pub const M: usize = 16;

    /// The code of a 32-weight type held in groups.
    pub fn code(qtype: QType) -> Option<usize> {
        Some(match qtype {
            QType::Q4_0 => Q4_0,
            QType::Q4_1 => Q4_1,
            QType::Q5_0 => Q5_0,
            QType::Q5_1 => Q5_1,
            QType::IQ4NL => IQ4_NL,
            _ => return None,
        })
    }

    /// Whether a weight is `d·q + m` (else `d·q`).
    pub const fn has_m(code: usize) -> bool {
        code == Q4_1 || code == Q5_1
    }

    /// Whether weights have a fifth bit.
    pub const fn has_qh(code: usize) -> bool {
        code == Q5_0 || code == Q5_1
    }

    /// Where the fifth bits' words start.
    pub const fn qh(code: usize) -> usize {
        if has_m(code) {
            32
        } else {
            16
        }
    }

    /// Where the values start.
    pub const fn qs(code: usize) -> usize {
        qh(code) + if has_qh(code) { 32 } else { 0 }
    }

    /// Bytes of one block of a group (eight rows, 32 weights each).
    pub const fn group_block(code: usize) -> usize {
        qs(code) + 128
    }

    /// (offset of `m`, of the fifth bits, of the nibbles) in the file's block.
    pub(crate) const fn file(code: usize) -> (usize, usize, usize) {
        match code {
            Q4_1 => (2, 0, 4),
            Q5_0 => (0, 2, 6),
            Q5_1 => (2, 4, 8),
            _ => (0, 0, 2),
        }
    }
}

/// Whether matrices of `qtype` are held in groups (where the kernels run).
pub fn groups(qtype: QType) -> bool {
    matches!(qtype, QType::Q4K | QType::Q5K | QType::Q6K | QType::Q8_0)
        || small::code(qtype).is_some()
}

/// Bytes of one block of a group of `qtype` (one that [`groups`] takes).
pub fn group_block(qtype: QType) -> usize {
    if let Some(code) = small::code(qtype) {
        return small::group_block(code);
    }
    match qtype {
        QType::Q4K => q4k::GROUP_BLOCK,
        QType::Q5K => q5k::GROUP_BLOCK,
        QType::Q8_0 => q8_0::GROUP_BLOCK,
        _ => q6k::GROUP_BLOCK,
    }
}

/// A row's fifth bits (file: bit `j` is weight `j`'s) as a group holds
/// them: bit `c` of byte `t` is weight `4c + t`'s.
pub(crate) fn qh_encode(h: u32) -> u32 {
    let mut out = 0;
    for j in 0..32 {
        out |= (h >> j & 1) << (8 * (j % 4) + j / 4);
    }
    out
}

/// The inverse of [`qh_encode`].
pub(crate) fn qh_decode(g: u32) -> u32 {
    let mut out = 0;
    for j in 0..32 {
        out |= (g >> (8 * (j % 4) + j / 4) & 1) << j;
    }
    out
}

/// Bytes of a packed matrix of `rows` rows of `blocks` blocks.
pub fn packed_len(qtype: QType, rows: usize, blocks: usize) -> usize {
    rows.div_ceil(GROUP) * blocks * group_block(qtype)
}

/// The 6-bit scale and min of sub-block `j` from a block's 12 scale bytes.
#[inline(always)]
pub(crate) fn scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        (
            (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4),
            (s[j + 4] >> 4) | ((s[j] >> 6) << 4),
        )
    }
}

/// The 12 scale bytes that [`scale_min`] reads the given scales and mins from.
fn pack_scale_mins(sc: &[u8; 8], m: &[u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = m[j] | ((m[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((m[j + 4] & 0x0F) << 4);
    }
    s
}

/// Rearranges `rows` file rows of `blocks` blocks of `qtype` each (`src`,
/// row after row) into groups, writing [`packed_len`] bytes to `dst`.
pub fn pack(qtype: QType, src: &[u8], rows: usize, blocks: usize, dst: &mut [u8]) {
    let block = qtype.block_bytes();
    let row_bytes = blocks * block;
    let rec_bytes = group_block(qtype);
    assert_eq!(src.len(), rows * row_bytes, "rows to pack");
    assert_eq!(dst.len(), packed_len(qtype, rows, blocks), "packed buffer");
    // The byte map of each row of a group, worked out once per matrix.
    let maps: Vec<_> = (0..GROUP).map(|r| places(qtype, r)).collect();
    dst.par_chunks_mut(blocks * rec_bytes)
        .enumerate()
        .for_each(|(g, out)| {
            for (b, rec) in out.chunks_exact_mut(rec_bytes).enumerate() {
                rec.fill(0);
                for r in 0..GROUP.min(rows - g * GROUP) {
                    let row = g * GROUP + r;
                    let blk = &src[row * row_bytes + b * block..][..block];
                    for (file, packed) in maps[r].iter() {
                        copy_small(&mut rec[*packed..*packed + file.len()], &blk[file.clone()]);
                    }
                    if matches!(qtype, QType::Q4K | QType::Q5K) {
                        // (Q5_K keeps Q4_K's offsets for these.)
                        for j in 0..8 {
                            let (s, m) = scale_min(&blk[4..16], j);
                            rec[q4k::SCALES + j * GROUP + r] = s;
                            rec[q4k::MINS + (j / 2) * 16 + 2 * r + j % 2] = m;
                        }
                    }
                    if let Some(code) = small::code(qtype).filter(|&c| small::has_qh(c)) {
                        let at = small::file(code).1;
                        let h = u32::from_le_bytes(blk[at..at + 4].try_into().unwrap());
                        let to = small::qh(code) + 4 * r;
                        rec[to..to + 4].copy_from_slice(&qh_encode(h).to_le_bytes());
                    }
                    if qtype == QType::Q6K {
                        for (h, step, i) in q6k_places() {
                            let l = 64 * h + 4 * step + i;
                            let file = [blk[l], blk[l + 32], blk[128 + 32 * h + 4 * step + i]];
                            let at = q6k::QS + (h * 8 + step) * 96 + 4 * r + i;
                            let [a, b, c] = q6k_encode(file);
                            (rec[at], rec[at + 32], rec[at + 64]) = (a, b, c);
                        }
                    }
                }
            }
        });
}

/// Row `row` of a packed matrix as it was in the file (`blocks` blocks into
/// `out`).
pub fn unpack_row(qtype: QType, packed: &[u8], blocks: usize, row: usize, out: &mut [u8]) {
    let block = qtype.block_bytes();
    let rec_bytes = group_block(qtype);
    assert_eq!(out.len(), blocks * block, "row buffer");
    let (g, r) = (row / GROUP, row % GROUP);
    let group = &packed[g * blocks * rec_bytes..(g + 1) * blocks * rec_bytes];
    let map = places(qtype, r);
    for (blk, rec) in out
        .chunks_exact_mut(block)
        .zip(group.chunks_exact(rec_bytes))
    {
        for (file, packed) in map.iter() {
            copy_small(&mut blk[file.clone()], &rec[*packed..*packed + file.len()]);
        }
        if matches!(qtype, QType::Q4K | QType::Q5K) {
            let sc: [u8; 8] = std::array::from_fn(|j| rec[q4k::SCALES + j * GROUP + r]);
            let m: [u8; 8] = std::array::from_fn(|j| rec[q4k::MINS + (j / 2) * 16 + 2 * r + j % 2]);
            blk[4..16].copy_from_slice(&pack_scale_mins(&sc, &m));
        }
        if let Some(code) = small::code(qtype).filter(|&c| small::has_qh(c)) {
            let from = small::qh(code) + 4 * r;
            let g = u32::from_le_bytes(rec[from..from + 4].try_into().unwrap());
            let at = small::file(code).1;
            blk[at..at + 4].copy_from_slice(&qh_decode(g).to_le_bytes());
        }
        if qtype == QType::Q6K {
            for (h, step, i) in q6k_places() {
                let at = q6k::QS + (h * 8 + step) * 96 + 4 * r + i;
                let [x, y, hb] = q6k_decode([rec[at], rec[at + 32], rec[at + 64]]);
                let l = 64 * h + 4 * step + i;
                (blk[l], blk[l + 32], blk[128 + 32 * h + 4 * step + i]) = (x, y, hb);
            }
        }
    }
}

/// The pieces of [`places`], held inline (unpacking a row, as an
/// embedding lookup does per token, allocates nothing).
struct Places {
    items: [(std::ops::Range<usize>, usize); 42],
    len: usize,
}

impl Default for Places {
    fn default() -> Self {
        Places {
            items: std::array::from_fn(|_| (0..0, 0)),
            len: 0,
        }
    }
}

impl Places {
    fn push(&mut self, piece: (std::ops::Range<usize>, usize)) {
        self.items[self.len] = piece;
        self.len += 1;
    }

    fn iter(&self) -> std::slice::Iter<'_, (std::ops::Range<usize>, usize)> {
        self.items[..self.len].iter()
    }
}

/// Every (half, step, byte of the step) of a Q6_K block.
fn q6k_places() -> impl Iterator<Item = (usize, usize, usize)> {
    (0..64).map(|n| (n / 32, n / 4 % 8, n % 4))
}

/// A Q6_K position's three file bytes (`ql[l]`, `ql[l + 32]`, `qh[l]` of a
/// half) to its three group bytes (`a`, `b`, `c`; see the module docs).
pub(crate) fn q6k_encode([x, y, hb]: [u8; 3]) -> [u8; 3] {
    let q = [
        (x & 0x0F) | (hb & 3) << 4,
        (y & 0x0F) | (hb >> 2 & 3) << 4,
        (x >> 4) | (hb >> 4 & 3) << 4,
        (y >> 4) | (hb >> 6) << 4,
    ];
    [
        q[0] | q[3] << 6,
        q[1] | (q[3] >> 2) << 6,
        q[2] | (q[3] >> 4) << 6,
    ]
}

/// The inverse of [`q6k_encode`].
pub(crate) fn q6k_decode([a, b, c]: [u8; 3]) -> [u8; 3] {
    let q = [
        a & 0x3F,
        b & 0x3F,
        c & 0x3F,
        a >> 6 | (b >> 6) << 2 | (c >> 6) << 4,
    ];
    [
        (q[0] & 0x0F) | (q[2] & 0x0F) << 4,
        (q[1] & 0x0F) | (q[3] & 0x0F) << 4,
        q[0] >> 4 | (q[1] >> 4) << 2 | (q[2] >> 4) << 4 | (q[3] >> 4) << 6,
    ]
}

/// `dst` from `src` (equal lengths, a few bytes each: the pieces of
/// [`places`]), inline: `copy_from_slice` would call `memmove` for every
/// piece, which costs more than the copy.
#[inline(always)]
fn copy_small(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = *s;
    }
}

/// Where the bytes of row `r`'s file block go in a group block, as (range
/// in the file block, offset in the group block), apart from Q4_K's scales
/// and mins and Q6_K's values, which are re-encoded.
fn places(qtype: QType, r: usize) -> Places {
    let mut v = Places::default();
    if let Some(code) = small::code(qtype) {
        let (m, _, qs) = small::file(code);
        v.push((0..2, small::D + 2 * r));
        if small::has_m(code) {
            v.push((m..m + 2, small::M + 2 * r));
        }
        for c in 0..4 {
            v.push((
                qs + 4 * c..qs + 4 * c + 4,
                small::qs(code) + (c * GROUP + r) * 4,
            ));
        }
    } else if qtype == QType::Q8_0 {
        v.push((0..2, q8_0::D + 2 * r));
        for g in 0..8 {
            v.push((2 + 4 * g..6 + 4 * g, q8_0::QS + (g * GROUP + r) * 4));
        }
    } else if qtype == QType::Q4K {
        v.push((0..2, q4k::D + 2 * r));
        v.push((2..4, q4k::DMIN + 2 * r));
        for t in 0..32 {
            v.push((16 + 4 * t..20 + 4 * t, q4k::QS + (t * GROUP + r) * 4));
        }
    } else if qtype == QType::Q5K {
        v.push((0..2, q5k::D + 2 * r));
        v.push((2..4, q5k::DMIN + 2 * r));
        for u in 0..8 {
            v.push((16 + 4 * u..20 + 4 * u, q5k::QH + (u * GROUP + r) * 4));
        }
        for t in 0..32 {
            v.push((48 + 4 * t..52 + 4 * t, q5k::QS + (t * GROUP + r) * 4));
        }
    } else {
        v.push((208..210, q6k::D + 2 * r));
        for j in 0..16 {
            v.push((192 + j..193 + j, q6k::SCALES + (j / 2) * 16 + 2 * r + j % 2));
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{encode, QType};

    /// Every combination of a position's three file bytes survives the
    /// re-encoding, and the group bytes hold the six-bit values as the
    /// module docs say.
    #[test]
    fn q6k_bytes_round_trip() {
        for n in 0..1u32 << 24 {
            let file = [n as u8, (n >> 8) as u8, (n >> 16) as u8];
            let group = q6k_encode(file);
            assert_eq!(q6k_decode(group), file, "{file:?}");
            let [x, y, hb] = file.map(u32::from);
            let q3 = (y >> 4) | (hb >> 6) << 4;
            assert_eq!(u32::from(group[0] & 0x3F), (x & 0x0F) | (hb & 3) << 4);
            assert_eq!(u32::from(group[2] & 0x3F), (x >> 4) | (hb >> 4 & 3) << 4);
            let top = group.map(|v| u32::from(v >> 6));
            assert_eq!(top[0] | top[1] << 2 | top[2] << 4, q3, "{file:?}");
        }
    }

    #[test]
    fn fifth_bits_round_trip() {
        for seed in 1..200u64 {
            let h = u32::from_le_bytes(crate::test_bytes(4, seed).try_into().unwrap());
            let g = qh_encode(h);
            assert_eq!(qh_decode(g), h);
            for j in 0..32 {
                let (t, c) = (j % 4, j / 4);
                assert_eq!(g >> (8 * t + c) & 1, h >> j & 1, "weight {j}");
            }
        }
    }

    #[test]
    fn scale_bytes_round_trip() {
        // Every 6-bit value in every position, high bits included.
        for v in 0..64usize {
            let sc: [u8; 8] = std::array::from_fn(|j| ((v + 7 * j) % 64) as u8);
            let m: [u8; 8] = std::array::from_fn(|j| ((v * 3 + 11 * j) % 64) as u8);
            let s = pack_scale_mins(&sc, &m);
            for j in 0..8 {
                assert_eq!(scale_min(&s, j), (sc[j], m[j]), "value {v}, sub-block {j}");
            }
        }
    }

    /// Packing then unpacking gives back the file's bytes, for a row count
    /// that leaves a partial group; every byte of a file block has a place.
    #[test]
    fn rows_come_back_as_they_were() {
        let (rows, cols) = (13, 512);
        let w = crate::test_values(rows * cols, 5);
        for qtype in [
            QType::Q4K,
            QType::Q5K,
            QType::Q6K,
            QType::Q8_0,
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::IQ4NL,
        ] {
            let src = &if qtype == QType::IQ4NL {
                // No encoder: any bytes are a valid block.
                crate::test_bytes(rows * qtype.row_bytes(cols), 9)
            } else {
                encode(qtype, &w, cols)
            }[..];
            let blocks = cols / qtype.block_elems();
            let rb = qtype.row_bytes(cols);
            let mut packed = vec![0u8; packed_len(qtype, rows, blocks)];
            pack(qtype, src, rows, blocks, &mut packed);
            assert_eq!(packed.len(), 2 * blocks * group_block(qtype));
            let mut row = vec![0u8; rb];
            for r in 0..rows {
                unpack_row(qtype, &packed, blocks, r, &mut row);
                assert_eq!(row, src[r * rb..(r + 1) * rb], "{} row {r}", qtype.name());
            }
            let mut covered = vec![false; qtype.block_bytes()];
            for (file, _) in places(qtype, 0).iter().cloned() {
                covered[file].fill(true);
            }
            match qtype {
                QType::Q4K | QType::Q5K => covered[4..16].fill(true),
                QType::Q6K => covered[..192].fill(true),
                QType::Q5_0 => covered[2..6].fill(true),
                QType::Q5_1 => covered[4..8].fill(true),
                _ => {}
            }
            assert!(covered.iter().all(|&c| c), "{}", qtype.name());
        }
    }
}
