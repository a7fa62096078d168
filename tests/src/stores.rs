//! Private Redis and PostgreSQL servers that speak only TLS, started by a
//! test with certificates from a [`crate::tls::TestCa`], on ephemeral
//! loopback ports, stopped on drop.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use crate::tls::Leaf;

/// The shared Redis of the tests: `REDIS_URL`, default the machine's
/// (redis://127.0.0.1:6379).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// `<prefix>-<pid>-<nanoseconds>`: a name no earlier run used, for what
/// outlives a run in a shared store (Redis buckets and cache entries,
/// collections).
pub fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}-{}", std::process::id(), nanos % 1_000_000_000)
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port(port: u16, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `redis-server` with `--port 0 --tls-port PORT`: plaintext is off.
pub struct TlsRedis {
    child: Child,
    /// The TLS port.
    pub port: u16,
    dir: PathBuf,
}

impl TlsRedis {
    /// Starts it in a fresh directory with `leaf` as its certificate.
    pub fn start(leaf: &Leaf) -> Self {
        let dir = std::env::temp_dir().join(format!("moltbot-redis-tls-{}", free_port()));
        let (cert, key) = leaf.write(&dir);
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "no", "--tls-auth-clients", "no"])
            .arg("--tls-port")
            .arg(port.to_string())
            .arg("--tls-cert-file")
            .arg(&cert)
            .arg("--tls-key-file")
            .arg(&key)
            .arg("--dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/ensure-stores.sh installs it)");
        wait_port(port, "redis-server");
        Self { child, port, dir }
    }

    /// `rediss://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}/0", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A plaintext `redis-server` of its own on a free port, keeping nothing
/// on disk: a test can stop it under a running mesh.
pub struct OwnRedis {
    child: Child,
    /// Its port.
    pub port: u16,
}

impl OwnRedis {
    /// Starts it.
    pub fn start() -> Self {
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--port")
            .arg(port.to_string())
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server (scripts/ensure-stores.sh installs it)");
        wait_port(port, "redis-server");
        Self { child, port }
    }

    /// `redis://127.0.0.1:PORT/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills it (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A PostgreSQL cluster of its own (initdb) with `ssl=on` and a `pg_hba.conf`
/// that admits TLS connections only (`hostssl`), run as the `postgres` user.
pub struct TlsPostgres {
    bin: PathBuf,
    data: PathBuf,
    dir: PathBuf,
    /// Its port.
    pub port: u16,
}

/// The directory of PostgreSQL's server programs (`initdb`, `pg_ctl`).
fn pg_bin() -> PathBuf {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|p| p.join("initdb").exists())
        .collect();
    found.sort();
    found
        .pop()
        .expect("PostgreSQL server programs under /usr/lib/postgresql (scripts/ensure-stores.sh installs them)")
}

fn as_postgres(bin: &Path, program: &str) -> Command {
    let mut c = Command::new("runuser");
    c.args(["-u", "postgres", "--"]).arg(bin.join(program));
    c
}

fn chown_postgres(path: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(path)
        .status()
        .unwrap();
    assert!(status.success());
}

impl TlsPostgres {
    /// initdb, certificates, TLS-only pg_hba, start; database `postgres`,
    /// user `postgres`, trust auth over TLS.
    pub fn start(leaf: &Leaf) -> Self {
        let bin = pg_bin();
        let dir = std::env::temp_dir().join(format!("moltbot-pg-tls-{}", free_port()));
        let data = dir.join("data");
        std::fs::create_dir_all(&dir).unwrap();
        chown_postgres(&dir);
        let out = as_postgres(&bin, "initdb")
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&data)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::write(data.join("server.crt"), &leaf.cert_pem).unwrap();
        std::fs::write(data.join("server.key"), &leaf.key_pem).unwrap();
        std::fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
        )
        .unwrap();
        chown_postgres(&dir);
        let _ = Command::new("chmod")
            .arg("600")
            .arg(data.join("server.key"))
            .status();
        let port = free_port();
        let out = as_postgres(&bin, "pg_ctl")
            .arg("-D")
            .arg(&data)
            .arg("-o")
            .arg(format!(
                "-p {port} -k {} -c listen_addresses=127.0.0.1 -c ssl=on",
                dir.display()
            ))
            .args(["-w", "-l"])
            .arg(dir.join("log"))
            .arg("start")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        wait_port(port, "postgres");
        Self {
            bin,
            data,
            dir,
            port,
        }
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres` with `query` appended
    /// (e.g. `sslmode=verify-full&sslrootcert=/path/ca.pem`).
    pub fn url(&self, query: &str) -> String {
        format!(
            "postgres://postgres@127.0.0.1:{}/postgres?{query}",
            self.port
        )
    }
}

impl Drop for TlsPostgres {
    fn drop(&mut self) {
        let _ = as_postgres(&self.bin, "pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
