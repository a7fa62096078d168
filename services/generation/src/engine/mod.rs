//! Continuous batching (Yu et al. 2022, "Orca": iteration-level scheduling)
//! with chunked prefill over a paged KV cache with prefix caching, for one
//! loaded model.
//!
//! One OS thread owns the [`Decoder`], the KV pool and its block manager
//! ([`crate::kv`]) and runs the loop: at every step boundary it drops
//! sequences whose caller went away, admits queued requests while the batch
//! has room (at most `max_batch_size` sequences, at most `max_batch_tokens`
//! reserved — prompt + `max_tokens` each — and the KV pool able to promise
//! the blocks they may need), then runs one step:
//!
//! 1. **Chunked prefill** (Agrawal et al. 2024, "Sarathi-Serve"): prompts
//!    being prefilled advance by at most `prefill_chunk` tokens in all, oldest
//!    first, so a long prompt costs the running streams one chunk's latency
//!    per step instead of its whole prefill. A prompt whose last chunk ran
//!    emits its first token.
//! 2. **Decode**: every sequence past its prompt advances by one token in a
//!    single batched pass.
//!
//! Admission reuses the longest cached prefix of the prompt in whole blocks
//! (prefix caching), so the next turn of a conversation, a shared system
//! prompt or the same retrieved passages skip their prefill. Finished
//! sequences leave at once through [`Scheduler::retire`], the one place that
//! gives their blocks back; full blocks stay cached until evicted (LRU).
//!
//! # One OpenMP pool
//!
//! libtorch's CPU ops run on OpenMP, and libgomp keeps one pool of worker
//! threads per thread that ran a parallel op. Once the workers of all pools
//! outnumber the cores, libgomp cuts their spin-wait between parallel
//! regions to ~100 iterations (libgomp's `gomp_throttled_spin_count_var`),
//! so each of a decode step's hundreds of parallel ops pays a futex
//! wake-up: on the 2-core benchmark machine an int4 stream fell from 76 to
//! 60 tok/s. The scheduler thread is meant to hold the process's only pool:
//! load models on a thread that then ends (`serve` in lib.rs, `on_own_thread`
//! in the benchmark), and keep tensor work off other long-lived threads.
//!
//! Requests wait in a bounded queue; [`Engine::submit`] answers
//! [`GenerationError::QueueFull`] rather than letting it grow. A failed step
//! (say out of memory) fails the sequences in it and the loop goes on serving.

mod forward;
mod sequence;
#[cfg(test)]
mod tests;

pub use forward::ForwardPass;

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Instant,
};

use tokio::sync::mpsc;

use self::sequence::Sequence;
use crate::{
    GenerationError,
    kv::{BlockManager, BlockTable},
    metrics::metrics,
    sampling::{Sampler, SamplingConfig},
    text::ChatTokenizer,
};

/// Limits of one model's scheduler.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most sequences advanced together in one decode step.
    pub max_batch_size: usize,
    /// Most KV-cache tokens reserved by the running batch.
    pub max_batch_tokens: usize,
    /// Most requests waiting for a slot before submissions are refused.
    pub queue_capacity: usize,
    /// Bytes of the KV pool (running sequences and the prefix cache), rounded
    /// down to whole blocks.
    pub kv_cache_bytes: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Most prompt tokens prefilled per scheduler step (chunked prefill).
    pub prefill_chunk: usize,
    /// Whether full blocks are kept and reused across requests.
    pub prefix_caching: bool,
}

impl EngineConfig {
    /// Defaults for tests and benchmarks: 16 sequences, 64 Ki reserved
    /// tokens, 256 queued, a 1 GiB pool of 16-token blocks, 512-token
    /// chunks, prefix caching on.
    pub const DEFAULT: Self = Self {
        max_batch_size: 16,
        max_batch_tokens: 65_536,
        queue_capacity: 256,
        kv_cache_bytes: 1 << 30,
        block_size: crate::kv::DEFAULT_BLOCK_SIZE,
        prefill_chunk: 512,
        prefix_caching: true,
    };
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// EOS token or a stop sequence.
    Stop,
    /// `max_tokens` reached.
    Length,
    /// The answer ended in function calls ([`Event::ToolCall`]); set by the
    /// backend that parsed them, never by the scheduler.
    ToolCalls,
}

/// Token accounting of a finished sequence.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens (an EOS token included).
    pub completion_tokens: usize,
    /// Milliseconds from receipt to the first token.
    pub time_to_first_token_ms: u64,
    /// Milliseconds from receipt to the end.
    pub total_ms: u64,
}

/// What a request's caller receives, in order: deltas, then one `Finished`
/// or `Failed`.
#[derive(Debug)]
pub enum Event {
    /// New text (whole UTF-8 characters) and the token ids behind it.
    Delta {
        /// The text.
        text: String,
        /// Token ids consumed since the previous delta.
        token_ids: Vec<u32>,
        /// Their log probabilities, when the job asked (one per token).
        logprobs: Vec<moltbot_proto::generation::v1::TokenLogprob>,
    },
    /// One whole function call of the answer, after its text and before
    /// `Finished` (emitted by a backend that parses calls out of the text).
    ToolCall {
        /// `call_…`.
        id: String,
        /// The function.
        name: String,
        /// Its arguments, a JSON object as text.
        arguments: String,
    },
    /// The sequence ended normally.
    Finished {
        /// Why.
        reason: Finish,
        /// Accounting.
        usage: Usage,
    },
    /// The sequence failed; nothing more follows.
    Failed(GenerationError),
}

/// One generation request for the scheduler.
pub struct Job {
    /// Prompt token ids (chat template applied).
    pub prompt_ids: Vec<u32>,
    /// Most tokens to generate (≥ 1).
    pub max_tokens: usize,
    /// Validated sampling parameters.
    pub sampling: SamplingConfig,
    /// Caller stop sequences.
    pub stop: Vec<String>,
    /// When the request arrived, for time to first token.
    pub received: Instant,
    /// Where events go; dropping the receiver cancels the request.
    pub events: mpsc::UnboundedSender<Event>,
    /// Grammar the answer must follow (structured outputs), if any.
    pub constraint: Option<crate::text::grammar::Constraint>,
    /// Report each token's log probability and this many alternatives
    /// (`None`: no log probabilities).
    pub logprobs: Option<usize>,
}

/// Live load of the scheduler.
#[derive(Debug, Default)]
pub struct Load {
    /// Sequences in the running batch.
    pub active: AtomicUsize,
    /// Requests waiting for a slot.
    pub queued: AtomicUsize,
}

/// Handle of a running scheduler; cloning shares it. The thread stops once
/// every handle is dropped and the running sequences have finished.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    load: Arc<Load>,
    config: EngineConfig,
    thread: Arc<std::sync::Mutex<Option<std::thread::JoinHandle<()>>>>,
}

impl Engine {
    /// Starts the scheduler thread of `decoder` (the model's forward pass:
    /// [`crate::model::Decoder`] in production, a fake in the scheduler's
    /// tests), named `model` in metrics. Errors when the KV cache holds no
    /// block or the OS cannot start a thread.
    pub fn start<M: ForwardPass>(
        model: &str,
        decoder: M,
        tokenizer: ChatTokenizer,
        config: EngineConfig,
    ) -> Result<Self, GenerationError> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        // OpenMP's thread count is per thread: carry the caller's setting
        // over to the scheduler thread that runs every forward pass.
        let threads = tch::get_num_threads();
        let load = Arc::new(Load::default());
        let block_size = config.block_size.max(1);
        let blocks = config.kv_cache_bytes / (decoder.kv_bytes_per_token() * block_size).max(1);
        if blocks == 0 {
            return Err(GenerationError::InvalidArgument(format!(
                "a KV cache of {} bytes holds no {block_size}-token block of {} bytes; raise MOLTBOT_KV_CACHE_MB",
                config.kv_cache_bytes,
                decoder.kv_bytes_per_token() * block_size
            )));
        }
        let pool = decoder.new_pool(blocks * block_size)?;
        let mut scheduler = Scheduler {
            model: model.to_owned(),
            pool,
            blocks: BlockManager::new(blocks, block_size),
            decoder,
            tokenizer,
            config,
            rx,
            load: load.clone(),
            running: Vec::new(),
            held: None,
            reserved: 0,
        };
        let thread = std::thread::Builder::new()
            .name(format!("engine-{model}"))
            .spawn(move || {
                tch::set_num_threads(threads);
                scheduler.run()
            })
            .map_err(|e| GenerationError::Tensor(format!("cannot start the scheduler: {e}")))?;
        Ok(Self {
            tx,
            load,
            config,
            thread: Arc::new(std::sync::Mutex::new(Some(thread))),
        })
    }

    /// Drops this handle and, when it is the last one, waits for the
    /// scheduler thread to end: it finishes the step in flight, fails or
    /// drops what is running (callers gone), and exits. A process that
    /// returns from `main` while a scheduler is mid-step can crash in
    /// libtorch's teardown; the benchmark calls this before moving on.
    pub fn shutdown(self) {
        let Self { tx, thread, .. } = self;
        drop(tx);
        if let Ok(handle) = Arc::try_unwrap(thread)
            && let Some(handle) = handle.into_inner().unwrap_or_else(|e| e.into_inner())
        {
            let _ = handle.join();
        }
    }

    /// Queues `job`. Errors with [`GenerationError::QueueFull`] when the queue
    /// is at capacity and [`GenerationError::EngineStopped`] after shutdown.
    pub fn submit(&self, job: Job) -> Result<(), GenerationError> {
        self.load.queued.fetch_add(1, Ordering::SeqCst);
        match self.tx.try_send(job) {
            Ok(()) => Ok(()),
            Err(e) => {
                self.load.queued.fetch_sub(1, Ordering::SeqCst);
                match e {
                    mpsc::error::TrySendError::Full(_) => {
                        Err(GenerationError::QueueFull(self.config.queue_capacity))
                    }
                    mpsc::error::TrySendError::Closed(_) => Err(GenerationError::EngineStopped),
                }
            }
        }
    }

    /// Live load figures.
    pub fn load(&self) -> &Load {
        &self.load
    }

    /// The scheduler's limits.
    pub fn config(&self) -> EngineConfig {
        self.config
    }
}

struct Scheduler<M: ForwardPass> {
    model: String,
    decoder: M,
    /// The KV cache's memory.
    pool: M::Pool,
    /// Which blocks of `pool` are free, held or cached.
    blocks: BlockManager,
    tokenizer: ChatTokenizer,
    config: EngineConfig,
    rx: mpsc::Receiver<Job>,
    load: Arc<Load>,
    running: Vec<Sequence>,
    /// A dequeued request waiting for KV-cache budget (first in line).
    held: Option<Job>,
    /// KV-cache tokens reserved by `running`.
    reserved: usize,
}

impl<M: ForwardPass> Scheduler<M> {
    fn run(&mut self) {
        tracing::info!(model = %self.model, "scheduler started");
        loop {
            if self.running.is_empty() && self.held.is_none() {
                match self.rx.blocking_recv() {
                    Some(job) => self.held = Some(job),
                    None => break,
                }
            }
            self.drop_cancelled();
            self.admit();
            // Published before the step so that a caller who has seen a
            // sequence's first tokens also sees it counted.
            self.publish_load();
            self.step();
            self.publish_load();
        }
        tracing::info!(model = %self.model, "scheduler stopped");
    }

    fn publish_load(&self) {
        let m = metrics();
        self.load.active.store(self.running.len(), Ordering::SeqCst);
        m.active_sequences
            .with_label_values(&[&self.model])
            .set(self.running.len() as i64);
        m.max_sequences
            .with_label_values(&[&self.model])
            .set(self.config.max_batch_size as i64);
        m.queue_depth
            .with_label_values(&[&self.model])
            .set(self.load.queued.load(Ordering::SeqCst) as i64);
    }

    fn publish_blocks(&self) {
        let m = metrics();
        let free = self.blocks.free();
        let cached = self.blocks.evictable();
        let used = self.blocks.capacity() - free - cached;
        for (state, n) in [("used", used), ("cached", cached), ("free", free)] {
            m.kv_cache_blocks
                .with_label_values(&[&self.model, state])
                .set(n as i64);
        }
    }

    /// Removes `running[i]`, giving its blocks and reservation back: the one
    /// place a sequence leaves the batch.
    fn retire(&mut self, i: usize) -> Sequence {
        let mut seq = self.running.remove(i);
        seq.table_mut().0.release(&mut self.blocks);
        self.reserved -= seq.reserved();
        seq
    }

    fn drop_cancelled(&mut self) {
        let mut i = 0;
        while i < self.running.len() {
            if self.running[i].cancelled() {
                self.retire(i);
                self.count("cancelled");
            } else {
                i += 1;
            }
        }
    }

    /// Admits waiting requests while the batch and the KV pool have room.
    fn admit(&mut self) {
        while self.running.len() < self.config.max_batch_size {
            let job = match self.held.take() {
                Some(job) => job,
                None => match self.rx.try_recv() {
                    Ok(job) => job,
                    Err(_) => break,
                },
            };
            let need = job.prompt_ids.len() + job.max_tokens;
            if !self.running.is_empty() && self.reserved + need > self.config.max_batch_tokens {
                self.held = Some(job);
                break;
            }
            if job.events.is_closed() {
                self.load.queued.fetch_sub(1, Ordering::SeqCst);
                self.count("cancelled");
                continue;
            }
            let table = match BlockTable::admit(
                &mut self.blocks,
                &job.prompt_ids,
                job.max_tokens,
                self.config.prefix_caching,
            ) {
                Ok(table) => table,
                Err(_) if self.running.is_empty() => {
                    self.load.queued.fetch_sub(1, Ordering::SeqCst);
                    self.count("error");
                    let capacity = self.blocks.capacity() * self.blocks.block_size();
                    let _ = job.events.send(Event::Failed(GenerationError::InvalidArgument(
                        format!(
                            "prompt of {} tokens + max_tokens {} exceeds the KV cache of {capacity} tokens (MOLTBOT_KV_CACHE_MB)",
                            job.prompt_ids.len(),
                            job.max_tokens
                        ),
                    )));
                    continue;
                }
                Err(_) => {
                    self.held = Some(job);
                    break;
                }
            };
            self.load.queued.fetch_sub(1, Ordering::SeqCst);
            let m = metrics();
            m.prefix_cache_lookup_tokens
                .with_label_values(&[&self.model])
                .inc_by(job.prompt_ids.len() as u64);
            m.prefix_cache_hit_tokens
                .with_label_values(&[&self.model])
                .inc_by(table.cached() as u64);
            let seq = Sequence::new(job, table, Sampler::new);
            self.reserved += seq.reserved();
            self.running.push(seq);
        }
    }

    /// One scheduler step: a prefill chunk, then one batched decode.
    fn step(&mut self) {
        self.prefill_chunk();
        self.decode();
        self.publish_blocks();
    }

    /// Advances prefilling sequences, oldest first, by up to `prefill_chunk`
    /// prompt tokens in all; a sequence whose prompt is complete emits its
    /// first token (and may finish with it).
    fn prefill_chunk(&mut self) {
        let mut budget = self.config.prefill_chunk.max(1);
        let mut i = 0;
        while i < self.running.len() && budget > 0 {
            let left = self.running[i].prefill_left();
            if left == 0 {
                i += 1;
                continue;
            }
            let n = left.min(budget);
            budget -= n;
            match self.prefill_one(i, n) {
                Ok(Some(mut logits)) => {
                    let seq = &mut self.running[i];
                    let token = seq.sample(&mut logits);
                    if advance(&self.model, &self.tokenizer, seq, token) {
                        self.retire(i);
                        continue;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(model = %self.model, error = %e, "prefill failed");
                    self.count("error");
                    let seq = self.retire(i);
                    let _ = seq.send(Event::Failed(e));
                    continue;
                }
            }
            i += 1;
        }
    }

    /// Prefills the next `n` prompt positions of `running[i]`: the last
    /// position's logits row when that completes the prompt.
    fn prefill_one(&mut self, i: usize, n: usize) -> Result<Option<Vec<f32>>, GenerationError> {
        let started = Instant::now();
        let seq = &mut self.running[i];
        // Only the chunk that completes the prompt needs its logits.
        let last = n >= seq.prefill_left();
        let (table, tokens) = seq.table_mut();
        let start = table.len();
        let slots = table.reserve(&mut self.blocks, n)?;
        let logits = self.decoder.prefill(
            &tokens[start..start + n],
            start,
            &mut self.pool,
            slots,
            last,
        )?;
        table.commit(&mut self.blocks, n, tokens);
        let m = metrics();
        m.tokens
            .with_label_values(&[&self.model, "prompt"])
            .inc_by(n as u64);
        m.prefill_chunk_seconds
            .with_label_values(&[&self.model])
            .observe(started.elapsed().as_secs_f64());
        if seq.prefill_left() > 0 {
            return Ok(None);
        }
        Ok(logits)
    }

    /// One batched decode step over every sequence past its prompt.
    fn decode(&mut self) {
        let batch: Vec<usize> = (0..self.running.len())
            .filter(|&i| self.running[i].prefill_left() == 0)
            .collect();
        if batch.is_empty() {
            return;
        }
        let started = Instant::now();
        let m = metrics();
        let mut tokens = Vec::with_capacity(batch.len());
        let mut reserve_error = None;
        for &i in &batch {
            let seq = &mut self.running[i];
            tokens.push(seq.last_token());
            if let Err(e) = seq.table_mut().0.reserve(&mut self.blocks, 1) {
                reserve_error = Some(GenerationError::from(e));
            }
        }
        let result = match reserve_error {
            Some(e) => Err(e),
            None => {
                let slots: Vec<&[i64]> = batch
                    .iter()
                    .map(|&i| self.running[i].table().slots())
                    .collect();
                self.decoder.decode(&tokens, &mut self.pool, &slots)
            }
        };
        m.batch_size
            .with_label_values(&[&self.model])
            .observe(tokens.len() as f64);
        let mut rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(model = %self.model, error = %e, batch = tokens.len(), "decode step failed; failing its sequences");
                for &i in batch.iter().rev() {
                    let seq = self.retire(i);
                    let _ = seq.send(Event::Failed(clone_error(&e)));
                    self.count("error");
                }
                return;
            }
        };
        let mut finished = Vec::new();
        for (row, &i) in batch.iter().enumerate() {
            let seq = &mut self.running[i];
            let (table, history) = seq.table_mut();
            table.commit(&mut self.blocks, 1, history);
            let token = seq.sample(&mut rows[row]);
            if advance(&self.model, &self.tokenizer, seq, token) {
                finished.push(i);
            }
        }
        // Highest index first: removing it keeps the lower indices valid.
        for &i in finished.iter().rev() {
            self.retire(i);
        }
        m.step_seconds
            .with_label_values(&[&self.model])
            .observe(started.elapsed().as_secs_f64());
    }

    fn count(&self, reason: &str) {
        count(&self.model, reason);
    }
}

/// Counts a finished request of `model` by `reason`.
fn count(model: &str, reason: &str) {
    metrics().requests.with_label_values(&[model, reason]).inc();
}

/// Feeds `token` to `seq`, emitting text and the end; true when finished.
fn advance(model: &str, tokenizer: &ChatTokenizer, seq: &mut Sequence, token: u32) -> bool {
    let m = metrics();
    if seq.completion_len() == 0 {
        m.time_to_first_token
            .with_label_values(&[model])
            .observe(seq.since_received().as_secs_f64());
    }
    m.tokens.with_label_values(&[model, "completion"]).inc();
    match seq.push(tokenizer, token) {
        Ok(Some(finish)) => {
            count(
                model,
                match finish {
                    Finish::Stop | Finish::ToolCalls => "stop",
                    Finish::Length => "length",
                },
            );
            true
        }
        Ok(None) => false,
        Err(e) => {
            count(model, "error");
            let _ = seq.send(Event::Failed(e));
            true
        }
    }
}

/// A copy of a step's error for each failed sequence.
fn clone_error(e: &GenerationError) -> GenerationError {
    match e {
        GenerationError::OutOfMemory(m) => GenerationError::OutOfMemory(m.clone()),
        other => GenerationError::Tensor(other.to_string()),
    }
}
