//! A task that aborts becomes an error, and the pool survives:
//! `cargo run --release --example process_crash -- --backend process` (the default here).
//!
//! On the threading or sequential backend an abort would take this whole program down, so the
//! example only says so. The lesson itself is in `lessons/process_crash.rs`.

mod lessons;

use clap::Parser;
use parjob::Backend;

/// Shows a crashing task and a hung one turned into errors while the pool goes on.
#[derive(Debug, Parser)]
struct Flags {
    /// Where tasks run: process (processes, loky, multiprocessing), threading, sequential.
    #[arg(long, env = "PARJOB_BACKEND", default_value = "process")]
    backend: Backend,
}

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    lessons::process_crash::run(lessons::parse_flags::<Flags>().backend)
}
