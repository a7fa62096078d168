//! The paged KV cache, prefix caching and chunked prefill on the real model
//! (f32): logits computed after a cached prefix, or chunk by chunk, must
//! equal a whole prefill's; a block cached for one prefix must never serve
//! another — and the check is shown to fail when it would; the scheduler's
//! second turn of a conversation reuses the first turn's blocks and answers
//! exactly as without the cache.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

mod common;

use std::{
    sync::{Mutex, MutexGuard, OnceLock},
    time::Instant,
};

use moltbot_generation::{
    engine::{Engine, EngineConfig, Event, Job},
    kv::{BlockManager, BlockTable, KvPool},
    metrics::metrics,
    model::Decoder,
    sampling::SamplingConfig,
    text::{ChatMessage, ChatTokenizer},
};
use tch::{Device, Kind, Tensor};

const BLOCK: usize = 16;

/// The f32 model, loaded once; tests holding it run one at a time.
fn decoder() -> MutexGuard<'static, Decoder> {
    static D: OnceLock<Mutex<Decoder>> = OnceLock::new();
    D.get_or_init(|| {
        Mutex::new(Decoder::load(&common::model_dir(), Device::Cpu, Kind::Float).unwrap())
    })
    .lock()
    .unwrap_or_else(|e| e.into_inner())
}

fn tokenizer() -> ChatTokenizer {
    ChatTokenizer::load(&common::model_dir(), vec![151645, 151643]).unwrap()
}

fn chat(turns: &[(&str, &str)]) -> Vec<ChatMessage> {
    turns
        .iter()
        .map(|(role, content)| ChatMessage {
            role: (*role).into(),
            content: (*content).into(),
            ..Default::default()
        })
        .collect()
}

/// Last-position logits of a whole prefill in a private cache.
fn reference(d: &Decoder, ids: &[u32]) -> Vec<f32> {
    let mut cache = d.new_cache(ids.len()).unwrap();
    rows(&d.prefill(ids, &mut cache, false).unwrap())
}

fn rows(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(t.view([-1])).unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// A pool and its block manager, as the scheduler holds them.
struct Paged<'a> {
    decoder: &'a Decoder,
    pool: KvPool,
    blocks: BlockManager,
}

impl<'a> Paged<'a> {
    fn new(decoder: &'a Decoder, blocks: usize) -> Self {
        Self {
            decoder,
            pool: decoder.new_pool(blocks * BLOCK).unwrap(),
            blocks: BlockManager::new(blocks, BLOCK),
        }
    }

    /// Admits `ids` (prefix caching on), prefills what is not cached in
    /// chunks of `chunk`, and returns (cached positions, last logits, table).
    fn prefill(&mut self, ids: &[u32], chunk: usize) -> (usize, Vec<f32>, BlockTable) {
        let mut table = BlockTable::admit(&mut self.blocks, ids, 0, true).unwrap();
        let cached = table.cached();
        let mut logits = Vec::new();
        while table.len() < ids.len() {
            let start = table.len();
            let n = chunk.min(ids.len() - start);
            let slots = table.reserve(&mut self.blocks, n).unwrap();
            let out = self
                .decoder
                .forward(&ids[start..start + n], start, &mut self.pool, slots, false)
                .unwrap();
            table.commit(&mut self.blocks, n, ids);
            logits = rows(&out);
        }
        (cached, logits, table)
    }
}

fn conversation() -> (Vec<u32>, Vec<u32>, Vec<u32>) {
    let tok = tokenizer();
    let turn1 = tok
        .encode_chat(&chat(&[
            ("system", "You are a careful assistant for a hardware shop. Answer in one short sentence and never invent prices."),
            ("user", "Do you sell cordless drills, and which brands do you carry?"),
        ]))
        .unwrap();
    let turn2 = tok
        .encode_chat(&chat(&[
            ("system", "You are a careful assistant for a hardware shop. Answer in one short sentence and never invent prices."),
            ("user", "Do you sell cordless drills, and which brands do you carry?"),
            ("assistant", "Yes, we carry cordless drills from several major brands."),
            ("user", "Which one is best for drilling into concrete?"),
        ]))
        .unwrap();
    // Same blocks after the first, different first block.
    let mut other = turn2.clone();
    other[3] = tok.encode_chat(&chat(&[("user", "x")])).unwrap()[3] + 1;
    (turn1, turn2, other)
}

#[test]
fn logits_after_a_cached_prefix_equal_a_whole_prefill() {
    let (turn1, turn2, _) = conversation();
    let d = decoder();
    let mut paged = Paged::new(&d, 64);
    let (cached, _, mut t1) = paged.prefill(&turn1, 512);
    assert_eq!(cached, 0);
    t1.release(&mut paged.blocks);
    let (cached, logits, mut t2) = paged.prefill(&turn2, 512);
    // turn1's full blocks are a prefix of turn2 (the chat template only
    // appends), so all of them are reused.
    assert_eq!(
        cached,
        turn1.len() / BLOCK * BLOCK,
        "cached {cached} of {}",
        turn1.len()
    );
    assert!(cached >= 2 * BLOCK);
    let diff = max_diff(&logits, &reference(&d, &turn2));
    assert!(diff < 1e-3, "max logit difference {diff}");
    t2.release(&mut paged.blocks);
}

#[test]
fn chunked_prefill_equals_a_whole_prefill() {
    let (_, turn2, _) = conversation();
    let d = decoder();
    let mut paged = Paged::new(&d, 64);
    // 7 does not divide the block size: chunks straddle block boundaries.
    let (_, logits, _) = paged.prefill(&turn2, 7);
    let diff = max_diff(&logits, &reference(&d, &turn2));
    assert!(diff < 1e-3, "max logit difference {diff}");
}

/// One batched decode step over sequences of different lengths — one of
/// them reading shared cached blocks, so its slots are not consecutive —
/// gives each the logits of its own whole prefill: the padded gather and
/// its mask leak nothing between rows.
#[test]
fn a_batched_decode_step_equals_each_sequence_alone() {
    let (turn1, turn2, other) = conversation();
    let d = decoder();
    let mut paged = Paged::new(&d, 128);
    let mut seqs = Vec::new();
    for ids in [&turn1, &turn2, &other] {
        let (cached, logits, table) = paged.prefill(ids, 512);
        let next = moltbot_generation::sampling::argmax(&logits);
        seqs.push((ids.to_vec(), cached, next, table));
    }
    assert!(seqs[1].1 > 0, "turn 2 shares turn 1's blocks");
    assert!(turn1.len() != turn2.len() && turn2.len() == other.len());
    let tokens: Vec<u32> = seqs.iter().map(|s| s.2).collect();
    for s in &mut seqs {
        s.3.reserve(&mut paged.blocks, 1).unwrap();
    }
    let slots: Vec<&[i64]> = seqs.iter().map(|s| s.3.slots()).collect();
    let out = d.decode_paged(&tokens, &mut paged.pool, &slots).unwrap();
    assert_eq!(out.size(), [3, d.config().vocab_size as i64]);
    for (i, (ids, _, next, _)) in seqs.iter().enumerate() {
        let mut whole = ids.clone();
        whole.push(*next);
        let diff = max_diff(&rows(&out.get(i as i64)), &reference(&d, &whole));
        assert!(diff < 1e-3, "sequence {i}: max logit difference {diff}");
    }
}

#[test]
fn a_cached_block_never_serves_a_different_prefix() {
    let (_, turn2, other) = conversation();
    let d = decoder();
    let mut paged = Paged::new(&d, 64);
    let (_, _, mut t) = paged.prefill(&turn2, 512);
    t.release(&mut paged.blocks);
    // `other` differs only in its first block: no block may be reused, even
    // though every later block holds the same tokens.
    let (cached, logits, _) = paged.prefill(&other, 512);
    assert_eq!(cached, 0);
    let right = reference(&d, &other);
    assert!(max_diff(&logits, &right) < 1e-3);

    // The check has teeth: serving `other` from turn2's cached blocks (what
    // a key of the block's own tokens alone would do) gives other logits.
    let mut wrong = Paged::new(&d, 64);
    let (_, _, mut t) = wrong.prefill(&turn2, 512);
    let reused = (other.len() - 1) / BLOCK * BLOCK;
    let slots: Vec<i64> = t.reserve(&mut wrong.blocks, 0).unwrap()[..reused].to_vec();
    let mut all = slots.clone();
    all.extend((0..(other.len() - reused) as i64).map(|i| 63 * BLOCK as i64 + i));
    let bad = d
        .forward(&other[reused..], reused, &mut wrong.pool, &all, false)
        .unwrap();
    let diff = max_diff(&rows(&bad), &right);
    assert!(
        diff > 1e-2,
        "a wrong prefix went unnoticed (difference {diff})"
    );
}

/// Runs one greedy request through `engine`: (completion ids, first-token
/// latency in ms).
fn run(engine: &Engine, prompt: &[u32], max_tokens: usize) -> (Vec<u32>, u64) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
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
        .unwrap();
    let mut ids = Vec::new();
    while let Some(event) = rx.blocking_recv() {
        match event {
            Event::Delta { token_ids, .. } => ids.extend(token_ids),
            Event::Finished { usage, .. } => return (ids, usage.time_to_first_token_ms),
            Event::Failed(e) => panic!("{e}"),
            Event::ToolCall { .. } => {}
        }
    }
    panic!("the engine stopped");
}

#[test]
fn the_scheduler_reuses_a_conversation_and_answers_as_without_the_cache() {
    let (turn1, turn2, _) = conversation();
    let load = || Decoder::load(&common::model_dir(), Device::Cpu, Kind::Float).unwrap();
    let config = EngineConfig {
        max_batch_size: 4,
        prefill_chunk: 24,
        ..EngineConfig::DEFAULT
    };
    let cached = Engine::start("paged-cached", load(), tokenizer(), config).unwrap();
    let plain = Engine::start(
        "paged-plain",
        load(),
        tokenizer(),
        EngineConfig {
            prefix_caching: false,
            ..config
        },
    )
    .unwrap();
    let hits = || {
        metrics()
            .prefix_cache_hit_tokens
            .with_label_values(&["paged-cached"])
            .get()
    };
    let (a1, _) = run(&cached, &turn1, 12);
    assert_eq!(hits(), 0);
    let (a2, _) = run(&cached, &turn2, 12);
    assert!(
        hits() >= (turn1.len() / BLOCK * BLOCK) as u64,
        "hits {}",
        hits()
    );
    let (b1, _) = run(&plain, &turn1, 12);
    let (b2, _) = run(&plain, &turn2, 12);
    assert_eq!((a1, a2.clone()), (b1, b2));
    // The scheduler's deltas carry no EOS id.
    let eos = tokenizer().eos_ids().to_vec();
    let mut direct = common::greedy(&decoder(), &turn2, 12, &eos);
    direct.retain(|t| !eos.contains(t));
    assert_eq!(a2, direct);
    assert_eq!(
        metrics()
            .prefix_cache_hit_tokens
            .with_label_values(&["paged-plain"])
            .get(),
        0
    );
}
