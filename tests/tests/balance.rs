//! Client-side balancing over real gRPC servers on loopback sockets: the
//! list `http://127.0.0.1:A,http://127.0.0.1:B` takes the same path as a
//! headless Service name resolving to two pod IPs
//! (services/runtime/src/grpc/balance/).
//!
//! Each server is a `grpc.health.v1` server that knows only its own name as
//! a service, so a call says which endpoint answered it.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use moltbot_runtime::grpc::client;
use tokio::sync::oneshot;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

/// A health server on an ephemeral port whose service `name` is SERVING;
/// stopped (listener closed, connections drained) when the sender fires.
async fn server(name: &'static str) -> (u16, oneshot::Sender<()>) {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(name, tonic_health::ServingStatus::Serving)
        .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(async move {
        let _keep = reporter;
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await
    });
    (port, stop)
}

/// One Check of `service` within 2 s.
async fn check(channel: &client::TracedChannel, service: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: service.to_owned(),
    });
    request.set_timeout(Duration::from_secs(2));
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_spread_over_both_endpoints_and_a_dead_one_is_ejected() {
    let (a, stop_a) = server("a").await;
    let (b, stop_b) = server("b").await;
    let channel = client::channel(&format!("http://127.0.0.1:{a},http://127.0.0.1:{b}")).unwrap();

    // Asking for "a": SERVING from a, NOT_FOUND from b.
    let mut from_a = 0;
    for _ in 0..200 {
        match check(&channel, "a").await {
            Ok(()) => from_a += 1,
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => panic!("a call failed while both endpoints serve: {s:?}"),
        }
    }
    assert!(
        (40..=160).contains(&from_a),
        "a answered {from_a} of 200 calls; each endpoint should get 20-80 %"
    );

    // b stops: after at most the outlier threshold of failures (3), every
    // call goes to a.
    let _ = stop_b.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut failed = 0;
    let mut late_failures = 0;
    for i in 0..60 {
        if check(&channel, "a").await.is_err() {
            failed += 1;
            if i >= 30 {
                late_failures += 1;
            }
        }
    }
    assert!(
        failed <= 3,
        "{failed} of 60 calls failed after b stopped; ejection should stop that after 3"
    );
    assert_eq!(late_failures, 0, "calls still fail long after the ejection");
    let _ = stop_a.send(());
}

#[tokio::test]
async fn a_name_that_does_not_resolve_fails_at_once_with_unavailable() {
    let channel = client::channel("http://no-such-host.invalid:50052").unwrap();
    let began = Instant::now();
    let mut status = None;
    // The first call may wait for the first resolution; none may hang.
    for _ in 0..3 {
        status = check(&channel, "").await.err();
    }
    let status = status.unwrap();
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains("no-such-host.invalid"),
        "{status:?}"
    );
    assert!(began.elapsed() < Duration::from_secs(15));
}

/// One Check of service "a" carrying session-affinity key `key`.
async fn check_with_key(channel: &client::TracedChannel, key: &str) -> Result<(), tonic::Status> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: "a".to_owned(),
    });
    request.set_timeout(Duration::from_secs(2));
    request.metadata_mut().insert(
        moltbot_runtime::grpc::balance::AFFINITY_HEADER,
        key.parse().unwrap(),
    );
    HealthClient::new(channel.clone())
        .check(request)
        .await
        .map(|_| ())
}

/// Whether endpoint "a" answers a call carrying `key`.
async fn answered_by_a(channel: &client::TracedChannel, key: &str) -> bool {
    match check_with_key(channel, key).await {
        Ok(()) => true,
        Err(s) if s.code() == tonic::Code::NotFound => false,
        Err(s) => panic!("a call failed: {s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_key_sticks_to_one_endpoint_and_moves_when_it_stops() {
    let (a, _stop_a) = server("a").await;
    let (b, stop_b) = server("b").await;
    let channel = client::channel(&format!("http://127.0.0.1:{a},http://127.0.0.1:{b}")).unwrap();
    // Wait until both endpoints are in the ready set.
    for _ in 0..20 {
        let _ = check(&channel, "a").await;
    }
    // Each of 40 keys always reaches the same endpoint, and keys spread.
    let mut on_a = Vec::new();
    for k in 0..40 {
        let key = format!("s-{k:012x}");
        let first = answered_by_a(&channel, &key).await;
        for _ in 0..5 {
            assert_eq!(
                answered_by_a(&channel, &key).await,
                first,
                "key {key} moved"
            );
        }
        on_a.push((key, first));
    }
    let a_keys = on_a.iter().filter(|(_, a)| *a).count();
    assert!((8..=32).contains(&a_keys), "{a_keys} of 40 keys on a");

    // b stops: its keys move to a (affinity is a preference); a's stay.
    let _ = stop_b.send(());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut failures = 0;
    for (key, _) in &on_a {
        let mut request = tonic::Request::new(HealthCheckRequest {
            service: "a".to_owned(),
        });
        request.set_timeout(Duration::from_secs(2));
        request.metadata_mut().insert(
            moltbot_runtime::grpc::balance::AFFINITY_HEADER,
            key.parse().unwrap(),
        );
        if HealthClient::new(channel.clone())
            .check(request)
            .await
            .is_err()
        {
            failures += 1;
        }
    }
    assert!(failures <= 3, "{failures} calls failed after b stopped");
    for (key, _) in &on_a {
        assert!(answered_by_a(&channel, key).await, "key {key} not on a");
    }
}
