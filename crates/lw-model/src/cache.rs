//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far, in plain buffers that grow by doubling (or are
//! reserved once for a whole generation, so appending a token copies only
//! that token) and can be truncated to reuse a prefix. Entries are f32,
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
}

struct LayerKv {
    keys: Buf,
    values: Buf,
}

pub struct KvCache {
    layers: Vec<LayerKv>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    limit: usize,
    len: usize,
    dtype: KvDtype,
}

const FIRST_CAPACITY: usize = 256;

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
                })
                .collect(),
            kv_heads,
            head_dim,
            capacity: 0,
            limit,
            len: 0,
            dtype,
        }
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

    /// Positions there is room for without growing.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Forgets every position from `len` on (keeps a shared prefix).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Bytes held by the buffers.
    pub fn bytes(&self) -> usize {
        self.bytes_for(self.capacity)
    }

    /// Bytes the buffers take for `positions` positions.
    pub fn bytes_for(&self, positions: usize) -> usize {
        let numbers = self.kv_heads * positions * self.head_dim;
        self.layers.len() * 2 * self.dtype.bytes(numbers)
    }

    /// Makes room for `needed` positions (existing ones are kept), doubling
    /// the capacity as it grows.
    pub fn reserve(&mut self, needed: usize) {
        if needed <= self.capacity {
            return;
        }
        let mut cap = self.capacity.max(FIRST_CAPACITY);
        while cap < needed {
            cap *= 2;
        }
        self.grow_to(cap.min(self.limit.max(needed)));
    }

    /// Makes room for exactly `needed` positions at once (a whole
    /// generation), so no step copies the cache.
    pub fn reserve_exact(&mut self, needed: usize) {
        if needed > self.capacity {
            self.grow_to(needed);
        }
    }

    fn grow_to(&mut self, cap: usize) {
        let (hd, old, dtype) = (self.head_dim, self.capacity, self.dtype);
        for kv in &mut self.layers {
            for buf in [&mut kv.keys, &mut kv.values] {
                let mut bigger = Buf::new(dtype, self.kv_heads * cap * hd);
                for h in 0..self.kv_heads {
                    bigger.copy_from(buf, h * old * hd, h * cap * hd, self.len * hd);
                }
                *buf = bigger;
            }
        }
        self.capacity = cap;
    }

    /// Writes the key and value (`[kv_heads * head_dim]` each) of position
    /// `pos` in layer `layer`. Room must have been reserved.
    pub fn write(&mut self, layer: usize, pos: usize, key: &[f32], value: &[f32]) {
        let (hd, cap) = (self.head_dim, self.capacity);
        let kv = &mut self.layers[layer];
        for h in 0..self.kv_heads {
            let at = (h * cap + pos) * hd;
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
            capacity: self.capacity,
            len,
        }
    }

    /// Marks `n` written positions as held (all layers have written them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
