//! `crash`: a process worker aborts; how long until `run` returns the error, and whether the
//! pool then runs the next call.

use std::sync::Arc;
use std::time::Instant;

use parjob::{Backend, Parallel, delayed};

use super::{Context, procspawn_peer};
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::work::{abort_now, square};

/// What one run of this scenario does, for the report.
pub fn size() -> String {
    "a warm pool of 2 process workers runs one task that calls `std::process::abort()`; abort \
     to error: that `run` until it returns `Error::WorkerCrashed`; next call: one `x * x` task \
     on the same `Parallel` right after"
        .to_string()
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut all = Vec::new();
    // Threads share the bench's process: an abort there would end the bench itself.
    for &b in &ctx.backends {
        if b != Backend::Process {
            all.push(Measurement::unavailable(
                "crash",
                "abort to error",
                &parjob_name(b),
                Group::Parjob,
                format!(
                    "the {b} backend runs tasks in the bench's own process, which an abort would end"
                ),
            ));
        }
    }
    if !ctx.backends.contains(&Backend::Process) {
        return all;
    }
    let p = Arc::new(Parallel::new(2).backend(Backend::Process));
    let q = Arc::clone(&p);
    let mut candidates = vec![
        Candidate::timed(
            "abort to error",
            parjob_name(Backend::Process),
            Group::Parjob,
            move || {
                let start = Instant::now();
                let out = p.run([delayed(abort_now, ())]);
                let elapsed = start.elapsed();
                match out {
                    Err(parjob::Error::WorkerCrashed { .. }) => Ok(elapsed),
                    Err(other) => Err(Failure::from(other)),
                    Ok(_) => Err(Failure::Failed(
                        "the aborting task returned a result instead of crashing".into(),
                    )),
                }
            },
        ),
        Candidate::parjob("next call", Backend::Process, move || {
            q.run([delayed(square, 3)])
        }),
    ];
    if ctx.peers {
        candidates.extend(procspawn_peer::crash(abort_now, square));
    }
    let outcomes = interleaved("crash", ctx.short_plan, candidates);
    all.extend(Measurement::from_outcomes("crash", outcomes, |_| (0.0, "")));
    all
}
