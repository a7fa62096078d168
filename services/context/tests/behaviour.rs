//! The context service's behaviour, through real gRPC over a socket, run
//! identically against every backend: in-memory, a real Redis (`REDIS_URL`,
//! default `redis://127.0.0.1:6379`), and each of those behind the real
//! PostgreSQL archive (`DATABASE_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

mod common;

use common::Harness;
use moltbot_context::{
    archive::{ArchivedStore, PgArchive},
    session::now_ms,
    store::{MemoryStore, RedisStore, SessionStore, StoreLimits},
};
use moltbot_proto::context::v1::{self as pb, context_service_client::ContextServiceClient};
use tonic::{Code, transport::Channel};

type Client = ContextServiceClient<Channel>;

#[derive(Clone, Copy)]
enum Backend {
    Memory,
    Redis,
    MemoryArchived,
    RedisArchived,
}

const LIMITS: StoreLimits = StoreLimits {
    max_turns: 128,
    default_ttl: Duration::from_secs(1800),
};

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The archive in a schema of its own, so the tests never touch a
/// deployment's tables in the same database.
fn archived(primary: Arc<dyn SessionStore>) -> Arc<dyn SessionStore> {
    let archive = PgArchive::new(
        &common::database_url(),
        "moltbot_context_test",
        Duration::from_millis(2000),
    )
    .unwrap();
    Arc::new(ArchivedStore::new(primary, archive, LIMITS))
}

fn store(backend: Backend) -> Arc<dyn SessionStore> {
    let redis =
        || Arc::new(RedisStore::new(&redis_url(), LIMITS, Duration::from_millis(1000)).unwrap());
    match backend {
        Backend::Memory => Arc::new(MemoryStore::new(LIMITS)),
        Backend::Redis => redis(),
        Backend::MemoryArchived => archived(Arc::new(MemoryStore::new(LIMITS))),
        Backend::RedisArchived => archived(redis()),
    }
}

/// A tenant no other test or run uses.
fn tenant() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        now_ms(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

fn turn(role: pb::Role, content: &str, tokens: u32) -> pb::Turn {
    pb::Turn {
        role: role as i32,
        content: content.to_owned(),
        token_count: tokens,
        created_at: None,
    }
}

async fn append(
    c: &mut Client,
    tenant: &str,
    session: &str,
    turns: Vec<pb::Turn>,
    key: &str,
) -> Result<pb::AppendTurnsResponse, tonic::Status> {
    c.append_turns(pb::AppendTurnsRequest {
        tenant: tenant.into(),
        session_id: session.into(),
        turns,
        idempotency_key: key.into(),
        ttl_seconds: None,
    })
    .await
    .map(|r| r.into_inner())
}

async fn history(
    c: &mut Client,
    tenant: &str,
    session: &str,
    max_turns: u32,
    max_tokens: u32,
) -> Result<pb::GetHistoryResponse, tonic::Status> {
    c.get_history(pb::GetHistoryRequest {
        tenant: tenant.into(),
        session_id: session.into(),
        max_turns,
        max_tokens,
    })
    .await
    .map(|r| r.into_inner())
}

fn contents(h: &pb::GetHistoryResponse) -> Vec<String> {
    h.turns.iter().map(|t| t.content.clone()).collect()
}

async fn append_then_history_in_order(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let t = tenant();
    let r = append(
        &mut c,
        &t,
        "s1",
        vec![
            turn(pb::Role::User, "My name is Ada.", 5),
            turn(pb::Role::Assistant, "Hello Ada!", 4),
        ],
        "",
    )
    .await
    .unwrap();
    assert_eq!(r.session.as_ref().unwrap().turn_count, 2);
    assert!(!r.duplicate);
    append(
        &mut c,
        &t,
        "s1",
        vec![turn(pb::Role::User, "What is my name?", 5)],
        "",
    )
    .await
    .unwrap();
    let got = history(&mut c, &t, "s1", 0, 0).await.unwrap();
    assert_eq!(
        contents(&got),
        ["My name is Ada.", "Hello Ada!", "What is my name?"]
    );
    assert_eq!(got.turns[1].role, pb::Role::Assistant as i32);
    assert_eq!(got.total_tokens, 14);
    assert!(!got.truncated);
    // Budgets: the newest turns that fit.
    let got = history(&mut c, &t, "s1", 2, 0).await.unwrap();
    assert_eq!(contents(&got), ["Hello Ada!", "What is my name?"]);
    assert!(got.truncated);
    let got = history(&mut c, &t, "s1", 0, 9).await.unwrap();
    assert_eq!(contents(&got), ["Hello Ada!", "What is my name?"]);
    // Unknown session.
    assert_eq!(
        history(&mut c, &t, "nope", 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    h.shutdown().await;
}

async fn retried_append_is_stored_once(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let t = tenant();
    let first = append(
        &mut c,
        &t,
        "s",
        vec![turn(pb::Role::User, "hi", 1)],
        "req-1",
    )
    .await
    .unwrap();
    let retry = append(
        &mut c,
        &t,
        "s",
        vec![turn(pb::Role::User, "hi", 1)],
        "req-1",
    )
    .await
    .unwrap();
    assert!(!first.duplicate);
    assert!(retry.duplicate);
    append(
        &mut c,
        &t,
        "s",
        vec![turn(pb::Role::User, "again", 1)],
        "req-2",
    )
    .await
    .unwrap();
    assert_eq!(
        contents(&history(&mut c, &t, "s", 0, 0).await.unwrap()),
        ["hi", "again"]
    );
    h.shutdown().await;
}

async fn hundred_concurrent_appenders(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let t = tenant();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let mut c = h.client.clone();
        let t = t.clone();
        tasks.push(tokio::spawn(async move {
            let key = format!("k{i}");
            let turns = vec![
                turn(pb::Role::User, &format!("u{i}"), 1),
                turn(pb::Role::Assistant, &format!("a{i}"), 1),
            ];
            append(&mut c, &t, "shared", turns.clone(), &key)
                .await
                .unwrap();
            // A client retry of the same append.
            let retry = append(&mut c, &t, "shared", turns, &key).await.unwrap();
            assert!(retry.duplicate);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let mut c = h.client.clone();
    let got = contents(&history(&mut c, &t, "shared", 0, 0).await.unwrap());
    // max_turns is 128: the newest 128 of 200 turns are kept, each exactly once,
    // and every append's two turns stay adjacent (appends are atomic).
    assert_eq!(got.len(), 128);
    assert_eq!(
        got.iter().collect::<HashSet<_>>().len(),
        128,
        "a turn was stored twice"
    );
    let start = usize::from(got[0].starts_with('a'));
    for pair in got[start..].chunks(2).filter(|p| p.len() == 2) {
        assert_eq!(
            pair[0].replacen('u', "", 1),
            pair[1].replacen('a', "", 1),
            "interleaved append: {pair:?}"
        );
    }
    // The order is consistent: a second read agrees.
    assert_eq!(
        contents(&history(&mut c, &t, "shared", 0, 0).await.unwrap()),
        got
    );
    h.shutdown().await;
}

async fn tenants_are_isolated(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let (a, b) = (tenant(), tenant());
    append(
        &mut c,
        &a,
        "secret",
        vec![turn(pb::Role::User, "A's data", 2)],
        "",
    )
    .await
    .unwrap();
    let not_found =
        |r: Result<(), tonic::Status>| assert_eq!(r.unwrap_err().code(), Code::NotFound);
    not_found(history(&mut c, &b, "secret", 0, 0).await.map(|_| ()));
    not_found(
        c.get_session(pb::GetSessionRequest {
            tenant: b.clone(),
            session_id: "secret".into(),
        })
        .await
        .map(|_| ()),
    );
    not_found(
        c.reset_session(pb::ResetSessionRequest {
            tenant: b.clone(),
            session_id: "secret".into(),
        })
        .await
        .map(|_| ()),
    );
    not_found(
        c.delete_session(pb::DeleteSessionRequest {
            tenant: b.clone(),
            session_id: "secret".into(),
        })
        .await
        .map(|_| ()),
    );
    let listed = c
        .list_sessions(pb::ListSessionsRequest {
            tenant: b.clone(),
            page_size: 0,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sessions.is_empty());
    // B appending to the same id makes B's own session; A's is untouched.
    append(
        &mut c,
        &b,
        "secret",
        vec![turn(pb::Role::User, "B's data", 2)],
        "",
    )
    .await
    .unwrap();
    assert_eq!(
        contents(&history(&mut c, &a, "secret", 0, 0).await.unwrap()),
        ["A's data"]
    );
    assert_eq!(
        contents(&history(&mut c, &b, "secret", 0, 0).await.unwrap()),
        ["B's data"]
    );
    h.shutdown().await;
}

async fn ttl_slides_and_expires(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let t = tenant();
    let r = c
        .append_turns(pb::AppendTurnsRequest {
            tenant: t.clone(),
            session_id: "short".into(),
            turns: vec![turn(pb::Role::User, "hi", 1)],
            idempotency_key: String::new(),
            ttl_seconds: Some(2),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.session.unwrap().ttl_seconds, 2);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    history(&mut c, &t, "short", 0, 0)
        .await
        .expect("alive before its TTL; the read slides it");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // 2.6 s after creation, but 1.3 s after the read: still alive.
    let info = c
        .get_session(pb::GetSessionRequest {
            tenant: t.clone(),
            session_id: "short".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.session.unwrap().turn_count, 1);
    tokio::time::sleep(Duration::from_millis(2300)).await;
    assert_eq!(
        history(&mut c, &t, "short", 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    h.shutdown().await;
}

async fn bad_input_is_rejected_and_writes_nothing(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let t = tenant();
    let invalid = |r: Result<pb::AppendTurnsResponse, tonic::Status>, needle: &str| {
        let e = r.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(needle),
            "{:?} lacks {needle:?}",
            e.message()
        );
    };
    invalid(
        append(&mut c, &t, "", vec![turn(pb::Role::User, "x", 1)], "").await,
        "session_id",
    );
    invalid(
        append(
            &mut c,
            &t,
            &"s".repeat(129),
            vec![turn(pb::Role::User, "x", 1)],
            "",
        )
        .await,
        "128",
    );
    invalid(append(&mut c, &t, "s", vec![], "").await, "turns");
    // One good turn and one bad: nothing is written.
    invalid(
        append(
            &mut c,
            &t,
            "s",
            vec![
                turn(pb::Role::User, "ok", 1),
                turn(pb::Role::Unspecified, "x", 1),
            ],
            "",
        )
        .await,
        "role",
    );
    invalid(
        append(
            &mut c,
            &t,
            "s",
            vec![
                turn(pb::Role::User, "ok", 1),
                turn(pb::Role::User, &"x".repeat(64 * 1024 + 1), 1),
            ],
            "",
        )
        .await,
        "65536",
    );
    let mut bad_role = turn(pb::Role::User, "x", 1);
    bad_role.role = 99;
    invalid(append(&mut c, &t, "s", vec![bad_role], "").await, "role");
    let e = c
        .get_session(pb::GetSessionRequest {
            tenant: t.clone(),
            session_id: "s".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        e.code(),
        Code::NotFound,
        "a rejected append left a session behind"
    );
    h.shutdown().await;
}

async fn reset_delete_and_list(backend: Backend) {
    let h = Harness::start(store(backend)).await;
    let mut c = h.client.clone();
    let t = tenant();
    for i in 0..5 {
        append(
            &mut c,
            &t,
            &format!("s{i}"),
            vec![
                turn(pb::Role::User, "x", 1),
                turn(pb::Role::Assistant, "y", 1),
            ],
            "",
        )
        .await
        .unwrap();
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = c
            .list_sessions(pb::ListSessionsRequest {
                tenant: t.clone(),
                page_size: 2,
                page_token: token,
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.sessions.len() <= 2);
        seen.extend(page.sessions.iter().map(|s| s.session_id.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen, ["s0", "s1", "s2", "s3", "s4"]);
    let reset = c
        .reset_session(pb::ResetSessionRequest {
            tenant: t.clone(),
            session_id: "s1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reset.removed_turns, 2);
    assert!(
        history(&mut c, &t, "s1", 0, 0)
            .await
            .unwrap()
            .turns
            .is_empty()
    );
    let deleted = c
        .delete_session(pb::DeleteSessionRequest {
            tenant: t.clone(),
            session_id: "s2".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(deleted.removed_turns, 2);
    assert_eq!(
        history(&mut c, &t, "s2", 0, 0).await.unwrap_err().code(),
        Code::NotFound
    );
    let page = c
        .list_sessions(pb::ListSessionsRequest {
            tenant: t.clone(),
            page_size: 100,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        page.sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        ["s0", "s1", "s3", "s4"]
    );
    let bad = c
        .list_sessions(pb::ListSessionsRequest {
            tenant: t.clone(),
            page_size: 5000,
            page_token: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Code::InvalidArgument);
    h.shutdown().await;
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Backend::Memory).await })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Backend::Redis).await })*
        }
        mod memory_archived {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Backend::MemoryArchived).await })*
        }
        mod redis_archived {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $name() { super::$name(super::Backend::RedisArchived).await })*
        }
    };
}

suite!(
    append_then_history_in_order,
    retried_append_is_stored_once,
    hundred_concurrent_appenders,
    tenants_are_isolated,
    ttl_slides_and_expires,
    bad_input_is_rejected_and_writes_nothing,
    reset_delete_and_list,
);
