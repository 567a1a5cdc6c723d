//! `sleep_io`: 100 tasks that sleep 10 ms, on 1, 10, 50 and 100 workers: waiting work, where
//! the ideal wall time is one sleep per wave of workers.

use parjob::{Backend, Parallel, delayed};
use rayon::prelude::*;

use super::{Context, rayon_pool};
use crate::measure::{Candidate, interleaved};
use crate::report::Measurement;
use crate::rules::{LOOP, RAYON, SCOPE, SLEEP_MS, SLEEP_TASKS};
use crate::work::nap;

fn worker_counts(ctx: &Context) -> &'static [i32] {
    if ctx.quick {
        &[10, 100]
    } else {
        &[1, 10, 50, 100]
    }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{SLEEP_TASKS} tasks sleeping {SLEEP_MS} ms, n_jobs = {:?}; reference: the ideal wall time \
         (one sleep per wave of n_jobs tasks)",
        worker_counts(ctx)
    )
}

/// `threads` scoped threads, each sleeping through one contiguous chunk of the tasks.
fn scope_naps(threads: usize) -> u64 {
    let per_thread = SLEEP_TASKS.div_ceil(threads as u64);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..SLEEP_TASKS)
            .step_by(per_thread as usize)
            .map(|first| {
                let count = per_thread.min(SLEEP_TASKS - first);
                s.spawn(move || (0..count).map(|_| nap(SLEEP_MS)).sum::<u64>())
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("nap does not panic"))
            .sum()
    })
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut all = Vec::new();
    for &n in worker_counts(ctx) {
        let variant = format!("n_jobs={n}");
        let threads = n as usize;
        let mut candidates: Vec<Candidate> = Vec::new();
        for &b in &ctx.backends {
            // The sequential backend has one worker whatever n_jobs says.
            if b == Backend::Sequential && n != 1 {
                continue;
            }
            let p = Parallel::new(n).backend(b);
            candidates.push(Candidate::parjob(&*variant, b, move || {
                p.run((0..SLEEP_TASKS).map(|_| delayed(nap, SLEEP_MS)))
            }));
        }
        if n == 1 {
            // One thread of rayon or of std is the loop again: run the loop alone.
            candidates.push(Candidate::reference(&*variant, LOOP, || {
                (0..SLEEP_TASKS).map(|_| nap(SLEEP_MS)).sum::<u64>()
            }));
        } else {
            let pool = rayon_pool(threads);
            candidates.push(Candidate::reference(&*variant, RAYON, move || {
                pool.install(|| {
                    (0..SLEEP_TASKS as usize)
                        .into_par_iter()
                        .with_max_len(1)
                        .map(|_| nap(SLEEP_MS))
                        .sum::<u64>()
                })
            }));
            candidates.push(Candidate::reference(&*variant, SCOPE, move || {
                scope_naps(threads)
            }));
        }
        let outcomes = interleaved("sleep_io", ctx.plan, candidates);
        all.extend(Measurement::from_outcomes("sleep_io", outcomes, |_| {
            (0.0, "")
        }));
    }
    all
}
