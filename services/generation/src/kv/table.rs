//! One sequence's view of the paged KV cache: its blocks in position order,
//! the slot of every position, how many positions hold keys and values, and
//! the blocks still promised to it. The scheduler owns one per running
//! sequence and releases it exactly once, when the sequence leaves.

use super::blocks::{BlockId, BlockManager, OutOfBlocks};

/// A sequence's blocks.
#[derive(Debug)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
    /// Slot of each position `0..len + reserved`.
    slots: Vec<i64>,
    /// Positions whose keys and values are written.
    len: usize,
    /// Leading blocks already registered in the prefix cache (or taken from it).
    sealed: usize,
    /// Blocks promised at admission and not yet allocated.
    promised: usize,
    /// Positions taken from the prefix cache at admission.
    cached: usize,
    /// Whether full blocks are registered for reuse.
    caching: bool,
}

impl BlockTable {
    /// Admits a sequence of `prompt` that may grow to `prompt.len() +
    /// max_tokens` positions: takes the longest cached prefix (when
    /// `caching`) and promises the remaining blocks. Errors with
    /// [`OutOfBlocks`], holding nothing, when the pool cannot promise them.
    pub fn admit(
        manager: &mut BlockManager,
        prompt: &[u32],
        max_tokens: usize,
        caching: bool,
    ) -> Result<Self, OutOfBlocks> {
        let blocks = if caching {
            manager.lookup(prompt)
        } else {
            Vec::new()
        };
        let need = manager.blocks_for(prompt.len() + max_tokens) - blocks.len();
        if let Err(e) = manager.promise(need) {
            blocks.iter().rev().for_each(|&b| manager.release(b));
            return Err(e);
        }
        let bs = manager.block_size();
        let cached = blocks.len() * bs;
        let slots = blocks
            .iter()
            .flat_map(|&b| (0..bs).map(move |i| i64::from(b) * bs as i64 + i as i64))
            .collect();
        Ok(Self {
            sealed: blocks.len(),
            blocks,
            slots,
            len: cached,
            promised: need,
            cached,
            caching,
        })
    }

    /// Positions whose keys and values are written.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing is written yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Slots of every position written or reserved, in position order.
    pub fn slots(&self) -> &[i64] {
        &self.slots
    }

    /// Positions reused from the prefix cache at admission.
    pub fn cached(&self) -> usize {
        self.cached
    }

    /// Makes room for `n` more positions (allocating promised blocks) and
    /// returns the slots of positions `0..len + n`. Errors with
    /// [`OutOfBlocks`] when the sequence outgrows its promise.
    pub fn reserve(&mut self, manager: &mut BlockManager, n: usize) -> Result<&[i64], OutOfBlocks> {
        let bs = manager.block_size();
        let want = self.len + n;
        while self.blocks.len() * bs < want {
            if self.promised == 0 {
                return Err(OutOfBlocks);
            }
            let b = manager.allocate()?;
            self.promised -= 1;
            self.blocks.push(b);
        }
        while self.slots.len() < want {
            let p = self.slots.len();
            self.slots
                .push(i64::from(self.blocks[p / bs]) * bs as i64 + (p % bs) as i64);
        }
        Ok(&self.slots[..want])
    }

    /// Counts `n` more written positions; `tokens` are the sequence's tokens
    /// by position (at least `len + n`). Blocks that became full are
    /// registered in the prefix cache.
    pub fn commit(&mut self, manager: &mut BlockManager, n: usize, tokens: &[u32]) {
        self.len += n;
        if !self.caching {
            return;
        }
        let bs = manager.block_size();
        while (self.sealed + 1) * bs <= self.len {
            let i = self.sealed;
            if let Some(chunk) = tokens.get(i * bs..(i + 1) * bs) {
                let parent = i.checked_sub(1).map(|p| self.blocks[p]);
                manager.seal(self.blocks[i], parent, chunk);
            }
            self.sealed += 1;
        }
    }

    /// Gives every block and promise back (last block first, so the tail of
    /// a cached prefix is evicted before its head).
    pub fn release(&mut self, manager: &mut BlockManager) {
        for b in self.blocks.drain(..).rev() {
            manager.release(b);
        }
        manager.unpromise(self.promised);
        self.promised = 0;
        self.slots.clear();
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_turn_starts_after_the_cached_prefix() {
        let mut m = BlockManager::new(16, 4);
        let turn1: Vec<u32> = (100..110).collect();
        let mut t = BlockTable::admit(&mut m, &turn1, 6, true).unwrap();
        assert_eq!(t.cached(), 0);
        let slots = t.reserve(&mut m, turn1.len()).unwrap().to_vec();
        assert_eq!(slots.len(), 10);
        t.commit(&mut m, 10, &turn1);
        let mut history = turn1.clone();
        for tok in 0..6 {
            history.push(tok);
            t.reserve(&mut m, 1).unwrap();
            t.commit(&mut m, 1, &history);
        }
        // The whole budget was promised: one more position is refused.
        assert_eq!(t.reserve(&mut m, 1).err(), Some(OutOfBlocks));
        t.release(&mut m);
        // Turn 2 repeats the 16 positions and adds 3: all four full blocks
        // are reused, and their slots are the first turn's.
        history.extend([7, 8, 9]);
        let mut t2 = BlockTable::admit(&mut m, &history, 4, true).unwrap();
        assert_eq!(t2.cached(), 16);
        let slots2 = t2.reserve(&mut m, 3).unwrap();
        assert_eq!(slots2[..10], slots[..]);
        t2.release(&mut m);
        assert_eq!(m.available(), 16);
    }

    #[test]
    fn refused_admission_holds_nothing() {
        let mut m = BlockManager::new(4, 4);
        let p: Vec<u32> = (0..9).collect();
        let mut t = BlockTable::admit(&mut m, &p, 0, true).unwrap();
        t.reserve(&mut m, 9).unwrap();
        t.commit(&mut m, 9, &p);
        t.release(&mut m);
        // 2 cached blocks would match, but 9 + 20 tokens need 8 blocks.
        assert!(BlockTable::admit(&mut m, &p, 20, true).is_err());
        assert_eq!((m.available(), m.evictable()), (4, 2));
        // Without caching, nothing is looked up or registered.
        let mut t = BlockTable::admit(&mut m, &p, 3, false).unwrap();
        assert_eq!(t.cached(), 0);
        t.release(&mut m);
    }
}
