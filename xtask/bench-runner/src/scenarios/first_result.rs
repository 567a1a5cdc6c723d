//! `first_result`: `run_iter` over tasks of 100 ms on 2 workers: how soon the first result
//! arrives (it should be as soon as the first task ends, with no polling delay).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Instant;

use parjob::{Backend, Parallel, delayed};

use super::Context;
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::rules::FIRST_RESULT_MS;
use crate::work::nap;

fn tasks(ctx: &Context) -> u64 {
    if ctx.quick { 4 } else { 20 }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "`run_iter` over {} tasks sleeping {FIRST_RESULT_MS} ms on 2 workers; timed until the \
         first result, then the rest is drained untimed",
        tasks(ctx)
    )
}

/// Two threads taking tasks from a counter and sending `(index, result)` down a channel; the
/// time until task 0's result arrives.
fn threads_first(count: u64) -> std::time::Duration {
    let start = Instant::now();
    let next = AtomicU64::new(0);
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|s| {
        for _ in 0..2 {
            let tx = tx.clone();
            let next = &next;
            s.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    // The receiver outlives the scope; a failed send cannot happen.
                    let _ = tx.send((i, nap(FIRST_RESULT_MS)));
                }
            });
        }
        drop(tx);
        let mut first = None;
        for (i, _) in rx.iter() {
            if i == 0 && first.is_none() {
                first = Some(start.elapsed());
            }
        }
        first.unwrap_or_else(|| start.elapsed())
    })
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let count = tasks(ctx);
    let mut candidates: Vec<Candidate> = ctx
        .backends
        .iter()
        .map(|&b| {
            let workers = if b == Backend::Sequential { 1 } else { 2 };
            let p = Parallel::new(workers).backend(b);
            Candidate::timed("", parjob_name(b), Group::Parjob, move || {
                let start = Instant::now();
                let mut results = p.run_iter((0..count).map(|_| delayed(nap, FIRST_RESULT_MS)));
                let first = results.next();
                let elapsed = start.elapsed();
                match first {
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(Failure::from(e)),
                    None => return Err(Failure::Failed("run_iter yielded nothing".into())),
                }
                // The sequential backend runs on this thread: dropping the iterator stops it
                // at once. Pools are drained, so that no task of this run overlaps the next.
                if b != Backend::Sequential {
                    for r in results {
                        r?;
                    }
                }
                Ok(elapsed)
            })
        })
        .collect();
    candidates.push(Candidate::timed(
        "",
        "std::thread + mpsc channel",
        Group::Reference,
        move || Ok(threads_first(count)),
    ));
    let outcomes = interleaved("first_result", ctx.plan, candidates);
    Measurement::from_outcomes("first_result", outcomes, |_| (0.0, ""))
}
