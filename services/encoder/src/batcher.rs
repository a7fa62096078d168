//! Dynamic batching for the encoder: concurrent callers' texts are grouped
//! into one forward pass. A worker thread owns the [`Encoder`]; it takes the
//! first waiting request, then takes every request already queued, up to
//! `max_batch` texts. When the previous batch served more than one request
//! (callers are concurrent) it also waits up to `max_wait` for more to join;
//! a lone caller is served at once, without that wait. It runs one forward
//! pass and hands each caller its slice of the results.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::sync::{mpsc, oneshot};

use crate::{Embedded, Encoder, EncoderError, Precision};

/// Limits of the batcher.
#[derive(Debug, Clone, Copy)]
pub struct BatchConfig {
    /// Most texts in one forward pass.
    pub max_batch: usize,
    /// Longest a text waits for others to join its batch, when the previous
    /// batch had more than one request (else none).
    pub max_wait: Duration,
    /// Most requests waiting before [`Batcher::embed`] refuses more.
    pub queue_capacity: usize,
}

struct Request {
    texts: Vec<String>,
    reply: oneshot::Sender<Result<Vec<Embedded>, EncoderError>>,
}

/// Handle to the batching worker; cheap to clone.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Request>,
    dimension: usize,
    model_id: Arc<str>,
    precision: Precision,
    device: tch::Device,
}

impl Batcher {
    /// Starts the worker thread, which takes `encoder` over (libtorch
    /// tensors are not shared between threads). Errors when the OS cannot
    /// start a thread.
    pub fn start(encoder: Encoder, config: BatchConfig) -> Result<Self, EncoderError> {
        let (tx, rx) = mpsc::channel(config.queue_capacity.max(1));
        let dimension = encoder.dimension();
        let model_id: Arc<str> = Arc::from(encoder.id());
        let (precision, device) = (encoder.precision(), encoder.device());
        let threads = tch::get_num_threads();
        std::thread::Builder::new()
            .name("encoder-batcher".into())
            .spawn(move || {
                tch::set_num_threads(threads);
                run(&encoder, rx, config)
            })
            .map_err(|e| EncoderError::Tensor(format!("cannot start the batcher: {e}")))?;
        Ok(Self {
            tx,
            dimension,
            model_id,
            precision,
            device,
        })
    }

    /// Embedding dimension.
    pub fn dimension(&self) -> usize {
        self.dimension
    }

    /// The encoder's arithmetic.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// The encoder's device.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// The encoder's identifier.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Embeds `texts` as part of whatever batch forms. Errors with
    /// [`EncoderError::Busy`] when the queue is full, or the batch's error.
    pub async fn embed(&self, texts: Vec<String>) -> Result<Vec<Embedded>, EncoderError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request { texts, reply })
            .map_err(|_| EncoderError::Busy)?;
        rx.await.map_err(|_| EncoderError::Busy)?
    }
}

fn run(encoder: &Encoder, mut rx: mpsc::Receiver<Request>, config: BatchConfig) {
    let mut pending: Option<Request> = None;
    let mut previous_requests = 0usize;
    loop {
        let first = match pending.take() {
            Some(r) => r,
            None => match rx.blocking_recv() {
                Some(r) => r,
                None => return,
            },
        };
        let wait = if previous_requests > 1 {
            config.max_wait
        } else {
            Duration::ZERO
        };
        let deadline = Instant::now() + wait;
        let mut batch = vec![first];
        let mut count = batch[0].texts.len();
        while count < config.max_batch {
            match rx.try_recv() {
                Ok(r) if count + r.texts.len() <= config.max_batch => {
                    count += r.texts.len();
                    batch.push(r);
                }
                Ok(r) => {
                    pending = Some(r);
                    break;
                }
                Err(mpsc::error::TryRecvError::Empty) => {
                    if Instant::now() >= deadline {
                        break;
                    }
                    std::thread::sleep(Duration::from_micros(200));
                }
                Err(mpsc::error::TryRecvError::Disconnected) => break,
            }
        }
        previous_requests = batch.len();
        let texts: Vec<&str> = batch
            .iter()
            .flat_map(|r| r.texts.iter().map(String::as_str))
            .collect();
        match encoder.embed(&texts) {
            Ok(mut all) => {
                for r in batch.into_iter().rev() {
                    let mine = all.split_off(all.len() - r.texts.len());
                    let _ = r.reply.send(Ok(mine));
                }
            }
            Err(e) => {
                for r in batch {
                    let _ = r.reply.send(Err(EncoderError::Tensor(e.to_string())));
                }
            }
        }
    }
}
