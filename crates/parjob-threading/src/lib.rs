//! parjob's threading backend: a dedicated [rayon] pool of exactly `n_jobs` threads, named
//! `parjob-worker-<i>`, running one batch per rayon job.
//!
//! [`ThreadPool::new`] makes the pool; the `parjob` crate does this for
//! `Backend::Threading` and keeps the pool for the life of its `Parallel`.
//!
//! ```
//! use std::sync::Arc;
//! use parjob_core::{delayed, run, RunOptions};
//!
//! fn square(x: u64) -> u64 { x * x }
//! let pool = Arc::new(parjob_threading::ThreadPool::new(2).unwrap());
//! let out = run(pool, (0..100u64).map(|i| delayed(square, i)), &RunOptions::default()).unwrap();
//! assert_eq!(out[99], 9801);
//! ```
#![deny(missing_docs)]

use std::time::Duration;

use parjob_core::{Backend, Error, Job, Pool, set_worker_identity};

/// A pool of worker threads for parjob jobs.
#[derive(Debug)]
pub struct ThreadPool {
    pool: rayon::ThreadPool,
    workers: usize,
}

impl ThreadPool {
    /// Starts `workers` threads named `parjob-worker-0` .. `parjob-worker-{workers-1}`.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the operating system refuses to start the threads.
    pub fn new(workers: usize) -> Result<ThreadPool, Error> {
        let workers = workers.max(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(workers)
            .thread_name(|i| format!("parjob-worker-{i}"))
            .start_handler(|i| {
                set_worker_identity(Some((Backend::Threading, i)));
            })
            .build()
            .map_err(|e| {
                Error::backend_unavailable(
                    Backend::Threading,
                    format!("cannot start {workers} threads: {e}"),
                )
            })?;
        Ok(ThreadPool { pool, workers })
    }
}

impl Pool for ThreadPool {
    fn workers(&self) -> usize {
        self.workers
    }

    fn submit(&self, job: Job) {
        // `spawn` from outside the pool queues FIFO, so batches start in input order.
        self.pool.spawn(move || job.run_here());
    }

    fn target_batch_duration(&self) -> Duration {
        // A rayon job and a channel send cost a few microseconds; 2 ms batches hide that
        // while leaving the imbalance at the end of a run at about one batch.
        Duration::from_millis(2)
    }

    fn verbose_name(&self) -> &'static str {
        "ThreadingBackend"
    }
}
