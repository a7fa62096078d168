//! `moltbot spend`: spend per key, tenant, model, route or endpoint from
//! the gateway's ledger, and (`--budgets`) every budget's current window,
//! through the operator endpoints `/admin/spend` and `/admin/budgets`
//! (`gateway/src/http/spend.rs`; the rules are in `gateway/src/spend/`).

use serde_json::Value;

use crate::CliError;

/// Flags of `moltbot spend`.
#[derive(Debug, clap::Args)]
pub struct SpendArgs {
    /// How rows are grouped: key, tenant, model, route or endpoint.
    #[arg(long, default_value = "key")]
    by: String,
    /// From: a time ago (`24h`, `7d`), a date (`2026-12-01`, midnight
    /// UTC) or an RFC 3339 instant. Default: everything.
    #[arg(long)]
    since: Option<String>,
    /// Until (excluded), in the same forms. Default: now.
    #[arg(long)]
    until: Option<String>,
    /// Show every budget's current window instead.
    #[arg(long)]
    budgets: bool,
    /// Print the gateway's JSON.
    #[arg(long)]
    json: bool,
    /// The gateway and the admin token.
    #[command(flatten)]
    admin: crate::admin::AdminArgs,
}

/// `24h` ago, `2026-12-01` or an RFC 3339 instant as RFC 3339. Errors
/// with [`CliError::Setup`] saying which forms are accepted.
fn instant(flag: &str, value: &str) -> Result<String, CliError> {
    if let Ok(ago) = humantime::parse_duration(value) {
        let ago = jiff::SignedDuration::try_from(ago).unwrap_or(jiff::SignedDuration::MAX);
        if let Ok(t) = jiff::Timestamp::now().checked_sub(ago) {
            return Ok(t.to_string());
        }
    }
    if let Ok(t) = value.parse::<jiff::Timestamp>() {
        return Ok(t.to_string());
    }
    if let Ok(d) = value.parse::<jiff::civil::Date>()
        && let Ok(z) = d.to_zoned(jiff::tz::TimeZone::UTC)
    {
        return Ok(z.timestamp().to_string());
    }
    Err(CliError::Setup(format!(
        "--{flag} {value}: give a time ago (24h, 7d), a date (2026-12-01) or an RFC 3339 instant"
    )))
}

/// Runs `moltbot spend`. Errors with [`CliError::Setup`] naming what the
/// gateway answered.
pub async fn run(args: SpendArgs) -> Result<(), CliError> {
    let client = reqwest::Client::new();
    let request = if args.budgets {
        client.get(args.admin.url("/admin/budgets"))
    } else {
        let mut query = vec![("by", args.by.clone())];
        if let Some(s) = &args.since {
            query.push(("since", instant("since", s)?));
        }
        if let Some(u) = &args.until {
            query.push(("until", instant("until", u)?));
        }
        client.get(args.admin.url("/admin/spend")).query(&query)
    };
    let value = crate::admin::call(request, &args.admin.data_dir, "spend").await?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&value).unwrap_or_default()
        );
    } else if args.budgets {
        print!("{}", budgets_table(&value));
    } else {
        print!("{}", spend_table(&value));
    }
    Ok(())
}

/// The report as a table.
fn spend_table(v: &Value) -> String {
    let by = v["by"].as_str().unwrap_or("group");
    let mut out = format!(
        "{by:<28} {:>9} {:>12} {:>10} {:>12} {:>14} {:>9}\n",
        "requests", "input tok", "cached", "output tok", "cost USD", "unpriced"
    );
    for r in v["rows"].as_array().into_iter().flatten() {
        out.push_str(&format!(
            "{:<28} {:>9} {:>12} {:>10} {:>12} {:>14.6} {:>9}\n",
            r["group"].as_str().unwrap_or("?"),
            r["requests"],
            r["input_tokens"],
            r["cached_tokens"],
            r["output_tokens"],
            r["cost_usd"].as_f64().unwrap_or(0.0),
            r["unpriced_requests"],
        ));
    }
    out.push_str(&format!(
        "{:<28} {:>9} {:>12} {:>10} {:>12} {:>14.6}\n",
        "total",
        v["total"]["requests"],
        "",
        "",
        "",
        v["total"]["cost_usd"].as_f64().unwrap_or(0.0)
    ));
    out
}

/// Budgets as a table.
fn budgets_table(v: &Value) -> String {
    let all = v["budgets"].as_array().cloned().unwrap_or_default();
    if all.is_empty() {
        return "no budgets configured (spend.budgets in the gateway configuration)\n".to_owned();
    }
    let mut out = format!(
        "{:<28} {:<8} {:>12} {:>12} {:>6}  {}\n",
        "budget", "window", "spent USD", "max USD", "used", "resets at"
    );
    for b in all {
        let (spent, max) = (
            b["spent_usd"].as_f64().unwrap_or(0.0),
            b["max_usd"].as_f64().unwrap_or(0.0),
        );
        out.push_str(&format!(
            "{:<28} {:<8} {:>12.6} {:>12.6} {:>5.1}%  {}\n",
            b["budget"].as_str().unwrap_or("?"),
            b["window"].as_str().unwrap_or("?"),
            spent,
            max,
            if max > 0.0 { spent / max * 100.0 } else { 0.0 },
            b["resets_at"].as_str().unwrap_or("?"),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn since_takes_durations_dates_and_instants() {
        assert_eq!(
            instant("since", "2026-12-01").unwrap(),
            "2026-12-01T00:00:00Z"
        );
        assert_eq!(
            instant("since", "2026-12-01T10:00:00+01:00").unwrap(),
            "2026-12-01T09:00:00Z"
        );
        let ago: jiff::Timestamp = instant("since", "24h").unwrap().parse().unwrap();
        let d = jiff::Timestamp::now().duration_since(ago).as_secs();
        assert!((86_399..=86_401).contains(&d), "{d}");
        assert!(instant("since", "yesterday-ish").is_err());
    }
}
