//! Generates the test-only `moltbot.testing.v1.SlowService` (one unary RPC that
//! sleeps for the requested duration) without a .proto file, using
//! tonic-build's manual service definitions over `prost_types::Duration`.

fn main() {
    let sleep = tonic_prost_build::manual::Method::builder()
        .name("sleep")
        .route_name("Sleep")
        .comment("Sleeps for the requested duration, then echoes it.")
        .input_type("::prost_types::Duration")
        .output_type("::prost_types::Duration")
        .codec_path("::tonic_prost::ProstCodec")
        .build();
    let service = tonic_prost_build::manual::Service::builder()
        .name("SlowService")
        .package("moltbot.testing.v1")
        .comment("Test-only service with one slow RPC.")
        .method(sleep)
        .build();
    tonic_prost_build::manual::Builder::new().compile(&[service]);
}
