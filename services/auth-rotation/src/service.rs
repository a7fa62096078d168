//! `moltbot.auth.v1.AuthRotationService` over the [`Registry`]. Admin RPCs
//! check `authorization: Bearer <admin token>` in constant time.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use moltbot_proto::auth::v1::{
    AcquireCredentialRequest, AcquireCredentialResponse, AddCredentialRequest,
    AddCredentialResponse, CredentialSlot, ListProvidersRequest, ListProvidersResponse, Outcome,
    ProviderKind, ReportOutcomeRequest, ReportOutcomeResponse, RevokeCredentialRequest,
    RevokeCredentialResponse, RotateCredentialRequest, RotateCredentialResponse,
    UpsertProviderRequest, UpsertProviderResponse, WatchProviderHealthRequest,
    WatchProviderHealthResponse, add_credential_request,
    auth_rotation_service_server::AuthRotationService,
};
use moltbot_runtime::grpc::admin::AdminDenied;
use tonic::{Request, Response, Status};

use crate::{
    AuthError,
    crypto::Secret,
    registry::{OAuth, Registry, url},
    store::ProviderRow,
};

/// Default health-check interval, seconds (docs/architecture.md).
pub const DEFAULT_HEALTH_INTERVAL_S: u32 = 30;

/// The service.
pub struct AuthApi {
    registry: Arc<Registry>,
    admin_token: Option<Secret>,
    plain_http_hosts: Vec<String>,
}

impl AuthApi {
    /// Serves `registry`; admin RPCs need `admin_token` (disabled when
    /// `None`); provider URLs may be plain `http` on loopback and on
    /// `plain_http_hosts` ([`url::plain_http_allowed`]).
    pub fn new(
        registry: Arc<Registry>,
        admin_token: Option<Secret>,
        plain_http_hosts: Vec<String>,
    ) -> Self {
        Self {
            registry,
            admin_token,
            plain_http_hosts,
        }
    }

    fn admin<T>(&self, request: &Request<T>) -> Result<(), AuthError> {
        if moltbot_runtime::grpc::admin::from_operator(request) {
            return Ok(());
        }
        let Some(expected) = &self.admin_token else {
            return Err(AuthError::PermissionDenied(
                "admin RPCs are disabled: start the service with MOLTBOT_ADMIN_TOKEN set".into(),
            ));
        };
        moltbot_runtime::grpc::admin::check_bearer(request, expected.expose()).map_err(
            |d| match d {
                AdminDenied::MissingToken => AuthError::Unauthenticated,
                AdminDenied::WrongToken => AuthError::PermissionDenied("wrong admin token".into()),
            },
        )
    }
}

fn validate_name(name: &str) -> Result<(), AuthError> {
    if moltbot_runtime::config::is_resource_name(name) {
        Ok(())
    } else {
        Err(AuthError::InvalidArgument(format!(
            "provider name {name:?} must match [a-z0-9_-]{{1,64}}"
        )))
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchProviderHealthResponse, Status>> + Send>>;

#[tonic::async_trait]
impl AuthRotationService for AuthApi {
    async fn acquire_credential(
        &self,
        request: Request<AcquireCredentialRequest>,
    ) -> Result<Response<AcquireCredentialResponse>, Status> {
        let r = request.into_inner();
        let lease = self.registry.acquire(&r.provider, &r.model).await?;
        Ok(Response::new(AcquireCredentialResponse {
            lease: Some(lease),
        }))
    }

    async fn report_outcome(
        &self,
        request: Request<ReportOutcomeRequest>,
    ) -> Result<Response<ReportOutcomeResponse>, Status> {
        let r = request.into_inner();
        let outcome = Outcome::try_from(r.outcome).unwrap_or(Outcome::Unspecified);
        let response = self
            .registry
            .report(&r.lease_id, outcome, r.http_status, r.retry_after_ms)
            .await?;
        Ok(Response::new(response))
    }

    async fn list_providers(
        &self,
        _request: Request<ListProvidersRequest>,
    ) -> Result<Response<ListProvidersResponse>, Status> {
        Ok(Response::new(ListProvidersResponse {
            providers: self.registry.list(),
        }))
    }

    async fn watch_provider_health(
        &self,
        request: Request<WatchProviderHealthRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let wanted = request.into_inner().providers;
        let keep = move |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
        // Subscribe before reading the current states, so no change is lost
        // between the two.
        let mut events = self.registry.subscribe();
        let current: Vec<WatchProviderHealthResponse> = self
            .registry
            .list()
            .into_iter()
            .filter(|p| keep(&p.name))
            .map(|p| WatchProviderHealthResponse {
                provider: Some(p),
                changed_at: None,
                reason: "current state".into(),
            })
            .collect();
        let stream = async_stream_of(current, move |tx| async move {
            loop {
                match events.recv().await {
                    Ok(e) => {
                        if e.provider.as_ref().is_some_and(|p| keep(&p.name))
                            && tx.send(Ok(e)).await.is_err()
                        {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "watcher lagged");
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn upsert_provider(
        &self,
        request: Request<UpsertProviderRequest>,
    ) -> Result<Response<UpsertProviderResponse>, Status> {
        self.admin(&request)?;
        let r = request.into_inner();
        validate_name(&r.name)?;
        let kind = ProviderKind::try_from(r.kind).unwrap_or(ProviderKind::Unspecified);
        if kind == ProviderKind::Unspecified {
            return Err(
                AuthError::InvalidArgument("kind must be OPENAI or ANTHROPIC".into()).into(),
            );
        }
        let base_url = url::validate("base_url", &r.base_url, &self.plain_http_hosts)?;
        if r.models.is_empty() || r.models.iter().any(|m| m.is_empty()) {
            return Err(AuthError::InvalidArgument(
                "models must list at least one model name".into(),
            )
            .into());
        }
        let interval = if r.health_check_interval_seconds == 0 {
            DEFAULT_HEALTH_INTERVAL_S
        } else {
            r.health_check_interval_seconds
        };
        let status = self
            .registry
            .upsert_provider(ProviderRow {
                name: r.name,
                kind: kind as i32,
                base_url,
                models: r.models,
                health_interval_s: interval,
            })
            .await?;
        Ok(Response::new(UpsertProviderResponse {
            provider: Some(status),
        }))
    }

    async fn add_credential(
        &self,
        request: Request<AddCredentialRequest>,
    ) -> Result<Response<AddCredentialResponse>, Status> {
        self.admin(&request)?;
        let r = request.into_inner();
        match r.secret {
            Some(add_credential_request::Secret::ApiKeys(keys)) => {
                if keys.primary.is_empty() {
                    return Err(
                        AuthError::InvalidArgument("api_keys.primary is empty".into()).into(),
                    );
                }
                self.registry
                    .put_credential(
                        &r.provider,
                        CredentialSlot::Primary,
                        Secret::new(keys.primary),
                        None,
                    )
                    .await?;
                if !keys.secondary.is_empty() {
                    self.registry
                        .put_credential(
                            &r.provider,
                            CredentialSlot::Secondary,
                            Secret::new(keys.secondary),
                            None,
                        )
                        .await?;
                }
            }
            Some(add_credential_request::Secret::Oauth2(o)) => {
                let token_url =
                    url::validate("oauth2.token_url", &o.token_url, &self.plain_http_hosts)?;
                if o.client_id.is_empty() || o.client_secret.is_empty() {
                    return Err(AuthError::InvalidArgument(
                        "oauth2 needs client_id and client_secret".into(),
                    )
                    .into());
                }
                self.registry
                    .put_credential(
                        &r.provider,
                        CredentialSlot::Oauth2,
                        Secret::new(o.client_secret),
                        Some(OAuth {
                            token_url,
                            client_id: o.client_id,
                            scopes: o.scopes.join(" "),
                            token: None,
                        }),
                    )
                    .await?;
            }
            // An empty secret in the primary slot: leases of this provider
            // carry no auth header (registry/mod.rs), while its breakers and
            // health checks work as for any credential.
            Some(add_credential_request::Secret::None(_)) => {
                self.registry
                    .put_credential(
                        &r.provider,
                        CredentialSlot::Primary,
                        Secret::new(String::new()),
                        None,
                    )
                    .await?;
            }
            None => {
                return Err(
                    AuthError::InvalidArgument("give api_keys, oauth2 or none".into()).into(),
                );
            }
        }
        Ok(Response::new(AddCredentialResponse {
            credentials: self.registry.credentials(&r.provider),
        }))
    }

    async fn rotate_credential(
        &self,
        request: Request<RotateCredentialRequest>,
    ) -> Result<Response<RotateCredentialResponse>, Status> {
        self.admin(&request)?;
        let r = request.into_inner();
        let slot = CredentialSlot::try_from(r.slot).unwrap_or(CredentialSlot::Unspecified);
        if slot == CredentialSlot::Unspecified || r.new_secret.is_empty() {
            return Err(AuthError::InvalidArgument(
                "give a slot and a non-empty new_secret".into(),
            )
            .into());
        }
        let oauth = if slot == CredentialSlot::Oauth2 {
            Some(self.registry.oauth_of(&r.provider, slot).ok_or_else(|| {
                AuthError::NotFound(format!(
                    "provider `{}` has no OAuth2 credential to rotate",
                    r.provider
                ))
            })?)
        } else {
            None
        };
        let credential = self
            .registry
            .put_credential(&r.provider, slot, Secret::new(r.new_secret), oauth)
            .await?;
        Ok(Response::new(RotateCredentialResponse {
            credential: Some(credential),
        }))
    }

    async fn revoke_credential(
        &self,
        request: Request<RevokeCredentialRequest>,
    ) -> Result<Response<RevokeCredentialResponse>, Status> {
        self.admin(&request)?;
        let r = request.into_inner();
        let credential = self.registry.revoke(&r.provider, &r.credential_id).await?;
        Ok(Response::new(RevokeCredentialResponse {
            credential: Some(credential),
        }))
    }
}

/// A stream that yields `first`, then whatever `produce` sends.
fn async_stream_of<F, Fut>(first: Vec<WatchProviderHealthResponse>, produce: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<WatchProviderHealthResponse, Status>>) -> Fut,
    F: Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        for e in first {
            if tx.send(Ok(e)).await.is_err() {
                return;
            }
        }
        produce(tx).await;
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}
