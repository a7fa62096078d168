//! `moltbot.generation.v1.GenerationService` over the loaded [`Backend`]s:
//! request validation, the model lookup, and the mapping of engine events to
//! the streamed `GenerateResponse`s.

use std::{
    collections::BTreeMap,
    pin::Pin,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use futures::Stream;
use moltbot_proto::{
    auth::v1::{ListProvidersRequest, auth_rotation_service_client::AuthRotationServiceClient},
    generation::v1::{self as pb, generation_service_server::GenerationService},
};
use moltbot_runtime::grpc::client::TracedChannel;
use tokio_stream::{StreamExt, wrappers::UnboundedReceiverStream};
use tonic::{Request, Response, Status};

use crate::{
    GenerationError,
    backend::{Backend, GenerateInput},
    engine::{Event, Finish},
    remote::{self, RemoteBackend, RemoteSettings},
    sampling::SamplingConfig,
    text::{
        ChatMessage,
        grammar::ResponseFormat,
        tools::{ToolMode, ToolRequest, ToolSpec},
    },
};

/// Most messages in one request.
pub const MAX_MESSAGES: usize = 1024;
/// Most stop sequences, and the longest one in bytes (OpenAI allows 4).
pub const MAX_STOPS: usize = 8;
/// Longest stop sequence in bytes.
pub const MAX_STOP_BYTES: usize = 256;

/// Served models by name; filled once loading finishes.
pub type Models = BTreeMap<String, Arc<dyn Backend>>;

/// The gRPC service. Answers UNAVAILABLE until the models are loaded.
#[derive(Clone, Default)]
pub struct GenerationApi {
    /// The served local models (`None` while the first load runs); a
    /// LoadModel inserts, an UnloadModel removes, requests clone the Arc of
    /// the one they use.
    models: Arc<RwLock<Option<Models>>>,
    remote: Option<Arc<RemoteConfig>>,
    remotes: Arc<Mutex<BTreeMap<String, Arc<dyn Backend>>>>,
    /// How LoadModel loads; `None`: it is refused (a service built in a
    /// test).
    loader: Option<Arc<crate::hotload::Loader>>,
    /// Names being loaded by a LoadModel now.
    loading: Arc<Mutex<std::collections::BTreeSet<String>>>,
    /// `MOLTBOT_ADMIN_TOKEN`, for LoadModel and UnloadModel.
    admin_token: Option<Arc<str>>,
}

/// How remote models (`<provider>/<model>`) are reached.
pub struct RemoteConfig {
    /// The auth-rotation service.
    pub auth: TracedChannel,
    /// The pooled HTTP client for providers.
    pub http: reqwest::Client,
    /// Timeouts and credential attempts.
    pub settings: RemoteSettings,
}

impl GenerationApi {
    /// A service whose models arrive later through [`GenerationApi::install`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Serves `models` from now on (the first call wins).
    pub fn install(&self, models: Models) {
        let mut served = self.models.write().unwrap_or_else(|p| p.into_inner());
        if served.is_none() {
            *served = Some(models);
        }
    }

    /// The served local models now. Errors with UNAVAILABLE while the
    /// first load runs.
    fn models(&self) -> Result<Models, Status> {
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or_else(|| Status::unavailable("models are still loading"))
    }

    /// LoadModel and UnloadModel load with `loader` and take `admin_token`
    /// (without one: loopback callers only, as understanding's
    /// ReloadModel).
    pub fn with_loader(
        mut self,
        loader: crate::hotload::Loader,
        admin_token: Option<String>,
    ) -> Self {
        self.loader = Some(Arc::new(loader));
        self.admin_token = moltbot_runtime::grpc::admin::configured(admin_token).map(Arc::from);
        self
    }

    /// Authorises an operator RPC: the operator's certificate, or its
    /// bearer token. Errors with UNAUTHENTICATED or PERMISSION_DENIED.
    fn operator<T>(&self, request: &Request<T>) -> Result<(), GenerationError> {
        use moltbot_runtime::grpc::admin::{AdminDenied, Refused, authorise};
        authorise(request, self.admin_token.as_deref()).map_err(|d| match d {
            Refused::Bearer(AdminDenied::MissingToken) => GenerationError::Unauthenticated(
                "LoadModel and UnloadModel need `authorization: Bearer <MOLTBOT_ADMIN_TOKEN>`"
                    .into(),
            ),
            Refused::Bearer(AdminDenied::WrongToken) => {
                GenerationError::PermissionDenied("wrong admin token".into())
            }
            Refused::NotLoopback => GenerationError::PermissionDenied(
                "LoadModel and UnloadModel from another host need MOLTBOT_ADMIN_TOKEN set on generation and sent as `authorization: Bearer <token>`".into(),
            ),
        })
    }

    /// Serves local models and, through `remote`, `<provider>/<model>` names.
    pub fn with_remote(remote: RemoteConfig) -> Self {
        Self {
            remote: Some(Arc::new(remote)),
            ..Self::default()
        }
    }

    fn backend(&self, name: &str) -> Result<Arc<dyn Backend>, Status> {
        {
            let served = self.models.read().unwrap_or_else(|p| p.into_inner());
            let models = served
                .as_ref()
                .ok_or_else(|| Status::unavailable("models are still loading"))?;
            let local = if name == "default" || name.is_empty() {
                models.values().next()
            } else {
                models.get(name)
            };
            if let Some(b) = local {
                return Ok(b.clone());
            }
        }
        match (&self.remote, remote::split_name(name)) {
            (Some(cfg), Some(_)) => {
                let mut remotes = self.remotes.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(b) = remotes.get(name) {
                    return Ok(b.clone());
                }
                let backend: Arc<dyn Backend> = Arc::new(RemoteBackend::new(
                    name,
                    AuthRotationServiceClient::new(cfg.auth.clone()),
                    cfg.http.clone(),
                    cfg.settings,
                )?);
                remotes.insert(name.to_owned(), backend.clone());
                Ok(backend)
            }
            _ => Err(GenerationError::UnknownModel(name.to_owned()).into()),
        }
    }

    /// Remote models the auth-rotation service knows, as `<provider>/<model>`
    /// (empty when it cannot be asked within 500 ms).
    async fn remote_models(&self) -> Vec<(String, String)> {
        let Some(cfg) = &self.remote else {
            return Vec::new();
        };
        let mut client = AuthRotationServiceClient::new(cfg.auth.clone());
        let mut request = Request::new(ListProvidersRequest {});
        request.set_timeout(Duration::from_millis(500));
        match tokio::time::timeout(Duration::from_millis(500), client.list_providers(request)).await
        {
            Ok(Ok(r)) => r
                .into_inner()
                .providers
                .into_iter()
                .flat_map(|p| {
                    let name = p.name.clone();
                    p.models
                        .into_iter()
                        .map(move |m| (format!("{name}/{m}"), format!("remote:{name}")))
                })
                .collect(),
            _ => Vec::new(),
        }
    }
}

fn role_name(role: i32) -> Result<&'static str, GenerationError> {
    match pb::Role::try_from(role) {
        Ok(pb::Role::System) => Ok("system"),
        Ok(pb::Role::User) => Ok("user"),
        Ok(pb::Role::Assistant) => Ok("assistant"),
        Ok(pb::Role::Tool) => Ok("tool"),
        Ok(pb::Role::Unspecified) | Err(_) => Err(GenerationError::InvalidArgument(format!(
            "message role {role} is not system, user, assistant or tool"
        ))),
    }
}

/// Converts and validates messages. Errors with INVALID_ARGUMENT for none,
/// too many, or a bad role.
pub fn messages(raw: &[pb::ChatMessage]) -> Result<Vec<ChatMessage>, GenerationError> {
    if raw.is_empty() || raw.len() > MAX_MESSAGES {
        return Err(GenerationError::InvalidArgument(format!(
            "messages must hold 1 to {MAX_MESSAGES} entries, got {}",
            raw.len()
        )));
    }
    raw.iter()
        .map(|m| {
            let mut tool_calls = Vec::with_capacity(m.tool_calls.len());
            for c in &m.tool_calls {
                crate::text::tools::check_markup("tool_calls[].function", &c.name)?;
                crate::text::tools::check_markup("tool_calls[].function", &c.arguments)?;
                let arguments: serde_json::Value =
                    serde_json::from_str(&c.arguments).map_err(|e| {
                        GenerationError::InvalidArgument(format!(
                            "tool call `{}`: arguments are not JSON: {e}",
                            c.id
                        ))
                    })?;
                tool_calls.push(serde_json::json!({
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": arguments},
                }));
            }
            Ok(ChatMessage {
                role: role_name(m.role)?.to_owned(),
                content: m.content.clone(),
                tool_calls,
                tool_call_id: m.tool_call_id.clone(),
            })
        })
        .collect()
}

/// Sampling parameters with server defaults (greedy), validated.
pub fn sampling(
    raw: Option<&pb::SamplingParams>,
) -> Result<(SamplingConfig, Option<usize>, Vec<String>), GenerationError> {
    let Some(p) = raw else {
        return Ok((SamplingConfig::default(), None, Vec::new()));
    };
    let config = SamplingConfig {
        temperature: p.temperature.unwrap_or(0.0),
        top_p: p.top_p.unwrap_or(1.0),
        top_k: p.top_k.unwrap_or(0) as usize,
        repetition_penalty: p.repetition_penalty.unwrap_or(1.0),
        seed: p.seed,
    };
    config.validate()?;
    if p.stop.len() > MAX_STOPS || p.stop.iter().any(|s| s.len() > MAX_STOP_BYTES) {
        return Err(GenerationError::InvalidArgument(format!(
            "at most {MAX_STOPS} stop sequences of at most {MAX_STOP_BYTES} bytes each"
        )));
    }
    let max_tokens = (p.max_tokens > 0).then_some(p.max_tokens as usize);
    Ok((config, max_tokens, p.stop.clone()))
}

fn finish_reason(f: Finish) -> pb::FinishReason {
    match f {
        Finish::Stop => pb::FinishReason::Stop,
        Finish::Length => pb::FinishReason::Length,
        Finish::ToolCalls => pb::FinishReason::ToolCalls,
    }
}

/// A backend as ListModels shows it.
pub fn model_info(b: &dyn Backend) -> pb::ModelInfo {
    let c = b.card();
    pb::ModelInfo {
        name: c.name,
        context_length: saturate(c.context_length),
        device: c.device,
        dtype: c.dtype,
        backend: c.backend,
        active_sequences: saturate(c.active_sequences),
        queued_requests: saturate(c.queued_requests),
        max_batch_size: saturate(c.max_batch_size),
    }
}

fn saturate(n: impl TryInto<u32>) -> u32 {
    n.try_into().unwrap_or(u32::MAX)
}

/// The Generate response stream (tonic's `BoxStream` of the generated stubs).
type GenerateStream = Pin<Box<dyn Stream<Item = Result<pb::GenerateResponse, Status>> + Send>>;

/// Most alternatives per token (OpenAI's limit).
const MAX_TOP_LOGPROBS: u32 = 20;

/// Alternatives to report with token log probabilities; `None` when not
/// asked. Errors with INVALID_ARGUMENT above [`MAX_TOP_LOGPROBS`] or
/// `top_logprobs` without `logprobs`.
fn logprobs(p: Option<&pb::SamplingParams>) -> Result<Option<usize>, GenerationError> {
    let Some(p) = p else { return Ok(None) };
    match (p.logprobs, p.top_logprobs) {
        (false, 0) => Ok(None),
        (false, _) => Err(GenerationError::InvalidArgument(
            "top_logprobs needs logprobs".to_owned(),
        )),
        (true, k) if k > MAX_TOP_LOGPROBS => Err(GenerationError::InvalidArgument(format!(
            "top_logprobs is {k}; at most {MAX_TOP_LOGPROBS}"
        ))),
        (true, k) => Ok(Some(k as usize)),
    }
}

/// The request's tools; `None` without tools or with `tool_choice` none
/// (the model is not shown them). Errors with INVALID_ARGUMENT for a bad
/// schema, name or named function.
fn tool_request(r: &pb::GenerateRequest) -> Result<Option<ToolRequest>, GenerationError> {
    use pb::tool_choice::Mode;
    let choice = r.tool_choice.clone().unwrap_or_default();
    let mode = match choice.mode() {
        Mode::None => return Ok(None),
        Mode::Unspecified | Mode::Auto => ToolMode::Auto,
        Mode::Required => ToolMode::Required,
        Mode::Function => ToolMode::Function(choice.function.clone()),
    };
    if r.tools.is_empty() {
        if mode == ToolMode::Auto {
            return Ok(None);
        }
        return Err(GenerationError::InvalidArgument(
            "tool_choice requires a call but there are no tools".to_owned(),
        ));
    }
    let mut tools = Vec::with_capacity(r.tools.len());
    for (i, t) in r.tools.iter().enumerate() {
        let parameters = if t.parameters_json.is_empty() {
            serde_json::json!({"type": "object", "properties": {}})
        } else {
            serde_json::from_str(&t.parameters_json).map_err(|e| {
                GenerationError::InvalidArgument(format!("tools[{i}].function.parameters: {e}"))
            })?
        };
        tools.push(ToolSpec {
            name: t.name.clone(),
            description: t.description.clone(),
            parameters,
        });
    }
    let request = ToolRequest {
        tools,
        mode,
        parallel: r.parallel_tool_calls,
    };
    request.validate()?;
    Ok(Some(request))
}

/// The request's `response_format`, with its schema parsed. Errors with
/// INVALID_ARGUMENT for a schema that is not JSON or a format without kind.
fn response_format(format: Option<&pb::ResponseFormat>) -> Result<Option<ResponseFormat>, Status> {
    let Some(format) = format else {
        return Ok(None);
    };
    match &format.kind {
        None => Err(Status::invalid_argument(
            "response_format has no kind; set json_object or json_schema",
        )),
        Some(pb::response_format::Kind::JsonObject(_)) => Ok(Some(ResponseFormat::JsonObject)),
        Some(pb::response_format::Kind::JsonSchema(s)) => {
            let schema: serde_json::Value = serde_json::from_str(&s.schema_json).map_err(|e| {
                Status::invalid_argument(format!("response_format.json_schema.schema: {e}"))
            })?;
            Ok(Some(ResponseFormat::JsonSchema {
                name: s.name.clone(),
                description: s.description.clone(),
                schema,
                strict: s.strict,
            }))
        }
    }
}

#[tonic::async_trait]
impl GenerationService for GenerationApi {
    async fn generate(
        &self,
        request: Request<pb::GenerateRequest>,
    ) -> Result<Response<GenerateStream>, Status> {
        let received = Instant::now();
        let r = request.into_inner();
        let backend = self.backend(&r.model)?;
        let messages = messages(&r.messages)?;
        let (sampling, max_tokens, stop) = sampling(r.sampling.as_ref())?;
        let response_format = response_format(r.response_format.as_ref())?;
        let tools = tool_request(&r)?;
        let logprobs = logprobs(r.sampling.as_ref())?;
        let card = backend.card();
        let rx = backend
            .generate(GenerateInput {
                messages,
                max_tokens,
                sampling,
                stop,
                response_format,
                tools,
                logprobs,
                received,
                affinity: if r.session_id.is_empty() {
                    String::new()
                } else {
                    moltbot_runtime::telemetry::redact::session_id("", &r.session_id)
                },
            })
            .await?;
        let (model, backend_name) = (card.name, card.backend);
        let stream = UnboundedReceiverStream::new(rx).map(move |event| match event {
            Event::Delta {
                text,
                token_ids,
                logprobs,
            } => Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Delta(pb::TokenDelta {
                    text,
                    token_ids,
                    logprobs,
                })),
            }),
            Event::Finished { reason, usage } => Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::Summary(
                    pb::GenerationSummary {
                        finish_reason: finish_reason(reason) as i32,
                        usage: Some(pb::Usage {
                            prompt_tokens: saturate(usage.prompt_tokens),
                            completion_tokens: saturate(usage.completion_tokens),
                            time_to_first_token_ms: saturate(usage.time_to_first_token_ms),
                            total_time_ms: saturate(usage.total_ms),
                        }),
                        model: model.clone(),
                        backend: backend_name.clone(),
                    },
                )),
            }),
            Event::ToolCall {
                id,
                name,
                arguments,
            } => Ok(pb::GenerateResponse {
                event: Some(pb::generate_response::Event::ToolCall(pb::ToolCall {
                    id,
                    name,
                    arguments,
                })),
            }),
            Event::Failed(e) => Err(Status::from(e)),
        });
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_models(
        &self,
        _request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        let mut models: Vec<pb::ModelInfo> = self
            .models()?
            .values()
            .map(|b| model_info(b.as_ref()))
            .collect();
        for (name, backend) in self.remote_models().await {
            models.push(pb::ModelInfo {
                name,
                device: "remote".into(),
                dtype: "-".into(),
                backend,
                ..Default::default()
            });
        }
        Ok(Response::new(pb::ListModelsResponse { models }))
    }

    async fn count_tokens(
        &self,
        request: Request<pb::CountTokensRequest>,
    ) -> Result<Response<pb::CountTokensResponse>, Status> {
        let r = request.into_inner();
        let backend = self.backend(&r.model)?;
        let messages = if r.messages.is_empty() {
            Vec::new()
        } else {
            messages(&r.messages)?
        };
        let (prompt, texts) = backend.count_tokens(&messages, &r.texts)?;
        Ok(Response::new(pb::CountTokensResponse {
            prompt_tokens: saturate(prompt),
            text_tokens: texts.into_iter().map(saturate).collect(),
            context_length: saturate(backend.card().context_length),
        }))
    }

    async fn load_model(
        &self,
        request: Request<pb::LoadModelRequest>,
    ) -> Result<Response<pb::LoadModelResponse>, Status> {
        self.operator(&request)?;
        let loader = self.loader.clone().ok_or_else(|| {
            Status::failed_precondition("this generation service loads no models while serving")
        })?;
        let r = crate::hotload::load(&loader, &self.models, &self.loading, request.into_inner())
            .await?;
        Ok(Response::new(r))
    }

    async fn unload_model(
        &self,
        request: Request<pb::UnloadModelRequest>,
    ) -> Result<Response<pb::UnloadModelResponse>, Status> {
        self.operator(&request)?;
        Ok(Response::new(
            crate::hotload::unload(&self.models, request.into_inner()).await?,
        ))
    }
}
