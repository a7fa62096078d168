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
        /// The gateway and the admin token.
        #[command(flatten)]
        admin: crate::admin::AdminArgs,
    },
}

/// Runs `moltbot cache`. Errors with [`CliError::Setup`] naming what the
/// gateway answered (401: wrong token; 403: the gateway has none).
pub async fn run(args: CacheArgs) -> Result<(), CliError> {
    let CacheCommand::Purge {
        tenant,
        route,
        admin,
    } = args.command;
    let request = reqwest::Client::new()
        .post(admin.url("/admin/cache/purge"))
        .json(&serde_json::json!({"tenant": tenant, "route": route}));
    let value = crate::admin::call(request, &admin.data_dir, "cache purge").await?;
    let redis = value["purged"]["redis"].as_u64().unwrap_or(0);
    let scope = match (&tenant, &route) {
        (None, None) => "every entry".to_owned(),
        (Some(t), None) => format!("tenant {t}"),
        (None, Some(r)) => format!("route {r}"),
        (Some(t), Some(r)) => format!("tenant {t}, route {r}"),
    };
    println!("purged {scope}: the gateway's memory tier, and {redis} entries from Redis");
    Ok(())
}
