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
    #[error("task {index} panicked: {message}{}", ran_on_note(*.worker, *.pid))]
    #[non_exhaustive]
    TaskPanicked {
        /// Position of the task in the input.
        index: usize,
        /// The panic message and, when known, its location.
        message: String,
        /// Index in its pool of the worker that ran the task (threading and process backends;
        /// on MPI, the local worker of the rank named around this error), `None` on the
        /// sequential backend.
        worker: Option<usize>,
        /// Process id of that worker, when it is a process of its own (process backend, and
        /// MPI ranks' local workers); `None` for a thread of the calling process.
        pid: Option<u32>,
    },

    /// The worker process running the task died (abort, signal, `exit`) before answering.
    #[error("task {index}: worker {worker} (pid {pid}) crashed: {status}{}", last_words_note(.last_words))]
    #[non_exhaustive]
    WorkerCrashed {
        /// Position of the task in the input.
        index: usize,
        /// Index of the worker in its pool.
        worker: usize,
        /// Process id of the worker.
        pid: u32,
        /// How it ended; displayed as e.g. `killed by signal 6 (SIGABRT)` or `exit status 3`.
        status: WorkerExit,
        /// What the worker said on stderr as it died, when that names the cause: the Rust
        /// runtime's `thread 'main' has overflowed its stack`, its `fatal runtime error: ...`,
        /// or the C library's `free(): double free detected in tcache 2` and the like (at most
        /// the last two such lines). `None` when it said none of those.
        last_words: Option<String>,
    },

    /// The task ran longer than the `timeout` set on the `Parallel`.
    #[error(
        "task {index} timed out after {after:?}{}",
        timeout_note(*.killed, *.worker, *.pid, *.returned_after)
    )]
    #[non_exhaustive]
    Timeout {
        /// Position of the task in the input.
        index: usize,
        /// The timeout that was exceeded.
        after: Duration,
        /// Whether the worker running it was killed (process backend) or left running (threads).
        killed: bool,
        /// Index in its pool of the worker that ran the task, when known: the worker process
        /// that was killed (process backend; on MPI, the local worker of the rank that ran
        /// the task), or the thread left running it (threading backend).
        worker: Option<usize>,
        /// Process id of that worker, when known.
        pid: Option<u32>,
        /// How long the task ran, when the overrun was seen only as it returned (the sequential
        /// backend runs it on the calling thread, which waited for it; on threads its return
        /// may beat the timer); `None` when the run gave up on it at its limit.
        returned_after: Option<Duration>,
    },

    /// `n_jobs` was 0 (or otherwise unusable).
    #[error(
        "invalid n_jobs {value}{source_note}: use n > 0 for n workers, -1 for all CPUs (every worker rank on MPI), or -k for all but k-1 (0 is not allowed)"
    )]
    #[non_exhaustive]
    InvalidNJobs {
        /// The value given.
        value: i64,
        /// Where it came from, e.g. ` (from PARJOB_N_JOBS)`, or empty.
        source_note: String,
    },

    /// A backend name that parjob does not know.
    #[error(
        "unknown backend {name:?}{source_note}: valid names are sequential, threading (alias threads), process (aliases processes, loky, multiprocessing), mpi"
    )]
    #[non_exhaustive]
    UnknownBackend {
        /// The name given.
        name: String,
        /// Where it came from, e.g. ` (from PARJOB_BACKEND)`, or empty.
        source_note: String,
    },

    /// `n_jobs` asks for more workers than the backend starts: 10^8 threads, or thousands of
    /// processes (each a copy of the program), would exhaust the machine long before they
    /// helped.
    #[non_exhaustive]
    #[error(
        "n_jobs {requested}{source_note} is more workers than the {backend} backend starts (at most {limit}): {advice}"
    )]
    TooManyWorkers {
        /// The number of workers asked for.
        requested: usize,
        /// The most this backend starts.
        limit: usize,
        /// The backend.
        backend: Backend,
        /// Where `n_jobs` came from, e.g. ` (from PARJOB_N_JOBS)`, or empty.
        source_note: String,
        /// What to do instead.
        advice: &'static str,
    },

    /// An environment variable parjob reads holds a value it cannot use.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    #[non_exhaustive]
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
    #[non_exhaustive]
    BackendUnavailable {
        /// The backend asked for.
        backend: Backend,
        /// Why, and what to do about it.
        reason: String,
    },

    /// A task failed on a worker rank of the MPI backend: `error` is what happened there (a
    /// panic, a crashed local worker, a timeout), and the rank and host say where.
    #[error("{error} (on MPI rank {rank}, host {host})")]
    #[non_exhaustive]
    OnRank {
        /// The MPI rank whose local pool ran the task.
        rank: usize,
        /// That rank's host name.
        host: String,
        /// The failure as the rank saw it, naming the task, local worker and pid.
        error: Box<Error>,
    },

    /// A failure of task `index` that another process (an MPI worker rank) reported in words
    /// only: `message`, as that process wrote it, starting with `task <index>: `. Errors
    /// without a field-by-field form on the wire (an argument that cannot be decoded there, a
    /// local pool that did not start) come back as this.
    #[error("{message}")]
    #[non_exhaustive]
    Remote {
        /// Position of the task in the input.
        index: usize,
        /// What the other process said, naming the task.
        message: String,
    },

    /// The MPI rank running the task was lost (killed, its node failed, it stopped answering):
    /// the task's outcome will never be known.
    #[error("task {index}: MPI rank {rank} (host {host}, pid {pid}) was lost: {reason}")]
    #[non_exhaustive]
    RankLost {
        /// Position of the task in the input.
        index: usize,
        /// The rank that was lost.
        rank: usize,
        /// Its host name.
        host: String,
        /// Its process id on that host.
        pid: u32,
        /// How the loss was noticed.
        reason: String,
    },

    /// A configuration value that cannot work (e.g. a batch size of 0).
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),

    /// A task's input or result could not be encoded or decoded for another process.
    #[error("task {index}: cannot {action} {type_name}: {message}")]
    #[non_exhaustive]
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
    #[non_exhaustive]
    Worker {
        /// Index of the worker in its pool.
        worker: usize,
        /// What went wrong, naming the executables involved where it matters.
        message: String,
        /// The operating system's error behind it, if there is one (e.g. the executable
        /// could not be started): what [`source`](std::error::Error::source) returns.
        source: Option<IoCause>,
    },

    /// The task was not run because the run was stopped first (an earlier task failed, or
    /// the consumer of `run_iter` went away), or its `Future` was cancelled.
    #[error("task {index} was cancelled before it ran")]
    #[non_exhaustive]
    Cancelled {
        /// Position of the task in the input.
        index: usize,
    },

    /// The task was running when its pool shut down without waiting for it (a daemon
    /// `Executor` dropped): its outcome will never be known.
    #[non_exhaustive]
    #[error("task {index} was abandoned while it ran: its pool shut down without waiting for it")]
    Abandoned {
        /// Position of the task in the input (its submission number for an `Executor`).
        index: usize,
    },

    /// The `Executor` was shut down: it takes no new tasks.
    #[error("the executor was shut down and takes no new tasks")]
    ExecutorShutdown,

    /// Waiting for a `Future` (`result_timeout`) gave up; the task itself goes on and the
    /// future can be waited on again.
    #[error("task {index}: no result after waiting {after:?}; the task keeps running")]
    #[non_exhaustive]
    WaitTimedOut {
        /// Submission number of the task.
        index: usize,
        /// How long the caller waited.
        after: Duration,
    },

    /// A task asked for its worker's state ([`with_worker_state`](crate::with_worker_state))
    /// and there is none of that type.
    #[error("no worker state of type {wanted} on this worker: {why}")]
    #[non_exhaustive]
    NoWorkerState {
        /// The type the task asked for.
        wanted: &'static str,
        /// Why there is none: no initializer set one, it is of another type, or it is in use.
        why: String,
    },

    /// The task failed on every attempt it was given ([`Retry`](crate::Retry)): each
    /// attempt's error, in order, the last one last.
    #[error("task {index} failed {} times: {}", attempts.len(), AttemptList(attempts))]
    #[non_exhaustive]
    RetriesExhausted {
        /// Position of the task in the input.
        index: usize,
        /// What each attempt ended with (at least two).
        attempts: Vec<Error>,
    },

    /// A `Future`'s result was asked for again after an earlier call took it.
    #[error("the result of task {index} was already taken from its future")]
    #[non_exhaustive]
    ResultTaken {
        /// Submission number of the task.
        index: usize,
    },
}

/// An I/O error behind an [`Error`], shared so that the error stays `Clone`. Two are equal
/// when they are of the same kind and say the same.
#[derive(Debug, Clone)]
pub struct IoCause(std::sync::Arc<std::io::Error>);

impl IoCause {
    /// The I/O error itself.
    pub fn io_error(&self) -> &std::io::Error {
        &self.0
    }
}

impl PartialEq for IoCause {
    fn eq(&self, other: &Self) -> bool {
        self.0.kind() == other.0.kind() && self.0.to_string() == other.0.to_string()
    }
}

impl Eq for IoCause {}

impl std::fmt::Display for IoCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for IoCause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Lists the attempts of [`Error::RetriesExhausted`]: `[1] ...; [2] ...`.
struct AttemptList<'a>(&'a [Error]);

impl std::fmt::Display for AttemptList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (n, attempt) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str("; ")?;
            }
            write!(f, "[{}] {attempt}", n + 1)?;
        }
        Ok(())
    }
}

/// How a worker process ended.
///
/// `Display` reads as a shell says it: `exit status 3`, `killed by signal 6 (SIGABRT)`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum WorkerExit {
    /// It exited with this status code.
    Exited(i32),
    /// A signal ended it.
    Signaled(i32),
    /// Its end could not be observed; the text says why (e.g. it did not exit after
    /// `SIGKILL`, or its exit status could not be read).
    Lost(String),
}

impl WorkerExit {
    /// Whether it exited normally with status 0.
    pub fn is_success(&self) -> bool {
        matches!(self, WorkerExit::Exited(0))
    }

    /// The signal's conventional name, e.g. `SIGSEGV`, for the signals a crash usually ends
    /// with.
    pub fn signal_name(signal: i32) -> Option<&'static str> {
        // Linux's numbering, which every architecture parjob's process backend runs on
        // shares for these signals.
        Some(match signal {
            1 => "SIGHUP",
            2 => "SIGINT",
            3 => "SIGQUIT",
            4 => "SIGILL",
            5 => "SIGTRAP",
            6 => "SIGABRT",
            7 => "SIGBUS",
            8 => "SIGFPE",
            9 => "SIGKILL",
            11 => "SIGSEGV",
            13 => "SIGPIPE",
            15 => "SIGTERM",
            _ => return None,
        })
    }
}

impl std::fmt::Display for WorkerExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WorkerExit::Exited(code) => write!(f, "exit status {code}"),
            WorkerExit::Signaled(signal) => match WorkerExit::signal_name(*signal) {
                Some(name) => write!(f, "killed by signal {signal} ({name})"),
                None => write!(f, "killed by signal {signal}"),
            },
            WorkerExit::Lost(why) => f.write_str(why),
        }
    }
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// Constructors for backends: the struct variants are `#[non_exhaustive]`, so that a field can
/// be added without breaking code that matches on them, which also means only this crate can
/// write them as struct expressions.
impl Error {
    /// [`Error::TaskPanicked`], not saying where the task ran.
    pub fn task_panicked(index: usize, message: impl Into<String>) -> Error {
        Error::task_panicked_on(index, message, None, None)
    }

    /// [`Error::TaskPanicked`] of a task that ran on `worker` of its pool, a process with id
    /// `pid` when the worker is one.
    pub fn task_panicked_on(
        index: usize,
        message: impl Into<String>,
        worker: Option<usize>,
        pid: Option<u32>,
    ) -> Error {
        Error::TaskPanicked {
            index,
            message: message.into(),
            worker,
            pid,
        }
    }

    /// [`Error::Codec`]: task `index`'s `type_name` (an argument or result type, or a
    /// function whose result it is) could not be encoded or decoded; `action` says which,
    /// e.g. `"decode the result of"`. For backends that move tasks between processes.
    pub fn codec(
        index: usize,
        action: &'static str,
        type_name: &'static str,
        message: impl Into<String>,
    ) -> Error {
        Error::Codec {
            index,
            action,
            type_name,
            message: message.into(),
        }
    }

    /// [`Error::Remote`]: task `index` failed in another process, which said `message`
    /// (it should start with `task <index>: `).
    pub fn remote(index: usize, message: impl Into<String>) -> Error {
        Error::Remote {
            index,
            message: message.into(),
        }
    }

    /// [`Error::WorkerCrashed`].
    pub fn worker_crashed(index: usize, worker: usize, pid: u32, status: WorkerExit) -> Error {
        Error::WorkerCrashed {
            index,
            worker,
            pid,
            status,
            last_words: None,
        }
    }

    /// This error with the dead worker's `last_words` (see [`Error::WorkerCrashed`]), if it
    /// is a [`Error::WorkerCrashed`]; any other error as it is.
    #[must_use]
    pub fn with_last_words(mut self, said: Option<String>) -> Error {
        if let Error::WorkerCrashed { last_words, .. } = &mut self {
            *last_words = said;
        }
        self
    }

    /// [`Error::Timeout`], seen at its limit (the worker killed, or the task left running).
    pub fn timeout(index: usize, after: Duration, killed: bool) -> Error {
        Error::Timeout {
            index,
            after,
            killed,
            worker: None,
            pid: None,
            returned_after: None,
        }
    }

    /// [`Error::Timeout`] of a task left running at its limit on a thread: `worker` of its
    /// pool, when it ran on a pool's thread (not on the calling thread).
    pub fn timeout_left_running(index: usize, after: Duration, worker: Option<usize>) -> Error {
        Error::Timeout {
            index,
            after,
            killed: false,
            worker,
            pid: None,
            returned_after: None,
        }
    }

    /// [`Error::Timeout`] of a task whose worker process, `worker` of its pool with process
    /// id `pid`, was killed at its limit.
    pub fn timeout_killing(index: usize, after: Duration, worker: usize, pid: u32) -> Error {
        Error::Timeout {
            index,
            after,
            killed: true,
            worker: Some(worker),
            pid: Some(pid),
            returned_after: None,
        }
    }

    /// [`Error::Timeout`] of a task on a thread that was seen only when it returned, `ran`
    /// after it started.
    pub fn timeout_on_return(index: usize, after: Duration, ran: Duration) -> Error {
        Error::Timeout {
            index,
            after,
            killed: false,
            worker: None,
            pid: None,
            returned_after: Some(ran),
        }
    }

    /// [`Error::BackendUnavailable`].
    pub fn backend_unavailable(backend: Backend, reason: impl Into<String>) -> Error {
        Error::BackendUnavailable {
            backend,
            reason: reason.into(),
        }
    }

    /// [`Error::Worker`].
    pub fn worker(worker: usize, message: impl Into<String>) -> Error {
        Error::Worker {
            worker,
            message: message.into(),
            source: None,
        }
    }

    /// [`Error::Worker`] caused by an I/O error, which [`source`](std::error::Error::source)
    /// then returns (as an [`IoCause`]). `message` should already say what it says.
    pub fn worker_io(worker: usize, message: impl Into<String>, cause: std::io::Error) -> Error {
        Error::Worker {
            worker,
            message: message.into(),
            source: Some(IoCause(std::sync::Arc::new(cause))),
        }
    }

    /// [`Error::OnRank`].
    pub fn on_rank(rank: usize, host: impl Into<String>, error: Error) -> Error {
        Error::OnRank {
            rank,
            host: host.into(),
            error: Box::new(error),
        }
    }

    /// [`Error::RankLost`].
    pub fn rank_lost(
        index: usize,
        rank: usize,
        host: impl Into<String>,
        pid: u32,
        reason: impl Into<String>,
    ) -> Error {
        Error::RankLost {
            index,
            rank,
            host: host.into(),
            pid,
            reason: reason.into(),
        }
    }

    /// [`Error::Cancelled`].
    pub fn cancelled(index: usize) -> Error {
        Error::Cancelled { index }
    }

    /// [`Error::WaitTimedOut`].
    pub fn wait_timed_out(index: usize, after: Duration) -> Error {
        Error::WaitTimedOut { index, after }
    }

    /// [`Error::ResultTaken`].
    pub fn result_taken(index: usize) -> Error {
        Error::ResultTaken { index }
    }

    /// The input position of the task this error is about, if it is about one task.
    pub fn task_index(&self) -> Option<usize> {
        match self {
            Error::TaskPanicked { index, .. }
            | Error::WorkerCrashed { index, .. }
            | Error::Timeout { index, .. }
            | Error::Codec { index, .. }
            | Error::Remote { index, .. }
            | Error::RankLost { index, .. }
            | Error::Cancelled { index }
            | Error::Abandoned { index }
            | Error::ResultTaken { index }
            | Error::WaitTimedOut { index, .. }
            | Error::RetriesExhausted { index, .. } => Some(*index),
            Error::OnRank { error, .. } => error.task_index(),
            _ => None,
        }
    }

    /// The failure itself, without where on a cluster it happened: for [`Error::OnRank`] the
    /// error inside it (the one any backend would give: `TaskPanicked`, `WorkerCrashed`,
    /// `Timeout`, ...), otherwise `self`. Match on this to handle a failure the same way on
    /// every backend, MPI included.
    ///
    /// ```
    /// use parjob::{Error, WorkerExit};
    ///
    /// let crash = Error::worker_crashed(3, 0, 4242, WorkerExit::Signaled(6));
    /// let on_mpi = Error::on_rank(2, "node7", crash.clone());
    /// for error in [&crash, &on_mpi] {
    ///     assert!(matches!(error.without_rank(), Error::WorkerCrashed { index: 3, .. }));
    /// }
    /// ```
    pub fn without_rank(&self) -> &Error {
        match self {
            Error::OnRank { error, .. } => error.without_rank(),
            other => other,
        }
    }

    /// The same error about the task at `index` instead: for a layer that runs part of its
    /// input as a run of its own (a cache that runs only the calls it has not stored) and
    /// reports failures by the position in the whole input. An error about no task is
    /// returned unchanged.
    pub fn with_task_index(mut self, new_index: usize) -> Error {
        match &mut self {
            Error::TaskPanicked { index, .. }
            | Error::WorkerCrashed { index, .. }
            | Error::Timeout { index, .. }
            | Error::Codec { index, .. }
            | Error::Cancelled { index }
            | Error::Abandoned { index }
            | Error::ResultTaken { index }
            | Error::WaitTimedOut { index, .. } => *index = new_index,
            Error::Remote { index, message } => {
                if let Some(rest) = message.strip_prefix(&format!("task {index}: ")) {
                    *message = format!("task {new_index}: {rest}");
                }
                *index = new_index;
            }
            Error::RetriesExhausted { index, attempts } => {
                *index = new_index;
                for attempt in attempts.iter_mut() {
                    *attempt = std::mem::replace(attempt, Error::ExecutorShutdown)
                        .with_task_index(new_index);
                }
            }
            _ => {}
        }
        self
    }
}

/// What a crashed worker said as it died, for [`Error::WorkerCrashed`]'s message.
fn last_words_note(last_words: &Option<String>) -> String {
    match last_words {
        Some(said) => format!(" (its last words on stderr: {said})"),
        None => String::new(),
    }
}

/// Where a panicking task ran, for [`Error::TaskPanicked`]'s message.
fn ran_on_note(worker: Option<usize>, pid: Option<u32>) -> String {
    match (worker, pid) {
        (Some(worker), Some(pid)) => format!(" (on worker {worker}, pid {pid})"),
        (Some(worker), None) => format!(" (on worker {worker})"),
        (None, Some(pid)) => format!(" (on pid {pid})"),
        (None, None) => String::new(),
    }
}

/// What follows a timeout's limit in its message: whether its worker was killed, or how the
/// task that could not be stopped ended (and on which thread worker it runs on).
fn timeout_note(
    killed: bool,
    worker: Option<usize>,
    pid: Option<u32>,
    returned_after: Option<Duration>,
) -> String {
    match (killed, returned_after) {
        (true, _) => match (worker, pid) {
            (Some(worker), Some(pid)) => format!(" (its worker {worker}, pid {pid}, was killed)"),
            _ => " (its worker was killed)".to_string(),
        },
        (false, Some(ran)) => format!(
            " (seen when it returned, after {ran:.1?}: a task on a thread cannot be stopped, so \
             the run waited for it; the process backend enforces a hard limit)"
        ),
        (false, None) => format!(
            " ({}not stopped: a task on a thread runs to its end, whether or not the run waits \
             for it; the process backend enforces a hard limit)",
            worker.map_or(String::new(), |w| format!("on worker {w}, "))
        ),
    }
}
