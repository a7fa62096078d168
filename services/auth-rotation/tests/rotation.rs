//! The auth-rotation service against a local fake provider (an axum server
//! the test scripts to fail), on SQLite and on a real PostgreSQL: circuit
//! breakers, rotation to the secondary key on 401, 429 cool-downs, health
//! checks streamed by WatchProviderHealth, OAuth2 tokens, admin auth, URL
//! safety, ciphertext at rest — with every log line (debug level) and every
//! error message captured and searched for key material at the end.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    collections::HashMap,
    io::Write,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use clap::Parser;
use moltbot_auth_rotation::Args;
use moltbot_proto::auth::v1::{
    AcquireCredentialRequest, AddCredentialRequest, ApiKeyPair, BreakerState, CredentialSlot,
    CredentialState, ListProvidersRequest, OAuth2ClientCredentials, Outcome, ProviderKind,
    ProviderStatus, ReportOutcomeRequest, RevokeCredentialRequest, RotateCredentialRequest,
    UpsertProviderRequest, WatchProviderHealthRequest, add_credential_request,
    auth_rotation_service_client::AuthRotationServiceClient,
};
use moltbot_runtime::grpc::LocalServer;
use tonic::{Code, Request, transport::Channel};

const ADMIN: &str = "admin-token-for-tests";
const PRIMARY: &str = "sk-primary-AAAA1111";
const SECONDARY: &str = "sk-secondary-BBBB2222";
const ROTATED: &str = "sk-rotated-CCCC3333";
const CLIENT_SECRET: &str = "oauth-client-secret-DDDD4444";
const ACCESS_TOKEN: &str = "oauth-access-token-EEEE5555";

// ---- the fake provider ----------------------------------------------------

#[derive(Default)]
struct Script {
    /// HTTP status per bearer key for chat calls (default 200).
    chat: HashMap<String, (u16, Option<u64>)>,
    /// Status of `GET /v1/models` (default 200).
    models: u16,
    /// Chat calls received.
    calls: u32,
}

#[derive(Clone, Default)]
struct Fake(Arc<Mutex<Script>>);

impl Fake {
    fn set_chat(&self, key: &str, status: u16, retry_after: Option<u64>) {
        self.0
            .lock()
            .unwrap()
            .chat
            .insert(key.to_owned(), (status, retry_after));
    }
    fn calls(&self) -> u32 {
        self.0.lock().unwrap().calls
    }
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

async fn chat(State(fake): State<Fake>, headers: HeaderMap) -> impl IntoResponse {
    let mut s = fake.0.lock().unwrap();
    s.calls += 1;
    let (status, retry) = s
        .chat
        .get(&bearer(&headers))
        .copied()
        .unwrap_or((200, None));
    let mut h = HeaderMap::new();
    if let Some(r) = retry {
        h.insert("retry-after", r.to_string().parse().unwrap());
    }
    (StatusCode::from_u16(status).unwrap(), h, "{}")
}

async fn models(State(fake): State<Fake>) -> impl IntoResponse {
    let status = fake.0.lock().unwrap().models;
    StatusCode::from_u16(if status == 0 { 200 } else { status }).unwrap()
}

async fn token(body: String) -> impl IntoResponse {
    if body.contains("client_secret=oauth-client-secret-DDDD4444")
        && body.contains("grant_type=client_credentials")
    {
        (
            StatusCode::OK,
            format!(
                r#"{{"access_token":"{ACCESS_TOKEN}","token_type":"bearer","expires_in":3600}}"#
            ),
        )
    } else {
        (StatusCode::UNAUTHORIZED, "{}".to_owned())
    }
}

async fn start_fake() -> (Fake, String) {
    let fake = Fake::default();
    let app = Router::new()
        .route("/v1/chat/completions", post(chat))
        .route("/v1/models", get(models))
        .route("/oauth/token", post(token))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (fake, url)
}

// ---- log capture ----------------------------------------------------------

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// ---- the service ----------------------------------------------------------

struct Service {
    client: AuthRotationServiceClient<Channel>,
    server: LocalServer,
    registry: Arc<moltbot_auth_rotation::registry::Registry>,
    checker: tokio::task::JoinHandle<()>,
}

fn args(backend: &str, dir: &std::path::Path, key: &str) -> Args {
    let mut argv = vec![
        "moltbot-auth-rotation".to_owned(),
        "--store".into(),
        backend.into(),
        "--data-dir".into(),
        dir.display().to_string(),
        "--master-key".into(),
        key.into(),
        "--admin-token".into(),
        ADMIN.into(),
        "--breaker-cooldown-ms".into(),
        "400".into(),
        "--health-tick-ms".into(),
        "50".into(),
    ];
    if backend == "postgres" {
        // A schema of this run's own: earlier runs' ciphertext (under other
        // master keys) must not be in the way.
        argv.push("--database-url".into());
        argv.push(database_url());
        argv.push("--pg-schema".into());
        argv.push(format!(
            "moltbot_auth_test_{}",
            dir.file_name().unwrap().to_string_lossy().replace('-', "_")
        ));
    }
    Args::parse_from(argv)
}

async fn start(a: &Args) -> Service {
    let registry = moltbot_auth_rotation::load(a).await.unwrap();
    let checker = tokio::spawn(moltbot_auth_rotation::registry::health::run(
        registry.clone(),
        Duration::from_millis(50),
    ));
    let server = LocalServer::start(
        moltbot_auth_rotation::grpc_service(registry.clone(), Some(ADMIN.to_owned()), Vec::new()),
        async { Ok(()) },
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    Service {
        client: AuthRotationServiceClient::new(server.channel().await.unwrap()),
        server,
        registry,
        checker,
    }
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

/// What a caller of the provider does: lease, call, report. Returns the HTTP
/// status and the report's answer.
async fn call_once(
    c: &mut AuthRotationServiceClient<Channel>,
    http: &reqwest::Client,
    provider: &str,
    model: &str,
) -> Result<(u16, moltbot_proto::auth::v1::ReportOutcomeResponse, String), tonic::Status> {
    let lease = c
        .acquire_credential(AcquireCredentialRequest {
            provider: provider.into(),
            model: model.into(),
        })
        .await?
        .into_inner()
        .lease
        .unwrap();
    let started = Instant::now();
    let response = http
        .post(format!("{}/chat/completions", lease.base_url))
        .header(
            lease.auth_header_name.as_str(),
            lease.auth_header_value.as_str(),
        )
        .body("{}")
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after_ms = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(0, |s| s * 1000);
    let outcome = match status {
        200..=299 => Outcome::Ok,
        429 => Outcome::RateLimited,
        401 | 403 => Outcome::AuthFailed,
        _ => Outcome::ServerError,
    };
    let report = c
        .report_outcome(ReportOutcomeRequest {
            lease_id: lease.lease_id,
            outcome: outcome as i32,
            http_status: u32::from(status),
            retry_after_ms,
            latency_ms: started.elapsed().as_millis() as u64,
        })
        .await?
        .into_inner();
    Ok((status, report, lease.credential_id))
}

async fn provider_status(c: &mut AuthRotationServiceClient<Channel>, name: &str) -> ProviderStatus {
    c.list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers
        .into_iter()
        .find(|p| p.name == name)
        .unwrap()
}

async fn add_provider(s: &mut Service, name: &str, url: &str, interval: u32, keys: (&str, &str)) {
    s.client
        .upsert_provider(admin(UpsertProviderRequest {
            name: name.into(),
            kind: ProviderKind::Openai as i32,
            base_url: format!("{url}/v1"),
            models: vec!["gpt-fake".into()],
            health_check_interval_seconds: interval,
        }))
        .await
        .unwrap();
    s.client
        .add_credential(admin(AddCredentialRequest {
            provider: name.into(),
            secret: Some(add_credential_request::Secret::ApiKeys(ApiKeyPair {
                primary: keys.0.into(),
                secondary: keys.1.into(),
            })),
        }))
        .await
        .unwrap();
}

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn drop_schema(schema: &str) {
    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}

fn unique(prefix: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{}", std::process::id() % 10000, n % 100_000)
}

async fn scenarios(backend: &str, errors: &mut Vec<String>) {
    let dir = std::env::temp_dir().join(unique("moltbot-auth"));
    let key = moltbot_auth_rotation::crypto::MasterKey::generate_base64();
    let a = args(backend, &dir, &key);
    let mut s = start(&a).await;
    let http = reqwest::Client::new();
    let (fake, url) = start_fake().await;

    // -- admin auth and URL safety --
    let e = s
        .client
        .upsert_provider(UpsertProviderRequest {
            name: "x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{backend}");
    let mut wrong = Request::new(RevokeCredentialRequest::default());
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        s.client.revoke_credential(wrong).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    for bad in [
        "http://169.254.169.254/v1",
        "http://api.example.com/v1",
        "https://metadata.google.internal/",
    ] {
        let e = s
            .client
            .upsert_provider(admin(UpsertProviderRequest {
                name: "evil".into(),
                kind: ProviderKind::Openai as i32,
                base_url: bad.into(),
                models: vec!["m".into()],
                health_check_interval_seconds: 0,
            }))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{bad}");
        errors.push(e.message().to_owned());
    }

    // -- breaker: 3 consecutive 500s open it; no traffic while open; a
    // half-open probe after the cool-down closes it on success --
    let p = unique("brk");
    add_provider(&mut s, &p, &url, 30, (PRIMARY, "")).await;
    fake.set_chat(PRIMARY, 500, None);
    for i in 1..=3 {
        let (status, report, _) = call_once(&mut s.client, &http, &p, "gpt-fake")
            .await
            .unwrap();
        assert_eq!(status, 500);
        let want = if i < 3 {
            BreakerState::Closed
        } else {
            BreakerState::Open
        };
        assert_eq!(
            report.endpoint_breaker, want as i32,
            "{backend} after {i} failures"
        );
    }
    let calls = fake.calls();
    let e = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{backend}");
    assert!(e.message().contains("breaker open"), "{}", e.message());
    errors.push(e.message().to_owned());
    assert_eq!(
        fake.calls(),
        calls,
        "traffic reached the endpoint while its breaker was open"
    );
    tokio::time::sleep(Duration::from_millis(450)).await;
    let st = provider_status(&mut s.client, &p).await;
    assert_eq!(st.endpoints[0].breaker, BreakerState::HalfOpen as i32);
    fake.set_chat(PRIMARY, 200, None);
    let (status, report, _) = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(report.endpoint_breaker, BreakerState::Closed as i32);
    assert_eq!(report.credential_breaker, BreakerState::Closed as i32);

    // -- key rotation: the primary starts returning 401; the client's
    // request succeeds on the secondary; the primary shows invalid --
    let p = unique("rot");
    add_provider(&mut s, &p, &url, 30, (PRIMARY, SECONDARY)).await;
    fake.set_chat(PRIMARY, 401, None);
    fake.set_chat(SECONDARY, 200, None);
    let mut answered = None;
    for _ in 0..2 {
        let (status, _, cred) = call_once(&mut s.client, &http, &p, "gpt-fake")
            .await
            .unwrap();
        if status == 200 {
            answered = Some(cred);
            break;
        }
    }
    assert_eq!(
        answered.as_deref(),
        Some(format!("{p}-secondary").as_str()),
        "{backend}"
    );
    let st = provider_status(&mut s.client, &p).await;
    assert_eq!(st.credentials[0].slot, CredentialSlot::Primary as i32);
    assert_eq!(
        st.credentials[0].state,
        CredentialState::Invalid as i32,
        "{backend}"
    );
    assert_eq!(st.credentials[1].state, CredentialState::Active as i32);
    // Rotation brings the primary back.
    s.client
        .rotate_credential(admin(RotateCredentialRequest {
            provider: p.clone(),
            slot: CredentialSlot::Primary as i32,
            new_secret: ROTATED.into(),
        }))
        .await
        .unwrap();
    let (status, _, cred) = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap();
    assert_eq!((status, cred), (200, format!("{p}-primary")));

    // -- 429: Retry-After 2 keeps that credential out ~2 s; breaker closed --
    let p = unique("rl");
    add_provider(&mut s, &p, &url, 30, (PRIMARY, "")).await;
    fake.set_chat(PRIMARY, 429, Some(2));
    let limited_at = Instant::now();
    let (status, report, _) = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap();
    assert_eq!(status, 429);
    assert_eq!(report.credential_state, CredentialState::Cooling as i32);
    assert_eq!(report.credential_breaker, BreakerState::Closed as i32);
    assert_eq!(report.endpoint_breaker, BreakerState::Closed as i32);
    fake.set_chat(PRIMARY, 200, None);
    let e = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert!(e.message().contains("retry after"), "{}", e.message());
    let st = provider_status(&mut s.client, &p).await;
    assert!(st.credentials[0].cooling_until.is_some());
    assert_eq!(st.credentials[0].breaker, BreakerState::Closed as i32);
    while limited_at.elapsed() < Duration::from_millis(1900) {
        assert!(
            call_once(&mut s.client, &http, &p, "gpt-fake")
                .await
                .is_err(),
            "leased before 2 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(2100).saturating_sub(limited_at.elapsed())).await;
    let (status, _, _) = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap();
    assert_eq!(status, 200, "{backend}: still cooling after 2 s");

    // -- health: a failing probe is reported within one interval and
    // streamed --
    let p = unique("hc");
    let (hfake, hurl) = start_fake().await;
    add_provider(&mut s, &p, &hurl, 1, (PRIMARY, "")).await;
    let mut watch = s
        .client
        .watch_provider_health(WatchProviderHealthRequest {
            providers: vec![p.clone()],
        })
        .await
        .unwrap()
        .into_inner();
    let first = watch.message().await.unwrap().unwrap();
    assert_eq!(first.provider.unwrap().name, p);
    tokio::time::sleep(Duration::from_millis(300)).await;
    hfake.0.lock().unwrap().models = 503;
    let flipped = Instant::now();
    let unhealthy = tokio::time::timeout(Duration::from_millis(1500), async {
        loop {
            let e = watch.message().await.unwrap().unwrap();
            if !e.provider.as_ref().unwrap().healthy {
                return e;
            }
        }
    })
    .await
    .expect("no unhealthy event within one interval");
    assert!(
        flipped.elapsed() <= Duration::from_millis(1300),
        "{:?}",
        flipped.elapsed()
    );
    assert!(unhealthy.reason.contains("503"), "{}", unhealthy.reason);
    assert!(!provider_status(&mut s.client, &p).await.healthy);
    let e = call_once(&mut s.client, &http, &p, "gpt-fake")
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);

    // -- OAuth2 client credentials: a token is fetched and leased --
    let p = unique("oa");
    s.client
        .upsert_provider(admin(UpsertProviderRequest {
            name: p.clone(),
            kind: ProviderKind::Openai as i32,
            base_url: format!("{url}/v1"),
            models: vec!["gpt-fake".into()],
            health_check_interval_seconds: 30,
        }))
        .await
        .unwrap();
    s.client
        .add_credential(admin(AddCredentialRequest {
            provider: p.clone(),
            secret: Some(add_credential_request::Secret::Oauth2(
                OAuth2ClientCredentials {
                    token_url: format!("{url}/oauth/token"),
                    client_id: "client-1".into(),
                    client_secret: CLIENT_SECRET.into(),
                    scopes: vec!["chat".into()],
                },
            )),
        }))
        .await
        .unwrap();
    let lease = s
        .client
        .acquire_credential(AcquireCredentialRequest {
            provider: p.clone(),
            model: "gpt-fake".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .lease
        .unwrap();
    assert_eq!(lease.auth_header_value, format!("Bearer {ACCESS_TOKEN}"));
    assert!(
        provider_status(&mut s.client, &p).await.credentials[0]
            .token_expires_at
            .is_some()
    );

    // -- unknown names, unknown leases --
    let e = s
        .client
        .acquire_credential(AcquireCredentialRequest {
            provider: "nope".into(),
            model: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    let e = s
        .client
        .report_outcome(ReportOutcomeRequest {
            lease_id: "nope".into(),
            outcome: Outcome::Ok as i32,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound);
    errors.push(e.message().to_owned());

    // -- at rest: ciphertext only; states survive a restart; a wrong master
    // key is refused --
    let rot = s.registry.store.credentials().await.unwrap();
    for c in &rot {
        for secret in [PRIMARY, SECONDARY, ROTATED, CLIENT_SECRET] {
            assert!(
                !c.secret
                    .windows(secret.len())
                    .any(|w| w == secret.as_bytes()),
                "{backend}: plaintext in the store"
            );
        }
    }
    s.checker.abort();
    drop(s.client);
    s.server
        .shutdown()
        .await
        .expect("server failed or panicked");
    let mut again = start(&a).await;
    let listed = again
        .client
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner();
    let rotated = listed
        .providers
        .iter()
        .find(|p| p.name.starts_with("rot-"))
        .unwrap();
    assert_eq!(rotated.credentials[0].state, CredentialState::Active as i32);
    let wrong_key = args(
        backend,
        &dir,
        &moltbot_auth_rotation::crypto::MasterKey::generate_base64(),
    );
    if backend == "sqlite" {
        let err = moltbot_auth_rotation::load(&wrong_key).await.err().unwrap();
        assert!(err.to_string().contains("MOLTBOT_MASTER_KEY"), "{err}");
    }
    again.checker.abort();
    again
        .server
        .shutdown()
        .await
        .expect("server failed or panicked");
    if backend == "postgres" {
        drop_schema(&a.pg_schema).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread")]
async fn rotation_breakers_health_and_secret_hygiene() {
    let captured = Captured::default();
    let sink = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_writer(move || sink.clone())
        .json()
        .init();

    // Without a master key the service refuses to start and says how.
    let mut no_key = args("sqlite", &std::env::temp_dir(), "x");
    no_key.master_key = None;
    let err = moltbot_auth_rotation::load(&no_key).await.err().unwrap();
    assert!(err.to_string().contains("openssl rand -base64 32"), "{err}");

    let mut errors = Vec::new();
    for backend in ["sqlite", "postgres"] {
        scenarios(backend, &mut errors).await;
    }

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.lines().count() > 20,
        "too few log lines captured: {}",
        logs.lines().count()
    );
    assert!(
        logs.contains("outcome reported"),
        "debug logs were not captured"
    );
    for secret in [
        PRIMARY,
        SECONDARY,
        ROTATED,
        CLIENT_SECRET,
        ACCESS_TOKEN,
        ADMIN,
    ] {
        assert!(
            !logs.contains(secret),
            "secret {secret} appears in a log line"
        );
        for e in &errors {
            assert!(
                !e.contains(secret),
                "secret {secret} appears in an error: {e}"
            );
        }
    }
}
