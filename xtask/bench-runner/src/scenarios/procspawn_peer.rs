//! The Rust peer of the process rows (`--peers`): `procspawn`'s `Pool`, the best-known Rust
//! process pool, timed in the same process and interleaved with parjob's process backend.
//!
//! procspawn re-runs this executable for its workers too: `main` calls `parjob::init()` and then
//! `procspawn::init()`. parjob's worker is marked by `PARJOB_PROCESS_DRIVER` naming its parent,
//! procspawn's by `__PROCSPAWN_CONTENT_PROCESS_ID`; neither is set in the other's workers, so
//! each `init` returns at once in the other's worker and serves its own.
//!
//! A `Pool` runs one function call per `spawn` (two fresh IPC channels, a worker picked by a
//! monitor thread) and knows no batches, so two rows stand for it in `tiny` and `small`: one
//! `spawn` per task, as a call-for-call port of `Parallel::run` would do (fewer calls than the
//! other rows, compared on throughput; at most 64 in flight, as each holds file descriptors
//! until joined), and the input cut into one chunk per worker, each chunk one `spawn` (what its
//! users write for many small tasks). Timeouts are its own
//! `JoinHandle::join_timeout`, which kills the worker; a crash is the `SpawnError` its `join`
//! returns, after which the pool starts a new worker by itself.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use procspawn::{JoinHandle, Pool, SpawnError};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::measure::{Attempt, Candidate, Failure, Group};
use crate::report::Measurement;

/// One `spawn` per task.
pub const POOL: &str = "procspawn Pool";
/// The input cut into one chunk per worker, one `spawn` per chunk.
pub const CHUNKED: &str = "procspawn Pool, hand-chunked";

/// The per-task row does one call in this many of the other rows' (a call costs tens of us).
const PER_TASK_SHARE: u64 = 100;

/// Calls the per-task row keeps in flight. Each `spawn` holds two IPC channels (four file
/// descriptors) until it is joined, so 10^4 calls spawned at once end in `EMFILE` (seen on the
/// full `tiny`); a user would bound them so, and 64 keep 2 workers busy.
const IN_FLIGHT: usize = 64;

impl From<SpawnError> for Failure {
    fn from(error: SpawnError) -> Self {
        Failure::Failed(format!("procspawn: {error}"))
    }
}

/// A pool of `workers` processes, or why none.
fn pool(workers: usize) -> Result<Pool, Failure> {
    Pool::new(workers).map_err(Failure::from)
}

/// Runs `f(arg)` on a worker of `pool` and waits for it.
fn call<A, R>(pool: &Pool, arg: A, f: fn(A) -> R) -> Result<R, Failure>
where
    A: Serialize + DeserializeOwned,
    R: Serialize + DeserializeOwned + Send + 'static,
{
    pool.spawn(arg, f).join().map_err(Failure::from)
}

/// Waits for one call's result.
fn join<R>(handle: JoinHandle<R>) -> Result<R, Failure>
where
    R: Serialize + DeserializeOwned,
{
    handle.join().map_err(Failure::from)
}

/// Waits for every handle, in order.
fn join_all<R>(handles: Vec<JoinHandle<R>>) -> Result<Vec<R>, Failure>
where
    R: Serialize + DeserializeOwned,
{
    handles.into_iter().map(join).collect()
}

/// Times `run` on a pool of `workers` made once, outside the clock, at the first run.
fn on_kept_pool(
    variant: &str,
    implementation: &str,
    workers: usize,
    mut run: impl FnMut(&Pool) -> Attempt + Send + 'static,
) -> Candidate {
    let mut kept: Option<Pool> = None;
    Candidate::timed(variant, implementation, Group::Peer, move || {
        let pool = match &mut kept {
            Some(pool) => pool,
            None => kept.insert(pool(workers)?),
        };
        run(pool)
    })
}

/// Times a call of `run` as a whole, keeping its result from the optimiser.
fn clocked<T>(run: impl FnOnce() -> Result<T, Failure>) -> Attempt {
    let start = Instant::now();
    let out = run()?;
    let elapsed = start.elapsed();
    drop(black_box(out));
    Ok(elapsed)
}

/// `tiny` and `small`: `n` calls of `f` in the chunked row, `n / PER_TASK_SHARE` in the
/// per-task one; `chunk` is `f` over a vector. Results are collected in order.
pub fn map_calls(
    workers: usize,
    n: u64,
    f: fn(u64) -> u64,
    chunk: fn(Vec<u64>) -> Vec<u64>,
) -> Vec<Candidate> {
    let per_task = per_task_calls(n);
    vec![
        on_kept_pool("", POOL, workers, move |pool| {
            clocked(|| {
                let mut out = Vec::with_capacity(per_task as usize);
                let mut pending = std::collections::VecDeque::with_capacity(IN_FLIGHT);
                for i in 0..per_task {
                    if pending.len() == IN_FLIGHT
                        && let Some(first) = pending.pop_front()
                    {
                        out.push(join(first)?);
                    }
                    pending.push_back(pool.spawn(i, f));
                }
                for handle in pending {
                    out.push(join(handle)?);
                }
                Ok(out)
            })
        }),
        on_kept_pool("", CHUNKED, workers, move |pool| {
            clocked(|| {
                let size = n.div_ceil(workers.max(1) as u64).max(1);
                let handles: Vec<_> = (0..n)
                    .step_by(size as usize)
                    .map(|lo| pool.spawn((lo..(lo + size).min(n)).collect(), chunk))
                    .collect();
                let out: Vec<u64> = join_all(handles)?.into_iter().flatten().collect();
                Ok(out)
            })
        }),
    ]
}

/// How many calls the per-task row makes where the others make `n`.
fn per_task_calls(n: u64) -> u64 {
    (n / PER_TASK_SHARE).max(1)
}

/// Gives the per-task rows of `tiny` and `small` their own amount of work, and says so.
pub fn fix_per_task_rows(rows: &mut [Measurement], n: u64) {
    for row in rows.iter_mut().filter(|r| r.implementation == POOL) {
        let calls = per_task_calls(n);
        row.work = calls as f64;
        row.note = format!(
            "{calls} calls (one `spawn` each, at most {IN_FLIGHT} in flight) where the other rows \
             make {n}: compare throughputs"
        );
    }
}

/// `cpu_halves`: the two halves as two `spawn`s on a pool of 1 and of 2.
pub fn cpu_halves(halves: [(u64, u64); 2], sum: fn((u64, u64)) -> u64) -> Vec<Candidate> {
    [1, 2]
        .into_iter()
        .map(|n| {
            on_kept_pool(&format!("n_jobs={n}"), POOL, n, move |pool| {
                clocked(|| {
                    let handles = halves.map(|half| pool.spawn(half, sum)).into();
                    Ok(join_all(handles)?.into_iter().fold(0u64, u64::wrapping_add))
                })
            })
        })
        .collect()
}

/// `startup`: a fresh pool of 2 to its first result (shutdown not counted), and one call on a
/// started pool.
pub fn startup(square: fn(u64) -> u64) -> Vec<Candidate> {
    vec![
        Candidate::timed("fresh pool", POOL, Group::Peer, move || {
            let start = Instant::now();
            let pool = pool(2)?;
            let out = call(&pool, 7, square)?;
            let elapsed = start.elapsed();
            black_box(out);
            drop(pool);
            Ok(elapsed)
        }),
        on_kept_pool("warm pool", POOL, 2, move |pool| {
            clocked(|| call(pool, 7, square))
        }),
    ]
}

/// `big_input`: the two owned halves as two `spawn`s; `halves` copies them, before the clock.
pub fn big_input(
    data: Arc<Vec<f64>>,
    halves: fn(&[f64]) -> [Vec<f64>; 2],
    sum: fn(Vec<f64>) -> f64,
    square: fn(u64) -> u64,
) -> Vec<Candidate> {
    let run = move |pool: &Pool, data: &[f64]| {
        let owned = halves(data);
        clocked(|| {
            let handles = owned.map(|half| pool.spawn(half, sum)).into();
            Ok(join_all(handles)?.into_iter().sum::<f64>())
        })
    };
    let first = Arc::clone(&data);
    vec![
        Candidate::timed("first send", POOL, Group::Peer, move || {
            let pool = pool(2)?;
            // Start the workers first: this row is about the first big send, not start-up.
            call(&pool, 1, square)?;
            run(&pool, &first)
        }),
        on_kept_pool("warm pool", POOL, 2, move |pool| run(pool, &data)),
    ]
}

/// `crash`: a task that aborts its worker, until `join` returns the error; then one call on
/// the same pool.
pub fn crash(abort_now: fn(()) -> u64, square: fn(u64) -> u64) -> Vec<Candidate> {
    let shared: Arc<std::sync::OnceLock<Pool>> = Arc::new(std::sync::OnceLock::new());
    let next = Arc::clone(&shared);
    vec![
        Candidate::timed("abort to error", POOL, Group::Peer, move || {
            let pool = kept(&shared)?;
            let start = Instant::now();
            let out = pool.spawn((), abort_now).join();
            let elapsed = start.elapsed();
            match out {
                Err(e) if !e.is_timeout() && !e.is_panic() => Ok(elapsed),
                Err(other) => Err(Failure::from(other)),
                Ok(_) => Err(Failure::Failed(
                    "the aborting task returned a result instead of crashing".into(),
                )),
            }
        }),
        Candidate::timed("next call", POOL, Group::Peer, move || {
            let pool = kept(&next)?;
            clocked(|| call(pool, 3, square))
        }),
    ]
}

/// The pool of 2 that two candidates share, made by the first to run.
fn kept(cell: &std::sync::OnceLock<Pool>) -> Result<&Pool, Failure> {
    if let Some(pool) = cell.get() {
        return Ok(pool);
    }
    let made = pool(2)?;
    Ok(cell.get_or_init(|| made))
}

/// `timeout`: a task that sleeps `task_ms` joined with `JoinHandle::join_timeout(limit)`
/// (procspawn kills the worker then, and its pool starts another); then one call on the same
/// pool, and one on a pool that lost no worker.
pub fn timeout(
    limit: Duration,
    task_ms: u64,
    nap: fn(u64) -> u64,
    square: fn(u64) -> u64,
) -> Vec<Candidate> {
    let shared: Arc<std::sync::OnceLock<Pool>> = Arc::new(std::sync::OnceLock::new());
    let next = Arc::clone(&shared);
    vec![
        Candidate::timed("limit to error", POOL, Group::Peer, move || {
            let pool = kept(&shared)?;
            let start = Instant::now();
            let mut handle = pool.spawn(task_ms, nap);
            let out = handle.join_timeout(limit);
            let elapsed = start.elapsed();
            // Dropped at once: the pool's monitor hands the killed call's error to the handle
            // over a rendezvous channel, which waits for a reader while the handle lives.
            drop(handle);
            match out {
                Err(e) if e.is_timeout() => Ok(elapsed),
                Err(other) => Err(Failure::from(other)),
                Ok(_) => Err(Failure::Failed(format!(
                    "the {task_ms} ms task returned a result instead of timing out"
                ))),
            }
        }),
        Candidate::timed("next call", POOL, Group::Peer, move || {
            let pool = kept(&next)?;
            clocked(|| call(pool, 3, square))
        }),
        on_kept_pool("warm call", POOL, 2, move |pool| {
            clocked(|| call(pool, 3, square))
        }),
        on_kept_pool("warm call after idle", POOL, 2, move |pool| {
            std::thread::sleep(limit);
            clocked(|| call(pool, 3, square))
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Status;

    fn row(implementation: &str, work: f64) -> Measurement {
        Measurement {
            scenario: "tiny".into(),
            variant: String::new(),
            implementation: implementation.into(),
            group: Group::Peer,
            work,
            unit: "tasks".into(),
            samples: vec![0.1],
            status: Status::Measured,
            note: String::new(),
        }
    }

    #[test]
    fn only_the_per_task_row_gets_the_smaller_amount_of_work() {
        let mut rows = [row(POOL, 200_000.0), row(CHUNKED, 200_000.0)];
        fix_per_task_rows(&mut rows, 200_000);
        assert_eq!(rows[0].work, 2000.0);
        assert!(rows[0].note.contains("2000 calls"), "{}", rows[0].note);
        assert_eq!(rows[1].work, 200_000.0);
        assert!(rows[1].note.is_empty());
    }
}
