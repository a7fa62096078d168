//! `moltbot doctor`: checks what the mesh needs on this machine and says what
//! to fix for each failure.

use std::{net::SocketAddr, time::Duration};

use moltbot_runtime::ports;

use crate::{CliError, bin_dir};

/// Flags of `moltbot doctor`.
#[derive(Debug, clap::Args)]
pub struct DoctorArgs {
    /// Redis to check (used by the context service in production).
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// PostgreSQL to check (auth-rotation and retrieval in production).
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory of prepared models.
    #[arg(long, env = "MOLTBOT_MODELS_DIR", default_value = "var/models")]
    pub models_dir: std::path::PathBuf,
}

/// The binaries that link libtorch (they carry an rpath to it; see
/// `build-support/src/lib.rs`).
pub const LIBTORCH_BINARIES: [&str; 3] = [
    "moltbot-understanding",
    "moltbot-generation",
    "moltbot-retrieval",
];

/// Runs `binary --help` with `LD_LIBRARY_PATH` removed: `Ok` when it
/// starts, else the loader's complaint (e.g. `libtorch_cpu.so: cannot open
/// shared object file`).
pub async fn starts_without_ld_path(binary: &std::path::Path) -> Result<(), String> {
    let output = tokio::process::Command::new(binary)
        .arg("--help")
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .await
        .map_err(|e| e.to_string())?;
    if output.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
    }
}

struct Report {
    failures: usize,
}

impl Report {
    fn check(&mut self, ok: bool, what: &str, fix: &str) {
        if ok {
            println!("ok    {what}");
        } else {
            self.failures += 1;
            println!("FAIL  {what}\n      fix: {fix}");
        }
    }
}

async fn reachable(url: &str, default_port: u16) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let host = parsed.host_str().unwrap_or("127.0.0.1").to_owned();
    let port = parsed.port().unwrap_or(default_port);
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect((host, port))
        )
        .await,
        Ok(Ok(_))
    )
}

async fn port_free(addr: SocketAddr) -> bool {
    tokio::net::TcpListener::bind(addr).await.is_ok()
}

/// Runs every check; errors with [`CliError::DoctorFailed`] when any fails.
pub async fn run(args: DoctorArgs) -> Result<(), CliError> {
    let mut report = Report { failures: 0 };
    let dir = bin_dir()?;
    for name in ports::ALL
        .iter()
        .map(|s| s.binary)
        .chain(["moltbot-gateway"])
    {
        report.check(
            dir.join(name).exists(),
            &format!("binary {name} in {}", dir.display()),
            "run `make build` (or `cargo build --release --bins`)",
        );
    }
    for name in LIBTORCH_BINARIES {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let started = starts_without_ld_path(&path).await;
        report.check(
            started.is_ok(),
            &format!(
                "{name} finds libtorch by itself{}",
                started.err().map(|e| format!(" ({e})")).unwrap_or_default()
            ),
            "rebuild with the virtualenv active (`make build`): the build embeds torch's lib/ as an rpath",
        );
    }
    let models = &args.models_dir;
    report.check(
        crate::models::prepared(models).contains(&crate::models::DEFAULT_MODEL.to_owned()),
        &format!(
            "generation model prepared in {}",
            models.join(crate::models::DEFAULT_MODEL).display()
        ),
        "run `make models` (or `moltbot models prepare`)",
    );
    report.check(
        models.join("all-minilm-l6-v2/model.safetensors").exists(),
        &format!("encoder in {}", models.join("all-minilm-l6-v2").display()),
        "run `make models`",
    );
    report.check(
        models.join("intent-head/metrics.json").exists(),
        &format!("intent head in {}", models.join("intent-head").display()),
        "run `make intent-head` (`moltbot up` trains it when missing)",
    );
    for spec in ports::ALL {
        for addr in [spec.grpc_addr, spec.metrics_addr] {
            report.check(
                port_free(addr).await,
                &format!("port {addr} free for {}", spec.binary),
                "stop what listens there (`ss -ltnp`), or set MOLTBOT_GRPC_ADDR/MOLTBOT_METRICS_ADDR",
            );
        }
    }
    report.check(
        port_free(ports::GATEWAY_HTTP).await,
        &format!("port {} free for moltbot-gateway", ports::GATEWAY_HTTP),
        "stop what listens there, or set MOLTBOT_HTTP_ADDR",
    );
    if let Some(url) = args.redis_url.as_deref() {
        report.check(
            reachable(url, 6379).await,
            "Redis reachable at REDIS_URL",
            "start Redis (`redis-server --daemonize yes`) or unset REDIS_URL for in-memory context",
        );
    }
    if let Some(url) = args.database_url.as_deref() {
        report.check(
            reachable(url, 5432).await,
            "PostgreSQL reachable at DATABASE_URL",
            "start PostgreSQL (`pg_ctlcluster <version> main start`) or unset DATABASE_URL for SQLite",
        );
    }
    match report.failures {
        0 => Ok(()),
        n => Err(CliError::DoctorFailed(n)),
    }
}
