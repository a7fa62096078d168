//! One sequence's KV cache: per layer, a key and a value tensor of shape
//! `[1, kv_heads, capacity, head_dim]` in the model's dtype, allocated once at
//! admission for the sequence's whole budget (prompt + `max_tokens`), so
//! decode steps write in place and never reallocate.

use tch::{Device, Kind, Tensor};

/// Keys and values of one sequence, all layers.
pub struct KvCache {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    len: usize,
    capacity: usize,
}

impl KvCache {
    /// An empty cache for `capacity` tokens. Errors (out of memory) from the
    /// allocation.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self, tch::TchError> {
        let shape = [1, kv_heads as i64, capacity as i64, head_dim as i64];
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(Tensor::f_empty(shape, (kind, device))?);
            values.push(Tensor::f_empty(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            len: 0,
            capacity,
        })
    }

    /// Tokens cached.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tokens the cache can hold.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum()
    }

    /// Writes `k`, `v` (`[1, kv_heads, n, head_dim]`) of `layer` at positions
    /// `len..len+n` and returns views of every cached key and value including
    /// them, `[1, kv_heads, len+n, head_dim]`. Call [`KvCache::advance`] once
    /// every layer has written.
    pub fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor), tch::TchError> {
        let n = k.size()[2];
        let start = self.len as i64;
        if self.len + n as usize > self.capacity {
            return Err(tch::TchError::Shape(format!(
                "KV cache overflow: {} + {n} > capacity {}",
                self.len, self.capacity
            )));
        }
        self.keys[layer].f_narrow(2, start, n)?.f_copy_(k)?;
        self.values[layer].f_narrow(2, start, n)?.f_copy_(v)?;
        Ok((
            self.keys[layer].f_narrow(2, 0, start + n)?,
            self.values[layer].f_narrow(2, 0, start + n)?,
        ))
    }

    /// Counts `n` more cached tokens (after all layers wrote them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
