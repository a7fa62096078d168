//! `moltbot keys add|rotate|revoke|list`: provider credentials in the
//! auth-rotation service. Secrets are read from environment variables or
//! standard input, never from the command line (where `ps` would show them),
//! and never printed.

use std::io::BufRead;

use moltbot_proto::auth::v1::{
    AddCredentialRequest, ApiKeyPair, CredentialSlot, CredentialState, ListProvidersRequest,
    NoAuth, ProviderKind, RevokeCredentialRequest, RotateCredentialRequest, UpsertProviderRequest,
    add_credential_request, auth_rotation_service_client::AuthRotationServiceClient,
};

use crate::{CliError, mesh::with_admin_token as admin};

/// Flags of `moltbot keys`.
#[derive(Debug, clap::Args)]
pub struct KeysArgs {
    /// The auth-rotation service.
    #[arg(
        long,
        env = "MOLTBOT_AUTH_URL",
        default_value = "https://127.0.0.1:50055",
        global = true
    )]
    auth_url: String,
    /// Data directory holding the dev-mode `admin.token` (when
    /// MOLTBOT_ADMIN_TOKEN is unset).
    #[arg(
        long,
        env = "MOLTBOT_DATA_DIR",
        default_value = "var/data",
        global = true
    )]
    data_dir: std::path::PathBuf,
    #[command(subcommand)]
    command: KeysCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KeysCommand {
    /// Create or update a provider and set its primary (and secondary) key,
    /// read from $MOLTBOT_PRIMARY_KEY / $MOLTBOT_SECONDARY_KEY or, when unset,
    /// from the first (and second) line of standard input.
    Add {
        /// Provider name, [a-z0-9_-]{1,64}.
        #[arg(long)]
        provider: String,
        /// `openai` (any OpenAI-compatible API) or `anthropic`.
        #[arg(long, default_value = "openai")]
        kind: String,
        /// Base URL, e.g. https://api.openai.com/v1.
        #[arg(long)]
        base_url: String,
        /// Models served, comma-separated.
        #[arg(long, value_delimiter = ',', required = true)]
        models: Vec<String>,
        /// The provider takes no key: an engine inside your network (vLLM,
        /// llm-d, KServe, a llama.cpp server). No key is read; calls carry
        /// no auth header, and a session-affinity header instead.
        #[arg(long)]
        no_key: bool,
    },
    /// Replace the key in one slot (`primary` or `secondary`), read from
    /// $MOLTBOT_NEW_KEY or the first line of standard input.
    Rotate {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// `primary` or `secondary`.
        #[arg(long, default_value = "primary")]
        slot: String,
    },
    /// Revoke a credential (`<provider>-primary`, …).
    Revoke {
        /// Provider name.
        #[arg(long)]
        provider: String,
        /// Credential id.
        #[arg(long)]
        credential: String,
    },
    /// Providers, health, credential and breaker states (no secrets).
    List,
}

fn secret_from(var: &str, stdin_lines: &mut impl Iterator<Item = String>) -> Option<String> {
    std::env::var(var)
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| {
            stdin_lines
                .next()
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty())
        })
}

fn status(s: tonic::Status) -> CliError {
    CliError::Setup(format!("auth-rotation: {} ({:?})", s.message(), s.code()))
}

/// Runs `moltbot keys`.
pub async fn run(args: KeysArgs) -> Result<(), CliError> {
    crate::mesh::install_tls(&args.data_dir)?;
    let channel = crate::mesh::connect("auth-rotation", &args.auth_url).await?;
    let mut client = AuthRotationServiceClient::new(channel);
    let token = || crate::mesh::require_admin_token(&args.data_dir);
    let mut stdin = std::io::stdin().lock().lines().map_while(Result::ok);
    match args.command {
        KeysCommand::Add {
            provider,
            kind,
            base_url,
            models,
            no_key,
        } => {
            let kind = match kind.as_str() {
                "openai" => ProviderKind::Openai,
                "anthropic" => ProviderKind::Anthropic,
                other => {
                    return Err(CliError::Setup(format!(
                        "--kind {other}: use openai or anthropic"
                    )));
                }
            };
            let token = token()?;
            let secret = if no_key {
                add_credential_request::Secret::None(NoAuth {})
            } else {
                let primary = secret_from("MOLTBOT_PRIMARY_KEY", &mut stdin).ok_or_else(|| {
                    CliError::Setup(
                        "no primary key: set MOLTBOT_PRIMARY_KEY or pipe it on stdin (or give --no-key for an engine that takes none)".into(),
                    )
                })?;
                let secondary =
                    secret_from("MOLTBOT_SECONDARY_KEY", &mut stdin).unwrap_or_default();
                add_credential_request::Secret::ApiKeys(ApiKeyPair { primary, secondary })
            };
            client
                .upsert_provider(admin(
                    &token,
                    UpsertProviderRequest {
                        name: provider.clone(),
                        kind: kind as i32,
                        base_url,
                        models,
                        health_check_interval_seconds: 0,
                    },
                )?)
                .await
                .map_err(status)?;
            let r = client
                .add_credential(admin(
                    &token,
                    AddCredentialRequest {
                        provider: provider.clone(),
                        secret: Some(secret),
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            println!("{provider}: {} credential(s) stored", r.credentials.len());
        }
        KeysCommand::Rotate { provider, slot } => {
            let slot = match slot.as_str() {
                "primary" => CredentialSlot::Primary,
                "secondary" => CredentialSlot::Secondary,
                other => {
                    return Err(CliError::Setup(format!(
                        "--slot {other}: use primary or secondary"
                    )));
                }
            };
            let token = token()?;
            let new_secret = secret_from("MOLTBOT_NEW_KEY", &mut stdin).ok_or_else(|| {
                CliError::Setup("no new key: set MOLTBOT_NEW_KEY or pipe it on stdin".into())
            })?;
            let r = client
                .rotate_credential(admin(
                    &token,
                    RotateCredentialRequest {
                        provider,
                        slot: slot as i32,
                        new_secret,
                    },
                )?)
                .await
                .map_err(status)?
                .into_inner();
            println!(
                "rotated {}",
                r.credential.map(|c| c.credential_id).unwrap_or_default()
            );
        }
        KeysCommand::Revoke {
            provider,
            credential,
        } => {
            let token = token()?;
            client
                .revoke_credential(admin(
                    &token,
                    RevokeCredentialRequest {
                        provider,
                        credential_id: credential.clone(),
                    },
                )?)
                .await
                .map_err(status)?;
            println!("revoked {credential}");
        }
        KeysCommand::List => {
            let r = client
                .list_providers(ListProvidersRequest {})
                .await
                .map_err(status)?
                .into_inner();
            for p in r.providers {
                println!(
                    "{}  {}  healthy={}  models={}",
                    p.name,
                    p.base_url,
                    p.healthy,
                    p.models.join(",")
                );
                if !p.health_detail.is_empty() {
                    println!("  health: {}", p.health_detail);
                }
                for c in p.credentials {
                    let state = CredentialState::try_from(c.state)
                        .map(|s| s.as_str_name())
                        .unwrap_or("?");
                    println!(
                        "  {}  {}  breaker={}  failures={}",
                        c.credential_id, state, c.breaker, c.consecutive_failures
                    );
                }
            }
        }
    }
    Ok(())
}
