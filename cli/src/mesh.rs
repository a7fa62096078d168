//! How the CLI reaches the mesh's gRPC services: over mutual TLS with the
//! operator certificate (docs/security.md). The certificate is
//! `MOLTBOT_TLS_CERT`/`MOLTBOT_TLS_KEY`/`MOLTBOT_TLS_CA` when set, else
//! the one `moltbot up` wrote under `<data-dir>/pki/`.

use std::path::{Path, PathBuf};

use moltbot_runtime::grpc::{pki::Files, tls::TlsArgs};
use tonic::transport::Channel;

use crate::CliError;

/// The directory `moltbot up` writes the dev CA's certificates to.
pub fn pki_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("pki")
}

/// The TLS files of `principal` (e.g. `operator`) under `pki`.
pub fn tls_args(pki: &Path, principal: &str) -> TlsArgs {
    let files = Files::of(pki, principal);
    TlsArgs {
        tls_cert: Some(files.cert),
        tls_key: Some(files.key),
        tls_ca: Some(files.ca),
        health_addr: None,
    }
}

/// Installs this process's client TLS: the `MOLTBOT_TLS_*` variables, else
/// the operator certificate under `<data_dir>/pki` when present, else the
/// platform's roots without a certificate. Errors with
/// [`CliError::Setup`] for files that do not load.
pub fn install_tls(data_dir: &Path) -> Result<(), CliError> {
    let from_env = |name: &str| std::env::var_os(name).map(PathBuf::from);
    let mut args = TlsArgs {
        tls_cert: from_env("MOLTBOT_TLS_CERT"),
        tls_key: from_env("MOLTBOT_TLS_KEY"),
        tls_ca: from_env("MOLTBOT_TLS_CA"),
        health_addr: None,
    };
    let pki = pki_dir(data_dir);
    if args.tls_cert.is_none() && Files::of(&pki, "operator").cert.exists() {
        args = tls_args(&pki, "operator");
    }
    moltbot_runtime::grpc::tls::install_client(&args)
        .map_err(|e| CliError::Setup(format!("client TLS: {e}")))
}

/// Connects to the service at `url` (`https://` for mutual TLS). Errors
/// with [`CliError::Setup`] naming `what` when it cannot be reached.
pub async fn connect(what: &str, url: &str) -> Result<Channel, CliError> {
    moltbot_runtime::grpc::client::connect(url)
        .await
        .map_err(|e| {
            CliError::Setup(format!(
                "cannot reach {what} at {url}: {e}; is the mesh up (`moltbot up`)?"
            ))
        })
}

/// The admin token: `MOLTBOT_ADMIN_TOKEN`, else the dev-mode
/// `<data_dir>/admin.token` that `moltbot up` writes; `None` when neither.
pub fn admin_token(data_dir: &Path) -> Option<String> {
    std::env::var("MOLTBOT_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| std::fs::read_to_string(data_dir.join("admin.token")).ok())
        .map(|t| t.trim().to_owned())
}

/// [`admin_token`], or [`CliError::Setup`] saying where to put one (for
/// the commands that cannot go on without it).
pub fn require_admin_token(data_dir: &Path) -> Result<String, CliError> {
    admin_token(data_dir).ok_or_else(|| {
        CliError::Setup(
            "set MOLTBOT_ADMIN_TOKEN (or run where `moltbot up` keeps var/data/admin.token)".into(),
        )
    })
}

/// `msg` with `authorization: Bearer <token>`. Errors with
/// [`CliError::Setup`] when the token cannot be a header value.
pub fn with_admin_token<T>(token: &str, msg: T) -> Result<tonic::Request<T>, CliError> {
    let mut r = tonic::Request::new(msg);
    let value = format!("Bearer {token}").parse().map_err(|_| {
        CliError::Setup("the admin token holds characters a header cannot carry".into())
    })?;
    r.metadata_mut().insert("authorization", value);
    Ok(r)
}
