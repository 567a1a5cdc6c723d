//! What a worker (or a task inside it) writes on its line to the driver: the driver's reader
//! (parjob-process's `link`) and the `Hello` it decodes first. Whatever the bytes, the reader
//! returns messages no longer than its limit, an error, or the end, never panics, and never
//! allocates more than the limit for a length a message merely claims (libFuzzer's
//! `-malloc_limit_mb` catches one that does).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    parjob_process::fuzzing::hello(data);
    let lengths = parjob_process::fuzzing::line(data, 1 << 20);
    assert!(lengths.iter().sum::<usize>() + 8 * lengths.len() <= data.len());
});
