//! The run state `moltbot up` keeps in `<log-dir>/up.json` for
//! `moltbot status`: its own pid and start time, and per component the pid,
//! start time, restarts and last exit. Rewritten (through a temporary file
//! and a rename, so a reader never sees half of it) whenever it changes;
//! removed when `moltbot up` stops.

use std::{
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize};

/// One supervised process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Component {
    /// Component name, e.g. `generation` (the binary without `moltbot-`).
    pub name: String,
    /// The running process's id; `None` while it waits to be restarted.
    pub pid: Option<u32>,
    /// When the current (or last) run started, Unix seconds.
    pub started_unix: u64,
    /// Restarts since `moltbot up` started.
    pub restarts: u32,
    /// How the last run ended (`exit status: 1`), if one did.
    pub last_exit: Option<String>,
    /// The component's log file.
    pub log: PathBuf,
}

/// Everything `moltbot up` runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunState {
    /// `moltbot up`'s own process id.
    pub pid: u32,
    /// When `moltbot up` started, Unix seconds.
    pub started_unix: u64,
    /// The version of the binaries (one workspace version).
    pub version: String,
    /// The supervised processes, in start order.
    pub components: Vec<Component>,
}

/// The state file under `log_dir`.
pub fn path(log_dir: &Path) -> PathBuf {
    log_dir.join("up.json")
}

/// Now, in Unix seconds.
pub fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Writes `state` to [`path`] atomically. Errors with the I/O error.
pub fn write(log_dir: &Path, state: &RunState) -> std::io::Result<()> {
    let target = path(log_dir);
    let tmp = target.with_extension("json.tmp");
    let body = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, &target)
}

/// Reads the state file; `None` when there is none (no `moltbot up`
/// running) or it does not parse.
pub fn read(log_dir: &Path) -> Option<RunState> {
    let body = std::fs::read(path(log_dir)).ok()?;
    serde_json::from_slice(&body).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trips_through_the_file() -> Result<(), Box<dyn std::error::Error>> {
        let dir = std::env::temp_dir().join(format!("moltbot-up-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        assert_eq!(read(&dir), None);
        let state = RunState {
            pid: 7,
            started_unix: now_unix(),
            version: "0.1.0".into(),
            components: vec![Component {
                name: "context".into(),
                pid: None,
                started_unix: 1,
                restarts: 2,
                last_exit: Some("exit status: 1".into()),
                log: dir.join("context.log"),
            }],
        };
        write(&dir, &state)?;
        assert_eq!(read(&dir), Some(state));
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
