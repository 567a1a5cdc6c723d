//! `memory`: what `parjob::Memory` costs and saves. Three variants:
//!
//! - `cached re-run`: 10^6 calls of `square` whose results are all stored, on a `Memory` kept
//!   open between runs (its index loaded): nothing runs, every result comes from the cache.
//! - `cached re-run (open + index)`: the same, opening the file each time (the index of 10^6
//!   keys is loaded from it inside the clock).
//! - `small, storing`: the `small` scenario's calls with a new, empty cache each run: every
//!   result is computed and stored, against the same run without a memory (`small, no
//!   memory`). The note gives the cost per task.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use parjob::{Backend, Memory, Parallel, delayed};

use super::Context;
use crate::measure::{Candidate, Failure, Group, interleaved, parjob_name};
use crate::report::Measurement;
use crate::work::{spin, square};

fn cached_calls(ctx: &Context) -> u64 {
    if ctx.quick { 100_000 } else { 1_000_000 }
}

fn small_calls(ctx: &Context) -> u64 {
    if ctx.quick { 100_000 } else { 1_000_000 }
}

/// What one run of this scenario does, for the report.
pub fn size(ctx: &Context) -> String {
    format!(
        "{} fully cached calls of `square`; {} calls of `spin` stored into an empty cache, \
         against the same without a memory; {} workers, threading backend",
        cached_calls(ctx),
        small_calls(ctx),
        ctx.workers
    )
}

/// A fresh cache file path in the system's temporary folder.
fn scratch_file(tag: &str) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!(
        "parjob-bench-memory-{}-{tag}-{n}.sqlite",
        std::process::id()
    ))
}

fn remove_cache(path: &Path) {
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_os_string();
        file.push(suffix);
        let _ = std::fs::remove_file(file);
    }
}

/// Times the variants, interleaved.
pub fn run(ctx: &Context) -> Vec<Measurement> {
    let workers = ctx.workers as i32;
    let n = cached_calls(ctx);
    let small = small_calls(ctx);
    let backend = Backend::Threading;
    if !ctx.backends.contains(&backend) {
        return Vec::new();
    }
    // The cache every `cached re-run` reads, filled once before the clock.
    let cached_file = scratch_file("cached");
    let filled = Memory::open(&cached_file).and_then(|memory| {
        Parallel::new(workers)
            .backend(backend)
            .memory(&memory)
            .run((0..n).map(|i| delayed(square, i)))
            .map(drop)
    });
    let mut candidates: Vec<Candidate> = Vec::new();
    match filled {
        Ok(()) => {
            let warm = Memory::open(&cached_file);
            let parallel = Parallel::new(workers).backend(backend);
            candidates.push(Candidate::timed(
                "cached re-run",
                parjob_name(backend),
                Group::Parjob,
                {
                    let parallel = Parallel::new(workers).backend(backend);
                    move || {
                        let memory = warm.as_ref().map_err(|e| Failure::Failed(e.to_string()))?;
                        let start = Instant::now();
                        let out = parallel
                            .memory(memory)
                            .run((0..n).map(|i| delayed(square, i)))
                            .map_err(|e| Failure::Failed(e.to_string()))?;
                        let elapsed = start.elapsed();
                        assert_eq!(out.len() as u64, n, "a cached run returns every result");
                        Ok(elapsed)
                    }
                },
            ));
            let path = cached_file.clone();
            candidates.push(Candidate::timed(
                "cached re-run (open + index)",
                parjob_name(backend),
                Group::Parjob,
                move || {
                    let start = Instant::now();
                    let memory = Memory::open(&path).map_err(|e| Failure::Failed(e.to_string()))?;
                    let out = parallel
                        .memory(&memory)
                        .run((0..n).map(|i| delayed(square, i)))
                        .map_err(|e| Failure::Failed(e.to_string()))?;
                    let elapsed = start.elapsed();
                    drop(std::hint::black_box(out));
                    Ok(elapsed)
                },
            ));
        }
        Err(e) => eprintln!("parjob-bench: memory: cannot fill the cache: {e}"),
    }
    let plain = Parallel::new(workers).backend(backend);
    candidates.push(Candidate::parjob("small, no memory", backend, move || {
        plain.run((0..small).map(|i| delayed(spin, i)))
    }));
    let storing = Parallel::new(workers).backend(backend);
    candidates.push(Candidate::timed(
        "small, storing",
        parjob_name(backend),
        Group::Parjob,
        move || {
            let path = scratch_file("storing");
            let memory = Memory::open(&path).map_err(|e| Failure::Failed(e.to_string()))?;
            let start = Instant::now();
            // `run` returns once every result is written to the file.
            let out = storing
                .memory(&memory)
                .run((0..small).map(|i| delayed(spin, i)))
                .map_err(|e| Failure::Failed(e.to_string()))?;
            let elapsed = start.elapsed();
            drop(std::hint::black_box(out));
            drop(memory);
            remove_cache(&path);
            Ok(elapsed)
        },
    ));
    let outcomes = interleaved("memory", ctx.plan, candidates);
    remove_cache(&cached_file);
    let mut rows = Measurement::from_outcomes("memory", outcomes, |variant| {
        if variant.starts_with("small") {
            (small as f64, "tasks")
        } else {
            (n as f64, "tasks")
        }
    });
    // The cost of storing, per task: the median difference over the number of tasks.
    let median = |variant: &str| {
        rows.iter()
            .find(|m| m.variant == variant)
            .and_then(|m| crate::measure::summary(&m.samples))
            .map(|(median, _, _)| median)
    };
    if let (Some(with), Some(without)) = (median("small, storing"), median("small, no memory")) {
        let per_task_ns = (with - without) / small as f64 * 1e9;
        for m in rows.iter_mut().filter(|m| m.variant == "small, storing") {
            m.note = format!(
                "storing costs {per_task_ns:.0} ns per task ({:+.1}% on small)",
                (with / without - 1.0) * 100.0
            );
        }
    }
    for m in rows.iter_mut().filter(|m| m.variant.starts_with("cached")) {
        m.note = format!(
            "{:.0} ns per cached task",
            crate::measure::summary(&m.samples).map_or(0.0, |(s, _, _)| s / n as f64 * 1e9)
        );
    }
    rows
}
