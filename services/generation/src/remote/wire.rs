//! Request bodies and stream events of the two provider APIs: OpenAI Chat
//! Completions (any OpenAI-compatible server) and Anthropic Messages.

use serde_json::{Value, json};

use crate::{backend::GenerateInput, text::grammar::ResponseFormat};

/// What one stream event of a provider means to us.
#[derive(Debug, Default, PartialEq)]
pub struct Parsed {
    /// New text.
    pub text: Option<String>,
    /// The provider's finish reason, when it sent one (`stop`, `length`,
    /// `end_turn`, `max_tokens`).
    pub finish: Option<String>,
    /// Prompt tokens, when reported.
    pub prompt_tokens: Option<usize>,
    /// Completion tokens, when reported.
    pub completion_tokens: Option<usize>,
    /// Pieces of function calls.
    pub tool_fragments: Vec<super::tools::Fragment>,
    /// The stream is over.
    pub done: bool,
}

/// `POST {base}/chat/completions` body (streaming, usage requested).
pub fn openai_body(model: &str, input: &GenerateInput) -> Value {
    let messages = super::tools::openai_messages(&input.messages);
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "stream_options": {"include_usage": true},
        "temperature": input.sampling.temperature,
        "top_p": input.sampling.top_p,
    });
    if let Some(n) = input.max_tokens {
        body["max_tokens"] = json!(n);
    }
    if !input.stop.is_empty() {
        body["stop"] = json!(input.stop);
    }
    if let Some(seed) = input.sampling.seed {
        body["seed"] = json!(seed);
    }
    if let Some(tools) = &input.tools {
        super::tools::add_openai(&mut body, tools);
    }
    match &input.response_format {
        None => {}
        Some(ResponseFormat::JsonObject) => {
            body["response_format"] = json!({"type": "json_object"});
        }
        Some(ResponseFormat::JsonSchema {
            name,
            description,
            schema,
            strict,
        }) => {
            let mut spec = json!({"name": name, "schema": schema, "strict": strict});
            if !description.is_empty() {
                spec["description"] = json!(description);
            }
            body["response_format"] = json!({"type": "json_schema", "json_schema": spec});
        }
    }
    body
}

/// Parses one OpenAI `data:` payload.
pub fn openai_event(data: &str) -> Parsed {
    if data.trim() == "[DONE]" {
        return Parsed {
            done: true,
            ..Parsed::default()
        };
    }
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return Parsed::default();
    };
    let choice = &v["choices"][0];
    Parsed {
        tool_fragments: super::tools::openai_fragments(&v),
        text: choice["delta"]["content"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(str::to_owned),
        finish: choice["finish_reason"].as_str().map(str::to_owned),
        prompt_tokens: v["usage"]["prompt_tokens"].as_u64().map(|n| n as usize),
        completion_tokens: v["usage"]["completion_tokens"].as_u64().map(|n| n as usize),
        done: false,
    }
}

/// Anthropic Messages API version header value.
pub const ANTHROPIC_VERSION: &str = "2023-06-01";

/// The tool a structured answer is asked for through on Anthropic, which
/// has no `response_format`: one forced tool whose input schema is the
/// answer's, its input streamed as `input_json_delta` events.
const ANTHROPIC_ANSWER_TOOL: &str = "json_answer";

/// `POST {base}/messages` body: system messages go to `system`; a
/// `response_format` becomes a forced tool ([`ANTHROPIC_ANSWER_TOOL`]).
pub fn anthropic_body(model: &str, input: &GenerateInput) -> Value {
    let system: Vec<&str> = input
        .messages
        .iter()
        .filter(|m| m.role == "system")
        .map(|m| m.content.as_str())
        .collect();
    let messages = super::tools::anthropic_messages(&input.messages);
    let mut body = json!({
        "model": model,
        "messages": messages,
        "stream": true,
        "max_tokens": input.max_tokens.unwrap_or(1024),
        "temperature": input.sampling.temperature,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n\n"));
    }
    if !input.stop.is_empty() {
        body["stop_sequences"] = json!(input.stop);
    }
    if let Some(tools) = &input.tools {
        super::tools::add_anthropic(&mut body, tools);
    }
    if let Some(format) = &input.response_format {
        body["tools"] = json!([{
            "name": ANTHROPIC_ANSWER_TOOL,
            "description": "Give the answer as this tool's input.",
            "input_schema": format.schema(),
        }]);
        body["tool_choice"] = json!({"type": "tool", "name": ANTHROPIC_ANSWER_TOOL});
    }
    body
}

/// Parses one Anthropic `data:` payload. With `answer_tool` (the request's
/// `response_format` went as the forced answer tool) the tool's input is
/// the answer's text; otherwise tool input is a function call's.
pub fn anthropic_event(data: &str, answer_tool: bool) -> Parsed {
    let Ok(v) = serde_json::from_str::<Value>(data) else {
        return Parsed::default();
    };
    if !answer_tool && let Some(fragment) = super::tools::anthropic_fragment(&v) {
        return Parsed {
            tool_fragments: vec![fragment],
            ..Parsed::default()
        };
    }
    match v["type"].as_str() {
        Some("message_start") => Parsed {
            prompt_tokens: v["message"]["usage"]["input_tokens"]
                .as_u64()
                .map(|n| n as usize),
            ..Parsed::default()
        },
        // Text, or the forced answer tool's input (a structured answer).
        Some("content_block_delta") => Parsed {
            text: v["delta"]["text"]
                .as_str()
                .or_else(|| v["delta"]["partial_json"].as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            ..Parsed::default()
        },
        Some("message_delta") => Parsed {
            finish: v["delta"]["stop_reason"].as_str().map(str::to_owned),
            completion_tokens: v["usage"]["output_tokens"].as_u64().map(|n| n as usize),
            ..Parsed::default()
        },
        Some("message_stop") => Parsed {
            done: true,
            ..Parsed::default()
        },
        _ => Parsed::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::ChatMessage;

    #[test]
    fn parses_both_apis() {
        let p = openai_event(r#"{"choices":[{"delta":{"content":"Hi"},"finish_reason":null}]}"#);
        assert_eq!(p.text.as_deref(), Some("Hi"));
        let p = openai_event(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2}}"#);
        assert_eq!((p.prompt_tokens, p.completion_tokens), (Some(5), Some(2)));
        assert!(openai_event("[DONE]").done);
        let p = anthropic_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Yo"}}"#,
            false,
        );
        assert_eq!(p.text.as_deref(), Some("Yo"));
        let p = anthropic_event(
            r#"{"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":7}}"#,
            false,
        );
        assert_eq!(
            (p.finish.as_deref(), p.completion_tokens),
            (Some("end_turn"), Some(7))
        );
        assert!(anthropic_event(r#"{"type":"message_stop"}"#, false).done);
    }

    #[test]
    fn structured_outputs_reach_both_apis() {
        let schema = json!({"type": "object", "properties": {"city": {"type": "string"}}});
        let input = GenerateInput {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: "Where?".into(),
                ..Default::default()
            }],
            max_tokens: Some(16),
            sampling: crate::sampling::SamplingConfig::default(),
            stop: Vec::new(),
            response_format: Some(ResponseFormat::JsonSchema {
                name: "place".into(),
                description: String::new(),
                schema: schema.clone(),
                strict: true,
            }),
            tools: None,
            logprobs: None,
            received: std::time::Instant::now(),
            affinity: String::new(),
        };
        let openai = openai_body("gpt", &input);
        assert_eq!(openai["response_format"]["type"], "json_schema");
        assert_eq!(openai["response_format"]["json_schema"]["name"], "place");
        assert_eq!(openai["response_format"]["json_schema"]["schema"], schema);
        assert_eq!(openai["response_format"]["json_schema"]["strict"], true);
        let anthropic = anthropic_body("claude", &input);
        assert_eq!(anthropic["tools"][0]["input_schema"], schema);
        assert_eq!(
            anthropic["tool_choice"]["name"],
            anthropic["tools"][0]["name"]
        );
        // The forced tool's input arrives as partial JSON: it is the answer.
        let p = anthropic_event(
            r#"{"type":"content_block_delta","index":0,"delta":{"type":"input_json_delta","partial_json":"{\"city\": "}}"#,
            true,
        );
        assert_eq!(p.text.as_deref(), Some(r#"{"city": "#));
        assert!(p.tool_fragments.is_empty());
    }
}
