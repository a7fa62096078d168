//! Real service processes on ephemeral ports.
//!
//! Each binary is started with port 0 for every listener; the harness reads
//! its JSON log on stdout until the `listening` line names the bound
//! addresses. All output is kept (and echoed to the test's stderr) so a
//! failure or a server panic shows what the server said.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

/// Path of a workspace binary: next to the running executable (a bench
/// binary in `target/<profile>/`) or next to its `deps/` folder (a test).
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir");
    let candidates = [Some(dir.join(name)), dir.parent().map(|d| d.join(name))];
    let found = candidates.iter().flatten().find(|p| p.exists()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the workspace binaries first (`cargo build --workspace --bins`; `make test` does it)",
            dir.display()
        )
    })
}

/// Addresses a process logged in its `listening` line.
#[derive(Debug, Clone, Copy, Default)]
pub struct Listening {
    pub grpc_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub http_addr: Option<SocketAddr>,
    pub health_addr: Option<SocketAddr>,
}

/// A running service process, killed on drop if still running.
pub struct ServiceProcess {
    pub name: String,
    child: Child,
    pub addrs: Listening,
    output: Arc<Mutex<Vec<String>>>,
    data_dir: PathBuf,
}

fn parse_addr(v: &serde_json::Value, key: &str) -> Option<SocketAddr> {
    v.get(key)?.as_str()?.parse().ok()
}

impl ServiceProcess {
    /// Starts `binary_name` with every listener on `127.0.0.1:0` (overridable
    /// through `env`) and waits for its `listening` line.
    pub fn start(binary_name: &str, env: &[(&str, String)]) -> Self {
        let mut cmd = Command::new(binary(binary_name));
        // Each process gets its own data directory (SQLite stores, index
        // snapshots) and a test master key for auth-rotation's secrets.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let data_dir = std::env::temp_dir().join(format!(
            "moltbot-e2e-{}-{}-{binary_name}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        cmd.env("MOLTBOT_DATA_DIR", &data_dir)
            .env(
                "MOLTBOT_MASTER_KEY",
                "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
            )
            .env_remove("DATABASE_URL")
            .env_remove("REDIS_URL");
        cmd.env("MOLTBOT_GRPC_ADDR", "127.0.0.1:0")
            .env("MOLTBOT_METRICS_ADDR", "127.0.0.1:0")
            .env("MOLTBOT_HTTP_ADDR", "127.0.0.1:0")
            .env("MOLTBOT_LOG_FORMAT", "json")
            .env("RUST_LOG", "info")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_SERVICE_NAME")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {binary_name}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let stdout = child.stdout.take().expect("stdout");
        let stderr = child.stderr.take().expect("stderr");
        {
            let output = output.clone();
            let name = binary_name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                        && v.get("message").and_then(|m| m.as_str()) == Some("listening")
                    {
                        let _ = tx.send(Listening {
                            grpc_addr: parse_addr(&v, "grpc_addr"),
                            metrics_addr: parse_addr(&v, "metrics_addr"),
                            http_addr: parse_addr(&v, "http_addr"),
                            health_addr: parse_addr(&v, "health_addr"),
                        });
                    }
                    eprintln!("[{name}] {line}");
                    output.lock().unwrap().push(line);
                }
            });
        }
        {
            let output = output.clone();
            let name = binary_name.to_owned();
            std::thread::spawn(move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    eprintln!("[{name} stderr] {line}");
                    output.lock().unwrap().push(format!("stderr: {line}"));
                }
            });
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let addrs = loop {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(addrs) => break addrs,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(status) = child.try_wait().unwrap() {
                        std::thread::sleep(Duration::from_millis(100));
                        panic!(
                            "{binary_name} exited with {status} before listening:\n{}",
                            output.lock().unwrap().join("\n")
                        );
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{binary_name} did not log `listening` within 60 s"
                    );
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = child.wait().unwrap();
                    panic!(
                        "{binary_name} closed stdout ({status}) before listening:\n{}",
                        output.lock().unwrap().join("\n")
                    );
                }
            }
        };
        Self {
            name: binary_name.to_owned(),
            child,
            addrs,
            output,
            data_dir,
        }
    }

    /// A gateway in front of `context`, `generation` and `auth` alone: its
    /// enrichments (understanding, retrieval) point at a closed port, so
    /// turns go on with `degraded` naming them. `extra` adds variables (a
    /// routes file, say).
    pub fn gateway_without_enrichments(
        context: &ServiceProcess,
        generation: &ServiceProcess,
        auth: &ServiceProcess,
        extra: &[(&str, String)],
    ) -> Self {
        let mut env = vec![
            ("MOLTBOT_CONTEXT_URL", context.grpc_url()),
            ("MOLTBOT_GENERATION_URL", generation.grpc_url()),
            ("MOLTBOT_AUTH_URL", auth.grpc_url()),
            ("MOLTBOT_UNDERSTANDING_URL", "http://127.0.0.1:9".to_owned()),
            ("MOLTBOT_RETRIEVAL_URL", "http://127.0.0.1:9".to_owned()),
        ];
        env.extend(extra.iter().map(|(k, v)| (*k, v.clone())));
        Self::start("moltbot-gateway", &env)
    }

    /// `http://<grpc_addr>`.
    pub fn grpc_url(&self) -> String {
        format!(
            "http://{}",
            self.addrs.grpc_addr.expect("process has no gRPC address")
        )
    }

    /// `http://<http_addr>`.
    pub fn http_url(&self) -> String {
        format!(
            "http://{}",
            self.addrs.http_addr.expect("process has no HTTP address")
        )
    }

    /// CPU time (user + system) the process has used so far, from
    /// `/proc/<pid>/stat` (Linux); zero where that cannot be read.
    pub fn cpu_time(&self) -> Duration {
        cpu_time_of(&format!("/proc/{}/stat", self.child.id()))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM.
    pub fn signal_term(&self) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM)
            .expect("send SIGTERM");
    }

    /// Sends SIGHUP (a configuration reload, for the gateway).
    pub fn signal_hangup(&self) {
        nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGHUP)
            .expect("send SIGHUP");
    }

    /// Sends SIGKILL (a crash: nothing drains). The process is reaped on
    /// drop.
    pub fn kill(&self) {
        let _ = nix::sys::signal::kill(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
    }

    /// Waits for exit up to `timeout`; `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, then asserts a clean exit (status 0, no panic in the output)
    /// within 20 s.
    pub fn stop(mut self) {
        self.signal_term();
        let status = self.wait_exit(Duration::from_secs(20));
        let output = self.output();
        assert!(
            status.is_some(),
            "{} did not exit within 20 s of SIGTERM:\n{output}",
            self.name
        );
        assert!(
            status.unwrap().success(),
            "{} exited with {status:?}:\n{output}",
            self.name
        );
        self.assert_no_panic();
    }

    /// Everything the process printed so far.
    pub fn output(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Fails the test if the process printed a Rust panic.
    pub fn assert_no_panic(&self) {
        let output = self.output();
        assert!(
            !output.contains("panicked at"),
            "{} panicked:\n{output}",
            self.name
        );
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// User + system CPU time from a `/proc/<pid>/stat` file (fields 14 and 15,
/// in clock ticks of 10 ms: `sysconf(_SC_CLK_TCK)` is 100 on Linux);
/// zero where it cannot be read.
pub fn cpu_time_of(stat_path: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(stat_path) else {
        return Duration::ZERO;
    };
    // The command name (field 2) is in parentheses and may hold spaces.
    let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // After the name: field 3 is index 0, so utime (14) is 11, stime (15) 12.
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}
