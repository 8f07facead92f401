//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far, in plain buffers that grow by doubling (so appending
//! a token copies only that token) and can be truncated to reuse a prefix.

use crate::attention::{attend_head, CacheView};

/// `[kv_heads, capacity, head_dim]` keys and values of one layer.
struct LayerKv {
    keys: Vec<f32>,
    values: Vec<f32>,
}

pub struct KvCache {
    layers: Vec<LayerKv>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    limit: usize,
    len: usize,
}

const FIRST_CAPACITY: usize = 256;

impl KvCache {
    pub fn new(layers: usize, kv_heads: usize, head_dim: usize, limit: usize) -> Self {
        KvCache {
            layers: (0..layers)
                .map(|_| LayerKv {
                    keys: Vec::new(),
                    values: Vec::new(),
                })
                .collect(),
            kv_heads,
            head_dim,
            capacity: 0,
            limit,
            len: 0,
        }
    }

    /// Positions held.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
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
        self.layers.len() * 2 * self.kv_heads * self.capacity * self.head_dim * 4
    }

    /// Makes room for `needed` positions (existing ones are kept).
    pub fn reserve(&mut self, needed: usize) {
        if needed <= self.capacity {
            return;
        }
        let mut cap = self.capacity.max(FIRST_CAPACITY);
        while cap < needed {
            cap *= 2;
        }
        let cap = cap.min(self.limit.max(needed));
        let (hd, old) = (self.head_dim, self.capacity);
        for kv in &mut self.layers {
            for buf in [&mut kv.keys, &mut kv.values] {
                let mut bigger = vec![0f32; self.kv_heads * cap * hd];
                for h in 0..self.kv_heads {
                    let n = self.len * hd;
                    bigger[h * cap * hd..h * cap * hd + n]
                        .copy_from_slice(&buf[h * old * hd..h * old * hd + n]);
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
            kv.keys[at..at + hd].copy_from_slice(&key[h * hd..(h + 1) * hd]);
            kv.values[at..at + hd].copy_from_slice(&value[h * hd..(h + 1) * hd]);
        }
    }

    /// A read-only view of layer `layer` whose first `len` positions are valid.
    pub fn view(&self, layer: usize, len: usize) -> CacheView<'_> {
        let kv = &self.layers[layer];
        CacheView {
            keys: &kv.keys,
            values: &kv.values,
            capacity: self.capacity,
            len,
        }
    }

    /// Attention of one query (`[heads * head_dim]`) over the first `len`
    /// positions of layer `layer`, one head after another.
    pub fn attend(
        &self,
        layer: usize,
        len: usize,
        q: &[f32],
        group: usize,
        window: Option<usize>,
    ) -> Vec<f32> {
        let view = self.view(layer, len);
        let hd = self.head_dim;
        let mut out = vec![0f32; q.len()];
        for (h, o) in out.chunks_mut(hd).enumerate() {
            attend_head(&q[h * hd..(h + 1) * hd], &view, h / group, hd, window, o);
        }
        out
    }

    /// Marks `n` written positions as held (all layers have written them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
