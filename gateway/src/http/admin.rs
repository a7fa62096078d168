//! The operator's endpoints (behind `edge::operator::require_operator`):
//! `POST /admin/cache/purge` removes response-cache entries of one tenant,
//! one route, both, or all (`moltbot cache purge` calls it).

use axum::{Json, body::Bytes, extract::State, extract::rejection::BytesRejection};
use serde::Deserialize;

use super::AppState;
use crate::{ApiError, cache::PurgeScope};

/// The body of a purge: what to remove (an empty object removes every
/// entry).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PurgeRequest {
    /// Only entries of this tenant.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only entries keyed under this route (the route a model's requests
    /// take before intent routing).
    #[serde(default)]
    pub route: Option<String>,
}

/// Purges the cache. Answers `{"purged": {"memory": "all matching",
/// "redis": N}}`. Errors: 400 for a body that is not a purge request, 503
/// when Redis failed (the memory tier was purged).
pub async fn purge_cache(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let body = body.map_err(|r| ApiError::InvalidJson(r.body_text()))?;
    let req: PurgeRequest = if body.is_empty() {
        PurgeRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?
    };
    let scope = PurgeScope {
        tenant: req.tenant.clone(),
        route: req.route.clone(),
    };
    let redis = state
        .engine
        .cache()
        .purge(&scope)
        .await
        .map_err(|e| ApiError::Upstream {
            service: "redis",
            status: tonic::Status::unavailable(e),
        })?;
    tracing::info!(tenant = ?req.tenant, route = ?req.route, redis, "response cache purged");
    Ok(Json(serde_json::json!({
        "purged": {"redis": redis},
        "tenant": req.tenant,
        "route": req.route,
    })))
}
