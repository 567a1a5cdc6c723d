//! Lesson: two workers each square and sum half of 1..=9, printing every item with the worker
//! (thread name and process id) that computed it.

use parjob::{Backend, Parallel, delayed};

/// Sums the squares of `first..=last`, printing each one as it is computed.
fn sum_of_squares(first: u64, last: u64) -> u64 {
    let mut sum = 0;
    for x in first..=last {
        // As in the lesson, each item takes a moment, so the two halves visibly interleave.
        std::thread::sleep(std::time::Duration::from_millis(50));
        println!(
            "  {x}^2 = {:>2} computed on {}",
            x * x,
            super::whereabouts()
        );
        sum += x * x;
    }
    sum
}

/// Runs the lesson; returns the two partial sums.
pub fn run(backend: Backend) -> Result<Vec<u64>, parjob::Error> {
    super::banner("sum of squares: 1..=9 in two halves", backend);
    let halves = [(1, 5), (6, 9)];
    let partial = Parallel::new(2)
        .backend(backend)
        .run(halves.map(|half| delayed(sum_of_squares, half)))?;
    for ((first, last), sum) in halves.iter().zip(&partial) {
        println!("partial sum of squares of {first}..={last}: {sum}");
    }
    println!("total: {}", partial.iter().sum::<u64>());
    Ok(partial)
}
