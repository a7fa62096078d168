//! Continuous batching (Yu et al. 2022, "Orca": iteration-level scheduling)
//! for one loaded model.
//!
//! One OS thread owns the [`Decoder`] and runs the loop: at every step
//! boundary it drops sequences whose caller went away, admits queued requests
//! while the batch has room (at most `max_batch_size` sequences, and at most
//! `max_batch_tokens` of KV cache reserved — prompt + `max_tokens` each),
//! prefills each newcomer and emits its first token, then advances every
//! running sequence by one token in a single batched decode. Finished
//! sequences leave at once; the next waiting request takes the slot.
//!
//! Requests wait in a bounded queue; [`Engine::submit`] answers
//! [`GenerationError::QueueFull`] rather than letting it grow. A failed step
//! (say out of memory) fails the sequences in it and the loop goes on serving.

mod sequence;

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
    metrics::metrics,
    model::Decoder,
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
}

impl Engine {
    /// Starts the scheduler thread of `decoder`, named `model` in metrics.
    /// Errors when the OS cannot start a thread.
    pub fn start(
        model: &str,
        decoder: Decoder,
        tokenizer: ChatTokenizer,
        config: EngineConfig,
    ) -> Result<Self, GenerationError> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        // OpenMP's thread count is per thread: carry the caller's setting
        // over to the scheduler thread that runs every forward pass.
        let threads = tch::get_num_threads();
        let load = Arc::new(Load::default());
        let mut scheduler = Scheduler {
            model: model.to_owned(),
            decoder,
            tokenizer,
            config,
            rx,
            load: load.clone(),
            running: Vec::new(),
            held: None,
            reserved: 0,
        };
        std::thread::Builder::new()
            .name(format!("engine-{model}"))
            .spawn(move || {
                tch::set_num_threads(threads);
                scheduler.run()
            })
            .map_err(|e| GenerationError::Tensor(format!("cannot start the scheduler: {e}")))?;
        Ok(Self { tx, load, config })
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

struct Scheduler {
    model: String,
    decoder: Decoder,
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

impl Scheduler {
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
        m.queue_depth
            .with_label_values(&[&self.model])
            .set(self.load.queued.load(Ordering::SeqCst) as i64);
    }

    fn drop_cancelled(&mut self) {
        let before = self.running.len();
        let mut freed = 0;
        self.running.retain(|s| {
            let alive = !s.cancelled();
            if !alive {
                freed += s.reserved();
            }
            alive
        });
        self.reserved -= freed;
        let cancelled = before - self.running.len();
        if cancelled > 0 {
            metrics()
                .requests
                .with_label_values(&[&self.model, "cancelled"])
                .inc_by(cancelled as u64);
        }
    }

    /// Admits waiting requests while the batch has room, prefilling each.
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
            self.load.queued.fetch_sub(1, Ordering::SeqCst);
            if job.events.is_closed() {
                metrics()
                    .requests
                    .with_label_values(&[&self.model, "cancelled"])
                    .inc();
                continue;
            }
            match self.prefill(job) {
                Ok(Some(seq)) => {
                    self.reserved += seq.reserved();
                    self.running.push(seq);
                }
                Ok(None) => {}
                Err((events, e)) => {
                    tracing::warn!(model = %self.model, error = %e, "prefill failed");
                    self.count("error");
                    let _ = events.send(Event::Failed(e));
                }
            }
        }
    }

    /// Prefills `job` and emits its first token; `None` when that token
    /// already finished it.
    #[allow(clippy::result_large_err)] // the sender goes back with the error
    fn prefill(
        &mut self,
        job: Job,
    ) -> Result<Option<Sequence>, (mpsc::UnboundedSender<Event>, GenerationError)> {
        let need = job.prompt_ids.len() + job.max_tokens;
        let mut cache = match self.decoder.new_cache(need) {
            Ok(c) => c,
            Err(e) => return Err((job.events, e)),
        };
        let logits = self
            .decoder
            .prefill(&job.prompt_ids, &mut cache, false)
            .and_then(|l| to_rows(&l, 1));
        let mut logits = match logits {
            Ok(l) => l,
            Err(e) => return Err((job.events, e)),
        };
        metrics()
            .tokens
            .with_label_values(&[&self.model, "prompt"])
            .inc_by(job.prompt_ids.len() as u64);
        let mut seq = Sequence::new(job, cache, Sampler::new);
        let token = seq.sample(&mut logits[0]);
        if self.advance(&mut seq, token) {
            Ok(None)
        } else {
            Ok(Some(seq))
        }
    }

    /// One batched decode step over every running sequence.
    fn step(&mut self) {
        if self.running.is_empty() {
            return;
        }
        let started = Instant::now();
        let tokens: Vec<u32> = self.running.iter().map(Sequence::last_token).collect();
        let result = {
            let mut caches: Vec<_> = self.running.iter_mut().map(Sequence::cache_mut).collect();
            self.decoder
                .decode(&tokens, &mut caches)
                .and_then(|l| to_rows(&l, tokens.len()))
        };
        let m = metrics();
        m.batch_size
            .with_label_values(&[&self.model])
            .observe(tokens.len() as f64);
        let mut rows = match result {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(model = %self.model, error = %e, batch = tokens.len(), "decode step failed; failing its sequences");
                for seq in self.running.drain(..) {
                    let _ = seq.send(Event::Failed(clone_error(&e)));
                    m.requests.with_label_values(&[&self.model, "error"]).inc();
                }
                self.reserved = 0;
                return;
            }
        };
        let mut finished = vec![false; self.running.len()];
        let mut running = std::mem::take(&mut self.running);
        for (i, seq) in running.iter_mut().enumerate() {
            let token = seq.sample(&mut rows[i]);
            finished[i] = self.advance(seq, token);
        }
        let mut freed = 0;
        let mut i = 0;
        running.retain(|s| {
            let keep = !finished[i];
            if !keep {
                freed += s.reserved();
            }
            i += 1;
            keep
        });
        self.running = running;
        self.reserved -= freed;
        m.step_seconds
            .with_label_values(&[&self.model])
            .observe(started.elapsed().as_secs_f64());
    }

    /// Feeds `token` to `seq`, emitting text and the end; true when finished.
    fn advance(&self, seq: &mut Sequence, token: u32) -> bool {
        let m = metrics();
        if seq.completion_len() == 0 {
            m.time_to_first_token
                .with_label_values(&[&self.model])
                .observe(seq.since_received().as_secs_f64());
        }
        m.tokens
            .with_label_values(&[&self.model, "completion"])
            .inc();
        match seq.push(&self.tokenizer, token) {
            Ok(Some(finish)) => {
                self.count(match finish {
                    Finish::Stop | Finish::ToolCalls => "stop",
                    Finish::Length => "length",
                });
                true
            }
            Ok(None) => false,
            Err(e) => {
                self.count("error");
                let _ = seq.send(Event::Failed(e));
                true
            }
        }
    }

    fn count(&self, reason: &str) {
        metrics()
            .requests
            .with_label_values(&[&self.model, reason])
            .inc();
    }
}

/// Copies `[rows, vocab]` f32 logits to host vectors.
fn to_rows(logits: &tch::Tensor, rows: usize) -> Result<Vec<Vec<f32>>, GenerationError> {
    let flat = logits
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?
        .f_view([-1])?;
    let flat: Vec<f32> = Vec::<f32>::try_from(&flat)?;
    let vocab = flat.len() / rows.max(1);
    Ok(flat.chunks(vocab).map(<[f32]>::to_vec).collect())
}

/// A copy of a step's error for each failed sequence.
fn clone_error(e: &GenerationError) -> GenerationError {
    match e {
        GenerationError::OutOfMemory(m) => GenerationError::OutOfMemory(m.clone()),
        other => GenerationError::Tensor(other.to_string()),
    }
}
