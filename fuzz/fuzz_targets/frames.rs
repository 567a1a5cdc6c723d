//! The worker's side: a frame of tasks, as bytes from another process, run by the batch's
//! remote entry (what a worker process calls). Whatever the bytes, every record is answered
//! with an outcome record or skipped, never a panic, an abort or an allocation beyond the
//! decoder's budget; and the outcomes it writes decode again on the driver's side.
#![no_main]

use std::cell::RefCell;
use std::sync::Arc;
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use parjob_core::{BatchSize, Job, Pool, RunIter, RunOptions, delayed};

thread_local! {
    static BYTES: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A pool that runs the fuzzer's bytes as the frame of every job, through the job's remote
/// entry, and decodes what the entry wrote back into the job.
struct RemoteReplay;

impl Pool for RemoteReplay {
    fn workers(&self) -> usize {
        1
    }
    fn submit(&self, mut job: Job) {
        let entry = job.batch().remote_entry().expect("fn items run remotely");
        let mut out = Vec::new();
        BYTES.with(|frame| entry(&frame.borrow(), &mut out, &mut |_| {}));
        job.batch_mut().decode_outcomes(&out);
        job.complete(Duration::ZERO);
    }
    fn runs_on_calling_thread(&self) -> bool {
        true
    }
    fn verbose_name(&self) -> &'static str {
        "RemoteReplay"
    }
}

fn lengths(args: (String, Vec<u32>)) -> usize {
    args.0.len() + args.1.len()
}
fn halve(x: i64) -> i64 {
    x / 2
}
fn join(parts: Vec<String>) -> String {
    parts.concat()
}

fuzz_target!(|data: &[u8]| {
    BYTES.with(|bytes| *bytes.borrow_mut() = data.to_vec());
    let options = RunOptions {
        batch_size: BatchSize::Fixed(3),
        ..RunOptions::default()
    };
    let pool = Arc::new(RemoteReplay);
    let tasks = (0..3).map(|_| delayed(lengths, (String::new(), Vec::new())));
    assert_eq!(RunIter::new(pool.clone(), tasks, &options).count(), 3);
    let tasks = (0..3).map(|i| delayed(halve, i));
    assert_eq!(RunIter::new(pool.clone(), tasks, &options).count(), 3);
    let tasks = (0..3).map(|_| delayed(join, Vec::new()));
    assert_eq!(RunIter::new(pool, tasks, &options).count(), 3);
});
