//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far (a sliding layer: of its window), in plain buffers
//! that grow by doubling (or are reserved once for a whole generation, so
//! appending a token copies only that token) and can be truncated to reuse
//! a prefix. Entries are f32,
//! f16 (half the memory), or Q8_0 (blocks of 32 i8 values with an f16
//! scale: 8.5 bits a number, 27% of f32's memory) for the longest contexts.

use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::attention::{quantize_q8, CacheView, KvSlice, Q8Slice};

/// The number format of cached keys and values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Exact: what the layer computed.
    #[default]
    F32,
    /// Half the memory, rounded to f16 (llama.cpp's default).
    F16,
    /// llama.cpp's Q8_0 blocks: 32 values rounded to i8 with one f16
    /// scale, 34 bytes per 32 numbers. The head size must be a multiple
    /// of 32.
    Q8_0,
}

impl KvDtype {
    pub fn parse(s: &str) -> Option<KvDtype> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Some(KvDtype::F32),
            "f16" => Some(KvDtype::F16),
            "q8_0" => Some(KvDtype::Q8_0),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            KvDtype::F32 => "f32",
            KvDtype::F16 => "f16",
            KvDtype::Q8_0 => "q8_0",
        }
    }

    /// Bytes `n` cached numbers take (for Q8_0, `n` is a multiple of 32).
    pub fn bytes(self, n: usize) -> usize {
        match self {
            KvDtype::F32 => 4 * n,
            KvDtype::F16 => 2 * n,
            KvDtype::Q8_0 => n + n / 32 * 2,
        }
    }

    /// Whether heads of `head_dim` numbers can be held in this format.
    pub fn holds_head_dim(self, head_dim: usize) -> bool {
        self != KvDtype::Q8_0 || head_dim.is_multiple_of(32)
    }
}

/// `[kv_heads, capacity, head_dim]` numbers of one layer.
enum Buf {
    F32(Vec<f32>),
    F16(Vec<f16>),
    /// Values and one scale per 32 of them.
    Q8(Vec<i8>, Vec<f16>),
}

impl Buf {
    fn new(dtype: KvDtype, n: usize) -> Buf {
        match dtype {
            KvDtype::F32 => Buf::F32(vec![0.0; n]),
            KvDtype::F16 => Buf::F16(vec![f16::ZERO; n]),
            KvDtype::Q8_0 => Buf::Q8(vec![0; n], vec![f16::ZERO; n.div_ceil(32)]),
        }
    }

    fn slice(&self) -> KvSlice<'_> {
        match self {
            Buf::F32(v) => KvSlice::F32(v),
            Buf::F16(v) => KvSlice::F16(v),
            Buf::Q8(q, d) => KvSlice::Q8(Q8Slice { q, d }),
        }
    }

    fn store(&mut self, at: usize, x: &[f32]) {
        match self {
            Buf::F32(v) => v[at..at + x.len()].copy_from_slice(x),
            Buf::F16(v) => v[at..at + x.len()].convert_from_f32_slice(x),
            Buf::Q8(q, d) => quantize_q8(
                x,
                &mut q[at..at + x.len()],
                &mut d[at / 32..(at + x.len()) / 32],
            ),
        }
    }

    /// Copies `n` numbers from `src[from..]` to `self[to..]`.
    fn copy_from(&mut self, src: &Buf, from: usize, to: usize, n: usize) {
        match (self, src) {
            (Buf::F32(d), Buf::F32(s)) => d[to..to + n].copy_from_slice(&s[from..from + n]),
            (Buf::F16(d), Buf::F16(s)) => d[to..to + n].copy_from_slice(&s[from..from + n]),
            (Buf::Q8(dq, dd), Buf::Q8(sq, sd)) => {
                dq[to..to + n].copy_from_slice(&sq[from..from + n]);
                dd[to / 32..(to + n) / 32].copy_from_slice(&sd[from / 32..(from + n) / 32]);
            }
            _ => unreachable!("one cache holds one dtype"),
        }
    }

    /// Moves `n` numbers from `from` to `to` (< `from`) within the buffer.
    fn move_down(&mut self, from: usize, to: usize, n: usize) {
        match self {
            Buf::F32(v) => v.copy_within(from..from + n, to),
            Buf::F16(v) => v.copy_within(from..from + n, to),
            Buf::Q8(q, d) => {
                q.copy_within(from..from + n, to);
                d.copy_within(from / 32..(from + n) / 32, to / 32);
            }
        }
    }
}

/// One layer's keys and values: `[kv_heads, capacity, head_dim]`, slot
/// `p - offset` holding position `p`. A full layer's offset stays 0. A
/// sliding layer (it attends to the last `window` positions only) keeps
/// about `window + slack` slots: before a step would overflow them, the
/// positions no query of the step reads are dropped and the rest moved to
/// the front (the offset grows), so its memory stays at its window
/// whatever the context.
struct LayerKv {
    keys: Buf,
    values: Buf,
    capacity: usize,
    offset: usize,
    window: Option<usize>,
}

pub struct KvCache {
    layers: Vec<LayerKv>,
    kv_heads: usize,
    head_dim: usize,
    limit: usize,
    len: usize,
    dtype: KvDtype,
    /// Slots a sliding layer keeps beyond its window (room for the steps
    /// between two moves).
    slack: usize,
}

const FIRST_CAPACITY: usize = 256;

/// Slots a sliding layer keeps beyond its window by default: a prefill
/// chunk of 512 and a speculative step fit between two moves.
pub const SLIDING_SLACK: usize = 576;

/// A sliding layer's offset moves by multiples of this, so positions keep
/// their alignment within the buffers.
const OFFSET_STEP: usize = 64;

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, limit: usize) -> Self {
        Self::with_dtype(layers, kv_heads, head_dim, limit, KvDtype::F32)
    }

    /// A cache of `dtype` numbers (which must hold heads of `head_dim`,
    /// [`KvDtype::holds_head_dim`]).
    pub fn with_dtype(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        limit: usize,
        dtype: KvDtype,
    ) -> Self {
        assert!(
            dtype.holds_head_dim(head_dim),
            "a {} cache cannot hold heads of {head_dim}",
            dtype.name()
        );
        KvCache {
            layers: (0..layers)
                .map(|_| LayerKv {
                    keys: Buf::new(dtype, 0),
                    values: Buf::new(dtype, 0),
                    capacity: 0,
                    offset: 0,
                    window: None,
                })
                .collect(),
            kv_heads,
            head_dim,
            limit,
            len: 0,
            dtype,
            slack: SLIDING_SLACK,
        }
    }

    /// The same cache with sliding layers: layer `l` attends to the last
    /// `windows[l]` positions where that is `Some`, and keeps about
    /// `window + slack` positions. Set before anything is written.
    pub fn with_windows(mut self, windows: &[Option<usize>], slack: usize) -> Self {
        assert!(self.len == 0, "windows are set on an empty cache");
        for (layer, w) in self.layers.iter_mut().zip(windows) {
            layer.window = w.filter(|&w| w > 0);
        }
        self.slack = slack.max(1);
        self
    }

    pub fn dtype(&self) -> KvDtype {
        self.dtype
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Positions there is room for without growing (in the full layers;
    /// sliding layers hold their window).
    pub fn capacity(&self) -> usize {
        self.layers
            .iter()
            .filter(|l| l.window.is_none())
            .map(|l| l.capacity)
            .max()
            .unwrap_or(usize::MAX)
    }

    /// Slots layer `layer` holds (a sliding layer: about its window).
    pub fn layer_capacity(&self, layer: usize) -> usize {
        self.layers[layer].capacity
    }

    /// Forgets every position from `len` on (keeps a shared prefix). Where
    /// a sliding layer has already dropped keys that a position after `len`
    /// would read, nothing can be kept: the cache is emptied, and
    /// [`KvCache::len`] says how much was kept.
    pub fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        let lost = self.layers.iter().any(|l| {
            l.window
                .is_some_and(|w| l.offset > (len + 1).saturating_sub(w))
        });
        if lost {
            return self.clear();
        }
        self.len = len;
    }

    pub fn clear(&mut self) {
        self.len = 0;
        for l in &mut self.layers {
            l.offset = 0;
        }
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        let per_position = self.dtype.bytes(self.kv_heads * self.head_dim);
        self.layers
            .iter()
            .map(|l| 2 * l.capacity * per_position)
            .sum()
    }

    /// Bytes the buffers take for `positions` positions.
    pub fn bytes_for(&self, positions: usize) -> usize {
        let per_position = self.dtype.bytes(self.kv_heads * self.head_dim);
        self.layers
            .iter()
            .map(|l| 2 * self.slots_for(l, positions) * per_position)
            .sum()
    }

    /// Slots layer `l` takes for a sequence of `positions` positions.
    fn slots_for(&self, l: &LayerKv, positions: usize) -> usize {
        match l.window {
            Some(w) => positions.min(w + self.slack + OFFSET_STEP),
            None => positions,
        }
    }

    /// Makes room for `needed` positions (existing ones are kept), doubling
    /// the capacity as it grows; sliding layers first drop what no later
    /// position reads.
    pub fn reserve(&mut self, needed: usize) {
        for i in 0..self.layers.len() {
            self.make_room(i, needed, false);
        }
    }

    /// Makes room for exactly `needed` positions at once (a whole
    /// generation), so no step copies the full layers.
    pub fn reserve_exact(&mut self, needed: usize) {
        for i in 0..self.layers.len() {
            self.make_room(i, needed, true);
        }
    }

    fn make_room(&mut self, i: usize, needed: usize, exact: bool) {
        let layer = &self.layers[i];
        if needed <= layer.offset + layer.capacity {
            return;
        }
        if let Some(w) = layer.window {
            // A step's first query (at `len`) reads from `len + 1 - w` on.
            let keep = (self.len + 1).saturating_sub(w) / OFFSET_STEP * OFFSET_STEP;
            if keep > layer.offset {
                self.drop_front(i, keep);
            }
            let layer = &self.layers[i];
            let slots = needed - layer.offset;
            if slots > layer.capacity {
                let ring = (w + self.slack + OFFSET_STEP).min(self.limit.max(slots));
                self.grow_to(i, slots.max(ring));
            }
            return;
        }
        let cap = if exact {
            needed
        } else {
            let mut cap = layer.capacity.max(FIRST_CAPACITY);
            while cap < needed {
                cap *= 2;
            }
            cap.min(self.limit.max(needed))
        };
        self.grow_to(i, cap);
    }

    /// Drops layer `i`'s positions before `keep`, moving the rest to the
    /// front of its buffers.
    fn drop_front(&mut self, i: usize, keep: usize) {
        let (hd, len) = (self.head_dim, self.len);
        let layer = &mut self.layers[i];
        let (shift, held) = (keep - layer.offset, len.saturating_sub(keep));
        for buf in [&mut layer.keys, &mut layer.values] {
            for h in 0..self.kv_heads {
                let at = h * layer.capacity * hd;
                buf.move_down(at + shift * hd, at, held * hd);
            }
        }
        layer.offset = keep;
    }

    fn grow_to(&mut self, i: usize, cap: usize) {
        let (hd, dtype) = (self.head_dim, self.dtype);
        let layer = &mut self.layers[i];
        let (old, held) = (layer.capacity, self.len.saturating_sub(layer.offset));
        for buf in [&mut layer.keys, &mut layer.values] {
            let mut bigger = Buf::new(dtype, self.kv_heads * cap * hd);
            for h in 0..self.kv_heads {
                bigger.copy_from(buf, h * old * hd, h * cap * hd, held * hd);
            }
            *buf = bigger;
        }
        layer.capacity = cap;
    }

    /// Writes the key and value (`[kv_heads * head_dim]` each) of position
    /// `pos` in layer `layer`. Room must have been reserved.
    pub fn write(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let hd = self.head_dim;
        let kv = &mut self.layers[layer];
        debug_assert!(pos >= kv.offset && pos - kv.offset < kv.capacity);
        let slot = pos - kv.offset;
        for h in 0..self.kv_heads {
            let at = (h * kv.capacity + slot) * hd;
            kv.keys.store(at, &key[h * hd..(h + 1) * hd]);
            kv.values.store(at, &value[h * hd..(h + 1) * hd]);
        }
    }

    /// A read-only view of layer `layer` whose first `len` positions are valid.
    pub fn view(&self, layer: usize, len: usize) -> CacheView<'_> {
        let kv = &self.layers[layer];
        CacheView {
            keys: kv.keys.slice(),
            values: kv.values.slice(),
            capacity: kv.capacity,
            offset: kv.offset,
            len,
        }
    }

    /// Marks `n` written positions as held (all layers have written them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
