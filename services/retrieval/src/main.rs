//! The `moltbot-retrieval` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_retrieval::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::RETRIEVAL.binary,
        &telemetry,
        moltbot_retrieval::serve(args),
    )
}
