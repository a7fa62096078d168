//! JSON Lines: one object a line with `text` and `intent` (or `label`) and
//! optionally `domain`; other keys are ignored and named in the notes.
//! Blank lines are skipped.

use std::{collections::BTreeSet, path::Path};

use super::{Parsed, Row, data_error};
use crate::UnderstandingError;

/// Parses `text` (the contents of `path`).
pub fn parse(path: &Path, text: &str) -> Result<Parsed, UnderstandingError> {
    let mut parsed = Parsed::default();
    let mut ignored = BTreeSet::new();
    for (i, line) in text.lines().enumerate() {
        let at = format!("line {}", i + 1);
        if line.trim().is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(line).map_err(|e| data_error(path, &at, e))?;
        let object = value
            .as_object()
            .ok_or_else(|| data_error(path, &at, "each line is a JSON object"))?;
        let string = |key: &str| -> Result<Option<String>, UnderstandingError> {
            match object.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(data_error(path, &at, format!("{key:?} must be a string"))),
            }
        };
        let text = string("text")?.ok_or_else(|| data_error(path, &at, "no \"text\""))?;
        let label = match (string("intent")?, string("label")?) {
            (Some(l), None) | (None, Some(l)) => l,
            (Some(_), Some(_)) => {
                return Err(data_error(
                    path,
                    &at,
                    "both \"intent\" and \"label\"; keep one",
                ));
            }
            (None, None) => return Err(data_error(path, &at, "no \"intent\" (or \"label\")")),
        };
        for key in object.keys() {
            if !["text", "intent", "label", "domain"].contains(&key.as_str()) {
                ignored.insert(key.clone());
            }
        }
        parsed.train.push(Row {
            text,
            label,
            domain: string("domain")?,
            at,
        });
    }
    if !ignored.is_empty() {
        parsed.notes.push(format!(
            "{}: ignored key(s) {}",
            path.display(),
            ignored.into_iter().collect::<Vec<_>>().join(", ")
        ));
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rows_keys_and_errors() {
        let p = parse(
            Path::new("d.jsonl"),
            "{\"text\":\"hi\",\"intent\":\"greet\",\"id\":1}\n\n{\"text\":\"x\",\"label\":\"y\",\"domain\":\"z\"}\n",
        )
        .unwrap();
        assert_eq!(p.train.len(), 2);
        assert_eq!(p.train[1].at, "line 3");
        assert_eq!(p.train[1].domain.as_deref(), Some("z"));
        assert!(p.notes[0].contains("id"));
        let e = parse(Path::new("d.jsonl"), "{\"text\":\"hi\"}\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d.jsonl: line 1: no \"intent\""), "{e}");
        let e = parse(
            Path::new("d.jsonl"),
            "{\"text\":\"a\",\"intent\":\"b\"}\nnot json\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("d.jsonl: line 2:"), "{e}");
    }
}
