//! parjob's process backend: tasks run in worker processes that are this same program
//! re-executed, fed frames over `ipc-channel`; their replies come back on a socket pair read
//! with parjob's own limits.
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

// The modules, each using only those listed before it (no module reaches back up):
//
// - registry: who hears that a `SharedSlice` segment was dropped (the pools' queues).
// - link: the worker's line back to its driver (a socket pair), read with limits.
// - mapping: shared memory both processes write, reached through one raw pointer, and the
//   SIGBUS guard that lets the driver survive a segment cut short.
// - wire: the `Hello`, shipments, `FORGET` and the status board.
// - shared: `SharedSlice` segments: allocated, shipped, received.
// - watch: a worker's exit and output, seen from the driver.
// - spawn: starting a worker and its handshake.
// - frame: `RUN` and `DONE` frames, inline or in an arena, on both sides.
// - recovery: who is blamed, and what runs again, when a worker dies mid-frame.
// - queue: a pool's jobs.
// - report: a job's transport figures and worker changes, for the run's events.
// - supervisor: one worker's life: frames, deaths, replacement.
// - worker: the worker loop `init()` enters.
// - pool: `ProcessPool`.
mod frame;
mod link;
mod mapping;
mod pool;
mod queue;
mod recovery;
mod registry;
mod report;
mod shared;
mod spawn;
mod supervisor;
mod watch;
mod wire;
mod worker;

pub use pool::{ProcessPool, leave_if_a_worker_without_init, say_whole_line};
#[doc(hidden)]
pub use spawn::fail_next_line_reads_for_tests;
pub use spawn::{TEST_WORKER_NAME, enable_test_support};
pub use worker::init;

pub use parjob_core::{DEFAULT_MAX_NBYTES, Initializer, ProcessOptions};

/// Entry points for the fuzz targets under `fuzz/`, which reach what a worker sends its driver
/// through them. Not part of the API: they may change in any release.
#[doc(hidden)]
pub mod fuzzing {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::Arc;

    use crate::link::Reader;
    use crate::wire::Hello;

    /// Decodes `bytes` as a worker's `Hello`, as the driver does; a `Hello` that decodes
    /// encodes back to itself.
    ///
    /// # Panics
    /// When that round trip fails: a decoder bug.
    pub fn hello(bytes: &[u8]) {
        if let Ok(hello) = Hello::decode(bytes) {
            assert_eq!(Hello::decode(&hello.encode()), Ok(hello));
        }
    }

    /// Puts `bytes` on a worker's line as a worker would write them, then reads messages from
    /// it as the driver does, each no longer than `limit`, until the line ends or an error.
    /// Returns the lengths of the messages read. `bytes` must fit in a socket's buffer (a
    /// fuzzer's inputs do).
    ///
    /// # Panics
    /// When a socket cannot be made or written.
    pub fn line(bytes: &[u8], limit: usize) -> Vec<usize> {
        let (driver, worker) = crate::link::pair().expect("a socket pair");
        let mut worker = UnixStream::from(worker);
        worker
            .write_all(bytes)
            .expect("the bytes fit in the socket's buffer");
        drop(worker);
        let mut reader = Reader::new(Arc::new(driver)).expect("a reader");
        let mut lengths = Vec::new();
        while let Ok(Some(message)) = reader.recv(limit) {
            assert!(message.bytes.len() <= limit);
            lengths.push(message.bytes.len());
        }
        lengths
    }
}
