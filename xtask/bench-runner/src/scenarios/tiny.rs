//! `tiny`: 10^6 calls of `x * x`: nothing but per-task overhead.

use super::{Context, map_calls, procspawn_peer};
use crate::report::Measurement;
use crate::work::{square, square_chunk};

fn calls(ctx: &Context) -> u64 {
    if ctx.quick { 200_000 } else { 1_000_000 }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{} calls of `square` (`x * x`) on {} workers, results collected in order",
        calls(ctx),
        ctx.workers
    )
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let n = calls(ctx);
    let peers = if ctx.peers {
        procspawn_peer::map_calls(ctx.workers, n, square, square_chunk)
    } else {
        Vec::new()
    };
    let mut rows = map_calls(ctx, "tiny", n, square, peers);
    procspawn_peer::fix_per_task_rows(&mut rows, n);
    rows
}
