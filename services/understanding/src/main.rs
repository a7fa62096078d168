//! The `moltbot-understanding` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_understanding::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::UNDERSTANDING.binary,
        &telemetry,
        moltbot_understanding::serve(args),
    )
}
