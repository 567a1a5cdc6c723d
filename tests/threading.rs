use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use parjob::{Backend, Parallel, delayed, worker_info};

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
