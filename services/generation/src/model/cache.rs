//! One sequence's KV cache outside the scheduler (tests, benchmarks,
//! parity): a private [`KvPool`] whose slots are the positions `0..capacity`
//! in order, so every read is a view and no block bookkeeping is needed.

use crate::kv::KvPool;

/// Keys and values of one sequence, all layers.
pub struct KvCache {
    pool: KvPool,
    len: usize,
}

impl KvCache {
    /// An empty cache over `pool` (its slot count is the capacity).
    pub fn new(pool: KvPool) -> Self {
        Self { pool, len: 0 }
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
        self.pool.slots()
    }

    /// Bytes held by the cache.
    pub fn bytes(&self) -> usize {
        self.pool.bytes_per_slot() * self.pool.slots()
    }

    /// The memory, for a forward pass.
    pub fn pool_mut(&mut self) -> &mut KvPool {
        &mut self.pool
    }

    /// Counts `n` more cached tokens (after a forward pass wrote them).
    pub fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
