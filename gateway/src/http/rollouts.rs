//! The operator's rollout endpoints (behind `edge::operator::require_operator`;
//! `moltbot rollout` calls them, `gateway/src/rollout/` does the work):
//!
//! - `POST /admin/rollouts`: start one ([`crate::rollout::Plan`] as JSON);
//!   201 with the rollout;
//! - `GET /admin/rollouts`: every route's rollout with its current step's
//!   numbers; `GET /admin/rollouts/{route}`: one;
//! - `POST /admin/rollouts/{route}/{pause|resume|promote|abort}`.

use axum::{
    Json,
    body::Bytes,
    extract::{Path, State, rejection::BytesRejection},
    http::StatusCode,
};

use super::AppState;
use crate::{
    ApiError,
    rollout::{Action, Plan, Report, Rollout},
};

/// Starts a rollout. Errors: 400 for a plan that does not validate, a
/// model generation does not serve, or a route whose stable side would be
/// only the canary; 404 for an unknown route; 409 when the route has an
/// active rollout; 503 when the rollout store fails.
pub async fn start(
    State(state): State<AppState>,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<Rollout>), ApiError> {
    let body = body.map_err(|r| ApiError::InvalidJson(r.body_text()))?;
    let plan: Plan =
        serde_json::from_slice(&body).map_err(|e| ApiError::InvalidJson(e.to_string()))?;
    plan.validate().map_err(ApiError::InvalidRequest)?;
    let router = state.engine.router();
    let route = router.route(&plan.route).ok_or_else(|| {
        ApiError::NotFound(format!("the configuration has no route `{}`", plan.route))
    })?;
    let served = state.engine.served_models_now().await?;
    if !served.iter().any(|m| m.name == plan.to) {
        let names: Vec<&str> = served.iter().map(|m| m.name.as_str()).collect();
        return Err(ApiError::InvalidRequest(format!(
            "generation serves no model `{}` (it serves: {}); load it or add its provider first (`moltbot models list`)",
            plan.to,
            names.join(", ")
        )));
    }
    let snapshot = state.engine.rollouts().snapshot();
    let effective = crate::rollout::effective(route.clone(), snapshot.get(&plan.route));
    let stable_left = effective
        .candidates
        .iter()
        .filter(|c| c.weight > 0)
        .map(|c| &c.model)
        .chain(effective.fallbacks.iter())
        .any(|m| *m != plan.to);
    if !stable_left {
        return Err(ApiError::InvalidRequest(format!(
            "route `{}` serves only `{}` already: there is no stable model to compare it with",
            plan.route, plan.to
        )));
    }
    let rollout = state.engine.rollouts().start(&plan).await?;
    Ok((StatusCode::CREATED, Json(rollout)))
}

/// Every rollout. Errors: 503 when the rollout store fails.
pub async fn list(State(state): State<AppState>) -> Result<Json<Vec<Report>>, ApiError> {
    Ok(Json(state.engine.rollouts().reports().await?))
}

/// One route's rollout. Errors: 404 when the route has none, 503 when the
/// rollout store fails.
pub async fn show(
    State(state): State<AppState>,
    Path(route): Path<String>,
) -> Result<Json<Report>, ApiError> {
    Ok(Json(state.engine.rollouts().report(&route).await?))
}

/// Pauses, resumes, promotes or aborts a route's rollout. Errors: 404 for
/// an unknown action or a route without a rollout, 409 when the action
/// does not fit the rollout's phase, 503 when the rollout store fails.
pub async fn act(
    State(state): State<AppState>,
    Path((route, action)): Path<(String, String)>,
) -> Result<Json<Rollout>, ApiError> {
    let action = Action::parse(&action).ok_or_else(|| {
        ApiError::NotFound(format!(
            "no rollout action `{action}`; use pause, resume, promote or abort"
        ))
    })?;
    Ok(Json(state.engine.rollouts().act(&route, action).await?))
}
