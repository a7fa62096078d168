//! Live rollouts end to end (gateway/src/rollout/): two real gateways
//! sharing a real Redis, the `moltbot rollout` CLI, generation relaying to
//! fake OpenAI-compatible providers (the only fakes: third-party
//! providers) through credentials leased from auth-rotation. The rules
//! themselves (steps, breaches, pauses) are tested in process
//! (gateway/src/rollout/plan.rs, gateway/src/rollout/tests.rs).
//!
//! Needs Redis (`REDIS_URL`, default redis://127.0.0.1:6379).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    process::Command,
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant},
};

use axum::http::StatusCode;
use moltbot_e2e::{
    answered_by, fake, grpc, metrics,
    process::{ServiceProcess, binary},
    providers,
    stores::{redis_url, unique},
};
use serde_json::{Value, json};

const ADMIN: &str = "rollout-admin";
const KEY: &str = "sk-fake";

struct Mesh {
    _auth: ServiceProcess,
    /// The headers of the last request the key-less engine received.
    engine_headers: Arc<std::sync::Mutex<axum::http::HeaderMap>>,
    context: ServiceProcess,
    generation: ServiceProcess,
    config: std::path::PathBuf,
    run: String,
}

impl Mesh {
    /// Providers `stable` (answers), `broken` (500 to every request) and
    /// `healthy` (answers); one route per test (`failing-…` on model
    /// `m-failing-…`, `clean-…` on `m-clean-…`) over `stable/gpt-stable`.
    async fn start() -> Self {
        let auth = ServiceProcess::start(
            "moltbot-auth-rotation",
            &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
        );
        let mut engine_headers = Default::default();
        for (name, fail_with) in [
            ("stable", None),
            ("broken", Some(StatusCode::INTERNAL_SERVER_ERROR)),
            ("healthy", None),
        ] {
            // `healthy` stands for an in-cluster engine: registered with no
            // key, it takes requests without one.
            let no_auth = name == "healthy";
            let fake = fake::Provider {
                key: Some(KEY),
                calls: Arc::new(AtomicU32::new(0)),
                fail_with,
                no_auth,
                ..Default::default()
            };
            if no_auth {
                engine_headers = fake.last_headers.clone();
            }
            let url = fake.start().await;
            let model = format!("gpt-{name}");
            if no_auth {
                providers::register_openai_without_key(
                    &auth.grpc_url(),
                    ADMIN,
                    name,
                    url,
                    &[&model],
                )
                .await;
            } else {
                providers::register_openai(&auth.grpc_url(), ADMIN, name, url, &[&model], KEY)
                    .await;
            }
        }
        let context = ServiceProcess::start("moltbot-context", &[]);
        let generation = ServiceProcess::start(
            "moltbot-generation",
            &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
        );
        let channel = grpc::connect(&generation.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(120)).await;
        let run = unique("rollout");
        let config = std::env::temp_dir().join(format!("moltbot-{run}.yaml"));
        let route = |kind: &str| {
            format!(
                "  - name: {kind}-{run}\n    match: {{ models: [m-{kind}-{run}] }}\n    understanding: false\n    candidates: [{{ model: stable/gpt-stable }}]\n"
            )
        };
        std::fs::write(
            &config,
            format!("routes:\n{}{}", route("failing"), route("clean")),
        )
        .unwrap();
        Self {
            _auth: auth,
            engine_headers,
            context,
            generation,
            config,
            run,
        }
    }

    fn gateway(&self) -> ServiceProcess {
        ServiceProcess::gateway_without_enrichments(
            &self.context,
            &self.generation,
            &self._auth,
            &[
                ("MOLTBOT_GATEWAY_CONFIG", self.config.display().to_string()),
                ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
                ("MOLTBOT_ROLLOUT_TICK_MS", "200".to_owned()),
                ("REDIS_URL", redis_url()),
            ],
        )
    }
}

/// `moltbot rollout ARGS` against `gateway`; (success, stdout + stderr).
fn cli(gateway: &ServiceProcess, args: &[&str]) -> (bool, String) {
    let out = Command::new(binary("moltbot"))
        .arg("rollout")
        .args(args)
        .env("MOLTBOT_GATEWAY_URL", gateway.http_url())
        .env("MOLTBOT_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A route's rollout as the gateway reports it.
async fn status(gateway: &ServiceProcess, route: &str) -> Value {
    reqwest::Client::new()
        .get(format!("{}/admin/rollouts/{route}", gateway.http_url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// One turn of `session` on `model`; the body, after asserting 200.
async fn turn(gateway: &ServiceProcess, model: &str, session: &str) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({
            "model": model,
            "max_tokens": 8,
            "session_id": session,
            "messages": [{"role": "user", "content": "Hello"}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

fn tried(body: &Value, model: &str) -> bool {
    body["moltbot"]["attempts"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a["model"] == model)
}

/// A canary answering 500 to everything: every client turn is answered
/// (from stable, within the turn), the canary is rolled back once
/// `min-requests` canary turns were seen, both gateways see it, and the
/// metrics say so.
#[tokio::test]
async fn a_failing_canary_is_rolled_back_with_every_turn_answered() {
    let mesh = Mesh::start().await;
    let (a, b) = (mesh.gateway(), mesh.gateway());
    let route = format!("failing-{}", mesh.run);
    let model = format!("m-failing-{}", mesh.run);
    // Plans are checked before anything starts.
    let (ok, out) = cli(&a, &["start", "--route", &route, "--to", "nope/none"]);
    assert!(!ok && out.contains("serves no model"), "{out}");
    let (ok, out) = cli(
        &a,
        &[
            "start",
            "--route",
            &route,
            "--to",
            "broken/gpt-broken",
            "--steps",
            "50,30",
        ],
    );
    assert!(!ok && out.contains("steps"), "{out}");
    let (ok, out) = cli(
        &a,
        &[
            "start",
            "--route",
            &route,
            "--to",
            "broken/gpt-broken",
            "--steps",
            "50,100",
            "--step-interval",
            "10s",
            "--min-requests",
            "10",
        ],
    );
    assert!(ok, "{out}");
    // A second start on the same route is refused through the other gateway.
    let (ok, out) = cli(
        &b,
        &["start", "--route", &route, "--to", "healthy/gpt-healthy"],
    );
    assert!(!ok && out.contains("409"), "{out}");

    let mut canary_turns = 0;
    let mut turns = 0;
    let began = Instant::now();
    loop {
        let gateway = if turns % 2 == 0 { &a } else { &b };
        let body = turn(gateway, &model, &format!("{}-s{turns}", mesh.run)).await;
        turns += 1;
        if tried(&body, "broken/gpt-broken") {
            canary_turns += 1;
            assert_eq!(body["moltbot"]["rollout"]["variant"], "canary", "{body}");
            assert_eq!(answered_by(&body), "stable/gpt-stable", "{body}");
        }
        if turns >= 30 && status(&b, &route).await["phase"] == "rolled_back" {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(90),
            "not rolled back after {turns} turns ({canary_turns} on the canary): {}",
            status(&a, &route).await
        );
    }
    assert!(canary_turns >= 10, "{canary_turns} canary turns of {turns}");
    let report = status(&a, &route).await;
    assert_eq!(report["share"], 0, "{report}");
    assert!(
        report["reason"].as_str().unwrap().contains("error rate"),
        "{report}"
    );
    let (ok, out) = cli(&b, &["status", "--route", &route]);
    assert!(
        ok && out.contains("rolled_back") && out.contains("error rate"),
        "{out}"
    );
    // Rolled back: no new session meets the canary any more.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for i in 0..10 {
        let body = turn(&b, &model, &format!("{}-after{i}", mesh.run)).await;
        assert!(!tried(&body, "broken/gpt-broken"), "{body}");
    }
    for g in [&a, &b] {
        let url = format!("{}/metrics", g.http_url());
        let phase = metrics::sum(
            &url,
            "moltbot_gateway_rollout_phase",
            &[&format!("route=\"{route}\""), "phase=\"rolled_back\""],
        )
        .await;
        assert_eq!(phase, 1.0);
    }
    // Each gateway counts the turns it served; together, every canary turn.
    let mut counted = 0.0;
    for g in [&a, &b] {
        counted += metrics::sum(
            &format!("{}/metrics", g.http_url()),
            "moltbot_gateway_rollout_turns_total",
            &[
                &format!("route=\"{route}\""),
                "variant=\"canary\"",
                "outcome=\"error\"",
            ],
        )
        .await;
    }
    assert_eq!(counted, f64::from(canary_turns));
    // Without the admin token the endpoints are closed.
    let anonymous = reqwest::get(format!("{}/admin/rollouts", a.http_url()))
        .await
        .unwrap()
        .status();
    assert_eq!(anonymous, 401);
}

/// A healthy canary on a compressed schedule: the share of new sessions
/// follows the step, a session stays on its variant after the step moves,
/// a gateway restarted mid-rollout resumes it from Redis, and the last
/// clean step promotes the canary.
#[tokio::test]
async fn a_healthy_canary_is_promoted_and_sessions_stay_on_their_variant() {
    let mesh = Mesh::start().await;
    let a = mesh.gateway();
    let route = format!("clean-{}", mesh.run);
    let model = format!("m-clean-{}", mesh.run);
    let (ok, out) = cli(
        &a,
        &[
            "start",
            "--route",
            &route,
            "--to",
            "healthy/gpt-healthy",
            "--steps",
            "30,100",
            "--step-interval",
            "12s",
            "--min-requests",
            "5",
        ],
    );
    assert!(ok, "{out}");
    let id = status(&a, &route).await["id"].clone();
    // Step 1 (30 %): 200 new sessions within the step.
    let mut stable_sessions = Vec::new();
    let mut canary = 0;
    for i in 0..200 {
        let session = format!("{}-first{i}", mesh.run);
        let body = turn(&a, &model, &session).await;
        match body["moltbot"]["rollout"]["variant"].as_str() {
            Some("canary") => {
                canary += 1;
                assert_eq!(answered_by(&body), "healthy/gpt-healthy", "{body}");
            }
            Some("stable") => {
                assert!(!tried(&body, "healthy/gpt-healthy"), "{body}");
                stable_sessions.push(session);
            }
            other => panic!("no variant ({other:?}): {body}"),
        }
    }
    let report = status(&a, &route).await;
    assert_eq!(
        report["step"], 0,
        "the step moved during the measurement: {report}"
    );
    let share = f64::from(canary) / 2.0;
    assert!((20.0..=40.0).contains(&share), "{share} % at a 30 % step");

    // A gateway restarted mid-rollout reads it back from Redis.
    a.kill();
    drop(a);
    let b = mesh.gateway();
    assert_eq!(status(&b, &route).await["id"], id);
    let began = Instant::now();
    while status(&b, &route).await["step"] != 1 {
        assert!(
            began.elapsed() < Duration::from_secs(40),
            "{}",
            status(&b, &route).await
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // At 100 % the sessions that started stable stay stable.
    for session in stable_sessions.iter().take(10) {
        let body = turn(&b, &model, session).await;
        assert_eq!(body["moltbot"]["rollout"]["variant"], "stable", "{body}");
        assert_eq!(answered_by(&body), "stable/gpt-stable");
    }
    // New sessions are all canary, until the clean last step promotes it.
    let mut i = 0;
    while status(&b, &route).await["phase"] != "promoted" {
        let body = turn(&b, &model, &format!("{}-second{i}", mesh.run)).await;
        i += 1;
        assert_eq!(body["moltbot"]["rollout"]["variant"], "canary", "{body}");
        assert!(
            began.elapsed() < Duration::from_secs(60),
            "{}",
            status(&b, &route).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let body = turn(&b, &model, &format!("{}-promoted", mesh.run)).await;
    assert_eq!(answered_by(&body), "healthy/gpt-healthy", "{body}");
    // The key-less engine got no credential, and the session's digest as
    // its affinity header.
    let headers = mesh.engine_headers.lock().unwrap().clone();
    assert!(headers.get("authorization").is_none(), "{headers:?}");
    let affinity = headers.get("x-session-id").unwrap().to_str().unwrap();
    assert!(
        affinity.starts_with("s-") && !affinity.contains("promoted"),
        "{affinity}"
    );
    assert!(body["moltbot"].get("rollout").is_none(), "{body}");
    let (ok, out) = cli(&b, &["status", "--route", &route]);
    assert!(ok && out.contains("promoted"), "{out}");
    let events: Vec<String> = status(&b, &route).await["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["started", "advanced", "promoted"]);
}
