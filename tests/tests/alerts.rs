//! The alerting rules (deploy/prometheus/alerts.yml) and the Grafana
//! dashboard (deploy/grafana/dashboards/moltbot.json) on real tools:
//!
//! - `promtool check rules` and `promtool test rules` (Debian's
//!   `prometheus` package) on the rules and their unit tests;
//! - the chart's PrometheusRule, rendered by the real Helm, holds the same
//!   rules, with its configurable latency bound;
//! - the dashboard type-checks (`tsc --strict`) as Grafana's own dashboard
//!   type from `@grafana/schema` (unknown fields and wrong types fail);
//! - a real Prometheus scrapes a running mesh: every metric a panel or a
//!   rule reads exists, every panel's query returns series, every rule
//!   evaluates without error, and stopping a service takes
//!   `MoltBotServiceDown` from pending to firing through the HTTP API.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use moltbot_e2e::{fake, grpc, process::ServiceProcess, providers};
use serde_json::{Value, json};
use serde_yaml_ng::Value as Yaml;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A tool from `var`, else `fallback` when it exists.
fn tool(var: &str, fallback: &str) -> PathBuf {
    let p = std::env::var(var)
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(fallback));
    assert!(
        p.exists(),
        "{} is missing (set {var}): run `make observability-tools` (make test does)",
        p.display()
    );
    p
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?}: {text}");
    text
}

fn rules_file() -> PathBuf {
    root().join("deploy/prometheus/alerts.yml")
}

fn yaml(path: &Path) -> Yaml {
    serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Every rule of a rules document: (name, expression).
fn rules(doc: &Yaml) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let name = rule["alert"].as_str().or(rule["record"].as_str()).unwrap();
            out.push((name.to_owned(), rule["expr"].as_str().unwrap().to_owned()));
        }
    }
    out
}

/// The metric names a PromQL expression reads: identifiers with the
/// prefixes MoltBot's metrics have (and `up`), outside label matchers
/// (`{…}`) and outside the label lists of `by`, `without`, `on` and
/// `ignoring`.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut kept = String::new();
    let mut braces = 0usize;
    let mut quoted = false;
    for c in expr.chars() {
        match c {
            '"' => quoted = !quoted,
            '{' if !quoted => braces += 1,
            '}' if !quoted => braces = braces.saturating_sub(1),
            _ if quoted || braces > 0 => {}
            _ => kept.push(c),
        }
    }
    // Drop `by (…)` and friends: label names, not metrics.
    let mut text = kept;
    for keyword in ["by", "without", "on", "ignoring"] {
        while let Some(at) = find_word(&text, keyword) {
            let rest = &text[at + keyword.len()..];
            let open = rest.find('(');
            let close = rest.find(')');
            match (open, close) {
                (Some(o), Some(c)) if rest[..o].trim().is_empty() && o < c => {
                    text = format!("{} {}", &text[..at], &rest[c + 1..]);
                }
                _ => break,
            }
        }
    }
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
        .filter(|t| {
            ["moltbot_", "generation_", "http_", "grpc_"]
                .iter()
                .any(|p| t.starts_with(p))
                || *t == "up"
        })
        .map(str::to_owned)
        .collect()
}

/// Where `word` stands alone in `text`.
fn find_word(text: &str, word: &str) -> Option<usize> {
    let is_ident = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    text.match_indices(word).map(|(i, _)| i).find(|&i| {
        let before = text[..i].chars().next_back();
        let after = text[i + word.len()..].chars().next();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

#[test]
fn metric_names_skip_labels() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le, grpc_service, grpc_method) (rate(grpc_server_handling_seconds_bucket{grpc_code="OK"}[5m]))) and on (model) up"#,
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["grpc_server_handling_seconds_bucket", "up"]
    );
}

/// Every query of every dashboard panel: (panel title, expression).
fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/moltbot.json")).unwrap();
    let dash: Value = serde_json::from_str(&text).unwrap();
    let mut out = Vec::new();
    for panel in dash["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push((panel["title"].as_str().unwrap().to_owned(), expr.to_owned()));
            }
        }
    }
    assert!(!out.is_empty(), "the dashboard has no queries");
    out
}

#[test]
fn rules_pass_promtool_check_and_their_unit_tests() {
    let promtool = tool("PROMTOOL", "/usr/bin/promtool");
    let checked = run(Command::new(&promtool)
        .args(["check", "rules"])
        .arg(rules_file()));
    assert!(checked.contains("SUCCESS"), "{checked}");
    let tested = run(Command::new(&promtool)
        .args(["test", "rules", "alerts.test.yml"])
        .current_dir(root().join("deploy/prometheus")));
    assert!(tested.contains("SUCCESS"), "{tested}");
    // Every alert has a unit test, a summary, a description and a runbook
    // section in docs/alerts.md.
    let tests = std::fs::read_to_string(root().join("deploy/prometheus/alerts.test.yml")).unwrap();
    let runbooks = std::fs::read_to_string(root().join("docs/alerts.md")).unwrap();
    let doc = yaml(&rules_file());
    for group in doc["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let Some(alert) = rule["alert"].as_str() else {
                continue;
            };
            assert!(
                tests.contains(&format!("alertname: {alert}\n")),
                "{alert} has no promtool test"
            );
            for key in ["summary", "description", "runbook"] {
                assert!(
                    rule["annotations"][key].as_str().is_some(),
                    "{alert} lacks {key}"
                );
            }
            let anchor = rule["annotations"]["runbook"].as_str().unwrap();
            let heading = anchor.split_once('#').unwrap().1;
            assert_eq!(heading, alert.to_lowercase());
            assert!(
                runbooks.contains(&format!("## {alert}\n")),
                "docs/alerts.md has no section for {alert}"
            );
        }
    }
}

#[test]
fn the_chart_renders_the_same_rules_with_its_latency_bound() {
    // The chart's copy is this file, byte for byte.
    assert_eq!(
        std::fs::read_to_string(root().join("helm/moltbot/files/alerts.yml")).unwrap(),
        std::fs::read_to_string(rules_file()).unwrap(),
        "helm/moltbot/files/alerts.yml differs from deploy/prometheus/alerts.yml: copy it over"
    );
    let helm = tool("HELM", &root().join(".venv/bin/helm").display().to_string());
    let render = |extra: &[&str]| -> Vec<Yaml> {
        let out = run(Command::new(&helm)
            .args(["template", "moltbot"])
            .arg(root().join("helm/moltbot"))
            .args(extra)
            .args(["--show-only", "templates/prometheusrule.yaml"]));
        out.split("\n---")
            .filter_map(|d| serde_yaml_ng::from_str::<Yaml>(d).ok())
            .filter(|d| d["kind"] == "PrometheusRule")
            .collect()
    };
    let rendered = render(&["--set", "serviceMonitor.enabled=true"]);
    assert_eq!(rendered.len(), 1);
    assert_eq!(
        rules(&rendered[0]["spec"]),
        rules(&yaml(&rules_file())),
        "the PrometheusRule's rules are not alerts.yml's"
    );
    let bounded = render(&[
        "--set",
        "serviceMonitor.enabled=true",
        "--set",
        "prometheusRule.latencyP95Seconds=7",
    ]);
    let latency = rules(&bounded[0]["spec"])
        .into_iter()
        .find(|(n, _)| n == "MoltBotHighLatencyP95")
        .unwrap();
    assert!(latency.1.ends_with("> 7"), "{}", latency.1);
    // The rendered rules are valid Prometheus rules too.
    let file = std::env::temp_dir().join(format!("moltbot-chart-rules-{}.yml", std::process::id()));
    std::fs::write(
        &file,
        serde_yaml_ng::to_string(&bounded[0]["spec"]).unwrap(),
    )
    .unwrap();
    run(Command::new(tool("PROMTOOL", "/usr/bin/promtool"))
        .args(["check", "rules"])
        .arg(&file));
    let _ = std::fs::remove_file(file);
}

#[test]
fn the_dashboard_type_checks_against_grafanas_dashboard_schema() {
    let tsc = tool("TSC", "");
    let schema = tool("GRAFANA_SCHEMA", "");
    let types = schema.join("dist/types/raw/dashboard/x/types.gen");
    let dash =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/moltbot.json")).unwrap();
    let dir = std::env::temp_dir().join(format!("moltbot-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let check = |name: &str, json: &str| {
        let file = dir.join(name);
        std::fs::write(
            &file,
            format!(
                "import type {{ Dashboard }} from {:?};\nexport const dashboard: Dashboard = {json};\n",
                types.display().to_string()
            ),
        )
        .unwrap();
        Command::new(&tsc)
            .args(["--noEmit", "--strict"])
            .arg(&file)
            .output()
            .unwrap()
    };
    let ok = check("dashboard.ts", &dash);
    assert!(
        ok.status.success(),
        "the dashboard does not type-check as Grafana's Dashboard: {}",
        String::from_utf8_lossy(&ok.stdout)
    );
    // The check can fail: a misspelt panel field is refused.
    let bad = check("misspelt.ts", &dash.replacen("\"title\"", "\"titel\"", 2));
    assert!(!bad.status.success(), "a misspelt field passed the schema");
    let _ = std::fs::remove_dir_all(dir);
}

/// A Prometheus server on a free loopback port, killed on drop.
struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` every second with `rules`.
    async fn start(targets: &[String], rules: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("moltbot-prometheus-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("alerts.yml"), rules).unwrap();
        std::fs::write(
            dir.join("prometheus.yml"),
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\nrule_files: [alerts.yml]\nscrape_configs:\n  - job_name: moltbot\n    static_configs:\n      - targets: {}\n",
                serde_json::to_string(targets).unwrap()
            ),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new(tool("PROMETHEUS", "/usr/bin/prometheus"))
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let prometheus = Self { child, url, dir };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = client
                .get(format!("{}/-/ready", prometheus.url))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prometheus;
            }
            assert!(Instant::now() < deadline, "Prometheus not ready in 30 s");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `GET /api/v1/<path>` with `query`: the `data` of a success answer.
    async fn api(&self, path: &str, query: &[(&str, &str)]) -> Value {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/{path}", self.url))
            .query(query)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(body["status"], "success", "{path} {query:?}: {body}");
        body["data"].clone()
    }

    /// The instant result of `expr`.
    async fn query(&self, expr: &str) -> Vec<Value> {
        let data = self.api("query", &[("query", expr)]).await;
        data["result"].as_array().cloned().unwrap_or_default()
    }

    /// Active alerts named `name`.
    async fn alerts(&self, name: &str) -> Vec<Value> {
        let data = self.api("alerts", &[]).await;
        data["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }
}

/// Polls `check` every 250 ms until it holds or `within` passes.
async fn eventually<F, Fut>(what: &str, within: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "{what} within {within:?}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_prometheus_scrapes_the_mesh_and_an_alert_fires() {
    // A remote provider with one credential: the breaker-state series.
    let provider = fake::Provider {
        key: Some("sk-alerts"),
        ..Default::default()
    }
    .start()
    .await;
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[("MOLTBOT_ADMIN_TOKEN", "admin".to_owned())],
    );
    providers::register_openai(
        &auth.grpc_url(),
        "admin",
        "fake",
        provider,
        &["gpt-fake"],
        "sk-alerts",
    )
    .await;
    let context = ServiceProcess::start(
        "moltbot-context",
        &[("MOLTBOT_CONTEXT_STORE", "memory".to_owned())],
    );
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
    );
    // Understanding and retrieval are not running: turns are degraded, the
    // series the intents alert reads.
    let gateway = ServiceProcess::gateway_without_enrichments(&context, &generation, &auth, &[]);
    grpc::wait_serving(
        &grpc::connect(&generation.grpc_url()).await,
        "",
        Duration::from_secs(180),
    )
    .await;
    let http = reqwest::Client::new();
    let answer = http
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({
            "model": "default",
            "session_id": "alerts-1",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": "Say hello."}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200, "{}", answer.text().await.unwrap());

    // The shipped rules, with every `for:` of a minute or more cut to 3 s so
    // that pending → firing happens within the test; expressions unchanged.
    let shipped = std::fs::read_to_string(rules_file()).unwrap();
    let fast = ["for: 1m", "for: 2m", "for: 5m", "for: 10m"]
        .iter()
        .fold(shipped.clone(), |text, f| text.replace(f, "for: 3s"));
    let metrics_of = |p: &ServiceProcess| p.addrs.metrics_addr.unwrap().to_string();
    let auth_target = metrics_of(&auth);
    let targets = vec![
        gateway.addrs.http_addr.unwrap().to_string(),
        metrics_of(&context),
        metrics_of(&generation),
        auth_target.clone(),
    ];
    let prometheus = Prometheus::start(&targets, &fast).await;

    // Every target up, then two more scrapes so that rates have points.
    eventually(
        "every target scraped and up",
        Duration::from_secs(30),
        || async {
            let up = prometheus.query("up == 1").await;
            up.len() == targets.len()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;

    let doc = yaml(&rules_file());
    let dashboard = dashboard_queries();
    let mut names = BTreeSet::new();
    for (_, expr) in rules(&doc).iter().chain(&dashboard) {
        names.extend(metric_names(expr));
    }
    assert!(names.len() >= 15, "too few metric names found: {names:?}");
    let mut missing = Vec::new();
    for name in &names {
        if prometheus
            .query(&format!("count({{__name__={name:?}}})"))
            .await
            .is_empty()
        {
            missing.push(name.clone());
        }
    }
    assert!(
        missing.is_empty(),
        "queried by a panel or a rule but not exported by the running mesh: {missing:?}"
    );
    for (title, expr) in &dashboard {
        assert!(
            !prometheus.query(expr).await.is_empty(),
            "panel {title:?}: `{expr}` returns no series"
        );
    }
    // Every rule evaluates without error.
    eventually("every rule evaluated", Duration::from_secs(10), || async {
        let groups = prometheus.api("rules", &[]).await;
        let all: Vec<Value> = groups["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        for rule in &all {
            assert_ne!(rule["health"], "err", "rule failed: {rule}");
        }
        all.len() == rules(&doc).len() && all.iter().all(|r| r["health"] == "ok")
    })
    .await;
    assert!(
        prometheus.alerts("MoltBotServiceDown").await.is_empty(),
        "a service is down before any was stopped"
    );

    // Stop auth-rotation: its target goes down, the alert goes pending,
    // then firing, labelled with its instance.
    auth.stop();
    let mut states: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while states.last().map(String::as_str) != Some("firing") {
        assert!(
            Instant::now() < deadline,
            "MoltBotServiceDown not firing within 30 s; states seen: {states:?}"
        );
        let alerts = prometheus.alerts("MoltBotServiceDown").await;
        if let Some(alert) = alerts
            .iter()
            .find(|a| a["labels"]["instance"] == auth_target.as_str())
        {
            let state = alert["state"].as_str().unwrap().to_owned();
            if states.last() != Some(&state) {
                states.push(state);
            }
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(states, ["pending", "firing"], "states seen: {states:?}");
    let firing = prometheus.alerts("MoltBotServiceDown").await;
    assert_eq!(
        firing.len(),
        1,
        "only the stopped service is down: {firing:?}"
    );
    assert_eq!(
        firing[0]["annotations"]["summary"],
        format!("{auth_target} is down")
    );
    drop(gateway);
}
