//! The chat API end to end on real models: every service as a real process on
//! ephemeral ports (context in memory, the trained intent head, the real
//! Qwen2.5 model), the gateway in front, OTLP spans into an in-process
//! collector. One mesh serves every scenario in turn (loading the models once).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::time::Duration;

use moltbot_e2e::{collector::Collector, grpc, process::ServiceProcess};
use moltbot_proto::context::v1::{GetHistoryRequest, context_service_client::ContextServiceClient};
use serde_json::{Value, json};

/// The test's API key (`test`) and its SHA-256, as the config stores it.
const KEY: &str = "test";
const KEY_SHA256: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

struct Mesh {
    _collector: Collector,
    context: ServiceProcess,
    understanding: Option<ServiceProcess>,
    generation: ServiceProcess,
    retrieval: ServiceProcess,
    auth: ServiceProcess,
    gateway: ServiceProcess,
    config_dir: std::path::PathBuf,
}

async fn start_mesh(collector: Collector) -> Mesh {
    let otel = |name: &str| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", collector.endpoint()),
            ("OTEL_SERVICE_NAME", name.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
        ]
    };
    let mut ctx_env = otel("moltbot-context");
    ctx_env.push(("MOLTBOT_CONTEXT_STORE", "memory".to_owned()));
    let context = ServiceProcess::start("moltbot-context", &ctx_env);
    let understanding =
        ServiceProcess::start("moltbot-understanding", &otel("moltbot-understanding"));
    let generation = ServiceProcess::start("moltbot-generation", &otel("moltbot-generation"));
    let retrieval = ServiceProcess::start("moltbot-retrieval", &otel("moltbot-retrieval"));
    let auth = ServiceProcess::start("moltbot-auth-rotation", &otel("moltbot-auth-rotation"));

    let config_dir = std::env::temp_dir().join(format!("moltbot-chat-{}", std::process::id()));
    std::fs::create_dir_all(&config_dir).unwrap();
    let config = config_dir.join("gateway.yaml");
    std::fs::write(
        &config,
        format!(
            r#"
routes:
  - name: banking
    match: {{ models: [default], domains: [banking] }}
    system_prompt: You are a careful banking assistant. Answer in one sentence.
    candidates: [{{ model: qwen2.5-coder-0.5b-instruct }}]
    retry: {{ max_attempts: 2, initial_backoff_ms: 50 }}
  - name: default
    match: {{ models: [default, qwen2.5-coder-0.5b-instruct] }}
    system_prompt: You are a helpful assistant. Answer briefly.
    retrieval: {{ collection: docs, top_k: 3 }}
    candidates: [{{ model: qwen2.5-coder-0.5b-instruct }}]
    retry: {{ max_attempts: 2, initial_backoff_ms: 50 }}
api_keys:
  - {{ name: test, sha256: "{KEY_SHA256}" }}
  - {{ name: limited, sha256: "{}", requests_per_minute: 2 }}
allow_anonymous: false
"#,
            // sha256("limited")
            "7b508dace774f8adc1b121c1812b740904be6dfd37e3b5e3579bc81fbf6f5553"
        ),
    )
    .unwrap();
    let mut gw_env = otel("moltbot-gateway");
    gw_env.push(("MOLTBOT_CONTEXT_URL", context.grpc_url()));
    gw_env.push(("MOLTBOT_GENERATION_URL", generation.grpc_url()));
    gw_env.push(("MOLTBOT_UNDERSTANDING_URL", understanding.grpc_url()));
    gw_env.push(("MOLTBOT_RETRIEVAL_URL", retrieval.grpc_url()));
    gw_env.push(("MOLTBOT_AUTH_URL", auth.grpc_url()));
    gw_env.push(("MOLTBOT_GATEWAY_CONFIG", config.display().to_string()));
    gw_env.push(("MOLTBOT_MAX_BODY_BYTES", "1048576".to_owned()));
    let gateway = ServiceProcess::start("moltbot-gateway", &gw_env);
    // The models load before the services report SERVING.
    for p in [&context, &understanding, &generation] {
        let channel = grpc::connect(&p.grpc_url()).await;
        grpc::wait_serving(&channel, "", Duration::from_secs(120)).await;
    }
    Mesh {
        _collector: collector,
        context,
        understanding: Some(understanding),
        generation,
        retrieval,
        auth,
        gateway,
        config_dir,
    }
}

struct Api {
    base: String,
    http: reqwest::Client,
}

impl Api {
    async fn post_raw(
        &self,
        body: Vec<u8>,
        key: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = self
            .http
            .post(format!("{}/v1/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(body);
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({"raw": text}));
        (status, headers, value)
    }

    async fn chat(&self, body: Value) -> (u16, Value) {
        let (status, _, v) = self
            .post_raw(serde_json::to_vec(&body).unwrap(), Some(KEY))
            .await;
        (status, v)
    }
}

fn turn(session: &str, text: &str) -> Value {
    json!({
        "model": "default",
        "session_id": session,
        "messages": [{"role": "user", "content": text}],
        "temperature": 0,
        "max_tokens": 24,
    })
}

fn answer(v: &Value) -> String {
    v["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn assert_envelope(status: u16, v: &Value, want_status: u16, want_code: &str) {
    assert_eq!(status, want_status, "{v}");
    assert_eq!(v["error"]["code"], want_code, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{v}"
    );
    assert!(v["error"]["type"].is_string(), "{v}");
}

async fn history_len(mesh: &Mesh, session: &str) -> usize {
    let channel = grpc::connect(&mesh.context.grpc_url()).await;
    match ContextServiceClient::new(channel)
        .get_history(GetHistoryRequest {
            // The API key `test` has no `tenant`: it is its own tenant.
            tenant: "test".to_owned(),
            session_id: session.to_owned(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await
    {
        Ok(r) => r.into_inner().turns.len(),
        Err(s) if s.code() == tonic::Code::NotFound => 0,
        Err(s) => panic!("GetHistory: {s:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn chat_turns_through_the_whole_mesh() {
    let collector = Collector::start().await;
    let mut mesh = start_mesh(collector).await;
    let api = Api {
        base: mesh.gateway.http_url(),
        http: reqwest::Client::new(),
    };

    // --- Memory: the second turn of a session sees the first. -------------
    let (status, first) = api
        .chat(turn("ada-1", "My name is Ada and I live in Lisbon."))
        .await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["object"], "chat.completion");
    assert_eq!(first["moltbot"]["session_id"], "ada-1");
    assert!(
        first["usage"]["prompt_tokens"].as_u64().unwrap() > 10,
        "{first}"
    );
    let (status, second) = api.chat(turn("ada-1", "What is my name?")).await;
    assert_eq!(status, 200, "{second}");
    assert!(answer(&second).contains("Ada"), "{second}");
    assert_eq!(history_len(&mesh, "ada-1").await, 4);
    let (status, stranger) = api.chat(turn("someone-else", "What is my name?")).await;
    assert_eq!(status, 200, "{stranger}");
    assert!(!answer(&stranger).contains("Ada"), "{stranger}");

    // --- Intent: classified, and routed on its domain. ---------------------
    let (status, bank) = api
        .chat(turn("bank-1", "what's my checking account balance"))
        .await;
    assert_eq!(status, 200, "{bank}");
    assert_eq!(bank["moltbot"]["intent"]["domain"], "banking", "{bank}");
    assert_eq!(bank["moltbot"]["intent"]["name"], "balance", "{bank}");
    assert_eq!(bank["moltbot"]["route"], "banking", "{bank}");
    let attempts = bank["moltbot"]["attempts"].as_array().unwrap();
    assert_eq!(attempts.len(), 1, "{bank}");
    assert_eq!(attempts[0]["outcome"], "ok");

    // --- Streaming with the official OpenAI SDK. ----------------------------
    let python = std::env::var("MOLTBOT_PYTHON").unwrap_or_else(|_| ".venv/bin/python".to_owned());
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_stream.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args([&api.base, KEY, "sdk-1"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "SDK stream failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sdk: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(sdk["chunks"].as_u64().unwrap() >= 3, "{sdk}");
    assert!(sdk["text"].as_str().unwrap().contains('1'), "{sdk}");
    assert!(
        sdk["usage"]["completion_tokens"].as_u64().unwrap() >= 3,
        "{sdk}"
    );
    assert!(sdk["finish"].is_string(), "{sdk}");
    assert_eq!(sdk["moltbot"]["session_id"], "sdk-1", "{sdk}");
    // The streamed turn was stored once it completed.
    assert_eq!(history_len(&mesh, "sdk-1").await, 2);

    // --- The rest of the OpenAI surface, through both official SDKs. ------
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("python/openai_api.py");
    let out = tokio::process::Command::new(&python)
        .arg(&script)
        .args([&api.base, KEY])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "Python SDK checks failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let py: Value = serde_json::from_slice(&out.stdout).unwrap();
    let emb = &py["embeddings"];
    assert_eq!(emb["model"], "all-minilm-l6-v2", "{py}");
    assert_eq!(emb["indices"], json!([0, 1, 2]), "{py}");
    assert_eq!(emb["dims"], json!([384, 384, 384]), "{py}");
    for norm in emb["norms"].as_array().unwrap() {
        assert!((norm.as_f64().unwrap() - 1.0).abs() < 1e-3, "{py}");
    }
    // Two phrasings of one question sit closer than an unrelated one.
    assert!(
        emb["similar"].as_f64().unwrap() > emb["unrelated"].as_f64().unwrap() + 0.2,
        "{py}"
    );
    assert!(emb["max_float_vs_base64"].as_f64().unwrap() < 1e-6, "{py}");
    // Alone or in a batch, the same vector (up to the encoder's bf16
    // arithmetic on CPUs that have it: padding changes the sums' order).
    assert!(emb["single_equals_first"].as_f64().unwrap() < 5e-3, "{py}");
    assert!(emb["prompt_tokens"].as_u64().unwrap() >= 3 * 8, "{py}");
    assert_eq!(emb["prompt_tokens"], emb["total_tokens"], "{py}");
    for (field, name) in [
        ("n2", "n:"),
        ("logit_bias", "logit_bias"),
        ("bad_schema", "uniqueItems"),
        ("dimensions", "dimensions"),
    ] {
        assert_eq!(py[field]["status"], 400, "{py}");
        assert!(
            py[field]["message"].as_str().unwrap().contains(name),
            "{py}"
        );
    }
    // Structured outputs: valid against the schema (checked with the
    // `jsonschema` package), a JSON object, the SDK's Pydantic parse, and
    // LangChain's with_structured_output.
    assert!(py["json_schema"]["error"].is_null(), "{py}");
    assert_eq!(py["json_schema"]["finish"], "stop", "{py}");
    assert!(
        py["json_schema"]["content"]
            .as_str()
            .unwrap()
            .contains("Lisbo"), // Lisbon or Lisboa
        "{py}"
    );
    assert_eq!(py["json_object"], true, "{py}");
    assert!(
        py["sdk_parse"]["name"].as_str().unwrap().contains("Grace"),
        "{py}"
    );
    assert_eq!(py["sdk_parse"]["age"], 85, "{py}");
    assert!(
        py["langchain"]["name"].as_str().unwrap().contains("Turing"),
        "{py}"
    );
    assert_eq!(py["langchain"]["age"], 41, "{py}");
    // Tool calling: a required call is well formed, its result comes back
    // into an answer, and a streamed call arrives as tool_calls deltas.
    let required = &py["tool_required"];
    assert_eq!(required["finish"], "tool_calls", "{py}");
    assert!(required["content"].is_null(), "{py}");
    let call = &required["calls"][0];
    assert_eq!(call["type"], "function", "{py}");
    assert_eq!(call["name"], "get_weather", "{py}");
    assert!(call["id"].as_str().unwrap().starts_with("call_"), "{py}");
    assert!(
        call["arguments"]["city"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{py}"
    );
    assert_eq!(py["tool_round_trip"]["finish"], "stop", "{py}");
    assert!(
        py["tool_round_trip"]["content"]
            .as_str()
            .unwrap()
            .contains("18"),
        "{py}"
    );
    assert_eq!(py["tool_stream"]["finish"], "tool_calls", "{py}");
    assert_eq!(py["tool_stream"]["deltas"][0]["index"], 0, "{py}");
    assert_eq!(
        py["tool_stream"]["deltas"][0]["name"], "get_weather",
        "{py}"
    );
    let streamed: Value = serde_json::from_str(
        py["tool_stream"]["deltas"][0]["arguments"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert!(streamed["city"].as_str().unwrap().contains("Paris"), "{py}");
    assert_eq!(py["langchain_tools"][0]["name"], "get_weather", "{py}");
    assert!(
        py["langchain_tools"][0]["args"]["city"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{py}"
    );
    // Responses: three turns chained by previous_response_id remember the
    // conversation; a streamed turn sends the documented events; a
    // store=False response cannot be continued.
    let responses = &py["responses"];
    assert_eq!(
        responses["status"],
        json!(["completed", "completed", "completed"]),
        "{py}"
    );
    assert!(
        responses["texts"][1].as_str().unwrap().contains("Lisbo"), // Lisbon or Lisboa
        "{py}"
    );
    assert!(
        responses["texts"][2].as_str().unwrap().contains("Ada"),
        "{py}"
    );
    assert!(responses["usage"].as_u64().unwrap() >= 1, "{py}");
    let events: Vec<&str> = responses["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap())
        .collect();
    assert_eq!(
        events[..2],
        ["response.created", "response.in_progress"],
        "{py}"
    );
    for kind in [
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.output_item.done",
    ] {
        assert!(events.contains(&kind), "{kind}: {py}");
    }
    assert_eq!(events.last(), Some(&"response.completed"), "{py}");
    assert!(!responses["streamed"].as_str().unwrap().is_empty(), "{py}");
    assert_eq!(responses["streamed"], responses["final_text"], "{py}");
    assert_eq!(responses["unstored_continued"], 404, "{py}");
    // Log probabilities of the local model: one entry per token, spelling
    // the answer; greedy picks each step's most likely token.
    let lp = &py["logprobs"];
    assert_eq!(lp["joined"], lp["text"], "{py}");
    assert!(lp["count"].as_u64().unwrap() >= 5, "{py}");
    assert!(lp["max_logprob"].as_f64().unwrap() <= 0.0, "{py}");
    assert!(
        lp["tops"].as_array().unwrap().iter().all(|t| t == 2),
        "{py}"
    );
    assert_eq!(lp["greedy_is_top"], true, "{py}");
    assert_eq!(py["logprobs_absent"], true, "{py}");
    // Without stream_options.include_usage there is no usage chunk.
    assert_eq!(py["stream_without_usage"]["usage_chunks"], 0, "{py}");
    assert!(py["stream_without_usage"]["finish"].is_string(), "{py}");
    assert_eq!(py["metadata"], json!({"ticket": "T-1"}), "{py}");

    let node_path = std::env::var("MOLTBOT_NODE_PATH").unwrap_or_else(|_| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../.tools/node_modules")
            .display()
            .to_string()
    });
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("node/openai_api.cjs");
    let out = tokio::process::Command::new("node")
        .arg(&script)
        .args([&api.base, KEY])
        .env("NODE_PATH", &node_path)
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "Node SDK checks failed (NODE_PATH={node_path}; `make node-sdk` installs the SDK): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let js: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(js["embeddings"]["dims"], json!([384, 384]), "{js}");
    for norm in js["embeddings"]["norms"].as_array().unwrap() {
        assert!((norm.as_f64().unwrap() - 1.0).abs() < 1e-3, "{js}");
    }
    assert!(
        !js["completion"]["text"].as_str().unwrap().is_empty(),
        "{js}"
    );
    assert!(
        js["completion"]["completion_tokens"].as_u64().unwrap() >= 1,
        "{js}"
    );
    assert!(js["stream"]["text"].as_str().unwrap().contains('1'), "{js}");
    assert!(
        js["stream"]["usage"]["completion_tokens"].as_u64().unwrap() >= 3,
        "{js}"
    );
    assert_eq!(js["n2"]["status"], 400, "{js}");
    assert!(
        js["json_schema"]["city"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{js}"
    );
    assert!(js["json_schema"]["country"].is_string(), "{js}");
    assert_eq!(js["tool_call"]["finish"], "tool_calls", "{js}");
    assert_eq!(js["tool_call"]["name"], "get_weather", "{js}");
    assert!(
        js["tool_call"]["arguments"]["city"]
            .as_str()
            .unwrap()
            .contains("Paris"),
        "{js}"
    );
    assert!(js["tool_answer"].as_str().unwrap().contains("18"), "{js}");
    assert!(
        js["responses"][1].as_str().unwrap().contains("Grace"),
        "{js}"
    );

    // A tool round trip within a session: the call is stored with the
    // answer that made it, the client then sends only the tool's result,
    // and the session holds question, call, result and final answer.
    let tools = json!([{"type": "function", "function": {"name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
    let (status, called) = api
        .chat(json!({"model": "default", "session_id": "tools-1", "temperature": 0, "max_tokens": 64,
            "tools": tools, "tool_choice": "required",
            "messages": [{"role": "user", "content": "What's the weather like in Paris right now?"}]}))
        .await;
    assert_eq!(status, 200, "{called}");
    let call_id = called["choices"][0]["message"]["tool_calls"][0]["id"].clone();
    assert!(call_id.is_string(), "{called}");
    let (status, answered) = api
        .chat(json!({"model": "default", "session_id": "tools-1", "temperature": 0, "max_tokens": 48,
            "tools": tools,
            "messages": [{"role": "tool", "tool_call_id": call_id, "content": "{\"temperature_c\": 18}"}]}))
        .await;
    assert_eq!(status, 200, "{answered}");
    assert_eq!(
        answered["choices"][0]["finish_reason"], "stop",
        "{answered}"
    );
    let channel = grpc::connect(&mesh.context.grpc_url()).await;
    let turns = ContextServiceClient::new(channel)
        .get_history(GetHistoryRequest {
            tenant: "test".to_owned(),
            session_id: "tools-1".to_owned(),
            max_turns: 0,
            max_tokens: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .turns;
    let roles: Vec<i32> = turns.iter().map(|t| t.role).collect();
    assert_eq!(roles, vec![2, 3, 4, 3], "{turns:?} {answered}");
    assert!(turns[1].content.contains("<tool_call>"), "{turns:?}");
    assert!(turns[2].content.contains("18"), "{turns:?}");

    // Embeddings' own errors, in OpenAI's envelope.
    let embed = |body: Value| {
        let http = api.http.clone();
        let url = format!("{}/v1/embeddings", api.base);
        async move {
            let r = http
                .post(url)
                .bearer_auth(KEY)
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, v) =
        embed(json!({"model": "all-minilm-l6-v2", "input": "word ".repeat(600)})).await;
    assert_envelope(status, &v, 400, "invalid_request");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("input[0] is longer"),
        "{v}"
    );
    let (status, v) = embed(json!({"model": "text-embedding-3-small", "input": "hi"})).await;
    assert_envelope(status, &v, 404, "model_not_found");

    // --- Bad input: envelopes, right codes, no session write. --------------
    let (status, _, v) = api.post_raw(b"{not json".to_vec(), Some(KEY)).await;
    assert_envelope(status, &v, 400, "invalid_json");
    let (status, v) = api
        .chat(json!({"model": "no-such-model", "session_id": "bad-1", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_envelope(status, &v, 404, "model_not_found");
    let big = vec![b'a'; 2 * 1024 * 1024];
    let (status, _, v) = api.post_raw(big, Some(KEY)).await;
    assert_envelope(status, &v, 413, "request_too_large");
    let long = "hello ".repeat(40_000);
    let (status, v) = api
        .chat(json!({"model": "default", "session_id": "bad-1", "messages": [{"role": "user", "content": long}]}))
        .await;
    assert_envelope(status, &v, 422, "context_length_exceeded");
    let (status, _, v) = api
        .post_raw(
            serde_json::to_vec(&turn("bad-1", "hi")).unwrap(),
            Some("wrong-key"),
        )
        .await;
    assert_envelope(status, &v, 401, "invalid_api_key");
    let (status, _, v) = api
        .post_raw(serde_json::to_vec(&turn("bad-1", "hi")).unwrap(), None)
        .await;
    assert_envelope(status, &v, 401, "invalid_api_key");
    assert_eq!(
        history_len(&mesh, "bad-1").await,
        0,
        "a failed turn wrote to its session"
    );

    // --- Rate limit: 2 requests a minute, then 429 with Retry-After. -------
    for _ in 0..2 {
        let (status, _, v) = api.post_raw(b"{}".to_vec(), Some("limited")).await;
        assert_eq!(status, 400, "{v}");
    }
    let (status, headers, v) = api.post_raw(b"{}".to_vec(), Some("limited")).await;
    assert_envelope(status, &v, 429, "rate_limit_exceeded");
    let retry_after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after), "{retry_after}");

    // --- /v1/models lists the alias and the local model. -------------------
    let models: Value = api
        .http
        .get(format!("{}/v1/models", api.base))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids[0], "default", "{models}");
    assert!(ids.contains(&"qwen2.5-coder-0.5b-instruct"), "{models}");
    assert!(ids.contains(&"all-minilm-l6-v2"), "{models}");

    // --- Knowledge: the project's README ingested with the CLI, then asked
    // about; the answer cites passages of the `docs` collection. ---------
    let readme = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../README.md");
    let out = std::process::Command::new(moltbot_e2e::process::binary("moltbot"))
        .args([
            "kb",
            "ingest",
            "--collection",
            "docs",
            "--retrieval-url",
            &mesh.retrieval.grpc_url(),
        ])
        .arg(&readme)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kb ingest: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("README.md"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let (status, kb) = api
        .chat(turn("kb-1", "How do I run the MoltBot test suite?"))
        .await;
    assert_eq!(status, 200, "{kb}");
    let sources = kb["moltbot"]["sources"].as_array().unwrap();
    assert!(!sources.is_empty(), "{kb}");
    for s in sources {
        assert!(
            s["id"].as_str().unwrap().starts_with("docs:README.md#"),
            "{kb}"
        );
        assert!(s["score"].as_f64().unwrap() > 0.0);
    }
    assert!(
        kb["moltbot"]["degraded"].as_array().unwrap().is_empty(),
        "{kb}"
    );

    // --- `moltbot chat`: a terminal session, streamed. ---------------------
    let mut child = std::process::Command::new(moltbot_e2e::process::binary("moltbot"))
        .args([
            "chat",
            "--gateway-url",
            &api.base,
            "--api-key",
            KEY,
            "--session",
            "cli-1",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"My favourite colour is teal.\n/quit\n")
            .unwrap();
    }
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "moltbot chat: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("tokens"), "{printed}");
    assert_eq!(history_len(&mesh, "cli-1").await, 2);

    // --- A client that disconnects mid-stream cancels its generation. ----
    let mut resp = api
        .http
        .post(format!("{}/v1/chat/completions", api.base))
        .bearer_auth(KEY)
        .json(&json!({
            "model": "default",
            "session_id": "gone-1",
            "stream": true,
            "max_tokens": 400,
            "messages": [{"role": "user", "content": "Write a long essay about the sea."}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&first).contains("data:"));
    drop(resp);
    let gen_channel = grpc::connect(&mesh.generation.grpc_url()).await;
    let mut gen_client =
        moltbot_proto::generation::v1::generation_service_client::GenerationServiceClient::new(
            gen_channel,
        );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let models = gen_client
            .list_models(moltbot_proto::generation::v1::ListModelsRequest {})
            .await
            .unwrap()
            .into_inner()
            .models;
        if models.iter().all(|m| m.active_sequences == 0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the dropped stream still generates: {models:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        history_len(&mesh, "gone-1").await,
        0,
        "a cancelled turn wrote to its session"
    );

    // --- One trace per request across every service. ----------------------
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let resp = api
        .http
        .post(format!("{}/v1/chat/completions", api.base))
        .bearer_auth(KEY)
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .json(&turn("trace-1", "Say hi."))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let want_services = [
        "moltbot-gateway",
        "moltbot-context",
        "moltbot-understanding",
        "moltbot-retrieval",
        "moltbot-generation",
    ];
    let trace_bytes: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let spans = mesh
        ._collector
        .wait_for(Duration::from_secs(20), |spans| {
            want_services.iter().all(|svc| {
                spans
                    .iter()
                    .any(|s| &s.service_name == svc && s.trace_id == trace_bytes && s.kind == 2)
            })
        })
        .await;
    for svc in want_services {
        assert!(
            spans
                .iter()
                .any(|s| s.service_name == svc && s.trace_id == trace_bytes && s.kind == 2),
            "no server span of {svc} in trace {trace_id}"
        );
    }

    // --- Degradation: understanding stopped, the turn still answers. -------
    mesh.understanding.take().unwrap().stop();
    let (status, v) = api.chat(turn("degraded-1", "Say hello.")).await;
    assert_eq!(status, 200, "{v}");
    let degraded: Vec<&str> = v["moltbot"]["degraded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d.as_str().unwrap())
        .collect();
    assert!(degraded.contains(&"understanding"), "{v}");
    assert!(v["moltbot"]["intent"].is_null(), "{v}");
    assert!(!answer(&v).is_empty(), "{v}");

    for p in [
        mesh.gateway,
        mesh.generation,
        mesh.retrieval,
        mesh.auth,
        mesh.context,
    ] {
        p.stop();
    }
    let _ = std::fs::remove_dir_all(&mesh.config_dir);
}
