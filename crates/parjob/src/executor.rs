//! [`Executor`]: Python's `concurrent.futures` executors on every parjob backend.
//!
//! An executor is a thin layer over a [`Parallel`]: the same `n_jobs` rules, backends,
//! environment defaults and pool, and `map` is `Parallel::run_iter`. What it adds is
//! submitting one task at a time (`parjob_core::submit`) and keeping track of what it
//! submitted so that shutting down can wait for it or cancel it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use parjob_core::{Backend, BatchSize, Error, Future, FutureHandle, Job, Pool, RunIter, Task};

use crate::Parallel;

/// How [`Executor::shutdown`] treats tasks that were submitted and are not done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shutdown {
    /// Let every submitted task run, and wait for them all (`shutdown(wait=True)`; also what
    /// dropping a non-daemon executor does, like leaving a `with` block).
    Wait,
    /// Cancel the tasks that have not started, and wait for the running ones
    /// (`shutdown(wait=True, cancel_futures=True)`).
    CancelPending,
}

/// Runs tasks submitted one at a time and hands back a [`Future`] for each: Python's
/// `ThreadPoolExecutor` / `ProcessPoolExecutor`, on any [`Backend`].
///
/// `n_jobs`, [`backend`](Executor::backend) and `PARJOB_BACKEND` / `PARJOB_N_JOBS` work as
/// for [`Parallel`], whose pool machinery the executor shares. The workers start with the
/// first task, and the environment is read then. On the sequential backend,
/// [`submit`](Executor::submit) runs the task before it returns, except on a
/// [`daemon`](Executor::daemon) executor (see there).
///
/// Dropping an executor is [`shutdown(Shutdown::Wait)`](Executor::shutdown), like leaving a
/// Python `with` block, unless it is a [`daemon`](Executor::daemon).
///
/// An executor always keeps going, as `concurrent.futures` does: a failed task fails only
/// its own [`Future`] or its own item of [`map`](Executor::map), never the others (for
/// fail-fast, use [`Parallel::run`]). [`retries`](Executor::retries) re-runs the crashed or
/// timed-out tasks of a `map`.
///
/// ```
/// use parjob::{delayed, Backend, Executor};
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let executor = Executor::new(2).backend(Backend::Threading);
/// let nine = executor.submit(delayed(square, 3));
/// let four = executor.submit(delayed(square, 2));
/// assert_eq!(nine.result()? + four.result()?, 13);
/// let squares: Result<Vec<u64>, _> = executor.map((0..5u64).map(|i| delayed(square, i))).collect();
/// assert_eq!(squares?, [0, 1, 4, 9, 16]);
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug)]
pub struct Executor {
    parallel: Parallel,
    daemon: bool,
    next_index: AtomicUsize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    shut_down: bool,
    /// The pool, looked up once: resolving the configuration reads the environment and the
    /// cgroup CPU quota, far more than submitting a task costs.
    pool: Option<Arc<dyn Pool>>,
    /// Futures submitted and maybe not done; done ones are pruned from time to time.
    submitted: Vec<FutureHandle>,
    /// Prune `submitted` when it grows to this length.
    prune_at: usize,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("shut_down", &self.shut_down)
            .field("pool_started", &self.pool.is_some())
            .field("submitted", &self.submitted.len())
            .finish()
    }
}

impl Default for Executor {
    /// `n_jobs` from `PARJOB_N_JOBS`, or `-1` (all CPUs) when it is not set.
    fn default() -> Self {
        Executor::from_parallel(Parallel::default())
    }
}

impl Executor {
    /// An executor with `n_jobs` workers, by joblib's rules (see [`Parallel::new`]). Never
    /// panics: an invalid `n_jobs` is reported by the futures of the first tasks.
    pub fn new(n_jobs: impl Into<crate::NJobs>) -> Executor {
        Executor::from_parallel(Parallel::new(n_jobs))
    }

    /// An executor on `parallel`'s configuration and pool: e.g. a `Parallel` set up with
    /// [`Parallel::with_pool`] to submit tasks to a backend of your own.
    pub fn from_parallel(parallel: Parallel) -> Executor {
        Executor {
            parallel,
            daemon: false,
            next_index: AtomicUsize::new(0),
            state: Mutex::new(State {
                prune_at: 64,
                ..State::default()
            }),
        }
    }

    /// The `Parallel` for a builder method to reconfigure (`Executor` implements `Drop`, so its
    /// fields cannot be moved out).
    fn take_parallel(&mut self) -> Parallel {
        std::mem::replace(&mut self.parallel, Parallel::new(1))
    }

    /// Where the tasks run. Without this call, `PARJOB_BACKEND` decides, and without that,
    /// [`Backend::Threading`].
    pub fn backend(mut self, backend: Backend) -> Executor {
        self.parallel = self.take_parallel().backend(backend);
        self
    }

    /// Makes the workers daemon-like: dropping the executor does not wait for running tasks
    /// (they stop when the program ends; with the process backend, the workers are killed).
    /// [`shutdown`](Executor::shutdown) still waits when called explicitly.
    ///
    /// On the sequential backend (and a custom pool that runs jobs on the calling thread), a
    /// daemon executor runs its tasks one after another on one background thread of its own,
    /// named `parjob-daemon`, so that `submit` returns at once: daemon work is typically a
    /// loop that never ends, which `submit` would otherwise run inline, for ever.
    pub fn daemon(mut self, daemon: bool) -> Executor {
        self.daemon = daemon;
        self
    }

    /// How many batches [`map`](Executor::map) dispatches ahead of the results (default:
    /// twice the number of workers).
    pub fn pre_dispatch(mut self, batches: usize) -> Executor {
        self.parallel = self.take_parallel().pre_dispatch(batches);
        self
    }

    /// How [`map`](Executor::map) groups tasks into batches (Python's `chunksize`); the
    /// default adapts to measured task durations. [`submit`](Executor::submit) always sends
    /// one task on its own.
    pub fn batch_size(mut self, batch_size: BatchSize) -> Executor {
        self.parallel = self.take_parallel().batch_size(batch_size);
        self
    }

    /// Process backend: run workers from this executable (see [`Parallel::worker_exe`]).
    pub fn worker_exe(mut self, path: impl Into<std::path::PathBuf>) -> Executor {
        self.parallel = self.take_parallel().worker_exe(path);
        self
    }

    /// Runs `f` once on every worker before its first task, on every backend (see
    /// [`Parallel::initializer`]; Python's `initializer=`).
    pub fn initializer(mut self, f: fn()) -> Executor {
        self.parallel = self.take_parallel().initializer(f);
        self
    }

    /// Runs `f(args.clone())` once on every worker (see [`Parallel::initializer_with`];
    /// Python's `initializer=` with `initargs=`).
    pub fn initializer_with<A>(mut self, f: fn(A), args: A) -> Executor
    where
        A: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.parallel = self.take_parallel().initializer_with(f, args);
        self
    }

    /// Process backend: replace a worker after `n` tasks (see
    /// [`Parallel::max_tasks_per_worker`]; Python's `max_tasks_per_child`).
    pub fn max_tasks_per_worker(mut self, n: usize) -> Executor {
        self.parallel = self.take_parallel().max_tasks_per_worker(n);
        self
    }

    /// The backend tasks run on (see [`Parallel::effective_backend`]).
    ///
    /// # Errors
    /// An unknown name in `PARJOB_BACKEND`.
    pub fn effective_backend(&self) -> Result<Backend, Error> {
        self.parallel.effective_backend()
    }

    /// How many workers run tasks (see [`Parallel::effective_n_jobs`]).
    ///
    /// # Errors
    /// An invalid `n_jobs`.
    pub fn effective_n_jobs(&self) -> Result<usize, Error> {
        self.parallel.effective_n_jobs()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A poisoned lock only means a thread panicked while holding it; the state is a flag
        // and a list, valid at every point.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues `task` and returns its [`Future`] at once (on the sequential backend, after
    /// running it). Tasks are numbered in submission order from 0; errors name them so.
    ///
    /// A submit that cannot happen returns a future that is already done with the error:
    /// [`Error::ExecutorShutdown`] after [`shutdown`](Executor::shutdown), or an invalid
    /// configuration (`n_jobs` of 0, an unknown `PARJOB_BACKEND`, a backend not built in).
    ///
    /// The task's time limit, its own ([`Delayed::timeout`](crate::Delayed::timeout)) or the
    /// executor's ([`Parallel::timeout`], through [`from_parallel`](Executor::from_parallel)),
    /// holds as in a run: the future fails with [`Error::Timeout`] at the limit. The process
    /// and MPI backends kill the worker running it; on threads the task cannot be stopped and
    /// runs on to its end in the background (dropping the executor does not wait for it, its
    /// future being done); on the sequential backend it is timed when it returns. A limit
    /// past what [`Instant`](std::time::Instant) can hold, such as `Duration::MAX`, never
    /// comes.
    pub fn submit<T: Task>(&self, task: T) -> Future<T::Output> {
        let index = self.next_index.fetch_add(1, Ordering::Relaxed);
        self.submit_numbered(index, task)
    }

    /// [`submit`](Executor::submit) with the number errors name the task by.
    fn submit_numbered<T: Task>(&self, index: usize, task: T) -> Future<T::Output> {
        // The lock is held while submitting so that a concurrent shutdown sees every future
        // submitted before it.
        let mut state = self.lock();
        if state.shut_down {
            return Future::failed(index, Error::ExecutorShutdown);
        }
        let pool = match &state.pool {
            Some(pool) => Arc::clone(pool),
            None => match self.parallel.pool() {
                Ok(pool) if self.daemon && pool.runs_on_calling_thread() => {
                    let background: Arc<dyn Pool> = Arc::new(OnBackgroundThread::new(pool));
                    Arc::clone(state.pool.insert(background))
                }
                Ok(pool) => Arc::clone(state.pool.insert(pool)),
                Err(error) => return Future::failed(index, error),
            },
        };
        if state.submitted.len() >= state.prune_at {
            state.submitted.retain(|f| !f.is_done());
            state.prune_at = (2 * state.submitted.len()).max(64);
        }
        // The sequential pool runs the task inside `submit`: keep the lock out of the task,
        // which may itself submit to this executor.
        // The executor's `Parallel::timeout` limits a task without a limit of its own.
        let timeout = self.parallel.options.timeout;
        if pool.runs_on_calling_thread() {
            drop(state);
            return parjob_core::submit_timed(&*pool, index, task, timeout);
        }
        let future = parjob_core::submit_timed(&*pool, index, task, timeout);
        state.submitted.push(future.handle());
        future
    }

    /// Retries a task of [`map`](Executor::map) whose worker crashed or that timed out, up to
    /// `retries` more times: [`Parallel::retries`] for the executor's maps. See
    /// [`retry`](Executor::retry).
    pub fn retries(self, retries: u32) -> Executor {
        self.retry(crate::Retry::new(retries))
    }

    /// How [`map`](Executor::map) retries failed tasks ([`Parallel::retry`]): a task that
    /// succeeds on a retry yields its value in its place, one that fails every time yields
    /// [`Error::RetriesExhausted`] listing every attempt, and the map goes on either way.
    ///
    /// A [`submit`](Executor::submit)ted task is not retried: its [`Future`] holds the
    /// outcome of its one run, as in `concurrent.futures`; submit it again to retry it.
    pub fn retry(mut self, retry: crate::Retry) -> Executor {
        self.parallel = self.take_parallel().retry(retry);
        self
    }

    /// Runs `tasks` and yields their results in input order, each as soon as it and those
    /// before it are done: Python's `Executor.map`, but lazy, pulling at most
    /// [`pre_dispatch`](Executor::pre_dispatch) batches ahead of the consumer. This is
    /// [`Parallel::run_iter`] on the executor's pool. Dropping the iterator stops the run.
    ///
    /// After [`shutdown`](Executor::shutdown), yields [`Error::ExecutorShutdown`] as its only
    /// item. For a time limit on the whole map, see [`map_timeout`](Executor::map_timeout).
    pub fn map<I, T>(&self, tasks: I) -> RunIter<I::IntoIter, T>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        if self.lock().shut_down {
            return RunIter::failed(Error::ExecutorShutdown);
        }
        self.parallel.run_iter(tasks)
    }

    /// [`map`](Executor::map) with Python's `Executor.map(..., timeout=...)`: the results in
    /// input order, but when the next one is not there `timeout` after this call, the
    /// iterator yields [`Error::WaitTimedOut`] for that task and ends. The tasks of the map
    /// that have not started are then cancelled; those running go on to their end, as in
    /// Python.
    ///
    /// Each task is submitted on its own, as by [`submit`](Executor::submit), and numbered by
    /// its position in `tasks` (errors name it so); at most twice `n_jobs` are submitted ahead
    /// of the consumer, so `tasks` may be endless. A failed task yields its `Err` and the map
    /// goes on. Dropping the iterator cancels the tasks that have not started.
    ///
    /// ```
    /// use std::time::Duration;
    /// use parjob::{delayed, Backend, Error, Executor};
    ///
    /// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    ///
    /// // A daemon executor: dropping it does not wait for the minute-long nap.
    /// let executor = Executor::new(2).backend(Backend::Threading).daemon(true);
    /// let tasks = [60_000, 1].map(|ms| delayed(nap, ms));
    /// let mut results = executor.map_timeout(tasks, Duration::from_millis(100));
    /// // Task 0 is not done 100 ms after the call: the map ends there.
    /// assert!(matches!(results.next(), Some(Err(Error::WaitTimedOut { index: 0, .. }))));
    /// assert_eq!(results.next(), None);
    ///
    /// let quick = Executor::new(2).backend(Backend::Threading);
    /// let naps = quick.map_timeout((0..4u64).map(|ms| delayed(nap, ms)), Duration::from_secs(60));
    /// assert_eq!(naps.collect::<Result<Vec<_>, _>>()?, [0, 1, 2, 3]);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn map_timeout<I, T>(&self, tasks: I, timeout: Duration) -> MapTimeout<'_, I::IntoIter, T>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        let window = self
            .effective_n_jobs()
            .unwrap_or(1)
            .saturating_mul(2)
            .max(2);
        MapTimeout {
            executor: self,
            tasks: tasks.into_iter(),
            next_index: 0,
            in_flight: VecDeque::new(),
            window,
            timeout,
            deadline: Instant::now().checked_add(timeout),
            ended: false,
        }
    }

    /// Stops taking tasks, waits as `how` says, then releases the workers. Later
    /// [`submit`](Executor::submit)s and [`map`](Executor::map)s fail with
    /// [`Error::ExecutorShutdown`]. Calling it again does nothing more.
    ///
    /// It returns once every task submitted before it is done (or cancelled), so tasks that
    /// never end make it wait forever: use a [`daemon`](Executor::daemon) executor for those.
    /// For the same reason, a task must not shut down (or drop) the executor it runs on.
    pub fn shutdown(&self, how: Shutdown) {
        let submitted = {
            let mut state = self.lock();
            state.shut_down = true;
            state.pool = None;
            std::mem::take(&mut state.submitted)
        };
        if how == Shutdown::CancelPending {
            for future in &submitted {
                future.cancel();
            }
        }
        for future in &submitted {
            future.wait();
        }
        self.parallel.release_pool();
    }

    /// Whether [`shutdown`](Executor::shutdown) was called.
    pub fn is_shut_down(&self) -> bool {
        self.lock().shut_down
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if self.daemon {
            self.lock().shut_down = true;
        } else {
            self.shutdown(Shutdown::Wait);
        }
    }
}

/// The iterator [`Executor::map_timeout`] returns: each task's result in input order, until
/// the time limit passes.
pub struct MapTimeout<'a, I, T: Task> {
    executor: &'a Executor,
    tasks: I,
    next_index: usize,
    /// Submitted and not yet yielded, in input order.
    in_flight: VecDeque<Future<T::Output>>,
    window: usize,
    timeout: Duration,
    /// `None` when `timeout` reaches beyond what `Instant` can hold: no limit.
    deadline: Option<Instant>,
    ended: bool,
}

impl<I: Iterator<Item = T>, T: Task> Iterator for MapTimeout<'_, I, T> {
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.ended {
            return None;
        }
        while self.in_flight.len() < self.window {
            let Some(task) = self.tasks.next() else {
                break;
            };
            let future = self.executor.submit_numbered(self.next_index, task);
            self.next_index += 1;
            self.in_flight.push_back(future);
        }
        let mut future = self.in_flight.pop_front()?;
        let outcome = match self.deadline {
            None => future.result(),
            Some(deadline) => {
                let left = deadline.saturating_duration_since(Instant::now());
                match future.result_timeout(left) {
                    Err(Error::WaitTimedOut { index, .. }) => {
                        self.end();
                        Err(Error::wait_timed_out(index, self.timeout))
                    }
                    outcome => outcome,
                }
            }
        };
        if matches!(outcome, Err(Error::ExecutorShutdown)) {
            self.end();
        }
        Some(outcome)
    }
}

impl<I, T: Task> MapTimeout<'_, I, T> {
    /// Yields nothing more and cancels what has not started.
    fn end(&mut self) {
        self.ended = true;
        for future in self.in_flight.drain(..) {
            future.cancel();
        }
    }
}

impl<I, T: Task> Drop for MapTimeout<'_, I, T> {
    fn drop(&mut self) {
        self.end();
    }
}

impl<I, T: Task> std::fmt::Debug for MapTimeout<'_, I, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapTimeout")
            .field("submitted", &self.next_index)
            .field("in_flight", &self.in_flight.len())
            .field("timeout", &self.timeout)
            .field("ended", &self.ended)
            .finish()
    }
}

/// A daemon executor's pool when its backend runs jobs on the calling thread: it hands every
/// job to one background thread, started with the first, which submits it there. Jobs run in
/// submission order, one at a time, as they would on the calling thread.
struct OnBackgroundThread {
    inner: Arc<dyn Pool>,
    /// The background thread's queue; `None` before the first job, or if it could not start.
    jobs: Mutex<Option<Sender<Job>>>,
}

impl OnBackgroundThread {
    fn new(inner: Arc<dyn Pool>) -> Self {
        OnBackgroundThread {
            inner,
            jobs: Mutex::new(None),
        }
    }
}

impl Pool for OnBackgroundThread {
    fn workers(&self) -> usize {
        1
    }

    fn submit(&self, job: Job) {
        // The lock only guards the sender: no task runs under it.
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        if jobs.is_none() {
            let (sender, receiver) = mpsc::channel::<Job>();
            let inner = Arc::clone(&self.inner);
            let started = std::thread::Builder::new()
                .name("parjob-daemon".into())
                .spawn(move || {
                    for job in receiver {
                        inner.submit(job);
                    }
                });
            if started.is_ok() {
                *jobs = Some(sender);
            }
        }
        // Without a thread the job is dropped here, which completes it as cancelled: a daemon
        // task must not run inline and block its caller for ever.
        if let Some(sender) = jobs.as_ref() {
            let _ = sender.send(job);
        }
    }

    fn default_pre_dispatch(&self) -> usize {
        1
    }

    fn verbose_name(&self) -> &'static str {
        self.inner.verbose_name()
    }
}
