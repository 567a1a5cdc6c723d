//! Long runs: keep going past failures, a deterministic first failure, retries after crashes,
//! timeouts and panics, per-task time limits, events, insights and the Chrome trace.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parjob::{Backend, BatchSize, Error, Event, Parallel, Retry, Timed, delayed};
use parjob_tests::{EVERY_TARGET, IN_PROCESS, run_child_test};

fn processes(n_jobs: i32) -> Parallel {
    Parallel::new(n_jobs).backend(Backend::Process)
}

fn panics_on_sevens(i: u32) -> u32 {
    if i.is_multiple_of(7) {
        panic!("{i} is a multiple of seven");
    }
    i
}

fn square(x: u64) -> u64 {
    x * x
}

/// How a task fails on its first attempt.
const ABORT: u8 = 0;
const SEGFAULT: u8 = 1;
const HANG: u8 = 2;
const PANIC: u8 = 3;

/// Tasks 3, 7 and 11 fail `how` the first time they run (a marker file in `dir` remembers,
/// across worker processes), and return `i * 10` when they run again; every other task
/// returns `i * 10` at once.
fn fails_once((dir, i, how): (String, u32, u8)) -> u32 {
    if [3, 7, 11].contains(&i) {
        let marker = Path::new(&dir).join(i.to_string());
        if !marker.exists() {
            std::fs::write(&marker, b"").expect("the marker can be written");
            match how {
                ABORT => std::process::abort(),
                // SAFETY: none: writing to an unmapped address to crash the worker on purpose.
                SEGFAULT => unsafe { std::ptr::write_volatile(std::ptr::dangling_mut::<u64>(), 1) },
                HANG => std::thread::sleep(Duration::from_secs(30)),
                _ => panic!("task {i} fails once"),
            }
        }
    }
    i * 10
}

fn fails_once_tasks(
    dir: &tempfile::TempDir,
    how: u8,
) -> impl Iterator<Item = impl parjob::Task<Output = u32>> {
    let dir = dir.path().display().to_string();
    (0..20u32).map(move |i| delayed(fails_once, (dir.clone(), i, how)))
}

fn always_aborts_on_five(i: u32) -> u32 {
    if i == 5 {
        std::process::abort();
    }
    i
}

#[test]
fn keep_going_returns_exactly_one_outcome_per_input_on_every_target() {
    for target in EVERY_TARGET {
        let results = target
            .parallel(2)
            .run_results((0..100u32).map(|i| delayed(panics_on_sevens, i)))
            .unwrap();
        assert_eq!(results.len(), 100, "{target}");
        for (i, result) in results.iter().enumerate() {
            match result {
                Ok(v) => assert!(
                    !i.is_multiple_of(7) && *v as usize == i,
                    "{target}: task {i}: {v}"
                ),
                Err(Error::TaskPanicked { index, .. }) => {
                    assert!(
                        i.is_multiple_of(7) && *index == i,
                        "{target}: task {i}: {result:?}"
                    )
                }
                other => panic!("{target}: task {i}: {other:?}"),
            }
        }
    }
}

#[test]
fn keep_going_reports_a_configuration_error_once() {
    let err = Parallel::new(0)
        .run_results((0..10u32).map(|i| delayed(panics_on_sevens, i)))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidNJobs { value: 0, .. }), "{err}");
}

static SEVEN_STARTED: AtomicBool = AtomicBool::new(false);
static EIGHTY_THREE_FAILED: AtomicBool = AtomicBool::new(false);

/// Task 83 fails first (once task 7 has started); task 7 fails after it.
fn seven_fails_after_eighty_three(i: u32) -> u32 {
    let wait_for = |flag: &AtomicBool| {
        for _ in 0..10_000 {
            if flag.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    match i {
        7 => {
            SEVEN_STARTED.store(true, Ordering::SeqCst);
            wait_for(&EIGHTY_THREE_FAILED);
            // Let batch 83's completion reach the dispatcher first.
            std::thread::sleep(Duration::from_millis(50));
            panic!("seven");
        }
        83 => {
            wait_for(&SEVEN_STARTED);
            EIGHTY_THREE_FAILED.store(true, Ordering::SeqCst);
            panic!("eighty-three");
        }
        _ => i,
    }
}

#[test]
fn fail_fast_names_the_lowest_failed_index_not_the_first_to_arrive() {
    for target in IN_PROCESS {
        SEVEN_STARTED.store(false, Ordering::SeqCst);
        EIGHTY_THREE_FAILED.store(false, Ordering::SeqCst);
        let err = target
            .parallel(2)
            .batch_size(BatchSize::Fixed(50))
            .run((0..100u32).map(|i| delayed(seven_fails_after_eighty_three, i)))
            .unwrap_err();
        assert!(
            matches!(err, Error::TaskPanicked { index: 7, .. }),
            "{target}: {err}"
        );
    }
}

#[test]
fn retries_after_abort_segfault_and_timeout_put_the_values_in_place() {
    for how in [ABORT, SEGFAULT, HANG] {
        let dir = tempfile::tempdir().unwrap();
        let mut parallel = processes(2).retries(2).batch_size(BatchSize::Fixed(4));
        if how == HANG {
            parallel = parallel.timeout(Duration::from_secs(2));
        }
        let out = parallel.run(fails_once_tasks(&dir, how)).unwrap();
        assert_eq!(
            out,
            (0..20u32).map(|i| i * 10).collect::<Vec<_>>(),
            "how {how}"
        );
        // run_iter and run_unordered retry the same way.
        let dir = tempfile::tempdir().unwrap();
        let mut seen: Vec<(usize, u32)> = parallel
            .run_unordered(fails_once_tasks(&dir, how))
            .map(|(i, r)| (i, r.unwrap()))
            .collect();
        seen.sort_unstable();
        assert_eq!(seen.len(), 20);
        assert!(seen.iter().all(|&(i, v)| v as usize == i * 10), "{seen:?}");
    }
}

#[test]
fn an_executor_keeps_going_and_its_map_retries_crashed_tasks() {
    let executor = parjob::Executor::new(2)
        .backend(Backend::Process)
        .batch_size(BatchSize::Fixed(4));
    // Without retries: the three crashes fail their own items and nothing else.
    let dir = tempfile::tempdir().unwrap();
    let results: Vec<Result<u32, Error>> = executor.map(fails_once_tasks(&dir, ABORT)).collect();
    assert_eq!(results.len(), 20);
    for (i, result) in results.iter().enumerate() {
        match result {
            Err(Error::WorkerCrashed { index, .. }) if [3, 7, 11].contains(&i) => {
                assert_eq!(*index, i);
            }
            Ok(value) if ![3, 7, 11].contains(&i) => assert_eq!(*value as usize, i * 10),
            other => panic!("task {i}: {other:?}"),
        }
    }
    // With retries, the map yields every value in its place.
    let executor = executor.retries(2);
    let dir = tempfile::tempdir().unwrap();
    let values: Vec<u32> = executor
        .map(fails_once_tasks(&dir, ABORT))
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(values, (0..20u32).map(|i| i * 10).collect::<Vec<_>>());
}

#[test]
fn retries_on_threads_cover_timeouts_and_asked_for_panics() {
    for target in IN_PROCESS {
        let dir = tempfile::tempdir().unwrap();
        let out = target
            .parallel(2)
            .retry(Retry::new(1).on_panic(true))
            .run(fails_once_tasks(&dir, PANIC))
            .unwrap();
        assert_eq!(out, (0..20u32).map(|i| i * 10).collect::<Vec<_>>());
        let dir = tempfile::tempdir().unwrap();
        let out: Vec<u32> = target
            .parallel(2)
            .retries(1)
            .timeout(Duration::from_millis(300))
            .run_iter(fails_once_tasks(&dir, HANG))
            .map(Result::unwrap)
            .collect();
        assert_eq!(out, (0..20u32).map(|i| i * 10).collect::<Vec<_>>());
    }
}

#[test]
fn panics_are_not_retried_unless_asked() {
    for target in [parjob_tests::Target::Backend(Backend::Sequential)]
        .into_iter()
        .chain(IN_PROCESS)
    {
        let dir = tempfile::tempdir().unwrap();
        let err = target
            .parallel(2)
            .retries(3)
            .run(fails_once_tasks(&dir, PANIC))
            .unwrap_err();
        assert!(
            matches!(err, Error::TaskPanicked { index: 3, .. }),
            "{target}: {err}"
        );
    }
}

#[test]
fn exhausted_retries_list_every_attempt() {
    let err = processes(2)
        .retry(Retry::new(2).backoff(Duration::from_millis(10)))
        .run((0..10u32).map(|i| delayed(always_aborts_on_five, i)))
        .unwrap_err();
    match &err {
        Error::RetriesExhausted {
            index: 5, attempts, ..
        } => {
            assert_eq!(attempts.len(), 3, "{err}");
            for attempt in attempts {
                assert!(
                    matches!(attempt, Error::WorkerCrashed { index: 5, .. }),
                    "{attempt}"
                );
            }
        }
        other => panic!("expected RetriesExhausted, got {other}"),
    }
    let text = err.to_string();
    assert!(
        text.starts_with("task 5 failed 3 times: [1] task 5: worker "),
        "{text}"
    );
    assert!(text.contains("SIGABRT"), "{text}");
    assert!(text.contains("[3] task 5"), "{text}");
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn a_task_limit_of_its_own_applies_to_that_task_only() {
    for target in EVERY_TARGET {
        if target == parjob_tests::Target::Backend(Backend::Sequential) {
            continue; // a sequential task is only reported late; covered below
        }
        let tasks = [5, 3_000, 5, 400].into_iter().enumerate().map(|(i, ms)| {
            let limit = (i == 1).then_some(Duration::from_millis(300));
            Timed::new(delayed(nap, ms), limit)
        });
        let results = target.parallel(2).run_results(tasks).unwrap();
        assert_eq!(results[0], Ok(5), "{target}");
        assert!(
            matches!(results[1], Err(Error::Timeout { index: 1, .. })),
            "{target}: {:?}",
            results[1]
        );
        assert_eq!(results[2], Ok(5), "{target}");
        assert_eq!(results[3], Ok(400), "{target}");
    }
}

#[test]
fn a_task_limit_of_its_own_replaces_the_runs() {
    for target in EVERY_TARGET {
        let out = target
            .parallel(2)
            .timeout(Duration::from_millis(100))
            .run([1, 300].map(|ms| delayed(nap, ms).timeout(Duration::from_secs(20))))
            .unwrap();
        assert_eq!(out, [1, 300], "{target}");
    }
}

#[test]
fn the_process_backend_kills_a_task_over_its_own_limit() {
    let err = processes(2)
        .run([5, 30_000].map(|ms| delayed(nap, ms).timeout(Duration::from_millis(300))))
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Timeout {
                index: 1,
                killed: true,
                ..
            }
        ),
        "{err}"
    );
}

fn where_i_run(_: ()) -> (usize, u32) {
    let info = parjob::worker_info();
    (info.worker.unwrap_or(usize::MAX), info.pid)
}

#[test]
fn a_timeout_names_the_worker_it_killed() {
    let pool = processes(1).batch_size(BatchSize::Fixed(1));
    let [(index, pid)] = pool.run([delayed(where_i_run, ())]).unwrap()[..] else {
        panic!("one result expected");
    };
    let err = pool
        .run([delayed(nap, 30_000).timeout(Duration::from_millis(200))])
        .unwrap_err();
    let Error::Timeout {
        index: 0,
        killed: true,
        worker: Some(worker),
        pid: Some(killed),
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert_eq!((worker, killed), (index, pid), "{err}");
    let text = err.to_string();
    assert!(
        text.contains(&format!("its worker {index}, pid {pid}, was killed")),
        "{text}"
    );
    // It was killed: the next call runs on a new worker.
    let [(_, next)] = pool.run([delayed(where_i_run, ())]).unwrap()[..] else {
        panic!("one result expected");
    };
    assert_ne!(next, pid);
}

/// Collects the events of the runs of `parallel`.
fn recorded(parallel: Parallel) -> (Parallel, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&events);
    let parallel = parallel.on_event(move |event: &Event| sink.lock().unwrap().push(event.clone()));
    (parallel, events)
}

#[test]
fn events_arrive_in_a_consistent_order_on_every_target() {
    for target in EVERY_TARGET {
        let (parallel, events) = recorded(target.parallel(2));
        // `filter` hides the input's length until it runs out.
        let results = parallel
            .run_results(
                (0..600u32)
                    .filter(|i| i % 2 == 0)
                    .map(|i| delayed(panics_on_sevens, i / 2)),
            )
            .unwrap();
        let events = events.lock().unwrap();
        assert!(
            matches!(events.first(), Some(Event::RunStarted { workers, .. }) if *workers >= 1),
            "{target}: {:?}",
            events.first()
        );
        assert!(
            matches!(events.last(), Some(Event::RunFinished { ok: false, stopped: false, insights }) if insights.tasks == 300 && insights.failed == 43),
            "{target}: {:?}",
            events.last()
        );
        let mut open: HashMap<u64, usize> = HashMap::new();
        let mut completed_tasks = 0;
        let mut failed_events = 0;
        let mut dispatched_tasks = 0;
        let mut input_ended = Vec::new();
        for event in events.iter() {
            match event {
                Event::BatchDispatched {
                    batch,
                    tasks,
                    attempt,
                    ..
                } => {
                    assert!(
                        open.insert(*batch, *tasks).is_none(),
                        "{target}: batch {batch} twice"
                    );
                    if *attempt == 1 {
                        assert!(input_ended.is_empty(), "{target}: dispatched after the end");
                        dispatched_tasks += tasks;
                    }
                }
                Event::InputEnded { tasks, .. } => {
                    assert_eq!(*tasks, dispatched_tasks, "{target}");
                    input_ended.push(*tasks);
                }
                Event::BatchCompleted { batch, tasks, .. } => {
                    let dispatched = open.remove(batch);
                    assert_eq!(
                        dispatched,
                        Some(*tasks),
                        "{target}: batch {batch} completed unsent or twice"
                    );
                    completed_tasks += tasks;
                }
                Event::TaskFailed { retrying, .. } => {
                    assert!(!retrying);
                    failed_events += 1;
                }
                _ => {}
            }
        }
        assert!(
            open.is_empty(),
            "{target}: batches never completed: {open:?}"
        );
        assert_eq!(completed_tasks, 300, "{target}");
        // Told once, with the count of an input whose length was not known beforehand (the
        // progress bar takes its length from it).
        assert_eq!(input_ended, [300], "{target}");
        assert_eq!(
            failed_events,
            results.iter().filter(|r| r.is_err()).count(),
            "{target}"
        );
    }
}

#[test]
fn retries_show_as_events_and_in_the_insights() {
    let dir = tempfile::tempdir().unwrap();
    let (parallel, events) = recorded(processes(2).retries(2).insights(true));
    parallel.run(fails_once_tasks(&dir, ABORT)).unwrap();
    let events = events.lock().unwrap();
    let mut retried: Vec<usize> = events
        .iter()
        .filter_map(|e| match e {
            Event::TaskRetried {
                index, attempt: 2, ..
            } => Some(*index),
            _ => None,
        })
        .collect();
    // In the order the crashes happened: a batch queued behind another on one worker may run
    // after a later batch on the other (docs/PROCESS.md, "Two frames in flight").
    retried.sort_unstable();
    assert_eq!(retried, [3, 7, 11]);
    let crashed = events
        .iter()
        .filter(|e| matches!(e, Event::WorkerCrashed { .. }))
        .count();
    assert_eq!(crashed, 3);
    let insights = parallel.last_insights().unwrap();
    assert_eq!(
        (
            insights.tasks,
            insights.failed,
            insights.retries,
            insights.worker_crashes
        ),
        (20, 0, 3, 3)
    );
}

fn total_len(bytes: Vec<u8>) -> usize {
    bytes.len()
}

#[test]
fn batches_carry_transport_figures_on_processes_and_none_in_process() {
    for target in EVERY_TARGET {
        let (parallel, events) = recorded(target.parallel(2).insights(true));
        // 40 tasks of 20 kB each: at least 800 kB go to the workers, far less comes back.
        let out = parallel
            .run((0..40usize).map(|i| delayed(total_len, vec![i as u8; 20_000])))
            .unwrap();
        assert_eq!(out, vec![20_000; 40]);
        let events = events.lock().unwrap();
        let mut sum = parjob::Transport::default();
        let mut batches = 0;
        for event in events.iter() {
            if let Event::BatchCompleted { transport, .. } = event {
                batches += 1;
                match (target, transport) {
                    (parjob_tests::Target::Backend(Backend::Process), Some(t)) => {
                        assert!(t.bytes_sent > 0 && t.bytes_received > 0, "{t:?}");
                        assert!(!t.encode.is_zero() && !t.decode.is_zero(), "{t:?}");
                        sum.add(t);
                    }
                    (parjob_tests::Target::Backend(Backend::Process), None) => {
                        panic!("{target}: a batch without transport figures")
                    }
                    (_, None) => {}
                    (_, Some(t)) => panic!("{target}: an in-process batch with {t:?}"),
                }
            }
        }
        assert!(batches > 0, "{target}");
        let insights = parallel.last_insights().unwrap();
        assert_eq!(insights.transport, sum, "{target}");
        if target == parjob_tests::Target::Backend(Backend::Process) {
            assert!(sum.bytes_sent >= 800_000, "{sum:?}");
            assert!(sum.bytes_received < 100_000, "{sum:?}");
            let text = insights.to_string();
            assert!(text.contains("transport: "), "{text}");
            // The process pool says which worker ran each batch.
            assert!(!insights.busy_by_worker.is_empty(), "{insights:?}");
        } else {
            assert!(!insights.to_string().contains("transport"));
        }
    }
}

fn nap_then_len(bytes: Vec<u8>) -> usize {
    std::thread::sleep(Duration::from_millis(50));
    bytes.len()
}

#[test]
fn a_batch_sent_behind_another_reports_its_own_transport_figures() {
    // One worker, batches of 4 naps of 50 ms: each batch is sent while the one before it runs
    // (docs/PROCESS.md, "Two frames in flight"). Each batch's figures are its own: its own
    // bytes (not its neighbour's too, nor none), and a time on the line counted from when the
    // reply before it came back, not the 200 ms it waited behind that batch. (With 20 ms naps
    // and a 40 ms bound the test failed at load 19: 69 ms on the line.)
    let (parallel, events) = recorded(
        Parallel::new(1)
            .backend(Backend::Process)
            .batch_size(BatchSize::Fixed(4)),
    );
    let out = parallel
        .run((0..24usize).map(|_| delayed(nap_then_len, vec![7u8; 2_000])))
        .unwrap();
    assert_eq!(out, vec![2_000; 24]);
    let events = events.lock().unwrap();
    let mut batches = 0;
    for event in events.iter() {
        if let Event::BatchCompleted { transport, .. } = event {
            batches += 1;
            let t = transport.expect("a process batch has transport figures");
            assert!(
                (8_000..9_000).contains(&t.bytes_sent),
                "one batch's 4 x 2000 bytes: {t:?}"
            );
            assert!(t.bytes_received > 0, "{t:?}");
            assert!(!t.encode.is_zero() && !t.decode.is_zero(), "{t:?}");
            assert!(
                t.ipc < Duration::from_millis(150),
                "time on the line over 150 ms (the wait behind the batch before is 200 ms): {t:?}"
            );
        }
    }
    assert_eq!(batches, 6);
}

#[test]
fn a_crashed_worker_is_replaced_and_the_event_names_its_pid() {
    let dir = tempfile::tempdir().unwrap();
    // One worker and one batch of all 20 tasks: the crashes at 3, 7 and 11 each cost the
    // worker, and the slot starts a new one within the batch to run the tasks after it.
    let trace = dir.path().join("trace.json");
    let (parallel, events) = recorded(
        processes(1)
            .batch_size(BatchSize::Fixed(20))
            .retries(1)
            .insights(true)
            .trace(&trace),
    );
    let out = parallel.run(fails_once_tasks(&dir, ABORT)).unwrap();
    assert_eq!(out, (0..20).map(|i| i * 10).collect::<Vec<u32>>());
    let events = events.lock().unwrap();
    let mut crashed = Vec::new();
    let mut replaced = Vec::new();
    for event in events.iter() {
        match event {
            Event::WorkerCrashed { pid, worker, .. } => {
                assert_eq!(*worker, 0);
                crashed.push(*pid);
            }
            Event::WorkerReplaced {
                worker,
                old_pid,
                new_pid,
                reason,
                ..
            } => {
                assert_eq!(*worker, 0);
                assert!(
                    crashed.contains(old_pid),
                    "replaced {old_pid} before its crash was reported: {crashed:?}"
                );
                assert_ne!(old_pid, new_pid);
                assert!(reason.contains("SIGABRT"), "{reason}");
                replaced.push(*old_pid);
            }
            _ => {}
        }
    }
    assert_eq!(crashed.len(), 3, "{crashed:?}");
    assert_eq!(replaced, crashed);
    let insights = parallel.last_insights().unwrap();
    assert_eq!(insights.worker_crashes, 3);
    assert!(insights.worker_replacements >= 3, "{insights:?}");
    // The trace shows each crash and replacement on the worker's row, and each batch (the
    // one of 20 and the three retries) with its transport figures.
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&trace).unwrap()).unwrap();
    let trace_events = json["traceEvents"].as_array().unwrap();
    let on_row = |what: &str| {
        trace_events
            .iter()
            .filter(|e| {
                e["ph"] == "i" && e["tid"] == 0 && e["name"].as_str().unwrap().starts_with(what)
            })
            .count()
    };
    assert_eq!(on_row("worker 0 (pid "), 3, "{json}");
    assert!(on_row("worker 0 replaced (pid ") >= 3, "{json}");
    let complete: Vec<_> = trace_events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(complete.len(), 4);
    assert!(
        complete
            .iter()
            .all(|e| e["args"]["bytes_sent"].as_u64().unwrap() > 0)
    );
}

/// Aborts its worker on `x == 3`.
fn aborts_on_three(x: u64) -> u64 {
    if x == 3 {
        std::process::abort();
    }
    x
}

#[test]
fn a_replacement_for_a_worker_an_earlier_run_lost_is_told_apart_in_its_insights() {
    let parallel = processes(1).insights(true);
    let err = parallel
        .run((0..4u64).map(|i| delayed(aborts_on_three, i)))
        .unwrap_err();
    assert!(matches!(err, Error::WorkerCrashed { .. }), "{err}");
    let crashed = parallel.last_insights().unwrap();
    assert_eq!(crashed.worker_crashes, 1, "{crashed:?}");
    // The crash was the run's last task: the replacement is reported with the slot's next
    // batch, in the next run, which says whose loss it made up for.
    parallel.run((0..5u64).map(|i| delayed(square, i))).unwrap();
    let next = parallel.last_insights().unwrap();
    assert_eq!(next.worker_crashes, 0, "{next:?}");
    assert_eq!(
        (
            next.worker_replacements,
            next.worker_replacements_of_earlier_losses
        ),
        (1, 1),
        "{next:?}"
    );
    assert!(
        next.to_string()
            .contains("1 replaced (1 for workers lost outside this run's tasks)"),
        "{next}"
    );
    // A crash within a run, replaced in the same run, is not counted apart.
    let within = processes(1).batch_size(BatchSize::Fixed(1)).insights(true);
    let results = within
        .run_results((0..6u64).map(|i| delayed(aborts_on_three, i)))
        .unwrap();
    assert!(results[3].is_err() && results[5].is_ok());
    let insights = within.last_insights().unwrap();
    assert_eq!(
        (
            insights.worker_crashes,
            insights.worker_replacements,
            insights.worker_replacements_of_earlier_losses
        ),
        (1, 1, 0),
        "{insights}"
    );
}

#[test]
fn a_recycled_worker_is_reported_and_replaced() {
    let (parallel, events) = recorded(
        processes(1)
            .batch_size(BatchSize::Fixed(10))
            .max_tasks_per_worker(5)
            .insights(true),
    );
    let out = parallel
        .run((0..10u64).map(|i| delayed(square, i)))
        .unwrap();
    assert_eq!(out[9], 81);
    let events = events.lock().unwrap();
    let recycled: Vec<(u32, usize)> = events
        .iter()
        .filter_map(|e| match e {
            Event::WorkerRecycled { pid, tasks_run, .. } => Some((*pid, *tasks_run)),
            _ => None,
        })
        .collect();
    assert!(!recycled.is_empty(), "{events:?}");
    assert!(recycled.iter().all(|&(_, n)| n == 5), "{recycled:?}");
    // The first recycled worker's slot got a new one within the batch, for tasks 5..10.
    let (first_pid, _) = recycled[0];
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::WorkerReplaced { old_pid, reason, .. }
                if *old_pid == first_pid && reason.contains("recycled after 5 tasks")
        )),
        "{events:?}"
    );
    let insights = parallel.last_insights().unwrap();
    assert!(insights.worker_recycles >= 1 && insights.worker_replacements >= 1);
}

#[test]
fn insights_count_tasks_failures_and_each_workers_share() {
    let parallel = Parallel::new(2).backend(Backend::Threading).insights(true);
    assert!(parallel.last_insights().is_none());
    let results = parallel
        .run_results((0..1000u32).map(|i| delayed(panics_on_sevens, i)))
        .unwrap();
    let insights = parallel.last_insights().unwrap();
    assert_eq!(insights.tasks, 1000);
    assert_eq!(
        insights.failed,
        results.iter().filter(|r| r.is_err()).count()
    );
    assert_eq!(insights.workers, 2);
    assert!(!insights.busy_by_worker.is_empty() && insights.busy_by_worker.len() <= 2);
    assert!(!insights.slowest.is_empty());
    let text = insights.to_string();
    assert!(text.starts_with("Insights: 1000 tasks in "), "{text}");
    assert!(
        text.contains(&format!("{} failed", insights.failed)),
        "{text}"
    );
    // Threads move nothing between processes: no encoding or IPC to blame.
    assert!(text.contains("(the rest: dispatch, idle)"), "{text}");
}

#[test]
fn the_mean_batch_size_counts_retried_batches_with_their_tasks() {
    let parallel = processes(1)
        .batch_size(BatchSize::Fixed(1))
        .retries(2)
        .insights(true);
    let results = parallel
        .run_results((0..6u64).map(|i| delayed(aborts_on_three, i)))
        .unwrap();
    assert!(results[3].is_err());
    let insights = parallel.last_insights().unwrap();
    // Task 3 ran three times: 8 batches of one task each.
    assert_eq!(
        (
            insights.tasks,
            insights.batches,
            insights.tasks_in_batches,
            insights.batch_sizes
        ),
        (6, 8, 8, (1, 1)),
        "{insights:?}"
    );
    let text = insights.to_string();
    assert!(text.contains("(sizes 1..1, mean 1.0)"), "{text}");
    assert!(
        text.contains("(the rest: dispatch, encode, IPC, decode, idle)"),
        "{text}"
    );
}

#[test]
fn verbose_prints_the_insights_at_the_end() {
    let output = run_child_test("long_runs::child_verbose_run", &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("[Parallel(n_jobs=2)]: Insights: 100 tasks in "),
        "{stderr}"
    );
    assert!(stderr.contains("busy by worker:"), "{stderr}");
    // After verbose's closing line, not between its progress lines (a new user's report).
    let done = stderr.find("finished").expect("verbose's closing line");
    let insights = stderr.find("Insights:").expect("the insights");
    assert!(done < insights, "{stderr}");
}

#[test]
#[ignore = "run by verbose_prints_the_insights_at_the_end in a child process"]
fn child_verbose_run() {
    Parallel::new(2)
        .backend(Backend::Threading)
        .verbose(1)
        .run((0..100u64).map(|i| delayed(square, i)))
        .unwrap();
}

#[test]
fn a_trace_file_is_json_with_one_complete_event_per_batch() {
    for target in EVERY_TARGET {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.json");
        let (parallel, events) = recorded(target.parallel(2).trace(&path));
        parallel
            .run_results((0..500u32).map(|i| delayed(panics_on_sevens, i)))
            .unwrap();
        let batches = events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| matches!(e, Event::BatchCompleted { .. }))
            .count();
        let text = std::fs::read_to_string(&path).unwrap();
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        let trace_events = json["traceEvents"].as_array().unwrap();
        let complete: Vec<_> = trace_events.iter().filter(|e| e["ph"] == "X").collect();
        assert_eq!(complete.len(), batches, "{target}");
        let tasks: u64 = complete
            .iter()
            .map(|e| e["args"]["tasks"].as_u64().unwrap())
            .sum();
        assert_eq!(tasks, 500, "{target}");
        assert!(
            complete
                .iter()
                .all(|e| e["dur"].as_f64().is_some() && e["ts"].as_f64().is_some())
        );
    }
}

#[test]
fn parjob_trace_in_the_environment_writes_a_trace() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("env.json");
    run_child_test(
        "long_runs::child_plain_run",
        &[("PARJOB_TRACE", path.to_str().unwrap())],
    );
    let text = std::fs::read_to_string(&path).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        json["traceEvents"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["ph"] == "X")
    );
}

#[test]
#[ignore = "run by parjob_trace_in_the_environment_writes_a_trace in a child process"]
fn child_plain_run() {
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .run((0..100u64).map(|i| delayed(square, i)))
        .unwrap();
    assert_eq!(out[9], 81);
}

fn nap_ms(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

/// Insights count timed-out tasks and the time they held their workers: before, a run whose
/// wall went to hung tasks showed only "0% of workers x wall" in tasks.
#[test]
fn insights_count_timeouts_and_the_time_they_held_their_workers() {
    for target in EVERY_TARGET {
        let parallel = target
            .parallel(2)
            .timeout(Duration::from_millis(100))
            .batch_size(BatchSize::Fixed(1))
            .insights(true);
        let results = parallel.run_results([1, 400, 1, 1].map(|ms| delayed(nap_ms, ms)));
        let results = results.unwrap();
        assert!(
            matches!(results[1], Err(Error::Timeout { index: 1, .. })),
            "{target}: {results:?}"
        );
        let insights = parallel.last_insights().unwrap();
        assert_eq!(insights.timeouts, 1, "{target}: {insights:?}");
        let text = insights.to_string();
        assert!(text.contains("1 timeouts"), "{target}: {text}");
        if target == parjob_tests::Target::Backend(Backend::Sequential) {
            // Waited for on the calling thread: its 400 ms are in the tasks' time already,
            // and counted once.
            assert_eq!(
                insights.in_timeouts,
                Duration::ZERO,
                "{target}: {insights:?}"
            );
            assert!(insights.busy >= Duration::from_millis(400), "{insights:?}");
            assert!(
                text.contains("timed out: 1 attempts, seen when they returned"),
                "{target}: {text}"
            );
        } else {
            // Given up at its limit: those 100 ms, in no batch's time.
            assert_eq!(
                insights.in_timeouts,
                Duration::from_millis(100),
                "{target}: {insights:?}"
            );
            assert!(
                text.contains("timed out: 1 attempts; given up at their limits"),
                "{target}: {text}"
            );
        }
    }
}
