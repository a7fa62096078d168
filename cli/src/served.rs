//! `moltbot models load|unload` and the served half of `moltbot models
//! list`: the generation service's `LoadModel`, `UnloadModel` and
//! `ListModels` (operator RPCs: the operator certificate `moltbot up`
//! writes, or the admin token).

use std::path::Path;

use moltbot_proto::generation::v1::{
    ListModelsRequest, LoadModelRequest, ModelInfo, UnloadModelRequest,
    generation_service_client::GenerationServiceClient,
};

use crate::CliError;

async fn client(
    url: &str,
    data_dir: &Path,
) -> Result<GenerationServiceClient<tonic::transport::Channel>, CliError> {
    crate::mesh::install_tls(data_dir)?;
    Ok(GenerationServiceClient::new(
        crate::mesh::connect("generation", url).await?,
    ))
}

/// `msg`, with the admin token when there is one (the operator
/// certificate alone suffices under mutual TLS).
fn operator<T>(data_dir: &Path, msg: T) -> Result<tonic::Request<T>, CliError> {
    match crate::mesh::admin_token(data_dir) {
        Some(token) => crate::mesh::with_admin_token(&token, msg),
        None => Ok(tonic::Request::new(msg)),
    }
}

fn status(e: tonic::Status) -> CliError {
    CliError::Setup(format!(
        "generation answered {:?}: {}",
        e.code(),
        e.message()
    ))
}

/// The models generation serves now. Errors when it cannot be reached.
pub async fn list(url: &str, data_dir: &Path) -> Result<Vec<ModelInfo>, CliError> {
    Ok(client(url, data_dir)
        .await?
        .list_models(ListModelsRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .models)
}

/// Loads the prepared model `dir` as `name` (empty: the directory's name)
/// after `warmup` warm-up generations, and prints the figures.
pub async fn load(
    url: &str,
    data_dir: &Path,
    dir: &str,
    name: &str,
    warmup: u32,
) -> Result<(), CliError> {
    let r = client(url, data_dir)
        .await?
        .load_model(operator(
            data_dir,
            LoadModelRequest {
                dir: dir.to_owned(),
                name: name.to_owned(),
                warmup_requests: warmup,
            },
        )?)
        .await
        .map_err(status)?
        .into_inner();
    let model = r.model.unwrap_or_default();
    println!(
        "{} loaded on {} ({}) in {:.1} s, warmed up in {:.1} s; estimated need {} MiB, process RSS now {} MiB",
        model.name,
        model.device,
        model.dtype,
        r.load_ms as f64 / 1000.0,
        r.warmup_ms as f64 / 1000.0,
        r.needed_bytes >> 20,
        r.rss_bytes >> 20
    );
    Ok(())
}

/// Stops serving `name`, waiting up to `wait_ms` for its sequences.
pub async fn unload(url: &str, data_dir: &Path, name: &str, wait_ms: u32) -> Result<(), CliError> {
    let r = client(url, data_dir)
        .await?
        .unload_model(operator(
            data_dir,
            UnloadModelRequest {
                name: name.to_owned(),
                wait_ms,
            },
        )?)
        .await
        .map_err(status)?
        .into_inner();
    if r.drained {
        println!(
            "{name} unloaded: {} sequence(s) were running, finished in {} ms",
            r.sequences_at_start, r.waited_ms
        );
    } else {
        println!(
            "{name} takes no new request; {} sequence(s) still running after {} ms keep it in memory until they end",
            r.sequences_at_start, r.waited_ms
        );
    }
    Ok(())
}
