//! Checks every adapter shares, on values already taken out of their wire
//! format: the conversation's roles and order, sampling bounds, `user` and
//! `metadata` bounds (as OpenAI documents them), tool declarations. Errors
//! are 400s that name the field as the client spelled it.

use std::collections::BTreeMap;

use moltbot_proto::generation::v1::{self as gen_pb, tool_choice::Mode};

use crate::ApiError;

/// One message as an adapter read it.
#[derive(Debug, Clone, Default)]
pub struct Incoming {
    /// `system`, `developer`, `user`, `assistant` or `tool`.
    pub role: String,
    /// Its text.
    pub text: String,
    /// An assistant message's function calls. The adapter refuses calls on
    /// any other role while reading its wire format (chat: `calls_of`;
    /// Responses builds them only on assistant messages).
    pub tool_calls: Vec<gen_pb::ToolCall>,
    /// A tool result's call id.
    pub tool_call_id: Option<String>,
}

/// A validated conversation.
#[derive(Debug, Clone, Default)]
pub struct Conversation {
    /// System and developer messages, in order.
    pub system: Vec<String>,
    /// The other messages, in order.
    pub messages: Vec<gen_pb::ChatMessage>,
    /// Text of the last user message.
    pub last_user: String,
}

fn invalid<T>(message: String) -> Result<T, ApiError> {
    Err(ApiError::InvalidRequest(message))
}

/// Validates `items` (named `field[i]` in errors): known roles, a non-empty
/// text on user messages, a call id on
/// (and only on) tool results, and a last message from the user or a tool.
pub fn conversation(items: Vec<Incoming>, field: &str) -> Result<Conversation, ApiError> {
    if items.is_empty() {
        return invalid(format!("{field} is empty; send at least one user message"));
    }
    let mut c = Conversation::default();
    for (i, item) in items.into_iter().enumerate() {
        let role = match item.role.as_str() {
            "system" | "developer" => {
                c.system.push(item.text);
                continue;
            }
            "user" => gen_pb::Role::User,
            "assistant" => gen_pb::Role::Assistant,
            "tool" => gen_pb::Role::Tool,
            other => {
                return invalid(format!(
                    "{field}[{i}].role `{other}` is not one of system, developer, user, assistant, tool"
                ));
            }
        };
        if role == gen_pb::Role::User {
            if item.text.trim().is_empty() {
                return invalid(format!("{field}[{i}].content is empty"));
            }
            c.last_user.clone_from(&item.text);
        }
        let tool_call_id = match (role, item.tool_call_id) {
            (gen_pb::Role::Tool, Some(id)) if !id.is_empty() => id,
            (gen_pb::Role::Tool, _) => {
                return invalid(format!(
                    "{field}[{i}].tool_call_id is required on a `tool` message"
                ));
            }
            (_, Some(_)) => {
                return invalid(format!(
                    "{field}[{i}].tool_call_id is only allowed on a `tool` message"
                ));
            }
            (_, None) => String::new(),
        };
        c.messages.push(gen_pb::ChatMessage {
            role: role as i32,
            content: item.text,
            tool_calls: item.tool_calls,
            tool_call_id,
        });
    }
    match c.messages.last() {
        Some(last)
            if last.role == gen_pb::Role::User as i32 || last.role == gen_pb::Role::Tool as i32 =>
        {
            Ok(c)
        }
        _ => invalid("the last non-system message must have role `user` or `tool`".to_owned()),
    }
}

/// Checks temperature in [0, 2], top-p in (0, 1] and a completion budget
/// of at least one token.
pub fn sampling_bounds(
    temperature: Option<f32>,
    top_p: Option<f32>,
    max_tokens: Option<u32>,
) -> Result<(), ApiError> {
    if temperature.is_some_and(|t| !(0.0..=2.0).contains(&t)) {
        return invalid("temperature must be in [0, 2]".to_owned());
    }
    if top_p.is_some_and(|p| !(p > 0.0 && p <= 1.0)) {
        return invalid("top_p must be in (0, 1]".to_owned());
    }
    if max_tokens == Some(0) {
        return invalid("max_tokens must be at least 1".to_owned());
    }
    Ok(())
}

/// Checks `user` (at most 256 characters) and `metadata` (at most 16
/// pairs, keys of at most 64 characters, values of at most 512).
pub fn user_and_metadata(
    user: Option<&str>,
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<(), ApiError> {
    if user.is_some_and(|u| u.chars().count() > 256) {
        return invalid("user: at most 256 characters".to_owned());
    }
    if let Some(meta) = metadata {
        if meta.len() > 16 {
            return invalid("metadata: at most 16 key-value pairs".to_owned());
        }
        for (k, v) in meta {
            if k.chars().count() > 64 || v.chars().count() > 512 {
                return invalid(format!(
                    "metadata `{}`: keys take at most 64 characters and values 512",
                    k.chars().take(64).collect::<String>()
                ));
            }
        }
    }
    Ok(())
}

/// A function tool declaration (`tools[i]`), whose `type` must be
/// `function`.
pub fn function_tool(
    i: usize,
    kind: &str,
    name: &str,
    description: Option<&str>,
    parameters: Option<&serde_json::Value>,
) -> Result<gen_pb::Tool, ApiError> {
    if kind != "function" {
        return invalid(format!("tools[{i}].type `{kind}` is not `function`"));
    }
    Ok(gen_pb::Tool {
        name: name.to_owned(),
        description: description.unwrap_or_default().to_owned(),
        parameters_json: parameters.map(|p| p.to_string()).unwrap_or_default(),
    })
}

/// `tool_choice` as a mode (`auto`, `none`, `required`).
pub fn tool_choice_mode(mode: &str) -> Result<gen_pb::ToolChoice, ApiError> {
    let mode = match mode {
        "auto" => Mode::Auto,
        "none" => Mode::None,
        "required" => Mode::Required,
        other => {
            return invalid(format!(
                "tool_choice `{other}` is not one of auto, none, required, or a named function"
            ));
        }
    };
    Ok(gen_pb::ToolChoice {
        mode: mode as i32,
        function: String::new(),
    })
}

/// `tool_choice` naming one function.
pub fn tool_choice_named(name: &str) -> gen_pb::ToolChoice {
    gen_pb::ToolChoice {
        mode: Mode::Function as i32,
        function: name.to_owned(),
    }
}

/// Refuses a tool choice without tools.
pub fn tools_and_choice(
    tools: &[gen_pb::Tool],
    choice: Option<&gen_pb::ToolChoice>,
) -> Result<(), ApiError> {
    if tools.is_empty() && choice.is_some() {
        return invalid("tool_choice is only allowed when tools are given".to_owned());
    }
    Ok(())
}
