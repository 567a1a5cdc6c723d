//! Helpers shared by parjob's integration tests.

use std::process::{Command, Output};

/// Runs the ignored test `name` of the current test binary in a child process with `envs` set,
/// and returns what it printed. Used for behaviour that depends on process-wide state (the
/// environment, stderr) so that tests running in parallel threads do not disturb each other.
pub fn run_child_test(name: &str, envs: &[(&str, &str)]) -> Output {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let mut command = Command::new(exe);
    command.args([
        name,
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ]);
    command
        .env_remove("PARJOB_BACKEND")
        .env_remove("PARJOB_N_JOBS");
    for (key, value) in envs {
        command.env(key, value);
    }
    let output = command.output().expect("the test binary can be run again");
    assert!(
        output.status.success(),
        "child test {name} failed:\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 passed"),
        "child test {name} did not run:\n{stdout}"
    );
    output
}
