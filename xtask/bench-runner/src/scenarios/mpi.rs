//! `mpi`: the MPI backend in a world of rank 0 and 2 worker ranks. This group runs only under
//! `mpirun` (every rank runs `parjob-bench --mpi-group`, ranks 1.. serve from `parjob::init()`
//! and rank 0 times the variants below), so `cargo xtask bench` starts it as a step of its own
//! and hands its rows (and mpi4py.futures' rows, with `--peers`) to the main run through
//! `--mpi-json` / `--mpi-peers-json`.
//!
//! Variants: `tiny` (10^6 `x * x`, tasks/s over the world), `small` (about 1 us each),
//! `cpu_halves, 1 rank` / `cpu_halves, 2 ranks` (the seeds' CPU-bound halves; the ratio of the
//! second is the speedup), `warm small call` (one `x * x` on the pool that ran `tiny` and `small`), `abort to error`
//! (a task aborts its local worker: until `run` returns the error) and `next call`.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use parjob::{Backend, Error, Parallel, delayed};

use super::Context;
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::work::{abort_now, spin, square, sum_squares};

/// The scenario name every row of this group carries.
pub const SCENARIO: &str = "mpi";

/// How many ranks `cargo xtask bench` starts this group with: rank 0 and 2 worker ranks.
pub const RANKS: usize = 3;

const INTEGERS: u64 = 10_000_000;
const HALVES: [(u64, u64); 2] = [(1, INTEGERS / 2), (2, INTEGERS / 2)];

fn tiny_calls(ctx: &Context) -> u64 {
    if ctx.quick { 200_000 } else { 1_000_000 }
}

fn small_calls(ctx: &Context) -> u64 {
    if ctx.quick { 50_000 } else { 200_000 }
}

/// What one run of this group does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "under `mpirun --oversubscribe -n {RANKS}` (rank 0 drives, 2 worker ranks with their \
         local pools): tiny = {} calls of `x * x`; small = {} calls of `spin` (about 1 us); \
         cpu_halves = {INTEGERS} integers in 2 tasks on 1 rank and on 2 (ratio: speedup); warm \
         small call = one `x * x`; abort to error = a task calls `abort()` in its rank's local \
         worker, until `run` returns the error; next call = one `x * x` right after",
        tiny_calls(ctx),
        small_calls(ctx)
    )
}

/// One row saying why the group has no figures (not under mpirun, no MPI in this build).
pub fn unavailable(implementation: &str, group: Group, why: &str) -> Measurement {
    Measurement::unavailable(SCENARIO, "", implementation, group, why)
}

/// Times the group (on rank 0 of an MPI world) and writes its rows to `out` as JSON, in the
/// shape `peers::load` reads.
pub fn run_group(ctx: &Context, out: &Path) -> Result<(), String> {
    let rows = match Parallel::new(-1)
        .backend(Backend::Mpi)
        .run([delayed(square, 2)])
    {
        Ok(_) => run(ctx),
        Err(e) => vec![unavailable(
            &parjob_name(Backend::Mpi),
            Group::Parjob,
            &format!("the MPI backend cannot run here: {e}"),
        )],
    };
    let file = serde_json::json!({
        "versions": format!("{RANKS} ranks, parjob {}", env!("CARGO_PKG_VERSION")),
        "rows": rows,
    });
    let text = serde_json::to_string_pretty(&file).map_err(|e| e.to_string())?;
    std::fs::write(out, text).map_err(|e| format!("cannot write {}: {e}", out.display()))
}

/// The candidates `PARJOB_BENCH_MPI_VARIANTS` names (variants separated by `;`, e.g.
/// `tiny;cpu_halves, 2 ranks`: some names hold a comma), or all: to profile one variant
/// (`perf record` under mpirun) without the others.
fn chosen(candidates: Vec<Candidate>) -> Vec<Candidate> {
    match std::env::var("PARJOB_BENCH_MPI_VARIANTS") {
        Ok(names) if !names.trim().is_empty() => candidates
            .into_iter()
            .filter(|c| names.split(';').any(|n| n.trim() == c.variant))
            .collect(),
        _ => candidates,
    }
}

fn run(ctx: &Context) -> Vec<Measurement> {
    let mpi = |n_jobs: i32| Parallel::new(n_jobs).backend(Backend::Mpi);
    let (tiny_n, small_n) = (tiny_calls(ctx), small_calls(ctx));
    // One pool for `tiny`, `small` and the warm call, as the mpi4py.futures rows use one
    // executor: a warm call is one on a pool that has been working, not one made a moment
    // before (a fresh `Parallel` starts new local workers on every rank, and calls timed
    // while they start took 1.4-2.4 ms instead of 0.1-0.2 ms).
    let world = Arc::new(mpi(-1));
    let (tiny, small) = (Arc::clone(&world), Arc::clone(&world));
    let one = mpi(1);
    let two = mpi(2);
    let throughput = vec![
        Candidate::parjob("tiny", Backend::Mpi, move || {
            tiny.run((0..tiny_n).map(|i| delayed(square, i)))
        }),
        Candidate::parjob("small", Backend::Mpi, move || {
            small.run((0..small_n).map(|i| delayed(spin, i)))
        }),
    ];
    // Runs of 10-30 ms, whose medians of 5 swing by a quarter from run to run: as many
    // repeats as the other short rows.
    let halves = vec![
        Candidate::parjob("cpu_halves, 1 rank", Backend::Mpi, move || {
            one.run(HALVES.map(|half| delayed(sum_squares, half)))
        }),
        Candidate::parjob("cpu_halves, 2 ranks", Backend::Mpi, move || {
            two.run(HALVES.map(|half| delayed(sum_squares, half)))
        }),
    ];
    let mut outcomes = interleaved(SCENARIO, ctx.plan, chosen(throughput));
    outcomes.extend(interleaved(SCENARIO, ctx.short_plan, chosen(halves)));
    // The warm call is timed apart from the crash rows, as the process backend's is (in
    // `startup`): interleaved with them, it ran while the crashed rank's replacement worker
    // started on one of the two CPUs, which is the next call's row.
    let warm = world;
    // Let the world settle first: right after the `cpu_halves` rows (their pools closing on
    // the ranks, two CPUs just busy) the same calls took 0.39-0.44 ms, after a 100-300 ms
    // pause 0.15-0.26 ms, and 0.17-0.20 ms with no row before them (medians of 20, quiet VM,
    // 2026-12-01). The row is the latency of a call, not of that aftermath.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let warm_call = vec![Candidate::parjob(
        "warm small call",
        Backend::Mpi,
        move || warm.run([delayed(square, 3)]),
    )];
    outcomes.extend(interleaved(SCENARIO, ctx.short_plan, chosen(warm_call)));
    let mut all = Measurement::from_outcomes(SCENARIO, outcomes, |variant| match variant {
        "tiny" => (tiny_n as f64, "tasks"),
        "small" => (small_n as f64, "tasks"),
        _ => (0.0, ""),
    });
    let crashing = Arc::new(mpi(-1));
    let next = Arc::clone(&crashing);
    let short = vec![
        Candidate::timed(
            "abort to error",
            parjob_name(Backend::Mpi),
            Group::Parjob,
            move || {
                let start = Instant::now();
                let out = crashing.run([delayed(abort_now, ())]);
                let elapsed = start.elapsed();
                match out {
                    Err(Error::OnRank { error, .. })
                        if matches!(*error, Error::WorkerCrashed { .. }) =>
                    {
                        Ok(elapsed)
                    }
                    Err(other) => Err(Failure::from(other)),
                    Ok(_) => Err(Failure::Failed(
                        "the aborting task returned a result instead of crashing".into(),
                    )),
                }
            },
        ),
        Candidate::parjob("next call", Backend::Mpi, move || {
            next.run([delayed(square, 3)])
        }),
    ];
    all.extend(Measurement::from_outcomes(
        SCENARIO,
        interleaved(SCENARIO, ctx.short_plan, chosen(short)),
        |_| (0.0, ""),
    ));
    all
}
