//! The checkpoint's tokenizer (`tokenizer.json`, Hugging Face `tokenizers`)
//! and chat template (Jinja, rendered with `minijinja` exactly as
//! `transformers`' `apply_chat_template(add_generation_prompt=True)`).
//!
//! Message content is text, never markup (OWASP LLM01): control tokens the
//! template writes (`<|im_start|>`, `<|im_end|>`) are parsed as such, while
//! the same strings typed inside a message are tokenised as plain text, so a
//! user cannot open a system turn of their own. [`ChatTokenizer::encode_chat`]
//! renders the template around unguessable placeholders and encodes the
//! template's text and each message's content separately.

use std::{path::Path, sync::Arc};

use minijinja::{Environment, context};
use serde::Serialize;

use crate::GenerationError;

/// One message for the chat template.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text.
    pub content: String,
    /// An assistant message's function calls, in OpenAI's shape
    /// (`{"id", "type": "function", "function": {"name", "arguments"}}`,
    /// the arguments a JSON object) as chat templates read them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<serde_json::Value>,
    /// A tool message: the id of the call it answers.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub tool_call_id: String,
}

/// Tokenizer and chat template of one model.
#[derive(Clone)]
pub struct ChatTokenizer {
    /// Special tokens in the text are parsed (the template's own text).
    tokenizer: Arc<tokenizers::Tokenizer>,
    /// Special tokens in the text are plain text (message content).
    plain: Arc<tokenizers::Tokenizer>,
    env: Arc<Environment<'static>>,
    eos_ids: Vec<u32>,
    /// `tokenizer.json`, for the token → bytes table.
    path: Arc<std::path::PathBuf>,
    /// Every token's bytes, built on first use ([`Self::token_table`]).
    bytes: Arc<std::sync::OnceLock<Result<Vec<Vec<u8>>, String>>>,
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
        Self::from_parts(tokenizer, template, eos_ids, dir.join("tokenizer.json")).map_err(load_err)
    }

    /// A chat tokenizer from a loaded `tokenizer`, a Jinja chat `template`
    /// and the `eos_ids`; `path` is the `tokenizer.json` the token table is
    /// read from ([`Self::token_table`]). Errors with the reason the
    /// template does not compile.
    pub fn from_parts(
        tokenizer: tokenizers::Tokenizer,
        template: String,
        eos_ids: Vec<u32>,
        path: std::path::PathBuf,
    ) -> Result<Self, String> {
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
            .map_err(|e| format!("chat template: {e}"))?;
        let mut plain = tokenizer.clone();
        plain.set_encode_special_tokens(true);
        Ok(Self {
            tokenizer: Arc::new(tokenizer),
            plain: Arc::new(plain),
            env: Arc::new(env),
            eos_ids,
            path: Arc::new(path),
            bytes: Arc::new(std::sync::OnceLock::new()),
        })
    }

    /// Every token's bytes, by id, as llguidance reads them from
    /// `tokenizer.json` (byte-level BPE pieces undone; a special token's
    /// content behind a 0xFF marker). Built on first use and shared by the
    /// log probabilities and the grammar compiler. Errors with the reason
    /// the file could not be read.
    pub fn token_table(&self) -> Result<&[Vec<u8>], String> {
        self.bytes
            .get_or_init(|| {
                let raw = std::fs::read_to_string(self.path.as_ref())
                    .map_err(|e| format!("tokenizer.json: {e}"))?;
                let json: serde_json::Value =
                    serde_json::from_str(&raw).map_err(|e| format!("tokenizer.json: {e}"))?;
                llguidance::token_bytes_from_tokenizer_json(&json)
                    .map_err(|e| format!("tokenizer.json: {e}"))
            })
            .as_ref()
            .map(Vec::as_slice)
            .map_err(Clone::clone)
    }

    /// The exact bytes of token `id` ([`Self::token_table`] without the
    /// special-token marker); none for an unknown id or an unreadable file.
    pub fn token_bytes(&self, id: u32) -> Vec<u8> {
        let mut bytes = self
            .token_table()
            .ok()
            .and_then(|table| table.get(id as usize).cloned())
            .unwrap_or_default();
        // llguidance marks special tokens with a leading 0xFF.
        if bytes.first() == Some(&0xFF) {
            bytes.remove(0);
        }
        bytes
    }

    /// The tokenizer that reads special-token strings as plain text.
    pub fn plain(&self) -> Arc<tokenizers::Tokenizer> {
        self.plain.clone()
    }

    /// Token ids that end generation.
    pub fn eos_ids(&self) -> &[u32] {
        &self.eos_ids
    }

    /// The prompt text: `messages` through the chat template, with the
    /// assistant's generation prompt appended.
    pub fn render(&self, messages: &[ChatMessage]) -> Result<String, GenerationError> {
        self.render_with_tools(messages, &[])
    }

    /// [`Self::render`] with the functions the model may call (the
    /// template's `tools` variable, OpenAI's shape); none when empty.
    pub fn render_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<String, GenerationError> {
        let template = self
            .env
            .get_template(TEMPLATE)
            .map_err(|e| GenerationError::Tokenizer(e.to_string()))?;
        let tools = (!tools.is_empty()).then_some(tools);
        template
            .render(
                context! { messages => messages, tools => tools, add_generation_prompt => true },
            )
            .map_err(|e| GenerationError::Tokenizer(format!("chat template: {e}")))
    }

    /// Token ids of `text` as plain text: a control token written in it
    /// (`<|im_start|>`) is tokenised as the characters it consists of. No
    /// BOS/EOS added. Errors with [`GenerationError::Tokenizer`].
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, GenerationError> {
        encode_with(&self.plain, text)
    }

    /// The prompt's token ids: `messages` through the chat template, the
    /// template's text with its control tokens, each message's content as
    /// plain text ([`Self::encode`]). For ordinary content the ids equal
    /// encoding the rendered prompt whole (a unit test checks it). Errors
    /// with [`GenerationError::Tokenizer`].
    pub fn encode_chat(&self, messages: &[ChatMessage]) -> Result<Vec<u32>, GenerationError> {
        self.encode_chat_with_tools(messages, &[])
    }

    /// [`Self::encode_chat`] with `tools` in the template
    /// ([`Self::render_with_tools`]). Tool definitions and call arguments
    /// are template text (control tokens live): callers refuse markup in
    /// them first (`text::tools::check_markup`).
    pub fn encode_chat_with_tools(
        &self,
        messages: &[ChatMessage],
        tools: &[serde_json::Value],
    ) -> Result<Vec<u32>, GenerationError> {
        // Placeholders nobody can type: a per-call random nonce between
        // private-use characters.
        let nonce = {
            use std::hash::{BuildHasher, Hasher};
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_usize(messages.len());
            h.finish()
        };
        let open = format!("\u{E000}{nonce:016x}:");
        let masked: Vec<ChatMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| ChatMessage {
                role: m.role.clone(),
                // Empty stays empty: templates test it (an assistant turn
                // that only calls functions).
                content: if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{open}{i}\u{E001}")
                },
                tool_calls: m.tool_calls.clone(),
                tool_call_id: m.tool_call_id.clone(),
            })
            .collect();
        let rendered = self.render_with_tools(&masked, tools)?;
        let mut ids = Vec::new();
        let mut rest = rendered.as_str();
        while let Some(at) = rest.find(&open) {
            ids.extend(encode_with(&self.tokenizer, &rest[..at])?);
            let after = &rest[at + open.len()..];
            let end = after.find('\u{E001}').ok_or_else(|| {
                GenerationError::Tokenizer("chat template cut a message placeholder".into())
            })?;
            let index: usize = after[..end].parse().map_err(|_| {
                GenerationError::Tokenizer("chat template altered a message placeholder".into())
            })?;
            let message = messages.get(index).ok_or_else(|| {
                GenerationError::Tokenizer("chat template altered a message placeholder".into())
            })?;
            ids.extend(self.encode(&message.content)?);
            rest = &after[end + '\u{E001}'.len_utf8()..];
        }
        ids.extend(encode_with(&self.tokenizer, rest)?);
        Ok(ids)
    }

    /// Text of `ids`, special tokens skipped.
    pub fn decode(&self, ids: &[u32]) -> Result<String, GenerationError> {
        self.tokenizer
            .decode(ids, true)
            .map_err(|e| GenerationError::Tokenizer(e.to_string()))
    }
}

fn encode_with(tokenizer: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>, GenerationError> {
    if text.is_empty() {
        return Ok(Vec::new());
    }
    tokenizer
        .encode(text, false)
        .map(|e| e.get_ids().to_vec())
        .map_err(|e| GenerationError::Tokenizer(e.to_string()))
}
