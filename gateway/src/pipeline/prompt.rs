//! Prompt assembly within the model's context window: the route's system
//! prompt with the retrieved passages, as much recent history as fits, then
//! the request's own messages. Token counts come from the generation service's
//! `CountTokens` (the model's own tokenizer and chat template).

use std::time::Duration;

use moltbot_proto::{
    context::v1 as ctx,
    generation::v1::{
        ChatMessage, CountTokensRequest, Role, generation_service_client::GenerationServiceClient,
    },
};
use moltbot_runtime::grpc::client::TracedChannel;

use crate::{ApiError, openai::Source};

/// Chat-template tokens around each message besides its content
/// (`<|im_start|>`, the role, `\n`, `<|im_end|>`, `\n` in ChatML, Qwen2's
/// template); a history turn costs its content tokens plus this.
pub const PER_MESSAGE_OVERHEAD_TOKENS: u32 = 5;

/// The system message: the route's prompt, the client's system messages, then
/// the passages, each headed by the id the answer may cite.
pub fn system_message(
    route_prompt: Option<&str>,
    client_system: &[String],
    sources: &[Source],
) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(p) = route_prompt {
        parts.push(p.to_owned());
    }
    parts.extend(client_system.iter().cloned());
    if !sources.is_empty() {
        let mut block = String::from("Knowledge-base passages:");
        for s in sources {
            block.push_str(&format!("\n[{}] {}", s.id, s.text.trim()));
        }
        parts.push(block);
    }
    parts.join("\n\n")
}

/// The assembled prompt.
#[derive(Debug, Clone)]
pub struct Assembled {
    /// Messages for `Generate`: system, history (oldest first), new messages.
    pub messages: Vec<ChatMessage>,
    /// Completion budget after clamping to the room left, in tokens.
    pub max_tokens: u32,
    /// History turns kept (the most recent ones).
    pub history_kept: usize,
    /// Content tokens of each new message, for storing the turns.
    pub new_message_tokens: Vec<u32>,
    /// The model's context window, in tokens.
    pub context_length: u32,
}

fn gen_role(role: ctx::Role) -> Role {
    match role {
        ctx::Role::System => Role::System,
        ctx::Role::User | ctx::Role::Unspecified => Role::User,
        ctx::Role::Assistant => Role::Assistant,
        ctx::Role::Tool => Role::Tool,
    }
}

/// Counts and assembles the prompt for `model`.
///
/// `max_tokens` is the completion budget wanted; it is reserved before history
/// is added, and clamped to what is left when the prompt itself is long.
///
/// Errors: [`ApiError::ContextLengthExceeded`] when the system message and the
/// new messages alone leave no room for one completion token;
/// [`ApiError::Upstream`] when `CountTokens` fails (NOT_FOUND for a model the
/// generation service does not serve).
pub async fn assemble(
    channel: TracedChannel,
    model: &str,
    system: String,
    history: &[ctx::Turn],
    new: Vec<ChatMessage>,
    max_tokens: u32,
    timeout: Duration,
) -> Result<Assembled, ApiError> {
    let mut head = vec![ChatMessage {
        role: Role::System as i32,
        content: system,
    }];
    head.extend(new.iter().cloned());
    let texts: Vec<String> = history
        .iter()
        .map(|t| t.content.clone())
        .chain(new.iter().map(|m| m.content.clone()))
        .collect();
    let mut request = tonic::Request::new(CountTokensRequest {
        model: model.to_owned(),
        messages: head.clone(),
        texts,
    });
    request.set_timeout(timeout);
    let mut client = GenerationServiceClient::new(channel);
    let counted = client
        .count_tokens(request)
        .await
        .map_err(|status| ApiError::Upstream {
            service: "generation",
            status,
        })?
        .into_inner();
    let context_length = counted.context_length;
    let prompt = counted.prompt_tokens;
    if prompt >= context_length {
        return Err(ApiError::ContextLengthExceeded {
            model: model.to_owned(),
            prompt_tokens: prompt,
            context_length,
        });
    }
    let room = context_length - prompt;
    let max_tokens = max_tokens.min(room);
    let mut budget = room - max_tokens;
    let history_tokens = &counted.text_tokens[..history.len().min(counted.text_tokens.len())];
    let mut kept = 0;
    for tokens in history_tokens.iter().rev() {
        let cost = tokens + PER_MESSAGE_OVERHEAD_TOKENS;
        if cost > budget {
            break;
        }
        budget -= cost;
        kept += 1;
    }
    let mut messages = Vec::with_capacity(1 + kept + new.len());
    messages.push(head.swap_remove(0));
    for t in &history[history.len() - kept..] {
        messages.push(ChatMessage {
            role: gen_role(t.role()) as i32,
            content: t.content.clone(),
        });
    }
    messages.extend(new);
    Ok(Assembled {
        messages,
        max_tokens,
        history_kept: kept,
        new_message_tokens: counted.text_tokens[history_tokens.len()..].to_vec(),
        context_length,
    })
}

/// The prompt when no model of the chain can count tokens (every one is
/// remote): the system message, the whole loaded history, the new messages;
/// the provider enforces its own context window.
pub fn uncounted(
    system: String,
    history: &[ctx::Turn],
    new: Vec<ChatMessage>,
    max_tokens: u32,
) -> Assembled {
    let mut messages = vec![ChatMessage {
        role: Role::System as i32,
        content: system,
    }];
    messages.extend(history.iter().map(|t| ChatMessage {
        role: gen_role(t.role()) as i32,
        content: t.content.clone(),
    }));
    let new_len = new.len();
    messages.extend(new);
    Assembled {
        messages,
        max_tokens,
        history_kept: history.len(),
        new_message_tokens: vec![0; new_len],
        context_length: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn system_message_lists_passages_with_ids() {
        let s = system_message(
            Some("Be brief."),
            &["Speak French.".to_owned()],
            &[Source {
                id: "docs:README.md#0".to_owned(),
                score: 0.8,
                text: " MoltBot is a mesh. ".to_owned(),
            }],
        );
        assert_eq!(
            s,
            "Be brief.\n\nSpeak French.\n\nKnowledge-base passages:\n[docs:README.md#0] MoltBot is a mesh."
        );
        assert_eq!(system_message(None, &[], &[]), "");
    }
}
