//! `moltbot up`: start every service, then the gateway, wait until `/readyz`
//! says ready, print how to reach it, and on Ctrl-C or SIGTERM stop every
//! child with SIGTERM (gateway first) and wait for it.
//!
//! Chat is served as soon as generation and context are ready: a missing
//! intent head is trained in the background ([`training`]) while turns
//! answer with `degraded: ["understanding"]`, and understanding serves the
//! head once it is written. Children that exit are restarted with backoff
//! ([`supervisor`]). Each step prints its elapsed time; the terminal shows
//! only state changes and progress ([`console`]), the services' JSON logs
//! go to `<log-dir>/<component>.log`, and the run state to
//! `<log-dir>/up.json` for `moltbot status` ([`state`]).

mod console;
pub mod state;
mod supervisor;
mod training;

use std::time::{Duration, Instant};

use console::{Tone, say};
use moltbot_runtime::ports;
use supervisor::Supervised;
use training::{TrainSpec, human};

use crate::CliError;

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
    /// the intent head, trained in the background into the head directory
    /// when it is missing.
    #[arg(
        long,
        env = "MOLTBOT_INTENT_DATA_DIR",
        default_value = "services/understanding/data/clinc150"
    )]
    pub intent_data_dir: std::path::PathBuf,
    /// The intent head's directory; default `<models-dir>/intent-head`.
    #[arg(long, env = "MOLTBOT_INTENT_HEAD_DIR")]
    pub intent_head_dir: Option<std::path::PathBuf>,
    /// Train a missing intent head in the background (`false`: leave it to
    /// the operator; understanding serves whatever head appears there).
    #[arg(
        long,
        env = "MOLTBOT_UP_TRAIN_INTENT_HEAD",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub train_intent_head: bool,
    /// Data directory of the embedded stores (SQLite files, index snapshots)
    /// and of the dev-mode secrets.
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: std::path::PathBuf,
    /// The gateway's configuration file (routes, API keys, tenants,
    /// limits; deploy/gateway.yaml is an example): reloaded in place when
    /// it changes or on SIGHUP to the gateway. Unset: the embedded default
    /// (one `default` route to the local model).
    #[arg(long, env = "MOLTBOT_GATEWAY_CONFIG")]
    pub gateway_config: Option<std::path::PathBuf>,
    /// Directory of the services' log files (`<component>.log`, JSON lines;
    /// read them with `moltbot logs`) and of the run state `up.json`.
    #[arg(long, env = "MOLTBOT_LOG_DIR", default_value = "var/log")]
    pub log_dir: std::path::PathBuf,
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
    let url = format!("https://{}", ports::RETRIEVAL.grpc_addr);
    let channel = crate::mesh::connect("retrieval", &url).await?;
    let mut client =
        moltbot_proto::retrieval::v1::retrieval_service_client::RetrievalServiceClient::new(
            channel,
        );
    if crate::kb::ensure_collection(&mut client, "docs").await? {
        return Ok(());
    }
    let present: Vec<std::path::PathBuf> = docs.iter().filter(|p| p.exists()).cloned().collect();
    let (documents, chunks) = crate::kb::ingest(&url, "docs", &present).await?;
    say(
        Tone::Info,
        "docs",
        format!("ingested {documents} documents ({chunks} chunks) into the `docs` collection"),
    );
    Ok(())
}

/// Runs the mesh until Ctrl-C/SIGTERM. Errors when a binary is missing or
/// the mesh is not ready in time; children that exit are restarted.
pub async fn run(args: UpArgs) -> Result<(), CliError> {
    let started = Instant::now();
    if !crate::models::prepared(&args.models_dir).contains(&crate::models::DEFAULT_MODEL.to_owned())
    {
        say(
            Tone::Info,
            "models",
            "the generation model is not prepared yet; preparing it",
        );
        let step = Instant::now();
        crate::models::prepare(&args.models_dir, &args.python).await?;
        say(
            Tone::Good,
            "models",
            format!("prepared in {}", human(step.elapsed().as_secs_f64())),
        );
    }
    let (master_key, made) =
        crate::devkeys::dev_secret("MOLTBOT_MASTER_KEY", &args.data_dir, "master.key")?;
    if let Some(path) = made {
        say(
            Tone::Info,
            "dev mode",
            format!(
                "generated MOLTBOT_MASTER_KEY in {} (it encrypts provider keys; keep it, or set your own)",
                path.display()
            ),
        );
    }
    let (admin_token, made) =
        crate::devkeys::dev_secret("MOLTBOT_ADMIN_TOKEN", &args.data_dir, "admin.token")?;
    if let Some(path) = made {
        say(
            Tone::Info,
            "dev mode",
            format!(
                "generated MOLTBOT_ADMIN_TOKEN in {} (used by `moltbot keys`)",
                path.display()
            ),
        );
    }
    let head_dir = args
        .intent_head_dir
        .clone()
        .unwrap_or_else(|| args.models_dir.join("intent-head"));
    // Mutual TLS between every hop, with a CA made for this run.
    let pki = crate::mesh::pki_dir(&args.data_dir);
    moltbot_runtime::grpc::pki::DevCa::generate()
        .and_then(|ca| ca.write(&pki))
        .map_err(|e| CliError::Setup(e.to_string()))?;
    crate::mesh::install_tls(&args.data_dir)?;
    say(
        Tone::Info,
        "mTLS",
        format!(
            "certificates for every component and the operator in {} (new CA each start)",
            pki.display()
        ),
    );
    let https = |spec: &moltbot_runtime::grpc::ServiceSpec| format!("https://{}", spec.grpc_addr);
    std::fs::create_dir_all(&args.log_dir)?;
    let mut children = Vec::new();
    for spec in ports::ALL {
        let principal = spec.binary.trim_start_matches("moltbot-");
        let mut env = tls_env(&pki, principal);
        env.push(("MOLTBOT_DATA_DIR", args.data_dir.display().to_string()));
        // Each service gets only its own secrets (docs/security.md).
        match principal {
            "auth-rotation" => {
                env.push(("MOLTBOT_MASTER_KEY", master_key.clone()));
                env.push(("MOLTBOT_ADMIN_TOKEN", admin_token.clone()));
            }
            "understanding" => {
                env.push(("MOLTBOT_ADMIN_TOKEN", admin_token.clone()));
                env.push(("MOLTBOT_INTENT_HEAD_DIR", head_dir.display().to_string()));
            }
            "retrieval" => env.push(("MOLTBOT_ADMIN_TOKEN", admin_token.clone())),
            "generation" => {
                env.push(("MOLTBOT_AUTH_URL", https(&ports::AUTH_ROTATION)));
                env.push(("MOLTBOT_ADMIN_TOKEN", admin_token.clone()));
            }
            _ => {}
        }
        children.push(Supervised::start(
            spec.binary,
            &args.models_dir,
            &args.log_dir,
            &env,
        )?);
    }
    let mut gateway_env = tls_env(&pki, "gateway");
    gateway_env.extend([
        ("MOLTBOT_UNDERSTANDING_URL", https(&ports::UNDERSTANDING)),
        ("MOLTBOT_GENERATION_URL", https(&ports::GENERATION)),
        ("MOLTBOT_RETRIEVAL_URL", https(&ports::RETRIEVAL)),
        ("MOLTBOT_CONTEXT_URL", https(&ports::CONTEXT)),
        ("MOLTBOT_AUTH_URL", https(&ports::AUTH_ROTATION)),
        // The operator's `/admin/…` (`moltbot cache purge`, `moltbot
        // rollout`, `moltbot spend`).
        ("MOLTBOT_ADMIN_TOKEN", admin_token.clone()),
        // The spend ledger's SQLite file (`spend.db`), unless DATABASE_URL
        // points it at PostgreSQL.
        ("MOLTBOT_DATA_DIR", args.data_dir.display().to_string()),
    ]);
    if let Some(file) = &args.gateway_config {
        // Checked here as the gateway will, so a bad file stops `up` with
        // the reason instead of a gateway in a restart loop.
        moltbot_gateway::reload::check(file, ports::GATEWAY_HTTP)
            .map_err(|e| CliError::Setup(e.to_string()))?;
        gateway_env.push(("MOLTBOT_GATEWAY_CONFIG", file.display().to_string()));
    }
    children.push(Supervised::start(
        "moltbot-gateway",
        &args.models_dir,
        &args.log_dir,
        &gateway_env,
    )?);
    say(
        Tone::Info,
        "services",
        format!(
            "started {}; their logs: {}/<component>.log (`moltbot logs -f`)",
            children
                .iter()
                .map(|c| supervisor::component(c.name))
                .collect::<Vec<_>>()
                .join(", "),
            args.log_dir.display()
        ),
    );
    // The intent head, trained beside the serving mesh when it is missing.
    let training = (args.train_intent_head && !training::present(&head_dir)).then(|| {
        say(
            Tone::Info,
            "intent head",
            format!(
                "none in {}; training it in the background (about 13 minutes on one thread); chat is served meanwhile without intents",
                head_dir.display()
            ),
        );
        tokio::spawn(training::train(TrainSpec {
            head_dir: head_dir.clone(),
            data_dir: args.intent_data_dir.clone(),
            encoder_dir: args.models_dir.join(crate::models::ENCODER),
            log: args.log_dir.join("intent-head-training.log"),
        }))
    });
    let result = supervise(&mut children, &args, started, training).await;
    say(Tone::Info, "", "stopping");
    for c in children.iter_mut().rev() {
        c.stop().await;
    }
    let _ = std::fs::remove_file(state::path(&args.log_dir));
    result
}

/// The variables giving `principal` its certificate under `pki`.
fn tls_env(pki: &std::path::Path, principal: &str) -> Vec<(&'static str, String)> {
    let files = crate::mesh::tls_args(pki, principal);
    let path =
        |p: Option<std::path::PathBuf>| p.map(|p| p.display().to_string()).unwrap_or_default();
    vec![
        ("MOLTBOT_TLS_CERT", path(files.tls_cert)),
        ("MOLTBOT_TLS_KEY", path(files.tls_key)),
        ("MOLTBOT_TLS_CA", path(files.tls_ca)),
    ]
}

/// The gateway's `/readyz`: whether it is ready, and the upstreams that
/// are not serving.
async fn readyz(client: &reqwest::Client, url: &str) -> (bool, Vec<String>, bool) {
    let Ok(response) = client
        .get(format!("{url}/readyz"))
        .timeout(Duration::from_secs(2))
        .send()
        .await
    else {
        return (false, vec!["gateway".to_owned()], false);
    };
    let ready = response.status().is_success();
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    let upstreams = body["upstreams"].as_array().cloned().unwrap_or_default();
    let missing = upstreams
        .iter()
        .filter(|u| u["required"].as_bool() == Some(true) && u["status"] != "SERVING")
        .filter_map(|u| u["name"].as_str().map(str::to_owned))
        .collect();
    let intents = upstreams
        .iter()
        .any(|u| u["name"] == "understanding" && u["status"] == "SERVING");
    (ready, missing, intents)
}

/// Writes the run state for `moltbot status` when it changed since `last`.
fn record_state(
    children: &[Supervised],
    args: &UpArgs,
    started_unix: u64,
    last: &mut Option<state::RunState>,
) {
    let now = state::RunState {
        pid: std::process::id(),
        started_unix,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        components: children.iter().map(Supervised::snapshot).collect(),
    };
    if last.as_ref() == Some(&now) {
        return;
    }
    if let Err(e) = state::write(&args.log_dir, &now) {
        say(
            Tone::Warn,
            "",
            format!("cannot write the run state for `moltbot status`: {e}"),
        );
    }
    *last = Some(now);
}

async fn supervise(
    children: &mut [Supervised],
    args: &UpArgs,
    started: Instant,
    mut training: Option<tokio::task::JoinHandle<Result<(), CliError>>>,
) -> Result<(), CliError> {
    let url = format!("http://{}", ports::GATEWAY_HTTP);
    let deadline = started + Duration::from_secs(args.ready_timeout_s);
    let client = reqwest::Client::new();
    let started_unix = state::now_unix();
    let mut recorded = None;
    let (mut announced, mut intents_announced, mut was_ready) = (false, false, false);
    let mut last_missing: Vec<String> = Vec::new();
    let stop = moltbot_runtime::shutdown::signal();
    tokio::pin!(stop);
    loop {
        for c in children.iter_mut() {
            c.poll();
        }
        record_state(children, args, started_unix, &mut recorded);
        if let Some(job) = training.as_mut().filter(|j| j.is_finished()) {
            match job.await {
                Ok(Ok(())) => say(
                    Tone::Good,
                    "intent head",
                    format!(
                        "trained in {}; understanding loads it now",
                        human(started.elapsed().as_secs_f64())
                    ),
                ),
                Ok(Err(e)) => say(
                    Tone::Warn,
                    "intent head",
                    format!("training failed ({e}); chat goes on without intents"),
                ),
                Err(e) => say(
                    Tone::Warn,
                    "intent head",
                    format!("training task failed: {e}"),
                ),
            }
            training = None;
        }
        let (ready, missing, intents) = readyz(&client, &url).await;
        let first = ready && !announced;
        if first {
            announced = true;
            say(
                Tone::Good,
                "ready",
                format!(
                    "chat is served {} after start",
                    human(started.elapsed().as_secs_f64())
                ),
            );
            if let Err(e) = ensure_docs(&args.docs).await {
                say(
                    Tone::Warn,
                    "docs",
                    format!(
                        "the `docs` knowledge base is not ingested ({e}); answers go without it"
                    ),
                );
            }
            eprintln!(
                "\nMoltBot is up at {url}\n\n  curl {url}/v1/chat/completions -H 'content-type: application/json' \\\n    -d '{{\"model\": \"default\", \"session_id\": \"demo\", \"messages\": [{{\"role\": \"user\", \"content\": \"What is MoltBot?\"}}]}}'\n\n  moltbot chat    moltbot status    moltbot logs -f\n  curl {url}/readyz    curl {url}/metrics\nPress Ctrl-C to stop.\n"
            );
        } else if !announced && missing != last_missing {
            // Progress while starting: one line each time the set of
            // components still loading changes, not one per poll.
            say(
                Tone::Info,
                "services",
                format!(
                    "waiting for {} ({} elapsed)",
                    missing.join(", "),
                    human(started.elapsed().as_secs_f64())
                ),
            );
        }
        if !first && announced && was_ready && !ready {
            say(
                Tone::Warn,
                "",
                format!("not ready: waiting for {}", missing.join(", ")),
            );
        } else if !first && announced && !was_ready && ready {
            say(Tone::Good, "", "ready again");
        }
        was_ready = ready;
        last_missing = missing;
        if intents && !intents_announced && announced {
            intents_announced = true;
            say(
                Tone::Good,
                "intents",
                format!(
                    "served {} after start",
                    human(started.elapsed().as_secs_f64())
                ),
            );
        }
        if !announced && Instant::now() > deadline {
            return Err(CliError::NotReady(args.ready_timeout_s));
        }
        tokio::select! {
            _ = &mut stop => {
                if let Some(job) = training.take() {
                    job.abort();
                }
                return Ok(());
            }
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
