//! The `moltbot-auth-rotation` binary: parses flags and environment, then serves.

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = moltbot_auth_rotation::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::AUTH_ROTATION.binary,
        &telemetry,
        moltbot_auth_rotation::serve(args),
    )
}
