//! Causal attention over packed rows in tiles, with an online softmax
//! forward and a recomputing backward (the FlashAttention recurrences), so
//! that no `[len × len]` matrix is ever built: memory grows linearly with
//! the row length.
//!
//! A row holds several sequences one after another (`segments`, each a
//! contiguous run of one id); a query attends to the keys of its own
//! sequence up to itself, so query `i` sees exactly the keys
//! `start(i) ..= i`, where `start(i)` is the first position of its run.
//!
//! Forward, per query row `i` and key tile `J`, with `s_ij = q_i·k_j · scale`:
//! `m' = max(m, max_J s)`, `l ← l·e^(m−m') + Σ_J e^(s−m')`,
//! `acc ← acc·e^(m−m') + Σ_J e^(s−m') v_j`; at the end `o_i = acc / l` and
//! the log-sum-exp `lse_i = m + ln l` is kept for the backward pass.
//!
//! Backward, with `p_ij = e^(s_ij − lse_i)` recomputed tile by tile and
//! `D_i = dO_i · o_i`: `dv_j = Σ_i p_ij dO_i`, `ds_ij = p_ij (dO_i·v_j − D_i)`,
//! `dk_j = scale Σ_i ds_ij q_i`, `dq_i = scale Σ_j ds_ij k_j`. Key/value
//! gradients are computed per key tile (each owns its rows of `dk`, `dv`)
//! and query gradients per query tile, so threads never share an
//! accumulator.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use rayon::prelude::*;

use crate::error::TrainError;

/// Rows per query tile and keys per key tile.
pub const BLOCK: usize = 64;

/// The shapes of one attention call: queries `[rows, heads, len, head_dim]`,
/// keys and values `[rows, kv_heads, len, head_dim]`; query head `h` reads
/// key/value head `h / (heads / kv_heads)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dims {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub len: usize,
    pub head_dim: usize,
}

impl Dims {
    fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}

/// The attention operation for one batch (see the module documentation).
pub struct FlashAttention {
    dims: Dims,
    scale: f32,
    block: usize,
    /// Whether the tile loops run in their AVX2/FMA build.
    fused: bool,
    /// The backward pass in two passes even where there are heads enough
    /// for one (tests check both).
    two_passes: bool,
    /// Per `(row, position)`: the first position of its sequence.
    start: Arc<Vec<u32>>,
    /// Token-major inputs and output with rotary embeddings applied
    /// inside (see [`FlashAttention::with_rope`]).
    rope: Option<Arc<Rope>>,
    /// Per `(row, head, position)`: the forward pass's log-sum-exp.
    lse: Mutex<Vec<f32>>,
}

/// Rotary tables per `(row, position)`: `cos` and `sin` of each of the
/// `head_dim / 2` frequencies, in the halves layout (`x_i` and
/// `x_{i + d/2}` rotate together).
#[derive(Debug, Clone, PartialEq)]
pub struct Rope {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
}

impl FlashAttention {
    /// `segments` is the batch's `[rows · len]` sequence ids; each id must
    /// form one contiguous run within its row.
    pub fn new(dims: Dims, segments: &[u32], scale: f32) -> Result<Self, TrainError> {
        let Dims {
            rows,
            heads,
            kv_heads,
            len,
            head_dim,
        } = dims;
        if rows * len != segments.len() {
            return Err(TrainError::Setting(format!(
                "attention: {} segment ids for {rows} rows of {len} positions",
                segments.len()
            )));
        }
        if heads == 0 || kv_heads == 0 || heads % kv_heads != 0 || head_dim == 0 {
            return Err(TrainError::Setting(format!(
                "attention: {heads} query heads cannot share {kv_heads} key/value heads"
            )));
        }
        let mut start = vec![0u32; rows * len];
        for r in 0..rows {
            let seg = &segments[r * len..(r + 1) * len];
            let mut first = 0usize;
            for i in 0..len {
                if i > 0 && seg[i] != seg[i - 1] {
                    if seg[..i].contains(&seg[i]) {
                        return Err(TrainError::Setting(format!(
                            "attention: row {r} returns to sequence {} at position {i}; \
                             a sequence must be one contiguous run",
                            seg[i]
                        )));
                    }
                    first = i;
                }
                start[r * len + i] = first as u32;
            }
        }
        Ok(Self {
            dims,
            scale,
            block: BLOCK,
            fused: fused(),
            two_passes: false,
            rope: None,
            start: Arc::new(start),
            lse: Mutex::new(Vec::new()),
        })
    }

    /// The same operation for another layer of the same batch.
    pub fn for_layer(&self) -> Self {
        Self {
            dims: self.dims,
            scale: self.scale,
            block: self.block,
            fused: self.fused,
            two_passes: self.two_passes,
            rope: self.rope.clone(),
            start: Arc::clone(&self.start),
            lse: Mutex::new(Vec::new()),
        }
    }

    /// Tiles of `block` rows and keys instead of [`BLOCK`] (tests use small
    /// tiles to cross many tile edges on short rows).
    pub fn with_block(mut self, block: usize) -> Self {
        self.block = block.max(1);
        self
    }

    /// Queries, keys and values as the projections give them, token-major
    /// (`[rows · len, heads · head_dim]`, heads side by side), with the
    /// rotary embedding of `rope` applied to q and k inside the operation
    /// (and its transpose to their gradients), the output token-major too:
    /// no transposed copies and no elementwise rotary ops in the graph.
    pub fn with_rope(mut self, rope: Rope) -> Result<Self, TrainError> {
        let d = self.dims;
        let want = d.rows * d.len * d.head_dim / 2;
        if !d.head_dim.is_multiple_of(2) || rope.cos.len() != want || rope.sin.len() != want {
            return Err(TrainError::Setting(format!(
                "attention: rotary tables of {} and {} values for {want}",
                rope.cos.len(),
                rope.sin.len()
            )));
        }
        self.rope = Some(Arc::new(rope));
        Ok(self)
    }

    /// The backward pass's two-pass form (key tiles, then query tiles),
    /// which it takes by itself when there are fewer key/value heads than
    /// twice the threads.
    pub fn two_passes(mut self) -> Self {
        self.two_passes = true;
        self
    }

    /// The plain build of the tile loops even where the CPU has AVX2 and
    /// FMA (tests check that both builds agree with the reference).
    pub fn portable(mut self) -> Self {
        self.fused = false;
        self
    }

    /// `softmax(q kᵀ · scale + mask) v`, `[rows, heads, len, head_dim]`.
    /// (With [`FlashAttention::with_rope`]: `[rows · len, heads · head_dim]`
    /// in and out.)
    pub fn apply(self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor, TrainError> {
        let d = self.dims;
        let (want_q, want_kv) = if self.rope.is_some() {
            (
                vec![d.rows * d.len, d.heads * d.head_dim],
                vec![d.rows * d.len, d.kv_heads * d.head_dim],
            )
        } else {
            (
                vec![d.rows, d.heads, d.len, d.head_dim],
                vec![d.rows, d.kv_heads, d.len, d.head_dim],
            )
        };
        for (name, t, want) in [("q", q, &want_q), ("k", k, &want_kv), ("v", v, &want_kv)] {
            if t.dims() != want.as_slice() {
                return Err(TrainError::Setting(format!(
                    "attention: {name} has shape {:?}, expected {want:?}",
                    t.dims()
                )));
            }
        }
        Ok(q.contiguous()?
            .apply_op3(&k.contiguous()?, &v.contiguous()?, self)?)
    }
}

/// Whether this CPU runs the AVX2/FMA build of the tile loops.
fn fused() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `acc + x·y`, fused where `F` (only in builds compiled with FMA).
#[inline(always)]
fn madd<const F: bool>(acc: f32, x: f32, y: f32) -> f32 {
    if F {
        x.mul_add(y, acc)
    } else {
        acc + x * y
    }
}

/// `Σ a_i b_i` with sixteen running sums, so that the loop vectorizes.
#[inline(always)]
fn dot<const F: bool>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for t in 0..16 {
            acc[t] = madd::<F>(acc[t], x[t], y[t]);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += alpha · x`.
#[inline(always)]
fn axpy<const F: bool>(y: &mut [f32], alpha: f32, x: &[f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y = madd::<F>(*y, alpha, *x);
    }
}

/// `e^x` for each element (relative error below 2e-7 on the range the
/// softmax uses, `x ≤ 0`), in a form that vectorizes: `x = n·ln2 + r`,
/// `|r| ≤ ln2/2`, `e^r` by its degree-6 Taylor polynomial, `2^n` by
/// building the exponent bits.
#[inline(always)]
fn exp_in_place<const F: bool>(xs: &mut [f32]) {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    // Adding and removing 1.5·2²³ rounds to the nearest integer.
    const ROUND: f32 = 12_582_912.0;
    for x in xs.iter_mut() {
        let v = x.clamp(-87.0, 88.0);
        let n = (v * LOG2E + ROUND) - ROUND;
        let r = madd::<F>(madd::<F>(v, -n, LN2_HI), -n, LN2_LO);
        let mut p = 1.0 / 720.0;
        p = madd::<F>(1.0 / 120.0, p, r);
        p = madd::<F>(1.0 / 24.0, p, r);
        p = madd::<F>(1.0 / 6.0, p, r);
        p = madd::<F>(0.5, p, r);
        p = madd::<F>(1.0, p, r);
        p = madd::<F>(1.0, p, r);
        *x = p * f32::from_bits(((n as i32 + 127) as u32) << 23);
    }
}

/// `e^x` for each element of `xs` (see [`exp_in_place`]), in the AVX2/FMA
/// build where the CPU has it.
pub(crate) fn exp_slice(xs: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fused() {
        // SAFETY: `fused` checked for AVX2 and FMA.
        unsafe { fma::exp_slice(xs) };
        return;
    }
    exp_in_place::<false>(xs);
}

/// One head's slices for a tile: queries (or their gradients' rows) and
/// the key/value head they read.
struct Head<'a> {
    q: &'a [f32],
    dout: &'a [f32],
    lse: &'a [f32],
    delta: &'a [f32],
}

/// One key/value head and the sequence starts of its row.
struct Keys<'a> {
    k: &'a [f32],
    v: &'a [f32],
    start: &'a [u32],
}

impl FlashAttention {
    /// Output rows `i0 ..` (as many as `lse` holds) of one head.
    #[inline(always)]
    fn forward_tile<const F: bool>(
        &self,
        q: &[f32],
        keys: &Keys,
        i0: usize,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        let Keys { k, v, start } = *keys;
        let hd = self.dims.head_dim;
        let bs = self.block;
        let n = lse.len();
        let mut m = vec![f32::NEG_INFINITY; n];
        let mut l = vec![0f32; n];
        let mut s = vec![0f32; bs];
        let last = i0 + n - 1;
        let mut j0 = start[i0] as usize;
        while j0 <= last {
            let j1 = (j0 + bs).min(last + 1);
            for a in 0..n {
                let i = i0 + a;
                let lo = (start[i] as usize).max(j0);
                let hi = i.min(j1 - 1);
                if lo > hi {
                    continue;
                }
                let qi = &q[i * hd..(i + 1) * hd];
                let s = &mut s[..hi - lo + 1];
                let mut mx = f32::NEG_INFINITY;
                for (c, s) in s.iter_mut().enumerate() {
                    let j = lo + c;
                    *s = dot::<F>(qi, &k[j * hd..(j + 1) * hd]) * self.scale;
                    mx = mx.max(*s);
                }
                let m_new = m[a].max(mx);
                let keep = (m[a] - m_new).exp();
                let acc = &mut out[a * hd..(a + 1) * hd];
                if keep != 1.0 {
                    acc.iter_mut().for_each(|x| *x *= keep);
                }
                s.iter_mut().for_each(|x| *x -= m_new);
                exp_in_place::<F>(s);
                let mut sum = 0f32;
                for (c, &p) in s.iter().enumerate() {
                    sum += p;
                    let j = lo + c;
                    axpy::<F>(acc, p, &v[j * hd..(j + 1) * hd]);
                }
                l[a] = l[a] * keep + sum;
                m[a] = m_new;
            }
            j0 = j1;
        }
        for a in 0..n {
            let inv = 1.0 / l[a];
            out[a * hd..(a + 1) * hd].iter_mut().for_each(|x| *x *= inv);
            lse[a] = m[a] + l[a].ln();
        }
    }

    /// Key/value gradient rows `j0 ..` (as many as `dk` holds) of one
    /// key/value head, from every query head of its group.
    #[inline(always)]
    fn kv_tile<const F: bool>(
        &self,
        heads: &[Head],
        keys: &Keys,
        j0: usize,
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        let Keys { k, v, start } = *keys;
        let hd = self.dims.head_dim;
        let j1 = j0 + dk.len() / hd;
        let mut p = vec![0f32; self.block];
        for head in heads {
            for (i, &lo) in start.iter().enumerate().skip(j0) {
                let lo = lo as usize;
                if lo >= j1 {
                    break;
                }
                let lo = lo.max(j0);
                let hi = i.min(j1 - 1);
                let qi = &head.q[i * hd..(i + 1) * hd];
                let di = &head.dout[i * hd..(i + 1) * hd];
                let (li, dli) = (head.lse[i], head.delta[i]);
                let p = &mut p[..hi - lo + 1];
                for (c, p) in p.iter_mut().enumerate() {
                    let j = lo + c;
                    *p = dot::<F>(qi, &k[j * hd..(j + 1) * hd]) * self.scale - li;
                }
                exp_in_place::<F>(p);
                for (c, &p) in p.iter().enumerate() {
                    let j = lo + c;
                    let t = j - j0;
                    axpy::<F>(&mut dv[t * hd..(t + 1) * hd], p, di);
                    let ds = p * (dot::<F>(di, &v[j * hd..(j + 1) * hd]) - dli);
                    axpy::<F>(&mut dk[t * hd..(t + 1) * hd], ds * self.scale, qi);
                }
            }
        }
    }

    /// Key tile `j0 ..` (as many rows as `dk` holds) of one key/value head
    /// in one pass: its key and value gradients, and what it adds to the
    /// query gradients of every head of the group (`dq`: the group's heads
    /// one after another, `[group, len, head_dim]`).
    #[inline(always)]
    fn group_tile<const F: bool>(
        &self,
        heads: &[Head],
        keys: &Keys,
        j0: usize,
        dk: &mut [f32],
        dv: &mut [f32],
        dq: &mut [f32],
    ) {
        let Keys { k, v, start } = *keys;
        let hd = self.dims.head_dim;
        let len = self.dims.len;
        let j1 = j0 + dk.len() / hd;
        let mut p = vec![0f32; self.block];
        for (head, dq) in heads.iter().zip(dq.chunks_mut(len * hd)) {
            for (i, &lo) in start.iter().enumerate().skip(j0) {
                let lo = lo as usize;
                if lo >= j1 {
                    break;
                }
                let lo = lo.max(j0);
                let hi = i.min(j1 - 1);
                let qi = &head.q[i * hd..(i + 1) * hd];
                let di = &head.dout[i * hd..(i + 1) * hd];
                let (li, dli) = (head.lse[i], head.delta[i]);
                let p = &mut p[..hi - lo + 1];
                for (c, p) in p.iter_mut().enumerate() {
                    let j = lo + c;
                    *p = dot::<F>(qi, &k[j * hd..(j + 1) * hd]) * self.scale - li;
                }
                exp_in_place::<F>(p);
                let dqi = &mut dq[i * hd..(i + 1) * hd];
                for (c, &p) in p.iter().enumerate() {
                    let j = lo + c;
                    let t = j - j0;
                    let kj = &k[j * hd..(j + 1) * hd];
                    axpy::<F>(&mut dv[t * hd..(t + 1) * hd], p, di);
                    let ds = p * (dot::<F>(di, &v[j * hd..(j + 1) * hd]) - dli) * self.scale;
                    axpy::<F>(&mut dk[t * hd..(t + 1) * hd], ds, qi);
                    axpy::<F>(dqi, ds, kj);
                }
            }
        }
    }

    /// Query gradient rows `i0 ..` (as many as `dq` holds) of one head.
    #[inline(always)]
    fn q_tile<const F: bool>(&self, head: &Head, keys: &Keys, i0: usize, dq: &mut [f32]) {
        let Keys { k, v, start } = *keys;
        let hd = self.dims.head_dim;
        let bs = self.block;
        let n = dq.len() / hd;
        let last = i0 + n - 1;
        let mut p = vec![0f32; bs];
        let mut j0 = start[i0] as usize;
        while j0 <= last {
            let j1 = (j0 + bs).min(last + 1);
            for a in 0..n {
                let i = i0 + a;
                let lo = (start[i] as usize).max(j0);
                let hi = i.min(j1 - 1);
                if lo > hi {
                    continue;
                }
                let qi = &head.q[i * hd..(i + 1) * hd];
                let di = &head.dout[i * hd..(i + 1) * hd];
                let (li, dli) = (head.lse[i], head.delta[i]);
                let p = &mut p[..hi - lo + 1];
                for (c, p) in p.iter_mut().enumerate() {
                    let j = lo + c;
                    *p = dot::<F>(qi, &k[j * hd..(j + 1) * hd]) * self.scale - li;
                }
                exp_in_place::<F>(p);
                let acc = &mut dq[a * hd..(a + 1) * hd];
                for (c, &p) in p.iter().enumerate() {
                    let j = lo + c;
                    let ds = p * (dot::<F>(di, &v[j * hd..(j + 1) * hd]) - dli);
                    axpy::<F>(acc, ds * self.scale, &k[j * hd..(j + 1) * hd]);
                }
            }
            j0 = j1;
        }
    }
}

/// The tile loops compiled for AVX2 with FMA, chosen at run time.
#[cfg(target_arch = "x86_64")]
mod fma {
    use super::{FlashAttention, Head, Keys};

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn forward_tile(
        op: &FlashAttention,
        q: &[f32],
        keys: &Keys,
        i0: usize,
        out: &mut [f32],
        lse: &mut [f32],
    ) {
        op.forward_tile::<true>(q, keys, i0, out, lse)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn kv_tile(
        op: &FlashAttention,
        heads: &[Head],
        keys: &Keys,
        j0: usize,
        dk: &mut [f32],
        dv: &mut [f32],
    ) {
        op.kv_tile::<true>(heads, keys, j0, dk, dv)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn exp_slice(xs: &mut [f32]) {
        super::exp_in_place::<true>(xs)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn group_tile(
        op: &FlashAttention,
        heads: &[Head],
        keys: &Keys,
        j0: usize,
        dk: &mut [f32],
        dv: &mut [f32],
        dq: &mut [f32],
    ) {
        op.group_tile::<true>(heads, keys, j0, dk, dv, dq)
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn q_tile(
        op: &FlashAttention,
        head: &Head,
        keys: &Keys,
        i0: usize,
        dq: &mut [f32],
    ) {
        op.q_tile::<true>(head, keys, i0, dq)
    }
}

impl FlashAttention {
    /// Output and log-sum-exp for every query.
    fn forward(&self, q: &[f32], k: &[f32], v: &[f32]) -> (Vec<f32>, Vec<f32>) {
        let Dims {
            rows,
            heads,
            kv_heads,
            len,
            head_dim: hd,
        } = self.dims;
        let g = self.dims.group();
        let bs = self.block;
        let fused = self.fused;
        let mut out = vec![0f32; rows * heads * len * hd];
        let mut lse = vec![0f32; rows * heads * len];
        out.par_chunks_mut(len * hd)
            .zip(lse.par_chunks_mut(len))
            .enumerate()
            .for_each(|(rh, (out, lse))| {
                let (r, h) = (rh / heads, rh % heads);
                let kvh = r * kv_heads + h / g;
                let q = &q[rh * len * hd..(rh + 1) * len * hd];
                let keys = Keys {
                    k: &k[kvh * len * hd..(kvh + 1) * len * hd],
                    v: &v[kvh * len * hd..(kvh + 1) * len * hd],
                    start: &self.start[r * len..(r + 1) * len],
                };
                out.par_chunks_mut(bs * hd)
                    .zip(lse.par_chunks_mut(bs))
                    .enumerate()
                    .for_each(|(tile, (out, lse))| {
                        let i0 = tile * bs;
                        #[cfg(target_arch = "x86_64")]
                        if fused {
                            // SAFETY: `fused` checked for AVX2 and FMA.
                            unsafe { fma::forward_tile(self, q, &keys, i0, out, lse) };
                            return;
                        }
                        self.forward_tile::<false>(q, &keys, i0, out, lse);
                    });
            });
        (out, lse)
    }

    /// Gradients of q, k and v given the output `o` and its gradient `dout`.
    fn backward(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        o: &[f32],
        dout: &[f32],
        lse: &[f32],
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        let Dims {
            rows,
            heads,
            kv_heads,
            len,
            head_dim: hd,
        } = self.dims;
        let g = self.dims.group();
        let bs = self.block;
        let fused = self.fused;
        let delta: Vec<f32> = o
            .par_chunks(hd)
            .zip(dout.par_chunks(hd))
            .map(|(o, d)| dot::<false>(o, d))
            .collect();
        let head = |rh: usize| Head {
            q: &q[rh * len * hd..(rh + 1) * len * hd],
            dout: &dout[rh * len * hd..(rh + 1) * len * hd],
            lse: &lse[rh * len..(rh + 1) * len],
            delta: &delta[rh * len..(rh + 1) * len],
        };

        let mut dk = vec![0f32; rows * kv_heads * len * hd];
        let mut dv = vec![0f32; rows * kv_heads * len * hd];
        let mut dq = vec![0f32; rows * heads * len * hd];
        if !self.two_passes && rows * kv_heads >= 2 * rayon::current_num_threads() {
            // Enough key/value heads to keep every thread busy: one pass per
            // head, which owns its keys' gradients and its group's queries'.
            dk.par_chunks_mut(len * hd)
                .zip(dv.par_chunks_mut(len * hd))
                .zip(dq.par_chunks_mut(g * len * hd))
                .enumerate()
                .for_each(|(rk, ((dk, dv), dq))| {
                    let (r, kh) = (rk / kv_heads, rk % kv_heads);
                    let keys = Keys {
                        k: &k[rk * len * hd..(rk + 1) * len * hd],
                        v: &v[rk * len * hd..(rk + 1) * len * hd],
                        start: &self.start[r * len..(r + 1) * len],
                    };
                    let group: Vec<Head> = (kh * g..(kh + 1) * g)
                        .map(|h| head(r * heads + h))
                        .collect();
                    for (tile, (dk, dv)) in dk
                        .chunks_mut(bs * hd)
                        .zip(dv.chunks_mut(bs * hd))
                        .enumerate()
                    {
                        let j0 = tile * bs;
                        #[cfg(target_arch = "x86_64")]
                        if fused {
                            // SAFETY: `fused` checked for AVX2 and FMA.
                            unsafe { fma::group_tile(self, &group, &keys, j0, dk, dv, dq) };
                            continue;
                        }
                        self.group_tile::<false>(&group, &keys, j0, dk, dv, dq);
                    }
                });
            return (dq, dk, dv);
        }

        // Otherwise two passes. Keys and values, one key tile at a time:
        // every query that sees it.
        dk.par_chunks_mut(len * hd)
            .zip(dv.par_chunks_mut(len * hd))
            .enumerate()
            .for_each(|(rk, (dk, dv))| {
                let (r, kh) = (rk / kv_heads, rk % kv_heads);
                let keys = Keys {
                    k: &k[rk * len * hd..(rk + 1) * len * hd],
                    v: &v[rk * len * hd..(rk + 1) * len * hd],
                    start: &self.start[r * len..(r + 1) * len],
                };
                let group: Vec<Head> = (kh * g..(kh + 1) * g)
                    .map(|h| head(r * heads + h))
                    .collect();
                dk.par_chunks_mut(bs * hd)
                    .zip(dv.par_chunks_mut(bs * hd))
                    .enumerate()
                    .for_each(|(tile, (dk, dv))| {
                        let j0 = tile * bs;
                        #[cfg(target_arch = "x86_64")]
                        if fused {
                            // SAFETY: `fused` checked for AVX2 and FMA.
                            unsafe { fma::kv_tile(self, &group, &keys, j0, dk, dv) };
                            return;
                        }
                        self.kv_tile::<false>(&group, &keys, j0, dk, dv);
                    });
            });

        // Queries, one query tile at a time: every key it sees.
        dq.par_chunks_mut(len * hd)
            .enumerate()
            .for_each(|(rh, dq)| {
                let (r, h) = (rh / heads, rh % heads);
                let kvh = r * kv_heads + h / g;
                let keys = Keys {
                    k: &k[kvh * len * hd..(kvh + 1) * len * hd],
                    v: &v[kvh * len * hd..(kvh + 1) * len * hd],
                    start: &self.start[r * len..(r + 1) * len],
                };
                let head = head(rh);
                dq.par_chunks_mut(bs * hd)
                    .enumerate()
                    .for_each(|(tile, dq)| {
                        let i0 = tile * bs;
                        #[cfg(target_arch = "x86_64")]
                        if fused {
                            // SAFETY: `fused` checked for AVX2 and FMA.
                            unsafe { fma::q_tile(self, &head, &keys, i0, dq) };
                            return;
                        }
                        self.q_tile::<false>(&head, &keys, i0, dq);
                    });
            });
        (dq, dk, dv)
    }
}

/// Token-major `[rows · len, heads · hd]` to head-major
/// `[rows, heads, len, hd]`, rotating each vector by `rope` (`sign` −1:
/// by its inverse) on the way.
fn to_heads(x: &[f32], d: Dims, heads: usize, rope: Option<(&Rope, f32)>) -> Vec<f32> {
    let (len, hd) = (d.len, d.head_dim);
    let half = hd / 2;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(len * hd)
        .enumerate()
        .for_each(|(rh, out)| {
            let (r, h) = (rh / heads, rh % heads);
            for (i, o) in out.chunks_mut(hd).enumerate() {
                let t = r * len + i;
                let src = &x[(t * heads + h) * hd..(t * heads + h + 1) * hd];
                match rope {
                    None => o.copy_from_slice(src),
                    Some((rope, sign)) => {
                        let cos = &rope.cos[t * half..(t + 1) * half];
                        let sin = &rope.sin[t * half..(t + 1) * half];
                        for j in 0..half {
                            let (a, b) = (src[j], src[j + half]);
                            let s = sign * sin[j];
                            o[j] = a * cos[j] - b * s;
                            o[j + half] = b * cos[j] + a * s;
                        }
                    }
                }
            }
        });
    out
}

/// Head-major back to token-major, rotating by `rope` as [`to_heads`] does.
fn to_tokens(x: &[f32], d: Dims, heads: usize, rope: Option<(&Rope, f32)>) -> Vec<f32> {
    let (len, hd) = (d.len, d.head_dim);
    let half = hd / 2;
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(heads * hd)
        .enumerate()
        .for_each(|(t, out)| {
            let (r, i) = (t / len, t % len);
            for (h, o) in out.chunks_mut(hd).enumerate() {
                let at = ((r * heads + h) * len + i) * hd;
                let src = &x[at..at + hd];
                match rope {
                    None => o.copy_from_slice(src),
                    Some((rope, sign)) => {
                        let cos = &rope.cos[t * half..(t + 1) * half];
                        let sin = &rope.sin[t * half..(t + 1) * half];
                        for j in 0..half {
                            let (a, b) = (src[j], src[j + half]);
                            let s = sign * sin[j];
                            o[j] = a * cos[j] - b * s;
                            o[j + half] = b * cos[j] + a * s;
                        }
                    }
                }
            }
        });
    out
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "flash-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let q = crate::storage::contiguous_f32(s1, l1, "flash-attention: q")?;
        let k = crate::storage::contiguous_f32(s2, l2, "flash-attention: k")?;
        let v = crate::storage::contiguous_f32(s3, l3, "flash-attention: v")?;
        let d = self.dims;
        if q.len() != d.rows * d.heads * d.len * d.head_dim
            || k.len() != d.rows * d.kv_heads * d.len * d.head_dim
            || v.len() != k.len()
        {
            return Err(candle_core::Error::Msg(
                "flash-attention: q, k, v do not match the shapes given".into(),
            ));
        }
        let (out, lse, shape) = match &self.rope {
            None => {
                let (out, lse) = self.forward(q, k, v);
                (out, lse, Shape::from((d.rows, d.heads, d.len, d.head_dim)))
            }
            Some(rope) => {
                let qh = to_heads(q, d, d.heads, Some((rope, 1.0)));
                let kh = to_heads(k, d, d.kv_heads, Some((rope, 1.0)));
                let vh = to_heads(v, d, d.kv_heads, None);
                let (out, lse) = self.forward(&qh, &kh, &vh);
                let out = to_tokens(&out, d, d.heads, None);
                (
                    out,
                    lse,
                    Shape::from((d.rows * d.len, d.heads * d.head_dim)),
                )
            }
        };
        *self.lse.lock().unwrap_or_else(|e| e.into_inner()) = lse;
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
        let lse = self.lse.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let d = self.dims;
        let (dq, dk, dv) = match &self.rope {
            None => self.backward(
                &flat(q)?,
                &flat(k)?,
                &flat(v)?,
                &flat(res)?,
                &flat(grad_res)?,
                &lse,
            ),
            Some(rope) => {
                let (dq, dk, dv) = self.backward(
                    &to_heads(&flat(q)?, d, d.heads, Some((rope, 1.0))),
                    &to_heads(&flat(k)?, d, d.kv_heads, Some((rope, 1.0))),
                    &to_heads(&flat(v)?, d, d.kv_heads, None),
                    &to_heads(&flat(res)?, d, d.heads, None),
                    &to_heads(&flat(grad_res)?, d, d.heads, None),
                    &lse,
                );
                // The rotation's transpose is its inverse.
                (
                    to_tokens(&dq, d, d.heads, Some((rope, -1.0))),
                    to_tokens(&dk, d, d.kv_heads, Some((rope, -1.0))),
                    to_tokens(&dv, d, d.kv_heads, None),
                )
            }
        };
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}
