//! Lesson: two tasks that each sleep for a second finish together in about one second on
//! parallel workers, and take two seconds one after the other.

use std::time::{Duration, Instant};

use parjob::{Backend, Parallel, delayed};

/// Sleeps `millis` milliseconds, like a task waiting on a disk or a network.
fn sleepy(name: String, millis: u64) -> String {
    println!("  {name} starts sleeping on {}", super::whereabouts());
    std::thread::sleep(Duration::from_millis(millis));
    println!("  {name} wakes up");
    name
}

/// Runs the two sleeps on `backend` and returns the wall time.
pub fn time_two_sleeps(backend: Backend) -> Result<Duration, parjob::Error> {
    let began = Instant::now();
    let names = Parallel::new(2).backend(backend).run([
        delayed(sleepy, ("task-1".to_string(), 1000)),
        delayed(sleepy, ("task-2".to_string(), 1000)),
    ])?;
    let elapsed = began.elapsed();
    println!(
        "{backend}: {names:?} done in {:.2} s",
        elapsed.as_secs_f64()
    );
    Ok(elapsed)
}

/// Runs the lesson on `backend`, and on `sequential` to compare.
pub fn run(backend: Backend) -> Result<(), parjob::Error> {
    super::banner("sleepy tasks: two sleeps of 1 s", backend);
    let parallel = time_two_sleeps(backend)?;
    if backend != Backend::Sequential {
        let sequential = time_two_sleeps(Backend::Sequential)?;
        println!(
            "waiting overlaps on parallel workers: {:.2} s on {backend} vs {:.2} s sequential",
            parallel.as_secs_f64(),
            sequential.as_secs_f64()
        );
    }
    Ok(())
}
