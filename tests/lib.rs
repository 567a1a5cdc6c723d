//! Helpers shared by parjob's integration tests.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a child process of a test may run before the test calls it hung. Generous: it is
/// a bound against hanging for ever, not a timing check.
pub const CHILD_LIMIT: Duration = Duration::from_secs(120);

/// Runs the ignored test `name` of the current test binary in a child process with `envs` set,
/// and returns what it printed. Used for behaviour that depends on process-wide state (the
/// environment, stderr) so that tests running in parallel threads do not disturb each other.
/// The child starts without `PARJOB_BACKEND` and `PARJOB_N_JOBS`, and is killed (and the test
/// fails) if it runs longer than [`CHILD_LIMIT`].
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
    let output = output_within(&mut command, CHILD_LIMIT);
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

/// [`Command::output`] with a bound: runs `command` with stdout and stderr captured, and kills
/// it and panics if it has not ended, and closed its output, within `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());
    let status = wait_within(&mut child, limit).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!("{command:?} did not end within {limit:?}: killed it");
    });
    let collect = |output: mpsc::Receiver<Vec<u8>>, which: &str| {
        let left = deadline.saturating_duration_since(Instant::now());
        output.recv_timeout(left).unwrap_or_else(|_| {
            panic!("the {which} of {command:?} was still open {limit:?} after it started")
        })
    };
    Output {
        status,
        stdout: collect(stdout, "stdout"),
        stderr: collect(stderr, "stderr"),
    }
}

/// Waits up to `limit` for `child` to end: its exit status, or `None` if it still runs.
pub fn wait_within(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("the child can be waited for") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Reads `pipe` to its end on a helper thread; the bytes arrive on the returned channel.
fn read_in_background(pipe: Option<impl Read + Send + 'static>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_end(&mut bytes);
        }
        let _ = sender.send(bytes);
    });
    receiver
}
