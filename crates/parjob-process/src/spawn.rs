//! Starting a worker process: the command line, the handshake, and the threads that report
//! its replies and its death to its supervisor.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use ipc_channel::ipc::{IpcBytesSender, IpcOneShotServer, IpcSender};
use parjob_core::{Error, ProcessOptions, WorkerExit, cpu_count};
use parjob_remote::{CodeOffset, DoneHeader, Identity, InitFailed, Kind, Welcome};

use crate::mapping::Arena;
use crate::shared::SentSegments;
use crate::watch::{ChildWatch, Sink, forward_lines, spawn_thread, wait_for_output};
use crate::wire::{Board, ENV_INDEX, ENV_SERVER, Hello, PROTOCOL, Shipment};

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
    crate::shared::install();
}

/// What a supervisor hears about its worker, from the threads watching it.
pub(crate) enum Event {
    /// The handshake's hello arrived (or the server failed).
    Hello {
        generation: u64,
        hello: Result<Box<Hello>, String>,
    },
    /// A message on the results channel, with the new result arena it announced, if any.
    Reply {
        generation: u64,
        bytes: Vec<u8>,
        new_arena: Option<Arena>,
    },
    /// The results channel closed: the worker is dead or dying.
    Disconnected { generation: u64 },
    /// The process ended; `status` says how (`exit status 3`, `killed by signal 9 (SIGKILL)`).
    Exited { generation: u64, status: WorkerExit },
    /// The pool is shutting down.
    Close,
}

/// A pool's settings, with the initializer's offset measured once (and checked to be in the
/// executable) before any worker starts.
pub(crate) struct Settings {
    pub(crate) options: ProcessOptions,
    pub(crate) initializer: Option<CodeOffset>,
}

impl Settings {
    /// # Errors
    /// `Error::InvalidConfig` when the initializer is not in this program's executable.
    pub(crate) fn new(options: ProcessOptions) -> Result<Settings, Error> {
        let initializer = options
            .initializer
            .map(CodeOffset::of_initializer)
            .transpose()?;
        Ok(Settings {
            options,
            initializer,
        })
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
    /// The shared segment big task frames are written into (the worker has its own mapping).
    pub(crate) task_arena: Option<Arena>,
    /// The worker's segment for big outcome frames, kept between frames.
    pub(crate) result_arena: Option<Arena>,
    /// The `SharedSlice` segments this worker has mapped.
    pub(crate) segments: SentSegments,
    /// Tasks run since it started, for `max_tasks_per_worker`.
    pub(crate) tasks_run: usize,
    /// Disconnected once the worker's stdout and stderr are forwarded to their end.
    output_done: Receiver<()>,
}

impl Worker {
    /// Waits (briefly) until the dead worker's last output has been forwarded.
    pub(crate) fn wait_for_output(&self) {
        wait_for_output(&self.output_done);
    }
}

/// Everything a supervisor needs to start workers.
pub(crate) struct Starter<'a> {
    pub(crate) index: usize,
    pub(crate) workers: usize,
    pub(crate) settings: &'a Settings,
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

/// Executables whose worker ended with status 0 before its handshake: such a program does not
/// enter the worker loop (no `parjob::init()` first in `main`, or a test binary without
/// `enable_test_support!`), so every new worker would only run the whole program again. Later
/// pools report the same error without starting one.
static NOT_WORKERS: Mutex<Vec<NotAWorker>> = Mutex::new(Vec::new());

/// The first process of an executable that [`NOT_WORKERS`] records.
struct NotAWorker {
    exe: PathBuf,
    pid: u32,
}

/// Why a process that ended with `status` before its handshake is not a worker.
fn ended_before_handshake(status: &WorkerExit) -> String {
    format!(
        "ended before the handshake ({status}); a worker program must call parjob::init() \
         first thing in main, and a test binary needs parjob::enable_test_support!()"
    )
}

impl Starter<'_> {
    fn error(&self, message: String) -> Error {
        Error::worker(self.index, message)
    }

    /// Starts worker generation `generation` and runs the handshake. Must be called on a
    /// thread that outlives the worker: `PR_SET_PDEATHSIG` fires when the spawning thread ends.
    pub(crate) fn start(&self, generation: u64) -> Result<Worker, Error> {
        let options = &self.settings.options;
        let exe = worker_exe(options).map_err(|m| self.error(m))?;
        if let Some(known) = NOT_WORKERS
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|known| known.exe == exe)
        {
            return Err(self.error(format!(
                "worker process {} ({}): {} (seen earlier in this run; no new worker was \
                 started)",
                known.pid,
                known.exe.display(),
                ended_before_handshake(&WorkerExit::Exited(0))
            )));
        }
        let (server, name) = IpcOneShotServer::<Hello>::new()
            .map_err(|e| self.error(format!("cannot open the handshake server: {e}")))?;

        let mut command = if options.worker_exe.is_none() && Path::new(SELF_EXE).exists() {
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
        let prefix = options
            .prefix_output
            .then(|| format!("[worker {}] ", self.index));
        let test_support = TEST_SUPPORT.load(Ordering::Relaxed);
        if let Some(out) = child.stdout.take() {
            forward_lines(
                out,
                Sink::Stdout,
                prefix.clone(),
                test_support,
                output_tx.clone(),
            );
        }
        if let Some(err) = child.stderr.take() {
            forward_lines(err, Sink::Stderr, prefix, test_support, output_tx);
        }
        let child = Arc::new(ChildWatch::new(child.id()));
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
                    if status == WorkerExit::Exited(0) {
                        // A clean exit before the handshake: the program never became a worker
                        // and never will.
                        NOT_WORKERS
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(NotAWorker {
                                exe: exe.clone(),
                                pid,
                            });
                    }
                    return Err(fail(ended_before_handshake(&status)));
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
        let Hello {
            identity,
            tasks,
            big_tasks,
            results,
            big_results,
            board,
        } = *hello;
        // Nothing that names code is sent before this check.
        Identity::decode(&identity)
            .and_then(|identity| identity.check_same_build(PROTOCOL))
            .map_err(|e| fail(e.to_string()))?;
        let board = Board::from_shared(board)
            .ok_or_else(|| fail("sent an unusable status board".into()))?;
        let tx = self.events_tx.clone();
        spawn_thread(format!("parjob-read-{pid}"), move || {
            while let Ok(bytes) = results.recv() {
                let announces_arena = Kind::of(&bytes) == Ok(Kind::Done)
                    && DoneHeader::decode(&bytes).is_ok_and(|(done, _)| done.new_arena);
                let new_arena = if announces_arena {
                    match big_results.recv() {
                        Ok(memory) => Some(Arena::new(memory)),
                        Err(_) => break,
                    }
                } else {
                    None
                };
                let reply = Event::Reply {
                    generation,
                    bytes,
                    new_arena,
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

        let welcome = Welcome {
            max_nbytes: options.max_nbytes as u64,
            initializer: self.settings.initializer,
        };
        tasks
            .send(&welcome.encode())
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
                }) if g == generation => match Kind::of(&bytes) {
                    Ok(Kind::Ready) => break,
                    Ok(Kind::InitFailed) => {
                        let reason = InitFailed::decode(&bytes)
                            .map_or_else(|e| e.to_string(), |failed| failed.reason);
                        return Err(fail(reason));
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
            segments: SentSegments::default(),
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
