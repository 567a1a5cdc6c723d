//! Pools that break the [`Pool`] contract in every way safe code can: none of them may cause
//! undefined behaviour, and none that lets go of its jobs may hang a run. Run under Miri in CI
//! (`cargo +nightly miri test -p parjob-core`), which checks every in-place write, drop and
//! leak these runs make.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::{Error, Job, Pool, RunIter, RunOptions, RunUnordered, delayed, run, submit};

/// A pool whose `submit` does whatever `behaviour` says with each job.
struct Misbehaving {
    behaviour: fn(Job),
}

impl Pool for Misbehaving {
    fn workers(&self) -> usize {
        2
    }
    fn submit(&self, job: Job) {
        (self.behaviour)(job);
    }
    fn verbose_name(&self) -> &'static str {
        "Misbehaving"
    }
}

fn pool(behaviour: fn(Job)) -> Arc<dyn Pool> {
    Arc::new(Misbehaving { behaviour })
}

/// An owned result, so that Miri sees a value written twice (a leak) or dropped twice.
fn label(i: u32) -> String {
    format!("task {i}")
}

fn panics_on_three(i: u32) -> String {
    assert!(i != 3, "three");
    label(i)
}

fn labels(
    n: u32,
) -> impl ExactSizeIterator<Item = crate::Delayed<fn(u32) -> String, u32, crate::Whole>> {
    (0..n).map(|i| delayed(label as fn(u32) -> String, i))
}

/// Threads the tests start, joined before each test ends (Miri reports threads left running).
static THREADS: Mutex<Vec<std::thread::JoinHandle<()>>> = Mutex::new(Vec::new());

fn spawn(body: impl FnOnce() + Send + 'static) {
    THREADS.lock().unwrap().push(std::thread::spawn(body));
}

fn join_spawned() {
    let handles: Vec<_> = THREADS.lock().unwrap().drain(..).collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

fn options(batch: usize) -> RunOptions {
    RunOptions {
        batch_size: crate::BatchSize::Fixed(batch),
        ..RunOptions::default()
    }
}

#[test]
fn a_pool_that_drops_its_jobs_fails_the_run_as_cancelled() {
    let err = run(pool(drop), labels(10), &options(3)).unwrap_err();
    assert_eq!(err, Error::cancelled(0));
}

#[test]
fn a_pool_that_drops_its_jobs_ends_every_stream_as_cancelled() {
    let ordered: Vec<_> = RunIter::new(pool(drop), labels(5), &options(2)).collect();
    assert_eq!(
        ordered,
        (0..5).map(|i| Err(Error::cancelled(i))).collect::<Vec<_>>()
    );
    let mut unordered: Vec<_> = RunUnordered::new(pool(drop), labels(5), &options(2)).collect();
    unordered.sort_by_key(|(i, _)| *i);
    let expected: Vec<_> = (0..5).map(|i| (i, Err(Error::cancelled(i)))).collect();
    assert_eq!(unordered, expected);
}

#[test]
fn a_future_whose_job_is_dropped_is_cancelled() {
    let future = submit(&Misbehaving { behaviour: drop }, 4, delayed(label, 4));
    assert_eq!(future.result(), Err(Error::cancelled(4)));
}

#[test]
fn a_job_dropped_after_writing_part_of_its_batch_in_place_drops_those_values_once() {
    fn run_then_drop(mut job: Job) {
        let control = Arc::new(crate::RunControl::new(None));
        job.batch_mut().run_here(&control);
        drop(job);
    }
    let tasks = (0..8u32).map(|i| delayed(panics_on_three as fn(u32) -> String, i));
    let err = run(pool(run_then_drop), tasks, &options(8)).unwrap_err();
    assert!(matches!(err, Error::TaskPanicked { index: 3, .. }), "{err}");
}

#[test]
fn a_batch_run_twice_writes_each_value_once() {
    fn run_twice(mut job: Job) {
        let control = Arc::new(crate::RunControl::new(None));
        job.batch_mut().run_here(&control);
        job.batch_mut().run_here(&control);
        job.complete(Duration::ZERO);
    }
    let out = run(pool(run_twice), labels(9), &options(4)).unwrap();
    assert_eq!(out, (0..9).map(label).collect::<Vec<_>>());
}

#[test]
fn outcomes_past_a_batchs_last_task_are_ignored() {
    fn decode_twice(mut job: Job) {
        let len = job.batch().len();
        let mut frame = Vec::new();
        job.batch().encode_tasks(0..len, &mut frame);
        let entry = job.batch().remote_entry().unwrap();
        let mut outcomes = Vec::new();
        entry(&frame, &mut outcomes, &mut |_| {});
        let doubled = [outcomes.clone(), outcomes].concat();
        assert_eq!(job.batch_mut().decode_outcomes(&doubled), len);
        assert_eq!(job.batch_mut().decode_outcomes(&doubled), 0);
        job.batch_mut().push_failure(Error::cancelled(99));
        assert_eq!(job.batch().outcomes_len(), len);
        job.complete(Duration::ZERO);
    }
    // A `fn` item, not a pointer: only those run through a remote entry.
    let tasks = (0..7).map(|i| delayed(label, i));
    let out = run(pool(decode_twice), tasks, &options(3)).unwrap();
    assert_eq!(out, (0..7).map(label).collect::<Vec<_>>());
}

#[test]
fn random_bytes_as_outcomes_are_errors_not_undefined_behaviour() {
    fn decode_noise(mut job: Job) {
        let noise: Vec<u8> = (0..64u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        job.batch_mut().decode_outcomes(&noise);
        job.batch_mut().decode_outcomes(&[0, 255, 255, 255, 255, 1]);
        job.complete(Duration::ZERO);
    }
    let outcomes: Vec<_> = RunIter::new(pool(decode_noise), labels(4), &options(4)).collect();
    assert_eq!(outcomes.len(), 4);
    assert!(outcomes.iter().all(Result::is_err), "{outcomes:?}");
}

/// Jobs kept by the pool and completed later, from other threads, in reverse order.
#[test]
fn jobs_completed_late_from_other_threads_in_any_order_give_every_value_in_place() {
    static KEPT: Mutex<Vec<Job>> = Mutex::new(Vec::new());
    struct Hoarding;
    impl Pool for Hoarding {
        fn workers(&self) -> usize {
            3
        }
        fn submit(&self, job: Job) {
            let mut kept = KEPT.lock().unwrap();
            kept.push(job);
            if kept.len() == 3 {
                for job in kept.drain(..).rev() {
                    spawn(move || job.run_here());
                }
            }
        }
        fn default_pre_dispatch(&self) -> usize {
            3
        }
        fn verbose_name(&self) -> &'static str {
            "Hoarding"
        }
    }
    let out = run(Arc::new(Hoarding), labels(9), &options(3)).unwrap();
    join_spawned();
    assert_eq!(out, (0..9).map(label).collect::<Vec<_>>());
}

#[test]
fn a_pool_that_panics_in_submit_drops_the_job_and_the_run_unwinds() {
    fn panic_in_submit(job: Job) {
        let _job = job;
        panic!("the pool broke");
    }
    let outcome = std::panic::catch_unwind(|| run(pool(panic_in_submit), labels(5), &options(2)));
    assert!(outcome.is_err());
}

#[test]
fn a_job_completed_on_another_thread_after_the_consumer_left_is_harmless() {
    static SENT: AtomicUsize = AtomicUsize::new(0);
    fn late(job: Job) {
        SENT.fetch_add(1, Ordering::SeqCst);
        spawn(move || {
            std::thread::sleep(Duration::from_millis(5));
            job.run_here();
        });
    }
    let mut iter = RunIter::new(pool(late), labels(50), &options(5));
    assert_eq!(iter.next(), Some(Ok(label(0))));
    drop(iter);
    join_spawned();
    assert!(
        SENT.load(Ordering::SeqCst) < 50,
        "the run went on after its consumer left"
    );
}

/// A panic payload whose own `Drop` panics.
struct Grenade;

impl Drop for Grenade {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            panic!("the payload's drop panicked too");
        }
    }
}

fn throws_grenade(i: u32) -> String {
    if i == 2 {
        std::panic::panic_any(Grenade);
    }
    label(i)
}

#[test]
fn a_panic_whose_payload_panics_when_dropped_is_still_task_panicked() {
    let tasks = (0..5u32).map(|i| delayed(throws_grenade, i));
    let err = run(pool(Job::run_here), tasks, &options(5)).unwrap_err();
    assert!(matches!(err, Error::TaskPanicked { index: 2, .. }), "{err}");
    let tasks = (0..5u32).map(|i| delayed(throws_grenade, i));
    let outcomes: Vec<_> = RunIter::new(pool(Job::run_here), tasks, &options(5)).collect();
    assert_eq!(outcomes.iter().filter(|o| o.is_err()).count(), 1);
}

#[test]
fn a_batch_partly_decoded_then_run_here_keeps_every_value_in_its_place() {
    fn decode_two_then_run(mut job: Job) {
        let mut frame = Vec::new();
        job.batch().encode_tasks(0..2, &mut frame);
        let entry = job.batch().remote_entry().unwrap();
        let mut outcomes = Vec::new();
        entry(&frame, &mut outcomes, &mut |_| {});
        assert_eq!(job.batch_mut().decode_outcomes(&outcomes), 2);
        job.run_here();
    }
    let tasks = (0..8).map(|i| delayed(label, i));
    let out = run(pool(decode_two_then_run), tasks, &options(4)).unwrap();
    assert_eq!(out, (0..8).map(label).collect::<Vec<_>>());
}

/// `enforces_timeout` answers differently from one call to the next: the dispatcher must ask
/// once, or a batch could be both written in place and abandoned (then written after `run`
/// freed its output).
#[test]
fn a_pool_whose_timeout_answer_changes_cannot_make_a_batch_write_after_run() {
    struct Fickle(AtomicUsize);
    impl Pool for Fickle {
        fn workers(&self) -> usize {
            1
        }
        fn submit(&self, job: Job) {
            spawn(move || job.run_here());
        }
        fn enforces_timeout(&self) -> bool {
            self.0.fetch_add(1, Ordering::SeqCst) % 2 == 1
        }
        fn verbose_name(&self) -> &'static str {
            "Fickle"
        }
    }
    fn slow(i: u32) -> String {
        std::thread::sleep(Duration::from_millis(50));
        label(i)
    }
    for start in 0..2 {
        let options = RunOptions {
            timeout: Some(Duration::from_millis(1)),
            ..options(1)
        };
        let tasks = (0..2u32).map(|i| delayed(slow, i));
        let _ = run(Arc::new(Fickle(AtomicUsize::new(start))), tasks, &options);
        join_spawned();
    }
}

#[test]
fn a_panic_in_the_users_iterator_drops_the_values_already_written_in_place() {
    fn late(job: Job) {
        spawn(move || job.run_here());
    }
    struct Exploding(u32);
    impl Iterator for Exploding {
        type Item = crate::Delayed<fn(u32) -> String, u32, crate::Whole>;
        fn next(&mut self) -> Option<Self::Item> {
            self.0 += 1;
            assert!(self.0 < 6, "the input broke");
            Some(delayed(label as fn(u32) -> String, self.0))
        }
        fn size_hint(&self) -> (usize, Option<usize>) {
            (10, Some(10))
        }
    }
    let outcome = std::panic::catch_unwind(|| run(pool(late), Exploding(0), &options(2)));
    join_spawned();
    assert!(outcome.is_err());
}

/// A result whose `Serialize` panics, and an argument whose `Deserialize` panics, in the worker:
/// each is that task's `Codec` error, not the end of the worker.
#[test]
fn serde_panics_on_the_worker_side_are_the_tasks_codec_errors() {
    #[derive(Debug)]
    struct Touchy(u32);
    impl serde::Serialize for Touchy {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            assert!(self.0 != 3, "three cannot be written");
            s.serialize_u32(self.0)
        }
    }
    impl<'de> serde::Deserialize<'de> for Touchy {
        fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            let n = u32::deserialize(d)?;
            assert!(n != 5, "five cannot be read");
            Ok(Touchy(n))
        }
    }
    fn make(i: u32) -> Touchy {
        Touchy(i)
    }
    fn unwrap(t: Touchy) -> u32 {
        t.0
    }
    fn remotely(mut job: Job) {
        let len = job.batch().len();
        let mut frame = Vec::new();
        job.batch().encode_tasks(0..len, &mut frame);
        let entry = job.batch().remote_entry().unwrap();
        let mut outcomes = Vec::new();
        entry(&frame, &mut outcomes, &mut |_| {});
        job.batch_mut().decode_outcomes(&outcomes);
        job.complete(Duration::ZERO);
    }
    // (Five is not made: its result would fail to decode in the driver, which is the
    // supervisor's to catch, not the worker's.)
    let made: Vec<_> = RunIter::new(
        pool(remotely),
        (0..5).map(|i| delayed(make, i)),
        &options(5),
    )
    .collect();
    let failed: Vec<usize> = (0..5).filter(|&i| made[i].is_err()).collect();
    assert_eq!(failed, [3], "{made:?}");
    assert!(
        made[3]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("Serialize impl panicked")
    );
    // (Three is not sent: it would fail to encode in the driver.)
    let read: Vec<_> = RunIter::new(
        pool(remotely),
        [0, 1, 2, 4, 5, 6].map(|i| delayed(unwrap, Touchy(i))),
        &options(6),
    )
    .collect();
    let failed: Vec<usize> = (0..6).filter(|&i| read[i].is_err()).collect();
    assert_eq!(failed, [4], "{read:?}");
    assert!(
        read[4]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("Deserialize impl panicked")
    );
}
