//! Tenants and token reservations at the gateway, against real context and
//! generation processes and the real model:
//!
//! - two API keys of different tenants sending the same `session_id` get two
//!   separate sessions: bob cannot read what alice wrote, and his turns are
//!   not appended to her conversation;
//! - eight concurrent turns on a key with a small tokens-per-minute limit
//!   are limited by the reservation made at admission (prompt + completion
//!   budget), not all admitted because the bucket was not yet spent.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use moltbot_e2e::{grpc, process::ServiceProcess, sha256_hex};
use moltbot_proto::context::v1::{GetHistoryRequest, context_service_client::ContextServiceClient};
use serde_json::{Value, json};

struct Mesh {
    context: ServiceProcess,
    generation: ServiceProcess,
    auth: ServiceProcess,
    gateway: ServiceProcess,
}

fn start() -> Mesh {
    let context = ServiceProcess::start("moltbot-context", &[]);
    let auth = ServiceProcess::start("moltbot-auth-rotation", &[]);
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
    );
    let config = std::env::temp_dir().join(format!("moltbot-tenants-{}.yaml", std::process::id()));
    let yaml = format!(
        "routes:\n  - name: default\n    match: {{ models: [default] }}\n    system_prompt: You are a helpful assistant. Answer in one short sentence.\n    candidates: [{{ model: qwen2.5-coder-0.5b-instruct }}]\n\
api_keys:\n  - {{ name: alice, tenant: acme, sha256: {} }}\n  - {{ name: bob, tenant: globex, sha256: {} }}\n  - {{ name: small, sha256: {}, tokens_per_minute: 600 }}\n",
        sha256_hex("sk-alice"),
        sha256_hex("sk-bob"),
        sha256_hex("sk-small"),
    );
    std::fs::write(&config, yaml).unwrap();
    let gateway = ServiceProcess::gateway_without_enrichments(
        &context,
        &generation,
        &auth,
        &[("MOLTBOT_GATEWAY_CONFIG", config.display().to_string())],
    );
    Mesh {
        context,
        generation,
        auth,
        gateway,
    }
}

async fn turn(mesh: &Mesh, key: &str, session: &str, text: &str, max_tokens: u32) -> (u16, Value) {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", mesh.gateway.http_url()))
        .bearer_auth(key)
        .json(&json!({
            "model": "default",
            "session_id": session,
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0,
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

async fn history(mesh: &Mesh, tenant: &str, session: &str) -> Vec<String> {
    let channel = grpc::connect(&mesh.context.grpc_url()).await;
    let found = ContextServiceClient::new(channel)
        .get_history(GetHistoryRequest {
            tenant: tenant.to_owned(),
            session_id: session.to_owned(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await;
    match found {
        Ok(h) => h
            .into_inner()
            .turns
            .into_iter()
            .map(|t| t.content)
            .collect(),
        Err(s) if s.code() == tonic::Code::NotFound => Vec::new(),
        Err(s) => panic!("{s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn tenants_do_not_share_sessions_and_tokens_are_reserved() {
    let mesh = start();
    let channel = grpc::connect(&mesh.generation.grpc_url()).await;
    grpc::wait_serving(&channel, "", std::time::Duration::from_secs(180)).await;

    // The same session id, two tenants.
    let (status, alice) = turn(
        &mesh,
        "sk-alice",
        "shared-S",
        "My password is TANGERINE-42. Remember it.",
        8,
    )
    .await;
    assert_eq!(status, 200, "{alice}");
    let (status, bob) = turn(&mesh, "sk-bob", "shared-S", "What is my password?", 24).await;
    assert_eq!(status, 200, "{bob}");
    assert_eq!(bob["moltbot"]["session_id"], "shared-S", "{bob}");
    let answer = bob["choices"][0]["message"]["content"].as_str().unwrap();
    assert!(
        !answer.contains("TANGERINE"),
        "bob read alice's session: {answer}"
    );
    let acme = history(&mesh, "acme", "shared-S").await;
    let globex = history(&mesh, "globex", "shared-S").await;
    assert_eq!(acme.len(), 2, "{acme:?}");
    assert!(acme[0].contains("TANGERINE-42"), "{acme:?}");
    assert_eq!(globex.len(), 2, "bob's turns are his own: {globex:?}");
    assert!(
        globex.iter().all(|t| !t.contains("TANGERINE")),
        "{globex:?}"
    );
    // A key without a tenant is a tenant of its own; no anonymous tenant
    // holds anything.
    assert!(history(&mesh, "local", "shared-S").await.is_empty());

    // Eight concurrent turns of 200 completion tokens on a key of 600
    // tokens a minute: each reserves its prompt plus 200, so at most two
    // run and the rest are refused at once with 429.
    let turns = (0..8).map(|i| {
        let mesh = &mesh;
        async move { turn(mesh, "sk-small", &format!("small-{i}"), "Say hello.", 200).await }
    });
    let results = futures::future::join_all(turns).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, b)| b)
        .collect();
    assert!((1..=2).contains(&ok), "{results:?}");
    assert_eq!(ok + limited.len(), 8, "{results:?}");
    for body in limited {
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains("tokens per minute"), "{body}");
    }

    for p in [mesh.gateway, mesh.generation, mesh.auth, mesh.context] {
        p.stop();
    }
}
