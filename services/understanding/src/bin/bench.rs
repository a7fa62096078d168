//! `moltbot-understanding-bench`: the encoder against Hugging Face
//! transformers, and Classify latency through gRPC, side by side in one run
//! with the same thread count.
//!
//! (a) sentences/s at batch 1 and batch 32 on 256 CLINC150 validation
//!     texts (every 11th, so lengths vary as in real traffic), ours in f32
//!     and bf16 mixed precision vs `scripts/reference_embed.py --bench` on
//!     the same texts (transformers in f32 and under bf16 autocast);
//! (b) Classify p50/p99 over a real socket under 1, 8 and 64 concurrent
//!     callers, through the dynamic batcher (needs a trained head:
//!     `--head-dir`).

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use moltbot_encoder::{BatchConfig, Batcher, Encoder, Precision};
use moltbot_proto::understanding::v1::{
    self as pb, understanding_service_client::UnderstandingServiceClient,
    understanding_service_server::UnderstandingServiceServer,
};
use moltbot_understanding::{
    head::IntentHead,
    service::{Classifier, Limits, UnderstandingApi},
};

/// Flags of the benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "moltbot-understanding-bench",
    about = "Understanding: ours vs transformers"
)]
struct Args {
    /// The encoder directory.
    #[arg(long, default_value = "var/models/all-minilm-l6-v2")]
    encoder_dir: PathBuf,
    /// A trained head, for the Classify runs.
    #[arg(long, default_value = "var/models/intent-head")]
    head_dir: PathBuf,
    /// Threads for both sides; 0 = every core.
    #[arg(long, default_value_t = 0)]
    threads: usize,
    /// libtorch threads of the service in the Classify runs; 0 = the
    /// service's default (every core but one).
    #[arg(long, default_value_t = 0)]
    service_threads: usize,
    /// Seconds per Classify run.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// CLINC150-format data whose `val` texts are embedded.
    #[arg(
        long,
        default_value = "services/understanding/data/clinc150/data_full_train_val.json"
    )]
    data: PathBuf,
    /// Python with torch + transformers.
    #[arg(long, env = "MOLTBOT_PYTHON", default_value = ".venv/bin/python")]
    python: PathBuf,
    /// Arithmetic of the service in the Classify runs: `auto`, `f32`, `bf16`.
    #[arg(
        long,
        env = "MOLTBOT_ENCODER_PRECISION",
        default_value = "auto",
        value_parser = Precision::parse_cpu
    )]
    precision: Precision,
}

/// 256 `val` texts of `data`: every 11th, cycling.
fn texts(data: &std::path::Path) -> Result<Vec<String>, String> {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data).map_err(|e| format!("{}: {e}", data.display()))?,
    )
    .map_err(|e| format!("{}: {e}", data.display()))?;
    let val: Vec<String> = json["val"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| p[0].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if val.is_empty() {
        return Err(format!("{}: no `val` texts", data.display()));
    }
    Ok((0..256)
        .map(|i| val[(i * 11) % val.len()].clone())
        .collect())
}

fn ours(encoder: &Encoder, all: &[String], batch: usize) -> Result<f64, String> {
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    encoder.embed(&refs[..batch]).map_err(|e| e.to_string())?; // warm-up
    let n = if batch == 1 { 64 } else { 256 };
    let started = Instant::now();
    for i in (0..n).step_by(batch) {
        encoder
            .embed(&refs[i % 256..(i % 256 + batch).min(256)])
            .map_err(|e| e.to_string())?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// Mean µs per text of [`IntentHead::classify`] (both heads' softmax and
/// the nearest-neighbour scan) on the head's own encoder's embeddings of
/// `all`; the cascade's second opinion excluded.
fn head_cost(head_dir: &std::path::Path, base: &Encoder, all: &[String]) -> Result<f64, String> {
    let head = IntentHead::load(head_dir, base.dimension()).map_err(|e| e.to_string())?;
    let own = match head.encoder_dir() {
        Some(dir) => Some(
            Encoder::load_with(&dir, base.device(), base.precision()).map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let embedded = own
        .as_ref()
        .unwrap_or(base)
        .embed(&refs)
        .map_err(|e| e.to_string())?;
    let started = Instant::now();
    for e in &embedded {
        head.classify(e, 5).map_err(|e| e.to_string())?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / embedded.len() as f64)
}

fn pct(v: &mut [u64], p: f64) -> f64 {
    v.sort_unstable();
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len().max(1)) - 1;
    v.get(i).copied().unwrap_or_default() as f64 / 1000.0
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    tch::set_num_threads(threads as i32);
    let precision = args.precision;
    let all = texts(&args.data)?;
    let mut rates = Vec::new();
    let mut encoders = Vec::new();
    for p in [Precision::F32, Precision::Bf16] {
        let encoder = Encoder::load_with(&args.encoder_dir, tch::Device::Cpu, p)
            .map_err(|e| e.to_string())?;
        rates.push((ours(&encoder, &all, 1)?, ours(&encoder, &all, 32)?));
        encoders.push(encoder);
    }
    // The service's encoder is the one measured in its precision.
    let chosen = usize::from(precision == Precision::Bf16);
    let encoder = encoders.swap_remove(chosen);
    drop(encoders);
    let texts_file =
        std::env::temp_dir().join(format!("moltbot-bench-{}.json", std::process::id()));
    std::fs::write(
        &texts_file,
        serde_json::to_string(&all).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/reference_embed.py");
    let out = std::process::Command::new(&args.python)
        .arg(script)
        .arg("--model")
        .arg(&args.encoder_dir)
        .arg("--texts")
        .arg(&texts_file)
        .args(["--bench", "--threads", &threads.to_string()])
        .output()
        .map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&texts_file);
    let line = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_owned();
    let reference: serde_json::Value =
        serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
    let rate = |key: &str| reference[key].as_f64().unwrap_or(f64::NAN);
    println!("# Understanding benchmark: {threads} threads, service in {precision}\n");
    println!(
        "| batch | ours f32 | ours bf16 | transformers f32 | transformers bf16 autocast | ours {precision} / transformers f32 |"
    );
    println!("|---|---|---|---|---|---|");
    for (i, batch) in [1, 32].into_iter().enumerate() {
        let of = |r: &(f64, f64)| if i == 0 { r.0 } else { r.1 };
        let reference_f32 = rate(&format!("batch{batch}_per_s"));
        println!(
            "| {batch} | {:.1} | {:.1} | {reference_f32:.1} | {:.1} | {:.2}× |",
            of(&rates[0]),
            of(&rates[1]),
            rate(&format!("batch{batch}_bf16_per_s")),
            of(&rates[chosen]) / reference_f32
        );
    }
    println!(
        "\nhead after the encoder (probabilities, nearest-neighbour rule): {:.1} µs/text",
        head_cost(&args.head_dir, &encoder, &all)?
    );

    let service_threads = moltbot_encoder::serving_threads(args.service_threads);
    tch::set_num_threads(service_threads as i32);
    let runtime = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    runtime.block_on(async move {
        let batch = BatchConfig {
            max_batch: 32,
            max_wait: Duration::from_millis(2),
            queue_capacity: 1024,
        };
        let batcher = Batcher::start(encoder, batch).map_err(|e| e.to_string())?;
        let classifier =
            Classifier::load(&args.head_dir, &batcher, batch).map_err(|e| e.to_string())?;
        let api = UnderstandingApi::new(
            batcher,
            Some(classifier),
            args.head_dir.clone(),
            Limits {
                max_texts: 256,
                max_text_bytes: 16 * 1024,
            },
            batch,
        );
        let server = moltbot_runtime::grpc::LocalServer::start(
            moltbot_runtime::grpc::GrpcService::new(UnderstandingServiceServer::new(api)),
            async { Ok(()) },
            Duration::from_secs(1),
        )
        .await
        .map_err(|e| e.to_string())?;
        let channel = server.channel().await.map_err(|e| e.to_string())?;
        let client = UnderstandingServiceClient::new(channel);
        println!("\nClassify through gRPC, service with {service_threads} libtorch thread(s):\n");
        println!("| callers | Classify/s | p50 ms | p99 ms |");
        println!("|---|---|---|---|");
        for callers in [1usize, 8, 64] {
            let deadline = Instant::now() + Duration::from_secs(args.seconds);
            let started = Instant::now();
            let mut tasks = Vec::new();
            for c in 0..callers {
                let mut client = client.clone();
                let all = all.clone();
                tasks.push(tokio::spawn(async move {
                    let mut lat = Vec::new();
                    let mut i = 0;
                    while Instant::now() < deadline {
                        let t = Instant::now();
                        let text = all[(c * 7 + i) % all.len()].clone();
                        if client
                            .classify(pb::ClassifyRequest { text, top_k: 0 })
                            .await
                            .is_err()
                        {
                            break;
                        }
                        lat.push(t.elapsed().as_micros() as u64);
                        i += 1;
                    }
                    lat
                }));
            }
            let mut lat = Vec::new();
            for t in tasks {
                lat.extend(t.await.unwrap_or_default());
            }
            let rate = lat.len() as f64 / started.elapsed().as_secs_f64();
            println!(
                "| {callers} | {rate:.0} | {:.2} | {:.2} |",
                pct(&mut lat, 0.5),
                pct(&mut lat, 0.99)
            );
        }
        drop(client);
        server.shutdown().await.map_err(|e| e.to_string())
    })
}
