//! `moltbot-retrieval-bench`: our HNSW index (USearch through
//! `CollectionIndex`) against FAISS `IndexHNSWFlat`, side by side in one run
//! on the same vectors with the same M and efConstruction, one thread each.
//!
//! For each size: `scripts/bench_faiss.py` generates clustered 384-d vectors
//! and queries, the exact top-10 (recall reference), and the FAISS figures;
//! then this binary builds our index on the same vectors and measures build
//! time, memory (RSS growth and the index's own figure), and queries/s with
//! recall@10 for each efSearch. Last, gRPC `Search` latency (p50/p99, one
//! caller, by vector, top 10) through the real service over the largest
//! index. Prints Markdown for `BENCHMARKS.md`.

use std::{
    collections::{BTreeMap, HashSet},
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use clap::Parser;
use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, SearchRequest, Vector,
    retrieval_service_client::RetrievalServiceClient, search_request::Query,
};
use moltbot_retrieval::{
    Args as ServiceArgs,
    index::{CollectionIndex, Entry, HnswParams},
};

/// Flags of the benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "moltbot-retrieval-bench",
    about = "Retrieval: ours vs FAISS HNSW"
)]
struct Args {
    /// Corpus sizes.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    sizes: Vec<usize>,
    /// Queries per size.
    #[arg(long, default_value_t = 1000)]
    queries: usize,
    /// HNSW M.
    #[arg(long, default_value_t = 16)]
    m: usize,
    /// HNSW efConstruction.
    #[arg(long, default_value_t = 128)]
    ef_construction: usize,
    /// efSearch values measured.
    #[arg(long, default_value = "16,32,64,128,256")]
    ef_search: String,
    /// Python with numpy and faiss-cpu.
    #[arg(long, env = "MOLTBOT_PYTHON", default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Directory of prepared models (the service's encoder, for the gRPC run).
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    models_dir: PathBuf,
    /// Storage of our graph's vectors.
    #[arg(long, value_enum, default_value = "f32")]
    quantization: moltbot_retrieval::index::Quantization,
    /// Candidates per hit re-ranked exactly (quantized graphs).
    #[arg(long, default_value_t = 4)]
    rerank: usize,
    /// Skip the gRPC latency run.
    #[arg(long)]
    no_grpc: bool,
}

fn rss_bytes() -> usize {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<usize>().ok())
        })
        .map_or(0, |pages| pages * 4096)
}

fn read_f32(path: &Path, dim: usize) -> Vec<Vec<f32>> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect::<Vec<f32>>()
        .chunks(dim)
        .map(<[f32]>::to_vec)
        .collect()
}

fn read_gt(path: &Path) -> Vec<HashSet<u64>> {
    let bytes = std::fs::read(path).unwrap_or_default();
    bytes
        .chunks_exact(4)
        .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as u64)
        .collect::<Vec<u64>>()
        .chunks(10)
        .map(|c| c.iter().copied().collect())
        .collect()
}

fn mb(bytes: f64) -> String {
    format!("{:.0} MB", bytes / 1e6)
}

struct Point {
    ef: usize,
    qps: f64,
    recall: f64,
}

fn best_at(points: &[Point], recall: f64) -> Option<&Point> {
    points
        .iter()
        .filter(|p| p.recall >= recall)
        .max_by(|a, b| a.qps.total_cmp(&b.qps))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), String> {
    let args = Args::parse();
    let efs: Vec<usize> = args
        .ef_search
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .map_err(|e| format!("--ef-search: {e}"))
        })
        .collect::<Result<_, _>>()?;
    println!(
        "| vectors | side | build (1 thread) | memory | efSearch | queries/s (1 thread) | recall@10 |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut last_index = None;
    for &n in &args.sizes {
        let dir = std::env::temp_dir().join(format!("moltbot-retrieval-bench-{n}"));
        let status = Command::new(&args.python)
            .arg("scripts/bench_faiss.py")
            .args([
                "--n",
                &n.to_string(),
                "--queries",
                &args.queries.to_string(),
            ])
            .args([
                "--m",
                &args.m.to_string(),
                "--ef-construction",
                &args.ef_construction.to_string(),
            ])
            .args(["--ef-search", &args.ef_search, "--out"])
            .arg(&dir)
            .stdout(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("cannot run {}: {e}", args.python.display()))?;
        if !status.success() {
            return Err(format!("scripts/bench_faiss.py failed with {status}"));
        }
        let faiss: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("faiss.json")).map_err(|e| e.to_string())?,
        )
        .map_err(|e| e.to_string())?;
        let base = read_f32(&dir.join("base.f32"), 384);
        let queries = read_f32(&dir.join("queries.f32"), 384);
        let gt = read_gt(&dir.join("gt.i32"));

        let before = rss_bytes();
        let params = HnswParams {
            m: args.m,
            ef_construction: args.ef_construction,
            ef_search: efs[0],
            quantization: args.quantization,
            rerank: args.rerank,
        };
        let mut index = CollectionIndex::new(384, params).map_err(|e| e.to_string())?;
        let empty_meta = Arc::new(BTreeMap::new());
        let doc: Arc<str> = Arc::from("d");
        let text: Arc<str> = Arc::from("");
        let started = Instant::now();
        for (i, v) in base.iter().enumerate() {
            index
                .add(
                    i as u64,
                    v,
                    Entry {
                        document_id: doc.clone(),
                        ordinal: i as u32,
                        text: text.clone(),
                        metadata: empty_meta.clone(),
                    },
                )
                .map_err(|e| e.to_string())?;
        }
        let build = started.elapsed();
        eprintln!("USearch kernels: {}", index.hardware_acceleration());
        let memory = rss_bytes().saturating_sub(before);
        let none = BTreeMap::new();
        let mut ours = Vec::new();
        for &ef in &efs {
            index.set_ef_search(ef);
            let t = Instant::now();
            let mut found = 0usize;
            for (q, truth) in queries.iter().zip(&gt) {
                let hits = index.search(q, 10, &none).map_err(|e| e.to_string())?;
                found += hits.iter().filter(|h| truth.contains(&h.key)).count();
            }
            let dt = t.elapsed().as_secs_f64();
            ours.push(Point {
                ef,
                qps: queries.len() as f64 / dt,
                recall: found as f64 / (10 * queries.len()) as f64,
            });
        }
        let theirs: Vec<Point> = faiss["results"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|r| Point {
                        ef: r["ef_search"].as_u64().unwrap_or(0) as usize,
                        qps: r["qps"].as_f64().unwrap_or(0.0),
                        recall: r["recall"].as_f64().unwrap_or(0.0),
                    })
                    .collect()
            })
            .unwrap_or_default();
        for (side, build_s, memory, points) in [
            (
                "MoltBot (USearch)",
                build.as_secs_f64(),
                memory as f64,
                &ours,
            ),
            (
                "FAISS IndexHNSWFlat",
                faiss["build_s"].as_f64().unwrap_or(0.0),
                faiss["memory_bytes"].as_f64().unwrap_or(0.0),
                &theirs,
            ),
        ] {
            for (i, p) in points.iter().enumerate() {
                let (b, m) = if i == 0 {
                    (format!("{build_s:.1} s"), mb(memory))
                } else {
                    (String::new(), String::new())
                };
                println!(
                    "| {n} | {side} | {b} | {m} | {} | {:.0} | {:.4} |",
                    p.ef, p.qps, p.recall
                );
            }
        }
        match (best_at(&ours, 0.95), best_at(&theirs, 0.95)) {
            (Some(o), Some(f)) => println!(
                "\n{n} vectors, recall@10 ≥ 0.95: ours {:.0} q/s (ef {}, recall {:.4}) vs FAISS {:.0} q/s (ef {}, recall {:.4}): {:.2}×\n",
                o.qps,
                o.ef,
                o.recall,
                f.qps,
                f.ef,
                f.recall,
                o.qps / f.qps
            ),
            _ => println!(
                "\n{n} vectors: one side never reached recall 0.95 at these efSearch values\n"
            ),
        }
        let _ = std::fs::remove_dir_all(&dir);
        last_index = Some((n, index, queries));
    }
    if args.no_grpc {
        return Ok(());
    }
    let Some((n, index, queries)) = last_index else {
        return Ok(());
    };
    grpc_latency(&args, n, index, &queries).await
}

/// gRPC `Search` latency through the real service (one caller, by vector,
/// top 10) over an index of `n` vectors.
async fn grpc_latency(
    args: &Args,
    n: usize,
    index: CollectionIndex,
    queries: &[Vec<f32>],
) -> Result<(), String> {
    let data = std::env::temp_dir().join(format!(
        "moltbot-retrieval-bench-grpc-{}",
        std::process::id()
    ));
    let service_args = <ServiceArgs as clap::Parser>::try_parse_from([
        "moltbot-retrieval".to_owned(),
        "--store".into(),
        "sqlite".into(),
        "--data-dir".into(),
        data.display().to_string(),
        "--models-dir".into(),
        args.models_dir.display().to_string(),
        "--exact-below".into(),
        "0".into(),
    ])
    .map_err(|e| e.to_string())?;
    let state = moltbot_retrieval::load(&service_args)
        .await
        .map_err(|e| e.to_string())?;
    let server = moltbot_runtime::grpc::LocalServer::start(
        moltbot_retrieval::grpc_service(state.clone()),
        async { Ok(()) },
        Duration::from_secs(2),
    )
    .await
    .map_err(|e| e.to_string())?;
    let channel = server.channel().await.map_err(|e| e.to_string())?;
    let mut client = RetrievalServiceClient::new(channel);
    client
        .create_collection(CreateCollectionRequest {
            name: "bench".into(),
            chunking: None,
        })
        .await
        .map_err(|e| e.to_string())?;
    // The benchmark's vectors go straight into the collection's index (the
    // store is not on the search path; embedding a million texts is not what
    // is measured here).
    {
        let collections = state.collections.read().map_err(|_| "lock".to_owned())?;
        let c = collections.get("bench").ok_or("no collection")?;
        let mut slot = c.index.write().map_err(|_| "lock".to_owned())?;
        *slot = index;
    }
    let mut latencies = Vec::with_capacity(queries.len());
    for round in 0..2 {
        for q in queries {
            let t = Instant::now();
            let r = client
                .search(SearchRequest {
                    collection: "bench".into(),
                    query: Some(Query::Vector(Vector { values: q.clone() })),
                    top_k: 10,
                    ..Default::default()
                })
                .await
                .map_err(|e| e.to_string())?;
            if round == 1 {
                latencies.push(t.elapsed());
            }
            debug_assert_eq!(r.into_inner().hits.len(), 10);
        }
    }
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "gRPC Search over {n} vectors (one caller, by vector, top 10, ef {}): p50 {:.2} ms, p99 {:.2} ms",
        HnswParams::default().ef_search,
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3
    );
    server.shutdown().await.map_err(|e| e.to_string())?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
