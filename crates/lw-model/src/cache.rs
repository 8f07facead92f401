//! The key/value cache of one sequence: per layer, keys and values of every
//! position seen so far, in buffers that grow by doubling (so appending a
//! token copies only that token) and can be truncated to reuse a prefix.

use candle_core::{DType, Device, Storage, Tensor};

use crate::attention::{attend_one, CacheView};

use crate::error::ModelError;

struct LayerKv {
    /// `[kv_heads, capacity, head_dim]`; positions `..len` are valid.
    keys: Tensor,
    values: Tensor,
}

pub struct KvCache {
    layers: Vec<Option<LayerKv>>,
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
            layers: (0..layers).map(|_| None).collect(),
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
        self.layers.iter().flatten().count() * 2 * self.kv_heads * self.capacity * self.head_dim * 4
    }

    /// Writes `keys`/`values` (`[kv_heads, n, head_dim]`) of layer `layer`
    /// after the held positions and returns views of all `len + n` positions.
    /// The new positions count once `advance` is called after the last layer.
    pub fn append(
        &mut self,
        layer: usize,
        keys: &Tensor,
        values: &Tensor,
    ) -> Result<(Tensor, Tensor), ModelError> {
        let n = keys.dim(1)?;
        let total = self.len + n;
        if total > self.capacity {
            self.grow(total)?;
        }
        let kv = self.layers[layer].get_or_insert_with(|| {
            let zeros = || {
                Tensor::zeros(
                    (self.kv_heads, self.capacity, self.head_dim),
                    DType::F32,
                    &Device::Cpu,
                )
            };
            LayerKv {
                keys: zeros().expect("allocating the KV cache"),
                values: zeros().expect("allocating the KV cache"),
            }
        });
        kv.keys.slice_set(&keys.contiguous()?, 1, self.len)?;
        kv.values.slice_set(&values.contiguous()?, 1, self.len)?;
        Ok((kv.keys.narrow(1, 0, total)?, kv.values.narrow(1, 0, total)?))
    }

    /// Attention of one query (`[heads * head_dim]`) over the first `len`
    /// positions of layer `layer`, read straight from the cache buffers.
    pub fn attend(
        &self,
        layer: usize,
        len: usize,
        q: &[f32],
        group: usize,
        window: Option<usize>,
    ) -> Result<Vec<f32>, ModelError> {
        let kv = self.layers[layer].as_ref().ok_or_else(|| {
            candle_core::Error::Msg(format!("attention: layer {layer} has no cache yet"))
        })?;
        let (ks, kl) = kv.keys.storage_and_layout();
        let (vs, vl) = kv.values.storage_and_layout();
        let (Storage::Cpu(k), Storage::Cpu(v)) = (&*ks, &*vs) else {
            return Err(
                candle_core::Error::Msg("attention: the cache must be on the CPU".into()).into(),
            );
        };
        let view = CacheView {
            keys: &k.as_slice::<f32>()?[kl.start_offset()..],
            values: &v.as_slice::<f32>()?[vl.start_offset()..],
            capacity: self.capacity,
            len,
        };
        let heads = q.len() / self.head_dim;
        Ok(attend_one(q, &view, heads, group, self.head_dim, window))
    }

    /// Marks `n` appended positions as held (all layers have written them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }

    fn grow(&mut self, needed: usize) -> Result<(), ModelError> {
        let mut cap = self.capacity.max(FIRST_CAPACITY);
        while cap < needed {
            cap *= 2;
        }
        let cap = cap.min(self.limit.max(needed));
        for kv in self.layers.iter_mut().flatten() {
            for buf in [&mut kv.keys, &mut kv.values] {
                let bigger = Tensor::zeros(
                    (self.kv_heads, cap, self.head_dim),
                    DType::F32,
                    &Device::Cpu,
                )?;
                if self.len > 0 {
                    bigger.slice_set(&buf.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                }
                *buf = bigger;
            }
        }
        self.capacity = cap;
        Ok(())
    }
}
