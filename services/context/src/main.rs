//! The `moltbot-context` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_context::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::CONTEXT.binary,
        &telemetry,
        moltbot_context::serve(args),
    )
}
