//! Grammar-constrained decoding with `llguidance` (the library behind
//! llama.cpp's and vLLM's structured outputs): an answer that must be JSON,
//! or JSON valid against a schema, gets a token mask at every step, so only
//! tokens that keep the text a prefix of a valid answer can be sampled. EOS
//! is allowed only where the answer is complete.
//!
//! [`Grammars`] belongs to one model: the token trie built from its
//! token table ([`ChatTokenizer::token_table`], shared with the log
//! probabilities) and llguidance's parser factory,
//! built on first use (about a second) so a model that never sees a
//! constraint does not pay for it. [`Constraint`] is one request's matcher.
//!
//! JSON is generated compact except for one space after `:` and `,`
//! (`{"a": 1, "b": [2, 3]}`): with llguidance's default flexible whitespace
//! a small model can emit newlines until `max_tokens` runs out.
//!
//! The schema subset is llguidance's, listed in the README ("The gateway",
//! structured outputs): types, `properties`/`required`/
//! `additionalProperties`, `items`, `prefixItems`, `enum`/`const`,
//! `anyOf`/`oneOf`/`allOf`, `$ref`/`$defs`, string `pattern`/`format`/
//! length, numeric bounds, array length. A schema with anything else is
//! refused with the keyword named.

use std::sync::{Arc, OnceLock};

use llguidance::{Matcher, ParserFactory, api::TopLevelGrammar};
use toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};

use super::ChatTokenizer;
use crate::GenerationError;

/// The shape an answer must take.
#[derive(Debug, Clone, PartialEq)]
pub enum ResponseFormat {
    /// Any JSON object.
    JsonObject,
    /// JSON valid against `schema`.
    JsonSchema {
        /// The schema's name (for providers).
        name: String,
        /// What the schema is for (may be empty).
        description: String,
        /// The schema.
        schema: serde_json::Value,
        /// OpenAI `strict` (for providers; enforced locally regardless).
        strict: bool,
    },
}

impl ResponseFormat {
    /// The instruction a local model gets with the constraint: the grammar
    /// guarantees the shape, the instruction tells the model what the
    /// fields mean. (OpenAI likewise shows the schema to its models.)
    pub fn instruction(&self) -> String {
        match self {
            Self::JsonObject => "Answer with one JSON object and nothing else.".to_owned(),
            Self::JsonSchema {
                name,
                description,
                schema,
                ..
            } => {
                let about = if description.is_empty() {
                    String::new()
                } else {
                    format!(" ({description})")
                };
                format!(
                    "Answer with one JSON value and nothing else: a `{name}`{about} valid against this JSON schema:\n{schema}"
                )
            }
        }
    }

    /// The JSON schema to enforce.
    pub fn schema(&self) -> serde_json::Value {
        match self {
            Self::JsonObject => serde_json::json!({"type": "object"}),
            Self::JsonSchema { schema, .. } => schema.clone(),
        }
    }
}

/// How constrained JSON is written: compact but for one space after `:`
/// and `,` (llguidance's `x-guidance` options; see the module doc).
pub fn json_style() -> serde_json::Value {
    serde_json::json!({
        "whitespace_flexible": false,
        "item_separator": ", ",
        "key_separator": ": ",
    })
}

/// A model's vocabulary for llguidance: its token trie, and its tokenizer
/// for the few strings llguidance tokenises itself.
struct Vocabulary {
    trie: TokTrie,
    tokenizer: Arc<tokenizers::Tokenizer>,
}

impl TokenizerEnv for Vocabulary {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
        self.trie.tokenize_with_greedy_fallback(s, |s| {
            self.tokenizer
                .encode(s, false)
                .map(|e| e.get_ids().to_vec())
                .unwrap_or_default()
        })
    }
}

/// One model's constraint compiler; cheap to clone.
#[derive(Clone)]
pub struct Grammars {
    tokenizer: ChatTokenizer,
    vocab_size: usize,
    factory: Arc<OnceLock<Result<ParserFactory, String>>>,
}

impl std::fmt::Debug for Grammars {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammars")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

fn build_factory(tokenizer: &ChatTokenizer, vocab_size: usize) -> Result<ParserFactory, String> {
    let mut words = tokenizer.token_table()?.to_vec();
    if words.len() > vocab_size {
        return Err(format!(
            "tokenizer.json has {} tokens, more than the model's {vocab_size} logits",
            words.len()
        ));
    }
    // The embedding matrix is padded past the tokenizer's last id: those
    // ids are never allowed (special, unnamed).
    while words.len() < vocab_size {
        let mut name = format!(".<[{}]>", words.len()).into_bytes();
        name[0] = TokTrie::SPECIAL_TOKEN_MARKER;
        words.push(name);
    }
    let eos_ids = tokenizer.eos_ids();
    let eos = eos_ids
        .first()
        .copied()
        .ok_or("the model has no EOS token")?;
    let info = TokRxInfo::new(vocab_size as u32, eos);
    let mut trie = TokTrie::from(&info, &words);
    if eos_ids.len() > 1 {
        trie = trie.with_eos_tokens(eos_ids);
    }
    let env: TokEnv = Arc::new(Vocabulary {
        trie,
        tokenizer: tokenizer.plain(),
    });
    let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
    factory.quiet();
    Ok(factory)
}

impl Grammars {
    /// The compiler for `tokenizer`'s model, `vocab_size` logits per step.
    /// Nothing is read until the first [`Grammars::compile`].
    pub fn new(tokenizer: ChatTokenizer, vocab_size: usize) -> Self {
        Self {
            tokenizer,
            vocab_size,
            factory: Arc::new(OnceLock::new()),
        }
    }

    /// A matcher for `format`. Blocking (the first call builds the parser
    /// factory; a schema compiles in milliseconds). Errors with
    /// [`GenerationError::InvalidArgument`] naming the construct for a
    /// schema that is not supported or cannot be satisfied, and with
    /// [`GenerationError::Tokenizer`] when the vocabulary cannot be read.
    pub fn compile(&self, format: &ResponseFormat) -> Result<Constraint, GenerationError> {
        let mut schema = format.schema();
        let Some(object) = schema.as_object_mut() else {
            return Err(GenerationError::InvalidArgument(
                "response_format.json_schema.schema must be a JSON object".to_owned(),
            ));
        };
        object.insert("x-guidance".to_owned(), json_style());
        self.matcher(TopLevelGrammar::from_json_schema(schema), "response_format")
    }

    /// A matcher for a Lark grammar (llguidance's dialect, with `%json`
    /// schemas inline), e.g. [`super::tools::ToolRequest::grammar`].
    /// Errors as [`Grammars::compile`], naming `what`.
    pub fn compile_lark(&self, lark: String, what: &str) -> Result<Constraint, GenerationError> {
        self.matcher(TopLevelGrammar::from_lark(lark), what)
    }

    fn matcher(&self, grammar: TopLevelGrammar, what: &str) -> Result<Constraint, GenerationError> {
        let factory = self
            .factory
            .get_or_init(|| build_factory(&self.tokenizer, self.vocab_size))
            .as_ref()
            .map_err(|e| GenerationError::Tokenizer(format!("constrained decoding: {e}")))?;
        let parser = factory.create_parser(grammar).map_err(|e| {
            GenerationError::InvalidArgument(format!("{what}: the schema cannot be enforced: {e}"))
        })?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(GenerationError::InvalidArgument(format!(
                "{what}: the schema cannot be enforced: {e}"
            )));
        }
        Ok(Constraint { matcher })
    }
}

/// One request's grammar state: masks the logits of each step and follows
/// the tokens sampled.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").finish_non_exhaustive()
    }
}

impl Constraint {
    /// Sets the logit of every token the grammar does not allow next to
    /// `-inf` (`logits`: one row, f32, one entry per vocabulary id). Errors
    /// with a reason when the matcher failed (it then allows nothing).
    pub fn mask(&mut self, logits: &mut [f32]) -> Result<(), String> {
        let allowed = self.matcher.compute_mask().map_err(|e| e.to_string())?;
        for (id, logit) in logits.iter_mut().enumerate() {
            if !allowed.is_allowed(id as TokenId) {
                *logit = f32::NEG_INFINITY;
            }
        }
        Ok(())
    }

    /// Follows the sampled `token`. Errors with a reason when the grammar
    /// did not allow it (a bug: the mask allowed only what it accepts).
    pub fn commit(&mut self, token: u32) -> Result<(), String> {
        self.matcher.consume_token(token).map_err(|e| e.to_string())
    }

    /// Whether the answer is complete and nothing may follow.
    pub fn finished(&self) -> bool {
        self.matcher.is_stopped()
    }
}
