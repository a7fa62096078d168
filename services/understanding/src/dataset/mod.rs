//! Intent datasets in the formats operators already have, read into one
//! shape for the trainer (`crate::train`) and the evaluator
//! (`crate::eval`).
//!
//! Formats ([`Format`], chosen by file extension unless `--format` says):
//! - CSV / TSV with a header: a text column (`text`, `utterance`,
//!   `sentence` or `example`), a label column (`label`, `intent` or
//!   `category`) and optionally `domain` ([`table`]);
//! - JSON Lines: `{"text": …, "intent": …, "domain": …}` (`label` for
//!   `intent`; `domain` optional) ([`jsonl`]);
//! - Rasa NLU YAML: `nlu:` entries with `intent:` and `examples:`, entity
//!   annotations reduced to their text ([`rasa`]);
//! - CLINC150's JSON (`train`, `val`, `oos_train`, `oos_val` lists of
//!   `[text, intent]`) with its domain map `domains.json` beside it
//!   ([`clinc`]).
//!
//! Hierarchy ([`Hierarchy`]): a domain column, labels written
//! `domain/intent` or `domain.intent` (the intent keeps its full label, so
//! equal leaf names in two domains stay apart), a domain map file, or none
//! (one domain named after the dataset). Out-of-scope examples are
//! optional: rows labelled `--oos-label` (`oos`), or a separate file of
//! texts. Without a validation file or split, a stratified, seeded one is
//! made ([`split`]). A bad row is an error naming its file and line;
//! nothing is dropped without a word in [`Dataset::notes`].

pub mod clinc;
pub mod jsonl;
pub mod rasa;
pub mod split;
pub mod table;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use crate::UnderstandingError;

/// The label every out-of-scope example carries inside MoltBot (the
/// head's `oos` class), whatever the source called it.
pub const OOS: &str = "oos";

/// One labelled utterance as read from a file, before the hierarchy is
/// resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// The utterance.
    pub text: String,
    /// Its label as written (an intent, `domain/intent`, or the
    /// out-of-scope label).
    pub label: String,
    /// Its domain when the file has a domain column.
    pub domain: Option<String>,
    /// Where it is, for errors: `line 12`, or `train[3]` in CLINC150 JSON.
    pub at: String,
}

/// A file's rows, and the validation rows when the file carries its own
/// split (CLINC150's `val`).
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    /// Training rows.
    pub train: Vec<Row>,
    /// Validation rows, when the format has a split.
    pub val: Option<Vec<Row>>,
    /// A domain map beside the data (CLINC150's `domains.json`): its path
    /// and intent → domain.
    pub domain_map: Option<(PathBuf, BTreeMap<String, String>)>,
    /// Test rows, when the format has a test split (CLINC150's `test` +
    /// `oos_test`): never trained or validated on; what
    /// [`load_rows`] scores.
    pub test: Option<Vec<Row>>,
    /// What was read but not used (ignored columns, Rasa synonyms …).
    pub notes: Vec<String>,
}

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Comma-separated with a header row.
    Csv,
    /// Tab-separated with a header row.
    Tsv,
    /// One JSON object a line.
    Jsonl,
    /// Rasa NLU training data (YAML).
    Rasa,
    /// CLINC150's JSON layout.
    Clinc,
}

impl Format {
    /// The format of `path` by its extension (`.csv`, `.tsv`, `.jsonl` or
    /// `.ndjson`, `.yml` or `.yaml`, `.json`). Errors naming the flag to set.
    pub fn of(path: &Path) -> Result<Self, UnderstandingError> {
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .unwrap_or_default()
            .to_ascii_lowercase();
        Ok(match ext.as_str() {
            "csv" => Self::Csv,
            "tsv" | "tab" => Self::Tsv,
            "jsonl" | "ndjson" => Self::Jsonl,
            "yml" | "yaml" => Self::Rasa,
            "json" => Self::Clinc,
            _ => {
                return Err(UnderstandingError::Data(format!(
                    "{}: cannot tell the format from the extension; name it with --format csv|tsv|jsonl|rasa|clinc",
                    path.display()
                )));
            }
        })
    }

    fn parse(self, path: &Path, text: &str) -> Result<Parsed, UnderstandingError> {
        match self {
            Self::Csv => table::parse(path, text, b','),
            Self::Tsv => table::parse(path, text, b'\t'),
            Self::Jsonl => jsonl::parse(path, text),
            Self::Rasa => rasa::parse(path, text),
            Self::Clinc => clinc::parse(path, text),
        }
    }
}

/// Where domains come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Hierarchy {
    /// A domain column or map when there is one; else `/` when every
    /// in-scope label has one; else `.` likewise; else none.
    Auto,
    /// The file's domain column (or the domain map).
    Column,
    /// Labels written `domain/intent`.
    Slash,
    /// Labels written `domain.intent`.
    Dot,
    /// One domain, named after the dataset.
    None,
}

/// What to read and how.
#[derive(Debug, Clone)]
pub struct Source {
    /// The data file.
    pub data: PathBuf,
    /// Its format; `None`: by extension.
    pub format: Option<Format>,
    /// A validation file in the same format; `None`: the data's own split,
    /// or one made with `val_share`.
    pub val: Option<PathBuf>,
    /// Out-of-scope texts, one per line (`#` comments); `None`: none.
    pub oos: Option<PathBuf>,
    /// A domain map `{domain: [intent, …]}`; `None`: `domains.json` beside
    /// CLINC150 JSON, else none.
    pub domains: Option<PathBuf>,
    /// How domains are found.
    pub hierarchy: Hierarchy,
    /// The label out-of-scope rows carry in the files.
    pub oos_label: String,
    /// Share of every label's examples held out for validation when no
    /// split is given.
    pub val_share: f64,
    /// Seed of that split.
    pub seed: u64,
    /// Dataset name; `None`: the data file's stem.
    pub name: Option<String>,
}

/// How the validation split came about.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ValSource {
    /// A validation file (`--val`).
    File {
        /// Its path.
        path: String,
    },
    /// The data file's own split (CLINC150's `val` + `oos_val`).
    Included,
    /// Made here: stratified by label, seeded.
    Made {
        /// Share held out per label.
        share: f64,
        /// The seed.
        seed: u64,
    },
}

/// A dataset ready to train on: labels resolved to `(intent, domain)`,
/// out-of-scope rows labelled [`OOS`].
#[derive(Debug, Clone)]
pub struct Dataset {
    /// Name (model ids start with it).
    pub name: String,
    /// Format of the data file.
    pub format: Format,
    /// How domains were found (never `Auto`).
    pub hierarchy: Hierarchy,
    /// `(text, intent)` training pairs; out-of-scope ones have [`OOS`].
    pub train: Vec<(String, String)>,
    /// `(text, intent)` validation pairs, likewise.
    pub val: Vec<(String, String)>,
    /// Domain of every in-scope intent.
    pub intent_domain: BTreeMap<String, String>,
    /// Where the validation pairs came from.
    pub val_source: ValSource,
    /// Every file read, in a fixed order (for the content hash).
    pub files: Vec<PathBuf>,
    /// What was read but not used, and what was made (the split).
    pub notes: Vec<String>,
}

impl Dataset {
    /// In-scope intents, sorted.
    pub fn intents(&self) -> Vec<String> {
        self.intent_domain.keys().cloned().collect()
    }

    /// Domains, sorted.
    pub fn domains(&self) -> Vec<String> {
        let set: BTreeSet<&String> = self.intent_domain.values().collect();
        set.into_iter().cloned().collect()
    }
}

fn data_error(path: &Path, at: &str, message: impl std::fmt::Display) -> UnderstandingError {
    if at.is_empty() {
        UnderstandingError::Data(format!("{}: {message}", path.display()))
    } else {
        UnderstandingError::Data(format!("{}: {at}: {message}", path.display()))
    }
}

fn read(path: &Path, what: &str) -> Result<String, UnderstandingError> {
    std::fs::read_to_string(path)
        .map_err(|e| UnderstandingError::Data(format!("{} ({what}): {e}", path.display())))
}

/// Non-empty, non-comment (`#`) lines of a text file, as out-of-scope rows.
pub fn text_lines(path: &Path, label: &str) -> Result<Vec<Row>, UnderstandingError> {
    Ok(read(path, "texts, one per line")?
        .lines()
        .enumerate()
        .map(|(i, l)| (i, l.trim()))
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| Row {
            text: l.to_owned(),
            label: label.to_owned(),
            domain: None,
            at: format!("line {}", i + 1),
        })
        .collect())
}

/// Reads a domain map `{domain: [intent, …]}` into intent → domain.
pub fn read_domain_map(path: &Path) -> Result<BTreeMap<String, String>, UnderstandingError> {
    let value: serde_json::Value =
        serde_json::from_str(&read(path, "domain map")?).map_err(|e| data_error(path, "", e))?;
    let object = value
        .as_object()
        .ok_or_else(|| data_error(path, "", "a domain map is an object {domain: [intent, …]}"))?;
    let mut map = BTreeMap::new();
    for (domain, intents) in object {
        let intents = intents
            .as_array()
            .ok_or_else(|| data_error(path, domain, "must be a list of intents"))?;
        for intent in intents {
            let intent = intent
                .as_str()
                .ok_or_else(|| data_error(path, domain, "intents are strings"))?;
            if let Some(other) = map.insert(intent.to_owned(), domain.clone()) {
                return Err(data_error(
                    path,
                    domain,
                    format!("intent {intent:?} is also in domain {other:?}"),
                ));
            }
        }
    }
    Ok(map)
}

/// The file stem of `path` as a model-id-safe name: lowercase ASCII
/// letters, digits, `-` and `_`, others as `-`.
pub fn slug(name: &str) -> String {
    let s: String = name
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let s = s.trim_matches('-').to_owned();
    if s.is_empty() { "intents".into() } else { s }
}

/// Resolves the hierarchy of labelled rows: `(text, intent)` pairs and
/// intent → domain, or an error naming the file and row.
struct Resolver<'a> {
    hierarchy: Hierarchy,
    oos_label: &'a str,
    name: &'a str,
    map: Option<&'a BTreeMap<String, String>>,
    intent_domain: BTreeMap<String, String>,
}

impl Resolver<'_> {
    /// The hierarchy `Auto` stands for, given the training rows.
    fn decide(&mut self, rows: &[Row]) {
        if self.hierarchy != Hierarchy::Auto {
            return;
        }
        let in_scope: Vec<&Row> = rows.iter().filter(|r| r.label != self.oos_label).collect();
        let all =
            |sep: char| !in_scope.is_empty() && in_scope.iter().all(|r| r.label.contains(sep));
        self.hierarchy = if self.map.is_some() || rows.iter().any(|r| r.domain.is_some()) {
            Hierarchy::Column
        } else if all('/') {
            Hierarchy::Slash
        } else if all('.') {
            Hierarchy::Dot
        } else {
            Hierarchy::None
        };
    }

    fn resolve(&mut self, path: &Path, row: Row) -> Result<(String, String), UnderstandingError> {
        let text = row.text.trim();
        if text.is_empty() {
            return Err(data_error(path, &row.at, "empty text"));
        }
        let label = row.label.trim();
        if label.is_empty() {
            return Err(data_error(path, &row.at, "empty label"));
        }
        if label == self.oos_label {
            return Ok((text.to_owned(), OOS.to_owned()));
        }
        if label == OOS {
            return Err(data_error(
                path,
                &row.at,
                format!(
                    "label {OOS:?} is reserved for out-of-scope texts; this file marks those {:?} (--oos-label)",
                    self.oos_label
                ),
            ));
        }
        let domain = match self.hierarchy {
            Hierarchy::Column => match (&row.domain, self.map.and_then(|m| m.get(label))) {
                (Some(d), _) if !d.trim().is_empty() => d.trim().to_owned(),
                (_, Some(d)) => d.clone(),
                _ => {
                    return Err(data_error(
                        path,
                        &row.at,
                        format!(
                            "intent {label:?} has no domain (an empty domain cell, or an intent missing from the domain map)"
                        ),
                    ));
                }
            },
            Hierarchy::Slash | Hierarchy::Dot => {
                let sep = if self.hierarchy == Hierarchy::Slash {
                    '/'
                } else {
                    '.'
                };
                match label.split_once(sep) {
                    Some((d, i)) if !d.is_empty() && !i.is_empty() => d.to_owned(),
                    _ => {
                        return Err(data_error(
                            path,
                            &row.at,
                            format!(
                                "label {label:?} is not written domain{sep}intent (--hierarchy {})",
                                if sep == '/' { "slash" } else { "dot" }
                            ),
                        ));
                    }
                }
            }
            Hierarchy::None | Hierarchy::Auto => self.name.to_owned(),
        };
        match self.intent_domain.get(label) {
            Some(d) if *d != domain => Err(data_error(
                path,
                &row.at,
                format!(
                    "intent {label:?} is in domain {domain:?} here and {d:?} before; an intent belongs to one domain"
                ),
            )),
            Some(_) => Ok((text.to_owned(), label.to_owned())),
            None => {
                self.intent_domain.insert(label.to_owned(), domain);
                Ok((text.to_owned(), label.to_owned()))
            }
        }
    }
}

/// Reads and resolves a dataset. Errors with [`UnderstandingError::Data`]
/// naming the file and, for a bad row, its line (or entry).
pub fn load(source: &Source) -> Result<Dataset, UnderstandingError> {
    let format = match source.format {
        Some(f) => f,
        None => Format::of(&source.data)?,
    };
    let name = slug(&source.name.clone().unwrap_or_else(|| {
        source
            .data
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    }));
    let mut files = vec![source.data.clone()];
    let mut parsed = format.parse(&source.data, &read(&source.data, "data")?)?;
    let mut notes = std::mem::take(&mut parsed.notes);
    let map = match &source.domains {
        Some(p) => {
            files.push(p.clone());
            Some(read_domain_map(p)?)
        }
        None => parsed.domain_map.take().map(|(p, m)| {
            files.push(p);
            m
        }),
    };
    let val_rows = match &source.val {
        Some(p) => {
            files.push(p.clone());
            let mut v = format.parse(p, &read(p, "validation data")?)?;
            notes.append(&mut v.notes);
            Some((p.clone(), v.train))
        }
        None => parsed.val.take().map(|v| (source.data.clone(), v)),
    };
    let mut oos_rows = Vec::new();
    if let Some(p) = &source.oos {
        files.push(p.clone());
        oos_rows = text_lines(p, &source.oos_label)?;
    }
    if parsed.train.is_empty() {
        return Err(data_error(&source.data, "", "no labelled examples"));
    }
    let mut resolver = Resolver {
        hierarchy: source.hierarchy,
        oos_label: &source.oos_label,
        name: &name.clone(),
        map: map.as_ref(),
        intent_domain: BTreeMap::new(),
    };
    resolver.decide(&parsed.train);
    let mut train = Vec::with_capacity(parsed.train.len());
    for row in parsed.train {
        train.push(resolver.resolve(&source.data, row)?);
    }
    let mut oos = Vec::with_capacity(oos_rows.len());
    if let Some(p) = &source.oos {
        for row in oos_rows {
            oos.push(resolver.resolve(p, row)?);
        }
    }
    let known = resolver.intent_domain.clone();
    if known.len() < 2 {
        return Err(data_error(
            &source.data,
            "",
            format!(
                "{} in-scope intent(s); an intent head needs at least 2",
                known.len()
            ),
        ));
    }
    let (train, val, val_source) = match val_rows {
        Some((path, rows)) => {
            let mut val = Vec::with_capacity(rows.len());
            for row in rows {
                let at = row.at.clone();
                let pair = resolver.resolve(&path, row)?;
                if pair.1 != OOS && !known.contains_key(&pair.1) {
                    return Err(data_error(
                        &path,
                        &at,
                        format!("intent {:?} is not in the training data", pair.1),
                    ));
                }
                val.push(pair);
            }
            let val_source = if source.val.is_some() {
                ValSource::File {
                    path: path.display().to_string(),
                }
            } else {
                ValSource::Included
            };
            ([train, oos].concat(), val, val_source)
        }
        None => {
            let all = [train, oos].concat();
            let (train, val) = split::stratified(all, source.val_share, source.seed);
            notes.push(format!(
                "validation: {} of {} examples held out ({:.0} % of each label, seed {}); {} left to train on",
                val.len(),
                val.len() + train.len(),
                source.val_share * 100.0,
                source.seed,
                train.len()
            ));
            (
                train,
                val,
                ValSource::Made {
                    share: source.val_share,
                    seed: source.seed,
                },
            )
        }
    };
    Ok(Dataset {
        name,
        format,
        hierarchy: resolver.hierarchy,
        train,
        val,
        intent_domain: resolver.intent_domain,
        val_source,
        files,
        notes,
    })
}

/// Reads every row of `path` as evaluation data: `(text, label, domain)`
/// with labels as written and out-of-scope rows as [`OOS`]; for CLINC150
/// JSON its test split when it has one, else train and validation. Errors
/// as [`load`].
pub fn load_rows(
    path: &Path,
    format: Option<Format>,
    oos_label: &str,
) -> Result<Vec<(String, String, Option<String>)>, UnderstandingError> {
    let format = match format {
        Some(f) => f,
        None => Format::of(path)?,
    };
    let parsed = format.parse(path, &read(path, "evaluation data")?)?;
    let mut out = Vec::new();
    let rows = match parsed.test {
        Some(test) => test,
        None => [parsed.train, parsed.val.unwrap_or_default()].concat(),
    };
    for row in rows {
        if row.text.trim().is_empty() {
            return Err(data_error(path, &row.at, "empty text"));
        }
        let label = if row.label == oos_label {
            OOS.to_owned()
        } else {
            row.label
        };
        out.push((row.text.trim().to_owned(), label, row.domain));
    }
    if out.is_empty() {
        return Err(data_error(path, "", "no labelled examples"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn source(data: PathBuf) -> Source {
        Source {
            data,
            format: None,
            val: None,
            oos: None,
            domains: None,
            hierarchy: Hierarchy::Auto,
            oos_label: "oos".into(),
            val_share: 0.25,
            seed: 7,
            name: None,
        }
    }

    fn write(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("moltbot-dataset-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn slash_labels_give_domains_and_keep_full_intents() {
        let mut csv = String::from("text,label\n");
        for i in 0..8 {
            csv += &format!(
                "pay bill {i},bank/pay\nmove money {i},bank/transfer\nbook flight {i},travel/book\n"
            );
        }
        csv += "what is love,oos\n";
        let d = load(&source(write("slash.csv", &csv))).unwrap();
        assert_eq!(d.hierarchy, Hierarchy::Slash);
        assert_eq!(d.name, "slash");
        assert_eq!(d.intent_domain["bank/pay"], "bank");
        assert_eq!(d.intent_domain["travel/book"], "travel");
        assert_eq!(d.domains(), vec!["bank", "travel"]);
        // 25 % of each label's 8 examples: 2 each; the one oos row stays in train.
        assert_eq!(d.val.len(), 6);
        assert_eq!(d.train.len(), 19);
        assert!(d.train.iter().any(|(_, i)| i == OOS));
        assert!(matches!(d.val_source, ValSource::Made { .. }));
    }

    #[test]
    fn flat_labels_are_one_domain_named_after_the_data() {
        let mut jsonl = String::new();
        for i in 0..4 {
            jsonl += &format!(
                "{{\"text\": \"hi {i}\", \"intent\": \"greet\"}}\n{{\"text\": \"bye {i}\", \"intent\": \"goodbye\"}}\n"
            );
        }
        let mut s = source(write("Flat Data.jsonl", &jsonl));
        s.name = None;
        let d = load(&s).unwrap();
        assert_eq!(d.hierarchy, Hierarchy::None);
        assert_eq!(d.domains(), vec!["flat-data"]);
        assert_eq!(d.intents(), vec!["goodbye", "greet"]);
    }

    #[test]
    fn a_domain_conflict_names_file_and_line() {
        let csv = "text,intent,domain\na,x,d1\nb,y,d1\nc,x,d2\n";
        let e = load(&source(write("conflict.csv", csv)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("conflict.csv: line 4:"), "{e}");
        assert!(e.contains("\"d2\""), "{e}");
    }

    #[test]
    fn the_reserved_label_and_unknown_validation_intents_are_refused() {
        let csv = "text,intent\na,x\nb,oos\n";
        let mut s = source(write("reserved.csv", csv));
        s.oos_label = "out_of_scope".into();
        let e = load(&s).unwrap_err().to_string();
        assert!(e.contains("line 3") && e.contains("reserved"), "{e}");

        let mut s = source(write("t.csv", "text,intent\na,x\nb,y\nc,x\nd,y\n"));
        s.val = Some(write("v.csv", "text,intent\ne,x\nf,z\n"));
        let e = load(&s).unwrap_err().to_string();
        assert!(e.contains("v.csv: line 3") && e.contains("\"z\""), "{e}");
    }

    #[test]
    fn separate_oos_file_joins_both_splits() {
        let mut csv = String::from("text,intent\n");
        for i in 0..10 {
            csv += &format!("hello {i},greet\nbye {i},goodbye\n");
        }
        let mut s = source(write("o.csv", &csv));
        s.oos = Some(write(
            "o.txt",
            "# out of scope\nwrite a poem\nfix my car\ncook pasta\nsing\n",
        ));
        let d = load(&s).unwrap();
        assert_eq!(d.val.iter().filter(|(_, i)| i == OOS).count(), 1);
        assert_eq!(d.train.iter().filter(|(_, i)| i == OOS).count(), 3);
        assert_eq!(d.files.len(), 2);
    }
}
