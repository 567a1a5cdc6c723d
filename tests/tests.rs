//! parjob's integration tests: one binary, one module per topic.
#![allow(clippy::unwrap_used)] // a failed unwrap is how a test states a broken expectation

// n_jobs rules, backend names and aliases, environment overrides.
mod config;
// Results in input order, completion order, every task exactly once, 10^6 tasks.
mod ordering;
// Lazy pulling from the input, bounded look-ahead, endless iterators.
mod laziness;
// Panics, timeouts, cancellation after a failure, reuse after an error.
mod failures;
// Threading backend: pool size, thread names, overlapping I/O-bound tasks.
mod threading;
// delayed(): arities, closures; verbose lines.
mod api;
// Initializers and per-worker state on every backend.
mod worker_state;
// run_local: tasks that borrow, on threading and sequential; an error elsewhere.
mod local;
// Executor: submit, Future (result, timeout, cancel, error), map, as_completed, wait, shutdown.
mod executor;
// Process backend: crashes, timeouts, codec errors, no orphans, worker lifecycle.
mod process;
// Process handshake: a rogue client, the socket's mode, descriptor shortage, leaks, task children.
mod handshake;
// Process faults: supervisor panics, failed restarts, forks, cut memory, random kills, 64 fds.
mod faults;
// API docs: examples of re-exported items use `parjob::` paths.
mod docs;
// Memory: stored results in runs, keys, versions, failures, eviction, SIGKILL-resume, two drivers.
mod memory;
// Long runs: keep going, retries, per-task limits, events, insights, the Chrome trace.
mod long_runs;
// The `tracing` feature: a run and its batches as spans, crashes and replacements as events.
mod tracing;
