//! Build-script helpers shared by every crate whose targets link libtorch
//! (encoder, understanding, generation, retrieval).
//!
//! [`libtorch_rpath`] embeds the directory of the libtorch that `torch-sys`
//! links against as an rpath in each binary, test and bench of the calling
//! package, so the programs run from a bare shell (no `LD_LIBRARY_PATH`).
//! It finds that directory the way `torch-sys` 0.26's `build.rs` does:
//! `LIBTORCH_LIB` or `LIBTORCH` (then `lib/` under it) when set, else, with
//! `LIBTORCH_USE_PYTORCH`, by asking the virtualenv's `python` where the torch
//! wheel keeps its shared objects. The path is canonicalised, so a virtualenv
//! reached through a symbolic link (CI's fresh-clone check) records the real
//! directory. A second, relative entry `$ORIGIN/libtorch` lets an image ship
//! the shared objects next to the binaries (see `docs/architecture.md`,
//! "Building and running").

use std::path::PathBuf;

/// Where the libtorch shared objects live, as `torch-sys` would find them;
/// `None` when nothing says (then the link itself fails in `torch-sys`).
///
/// The build script reruns only when what decides the answer changes:
/// `LIBTORCH_LIB`, `LIBTORCH`, `LIBTORCH_USE_PYTORCH`, `VIRTUAL_ENV` (whose
/// `bin/python` is asked, whatever `PATH` says) and the resolved directory
/// itself (`cargo:rerun-if-changed`, so a reinstalled wheel is noticed).
/// `PATH` counts only without a virtualenv, where `python3` is looked up
/// in it: a longer `PATH` in another terminal no longer recompiles every
/// libtorch crate.
fn libtorch_lib_dir() -> Option<PathBuf> {
    for name in [
        "LIBTORCH_LIB",
        "LIBTORCH",
        "LIBTORCH_USE_PYTORCH",
        "VIRTUAL_ENV",
    ] {
        println!("cargo:rerun-if-env-changed={name}");
    }
    if let Some(lib) = std::env::var_os("LIBTORCH_LIB") {
        return Some(PathBuf::from(lib));
    }
    if let Some(root) = std::env::var_os("LIBTORCH") {
        return Some(PathBuf::from(root).join("lib"));
    }
    std::env::var_os("LIBTORCH_USE_PYTORCH")?;
    let python = match std::env::var_os("VIRTUAL_ENV") {
        Some(venv) => PathBuf::from(venv).join("bin").join("python"),
        None => {
            println!("cargo:rerun-if-env-changed=PATH");
            PathBuf::from("python3")
        }
    };
    let output = std::process::Command::new(python)
        .arg("-c")
        .arg("from torch.utils import cpp_extension; print(cpp_extension.library_paths()[0])")
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let dir = PathBuf::from(String::from_utf8(output.stdout).ok()?.trim());
    println!("cargo:rerun-if-changed={}", dir.display());
    Some(dir)
}

/// Prints the `cargo:rustc-link-arg` lines that give every target of the
/// calling package an rpath to libtorch (absolute, canonical) and to
/// `$ORIGIN/libtorch`. Call it from `build.rs`. Prints a `cargo:warning`
/// and no rpath when the directory cannot be found: the programs then need
/// `LD_LIBRARY_PATH` as before.
pub fn libtorch_rpath() {
    match libtorch_lib_dir() {
        Some(dir) => {
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
            println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/libtorch");
        }
        None => println!(
            "cargo:warning=libtorch's directory not found (set LIBTORCH or LIBTORCH_USE_PYTORCH=1 with torch installed): the binaries will need LD_LIBRARY_PATH"
        ),
    }
}
