//! The scheduler over a fake model (TGI's queue tests are the pattern):
//! admission under the KV budget, chunked prefill interleaved with decode,
//! cancellation giving blocks back, a prompt beyond the KV cache. No
//! weights, no tokenizer file: the fake's logits always pick token 1, so
//! every sequence runs to its `max_tokens`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;

use super::{Engine, EngineConfig, Event, Finish, ForwardPass, Job};
use crate::{GenerationError, sampling::SamplingConfig, text::ChatTokenizer};

/// What the fake model was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    /// A prefill chunk of `n` tokens of the sequence whose prompt starts
    /// with `first`.
    Prefill { first: u32, n: usize },
    /// A decode step over `batch` sequences.
    Decode { batch: usize },
}

const VOCAB: usize = 4;

/// One slot a token (one "byte" per token), token 1 always most likely;
/// each decode step takes `step_time`.
struct FakeModel {
    log: Arc<Mutex<Vec<Step>>>,
    step_time: Duration,
}

fn row() -> Vec<f32> {
    let mut r = vec![0.0; VOCAB];
    r[1] = 10.0;
    r
}

impl ForwardPass for FakeModel {
    type Pool = ();

    fn kv_bytes_per_token(&self) -> usize {
        1
    }

    fn new_pool(&self, _slots: usize) -> Result<(), GenerationError> {
        Ok(())
    }

    fn prefill(
        &self,
        ids: &[u32],
        start: usize,
        _pool: &mut (),
        slots: &[i64],
        logits: bool,
    ) -> Result<Option<Vec<f32>>, GenerationError> {
        assert_eq!(slots.len(), start + ids.len());
        self.log.lock().unwrap().push(Step::Prefill {
            first: ids[0],
            n: ids.len(),
        });
        Ok(logits.then(row))
    }

    fn decode(
        &self,
        tokens: &[u32],
        _pool: &mut (),
        slots: &[&[i64]],
    ) -> Result<Vec<Vec<f32>>, GenerationError> {
        assert_eq!(tokens.len(), slots.len());
        self.log.lock().unwrap().push(Step::Decode {
            batch: tokens.len(),
        });
        std::thread::sleep(self.step_time);
        Ok(tokens.iter().map(|_| row()).collect())
    }
}

/// A word-level tokenizer of the fake's four tokens, built in memory.
fn tokenizer() -> ChatTokenizer {
    use tokenizers::{models::wordlevel::WordLevel, pre_tokenizers::whitespace::Whitespace};
    let vocab: HashMap<String, u32> = [("<unk>", 0), ("a", 1), ("b", 2), ("<eos>", 3)]
        .into_iter()
        .map(|(t, i)| (t.to_owned(), i))
        .collect();
    let model = WordLevel::builder()
        .vocab(vocab.into_iter().collect())
        .unk_token("<unk>".to_owned())
        .build()
        .unwrap();
    let mut t = tokenizers::Tokenizer::new(model);
    t.with_pre_tokenizer(Some(Whitespace {}));
    ChatTokenizer::from_parts(
        t,
        "{% for m in messages %}{{ m.content }}{% endfor %}".to_owned(),
        vec![3],
        std::path::PathBuf::new(),
    )
    .unwrap()
}

struct Harness {
    engine: Engine,
    log: Arc<Mutex<Vec<Step>>>,
}

/// A scheduler over the fake with a KV cache of `kv_tokens` slots in
/// 16-token blocks and `prefill_chunk`.
fn harness(name: &str, kv_tokens: usize, prefill_chunk: usize) -> Harness {
    let log = Arc::new(Mutex::new(Vec::new()));
    let model = FakeModel {
        log: log.clone(),
        step_time: Duration::from_millis(1),
    };
    let config = EngineConfig {
        kv_cache_bytes: kv_tokens,
        block_size: 16,
        prefill_chunk,
        ..EngineConfig::DEFAULT
    };
    let engine = Engine::start(name, model, tokenizer(), config).unwrap();
    Harness { engine, log }
}

fn job(first: u32, prompt: usize, max_tokens: usize) -> (Job, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let mut prompt_ids = vec![2; prompt];
    prompt_ids[0] = first;
    (
        Job {
            prompt_ids,
            max_tokens,
            sampling: SamplingConfig::default(),
            stop: Vec::new(),
            received: Instant::now(),
            events: tx,
            constraint: None,
            logprobs: None,
        },
        rx,
    )
}

/// Reads events to the end: (completion tokens, finish) or the failure.
async fn finish(
    mut rx: mpsc::UnboundedReceiver<Event>,
) -> Result<(usize, Finish), GenerationError> {
    while let Some(event) = rx.recv().await {
        match event {
            Event::Finished { reason, usage } => return Ok((usage.completion_tokens, reason)),
            Event::Failed(e) => return Err(e),
            Event::Delta { .. } | Event::ToolCall { .. } => {}
        }
    }
    panic!("the scheduler dropped a sequence without an end");
}

#[tokio::test]
async fn a_request_waits_for_kv_budget_then_runs() {
    // 64 slots = 4 blocks; each request needs 20 + 20 tokens = 3 blocks,
    // so the second is held until the first gives its blocks back.
    let h = harness("test-admission", 64, 512);
    let (a, a_rx) = job(10, 20, 20);
    let (b, b_rx) = job(20, 20, 20);
    h.engine.submit(a).unwrap();
    h.engine.submit(b).unwrap();
    assert_eq!(finish(a_rx).await.unwrap(), (20, Finish::Length));
    assert_eq!(finish(b_rx).await.unwrap(), (20, Finish::Length));
    let log = h.log.lock().unwrap().clone();
    assert!(
        log.iter()
            .all(|s| !matches!(s, Step::Decode { batch } if *batch > 1)),
        "both ran at once: {log:?}"
    );
    let b_prefill = log
        .iter()
        .position(|s| matches!(s, Step::Prefill { first: 20, .. }))
        .unwrap();
    // A's 19 decode steps (its first token came from its prefill) all ran
    // before B was admitted.
    let a_decodes = log[..b_prefill]
        .iter()
        .filter(|s| matches!(s, Step::Decode { .. }))
        .count();
    assert_eq!(a_decodes, 19, "{log:?}");
    h.engine.shutdown();
}

#[tokio::test]
async fn requests_that_fit_share_decode_steps() {
    let h = harness("test-batching", 1024, 512);
    let mut rxs = Vec::new();
    for i in 0..4 {
        let (j, rx) = job(10 + i, 8, 30);
        h.engine.submit(j).unwrap();
        rxs.push(rx);
    }
    for rx in rxs {
        assert_eq!(finish(rx).await.unwrap(), (30, Finish::Length));
    }
    let log = h.log.lock().unwrap().clone();
    let widest = log
        .iter()
        .filter_map(|s| match s {
            Step::Decode { batch } => Some(*batch),
            Step::Prefill { .. } => None,
        })
        .max();
    assert_eq!(widest, Some(4), "{log:?}");
    h.engine.shutdown();
}

#[tokio::test]
async fn a_long_prompt_is_prefilled_in_chunks_between_decode_steps() {
    let h = harness("test-chunked", 1024, 8);
    // A decodes for a while; B's 40-token prompt arrives meanwhile.
    let (a, mut a_rx) = job(10, 4, 60);
    h.engine.submit(a).unwrap();
    loop {
        if let Some(Event::Delta { .. }) = a_rx.recv().await {
            break;
        }
    }
    let (b, b_rx) = job(20, 40, 4);
    h.engine.submit(b).unwrap();
    assert_eq!(finish(b_rx).await.unwrap(), (4, Finish::Length));
    assert_eq!(finish(a_rx).await.unwrap(), (60, Finish::Length));
    let log = h.log.lock().unwrap().clone();
    let chunks: Vec<usize> = log
        .iter()
        .enumerate()
        .filter(|(_, s)| {
            matches!(
                s,
                Step::Prefill { first: 20, .. } | Step::Prefill { first: 2, .. }
            )
        })
        .map(|(i, _)| i)
        .collect();
    // 40 tokens in chunks of at most 8: five chunks.
    assert_eq!(chunks.len(), 5, "{log:?}");
    for s in &log {
        if let Step::Prefill { n, .. } = s {
            assert!(*n <= 8, "{log:?}");
        }
    }
    // A decode step of the running stream between consecutive chunks.
    for pair in chunks.windows(2) {
        assert!(
            log[pair[0]..pair[1]]
                .iter()
                .any(|s| matches!(s, Step::Decode { .. })),
            "no decode between chunks: {log:?}"
        );
    }
    h.engine.shutdown();
}

#[tokio::test]
async fn a_cancelled_sequence_gives_its_blocks_back() {
    // 64 slots; A reserves all four blocks (10 + 50 tokens). Its caller
    // leaves after the first token; B, which needs the whole cache again,
    // can only run once A's blocks are back.
    let h = harness("test-cancel", 64, 512);
    let (a, mut a_rx) = job(10, 10, 50);
    h.engine.submit(a).unwrap();
    loop {
        if let Some(Event::Delta { .. }) = a_rx.recv().await {
            break;
        }
    }
    drop(a_rx);
    let (b, b_rx) = job(20, 10, 50);
    h.engine.submit(b).unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), finish(b_rx)).await;
    assert_eq!(done.unwrap().unwrap(), (50, Finish::Length));
    let log = h.log.lock().unwrap().clone();
    let a_decodes = log
        .iter()
        .take_while(|s| !matches!(s, Step::Prefill { first: 20, .. }))
        .filter(|s| matches!(s, Step::Decode { .. }))
        .count();
    assert!(a_decodes < 49, "A ran to its end: {a_decodes} steps");
    h.engine.shutdown();
}

#[tokio::test]
async fn a_prompt_beyond_the_kv_cache_fails_and_the_scheduler_goes_on() {
    let h = harness("test-kv-exhausted", 64, 512);
    let (big, big_rx) = job(10, 100, 10);
    h.engine.submit(big).unwrap();
    let err = finish(big_rx).await.unwrap_err();
    assert!(
        matches!(&err, GenerationError::InvalidArgument(m) if m.contains("exceeds the KV cache")),
        "{err:?}"
    );
    let (small, small_rx) = job(20, 10, 10);
    h.engine.submit(small).unwrap();
    assert_eq!(finish(small_rx).await.unwrap(), (10, Finish::Length));
    h.engine.shutdown();
}
