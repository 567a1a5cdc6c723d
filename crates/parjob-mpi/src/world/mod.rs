//! The MPI world: one thread per rank makes every MPI call (rsmpi's communicator is `!Sync`
//! under Open MPI). On rank 0 it is the driver thread, fed jobs by [`MpiPool`]; on the other
//! ranks it is the rank server, which never returns.
//!
//! Sends are non-blocking (`MPI_Isend`, their buffers kept until `MPI_Test` says they went), so
//! no call ever waits on a rank that may be dead; a rank that stops beating (or whose process
//! is gone, when it shares rank 0's host) is declared lost after a deadline, and after a loss
//! rank 0 leaves with `_exit` rather than wait in `MPI_Finalize`.

//! The modules, one job each: `transport` (non-blocking sends and receives, idling, hosts and
//! pids), `bell` (doorbells that wake the ranks on rank 0's host instead of polling), `driver`
//! (rank 0's driver thread), `pool` ([`MpiPool`], the handle `Parallel` uses) and `server` (a
//! worker rank's server and its local pool). This file starts MPI and holds
//! what they share.

mod bell;
mod completer;
mod driver;
mod pool;
mod server;
mod transport;

pub use pool::MpiPool;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use mpi::topology::Communicator;
use parjob_core::{Error, Job};

use driver::DriverState;
use server::serve;

/// `serve`'s status for "stop without MPI_Finalize, successfully" (a rank was lost).
const EXIT_WITHOUT_FINALIZE: i32 = -1;

/// How long rank 0 waits for every rank's `HELLO` (their local pools start first).
const HELLO_DEADLINE: Duration = Duration::from_secs(60);
/// How long rank 0 waits for `BYE`s at exit before leaving without `MPI_Finalize`.
const BYE_DEADLINE: Duration = Duration::from_secs(5);

/// A rank that sent nothing for this long is lost (`PARJOB_MPI_RANK_TIMEOUT`, in seconds; 5
/// when unset or unusable, which [`MpiPool::new`](crate::MpiPool::new) refuses on rank 0).
fn silence_limit() -> Duration {
    // Read once: rank servers ask on every turn of their loop.
    static LIMIT: OnceLock<Duration> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        configured_silence_limit()
            .ok()
            .flatten()
            .unwrap_or(Duration::from_secs(5))
    })
}

/// `PARJOB_MPI_RANK_TIMEOUT` as set: `None` when unset, an error naming the value when it is
/// not a positive number of seconds.
fn configured_silence_limit() -> Result<Option<Duration>, String> {
    let Some(value) = std::env::var_os("PARJOB_MPI_RANK_TIMEOUT") else {
        return Ok(None);
    };
    parse_silence_limit(&value.to_string_lossy()).map(Some)
}

/// A `PARJOB_MPI_RANK_TIMEOUT` value: seconds, at least [`MIN_SILENCE_LIMIT`], held to
/// [`MAX_SILENCE_LIMIT`].
fn parse_silence_limit(text: &str) -> Result<Duration, String> {
    let Some(seconds) = text.trim().parse::<f64>().ok().filter(|s| !s.is_nan()) else {
        return Err(format!(
            "PARJOB_MPI_RANK_TIMEOUT={text:?} is not a number of seconds: give how long a rank \
             may stay silent before it counts as lost, e.g. 5 (the default) or 60"
        ));
    };
    if seconds < MIN_SILENCE_LIMIT.as_secs_f64() {
        return Err(format!(
            "PARJOB_MPI_RANK_TIMEOUT={text:?} is too short: ranks beat every {:?}, and a limit \
             under {MIN_SILENCE_LIMIT:?} would count a rank that is only late as lost; give \
             {} or more (seconds)",
            crate::wire::BEAT_EVERY,
            MIN_SILENCE_LIMIT.as_secs()
        ));
    }
    // A huge value means "never": held to a year, which any clock can add without overflow.
    Ok(Duration::try_from_secs_f64(seconds)
        .map_or(MAX_SILENCE_LIMIT, |limit| limit.min(MAX_SILENCE_LIMIT)))
}

/// The shortest `PARJOB_MPI_RANK_TIMEOUT`: four beats.
const MIN_SILENCE_LIMIT: Duration = Duration::from_secs(1);
/// The longest: a year stands for "never".
const MAX_SILENCE_LIMIT: Duration = Duration::from_secs(365 * 24 * 3600);

/// A job's tasks as a `RUN` carries them, made on the thread that submits the job: encoding
/// runs the arguments' `Serialize` (user code, which may take seconds), and rank 0's driver
/// thread, which beats for every rank, must not wait for it.
pub(super) struct Encoded {
    /// The entry the ranks' workers call.
    entry: parjob_remote::CodeOffset,
    /// The frame of tasks; the driver appends the segment ids and the trailer.
    tasks: Vec<u8>,
    /// The `SharedSlice` segments the frame names by handle.
    segments: Vec<Arc<parjob_core::SharedSegment>>,
    /// How long encoding took.
    took: Duration,
}

impl Encoded {
    /// Encodes `job`'s tasks. An error (a closure as the task function, a panicking
    /// `Serialize`) is the outcome of the job's first task.
    pub(super) fn of(job: &Job, reserve: usize) -> Result<Encoded, Error> {
        let began = Instant::now();
        let batch = job.batch();
        let entry = batch
            .remote_entry()
            .and_then(|entry| parjob_remote::CodeOffset::of_entry(entry, batch.function_name()))?;
        let len = batch.len();
        // The tasks first and the fixed-size trailer last: the rank then hands the message's
        // own buffer, cut short, to its local pool instead of copying the frame out of it.
        let mut tasks = Vec::with_capacity(reserve + 16 * len);
        // Its `SharedSlice`s of shared memory travel as handles, their segments apart.
        let encoded = parjob_core::catch_task(|| {
            parjob_core::collect_shared(|| batch.encode_tasks(0..len, &mut tasks)).1
        });
        let segments = encoded.map_err(|message| {
            Error::task_panicked(
                batch.first_index(),
                format!("encoding its arguments for an MPI rank panicked: {message}"),
            )
        })?;
        Ok(Encoded {
            entry,
            tasks,
            segments,
            took: began.elapsed(),
        })
    }
}

/// What rank 0's driver thread is told.
enum Command {
    /// Run `job` on one of ranks `1..=ranks`, in their local pool `pool` (0: the one each
    /// rank starts with, without an initializer).
    Submit {
        job: Job,
        ranks: usize,
        pool: u64,
        /// The job's tasks, encoded by the submitting thread (see [`Encoded`]).
        encoded: Result<Encoded, Error>,
    },
    /// Ranks `1..=ranks` start local pool `pool`, whose workers run the initializer `welcome`
    /// (a parjob-remote `Welcome`) names.
    OpenPool {
        pool: u64,
        ranks: usize,
        welcome: Vec<u8>,
    },
    /// Local pool `pool` is of no more use: the ranks stop its workers.
    ClosePool { pool: u64 },
    /// The program is exiting: stop the ranks.
    Shutdown(Sender<()>),
    /// Rank 0's doorbell rang (see [`bell`]): a message is here, or (the first time a rank
    /// rings) that rank rings from now on.
    Rang,
}

/// A worker rank as rank 0 knows it after its `HELLO`.
#[derive(Debug, Clone)]
struct RankInfo {
    rank: usize,
    host: String,
    pid: u32,
    workers: usize,
}

/// Rank 0's handle on its driver thread.
struct Driver {
    commands: Mutex<Sender<Command>>,
    /// Filled once every rank said hello: the ranks, or why the world cannot work.
    ranks: OnceLock<Result<Vec<RankInfo>, Error>>,
    ready: (Mutex<bool>, std::sync::Condvar),
    lost: AtomicBool,
    /// Set when the driver thread panicked: why pools are refused from then on.
    broken: OnceLock<String>,
}

static DRIVER: OnceLock<Arc<Driver>> = OnceLock::new();
/// Set by `panic_driver_for_tests`: the driver panics at its next turn.
pub(crate) static PANIC_DRIVER: AtomicBool = AtomicBool::new(false);
/// Set by `break_next_run_for_tests`: the driver sends its next `RUN` unreadable.
pub(crate) static BREAK_NEXT_RUN: AtomicBool = AtomicBool::new(false);
/// Set by `hold_next_done_for_tests`: the driver takes the `DONE` of the next `RUN` it sends
/// this many milliseconds after it arrived, as if it were still arriving.
pub(crate) static HOLD_NEXT_DONE_MS: AtomicU64 = AtomicU64::new(0);
static WORLD_SIZE: OnceLock<usize> = OnceLock::new();
/// Set by [`init`] under a launcher: an MPI pool asked for without it can say that `init` was
/// not called, rather than guess.
pub(crate) static INIT_CALLED: AtomicBool = AtomicBool::new(false);

/// The number of ranks in the world, once [`init`] started MPI; `None` outside a launcher.
pub fn world_size() -> Option<usize> {
    WORLD_SIZE.get().copied()
}

/// Call first thing in `main` (after the process backend's `init`; `parjob::init()` does
/// both). Outside an MPI launcher it does nothing. Under one, it starts MPI on a thread of its
/// own; on rank 0 it returns, on every other rank it serves rank 0 until the program on rank
/// 0 exits, then ends the process, never returning.
pub fn init() {
    if !crate::launched_by_mpi() || DRIVER.get().is_some() {
        return;
    }
    INIT_CALLED.store(true, Ordering::SeqCst);
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("parjob-mpi".into())
        .spawn(move || mpi_thread(tx));
    if let Err(e) = spawned {
        eprintln!("parjob: cannot start the MPI thread: {e}; the MPI backend is unavailable");
        return;
    }
    let deadline = init_deadline();
    match rx.recv_timeout(deadline) {
        // Rank 0: the driver thread runs on; main goes on.
        Ok(0) => {}
        // A worker rank: the MPI thread serves and ends the process.
        Ok(_) => loop {
            std::thread::park();
        },
        Err(mpsc::RecvTimeoutError::Timeout) => {
            // MPI_Init waits for every process of the launch, and under `--enable-recovery`
            // one that ended before it started MPI leaves the others waiting for ever.
            let rank = [
                "OMPI_COMM_WORLD_RANK",
                "PMIX_RANK",
                "PMI_RANK",
                "SLURM_PROCID",
            ]
            .iter()
            .find_map(|var| std::env::var(var).ok())
            .map_or(String::new(), |rank| format!(" (rank {rank})"));
            transport::say(&format!(
                "parjob: MPI_Init did not finish within {deadline:?} in this process{rank}, pid \
                 {}: a process of the launch may have ended before it started MPI (see the \
                 launcher's output), or the launcher cannot reach a node; this process ends \
                 (PARJOB_MPI_INIT_TIMEOUT sets the wait, in seconds)",
                std::process::id()
            ));
            // SAFETY: `_exit` ends the process at once: MPI is half started on another
            // thread, and nothing of this process's may run after it (no atexit, no unwind).
            unsafe { libc::_exit(1) };
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            eprintln!("parjob: MPI did not start; the MPI backend is unavailable")
        }
    }
}

/// How long [`init`] waits for `MPI_Init`: `PARJOB_MPI_INIT_TIMEOUT` seconds (at least 1),
/// [`INIT_DEADLINE`] when unset; a value that is not such a number is said on stderr and the
/// default used (`init` has no caller to return an error to).
fn init_deadline() -> Duration {
    let Ok(text) = std::env::var("PARJOB_MPI_INIT_TIMEOUT") else {
        return INIT_DEADLINE;
    };
    match text.trim().parse::<f64>() {
        // Not "for ever" (`inf`): that is the hang this wait exists to end.
        Ok(seconds) if seconds >= 1.0 && seconds.is_finite() => {
            Duration::try_from_secs_f64(seconds)
                .map_or(MAX_SILENCE_LIMIT, |limit| limit.min(MAX_SILENCE_LIMIT))
        }
        _ => {
            transport::say(&format!(
                "parjob: PARJOB_MPI_INIT_TIMEOUT={text:?} is not a finite number of seconds of \
                 1 or more; MPI_Init is waited for {INIT_DEADLINE:?}"
            ));
            INIT_DEADLINE
        }
    }
}

/// How long [`init`] waits for `MPI_Init` by default: it waits for every process of the
/// launch to start, which on a big job under a busy launcher takes seconds, not minutes.
const INIT_DEADLINE: Duration = Duration::from_secs(120);

fn mpi_thread(started: Sender<usize>) {
    let Some((universe, _threading)) = mpi::initialize_with_threading(mpi::Threading::Multiple)
    else {
        return;
    };
    transport::no_yield_in_progress();
    transport::tighten_timer_slack();
    let world = universe.world();
    let rank = usize::try_from(world.rank()).unwrap_or(0);
    let size = usize::try_from(world.size()).unwrap_or(1);
    let _ = WORLD_SIZE.set(size);
    if rank != 0 {
        let _ = started.send(rank);
        // A panic here (a bug of parjob's) would leave this rank's main thread parked in
        // `init()` for ever and `mpirun` waiting for it: end the rank instead, which rank 0
        // reports as a lost rank.
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| serve(&world, rank)));
        let status = served.unwrap_or_else(|_| {
            transport::say(&format!(
                "parjob: MPI rank {rank}'s server panicked (a bug); the rank ends"
            ));
            3
        });
        drop(world);
        if status == 0 {
            drop(universe); // MPI_Finalize: rank 0 said STOP, every rank is finalizing
            std::process::exit(0);
        }
        let status = if status == EXIT_WITHOUT_FINALIZE {
            0
        } else {
            status
        };
        // SAFETY: `_exit` ends the process at once: no MPI_Finalize that would wait for a
        // lost rank.
        unsafe { libc::_exit(status) };
    }
    let (commands, inbox) = mpsc::channel();
    let driver = Arc::new(Driver {
        commands: Mutex::new(commands),
        ranks: OnceLock::new(),
        ready: (Mutex::new(false), std::sync::Condvar::new()),
        lost: AtomicBool::new(false),
        broken: OnceLock::new(),
    });
    let _ = DRIVER.set(Arc::clone(&driver));
    register_at_exit();
    let _ = started.send(0);
    let bells = {
        let commands = driver
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        Some(bell::RankZeroBells::new(move || {
            commands.send(Command::Rang).is_ok()
        }))
    };
    let mut state = DriverState::new(&world, size, Arc::clone(&driver), bells);
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| state.run(inbox)));
    let exiting = match ran {
        Ok(exiting) => exiting,
        Err(panic) => {
            // A bug of parjob's: the jobs the driver held fail with this message, and later
            // pools are refused with it instead of waiting for ever.
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let why = format!(
                "rank 0's MPI thread panicked ({message}), a bug of parjob's; the MPI backend \
                 cannot be used for the rest of this program"
            );
            let _ = driver.broken.set(why.clone());
            let (lock, ready) = &driver.ready;
            *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
            ready.notify_all();
            state.abandon(&why);
            // Neither MPI_Finalize (the ranks are not stopping) nor `_exit` (main runs on):
            // the thread stays, holding MPI, until the process ends. The ranks, no longer
            // hearing rank 0, end by themselves.
            loop {
                std::thread::park();
            }
        }
    };
    let lost = driver.lost.load(Ordering::SeqCst);
    drop(state);
    drop(world);
    if lost {
        // A lost rank would never join MPI_Finalize: leave without it (the caller of
        // `exit` already flushed Rust's stdout), with the status the program exits with.
        // SAFETY: `_exit` ends the process at once, skipping MPI_Finalize.
        unsafe { libc::_exit(EXIT_STATUS.load(Ordering::SeqCst)) };
    }
    drop(universe); // MPI_Finalize, with every rank finalizing after its BYE
    // Only now may the exiting main thread go on (and end the process).
    if let Some(done) = exiting {
        let _ = done.send(());
    }
}

/// The status rank 0's program passed to `exit` (or returned from `main`), for the driver
/// thread that ends the process with `_exit` after a lost rank: a failed run's non-zero status
/// must reach `mpirun` and the shell.
static EXIT_STATUS: AtomicI32 = AtomicI32::new(0);

#[cfg(all(target_os = "linux", target_env = "gnu"))]
unsafe extern "C" {
    /// glibc's `atexit` that also hands the handler the exit status.
    fn on_exit(
        function: extern "C" fn(libc::c_int, *mut libc::c_void),
        argument: *mut libc::c_void,
    ) -> libc::c_int;
}

/// Registers [`at_exit`] to run when rank 0's program exits; on glibc with the exit status,
/// which it keeps in [`EXIT_STATUS`].
fn register_at_exit() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" fn at_exit_with_status(status: libc::c_int, _: *mut libc::c_void) {
            EXIT_STATUS.store(status, Ordering::SeqCst);
            at_exit();
        }
        // SAFETY: the handler is a plain `extern "C" fn` that does not unwind and ignores its
        // (null) argument.
        if unsafe { on_exit(at_exit_with_status, std::ptr::null_mut()) } == 0 {
            return;
        }
    }
    // Elsewhere (or if `on_exit` failed) a lost rank makes rank 0 exit with status 1, so that
    // a failure is never reported as success.
    EXIT_STATUS.store(1, Ordering::SeqCst);
    // SAFETY: `at_exit` is a plain `extern "C" fn()` that does not unwind.
    unsafe { libc::atexit(at_exit) };
}

/// Registered with `atexit` on rank 0: stops the ranks and waits for the driver thread, which
/// finalizes MPI (or `_exit`s after a loss).
extern "C" fn at_exit() {
    let Some(driver) = DRIVER.get() else {
        return;
    };
    let (done_tx, done_rx) = mpsc::channel();
    let sent = driver
        .commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(Command::Shutdown(done_tx))
        .is_ok();
    if sent {
        let _ = done_rx.recv_timeout(BYE_DEADLINE + Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_timeout_is_seconds_from_one_to_a_year() {
        assert_eq!(parse_silence_limit(" 5 "), Ok(Duration::from_secs(5)));
        assert_eq!(parse_silence_limit("1.5"), Ok(Duration::from_millis(1500)));
        // "Never", as users write it: no panic, no overflow of a clock.
        for huge in ["1e20", "99999999999999999999", "inf", "1e10"] {
            assert_eq!(parse_silence_limit(huge), Ok(MAX_SILENCE_LIMIT), "{huge}");
        }
        for (bad, says) in [
            ("xyz", "is not a number of seconds"),
            ("nan", "is not a number of seconds"),
            ("", "is not a number of seconds"),
            ("0.2", "is too short"),
            ("0", "is too short"),
            ("-3", "is too short"),
            ("-inf", "is too short"),
        ] {
            let error = parse_silence_limit(bad).unwrap_err();
            assert!(
                error.starts_with(&format!("PARJOB_MPI_RANK_TIMEOUT={bad:?} {says}")),
                "{error}"
            );
            if says == "is too short" {
                assert!(error.ends_with("give 1 or more (seconds)"), "{error}");
            }
        }
    }

    #[test]
    fn a_pool_outside_a_launcher_says_how_to_start_this_very_program() {
        if crate::launched_by_mpi() {
            return; // (under mpirun, this binary's pool would start)
        }
        let Err(error) = MpiPool::new(2) else {
            panic!("a pool started without an MPI world");
        };
        let program = std::env::args().next().unwrap();
        let text = error.to_string();
        assert!(
            text.contains("this program was not started by an MPI launcher")
                && text.contains(&format!("`mpirun -n 3 {program} ...`"))
                && !text.contains("myprog"),
            "{text}"
        );
    }
}
