//! The llama.cpp reference: `scripts/bench_llama_cpp.py` under the Python
//! that has llama-cpp-python (installed by `make bench-generation` only).

use std::{path::Path, process::Command};

/// One single-stream measurement.
#[derive(Debug, Clone, Copy)]
pub struct Single {
    /// Prompt prefill + first token, ms.
    pub ttft_ms: f64,
    /// Greedy tokens per second after the first.
    pub decode_tok_s: f64,
    /// Peak resident memory of the measuring process, MiB.
    pub peak_rss_mib: f64,
}

/// Runs llama.cpp on `gguf` with the same prompt ids, token count and
/// threads. Errors with the script's stderr.
pub fn run(
    python: &Path,
    gguf: &Path,
    prompt: &[u32],
    new_tokens: usize,
    threads: usize,
    repeat: usize,
) -> Result<Single, String> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_llama_cpp.py");
    let ids = serde_json::to_string(prompt).map_err(|e| e.to_string())?;
    let out = Command::new(python)
        .arg(script)
        .arg("--gguf")
        .arg(gguf)
        .args(["--prompt-ids", &ids])
        .args(["--new-tokens", &new_tokens.to_string()])
        .args(["--threads", &threads.to_string()])
        .args(["--repeat", &repeat.to_string()])
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().last().unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(line).map_err(|e| format!("{e}: {line}"))?;
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Ok(Single {
        ttft_ms: f("ttft_ms"),
        decode_tok_s: f("decode_tok_s"),
        peak_rss_mib: f("peak_rss_mib"),
    })
}

/// Peak resident memory of this process since the last [`reset_peak_rss`],
/// MiB (`VmHWM` of `/proc/self/status`; NaN where there is none).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

/// Resets the peak to the current resident memory (writing `5` to
/// `/proc/self/clear_refs`, Linux ≥ 4.0), so each dtype's peak is its own.
pub fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}
