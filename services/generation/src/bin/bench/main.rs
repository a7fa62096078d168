//! `moltbot-generation-bench`: our local generation against llama.cpp
//! (llama-cpp-python on the same Q4_K_M GGUF that `make models` assembles,
//! the same prompt ids and thread count), side by side in one run:
//!
//! 1. single stream at every `--dtypes` entry and llama.cpp: time to first
//!    token (prefill of the chat prompt + first token, ms), decode tokens/s
//!    over `--new-tokens` greedy tokens (EOS ignored on both sides, best of
//!    3), peak RSS (ours per dtype: `VmHWM` reset before each load);
//! 2. aggregate tokens/s of the continuous-batching engine at 1, 4, 8 and
//!    16 concurrent streams, per `--batch-dtypes` entry;
//! 3. a three-turn session whose first message carries a `--history`-token
//!    manual: turn-3 time to first token with the prefix cache and without;
//! 4. p99 and max inter-token gap of 4 running streams while a
//!    `--long-prompt`-token prompt arrives, with chunked prefill and without.
//!
//! Prints Markdown tables for `BENCHMARKS.md`; `make bench-generation` runs
//! it (and installs llama-cpp-python, which only this benchmark needs).

mod llama;
mod session;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use clap::Parser;
use moltbot_generation::{
    engine::{Engine, EngineConfig},
    model::{Decoder, Precision},
    sampling::argmax,
    text::{ChatMessage, ChatTokenizer},
};
use tch::{Device, Kind};

/// Flags of the benchmark.
#[derive(Debug, Parser)]
#[command(
    name = "moltbot-generation-bench",
    about = "Generation: ours vs llama.cpp"
)]
struct Args {
    /// The prepared model directory.
    #[arg(long, env = "MOLTBOT_BENCH_MODEL_DIR")]
    model_dir: PathBuf,
    /// The GGUF llama.cpp runs (default: `<model-dir>.gguf`, where `make
    /// models` assembles it).
    #[arg(long, env = "MOLTBOT_BENCH_GGUF")]
    gguf: Option<PathBuf>,
    /// Python with llama-cpp-python; unset: no llama.cpp column.
    #[arg(long, env = "MOLTBOT_LLAMA_PYTHON")]
    llama_python: Option<PathBuf>,
    /// Intra-op threads for both sides; 0 = every core.
    #[arg(long, env = "MOLTBOT_BENCH_THREADS", default_value_t = 0)]
    threads: usize,
    /// Greedy tokens per single-stream run.
    #[arg(long, env = "MOLTBOT_BENCH_NEW_TOKENS", default_value_t = 64)]
    new_tokens: usize,
    /// Tokens per stream in the concurrency runs.
    #[arg(long, env = "MOLTBOT_BENCH_STREAM_TOKENS", default_value_t = 64)]
    stream_tokens: usize,
    /// Dtypes of the single-stream comparison.
    #[arg(
        long,
        env = "MOLTBOT_BENCH_DTYPES",
        value_delimiter = ',',
        default_value = "f32,bf16,int8,int4"
    )]
    dtypes: Vec<String>,
    /// Concurrent streams of the batching runs.
    #[arg(
        long,
        env = "MOLTBOT_BENCH_CONCURRENCY",
        value_delimiter = ',',
        default_value = "1,4,8,16"
    )]
    concurrency: Vec<usize>,
    /// Dtypes of the batching, session and stall runs.
    #[arg(
        long,
        env = "MOLTBOT_BENCH_BATCH_DTYPES",
        value_delimiter = ',',
        default_value = "int4,bf16"
    )]
    batch_dtypes: Vec<String>,
    /// Tokens of the session's first-turn manual.
    #[arg(long, env = "MOLTBOT_BENCH_HISTORY", default_value_t = 1024)]
    history: usize,
    /// Tokens of the long prompt of the stall run; 0 skips it.
    #[arg(long, env = "MOLTBOT_BENCH_LONG_PROMPT", default_value_t = 4096)]
    long_prompt: usize,
}

/// Timed runs per side and dtype; the best is reported.
const REPEATS: usize = 3;

const PROMPT: &str =
    "Write a detailed essay about the history of computing, from the abacus to modern GPUs.";

fn precision(dtype: &str) -> Result<Precision, String> {
    match dtype {
        "f32" => Ok(Kind::Float.into()),
        "bf16" => Ok(Kind::BFloat16.into()),
        "int8" => Ok(Precision::INT8),
        "int4" => Ok(Precision::INT4),
        other => Err(format!("dtype {other:?} is not f32, bf16, int8 or int4")),
    }
}

/// Greedy decode of `n` tokens, EOS ignored: (time to first token, decode tok/s).
fn single_stream(decoder: &Decoder, prompt: &[u32], n: usize) -> Result<llama::Single, String> {
    let run = |n: usize| -> Result<(Duration, Duration), String> {
        let started = Instant::now();
        let mut cache = decoder
            .new_cache(prompt.len() + n)
            .map_err(|e| e.to_string())?;
        let logits = decoder
            .prefill(prompt, &mut cache, false)
            .map_err(|e| e.to_string())?;
        let row = Vec::<f32>::try_from(logits.view([-1])).map_err(|e| e.to_string())?;
        let mut next = argmax(&row);
        let ttft = started.elapsed();
        for _ in 1..n {
            let logits = decoder
                .decode(next, &mut cache)
                .map_err(|e| e.to_string())?;
            let row = Vec::<f32>::try_from(logits.view([-1])).map_err(|e| e.to_string())?;
            next = argmax(&row);
        }
        Ok((ttft, started.elapsed() - ttft))
    };
    run(4)?; // warm-up: allocator, kernels
    // Best of REPEATS, as the llama.cpp script does: this VM's neighbours
    // add noise that only ever slows a run down.
    let mut best = (Duration::MAX, Duration::MAX);
    for _ in 0..REPEATS {
        let (ttft, decode) = run(n)?;
        best = (best.0.min(ttft), best.1.min(decode));
    }
    Ok(llama::Single {
        ttft_ms: best.0.as_secs_f64() * 1e3,
        decode_tok_s: (n - 1) as f64 / best.1.as_secs_f64(),
        peak_rss_mib: llama::peak_rss_mib(),
    })
}

fn chat(text: &str) -> Vec<ChatMessage> {
    vec![ChatMessage {
        role: "user".into(),
        content: text.into(),
        ..Default::default()
    }]
}

/// Runs `f` on a thread of its own that ends with it. libgomp keeps a
/// pool of OpenMP workers per thread that ran a parallel op, and once more
/// such workers exist than cores it shortens their spin-wait to almost
/// nothing, so every parallel op pays a futex wake-up (engine/mod.rs,
/// "One OpenMP pool"). Loading a model and the single-stream runs happen on
/// such short-lived threads, as the service loads its models, so that the
/// engine's scheduler thread owns the only pool while it runs.
///
/// OpenMP's thread count is per thread, so the caller's carries over.
fn on_own_thread<T: Send>(f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let threads = tch::get_num_threads();
    std::thread::scope(|s| {
        s.spawn(|| {
            tch::set_num_threads(threads);
            f()
        })
        .join()
    })
    .map_err(|_| "a benchmark thread panicked".into())
}

fn engine(args: &Args, dtype: &str, config: EngineConfig) -> Result<Engine, String> {
    let precision = precision(dtype)?;
    let decoder = on_own_thread(|| Decoder::load_with(&args.model_dir, Device::Cpu, precision))?
        .map_err(|e| e.to_string())?;
    let tokenizer =
        ChatTokenizer::load(&args.model_dir, vec![151645, 151643]).map_err(|e| e.to_string())?;
    Engine::start("bench", decoder, tokenizer, config).map_err(|e| e.to_string())
}

fn main() -> Result<(), String> {
    let args = Args::parse();
    let threads = if args.threads > 0 {
        args.threads
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    tch::set_num_threads(threads as i32);
    let tokenizer =
        ChatTokenizer::load(&args.model_dir, vec![151645, 151643]).map_err(|e| e.to_string())?;
    let prompt = tokenizer
        .encode_chat(&chat(PROMPT))
        .map_err(|e| e.to_string())?;
    println!(
        "# Generation benchmark: {threads} threads, prompt {} tokens, {} new tokens (greedy, EOS ignored)\n",
        prompt.len(),
        args.new_tokens
    );

    // 1. Single stream.
    println!("| engine | TTFT ms | decode tok/s | vs llama.cpp | peak RSS MiB |");
    println!("|---|---|---|---|---|");
    let gguf = args
        .gguf
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("{}.gguf", args.model_dir.display())));
    let reference = match &args.llama_python {
        Some(python) => {
            let r = llama::run(python, &gguf, &prompt, args.new_tokens, threads, REPEATS)?;
            println!(
                "| llama.cpp Q4_K_M ({}) | {:.0} | {:.2} | 1.00× | {:.0} |",
                gguf.file_name()
                    .map(|f| f.to_string_lossy())
                    .unwrap_or_default(),
                r.ttft_ms,
                r.decode_tok_s,
                r.peak_rss_mib
            );
            Some(r)
        }
        None => None,
    };
    for dtype in args.dtypes.iter().filter(|d| !d.is_empty()) {
        llama::reset_peak_rss();
        let precision = precision(dtype)?;
        let ours = on_own_thread(|| {
            let decoder = Decoder::load_with(&args.model_dir, Device::Cpu, precision)
                .map_err(|e| e.to_string())?;
            single_stream(&decoder, &prompt, args.new_tokens)
        })??;
        let vs = reference.map_or("–".into(), |r| {
            format!("{:.2}×", ours.decode_tok_s / r.decode_tok_s)
        });
        println!(
            "| MoltBot {dtype} | {:.0} | {:.2} | {vs} | {:.0} |",
            ours.ttft_ms, ours.decode_tok_s, ours.peak_rss_mib
        );
    }

    // 2. Concurrent streams.
    let max = args.concurrency.iter().copied().max().unwrap_or(1);
    let batch_config = EngineConfig {
        max_batch_size: max,
        queue_capacity: 4 * max,
        // Each concurrency level starts from a cold cache: the streams'
        // prompts differ, but their chat template's system prompt does not.
        prefix_caching: false,
        ..EngineConfig::DEFAULT
    };
    let topics = [
        "the ocean",
        "volcanoes",
        "the Roman empire",
        "quantum computing",
        "bees",
        "jazz",
        "glaciers",
        "chess",
    ];
    for dtype in &args.batch_dtypes {
        let engine = engine(&args, dtype, batch_config)?;
        println!(
            "\n| streams ({dtype}) | decode tok/s, all streams running | vs llama.cpp single stream | end-to-end tok/s (prefill included) | vs 1 stream |"
        );
        println!("|---|---|---|---|---|");
        let warm = tokenizer.encode_chat(&chat("Hello!")).unwrap_or_default();
        session::concurrent(&engine, &[warm], 4)?;
        let mut single = None;
        for &n in &args.concurrency {
            let prompts: Vec<Vec<u32>> = (0..n)
                .map(|i| {
                    let text = format!(
                        "Write a long, detailed essay about {} (part {}).",
                        topics[i % topics.len()],
                        i / topics.len() + 1
                    );
                    tokenizer.encode_chat(&chat(&text)).unwrap_or_default()
                })
                .collect();
            let t = session::concurrent(&engine, &prompts, args.stream_tokens)?;
            let base = *single.get_or_insert(t.end_to_end);
            let vs = reference.map_or("–".into(), |r| {
                format!("{:.2}×", t.decode / r.decode_tok_s)
            });
            println!(
                "| {n} | {:.2} | {vs} | {:.2} | {:.2}× |",
                t.decode,
                t.end_to_end,
                t.end_to_end / base
            );
        }
        engine.shutdown();
    }

    // 3. Three-turn session, turn-3 TTFT with and without the prefix cache.
    println!(
        "\n| session: {}-token history, turn 3 | dtype | turn-3 prompt tokens | TTFT ms | with cache / without |",
        args.history
    );
    println!("|---|---|---|---|---|");
    for dtype in &args.batch_dtypes {
        let mut ttft = Vec::new();
        for caching in [false, true] {
            let config = EngineConfig {
                prefix_caching: caching,
                ..EngineConfig::DEFAULT
            };
            let engine = engine(&args, dtype, config)?;
            let (t, len) = session::three_turns(&engine, &tokenizer, args.history, 24)?;
            engine.shutdown();
            let ms = t.as_secs_f64() * 1e3;
            let ratio = ttft.first().map_or("".to_string(), |&w: &f64| {
                format!("{:.0} %", 100.0 * ms / w)
            });
            println!(
                "| {} | {dtype} | {len} | {ms:.0} | {ratio} |",
                if caching {
                    "prefix cache"
                } else {
                    "no prefix cache"
                }
            );
            ttft.push(ms);
        }
    }

    // 4. Running streams while a long prompt arrives.
    if args.long_prompt > 0 {
        println!(
            "\n| {}-token prompt arrives during 4 streams | dtype | p99 inter-token ms | max inter-token ms | long prompt TTFT ms |",
            args.long_prompt
        );
        println!("|---|---|---|---|---|");
        for dtype in &args.batch_dtypes {
            for chunk in [usize::MAX, EngineConfig::DEFAULT.prefill_chunk] {
                let config = EngineConfig {
                    prefill_chunk: chunk,
                    prefix_caching: false,
                    ..EngineConfig::DEFAULT
                };
                let engine = engine(&args, dtype, config)?;
                let (p99, max, ttft) = session::stall(&engine, &tokenizer, 4, args.long_prompt)?;
                engine.shutdown();
                let name = if chunk == usize::MAX {
                    "whole prefill".to_string()
                } else {
                    format!("chunked prefill ({chunk} tokens)")
                };
                println!(
                    "| {name} | {dtype} | {:.0} | {:.0} | {:.0} |",
                    p99.as_secs_f64() * 1e3,
                    max.as_secs_f64() * 1e3,
                    ttft.as_secs_f64() * 1e3
                );
            }
        }
    }
    if let Some(r) = reference {
        println!(
            "\nllama.cpp single stream: {:.2} tok/s; targets: single stream ≥ 1.0×, 8 streams ≥ 3×, turn-3 TTFT with cache ≤ 30 %",
            r.decode_tok_s
        );
    }
    Ok(())
}
