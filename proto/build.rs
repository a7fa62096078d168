//! Compiles `proto/moltbot/<service>/v1/*.proto` into Rust (messages, clients
//! and servers) and writes one file descriptor set that the runtime registers
//! with gRPC reflection. `protoc` comes from `protoc-bin-vendored`, so no
//! system install is needed.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "moltbot/understanding/v1/understanding.proto",
    "moltbot/generation/v1/generation.proto",
    "moltbot/retrieval/v1/retrieval.proto",
    "moltbot/context/v1/context.proto",
    "moltbot/auth/v1/auth.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("moltbot_descriptor.bin"))
        // Every RPC gets a default body answering UNIMPLEMENTED, so a service
        // implements its RPCs one issue at a time and never fakes a result.
        .generate_default_stubs(true)
        .compile_with_config(config, PROTOS, &["."])?;
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    Ok(())
}
