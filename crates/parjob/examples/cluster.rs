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

/// The tiny task of the throughput line.
fn square(x: u64) -> u64 {
    x * x
}

/// Where a task ran: its worker rank, that rank's host, and the pid of its local worker
/// process.
fn where_it_ran(_: u32) -> (Option<usize>, String, u32) {
    let info = worker_info();
    (info.rank, info.host, info.pid)
}

fn main() -> std::process::ExitCode {
    parjob::init(); // ranks 1.. serve here and never return
    if std::env::args_os()
        .skip(1)
        .any(|a| a == "--help" || a == "-h")
    {
        println!(
            "cluster: the seeds' CPU-bound halves and a crash lesson on an MPI world.\n\
             Takes no flags; start it under a launcher, e.g.\n  \
             mpirun --oversubscribe -n 3 target/release/examples/cluster\n\
             (see docs/CLUSTER.md)"
        );
        return std::process::ExitCode::SUCCESS;
    }
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
    let places = everyone.run((0..64u32).map(|i| delayed(where_it_ran, i)))?;
    let mut per_worker = std::collections::BTreeMap::new();
    for place in places {
        *per_worker.entry(place).or_insert(0) += 1;
    }
    println!(
        "parjob cluster: rank 0 (pid {}) only drives; 64 tasks ran in {} local worker processes:",
        std::process::id(),
        per_worker.len()
    );
    for ((rank, host, pid), tasks) in &per_worker {
        let rank = rank.map_or("?".to_string(), |r| r.to_string());
        println!("  MPI rank {rank} on {host}, local worker pid {pid}: {tasks} tasks");
    }

    // Tiny tasks: auto batching packs thousands into one MPI message.
    let tiny = Parallel::new(-1).backend(Backend::Mpi);
    tiny.run((0..1000u64).map(|i| delayed(square, i)))?; // warm up the batch sizer
    let began = Instant::now();
    let squares = tiny.run((0..1_000_000u64).map(|i| delayed(square, i)))?;
    let took = began.elapsed();
    let correct = squares
        .iter()
        .enumerate()
        .all(|(i, &v)| v == (i as u64) * (i as u64));
    println!(
        "10^6 tiny tasks: {:.0} ms, {:.2e} tasks/s, results correct: {correct}",
        took.as_secs_f64() * 1e3,
        1e6 / took.as_secs_f64()
    );
    let mut calls: Vec<f64> = (0..200)
        .map(|i| {
            let began = Instant::now();
            tiny.run([delayed(square, i)])
                .map(|_| began.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    calls.sort_by(f64::total_cmp);
    println!(
        "a warm call of one task: median {:.3} ms, p90 {:.3} ms",
        calls[calls.len() / 2],
        calls[calls.len() * 9 / 10]
    );

    // On MPI a "worker" of the lesson is a worker rank (with its local pool).
    let ranks = parjob::mpi_worker_ranks().unwrap_or(0);
    if ranks < 2 {
        println!(
            "\n== the seeds' CPU-bound halves: not run: they compare 1 worker rank with 2, and \
             this world has {ranks} (start 3 ranks: `mpirun --oversubscribe -n 3 ...`) =="
        );
    } else {
        println!("\n== the seeds' CPU-bound halves: 1 worker rank, then 2 ==");
        let speedup = lessons::cpu_bound::run(Backend::Mpi)?;
        println!("CPU-bound halves: 2 worker ranks were {speedup:.2}x as fast as 1");
        if speedup < 1.5 {
            println!(
                "  (below 1.5x: fewer free cores than worker ranks, or a busy machine: the \
                 two halves need a core each to themselves, so rerun on a quiet one)"
            );
        }
    }

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
    println!(
        "the same ranks, next run: {out:?} (the rank replaced its local worker; the launcher \
         never saw a crash)"
    );
    Ok(())
}
