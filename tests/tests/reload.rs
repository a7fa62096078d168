//! The gateway's configuration reloaded in place (gateway/src/reload/mod.rs),
//! on a real gateway process: routes and API keys change when the file
//! changes, a file that does not validate is kept out (the previous
//! configuration goes on serving, the log and the metrics say why), and
//! SIGHUP reloads at once. The gateway's upstreams are closed ports, which
//! tells the routes in force apart: a turn on a configured route fails at
//! its first call, the session history (503 naming `context`); a model no
//! route names is looked up among generation's models instead (503 naming
//! `generation`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    path::Path,
    time::{Duration, Instant},
};

use moltbot_e2e::{metrics, process::ServiceProcess, sha256_hex};
use serde_json::{Value, json};

fn config(routes: &[&str], keys: &[&str]) -> String {
    let mut text = String::from("routes:\n");
    for r in routes {
        text.push_str(&format!(
            "  - {{ name: {r}, match: {{ models: [{r}] }}, candidates: [{{ model: local-{r} }}] }}\n"
        ));
    }
    if !keys.is_empty() {
        text.push_str("api_keys:\n");
        for k in keys {
            text.push_str(&format!("  - {{ name: {k}, sha256: {} }}\n", sha256_hex(k)));
        }
    }
    text
}

/// Writes through a temporary file and a rename, as a ConfigMap update or
/// an editor's atomic save does.
fn write(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn gateway(path: &Path, poll_ms: u64) -> ServiceProcess {
    ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_GATEWAY_CONFIG", path.display().to_string()),
            ("MOLTBOT_CONFIG_POLL_MS", poll_ms.to_string()),
            ("MOLTBOT_CONTEXT_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_GENERATION_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_REQUEST_TIMEOUT_MS", "1500".to_owned()),
        ],
    )
}

/// The status and error message of a chat request for `model` with `key`.
async fn ask(gateway: &ServiceProcess, model: &str, key: &str) -> (u16, String) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .bearer_auth(key)
        .json(&json!({"model": model, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap_or_default();
    (
        status,
        body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned(),
    )
}

async fn gauge(gateway: &ServiceProcess, name: &str, labels: &[&str]) -> f64 {
    metrics::sum(&format!("{}/metrics", gateway.http_url()), name, labels).await
}

/// Polls until `ask` answers as `want` says, within 10 s.
async fn until(gateway: &ServiceProcess, model: &str, key: &str, want: impl Fn(u16, &str) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (status, code) = ask(gateway, model, key).await;
        if want(status, &code) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{model} with {key}: still {status} {code} after 10 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_and_keys_follow_the_file_and_a_bad_file_is_kept_out() {
    let dir = std::env::temp_dir().join(format!("moltbot-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    write(&path, &config(&["alpha"], &["key-one"]));
    let gw = gateway(&path, 200);
    let not_found = |s: u16, m: &str| s == 503 && m.starts_with("generation");
    let routed = |s: u16, m: &str| s == 503 && m.starts_with("context");

    // As started: alpha routed, beta unknown, only key-one admitted.
    let (status, message) = ask(&gw, "alpha", "key-one").await;
    assert!(routed(status, &message), "{status} {message}");
    let (status, code) = ask(&gw, "beta", "key-one").await;
    assert!(not_found(status, &code), "{status} {code}");
    assert_eq!(ask(&gw, "alpha", "key-two").await.0, 401);

    // A new route and a new key replace the old key: all in one swap.
    write(&path, &config(&["alpha", "beta"], &["key-two"]));
    until(&gw, "beta", "key-two", routed).await;
    assert_eq!(ask(&gw, "alpha", "key-one").await.0, 401, "the removed key");
    assert_eq!(
        gauge(
            &gw,
            "moltbot_gateway_config_reloads_total",
            &["outcome=\"ok\""]
        )
        .await,
        1.0
    );
    assert_eq!(
        gauge(&gw, "moltbot_gateway_config_last_reload_successful", &[]).await,
        1.0
    );

    // A file that does not validate: the last good configuration stays.
    write(&path, "routes: []\n");
    let deadline = Instant::now() + Duration::from_secs(10);
    while gauge(&gw, "moltbot_gateway_config_last_reload_successful", &[]).await != 0.0 {
        assert!(Instant::now() < deadline, "the bad file was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, code) = ask(&gw, "beta", "key-two").await;
    assert!(
        routed(status, &code),
        "beta lost to a bad file: {status} {code}"
    );
    assert_eq!(
        gauge(
            &gw,
            "moltbot_gateway_config_reloads_total",
            &["outcome=\"error\""]
        )
        .await,
        1.0
    );
    // Logged once with the reason, though the file is polled every 200 ms.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let refusals: Vec<String> = gw
        .output()
        .lines()
        .filter(|l| l.contains("configuration not reloaded"))
        .map(str::to_owned)
        .collect();
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    assert!(refusals[0].contains("`routes` is empty"), "{}", refusals[0]);

    // Fixed: served again.
    write(&path, &config(&["gamma"], &["key-two"]));
    until(&gw, "gamma", "key-two", routed).await;
    until(&gw, "beta", "key-two", not_found).await;
    assert_eq!(
        gauge(&gw, "moltbot_gateway_config_last_reload_successful", &[]).await,
        1.0
    );
    gw.stop();
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn sighup_reloads_at_once() {
    let dir = std::env::temp_dir().join(format!("moltbot-reload-hup-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.yaml");
    write(&path, &config(&["alpha"], &[]));
    // Polled once an hour: only the signal can reload it in time.
    let gw = gateway(&path, 3_600_000);
    write(&path, &config(&["alpha", "beta"], &[]));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (status, message) = ask(&gw, "beta", "any").await;
    assert!(
        status == 503 && message.starts_with("generation"),
        "reloaded without a signal: {status} {message}"
    );
    gw.signal_hangup();
    until(&gw, "beta", "any", |s, m| {
        s == 503 && m.starts_with("context")
    })
    .await;
    gw.stop();
    let _ = std::fs::remove_dir_all(dir);
}
