//! # parjob-memory: cached results and resumable runs (joblib's `Memory`)
//!
//! [`Memory`] stores each task's result in an SQLite file, keyed by the function, a version
//! the user sets and a BLAKE3 hash of the encoded arguments. A later call with the same key
//! returns the stored result without running; a run that was killed resumes where it
//! stopped. Users reach it through the `parjob` crate (`parjob::Memory`,
//! `parallel.memory(&memory)`, its `memory` feature); this crate also offers the pieces a
//! runner is built from ([`CachedRun`], [`collect`]).
//!
//! - [`Memory`]: open a file, [`call`](Memory::call) one task, [`clear`](Memory::clear),
//!   [`clear_function`](Memory::clear_function), [`bytes_limit`](Memory::bytes_limit),
//!   [`stats`](Memory::stats).
//! - [`Error`]: what went wrong, naming the file, the function and the task.
//! - [`OnDecodeError`], [`Stats`].
//!
//! ```
//! use parjob::{delayed, Memory, Parallel};
//!
//! fn cube(x: u64) -> u64 { x * x * x }
//!
//! # fn main() -> Result<(), parjob::MemoryError> {
//! let dir = tempfile::tempdir().expect("a temporary folder");
//! let memory = Memory::open(dir.path().join("cache.sqlite"))?;
//! let parallel = Parallel::new(2);
//! let first: Vec<u64> = parallel.memory(&memory).run((0..100u64).map(|i| delayed(cube, i)))?;
//! // The second run finds every result stored: nothing runs.
//! let again: Vec<u64> = parallel.memory(&memory).run((0..100u64).map(|i| delayed(cube, i)))?;
//! assert_eq!(first, again);
//! assert_eq!(memory.stats()?.hits, 100);
//! # Ok(())
//! # }
//! ```
//!
//! How keys are made, how the file is laid out and what a crash can lose: docs/MEMORY.md.
#![deny(missing_docs)]

mod error;
mod memory;
mod run;
mod store;

pub use error::Error;
pub use memory::{Memory, OnDecodeError, Stats};
pub use run::{CachedRun, Feed, LOOKAHEAD, Runner, collect, collect_results};
