//! TLS on the mesh's own gRPC hops, server and client side, with
//! certificate files that may be replaced on disk while the process runs
//! (cert-manager rotates them): every new connection uses the files as they
//! are now (their modification times are checked, at most once a second);
//! connections already open keep the certificate they started with.
//!
//! - Server: with `MOLTBOT_TLS_CERT` and `MOLTBOT_TLS_KEY` the gRPC listener
//!   speaks TLS only (ALPN `h2`); with `MOLTBOT_TLS_CA` as well, a client
//!   must present a certificate issued by that CA (mutual TLS), and its
//!   certificate is available to handlers (`Request::peer_certs`).
//!   `MOLTBOT_HEALTH_ADDR` adds a plaintext listener that serves
//!   `grpc.health.v1.Health` alone, for the kubelet's gRPC probes.
//! - Client: an `https://` upstream URL is dialled with TLS, verifying the
//!   server against `MOLTBOT_TLS_CA` (else the platform's roots plus
//!   `SSL_CERT_FILE`/`SSL_CERT_DIR`) and presenting `MOLTBOT_TLS_CERT` /
//!   `MOLTBOT_TLS_KEY` when they are set. [`install_client`] sets this once
//!   per process; `http://` URLs stay plaintext.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant, SystemTime},
};

use rustls::{
    ClientConfig, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject},
    server::WebPkiClientVerifier,
};

use crate::RuntimeError;

/// TLS flags shared by every component.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsArgs {
    /// PEM certificate chain this component presents: as a server (the gRPC
    /// listener then speaks TLS only) and as a client of `https://`
    /// upstreams (mutual TLS). Needs MOLTBOT_TLS_KEY.
    #[arg(long, env = "MOLTBOT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of MOLTBOT_TLS_CERT.
    #[arg(long, env = "MOLTBOT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// PEM bundle of the mesh CA: servers require client certificates
    /// issued by it (mutual TLS); clients verify `https://` upstreams
    /// against it instead of the platform's roots.
    #[arg(long, env = "MOLTBOT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Plaintext listener serving only `grpc.health.v1.Health` (kubelet
    /// probes) beside a TLS gRPC listener, e.g. `0.0.0.0:50151`.
    #[arg(long, env = "MOLTBOT_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
}

impl TlsArgs {
    /// Whether the gRPC listener serves TLS. Errors with
    /// [`RuntimeError::Config`] when only one of certificate and key is set.
    pub fn server_enabled(&self) -> Result<bool, RuntimeError> {
        match (&self.tls_cert, &self.tls_key) {
            (None, None) => Ok(false),
            (Some(_), None) | (None, Some(_)) => Err(RuntimeError::Config(
                "MOLTBOT_TLS_CERT and MOLTBOT_TLS_KEY go together: set both (TLS) or neither (plaintext)".into(),
            )),
            (Some(_), Some(_)) => Ok(true),
        }
    }
}

/// The files a configuration is built from.
#[derive(Debug, Clone)]
struct Files {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    ca: Option<PathBuf>,
}

impl From<&TlsArgs> for Files {
    fn from(a: &TlsArgs) -> Self {
        Self {
            cert: a.tls_cert.clone(),
            key: a.tls_key.clone(),
            ca: a.tls_ca.clone(),
        }
    }
}

fn config_error(path: &Path, what: &str, e: impl std::fmt::Display) -> RuntimeError {
    RuntimeError::Config(format!("{what} {}: {e}", path.display()))
}

fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, RuntimeError> {
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| config_error(path, "cannot read certificates from", e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| config_error(path, "bad PEM certificate in", e))?;
    if chain.is_empty() {
        return Err(config_error(path, "no certificate in", "empty"));
    }
    Ok(chain)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, RuntimeError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| config_error(path, "cannot read a private key from", e))
}

fn read_roots(path: &Path) -> Result<RootCertStore, RuntimeError> {
    let mut roots = RootCertStore::empty();
    for cert in read_chain(path)? {
        roots
            .add(cert)
            .map_err(|e| config_error(path, "bad CA certificate in", e))?;
    }
    Ok(roots)
}

/// The platform's roots plus `SSL_CERT_FILE`/`SSL_CERT_DIR`.
fn platform_roots() -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    for bundle in crate::tls::extra_roots().unwrap_or_default() {
        for cert in CertificateDer::pem_slice_iter(&bundle).flatten() {
            let _ = roots.add(cert);
        }
    }
    roots
}

impl Files {
    fn paths(&self) -> impl Iterator<Item = &PathBuf> {
        self.cert.iter().chain(&self.key).chain(&self.ca)
    }

    /// Modification times, to notice a replaced file.
    fn stamp(&self) -> Vec<Option<SystemTime>> {
        self.paths()
            .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
            .collect()
    }

    fn server_config(&self) -> Result<ServerConfig, RuntimeError> {
        let (Some(cert), Some(key)) = (&self.cert, &self.key) else {
            return Err(RuntimeError::Config(
                "TLS serving needs MOLTBOT_TLS_CERT and MOLTBOT_TLS_KEY".into(),
            ));
        };
        let builder = match &self.ca {
            Some(ca) => {
                // A certificate, when presented, must chain to the mesh CA;
                // a call without one reaches the authorisation layer,
                // which answers UNAUTHENTICATED naming the rule (or admits
                // it for health and admin-token calls).
                let verifier = WebPkiClientVerifier::builder(Arc::new(read_roots(ca)?))
                    .allow_unauthenticated()
                    .build()
                    .map_err(|e| config_error(ca, "unusable client CA", e))?;
                ServerConfig::builder().with_client_cert_verifier(verifier)
            }
            None => ServerConfig::builder().with_no_client_auth(),
        };
        let mut config = builder
            .with_single_cert(read_chain(cert)?, read_key(key)?)
            .map_err(|e| config_error(cert, "certificate and key do not match:", e))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }

    fn client_config(&self) -> Result<ClientConfig, RuntimeError> {
        let roots = match &self.ca {
            Some(ca) => read_roots(ca)?,
            None => platform_roots(),
        };
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let mut config = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(read_chain(cert)?, read_key(key)?)
                .map_err(|e| config_error(cert, "certificate and key do not match:", e))?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(config)
    }
}

/// A configuration rebuilt when its files change on disk. A rebuild that
/// fails (a half-written file) is logged and the last good configuration
/// kept.
struct Reloading<T> {
    files: Files,
    build: fn(&Files) -> Result<T, RuntimeError>,
    state: Mutex<(Instant, Vec<Option<SystemTime>>, Arc<T>)>,
}

impl<T> Reloading<T> {
    fn new(
        files: Files,
        build: fn(&Files) -> Result<T, RuntimeError>,
    ) -> Result<Self, RuntimeError> {
        let stamp = files.stamp();
        let config = Arc::new(build(&files)?);
        Ok(Self {
            files,
            build,
            state: Mutex::new((Instant::now(), stamp, config)),
        })
    }

    fn current(&self) -> Arc<T> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0.elapsed() >= Duration::from_secs(1) {
            state.0 = Instant::now();
            let stamp = self.files.stamp();
            if stamp != state.1 {
                match (self.build)(&self.files) {
                    Ok(config) => {
                        tracing::info!("TLS certificate files changed; new connections use them");
                        state.1 = stamp;
                        state.2 = Arc::new(config);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "TLS certificate files changed but do not load; keeping the previous ones")
                    }
                }
            }
        }
        state.2.clone()
    }
}

/// The server side: a TLS acceptor over the current certificate files.
pub struct ServerTls {
    config: Reloading<ServerConfig>,
    mutual: bool,
    /// The plaintext health listener's address, if any.
    pub health_addr: Option<SocketAddr>,
}

impl ServerTls {
    /// From the flags; `None` when TLS is off. The files are read and
    /// checked here, at start-up, so a wrong path fails fast with its name.
    /// Errors as [`TlsArgs::server_enabled`], and with
    /// [`RuntimeError::Config`] for a file that cannot be read or parsed.
    pub fn from_args(args: &TlsArgs) -> Result<Option<Self>, RuntimeError> {
        if !args.server_enabled()? {
            return Ok(None);
        }
        Ok(Some(Self {
            config: Reloading::new(Files::from(args), Files::server_config)?,
            mutual: args.tls_ca.is_some(),
            health_addr: args.health_addr,
        }))
    }

    /// Whether clients are verified against a CA (`MOLTBOT_TLS_CA`): only
    /// then can the authorisation table be enforced.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Turns accepted TCP connections into TLS streams: each handshake runs
    /// in its own task (a slow client cannot stall the accept loop) and
    /// must finish within 10 s; failed handshakes are logged at debug and
    /// dropped.
    pub fn incoming(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
    ) -> tokio_stream::wrappers::ReceiverStream<
        Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
    > {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = tokio_rustls::TlsAcceptor::from(self.config.current());
                let sender = tx.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
                    {
                        Ok(Ok(tls)) => {
                            let _ = sender.send(Ok(tls)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake refused"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
                if tx.is_closed() {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

static CLIENT: OnceLock<Reloading<ClientConfig>> = OnceLock::new();

/// Sets this process's client TLS (for `https://` upstreams) from the
/// flags. Call once at start-up, before opening channels; later calls are
/// ignored. Errors with [`RuntimeError::Config`] for unreadable files.
pub fn install_client(args: &TlsArgs) -> Result<(), RuntimeError> {
    let config = Reloading::new(Files::from(args), Files::client_config)?;
    let _ = CLIENT.set(config);
    Ok(())
}

/// The client configuration: the installed one, else the platform's roots
/// without a client certificate.
fn client_config() -> Result<Arc<ClientConfig>, RuntimeError> {
    if let Some(c) = CLIENT.get() {
        return Ok(c.current());
    }
    let fallback = Reloading::new(
        Files {
            cert: None,
            key: None,
            ca: None,
        },
        Files::client_config,
    )?;
    Ok(CLIENT.get_or_init(|| fallback).current())
}

/// A tonic connector that dials TCP and then TLS to the host of the
/// original `https://` URL (tonic itself is handed an `http://` URL, since
/// the TLS is done here).
#[derive(Debug, Clone)]
pub struct TlsConnector {
    host: String,
    port: u16,
    /// The one address to dial (a balancer's endpoint); `None` resolves
    /// `host` on each connection.
    addr: Option<SocketAddr>,
}

impl TlsConnector {
    /// For an `https://host:port` URL. Errors with [`RuntimeError::Config`]
    /// when it has no host.
    pub fn new(url: &url::Url) -> Result<Self, RuntimeError> {
        let host = url
            .host_str()
            .ok_or_else(|| RuntimeError::Config(format!("{url} has no host")))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            host,
            port: url.port().unwrap_or(443),
            addr: None,
        })
    }

    /// Dials `addr` and verifies the server as `host` (one endpoint of a
    /// balanced upstream whose name resolved to several addresses).
    pub fn pinned(host: String, addr: SocketAddr) -> Self {
        Self {
            host,
            port: addr.port(),
            addr: Some(addr),
        }
    }
}

type Connecting = std::pin::Pin<
    Box<
        dyn Future<
                Output = Result<
                    hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>,
                    std::io::Error,
                >,
            > + Send,
    >,
>;

impl tower::Service<http::Uri> for TlsConnector {
    type Response = hyper_util::rt::TokioIo<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;
    type Error = std::io::Error;
    type Future = Connecting;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (host, port, addr) = (self.host.clone(), self.port, self.addr);
        Box::pin(async move {
            let config = client_config().map_err(std::io::Error::other)?;
            let name = ServerName::try_from(host.clone()).map_err(std::io::Error::other)?;
            let tcp = match addr {
                Some(addr) => tokio::net::TcpStream::connect(addr).await?,
                None => tokio::net::TcpStream::connect((host.as_str(), port)).await?,
            };
            tcp.set_nodelay(true)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await?;
            Ok(hyper_util::rt::TokioIo::new(tls))
        })
    }
}
