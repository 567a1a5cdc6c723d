//! The worker side: what `init()` runs in a process the driver started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ipc_channel::ipc::{
    self, IpcBytesReceiver, IpcBytesSender, IpcReceiver, IpcSender, IpcSharedMemory,
};
use parjob_core::{Backend, set_worker_identity};
use parjob_remote::{
    DoneHeader, HandshakeSecret, Identity, InitFailed, Kind, RunHeader, Welcome, call_entry,
    call_initializer,
};

use crate::frame::{finish_done, task_frame};
use crate::mapping::Arena;
use crate::shared::receive;
use crate::wire::{
    ARENA_KEEP_MAX, Board, ENV_INDEX, ENV_SECRET, ENV_SERVER, EXIT_HANDSHAKE_FAILED,
    EXIT_REFUSED_DRIVER, Forget, Hello, PROTOCOL, Shipment, monotonic_nanos,
};

static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// Whether this process was started as a worker (it may not have reached the loop yet).
pub(crate) fn started_as_worker() -> bool {
    server_name().is_some()
}

/// The driver's pid, as the worker marker gives it.
fn driver_pid() -> Option<libc::pid_t> {
    let value = std::env::var(ENV_SERVER).ok()?;
    value.split_once(':')?.0.parse().ok()
}

/// The driver's server name, if this process is a worker the driver started itself.
///
/// The variable reads `<driver pid>:<server name>`. A process a task starts inherits it, but
/// its parent is the worker, not the driver: it is not a worker (a parjob program a task runs
/// works normally).
fn server_name() -> Option<String> {
    let value = std::env::var(ENV_SERVER).ok()?;
    let (driver, name) = value.split_once(':')?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    (driver.parse::<libc::pid_t>().ok()? == parent).then(|| name.to_string())
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
    let Some(server) = server_name() else {
        return;
    };
    IN_WORKER.store(true, Ordering::Relaxed);
    // Die with the driver (more exactly, with its thread that started this process). Set here
    // rather than between fork and exec, so that the driver can spawn with posix_spawn, whose
    // cost does not grow with the driver's memory as fork's does.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: getppid has no preconditions.
    if driver_pid() != Some(unsafe { libc::getppid() }) {
        // The driver died before the signal was set: nobody is waiting for this worker.
        std::process::exit(0);
    }
    // Lead a process group of its own, so that the driver, when it kills this worker, kills
    // the processes its tasks started with it (`kill(-pid)`). It cannot fail for a process
    // just spawned (EPERM is for a session leader); were it to, only the worker is killed.
    // SAFETY: setpgid(0, 0) only changes this process's own group.
    unsafe { libc::setpgid(0, 0) };
    let code = match handshake(server) {
        Err(stop) => {
            if let Some(message) = stop.message {
                eprintln!("parjob worker (pid {}): {message}", std::process::id());
            }
            stop.code
        }
        Ok(connected) => match serve(connected) {
            Ok(()) => 0,
            Err(message) => {
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
    results_tx: IpcBytesSender,
    big_results_tx: IpcSender<IpcSharedMemory>,
    board: Board,
    max_nbytes: usize,
}

/// Greets the driver, authenticates its welcome, runs the initializer and says `READY`.
fn handshake(server: String) -> Result<Connected, Stop> {
    let index: usize = std::env::var(ENV_INDEX)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| Stop::failed(format!("{ENV_INDEX} is missing or not a number")))?;
    let secret = std::env::var(ENV_SECRET)
        .map_err(|_| Stop::failed(format!("{ENV_SECRET} is missing")))
        .and_then(|text| {
            HandshakeSecret::from_hex(&text).map_err(|e| Stop::failed(format!("{ENV_SECRET}: {e}")))
        })?;
    set_worker_identity(Some((Backend::Process, index)));
    tune_malloc();
    let (board, board_handle) =
        Board::new().ok_or_else(|| Stop::failed("cannot make the status board".into()))?;
    let channel_error = |e: std::io::Error| Stop::failed(format!("cannot make a channel: {e}"));
    let (tasks_tx, tasks_rx) = ipc::bytes_channel().map_err(channel_error)?;
    let (big_tasks_tx, big_tasks_rx) = ipc::channel::<Shipment>().map_err(channel_error)?;
    let (results_tx, results_rx) = ipc::bytes_channel().map_err(channel_error)?;
    let (big_results_tx, big_results_rx) =
        ipc::channel::<IpcSharedMemory>().map_err(channel_error)?;
    let hello = Hello {
        proof: secret.worker.to_bytes(),
        identity: Identity::current(PROTOCOL).encode(),
        tasks: tasks_tx,
        big_tasks: big_tasks_tx,
        results: results_rx,
        big_results: big_results_rx,
        board: board_handle,
    };
    let door = IpcSender::<Hello>::connect(server)
        .map_err(|e| Stop::failed(format!("cannot connect to the driver: {e}")))?;
    door.send(hello)
        .map_err(|e| Stop::failed(format!("cannot greet the driver: {e}")))?;
    drop(door);

    // A driver that refuses this worker (another build), or whose handshake failed, drops the
    // channel.
    let welcome = tasks_rx.recv().map_err(|_| {
        Stop::failed(
            "the driver hung up before its welcome (it refused this worker, or could not take \
             its channels)"
                .into(),
        )
    })?;
    // Nothing the welcome asks is done before it proved it comes from the driver that holds
    // this worker's secret: whoever else reached the server could have sent it.
    let welcome = Welcome::decode(&welcome)
        .and_then(|welcome| welcome.check(&secret.driver).map(|()| welcome))
        .map_err(|e| Stop::refused(format!("refused the driver's welcome: {e}")))?;
    let max_nbytes = usize::try_from(welcome.max_nbytes).unwrap_or(usize::MAX);
    if let Some(initializer) = welcome.initializer {
        // SAFETY: the welcome proved it comes from this worker's own driver, which sends one
        // only after checking at the handshake that this worker is the same build, and
        // measured this offset with `CodeOffset::of_initializer`.
        if let Err(error) = unsafe { call_initializer(initializer) } {
            let reply = InitFailed {
                reason: error.to_string(),
            };
            let _ = results_tx.send(&reply.encode());
            // The driver reports the reason; nothing to add.
            return Err(Stop {
                code: 0,
                message: None,
            });
        }
    }
    results_tx
        .send(&[Kind::Ready.byte()])
        .map_err(|e| Stop::failed(format!("cannot reach the driver: {e}")))?;
    Ok(Connected {
        tasks_rx,
        big_tasks_rx,
        results_tx,
        big_results_tx,
        board,
        max_nbytes,
    })
}

/// The frame loop: runs frames until the driver says `SHUTDOWN` or goes away.
fn serve(connected: Connected) -> Result<(), String> {
    let Connected {
        tasks_rx,
        big_tasks_rx,
        results_tx,
        big_results_tx,
        board,
        max_nbytes,
    } = connected;
    let mut out = Vec::new();
    // The shared segments reused for big frames, see `frame`.
    let mut task_arena: Option<Arena> = None;
    let mut result_arena: Option<Arena> = None;
    let me = std::process::id();
    // SAFETY: registering a child handler that only stores to an atomic, which is
    // async-signal-safe as a handler run in a forked child must be.
    unsafe { libc::pthread_atfork(None, None, Some(note_fork)) };
    loop {
        // The driver gone (dropped without a shutdown, or dead) means: exit too.
        let Ok(message) = tasks_rx.recv() else {
            return Ok(());
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
        let overrun = clock.and_then(TaskClock::finished);
        let send = finish_done(
            &mut out,
            header.tag,
            busy,
            overrun,
            max_nbytes,
            &mut result_arena,
            &big_results_tx,
        )?;
        results_tx
            .send(&out[..send])
            .map_err(|e| format!("cannot send outcomes: {e}"))?;
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
    use std::sync::mpsc;
    use std::time::Duration;

    use ipc_channel::ipc::IpcOneShotServer;
    use parjob_core::Initializer;
    use parjob_remote::{CodeOffset, Nonce};

    use crate::wire::EXIT_HANDSHAKE_FAILED;

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

    /// A driver of these tests' own: its server, this test binary started as a worker with
    /// `secret`, and the worker's Hello.
    fn start_worker(secret: &HandshakeSecret, mark: &std::path::Path) -> (Child, Hello) {
        let (server, name) = IpcOneShotServer::<Hello>::new().unwrap();
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "worker::tests::worker_entry",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
                "-q",
            ])
            .env(ENV_SERVER, format!("{}:{name}", std::process::id()))
            .env(ENV_INDEX, "0")
            .env(ENV_SECRET, secret.to_hex())
            .env(ENV_MARK, mark)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        // `accept` has no timeout: wait for it on a thread.
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(server.accept().map(|(_, hello)| hello));
        });
        let hello = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the worker greets within a minute")
            .unwrap();
        (child, hello)
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

    fn welcome(proof: Nonce) -> [u8; Welcome::LEN] {
        Welcome {
            max_nbytes: 1 << 20,
            initializer: Some(CodeOffset::of_initializer(Initializer(leave_a_mark)).unwrap()),
            proof,
        }
        .encode()
    }

    #[test]
    fn a_worker_greets_with_its_secret_and_obeys_a_welcome_that_proves_the_drivers() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("obeys");
        let (child, hello) = start_worker(&secret, &mark);
        assert_eq!(Nonce::from_bytes(hello.proof), secret.worker);
        hello.tasks.send(&welcome(secret.driver)).unwrap();
        assert_eq!(hello.results.recv().unwrap(), [Kind::Ready.byte()]);
        assert!(mark.exists(), "the initializer ran");
        hello.tasks.send(&[Kind::Shutdown.byte()]).unwrap();
        assert_eq!(exit_code(child), Some(0));
        let _ = std::fs::remove_file(&mark);
    }

    #[test]
    fn a_worker_refuses_a_welcome_without_its_drivers_proof_and_calls_nothing() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("refuses");
        let (child, hello) = start_worker(&secret, &mark);
        // A fake driver: it knows the worker's half (it received the Hello), not the driver's.
        hello.tasks.send(&welcome(secret.worker)).unwrap();
        assert!(hello.results.recv().is_err(), "no READY, no INIT_FAILED");
        assert_eq!(exit_code(child), Some(EXIT_REFUSED_DRIVER));
        assert!(!mark.exists(), "the initializer was called");
    }

    #[test]
    fn a_worker_whose_driver_hangs_up_before_its_welcome_exits_75_not_0() {
        let secret = HandshakeSecret::random().unwrap();
        let mark = mark_path("hangs-up");
        let (child, hello) = start_worker(&secret, &mark);
        drop(hello);
        assert_eq!(exit_code(child), Some(EXIT_HANDSHAKE_FAILED));
        assert!(!mark.exists());
    }
}
