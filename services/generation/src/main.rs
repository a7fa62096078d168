//! The `moltbot-generation` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_generation::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::GENERATION.binary,
        &telemetry,
        moltbot_generation::serve(args),
    )
}
