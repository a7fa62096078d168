//! Models loaded and unloaded while serving (`LoadModel`, `UnloadModel`):
//! the [`Loader`] keeps the settings the service started with (device,
//! precision, scheduler limits), estimates what a load needs against what
//! the process may still use, loads on a thread of its own and warms the
//! new model up before it is listed. The int4 weights come from the
//! quantised-weight cache next to the model when present
//! (`model/quantized.rs`), so a load of a cached model takes seconds.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use moltbot_proto::generation::v1 as pb;

use crate::{
    GenerationError,
    backend::{Backend, GenerateInput, LocalBackend},
    engine::{EngineConfig, Event},
    model::{Precision, WeightFormat},
    sampling::SamplingConfig,
    text::ChatMessage,
};

/// How the service loads a local model.
#[derive(Debug, Clone)]
pub struct Loader {
    /// Where model names resolve (`MOLTBOT_MODELS_DIR`).
    pub models_dir: PathBuf,
    /// The device every model runs on.
    pub device: tch::Device,
    /// Their numeric format.
    pub precision: Precision,
    /// Each model's scheduler limits (its KV cache included).
    pub engine: EngineConfig,
    /// `max_tokens` when a request gives none.
    pub default_max_tokens: usize,
    /// OpenMP threads of each scheduler (0: libtorch's default).
    pub threads: usize,
}

impl Loader {
    /// The prepared checkpoint `dir` names: an absolute path, or a name
    /// under the models directory. Errors with [`GenerationError::UnknownModel`]
    /// when it holds no `config.json` and safetensors weights.
    pub fn resolve(&self, dir: &str) -> Result<PathBuf, GenerationError> {
        let given = Path::new(dir);
        if dir.is_empty() || (!given.is_absolute() && dir.contains("..")) {
            return Err(GenerationError::InvalidArgument(format!(
                "dir {dir:?}: give a model directory name under the models directory or an absolute path"
            )));
        }
        let path = if given.is_absolute() {
            given.to_path_buf()
        } else {
            self.models_dir.join(given)
        };
        if !path.join("config.json").exists() || weight_bytes(&path) == 0 {
            return Err(GenerationError::UnknownModel(format!(
                "{} (not a prepared model: no config.json and safetensors weights; `moltbot models prepare`)",
                path.display()
            )));
        }
        Ok(path)
    }

    /// Bytes a load of `dir` is estimated to need once serving: its
    /// parameters (the checkpoint's bytes over its dtype's width, read from
    /// the first safetensors header) times their serving width — 4 bytes
    /// for f32, 2 for bf16/f16, 1.5 for int8 and 1 for int4 (whose
    /// embeddings stay dense: 1.24 GB served for the 0.5B model's 494 M
    /// parameters, BENCHMARKS.md) — plus the KV cache.
    pub fn needed_bytes(&self, dir: &Path) -> u64 {
        let stored = weight_bytes(dir) as f64;
        let params = stored / stored_width(dir);
        let width = match (self.precision.kind, self.precision.weights) {
            (_, WeightFormat::Int4 { .. }) => 1.0,
            (_, WeightFormat::Int8) => 1.5,
            (tch::Kind::Float, _) => 4.0,
            _ => 2.0,
        };
        (params * width) as u64 + self.engine.kv_cache_bytes as u64
    }

    /// Loads `dir` as `name` and starts its scheduler. Blocking (run it on
    /// a thread of its own). Errors with [`GenerationError::Load`].
    pub fn load(&self, dir: &Path, name: &str) -> Result<LocalBackend, GenerationError> {
        if self.threads > 0 {
            tch::set_num_threads(self.threads as i32);
        }
        LocalBackend::load_as(
            dir,
            name,
            self.device,
            self.precision,
            self.engine,
            self.default_max_tokens,
        )
    }
}

/// The served local models, by name (`None` while the first load runs).
pub type Served = RwLock<Option<crate::service::Models>>;

/// Longest UnloadModel wait when the request gives none.
pub const DEFAULT_UNLOAD_WAIT: Duration = Duration::from_secs(60);

/// LoadModel: resolves the directory, refuses a name served or loading and
/// a load that would not fit, loads on a thread of its own, warms up, and
/// only then adds the model to `served`. Errors: INVALID_ARGUMENT for a bad
/// name, NOT_FOUND for a directory that is not a prepared model,
/// ALREADY_EXISTS, FAILED_PRECONDITION (would not fit; a checkpoint that
/// does not load), and the warm-up's failure.
pub async fn load(
    loader: &Loader,
    served: &Served,
    loading: &Mutex<BTreeSet<String>>,
    request: pb::LoadModelRequest,
) -> Result<pb::LoadModelResponse, GenerationError> {
    let dir = loader.resolve(&request.dir)?;
    let name = if request.name.is_empty() {
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        request.name.clone()
    };
    // `/` names a remote model (`provider/model`); keep names to what a
    // metric label and a URL path take as is.
    if name.is_empty()
        || name.len() > 128
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        return Err(GenerationError::InvalidArgument(format!(
            "name {name:?}: use 1 to 128 letters, digits, '.', '_' or '-'"
        )));
    }
    {
        let taken = served
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|m| m.contains_key(&name));
        let mut pending = loading.lock().unwrap_or_else(|p| p.into_inner());
        if taken || !pending.insert(name.clone()) {
            return Err(GenerationError::AlreadyServed(name));
        }
    }
    let result = load_reserved(loader, served, &dir, &name, request.warmup_requests).await;
    loading
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&name);
    result
}

async fn load_reserved(
    loader: &Loader,
    served: &Served,
    dir: &Path,
    name: &str,
    warmup: u32,
) -> Result<pb::LoadModelResponse, GenerationError> {
    let needed = loader.needed_bytes(dir);
    fits(name, needed, available_bytes())?;
    let began = Instant::now();
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (job_loader, job_dir, job_name) = (loader.clone(), dir.to_path_buf(), name.to_owned());
    // A thread of its own, as at start-up (lib.rs): its OpenMP pool ends
    // with it.
    std::thread::Builder::new()
        .name(format!("load-{name}"))
        .spawn(move || {
            let _ = tx.send(job_loader.load(&job_dir, &job_name));
        })
        .map_err(|e| GenerationError::Tensor(format!("cannot start the loading thread: {e}")))?;
    let backend: Arc<dyn Backend> =
        Arc::new(rx.await.map_err(|_| {
            GenerationError::Tensor("the model's loading thread panicked".into())
        })??);
    let load_ms = began.elapsed().as_millis() as u64;
    let warmup_ms = warm_up(&backend, warmup).await?.as_millis() as u64;
    let model = crate::service::model_info(backend.as_ref());
    served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(Default::default)
        .insert(name.to_owned(), backend);
    tracing::info!(model = %name, dir = %dir.display(), load_ms, warmup_ms, "model loaded while serving");
    Ok(pb::LoadModelResponse {
        model: Some(model),
        load_ms,
        warmup_ms,
        rss_bytes: rss_bytes(),
        needed_bytes: needed,
    })
}

/// UnloadModel: takes `name` out of `served` at once (new requests get
/// NOT_FOUND), then waits up to `wait_ms` for its running and queued
/// sequences; its memory goes when the last request holding it ends.
/// Errors with NOT_FOUND for a name that is not a served local model.
pub async fn unload(
    served: &Served,
    request: pb::UnloadModelRequest,
) -> Result<pb::UnloadModelResponse, GenerationError> {
    let backend = served
        .write()
        .unwrap_or_else(|p| p.into_inner())
        .as_mut()
        .and_then(|m| m.remove(&request.name))
        .ok_or_else(|| GenerationError::UnknownModel(request.name.clone()))?;
    let busy = |b: &Arc<dyn Backend>| {
        let c = b.card();
        c.active_sequences + c.queued_requests
    };
    let at_start = busy(&backend);
    let wait = if request.wait_ms == 0 {
        DEFAULT_UNLOAD_WAIT
    } else {
        Duration::from_millis(u64::from(request.wait_ms))
    };
    let began = Instant::now();
    while busy(&backend) > 0 && began.elapsed() < wait {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let drained = busy(&backend) == 0;
    let waited_ms = began.elapsed().as_millis() as u64;
    drop(backend);
    tracing::info!(model = %request.name, at_start, waited_ms, drained, "model unloaded");
    Ok(pb::UnloadModelResponse {
        sequences_at_start: u32::try_from(at_start).unwrap_or(u32::MAX),
        waited_ms,
        drained,
    })
}

/// Bytes per element of the checkpoint in `dir`: the dtype of the first
/// tensor in its first safetensors file's header (`F32` 4, `BF16`/`F16`
/// 2); 2 when it cannot be read.
fn stored_width(dir: &Path) -> f64 {
    use std::io::Read;
    let first = std::fs::read_dir(dir).ok().and_then(|entries| {
        let mut files: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
            .collect();
        files.sort();
        files.into_iter().next()
    });
    let header = first.and_then(|path| {
        let mut file = std::fs::File::open(path).ok()?;
        let mut len = [0u8; 8];
        file.read_exact(&mut len).ok()?;
        let len = u64::from_le_bytes(len).min(100 << 20);
        let mut json = vec![0u8; usize::try_from(len).ok()?];
        file.read_exact(&mut json).ok()?;
        serde_json::from_slice::<serde_json::Value>(&json).ok()
    });
    let dtype = header.as_ref().and_then(|h| {
        h.as_object()?
            .iter()
            .filter(|(k, _)| *k != "__metadata__")
            .find_map(|(_, t)| t["dtype"].as_str().map(str::to_owned))
    });
    match dtype.as_deref() {
        Some("F32") => 4.0,
        Some("F64") => 8.0,
        _ => 2.0,
    }
}

/// Total size of the safetensors files in `dir`, bytes (0 when none).
pub fn weight_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Memory the process may still take, bytes: the kernel's `MemAvailable`
/// (`/proc/meminfo`), bounded by the cgroup v2 limit left
/// (`memory.max - memory.current`, as in a Kubernetes pod). `None` where
/// neither can be read.
pub fn available_bytes() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let read = |f: &str| {
        std::fs::read_to_string(format!("/sys/fs/cgroup/{f}"))
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
    };
    let cgroup = match (read("memory.max"), read("memory.current")) {
        (Some(max), Some(current)) => Some(max.saturating_sub(current)),
        _ => None,
    };
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether `needed` bytes fit in `available` (unknown availability fits).
/// Errors with [`GenerationError::WontFit`] naming both figures.
pub fn fits(model: &str, needed: u64, available: Option<u64>) -> Result<(), GenerationError> {
    match available {
        Some(available) if needed > available => Err(GenerationError::WontFit {
            model: model.to_owned(),
            needed_bytes: needed,
            available_bytes: available,
        }),
        _ => Ok(()),
    }
}

/// The process's resident memory, bytes (`/proc/self/statm`; 0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Runs `n` short greedy generations (at least one) on `backend`, so its
/// first real request meets warm kernels and allocator pools. Errors with
/// the first generation's failure: a model that cannot answer is not
/// listed.
pub async fn warm_up(backend: &Arc<dyn Backend>, n: u32) -> Result<Duration, GenerationError> {
    let began = Instant::now();
    for _ in 0..n.max(1) {
        let mut rx = backend
            .generate(GenerateInput {
                messages: vec![ChatMessage {
                    role: "user".into(),
                    content: "Say hello.".into(),
                    ..Default::default()
                }],
                max_tokens: Some(4),
                sampling: SamplingConfig::default(),
                stop: Vec::new(),
                response_format: None,
                tools: None,
                logprobs: None,
                received: Instant::now(),
                affinity: String::new(),
            })
            .await?;
        while let Some(event) = rx.recv().await {
            if let Event::Failed(e) = event {
                return Err(e);
            }
        }
    }
    Ok(began.elapsed())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_load_that_does_not_fit_is_refused_with_the_figures() {
        let err = fits("big", 3 << 30, Some(1 << 30)).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("3072 MiB") && text.contains("1024 MiB"),
            "{text}"
        );
        assert!(fits("small", 1 << 20, Some(1 << 30)).is_ok());
        assert!(fits("unknown", u64::MAX, None).is_ok());
    }

    #[test]
    fn this_machine_reports_memory() {
        assert!(available_bytes().is_some_and(|b| b > 0));
        assert!(rss_bytes() > 0);
    }
}
