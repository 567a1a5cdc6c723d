//! Daemon work (Python's daemon threads): a background task prints a tick every 200 ms and
//! never returns; `main` does its own work for a second and returns, and the ticks stop with
//! it, because a daemon executor does not wait for its tasks when dropped. With the process
//! backend, its worker process is gone too.
//!
//! ```text
//! cargo run --release --example daemon_background -- --backend threading
//! ```

mod lessons;

use std::time::Duration;

use parjob::{Backend, Executor, delayed};

/// Prints a tick every 200 ms, forever.
fn heartbeat(every_ms: u64) {
    for tick in 1.. {
        println!("  background tick {tick} from {}", lessons::whereabouts());
        std::thread::sleep(Duration::from_millis(every_ms));
    }
}

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let backend = lessons::parse_flags::<lessons::Flags>().backend;
    lessons::banner("daemon background task", backend);
    if backend == Backend::Sequential {
        println!(
            "the sequential backend runs a task inside submit(), so a task that never ends \
             would never let main go on: use threading or process"
        );
        return Ok(());
    }
    let executor = Executor::new(1).backend(backend).daemon(true);
    let background = executor.submit(delayed(heartbeat, 200));
    // Half a tick out of step with the background task, so that the lines do not collide.
    std::thread::sleep(Duration::from_millis(100));
    for step in 1..=5 {
        std::thread::sleep(Duration::from_millis(200));
        println!("main: step {step} of 5");
    }
    println!(
        "main returns now; the background task is still running: {}",
        background.is_running()
    );
    // Dropping a daemon executor does not wait; the ticks stop when main returns.
    drop(executor);
    Ok(())
}
