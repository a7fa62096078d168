//! Two replicas of every service and two gateways, as real processes on one
//! machine, sharing Redis and PostgreSQL: every client balances over both
//! replicas of each upstream through a static endpoint list
//! (`http://127.0.0.1:A,http://127.0.0.1:B`), which takes the same path as a
//! headless Service name resolving to two pod IPs
//! (services/runtime/src/grpc/balance/). Shows, against the real model:
//!
//! - each generation replica serves 35-65 % of 100 turns;
//! - one key's requests-per-minute limit holds across both gateways (±1);
//! - a document upserted through retrieval replica A is found through B
//!   within 2 s;
//! - SIGKILL of one replica of every service mid-traffic fails no turn and
//!   loses no acknowledged one: every answered turn is stored exactly once.
//!
//! Needs Redis (`REDIS_URL`, default redis://127.0.0.1:6379), PostgreSQL
//! (`DATABASE_URL`, default the machine's `test` database), the prepared
//! models and the intent head, like the other end-to-end tests.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use moltbot_e2e::{
    grpc, metrics,
    process::ServiceProcess,
    stores::{redis_url, unique},
};
use moltbot_proto::{
    context::v1::{GetHistoryRequest, Role, context_service_client::ContextServiceClient},
    retrieval::v1::{
        CreateCollectionRequest, Document, SearchRequest, UpsertRequest,
        retrieval_service_client::RetrievalServiceClient, search_request,
    },
};
use serde_json::{Value, json};

/// The bulk key (`test`) and the rate-limited one (`limited`).
const KEY: &str = "test";
const KEY_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";
const LIMITED: &str = "limited";
const LIMITED_SHA256: &str = "7b508dace774f8adc1b121c1812b740904be6dfd37e3b5e3579bc81fbf6f5553";
const RPM: usize = 10;
const ADMIN: &str = "replicas-admin-token";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Pair {
    replicas: Vec<ServiceProcess>,
}

impl Pair {
    fn start(binary: &str, env: &[(&str, String)]) -> Self {
        Self {
            replicas: (0..2).map(|_| ServiceProcess::start(binary, env)).collect(),
        }
    }

    /// `http://A,http://B`: what a client balances over.
    fn urls(&self) -> String {
        self.replicas
            .iter()
            .map(ServiceProcess::grpc_url)
            .collect::<Vec<_>>()
            .join(",")
    }

    async fn wait_serving(&self) {
        for p in &self.replicas {
            let channel = grpc::connect(&p.grpc_url()).await;
            grpc::wait_serving(&channel, "", Duration::from_secs(180)).await;
        }
    }
}

struct Mesh {
    context: Pair,
    generation: Pair,
    understanding: Pair,
    retrieval: Pair,
    auth: Pair,
    gateways: Vec<ServiceProcess>,
    collection: String,
    limited_name: String,
    http: reqwest::Client,
}

async fn start() -> Mesh {
    let replicated = ("MOLTBOT_REPLICATED", "true".to_owned());
    let context = Pair::start(
        "moltbot-context",
        &[("REDIS_URL", redis_url()), replicated.clone()],
    );
    let generation = Pair::start("moltbot-generation", &[("MOLTBOT_THREADS", "1".to_owned())]);
    let understanding = Pair::start("moltbot-understanding", &[]);
    let retrieval = Pair::start(
        "moltbot-retrieval",
        &[
            ("DATABASE_URL", database_url()),
            (
                "MOLTBOT_RETRIEVAL_PG_SCHEMA",
                "moltbot_retrieval_replicas".to_owned(),
            ),
            ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
            replicated.clone(),
        ],
    );
    let auth = Pair::start(
        "moltbot-auth-rotation",
        &[
            ("DATABASE_URL", database_url()),
            ("MOLTBOT_AUTH_PG_SCHEMA", "moltbot_auth_replicas".to_owned()),
            replicated.clone(),
        ],
    );
    let collection = unique("replicas").replace('-', "_");
    let limited_name = unique(LIMITED);
    let dir = std::env::temp_dir().join(unique("moltbot-replicas"));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
routes:
  - name: default
    match: {{ models: [default] }}
    system_prompt: Answer in one word.
    retrieval: {{ collection: {collection}, top_k: 1 }}
    candidates: [{{ model: qwen2.5-coder-0.5b-instruct }}]
    retry: {{ max_attempts: 3, initial_backoff_ms: 50 }}
api_keys:
  - {{ name: {KEY}, sha256: "{KEY_SHA256}", max_concurrent_requests: 64 }}
  - {{ name: {limited_name}, sha256: "{LIMITED_SHA256}", requests_per_minute: {RPM} }}
allow_anonymous: false
"#
        ),
    )
    .unwrap();
    let gateway_env = vec![
        ("MOLTBOT_CONTEXT_URL", context.urls()),
        ("MOLTBOT_GENERATION_URL", generation.urls()),
        ("MOLTBOT_UNDERSTANDING_URL", understanding.urls()),
        ("MOLTBOT_RETRIEVAL_URL", retrieval.urls()),
        ("MOLTBOT_AUTH_URL", auth.urls()),
        ("MOLTBOT_GATEWAY_CONFIG", config.display().to_string()),
        ("REDIS_URL", redis_url()),
        // One spend ledger for both gateways, as the chart deploys them.
        ("DATABASE_URL", database_url()),
        (
            "MOLTBOT_SPEND_PG_SCHEMA",
            "moltbot_spend_replicas".to_owned(),
        ),
        replicated.clone(),
        ("MOLTBOT_ENRICHMENT_TIMEOUT_MS", "5000".to_owned()),
    ];
    let gateways = (0..2)
        .map(|_| ServiceProcess::start("moltbot-gateway", &gateway_env))
        .collect();
    for pair in [&context, &generation, &understanding, &retrieval, &auth] {
        pair.wait_serving().await;
    }
    Mesh {
        context,
        generation,
        understanding,
        retrieval,
        auth,
        gateways,
        collection,
        limited_name,
        http: reqwest::Client::builder()
            .timeout(Duration::from_secs(300))
            .build()
            .unwrap(),
    }
}

fn admin<T>(message: T) -> tonic::Request<T> {
    grpc::with_bearer(message, ADMIN)
}

/// One non-streamed turn through gateway `g`: (status, body).
async fn turn(mesh: &Mesh, g: usize, session: &str, text: &str) -> (u16, Value) {
    let response = mesh
        .http
        .post(format!(
            "{}/v1/chat/completions",
            mesh.gateways[g].http_url()
        ))
        .bearer_auth(KEY)
        .header("x-session-id", session)
        .json(&json!({
            "model": "default",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": 2,
            "temperature": 0
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// Runs `n` turns, `concurrency` at a time, alternating gateways; calls
/// `after(done)` once when `done` turns have completed. Returns (session,
/// status, body) per turn.
async fn traffic(
    mesh: &Arc<Mesh>,
    n: usize,
    concurrency: usize,
    prefix: &str,
) -> Vec<(String, u16, Value)> {
    let results = Arc::new(Mutex::new(Vec::new()));
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (mesh, results, next, prefix) = (
            mesh.clone(),
            results.clone(),
            next.clone(),
            prefix.to_owned(),
        );
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let session = format!("{prefix}-{i}");
                let (status, body) = turn(
                    &mesh,
                    i % 2,
                    &session,
                    &format!("Question {i}: what is 2+{i}?"),
                )
                .await;
                results.lock().unwrap().push((session, status, body));
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    Arc::try_unwrap(results).unwrap().into_inner().unwrap()
}

/// `grpc_server_handled_total` of Generate on one replica, every code
/// summed (a stream the gateway closes after the summary may end CANCELLED).
async fn generations_served(p: &ServiceProcess) -> f64 {
    let url = format!("http://{}/metrics", p.addrs.metrics_addr.unwrap());
    metrics::sum(
        &url,
        "grpc_server_handled_total",
        &[r#"grpc_method="Generate""#],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_of_everything_balance_share_limits_converge_and_survive_a_kill() {
    let mesh = start().await;

    // 1. Retrieval: written through A, found through B within 2 s.
    let mut a =
        RetrievalServiceClient::new(grpc::connect(&mesh.retrieval.replicas[0].grpc_url()).await);
    let mut b =
        RetrievalServiceClient::new(grpc::connect(&mesh.retrieval.replicas[1].grpc_url()).await);
    a.create_collection(admin(CreateCollectionRequest {
        name: mesh.collection.clone(),
        chunking: None,
    }))
    .await
    .unwrap();
    a.upsert(admin(UpsertRequest {
        collection: mesh.collection.clone(),
        documents: vec![Document {
            id: "capital".into(),
            text: "The capital of the kingdom of Zarnia is Quellport, a harbour city.".into(),
            metadata: Default::default(),
        }],
    }))
    .await
    .unwrap();
    let written = Instant::now();
    let converged = loop {
        let found = b
            .search(SearchRequest {
                collection: mesh.collection.clone(),
                query: Some(search_request::Query::Text("capital of Zarnia".into())),
                top_k: 1,
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner().hits)
            .unwrap_or_default();
        if found.iter().any(|h| h.document_id == "capital") {
            break written.elapsed();
        }
        assert!(
            written.elapsed() < Duration::from_secs(2),
            "a document upserted through retrieval A was not found through B within 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("replicas: retrieval B found A's write after {converged:?}");

    // 2. One key's requests per minute across both gateways.
    let mut allowed = 0;
    for i in 0..2 * RPM {
        let response = mesh
            .http
            .get(format!("{}/v1/models", mesh.gateways[i % 2].http_url()))
            .bearer_auth(LIMITED)
            .send()
            .await
            .unwrap();
        match response.status().as_u16() {
            200 => allowed += 1,
            429 => {}
            other => panic!("GET /v1/models answered {other}"),
        }
    }
    eprintln!(
        "replicas: key {} allowed {allowed} of {} requests over two gateways (limit {RPM}/min)",
        mesh.limited_name,
        2 * RPM
    );
    assert!(
        (RPM - 1..=RPM + 1).contains(&allowed),
        "{allowed} requests passed a {RPM}/min limit over two gateways"
    );

    // 3. 100 turns: each generation replica serves 35-65 %.
    let mesh = Arc::new(mesh);
    let before = [
        generations_served(&mesh.generation.replicas[0]).await,
        generations_served(&mesh.generation.replicas[1]).await,
    ];
    let began = Instant::now();
    let results = traffic(&mesh, 100, 4, &unique("spread")).await;
    let took = began.elapsed();
    let failed: Vec<_> = results.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "turns failed: {failed:?}");
    let served = [
        generations_served(&mesh.generation.replicas[0]).await - before[0],
        generations_served(&mesh.generation.replicas[1]).await - before[1],
    ];
    let total = served[0] + served[1];
    eprintln!("replicas: 100 turns in {took:?}; generation replicas served {served:?}");
    assert!(total >= 100.0, "{served:?}");
    for s in served {
        let share = s / total;
        assert!(
            (0.35..=0.65).contains(&share),
            "a generation replica served {:.0} % of the turns: {served:?}",
            share * 100.0
        );
    }

    // 4. SIGKILL one replica of every service mid-traffic: no turn fails,
    //    every answered turn is stored once.
    let prefix = unique("kill");
    let killer = {
        let mesh = mesh.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(4)).await;
            for pair in [
                &mesh.context,
                &mesh.generation,
                &mesh.understanding,
                &mesh.retrieval,
                &mesh.auth,
            ] {
                pair.replicas[0].kill();
            }
            eprintln!("replicas: killed replica A of every service");
        })
    };
    let results = traffic(&mesh, 40, 4, &prefix).await;
    killer.await.unwrap();
    let failed: Vec<_> = results.iter().filter(|(_, s, _)| *s != 200).collect();
    assert!(failed.is_empty(), "turns failed after the kill: {failed:?}");
    let mut context =
        ContextServiceClient::new(grpc::connect(&mesh.context.replicas[1].grpc_url()).await);
    let mut degraded: BTreeMap<String, usize> = BTreeMap::new();
    for (session, _, body) in &results {
        for d in body["moltbot"]["degraded"].as_array().into_iter().flatten() {
            *degraded
                .entry(d.as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
        let history = context
            .get_history(GetHistoryRequest {
                tenant: KEY.to_owned(),
                session_id: session.clone(),
                max_turns: 0,
                max_tokens: 0,
            })
            .await
            .unwrap_or_else(|s| panic!("session {session}: {s:?}"))
            .into_inner();
        let roles: Vec<i32> = history.turns.iter().map(|t| t.role).collect();
        assert_eq!(
            roles,
            vec![Role::User as i32, Role::Assistant as i32],
            "session {session} must hold its turn exactly once"
        );
        assert_eq!(
            history.turns[1].content,
            body["choices"][0]["message"]["content"].as_str().unwrap(),
            "session {session}"
        );
    }
    assert!(
        !degraded.contains_key("context_write"),
        "answered turns whose session write failed: {degraded:?}"
    );
    eprintln!(
        "replicas: 40 turns across the kill all answered and stored once; degraded: {degraded:?}"
    );
    for g in &mesh.gateways {
        g.assert_no_panic();
    }
}
