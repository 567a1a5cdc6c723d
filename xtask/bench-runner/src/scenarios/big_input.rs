//! `big_input`: 100 MB of `f64` handed to 2 workers, each summing one half (GB/s).

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use parjob::{Backend, Parallel, SharedSlice, delayed};
use rayon::prelude::*;

use super::{Context, procspawn_peer, rayon_pool};
use crate::measure::{Attempt, Candidate, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::rules::{LOOP, RAYON, SCOPE};
use crate::work::{square, sum_owned, sum_shared, sum_slice};

const VALUES: usize = 12_500_000;
const GIGABYTES: f64 = (VALUES * std::mem::size_of::<f64>()) as f64 / 1e9;

/// What one run of this scenario does, for the report.
pub fn size() -> String {
    format!(
        "{VALUES} f64 ({:.0} MB) in two owned halves, one task each on 2 workers; first send: \
         the first big run on a pool just started by one small task; warm pool: later runs. Every \
         row, references too, gets the halves copied before the clock starts and runs \
         `sum_owned` on them (freeing them is counted alike). Shared rows: the same values in one \
         `SharedSlice` cut in two, summed in place (`sum_shared`); first send: made before the \
         clock, sent to a pool just started; made + first send: made inside the clock too; \
         reused: the same slice sent again to a warm pool. Their rayon rows sum two halves of the \
         borrowed array",
        GIGABYTES * 1e3
    )
}

/// The two halves as owned vectors: what a task takes.
fn halves(data: &[f64]) -> [Vec<f64>; 2] {
    let (a, b) = data.split_at(data.len() / 2);
    [a.to_vec(), b.to_vec()]
}

/// Copies the halves (untimed), then times one run of them on `p`.
fn timed_run(p: &Parallel, data: &[f64]) -> Attempt {
    let tasks = halves(data).map(|half| delayed(sum_owned, half));
    let start = Instant::now();
    let sums = p.run(tasks)?;
    let elapsed = start.elapsed();
    black_box(sums);
    Ok(elapsed)
}

/// One `sum_shared` task per half of `shared`.
fn shared_halves(shared: &SharedSlice<f64>) -> impl Iterator<Item = impl parjob::Task> {
    shared
        .chunks(shared.len().div_ceil(2))
        .map(|half| delayed(sum_shared, half))
}

/// Times one run of the two halves of `shared` on `p`.
fn timed_shared_run(p: &Parallel, shared: &SharedSlice<f64>) -> Attempt {
    let start = Instant::now();
    let sums = p.run(shared_halves(shared))?;
    let elapsed = start.elapsed();
    black_box(sums);
    Ok(elapsed)
}

/// A reference timed on owned halves, copied from `data` before the clock starts.
fn owned_reference(
    variant: &str,
    implementation: &str,
    data: Arc<Vec<f64>>,
    sum: impl Fn([Vec<f64>; 2]) -> f64 + Send + 'static,
) -> Candidate {
    Candidate::timed(variant, implementation, Group::Reference, move || {
        let owned = halves(&data);
        let start = Instant::now();
        let total = sum(owned);
        let elapsed = start.elapsed();
        black_box(total);
        Ok(elapsed)
    })
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let data: Arc<Vec<f64>> = Arc::new((0..VALUES).map(|i| (i % 1000) as f64 * 0.5).collect());
    let mut candidates: Vec<Candidate> = Vec::new();
    for &b in &ctx.backends {
        let workers = if b == Backend::Sequential { 1 } else { 2 };
        let data = Arc::clone(&data);
        candidates.push(Candidate::timed(
            "first send",
            parjob_name(b),
            Group::Parjob,
            move || {
                let p = Parallel::new(workers).backend(b);
                // Start the workers first: this row is about the first big send, not start-up.
                p.run([delayed(square, 1)])?;
                timed_run(&p, &data)
            },
        ));
    }
    for &b in &ctx.backends {
        let workers = if b == Backend::Sequential { 1 } else { 2 };
        let p = Parallel::new(workers).backend(b);
        let data = Arc::clone(&data);
        candidates.push(Candidate::timed(
            "warm pool",
            parjob_name(b),
            Group::Parjob,
            move || timed_run(&p, &data),
        ));
    }
    for &b in &ctx.backends {
        let workers = if b == Backend::Sequential { 1 } else { 2 };
        let values = Arc::clone(&data);
        candidates.push(Candidate::timed(
            "shared, first send",
            parjob_name(b),
            Group::Parjob,
            move || {
                let shared = SharedSlice::from_slice(&values);
                let p = Parallel::new(workers).backend(b);
                p.run([delayed(square, 1)])?;
                timed_shared_run(&p, &shared)
            },
        ));
        let values = Arc::clone(&data);
        candidates.push(Candidate::timed(
            "shared, made + first send",
            parjob_name(b),
            Group::Parjob,
            move || {
                let p = Parallel::new(workers).backend(b);
                p.run([delayed(square, 1)])?;
                let start = Instant::now();
                let shared = SharedSlice::from_slice(&values);
                let sums = p.run(shared_halves(&shared))?;
                let elapsed = start.elapsed();
                black_box(sums);
                Ok(elapsed)
            },
        ));
        let p = Parallel::new(workers).backend(b);
        let shared = SharedSlice::from_slice(&data);
        candidates.push(Candidate::timed(
            "shared, reused",
            parjob_name(b),
            Group::Parjob,
            move || timed_shared_run(&p, &shared),
        ));
    }
    for variant in [
        "shared, first send",
        "shared, made + first send",
        "shared, reused",
    ] {
        let pool = Arc::new(rayon_pool(2));
        let data = Arc::clone(&data);
        candidates.push(Candidate::timed(
            variant,
            RAYON,
            Group::Reference,
            move || {
                let start = Instant::now();
                let half = data.len().div_ceil(2);
                let total = pool.install(|| data.par_chunks(half).map(sum_slice).sum::<f64>());
                let elapsed = start.elapsed();
                black_box(total);
                Ok(elapsed)
            },
        ));
    }
    // The references make the same calls as parjob's tasks: `sum_owned` on owned halves
    // copied before the clock starts, so that freeing them is counted for every row alike.
    let pool = Arc::new(rayon_pool(2));
    for variant in ["first send", "warm pool"] {
        let pool = Arc::clone(&pool);
        let data = Arc::clone(&data);
        candidates.push(owned_reference(variant, RAYON, data, move |halves| {
            pool.install(|| halves.into_par_iter().map(sum_owned).sum::<f64>())
        }));
    }
    candidates.push(owned_reference(
        "warm pool",
        SCOPE,
        Arc::clone(&data),
        |[a, b]| {
            std::thread::scope(|s| {
                let other = s.spawn(move || sum_owned(b));
                sum_owned(a) + other.join().expect("sum_owned does not panic")
            })
        },
    ));
    if ctx.peers {
        candidates.extend(procspawn_peer::big_input(
            Arc::clone(&data),
            halves,
            sum_owned,
            square,
        ));
    }
    candidates.push(owned_reference("warm pool", LOOP, data, |halves| {
        halves.into_iter().map(sum_owned).sum::<f64>()
    }));
    let outcomes = interleaved("big_input", ctx.plan, candidates);
    Measurement::from_outcomes("big_input", outcomes, |_| (GIGABYTES, "GB"))
}
