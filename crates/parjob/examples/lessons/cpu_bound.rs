//! Lesson: CPU-bound work (sum of squares of 3 x 10^8 pseudo-random integers, in two halves)
//! runs about twice as fast on two workers as on one.
//!
//! One worker takes about a second (in a release build), so that the work, not the cost of
//! starting tasks or a burst of other load on the machine, decides the speedup.

use std::time::{Duration, Instant};

use parjob::{Backend, Parallel, delayed};

/// How many integers the lesson squares: about a second of work for one worker.
pub const COUNT: u64 = 300_000_000;

/// The `i`-th pseudo-random integer in 0..1000 (splitmix64): the same in every process.
fn random_int(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)) % 1000
}

/// Sum of squares of the pseudo-random integers `first..first + count`.
pub fn sum_of_squares(first: u64, count: u64) -> u64 {
    (first..first + count).map(|i| random_int(i).pow(2)).sum()
}

/// Times the two halves on `parallel`; returns the total and the wall time.
fn time_halves(parallel: &Parallel) -> Result<(u64, Duration), parjob::Error> {
    let half = COUNT / 2;
    let began = Instant::now();
    let halves = parallel.run([
        delayed(sum_of_squares, (0, half)),
        delayed(sum_of_squares, (half, COUNT - half)),
    ])?;
    Ok((halves.iter().sum(), began.elapsed()))
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// How many times each configuration runs; the median is reported, so that a burst of other
/// work on the machine does not decide the lesson.
const REPEATS: usize = 3;

/// Runs the lesson; returns the speedup of two workers over one.
pub fn run(backend: Backend) -> Result<f64, parjob::Error> {
    super::banner("CPU-bound: sum of squares of 3 x 10^8 integers", backend);
    let one_worker = Parallel::new(1).backend(backend);
    let two_workers = Parallel::new(2).backend(backend);
    // Warm up: start the workers before timing.
    one_worker.run([delayed(sum_of_squares, (0, 1))])?;
    two_workers.run([delayed(sum_of_squares, (0, 1))])?;
    let (mut ones, mut twos) = (Vec::new(), Vec::new());
    let mut totals = Vec::new();
    // Interleaved, so that a change in the machine's load hits both alike.
    for _ in 0..REPEATS {
        let (total, time) = time_halves(&one_worker)?;
        totals.push(total);
        ones.push(time);
        let (total, time) = time_halves(&two_workers)?;
        totals.push(total);
        twos.push(time);
    }
    totals.dedup();
    let (one, two) = (median(ones), median(twos));
    let speedup = one.as_secs_f64() / two.as_secs_f64();
    println!("sum of squares = {totals:?} (the same every run)");
    println!(
        "1 worker:  {:>7.1} ms (median of {REPEATS})",
        one.as_secs_f64() * 1e3
    );
    println!(
        "2 workers: {:>7.1} ms (median of {REPEATS})",
        two.as_secs_f64() * 1e3
    );
    let note = if backend == Backend::Sequential {
        " (sequential runs one task at a time)".to_string()
    } else if speedup < 1.3 {
        // Two workers can only go as fast as the CPUs they get.
        let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let load = load
            .split_whitespace()
            .next()
            .unwrap_or("unknown")
            .to_string();
        format!(" (under 1.3x: the load average is {load}, so the two workers share busy CPUs)")
    } else {
        String::new()
    };
    // On MPI the workers are ranks, each with the CPUs of its node; rank 0's own may be one
    // core (`mpirun -n 2` binds each rank to one).
    let on = if backend == Backend::Mpi {
        "2 worker ranks".to_string()
    } else {
        format!("{} CPUs", parjob::cpu_count())
    };
    println!("speedup: {speedup:.2}x on {on}{note}");
    Ok(speedup)
}
