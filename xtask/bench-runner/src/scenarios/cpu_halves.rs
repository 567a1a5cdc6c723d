//! `cpu_halves`: the seed lesson's sum of squares over 10^7 pseudo-random integers in two
//! halves, on 1 worker and on 2: the speedup a CPU-bound job gets from a second core.

use parjob::{Backend, Parallel, delayed};
use rayon::prelude::*;

use super::{Context, procspawn_peer, rayon_pool};
use crate::measure::{Candidate, interleaved};
use crate::report::Measurement;
use crate::rules::{LOOP, RAYON, SCOPE};
use crate::work::{sum_squares, sum_squares_of};

const INTEGERS: u64 = 10_000_000;
const HALVES: [(u64, u64); 2] = [(1, INTEGERS / 2), (2, INTEGERS / 2)];

/// What one run of this scenario does, for the report.
pub fn size(_ctx: &Context) -> String {
    format!(
        "{INTEGERS} pseudo-random integers made and squared inside 2 tasks (one per half), on \
         n_jobs = 1 and 2; ratio of the n_jobs=2 rows: speedup over the same implementation at n_jobs=1"
    )
}

fn scope_halves(threads: usize) -> u64 {
    if threads == 1 {
        return HALVES.iter().map(|&(s, c)| sum_squares(s, c)).sum();
    }
    std::thread::scope(|s| {
        let handles: Vec<_> = HALVES
            .iter()
            .map(|&(seed, count)| s.spawn(move || sum_squares(seed, count)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("sum_squares does not panic"))
            .fold(0u64, u64::wrapping_add)
    })
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for n in [1, 2] {
        for &b in &ctx.backends {
            // The sequential backend has one worker whatever n_jobs says.
            if b == Backend::Sequential && n == 2 {
                continue;
            }
            let p = Parallel::new(n).backend(b);
            candidates.push(Candidate::parjob(format!("n_jobs={n}"), b, move || {
                p.run(HALVES.map(|half| delayed(sum_squares, half)))
            }));
        }
    }
    for n in [1, 2] {
        let pool = rayon_pool(n);
        candidates.push(Candidate::reference(
            format!("n_jobs={n}"),
            RAYON,
            move || {
                pool.install(|| {
                    HALVES
                        .par_iter()
                        .map(|&(s, c)| sum_squares(s, c))
                        .reduce(|| 0, u64::wrapping_add)
                })
            },
        ));
        candidates.push(Candidate::reference(
            format!("n_jobs={n}"),
            SCOPE,
            move || scope_halves(n),
        ));
    }
    candidates.push(Candidate::reference("n_jobs=1", LOOP, || scope_halves(1)));
    if ctx.peers {
        candidates.extend(procspawn_peer::cpu_halves(HALVES, sum_squares_of));
    }
    // Runs of 8-25 ms, whose medians of 5 swung from 1.4x to 1.9x between full runs of the
    // same code: as many repeats as the other short scenarios.
    let outcomes = interleaved("cpu_halves", ctx.short_plan, candidates);
    Measurement::from_outcomes("cpu_halves", outcomes, |_| (0.0, ""))
}
