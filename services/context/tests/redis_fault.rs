//! Redis faults: a private `redis-server` on a random port is stopped while
//! the service runs — calls fail fast with UNAVAILABLE instead of hanging —
//! and restarted — calls succeed again without restarting the service.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use common::Harness;
use moltbot_context::store::{RedisStore, SessionStore, StoreLimits};
use moltbot_proto::context::v1 as pb;
use tonic::Code;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_redis(port: u16) -> Child {
    let child = Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(Stdio::null())
        .spawn()
        .expect("redis-server on PATH (make test installs it when missing)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "private redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

fn append_request(content: &str) -> pb::AppendTurnsRequest {
    pb::AppendTurnsRequest {
        tenant: "fault".into(),
        session_id: "s".into(),
        turns: vec![pb::Turn {
            role: pb::Role::User as i32,
            content: content.into(),
            token_count: 1,
            created_at: None,
        }],
        idempotency_key: String::new(),
        ttl_seconds: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_stop_fails_fast_and_restart_recovers() {
    let port = free_port();
    let mut redis = start_redis(port);
    let limits = StoreLimits {
        max_turns: 128,
        default_ttl: Duration::from_secs(600),
    };
    let store: Arc<dyn SessionStore> = Arc::new(
        RedisStore::new(
            &format!("redis://127.0.0.1:{port}"),
            limits,
            Duration::from_millis(500),
        )
        .unwrap(),
    );
    let harness = Harness::start(store).await;
    let mut client = harness.client.clone();
    client
        .append_turns(append_request("before"))
        .await
        .expect("append with Redis up");

    redis.kill().unwrap();
    redis.wait().unwrap();
    for _ in 0..3 {
        let started = Instant::now();
        let err = client
            .append_turns(append_request("during"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unavailable, "{err:?}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?}: not fail-fast",
            started.elapsed()
        );
    }

    let mut redis = start_redis(port);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match client.append_turns(append_request("after")).await {
            Ok(_) => break,
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable, "{e:?}");
                assert!(
                    Instant::now() < deadline,
                    "no recovery after Redis came back: {e:?}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let history = client
        .get_history(pb::GetHistoryRequest {
            tenant: "fault".into(),
            session_id: "s".into(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await
        .unwrap()
        .into_inner();
    // This Redis keeps nothing on disk: only what was written after the restart.
    assert_eq!(
        history
            .turns
            .iter()
            .map(|t| t.content.as_str())
            .collect::<Vec<_>>(),
        ["after"]
    );

    harness.shutdown().await;
    redis.kill().unwrap();
    let _ = redis.wait();
}
