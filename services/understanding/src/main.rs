//! The `moltbot-understanding` binary: serves; with `train` as the first
//! argument trains an intent head on labelled data
//! (`moltbot-understanding train --help`), with `eval` scores one
//! (`moltbot-understanding eval --help`). `moltbot intents train|eval`
//! run these.

use clap::Parser;

fn main() -> std::process::ExitCode {
    match std::env::args().nth(1).as_deref() {
        Some("train") => {
            let args =
                moltbot_understanding::train::TrainArgs::parse_from(std::env::args().skip(1));
            finish(moltbot_understanding::train::run(&args).map(|m| {
                println!(
                    "{}: in-scope accuracy {:.4}, out-of-scope recall {:.4} (held out {}; precision {:.4}), domain accuracy {:.4}, threshold {:.2}, probe out-of-scope recall {}, {:.1} min; written to {}",
                    m.model_id,
                    m.in_scope_accuracy,
                    m.out_of_scope_recall,
                    m.held_out
                        .map_or_else(|| "-".to_owned(), |h| format!("{:.4}", h.out_of_scope_recall)),
                    m.out_of_scope_precision,
                    m.domain_accuracy,
                    m.threshold,
                    m.probe_out_of_scope_recall
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
                    m.train_seconds / 60.0,
                    m.out_dir
                );
            }))
        }
        Some("eval") => {
            let args = moltbot_understanding::eval::EvalArgs::parse_from(std::env::args().skip(1));
            finish(
                moltbot_understanding::eval::run(&args)
                    .map(|r| print!("{}", moltbot_understanding::eval::table(&r, args.top))),
            )
        }
        _ => {
            let args = moltbot_understanding::Args::parse();
            let telemetry = args.telemetry.clone();
            moltbot_runtime::run_main(
                moltbot_runtime::ports::UNDERSTANDING.binary,
                &telemetry,
                moltbot_understanding::serve(args),
            )
        }
    }
}

fn finish(result: Result<(), String>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
