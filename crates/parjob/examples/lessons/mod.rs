//! The seed lessons (Python's threads-vs-processes classics), one module each, shared by the
//! single-lesson examples and by `seeds`, which runs them all.

#![allow(dead_code)] // each example binary uses only some of the lessons

pub mod big_array;
pub mod cpu_bound;
pub mod executor_map;
pub mod executor_submit;
pub mod http_status;
pub mod process_crash;
pub mod shared_counter;
pub mod sleepy_tasks;
pub mod sum_of_squares;

use clap::Parser;

/// Runs one of parjob's seed lessons (the classic threads-vs-processes programs);
/// `--backend` chooses where its tasks run.
#[derive(Debug, Parser)]
pub struct Flags {
    /// Where tasks run: sequential, threading (threads), process (processes, loky,
    /// multiprocessing), or mpi (built with the `mpi` feature, under mpirun). PARJOB_BACKEND
    /// sets it when the flag is not given.
    #[arg(long, env = "PARJOB_BACKEND", default_value = "threading")]
    pub backend: parjob::Backend,
}

/// `F::parse()`, except that a bad `PARJOB_BACKEND` is reported as coming from that variable:
/// clap names the flag the variable fills (`--backend`), which the user never typed.
pub fn parse_flags<F: Parser>() -> F {
    F::try_parse().unwrap_or_else(|error| {
        let typed = std::env::args_os()
            .filter_map(|arg| arg.into_string().ok())
            .any(|arg| arg == "--backend" || arg.starts_with("--backend="));
        let bad_value = matches!(
            error.kind(),
            clap::error::ErrorKind::InvalidValue | clap::error::ErrorKind::ValueValidation
        );
        if bad_value && !typed {
            // The library's own check of the variable, with its wording.
            if let Err(bad_env) = parjob::Parallel::new(1).effective_backend() {
                eprintln!("error: {bad_env}");
                std::process::exit(2);
            }
        }
        error.exit()
    })
}

/// Prints the name of the lesson about to run.
pub fn banner(title: &str, backend: parjob::Backend) {
    println!("\n=== {title} ({backend} backend) ===");
}

/// A task's view of where it runs, as `parjob-worker-1 (pid 1234)` for a thread or
/// `process worker 1 (pid 1234)` for a worker process.
pub fn whereabouts() -> String {
    let info = parjob::worker_info();
    let name = match (info.backend, info.worker) {
        (Some(parjob::Backend::Process), Some(worker)) => format!("process worker {worker}"),
        _ => info.thread_name.unwrap_or_else(|| "main".into()),
    };
    format!("{name} (pid {})", info.pid)
}
