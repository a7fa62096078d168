//! `moltbot-understanding train` (and `moltbot intents train`): fine-tunes
//! the encoder with the intent and domain heads, in Rust with tch, and
//! chooses the out-of-scope rule.
//!
//! Data: any format [`crate::dataset`] reads (CSV/TSV, JSONL, Rasa NLU
//! YAML, CLINC150 JSON), with its hierarchy and validation split resolved
//! there. Model: the MiniLM encoder, one GELU hidden layer over its 384-d
//! sentence embedding and two softmax heads — the data's intents + `oos`,
//! and its domains (trained on in-scope texts only) — fitted jointly with
//! AdamW (label smoothing 0.1 on the intent loss) and stopped early on the
//! head's validation accuracy ([`early_stop`]), or the heads alone on the
//! frozen encoder with `--fine-tune-epochs 0`. The domain is predicted
//! hierarchically: the domain head's probabilities plus the intent head's
//! probability mass per domain. Outlier exposure (Hendrycks et al., ICLR
//! 2019): synthetic out-of-scope requests (`--synthetic-oos`, made once by
//! `scripts/synth_oos.py` with the generation model, decontaminated against
//! every CLINC150 evaluation text) are trained on as `oos`, but for a
//! seeded quarter held back for validation. The out-of-scope rule
//! ([`rule`]) is chosen on validation texts only (the data's, plus the
//! held-back synthetic ones), and its figures are cross-validated for a
//! held-out estimate. Deterministic for a seed and a thread count. Writes
//! `head.safetensors`, `labels.json`, `metrics.json` (validation and
//! held-out figures), the fine-tuned `encoder/` and the nearest-neighbour
//! tables (`knn.safetensors`, `base_knn.safetensors`).

use std::{collections::HashMap, path::PathBuf};

use moltbot_encoder::{Encoder, Precision};
use serde::Serialize;
use tch::{Device, Kind, Tensor, nn, nn::Module, nn::OptimizerConfig};

use crate::{
    dataset::{Dataset, Format, Hierarchy, OOS, Source, split},
    head::{BaseKnnRule, Labels},
};

pub mod early_stop;
pub mod progress;
pub mod rule;

use progress::{Progress, ProgressMode};

/// A path flag where an empty value means "none" (clap's `PathBuf`
/// parser refuses an empty value).
fn optional_path(s: &str) -> Result<PathBuf, std::convert::Infallible> {
    Ok(PathBuf::from(s))
}

/// Flags of `moltbot-understanding train` (and `moltbot intents train`).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "moltbot-understanding train",
    about = "Train an intent head on your data (CSV/TSV, JSONL, Rasa NLU YAML or CLINC150 JSON)"
)]
pub struct TrainArgs {
    /// The labelled data: CSV/TSV (`text,label[,domain]`), JSONL
    /// (`{"text","intent","domain"?}`), Rasa NLU YAML, or CLINC150 JSON
    /// (`crate::dataset` lists the accepted column and key names).
    #[arg(default_value = "services/understanding/data/clinc150/data_full_train_val.json")]
    pub data: PathBuf,
    /// The data's format; default: by its extension.
    #[arg(long, value_enum)]
    pub format: Option<Format>,
    /// Validation data in the same format; default: the data's own split
    /// (CLINC150) or a stratified one made with `--val-share`.
    #[arg(long)]
    pub val: Option<PathBuf>,
    /// Out-of-scope example texts, one per line, split like the rest.
    #[arg(long)]
    pub oos: Option<PathBuf>,
    /// A domain map `{domain: [intent, …]}`; default: `domains.json` beside
    /// CLINC150 JSON, else the hierarchy in the data (`--hierarchy`).
    #[arg(long)]
    pub domains: Option<PathBuf>,
    /// Where domains come from: `auto` (a domain column or map, else
    /// `domain/intent` labels, else `domain.intent`, else one domain),
    /// `column`, `slash`, `dot` or `none`.
    #[arg(long, value_enum, default_value = "auto")]
    pub hierarchy: Hierarchy,
    /// The label out-of-scope rows carry in the data.
    #[arg(long, default_value = "oos")]
    pub oos_label: String,
    /// Share of every label's examples held out for validation when the
    /// data has no split and `--val` is not given.
    #[arg(long, default_value_t = 0.1)]
    pub val_share: f64,
    /// Dataset name, the start of the model id; default: the data file's
    /// stem.
    #[arg(long)]
    pub name: Option<String>,
    /// Where to write the head; default:
    /// `$MOLTBOT_MODELS_DIR/intent-heads/<model id>`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// The sentence encoder directory.
    /// Default: `<models dir>/all-minilm-l6-v2`.
    #[arg(long, env = "MOLTBOT_ENCODER_DIR")]
    pub encoder_dir: Option<PathBuf>,
    /// Random seed (initialisation, shuffling, the validation splits).
    #[arg(long, default_value_t = 7)]
    pub seed: i64,
    /// Training epochs of the head alone (`--fine-tune-epochs 0`).
    #[arg(long, default_value_t = 40)]
    pub epochs: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 1024)]
    pub hidden: i64,
    /// Epochs of joint encoder + head fine-tuning; 0 trains the head on the
    /// frozen encoder for `--epochs` instead.
    #[arg(long, default_value_t = 4)]
    pub fine_tune_epochs: usize,
    /// In-scope validation accuracy (a share) the out-of-scope rule must
    /// keep when the probability threshold alone reaches it; recall is
    /// maximised within it.
    #[arg(long, default_value_t = 0.95)]
    pub min_in_scope_accuracy: f64,
    /// libtorch threads while training; 0: every core. The result is
    /// deterministic for a seed and a thread count on one kind of CPU: a
    /// different count sums in another order, which moves the fine-tuned
    /// weights and the validation figures by a few tenths of a point.
    #[arg(long, env = "MOLTBOT_TRAIN_THREADS", default_value_t = 0)]
    pub threads: usize,
    /// Learning rate of the encoder while fine-tuning.
    #[arg(long, default_value_t = 5e-5)]
    pub encoder_lr: f64,
    /// Synthetic out-of-scope texts, one per line (`#` starts a comment
    /// line): trained on as `oos` (outlier exposure), less the share
    /// `--synthetic-val-share` kept for choosing the out-of-scope rule.
    /// Empty (`--synthetic-oos ""`): none.
    #[arg(
        long,
        value_parser = optional_path,
        default_value = "services/understanding/data/synthetic_oos/synthetic_oos.txt"
    )]
    pub synthetic_oos: PathBuf,
    /// Share of the synthetic out-of-scope texts held back from training
    /// and added to the out-of-scope validation texts, so the rule is
    /// chosen on out-of-scope texts the head has not seen even when the
    /// data has none of its own.
    #[arg(long, default_value_t = 0.25)]
    pub synthetic_val_share: f64,
    /// Weight of each `oos` training text in the intent loss, relative to
    /// an in-scope one (1: plain cross-entropy).
    #[arg(long, default_value_t = 1.0)]
    pub oos_weight: f64,
    /// Label smoothing of the intent loss (Szegedy et al., "Rethinking the
    /// Inception Architecture", CVPR 2016): the target puts this share of
    /// its mass evenly on every class (0: none). 0.1 by default: chosen on
    /// validation accuracy on CLINC150 open-intent (0.9622 → 0.9699;
    /// BENCHMARKS.md).
    #[arg(long, default_value_t = 0.1)]
    pub label_smoothing: f64,
    /// Early stopping: fine-tuning stops once this many epochs in a row
    /// bring no gain in the head's validation accuracy, and the best
    /// epoch's weights are kept (0: every epoch runs; the best is still
    /// kept). Costs one pass over the validation texts per epoch.
    /// 2 by default: with 1, a tie after the first epoch (common on small
    /// validation sets) stops fine-tuning early — on CLINC150 open-intent
    /// that cost 2.5 points of accuracy (BENCHMARKS.md).
    #[arg(long, default_value_t = 2)]
    pub patience: usize,
    /// Out-of-scope probe texts, one per line: requests outside every
    /// intent of the data, flagged or not by the chosen rule and reported
    /// as `probe_out_of_scope_recall`. They choose nothing. Empty
    /// (`--probes ""`): none.
    #[arg(
        long,
        value_parser = optional_path,
        default_value = "services/understanding/data/probes/out_of_scope.txt"
    )]
    pub probes: PathBuf,
    /// Folds of the cross-validated (held-out) estimate of the rule's
    /// figures: the rule is chosen on all folds but one and scored on that
    /// one, in turn (0 or 1: no estimate).
    #[arg(long, default_value_t = 5)]
    pub cv_folds: usize,
    /// Arithmetic of the embeddings the decision rule is chosen on (and,
    /// with `--fine-tune-epochs 0`, the head trained on): `auto`, `f32` or
    /// `bf16`, as the service will run (`MOLTBOT_ENCODER_PRECISION`).
    /// Fine-tuning itself is always f32.
    #[arg(
        long,
        env = "MOLTBOT_ENCODER_PRECISION",
        default_value = "auto",
        value_parser = Precision::parse_cpu
    )]
    pub precision: Precision,
    /// How training shows progress: `auto` (a bar on a terminal, else a
    /// line every 30 s), `bar`, `lines`, or `json` (one object a line, for
    /// `moltbot up`).
    #[arg(long, env = "MOLTBOT_PROGRESS", value_enum, default_value = "auto")]
    pub progress: ProgressMode,
    /// Models directory; the default `--out` is under it.
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: PathBuf,
}

impl TrainArgs {
    /// The base encoder directory.
    pub fn encoder(&self) -> PathBuf {
        crate::encoder_dir(&self.models_dir, self.encoder_dir.as_deref())
    }

    /// The dataset source these flags describe.
    pub fn source(&self) -> Source {
        Source {
            data: self.data.clone(),
            format: self.format,
            val: self.val.clone(),
            oos: self.oos.clone(),
            domains: self.domains.clone(),
            hierarchy: self.hierarchy,
            oos_label: self.oos_label.clone(),
            val_share: self.val_share,
            seed: self.seed as u64,
            name: self.name.clone(),
        }
    }

    /// Every setting that changes the trained head, as text (hashed into
    /// the model id with the data).
    fn settings(&self) -> String {
        format!(
            "seed={} epochs={} hidden={} fine_tune_epochs={} min_acc={} threads={} encoder_lr={} synthetic_val_share={} oos_weight={} label_smoothing={} patience={} val_share={} hierarchy={:?} oos_label={} precision={}",
            self.seed,
            self.epochs,
            self.hidden,
            self.fine_tune_epochs,
            self.min_in_scope_accuracy,
            self.threads,
            self.encoder_lr,
            self.synthetic_val_share,
            self.oos_weight,
            self.label_smoothing,
            self.patience,
            self.val_share,
            self.hierarchy,
            self.oos_label,
            self.precision
        )
    }
}

/// The model id of a head trained on `dataset` with `args`:
/// `<dataset name>-<first 12 hex digits of SHA-256 over the data files,
/// the synthetic out-of-scope file and the settings>`. The same data and
/// settings give the same id; any change gives another.
pub fn model_id(dataset: &Dataset, args: &TrainArgs) -> Result<String, String> {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let synthetic = (!args.synthetic_oos.as_os_str().is_empty()).then_some(&args.synthetic_oos);
    for file in dataset.files.iter().chain(synthetic) {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(&bytes);
    }
    hash.update(args.settings().as_bytes());
    let digest = hash.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    Ok(format!("{}-{hex}", dataset.name))
}

/// The rule's figures on texts it was not chosen on: k-fold
/// cross-validation over the validation texts (`rule::cross_validate`).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize)]
pub struct HeldOut {
    /// In-scope accuracy, pooled over the held-out folds.
    pub in_scope_accuracy: f64,
    /// Out-of-scope recall, pooled over the held-out folds.
    pub out_of_scope_recall: f64,
    /// Out-of-scope precision, pooled over the held-out folds.
    pub out_of_scope_precision: f64,
    /// Folds.
    pub folds: usize,
}

/// Validation figures written to `metrics.json`.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Metrics {
    /// The head's model id (`labels.json`).
    #[serde(default)]
    pub model_id: String,
    /// Where the head was written.
    #[serde(default)]
    pub out_dir: String,
    /// Dataset name.
    #[serde(default)]
    pub dataset: String,
    /// In-scope intents.
    #[serde(default)]
    pub intents: usize,
    /// Domains.
    #[serde(default)]
    pub domains: usize,
    /// How the validation split came about.
    #[serde(default)]
    pub val_source: serde_json::Value,
    /// The same figures measured on validation texts the rule was not
    /// chosen on (cross-validated); `None` with `--cv-folds` 0 or 1.
    #[serde(default)]
    pub held_out: Option<HeldOut>,
    /// Share of in-scope validation texts with the right intent and not
    /// flagged out of scope.
    pub in_scope_accuracy: f64,
    /// Share of out-of-scope validation texts flagged out of scope.
    pub out_of_scope_recall: f64,
    /// Share of flagged texts that are really out of scope.
    pub out_of_scope_precision: f64,
    /// Share of in-scope validation texts with the right domain.
    pub domain_accuracy: f64,
    /// The chosen out-of-scope threshold.
    pub threshold: f32,
    /// The chosen nearest-neighbour similarity threshold (0 = rule off).
    #[serde(default)]
    pub knn_threshold: f32,
    /// Fine-tuned nearest-neighbour similarity under which the base encoder
    /// gives a second opinion (0 = cascade off).
    #[serde(default)]
    pub base_knn_gate: f32,
    /// Base-space nearest-neighbour similarity threshold of the cascade.
    #[serde(default)]
    pub base_knn_threshold: f32,
    /// Share of in-scope validation texts under the gate (they need a
    /// second forward pass).
    #[serde(default)]
    pub second_pass_share: f64,
    /// Arithmetic of the embeddings the figures were computed on (`f32`,
    /// `bf16`).
    #[serde(default)]
    pub precision: String,
    /// Training texts of the data (in scope and out of scope; for CLINC150
    /// `train` + `oos_train`).
    pub train_texts: usize,
    /// Synthetic out-of-scope texts trained on (`--synthetic-oos`).
    #[serde(default)]
    pub synthetic_oos_texts: usize,
    /// Synthetic out-of-scope texts held back for validation
    /// (`--synthetic-val-share`); counted in `val_texts`.
    #[serde(default)]
    pub synthetic_oos_val_texts: usize,
    /// Out-of-scope probe texts (`--probes`).
    #[serde(default)]
    pub probe_texts: usize,
    /// Share of the probe texts the chosen rule flags (`None`: no probes).
    #[serde(default)]
    pub probe_out_of_scope_recall: Option<f64>,
    /// Validation texts (in-scope + out-of-scope, synthetic included).
    pub val_texts: usize,
    /// The seed.
    pub seed: i64,
    /// libtorch threads used.
    #[serde(default)]
    pub threads: usize,
    /// The head's validation accuracy after each fine-tuning epoch run
    /// (early stopping; the best epoch's weights are kept).
    #[serde(default)]
    pub val_accuracy_by_epoch: Vec<f64>,
    /// Wall-clock seconds from reading the data to writing the head.
    #[serde(default)]
    pub train_seconds: f64,
}

type Pairs = Vec<(String, String)>;

/// Non-empty, non-comment lines of `path` (none when `path` is empty);
/// `flag` names the option in the error.
fn lines(path: &std::path::Path, flag: &str) -> Result<Vec<String>, String> {
    if path.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    Ok(crate::dataset::text_lines(path, OOS)
        .map_err(|e| format!("{e} ({flag} \"\" for none)"))?
        .into_iter()
        .map(|r| r.text)
        .collect())
}

fn texts(pairs: &Pairs) -> Vec<&str> {
    pairs.iter().map(|(t, _)| t.as_str()).collect()
}

fn embed_all(encoder: &Encoder, texts: &[&str]) -> Result<Tensor, String> {
    let mut rows = Vec::with_capacity(texts.len() * encoder.dimension());
    for chunk in texts.chunks(64) {
        for e in encoder.embed(chunk).map_err(|e| e.to_string())? {
            rows.extend(e.vector);
        }
    }
    Tensor::f_from_slice(&rows)
        .and_then(|t| t.f_view([texts.len() as i64, encoder.dimension() as i64]))
        .map_err(|e| e.to_string())
}

/// Writes the fine-tuned encoder to `dir`: `base`'s files with the weights
/// of `vars`.
fn save_encoder(
    vars: &nn::VarStore,
    base: &std::path::Path,
    dir: &std::path::Path,
) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    for entry in std::fs::read_dir(base).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        let name = entry.file_name();
        if entry.path().is_file() && name != "model.safetensors" {
            std::fs::copy(entry.path(), dir.join(&name)).map_err(|e| e.to_string())?;
        }
    }
    vars.save(dir.join("model.safetensors"))
        .map_err(|e| e.to_string())
}

/// Sets libtorch's intra-op threads: `n`, or every core for 0. Returns
/// the count set.
pub fn set_threads(n: usize) -> usize {
    let threads = if n == 0 {
        std::thread::available_parallelism().map_or(1, usize::from)
    } else {
        n
    };
    tch::set_num_threads(threads as i32);
    threads
}

/// Trains and writes the head. Errors with a message naming what is wrong
/// (a bad data row names its file and line).
pub fn run(args: &TrainArgs) -> Result<Metrics, String> {
    let started = std::time::Instant::now();
    let precision = args.precision;
    let threads = set_threads(args.threads);
    tch::manual_seed(args.seed);
    let dataset = crate::dataset::load(&args.source()).map_err(|e| e.to_string())?;
    for note in &dataset.notes {
        eprintln!("train: {note}");
    }
    let model_id = model_id(&dataset, args)?;
    let out_dir = args
        .out
        .clone()
        .unwrap_or_else(|| args.models_dir.join("intent-heads").join(&model_id));
    let intent_domain = &dataset.intent_domain;
    let domains = dataset.domains();
    let mut intents = dataset.intents();
    intents.push(OOS.into());
    eprintln!(
        "train: {} ({:?}, hierarchy {:?}): {} intents in {} domain(s), {} training and {} validation examples; model id {model_id}",
        dataset.name,
        dataset.format,
        dataset.hierarchy,
        intents.len() - 1,
        domains.len(),
        dataset.train.len(),
        dataset.val.len()
    );
    let intent_index: HashMap<&str, i64> = intents
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as i64))
        .collect();
    let domain_index: HashMap<&str, i64> = domains
        .iter()
        .enumerate()
        .map(|(i, n)| (n.as_str(), i as i64))
        .collect();

    // Synthetic out-of-scope texts: most are trained on (outlier
    // exposure); a seeded share is held back and joins the out-of-scope
    // validation texts the rule is chosen on.
    let synthetic_all: Pairs = lines(&args.synthetic_oos, "--synthetic-oos")?
        .into_iter()
        .map(|t| (t, OOS.to_owned()))
        .collect();
    let (synthetic, synthetic_val) = split::stratified(
        synthetic_all,
        args.synthetic_val_share,
        args.seed as u64 + 1,
    );
    let train: Pairs = [dataset.train.as_slice(), synthetic.as_slice()].concat();
    let probes = lines(&args.probes, "--probes")?;
    let (oos_val, val): (Pairs, Pairs) = dataset.val.iter().cloned().partition(|(_, i)| i == OOS);
    let oos_val: Pairs = [oos_val, synthetic_val.clone()].concat();
    let label = |pairs: &Pairs| -> Result<(Vec<i64>, Vec<i64>), String> {
        let mut y = Vec::new();
        let mut d = Vec::new();
        for (_, intent) in pairs {
            let i = *intent_index
                .get(intent.as_str())
                .ok_or_else(|| format!("intent {intent:?} is in no domain"))?;
            y.push(i);
            d.push(
                intent_domain
                    .get(intent)
                    .and_then(|dm| domain_index.get(dm.as_str()).copied())
                    .unwrap_or(-100),
            );
        }
        Ok((y, d))
    };
    let (y_train, d_train) = label(&train)?;
    let (y_val, d_val) = label(&val)?;

    // The encoder's weights are variables of their own store: fine-tuned
    // with a small learning rate, saved beside the head.
    let mut encoder_vars = nn::VarStore::new(Device::Cpu);
    let encoder_root = encoder_vars.root();
    let fine_tune = args.fine_tune_epochs > 0;
    let encoder = if fine_tune {
        Encoder::load_into(&args.encoder(), Device::Cpu, Some(&encoder_root))
    } else {
        Encoder::load_with(&args.encoder(), Device::Cpu, precision)
    }
    .map_err(|e| e.to_string())?;

    let mut vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let dim = encoder.dimension() as i64;
    let hidden = nn::linear(&root / "hidden", dim, args.hidden, Default::default());
    let intent_head = nn::linear(
        &root / "intent",
        args.hidden,
        intents.len() as i64,
        Default::default(),
    );
    let domain_head = nn::linear(
        &root / "domain",
        args.hidden,
        domains.len() as i64,
        Default::default(),
    );
    let mut opt = nn::AdamW::default()
        .wd(1e-2)
        .build(&vs, 1e-3)
        .map_err(|e| e.to_string())?;
    let y = Tensor::from_slice(&y_train);
    let d = Tensor::from_slice(&d_train);
    let n = y_train.len() as i64;
    // Per-class weights of the intent loss [intents] f32: 1, and
    // `--oos-weight` for `oos` (the last class).
    let mut class_weights = vec![1f32; intents.len()];
    if let Some(w) = class_weights.last_mut() {
        *w = args.oos_weight as f32;
    }
    let class_weights = Tensor::from_slice(&class_weights);
    let loss_of = |emb: &Tensor, idx: &Tensor| -> Tensor {
        let h = hidden.forward(emb).gelu("none");
        intent_head.forward(&h).cross_entropy_loss::<&Tensor>(
            &y.index_select(0, idx),
            Some(&class_weights),
            tch::Reduction::Mean,
            -100,
            args.label_smoothing,
        ) + domain_head.forward(&h).cross_entropy_loss::<Tensor>(
            &d.index_select(0, idx),
            None,
            tch::Reduction::Mean,
            -100,
            0.0,
        )
    };

    // Validation accuracy after each fine-tuning epoch (early stopping).
    let mut epochs_run: Vec<f64> = Vec::new();
    if fine_tune {
        // Joint fine-tuning of encoder and head (Reimers & Gurevych 2019
        // fine-tune the same way), batch 32, AdamW.
        let mut encoder_opt = nn::AdamW::default()
            .wd(1e-2)
            .build(&encoder_vars, args.encoder_lr)
            .map_err(|e| e.to_string())?;
        let train_texts = texts(&train);
        let batches = (n as usize).div_ceil(32);
        let mut progress =
            Progress::start(args.progress, "fine-tune", args.fine_tune_epochs, batches);
        let stop_pairs: Pairs = [val.as_slice(), oos_val.as_slice()].concat();
        let stop_texts = texts(&stop_pairs);
        let stop_y = Tensor::from_slice(&label(&stop_pairs)?.0);
        let mut stop = early_stop::EarlyStop::new(args.patience);
        let checkpoint = early_stop::Checkpoint::new()?;
        for epoch in 0..args.fine_tune_epochs {
            let perm = Vec::<i64>::try_from(&Tensor::randperm(n, (Kind::Int64, Device::Cpu)))
                .map_err(|e| e.to_string())?;
            let mut total = 0.0;
            for (b, chunk) in perm.chunks(32).enumerate() {
                let batch: Vec<&str> = chunk.iter().map(|&i| train_texts[i as usize]).collect();
                let (ids, mask) = encoder.batch(&batch).map_err(|e| e.to_string())?;
                let emb = encoder.forward(&ids, &mask).map_err(|e| e.to_string())?;
                let loss = loss_of(&emb, &Tensor::from_slice(chunk));
                encoder_opt.zero_grad();
                opt.zero_grad();
                loss.backward();
                encoder_opt.step();
                opt.step();
                total += loss.double_value(&[]);
                let last = b + 1 == batches;
                progress.tick(epoch, b + 1, total / (b + 1) as f64, last);
            }
            // Early stopping on the head's validation accuracy (in-scope
            // intents and the `oos` class).
            let _g = tch::no_grad_guard();
            let logits = intent_head.forward(
                &hidden
                    .forward(&embed_all(&encoder, &stop_texts)?)
                    .gelu("none"),
            );
            let right = logits
                .argmax(1, false)
                .eq_tensor(&stop_y)
                .sum(Kind::Int64)
                .int64_value(&[]);
            let accuracy = right as f64 / stop_texts.len().max(1) as f64;
            let decision = stop.record(epoch, accuracy);
            eprintln!(
                "train: epoch {} validation accuracy {accuracy:.4}",
                epoch + 1
            );
            if decision.improved && epoch + 1 < args.fine_tune_epochs {
                checkpoint.save(&[&encoder_vars, &vs])?;
            }
            if decision.stop {
                eprintln!("train: no gain for {} epoch(s): stopping", args.patience);
                break;
            }
        }
        if stop
            .best_epoch()
            .is_some_and(|b| b + 1 < stop.history.len())
        {
            eprintln!(
                "train: keeping epoch {}'s weights (from {})",
                stop.best_epoch().map_or(0, |b| b + 1),
                checkpoint.dir().display()
            );
            checkpoint.restore(&mut [&mut encoder_vars, &mut vs])?;
        }
        epochs_run = stop.history;
        progress.finish();
    } else {
        eprintln!("train: embedding {} training texts", train.len());
        let x_train = embed_all(&encoder, &texts(&train))?;
        for epoch in 0..args.epochs {
            let perm = Tensor::randperm(n, (Kind::Int64, Device::Cpu));
            let mut total = 0.0;
            for start in (0..n).step_by(256) {
                let idx = perm.narrow(0, start, (n - start).min(256));
                let loss = loss_of(&x_train.index_select(0, &idx), &idx);
                opt.backward_step(&loss);
                total += loss.double_value(&[]);
            }
            if epoch % 10 == 9 {
                eprintln!(
                    "train: epoch {} loss {:.4}",
                    epoch + 1,
                    total / (n as f64 / 256.0)
                );
            }
        }
    }
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    // From here on, embeddings are computed as the service will compute
    // them: the fine-tuned encoder is saved and read back in `precision`.
    let encoder = if fine_tune {
        let dir = out_dir.join("encoder");
        save_encoder(&encoder_vars, &args.encoder(), &dir)?;
        Encoder::load_with(&dir, Device::Cpu, precision).map_err(|e| e.to_string())?
    } else {
        encoder
    };
    eprintln!(
        "train: embedding {} validation texts ({precision})",
        val.len() + oos_val.len()
    );
    let x_val = embed_all(&encoder, &texts(&val))?;
    let x_oos = embed_all(&encoder, &texts(&oos_val))?;

    // [in-scope intents, domains] one-hot: intent i belongs to domain j.
    let mut membership = vec![0f32; (intents.len() - 1) * domains.len()];
    for (i, name) in intents.iter().take(intents.len() - 1).enumerate() {
        if let Some(j) = intent_domain
            .get(name)
            .and_then(|d| domain_index.get(d.as_str()))
        {
            membership[i * domains.len() + *j as usize] = 1.0;
        }
    }
    let intent_to_domain =
        Tensor::from_slice(&membership).view([intents.len() as i64 - 1, domains.len() as i64]);
    let probs = |x: &Tensor| -> (Vec<f32>, Vec<i64>, Vec<f32>) {
        let _g = tch::no_grad_guard();
        let h = hidden.forward(x).gelu("none");
        let p = intent_head.forward(&h).softmax(-1, Kind::Float);
        let inscope = p.narrow(1, 0, intents.len() as i64 - 1);
        let (best_p, best) = inscope.max_dim(1, false);
        let oos_p = p.select(1, intents.len() as i64 - 1);
        // Hierarchical domain: the domain head's probabilities averaged with
        // the intent head's mass per domain (as the service computes it).
        let dom = domain_head
            .forward(&h)
            .softmax(-1, Kind::Float)
            .g_add(&inscope.matmul(&intent_to_domain))
            .argmax(1, false);
        let v = |t: &Tensor| Vec::<f32>::try_from(t).unwrap_or_default();
        let argmax_is_oos: Vec<f32> = v(&oos_p)
            .iter()
            .zip(v(&best_p))
            .map(|(o, b)| if *o > b { 2.0 } else { b })
            .collect();
        (
            argmax_is_oos,
            Vec::<i64>::try_from(&best).unwrap_or_default(),
            Vec::<f32>::try_from(&dom.to_kind(Kind::Float)).unwrap_or_default(),
        )
    };
    // For each text: its best in-scope probability, or 2.0 when `oos` wins.
    let (val_p, val_pred, val_dom) = probs(&x_val);
    let (oos_p, _, _) = probs(&x_oos);
    // Nearest in-scope training utterance, in the fine-tuned space and (for
    // the cascade) in the base encoder's.
    let (reference, reference_intents): (Vec<&str>, Vec<i64>) = train
        .iter()
        .zip(&y_train)
        .filter(|((_, intent), _)| intent != OOS)
        .map(|((t, _), &y)| (t.as_str(), y))
        .unzip();
    // Each row's intent lets the service scan the predicted intent's rows
    // first (`head::Neighbours::nearest_up_to`).
    let reference_intents = Tensor::from_slice(&reference_intents);
    eprintln!(
        "train: embedding {} in-scope training texts for the nearest-neighbour rules",
        reference.len()
    );
    let x_ref = embed_all(&encoder, &reference)?;
    // The base encoder's space: a second model only when the encoder was
    // fine-tuned; otherwise the embeddings above already are that space.
    let base_encoder = if fine_tune {
        Some(
            Encoder::load_with(&args.encoder(), Device::Cpu, precision)
                .map_err(|e| e.to_string())?,
        )
    } else {
        None
    };
    let in_base = |x: &Tensor, texts_: &[&str]| -> Result<Tensor, String> {
        match &base_encoder {
            Some(base) => embed_all(base, texts_),
            None => Ok(x.shallow_clone()),
        }
    };
    let x_ref_base = in_base(&x_ref, &reference)?;
    let nearest = |x: &Tensor, reference: &Tensor| -> Vec<f32> {
        let _g = tch::no_grad_guard();
        let (best, _) = x.matmul(&reference.tr()).max_dim(1, false);
        Vec::<f32>::try_from(&best).unwrap_or_default()
    };
    let signals = |p: &[f32], x: &Tensor, texts_: &[&str]| -> Result<Vec<rule::Signals>, String> {
        let knn = nearest(x, &x_ref);
        let base_knn = nearest(&in_base(x, texts_)?, &x_ref_base);
        Ok(p.iter()
            .zip(knn)
            .zip(base_knn)
            .map(|((&p, knn), base_knn)| rule::Signals { p, knn, base_knn })
            .collect())
    };
    let val_signals: Vec<(rule::Signals, bool)> = signals(&val_p, &x_val, &texts(&val))?
        .into_iter()
        .zip(val_pred.iter().zip(&y_val).map(|(p, y)| p == y))
        .collect();
    let oos_signals = signals(&oos_p, &x_oos, &texts(&oos_val))?;
    let (chosen, figures) = rule::select(&val_signals, &oos_signals, args.min_in_scope_accuracy);
    eprintln!("train: decision rule {chosen:?}: {figures:?}");
    let held_out = (args.cv_folds > 1).then(|| {
        let s = rule::cross_validate(
            &val_signals,
            &oos_signals,
            args.min_in_scope_accuracy,
            args.cv_folds,
            args.seed as u64,
        );
        eprintln!("train: held-out ({}-fold) {s:?}", args.cv_folds);
        HeldOut {
            in_scope_accuracy: s.accuracy,
            out_of_scope_recall: s.recall,
            out_of_scope_precision: s.precision,
            folds: args.cv_folds,
        }
    });
    let probe_recall = if probes.is_empty() {
        None
    } else {
        let probe_texts: Vec<&str> = probes.iter().map(String::as_str).collect();
        let x_probes = embed_all(&encoder, &probe_texts)?;
        let (probe_p, _, _) = probs(&x_probes);
        let flagged = signals(&probe_p, &x_probes, &probe_texts)?
            .iter()
            .filter(|s| chosen.flags(s))
            .count();
        Some(flagged as f64 / probes.len() as f64)
    };
    let dom_correct = val_dom
        .iter()
        .zip(&d_val)
        .filter(|(p, d)| **p as i64 == **d)
        .count();
    let metrics = Metrics {
        model_id: model_id.clone(),
        out_dir: out_dir.display().to_string(),
        dataset: dataset.name.clone(),
        intents: intents.len() - 1,
        domains: domains.len(),
        val_source: serde_json::to_value(&dataset.val_source).unwrap_or_default(),
        held_out,
        synthetic_oos_val_texts: synthetic_val.len(),
        threads,
        val_accuracy_by_epoch: epochs_run,
        train_seconds: 0.0,
        in_scope_accuracy: figures.accuracy,
        out_of_scope_recall: figures.recall,
        out_of_scope_precision: figures.precision,
        domain_accuracy: dom_correct as f64 / d_val.len() as f64,
        threshold: chosen.threshold,
        knn_threshold: chosen.knn,
        base_knn_gate: chosen.gate,
        base_knn_threshold: chosen.base_knn,
        second_pass_share: figures.gated,
        train_texts: dataset.train.len(),
        synthetic_oos_texts: synthetic.len(),
        probe_texts: probes.len(),
        probe_out_of_scope_recall: probe_recall,
        val_texts: val.len() + oos_val.len(),
        seed: args.seed,
        precision: precision.to_string(),
    };

    vs.save(out_dir.join("head.safetensors"))
        .map_err(|e| e.to_string())?;
    if chosen.knn > 0.0 || chosen.gate > 0.0 {
        Tensor::write_safetensors(
            &[("embeddings", &x_ref), ("intents", &reference_intents)],
            out_dir.join("knn.safetensors"),
        )
        .map_err(|e| e.to_string())?;
    }
    if chosen.gate > 0.0 {
        Tensor::write_safetensors(
            &[("embeddings", &x_ref_base), ("intents", &reference_intents)],
            out_dir.join("base_knn.safetensors"),
        )
        .map_err(|e| e.to_string())?;
    }
    let labels = Labels {
        model_id: model_id.clone(),
        encoder: if fine_tune {
            "encoder".into()
        } else {
            encoder.id().to_owned()
        },
        intents,
        oos_label: OOS.into(),
        domains,
        intent_domain: intent_domain.clone().into_iter().collect(),
        threshold: chosen.threshold,
        knn_threshold: (chosen.knn > 0.0 || chosen.gate > 0.0).then_some(chosen.knn),
        base_knn: (chosen.gate > 0.0).then_some(BaseKnnRule {
            gate: chosen.gate,
            threshold: chosen.base_knn,
        }),
    };
    let write =
        |name: &str, v: String| std::fs::write(out_dir.join(name), v).map_err(|e| e.to_string());
    write(
        "labels.json",
        serde_json::to_string_pretty(&labels).map_err(|e| e.to_string())?,
    )?;
    let metrics = Metrics {
        train_seconds: (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        ..metrics
    };
    write(
        "metrics.json",
        serde_json::to_string_pretty(&metrics).map_err(|e| e.to_string())?,
    )?;
    Ok(metrics)
}
