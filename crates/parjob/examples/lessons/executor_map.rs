//! Lesson: `Executor::map` gives results in input order even when later tasks finish first;
//! `as_completed` gives the futures in the order they finish.

use std::time::Duration;

use parjob::{Backend, Executor, as_completed, delayed};

/// Squares `x` after a nap that is shorter for bigger numbers, so that they finish first.
fn slow_square(x: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(60 * (6 - x.min(5))));
    x * x
}

/// Runs the lesson on `backend`.
pub fn run(backend: Backend) -> Result<(), parjob::Error> {
    super::banner("executor map: results in input order", backend);
    let executor = Executor::new(5).backend(backend);
    for (x, square) in (1..=5u64).zip(executor.map((1..=5u64).map(|x| delayed(slow_square, x)))) {
        println!("  map: {x} squared is {}", square?);
    }
    let futures: Vec<_> = (1..=5u64)
        .map(|x| executor.submit(delayed(slow_square, x)))
        .collect();
    let mut finished = Vec::new();
    for future in as_completed(futures) {
        finished.push(future.result()?);
    }
    println!("  as_completed, in the order they finished: {finished:?}");
    Ok(())
}
