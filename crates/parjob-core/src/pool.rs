//! The backend-side contract: a [`Pool`] takes [`Job`]s (one batch each) and answers every one
//! with exactly one completion. The sequential pool lives here too.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use crate::Backend;
use crate::batch::ErasedBatch;
use crate::events::{Transport, WorkerChange};
use crate::worker::set_worker_identity;

/// What every batch of one run shares: the cancel flag and the per-task timeout.
#[derive(Debug)]
pub struct RunControl {
    /// Shared with the controls of tasks that carry a time limit of their own.
    cancelled: Arc<AtomicBool>,
    epoch: Instant,
    timeout: Option<Duration>,
    /// Whether the run ends at its first failure (`run` without retries): then a pool need
    /// not run the rest of a batch after one of its tasks failed ([`RunControl::task_failed`]).
    stops_at_first_failure: bool,
}

impl RunControl {
    pub(crate) fn new(timeout: Option<Duration>) -> Self {
        RunControl {
            cancelled: Arc::new(AtomicBool::new(false)),
            epoch: Instant::now(),
            timeout,
            stops_at_first_failure: false,
        }
    }

    /// Makes the run stop at its first failure (see [`task_failed`](RunControl::task_failed)).
    pub(crate) fn stop_at_first_failure(&mut self) {
        self.stops_at_first_failure = true;
    }

    /// The same run (cancel flag, clock) under another per-task limit: for a task with a
    /// limit of its own, so that a pool that enforces `timeout()` enforces that one.
    pub(crate) fn with_timeout(&self, timeout: Option<Duration>) -> Self {
        RunControl {
            cancelled: Arc::clone(&self.cancelled),
            epoch: self.epoch,
            timeout,
            stops_at_first_failure: self.stops_at_first_failure,
        }
    }

    /// Tells the run that a task of the batch failed (a panic, a crash, a timeout). When the
    /// run ends at its first failure (`Parallel::run` without retries, as joblib's `Parallel`
    /// does), the run is cancelled now and this returns `true`: the pool should complete the
    /// job without running its other tasks, so that the error reaches the caller at once
    /// instead of after the rest of the batch. Otherwise (`run_iter`, `run_results`, retries)
    /// it returns `false` and the batch goes on.
    pub fn task_failed(&self) -> bool {
        if self.stops_at_first_failure {
            self.cancel();
        }
        self.stops_at_first_failure
    }

    /// Whether the run was stopped: tasks not yet started should not start.
    #[inline]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// The per-task timeout, if the user set one.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    pub(crate) fn nanos_since_start(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

/// One batch to run, and where to report when it is done.
///
/// A pool reaches the batch only through [`batch`](Job::batch) and
/// [`batch_mut`](Job::batch_mut): it cannot take the batch out of its job, swap it for another,
/// or keep it once the job is completed. Every job is answered exactly once: by
/// [`complete`](Job::complete), by [`run_here`](Job::run_here), or, if the pool drops it, by
/// its own `Drop`, which completes it with every task left without an outcome reported as
/// [`Error::Cancelled`](crate::Error::Cancelled). That is what lets the dispatcher hand batches
/// a slice of the caller's output to write into: the slice cannot be written after the job
/// came back.
pub struct Job {
    /// `None` only once the job has been completed (then `Drop` has nothing left to do).
    batch: Option<Box<dyn ErasedBatch>>,
    control: Arc<RunControl>,
    seq: u64,
    started: Option<Arc<StartStamp>>,
    /// Called each time the job is marked started: a future's time limit starts then.
    on_start: Option<Arc<dyn Fn() + Send + Sync>>,
    reply: Option<Reply>,
    worker: Option<usize>,
    /// What a pool that runs batches elsewhere reported (boxed: in-process pools report
    /// nothing, and a job stays small).
    report: Option<Box<JobReport>>,
}

/// What a pool reported about a job besides its outcomes: the transport figures and the
/// changes to its workers.
#[derive(Debug, Default)]
pub(crate) struct JobReport {
    pub(crate) transport: Option<Transport>,
    pub(crate) changes: Vec<(Instant, WorkerChange)>,
}

/// Where a job's completion goes: the dispatcher's channel, or straight into a
/// [`Future`](crate::Future) (so that waiting on it is not tied to any one receiver).
pub(crate) enum Reply {
    Channel(Sender<Message>),
    Call(Box<dyn FnOnce(Completion) + Send + Sync>),
}

impl From<Sender<Message>> for Reply {
    fn from(sender: Sender<Message>) -> Self {
        Reply::Channel(sender)
    }
}

/// What a pool sends a run's dispatcher: a finished job, or news of a job still out.
pub(crate) enum Message {
    Done(Completion),
    /// What happened to the workers of job `seq` while it runs: said at once, so that the
    /// run's events do not wait for the rest of the batch ([`Job::note_now`]).
    Note {
        seq: u64,
        changes: Vec<(Instant, WorkerChange)>,
        crash: Option<crate::Error>,
    },
}

/// The start stamp of a job cancelled before it started: such a job must not run.
pub(crate) const CANCELLED_BEFORE_START: u64 = u64::MAX;

/// When a watched job started, and where: the stamp (nanos since its run began, plus one; 0
/// before it starts, [`CANCELLED_BEFORE_START`] once cancelled) that [`Job::mark_started`] and
/// [`Future::cancel`](crate::Future::cancel) race on, and the in-process worker that marked
/// it, which a timeout seen by the watcher names. Derefs to the stamp.
#[derive(Debug)]
pub(crate) struct StartStamp {
    at: AtomicU64,
    /// The worker's index, or `usize::MAX` for none (the calling thread, another process).
    worker: AtomicUsize,
}

impl StartStamp {
    pub(crate) fn new(at: u64) -> StartStamp {
        StartStamp {
            at: AtomicU64::new(at),
            worker: AtomicUsize::new(usize::MAX),
        }
    }

    /// The in-process worker (a thread of a pool) that started the job, if one did.
    pub(crate) fn worker(&self) -> Option<usize> {
        Some(self.worker.load(Ordering::Acquire)).filter(|&w| w != usize::MAX)
    }
}

impl std::ops::Deref for StartStamp {
    type Target = AtomicU64;

    fn deref(&self) -> &AtomicU64 {
        &self.at
    }
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("seq", &self.seq)
            .field("first_index", &self.batch.as_ref().map(|b| b.first_index()))
            .field("len", &self.batch.as_ref().map(|b| b.len()))
            .finish()
    }
}

/// A finished job as the dispatcher receives it.
pub(crate) struct Completion {
    pub(crate) seq: u64,
    pub(crate) batch: Box<dyn ErasedBatch>,
    pub(crate) busy: Duration,
    /// The worker that ran it, when the pool ran it with `run_here` on a worker that knows
    /// its index (for events and insights), or that said so with [`Job::ran_on`].
    pub(crate) worker: Option<usize>,
    /// What the pool reported with it ([`Job::add_transport`], [`Job::note_worker`]).
    pub(crate) report: Option<Box<JobReport>>,
}

impl Job {
    pub(crate) fn new(
        seq: u64,
        batch: Box<dyn ErasedBatch>,
        control: Arc<RunControl>,
        started: Option<Arc<StartStamp>>,
        reply: impl Into<Reply>,
    ) -> Self {
        Job {
            batch: Some(batch),
            control,
            seq,
            started,
            on_start: None,
            reply: Some(reply.into()),
            worker: None,
            report: None,
        }
    }

    /// Calls `hook` whenever the job is marked started ([`Job::mark_started`]).
    pub(crate) fn on_start(mut self, hook: Arc<dyn Fn() + Send + Sync>) -> Self {
        self.on_start = Some(hook);
        self
    }

    /// The batch: its tasks, and the outcomes gathered so far.
    pub fn batch(&self) -> &dyn ErasedBatch {
        self.batch
            .as_deref()
            .expect("a job holds its batch until it is completed, which consumes it")
    }

    /// The batch, to run it, encode it, or record outcomes. A `&mut dyn ErasedBatch` cannot be
    /// swapped for another batch or moved out of the job.
    pub fn batch_mut(&mut self) -> &mut dyn ErasedBatch {
        self.batch
            .as_deref_mut()
            .expect("a job holds its batch until it is completed, which consumes it")
    }

    /// The run this batch belongs to: its cancel flag and per-task timeout.
    pub fn control(&self) -> &RunControl {
        &self.control
    }

    /// Whether someone watches when the job starts: a [`Future`](crate::Future) that may
    /// still be cancelled before it starts, or a dispatcher timing it. A pool that could start
    /// a job early (sending it to a worker that is still busy, say) must not do so for such a
    /// job: it starts only when a worker is free for it.
    pub fn start_is_watched(&self) -> bool {
        self.started.is_some()
    }

    /// Notes that the batch has started running (for timeouts the dispatcher watches itself,
    /// and for [`Future::cancel`](crate::Future::cancel)).
    ///
    /// Returns `false` when the job was cancelled before it started: the pool must then not
    /// run it, only [`complete`](Job::complete) it. Starting and cancelling are decided by
    /// one atomic exchange, so exactly one of them wins.
    pub fn mark_started(&self) -> bool {
        let Some(started) = &self.started else {
            return true;
        };
        // Stored as nanos since the run began, plus one so that 0 means "not started".
        let stamp = self
            .control
            .nanos_since_start()
            .saturating_add(1)
            .min(CANCELLED_BEFORE_START - 1);
        // Which thread worker starts it (before the stamp, which publishes it): a timeout the
        // watcher sees names it. Nothing for a pool that starts jobs off its workers.
        if let (Some(worker), None) = crate::worker::panic_place() {
            started.worker.store(worker, Ordering::Release);
        }
        let mut current = started.load(Ordering::Acquire);
        loop {
            if current == CANCELLED_BEFORE_START {
                // `Future::cancel` sets the flag too, but only after winning the exchange:
                // setting it here as well means a pool that checks `is_cancelled` after this
                // call, on this thread, sees it even if `cancel` has not got there yet.
                self.control.cancel();
                return false;
            }
            match started.compare_exchange_weak(current, stamp, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if let Some(hook) = &self.on_start {
                        hook();
                    }
                    return true;
                }
                Err(now) => current = now,
            }
        }
    }

    /// Runs the whole batch on the current thread and reports it done: what an in-process
    /// backend does with a job. A job cancelled before it started is completed unrun.
    pub fn run_here(mut self) {
        if !self.mark_started() {
            self.complete(Duration::ZERO);
            return;
        }
        let began = Instant::now();
        self.worker = crate::worker::current_worker();
        let control = Arc::clone(&self.control);
        self.batch_mut().run_here(&control);
        self.complete(began.elapsed());
    }

    /// Says which of the pool's workers ran the batch (for events, insights and the trace's
    /// rows): for pools that do not use [`run_here`](Job::run_here).
    pub fn ran_on(&mut self, worker: usize) {
        self.worker = Some(worker);
    }

    /// Adds what moving (part of) the batch to another process and back cost to the batch's
    /// figures ([`Event::BatchCompleted`](crate::Event::BatchCompleted)'s `transport`, the
    /// insights' sum). For pools that run batches in other processes.
    pub fn add_transport(&mut self, transport: &Transport) {
        self.report
            .get_or_insert_default()
            .transport
            .get_or_insert_default()
            .add(transport);
    }

    /// Reports a change to one of the pool's worker processes (started, replaced, recycled),
    /// which happened at `when`: the run turns it into an [`Event`](crate::Event) when the job
    /// comes back.
    pub fn note_worker(&mut self, change: WorkerChange, when: Instant) {
        self.report
            .get_or_insert_default()
            .changes
            .push((when, change));
    }

    /// Reports a crash of the worker running this job (`crash`, an
    /// [`Error::WorkerCrashed`](crate::Error::WorkerCrashed) the pool also records as that
    /// task's outcome), and the changes to its workers [`note_worker`](Job::note_worker)
    /// gathered so far, to the run now rather than when the job completes: the run's
    /// `WorkerCrashed`, `WorkerReplaced` and other worker events then come as they happen,
    /// not after the rest of the batch. Where nobody listens at once (a job of a
    /// [`Future`](crate::Future)), they are kept for the completion as before.
    pub fn note_now(&mut self, crash: Option<&crate::Error>) {
        let Some(Reply::Channel(sender)) = &self.reply else {
            return;
        };
        let changes = self
            .report
            .as_mut()
            .map(|report| std::mem::take(&mut report.changes))
            .unwrap_or_default();
        let crash = crash
            .filter(|error| matches!(error, crate::Error::WorkerCrashed { .. }))
            .cloned();
        if changes.is_empty() && crash.is_none() {
            return;
        }
        let _ = sender.send(Message::Note {
            seq: self.seq,
            changes,
            crash,
        });
    }

    /// Completes the job without running it: every task without an outcome fails with
    /// `error` (e.g. a worker whose initializer failed).
    pub fn fail(mut self, error: &crate::Error) {
        let batch = self.batch_mut();
        while batch.outcomes_len() < batch.len() {
            batch.push_failure(error.clone());
        }
        self.complete(Duration::ZERO);
    }

    /// Whether completing this job runs a callback (a [`Future`](crate::Future)'s, and the
    /// user's done-callbacks with it) instead of handing the batch to a waiting run. A pool
    /// whose completing thread must stay responsive (the MPI backend's driver, which beats
    /// for every rank) completes such jobs on another thread.
    pub fn completes_by_callback(&self) -> bool {
        matches!(self.reply, Some(Reply::Call(_)))
    }

    /// Reports the job done, `busy` being how long its tasks ran (it steers auto batching).
    /// Tasks left without an outcome count as cancelled.
    pub fn complete(mut self, busy: Duration) {
        self.finish(busy);
    }

    fn finish(&mut self, busy: Duration) {
        let (Some(batch), Some(reply)) = (self.batch.take(), self.reply.take()) else {
            return;
        };
        let completion = Completion {
            seq: self.seq,
            batch,
            busy,
            worker: self.worker,
            report: self.report.take(),
        };
        match reply {
            // The dispatcher may be gone (a dropped `run_iter`); nobody wants the result then.
            Reply::Channel(sender) => {
                let _ = sender.send(Message::Done(completion));
            }
            Reply::Call(call) => call(completion),
        }
    }
}

impl Drop for Job {
    /// A job the pool let go of without completing it (a pool shutting down, a supervisor
    /// that panicked) completes itself: its tasks without an outcome are reported as
    /// cancelled, and nobody waits for it for ever.
    fn drop(&mut self) {
        self.finish(Duration::ZERO);
    }
}

/// A set of workers that runs jobs: what each backend provides, and the one extension point
/// for a backend of your own (`parjob::Parallel::with_pool`).
///
/// A pool should answer every submitted job with exactly one [`Job::complete`] (or
/// [`Job::run_here`]), even when the worker running it dies. Nothing a pool can do without
/// `unsafe` breaks memory safety: a job that is dropped completes itself (its tasks without an
/// outcome fail as [`Error::Cancelled`](crate::Error::Cancelled)), and a job can neither give
/// up its batch nor be completed twice. A pool that keeps a job for ever (or leaks it with
/// `mem::forget`) only makes the run wait for it for ever.
///
/// A pool that does not use `run_here` calls [`Job::mark_started`] before the job's first
/// task and, when it returns `false` (a `Future` cancelled first), completes the job without
/// running it.
///
/// ```
/// use std::sync::Arc;
/// use parjob::pool::{Job, Pool};
/// use parjob::{delayed, Parallel};
///
/// /// Runs every batch on a new thread.
/// struct ThreadPerBatch;
///
/// impl Pool for ThreadPerBatch {
///     fn workers(&self) -> usize { 4 }
///     fn submit(&self, job: Job) { std::thread::spawn(move || job.run_here()); }
///     fn verbose_name(&self) -> &'static str { "ThreadPerBatch" }
/// }
///
/// fn square(x: u64) -> u64 { x * x }
/// let parallel = Parallel::new(4).with_pool(Arc::new(ThreadPerBatch));
/// let out = parallel.run((0..100u64).map(|i| delayed(square, i)))?;
/// assert_eq!(out[9], 81);
/// # Ok::<(), parjob::Error>(())
/// ```
pub trait Pool: Send + Sync {
    /// How many jobs run at once.
    fn workers(&self) -> usize;
    /// Queues `job` to run as soon as a worker is free.
    fn submit(&self, job: Job);
    /// How long auto batching should aim for one batch to run: long enough to hide the cost
    /// of dispatching it, short enough to balance the load.
    fn target_batch_duration(&self) -> Duration {
        Duration::from_millis(2)
    }
    /// The most bytes of tasks an auto-sized batch should hold, if the pool wants batches
    /// small enough to stay in the cache: a batch of tiny tasks is written by the calling
    /// thread and read by a worker right after, and one that fits in the cache costs neither
    /// of them a trip to memory. `None` (the default): no such bound.
    fn max_batch_bytes(&self) -> Option<usize> {
        None
    }
    /// Whether the pool enforces `RunControl::timeout` itself, killing the task; otherwise
    /// the dispatcher watches the time and reports the task as timed out while it finishes
    /// in the background.
    fn enforces_timeout(&self) -> bool {
        false
    }
    /// Whether [`submit`](Pool::submit) runs the job on the calling thread before it returns
    /// (the sequential pool): then an executor must not hold a lock across `submit`, and a
    /// daemon task would block its caller.
    fn runs_on_calling_thread(&self) -> bool {
        false
    }
    /// How long the dispatcher polls for a finished job before it blocks on the next one:
    /// worth a few microseconds where jobs finish that close together (threads), zero (the
    /// default) where a round trip takes longer anyway. At most 1 ms is used.
    fn completion_spin(&self) -> Duration {
        Duration::ZERO
    }
    /// How many batches the dispatcher keeps ahead of the results unless the user sets
    /// `pre_dispatch`: twice the number of workers, so that a worker finds its next batch
    /// queued when it finishes one.
    fn default_pre_dispatch(&self) -> usize {
        2 * self.workers()
    }
    /// The name joblib-style verbose lines give it, e.g. `ThreadingBackend`.
    fn verbose_name(&self) -> &'static str;
    /// Whether the calling thread is one of this pool's own workers. A run started there
    /// waits for batches only this pool's workers run, and once every worker waits so, none
    /// is left to run them: `Parallel` then runs that run on the calling thread instead, as
    /// the sequential backend does. `false` (the default) for pools whose workers are not
    /// threads of this process.
    fn serves_current_thread(&self) -> bool {
        false
    }
}

/// Runs each job on the calling thread as it is submitted.
#[derive(Debug, Default)]
pub struct SequentialPool;

impl Pool for SequentialPool {
    fn workers(&self) -> usize {
        1
    }

    fn submit(&self, job: Job) {
        let previous = set_worker_identity(Some((Backend::Sequential, 0)));
        job.run_here();
        set_worker_identity(previous);
    }

    fn runs_on_calling_thread(&self) -> bool {
        true
    }

    fn default_pre_dispatch(&self) -> usize {
        // A batch runs when it is submitted: one ahead is already ahead of the consumer.
        1
    }

    fn verbose_name(&self) -> &'static str {
        "SequentialBackend"
    }
}
