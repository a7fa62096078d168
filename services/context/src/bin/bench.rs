//! `moltbot-context-bench`: AppendTurns + GetHistory through our gRPC
//! service against the same operations on the same Redis with a raw client,
//! side by side in one run.
//!
//! Workload: `--clients` concurrent callers, each on its own session, each
//! alternating an append of two turns (user + assistant, ~100 bytes each)
//! and a read of the history, for `--seconds`. Three ways:
//!
//! - `raw redis`: the minimal Redis equivalent, one round trip each — append
//!   = `MULTI RPUSH LTRIM EXPIRE EXEC`, read = `LRANGE` — on a multiplexed
//!   connection;
//! - `store`: our Redis store called in-process (Lua scripts: idempotency,
//!   metadata, tenant index, TTL slide);
//! - `gRPC`: the whole service over a real socket (`127.0.0.1:0`).
//!
//! Reports ops/s and p50/p99 latency per way, and the p50/p99 added by the
//! service over raw Redis. Then runs `redis-benchmark` (LPUSH/LRANGE_100) on
//! the same server when it is installed, as a second reference.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use moltbot_context::{
    service::RequestLimits,
    session::{SessionKey, StoredTurn, now_ms},
    store::{RedisStore, SessionStore, StoreLimits},
};
use moltbot_proto::context::v1::{self as pb, context_service_client::ContextServiceClient};

/// Flags of the benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "moltbot-context-bench",
    about = "Context: our gRPC service vs raw Redis"
)]
struct Args {
    /// Redis to run against.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Concurrent callers.
    #[arg(long, default_value_t = 32)]
    clients: usize,
    /// Turns a session grows to before its caller starts a new one (a
    /// conversation's length); each append adds 2.
    #[arg(long, default_value_t = 32)]
    turns_per_session: u64,
    /// HTTP/2 connections the gRPC callers share.
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Seconds per way.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
}

const LIMITS: StoreLimits = StoreLimits {
    max_turns: 128,
    default_ttl: Duration::from_secs(600),
};

const USER: &str =
    "What is the weather like in Lisbon tomorrow? I am planning a walk by the river.";
const ASSISTANT: &str =
    "Tomorrow in Lisbon: sunny, 21 °C, light wind from the north. Good for a walk.";

/// Latencies of one way, microseconds.
struct Run {
    name: &'static str,
    latencies_us: Vec<u64>,
    elapsed: Duration,
}

impl Run {
    fn ops_s(&self) -> f64 {
        self.latencies_us.len() as f64 / self.elapsed.as_secs_f64()
    }
    fn pct(&self, p: f64) -> f64 {
        let mut v = self.latencies_us.clone();
        v.sort_unstable();
        let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len().max(1)) - 1;
        v.get(i).copied().unwrap_or_default() as f64 / 1000.0
    }
}

/// Runs `op(client, i)` from `clients` tasks for `seconds`.
async fn drive<F, Fut>(name: &'static str, clients: usize, seconds: u64, op: F) -> Run
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut i = 0u64;
            while Instant::now() < deadline {
                let t = Instant::now();
                if let Err(e) = op(c, i).await {
                    eprintln!("{name}: {e}");
                    break;
                }
                lat.push(t.elapsed().as_micros() as u64);
                i += 1;
            }
            lat
        }));
    }
    let mut latencies_us = Vec::new();
    for t in tasks {
        latencies_us.extend(t.await.unwrap_or_default());
    }
    Run {
        name,
        latencies_us,
        elapsed: started.elapsed(),
    }
}

fn turns() -> Vec<StoredTurn> {
    let now = now_ms();
    vec![
        StoredTurn {
            role: pb::Role::User as i32,
            content: USER.into(),
            token_count: 20,
            created_at_ms: now,
        },
        StoredTurn {
            role: pb::Role::Assistant as i32,
            content: ASSISTANT.into(),
            token_count: 20,
            created_at_ms: now,
        },
    ]
}

/// The session of caller `c` at op `i`: a new one every `per` ops.
fn session(run: &str, c: usize, i: u64, per: u64) -> SessionKey {
    SessionKey {
        tenant: format!("bench-{}", std::process::id()),
        session_id: format!("{run}-{c}-{}", i / per.max(2)),
    }
}

async fn raw(args: &Args, clients: usize, conn: redis::aio::MultiplexedConnection) -> Run {
    let per = args.turns_per_session;
    let payload = serde_json::to_string(&turns()[0]).unwrap_or_default();
    let payload2 = serde_json::to_string(&turns()[1]).unwrap_or_default();
    drive("raw redis", clients, args.seconds, move |c, i| {
        let mut conn = conn.clone();
        let (p1, p2) = (payload.clone(), payload2.clone());
        async move {
            let key = format!("bench:raw:{}:{c}:{}", std::process::id(), i / per.max(2));
            if i % 2 == 0 {
                redis::pipe()
                    .atomic()
                    .rpush(&key, p1)
                    .rpush(&key, p2)
                    .ltrim(&key, -128, -1)
                    .expire(&key, 600)
                    .query_async::<()>(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            } else {
                redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async::<Vec<String>>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }
    })
    .await
}

async fn store(args: &Args, clients: usize, store: Arc<dyn SessionStore>) -> Run {
    let per = args.turns_per_session;
    drive("store", clients, args.seconds, move |c, i| {
        let store = store.clone();
        async move {
            let key = session("store", c, i, per);
            if i % 2 == 0 {
                store.append(&key, turns(), None, None).await.map(|_| ())
            } else {
                store.history(&key).await.map(|_| ())
            }
            .map_err(|e| e.to_string())
        }
    })
    .await
}

async fn grpc(
    args: &Args,
    callers: usize,
    clients: Vec<ContextServiceClient<tonic::transport::Channel>>,
) -> Run {
    let per = args.turns_per_session;
    drive("gRPC", callers, args.seconds, move |c, i| {
        let mut client = clients[c % clients.len()].clone();
        async move {
            let key = session("grpc", c, i, per);
            if i % 2 == 0 {
                let turns = turns()
                    .into_iter()
                    .map(|t| pb::Turn {
                        role: t.role,
                        content: t.content,
                        token_count: t.token_count,
                        created_at: None,
                    })
                    .collect();
                client
                    .append_turns(pb::AppendTurnsRequest {
                        tenant: key.tenant,
                        session_id: key.session_id,
                        turns,
                        idempotency_key: format!("k{i}"),
                        ttl_seconds: None,
                    })
                    .await
                    .map(|_| ())
            } else {
                client
                    .get_history(pb::GetHistoryRequest {
                        tenant: key.tenant,
                        session_id: key.session_id,
                        max_turns: 0,
                        max_tokens: 0,
                    })
                    .await
                    .map(|_| ())
            }
            .map_err(|e| e.to_string())
        }
    })
    .await
}

#[tokio::main]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let client = redis::Client::open(args.redis_url.as_str()).map_err(|e| e.to_string())?;
    let conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("{}: {e}", args.redis_url))?;
    let redis_store: Arc<dyn SessionStore> = Arc::new(
        RedisStore::new(&args.redis_url, LIMITS, Duration::from_secs(2))
            .map_err(|e| e.to_string())?,
    );

    let limits = RequestLimits {
        max_turn_bytes: 64 * 1024,
        max_turns_per_append: 64,
        max_ttl: Duration::from_secs(86_400),
    };
    let server = moltbot_runtime::grpc::LocalServer::start(
        moltbot_context::grpc_service(redis_store.clone(), limits),
        async { Ok(()) },
        Duration::from_secs(2),
    )
    .await
    .map_err(|e| e.to_string())?;
    // Several HTTP/2 connections, as a gateway with a channel pool would hold.
    let mut clients = Vec::new();
    for _ in 0..args.connections.max(1) {
        let channel = server.channel().await.map_err(|e| e.to_string())?;
        clients.push(ContextServiceClient::new(channel));
    }

    let mut report = String::new();
    for callers in [1, args.clients] {
        let runs = vec![
            raw(&args, callers, conn.clone()).await,
            store(&args, callers, redis_store.clone()).await,
            grpc(&args, callers, clients.clone()).await,
        ];
        report.push_str(&format!(
            "\n## {callers} concurrent caller(s)\n\n| way | ops/s | p50 ms | p99 ms |\n|---|---|---|---|\n"
        ));
        for r in &runs {
            report.push_str(&format!(
                "| {} | {:.0} | {:.3} | {:.3} |\n",
                r.name,
                r.ops_s(),
                r.pct(0.5),
                r.pct(0.99)
            ));
        }
        let (raw, grpc) = (&runs[0], &runs[2]);
        report.push_str(&format!(
            "\nadded by the gRPC service over raw Redis: p50 {:+.3} ms, p99 {:+.3} ms\n",
            grpc.pct(0.5) - raw.pct(0.5),
            grpc.pct(0.99) - raw.pct(0.99)
        ));
    }
    server.shutdown().await.map_err(|e| e.to_string())?;
    println!(
        "# Context benchmark: {} s per way, AppendTurns (2 turns) and GetHistory alternating, a new session every {} turns",
        args.seconds, args.turns_per_session
    );
    println!("{report}");

    let url = url::Url::parse(&args.redis_url).ok();
    let host = url
        .as_ref()
        .and_then(|u| u.host_str().map(str::to_owned))
        .unwrap_or("127.0.0.1".into());
    let port = url.as_ref().and_then(|u| u.port()).unwrap_or(6379);
    match std::process::Command::new("redis-benchmark")
        .args([
            "-h",
            &host,
            "-p",
            &port.to_string(),
            "-c",
            &args.clients.to_string(),
        ])
        .args(["-n", "100000", "-t", "lpush,lrange_100", "-q"])
        .output()
    {
        Ok(out) if out.status.success() => {
            println!(
                "\nredis-benchmark -c {} -n 100000 -t lpush,lrange_100 (same server):",
                args.clients
            );
            for line in String::from_utf8_lossy(&out.stdout).split(['\r', '\n']) {
                let line = line.trim();
                if line.contains("requests per second") {
                    println!("    {line}");
                }
            }
        }
        _ => println!("\nredis-benchmark not installed: skipped"),
    }
    Ok(())
}
