//! `config.json` of a Hugging Face Llama/Qwen2 checkpoint: the fields the
//! forward pass needs, with the upstream defaults of `transformers`'
//! `LlamaConfig` / `Qwen2Config` where a field may be absent.

use serde::Deserialize;

/// One EOS id or several (`generation_config.json` style).
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a list.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            Self::One(id) => vec![*id],
            Self::Many(ids) => ids.clone(),
        }
    }
}

/// Architecture hyper-parameters of a decoder checkpoint.
#[derive(Debug, Clone, Deserialize)]
pub struct ModelConfig {
    /// `qwen2` or `llama` (also `mistral`, which shares the layout).
    pub model_type: String,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (grouped-query attention); defaults to the query heads.
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
    /// Per-head width; defaults to `hidden_size / num_attention_heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    /// Context length in tokens.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base θ (Su et al. 2021, "RoFormer"); 10 000 when absent.
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// Vocabulary size (rows of the embedding matrix).
    pub vocab_size: usize,
    /// Whether the LM head reuses the embedding matrix.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether q/k/v projections carry biases; Qwen2 always does.
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// End-of-sequence id(s).
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
}

fn default_rope_theta() -> f64 {
    10_000.0
}

impl ModelConfig {
    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v projections have biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias.unwrap_or(self.model_type == "qwen2")
    }

    /// Checks the shapes fit together. Errors with what is inconsistent.
    pub fn validate(&self) -> Result<(), String> {
        let supported = ["qwen2", "llama", "mistral"];
        if !supported.contains(&self.model_type.as_str()) {
            return Err(format!(
                "model_type {:?} is not one of {supported:?}",
                self.model_type
            ));
        }
        if self.num_attention_heads == 0
            || self.kv_heads() == 0
            || !self.num_attention_heads.is_multiple_of(self.kv_heads())
        {
            return Err(format!(
                "{} attention heads are not a multiple of {} key/value heads",
                self.num_attention_heads,
                self.kv_heads()
            ));
        }
        if !self.head_dim().is_multiple_of(2) {
            return Err(format!(
                "head_dim {} is odd; RoPE needs pairs",
                self.head_dim()
            ));
        }
        Ok(())
    }
}
