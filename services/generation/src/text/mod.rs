//! Text in and out of the model: [`tokenizer`] (the checkpoint's
//! `tokenizer.json` and chat template), [`detok`] (incremental decoding that
//! only emits whole UTF-8 characters), [`stop`] (caller stop sequences) and
//! [`grammar`] (grammar-constrained decoding for structured outputs) and
//! [`tools`] (function calling in the model's own format).

pub mod detok;
pub mod grammar;
pub mod stop;
pub mod tokenizer;
pub mod tools;

pub use detok::IncrementalDecoder;
pub use stop::StopMatcher;
pub use tokenizer::{ChatMessage, ChatTokenizer};
