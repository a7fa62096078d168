//! Protocol adapters: each validates its wire format and produces one
//! neutral [`crate::turn::TurnRequest`] for the turn engine; the HTTP
//! handlers (`gateway/src/http/`) format the turn's events back into the
//! protocol. Adding an endpoint is one adapter here and one handler there.
//!
//! - [`chat`]: OpenAI Chat Completions (`POST /v1/chat/completions`);
//! - [`responses`]: OpenAI Responses (`POST /v1/responses`);
//! - [`common`]: the checks they share (roles and order, sampling bounds,
//!   `user`/`metadata` bounds, tool declarations).

pub mod chat;
pub mod common;
pub mod responses;
