//! Starting a worker process and watching it: the command line, the handshake, and the
//! threads that report its replies and its death.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcBytesSender, IpcOneShotServer, IpcSender, IpcSharedMemory};
use parjob_core::{Error, SharedSegment, WorkerExit, cpu_count};

use crate::ProcessOptions;
use crate::build_id::build_id;
use crate::wire::{
    Board, ENV_INDEX, ENV_SERVER, FLAG_NEW_ARENA, Hello, MSG_DONE, MSG_INIT_FAILED, MSG_READY,
    MSG_WELCOME, PROTOCOL, Shipment,
};
use crate::worker::offset_of;

/// How long a started process may take to connect.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);

/// How long an initializer may run: as long as it needs (loading a model can take minutes);
/// its death or the pool's closing still ends the wait.
const INITIALIZER_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// Set by `enable_test_support!` in a test binary: re-execute it through its harness.
static TEST_SUPPORT: AtomicBool = AtomicBool::new(false);

/// The name of the test function `enable_test_support!` defines; the harness runs it as a
/// substring filter, so the test may live in any module.
pub const TEST_WORKER_NAME: &str = "__parjob_test_worker";

/// Marks this executable as a test binary whose harness runs `TEST_WORKER_NAME`.
pub fn enable_test_support() {
    TEST_SUPPORT.store(true, Ordering::Relaxed);
    parjob_core::set_shared_allocator(crate::shared::allocate);
    crate::worker::raise_descriptor_limit();
}

/// What a supervisor hears about its worker, from the threads watching it.
pub(crate) enum Event {
    /// The handshake's hello arrived (or the server failed).
    Hello {
        generation: u64,
        hello: Result<Box<Hello>, String>,
    },
    /// A message on the results channel, with the new arena it announced, if any.
    Reply {
        generation: u64,
        bytes: Vec<u8>,
        shared: Option<IpcSharedMemory>,
    },
    /// The results channel closed: the worker is dead or dying.
    Disconnected { generation: u64 },
    /// The process ended; `status` says how (`exit status 3`, `killed by signal 9 (SIGKILL)`).
    Exited { generation: u64, status: WorkerExit },
    /// The pool is shutting down.
    Close,
}

/// A child process, killed only while it is known not to be reaped (so a recycled pid is
/// never signalled).
pub(crate) struct ChildWatch {
    pub(crate) pid: u32,
    reaped: Mutex<bool>,
}

impl ChildWatch {
    pub(crate) fn kill(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if !*reaped {
            // SAFETY: the process is our child and not reaped, so `pid` still names it.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Waits for the process to end without reaping it, then reaps it under the lock that
    /// `kill` takes. Returns how it ended.
    fn wait(&self) -> WorkerExit {
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waiting on our own child with a valid out-pointer.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        let mut reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited (or never existed: then -1).
        let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
        *reaped = true;
        if r < 0 {
            return WorkerExit::Lost("lost (its exit status could not be read)".into());
        }
        describe_status(status)
    }
}

/// How a process ended, from its `waitpid` status.
pub(crate) fn describe_status(status: libc::c_int) -> WorkerExit {
    if libc::WIFEXITED(status) {
        WorkerExit::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WorkerExit::Signaled(libc::WTERMSIG(status))
    } else {
        WorkerExit::Lost(format!("ended with wait status {status:#x}"))
    }
}

/// A worker process that completed the handshake.
pub(crate) struct Worker {
    pub(crate) pid: u32,
    pub(crate) generation: u64,
    pub(crate) tasks: IpcBytesSender,
    pub(crate) big_tasks: IpcSender<Shipment>,
    pub(crate) board: Board,
    pub(crate) child: Arc<ChildWatch>,
    /// The driver's mapping of the shared segment big frames are written into.
    pub(crate) task_arena: Option<IpcSharedMemory>,
    /// The driver's mapping of the worker's segment for big outcome frames.
    pub(crate) result_arena: Option<IpcSharedMemory>,
    /// The `SharedSlice` segments this worker has mapped, to send each once and to tell it
    /// when the driver drops one.
    pub(crate) segments: HashMap<u64, Weak<SharedSegment>>,
    /// Tasks run since it started, for `max_tasks_per_worker`.
    pub(crate) tasks_run: usize,
    /// Disconnected once the worker's stdout and stderr are forwarded to their end.
    pub(crate) output_done: Receiver<()>,
}

/// Everything a supervisor needs to start workers.
pub(crate) struct Starter<'a> {
    pub(crate) index: usize,
    pub(crate) workers: usize,
    pub(crate) options: &'a ProcessOptions,
    pub(crate) events_tx: &'a Sender<Event>,
    pub(crate) events: &'a Receiver<Event>,
}

/// This process's own executable file, whatever has happened to its path since.
const SELF_EXE: &str = "/proc/self/exe";

fn worker_exe(options: &ProcessOptions) -> Result<PathBuf, String> {
    match &options.worker_exe {
        Some(path) => Ok(path.clone()),
        None => std::env::current_exe()
            .map_err(|e| format!("cannot find this program's executable to re-run: {e}")),
    }
}

/// Executables whose worker ended with status 0 before its handshake, with the error it gave:
/// such a program does not enter the worker loop (no `parjob::init()` first in `main`, or a
/// test binary without `enable_test_support!`), so every new worker would only run the whole
/// program again. Later pools report the same error without starting one.
static NOT_WORKERS: Mutex<Vec<(PathBuf, String)>> = Mutex::new(Vec::new());

fn driver_exe() -> String {
    std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "<this program>".into())
}

impl Starter<'_> {
    fn error(&self, message: String) -> Error {
        Error::worker(self.index, message)
    }

    /// Starts worker generation `generation` and runs the handshake. Must be called on a
    /// thread that outlives the worker: `PR_SET_PDEATHSIG` fires when the spawning thread ends.
    pub(crate) fn start(&self, generation: u64) -> Result<Worker, Error> {
        let exe = worker_exe(self.options).map_err(|m| self.error(m))?;
        if let Some((_, message)) = NOT_WORKERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(known, _)| *known == exe)
        {
            return Err(self.error(format!(
                "{message} (seen earlier in this run; no new worker was started)"
            )));
        }
        let (server, name) = IpcOneShotServer::<Hello>::new()
            .map_err(|e| self.error(format!("cannot open the handshake server: {e}")))?;

        let mut command = if self.options.worker_exe.is_none() && Path::new(SELF_EXE).exists() {
            // The very file this process runs, even if a rebuild has since replaced or
            // deleted it at `exe` (which would then be another build, refused).
            let mut command = Command::new(SELF_EXE);
            command.arg0(&exe);
            command
        } else {
            Command::new(&exe)
        };
        if TEST_SUPPORT.load(Ordering::Relaxed) {
            // A test binary's `main` is the harness: have it run only the worker test.
            command.args([TEST_WORKER_NAME, "--nocapture", "--test-threads=1", "-q"]);
        } else if exe.parent().and_then(|p| p.file_name()) == Some("deps".as_ref()) {
            // Probably a test binary without `enable_test_support!`: make its harness run no
            // test (instead of every test, as workers) so the error below comes quickly.
            command.args(["--exact", "__parjob_test_support_is_not_enabled", "-q"]);
        }
        command
            .env(ENV_SERVER, format!("{}:{name}", std::process::id()))
            .env(ENV_INDEX, self.index.to_string())
            // A Parallel inside a task defaults to sequential: the pool already uses the CPUs.
            .env("PARJOB_BACKEND", "sequential")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let threads = (cpu_count() / self.workers.max(1)).max(1).to_string();
        for var in ["RAYON_NUM_THREADS", "OMP_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                command.env(var, &threads);
            }
        }
        // No pre_exec: std then spawns with posix_spawn (vfork-like), whose cost does not grow
        // with this process's memory; a fork copies its page tables (65 ms for a pool of 2
        // next to 1 GB of data). The worker sets its parent-death signal itself, in `init`.
        let mut child = spawn_retrying(&mut command).map_err(|e| {
            self.error(format!(
                "cannot start worker executable {}: {e}",
                exe.display()
            ))
        })?;
        let (output_tx, output_done) = std::sync::mpsc::channel();
        let prefix = self
            .options
            .prefix_output
            .then(|| format!("[worker {}] ", self.index));
        if let Some(out) = child.stdout.take() {
            forward_lines(out, Sink::Stdout, prefix.clone(), output_tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, Sink::Stderr, prefix, output_tx);
        }
        let child = Arc::new(ChildWatch {
            pid: child.id(),
            reaped: Mutex::new(false),
        });
        let pid = child.pid;
        let watch = Arc::clone(&child);
        let tx = self.events_tx.clone();
        spawn_thread(format!("parjob-wait-{pid}"), move || {
            let status = watch.wait();
            let _ = tx.send(Event::Exited { generation, status });
        })
        .map_err(|e| self.error(e))?;
        let tx = self.events_tx.clone();
        spawn_thread(format!("parjob-accept-{pid}"), move || {
            let hello = server
                .accept()
                .map(|(_, hello)| Box::new(hello))
                .map_err(|e| e.to_string());
            let _ = tx.send(Event::Hello { generation, hello });
        })
        .map_err(|e| self.error(e))?;

        // Set once this worker's Exited event has been consumed (it is then reaped).
        let reaped = std::cell::Cell::new(false);
        let fail = |message: String| {
            child.kill();
            // Reap it before reporting, so that no zombie outlives the error (or the pool).
            if !reaped.get() {
                await_exit(self.events, self.events_tx, generation);
            }
            self.error(format!(
                "worker process {pid} ({}): {message}",
                exe.display()
            ))
        };
        let mut deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        let hello = loop {
            match self.next_event(deadline) {
                Some(Event::Hello {
                    generation: g,
                    hello,
                }) if g == generation => match hello {
                    Ok(hello) => break hello,
                    Err(e) => return Err(fail(format!("handshake failed: {e}"))),
                },
                Some(Event::Exited {
                    generation: g,
                    status,
                }) if g == generation => {
                    reaped.set(true);
                    // Unblock the accept thread (ipc-channel #201, #261): connect and hang up.
                    if let Ok(sender) = IpcSender::<Hello>::connect(name.clone()) {
                        drop(sender);
                    }
                    let error = fail(format!(
                        "ended before the handshake ({status}); a worker program must call \
                         parjob::init() first thing in main, and a test binary needs \
                         parjob::enable_test_support!()"
                    ));
                    if status.is_success() {
                        if let Error::Worker { message, .. } = &error {
                            NOT_WORKERS
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push((exe.clone(), message.clone()));
                        }
                    }
                    return Err(error);
                }
                Some(Event::Close) => return Err(fail("the pool is shutting down".into())),
                Some(_) => {}
                None => {
                    child.kill();
                    return Err(fail(format!(
                        "did not connect within {HANDSHAKE_TIMEOUT:?}; does its main call \
                         parjob::init() first?"
                    )));
                }
            }
        };
        if hello.protocol != PROTOCOL || hello.build_id != build_id() {
            return Err(fail(format!(
                "refused: worker executable {} (pid {}, build {}, protocol {}) is not the same \
                 build as the driver executable {} (build {}, protocol {PROTOCOL}); a worker \
                 must be this very build of the program",
                hello.exe,
                hello.pid,
                hello.build_id,
                hello.protocol,
                driver_exe(),
                build_id()
            )));
        }
        let Hello {
            tasks,
            big_tasks,
            results,
            big_results,
            board,
            ..
        } = *hello;
        let board = Board::from_shared(board)
            .ok_or_else(|| fail("sent an unusable status board".into()))?;
        let tx = self.events_tx.clone();
        spawn_thread(format!("parjob-read-{pid}"), move || {
            while let Ok(bytes) = results.recv() {
                let shared = if bytes.first() == Some(&MSG_DONE)
                    && bytes.get(1).is_some_and(|f| f & FLAG_NEW_ARENA != 0)
                {
                    match big_results.recv() {
                        Ok(shared) => Some(shared),
                        Err(_) => break,
                    }
                } else {
                    None
                };
                let reply = Event::Reply {
                    generation,
                    bytes,
                    shared,
                };
                if tx.send(reply).is_err() {
                    return;
                }
            }
            // Close the channels before saying so: whoever hears of the disconnection may
            // count this process's file descriptors.
            drop(results);
            drop(big_results);
            let _ = tx.send(Event::Disconnected { generation });
        })
        .map_err(&fail)?;

        let mut welcome = vec![MSG_WELCOME];
        welcome.extend_from_slice(&(self.options.max_nbytes as u64).to_le_bytes());
        match self.options.initializer {
            Some(f) => {
                welcome.push(1);
                welcome.extend_from_slice(&offset_of(f.0 as usize).to_le_bytes());
            }
            None => welcome.extend_from_slice(&[0; 9]),
        }
        tasks
            .send(&welcome)
            .map_err(|e| fail(format!("cannot send the welcome: {e}")))?;
        // Set once the process has ended: its last reply may still be on its way.
        let mut ended: Option<WorkerExit> = None;
        deadline = Instant::now() + INITIALIZER_TIMEOUT;
        loop {
            match self.next_event(deadline) {
                Some(Event::Reply {
                    generation: g,
                    bytes,
                    ..
                }) if g == generation => match bytes.first() {
                    Some(&MSG_READY) => break,
                    Some(&MSG_INIT_FAILED) => {
                        return Err(fail(format!(
                            "the initializer panicked: {}",
                            String::from_utf8_lossy(&bytes[1..])
                        )));
                    }
                    _ => return Err(fail("sent a malformed reply to the welcome".into())),
                },
                Some(Event::Exited {
                    generation: g,
                    status,
                }) if g == generation => {
                    reaped.set(true);
                    ended = Some(status);
                    deadline = deadline.min(Instant::now() + Duration::from_millis(200));
                }
                Some(Event::Disconnected { generation: g }) if g == generation => {
                    if let Some(status) = ended {
                        return Err(fail(format!("ended during its initializer ({status})")));
                    }
                }
                Some(Event::Close) => return Err(fail("the pool is shutting down".into())),
                Some(_) => {}
                None => {
                    return Err(fail(match ended {
                        Some(status) => format!("ended during its initializer ({status})"),
                        None => {
                            format!("its initializer did not finish within {INITIALIZER_TIMEOUT:?}")
                        }
                    }));
                }
            }
        }
        Ok(Worker {
            pid,
            generation,
            tasks,
            big_tasks,
            board,
            child,
            tasks_run: 0,
            output_done,
            task_arena: None,
            result_arena: None,
            segments: HashMap::new(),
        })
    }

    fn next_event(&self, deadline: Instant) -> Option<Event> {
        let left = deadline.saturating_duration_since(Instant::now());
        self.events.recv_timeout(left).ok()
    }
}

/// Spawns `command`, retrying a few times on `ETXTBSY`: the executable was just written and a
/// process forked meanwhile (by any thread of this program) still holds it open for writing
/// until it execs.
fn spawn_retrying(command: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match command.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 20 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(5));
            }
            other => return other,
        }
    }
}

/// Waits (up to a few seconds) until worker `generation`'s waiter reports it reaped, and says
/// how it ended. Other events are dropped, except `Close`, which is put back.
pub(crate) fn await_exit(
    events: &Receiver<Event>,
    events_tx: &Sender<Event>,
    generation: u64,
) -> Option<WorkerExit> {
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut close = false;
    let mut status = None;
    while let Ok(event) = events.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        match event {
            Event::Exited {
                generation: g,
                status: s,
            } if g == generation => {
                status = Some(s);
                break;
            }
            Event::Close => close = true,
            _ => {}
        }
    }
    if close {
        let _ = events_tx.send(Event::Close);
    }
    status
}

pub(crate) fn spawn_thread(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(256 << 10)
        .spawn(body)
        .map(drop)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

#[derive(Clone, Copy)]
enum Sink {
    Stdout,
    Stderr,
}

/// Copies a worker's output to ours a whole line at a time, so that lines of different
/// workers never interleave mid-line (stderr is unbuffered: one `eprintln!` may be several
/// writes). Under test support, the harness's own `running 1 test` banner is dropped.
fn forward_lines(
    pipe: impl std::io::Read + Send + 'static,
    sink: Sink,
    prefix: Option<String>,
    done: Sender<()>,
) {
    use std::io::{BufRead, Write};
    let body = move || {
        let _done = done;
        let mut reader = std::io::BufReader::new(pipe);
        let mut line = Vec::new();
        let mut banner = TEST_SUPPORT.load(Ordering::Relaxed) && matches!(sink, Sink::Stdout);
        let prefix = prefix.unwrap_or_default();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if banner {
                if line == b"\n" {
                    continue;
                }
                banner = false;
                if line.starts_with(b"running 1 test") {
                    continue;
                }
            }
            let mut text = Vec::with_capacity(prefix.len() + line.len() + 1);
            text.extend_from_slice(prefix.as_bytes());
            text.extend_from_slice(&line);
            if !text.ends_with(b"\n") {
                text.push(b'\n');
            }
            let _ = match sink {
                Sink::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&text).and_then(|()| out.flush())
                }
                Sink::Stderr => std::io::stderr().lock().write_all(&text),
            };
        }
    };
    // Without the thread the output is lost, not the worker: nothing to report.
    let _ = spawn_thread("parjob-output".into(), body);
}

/// Waits (briefly) until a dead worker's last output has been forwarded.
pub(crate) fn wait_for_output(worker: &Worker) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(()) | Err(RecvTimeoutError::Timeout) = worker
        .output_done
        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if Instant::now() >= deadline {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_the_shell_says_them() {
        // Wait statuses as waitpid encodes them: exit code in the second byte, signal in the
        // low seven bits.
        assert_eq!(describe_status(3 << 8).to_string(), "exit status 3");
        assert_eq!(describe_status(0).to_string(), "exit status 0");
        assert_eq!(
            describe_status(libc::SIGABRT).to_string(),
            "killed by signal 6 (SIGABRT)"
        );
        assert_eq!(
            describe_status(libc::SIGKILL).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_status(libc::SIGSEGV).to_string(),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(describe_status(40).to_string(), "killed by signal 40");
    }
}
