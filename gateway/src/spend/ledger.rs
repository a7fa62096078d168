//! The spend ledger: one row per request that reached a model, written to
//! PostgreSQL (`DATABASE_URL`, schema `moltbot_spend`) or a SQLite file
//! (`moltbot up`), in batches, off the turn's path.
//!
//! A turn only pushes its row into a bounded buffer ([`Ledger::push`]);
//! a writer task drains it every [`FLUSH_EVERY`] (or at once past
//! [`BATCH_ROWS`]) in one multi-row `INSERT … ON CONFLICT (row_id) DO
//! NOTHING` per batch. With the database unreachable — at start or
//! later — rows stay buffered and the writer retries with backoff; past
//! the buffer's bound the oldest rows are dropped and counted
//! (`moltbot_gateway_spend_ledger_rows_total{outcome="dropped"}`). The
//! budgets never wait for the ledger: they live in the budget store
//! (`store.rs`).

use std::{
    collections::VecDeque,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use serde::Serialize;
use tokio::sync::Notify;

use super::{metrics, price::Tokens};

static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// PostgreSQL schema of the ledger.
pub const PG_SCHEMA: &str = "moltbot_spend";

/// Rows per `INSERT` (15 parameters each: 7,500, within both engines'
/// limits).
pub const BATCH_ROWS: usize = 500;

/// How often buffered rows are written, at most.
pub const FLUSH_EVERY: Duration = Duration::from_millis(250);

/// Longest pause between attempts while the database is unreachable.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// One ledger row.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// Unique per row: the request id, plus a suffix for a request's
    /// further rows.
    pub row_id: String,
    /// When the request ended, Unix milliseconds.
    pub at_ms: i64,
    /// `chatcmpl-…`, `resp-…`, `embd-…`.
    pub request_id: String,
    /// `chat.completions`, `responses` or `embeddings`.
    pub endpoint: &'static str,
    /// The caller's tenant.
    pub tenant: String,
    /// The API key's name (`anonymous`).
    pub api_key: String,
    /// The route.
    pub route: String,
    /// The model charged.
    pub model: String,
    /// `local`, or the provider of a `provider/model` name.
    pub provider: String,
    /// Tokens charged.
    pub tokens: Tokens,
    /// Cost, nano-USD (0 when unpriced).
    pub cost: i64,
    /// Whether the model has a price.
    pub priced: bool,
    /// `ok`, `cache_hit`, `cancelled` or `failed`.
    pub outcome: &'static str,
}

/// Where the ledger is written.
#[derive(Debug, Clone)]
pub enum Target {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// PostgreSQL at a URL, in a schema.
    Postgres {
        /// `postgres://…`.
        url: String,
        /// The schema.
        schema: String,
    },
}

impl Target {
    async fn open(&self) -> Result<moltbot_sql::Pool, moltbot_sql::OpenError> {
        match self {
            Self::Sqlite(path) => moltbot_sql::open_sqlite(path, 2, &SQLITE_MIGRATOR).await,
            Self::Postgres { url, schema } => {
                moltbot_sql::open_postgres(url, schema, 4, &PG_MIGRATOR).await
            }
        }
    }
}

/// The ledger: a bounded buffer and its writer.
#[derive(Debug)]
pub struct Ledger {
    target: Target,
    buffer: Mutex<VecDeque<Row>>,
    capacity: usize,
    wake: Notify,
    pool: tokio::sync::Mutex<Option<moltbot_sql::Pool>>,
    /// Rows taken from the buffer by a write not yet finished.
    in_flight: std::sync::atomic::AtomicUsize,
}

/// How `moltbot spend --by` groups rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    /// API key name.
    Key,
    /// Tenant.
    Tenant,
    /// Model.
    Model,
    /// Route.
    Route,
    /// Endpoint.
    Endpoint,
}

impl GroupBy {
    fn column(self) -> &'static str {
        match self {
            Self::Key => "api_key",
            Self::Tenant => "tenant",
            Self::Model => "model",
            Self::Route => "route",
            Self::Endpoint => "endpoint",
        }
    }
}

/// One group of a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReportRow {
    /// The key, tenant, model, route or endpoint.
    pub group: String,
    /// Requests charged.
    pub requests: i64,
    /// Prompt tokens (cached included).
    pub input_tokens: i64,
    /// Prompt tokens served from a provider's prompt cache.
    pub cached_tokens: i64,
    /// Completion tokens.
    pub output_tokens: i64,
    /// Cost in USD.
    pub cost_usd: f64,
    /// Requests to models without a price.
    pub unpriced_requests: i64,
}

fn lost(what: &str, e: impl std::fmt::Display) -> String {
    format!("spend ledger {what}: {e}")
}

impl Ledger {
    /// A ledger writing to `target`, buffering at most `capacity` rows.
    /// Opens nothing yet: [`Ledger::run`] opens the database (retrying
    /// until it can).
    pub fn new(target: Target, capacity: usize) -> Self {
        Self {
            target,
            buffer: Mutex::new(VecDeque::new()),
            capacity: capacity.max(1),
            wake: Notify::new(),
            pool: tokio::sync::Mutex::new(None),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Queues `row`; never waits. A full buffer drops its oldest row
    /// (counted).
    pub fn push(&self, row: Row) {
        let Ok(mut buffer) = self.buffer.lock() else {
            return;
        };
        if buffer.len() >= self.capacity {
            buffer.pop_front();
            metrics::LEDGER_ROWS.with_label_values(&["dropped"]).inc();
        }
        buffer.push_back(row);
        self.publish(buffer.len());
        if buffer.len() >= BATCH_ROWS {
            self.wake.notify_one();
        }
    }

    /// Rows not written yet (buffered, or in a write not finished).
    pub fn buffered(&self) -> usize {
        self.buffer.lock().map_or(0, |b| b.len())
            + self.in_flight.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Sets the buffered-rows gauge from the buffer's length.
    fn publish(&self, buffer_len: usize) {
        let in_flight = self.in_flight.load(std::sync::atomic::Ordering::SeqCst);
        metrics::LEDGER_BUFFERED.set((buffer_len + in_flight) as i64);
    }

    /// Writes buffered rows until the buffer is empty. Errors with the
    /// database's failure as text (the rows stay buffered).
    pub async fn flush(&self) -> Result<(), String> {
        let mut pool = self.pool.lock().await;
        if pool.is_none() {
            *pool = Some(
                self.target
                    .open()
                    .await
                    .map_err(|e| lost("unavailable", e))?,
            );
        }
        let Some(p) = pool.as_ref() else {
            return Err(lost("unavailable", "not open"));
        };
        loop {
            let batch: Vec<Row> = match self.buffer.lock() {
                Ok(mut b) => {
                    let n = b.len().min(BATCH_ROWS);
                    self.in_flight.store(n, std::sync::atomic::Ordering::SeqCst);
                    b.drain(..n).collect()
                }
                Err(_) => return Err(lost("buffer", "poisoned")),
            };
            if batch.is_empty() {
                self.publish(0);
                return Ok(());
            }
            let written = insert(p, &batch).await;
            self.in_flight.store(0, std::sync::atomic::Ordering::SeqCst);
            if let Err(e) = written {
                // Back at the front, in order; past the bound the oldest go.
                if let Ok(mut b) = self.buffer.lock() {
                    for row in batch.into_iter().rev() {
                        b.push_front(row);
                    }
                    while b.len() > self.capacity {
                        b.pop_front();
                        metrics::LEDGER_ROWS.with_label_values(&["dropped"]).inc();
                    }
                    self.publish(b.len());
                }
                return Err(lost("write failed", e));
            }
            metrics::LEDGER_ROWS
                .with_label_values(&["written"])
                .inc_by(batch.len() as u64);
            self.publish(self.buffer.lock().map_or(0, |b| b.len()));
        }
    }

    /// Writes buffered rows every [`FLUSH_EVERY`] until the process ends,
    /// backing off (up to 5 s) while the database fails; logs the first
    /// failure and the recovery.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = FLUSH_EVERY;
        let mut failing = false;
        loop {
            tokio::select! {
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(backoff) => {}
            }
            match self.flush().await {
                Ok(()) => {
                    if std::mem::replace(&mut failing, false) {
                        tracing::info!("spend ledger writes again");
                    }
                    backoff = FLUSH_EVERY;
                }
                Err(e) => {
                    if !std::mem::replace(&mut failing, true) {
                        tracing::warn!(error = %e, buffered = self.buffered(), "spend ledger rows buffered until the database answers");
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }

    /// Spend per group between `since_ms` and `until_ms` (Unix ms, `until`
    /// excluded), most expensive first, after writing what is buffered.
    /// Errors when the database cannot be read.
    pub async fn report(
        &self,
        by: GroupBy,
        since_ms: i64,
        until_ms: i64,
    ) -> Result<Vec<ReportRow>, String> {
        // Best effort: a report during an outage reads what was written.
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "spend report without the buffered rows");
        }
        let pool = self.pool.lock().await;
        let Some(pool) = pool.as_ref() else {
            return Err(lost("unavailable", "not open"));
        };
        let sql = format!(
            "SELECT {col}, COUNT(*), CAST(SUM(input_tokens) AS BIGINT), CAST(SUM(cached_tokens) AS BIGINT), \
             CAST(SUM(output_tokens) AS BIGINT), CAST(SUM(cost_nanousd) AS BIGINT), \
             CAST(SUM(CASE WHEN priced THEN 0 ELSE 1 END) AS BIGINT) \
             FROM spend_ledger WHERE at_ms >= $1 AND at_ms < $2 GROUP BY {col} ORDER BY 6 DESC, 1",
            col = by.column()
        );
        type Tuple = (String, i64, i64, i64, i64, i64, i64);
        let rows: Vec<Tuple> = moltbot_sql::on_pool!(pool, p => {
            sqlx::query_as(&sql).bind(since_ms).bind(until_ms).fetch_all(p).await
        })
        .map_err(|e| lost("read failed", e))?;
        Ok(rows
            .into_iter()
            .map(
                |(group, requests, input, cached, output, cost, unpriced)| ReportRow {
                    group,
                    requests,
                    input_tokens: input,
                    cached_tokens: cached,
                    output_tokens: output,
                    cost_usd: super::price::usd(cost),
                    unpriced_requests: unpriced,
                },
            )
            .collect())
    }
}

/// Inserts `rows` in one statement.
async fn insert(pool: &moltbot_sql::Pool, rows: &[Row]) -> Result<(), sqlx::Error> {
    const COLUMNS: usize = 15;
    let mut sql = String::from(
        "INSERT INTO spend_ledger (row_id, at_ms, request_id, endpoint, tenant, api_key, route, model, provider, \
         input_tokens, cached_tokens, output_tokens, cost_nanousd, priced, outcome) VALUES ",
    );
    for i in 0..rows.len() {
        if i > 0 {
            sql.push(',');
        }
        sql.push('(');
        for c in 0..COLUMNS {
            if c > 0 {
                sql.push(',');
            }
            sql.push_str(&format!("${}", i * COLUMNS + c + 1));
        }
        sql.push(')');
    }
    sql.push_str(" ON CONFLICT (row_id) DO NOTHING");
    moltbot_sql::on_pool!(pool, p => {
        let mut q = sqlx::query(&sql);
        for r in rows {
            q = q
                .bind(r.row_id.as_str())
                .bind(r.at_ms)
                .bind(r.request_id.as_str())
                .bind(r.endpoint)
                .bind(r.tenant.as_str())
                .bind(r.api_key.as_str())
                .bind(r.route.as_str())
                .bind(r.model.as_str())
                .bind(r.provider.as_str())
                .bind(i64::from(r.tokens.input))
                .bind(i64::from(r.tokens.cached))
                .bind(i64::from(r.tokens.output))
                .bind(r.cost)
                .bind(r.priced)
                .bind(r.outcome);
        }
        q.execute(p).await.map(|_| ())
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn row(id: &str, key: &str, cost: i64) -> Row {
        Row {
            row_id: id.to_owned(),
            at_ms: 1_000,
            request_id: id.to_owned(),
            endpoint: "chat.completions",
            tenant: "t".to_owned(),
            api_key: key.to_owned(),
            route: "default".to_owned(),
            model: "p/m".to_owned(),
            provider: "p".to_owned(),
            tokens: Tokens {
                input: 10,
                cached: 2,
                output: 5,
            },
            cost,
            priced: true,
            outcome: "ok",
        }
    }

    #[tokio::test]
    async fn rows_are_written_once_and_reported_by_group() {
        let dir = std::env::temp_dir().join(format!("moltbot-ledger-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let ledger = Ledger::new(Target::Sqlite(dir.join("spend.db")), 10);
        ledger.push(row("a", "app", 100));
        ledger.push(row("b", "app", 50));
        ledger.push(row("c", "other", 7));
        ledger.flush().await.unwrap();
        // The same row again (a retried batch) counts once.
        ledger.push(row("a", "app", 100));
        let report = ledger.report(GroupBy::Key, 0, 2_000).await.unwrap();
        assert_eq!(report.len(), 2);
        assert_eq!(report[0].group, "app");
        assert_eq!(report[0].requests, 2);
        assert_eq!(report[0].input_tokens, 20);
        assert_eq!(report[0].cached_tokens, 4);
        assert!((report[0].cost_usd - 150e-9).abs() < 1e-15);
        assert!(
            ledger
                .report(GroupBy::Key, 2_000, 3_000)
                .await
                .unwrap()
                .is_empty()
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_full_buffer_drops_its_oldest_rows() {
        let ledger = Ledger::new(Target::Sqlite(PathBuf::from("/nonexistent/x.db")), 2);
        for id in ["a", "b", "c"] {
            ledger.push(row(id, "k", 1));
        }
        let ids: Vec<String> = ledger
            .buffer
            .lock()
            .unwrap()
            .iter()
            .map(|r| r.row_id.clone())
            .collect();
        assert_eq!(ids, ["b", "c"]);
    }
}
