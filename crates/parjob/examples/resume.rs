//! A long run killed half way, then resumed from its cache:
//! `cargo run --release --example resume -- --backend threading`.
//!
//! The example starts itself again as a child that runs 400 tasks of 10 ms each with a
//! `Memory`, kills that child with SIGKILL after about half of the run (a timer, as a crash
//! or a node reboot would), then runs the same tasks here and prints how many came from the
//! cache and how many ran. Nothing finished before the kill runs again.

mod lessons;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use parjob::{Backend, Memory, Parallel, delayed};

/// Kills a run with a memory half way, then resumes it.
#[derive(Debug, Parser)]
struct Flags {
    /// Where tasks run: threading (threads), process (processes, loky, multiprocessing),
    /// sequential.
    #[arg(long, env = "PARJOB_BACKEND", default_value = "threading")]
    backend: Backend,
    /// How many tasks the run has.
    #[arg(long, default_value_t = 400)]
    tasks: u64,
    /// Milliseconds each task works.
    #[arg(long, default_value_t = 10)]
    task_ms: u64,
    /// Workers.
    #[arg(long, default_value_t = 4)]
    n_jobs: i32,
    /// The cache file (default: a new one in a temporary folder).
    #[arg(long)]
    cache: Option<std::path::PathBuf>,
    /// Runs the long run and nothing else (how the example starts its child).
    #[arg(long, hide = true)]
    child: bool,
}

/// One task: a slow function of `x`.
fn slow_step(x: u64, ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    x.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

fn run(flags: &Flags, memory: &Memory) -> Result<Vec<u64>, parjob::MemoryError> {
    let parallel = Parallel::new(flags.n_jobs).backend(flags.backend);
    let ms = flags.task_ms;
    parallel
        .memory(memory)
        .run((0..flags.tasks).map(|x| delayed(slow_step, (x, ms))))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    parjob::init();
    let flags = lessons::parse_flags::<Flags>();
    if flags.child {
        let cache = flags.cache.as_ref().ok_or("--child needs --cache")?;
        run(&flags, &Memory::open(cache)?)?;
        return Ok(());
    }
    let dir = tempfile::tempdir()?;
    let cache = flags
        .cache
        .clone()
        .unwrap_or_else(|| dir.path().join("resume.sqlite"));
    let workers = flags.n_jobs.max(1) as u64;
    let whole = Duration::from_millis(flags.tasks * flags.task_ms / workers);
    let kill_after = whole / 2;

    println!(
        "run 1: {} tasks of {} ms on {} workers ({}), killed with SIGKILL after {kill_after:?}",
        flags.tasks, flags.task_ms, flags.n_jobs, flags.backend
    );
    let exe = std::env::current_exe()?;
    let mut child = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--child")
        .arg("--cache")
        .arg(&cache)
        .stdin(Stdio::null())
        .spawn()?;
    let started = Instant::now();
    std::thread::sleep(kill_after);
    child.kill()?; // SIGKILL on Unix: the child cannot clean up or flush anything.
    let status = child.wait()?;
    println!("run 1: stopped after {:?} ({status})", started.elapsed());

    let memory = Memory::open(&cache)?;
    let stored = memory.stats()?.entries;
    println!("the cache holds {stored} results from run 1");
    let started = Instant::now();
    let out = run(&flags, &memory)?;
    let stats = memory.stats()?;
    println!(
        "run 2 (resumed): {} results in {:?}: {} from the cache, {} computed",
        out.len(),
        started.elapsed(),
        stats.hits,
        stats.misses
    );
    let expected: Vec<u64> = (0..flags.tasks).map(|x| slow_step(x, 0)).collect();
    assert_eq!(
        out, expected,
        "a resumed run gives what an uninterrupted one does"
    );
    println!("the output equals an uninterrupted run's");
    Ok(())
}
