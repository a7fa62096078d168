//! In-process fakes of the turn engine's ports: scripted answers, delays
//! on tokio's clock (the tests run with paused time) and a record of every
//! call, so a test can say what the engine asked and how often.

use std::{
    collections::{HashMap, VecDeque},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::Duration,
};

use futures::{StreamExt, stream};
use moltbot_proto::{
    context::v1 as ctx,
    generation::v1::{
        CountTokensRequest, CountTokensResponse, FinishReason, GenerateRequest, GenerateResponse,
        GenerationSummary, ModelInfo, TokenDelta, Usage, generate_response,
    },
};

use crate::{
    routing::config::RetrievalConfig,
    turn::{
        IntentInfo, Source,
        ports::{Broke, Call, Events, Generation, Retrieval, Sessions, Understanding},
    },
};

/// A scripted answer: after `delay`, `result`.
#[derive(Debug, Clone)]
pub struct Step<T> {
    pub delay: Duration,
    pub result: Result<T, tonic::Status>,
}

impl<T> Step<T> {
    pub fn ok(value: T) -> Self {
        Self {
            delay: Duration::ZERO,
            result: Ok(value),
        }
    }

    pub fn err(status: tonic::Status) -> Self {
        Self {
            delay: Duration::ZERO,
            result: Err(status),
        }
    }

    pub fn after(mut self, delay: Duration) -> Self {
        self.delay = delay;
        self
    }
}

/// Answers from a queue of steps, then `fallback` for every later call.
#[derive(Debug)]
pub struct Script<T> {
    queue: Mutex<VecDeque<Step<T>>>,
    fallback: Step<T>,
    pub calls: AtomicUsize,
}

impl<T: Clone + Send + 'static> Script<T> {
    pub fn always(fallback: Step<T>) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            fallback,
            calls: AtomicUsize::new(0),
        }
    }

    pub fn then(self, step: Step<T>) -> Self {
        self.queue.lock().unwrap().push_back(step);
        self
    }

    fn next(&self) -> Step<T> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        self.queue
            .lock()
            .unwrap()
            .pop_front()
            .unwrap_or_else(|| self.fallback.clone())
    }

    fn answer<'a>(&'a self) -> Call<'a, T> {
        let step = self.next();
        Box::pin(async move {
            tokio::time::sleep(step.delay).await;
            step.result
        })
    }

    pub fn count(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

/// The context service: scripted history reads; appends kept by
/// idempotency key (as the real service does), every attempt recorded.
pub struct FakeSessions {
    pub history: Script<Vec<ctx::Turn>>,
    pub append_failures: Mutex<VecDeque<tonic::Status>>,
    pub append_attempts: AtomicUsize,
    /// Idempotency key → the turns stored under it.
    pub stored: Mutex<HashMap<String, Vec<ctx::Turn>>>,
}

impl FakeSessions {
    pub fn new(history: Vec<ctx::Turn>) -> Self {
        Self {
            history: Script::always(Step::ok(history)),
            append_failures: Mutex::new(VecDeque::new()),
            append_attempts: AtomicUsize::new(0),
            stored: Mutex::new(HashMap::new()),
        }
    }

    pub fn writes(&self) -> Vec<Vec<ctx::Turn>> {
        self.stored.lock().unwrap().values().cloned().collect()
    }
}

impl Sessions for FakeSessions {
    fn history<'a>(
        &'a self,
        _tenant: &'a str,
        _session: &'a str,
        _max_turns: u32,
        _timeout: Duration,
    ) -> Call<'a, Vec<ctx::Turn>> {
        self.history.answer()
    }

    fn append<'a>(
        &'a self,
        _tenant: &'a str,
        _session: &'a str,
        turns: &'a [ctx::Turn],
        key: &'a str,
        _timeout: Duration,
    ) -> Call<'a, ()> {
        self.append_attempts.fetch_add(1, Ordering::SeqCst);
        let failure = self.append_failures.lock().unwrap().pop_front();
        Box::pin(async move {
            // A failure after the write landed (the answer was lost): the
            // retry must not store the turns twice.
            self.stored
                .lock()
                .unwrap()
                .entry(key.to_owned())
                .or_insert_with(|| turns.to_vec());
            match failure {
                Some(status) => Err(status),
                None => Ok(()),
            }
        })
    }
}

/// The understanding service.
pub struct FakeUnderstanding(pub Script<IntentInfo>);

impl FakeUnderstanding {
    pub fn in_scope() -> Self {
        Self(Script::always(Step::ok(IntentInfo {
            domain: "banking".to_owned(),
            name: "balance".to_owned(),
            confidence: 0.9,
            out_of_scope: false,
        })))
    }
}

impl Understanding for FakeUnderstanding {
    fn classify<'a>(&'a self, _text: &'a str, _timeout: Duration) -> Call<'a, IntentInfo> {
        self.0.answer()
    }
}

/// The retrieval service: scripted searches, and one content version for
/// every collection (a test raises it as a write would).
pub struct FakeRetrieval(pub Script<Vec<Source>>, pub std::sync::atomic::AtomicU64);

impl FakeRetrieval {
    pub fn one_passage() -> Self {
        Self(
            Script::always(Step::ok(vec![Source {
                id: "docs:a#0".to_owned(),
                score: 0.8,
                text: "MoltBot answers briefly.".to_owned(),
            }])),
            Default::default(),
        )
    }
}

impl Retrieval for FakeRetrieval {
    fn search<'a>(
        &'a self,
        _config: &'a RetrievalConfig,
        _text: &'a str,
        _timeout: Duration,
    ) -> Call<'a, Vec<Source>> {
        self.0.answer()
    }

    fn versions<'a>(
        &'a self,
        collections: &'a [String],
        _timeout: Duration,
    ) -> Call<'a, std::collections::HashMap<String, u64>> {
        let v = self.1.load(std::sync::atomic::Ordering::SeqCst);
        let all = collections.iter().map(|c| (c.clone(), v)).collect();
        Box::pin(async move { Ok(all) })
    }
}

/// How one generation call goes.
#[derive(Debug, Clone)]
pub enum Gen {
    /// The call fails before any event.
    Fail(tonic::Status),
    /// The answer: `words` as deltas, `gap` apart, then a summary.
    Answer { words: Vec<String>, gap: Duration },
    /// `words` deltas, then the stream breaks.
    BreakAfter { words: Vec<String>, broke: Broke },
    /// The call is open but no event ever comes.
    Hang,
}

impl Gen {
    pub fn answer(text: &str) -> Self {
        Self::Answer {
            words: text.split_inclusive(' ').map(str::to_owned).collect(),
            gap: Duration::from_millis(10),
        }
    }
}

/// How a model counts tokens.
#[derive(Debug, Clone)]
pub enum Count {
    /// One token per whitespace-separated word; this context window.
    Words(u32),
    /// The model is not served here.
    NotFound,
    /// A remote model: it cannot count.
    Remote,
}

/// The generation service: per-model scripts, every call recorded.
pub struct FakeGeneration {
    pub counting: HashMap<String, Count>,
    pub scripts: Mutex<HashMap<String, VecDeque<Gen>>>,
    /// Model of each generate call, in order.
    pub generate_calls: Mutex<Vec<String>>,
    /// Texts of each count call that counted.
    pub counted_texts: Mutex<Vec<Vec<String>>>,
    /// Count calls, answered or not.
    pub count_calls: AtomicUsize,
    /// Set when a started stream is dropped before it ended.
    pub dropped_early: Arc<AtomicBool>,
}

impl FakeGeneration {
    /// Models `local` (counts, answers `answer`) and nothing else.
    pub fn local(answer: &str) -> Self {
        Self::new(&[("local", Count::Words(4096), vec![Gen::answer(answer)])])
    }

    pub fn new(models: &[(&str, Count, Vec<Gen>)]) -> Self {
        Self {
            counting: models
                .iter()
                .map(|(m, c, _)| ((*m).to_owned(), c.clone()))
                .collect(),
            scripts: Mutex::new(
                models
                    .iter()
                    .map(|(m, _, g)| ((*m).to_owned(), g.iter().cloned().collect()))
                    .collect(),
            ),
            generate_calls: Mutex::new(Vec::new()),
            counted_texts: Mutex::new(Vec::new()),
            count_calls: AtomicUsize::new(0),
            dropped_early: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn calls(&self) -> Vec<String> {
        self.generate_calls.lock().unwrap().clone()
    }
}

fn delta(text: &str) -> GenerateResponse {
    GenerateResponse {
        event: Some(generate_response::Event::Delta(TokenDelta {
            text: text.to_owned(),
            ..Default::default()
        })),
    }
}

fn summary(completion_tokens: u32) -> GenerateResponse {
    GenerateResponse {
        event: Some(generate_response::Event::Summary(GenerationSummary {
            finish_reason: FinishReason::Stop as i32,
            usage: Some(Usage {
                prompt_tokens: 10,
                completion_tokens,
                ..Default::default()
            }),
            ..Default::default()
        })),
    }
}

/// Sets its flag when dropped before `ended`: the stream it lives in was
/// dropped before its end.
struct DropFlag(Arc<AtomicBool>, Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        if !self.1.load(Ordering::SeqCst) {
            self.0.store(true, Ordering::SeqCst);
        }
    }
}

fn words_stream(
    words: Vec<String>,
    gap: Duration,
    end: Option<Result<GenerateResponse, Broke>>,
    flag: Arc<AtomicBool>,
) -> Events {
    let n = words.len() as u32;
    let mut items: Vec<Result<GenerateResponse, Broke>> =
        words.iter().map(|w| Ok(delta(w))).collect();
    items.push(end.unwrap_or_else(|| Ok(summary(n))));
    let total = items.len();
    let guard = DropFlag(flag, Arc::new(AtomicBool::new(false)));
    stream::iter(items.into_iter().enumerate())
        .then(move |(i, item)| async move {
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            (i, item)
        })
        .map(move |(i, item)| {
            if i + 1 == total {
                guard.1.store(true, Ordering::SeqCst);
            }
            item
        })
        .boxed()
}

impl Generation for FakeGeneration {
    fn count_tokens(
        &self,
        request: CountTokensRequest,
        _timeout: Duration,
    ) -> Call<'_, CountTokensResponse> {
        self.count_calls.fetch_add(1, Ordering::SeqCst);
        let words = |t: &str| t.split_whitespace().count() as u32;
        let result = match self.counting.get(&request.model) {
            Some(Count::Words(context_length)) => {
                self.counted_texts
                    .lock()
                    .unwrap()
                    .push(request.texts.clone());
                Ok(CountTokensResponse {
                    prompt_tokens: request.messages.iter().map(|m| words(&m.content) + 5).sum(),
                    text_tokens: request.texts.iter().map(|t| words(t)).collect(),
                    context_length: *context_length,
                })
            }
            Some(Count::Remote) => Err(tonic::Status::unimplemented("remote model")),
            Some(Count::NotFound) | None => Err(tonic::Status::not_found("no such model")),
        };
        Box::pin(async move { result })
    }

    fn generate<'a>(
        &'a self,
        request: GenerateRequest,
        _affinity: Option<&'a str>,
        _timeout: Duration,
    ) -> Call<'a, Events> {
        self.generate_calls
            .lock()
            .unwrap()
            .push(request.model.clone());
        let next = self
            .scripts
            .lock()
            .unwrap()
            .get_mut(&request.model)
            .and_then(|q| {
                if q.len() > 1 {
                    q.pop_front()
                } else {
                    q.front().cloned()
                }
            });
        let flag = self.dropped_early.clone();
        Box::pin(async move {
            match next {
                None => Err(tonic::Status::not_found("no such model")),
                Some(Gen::Fail(status)) => Err(status),
                Some(Gen::Hang) => Ok(stream::pending().boxed()),
                Some(Gen::Answer { words, gap }) => Ok(words_stream(words, gap, None, flag)),
                Some(Gen::BreakAfter { words, broke }) => Ok(words_stream(
                    words,
                    Duration::from_millis(10),
                    Some(Err(broke)),
                    Arc::new(AtomicBool::new(false)),
                )),
            }
        })
    }

    fn list_models(&self, _timeout: Duration) -> Call<'_, Vec<ModelInfo>> {
        let models = self
            .counting
            .keys()
            .map(|name| ModelInfo {
                name: name.clone(),
                ..Default::default()
            })
            .collect();
        Box::pin(async move { Ok(models) })
    }
}
