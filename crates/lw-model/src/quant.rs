//! Block-quantized weight matrices (the GGUF types) and their matrix product.
//!
//! A quantized matrix is kept as the bytes of its blocks, straight from the
//! memory-mapped file (or, for Q8_0 and the K-quants where the kernels run,
//! in groups of eight rows), and never dequantized as a whole. A product
//! quantizes each activation row once (per 32 values for the 32-weight
//! types, per 256 for the 256-weight ones) and takes exact integer dot
//! products block by block: Q8_0, Q4_K, Q5_K, Q6_K and the 32-weight
//! types in [`crate::kernels`] where those run; the other types, and every
//! type on CPUs without the kernels, by the plain-Rust definitions that the
//! kernels keep bit for bit (the scalar row products in
//! [`crate::kernels`], [`crate::portable`], [`crate::igrid`]). Weight rows
//! are split over the thread pool. Embedding lookups dequantize only the
//! rows they need.

use std::sync::Arc;

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ4_0, BlockQ4_1, BlockQ5K, BlockQ5_0, BlockQ5_1, BlockQ6K,
    BlockQ8_0, GgmlType,
};
use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use crate::kernels::Isa;
use crate::pool::SharedOut;

pub use crate::mmap::Bytes;
pub use crate::qtype::QType;

/// Views bytes as blocks of `T`. GGUF data is 32-byte aligned and owned
/// bytes 8-byte aligned; the block types need at most 4.
fn blocks<T>(bytes: &[u8]) -> &[T] {
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    assert_eq!(bytes.len() % std::mem::size_of::<T>(), 0);
    // SAFETY: alignment and length checked; the block types are plain
    // `repr(C)` data for which every bit pattern is a value.
    unsafe {
        std::slice::from_raw_parts(
            bytes.as_ptr() as *const T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

fn blocks_mut<T>(bytes: &mut [u8]) -> &mut [T] {
    assert_eq!(bytes.as_ptr() as usize % std::mem::align_of::<T>(), 0);
    assert_eq!(bytes.len() % std::mem::size_of::<T>(), 0);
    // SAFETY: as in `blocks`, and the borrow is unique.
    unsafe {
        std::slice::from_raw_parts_mut(
            bytes.as_mut_ptr() as *mut T,
            bytes.len() / std::mem::size_of::<T>(),
        )
    }
}

/// A `[rows, cols]` matrix of blocks: row-major as in a file, or, for Q4_K
/// and Q6_K on CPUs that run the vector kernels, rearranged in groups of
/// eight rows ([`crate::repack`]).
#[derive(Debug, Clone)]
pub struct QMatrix {
    qtype: QType,
    rows: usize,
    cols: usize,
    data: Bytes,
    /// Whether `data` holds groups of eight rows rather than rows.
    packed: bool,
}

impl QMatrix {
    /// Wraps block data; `data` must hold exactly `rows` rows of `cols`.
    pub fn new(qtype: QType, rows: usize, cols: usize, data: Bytes) -> Result<Self, String> {
        if !qtype.is_quantized() {
            return Err(format!("{} is not a block-quantized type", qtype.name()));
        }
        if !cols.is_multiple_of(qtype.block_elems()) {
            return Err(format!(
                "rows of {cols} elements are not whole {} blocks of {}",
                qtype.name(),
                qtype.block_elems()
            ));
        }
        let want = rows * qtype.row_bytes(cols);
        if data.as_slice().len() != want {
            return Err(format!(
                "{} bytes for {rows}×{cols} {} (expected {want})",
                data.as_slice().len(),
                qtype.name()
            ));
        }
        Ok(QMatrix {
            qtype,
            rows,
            cols,
            data,
            packed: false,
        }
        .prepared())
    }

    /// The layout the kernels read fastest: Q8_0, Q4_K, Q6_K and the
    /// 32-weight types in groups of eight rows where the vector kernels run. Memory-mapped source pages are given
    /// back once copied, so a loaded model holds about its file's size.
    fn prepared(self) -> QMatrix {
        if !crate::repack::groups(self.qtype) || self.packed || !crate::kernels::available() {
            return self;
        }
        let blocks = self.cols / self.qtype.block_elems();
        let len = crate::repack::packed_len(self.qtype, self.rows, blocks);
        let mut words = vec![0u64; len.div_ceil(8)];
        // Where the zeroed allocation is fresh pages not yet touched (a large
        // one is mapped anew), they are backed by huge pages from the first
        // write on; decoding walks them all once per token.
        crate::mmap::advise_huge_pages(words.as_ptr() as usize, len);
        // SAFETY: `words` holds at least `len` bytes.
        let dst = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
        crate::repack::pack(self.qtype, self.data.as_slice(), self.rows, blocks, dst);
        self.data.release();
        QMatrix {
            data: Bytes::Owned {
                words: Arc::new(words),
                len,
            },
            packed: true,
            ..self
        }
    }

    /// Whether the data is held in groups of eight rows (K-quants where the
    /// vector kernels run).
    pub fn is_packed(&self) -> bool {
        self.packed
    }

    /// Quantizes a row-major f32 matrix.
    pub fn quantize(
        qtype: QType,
        values: &[f32],
        rows: usize,
        cols: usize,
    ) -> Result<Self, String> {
        if values.len() != rows * cols {
            return Err(format!("{} values for {rows}×{cols}", values.len()));
        }
        if !qtype.encodable() {
            return Err(format!(
                "{} can be read but not written here (llama.cpp's llama-quantize writes it)",
                qtype.name()
            ));
        }
        if !qtype.is_quantized() || !cols.is_multiple_of(qtype.block_elems()) {
            return Err(format!(
                "cannot quantize rows of {cols} to {} (blocks of {})",
                qtype.name(),
                qtype.block_elems()
            ));
        }
        let (words, len) = encode_words(qtype, values, cols);
        Ok(QMatrix {
            qtype,
            rows,
            cols,
            data: Bytes::Owned {
                words: Arc::new(words),
                len,
            },
            packed: false,
        }
        .prepared())
    }

    pub fn qtype(&self) -> QType {
        self.qtype
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// The bytes as held (see [`QMatrix::is_packed`]): what a product reads.
    pub fn bytes(&self) -> &[u8] {
        self.data.as_slice()
    }

    /// Row `r` in the file's block format.
    fn row(&self, r: usize) -> std::borrow::Cow<'_, [u8]> {
        let rb = self.qtype.row_bytes(self.cols);
        if self.packed {
            let mut out = vec![0u8; rb];
            crate::repack::unpack_row(
                self.qtype,
                self.data.as_slice(),
                self.cols / self.qtype.block_elems(),
                r,
                &mut out,
            );
            return out.into();
        }
        self.data.as_slice()[r * rb..(r + 1) * rb].into()
    }

    /// All rows in the file's block format.
    pub fn file_bytes(&self) -> std::borrow::Cow<'_, [u8]> {
        if !self.packed {
            return self.data.as_slice().into();
        }
        let rb = self.qtype.row_bytes(self.cols);
        let mut out = vec![0u8; self.rows * rb];
        out.par_chunks_mut(rb).enumerate().for_each(|(r, o)| {
            crate::repack::unpack_row(
                self.qtype,
                self.data.as_slice(),
                self.cols / self.qtype.block_elems(),
                r,
                o,
            )
        });
        out.into()
    }

    /// Row `r` as f32 values.
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        if !self.packed {
            return dequantize_row(self.qtype, &self.row(r), out);
        }
        // The row in the file's format, in a buffer kept per thread (an
        // embedding lookup per decoded token allocates nothing).
        // (Words, so that the blocks are aligned as their types want.)
        thread_local! {
            static ROW: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        crate::pool::with_local(&ROW, |words| {
            let len = self.qtype.row_bytes(self.cols);
            words.resize(len.div_ceil(8), 0);
            // SAFETY: the words hold at least `len` bytes.
            let row = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
            crate::repack::unpack_row(
                self.qtype,
                self.data.as_slice(),
                self.cols / self.qtype.block_elems(),
                r,
                row,
            );
            dequantize_row(self.qtype, row, out);
        })
    }

    /// The whole matrix as f32 (tests, conversion).
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        out.par_chunks_mut(self.cols)
            .enumerate()
            .for_each(|(r, o)| self.dequantize_row(r, o));
        out
    }

    /// `out[r][j] = Σ_i x[r][i] · W[j][i]`: `x` is `[rows, cols]`, `out` is `[rows, self.rows]`.
    pub fn matmul(&self, x: &[f32], out: &mut [f32]) {
        if QMatrix::matmul_stacked(&[self], x, out) {
            return;
        }
        match self.qtype {
            QType::F32 | QType::F16 | QType::BF16 => unreachable!("QMatrix holds block types"),
            // Every type by its own definition, which the vector kernels
            // keep: where they do not run, a row has the bits it would have
            // where they do.
            _ => self.matmul_rows(x, out),
        }
    }

    /// The product with matrices stacked by rows (`[q; k; v]`), in one
    /// parallel pass, when they share a type the four-row kernels take.
    /// `out` is `[rows of x, Σ rows]`. Returns `false` (and does nothing)
    /// otherwise.
    pub fn matmul_stacked(parts: &[&QMatrix], x: &[f32], out: &mut [f32]) -> bool {
        let Some(first) = parts.first() else {
            return false;
        };
        let same = parts
            .iter()
            .all(|p| p.qtype == first.qtype && p.cols == first.cols);
        #[cfg(target_arch = "x86_64")]
        if let (true, Some(isa)) = (same, crate::kernels::Isa::detect()) {
            match first.qtype {
                // Q8_0, Q4_K, Q6_K and the 32-weight types are always held
                // in groups where the kernels run.
                QType::Q4K | QType::Q6K if parts.iter().all(|p| p.packed) => {
                    with_work(parts, x, |w| matmul_groups(isa, parts, x, out, w));
                    return true;
                }
                QType::Q8_0 if parts.iter().all(|p| p.packed) => {
                    with_work(parts, x, |w| matmul_q8_groups(isa, parts, x, out, w));
                    return true;
                }
                QType::Q5K if parts.iter().all(|p| p.packed) => {
                    with_work(parts, x, |w| matmul_q5k_groups(isa, parts, x, out, w));
                    return true;
                }
                t if crate::repack::small::code(t).is_some() && parts.iter().all(|p| p.packed) => {
                    with_work(parts, x, |w| matmul_small_groups(isa, parts, x, out, w));
                    return true;
                }
                _ => {}
            }
        }
        let _ = (same, x, out);
        false
    }

    /// The product by candle's block dot products (the comparison in the
    /// tests).
    #[cfg(test)]
    fn matmul_as<T: GgmlType>(&self, x: &[f32], out: &mut [f32]) {
        let (n, k) = (self.rows, self.cols);
        let m = x.len() / k;
        debug_assert_eq!(out.len(), m * n);
        let per_row = k / T::VecDotType::BLCK_SIZE;
        // Activations quantized once per product.
        let mut xq: Vec<T::VecDotType> = (0..m * per_row).map(|_| T::VecDotType::zeros()).collect();
        xq.par_chunks_mut(per_row)
            .zip(x.par_chunks(k))
            .for_each(|(q, row)| T::VecDotType::from_float(row, q));
        let file = self.file_bytes();
        let w: &[T] = blocks(&file);
        let wrow = k / T::BLCK_SIZE;
        let rb = self.qtype.row_bytes(k);
        fill_by_row_blocks(n, m, rb, out, |r, j| {
            T::vec_dot(
                k,
                &w[j * wrow..(j + 1) * wrow],
                &xq[r * per_row..(r + 1) * per_row],
            )
        });
    }
}

/// `out[r·n + j] = value(r, j)` for every input row `r` < `m` and weight
/// row `j` < `n`, the weight rows in blocks over the pool; with many input
/// rows, blocks small enough (of rows of `row_bytes`) to stay in cache
/// while every input row passes over them.
fn fill_by_row_blocks(
    n: usize,
    m: usize,
    row_bytes: usize,
    out: &mut [f32],
    value: impl Fn(usize, usize) -> f32 + Sync,
) {
    debug_assert_eq!(out.len(), m * n);
    let threads = rayon::current_num_threads().max(1);
    let mut block = (n / (threads * 4)).clamp(8, 1024);
    if m > 4 {
        block = block.min((256 * 1024 / row_bytes.max(1)).max(8));
    }
    let dst = SharedOut(out.as_mut_ptr());
    crate::pool::for_each(n.div_ceil(block), |bi| {
        let j0 = bi * block;
        let j1 = (j0 + block).min(n);
        for r in 0..m {
            for j in j0..j1 {
                let v = value(r, j);
                // SAFETY: element (r, j) belongs to this block alone, and
                // `out` outlives the loop.
                unsafe { *dst.at(r * n + j) = v };
            }
        }
    });
}

impl QMatrix {
    /// The product in plain Rust, for the types without a vector kernel
    /// ([`crate::portable`], [`crate::igrid`]) and for Q8_0, Q4_K and Q6_K
    /// where their kernels do not run (their scalar definitions in
    /// [`crate::kernels`]): activations quantized once, then one row dot
    /// product per output ([`fill_by_row_blocks`]).
    fn matmul_rows(&self, x: &[f32], out: &mut [f32]) {
        use crate::kernels::{q4k_dot, q6k_dot, q8_0_dot, QuantRow};
        let (n, k) = (self.rows, self.cols);
        let group = crate::portable::activation_group(self.qtype);
        let xq: Vec<QuantRow> = x
            .par_chunks(k)
            .map(|r| crate::kernels::quantize_row(r, group))
            .collect();
        let dot: fn(QType, &[u8], &QuantRow) -> f32 = match self.qtype {
            QType::Q8_0 => |_, w, x| q8_0_dot(w, x),
            QType::Q4K => |_, w, x| q4k_dot(w, x),
            QType::Q6K => |_, w, x| q6k_dot(w, x),
            q if crate::portable::handles(q) || q == QType::Q5K => crate::portable::dot,
            _ => crate::igrid::dot,
        };
        let file = self.file_bytes();
        let w = &file[..];
        let rb = self.qtype.row_bytes(k);
        fill_by_row_blocks(n, xq.len(), rb, out, |r, j| {
            dot(self.qtype, &w[j * rb..(j + 1) * rb], &xq[r])
        });
    }
}

/// A grouped product's input rows, quantized, and its matrices' groups
/// ([`stack_groups`]).
#[cfg(target_arch = "x86_64")]
type Work<'a> = (
    &'a [crate::kernels::QuantRow],
    &'a [(SharedIn, usize, usize)],
);

/// The buffers of [`Work`], kept per thread and reused, so that a decoded
/// token's products allocate nothing once they have grown.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct WorkBuffers {
    xq: Vec<crate::kernels::QuantRow>,
    groups: Vec<(SharedIn, usize, usize)>,
}

#[cfg(target_arch = "x86_64")]
thread_local! {
    static WORK: std::cell::RefCell<WorkBuffers> = std::cell::RefCell::default();
}

/// `f` with the rows of `x` quantized as the grouped matrices `parts`
/// (one type, one width) want them, and the parts' groups.
#[cfg(target_arch = "x86_64")]
fn with_work<R>(parts: &[&QMatrix], x: &[f32], f: impl FnOnce(Work) -> R) -> R {
    let (qtype, k) = (parts[0].qtype, parts[0].cols);
    let group = if qtype.block_elems() == 32 { 32 } else { 256 };
    let group_bytes = k / qtype.block_elems() * crate::repack::group_block(qtype);
    let fill = |b: &mut WorkBuffers| {
        let m = x.len() / k;
        if b.xq.len() < m {
            b.xq.resize_with(m, Default::default);
        }
        quantize_rows_into(x, k, group, &mut b.xq[..m]);
        stack_groups(parts, group_bytes, &mut b.groups);
        m
    };
    crate::pool::with_local(&WORK, |b| {
        let m = fill(b);
        f((&b.xq[..m], &b.groups))
    })
}

/// Each row of `x` (`k` wide) quantized for the kernels into `xq`, one scale
/// per `group`.
#[cfg(target_arch = "x86_64")]
fn quantize_rows_into(x: &[f32], k: usize, group: usize, xq: &mut [crate::kernels::QuantRow]) {
    use crate::kernels::quantize_row_into;
    if x.len() == k {
        quantize_row_into(x, group, &mut xq[0]);
    } else {
        xq.par_iter_mut()
            .zip(x.par_chunks(k))
            .for_each(|(q, r)| quantize_row_into(r, group, q));
    }
}

/// Every group of a stack of grouped matrices (`group_bytes` each): its
/// bytes, its first output column and how many of its eight rows are real.
#[cfg(target_arch = "x86_64")]
fn stack_groups(
    parts: &[&QMatrix],
    group_bytes: usize,
    groups: &mut Vec<(SharedIn, usize, usize)>,
) {
    use crate::repack::GROUP;
    groups.clear();
    let mut col = 0;
    for p in parts {
        let base = SharedIn(p.data.as_slice().as_ptr());
        for g in 0..p.rows.div_ceil(GROUP) {
            // SAFETY: group `g` lies within this part's bytes.
            let at = unsafe { base.at(g * group_bytes) };
            groups.push((
                SharedIn(at),
                col + g * GROUP,
                (p.rows - g * GROUP).min(GROUP),
            ));
        }
        col += p.rows;
    }
}

/// Groups per piece of a parallel pass over `groups` groups: enough pieces
/// to balance the threads; with more than four input rows, few enough that
/// what a piece reuses (`reused` bytes per group) stays in the core's cache.
#[cfg(target_arch = "x86_64")]
fn groups_per_piece(groups: usize, m: usize, reused: usize) -> usize {
    let threads = rayon::current_num_threads().max(1);
    let per = (groups / (threads * 4)).clamp(1, 128);
    if m > 4 {
        per.min((256 * 1024 / reused).max(1))
    } else {
        per
    }
}

/// Input rows from `*r` in runs of `R` through a group kernel, while a whole
/// run fits before `r1`; each result (the group's `valid` rows) goes to
/// columns `col..col + valid` of its row of the `[rows, n]` output.
///
/// # Safety
/// Those elements of rows `*r..r1` lie within the output and belong to the
/// caller alone.
#[cfg(target_arch = "x86_64")]
unsafe fn rows_in_runs<const R: usize>(
    xq: &[crate::kernels::QuantRow],
    r: &mut usize,
    r1: usize,
    dst: SharedOut,
    (n, col, valid): (usize, usize, usize),
    kernel: impl Fn([&crate::kernels::QuantRow; R]) -> [[f32; 8]; R],
) {
    while *r + R <= r1 {
        let v = kernel(std::array::from_fn(|i| &xq[*r + i]));
        for (i, vi) in v.into_iter().enumerate() {
            let to = dst.at((*r + i) * n + col);
            if valid == crate::repack::GROUP {
                (to as *mut [f32; 8]).write_unaligned(vi);
            } else {
                std::ptr::copy_nonoverlapping(vi.as_ptr(), to, valid);
            }
        }
        *r += R;
    }
}

/// Stacked Q8_0 matrices (one width) held in groups of eight rows, times
/// `x`: groups over the thread pool; tiles of eight input rows through the
/// GEMM kernel ([`crate::kernels::q8_0_gemm`]) against the piece's rows
/// widened to 16 bits, four at a time, a span of 512 values at a time so
/// that the tile's span stays in the first-level cache; the other input
/// rows (all of them, when decoding) through the group kernel
/// ([`crate::kernels::q8_0x8_tile`]). Both give a row the same bits.
#[cfg(target_arch = "x86_64")]
fn matmul_q8_groups(isa: Isa, parts: &[&QMatrix], x: &[f32], out: &mut [f32], (xq, groups): Work) {
    use crate::kernels::{q8_0_gemm_blocks, q8_0x8_tile, GemmAcc, WideRows, WideTile};
    use crate::repack::{q8_0::GROUP_BLOCK, GROUP};
    /// Weight rows per GEMM call (a group holds two such).
    const GEMM_ROWS: usize = 4;
    /// Blocks of 32 per span: 512 values, 8 KiB of a widened tile.
    const SPAN: usize = 16;
    let k = parts[0].cols;
    let blocks = k / 32;
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let m = x.len() / k;
    let group_bytes = blocks * GROUP_BLOCK;
    // A piece reuses its rows widened to 16 bits.
    let per = groups_per_piece(groups.len(), m, 2 * group_bytes);
    let tiles: Vec<WideTile> = if m >= 8 {
        xq.par_chunks_exact(8).map(WideTile::new).collect()
    } else {
        Vec::new()
    };
    let gemm_rows = tiles.len() * 8;
    let dst = SharedOut(out.as_mut_ptr());
    crate::pool::for_each(groups.len().div_ceil(per), |i| {
        let piece = &groups[i * per..((i + 1) * per).min(groups.len())];
        if !tiles.is_empty() {
            let mut wide = WideRows::default();
            // SAFETY: each pointer is at a whole group of `blocks` blocks.
            unsafe { wide.fill_groups(k, piece.iter().map(|g| g.0 .0)) };
            let calls = piece.len() * GROUP / GEMM_ROWS;
            let mut accs: Vec<GemmAcc<GEMM_ROWS, 1>> = Vec::new();
            for (t, tile) in tiles.iter().enumerate() {
                accs.clear();
                accs.resize_with(calls, Default::default);
                for b0 in (0..blocks).step_by(SPAN) {
                    let span = b0..(b0 + SPAN).min(blocks);
                    for (c, acc) in accs.iter_mut().enumerate() {
                        // SAFETY: the features were checked by the caller;
                        // the widened rows hold k values, as the tile does.
                        unsafe {
                            q8_0_gemm_blocks(isa, &wide, c * GEMM_ROWS, [tile], span.clone(), acc)
                        };
                    }
                }
                for (c, acc) in accs.iter().enumerate() {
                    let (_, col, valid) = piece[c * GEMM_ROWS / GROUP];
                    let first = c * GEMM_ROWS % GROUP;
                    let take = valid.saturating_sub(first).min(GEMM_ROWS);
                    let v = acc.sum();
                    // `[activation row][weight row]`.
                    let out: [[f32; GEMM_ROWS]; 8] =
                        std::array::from_fn(|i| std::array::from_fn(|r| v[r][0][i]));
                    for (i, &row) in out.iter().enumerate() {
                        // SAFETY: elements (8t + i, col + first..) belong to
                        // this piece alone.
                        unsafe {
                            let to = dst.at((8 * t + i) * n + col + first);
                            if take == GEMM_ROWS {
                                (to as *mut [f32; GEMM_ROWS]).write_unaligned(row);
                            } else {
                                std::ptr::copy_nonoverlapping(row.as_ptr(), to, take);
                            }
                        };
                    }
                }
            }
        }
        // The remaining input rows, in chunks that stay in cache while the
        // piece's groups pass over them.
        for r0 in (gemm_rows..m).step_by(64) {
            let r1 = (r0 + 64).min(m);
            for &(at, col, valid) in piece {
                let mut r = r0;
                // SAFETY: the features were checked by the caller; the group
                // and the rows have the same blocks; elements (r0..r1, col..
                // col + valid) belong to this piece alone.
                unsafe {
                    let out = (n, col, valid);
                    rows_in_runs(xq, &mut r, r1, dst, out, |xs| {
                        q8_0x8_tile::<4>(isa, at.0, xs)
                    });
                    rows_in_runs(xq, &mut r, r1, dst, out, |xs| {
                        q8_0x8_tile::<1>(isa, at.0, xs)
                    });
                }
            }
        }
    });
}

/// Stacked matrices held in groups of eight rows whose kernel takes input
/// rows as they are (no GEMM tiles: the 32-weight types and Q5_K), times
/// `x`: groups over the thread pool, and for each group, input rows in
/// chunks that stay in cache while the piece's groups pass over them, each
/// chunk through `rows(at, r0..r1, dst, (n, col, valid))`.
#[cfg(target_arch = "x86_64")]
fn matmul_by_rows(
    parts: &[&QMatrix],
    x: &[f32],
    out: &mut [f32],
    groups: &[(SharedIn, usize, usize)],
    rows: impl Fn(SharedIn, std::ops::Range<usize>, SharedOut, (usize, usize, usize)) + Sync,
) {
    let (qtype, k) = (parts[0].qtype, parts[0].cols);
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let m = x.len() / k;
    let group_bytes = k / qtype.block_elems() * crate::repack::group_block(qtype);
    let per = groups_per_piece(groups.len(), m, group_bytes);
    let dst = SharedOut(out.as_mut_ptr());
    crate::pool::for_each(groups.len().div_ceil(per), |i| {
        let piece = &groups[i * per..((i + 1) * per).min(groups.len())];
        for r0 in (0..m).step_by(64) {
            for &(at, col, valid) in piece {
                rows(at, r0..(r0 + 64).min(m), dst, (n, col, valid));
            }
        }
    });
}

/// Stacked matrices of a 32-weight type (Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL;
/// one type, one width) held in groups of eight rows, times `x`
/// ([`matmul_by_rows`]): input rows four at a time through the group kernel
/// ([`crate::kernels::small8_tile`]), then one at a time.
#[cfg(target_arch = "x86_64")]
fn matmul_small_groups(
    isa: Isa,
    parts: &[&QMatrix],
    x: &[f32],
    out: &mut [f32],
    (xq, groups): Work,
) {
    use crate::repack::small;
    let code = small::code(parts[0].qtype).expect("a 32-weight type");
    matmul_by_rows(parts, x, out, groups, |at, r, dst, o| {
        // SAFETY: the features were checked by the caller; the group and
        // the rows have the same blocks; elements (r, col..col + valid)
        // belong to this piece alone.
        unsafe {
            match code {
                small::Q4_0 => small_rows::<{ small::Q4_0 }>(isa, xq, r, dst, o, at),
                small::Q4_1 => small_rows::<{ small::Q4_1 }>(isa, xq, r, dst, o, at),
                small::Q5_0 => small_rows::<{ small::Q5_0 }>(isa, xq, r, dst, o, at),
                small::Q5_1 => small_rows::<{ small::Q5_1 }>(isa, xq, r, dst, o, at),
                _ => small_rows::<{ small::IQ4_NL }>(isa, xq, r, dst, o, at),
            }
        }
    });
}

/// Stacked Q5_K matrices (one width) held in groups of eight rows, times
/// `x` ([`matmul_by_rows`]): input rows four at a time through the group
/// kernel ([`crate::kernels::q5k8_tile`]), then one at a time.
#[cfg(target_arch = "x86_64")]
fn matmul_q5k_groups(isa: Isa, parts: &[&QMatrix], x: &[f32], out: &mut [f32], (xq, groups): Work) {
    use crate::kernels::q5k8_tile;
    matmul_by_rows(parts, x, out, groups, |at, r, dst, o| {
        let (mut i, end) = (r.start, r.end);
        // SAFETY: as in `matmul_small_groups`.
        unsafe {
            rows_in_runs(xq, &mut i, end, dst, o, |xs| q5k8_tile::<4>(isa, at.0, xs));
            rows_in_runs(xq, &mut i, end, dst, o, |xs| q5k8_tile::<1>(isa, at.0, xs));
        }
    });
}

/// Input rows `r` against one group of [`matmul_small_groups`]: four at a
/// time, then one.
///
/// # Safety
/// As for [`rows_in_runs`]; `at` holds a group of type `T` with the rows'
/// blocks.
#[cfg(target_arch = "x86_64")]
unsafe fn small_rows<const T: usize>(
    isa: Isa,
    xq: &[crate::kernels::QuantRow],
    r: std::ops::Range<usize>,
    dst: SharedOut,
    out: (usize, usize, usize),
    at: SharedIn,
) {
    use crate::kernels::small8_tile;
    let (mut i, end) = (r.start, r.end);
    rows_in_runs(xq, &mut i, end, dst, out, |xs| {
        small8_tile::<T, 4>(isa, at.0, xs)
    });
    rows_in_runs(xq, &mut i, end, dst, out, |xs| {
        small8_tile::<T, 1>(isa, at.0, xs)
    });
}

/// Stacked Q4_K or Q6_K matrices (one type, one width) held in groups of
/// eight rows, times `x`: groups of rows over the thread pool, tiles of
/// eight input rows through the GEMM kernels, and the other input rows (all
/// of them, when decoding) through the group kernels
/// ([`crate::kernels::q4k8_tile`], [`crate::kernels::q6k8_tile`]). Both give
/// a row the same bits.
#[cfg(target_arch = "x86_64")]
fn matmul_groups(isa: Isa, parts: &[&QMatrix], x: &[f32], out: &mut [f32], (xq, groups): Work) {
    use crate::kernels::{q4k8_tile, q4k_gemm, q6k8_tile, q6k_gemm, ActTile, Q4kRow, Q6kRow};
    use crate::repack::group_block;
    let qtype = parts[0].qtype;
    let k = parts[0].cols;
    let blocks = k / 256;
    let n: usize = parts.iter().map(|p| p.rows).sum();
    let m = x.len() / k;
    let group_bytes = blocks * group_block(qtype);
    let per = groups_per_piece(groups.len(), m, group_bytes);
    let tiles: Vec<ActTile> = if m >= 8 {
        xq.par_chunks_exact(8).map(ActTile::new).collect()
    } else {
        Vec::new()
    };
    let gemm_rows = tiles.len() * 8;
    let dst = SharedOut(out.as_mut_ptr());
    // Rows of one group, unpacked for the GEMM kernels.
    enum Unpacked {
        None,
        Q4k(Box<[Q4kRow; 8]>),
        Q6k(Box<[Q6kRow; 8]>),
    }
    impl Unpacked {
        /// # Safety
        /// As for [`matmul_groups`]; `at` holds a group of `blocks` blocks.
        unsafe fn fill(&mut self, at: *const u8, blocks: usize) {
            match self {
                Unpacked::None => {}
                Unpacked::Q4k(rows) => Q4kRow::unpack_group(rows, at, blocks),
                Unpacked::Q6k(rows) => Q6kRow::unpack_group(rows, at, blocks),
            }
        }

        /// Rows `pair`, `pair + 1` against the tiles.
        ///
        /// # Safety
        /// As for [`matmul_groups`]; the tiles have as many blocks as the rows.
        unsafe fn gemm<const T: usize>(
            &self,
            isa: Isa,
            pair: usize,
            tiles: [&ActTile; T],
        ) -> [[[f32; 8]; T]; 2] {
            match self {
                Unpacked::None => unreachable!("rows are unpacked where there are tiles"),
                Unpacked::Q4k(r) => q4k_gemm::<T>(isa, [&r[pair], &r[pair + 1]], tiles),
                Unpacked::Q6k(r) => q6k_gemm::<T>(isa, [&r[pair], &r[pair + 1]], tiles),
            }
        }
    }
    crate::pool::for_each(groups.len().div_ceil(per), |i| {
        let piece = &groups[i * per..((i + 1) * per).min(groups.len())];
        // Only prefill's tiles need the rows unpacked (decode allocates
        // nothing here).
        let mut unpacked = match (tiles.is_empty(), qtype) {
            (true, _) => Unpacked::None,
            (false, QType::Q4K) => Unpacked::Q4k(Default::default()),
            (false, _) => Unpacked::Q6k(Default::default()),
        };
        // Eight tiles (64 input rows) stay in cache while the piece's rows
        // pass over them two at a time.
        for t0 in (0..tiles.len()).step_by(8) {
            let t1 = (t0 + 8).min(tiles.len());
            for &(at, col, valid) in piece {
                // SAFETY: the features were checked by the caller; the group
                // holds `blocks` blocks, as the tiles do.
                unsafe { unpacked.fill(at.0, blocks) };
                for pair in (0..valid).step_by(2) {
                    let store = |t: usize, v: [[f32; 8]; 2]| {
                        for (r, lanes) in v.iter().enumerate().take(valid - pair) {
                            for (i, &y) in lanes.iter().enumerate() {
                                // SAFETY: element (8t + i, col + pair + r)
                                // belongs to this piece alone.
                                unsafe { *dst.at((8 * t + i) * n + col + pair + r) = y };
                            }
                        }
                    };
                    let mut t = t0;
                    while t + 2 <= t1 {
                        // SAFETY: as above.
                        let v =
                            unsafe { unpacked.gemm::<2>(isa, pair, [&tiles[t], &tiles[t + 1]]) };
                        store(t, [v[0][0], v[1][0]]);
                        store(t + 1, [v[0][1], v[1][1]]);
                        t += 2;
                    }
                    if t < t1 {
                        // SAFETY: as above.
                        let v = unsafe { unpacked.gemm::<1>(isa, pair, [&tiles[t]]) };
                        store(t, [v[0][0], v[1][0]]);
                    }
                }
            }
        }
        // The remaining input rows, in chunks that stay in cache while the
        // piece's groups pass over them.
        for r0 in (gemm_rows..m).step_by(64) {
            let r1 = (r0 + 64).min(m);
            for &(at, col, valid) in piece {
                let mut r = r0;
                let out = (n, col, valid);
                // SAFETY (all): the features were checked by the caller; the
                // group and the rows have the same blocks; elements (r0..r1,
                // col..col + valid) belong to this piece alone.
                unsafe {
                    if qtype == QType::Q4K {
                        rows_in_runs(xq, &mut r, r1, dst, out, |xs| q4k8_tile::<4>(isa, at.0, xs));
                        rows_in_runs(xq, &mut r, r1, dst, out, |xs| q4k8_tile::<1>(isa, at.0, xs));
                    } else {
                        rows_in_runs(xq, &mut r, r1, dst, out, |xs| q6k8_tile::<4>(isa, at.0, xs));
                        rows_in_runs(xq, &mut r, r1, dst, out, |xs| q6k8_tile::<1>(isa, at.0, xs));
                    }
                }
            }
        }
    });
}

/// The weight bytes, read by blocks of the parallel loop.
#[derive(Clone, Copy)]
struct SharedIn(*const u8);
// SAFETY: read-only while the matrix is borrowed.
unsafe impl Send for SharedIn {}
unsafe impl Sync for SharedIn {}

impl SharedIn {
    /// # Safety
    /// `i` is within the bytes.
    unsafe fn at(self, i: usize) -> *const u8 {
        self.0.add(i)
    }
}

/// One row of `qtype` data to f32 (dense types included).
pub fn dequantize_row(qtype: QType, bytes: &[u8], out: &mut [f32]) {
    match qtype {
        QType::F32 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        QType::F16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QType::BF16 => {
            for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
            }
        }
        QType::Q8_0 => BlockQ8_0::to_float(blocks(bytes), out),
        QType::Q4_0 => BlockQ4_0::to_float(blocks(bytes), out),
        QType::Q4K => dequantize_q4k(bytes, out),
        QType::Q5K => BlockQ5K::to_float(blocks(bytes), out),
        QType::Q6K => BlockQ6K::to_float(blocks(bytes), out),
        q if crate::portable::handles(q) => crate::portable::dequantize_row(q, bytes, out),
        q => crate::igrid::dequantize_row(q, bytes, out),
    }
}

/// Q4_K blocks to f32, as ggml's reference dequantizes them: per pair of
/// sub-blocks of 32, `d · scale · q − dmin · min` (no allocation, unlike
/// candle's, since an embedding lookup runs this per decoded token).
fn dequantize_q4k(bytes: &[u8], out: &mut [f32]) {
    for (b, y) in bytes.chunks_exact(144).zip(out.chunks_exact_mut(256)) {
        let f16_at = |i: usize| half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
        let (d, dmin) = (f16_at(0), f16_at(2));
        let scales = &b[4..16];
        for (c, y) in y.chunks_exact_mut(64).enumerate() {
            let q = &b[16 + 32 * c..16 + 32 * (c + 1)];
            let (sc1, m1) = crate::repack::scale_min(scales, 2 * c);
            let (sc2, m2) = crate::repack::scale_min(scales, 2 * c + 1);
            let (d1, min1) = (d * sc1 as f32, dmin * m1 as f32);
            let (d2, min2) = (d * sc2 as f32, dmin * m2 as f32);
            for (l, &q) in q.iter().enumerate() {
                y[l] = d1 * (q & 0x0F) as f32 - min1;
                y[32 + l] = d2 * (q >> 4) as f32 - min2;
            }
        }
    }
}

/// One row of f32 values encoded as `qtype` into `out` (`row_bytes` long).
pub fn quantize_row(qtype: QType, values: &[f32], out: &mut [u8]) {
    match qtype {
        QType::F32 => {
            for (c, v) in out.chunks_exact_mut(4).zip(values) {
                c.copy_from_slice(&v.to_le_bytes());
            }
        }
        QType::F16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&half::f16::from_f32(*v).to_le_bytes());
            }
        }
        QType::BF16 => {
            for (c, v) in out.chunks_exact_mut(2).zip(values) {
                c.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
            }
        }
        QType::Q8_0 => BlockQ8_0::from_float(values, blocks_mut(out)),
        QType::Q4_0 => BlockQ4_0::from_float(values, blocks_mut(out)),
        QType::Q4K => BlockQ4K::from_float(values, blocks_mut(out)),
        QType::Q5K => BlockQ5K::from_float(values, blocks_mut(out)),
        QType::Q6K => BlockQ6K::from_float(values, blocks_mut(out)),
        QType::Q4_1 => BlockQ4_1::from_float(values, blocks_mut(out)),
        QType::Q5_0 => BlockQ5_0::from_float(values, blocks_mut(out)),
        QType::Q5_1 => BlockQ5_1::from_float(values, blocks_mut(out)),
        QType::Q2K => BlockQ2K::from_float(values, blocks_mut(out)),
        QType::Q3K => BlockQ3K::from_float(values, blocks_mut(out)),
        q => panic!("{} cannot be encoded here (see QType::encodable)", q.name()),
    }
}

/// Encodes a whole row-major matrix (any type) into bytes, rows in parallel.
pub fn encode(qtype: QType, values: &[f32], cols: usize) -> Vec<u8> {
    let (words, len) = encode_words(qtype, values, cols);
    Bytes::Owned {
        words: Arc::new(words),
        len,
    }
    .as_slice()
    .to_vec()
}

/// Encodes rows into 8-byte-aligned storage (the block types need
/// alignment); returns the words and the byte length.
fn encode_words(qtype: QType, values: &[f32], cols: usize) -> (Vec<u64>, usize) {
    let rb = qtype.row_bytes(cols);
    let len = values.len() / cols * rb;
    let mut words = vec![0u64; len.div_ceil(8)];
    // SAFETY: `words` holds at least `len` bytes.
    let bytes = unsafe { std::slice::from_raw_parts_mut(words.as_mut_ptr() as *mut u8, len) };
    bytes
        .par_chunks_mut(rb)
        .zip(values.par_chunks(cols))
        .for_each(|(dst, src)| quantize_row(qtype, src, dst));
    (words, len)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_values as values;

    /// Quantization error relative to the values' scale, per type: the
    /// bits per weight bound how close a round trip can come.
    #[test]
    fn round_trips_are_close() {
        let (rows, cols) = (8, 512);
        let v = values(rows * cols, 1);
        for (q, tol) in [
            (QType::Q8_0, 0.01),
            (QType::Q6K, 0.03),
            (QType::Q5K, 0.06),
            (QType::Q4K, 0.12),
            (QType::Q4_0, 0.15),
        ] {
            let m = QMatrix::quantize(q, &v, rows, cols).unwrap();
            assert_eq!(m.file_bytes().len(), rows * q.row_bytes(cols));
            let back = m.dequantize();
            let err = lw_core::compare::max_abs_diff(&v, &back);
            assert!(err < tol, "{}: max error {err}", q.name());
            assert!(err > 0.0, "{}: a lossy type came back exact", q.name());
        }
    }

    /// The integer-dot product against the plain product of the dequantized
    /// weights with the activations.
    /// Our Q4_K dequantization gives candle's (ggml's reference) bits.
    #[test]
    fn q4k_rows_dequantize_as_candles() {
        let w = values(4 * 512, 9);
        let bytes = encode(QType::Q4K, &w, 512);
        let mut ours = vec![0f32; w.len()];
        let mut theirs = vec![0f32; w.len()];
        dequantize_q4k(&bytes, &mut ours);
        let owned = Bytes::owned(&bytes);
        BlockQ4K::to_float(blocks(owned.as_slice()), &mut theirs);
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&ours), bits(&theirs));
    }

    #[test]
    fn matmul_matches_dequantized_product() {
        let (n, k, m) = (37, 512, 19);
        let w = values(n * k, 2);
        let x = values(m * k, 3);
        for q in [QType::Q8_0, QType::Q4_0, QType::Q4K, QType::Q5K, QType::Q6K] {
            let qm = QMatrix::quantize(q, &w, n, k).unwrap();
            let wd = qm.dequantize();
            let mut out = vec![0f32; m * n];
            qm.matmul(&x, &mut out);
            for r in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|i| x[r * k + i] * wd[j * k + i]).sum();
                    let got = out[r * n + j];
                    // Activations are quantized to 8 bits: ~1% of the terms' scale.
                    assert!(
                        (got - want).abs() < 0.02 * (k as f32).sqrt(),
                        "{} ({r},{j}): {got} vs {want}",
                        q.name()
                    );
                }
            }
            // One row alone gives the same result as in a batch.
            let mut one = vec![0f32; n];
            qm.matmul(&x[k..2 * k], &mut one);
            assert_eq!(one, out[n..2 * n]);
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;

    /// `cargo test --release -p lw-model speed -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn matvec_throughput() {
        let (n, k) = (8192, 2048);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let x: Vec<f32> = (0..k).map(|i| (i % 13) as f32 / 13.0 - 0.5).collect();
        for q in [
            QType::Q8_0,
            QType::Q4K,
            QType::Q5K,
            QType::Q6K,
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
        ] {
            let m = QMatrix::quantize(q, &w, n, k).unwrap();
            let mut out = vec![0f32; n];
            m.matmul(&x, &mut out);
            let t = std::time::Instant::now();
            let reps = 50;
            for _ in 0..reps {
                m.matmul(&x, &mut out);
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            eprintln!(
                "{}: {:.2} ms per {n}x{k} matvec, {:.1} GB/s",
                q.name(),
                s * 1e3,
                m.bytes().len() as f64 / s / 1e9
            );
        }
        // candle's Q5_K product, which the group kernel replaced.
        let m = QMatrix::quantize(QType::Q5K, &w, n, k).unwrap();
        let mut out = vec![0f32; n];
        let t = std::time::Instant::now();
        for _ in 0..10 {
            m.matmul_as::<BlockQ5K>(&x, &mut out);
        }
        let s = t.elapsed().as_secs_f64() / 10.0;
        eprintln!("Q5_K (candle's): {:.2} ms per {n}x{k} matvec", s * 1e3);
    }
}

#[cfg(test)]
mod kernel_check {
    use super::*;

    /// The four-row kernels against candle's block dot products on the same
    /// quantized weights: both quantize the activations to 8 bits, so their
    /// errors against the exact product must be of the same size.
    #[test]
    fn a_rows_product_does_not_depend_on_the_rows_beside_it() {
        // Prefill multiplies four input rows per pass over a weight block,
        // decode one: the same bits either way (speculative decoding and
        // batching rely on it).
        // 27 input rows: two tiles of eight and one more through the K-quant
        // GEMM, then six, four and one through the row kernels; 37 weight
        // rows leave an odd pair at the end of a block.
        let (n, k, m) = (37, 512, 27);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 60.0)
            .collect();
        let x: Vec<f32> = (0..m * k)
            .map(|i| ((i * 53 % 97) as f32 - 48.0) / 40.0)
            .collect();
        for q in [
            QType::Q8_0,
            QType::Q4K,
            QType::Q5K,
            QType::Q6K,
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
        ] {
            let mat = QMatrix::quantize(q, &w, n, k).unwrap();
            let mut all = vec![0f32; m * n];
            mat.matmul(&x, &mut all);
            for r in 0..m {
                let mut one = vec![0f32; n];
                mat.matmul(&x[r * k..(r + 1) * k], &mut one);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(
                    bits(&all[r * n..(r + 1) * n]),
                    bits(&one),
                    "{} row {r}",
                    q.name()
                );
            }
        }
    }

    /// Grouped rows of `qtype` (`file`: 13 rows of `k`, a partial last
    /// group) give `reference`'s bits: through `matmul` (four input rows at
    /// a time, then one) and through `tile` (four rows) in every kernel set
    /// this CPU runs.
    #[cfg(target_arch = "x86_64")]
    fn check_group_bits(
        qtype: QType,
        file: &[u8],
        k: usize,
        reference: impl Fn(&[u8], &crate::kernels::QuantRow) -> f32,
        tile: impl Fn(Isa, *const u8, [&crate::kernels::QuantRow; 4]) -> [[f32; 8]; 4],
    ) {
        use crate::kernels::quantize_row;
        use crate::repack::{group_block, GROUP};
        let (n, m) = (13, 5);
        let x: Vec<f32> = crate::test_values(m * k, 22);
        let group = crate::portable::activation_group(qtype);
        let xq: Vec<_> = x.chunks(k).map(|r| quantize_row(r, group)).collect();
        let rb = qtype.row_bytes(k);
        let want = |r: usize, j: usize| reference(&file[j * rb..(j + 1) * rb], &xq[r]).to_bits();
        let mat = QMatrix::new(qtype, n, k, Bytes::owned(file)).unwrap();
        if !mat.is_packed() {
            eprintln!("SKIPPED: no vector kernels on this CPU");
            return;
        }
        let mut out = vec![0f32; m * n];
        mat.matmul(&x, &mut out);
        for r in 0..m {
            for j in 0..n {
                assert_eq!(
                    out[r * n + j].to_bits(),
                    want(r, j),
                    "{} ({r},{j})",
                    qtype.name()
                );
            }
        }
        let group_bytes = k / qtype.block_elems() * group_block(qtype);
        for isa in Isa::ALL.into_iter().filter(|i| i.runs_here()) {
            for g in 0..n.div_ceil(GROUP) {
                let at = mat.bytes()[g * group_bytes..].as_ptr();
                let v = tile(isa, at, [&xq[0], &xq[1], &xq[2], &xq[3]]);
                for (r, lanes) in v.iter().enumerate() {
                    for (l, y) in lanes.iter().enumerate().take(n - g * GROUP) {
                        let j = g * GROUP + l;
                        assert_eq!(
                            y.to_bits(),
                            want(r, j),
                            "{} {} ({r},{j})",
                            isa.name(),
                            qtype.name()
                        );
                    }
                }
            }
        }
    }

    /// The 32-weight types in groups of eight rows give the portable row
    /// product's bits, on rows of 576 (SmolLM2's width).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn small_groups_give_the_portable_bits() {
        use crate::kernels::small8_tile;
        use crate::repack::small;
        let k = 576;
        let w: Vec<f32> = crate::test_values(13 * k, 21);
        for qtype in [
            QType::Q4_0,
            QType::Q4_1,
            QType::Q5_0,
            QType::Q5_1,
            QType::IQ4NL,
        ] {
            // IQ4_NL has Q4_0's block layout: Q4_0's bytes are valid ones.
            let from = if qtype == QType::IQ4NL {
                QType::Q4_0
            } else {
                qtype
            };
            let file = encode(from, &w, k);
            let reference = |w: &[u8], x: &_| crate::portable::dot(qtype, w, x);
            // SAFETY (each): the CPU runs `isa`; the group and rows have k / 32 blocks.
            let tile = |isa: Isa, at: *const u8, xs: [&crate::kernels::QuantRow; 4]| unsafe {
                match small::code(qtype).unwrap() {
                    small::Q4_0 => small8_tile::<{ small::Q4_0 }, 4>(isa, at, xs),
                    small::Q4_1 => small8_tile::<{ small::Q4_1 }, 4>(isa, at, xs),
                    small::Q5_0 => small8_tile::<{ small::Q5_0 }, 4>(isa, at, xs),
                    small::Q5_1 => small8_tile::<{ small::Q5_1 }, 4>(isa, at, xs),
                    _ => small8_tile::<{ small::IQ4_NL }, 4>(isa, at, xs),
                }
            };
            check_group_bits(qtype, &file, k, reference, tile);
        }
    }

    /// Q5_K in groups of eight rows gives its portable definition's bits,
    /// and stays close to the dequantized product.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q5k_groups_give_the_portable_bits() {
        use crate::kernels::q5k8_tile;
        let (n, k) = (13, 512);
        let w: Vec<f32> = crate::test_values(n * k, 31);
        let file = encode(QType::Q5K, &w, k);
        // SAFETY: the CPU runs `isa`; the group and rows have k / 256 blocks.
        let tile = |isa: Isa, at: *const u8, xs: [&crate::kernels::QuantRow; 4]| unsafe {
            q5k8_tile::<4>(isa, at, xs)
        };
        check_group_bits(QType::Q5K, &file, k, crate::portable::q5k_dot, tile);
        let mat = QMatrix::new(QType::Q5K, n, k, Bytes::owned(&file)).unwrap();
        let (wd, x) = (mat.dequantize(), crate::test_values(k, 22));
        let mut out = vec![0f32; n];
        mat.matmul(&x, &mut out);
        for j in 0..n {
            let exact: f32 = (0..k).map(|i| x[i] * wd[j * k + i]).sum();
            assert!((out[j] - exact).abs() < 0.02 * (k as f32).sqrt(), "row {j}");
        }
    }

    /// The prefill GEMM of grouped rows of `qtype` (`file`: 13 rows of `k`,
    /// a partial last group) gives `reference`'s bits: through `matmul` (19
    /// input rows: two tiles of eight through the GEMM, three through the
    /// tile kernels) and through `gemm` (one tile of eight input rows against
    /// one group, returning `[weight row][input row]`) in every kernel set
    /// this CPU runs. The portable product ([`QMatrix::matmul_rows`], what
    /// CPUs without the kernels run) gives the same bits.
    #[cfg(target_arch = "x86_64")]
    fn check_gemm_bits(
        qtype: QType,
        file: &[u8],
        k: usize,
        reference: impl Fn(&[u8], &crate::kernels::QuantRow) -> f32,
        gemm: impl Fn(Isa, *const u8, &[crate::kernels::QuantRow]) -> [[f32; 8]; 8],
    ) {
        use crate::kernels::quantize_row;
        use crate::repack::{group_block, GROUP};
        let (n, m) = (13, 19);
        let x: Vec<f32> = crate::test_values(m * k, 23);
        let group = crate::portable::activation_group(qtype);
        let xq: Vec<_> = x.chunks(k).map(|r| quantize_row(r, group)).collect();
        let rb = qtype.row_bytes(k);
        let want = |r: usize, j: usize| reference(&file[j * rb..(j + 1) * rb], &xq[r]).to_bits();
        let mat = QMatrix::new(qtype, n, k, Bytes::owned(file)).unwrap();
        if !mat.is_packed() {
            eprintln!("SKIPPED: no vector kernels on this CPU");
            return;
        }
        let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
        let mut out = vec![0f32; m * n];
        mat.matmul(&x, &mut out);
        let wanted: Vec<u32> = (0..m * n).map(|e| want(e / n, e % n)).collect();
        assert_eq!(bits(&out), wanted, "{} matmul", qtype.name());
        let mut portable = vec![0f32; m * n];
        mat.matmul_rows(&x, &mut portable);
        assert_eq!(bits(&portable), wanted, "{} portable", qtype.name());
        let group_bytes = k / qtype.block_elems() * group_block(qtype);
        for isa in Isa::ALL.into_iter().filter(|i| i.runs_here()) {
            for g in 0..n.div_ceil(GROUP) {
                let at = mat.bytes()[g * group_bytes..].as_ptr();
                let v = gemm(isa, at, &xq[8..16]);
                for (l, rows) in v.iter().enumerate().take(n - g * GROUP) {
                    for (i, y) in rows.iter().enumerate() {
                        let (r, j) = (8 + i, g * GROUP + l);
                        assert_eq!(
                            y.to_bits(),
                            want(r, j),
                            "{} {} GEMM ({r},{j})",
                            isa.name(),
                            qtype.name()
                        );
                    }
                }
            }
        }
    }

    /// Q8_0 in groups of eight rows gives its scalar definition's bits
    /// ([`crate::kernels::q8_0_dot`]), in the decode tile and in the
    /// prefill GEMM, on rows of 576.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q8_0_groups_give_the_scalar_bits() {
        use crate::kernels::{q8_0_dot, q8_0_gemm, q8_0x8_tile, WideRows, WideTile};
        let k = 576;
        let file = encode(QType::Q8_0, &crate::test_values(13 * k, 41), k);
        // SAFETY: the CPU runs `isa`; the group and rows have k / 32 blocks.
        let tile = |isa: Isa, at: *const u8, xs: [&crate::kernels::QuantRow; 4]| unsafe {
            q8_0x8_tile::<4>(isa, at, xs)
        };
        check_group_bits(QType::Q8_0, &file, k, q8_0_dot, tile);
        let gemm = |isa: Isa, at: *const u8, xs: &[crate::kernels::QuantRow]| {
            let mut wide = WideRows::default();
            let tile = WideTile::new(xs);
            // SAFETY: `at` is a whole group of k / 32 blocks; the CPU runs
            // `isa`, and the tile has k values per row.
            let (a, b) = unsafe {
                wide.fill_groups(k, std::iter::once(at));
                (
                    q8_0_gemm::<4, 1>(isa, &wide, 0, [&tile]),
                    q8_0_gemm::<4, 1>(isa, &wide, 4, [&tile]),
                )
            };
            std::array::from_fn(|r| if r < 4 { a[r][0] } else { b[r - 4][0] })
        };
        check_gemm_bits(QType::Q8_0, &file, k, q8_0_dot, gemm);
    }

    /// Q4_K in groups of eight rows gives its scalar definition's bits
    /// ([`crate::kernels::q4k_dot`]), in the decode tile and in the prefill
    /// GEMM.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4k_groups_give_the_scalar_bits() {
        use crate::kernels::{q4k8_tile, q4k_dot, q4k_gemm, ActTile, Q4kRow};
        let k = 768;
        let file = encode(QType::Q4K, &crate::test_values(13 * k, 42), k);
        // SAFETY: the CPU runs `isa`; the group and rows have k / 256 blocks.
        let tile = |isa: Isa, at: *const u8, xs: [&crate::kernels::QuantRow; 4]| unsafe {
            q4k8_tile::<4>(isa, at, xs)
        };
        check_group_bits(QType::Q4K, &file, k, q4k_dot, tile);
        let gemm = |isa: Isa, at: *const u8, xs: &[crate::kernels::QuantRow]| {
            let mut rows: Box<[Q4kRow; 8]> = Default::default();
            let tile = ActTile::new(xs);
            let mut out = [[0f32; 8]; 8];
            // SAFETY: `at` is a whole group of k / 256 blocks; the CPU runs
            // `isa` (AVX2 included), and the tile has as many blocks.
            unsafe {
                Q4kRow::unpack_group(&mut rows, at, k / 256);
                for p in (0..8).step_by(2) {
                    let v = q4k_gemm::<1>(isa, [&rows[p], &rows[p + 1]], [&tile]);
                    (out[p], out[p + 1]) = (v[0][0], v[1][0]);
                }
            }
            out
        };
        check_gemm_bits(QType::Q4K, &file, k, q4k_dot, gemm);
    }

    /// Q6_K in groups of eight rows gives its scalar definition's bits
    /// ([`crate::kernels::q6k_dot`]), in the decode tile and in the prefill
    /// GEMM.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q6k_groups_give_the_scalar_bits() {
        use crate::kernels::{q6k8_tile, q6k_dot, q6k_gemm, ActTile, Q6kRow};
        let k = 768;
        let file = encode(QType::Q6K, &crate::test_values(13 * k, 43), k);
        // SAFETY: the CPU runs `isa`; the group and rows have k / 256 blocks.
        let tile = |isa: Isa, at: *const u8, xs: [&crate::kernels::QuantRow; 4]| unsafe {
            q6k8_tile::<4>(isa, at, xs)
        };
        check_group_bits(QType::Q6K, &file, k, q6k_dot, tile);
        let gemm = |isa: Isa, at: *const u8, xs: &[crate::kernels::QuantRow]| {
            let mut rows: Box<[Q6kRow; 8]> = Default::default();
            let tile = ActTile::new(xs);
            let mut out = [[0f32; 8]; 8];
            // SAFETY: as for Q4_K's.
            unsafe {
                Q6kRow::unpack_group(&mut rows, at, k / 256);
                for p in (0..8).step_by(2) {
                    let v = q6k_gemm::<1>(isa, [&rows[p], &rows[p + 1]], [&tile]);
                    (out[p], out[p + 1]) = (v[0][0], v[1][0]);
                }
            }
            out
        };
        check_gemm_bits(QType::Q6K, &file, k, q6k_dot, gemm);
    }

    #[test]
    fn own_kernels_are_as_close_as_candles() {
        let (n, k) = (64, 1024);
        let mut s = 7u64;
        let mut next = || {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f32 / (1u64 << 31) as f32) * 2.0 - 1.0
        };
        let w: Vec<f32> = (0..n * k).map(|_| next()).collect();
        let x: Vec<f32> = (0..k).map(|_| next()).collect();
        for q in [QType::Q8_0, QType::Q4K, QType::Q6K] {
            let m = QMatrix::quantize(q, &w, n, k).unwrap();
            let wd = m.dequantize();
            let exact: Vec<f32> = (0..n)
                .map(|j| (0..k).map(|i| x[i] * wd[j * k + i]).sum())
                .collect();
            let mut ours = vec![0f32; n];
            m.matmul(&x, &mut ours);
            let mut theirs = vec![0f32; n];
            match q {
                QType::Q8_0 => m.matmul_as::<BlockQ8_0>(&x, &mut theirs),
                QType::Q4K => m.matmul_as::<BlockQ4K>(&x, &mut theirs),
                _ => m.matmul_as::<BlockQ6K>(&x, &mut theirs),
            }
            let err = |v: &[f32]| lw_core::compare::max_abs_diff(v, &exact);
            let (e_ours, e_theirs) = (err(&ours), err(&theirs));
            eprintln!(
                "{}: max error ours {e_ours:.5}, candle {e_theirs:.5}",
                q.name()
            );
            assert!(
                e_ours < 2.0 * e_theirs + 1e-3,
                "{}: {e_ours} vs {e_theirs}",
                q.name()
            );
        }
    }
}
