//! Progress of the trainer's long steps: an `indicatif` bar on a terminal,
//! a plain line every 30 s in a log, or one JSON object a line for a parent
//! process (`moltbot up` reads those and draws its own bar).
//!
//! A JSON line looks like
//! `{"progress":{"step":"fine-tune","epoch":1,"epochs":4,"batch":120,"batches":520,"loss":0.81,"elapsed_s":95.2,"left_s":1410.0}}`;
//! `left_s` is extrapolated from the batches done so far in this step.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProgressMode {
    /// A bar when stderr is a terminal, else plain lines.
    Auto,
    /// An `indicatif` bar on stderr.
    Bar,
    /// A plain line on stderr every 30 s and at each epoch's end.
    Lines,
    /// One JSON object a line on stderr, every 2 s and at each epoch's end.
    Json,
}

impl ProgressMode {
    fn resolve(self) -> Self {
        match self {
            Self::Auto if std::io::stderr().is_terminal() => Self::Bar,
            Self::Auto => Self::Lines,
            other => other,
        }
    }
}

/// Progress of one step made of `epochs × batches` batches.
pub struct Progress {
    mode: ProgressMode,
    step: &'static str,
    epochs: usize,
    batches: usize,
    started: Instant,
    last_report: Instant,
    bar: Option<ProgressBar>,
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

impl Progress {
    /// Starts showing `step` (e.g. `fine-tune`) over `epochs` epochs of
    /// `batches` batches each.
    pub fn start(mode: ProgressMode, step: &'static str, epochs: usize, batches: usize) -> Self {
        let mode = mode.resolve();
        let now = Instant::now();
        let bar = (mode == ProgressMode::Bar).then(|| {
            let bar = ProgressBar::new((epochs * batches) as u64);
            let style = ProgressStyle::with_template(
                "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} batches, {msg}, about {eta} left",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_prefix(format!("train: {step}"));
            bar.enable_steady_tick(Duration::from_millis(500));
            bar
        });
        Self {
            mode,
            step,
            epochs,
            batches,
            started: now,
            last_report: now,
            bar,
        }
    }

    /// Seconds left, extrapolated from the batches done so far.
    fn left_s(&self, done: usize) -> f64 {
        let total = self.epochs * self.batches;
        if done == 0 {
            return f64::NAN;
        }
        self.started.elapsed().as_secs_f64() / done as f64 * (total - done.min(total)) as f64
    }

    /// Reports batch `batch` (1-based) of epoch `epoch` (0-based) with the
    /// running mean `loss`; `epoch_end` forces a line in the line modes.
    pub fn tick(&mut self, epoch: usize, batch: usize, loss: f64, epoch_end: bool) {
        let done = epoch * self.batches + batch;
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
            bar.set_message(format!(
                "epoch {}/{} loss {loss:.4}",
                epoch + 1,
                self.epochs
            ));
            if epoch_end {
                bar.println(format!(
                    "train: {} epoch {}/{} loss {loss:.4} ({} elapsed)",
                    self.step,
                    epoch + 1,
                    self.epochs,
                    human(self.started.elapsed().as_secs_f64())
                ));
            }
            return;
        }
        let every = match self.mode {
            ProgressMode::Json => Duration::from_secs(2),
            _ => Duration::from_secs(30),
        };
        if !epoch_end && self.last_report.elapsed() < every {
            return;
        }
        self.last_report = Instant::now();
        let elapsed = self.started.elapsed().as_secs_f64();
        let left = self.left_s(done);
        if self.mode == ProgressMode::Json {
            let line = serde_json::json!({"progress": {
                "step": self.step,
                "epoch": epoch + 1,
                "epochs": self.epochs,
                "batch": batch,
                "batches": self.batches,
                "loss": loss,
                "elapsed_s": elapsed,
                "left_s": if left.is_finite() { left } else { -1.0 },
            }});
            eprintln!("{line}");
        } else {
            eprintln!(
                "train: {} epoch {}/{} batch {batch}/{} loss {loss:.4}, {} elapsed, about {} left",
                self.step,
                epoch + 1,
                self.epochs,
                self.batches,
                human(elapsed),
                if left.is_finite() {
                    human(left)
                } else {
                    "?".into()
                }
            );
        }
    }

    /// Ends the step: clears the bar and prints one line with the time taken.
    pub fn finish(self) {
        let line = format!(
            "train: {} done in {}",
            self.step,
            human(self.started.elapsed().as_secs_f64())
        );
        match self.bar {
            Some(bar) => bar.finish_with_message(line),
            None if self.mode == ProgressMode::Json => eprintln!(
                "{}",
                serde_json::json!({"progress": {"step": self.step, "done": true,
                    "elapsed_s": self.started.elapsed().as_secs_f64()}})
            ),
            None => eprintln!("{line}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_formats_minutes_and_seconds() {
        assert_eq!(human(45.2), "45s");
        assert_eq!(human(725.0), "12m05s");
        assert_eq!(human(-3.0), "0s");
    }

    #[test]
    fn time_left_extrapolates_from_batches_done() {
        let mut p = Progress::start(ProgressMode::Lines, "t", 2, 10);
        p.started = Instant::now() - Duration::from_secs(10);
        // 5 of 20 batches in 10 s: 15 more take about 30 s.
        let left = p.left_s(5);
        assert!((left - 30.0).abs() < 0.5, "{left}");
        assert!(p.left_s(0).is_nan());
    }
}
