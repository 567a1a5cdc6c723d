//! # parjob: joblib-style parallel map for Rust
//!
//! Write plain functions, wrap each call in [`delayed`], and hand the calls to a
//! [`Parallel`]: they run on a pool of threads, in worker processes, or one after another,
//! switched by one
//! [`Backend`] value that a `--backend` flag can parse, with no change to the tasks.
//!
//! ```
//! fn square(x: u64) -> u64 { x * x }
//!
//! fn main() -> Result<(), parjob::Error> {
//!     parjob::init(); // first line of main: turns a re-executed worker process into a worker
//!     let backend: parjob::Backend = "threading".parse()?;
//!     let out: Vec<u64> = parjob::Parallel::new(4)
//!         .backend(backend)
//!         .run((0..1000u64).map(|i| parjob::delayed(square, i)))?;
//!     assert_eq!(out[3], 9);
//!     Ok(())
//! }
//! ```
//!
//! - [`Parallel`]: configure (`n_jobs`, backend, batching, timeout, progress) and run.
//!   For long runs: [`Parallel::run_results`] keeps going past failures, [`Retry`] retries
//!   crashed and timed-out tasks, [`Delayed::timeout`] gives a task its own limit, and
//!   [`Event`]s, [`Insights`] and a Chrome trace ([`Parallel::trace`]) show what a run did.
//! - [`Executor`]: Python's `concurrent.futures` on the same backends: `submit` one task for a
//!   [`Future`], `map`, [`as_completed`], [`wait`], [`Shutdown`], daemon workers. `Future`
//!   keeps `concurrent.futures`' name; note that `use parjob::*` then shadows the 2024
//!   prelude's `std::future::Future` in that module (import the names you use instead).
//! - [`delayed`]: `delayed(f, x)` calls `f(x)`; `delayed(f, (a, b))` calls `f(a, b)`.
//! - [`SharedSlice`]: big read-only arrays that process workers read in place (joblib's
//!   memmapping): copied once into shared memory, then sent as a handle.
//! - [`Backend`]: `sequential`, `threading` (alias `threads`), `process` (aliases
//!   `processes`, `loky`, `multiprocessing`: worker processes, Linux, the `process` feature;
//!   see [`init`] and [`enable_test_support!`]), `mpi` (the `mpi` feature: ranks launched by
//!   `mpirun` or `srun`, see docs/CLUSTER.md).
//! - [`Error`]: every failure, naming the task (`task 7 panicked: ...`).
//! - [`Memory`] (the `memory` feature): joblib's disk cache in an SQLite file;
//!   `parallel.memory(&memory).run(tasks)` runs only the tasks it has no stored result for,
//!   so a killed run resumes where it stopped.
//! - [`cpu_count`], [`effective_n_jobs`], [`worker_info`].
//!
//! A task function is a plain `fn` item (closures work on threads, not in worker processes), whose arguments
//! and result are `serde` types: the same `delayed(...)` then runs on every backend.
//!
//! `PARJOB_BACKEND` and `PARJOB_N_JOBS` set defaults from the environment (for
//! [`Parallel::default`] and a `Parallel` without `.backend(..)`); explicit calls win.
#![deny(missing_docs)]

mod executor;
mod long_runs;
/// Cached results and resumable runs: [`Memory`] and [`Parallel::memory`] (the `memory`
/// feature, on by default).
#[cfg(feature = "memory")]
pub mod memory;
mod parallel;
mod process;
mod sequential;

pub use executor::{Executor, MapTimeout, Shutdown};
#[cfg(feature = "memory")]
pub use memory::{Memory, MemoryError};
pub use parallel::Parallel;
pub use parjob_core::{
    AsCompleted, Future, FutureHandle, Until, Waited, as_completed, wait, wait_timeout,
};
pub use parjob_core::{
    Backend, BatchSize, Delayed, Error, IoCause, NJobs, RunIter, RunUnordered, SHARED_MIN_BYTES,
    SharedSlice, Spread, Task, TaskFn, Whole, WorkerExit, WorkerInfo, cpu_count, delayed,
    effective_n_jobs, worker_info,
};
pub use parjob_core::{Event, EventSink, Insights, Retry, Timed, Transport, WorkerChange};
pub use parjob_core::{LocalTask, set_worker_state, with_worker_state};

/// The extension point for a backend of your own: implement [`Pool`](pool::Pool) and hand it
/// to [`Parallel::with_pool`].
///
/// A pool receives [`Job`](pool::Job)s, one batch of tasks each, and answers every one with
/// [`Job::complete`](pool::Job::complete) or [`Job::run_here`](pool::Job::run_here). Nothing a
/// pool does without `unsafe` can break memory safety: a job it drops completes itself with
/// its tasks cancelled. See `examples/custom_pool.rs`.
pub mod pool {
    pub use parjob_core::{
        ErasedBatch, Job, Pool, RemoteEntry, RunControl, RunOptions, SequentialPool, run,
    };
    /// The threading backend's pool, e.g. for a pool of your own to delegate to.
    #[cfg(feature = "threading")]
    pub use parjob_threading::ThreadPool;
}
/// The number of MPI worker ranks (every rank but 0) once [`init()`] started MPI under a
/// launcher (`mpirun`, `srun`): what `Parallel::new(-1)` runs on with the MPI backend. `None`
/// without a launcher, or in a build without the `mpi` feature.
///
/// ```
/// // Not started by mpirun here: no MPI world.
/// parjob::init();
/// assert_eq!(parjob::mpi_worker_ranks(), None);
/// ```
pub fn mpi_worker_ranks() -> Option<usize> {
    #[cfg(all(feature = "mpi", target_os = "linux"))]
    {
        parjob_mpi::world_size().map(|size| size.saturating_sub(1))
    }
    #[cfg(not(all(feature = "mpi", target_os = "linux")))]
    {
        None
    }
}

#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub use parjob_mpi::break_next_run_for_tests as __mpi_break_next_run;
#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub use parjob_mpi::hold_next_done_for_tests as __mpi_hold_next_done;
#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub use parjob_mpi::panic_driver_for_tests as __mpi_panic_driver;
#[cfg(all(feature = "process", target_os = "linux"))]
#[doc(hidden)]
pub use parjob_process::fail_next_line_reads_for_tests as __process_fail_next_line_reads;
#[doc(hidden)]
pub use process::enable_test_support_now as __enable_test_support;
pub use process::init;
