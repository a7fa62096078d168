//! The `moltbot-gateway` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_gateway::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main("moltbot-gateway", &telemetry, moltbot_gateway::serve(args))
}
