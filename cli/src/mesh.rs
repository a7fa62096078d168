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
