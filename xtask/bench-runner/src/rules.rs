//! What each row is compared with, and the targets of docs/TARGETS.md.
//!
//! One place for both, used for parjob's rows, the Rust references and the Python peers alike,
//! so that a row's ratio means the same thing wherever it came from.

use crate::measure::Group;
use crate::report::Measurement;

/// The reference implementation names, as rows and the Python script spell them.
pub const RAYON: &str = "rayon par_iter";
/// A rayon pool used directly (`startup`).
pub const RAYON_POOL: &str = "rayon ThreadPool";
/// Starting the bench's own executable and waiting for it to exit (`startup`).
pub const SPAWN: &str = "spawn + wait this executable";
/// `std::thread::scope` with the input cut into one chunk per thread.
pub const SCOPE: &str = "std::thread::scope";
/// A plain loop on the calling thread.
pub const LOOP: &str = "sequential loop";

/// `sleep_io`: tasks per run and how long each sleeps.
pub const SLEEP_TASKS: u64 = 100;
/// `sleep_io`: milliseconds each task sleeps.
pub const SLEEP_MS: u64 = 10;
/// `sleep_io` at this `n_jobs` and above: one task per worker, `n_jobs` tasks in all (the
/// I/O-sized pool of DESIGN's section 7).
pub const SLEEP_WIDE: u64 = 1000;

/// `sleep_io`: how many tasks a run at `n_jobs` has.
pub fn sleep_tasks(n_jobs: u64) -> u64 {
    if n_jobs >= SLEEP_WIDE {
        n_jobs
    } else {
        SLEEP_TASKS
    }
}
/// `first_result`: milliseconds each task sleeps.
pub const FIRST_RESULT_MS: u64 = 100;

/// `timeout`: the per-task limit, and how long the task that runs past it would sleep.
pub const TIMEOUT_LIMIT_MS: u64 = 100;
/// `timeout`: milliseconds the task sleeps (it is killed at the limit).
pub const TIMEOUT_TASK_MS: u64 = 10_000;

/// What a row's ratio is taken against.
#[derive(Debug, Clone, PartialEq)]
pub enum Reference {
    /// Another row of the same scenario.
    Row {
        /// Its variant.
        variant: String,
        /// Its implementation.
        implementation: String,
    },
    /// A figure no implementation can beat (a sleep's own length).
    Ideal {
        /// How it is shown: `ideal 10 ms`.
        label: String,
        /// Its time in seconds.
        seconds: f64,
    },
    /// Nothing: the row stands alone.
    None,
}

/// The reference for a row. The ratio is then the row's throughput over the reference's (for
/// equal work: the reference's time over the row's), so above 1 means faster.
pub fn reference_for(m: &Measurement) -> Reference {
    let row = |variant: &str, implementation: &str| {
        if m.variant == variant && m.implementation == implementation {
            Reference::None
        } else {
            Reference::Row {
                variant: variant.to_string(),
                implementation: implementation.to_string(),
            }
        }
    };
    match m.scenario.as_str() {
        // A traced run against the same implementation's plain run.
        "small" if m.variant == crate::scenarios::TRACED => row("", &m.implementation),
        "small" | "tiny" | "big_input" | "big_result" => row(&m.variant, RAYON),
        // Storing against the same run without a memory; cached runs stand alone.
        "memory" if m.variant == "small, storing" => row("small, no memory", &m.implementation),
        "startup" if m.group == Group::Reference => Reference::None,
        // A process pool's start is held against starting one process, a thread pool's
        // against rayon's.
        "startup" if m.variant == "fresh pool" && is_process_pool(&m.implementation) => {
            row(&m.variant, SPAWN)
        }
        "startup" => row(&m.variant, RAYON_POOL),
        // Speedup: two workers against the same implementation with one.
        "cpu_halves" if m.variant == "n_jobs=2" => row("n_jobs=1", &m.implementation),
        "cpu_halves" if m.group == Group::Peer => Reference::None,
        "cpu_halves" => row("n_jobs=1", LOOP),
        "sleep_io" => match n_jobs_of(&m.variant) {
            Some(n) => {
                let waves = sleep_tasks(n).div_ceil(n);
                let seconds = (waves * SLEEP_MS) as f64 / 1000.0;
                Reference::Ideal {
                    label: format!("ideal {} ms", waves * SLEEP_MS),
                    seconds,
                }
            }
            None => Reference::None,
        },
        // The MPI group: speedup of 2 worker ranks over 1, for parjob and mpi4py.futures alike.
        "mpi" if m.variant == "cpu_halves, 2 ranks" => row("cpu_halves, 1 rank", &m.implementation),
        "first_result" => Reference::Ideal {
            label: format!("ideal {FIRST_RESULT_MS} ms"),
            seconds: FIRST_RESULT_MS as f64 / 1000.0,
        },
        "timeout" if m.variant == "limit to error" => Reference::Ideal {
            label: format!("ideal {TIMEOUT_LIMIT_MS} ms"),
            seconds: TIMEOUT_LIMIT_MS as f64 / 1000.0,
        },
        // The call after a worker was killed, against a call on a pool that lost none and
        // sat idle as long (a call after an idle spell wakes halted CPUs: see `timeout.rs`).
        "timeout" if m.variant == "next call" => row("warm call after idle", &m.implementation),
        _ => Reference::None,
    }
}

/// Whether an implementation runs its tasks in other processes.
fn is_process_pool(implementation: &str) -> bool {
    ["process", "loky", "ProcessPool", "procspawn"]
        .iter()
        .any(|word| implementation.contains(word))
}

/// `n_jobs=10` -> 10.
pub fn n_jobs_of(variant: &str) -> Option<u64> {
    variant.strip_prefix("n_jobs=")?.parse().ok()
}

/// A goal from docs/TARGETS.md.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Target {
    /// The ratio to the reference is at least this.
    RatioAtLeast(f64),
    /// The median is at most this many seconds.
    SecondsAtMost(f64),
    /// The throughput (work units per second) is at least this.
    RateAtLeast(f64),
    /// It runs without error (the pool stays usable after a crash).
    Succeeds,
}

impl Target {
    /// The target as the table shows it; `unit` is the row's work unit.
    pub fn describe(self, unit: &str) -> String {
        match self {
            Target::RatioAtLeast(r) => format!(">= {r}x"),
            Target::SecondsAtMost(s) => format!("<= {}", crate::report::fmt_seconds(s)),
            Target::RateAtLeast(r) => format!(">= {}", crate::report::fmt_rate(r, unit)),
            Target::Succeeds => "succeeds".to_string(),
        }
    }

    /// Whether a row with this median, throughput and ratio meets the target.
    pub fn met(self, median: Option<f64>, rate: Option<f64>, ratio: Option<f64>) -> Option<bool> {
        match self {
            Target::RatioAtLeast(goal) => ratio.map(|r| r >= goal),
            Target::SecondsAtMost(goal) => median.map(|m| m <= goal),
            Target::RateAtLeast(goal) => rate.map(|r| r >= goal),
            Target::Succeeds => Some(median.is_some()),
        }
    }
}

/// docs/TARGETS.md's target for a parjob row, if it has one.
pub fn target_for(m: &Measurement) -> Option<Target> {
    if m.group != Group::Parjob {
        return None;
    }
    let backend = m.implementation.strip_prefix("parjob ")?;
    let process = backend == "process";
    let threading = backend == "threading";
    match (m.scenario.as_str(), m.variant.as_str()) {
        // Issue 12: a trace costs under 5% on small (0.952 = 1 / 1.05).
        ("small", crate::scenarios::TRACED) => Some(Target::RatioAtLeast(0.952)),
        ("small", _) if threading => Some(Target::RatioAtLeast(0.9)),
        ("small", _) if process => Some(Target::RatioAtLeast(0.8)),
        ("tiny", _) if threading => Some(Target::RatioAtLeast(0.5)),
        ("tiny", _) if process => Some(Target::RateAtLeast(3e7)),
        ("cpu_halves", "n_jobs=2") if threading || process => Some(Target::RatioAtLeast(1.9)),
        ("sleep_io", "n_jobs=100") if threading => Some(Target::SecondsAtMost(0.012)),
        ("sleep_io", "n_jobs=1000") if threading => Some(Target::SecondsAtMost(0.050)),
        ("startup", "fresh pool") if process => Some(Target::SecondsAtMost(0.005)),
        ("startup", "warm pool") if process => Some(Target::SecondsAtMost(0.0002)),
        // "2 GB/s the first time, 5 GB/s when the same shared data is reused": shared data,
        // as joblib memory-maps arrays.
        ("big_input", "shared, first send") if process => Some(Target::RateAtLeast(2.0)),
        // Issue 15: owned data both ways, 2 GB/s on a fresh pool and 5 GB/s on a warm one;
        // a `SharedSlice` made and first sent at 2 GB/s.
        ("big_input" | "big_result", "first send") if process => Some(Target::RateAtLeast(2.0)),
        ("big_input" | "big_result", "warm pool") if process => Some(Target::RateAtLeast(5.0)),
        ("big_input", "shared, made + first send") if process => Some(Target::RateAtLeast(2.0)),
        ("big_input", "shared, reused") if process => Some(Target::RateAtLeast(5.0)),
        ("crash", "abort to error") if process => Some(Target::SecondsAtMost(0.010)),
        ("crash", "next call") if process => Some(Target::Succeeds),
        // Issue 15: a timeout within 1 ms of its limit, and the next call as fast as a warm
        // call after the same idle spell (within the noise of a sub-millisecond row: 0.9x).
        ("timeout", "limit to error") if process => Some(Target::SecondsAtMost(
            (TIMEOUT_LIMIT_MS + 1) as f64 / 1000.0,
        )),
        ("timeout", "next call") if process => Some(Target::RatioAtLeast(0.9)),
        ("first_result", _) if threading || process => Some(Target::SecondsAtMost(0.101)),
        // Issue 11: the MPI group, 2 worker ranks under `mpirun --oversubscribe -n 3`.
        ("mpi", "tiny") if backend == "mpi" => Some(Target::RateAtLeast(1e7)),
        ("mpi", "cpu_halves, 2 ranks") if backend == "mpi" => Some(Target::RatioAtLeast(1.8)),
        ("mpi", "warm small call") if backend == "mpi" => Some(Target::SecondsAtMost(0.0003)),
        ("mpi", "abort to error") if backend == "mpi" => Some(Target::SecondsAtMost(0.020)),
        ("mpi", "next call") if backend == "mpi" => Some(Target::Succeeds),
        // Issue 13: a fully cached re-run at 1e6 tasks/s, storing within 10% on small.
        ("memory", "cached re-run") => Some(Target::RateAtLeast(1e6)),
        ("memory", "small, storing") => Some(Target::RatioAtLeast(1.0 / 1.1)),
        _ => None,
    }
}
