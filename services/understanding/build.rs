//! Embeds an rpath to libtorch in every target of this package, so its
//! binaries and tests run without `LD_LIBRARY_PATH` (see
//! `build-support/src/lib.rs`).

fn main() {
    moltbot_build_support::libtorch_rpath();
}
