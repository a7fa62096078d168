//! The OpenAI Embeddings wire format (`POST /v1/embeddings`), field names as
//! in <https://platform.openai.com/docs/api-reference/embeddings>.

use serde::{Deserialize, Serialize};

/// `input`: one text, a list of texts, or pre-tokenised input (token ids of
/// OpenAI's tokenizer, which MoltBot's encoder does not use: refused with
/// 400).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum EmbeddingInput {
    /// One text.
    One(String),
    /// Several texts, answered in order.
    Many(Vec<String>),
    /// One list of token ids.
    Tokens(Vec<i64>),
    /// Several lists of token ids.
    TokenLists(Vec<Vec<i64>>),
}

/// `POST /v1/embeddings` body. Unknown fields are refused with 400 naming
/// them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbeddingRequest {
    /// The embedding model (`all-minilm-l6-v2`).
    pub model: String,
    /// What to embed: 1 to 2048 non-empty texts.
    pub input: EmbeddingInput,
    /// `float` (default) or `base64` (little-endian f32, as OpenAI encodes).
    #[serde(default)]
    pub encoding_format: Option<String>,
    /// Vector length; all-MiniLM-L6-v2 has a fixed 384 (it was not trained
    /// for shortened vectors), so only 384 is accepted.
    #[serde(default)]
    pub dimensions: Option<u32>,
    /// End-user id, at most 256 characters; logs carry a digest of it.
    #[serde(default)]
    pub user: Option<String>,
}

/// One vector, as floats or base64.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum Vector {
    /// `encoding_format: float`.
    Float(Vec<f32>),
    /// `encoding_format: base64`.
    Base64(String),
}

/// One entry of `data`.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingObject {
    /// Always `embedding`.
    pub object: &'static str,
    /// Position of the text in `input`.
    pub index: usize,
    /// The unit-length vector (384 floats).
    pub embedding: Vector,
}

/// Tokens the encoder read.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EmbeddingUsage {
    /// Encoder tokens of all inputs, special tokens included.
    pub prompt_tokens: u32,
    /// The same (embeddings generate nothing).
    pub total_tokens: u32,
}

/// `POST /v1/embeddings` answer.
#[derive(Debug, Clone, Serialize)]
pub struct EmbeddingList {
    /// Always `list`.
    pub object: &'static str,
    /// One entry per input, in order.
    pub data: Vec<EmbeddingObject>,
    /// The model that embedded.
    pub model: String,
    /// Token usage.
    pub usage: EmbeddingUsage,
}
