//! The gateway's YAML configuration: routes and client API keys.
//!
//! ```yaml
//! default_model: qwen2.5-coder-0.5b-instruct   # what `"model": "default"` names
//! routes:
//!   - name: banking
//!     match: { models: [default], domains: [banking] }
//!     system_prompt: You are a careful banking assistant.
//!     understanding: true   # false: no intent classification on this route
//!     retrieval: { collection: docs, top_k: 4, min_score: 0.25 }
//!     candidates: [{ model: qwen2.5-coder-0.5b-instruct, weight: 1 }]
//!     fallbacks: [fake-openai/gpt-4o-mini]
//!     retry: { max_attempts: 3, backoff_factor: 1.5, initial_backoff_ms: 100, jitter: 0.2 }
//!     cache: { enabled: true, ttl_s: 3600, max_temperature: 0.0 }   # the response cache
//! api_keys:
//!   - { name: app, tenant: acme, sha256: "<hex of SHA-256(key)>", requests_per_minute: 60, tokens_per_minute: 20000 }
//! allow_anonymous: true   # honoured only when the gateway listens on loopback
//! ```

use serde::Deserialize;

use crate::GatewayError;

/// The name requests use for the default route (`"model": "default"`).
pub const DEFAULT_MODEL_ALIAS: &str = "default";

/// The local generation model `moltbot up` serves.
pub const LOCAL_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Routes, tried in file order: the first whose `match` fits wins.
    pub routes: Vec<Route>,
    /// Client API keys; empty means anonymous access only.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Accept requests without `Authorization` (only honoured on loopback).
    #[serde(default = "yes")]
    pub allow_anonymous: bool,
    /// Limits of anonymous callers, shared by all of them.
    #[serde(default)]
    pub anonymous_limits: Limits,
    /// Prices, budgets and the spend ledger's settings
    /// (`gateway/src/spend/config.rs`).
    #[serde(default)]
    pub spend: crate::spend::SpendConfig,
}

fn yes() -> bool {
    true
}

/// When a route applies. Every listed condition must hold; an empty list holds
/// for anything.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Request `model` names (`default` is the alias for the default route).
    #[serde(default)]
    pub models: Vec<String>,
    /// Intent domains from understanding (e.g. `banking`).
    #[serde(default)]
    pub domains: Vec<String>,
    /// Intents from understanding (e.g. `balance`).
    #[serde(default)]
    pub intents: Vec<String>,
}

/// Retrieval of one route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrievalConfig {
    /// Collection to search.
    pub collection: String,
    /// Passages put in the prompt.
    #[serde(default = "default_top_k")]
    pub top_k: u32,
    /// Passages below this cosine similarity are left out.
    #[serde(default)]
    pub min_score: Option<f32>,
}

fn default_top_k() -> u32 {
    3
}

/// A weighted candidate model.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Candidate {
    /// Model name as the generation service knows it (`provider/model` for a
    /// remote provider).
    pub model: String,
    /// Relative weight among the route's candidates; 0 disables it.
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// Retry policy per candidate (docs/architecture.md, "Reliability semantics").
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Attempts per candidate model, the first included.
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Each backoff is the previous one times this factor.
    #[serde(default = "default_factor")]
    pub backoff_factor: f64,
    /// Backoff before the second attempt, in milliseconds.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff_ms: u64,
    /// Relative jitter applied to each backoff, in [0, 1].
    #[serde(default = "default_jitter")]
    pub jitter: f64,
}

fn default_attempts() -> u32 {
    3
}
fn default_factor() -> f64 {
    1.5
}
fn default_initial_backoff() -> u64 {
    100
}
fn default_jitter() -> f64 {
    0.2
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            backoff_factor: default_factor(),
            initial_backoff_ms: default_initial_backoff(),
            jitter: default_jitter(),
        }
    }
}

/// One route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// Name reported in `moltbot.route` and in metrics.
    pub name: String,
    /// When it applies.
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// System prompt put first in every prompt of this route.
    #[serde(default)]
    pub system_prompt: Option<String>,
    /// Whether turns on this route are classified by understanding
    /// (default true). A turn is classified when any route its request
    /// model may take has it on; `false` on every such route (with no
    /// `retrieval`) is the pure-gateway case: no enrichment is called.
    #[serde(default = "yes")]
    pub understanding: bool,
    /// Knowledge retrieval; none when unset.
    #[serde(default)]
    pub retrieval: Option<RetrievalConfig>,
    /// Weighted primary models (one is picked per turn by weight).
    pub candidates: Vec<Candidate>,
    /// Models tried in order after every candidate failed.
    #[serde(default)]
    pub fallbacks: Vec<String>,
    /// Retries per model.
    #[serde(default)]
    pub retry: RetryPolicy,
    /// `max_tokens` when the request gives none.
    #[serde(default = "default_max_tokens")]
    pub default_max_tokens: u32,
    /// What happens to `assistant` messages a client sends (they may be
    /// forged: OWASP LLM01). `tool` results are client data, stored like
    /// user messages.
    #[serde(default)]
    pub client_turns: ClientTurns,
    /// The response cache on this route (`gateway/src/cache/`).
    #[serde(default)]
    pub cache: CacheConfig,
    /// Refuse (403) a caller with a budget when a model this route may
    /// answer with has no price in `spend.prices` (default false: an
    /// unpriced model is charged nothing and reported as unpriced).
    #[serde(default)]
    pub refuse_unpriced: bool,
    /// The rollout splitting this route's new sessions, while one is
    /// running or paused (set by the turn engine from the rollout store,
    /// never read from the file: `gateway/src/rollout/`).
    #[serde(skip)]
    pub rollout: Option<std::sync::Arc<crate::rollout::Rollout>>,
}

/// The response cache of one route.
///
/// ```yaml
/// cache: { enabled: true, ttl_s: 3600, max_temperature: 0.0 }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    /// Whether answers on this route are looked up and stored (default
    /// true).
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How long an answer is served, in seconds (default 3600).
    #[serde(default = "default_cache_ttl")]
    pub ttl_s: u64,
    /// Only requests whose `temperature` is at most this are cached
    /// (default 0: greedy answers only). A request without `temperature`
    /// counts as 1, OpenAI's default.
    #[serde(default)]
    pub max_temperature: f32,
}

fn default_cache_ttl() -> u64 {
    3600
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            ttl_s: default_cache_ttl(),
            max_temperature: 0.0,
        }
    }
}

/// Policy for client-supplied `assistant` messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientTurns {
    /// Used in this turn's prompt, never written to the session: the stored
    /// conversation holds only the users' messages and MoltBot's answers.
    #[default]
    Transient,
    /// Refused with 400 naming the message.
    Refuse,
}

fn default_max_tokens() -> u32 {
    256
}

/// Rate limits; unset means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Requests per minute.
    #[serde(default)]
    pub requests_per_minute: Option<u32>,
    /// Prompt plus completion tokens per minute, reserved at admission
    /// (prompt + completion budget) and settled with what the turn used.
    #[serde(default)]
    pub tokens_per_minute: Option<u32>,
    /// Requests of this caller in flight at once (streams count until they
    /// end); more are answered 429. Unset: [`DEFAULT_MAX_CONCURRENT`].
    #[serde(default)]
    pub max_concurrent_requests: Option<u32>,
}

/// Default per-key cap on concurrent requests.
pub const DEFAULT_MAX_CONCURRENT: u32 = 16;

/// One client API key, stored hashed.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    /// Name used in logs and metrics (never the key).
    pub name: String,
    /// Lower-case hex SHA-256 of the key (`printf %s KEY | sha256sum`).
    pub sha256: String,
    /// The tenant the key belongs to: its sessions, idempotency keys and
    /// limits are its own (docs/security.md). Default: the key's name, so
    /// two keys share data only when the config says so.
    #[serde(default)]
    pub tenant: Option<String>,
    /// The key's limits.
    #[serde(flatten)]
    pub limits: Limits,
}

const DEFAULT_SYSTEM_PROMPT: &str = "You are MoltBot, a helpful assistant. Answer briefly and accurately. \
When knowledge-base passages are given, use them and cite their ids in square brackets.";

impl Default for GatewayConfig {
    /// One `default` route (also serving the local model by name) to the local
    /// model with the `docs` collection; anonymous access.
    fn default() -> Self {
        Self {
            routes: vec![Route {
                name: "default".to_owned(),
                matches: RouteMatch {
                    models: vec![DEFAULT_MODEL_ALIAS.to_owned(), LOCAL_MODEL.to_owned()],
                    ..RouteMatch::default()
                },
                system_prompt: Some(DEFAULT_SYSTEM_PROMPT.to_owned()),
                understanding: true,
                retrieval: Some(RetrievalConfig {
                    collection: "docs".to_owned(),
                    top_k: default_top_k(),
                    min_score: Some(0.3),
                }),
                candidates: vec![Candidate {
                    model: LOCAL_MODEL.to_owned(),
                    weight: 1,
                }],
                fallbacks: Vec::new(),
                retry: RetryPolicy::default(),
                default_max_tokens: default_max_tokens(),
                client_turns: ClientTurns::default(),
                cache: CacheConfig::default(),
                refuse_unpriced: false,
                rollout: None,
            }],
            api_keys: Vec::new(),
            allow_anonymous: true,
            anonymous_limits: Limits::default(),
            spend: crate::spend::SpendConfig::default(),
        }
    }
}

impl GatewayConfig {
    /// Reads and validates a YAML file. Errors with [`GatewayError::Config`]
    /// naming the file and what to fix.
    pub fn load(path: &std::path::Path) -> Result<Self, GatewayError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            config_error(format!(
                "cannot read MOLTBOT_GATEWAY_CONFIG {}: {e}",
                path.display()
            ))
        })?;
        let config: Self = serde_yaml_ng::from_str(&text)
            .map_err(|e| config_error(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| config_error(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    /// Checks what serde cannot: non-empty candidates, positive weights,
    /// sane retry policies, well-formed key hashes.
    pub fn validate(&self) -> Result<(), String> {
        if self.routes.is_empty() {
            return Err("`routes` is empty; add at least one route".to_owned());
        }
        for r in &self.routes {
            if r.candidates.iter().all(|c| c.weight == 0) {
                return Err(format!(
                    "route `{}` has no candidate with a positive weight",
                    r.name
                ));
            }
            if r.retry.max_attempts == 0 || r.retry.backoff_factor < 1.0 {
                return Err(format!(
                    "route `{}`: retry.max_attempts must be ≥ 1 and backoff_factor ≥ 1.0",
                    r.name
                ));
            }
            if !(0.0..=1.0).contains(&r.retry.jitter) {
                return Err(format!(
                    "route `{}`: retry.jitter must be in [0, 1]",
                    r.name
                ));
            }
            let on_intent = !r.matches.domains.is_empty() || !r.matches.intents.is_empty();
            if on_intent && !r.understanding {
                return Err(format!(
                    "route `{}` matches on domains or intents but has `understanding: false`; remove one of them",
                    r.name
                ));
            }
            if r.cache.ttl_s == 0 || !(0.0..=2.0).contains(&r.cache.max_temperature) {
                return Err(format!(
                    "route `{}`: cache.ttl_s must be ≥ 1 and cache.max_temperature in [0, 2]",
                    r.name
                ));
            }
            if r.default_max_tokens == 0 {
                return Err(format!(
                    "route `{}`: default_max_tokens must be ≥ 1",
                    r.name
                ));
            }
        }
        for k in &self.api_keys {
            let hex_ok = k.sha256.len() == 64
                && k.sha256
                    .bytes()
                    .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
            if !hex_ok {
                return Err(format!(
                    "api key `{}`: sha256 must be 64 lower-case hex digits (printf %s KEY | sha256sum)",
                    k.name
                ));
            }
        }
        let names: Vec<&str> = self.api_keys.iter().map(|k| k.name.as_str()).collect();
        self.spend.validate(&names)?;
        Ok(())
    }
}

fn config_error(message: String) -> GatewayError {
    GatewayError::Config(moltbot_runtime::RuntimeError::Config(message))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_a_full_file_and_rejects_bad_ones() {
        let yaml = r#"
routes:
  - name: banking
    match: { models: [default], domains: [banking] }
    candidates: [{ model: a, weight: 2 }, { model: b }]
    fallbacks: [remote/c]
    retry: { max_attempts: 2 }
api_keys:
  - { name: app, sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", requests_per_minute: 5 }
"#;
        let c: GatewayConfig = serde_yaml_ng::from_str(yaml).unwrap();
        c.validate().unwrap();
        assert_eq!(c.routes[0].candidates[1].weight, 1);
        assert_eq!(c.routes[0].retry.backoff_factor, 1.5);
        assert_eq!(c.api_keys[0].limits.requests_per_minute, Some(5));
        assert!(c.allow_anonymous);

        let typo = "routes: [{ name: x, candidates: [{model: a}], retries: {} }]";
        assert!(serde_yaml_ng::from_str::<GatewayConfig>(typo).is_err());
        let zero: GatewayConfig =
            serde_yaml_ng::from_str("routes: [{ name: x, candidates: [{model: a, weight: 0}] }]")
                .unwrap();
        assert!(zero.validate().unwrap_err().contains("positive weight"));
        let bad_hash: GatewayConfig = serde_yaml_ng::from_str(
            "routes: [{ name: x, candidates: [{model: a}] }]\napi_keys: [{name: k, sha256: ABC}]",
        )
        .unwrap();
        assert!(bad_hash.validate().unwrap_err().contains("sha256"));
        GatewayConfig::default().validate().unwrap();
    }

    #[test]
    fn the_example_config_has_an_offline_fallback() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.yaml");
        let c = GatewayConfig::load(&path).unwrap();
        let assistant = c.routes.iter().find(|r| r.name == "assistant").unwrap();
        // Remote providers first, the local model last.
        assert!(assistant.candidates[0].model.contains('/'));
        assert_eq!(
            assistant.fallbacks.last().map(String::as_str),
            Some("qwen2.5-coder-0.5b-instruct")
        );
    }
}
