//! The process backend's settings, as plain data: `Parallel`'s builder fills them whether or not
//! the process backend is compiled in, and the backend reads them when it starts a pool.

use std::path::PathBuf;

/// Frames above this many encoded bytes travel through shared memory (joblib's `max_nbytes`).
pub const DEFAULT_MAX_NBYTES: usize = 1 << 20;

/// How a process pool starts and keeps its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessOptions {
    /// The executable to run as a worker; `None` for this program (`current_exe()`). It must
    /// be the same build: another one is refused at the handshake.
    pub worker_exe: Option<PathBuf>,
    /// Runs once in every new worker process before its first task.
    pub initializer: Option<Initializer>,
    /// Replace a worker after it has run this many tasks.
    pub max_tasks_per_worker: Option<usize>,
    /// Frames of more encoded bytes than this travel through shared memory.
    pub max_nbytes: usize,
    /// Prefix each line a worker prints with `[worker i] `.
    pub prefix_output: bool,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            worker_exe: None,
            initializer: None,
            max_tasks_per_worker: None,
            max_nbytes: DEFAULT_MAX_NBYTES,
            prefix_output: false,
        }
    }
}

/// A function every new worker runs once: a plain `fn()` (or non-capturing closure) of this
/// program, found in the worker by its offset in the same build.
#[derive(Debug, Clone, Copy)]
pub struct Initializer(pub fn());

impl Initializer {
    /// The function's address in this process.
    pub fn address(self) -> usize {
        self.0 as usize
    }
}

/// Compared by address, the only identity a `fn` has.
impl PartialEq for Initializer {
    fn eq(&self, other: &Self) -> bool {
        self.address() == other.address()
    }
}

impl Eq for Initializer {}
