//! Graceful shutdown: SIGTERM during an in-flight call lets the call finish,
//! health turns NOT_SERVING while draining, and the process exits 0 within
//! the grace period. With a drain delay, a service (and the gateway's
//! `/readyz`) reports the drain first and keeps serving new connections for
//! the delay, so endpoints update before the listener closes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use moltbot_e2e::{grpc, process::ServiceProcess, slow::slow_service_client::SlowServiceClient};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Waits (off the runtime) up to 10 s for `server` to exit; `None` if it
/// is still running. Fails the test if it printed a panic.
async fn exit_within_10s(mut server: ServiceProcess) -> Option<std::process::ExitStatus> {
    tokio::task::spawn_blocking(move || {
        let status = server.wait_exit(Duration::from_secs(10));
        server.assert_no_panic();
        status
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_in_flight_call_finish_and_exits_zero() {
    let server = ServiceProcess::start(
        "moltbot-test-slow",
        &[("MOLTBOT_SHUTDOWN_GRACE_MS", "10000".to_owned())],
    );
    let channel = grpc::connect(&server.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(10)).await;

    // A health watcher sees the drain.
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.message().await.unwrap().unwrap().status(),
        ServingStatus::Serving
    );

    let call = tokio::spawn({
        let channel = channel.clone();
        async move {
            let started = Instant::now();
            let reply = SlowServiceClient::new(channel)
                .sleep(prost_types::Duration {
                    seconds: 2,
                    nanos: 0,
                })
                .await;
            (reply, started.elapsed())
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    server.signal_term();

    let update = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .expect("watcher told within 5 s")
        .expect("watch stream healthy")
        .expect("an update, not the end of the stream");
    assert_eq!(update.status(), ServingStatus::NotServing);
    // Then the watch stream ends, so it does not hold the drain open.
    let end = tokio::time::timeout(Duration::from_secs(5), watch.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None)), "watch stream ended: {end:?}");

    let (reply, took) = call.await.unwrap();
    let reply = reply.expect("the in-flight call completes despite SIGTERM");
    assert_eq!(reply.into_inner().seconds, 2);
    assert!(
        took >= Duration::from_secs(2),
        "the call really ran its 2 s: {took:?}"
    );

    // Exits on its own once the call is done, well within the 10 s grace.
    let status = exit_within_10s(server)
        .await
        .expect("exited within the grace period");
    assert!(status.success(), "exit status {status:?}");
    assert!(signalled.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread")]
async fn grace_period_bounds_shutdown_of_a_stuck_call() {
    let server = ServiceProcess::start(
        "moltbot-test-slow",
        &[("MOLTBOT_SHUTDOWN_GRACE_MS", "500".to_owned())],
    );
    let channel = grpc::connect(&server.grpc_url()).await;
    grpc::wait_serving(&channel, "", Duration::from_secs(10)).await;
    let call = tokio::spawn(async move {
        SlowServiceClient::new(channel)
            .sleep(prost_types::Duration {
                seconds: 60,
                nanos: 0,
            })
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let signalled = Instant::now();
    server.signal_term();
    let status = exit_within_10s(server).await.expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "took {:?}",
        signalled.elapsed()
    );
    assert!(call.await.unwrap().is_err(), "the stuck call was cut off");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_delay_keeps_serving_new_connections_while_not_serving() {
    let server = ServiceProcess::start(
        "moltbot-test-slow",
        &[("MOLTBOT_DRAIN_DELAY_MS", "2000".to_owned())],
    );
    let url = server.grpc_url();
    grpc::wait_serving(&grpc::connect(&url).await, "", Duration::from_secs(10)).await;
    let signalled = Instant::now();
    server.signal_term();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // A brand-new connection inside the delay: health says NOT_SERVING (so
    // balancers stop sending), yet a call that still arrives is served.
    let late = grpc::connect(&url).await;
    assert_eq!(
        grpc::health(&late, "").await.unwrap(),
        ServingStatus::NotServing
    );
    let reply = SlowServiceClient::new(late)
        .sleep(prost_types::Duration {
            seconds: 0,
            nanos: 100_000_000,
        })
        .await;
    assert!(reply.is_ok(), "a call during the drain delay: {reply:?}");
    let status = exit_within_10s(server)
        .await
        .expect("exited after the delay");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() >= Duration::from_secs(2),
        "closed before the drain delay: {:?}",
        signalled.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_gateway_fails_readyz_before_it_stops_accepting() {
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_DRAIN_DELAY_MS", "2000".to_owned()),
            ("MOLTBOT_CONTEXT_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_GENERATION_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".to_owned()),
        ],
    );
    let base = gateway.http_url();
    let http = reqwest::Client::new();
    let signalled = Instant::now();
    gateway.signal_term();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status().as_u16(), 503);
    let body: serde_json::Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "draining", "{body}");
    // Still accepting: a fresh client's request is answered.
    let alive = reqwest::Client::new()
        .get(format!("{base}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(alive.status().as_u16(), 200);
    let status = exit_within_10s(gateway)
        .await
        .expect("exited after the delay");
    assert!(status.success(), "{status:?}");
    assert!(signalled.elapsed() >= Duration::from_secs(2));
}
