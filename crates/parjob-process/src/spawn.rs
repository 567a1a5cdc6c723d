//! Starting a worker process: the command line, the handshake, and the threads that report
//! its replies and its death to its supervisor.

use std::os::unix::process::CommandExt;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use std::os::fd::{AsFd, OwnedFd};

use ipc_channel::ipc::{self, IpcBytesSender, IpcSender};
use parjob_core::{Error, ProcessOptions, WorkerExit, cpu_count};
use parjob_remote::{
    CodeOffset, DoneHeader, HandshakeSecret, Identity, InitArgs, InitFailed, Kind, Nonce, Welcome,
};

use crate::link;
use crate::mapping::Arena;
use crate::shared::SentSegments;
use crate::watch::{
    ChildWatch, LastWords, Printed, Sink, forward_lines, spawn_thread, wait_for_output,
};
use crate::wire::{
    Board, ENV_DRIVER, ENV_HOME, ENV_INDEX, ENV_SECRET, EXIT_HANDSHAKE_FAILED, EXIT_NO_INIT,
    EXIT_NOT_DRIVERS_CHILD, EXIT_REFUSED_DRIVER, Hello, PROTOCOL, Shipment, WELCOMED,
};

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

/// Whether `enable_test_support!` marked this executable as a test binary.
pub(crate) fn test_support_enabled() -> bool {
    TEST_SUPPORT.load(Ordering::Relaxed)
}

/// What a supervisor hears about its worker, from the threads watching it.
pub(crate) enum Event {
    /// The worker's Hello arrived on its line (or something else did), in try `attempt` of
    /// the start.
    Hello {
        generation: u64,
        attempt: u32,
        hello: Result<Hello, String>,
    },
    /// A message on the worker's line, with the new result arena it announced, if any.
    Reply {
        generation: u64,
        bytes: Vec<u8>,
        new_arena: Option<Arena>,
    },
    /// The line closed: the worker is dead or dying. The reader's last event.
    Disconnected { generation: u64 },
    /// Something came on the line that no worker of this build sends (a message over the
    /// limit, a result arena that cannot be used): the worker cannot be trusted any more. The
    /// reader's last event.
    Broken { generation: u64, reason: String },
    /// The process ended; `status` says how (`exit status 3`, `killed by signal 9 (SIGKILL)`).
    Exited { generation: u64, status: WorkerExit },
    /// The pool is shutting down.
    Close,
    /// A job was queued while this slot's worker was busy, and the slot asked to hear of one
    /// to send it behind the frame out (see `Queue::want_ahead`).
    Queued,
}

/// A pool's settings, with the initializer's offset measured once (and checked to be in the
/// executable) before any worker starts.
pub(crate) struct Settings {
    pub(crate) options: ProcessOptions,
    pub(crate) initializer: Option<CodeOffset>,
    /// An initializer with arguments: its function's offset and the arguments
    /// (`initializer` is then its entry).
    pub(crate) with_args: Option<InitArgs>,
}

impl Settings {
    /// # Errors
    /// `Error::InvalidConfig` when the initializer is not in this program's executable.
    pub(crate) fn new(options: ProcessOptions) -> Result<Settings, Error> {
        if let Some(with) = &options.initializer_with {
            let (entry, function) = CodeOffset::of_initializer_with(with)?;
            return Ok(Settings {
                initializer: Some(entry),
                with_args: Some(InitArgs {
                    function,
                    args: with.args.to_vec(),
                }),
                options,
            });
        }
        let initializer = options
            .initializer
            .map(CodeOffset::of_initializer)
            .transpose()?;
        Ok(Settings {
            options,
            initializer,
            with_args: None,
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
    /// The worker's line to the driver, which its reader thread reads.
    line: Arc<OwnedFd>,
    /// How many more messages the worker may send on its line (see [`Allowance`]).
    allowance: Arc<Allowance>,
    /// The worker's temporary directory (its server's, and its tasks' `tempfile` default),
    /// removed when this is dropped: a worker killed cannot remove it itself.
    home: Option<WorkerHome>,
    /// Tasks run since it started, for `max_tasks_per_worker`.
    pub(crate) tasks_run: usize,
    /// Disconnected once the worker's stdout and stderr are forwarded to their end.
    output_done: Receiver<()>,
    /// How far its stdout and stderr are forwarded.
    printed: Vec<Arc<Printed>>,
    /// What its stderr said that names a death (see [`LastWords`]).
    last_words: LastWords,
}

impl Worker {
    /// The worker is sent a frame: it may send one more message, its `DONE`.
    pub(crate) fn expect_reply(&self) {
        self.allowance.grant(1);
    }

    /// Ends the worker's line for every process holding it: its reader thread stops at once,
    /// even if a process the worker started (and that escaped its kill) still holds the line.
    pub(crate) fn hang_up(&self) {
        link::hang_up(self.line.as_fd());
    }

    /// Lets go of the worker's arenas now (a killed worker left in a slot's graveyard keeps
    /// only what is needed to see it reaped).
    pub(crate) fn release_memory(&mut self) {
        self.task_arena = None;
        self.result_arena = None;
    }

    /// Waits (briefly) until what the worker printed so far has been forwarded: called when
    /// its `DONE` comes, so that a task's output is out before its result is.
    pub(crate) fn wait_until_printed(&self) {
        Printed::wait_until_all_out(&self.printed);
    }

    /// Waits (briefly) until the dead worker's last output has been forwarded.
    pub(crate) fn wait_for_output(&self) {
        wait_for_output(&self.output_done);
    }

    /// What the worker's stderr said that names why it died (after [`wait_for_output`]).
    pub(crate) fn last_words(&self) -> Option<String> {
        self.last_words.said()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Its reader thread ends now, even if a process the worker started (a daemon that
        // left its group) still holds the other end.
        self.hang_up();
        // Its home goes with it (`WorkerHome::drop`).
        self.home.take();
    }
}

/// How many more messages a worker may send on its line: a worker of this build sends one
/// `DONE` per `RUN` (and two messages in its handshake), so its reader stops, and the worker
/// is replaced, once it has read more than the driver asked for plus [`Allowance::SLACK`]
/// (which leaves room for the stray reply of a forked task, reported as such).
pub(crate) struct Allowance(std::sync::atomic::AtomicI64);

impl Allowance {
    /// Messages beyond those asked for that are still read (and judged by the supervisor).
    const SLACK: i64 = 4;

    fn new(asked: i64) -> Allowance {
        Allowance(std::sync::atomic::AtomicI64::new(asked + Allowance::SLACK))
    }

    fn grant(&self, messages: i64) {
        self.0.fetch_add(messages, Ordering::AcqRel);
    }

    /// Takes one message's allowance; `false` if there is none left.
    fn take(&self) -> bool {
        self.0.fetch_sub(1, Ordering::AcqRel) > 0
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

/// The first process of an executable that [`NOT_WORKERS`] records, and how it ended.
struct NotAWorker {
    exe: PathBuf,
    pid: u32,
    status: WorkerExit,
}

/// Why a process that ended with `status` before its handshake is not a worker.
fn ended_before_handshake(status: &WorkerExit) -> String {
    if *status == WorkerExit::Exited(EXIT_NO_INIT) {
        return format!(
            "ended before the handshake ({status}): it reached a parallel run without calling \
             parjob::init(), so it ran main from the top; a worker program must call \
             parjob::init() first thing in main"
        );
    }
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
    ///
    /// A start whose handshake another process reached first (or that the worker could not
    /// complete) is tried again with a new server and a new secret, up to [`START_ATTEMPTS`]
    /// times in all; each retry is announced on stderr, since it may mean that a stranger is
    /// trying to take this worker's place.
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
                "no new worker was started: an earlier worker process of this program's \
                 executable, pid {} ({}), {}",
                known.pid,
                known.exe.display(),
                ended_before_handshake(&known.status)
            )));
        }
        let mut attempt = 1;
        loop {
            match self.attempt(generation, attempt, &exe) {
                Ok(worker) => return Ok(worker),
                Err(Failed::Retry(error)) if attempt < START_ATTEMPTS => {
                    eprintln!(
                        "parjob: {error}; starting it again with a new server and secret \
                         (attempt {} of {START_ATTEMPTS})",
                        attempt + 1
                    );
                    attempt += 1;
                }
                Err(Failed::Retry(error) | Failed::Final(error)) => return Err(error),
            }
        }
    }

    /// One try at starting the worker: a new line, a new secret, a new process.
    fn attempt(&self, generation: u64, attempt: u32, exe: &Path) -> Result<Worker, Failed> {
        let options = &self.settings.options;
        let final_error = |message: String| Failed::Final(self.error(message));
        let secret = HandshakeSecret::random()
            .map_err(|e| final_error(format!("cannot make a handshake secret: {e}")))?;
        // The worker's line back: a socket pair nobody else can connect to. Everything the
        // driver receives from the worker comes on it, read with limits (see `link`).
        let (line, worker_end) = link::pair().map_err(|e| {
            let message = format!("cannot make the worker's line: {}", describe_io(&e));
            Failed::Final(Error::worker_io(self.index, message, e))
        })?;

        let home = WorkerHome::make().map_err(|why| {
            final_error(format!(
                "cannot make the worker's temporary directory: {why}"
            ))
        })?;
        let mut command = if options.worker_exe.is_none() && Path::new(SELF_EXE).exists() {
            // The very file this process runs, even if a rebuild has since replaced or
            // deleted it at `exe` (which would then be another build, refused).
            let mut command = Command::new(SELF_EXE);
            command.arg0(exe);
            command
        } else {
            Command::new(exe)
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
            .env(ENV_DRIVER, std::process::id().to_string())
            .env(ENV_INDEX, self.index.to_string())
            // In the environment, which only this user can read, never in the arguments,
            // which every user can (`/proc/PID/cmdline`).
            .env(ENV_SECRET, secret.to_hex())
            .env(ENV_HOME, home.path())
            // A Parallel inside a task defaults to sequential: the pool already uses the CPUs.
            .env("PARJOB_BACKEND", "sequential")
            // The line, which `init()` takes and replaces with an empty input.
            .stdin(Stdio::from(worker_end))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let threads = (cpu_count() / self.workers.max(1)).max(1).to_string();
        for var in ["RAYON_NUM_THREADS", "OMP_NUM_THREADS"] {
            if std::env::var_os(var).is_none() {
                command.env(var, &threads);
            }
        }
        // A process group of its own from the start (posix_spawn's POSIX_SPAWN_SETPGROUP), so
        // that a failed start kills what the process started too: one that never reaches
        // `init()` (a wrapper script without `exec`) would otherwise leave its children
        // running when it is killed.
        command.process_group(0);
        // No pre_exec: std then spawns with posix_spawn (vfork-like), whose cost does not grow
        // with this process's memory; a fork copies its page tables (65 ms for a pool of 2
        // next to 1 GB of data). The worker sets its parent-death signal itself, in `init`.
        let spawned = spawn_retrying(&mut command);
        // The command holds the worker's end of the line: only the worker may, or its end
        // would never be seen to close.
        drop(command);
        let mut child = spawned.map_err(|e| {
            let message = format!(
                "cannot start worker executable {}: {}",
                exe.display(),
                describe_io(&e)
            );
            Failed::Final(Error::worker_io(self.index, message, e))
        })?;
        // The driver never writes on the line: a program that reads its input before
        // `init()` (or never calls it) sees it end instead of waiting.
        link::close_write(line.as_fd());
        let line = Arc::new(line);
        let (output_tx, output_done) = std::sync::mpsc::channel();
        let prefix = options.prefix_output.then(|| match &options.output_label {
            Some(label) => format!("[{label} worker {}] ", self.index),
            None => format!("[worker {}] ", self.index),
        });
        let test_support = TEST_SUPPORT.load(Ordering::Relaxed);
        let last_words = LastWords::default();
        let mut printed = Vec::with_capacity(2);
        if let Some(out) = child.stdout.take() {
            printed.push(forward_lines(
                out,
                Sink::Stdout,
                prefix.clone(),
                test_support,
                None,
                output_tx.clone(),
            ));
        }
        if let Some(err) = child.stderr.take() {
            let heard = Some(last_words.clone());
            printed.push(forward_lines(
                err,
                Sink::Stderr,
                prefix,
                test_support,
                heard,
                output_tx,
            ));
        }
        let child = Arc::new(ChildWatch::new(child.id()));
        let pid = child.pid;
        // From here on, whatever fails kills the process and hangs up its line (see `Pending`).
        let mut pending = Pending {
            events: self.events,
            events_tx: self.events_tx,
            generation,
            child: Arc::clone(&child),
            line: Arc::clone(&line),
            home: Some(home),
            waiting: false,
            reaped: false,
            reading: false,
            heard_end: false,
            done: false,
        };
        let watch = Arc::clone(&child);
        let tx = self.events_tx.clone();
        spawn_thread(format!("parjob-wait-{pid}"), move || {
            let status = watch.wait();
            let _ = tx.send(Event::Exited { generation, status });
        })
        .map_err(&final_error)?;
        pending.waiting = true;
        let tx = self.events_tx.clone();
        let reader_line = Arc::clone(&line);
        // Its WELCOMED, and its READY or INIT_FAILED, and some slack.
        let allowance = Arc::new(Allowance::new(2));
        let reader_allowance = Arc::clone(&allowance);
        let limit = options
            .max_nbytes
            .saturating_add(DoneHeader::LEN)
            .clamp(1 + InitFailed::MAX_REASON, MAX_MESSAGE);
        spawn_thread(format!("parjob-read-{pid}"), move || {
            // Nothing in it is expected to panic; were it to, the supervisor hears of it
            // rather than waiting for a reply that will never come.
            let end = std::panic::catch_unwind(AssertUnwindSafe(|| {
                read_line(
                    reader_line,
                    &reader_allowance,
                    generation,
                    attempt,
                    limit,
                    &tx,
                )
            }))
            .unwrap_or_else(|panic| Event::Broken {
                generation,
                reason: format!(
                    "the driver's reader of its line panicked: {}",
                    panic_message(&*panic)
                ),
            });
            let _ = tx.send(end);
        })
        .map_err(&final_error)?;
        pending.reading = true;

        let worker_error = |message: String| {
            self.error(format!(
                "worker process {pid} ({}): {message}",
                exe.display()
            ))
        };
        let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
        // When the line closed before a Hello: the process's end is waited for only this long
        // more (its status tells why), not the rest of the handshake's time.
        let mut line_closed_by: Option<Instant> = None;
        let hello = loop {
            let wait_until = line_closed_by.map_or(deadline, |by| by.min(deadline));
            match self.next_event(wait_until) {
                Some(Event::Hello {
                    generation: g,
                    attempt: a,
                    hello,
                }) if g == generation && a == attempt => match hello {
                    Ok(hello) => break hello,
                    Err(e) => {
                        return Err(Failed::Retry(worker_error(format!(
                            "sent a malformed Hello ({e})"
                        ))));
                    }
                },
                Some(Event::Exited {
                    generation: g,
                    status,
                }) if g == generation => {
                    pending.reaped = true;
                    if let Some(shortage) = descriptor_shortage() {
                        return Err(Failed::Final(worker_error(format!(
                            "ended before the handshake ({status}): {shortage}"
                        ))));
                    }
                    return Err(match status {
                        WorkerExit::Exited(0 | EXIT_NO_INIT) => {
                            // A clean exit before the handshake, or a copy that reached a run
                            // without `init()`: the program never became a worker and never
                            // will (a worker that entered `init()` exits with
                            // EXIT_HANDSHAKE_FAILED when its handshake fails).
                            NOT_WORKERS
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .push(NotAWorker {
                                    exe: exe.to_path_buf(),
                                    pid,
                                    status: status.clone(),
                                });
                            Failed::Final(worker_error(ended_before_handshake(&status)))
                        }
                        WorkerExit::Exited(EXIT_NOT_DRIVERS_CHILD) => {
                            Failed::Final(worker_error(format!(
                                "ended before the handshake ({status}) because its parent is \
                                 not this driver: a worker_exe wrapper must `exec` the program \
                                 (`exec /path/to/prog \"$@\"`), not start it as a child"
                            )))
                        }
                        WorkerExit::Exited(EXIT_HANDSHAKE_FAILED | EXIT_REFUSED_DRIVER) => {
                            Failed::Retry(worker_error(format!(
                                "its handshake failed ({status}; its stderr says why)"
                            )))
                        }
                        // Killed from outside (a task of another worker, the OOM killer, a
                        // stray kill): nothing says the program cannot become a worker.
                        WorkerExit::Signaled(_) => Failed::Retry(worker_error(format!(
                            "was killed during its start ({status})"
                        ))),
                        _ => Failed::Final(worker_error(ended_before_handshake(&status))),
                    });
                }
                Some(Event::Close) => {
                    return Err(Failed::Final(worker_error(
                        "the pool is shutting down".into(),
                    )));
                }
                Some(Event::Broken {
                    generation: g,
                    reason,
                }) if g == generation => {
                    // The driver could not read the line (out of descriptors for the reader's
                    // copy of it, say): no Hello can come, though the process may be alive
                    // and waiting for a driver that would never connect.
                    pending.heard_end = true;
                    let shortage = descriptor_shortage();
                    let mut message = format!("its line could not be read ({reason})");
                    // The reason may carry the same hint already (`describe_io`).
                    if let Some(hint) = shortage.as_ref().filter(|_| !reason.contains(TOO_MANY)) {
                        message = format!("{message}: {hint}");
                    }
                    let error = worker_error(message);
                    return Err(match shortage {
                        Some(_) => Failed::Final(error),
                        None => Failed::Retry(error),
                    });
                }
                Some(Event::Disconnected { generation: g }) if g == generation => {
                    // The reader is done; the process's end (or its status) tells the rest.
                    pending.heard_end = true;
                    line_closed_by = Some(Instant::now() + LINE_CLOSED_GRACE);
                }
                Some(_) => {}
                None if line_closed_by.is_some_and(|by| by < deadline) => {
                    return Err(Failed::Retry(worker_error(format!(
                        "closed its line to the driver without a Hello and was still running \
                         {LINE_CLOSED_GRACE:?} later"
                    ))));
                }
                None => {
                    return Err(Failed::Final(worker_error(format!(
                        "did not complete its handshake within {HANDSHAKE_TIMEOUT:?}: it sent \
                         no Hello on its line; a worker program must call parjob::init() \
                         first thing in main"
                    ))));
                }
            }
        };
        // Before anything in it is used: only the process this driver started was given the
        // secret (another process of this user could have read it from its environment, and
        // written on its line through /proc; such a Hello is refused).
        if Nonce::from_bytes(hello.proof) != secret.worker {
            return Err(Failed::Retry(worker_error(
                "refused a Hello that does not carry the worker's secret".into(),
            )));
        }
        let final_error = |message: String| Failed::Final(worker_error(message));
        // Nothing that names code is sent before this check.
        Identity::decode(&hello.identity)
            .and_then(|identity| identity.check_same_build(PROTOCOL))
            .map_err(|e| final_error(e.to_string()))?;
        // The driver's channels to the worker, through the server the worker opened. Whoever
        // reached that server first (a process of this user racing the driver) gets nothing
        // it can use: the worker obeys only a welcome that proves the driver's secret, and
        // refuses the connection otherwise, and this start is tried again.
        let big_tasks = IpcSender::<Shipment>::connect(hello.server).map_err(|e| {
            Failed::Retry(worker_error(format!(
                "cannot connect to the worker's server ({})",
                describe_io(&e)
            )))
        })?;
        let channel_error = |e: std::io::Error| {
            Failed::Final(Error::worker_io(
                self.index,
                format!("cannot make a channel to the worker: {}", describe_io(&e)),
                e,
            ))
        };
        // ipc-channel asserts instead of failing when it cannot make, duplicate or send the
        // board's descriptor: make sure they are there (with the channel's two, and a margin).
        if !crate::shared::spare_descriptors(8) {
            let why = descriptor_shortage().unwrap_or_else(|| {
                "too many open files: raise the limit (ulimit -n) or lower n_jobs".into()
            });
            return Err(final_error(format!("cannot make its status board: {why}")));
        }
        let (board, board_handle) =
            Board::new().ok_or_else(|| final_error("cannot make the status board".into()))?;
        let (tasks, tasks_rx) = ipc::bytes_channel().map_err(channel_error)?;
        big_tasks
            .send(Shipment::Channels {
                tasks: tasks_rx,
                board: board_handle,
            })
            .map_err(|e| {
                Failed::Retry(worker_error(format!(
                    "cannot send the worker its channels: {e}"
                )))
            })?;
        let welcome = Welcome {
            max_nbytes: options.max_nbytes as u64,
            initializer: self.settings.initializer,
            with_args: self.settings.with_args.clone(),
            proof: secret.driver,
        };
        tasks
            .send(&welcome.encode())
            .map_err(|e| final_error(format!("cannot send the welcome: {e}")))?;
        // Set once the process has ended: its last reply may still be on its way.
        let mut ended: Option<WorkerExit> = None;
        // Set once the worker took the welcome for its driver's: from then on a death is the
        // initializer's, before it the handshake's (see `WELCOMED`).
        let mut welcomed = false;
        let handshake_failed = |status: &WorkerExit| {
            let why = if matches!(status, WorkerExit::Signaled(_)) {
                "it was killed during its start"
            } else {
                "something else may have reached its server first; its stderr says more"
            };
            Failed::Retry(worker_error(format!(
                "its handshake failed: it ended ({status}) before it accepted the driver's \
                 welcome ({why})"
            )))
        };
        // Until its WELCOMED, the handshake's deadline (from its spawn): a process of this user
        // that reached the worker's server first (and stays silent, or sent half a message)
        // holds the worker's accept, and the start is tried again. After it, the
        // initializer's.
        let mut deadline = deadline;
        loop {
            match self.next_event(deadline) {
                Some(Event::Reply {
                    generation: g,
                    bytes,
                    ..
                }) if g == generation => match Kind::of(&bytes) {
                    Ok(Kind::Backend(WELCOMED)) if bytes.len() == 1 => {
                        welcomed = true;
                        deadline = Instant::now() + INITIALIZER_TIMEOUT;
                    }
                    Ok(Kind::Ready) => break,
                    Ok(Kind::InitFailed) => {
                        let reason = InitFailed::decode(&bytes)
                            .map_or_else(|e| e.to_string(), |failed| failed.reason);
                        return Err(final_error(reason));
                    }
                    _ => return Err(final_error("sent a malformed reply to the welcome".into())),
                },
                Some(Event::Exited {
                    generation: g,
                    status,
                }) if g == generation => {
                    pending.reaped = true;
                    if !welcomed {
                        return Err(handshake_failed(&status));
                    }
                    ended = Some(status);
                    deadline = deadline.min(Instant::now() + Duration::from_millis(200));
                }
                Some(Event::Broken {
                    generation: g,
                    reason,
                }) if g == generation => {
                    pending.heard_end = true;
                    return Err(final_error(reason));
                }
                Some(Event::Disconnected { generation: g }) if g == generation => {
                    pending.heard_end = true;
                    if let Some(status) = ended {
                        return Err(final_error(format!(
                            "ended during its initializer ({status})"
                        )));
                    }
                }
                Some(Event::Close) => {
                    return Err(final_error("the pool is shutting down".into()));
                }
                Some(_) => {}
                None if !welcomed => {
                    return Err(Failed::Retry(worker_error(format!(
                        "did not accept the driver's welcome within {HANDSHAKE_TIMEOUT:?} of its \
                         start (another process of this user may be holding its server)"
                    ))));
                }
                None => {
                    return Err(final_error(match ended {
                        Some(status) => format!("ended during its initializer ({status})"),
                        None => {
                            format!("its initializer did not finish within {INITIALIZER_TIMEOUT:?}")
                        }
                    }));
                }
            }
        }
        pending.done = true;
        Ok(Worker {
            pid,
            generation,
            tasks,
            big_tasks,
            board,
            child,
            line,
            allowance,
            home: pending.home.take(),
            tasks_run: 0,
            output_done,
            printed,
            last_words,
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

/// How many of the next starts' lines the driver fails to read (a test's stand-in for a
/// reader thread that cannot copy the line when descriptors run out).
static UNREADABLE_LINES: AtomicUsize = AtomicUsize::new(0);

/// Makes the driver fail to read the lines of the next `starts` worker starts of this process:
/// for tests of a start whose line breaks before the worker's Hello. Not part of the API.
#[doc(hidden)]
pub fn fail_next_line_reads_for_tests(starts: usize) {
    UNREADABLE_LINES.store(starts, Ordering::SeqCst);
}

/// How the descriptor hints begin.
const TOO_MANY: &str = "too many open files";

/// How long a starting worker whose line closed before its Hello may take to end, before the
/// start gives up on it (it is then killed, as any failed start).
const LINE_CLOSED_GRACE: Duration = Duration::from_secs(2);

/// The most bytes one message from a worker may have, whatever `max_nbytes` says: frames over
/// it travel in shared memory.
const MAX_MESSAGE: usize = (1 << 32) + DoneHeader::LEN;

/// The reader thread of worker `generation`'s line (start try `attempt`): its Hello, then its
/// replies, each with the result arena it announced. Returns the event that ends it: the line
/// closed, or something on it that no worker of this build sends.
fn read_line(
    line: Arc<OwnedFd>,
    allowance: &Allowance,
    generation: u64,
    attempt: u32,
    limit: usize,
    tx: &Sender<Event>,
) -> Event {
    let broken = |reason: String| Event::Broken { generation, reason };
    if UNREADABLE_LINES
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        return broken("cannot read its line: made unreadable by a test".into());
    }
    let mut reader = match link::Reader::new(line) {
        Ok(reader) => reader,
        Err(e) => return broken(format!("cannot read its line: {}", describe_io(&e))),
    };
    let hello = match reader.recv(Hello::MAX_LEN) {
        Ok(Some(message)) => Hello::decode(&message.bytes).map_err(|e| e.to_string()),
        // Closed before a word: the process's status says why.
        Ok(None) => return Event::Disconnected { generation },
        Err(e) => Err(e.to_string()),
    };
    let failed = hello.is_err();
    let event = Event::Hello {
        generation,
        attempt,
        hello,
    };
    if tx.send(event).is_err() || failed {
        return Event::Disconnected { generation };
    }
    loop {
        let message = match reader.recv(limit) {
            Ok(Some(message)) => message,
            Ok(None) => return Event::Disconnected { generation },
            Err(e) => return broken(e.to_string()),
        };
        // Read no further than the driver asked: what a stray writer (a thread or process a
        // task left behind) sends while nobody listens would otherwise pile up in the driver,
        // each message with its memory and perhaps a descriptor and a mapping.
        if !allowance.take() {
            return broken(
                "sent more messages on its line than it was asked for (something other than \
                 parjob wrote on it: a task?)"
                    .into(),
            );
        }
        let announces_arena = Kind::of(&message.bytes) == Ok(Kind::Done)
            && DoneHeader::decode(&message.bytes).is_ok_and(|(done, _)| done.new_arena);
        // A descriptor that comes with any other message is closed here (dropped).
        let new_arena = match (announces_arena, message.fd) {
            (false, _) => None,
            (true, None) => {
                return broken("announced a new result arena but sent none".into());
            }
            (true, Some(fd)) => match Arena::adopt(fd) {
                Ok(arena) => Some(arena),
                Err(why) => {
                    return broken(format!("sent a result arena the driver cannot use: {why}"));
                }
            },
        };
        let reply = Event::Reply {
            generation,
            bytes: message.bytes,
            new_arena,
        };
        if tx.send(reply).is_err() {
            // Nobody listens any more.
            return Event::Disconnected { generation };
        }
    }
}

/// How many times [`Starter::start`] tries a start whose handshake was taken over or could
/// not complete.
const START_ATTEMPTS: u32 = 3;

/// Why one try at starting a worker failed.
enum Failed {
    /// Another try, with a new server and secret, may succeed: something other than the
    /// worker reached the server, or the worker could not complete its handshake.
    Retry(Error),
    /// Trying again would fail the same way (or the pool is closing).
    Final(Error),
}

/// A worker process whose handshake is not over. Dropped before it is `done` (whatever
/// failed), it kills the process, hangs up its line, removes the worker's directory (its
/// server's included), and waits until both the process and the line's reader
/// are heard of: a failed start leaves no process, thread, socket directory or descriptor
/// behind, and no event that a later try could take for its own.
struct Pending<'a> {
    events: &'a Receiver<Event>,
    events_tx: &'a Sender<Event>,
    generation: u64,
    child: Arc<ChildWatch>,
    line: Arc<OwnedFd>,
    /// The worker's own directory, until the worker lives on (see [`WorkerHome`]).
    home: Option<WorkerHome>,
    /// The waiter thread runs: its `Exited` event will come.
    waiting: bool,
    /// The `Exited` event was consumed.
    reaped: bool,
    /// The reader thread runs: its last event (`Disconnected` or `Broken`) will come.
    reading: bool,
    /// The reader's last event was consumed.
    heard_end: bool,
    /// The handshake succeeded: the worker lives on.
    done: bool,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        self.child.kill();
        link::hang_up(self.line.as_fd());
        if !self.waiting {
            // No waiter thread: reap the killed process here.
            self.child.wait();
            self.reaped = true;
        }
        if !self.reading {
            self.heard_end = true;
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut close = false;
        while !(self.reaped && self.heard_end) {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(event) = self.events.recv_timeout(left) else {
                break;
            };
            match event {
                Event::Exited { generation, .. } if generation == self.generation => {
                    self.reaped = true;
                }
                Event::Disconnected { generation } | Event::Broken { generation, .. }
                    if generation == self.generation =>
                {
                    self.heard_end = true;
                }
                Event::Close => close = true,
                _ => {}
            }
        }
        // The killed worker could not remove it (`WorkerHome::drop`).
        self.home.take();
        if close {
            let _ = self.events_tx.send(Event::Close);
        }
    }
}

/// A worker's own directory, `$TMPDIR/parjob-<uid>/w-<driver pid>-<n>`, made private (0700)
/// by the driver before the worker starts and removed with everything in it when dropped. The
/// worker makes it tempfile's default (see [`private_socket_root`]), so its one-shot server,
/// and the temporary files its tasks make with tempfile, go there: whatever a killed worker
/// leaves is removed by its driver.
pub(crate) struct WorkerHome {
    path: PathBuf,
}

impl WorkerHome {
    fn make() -> Result<WorkerHome, String> {
        use std::os::unix::fs::DirBuilderExt;
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let root = checked_private_root()?;
        claim_and_sweep(&root);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = root.join(format!("w-{}-{n}", std::process::id()));
        // Left by a driver of the same pid before this one (pids are reused).
        let _ = std::fs::remove_dir_all(&path);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| format!("cannot make {}: {}", path.display(), describe_io(&e)))?;
        Ok(WorkerHome { path })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkerHome {
    fn drop(&mut self) {
        // Symbolic links inside are removed, never followed.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Once per process: takes this driver's mark in the private root, `w-<pid>.lock`, locked
/// (`flock`) for as long as the process lives, and removes on a thread of its own the worker
/// homes (`w-<pid>-<n>`) of drivers whose mark is no longer locked: a driver ended by SIGKILL
/// or SIGTERM cannot remove its own, and they piled up (an attacker's session left 33; this
/// machine had 268). A lock, not a pid check, says who is gone, so a live driver in another
/// pid namespace sharing the directory keeps its homes. Homes without a mark (parjob before
/// this, or a driver whose mark was taken) are left alone.
fn claim_and_sweep(root: &Path) {
    static MARK: std::sync::OnceLock<Option<std::fs::File>> = std::sync::OnceLock::new();
    let root = root.to_path_buf();
    MARK.get_or_init(|| {
        use std::os::unix::fs::OpenOptionsExt;
        let me = std::process::id();
        let mark = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(root.join(format!("w-{me}.lock")))
            .ok()
            .filter(|file| {
                rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
                    .is_ok()
            });
        // Off the path of the first worker's start; nothing waits for it.
        let _ = std::thread::Builder::new()
            .name("parjob-sweep".into())
            .spawn(move || sweep_homes_of_dead_drivers(&root, me));
        mark
    });
}

/// Removes the homes of the drivers whose `w-<pid>.lock` in `root` nobody holds, and those
/// marks (see [`claim_and_sweep`]).
fn sweep_homes_of_dead_drivers(root: &Path, me: u32) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    let names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for name in &names {
        let Some(pid) = name
            .strip_prefix("w-")
            .and_then(|rest| rest.strip_suffix(".lock"))
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let mark_path = root.join(name);
        let Ok(mark) = std::fs::File::open(&mark_path) else {
            continue;
        };
        if rustix::fs::flock(&mark, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
            continue; // its driver lives
        }
        let prefix = format!("w-{pid}-");
        for home in names.iter().filter(|n| {
            n.strip_prefix(&prefix)
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        }) {
            // Symbolic links inside are removed, never followed.
            let _ = std::fs::remove_dir_all(root.join(home));
        }
        // Unlinked while still locked: a new driver of that pid makes a fresh mark.
        let _ = std::fs::remove_file(&mark_path);
    }
}

/// Makes ipc-channel create its handshake sockets inside a directory only this user can
/// enter, from the start.
///
/// ipc-channel puts each one-shot server's socket in a new directory under tempfile's default
/// temporary directory, created with the process's umask: under a permissive umask another
/// user could connect in the moments before [`make_private`] closes it. (Only workers open
/// servers, for their driver to connect to; the driver never receives through ipc-channel.)
/// So, once per process, tempfile's default is pointed at `$TMPDIR/parjob-<uid>` (made with
/// mode 0700, which no umask can widen; reused like tmux's `/tmp/tmux-<uid>`), after checking
/// that it is a real directory of this user that nobody else may enter. That default is
/// process-wide: other users of tempfile in the program then make their temporary files there
/// too (private, still under `$TMPDIR`). If the directory is not safe (another user made it
/// first) or tempfile's default was already set, a line on stderr says so and each socket's
/// directory is only closed by `make_private`.
pub(crate) fn private_socket_root(home: Option<PathBuf>) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Err(why) = point_tempfile_at_private_dir(home) {
            eprintln!(
                "parjob: handshake sockets go to the usual temporary directory and are made \
                 private only once created: {why}"
            );
        }
    });
}

/// `$TMPDIR/parjob-<uid>`: where workers open their servers (see [`private_socket_root`]).
fn private_root() -> PathBuf {
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    temp_base().join(format!("parjob-{me}"))
}

/// `$TMPDIR` (std's `temp_dir`), or `/tmp` if that is not a directory, as Python's `tempfile`
/// falls back (a line on stderr says so, once): a `TMPDIR` left pointing at a removed scratch
/// folder would otherwise fail every worker start.
fn temp_base() -> PathBuf {
    let dir = std::env::temp_dir();
    let room = temp_base_room();
    let why = if !dir.is_dir() {
        "is not a directory".to_string()
    } else if dir.as_os_str().len() > room {
        format!(
            "is too long for the workers' sockets, which go under it (a socket's path holds \
             107 bytes: TMPDIR may take {room} here)"
        )
    } else {
        return dir;
    };
    static SAID: std::sync::Once = std::sync::Once::new();
    SAID.call_once(|| {
        crate::say_whole_line(&format!(
            "parjob: TMPDIR={} {why}: the workers' temporary files go to /tmp",
            dir.display()
        ));
    });
    PathBuf::from("/tmp")
}

/// How long `$TMPDIR` may be for a worker's handshake socket,
/// `$TMPDIR/parjob-<uid>/w-<pid>-<n>/.tmpXXXXXX/socket`, to fit the 107 bytes of a Unix
/// socket's path (`n` counts to 10 digits).
fn temp_base_room() -> usize {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() }.to_string();
    let pid = std::process::id().to_string();
    let under = "/parjob-".len()
        + uid.len()
        + "/w-".len()
        + pid.len()
        + "-".len()
        + 10
        + "/.tmpXXXXXX".len()
        + "/socket".len();
    107usize.saturating_sub(under)
}

/// The private root, made if missing, and checked to be a directory only this user may enter.
fn checked_private_root() -> Result<PathBuf, String> {
    use std::os::unix::fs::DirBuilderExt;
    let root = private_root();
    match std::fs::DirBuilder::new().mode(0o700).create(&root) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("cannot make {}: {e}", root.display())),
    }
    check_private(&root).map_err(|why| {
        format!(
            "{why}: another user may have made it first; if it is not yours, point TMPDIR at a \
             directory of your own (e.g. TMPDIR=$HOME/tmp); if it is, `chmod 700` it or remove \
             it"
        )
    })?;
    Ok(root)
}

/// Checks that `dir` is a real directory (not a link) of this user that nobody else may enter.
fn check_private(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| format!("cannot inspect {}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a directory that only this user (uid {me}) may enter",
            dir.display()
        ));
    }
    Ok(())
}

/// Points tempfile's default at `home` (the worker's own directory, which its driver made
/// private), or, without one, at the private root.
fn point_tempfile_at_private_dir(home: Option<PathBuf>) -> Result<(), String> {
    let dir = match home {
        Some(home) => {
            check_private(&home)?;
            home
        }
        None => checked_private_root()?,
    };
    tempfile::env::override_temp_dir(&dir).map_err(|set| {
        format!(
            "tempfile's default temporary directory was already set to {}",
            set.display()
        )
    })
}

/// Makes the one-shot server's directory (ipc-channel makes it with the umask's mode: 0777
/// under `umask 000`) and its socket reachable by this user only, and checks that nobody
/// replaced the socket while the directory was open.
pub(crate) fn make_private(socket: &Path) -> Result<(), String> {
    use std::fs::{Permissions, set_permissions, symlink_metadata};
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    let dir = socket.parent().ok_or("the socket has no directory")?;
    set_permissions(dir, Permissions::from_mode(0o700))
        .map_err(|e| format!("cannot restrict {}: {e}", dir.display()))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let ours = |path: &Path, is_kind: fn(&std::fs::Metadata) -> bool| {
        symlink_metadata(path).is_ok_and(|m| is_kind(&m) && m.uid() == me)
    };
    if !ours(dir, |m| m.is_dir() && m.mode() & 0o777 == 0o700) {
        return Err(format!(
            "{} is not a private directory of this user",
            dir.display()
        ));
    }
    // From here on nobody else can change the directory's entries.
    if !ours(socket, |m| m.file_type().is_socket()) {
        return Err(format!("{} is not this process's socket", socket.display()));
    }
    set_permissions(socket, Permissions::from_mode(0o600))
        .map_err(|e| format!("cannot restrict {}: {e}", socket.display()))
}

/// What to tell the user when this process has (nearly) run out of file descriptors.
///
/// A start needs about ten at once (the server, pipes, the Hello's channels); a panic or error
/// inside ipc-channel does not say that they were missing, and by the time it is reported the
/// failed attempt's descriptors are closed again, so the count is compared with a margin.
fn descriptor_shortage() -> Option<String> {
    const MARGIN: u64 = 16;
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a valid resource and a valid, writable rlimit.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    let open = match std::fs::read_dir("/proc/self/fd") {
        // Less the descriptor of the listing itself, which it shows too.
        Ok(entries) => (entries.count() as u64).saturating_sub(1),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => limit.rlim_cur,
        Err(_) => return None,
    };
    (open.saturating_add(MARGIN) >= limit.rlim_cur).then(|| {
        format!(
            "{TOO_MANY} ({open} open, the limit is {}): raise the limit (ulimit -n) or lower \
             n_jobs",
            limit.rlim_cur
        )
    })
}

/// An I/O error's text, saying what to do when it is a descriptor shortage (which
/// ipc-channel may report as something else, e.g. `EBADF` after its `socket()` failed).
fn describe_io(error: &std::io::Error) -> String {
    match descriptor_shortage() {
        Some(shortage) => format!("{error}: {shortage}"),
        None if matches!(error.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
            format!("{error}: {TOO_MANY}: raise the limit (ulimit -n) or lower n_jobs")
        }
        None => error.to_string(),
    }
}

/// The message of a caught panic.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
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
