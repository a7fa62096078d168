//! The stores over TLS, as managed Redis and PostgreSQL require: context on
//! a Redis that listens only on its TLS port (`rediss://`), and
//! auth-rotation on a PostgreSQL whose `pg_hba.conf` admits TLS connections
//! only (`sslmode=verify-full`), each trusting a CA made here; and spans
//! exported to an `https://` OTLP collector, as hosted collectors require. A
//! client that does not trust the CA is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::Duration;

use moltbot_e2e::{
    grpc,
    process::ServiceProcess,
    stores::{TlsPostgres, TlsRedis},
    tls::TestCa,
};
use moltbot_proto::{
    auth::v1::{
        ListProvidersRequest, ProviderKind, UpsertProviderRequest,
        auth_rotation_service_client::AuthRotationServiceClient,
    },
    context::v1::{
        AppendTurnsRequest, GetHistoryRequest, Role, Turn,
        context_service_client::ContextServiceClient,
    },
};
use tonic_health::pb::health_check_response::ServingStatus;

fn bundle(ca: &TestCa, name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("moltbot-{name}-{}.pem", std::process::id()));
    ca.write_pem(&path);
    path
}

#[tokio::test(flavor = "multi_thread")]
async fn context_keeps_sessions_in_redis_over_tls() {
    let ca = TestCa::new("MoltBot test Redis CA");
    let redis = TlsRedis::start(&ca.leaf(&["127.0.0.1"]));
    let trusted = bundle(&ca, "redis-ca");
    let context = ServiceProcess::start(
        "moltbot-context",
        &[
            ("REDIS_URL", redis.url()),
            ("SSL_CERT_FILE", trusted.display().to_string()),
        ],
    );
    let channel = grpc::connect(&context.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(20)).await;
    let mut client = ContextServiceClient::new(channel);
    client
        .append_turns(AppendTurnsRequest {
            session_id: "tls-1".into(),
            turns: vec![Turn {
                role: Role::User as i32,
                content: "kept over TLS".into(),
                token_count: 3,
                created_at: None,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
    let history = client
        .get_history(GetHistoryRequest {
            session_id: "tls-1".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(history.turns.len(), 1, "{history:?}");
    assert_eq!(history.turns[0].content, "kept over TLS");
    context.stop();

    // A context that does not trust the CA never reaches the store: health
    // stays NOT_SERVING and calls fail UNAVAILABLE instead of hanging.
    let other = bundle(&TestCa::new("Some other CA"), "other-ca");
    let refused = ServiceProcess::start(
        "moltbot-context",
        &[
            ("REDIS_URL", redis.url()),
            ("SSL_CERT_FILE", other.display().to_string()),
        ],
    );
    let channel = grpc::connect(&refused.grpc_url()).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        grpc::health(&channel, "").await.unwrap(),
        ServingStatus::NotServing
    );
    let e = ContextServiceClient::new(channel)
        .get_history(GetHistoryRequest {
            session_id: "tls-1".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    refused.stop();
    let _ = std::fs::remove_file(trusted);
    let _ = std::fs::remove_file(other);
}

#[tokio::test(flavor = "multi_thread")]
async fn auth_rotation_stores_providers_in_postgres_over_verified_tls() {
    let ca = TestCa::new("MoltBot test PostgreSQL CA");
    let pg = TlsPostgres::start(&ca.leaf(&["127.0.0.1", "localhost"]));
    let root = bundle(&ca, "pg-ca");
    // The server admits TLS only: a plaintext connection is refused.
    if let Ok(out) = std::process::Command::new("psql")
        .arg(pg.url("sslmode=disable"))
        .args(["-c", "select 1"])
        .output()
    {
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no encryption"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let url = pg.url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        root.display()
    ));
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[
            ("DATABASE_URL", url),
            ("MOLTBOT_ADMIN_TOKEN", "admin".to_owned()),
        ],
    );
    let channel = grpc::connect(&auth.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(30)).await;
    let mut client = AuthRotationServiceClient::new(channel);
    let mut upsert = tonic::Request::new(UpsertProviderRequest {
        name: "over-tls".into(),
        kind: ProviderKind::Openai as i32,
        base_url: "https://api.example.com/v1".into(),
        models: vec!["m1".into()],
        health_check_interval_seconds: 3600,
    });
    upsert
        .metadata_mut()
        .insert("authorization", "Bearer admin".parse().unwrap());
    client.upsert_provider(upsert).await.unwrap();
    let listed = client
        .list_providers(ListProvidersRequest {})
        .await
        .unwrap()
        .into_inner()
        .providers;
    assert!(listed.iter().any(|p| p.name == "over-tls"), "{listed:?}");
    auth.stop();
    let _ = std::fs::remove_file(root);
}

#[tokio::test(flavor = "multi_thread")]
async fn spans_reach_an_https_collector_trusted_through_ssl_cert_file() {
    let ca = TestCa::new("MoltBot test collector CA");
    let collector =
        moltbot_e2e::collector::Collector::start_with(Some(&ca.leaf(&["127.0.0.1"]))).await;
    let root = bundle(&ca, "otlp-ca");
    let context = ServiceProcess::start(
        "moltbot-context",
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.https_endpoint()),
            ("OTEL_SERVICE_NAME", "moltbot-context".to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            ("SSL_CERT_FILE", root.display().to_string()),
        ],
    );
    let channel = grpc::connect(&context.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(20)).await;
    let _ = ContextServiceClient::new(channel)
        .get_history(GetHistoryRequest {
            session_id: "otlp-tls".into(),
            ..Default::default()
        })
        .await;
    let spans = collector
        .wait_for(Duration::from_secs(10), |s| {
            s.iter().any(|x| x.service_name == "moltbot-context")
        })
        .await;
    assert!(
        spans.iter().any(|x| x.service_name == "moltbot-context"),
        "no span reached the TLS collector"
    );
    context.stop();
    let _ = std::fs::remove_file(root);
}
