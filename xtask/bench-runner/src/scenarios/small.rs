//! `small`: 10^6 calls of about 1 us of work each: parjob's throughput against raw rayon.
//!
//! The `traced` rows run the same calls with a Chrome trace written (`Parallel::trace`),
//! interleaved with the plain rows: what recording every batch and writing the file costs
//! (issue 12: under 5%).

use parjob::{Backend, Parallel, delayed};

use super::{Context, map_calls, procspawn_peer};
use crate::measure::Candidate;
use crate::report::Measurement;
use crate::work::{spin, spin_chunk};

/// The variant of the rows that write a trace.
pub const TRACED: &str = "traced";

fn calls(ctx: &Context) -> u64 {
    if ctx.quick { 100_000 } else { 1_000_000 }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{} calls of `spin` (about 1 us of dependent arithmetic) on {} workers, results collected in order; `{TRACED}`: the same with a Chrome trace written",
        calls(ctx),
        ctx.workers
    )
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let n = calls(ctx);
    let mut traced = Vec::new();
    for &backend in &ctx.backends {
        if !matches!(backend, Backend::Threading | Backend::Process) {
            continue;
        }
        let path = std::env::temp_dir().join(format!(
            "parjob-bench-trace-{}-{backend}.json",
            std::process::id()
        ));
        let parallel = Parallel::new(ctx.workers as i32)
            .backend(backend)
            .trace(&path);
        traced.push(Candidate::parjob(TRACED, backend, move || {
            // The trace is written before `run` returns: its cost is inside the clock.
            let out = parallel.run((0..n).map(|i| delayed(spin, i)));
            let _ = std::fs::remove_file(&path);
            out
        }));
    }
    if ctx.peers {
        traced.extend(procspawn_peer::map_calls(ctx.workers, n, spin, spin_chunk));
    }
    let mut rows = map_calls(ctx, "small", n, spin, traced);
    procspawn_peer::fix_per_task_rows(&mut rows, n);
    rows
}
