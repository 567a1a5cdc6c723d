//! The worker side: what `init()` runs in a process the driver started.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ipc_channel::ipc::{IpcBytesReceiver, IpcOneShotServer, IpcReceiver};
use parjob_core::{Backend, set_worker_identity};
use parjob_remote::{
    DoneHeader, HandshakeSecret, Identity, InitFailed, Kind, RunHeader, Welcome, call_entry,
    call_initializer, call_initializer_with,
};

use crate::frame::{finish_done, task_frame};
use crate::link;
use crate::mapping::Arena;
use crate::shared::receive;
use crate::wire::{
    ARENA_KEEP_MAX, Board, ENV_DRIVER, ENV_HOME, ENV_INDEX, ENV_SECRET, EXIT_HANDSHAKE_FAILED,
    EXIT_NOT_DRIVERS_CHILD, EXIT_REFUSED_DRIVER, Forget, Hello, PROTOCOL, Shipment, WELCOMED,
    monotonic_nanos,
};

static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// Whether this process was started as a worker (it may not have reached the loop yet).
pub(crate) fn started_as_worker() -> bool {
    !matches!(role(), Role::NotAWorker)
}

/// Whether this process is a worker its driver started itself (the driver is its parent),
/// whether or not it reached the loop: not a stray (see [`Role::Stray`]).
pub(crate) fn is_drivers_worker() -> bool {
    matches!(role(), Role::Worker { .. })
}

/// What this process is to parjob's process backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    /// A program of its own (a driver, or a program a task started).
    NotAWorker,
    /// A worker, child of the driver that started it.
    Worker { driver: libc::pid_t },
    /// A worker that is not its driver's child: the driver died before this process got
    /// here (it was adopted), or a `worker_exe` wrapper started it as a child instead of
    /// `exec`ing it. Its standard input is still the line its driver made.
    Stray { driver: libc::pid_t },
}

/// Decided once, at the first call (in `init()`, first thing in `main`).
///
/// A worker names its driver in `PARJOB_PROCESS_DRIVER`, is that driver's child, and has the
/// line the driver made (a socket pair, whose peer credentials are its maker's) as its
/// standard input. A program a task starts has `/dev/null` there and, since the worker took
/// the variables out of its environment, no driver named either: it is no worker, even if the
/// driver adopts it later (the driver is PID 1 in a container, or a subreaper). A worker that
/// lost its parent before this point is a stray: it must not run `main` as a program of its
/// own (it would start a pool and run the job again, with parent 1).
fn role() -> Role {
    static ROLE: std::sync::OnceLock<Role> = std::sync::OnceLock::new();
    *ROLE.get_or_init(|| {
        let Some(driver) = std::env::var(ENV_DRIVER)
            .ok()
            .and_then(|v| v.parse::<libc::pid_t>().ok())
        else {
            return Role::NotAWorker;
        };
        if !line_made_by(driver) {
            // A program whose environment still names a driver (a worker that ran threads
            // before its `init()` could not take its variables out) but whose standard input
            // is not that driver's line: it is no worker, even once the driver adopts it.
            return Role::NotAWorker;
        }
        // SAFETY: getppid has no preconditions.
        if driver == unsafe { libc::getppid() } {
            Role::Worker { driver }
        } else {
            Role::Stray { driver }
        }
    })
}

/// Whether standard input is a Unix socket that process `pid` made (`SO_PEERCRED`: for a
/// socket pair, the process that called `socketpair`).
fn line_made_by(pid: libc::pid_t) -> bool {
    // SAFETY: a zeroed ucred is a valid out-parameter, and `len` holds its size.
    let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt on descriptor 0 with a valid out-pointer and length; it fails
    // harmlessly when descriptor 0 is not a socket.
    let got = unsafe {
        libc::getsockopt(
            0,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&raw mut cred).cast(),
            &mut len,
        )
    };
    got == 0 && cred.pid == pid
}

/// Ends a stray worker (see [`Role::Stray`]) without running anything of the program: its
/// driver is gone, or a `worker_exe` wrapper did not `exec` it, which the driver then hears
/// of as a start that failed with `EXIT_NOT_DRIVERS_CHILD`.
fn leave_as_a_stray(driver: libc::pid_t) -> ! {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let driver_alive = unsafe { libc::kill(driver, 0) } == 0;
    if driver_alive {
        eprintln!(
            "parjob worker (pid {}): its parent (pid {}) is not the driver that started it \
             (pid {driver}): a worker_exe wrapper must `exec` the program (`exec /path/to/prog \
             \"$@\"`), not start it as a child. This copy exits now.",
            std::process::id(),
            std::os::unix::process::parent_id()
        );
        std::process::exit(EXIT_NOT_DRIVERS_CHILD);
    }
    // The driver died before this worker started: nobody waits for it.
    std::process::exit(0);
}

/// Kills this worker's process group with SIGKILL, itself included, if it leads it; else
/// only itself. Async-signal-safe. The group is looked at now, not at `init()`: a task may
/// have moved the worker into another program's group (`setpgid`), which is then left alone.
fn kill_my_group() -> ! {
    // SAFETY: getpgrp, getpid, kill and _exit are async-signal-safe and have no
    // preconditions; the group (0: this process's own) is killed only when this worker leads
    // it, so never another program's group.
    unsafe {
        if libc::getpgrp() == libc::getpid() {
            libc::kill(0, libc::SIGKILL);
        }
        libc::kill(libc::getpid(), libc::SIGKILL);
        libc::_exit(1);
    }
}

/// Makes this worker die with its driver (more exactly, with the driver's thread that started
/// it), and take the processes its tasks started with it: the driver's death sends it
/// `SIGRTMAX` (`PR_SET_PDEATHSIG`), whose handler kills this worker's process group with
/// SIGKILL, itself included. A driver killed by a signal (Ctrl-C, SIGTERM) cannot kill the
/// groups itself, and with a plain SIGKILL as the death signal, the worker died and left its
/// tasks' processes running with parent 1.
///
/// Set here rather than between fork and exec, so that the driver can spawn with posix_spawn,
/// whose cost does not grow with the driver's memory as fork's does: at `init()`, then again
/// after every frame (three system calls), since a task that blocks, ignores or takes over
/// `SIGRTMAX`, or changes the death signal, must delay this worker's end only until it
/// returns.
fn arm_death_signal() {
    extern "C" fn on_driver_death(_signal: libc::c_int) {
        kill_my_group();
    }
    let signal = libc::SIGRTMAX();
    // SAFETY: a zeroed sigaction is a valid value to fill in; the handler is an `extern "C"`
    // function of the right signature that calls only async-signal-safe functions, and
    // sigaction/pthread_sigmask are given a valid signal number.
    let installed = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_driver_death as extern "C" fn(libc::c_int) as usize;
        libc::sigemptyset(&mut action.sa_mask);
        let installed = libc::sigaction(signal, &action, std::ptr::null_mut()) == 0;
        // The mask is inherited through exec: a driver's thread that blocked the signal would
        // have it pending here for ever (and a task may have blocked it since).
        let mut unblock: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut unblock);
        libc::sigaddset(&mut unblock, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &unblock, std::ptr::null_mut());
        installed
    };
    // Without the handler, SIGKILL: the worker at least dies with its driver.
    let death_signal = if installed { signal } else { libc::SIGKILL };
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, death_signal, 0, 0, 0) };
}

/// Whether this process is running the worker loop.
pub(crate) fn in_worker_loop() -> bool {
    IN_WORKER.load(Ordering::Relaxed)
}

/// Enters the worker loop if the driver started this process; returns at once otherwise.
pub fn init() {
    // `SharedSlice`s made from now on live in shared memory.
    crate::shared::install();
    if in_worker_loop() {
        // Called again from a task in a worker: the worker loop already runs.
        return;
    }
    let driver = match role() {
        Role::NotAWorker => return,
        Role::Stray { driver } => leave_as_a_stray(driver),
        Role::Worker { driver } => driver,
    };
    IN_WORKER.store(true, Ordering::Relaxed);
    // Lead a process group of its own, so that the driver, when it kills this worker, kills
    // the processes its tasks started with it (`kill(-pid)`). The driver spawns it in one
    // already; this covers a worker started by other means. It cannot fail for a process
    // just spawned (EPERM is for a session leader); were it to, only the worker is killed.
    // SAFETY: setpgid(0, 0) only changes this process's own group.
    unsafe { libc::setpgid(0, 0) };
    arm_death_signal();
    // SAFETY: getppid has no preconditions.
    if driver != unsafe { libc::getppid() } {
        // The driver died before the signal was set: nobody is waiting for this worker.
        std::process::exit(0);
    }
    let given = WorkerEnv::take();
    let code = match take_line().and_then(|line| handshake(line, given)) {
        Err(stop) => {
            if let Some(message) = stop.message {
                eprintln!("parjob worker (pid {}): {message}", std::process::id());
            }
            stop.code
        }
        Ok(connected) => match serve(connected, driver) {
            Ok(()) => 0,
            Err(message) => {
                // SAFETY: getppid has no preconditions.
                if driver != unsafe { libc::getppid() } {
                    // The driver is gone (its death signal may have been lost while a task
                    // ignored it): nobody reads the message; take the tasks' processes along.
                    kill_my_group();
                }
                eprintln!("parjob worker (pid {}): {message}", std::process::id());
                70
            }
        },
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}

/// What the driver passes a worker in its environment (besides its own pid, read by
/// [`role`]).
struct WorkerEnv {
    index: Option<String>,
    secret: Option<String>,
    home: Option<PathBuf>,
}

impl WorkerEnv {
    /// Reads the worker's variables, then removes all of them from its environment, so that
    /// the processes its tasks start do not inherit them: with `PARJOB_PROCESS_DRIVER` a
    /// program a task started could be taken for a worker (when the driver, PID 1 or a
    /// subreaper, adopts it before its `init()`), and the handshake's secret, spent as it is,
    /// has no business in other programs' environments.
    fn take() -> WorkerEnv {
        let given = WorkerEnv {
            index: std::env::var(ENV_INDEX).ok(),
            secret: std::env::var(ENV_SECRET).ok(),
            home: std::env::var_os(ENV_HOME).map(PathBuf::from),
        };
        // A test binary's worker runs `init` in a test: the harness's main thread waits for it.
        let alone = if crate::spawn::test_support_enabled() {
            2
        } else {
            1
        };
        if threads() == Some(alone) {
            for var in [ENV_DRIVER, ENV_INDEX, ENV_SECRET, ENV_HOME] {
                // SAFETY: no other thread of this process can be reading the environment
                // while it changes: `init` runs first thing in a freshly started worker's
                // `main`, and the thread count just read says no thread was started before
                // it (besides, in a test binary, the harness's main thread, which only waits
                // for the worker's test to end). With more threads, the variables stay.
                unsafe { std::env::remove_var(var) };
            }
        }
        given
    }
}

/// How many threads this process runs (`Threads:` in `/proc/self/status`).
fn threads() -> Option<usize> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("Threads:"))?;
    line["Threads:".len()..].trim().parse().ok()
}

/// Takes the line to the driver (`link`) from standard input, where the driver put it, and
/// gives the worker's tasks an empty standard input instead (as they had before).
fn take_line() -> Result<OwnedFd, Stop> {
    let stdin = std::io::stdin();
    let is_socket = rustix::fs::fstat(stdin.as_fd()).is_ok_and(|s| {
        rustix::fs::FileType::from_raw_mode(s.st_mode) == rustix::fs::FileType::Socket
    });
    if !is_socket {
        return Err(Stop::failed(
            "standard input is not the line to the driver (a worker is started by its driver \
             only)"
                .into(),
        ));
    }
    let line = stdin
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| Stop::failed(format!("cannot take the line to the driver: {e}")))?;
    let null = std::fs::File::open("/dev/null")
        .map_err(|e| Stop::failed(format!("cannot open /dev/null: {e}")))?;
    // SAFETY: dup2 onto standard input of a descriptor this function owns; `std::io::stdin`
    // reads descriptor 0 afresh on each read, and nothing reads it while the worker starts.
    if unsafe { libc::dup2(std::os::fd::AsRawFd::as_raw_fd(&null), 0) } < 0 {
        return Err(Stop::failed(format!(
            "cannot give tasks an empty standard input: {}",
            std::io::Error::last_os_error()
        )));
    }
    Ok(line)
}

/// Why a worker ends before its frame loop: its exit status, and what it prints (if anything).
struct Stop {
    code: i32,
    message: Option<String>,
}

impl Stop {
    /// The handshake failed (no channel, no driver, no welcome): not a program that lacks
    /// `init()`, which is what status 0 before the handshake means to the driver.
    fn failed(message: String) -> Stop {
        Stop {
            code: EXIT_HANDSHAKE_FAILED,
            message: Some(message),
        }
    }

    /// A welcome that did not prove it comes from the worker's own driver.
    fn refused(message: String) -> Stop {
        Stop {
            code: EXIT_REFUSED_DRIVER,
            message: Some(message),
        }
    }
}

/// What the handshake leaves the frame loop.
struct Connected {
    tasks_rx: IpcBytesReceiver,
    big_tasks_rx: IpcReceiver<Shipment>,
    /// The line to the driver: replies, and result arenas' descriptors.
    line: OwnedFd,
    board: Board,
    max_nbytes: usize,
}

/// Greets the driver on its line, takes the channels it connects with, authenticates its
/// welcome, runs the initializer and says `READY`.
fn handshake(line: OwnedFd, given: WorkerEnv) -> Result<Connected, Stop> {
    let index: usize = given
        .index
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Stop::failed(format!("{ENV_INDEX} is missing or not a number")))?;
    let secret = given
        .secret
        .ok_or_else(|| Stop::failed(format!("{ENV_SECRET} is missing")))
        .and_then(|text| {
            HandshakeSecret::from_hex(&text).map_err(|e| Stop::failed(format!("{ENV_SECRET}: {e}")))
        })?;
    set_worker_identity(Some((Backend::Process, index)));
    tune_malloc();
    // The server the driver connects to: in this user's private directory, like the driver's.
    crate::spawn::private_socket_root(given.home);
    let (server, name) = IpcOneShotServer::<Shipment>::new()
        .map_err(|e| Stop::failed(format!("cannot open a server for the driver: {e}")))?;
    crate::spawn::make_private(std::path::Path::new(&name))
        .map_err(|why| Stop::failed(format!("refused a server that was not private ({why})")))?;
    let hello = Hello {
        proof: secret.worker.to_bytes(),
        server: name,
        identity: Identity::current(PROTOCOL).encode(),
    };
    link::send(line.as_fd(), &hello.encode(), None)
        .map_err(|e| Stop::failed(format!("cannot greet the driver: {e}")))?;

    // A driver that refuses this worker (another build) hangs up instead of connecting: the
    // line's end wakes the wait.
    let (big_tasks_rx, first) = accept_or_hang_up(server, line.as_fd()).inspect_err(|_| {
        // The accept thread still holds the server, and `exit` runs no destructor: remove
        // its socket and directory here.
        let socket = std::path::Path::new(&hello.server);
        let _ = std::fs::remove_file(socket);
        if let Some(dir) = socket.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    })?;
    // Whoever connected first may not be the driver: nothing it sent is used before the
    // welcome proves it is.
    let Shipment::Channels {
        tasks: tasks_rx,
        board,
    } = first
    else {
        return Err(Stop::refused(
            "refused a connection to its server whose first message is not the driver's".into(),
        ));
    };
    let welcome = tasks_rx.recv().map_err(|_| {
        Stop::failed(
            "the driver hung up before its welcome (it refused this worker, or could not make \
             its channels)"
                .into(),
        )
    })?;
    // Nothing the welcome asks is done before it proved it comes from the driver that holds
    // this worker's secret: whoever else reached the server could have sent it.
    let welcome = Welcome::decode(&welcome)
        .and_then(|welcome| welcome.check(&secret.driver).map(|()| welcome))
        .map_err(|e| Stop::refused(format!("refused the driver's welcome: {e}")))?;
    let board = Board::from_shared(board)
        .ok_or_else(|| Stop::failed("the driver sent an unusable status board".into()))?;
    link::send(line.as_fd(), &[WELCOMED], None)
        .map_err(|e| Stop::failed(format!("cannot reach the driver: {e}")))?;
    let max_nbytes = usize::try_from(welcome.max_nbytes).unwrap_or(usize::MAX);
    if let Some(initializer) = welcome.initializer {
        let called = match &welcome.with_args {
            // SAFETY: the welcome proved it comes from this worker's own driver, which sends
            // one only after checking at the handshake that this worker is the same build, and
            // measured these offsets with `CodeOffset::of_initializer_with` and encoded the
            // arguments for them.
            Some(with) => unsafe { call_initializer_with(initializer, with.function, &with.args) },
            // SAFETY: as above, with an offset measured by `CodeOffset::of_initializer`.
            None => unsafe { call_initializer(initializer) },
        };
        if let Err(error) = called {
            let mut reason = error.to_string();
            truncate_at_char(&mut reason, InitFailed::MAX_REASON);
            let _ = link::send(line.as_fd(), &InitFailed { reason }.encode(), None);
            // The driver reports the reason; nothing to add.
            return Err(Stop {
                code: 0,
                message: None,
            });
        }
    }
    link::send(line.as_fd(), &[Kind::Ready.byte()], None)
        .map_err(|e| Stop::failed(format!("cannot reach the driver: {e}")))?;
    Ok(Connected {
        tasks_rx,
        big_tasks_rx,
        line,
        board,
        max_nbytes,
    })
}

/// Shortens `text` to at most `max` bytes, at a character boundary.
fn truncate_at_char(text: &mut String, max: usize) {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}

/// Waits for the first connection to `server`, or for the driver to hang up the line.
fn accept_or_hang_up(
    server: IpcOneShotServer<Shipment>,
    line: BorrowedFd<'_>,
) -> Result<(IpcReceiver<Shipment>, Shipment), Stop> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("parjob-accept".into())
        .spawn(move || {
            let _ = tx.send(server.accept());
        })
        .map_err(|e| Stop::failed(format!("cannot start a thread: {e}")))?;
    loop {
        match rx.recv_timeout(std::time::Duration::from_millis(50)) {
            Ok(Ok(accepted)) => return Ok(accepted),
            Ok(Err(e)) => {
                return Err(Stop::failed(format!(
                    "the driver's connection to this worker failed: {e}"
                )));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Stop::failed(
                    "ipc-channel failed while accepting the driver's connection".into(),
                ));
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                // The driver shut its writing side at once (see `link::close_write`); both
                // sides shut means it hung up.
                let mut poll = libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&line),
                    events: 0,
                    revents: 0,
                };
                // SAFETY: poll on one valid pollfd, without waiting.
                let ready = unsafe { libc::poll(&mut poll, 1, 0) };
                let hung_up = ready > 0 && poll.revents & (libc::POLLHUP | libc::POLLERR) != 0;
                if hung_up {
                    return Err(Stop::failed(
                        "the driver hung up before connecting (it refused this worker)".into(),
                    ));
                }
            }
        }
    }
}

/// The frame loop: runs frames until the driver says `SHUTDOWN` or goes away.
fn serve(connected: Connected, driver: libc::pid_t) -> Result<(), String> {
    let Connected {
        tasks_rx,
        big_tasks_rx,
        line,
        board,
        max_nbytes,
    } = connected;
    let mut out = Vec::new();
    // The shared segments reused for big frames, see `frame`.
    let mut task_arena: Option<Arena> = None;
    let mut result_arena: Option<Arena> = None;
    // The last frame whose outcomes went out in the result arena: until the driver has read
    // them (the board says so), the arena is not written again. A frame the driver sent before
    // reading them (see `Supervisor::send_ahead`) that has big outcomes gets a new arena.
    let mut lent: u64 = 0;
    let me = std::process::id();
    // SAFETY: registering a child handler that only stores to an atomic, which is
    // async-signal-safe as a handler run in a forked child must be.
    unsafe { libc::pthread_atfork(None, None, Some(note_fork)) };
    loop {
        // The driver hung up without a `SHUTDOWN`: it is dying (the kernel closes a dying
        // process's descriptors before it sends its children their death signal, so this may
        // come first). Exit as the death signal would, with the processes the tasks started:
        // returning would leave them running with parent 1.
        // (A read a signal interrupts is made again by the vendored ipc-channel itself: see
        // vendor/ipc-channel/PARJOB.md.)
        let Ok(message) = tasks_rx.recv() else {
            kill_my_group();
        };
        match Kind::of(&message) {
            Ok(Kind::Run) => {}
            Ok(Kind::Shutdown) => return Ok(()),
            Ok(Kind::Backend(Forget::KIND)) => {
                let forget = Forget::decode(&message)
                    .map_err(|e| format!("the driver sent a malformed message: {e}"))?;
                receive_shipments(&big_tasks_rx, forget.shipments, &mut task_arena)?;
                continue;
            }
            Ok(other) => return Err(format!("the driver sent an unexpected {other:?} message")),
            Err(e) => return Err(format!("the driver sent a malformed message: {e}")),
        }
        let (header, inline) = RunHeader::decode(&message)
            .map_err(|e| format!("the driver sent a malformed message: {e}"))?;
        receive_shipments(&big_tasks_rx, header.attachments, &mut task_arena)?;
        let frame = task_frame(&header, inline, task_arena.as_ref())?;
        out.clear();
        out.resize(DoneHeader::LEN, 0);
        let began = Instant::now();
        let timed = header.timeout.is_some();
        let mut clock = header.timeout.map(TaskClock::new);
        let mut on_start = |position| {
            leave_if_forked();
            if let Some(clock) = clock.as_mut() {
                clock.started(position);
            }
            board.task_started(position, timed);
        };
        // SAFETY: the driver sends frames only after checking at the handshake that this
        // worker is the same build, and measured the entry offset with `CodeOffset::of_entry`.
        unsafe { call_entry(header.entry, frame, &mut out, &mut on_start) }
            .map_err(|e| format!("cannot run a frame: {e}"))?;
        let busy = began.elapsed();
        // A task that forked without the fork handler (a raw clone) still never replies from
        // the copy: its pid gives it away. One getpid per frame, not per task.
        leave_if_forked();
        if std::process::id() != me {
            leave();
        }
        // A task may have blocked, ignored or taken over the death signal, or changed it: set
        // it again, and if the driver died meanwhile (its signal lost), end as it would have.
        arm_death_signal();
        // SAFETY: getppid has no preconditions.
        if driver != unsafe { libc::getppid() } {
            kill_my_group();
        }
        let overrun = clock.and_then(TaskClock::finished);
        let mut lent_out = None;
        let arena = if board.last_read() >= lent {
            &mut result_arena
        } else {
            &mut lent_out
        };
        let (send, new_arena) =
            finish_done(&mut out, header.tag, busy, overrun, max_nbytes, arena)?;
        if new_arena.is_some() {
            // The driver drops its mapping of the old arena on this DONE.
            result_arena = None;
        }
        if send == DoneHeader::LEN && out.len() > DoneHeader::LEN {
            lent = header.tag.seq;
        }
        // A new result arena goes with its DONE, as a descriptor.
        let descriptor = new_arena.as_ref().and_then(Arena::descriptor);
        if let Err(e) = link::send(line.as_fd(), &out[..send], descriptor) {
            // The line is closed or not a socket any more: a task, or a thread one left
            // behind, closed or redirected it. The frame ran: say so on the board, so that the
            // driver takes the frame for spoiled (which task did it, nothing says; alone in its
            // frame twice, a task is blamed) rather than blame the task the board names for a
            // crash of this worker.
            board.frame_done(header.tag.seq);
            return Err(format!("cannot send outcomes: {e}"));
        }
        if let Some(arena) = new_arena.filter(|a| a.len() <= ARENA_KEEP_MAX) {
            result_arena = Some(arena);
        }
        // Only now: the driver takes this for "the DONE is on its way", and if it never
        // arrives (a task wrote stray bytes on the channel), replaces this worker.
        board.frame_done(header.tag.seq);
        if task_arena
            .as_ref()
            .is_some_and(|a| a.len() > ARENA_KEEP_MAX)
        {
            task_arena = None;
        }
        if out.capacity() > 64 << 20 {
            out = Vec::new();
        }
    }
}

/// Set in a process forked from a worker (by a task calling `fork()`), by the handler
/// `pthread_atfork` runs in the child.
static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn note_fork() {
    FORKED.store(true, Ordering::Relaxed);
}

/// Ends a copy of the worker that a task forked, at the first task boundary it reaches (the
/// forked child returned from the task into this loop): it shares the worker's channels, and
/// running the frame's other tasks or answering frames from it would race the worker. Checked
/// before every task, so it must cost next to nothing: one relaxed load.
#[inline]
fn leave_if_forked() {
    if FORKED.load(Ordering::Relaxed) {
        leave();
    }
}

/// Exits a forked copy of the worker at once and quietly: no reply, no flush of the stdio
/// buffers it shares with the worker (which would print their contents twice).
#[cold]
fn leave() -> ! {
    // SAFETY: _exit has no preconditions; nothing of this copy needs to run any more.
    unsafe { libc::_exit(0) }
}

/// Times the tasks of a timed frame as the worker runs them: a task's run time is from its
/// start to the next task's start (or the frame's end), the same start the board shows the
/// driver. Reports the first task whose run time exceeded the frame's timeout: one that
/// finished before the driver could kill it must fail all the same.
struct TaskClock {
    limit: u64,
    /// The position and start (monotonic nanoseconds) of the task running now.
    current: Option<(usize, u64)>,
    overrun: Option<u32>,
}

impl TaskClock {
    fn new(timeout: std::time::Duration) -> TaskClock {
        TaskClock {
            limit: u64::try_from(timeout.as_nanos()).unwrap_or(u64::MAX),
            current: None,
            overrun: None,
        }
    }

    /// Task `position` starts now (the one before it has just ended).
    fn started(&mut self, position: usize) {
        let now = monotonic_nanos();
        self.end_current(now);
        self.current = Some((position, now));
    }

    fn end_current(&mut self, now: u64) {
        if let Some((position, start)) = self.current.take()
            && self.overrun.is_none()
            && now.saturating_sub(start) > self.limit
        {
            self.overrun = Some(u32::try_from(position).unwrap_or(u32::MAX));
        }
    }

    /// The frame ended: the first task that overran, if any.
    fn finished(mut self) -> Option<u32> {
        self.end_current(monotonic_nanos());
        self.overrun
    }
}

/// Takes the `count` shipments a message announced from `big_tasks` and applies them.
fn receive_shipments(
    big_tasks: &IpcReceiver<Shipment>,
    count: u32,
    task_arena: &mut Option<Arena>,
) -> Result<(), String> {
    for _ in 0..count {
        let shipment = big_tasks
            .recv()
            .map_err(|e| format!("cannot receive shared memory: {e}"))?;
        if let Some(memory) = receive(shipment) {
            *task_arena = Some(Arena::new(memory));
        }
    }
    Ok(())
}

/// Keeps big freed blocks in the worker's heap (glibc) instead of unmapping them.
///
/// A worker decodes each big argument into a fresh allocation; by default glibc maps every
/// block over 32 MiB anew and unmaps it when freed, so each big task pays a page fault per
/// page (a 50 MB `Vec<f64>` decoded in 45 ms instead of 11 ms). Blocks up to 256 MiB now come
/// from the heap, and up to 256 MiB of freed memory stays there for the next task. Set
/// `PARJOB_KEEP_MALLOC_DEFAULTS` to keep glibc's defaults (and its lower memory use).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("PARJOB_KEEP_MALLOC_DEFAULTS").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before the worker
        // allocates anything big, and a refused value (returned 0) leaves the defaults.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_names_the_first_task_that_ran_past_the_timeout() {
        let mut clock = TaskClock::new(std::time::Duration::from_millis(5));
        clock.started(0);
        clock.started(1);
        std::thread::sleep(std::time::Duration::from_millis(8));
        clock.started(2);
        std::thread::sleep(std::time::Duration::from_millis(8));
        assert_eq!(clock.finished(), Some(1), "the first of the two");
        let mut quick = TaskClock::new(std::time::Duration::from_secs(5));
        quick.started(0);
        assert_eq!(quick.finished(), None);
        let mut last = TaskClock::new(std::time::Duration::from_millis(1));
        last.started(0);
        std::thread::sleep(std::time::Duration::from_millis(3));
        assert_eq!(
            last.finished(),
            Some(0),
            "the last task is timed to the frame's end"
        );
    }

    #[test]
    fn a_process_whose_parent_is_not_the_driver_is_not_a_worker() {
        // This test process was not started by a parjob driver.
        assert!(!started_as_worker());
    }

    // ------------------------------------------------------------ the handshake, from a driver

    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    use ipc_channel::ipc::{self, IpcBytesSender, IpcSender};
    use parjob_core::Initializer;
    use parjob_remote::{CodeOffset, Nonce};

    /// What the test initializer creates, so that a test can tell whether it was called.
    const ENV_MARK: &str = "PARJOB_TEST_INITIALIZER_MARK";

    fn leave_a_mark() {
        if let Some(path) = std::env::var_os(ENV_MARK) {
            std::fs::write(path, b"called").unwrap();
        }
    }

    #[test]
    #[ignore = "started as a worker process by the handshake tests of this module"]
    fn worker_entry() {
        init();
    }

    /// A driver of these tests' own: this test binary started as a worker with `secret`, its
    /// line, and the Hello it sent on it.
    struct Started {
        child: Child,
        line: link::Reader,
        hello: Hello,
    }

    fn start_worker(secret: &HandshakeSecret, mark: &std::path::Path) -> Started {
        let (line, worker_end) = link::pair().unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "worker::tests::worker_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ENV_DRIVER, std::process::id().to_string())
            .env(ENV_INDEX, "0")
            .env(ENV_SECRET, secret.to_hex())
            .env(ENV_MARK, mark)
            .stdin(Stdio::from(worker_end))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let mut line = link::Reader::new(std::sync::Arc::new(line)).unwrap();
        let hello = line
            .recv(Hello::MAX_LEN)
            .unwrap()
            .expect("the worker greets");
        let hello = Hello::decode(&hello.bytes).unwrap();
        Started { child, line, hello }
    }

    /// Connects to the worker's server as its driver would: its channel for messages.
    fn connect(server: &str) -> (IpcSender<Shipment>, IpcBytesSender) {
        let big_tasks = IpcSender::<Shipment>::connect(server.to_owned()).unwrap();
        let (tasks, tasks_rx) = ipc::bytes_channel().unwrap();
        let (_board, board) = Board::new().unwrap();
        big_tasks
            .send(Shipment::Channels {
                tasks: tasks_rx,
                board,
            })
            .unwrap();
        (big_tasks, tasks)
    }

    fn exit_code(mut child: Child) -> Option<i32> {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                panic!("the worker did not exit");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn mark_path(test: &str) -> std::path::PathBuf {
        let path =
            std::env::temp_dir().join(format!("parjob-worker-mark-{}-{test}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        path
    }

    fn welcome(proof: Nonce) -> Vec<u8> {
        Welcome {
            max_nbytes: 1 << 20,
            initializer: Some(CodeOffset::of_initializer(Initializer(leave_a_mark)).unwrap()),
            with_args: None,
            proof,
        }
        .encode()
    }

    #[test]
    fn a_worker_greets_with_its_secret_and_obeys_a_welcome_that_proves_the_drivers() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("obeys");
        let mut started = start_worker(&secret, &mark);
        assert_eq!(Nonce::from_bytes(started.hello.proof), secret.worker);
        let (_big_tasks, tasks) = connect(&started.hello.server);
        tasks.send(&welcome(secret.driver)).unwrap();
        let welcomed = started.line.recv(16).unwrap().unwrap();
        assert_eq!(
            welcomed.bytes,
            [WELCOMED],
            "it took the welcome for its driver's"
        );
        let ready = started.line.recv(16).unwrap().unwrap();
        assert_eq!(ready.bytes, [Kind::Ready.byte()]);
        assert!(mark.exists(), "the initializer ran");
        tasks.send(&[Kind::Shutdown.byte()]).unwrap();
        assert_eq!(exit_code(started.child), Some(0));
        let _ = std::fs::remove_file(&mark);
    }

    #[test]
    fn a_worker_refuses_a_welcome_without_its_drivers_proof_and_calls_nothing() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("refuses");
        let mut started = start_worker(&secret, &mark);
        // A stranger that reached the worker's server first: it knows the worker's half (it
        // could have read the Hello), not the driver's.
        let (_big_tasks, tasks) = connect(&started.hello.server);
        tasks.send(&welcome(secret.worker)).unwrap();
        assert!(
            started.line.recv(16).unwrap().is_none(),
            "no READY, no INIT_FAILED"
        );
        assert_eq!(exit_code(started.child), Some(EXIT_REFUSED_DRIVER));
        assert!(!mark.exists(), "the initializer was called");
    }

    #[test]
    fn a_stranger_that_reaches_the_workers_server_first_with_forged_bytes_gets_nothing_run() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("forged");
        let mut started = start_worker(&secret, &mark);
        // What ipc-channel's receive would take for a message of 2^46 bytes, and more noise,
        // from a raw socket of the kind ipc-channel listens with.
        // SAFETY: plain socket calls on a descriptor this test owns, with valid buffers.
        unsafe {
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
            assert!(fd >= 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (to, from) in addr.sun_path.iter_mut().zip(started.hello.server.bytes()) {
                *to = from as libc::c_char;
            }
            let connected = libc::connect(
                fd,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_un>() as libc::socklen_t,
            );
            assert_eq!(connected, 0, "{}", std::io::Error::last_os_error());
            let mut forged = (1u64 << 46).to_le_bytes().to_vec();
            forged.extend([0xff; 56]);
            libc::send(fd, forged.as_ptr().cast(), forged.len(), 0);
            libc::close(fd);
        }
        assert!(
            started.line.recv(16).unwrap().is_none(),
            "no WELCOMED, no READY"
        );
        let code = exit_code(started.child);
        assert_ne!(code, Some(0), "a failed handshake is never status 0");
        assert!(!mark.exists(), "the initializer was called");
    }

    #[test]
    fn a_worker_whose_driver_hangs_up_before_its_welcome_exits_75_not_0() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("hangs-up");
        let started = start_worker(&secret, &mark);
        let channels = connect(&started.hello.server);
        drop(channels);
        assert_eq!(exit_code(started.child), Some(EXIT_HANDSHAKE_FAILED));
        assert!(!mark.exists());
    }

    #[test]
    fn a_worker_whose_driver_hangs_up_instead_of_connecting_exits_75() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("never-connects");
        let started = start_worker(&secret, &mark);
        let Started { child, line, hello } = started;
        // The driver refused the Hello (another build, say): it never connects, and closes
        // the line. The worker's server goes with it.
        drop(line);
        assert_eq!(exit_code(child), Some(EXIT_HANDSHAKE_FAILED));
        assert!(
            !std::path::Path::new(&hello.server).exists(),
            "the worker's server was removed"
        );
    }

    #[test]
    fn a_hello_survives_the_round_trip_and_a_short_one_is_an_error() {
        let hello = Hello {
            proof: [3; 16],
            server: "/tmp/parjob-0/.tmpAbc/socket".into(),
            identity: vec![1, 2, 3],
        };
        let bytes = hello.encode();
        assert_eq!(Hello::decode(&bytes), Ok(hello));
        for cut in 0..19 {
            assert!(Hello::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        assert!(Hello::decode(&[Kind::Ready.byte(); 40]).is_err());
    }
}
