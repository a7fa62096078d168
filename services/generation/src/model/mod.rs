//! The decoder-only transformer of Llama/Qwen2-family checkpoints on libtorch:
//! [`config`] reads `config.json`, [`weights`] loads safetensors, [`cache`]
//! holds one sequence's KV cache, and [`decoder`] runs the forward pass
//! (prefill of one prompt, batched decode of many sequences).

pub mod cache;
pub mod config;
pub mod decoder;
mod rope;
pub mod weights;

pub use cache::KvCache;
pub use config::ModelConfig;
pub use decoder::Decoder;
