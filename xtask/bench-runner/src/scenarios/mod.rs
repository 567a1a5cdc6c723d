//! The scenarios of issue 4 and DESIGN.md section 5, one module each. Every scenario times
//! parjob's backends beside references doing the same calls, interleaved (see `measure`).

mod big_input;
mod cpu_halves;
mod crash;
mod first_result;
mod sleep_io;
mod small;
mod startup;

pub use startup::NOOP_ARG;
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
        "crash" => crash::size(),
        "first_result" => first_result::size(ctx),
        _ => String::new(),
    }
}

/// Runs one scenario by name (one of `report::SCENARIOS`).
pub fn run(scenario: &str, ctx: &Context) -> Vec<Measurement> {
    match scenario {
        "small" => small::run(ctx),
        "tiny" => tiny::run(ctx),
        "cpu_halves" => cpu_halves::run(ctx),
        "sleep_io" => sleep_io::run(ctx),
        "startup" => startup::run(ctx),
        "big_input" => big_input::run(ctx),
        "crash" => crash::run(ctx),
        "first_result" => first_result::run(ctx),
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
fn scope_map(n: u64, threads: usize, f: fn(u64) -> u64) -> Vec<u64> {
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
