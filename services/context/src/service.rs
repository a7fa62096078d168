//! `moltbot.context.v1.ContextService` over a [`SessionStore`]: request
//! validation, token budgets and the proto conversions.

use std::{sync::Arc, time::Duration};

use moltbot_proto::context::v1::{self as pb, context_service_server::ContextService};
use tonic::{Request, Response, Status};

use crate::{
    ContextError,
    session::{
        SessionKey, SessionMeta, StoredTurn, now_ms, validate_idempotency_key, validate_tenant,
    },
    store::SessionStore,
};

/// Limits on what one request may carry.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Largest turn content, in bytes.
    pub max_turn_bytes: usize,
    /// Most turns in one AppendTurns call.
    pub max_turns_per_append: usize,
    /// Longest per-session TTL override.
    pub max_ttl: Duration,
}

/// The gRPC service.
pub struct ContextApi {
    store: Arc<dyn SessionStore>,
    limits: RequestLimits,
}

impl ContextApi {
    /// Serves `store` within `limits`.
    pub fn new(store: Arc<dyn SessionStore>, limits: RequestLimits) -> Self {
        Self { store, limits }
    }

    fn turns(&self, turns: Vec<pb::Turn>) -> Result<Vec<StoredTurn>, ContextError> {
        if turns.is_empty() {
            return Err(ContextError::InvalidArgument("turns is empty".into()));
        }
        if turns.len() > self.limits.max_turns_per_append {
            return Err(ContextError::InvalidArgument(format!(
                "{} turns in one append; the limit is {}",
                turns.len(),
                self.limits.max_turns_per_append
            )));
        }
        let now = now_ms();
        turns
            .into_iter()
            .enumerate()
            .map(|(i, t)| {
                if !matches!(pb::Role::try_from(t.role), Ok(r) if r != pb::Role::Unspecified) {
                    return Err(ContextError::InvalidArgument(format!(
                        "turns[{i}].role {} is not a known role (system, user, assistant, tool)",
                        t.role
                    )));
                }
                if t.content.len() > self.limits.max_turn_bytes {
                    return Err(ContextError::InvalidArgument(format!(
                        "turns[{i}].content is {} bytes; the limit is {}",
                        t.content.len(),
                        self.limits.max_turn_bytes
                    )));
                }
                let created_at_ms = t
                    .created_at
                    .map(|ts| ts.seconds * 1000 + i64::from(ts.nanos) / 1_000_000)
                    .unwrap_or(now);
                Ok(StoredTurn {
                    role: t.role,
                    content: t.content,
                    token_count: t.token_count,
                    created_at_ms,
                })
            })
            .collect()
    }
}

fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

fn session_info(m: &SessionMeta) -> pb::SessionInfo {
    pb::SessionInfo {
        session_id: m.key.session_id.clone(),
        tenant: m.key.tenant.clone(),
        created_at: Some(timestamp(m.created_at_ms)),
        last_active_at: Some(timestamp(m.last_active_ms)),
        turn_count: m.turn_count,
        ttl_seconds: m.ttl_s,
        ttl_remaining_seconds: m.ttl_remaining_s,
    }
}

fn to_proto(t: StoredTurn) -> pb::Turn {
    pb::Turn {
        role: t.role,
        content: t.content,
        token_count: t.token_count,
        created_at: Some(timestamp(t.created_at_ms)),
    }
}

/// The most recent turns within `max_turns` (0 = all) and `max_tokens`
/// (0 = no budget), oldest first, with their token total and whether older
/// turns were left out.
pub fn select_recent(
    turns: Vec<StoredTurn>,
    max_turns: usize,
    max_tokens: u64,
) -> (Vec<StoredTurn>, u64, bool) {
    let total = turns.len();
    let mut kept = 0usize;
    let mut tokens = 0u64;
    for t in turns.iter().rev() {
        if max_turns != 0 && kept == max_turns {
            break;
        }
        if max_tokens != 0 && tokens + u64::from(t.token_count) > max_tokens {
            break;
        }
        kept += 1;
        tokens += u64::from(t.token_count);
    }
    let selected: Vec<StoredTurn> = turns.into_iter().skip(total - kept).collect();
    (selected, tokens, kept < total)
}

#[tonic::async_trait]
impl ContextService for ContextApi {
    async fn append_turns(
        &self,
        request: Request<pb::AppendTurnsRequest>,
    ) -> Result<Response<pb::AppendTurnsResponse>, Status> {
        let r = request.into_inner();
        let key = SessionKey::new(&r.tenant, &r.session_id)?;
        let idempotency_key = validate_idempotency_key(&r.idempotency_key)?;
        let ttl = match r.ttl_seconds {
            Some(0) => {
                return Err(
                    ContextError::InvalidArgument("ttl_seconds must be at least 1".into()).into(),
                );
            }
            Some(s) if Duration::from_secs(u64::from(s)) > self.limits.max_ttl => {
                return Err(ContextError::InvalidArgument(format!(
                    "ttl_seconds {s} exceeds the limit of {} s",
                    self.limits.max_ttl.as_secs()
                ))
                .into());
            }
            Some(s) => Some(Duration::from_secs(u64::from(s))),
            None => None,
        };
        let turns = self.turns(r.turns)?;
        let n = turns.len();
        let outcome = self.store.append(&key, turns, idempotency_key, ttl).await?;
        tracing::debug!(session_id = %key.session_id, tenant = %key.tenant, turns = n, duplicate = outcome.duplicate, "appended");
        Ok(Response::new(pb::AppendTurnsResponse {
            session: Some(session_info(&outcome.meta)),
            duplicate: outcome.duplicate,
        }))
    }

    async fn get_history(
        &self,
        request: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let r = request.into_inner();
        let key = SessionKey::new(&r.tenant, &r.session_id)?;
        let history = self.store.history(&key).await?;
        let (selected, tokens, truncated) =
            select_recent(history.turns, r.max_turns as usize, u64::from(r.max_tokens));
        Ok(Response::new(pb::GetHistoryResponse {
            turns: selected.into_iter().map(to_proto).collect(),
            total_tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
            truncated,
            restored_from_archive: history.restored,
        }))
    }

    async fn reset_session(
        &self,
        request: Request<pb::ResetSessionRequest>,
    ) -> Result<Response<pb::ResetSessionResponse>, Status> {
        let r = request.into_inner();
        let key = SessionKey::new(&r.tenant, &r.session_id)?;
        let removed_turns = self.store.reset(&key).await?;
        Ok(Response::new(pb::ResetSessionResponse { removed_turns }))
    }

    async fn delete_session(
        &self,
        request: Request<pb::DeleteSessionRequest>,
    ) -> Result<Response<pb::DeleteSessionResponse>, Status> {
        let r = request.into_inner();
        let key = SessionKey::new(&r.tenant, &r.session_id)?;
        let removed_turns = self.store.delete(&key).await?;
        Ok(Response::new(pb::DeleteSessionResponse { removed_turns }))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let r = request.into_inner();
        let tenant = validate_tenant(&r.tenant)?;
        let page_size = match r.page_size {
            0 => 100,
            n @ 1..=1000 => n as usize,
            n => {
                return Err(
                    ContextError::InvalidArgument(format!("page_size {n} is over 1000")).into(),
                );
            }
        };
        let after = if r.page_token.is_empty() {
            None
        } else {
            // The token is the last session id of the previous page.
            Some(SessionKey::new(&tenant, &r.page_token).map_err(|_| {
                ContextError::InvalidArgument("page_token is not one this service issued".into())
            })?)
        };
        let page = self
            .store
            .list(
                &tenant,
                page_size,
                after.as_ref().map(|k| k.session_id.as_str()),
            )
            .await?;
        Ok(Response::new(pb::ListSessionsResponse {
            sessions: page.sessions.iter().map(session_info).collect(),
            next_page_token: page.next_after.unwrap_or_default(),
        }))
    }

    async fn get_session(
        &self,
        request: Request<pb::GetSessionRequest>,
    ) -> Result<Response<pb::GetSessionResponse>, Status> {
        let r = request.into_inner();
        let key = SessionKey::new(&r.tenant, &r.session_id)?;
        let meta = self.store.get(&key).await?;
        Ok(Response::new(pb::GetSessionResponse {
            session: Some(session_info(&meta)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turn(tokens: u32) -> StoredTurn {
        StoredTurn {
            role: 2,
            content: tokens.to_string(),
            token_count: tokens,
            created_at_ms: 0,
        }
    }

    #[test]
    fn recent_turns_fit_both_budgets() {
        let turns: Vec<_> = [5, 10, 20, 30].map(turn).into();
        let (sel, tokens, truncated) = select_recent(turns.clone(), 0, 0);
        assert_eq!((sel.len(), tokens, truncated), (4, 65, false));
        let (sel, tokens, truncated) = select_recent(turns.clone(), 2, 0);
        assert_eq!(
            sel.iter().map(|t| t.token_count).collect::<Vec<_>>(),
            vec![20, 30]
        );
        assert_eq!((tokens, truncated), (50, true));
        let (sel, tokens, _) = select_recent(turns.clone(), 0, 55);
        assert_eq!(
            sel.iter().map(|t| t.token_count).collect::<Vec<_>>(),
            vec![20, 30]
        );
        assert_eq!(tokens, 50);
        let (sel, _, truncated) = select_recent(turns, 0, 10);
        assert!(
            sel.is_empty() && truncated,
            "the newest turn alone is over budget"
        );
    }
}
