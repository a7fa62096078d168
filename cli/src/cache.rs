//! `moltbot cache purge`: removes response-cache entries through the
//! gateway's operator endpoint (`POST /admin/cache/purge`,
//! `gateway/src/http/admin.rs`), from the memory tier of the gateway it
//! reaches and from the Redis every replica shares.

use crate::CliError;

/// Flags of `moltbot cache`.
#[derive(Debug, clap::Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    command: CacheCommand,
}

#[derive(Debug, clap::Subcommand)]
enum CacheCommand {
    /// Remove entries: of one tenant, one route, both, or (neither given)
    /// all of them.
    Purge {
        /// Only this tenant's entries.
        #[arg(long)]
        tenant: Option<String>,
        /// Only entries of this route.
        #[arg(long)]
        route: Option<String>,
        /// The gateway.
        #[arg(
            long,
            env = "MOLTBOT_GATEWAY_URL",
            default_value = "http://127.0.0.1:8080"
        )]
        gateway_url: String,
        /// Where `moltbot up` keeps its dev-mode admin token (read when
        /// MOLTBOT_ADMIN_TOKEN is unset).
        #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
        data_dir: std::path::PathBuf,
    },
}

/// Runs `moltbot cache`. Errors with [`CliError::Setup`] naming what the
/// gateway answered (401: wrong token; 403: the gateway has none).
pub async fn run(args: CacheArgs) -> Result<(), CliError> {
    let CacheCommand::Purge {
        tenant,
        route,
        gateway_url,
        data_dir,
    } = args.command;
    let admin_token = crate::mesh::require_admin_token(&data_dir)?;
    let url = format!("{}/admin/cache/purge", gateway_url.trim_end_matches('/'));
    let response = reqwest::Client::new()
        .post(&url)
        .bearer_auth(admin_token)
        .json(&serde_json::json!({"tenant": tenant, "route": route}))
        .send()
        .await
        .map_err(|e| CliError::Setup(format!("cannot reach the gateway at {url}: {e}")))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if !status.is_success() {
        return Err(CliError::Setup(format!(
            "the gateway answered {status}: {body}"
        )));
    }
    let redis = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["purged"]["redis"].as_u64())
        .unwrap_or(0);
    let scope = match (&tenant, &route) {
        (None, None) => "every entry".to_owned(),
        (Some(t), None) => format!("tenant {t}"),
        (None, Some(r)) => format!("route {r}"),
        (Some(t), Some(r)) => format!("tenant {t}, route {r}"),
    };
    println!("purged {scope}: the gateway's memory tier, and {redis} entries from Redis");
    Ok(())
}
