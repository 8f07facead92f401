//! Q4_K matrices rearranged at load time so that decoding can keep eight
//! weight rows in the lanes of one vector.
//!
//! In a file, a Q4_K row is a run of 144-byte blocks (see [`crate::kernels`]).
//! A product that walks rows one by one has to scale every 32-weight sub-block
//! of every row with its own multiply. Here eight consecutive rows form a
//! group, and block `b` of the eight rows is stored together as one
//! [`GROUP_BLOCK`]-byte record:
//!
//! | bytes | content |
//! |---|---|
//! | 0..16 | `d` of rows 0..8 (f16) |
//! | 16..32 | `dmin` of rows 0..8 (f16) |
//! | 32..96 | 6-bit scales, unpacked to bytes, `[sub-block][row]` |
//! | 96..160 | 6-bit mins, unpacked to bytes, `[sub-block pair][row][2]` |
//! | 160..1184 | the rows' 4-bit values, four bytes of row 0, then row 1, …, row 7, then the next four bytes of each |
//!
//! So one 32-byte load of values holds four bytes of all eight rows: their
//! low nibbles are four weights of sub-block `2c`, their high nibbles four of
//! sub-block `2c + 1`, for the same positions in every row. A sub-block's
//! eight such loads are summed in 16-bit lanes before one multiply by the
//! eight rows' scales (see [`crate::kernels::q4k8_tile`]).
//!
//! The record is 1184 bytes against the file's 8 × 144 = 1152 (the scales
//! and mins take a byte each). A matrix whose row count is not a multiple of
//! eight is padded with zero rows, which are never read back.

use rayon::prelude::*;

/// Rows per group.
pub const GROUP: usize = 8;
/// Bytes of one block of a group (eight rows, 256 weights each).
pub const GROUP_BLOCK: usize = 1184;
/// Offsets within a group block.
pub const D: usize = 0;
pub const DMIN: usize = 16;
pub const SCALES: usize = 32;
pub const MINS: usize = 96;
pub const QS: usize = 160;

/// Bytes of a Q4_K block in a file.
const BLOCK: usize = 144;

/// Bytes of a packed matrix of `rows` rows of `blocks` blocks.
pub fn packed_len(rows: usize, blocks: usize) -> usize {
    rows.div_ceil(GROUP) * blocks * GROUP_BLOCK
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

/// Rearranges `rows` file rows of `blocks` Q4_K blocks each (`src`, row
/// after row) into groups, writing [`packed_len`] bytes to `dst`.
pub fn pack(src: &[u8], rows: usize, blocks: usize, dst: &mut [u8]) {
    let row_bytes = blocks * BLOCK;
    assert_eq!(src.len(), rows * row_bytes, "Q4_K rows to pack");
    assert_eq!(dst.len(), packed_len(rows, blocks), "packed Q4_K buffer");
    dst.par_chunks_mut(blocks * GROUP_BLOCK)
        .enumerate()
        .for_each(|(g, out)| {
            for b in 0..blocks {
                let rec = &mut out[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
                rec.fill(0);
                for r in 0..GROUP {
                    let row = g * GROUP + r;
                    if row >= rows {
                        break;
                    }
                    let blk = &src[row * row_bytes + b * BLOCK..][..BLOCK];
                    rec[D + 2 * r..D + 2 * r + 2].copy_from_slice(&blk[0..2]);
                    rec[DMIN + 2 * r..DMIN + 2 * r + 2].copy_from_slice(&blk[2..4]);
                    for j in 0..8 {
                        let (s, m) = scale_min(&blk[4..16], j);
                        rec[SCALES + j * GROUP + r] = s;
                        rec[MINS + (j / 2) * 16 + 2 * r + j % 2] = m;
                    }
                    for t in 0..32 {
                        let at = QS + (t * GROUP + r) * 4;
                        rec[at..at + 4].copy_from_slice(&blk[16 + 4 * t..20 + 4 * t]);
                    }
                }
            }
        });
}

/// Row `row` of a packed matrix as it was in the file (`blocks` blocks of
/// 144 bytes into `out`).
pub fn unpack_row(packed: &[u8], blocks: usize, row: usize, out: &mut [u8]) {
    assert_eq!(out.len(), blocks * BLOCK, "Q4_K row buffer");
    let (g, r) = (row / GROUP, row % GROUP);
    let group = &packed[g * blocks * GROUP_BLOCK..(g + 1) * blocks * GROUP_BLOCK];
    for (b, blk) in out.chunks_exact_mut(BLOCK).enumerate() {
        let rec = &group[b * GROUP_BLOCK..(b + 1) * GROUP_BLOCK];
        blk[0..2].copy_from_slice(&rec[D + 2 * r..D + 2 * r + 2]);
        blk[2..4].copy_from_slice(&rec[DMIN + 2 * r..DMIN + 2 * r + 2]);
        let sc: [u8; 8] = std::array::from_fn(|j| rec[SCALES + j * GROUP + r]);
        let m: [u8; 8] = std::array::from_fn(|j| rec[MINS + (j / 2) * 16 + 2 * r + j % 2]);
        blk[4..16].copy_from_slice(&pack_scale_mins(&sc, &m));
        for t in 0..32 {
            let at = QS + (t * GROUP + r) * 4;
            blk[16 + 4 * t..20 + 4 * t].copy_from_slice(&rec[at..at + 4]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{encode, QType};

    #[test]
    fn scale_bytes_round_trip() {
        // Every 6-bit value in every position, high bits included.
        for v in 0..64u8 {
            let sc: [u8; 8] = std::array::from_fn(|j| (v + 7 * j as u8) % 64);
            let m: [u8; 8] = std::array::from_fn(|j| (v * 3 + 11 * j as u8) % 64);
            let s = pack_scale_mins(&sc, &m);
            for j in 0..8 {
                assert_eq!(scale_min(&s, j), (sc[j], m[j]), "value {v}, sub-block {j}");
            }
        }
    }

    /// Packing then unpacking gives back the file's bytes, for a row count
    /// that leaves a partial group.
    #[test]
    fn rows_come_back_as_they_were() {
        let (rows, cols) = (13, 512);
        let w = crate::test_values(rows * cols, 5);
        let src = &encode(QType::Q4K, &w, cols)[..];
        let blocks = cols / 256;
        let mut packed = vec![0u8; packed_len(rows, blocks)];
        pack(src, rows, blocks, &mut packed);
        assert_eq!(packed.len(), 2 * blocks * GROUP_BLOCK);
        let mut row = vec![0u8; blocks * BLOCK];
        for r in 0..rows {
            unpack_row(&packed, blocks, r, &mut row);
            assert_eq!(
                row,
                src[r * blocks * BLOCK..(r + 1) * blocks * BLOCK],
                "row {r}"
            );
        }
    }
}
