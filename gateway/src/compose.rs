//! The composition root: reads the configuration, builds the edge (keys,
//! rate limits, admission), the upstream clients, the turn engine over
//! them and the HTTP router, then serves with a graceful drain. Nothing
//! else in the gateway constructs its collaborators.

use std::sync::Arc;

use crate::{Args, GatewayError, Upstreams, edge, http, reload, routing, turn};

/// Builds the gateway from `args` and serves until SIGTERM/SIGINT, then lets in-flight requests finish within the
/// grace period. Logs `listening` with the bound `http_addr`.
///
/// Errors: [`GatewayError::Config`] for invalid flags, [`GatewayError::Bind`]
/// when the address is taken, [`GatewayError::Io`] when serving fails.
pub async fn serve(args: Args) -> Result<(), GatewayError> {
    edge::metrics::register_all();
    let config = match &args.config {
        Some(path) => routing::GatewayConfig::load(path)?,
        None => routing::GatewayConfig::default(),
    };
    let shared_buckets = match args.redis_url.as_deref().filter(|u| !u.is_empty()) {
        Some(url) => Some(Arc::new(edge::ratelimit::shared::SharedBuckets::new(url)?)),
        None if args.replicated => {
            return Err(GatewayError::Config(moltbot_runtime::RuntimeError::Config(
                "MOLTBOT_REPLICATED=true but the rate-limit buckets would be local to each gateway, giving every key its limit once per replica: set REDIS_URL".to_owned(),
            )));
        }
        None => None,
    };
    let keys = Arc::new(reload::Live::new(edge::KeyRing::new(
        &config,
        args.http_addr,
        &args.tenant,
        shared_buckets.clone(),
    )?));
    moltbot_runtime::grpc::tls::install_client(&args.tls)?;
    moltbot_runtime::grpc::balance::install(&args.balance)?;
    let upstreams = Arc::new(Upstreams::connect(&args)?);
    let cache = Arc::new(crate::cache::ResponseCache::new(&crate::cache::Settings {
        memory_bytes: args.cache_memory_bytes,
        redis_url: args.redis_url.clone().filter(|u| !u.is_empty()),
        redis_timeout: std::time::Duration::from_millis(args.cache_redis_timeout_ms),
    })?);
    cache.follow_purges();
    crate::rollout::register_all();
    let rollouts = Arc::new(crate::rollout::Rollouts::new(
        match args.redis_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => Arc::new(crate::rollout::RedisStore::new(Arc::new(
                crate::upstream::redis::Redis::new(url, crate::rollout::store::REDIS_TIMEOUT)?,
            ))),
            None => Arc::new(crate::rollout::MemoryStore::default()),
        },
    ));
    // The first read before serving: a restarted gateway resumes a
    // rollout before its first turn.
    if let Err(e) = rollouts.refresh().await {
        tracing::warn!(error = %e, "rollout store unreachable at start; retried every tick");
    }
    // At least 100 ms between ticks: 0 would spin.
    tokio::spawn(rollouts.clone().run(std::time::Duration::from_millis(
        args.rollout_tick_ms.max(100),
    )));
    let spend = Arc::new(spend(&args, config.spend.clone())?);
    if let Some(ledger) = spend.ledger() {
        tokio::spawn(ledger.clone().run());
    }
    let engine = Arc::new(
        turn::Engine::new(
            upstreams.ports(),
            routing::Router::new(config.routes),
            turn::Settings {
                enrichment_timeout: std::time::Duration::from_millis(args.enrichment_timeout_ms),
                request_timeout: std::time::Duration::from_millis(args.request_timeout_ms),
            },
        )
        .with_cache(cache)
        .with_rollouts(rollouts),
    );
    // The configuration file is watched and reloaded in place (on change
    // and SIGHUP); the embedded default has no file to watch.
    if let Some(path) = &args.config {
        let reloader = reload::Reloader::new(
            path.clone(),
            args.http_addr,
            args.tenant.clone(),
            shared_buckets,
            keys.clone(),
            engine.clone(),
            spend.clone(),
        );
        // At least 100 ms between checks: 0 would spin.
        let every = std::time::Duration::from_millis(args.config_poll_ms.max(100));
        tokio::spawn(reloader.run(every));
    }
    let state = http::AppState {
        upstreams,
        engine,
        keys,
        readiness_timeout: args.readiness_timeout(),
        admission: Arc::new(edge::admission::Admission::new(
            args.max_in_flight,
            std::time::Duration::from_millis(args.body_timeout_ms),
            args.max_body_bytes,
        )),
        sse_write_idle: std::time::Duration::from_millis(args.sse_write_idle_ms),
        max_body_bytes: args.max_body_bytes,
        spend: spend.clone(),
        draining: Arc::new(std::sync::atomic::AtomicBool::new(false)),
        last_readiness: Arc::new(std::sync::Mutex::new(None)),
        admin_token: args
            .admin_token
            .clone()
            .filter(|t| !t.is_empty())
            .map(Arc::from),
    };
    let draining = state.draining.clone();
    let app = http::router(state);
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: args.http_addr,
            source,
        })?;
    let http_addr = listener.local_addr()?;
    // Handlers installed before `listening` is logged: a SIGTERM right after
    // it drains instead of killing the process.
    let stop = moltbot_runtime::shutdown::signal();
    tracing::info!(%http_addr, "listening");

    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let limits = http::serve::ConnLimits {
        header_read_timeout: std::time::Duration::from_millis(args.header_timeout_ms),
        max_connections: args.max_connections,
    };
    let mut server = tokio::spawn(http::serve::serve(listener, app, limits, async {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        _ = stop => {}
        r = &mut server => return Ok(r.map_err(|e| GatewayError::Io(std::io::Error::other(e)))??),
    }
    // Fail /readyz first and keep serving while endpoints update; only then
    // stop accepting.
    draining.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        grace_ms = args.shutdown_grace_ms,
        drain_delay_ms = args.drain_delay_ms,
        "draining"
    );
    tokio::time::sleep(std::time::Duration::from_millis(args.drain_delay_ms)).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(args.shutdown_grace(), &mut server).await {
        Ok(joined) => joined.map_err(|e| GatewayError::Io(std::io::Error::other(e)))??,
        Err(_) => {
            tracing::warn!("grace period elapsed with requests in flight; dropping them");
            server.abort();
        }
    }
    // The last ledger rows, before the process ends (best effort).
    if let Some(ledger) = spend.ledger()
        && let Err(e) = ledger.flush().await
    {
        tracing::warn!(error = %e, rows = ledger.buffered(), "spend ledger rows lost at shutdown");
    }
    tracing::info!("stopped");
    Ok(())
}

/// Spend control from the flags: budget counters in Redis (`REDIS_URL`)
/// or this process, the ledger where `MOLTBOT_SPEND_LEDGER` says. Errors
/// with [`GatewayError::Config`] for a replicated gateway on a SQLite
/// ledger, or PostgreSQL asked for without `DATABASE_URL`.
fn spend(
    args: &crate::Args,
    config: crate::spend::SpendConfig,
) -> Result<crate::spend::Spend, GatewayError> {
    use crate::{config::LedgerBackend, spend};
    let fail = |m: String| GatewayError::Config(moltbot_runtime::RuntimeError::Config(m));
    spend::metrics::register_all();
    let database_url = args.database_url.clone().filter(|u| !u.is_empty());
    let backend = args.spend_ledger.unwrap_or(if database_url.is_some() {
        LedgerBackend::Postgres
    } else {
        LedgerBackend::Sqlite
    });
    let target = match backend {
        LedgerBackend::Off => None,
        LedgerBackend::Sqlite if args.replicated => {
            return Err(fail(
                "MOLTBOT_REPLICATED=true but the spend ledger would be a SQLite file per replica: set DATABASE_URL (or MOLTBOT_SPEND_LEDGER=off)".to_owned(),
            ));
        }
        LedgerBackend::Sqlite => Some(spend::ledger::Target::Sqlite(
            args.data_dir.join("spend.db"),
        )),
        LedgerBackend::Postgres => Some(spend::ledger::Target::Postgres {
            url: database_url.ok_or_else(|| {
                fail("MOLTBOT_SPEND_LEDGER=postgres needs DATABASE_URL".to_owned())
            })?,
            schema: args.spend_pg_schema.clone(),
        }),
    };
    let store: Arc<dyn spend::store::BudgetStore> =
        match args.redis_url.as_deref().filter(|u| !u.is_empty()) {
            Some(url) => Arc::new(spend::store::RedisStore::new(Arc::new(
                crate::upstream::redis::Redis::new(url, spend::store::REDIS_TIMEOUT)?,
            ))),
            None => Arc::new(spend::store::MemoryStore::default()),
        };
    let ledger = target.map(|t| Arc::new(spend::Ledger::new(t, args.spend_buffer_rows)));
    spend::Spend::new(config, store, ledger).map_err(fail)
}
