//! `moltbot intents train|eval|reload`: the intent engine on your own data.
//!
//! - `train DATA [--out DIR] …` and `eval HEAD DATA …` run
//!   `moltbot-understanding train|eval` (next to `moltbot`) with the same
//!   arguments, so every flag and its `--help` live in one place
//!   (`services/understanding/src/train/mod.rs`, `…/eval.rs`);
//! - `reload DIR` swaps the head the understanding service serves through
//!   its ReloadModel RPC: over mutual TLS with the operator certificate
//!   (`crate::mesh`) and, when one is configured, the admin token. The
//!   service reads DIR itself, so DIR must be a path on the service's
//!   machine (or a volume it mounts); a relative DIR is made absolute here.

use std::{ffi::OsString, path::PathBuf};

use moltbot_proto::understanding::v1::{
    ReloadModelRequest, understanding_service_client::UnderstandingServiceClient,
};

use crate::{CliError, bin_dir};

/// Flags of `moltbot intents`.
#[derive(Debug, clap::Args)]
pub struct IntentsArgs {
    #[command(subcommand)]
    command: IntentsCommand,
}

#[derive(Debug, clap::Subcommand)]
enum IntentsCommand {
    /// Train an intent head: `moltbot intents train DATA [--out DIR]`
    /// (CSV/TSV, JSONL, Rasa NLU YAML or CLINC150 JSON; `--help` lists
    /// every flag).
    #[command(disable_help_flag = true)]
    Train {
        /// Arguments of `moltbot-understanding train`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Score a head on labelled data: `moltbot intents eval HEAD DATA`
    /// (accuracy, per-intent precision/recall/F1, confusion pairs,
    /// out-of-scope recall/precision; JSON and a table).
    #[command(disable_help_flag = true)]
    Eval {
        /// Arguments of `moltbot-understanding eval`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
        args: Vec<OsString>,
    },
    /// Serve the head in DIR: the understanding service loads it through
    /// ReloadModel; calls in flight finish on the old head.
    Reload {
        /// The head directory (written by `moltbot intents train`).
        dir: PathBuf,
        /// The understanding service.
        #[arg(
            long,
            env = "MOLTBOT_UNDERSTANDING_URL",
            default_value = "https://127.0.0.1:50051"
        )]
        url: String,
        /// Data directory holding the dev-mode `admin.token` and `pki/`
        /// (used when MOLTBOT_ADMIN_TOKEN is unset).
        #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
        data_dir: PathBuf,
    },
}

/// Runs `moltbot-understanding <verb> ARGS…` and waits for it.
async fn delegate(verb: &str, args: Vec<OsString>) -> Result<(), CliError> {
    let binary = bin_dir()?.join("moltbot-understanding");
    if !binary.exists() {
        return Err(CliError::MissingBinary(
            "moltbot-understanding".into(),
            binary,
        ));
    }
    let what = format!("moltbot-understanding {verb}");
    let status = tokio::process::Command::new(&binary)
        .arg(verb)
        .args(args)
        .status()
        .await
        .map_err(|e| CliError::Spawn(what.clone(), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Step(what, status))
    }
}

/// Runs `moltbot intents`.
pub async fn run(args: IntentsArgs) -> Result<(), CliError> {
    match args.command {
        IntentsCommand::Train { args } => delegate("train", args).await,
        IntentsCommand::Eval { args } => delegate("eval", args).await,
        IntentsCommand::Reload { dir, url, data_dir } => {
            let dir = std::path::absolute(&dir)?;
            if !dir.join("labels.json").exists() {
                return Err(CliError::Setup(format!(
                    "{} holds no trained head (labels.json); train one with `moltbot intents train DATA --out {}`",
                    dir.display(),
                    dir.display()
                )));
            }
            crate::mesh::install_tls(&data_dir)?;
            let channel = crate::mesh::connect("understanding", &url).await?;
            let mut client = UnderstandingServiceClient::new(channel);
            let request = ReloadModelRequest {
                model_dir: dir.display().to_string(),
            };
            let request = match crate::mesh::admin_token(&data_dir) {
                Some(token) => crate::mesh::with_admin_token(&token, request)?,
                None => tonic::Request::new(request),
            };
            let r = client
                .reload_model(request)
                .await
                .map_err(|s| {
                    CliError::Setup(format!("understanding: {} ({:?})", s.message(), s.code()))
                })?
                .into_inner();
            if r.previous_model_id.is_empty() {
                println!("serving {}", r.model_id);
            } else {
                println!("serving {} (was {})", r.model_id, r.previous_model_id);
            }
            Ok(())
        }
    }
}
