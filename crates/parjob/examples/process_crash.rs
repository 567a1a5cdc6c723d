//! A task that aborts becomes an error, and the pool survives:
//! `cargo run --release --example process_crash -- --backend process`.
//!
//! On the threading or sequential backend an abort would take this whole program down, so the
//! example only says so; a hung task there is reported but cannot be stopped.

use std::time::{Duration, Instant};

use clap::Parser;
use parjob::{Backend, Error, Parallel, delayed};

/// The flags of this example.
#[derive(Debug, Parser)]
struct Flags {
    /// Where tasks run: process (processes, loky, multiprocessing), threading, sequential.
    #[arg(long, default_value = "process")]
    backend: Backend,
}

/// Doubles `i`, except that task 13 aborts its process.
fn fragile(i: u32) -> u32 {
    if i == 13 {
        std::process::abort();
    }
    i * 2
}

/// Never returns.
fn hangs(_: ()) {
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

fn main() -> Result<(), Error> {
    parjob::init();
    let flags = Flags::parse();
    if flags.backend != Backend::Process {
        println!(
            "on the {} backend an abort in a task ends this whole program: run with \
             --backend process to see it turned into an error",
            flags.backend
        );
        return Ok(());
    }
    let parallel = Parallel::new(2).backend(flags.backend);

    let began = Instant::now();
    match parallel.run((0..100u32).map(|i| delayed(fragile, i))) {
        Err(error) => println!(
            "run: {error} (returned after {:.1} ms)",
            began.elapsed().as_secs_f64() * 1e3
        ),
        Ok(_) => unreachable!("task 13 aborts"),
    }

    let results: Vec<Result<u32, Error>> = parallel
        .run_iter((0..30u32).map(|i| delayed(fragile, i)))
        .collect();
    let answered = results.iter().filter(|r| r.is_ok()).count();
    println!(
        "run_iter: {answered} of 30 tasks answered; the other one: {:?}",
        results[13]
    );

    let out = parallel.run((0..8u32).map(|i| delayed(fragile, i)))?;
    println!("the same pool, next run: {out:?}");

    let hung = Parallel::new(1)
        .backend(flags.backend)
        .timeout(Duration::from_millis(200))
        .run([delayed(hangs, ())]);
    if let Err(error) = hung {
        println!("a hung task: {error}");
    }
    Ok(())
}
