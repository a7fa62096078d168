//! `POST /v1/embeddings`: vectors from understanding's sentence encoder
//! (all-MiniLM-L6-v2, 384 dimensions, unit length), in OpenAI's format. The
//! texts go to understanding's `Embed` in batches, each retried on another
//! replica after a transport failure (embedding is idempotent). The caller's
//! tokens-per-minute bucket is charged the encoder tokens read.
//!
//! As OpenAI does, an input longer than the encoder reads is an error (400
//! naming it), not a silently truncated vector.

use axum::{
    Extension, Json,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
};
use base64::Engine as _;
use moltbot_proto::understanding::v1::Embedding;

use super::AppState;
use crate::{
    ApiError,
    edge::Caller,
    openai::embeddings::{
        EmbeddingInput, EmbeddingList, EmbeddingObject, EmbeddingRequest, EmbeddingUsage, Vector,
    },
    turn::policy::{self, Budget},
};

/// The id `/v1/models` lists and requests name (any ASCII case).
pub const EMBEDDING_MODEL: &str = "all-minilm-l6-v2";

/// Its vector length.
pub const DIMENSIONS: u32 = 384;

/// Most inputs per request (OpenAI's limit).
const MAX_INPUTS: usize = 2048;

/// Texts per `Embed` call: understanding's default `MOLTBOT_MAX_TEXTS`.
const BATCH: usize = 256;

/// The request's texts, validated. Errors with 400 naming what is wrong.
fn texts(req: EmbeddingRequest) -> Result<(Vec<String>, bool), ApiError> {
    let invalid = |m: String| Err(ApiError::InvalidRequest(m));
    if !req.model.eq_ignore_ascii_case(EMBEDDING_MODEL) {
        return Err(ApiError::ModelNotFound(req.model));
    }
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return invalid(format!(
                "encoding_format `{other}` is not one of float, base64"
            ));
        }
    };
    if let Some(d) = req.dimensions
        && d != DIMENSIONS
    {
        return invalid(format!(
            "dimensions: {EMBEDDING_MODEL} has a fixed {DIMENSIONS} dimensions (it was not trained for shortened vectors); send {DIMENSIONS} or leave it out"
        ));
    }
    if req.user.as_ref().is_some_and(|u| u.chars().count() > 256) {
        return invalid("user: at most 256 characters".to_owned());
    }
    let texts = match req.input {
        EmbeddingInput::One(t) => vec![t],
        EmbeddingInput::Many(v) => v,
        EmbeddingInput::Tokens(_) | EmbeddingInput::TokenLists(_) => {
            return invalid(format!(
                "input: token ids are not accepted ({EMBEDDING_MODEL} has its own tokenizer); send text"
            ));
        }
    };
    if texts.is_empty() || texts.len() > MAX_INPUTS {
        return invalid(format!(
            "input must hold 1 to {MAX_INPUTS} texts, got {}",
            texts.len()
        ));
    }
    if let Some(i) = texts.iter().position(|t| t.trim().is_empty()) {
        return invalid(format!("input[{i}] is empty"));
    }
    Ok((texts, base64))
}

/// Little-endian f32 bytes in standard base64, as OpenAI's SDKs decode them.
fn encode(values: &[f32]) -> String {
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The handler. Errors are answered as [`ApiError`] envelopes.
pub async fn embeddings(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<EmbeddingList>, ApiError> {
    let req: EmbeddingRequest = super::parse_body(body, state.max_body_bytes)?;
    if let Some(user) = &req.user {
        tracing::info!(
            end_user = moltbot_runtime::telemetry::redact::end_user(&caller.tenant, user),
            "embeddings"
        );
    }
    let (texts, base64) = texts(req)?;
    // Reserve an estimate (about 4 bytes a token, at most the encoder's
    // 256 a text), settled with the count the encoder reports.
    let estimate: u32 = texts
        .iter()
        .map(|t| (t.len() / 4 + 2).min(256) as u32)
        .sum();
    let request_id = crate::turn::new_id("embd-");
    let chain = [EMBEDDING_MODEL.to_owned()];
    let mut reservation = state
        .spend
        .meter(&caller, "embeddings")
        .admit(crate::turn::Admit {
            request_id: &request_id,
            route: EMBEDDING_MODEL,
            chain: &chain,
            prompt_tokens: estimate,
            completion_budget: 0,
            refuse_unpriced: false,
            cache_hit: false,
        })
        .await?;
    // The encoder is called from here on: billed from here on.
    crate::turn::Reserved::started(&mut reservation, EMBEDDING_MODEL);
    let understanding = &state.upstreams.understanding;
    let budget = Budget::new(state.engine.request_timeout());
    let mut vectors: Vec<Embedding> = Vec::with_capacity(texts.len());
    for batch in texts.chunks(BATCH) {
        let response = policy::call("understanding", "embed", budget, |left| {
            understanding.embed(batch.to_vec(), left)
        })
        .await
        .map_err(|status| ApiError::Upstream {
            service: "understanding",
            status,
        })?;
        if response.dimension != DIMENSIONS || response.embeddings.len() != batch.len() {
            return Err(ApiError::Upstream {
                service: "understanding",
                status: tonic::Status::internal(format!(
                    "Embed answered {} vectors of {} dimensions for {} texts",
                    response.embeddings.len(),
                    response.dimension,
                    batch.len()
                )),
            });
        }
        vectors.extend(response.embeddings);
    }
    let tokens: u32 = vectors.iter().map(|v| v.input_tokens).sum();
    reservation.settle_used(crate::turn::Used {
        prompt_tokens: tokens,
        ..Default::default()
    });
    if let Some(i) = vectors.iter().position(|v| v.truncated) {
        return Err(ApiError::InvalidRequest(format!(
            "input[{i}] is longer than the {} tokens {EMBEDDING_MODEL} reads; split it into shorter texts",
            vectors[i].input_tokens
        )));
    }
    let data = vectors
        .into_iter()
        .enumerate()
        .map(|(index, v)| EmbeddingObject {
            object: "embedding",
            index,
            embedding: if base64 {
                Vector::Base64(encode(&v.values))
            } else {
                Vector::Float(v.values)
            },
        })
        .collect();
    Ok(Json(EmbeddingList {
        object: "list",
        data,
        model: EMBEDDING_MODEL.to_owned(),
        usage: EmbeddingUsage {
            prompt_tokens: tokens,
            total_tokens: tokens,
        },
    }))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn request(json: serde_json::Value) -> EmbeddingRequest {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn requests_are_validated_with_the_field_named() {
        let (texts, b64) = super::texts(request(serde_json::json!({
            "model": "all-MiniLM-L6-v2", "input": ["a", "b"], "encoding_format": "base64"
        })))
        .unwrap();
        assert_eq!(texts, vec!["a", "b"]);
        assert!(b64);
        for (body, want) in [
            (
                serde_json::json!({"model": "text-embedding-3-small", "input": "a"}),
                "text-embedding-3-small",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": [1, 2]}),
                "token ids",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": [[1], [2]]}),
                "token ids",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": []}),
                "1 to 2048",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": ["a", " "]}),
                "input[1] is empty",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": "a", "dimensions": 128}),
                "fixed 384",
            ),
            (
                serde_json::json!({"model": EMBEDDING_MODEL, "input": "a", "encoding_format": "int8"}),
                "int8",
            ),
        ] {
            let err = super::texts(request(body)).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        let unknown = serde_json::from_value::<EmbeddingRequest>(
            serde_json::json!({"model": EMBEDDING_MODEL, "input": "a", "truncate": true}),
        )
        .unwrap_err()
        .to_string();
        assert!(unknown.contains("unknown field `truncate`"), "{unknown}");
    }

    #[test]
    fn base64_is_little_endian_f32() {
        let encoded = encode(&[1.0, -0.5]);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            bytes,
            [1.0f32.to_le_bytes(), (-0.5f32).to_le_bytes()].concat()
        );
    }
}
