//! The gateway's one way to Redis, shared by the rate limiter's buckets
//! (`gateway/src/edge/ratelimit/shared.rs`) and the response cache
//! (`gateway/src/cache/`): one multiplexed connection (`ConnectionManager`,
//! reconnecting), every command bounded by a timeout, and after a failure
//! a pause during which callers fall back at once instead of each waiting
//! out the timeout.

use std::{
    future::Future,
    sync::Mutex,
    time::{Duration, Instant},
};

use redis::aio::ConnectionManager;
use tokio::sync::OnceCell;

use crate::GatewayError;

/// How long callers skip Redis after a failed command.
pub const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(2);

/// A Redis server at one URL.
#[derive(Debug)]
pub struct Redis {
    client: redis::Client,
    connection: OnceCell<ConnectionManager>,
    timeout: Duration,
    paused_until: Mutex<Option<Instant>>,
}

impl Redis {
    /// A server at `url` (`redis://…`, or `rediss://…` for TLS), each
    /// command (and the first connection) bounded by `timeout`; connects
    /// on first use. Errors with [`GatewayError::Config`] for a malformed
    /// URL.
    pub fn new(url: &str, timeout: Duration) -> Result<Self, GatewayError> {
        let client = redis::Client::open(url).map_err(|e| {
            GatewayError::Config(moltbot_runtime::RuntimeError::Config(format!(
                "REDIS_URL is not a Redis URL ({e}); use e.g. redis://127.0.0.1:6379"
            )))
        })?;
        Ok(Self {
            client,
            connection: OnceCell::new(),
            timeout,
            paused_until: Mutex::new(None),
        })
    }

    /// The client, for what a shared connection cannot do (a pub/sub
    /// subscription holds its own).
    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    /// Runs `command` on the shared connection within the timeout. Errors
    /// with the Redis error or the timeout as text, and at once, without
    /// trying, during [`PAUSE_AFTER_FAILURE`] after a failure.
    pub async fn run<T, F, Fut>(&self, command: F) -> Result<T, String>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        if let Ok(paused) = self.paused_until.lock()
            && paused.is_some_and(|until| Instant::now() < until)
        {
            return Err("Redis failed moments ago; not retried yet".to_owned());
        }
        let timeout = self.timeout;
        let call = async {
            let connection = self
                .connection
                .get_or_try_init(|| {
                    let config = redis::aio::ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1);
                    ConnectionManager::new_with_config(self.client.clone(), config)
                })
                .await?
                .clone();
            command(connection).await
        };
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!(
                "no answer from Redis within {} ms",
                timeout.as_millis()
            )),
        };
        if result.is_err()
            && let Ok(mut paused) = self.paused_until.lock()
        {
            *paused = Some(Instant::now() + PAUSE_AFTER_FAILURE);
        }
        result
    }
}
