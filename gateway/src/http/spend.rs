//! The operator's spend endpoints (behind `edge::operator::require_operator`;
//! `moltbot spend` calls them, `gateway/src/spend/` does the work):
//!
//! - `GET /admin/spend?by=key|tenant|model|route|endpoint&since=T&until=T`:
//!   the ledger's spend per group in `[since, until)` (RFC 3339 or Unix
//!   milliseconds; default: everything up to now), with its totals;
//! - `GET /admin/budgets`: every budget's current window.

use axum::{
    Json,
    extract::{Query, State, rejection::QueryRejection},
};
use serde::Deserialize;

use super::AppState;
use crate::{ApiError, spend::ledger::GroupBy};

/// The query of `GET /admin/spend`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    /// How rows are grouped.
    pub by: GroupBy,
    /// From (included): RFC 3339 or Unix milliseconds.
    #[serde(default)]
    pub since: Option<String>,
    /// Until (excluded): RFC 3339 or Unix milliseconds.
    #[serde(default)]
    pub until: Option<String>,
}

/// RFC 3339 or Unix milliseconds as Unix milliseconds. Errors with 400
/// naming the parameter.
fn instant(name: &str, value: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    value
        .parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| {
            ApiError::InvalidRequest(format!(
                "`{name}` must be RFC 3339 (2026-12-01T00:00:00Z) or Unix milliseconds: {e}"
            ))
        })
}

/// The report. Errors: 400 for a bad query, 404 when this gateway writes
/// no ledger, 503 when the ledger's database cannot be read.
pub async fn report(
    State(state): State<AppState>,
    query: Result<Query<ReportQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(q) = query.map_err(|r| ApiError::InvalidRequest(r.body_text()))?;
    let since = q.since.as_deref().map_or(Ok(0), |v| instant("since", v))?;
    let until = match q.until.as_deref() {
        Some(v) => instant("until", v)?,
        None => jiff::Timestamp::now().as_millisecond() + 1,
    };
    let ledger = state.spend.ledger().ok_or_else(|| {
        ApiError::NotFound(
            "this gateway writes no spend ledger (MOLTBOT_SPEND_LEDGER=off)".to_owned(),
        )
    })?;
    let rows = ledger
        .report(q.by, since, until)
        .await
        .map_err(|e| ApiError::Upstream {
            service: "spend ledger",
            status: tonic::Status::unavailable(e),
        })?;
    let total_usd: f64 = rows.iter().map(|r| r.cost_usd).sum();
    let requests: i64 = rows.iter().map(|r| r.requests).sum();
    Ok(Json(serde_json::json!({
        "by": q.by,
        "since_ms": since,
        "until_ms": until,
        "rows": rows,
        "total": {"requests": requests, "cost_usd": total_usd},
    })))
}

/// Every budget's current window. Errors: 503 when the budget store
/// cannot be read.
pub async fn budgets(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let budgets = state.spend.status().await.map_err(|e| ApiError::Upstream {
        service: "budget store",
        status: tonic::Status::unavailable(e),
    })?;
    Ok(Json(serde_json::json!({ "budgets": budgets })))
}
