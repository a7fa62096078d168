//! Rasa NLU training data (YAML, Rasa 2 and 3): `nlu:` entries with
//! `intent:` and `examples:`, the examples either a block of `- ` lines or
//! a list of `{text, metadata}` maps. Entity annotations —
//! `[Paris](city)`, `[Paris](city:paris)`, `[Paris]{"entity": "city"}` —
//! are reduced to their text. `synonym`, `regex` and `lookup` entries and
//! other top-level keys (`responses`, `stories`, `rules`) describe no
//! intent and are counted in the notes. Lines are found in the source by
//! the entry's `intent:` line and each example's own line.

use std::path::Path;

use serde_yaml_ng::Value;

use super::{Parsed, Row, data_error};
use crate::UnderstandingError;

/// Reduces Rasa entity annotations to their text: `[a](b)` and `[a]{…}`
/// become `a`; other brackets stay.
pub fn strip_entities(example: &str) -> String {
    let mut out = String::with_capacity(example.len());
    let mut rest = example;
    while let Some(open) = rest.find('[') {
        out.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let annotated = after.find(']').and_then(|close| {
            let tail = &after[close + 1..];
            let end = match tail.chars().next() {
                Some('(') => tail.find(')'),
                Some('{') => tail.find('}'),
                _ => None,
            }?;
            Some((&after[..close], &tail[end + 1..]))
        });
        match annotated {
            Some((text, tail)) => {
                out.push_str(text);
                rest = tail;
            }
            None => {
                out.push('[');
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

/// Line (1-based) of the first line at or after `from` (0-based) whose
/// trimmed text satisfies `hit`.
fn find_line(lines: &[&str], from: usize, hit: impl Fn(&str) -> bool) -> Option<usize> {
    lines
        .iter()
        .enumerate()
        .skip(from)
        .find(|(_, l)| hit(l.trim()))
        .map(|(i, _)| i + 1)
}

fn unquote(s: &str) -> &str {
    s.trim().trim_matches(|c| c == '"' || c == '\'')
}

/// Parses `text` (the contents of `path`).
pub fn parse(path: &Path, text: &str) -> Result<Parsed, UnderstandingError> {
    let doc: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!("line {}", l.line()))
            .unwrap_or_default();
        data_error(path, &at, e)
    })?;
    let lines: Vec<&str> = text.lines().collect();
    let mut parsed = Parsed::default();
    let map = doc
        .as_mapping()
        .ok_or_else(|| data_error(path, "", "Rasa NLU data is a mapping with an `nlu:` list"))?;
    let other: Vec<String> = map
        .keys()
        .filter_map(Value::as_str)
        .filter(|k| !["nlu", "version"].contains(k))
        .map(str::to_owned)
        .collect();
    if !other.is_empty() {
        parsed.notes.push(format!(
            "{}: top-level key(s) {} hold no intent examples and were skipped",
            path.display(),
            other.join(", ")
        ));
    }
    let entries = map
        .get("nlu")
        .and_then(Value::as_sequence)
        .ok_or_else(|| data_error(path, "", "no `nlu:` list"))?;
    let mut cursor = 0usize;
    let mut skipped = 0usize;
    for entry in entries {
        let Some(intent) = entry.get("intent") else {
            skipped += 1;
            continue;
        };
        let intent = intent
            .as_str()
            .ok_or_else(|| data_error(path, "", "an `intent:` is not a string"))?
            .to_owned();
        let line = find_line(&lines, cursor, |l| {
            l.trim_start_matches("- ")
                .strip_prefix("intent:")
                .is_some_and(|v| unquote(v) == intent)
        })
        .unwrap_or(cursor + 1);
        cursor = line;
        let at = format!("line {line}");
        let raw: Vec<String> = match entry.get("examples") {
            Some(Value::String(block)) => block
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| {
                    l.strip_prefix("- ").map(str::to_owned).ok_or_else(|| {
                        data_error(
                            path,
                            &at,
                            format!("intent {intent:?}: example {l:?} does not start with \"- \""),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
            Some(Value::Sequence(items)) => items
                .iter()
                .map(|item| {
                    item.get("text")
                        .and_then(Value::as_str)
                        .or_else(|| item.as_str())
                        .map(|t| t.trim().to_owned())
                        .ok_or_else(|| {
                            data_error(
                                path,
                                &at,
                                format!("intent {intent:?}: an example has no `text:`"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?,
            _ => {
                return Err(data_error(
                    path,
                    &at,
                    format!("intent {intent:?} has no `examples:`"),
                ));
            }
        };
        if raw.is_empty() {
            return Err(data_error(
                path,
                &at,
                format!("intent {intent:?} has no examples"),
            ));
        }
        for example in raw {
            let example_line = find_line(&lines, cursor, |l| {
                let l = l.trim_start_matches("- ");
                l == example
                    || l.strip_prefix("text:")
                        .is_some_and(|v| unquote(v) == example)
            });
            if let Some(l) = example_line {
                cursor = l;
            }
            parsed.train.push(Row {
                text: strip_entities(&example),
                label: intent.clone(),
                domain: None,
                at: format!("line {}", example_line.unwrap_or(line)),
            });
        }
    }
    if skipped > 0 {
        parsed.notes.push(format!(
            "{}: {skipped} synonym/regex/lookup entr{} skipped (the intent head uses intent examples only)",
            path.display(),
            if skipped == 1 { "y" } else { "ies" }
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const NLU: &str = r#"version: "3.1"
nlu:
- intent: greet
  examples: |
    - hey
    - hello there
- synonym: savings
  examples: |
    - pink pig
- intent: banking/check_balance
  examples: |
    - what's my [checking](account) balance?
    - balance of [savings]{"entity": "account"} please
- intent: inform
  examples:
  - text: |
      i'm in [Paris](city:paris)
    metadata:
      sentiment: neutral
responses:
  utter_greet:
  - text: hi
"#;

    #[test]
    fn intents_examples_entities_and_lines() {
        let p = parse(Path::new("nlu.yml"), NLU).unwrap();
        let got: Vec<(&str, &str, &str)> = p
            .train
            .iter()
            .map(|r| (r.text.as_str(), r.label.as_str(), r.at.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("hey", "greet", "line 5"),
                ("hello there", "greet", "line 6"),
                (
                    "what's my checking balance?",
                    "banking/check_balance",
                    "line 12"
                ),
                (
                    "balance of savings please",
                    "banking/check_balance",
                    "line 13"
                ),
                ("i'm in Paris", "inform", "line 17"),
            ]
        );
        assert!(p.notes.iter().any(|n| n.contains("responses")));
        assert!(p.notes.iter().any(|n| n.contains("1 synonym")));
    }

    #[test]
    fn errors_name_the_line() {
        let e = parse(
            Path::new("n.yml"),
            "nlu:\n- intent: a\n  examples: |\n    hey\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("n.yml: line 2:") && e.contains("\"- \""), "{e}");
        let e = parse(Path::new("n.yml"), "nlu:\n- intent: a\n  examples: [\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("n.yml: line"), "{e}");
        assert_eq!(strip_entities("a [b] c [d](e)"), "a [b] c d");
    }
}
