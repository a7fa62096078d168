//! Deployment files checked without a cluster or a Docker daemon: the
//! Dockerfile's targets and the files they copy exist; the compose file and
//! the Helm chart use the ports and variables docs/architecture.md pins (cross-checked
//! against `moltbot_runtime::ports`); the chart renders with the real Helm
//! binary and validates against the Kubernetes schemas
//! (`kubernetes-validate --strict`); the Tiltfile references what exists.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use moltbot_runtime::{grpc::ServiceSpec, ports};
use serde_yaml_ng::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// (component name in compose and the chart, pinned spec, full gRPC name,
/// gateway variable).
fn pinned() -> Vec<(&'static str, ServiceSpec, &'static str, &'static str)> {
    vec![
        (
            "understanding",
            ports::UNDERSTANDING,
            "moltbot.understanding.v1.UnderstandingService",
            "MOLTBOT_UNDERSTANDING_URL",
        ),
        (
            "generation",
            ports::GENERATION,
            "moltbot.generation.v1.GenerationService",
            "MOLTBOT_GENERATION_URL",
        ),
        (
            "retrieval",
            ports::RETRIEVAL,
            "moltbot.retrieval.v1.RetrievalService",
            "MOLTBOT_RETRIEVAL_URL",
        ),
        (
            "context",
            ports::CONTEXT,
            "moltbot.context.v1.ContextService",
            "MOLTBOT_CONTEXT_URL",
        ),
        (
            "auth-rotation",
            ports::AUTH_ROTATION,
            "moltbot.auth.v1.AuthRotationService",
            "MOLTBOT_AUTH_URL",
        ),
    ]
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// Build stages of the Dockerfile: name → lines.
fn dockerfile_stages() -> BTreeMap<String, Vec<String>> {
    let text = std::fs::read_to_string(root().join("deploy/Dockerfile")).unwrap();
    let mut stages: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines() {
        let l = line.trim();
        if let Some(rest) = l.strip_prefix("FROM ") {
            let parts: Vec<&str> = rest.split_whitespace().collect();
            assert_eq!(parts.len(), 3, "FROM without AS: {l}");
            assert_eq!(parts[1].to_ascii_uppercase(), "AS");
            current = parts[2].to_owned();
            stages.insert(current.clone(), vec![l.to_owned()]);
        } else if !current.is_empty() && !l.starts_with('#') && !l.is_empty() {
            stages.get_mut(&current).unwrap().push(l.to_owned());
        }
    }
    stages
}

#[test]
fn dockerfile_targets_exist_copy_real_files_and_run_as_non_root() {
    let stages = dockerfile_stages();
    for target in [
        "gateway",
        "context",
        "auth-rotation",
        "understanding",
        "retrieval",
        "generation-cpu",
        "generation-cuda",
        "models",
    ] {
        let lines = stages
            .get(target)
            .unwrap_or_else(|| panic!("no target {target}"));
        assert!(
            lines.iter().any(|l| l.starts_with("USER ")),
            "{target} runs as root"
        );
        assert!(
            lines.iter().any(|l| l.starts_with("ENTRYPOINT")),
            "{target} has no entrypoint"
        );
    }
    // The images without libtorch: distroless, nothing copied from torch.
    for target in ["gateway", "context", "auth-rotation"] {
        let lines = &stages[target];
        assert!(lines[0].contains("distroless"), "{target}: {}", lines[0]);
        assert!(
            !lines.iter().any(|l| l.contains("torch")),
            "{target} carries libtorch"
        );
    }
    // Every COPY from the build context names files that exist.
    for (stage, lines) in &stages {
        for l in lines {
            let Some(rest) = l.strip_prefix("COPY ") else {
                continue;
            };
            if rest.starts_with("--from") {
                continue;
            }
            let parts: Vec<&str> = rest.split_whitespace().collect();
            for src in &parts[..parts.len() - 1] {
                assert!(
                    root().join(src).exists(),
                    "{stage}: COPY {src}: no such file"
                );
            }
        }
    }
}

#[test]
fn compose_uses_the_pinned_ports_and_variables() {
    let mut compose: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root().join("deploy/docker-compose.yml")).unwrap(),
    )
    .unwrap();
    // Resolve the `<<: *anchor` merge keys, as Compose does.
    compose.apply_merge().unwrap();
    let stages = dockerfile_stages();
    let services = compose["services"].as_mapping().unwrap();
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if let Some(target) = svc["build"]["target"].as_str() {
            assert!(
                stages.contains_key(target),
                "{name}: no Dockerfile target {target}"
            );
            assert_eq!(
                svc["build"]["dockerfile"].as_str(),
                Some("deploy/Dockerfile")
            );
        }
        for volume in svc["volumes"].as_sequence().into_iter().flatten() {
            let v = volume.as_str().unwrap();
            if let Some(path) = v.strip_prefix("./") {
                let file = path.split(':').next().unwrap();
                assert!(
                    root().join("deploy").join(file).exists(),
                    "{name}: mounts missing {file}"
                );
            }
        }
    }
    let env = |svc: &str, var: &str| -> String {
        compose["services"][svc]["environment"][var]
            .as_str()
            .unwrap_or_else(|| panic!("{svc} lacks {var}"))
            .to_owned()
    };
    for (name, spec, _, gateway_var) in pinned() {
        assert_eq!(
            port_of(&env(name, "MOLTBOT_GRPC_ADDR")),
            spec.grpc_addr.port(),
            "{name}"
        );
        assert_eq!(
            port_of(&env(name, "MOLTBOT_METRICS_ADDR")),
            spec.metrics_addr.port(),
            "{name}"
        );
        assert_eq!(
            env("gateway", gateway_var),
            format!("http://{name}:{}", spec.grpc_addr.port())
        );
        assert_eq!(env(name, "OTEL_SERVICE_NAME"), format!("moltbot-{name}"));
        assert!(env(name, "OTEL_EXPORTER_OTLP_ENDPOINT").starts_with("http://otel-collector:4317"));
    }
    assert_eq!(
        port_of(&env("gateway", "MOLTBOT_HTTP_ADDR")),
        ports::GATEWAY_HTTP.port()
    );
    assert_eq!(
        env("generation", "MOLTBOT_AUTH_URL"),
        format!(
            "http://auth-rotation:{}",
            ports::AUTH_ROTATION.grpc_addr.port()
        )
    );
    // Prometheus scrapes every metrics port and the gateway.
    let prom = std::fs::read_to_string(root().join("deploy/prometheus.yml")).unwrap();
    for (name, spec, _, _) in pinned() {
        assert!(
            prom.contains(&format!("{name}:{}", spec.metrics_addr.port())),
            "prometheus misses {name}"
        );
    }
    assert!(prom.contains(&format!("gateway:{}", ports::GATEWAY_HTTP.port())));
    // The dashboard shows the figures the issue names.
    let dash =
        std::fs::read_to_string(root().join("deploy/grafana/dashboards/moltbot.json")).unwrap();
    for metric in [
        "http_server_request_duration_seconds",
        "time_to_first_token",
        "generation_tokens_total",
        "generation_batch_size",
        "moltbot_auth_breaker_state",
        "moltbot_gateway_degraded_turns_total",
    ] {
        assert!(dash.contains(metric), "dashboard lacks {metric}");
    }
}

fn tool(var: &str, fallback: &str) -> PathBuf {
    std::env::var(var).map(PathBuf::from).unwrap_or_else(|_| {
        let p = root().join(".venv/bin").join(fallback);
        assert!(
            p.exists(),
            "{var} is not set and {} is missing: run `make deploy-tools` (make test does)",
            p.display()
        );
        p
    })
}

fn render(extra: &[&str]) -> String {
    let out = Command::new(tool("HELM", "helm"))
        .args(["template", "moltbot"])
        .arg(root().join("helm/moltbot"))
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `manifests` without the documents of `kind`.
fn without_kind(manifests: &str, kind: &str) -> String {
    manifests
        .split("\n---")
        .filter(|d| !d.contains(&format!("\nkind: {kind}\n")))
        .collect::<Vec<_>>()
        .join("\n---")
}

fn validate(manifests: &str, tag: &str) {
    let file =
        std::env::temp_dir().join(format!("moltbot-chart-{tag}-{}.yaml", std::process::id()));
    std::fs::write(&file, manifests).unwrap();
    let out = Command::new(tool("KUBERNETES_VALIDATE", "kubernetes-validate"))
        .args(["--strict", "--quiet", "-k", "1.30.0"])
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("ERROR"),
        "{tag}: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_file(file);
}

#[test]
fn helm_chart_renders_validates_and_matches_the_pinned_names() {
    let lint = Command::new(tool("HELM", "helm"))
        .arg("lint")
        .arg(root().join("helm/moltbot"))
        .output()
        .unwrap();
    assert!(
        lint.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&lint.stdout)
    );

    let default = render(&[]);
    // cert-manager's Certificate is a CRD the schemas do not hold: checked
    // below by hand, the rest schema-validated.
    validate(&without_kind(&default, "Certificate"), "default");
    let dev = render(&[
        "-f",
        root()
            .join("helm/moltbot/values-dev.yaml")
            .to_str()
            .unwrap(),
        "--set",
        "services.generation.gpu.enabled=true",
    ]);
    validate(&dev, "dev-gpu");
    assert!(
        !dev.contains("kind: Certificate"),
        "dev values run without cert-manager"
    );
    assert!(dev.contains("MOLTBOT_INSECURE_PLAINTEXT"));
    // ServiceMonitor is a CRD the schemas do not hold: rendered and parsed,
    // not schema-validated.
    let monitored = render(&["--set", "serviceMonitor.enabled=true"]);
    assert_eq!(monitored.matches("kind: ServiceMonitor").count(), 6);
    // With them the alerting rules (their content: tests/tests/alerts.rs).
    assert_eq!(monitored.matches("kind: PrometheusRule").count(), 1);
    assert!(!default.contains("kind: PrometheusRule"));

    let docs: Vec<Value> = serde_yaml_ng::Deserializer::from_str(&default)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .filter(|v: &Value| !v.is_null())
        .collect();
    let find = |kind: &str, name: &str| -> &Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    };
    let env_of = |container: &Value, var: &str| -> String {
        container["env"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|e| e["name"] == var)
            .and_then(|e| e["value"].as_str())
            .unwrap_or_else(|| panic!("no {var}"))
            .to_owned()
    };
    let gateway =
        &find("Deployment", "moltbot-gateway")["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(
        port_of(&env_of(gateway, "MOLTBOT_HTTP_ADDR")),
        ports::GATEWAY_HTTP.port()
    );
    for (name, spec, full, gateway_var) in pinned() {
        let object = format!("moltbot-{name}");
        let service = find("Service", &object);
        let svc_ports = service["spec"]["ports"].as_sequence().unwrap();
        assert_eq!(
            svc_ports[0]["port"].as_u64(),
            Some(u64::from(spec.grpc_addr.port())),
            "{name}"
        );
        assert_eq!(
            svc_ports[1]["port"].as_u64(),
            Some(u64::from(spec.metrics_addr.port())),
            "{name}"
        );
        let c = &find("Deployment", &object)["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(
            port_of(&env_of(c, "MOLTBOT_GRPC_ADDR")),
            spec.grpc_addr.port()
        );
        assert_eq!(
            port_of(&env_of(c, "MOLTBOT_METRICS_ADDR")),
            spec.metrics_addr.port()
        );
        assert_eq!(env_of(c, "OTEL_SERVICE_NAME"), object);
        assert_eq!(
            c["readinessProbe"]["grpc"]["service"].as_str(),
            Some(full),
            "{name}"
        );
        // Mutual TLS: probes on the plaintext health listener, the
        // component's own certificate, https:// from the gateway.
        let health = port_of(&env_of(c, "MOLTBOT_HEALTH_ADDR"));
        assert_eq!(
            c["livenessProbe"]["grpc"]["port"].as_u64(),
            Some(u64::from(health))
        );
        assert_eq!(env_of(c, "MOLTBOT_TLS_CA"), "/var/run/moltbot/tls/ca.crt");
        // Clients dial the headless Service, which resolves to every
        // ready pod, and balance over them.
        assert_eq!(
            env_of(gateway, gateway_var),
            format!("https://{object}-pods:{}", spec.grpc_addr.port())
        );
        let headless = find("Service", &format!("{object}-pods"));
        assert_eq!(headless["spec"]["clusterIP"], "None", "{name}");
        assert_eq!(
            headless["spec"]["ports"][0]["port"].as_u64(),
            Some(u64::from(spec.grpc_addr.port())),
            "{name}"
        );
        assert_eq!(headless["spec"]["selector"], service["spec"]["selector"]);
        // Drain: NOT_SERVING for the delay, then the grace, within the
        // pod's termination budget.
        assert_eq!(env_of(c, "MOLTBOT_DRAIN_DELAY_MS"), "10000");
        assert_eq!(
            find("Deployment", &object)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
                .as_u64(),
            Some(35),
            "{name}"
        );
        let cert = find("Certificate", &object);
        assert_eq!(cert["spec"]["uris"][0], format!("spiffe://moltbot/{name}"));
        assert!(
            cert["spec"]["dnsNames"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|n| n.as_str() == Some(&format!("{object}-pods"))),
            "{name}: the certificate must name the headless Service its clients dial"
        );
        assert_eq!(cert["spec"]["secretName"], format!("{object}-tls"));
        // Secrets only where they are needed: the master key to
        // auth-rotation alone.
        let has_secret = |key: &str| {
            c["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| e["name"] == key)
        };
        assert_eq!(
            has_secret("MOLTBOT_MASTER_KEY"),
            name == "auth-rotation",
            "{name}"
        );
        assert_eq!(has_secret("REDIS_URL"), name == "context", "{name}");
        assert_eq!(
            has_secret("DATABASE_URL"),
            ["context", "retrieval", "auth-rotation"].contains(&name),
            "{name}"
        );
        // Stateful services refuse process-local stores (stores.required).
        assert_eq!(
            has_secret("MOLTBOT_REPLICATED"),
            ["context", "retrieval", "auth-rotation"].contains(&name),
            "{name}"
        );
        // Ingress to the gRPC port from the allowed callers only.
        let policy = find("NetworkPolicy", &object);
        let callers: Vec<&str> = policy["spec"]["ingress"][0]["from"]
            .as_sequence()
            .unwrap()
            .iter()
            .map(|f| {
                f["podSelector"]["matchLabels"]["app.kubernetes.io/component"]
                    .as_str()
                    .unwrap()
            })
            .collect();
        let expected: &[&str] = if name == "auth-rotation" {
            &["generation"]
        } else {
            &["gateway"]
        };
        assert_eq!(callers, expected, "{name}");
    }
    find("Certificate", "moltbot-gateway");
    assert!(!default.contains("MOLTBOT_INSECURE_PLAINTEXT"));
    // Two or more gateways share the rate-limit buckets in Redis: the
    // chart marks them replicated (start-up then needs REDIS_URL) and hands
    // them REDIS_URL.
    // The spend ledger of several gateways is PostgreSQL's (DATABASE_URL).
    assert_eq!(env_of(gateway, "MOLTBOT_REPLICATED"), "true");
    for key in ["REDIS_URL", "DATABASE_URL"] {
        assert!(
            gateway["env"]
                .as_sequence()
                .unwrap()
                .iter()
                .any(|e| e["name"] == key),
            "{key}"
        );
    }
    // Only the gateway's policy admits traffic from anywhere.
    let gw_policy = find("NetworkPolicy", "moltbot-gateway");
    assert!(gw_policy["spec"]["ingress"][0]["from"].is_null());
    find("HorizontalPodAutoscaler", "moltbot-gateway");
    find("PodDisruptionBudget", "moltbot-gateway");
    find("ConfigMap", "moltbot-gateway-config");
    // GPU request and CUDA image when enabled.
    assert!(dev.contains("nvidia.com/gpu: 1"));
    assert!(dev.contains("image: moltbot/generation-cuda:dev"));
}

#[test]
fn tiltfile_references_existing_files_and_chart_objects() {
    let tilt = std::fs::read_to_string(root().join("Tiltfile")).unwrap();
    for path in [
        "deploy/Dockerfile",
        "helm/moltbot",
        "helm/moltbot/values-dev.yaml",
        "deploy/k8s/observability.yaml",
    ] {
        assert!(tilt.contains(path), "Tiltfile does not use {path}");
        assert!(root().join(path).exists(), "{path} is missing");
    }
    let stages = dockerfile_stages();
    for line in tilt
        .lines()
        .filter(|l| l.trim_start().starts_with('\'') && l.contains("': '"))
    {
        let target = line
            .split("': '")
            .nth(1)
            .unwrap()
            .trim_end_matches("',")
            .trim_end_matches('\'');
        assert!(
            stages.contains_key(target),
            "Tiltfile builds unknown target {target}"
        );
    }
    for (name, _, _, _) in pinned() {
        assert!(
            tilt.contains(&format!("'moltbot-{name}'")),
            "Tiltfile lacks resource moltbot-{name}"
        );
    }
}
