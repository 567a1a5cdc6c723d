//! The one error type every backend reports through.

use std::time::Duration;

use crate::Backend;

/// Everything that can go wrong in a parjob run.
///
/// Task failures name the task as `task <index>`, the position of the task in the input
/// iterator (counting from 0). Process-backend failures also name the worker's pid and how it
/// ended.
///
/// `Debug` prints the same text as `Display`, so that `fn main() -> Result<(), parjob::Error>`
/// reports a failure readably.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The task's function panicked; the worker that ran it is still usable.
    #[error("task {index} panicked: {message}")]
    TaskPanicked {
        /// Position of the task in the input.
        index: usize,
        /// The panic message and, when known, its location.
        message: String,
    },

    /// The worker process running the task died (abort, signal, `exit`) before answering.
    #[error("task {index}: worker {worker} (pid {pid}) crashed: {status}")]
    WorkerCrashed {
        /// Position of the task in the input.
        index: usize,
        /// Index of the worker in its pool.
        worker: usize,
        /// Process id of the worker.
        pid: u32,
        /// How it ended, e.g. `killed by signal 6 (SIGABRT)` or `exit status 3`.
        status: String,
    },

    /// The task ran longer than the `timeout` set on the `Parallel`.
    #[error("task {index} timed out after {after:?}{}", if *.killed { " (its worker was killed)" } else { " (a thread cannot be stopped, so it ran on; the process backend enforces a hard limit)" })]
    Timeout {
        /// Position of the task in the input.
        index: usize,
        /// The timeout that was exceeded.
        after: Duration,
        /// Whether the worker running it was killed (process backend) or left running (threads).
        killed: bool,
    },

    /// `n_jobs` was 0 (or otherwise unusable).
    #[error(
        "invalid n_jobs {value}{source_note}: use n > 0 for n workers, -1 for all CPUs, or -k for all CPUs but k-1 (0 is not allowed)"
    )]
    InvalidNJobs {
        /// The value given.
        value: i64,
        /// Where it came from, e.g. ` (from PARJOB_N_JOBS)`, or empty.
        source_note: String,
    },

    /// A backend name that parjob does not know.
    #[error(
        "unknown backend {name:?}{source_note}: valid names are sequential, threading (alias threads), process (aliases processes, loky, multiprocessing)"
    )]
    UnknownBackend {
        /// The name given.
        name: String,
        /// Where it came from, e.g. ` (from PARJOB_BACKEND)`, or empty.
        source_note: String,
    },

    /// An environment variable parjob reads holds a value it cannot use.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable's name.
        var: &'static str,
        /// Its value.
        value: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// The backend asked for is not available in this build or on this platform.
    #[error("the {backend} backend is not available: {reason}")]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why, and what to do about it.
        reason: String,
    },

    /// A configuration value that cannot work (e.g. a batch size of 0).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A task's input or result could not be encoded or decoded for another process.
    #[error("task {index}: cannot {action} {type_name}: {message}")]
    Codec {
        /// Position of the task in the input.
        index: usize,
        /// `encode` or `decode`.
        action: &'static str,
        /// The Rust type that failed, e.g. `(u64, alloc::string::String)`.
        type_name: &'static str,
        /// What the codec said.
        message: String,
    },

    /// A worker process could not be started or refused to work with this driver.
    #[error("worker {worker}: {message}")]
    Worker {
        /// Index of the worker in its pool.
        worker: usize,
        /// What went wrong, naming the executables involved where it matters.
        message: String,
    },

    /// The task was not run because the run was stopped first (an earlier task failed, or
    /// the consumer of `run_iter` went away), or its `Future` was cancelled.
    #[error("task {index} was cancelled before it ran")]
    Cancelled {
        /// Position of the task in the input.
        index: usize,
    },

    /// The `Executor` was shut down: it takes no new tasks.
    #[error("the executor was shut down and takes no new tasks")]
    ExecutorShutdown,

    /// Waiting for a `Future` (`result_timeout`) gave up; the task itself goes on and the
    /// future can be waited on again.
    #[error("task {index}: no result after waiting {after:?}; the task keeps running")]
    WaitTimedOut {
        /// Submission number of the task.
        index: usize,
        /// How long the caller waited.
        after: Duration,
    },

    /// A `Future`'s result was asked for again after an earlier call took it.
    #[error("the result of task {index} was already taken from its future")]
    ResultTaken {
        /// Submission number of the task.
        index: usize,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// The input position of the task this error is about, if it is about one task.
    pub fn task_index(&self) -> Option<usize> {
        match self {
            Error::TaskPanicked { index, .. }
            | Error::WorkerCrashed { index, .. }
            | Error::Timeout { index, .. }
            | Error::Codec { index, .. }
            | Error::Cancelled { index }
            | Error::ResultTaken { index }
            | Error::WaitTimedOut { index, .. } => Some(*index),
            _ => None,
        }
    }
}
