//! Spend control end to end (gateway/src/spend/): real gateways sharing a
//! real Redis (the budget counters) and writing the ledger to the
//! machine's real PostgreSQL, generation relaying to a fake priced
//! OpenAI-compatible provider (the only fake: a third-party provider)
//! through credentials leased from auth-rotation, and the `moltbot spend`
//! CLI. The rules themselves (worst-case reservation, settlement, windows)
//! are tested in process (gateway/src/spend/).
//!
//! Needs Redis (`REDIS_URL`, default redis://127.0.0.1:6379) and
//! PostgreSQL (`DATABASE_URL`, default the machine's `test` database).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::{
    process::Command,
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant},
};

use moltbot_e2e::{
    fake, grpc, metrics,
    process::{ServiceProcess, binary},
    providers,
    proxy::Proxy,
    sha256_hex,
    stores::{redis_url, unique},
};
use serde_json::{Value, json};

const ADMIN: &str = "spend-admin";
const PROVIDER_KEY: &str = "sk-fake";
/// The fake's model, priced at $1,000 per million tokens ($0.001 a token),
/// so costs print exactly at six decimals.
const MODEL: &str = "priced/gpt-priced";

fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

struct Mesh {
    auth: ServiceProcess,
    context: ServiceProcess,
    generation: ServiceProcess,
    understanding: Option<ServiceProcess>,
    run: String,
    config: std::path::PathBuf,
    /// A PostgreSQL schema of this run's own.
    schema: String,
}

impl Mesh {
    /// auth-rotation with the fake provider registered (each answer after
    /// `latency`), context and generation; with `embeddings`,
    /// understanding for `/v1/embeddings`.
    async fn start(latency: Duration, embeddings: bool) -> Self {
        let auth = ServiceProcess::start(
            "moltbot-auth-rotation",
            &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
        );
        let url = fake::Provider {
            key: Some(PROVIDER_KEY),
            calls: Arc::new(AtomicU32::new(0)),
            latency,
            ..Default::default()
        }
        .start()
        .await;
        providers::register_openai(
            &auth.grpc_url(),
            ADMIN,
            "priced",
            url,
            &["gpt-priced"],
            PROVIDER_KEY,
        )
        .await;
        let context = ServiceProcess::start("moltbot-context", &[]);
        let generation = ServiceProcess::start(
            "moltbot-generation",
            &[("MOLTBOT_AUTH_URL", auth.grpc_url())],
        );
        let channel = grpc::connect(&generation.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(120)).await;
        let understanding = embeddings.then(|| {
            ServiceProcess::start(
                "moltbot-understanding",
                &[("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned())],
            )
        });
        let run = unique("spend");
        let schema = format!("spend_{}", run.replace('-', "_"));
        let config = std::env::temp_dir().join(format!("moltbot-{run}.yaml"));
        Self {
            auth,
            context,
            generation,
            understanding,
            run,
            config,
            schema,
        }
    }

    /// Writes the configuration: route `r-RUN` (model `m-RUN`, the fake,
    /// `max_tokens` 100, cache `cache`), keys `app`, `probe` and `roll`
    /// (`sk-NAME-RUN`), `price` USD per million tokens, and `budgets`
    /// (YAML list items, `{run}` replaced); soft-limit events go to
    /// `webhook`, when given.
    fn write_config(&self, price: f64, cache: bool, budgets: &[&str]) {
        self.write_config_with(price, cache, budgets, None);
    }

    fn write_config_with(&self, price: f64, cache: bool, budgets: &[&str], webhook: Option<&str>) {
        let run = &self.run;
        let keys: String = ["app", "probe", "roll"]
            .iter()
            .map(|k| {
                format!(
                    "  - {{ name: {k}-{run}, tenant: t-{run}, sha256: \"{}\", max_concurrent_requests: 100 }}\n",
                    sha256_hex(&format!("sk-{k}-{run}"))
                )
            })
            .collect();
        let budgets: String = budgets
            .iter()
            .map(|b| format!("    - {}\n", b.replace("{run}", run)))
            .collect();
        let text = format!(
            "routes:\n  - name: r-{run}\n    match: {{ models: [m-{run}] }}\n    understanding: false\n    default_max_tokens: 100\n    cache: {{ enabled: {cache} }}\n    candidates: [{{ model: {MODEL} }}]\n\
             api_keys:\n{keys}allow_anonymous: false\n\
             spend:\n  time_zone: Europe/Berlin\n{}  prices:\n    # a made-up list price, in USD per million tokens\n    {MODEL}: {{ input: {price}, output: {price} }}\n  budgets:\n{}",
            webhook.map_or(String::new(), |url| format!(
                "  soft_limit_webhook: {url}\n"
            )),
            if budgets.is_empty() {
                "    []\n".to_owned()
            } else {
                budgets
            }
        );
        // Written whole and renamed, so a reload never reads half a file.
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// A gateway on this mesh, its budgets in the shared Redis and its
    /// ledger in PostgreSQL at `database` (this run's schema).
    fn gateway(&self, database: &str) -> ServiceProcess {
        let understanding = self
            .understanding
            .as_ref()
            .map_or("http://127.0.0.1:9".to_owned(), ServiceProcess::grpc_url);
        ServiceProcess::start(
            "moltbot-gateway",
            &[
                ("MOLTBOT_CONTEXT_URL", self.context.grpc_url()),
                ("MOLTBOT_GENERATION_URL", self.generation.grpc_url()),
                ("MOLTBOT_AUTH_URL", self.auth.grpc_url()),
                ("MOLTBOT_UNDERSTANDING_URL", understanding),
                ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".to_owned()),
                ("MOLTBOT_GATEWAY_CONFIG", self.config.display().to_string()),
                ("MOLTBOT_CONFIG_POLL_MS", "200".to_owned()),
                ("MOLTBOT_ADMIN_TOKEN", ADMIN.to_owned()),
                ("REDIS_URL", redis_url()),
                ("DATABASE_URL", database.to_owned()),
                ("MOLTBOT_SPEND_PG_SCHEMA", self.schema.clone()),
            ],
        )
    }

    fn key(&self, name: &str) -> String {
        format!("sk-{name}-{}", self.run)
    }
}

/// One chat turn of `key`: (status, body).
async fn chat(gateway: &ServiceProcess, mesh: &Mesh, key: &str, body: Value) -> (u16, Value) {
    let mut body = body;
    body["model"] = json!(format!("m-{}", mesh.run));
    let response = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .bearer_auth(mesh.key(key))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(json!({"raw": text})),
    )
}

fn hello(text: &str) -> Value {
    json!({"messages": [{"role": "user", "content": text}]})
}

/// `GET path` on the gateway's operator endpoints.
async fn admin(gateway: &ServiceProcess, path: &str) -> Value {
    let response = reqwest::Client::new()
        .get(format!("{}{path}", gateway.http_url()))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{path}");
    response.json().await.unwrap()
}

/// The ledger's rows grouped `by`, as (group → row).
async fn report(gateway: &ServiceProcess, by: &str) -> std::collections::HashMap<String, Value> {
    let v = admin(gateway, &format!("/admin/spend?by={by}")).await;
    v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["group"].as_str().unwrap().to_owned(), r.clone()))
        .collect()
}

/// Waits until `/admin/budgets` on `gateway` lists `budget`.
async fn wait_budget(gateway: &ServiceProcess, budget: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let v = admin(gateway, "/admin/budgets").await;
        if v["budgets"]
            .as_array()
            .unwrap()
            .iter()
            .any(|b| b["budget"] == budget)
        {
            return;
        }
        assert!(Instant::now() < deadline, "{budget} never loaded: {v}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The worst case a refusal says the request needed, in USD.
fn needed_usd(error: &Value) -> f64 {
    let message = error["error"]["message"].as_str().unwrap();
    let after = message.split("may cost up to $").nth(1).unwrap();
    after.split(';').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_turns_on_two_gateways_never_overrun_a_budget() {
    // Each answer takes a second: all 50 turns are admitted or refused
    // before any settles.
    let mesh = Mesh::start(Duration::from_secs(1), false).await;
    mesh.write_config(
        1000.0,
        false,
        &["{ key: probe-{run}, max_usd: 0.000001, window: daily }"],
    );
    let a = mesh.gateway(&database_url());
    let b = mesh.gateway(&database_url());

    // The probe's budget is too small for anything: its refusal says what
    // one turn reserves (the counted prompt plus max_tokens 100, at $0.001
    // a token).
    let (status, refusal) = chat(&a, &mesh, "probe", hello("How much?")).await;
    assert_eq!(status, 429, "{refusal}");
    assert_eq!(refusal["error"]["code"], "budget_exceeded");
    let message = refusal["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("key:probe-{}", mesh.run)),
        "{message}"
    );
    assert!(
        message.contains("+01:00"),
        "resets at Berlin midnight: {message}"
    );
    let worst = needed_usd(&refusal);
    assert!(
        worst >= 0.1,
        "100 completion tokens at $0.001 at least: {worst}"
    );

    // Budgets worth five and a half turns for the key, and for its tenant
    // a monthly one it never reaches; applied by a reload, no restart.
    let max_usd = 5.5 * worst;
    // Soft-limit events are posted here.
    let events: Arc<std::sync::Mutex<Vec<Value>>> = Arc::default();
    let hook = {
        let events = events.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
                let events = events.clone();
                async move {
                    events.lock().unwrap().push(v);
                    "ok"
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    };
    mesh.write_config_with(
        1000.0,
        false,
        &[
            &format!("{{ key: app-{{run}}, max_usd: {max_usd}, window: daily, soft_limit: 0.5 }}"),
            "{ tenant: t-{run}, max_usd: 1000, window: monthly }",
            // Worth one turn: after it settles (at $0.015) a second
            // worst case no longer fits.
            &format!(
                "{{ key: roll-{{run}}, max_usd: {}, window: rolling, period: 10s }}",
                worst + 0.01
            ),
        ],
        Some(&hook),
    );
    let budget = format!("key:app-{}", mesh.run);
    wait_budget(&a, &budget).await;
    wait_budget(&b, &budget).await;

    let gateways = [&a, &b];
    let turns = (0..50).map(|i| chat(gateways[i % 2], &mesh, "app", hello("Hello?")));
    let results = futures::future::join_all(turns).await;
    let ok = results.iter().filter(|(s, _)| *s == 200).count();
    let refused: Vec<&Value> = results
        .iter()
        .filter(|(s, _)| *s == 429)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(ok + refused.len(), 50, "only 200 or 429: {results:?}");
    assert_eq!(ok, 5, "five worst cases fit in 5.5, across both gateways");
    for r in &refused {
        assert_eq!(r["error"]["code"], "budget_exceeded", "{r}");
        assert!(r["error"]["message"].as_str().unwrap().contains(&budget));
    }

    // What the ledger holds: five turns of 12 + 3 tokens, within budget
    // (`b` writes its rows within a second).
    let deadline = Instant::now() + Duration::from_secs(10);
    let row = loop {
        let row = report(&a, "key").await[&format!("app-{}", mesh.run)].clone();
        if row["requests"] == 5 || Instant::now() > deadline {
            break row;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(row["requests"], 5, "{row}");
    let spent = row["cost_usd"].as_f64().unwrap();
    assert!((spent - 5.0 * 15.0 * 0.001).abs() < 1e-9, "{spent}");
    assert!(spent <= max_usd);
    // Both gateways crossed nothing but the soft limit once, between them.
    let soft = metrics::sum(
        &format!("{}/metrics", a.http_url()),
        "moltbot_gateway_budget_soft_limit_events_total",
        &[],
    )
    .await
        + metrics::sum(
            &format!("{}/metrics", b.http_url()),
            "moltbot_gateway_budget_soft_limit_events_total",
            &[],
        )
        .await;
    assert_eq!(soft, 1.0, "the soft limit is raised once per window");
    let deadline = Instant::now() + Duration::from_secs(5);
    while events.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "no soft-limit webhook call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let posted = events.lock().unwrap().clone();
    assert_eq!(posted.len(), 1, "{posted:?}");
    assert_eq!(posted[0]["event"], "budget.soft_limit");
    assert_eq!(posted[0]["budget"], budget);
    // Spent and reserved when the limit was crossed: at least half the
    // budget (the soft limit), at most the whole.
    let at = posted[0]["spent_usd"].as_f64().unwrap();
    assert!(at >= 0.5 * max_usd && at <= max_usd, "{at} of {max_usd}");

    // `moltbot spend --by key` shows the same.
    let out = Command::new(binary("moltbot"))
        .args(["spend", "--by", "key", "--since", "1h"])
        .env("MOLTBOT_GATEWAY_URL", a.http_url())
        .env("MOLTBOT_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{table}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("app-{}", mesh.run)))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(line.contains(" 5 ") && line.contains("0.075000"), "{line}");

    // A rolling 10 s budget worth one turn: the second is refused until
    // the first turn's spend leaves the window.
    let (first, _) = chat(&a, &mesh, "roll", hello("One.")).await;
    assert_eq!(first, 200);
    let (second, refusal) = chat(&b, &mesh, "roll", hello("Two.")).await;
    assert_eq!(second, 429, "{refusal}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let (status, body) = chat(&a, &mesh, "roll", hello("Three.")).await;
        if status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the rolling window never moved: {body}"
        );
    }

    // A price change by reload: the next turn costs twice as much.
    mesh.write_config(
        2000.0,
        false,
        &["{ key: app-{run}, max_usd: 100, window: daily }"],
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let v = admin(&a, "/admin/budgets").await;
        if v["budgets"][0]["max_usd"] == 100.0 {
            break;
        }
        assert!(Instant::now() < deadline, "reload never applied: {v}");
    }
    let before = report(&a, "key").await[&format!("app-{}", mesh.run)]["cost_usd"]
        .as_f64()
        .unwrap();
    let (status, _) = chat(&a, &mesh, "app", hello("Dearer?")).await;
    assert_eq!(status, 200);
    let after = report(&a, "key").await[&format!("app-{}", mesh.run)]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!(
        (after - before - 15.0 * 0.002).abs() < 1e-9,
        "{before} → {after}"
    );
    a.assert_no_panic();
    b.assert_no_panic();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_endpoint_is_charged_and_the_ledger_survives_an_outage_and_a_restart() {
    let mesh = Mesh::start(Duration::ZERO, true).await;
    mesh.write_config(
        1000.0,
        true,
        &["{ tenant: t-{run}, max_usd: 1000, window: weekly }"],
    );
    // The ledger reaches PostgreSQL through a relay the test can cut.
    // postgres://USER@HOST:PORT/DB: the relay stands in for HOST:PORT.
    let url = database_url();
    let (scheme_user, rest) = url.split_once('@').unwrap();
    let (address, database) = rest.split_once('/').unwrap();
    let target = if address.contains(':') {
        address.to_owned()
    } else {
        format!("{address}:5432")
    };
    let relay = Proxy::start(
        tokio::net::lookup_host(target)
            .await
            .unwrap()
            .next()
            .unwrap(),
    )
    .await;
    let relayed = format!("{scheme_user}@127.0.0.1:{}/{database}", relay.port);
    let gateway = mesh.gateway(&relayed);

    // Chat (whole and streamed, then the same again from the response
    // cache), Responses and embeddings.
    let greedy = json!({"messages": [{"role": "user", "content": "Cached?"}], "temperature": 0});
    assert_eq!(chat(&gateway, &mesh, "app", greedy.clone()).await.0, 200);
    assert_eq!(chat(&gateway, &mesh, "app", greedy).await.0, 200);
    let streamed = reqwest::Client::new()
        .post(format!("{}/v1/chat/completions", gateway.http_url()))
        .bearer_auth(mesh.key("app"))
        .json(&json!({"model": format!("m-{}", mesh.run), "stream": true,
            "messages": [{"role": "user", "content": "Stream."}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(streamed.status(), 200);
    assert!(streamed.text().await.unwrap().contains("[DONE]"));
    let responses = reqwest::Client::new()
        .post(format!("{}/v1/responses", gateway.http_url()))
        .bearer_auth(mesh.key("app"))
        .json(&json!({"model": format!("m-{}", mesh.run), "input": "Respond."}))
        .send()
        .await
        .unwrap();
    assert_eq!(responses.status(), 200);
    let embeddings = reqwest::Client::new()
        .post(format!("{}/v1/embeddings", gateway.http_url()))
        .bearer_auth(mesh.key("app"))
        .json(&json!({"model": "all-minilm-l6-v2", "input": ["one text", "another"]}))
        .send()
        .await
        .unwrap();
    let status = embeddings.status();
    assert_eq!(status, 200, "{}", embeddings.text().await.unwrap());

    let by_endpoint = report(&gateway, "endpoint").await;
    assert_eq!(
        by_endpoint["chat.completions"]["requests"], 3,
        "{by_endpoint:?}"
    );
    assert_eq!(by_endpoint["responses"]["requests"], 1);
    assert_eq!(by_endpoint["embeddings"]["requests"], 1);
    // The embedding model has no price: reported as unpriced.
    assert_eq!(by_endpoint["embeddings"]["unpriced_requests"], 1);
    // The cache hit is charged at the cache-hit price (0): three chat
    // turns, two of them generated.
    let chat_cost = by_endpoint["chat.completions"]["cost_usd"]
        .as_f64()
        .unwrap();
    assert!((chat_cost - 2.0 * 15.0 * 0.001).abs() < 1e-9, "{chat_cost}");
    let by_model = report(&gateway, "model").await;
    assert_eq!(
        by_model[MODEL]["cached_tokens"], 12,
        "the hit's prompt, cached"
    );

    // PostgreSQL cut: turns still answer, their rows wait in the buffer.
    relay.set_open(false);
    for i in 0..3 {
        let (status, body) = chat(&gateway, &mesh, "app", hello(&format!("Outage {i}"))).await;
        assert_eq!(status, 200, "{body}");
    }
    let buffered = metrics::sum(
        &format!("{}/metrics", gateway.http_url()),
        "moltbot_gateway_spend_ledger_buffered_rows",
        &[],
    )
    .await;
    assert!(buffered <= 3.0, "{buffered}");
    // Every row waits (none in a write that could succeed).
    let deadline = Instant::now() + Duration::from_secs(15);
    while metrics::sum(
        &format!("{}/metrics", gateway.http_url()),
        "moltbot_gateway_spend_ledger_buffered_rows",
        &[],
    )
    .await
        != 3.0
    {
        assert!(
            Instant::now() < deadline,
            "the three rows were not buffered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    relay.set_open(true);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let written = metrics::sum(
            &format!("{}/metrics", gateway.http_url()),
            "moltbot_gateway_spend_ledger_buffered_rows",
            &[],
        )
        .await;
        if written == 0.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rows never written after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        report(&gateway, "endpoint").await["chat.completions"]["requests"],
        6
    );
    let dropped = metrics::sum(
        &format!("{}/metrics", gateway.http_url()),
        "moltbot_gateway_spend_ledger_rows_total",
        &["outcome=\"dropped\""],
    )
    .await;
    assert_eq!(dropped, 0.0);

    // A turn, then a restart at once: its row is written at shutdown and
    // read by the next gateway.
    assert_eq!(chat(&gateway, &mesh, "app", hello("Last.")).await.0, 200);
    let mut gateway = gateway;
    gateway.signal_term();
    assert!(gateway.wait_exit(Duration::from_secs(20)).is_some());
    let next = mesh.gateway(&relayed);
    let by_tenant = report(&next, "tenant").await;
    assert_eq!(
        by_tenant[&format!("t-{}", mesh.run)]["requests"],
        9,
        "{by_tenant:?}"
    );
    next.assert_no_panic();
}
