//! Shared by the generation service's integration tests: where the real
//! model, the project's virtualenv Python and the reference script live, and
//! a greedy decode loop straight on the [`Decoder`] (no scheduler) that the
//! gRPC tests compare against.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::path::{Path, PathBuf};

use moltbot_generation::{model::Decoder, sampling::argmax};

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The Python with torch and transformers (`MOLTBOT_PYTHON`, set by `make`;
/// default `.venv/bin/python`).
pub fn python() -> PathBuf {
    std::env::var_os("MOLTBOT_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".venv/bin/python"))
}

/// The prepared Qwen2.5-Coder-0.5B-Instruct directory (`make models`).
pub fn model_dir() -> PathBuf {
    let dir = std::env::var_os("MOLTBOT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join("var/models"))
        .join(moltbot_generation::DEFAULT_MODEL);
    assert!(
        dir.join(".prepared").exists(),
        "{} is not prepared: run `make models`",
        dir.display()
    );
    dir
}

/// A fresh empty directory under the system temp dir.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "moltbot-gen-{name}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Greedy decoding of `prompt` for up to `n` tokens (stopping after any of
/// `eos`), one sequence, directly on the decoder.
pub fn greedy(decoder: &Decoder, prompt: &[u32], n: usize, eos: &[u32]) -> Vec<u32> {
    let mut cache = decoder.new_cache(prompt.len() + n).unwrap();
    let logits = decoder.prefill(prompt, &mut cache, false).unwrap();
    let mut out = Vec::new();
    let mut next = argmax(&Vec::<f32>::try_from(logits.view([-1])).unwrap());
    loop {
        out.push(next);
        if out.len() == n || eos.contains(&next) {
            return out;
        }
        let logits = decoder.decode(next, &mut cache).unwrap();
        next = argmax(&Vec::<f32>::try_from(logits.view([-1])).unwrap());
    }
}

use std::{sync::OnceLock, time::Duration};

use moltbot_generation::{engine::EngineConfig, service::GenerationApi};
use moltbot_proto::generation::v1::{
    self as pb, generation_service_client::GenerationServiceClient,
    generation_service_server::GenerationServiceServer,
};
use tonic::transport::Channel;

/// A generation server on `127.0.0.1:0` serving the real model, run by a
/// thread of its own for the whole test binary (loading the model once).
pub struct Server {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    /// Server errors or panics surface here.
    pub failed: std::sync::Arc<std::sync::Mutex<Option<String>>>,
}

/// Starts (once per test binary) a server with these scheduler limits.
pub fn server(engine: EngineConfig) -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        let failed = std::sync::Arc::new(std::sync::Mutex::new(None));
        let failed2 = failed.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().unwrap();
            let result = rt.block_on(async move {
                let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(grpc.local_addr().unwrap()).unwrap();
                let api = GenerationApi::new();
                let service = moltbot_runtime::grpc::GrpcService::new(
                    GenerationServiceServer::new(api.clone()),
                );
                let ready = async move {
                    let models = tokio::task::spawn_blocking(move || {
                        let decoder = moltbot_generation::backend::LocalBackend::load(
                            &model_dir(),
                            tch::Device::Cpu,
                            tch::Kind::Float.into(),
                            engine,
                            256,
                        )
                        .map_err(|e| moltbot_runtime::RuntimeError::NotReady(e.to_string()))?;
                        let b: std::sync::Arc<dyn moltbot_generation::backend::Backend> =
                            std::sync::Arc::new(decoder);
                        let mut m = moltbot_generation::service::Models::new();
                        m.insert(b.card().name, b);
                        Ok::<_, moltbot_runtime::RuntimeError>(m)
                    })
                    .await
                    .unwrap()?;
                    api.install(models);
                    Ok(())
                };
                moltbot_runtime::grpc::serve_with_listener(
                    grpc,
                    metrics,
                    service,
                    ready,
                    std::future::pending(),
                    Duration::from_secs(1),
                )
                .await
            });
            *failed2.lock().unwrap() = Some(format!("server ended: {result:?}"));
        });
        Server {
            addr: rx.recv().unwrap(),
            failed,
        }
    })
}

impl Server {
    /// A client, once the model is loaded (polls ListModels for up to 120 s).
    pub async fn client(&self) -> GenerationServiceClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = GenerationServiceClient::new(channel);
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(e) = self.failed.lock().unwrap().as_ref() {
                panic!("{e}");
            }
            match client.list_models(pb::ListModelsRequest {}).await {
                Ok(_) => return client,
                Err(e) if e.code() == tonic::Code::Unavailable => {
                    assert!(std::time::Instant::now() < deadline, "model never loaded");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
    }
}

/// A user message.
pub fn user(text: &str) -> pb::ChatMessage {
    pb::ChatMessage {
        role: pb::Role::User as i32,
        content: text.into(),
        ..Default::default()
    }
}

/// A greedy request for the default model.
pub fn request(messages: Vec<pb::ChatMessage>, max_tokens: u32) -> pb::GenerateRequest {
    pb::GenerateRequest {
        model: moltbot_generation::DEFAULT_MODEL.into(),
        messages,
        sampling: Some(pb::SamplingParams {
            max_tokens,
            ..Default::default()
        }),
        request_id: String::new(),
        session_id: String::new(),
        ..Default::default()
    }
}

/// A whole Generate stream: the deltas' texts and the summary (a stream
/// with function calls panics: [`collect_calls`] reads those).
pub async fn collect(
    client: &mut GenerationServiceClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<(Vec<String>, pb::GenerationSummary), tonic::Status> {
    let (deltas, calls, summary) = collect_calls(client, request).await?;
    assert!(calls.is_empty(), "unexpected calls: {calls:?}");
    Ok((deltas, summary))
}

/// A whole Generate stream: the deltas' texts, the function calls and the
/// summary.
pub async fn collect_calls(
    client: &mut GenerationServiceClient<Channel>,
    request: pb::GenerateRequest,
) -> Result<(Vec<String>, Vec<pb::ToolCall>, pb::GenerationSummary), tonic::Status> {
    let mut stream = client.generate(request).await?.into_inner();
    let mut deltas = Vec::new();
    let mut calls = Vec::new();
    while let Some(msg) = stream.message().await? {
        match msg.event {
            Some(pb::generate_response::Event::Delta(d)) => deltas.push(d.text),
            Some(pb::generate_response::Event::ToolCall(c)) => calls.push(c),
            Some(pb::generate_response::Event::Summary(s)) => return Ok((deltas, calls, s)),
            None => panic!("empty GenerateResponse"),
        }
    }
    panic!("stream ended without a summary")
}
