//! `small`: 10^6 calls of about 1 us of work each: parjob's throughput against raw rayon.

use parjob::{Parallel, delayed};
use rayon::prelude::*;

use super::{Context, rayon_pool, scope_map};
use crate::measure::{Candidate, interleaved};
use crate::report::Measurement;
use crate::rules::{LOOP, RAYON, SCOPE};
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
    let n = calls(ctx);
    let workers = ctx.workers;
    let mut candidates: Vec<Candidate> = Vec::new();
    for &b in &ctx.backends {
        let p = Parallel::new(workers as i32).backend(b);
        candidates.push(Candidate::parjob("", b, move || {
            p.run((0..n).map(|i| delayed(spin, i)))
        }));
    }
    let pool = rayon_pool(workers);
    candidates.push(Candidate::reference("", RAYON, move || {
        pool.install(|| (0..n).into_par_iter().map(spin).collect::<Vec<u64>>())
    }));
    candidates.push(Candidate::reference("", SCOPE, move || {
        scope_map(n, workers, spin)
    }));
    candidates.push(Candidate::reference("", LOOP, move || {
        (0..n).map(spin).collect::<Vec<u64>>()
    }));
    let outcomes = interleaved("small", ctx.plan, candidates);
    Measurement::from_outcomes("small", outcomes, |_| (n as f64, "tasks"))
}
