//! The `moltbot-understanding` binary: serves, or with `train` as the first
//! argument trains the intent head (`moltbot-understanding train --help`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    if std::env::args().nth(1).as_deref() == Some("train") {
        let args = moltbot_understanding::train::TrainArgs::parse_from(std::env::args().skip(1));
        return match moltbot_understanding::train::run(&args) {
            Ok(m) => {
                println!(
                    "in-scope accuracy {:.4}, out-of-scope recall {:.4} (precision {:.4}), domain accuracy {:.4}, threshold {:.2}, probe out-of-scope recall {}; written to {}",
                    m.in_scope_accuracy,
                    m.out_of_scope_recall,
                    m.out_of_scope_precision,
                    m.domain_accuracy,
                    m.threshold,
                    m.probe_out_of_scope_recall
                        .map_or_else(|| "-".to_owned(), |r| format!("{r:.3}")),
                    args.out.display()
                );
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let args = moltbot_understanding::Args::parse();
    let telemetry = args.telemetry.clone();
    moltbot_runtime::run_main(
        moltbot_runtime::ports::UNDERSTANDING.binary,
        &telemetry,
        moltbot_understanding::serve(args),
    )
}
