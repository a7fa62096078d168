//! One running sequence: its blocks of the paged KV cache, sampler,
//! decoding state and the channel to its caller. A sequence is *prefilling*
//! until every prompt position is in the KV cache (chunk by chunk), then
//! decoding.

use std::time::{Duration, Instant};

use moltbot_proto::generation::v1::{TokenLogprob, TopLogprob};
use tokio::sync::mpsc;

use super::{Event, Finish, Job, Usage};
use crate::{
    GenerationError,
    kv::BlockTable,
    sampling::{Sampler, SamplingConfig},
    text::{
        ChatTokenizer, IncrementalDecoder, StopMatcher, grammar::Constraint, stop::StopOutcome,
    },
};

/// A sequence in the running batch.
pub struct Sequence {
    /// Prompt then completion ids, for the repetition penalty.
    history: Vec<u32>,
    prompt_len: usize,
    max_tokens: usize,
    table: BlockTable,
    sampler: Sampler,
    detok: IncrementalDecoder,
    stop: StopMatcher,
    /// Ids decoded but not yet sent with a delta.
    unsent_ids: Vec<u32>,
    received: Instant,
    first_token_ms: Option<u64>,
    events: mpsc::UnboundedSender<Event>,
    /// The answer's grammar, when the request constrains it.
    constraint: Option<Constraint>,
    /// Why the grammar matcher failed, reported at the next push.
    constraint_error: Option<String>,
    /// Alternatives to report with each token's log probability; `None`:
    /// no log probabilities.
    logprobs: Option<usize>,
    /// The sampled token's log probability and the step's top
    /// alternatives, until `push` names the token.
    pending_logprob: Option<(f32, Vec<(u32, f32)>)>,
    /// Log probabilities of `unsent_ids`.
    unsent_logprobs: Vec<TokenLogprob>,
}

/// Natural-log probabilities of one logits row (`[vocab]` f32): the
/// log-sum-exp normaliser and the `k` largest entries, largest first.
fn log_softmax_top(logits: &[f32], k: usize) -> (f32, Vec<(u32, f32)>) {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| f64::from(l - max).exp()).sum();
    let lse = max + sum.ln() as f32;
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        for (i, &l) in logits.iter().enumerate() {
            if top.len() < k || top.last().is_some_and(|&(_, v)| l > v) {
                let at = top.partition_point(|&(_, v)| v >= l);
                top.insert(at, (i as u32, l));
                top.truncate(k);
            }
        }
    }
    (lse, top.into_iter().map(|(i, l)| (i, l - lse)).collect())
}

impl Sequence {
    /// A sequence for `job` holding `table` (its cached prefix, if any).
    pub fn new(
        job: Job,
        table: BlockTable,
        sampler: impl FnOnce(SamplingConfig) -> Sampler,
    ) -> Self {
        let prompt_len = job.prompt_ids.len();
        Self {
            history: job.prompt_ids,
            prompt_len,
            max_tokens: job.max_tokens,
            table,
            sampler: sampler(job.sampling),
            detok: IncrementalDecoder::new(),
            stop: StopMatcher::new(job.stop),
            unsent_ids: Vec::new(),
            received: job.received,
            first_token_ms: None,
            events: job.events,
            constraint: job.constraint,
            constraint_error: None,
            logprobs: job.logprobs,
            pending_logprob: None,
            unsent_logprobs: Vec::new(),
        }
    }

    /// Whether the caller has gone away.
    pub fn cancelled(&self) -> bool {
        self.events.is_closed()
    }

    /// KV-cache tokens reserved: prompt + `max_tokens`.
    pub fn reserved(&self) -> usize {
        self.prompt_len + self.max_tokens
    }

    /// Prompt positions not yet in the KV cache (0 once decoding).
    pub fn prefill_left(&self) -> usize {
        self.prompt_len.saturating_sub(self.table.len())
    }

    /// Tokens generated so far.
    pub fn completion_len(&self) -> usize {
        self.history.len() - self.prompt_len
    }

    /// The newest token (input of the next decode step).
    pub fn last_token(&self) -> u32 {
        self.history.last().copied().unwrap_or_default()
    }

    /// The sequence's blocks and its tokens by position (for committing
    /// written positions).
    pub fn table_mut(&mut self) -> (&mut BlockTable, &[u32]) {
        (&mut self.table, &self.history)
    }

    /// The sequence's blocks.
    pub fn table(&self) -> &BlockTable {
        &self.table
    }

    /// Time since the request arrived.
    pub fn since_received(&self) -> Duration {
        self.received.elapsed()
    }

    /// Picks the next token from this sequence's logits row (`[vocab]`
    /// f32, modified in place): under a constraint, only among the tokens
    /// its grammar allows, and the grammar follows the token picked.
    pub fn sample(&mut self, logits: &mut [f32]) -> u32 {
        // Log probabilities are the model's own: taken before the
        // constraint, the penalties and the temperature change the row.
        let raw = self
            .logprobs
            .map(|k| (log_softmax_top(logits, k), logits.to_vec()));
        if let Some(c) = &mut self.constraint
            && let Err(e) = c.mask(logits)
        {
            self.constraint_error.get_or_insert(e);
        }
        let token = self.sampler.sample(logits, &self.history);
        if let Some(((lse, top), row)) = raw {
            let logprob = row
                .get(token as usize)
                .map_or(f32::NEG_INFINITY, |l| l - lse);
            self.pending_logprob = Some((logprob, top));
        }
        if let Some(c) = &mut self.constraint
            && self.constraint_error.is_none()
            && let Err(e) = c.commit(token)
        {
            self.constraint_error = Some(e);
        }
        token
    }

    /// Sends an event to the caller (ignored when it has gone away).
    pub fn send(&self, event: Event) -> Result<(), GenerationError> {
        self.events
            .send(event)
            .map_err(|_| GenerationError::EngineStopped)
    }

    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_len,
            completion_tokens: self.completion_len(),
            time_to_first_token_ms: self.first_token_ms.unwrap_or_default(),
            total_ms: self.received.elapsed().as_millis() as u64,
        }
    }

    fn emit(&mut self, text: String) {
        if !text.is_empty() {
            let token_ids = std::mem::take(&mut self.unsent_ids);
            let logprobs = std::mem::take(&mut self.unsent_logprobs);
            let _ = self.send(Event::Delta {
                text,
                token_ids,
                logprobs,
            });
        }
    }

    /// The pending log probability of `token`, with its text and bytes.
    fn record_logprob(&mut self, tokenizer: &ChatTokenizer, token: u32) {
        let Some((logprob, top)) = self.pending_logprob.take() else {
            return;
        };
        let entry = |id: u32| {
            let bytes = tokenizer.token_bytes(id);
            (String::from_utf8_lossy(&bytes).into_owned(), bytes)
        };
        let (text, bytes) = entry(token);
        self.unsent_logprobs.push(TokenLogprob {
            token: text,
            logprob,
            bytes,
            top_logprobs: top
                .into_iter()
                .map(|(id, logprob)| {
                    let (token, bytes) = entry(id);
                    TopLogprob {
                        token,
                        logprob,
                        bytes,
                    }
                })
                .collect(),
        });
    }

    fn finish(&mut self, reason: Finish) -> Option<Finish> {
        let usage = self.usage();
        let _ = self.send(Event::Finished { reason, usage });
        Some(reason)
    }

    /// Adds `token`: emits the text it completes, and the end when it is an
    /// EOS id, completes a stop sequence or the constraint's grammar, or
    /// reaches `max_tokens`. Errors with [`GenerationError::Constraint`]
    /// when the grammar matcher failed on it.
    pub fn push(
        &mut self,
        tokenizer: &ChatTokenizer,
        token: u32,
    ) -> Result<Option<Finish>, GenerationError> {
        if let Some(e) = self.constraint_error.take() {
            return Err(GenerationError::Constraint(e));
        }
        self.history.push(token);
        if self.first_token_ms.is_none() {
            self.first_token_ms = Some(self.received.elapsed().as_millis() as u64);
        }
        if tokenizer.eos_ids().contains(&token) {
            let rest = self.stop.flush();
            self.emit(rest);
            return Ok(self.finish(Finish::Stop));
        }
        self.record_logprob(tokenizer, token);
        let (text, ids) = self.detok.push(tokenizer, token)?;
        self.unsent_ids.extend(ids);
        match self.stop.push(&text) {
            StopOutcome::Stop(text) => {
                self.emit(text);
                return Ok(self.finish(Finish::Stop));
            }
            StopOutcome::Continue(text) => self.emit(text),
        }
        if self.constraint.as_ref().is_some_and(Constraint::finished) {
            let rest = self.stop.flush();
            self.emit(rest);
            return Ok(self.finish(Finish::Stop));
        }
        if self.completion_len() >= self.max_tokens {
            let rest = self.stop.flush();
            self.emit(rest);
            return Ok(self.finish(Finish::Length));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_softmax_top_matches_the_definition() {
        let logits = [1.0f32, 3.0, 2.0, -1.0];
        let (lse, top) = super::log_softmax_top(&logits, 2);
        let z: f32 = logits.iter().map(|l| l.exp()).sum();
        assert!((lse - z.ln()).abs() < 1e-5);
        assert_eq!(top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((top[0].1 - (3.0f32.exp() / z).ln()).abs() < 1e-5);
        assert!(super::log_softmax_top(&logits, 0).1.is_empty());
    }
}
