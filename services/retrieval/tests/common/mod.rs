//! Shared by the retrieval integration tests: the service on a real socket on
//! an ephemeral port over a given store backend, restartable on the same data.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code

use std::{path::PathBuf, sync::Arc, time::Duration};

use clap::Parser;
use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, DeleteCollectionRequest, Document, SearchRequest, SearchResponse,
    UpsertRequest, retrieval_service_client::RetrievalServiceClient, search_request::Query,
};
use moltbot_retrieval::{Args, state::State};
use tonic::transport::Channel;

/// The PostgreSQL of the store tests (`DATABASE_URL`, default the machine's
/// `test` database).
pub fn database_url() -> String {
    std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// Directory of prepared models.
pub fn models_dir() -> PathBuf {
    std::env::var("MOLTBOT_MODELS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../var/models"))
}

/// A collection name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{prefix}-{}-{nanos}", std::process::id())
}

/// Store backends every behavioural test runs on.
pub const BACKENDS: [&str; 2] = ["sqlite", "postgres"];

/// The service's arguments for `backend` over `data_dir`; HNSW everywhere
/// (exact search only when asked).
pub fn args(backend: &str, data_dir: &std::path::Path) -> Args {
    let mut argv = vec![
        "moltbot-retrieval".to_owned(),
        "--store".to_owned(),
        backend.to_owned(),
        "--data-dir".to_owned(),
        data_dir.display().to_string(),
        "--models-dir".to_owned(),
        models_dir().display().to_string(),
        "--exact-below".to_owned(),
        "0".to_owned(),
    ];
    if backend == "postgres" {
        // A schema of this data directory's own (kept across the restarts of
        // one test, apart from every other test and run).
        argv.push("--database-url".to_owned());
        argv.push(database_url());
        argv.push("--pg-schema".to_owned());
        let tag: String = data_dir
            .file_name()
            .unwrap()
            .to_string_lossy()
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        argv.push(format!("t_{}", &tag[tag.len().saturating_sub(50)..]));
    }
    Args::parse_from(argv)
}

/// Drops what a test left: its data directory and, on PostgreSQL, its schema.
pub async fn cleanup(args: &Args) {
    if args.store == Some(moltbot_retrieval::Backend::Postgres) {
        let pool = sqlx::PgPool::connect(&database_url()).await.unwrap();
        sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", args.pg_schema))
            .execute(&pool)
            .await
            .unwrap();
    }
    let _ = std::fs::remove_dir_all(&args.data_dir);
}

/// A test document: id, text, metadata pairs.
pub type Doc = (String, String, Vec<(&'static str, &'static str)>);

/// A running in-process retrieval service and a client connected to it.
pub struct Harness {
    pub client: RetrievalServiceClient<Channel>,
    pub state: Arc<State>,
    server: moltbot_runtime::grpc::LocalServer,
}

impl Harness {
    /// Loads the service (store, encoder, indexes) and serves it on
    /// `127.0.0.1:0`.
    pub async fn start(args: &Args) -> Self {
        let state = moltbot_retrieval::load(args).await.unwrap();
        let server = moltbot_runtime::grpc::LocalServer::start(
            moltbot_retrieval::grpc_service(state.clone()),
            async { Ok(()) },
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        Self {
            client: RetrievalServiceClient::new(server.channel().await.unwrap()),
            state,
            server,
        }
    }

    /// Stops the server (surfacing its error or panic), then snapshots what
    /// changed, as the binary does on SIGTERM.
    pub async fn shutdown(self) {
        self.server
            .shutdown()
            .await
            .expect("server failed or panicked");
        self.state.snapshot_dirty();
    }

    pub async fn create(&mut self, name: &str) {
        self.client
            .create_collection(CreateCollectionRequest {
                name: name.to_owned(),
                chunking: None,
            })
            .await
            .unwrap();
    }

    pub async fn drop_collection(&mut self, name: &str) {
        self.client
            .delete_collection(DeleteCollectionRequest {
                name: name.to_owned(),
            })
            .await
            .unwrap();
    }

    pub async fn upsert(&mut self, collection: &str, docs: Vec<Doc>) -> (u32, u32) {
        let r = self
            .client
            .upsert(UpsertRequest {
                collection: collection.to_owned(),
                documents: docs
                    .into_iter()
                    .map(|(id, text, meta)| Document {
                        id,
                        text,
                        metadata: meta
                            .into_iter()
                            .map(|(k, v)| (k.to_owned(), v.to_owned()))
                            .collect(),
                    })
                    .collect(),
            })
            .await
            .unwrap()
            .into_inner();
        (r.documents, r.chunks)
    }

    pub async fn search_text(&mut self, collection: &str, text: &str, k: u32) -> SearchResponse {
        self.client
            .search(SearchRequest {
                collection: collection.to_owned(),
                query: Some(Query::Text(text.to_owned())),
                top_k: k,
                filter: Default::default(),
                min_score: None,
                exact: false,
            })
            .await
            .unwrap()
            .into_inner()
    }
}
