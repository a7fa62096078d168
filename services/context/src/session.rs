//! Sessions, turns and the validation of what callers send.

use serde::{Deserialize, Serialize};

use crate::ContextError;

/// Tenant used when a request leaves it empty.
pub const DEFAULT_TENANT: &str = "default";
/// Longest session id, in bytes.
pub const MAX_SESSION_ID_BYTES: usize = 128;
/// Longest tenant name, in bytes.
pub const MAX_TENANT_BYTES: usize = 64;
/// Longest idempotency key, in bytes.
pub const MAX_IDEMPOTENCY_KEY_BYTES: usize = 128;

fn valid_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-')
}

/// A validated (tenant, session id) pair; every store key derives from it, so
/// one tenant cannot name another's session.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionKey {
    /// Tenant namespace.
    pub tenant: String,
    /// Session id within the tenant.
    pub session_id: String,
}

impl SessionKey {
    /// Validates both parts. Errors with [`ContextError::InvalidArgument`] for
    /// an empty or over-long session id, or characters outside
    /// `[A-Za-z0-9._:-]`.
    pub fn new(tenant: &str, session_id: &str) -> Result<Self, ContextError> {
        Ok(Self {
            tenant: validate_tenant(tenant)?,
            session_id: validate_session_id(session_id)?,
        })
    }
}

/// Validates a tenant name; empty means [`DEFAULT_TENANT`].
pub fn validate_tenant(tenant: &str) -> Result<String, ContextError> {
    if tenant.is_empty() {
        return Ok(DEFAULT_TENANT.to_owned());
    }
    if tenant.len() > MAX_TENANT_BYTES || !tenant.chars().all(valid_id_char) {
        return Err(ContextError::InvalidArgument(format!(
            "tenant must be 1..={MAX_TENANT_BYTES} bytes of [A-Za-z0-9._:-]"
        )));
    }
    Ok(tenant.to_owned())
}

fn validate_session_id(id: &str) -> Result<String, ContextError> {
    if id.is_empty() {
        return Err(ContextError::InvalidArgument("session_id is empty".into()));
    }
    if id.len() > MAX_SESSION_ID_BYTES {
        return Err(ContextError::InvalidArgument(format!(
            "session_id is {} bytes; the limit is {MAX_SESSION_ID_BYTES}",
            id.len()
        )));
    }
    if !id.chars().all(valid_id_char) {
        return Err(ContextError::InvalidArgument(
            "session_id may only contain [A-Za-z0-9._:-]".into(),
        ));
    }
    Ok(id.to_owned())
}

/// Validates an idempotency key; empty disables deduplication.
pub fn validate_idempotency_key(key: &str) -> Result<Option<String>, ContextError> {
    match key.len() {
        0 => Ok(None),
        n if n > MAX_IDEMPOTENCY_KEY_BYTES => Err(ContextError::InvalidArgument(format!(
            "idempotency_key is {n} bytes; the limit is {MAX_IDEMPOTENCY_KEY_BYTES}"
        ))),
        _ => Ok(Some(key.to_owned())),
    }
}

/// One stored turn (the wire form in Redis is this, as JSON).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredTurn {
    /// `moltbot.context.v1.Role` as its number (1..=4).
    #[serde(rename = "r")]
    pub role: i32,
    /// Text, UTF-8.
    #[serde(rename = "c")]
    pub content: String,
    /// Token count for budgets.
    #[serde(rename = "t")]
    pub token_count: u32,
    /// Creation time, milliseconds since the Unix epoch.
    #[serde(rename = "ts")]
    pub created_at_ms: i64,
}

/// Metadata of a session as stores report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionMeta {
    /// Which session.
    pub key: SessionKey,
    /// First append, ms since the Unix epoch.
    pub created_at_ms: i64,
    /// Last append or read, ms since the Unix epoch.
    pub last_active_ms: i64,
    /// Turns stored now.
    pub turn_count: u64,
    /// Sliding TTL, seconds.
    pub ttl_s: u32,
    /// Seconds until expiry.
    pub ttl_remaining_s: u32,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_validated() {
        assert_eq!(SessionKey::new("", "s-1").unwrap().tenant, "default");
        assert!(SessionKey::new("t", "").is_err());
        assert!(SessionKey::new("t", &"x".repeat(129)).is_err());
        assert!(SessionKey::new("t", "a b").is_err());
        assert!(SessionKey::new("t/x", "s").is_err());
        assert!(SessionKey::new("acme", "user:42.chat-1_a").is_ok());
    }
}
