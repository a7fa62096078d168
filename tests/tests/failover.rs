//! Failover end to end: the route's candidate is a remote provider that is
//! down (a fake answering 503), so after its retries the route falls back
//! to another OpenAI-compatible provider — a local fake, reached through a
//! credential leased from the auth-rotation service — and
//! `moltbot.attempts` records every attempt. The turn engine's own failover
//! rules are tested in process (`gateway/src/turn/tests/`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use moltbot_e2e::{fake, grpc, process::ServiceProcess, providers};
use serde_json::{Value, json};

const FAKE_KEY: &str = "sk-fake-provider-key";

#[tokio::test(flavor = "multi_thread")]
async fn local_model_fails_and_the_route_falls_back_to_a_remote_provider() {
    let calls = Arc::new(AtomicU32::new(0));
    let last_body = Arc::new(std::sync::Mutex::new(Value::Null));
    let fake_url = fake::Provider {
        key: Some(FAKE_KEY),
        calls: calls.clone(),
        last_body: last_body.clone(),
        ..Default::default()
    }
    .start()
    .await;
    let down_url = fake::Provider {
        fail_with: Some(axum::http::StatusCode::SERVICE_UNAVAILABLE),
        ..Default::default()
    }
    .start()
    .await;
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[("MOLTBOT_ADMIN_TOKEN", "admin".to_owned())],
    );
    providers::register_openai(
        &auth.grpc_url(),
        "admin",
        "fake",
        fake_url,
        &["gpt-fake"],
        FAKE_KEY,
    )
    .await;
    providers::register_openai(
        &auth.grpc_url(),
        "admin",
        "down",
        down_url,
        &["gpt-down"],
        "sk-down",
    )
    .await;

    let context = ServiceProcess::start("moltbot-context", &[]);
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
    );
    let config = std::env::temp_dir().join(format!("moltbot-failover-{}.yaml", std::process::id()));
    std::fs::write(
        &config,
        r#"
routes:
  - name: default
    match: { models: [default] }
    candidates: [{ model: down/gpt-down }]
    fallbacks: [fake/gpt-fake]
    retry: { max_attempts: 2, initial_backoff_ms: 50 }
"#,
    )
    .unwrap();
    // Enrichments are not running: the turn goes on degraded.
    let gateway = ServiceProcess::gateway_without_enrichments(
        &context,
        &generation,
        &auth,
        &[("MOLTBOT_GATEWAY_CONFIG", config.display().to_string())],
    );
    let gen_channel = grpc::connect(&generation.grpc_url()).await;
    grpc::wait_serving(&gen_channel, "", Duration::from_secs(120)).await;

    let http = reqwest::Client::new();
    let response = http
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({
            "model": "default",
            "session_id": "failover-1",
            "messages": [{"role": "user", "content": "Say hello."}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "Hello from fake",
        "{body}"
    );
    assert_eq!(body["model"], "fake/gpt-fake");
    assert_eq!(body["usage"]["completion_tokens"], 3);
    let attempts = body["moltbot"]["attempts"].as_array().unwrap();
    let summary: Vec<(String, String)> = attempts
        .iter()
        .map(|a| {
            (
                a["model"].as_str().unwrap().to_owned(),
                a["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("down/gpt-down".to_owned(), "unavailable".to_owned()),
            ("down/gpt-down".to_owned(), "unavailable".to_owned()),
            ("fake/gpt-fake".to_owned(), "ok".to_owned()),
        ],
        "{body}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    let degraded = body["moltbot"]["degraded"].as_array().unwrap();
    assert!(degraded.iter().any(|d| d == "understanding"), "{body}");

    // The remote model is listed next to the local one.
    let models: Value = http
        .get(format!("{}/v1/models", gateway.http_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        models["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["id"] == "fake/gpt-fake"),
        "{models}"
    );

    // Function calling through the remote model: tools and tool_choice
    // reach the provider as OpenAI sends them, the streamed call fragments
    // come back as one call, and the tool's result goes back with its id.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]);
    let ask = json!({"role": "user", "content": "Weather in Paris?"});
    let call_body: Value = http
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({"model": "fake/gpt-fake", "messages": [ask], "tools": tools, "tool_choice": "required"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        call_body["choices"][0]["finish_reason"], "tool_calls",
        "{call_body}"
    );
    let call = &call_body["choices"][0]["message"]["tool_calls"][0];
    assert_eq!(call["id"], "call_fake", "{call_body}");
    assert_eq!(call["function"]["name"], "get_weather", "{call_body}");
    assert_eq!(
        call["function"]["arguments"], r#"{"city": "Paris"}"#,
        "{call_body}"
    );
    let sent = last_body.lock().unwrap().clone();
    assert_eq!(sent["tool_choice"], "required", "{sent}");
    assert_eq!(
        sent["tools"][0]["function"]["name"], "get_weather",
        "{sent}"
    );
    let answer: Value = http
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(
            &json!({"model": "fake/gpt-fake", "tools": tools, "messages": [
                ask,
                call_body["choices"][0]["message"],
                {"role": "tool", "tool_call_id": "call_fake", "content": "18 C"}
            ]}),
        )
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["choices"][0]["message"]["content"], "Hello from fake",
        "{answer}"
    );
    let sent = last_body.lock().unwrap().clone();
    let messages = sent["messages"].as_array().unwrap();
    let n = messages.len();
    assert_eq!(
        messages[n - 2]["tool_calls"][0]["id"],
        "call_fake",
        "{sent}"
    );
    assert_eq!(
        messages[n - 2]["tool_calls"][0]["function"]["arguments"],
        r#"{"city":"Paris"}"#,
        "{sent}"
    );
    assert_eq!(messages[n - 1]["tool_call_id"], "call_fake", "{sent}");

    for p in [gateway, generation, context, auth] {
        p.stop();
    }
    let _ = std::fs::remove_file(&config);
}
