//! How the mesh treats what real providers answer, one scenario per
//! behaviour, against a scripted OpenAI-compatible fake (per API key):
//!
//! - 400 from the provider: the client gets 400 with the provider's message;
//!   nothing is retried, no breaker counts it.
//! - 429 with `Retry-After: 30`: that key cools ~30 s, the provider's other
//!   key answers the same turn.
//! - 429 with an HTTP-date `Retry-After` on a provider's only key: the next
//!   model answers at once (no backoff sleep), and the next turn skips the
//!   cooling provider without calling it.
//! - 503 every time: retried, breakers open, the fallback answers; the next
//!   turn skips the open breaker; once the provider recovers, the half-open
//!   probe succeeds and traffic returns to it.
//! - A hang before the first byte: the time-to-first-token timeout fails
//!   over to the fallback and counts one failure.
//! - A hang after the first token: the turn fails (503, nothing stored in
//!   the session) and the stall counts one failure.
//!
//! Each asserts the client's status, `moltbot.attempts`, the breaker and
//! credential states from `ListProviders`, and which key or model answered.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Body,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use moltbot_e2e::{grpc, process::ServiceProcess};
use moltbot_proto::{
    auth::v1::{
        AddCredentialRequest, ApiKeyPair, BreakerState, CredentialState, ListProvidersRequest,
        ProviderKind, ProviderStatus, UpsertProviderRequest, add_credential_request,
        auth_rotation_service_client::AuthRotationServiceClient,
    },
    context::v1::{GetHistoryRequest, context_service_client::ContextServiceClient},
};
use serde_json::{Value, json};
use tonic::transport::Channel;

/// What the fake does for one API key.
#[derive(Debug, Clone)]
enum Script {
    /// Streams "from <key>".
    Answer,
    /// Answers this status with these headers and body.
    Status(u16, Vec<(&'static str, String)>, String),
    /// Never sends the response headers.
    HangBeforeHeaders,
    /// Sends one token, then nothing more.
    HangAfterFirstToken,
}

#[derive(Default)]
struct Fake {
    scripts: Mutex<HashMap<String, Script>>,
    calls: Mutex<Vec<String>>,
}

impl Fake {
    fn set(&self, key: &str, script: Script) {
        self.scripts.lock().unwrap().insert(key.to_owned(), script);
    }

    fn calls(&self, key: &str) -> usize {
        self.calls
            .lock()
            .unwrap()
            .iter()
            .filter(|k| *k == key)
            .count()
    }
}

fn sse(piece: &str) -> String {
    let chunk = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

async fn start_fake(fake: Arc<Fake>) -> String {
    let chat = move |headers: HeaderMap| {
        let fake = fake.clone();
        async move {
            let key = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_owned();
            fake.calls.lock().unwrap().push(key.clone());
            let script = fake
                .scripts
                .lock()
                .unwrap()
                .get(&key)
                .cloned()
                .unwrap_or(Script::Answer);
            match script {
                Script::Answer => {
                    let end = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 5, "completion_tokens": 2}});
                    let body = format!(
                        "{}data: {end}\n\ndata: [DONE]\n\n",
                        sse(&format!("from {key}"))
                    );
                    ([("content-type", "text/event-stream")], body).into_response()
                }
                Script::Status(code, extra, body) => {
                    let mut response = (StatusCode::from_u16(code).unwrap(), body).into_response();
                    for (k, v) in extra {
                        response.headers_mut().insert(k, v.parse().unwrap());
                    }
                    response
                }
                Script::HangBeforeHeaders => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    StatusCode::OK.into_response()
                }
                Script::HangAfterFirstToken => {
                    let first =
                        futures::stream::once(async { Ok::<_, std::io::Error>(sse("partial")) });
                    let stream = futures::StreamExt::chain(first, futures::stream::pending());
                    Response::builder()
                        .header("content-type", "text/event-stream")
                        .body(Body::from_stream(stream))
                        .unwrap()
                }
            }
        }
    };
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route(
            "/v1/models",
            get(|| async { axum::Json(json!({"data": []})) }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    url
}

fn admin<T>(msg: T) -> tonic::Request<T> {
    grpc::with_bearer(msg, "admin")
}

async fn provider(
    auth: &mut AuthRotationServiceClient<Channel>,
    url: &str,
    name: &str,
    keys: (&str, &str),
) {
    auth.upsert_provider(admin(UpsertProviderRequest {
        name: name.into(),
        kind: ProviderKind::Openai as i32,
        base_url: url.into(),
        models: vec!["m".into()],
        health_check_interval_seconds: 3600,
    }))
    .await
    .unwrap();
    auth.add_credential(admin(AddCredentialRequest {
        provider: name.into(),
        secret: Some(add_credential_request::Secret::ApiKeys(ApiKeyPair {
            primary: keys.0.into(),
            secondary: keys.1.into(),
        })),
    }))
    .await
    .unwrap();
}

async fn status_of(auth: &mut AuthRotationServiceClient<Channel>, name: &str) -> ProviderStatus {
    auth.list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
}

/// Polls `ListProviders` until `ok` holds for `name` (outcomes are
/// reported just after the turn answers).
async fn wait_status(
    auth: &mut AuthRotationServiceClient<Channel>,
    name: &str,
    ok: impl Fn(&ProviderStatus) -> bool,
) -> ProviderStatus {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = status_of(auth, name).await;
        if ok(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{name} never reached the state: {s:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn attempts(body: &Value) -> Vec<(String, String)> {
    body["moltbot"]["attempts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|x| {
                    (
                        x["model"].as_str().unwrap_or_default().to_owned(),
                        x["outcome"].as_str().unwrap_or_default().to_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
        .collect()
}

fn cooling_for_s(s: &ProviderStatus, slot: usize) -> i64 {
    let until = s.credentials[slot].cooling_until.unwrap();
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    until.seconds - now
}

#[tokio::test(flavor = "multi_thread")]
async fn provider_answers_are_handled_the_way_gateway_users_expect() {
    let fake = Arc::new(Fake::default());
    let url = start_fake(fake.clone()).await;
    let auth_proc = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[
            ("MOLTBOT_ADMIN_TOKEN", "admin".to_owned()),
            ("MOLTBOT_BREAKER_COOLDOWN_MS", "1500".to_owned()),
        ],
    );
    let mut auth = AuthRotationServiceClient::new(grpc::connect(&auth_proc.grpc_url()).await);
    for (name, keys) in [
        ("s400", ("k400", "")),
        ("s429", ("k429a", "k429b")),
        ("sbusy", ("kbusy", "")),
        ("s503", ("k503", "")),
        ("shang", ("khang", "")),
        ("sstall", ("kstall", "")),
        ("backup", ("kbackup", "")),
    ] {
        provider(&mut auth, &url, name, keys).await;
    }
    let context = ServiceProcess::start("moltbot-context", &[]);
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[
            ("MOLTBOT_AUTH_URL", auth_proc.grpc_url()),
            ("MOLTBOT_REMOTE_TTFT_TIMEOUT_MS", "1500".to_owned()),
            ("MOLTBOT_REMOTE_IDLE_TIMEOUT_MS", "1500".to_owned()),
        ],
    );
    let dir = std::env::temp_dir().join(format!("moltbot-semantics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    let route = |name: &str, first: &str, retry: &str| {
        format!(
            "  - name: {name}\n    match: {{ models: [{name}] }}\n    candidates: [{{ model: {first}/m }}]\n    fallbacks: [backup/m]\n    retry: {retry}\n"
        )
    };
    let yaml = [
        "routes:\n".to_owned(),
        route(
            "r400",
            "s400",
            "{ max_attempts: 3, initial_backoff_ms: 50 }",
        ),
        route(
            "r429",
            "s429",
            "{ max_attempts: 3, initial_backoff_ms: 50 }",
        ),
        // A long backoff: a turn that slept on the busy model would show it.
        route(
            "rbusy",
            "sbusy",
            "{ max_attempts: 3, initial_backoff_ms: 3000 }",
        ),
        route(
            "r503",
            "s503",
            "{ max_attempts: 3, initial_backoff_ms: 50 }",
        ),
        route("rhang", "shang", "{ max_attempts: 1 }"),
        route("rstall", "sstall", "{ max_attempts: 1 }"),
    ]
    .concat();
    std::fs::write(&config, yaml).unwrap();
    let gateway = ServiceProcess::gateway_without_enrichments(
        &context,
        &generation,
        &auth_proc,
        &[("MOLTBOT_GATEWAY_CONFIG", config.display().to_string())],
    );
    grpc::wait_serving(
        &grpc::connect(&generation.grpc_url()).await,
        "",
        Duration::from_secs(120),
    )
    .await;
    let http = reqwest::Client::new();
    let chat = |model: &'static str, session: &'static str| {
        let http = http.clone();
        let url = format!("{}/v1/chat/completions", gateway.http_url());
        async move {
            let started = Instant::now();
            let r = http
                .post(url)
                .json(&json!({"model": model, "session_id": session, "messages": [{"role": "user", "content": "hi"}]}))
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let body: Value = r.json().await.unwrap();
            (status, body, started.elapsed())
        }
    };
    let closed = |s: &ProviderStatus| {
        s.credentials[0].breaker == BreakerState::Closed as i32
            && s.credentials[0].consecutive_failures == 0
            && s.endpoints[0].consecutive_failures == 0
    };

    // -- 400: the client's error, passed through; no retry, no breaker --
    fake.set(
        "k400",
        Script::Status(
            400,
            vec![("content-type", "application/json".into())],
            json!({"error": {"message": "max_tokens is too large for this model", "type": "invalid_request_error"}}).to_string(),
        ),
    );
    let (status, body, _) = chat("r400", "sem-400").await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens is too large for this model"),
        "{body}"
    );
    assert_eq!(fake.calls("k400"), 1, "a client error is not retried");
    assert_eq!(fake.calls("kbackup"), 0, "nor sent to the fallback");
    let s = wait_status(&mut auth, "s400", |s| closed(s)).await;
    assert_eq!(s.credentials[0].state, CredentialState::Active as i32);

    // -- 429 with delta-seconds: that key cools, the other key answers --
    fake.set(
        "k429a",
        Script::Status(429, vec![("retry-after", "30".into())], String::new()),
    );
    let (status, body, _) = chat("r429", "sem-429").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from k429b");
    assert_eq!(attempts(&body), pairs(&[("s429/m", "ok")]));
    let s = wait_status(&mut auth, "s429", |s| {
        s.credentials[0].state == CredentialState::Cooling as i32
    })
    .await;
    let left = cooling_for_s(&s, 0);
    assert!((25..=31).contains(&left), "cooling {left} s: {s:?}");
    assert!(closed(&s), "a 429 is not a breaker failure: {s:?}");

    // -- 429 with an HTTP-date on the only key: the next model at once --
    let in_20s = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(20));
    fake.set(
        "kbusy",
        Script::Status(429, vec![("retry-after", in_20s)], String::new()),
    );
    let (status, body, took) = chat("rbusy", "sem-busy-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from kbackup");
    assert_eq!(
        attempts(&body),
        pairs(&[("sbusy/m", "resource_exhausted"), ("backup/m", "ok")])
    );
    assert!(
        took < Duration::from_millis(2500),
        "slept on a busy model: {took:?}"
    );
    let s = wait_status(&mut auth, "sbusy", |s| {
        s.credentials[0].state == CredentialState::Cooling as i32
    })
    .await;
    let left = cooling_for_s(&s, 0);
    assert!((15..=21).contains(&left), "cooling {left} s: {s:?}");
    // The next turn does not even call the cooling key.
    let (status, body, _) = chat("rbusy", "sem-busy-2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        attempts(&body),
        pairs(&[("sbusy/m", "resource_exhausted"), ("backup/m", "ok")])
    );
    assert_eq!(fake.calls("kbusy"), 1);

    // -- 503: retried, breakers open, fallback; then recovery --
    fake.set("k503", Script::Status(503, Vec::new(), "overloaded".into()));
    let (status, body, _) = chat("r503", "sem-503-1").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        attempts(&body),
        pairs(&[
            ("s503/m", "unavailable"),
            ("s503/m", "unavailable"),
            ("s503/m", "unavailable"),
            ("backup/m", "ok"),
        ])
    );
    wait_status(&mut auth, "s503", |s| {
        s.credentials[0].breaker == BreakerState::Open as i32
            && s.endpoints[0].breaker == BreakerState::Open as i32
    })
    .await;
    let (status, body, _) = chat("r503", "sem-503-2").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        attempts(&body),
        pairs(&[("s503/m", "resource_exhausted"), ("backup/m", "ok")])
    );
    assert_eq!(fake.calls("k503"), 3, "an open breaker sends nothing");
    fake.set("k503", Script::Answer);
    tokio::time::sleep(Duration::from_millis(1700)).await;
    let (status, body, _) = chat("r503", "sem-503-3").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["choices"][0]["message"]["content"], "from k503");
    assert_eq!(attempts(&body), pairs(&[("s503/m", "ok")]));
    wait_status(&mut auth, "s503", |s| {
        s.credentials[0].breaker == BreakerState::Closed as i32
            && s.endpoints[0].breaker == BreakerState::Closed as i32
    })
    .await;

    // -- a hang before the first byte: TTFT timeout, fail over --
    fake.set("khang", Script::HangBeforeHeaders);
    let (status, body, took) = chat("rhang", "sem-hang").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        attempts(&body),
        pairs(&[("shang/m", "unavailable"), ("backup/m", "ok")])
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
    wait_status(&mut auth, "shang", |s| {
        s.credentials[0].consecutive_failures == 1
    })
    .await;

    // -- a hang after the first token: the turn fails, nothing stored --
    fake.set("kstall", Script::HangAfterFirstToken);
    let (status, body, _) = chat("rstall", "sem-stall").await;
    assert_eq!(status, 503, "{body}");
    wait_status(&mut auth, "sstall", |s| {
        s.credentials[0].consecutive_failures == 1
    })
    .await;
    let history = ContextServiceClient::new(grpc::connect(&context.grpc_url()).await)
        .get_history(GetHistoryRequest {
            session_id: "sem-stall".into(),
            ..Default::default()
        })
        .await;
    let stored = history.map(|h| h.into_inner().turns.len()).unwrap_or(0);
    assert_eq!(stored, 0, "a failed turn wrote to the session");

    for p in [gateway, generation, context, auth_proc] {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&dir);
}
