//! `small`: 10^6 calls of about 1 us of work each: parjob's throughput against raw rayon.

use super::{Context, map_calls};
use crate::report::Measurement;
use crate::work::spin;

fn calls(ctx: &Context) -> u64 {
    if ctx.quick { 100_000 } else { 1_000_000 }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{} calls of `spin` (about 1 us of dependent arithmetic) on {} workers, results collected in order",
        calls(ctx),
        ctx.workers
    )
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    map_calls(ctx, "small", calls(ctx), spin)
}
