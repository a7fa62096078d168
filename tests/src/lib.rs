//! Test harness of the MoltBot end-to-end tests: start real service processes
//! on ephemeral ports and learn their addresses from their `listening` log
//! line ([`process`]), an in-process OTLP collector ([`collector`]), gRPC
//! helpers ([`grpc`]), a fake remote provider ([`fake`]) and `/metrics`
//! reading ([`metrics`]).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

pub mod collector;
pub mod fake;
pub mod grpc;
pub mod metrics;
pub mod process;
pub mod providers;
pub mod proxy;
pub mod stores;
pub mod tls;

/// The model that answered a chat completion: the `moltbot.attempts`
/// entry whose outcome is `ok` (empty when none is).
pub fn answered_by(body: &serde_json::Value) -> String {
    body["moltbot"]["attempts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["outcome"] == "ok")
        .and_then(|a| a["model"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// Lower-case hex SHA-256 of `text`: how the gateway's configuration names
/// an API key (`api_keys[].sha256`).
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The test-only `moltbot.testing.v1.SlowService`.
pub mod slow {
    include!(concat!(
        env!("OUT_DIR"),
        "/moltbot.testing.v1.SlowService.rs"
    ));
}
