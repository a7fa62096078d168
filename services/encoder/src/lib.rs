//! `moltbot-encoder`: the sentence encoder shared by the understanding and
//! retrieval services — a BERT-family forward pass on libtorch (`tch`), as
//! `transformers`' `modeling_bert.py`, with sentence-transformers' mean
//! pooling over the attention mask and L2 normalisation. The default model
//! is all-MiniLM-L6-v2 (6 layers, 384 dimensions, 256-token limit).
//!
//! - [`Encoder::load`] reads `config.json`, `model.safetensors`,
//!   `tokenizer.json` and `sentence_bert_config.json` of a model directory;
//! - [`Encoder::embed`] embeds a batch, padded to its longest text, and
//!   reports each text's token count and whether it was truncated;
//! - [`Batcher`] groups concurrent callers into one forward pass.

mod batcher;
mod bert;
mod error;

pub use batcher::{BatchConfig, Batcher};

use std::path::Path;

pub use bert::BertConfig;
pub use error::EncoderError;
use tch::{Device, Kind, Tensor};

/// One embedded text.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedded {
    /// L2-normalised vector, `dimension` f32 values.
    pub vector: Vec<f32>,
    /// Tokens the text took after truncation (special tokens included).
    pub tokens: usize,
    /// Whether the text was longer than the limit and cut.
    pub truncated: bool,
}

/// libtorch intra-op threads for a service that serves an encoder over
/// gRPC: `requested` when not 0, else every core but one (at least one).
/// The core left over runs the async runtime (HTTP/2, protobuf, the head)
/// instead of fighting libtorch's spinning OpenMP workers for it. Measured
/// on 2 cores (`moltbot-understanding-bench`, BENCHMARKS.md): 1 intra-op
/// thread gave Classify p50 6.2 ms and 376 calls/s at 8 callers, 2 threads
/// 9.3 ms and 290/s, with the same throughput at 64 callers.
pub fn serving_threads(requested: usize) -> usize {
    if requested > 0 {
        return requested;
    }
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

/// Arithmetic of the encoder's dense layers and attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precision {
    /// f32 throughout: transformers' eager arithmetic up to summation order.
    F32,
    /// Mixed precision as `torch.autocast("cpu", torch.bfloat16)`: dense
    /// layers (weights stored in bf16, half the bytes), GELU and attention
    /// in bfloat16; embeddings, residual stream, LayerNorm and pooling in
    /// f32. On a CPU with AVX512-BF16 about 2.9× transformers' f32
    /// throughput at batch 32 with cosine ≥ 0.9999 to its f32 embeddings
    /// (`BENCHMARKS.md`); without native bf16 it is slower than f32.
    Bf16,
}

impl Precision {
    /// bf16 where `device` is a CPU that multiplies bf16 natively
    /// (AVX512-BF16: Cooper Lake, Sapphire Rapids and later with AMX, Zen 4
    /// and later), else f32.
    pub fn native(device: Device) -> Self {
        #[cfg(target_arch = "x86_64")]
        if device == Device::Cpu && std::arch::is_x86_feature_detected!("avx512bf16") {
            return Precision::Bf16;
        }
        let _ = device;
        Precision::F32
    }

    /// `auto` ([`Precision::native`] for `device`), `f32` or `bf16`; errors
    /// with a message naming the choices.
    pub fn choose(spec: &str, device: Device) -> Result<Self, String> {
        match spec {
            "auto" => Ok(Self::native(device)),
            other => other.parse(),
        }
    }

    /// [`Precision::choose`] on the CPU, as a clap value parser: a flag's
    /// `auto` is resolved, and a bad value rejected with the choices, while
    /// the arguments are parsed.
    pub fn parse_cpu(spec: &str) -> Result<Self, String> {
        Self::choose(spec, Device::Cpu)
    }

    /// The dtype of the dense weights.
    fn dense_kind(self) -> Kind {
        match self {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    /// `f32` or `bf16`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!(
                "unknown encoder precision {other:?}: use auto, f32 or bf16"
            )),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

/// A loaded sentence encoder.
pub struct Encoder {
    model: bert::Bert,
    tokenizer: tokenizers::Tokenizer,
    max_tokens: usize,
    device: Device,
    precision: Precision,
    id: String,
}

impl Encoder {
    /// Loads the model in `dir` onto `device` (f32). Errors with
    /// [`EncoderError::Load`] for a missing or unreadable file.
    pub fn load(dir: &Path, device: Device) -> Result<Self, EncoderError> {
        Self::load_with(dir, device, Precision::F32)
    }

    /// [`Encoder::load`] computing in `precision`.
    pub fn load_with(
        dir: &Path,
        device: Device,
        precision: Precision,
    ) -> Result<Self, EncoderError> {
        Self::open(dir, device, None, precision)
    }

    /// [`Encoder::load`] with the weights as trainable variables of `vars`
    /// (see [`Encoder::forward`]); saving that `VarStore` as
    /// `model.safetensors` next to copies of this directory's other files
    /// gives a directory [`Encoder::load`] reads.
    pub fn load_into(
        dir: &Path,
        device: Device,
        vars: Option<&tch::nn::Path>,
    ) -> Result<Self, EncoderError> {
        Self::open(dir, device, vars, Precision::F32)
    }

    fn open(
        dir: &Path,
        device: Device,
        vars: Option<&tch::nn::Path>,
        precision: Precision,
    ) -> Result<Self, EncoderError> {
        let load =
            |what: &str, e: String| EncoderError::Load(format!("{}/{what}: {e}", dir.display()));
        let config: BertConfig = serde_json::from_str(
            &std::fs::read_to_string(dir.join("config.json"))
                .map_err(|e| load("config.json", e.to_string()))?,
        )
        .map_err(|e| load("config.json", e.to_string()))?;
        let max_tokens = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("max_seq_length").and_then(serde_json::Value::as_u64))
            .map_or(config.max_position_embeddings, |n| n as usize)
            .min(config.max_position_embeddings);
        let mut tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load("tokenizer.json", e.to_string()))?;
        // Truncation is ours (we report it); padding is ours (to the batch).
        let _ = tokenizer.with_truncation(None);
        tokenizer.with_padding(None);
        let model = bert::Bert::load_into(
            &config,
            &dir.join("model.safetensors"),
            device,
            vars,
            precision.dense_kind(),
        )?;
        let id = dir
            .file_name()
            .map_or_else(|| "encoder".into(), |n| n.to_string_lossy().into_owned());
        Ok(Self {
            model,
            tokenizer,
            max_tokens,
            device,
            precision,
            id,
        })
    }

    /// Output dimension (384 for MiniLM-L6).
    pub fn dimension(&self) -> usize {
        self.model.config().hidden_size
    }

    /// The arithmetic it computes in.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The device it runs on.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Token limit per text, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    /// Model identifier (the directory name).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Token ids of `text` with `[CLS]`/`[SEP]`, cut to the limit (keeping
    /// the final `[SEP]`), and whether it was cut.
    pub fn tokenize(&self, text: &str) -> Result<(Vec<i64>, bool), EncoderError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| EncoderError::Tokenizer(e.to_string()))?;
        let mut ids: Vec<i64> = enc.get_ids().iter().map(|&i| i64::from(i)).collect();
        let truncated = ids.len() > self.max_tokens;
        if truncated {
            let sep = ids.last().copied().unwrap_or_default();
            ids.truncate(self.max_tokens - 1);
            ids.push(sep);
        }
        Ok((ids, truncated))
    }

    /// Token ids and attention mask of `texts`, padded to the longest:
    /// `[batch, len]` i64 each, on the encoder's device.
    pub fn batch(&self, texts: &[&str]) -> Result<(Tensor, Tensor), EncoderError> {
        let tokenized = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>, _>>()?;
        self.pad(&tokenized)
    }

    /// Pads tokenized texts to the longest: ids and mask `[batch, len]`.
    fn pad(&self, tokenized: &[(Vec<i64>, bool)]) -> Result<(Tensor, Tensor), EncoderError> {
        let len = tokenized
            .iter()
            .map(|(ids, _)| ids.len())
            .max()
            .unwrap_or(1);
        let b = tokenized.len();
        let mut ids = vec![0i64; b * len];
        let mut mask = vec![0i64; b * len];
        for (i, (t, _)) in tokenized.iter().enumerate() {
            ids[i * len..i * len + t.len()].copy_from_slice(t);
            mask[i * len..i * len + t.len()].fill(1);
        }
        let shape = [b as i64, len as i64];
        let ids = Tensor::f_from_slice(&ids)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        let mask = Tensor::f_from_slice(&mask)?
            .f_view(shape)?
            .f_to_device(self.device)?;
        Ok((ids, mask))
    }

    /// Sentence embeddings `[batch, dim]` of a [`Encoder::batch`], with
    /// gradients (fine-tuning).
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor, EncoderError> {
        Ok(self.model.forward(ids, mask)?)
    }

    /// Embeds `texts` in one forward pass, padded to the longest. Errors with
    /// [`EncoderError::Tensor`] (out of memory, …) or a tokenizer failure.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Embedded>, EncoderError> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let tokenized = texts
            .iter()
            .map(|t| self.tokenize(t))
            .collect::<Result<Vec<_>, _>>()?;
        let (ids, mask) = self.pad(&tokenized)?;
        let pooled = self.model.embed(&ids, &mask)?;
        let flat = Vec::<f32>::try_from(
            &pooled
                .f_to_device(Device::Cpu)?
                .f_to_kind(Kind::Float)?
                .f_view([-1])?,
        )?;
        let d = self.dimension();
        Ok(tokenized
            .into_iter()
            .enumerate()
            .map(|(i, (t, truncated))| Embedded {
                vector: flat[i * d..(i + 1) * d].to_vec(),
                tokens: t.len(),
                truncated,
            })
            .collect())
    }
}
