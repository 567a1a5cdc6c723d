//! A backend of your own: a pool that logs each batch and hands it to the threading backend.
//! `Parallel::with_pool` runs the same `delayed(...)` tasks on it, with the same ordering,
//! laziness and errors as on the built-in backends.
//!
//! ```text
//! cargo run --release --example custom_pool
//! ```

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use clap::Parser;
use parjob::pool::{Job, Pool, ThreadPool};
use parjob::{Parallel, delayed};

/// Logs every batch it is given, then lets a thread pool run it.
struct LoggingPool {
    threads: ThreadPool,
    batches: AtomicUsize,
}

impl Pool for LoggingPool {
    fn workers(&self) -> usize {
        self.threads.workers()
    }

    fn submit(&self, job: Job) {
        let number = self.batches.fetch_add(1, Ordering::Relaxed);
        let (first, len) = (job.batch().first_index(), job.batch().len());
        eprintln!("batch {number}: tasks {first}..{}", first + len);
        self.threads.submit(job);
    }

    fn target_batch_duration(&self) -> Duration {
        self.threads.target_batch_duration()
    }

    fn verbose_name(&self) -> &'static str {
        "LoggingBackend"
    }
}

/// Runs 200 tasks on a pool of this example's own, which logs each batch to stderr. It takes
/// no flags (nor PARJOB_BACKEND): the pool it is given is where the tasks run.
#[derive(Debug, Parser)]
struct Flags {}

fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_micros(200));
    x * x
}

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    Flags::parse(); // --help, and a clear error for a flag such as --backend
    let pool = Arc::new(LoggingPool {
        threads: ThreadPool::new(2)?,
        batches: AtomicUsize::new(0),
    });
    let parallel = Parallel::new(2).with_pool(pool.clone());
    let squares = parallel.run((0..200u64).map(|i| delayed(slow_square, i)))?;
    println!(
        "sum of 200 squares: {} in {} batches",
        squares.iter().sum::<u64>(),
        pool.batches.load(Ordering::Relaxed)
    );
    Ok(())
}
