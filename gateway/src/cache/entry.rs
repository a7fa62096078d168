//! One cached answer: what a hit replays, in the mesh's own terms (never an
//! OpenAI body), so every protocol adapter formats a hit exactly as it
//! formats a generated answer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use moltbot_proto::generation::v1::{
    FinishReason, GenerateResponse, GenerationSummary, TokenDelta, Usage as PbUsage,
    generate_response,
};
use serde::{Deserialize, Serialize};

use crate::turn::{IntentInfo, Source, ports::Events};

/// Version of the stored encoding; an entry of another version is a miss.
pub const FORMAT: u32 = 1;

/// A generated answer as the cache keeps it (JSON in Redis).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    /// [`FORMAT`] when written.
    pub format: u32,
    /// The model that generated it.
    pub model: String,
    /// The route that served it (`moltbot.route`).
    pub route: String,
    /// The answer's text as its deltas arrived, so a streamed hit sends the
    /// same chunks a generated answer did.
    pub deltas: Vec<String>,
    /// `stop` or `length`: only answers that ended normally are stored.
    pub finish: String,
    /// Prompt tokens of the generation that produced it.
    pub prompt_tokens: u32,
    /// Completion tokens.
    pub completion_tokens: u32,
    /// The intent understanding gave the original question.
    pub intent: Option<IntentInfo>,
    /// The passages the original answer cited.
    pub sources: Vec<Source>,
    /// When it was generated, in ms since the Unix epoch.
    pub created_ms: u64,
}

/// Milliseconds since the Unix epoch now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Entry {
    /// Time since the answer was generated (zero for a clock that went
    /// back).
    pub fn age(&self) -> Duration {
        Duration::from_millis(now_ms().saturating_sub(self.created_ms))
    }

    /// Bytes the entry holds, roughly: what the memory tier's byte bound
    /// weighs it at.
    pub fn weight(&self) -> u32 {
        let text: usize = self.deltas.iter().map(|d| d.len() + 24).sum::<usize>()
            + self
                .sources
                .iter()
                .map(|s| s.id.len() + s.text.len() + 48)
                .sum::<usize>()
            + self.model.len()
            + self.route.len()
            + 160;
        u32::try_from(text).unwrap_or(u32::MAX)
    }

    /// Decodes a stored entry; `None` for bytes that are not an entry of
    /// this [`FORMAT`] (the caller deletes them).
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice::<Self>(bytes)
            .ok()
            .filter(|e| e.format == FORMAT && matches!(e.finish.as_str(), "stop" | "length"))
    }

    /// The stored encoding.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The answer as a generation's event stream: each delta, then the
    /// summary with the original usage, so the turn's one drain
    /// (`gateway/src/turn/run.rs`) runs a hit exactly as a generation.
    pub fn events(&self) -> (GenerateResponse, Events) {
        let finish = match self.finish.as_str() {
            "length" => FinishReason::Length,
            _ => FinishReason::Stop,
        };
        let summary = GenerateResponse {
            event: Some(generate_response::Event::Summary(GenerationSummary {
                finish_reason: finish as i32,
                usage: Some(PbUsage {
                    prompt_tokens: self.prompt_tokens,
                    completion_tokens: self.completion_tokens,
                    time_to_first_token_ms: 0,
                    total_time_ms: 0,
                }),
                model: self.model.clone(),
                backend: "cache".to_owned(),
            })),
        };
        let mut events: Vec<GenerateResponse> = self
            .deltas
            .iter()
            .map(|text| GenerateResponse {
                event: Some(generate_response::Event::Delta(TokenDelta {
                    text: text.clone(),
                    ..Default::default()
                })),
            })
            .collect();
        events.push(summary);
        let mut events = events.into_iter();
        // At least the summary is there.
        let first = events.next().unwrap_or_default();
        let rest: Events = futures::stream::iter(events.map(Ok)).boxed();
        (first, rest)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;

    fn entry() -> Entry {
        Entry {
            format: FORMAT,
            model: "m".into(),
            route: "default".into(),
            deltas: vec!["Hello".into(), " world".into()],
            finish: "stop".into(),
            prompt_tokens: 12,
            completion_tokens: 2,
            intent: None,
            sources: Vec::new(),
            created_ms: now_ms(),
        }
    }

    #[tokio::test]
    async fn replays_its_deltas_then_the_summary() {
        let e = entry();
        assert_eq!(Entry::decode(&e.encode()), Some(e.clone()));
        let (first, rest) = e.events();
        let rest: Vec<_> = rest.collect().await;
        assert!(
            matches!(first.event, Some(generate_response::Event::Delta(ref d)) if d.text == "Hello")
        );
        assert_eq!(rest.len(), 2);
        match &rest[1] {
            Ok(GenerateResponse {
                event: Some(generate_response::Event::Summary(s)),
            }) => assert_eq!(s.usage.map(|u| u.prompt_tokens), Some(12)),
            other => panic!("not a summary: {other:?}"),
        }
    }

    #[test]
    fn undecodable_or_foreign_bytes_are_no_entry() {
        assert!(Entry::decode(b"not json").is_none());
        let mut e = entry();
        e.format = FORMAT + 1;
        assert!(Entry::decode(&e.encode()).is_none());
        let mut e = entry();
        e.finish = "tool_calls".into();
        assert!(Entry::decode(&e.encode()).is_none());
    }
}
