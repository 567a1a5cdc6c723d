use std::time::{Duration, Instant};

use parjob::{Backend, BatchSize, Error, Parallel, delayed};
use parjob_tests::{EVERY_TARGET, IN_PROCESS, Target, run_child_test};

fn panics_on_seven(i: u32) -> u32 {
    if i == 7 {
        panic!("seven is unlucky");
    }
    i
}

fn identity(i: u32) -> u32 {
    i
}

#[test]
fn a_panic_becomes_task_panicked_with_index_and_message() {
    for target in EVERY_TARGET {
        let err = target
            .parallel(2)
            .run((0..100u32).map(|i| delayed(panics_on_seven, i)))
            .unwrap_err();
        match &err {
            Error::TaskPanicked { index, message, .. } => {
                assert_eq!(*index, 7, "{target}");
                assert!(message.contains("seven is unlucky"), "{message}");
                assert!(
                    message.contains("tests/failures.rs"),
                    "location missing: {message}"
                );
            }
            other => panic!("{target}: expected TaskPanicked, got {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("task 7 panicked: seven is unlucky"),
            "{err}"
        );
    }
}

/// Panics at 7 with where it runs, as `worker_info()` says: `"<worker index or -> <pid>"`.
fn panics_on_seven_saying_where(i: u32) -> u32 {
    if i == 7 {
        let info = parjob::worker_info();
        let worker = info.worker.map_or("-".to_string(), |w| w.to_string());
        panic!("ran on {worker} {}", info.pid);
    }
    i
}

#[test]
fn a_panic_names_the_worker_that_ran_it() {
    for target in EVERY_TARGET {
        let err = target
            .parallel(2)
            .run((0..100u32).map(|i| delayed(panics_on_seven_saying_where, i)))
            .unwrap_err();
        let Error::TaskPanicked {
            message,
            worker,
            pid,
            ..
        } = &err
        else {
            panic!("{target}: expected TaskPanicked, got {err:?}");
        };
        let said = message
            .strip_prefix("ran on ")
            .and_then(|rest| rest.split(" (at ").next())
            .unwrap_or_else(|| panic!("{target}: {message}"));
        let (said_worker, said_pid) = said.split_once(' ').expect("worker and pid");
        let said_pid: u32 = said_pid.parse().expect("a pid");
        match target {
            Target::Backend(Backend::Sequential) => {
                assert_eq!((*worker, *pid), (None, None), "{err}");
            }
            Target::Backend(Backend::Process) => {
                assert_eq!(worker.map(|w| w.to_string()).as_deref(), Some(said_worker));
                assert_eq!(*pid, Some(said_pid), "{err}");
                assert_ne!(said_pid, std::process::id(), "a worker process ran it");
                assert!(
                    err.to_string()
                        .ends_with(&format!("(on worker {said_worker}, pid {said_pid})")),
                    "{err}"
                );
            }
            _ => {
                // A thread of this process: its index names it, a pid would not.
                assert_eq!(worker.map(|w| w.to_string()).as_deref(), Some(said_worker));
                assert_eq!(*pid, None, "{err}");
                assert!(
                    err.to_string()
                        .ends_with(&format!("(on worker {said_worker})")),
                    "{err}"
                );
            }
        }
    }
}

#[test]
fn the_same_parallel_works_after_an_error() {
    for target in EVERY_TARGET {
        let parallel = target.parallel(2);
        assert!(
            parallel
                .run((0..20u32).map(|i| delayed(panics_on_seven, i)))
                .is_err()
        );
        let out = parallel
            .run((0..20u32).map(|i| delayed(identity, i)))
            .unwrap();
        assert_eq!(out, (0..20).collect::<Vec<_>>(), "{target}");
    }
}

#[test]
fn run_iter_yields_the_failure_in_place_and_goes_on() {
    for target in IN_PROCESS {
        let results: Vec<_> = target
            .parallel(2)
            .batch_size(BatchSize::Fixed(4))
            .run_iter((0..12u32).map(|i| delayed(panics_on_seven, i)))
            .collect();
        assert_eq!(results.len(), 12);
        for (i, result) in results.iter().enumerate() {
            match result {
                Err(Error::TaskPanicked { index: 7, .. }) => assert_eq!(i, 7),
                Ok(v) => assert_eq!(*v as usize, i),
                other => panic!("task {i}: {other:?}"),
            }
        }
    }
}

#[test]
fn run_unordered_yields_the_failure_with_its_index() {
    for target in IN_PROCESS {
        let failures: Vec<usize> = target
            .parallel(2)
            .run_unordered((0..50u32).map(|i| delayed(panics_on_seven, i)))
            .filter_map(|(i, r)| r.is_err().then_some(i))
            .collect();
        assert_eq!(failures, [7]);
    }
}

#[test]
fn a_task_over_its_timeout_fails_fast_with_timeout() {
    /// The worker that ran the 3 s nap (the one left running at the limit).
    static HUNG_ON: std::sync::Mutex<Option<Option<usize>>> = std::sync::Mutex::new(None);
    for target in IN_PROCESS {
        fn nap(ms: u64) -> u64 {
            if ms == 3_000 {
                *HUNG_ON.lock().unwrap() = Some(parjob::worker_info().worker);
            }
            std::thread::sleep(Duration::from_millis(ms));
            ms
        }
        *HUNG_ON.lock().unwrap() = None;
        let began = Instant::now();
        let err = target
            .parallel(2)
            .timeout(Duration::from_millis(100))
            .run([1, 5, 3_000, 2].map(|ms| delayed(nap, ms)))
            .unwrap_err();
        match &err {
            Error::Timeout {
                index,
                after,
                killed,
                worker,
                ..
            } => {
                assert_eq!(
                    (*index, *after, *killed),
                    (2, Duration::from_millis(100), false)
                );
                // It names the worker left running it (a pool's thread).
                let hung_on = HUNG_ON.lock().unwrap().expect("the nap started");
                assert_eq!(*worker, hung_on, "{target}: {err}");
                if let Some(w) = hung_on {
                    let on = format!("on worker {w}, not stopped");
                    assert!(err.to_string().contains(&on), "{target}: {err}");
                }
            }
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(err.to_string().contains("timed out after 100ms"), "{err}");
        assert!(
            began.elapsed() < Duration::from_millis(2_500),
            "waited for the hung task"
        );
    }
}

#[test]
fn a_sequential_task_over_its_timeout_is_reported_when_it_returns() {
    fn nap(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
    let err = Parallel::new(1)
        .backend(Backend::Sequential)
        .timeout(Duration::from_millis(50))
        .run([1, 200, 1].map(|ms| delayed(nap, ms)))
        .unwrap_err();
    let Error::Timeout {
        index: 1,
        killed: false,
        returned_after: Some(ran),
        ..
    } = err
    else {
        panic!("{err:?}");
    };
    assert!(ran >= Duration::from_millis(200), "{err:?}");
    // The message says the run waited for it, not that it was left running.
    let text = err.to_string();
    assert!(text.contains("seen when it returned, after"), "{text}");
    assert!(text.contains("the run waited for it"), "{text}");
}

#[test]
fn a_timeout_too_long_to_count_in_nanoseconds_never_fires() {
    for target in IN_PROCESS {
        fn nap(ms: u64) -> u64 {
            std::thread::sleep(Duration::from_millis(ms));
            ms
        }
        // 2^64 ns + 1 ms: truncated to 64 bits of nanoseconds it would be 1 ms.
        let about_584_years = Duration::new(18_446_744_073, 710_551_616);
        let out = target
            .parallel(2)
            .timeout(about_584_years)
            .run([20, 20, 20].map(|ms| delayed(nap, ms)))
            .unwrap();
        assert_eq!(out, [20, 20, 20]);
    }
}

/// `Duration::MAX` is past what `Instant` can hold: as a limit it never comes, on every
/// backend and through `Executor::submit` (it used to panic in the pools' clocks).
#[test]
fn a_timeout_of_duration_max_never_fires() {
    fn nap(ms: u64) -> u64 {
        std::thread::sleep(Duration::from_millis(ms));
        ms
    }
    for target in EVERY_TARGET {
        let out = target
            .parallel(2)
            .timeout(Duration::MAX)
            .run([20, 20, 20].map(|ms| delayed(nap, ms)))
            .unwrap();
        assert_eq!(out, [20, 20, 20], "{target}");
        let executor = parjob::Executor::from_parallel(target.parallel(2));
        let own = executor.submit(delayed(nap, 5).timeout(Duration::MAX));
        assert_eq!(own.result(), Ok(5), "{target}");
    }
}

#[test]
fn tasks_within_their_timeout_succeed() {
    for target in IN_PROCESS {
        let out = target
            .parallel(2)
            .timeout(Duration::from_secs(10))
            .run((0..50u32).map(|i| delayed(identity, i)))
            .unwrap();
        assert_eq!(out, (0..50).collect::<Vec<_>>());
    }
}

#[test]
fn task_panics_print_no_backtrace() {
    let output = run_child_test("failures::child_many_panics", &[("RUST_BACKTRACE", "1")]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!stderr.contains("stack backtrace"), "{stderr}");
    assert!(!stderr.contains("panicked at"), "{stderr}");
}

#[test]
#[ignore = "run by task_panics_print_no_backtrace in a child process"]
fn child_many_panics() {
    for target in IN_PROCESS {
        fn always_panics(i: u32) -> u32 {
            panic!("task {i} gives up")
        }
        let results: Vec<_> = target
            .parallel(2)
            .run_iter((0..50u32).map(|i| delayed(always_panics, i)))
            .collect();
        assert!(results.iter().all(Result::is_err));
    }
}

/// Leaves the file `dir/i`; task 0 fails instead: it panics, or, with `crash`, aborts the
/// process it runs in (only on the process backend).
fn mark_unless_first(dir: String, i: u32, crash: bool) -> u32 {
    if i == 0 {
        if crash {
            std::process::abort();
        }
        panic!("the first task fails");
    }
    std::fs::write(format!("{dir}/{i}"), b"").expect("the test's directory can be written");
    i
}

/// The tasks of the failing batch that ran: the markers they left.
fn marked(dir: &tempfile::TempDir) -> usize {
    std::fs::read_dir(dir.path()).unwrap().count()
}

#[test]
fn run_ends_a_batch_at_its_first_failure_and_run_results_does_not() {
    // One batch of ten on one worker, task 0 failing: `run` ends at that failure (as joblib
    // does), so the nine tasks after it in the same batch must not run and delay the error;
    // `run_results` wants every outcome, so they run. Inputs of unknown length too: their
    // batches do not write values in place. On the process backend the failure is a crash: a
    // frame a worker was sent runs whole there, and what is skipped is the tasks the
    // supervisor would send again to the replacement.
    let targets = EVERY_TARGET.into_iter().map(|target| {
        let crash = target == parjob_tests::Target::Backend(Backend::Process);
        (target, crash)
    });
    for (target, crash) in targets {
        for known_length in [true, false] {
            let parallel = target.parallel(1).batch_size(BatchSize::Fixed(10));
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_str().unwrap().to_string();
            let tasks = (0..10u32)
                .filter(|_| true)
                .map(|i| delayed(mark_unless_first, (path.clone(), i, crash)));
            let err = if known_length {
                let tasks: Vec<_> = tasks.collect();
                parallel.run(tasks).unwrap_err()
            } else {
                parallel.run(tasks).unwrap_err()
            };
            match (&err, crash) {
                (Error::TaskPanicked { index: 0, .. }, false)
                | (Error::WorkerCrashed { index: 0, .. }, true) => {}
                _ => panic!("{target}: task 0's failure expected, got {err}"),
            }
            assert_eq!(
                marked(&dir),
                0,
                "{target}, known length {known_length}: tasks ran after the failure"
            );

            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().to_str().unwrap().to_string();
            let tasks = (0..10u32).map(|i| delayed(mark_unless_first, (path.clone(), i, crash)));
            let outcomes = parallel.run_results(tasks).unwrap();
            assert!(outcomes[0].is_err() && outcomes[1..].iter().all(Result::is_ok));
            assert_eq!(marked(&dir), 9, "{target}: run_results left tasks out");
        }
    }
}
