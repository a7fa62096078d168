//! `moltbot`: the operator CLI.
//!
//! - `moltbot up` runs the whole mesh on this machine (every service and the
//!   gateway on their default ports) and stops it cleanly on Ctrl-C;
//! - `moltbot status` prints every component's state, model, version,
//!   uptime, restarts and last error; `moltbot logs [COMPONENT] [-f]` shows
//!   the services' logs (written to `var/log/` by `moltbot up`);
//! - `moltbot chat` is a terminal chat client with a session;
//! - `moltbot config check FILE` checks a gateway configuration before it
//!   is applied (the gateway reloads its file in place);
//! - `moltbot doctor` checks binaries, ports and stores and says what to fix;
//! - `moltbot models prepare|list` makes the generation model ready;
//! - `moltbot kb ingest PATH --collection NAME` fills a knowledge base;
//! - `moltbot keys add|rotate|revoke|list` manages provider credentials;
//! - `moltbot intents train|eval|reload` trains, scores and serves intent
//!   heads on your own data.

mod admin;
mod cache;
mod chat;
mod config;
mod devkeys;
mod doctor;
mod intents;
mod kb;
mod keys;
mod logs;
mod mesh;
mod models;
mod rollout;
mod served;
mod spend;
mod status;
mod up;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

/// Command line of `moltbot`.
#[derive(Debug, Parser)]
#[command(name = "moltbot", version, about = "Run and operate the MoltBot mesh")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every service and the gateway on this machine until Ctrl-C.
    Up(up::UpArgs),
    /// Every component's state, address, model, version, uptime, restarts
    /// and last error.
    Status(status::StatusArgs),
    /// The services' logs (`-f` to follow), one readable line per record.
    Logs(logs::LogsArgs),
    /// Chat with the gateway in the terminal (one session, streamed answers).
    Chat(chat::ChatArgs),
    /// The gateway's configuration: `check FILE` before applying it.
    Config(config::ConfigArgs),
    /// Check binaries, ports and stores; say what to fix.
    Doctor(doctor::DoctorArgs),
    /// Prepare or list the local models.
    Models(models::ModelsArgs),
    /// Knowledge bases: ingest documents into a retrieval collection.
    Kb(kb::KbArgs),
    /// Remote-provider credentials in the auth-rotation service.
    Keys(keys::KeysArgs),
    /// Intent heads on your own data: train, evaluate, serve.
    Intents(intents::IntentsArgs),
    /// The gateway's response cache: `purge` entries.
    Cache(cache::CacheArgs),
    /// Live model rollouts: `start`, `status`, `pause`, `resume`,
    /// `promote`, `abort`.
    Rollout(rollout::RolloutArgs),
    /// Spend from the gateway's ledger by key, tenant, model, route or
    /// endpoint (`--budgets`: every budget's current window).
    Spend(spend::SpendArgs),
}

/// Errors of the CLI.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A service binary is missing next to `moltbot`.
    #[error(
        "{0} not found next to moltbot (looked in {1}); build the workspace with `cargo build --release --bins` or `make build`"
    )]
    MissingBinary(String, PathBuf),
    /// A child process could not be started or waited for.
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    /// The mesh did not become ready in time.
    #[error(
        "the mesh was not ready within {0} s; see `moltbot status` and `moltbot logs`, or run `moltbot doctor`"
    )]
    NotReady(u64),
    /// Some doctor checks failed.
    #[error("{0} check(s) failed")]
    DoctorFailed(usize),
    /// A setup step (pip, the model converter) failed.
    #[error("{0} failed with {1}; its output above says why")]
    Step(String, std::process::ExitStatus),
    /// Something the command needs is missing.
    #[error("{0}")]
    Setup(String),
    /// I/O error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// Directory holding the service binaries: the one `moltbot` runs from.
fn bin_dir() -> Result<PathBuf, CliError> {
    let exe = std::env::current_exe()?;
    Ok(exe.parent().map(PathBuf::from).unwrap_or_default())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the Tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => up::run(args).await,
            Command::Doctor(args) => doctor::run(args).await,
            Command::Config(args) => config::run(args).await,
            Command::Status(args) => status::run(args).await,
            Command::Logs(args) => logs::run(args).await,
            Command::Chat(args) => chat::run(args).await,
            Command::Models(args) => models::run(args).await,
            Command::Kb(args) => kb::run(args).await,
            Command::Keys(args) => keys::run(args).await,
            Command::Intents(args) => intents::run(args).await,
            Command::Cache(args) => cache::run(args).await,
            Command::Rollout(args) => rollout::run(args).await,
            Command::Spend(args) => spend::run(args).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
