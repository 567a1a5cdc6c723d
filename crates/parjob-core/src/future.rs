//! Futures: one task submitted on its own as a one-task [`Job`], and waiting on many such
//! tasks at once (`concurrent.futures` for parjob).
//!
//! - [`submit`] sends a task to any [`Pool`] and returns its [`Future`].
//! - [`as_completed`] yields futures as they finish; [`wait`] returns when an [`Until`]
//!   condition holds.
//!
//! A job reports its completion straight into its future's shared state (not through a
//! channel owned by whoever submitted it), and that state wakes every waiter registered on it.
//! So futures from different executors, and from different backends, can be waited on
//! together.
//!
//! Cancelling and starting race on the job's start stamp: [`Job::mark_started`] and
//! [`Future::cancel`] each try one atomic exchange on it from "not started", and exactly one
//! wins. A cancelled future is done at once; its job is later completed unrun by the pool.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::batch::TypedBatch;
use crate::pool::{CANCELLED_BEFORE_START, Completion, Job, Pool, Reply, RunControl, StartStamp};
use crate::{Error, Task};

/// The outcome of one task submitted on its own, available once the task is done:
/// `concurrent.futures.Future` for parjob. Made by `parjob::Executor::submit` (an executor
/// runs on a pool of your own too: `Executor::from_parallel(Parallel::new(n).with_pool(pool))`).
///
/// Wait for it with [`result`](Future::result), [`result_timeout`](Future::result_timeout),
/// [`wait`](Future::wait), [`as_completed`] or [`wait`](crate::wait); look without blocking
/// with [`try_result`](Future::try_result) and [`is_done`](Future::is_done); take back a task
/// that has not started with [`cancel`](Future::cancel).
///
/// The value is moved out once: after [`try_result`](Future::try_result) or
/// [`result_timeout`](Future::result_timeout) returned the outcome, asking again gives
/// [`Error::ResultTaken`]. [`error`](Future::error) can be asked any number of times.
///
/// Waiting for a future from inside a task of the same pool can deadlock when every worker
/// waits, as in Python.
///
/// ```
/// use parjob::{delayed, Backend, Executor};
///
/// fn half(x: u32) -> u32 { assert!(x % 2 == 0, "{x} is odd"); x / 2 }
///
/// let executor = Executor::new(2).backend(Backend::Threading);
/// let even = executor.submit(delayed(half, 8)); // task 0
/// let odd = executor.submit(delayed(half, 7)); // task 1
/// assert_eq!(even.result(), Ok(4));
/// let error = odd.error().expect("7 is odd, so task 1 failed");
/// assert!(error.to_string().starts_with("task 1 panicked: 7 is odd"));
/// ```
///
/// [`result`](Future::result) takes the future, so the value cannot be asked for twice:
///
/// ```compile_fail
/// use parjob::{delayed, Executor};
/// fn half(x: u32) -> u32 { x / 2 }
/// let executor = Executor::new(2);
/// let future = executor.submit(delayed(half, 8));
/// let value = future.result();
/// let again = future.result(); // error: use of moved value `future`
/// ```
pub struct Future<R> {
    shared: Arc<Shared<R>>,
}

/// What a future and the job that completes it share.
struct Shared<R> {
    index: usize,
    slot: Mutex<Slot<R>>,
    done: Condvar,
    /// The job's start stamp: 0 before it starts, [`CANCELLED_BEFORE_START`] once cancelled.
    started: Arc<StartStamp>,
    control: Arc<RunControl>,
}

enum Slot<R> {
    /// Not done; whom to tell when it is.
    Pending(Watchers),
    Done(Result<R, Error>),
    /// The outcome was moved out; a failure is kept for [`Future::error`].
    Taken(Option<Error>),
}

/// Whom a future that is not done tells when it is.
#[derive(Default)]
struct Watchers {
    waiters: Vec<Waiter>,
    /// [`Future::add_done_callback`]s, in the order added, each holding a weak handle on the
    /// future's state.
    callbacks: Vec<Box<dyn FnOnce() + Send>>,
}

/// An [`as_completed`] or [`wait`] call waiting on this future as its number `id`.
struct Waiter {
    notifier: Weak<Notifier>,
    id: usize,
}

impl<R> Shared<R> {
    fn lock(&self) -> MutexGuard<'_, Slot<R>> {
        // A poisoned lock only means a thread panicked while holding it; no code that runs
        // under it leaves the slot half-updated.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sets the outcome unless one is set already (a cancelled future ignores its job's late
    /// completion). Wakes every waiter, then runs the done callbacks, outside the lock.
    fn resolve(&self, outcome: Result<R, Error>) {
        for callback in self.settle(outcome) {
            run_callback(callback);
        }
    }

    /// Records `outcome` (nothing if the future is done already) and wakes its waiters;
    /// returns its done-callbacks, for the caller to run.
    fn settle(&self, outcome: Result<R, Error>) -> Vec<Box<dyn FnOnce() + Send>> {
        let mut slot = self.lock();
        let Slot::Pending(watchers) = &mut *slot else {
            return Vec::new();
        };
        let Watchers { waiters, callbacks } = std::mem::take(watchers);
        *slot = Slot::Done(outcome);
        drop(slot);
        self.done.notify_all();
        for waiter in waiters {
            if let Some(notifier) = waiter.notifier.upgrade() {
                notifier.ready(waiter.id);
            }
        }
        callbacks
    }

    fn is_done(&self) -> bool {
        !matches!(*self.lock(), Slot::Pending(_))
    }

    fn wait_done(&self, deadline: Option<Instant>) -> MutexGuard<'_, Slot<R>> {
        let mut slot = self.lock();
        while matches!(*slot, Slot::Pending(_)) {
            match deadline {
                None => slot = self.done.wait(slot).unwrap_or_else(PoisonError::into_inner),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    slot = self
                        .done
                        .wait_timeout(slot, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
            }
        }
        slot
    }

    /// Tells `notifier` when this future is done (at once if it is).
    fn subscribe(&self, notifier: &Arc<Notifier>, id: usize) {
        let mut slot = self.lock();
        match &mut *slot {
            Slot::Pending(Watchers { waiters, .. }) => {
                // Drop registrations of earlier waits that have returned.
                waiters.retain(|w| w.notifier.strong_count() > 0);
                waiters.push(Waiter {
                    notifier: Arc::downgrade(notifier),
                    id,
                });
            }
            _ => {
                drop(slot);
                notifier.ready(id);
            }
        }
    }

    /// Whether the future failed for a reason other than being cancelled.
    fn failed(&self) -> bool {
        match &*self.lock() {
            Slot::Done(Err(error)) | Slot::Taken(Some(error)) => {
                !matches!(error, Error::Cancelled { .. })
            }
            _ => false,
        }
    }

    fn cancel(&self) -> bool {
        match self.started.compare_exchange(
            0,
            CANCELLED_BEFORE_START,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // Also stops a pool that looks at the run's flag before sending the job away.
                self.control.cancel();
                self.resolve(Err(Error::Cancelled { index: self.index }));
                true
            }
            Err(stamp) => stamp == CANCELLED_BEFORE_START,
        }
    }
}

/// Runs one done callback. A panic in it is caught (the panic hook reports it, as Python logs
/// an exception raised by a callback), so that it cannot take down the thread that completed
/// the task (a pool's worker or supervisor), nor keep the later callbacks from running.
fn run_callback(callback: Box<dyn FnOnce() + Send>) {
    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(callback));
}

/// Moves the outcome out of a done slot.
fn take<R>(slot: &mut Slot<R>, index: usize) -> Result<R, Error> {
    match std::mem::replace(slot, Slot::Taken(None)) {
        Slot::Done(Ok(value)) => Ok(value),
        Slot::Done(Err(error)) => {
            *slot = Slot::Taken(Some(error.clone()));
            Err(error)
        }
        Slot::Taken(kept) => {
            *slot = Slot::Taken(kept);
            Err(Error::ResultTaken { index })
        }
        Slot::Pending(waiters) => {
            *slot = Slot::Pending(waiters);
            unreachable!("take is only called on a done slot")
        }
    }
}

impl<R> Future<R> {
    /// A future for task `index`, done with `outcome` already if given; its task runs under
    /// `timeout`, if any.
    fn new(index: usize, outcome: Option<Result<R, Error>>, timeout: Option<Duration>) -> Self {
        // A future born done is "past its start" for `cancel`, which then fails as on any
        // finished task.
        let (slot, stamp) = match outcome {
            Some(outcome) => (Slot::Done(outcome), 1),
            None => (Slot::Pending(Watchers::default()), 0),
        };
        Future {
            shared: Arc::new(Shared {
                index,
                slot: Mutex::new(slot),
                done: Condvar::new(),
                started: Arc::new(StartStamp::new(stamp)),
                control: Arc::new(RunControl::new(timeout)),
            }),
        }
    }

    /// A future that is already done with `error`: how a submit that could not happen (an
    /// executor shut down, an invalid `n_jobs`) reports it.
    pub fn failed(index: usize, error: Error) -> Self {
        Future::new(index, Some(Err(error)), None)
    }

    /// The task's number: the order in which its executor received it, counting from 0. Errors
    /// name the task by it (`task 3 panicked: ...`).
    pub fn index(&self) -> usize {
        self.shared.index
    }

    /// Blocks until the task is done and returns its value, or its failure
    /// ([`Error::TaskPanicked`], [`Error::WorkerCrashed`], [`Error::Cancelled`], ...).
    ///
    /// # Errors
    /// The task's failure; [`Error::ResultTaken`] if an earlier call took the outcome.
    pub fn result(self) -> Result<R, Error> {
        let mut slot = self.shared.wait_done(None);
        take(&mut slot, self.shared.index)
    }

    /// Like [`result`](Future::result), but waits at most `timeout`. When the task is not done
    /// by then, returns [`Error::WaitTimedOut`] and leaves the task running: the future can be
    /// waited on again.
    ///
    /// # Errors
    /// [`Error::WaitTimedOut`] when not done in time; otherwise as [`result`](Future::result).
    pub fn result_timeout(&mut self, timeout: Duration) -> Result<R, Error> {
        let deadline = Instant::now().checked_add(timeout);
        let mut slot = self.shared.wait_done(deadline);
        if matches!(*slot, Slot::Pending(_)) {
            return Err(Error::WaitTimedOut {
                index: self.shared.index,
                after: timeout,
            });
        }
        take(&mut slot, self.shared.index)
    }

    /// The outcome if the task is done, `None` if not. Never blocks.
    pub fn try_result(&mut self) -> Option<Result<R, Error>> {
        let mut slot = self.shared.lock();
        if matches!(*slot, Slot::Pending(_)) {
            return None;
        }
        Some(take(&mut slot, self.shared.index))
    }

    /// Blocks until the task is done and returns its failure, or `None` if it returned a
    /// value (Python's `Future.exception()`). Leaves the value in place for
    /// [`result`](Future::result).
    pub fn error(&self) -> Option<Error> {
        match &*self.shared.wait_done(None) {
            Slot::Done(Err(error)) | Slot::Taken(Some(error)) => Some(error.clone()),
            _ => None,
        }
    }

    /// Blocks until the task is done.
    pub fn wait(&self) {
        drop(self.shared.wait_done(None));
    }

    /// Blocks until the task is done or `timeout` has passed; returns whether it is done.
    pub fn wait_timeout(&self, timeout: Duration) -> bool {
        let deadline = Instant::now().checked_add(timeout);
        !matches!(*self.shared.wait_done(deadline), Slot::Pending(_))
    }

    /// Whether the task is done: returned, failed or cancelled.
    pub fn is_done(&self) -> bool {
        self.shared.is_done()
    }

    /// Whether the task has started and is not done yet.
    pub fn is_running(&self) -> bool {
        let stamp = self.shared.started.load(Ordering::Acquire);
        stamp != 0 && stamp != CANCELLED_BEFORE_START && !self.is_done()
    }

    /// Whether [`cancel`](Future::cancel) stopped the task before it started.
    pub fn is_cancelled(&self) -> bool {
        self.shared.started.load(Ordering::Acquire) == CANCELLED_BEFORE_START
    }

    /// Stops the task if it has not started yet. Returns `true` if it will never run (the
    /// future is then done, with [`Error::Cancelled`]), `false` if it had already started: it
    /// then runs to its end and the future gets its outcome.
    ///
    /// Starting and cancelling are decided by one atomic exchange, so when `cancel` races
    /// with a worker picking the task up, exactly one of them wins and the answer is true.
    pub fn cancel(&self) -> bool {
        self.shared.cancel()
    }

    /// Calls `callback` with this future once the task is done (returned, failed or
    /// cancelled): Python's `Future.add_done_callback`. Callbacks run in the order they were
    /// added, on the thread that completed the task (a pool's thread; the calling thread for
    /// a future that is already done, or for [`cancel`](Future::cancel); parjob's
    /// `parjob-timeout-callbacks` thread for a task that timed out on threads, where a slow
    /// callback delays only the callbacks of later such timeouts, never a timeout), so they
    /// should be quick. A panic in a callback is caught and reported by the panic hook; it changes
    /// nothing else.
    ///
    /// The callback receives the future itself (one more handle on the same outcome, as in
    /// Python): [`result`](Future::result) there takes the value, after which this handle
    /// gives [`Error::ResultTaken`], so take it in one place; [`error`](Future::error) leaves
    /// it where it is.
    ///
    /// ```
    /// use std::sync::mpsc;
    /// use parjob::{delayed, Backend, Executor};
    ///
    /// fn square(x: u64) -> u64 { x * x }
    ///
    /// let executor = Executor::new(2).backend(Backend::Threading);
    /// let (sender, done) = mpsc::channel();
    /// for i in 0..3u64 {
    ///     let sender = sender.clone();
    ///     executor.submit(delayed(square, i)).add_done_callback(move |future| {
    ///         let _ = sender.send(future.result());
    ///     });
    /// }
    /// drop(sender);
    /// let mut squares: Vec<u64> = done.iter().collect::<Result<_, _>>()?;
    /// squares.sort();
    /// assert_eq!(squares, [0, 1, 4]);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn add_done_callback(&self, callback: impl FnOnce(Future<R>) + Send + 'static)
    where
        R: Send + 'static,
    {
        let weak = Arc::downgrade(&self.shared);
        let call = Box::new(move || {
            // Whoever completes the future holds it: the upgrade fails only for a future
            // dropped by everyone, whose callback has nobody left to tell.
            if let Some(shared) = weak.upgrade() {
                callback(Future { shared });
            }
        });
        let mut slot = self.shared.lock();
        if let Slot::Pending(watchers) = &mut *slot {
            watchers.callbacks.push(call);
            return;
        }
        drop(slot);
        run_callback(call);
    }

    /// An untyped handle on this future, e.g. for an executor that waits for all it made.
    pub fn handle(&self) -> FutureHandle
    where
        R: Send + 'static,
    {
        FutureHandle(Arc::clone(&self.shared) as Arc<dyn Waitable>)
    }
}

impl<R> std::fmt::Debug for Future<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Read before taking the lock: `is_running` takes it too.
        let stamp = self.shared.started.load(Ordering::Acquire);
        let state = match &*self.shared.lock() {
            Slot::Pending(_) if stamp == CANCELLED_BEFORE_START => "cancelled",
            Slot::Pending(_) if stamp != 0 => "running",
            Slot::Pending(_) => "pending",
            Slot::Done(Ok(_)) => "finished",
            Slot::Done(Err(Error::Cancelled { .. })) => "cancelled",
            Slot::Done(Err(_)) => "failed",
            Slot::Taken(_) => "taken",
        };
        f.debug_struct("Future")
            .field("index", &self.shared.index)
            .field("state", &state)
            .finish()
    }
}

/// An untyped handle on a [`Future`]'s state: wait for it, cancel it, ask whether it is done,
/// whatever its result type.
#[derive(Clone)]
pub struct FutureHandle(Arc<dyn Waitable>);

trait Waitable: Send + Sync {
    fn is_done(&self) -> bool;
    fn wait(&self);
    fn cancel(&self) -> bool;
}

impl<R: Send> Waitable for Shared<R> {
    fn is_done(&self) -> bool {
        Shared::is_done(self)
    }
    fn wait(&self) {
        drop(self.wait_done(None));
    }
    fn cancel(&self) -> bool {
        Shared::cancel(self)
    }
}

impl FutureHandle {
    /// See [`Future::is_done`].
    pub fn is_done(&self) -> bool {
        self.0.is_done()
    }
    /// See [`Future::wait`].
    pub fn wait(&self) {
        self.0.wait();
    }
    /// See [`Future::cancel`].
    pub fn cancel(&self) -> bool {
        self.0.cancel()
    }
}

impl std::fmt::Debug for FutureHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FutureHandle")
            .field("done", &self.is_done())
            .finish()
    }
}

/// Submits `task` to `pool` as a one-task job numbered `index` and returns its future.
///
/// On the sequential pool the task runs before this returns.
pub fn submit<T: Task>(pool: &dyn Pool, index: usize, task: T) -> Future<T::Output> {
    submit_timed(pool, index, task, None)
}

/// [`submit`] with a time limit for a task that has none of its own
/// ([`delayed(..).timeout(d)`](crate::Delayed::timeout) wins over it): an executor's
/// `Parallel::timeout`.
///
/// A pool that enforces timeouts ([`Pool::enforces_timeout`], the process backend) stops the
/// task at its limit and the future fails with [`Error::Timeout`]. On any other pool (threads)
/// the task cannot be stopped: the future fails with the same error at the limit while the
/// task runs on to its end, as `Parallel::run` does there; a task that returns past its limit
/// before that is seen fails the same way. On a pool that runs tasks on the calling thread
/// (sequential) the task is timed when it returns.
pub fn submit_timed<T: Task>(
    pool: &dyn Pool,
    index: usize,
    task: T,
    timeout: Option<Duration>,
) -> Future<T::Output> {
    let limit = task.own_timeout().or(timeout);
    let future = Future::new(index, None, limit);
    let watched = limit.filter(|_| !pool.enforces_timeout());
    let resolver = Resolver::<T> {
        shared: Some(Arc::clone(&future.shared)),
        limit: watched,
    };
    let reply = Reply::Call(Box::new(move |completion| resolver.completed(completion)));
    let job = Job::new(
        index as u64,
        Box::new(TypedBatch::new(index, vec![task])),
        Arc::clone(&future.shared.control),
        Some(Arc::clone(&future.shared.started)),
        reply,
    );
    let job = match watched {
        // Its limit counts from its start, which the pool marks on the job.
        Some(limit) if !pool.runs_on_calling_thread() => {
            let shared: Arc<dyn Expiring> = future.shared.clone();
            let shared = Arc::downgrade(&shared);
            job.on_start(Arc::new(move || timeouts::started(&shared, limit)))
        }
        _ => job,
    };
    pool.submit(job);
    future
}

/// Carries a job's completion into its future; if the pool drops the job without completing
/// it (it was shut down first), the future fails as cancelled instead of waiting forever.
struct Resolver<T: Task> {
    shared: Option<Arc<Shared<T::Output>>>,
    /// The task's time limit, when its pool does not enforce it: a value that came back
    /// later than that is a timeout.
    limit: Option<Duration>,
}

impl<T: Task> Resolver<T> {
    fn completed(mut self, completion: Completion) {
        let Some(shared) = self.shared.take() else {
            return;
        };
        let index = shared.index;
        let batch = completion
            .batch
            .into_any()
            .downcast::<TypedBatch<T>>()
            .expect("a pool returns the batch it was given, so the type matches");
        let TypedBatch {
            mut values,
            mut failures,
            ..
        } = *batch;
        // A job that comes back without an outcome either never started (cancelled) or was
        // let go of while it ran (its pool shut down without waiting: abandoned).
        let stamp = shared.started.load(Ordering::Acquire);
        let unrun = if stamp != 0 && stamp != CANCELLED_BEFORE_START {
            Error::Abandoned { index }
        } else {
            Error::Cancelled { index }
        };
        let outcome = match failures.pop() {
            Some((_, error)) => Err(error),
            None => match self.limit {
                Some(limit) if completion.busy > limit => {
                    Err(Error::timeout_on_return(index, limit, completion.busy))
                }
                _ => values.pop().ok_or(unrun),
            },
        };
        shared.resolve(outcome);
    }
}

impl<T: Task> Drop for Resolver<T> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            let index = shared.index;
            shared.resolve(Err(Error::Cancelled { index }));
        }
    }
}

/// A queue of "future `id` is done" shared by the futures one wait watches.
struct Notifier {
    ready: Mutex<VecDeque<usize>>,
    wake: Condvar,
}

impl Notifier {
    fn new() -> Arc<Self> {
        Arc::new(Notifier {
            ready: Mutex::new(VecDeque::new()),
            wake: Condvar::new(),
        })
    }

    fn ready(&self, id: usize) {
        self.ready
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push_back(id);
        self.wake.notify_one();
    }

    fn next(&self) -> usize {
        let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(id) = ready.pop_front() {
                return id;
            }
            ready = self
                .wake
                .wait(ready)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The next done future, or `None` once `deadline` has passed.
    fn next_before(&self, deadline: Instant) -> Option<usize> {
        let mut ready = self.ready.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(id) = ready.pop_front() {
                return Some(id);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            ready = self
                .wake
                .wait_timeout(ready, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

/// Yields `futures` in the order they finish (those already done first, in input order):
/// Python's `concurrent.futures.as_completed`. The futures may come from different
/// executors and backends.
///
/// ```
/// use parjob::{as_completed, delayed, Backend, Executor};
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let executor = Executor::new(2).backend(Backend::Threading);
/// let futures: Vec<_> = (0..3u64).map(|i| executor.submit(delayed(square, i))).collect();
/// let mut total = 0;
/// for future in as_completed(futures) {
///     total += future.result()?;
/// }
/// assert_eq!(total, 5);
/// # Ok::<(), parjob::Error>(())
/// ```
pub fn as_completed<R>(futures: impl IntoIterator<Item = Future<R>>) -> AsCompleted<R> {
    let futures: Vec<Option<Future<R>>> = futures.into_iter().map(Some).collect();
    let notifier = Notifier::new();
    for (id, future) in futures.iter().enumerate() {
        if let Some(future) = future {
            future.shared.subscribe(&notifier, id);
        }
    }
    AsCompleted {
        remaining: futures.len(),
        futures,
        notifier,
    }
}

/// The iterator [`as_completed`] returns: each next future is done.
pub struct AsCompleted<R> {
    futures: Vec<Option<Future<R>>>,
    notifier: Arc<Notifier>,
    remaining: usize,
}

impl<R> Iterator for AsCompleted<R> {
    type Item = Future<R>;

    fn next(&mut self) -> Option<Future<R>> {
        while self.remaining > 0 {
            let id = self.notifier.next();
            if let Some(future) = self.futures.get_mut(id).and_then(Option::take) {
                self.remaining -= 1;
                return Some(future);
            }
        }
        None
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.remaining, Some(self.remaining))
    }
}

impl<R> std::fmt::Debug for AsCompleted<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsCompleted")
            .field("remaining", &self.remaining)
            .finish()
    }
}

/// When [`wait`] returns: Python's `FIRST_COMPLETED`, `FIRST_EXCEPTION`, `ALL_COMPLETED`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Until {
    /// As soon as any future is done (at once if one already is, or if there are none).
    FirstCompleted,
    /// As soon as any future fails (a cancelled one does not count), or when all are done.
    FirstError,
    /// When every future is done.
    AllCompleted,
}

/// The futures [`wait`] was given, split into those done when it returned and the others,
/// each in input order.
#[derive(Debug)]
pub struct Waited<R> {
    /// Futures that were done.
    pub done: Vec<Future<R>>,
    /// Futures that were not done yet.
    pub not_done: Vec<Future<R>>,
}

/// Blocks until `until` holds for `futures`, then returns them split into done and not done:
/// Python's `concurrent.futures.wait`. The futures may come from different executors and
/// backends.
///
/// ```
/// use parjob::{delayed, wait, Backend, Executor, Until};
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let executor = Executor::new(2).backend(Backend::Threading);
/// let futures = (0..3u64).map(|i| executor.submit(delayed(square, i)));
/// let waited = wait(futures, Until::AllCompleted);
/// assert_eq!((waited.done.len(), waited.not_done.len()), (3, 0));
/// ```
pub fn wait<R>(futures: impl IntoIterator<Item = Future<R>>, until: Until) -> Waited<R> {
    wait_until(futures, until, None)
}

/// Like [`wait`], but returns after `timeout` at the latest, whether `until` holds or not
/// (Python's `wait(fs, timeout=...)`): check `not_done` to tell.
pub fn wait_timeout<R>(
    futures: impl IntoIterator<Item = Future<R>>,
    until: Until,
    timeout: Duration,
) -> Waited<R> {
    wait_until(futures, until, Instant::now().checked_add(timeout))
}

fn wait_until<R>(
    futures: impl IntoIterator<Item = Future<R>>,
    until: Until,
    deadline: Option<Instant>,
) -> Waited<R> {
    let futures: Vec<Future<R>> = futures.into_iter().collect();
    let notifier = Notifier::new();
    for (id, future) in futures.iter().enumerate() {
        future.shared.subscribe(&notifier, id);
    }
    let mut finished = 0;
    let mut failed = false;
    loop {
        let satisfied = match until {
            Until::FirstCompleted => finished > 0 || futures.is_empty(),
            Until::FirstError => failed || finished == futures.len(),
            Until::AllCompleted => finished == futures.len(),
        };
        if satisfied {
            break;
        }
        let id = match deadline {
            None => notifier.next(),
            Some(deadline) => match notifier.next_before(deadline) {
                Some(id) => id,
                None => break,
            },
        };
        finished += 1;
        failed |= futures.get(id).is_some_and(|f| f.shared.failed());
    }
    drop(notifier);
    let (done, not_done) = futures.into_iter().partition(Future::is_done);
    Waited { done, not_done }
}

/// A future whose task's time limit someone must watch ([`timeouts`]): its pool does not
/// enforce it.
trait Expiring: Send + Sync {
    /// Where the future stands against its task's time limit `limit`.
    fn expiry(&self, limit: Duration) -> Expiry;
    /// Fails the future with a timeout at `limit` (nothing if it is done already) and wakes
    /// its waiters; returns its done-callbacks, for the caller to run.
    fn expire(&self, limit: Duration) -> Vec<Box<dyn FnOnce() + Send>>;
}

/// Where a watched future stands ([`Expiring::expiry`]).
enum Expiry {
    /// Done, or not started (a job sent again after its start marks it anew): not watched.
    Done,
    /// Its task has run for its limit.
    Due,
    /// Its task may still run this long (it was started again since it was watched).
    Left(Duration),
}

impl<R: Send> Expiring for Shared<R> {
    fn expiry(&self, limit: Duration) -> Expiry {
        if self.is_done() {
            return Expiry::Done;
        }
        let stamp = self.started.load(Ordering::Acquire);
        if stamp == 0 || stamp == CANCELLED_BEFORE_START {
            return Expiry::Done;
        }
        let ran = Duration::from_nanos(self.control.nanos_since_start().saturating_sub(stamp - 1));
        match limit.checked_sub(ran) {
            Some(left) if !left.is_zero() => Expiry::Left(left),
            _ => Expiry::Due,
        }
    }

    fn expire(&self, limit: Duration) -> Vec<Box<dyn FnOnce() + Send>> {
        // The task runs on, on its thread, as it does under `Parallel::run` on threads.
        let worker = self.started.worker();
        self.settle(Err(Error::timeout_left_running(self.index, limit, worker)))
    }
}

/// One thread that fails each watched future at its task's time limit (a future's task has
/// no run whose dispatcher watches its time, as `Parallel::run`'s does), and one that runs
/// those futures' done-callbacks. A future is watched from its task's start
/// ([`Job::on_start`]), by deadline: no polling, however many wait.
mod timeouts {
    use std::cmp::Ordering;
    use std::collections::BinaryHeap;
    use std::sync::mpsc::{self, Sender};
    use std::sync::{Condvar, Mutex, OnceLock, PoisonError, Weak};
    use std::time::{Duration, Instant};

    use super::{Expiring, Expiry, run_callback};

    /// Done-callbacks of futures that timed out.
    type Callbacks = Vec<Box<dyn FnOnce() + Send>>;

    struct Entry {
        at: Instant,
        /// Tells apart entries due at the same instant.
        seq: u64,
        future: Weak<dyn Expiring>,
        limit: Duration,
    }

    impl PartialEq for Entry {
        fn eq(&self, other: &Self) -> bool {
            (self.at, self.seq) == (other.at, other.seq)
        }
    }
    impl Eq for Entry {}
    impl PartialOrd for Entry {
        fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
            Some(self.cmp(other))
        }
    }
    impl Ord for Entry {
        /// Reversed: the soonest deadline is the heap's top.
        fn cmp(&self, other: &Self) -> Ordering {
            (other.at, other.seq).cmp(&(self.at, self.seq))
        }
    }

    #[derive(Default)]
    struct Deadlines {
        heap: BinaryHeap<Entry>,
        seq: u64,
    }

    struct Watch {
        deadlines: Mutex<Deadlines>,
        changed: Condvar,
        /// To the thread that runs timed-out futures' callbacks (`None`: it could not start,
        /// and they run on the watching thread).
        callbacks: Option<Sender<Callbacks>>,
    }

    fn watch() -> Option<&'static Watch> {
        static WATCH: OnceLock<Option<Watch>> = OnceLock::new();
        WATCH
            .get_or_init(|| {
                let (callbacks, to_run) = mpsc::channel::<Callbacks>();
                // A callback that blocks (waiting on another future that times out, say)
                // delays only the callbacks after it, never a timeout.
                let callbacks = std::thread::Builder::new()
                    .name("parjob-timeout-callbacks".into())
                    .spawn(move || {
                        for callbacks in to_run {
                            callbacks.into_iter().for_each(run_callback);
                        }
                    })
                    .ok()
                    .map(|_| callbacks);
                let spawned = std::thread::Builder::new()
                    .name("parjob-timeouts".into())
                    .spawn(|| {
                        if let Some(watch) = watch() {
                            watch.run();
                        }
                    });
                match spawned {
                    Ok(_) => Some(Watch {
                        deadlines: Mutex::new(Deadlines::default()),
                        changed: Condvar::new(),
                        callbacks,
                    }),
                    // A process out of threads cannot watch: its futures then wait for their
                    // tasks, as on a pool without timeouts, and it is said once.
                    Err(e) => {
                        eprintln!(
                            "parjob: cannot start the thread that times submitted tasks ({e}): \
                             their time limits are not enforced on threads"
                        );
                        None
                    }
                }
            })
            .as_ref()
    }

    /// `future`'s task started: it fails at `limit` from now unless done by then.
    pub(super) fn started(future: &Weak<dyn Expiring>, limit: Duration) {
        // A limit past what `Instant` can hold never comes.
        let Some(at) = Instant::now().checked_add(limit) else {
            return;
        };
        let Some(watch) = watch() else {
            return;
        };
        let mut deadlines = watch
            .deadlines
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        deadlines.seq += 1;
        let seq = deadlines.seq;
        deadlines.heap.push(Entry {
            at,
            seq,
            future: Weak::clone(future),
            limit,
        });
        // Only a new soonest deadline needs the watching thread awake.
        if deadlines.heap.peek().is_some_and(|top| top.seq == seq) {
            watch.changed.notify_one();
        }
    }

    impl Watch {
        fn run(&self) {
            let mut deadlines = self
                .deadlines
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            loop {
                let now = Instant::now();
                let mut due = Vec::new();
                while deadlines.heap.peek().is_some_and(|top| top.at <= now) {
                    let Some(entry) = deadlines.heap.pop() else {
                        break;
                    };
                    let Some(future) = entry.future.upgrade() else {
                        continue;
                    };
                    match future.expiry(entry.limit) {
                        Expiry::Done => {}
                        Expiry::Due => due.push((future, entry.limit)),
                        Expiry::Left(left) => {
                            deadlines.seq += 1;
                            let seq = deadlines.seq;
                            deadlines.heap.push(Entry {
                                at: now + left,
                                seq,
                                ..entry
                            });
                        }
                    }
                }
                if !due.is_empty() {
                    drop(deadlines);
                    for (future, limit) in due {
                        let callbacks = future.expire(limit);
                        if callbacks.is_empty() {
                            continue;
                        }
                        match &self.callbacks {
                            Some(to_run) => {
                                if let Err(unsent) = to_run.send(callbacks) {
                                    unsent.0.into_iter().for_each(run_callback);
                                }
                            }
                            None => callbacks.into_iter().for_each(run_callback),
                        }
                    }
                    deadlines = self
                        .deadlines
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner);
                    continue;
                }
                deadlines = match deadlines.heap.peek().map(|top| top.at) {
                    None => self
                        .changed
                        .wait(deadlines)
                        .unwrap_or_else(PoisonError::into_inner),
                    Some(at) => {
                        self.changed
                            .wait_timeout(deadlines, at.saturating_duration_since(now))
                            .unwrap_or_else(PoisonError::into_inner)
                            .0
                    }
                };
            }
        }
    }
}
