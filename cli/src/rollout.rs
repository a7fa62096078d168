//! `moltbot rollout start|status|pause|resume|promote|abort`: live model
//! rollouts through the gateway's operator endpoints (`/admin/rollouts`,
//! `gateway/src/http/rollouts.rs`; the rules are in
//! `gateway/src/rollout/plan.rs`).

use std::time::Duration;

use moltbot_gateway::rollout::plan::default_steps;
use serde_json::{Value, json};

use crate::CliError;

/// Flags of `moltbot rollout`.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(subcommand)]
    command: RolloutCommand,
    /// The gateway.
    #[arg(
        long,
        global = true,
        env = "MOLTBOT_GATEWAY_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    gateway_url: String,
    /// Where `moltbot up` keeps its dev-mode admin token (read when
    /// MOLTBOT_ADMIN_TOKEN is unset).
    #[arg(
        long,
        global = true,
        env = "MOLTBOT_DATA_DIR",
        default_value = "var/data"
    )]
    data_dir: std::path::PathBuf,
}

#[derive(Debug, clap::Subcommand)]
enum RolloutCommand {
    /// Send a growing share of a route's new sessions to another model,
    /// rolled back on a breach, promoted after a clean last step.
    Start {
        /// The route (as named in the gateway configuration).
        #[arg(long)]
        route: String,
        /// The model rolled out (`moltbot models list` names them).
        #[arg(long)]
        to: String,
        /// Canary share of new sessions per step, percent, ending at 100.
        #[arg(long, value_delimiter = ',', default_values_t = default_steps())]
        steps: Vec<u8>,
        /// Least time per step (`30s`, `5m`, `1h`).
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        step_interval: Duration,
        /// Canary turns a step must see before it advances, promotes or
        /// judges a breach.
        #[arg(long, default_value_t = 100)]
        min_requests: u64,
        /// Largest share of failed canary turns per step.
        #[arg(long, default_value_t = 0.05)]
        max_error_rate: f64,
        /// Largest canary p95 time to first token over the stable one.
        #[arg(long, default_value_t = 1.5)]
        max_latency_ratio: f64,
    },
    /// Every rollout (or one route's) with its current step's numbers.
    Status {
        /// Only this route.
        #[arg(long)]
        route: Option<String>,
        /// Print the gateway's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Hold the current share; nothing advances (a breach still rolls
    /// back).
    Pause {
        /// The route.
        #[arg(long)]
        route: String,
    },
    /// Go on from a pause.
    Resume {
        /// The route.
        #[arg(long)]
        route: String,
    },
    /// Make the canary the route's model now.
    Promote {
        /// The route.
        #[arg(long)]
        route: String,
    },
    /// Send every new session back to the stable model.
    Abort {
        /// The route.
        #[arg(long)]
        route: String,
    },
}

/// Runs `moltbot rollout`. Errors with [`CliError::Setup`] naming what the
/// gateway answered (400: the plan; 404: route or rollout; 409: the
/// rollout's phase; 401/403: the admin token).
pub async fn run(args: RolloutArgs) -> Result<(), CliError> {
    let base = format!("{}/admin/rollouts", args.gateway_url.trim_end_matches('/'));
    let client = reqwest::Client::new();
    let (request, action) = match &args.command {
        RolloutCommand::Start {
            route,
            to,
            steps,
            step_interval,
            min_requests,
            max_error_rate,
            max_latency_ratio,
        } => (
            client.post(&base).json(&json!({
                "route": route,
                "to": to,
                "steps": steps,
                "step_interval_s": step_interval.as_secs_f64(),
                "min_requests": min_requests,
                "max_error_rate": max_error_rate,
                "max_latency_ratio": max_latency_ratio,
            })),
            "start",
        ),
        RolloutCommand::Status { route, .. } => (
            match route {
                Some(r) => client.get(format!("{base}/{r}")),
                None => client.get(&base),
            },
            "status",
        ),
        RolloutCommand::Pause { route } => (client.post(format!("{base}/{route}/pause")), "pause"),
        RolloutCommand::Resume { route } => {
            (client.post(format!("{base}/{route}/resume")), "resume")
        }
        RolloutCommand::Promote { route } => {
            (client.post(format!("{base}/{route}/promote")), "promote")
        }
        RolloutCommand::Abort { route } => (client.post(format!("{base}/{route}/abort")), "abort"),
    };
    let value = crate::admin::call(request, &args.data_dir, &format!("rollout {action}")).await?;
    match &args.command {
        RolloutCommand::Status { json: true, .. } => {
            println!(
                "{}",
                serde_json::to_string_pretty(&value).unwrap_or_default()
            );
        }
        RolloutCommand::Status { .. } => {
            let all = match value {
                Value::Array(all) => all,
                one => vec![one],
            };
            if all.is_empty() {
                println!("no rollouts");
            }
            for r in &all {
                print!("{}", describe(r));
            }
        }
        _ => {
            let last = &value["history"][value["history"]
                .as_array()
                .map_or(0, Vec::len)
                .saturating_sub(1)];
            println!(
                "route {}: rollout {} to {} {} (canary share {} %: {})",
                value["route"].as_str().unwrap_or("?"),
                value["id"].as_str().unwrap_or("?"),
                value["to"].as_str().unwrap_or("?"),
                value["phase"].as_str().unwrap_or("?"),
                last["share"],
                last["reason"].as_str().unwrap_or(""),
            );
        }
    }
    Ok(())
}

/// A report as lines for a person.
fn describe(r: &Value) -> String {
    let steps: Vec<String> = r["steps"]
        .as_array()
        .map(|s| s.iter().map(|v| format!("{v}")).collect())
        .unwrap_or_default();
    let side = |s: &Value| {
        format!(
            "{} turns, {} failed ({:.1} %), p95 time to first token {}",
            s["turns"],
            s["failed"],
            s["error_rate"].as_f64().unwrap_or(0.0) * 100.0,
            s["p95_ttft_ms"]
                .as_f64()
                .map_or("-".to_owned(), |ms| format!("≤ {ms:.0} ms"))
        )
    };
    let mut out = format!(
        "route {}: {} → {} ({})\n  phase {}, canary share {} % (step {} of {}: {} %)\n",
        r["route"].as_str().unwrap_or("?"),
        r["base"].as_str().unwrap_or("configured models"),
        r["to"].as_str().unwrap_or("?"),
        r["id"].as_str().unwrap_or("?"),
        r["phase"].as_str().unwrap_or("?"),
        r["share"],
        r["step"].as_u64().unwrap_or(0) + 1,
        steps.len(),
        steps.join(", "),
    );
    if let Some(reason) = r["reason"].as_str() {
        out.push_str(&format!("  reason: {reason}\n"));
    }
    out.push_str(&format!(
        "  this step: canary {}; stable {}\n",
        side(&r["canary"]),
        side(&r["stable"])
    ));
    if r["phase"] == "promoted" {
        out.push_str(&format!(
            "  to make it permanent, make `{}` the route's candidate in the gateway configuration\n",
            r["to"].as_str().unwrap_or("?")
        ));
    }
    out
}
