//! `timeout`: a process worker runs past its per-task limit; how long until `run` returns
//! `Error::Timeout`, and how long the next call on the same pool takes (its worker was killed
//! and is being replaced) beside a call on a warm pool.
//!
//! The next call comes after the pool sat idle for the whole limit, and on this VM a call
//! after an idle spell of 10 ms or more costs about twice one right after another call (the
//! idle vCPUs are halted and woken: `warm pool, idle 0/1/10/100 ms then a call: 112/123/236/
//! 257 us`, and 129 us after 100 ms when another thread keeps a CPU busy). So the next call is
//! compared with a call on a warm pool after the same idle spell (`warm call after idle`), and
//! a call right after another (`warm call`) is shown beside it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parjob::{Backend, Parallel, delayed};

use super::{Context, procspawn_peer};
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::rules::{TIMEOUT_LIMIT_MS, TIMEOUT_TASK_MS};
use crate::work::{nap, square};

/// What one run of this scenario does, for the report.
pub fn size() -> String {
    format!(
        "a warm pool of 2 process workers with a {TIMEOUT_LIMIT_MS} ms per-task timeout runs one \
         task that sleeps {TIMEOUT_TASK_MS} ms; limit to error: that `run` until it returns \
         `Error::Timeout` (ideal: the limit); next call: one `x * x` task on the same `Parallel` \
         right after; warm call: the same on a pool that lost no worker, right after another \
         call; warm call after idle: the same after the pool sat idle for {TIMEOUT_LIMIT_MS} ms, \
         as the next call's pool did"
    )
}

/// Times the process backend on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut all = Vec::new();
    for &b in &ctx.backends {
        if b != Backend::Process {
            // A thread cannot be killed: the threading backend reports the timeout and lets
            // the task run on, so "the next call" would not measure a replacement.
            all.push(Measurement::unavailable(
                "timeout",
                "limit to error",
                &parjob_name(b),
                Group::Parjob,
                format!("the {b} backend cannot kill a task that runs in the bench's own process"),
            ));
        }
    }
    if !ctx.backends.contains(&Backend::Process) {
        return all;
    }
    let limit = Duration::from_millis(TIMEOUT_LIMIT_MS);
    let p = Arc::new(Parallel::new(2).backend(Backend::Process).timeout(limit));
    let q = Arc::clone(&p);
    let warm = Arc::new(Parallel::new(2).backend(Backend::Process).timeout(limit));
    let idle_warm = Arc::clone(&warm);
    let mut candidates = vec![
        Candidate::timed(
            "limit to error",
            parjob_name(Backend::Process),
            Group::Parjob,
            move || {
                let start = Instant::now();
                let out = p.run([delayed(nap, TIMEOUT_TASK_MS)]);
                let elapsed = start.elapsed();
                match out {
                    Err(parjob::Error::Timeout { .. }) => Ok(elapsed),
                    Err(other) => Err(Failure::from(other)),
                    Ok(_) => Err(Failure::Failed(format!(
                        "the {TIMEOUT_TASK_MS} ms task returned a result instead of timing out"
                    ))),
                }
            },
        ),
        Candidate::parjob("next call", Backend::Process, move || {
            q.run([delayed(square, 3)])
        }),
        Candidate::parjob("warm call", Backend::Process, move || {
            warm.run([delayed(square, 3)])
        }),
        Candidate::timed(
            "warm call after idle",
            parjob_name(Backend::Process),
            Group::Parjob,
            move || {
                std::thread::sleep(limit);
                let start = Instant::now();
                let out = idle_warm.run([delayed(square, 3)]);
                let elapsed = start.elapsed();
                out.map(|_| elapsed).map_err(Failure::from)
            },
        ),
    ];
    if ctx.peers {
        candidates.extend(procspawn_peer::timeout(limit, TIMEOUT_TASK_MS, nap, square));
    }
    let outcomes = interleaved("timeout", ctx.short_plan, candidates);
    all.extend(Measurement::from_outcomes("timeout", outcomes, |_| {
        (0.0, "")
    }));
    all
}
