//! The gateway's HTTP edge under hostile clients (OWASP API4), over real
//! sockets against the real binary:
//!
//! - 64 connections that send one header line and then another every
//!   second (slowloris) are all closed within the header-read timeout;
//! - a body that stops arriving is answered 408 at the body timeout;
//! - beyond the in-flight limit requests are shed at once with 503 and
//!   `Retry-After`, and served again when the load is gone.
//!
//! The gateway's upstreams point at a closed port: nothing here reaches
//! them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::{Duration, Instant};

use moltbot_e2e::process::ServiceProcess;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEADER_TIMEOUT_MS: u64 = 2_000;
const BODY_TIMEOUT_MS: u64 = 2_000;

fn gateway() -> ServiceProcess {
    let closed = "http://127.0.0.1:9".to_owned();
    ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_CONTEXT_URL", closed.clone()),
            ("MOLTBOT_GENERATION_URL", closed.clone()),
            ("MOLTBOT_UNDERSTANDING_URL", closed.clone()),
            ("MOLTBOT_RETRIEVAL_URL", closed.clone()),
            ("MOLTBOT_AUTH_URL", closed),
            (
                "MOLTBOT_HTTP_HEADER_TIMEOUT_MS",
                HEADER_TIMEOUT_MS.to_string(),
            ),
            ("MOLTBOT_HTTP_BODY_TIMEOUT_MS", BODY_TIMEOUT_MS.to_string()),
            ("MOLTBOT_MAX_IN_FLIGHT", "4".to_owned()),
        ],
    )
}

/// Reads until EOF or reset; returns what arrived (a 408 page, or nothing).
async fn read_to_close(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// A request whose headers are complete and whose body is not: it holds an
/// in-flight slot while the gateway waits for the rest.
async fn partial_body(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"model\":",
    )
    .await
    .unwrap();
    s
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_clients_are_cut_off_and_excess_load_is_shed() {
    let gw = gateway();
    let addr = gw.addrs.http_addr.unwrap();

    // Slowloris: one header line now, then one a second, never finishing.
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..64 {
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /v1/models HTTP/1.1\r\n").await.unwrap();
            loop {
                tokio::select! {
                    _ = read_to_close(&mut s) => break Instant::now(),
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if s.write_all(b"X-Slow: 1\r\n").await.is_err() {
                            break Instant::now();
                        }
                    }
                }
                if started.elapsed() > Duration::from_secs(30) {
                    panic!("a slow-header connection was still open after 30 s");
                }
            }
        }));
    }
    let mut last = started;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let took = last - started;
    assert!(
        took < Duration::from_millis(HEADER_TIMEOUT_MS + 2_000),
        "64 slow-header connections took {took:?} to be closed (header timeout {HEADER_TIMEOUT_MS} ms)"
    );

    // A body that never completes: 408 at the body timeout.
    let mut s = partial_body(addr).await;
    let t0 = Instant::now();
    let answer = String::from_utf8_lossy(&read_to_close(&mut s).await).into_owned();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        t0.elapsed() < Duration::from_millis(BODY_TIMEOUT_MS + 2_000),
        "{:?}",
        t0.elapsed()
    );

    // Four slow bodies fill the in-flight limit; the fifth request is shed.
    let mut holders = Vec::new();
    for _ in 0..4 {
        holders.push(partial_body(addr).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let http = reqwest::Client::new();
    let t0 = Instant::now();
    let shed = http
        .post(format!("{}/v1/chat/completions", gw.http_url()))
        .json(&serde_json::json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(shed.status().as_u16(), 503);
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "shedding was not fast: {:?}",
        t0.elapsed()
    );
    assert_eq!(shed.headers()["retry-after"], "1");
    let body: serde_json::Value = shed.json().await.unwrap();
    assert_eq!(body["error"]["code"], "overloaded", "{body}");
    // Health is not behind the limit.
    let healthz = http
        .get(format!("{}/healthz", gw.http_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status().as_u16(), 200);
    // The holders time out (408) and free their slots: served again (the
    // closed upstreams make it a 5xx of another kind, not a shed).
    for mut h in holders {
        let _ = read_to_close(&mut h).await;
    }
    let again = http
        .post(format!("{}/v1/chat/completions", gw.http_url()))
        .json(&serde_json::json!({"model": "default", "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    let status = again.status().as_u16();
    let body: serde_json::Value = again.json().await.unwrap();
    assert_ne!(body["error"]["code"], "overloaded", "{status} {body}");

    gw.stop();
}
