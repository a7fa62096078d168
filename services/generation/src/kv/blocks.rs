//! The block manager of the paged KV cache: which fixed-size blocks of the
//! pool are free, held by running sequences, or kept for prefix caching —
//! pure bookkeeping, no tensors, so it is unit-tested without a model.
//!
//! Prefix caching follows vLLM's automatic prefix caching
//! (`vllm/core/block/prefix_caching_block.py`): a *full* block is keyed by
//! its tokens and by the block before it, so a key names the whole token
//! prefix up to the block's end. Unlike vLLM's hash of the prefix, the key
//! here is exact: the previous block is named by its id and its
//! *generation* (bumped each time the block is reused for other tokens), and
//! the block's own tokens are compared in full, so a cached block can never
//! be handed to a different prefix, whatever the hash function does.
//!
//! A block whose last holder releases it stays cached (refcount 0, in LRU
//! order) until a new allocation finds no free block and evicts the least
//! recently used one. Running sequences *promise* their future blocks at
//! admission (prompt + `max_tokens`), and admission keeps `promised ≤ free +
//! evictable`, so a running sequence never waits for a block and nothing is
//! ever preempted.

use std::collections::{BTreeMap, HashMap};

/// Index of a block in the pool.
pub type BlockId = u32;

/// What a cached full block holds: the exact token prefix up to its end.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct BlockKey {
    /// The previous block (id, generation); `None` for a prompt's first block.
    parent: Option<(BlockId, u64)>,
    /// The block's own tokens (exactly `block_size`).
    tokens: Box<[u32]>,
}

#[derive(Debug, Default)]
struct Meta {
    /// Sequences holding the block.
    refs: u32,
    /// Bumped every time the block is reallocated: keys that name it as a
    /// parent go stale with it.
    generation: u64,
    /// Set while the block is in the prefix cache's map.
    key: Option<BlockKey>,
    /// Position in `lru` while unreferenced and cached.
    lru_tick: Option<u64>,
}

/// Why a block could not be had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutOfBlocks;

/// Block accounting of one pool.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    meta: Vec<Meta>,
    /// Blocks holding nothing reusable.
    free: Vec<BlockId>,
    /// Full blocks by the exact prefix they hold.
    cached: HashMap<BlockKey, BlockId>,
    /// Unreferenced cached blocks, least recently used first.
    lru: BTreeMap<u64, BlockId>,
    tick: u64,
    /// Blocks running sequences may still allocate.
    promised: usize,
}

impl BlockManager {
    /// A manager of `blocks` blocks of `block_size` tokens, all free.
    pub fn new(blocks: usize, block_size: usize) -> Self {
        Self {
            block_size: block_size.max(1),
            meta: (0..blocks).map(|_| Meta::default()).collect(),
            free: (0..blocks as BlockId).rev().collect(),
            cached: HashMap::new(),
            lru: BTreeMap::new(),
            tick: 0,
            promised: 0,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn capacity(&self) -> usize {
        self.meta.len()
    }

    /// Blocks a new sequence may still be promised: free + evictable −
    /// already promised.
    pub fn available(&self) -> usize {
        (self.free.len() + self.lru.len()).saturating_sub(self.promised)
    }

    /// Blocks kept for prefix caching and held by nobody.
    pub fn evictable(&self) -> usize {
        self.lru.len()
    }

    /// Blocks holding nothing.
    pub fn free(&self) -> usize {
        self.free.len()
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// The longest cached prefix of `tokens` in whole blocks, leaving at
    /// least one token uncached (a forward pass needs one token to give the
    /// next token's logits). Each returned block is referenced for the
    /// caller, who must [`BlockManager::release`] it.
    pub fn lookup(&mut self, tokens: &[u32]) -> Vec<BlockId> {
        let usable = tokens.len().saturating_sub(1) / self.block_size;
        let mut out: Vec<BlockId> = Vec::new();
        for chunk in tokens.chunks_exact(self.block_size).take(usable) {
            let key = BlockKey {
                parent: out.last().map(|&b| (b, self.meta[b as usize].generation)),
                tokens: chunk.into(),
            };
            let Some(&id) = self.cached.get(&key) else {
                break;
            };
            self.acquire(id);
            out.push(id);
        }
        out
    }

    fn acquire(&mut self, id: BlockId) {
        let m = &mut self.meta[id as usize];
        if let Some(tick) = m.lru_tick.take() {
            self.lru.remove(&tick);
        }
        m.refs += 1;
    }

    /// Promises `n` future blocks to a sequence being admitted. Errors with
    /// [`OutOfBlocks`] (promising nothing) when fewer are available.
    pub fn promise(&mut self, n: usize) -> Result<(), OutOfBlocks> {
        if n > self.available() {
            return Err(OutOfBlocks);
        }
        self.promised += n;
        Ok(())
    }

    /// Returns `n` promised blocks a sequence will not allocate.
    pub fn unpromise(&mut self, n: usize) {
        self.promised = self.promised.saturating_sub(n);
    }

    /// Takes one promised block: a free one, else the least recently used
    /// cached one (evicted from the prefix cache). Errors with
    /// [`OutOfBlocks`] when the pool is exhausted (a broken promise).
    pub fn allocate(&mut self) -> Result<BlockId, OutOfBlocks> {
        let id = match self.free.pop() {
            Some(id) => id,
            None => {
                let (_, id) = self.lru.pop_first().ok_or(OutOfBlocks)?;
                let m = &mut self.meta[id as usize];
                m.lru_tick = None;
                if let Some(key) = m.key.take() {
                    self.cached.remove(&key);
                }
                id
            }
        };
        let m = &mut self.meta[id as usize];
        m.generation += 1;
        m.refs = 1;
        self.promised = self.promised.saturating_sub(1);
        Ok(id)
    }

    /// Registers `block`, now full with `tokens` after `parent` (the
    /// sequence's previous block), in the prefix cache. A prefix another
    /// block already holds keeps that block; `block` then stays private.
    pub fn seal(&mut self, block: BlockId, parent: Option<BlockId>, tokens: &[u32]) {
        if tokens.len() != self.block_size || self.meta[block as usize].key.is_some() {
            return;
        }
        let key = BlockKey {
            parent: parent.map(|p| (p, self.meta[p as usize].generation)),
            tokens: tokens.into(),
        };
        if self.cached.contains_key(&key) {
            return;
        }
        self.cached.insert(key.clone(), block);
        self.meta[block as usize].key = Some(key);
    }

    /// Drops one reference to `block`: at zero it becomes evictable (cached)
    /// or free.
    pub fn release(&mut self, block: BlockId) {
        let m = &mut self.meta[block as usize];
        m.refs = m.refs.saturating_sub(1);
        if m.refs > 0 {
            return;
        }
        if m.key.is_some() {
            self.tick += 1;
            m.lru_tick = Some(self.tick);
            self.lru.insert(self.tick, block);
        } else {
            self.free.push(block);
        }
    }

    /// Forgets every cached prefix (blocks held by sequences stay held).
    pub fn clear_cache(&mut self) {
        for (_, id) in std::mem::take(&mut self.lru) {
            let m = &mut self.meta[id as usize];
            m.lru_tick = None;
            m.key = None;
            self.free.push(id);
        }
        for m in &mut self.meta {
            m.key = None;
        }
        self.cached.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Allocates, fills and seals blocks for `tokens` as a sequence would.
    fn fill(m: &mut BlockManager, tokens: &[u32]) -> Vec<BlockId> {
        let mut held = m.lookup(tokens);
        let bs = m.block_size();
        let needed = m.blocks_for(tokens.len()) - held.len();
        m.promise(needed).unwrap();
        for i in held.len()..m.blocks_for(tokens.len()) {
            let id = m.allocate().unwrap();
            let parent = held.last().copied();
            if let Some(chunk) = tokens.get(i * bs..(i + 1) * bs) {
                m.seal(id, parent, chunk);
            }
            held.push(id);
        }
        held
    }

    #[test]
    fn the_next_turn_reuses_full_blocks_and_keeps_one_token_to_compute() {
        let mut m = BlockManager::new(8, 4);
        let turn1: Vec<u32> = (0..10).collect();
        let held = fill(&mut m, &turn1);
        assert_eq!(held.len(), 3);
        held.iter().for_each(|&b| m.release(b));
        // Two full blocks (8 tokens) are cached; the partial third is not.
        let turn2: Vec<u32> = (0..14).collect();
        assert_eq!(m.lookup(&turn2), held[..2]);
        // A prompt of exactly two blocks reuses only the first: the last
        // token must be computed.
        let mut m2 = BlockManager::new(8, 4);
        let p: Vec<u32> = (0..8).collect();
        fill(&mut m2, &p).into_iter().for_each(|b| m2.release(b));
        assert_eq!(m2.lookup(&p).len(), 1);
    }

    #[test]
    fn a_block_is_never_reused_after_a_different_prefix() {
        let mut m = BlockManager::new(8, 4);
        let a: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 7, 8, 9];
        fill(&mut m, &a).into_iter().for_each(|b| m.release(b));
        // Same second block, different first block: nothing matches, not
        // even the identical second block.
        let b: Vec<u32> = vec![1, 2, 3, 0, 5, 6, 7, 8, 9];
        assert!(m.lookup(&b).is_empty());
        // Same first block, different second: only the first matches.
        let c: Vec<u32> = vec![1, 2, 3, 4, 5, 6, 0, 8, 9];
        let got = m.lookup(&c);
        assert_eq!(got.len(), 1);
        got.into_iter().for_each(|b| m.release(b));
    }

    #[test]
    fn an_evicted_parent_invalidates_its_children() {
        // Two blocks: caching a 2-block prefix fills the pool.
        let mut m = BlockManager::new(2, 2);
        let a = vec![1, 2, 3, 4, 5];
        let held = fill(&mut m, &a[..4]);
        held.iter().rev().for_each(|&b| m.release(b));
        assert_eq!(m.evictable(), 2);
        // The tail was released first, so it is evicted first; then the
        // head. Reuse block ids for other tokens.
        m.promise(2).unwrap();
        let x = m.allocate().unwrap();
        let y = m.allocate().unwrap();
        m.seal(x, None, &[9, 9]);
        m.seal(y, Some(x), &[3, 4]);
        m.release(y);
        m.release(x);
        // [1,2,3,4,5]: the first block is gone, and [3,4] after [9,9] must
        // not be taken as [3,4] after [1,2].
        assert!(m.lookup(&a).is_empty());
        let hit = m.lookup(&[9, 9, 3, 4, 0]);
        assert_eq!(hit, vec![x, y]);
    }

    #[test]
    fn promises_bound_admission_and_eviction_is_lru() {
        let mut m = BlockManager::new(4, 2);
        let a = fill(&mut m, &[1, 2, 3, 4]);
        let b = fill(&mut m, &[5, 6, 7, 8]);
        assert_eq!(m.available(), 0);
        assert_eq!(m.promise(1), Err(OutOfBlocks));
        a.iter().rev().for_each(|&x| m.release(x));
        b.iter().rev().for_each(|&x| m.release(x));
        assert_eq!((m.available(), m.evictable()), (4, 4));
        // One new block evicts a's tail (the oldest release): a's head
        // still hits, b's whole prefix still hits.
        m.promise(1).unwrap();
        let _ = m.allocate().unwrap();
        assert_eq!(m.lookup(&[1, 2, 3, 4, 0]).len(), 1);
        assert_eq!(m.lookup(&[5, 6, 7, 8, 0]).len(), 2);
    }

    #[test]
    fn shared_blocks_stay_until_every_holder_releases() {
        let mut m = BlockManager::new(4, 2);
        let first = fill(&mut m, &[1, 2, 3]);
        let shared = m.lookup(&[1, 2, 7]);
        assert_eq!(shared, vec![first[0]]);
        first.iter().for_each(|&b| m.release(b));
        // Still held by the second sequence: not evictable.
        assert_eq!(m.evictable(), 0);
        m.release(shared[0]);
        assert_eq!(m.evictable(), 1);
        m.clear_cache();
        assert_eq!((m.free(), m.evictable()), (4, 0));
        assert!(m.lookup(&[1, 2, 3]).is_empty());
    }
}
