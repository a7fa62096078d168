//! `moltbot logs [COMPONENT] [-f]`: the services' log files under
//! `<log-dir>` (`<component>.log`, JSON lines, written by `moltbot up`),
//! shown one readable line per record — `time LEVEL component: message
//! key=value…` — merged by time across components; `--json` prints the
//! records unchanged, `-f` keeps printing what is appended.

use std::{
    collections::BTreeMap,
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
    time::Duration,
};

use serde_json::Value;

use crate::CliError;

/// Flags of `moltbot logs`.
#[derive(Debug, clap::Args)]
pub struct LogsArgs {
    /// The component (`gateway`, `generation`, `understanding`, `retrieval`,
    /// `context`, `auth-rotation`, `intent-head-training`); every one when
    /// omitted.
    pub component: Option<String>,
    /// Keep printing lines as they are appended (Ctrl-C stops).
    #[arg(short, long, env = "MOLTBOT_LOGS_FOLLOW")]
    pub follow: bool,
    /// Lines of each file to show first.
    #[arg(short = 'n', long, env = "MOLTBOT_LOGS_LINES", default_value_t = 40)]
    pub lines: usize,
    /// Print the JSON records as they are.
    #[arg(long, env = "MOLTBOT_LOGS_JSON")]
    pub json: bool,
    /// Directory of the log files (`moltbot up --log-dir`).
    #[arg(long, env = "MOLTBOT_LOG_DIR", default_value = "var/log")]
    pub log_dir: PathBuf,
}

/// Bytes read from the end of a file for its last lines.
const TAIL_BYTES: u64 = 1 << 20;

/// Fields every record has, shown in the line's head rather than as
/// `key=value`; `span_id` is left out (the trace id is enough to find the
/// trace).
const HEAD_FIELDS: [&str; 5] = ["timestamp", "level", "target", "message", "span_id"];

/// The log files to read: `<dir>/<component>.log`, or every `*.log`.
/// Errors with [`CliError::Setup`] naming the components that exist when
/// `component` has no file.
fn files(dir: &Path, component: Option<&str>) -> Result<Vec<(String, PathBuf)>, CliError> {
    let mut all: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| {
            CliError::Setup(format!(
                "no logs in {} ({e}); `moltbot up` writes them there",
                dir.display()
            ))
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .filter_map(|p| Some((p.file_stem()?.to_string_lossy().into_owned(), p)))
        .collect();
    all.sort();
    match component {
        None => Ok(all),
        Some(c) => match all.iter().find(|(name, _)| name == c) {
            Some(found) => Ok(vec![found.clone()]),
            None => Err(CliError::Setup(format!(
                "no log for {c:?} in {}; there are: {}",
                dir.display(),
                all.iter()
                    .map(|(n, _)| n.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        },
    }
}

/// One record as a readable line: `HH:MM:SS.mmm LEVEL component: message
/// key=value…`; a line that is not a JSON object is shown as it is.
pub fn readable(component: &str, line: &str) -> String {
    let Ok(Value::Object(record)) = serde_json::from_str::<Value>(line) else {
        return format!("{component}: {line}");
    };
    let text = |k: &str| record.get(k).and_then(Value::as_str).unwrap_or_default();
    let ts = text("timestamp");
    let time = ts
        .split_once('T')
        .map(|(_, t)| t.trim_end_matches('Z'))
        .unwrap_or(ts);
    let time: String = time.chars().take(12).collect();
    let mut out = format!(
        "{time} {:<5} {component}: {}",
        text("level").to_uppercase(),
        text("message")
    );
    for (k, v) in &record {
        if HEAD_FIELDS.contains(&k.as_str()) {
            continue;
        }
        match v {
            Value::String(s) => out.push_str(&format!(" {k}={s}")),
            other => out.push_str(&format!(" {k}={other}")),
        }
    }
    out
}

/// The sort key of a line: its timestamp, or empty (sorted first).
fn timestamp(line: &str) -> String {
    serde_json::from_str::<Value>(line)
        .ok()
        .and_then(|v| {
            v.get("timestamp")
                .and_then(Value::as_str)
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

/// The complete lines of `path` from `offset`, and the offset after the
/// last complete line (a line still being written is read next time).
fn read_from(path: &Path, offset: u64) -> std::io::Result<(Vec<String>, u64)> {
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    // A file shorter than what was read was truncated or replaced.
    let offset = if len < offset { 0 } else { offset };
    f.seek(SeekFrom::Start(offset))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    let complete = buf.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let lines = String::from_utf8_lossy(&buf[..complete])
        .lines()
        .map(str::to_owned)
        .collect();
    Ok((lines, offset + complete as u64))
}

/// The complete lines of the last [`TAIL_BYTES`] of `path`, and the offset
/// after them (where following goes on).
pub fn tail(path: &Path) -> std::io::Result<(Vec<String>, u64)> {
    let len = std::fs::metadata(path)?.len();
    read_from(path, len.saturating_sub(TAIL_BYTES))
}

/// Prints the last lines of the chosen logs, then follows them with `-f`.
/// Errors with [`CliError::Setup`] for a missing log directory or component.
pub async fn run(args: LogsArgs) -> Result<(), CliError> {
    let files = files(&args.log_dir, args.component.as_deref())?;
    let show = |component: &str, line: &str| {
        if args.json {
            println!("{line}");
        } else {
            println!("{}", readable(component, line));
        }
    };
    let mut offsets = BTreeMap::new();
    let mut first: Vec<(String, String, String)> = Vec::new();
    for (component, path) in &files {
        let (lines, end) = tail(path)?;
        let skip = lines.len().saturating_sub(args.lines);
        first.extend(
            lines
                .into_iter()
                .skip(skip)
                .map(|l| (timestamp(&l), component.clone(), l)),
        );
        offsets.insert(component.clone(), end);
    }
    first.sort_by(|a, b| a.0.cmp(&b.0));
    for (_, component, line) in &first {
        show(component, line);
    }
    if !args.follow {
        return Ok(());
    }
    let stop = moltbot_runtime::shutdown::signal();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
        for (component, path) in &files {
            let offset = offsets.get(component).copied().unwrap_or(0);
            if let Ok((lines, end)) = read_from(path, offset) {
                for line in &lines {
                    show(component, line);
                }
                offsets.insert(component.clone(), end);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_records_read_as_one_line_each() {
        let line = r#"{"timestamp":"2026-12-07T06:30:01.123456Z","level":"warn","target":"moltbot_gateway","message":"upstream slow","span_id":"ab","latency_ms":812,"model":"default"}"#;
        assert_eq!(
            readable("gateway", line),
            "06:30:01.123 WARN  gateway: upstream slow latency_ms=812 model=default"
        );
        assert_eq!(readable("context", "plain text"), "context: plain text");
    }

    #[test]
    fn a_line_still_being_written_is_read_next_time() -> std::io::Result<()> {
        let path = std::env::temp_dir().join(format!("moltbot-logs-{}.log", std::process::id()));
        std::fs::write(&path, "one\ntwo\npart")?;
        let (lines, end) = read_from(&path, 0)?;
        assert_eq!(lines, ["one", "two"]);
        assert_eq!(end, 8);
        std::fs::write(&path, "one\ntwo\npartial\n")?;
        let (lines, _) = read_from(&path, end)?;
        assert_eq!(lines, ["partial"]);
        // A truncated file is read from its start again.
        std::fs::write(&path, "new\n")?;
        assert_eq!(read_from(&path, end)?.0, ["new"]);
        std::fs::remove_file(&path)?;
        Ok(())
    }
}
