//! The core of parjob: tasks, the dispatcher, errors, `n_jobs` rules
//! and the sequential backend. Users depend on the `parjob` crate, which re-exports what they
//! need from here; backend crates implement [`Pool`].
//!
//! - [`delayed`] captures a call as a [`Task`] ([`Delayed`]).
//! - [`run`], [`RunIter`] and [`RunUnordered`] drive a run on any [`Pool`], configured by
//!   [`RunOptions`].
//! - [`submit`] runs one task on its own and returns its [`Future`]; [`as_completed`] and
//!   [`wait`] wait on many futures at once.
//! - [`SharedSlice`] is read-only data a process backend shares instead of copying.
//! - [`Error`] is every failure; [`Backend`] names where tasks run.
//! - [`cpu_count`], [`effective_n_jobs`] and [`worker_info`] answer questions about the machine
//!   and the worker.
//!
//! This crate depends on no backend: threads and processes live in their own crates.
//!
//! ```
//! use std::sync::Arc;
//! use parjob_core::{delayed, run, RunOptions, SequentialPool};
//!
//! fn square(x: u64) -> u64 { x * x }
//! let out = run(Arc::new(SequentialPool), (0..10u64).map(|i| delayed(square, i)), &RunOptions::default())?;
//! assert_eq!(out[3], 9);
//! # Ok::<(), parjob_core::Error>(())
//! ```
#![deny(missing_docs)]

mod backend;
mod batch;
mod batching;
pub mod codec;
mod dispatch;
mod env;
mod error;
mod events;
mod future;
mod insights;
mod local;
mod n_jobs;
mod pool;
#[cfg(test)]
mod pool_contract_tests;
mod process_options;
mod progress;
mod relay;
mod retry;
mod shared;
mod task;
mod trace;
#[cfg(feature = "tracing")]
mod tracing_bridge;
mod worker;
mod worker_state;

pub use backend::Backend;
pub use batch::{ErasedBatch, RemoteEntry, panic_from_record};
pub use batching::BatchSize;
pub use dispatch::{RunIter, RunOptions, RunUnordered, run, run_results};
pub use env::{backend_from_env, n_jobs_from_env, resolve_workers};
pub use error::{Error, IoCause, WorkerExit};
pub use events::{Event, EventSink, Transport, WorkerChange};
pub use future::{
    AsCompleted, Future, FutureHandle, Until, Waited, as_completed, submit, submit_timed, wait,
    wait_timeout,
};
pub use insights::Insights;
pub use local::{LocalTask, LocalWork, run_local};
pub use n_jobs::NJobs;
pub use n_jobs::{MAX_PROCESSES, MAX_THREADS, check_worker_limit, cpu_count, effective_n_jobs};
pub use pool::{Job, Pool, RunControl, SequentialPool};
pub use process_options::{
    DEFAULT_MAX_NBYTES, Initializer, InitializerEntry, InitializerWith, ProcessOptions,
};
pub use relay::{Relayed, RelayedOutcomes};
pub use retry::Retry;
pub use shared::{
    SHARED_MIN_BYTES, SharedAllocator, SharedMemory, SharedSegment, SharedSlice, collect_shared,
    forget_shared, note_shared, receive_shared, set_shared_allocator, shared_memory_from,
};
pub use task::{Delayed, Spread, Task, TaskFn, Timed, Whole, delayed};
pub use worker::{WorkerInfo, catch_task, set_worker_identity, worker_info};
pub use worker_state::{
    WorkerInit, WorkerState, set_worker_state, swap_worker_state, with_worker_state,
};
