//! A long run over flaky tasks that still finishes:
//! `cargo run --release --example flaky` (worker processes; `--backend threading` too).
//!
//! Of 400 tasks, a few crash their worker (abort) or hang the first time they run, and one
//! crashes every time. The run retries crashed and hung tasks (twice, after a short backoff),
//! keeps going past the one that never succeeds (`run_results`), prints its insights, and
//! writes a Chrome trace of every batch on every worker to the path in `PARJOB_TRACE`, or else
//! to `parjob-flaky-trace.json` in the temporary directory. Open it in
//! <https://ui.perfetto.dev>.
//!
//! On the threading and sequential backends an abort would take the whole program down, so
//! there the crashing tasks panic instead (and panics are retried too); and a thread cannot be
//! stopped, so there a hanging task sleeps 3 s instead of an hour: past the 2 s timeout, it is
//! reported timed out (on threads at once, while it sleeps on; on sequential, where it runs on
//! the calling thread, once it returns) and retried.

mod lessons;

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use parjob::{Backend, Error, Parallel, Retry, delayed};

/// Runs 400 flaky tasks with retries, keeps going, prints insights, writes a trace.
#[derive(Debug, Parser)]
struct Flags {
    /// Where tasks run: process (processes, loky, multiprocessing), threading, sequential.
    #[arg(long, env = "PARJOB_BACKEND", default_value = "process")]
    backend: Backend,
}

/// What a task does wrong.
const CRASH_ONCE: u8 = 1;
const HANG_ONCE: u8 = 2;
const CRASH_ALWAYS: u8 = 3;

/// Some work: arithmetic on `i` (about 3 ms a task in a debug build, tens of microseconds in
/// release).
fn work(i: u64) -> u64 {
    let mut x = i;
    for _ in 0..200_000 {
        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    }
    x % 1000
}

/// Fails as `trouble` says (the first time only, for the `_ONCE` kinds: a marker file in
/// `dir` remembers across worker processes), then does its work.
fn flaky((dir, i, trouble, abort): (String, u64, u8, bool)) -> u64 {
    let marker = Path::new(&dir).join(i.to_string());
    let first_time = trouble != 0 && !marker.exists();
    if first_time {
        let _ = std::fs::write(&marker, b"");
    }
    let crash = |what: &str| {
        if abort {
            std::process::abort();
        }
        panic!("task {i} {what}");
    };
    match trouble {
        CRASH_ONCE if first_time => crash("crashed"),
        // A worker process that hangs is killed at the timeout; a thread cannot be.
        HANG_ONCE if first_time => {
            std::thread::sleep(Duration::from_secs(if abort { 3600 } else { 3 }))
        }
        CRASH_ALWAYS => crash("crashes every time"),
        _ => {}
    }
    work(i)
}

fn main() -> Result<(), Error> {
    parjob::init();
    let backend = lessons::parse_flags::<Flags>().backend;
    let markers = tempfile::tempdir().map_err(|e| Error::InvalidConfig(e.to_string()))?;
    let dir = markers.path().display().to_string();
    let trace: PathBuf = std::env::var_os("PARJOB_TRACE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("parjob-flaky-trace.json"));
    let abort = backend == Backend::Process;

    let parallel = Parallel::new(4)
        .backend(backend)
        .timeout(Duration::from_secs(2))
        .retry(
            Retry::new(2)
                .backoff(Duration::from_millis(50))
                .on_panic(!abort),
        )
        .insights(true)
        .trace(&trace);
    let tasks = (0..400u64).map(|i| {
        let trouble = match i {
            77 => CRASH_ALWAYS,
            i if i % 60 == 13 => CRASH_ONCE,
            i if i % 150 == 42 => HANG_ONCE,
            _ => 0,
        };
        delayed(flaky, (dir.clone(), i, trouble, abort))
    });
    let results = parallel.run_results(tasks)?;

    let ok = results.iter().filter(|r| r.is_ok()).count();
    println!("{ok} of {} tasks succeeded", results.len());
    // Each error names its task ("task 77 failed 3 times: ...").
    for error in results.iter().filter_map(|r| r.as_ref().err()) {
        println!("{error}");
    }
    if let Some(insights) = parallel.last_insights() {
        println!("{insights}");
    }
    println!(
        "trace: {} (open it in https://ui.perfetto.dev)",
        trace.display()
    );
    Ok(())
}
