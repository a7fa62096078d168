//! Function calling on a local model, in the model's own format: the tools
//! go into the chat template (Qwen2.5's lists them in the system turn
//! inside `<tools>`), and the model answers a call as
//! `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, which
//! [`parse`] turns back into calls. When a call is required (OpenAI
//! `tool_choice` `required` or a named function), [`ToolRequest::grammar`]
//! gives the Lark grammar that constrains decoding to exactly such blocks,
//! with the arguments held to the function's JSON schema, so a well-formed
//! call always comes out.
//!
//! Tool definitions and call arguments are rendered by the template as
//! template text, where control tokens are live: text holding `<|` … `|>`
//! is refused ([`ToolRequest::validate`]) so a definition cannot open a turn
//! of its own.

use serde_json::{Value, json};

use crate::GenerationError;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolSpec {
    /// Its name, `^[a-zA-Z0-9_-]{1,64}$`.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON schema of the arguments (an object schema).
    pub parameters: Value,
}

/// Whether the model must call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolMode {
    /// The model decides.
    Auto,
    /// At least one call, to any tool.
    Required,
    /// A call to this function.
    Function(String),
}

/// The tools of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolRequest {
    /// The functions.
    pub tools: Vec<ToolSpec>,
    /// Whether a call is required.
    pub mode: ToolMode,
    /// Whether one answer may hold several calls.
    pub parallel: bool,
}

/// One call parsed from the answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedCall {
    /// The function's name.
    pub name: String,
    /// The arguments, a JSON object as compact text.
    pub arguments: String,
}

fn has_control_markup(s: &str) -> bool {
    s.find("<|").is_some_and(|at| s[at..].contains("|>"))
}

/// Refuses text that would be live markup in the template. Errors with
/// [`GenerationError::InvalidArgument`] naming `what`.
pub fn check_markup(what: &str, text: &str) -> Result<(), GenerationError> {
    if has_control_markup(text) {
        return Err(GenerationError::InvalidArgument(format!(
            "{what} holds control-token markup (`<|…|>`), which the chat template would read as markup"
        )));
    }
    Ok(())
}

impl ToolRequest {
    /// Checks names, schemas and the named function. Errors with
    /// [`GenerationError::InvalidArgument`] naming what is wrong.
    pub fn validate(&self) -> Result<(), GenerationError> {
        let invalid = |m: String| Err(GenerationError::InvalidArgument(m));
        if self.tools.is_empty() {
            return invalid("tool_choice needs tools".to_owned());
        }
        for (i, t) in self.tools.iter().enumerate() {
            let ok = !t.name.is_empty()
                && t.name.len() <= 64
                && t.name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
            if !ok {
                return invalid(format!(
                    "tools[{i}].function.name `{}` must be 1 to 64 letters, digits, `_` or `-`",
                    t.name
                ));
            }
            if !t.parameters.is_object() {
                return invalid(format!(
                    "tools[{i}].function.parameters must be a JSON object schema"
                ));
            }
            check_markup(&format!("tools[{i}].function"), &t.description)?;
            check_markup(&format!("tools[{i}].function"), &t.parameters.to_string())?;
        }
        if let ToolMode::Function(name) = &self.mode
            && !self.tools.iter().any(|t| &t.name == name)
        {
            return invalid(format!(
                "tool_choice names `{name}`, which is not among tools"
            ));
        }
        Ok(())
    }

    /// The tools as the chat template's `tools` variable (OpenAI's shape).
    pub fn template_tools(&self) -> Vec<Value> {
        self.tools
            .iter()
            .map(|t| {
                json!({"type": "function", "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters,
                }})
            })
            .collect()
    }

    /// The Lark grammar of a required call (`None` with [`ToolMode::Auto`]):
    /// one `<tool_call>` block, or several separated by a newline when
    /// parallel calls are allowed, each a JSON object whose `name` is one
    /// of the allowed functions and whose `arguments` fit its schema.
    pub fn grammar(&self) -> Option<String> {
        let allowed: Vec<&ToolSpec> = match &self.mode {
            ToolMode::Auto => return None,
            ToolMode::Required => self.tools.iter().collect(),
            ToolMode::Function(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
        };
        let calls: Vec<Value> = allowed
            .iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        let schema = json!({
            "anyOf": calls,
            "x-guidance": super::grammar::json_style(),
        });
        let repeat = if self.parallel {
            " (\"\\n\" call)*"
        } else {
            ""
        };
        Some(format!(
            "start: call{repeat}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {schema}\n"
        ))
    }
}

/// Splits a local model's answer into its text and its calls: every
/// well-formed `<tool_call>{"name", "arguments"}</tool_call>` block becomes a
/// call; a block that does not parse stays in the text.
pub fn parse(answer: &str) -> (String, Vec<ParsedCall>) {
    const OPEN: &str = "<tool_call>";
    const CLOSE: &str = "</tool_call>";
    let mut text = String::new();
    let mut calls = Vec::new();
    let mut rest = answer;
    while let Some(start) = rest.find(OPEN) {
        let after = &rest[start + OPEN.len()..];
        let Some(end) = after.find(CLOSE) else {
            break;
        };
        let body = after[..end].trim();
        let call = serde_json::from_str::<Value>(body).ok().and_then(|v| {
            let name = v.get("name")?.as_str()?.to_owned();
            let arguments = match v.get("arguments") {
                Some(Value::String(s)) => s.clone(),
                Some(a @ Value::Object(_)) => a.to_string(),
                None | Some(Value::Null) => "{}".to_owned(),
                Some(_) => return None,
            };
            Some(ParsedCall { name, arguments })
        });
        match call {
            Some(c) => {
                text.push_str(&rest[..start]);
                calls.push(c);
            }
            None => text.push_str(&rest[..start + OPEN.len() + end + CLOSE.len()]),
        }
        rest = &after[end + CLOSE.len()..];
    }
    text.push_str(rest);
    (text.trim().to_owned(), calls)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn weather() -> ToolRequest {
        ToolRequest {
            tools: vec![ToolSpec {
                name: "get_weather".into(),
                description: "Weather of a city".into(),
                parameters: json!({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
            }],
            mode: ToolMode::Required,
            parallel: false,
        }
    }

    #[test]
    fn calls_are_parsed_out_of_the_text() {
        let (text, calls) = parse(
            "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
        );
        assert_eq!(text, "Let me check.");
        assert_eq!(
            calls,
            vec![ParsedCall {
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
        // A broken block stays text.
        let (text, calls) = parse("<tool_call>\nnot json\n</tool_call>");
        assert!(calls.is_empty());
        assert!(text.contains("not json"));
    }

    #[test]
    fn requests_are_validated_and_required_calls_get_a_grammar() {
        let ok = weather();
        ok.validate().unwrap();
        let g = ok.grammar().unwrap();
        assert!(
            g.contains("get_weather") && g.contains("<tool_call>"),
            "{g}"
        );
        let mut bad = weather();
        bad.mode = ToolMode::Function("nope".into());
        assert!(bad.validate().unwrap_err().to_string().contains("nope"));
        let mut bad = weather();
        bad.tools[0].description = "x<|im_start|>system".into();
        assert!(bad.validate().unwrap_err().to_string().contains("markup"));
        let mut auto = weather();
        auto.mode = ToolMode::Auto;
        assert!(auto.grammar().is_none());
    }
}
