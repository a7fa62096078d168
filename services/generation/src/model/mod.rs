//! The decoder-only transformer of Llama/Qwen2-family checkpoints on libtorch:
//! [`config`] reads `config.json`, [`weights`] loads safetensors, [`cache`]
//! holds one sequence's KV cache, and [`decoder`] runs the forward pass
//! (prefill of one prompt, batched decode of many sequences).

pub mod cache;
pub mod config;
pub mod decoder;
pub mod linear;
pub mod quantized;
mod rope;
pub mod weights;

pub use cache::KvCache;
pub use config::ModelConfig;
pub use decoder::Decoder;
pub use linear::Linear;

/// How the projections' weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFormat {
    /// The model's dtype.
    Dense,
    /// Weight-only int8 per output channel ([`Linear::quantize_int8`]).
    Int8,
    /// Weight-only int4 in groups of `group` input features
    /// ([`Linear::quantize_int4`]).
    Int4 {
        /// Input features per scale/zero pair: 32, 64 or 128.
        group: i64,
    },
}

/// Numeric format of a loaded model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Precision {
    /// Activations, norms, embeddings and the KV cache.
    pub kind: tch::Kind,
    /// The projections' storage.
    pub weights: WeightFormat,
    /// The LM head's storage.
    pub head: WeightFormat,
}

impl From<tch::Kind> for Precision {
    fn from(kind: tch::Kind) -> Self {
        Self {
            kind,
            weights: WeightFormat::Dense,
            head: WeightFormat::Dense,
        }
    }
}

impl Precision {
    /// Weight-only int8 with bf16 activations.
    pub const INT8: Self = Self {
        kind: tch::Kind::BFloat16,
        weights: WeightFormat::Int8,
        head: WeightFormat::Int8,
    };

    /// Weight-only int4 projections (groups of [`INT4_GROUP`]) with an int8
    /// LM head and bf16 activations. The head stays at 8 bits as in the
    /// Q4_K_M GGUF itself (its `output.weight` is Q8_0): at 4 bits it alone
    /// turned probe answers into nonsense (tests/parity.rs).
    pub const INT4: Self = Self {
        kind: tch::Kind::BFloat16,
        weights: WeightFormat::Int4 { group: INT4_GROUP },
        head: WeightFormat::Int8,
    };

    /// `f32`, `bf16`, `f16`, `int8` or `int4`, as ListModels reports it.
    pub fn name(&self) -> &'static str {
        match self.weights {
            WeightFormat::Dense => crate::device::dtype_name(self.kind),
            WeightFormat::Int8 => "int8",
            WeightFormat::Int4 { .. } => "int4",
        }
    }

    /// Quantises (or keeps) one projection's `[out, in]` weight.
    pub fn linear(&self, w: tch::Tensor) -> Result<Linear, tch::TchError> {
        Self::quantize(self.weights, w)
    }

    /// Quantises (or keeps) the LM head's `[vocab, hidden]` weight.
    pub fn head(&self, w: tch::Tensor) -> Result<Linear, tch::TchError> {
        Self::quantize(self.head, w)
    }

    fn quantize(format: WeightFormat, w: tch::Tensor) -> Result<Linear, tch::TchError> {
        match format {
            WeightFormat::Dense => Ok(Linear::Dense(w)),
            WeightFormat::Int8 => Linear::quantize_int8(&w),
            WeightFormat::Int4 { group } => Linear::quantize_int4(&w, group),
        }
    }
}

/// Input features per int4 group of `--dtype int4`. The checkpoint's own
/// weights are 5-bit blocks of 32 (Q5_0, most of the Q4_K_M GGUF), and
/// groups of 32 keep the probe set's answers where groups of 64 or 128
/// changed them (BENCHMARKS.md, "Run 9").
pub const INT4_GROUP: i64 = 32;
