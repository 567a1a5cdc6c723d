//! The seeds' CPU-bound halves and a crash lesson on an MPI world: rank 0 drives, every other
//! rank runs tasks in a local process pool. Build with the `mpi` feature and start it under a
//! launcher (as root, Open MPI also wants `--allow-run-as-root`; see docs/CLUSTER.md):
//!
//! ```text
//! cargo build --release --features parjob/mpi --example cluster
//! mpirun --oversubscribe -n 3 target/release/examples/cluster
//! ```
//!
//! Started without a launcher it says how to start it and exits with status 2.

mod lessons;

use std::time::Instant;

use parjob::{Backend, Error, Parallel, delayed, worker_info};

/// Doubles `i`, except that task 13 aborts its (local worker) process.
fn fragile(i: u32) -> u32 {
    if i == 13 {
        std::process::abort();
    }
    i * 2
}

/// Where a task ran: the pid of its local worker process.
fn pid_of_worker(_: u32) -> u32 {
    worker_info().pid
}

fn main() -> std::process::ExitCode {
    parjob::init(); // ranks 1.. serve here and never return
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error @ Error::BackendUnavailable { .. }) => {
            eprintln!("{error}");
            std::process::ExitCode::from(2)
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), Error> {
    let everyone = Parallel::new(-1).backend(Backend::Mpi);
    let pids = everyone.run((0..64u32).map(|i| delayed(pid_of_worker, i)))?;
    let mut distinct = pids.clone();
    distinct.sort_unstable();
    distinct.dedup();
    println!(
        "parjob cluster: 64 tasks ran in {} local worker processes across the worker ranks \
         (rank 0, pid {}, only drives)",
        distinct.len(),
        std::process::id()
    );

    let speedup = lessons::cpu_bound::run(Backend::Mpi)?;
    println!("CPU-bound halves: {speedup:.2}x on 2 worker ranks over 1");

    println!("\n== a task that aborts, on a cluster ==");
    let began = Instant::now();
    match everyone.run((0..100u32).map(|i| delayed(fragile, i))) {
        Err(error) => println!(
            "run: {error} (returned after {:.1} ms)",
            began.elapsed().as_secs_f64() * 1e3
        ),
        Ok(_) => println!("run: every task answered (task 13 should have aborted)"),
    }
    let out = everyone.run((0..8u32).map(|i| delayed(fragile, i)))?;
    println!("the same ranks, next run: {out:?} (the rank replaced its local worker; mpirun never saw a crash)");
    Ok(())
}
