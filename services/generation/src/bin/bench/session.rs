//! Engine-level runs of the benchmark: concurrent streams, a multi-turn
//! session with and without the prefix cache, and running streams' inter-token
//! latency while a long prompt arrives (chunked prefill on and off).

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc as std_mpsc,
    },
    time::{Duration, Instant},
};

use moltbot_generation::{
    engine::{Engine, Event, Job},
    sampling::SamplingConfig,
    text::{ChatMessage, ChatTokenizer},
};
use tokio::sync::mpsc;

/// What one request produced.
pub struct Outcome {
    /// The answer's text.
    pub text: String,
    /// Completion tokens.
    pub tokens: usize,
    /// Submit → first delta.
    pub ttft: Duration,
    /// Arrival time of every delta and the tokens it carried.
    pub deltas: Vec<(Instant, usize)>,
}

/// Submits a greedy request; its receiver.
pub fn submit(
    engine: &Engine,
    prompt: &[u32],
    max_tokens: usize,
) -> Result<mpsc::UnboundedReceiver<Event>, String> {
    let (tx, rx) = mpsc::unbounded_channel();
    engine
        .submit(Job {
            prompt_ids: prompt.to_vec(),
            max_tokens,
            sampling: SamplingConfig::default(),
            stop: Vec::new(),
            received: Instant::now(),
            events: tx,
            constraint: None,
            logprobs: None,
        })
        .map_err(|e| e.to_string())?;
    Ok(rx)
}

/// Drains `rx` to the end.
pub fn collect(
    mut rx: mpsc::UnboundedReceiver<Event>,
    started: Instant,
) -> Result<Outcome, String> {
    let mut out = Outcome {
        text: String::new(),
        tokens: 0,
        ttft: Duration::ZERO,
        deltas: Vec::new(),
    };
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Delta {
                text, token_ids, ..
            } => {
                if out.deltas.is_empty() {
                    out.ttft = started.elapsed();
                }
                out.deltas.push((Instant::now(), token_ids.len()));
                out.text.push_str(&text);
            }
            Event::Finished { usage, .. } => {
                out.tokens = usage.completion_tokens;
                return Ok(out);
            }
            Event::Failed(e) => return Err(e.to_string()),
            Event::ToolCall { .. } => {}
        }
    }
    Err("the engine stopped".into())
}

/// Throughput of concurrent streams, tokens/s.
pub struct Throughput {
    /// Every completion token over the wall time from submitting all the
    /// prompts to the last token: prompts' prefill included.
    pub end_to_end: f64,
    /// Tokens delivered while every stream was decoding (from the last
    /// stream's first token to the first stream's last token) over that
    /// window: the steady-state decode rate, comparable with a single
    /// stream's decode tok/s.
    pub decode: f64,
}

/// Runs `prompts` concurrently, `tokens` completion tokens each (EOS is
/// not ignored by the engine, so a stream may end early; the window of
/// [`Throughput::decode`] ends at the first stream to finish).
pub fn concurrent(
    engine: &Engine,
    prompts: &[Vec<u32>],
    tokens: usize,
) -> Result<Throughput, String> {
    let started = Instant::now();
    let receivers = prompts
        .iter()
        .map(|p| submit(engine, p, tokens))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = std_mpsc::channel();
    for r in receivers {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let _ = tx.send(collect(r, started));
        });
    }
    drop(tx);
    let outcomes = rx.into_iter().collect::<Result<Vec<_>, _>>()?;
    let total: usize = outcomes.iter().map(|o| o.tokens).sum();
    let end_to_end = total as f64 / started.elapsed().as_secs_f64();
    let firsts = outcomes
        .iter()
        .filter_map(|o| o.deltas.first().map(|d| d.0));
    let lasts = outcomes.iter().filter_map(|o| o.deltas.last().map(|d| d.0));
    let (Some(from), Some(to)) = (firsts.max(), lasts.min()) else {
        return Err("a stream produced no tokens".into());
    };
    let window = to.saturating_duration_since(from).as_secs_f64();
    let in_window: usize = outcomes
        .iter()
        .flat_map(|o| &o.deltas)
        .filter(|(at, _)| *at > from && *at <= to)
        .map(|(_, n)| n)
        .sum();
    let decode = if window > 0.0 {
        in_window as f64 / window
    } else {
        end_to_end
    };
    Ok(Throughput { end_to_end, decode })
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage {
        role: role.into(),
        content: content.into(),
        ..Default::default()
    }
}

/// A product manual of about `tokens` tokens (repeated, numbered sections).
pub fn document(tokenizer: &ChatTokenizer, tokens: usize) -> String {
    let mut doc = String::new();
    let mut section = 1;
    loop {
        doc.push_str(&format!(
            "Section {section}. The model {section} pump moves up to {} litres per minute, \
             runs on 230 V, weighs {} kg and carries a {}-year warranty. Clean its filter \
             every {} weeks; replace the seal when the pressure drops below {} bar.\n",
            40 + section * 3,
            5 + section % 7,
            1 + section % 4,
            2 + section % 5,
            1 + section % 3
        ));
        section += 1;
        let n = tokenizer
            .encode_chat(&[msg("user", &doc)])
            .map(|ids| ids.len())
            .unwrap_or(usize::MAX);
        if n >= tokens {
            return doc;
        }
    }
}

/// Turn-3 time to first token of a three-turn session whose first message
/// carries a `history`-token manual, on `engine`: (turn-3 TTFT, turn-3
/// prompt tokens).
pub fn three_turns(
    engine: &Engine,
    tokenizer: &ChatTokenizer,
    history: usize,
    answer_tokens: usize,
) -> Result<(Duration, usize), String> {
    let mut chat = vec![
        msg(
            "system",
            "You answer questions about the manual below in one sentence.",
        ),
        msg(
            "user",
            &format!(
                "{}\nWhich pump is the lightest?",
                document(tokenizer, history)
            ),
        ),
    ];
    let questions = [
        "How often should I clean the filter of pump 3?",
        "And its warranty?",
    ];
    let mut last = (Duration::ZERO, 0);
    for turn in 0..3 {
        let prompt = tokenizer.encode_chat(&chat).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let out = collect(submit(engine, &prompt, answer_tokens)?, started)?;
        last = (out.ttft, prompt.len());
        if let Some(q) = questions.get(turn) {
            chat.push(msg("assistant", &out.text));
            chat.push(msg("user", q));
        }
    }
    Ok(last)
}

/// Inter-token gaps of `streams` running streams while a `long`-token
/// prompt is prefilled: (p99 gap, max gap, the long prompt's TTFT).
pub fn stall(
    engine: &Engine,
    tokenizer: &ChatTokenizer,
    streams: usize,
    long: usize,
) -> Result<(Duration, Duration, Duration), String> {
    // Counting never ends on its own, so no stream finishes mid-measurement.
    let short = tokenizer
        .encode_chat(&[msg("user", "Count from 1 to 5000, one number per line.")])
        .map_err(|e| e.to_string())?;
    let receivers = (0..streams)
        .map(|_| submit(engine, &short, 4096))
        .collect::<Result<Vec<_>, _>>()?;
    let (tx, rx) = std_mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let mut handles = Vec::new();
    for mut r in receivers {
        let tx = tx.clone();
        let stop = stop.clone();
        handles.push(std::thread::spawn(move || {
            let mut times = Vec::new();
            // Returning drops the receiver: the engine cancels the stream.
            while let Some(event) = r.blocking_recv() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                match event {
                    Event::Delta { .. } => {
                        times.push(Instant::now());
                        let _ = tx.send(());
                    }
                    Event::Finished { .. } | Event::Failed(_) => break,
                    Event::ToolCall { .. } => {}
                }
            }
            times
        }));
    }
    drop(tx);
    // Let every stream reach steady decoding.
    for _ in 0..streams * 8 {
        rx.recv_timeout(Duration::from_secs(120))
            .map_err(|_| "streams never started".to_string())?;
    }
    let long_prompt = tokenizer
        .encode_chat(&[msg(
            "user",
            &format!("{}\nSummarise.", document(tokenizer, long)),
        )])
        .map_err(|e| e.to_string())?;
    let arrived = Instant::now();
    let out = collect(submit(engine, &long_prompt, 1)?, arrived)?;
    let done = Instant::now();
    // One more step lets every stream show its gap after the prefill.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::SeqCst);
    let mut gaps = Vec::new();
    for h in handles {
        let times = h.join().map_err(|_| "stream thread panicked".to_string())?;
        for w in times.windows(2) {
            if w[1] > arrived && w[0] < done {
                gaps.push(w[1] - w[0]);
            }
        }
    }
    gaps.sort();
    let p99 = gaps
        .get((gaps.len() * 99).div_ceil(100).saturating_sub(1))
        .copied()
        .unwrap_or_default();
    let max = gaps.last().copied().unwrap_or_default();
    Ok((p99, max, out.ttft))
}
