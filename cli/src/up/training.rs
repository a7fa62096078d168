//! The intent head, trained in the background while the mesh already
//! serves chat: `moltbot-understanding train --progress json` runs as a
//! child into `<head>.tmp`, its progress lines are drawn as a bar on a
//! terminal (a line every 30 s otherwise), and the finished head is renamed
//! into place, where the understanding service picks it up by itself
//! (`UnderstandingApi::wait_for_head`).

use std::{
    io::IsTerminal,
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Command,
};

use crate::{CliError, bin_dir};

/// What the trainer needs.
#[derive(Debug, Clone)]
pub struct TrainSpec {
    /// Where the head goes (`<models>/intent-head` by default).
    pub head_dir: PathBuf,
    /// CLINC150 data directory (`data_full_train_val.json`, `domains.json`).
    pub data_dir: PathBuf,
    /// The trainer's log file: its stdout and any JSON log line it writes
    /// to stderr go here, not to the terminal.
    pub log: PathBuf,
    /// The base sentence encoder.
    pub encoder_dir: PathBuf,
}

/// One `{"progress": …}` line of the trainer (see
/// `services/understanding/src/train/progress.rs`).
#[derive(Debug, Default, serde::Deserialize)]
struct Line {
    #[serde(default)]
    step: String,
    #[serde(default)]
    epoch: u64,
    #[serde(default)]
    epochs: u64,
    #[serde(default)]
    batch: u64,
    #[serde(default)]
    batches: u64,
    #[serde(default)]
    loss: f64,
    #[serde(default)]
    left_s: f64,
    #[serde(default)]
    done: bool,
}

/// Draws the trainer's progress: a bar on a terminal, else a line every 30 s.
struct View {
    bar: Option<ProgressBar>,
    last_line: Instant,
    started: Instant,
}

impl View {
    fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(1);
            bar.set_style(
                ProgressStyle::with_template(
                    "up: intent head [{elapsed_precise}] {wide_bar} {pos}/{len} batches {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Self {
            bar,
            last_line: Instant::now(),
            started: Instant::now(),
        }
    }

    fn show(&mut self, p: &Line) {
        let left = if p.left_s >= 0.0 {
            format!("about {} left", human(p.left_s))
        } else {
            "time left unknown".into()
        };
        if let Some(bar) = &self.bar {
            bar.set_length((p.epochs * p.batches).max(1));
            bar.set_position(p.epoch.saturating_sub(1) * p.batches + p.batch);
            bar.set_message(format!(
                "{} epoch {}/{} loss {:.4}, {left}",
                p.step, p.epoch, p.epochs, p.loss
            ));
        } else if self.last_line.elapsed() >= Duration::from_secs(30) {
            self.last_line = Instant::now();
            eprintln!(
                "up: intent head: {} epoch {}/{} batch {}/{} loss {:.4}, {} elapsed, {left}",
                p.step,
                p.epoch,
                p.epochs,
                p.batch,
                p.batches,
                p.loss,
                human(self.started.elapsed().as_secs_f64())
            );
        }
    }

    fn say(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(format!("up: intent head: {text}")),
            None => eprintln!("up: intent head: {text}"),
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// Seconds as `12m05s` or `45s`.
pub fn human(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    if s >= 60 {
        format!("{}m{:02}s", s / 60, s % 60)
    } else {
        format!("{s}s")
    }
}

/// True when `dir` holds a finished head.
pub fn present(dir: &std::path::Path) -> bool {
    dir.join("metrics.json").exists()
}

/// Trains the head into `spec.head_dir` (through `<head>.tmp`, renamed when
/// complete). Errors when the trainer cannot start or fails; the partial
/// directory is removed then. Cancelling the future kills the trainer.
pub async fn train(spec: TrainSpec) -> Result<(), CliError> {
    let binary = bin_dir()?.join("moltbot-understanding");
    let tmp = spec.head_dir.with_extension("tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let mut child = Command::new(&binary)
        .arg("train")
        .arg(spec.data_dir.join("data_full_train_val.json"))
        .arg("--name")
        .arg("clinc150")
        .arg("--domains")
        .arg(spec.data_dir.join("domains.json"))
        .arg("--encoder-dir")
        .arg(&spec.encoder_dir)
        .arg("--out")
        .arg(&tmp)
        .arg("--progress")
        .arg("json")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CliError::Spawn("moltbot-understanding train".to_owned(), e))?;
    let mut view = View::new();
    let log = std::sync::Mutex::new(
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&spec.log)?,
    );
    let to_log = |line: &str| {
        use std::io::Write as _;
        if let Ok(mut f) = log.lock() {
            let _ = writeln!(f, "{line}");
        }
    };
    let stderr = child.stderr.take();
    let stdout = child.stdout.take();
    let relay_stdout = async {
        if let Some(out) = stdout {
            let mut lines = BufReader::new(out).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                to_log(&line);
            }
        }
    };
    let relay_stderr = async {
        if let Some(err) = stderr {
            let mut lines = BufReader::new(err).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let progress = serde_json::from_str::<serde_json::Value>(&line)
                    .ok()
                    .and_then(|v| v.get("progress").cloned())
                    .and_then(|p| serde_json::from_value::<Line>(p).ok());
                match progress {
                    Some(p) if p.done => view.say(&format!("{} done", p.step)),
                    Some(p) => view.show(&p),
                    None if line.starts_with('{') => to_log(&line),
                    None => view.say(line.trim_start_matches("train: ")),
                }
            }
        }
        view.finish();
    };
    let ((), ()) = tokio::join!(relay_stdout, relay_stderr);
    let status = child
        .wait()
        .await
        .map_err(|e| CliError::Spawn("moltbot-understanding train".to_owned(), e))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(CliError::Step(
            "moltbot-understanding train".to_owned(),
            status,
        ));
    }
    let _ = std::fs::remove_dir_all(&spec.head_dir);
    std::fs::rename(&tmp, &spec.head_dir)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_parse_and_unknown_fields_are_ignored_by_design() {
        // The trainer's own format (train/progress.rs); a line without a
        // field falls back to its default rather than hiding progress.
        let v: serde_json::Value = serde_json::from_str(
            r#"{"progress":{"step":"fine-tune","epoch":2,"epochs":4,"batch":10,"batches":520,"loss":0.5,"elapsed_s":3.0,"left_s":120.0}}"#,
        )
        .unwrap_or_default();
        let p: Line = serde_json::from_value(v["progress"].clone()).unwrap_or_default();
        assert_eq!((p.epoch, p.epochs, p.batch, p.batches), (2, 4, 10, 520));
        assert_eq!(human(p.left_s), "2m00s");
        assert!(!p.done);
    }
}
