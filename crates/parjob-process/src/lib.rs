//! parjob's process backend: tasks run in worker processes that are this same program
//! re-executed, fed bincode frames over `ipc-channel`.
//!
//! - [`ProcessPool`]: the [`Pool`](parjob_core::Pool) `Parallel` uses for
//!   [`Backend::Process`](parjob_core::Backend::Process).
//! - [`ProcessOptions`]: worker executable, initializer, recycling, shared-memory threshold.
//! - [`init`]: turns a process the pool started into a worker; a no-op anywhere else.
//! - [`enable_test_support`]: lets a test binary serve as its own worker (see the `parjob`
//!   crate's `enable_test_support!` macro).
//!
//! How it works, what it survives and what is safe: `docs/PROCESS.md`. Linux only (it relies
//! on `PR_SET_PDEATHSIG`, `/proc/self/exe` and the GNU build-id).
#![deny(missing_docs)]
#![cfg(target_os = "linux")]

mod build_id;
mod pool;
mod shared;
mod spawn;
mod wire;
mod worker;

use std::path::PathBuf;

pub use pool::ProcessPool;
pub use spawn::{TEST_WORKER_NAME, enable_test_support};
pub use worker::init;

/// Frames above this many encoded bytes travel through shared memory (joblib's `max_nbytes`).
pub const DEFAULT_MAX_NBYTES: usize = 1 << 20;

/// How a [`ProcessPool`] starts and keeps its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    fn address(self) -> usize {
        self.0 as usize
    }
}

impl PartialEq for Initializer {
    fn eq(&self, other: &Self) -> bool {
        self.address() == other.address()
    }
}

impl Eq for Initializer {}
