//! `sleep_io`: 100 tasks that sleep 10 ms, on 1, 10, 50 and 100 workers, and 1000 such tasks
//! on 1000 workers: waiting work, where the ideal wall time is one sleep per wave of workers.

use parjob::{Backend, Parallel, delayed};
use rayon::prelude::*;

use super::{Context, rayon_pool};
use crate::measure::{Candidate, interleaved};
use crate::report::Measurement;
use crate::rules::{LOOP, RAYON, SCOPE, SLEEP_MS, SLEEP_TASKS, SLEEP_WIDE, sleep_tasks};
use crate::work::nap;

fn worker_counts(ctx: &Context) -> &'static [i32] {
    if ctx.quick {
        &[10, 100, 1000]
    } else {
        &[1, 10, 50, 100, 1000]
    }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{SLEEP_TASKS} tasks sleeping {SLEEP_MS} ms, n_jobs = {:?} ({SLEEP_WIDE} tasks at n_jobs = \
         {SLEEP_WIDE}); reference: the ideal wall time (one sleep per wave of n_jobs tasks)",
        worker_counts(ctx)
    )
}

/// `threads` scoped threads, each sleeping through one contiguous chunk of `tasks` tasks.
fn scope_naps(threads: usize, tasks: u64) -> u64 {
    let per_thread = tasks.div_ceil(threads as u64);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..tasks)
            .step_by(per_thread as usize)
            .map(|first| {
                let count = per_thread.min(tasks - first);
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
        let tasks = sleep_tasks(n as u64);
        let mut candidates: Vec<Candidate> = Vec::new();
        for &b in &ctx.backends {
            // The sequential backend has one worker whatever n_jobs says.
            if b == Backend::Sequential && n != 1 {
                continue;
            }
            // 1000 worker processes on a small machine measure its process table, not parjob.
            if b == Backend::Process && n as u64 >= SLEEP_WIDE {
                continue;
            }
            let p = Parallel::new(n).backend(b);
            candidates.push(Candidate::parjob(&*variant, b, move || {
                p.run((0..tasks).map(|_| delayed(nap, SLEEP_MS)))
            }));
        }
        if n == 1 {
            // One thread of rayon or of std is the loop again: run the loop alone.
            candidates.push(Candidate::reference(&*variant, LOOP, || {
                (0..SLEEP_TASKS).map(|_| nap(SLEEP_MS)).sum::<u64>()
            }));
        } else {
            // No rayon row at 1000 threads: its idle threads spin, which would slow the rows
            // interleaved with it (and takes seconds; issue 14 measured 1.6-4.7 s).
            if (n as u64) < SLEEP_WIDE {
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
            }
            candidates.push(Candidate::reference(&*variant, SCOPE, move || {
                scope_naps(threads, tasks)
            }));
        }
        let outcomes = interleaved("sleep_io", ctx.plan, candidates);
        all.extend(Measurement::from_outcomes("sleep_io", outcomes, |_| {
            (0.0, "")
        }));
    }
    all
}
