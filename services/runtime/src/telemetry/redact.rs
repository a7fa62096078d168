//! What identifiers look like in log lines: a session id is a bearer of
//! someone's conversation (whoever knows it and the tenant's key reads the
//! history), so info-level logs carry a short SHA-256 digest of tenant and
//! id instead. The same digest appears in every service's logs, so one
//! session's lines can still be found together.

use sha2::{Digest, Sha256};

/// `s-` and the first 12 hex digits of SHA-256(`tenant` NUL `session_id`),
/// e.g. `s-3f9a0c1b2d4e`.
pub fn session_id(tenant: &str, session_id: &str) -> String {
    digest("s-", tenant, session_id)
}

/// `u-` and the first 12 hex digits of SHA-256(`tenant` NUL `user`): the
/// OpenAI `user` field (an application's end-user id, often an e-mail
/// address) as it appears in logs.
pub fn end_user(tenant: &str, user: &str) -> String {
    digest("u-", tenant, user)
}

fn digest(prefix: &str, tenant: &str, id: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(tenant.as_bytes());
    hasher.update([0u8]);
    hasher.update(id.as_bytes());
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    format!("{prefix}{hex}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn digests_hide_the_id_and_separate_tenants() {
        let a = super::session_id("alice", "sess-secret");
        assert!(!a.contains("secret"));
        assert_eq!(a.len(), 14);
        assert_eq!(a, super::session_id("alice", "sess-secret"));
        assert_ne!(a, super::session_id("bob", "sess-secret"));
        let u = super::end_user("alice", "ada@example.com");
        assert!(u.starts_with("u-") && !u.contains("ada"), "{u}");
        assert_eq!(u.len(), 14);
    }
}
