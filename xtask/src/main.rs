//! parjob's project chores, run as `cargo xtask <command>`.
//!
//! - `cargo xtask ci`: a quick local subset of CI (format check, clippy with warnings denied,
//!   the tests); the full CI is `.ci/run` (also rustdoc, the MSRV build, Miri, the fuzz smoke
//!   runs, the MPI suite and the bench smoke test).
//! - `cargo xtask bench`: parjob's speed as ratios against rayon, std threads, a loop and
//!   Python's joblib; see docs/BENCHMARKS.md.
//! - `cargo xtask trace-shot`: runs the `flaky` example with a trace and screenshots it
//!   (rendered by `timeline.html`) with headless Chromium into docs/flaky-trace.png.

mod bench;
mod trace_shot;

use std::process::{Command, ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "parjob's project chores")]
struct Cli {
    #[command(subcommand)]
    command: Chore,
}

#[derive(Subcommand)]
enum Chore {
    /// Runs a quick local subset of CI: cargo fmt --check, clippy -D warnings, the test suite
    /// (the full CI is .ci/run).
    Ci,
    /// Times parjob's backends against rayon, std threads, a loop (and Python's joblib with
    /// --peers); writes target/bench/report.md, report.json and plots.
    Bench(bench::BenchArgs),
    /// Runs the flaky example with PARJOB_TRACE set and screenshots its trace, rendered as a
    /// timeline, with headless Chromium: docs/flaky-trace.png.
    TraceShot(trace_shot::TraceShotArgs),
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Chore::Ci => ci(),
        Chore::Bench(args) => bench::run(args),
        Chore::TraceShot(args) => trace_shot::run(args),
    }
}

fn ci() -> ExitCode {
    let steps: [&[&str]; 3] = [
        &["fmt", "--all", "--", "--check"],
        &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        &["test", "--workspace"],
    ];
    for args in steps {
        eprintln!("xtask ci: cargo {}", args.join(" "));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        match Command::new(cargo).args(args).status() {
            Ok(status) if status.success() => {}
            Ok(status) => {
                eprintln!("xtask ci: cargo {} failed ({status})", args.join(" "));
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("xtask ci: cannot run cargo: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
