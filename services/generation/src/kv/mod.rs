//! The paged KV cache (Kwon et al. 2023, "Efficient Memory Management for
//! Large Language Model Serving with PagedAttention"): keys and values live
//! in fixed-size blocks of one pool ([`pool`]) instead of one tensor per
//! request sized for prompt + `max_tokens`; [`blocks`] tracks which blocks
//! are free, held, or kept for prefix caching, and [`table`] maps one
//! sequence's positions to slots.

pub mod blocks;
pub mod pool;
pub mod table;

pub use blocks::{BlockId, BlockManager, OutOfBlocks};
pub use pool::{KvPool, Slots};
pub use table::BlockTable;

/// Tokens per block unless configured: vLLM's default on GPU, and small
/// enough that a chat turn's unshared tail wastes little.
pub const DEFAULT_BLOCK_SIZE: usize = 16;
