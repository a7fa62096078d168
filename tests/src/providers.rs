//! Registering remote providers with the auth-rotation service, through its
//! operator RPCs (`UpsertProvider`, `AddCredential`) and the admin token.

use moltbot_proto::auth::v1::{
    AddCredentialRequest, ApiKeyPair, NoAuth, ProviderKind, UpsertProviderRequest,
    add_credential_request, auth_rotation_service_client::AuthRotationServiceClient,
};

/// `msg` with `authorization: Bearer <token>`.
pub fn with_token<T>(token: &str, msg: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("a header value"),
    );
    r
}

/// Registers the OpenAI-compatible provider `name` at `base_url` (e.g. a
/// [`crate::fake::Provider`]) serving `models`, with one API key `key`, on
/// the auth-rotation service at `auth_url` whose admin token is `token`.
/// Panics when either RPC fails (test code).
pub async fn register_openai(
    auth_url: &str,
    token: &str,
    name: &str,
    base_url: String,
    models: &[&str],
    key: &str,
) {
    register(
        auth_url,
        token,
        name,
        base_url,
        models,
        add_credential_request::Secret::ApiKeys(ApiKeyPair {
            primary: key.into(),
            secondary: String::new(),
        }),
    )
    .await;
}

/// Registers `name` as [`register_openai`] does, but as an engine that
/// takes no key (`NoAuth`: an in-cluster vLLM or llama.cpp server).
pub async fn register_openai_without_key(
    auth_url: &str,
    token: &str,
    name: &str,
    base_url: String,
    models: &[&str],
) {
    register(
        auth_url,
        token,
        name,
        base_url,
        models,
        add_credential_request::Secret::None(NoAuth {}),
    )
    .await;
}

async fn register(
    auth_url: &str,
    token: &str,
    name: &str,
    base_url: String,
    models: &[&str],
    secret: add_credential_request::Secret,
) {
    let mut admin = AuthRotationServiceClient::new(crate::grpc::connect(auth_url).await);
    admin
        .upsert_provider(with_token(
            token,
            UpsertProviderRequest {
                name: name.into(),
                kind: ProviderKind::Openai as i32,
                base_url,
                models: models.iter().map(|m| (*m).to_owned()).collect(),
                health_check_interval_seconds: 30,
            },
        ))
        .await
        .expect("UpsertProvider");
    admin
        .add_credential(with_token(
            token,
            AddCredentialRequest {
                provider: name.into(),
                secret: Some(secret),
            },
        ))
        .await
        .expect("AddCredential");
}
