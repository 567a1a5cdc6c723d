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
    let mut command = child_test_command(name);
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

/// The command that runs the ignored test `name` of the current test binary alone, its output
/// not captured by the harness, without `PARJOB_BACKEND` and `PARJOB_N_JOBS`.
pub fn child_test_command(name: &str) -> Command {
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    child_test_command_of(&exe, name)
}

/// [`child_test_command`] run from `exe`, a copy of the current test binary.
pub fn child_test_command_of(exe: &std::path::Path, name: &str) -> Command {
    let mut command = Command::new(exe);
    command
        .args([
            name,
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env_remove("PARJOB_BACKEND")
        .env_remove("PARJOB_N_JOBS");
    command
}

/// A new pipe: its read end and its write end, both closed on exec.
pub fn pipe() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let mut ends = [0; 2];
    // SAFETY: pipe2 with a valid array of two descriptors.
    let made = unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(made, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: the two descriptors pipe2 just made, each owned once.
    unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) }
}

/// [`Command::output`] with a bound: runs `command` with stdout and stderr captured, and kills
/// it and panics if it has not ended, and closed its output, within `limit`.
pub fn output_within(command: &mut Command, limit: Duration) -> Output {
    output_within_from(command, Stdio::null(), limit)
}

/// [`output_within`], with `stdin` as the command's standard input.
pub fn output_within_from(command: &mut Command, stdin: Stdio, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    let mut child = command
        .stdin(stdin)
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

/// Where a test runs its tasks: one of parjob's backends, or a pool of the test's own handed to
/// [`parjob::Parallel::with_pool`], which must behave the same (ordering, laziness, failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// A built-in backend.
    Backend(parjob::Backend),
    /// A [`CountingPool`] through `Parallel::with_pool`.
    CustomPool,
}

/// Every built-in backend, and a custom pool.
pub const EVERY_TARGET: [Target; 4] = [
    Target::Backend(parjob::Backend::Sequential),
    Target::Backend(parjob::Backend::Threading),
    Target::Backend(parjob::Backend::Process),
    Target::CustomPool,
];

/// The threading backend and a custom pool: in-process pools whose tasks may share state.
pub const IN_PROCESS: [Target; 2] = [
    Target::Backend(parjob::Backend::Threading),
    Target::CustomPool,
];

impl Target {
    /// A `Parallel` of `n_jobs` workers running on this target.
    pub fn parallel(self, n_jobs: i32) -> parjob::Parallel {
        match self {
            Target::Backend(backend) => parjob::Parallel::new(n_jobs).backend(backend),
            Target::CustomPool => {
                let workers = usize::try_from(n_jobs).unwrap_or(1).max(1);
                parjob::Parallel::new(n_jobs)
                    .with_pool(std::sync::Arc::new(CountingPool::new(workers)))
            }
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Backend(backend) => write!(f, "{backend}"),
            Target::CustomPool => f.write_str("custom pool"),
        }
    }
}

/// A pool of the tests' own, the shape of `examples/custom_pool.rs`: it counts the batches it
/// is given and lets the threading backend's pool run them.
pub struct CountingPool {
    threads: parjob::pool::ThreadPool,
    batches: std::sync::atomic::AtomicUsize,
}

impl CountingPool {
    /// A pool of `workers` threads.
    pub fn new(workers: usize) -> CountingPool {
        CountingPool {
            threads: parjob::pool::ThreadPool::new(workers).expect("threads start"),
            batches: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// Batches submitted so far.
    pub fn batches(&self) -> usize {
        self.batches.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl parjob::pool::Pool for CountingPool {
    fn workers(&self) -> usize {
        self.threads.workers()
    }

    fn submit(&self, job: parjob::pool::Job) {
        self.batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.threads.submit(job);
    }

    fn target_batch_duration(&self) -> Duration {
        self.threads.target_batch_duration()
    }

    fn verbose_name(&self) -> &'static str {
        "CountingBackend"
    }
}

/// Whether `error` is task `index`'s timeout at `limit` on the process backend: its worker
/// killed, and named (index in its pool and pid).
pub fn killed_at_its_limit(error: &parjob::Error, index: usize, limit: Duration) -> bool {
    matches!(
        error,
        parjob::Error::Timeout {
            index: i,
            after,
            killed: true,
            worker: Some(_),
            pid: Some(_),
            ..
        } if *i == index && *after == limit
    )
}

/// A `worker_exe` shell script in a new temporary directory: `body`, with `{exe}` replaced by
/// this test binary's path.
pub fn wrapper_script(body: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let script = dir.path().join("worker.sh");
    let exe = std::env::current_exe().expect("the test binary knows its own path");
    let text = format!(
        "#!/bin/sh\n{}\n",
        body.replace("{exe}", &exe.to_string_lossy())
    );
    std::fs::write(&script, text).expect("the script is written");
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))
        .expect("the script is made executable");
    (dir, script)
}

/// The error of a one-task run on a process pool whose `worker_exe` is a
/// [`wrapper_script`] of `body`, as text; panics if the run worked.
pub fn error_through_wrapper(body: &str) -> String {
    fn square(x: u64) -> u64 {
        x * x
    }
    let (_dir, script) = wrapper_script(body);
    match parjob::Parallel::new(1)
        .backend(parjob::Backend::Process)
        .worker_exe(&script)
        .run([parjob::delayed(square, 3)])
    {
        Ok(out) => panic!("the run through `{body}` worked: {out:?}"),
        Err(error) => error.to_string(),
    }
}
