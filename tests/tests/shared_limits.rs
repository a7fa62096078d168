//! Rate limits at several gateways (gateway/src/edge/ratelimit/): two real
//! gateway processes sharing a real Redis hold one key's requests-per-minute
//! limit together; without a reachable Redis each falls back to its own
//! buckets and says so in its metrics; a gateway told it is replicated
//! refuses to start without Redis. No model is needed: the limit is
//! enforced before any upstream is called (the upstreams here are closed
//! ports, so admitted requests answer 503, refused ones 429).
//!
//! Needs Redis (`REDIS_URL`, default redis://127.0.0.1:6379).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::process::{Command, Stdio};

use moltbot_e2e::{
    metrics,
    process::{ServiceProcess, binary},
    stores::{redis_url, unique},
};

const LIMITED_SHA256: &str = "7b508dace774f8adc1b121c1812b740904be6dfd37e3b5e3579bc81fbf6f5553";
const RPM: usize = 6;

fn gateway(config: &std::path::Path, redis: Option<String>) -> ServiceProcess {
    let mut env = vec![
        ("MOLTBOT_GATEWAY_CONFIG", config.display().to_string()),
        ("MOLTBOT_CONTEXT_URL", "http://127.0.0.1:9".to_owned()),
        ("MOLTBOT_GENERATION_URL", "http://127.0.0.1:9".to_owned()),
        ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".to_owned()),
        ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".to_owned()),
        ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".to_owned()),
        ("MOLTBOT_REPLICATED", "true".to_owned()),
        // No spend ledger: these gateways measure rate limits only (the
        // ledger of replicated gateways is tested in tests/tests/spend.rs).
        ("MOLTBOT_SPEND_LEDGER", "off".to_owned()),
    ];
    if let Some(url) = redis {
        env.push(("REDIS_URL", url));
    }
    ServiceProcess::start("moltbot-gateway", &env)
}

fn config() -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("{}.yaml", unique("limited")));
    std::fs::write(
        &path,
        format!(
            "routes:\n  - name: default\n    match: {{ models: [default] }}\n    candidates: [{{ model: m }}]\napi_keys:\n  - {{ name: {}, sha256: \"{LIMITED_SHA256}\", requests_per_minute: {RPM} }}\nallow_anonymous: false\n",
            unique("limited")
        ),
    )
    .unwrap();
    path
}

/// Sends `n` requests alternating over `gateways`; returns how many were
/// not refused with 429.
async fn admitted(gateways: &[&ServiceProcess], n: usize) -> usize {
    let http = reqwest::Client::new();
    let mut passed = 0;
    for i in 0..n {
        let status = http
            .get(format!(
                "{}/v1/models",
                gateways[i % gateways.len()].http_url()
            ))
            .bearer_auth("limited")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status != 429 {
            passed += 1;
        }
    }
    passed
}

async fn metric(p: &ServiceProcess, name: &str) -> f64 {
    metrics::sum(&format!("{}/metrics", p.http_url()), name, &[]).await
}

#[tokio::test(flavor = "multi_thread")]
async fn two_gateways_sharing_redis_hold_one_limit_and_fall_back_without_it() {
    let config = config();
    let a = gateway(&config, Some(redis_url()));
    let b = gateway(&config, Some(redis_url()));
    let passed = admitted(&[&a, &b], 3 * RPM).await;
    assert_eq!(
        passed,
        RPM,
        "two gateways sharing Redis let {passed} of {} requests through a {RPM}/min limit",
        3 * RPM
    );
    assert_eq!(
        metric(&a, "moltbot_gateway_rate_limit_store_errors_total").await,
        0.0
    );

    // Redis unreachable: each gateway enforces the limit on its own (so
    // twice the limit over two) and counts the fallback.
    let config = self::config();
    let closed = "redis://127.0.0.1:9".to_owned();
    let c = gateway(&config, Some(closed.clone()));
    let d = gateway(&config, Some(closed));
    let passed = admitted(&[&c, &d], 3 * RPM).await;
    assert_eq!(
        passed,
        2 * RPM,
        "each gateway's own buckets while Redis is down"
    );
    assert!(metric(&c, "moltbot_gateway_rate_limit_store_errors_total").await >= RPM as f64);
}

/// A replicated gateway started with `env` (and without `removed`): its
/// exit status and output.
fn replicated_start(env: &[(&str, String)], removed: &[&str]) -> (bool, String) {
    let config = config();
    let mut command = Command::new(binary("moltbot-gateway"));
    command
        .env("MOLTBOT_GATEWAY_CONFIG", &config)
        .env("MOLTBOT_HTTP_ADDR", "127.0.0.1:0")
        .env("MOLTBOT_REPLICATED", "true")
        .env(
            "MOLTBOT_DATA_DIR",
            std::env::temp_dir().join(unique("limited-data")),
        )
        .stdin(Stdio::null());
    for (k, v) in env {
        command.env(k, v);
    }
    for k in removed {
        command.env_remove(k);
    }
    let output = command.output().unwrap();
    (
        output.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}

#[test]
fn a_replicated_gateway_without_redis_refuses_to_start() {
    let (ok, text) = replicated_start(&[], &["REDIS_URL"]);
    assert!(!ok);
    assert!(
        text.contains("MOLTBOT_REPLICATED") && text.contains("REDIS_URL"),
        "{text}"
    );
}

#[test]
fn a_replicated_gateway_refuses_a_spend_ledger_of_its_own() {
    // Redis is there; the ledger would be a SQLite file per replica.
    let (ok, text) = replicated_start(&[("REDIS_URL", redis_url())], &["DATABASE_URL"]);
    assert!(!ok);
    assert!(
        text.contains("MOLTBOT_REPLICATED") && text.contains("DATABASE_URL"),
        "{text}"
    );
}
