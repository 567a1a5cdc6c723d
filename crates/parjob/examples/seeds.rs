//! All the seed lessons of threads vs processes, one after another: on threads, then the
//! lessons whose point is processes on processes, or every lesson on the backend `--backend`
//! names:
//!
//! ```text
//! cargo run --release --example seeds
//! cargo run --release --example seeds -- --backend process
//! ```

mod lessons;

use clap::Parser;
use parjob::Backend;

/// Runs parjob's seed lessons (the classic threads-vs-processes programs) one after another.
#[derive(Debug, Parser)]
struct Flags {
    /// Run every lesson on this backend only: sequential, threading (threads), process
    /// (processes, loky, multiprocessing). Without it: every lesson on threads, then the
    /// lessons whose point is processes (shared state, CPU-bound work, big arrays, a crash) on
    /// processes. `PARJOB_BACKEND` sets it too, as in every example.
    #[arg(long, env = "PARJOB_BACKEND")]
    backend: Option<Backend>,
}

/// Every lesson, in the order of the seed material.
fn all_lessons(backend: Backend) -> Result<(), parjob::Error> {
    lessons::sum_of_squares::run(backend)?;
    lessons::sleepy_tasks::run(backend)?;
    lessons::shared_counter::run(backend)?;
    lessons::cpu_bound::run(backend)?;
    lessons::big_array::run(backend)?;
    lessons::http_status::run(backend)?;
    lessons::executor_submit::run(backend)?;
    lessons::executor_map::run(backend)?;
    lessons::process_crash::run(backend)?;
    Ok(())
}

fn main() -> Result<(), parjob::Error> {
    parjob::init();
    let flags = lessons::parse_flags::<Flags>();
    let cpus = parjob::cpu_count();
    match flags.backend {
        Some(backend) => {
            println!(
                "parjob seeds: the threads-vs-processes lessons on the {backend} backend ({cpus} CPUs)"
            );
            all_lessons(backend)?;
            println!("\nall lessons ran on the {backend} backend");
        }
        None => {
            println!(
                "parjob seeds: the threads-vs-processes lessons on threads, then processes ({cpus} CPUs)"
            );
            lessons::sum_of_squares::run(Backend::Threading)?;
            lessons::sum_of_squares::run(Backend::Process)?;
            lessons::sleepy_tasks::run(Backend::Threading)?;
            lessons::shared_counter::run(Backend::Threading)?;
            lessons::shared_counter::run(Backend::Process)?;
            let threads = lessons::cpu_bound::run(Backend::Threading)?;
            let processes = lessons::cpu_bound::run(Backend::Process)?;
            println!(
                "\nCPU-bound speedup with 2 workers: {threads:.2}x on threads, {processes:.2}x on \
                 processes (Rust has no GIL: both compute in parallel)"
            );
            if threads.min(processes) < 1.3 {
                // Two workers can only go as fast as the CPUs they get.
                let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
                let load = load.split_whitespace().next().unwrap_or("unknown");
                println!(
                    "  (under 1.3x: this machine has {} CPUs for this program and a load \
                     average of {load}; on two idle cores both reach about 1.7-1.9x)",
                    std::thread::available_parallelism().map_or(1, |n| n.get())
                );
            }
            lessons::big_array::run(Backend::Process)?;
            lessons::http_status::run(Backend::Threading)?;
            lessons::executor_submit::run(Backend::Threading)?;
            lessons::executor_map::run(Backend::Threading)?;
            lessons::process_crash::run(Backend::Process)?;
            println!("\nall lessons ran; `--backend NAME` runs every one of them on one backend");
        }
    }
    Ok(())
}
