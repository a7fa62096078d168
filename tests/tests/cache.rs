//! The response cache end to end (gateway/src/cache/): real gateways
//! sharing a real Redis, a real retrieval service whose collection version
//! keys RAG answers, generation relaying to a fake OpenAI-compatible
//! provider (the only fake: a third-party provider) through a credential
//! leased from auth-rotation. The turn engine's cache rules (what is
//! stored, Cache-Control, tool calls, errors, cancellations) are tested in
//! process (gateway/src/turn/tests/cache.rs).
//!
//! Needs Redis (`REDIS_URL`, default redis://127.0.0.1:6379) and the
//! encoder for retrieval (`make models`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use moltbot_e2e::{
    fake, grpc, metrics,
    process::ServiceProcess,
    providers::{self, with_token},
    sha256_hex,
    stores::{OwnRedis, redis_url, unique},
};
use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, Document, UpsertRequest,
    retrieval_service_client::RetrievalServiceClient,
};
use serde_json::{Value, json};

const FAKE_KEY: &str = "sk-fake-provider-key";
const ADMIN: &str = "cache-admin";

struct Mesh {
    _auth: ServiceProcess,
    context: ServiceProcess,
    generation: ServiceProcess,
    retrieval: ServiceProcess,
    calls: Arc<AtomicU32>,
    config: std::path::PathBuf,
    collection: String,
    run: String,
}

impl Mesh {
    async fn start() -> Self {
        let calls = Arc::new(AtomicU32::new(0));
        let fake_url = fake::Provider {
            key: Some(FAKE_KEY),
            calls: calls.clone(),
            ..Default::default()
        }
        .start()
        .await;
        let auth = ServiceProcess::start(
            "moltbot-auth-rotation",
            &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
        );
        providers::register_openai(
            &auth.grpc_url(),
            ADMIN,
            "fake",
            fake_url,
            &["gpt-fake"],
            FAKE_KEY,
        )
        .await;
        let context = ServiceProcess::start("moltbot-context", &[]);
        let generation = ServiceProcess::start(
            "moltbot-generation",
            &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
        );
        let retrieval = ServiceProcess::start(
            "moltbot-retrieval",
            &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
        );
        let run = unique("cache");
        let collection = format!("cache-{}", run.replace('-', "_"));
        let channel = grpc::connect(&retrieval.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(120)).await;
        RetrievalServiceClient::new(channel)
            .create_collection(with_token(
                ADMIN,
                CreateCollectionRequest {
                    name: collection.clone(),
                    chunking: None,
                },
            ))
            .await
            .unwrap();
        let config = std::env::temp_dir().join(format!("moltbot-cache-{run}.yaml"));
        std::fs::write(
            &config,
            format!(
                r#"
routes:
  - name: default
    match: {{ models: [default] }}
    understanding: false
    retrieval: {{ collection: {collection}, top_k: 1 }}
    candidates: [{{ model: fake/gpt-fake }}]
api_keys:
  - {{ name: alpha, tenant: alpha-{run}, sha256: "{}" }}
  - {{ name: beta, tenant: beta-{run}, sha256: "{}" }}
allow_anonymous: false
"#,
                sha256_hex("key-alpha"),
                sha256_hex("key-beta")
            ),
        )
        .unwrap();
        let gen_channel = grpc::connect(&generation.grpc_url()).await;
        grpc::wait_serving(&gen_channel, "", Duration::from_secs(120)).await;
        Self {
            _auth: auth,
            context,
            generation,
            retrieval,
            calls,
            config,
            collection,
            run,
        }
    }

    fn gateway(&self, redis: Option<String>) -> ServiceProcess {
        let mut env = vec![
            ("MOLTBOT_CONTEXT_URL", self.context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", self.generation.grpc_url()),
            ("MOLTBOT_RETRIEVAL_URL", self.retrieval.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_GATEWAY_CONFIG", self.config.display().to_string()),
            ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
        ];
        if let Some(url) = redis {
            env.push(("REDIS_URL", url));
        }
        ServiceProcess::start("moltbot-gateway", &env)
    }

    async fn upsert(&self, id: &str, text: &str) {
        let channel = grpc::connect(&self.retrieval.grpc_url()).await;
        RetrievalServiceClient::new(channel)
            .upsert(with_token(
                ADMIN,
                UpsertRequest {
                    collection: self.collection.clone(),
                    documents: vec![Document {
                        id: id.into(),
                        text: text.into(),
                        metadata: Default::default(),
                    }],
                },
            ))
            .await
            .unwrap();
    }
}

/// One greedy question in a new session: (cache header, body, seconds).
async fn ask(gateway: &ServiceProcess, key: &str, question: &str) -> (String, Value, f64) {
    let began = Instant::now();
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .bearer_auth(key)
        .json(&json!({
            "model": "default",
            "temperature": 0,
            "max_tokens": 32,
            "messages": [{"role": "user", "content": question}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let cache = response
        .headers()
        .get("x-moltbot-cache")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["moltbot"]["cache"]["status"], cache.as_str(), "{body}");
    (cache, body, began.elapsed().as_secs_f64())
}

async fn purge(gateway: &ServiceProcess, token: Option<&str>, scope: Value) -> u16 {
    let mut request = reqwest::Client::new()
        .post(format!("{}/admin/cache/purge", gateway.http_url()))
        .json(&scope);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    request.send().await.unwrap().status().as_u16()
}

fn python_stream(gateway: &ServiceProcess, key: &str, question: &str) -> Value {
    let python = std::env::var("MOLTBOT_PYTHON").unwrap_or_else(|_| ".venv/bin/python".to_owned());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_stream.py");
    let out = std::process::Command::new(&python)
        .arg(&script)
        .arg(gateway.http_url())
        .arg(key)
        .arg("")
        .arg(question)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn gateways_share_answers_per_tenant_until_the_knowledge_changes_or_a_purge() {
    let mesh = Mesh::start().await;
    mesh.upsert(
        "greeting",
        "MoltBot greets users politely and answers briefly.",
    )
    .await;
    let a = mesh.gateway(Some(redis_url()));
    let b = mesh.gateway(Some(redis_url()));
    let question = format!("What does MoltBot do? ({})", mesh.run);

    let (cache, first, _) = ask(&a, "key-alpha", &question).await;
    assert_eq!(cache, "miss");
    assert_eq!(mesh.calls.load(Ordering::SeqCst), 1);
    assert_eq!(first["moltbot"]["sources"].as_array().unwrap().len(), 1);

    // Another gateway finds the answer in Redis: same content, original
    // usage with the prompt reported cached, no provider call.
    let (cache, hit, _) = ask(&b, "key-alpha", &question).await;
    assert_eq!(cache, "hit", "{hit}");
    assert_eq!(
        hit["choices"][0]["message"]["content"],
        first["choices"][0]["message"]["content"]
    );
    assert_eq!(
        hit["usage"]["prompt_tokens"],
        first["usage"]["prompt_tokens"]
    );
    assert_eq!(
        hit["usage"]["prompt_tokens_details"]["cached_tokens"],
        first["usage"]["prompt_tokens"]
    );
    assert!(hit["moltbot"]["cache"]["age_s"].as_f64().is_some());
    assert_eq!(hit["moltbot"]["sources"], first["moltbot"]["sources"]);
    assert_eq!(mesh.calls.load(Ordering::SeqCst), 1);

    // Another tenant never gets it.
    let (cache, _, _) = ask(&b, "key-beta", &question).await;
    assert_eq!(cache, "miss");
    assert_eq!(mesh.calls.load(Ordering::SeqCst), 2);

    // A streamed hit read by the official OpenAI SDK: the same chunks.
    let streamed = format!("Stream it. ({})", mesh.run);
    let generated = python_stream(&a, "key-alpha", &streamed);
    assert_eq!(generated["cache"], "miss", "{generated}");
    let replayed = python_stream(&b, "key-alpha", &streamed);
    assert_eq!(replayed["cache"], "hit", "{replayed}");
    assert_eq!(replayed["moltbot"]["cache"]["status"], "hit");
    for field in ["text", "chunks", "finish"] {
        assert_eq!(replayed[field], generated[field], "{field}");
    }
    assert_eq!(
        replayed["usage"]["prompt_tokens_details"]["cached_tokens"],
        generated["usage"]["prompt_tokens"]
    );
    assert_eq!(mesh.calls.load(Ordering::SeqCst), 3);
    // A streamed answer's entry answers a JSON request too.
    let (cache, _, _) = ask(&a, "key-alpha", &streamed).await;
    assert_eq!(cache, "hit");

    // A write to the collection the route searches: the RAG answer's entry
    // is unreachable.
    mesh.upsert("farewell", "MoltBot says goodbye when asked.")
        .await;
    let (cache, _, _) = ask(&b, "key-alpha", &question).await;
    assert_eq!(cache, "miss");
    assert_eq!(mesh.calls.load(Ordering::SeqCst), 4);
    let (cache, _, _) = ask(&a, "key-alpha", &question).await;
    assert_eq!(cache, "hit");
    let kept = format!("Keep me. ({})", mesh.run);
    let (cache, _, _) = ask(&b, "key-beta", &kept).await;
    assert_eq!(cache, "miss");

    // The operator purges alpha's entries through gateway a. Gateway b,
    // which holds the entry in its own memory tier (it stored it above), no
    // longer serves it either: Redis was emptied and b was told.
    assert_eq!(purge(&a, None, json!({})).await, 401);
    assert_eq!(purge(&a, Some("wrong"), json!({})).await, 401);
    assert_eq!(
        purge(
            &a,
            Some(ADMIN),
            json!({"tenant": format!("alpha-{}", mesh.run)})
        )
        .await,
        200
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cache, _, _) = ask(&b, "key-alpha", &question).await;
    assert_eq!(cache, "miss", "purged from b's memory tier and from Redis");
    // Beta's entries were not in the scope.
    let (cache, _, _) = ask(&a, "key-beta", &kept).await;
    assert_eq!(cache, "hit", "another tenant's entry survives the purge");

    let url = format!("{}/metrics", b.http_url());
    assert!(
        metrics::sum(
            &url,
            "moltbot_gateway_cache_results_total",
            &["status=\"hit\""]
        )
        .await
            >= 2.0
    );
    assert!(metrics::sum(&url, "moltbot_gateway_cache_served_tokens_total", &[]).await > 0.0);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_redis_the_memory_tier_serves_and_no_turn_slows_down() {
    let mesh = Mesh::start().await;
    let mut redis = OwnRedis::start();
    let gw = mesh.gateway(Some(redis.url()));
    let question = format!("Is the cache up? ({})", mesh.run);
    let (cache, _, _) = ask(&gw, "key-alpha", &question).await;
    assert_eq!(cache, "miss");

    redis.stop();
    // The memory tier still has it.
    let (cache, _, _) = ask(&gw, "key-alpha", &question).await;
    assert_eq!(cache, "hit");
    // A new question is generated, stored in memory, and not slowed by the
    // dead Redis beyond its command timeout (100 ms by default).
    let other = format!("And now? ({})", mesh.run);
    let (cache, _, took) = ask(&gw, "key-alpha", &other).await;
    assert_eq!(cache, "miss");
    assert!(took < 2.0, "a miss with Redis down took {took:.2} s");
    let (cache, _, _) = ask(&gw, "key-alpha", &other).await;
    assert_eq!(cache, "hit");
    let url = format!("{}/metrics", gw.http_url());
    assert!(metrics::sum(&url, "moltbot_gateway_cache_redis_fallbacks_total", &[]).await >= 1.0);
    gw.assert_no_panic();
}
