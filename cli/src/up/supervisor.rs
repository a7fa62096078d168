//! The service processes of `moltbot up` and their restarts.
//!
//! A child that exits while the mesh runs is logged with its exit status
//! and started again after an exponential backoff — 1 s, doubling to at
//! most 30 s, back to 1 s once a run has lasted 60 s — the policy of a
//! compose `restart: on-failure` service or a kubelet's CrashLoopBackOff
//! (10 s doubling to 5 min there; shorter here, for one machine). While it
//! is down the gateway's `/readyz` lists it as UNREACHABLE.
//!
//! Each child's stdout and stderr (its JSON log lines) are appended to
//! `<log-dir>/<component>.log`, not to the terminal: `moltbot logs` reads
//! them, and `moltbot up` itself prints only state changes
//! ([`super::console`]).

use std::{
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use super::{
    console::{Tone, say},
    state::{self, Component},
};
use crate::{CliError, bin_dir};

/// Restart delays: `initial` doubling to `max`, back to `initial` after a
/// run of `reset_after`. Pure: the caller says how long the run lasted.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    reset_after: Duration,
    next: Duration,
}

impl Backoff {
    /// 1 s doubling to 30 s, reset after 60 s of running.
    pub fn standard() -> Self {
        Self::new(
            Duration::from_secs(1),
            Duration::from_secs(30),
            Duration::from_secs(60),
        )
    }

    /// A backoff starting at `initial`, capped at `max`, reset after a run
    /// of `reset_after`.
    pub fn new(initial: Duration, max: Duration, reset_after: Duration) -> Self {
        Self {
            initial,
            max,
            reset_after,
            next: initial,
        }
    }

    /// The delay before restarting a child whose run lasted `ran_for`.
    pub fn after_exit(&mut self, ran_for: Duration) -> Duration {
        if ran_for >= self.reset_after {
            self.next = self.initial;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// One supervised child process.
pub struct Supervised {
    /// Binary name, e.g. `moltbot-context`.
    pub name: &'static str,
    path: PathBuf,
    models_dir: PathBuf,
    env: Vec<(&'static str, String)>,
    log: PathBuf,
    child: Option<Child>,
    started: Instant,
    started_unix: u64,
    last_exit: Option<String>,
    restart_at: Option<Instant>,
    restarts: u32,
    backoff: Backoff,
}

impl Supervised {
    /// Starts `name` (a binary next to `moltbot`) with `env`, its output
    /// appended to `<log_dir>/<component>.log`. Errors when the binary is
    /// missing or cannot be started, or the log file cannot be opened.
    pub fn start(
        name: &'static str,
        models_dir: &Path,
        log_dir: &Path,
        env: &[(&'static str, String)],
    ) -> Result<Self, CliError> {
        let dir = bin_dir()?;
        let path = dir.join(name);
        if !path.exists() {
            return Err(CliError::MissingBinary(name.to_owned(), dir));
        }
        let mut supervised = Self {
            name,
            path,
            models_dir: models_dir.to_path_buf(),
            env: env.to_vec(),
            log: log_dir.join(format!("{}.log", component(name))),
            child: None,
            started: Instant::now(),
            started_unix: state::now_unix(),
            last_exit: None,
            restart_at: None,
            restarts: 0,
            backoff: Backoff::standard(),
        };
        supervised.spawn()?;
        Ok(supervised)
    }

    fn spawn(&mut self) -> Result<(), CliError> {
        let spawn_err = |e| CliError::Spawn(self.name.to_owned(), e);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(spawn_err)?;
        let mut command = Command::new(&self.path);
        command.env("MOLTBOT_MODELS_DIR", &self.models_dir);
        // Secrets reach only the children they are given to below, not
        // every child through this process's own environment.
        for secret in ["MOLTBOT_MASTER_KEY", "MOLTBOT_ADMIN_TOKEN"] {
            command.env_remove(secret);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(spawn_err)?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(spawn_err)?;
        self.child = Some(child);
        self.started = Instant::now();
        self.started_unix = state::now_unix();
        self.restart_at = None;
        Ok(())
    }

    /// Notices an exit (logged, restart scheduled) and restarts when the
    /// backoff has passed. Never fails: a restart that cannot spawn is
    /// logged and tried again after the next delay.
    pub fn poll(&mut self) {
        if let Some(child) = &mut self.child {
            match child.try_wait() {
                Ok(None) => return,
                Ok(Some(status)) => {
                    let ran = self.started.elapsed();
                    let delay = self.backoff.after_exit(ran);
                    self.restarts += 1;
                    say(
                        Tone::Bad,
                        component(self.name),
                        format!(
                            "exited with {status} after {:.1} s; restarting in {} s (restart {}); its log: {}",
                            ran.as_secs_f64(),
                            delay.as_secs(),
                            self.restarts,
                            self.log.display()
                        ),
                    );
                    self.last_exit = Some(status.to_string());
                    self.child = None;
                    self.restart_at = Some(Instant::now() + delay);
                }
                Err(e) => {
                    say(
                        Tone::Warn,
                        component(self.name),
                        format!("cannot check: {e}"),
                    );
                    return;
                }
            }
        }
        if self.restart_at.is_some_and(|at| Instant::now() >= at)
            && let Err(e) = self.spawn()
        {
            let delay = self.backoff.after_exit(Duration::ZERO);
            say(
                Tone::Bad,
                component(self.name),
                format!("{e}; trying again in {} s", delay.as_secs()),
            );
            self.restart_at = Some(Instant::now() + delay);
        }
    }

    /// SIGTERM, then up to 15 s for the child to stop, then SIGKILL.
    pub async fn stop(&mut self) {
        let Some(child) = &mut self.child else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(15), child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => say(
                Tone::Warn,
                component(self.name),
                format!("stopped with {status}"),
            ),
            Ok(Err(e)) => say(Tone::Warn, component(self.name), e.to_string()),
            Err(_) => {
                say(
                    Tone::Warn,
                    component(self.name),
                    "did not stop within 15 s; killing it",
                );
                let _ = child.kill().await;
            }
        }
        self.child = None;
    }
}

impl Supervised {
    /// What `moltbot status` shows of this child.
    pub fn snapshot(&self) -> Component {
        Component {
            name: component(self.name).to_owned(),
            pid: self.child.as_ref().and_then(Child::id),
            started_unix: self.started_unix,
            restarts: self.restarts,
            last_exit: self.last_exit.clone(),
            log: self.log.clone(),
        }
    }
}

/// The component of a binary: `moltbot-generation` → `generation`.
pub fn component(binary: &str) -> &str {
    binary.trim_start_matches("moltbot-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_the_cap_and_resets_after_a_long_run() {
        let mut b = Backoff::standard();
        let short = Duration::from_secs(2);
        let delays: Vec<u64> = (0..7).map(|_| b.after_exit(short).as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(b.after_exit(Duration::from_secs(61)).as_secs(), 1);
        assert_eq!(b.after_exit(short).as_secs(), 2);
    }
}
