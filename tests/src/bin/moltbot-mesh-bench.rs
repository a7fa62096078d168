//! `moltbot-mesh-bench`: the scale-out benchmarks of BENCHMARKS.md, on real
//! processes of this build, each comparison measured in the same run.
//!
//! 1. **Generation replicas**: chat turns through the gateway against one
//!    generation replica with all `--threads`, then two replicas with half
//!    each (the gateway balancing over both): turns/s, completion tokens/s,
//!    latency p50/p99.
//! 2. **Gateway overhead** (the method TensorZero and Bifrost publish): a
//!    fake OpenAI-compatible provider answers after a fixed latency; the
//!    same requests go to it directly and through the whole mesh (gateway →
//!    context, understanding, retrieval → generation → auth-rotation lease →
//!    provider), at a fixed concurrency. Overhead = the difference of the
//!    latency percentiles. Run with enrichments on (understanding and
//!    retrieval serving) and off (configured off: the route has
//!    `understanding: false` and no retrieval, so neither is called).
//!    Every request is distinct, so the routes here have the response
//!    cache off (`cache: { enabled: false }`): these rows measure relaying,
//!    not lookups that always miss.
//! 3. **Response cache**: exact hits through the gateway against a bare
//!    round trip to it (`GET /healthz`), at concurrency 1 and
//!    `--overhead-concurrency` (see `cache_run`).
//! 4. **Live operations** (issue 34): steady relayed chat load, then the
//!    same load while the gateway's configuration is rewritten and
//!    reloaded every 200 ms, then while generation loads a second copy of
//!    its local model (`LoadModel`) and unloads it (see `live_run`).
//!
//! Usage (release build; models prepared as for `make test`):
//! `target/release/moltbot-mesh-bench 2>/dev/null` (the services' logs go to
//! stderr). Flags: `--help`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser;
use moltbot_e2e::{fake, grpc, process::ServiceProcess};
use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, Document, UpsertRequest,
    retrieval_service_client::RetrievalServiceClient,
};
use serde_json::{Value, json};

#[derive(Debug, Parser)]
#[command(
    name = "moltbot-mesh-bench",
    about = "Scale-out and gateway-overhead benchmarks"
)]
struct Args {
    /// Chat turns per generation configuration.
    #[arg(long, default_value_t = 40)]
    turns: usize,
    /// Concurrent clients of the generation comparison.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// `max_tokens` of each turn.
    #[arg(long, default_value_t = 32)]
    max_tokens: u32,
    /// Generation threads in all, split between the replicas.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Requests per overhead measurement.
    #[arg(long, default_value_t = 2000)]
    overhead_requests: usize,
    /// Concurrent clients of the overhead measurement.
    #[arg(long, default_value_t = 16)]
    overhead_concurrency: usize,
    /// The fake provider's latency, ms.
    #[arg(long, default_value_t = 20)]
    provider_latency_ms: u64,
    /// Skip the generation comparison.
    #[arg(long)]
    skip_generation: bool,
    /// Skip the overhead measurement.
    #[arg(long)]
    skip_overhead: bool,
    /// Skip the response-cache measurement.
    #[arg(long)]
    skip_cache: bool,
    /// Requests per response-cache measurement (each concurrency).
    #[arg(long, default_value_t = 2000)]
    cache_requests: usize,
    /// Skip the live-operations measurement.
    #[arg(long)]
    skip_live: bool,
    /// Requests per live-operations phase.
    #[arg(long, default_value_t = 3000)]
    live_requests: usize,
    /// Skip the spend measurement (budgets and ledger on vs off).
    #[arg(long)]
    skip_spend: bool,
    /// Requests per spend measurement (each concurrency, each side).
    #[arg(long, default_value_t = 2000)]
    spend_requests: usize,
}

/// Latencies of one run and its wall time.
struct Run {
    latencies: Vec<Duration>,
    wall: Duration,
    tokens: u64,
    failed: usize,
}

impl Run {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        if sorted.is_empty() {
            return Duration::ZERO;
        }
        let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
        sorted[i.min(sorted.len() - 1)]
    }

    fn rate(&self) -> f64 {
        self.latencies.len() as f64 / self.wall.as_secs_f64()
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// One table row: `| label | req/s | p50 | p99 | added p50 | added p99 |
/// failed |`, the added columns against `base` (`—` without one).
fn row(label: &str, run: &Run, base: Option<&Run>) -> String {
    let added = |p: f64| {
        base.map_or("—".to_owned(), |b| {
            ms(run.percentile(p).saturating_sub(b.percentile(p)))
        })
    };
    format!(
        "| {label} | {:.0} | {} | {} | {} | {} | {} |",
        run.rate(),
        ms(run.percentile(50.0)),
        ms(run.percentile(99.0)),
        added(50.0),
        added(99.0),
        run.failed
    )
}

/// Runs `n` calls of `call(i)` with `concurrency` workers.
async fn load<F, Fut>(n: usize, concurrency: usize, call: F) -> Run
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Option<u64>> + Send,
{
    let call = Arc::new(call);
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let out = Arc::new(Mutex::new((Vec::with_capacity(n), 0u64, 0usize)));
    let began = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (call, next, out) = (call.clone(), next.clone(), out.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= n {
                    return;
                }
                let t = Instant::now();
                let result = call(i).await;
                let took = t.elapsed();
                let mut o = out.lock().unwrap();
                match result {
                    Some(tokens) => {
                        o.0.push(took);
                        o.1 += tokens;
                    }
                    None => o.2 += 1,
                }
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    let wall = began.elapsed();
    let (latencies, tokens, failed) = Arc::try_unwrap(out).unwrap().into_inner().unwrap();
    Run {
        latencies,
        wall,
        tokens,
        failed,
    }
}

fn urls(ps: &[ServiceProcess]) -> String {
    ps.iter()
        .map(ServiceProcess::grpc_url)
        .collect::<Vec<_>>()
        .join(",")
}

async fn wait_all(ps: &[&ServiceProcess]) {
    for p in ps {
        let channel = grpc::connect(&p.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(300)).await;
    }
}

fn write_config(name: &str, body: &str) -> String {
    let path = std::env::temp_dir().join(format!(
        "moltbot-mesh-bench-{}-{name}.yaml",
        std::process::id()
    ));
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// A chat turn through `gateway`; returns its completion tokens.
async fn chat(http: &reqwest::Client, gateway: &str, text: String, max_tokens: u32) -> Option<u64> {
    let response = http
        .post(format!("{gateway}/v1/chat/completions"))
        .json(&json!({
            "model": "default",
            "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens,
            "temperature": 0
        }))
        .send()
        .await
        .ok()?;
    if !response.status().is_success() {
        return None;
    }
    let body: Value = response.json().await.ok()?;
    body["usage"]["completion_tokens"].as_u64()
}

async fn generation_run(args: &Args, replicas: usize) -> Run {
    let context = ServiceProcess::start(
        "moltbot-context",
        &[("MOLTBOT_CONTEXT_STORE", "memory".into())],
    );
    let threads = (args.threads / replicas).max(1).to_string();
    let generations: Vec<ServiceProcess> = (0..replicas)
        .map(|_| {
            ServiceProcess::start(
                "moltbot-generation",
                &[("MOLTBOT_THREADS", threads.clone())],
            )
        })
        .collect();
    wait_all(&generations.iter().collect::<Vec<_>>()).await;
    let config = write_config(
        "generation",
        "routes:\n  - name: default\n    match: { models: [default] }\n    candidates: [{ model: qwen2.5-coder-0.5b-instruct }]\n    cache: { enabled: false }\n",
    );
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", urls(&generations)),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_AUTH_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_GATEWAY_CONFIG", config),
            (
                "RUST_LOG",
                "warn,moltbot_runtime=info,moltbot_gateway=info".into(),
            ),
        ],
    );
    let http = reqwest::Client::new();
    let url = gateway.http_url();
    let max_tokens = args.max_tokens;
    for i in 0..2 * replicas {
        chat(
            &http,
            &url,
            format!("Warm-up {i}: name a colour."),
            max_tokens,
        )
        .await;
    }
    load(args.turns, args.concurrency, move |i| {
        let (http, url) = (http.clone(), url.clone());
        async move {
            chat(
                &http,
                &url,
                format!("Question {i}: write one sentence about the number {i}."),
                max_tokens,
            )
            .await
        }
    })
    .await
}

fn admin<T>(message: T) -> tonic::Request<T> {
    grpc::with_bearer(message, "bench-admin")
}

/// The processes that relay a turn to a remote provider: auth-rotation
/// with `provider` registered as `fake` (model `gpt-fake`, key `sk-bench`),
/// context with its in-memory store, and generation leasing from
/// auth-rotation.
async fn relay(provider: &str) -> (ServiceProcess, ServiceProcess, ServiceProcess) {
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[("MOLTBOT_ADMIN_TOKEN", "bench-admin".into())],
    );
    moltbot_e2e::providers::register_openai(
        &auth.grpc_url(),
        "bench-admin",
        "fake",
        provider.to_owned(),
        &["gpt-fake"],
        "sk-bench",
    )
    .await;
    let context = ServiceProcess::start(
        "moltbot-context",
        &[("MOLTBOT_CONTEXT_STORE", "memory".into())],
    );
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_THREADS", "1".into()),
        ],
    );
    (auth, context, generation)
}

/// CPU time each process spent during a run, by process name.
type CpuSpent = Vec<(&'static str, Duration)>;

/// Direct calls to the provider, then the same through the mesh; with the
/// CPU each process of the mesh spent during the mesh run.
async fn overhead_run(args: &Args, provider: &str, enrichments: bool) -> (Run, Run, CpuSpent) {
    let (auth, context, generation) = relay(provider).await;
    let mut enrichers = Vec::new();
    let (understanding_url, retrieval_url) = if enrichments {
        let understanding = ServiceProcess::start("moltbot-understanding", &[]);
        let retrieval = ServiceProcess::start(
            "moltbot-retrieval",
            &[("MOLTBOT_ADMIN_TOKEN", "bench-admin".into())],
        );
        wait_all(&[&understanding, &retrieval]).await;
        let mut r = RetrievalServiceClient::new(grpc::connect(&retrieval.grpc_url()).await);
        r.create_collection(admin(CreateCollectionRequest {
            name: "docs".into(),
            chunking: None,
        }))
        .await
        .unwrap();
        r.upsert(admin(UpsertRequest {
            collection: "docs".into(),
            documents: vec![Document {
                id: "greeting".into(),
                text: "MoltBot greets users politely and answers briefly.".into(),
                metadata: Default::default(),
            }],
        }))
        .await
        .unwrap();
        let urls = (understanding.grpc_url(), retrieval.grpc_url());
        enrichers.push(understanding);
        enrichers.push(retrieval);
        urls
    } else {
        ("http://127.0.0.1:9".into(), "http://127.0.0.1:9".into())
    };
    wait_all(&[&generation, &context]).await;
    // Off is configured off (a route without understanding or retrieval:
    // the pure-gateway case), not services stopped: stopped services
    // would measure retries against them, not the feature.
    let config = if enrichments {
        write_config(
            "on",
            "routes:\n  - name: default\n    match: { models: [default] }\n    retrieval: { collection: docs, top_k: 1 }\n    candidates: [{ model: fake/gpt-fake }]\n    cache: { enabled: false }\n",
        )
    } else {
        write_config(
            "off",
            "routes:\n  - name: default\n    match: { models: [default] }\n    understanding: false\n    candidates: [{ model: fake/gpt-fake }]\n    cache: { enabled: false }\n",
        )
    };
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", generation.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", understanding_url),
            ("MOLTBOT_RETRIEVAL_URL", retrieval_url),
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_GATEWAY_CONFIG", config),
            ("MOLTBOT_MAX_IN_FLIGHT", "4096".into()),
            (
                "RUST_LOG",
                "warn,moltbot_runtime=info,moltbot_gateway=info".into(),
            ),
        ],
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let n = args.overhead_requests;
    let c = args.overhead_concurrency;
    // Direct: the request the generation service sends the provider.
    let direct = {
        let (http, url) = (http.clone(), format!("{provider}/chat/completions"));
        load(n, c, move |_| {
            let (http, url) = (http.clone(), url.clone());
            async move {
                let r = http
                    .post(url)
                    .bearer_auth("sk-bench")
                    .json(&json!({"model": "gpt-fake", "stream": true, "messages": [{"role": "user", "content": "Say hello."}]}))
                    .send()
                    .await
                    .ok()?;
                r.text().await.ok().map(|_| 3)
            }
        })
        .await
    };
    let url = gateway.http_url();
    for i in 0..20 {
        chat(&http, &url, format!("warm-up {i}"), 16).await;
    }
    let mut processes: Vec<(&'static str, &ServiceProcess)> = vec![
        ("gateway", &gateway),
        ("context", &context),
        ("generation", &generation),
        ("auth-rotation", &auth),
    ];
    if let [understanding, retrieval] = enrichers.as_slice() {
        processes.push(("understanding", understanding));
        processes.push(("retrieval", retrieval));
    }
    let before: Vec<Duration> = processes.iter().map(|(_, p)| p.cpu_time()).collect();
    let bench_before = moltbot_e2e::process::cpu_time_of("/proc/self/stat");
    let mesh = load(n, c, move |i| {
        let (http, url) = (http.clone(), url.clone());
        async move { chat(&http, &url, format!("Say hello ({i})."), 16).await }
    })
    .await;
    let mut spent: CpuSpent = processes
        .iter()
        .zip(before)
        .map(|((name, p), b)| (*name, p.cpu_time().saturating_sub(b)))
        .collect();
    spent.push((
        "load generator + fake provider",
        moltbot_e2e::process::cpu_time_of("/proc/self/stat").saturating_sub(bench_before),
    ));
    drop(processes);
    drop(enrichers);
    (direct, mesh, spent)
}

/// Live operations under steady load (issue 34, item 7): relayed turns
/// (enrichments off) at `--overhead-concurrency`, measured three times —
/// steady; while the gateway's configuration file is rewritten (the
/// candidate's weight changes) every 200 ms and reloaded; while
/// generation loads a second copy of its local model through `LoadModel`
/// (in the dtype of `MOLTBOT_DTYPE`) and unloads it. Returns the three runs
/// with their labels, the reloads done and the LoadModel figures.
async fn live_run(args: &Args, provider: &str) -> (Vec<(String, Run)>, usize, String) {
    let (auth, context, generation) = relay(provider).await;
    wait_all(&[&generation, &context]).await;
    let route = |weight: u32| {
        format!(
            "routes:\n  - name: default\n    match: {{ models: [default] }}\n    understanding: false\n    candidates: [{{ model: fake/gpt-fake, weight: {weight} }}]\n    cache: {{ enabled: false }}\n"
        )
    };
    let config = write_config("live", &route(1));
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", generation.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_GATEWAY_CONFIG", config.clone()),
            ("MOLTBOT_CONFIG_POLL_MS", "100".into()),
            ("MOLTBOT_MAX_IN_FLIGHT", "4096".into()),
            // `listening` (info) is how the harness finds the port.
            (
                "RUST_LOG",
                "warn,moltbot_runtime=info,moltbot_gateway=info".into(),
            ),
        ],
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = gateway.http_url();
    for i in 0..20 {
        chat(&http, &url, format!("warm-up {i}"), 16).await;
    }
    let (n, c) = (args.live_requests, args.overhead_concurrency);
    let phase = |label: &'static str| {
        let (http, url) = (http.clone(), url.clone());
        load(n, c, move |i| {
            let (http, url) = (http.clone(), url.clone());
            async move { chat(&http, &url, format!("Say hello ({label} {i})."), 16).await }
        })
    };
    let mut runs = vec![("steady".to_owned(), phase("steady").await)];

    // Reloads: a new weight every 200 ms, and a SIGHUP with every write.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reloads = {
        let (stop, config) = (stop.clone(), config.clone());
        let pid = gateway.pid();
        tokio::spawn(async move {
            let mut done = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                std::fs::write(&config, route(1 + (done % 5) as u32)).unwrap();
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid as i32),
                    nix::sys::signal::Signal::SIGHUP,
                );
                done += 1;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done
        })
    };
    let during_reloads = phase("reload").await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let reloads = reloads.await.unwrap();
    runs.push((
        format!("configuration reloaded every 200 ms ({reloads} reloads)"),
        during_reloads,
    ));

    // A model load and unload on the generation process that relays.
    let mut client =
        moltbot_proto::generation::v1::generation_service_client::GenerationServiceClient::new(
            grpc::connect(&generation.grpc_url()).await,
        );
    let local = client
        .list_models(moltbot_proto::generation::v1::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models
        .into_iter()
        .find(|m| m.backend == "local")
        .map(|m| m.name)
        .unwrap_or_else(|| "qwen2.5-coder-0.5b-instruct".into());
    let operations = tokio::spawn(async move {
        let began = Instant::now();
        let loaded = client
            .load_model(moltbot_proto::generation::v1::LoadModelRequest {
                dir: local,
                name: "bench-copy".into(),
                warmup_requests: 2,
            })
            .await
            .map(tonic::Response::into_inner);
        let unloaded = client
            .unload_model(moltbot_proto::generation::v1::UnloadModelRequest {
                name: "bench-copy".into(),
                wait_ms: 0,
            })
            .await;
        match (loaded, unloaded) {
            (Ok(l), Ok(_)) => format!(
                "LoadModel {:.1} s (load {:.1} s, warm-up {:.1} s, {} dtype), RSS after load {} MiB; unloaded; {:.1} s in all",
                (l.load_ms + l.warmup_ms) as f64 / 1000.0,
                l.load_ms as f64 / 1000.0,
                l.warmup_ms as f64 / 1000.0,
                l.model.map(|m| m.dtype).unwrap_or_default(),
                l.rss_bytes >> 20,
                began.elapsed().as_secs_f64()
            ),
            (l, u) => format!("load/unload failed: {l:?} {u:?}"),
        }
    });
    let during_load = phase("load").await;
    let figures = operations.await.unwrap();
    runs.push((
        "model loaded and unloaded meanwhile".to_owned(),
        during_load,
    ));
    (runs, reloads, figures)
}

/// The response cache's exact hits (issue 38, item 8): one greedy question
/// stored once, then asked again in new sessions at concurrency 1 and 16,
/// against a bare HTTP round trip to the same gateway (`GET /healthz`) at
/// the same concurrency. The route searches a collection (`understanding:
/// false`), so a hit reads the session's history and the collection's
/// version, replays the answer and writes the session, as it does in
/// production. Returns `(concurrency, healthz run, hit run)` pairs.
async fn cache_run(args: &Args, provider: &str) -> Vec<(usize, Run, Run)> {
    let (auth, context, generation) = relay(provider).await;
    let retrieval = ServiceProcess::start(
        "moltbot-retrieval",
        &[("MOLTBOT_ADMIN_TOKEN", "bench-admin".into())],
    );
    wait_all(&[&generation, &context, &retrieval]).await;
    let mut r = RetrievalServiceClient::new(grpc::connect(&retrieval.grpc_url()).await);
    r.create_collection(admin(CreateCollectionRequest {
        name: "docs".into(),
        chunking: None,
    }))
    .await
    .unwrap();
    let config = write_config(
        "cache",
        "routes:\n  - name: default\n    match: { models: [default] }\n    understanding: false\n    retrieval: { collection: docs, top_k: 1 }\n    candidates: [{ model: fake/gpt-fake }]\n",
    );
    let gateway = ServiceProcess::start(
        "moltbot-gateway",
        &[
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", generation.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_RETRIEVAL_URL", retrieval.grpc_url()),
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_GATEWAY_CONFIG", config),
            ("MOLTBOT_MAX_IN_FLIGHT", "4096".into()),
            // `listening` (info) is what the harness waits for.
            ("RUST_LOG", "warn,moltbot_gateway=info".into()),
        ],
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    let url = gateway.http_url();
    // Stored once (a miss), then every request below is a hit.
    chat(&http, &url, "What is MoltBot?".into(), 16).await;
    let mut out = Vec::new();
    for c in [1, args.overhead_concurrency] {
        let bare = {
            let (http, url) = (http.clone(), format!("{url}/healthz"));
            load(args.cache_requests, c, move |_| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let r = http.get(url).send().await.ok()?;
                    r.status().is_success().then_some(0)
                }
            })
            .await
        };
        let hits = {
            let (http, url) = (http.clone(), url.clone());
            load(args.cache_requests, c, move |_| {
                let (http, url) = (http.clone(), url.clone());
                async move {
                    let response = http
                        .post(format!("{url}/v1/chat/completions"))
                        .json(&json!({
                            "model": "default",
                            "messages": [{"role": "user", "content": "What is MoltBot?"}],
                            "max_tokens": 16,
                            "temperature": 0
                        }))
                        .send()
                        .await
                        .ok()?;
                    let hit = response
                        .headers()
                        .get("x-moltbot-cache")
                        .is_some_and(|v| v == "hit");
                    let body: Value = response.json().await.ok()?;
                    hit.then(|| body["usage"]["completion_tokens"].as_u64())
                        .flatten()
                }
            })
            .await
        };
        out.push((c, bare, hits));
    }
    out
}

/// Spend control on vs off (issue 35, item 6): two gateways over one
/// relay mesh, identical but for spend — "on" prices the model, checks a
/// key budget and a tenant budget in Redis at every admission and writes
/// every request to the PostgreSQL ledger; "off" has no `spend:` section
/// and `MOLTBOT_SPEND_LEDGER=off`. Measured side by side at concurrency 1
/// and 64. Returns (concurrency, off, on) per concurrency and the ledger's
/// row count (every "on" request, checked).
async fn spend_run(args: &Args, provider: &str) -> (Vec<(usize, Run, Run)>, i64) {
    let (auth, context, generation) = relay(provider).await;
    wait_all(&[&generation, &context]).await;
    // Anonymous callers share one concurrency cap (default 16): raised
    // above the load's 64.
    let route = "routes:\n  - name: default\n    match: { models: [default] }\n    understanding: false\n    candidates: [{ model: fake/gpt-fake }]\n    cache: { enabled: false }\nanonymous_limits: { max_concurrent_requests: 256 }\n";
    let off = write_config("spend-off", route);
    let on = write_config(
        "spend-on",
        &format!(
            "{route}spend:\n  prices:\n    fake/gpt-fake: {{ input: 0.15, output: 0.60 }}\n  budgets:\n    - {{ key: anonymous, max_usd: 1000000, window: daily }}\n    - {{ tenant: local, max_usd: 1000000, window: monthly }}\n"
        ),
    );
    let schema = format!("bench_spend_{}", std::process::id());
    let database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let redis = moltbot_e2e::stores::redis_url();
    let gateway = |config: String, spend: bool| {
        let mut env = vec![
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", generation.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".into()),
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_GATEWAY_CONFIG", config),
            ("MOLTBOT_MAX_IN_FLIGHT", "4096".into()),
            ("REDIS_URL", redis.clone()),
            ("MOLTBOT_ADMIN_TOKEN", "bench-admin".into()),
            ("RUST_LOG", "warn,moltbot_gateway=info".into()),
        ];
        if spend {
            env.push(("DATABASE_URL", database.clone()));
            env.push(("MOLTBOT_SPEND_PG_SCHEMA", schema.clone()));
        } else {
            env.push(("MOLTBOT_SPEND_LEDGER", "off".into()));
        }
        ServiceProcess::start("moltbot-gateway", &env)
    };
    let (off, on) = (gateway(off, false), gateway(on, true));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .unwrap();
    for url in [off.http_url(), on.http_url()] {
        for i in 0..20 {
            chat(&http, &url, format!("warm-up {i}"), 16).await;
        }
    }
    let mut out = Vec::new();
    for c in [1, 64] {
        let mut runs = Vec::new();
        for g in [&off, &on] {
            let (http, url) = (http.clone(), g.http_url());
            runs.push(
                load(args.spend_requests, c, move |i| {
                    let (http, url) = (http.clone(), url.clone());
                    async move { chat(&http, &url, format!("Say hello ({i})."), 16).await }
                })
                .await,
            );
        }
        let on_run = runs.pop().unwrap();
        let off_run = runs.pop().unwrap();
        out.push((c, off_run, on_run));
    }
    // Every "on" request has its ledger row (the report writes what is
    // buffered first).
    let report: Value = http
        .get(format!("{}/admin/spend?by=key", on.http_url()))
        .bearer_auth("bench-admin")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or_default();
    let rows = report["total"]["requests"].as_i64().unwrap_or(-1);
    (out, rows)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let args = Args::parse();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# moltbot-mesh-bench on {cores} cores");
    if !args.skip_generation {
        let one = generation_run(&args, 1).await;
        let two = generation_run(&args, 2).await;
        println!(
            "\n## Generation: 1 vs 2 replicas ({} threads in all, {} turns, concurrency {}, max_tokens {})\n",
            args.threads, args.turns, args.concurrency, args.max_tokens
        );
        println!(
            "| replicas × threads | turns/s | completion tokens/s | p50 ms | p99 ms | failed |"
        );
        println!("|---|---|---|---|---|---|");
        for (label, run) in [
            (format!("1 × {}", args.threads), &one),
            (format!("2 × {}", (args.threads / 2).max(1)), &two),
        ] {
            println!(
                "| {label} | {:.2} | {:.1} | {} | {} | {} |",
                run.rate(),
                run.tokens as f64 / run.wall.as_secs_f64(),
                ms(run.percentile(50.0)),
                ms(run.percentile(99.0)),
                run.failed
            );
        }
    }
    // One fake provider for the overhead and cache runs.
    let provider = fake::Provider {
        latency: Duration::from_millis(args.provider_latency_ms),
        ..Default::default()
    }
    .start()
    .await;
    if !args.skip_overhead {
        println!(
            "\n## Gateway overhead: fake provider at {} ms, {} requests, concurrency {}\n",
            args.provider_latency_ms, args.overhead_requests, args.overhead_concurrency
        );
        println!("| path | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | failed |");
        println!("|---|---|---|---|---|---|---|");
        let mut cpu = Vec::new();
        for enrichments in [false, true] {
            let (direct, mesh, spent) = overhead_run(&args, &provider, enrichments).await;
            cpu.push((enrichments, mesh.latencies.len(), spent));
            let label = if enrichments { "on" } else { "off" };
            println!("{}", row("direct to the provider", &direct, None));
            println!(
                "{}",
                row(&format!("mesh, enrichments {label}"), &mesh, Some(&direct))
            );
        }
        println!(
            "\n## Where the CPU goes: ms of CPU per mesh request, by process (from /proc, same runs)\n"
        );
        println!("| process | enrichments off | enrichments on |");
        println!("|---|---|---|");
        let per_request = |run: usize, name: &str| {
            cpu.get(run)
                .and_then(|(_, n, spent)| {
                    spent
                        .iter()
                        .find(|(p, _)| *p == name)
                        .map(|(_, d)| d.as_secs_f64() * 1000.0 / (*n).max(1) as f64)
                })
                .map_or("—".to_owned(), |ms| format!("{ms:.3}"))
        };
        let names: Vec<&str> = cpu
            .iter()
            .flat_map(|(_, _, spent)| spent.iter().map(|(p, _)| *p))
            .fold(Vec::new(), |mut acc, p| {
                if !acc.contains(&p) {
                    acc.push(p);
                }
                acc
            });
        for name in names {
            println!(
                "| {name} | {} | {} |",
                per_request(0, name),
                per_request(1, name)
            );
        }
    }
    if !args.skip_live {
        println!(
            "\n## Live operations under load: fake provider at {} ms, {} requests per phase, concurrency {}\n",
            args.provider_latency_ms, args.live_requests, args.overhead_concurrency
        );
        let (runs, _, figures) = live_run(&args, &provider).await;
        println!("| phase | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | failed |");
        println!("|---|---|---|---|---|---|---|");
        let steady = &runs[0].1;
        for (i, (label, run)) in runs.iter().enumerate() {
            println!("{}", row(label, run, (i > 0).then_some(steady)));
        }
        println!("\n{figures}");
    }
    if !args.skip_spend {
        println!(
            "\n## Spend control: budgets (Redis) and ledger (PostgreSQL) on vs off, fake provider at {} ms, {} requests each\n",
            args.provider_latency_ms, args.spend_requests
        );
        println!(
            "| path | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | failed |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        let (runs, rows) = spend_run(&args, &provider).await;
        let mut on_requests = 0;
        for (c, off, on) in &runs {
            println!("{}", row(&format!("spend off | {c}"), off, None));
            println!("{}", row(&format!("spend on | {c}"), on, Some(off)));
            on_requests += on.latencies.len();
        }
        println!(
            "\nledger rows written for the \"on\" gateway: {rows} (requests answered, warm-up included: {})",
            on_requests + 20
        );
    }
    if !args.skip_cache {
        println!(
            "\n## Response cache: exact hits against a bare round trip to the gateway ({} requests each)\n",
            args.cache_requests
        );
        println!(
            "| path | concurrency | req/s | p50 ms | p99 ms | added p50 ms | added p99 ms | failed |"
        );
        println!("|---|---|---|---|---|---|---|---|");
        for (c, bare, hits) in cache_run(&args, &provider).await {
            println!("{}", row(&format!("GET /healthz | {c}"), &bare, None));
            println!("{}", row(&format!("exact hit | {c}"), &hits, Some(&bare)));
        }
    }
}
