//! `moltbot up`: start every service, then the gateway, wait until `/readyz`
//! says ready, print how to reach it, and on Ctrl-C or SIGTERM stop every
//! child with SIGTERM (gateway first) and wait for it.

use std::{
    process::Stdio,
    time::{Duration, Instant},
};

use moltbot_runtime::ports;
use nix::{sys::signal::Signal, unistd::Pid};
use tokio::process::{Child, Command};

use crate::{CliError, bin_dir};

/// Flags of `moltbot up`.
#[derive(Debug, clap::Args)]
pub struct UpArgs {
    /// Seconds to wait for the mesh to report ready.
    #[arg(long, env = "MOLTBOT_UP_TIMEOUT_S", default_value_t = 600)]
    pub ready_timeout_s: u64,
    /// Directory of prepared models; the generation model is prepared there
    /// when missing.
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: std::path::PathBuf,
    /// Python of the project's virtualenv (for `models prepare`).
    #[arg(long, env = "MOLTBOT_PYTHON", default_value = ".venv/bin/python")]
    pub python: std::path::PathBuf,
}

struct Running {
    name: &'static str,
    child: Child,
}

fn spawn(name: &'static str, models_dir: &std::path::Path) -> Result<Running, CliError> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.exists() {
        return Err(CliError::MissingBinary(name.to_owned(), dir));
    }
    // Children inherit stdout/stderr: their JSON log lines interleave on ours.
    let child = Command::new(&path)
        .env("MOLTBOT_MODELS_DIR", models_dir)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| CliError::Spawn(name.to_owned(), e))?;
    Ok(Running { name, child })
}

/// Runs the mesh until Ctrl-C/SIGTERM. Errors when a binary is missing, a
/// child exits early, or the mesh is not ready in time.
pub async fn run(args: UpArgs) -> Result<(), CliError> {
    if !crate::models::prepared(&args.models_dir).contains(&crate::models::DEFAULT_MODEL.to_owned())
    {
        eprintln!("up: the generation model is not prepared yet; preparing it");
        crate::models::prepare(&args.models_dir, &args.python).await?;
    }
    let mut children = Vec::new();
    for spec in ports::ALL {
        children.push(spawn(spec.binary, &args.models_dir)?);
    }
    children.push(spawn("moltbot-gateway", &args.models_dir)?);
    let result = supervise(&mut children, args.ready_timeout_s).await;
    stop_all(&mut children).await;
    result
}

async fn supervise(children: &mut [Running], ready_timeout_s: u64) -> Result<(), CliError> {
    let url = format!("http://{}", ports::GATEWAY_HTTP);
    let deadline = Instant::now() + Duration::from_secs(ready_timeout_s);
    let client = reqwest::Client::new();
    let mut announced = false;
    let stop = moltbot_runtime::shutdown::signal();
    tokio::pin!(stop);
    loop {
        for c in children.iter_mut() {
            if let Some(status) = c.child.try_wait()? {
                return Err(CliError::ChildExited(c.name.to_owned(), status));
            }
        }
        if !announced {
            let ready = client
                .get(format!("{url}/readyz"))
                .timeout(Duration::from_secs(2))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                announced = true;
                eprintln!(
                    "\nMoltBot is up at {url}\n  curl {url}/readyz\n  curl {url}/metrics\nPress Ctrl-C to stop.\n"
                );
            } else if Instant::now() > deadline {
                return Err(CliError::NotReady(ready_timeout_s));
            }
        }
        tokio::select! {
            _ = &mut stop => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// SIGTERM to the gateway first (it stops taking requests), then to the
/// services; each gets 15 s before SIGKILL.
async fn stop_all(children: &mut [Running]) {
    for c in children.iter_mut().rev() {
        if let Some(pid) = c.child.id() {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(15), c.child.wait()).await {
            Ok(Ok(status)) if status.success() => {}
            Ok(Ok(status)) => eprintln!("{} exited with {status}", c.name),
            Ok(Err(e)) => eprintln!("{}: {e}", c.name),
            Err(_) => {
                eprintln!("{} did not stop within 15 s; killing it", c.name);
                let _ = c.child.kill().await;
            }
        }
    }
}
