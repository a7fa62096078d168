//! The operator's door to the gateway's `/admin/…` endpoints: a layer that
//! lets a request through only with `Authorization: Bearer <token>` equal to
//! `MOLTBOT_ADMIN_TOKEN` (compared in constant time). Without a configured
//! token every admin request is refused: no operator means no admin.

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};

use crate::ApiError;

/// The layer's function (`axum::middleware::from_fn_with_state` with the
/// configured token). Answers 401 without a bearer token or with another
/// one, 403 when the gateway has no admin token.
pub async fn require_operator(
    State(token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = token else {
        let err = ApiError::InvalidRequest(
            "the admin endpoints are off: set MOLTBOT_ADMIN_TOKEN on the gateway".to_owned(),
        );
        return (StatusCode::FORBIDDEN, axum::Json(err.envelope())).into_response();
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(given)
            if moltbot_runtime::grpc::admin::constant_time_eq(
                given.as_bytes(),
                token.as_bytes(),
            ) =>
        {
            next.run(request).await
        }
        _ => ApiError::Unauthorized(
            "admin endpoints need Authorization: Bearer <MOLTBOT_ADMIN_TOKEN>",
        )
        .into_response(),
    }
}
