//! The scenarios of issue 4 and docs/TARGETS.md, one module each. Every scenario times
//! parjob's backends beside references doing the same calls, interleaved (see `measure`).

mod big_input;
mod big_result;
mod cpu_halves;
mod crash;
mod first_result;
mod memory;
pub mod mpi;
mod procspawn_peer;
mod sleep_io;
mod small;
mod startup;

pub use small::TRACED;
pub use startup::NOOP_ARG;
mod timeout;
mod tiny;

use parjob::Backend;

use crate::measure::Plan;
use crate::report::Measurement;

/// What every scenario needs to know about this run.
pub struct Context {
    /// `--quick`: smaller sizes, fewer repeats.
    pub quick: bool,
    /// The parjob backends to run.
    pub backends: Vec<Backend>,
    /// Runs of each implementation in the longer scenarios.
    pub plan: Plan,
    /// Runs of each implementation in the cheap scenarios (`startup`, `crash`).
    pub short_plan: Plan,
    /// Workers for the throughput scenarios (`small`, `tiny`): every CPU.
    pub workers: usize,
    /// `--peers`: also time the Rust peer (procspawn's `Pool`) in the process rows.
    pub peers: bool,
}

/// What one run of a scenario does, for the report.
pub fn size(scenario: &str, ctx: &Context) -> String {
    match scenario {
        "small" => small::size(ctx),
        "tiny" => tiny::size(ctx),
        "cpu_halves" => cpu_halves::size(ctx),
        "sleep_io" => sleep_io::size(ctx),
        "startup" => startup::size(),
        "big_input" => big_input::size(),
        "big_result" => big_result::size(),
        "crash" => crash::size(),
        "timeout" => timeout::size(),
        "first_result" => first_result::size(ctx),
        "memory" => memory::size(ctx),
        "mpi" => mpi::size(ctx),
        _ => String::new(),
    }
}

/// Runs one scenario by name (one of `report::SCENARIOS`). `mpi` is not run here: its rows
/// come from the step `cargo xtask bench` runs under `mpirun` (see [`mpi`]).
pub fn run(scenario: &str, ctx: &Context) -> Vec<Measurement> {
    match scenario {
        "small" => small::run(ctx),
        "tiny" => tiny::run(ctx),
        "cpu_halves" => cpu_halves::run(ctx),
        "sleep_io" => sleep_io::run(ctx),
        "startup" => startup::run(ctx),
        "big_input" => big_input::run(ctx),
        "big_result" => big_result::run(ctx),
        "crash" => crash::run(ctx),
        "timeout" => timeout::run(ctx),
        "first_result" => first_result::run(ctx),
        "memory" => memory::run(ctx),
        _ => Vec::new(),
    }
}

/// A rayon pool of `threads` threads for the references, so they use as many threads as
/// parjob's workers and never the global pool's own count.
fn rayon_pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("building a rayon pool of a handful of threads: the process can make threads")
}

/// `f` over `0..n` on `threads` scoped threads, each taking one contiguous chunk of the
/// output: the hand-written reference.
fn scope_map(n: u64, threads: usize, f: impl Fn(u64) -> u64 + Copy + Send) -> Vec<u64> {
    let len = usize::try_from(n).expect("benchmark sizes fit in memory, so in usize");
    let mut out = vec![0u64; len];
    let chunk = len.div_ceil(threads.max(1)).max(1);
    std::thread::scope(|s| {
        for (c, part) in out.chunks_mut(chunk).enumerate() {
            s.spawn(move || {
                let first = (c * chunk) as u64;
                for (i, slot) in part.iter_mut().enumerate() {
                    *slot = f(first + i as u64);
                }
            });
        }
    });
    out
}

/// The throughput scenarios (`small`, `tiny`): `n` calls of `f` on every parjob backend and
/// on the references, results collected in order, and the `extra` candidates of the scenario
/// (`small, traced`) interleaved with them. `f` is a `fn` item (zero-sized), so the process
/// backend can call it.
fn map_calls<F>(
    ctx: &Context,
    name: &'static str,
    n: u64,
    f: F,
    extra: Vec<crate::measure::Candidate>,
) -> Vec<Measurement>
where
    F: Fn(u64) -> u64 + Copy + Send + Sync + 'static,
{
    use parjob::{Parallel, delayed};
    use rayon::prelude::*;

    use crate::measure::{Candidate, interleaved};
    use crate::rules::{LOOP, RAYON, SCOPE};

    let workers = ctx.workers;
    let mut candidates: Vec<Candidate> = Vec::new();
    for &b in &ctx.backends {
        let p = Parallel::new(workers as i32).backend(b);
        candidates.push(Candidate::parjob("", b, move || {
            p.run((0..n).map(|i| delayed(f, i)))
        }));
    }
    let pool = rayon_pool(workers);
    candidates.push(Candidate::reference("", RAYON, move || {
        pool.install(|| (0..n).into_par_iter().map(f).collect::<Vec<u64>>())
    }));
    candidates.push(Candidate::reference("", SCOPE, move || {
        scope_map(n, workers, f)
    }));
    candidates.push(Candidate::reference("", LOOP, move || {
        (0..n).map(f).collect::<Vec<u64>>()
    }));
    candidates.extend(extra);
    let outcomes = interleaved(name, ctx.plan, candidates);
    Measurement::from_outcomes(name, outcomes, |_| (n as f64, "tasks"))
}
