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
    /// CLINC150 training data (`data_full_train_val.json`, `domains.json`) for
    /// the intent head, trained into `<models-dir>/intent-head` when missing.
    #[arg(
        long,
        env = "MOLTBOT_INTENT_DATA_DIR",
        default_value = "services/understanding/data/clinc150"
    )]
    pub intent_data_dir: std::path::PathBuf,
    /// Data directory of the embedded stores (SQLite files, index snapshots)
    /// and of the dev-mode secrets.
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: std::path::PathBuf,
    /// Files or directories ingested into the `docs` collection when it is
    /// empty.
    #[arg(
        long,
        env = "MOLTBOT_DOCS",
        value_delimiter = ',',
        default_value = "README.md,BENCHMARKS.md"
    )]
    pub docs: Vec<std::path::PathBuf>,
}

/// Ingests `docs` into the `docs` collection when it has no documents yet.
async fn ensure_docs(docs: &[std::path::PathBuf]) -> Result<(), CliError> {
    let url = format!("http://{}", ports::RETRIEVAL.grpc_addr);
    let channel = tonic::transport::Channel::from_shared(url.clone())
        .map_err(|e| CliError::Setup(e.to_string()))?
        .connect()
        .await
        .map_err(|e| CliError::Setup(format!("cannot reach retrieval: {e}")))?;
    let mut client =
        moltbot_proto::retrieval::v1::retrieval_service_client::RetrievalServiceClient::new(
            channel,
        );
    if crate::kb::ensure_collection(&mut client, "docs").await? {
        return Ok(());
    }
    let present: Vec<std::path::PathBuf> = docs.iter().filter(|p| p.exists()).cloned().collect();
    let (documents, chunks) = crate::kb::ingest(&url, "docs", &present).await?;
    eprintln!("up: ingested {documents} documents ({chunks} chunks) into the `docs` collection");
    Ok(())
}

/// Trains the intent head into `<models_dir>/intent-head` with
/// `moltbot-understanding train` when it has no `metrics.json` yet (about 11
/// minutes on 2 cores); written to a temporary directory and renamed.
async fn ensure_intent_head(args: &UpArgs) -> Result<(), CliError> {
    let head = args.models_dir.join("intent-head");
    if head.join("metrics.json").exists() {
        return Ok(());
    }
    eprintln!(
        "up: no intent head in {}; training it on CLINC150 (about 11 minutes on 2 cores)",
        head.display()
    );
    let binary = bin_dir()?.join("moltbot-understanding");
    let tmp = args.models_dir.join("intent-head.tmp");
    let _ = std::fs::remove_dir_all(&tmp);
    let status = Command::new(&binary)
        .arg("train")
        .arg("--data")
        .arg(args.intent_data_dir.join("data_full_train_val.json"))
        .arg("--domains")
        .arg(args.intent_data_dir.join("domains.json"))
        .arg("--encoder-dir")
        .arg(args.models_dir.join("all-minilm-l6-v2"))
        .arg("--out")
        .arg(&tmp)
        .status()
        .await
        .map_err(|e| CliError::Spawn("moltbot-understanding train".to_owned(), e))?;
    if !status.success() {
        return Err(CliError::Step(
            "moltbot-understanding train".to_owned(),
            status,
        ));
    }
    std::fs::rename(&tmp, &head)?;
    Ok(())
}

struct Running {
    name: &'static str,
    child: Child,
}

fn spawn(
    name: &'static str,
    models_dir: &std::path::Path,
    env: &[(&str, String)],
) -> Result<Running, CliError> {
    let dir = bin_dir()?;
    let path = dir.join(name);
    if !path.exists() {
        return Err(CliError::MissingBinary(name.to_owned(), dir));
    }
    // Children inherit stdout/stderr: their JSON log lines interleave on ours.
    let mut command = Command::new(&path);
    command.env("MOLTBOT_MODELS_DIR", models_dir);
    for (k, v) in env {
        command.env(k, v);
    }
    let child = command
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
    ensure_intent_head(&args).await?;
    let (master_key, made) =
        crate::devkeys::dev_secret("MOLTBOT_MASTER_KEY", &args.data_dir, "master.key")?;
    if let Some(path) = made {
        eprintln!(
            "up: dev mode: generated MOLTBOT_MASTER_KEY in {} (it encrypts provider keys; keep it, or set your own)",
            path.display()
        );
    }
    let (admin_token, made) =
        crate::devkeys::dev_secret("MOLTBOT_ADMIN_TOKEN", &args.data_dir, "admin.token")?;
    if let Some(path) = made {
        eprintln!(
            "up: dev mode: generated MOLTBOT_ADMIN_TOKEN in {} (used by `moltbot keys`)",
            path.display()
        );
    }
    let env = [
        ("MOLTBOT_MASTER_KEY", master_key),
        ("MOLTBOT_ADMIN_TOKEN", admin_token),
        ("MOLTBOT_DATA_DIR", args.data_dir.display().to_string()),
    ];
    let mut children = Vec::new();
    for spec in ports::ALL {
        children.push(spawn(spec.binary, &args.models_dir, &env)?);
    }
    children.push(spawn("moltbot-gateway", &args.models_dir, &[])?);
    let result = supervise(&mut children, args.ready_timeout_s, &args.docs).await;
    stop_all(&mut children).await;
    result
}

async fn supervise(
    children: &mut [Running],
    ready_timeout_s: u64,
    docs: &[std::path::PathBuf],
) -> Result<(), CliError> {
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
                if let Err(e) = ensure_docs(docs).await {
                    eprintln!(
                        "up: the `docs` knowledge base is not ingested ({e}); answers go without it"
                    );
                }
                eprintln!(
                    "\nMoltBot is up at {url}\n\n  curl {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"default\", \"session_id\": \"demo\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is MoltBot?\"}}]}}'\n\n  curl {url}/readyz    curl {url}/metrics\nPress Ctrl-C to stop.\n"
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
