//! The scheduler's view of a model: one forward pass over a paged KV cache.
//! [`crate::model::Decoder`] implements it on libtorch; the scheduler's
//! tests (`engine/tests.rs`) implement it with a fake model, so admission,
//! chunked prefill, cancellation and KV exhaustion are tested without
//! weights (TGI's `backends/v3/src/queue.rs` tests its queue the same way).

use crate::{GenerationError, kv::KvPool, model::Decoder};

/// A model the scheduler can run. Logits are host `f32` rows of the
/// vocabulary's length.
pub trait ForwardPass: Send + 'static {
    /// The KV cache's memory.
    type Pool: Send + 'static;

    /// Bytes of one token's keys and values over all layers.
    fn kv_bytes_per_token(&self) -> usize;

    /// A KV pool of `slots` token slots. Errors (out of memory) from the
    /// allocation.
    fn new_pool(&self, slots: usize) -> Result<Self::Pool, GenerationError>;

    /// Prefills `ids` at positions `start..start + ids.len()` of one
    /// sequence, writing their keys and values to `slots` (the sequence's
    /// slots for positions `0..start + ids.len()`). With `logits`, returns
    /// the last position's logits row (`[vocab]`).
    fn prefill(
        &self,
        ids: &[u32],
        start: usize,
        pool: &mut Self::Pool,
        slots: &[i64],
        logits: bool,
    ) -> Result<Option<Vec<f32>>, GenerationError>;

    /// One decode step over a batch: `tokens[b]` is sequence `b`'s newest
    /// token and `slots[b]` its slots including the new position. Returns
    /// one logits row per sequence (`[batch][vocab]`).
    fn decode(
        &self,
        tokens: &[u32],
        pool: &mut Self::Pool,
        slots: &[&[i64]],
    ) -> Result<Vec<Vec<f32>>, GenerationError>;
}

/// Copies `[rows, vocab]` f32 logits to host vectors.
fn to_rows(logits: &tch::Tensor, rows: usize) -> Result<Vec<Vec<f32>>, GenerationError> {
    let flat = logits
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?
        .f_view([-1])?;
    let flat: Vec<f32> = Vec::<f32>::try_from(&flat)?;
    let vocab = flat.len() / rows.max(1);
    Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
}

impl ForwardPass for Decoder {
    type Pool = KvPool;

    fn kv_bytes_per_token(&self) -> usize {
        Decoder::kv_bytes_per_token(self)
    }

    fn new_pool(&self, slots: usize) -> Result<KvPool, GenerationError> {
        Decoder::new_pool(self, slots)
    }

    fn prefill(
        &self,
        ids: &[u32],
        start: usize,
        pool: &mut KvPool,
        slots: &[i64],
        logits: bool,
    ) -> Result<Option<Vec<f32>>, GenerationError> {
        let out = self.forward(ids, start, pool, slots, false)?;
        if !logits {
            return Ok(None);
        }
        Ok(to_rows(&out, 1)?.pop())
    }

    fn decode(
        &self,
        tokens: &[u32],
        pool: &mut KvPool,
        slots: &[&[i64]],
    ) -> Result<Vec<Vec<f32>>, GenerationError> {
        let out = self.decode_paged(tokens, pool, slots)?;
        to_rows(&out, tokens.len())
    }
}
