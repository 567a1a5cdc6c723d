//! `big_result`: 2 workers each making 100 MB of `f64` and handing it back as a `Vec` (GB/s
//! of results received).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use parjob::{Backend, Parallel, delayed};
use rayon::prelude::*;

use super::{Context, rayon_pool};
use crate::measure::{Attempt, Candidate, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::rules::RAYON;
use crate::work::{make_values, square};

/// Values in each task's result: 100 MB of `f64`.
const VALUES: u64 = 12_500_000;
/// What one run hands back, both results together.
const GIGABYTES: f64 = (2 * VALUES as usize * std::mem::size_of::<f64>()) as f64 / 1e9;

/// What one run of this scenario does, for the report.
pub fn size() -> String {
    format!(
        "2 tasks, one per worker, each making {VALUES} f64 ({:.0} MB) with `make_values` and \
         returning them as a `Vec<f64>` ({:.0} MB back in all, the rate's numerator); first \
         send: the first big run on a pool just started by one small task; warm pool: later \
         runs. The rayon rows make the same calls on 2 threads; every row drops the results \
         inside the clock",
        VALUES as f64 * 8e-6,
        GIGABYTES * 1e3
    )
}

/// Times one run of the two tasks on `p`, the results dropped inside the clock.
fn timed_run(p: &Parallel) -> Attempt {
    let start = Instant::now();
    let results = p.run([delayed(make_values, VALUES), delayed(make_values, VALUES)])?;
    black_box(&results);
    drop(results);
    Ok(start.elapsed())
}

/// Times parjob's backends and rayon on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for &b in &ctx.backends {
        let workers = if b == Backend::Sequential { 1 } else { 2 };
        candidates.push(Candidate::timed(
            "first send",
            parjob_name(b),
            Group::Parjob,
            move || {
                let p = Parallel::new(workers).backend(b);
                // Start the workers first: this row is about the first big result, not start-up.
                p.run([delayed(square, 1)])?;
                timed_run(&p)
            },
        ));
        let p = Parallel::new(workers).backend(b);
        candidates.push(Candidate::timed(
            "warm pool",
            parjob_name(b),
            Group::Parjob,
            move || timed_run(&p),
        ));
    }
    let pool = Arc::new(rayon_pool(2));
    for variant in ["first send", "warm pool"] {
        let pool = Arc::clone(&pool);
        candidates.push(Candidate::timed(
            variant,
            RAYON,
            Group::Reference,
            move || {
                let start = Instant::now();
                let results: Vec<Vec<f64>> =
                    pool.install(|| [VALUES, VALUES].into_par_iter().map(make_values).collect());
                black_box(&results);
                drop(results);
                Ok(start.elapsed())
            },
        ));
    }
    let outcomes = interleaved("big_result", ctx.plan, candidates);
    Measurement::from_outcomes("big_result", outcomes, |_| (GIGABYTES, "GB"))
}
