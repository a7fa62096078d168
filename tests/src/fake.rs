//! A fake OpenAI-compatible provider for the tests and benchmarks that need
//! a remote model: `POST /v1/chat/completions` streams "Hello from fake"
//! (3 completion tokens) as server-sent events — or, when the request
//! offers `tools` and its last message is not a tool result, a call to the
//! first tool with `{"city": "Paris"}`, its arguments in two fragments as
//! OpenAI streams them. `GET /v1/models` answers 200. The last request body
//! is kept for assertions; `fail_with` makes it a provider that is down.
//! Fakes are for third-party HTTP providers only.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    http::{HeaderMap, StatusCode},
    response::IntoResponse,
    routing::{get, post},
};
use serde_json::json;

/// How the fake behaves.
#[derive(Clone, Default)]
pub struct Provider {
    /// The only `Authorization: Bearer` key accepted (401 otherwise); any
    /// key when `None`.
    pub key: Option<&'static str>,
    /// Time before each answer.
    pub latency: Duration,
    /// Chat calls received.
    pub calls: Arc<AtomicU32>,
    /// The last chat request's body.
    pub last_body: Arc<std::sync::Mutex<serde_json::Value>>,
    /// Answer every chat request with this status and no body (a provider
    /// that is down: 503, 529, …).
    pub fail_with: Option<StatusCode>,
    /// Take requests without any `Authorization` (an in-cluster engine
    /// registered with no key).
    pub no_auth: bool,
    /// The last chat request's headers.
    pub last_headers: Arc<std::sync::Mutex<HeaderMap>>,
}

impl Provider {
    /// Serves on an ephemeral loopback port; returns the base URL
    /// (`http://127.0.0.1:P/v1`).
    pub async fn start(self) -> String {
        let chat = move |headers: HeaderMap, body: axum::body::Bytes| {
            let this = self.clone();
            async move {
                this.calls.fetch_add(1, Ordering::SeqCst);
                let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                if let Ok(mut last) = this.last_body.lock() {
                    *last = request.clone();
                }
                tokio::time::sleep(this.latency).await;
                if let Ok(mut last) = this.last_headers.lock() {
                    *last = headers.clone();
                }
                let bearer = headers.get("authorization").and_then(|v| v.to_str().ok());
                let allowed = match this.key {
                    _ if this.no_auth => true,
                    Some(key) => bearer == Some(format!("Bearer {key}").as_str()),
                    None => bearer.is_some(),
                };
                if !allowed {
                    return (StatusCode::UNAUTHORIZED, HeaderMap::new(), String::new());
                }
                if let Some(status) = this.fail_with {
                    return (status, HeaderMap::new(), String::new());
                }
                let mut body = String::new();
                let tool = request["tools"][0]["function"]["name"].as_str();
                let answered = request["messages"]
                    .as_array()
                    .and_then(|m| m.last())
                    .is_some_and(|m| m["role"] == "tool");
                let finish = match tool {
                    Some(name) if !answered => {
                        let start = json!({"index": 0, "id": "call_fake", "type": "function", "function": {"name": name, "arguments": "{\"city\": "}});
                        let rest = json!({"index": 0, "function": {"arguments": "\"Paris\"}"}});
                        for call in [start, rest] {
                            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": null}]});
                            body.push_str(&format!("data: {chunk}\n\n"));
                        }
                        "tool_calls"
                    }
                    _ => {
                        for piece in ["Hello", " from", " fake"] {
                            let chunk = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": null}]});
                            body.push_str(&format!("data: {chunk}\n\n"));
                        }
                        "stop"
                    }
                };
                let end = json!({"id": "x", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]});
                body.push_str(&format!("data: {end}\n\n"));
                let usage = json!({"id": "x", "object": "chat.completion.chunk", "choices": [], "usage": {"prompt_tokens": 12, "completion_tokens": 3}});
                body.push_str(&format!("data: {usage}\n\ndata: [DONE]\n\n"));
                let mut h = HeaderMap::new();
                h.insert("content-type", "text/event-stream".parse().unwrap());
                (StatusCode::OK, h, body)
            }
        };
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route(
                "/v1/models",
                get(|| async { StatusCode::OK.into_response() }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/v1", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        url
    }
}
