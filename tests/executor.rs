use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, LazyLock, Mutex};
use std::time::{Duration, Instant};

use parjob::{
    Backend, BatchSize, Error, Executor, Future, Shutdown, Until, as_completed, delayed, wait,
};

/// The longest any test here waits for a gate or a marker file: generous, since it is a
/// bound against hanging for ever, not a timing check.
const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// Backends whose tasks run in this process, where tests can hold a task with a [`Gate`].
const IN_PROCESS: [Backend; 2] = [Backend::Sequential, Backend::Threading];

/// A task's barrier: it reports when the task started and holds it until the test opens it.
/// Tasks find their gate by number, since a task is a plain `fn` of serde values.
#[derive(Default)]
struct Gate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    open: bool,
    started: usize,
    finished: usize,
    /// The worker (of a pool in this process) that ran the task last.
    ran_on: Option<usize>,
}

static GATES: LazyLock<Mutex<HashMap<u64, Arc<Gate>>>> = LazyLock::new(Default::default);
static NEXT_GATE: AtomicU64 = AtomicU64::new(0);

fn new_gate() -> (u64, Arc<Gate>) {
    let id = NEXT_GATE.fetch_add(1, Ordering::Relaxed);
    let gate = Arc::new(Gate::default());
    GATES.lock().unwrap().insert(id, Arc::clone(&gate));
    (id, gate)
}

impl Gate {
    fn update(&self, change: impl FnOnce(&mut GateState)) {
        change(&mut self.state.lock().unwrap());
        self.changed.notify_all();
    }

    fn open(&self) {
        self.update(|s| s.open = true);
    }

    /// Waits until `done` holds; panics after [`WAIT_LIMIT`] (a gate the test forgot to open,
    /// or a task that never started), so that no test or pool thread waits for ever.
    fn wait_until(&self, done: impl Fn(&GateState) -> bool) {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut state = self.state.lock().unwrap();
        while !done(&state) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "a gate's state did not change as awaited within {WAIT_LIMIT:?}"
            );
            state = self.changed.wait_timeout(state, left).unwrap().0;
        }
    }

    fn started(&self) -> usize {
        self.state.lock().unwrap().started
    }

    fn finished(&self) -> usize {
        self.state.lock().unwrap().finished
    }

    fn ran_on(&self) -> Option<usize> {
        self.state.lock().unwrap().ran_on
    }
}

/// Starts, waits for gate `id` to open, finishes, and returns `id`.
fn gated(id: u64) -> u64 {
    let gate = Arc::clone(&GATES.lock().unwrap()[&id]);
    let worker = parjob::worker_info().worker;
    gate.update(|s| {
        s.started += 1;
        s.ran_on = worker;
    });
    gate.wait_until(|s| s.open);
    gate.update(|s| s.finished += 1);
    id
}

fn square(x: u64) -> u64 {
    x * x
}

fn fails(x: u64) -> u64 {
    panic!("{x} is not welcome")
}

fn assert_send<T: Send>(_: &T) {}

#[test]
fn submit_gives_each_task_value_through_its_future() {
    for backend in IN_PROCESS {
        let executor = Executor::new(2).backend(backend);
        let futures: Vec<Future<u64>> = (0..10)
            .map(|i| executor.submit(delayed(square, i)))
            .collect();
        let indices: Vec<usize> = futures.iter().map(Future::index).collect();
        assert_eq!(indices, (0..10).collect::<Vec<_>>(), "{backend}");
        let values: Vec<u64> = futures.into_iter().map(|f| f.result().unwrap()).collect();
        assert_eq!(
            values,
            (0..10).map(|i| i * i).collect::<Vec<_>>(),
            "{backend}"
        );
    }
}

#[test]
fn try_result_never_blocks_and_is_done_follows_the_task() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let mut future = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    assert!(future.try_result().is_none());
    assert!(!future.is_done());
    assert!(future.is_running());
    gate.open();
    future.wait();
    assert!(future.is_done() && !future.is_running());
    assert_eq!(future.try_result(), Some(Ok(id)));
    // The value was moved out; asking again says so instead of blocking or panicking.
    assert_eq!(future.try_result(), Some(Err(Error::result_taken(0))));
}

#[test]
fn result_timeout_gives_a_timeout_error_and_leaves_the_task_running() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let mut future = executor.submit(delayed(gated, id));
    let err = future
        .result_timeout(Duration::from_millis(20))
        .unwrap_err();
    assert_eq!(err, Error::wait_timed_out(0, Duration::from_millis(20)));
    assert!(
        err.to_string()
            .contains("after waiting 20ms; the task keeps running"),
        "{err}"
    );
    assert_eq!(gate.finished(), 0, "the task was not stopped");
    assert!(!future.is_done());
    gate.open();
    assert_eq!(future.result_timeout(Duration::from_secs(60)), Ok(id));
    assert_eq!(gate.finished(), 1);
}

/// Sleeps `ms` milliseconds and returns them.
fn sleep_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// A submitted task held past its time limit fails with `Timeout` at that limit, whether the
/// limit is its own or the executor's `Parallel::timeout`, and the executor goes on: threads
/// let the task run on (the gate ends it), the process backend kills its worker.
#[test]
fn a_submitted_task_past_its_time_limit_fails_with_timeout() {
    let limit = Duration::from_millis(200);
    for (name, executor) in [
        ("own limit", Executor::new(2).backend(Backend::Threading)),
        (
            "the executor's limit",
            Executor::from_parallel(
                parjob::Parallel::new(2)
                    .backend(Backend::Threading)
                    .timeout(limit),
            ),
        ),
    ] {
        let (id, gate) = new_gate();
        let task = delayed(gated, id);
        let mut held = if name == "own limit" {
            executor.submit(task.timeout(limit))
        } else {
            executor.submit(task)
        };
        let err = held.result_timeout(WAIT_LIMIT).unwrap_err();
        // It names the thread left running it.
        let worker = gate.ran_on();
        assert!(worker.is_some(), "{name}: a pool's thread ran it");
        assert_eq!(
            err,
            Error::timeout_left_running(0, limit, worker),
            "{name}: {err}"
        );
        let on = format!("on worker {}, not stopped", worker.unwrap_or_default());
        assert!(err.to_string().contains(&on), "{name}: {err}");
        assert_eq!(
            gate.finished(),
            0,
            "{name}: the task runs on, on its thread"
        );
        assert_eq!(
            executor.submit(delayed(square, 3)).result(),
            Ok(9),
            "{name}"
        );
        gate.open();
    }
    let processes = Executor::new(2).backend(Backend::Process);
    let mut held = processes.submit(delayed(sleep_ms, 60_000).timeout(limit));
    match held.result_timeout(WAIT_LIMIT) {
        Err(Error::Timeout {
            index: 0,
            after,
            killed: true,
            pid: Some(_),
            ..
        }) => assert_eq!(after, limit),
        other => panic!("a process task past its limit gave {other:?}"),
    }
    let via_parallel = Executor::from_parallel(
        parjob::Parallel::new(2)
            .backend(Backend::Process)
            .timeout(limit),
    );
    let mut held = via_parallel.submit(delayed(sleep_ms, 60_000));
    assert!(
        matches!(
            held.result_timeout(WAIT_LIMIT),
            Err(Error::Timeout { killed: true, .. })
        ),
        "the executor's limit holds on processes too"
    );
    assert_eq!(via_parallel.submit(delayed(square, 4)).result(), Ok(16));
    // Within its limit, a task gives its value.
    let quick = processes.submit(delayed(sleep_ms, 1).timeout(Duration::from_secs(60)));
    assert_eq!(quick.result(), Ok(1));
}

/// A done-callback of a future that timed out on threads may wait for another future that
/// times out: the callbacks run apart from the clock, so every other limit still fires at
/// its time (found by attack: one waiting callback used to stop every thread timeout in the
/// process).
#[test]
fn a_timed_out_futures_callback_that_waits_stalls_no_other_timeout() {
    let executor = Executor::new(3).backend(Backend::Threading);
    let gates: Vec<_> = (0..3).map(|_| new_gate()).collect();
    let [a, b, c] = [100, 200, 300].map(Duration::from_millis);
    let first = executor.submit(delayed(gated, gates[0].0).timeout(a));
    let second = executor.submit(delayed(gated, gates[1].0).timeout(b));
    let mut third = executor.submit(delayed(gated, gates[2].0).timeout(c));
    let (sender, seen) = mpsc::channel();
    first.add_done_callback(move |_| {
        let _ = sender.send(second.result());
    });
    assert_eq!(
        third.result_timeout(WAIT_LIMIT),
        Err(Error::timeout_left_running(2, c, gates[2].1.ran_on()))
    );
    assert_eq!(
        seen.recv_timeout(WAIT_LIMIT).unwrap(),
        Err(Error::timeout_left_running(1, b, gates[1].1.ran_on()))
    );
    for (_, gate) in &gates {
        gate.open();
    }
}

/// A future queued right behind one whose task hangs past its time limit, on a pool of one
/// thread, runs on a replacement thread once that limit passes: it does not wait for the hung
/// task to end (it waited, when it was queued before the hung task's thread had started).
#[test]
fn a_future_queued_behind_a_hung_timed_one_runs_on_a_replacement_thread() {
    let executor = Executor::new(1).backend(Backend::Threading);
    let (id, gate) = new_gate();
    let hung = executor.submit(delayed(gated, id).timeout(Duration::from_millis(100)));
    let mut behind = executor.submit(delayed(square, 3));
    assert_eq!(behind.result_timeout(WAIT_LIMIT), Ok(9));
    assert_eq!(gate.finished(), 0, "the hung task is still running");
    assert!(
        matches!(hung.result(), Err(Error::Timeout { index: 0, .. })),
        "the hung task timed out"
    );
    gate.open();
    gate.wait_until(|s| s.finished == 1);
}

/// On the sequential backend a submitted task runs inside `submit`: one past its limit is
/// seen when it returns, as in `Parallel::run`.
#[test]
fn a_sequential_submitted_task_past_its_limit_is_seen_when_it_returns() {
    let executor = Executor::new(1).backend(Backend::Sequential);
    let err = executor
        .submit(delayed(sleep_ms, 50).timeout(Duration::from_millis(5)))
        .result()
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                index: 0,
                killed: false,
                returned_after: Some(ran),
                ..
            } if ran >= Duration::from_millis(50)
        ),
        "{err:?}"
    );
}

#[test]
fn error_gives_the_failure_and_leaves_the_value() {
    for backend in IN_PROCESS {
        let executor = Executor::new(2).backend(backend);
        let failing = executor.submit(delayed(fails, 7));
        let fine = executor.submit(delayed(square, 3));
        match failing.error() {
            Some(Error::TaskPanicked {
                index: 0, message, ..
            }) => {
                assert!(message.contains("7 is not welcome"), "{message}");
            }
            other => panic!("{backend}: expected TaskPanicked, got {other:?}"),
        }
        // error() can be asked again, and result() gives the same failure.
        assert!(failing.error().is_some());
        assert!(matches!(failing.result(), Err(Error::TaskPanicked { .. })));
        assert_eq!(fine.error(), None);
        assert_eq!(fine.result(), Ok(9), "{backend}");
    }
}

#[test]
fn cancel_succeeds_only_while_the_task_has_not_started() {
    let (busy_id, busy) = new_gate();
    let (queued_id, queued_gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let running = executor.submit(delayed(gated, busy_id));
    busy.wait_until(|s| s.started == 1);
    let queued = executor.submit(delayed(gated, queued_id));

    assert!(queued.cancel(), "a queued task can be cancelled");
    assert!(
        queued.cancel(),
        "cancelling again still says it will never run"
    );
    assert!(queued.is_cancelled() && queued.is_done());
    assert!(!running.cancel(), "a running task cannot be cancelled");
    assert!(!running.is_cancelled());

    queued_gate.open();
    busy.open();
    assert_eq!(running.result(), Ok(busy_id));
    assert_eq!(queued.result(), Err(Error::cancelled(1)));
    // The worker is free again and has passed the cancelled job: it never ran.
    assert_eq!(executor.submit(delayed(square, 4)).result(), Ok(16));
    assert_eq!(queued_gate.started(), 0);
}

#[test]
fn cancel_after_the_task_finished_fails() {
    for backend in IN_PROCESS {
        let executor = Executor::new(1).backend(backend);
        let future = executor.submit(delayed(square, 5));
        future.wait();
        assert!(!future.cancel(), "{backend}");
        assert_eq!(future.result(), Ok(25));
    }
}

static RACE_RUNS: LazyLock<Mutex<HashMap<u64, usize>>> = LazyLock::new(Default::default);

fn count_run(id: u64) -> u64 {
    *RACE_RUNS.lock().unwrap().entry(id).or_default() += 1;
    id
}

#[test]
fn cancel_racing_with_start_has_exactly_one_winner() {
    let executor = Executor::new(2).backend(Backend::Threading);
    let (mut cancelled, mut ran) = (0, 0);
    for round in 0..2_000u64 {
        let id = 1_000_000 + round;
        let future = executor.submit(delayed(count_run, id));
        if round % 3 == 0 {
            std::thread::yield_now();
        }
        let won = future.cancel();
        let outcome = future.result();
        // Let the worker pass the job before counting, whoever won.
        executor.submit(delayed(square, 0)).wait();
        executor.submit(delayed(square, 0)).wait();
        let runs = RACE_RUNS.lock().unwrap().get(&id).copied().unwrap_or(0);
        if won {
            assert_eq!(outcome, Err(Error::cancelled(3 * round as usize)));
            assert_eq!(runs, 0, "round {round}: cancelled, yet the task ran");
            cancelled += 1;
        } else {
            assert_eq!(outcome, Ok(id));
            assert_eq!(runs, 1, "round {round}: not cancelled, so it ran once");
            ran += 1;
        }
    }
    assert_eq!(cancelled + ran, 2_000);
}

#[test]
fn as_completed_yields_futures_in_the_order_they_finish() {
    let gates: Vec<(u64, Arc<Gate>)> = (0..3).map(|_| new_gate()).collect();
    let executor = Executor::new(3).backend(Backend::Threading);
    let futures: Vec<Future<u64>> = gates
        .iter()
        .map(|(id, _)| executor.submit(delayed(gated, *id)))
        .collect();
    let mut completed = as_completed(futures);
    assert_eq!(completed.size_hint(), (3, Some(3)));
    for position in [2, 0, 1] {
        let (id, gate) = &gates[position];
        gate.open();
        let future = completed.next().unwrap();
        assert_eq!(future.index(), position);
        assert_eq!(future.result(), Ok(*id));
    }
    assert!(completed.next().is_none());
}

#[test]
fn futures_of_different_executors_and_backends_are_waited_on_together() {
    let (id, gate) = new_gate();
    let threads = Executor::new(2).backend(Backend::Threading);
    let other_threads = Executor::new(1).backend(Backend::Threading);
    let sequential = Executor::new(1).backend(Backend::Sequential);
    let held = other_threads.submit(delayed(gated, id));
    let futures = vec![
        held,
        threads.submit(delayed(square, 2)),
        sequential.submit(delayed(square, 3)),
    ];
    assert_send(&futures[0]);
    let moved = std::thread::spawn(move || futures).join().unwrap();

    let first = wait(moved, Until::FirstCompleted);
    assert!(!first.done.is_empty());
    assert_eq!(first.not_done.len() + first.done.len(), 3);
    assert!(!first.not_done.is_empty(), "the held task is not done");

    gate.open();
    let all = wait(
        first.done.into_iter().chain(first.not_done),
        Until::AllCompleted,
    );
    assert!(all.not_done.is_empty());
    let mut values: Vec<u64> = as_completed(all.done)
        .map(|f| f.result().unwrap())
        .collect();
    values.sort_unstable();
    let mut expected = vec![4, 9, id];
    expected.sort_unstable();
    assert_eq!(values, expected);
}

#[test]
fn wait_first_error_returns_at_the_first_failure() {
    let (id, gate) = new_gate();
    let executor = Executor::new(2).backend(Backend::Threading);
    let futures = vec![
        executor.submit(delayed(gated, id)),
        executor.submit(delayed(fails, 1)),
    ];
    let waited = wait(futures, Until::FirstError);
    assert_eq!(waited.done.len(), 1);
    assert!(waited.done[0].error().is_some());
    assert_eq!(waited.not_done.len(), 1);
    gate.open();
    let rest = wait(waited.not_done, Until::FirstError);
    assert_eq!(
        (rest.done.len(), rest.not_done.len()),
        (1, 0),
        "no failure: waits for all"
    );
}

#[test]
fn wait_first_error_does_not_count_a_cancelled_future() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let held = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    let queued = executor.submit(delayed(square, 2));
    assert!(queued.cancel());
    let (told, returned) = mpsc::channel();
    let waiting = std::thread::spawn(move || told.send(wait([held, queued], Until::FirstError)));
    assert!(
        returned.recv_timeout(Duration::from_millis(50)).is_err(),
        "wait returned on a cancelled future"
    );
    gate.open();
    let waited = returned
        .recv_timeout(WAIT_LIMIT)
        .expect("wait did not return once the held task finished");
    assert_eq!((waited.done.len(), waited.not_done.len()), (2, 0));
    waiting.join().unwrap().unwrap();
}

#[test]
fn wait_on_nothing_returns_at_once() {
    for until in [
        Until::FirstCompleted,
        Until::FirstError,
        Until::AllCompleted,
    ] {
        let waited = wait(Vec::<Future<u64>>::new(), until);
        assert!(waited.done.is_empty() && waited.not_done.is_empty());
    }
}

fn nap_then_square(x: u64) -> u64 {
    // Later tasks finish first: the order of results must not depend on it.
    std::thread::sleep(Duration::from_millis(2 * (20 - x % 20)));
    x * x
}

#[test]
fn map_yields_results_in_input_order() {
    for backend in IN_PROCESS {
        let executor = Executor::new(4).backend(backend);
        let out: Vec<u64> = executor
            .map((0..40u64).map(|x| delayed(nap_then_square, x)))
            .map(Result::unwrap)
            .collect();
        assert_eq!(out, (0..40).map(|x| x * x).collect::<Vec<_>>(), "{backend}");
    }
}

#[test]
fn map_is_lazy_with_bounded_look_ahead() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let executor = Executor::new(2)
        .backend(Backend::Threading)
        .batch_size(BatchSize::Fixed(1))
        .pre_dispatch(4);
    let endless = (0u64..).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        delayed(square, i)
    });
    let first: Vec<u64> = executor.map(endless).take(10).map(Result::unwrap).collect();
    assert_eq!(first, (0..10).map(|i| i * i).collect::<Vec<_>>());
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(pulled <= 10 + 4 + 1, "pulled {pulled} tasks for 10 results");
}

#[test]
fn shutdown_wait_returns_once_running_tasks_are_done() {
    let (id, gate) = new_gate();
    let executor = Arc::new(Executor::new(2).backend(Backend::Threading));
    let future = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    let (told, returned) = mpsc::channel();
    let shutting = std::thread::spawn({
        let executor = Arc::clone(&executor);
        move || {
            executor.shutdown(Shutdown::Wait);
            told.send(()).unwrap();
        }
    });
    assert!(
        returned.recv_timeout(Duration::from_millis(50)).is_err(),
        "shutdown returned while a task was running"
    );
    gate.open();
    returned
        .recv_timeout(WAIT_LIMIT)
        .expect("shutdown did not return once the running task finished");
    assert_eq!(gate.finished(), 1);
    assert_eq!(future.result(), Ok(id));
    shutting.join().unwrap();
}

#[test]
fn shutdown_cancel_pending_cancels_queued_tasks_and_waits_for_running_ones() {
    let (busy_id, busy) = new_gate();
    let (queued_id, queued_gate) = new_gate();
    let executor = Arc::new(Executor::new(1).backend(Backend::Threading));
    let running = executor.submit(delayed(gated, busy_id));
    busy.wait_until(|s| s.started == 1);
    let queued: Vec<Future<u64>> = (0..3)
        .map(|_| executor.submit(delayed(gated, queued_id)))
        .collect();
    let shutting = std::thread::spawn({
        let executor = Arc::clone(&executor);
        move || executor.shutdown(Shutdown::CancelPending)
    });
    for future in &queued {
        future.wait();
        assert!(future.is_cancelled());
    }
    busy.open();
    queued_gate.open();
    shutting.join().unwrap();
    assert_eq!(running.result(), Ok(busy_id));
    assert_eq!(busy.finished(), 1);
    for (i, future) in queued.into_iter().enumerate() {
        assert_eq!(future.result(), Err(Error::cancelled(i + 1)));
    }
    assert_eq!(queued_gate.started(), 0);
}

#[test]
fn submit_and_map_after_shutdown_are_errors() {
    for backend in IN_PROCESS {
        let executor = Executor::new(2).backend(backend);
        assert_eq!(executor.submit(delayed(square, 2)).result(), Ok(4));
        executor.shutdown(Shutdown::Wait);
        assert!(executor.is_shut_down());
        let late = executor.submit(delayed(square, 3));
        assert!(late.is_done());
        assert!(
            !late.cancel(),
            "a future that is already done cannot be cancelled"
        );
        assert_eq!(late.result(), Err(Error::ExecutorShutdown));
        let mapped: Vec<_> = executor.map([delayed(square, 1)]).collect();
        assert_eq!(mapped, [Err(Error::ExecutorShutdown)]);
        executor.shutdown(Shutdown::Wait); // a second call is harmless
    }
}

#[test]
fn dropping_an_executor_waits_for_its_running_tasks() {
    let (id, gate) = new_gate();
    let executor = Executor::new(2).backend(Backend::Threading);
    let future = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    let opener = std::thread::spawn({
        let gate = Arc::clone(&gate);
        move || {
            std::thread::sleep(Duration::from_millis(20));
            gate.open();
        }
    });
    drop(executor);
    assert_eq!(gate.finished(), 1, "drop returned before the task finished");
    assert_eq!(future.result(), Ok(id));
    opener.join().unwrap();
}

#[test]
fn dropping_a_daemon_executor_does_not_wait() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading).daemon(true);
    let future = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    drop(executor);
    assert_eq!(gate.finished(), 0, "drop waited for the task");
    assert!(!future.is_done());
    // The task still finishes, and its future hears of it, after the executor is gone.
    gate.open();
    assert_eq!(future.result(), Ok(id));
}

fn where_daemon_runs(_: ()) -> (Option<String>, Option<usize>, Option<String>) {
    let info = parjob::worker_info();
    (
        info.backend.map(|b| b.to_string()),
        info.worker,
        info.thread_name,
    )
}

#[test]
fn a_sequential_daemon_executor_runs_tasks_one_by_one_on_a_background_thread() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Sequential).daemon(true);
    // An endless task (until the gate opens): `submit` returns while it runs.
    let endless = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    let next = executor.submit(delayed(square, 3));
    let place = executor.submit(delayed(where_daemon_runs, ()));
    assert!(!endless.is_done());
    assert!(
        !next.is_done(),
        "tasks run one after another, as on sequential"
    );
    drop(executor);
    gate.open();
    assert_eq!(endless.result(), Ok(id));
    assert_eq!(next.result(), Ok(9));
    assert_eq!(
        place.result(),
        Ok((
            Some("sequential".to_string()),
            Some(0),
            Some("parjob-daemon".to_string())
        ))
    );
}

#[test]
fn a_sequential_executor_that_is_not_a_daemon_still_runs_tasks_in_submit() {
    let executor = Executor::new(1).backend(Backend::Sequential);
    let future = executor.submit(delayed(square, 4));
    assert!(future.is_done());
    assert_eq!(future.result(), Ok(16));
}

#[test]
fn an_invalid_n_jobs_is_reported_through_the_future() {
    let future = Executor::new(0)
        .backend(Backend::Threading)
        .submit(delayed(square, 1));
    assert!(matches!(
        future.result(),
        Err(Error::InvalidNJobs { value: 0, .. })
    ));
}

#[test]
fn the_sequential_backend_runs_a_task_inside_submit() {
    let executor = Executor::new(4).backend(Backend::Sequential);
    let future = executor.submit(delayed(square, 6));
    assert!(future.is_done());
    assert_eq!(future.result(), Ok(36));
}

#[test]
fn executor_uses_the_n_jobs_rules_and_environment_of_parallel() {
    assert_eq!(
        Executor::new(-1).effective_n_jobs(),
        Ok(parjob::cpu_count())
    );
    assert_eq!(Executor::new(3).effective_n_jobs(), Ok(3));
    assert!(Executor::new(0).effective_n_jobs().is_err());
    parjob_tests::run_child_test(
        "executor::child_executor_reads_the_environment",
        &[("PARJOB_BACKEND", "sequential"), ("PARJOB_N_JOBS", "3")],
    );
}

#[test]
#[ignore = "run by executor_uses_the_n_jobs_rules_and_environment_of_parallel in a child process"]
fn child_executor_reads_the_environment() {
    let executor = Executor::default();
    assert_eq!(executor.effective_backend(), Ok(Backend::Sequential));
    assert_eq!(executor.effective_n_jobs(), Ok(3));
    let explicit = Executor::new(2).backend(Backend::Threading);
    assert_eq!(explicit.effective_backend(), Ok(Backend::Threading));
    assert_eq!(explicit.effective_n_jobs(), Ok(2));
    fn which_backend(_: ()) -> Option<String> {
        parjob::worker_info().backend.map(|b| b.to_string())
    }
    assert_eq!(
        executor.submit(delayed(which_backend, ())).result(),
        Ok(Some("sequential".to_string()))
    );
}

// ---------------------------------------------------------------- the process backend
//
// Tasks run in worker processes there, so tests hold them with files instead of gates: a
// task touches `<dir>/started`, waits for `<dir>/open`, and records each run in `<dir>`.

/// A fresh folder for one test's marker files.
fn marker_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "parjob-executor-{}-{name}-{}",
        std::process::id(),
        NEXT_GATE.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Waits for `path` to exist; panics after [`WAIT_LIMIT`]. Runs in the test and, through
/// [`held_in_dir`], in worker processes, which it must not keep busy for ever either.
fn wait_for_file(path: &std::path::Path) {
    let deadline = Instant::now() + WAIT_LIMIT;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {WAIT_LIMIT:?}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Marks itself started, waits for `<dir>/open`, and returns its worker's pid.
fn held_in_dir(dir: String) -> u32 {
    let dir = std::path::Path::new(&dir);
    // Written whole under a temporary name, so that `started` never appears half-written.
    std::fs::write(dir.join("starting"), std::process::id().to_string()).unwrap();
    std::fs::rename(dir.join("starting"), dir.join("started")).unwrap();
    wait_for_file(&dir.join("open"));
    std::process::id()
}

/// Records that it ran by creating `<dir>/ran-<id>`.
fn mark_ran(dir: String, id: u64) -> u64 {
    std::fs::write(std::path::Path::new(&dir).join(format!("ran-{id}")), b"").unwrap();
    id
}

fn pid_of_worker(_: ()) -> u32 {
    std::process::id()
}

fn processes(n_jobs: i32) -> Executor {
    Executor::new(n_jobs).backend(Backend::Process)
}

#[test]
fn process_futures_give_values_and_errors_from_worker_processes() {
    let executor = processes(2);
    let pid = executor.submit(delayed(pid_of_worker, ()));
    let fine = executor.submit(delayed(square, 12));
    let failing = executor.submit(delayed(fails, 3));
    assert_ne!(pid.result(), Ok(std::process::id()), "ran in the driver");
    assert_eq!(fine.result(), Ok(144));
    match failing.error() {
        Some(Error::TaskPanicked {
            index: 2, message, ..
        }) => {
            assert!(message.contains("3 is not welcome"), "{message}");
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
    let mapped: Vec<u64> = executor
        .map((0..20u64).map(|x| delayed(nap_then_square, x)))
        .map(Result::unwrap)
        .collect();
    assert_eq!(mapped, (0..20).map(|x| x * x).collect::<Vec<_>>());
}

#[test]
fn process_cancel_succeeds_only_before_start_and_the_task_never_runs() {
    let dir = marker_dir("cancel");
    let dir_name = dir.to_string_lossy().into_owned();
    let executor = processes(1);
    let running = executor.submit(delayed(held_in_dir, dir_name.clone()));
    wait_for_file(&dir.join("started"));
    let queued = executor.submit(delayed(mark_ran, (dir_name.clone(), 1)));
    assert!(queued.cancel());
    assert!(!running.cancel());
    std::fs::write(dir.join("open"), b"").unwrap();
    assert!(running.result().is_ok());
    assert_eq!(queued.result(), Err(Error::cancelled(1)));
    // The only worker has passed the cancelled job by the time a later task is done.
    assert_eq!(
        executor.submit(delayed(mark_ran, (dir_name, 2))).result(),
        Ok(2)
    );
    assert!(!dir.join("ran-1").exists(), "the cancelled task ran");
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn process_cancel_racing_with_start_has_exactly_one_winner() {
    let dir = marker_dir("race");
    let dir_name = dir.to_string_lossy().into_owned();
    let executor = processes(1);
    // Each round cancels a task the only worker may be picking up, and one queued behind
    // it, so that both cancel and start win some of the races.
    for round in 0..200u64 {
        let ids = [2 * round, 2 * round + 1];
        let futures = ids.map(|id| executor.submit(delayed(mark_ran, (dir_name.clone(), id))));
        if round % 2 == 0 {
            std::thread::yield_now();
        }
        let second = futures[1].cancel();
        let first = futures[0].cancel();
        let won = [first, second];
        let outcomes = futures.map(Future::result);
        executor.submit(delayed(square, 0)).wait();
        for ((id, won), outcome) in ids.into_iter().zip(won).zip(outcomes) {
            let ran = dir.join(format!("ran-{id}")).exists();
            if won {
                assert!(
                    matches!(outcome, Err(Error::Cancelled { .. })),
                    "{outcome:?}"
                );
                assert!(!ran, "task {id}: cancelled, yet it ran");
            } else {
                assert_eq!(outcome, Ok(id));
                assert!(ran, "task {id}: not cancelled, yet it did not run");
            }
        }
    }
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn process_result_timeout_leaves_the_task_running() {
    let dir = marker_dir("timeout");
    let executor = processes(1);
    let mut future = executor.submit(delayed(held_in_dir, dir.to_string_lossy().into_owned()));
    let err = future
        .result_timeout(Duration::from_millis(20))
        .unwrap_err();
    assert!(matches!(err, Error::WaitTimedOut { index: 0, .. }), "{err}");
    std::fs::write(dir.join("open"), b"").unwrap();
    assert!(
        future.result_timeout(Duration::from_secs(60)).is_ok(),
        "the worker was killed"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn process_and_thread_futures_are_waited_on_together() {
    let procs = processes(2);
    let threads = Executor::new(2).backend(Backend::Threading);
    let futures = vec![
        procs.submit(delayed(square, 2)),
        threads.submit(delayed(square, 3)),
        procs.submit(delayed(square, 4)),
    ];
    let waited = wait(futures, Until::AllCompleted);
    assert!(waited.not_done.is_empty());
    let mut values: Vec<u64> = as_completed(waited.done)
        .map(|f| f.result().unwrap())
        .collect();
    values.sort_unstable();
    assert_eq!(values, [4, 9, 16]);
}

#[test]
fn process_shutdown_cancel_pending_cancels_queued_tasks_and_waits_for_running_ones() {
    let dir = marker_dir("shutdown");
    let dir_name = dir.to_string_lossy().into_owned();
    let executor = Arc::new(processes(1));
    let running = executor.submit(delayed(held_in_dir, dir_name.clone()));
    wait_for_file(&dir.join("started"));
    let queued: Vec<Future<u64>> = (10..13)
        .map(|id| executor.submit(delayed(mark_ran, (dir_name.clone(), id))))
        .collect();
    let shutting = std::thread::spawn({
        let executor = Arc::clone(&executor);
        move || executor.shutdown(Shutdown::CancelPending)
    });
    for future in &queued {
        future.wait();
        assert!(future.is_cancelled());
    }
    std::fs::write(dir.join("open"), b"").unwrap();
    shutting.join().unwrap();
    assert!(
        running.result().is_ok(),
        "shutdown waits for the running task"
    );
    for id in 10..13 {
        assert!(
            !dir.join(format!("ran-{id}")).exists(),
            "task {id} ran after cancel"
        );
    }
    assert_eq!(
        executor.submit(delayed(square, 1)).result(),
        Err(Error::ExecutorShutdown)
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dropping_a_process_executor_waits_for_its_running_tasks() {
    let dir = marker_dir("drop");
    let executor = processes(1);
    let held = executor.submit(delayed(held_in_dir, dir.to_string_lossy().into_owned()));
    wait_for_file(&dir.join("started"));
    let opener = std::thread::spawn({
        let open = dir.join("open");
        move || {
            std::thread::sleep(Duration::from_millis(20));
            std::fs::write(open, b"").unwrap();
        }
    });
    drop(executor);
    assert!(held.is_done(), "drop returned before the task was done");
    assert!(held.result().is_ok(), "the task was not let finish");
    opener.join().unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn dropping_a_daemon_process_executor_does_not_wait_and_leaves_no_worker() {
    let dir = marker_dir("daemon");
    let executor = processes(1).daemon(true);
    let held = executor.submit(delayed(held_in_dir, dir.to_string_lossy().into_owned()));
    wait_for_file(&dir.join("started"));
    let worker: u32 = std::fs::read_to_string(dir.join("started"))
        .unwrap()
        .parse()
        .unwrap();
    drop(executor);
    // Its gate never opened, so the task cannot have returned: drop did not wait for it, and
    // the future says the task was let go of while running, not cancelled before it ran.
    let error = held.error();
    assert!(
        matches!(error, Some(Error::Abandoned { index: 0, .. })),
        "{error:?}"
    );
    let proc_entry = std::path::PathBuf::from(format!("/proc/{worker}"));
    for _ in 0..10_000 {
        if !proc_entry.exists() {
            break;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        !proc_entry.exists(),
        "worker {worker} outlived its daemon executor"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

fn note_initialized() {
    // Runs in each new worker process, before its first task.
    INITIALIZED.store(1, Ordering::SeqCst);
}

static INITIALIZED: AtomicUsize = AtomicUsize::new(0);

fn was_initialized(_: ()) -> usize {
    INITIALIZED.load(Ordering::SeqCst)
}

#[test]
fn process_settings_reach_the_executors_workers() {
    let executor = processes(1)
        .initializer(note_initialized)
        .max_tasks_per_worker(1);
    let pids: Vec<u32> = (0..3)
        .map(|_| executor.submit(delayed(pid_of_worker, ())))
        .map(|f| f.result().unwrap())
        .collect();
    assert_eq!(
        executor.submit(delayed(was_initialized, ())).result(),
        Ok(1)
    );
    assert_eq!(INITIALIZED.load(Ordering::SeqCst), 0, "ran in the driver");
    let distinct: std::collections::HashSet<u32> = pids.iter().copied().collect();
    assert_eq!(distinct.len(), 3, "one task per worker: {pids:?}");
}

/// Leaves its pid in `<dir>/started`, then prints a tick every 10 ms, forever: a daemon's
/// background work.
fn tick_forever(dir: String) {
    let dir = std::path::Path::new(&dir);
    std::fs::write(dir.join("starting"), std::process::id().to_string()).unwrap();
    std::fs::rename(dir.join("starting"), dir.join("started")).unwrap();
    loop {
        println!("tick from pid {}", std::process::id());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_daemon_task_stops_when_main_returns_and_leaves_no_worker() {
    for backend in ["threading", "process"] {
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args([
                "executor::child_daemon_task_runs_until_main_returns",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("EXECUTOR_TEST_BACKEND", backend)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // A generous bound, not a timing check: a daemon that blocked exit would never end.
        let mut status = None;
        for _ in 0..60_000 {
            status = child.try_wait().unwrap();
            if status.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let Some(status) = status else {
            child.kill().unwrap();
            panic!("{backend}: the program did not end while its daemon task ran");
        };
        let mut stdout = String::new();
        std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut stdout).unwrap();
        assert!(status.success(), "{backend}: {stdout}");
        let pid: u32 = stdout
            .lines()
            .find_map(|line| line.split("the task runs in pid ").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or_else(|| panic!("{backend}: {stdout}"))
            .parse()
            .unwrap();
        if backend == "process" {
            let proc_entry = std::path::PathBuf::from(format!("/proc/{pid}"));
            for _ in 0..10_000 {
                if !proc_entry.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            assert!(!proc_entry.exists(), "worker {pid} outlived its program");
        }
    }
}

#[test]
#[ignore = "run by a_daemon_task_stops_when_main_returns_and_leaves_no_worker in a child process"]
fn child_daemon_task_runs_until_main_returns() {
    let backend: Backend = std::env::var("EXECUTOR_TEST_BACKEND")
        .unwrap()
        .parse()
        .unwrap();
    let dir = marker_dir("daemon-exit");
    let executor = Executor::new(1).backend(backend).daemon(true);
    let _background = executor.submit(delayed(tick_forever, dir.to_string_lossy().into_owned()));
    wait_for_file(&dir.join("started"));
    let pid = std::fs::read_to_string(dir.join("started")).unwrap();
    println!("the task runs in pid {pid}");
    std::fs::remove_dir_all(dir).unwrap();
    drop(executor);
    // The test returns and its process exits with the task still running.
}

#[test]
fn wait_timeout_returns_with_the_futures_not_done_yet() {
    let (id, gate) = new_gate();
    let executor = Executor::new(2).backend(Backend::Threading);
    let held = executor.submit(delayed(gated, id));
    let waited = parjob::wait_timeout([held], Until::AllCompleted, Duration::from_millis(20));
    assert_eq!(
        (waited.done.len(), waited.not_done.len()),
        (0, 1),
        "the held task cannot be done"
    );
    gate.open();
    let waited = parjob::wait_timeout(
        waited.not_done,
        Until::AllCompleted,
        Duration::from_secs(60),
    );
    assert_eq!((waited.done.len(), waited.not_done.len()), (1, 0));
}

#[test]
fn a_future_prints_its_state() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let running = executor.submit(delayed(gated, id));
    gate.wait_until(|s| s.started == 1);
    let queued = executor.submit(delayed(square, 2));
    assert_eq!(
        format!("{running:?}"),
        "Future { index: 0, state: \"running\" }"
    );
    assert_eq!(
        format!("{queued:?}"),
        "Future { index: 1, state: \"pending\" }"
    );
    assert!(queued.cancel());
    assert_eq!(
        format!("{queued:?}"),
        "Future { index: 1, state: \"cancelled\" }"
    );
    gate.open();
    running.wait();
    assert_eq!(
        format!("{running:?}"),
        "Future { index: 0, state: \"finished\" }"
    );
}

#[test]
fn a_done_callback_runs_once_the_task_is_done_and_leaves_the_value() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let future = executor.submit(delayed(gated, id));
    let (sender, called) = mpsc::channel();
    future.add_done_callback(move |done: Future<u64>| {
        let _ = sender.send((done.is_done(), done.error()));
    });
    gate.wait_until(|s| s.started == 1);
    assert!(
        called.try_recv().is_err(),
        "called before the task was done"
    );
    gate.open();
    assert_eq!(called.recv_timeout(WAIT_LIMIT), Ok((true, None)));
    // The callback looked at the outcome without taking it.
    assert_eq!(future.result(), Ok(id));
}

#[test]
fn a_done_callback_can_take_the_value() {
    for backend in IN_PROCESS {
        let executor = Executor::new(2).backend(backend);
        let (sender, results) = mpsc::channel();
        for i in 0..5u64 {
            let sender = sender.clone();
            // The future itself is dropped at once: the callback still runs.
            executor
                .submit(delayed(square, i))
                .add_done_callback(move |done| {
                    let _ = sender.send(done.result());
                });
        }
        drop(sender);
        let mut squares: Vec<u64> = results
            .iter()
            .map(|r| r.expect("each task succeeds"))
            .collect();
        squares.sort_unstable();
        assert_eq!(squares, [0, 1, 4, 9, 16], "{backend}");
    }
}

#[test]
fn a_done_callback_on_a_done_future_runs_at_once_on_the_calling_thread() {
    let executor = Executor::new(2).backend(Backend::Threading);
    let future = executor.submit(delayed(square, 3));
    future.wait();
    let here = std::thread::current().id();
    let ran_on = Arc::new(Mutex::new(None));
    let record = Arc::clone(&ran_on);
    future.add_done_callback(move |_| {
        *record.lock().unwrap() = Some(std::thread::current().id());
    });
    assert_eq!(*ran_on.lock().unwrap(), Some(here));
    assert_eq!(future.result(), Ok(9));
}

#[test]
fn done_callbacks_run_in_order_and_a_panicking_one_stops_nothing() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let future = executor.submit(delayed(gated, id));
    let (sender, called) = mpsc::channel();
    for n in 0..3 {
        let sender = sender.clone();
        future.add_done_callback(move |_| {
            let _ = sender.send(n);
            assert!(n != 1, "callback {n} fails");
        });
    }
    drop(sender);
    gate.open();
    let order: Vec<i32> = called.iter().collect();
    assert_eq!(order, [0, 1, 2]);
    assert_eq!(future.result(), Ok(id));
    // The worker that ran the callbacks still runs tasks.
    assert_eq!(executor.submit(delayed(square, 4)).result(), Ok(16));
}

#[test]
fn a_done_callback_of_a_cancelled_future_sees_the_cancellation() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let running = executor.submit(delayed(gated, id));
    let queued = executor.submit(delayed(square, 5));
    let (sender, called) = mpsc::channel();
    queued.add_done_callback(move |done| {
        let _ = sender.send(done.result());
    });
    gate.wait_until(|s| s.started == 1);
    assert!(queued.cancel());
    assert_eq!(
        called.recv_timeout(WAIT_LIMIT),
        Ok(Err(Error::cancelled(1)))
    );
    gate.open();
    assert_eq!(running.result(), Ok(id));
}

#[test]
fn map_timeout_yields_every_result_in_input_order_when_in_time() {
    for backend in IN_PROCESS {
        let executor = Executor::new(4).backend(backend);
        let out: Vec<Result<u64, Error>> = executor
            .map_timeout((0..40u64).map(|x| delayed(nap_then_square, x)), WAIT_LIMIT)
            .collect();
        let expected: Vec<Result<u64, Error>> = (0..40).map(|x| Ok(x * x)).collect();
        assert_eq!(out, expected, "{backend}");
    }
}

#[test]
fn map_timeout_yields_a_failure_and_goes_on() {
    for backend in IN_PROCESS {
        let executor = Executor::new(2).backend(backend);
        let mut out = executor.map_timeout([fails, square].map(|f| delayed(f, 3)), WAIT_LIMIT);
        assert!(
            matches!(out.next(), Some(Err(Error::TaskPanicked { index: 0, .. }))),
            "{backend}"
        );
        assert_eq!(out.next(), Some(Ok(9)), "{backend}");
        assert_eq!(out.next(), None, "{backend}");
    }
}

#[test]
fn map_timeout_ends_with_a_timeout_error_when_a_result_is_late() {
    let (id, gate) = new_gate();
    let executor = Executor::new(1).backend(Backend::Threading);
    let limit = Duration::from_millis(50);
    let mut out = executor.map_timeout(
        [delayed(gated, id), delayed(gated, id), delayed(gated, id)],
        limit,
    );
    let err = out.next().expect("one item").unwrap_err();
    assert_eq!(err, Error::wait_timed_out(0, limit));
    assert_eq!(out.next(), None, "nothing after the timeout");
    // The tasks behind the late one were cancelled: only the running one finishes.
    gate.wait_until(|s| s.started == 1);
    gate.open();
    drop(out);
    executor.shutdown(Shutdown::Wait);
    assert_eq!(gate.finished(), 1);
}

#[test]
fn map_timeout_is_lazy_with_bounded_look_ahead() {
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let executor = Executor::new(2).backend(Backend::Threading);
    let endless = (0u64..).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        delayed(square, i)
    });
    let first: Vec<u64> = executor
        .map_timeout(endless, WAIT_LIMIT)
        .take(10)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first, (0..10).map(|i| i * i).collect::<Vec<_>>());
    let pulled = pulled.load(Ordering::SeqCst);
    assert!(pulled <= 10 + 2 * 2, "pulled {pulled} tasks for 10 results");
}

#[test]
fn map_timeout_after_shutdown_is_one_error() {
    let executor = Executor::new(2).backend(Backend::Threading);
    executor.shutdown(Shutdown::Wait);
    let out: Vec<Result<u64, Error>> = executor
        .map_timeout((0u64..).map(|i| delayed(square, i)), WAIT_LIMIT)
        .collect();
    assert_eq!(out, [Err(Error::ExecutorShutdown)]);
}
