//! CLINC150's JSON layout (Larson et al. 2019; `../../data/clinc150/`):
//! `train`, `val`, `oos_train` and `oos_val`, each a list of
//! `[text, intent]`; out-of-scope entries carry the intent `oos`. `test`
//! and `oos_test`, when present, are left out of training and validation
//! (the notes say so). The domain map is `domains.json` beside the file.

use std::path::Path;

use super::{Parsed, Row, data_error, read_domain_map};
use crate::UnderstandingError;

fn split(
    path: &Path,
    data: &serde_json::Value,
    name: &str,
    required: bool,
) -> Result<Vec<Row>, UnderstandingError> {
    let Some(list) = data.get(name) else {
        return if required {
            Err(data_error(path, "", format!("no {name:?} list")))
        } else {
            Ok(Vec::new())
        };
    };
    list.as_array()
        .ok_or_else(|| data_error(path, name, "is not a list"))?
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let at = format!("{name}[{i}]");
            match (
                p.get(0).and_then(|v| v.as_str()),
                p.get(1).and_then(|v| v.as_str()),
            ) {
                (Some(t), Some(l)) => Ok(Row {
                    text: t.to_owned(),
                    label: l.to_owned(),
                    domain: None,
                    at,
                }),
                _ => Err(data_error(path, &at, "every entry is [text, intent]")),
            }
        })
        .collect()
}

/// Parses `text` (the contents of `path`).
pub fn parse(path: &Path, text: &str) -> Result<Parsed, UnderstandingError> {
    let data: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| data_error(path, &format!("line {}", e.line()), e))?;
    let mut parsed = Parsed {
        train: [
            split(path, &data, "train", true)?,
            split(path, &data, "oos_train", false)?,
        ]
        .concat(),
        val: Some(
            [
                split(path, &data, "val", true)?,
                split(path, &data, "oos_val", false)?,
            ]
            .concat(),
        ),
        ..Parsed::default()
    };
    if data.get("test").is_some() || data.get("oos_test").is_some() {
        parsed.test = Some(
            [
                split(path, &data, "test", false)?,
                split(path, &data, "oos_test", false)?,
            ]
            .concat(),
        );
        parsed.notes.push(format!(
            "{}: `test`/`oos_test` left out of training and validation (`moltbot intents eval` scores them)",
            path.display()
        ));
    }
    let map = path.with_file_name("domains.json");
    if map.exists() {
        parsed.domain_map = Some((map.clone(), read_domain_map(&map)?));
    }
    Ok(parsed)
}
