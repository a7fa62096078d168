//! The decoder-only transformer of Llama/Qwen2-family checkpoints on libtorch:
//! [`config`] reads `config.json`, [`weights`] loads safetensors, [`cache`]
//! holds one sequence's KV cache, and [`decoder`] runs the forward pass
//! (prefill of one prompt, batched decode of many sequences).

pub mod cache;
pub mod config;
pub mod decoder;
pub mod linear;
mod rope;
pub mod weights;

pub use cache::KvCache;
pub use config::ModelConfig;
pub use decoder::Decoder;
pub use linear::Linear;

/// Numeric format of a loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Activations, norms, embeddings and the KV cache.
    pub kind: tch::Kind,
    /// Projections stored as weight-only int8 (activations must be bf16).
    pub int8_weights: bool,
}

impl From<tch::Kind> for Precision {
    fn from(kind: tch::Kind) -> Self {
        Self {
            kind,
            int8_weights: false,
        }
    }
}

impl Precision {
    /// Weight-only int8 with bf16 activations.
    pub const INT8: Self = Self {
        kind: tch::Kind::BFloat16,
        int8_weights: true,
    };

    /// `f32`, `bf16`, `f16` or `int8`, as ListModels reports it.
    pub fn name(&self) -> &'static str {
        if self.int8_weights {
            "int8"
        } else {
            crate::device::dtype_name(self.kind)
        }
    }
}
