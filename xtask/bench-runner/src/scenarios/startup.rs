//! `startup`: a fresh pool of 2 workers to its first result, and a warm pool's small call.

use std::hint::black_box;
use std::process::{Command, Stdio};
use std::time::Instant;

use parjob::{Parallel, delayed};

use super::{Context, procspawn_peer, rayon_pool};
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::rules::{RAYON_POOL, SPAWN};
use crate::work::square;

/// The argument that makes `parjob-bench` exit at once: the cost of starting this executable,
/// the floor under any process pool's start.
pub const NOOP_ARG: &str = "--exit-at-once";

/// What one run of this scenario does, for the report.
pub fn size() -> String {
    "pools of 2 workers; fresh: from building the pool to the first result of one `x * x` task \
     (the pool's shutdown is not counted); warm: one `x * x` task on a started pool"
        .to_string()
}

/// Times parjob's backends and the references on this scenario, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let mut candidates: Vec<Candidate> = Vec::new();
    for &b in &ctx.backends {
        candidates.push(Candidate::timed(
            "fresh pool",
            parjob_name(b),
            Group::Parjob,
            move || {
                let start = Instant::now();
                let parallel = Parallel::new(2).backend(b);
                let out = parallel.run([delayed(square, 7)]);
                let elapsed = start.elapsed();
                black_box(out?);
                drop(parallel);
                Ok(elapsed)
            },
        ));
    }
    for &b in &ctx.backends {
        let p = Parallel::new(2).backend(b);
        candidates.push(Candidate::parjob("warm pool", b, move || {
            p.run([delayed(square, 7)])
        }));
    }
    candidates.push(Candidate::timed(
        "fresh pool",
        RAYON_POOL,
        Group::Reference,
        || {
            let start = Instant::now();
            let pool = rayon_pool(2);
            let out = pool.install(|| black_box(square(7)));
            let elapsed = start.elapsed();
            black_box(out);
            drop(pool);
            Ok(elapsed)
        },
    ));
    let pool = rayon_pool(2);
    candidates.push(Candidate::reference("warm pool", RAYON_POOL, move || {
        pool.install(|| black_box(square(7)))
    }));
    candidates.push(Candidate::reference(
        "fresh pool",
        "std::thread::spawn + join",
        || {
            std::thread::spawn(|| black_box(square(7)))
                .join()
                .expect("square does not panic")
        },
    ));
    candidates.push(Candidate::timed(
        "fresh pool",
        SPAWN,
        Group::Reference,
        || {
            let exe = std::env::current_exe()
                .map_err(|e| Failure::Failed(format!("cannot find this executable: {e}")))?;
            let start = Instant::now();
            let status = Command::new(&exe)
                .arg(NOOP_ARG)
                .stdin(Stdio::null())
                .status()
                .map_err(|e| Failure::Failed(format!("cannot run {}: {e}", exe.display())))?;
            let elapsed = start.elapsed();
            if status.success() {
                Ok(elapsed)
            } else {
                Err(Failure::Failed(format!(
                    "{} {NOOP_ARG} ended with {status}",
                    exe.display()
                )))
            }
        },
    ));
    if ctx.peers {
        candidates.extend(procspawn_peer::startup(square));
    }
    let outcomes = interleaved("startup", ctx.short_plan, candidates);
    Measurement::from_outcomes("startup", outcomes, |_| (0.0, ""))
}
