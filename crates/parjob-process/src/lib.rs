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

pub use pool::ProcessPool;
pub use spawn::{TEST_WORKER_NAME, enable_test_support};
pub use worker::init;

pub use parjob_core::{DEFAULT_MAX_NBYTES, Initializer, ProcessOptions};
