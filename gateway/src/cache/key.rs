//! The exact tier's key: a SHA-256 over everything that decides an answer
//! and is known when the request arrives (issue 38, item 1).
//!
//! Hashed, each field length-prefixed so that no two different requests
//! write the same bytes: the tenant, the request model, the configuration
//! of every route the model may take (a reload that changes a route's
//! prompt, candidates or retrieval makes its entries unreachable), the
//! session's stored history, the client's system messages and messages,
//! sampling, tools, tool choice and response format (protobuf encodings of
//! the mesh's own types), and the content version of every knowledge
//! collection those routes search (`Versions` of the retrieval service:
//! an upsert or delete raises it).

use moltbot_proto::context::v1 as ctx;
use prost::Message;
use sha2::{Digest, Sha256};

use crate::{routing::Route, turn::TurnRequest};

/// Where an entry lives: its tenant and route (what a purge selects by)
/// and the digest of the rest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    /// First 16 hex digits of SHA-256(tenant).
    pub tenant_tag: String,
    /// First 16 hex digits of SHA-256(route name).
    pub route_tag: String,
    /// Hex SHA-256 of every field (module doc).
    pub digest: String,
}

/// Prefix of every entry's Redis key.
pub const PREFIX: &str = "moltbot:cache:v1";

/// The 16-hex-digit tag of a tenant or route name in keys.
fn tag(name: &str) -> String {
    hex(&Sha256::digest(name.as_bytes())[..8])
}

/// Lower-case hex of `bytes` (also the rollout store's session keys).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl Key {
    /// `moltbot:cache:v1:<tenant tag>:<route tag>:<digest>`, the Redis key
    /// and the memory tier's.
    pub fn storage_key(&self) -> String {
        format!(
            "{PREFIX}:{}:{}:{}",
            self.tenant_tag, self.route_tag, self.digest
        )
    }
}

/// The entries of one tenant, one route, both or all: what a purge
/// removes, as a Redis `SCAN MATCH` pattern and as a test on a storage key
/// (both from the one layout of [`Key::storage_key`]).
#[derive(Debug, Clone)]
pub struct Selector {
    tenant_tag: Option<String>,
    route_tag: Option<String>,
}

impl Selector {
    /// The entries of `tenant` (all tenants when `None`) and `route` (all
    /// routes when `None`).
    pub fn new(tenant: Option<&str>, route: Option<&str>) -> Self {
        Self {
            tenant_tag: tenant.map(tag),
            route_tag: route.map(tag),
        }
    }

    /// `moltbot:cache:v1:<tenant tag or *>:<route tag or *>:*`.
    pub fn pattern(&self) -> String {
        format!(
            "{PREFIX}:{}:{}:*",
            self.tenant_tag.as_deref().unwrap_or("*"),
            self.route_tag.as_deref().unwrap_or("*")
        )
    }

    /// Whether the entry stored under `storage_key` is selected.
    pub fn matches(&self, storage_key: &str) -> bool {
        let Some(rest) = storage_key.strip_prefix(PREFIX) else {
            return false;
        };
        let mut parts = rest.trim_start_matches(':').split(':');
        let (t, r) = (parts.next(), parts.next());
        self.tenant_tag.as_deref().is_none_or(|x| Some(x) == t)
            && self.route_tag.as_deref().is_none_or(|x| Some(x) == r)
    }
}

/// Everything the key is computed from.
#[derive(Debug)]
pub struct Parts<'a> {
    /// The caller's tenant.
    pub tenant: &'a str,
    /// The route whose cache settings apply (its name tags the key).
    pub route: &'a str,
    /// Every route the request model may take.
    pub routes: &'a [Route],
    /// The session's stored turns, oldest first.
    pub history: &'a [ctx::Turn],
    /// The validated request.
    pub request: &'a TurnRequest,
    /// `(collection, version)` of every collection the routes search.
    pub versions: &'a [(String, u64)],
}

struct Hasher(Sha256);

impl Hasher {
    fn field(&mut self, bytes: &[u8]) {
        self.0.update((bytes.len() as u64).to_le_bytes());
        self.0.update(bytes);
    }

    fn str(&mut self, s: &str) {
        self.field(s.as_bytes());
    }

    fn message<M: Message>(&mut self, m: &M) {
        self.field(&m.encode_to_vec());
    }
}

/// The key of `parts`.
pub fn derive(parts: &Parts<'_>) -> Key {
    let mut h = Hasher(Sha256::new());
    let r = parts.request;
    h.str("moltbot-response-cache-v1");
    h.str(parts.tenant);
    h.str(&r.model);
    h.str(parts.route);
    // The routes' whole configuration, as parsed: any change of a field
    // gives other bytes.
    h.str(&format!("{:?}", parts.routes));
    h.field(&(parts.history.len() as u64).to_le_bytes());
    for t in parts.history {
        h.field(&t.role.to_le_bytes());
        h.str(&t.content);
    }
    h.field(&(r.system.len() as u64).to_le_bytes());
    for s in &r.system {
        h.str(s);
    }
    h.field(&(r.messages.len() as u64).to_le_bytes());
    for m in &r.messages {
        h.message(m);
    }
    h.str(&format!("{:?}", r.sampling));
    h.field(&(r.tools.len() as u64).to_le_bytes());
    for t in &r.tools {
        h.message(t);
    }
    match &r.tool_choice {
        Some(c) => h.message(c),
        None => h.str("no tool choice"),
    }
    h.field(&[u8::from(r.parallel_tool_calls)]);
    match &r.response_format {
        Some(f) => h.message(f),
        None => h.str("no response format"),
    }
    h.field(&(parts.versions.len() as u64).to_le_bytes());
    for (collection, version) in parts.versions {
        h.str(collection);
        h.field(&version.to_le_bytes());
    }
    Key {
        tenant_tag: tag(parts.tenant),
        route_tag: tag(parts.route),
        digest: hex(&h.0.finalize()),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use moltbot_proto::generation::v1::{ChatMessage, Role};

    use super::*;

    fn request(text: &str) -> TurnRequest {
        TurnRequest {
            model: "default".into(),
            messages: vec![ChatMessage {
                role: Role::User as i32,
                content: text.into(),
                ..Default::default()
            }],
            last_user: text.into(),
            ..Default::default()
        }
    }

    #[test]
    fn every_deciding_field_changes_the_key() {
        let req = request("What is MoltBot?");
        let routes = crate::routing::config::GatewayConfig::default().routes;
        let versions = vec![("docs".to_owned(), 3)];
        let base = Parts {
            tenant: "acme",
            route: "default",
            routes: &routes,
            history: &[],
            request: &req,
            versions: &versions,
        };
        let key = derive(&base);
        assert_eq!(key, derive(&base), "the same parts give the same key");

        let other_tenant = derive(&Parts {
            tenant: "globex",
            ..base
        });
        assert_ne!(key.digest, other_tenant.digest);
        assert_ne!(key.tenant_tag, other_tenant.tenant_tag);

        let newer = vec![("docs".to_owned(), 4)];
        assert_ne!(
            key,
            derive(&Parts {
                versions: &newer,
                ..base
            })
        );

        let history = vec![ctx::Turn {
            role: ctx::Role::User as i32,
            content: "hi".into(),
            ..Default::default()
        }];
        assert_ne!(
            key,
            derive(&Parts {
                history: &history,
                ..base
            })
        );

        let other_text = request("What is MoltBot ?");
        assert_ne!(
            key,
            derive(&Parts {
                request: &other_text,
                ..base
            })
        );

        let mut warmer = request("What is MoltBot?");
        warmer.sampling.temperature = Some(0.5);
        assert_ne!(
            key,
            derive(&Parts {
                request: &warmer,
                ..base
            })
        );

        let mut other_routes = routes.clone();
        other_routes[0].system_prompt = Some("Be terse.".into());
        assert_ne!(
            key,
            derive(&Parts {
                routes: &other_routes,
                ..base
            })
        );

        assert!(key.storage_key().starts_with("moltbot:cache:v1:"));
        assert_eq!(key.storage_key().split(':').count(), 6);

        let stored = key.storage_key();
        assert!(Selector::new(None, None).matches(&stored));
        assert!(Selector::new(Some("acme"), Some("default")).matches(&stored));
        assert!(!Selector::new(Some("globex"), None).matches(&stored));
        assert!(!Selector::new(None, Some("other")).matches(&stored));
        assert_eq!(
            Selector::new(Some("acme"), None).pattern(),
            format!("moltbot:cache:v1:{}:*:*", key.tenant_tag)
        );
    }
}
