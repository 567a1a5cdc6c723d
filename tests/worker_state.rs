//! Initializers and per-worker state, the same on every backend: `.initializer(f)` runs once
//! per worker before its tasks, `set_worker_state` / `with_worker_state` give each worker its
//! own state, and a panicking initializer fails that worker's tasks.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use parjob::{Backend, Error, Executor, Parallel, delayed, set_worker_state, with_worker_state};

/// Every built-in backend: a pool of one's own runs its own setup.
const BACKENDS: [Backend; 3] = [Backend::Sequential, Backend::Threading, Backend::Process];

/// Counts initializer calls in this process (a worker process has its own count).
static INITS: AtomicUsize = AtomicUsize::new(0);

/// One worker's state: which initializer call made it, and how many tasks used it.
struct PerWorker {
    made_by: String,
    tasks: u32,
}

fn set_up_worker() {
    let call = INITS.fetch_add(1, Ordering::SeqCst);
    set_worker_state(PerWorker {
        made_by: format!("{}-{call}", std::process::id()),
        tasks: 0,
    });
}

/// Which initializer call made this worker's state, and how many tasks it has seen so far.
fn use_state(_: u32) -> Result<(String, u32), String> {
    with_worker_state(|w: &mut PerWorker| {
        w.tasks += 1;
        (w.made_by.clone(), w.tasks)
    })
    .map_err(|e| e.to_string())
}

#[test]
fn the_initializer_runs_once_per_worker_and_its_state_lasts_on_every_backend() {
    for backend in BACKENDS {
        let parallel = Parallel::new(2).backend(backend).initializer(set_up_worker);
        let mut seen: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for round in 0..2 {
            let out = parallel
                .run((0..40u32).map(|i| delayed(use_state, i)))
                .unwrap_or_else(|e| panic!("{backend}, run {round}: {e}"));
            for outcome in out {
                let (made_by, count) = outcome.unwrap_or_else(|e| panic!("{backend}: {e}"));
                seen.entry(made_by).or_default().push(count);
            }
        }
        let workers = if backend == Backend::Sequential { 1 } else { 2 };
        assert!(
            (1..=workers).contains(&seen.len()),
            "{backend}: {} initializer calls for {workers} workers: {seen:?}",
            seen.len()
        );
        // Each worker's state counted its own tasks, across both runs: it was made once.
        for (made_by, mut counts) in seen {
            counts.sort_unstable();
            let expected: Vec<u32> = (1..=counts.len() as u32).collect();
            assert_eq!(counts, expected, "{backend}: state {made_by}");
        }
    }
}

#[test]
fn without_an_initializer_a_task_is_told_there_is_no_state_on_every_backend() {
    for backend in BACKENDS {
        let out = Parallel::new(2)
            .backend(backend)
            .run((0..3u32).map(|i| delayed(use_state, i)))
            .unwrap();
        for outcome in out {
            let error = outcome.expect_err("no initializer set a state");
            assert!(
                error.contains("PerWorker") && error.contains("no initializer set one"),
                "{backend}: {error}"
            );
        }
    }
}

fn panicking_initializer() {
    panic!("cannot load the model");
}

#[test]
fn a_panicking_initializer_fails_the_run_with_its_message_on_every_backend() {
    for backend in BACKENDS {
        let error = Parallel::new(2)
            .backend(backend)
            .initializer(panicking_initializer)
            .run((0..5u32).map(|i| delayed(use_state, i)))
            .unwrap_err();
        assert!(matches!(error, Error::Worker { .. }), "{backend}: {error}");
        let text = error.to_string();
        assert!(
            text.contains("initializer") && text.contains("cannot load the model"),
            "{backend}: {text}"
        );
    }
}

struct Greeting(String);

fn set_greeting(word: String) {
    set_worker_state(Greeting(word));
}

fn greet(name: String) -> String {
    with_worker_state(|g: &mut Greeting| format!("{} {name}", g.0)).unwrap()
}

#[test]
fn initializer_arguments_reach_every_worker_on_every_backend() {
    for backend in BACKENDS {
        let out = Parallel::new(3)
            .backend(backend)
            .batch_size(parjob::BatchSize::Fixed(1))
            .initializer_with(set_greeting, "hello".to_string())
            .run(["ann", "bob", "cy", "di"].map(|n| delayed(greet, n.to_string())))
            .unwrap();
        assert_eq!(
            out,
            ["hello ann", "hello bob", "hello cy", "hello di"],
            "{backend}"
        );
    }
}

/// Greets with the word it was given, after checking it is not empty.
fn set_checked_greeting(word: String) {
    assert!(!word.is_empty(), "an empty greeting");
    set_worker_state(Greeting(word));
}

fn crash_once(i: u32) -> String {
    if i == 1 {
        std::process::abort();
    }
    greet(i.to_string())
}

#[test]
fn a_replaced_worker_process_runs_the_initializer_with_its_arguments_again() {
    let results: Vec<_> = Parallel::new(1)
        .backend(Backend::Process)
        .batch_size(parjob::BatchSize::Fixed(1))
        .initializer_with(set_checked_greeting, "hi".to_string())
        .run_iter((0..3u32).map(|i| delayed(crash_once, i)))
        .collect();
    assert_eq!(results[0].as_deref().ok(), Some("hi 0"));
    assert!(
        matches!(results[1], Err(Error::WorkerCrashed { .. })),
        "{results:?}"
    );
    assert_eq!(
        results[2].as_deref().ok(),
        Some("hi 2"),
        "the replacement got the arguments"
    );
}

#[test]
fn an_initializer_that_panics_on_its_arguments_names_them_on_every_backend() {
    for backend in BACKENDS {
        let error = Parallel::new(2)
            .backend(backend)
            .initializer_with(set_checked_greeting, String::new())
            .run([delayed(greet, "ann".to_string())])
            .unwrap_err();
        let text = error.to_string();
        assert!(text.contains("an empty greeting"), "{backend}: {text}");
    }
}

#[test]
fn an_executor_runs_its_initializer_on_every_backend() {
    for backend in BACKENDS {
        let executor = Executor::new(2).backend(backend).initializer(set_up_worker);
        let future = executor.submit(delayed(use_state, 0));
        let (_, count) = future
            .result()
            .unwrap()
            .unwrap_or_else(|e| panic!("{backend}: {e}"));
        assert_eq!(count, 1, "{backend}");
    }
}

fn asks_for_the_wrong_type(_: u32) -> String {
    with_worker_state(|_: &mut Greeting| ())
        .unwrap_err()
        .to_string()
}

#[test]
fn a_state_of_another_type_is_named_in_the_error() {
    let out = Parallel::new(1)
        .backend(Backend::Threading)
        .initializer(set_up_worker)
        .run([delayed(asks_for_the_wrong_type, 0)])
        .unwrap();
    assert!(
        out[0].contains("Greeting") && out[0].contains("PerWorker"),
        "{}",
        out[0]
    );
}

fn panics_holding_the_state(_: u32) -> u32 {
    with_worker_state(|w: &mut PerWorker| {
        w.tasks += 100;
        panic!("a task that fails midway");
    })
    .unwrap()
}

#[test]
fn a_task_that_panics_while_using_the_state_leaves_it_to_the_next_task() {
    let parallel = Parallel::new(1)
        .backend(Backend::Threading)
        .initializer(set_up_worker);
    assert!(
        parallel
            .run([delayed(panics_holding_the_state, 0)])
            .is_err()
    );
    let out = parallel.run([delayed(use_state, 0)]).unwrap();
    assert_eq!(out[0].as_ref().map(|(_, n)| *n), Ok(101));
}
