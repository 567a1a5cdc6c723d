//! `tiny`: 10^6 calls of `x * x`: nothing but per-task overhead.

use super::{Context, map_calls};
use crate::report::Measurement;
use crate::work::square;

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
    map_calls(ctx, "tiny", calls(ctx), square, Vec::new())
}
