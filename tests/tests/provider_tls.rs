//! Real providers are reached over HTTPS: a local OpenAI-compatible fake
//! behind rustls with a certificate from a CA made here, trusted only
//! through `SSL_CERT_FILE`, registered with `moltbot keys add --base-url
//! https://127.0.0.1:PORT/v1`, answers a chat turn through the gateway
//! (`"model": "<provider>/<model>"`) over HTTP/2; so do an Anthropic
//! provider (Messages API, streamed) and one whose key is an OAuth2 token
//! fetched from a token endpoint over HTTPS. A second fake whose CA is not
//! trusted is refused, and its health says why.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    http::{HeaderMap, StatusCode, Version},
    response::IntoResponse,
    routing::{get, post},
};
use moltbot_e2e::{grpc, process::ServiceProcess, tls};
use moltbot_proto::auth::v1::{
    AddCredentialRequest, ListProvidersRequest, OAuth2ClientCredentials, ProviderKind,
    UpsertProviderRequest, add_credential_request,
    auth_rotation_service_client::AuthRotationServiceClient,
};
use serde_json::{Value, json};

const KEY: &str = "sk-tls-provider-key";
const OAUTH_TOKEN: &str = "tok-from-the-tls-token-endpoint";

/// An OpenAI-compatible fake that streams `reply` and records the HTTP
/// version of each chat request.
fn fake(reply: &'static str, versions: Arc<Mutex<Vec<Version>>>) -> Router {
    let chat = move |version: Version, headers: HeaderMap| {
        let versions = versions.clone();
        async move {
            versions.lock().unwrap().push(version);
            let auth = headers.get("authorization").and_then(|v| v.to_str().ok());
            if auth != Some(&format!("Bearer {KEY}"))
                && auth != Some(&format!("Bearer {OAUTH_TOKEN}"))
            {
                return (StatusCode::UNAUTHORIZED, HeaderMap::new(), String::new());
            }
            let mut body = String::new();
            for piece in reply.split_inclusive(' ') {
                let chunk = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
                body.push_str(&format!("data: {chunk}\n\n"));
            }
            let end = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 9, "completion_tokens": 3}});
            body.push_str(&format!("data: {end}\n\ndata: [DONE]\n\n"));
            let mut h = HeaderMap::new();
            h.insert("content-type", "text/event-stream".parse().unwrap());
            (StatusCode::OK, h, body)
        }
    };
    // Anthropic's Messages API, streamed, for the `x-api-key` key.
    let messages = |headers: HeaderMap| async move {
        if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some(KEY) {
            return (StatusCode::UNAUTHORIZED, HeaderMap::new(), String::new());
        }
        let events = [
            json!({"type": "message_start", "message": {"usage": {"input_tokens": 7}}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hello from Claude"}}),
            json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": " over TLS"}}),
            json!({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {"output_tokens": 4}}),
            json!({"type": "message_stop"}),
        ];
        let body: String = events
            .iter()
            .map(|e| format!("event: {}\ndata: {e}\n\n", e["type"].as_str().unwrap()))
            .collect();
        let mut h = HeaderMap::new();
        h.insert("content-type", "text/event-stream".parse().unwrap());
        (StatusCode::OK, h, body)
    };
    // An OAuth2 token endpoint (client credentials, RFC 6749 §4.4).
    let token = |body: String| async move {
        if !body.contains("client_secret=cs-tls") {
            return (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({"error": "invalid_client"})),
            );
        }
        (
            StatusCode::OK,
            axum::Json(
                json!({"access_token": OAUTH_TOKEN, "token_type": "Bearer", "expires_in": 3600}),
            ),
        )
    };
    Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/messages", post(messages))
        .route("/oauth/token", post(token))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"data": []})).into_response() }),
        )
}

fn keys_add(auth_url: &str, provider: &str, base_url: &str, model: &str) {
    keys_add_kind(auth_url, provider, "openai", base_url, model);
}

fn keys_add_kind(auth_url: &str, provider: &str, kind: &str, base_url: &str, model: &str) {
    let output = std::process::Command::new(moltbot_e2e::process::binary("moltbot"))
        .args(["keys", "add", "--provider", provider, "--kind", kind])
        .args(["--base-url", base_url])
        .args(["--models", model])
        .env("MOLTBOT_AUTH_URL", auth_url)
        .env("MOLTBOT_ADMIN_TOKEN", "admin")
        .env("MOLTBOT_PRIMARY_KEY", KEY)
        .env_remove("MOLTBOT_SECONDARY_KEY")
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "moltbot keys add: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_https_provider_trusted_through_ssl_cert_file_answers_a_turn() {
    let work = std::env::temp_dir().join(format!("moltbot-provider-tls-{}", std::process::id()));
    std::fs::create_dir_all(&work).unwrap();
    let ca = tls::TestCa::new("MoltBot test provider CA");
    let bundle = work.join("ca.pem");
    ca.write_pem(&bundle);
    let trusted_versions = Arc::new(Mutex::new(Vec::new()));
    let trusted = tls::serve_https(
        fake("Hello over TLS", trusted_versions.clone()),
        &ca.leaf(&["127.0.0.1", "localhost"]),
    )
    .await;
    // Same fake, but its certificate comes from a CA nobody trusts.
    let rogue_ca = tls::TestCa::new("Unknown CA");
    let untrusted_versions = Arc::new(Mutex::new(Vec::new()));
    let untrusted = tls::serve_https(
        fake("should never be read", untrusted_versions.clone()),
        &rogue_ca.leaf(&["127.0.0.1"]),
    )
    .await;

    let ssl = ("SSL_CERT_FILE", bundle.display().to_string());
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[("MOLTBOT_ADMIN_TOKEN", "admin".to_owned()), ssl.clone()],
    );
    keys_add(
        &auth.grpc_url(),
        "tlsfake",
        &format!("https://127.0.0.1:{}/v1", trusted.port()),
        "gpt-tls",
    );
    keys_add(
        &auth.grpc_url(),
        "rogue",
        &format!("https://127.0.0.1:{}/v1", untrusted.port()),
        "gpt-rogue",
    );

    let mut client = AuthRotationServiceClient::new(grpc::connect(&auth.grpc_url()).await);
    let base = format!("https://127.0.0.1:{}", trusted.port());
    // Anthropic over HTTPS, and an OpenAI-compatible provider whose key is
    // an OAuth2 access token from a token endpoint over HTTPS.
    keys_add_kind(
        &auth.grpc_url(),
        "tlsclaude",
        "anthropic",
        &format!("{base}/v1"),
        "claude-tls",
    );
    client
        .upsert_provider(grpc::with_bearer(
            UpsertProviderRequest {
                name: "tlsoauth".into(),
                kind: ProviderKind::Openai as i32,
                base_url: format!("{base}/v1"),
                models: vec!["gpt-oauth".into()],
                health_check_interval_seconds: 30,
            },
            "admin",
        ))
        .await
        .unwrap();
    client
        .add_credential(grpc::with_bearer(
            AddCredentialRequest {
                provider: "tlsoauth".into(),
                secret: Some(add_credential_request::Secret::Oauth2(
                    OAuth2ClientCredentials {
                        token_url: format!("{base}/oauth/token"),
                        client_id: "moltbot".into(),
                        client_secret: "cs-tls".into(),
                        scopes: vec!["chat".into()],
                    },
                )),
            },
            "admin",
        ))
        .await
        .unwrap();

    // Health checks run over HTTPS: the trusted provider is healthy, the
    // other is unhealthy with the reason in words.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (good, bad) = loop {
        let providers = client
            .list_providers(ListProvidersRequest {})
            .await
            .unwrap()
            .into_inner()
            .providers;
        let find = |n: &str| providers.iter().find(|p| p.name == n).cloned().unwrap();
        let (good, bad) = (find("tlsfake"), find("rogue"));
        if good.last_checked_at.is_some() && bad.last_checked_at.is_some() {
            break (good, bad);
        }
        assert!(Instant::now() < deadline, "no health check: {providers:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(good.healthy, "{good:?}");
    assert!(!bad.healthy, "{bad:?}");
    assert!(
        bad.health_detail.contains("unknown issuer") && bad.health_detail.contains("SSL_CERT_FILE"),
        "{bad:?}"
    );

    let context = ServiceProcess::start("moltbot-context", &[]);
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[("MOLTBOT_AUTH_URL", auth.grpc_url()), ssl.clone()],
    );
    let gateway = ServiceProcess::gateway_without_enrichments(&context, &generation, &auth, &[]);
    grpc::wait_serving(
        &grpc::connect(&generation.grpc_url()).await,
        "",
        Duration::from_secs(120),
    )
    .await;
    let http = reqwest::Client::new();
    let chat = |model: &'static str| {
        let http = http.clone();
        let url = format!("{}/v1/chat/completions", gateway.http_url());
        async move {
            let r = http
                .post(url)
                .json(&json!({"model": model, "session_id": format!("tls-{}", model.replace('/', "-")), "messages": [{"role": "user", "content": "Say hello."}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<Value>().await.unwrap())
        }
    };
    let (status, body) = chat("tlsfake/gpt-tls").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "Hello over TLS",
        "{body}"
    );
    assert_eq!(body["model"], "tlsfake/gpt-tls");
    assert_eq!(
        trusted_versions.lock().unwrap().as_slice(),
        &[Version::HTTP_2],
        "the provider offered h2 in ALPN"
    );

    trusted_versions.lock().unwrap().clear();
    let (status, body) = chat("tlsclaude/claude-tls").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "Hello from Claude over TLS",
        "{body}"
    );
    let (status, body) = chat("tlsoauth/gpt-oauth").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["choices"][0]["message"]["content"], "Hello over TLS",
        "{body}"
    );

    // The untrusted provider is never spoken to: no request reached it.
    let (status, body) = chat("rogue/gpt-rogue").await;
    assert!(status >= 500, "{status} {body}");
    assert!(untrusted_versions.lock().unwrap().is_empty());

    for p in [gateway, generation, context, auth] {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&work);
}
