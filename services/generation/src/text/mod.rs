//! Text in and out of the model: [`tokenizer`] (the checkpoint's
//! `tokenizer.json` and chat template), [`detok`] (incremental decoding that
//! only emits whole UTF-8 characters), and [`stop`] (caller stop sequences).

pub mod detok;
pub mod stop;
pub mod tokenizer;

pub use detok::IncrementalDecoder;
pub use stop::StopMatcher;
pub use tokenizer::{ChatMessage, ChatTokenizer};
