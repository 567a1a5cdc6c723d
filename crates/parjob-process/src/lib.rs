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

// The modules, each using only those listed before it (no module reaches back up):
//
// - registry: who hears that a `SharedSlice` segment was dropped (the pools' queues).
// - mapping: shared memory both processes write, reached through one raw pointer, and the
//   SIGBUS guard that lets the driver survive a segment cut short.
// - wire: the `Hello`, shipments, `FORGET` and the status board.
// - shared: `SharedSlice` segments: allocated, shipped, received.
// - watch: a worker's exit and output, seen from the driver.
// - spawn: starting a worker and its handshake.
// - frame: `RUN` and `DONE` frames, inline or in an arena, on both sides.
// - recovery: who is blamed, and what runs again, when a worker dies mid-frame.
// - queue: a pool's jobs.
// - supervisor: one worker's life: frames, deaths, replacement.
// - worker: the worker loop `init()` enters.
// - pool: `ProcessPool`.
mod frame;
mod mapping;
mod pool;
mod queue;
mod recovery;
mod registry;
mod shared;
mod spawn;
mod supervisor;
mod watch;
mod wire;
mod worker;

pub use pool::ProcessPool;
pub use spawn::{TEST_WORKER_NAME, enable_test_support};
pub use worker::init;

pub use parjob_core::{DEFAULT_MAX_NBYTES, Initializer, ProcessOptions};
