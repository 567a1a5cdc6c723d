use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parjob::{Backend, BatchSize, Error, Parallel, SharedSlice, delayed, worker_info};
use parjob_tests::{
    CHILD_LIMIT, child_test_command, child_test_command_of, killed_at_its_limit, output_within,
    output_within_from, pipe, run_child_test, wait_within,
};
use serde::de::Error as _;
use serde::ser::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

// This test binary serves as its own worker executable.
parjob::enable_test_support!();

fn processes(n_jobs: i32) -> Parallel {
    Parallel::new(n_jobs).backend(Backend::Process)
}

fn square(x: u64) -> u64 {
    x * x
}

fn jittery(i: u64) -> u64 {
    let micros = i.wrapping_mul(2_654_435_761) % 500;
    std::thread::sleep(Duration::from_micros(micros));
    i
}

fn mix(i: u64) -> (u64, String) {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15), format!("#{i}"))
}

fn my_pid(_: u32) -> u32 {
    std::thread::sleep(Duration::from_millis(1));
    std::process::id()
}

// ---------------------------------------------------------------- ordinary behaviour

#[test]
fn results_equal_threadings_in_input_order() {
    let tasks = || (0..20_000u64).map(|i| delayed(mix, i));
    let threads = Parallel::new(2)
        .backend(Backend::Threading)
        .run(tasks())
        .unwrap();
    let procs = processes(2).run(tasks()).unwrap();
    assert_eq!(procs, threads);
}

#[test]
fn random_durations_keep_input_order_in_run_and_run_iter() {
    let parallel = processes(2).batch_size(BatchSize::Fixed(3));
    let out = parallel
        .run((0..200u64).map(|i| delayed(jittery, i)))
        .unwrap();
    assert_eq!(out, (0..200).collect::<Vec<_>>());
    let out: Vec<u64> = parallel
        .run_iter((0..200u64).map(|i| delayed(jittery, i)))
        .map(Result::unwrap)
        .collect();
    assert_eq!(out, (0..200).collect::<Vec<_>>());
}

#[test]
fn run_unordered_yields_every_index_once() {
    let mut seen: Vec<(usize, u64)> = processes(2)
        .run_unordered((0..500u64).map(|i| delayed(square, i)))
        .map(|(i, r)| (i, r.unwrap()))
        .collect();
    seen.sort_unstable();
    assert_eq!(seen.len(), 500);
    for (i, (index, value)) in seen.into_iter().enumerate() {
        assert_eq!((index, value), (i, (i * i) as u64));
    }
}

#[test]
fn an_endless_input_is_pulled_lazily() {
    let first: Vec<u64> = processes(2)
        .run_iter((0u64..).map(|i| delayed(square, i)))
        .take(1000)
        .map(Result::unwrap)
        .collect();
    assert_eq!(first.len(), 1000);
    assert_eq!(first[999], 999 * 999);
}

#[test]
fn tasks_run_in_worker_processes_that_know_their_index() {
    fn info(_: u32) -> (Option<String>, Option<usize>, u32) {
        let info = worker_info();
        (info.backend.map(|b| b.to_string()), info.worker, info.pid)
    }
    let out = processes(2)
        .run((0..20u32).map(|i| delayed(info, i)))
        .unwrap();
    for (backend, worker, pid) in out {
        assert_eq!(backend.as_deref(), Some("process"));
        assert!(worker.is_some_and(|w| w < 2), "{worker:?}");
        assert_ne!(pid, std::process::id());
    }
}

#[test]
fn the_pool_is_kept_across_runs() {
    let parallel = processes(2);
    let first: HashSet<u32> = parallel
        .run((0..40u32).map(|i| delayed(my_pid, i)))
        .unwrap()
        .into_iter()
        .collect();
    let second: HashSet<u32> = parallel
        .run((0..40u32).map(|i| delayed(my_pid, i)))
        .unwrap()
        .into_iter()
        .collect();
    assert!(first.len() <= 2 && second.len() <= 2);
    assert!(second.is_subset(&first) || first.is_subset(&second));
    let all: HashSet<u32> = first.union(&second).copied().collect();
    assert!(all.len() <= 2, "new workers were started: {all:?}");
}

#[test]
fn a_function_pointer_cannot_be_sent_to_a_process() {
    let f: fn(u64) -> u64 = square;
    let err = processes(2)
        .run((0..3u64).map(|i| delayed(f, i)))
        .unwrap_err();
    assert!(matches!(err, Error::InvalidConfig(_)), "{err:?}");
    assert!(err.to_string().contains("plain `fn` item"), "{err}");
}

#[test]
fn big_inputs_travel_through_shared_memory() {
    fn sum(v: Vec<f64>) -> f64 {
        v.iter().sum()
    }
    let halves: Vec<Vec<f64>> = (0..2)
        .map(|h| (0..2_000_000).map(|i| f64::from(i + h)).collect())
        .collect();
    let expected: Vec<f64> = halves.iter().map(|v| v.iter().sum()).collect();
    let out = processes(2)
        .run(halves.into_iter().map(|v| delayed(sum, v)))
        .unwrap();
    assert_eq!(out, expected);
}

/// A [`Payload`] with its floating-point numbers as bits.
type PayloadBits = (
    String,
    Vec<u64>,
    Vec<u8>,
    Vec<(u16, Vec<u32>)>,
    Option<Vec<i64>>,
    Vec<u32>,
);

/// A value mixing what the codec copies whole (vectors of numbers) with what it does not.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Payload {
    label: String,
    values: Vec<f64>,
    bytes: Vec<u8>,
    nested: Vec<(u16, Vec<f32>)>,
    maybe: Option<Vec<i64>>,
    boxed: Box<[u32]>,
}

impl Payload {
    /// Every field as bits, so that NaNs compare by their payload.
    fn bits(&self) -> PayloadBits {
        (
            self.label.clone(),
            self.values.iter().map(|v| v.to_bits()).collect(),
            self.bytes.clone(),
            self.nested
                .iter()
                .map(|(k, v)| (*k, v.iter().map(|x| x.to_bits()).collect()))
                .collect(),
            self.maybe.clone(),
            self.boxed.to_vec(),
        )
    }

    /// A payload of about `n` values, NaNs and odd lengths in it.
    fn of(n: usize) -> Payload {
        let mut values: Vec<f64> = (0..n).map(|i| i as f64 * 0.5 - 3.0).collect();
        for (i, nan) in [f64::NAN, -f64::NAN, f64::from_bits(0x7ff0_0000_0000_0001)]
            .into_iter()
            .enumerate()
        {
            if let Some(v) = values.get_mut(i * 7) {
                *v = nan;
            }
        }
        Payload {
            label: format!("{n} values"),
            bytes: (0..n * 3 + 5).map(|i| i as u8).collect(),
            nested: vec![
                (1, vec![f32::NAN; n % 3]),
                (2, vec![]),
                (3, vec![1.5; n / 2 + 1]),
            ],
            maybe: (n % 2 == 1).then(|| (0..n as i64).collect()),
            boxed: (0..n as u32).rev().collect(),
            values,
        }
    }
}

fn echo(payload: Payload) -> Payload {
    payload
}

fn echo_values(values: Vec<f64>) -> Vec<f64> {
    values
}

#[test]
fn payloads_of_every_size_come_back_from_workers_bit_for_bit() {
    // Inline frames and arena frames (over max_nbytes: the 3 MB ones, and every one at 64), both
    // ways.
    let sizes = [0usize, 1, 2, 3, 7, 9, 1000, 400_001];
    let payloads: Vec<Payload> = sizes.iter().map(|&n| Payload::of(n)).collect();
    for parallel in [processes(2), processes(2).max_nbytes(64)] {
        let out = parallel
            .run(payloads.iter().map(|p| delayed(echo, p.clone())))
            .unwrap();
        assert_eq!(out.len(), payloads.len());
        for (back, sent) in out.iter().zip(&payloads) {
            assert_eq!(back.bits(), sent.bits(), "{}", sent.label);
        }
    }
}

#[test]
fn a_big_vector_goes_to_a_worker_and_back_whole() {
    let values: Vec<f64> = (0..6_000_001u64)
        .map(|i| f64::from_bits(i.wrapping_mul(0x9e37_79b9_7f4a_7c15)))
        .collect();
    let parallel = processes(2);
    for _ in 0..2 {
        let out = parallel
            .run([
                delayed(echo_values, values.clone()),
                delayed(echo_values, values[1..].to_vec()),
            ])
            .unwrap();
        let bits = |v: &[f64]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&out[0]), bits(&values));
        assert_eq!(bits(&out[1]), bits(&values[1..]));
    }
}

/// The line of this process's memory map that holds `address`.
fn mapping_of(address: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines()
        .find(|line| {
            let range = line.split(' ').next().unwrap_or("");
            let (lo, hi) = range.split_once('-').unwrap_or(("0", "0"));
            let lo = usize::from_str_radix(lo, 16).unwrap_or(0);
            let hi = usize::from_str_radix(hi, 16).unwrap_or(0);
            (lo..hi).contains(&address)
        })
        .map(str::to_string)
}

/// The sum of the part, the process that read it, and the mapping its values were read from.
fn sum_in_place(part: SharedSlice<f64>) -> (f64, u32, String) {
    let mapping = mapping_of(part.as_ptr() as usize).unwrap_or_default();
    (part.iter().sum(), std::process::id(), mapping)
}

fn still_mapped(name: String) -> bool {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    maps.contains(&name)
}

#[test]
fn shared_slices_are_read_in_place_and_idle_workers_unmap_them_when_the_driver_drops_them() {
    let data: SharedSlice<f64> = (0..3_000_000).map(f64::from).collect();
    let parts: Vec<SharedSlice<f64>> = data.chunks(1_000_000).collect();
    let expected: Vec<f64> = parts.iter().map(|p| p.iter().sum()).collect();
    let parallel = processes(2).max_nbytes(1024);
    let mut names = HashSet::new();
    let mut pids = HashSet::new();
    for _ in 0..3 {
        let out = parallel
            .run(parts.iter().map(|p| delayed(sum_in_place, p.clone())))
            .unwrap();
        for (i, (sum, pid, mapping)) in out.into_iter().enumerate() {
            assert_eq!(sum, expected[i]);
            assert_ne!(pid, std::process::id());
            assert!(
                mapping.contains("/memfd:") && mapping.contains("ipc-channel-shared-memory"),
                "task {i} read its values from {mapping:?}, not from the shared segment"
            );
            names.insert(mapping.rsplit(' ').nth(1).unwrap_or("").to_string());
            pids.insert(pid);
        }
    }
    assert_eq!(names.len(), 1, "one segment, every time: {names:?}");
    let name = names.into_iter().next().unwrap();

    drop((data, parts));
    // Idle workers are told at once; nothing else runs on the pool.
    let deadline = Instant::now() + Duration::from_secs(10);
    let still_mapped_in = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(&name))
    };
    while pids.iter().any(still_mapped_in) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let holding: Vec<&u32> = pids.iter().filter(|p| still_mapped_in(p)).collect();
    assert!(
        holding.is_empty(),
        "workers {holding:?} still map {name} 10 s after the driver dropped it"
    );
    let mapped = parallel
        .run((0..4).map(|_| delayed(still_mapped, name.clone())))
        .unwrap();
    assert_eq!(mapped, [false; 4]);
}

#[test]
fn a_replaced_worker_gets_the_shared_segments_again() {
    let data: SharedSlice<f64> = (0..1_000_000).map(f64::from).collect();
    let expected: f64 = data.iter().sum();
    let parallel = processes(1);
    let first = parallel.run([delayed(sum_in_place, data.clone())]).unwrap();
    let crashed = parallel.run([delayed(crash_on_five, (5, Crash::Abort))]);
    assert!(
        matches!(crashed, Err(Error::WorkerCrashed { .. })),
        "{crashed:?}"
    );
    let again = parallel.run([delayed(sum_in_place, data.clone())]).unwrap();
    assert_eq!((first[0].0, again[0].0), (expected, expected));
    assert_ne!(first[0].1, again[0].1, "another worker process");
}

#[test]
fn shared_slices_give_the_same_results_on_every_backend_and_come_back_as_values() {
    fn scaled(part: SharedSlice<u32>, by: u32) -> SharedSlice<u32> {
        part.iter().map(|x| x * by).collect()
    }
    let data = SharedSlice::from_slice(&(0..10_000u32).collect::<Vec<_>>());
    let run = |backend: Backend| {
        Parallel::new(2)
            .backend(backend)
            .run(data.chunks(3_000).map(|p| delayed(scaled, (p, 3))))
            .unwrap()
    };
    let sequential = run(Backend::Sequential);
    assert_eq!(sequential.len(), 4);
    assert_eq!(sequential[3].len(), 1_000);
    assert_eq!(sequential[1][0], 9_000);
    assert_eq!(run(Backend::Threading), sequential);
    assert_eq!(run(Backend::Process), sequential);
}

#[test]
fn every_frame_may_travel_through_shared_memory() {
    fn echo(v: Vec<u8>) -> Vec<u8> {
        v
    }
    let mut inputs: Vec<Vec<u8>> = (0..100u8).map(|i| vec![i; usize::from(i) * 10]).collect();
    let parallel = processes(2).max_nbytes(0);
    // Growing frames need new shared segments; shrinking ones reuse them.
    for _ in 0..2 {
        let out = parallel
            .run(inputs.clone().into_iter().map(|v| delayed(echo, v)))
            .unwrap();
        assert_eq!(out, inputs);
        inputs.reverse();
    }
}

#[test]
fn nested_parallel_in_a_worker_defaults_to_sequential() {
    fn nested(n: u64) -> (String, u64) {
        let inner = Parallel::new(2);
        let backend = inner.effective_backend().unwrap().to_string();
        let sum = inner
            .run((0..n).map(|i| delayed(square, i)))
            .unwrap()
            .into_iter()
            .sum();
        (backend, sum)
    }
    let out = processes(2)
        .run((1..5u64).map(|n| delayed(nested, n)))
        .unwrap();
    assert_eq!(
        out,
        [(1, 0), (2, 1), (3, 5), (4, 14)].map(|(_, s)| ("sequential".to_string(), s))
    );
}

#[test]
fn workers_get_a_thread_budget_for_rayon_and_openmp() {
    fn budget(_: u32) -> (Option<String>, Option<String>) {
        (
            std::env::var("RAYON_NUM_THREADS").ok(),
            std::env::var("OMP_NUM_THREADS").ok(),
        )
    }
    let out = processes(2)
        .run((0..2u32).map(|i| delayed(budget, i)))
        .unwrap();
    let expected = (parjob::cpu_count() / 2).max(1).to_string();
    for (rayon, omp) in out {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            assert_eq!(rayon.as_deref(), Some(expected.as_str()));
        }
        if std::env::var_os("OMP_NUM_THREADS").is_none() {
            assert_eq!(omp.as_deref(), Some(expected.as_str()));
        }
    }
}

// ---------------------------------------------------------------- failures in tasks

fn panics_on_seven(i: u32) -> u32 {
    if i == 7 {
        panic!("seven is unlucky");
    }
    i
}

fn pid_or_panic(i: u32) -> u32 {
    if i == 0 {
        panic!("first task panics");
    }
    std::process::id()
}

#[test]
fn a_panic_becomes_task_panicked_and_the_worker_lives_on() {
    let parallel = processes(1);
    let before = parallel.run([delayed(my_pid, 0)]).unwrap();
    let err = parallel
        .run((0..20u32).map(|i| delayed(panics_on_seven, i)))
        .unwrap_err();
    match &err {
        Error::TaskPanicked { index, message, .. } => {
            assert_eq!(*index, 7);
            assert!(message.contains("seven is unlucky"), "{message}");
            assert!(message.contains("tests/process.rs"), "{message}");
        }
        other => panic!("expected TaskPanicked, got {other:?}"),
    }
    let results: Vec<_> = parallel
        .run_iter((0..3u32).map(|i| delayed(pid_or_panic, i)))
        .collect();
    assert!(matches!(
        results[0],
        Err(Error::TaskPanicked { index: 0, .. })
    ));
    assert_eq!(results[1], Ok(before[0]), "the worker was replaced");
    assert_eq!(results[2], Ok(before[0]));
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Crash {
    Abort,
    Segfault,
    Exit3,
    Sigkill,
}

fn crash_on_five((i, how): (u32, Crash)) -> u32 {
    if i == 5 {
        match how {
            Crash::Abort => std::process::abort(),
            // SAFETY: none: writing to an unmapped address to crash the worker on purpose.
            Crash::Segfault => unsafe {
                std::ptr::write_volatile(std::ptr::dangling_mut::<u64>(), 1)
            },
            Crash::Exit3 => std::process::exit(3),
            // SAFETY: signalling our own process.
            Crash::Sigkill => unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            },
        }
    }
    i
}

impl Serialize for Crash {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        (*self as u8).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Crash {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Ok(match u8::deserialize(d)? {
            0 => Crash::Abort,
            1 => Crash::Segfault,
            2 => Crash::Exit3,
            _ => Crash::Sigkill,
        })
    }
}

/// Recurses `depth` times with a 4 KiB frame each: deep enough, it overflows the worker's
/// stack (the Rust runtime then says so on stderr and aborts).
fn recurse(depth: u64) -> u64 {
    let frame = std::hint::black_box([depth as u8; 4096]);
    if depth == 0 {
        return u64::from(frame[0]);
    }
    recurse(depth - 1) + u64::from(std::hint::black_box(frame)[100])
}

/// A stack overflow in a task is a crash like an abort, and the error says it was a stack
/// overflow: what the worker's stderr said as it died (the Rust runtime's words), not only
/// "SIGABRT". A crash that says nothing of the kind has no last words.
#[test]
fn a_stack_overflow_in_a_task_is_named_in_the_crash_error() {
    let parallel = processes(1);
    let err = parallel
        .run([1u64, 10_000_000].map(|depth| delayed(recurse, depth)))
        .unwrap_err();
    let Error::WorkerCrashed {
        index,
        status,
        last_words,
        ..
    } = &err
    else {
        panic!("expected WorkerCrashed, got {err:?}");
    };
    assert_eq!(
        (*index, status.to_string()),
        (1, "killed by signal 6 (SIGABRT)".into())
    );
    let said = last_words.as_deref().unwrap_or_default();
    assert!(said.contains("has overflowed its stack"), "{err}");
    // (In this test binary a worker runs its tasks on the harness's thread, not `main`.)
    let text = err.to_string();
    assert!(
        text.contains("(its last words on stderr: thread '")
            && text.contains("has overflowed its stack"),
        "{err}"
    );
    // The pool goes on, and a plain abort has no last words.
    assert_eq!(parallel.run([delayed(recurse, 3)]).unwrap(), [3 + 2 + 1]);
    let err = parallel
        .run((0..8u32).map(|i| delayed(crash_on_five, (i, Crash::Abort))))
        .unwrap_err();
    assert!(
        matches!(
            &err,
            Error::WorkerCrashed {
                last_words: None,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn a_crashing_worker_is_reported_replaced_and_the_pool_goes_on() {
    for (how, status) in [
        (Crash::Abort, "killed by signal 6 (SIGABRT)"),
        (Crash::Segfault, "killed by signal 11 (SIGSEGV)"),
        (Crash::Exit3, "exit status 3"),
        (Crash::Sigkill, "killed by signal 9 (SIGKILL)"),
    ] {
        let parallel = processes(2).batch_size(BatchSize::Fixed(4));
        let err = parallel
            .run((0..20u32).map(|i| delayed(crash_on_five, (i, how))))
            .unwrap_err();
        match &err {
            Error::WorkerCrashed {
                index,
                worker,
                pid,
                status: s,
                ..
            } => {
                assert_eq!(*index, 5, "{how:?}");
                assert!(*worker < 2);
                assert_ne!(*pid, std::process::id());
                assert_eq!(s.to_string(), status, "{how:?}");
            }
            other => panic!("{how:?}: expected WorkerCrashed, got {other:?}"),
        }
        let text = err.to_string();
        assert!(text.starts_with("task 5: worker "), "{text}");
        assert!(text.contains("pid") && text.contains(status), "{text}");
        let out = parallel
            .run((0..20u32).map(|i| delayed(panics_on_seven, i + 10)))
            .unwrap();
        assert_eq!(out, (10..30).collect::<Vec<_>>(), "{how:?}");
    }
}

#[test]
fn a_crash_loses_no_other_task_of_its_batch() {
    let results: Vec<_> = processes(2)
        .batch_size(BatchSize::Fixed(8))
        .run_iter((0..24u32).map(|i| delayed(crash_on_five, (i, Crash::Abort))))
        .collect();
    assert_eq!(results.len(), 24);
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Err(Error::WorkerCrashed { index: 5, .. }) => assert_eq!(i, 5),
            Ok(v) => assert_eq!(v as usize, i),
            other => panic!("task {i}: {other:?}"),
        }
    }
}

fn nap(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    ms
}

#[test]
fn a_task_over_its_timeout_has_its_worker_killed_and_replaced() {
    let parallel = processes(2).timeout(Duration::from_millis(200));
    let err = parallel
        .run([1, 5, 60_000, 2].map(|ms| delayed(nap, ms)))
        .unwrap_err();
    assert!(
        killed_at_its_limit(&err, 2, Duration::from_millis(200)),
        "{err:?}"
    );
    assert!(err.to_string().contains("timed out after 200ms"), "{err}");
    assert!(err.to_string().contains("killed"), "{err}");
    assert_eq!(
        parallel.run([1, 2, 3].map(|ms| delayed(nap, ms))).unwrap(),
        [1, 2, 3]
    );
}

#[test]
fn the_timeout_counts_from_the_start_of_each_task_in_its_worker() {
    // Four 150 ms tasks in one batch run 600 ms in one worker, each well under 400 ms.
    let out = processes(1)
        .batch_size(BatchSize::Fixed(4))
        .timeout(Duration::from_millis(400))
        .run([150u64; 4].map(|ms| delayed(nap, ms)))
        .unwrap();
    assert_eq!(out, [150; 4]);
}

// ---------------------------------------------------------------- two frames in flight
//
// One worker and small fixed batches: while the worker runs a batch, its supervisor sends it
// the next one (docs/PROCESS.md, "Two frames in flight"). Each task naps first, so the next
// batch is surely queued on the worker when the one before it ends.

/// Naps 20 ms, then crashes the worker at `crash`; otherwise returns `i`.
fn nap_then_crash_at((i, crash): (u32, u32)) -> u32 {
    std::thread::sleep(Duration::from_millis(20));
    if i == crash {
        std::process::abort();
    }
    i
}

fn check_one_crash(crash: u32, n: u32) {
    let results: Vec<_> = processes(1)
        .batch_size(BatchSize::Fixed(4))
        .run_iter((0..n).map(|i| delayed(nap_then_crash_at, (i, crash))))
        .collect();
    assert_eq!(results.len(), n as usize);
    for (i, result) in results.into_iter().enumerate() {
        match result {
            Err(Error::WorkerCrashed { index, .. }) => {
                assert_eq!(
                    (i, index),
                    (crash as usize, crash as usize),
                    "crash at {crash}"
                )
            }
            Ok(v) => assert_eq!(v as usize, i, "crash at {crash}"),
            other => panic!("crash at {crash}: task {i}: {other:?}"),
        }
    }
}

#[test]
fn a_crash_with_a_batch_queued_behind_it_on_the_worker_loses_none_of_that_batch() {
    // Batch 0..4 crashes at 1 while batch 4..8 waits on the same worker: every task of 4..8
    // still returns its own value (sent again to the replacement), and only task 1 is
    // WorkerCrashed.
    check_one_crash(1, 12);
    // The crash in the batch that was sent ahead (4..8), with 8..12 behind it.
    check_one_crash(6, 12);
    // The last task of a batch, the moment its DONE would have gone.
    check_one_crash(3, 8);
}

#[test]
fn a_queued_timed_batch_is_timed_from_its_own_start_in_the_worker() {
    // Batches of two 150 ms tasks, one worker: each batch runs 300 ms, each task well under
    // the 250 ms limit. A batch timed from its sending (while the one before it ran) would
    // be over, or taken for stuck, long before its tasks were.
    let out = processes(1)
        .batch_size(BatchSize::Fixed(2))
        .timeout(Duration::from_millis(250))
        .run([150u64; 6].map(|ms| delayed(nap, ms)))
        .unwrap();
    assert_eq!(out, [150; 6]);
    // And a task over it is still caught, in the third batch.
    let err = processes(1)
        .batch_size(BatchSize::Fixed(2))
        .timeout(Duration::from_millis(250))
        .run([150u64, 150, 150, 150, 150, 60_000].map(|ms| delayed(nap, ms)))
        .unwrap_err();
    assert!(
        killed_at_its_limit(&err, 5, Duration::from_millis(250)),
        "{err:?}"
    );
}

/// 4 KiB derived from `i`: over the small `max_nbytes` below, so every batch's outcomes go
/// back in the worker's result arena.
fn kilobytes_of(i: u32) -> Vec<u32> {
    (0..1024u32)
        .map(|k| i.wrapping_mul(2_654_435_761) ^ k)
        .collect()
}

#[test]
fn outcomes_in_the_result_arena_are_not_overwritten_by_the_batch_sent_behind_them() {
    // Small frames (sent ahead), big outcomes (in the result arena): the batch behind must not
    // write its outcomes where the driver is still reading the ones before.
    let parallel = processes(1)
        .batch_size(BatchSize::Fixed(4))
        .max_nbytes(2048);
    for _ in 0..3 {
        let out = parallel
            .run((0..400u32).map(|i| delayed(kilobytes_of, i)))
            .unwrap();
        for (i, values) in out.iter().enumerate() {
            let expected: Vec<u32> = (0..1024u32)
                .map(|k| (i as u32).wrapping_mul(2_654_435_761) ^ k)
                .collect();
            assert!(*values == expected, "task {i} came back wrong");
        }
    }
}

/// Fails to encode (in the driver as an argument, in the worker as a result).
#[derive(Debug)]
struct Unencodable;

impl Serialize for Unencodable {
    fn serialize<S: Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
        Err(S::Error::custom("Unencodable refuses to be encoded"))
    }
}

impl<'de> Deserialize<'de> for Unencodable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        u8::deserialize(d).map(|_| Unencodable)
    }
}

/// Encodes, but fails to decode.
#[derive(Debug)]
struct Undecodable;

impl Serialize for Undecodable {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        0u8.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Undecodable {
    fn deserialize<D: Deserializer<'de>>(_: D) -> Result<Self, D::Error> {
        Err(D::Error::custom("Undecodable refuses to be decoded"))
    }
}

fn takes_unencodable(_: Unencodable) -> u8 {
    1
}
fn takes_undecodable(_: Undecodable) -> u8 {
    1
}
fn gives_unencodable(_: u8) -> Unencodable {
    Unencodable
}
fn gives_undecodable(_: u8) -> Undecodable {
    Undecodable
}

fn assert_codec(err: Error, action: &str, type_name: &str) {
    match &err {
        Error::Codec {
            index,
            action: a,
            type_name: t,
            ..
        } => {
            assert_eq!(*index, 0);
            assert_eq!(*a, action, "{err}");
            assert!(t.contains(type_name), "{err}");
        }
        other => panic!("expected a codec error, got {other:?}"),
    }
    let text = err.to_string();
    assert!(text.starts_with("task 0: cannot"), "{text}");
    assert!(
        text.contains(type_name) && text.contains("refuses"),
        "{text}"
    );
}

#[test]
fn arguments_and_results_that_fail_to_encode_or_decode_name_task_and_type() {
    let parallel = processes(1);
    let err = parallel
        .run([delayed(takes_unencodable, Unencodable)])
        .unwrap_err();
    assert_codec(err, "encode", "Unencodable");
    let err = parallel
        .run([delayed(takes_undecodable, Undecodable)])
        .unwrap_err();
    assert_codec(err, "decode", "Undecodable");
    let err = parallel.run([delayed(gives_unencodable, 0)]).unwrap_err();
    assert_codec(err, "encode", "Unencodable");
    let err = parallel.run([delayed(gives_undecodable, 0)]).unwrap_err();
    assert_codec(err, "decode", "Undecodable");
    assert_eq!(parallel.run([delayed(square, 3)]).unwrap(), [9]);
}

// ---------------------------------------------------------------- worker lifecycle

static INITIALIZED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn count_initializations() {
    INITIALIZED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
}

fn times_initialized(_: u32) -> u32 {
    INITIALIZED.load(std::sync::atomic::Ordering::SeqCst)
}

#[test]
fn the_initializer_runs_once_in_each_worker() {
    let out = processes(2)
        .initializer(count_initializations)
        .run((0..50u32).map(|i| delayed(times_initialized, i)))
        .unwrap();
    assert!(out.iter().all(|&n| n == 1), "{out:?}");
    assert_eq!(INITIALIZED.load(std::sync::atomic::Ordering::SeqCst), 0);
}

#[test]
fn a_failing_initializer_is_an_error_not_a_hang() {
    fn bad_initializer() {
        panic!("cannot load the model");
    }
    let err = processes(2)
        .initializer(bad_initializer)
        .run((0..5u32).map(|i| delayed(my_pid, i)))
        .unwrap_err();
    assert!(matches!(err, Error::Worker { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains("initializer") && text.contains("cannot load the model"),
        "{text}"
    );
}

#[test]
fn max_tasks_per_worker_recycles_workers() {
    let pids = processes(2)
        .max_tasks_per_worker(3)
        .run((0..30u32).map(|i| delayed(my_pid, i)))
        .unwrap();
    let mut per_pid: HashMap<u32, usize> = HashMap::new();
    for pid in pids {
        *per_pid.entry(pid).or_default() += 1;
    }
    assert!(per_pid.values().all(|&n| n <= 3), "{per_pid:?}");
    assert!(per_pid.len() >= 10, "{per_pid:?}");
}

/// A copy of this test binary with its GNU build-id changed: the same code, another build.
fn other_build() -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let mut bytes = std::fs::read(&exe).unwrap();
    let header = [4, 0, 0, 0, 20, 0, 0, 0, 3, 0, 0, 0, b'G', b'N', b'U', 0];
    let at = bytes
        .windows(header.len())
        .position(|w| w == header)
        .expect("the test binary has a GNU build-id note");
    for b in &mut bytes[at + header.len()..at + header.len() + 20] {
        *b = !*b;
    }
    let path = std::env::temp_dir().join(format!("parjob-other-build-{}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    let mut perms = std::fs::metadata(&path).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
    std::fs::set_permissions(&path, perms).unwrap();
    path
}

#[test]
fn a_worker_of_another_build_is_refused_naming_both_executables() {
    let other = other_build();
    let err = processes(1)
        .worker_exe(&other)
        .run([delayed(square, 3)])
        .unwrap_err();
    let _ = std::fs::remove_file(&other);
    assert!(matches!(err, Error::Worker { .. }), "{err:?}");
    let text = err.to_string();
    let me = std::env::current_exe().unwrap();
    assert!(text.contains("not the same build"), "{text}");
    assert!(text.contains(&other.display().to_string()), "{text}");
    assert!(text.contains(&me.display().to_string()), "{text}");
}

#[test]
fn a_worker_exe_that_never_connects_is_an_error_not_a_hang() {
    let err = processes(1)
        .worker_exe("/bin/true")
        .run([delayed(square, 3)])
        .unwrap_err();
    assert!(matches!(err, Error::Worker { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("ended before the handshake (exit status 0)"),
        "{err}"
    );
    // Such a program never becomes a worker: later pools say so without starting one (each
    // would run the whole program again).
    let again = processes(2)
        .worker_exe("/bin/true")
        .run([delayed(square, 3)])
        .unwrap_err();
    let text = again.to_string();
    assert!(
        text.contains("ended before the handshake (exit status 0)"),
        "{text}"
    );
    assert!(text.contains("no new worker was started"), "{text}");
}

/// A worker copy that reached a run without `init()` exits with status 79 (see
/// `a_worker_copy_without_init_says_so_and_stops_at_its_first_run`): the driver says what that
/// means, and later pools of the program say so without starting another copy. (A script
/// stands in for the copy: this test binary's copies always enter the worker loop.)
#[test]
fn a_worker_copy_that_reached_a_run_without_init_is_named_so_and_never_started_again() {
    let (_dir, script) = parjob_tests::wrapper_script("exit 79");
    let err = processes(1)
        .worker_exe(&script)
        .run([delayed(square, 3)])
        .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(
            "ended before the handshake (exit status 79): it reached a parallel run without \
             calling parjob::init()"
        ),
        "{text}"
    );
    let again = processes(2)
        .worker_exe(&script)
        .run([delayed(square, 3)])
        .unwrap_err()
        .to_string();
    assert!(
        again.contains("no new worker was started: an earlier worker process")
            && again.contains("(exit status 79): it reached a parallel run without"),
        "{again}"
    );
}

/// A `worker_exe` wrapper may run a parjob program of its own (on threads, without
/// `init()`) before it `exec`s the worker: that program, which has the worker's line and
/// variables but is not the driver's child, runs as it likes. (For a while it was taken for a
/// worker copy without `init()` and ended with status 79, which failed the start and, through
/// `set -e`, every later pool of the program.)
#[test]
fn a_program_a_wrapper_runs_before_exec_may_use_parjob_threads() {
    let (_dir, script) = parjob_tests::wrapper_script(
        "set -e\n'{exe}' process::child_threads_run_in_a_wrapper --exact --ignored \
         --test-threads=1 >&2\nexec '{exe}' \"$@\"",
    );
    for _ in 0..2 {
        let out = processes(1)
            .worker_exe(&script)
            .run((0..4u64).map(|i| delayed(square, i)));
        assert_eq!(out.unwrap(), vec![0, 1, 4, 9]);
    }
}

/// Run by the wrapper of the test above, before it `exec`s the worker.
#[test]
#[ignore = "run by a_program_a_wrapper_runs_before_exec_may_use_parjob_threads"]
fn child_threads_run_in_a_wrapper() {
    let out = Parallel::new(2)
        .backend(Backend::Threading)
        .run((0..4u64).map(|i| delayed(square, i)))
        .unwrap();
    assert_eq!(out, vec![0, 1, 4, 9]);
}

// ---------------------------------------------------------------- no orphans, output

/// Pids of this process's children, and whether each is a zombie.
fn children() -> Vec<(u32, bool)> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // Fields after the command name, which is in parentheses and may hold spaces.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if fields.get(1).and_then(|p| p.parse::<u32>().ok()) == Some(me) {
            out.push((pid, fields[0] == "Z"));
        }
    }
    out
}

fn start_two_workers() -> Parallel {
    let parallel = processes(2);
    // On a loaded machine one worker may take a short run alone while the other is still
    // starting: run until both are up (the test failed at load 6 with one child seen).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        parallel
            .run((0..10u32).map(|i| delayed(my_pid, i)))
            .unwrap();
        if children().len() >= 2 || Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(children().len(), 2, "{:?}", children());
    parallel
}

#[test]
fn dropping_the_parallel_leaves_no_child_process() {
    run_child_test("process::child_drop_leaves_no_child", &[]);
}

#[test]
#[ignore = "run by dropping_the_parallel_leaves_no_child_process in a child process"]
fn child_drop_leaves_no_child() {
    drop(start_two_workers());
    assert_eq!(children(), []);
    // After a crash and a timeout too, and after an early return from run_iter.
    let parallel = processes(2).timeout(Duration::from_secs(1));
    assert!(
        parallel
            .run((0..10u32).map(|i| delayed(crash_on_five, (i, Crash::Abort))))
            .is_err()
    );
    assert!(parallel.run([delayed(nap, 60_000)]).is_err());
    let first = parallel
        .run_iter((0..100u64).map(|i| delayed(nap, i % 3)))
        .next();
    assert_eq!(first, Some(Ok(0)));
    drop(parallel);
    assert_eq!(children(), []);
}

#[test]
fn a_worker_killed_for_a_timeout_is_reaped_and_replaced_while_the_pool_is_idle() {
    run_child_test("process::child_timeout_replacement_starts_while_idle", &[]);
}

#[test]
#[ignore = "run by a_worker_killed_for_a_timeout_is_reaped_and_replaced_while_the_pool_is_idle \
            in a child process"]
fn child_timeout_replacement_starts_while_idle() {
    let limit = Duration::from_millis(100);
    let parallel = start_two_workers().timeout(limit);
    let before: Vec<u32> = children().into_iter().map(|(pid, _)| pid).collect();
    let err = parallel.run([delayed(nap, 60_000)]).unwrap_err();
    assert!(killed_at_its_limit(&err, 0, limit), "{err:?}");
    // No call comes: the killed worker is reaped (no zombie), and its replacement starts on
    // its own once the pool is quiet (the timeout is reported without waiting for either).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = children();
        let fresh = now.iter().filter(|(pid, _)| !before.contains(pid)).count();
        if now.len() == 2 && fresh == 1 && now.iter().all(|&(_, zombie)| !zombie) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "children {now:?}, before the timeout {before:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let pids: HashSet<u32> = parallel
        .run((0..20u32).map(|i| delayed(my_pid, i)))
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        pids.iter()
            .all(|pid| children().iter().any(|(c, _)| c == pid))
    );
    drop(parallel);
    assert_eq!(children(), []);
}

#[test]
fn workers_lost_to_crashes_are_replaced_without_waiting_for_a_call() {
    run_child_test("process::child_crash_replacements_start_while_idle", &[]);
}

#[test]
#[ignore = "run by workers_lost_to_crashes_are_replaced_without_waiting_for_a_call in a child \
            process"]
fn child_crash_replacements_start_while_idle() {
    let parallel = start_two_workers();
    let before: Vec<u32> = children().into_iter().map(|(pid, _)| pid).collect();
    // Two crashes in a row: the second takes the other worker, or the first's replacement.
    for _ in 0..2 {
        assert!(matches!(
            parallel.run([delayed(crash_on_five, (5, Crash::Abort))]),
            Err(Error::WorkerCrashed { index: 0, .. })
        ));
    }
    // No call comes: the pool is whole again on its own (docs/PROCESS.md, "Replacing a lost
    // worker"), with two live workers, at least one of them new, and the dead reaped.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = children();
        let fresh = now.iter().filter(|(pid, _)| !before.contains(pid)).count();
        if now.len() == 2 && fresh >= 1 && now.iter().all(|&(_, zombie)| !zombie) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "children {now:?}, before the crashes {before:?}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let live: Vec<u32> = children().into_iter().map(|(pid, _)| pid).collect();
    // The next call runs on those workers: no start was left for it to wait on.
    let pids: HashSet<u32> = parallel
        .run((0..20u32).map(|i| delayed(my_pid, i)))
        .unwrap()
        .into_iter()
        .collect();
    assert!(
        pids.iter().all(|pid| live.contains(pid)),
        "{pids:?} {live:?}"
    );
    drop(parallel);
    assert_eq!(children(), []);
}

#[test]
fn a_panicking_driver_leaves_no_child_process() {
    run_child_test("process::child_panic_leaves_no_child", &[]);
}

#[test]
#[ignore = "run by a_panicking_driver_leaves_no_child_process in a child process"]
fn child_panic_leaves_no_child() {
    let unwound = std::panic::catch_unwind(|| {
        let _parallel = start_two_workers();
        panic!("the driver gives up");
    });
    assert!(unwound.is_err());
    assert_eq!(children(), []);
}

#[test]
fn idle_workers_exit_with_status_zero_on_drop() {
    run_child_test("process::child_workers_exit_zero", &[]);
}

#[test]
#[ignore = "run by idle_workers_exit_with_status_zero_on_drop in a child process"]
fn child_workers_exit_zero() {
    // Watch the workers' exit through a pidfd-free trick: ptrace is not needed, the pool's
    // own reaping records nothing we can see, so check /proc while they exit: none is killed.
    let parallel = start_two_workers();
    let pids: Vec<u32> = children().into_iter().map(|(p, _)| p).collect();
    drop(parallel);
    for pid in pids {
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists() || {
                // Reparented zombies of another parent are not ours; ours must be gone.
                children().iter().all(|(p, _)| *p != pid)
            }
        );
    }
}

#[test]
fn ctrl_c_in_the_driver_takes_its_workers_along() {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "process::child_waits_for_ctrl_c",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("PARJOB_BACKEND")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    // Read on a helper thread, so that a child that never names its workers cannot hang this
    // test: it is given CHILD_LIMIT, then killed.
    let (found, workers_line) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The harness may have printed `test <name> ... ` on the same line.
            if let Some((_, pids)) = line.split_once("workers: ") {
                let _ = found.send(pids.to_owned());
                break;
            }
        }
    });
    let Ok(pids) = workers_line.recv_timeout(CHILD_LIMIT) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("the child ended, or did not name its workers within {CHILD_LIMIT:?}");
    };
    let workers: Vec<i32> = pids
        .split(',')
        .map(|p| p.trim().parse::<i32>().unwrap())
        .collect();
    assert_eq!(workers.len(), 2);
    // SAFETY: signalling the child test process we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = wait_within(&mut child, CHILD_LIMIT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("the child did not end within {CHILD_LIMIT:?} of its Ctrl-C");
    });
    assert!(!status.success());
    // The workers die with their driver (PR_SET_PDEATHSIG); give the kernel a moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    for pid in workers {
        while alive(pid) {
            assert!(
                Instant::now() < deadline,
                "worker {pid} outlived its driver"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Whether `pid` runs (a zombie waiting for a reaper that is not its driver counts as dead).
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
#[ignore = "run by ctrl_c_in_the_driver_takes_its_workers_along in a child process"]
fn child_waits_for_ctrl_c() {
    let parallel = start_two_workers();
    let pids: Vec<String> = children().iter().map(|(p, _)| p.to_string()).collect();
    println!("workers: {}", pids.join(","));
    parallel.run([delayed(nap, 60_000)]).unwrap();
}

#[test]
fn worker_stdout_and_stderr_reach_the_user() {
    let output = run_child_test("process::child_prints_from_workers", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for i in 0..4 {
        assert!(
            stdout.contains(&format!("task {i} says hello on stdout")),
            "{stdout}"
        );
        assert!(
            stderr.contains(&format!("task {i} says hello on stderr")),
            "{stderr}"
        );
    }
}

#[test]
#[ignore = "run by worker_stdout_and_stderr_reach_the_user in a child process"]
fn child_prints_from_workers() {
    fn chatty(i: u32) {
        println!("task {i} says hello on stdout");
        eprintln!("task {i} says hello on stderr");
    }
    processes(2)
        .run((0..4u32).map(|i| delayed(chatty, i)))
        .unwrap();
}

#[test]
fn a_program_started_by_a_task_is_not_a_worker() {
    fn start_this_program(_: u32) -> bool {
        let exe = std::env::current_exe().unwrap();
        let mut command = Command::new(exe);
        command.args(["process::child_calls_init", "--exact", "--ignored", "-q"]);
        output_within(&mut command, CHILD_LIMIT).status.success()
    }
    let out = processes(1).run([delayed(start_this_program, 0)]).unwrap();
    assert_eq!(out, [true]);
}

#[test]
#[ignore = "run by a_program_started_by_a_task_is_not_a_worker from a worker"]
fn child_calls_init() {
    // Inherits the worker's environment, but its parent is the worker, not the driver.
    parjob::init();
}

#[test]
fn replacing_workers_leaks_no_file_descriptor() {
    run_child_test("process::child_counts_descriptors", &[]);
}

#[test]
#[ignore = "run by replacing_workers_leaks_no_file_descriptor in a child process"]
fn child_counts_descriptors() {
    let open = || std::fs::read_dir("/proc/self/fd").unwrap().count();
    drop(start_two_workers());
    let before = open();
    let parallel = processes(2).batch_size(BatchSize::Fixed(2));
    for _ in 0..10 {
        assert!(
            parallel
                .run((0..8u32).map(|i| delayed(crash_on_five, (i, Crash::Abort))))
                .is_err()
        );
    }
    drop(parallel);
    // Helper threads of dead workers close their last descriptors as they end.
    let deadline = Instant::now() + Duration::from_secs(10);
    while open() != before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(open(), before);
}

#[test]
fn a_worker_killed_while_idle_is_replaced_without_blaming_a_task() {
    let parallel = processes(1);
    let first = parallel.run([delayed(my_pid, 0)]).unwrap()[0];
    // SAFETY: signalling the worker process this test's pool started.
    unsafe { libc::kill(first as i32, libc::SIGKILL) };
    // Wait until the pool's waiter has reaped it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{first}")).exists() {
        assert!(Instant::now() < deadline, "worker {first} was not reaped");
        std::thread::sleep(Duration::from_millis(2));
    }
    let next = parallel.run((0..4u32).map(|i| delayed(my_pid, i))).unwrap();
    assert!(next.iter().all(|&pid| pid != first), "{next:?}");
}

#[test]
fn worker_output_can_be_prefixed_with_the_worker_index() {
    let output = run_child_test("process::child_prints_with_prefix", &[]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    for i in 0..4 {
        // The harness may have printed `test <name> ... ` before the first line.
        let said = |text: &str, stream: &str| {
            (0..2)
                .any(|w| text.contains(&format!("[worker {w}] task {i} says hello on {stream}\n")))
        };
        assert!(said(&stdout, "stdout"), "{stdout}");
        assert!(said(&stderr, "stderr"), "{stderr}");
    }
}

#[test]
#[ignore = "run by worker_output_can_be_prefixed_with_the_worker_index in a child process"]
fn child_prints_with_prefix() {
    fn chatty(i: u32) {
        println!("task {i} says hello on stdout");
        eprintln!("task {i} says hello on stderr");
    }
    processes(2)
        .prefix_worker_output(true)
        .run((0..4u32).map(|i| delayed(chatty, i)))
        .unwrap();
}

#[test]
fn what_a_task_prints_comes_out_before_run_returns() {
    let output = run_child_test("process::child_prints_then_says_its_run_returned", &[]);
    for (stream, text) in [("stdout", &output.stdout), ("stderr", &output.stderr)] {
        let text = String::from_utf8_lossy(text);
        let lines: Vec<&str> = text.lines().collect();
        for round in 0..PRINT_ROUNDS {
            let returned = format!("round {round}: run returned");
            let at = |line: &str| lines.iter().position(|l| l.ends_with(line));
            let Some(returned_at) = at(&returned) else {
                panic!("no `{returned}` on {stream}:\n{text}");
            };
            for task in 0..4 {
                let last = format!("round {round} task {task} line {}", PRINT_LINES - 1);
                let Some(last_at) = at(&last) else {
                    panic!("no `{last}` on {stream}:\n{text}");
                };
                assert!(
                    last_at < returned_at,
                    "`{last}` came after `{returned}` on {stream}:\n{text}"
                );
            }
        }
    }
}

#[test]
fn a_task_printing_into_a_pipe_whose_reader_left_fails_as_on_threads() {
    // `prog | head -1`: the reader takes a line and goes. A task's next `println!` then
    // panics, as it does on threads, rather than the run going on with its output dropped.
    let mut child = child_test_command("process::child_prints_into_a_pipe_whose_reader_leaves")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("task 0 line 0") {
        line.clear();
        assert_ne!(stdout.read_line(&mut line).unwrap(), 0, "no task line");
    }
    drop(stdout);
    let stderr = child.stderr.take().unwrap();
    let status = wait_within(&mut child, CHILD_LIMIT);
    let stderr = std::io::read_to_string(stderr).unwrap();
    assert!(status.is_some(), "the child did not end:\n{stderr}");
    let outcome = stderr
        .lines()
        .find(|l| l.starts_with("outcome: "))
        .unwrap_or_else(|| panic!("no outcome:\n{stderr}"));
    assert!(
        outcome.contains("failed printing to stdout") && outcome.contains("Broken pipe"),
        "{outcome}"
    );
}

#[test]
#[ignore = "run by a_task_printing_into_a_pipe_whose_reader_left_fails_as_on_threads"]
fn child_prints_into_a_pipe_whose_reader_leaves() {
    fn chatty(task: u32) -> u32 {
        for line in 0..2000 {
            println!("task {task} line {line}");
            std::thread::sleep(Duration::from_millis(1));
        }
        task
    }
    let outcome = processes(1)
        .batch_size(BatchSize::Fixed(1))
        .run((0..4u32).map(|task| delayed(chatty, task)));
    eprintln!("outcome: {outcome:?}");
}

#[test]
fn worker_output_reaches_a_non_blocking_stdout_whole() {
    // A driver whose stdout is a non-blocking pipe (some supervisors and Python's asyncio make
    // one) that is read late: the forwarders wait while it is full rather than drop lines.
    let (read_end, write_end) = pipe();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&write_end);
    // SAFETY: fcntl on the write end this test owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        assert_eq!(libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK), 0);
    }
    let mut child = child_test_command("process::child_prints_much_into_a_non_blocking_stdout")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Let the pipe fill before anything reads it.
    std::thread::sleep(Duration::from_millis(500));
    let stdout =
        std::thread::spawn(move || std::io::read_to_string(std::fs::File::from(read_end)).unwrap());
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(wait_within(&mut child, CHILD_LIMIT).is_some());
    let stdout = stdout.join().unwrap();
    assert!(stderr.contains("outcome: Ok"), "{stderr}");
    for task in 0..4 {
        // The harness may have printed `test <name> ... ` before the first line.
        let start = format!("task {task} line ");
        let lines = stdout
            .lines()
            .filter(|l| l.find(&start).is_some_and(|at| l.len() - at == 90))
            .count();
        assert_eq!(lines, 2000, "task {task}'s lines, whole");
    }
}

#[test]
#[ignore = "run by worker_output_reaches_a_non_blocking_stdout_whole"]
fn child_prints_much_into_a_non_blocking_stdout() {
    fn chatty(task: u32) -> u32 {
        for line in 0..2000 {
            // 90 characters a line.
            println!("task {task} line {line:04} {}", "x".repeat(73));
        }
        task
    }
    let outcome = processes(2)
        .batch_size(BatchSize::Fixed(1))
        .run((0..4u32).map(|task| delayed(chatty, task)));
    eprintln!("outcome: {outcome:?}");
}

#[test]
fn stdout_and_stderr_into_one_pipe_keep_their_lines_whole() {
    // `prog 2>&1 | less`: the two forwarders write into one pipe, and a write of more than
    // 4096 bytes may be cut by the other's.
    let (read_end, write_end) = pipe();
    let mut child = child_test_command("process::child_floods_stdout_and_stderr")
        .stdin(Stdio::null())
        .stdout(Stdio::from(write_end.try_clone().unwrap()))
        .stderr(Stdio::from(write_end))
        .spawn()
        .unwrap();
    let output = std::io::read_to_string(std::fs::File::from(read_end)).unwrap();
    assert!(wait_within(&mut child, CHILD_LIMIT).is_some());
    assert!(output.contains("outcome: Ok"), "{output}");
    let mut whole = 0;
    for line in output.lines() {
        let Some(at) = line.find("OUT T").or_else(|| line.find("ERR T")) else {
            continue;
        };
        let text = &line[at..];
        assert!(
            text.len() == 116
                && text.ends_with(" END")
                && !text[5..].contains("OUT T")
                && !text[5..].contains("ERR T"),
            "a torn line: {line:?}"
        );
        whole += 1;
    }
    assert_eq!(whole, 2 * 8 * 400);
}

#[test]
#[ignore = "run by stdout_and_stderr_into_one_pipe_keep_their_lines_whole"]
fn child_floods_stdout_and_stderr() {
    fn flood(task: u32) -> u32 {
        for line in 0..400 {
            // 116 characters a line.
            let x = "x".repeat(100);
            println!("OUT T{task} L{line:03} {x} END");
            eprintln!("ERR T{task} L{line:03} {x} END");
        }
        task
    }
    let outcome = processes(2)
        .batch_size(BatchSize::Fixed(1))
        .run((0..8u32).map(|task| delayed(flood, task)));
    eprintln!("outcome: {outcome:?}");
}

#[test]
fn a_missing_tmpdir_falls_back_to_tmp_with_a_note() {
    let output = run_child_test(
        "process::child_runs_with_a_missing_tmpdir",
        &[("TMPDIR", "/nonexistent/parjob-test-tmpdir")],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr
            .matches("TMPDIR=/nonexistent/parjob-test-tmpdir is not a directory")
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
fn a_tmpdir_too_long_for_a_socket_falls_back_to_tmp_with_a_note() {
    // ipc-channel used to cut a socket path longer than 107 bytes short: workers' sockets
    // collided ("Address already in use") and every run failed.
    let base = tempfile::tempdir().unwrap();
    let long = base.path().join("d".repeat(100));
    std::fs::create_dir(&long).unwrap();
    let output = run_child_test(
        "process::child_runs_with_a_missing_tmpdir",
        &[("TMPDIR", long.to_str().unwrap())],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(
        stderr
            .matches("is too long for the workers' sockets")
            .count(),
        1,
        "{stderr}"
    );
}

#[test]
#[ignore = "run by a_missing_tmpdir_falls_back_to_tmp_with_a_note in a child process"]
fn child_runs_with_a_missing_tmpdir() {
    let out = processes(2)
        .run((0..8u64).map(|i| delayed(square, i)))
        .unwrap();
    assert_eq!(out, (0..8u64).map(|i| i * i).collect::<Vec<_>>());
}

const PRINT_ROUNDS: u32 = 10;
const PRINT_LINES: u32 = 40;

#[test]
#[ignore = "run by what_a_task_prints_comes_out_before_run_returns in a child process"]
fn child_prints_then_says_its_run_returned() {
    fn chatty((round, task): (u32, u32)) {
        for line in 0..PRINT_LINES {
            println!("round {round} task {task} line {line}");
            eprintln!("round {round} task {task} line {line}");
        }
    }
    let parallel = processes(2).batch_size(BatchSize::Fixed(1));
    for round in 0..PRINT_ROUNDS {
        parallel
            .run((0..4u32).map(|task| delayed(chatty, (round, task))))
            .unwrap();
        println!("round {round}: run returned");
        eprintln!("round {round}: run returned");
    }
}

#[test]
fn run_unordered_yields_a_crash_with_its_index_and_every_other_result() {
    let mut seen: Vec<(usize, Result<u32, Error>)> = processes(2)
        .batch_size(BatchSize::Fixed(4))
        .run_unordered((0..16u32).map(|i| delayed(crash_on_five, (i, Crash::Exit3))))
        .collect();
    seen.sort_by_key(|(i, _)| *i);
    assert_eq!(seen.len(), 16);
    for (i, result) in seen {
        match result {
            Err(Error::WorkerCrashed {
                index: 5, status, ..
            }) => {
                assert_eq!((i, status.to_string().as_str()), (5, "exit status 3"));
            }
            Ok(v) => assert_eq!(v as usize, i),
            other => panic!("task {i}: {other:?}"),
        }
    }
}

#[test]
fn a_copy_of_the_same_build_is_a_valid_worker_exe() {
    let exe = std::env::current_exe().unwrap();
    let copy = std::env::temp_dir().join(format!("parjob-same-build-{}", std::process::id()));
    std::fs::copy(&exe, &copy).unwrap();
    let out = processes(1).worker_exe(&copy).run([delayed(square, 7)]);
    let _ = std::fs::remove_file(&copy);
    assert_eq!(out.unwrap(), [49]);
}

#[test]
fn workers_start_even_after_the_executable_is_deleted() {
    // Run a copy of this test binary that deletes itself (as a rebuild would replace it)
    // before it starts its pool.
    let exe = std::env::current_exe().unwrap();
    let copy = std::env::temp_dir().join(format!("parjob-deleted-{}", std::process::id()));
    std::fs::copy(&exe, &copy).unwrap();
    let mut command = child_test_command_of(&copy, "process::child_deletes_its_executable");
    let output = output_within(&mut command, CHILD_LIMIT);
    let _ = std::fs::remove_file(&copy);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
#[ignore = "run by workers_start_even_after_the_executable_is_deleted from a copy"]
fn child_deletes_its_executable() {
    std::fs::remove_file(std::env::current_exe().unwrap()).unwrap();
    let out = processes(2)
        .run((0..10u64).map(|i| delayed(square, i)))
        .unwrap();
    assert_eq!(out[9], 81);
}

#[test]
fn run_iter_pulls_lazily_and_stops_pulling_when_dropped() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let tasks = (0u64..).map(move |i| {
        counter.fetch_add(1, Ordering::SeqCst);
        delayed(square, i)
    });
    let parallel = processes(2).batch_size(BatchSize::Fixed(1)).pre_dispatch(4);
    let mut results = parallel.run_iter(tasks);
    let first: Vec<u64> = results.by_ref().take(10).map(Result::unwrap).collect();
    assert_eq!(first, (0..10u64).map(|i| i * i).collect::<Vec<_>>());
    let after_ten = pulled.load(Ordering::SeqCst);
    assert!(after_ten <= 10 + 4 + 1, "pulled {after_ten} for 10 results");
    drop(results);
    assert_eq!(
        pulled.load(Ordering::SeqCst),
        after_ten,
        "pulled after drop"
    );
}

#[test]
fn a_million_tasks_stream_through_bounded_look_ahead() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let pulled = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&pulled);
    let tasks = (0..1_000_000u64).map(move |i| {
        counter.fetch_add(1, Ordering::Relaxed);
        delayed(square, i)
    });
    let parallel = processes(2)
        .batch_size(BatchSize::Fixed(10_000))
        .pre_dispatch(4);
    let (mut sum, mut done, mut max_ahead) = (0u64, 0usize, 0usize);
    for result in parallel.run_iter(tasks) {
        sum = sum.wrapping_add(result.unwrap());
        done += 1;
        max_ahead = max_ahead.max(pulled.load(Ordering::Relaxed) - done);
    }
    let expected = (0..1_000_000u64).fold(0u64, |s, i| s.wrapping_add(i * i));
    assert_eq!(sum, expected);
    assert!(
        max_ahead <= 5 * 10_000,
        "up to {max_ahead} tasks pulled ahead"
    );
}

#[test]
fn a_task_may_ask_for_its_own_process_pool() {
    fn nested_in_processes(n: u64) -> (u32, Vec<u32>) {
        let inner = Parallel::new(1).backend(Backend::Process);
        let pids = inner
            .run((0..n as u32).map(|i| delayed(my_pid, i)))
            .unwrap();
        (std::process::id(), pids)
    }
    let out = processes(1).run([delayed(nested_in_processes, 3)]).unwrap();
    let (worker, grandchildren) = &out[0];
    assert_eq!(grandchildren.len(), 3);
    assert!(
        grandchildren
            .iter()
            .all(|pid| pid != worker && *pid != std::process::id())
    );
}

#[test]
fn shared_slices_report_whether_they_travel_as_handles() {
    let big = SharedSlice::from(vec![1.0f64; parjob::SHARED_MIN_BYTES / 8]);
    let small = SharedSlice::from(vec![1.0f64; 16]);
    assert!(big.is_shared());
    assert!(!small.is_shared());
    let empty = big.slice(3..3).unwrap();
    assert!(!empty.is_shared());
    // A slice is usable inside catch_unwind without AssertUnwindSafe.
    let sum = std::panic::catch_unwind(|| big.iter().sum::<f64>()).unwrap();
    assert_eq!(sum, (parjob::SHARED_MIN_BYTES / 8) as f64);
}

#[test]
fn a_worker_executable_that_cannot_be_started_is_an_error_with_its_io_cause() {
    let err = processes(1)
        .worker_exe("/nonexistent/parjob-worker")
        .run((0..2u64).map(|i| delayed(square, i)))
        .unwrap_err();
    assert!(
        err.to_string().contains("/nonexistent/parjob-worker"),
        "{err}"
    );
    let source = std::error::Error::source(&err).expect("an io::Error is behind it");
    let cause = source
        .downcast_ref::<parjob::IoCause>()
        .expect("the source is the io error");
    assert_eq!(cause.io_error().kind(), std::io::ErrorKind::NotFound);
}

fn calls_init_again(x: u64) -> u64 {
    parjob::init();
    x + 1
}

#[test]
fn init_called_again_inside_a_task_does_nothing() {
    let out = processes(2)
        .run((0..4u64).map(|i| delayed(calls_init_again, i)))
        .unwrap();
    assert_eq!(out, [1, 2, 3, 4]);
}

/// A field `#[serde(skip_serializing_if)]` leaves out would shift every field after it in the
/// positional format: a user's `Job { label: None, a: 0, b: 5, tail: [0] }` reached the
/// worker as `a: 5, b: 1, tail: []`. Now the task fails with an error naming the field, on
/// its way out and (returned by a task) on its way back.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SkippingJob {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<u8>,
    pub a: u8,
    pub b: u8,
    pub tail: Vec<u8>,
}

fn job_fields(job: SkippingJob) -> (Option<u8>, u8, u8, usize) {
    (job.label, job.a, job.b, job.tail.len())
}

fn unlabelled_job(b: u8) -> SkippingJob {
    SkippingJob {
        label: None,
        a: 0,
        b,
        tail: vec![0],
    }
}

#[test]
fn a_field_left_out_by_skip_serializing_if_fails_its_task_instead_of_shifting_values() {
    let parallel = processes(2);
    let labelled = SkippingJob {
        label: Some(1),
        a: 0,
        b: 5,
        tail: vec![0],
    };
    assert_eq!(
        parallel.run([delayed(job_fields, labelled)]).unwrap(),
        [(Some(1), 0, 5, 1)]
    );
    let err = parallel
        .run([delayed(job_fields, unlabelled_job(5))])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("task 0") && err.contains("field `label`"),
        "{err}"
    );
    let err = parallel
        .run([delayed(unlabelled_job, 5)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("task 0") && err.contains("field `label`"),
        "{err}"
    );
    // The pool goes on.
    assert_eq!(parallel.run([delayed(square, 3)]).unwrap(), [9]);
}

fn nap_then_pid(ms: u64) -> u32 {
    std::thread::sleep(Duration::from_millis(ms));
    std::process::id()
}

/// The seed lesson's two halves on a new pool of 2 ran both on the first worker: the second
/// was sent behind the first (pipelining) while the other worker was still starting. A job
/// goes behind a frame only when that function's last frame on the slot was short.
#[test]
fn two_slow_tasks_on_a_new_pool_run_on_two_workers() {
    for _ in 0..3 {
        let parallel = processes(2);
        let pids = parallel
            .run([delayed(nap_then_pid, 300), delayed(nap_then_pid, 300)])
            .unwrap();
        assert_ne!(pids[0], pids[1], "both halves ran on worker {}", pids[0]);
        // And on a warm pool.
        let pids = parallel
            .run([delayed(nap_then_pid, 300), delayed(nap_then_pid, 300)])
            .unwrap();
        assert_ne!(pids[0], pids[1], "both halves ran on worker {}", pids[0]);
    }
}

/// A copy of the program that its driver started as a worker, but that never called
/// `parjob::init()` (so it ran `main` from the top), stops at its first parallel run, on the
/// process backend and on the backend a driver gives its workers (`PARJOB_BACKEND=sequential`,
/// which a program taking its backend from the environment runs on): one line on stderr naming
/// it and its driver, and status 1, instead of an error handed to the program (which would
/// print it as its own, once per worker) or every task of `main` run again in each worker copy.
#[test]
fn a_worker_copy_without_init_says_so_and_stops_at_its_first_run() {
    for child in [
        "process::child_worker_copy_without_init",
        "process::child_worker_copy_without_init_on_its_given_backend",
    ] {
        let exe = std::env::current_exe().unwrap();
        let mut command = Command::new(exe);
        // What a driver gives the workers it starts, as their standard input: a socket it made.
        let (line, _driver_end) = std::os::unix::net::UnixStream::pair().unwrap();
        command
            .args([
                child,
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            // What a driver sets for the workers it starts; this test's process is the parent.
            .env("PARJOB_PROCESS_DRIVER", std::process::id().to_string())
            .env("PARJOB_BACKEND", "sequential")
            .env_remove("PARJOB_N_JOBS");
        let stdin = Stdio::from(std::os::fd::OwnedFd::from(line));
        let output = output_within_from(&mut command, stdin, CHILD_LIMIT);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        // 79: the status that tells a driver this copy reached a run without `init()`.
        assert_eq!(
            output.status.code(),
            Some(79),
            "{child}: {stdout}\n{stderr}"
        );
        assert!(stdout.contains("before the run"), "{child}: {stdout}");
        assert!(!stdout.contains("after the run"), "{child}: {stdout}");
        let expected = format!("started by pid {} to run tasks", std::process::id());
        assert!(stderr.contains(&expected), "{child}: {stderr}");
        assert!(
            stderr.contains("call parjob::init() first"),
            "{child}: {stderr}"
        );
    }
}

/// Run by the test above, as a worker copy of the program.
#[test]
#[ignore = "run by a_worker_copy_without_init_says_so_and_stops_at_its_first_run"]
fn child_worker_copy_without_init() {
    println!("before the run");
    let out = processes(1).run((0..4u64).map(|i| delayed(square, i)));
    println!("after the run: {out:?}");
}

/// Run by the test above, as a worker copy of a program that takes its backend from
/// `PARJOB_BACKEND` (`sequential` in a worker).
#[test]
#[ignore = "run by a_worker_copy_without_init_says_so_and_stops_at_its_first_run"]
fn child_worker_copy_without_init_on_its_given_backend() {
    println!("before the run");
    let out = Parallel::new(2).run((0..4u64).map(|i| delayed(square, i)));
    println!("after the run: {out:?}");
}

const ADOPTED_MARKER: &str = "PARJOB_TEST_ADOPTED_MARKER";

/// Where `grandchild_adopted_by_the_driver` learns the driver's pid (the worker's parent).
const DRIVER_PID: &str = "PARJOB_TEST_DRIVER_PID";

/// Starts this test binary's `grandchild_adopted_by_the_driver` in the background, through
/// `sh`, which exits half a second later: the program is then adopted by the nearest
/// subreaper. In a process group of its own, as a program meant to outlive its worker must be
/// (a worker's group dies with it).
fn start_in_the_background(marker: String) -> bool {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().unwrap();
    std::process::Command::new("sh")
        .process_group(0)
        .arg("-c")
        .arg(format!(
            "'{}' process::grandchild_adopted_by_the_driver --exact --ignored --nocapture \
             --test-threads=1 >/dev/null 2>\"$PARJOB_TEST_ADOPTED_MARKER.log\" & sleep 0.5",
            exe.display()
        ))
        .env(ADOPTED_MARKER, marker)
        .env(DRIVER_PID, std::os::unix::process::parent_id().to_string())
        .envs(
            // As a worker that ran threads before its `init()` leaves it (it cannot take its
            // variables out then).
            std::env::var_os("PARJOB_TEST_LEAK_DRIVER").map(|_| {
                (
                    "PARJOB_PROCESS_DRIVER",
                    std::os::unix::process::parent_id().to_string(),
                )
            }),
        )
        .status()
        .is_ok_and(|s| s.success())
}

/// A program a task starts in the background is no worker, even when the driver adopts it
/// (a driver that is PID 1 in a container, or a subreaper) before its `init()`: the worker
/// took its `PARJOB_PROCESS_*` variables out of the environment the program inherits. Before,
/// the program found the driver's pid there, named by its parent, took itself for a worker
/// and exited 75 (and, adopted after its `init()`, was made to exit where it reached the
/// process backend: attack round 5). Run in a child process, which becomes a subreaper.
#[test]
fn a_program_a_task_started_stays_no_worker_when_the_driver_adopts_it() {
    run_child_test("process::child_subreaper_driver", &[]);
}

/// The same with the driver's pid left in the program's environment: its standard input is
/// not its driver's line, so it is no worker. Before, a worker that ran threads before its
/// `init()` (a library's constructor, an async runtime) left the variable to the programs its
/// tasks started, and one adopted by the driver took itself for a worker and exited 75
/// (attack round 7).
#[test]
fn a_program_that_inherited_the_drivers_pid_is_no_worker_either() {
    run_child_test(
        "process::child_subreaper_driver",
        &[("PARJOB_TEST_LEAK_DRIVER", "1")],
    );
}

/// Run by the test above: the driver.
#[test]
#[ignore = "run by a_program_a_task_started_stays_no_worker_when_the_driver_adopts_it"]
fn child_subreaper_driver() {
    // SAFETY: prctl with PR_SET_CHILD_SUBREAPER only changes who adopts this process's
    // orphaned descendants.
    let made = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(made, 0);
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("adopted");
    let started = processes(1)
        .run([delayed(
            start_in_the_background,
            marker.to_string_lossy().into_owned(),
        )])
        .unwrap();
    assert_eq!(started, [true]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let said = loop {
        match std::fs::read_to_string(&marker) {
            Ok(text) if text.ends_with('\n') => break text,
            _ if Instant::now() > deadline => panic!(
                "the adopted program said nothing; its stderr: {:?}",
                std::fs::read_to_string(format!("{}.log", marker.display()))
            ),
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    assert_eq!(said, "adopted by its driver; ran [0, 1, 4, 9]\n");
    // Reap it (adopted: this process is its parent now).
    // SAFETY: waitpid on any child with a valid out-pointer; no other child is running.
    unsafe { libc::waitpid(-1, std::ptr::null_mut(), 0) };
}

/// Run in the background by a task of the test above: waits until the driver adopted it,
/// then calls `init()` and uses the process backend.
#[test]
#[ignore = "run by a_program_a_task_started_stays_no_worker_when_the_driver_adopts_it"]
fn grandchild_adopted_by_the_driver() {
    let marker = std::env::var(ADOPTED_MARKER).unwrap();
    let driver: i32 = std::env::var(DRIVER_PID).unwrap().parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    // SAFETY: getppid has no preconditions.
    while unsafe { libc::getppid() } != driver {
        assert!(Instant::now() < deadline, "never adopted by the driver");
        std::thread::sleep(Duration::from_millis(10));
    }
    parjob::init();
    let out = processes(1).run((0..4u64).map(|i| delayed(square, i)));
    let text = match out {
        Ok(values) => format!("adopted by its driver; ran {values:?}\n"),
        Err(e) => format!("adopted by its driver; failed: {e}\n"),
    };
    let partial = format!("{marker}.part");
    std::fs::write(&partial, text).unwrap();
    std::fs::rename(partial, marker).unwrap();
}
