//! Configuration reloaded in place: the gateway's configuration file
//! (`MOLTBOT_GATEWAY_CONFIG`: routes, candidates and weights, API keys,
//! tenants, limits, prices and budgets) is read again when its content changes (checked every
//! [`Reloader`] interval, 2 s by default — a Kubernetes ConfigMap update
//! swaps the mounted file under the pod, no restart) and at once on SIGHUP.
//!
//! A reload is atomic: the new routes and keys are built and validated in
//! full ([`check`], the same check `moltbot config check FILE` runs), then
//! swapped in together through [`Live`] holders. A turn finishes on the
//! routes it started with; a request already authenticated keeps its
//! caller. A file that does not read, parse or validate changes nothing:
//! the last good configuration stays, and the reason goes to the log (once
//! per distinct content), to `moltbot_gateway_config_last_reload_successful`
//! (0) and to `moltbot_gateway_config_reloads_total{outcome="error"}`.
//!
//! Rate-limit state survives a reload: a key whose hash, tenant and limits
//! are unchanged keeps its buckets and concurrency permits
//! ([`crate::edge::KeyRing::rebuild`]); a changed or new key starts full.
//! The process's flags (addresses, timeouts) are not part of the file and
//! need a restart.

pub mod live;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, LazyLock},
    time::Duration,
};

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts};
use sha2::{Digest, Sha256};

use crate::{
    GatewayError,
    edge::{KeyRing, ratelimit::shared::SharedBuckets},
    routing::{GatewayConfig, Router},
    turn::{Engine, metrics::register},
};
pub use live::Live;

/// `moltbot_gateway_config_reloads_total{outcome}`: reload attempts, `ok` or
/// `error`.
#[allow(clippy::expect_used)] // static, valid names: construction cannot fail
static RELOADS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register(
        IntCounterVec::new(
            Opts::new(
                "moltbot_gateway_config_reloads_total",
                "Configuration reloads by outcome (ok, error)",
            ),
            &["outcome"],
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_config_last_reload_successful`: 1 when the file in place
/// is the configuration served, 0 when its last reload failed (the name
/// Prometheus uses for its own configuration).
#[allow(clippy::expect_used)]
static LAST_OK: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "moltbot_gateway_config_last_reload_successful",
            "Whether the last configuration reload succeeded (1) or kept the previous configuration (0)",
        )
        .expect("valid metric"),
    )
});

/// `moltbot_gateway_config_last_reload_success_timestamp_seconds`.
#[allow(clippy::expect_used)]
static LAST_OK_AT: LazyLock<Gauge> = LazyLock::new(|| {
    register(
        Gauge::new(
            "moltbot_gateway_config_last_reload_success_timestamp_seconds",
            "When the served configuration was loaded, in Unix seconds",
        )
        .expect("valid metric"),
    )
});

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// What a configuration holds, for `moltbot config check` and the reload
/// log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// Route names, in order.
    pub routes: Vec<String>,
    /// Number of API keys.
    pub api_keys: usize,
    /// Whether anonymous callers are served (loopback only).
    pub anonymous: bool,
    /// Models with a price.
    pub priced_models: usize,
    /// Budgets (per key and per tenant).
    pub budgets: usize,
}

/// Reads and validates the configuration file at `path` for a gateway
/// listening on `http_addr`: the file parses, every route is sound, every
/// key hash is well formed, and a non-loopback gateway has keys. Errors with
/// [`GatewayError::Config`] saying what to fix.
pub fn check(path: &Path, http_addr: SocketAddr) -> Result<(GatewayConfig, Summary), GatewayError> {
    let config = GatewayConfig::load(path)?;
    KeyRing::new(&config, http_addr, "check", None)?;
    let summary = summary(&config, http_addr);
    Ok((config, summary))
}

/// What `config` holds, for a gateway on `http_addr`.
fn summary(config: &GatewayConfig, http_addr: SocketAddr) -> Summary {
    Summary {
        routes: config.routes.iter().map(|r| r.name.clone()).collect(),
        api_keys: config.api_keys.len(),
        anonymous: config.allow_anonymous && http_addr.ip().is_loopback(),
        priced_models: config.spend.prices.len(),
        budgets: config.spend.budgets.len(),
    }
}

/// Watches the configuration file and swaps reloaded routes and keys into
/// the engine and the edge.
pub struct Reloader {
    path: PathBuf,
    http_addr: SocketAddr,
    tenant: String,
    shared: Option<Arc<SharedBuckets>>,
    keys: Arc<Live<KeyRing>>,
    engine: Arc<Engine>,
    spend: Arc<crate::spend::Spend>,
    /// SHA-256 of the content last seen (served or refused).
    seen: Option<[u8; 32]>,
    /// Whether the last attempt could not read the file (logged once).
    unreadable: bool,
}

impl Reloader {
    /// A reloader of `path` for the gateway whose keys and engine are
    /// given; `http_addr`, `tenant` and `shared` are what the keys were
    /// built with. The content in place now counts as seen and served.
    pub fn new(
        path: PathBuf,
        http_addr: SocketAddr,
        tenant: String,
        shared: Option<Arc<SharedBuckets>>,
        keys: Arc<Live<KeyRing>>,
        engine: Arc<Engine>,
        spend: Arc<crate::spend::Spend>,
    ) -> Self {
        let seen = std::fs::read(&path).ok().map(|b| Sha256::digest(&b).into());
        LAST_OK.set(1);
        LAST_OK_AT.set(now_unix());
        Self {
            path,
            http_addr,
            tenant,
            shared,
            keys,
            engine,
            spend,
            seen,
            unreadable: false,
        }
    }

    /// Reloads when the file's content differs from the last seen (or
    /// always, with `force`). Returns whether a new configuration was
    /// swapped in. Errors with [`GatewayError::Config`] when the file does
    /// not read, parse or validate; the served configuration is unchanged
    /// then.
    pub fn reload(&mut self, force: bool) -> Result<bool, GatewayError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) => {
                let err = GatewayError::Config(moltbot_runtime::RuntimeError::Config(format!(
                    "cannot read MOLTBOT_GATEWAY_CONFIG {}: {e}",
                    self.path.display()
                )));
                // Logged and counted once until the file reads again.
                if !std::mem::replace(&mut self.unreadable, true) {
                    RELOADS.with_label_values(&["error"]).inc();
                    LAST_OK.set(0);
                    tracing::error!(error = %err, "configuration not reloaded; the previous one stays in force");
                }
                return Err(err);
            }
        };
        if std::mem::replace(&mut self.unreadable, false) {
            // Readable again: compare with what was served before.
            self.seen = None;
        }
        let hash: [u8; 32] = Sha256::digest(&bytes).into();
        if !force && self.seen == Some(hash) {
            return Ok(false);
        }
        self.seen = Some(hash);
        let outcome = self.swap();
        match &outcome {
            Ok(summary) => {
                RELOADS.with_label_values(&["ok"]).inc();
                LAST_OK.set(1);
                LAST_OK_AT.set(now_unix());
                tracing::info!(
                    path = %self.path.display(),
                    routes = %summary.routes.join(","),
                    api_keys = summary.api_keys,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                RELOADS.with_label_values(&["error"]).inc();
                LAST_OK.set(0);
                tracing::error!(
                    path = %self.path.display(),
                    error = %e,
                    "configuration not reloaded; the previous one stays in force"
                );
            }
        }
        outcome.map(|_| true)
    }

    fn swap(&self) -> Result<Summary, GatewayError> {
        // The checks of [`check`]: the file validates, and building the
        // ring checks the keys (once, on the ring that is served).
        let config = GatewayConfig::load(&self.path)?;
        let summary = summary(&config, self.http_addr);
        let keys =
            self.keys
                .get()
                .rebuild(&config, self.http_addr, &self.tenant, self.shared.clone())?;
        let spend = crate::spend::Compiled::new(config.spend)
            .map_err(|e| GatewayError::Config(moltbot_runtime::RuntimeError::Config(e)))?;
        // All built and valid: swap them in together.
        self.engine.set_router(Router::new(config.routes));
        self.keys.set(keys);
        self.spend.set_compiled(spend);
        Ok(summary)
    }

    /// Reloads on SIGHUP and whenever the file's content changes (polled
    /// every `interval`), until the process ends. Never returns an error:
    /// a failed reload is logged and counted.
    pub async fn run(mut self, interval: Duration) {
        #[cfg(unix)]
        let mut hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot install the SIGHUP handler; the file is still watched");
                None
            }
        };
        loop {
            #[cfg(unix)]
            let forced = tokio::select! {
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
                _ = tokio::time::sleep(interval) => false,
            };
            #[cfg(not(unix))]
            let forced = {
                tokio::time::sleep(interval).await;
                false
            };
            if forced {
                tracing::info!(path = %self.path.display(), "SIGHUP: reloading the configuration");
            }
            // Errors were logged and counted by `reload`.
            let _ = self.reload(forced);
        }
    }
}
