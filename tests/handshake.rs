//! The process backend's handshake under attack and under stress: a rogue client that connects
//! first, a permissive umask, a descriptor shortage, a pool closed mid-handshake, and the
//! processes a task leaves behind when its worker is killed.
//!
//! Tests that change process-wide state (the umask, the open-file limit, `TMPDIR`) or count
//! descriptors run in a child process (`run_child_test`), each with a temp directory of its own
//! so that what they count or race for is theirs alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use parjob::{Backend, Error, Parallel, delayed};
use parjob_tests::run_child_test;

// `enable_test_support!` is in `process.rs`: one per test binary.

fn processes(n_jobs: i32) -> Parallel {
    Parallel::new(n_jobs).backend(Backend::Process)
}

fn my_pid(_: u32) -> u32 {
    std::process::id()
}

/// A fresh, empty directory for one child test's `TMPDIR`; removed by the caller.
fn private_temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("parjob-handshake-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Runs child test `name` with `TMPDIR` set to a directory of its own, then removes it (also
/// when the child test fails).
fn run_with_private_temp_dir(name: &str) -> std::process::Output {
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Removed(private_temp_dir(name.rsplit("::").next().unwrap_or(name)));
    run_child_test(name, &[("TMPDIR", dir.0.to_str().unwrap())])
}

/// What workers leave in `dir`: every entry of the private root (each worker's own directory,
/// `w-<pid>-<n>`, with its server's `.tmpXXXXXX/socket` inside, removed by the driver when
/// the worker ends), and server directories made in `dir` itself (were the root unusable).
fn socket_dirs(dir: &Path) -> Vec<PathBuf> {
    let mark = format!("w-{}.lock", std::process::id());
    let in_root = std::fs::read_dir(socket_root(dir))
        .into_iter()
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(move |p| !p.ends_with(&mark));
    let in_dir = std::fs::read_dir(dir)
        .into_iter()
        .flat_map(|entries| entries.flatten().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with(".tmp"))
        });
    in_root.chain(in_dir).collect()
}

/// `<temporary directory>/parjob-<uid>`: where the process backend has ipc-channel make its
/// handshake sockets.
fn socket_root(dir: &Path) -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    dir.join(format!("parjob-{}", unsafe { libc::geteuid() }))
}

fn open_descriptors() -> usize {
    // Not the listing itself, nor this driver's mark (`w-<pid>.lock`, held for the life of
    // the process from its first worker on, see `a_dead_drivers_worker_homes_are_swept`).
    let mark = format!("w-{}.lock", std::process::id());
    let listing = PathBuf::from(format!("/proc/{}/fd", std::process::id()));
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| !target.ends_with(&mark) && target != listing)
        })
        .count()
}

/// Waits (up to 10 s) until `done` holds: helper threads of dead workers close their last
/// descriptors as they end.
fn eventually(mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    true
}

/// Whether `pid` runs (a zombie counts as dead).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        stat.rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
    })
}

/// Pids of this process's children.
fn children() -> Vec<u32> {
    let me = std::process::id();
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let parent = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok());
        if parent == Some(me) {
            out.push(pid);
        }
    }
    out
}

/// Writes an executable shell script into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

// ---------------------------------------------------------------- the socket's directory

// A stranger that reaches a worker's server first (only this user can: it is in a private
// directory) is refused by the worker, which exits without running anything: see the unit
// tests of `parjob-process`'s `worker` module. The driver itself has no server: a worker's
// line back is a socket pair it made (see `faults.rs` for a task that forges on it).

#[test]
fn the_handshake_socket_is_private_even_under_umask_000() {
    run_with_private_temp_dir("handshake::child_checks_the_socket_mode");
}

#[test]
#[ignore = "run by the_handshake_socket_is_private_even_under_umask_000"]
fn child_checks_the_socket_mode() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: umask has no preconditions; this process exists for this test alone.
    unsafe { libc::umask(0) };
    let dir = std::env::temp_dir();
    // Workers open their servers under the private root, whatever the umask.
    let pids = processes(2)
        .run((0..4u32).map(|i| delayed(my_pid, i)))
        .unwrap();
    assert_eq!(pids.len(), 4);
    let root_mode = std::fs::metadata(socket_root(&dir))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(root_mode, 0o700, "root mode {root_mode:o}");
    // And each server went away once the driver connected to it.
    assert!(
        eventually(|| socket_dirs(&dir).is_empty()),
        "socket directories left: {:?}",
        socket_dirs(&dir)
    );
}

// ---------------------------------------------------------------- a descriptor shortage

#[test]
fn a_descriptor_shortage_is_a_passing_error_not_a_missing_init() {
    run_child_test("handshake::child_runs_short_of_descriptors", &[]);
}

#[test]
#[ignore = "run by a_descriptor_shortage_is_a_passing_error_not_a_missing_init"]
fn child_runs_short_of_descriptors() {
    // Warm up: ipc-channel's own lazily made sockets exist before the limit is lowered.
    assert_eq!(processes(1).run([delayed(my_pid, 0)]).unwrap().len(), 1);
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid resource and a writable rlimit.
    let got = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(got, 0);
    let original = limit.rlim_cur;
    let set_soft = |soft: u64| {
        let lowered = libc::rlimit {
            rlim_cur: soft,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: setrlimit with a valid resource and rlimit; the soft limit stays under the
        // hard one.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lowered) }, 0);
    };
    // Every number of spare descriptors from none to plenty: the start fails at each step of
    // the handshake in turn (spawning, accepting, receiving the Hello's channels).
    let mut failures = Vec::new();
    for spare in 0..16u64 {
        let open = open_descriptors() as u64;
        set_soft(open + spare);
        let result = processes(1).run([delayed(my_pid, 0)]);
        set_soft(original);
        if let Err(err) = result {
            failures.push(err);
        }
        // The failed start's helper threads close what they held.
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!failures.is_empty(), "no start failed");
    for err in &failures {
        let text = err.to_string();
        assert!(matches!(err, Error::Worker { .. }), "{err:?}");
        assert!(!text.contains("parjob::init()"), "{text}");
        assert!(
            text.to_lowercase().contains("too many open files"),
            "{text}"
        );
    }
    // The shortage passed: the executable was not written off as "not a worker program".
    let pids = processes(2)
        .run((0..4u32).map(|i| delayed(my_pid, i)))
        .unwrap();
    assert_eq!(pids.len(), 4);
}

// ---------------------------------------------------------------- no leaks after a failure

#[test]
fn failed_starts_leak_no_descriptor_or_socket_directory() {
    run_with_private_temp_dir("handshake::child_fails_to_start");
}

#[test]
#[ignore = "run by failed_starts_leak_no_descriptor_or_socket_directory"]
fn child_fails_to_start() {
    let before = open_descriptors();
    for _ in 0..5 {
        let err = processes(2)
            .worker_exe("/bin/false")
            .run([delayed(my_pid, 0)])
            .unwrap_err();
        assert!(err.to_string().contains("exit status 1"), "{err}");
    }
    let dir = std::env::temp_dir();
    assert!(
        eventually(|| open_descriptors() == before && socket_dirs(&dir).is_empty()),
        "{} descriptors open, {before} before; socket directories left: {:?}",
        open_descriptors(),
        socket_dirs(&dir)
    );
}

#[test]
fn a_pool_closed_mid_handshake_leaves_no_socket_directory_or_descriptor() {
    run_with_private_temp_dir("handshake::child_closes_mid_handshake");
}

#[test]
#[ignore = "run by a_pool_closed_mid_handshake_leaves_no_socket_directory_or_descriptor"]
fn child_closes_mid_handshake() {
    fn abort(_: u32) -> u32 {
        std::process::abort()
    }
    let dir = std::env::temp_dir();
    // A worker that takes its time to start, so that the pool is closed while the
    // replacement of a crashed worker is still in its handshake.
    let exe = std::env::current_exe().unwrap();
    let slow = script(
        &dir,
        "slow-worker",
        &format!("sleep 0.5; exec '{}' \"$@\"", exe.display()),
    );
    let before = open_descriptors();
    for _ in 0..3 {
        let parallel = processes(1).worker_exe(&slow);
        assert_eq!(parallel.run([delayed(my_pid, 0)]).unwrap().len(), 1);
        let first = children();
        let err = parallel.run([delayed(abort, 0)]).unwrap_err();
        assert!(matches!(err, Error::WorkerCrashed { .. }), "{err:?}");
        // The replacement is spawned at once; its server is open until it connects.
        assert!(
            eventually(|| children().iter().any(|pid| !first.contains(pid))),
            "no replacement was started"
        );
        drop(parallel);
    }
    assert!(
        eventually(|| open_descriptors() == before && socket_dirs(&dir).is_empty()),
        "{} descriptors open, {before} before; socket directories left: {:?}",
        open_descriptors(),
        socket_dirs(&dir)
    );
}

#[test]
fn workers_killed_at_random_in_their_starts_leave_no_directory_or_descriptor() {
    run_with_private_temp_dir("handshake::child_kills_starting_workers");
}

#[test]
#[ignore = "run by workers_killed_at_random_in_their_starts_leave_no_directory_or_descriptor"]
fn child_kills_starting_workers() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    let dir = std::env::temp_dir();
    let before = open_descriptors();
    // A killer thread sends SIGKILL to a random child every 2 ms, landing in every step of
    // the starts (before the server exists, between it and the Hello, mid-handshake) as well
    // as in running tasks. Before the driver made each worker's directory itself, a storm
    // like this left a directory behind for about one kill in ten.
    let stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU32::new(0));
    let killer = {
        let stop = Arc::clone(&stop);
        let kills = Arc::clone(&kills);
        std::thread::spawn(move || {
            let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
            while !stop.load(Ordering::Relaxed) {
                let pids = children();
                if !pids.is_empty() {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    let pid = pids[(seed % pids.len() as u64) as usize];
                    // SAFETY: kill with a valid signal; `pid` is a child of this process.
                    unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                    kills.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while kills.load(Ordering::Relaxed) < 300 && Instant::now() < deadline {
        // Whatever each run returns (values, crashes, a start that failed): only what is left
        // afterwards counts here.
        let parallel = processes(2).batch_size(parjob::BatchSize::Fixed(1));
        let _ = parallel.run((0..20u32).map(|i| delayed(my_pid, i)));
        drop(parallel);
    }
    stop.store(true, Ordering::Relaxed);
    killer.join().unwrap();
    let kills = kills.load(Ordering::Relaxed);
    assert!(kills >= 300, "only {kills} kills in 30 s");
    assert!(
        eventually(|| open_descriptors() <= before && socket_dirs(&dir).is_empty()),
        "after {kills} kills: {} descriptors open, {before} before; left behind: {:?}",
        open_descriptors(),
        socket_dirs(&dir)
    );
}

// ---------------------------------------------------------------- a task's own processes

// The `sleep` is never waited for on purpose: the test is that it dies with the worker.
#[allow(clippy::zombie_processes)]
fn start_a_sleep_then_hang(pid_file: String) -> u32 {
    let sleep = Command::new("sleep")
        .arg("1000")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::fs::write(&pid_file, sleep.id().to_string()).unwrap();
    std::thread::sleep(Duration::from_secs(120));
    sleep.id()
}

/// The `PARJOB_PROCESS_*` variables this task sees, and those a program it starts sees.
fn parjob_variables_seen(_: ()) -> (Vec<String>, Vec<String>) {
    let own = std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("PARJOB_PROCESS_"))
        .collect();
    let output = Command::new("env").output().expect("env runs");
    let child = String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter(|line| line.starts_with("PARJOB_PROCESS_"))
        .map(str::to_owned)
        .collect();
    (own, child)
}

#[test]
fn a_worker_keeps_its_driver_variables_from_its_tasks_and_their_programs() {
    let seen = processes(2)
        .run((0..2).map(|_| delayed(parjob_variables_seen, ())))
        .unwrap();
    for (own, child) in seen {
        assert!(own.is_empty(), "a task sees {own:?}");
        assert!(child.is_empty(), "a program a task started sees {child:?}");
    }
}

#[test]
fn a_process_a_task_started_is_killed_with_its_worker() {
    let pid_file = std::env::temp_dir().join(format!(
        "parjob-task-child-{}-{:?}",
        std::process::id(),
        Instant::now()
    ));
    let path = pid_file.to_str().unwrap().to_owned();
    let err = processes(1)
        .timeout(Duration::from_millis(500))
        .run([delayed(start_a_sleep_then_hang, path)])
        .unwrap_err();
    assert!(
        matches!(err, Error::Timeout { killed: true, .. }),
        "{err:?}"
    );
    let sleep: u32 = std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&pid_file);
    let gone = eventually(|| !alive(sleep));
    if !gone {
        // SAFETY: killing the stray `sleep` this test's task started, so it does not linger.
        unsafe { libc::kill(sleep as i32, libc::SIGKILL) };
    }
    assert!(
        gone,
        "the task's `sleep` (pid {sleep}) outlived its killed worker"
    );
}

/// A driver ended by SIGKILL (or SIGTERM) cannot remove its workers' homes
/// (`parjob-<uid>/w-<pid>-<n>`): an attacker's session left 33 behind. The next driver to
/// start a worker removes those of drivers whose mark (`w-<pid>.lock`) nobody holds any more,
/// and leaves a live driver's alone.
#[test]
fn a_dead_drivers_worker_homes_are_swept_by_the_next_driver() {
    use std::io::{BufRead, BufReader};
    struct Removed(PathBuf);
    impl Drop for Removed {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let dir = Removed(private_temp_dir("sweep"));
    let start_holder = || {
        let exe = std::env::current_exe().unwrap();
        let mut child = Command::new(exe)
            .args([
                "handshake::child_holds_a_pool",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("TMPDIR", &dir.0)
            .env_remove("PARJOB_BACKEND")
            .env_remove("PARJOB_N_JOBS")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let ready = lines.any(|line| line.is_ok_and(|l| l.contains("HOLDING")));
        assert!(ready, "the child never started its pool");
        child
    };
    let homes_of = |pid: u32| -> Vec<PathBuf> {
        let prefix = format!("w-{pid}-");
        std::fs::read_dir(socket_root(&dir.0))
            .into_iter()
            .flat_map(|entries| entries.flatten().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
            })
            .collect()
    };
    let mut dead = start_holder();
    let mut alive = start_holder();
    assert!(!homes_of(dead.id()).is_empty() && !homes_of(alive.id()).is_empty());
    dead.kill().unwrap();
    dead.wait().unwrap();
    // Its workers see their driver gone and exit; their homes stay.
    assert!(!homes_of(dead.id()).is_empty(), "nothing left to sweep");
    let output = run_child_test(
        "handshake::child_starts_a_pool",
        &[("TMPDIR", dir.0.to_str().unwrap())],
    );
    drop(output);
    let swept = eventually(|| homes_of(dead.id()).is_empty());
    let kept = homes_of(alive.id());
    let _ = alive.kill();
    let _ = alive.wait();
    assert!(swept, "left: {:?}", homes_of(dead.id()));
    assert!(!kept.is_empty(), "a live driver's homes were swept");
}

#[test]
#[ignore = "run by a_dead_drivers_worker_homes_are_swept_by_the_next_driver"]
fn child_holds_a_pool() {
    let parallel = processes(2);
    assert_eq!(
        parallel
            .run([delayed(my_pid, 0), delayed(my_pid, 1)])
            .unwrap()
            .len(),
        2
    );
    println!("HOLDING");
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
#[ignore = "run by a_dead_drivers_worker_homes_are_swept_by_the_next_driver"]
fn child_starts_a_pool() {
    let parallel = processes(1);
    assert_eq!(parallel.run([delayed(my_pid, 0)]).unwrap().len(), 1);
    // The sweep runs on a thread of its own: give it time before the process ends.
    std::thread::sleep(Duration::from_millis(300));
}
