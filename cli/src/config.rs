//! `moltbot config check FILE`: the gateway's configuration checked exactly
//! as a running gateway checks it before a reload
//! (`moltbot_gateway::reload::check`): it parses, every route is sound,
//! every key hash is well formed, and a gateway off loopback has keys.
//! Operators run it before applying a file; the gateway keeps its last good
//! configuration when a bad one lands anyway.

use std::{net::SocketAddr, path::PathBuf};

use crate::CliError;

/// Flags of `moltbot config`.
#[derive(Debug, clap::Args)]
pub struct ConfigArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ConfigCommand,
}

/// `moltbot config` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Check a gateway configuration file; exit 1 with the reason if it
    /// would be refused.
    Check {
        /// The file (`MOLTBOT_GATEWAY_CONFIG`).
        file: PathBuf,
        /// The address the gateway listens on: off loopback, anonymous
        /// access is refused and API keys are required.
        #[arg(long, env = "MOLTBOT_HTTP_ADDR", default_value = "127.0.0.1:8080")]
        http_addr: SocketAddr,
    },
}

/// Runs the subcommand. Errors with [`CliError::Setup`] carrying the
/// gateway's own message when the file would be refused.
pub async fn run(args: ConfigArgs) -> Result<(), CliError> {
    match args.command {
        ConfigCommand::Check { file, http_addr } => {
            let (_, summary) = moltbot_gateway::reload::check(&file, http_addr)
                .map_err(|e| CliError::Setup(e.to_string()))?;
            println!(
                "{}: ok — {} route(s) ({}), {} API key(s), anonymous access {}, {} priced model(s), {} budget(s)",
                file.display(),
                summary.routes.len(),
                summary.routes.join(", "),
                summary.api_keys,
                if summary.anonymous {
                    "on (loopback)"
                } else {
                    "off"
                },
                summary.priced_models,
                summary.budgets
            );
            Ok(())
        }
    }
}
