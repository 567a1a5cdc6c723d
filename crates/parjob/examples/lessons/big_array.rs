//! Lesson: joblib memory-maps big numpy arrays so that workers read them instead of receiving a
//! pickled copy. parjob's `SharedSlice` does the same: the values are copied into shared memory
//! once, tasks receive a handle, and every worker reads the same pages in place.

use std::time::{Duration, Instant};

use parjob::{Backend, Parallel, SharedSlice, delayed};

/// How many `f64` the lesson sums: 100 MB.
pub const VALUES: usize = 12_500_000;

/// Sums a part of the array that was sent as an owned vector (encoded, copied, decoded).
fn sum_owned(part: Vec<f64>) -> f64 {
    part.iter().sum()
}

/// Sums a part of the array in place, wherever the task runs.
fn sum_shared(part: SharedSlice<f64>) -> f64 {
    part.iter().sum()
}

fn gigabytes_per_second(time: Duration) -> f64 {
    (VALUES * size_of::<f64>()) as f64 / 1e9 / time.as_secs_f64()
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

/// Times one run of `tasks` on `parallel`; returns the total and the time.
fn timed<T: parjob::Task<Output = f64>>(
    parallel: &Parallel,
    tasks: impl IntoIterator<Item = T>,
) -> Result<(f64, Duration), parjob::Error> {
    let began = Instant::now();
    let sums = parallel.run(tasks)?;
    Ok((sums.iter().sum(), began.elapsed()))
}

/// Runs the lesson: the same 100 MB summed in two halves, sent as owned vectors and as a
/// `SharedSlice`; returns the shared run's throughput in GB/s when reused.
pub fn run(backend: Backend) -> Result<f64, parjob::Error> {
    super::banner(
        "Big arrays: 100 MB of f64, owned copies vs shared memory",
        backend,
    );
    let data: Vec<f64> = (0..VALUES).map(|i| (i % 1000) as f64 * 0.5).collect();
    let half = VALUES / 2;
    let parallel = Parallel::new(2).backend(backend);
    parallel.run([delayed(sum_owned, vec![0.0])])?; // start the workers

    let mut owned_times = Vec::new();
    let mut totals = Vec::new();
    for _ in 0..3 {
        let halves = [data[..half].to_vec(), data[half..].to_vec()];
        let (total, time) = timed(&parallel, halves.map(|h| delayed(sum_owned, h)))?;
        totals.push(total);
        owned_times.push(time);
    }

    let made = Instant::now();
    let shared = SharedSlice::from_slice(&data);
    let making = made.elapsed();
    let mut shared_times = Vec::new();
    for _ in 0..4 {
        let parts = shared.chunks(half).map(|part| delayed(sum_shared, part));
        let (total, time) = timed(&parallel, parts)?;
        totals.push(total);
        shared_times.push(time);
    }
    totals.dedup();
    let processes = backend == Backend::Process;
    let (owned_how, first_how, reused_how) = if processes {
        (
            "encoded, copied, decoded",
            "each worker maps the segment",
            "a handle per task",
        )
    } else {
        (
            "moved to the task",
            "a clone of an Arc",
            "a clone of an Arc",
        )
    };
    let first = shared_times.remove(0);
    let reused = median(shared_times);
    println!("sum = {totals:?} (the same every run)");
    println!(
        "owned Vec halves:        {:>6.1} ms per run ({:.2} GB/s, median of 3): {owned_how}",
        median(owned_times.clone()).as_secs_f64() * 1e3,
        gigabytes_per_second(median(owned_times))
    );
    println!(
        "SharedSlice::from_slice: {:>6.1} ms once ({:.2} GB/s): the one copy, into shared memory",
        making.as_secs_f64() * 1e3,
        gigabytes_per_second(making)
    );
    println!(
        "shared, first run:       {:>6.1} ms ({:.2} GB/s): {first_how}",
        first.as_secs_f64() * 1e3,
        gigabytes_per_second(first)
    );
    println!(
        "shared, reused:          {:>6.1} ms per run ({:.2} GB/s, median of 3): {reused_how}",
        reused.as_secs_f64() * 1e3,
        gigabytes_per_second(reused)
    );
    if !processes {
        println!("(threads share memory anyway: SharedSlice is for the process backend)");
    }
    Ok(gigabytes_per_second(reused))
}
