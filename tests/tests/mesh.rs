//! The whole mesh as real processes on ephemeral ports: every service answers
//! health and reflection; the gateway's `/readyz` follows its required
//! upstreams down and back up.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use moltbot_e2e::{grpc, process::ServiceProcess};
use tonic_health::pb::health_check_response::ServingStatus;

const SERVICES: [(&str, &str); 5] = [
    (
        "moltbot-understanding",
        "moltbot.understanding.v1.UnderstandingService",
    ),
    (
        "moltbot-generation",
        "moltbot.generation.v1.GenerationService",
    ),
    ("moltbot-retrieval", "moltbot.retrieval.v1.RetrievalService"),
    ("moltbot-context", "moltbot.context.v1.ContextService"),
    (
        "moltbot-auth-rotation",
        "moltbot.auth.v1.AuthRotationService",
    ),
];

async fn readyz(client: &reqwest::Client, gateway: &str) -> (u16, serde_json::Value) {
    let response = client
        .get(format!("{gateway}/readyz"))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn wait_readyz(client: &reqwest::Client, gateway: &str, want: u16) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (status, body) = readyz(client, gateway).await;
        if status == want {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz stayed {status}, wanted {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_service_serves_health_and_reflection_and_gateway_tracks_readiness() {
    let mut procs = Vec::new();
    for (binary, full_name) in SERVICES {
        let p = ServiceProcess::start(binary, &[]);
        let channel = grpc::connect(&p.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(30)).await;
        assert_eq!(
            grpc::health(&channel, full_name).await.unwrap(),
            ServingStatus::Serving
        );
        // An unknown service name is NOT_FOUND, not a blanket SERVING.
        let unknown = grpc::health(&channel, "moltbot.nope.v1.Nope")
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);
        let mut listed = grpc::reflection_services(&channel).await;
        listed.sort();
        assert_eq!(
            listed,
            vec!["grpc.health.v1.Health".to_owned(), full_name.to_owned()]
        );
        procs.push(p);
    }
    let url_of = |binary: &str| procs.iter().find(|p| p.name == binary).unwrap().grpc_url();
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_UNDERSTANDING_URL", url_of("moltbot-understanding")),
            ("MOLTBOT_GENERATION_URL", url_of("moltbot-generation")),
            ("MOLTBOT_RETRIEVAL_URL", url_of("moltbot-retrieval")),
            ("MOLTBOT_CONTEXT_URL", url_of("moltbot-context")),
            ("MOLTBOT_AUTH_URL", url_of("moltbot-auth-rotation")),
            ("MOLTBOT_READINESS_TIMEOUT_MS", "500".to_owned()),
        ],
    );
    let base = gateway.http_url();
    let client = reqwest::Client::new();
    let healthz = client.get(format!("{base}/healthz")).send().await.unwrap();
    assert_eq!(healthz.status(), 200);
    let body = wait_readyz(&client, &base, 200).await;
    assert_eq!(body["status"], "ready");
    assert_eq!(body["upstreams"].as_array().unwrap().len(), 5, "{body}");

    // Stop the context service: a required upstream goes away.
    let ctx_index = procs
        .iter()
        .position(|p| p.name == "moltbot-context")
        .unwrap();
    let ctx = procs.remove(ctx_index);
    let ctx_addr = ctx.addrs.grpc_addr.unwrap();
    ctx.stop();
    let body = wait_readyz(&client, &base, 503).await;
    assert_eq!(body["status"], "not_ready");
    let context = body["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == "context")
        .unwrap();
    assert_ne!(context["status"], "SERVING", "{body}");
    // /healthz is about the process, not its upstreams.
    assert_eq!(
        client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Bring it back on the same port: the gateway reconnects on its own.
    let ctx = ServiceProcess::start(
        "moltbot-context",
        &[("MOLTBOT_GRPC_ADDR", ctx_addr.to_string())],
    );
    let body = wait_readyz(&client, &base, 200).await;
    assert_eq!(body["status"], "ready");

    // Stopping an optional enrichment leaves the gateway ready.
    let und_index = procs
        .iter()
        .position(|p| p.name == "moltbot-understanding")
        .unwrap();
    procs.remove(und_index).stop();
    let (status, body) = readyz(&client, &base).await;
    assert_eq!(status, 200, "{body}");

    // Metrics: the gateway counts its routes, services their RPCs.
    let metrics = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains(r#"http_server_request_duration_seconds_count{method="GET",route="/readyz",status="503"}"#), "{metrics}");
    let ctx_metrics = client
        .get(format!(
            "http://{}/metrics",
            ctx.addrs.metrics_addr.unwrap()
        ))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        ctx_metrics.contains(r#"grpc_server_handled_total{grpc_code="OK",grpc_method="Check",grpc_service="grpc.health.v1.Health"}"#),
        "{ctx_metrics}"
    );

    gateway.stop();
    ctx.stop();
    for p in procs {
        p.stop();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn rpc_errors_are_counted_by_code() {
    use moltbot_proto::auth::v1::{
        AcquireCredentialRequest, auth_rotation_service_client::AuthRotationServiceClient,
    };
    let svc = ServiceProcess::start("moltbot-auth-rotation", &[]);
    let channel = grpc::connect(&svc.grpc_url()).await;
    let err = AuthRotationServiceClient::new(channel)
        .acquire_credential(AcquireCredentialRequest {
            provider: "nope".into(),
            model: "m".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);
    let metrics = reqwest::get(format!(
        "http://{}/metrics",
        svc.addrs.metrics_addr.unwrap()
    ))
    .await
    .unwrap()
    .text()
    .await
    .unwrap();
    assert!(metrics.contains(
        r#"grpc_server_handled_total{grpc_code="NOT_FOUND",grpc_method="AcquireCredential",grpc_service="moltbot.auth.v1.AuthRotationService"} 1"#
    ), "{metrics}");
    svc.stop();
}

#[test]
fn bad_configuration_fails_fast_with_a_fix() {
    let out = std::process::Command::new(moltbot_e2e::process::binary("moltbot-gateway"))
        .env("MOLTBOT_HTTP_ADDR", "127.0.0.1:0")
        .env("MOLTBOT_CONTEXT_URL", "127.0.0.1:50054")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MOLTBOT_CONTEXT_URL") && stderr.contains("http://"),
        "{stderr}"
    );

    let out = std::process::Command::new(moltbot_e2e::process::binary("moltbot-context"))
        .env("MOLTBOT_GRPC_ADDR", "not-an-address")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("MOLTBOT_GRPC_ADDR") || stderr.contains("--grpc-addr"),
        "{stderr}"
    );
}
