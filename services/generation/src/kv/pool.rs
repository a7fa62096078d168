//! The KV cache's memory: per layer one key and one value tensor of shape
//! `[kv_heads, slots, head_dim]` in the model's dtype, allocated once for
//! the whole pool. A *slot* holds one token's key (or value) for every KV
//! head; block `b` owns slots `b·block_size .. (b+1)·block_size`. Forward
//! passes write a token's keys and values at its slot and read a sequence's
//! keys and values by gathering its slots in position order.
//!
//! The allocation is `torch.empty`: the OS commits pages as blocks are first
//! written, so a large budget costs address space, not resident memory,
//! until it is used.

use tch::{Device, Kind, Tensor};

/// Slots a forward pass reads, in position order.
pub enum Slots {
    /// `start..start+len`: a view, no copy.
    Range {
        /// First slot.
        start: i64,
        /// Count.
        len: i64,
    },
    /// Arbitrary slots, `[len]` int64 on the pool's device: a gather.
    Indexed(Tensor),
}

impl Slots {
    /// The slots of `list` (one per position), as a view when they are
    /// consecutive. Errors from the host→device copy.
    pub fn of(list: &[i64], device: Device) -> Result<Self, tch::TchError> {
        let start = list.first().copied().unwrap_or(0);
        let consecutive = list.iter().enumerate().all(|(i, &s)| s == start + i as i64);
        if consecutive {
            Ok(Self::Range {
                start,
                len: list.len() as i64,
            })
        } else {
            Ok(Self::Indexed(
                Tensor::f_from_slice(list)?.f_to_device(device)?,
            ))
        }
    }
}

/// Keys and values of every layer for every slot.
pub struct KvPool {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    slots: usize,
}

impl KvPool {
    /// A pool of `slots` token slots. Errors (out of memory) from the
    /// allocation.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        slots: usize,
        kind: Kind,
        device: Device,
    ) -> Result<Self, tch::TchError> {
        let shape = [kv_heads as i64, slots as i64, head_dim as i64];
        let mut keys = Vec::with_capacity(layers);
        let mut values = Vec::with_capacity(layers);
        for _ in 0..layers {
            keys.push(Tensor::f_empty(shape, (kind, device))?);
            values.push(Tensor::f_empty(shape, (kind, device))?);
        }
        Ok(Self {
            keys,
            values,
            slots,
        })
    }

    /// Token slots in the pool.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes of one token's keys and values over all layers.
    pub fn bytes_per_slot(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|t| t.numel() * t.kind().elt_size_in_bytes())
            .sum::<usize>()
            / self.slots.max(1)
    }

    /// Writes `k`, `v` (`[kv_heads, n, head_dim]`) of `layer` at `slots`
    /// (`[n]` int64 on the pool's device; `Range` for consecutive slots).
    pub fn write(
        &mut self,
        layer: usize,
        slots: &Slots,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(), tch::TchError> {
        match slots {
            Slots::Range { start, len } => {
                self.keys[layer].f_narrow(1, *start, *len)?.f_copy_(k)?;
                self.values[layer].f_narrow(1, *start, *len)?.f_copy_(v)?;
            }
            Slots::Indexed(index) => {
                let _ = self.keys[layer].f_index_copy_(1, index, k)?;
                let _ = self.values[layer].f_index_copy_(1, index, v)?;
            }
        }
        Ok(())
    }

    /// Keys and values of `layer` at `slots`, `[1, kv_heads, n, head_dim]`.
    pub fn read(&self, layer: usize, slots: &Slots) -> Result<(Tensor, Tensor), tch::TchError> {
        let (k, v) = match slots {
            Slots::Range { start, len } => (
                self.keys[layer].f_narrow(1, *start, *len)?,
                self.values[layer].f_narrow(1, *start, *len)?,
            ),
            Slots::Indexed(index) => (
                self.keys[layer].f_index_select(1, index)?,
                self.values[layer].f_index_select(1, index)?,
            ),
        };
        Ok((k.f_unsqueeze(0)?, v.f_unsqueeze(0)?))
    }
}
