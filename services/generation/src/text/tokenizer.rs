//! The checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`)
//! and chat template (Jinja, rendered with `minijinja` exactly as
//! `transformers`' `apply_chat_template(add_generation_prompt=True)`).

use std::{path::Path, sync::Arc};

use minijinja::{Environment, context};
use serde::Serialize;

use crate::GenerationError;

/// One message for the chat template.
#[derive(Debug, Clone, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
}

/// Tokenizer and chat template of one model.
#[derive(Clone)]
pub struct ChatTokenizer {
    tokenizer: Arc<tokenizers::Tokenizer>,
    env: Arc<Environment<'static>>,
    eos_ids: Vec<u32>,
}

const TEMPLATE: &str = "chat";

fn read_template(dir: &Path) -> Result<String, String> {
    if let Ok(t) = std::fs::read_to_string(dir.join("chat_template.jinja")) {
        return Ok(t);
    }
    let raw = std::fs::read_to_string(dir.join("tokenizer_config.json"))
        .map_err(|e| format!("no chat_template.jinja and tokenizer_config.json: {e}"))?;
    let cfg: serde_json::Value = serde_json::from_str(&raw).map_err(|e| e.to_string())?;
    cfg.get("chat_template")
        .and_then(|t| t.as_str())
        .map(str::to_owned)
        .ok_or_else(|| "tokenizer_config.json has no chat_template".into())
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and the chat template of `dir`. `eos_ids` end
    /// generation (from `generation_config.json` or `config.json`). Errors
    /// with [`GenerationError::Load`].
    pub fn load(dir: &Path, eos_ids: Vec<u32>) -> Result<Self, GenerationError> {
        let load_err = |reason: String| GenerationError::Load {
            path: dir.display().to_string(),
            reason,
        };
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(|e| load_err(format!("tokenizer.json: {e}")))?;
        let template = read_template(dir).map_err(load_err)?;
        let mut env = Environment::new();
        env.add_function(
            "raise_exception",
            |msg: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned(TEMPLATE, template)
            .map_err(|e| load_err(format!("chat template: {e}")))?;
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            env: Arc::new(env),
            eos_ids,
        })
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The prompt text: `messages` through the chat template, with the
    /// assistant's generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, GenerationError> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| GenerationError::Tokenizer(e.to_string()))?;
        template
            .render(context! { messages => messages, add_generation_prompt => true })
            .map_err(|e| GenerationError::Tokenizer(format!("chat template: {e}")))
    }

    /// Token ids of `text` (special tokens written in it are recognised; no
    /// BOS/EOS added, as `apply_chat_template(tokenize=True)`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GenerationError> {
        self.tokenizer
            .encode(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| GenerationError::Tokenizer(e.to_string()))
    }

    /// The prompt's token ids: [`Self::render`] then [`Self::encode`].
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, GenerationError> {
        self.encode(&self.render(messages)?)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, GenerationError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| GenerationError::Tokenizer(e.to_string()))
    }
}
