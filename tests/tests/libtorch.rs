//! Every binary that links libtorch starts from a bare environment: no
//! `LD_LIBRARY_PATH`, no virtualenv on `PATH`. The build embeds an rpath to
//! torch's `lib/` (`build-support/src/lib.rs`); without it the dynamic
//! loader stops the process before `main` with "libtorch_cpu.so: cannot open
//! shared object file".

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // test code: failures are the assertions

use moltbot_e2e::process::binary;

/// Every workspace binary that links libtorch, benches included.
const LIBTORCH_BINARIES: [&str; 6] = [
    "moltbot-understanding",
    "moltbot-understanding-bench",
    "moltbot-generation",
    "moltbot-generation-bench",
    "moltbot-retrieval",
    "moltbot-retrieval-bench",
];

#[test]
fn libtorch_binaries_run_without_ld_library_path() {
    let mut failures = Vec::new();
    for name in LIBTORCH_BINARIES {
        let output = std::process::Command::new(binary(name))
            .arg("--help")
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .output()
            .expect("spawn");
        if !output.status.success() {
            failures.push(format!(
                "{name}: {} {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn the_rpath_names_an_existing_libtorch() {
    // `readelf -d` lists RUNPATH/RPATH; the absolute entry must hold
    // libtorch_cpu.so (a stale path would only work by accident).
    let Ok(output) = std::process::Command::new("readelf")
        .arg("-d")
        .arg(binary("moltbot-generation"))
        .output()
    else {
        eprintln!("readelf not installed; the start-up test above still checks the loader");
        return;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .find(|l| l.contains("RUNPATH") || l.contains("RPATH"))
        .unwrap_or_else(|| panic!("no RUNPATH/RPATH in moltbot-generation:\n{text}"));
    let paths = line
        .rsplit_once('[')
        .map(|(_, p)| p.trim_end_matches(']'))
        .unwrap_or_default();
    assert!(
        paths
            .split(':')
            .any(|p| std::path::Path::new(p).join("libtorch_cpu.so").exists()),
        "no rpath entry holds libtorch_cpu.so: {paths}"
    );
    assert!(paths.contains("$ORIGIN/libtorch"), "{paths}");
}
