//! Redis faults: a private `redis-server` on a random port is stopped while
//! the service runs — calls fail fast with UNAVAILABLE instead of hanging —
//! and restarted — calls succeed again without restarting the service. With
//! the PostgreSQL archive enabled, a `FLUSHALL` in the middle of concurrent
//! appends loses no acknowledged turn.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

mod common;

use common::Harness;
use moltbot_context::{
    archive::{ArchivedStore, PgArchive},
    store::{RedisStore, SessionStore, StoreLimits},
};
use moltbot_proto::context::v1 as pb;
use tonic::Code;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The two tests here stop and restart Redis on a port they picked: run
/// them one at a time, so one cannot pick the port the other just freed.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Starts a private `redis-server` on `port` and proves that the server
/// answering there is this child (`INFO server` names its pid): a port taken
/// by another process in the meantime is a panic here, not a test talking to
/// someone else's Redis.
fn start_redis(port: u16) -> Child {
    let mut child = Command::new("redis-server")
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
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("private redis-server on port {port} exited: {status}");
        }
        if let Ok(mut conn) = client.get_connection() {
            let info: String = redis::cmd("INFO").arg("server").query(&mut conn).unwrap();
            let pid = info
                .lines()
                .find_map(|l| l.strip_prefix("process_id:"))
                .map(|p| p.trim().to_string());
            assert_eq!(
                pid,
                Some(child.id().to_string()),
                "port {port} is served by another redis-server"
            );
            return child;
        }
        assert!(
            Instant::now() < deadline,
            "private redis-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let _serial = SERIAL.lock().await;
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

fn flushall(port: u16) {
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let mut conn = client.get_connection().unwrap();
    redis::cmd("FLUSHALL").query::<()>(&mut conn).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn archive_keeps_every_acknowledged_turn_across_flushall() {
    const WRITERS: usize = 6;
    const APPENDS: usize = 10; // 6 × 10 × 2 turns = 120, under max_turns
    let _serial = SERIAL.lock().await;
    let port = free_port();
    let mut redis = start_redis(port);
    let limits = StoreLimits {
        max_turns: 128,
        default_ttl: Duration::from_secs(600),
    };
    let primary = Arc::new(
        RedisStore::new(
            &format!("redis://127.0.0.1:{port}"),
            limits,
            Duration::from_millis(1000),
        )
        .unwrap(),
    );
    let archive = PgArchive::new(
        &common::database_url(),
        "moltbot_context_test",
        Duration::from_millis(2000),
    )
    .unwrap();
    let store: Arc<dyn SessionStore> = Arc::new(ArchivedStore::new(primary, archive, limits));
    let harness = Harness::start(store).await;
    let tenant = format!("flush-{}-{}", std::process::id(), port);

    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = harness.client.clone();
        let tenant = tenant.clone();
        writers.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            for i in 0..APPENDS {
                let content = format!("w{w}-{i}");
                let mut request = append_request(&content);
                request.tenant = tenant.clone();
                request.turns.push(pb::Turn {
                    role: pb::Role::Assistant as i32,
                    content: format!("{content}-reply"),
                    token_count: 1,
                    created_at: None,
                });
                request.idempotency_key = content.clone();
                // A retry with the same key after an error is what a client does.
                for _ in 0..5 {
                    if client.append_turns(request.clone()).await.is_ok() {
                        acked.push(content.clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            acked
        }));
    }
    // Lose everything in Redis every few milliseconds while the writers run.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flusher = {
        let done = done.clone();
        tokio::task::spawn_blocking(move || {
            let mut flushes = 0;
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                flushall(port);
                flushes += 1;
                std::thread::sleep(Duration::from_millis(3));
            }
            flushes
        })
    };
    let mut acked = Vec::new();
    for w in writers {
        acked.extend(w.await.unwrap());
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let flushes = flusher.await.unwrap();
    assert!(
        flushes >= 3,
        "only {flushes} flushes happened during the appends"
    );
    assert_eq!(acked.len(), WRITERS * APPENDS, "appends failed: {acked:?}");
    // And once more after the last acknowledgement.
    flushall(port);

    let mut client = harness.client.clone();
    let history = client
        .get_history(pb::GetHistoryRequest {
            tenant: tenant.clone(),
            session_id: "s".into(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(history.restored_from_archive, "the read did not restore");
    let contents: Vec<&str> = history.turns.iter().map(|t| t.content.as_str()).collect();
    assert_eq!(contents.len(), 2 * WRITERS * APPENDS, "{contents:?}");
    for content in &acked {
        let at: Vec<usize> = contents
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == content.as_str())
            .map(|(i, _)| i)
            .collect();
        assert_eq!(at.len(), 1, "{content} stored {} times", at.len());
        assert_eq!(
            contents[at[0] + 1],
            format!("{content}-reply"),
            "pair split"
        );
    }
    // Each writer's appends are in its own order.
    for w in 0..WRITERS {
        let mine: Vec<&str> = contents
            .iter()
            .copied()
            .filter(|c| c.starts_with(&format!("w{w}-")) && !c.ends_with("-reply"))
            .collect();
        let expected: Vec<String> = (0..APPENDS).map(|i| format!("w{w}-{i}")).collect();
        assert_eq!(mine, expected);
    }
    // The restore put the session back in Redis: the next read is served there.
    let again = client
        .get_history(pb::GetHistoryRequest {
            tenant,
            session_id: "s".into(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await
        .unwrap()
        .into_inner();
    assert!(!again.restored_from_archive);
    assert_eq!(again.turns.len(), 2 * WRITERS * APPENDS);

    harness.shutdown().await;
    redis.kill().unwrap();
    let _ = redis.wait();
}
