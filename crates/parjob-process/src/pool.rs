//! [`ProcessPool`]: one supervisor thread per worker process, taking jobs from a shared queue.

use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parjob_core::{Error, Job, Pool, ProcessOptions};

use crate::mapping::guard_against_cuts;
use crate::queue::Queue;
use crate::registry::{self, SegmentListener};
use crate::spawn::{Event, Settings};
use crate::supervisor::Supervisor;
use crate::wire::EXIT_NO_INIT;
use crate::worker::{in_worker_loop, is_drivers_worker, started_as_worker};

/// A pool of worker processes running parjob jobs.
///
/// Made by `Parallel` for [`Backend::Process`](parjob_core::Backend::Process); use it directly
/// only to drive `parjob_core::run` yourself. Dropping it shuts the workers down (idle ones
/// exit with status 0, busy ones are killed) and reaps them before `drop` returns.
pub struct ProcessPool {
    queue: Arc<Queue>,
    /// Each supervisor's event sender, to wake a busy one when the pool closes.
    wakers: Vec<Sender<Event>>,
    supervisors: Vec<JoinHandle<()>>,
    workers: usize,
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl ProcessPool {
    /// Starts `workers` worker processes and waits until one has finished its handshake (with
    /// an initializer: until each has finished its handshake and initializer). The others go
    /// on starting while the pool runs its first jobs; a slot whose start fails then starts
    /// a worker for the first job it takes, whose tasks get the start's error if that fails
    /// too.
    ///
    /// # Errors
    /// [`Error::Worker`] if a worker cannot be started (the first to report, or any that
    /// reports before it), is another build of the program, or fails its initializer; [`Error::InvalidConfig`] if the initializer is not a function of
    /// this program's executable (e.g. it lives in a dylib), which a worker could not find;
    ///
    /// # Exits
    /// In a process its driver started as a worker that did not enter the worker loop
    /// (`parjob::init()` missing, so it ran `main` from the top): it says so on stderr, naming
    /// itself and its driver, and exits with status 79 at once (see
    /// [`leave_if_a_worker_without_init`]), rather than hand the program an error that it would
    /// print as its own and then go on repeating its side effects in every worker copy. The
    /// driver reports the missing `init()` too. A process started with a worker's line and
    /// variables but not by its driver (a program a `worker_exe` wrapper runs before `exec`ing
    /// the worker) exits with status 1 here instead: it must not start workers of its own with
    /// the driver's line as its input.
    pub fn new(workers: usize, options: ProcessOptions) -> Result<ProcessPool, Error> {
        leave_if_a_worker_without_init();
        if started_as_worker() && !in_worker_loop() {
            say_whole_line(&format!(
                "parjob (pid {}): this program was started with a parjob worker's line and \
                 variables but not by the driver they name (a program a worker_exe wrapper runs \
                 before it `exec`s the worker?), and it reached the process backend: it exits \
                 now (status 1) rather than start workers of its own",
                std::process::id()
            ));
            std::process::exit(1);
        }
        let settings = Arc::new(Settings::new(options)?);
        // A task can cut short the shared memory this process maps (the status boards, the
        // arenas, `SharedSlice` segments): survive it rather than die of SIGBUS.
        guard_against_cuts();
        let workers = workers.max(1);
        let queue = Arc::new(Queue::default());
        let listener: Weak<dyn SegmentListener> = Arc::downgrade(&queue) as _;
        registry::register(listener);
        let (started_tx, started_rx) = mpsc::channel();
        let mut pool = ProcessPool {
            queue: Arc::clone(&queue),
            wakers: Vec::with_capacity(workers),
            supervisors: Vec::with_capacity(workers),
            workers,
        };
        let mut first_error = None;
        for index in 0..workers {
            let (events_tx, events) = mpsc::channel();
            pool.wakers.push(events_tx.clone());
            let mut supervisor = Supervisor::new(
                index,
                workers,
                Arc::clone(&settings),
                Arc::clone(&queue),
                (events_tx, events),
            );
            let started_tx = started_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("parjob-supervisor-{index}"))
                .spawn(move || {
                    let started = supervisor.start_worker();
                    let _ = started_tx.send(started);
                    drop(started_tx);
                    // Even after a failed start: if the pool went on without this worker (see
                    // below), the slot starts one for the first job it takes, which gets the
                    // start's error if that fails again; if the pool failed, it is closing.
                    supervisor.run();
                });
            match spawned {
                Ok(handle) => pool.supervisors.push(handle),
                Err(e) => {
                    first_error = Some(Error::worker(
                        index,
                        format!("cannot start its supervisor thread: {e}"),
                    ));
                    break;
                }
            }
        }
        drop(started_tx);
        // Without an initializer, the pool is ready as soon as one worker is (and no start
        // failed before it): the others finish starting while it takes the first jobs, so a
        // fresh pool's first result does not wait for its slowest start. An initializer's
        // failure (user code) is reported here, so with one every start is awaited.
        let first_is_enough = settings.initializer.is_none();
        // Each supervisor reports once (and keeps its sender): read at most that many.
        for _ in 0..pool.supervisors.len() {
            match started_rx.recv() {
                Ok(Ok(())) if first_is_enough && first_error.is_none() => break,
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        match first_error {
            Some(error) => Err(error), // dropping `pool` stops the workers that did start
            None => Ok(pool),
        }
    }
}

impl Drop for ProcessPool {
    fn drop(&mut self) {
        self.queue.close();
        for waker in &self.wakers {
            let _ = waker.send(Event::Close);
        }
        for handle in self.supervisors.drain(..) {
            let _ = handle.join();
        }
        // Jobs nobody took: complete them with no outcomes (their tasks count as cancelled).
        for job in self.queue.drain() {
            job.complete(Duration::ZERO);
        }
    }
}

impl Pool for ProcessPool {
    fn workers(&self) -> usize {
        self.workers
    }

    fn submit(&self, job: Job) {
        self.queue.push(job);
    }

    fn target_batch_duration(&self) -> Duration {
        // A frame's round trip costs 10-60 us plus encoding; 5 ms batches hide it while a run
        // still ends within about one batch of the ideal.
        Duration::from_millis(5)
    }

    fn enforces_timeout(&self) -> bool {
        true
    }

    fn verbose_name(&self) -> &'static str {
        "ProcessBackend"
    }
}

/// In a process its driver started as a worker that did not enter the worker loop
/// (`parjob::init()` missing, so it ran `main` from the top), ends it: says so on stderr, naming
/// it and its driver, and exits with status 79 (which tells the driver). `Parallel` calls this
/// before every run's pool, whatever the backend: a worker is started with
/// `PARJOB_BACKEND=sequential` and without the program's arguments, so a program that takes
/// its backend from either would otherwise run every task of `main` in each worker copy, to the
/// end. Returns at once anywhere else: in a worker's tasks (they run inside the loop), and in a
/// process that has a worker's line and variables but is not its driver's child (a program a
/// `worker_exe` wrapper runs before `exec`ing the worker, which may use threads as it likes).
pub fn leave_if_a_worker_without_init() {
    if !is_drivers_worker() || in_worker_loop() {
        return;
    }
    // One write, whole: the other copies may be saying the same at the same moment.
    say_whole_line(&format!(
        "parjob worker (pid {}, started by pid {} to run tasks): this copy of the program \
         reached a parallel run without calling parjob::init(), so it ran main from the top \
         instead of waiting for tasks; call parjob::init() first thing in main. This copy \
         exits now (status {EXIT_NO_INIT}).",
        std::process::id(),
        std::os::unix::process::parent_id()
    ));
    std::process::exit(EXIT_NO_INIT)
}

/// Writes `line` and a newline to stderr in one `write`: `eprintln!` writes each piece of its
/// format apart, so lines that several processes print at once (worker copies, MPI ranks)
/// come out torn into each other.
pub fn say_whole_line(line: &str) {
    use std::io::Write;
    let whole = format!("{line}\n");
    let _ = std::io::stderr().write_all(whole.as_bytes());
}
