//! Two auth-rotation replicas on one PostgreSQL schema, each serving gRPC on
//! a real socket: a lease granted by one is reported to the other (once),
//! a breaker opened through one is open through the other, and a
//! credential revoked through one is revoked in the other
//! (src/registry/follow.rs, src/store/shared.rs).
//!
//! Needs PostgreSQL (`DATABASE_URL`, default the machine's `test` database).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use axum::{Router, http::StatusCode, routing::get};
use clap::Parser;
use moltbot_auth_rotation::Args;
use moltbot_proto::auth::v1::{
    AcquireCredentialRequest, AddCredentialRequest, ApiKeyPair, BreakerState, CredentialState,
    ListProvidersRequest, Outcome, ProviderKind, ProviderStatus, ReportOutcomeRequest,
    RevokeCredentialRequest, UpsertProviderRequest, add_credential_request,
    auth_rotation_service_client::AuthRotationServiceClient,
};
use moltbot_runtime::grpc::LocalServer;
use tonic::{Code, Request, transport::Channel};

const ADMIN: &str = "admin-token-for-replicas";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

fn admin<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {ADMIN}").parse().unwrap());
    r
}

/// One replica: its registry served on an ephemeral port.
async fn replica(schema: &str, key: &str) -> (AuthRotationServiceClient<Channel>, LocalServer) {
    let args = Args::parse_from([
        "moltbot-auth-rotation",
        "--store",
        "postgres",
        "--database-url",
        &database_url(),
        "--pg-schema",
        schema,
        "--master-key",
        key,
        "--admin-token",
        ADMIN,
        "--breaker-cooldown-ms",
        "60000",
        "--follow-interval-ms",
        "100",
        "--replicated",
        "true",
    ]);
    let registry = moltbot_auth_rotation::load(&args).await.unwrap();
    let server = LocalServer::start(
        moltbot_auth_rotation::grpc_service(registry, Some(ADMIN.to_owned()), Vec::new()),
        async { Ok(()) },
        Duration::from_secs(1),
    )
    .await
    .unwrap();
    let client = AuthRotationServiceClient::new(server.channel().await.unwrap());
    (client, server)
}

async fn status(c: &mut AuthRotationServiceClient<Channel>, name: &str) -> Option<ProviderStatus> {
    c.list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers
        .into_iter()
        .find(|p| p.name == name)
}

/// Polls `check` on `c` every 20 ms for up to 2 s; returns the time it took.
async fn within_2s<F>(
    c: &mut AuthRotationServiceClient<Channel>,
    what: &str,
    mut check: F,
) -> Duration
where
    F: FnMut(Option<ProviderStatus>) -> bool,
{
    let began = Instant::now();
    loop {
        if check(status(c, "shared").await) {
            return began.elapsed();
        }
        assert!(
            began.elapsed() < Duration::from_secs(2),
            "the other replica did not see {what} within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn lease(c: &mut AuthRotationServiceClient<Channel>) -> Result<String, tonic::Status> {
    Ok(c.acquire_credential(AcquireCredentialRequest {
        provider: "shared".into(),
        model: "gpt-fake".into(),
    })
    .await?
    .into_inner()
    .lease
    .unwrap()
    .lease_id)
}

fn report(lease_id: &str, outcome: Outcome) -> ReportOutcomeRequest {
    ReportOutcomeRequest {
        lease_id: lease_id.to_owned(),
        outcome: outcome as i32,
        http_status: if outcome == Outcome::Ok { 200 } else { 500 },
        retry_after_ms: 0,
        latency_ms: 5,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_breakers_and_revocations_hold_across_replicas() {
    // A provider whose health check passes.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1", listener.local_addr().unwrap());
    let app = Router::new().route("/v1/models", get(|| async { StatusCode::OK }));
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let schema = format!("moltbot_auth_replicas_{}_{n}", std::process::id());
    let key = moltbot_auth_rotation::crypto::MasterKey::generate_base64();
    let (mut a, _sa) = replica(&schema, &key).await;
    let (mut b, _sb) = replica(&schema, &key).await;

    // Configured through A, known to B.
    a.upsert_provider(admin(UpsertProviderRequest {
        name: "shared".into(),
        kind: ProviderKind::Openai as i32,
        base_url: url,
        models: vec!["gpt-fake".into()],
        health_check_interval_seconds: 30,
    }))
    .await
    .unwrap();
    a.add_credential(admin(AddCredentialRequest {
        provider: "shared".into(),
        secret: Some(add_credential_request::Secret::ApiKeys(ApiKeyPair {
            primary: "sk-replica-primary".into(),
            secondary: String::new(),
        })),
    }))
    .await
    .unwrap();
    let took = within_2s(&mut b, "the new provider and its key", |s| {
        s.is_some_and(|s| s.credentials.len() == 1)
    })
    .await;
    eprintln!("replica B knew the provider after {took:?}");

    // A lease granted by A is reported to B, once.
    let id = lease(&mut a).await.unwrap();
    b.report_outcome(report(&id, Outcome::Ok)).await.unwrap();
    let again = a
        .report_outcome(report(&id, Outcome::Ok))
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound, "{again:?}");

    // Three failures reported to A open the endpoint's breaker on B too.
    for _ in 0..3 {
        let id = lease(&mut a).await.unwrap();
        a.report_outcome(report(&id, Outcome::ServerError))
            .await
            .unwrap();
    }
    let took = within_2s(&mut b, "the open breaker", |s| {
        s.is_some_and(|s| s.endpoints[0].breaker == BreakerState::Open as i32)
    })
    .await;
    eprintln!("replica B's breaker opened {took:?} after A's");
    let refused = lease(&mut b).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");

    // Revoked through B: revoked on A.
    let credential_id = status(&mut b, "shared").await.unwrap().credentials[0]
        .credential_id
        .clone();
    b.revoke_credential(admin(RevokeCredentialRequest {
        provider: "shared".into(),
        credential_id,
    }))
    .await
    .unwrap();
    within_2s(&mut a, "the revocation", |s| {
        s.is_some_and(|s| s.credentials[0].state == CredentialState::Revoked as i32)
    })
    .await;

    let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
    sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
        .execute(&pool)
        .await
        .unwrap();
}
