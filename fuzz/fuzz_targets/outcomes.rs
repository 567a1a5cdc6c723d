//! The driver's side: a worker's outcome frame, as bytes from another process, decoded into a
//! batch (`ErasedBatch::decode_outcomes`). Whatever the bytes, the run ends with one outcome per
//! task (a value or an error), never a panic, an abort or an allocation beyond the decoder's
//! budget.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use parjob_core::{BatchSize, Job, Pool, RunIter, RunOptions, delayed};
use serde::{Deserialize, Serialize};

thread_local! {
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A pool that answers every job with the fuzzer's bytes as its outcomes.
struct Replaying;

impl Pool for Replaying {
    fn workers(&self) -> usize {
        1
    }
    fn submit(&self, mut job: Job) {
        BYTES.with(|bytes| job.batch_mut().decode_outcomes(&bytes.borrow()));
        job.complete(Duration::ZERO);
    }
    fn runs_on_calling_thread(&self) -> bool {
        true
    }
    fn verbose_name(&self) -> &'static str {
        "Replaying"
    }
}

#[derive(Serialize, Deserialize, Debug)]
enum Shape {
    Point(f64, f64),
    Named { name: String, tags: Vec<String> },
    Empty,
}

fn number(x: u64) -> u64 {
    x
}
fn text(x: u64) -> String {
    x.to_string()
}
fn numbers(x: u64) -> Vec<f64> {
    vec![x as f64]
}
fn shape(_: u64) -> Option<Shape> {
    None
}

fn outcomes<F, R>(f: F) -> usize
where
    F: Fn(u64) -> R + Copy + Send + Sync + 'static,
    R: Serialize + serde::de::DeserializeOwned + Send + 'static,
{
    let options = RunOptions {
        batch_size: BatchSize::Fixed(4),
        ..RunOptions::default()
    };
    RunIter::new(
        Arc::new(Replaying),
        (0..4u64).map(|i| delayed(f, i)),
        &options,
    )
    .count()
}

fuzz_target!(|data: &[u8]| {
    BYTES.with(|bytes| *bytes.borrow_mut() = data.to_vec());
    assert_eq!(outcomes(number), 4);
    assert_eq!(outcomes(text), 4);
    assert_eq!(outcomes(numbers), 4);
    assert_eq!(outcomes(shape), 4);
});
