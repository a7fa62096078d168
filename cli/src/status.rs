//! `moltbot status`: one table row per component of the mesh `moltbot up`
//! runs — state, address, model, version, uptime, restarts and last error.
//!
//! - **state** is the gateway's `/readyz` view of each upstream (`SERVING`,
//!   `NOT_SERVING`, `UNREACHABLE`), `restarting` while `moltbot up` waits to
//!   restart a process it saw exit, and `down` when nothing answers;
//! - **version** is the `version` label of the component's
//!   `moltbot_build_info` metric, read from its `/metrics`;
//! - **model** is what generation's `ListModels` serves (name and dtype)
//!   and, for understanding, whether its intent head is loaded;
//! - **uptime**, **restarts** come from `moltbot up`'s run state
//!   (`<log-dir>/up.json`), **last error** is the newest `error` record of
//!   the component's log file.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use moltbot_runtime::ports;
use serde_json::Value;

use crate::{CliError, up::state};

/// Flags of `moltbot status`.
#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Directory of the log files and the run state (`moltbot up --log-dir`).
    #[arg(long, env = "MOLTBOT_LOG_DIR", default_value = "var/log")]
    pub log_dir: PathBuf,
    /// Data directory of `moltbot up` (the operator certificate under
    /// `pki/`, for `ListModels`).
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: PathBuf,
}

/// One row of the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// Component name.
    pub component: String,
    /// See the module doc.
    pub state: String,
    /// Its gRPC (or HTTP) address.
    pub address: String,
    /// Model served, or `-`.
    pub model: String,
    /// Version, or `-`.
    pub version: String,
    /// Uptime, or `-`.
    pub uptime: String,
    /// Restarts by `moltbot up`, or `-`.
    pub restarts: String,
    /// Newest error record, or `-`.
    pub last_error: String,
}

/// Per-component timeout of each probe.
const PROBE: Duration = Duration::from_secs(2);

/// The `version` label of `moltbot_build_info` in a `/metrics` body.
pub fn build_version(metrics: &str) -> Option<String> {
    let line = metrics
        .lines()
        .find(|l| l.starts_with("moltbot_build_info{"))?;
    let (_, rest) = line.split_once("version=\"")?;
    rest.split_once('"').map(|(v, _)| v.to_owned())
}

/// The message of the newest `error` record of a log file's last MiB.
fn last_error(path: &std::path::Path) -> Option<String> {
    let (lines, _) = crate::logs::tail(path).ok()?;
    lines
        .iter()
        .rev()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|v| v["level"] == "error")
        .map(|v| {
            let ts = v["timestamp"].as_str().unwrap_or_default();
            format!("{} {}", ts, v["message"].as_str().unwrap_or_default())
        })
}

/// Seconds as `3h04m`, `4m05s` or `12s`.
fn uptime(seconds: u64) -> String {
    match seconds {
        s if s >= 3600 => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
        s if s >= 60 => format!("{}m{:02}s", s / 60, s % 60),
        s => format!("{s}s"),
    }
}

/// The table's text: a header and one line per row, columns padded to
/// their widest cell (the last one not padded).
pub fn render(rows: &[Row]) -> String {
    let header = [
        "COMPONENT",
        "STATE",
        "ADDRESS",
        "MODEL",
        "VERSION",
        "UPTIME",
        "RESTARTS",
        "LAST ERROR",
    ];
    let cells: Vec<[&str; 8]> = std::iter::once(header)
        .chain(rows.iter().map(|r| {
            [
                r.component.as_str(),
                &r.state,
                &r.address,
                &r.model,
                &r.version,
                &r.uptime,
                &r.restarts,
                &r.last_error,
            ]
        }))
        .collect();
    let widths: Vec<usize> = (0..8)
        .map(|i| {
            cells
                .iter()
                .map(|c| c[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in cells {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == 7 {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The gateway's `/readyz` upstream states by name, or `None` when the
/// gateway does not answer.
async fn upstream_states(client: &reqwest::Client) -> Option<HashMap<String, String>> {
    let body: Value = client
        .get(format!("http://{}/readyz", ports::GATEWAY_HTTP))
        .timeout(PROBE)
        .send()
        .await
        .ok()?
        .json()
        .await
        .ok()?;
    Some(
        body["upstreams"]
            .as_array()
            .map(|ups| {
                ups.iter()
                    .filter_map(|u| {
                        Some((
                            u["name"].as_str()?.to_owned(),
                            u["status"].as_str()?.to_owned(),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// The `version` of `moltbot_build_info` at `http://addr/metrics`.
async fn version(client: &reqwest::Client, addr: std::net::SocketAddr) -> Option<String> {
    let body = client
        .get(format!("http://{addr}/metrics"))
        .timeout(PROBE)
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    build_version(&body)
}

/// Generation's models as `name (dtype)`, comma-joined.
async fn generation_models() -> Option<String> {
    use moltbot_proto::generation::v1::{
        ListModelsRequest, generation_service_client::GenerationServiceClient,
    };
    let url = format!("https://{}", ports::GENERATION.grpc_addr);
    let channel = tokio::time::timeout(PROBE, crate::mesh::connect("generation", &url))
        .await
        .ok()?
        .ok()?;
    let mut request = tonic::Request::new(ListModelsRequest {});
    request.set_timeout(PROBE);
    let models = GenerationServiceClient::new(channel)
        .list_models(request)
        .await
        .ok()?
        .into_inner()
        .models;
    Some(
        models
            .iter()
            .map(|m| format!("{} ({})", m.name, m.dtype))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// Prints the table. Never fails for a component that is down (its row
/// says so); errors only when the client TLS cannot be set up.
pub async fn run(args: StatusArgs) -> Result<(), CliError> {
    crate::mesh::install_tls(&args.data_dir)?;
    let client = reqwest::Client::new();
    let run = state::read(&args.log_dir);
    if run.is_none() {
        eprintln!(
            "no `moltbot up` run state in {}; showing what answers on the default ports",
            state::path(&args.log_dir).display()
        );
    }
    let upstreams = upstream_states(&client).await;
    let now = state::now_unix();
    let components = ports::ALL
        .iter()
        .map(|s| {
            (
                s.binary.trim_start_matches("moltbot-"),
                s.grpc_addr,
                s.metrics_addr,
            )
        })
        .chain(std::iter::once((
            "gateway",
            ports::GATEWAY_HTTP,
            ports::GATEWAY_HTTP,
        )));
    let mut rows = Vec::new();
    for (name, addr, metrics) in components {
        let supervised = run
            .as_ref()
            .and_then(|r| r.components.iter().find(|c| c.name == name));
        let version = version(&client, metrics).await;
        let state = match (name, &upstreams, supervised) {
            (_, _, Some(c)) if c.pid.is_none() => "restarting".to_owned(),
            ("gateway", Some(_), _) => "SERVING".to_owned(),
            (_, Some(ups), _) if ups.contains_key(name) => ups[name].clone(),
            _ if version.is_some() => "running".to_owned(),
            _ => "down".to_owned(),
        };
        let model = match name {
            "generation" => generation_models().await,
            "understanding" => {
                upstreams
                    .as_ref()
                    .map(|u| match u.get("understanding").map(String::as_str) {
                        Some("SERVING") => "intent head loaded".to_owned(),
                        _ => "no intent head".to_owned(),
                    })
            }
            _ => None,
        };
        let log = supervised
            .map(|c| c.log.clone())
            .unwrap_or_else(|| args.log_dir.join(format!("{name}.log")));
        rows.push(Row {
            component: name.to_owned(),
            state,
            address: addr.to_string(),
            model: model.unwrap_or_else(|| "-".into()),
            version: version.unwrap_or_else(|| "-".into()),
            uptime: supervised
                .filter(|c| c.pid.is_some())
                .map(|c| uptime(now.saturating_sub(c.started_unix)))
                .unwrap_or_else(|| "-".into()),
            restarts: supervised
                .map(|c| c.restarts.to_string())
                .unwrap_or_else(|| "-".into()),
            last_error: last_error(&log).unwrap_or_else(|| "-".into()),
        });
    }
    print!("{}", render(&rows));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_comes_from_build_info() {
        let body =
            "# HELP x\nmoltbot_build_info{service=\"context\",version=\"0.1.0\"} 1\nother 2\n";
        assert_eq!(build_version(body).as_deref(), Some("0.1.0"));
        assert_eq!(build_version("nothing 1\n"), None);
    }

    #[test]
    fn the_table_pads_every_column_but_the_last() {
        let row = Row {
            component: "generation".into(),
            state: "SERVING".into(),
            address: "127.0.0.1:50052".into(),
            model: "m (int4)".into(),
            version: "0.1.0".into(),
            uptime: uptime(3725),
            restarts: "0".into(),
            last_error: "-".into(),
        };
        let text = render(&[row]);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("COMPONENT   STATE    ADDRESS"));
        assert!(lines[1].contains("1h02m"));
        assert_eq!(lines[0].find("STATE"), lines[1].find("SERVING"));
    }
}
