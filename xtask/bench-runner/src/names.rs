//! The scenario names, in the order the issue, the report and docs/BENCHMARKS.md list them.
//!
//! `cargo xtask bench` includes this file too (`#[path]`), to check `--scenario` before it
//! spends a minute on the release build: one list, two binaries.

/// The scenarios, in report order.
pub const SCENARIOS: [&str; 12] = [
    "small",
    "tiny",
    "cpu_halves",
    "sleep_io",
    "startup",
    "big_input",
    "big_result",
    "crash",
    "timeout",
    "first_result",
    "memory",
    "mpi",
];
