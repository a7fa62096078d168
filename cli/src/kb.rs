//! `moltbot kb ingest PATH --collection NAME`: ingests `.md` and `.txt` files
//! (a file, or every one under a directory) into a retrieval collection,
//! creating it when missing. Each file is one document whose id is its path
//! relative to PATH's parent; re-ingesting a file replaces its chunks.

use std::path::{Path, PathBuf};

use moltbot_proto::retrieval::v1::{
    CreateCollectionRequest, Document, ListCollectionsRequest, UpsertRequest,
    retrieval_service_client::RetrievalServiceClient,
};
use tonic::transport::Channel;

use crate::CliError;

/// Flags of `moltbot kb`.
#[derive(Debug, clap::Args)]
pub struct KbArgs {
    #[command(subcommand)]
    command: KbCommand,
}

#[derive(Debug, clap::Subcommand)]
enum KbCommand {
    /// Ingest `.md`/`.txt` files into a collection.
    Ingest(IngestArgs),
}

/// Flags of `moltbot kb ingest`.
#[derive(Debug, clap::Args)]
pub struct IngestArgs {
    /// A file or a directory (searched recursively, skipping hidden
    /// directories, `target` and `node_modules`).
    pub paths: Vec<PathBuf>,
    /// Collection to ingest into (created when missing).
    #[arg(long, default_value = "docs")]
    pub collection: String,
    /// The retrieval service.
    #[arg(
        long,
        env = "MOLTBOT_RETRIEVAL_URL",
        default_value = "https://127.0.0.1:50053"
    )]
    pub retrieval_url: String,
    /// Data directory holding `moltbot up`'s operator certificate
    /// (`pki/operator.pem`), used unless MOLTBOT_TLS_CERT is set.
    #[arg(long, env = "MOLTBOT_DATA_DIR", default_value = "var/data")]
    pub data_dir: PathBuf,
}

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    if path.is_file() {
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("md" | "txt")
        ) {
            out.push(path.to_path_buf());
        }
        return Ok(());
    }
    let mut entries: Vec<_> = std::fs::read_dir(path)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') || name == "target" || name == "node_modules" {
            continue;
        }
        collect(&e.path(), out)?;
    }
    Ok(())
}

fn document_id(root: &Path, file: &Path) -> String {
    let base = if root.is_file() {
        root.parent().unwrap_or(Path::new(""))
    } else {
        root
    };
    file.strip_prefix(base)
        .unwrap_or(file)
        .to_string_lossy()
        .into_owned()
}

/// Creates `collection` unless it exists.
pub async fn ensure_collection(
    client: &mut RetrievalServiceClient<Channel>,
    collection: &str,
) -> Result<bool, CliError> {
    let listed = client
        .list_collections(ListCollectionsRequest {})
        .await
        .map_err(|s| CliError::Setup(format!("retrieval: {}", s.message())))?
        .into_inner();
    if let Some(c) = listed.collections.iter().find(|c| c.name == collection) {
        return Ok(c.document_count > 0);
    }
    match client
        .create_collection(CreateCollectionRequest {
            name: collection.to_owned(),
            chunking: None,
        })
        .await
    {
        Ok(_) => Ok(false),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(false),
        Err(s) => Err(CliError::Setup(format!("retrieval: {}", s.message()))),
    }
}

/// Ingests `paths` into `collection` at `url`; returns (documents, chunks).
pub async fn ingest(
    url: &str,
    collection: &str,
    paths: &[PathBuf],
) -> Result<(u32, u32), CliError> {
    let channel = crate::mesh::connect("retrieval", url).await?;
    let mut client = RetrievalServiceClient::new(channel).max_decoding_message_size(64 << 20);
    ensure_collection(&mut client, collection).await?;
    let (mut docs, mut chunks) = (0, 0);
    for root in paths {
        let mut files = Vec::new();
        collect(root, &mut files)
            .map_err(|e| CliError::Setup(format!("cannot read {}: {e}", root.display())))?;
        for file in files {
            let text = std::fs::read_to_string(&file)
                .map_err(|e| CliError::Setup(format!("cannot read {}: {e}", file.display())))?;
            if text.trim().is_empty() {
                continue;
            }
            let id = document_id(root, &file);
            let title = text
                .lines()
                .find(|l| l.starts_with('#'))
                .map(|l| l.trim_start_matches('#').trim().to_owned())
                .unwrap_or_else(|| id.clone());
            let response = client
                .upsert(UpsertRequest {
                    collection: collection.to_owned(),
                    documents: vec![Document {
                        id: id.clone(),
                        text,
                        metadata: [("path".to_owned(), id.clone()), ("title".to_owned(), title)]
                            .into_iter()
                            .collect(),
                    }],
                })
                .await
                .map_err(|s| CliError::Setup(format!("ingesting {id}: {}", s.message())))?
                .into_inner();
            println!("{id}: {} chunks", response.chunks);
            docs += response.documents;
            chunks += response.chunks;
        }
    }
    Ok((docs, chunks))
}

/// Runs `moltbot kb`.
pub async fn run(args: KbArgs) -> Result<(), CliError> {
    match args.command {
        KbCommand::Ingest(a) => {
            crate::mesh::install_tls(&a.data_dir)?;
            if a.paths.is_empty() {
                return Err(CliError::Setup(
                    "give at least one file or directory to ingest".into(),
                ));
            }
            let (docs, chunks) = ingest(&a.retrieval_url, &a.collection, &a.paths).await?;
            println!(
                "ingested {docs} documents ({chunks} chunks) into `{}`",
                a.collection
            );
            Ok(())
        }
    }
}
