//! `Parallel::run_local`: tasks that borrow local data and return any `Send` value, on the
//! threading and sequential backends; a clear error elsewhere.

use std::sync::Arc;

use parjob::{Backend, Error, Parallel, delayed, set_worker_state, with_worker_state};
use parjob_tests::Target;

const LOCAL: [Backend; 2] = [Backend::Sequential, Backend::Threading];

fn total(chunk: &[u64]) -> u64 {
    chunk.iter().sum()
}

#[test]
fn delayed_calls_over_a_borrowed_slice_run_and_come_back_in_order() {
    let data: Vec<u64> = (1..=10_000).collect();
    for backend in LOCAL {
        let sums = Parallel::new(4)
            .backend(backend)
            .run_local(data.chunks(100).map(|c| delayed(total, c)))
            .unwrap();
        let expected: Vec<u64> = data.chunks(100).map(total).collect();
        assert_eq!(sums, expected, "{backend}");
    }
}

#[test]
fn closures_may_borrow_and_return_what_is_not_serde() {
    let words = ["ok".to_string(), "bad".to_string(), "fine".to_string()];
    let shared = Arc::new(7u32);
    for backend in LOCAL {
        let out = Parallel::new(2)
            .backend(backend)
            .run_local(words.iter().map(|w| {
                let shared = Arc::clone(&shared);
                move || -> (Result<&str, Box<dyn std::error::Error + Send + Sync>>, Arc<u32>) {
                    let checked = if w == "bad" {
                        Err(format!("{w} is bad").into())
                    } else {
                        Ok(w.as_str())
                    };
                    (checked, shared)
                }
            }))
            .unwrap();
        assert_eq!(out[0].0.as_ref().unwrap(), &"ok", "{backend}");
        assert_eq!(out[1].0.as_ref().unwrap_err().to_string(), "bad is bad");
        assert_eq!(*out[2].1, 7);
    }
}

#[test]
fn a_task_that_panics_is_the_error_and_every_task_has_ended_when_it_returns() {
    let data: Vec<u64> = (0..1000).collect();
    for backend in LOCAL {
        let error = Parallel::new(3)
            .backend(backend)
            .run_local(data.iter().map(|&x| {
                move || {
                    assert!(x != 500, "no 500 please");
                    x
                }
            }))
            .unwrap_err();
        match error {
            Error::TaskPanicked { index, message, .. } => {
                assert_eq!(index, 500, "{backend}");
                assert!(message.contains("no 500 please"), "{message}");
            }
            other => panic!("{backend}: {other}"),
        }
    }
}

#[test]
fn a_panicking_input_iterator_unwinds_after_the_running_tasks_end() {
    let data: Vec<u64> = (0..100).collect();
    let parallel = Parallel::new(2).backend(Backend::Threading);
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        parallel.run_local(data.iter().map(|x| {
            assert!(*x < 50, "the input ran out of luck");
            move || {
                std::thread::sleep(std::time::Duration::from_micros(200));
                *x
            }
        }))
    }));
    assert!(caught.is_err());
    // The pool is still usable.
    assert_eq!(
        parallel
            .run_local(data.chunks(10).map(|c| delayed(total, c)))
            .unwrap()[0],
        45
    );
}

#[test]
fn run_local_on_processes_or_a_custom_pool_is_a_clear_error() {
    let data = [1u64, 2, 3];
    for target in [Target::Backend(Backend::Process), Target::CustomPool] {
        let error = target
            .parallel(2)
            .run_local(data.chunks(1).map(|c| delayed(total, c)))
            .unwrap_err();
        assert!(
            matches!(error, Error::InvalidConfig(_)),
            "{target}: {error}"
        );
        let text = error.to_string();
        assert!(
            text.contains("run_local") && text.contains("threading"),
            "{text}"
        );
    }
}

struct Offset(u64);

fn set_offset() {
    set_worker_state(Offset(1000));
}

fn offset_total(chunk: &[u64]) -> u64 {
    with_worker_state(|o: &mut Offset| o.0).unwrap() + total(chunk)
}

#[test]
fn local_tasks_reach_their_workers_state() {
    let data: Vec<u64> = (0..10).collect();
    for backend in LOCAL {
        let out = Parallel::new(2)
            .backend(backend)
            .initializer(set_offset)
            .run_local(data.chunks(5).map(|c| delayed(offset_total, c)))
            .unwrap();
        assert_eq!(out, [1010, 1035], "{backend}");
    }
}
