use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parjob::{Backend, BatchSize, Parallel, Task, delayed};

fn double(x: u64) -> u64 {
    2 * x
}

/// An endless input that counts how many tasks were pulled from it.
fn counted(
    pulled: &Arc<AtomicUsize>,
) -> impl Iterator<Item = impl Task<Output = u64> + use<>> + use<> {
    let pulled = Arc::clone(pulled);
    (0u64..).map(move |i| {
        pulled.fetch_add(1, Ordering::SeqCst);
        delayed(double, i)
    })
}

#[test]
fn run_iter_over_an_endless_input_yields_and_stops_when_dropped() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let parallel = Parallel::new(2)
        .backend(Backend::Threading)
        .batch_size(BatchSize::Fixed(1))
        .pre_dispatch(4);
    let mut results = parallel.run_iter(counted(&pulled));
    let first: Vec<u64> = results.by_ref().take(10).map(Result::unwrap).collect();
    assert_eq!(first, (0..10).map(|i| 2 * i).collect::<Vec<_>>());
    // Ten consumed plus at most four batches of one dispatched ahead (and one being pulled).
    let after_ten = pulled.load(Ordering::SeqCst);
    assert!(
        after_ten <= 10 + 4 + 1,
        "pulled {after_ten} tasks for 10 results"
    );
    drop(results);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        after_ten,
        "pulled after drop"
    );
}

#[test]
fn auto_batching_over_an_endless_input_stays_bounded() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let parallel = Parallel::new(2).backend(Backend::Threading);
    let taken = parallel.run_iter(counted(&pulled)).take(100_000).count();
    assert_eq!(taken, 100_000);
    // pre_dispatch (4 batches) of at most 2^20 tasks each could be ahead; no more.
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(pulled <= 100_000 + 4 * (1 << 20), "pulled {pulled}");
}

#[test]
fn ten_million_tasks_stream_through_bounded_memory() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let consumed = AtomicUsize::new(0);
    let max_ahead = AtomicUsize::new(0);
    let parallel = Parallel::new(2)
        .backend(Backend::Threading)
        .batch_size(BatchSize::Fixed(10_000))
        .pre_dispatch(4);
    let tasks = {
        let pulled = Arc::clone(&pulled);
        (0..10_000_000u64).map(move |i| {
            pulled.fetch_add(1, Ordering::Relaxed);
            delayed(double, i)
        })
    };
    let mut sum = 0u64;
    for result in parallel.run_iter(tasks) {
        sum += result.unwrap();
        let done = consumed.fetch_add(1, Ordering::Relaxed) + 1;
        if done.is_multiple_of(10_000) {
            let ahead = pulled.load(Ordering::Relaxed) - done;
            max_ahead.fetch_max(ahead, Ordering::Relaxed);
        }
    }
    assert_eq!(sum, 10_000_000 * 9_999_999);
    // Never more than pre_dispatch batches (plus the one being consumed) held at once.
    let max_ahead = max_ahead.load(Ordering::Relaxed);
    assert!(
        max_ahead <= 5 * 10_000,
        "up to {max_ahead} tasks pulled ahead of the consumer"
    );
}

#[test]
fn run_pulls_tasks_only_as_workers_free_up() {
    // With one-task batches and pre_dispatch 2, a failing task stops the input early.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counted_pulled = Arc::clone(&pulled);
    let tasks = (0..1_000_000u64).map(move |i| {
        counted_pulled.fetch_add(1, Ordering::SeqCst);
        delayed(fail_at_five, i)
    });
    let err = Parallel::new(1)
        .backend(Backend::Threading)
        .batch_size(BatchSize::Fixed(1))
        .pre_dispatch(2)
        .run(tasks)
        .unwrap_err();
    assert_eq!(err.task_index(), Some(5));
    assert!(
        pulled.load(Ordering::SeqCst) <= 8,
        "pulled {}",
        pulled.load(Ordering::SeqCst)
    );
}

fn fail_at_five(i: u64) -> u64 {
    assert!(i != 5, "five is not allowed");
    i
}

static SEQUENTIAL_RUNS: AtomicUsize = AtomicUsize::new(0);

fn counted_run(i: u64) -> u64 {
    SEQUENTIAL_RUNS.fetch_add(1, Ordering::SeqCst);
    i
}

#[test]
fn sequential_run_iter_pulls_and_runs_no_task_ahead_of_the_consumer() {
    // Counts both what was pulled from the input and what ran: on the sequential backend a
    // dispatched task runs at once, so counting runs alone would not notice a dispatcher that
    // pulled the whole (finite) input into a buffer up front and dispatched from there.
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let tasks = (0..10u64).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        delayed(counted_run, i)
    });
    let parallel = Parallel::new(2)
        .backend(Backend::Sequential)
        .batch_size(BatchSize::Fixed(1));
    let counts = || {
        (
            pulled.load(Ordering::SeqCst),
            SEQUENTIAL_RUNS.load(Ordering::SeqCst),
        )
    };
    let mut results = parallel.run_iter(tasks);
    for asked in 1..=3 {
        assert_eq!(results.next().map(Result::unwrap), Some(asked as u64 - 1));
        assert_eq!(
            counts(),
            (asked, asked),
            "(pulled, ran) after {asked} results: the sequential backend pulls and runs a \
             task only when its result is asked for"
        );
    }
    drop(results);
    assert_eq!(counts(), (3, 3), "dropping the results pulled or ran more");
}
