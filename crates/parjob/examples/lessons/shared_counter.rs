//! Lesson: many tasks increment one counter behind a lock (Python's `threading.Lock`). Threads
//! share the counter, so the count is exact; worker processes each have their own copy of it.

use std::sync::Mutex;

use parjob::{Backend, Parallel, delayed};

/// The shared state: one counter for the whole process, behind a lock.
static COUNTER: Mutex<u64> = Mutex::new(0);

/// Adds one to the counter `times` times, taking the lock for each increment.
fn increment(times: u64) -> u64 {
    for _ in 0..times {
        // A poisoned lock means another task panicked mid-increment; the count is still a
        // valid number, so keep counting.
        let mut count = COUNTER
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *count += 1;
    }
    times
}

/// Runs the lesson; returns (expected, counted in this process).
pub fn run(backend: Backend) -> Result<(u64, u64), parjob::Error> {
    super::banner("shared counter behind a lock", backend);
    *COUNTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = 0;
    let tasks = 100;
    let per_task = 1000;
    let done = Parallel::new(4)
        .backend(backend)
        .run((0..tasks).map(|_| delayed(increment, per_task)))?;
    let expected: u64 = done.iter().sum();
    let counted = *COUNTER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    println!("{tasks} tasks x {per_task} increments: counter = {counted} (expected {expected})");
    if backend == Backend::Process {
        println!(
            "the process backend cannot share it: each worker process increments its own copy \
             of COUNTER, so the driver's stays at {counted}; return values instead (here they add \
             up to {expected}) and combine them in the driver"
        );
    } else {
        println!(
            "the lock makes each increment whole, so no update is lost; a process backend could \
             not share this counter: each worker process would have its own copy"
        );
    }
    Ok((expected, counted))
}
