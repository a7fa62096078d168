//! CSV and TSV with a header row: a text column (`text`, `utterance`,
//! `sentence` or `example`), a label column (`label`, `intent` or
//! `category`) and an optional `domain` column, in any order and case.
//! Other columns are ignored and named in the notes. Parsed with the `csv`
//! crate (RFC 4180 quoting, so a text may hold the delimiter or a line
//! break); a row's line is where it starts.

use std::path::Path;

use super::{Parsed, Row, data_error};
use crate::UnderstandingError;

const TEXT: [&str; 4] = ["text", "utterance", "sentence", "example"];
const LABEL: [&str; 3] = ["label", "intent", "category"];

/// Parses `text` (the contents of `path`) with `delimiter`.
pub fn parse(path: &Path, text: &str, delimiter: u8) -> Result<Parsed, UnderstandingError> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_reader(text.as_bytes());
    let headers = reader
        .headers()
        .map_err(|e| data_error(path, "line 1", e))?
        .clone();
    let find = |names: &[&str]| {
        headers
            .iter()
            .position(|h| names.contains(&h.trim().to_ascii_lowercase().as_str()))
    };
    let text_col = find(&TEXT).ok_or_else(|| {
        data_error(
            path,
            "line 1",
            format!("no text column (one of {})", TEXT.join(", ")),
        )
    })?;
    let label_col = find(&LABEL).ok_or_else(|| {
        data_error(
            path,
            "line 1",
            format!("no label column (one of {})", LABEL.join(", ")),
        )
    })?;
    let domain_col = find(&["domain"]);
    let mut parsed = Parsed::default();
    let ignored: Vec<&str> = headers
        .iter()
        .enumerate()
        .filter(|(i, _)| ![Some(text_col), Some(label_col), domain_col].contains(&Some(*i)))
        .map(|(_, h)| h)
        .collect();
    if !ignored.is_empty() {
        parsed.notes.push(format!(
            "{}: ignored column(s) {}",
            path.display(),
            ignored.join(", ")
        ));
    }
    for record in reader.records() {
        let record = record.map_err(|e| {
            let at = e
                .position()
                .map(|p| format!("line {}", p.line()))
                .unwrap_or_default();
            data_error(path, &at, e)
        })?;
        let line = record.position().map_or(0, csv::Position::line);
        let cell = |i: usize| record.get(i).unwrap_or_default().to_owned();
        parsed.train.push(Row {
            text: cell(text_col),
            label: cell(label_col),
            domain: domain_col.map(cell),
            at: format!("line {line}"),
        });
    }
    Ok(parsed)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn columns_in_any_order_quotes_and_lines() {
        let text = "ID,Domain,Category,Text\n1,bank,pay,\"pay my bill, now\"\n2,bank,card,\"lost\ncard\"\n3,bank,pay,pay it\n";
        let p = parse(Path::new("x.csv"), text, b',').unwrap();
        assert_eq!(p.train.len(), 3);
        assert_eq!(p.train[0].text, "pay my bill, now");
        assert_eq!(p.train[0].domain.as_deref(), Some("bank"));
        assert_eq!(p.train[1].label, "card");
        assert_eq!(p.train[2].at, "line 5");
        assert!(p.notes[0].contains("ID"));
    }

    #[test]
    fn a_short_row_and_a_missing_column_name_their_line() {
        let e = parse(Path::new("x.tsv"), "text\tlabel\na\tb\nc\n", b'\t')
            .unwrap_err()
            .to_string();
        assert!(e.contains("x.tsv: line 3"), "{e}");
        let e = parse(Path::new("y.csv"), "sentence,foo\na,b\n", b',')
            .unwrap_err()
            .to_string();
        assert!(e.contains("y.csv: line 1: no label column"), "{e}");
    }
}
