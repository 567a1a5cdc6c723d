use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use parjob::{Backend, BatchSize, Error, Parallel, delayed, worker_info};

fn where_am_i(_: u32) -> (Option<usize>, Option<String>, u32) {
    std::thread::sleep(Duration::from_millis(2));
    let info = worker_info();
    (info.worker, info.thread_name, info.pid)
}

#[test]
fn threads_are_named_and_indexed_workers_of_this_process() {
    let out = Parallel::new(3)
        .backend(Backend::Threading)
        .run((0..60u32).map(|i| delayed(where_am_i, i)))
        .unwrap();
    let mut workers = HashSet::new();
    for (worker, name, pid) in out {
        let worker = worker.expect("tasks run on a parjob worker");
        assert!(worker < 3);
        assert_eq!(
            name.as_deref(),
            Some(format!("parjob-worker-{worker}").as_str())
        );
        assert_eq!(pid, std::process::id());
        workers.insert(worker);
    }
    assert!(workers.len() > 1, "only workers {workers:?} ran tasks");
}

#[test]
fn sequential_runs_on_the_calling_thread() {
    let caller = std::thread::current().name().map(str::to_owned);
    let out = Parallel::new(3)
        .backend(Backend::Sequential)
        .run((0..5u32).map(|i| delayed(where_am_i, i)))
        .unwrap();
    assert!(
        out.iter()
            .all(|(w, name, _)| *w == Some(0) && *name == caller)
    );
}

static RUNNING: AtomicUsize = AtomicUsize::new(0);
static MOST_AT_ONCE: AtomicUsize = AtomicUsize::new(0);

fn wait_for_io(_: u32) {
    let now = RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    MOST_AT_ONCE.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(300));
    RUNNING.fetch_sub(1, Ordering::SeqCst);
}

#[test]
fn io_bound_tasks_all_overlap_with_n_jobs_far_above_the_cores() {
    Parallel::new(100)
        .backend(Backend::Threading)
        .run((0..100u32).map(|i| delayed(wait_for_io, i)))
        .unwrap();
    assert_eq!(MOST_AT_ONCE.load(Ordering::SeqCst), 100);
}

static POOL_PEAK_RUNNING: AtomicUsize = AtomicUsize::new(0);
static POOL_PEAK: AtomicUsize = AtomicUsize::new(0);

fn busy(_: u32) {
    let now = POOL_PEAK_RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    POOL_PEAK.fetch_max(now, Ordering::SeqCst);
    std::thread::sleep(Duration::from_millis(5));
    POOL_PEAK_RUNNING.fetch_sub(1, Ordering::SeqCst);
}

#[test]
fn never_more_tasks_at_once_than_n_jobs() {
    Parallel::new(3)
        .backend(Backend::Threading)
        .run((0..60u32).map(|i| delayed(busy, i)))
        .unwrap();
    assert_eq!(POOL_PEAK.load(Ordering::SeqCst), 3);
}

static SHORT_RUNNING: AtomicUsize = AtomicUsize::new(0);
static SHORT_PEAK: AtomicUsize = AtomicUsize::new(0);

fn short(i: u32) -> u32 {
    let now = SHORT_RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    SHORT_PEAK.fetch_max(now, Ordering::SeqCst);
    let out = std::hint::black_box(i);
    SHORT_RUNNING.fetch_sub(1, Ordering::SeqCst);
    out
}

#[test]
fn short_batches_queued_as_workers_run_out_all_run_within_n_jobs() {
    // A worker that runs out of work keeps looking for a moment before it parks, and a batch
    // queued meanwhile is handed to it without a wake-up. With one batch in flight every
    // batch takes that path; with three on two workers, some meet a looking thread and some a
    // running one. None may be lost (the run would hang) or run beside two others.
    for pre_dispatch in [1, 3] {
        let parallel = Parallel::new(2)
            .backend(Backend::Threading)
            .batch_size(BatchSize::Fixed(1))
            .pre_dispatch(pre_dispatch);
        for _ in 0..20 {
            let out: Vec<u32> = parallel
                .run_iter((0..300u32).map(|i| delayed(short, i)))
                .collect::<Result<_, _>>()
                .unwrap();
            assert_eq!(out, (0..300).collect::<Vec<_>>());
        }
    }
    let peak = SHORT_PEAK.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&peak),
        "{peak} tasks ran at once on 2 workers"
    );
}

fn nested(n: u64) -> u64 {
    Parallel::new(2)
        .backend(Backend::Threading)
        .run((0..n).map(|i| delayed(|x: u64| x + 1, i)))
        .unwrap()
        .into_iter()
        .sum()
}

#[test]
fn a_task_may_run_its_own_parallel() {
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .run((1..5u64).map(|n| delayed(nested, n)))
        .unwrap();
    assert_eq!(out, [1, 3, 6, 10]);
}

/// Tasks that wait for one another: each arrives, then waits until `n` have arrived.
struct Gathering {
    arrived: Mutex<usize>,
    all_here: Condvar,
}

impl Gathering {
    const fn new() -> Self {
        Gathering {
            arrived: Mutex::new(0),
            all_here: Condvar::new(),
        }
    }

    /// Arrives and waits (blocked, for at most a minute) until `n` tasks have: whether they
    /// all did, so ran at once, and the worker this one ran on.
    fn meet(&self, n: usize) -> (bool, Option<usize>) {
        let mut arrived = self.arrived.lock().unwrap();
        *arrived += 1;
        self.all_here.notify_all();
        let (arrived, _) = self
            .all_here
            .wait_timeout_while(arrived, Duration::from_secs(60), |a| *a < n)
            .unwrap();
        (*arrived >= n, worker_info().worker)
    }
}

static THOUSAND: Gathering = Gathering::new();

fn gather_1000(_: u32) -> (bool, Option<usize>) {
    THOUSAND.meet(1000)
}

#[test]
fn a_thousand_waiting_tasks_wait_at_once_on_n_jobs_1000() {
    let out = Parallel::new(1000)
        .backend(Backend::Threading)
        .batch_size(BatchSize::Fixed(1))
        .run((0..1000u32).map(|i| delayed(gather_1000, i)))
        .unwrap();
    assert!(out.iter().all(|(met, _)| *met), "not all 1000 ran at once");
    let workers: HashSet<usize> = out.iter().filter_map(|(_, w)| *w).collect();
    assert_eq!(workers.len(), 1000);
    assert!(workers.iter().all(|&w| w < 1000));
}

/// The process's threads whose name starts with `prefix` (Linux: `/proc/self/task`).
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("/proc/self/task lists this process's threads")
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("comm")).ok())
        .filter(|name| name.starts_with(prefix))
        .count()
}

/// This process's CPU time so far, in clock ticks (user + system, `/proc/self/stat`).
fn cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("/proc/self/stat is readable");
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = &stat[stat
        .rfind(')')
        .expect("stat has the command in parentheses")
        + 2..];
    let fields: Vec<&str> = after.split(' ').collect();
    // utime and stime are fields 14 and 15 of stat, so 11 and 12 after the name.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

#[test]
#[ignore = "run in a child process by a_big_idle_pool_starts_only_the_threads_it_needs_and_uses_no_cpu"]
fn big_idle_pool_child() {
    let parallel = Parallel::new(5000).backend(Backend::Threading);
    let out = parallel
        .run((0..4u32).map(|i| delayed(where_am_i, i)))
        .unwrap();
    assert!(out.iter().all(|(w, _, _)| w.is_some_and(|w| w < 4)));
    let started = threads_named("parjob-worker");
    assert!(
        (1..=4).contains(&started),
        "a pool of 5000 that ran 4 tasks started {started} threads"
    );
    let before = cpu_ticks();
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks() - before;
    // Clock ticks are 10 ms on Linux: an idle pool's threads are parked and spend none.
    assert!(
        spent <= 5,
        "an idle pool of 5000 spent {spent} ticks of CPU in 1 s"
    );
    drop(parallel);
}

#[test]
fn a_big_idle_pool_starts_only_the_threads_it_needs_and_uses_no_cpu() {
    parjob_tests::run_child_test("threading::big_idle_pool_child", &[]);
}

/// Set at the end of the test whose tasks wait for it, so that they end.
static RELEASE_HUNG: AtomicBool = AtomicBool::new(false);
/// Tasks of `hang_until_released` still running.
static HUNG: AtomicUsize = AtomicUsize::new(0);

fn hang_until_released(_: u32) -> u32 {
    HUNG.fetch_add(1, Ordering::SeqCst);
    let deadline = Instant::now() + Duration::from_secs(60);
    while !RELEASE_HUNG.load(Ordering::SeqCst) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    HUNG.fetch_sub(1, Ordering::SeqCst);
    0
}

static AFTER_TIMEOUT: Gathering = Gathering::new();

/// Whether two of these ran at once, on which worker, and how many hung tasks still ran then.
fn meet_two(_: u32) -> (bool, Option<usize>, usize) {
    let (met, worker) = AFTER_TIMEOUT.meet(2);
    (met, worker, HUNG.load(Ordering::SeqCst))
}

#[test]
fn a_timed_out_thread_is_replaced_so_the_next_run_gets_every_worker() {
    let parallel = Parallel::new(2)
        .backend(Backend::Threading)
        .timeout(Duration::from_millis(100));
    let error = parallel
        .run((0..2u32).map(|i| delayed(hang_until_released, i)))
        .unwrap_err();
    assert!(matches!(error, Error::Timeout { .. }), "{error}");
    // Both threads still run their abandoned tasks. The same pool (a longer limit keeps it)
    // must run two tasks at once: they wait for each other.
    let parallel = parallel.timeout(Duration::from_secs(120));
    let out = parallel
        .run((0..2u32).map(|i| delayed(meet_two, i)))
        .unwrap();
    RELEASE_HUNG.store(true, Ordering::SeqCst);
    assert!(
        out.iter().all(|&(met, _, hung)| met && hung == 2),
        "the two tasks did not run at once beside the two abandoned ones: {out:?}"
    );
    // The replacements took over the indices of the threads they replaced.
    assert!(
        out.iter().all(|(_, w, _)| w.is_some_and(|w| w < 2)),
        "{out:?}"
    );
}

fn tiny(x: u64) -> u64 {
    x.wrapping_mul(x)
}

#[test]
fn batches_of_tiny_tasks_stay_small_enough_for_the_cache() {
    // The threading pool bounds a batch to 128 KiB of tasks (`Pool::max_batch_bytes`):
    // 16384 tasks of 8 bytes. Without the bound, auto batching would size batches of 1 ns
    // tasks at a quarter of what is left of the input (100,000 here).
    let biggest = std::sync::Arc::new(AtomicUsize::new(0));
    let seen = std::sync::Arc::clone(&biggest);
    let n = 400_000u64;
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .on_event(move |event| {
            if let parjob::Event::BatchDispatched { tasks, .. } = event {
                seen.fetch_max(*tasks, Ordering::SeqCst);
            }
        })
        .run((0..n).map(|i| delayed(tiny, i)))
        .unwrap();
    assert_eq!(out.len(), 400_000);
    assert!(out.iter().zip(0..n).all(|(&v, i)| v == tiny(i)));
    let biggest = biggest.load(Ordering::SeqCst);
    assert!(biggest <= 16_384, "a batch of {biggest} tasks");
    assert!(biggest > 1, "tiny tasks were never batched");
}

/// A `Parallel` kept in a `static`, whose own tasks run it again: each inner run goes on the
/// calling worker thread (as the sequential backend would run it), not into a queue that only
/// the pool's workers, all waiting on inner runs, could take. Before, 4 outer tasks on 2
/// workers hung for ever (found by attack round 3).
static SHARED: std::sync::LazyLock<Parallel> =
    std::sync::LazyLock::new(|| Parallel::new(2).backend(Backend::Threading));

fn inner_sum(x: u64) -> u64 {
    let inner = SHARED
        .run((0..3u64).map(|i| delayed(add_one, x * 10 + i)))
        .expect("the inner run");
    let iterated: Vec<u64> = SHARED
        .run_iter((0..3u64).map(|i| delayed(add_one, x * 10 + i)))
        .map(|r| r.expect("the inner run_iter"))
        .collect();
    assert_eq!(inner, iterated);
    inner.iter().sum()
}

fn add_one(x: u64) -> u64 {
    x + 1
}

#[test]
fn a_parallel_run_again_from_its_own_tasks_runs_the_inner_run_on_the_calling_thread() {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let out = SHARED.run((0..4u64).map(|x| delayed(inner_sum, x)));
        let _ = tx.send(out);
    });
    let out = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the run hung: its tasks' inner runs waited on its own workers")
        .unwrap();
    let expected: Vec<u64> = (0..4u64)
        .map(|x| (0..3).map(|i| x * 10 + i + 1).sum())
        .collect();
    assert_eq!(out, expected);
}
