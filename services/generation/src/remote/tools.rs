//! Function calling on remote providers: OpenAI-compatible servers take
//! OpenAI's `tools`/`tool_choice` and assistant `tool_calls` as they are;
//! Anthropic's Messages API gets them translated to its `tools` (with
//! `input_schema`), `tool_choice` (`auto`/`any`/`tool`) and `tool_use` /
//! `tool_result` content blocks. Streamed calls arrive in fragments (a name
//! and id first, then pieces of the arguments' JSON) that [`Calls`] joins
//! into whole calls, emitted after the text.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::{
    engine::Event,
    text::{
        ChatMessage,
        tools::{ToolMode, ToolRequest},
    },
};

/// A piece of a streamed call.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Fragment {
    /// Which call of the answer (the provider's index).
    pub index: u64,
    /// The call's id, on its first fragment.
    pub id: Option<String>,
    /// The function's name, on its first fragment.
    pub name: Option<String>,
    /// A piece of the arguments' JSON text.
    pub arguments: String,
}

fn call_parts(call: &Value) -> (String, String, Value) {
    let id = call["id"].as_str().unwrap_or_default().to_owned();
    let name = call["function"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (id, name, call["function"]["arguments"].clone())
}

/// A tool result without the id of its call (one replayed from a session,
/// which keeps no call ids): providers require the id, so it goes as a user
/// message that says what it is.
fn orphan_result(m: &ChatMessage) -> Option<String> {
    (m.role == "tool" && m.tool_call_id.is_empty()).then(|| format!("Tool result:\n{}", m.content))
}

/// The conversation as OpenAI messages: calls with their arguments as JSON
/// text, tool messages with the id they answer.
pub fn openai_messages(messages: &[ChatMessage]) -> Vec<Value> {
    messages
        .iter()
        .map(|m| {
            if let Some(text) = orphan_result(m) {
                return json!({"role": "user", "content": text});
            }
            let mut v = json!({"role": m.role, "content": m.content});
            if !m.tool_calls.is_empty() {
                let calls: Vec<Value> = m
                    .tool_calls
                    .iter()
                    .map(|c| {
                        let (id, name, arguments) = call_parts(c);
                        json!({"id": id, "type": "function",
                               "function": {"name": name, "arguments": arguments.to_string()}})
                    })
                    .collect();
                v["tool_calls"] = json!(calls);
                if m.content.is_empty() {
                    v["content"] = Value::Null;
                }
            }
            if !m.tool_call_id.is_empty() {
                v["tool_call_id"] = json!(m.tool_call_id);
            }
            v
        })
        .collect()
}

/// Adds `tools`, `tool_choice` and `parallel_tool_calls` to an OpenAI body.
pub fn add_openai(body: &mut Value, request: &ToolRequest) {
    body["tools"] = json!(request.template_tools());
    body["tool_choice"] = match &request.mode {
        ToolMode::Auto => json!("auto"),
        ToolMode::Required => json!("required"),
        ToolMode::Function(name) => json!({"type": "function", "function": {"name": name}}),
    };
    body["parallel_tool_calls"] = json!(request.parallel);
}

/// The non-system conversation as Anthropic messages: assistant calls as
/// `tool_use` blocks, tool results as `tool_result` blocks of one user
/// message per run of tool messages (Anthropic alternates roles).
pub fn anthropic_messages(messages: &[ChatMessage]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    for m in messages.iter().filter(|m| m.role != "system") {
        if let Some(text) = orphan_result(m) {
            out.push(json!({"role": "user", "content": text}));
            continue;
        }
        if m.role == "tool" {
            let block =
                json!({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content});
            match out.last_mut() {
                Some(last)
                    if last["role"] == "user" && last["content"][0]["type"] == "tool_result" =>
                {
                    if let Some(blocks) = last["content"].as_array_mut() {
                        blocks.push(block);
                    }
                }
                _ => out.push(json!({"role": "user", "content": [block]})),
            }
            continue;
        }
        if m.role == "assistant" && !m.tool_calls.is_empty() {
            let mut blocks = Vec::new();
            if !m.content.is_empty() {
                blocks.push(json!({"type": "text", "text": m.content}));
            }
            for c in &m.tool_calls {
                let (id, name, input) = call_parts(c);
                blocks.push(json!({"type": "tool_use", "id": id, "name": name, "input": input}));
            }
            out.push(json!({"role": "assistant", "content": blocks}));
            continue;
        }
        let role = if m.role == "assistant" {
            "assistant"
        } else {
            "user"
        };
        out.push(json!({"role": role, "content": m.content}));
    }
    out
}

/// Adds `tools` and `tool_choice` to an Anthropic body.
pub fn add_anthropic(body: &mut Value, request: &ToolRequest) {
    let tools: Vec<Value> = request
        .tools
        .iter()
        .map(
            |t| json!({"name": t.name, "description": t.description, "input_schema": t.parameters}),
        )
        .collect();
    body["tools"] = json!(tools);
    let mut choice = match &request.mode {
        ToolMode::Auto => json!({"type": "auto"}),
        ToolMode::Required => json!({"type": "any"}),
        ToolMode::Function(name) => json!({"type": "tool", "name": name}),
    };
    if !request.parallel {
        choice["disable_parallel_tool_use"] = json!(true);
    }
    body["tool_choice"] = choice;
}

/// The call fragments of one OpenAI chunk (`choices[0].delta.tool_calls`).
pub fn openai_fragments(chunk: &Value) -> Vec<Fragment> {
    chunk["choices"][0]["delta"]["tool_calls"]
        .as_array()
        .map(|calls| {
            calls
                .iter()
                .map(|c| Fragment {
                    index: c["index"].as_u64().unwrap_or(0),
                    id: c["id"].as_str().map(str::to_owned),
                    name: c["function"]["name"].as_str().map(str::to_owned),
                    arguments: c["function"]["arguments"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The call fragment of one Anthropic event: a `tool_use` block's start
/// (id and name) or an `input_json_delta` (a piece of its input).
pub fn anthropic_fragment(event: &Value) -> Option<Fragment> {
    let index = event["index"].as_u64().unwrap_or(0);
    match event["type"].as_str()? {
        "content_block_start" if event["content_block"]["type"] == "tool_use" => Some(Fragment {
            index,
            id: event["content_block"]["id"].as_str().map(str::to_owned),
            name: event["content_block"]["name"].as_str().map(str::to_owned),
            arguments: String::new(),
        }),
        "content_block_delta" if event["delta"]["type"] == "input_json_delta" => Some(Fragment {
            index,
            arguments: event["delta"]["partial_json"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            ..Fragment::default()
        }),
        _ => None,
    }
}

/// The calls of one streamed answer, joined from their fragments.
#[derive(Debug, Default)]
pub struct Calls(BTreeMap<u64, (String, String, String)>);

impl Calls {
    /// Adds a fragment.
    pub fn push(&mut self, f: Fragment) {
        let entry = self.0.entry(f.index).or_default();
        if let Some(id) = f.id {
            entry.0 = id;
        }
        if let Some(name) = f.name {
            entry.1.push_str(&name);
        }
        entry.2.push_str(&f.arguments);
    }

    /// Whether any call arrived.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The calls as events, in the provider's order; empty arguments read
    /// as `{}`.
    pub fn into_events(self) -> Vec<Event> {
        self.0
            .into_values()
            .map(|(id, name, arguments)| Event::ToolCall {
                id,
                name,
                arguments: if arguments.trim().is_empty() {
                    "{}".to_owned()
                } else {
                    arguments
                },
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::panic)]
    use super::*;
    use crate::text::tools::ToolSpec;

    fn history() -> Vec<ChatMessage> {
        vec![
            ChatMessage {
                role: "user".into(),
                content: "Weather in Paris?".into(),
                ..Default::default()
            },
            ChatMessage {
                role: "assistant".into(),
                content: String::new(),
                tool_calls: vec![json!({"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}}})],
                ..Default::default()
            },
            ChatMessage {
                role: "tool".into(),
                content: "18 C".into(),
                tool_call_id: "call_1".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn conversations_translate_to_both_apis() {
        let openai = openai_messages(&history());
        assert_eq!(openai[1]["content"], Value::Null);
        assert_eq!(
            openai[1]["tool_calls"][0]["function"]["arguments"],
            r#"{"city":"Paris"}"#
        );
        assert_eq!(openai[2]["tool_call_id"], "call_1");
        let anthropic = anthropic_messages(&history());
        assert_eq!(anthropic[1]["content"][0]["type"], "tool_use");
        assert_eq!(anthropic[1]["content"][0]["input"]["city"], "Paris");
        assert_eq!(anthropic[2]["role"], "user");
        assert_eq!(anthropic[2]["content"][0]["tool_use_id"], "call_1");
        // A result replayed from a session has no call id.
        let mut replayed = history();
        replayed[2].tool_call_id.clear();
        assert_eq!(openai_messages(&replayed)[2]["role"], "user");
        assert_eq!(
            anthropic_messages(&replayed)[2]["content"],
            "Tool result:\n18 C"
        );

        let request = ToolRequest {
            tools: vec![ToolSpec {
                name: "get_weather".into(),
                description: "Weather".into(),
                parameters: json!({"type": "object"}),
            }],
            mode: ToolMode::Required,
            parallel: false,
        };
        let mut body = json!({});
        add_openai(&mut body, &request);
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["tools"][0]["function"]["name"], "get_weather");
        let mut body = json!({});
        add_anthropic(&mut body, &request);
        assert_eq!(body["tool_choice"]["type"], "any");
        assert_eq!(body["tool_choice"]["disable_parallel_tool_use"], true);
        assert_eq!(body["tools"][0]["input_schema"]["type"], "object");
    }

    #[test]
    fn streamed_fragments_join_into_calls() {
        let mut calls = Calls::default();
        for chunk in [
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": ""}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}}]}),
            json!({"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}}]}),
        ] {
            for f in openai_fragments(&chunk) {
                calls.push(f);
            }
        }
        for event in [
            json!({"type": "content_block_start", "index": 1, "content_block": {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}}}),
            json!({"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": "{\"city\": \"Oslo\"}"}}),
        ] {
            calls.push(anthropic_fragment(&event).unwrap());
        }
        let events = calls.into_events();
        assert_eq!(events.len(), 2);
        match &events[0] {
            Event::ToolCall {
                id,
                name,
                arguments,
            } => {
                assert_eq!((id.as_str(), name.as_str()), ("call_a", "get_weather"));
                assert_eq!(arguments, r#"{"city": "Paris"}"#);
            }
            other => panic!("{other:?}"),
        }
        match &events[1] {
            Event::ToolCall { id, arguments, .. } => {
                assert_eq!(id, "toolu_b");
                assert_eq!(arguments, r#"{"city": "Oslo"}"#);
            }
            other => panic!("{other:?}"),
        }
    }
}
