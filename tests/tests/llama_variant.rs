//! A real OpenAI-compatible engine as a rollout variant (issue 34, item 4):
//! llama.cpp's server (`llama-cpp-python[server]`, which `make test`
//! installs into its own virtualenv) serving the project's GGUF, registered
//! with auth-rotation as a key-less provider the way an in-cluster vLLM or
//! llama.cpp deployment is, receives the canary share of a route's new
//! sessions through generation's relay, and keeps each of its sessions.
//! The stable side is a fake third-party provider.
//!
//! Needs `MOLTBOT_LLAMA_PYTHON` (the virtualenv's python; `make test` sets
//! it) and the GGUF in `MOLTBOT_MODELS_DIR` (`make models`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    process::{Child, Command, Stdio},
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant},
};

use moltbot_e2e::{
    answered_by, fake, grpc,
    process::{ServiceProcess, binary},
    providers,
    stores::{free_port, unique},
};
use serde_json::{Value, json};

const ADMIN: &str = "llama-admin";
const KEY: &str = "sk-fake";
const CANARY: &str = "llamacpp/qwen-gguf";

/// `python -m llama_cpp.server` on the GGUF, killed on drop.
struct LlamaServer {
    child: Child,
    port: u16,
}

impl LlamaServer {
    fn start() -> Self {
        let python = std::env::var("MOLTBOT_LLAMA_PYTHON").unwrap_or_else(|_| {
            panic!("MOLTBOT_LLAMA_PYTHON is unset: `make test` installs llama-cpp-python[server] and sets it")
        });
        let models = std::env::var("MOLTBOT_MODELS_DIR").unwrap_or_else(|_| "var/models".into());
        let gguf = std::path::Path::new(&models).join("qwen2.5-coder-0.5b-instruct.gguf");
        assert!(
            gguf.exists(),
            "{} is missing: run `make models`",
            gguf.display()
        );
        let port = free_port();
        // scripts/llama_server.py is `python -m llama_cpp.server` with the
        // weights loaded without llama.cpp's AMX and repacked layouts, which
        // crash its batched decode on this machine kind (the script says why).
        let script =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/llama_server.py");
        let child = Command::new(python)
            .arg(script)
            .arg("--model")
            .arg(&gguf)
            .args(["--model_alias", "qwen-gguf", "--host", "127.0.0.1"])
            .args(["--port", &port.to_string()])
            .args(["--n_ctx", "2048", "--n_threads", "1", "--verbose", "false"])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("llama_cpp.server");
        Self { child, port }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/v1", self.port)
    }

    async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(r) = reqwest::get(format!("{}/models", self.url())).await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "llama.cpp's server never answered"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One turn of `session`; the body, after asserting 200.
async fn turn(gateway: &ServiceProcess, model: &str, session: &str, text: &str) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .json(&json!({
            "model": model,
            "max_tokens": 8,
            "temperature": 0,
            "session_id": session,
            "messages": [{"role": "user", "content": text}],
        }))
        .send()
        .await
        .unwrap();
    let status = response.status();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test(flavor = "multi_thread")]
async fn llama_cpp_server_takes_the_canary_share_of_new_sessions() {
    let llama = LlamaServer::start();
    let auth = ServiceProcess::start(
        "moltbot-auth-rotation",
        &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
    );
    let stable = fake::Provider {
        key: Some(KEY),
        calls: Arc::new(AtomicU32::new(0)),
        ..Default::default()
    }
    .start()
    .await;
    providers::register_openai(
        &auth.grpc_url(),
        ADMIN,
        "stable",
        stable,
        &["gpt-stable"],
        KEY,
    )
    .await;
    llama.wait_ready().await;
    providers::register_openai_without_key(
        &auth.grpc_url(),
        ADMIN,
        "llamacpp",
        llama.url(),
        &["qwen-gguf"],
    )
    .await;
    let context = ServiceProcess::start("moltbot-context", &[]);
    let generation = ServiceProcess::start(
        "moltbot-generation",
        &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
    );
    grpc::wait_serving(
        &grpc::connect(&generation.grpc_url()).await,
        "",
        Duration::from_secs(120),
    )
    .await;
    let run = unique("llama");
    let (route, model) = (format!("r-{run}"), format!("m-{run}"));
    let config = std::env::temp_dir().join(format!("moltbot-{run}.yaml"));
    std::fs::write(
        &config,
        format!(
            "routes:\n  - name: {route}\n    match: {{ models: [{model}] }}\n    understanding: false\n    candidates: [{{ model: stable/gpt-stable }}]\n"
        ),
    )
    .unwrap();
    let gateway = ServiceProcess::gateway_without_enrichments(
        &context,
        &generation,
        &auth,
        &[
            ("MOLTBOT_GATEWAY_CONFIG", config.display().to_string()),
            ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
        ],
    );
    // Half of the new sessions, held at the first step.
    let out = Command::new(binary("moltbot"))
        .args(["rollout", "start", "--route", &route, "--to", CANARY])
        .args([
            "--steps",
            "50,100",
            "--step-interval",
            "1h",
            "--min-requests",
            "1000",
        ])
        .env("MOLTBOT_GATEWAY_URL", gateway.http_url())
        .env("MOLTBOT_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let mut canary_sessions = Vec::new();
    for i in 0..40 {
        let session = format!("{run}-{i}");
        let body = turn(&gateway, &model, &session, "Say hi.").await;
        match body["moltbot"]["rollout"]["variant"].as_str() {
            Some("canary") => {
                assert_eq!(answered_by(&body), CANARY, "{body}");
                let text = body["choices"][0]["message"]["content"].as_str().unwrap();
                assert!(
                    !text.trim().is_empty(),
                    "llama.cpp answered nothing: {body}"
                );
                canary_sessions.push(session);
            }
            Some("stable") => assert_eq!(answered_by(&body), "stable/gpt-stable", "{body}"),
            other => panic!("no variant ({other:?}): {body}"),
        }
    }
    // Binomial(40, ½) falls outside [10, 30] about twice in a thousand.
    let canary = canary_sessions.len();
    assert!((10..=30).contains(&canary), "{canary} of 40 at a 50 % step");
    // A canary session's next turn stays on llama.cpp, with its history.
    for session in canary_sessions.iter().take(3) {
        let body = turn(&gateway, &model, session, "And again?").await;
        assert_eq!(body["moltbot"]["rollout"]["variant"], "canary", "{body}");
        assert_eq!(answered_by(&body), CANARY, "{body}");
    }
    let report: Value = reqwest::Client::new()
        .get(format!("{}/admin/rollouts/{route}", gateway.http_url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["canary"]["turns"], canary + 3, "{report}");
    assert_eq!(report["canary"]["failed"], 0, "{report}");
    assert_eq!(report["phase"], "running", "{report}");
    gateway.assert_no_panic();
}
