//! The [`Backend`] trait — what the gRPC layer needs from a model, local or
//! remote — and [`LocalBackend`], a checkpoint on libtorch behind its own
//! continuous-batching [`Engine`]. The remote-provider backend of the
//! auth-rotation service implements the same trait.

use std::{path::Path, time::Instant};

use tokio::sync::mpsc;

use crate::{
    GenerationError,
    device::device_name,
    engine::{Engine, EngineConfig, Event, Finish, Job},
    model::{Decoder, Precision},
    sampling::SamplingConfig,
    text::{
        ChatMessage, ChatTokenizer,
        grammar::{Grammars, ResponseFormat},
        tools::{self, ToolRequest},
    },
};

/// Static description and live load of a served model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCard {
    /// Name used in requests.
    pub name: String,
    /// Context length in tokens.
    pub context_length: usize,
    /// `cpu`, `cuda:0`, or `remote`.
    pub device: String,
    /// `f32`, `bf16`, `f16`.
    pub dtype: String,
    /// `local` or the provider's name.
    pub backend: String,
    /// Sequences in the running batch.
    pub active_sequences: usize,
    /// Requests waiting.
    pub queued_requests: usize,
    /// Largest batch.
    pub max_batch_size: usize,
}

/// A validated generation request.
#[derive(Debug, Clone)]
pub struct GenerateInput {
    /// The conversation, oldest first.
    pub messages: Vec<ChatMessage>,
    /// Most completion tokens; `None` = the server default (capped by what
    /// the context leaves).
    pub max_tokens: Option<usize>,
    /// Sampling parameters (validated).
    pub sampling: SamplingConfig,
    /// Stop sequences.
    pub stop: Vec<String>,
    /// The shape the answer must take (structured outputs); `None`: text.
    pub response_format: Option<ResponseFormat>,
    /// Functions the model may call; `None`: none (or `tool_choice` none).
    pub tools: Option<ToolRequest>,
    /// Report token log probabilities with this many alternatives; `None`:
    /// none.
    pub logprobs: Option<usize>,
    /// Arrival time, for time to first token.
    pub received: Instant,
    /// A digest of the request's session id (`s-…`, empty without one):
    /// the affinity an in-cluster engine's router may keep a conversation
    /// on (`remote/mod.rs`).
    pub affinity: String,
}

/// A model the service can serve.
#[tonic::async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Description and live load.
    fn card(&self) -> ModelCard;

    /// Tokens of `messages` as one templated prompt (0 when empty) and of
    /// each of `texts`. Errors with [`GenerationError::Tokenizer`].
    fn count_tokens(
        &self,
        messages: &[ChatMessage],
        texts: &[String],
    ) -> Result<(usize, Vec<usize>), GenerationError>;

    /// Starts generating; events arrive on the returned channel, and dropping
    /// it cancels the request. Errors before any token: context overflow,
    /// queue full, tokenizer failure.
    async fn generate(
        &self,
        input: GenerateInput,
    ) -> Result<mpsc::UnboundedReceiver<Event>, GenerationError>;
}

/// A local checkpoint served by a continuous-batching engine.
pub struct LocalBackend {
    name: String,
    tokenizer: ChatTokenizer,
    grammars: Grammars,
    engine: Engine,
    context_length: usize,
    device: String,
    dtype: String,
    default_max_tokens: usize,
}

impl LocalBackend {
    /// Loads the checkpoint in `dir` (named after the directory) onto
    /// `device` in `precision` and starts its engine. Blocking: seconds for a 0.5B
    /// model. Errors with [`GenerationError::Load`].
    pub fn load(
        dir: &Path,
        device: tch::Device,
        precision: Precision,
        engine: EngineConfig,
        default_max_tokens: usize,
    ) -> Result<Self, GenerationError> {
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "model".into());
        Self::load_as(dir, &name, device, precision, engine, default_max_tokens)
    }

    /// [`LocalBackend::load`], served as `name` (a new version of a served
    /// model loads beside it under another name).
    pub fn load_as(
        dir: &Path,
        name: &str,
        device: tch::Device,
        precision: Precision,
        engine: EngineConfig,
        default_max_tokens: usize,
    ) -> Result<Self, GenerationError> {
        let name = name.to_owned();
        let decoder = Decoder::load_with(dir, device, precision)?;
        let config = decoder.config().clone();
        let eos = eos_ids(dir, config.eos_token_id.as_ref().map(|e| e.to_vec()));
        let tokenizer = ChatTokenizer::load(dir, eos)?;
        let grammars = Grammars::new(tokenizer.clone(), config.vocab_size);
        tracing::info!(model = %name, device = %device_name(device), dtype = precision.name(), layers = config.num_hidden_layers, "model loaded");
        Ok(Self {
            engine: Engine::start(&name, decoder, tokenizer.clone(), engine)?,
            name,
            tokenizer,
            grammars,
            context_length: config.max_position_embeddings,
            device: device_name(device),
            dtype: precision.name().into(),
            default_max_tokens,
        })
    }

    /// The model's tokenizer.
    pub fn tokenizer(&self) -> &ChatTokenizer {
        &self.tokenizer
    }
}

/// With tools the answer's text is held until it ends, then split into
/// its text and its function calls ([`tools::parse`]): text deltas cannot
/// be sent before it is known whether they are a call. The text goes out
/// as one delta, each call as an [`Event::ToolCall`], and the finish reason
/// becomes [`Finish::ToolCalls`] when there were calls.
fn calls_parsed(mut rx: mpsc::UnboundedReceiver<Event>) -> mpsc::UnboundedReceiver<Event> {
    let (tx, out) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut text = String::new();
        let mut ids = Vec::new();
        let mut logprobs = Vec::new();
        loop {
            tokio::select! {
                // The caller went away: dropping `rx` cancels the sequence.
                () = tx.closed() => return,
                event = rx.recv() => match event {
                    Some(Event::Delta { text: t, token_ids, logprobs: l }) => {
                        text.push_str(&t);
                        ids.extend(token_ids);
                        logprobs.extend(l);
                    }
                    Some(Event::Finished { reason, usage }) => {
                        let (content, calls) = tools::parse(&text);
                        if !content.is_empty() {
                            let _ = tx.send(Event::Delta {
                                text: content,
                                token_ids: std::mem::take(&mut ids),
                                logprobs: std::mem::take(&mut logprobs),
                            });
                        }
                        let reason = if calls.is_empty() { reason } else { Finish::ToolCalls };
                        for call in calls {
                            let _ = tx.send(Event::ToolCall {
                                id: new_call_id(),
                                name: call.name,
                                arguments: call.arguments,
                            });
                        }
                        let _ = tx.send(Event::Finished { reason, usage });
                        return;
                    }
                    Some(other) => {
                        let _ = tx.send(other);
                    }
                    None => return,
                },
            }
        }
    });
    out
}

/// `call_` and 24 hex digits, as OpenAI's call ids look: unique per
/// process (a counter) and unpredictable across processes (SipHash with a
/// random key, the standard library's `RandomState`).
fn new_call_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(n);
    let high = h.finish();
    h.write_u64(!n);
    format!("call_{high:016x}{:08x}", h.finish() as u32)
}

/// Appends `instruction` to the first system message, or puts it first as
/// one.
fn with_instruction(messages: &mut Vec<ChatMessage>, instruction: &str) {
    match messages.iter_mut().find(|m| m.role == "system") {
        Some(system) => {
            system.content.push_str("\n\n");
            system.content.push_str(instruction);
        }
        None => messages.insert(
            0,
            ChatMessage {
                role: "system".to_owned(),
                content: instruction.to_owned(),
                ..Default::default()
            },
        ),
    }
}

/// EOS ids from `generation_config.json`, else `config.json`'s.
fn eos_ids(dir: &Path, from_config: Option<Vec<u32>>) -> Vec<u32> {
    let from_generation = std::fs::read_to_string(dir.join("generation_config.json"))
        .ok()
        .and_then(|raw| serde_json::from_str::<serde_json::Value>(&raw).ok())
        .and_then(|v| v.get("eos_token_id").cloned())
        .and_then(|v| serde_json::from_value::<crate::model::config::TokenIds>(v).ok())
        .map(|ids| ids.to_vec());
    from_generation.or(from_config).unwrap_or_default()
}

#[tonic::async_trait]
impl Backend for LocalBackend {
    fn card(&self) -> ModelCard {
        let load = self.engine.load();
        ModelCard {
            name: self.name.clone(),
            context_length: self.context_length,
            device: self.device.clone(),
            dtype: self.dtype.clone(),
            backend: "local".into(),
            active_sequences: load.active.load(std::sync::atomic::Ordering::SeqCst),
            queued_requests: load.queued.load(std::sync::atomic::Ordering::SeqCst),
            max_batch_size: self.engine.config().max_batch_size,
        }
    }

    fn count_tokens(
        &self,
        messages: &[ChatMessage],
        texts: &[String],
    ) -> Result<(usize, Vec<usize>), GenerationError> {
        let prompt = if messages.is_empty() {
            0
        } else {
            self.tokenizer.encode_chat(messages)?.len()
        };
        let texts = texts
            .iter()
            .map(|t| self.tokenizer.encode(t).map(|ids| ids.len()))
            .collect::<Result<_, _>>()?;
        Ok((prompt, texts))
    }

    async fn generate(
        &self,
        input: GenerateInput,
    ) -> Result<mpsc::UnboundedReceiver<Event>, GenerationError> {
        let mut messages = input.messages;
        if let Some(format) = &input.response_format {
            with_instruction(&mut messages, &format.instruction());
        }
        let template_tools = input
            .tools
            .as_ref()
            .map(ToolRequest::template_tools)
            .unwrap_or_default();
        let prompt_ids = self
            .tokenizer
            .encode_chat_with_tools(&messages, &template_tools)?;
        let room = self.context_length.saturating_sub(prompt_ids.len());
        let max_tokens = match input.max_tokens {
            Some(n) if prompt_ids.len() + n > self.context_length => {
                return Err(GenerationError::ContextOverflow {
                    prompt_tokens: prompt_ids.len(),
                    max_tokens: n,
                    context_length: self.context_length,
                });
            }
            Some(n) => n,
            None if room == 0 => {
                return Err(GenerationError::ContextOverflow {
                    prompt_tokens: prompt_ids.len(),
                    max_tokens: 1,
                    context_length: self.context_length,
                });
            }
            None => self.default_max_tokens.min(room),
        };
        // Compiling a schema (and, the first time, the vocabulary's trie)
        // is CPU work: off the async workers.
        let lark = input.tools.as_ref().and_then(ToolRequest::grammar);
        let constraint = match (input.response_format, lark) {
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(GenerationError::InvalidArgument(
                    "a required tool call and a response_format cannot both constrain one answer; drop one".to_owned(),
                ));
            }
            (format, lark) => {
                let grammars = self.grammars.clone();
                let compiled = tokio::task::spawn_blocking(move || match (format, lark) {
                    (Some(format), _) => grammars.compile(&format),
                    (None, Some(lark)) => grammars.compile_lark(lark, "tool_choice"),
                    (None, None) => Err(GenerationError::Constraint("no constraint".into())),
                })
                .await
                .map_err(|e| GenerationError::Constraint(e.to_string()))??;
                Some(compiled)
            }
        };
        let (events, rx) = mpsc::unbounded_channel();
        self.engine.submit(Job {
            prompt_ids,
            max_tokens,
            sampling: input.sampling,
            stop: input.stop,
            received: input.received,
            events,
            constraint,
            logprobs: input.logprobs,
        })?;
        Ok(match input.tools {
            Some(_) => calls_parsed(rx),
            None => rx,
        })
    }
}
