//! Lesson: `concurrent.futures` with `submit`. Two tasks of one second each, submitted to an
//! executor of two workers, finish together in about one second; each `Future` gives back
//! its task's value, or its failure through `error()` (Python's `exception()`).

use std::time::{Duration, Instant};

use parjob::{Backend, Executor, delayed};

/// Sleeps one second like a task waiting on the network, and says when it ran, counted from
/// `began_ms` (the driver's clock, in milliseconds since the epoch).
fn one_second_task(name: String, began_ms: u64) -> String {
    let at = |ms: u64| ms.saturating_sub(began_ms) as f64 / 1000.0;
    let start = now_ms();
    println!(
        "  {name} starts at {:.2} s on {}",
        at(start),
        super::whereabouts()
    );
    std::thread::sleep(Duration::from_secs(1));
    let end = now_ms();
    println!("  {name} ends at {:.2} s", at(end));
    format!("{name} slept from {:.2} s to {:.2} s", at(start), at(end))
}

/// Milliseconds since the Unix epoch: a clock every worker process shares with the driver.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn divide(a: i64, b: i64) -> i64 {
    a / b
}

/// Runs the lesson on `backend`.
pub fn run(backend: Backend) -> Result<(), parjob::Error> {
    super::banner("executor submit: two tasks of 1 s", backend);
    let began = Instant::now();
    let began_ms = now_ms();
    // Like Python's `with ThreadPoolExecutor(max_workers=2) as executor:`: dropping the
    // executor at the end of the block waits for its tasks.
    {
        let executor = Executor::new(2).backend(backend);
        let first = executor.submit(delayed(one_second_task, ("task-1".to_string(), began_ms)));
        let second = executor.submit(delayed(one_second_task, ("task-2".to_string(), began_ms)));
        println!("  submitted both; first done yet? {}", first.is_done());
        println!("  {}", first.result()?);
        println!("  {}", second.result()?);

        let failing = executor.submit(delayed(divide, (1, 0)));
        match failing.error() {
            Some(error) => println!("  a failing task reports through error(): {error}"),
            None => println!("  1 / 0 did not fail?"),
        }
    }
    println!(
        "{backend}: both tasks done in {:.2} s (one after the other would take 2 s)",
        began.elapsed().as_secs_f64()
    );
    Ok(())
}
