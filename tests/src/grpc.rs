//! gRPC helpers for tests: health checks and reflection listings over real
//! sockets.

use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

/// An `https://` endpoint with tonic's own rustls client (independent of
/// the mesh's connector): the server verified against `ca_pem` as
/// `localhost`, presenting `identity` (certificate and key PEM) or none.
pub fn mtls_endpoint(url: &str, ca_pem: &str, identity: Option<(&str, &str)>) -> Endpoint {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(url.to_owned())
        .unwrap()
        .tls_config(tls)
        .unwrap()
}

/// [`mtls_endpoint`] with the CA and the certificate of `principal` (e.g.
/// `operator`; none: anonymous) from a directory written by the dev CA
/// (`moltbot_runtime::grpc::pki`).
pub fn pki_endpoint(url: &str, pki: &std::path::Path, principal: Option<&str>) -> Endpoint {
    let read = |p: std::path::PathBuf| std::fs::read_to_string(p).unwrap();
    let ca = read(pki.join("ca.pem"));
    let identity = principal.map(|name| {
        let files = moltbot_runtime::grpc::pki::Files::of(pki, name);
        (read(files.cert), read(files.key))
    });
    mtls_endpoint(
        url,
        &ca,
        identity.as_ref().map(|(c, k)| (c.as_str(), k.as_str())),
    )
}

/// Connects to `url`, retrying for up to 10 s.
pub async fn connect(url: &str) -> Channel {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match Channel::from_shared(url.to_owned())
            .unwrap()
            .connect()
            .await
        {
            Ok(ch) => return ch,
            Err(e) if Instant::now() > deadline => panic!("cannot connect to {url}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `grpc.health.v1.Health/Check` for `service` (`""` = overall).
pub async fn health(channel: &Channel, service: &str) -> Result<ServingStatus, tonic::Status> {
    let response = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: service.to_owned(),
        })
        .await?;
    Ok(response.into_inner().status())
}

/// Polls health until `service` is SERVING, up to `timeout`.
pub async fn wait_serving(channel: &Channel, service: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let status = health(channel, service).await;
        if matches!(status, Ok(ServingStatus::Serving)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{service:?} not SERVING within {timeout:?}: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The service names listed by gRPC reflection v1.
pub async fn reflection_services(channel: &Channel) -> Vec<String> {
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = ServerReflectionClient::new(channel.clone())
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .expect("reflection call")
        .into_inner();
    let response = stream
        .message()
        .await
        .expect("reflection answer")
        .expect("one message");
    match response.message_response {
        Some(MessageResponse::ListServicesResponse(list)) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer: {other:?}"),
    }
}

/// `msg` as a request carrying `authorization: Bearer <token>` (admin RPCs).
pub fn with_bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(msg);
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    request
}
