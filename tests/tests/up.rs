//! `moltbot up` as a user runs it (default ports, real models): chat is
//! served without an intent head (degraded), a head that appears later is
//! served without a restart, and a service killed with SIGKILL is restarted
//! by the supervisor so turns answer again within 10 s. The mesh runs with
//! mutual TLS: anonymous callers of `AcquireCredential` and `ListSessions`
//! are refused, plaintext or not, while chat works; the operator
//! certificate `moltbot up` wrote is admitted.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use moltbot_e2e::process::binary;
use nix::{sys::signal::Signal, unistd::Pid};
use serde_json::{Value, json};

const GATEWAY: &str = "http://127.0.0.1:8080";

async fn turn(client: &reqwest::Client, session: &str) -> Result<Value, String> {
    let response = client
        .post(format!("{GATEWAY}/v1/chat/completions"))
        .timeout(Duration::from_secs(60))
        .json(&json!({
            "model": "default",
            "session_id": session,
            "messages": [{"role": "user", "content": "what is my checking account balance"}],
            "max_tokens": 4,
        }))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if status.is_success() {
        Ok(body)
    } else {
        Err(format!("{status}: {body}"))
    }
}

/// A greedy question in session `session`: (`x-moltbot-cache`, answer
/// text, seconds taken).
async fn greedy(client: &reqwest::Client, session: &str) -> (String, String, f64) {
    let began = Instant::now();
    let response = client
        .post(format!("{GATEWAY}/v1/chat/completions"))
        .timeout(Duration::from_secs(120))
        .json(&json!({
            "model": "default",
            "session_id": session,
            "temperature": 0,
            "messages": [{"role": "user", "content": "What is MoltBot?"}],
            "max_tokens": 24,
        }))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let cache = response.headers()["x-moltbot-cache"]
        .to_str()
        .unwrap()
        .to_owned();
    let body: Value = response.json().await.unwrap();
    let text = body["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (cache, text, began.elapsed().as_secs_f64())
}

fn degraded(v: &Value) -> Vec<String> {
    v["moltbot"]["degraded"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|d| d.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

async fn readyz(client: &reqwest::Client) -> u16 {
    client
        .get(format!("{GATEWAY}/readyz"))
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .map(|r| r.status().as_u16())
        .unwrap_or(0)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// Anonymous callers, plaintext and TLS, are refused `AcquireCredential`
/// and `ListSessions`; the operator certificate lists sessions.
async fn probe_refusals(pki: &std::path::Path) {
    use moltbot_proto::{
        auth::v1::{
            AcquireCredentialRequest, auth_rotation_service_client::AuthRotationServiceClient,
        },
        context::v1::{ListSessionsRequest, context_service_client::ContextServiceClient},
    };
    use tonic::transport::Channel;
    let acquire = || AcquireCredentialRequest {
        provider: "plainfake".into(),
        model: "m1".into(),
    };
    let list = || ListSessionsRequest {
        tenant: "local".into(),
        ..Default::default()
    };
    // Plaintext: the listeners speak TLS only.
    for port in [50055, 50054] {
        let plain = Channel::from_shared(format!("http://127.0.0.1:{port}"))
            .unwrap()
            .connect()
            .await;
        if let Ok(channel) = plain {
            let refused = if port == 50055 {
                AuthRotationServiceClient::new(channel)
                    .acquire_credential(acquire())
                    .await
                    .is_err()
            } else {
                ContextServiceClient::new(channel)
                    .list_sessions(list())
                    .await
                    .is_err()
            };
            assert!(refused, "a plaintext call on {port} was served");
        }
    }
    let channel = |port: u16, operator: bool| {
        moltbot_e2e::grpc::pki_endpoint(
            &format!("https://127.0.0.1:{port}"),
            pki,
            operator.then_some("operator"),
        )
        .connect_lazy()
    };
    let err = AuthRotationServiceClient::new(channel(50055, false))
        .acquire_credential(acquire())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    assert!(err.message().contains("generation"), "{err:?}");
    let err = ContextServiceClient::new(channel(50054, false))
        .list_sessions(list())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err:?}");
    // Not even the operator gets provider keys in clear.
    let err = AuthRotationServiceClient::new(channel(50055, true))
        .acquire_credential(acquire())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    let sessions = ContextServiceClient::new(channel(50054, true))
        .list_sessions(list())
        .await
        .unwrap()
        .into_inner();
    assert!(
        sessions.sessions.iter().any(|s| s.session_id == "up-1"),
        "{sessions:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn up_serves_without_a_head_picks_one_up_and_restarts_a_killed_service() {
    let trained = std::path::PathBuf::from(
        std::env::var("MOLTBOT_INTENT_HEAD_DIR")
            .expect("MOLTBOT_INTENT_HEAD_DIR names the trained head (`make test` sets it)"),
    );
    let work = std::env::temp_dir().join(format!("moltbot-up-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let head = work.join("intent-head");
    // The embedded default's route, in a file step 1d rewrites (reloaded in
    // place).
    std::fs::create_dir_all(&work).unwrap();
    let gateway_config = work.join("gateway.yaml");
    let default_route = "routes:\n  - name: default\n    match: { models: [default, qwen2.5-coder-0.5b-instruct] }\n    retrieval: { collection: docs, top_k: 3, min_score: 0.3 }\n    candidates: [{ model: qwen2.5-coder-0.5b-instruct }]\n";
    std::fs::write(&gateway_config, default_route).unwrap();
    let mut child = Command::new(binary("moltbot"))
        .arg("up")
        .env("MOLTBOT_GATEWAY_CONFIG", &gateway_config)
        .env("MOLTBOT_DATA_DIR", work.join("data"))
        .env("MOLTBOT_LOG_DIR", work.join("log"))
        .env("MOLTBOT_INTENT_HEAD_DIR", &head)
        .env("MOLTBOT_UP_TRAIN_INTENT_HEAD", "false")
        .env("MOLTBOT_DOCS", "Cargo.toml")
        .env("MOLTBOT_UP_TIMEOUT_S", "300")
        .env_remove("MOLTBOT_MASTER_KEY")
        .env_remove("MOLTBOT_ADMIN_TOKEN")
        .env_remove("DATABASE_URL")
        .env_remove("REDIS_URL")
        .env_remove("LD_LIBRARY_PATH")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let output = Arc::new(Mutex::new(Vec::<String>::new()));
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let output = output.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[up] {line}");
                output.lock().unwrap().push(line);
            }
        });
    }
    let client = reqwest::Client::new();
    let log = || output.lock().unwrap().join("\n");

    // 1. Ready without a head: turns answer, degraded by understanding.
    let deadline = Instant::now() + Duration::from_secs(300);
    while readyz(&client).await != 200 {
        assert!(Instant::now() < deadline, "never ready:\n{}", log());
        assert!(child.try_wait().unwrap().is_none(), "up exited:\n{}", log());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let first = turn(&client, "up-1").await.unwrap();
    assert!(
        degraded(&first).contains(&"understanding".to_owned()),
        "{first}"
    );

    // 1a. The response cache: the same greedy question in two new sessions
    // is generated once, then answered from the cache; a purge through
    // `moltbot cache purge` (the dev-mode admin token) empties it.
    let (cache, generated, took) = greedy(&client, "up-cache-1").await;
    assert_eq!(cache, "miss");
    let (cache, replayed, hit_took) = greedy(&client, "up-cache-2").await;
    assert_eq!(cache, "hit");
    assert_eq!(replayed, generated);
    eprintln!("cache: generated in {took:.3} s, answered from the cache in {hit_took:.3} s");

    // 1b. Zero trust: the provider key and the session list are not handed
    // to a caller who has not proved who it is.
    let pki = work.join("data/pki");
    probe_refusals(&pki).await;

    let cli = |args: &[&str]| {
        let out = Command::new(binary("moltbot"))
            .args(args)
            .env("MOLTBOT_LOG_DIR", work.join("log"))
            .env("MOLTBOT_DATA_DIR", work.join("data"))
            .output()
            .unwrap();
        assert!(out.status.success(), "moltbot {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };

    // 1c. A rollout to a provider that refuses every connection (issue 34's
    // acceptance): every turn is answered, the canary is tried in at
    // least `min-requests` of them, and it is rolled back with its reason.
    let added = Command::new(binary("moltbot"))
        .args([
            "keys",
            "add",
            "--provider",
            "down",
            "--base-url",
            "http://127.0.0.1:9/v1",
            "--models",
            "gpt-down",
        ])
        .env("MOLTBOT_DATA_DIR", work.join("data"))
        .env("MOLTBOT_PRIMARY_KEY", "sk-unused")
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    cli(&[
        "rollout",
        "start",
        "--route",
        "default",
        "--to",
        "down/gpt-down",
        "--steps",
        "50,100",
        "--step-interval",
        "10s",
        "--min-requests",
        "10",
    ]);
    let began = Instant::now();
    let (mut turns, mut on_canary) = (0, 0);
    loop {
        let v = turn(&client, &format!("up-rollout-{turns}")).await.unwrap();
        turns += 1;
        let attempts = v["moltbot"]["attempts"].as_array().unwrap();
        if attempts.iter().any(|a| a["model"] == "down/gpt-down") {
            on_canary += 1;
        }
        if turns >= 30 && cli(&["rollout", "status", "--route", "default"]).contains("rolled_back")
        {
            break;
        }
        assert!(
            began.elapsed() < Duration::from_secs(180),
            "not rolled back after {turns} turns ({on_canary} on the canary):\n{}",
            cli(&["rollout", "status"])
        );
    }
    let status = cli(&["rollout", "status", "--route", "default"]);
    eprintln!("{status}");
    assert!(
        on_canary >= 10,
        "{on_canary} of {turns} turns tried the canary"
    );
    assert!(status.contains("error rate"), "{status}");
    eprintln!(
        "rollout: {turns} turns answered, {on_canary} tried the canary, rolled back after {:.1} s",
        began.elapsed().as_secs_f64()
    );

    // 1d. A daily budget worth five worst-case reservations of a priced
    // remote model (issue 35's acceptance): turns are admitted while the
    // spend plus the next reservation fits, the first that does not is
    // refused 429 naming the budget, and `moltbot spend --by key` shows
    // the spend within the budget and every turn charged.
    let priced = moltbot_e2e::fake::Provider {
        key: Some("sk-priced"),
        ..Default::default()
    }
    .start()
    .await;
    let added = Command::new(binary("moltbot"))
        .args(["keys", "add", "--provider", "priced", "--base-url", &priced])
        .args(["--models", "gpt-priced"])
        .env("MOLTBOT_DATA_DIR", work.join("data"))
        .env("MOLTBOT_PRIMARY_KEY", "sk-priced")
        .output()
        .unwrap();
    assert!(added.status.success(), "{added:?}");
    let spend_config = |max_usd: f64| {
        format!(
            "{default_route}  - name: priced\n    match: {{ models: [priced] }}\n    understanding: false\n    candidates: [{{ model: priced/gpt-priced }}]\n    cache: {{ enabled: false }}\n\
             api_keys:\n  - {{ name: budgeted, sha256: \"{}\" }}\n\
             spend:\n  prices:\n    # a made-up list price, USD per million tokens\n    priced/gpt-priced: {{ input: 1000, output: 1000 }}\n  budgets:\n    - {{ key: budgeted, max_usd: {max_usd}, window: daily }}\n",
            moltbot_e2e::sha256_hex("sk-budgeted")
        )
    };
    let priced_turn = || async {
        let r = client
            .post(format!("{GATEWAY}/v1/chat/completions"))
            .bearer_auth("sk-budgeted")
            .json(&json!({"model": "priced", "max_tokens": 100,
                "messages": [{"role": "user", "content": "What does it cost?"}]}))
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap())
    };
    let rewrite = |text: String| {
        let tmp = work.join("gateway.yaml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &gateway_config).unwrap();
    };
    // A budget too small for anything: the refusal says what a turn
    // reserves (its counted prompt and 100 tokens, at $0.001 a token).
    rewrite(spend_config(0.000001));
    let deadline = Instant::now() + Duration::from_secs(20);
    let worst = loop {
        let (status, body) = priced_turn().await;
        if status == 429 {
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.contains("key:budgeted"), "{message}");
            let after = message.split("may cost up to $").nth(1).unwrap();
            break after.split(';').next().unwrap().parse::<f64>().unwrap();
        }
        // 401 until the reload adds the key.
        assert!(Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    let max_usd = 5.0 * worst;
    rewrite(spend_config(max_usd));
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut charged = 0;
    let refusal = loop {
        let (status, body) = priced_turn().await;
        match status {
            200 => charged += 1,
            429 if body["error"]["code"] == "budget_exceeded"
                && body["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("${max_usd}")) =>
            {
                break body;
            }
            // The tiny budget, until the reload applies the new one.
            429 if charged == 0 && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            _ => panic!("{status} {body}"),
        }
    };
    // Each turn cost 12 + 3 tokens: the refused one would have pushed the
    // spend plus its reservation past the budget, the last admitted one
    // did not.
    let spent = f64::from(charged) * 15.0 * 0.001;
    assert!(charged >= 5, "{charged} turns");
    assert!(
        spent + worst > max_usd + 1e-9,
        "{spent} + {worst} fits {max_usd}: {refusal}"
    );
    assert!(spent - 0.015 + worst <= max_usd + 1e-9);
    let table = cli(&["spend", "--by", "key"]);
    eprintln!("{table}");
    let line = table.lines().find(|l| l.starts_with("budgeted")).unwrap();
    let cols: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(cols[1], charged.to_string(), "{line}");
    let cost: f64 = cols[5].parse().unwrap();
    assert!(cost <= max_usd && (cost - spent).abs() < 1e-6, "{line}");
    eprintln!("spend: {charged} turns charged ${cost:.6} of a ${max_usd:.6} budget, then 429");

    // 2. A head written into place is served without a restart.
    copy_dir(&trained, &work.join("head.tmp"));
    std::fs::rename(work.join("head.tmp"), &head).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = turn(&client, "up-2").await.unwrap();
        if !degraded(&v).contains(&"understanding".to_owned()) {
            assert_eq!(v["moltbot"]["intent"]["name"], "balance", "{v}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "head never served: {v}\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(log().contains("[intents] served"), "{}", log());

    // 3. SIGKILL the context service: /readyz fails, then the supervisor
    // restarts it and turns answer again within 10 s.
    // The services' JSON logs go to their files, not to the terminal, and
    // `moltbot status` / `moltbot logs` read them and the run state.
    assert!(
        !log().lines().any(|l| l.trim_start().starts_with('{')),
        "a JSON log line reached the terminal:\n{}",
        log()
    );
    let purged = cli(&["cache", "purge"]);
    assert!(purged.starts_with("purged every entry"), "{purged}");
    let (cache, _, _) = greedy(&client, "up-cache-3").await;
    assert_eq!(cache, "miss", "after the purge");
    let status = cli(&["status"]);
    eprintln!("{status}");
    for component in ["gateway", "generation", "context", "understanding"] {
        let row = status
            .lines()
            .find(|l| l.starts_with(component))
            .unwrap_or_else(|| panic!("no {component} row:\n{status}"));
        assert!(
            row.contains("SERVING") && row.contains(env!("CARGO_PKG_VERSION")),
            "{row}"
        );
    }
    assert!(status.contains("qwen2.5-coder-0.5b-instruct"), "{status}");
    let context_log = cli(&["logs", "context", "-n", "3"]);
    assert!(
        !context_log.is_empty() && context_log.lines().all(|l| !l.starts_with('{')),
        "{context_log}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(work.join("log/up.json")).unwrap()).unwrap();
    let pid = run["components"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "context")
        .and_then(|c| c["pid"].as_i64())
        .unwrap_or_else(|| panic!("no context pid in up.json: {run}")) as i32;
    nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    let mut saw_not_ready = false;
    loop {
        if !saw_not_ready && readyz(&client).await == 503 {
            saw_not_ready = true;
        }
        if saw_not_ready && turn(&client, "up-3").await.is_ok() {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "no answer within 10 s of killing context (saw /readyz 503: {saw_not_ready}):\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "answered again {:.1} s after SIGKILL",
        killed.elapsed().as_secs_f64()
    );
    let text = log();
    assert!(
        text.contains("[context] exited with signal: 9 (SIGKILL)"),
        "{text}"
    );
    assert!(text.contains("restarting in 1 s (restart 1)"), "{text}");

    // 4. SIGTERM stops everything cleanly.
    nix::sys::signal::kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "up did not stop:\n{}", log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "{status}:\n{}", log());
    assert!(!log().contains("panicked at"), "{}", log());
    let _ = std::fs::remove_dir_all(&work);
}
