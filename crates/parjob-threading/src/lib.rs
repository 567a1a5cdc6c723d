//! parjob's threading backend: a pool of up to `n_jobs` threads named `parjob-worker-<i>`,
//! started as work arrives and parked (blocked, using no CPU) while there is none.
//!
//! [`ThreadPool::new`] makes the pool; the `parjob` crate does this for
//! `Backend::Threading` and keeps the pool for the life of its `Parallel`.
//!
//! ```
//! use std::sync::Arc;
//! use parjob_core::{delayed, run, RunOptions};
//!
//! fn square(x: u64) -> u64 { x * x }
//! let pool = Arc::new(parjob_threading::ThreadPool::new(2)?);
//! let out = run(pool, (0..100u64).map(|i| delayed(square, i)), &RunOptions::default())?;
//! assert_eq!(out[99], 9801);
//! # Ok::<(), parjob_core::Error>(())
//! ```
//!
//! # Why not rayon
//!
//! Up to 0.1 this backend was a rayon pool. rayon's idle threads spin for a while before they
//! sleep, and a rayon pool starts all its threads at once: right for `n_jobs` near the core
//! count, ruinous for the `n_jobs = 1000` that I/O-bound work wants (1000 sleeps of 10 ms
//! took 1.6-4.7 s, and an idle pool of 5000 threads burned CPU for a minute). Here a thread is
//! started only when a batch is queued and no thread is free to take it, and a thread without
//! work waits on a condition variable, after looking for work for up to 50 us: batches of
//! tiny tasks follow one another faster than a wake-up. Only one thread looks at a time, so a
//! big idle pool costs no more CPU than a small one. Batches start in the order they were
//! submitted (one FIFO queue): the dispatcher, not the pool, balances the load, by sizing
//! batches. The pool asks it to keep a batch to 128 KiB of tasks
//! ([`Pool::max_batch_bytes`]): the calling thread writes a batch of tiny tasks and a worker
//! reads it right after, and a batch that size is still in the cache when it does.
//!
//! # Timeouts
//!
//! A thread cannot be stopped. When a task overruns its run's `.timeout(..)`, the dispatcher
//! reports it and stops waiting for it; the pool then counts the thread running it as
//! abandoned and, the next time a batch has no thread to run it, starts a replacement with the
//! same worker index. The old thread finishes its task in the background and then ends, so
//! later runs get their full `n_jobs` (at most [`MAX_THREADS`] threads in all, abandoned ones
//! included).
//!
//! # Runs from its own threads
//!
//! A task that runs the pool's own `Parallel` again would queue batches only this pool's
//! threads take, and once every thread waits on such a run none is left. Each thread knows
//! its pool ([`Pool::serves_current_thread`]), and `Parallel` runs such a run on the calling
//! thread instead.
#![deny(missing_docs)]

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use parjob_core::{Backend, Error, Job, MAX_THREADS, Pool, WorkerInit, set_worker_identity};

/// A pool of worker threads for parjob jobs: at most `workers` run at once, started as work
/// arrives and parked while idle. See the [crate docs](crate) for how it treats timeouts.
pub struct ThreadPool {
    shared: Arc<Shared>,
    workers: usize,
}

impl std::fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.shared.lock();
        f.debug_struct("ThreadPool")
            .field("workers", &self.workers)
            .field("started", &state.active)
            .field("abandoned", &state.retiring)
            .field("queued", &state.queue.len())
            .finish()
    }
}

/// What the pool's handle and its threads share.
struct Shared {
    state: Mutex<State>,
    /// Signalled when work is queued for a parked thread, and at shutdown.
    work_ready: Condvar,
    /// Bumped when work is handed to a spinning thread (see `SPIN`), which watches it
    /// instead of the lock.
    handed_out: AtomicU64,
    workers: usize,
    /// Runs on every thread before its first work.
    init: Option<WorkerInit>,
}

/// Something for a worker thread to run.
enum Work {
    /// A batch of a run or a future.
    Job(Job),
    /// A closure ([`ThreadPool::spawn`]).
    Call(Box<dyn FnOnce(Result<(), Error>) + Send + 'static>),
}

impl Work {
    /// How long the dispatcher waits for this work before it abandons it.
    fn time_limit(&self) -> Option<Duration> {
        match self {
            Work::Job(job) => job.control().timeout(),
            Work::Call(_) => None,
        }
    }

    /// Runs the work, or fails it with `broken`, the error of a thread whose initializer
    /// failed.
    fn run(self, broken: Option<&Error>) {
        match (self, broken) {
            (Work::Job(job), None) => job.run_here(),
            (Work::Call(call), None) => call(Ok(())),
            (work, Some(error)) => fail(work, error),
        }
    }
}

/// A thread running work with a time limit: how the pool tells an abandoned thread.
struct Timed {
    serial: u64,
    deadline: Instant,
    index: usize,
    /// A replacement thread took over this thread's index: this one ends after its work.
    replaced: bool,
}

struct State {
    queue: VecDeque<Work>,
    /// Threads parked on `work_ready` that no wake-up has been sent to.
    idle: usize,
    /// Threads spinning for work (see `SPIN`) that no work was handed to.
    spinning: usize,
    /// Work handed to spinning threads that they have not come back for yet.
    handed: usize,
    /// Wake-ups sent that no thread has woken from yet.
    wakeups: usize,
    /// Threads started that have not yet looked at the queue.
    starting: usize,
    /// Threads that count toward `workers`: started, not ended, not replaced.
    active: usize,
    /// Abandoned threads that were replaced and still run their task.
    retiring: usize,
    /// Worker indices that no active thread holds, the smallest last.
    free_indices: Vec<usize>,
    /// Threads running work with a time limit.
    timed: Vec<Timed>,
    next_serial: u64,
    /// A `parjob-watch` thread waits for the next time limit to pass (see `watch`).
    watching: bool,
    shut_down: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock (user code runs outside it); if something did,
        // the counters are still the best knowledge there is.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ThreadPool {
    /// A pool of up to `workers` threads (at least 1), named `parjob-worker-0` ..
    /// `parjob-worker-{workers-1}`. One thread starts now; the others as work arrives.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the operating system refuses to start a thread.
    pub fn new(workers: usize) -> Result<ThreadPool, Error> {
        ThreadPool::with_initializer(workers, None)
    }

    /// [`new`](ThreadPool::new), with `init` run once on every thread before its first work
    /// (Python's `ThreadPoolExecutor(initializer=...)`), replacement threads included. If it
    /// panics on a thread, every task that thread takes fails with [`Error::Worker`] carrying
    /// the panic message, and the pool goes on.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] if the operating system refuses to start a thread.
    pub fn with_initializer(workers: usize, init: Option<WorkerInit>) -> Result<ThreadPool, Error> {
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                idle: 0,
                spinning: 0,
                handed: 0,
                wakeups: 0,
                starting: 0,
                active: 0,
                retiring: 0,
                free_indices: (0..workers).rev().collect(),
                timed: Vec::new(),
                next_serial: 0,
                watching: false,
                shut_down: false,
            }),
            work_ready: Condvar::new(),
            handed_out: AtomicU64::new(0),
            workers,
            init,
        });
        let pool = ThreadPool { shared, workers };
        // One thread up front, so that a system that cannot start threads says so here.
        let index = {
            let mut state = pool.shared.lock();
            let index = state.free_indices.pop().unwrap_or(0);
            state.active += 1;
            state.starting += 1;
            index
        };
        start_thread(&pool.shared, index).map_err(|e| {
            Error::backend_unavailable(Backend::Threading, format!("cannot start a thread: {e}"))
        })?;
        Ok(pool)
    }

    /// Runs `call` on one of the pool's threads, after the work queued before it, with
    /// `Ok(())`; or, on a thread whose initializer failed, with that error instead of
    /// running the work it stands for. If no thread can be started at all, `call` gets
    /// [`Error::BackendUnavailable`].
    pub fn spawn(&self, call: Box<dyn FnOnce(Result<(), Error>) + Send + 'static>) {
        self.queue(Work::Call(call));
    }

    fn queue(&self, work: Work) {
        let mut state = self.shared.lock();
        state.queue.push_back(work);
        if state.spinning > 0 {
            // A thread that just ran out of work is still looking: no wake-up (a system call
            // here, and a thread to schedule there) is needed.
            state.spinning -= 1;
            state.handed += 1;
            drop(state);
            self.shared.handed_out.fetch_add(1, Ordering::Release);
            return;
        }
        if state.idle > 0 {
            state.idle -= 1;
            state.wakeups += 1;
            drop(state);
            self.shared.work_ready.notify_one();
            return;
        }
        if let Some(index) = index_for_new_thread(&mut state, self.workers) {
            drop(state);
            if let Err(error) = start_thread(&self.shared, index) {
                thread_not_started(&self.shared, index, &error);
            }
        } else if claim_watch(&mut state) {
            drop(state);
            start_watch(&self.shared);
        }
    }
}

/// Whether a `parjob-watch` thread is needed now (work waits with no thread coming for it
/// while a busy thread runs timed work) and none runs: then it counts as running, and the
/// caller starts it ([`start_watch`]) once it let go of the lock.
fn claim_watch(state: &mut State) -> bool {
    if state.watching || next_deadline(state).is_none() {
        return false;
    }
    state.watching = true;
    true
}

/// Starts the `parjob-watch` thread that [`claim_watch`] claimed.
fn start_watch(shared: &Arc<Shared>) {
    let for_watch = Arc::clone(shared);
    let started = std::thread::Builder::new()
        .name("parjob-watch".into())
        .spawn(move || watch(&for_watch));
    if started.is_err() {
        // The work still runs when a busy thread frees up; only sooner is lost.
        shared.lock().watching = false;
    }
}

/// When work waits because every thread is busy and some run timed work: the soonest time
/// limit, after which the thread running it counts as abandoned and can be replaced.
fn next_deadline(state: &State) -> Option<Instant> {
    if state.queue.len() <= state.starting + state.wakeups + state.handed || state.shut_down {
        return None;
    }
    state
        .timed
        .iter()
        .filter(|t| !t.replaced)
        .map(|t| t.deadline)
        .min()
}

/// Waits for the time limits of busy threads to pass while work has no thread, replacing
/// each thread whose limit passed: without this, work queued behind tasks that are about to
/// be abandoned would wait for them to end after all.
fn watch(shared: &Arc<Shared>) {
    let mut state = shared.lock();
    loop {
        let Some(deadline) = next_deadline(&state) else {
            state.watching = false;
            return;
        };
        let now = Instant::now();
        if deadline > now {
            drop(state);
            std::thread::sleep(deadline - now);
            state = shared.lock();
            continue;
        }
        let Some(index) = index_for_new_thread(&mut state, shared.workers) else {
            state.watching = false;
            return;
        };
        drop(state);
        if let Err(error) = start_thread(shared, index) {
            thread_not_started(shared, index, &error);
        }
        state = shared.lock();
    }
}

/// When queued work has no thread to take it: the index for a new thread (and the thread
/// counted as starting), if the pool may start one.
fn index_for_new_thread(state: &mut State, workers: usize) -> Option<usize> {
    let coming = state.starting + state.wakeups + state.handed;
    if state.queue.len() <= coming || state.shut_down {
        return None;
    }
    let index = if state.active < workers {
        state.free_indices.pop()?
    } else {
        // Every thread is busy. One that overran its time limit was abandoned by the
        // dispatcher: replace it, so that the pool keeps `workers` threads that can work.
        if state.active + state.retiring >= MAX_THREADS {
            return None;
        }
        let now = Instant::now();
        let stuck = state
            .timed
            .iter_mut()
            .find(|t| !t.replaced && t.deadline <= now)?;
        stuck.replaced = true;
        state.retiring += 1;
        state.active -= 1;
        stuck.index
    };
    state.active += 1;
    state.starting += 1;
    Some(index)
}

/// Starts worker thread `index`, already counted as active and starting.
fn start_thread(shared: &Arc<Shared>, index: usize) -> std::io::Result<()> {
    let for_thread = Arc::clone(shared);
    std::thread::Builder::new()
        .name(format!("parjob-worker-{index}"))
        .spawn(move || work_loop(&for_thread, index))
        .map(drop)
}

/// Undoes the counting of a thread that could not be started. If no thread is left to run
/// the queue, its work fails with the reason rather than waiting for ever.
fn thread_not_started(shared: &Shared, index: usize, error: &std::io::Error) {
    let mut state = shared.lock();
    state.active -= 1;
    state.starting -= 1;
    state.free_indices.push(index);
    if state.active > 0 {
        return;
    }
    let stranded: Vec<Work> = state.queue.drain(..).collect();
    drop(state);
    let error = Error::backend_unavailable(
        Backend::Threading,
        format!("cannot start a thread: {error}"),
    );
    for work in stranded {
        fail(work, &error);
    }
}

/// Completes `work` without running it, every task failing with `error`.
fn fail(work: Work, error: &Error) {
    match work {
        Work::Job(job) => job.fail(error),
        Work::Call(call) => call(Err(error.clone())),
    }
}

/// Ends the thread's accounting however it leaves `work_loop`, even by a panic (which
/// `Job::run_here` does not let through, but a closure given to `spawn` might).
struct Leaving<'a> {
    shared: &'a Arc<Shared>,
    index: usize,
    /// Set while the thread runs timed work: its entry in `timed`.
    timed: Option<u64>,
}

impl Drop for Leaving<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let mut state = self.shared.lock();
        let replaced = match self.timed {
            Some(serial) => remove_timed(&mut state, serial),
            None => false,
        };
        if replaced {
            state.retiring -= 1;
        } else {
            state.active -= 1;
            state.free_indices.push(self.index);
        }
        // Work queued behind the thread that died still needs one.
        let index = index_for_new_thread(&mut state, self.shared.workers);
        drop(state);
        if let Some(index) = index
            && let Err(error) = start_thread(self.shared, index)
        {
            thread_not_started(self.shared, index, &error);
        }
    }
}

/// Removes the `timed` entry `serial`; whether a replacement took over its thread.
fn remove_timed(state: &mut State, serial: u64) -> bool {
    match state.timed.iter().position(|t| t.serial == serial) {
        Some(at) => state.timed.swap_remove(at).replaced,
        None => false,
    }
}

/// How long a thread that ran out of work keeps looking for more before it parks. Batches of
/// tiny tasks follow one another a few microseconds apart; parking between them costs a
/// futex wake-up on the submitting thread and a trip through the scheduler on this one, each
/// time. Only one thread spins at once, so an idle pool of 1000 threads costs no more CPU
/// than a pool of 2.
const SPIN: Duration = Duration::from_micros(50);

/// Spins until work is handed to this thread (`handed_out` moves from `seen`) or [`SPIN`]
/// has passed, yielding the CPU now and then to threads that have work on it.
fn spin_for_work(shared: &Shared, seen: u64) {
    let began = Instant::now();
    loop {
        for _ in 0..64 {
            if shared.handed_out.load(Ordering::Acquire) != seen {
                return;
            }
            std::hint::spin_loop();
        }
        if began.elapsed() >= SPIN {
            return;
        }
        std::thread::yield_now();
    }
}

thread_local! {
    /// The pool whose worker this thread is (its `Shared`'s address), or 0.
    static SERVING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

fn work_loop(shared: &Arc<Shared>, index: usize) {
    set_worker_identity(Some((Backend::Threading, index)));
    SERVING.with(|cell| cell.set(Arc::as_ptr(shared) as usize));
    let broken = shared
        .init
        .as_ref()
        .and_then(|init| init.run().err())
        .map(|message| WorkerInit::failed(index, &message));
    let mut leaving = Leaving {
        shared,
        index,
        timed: None,
    };
    let mut state = shared.lock();
    state.starting -= 1;
    // Whether the thread looked for work without finding any since it last ran some.
    let mut spun = false;
    loop {
        if let Some(work) = state.queue.pop_front() {
            spun = false;
            // A limit past what `Instant` can hold never comes: such work is not timed.
            if let Some(deadline) = work
                .time_limit()
                .and_then(|limit| Instant::now().checked_add(limit))
            {
                let serial = state.next_serial;
                state.next_serial += 1;
                state.timed.push(Timed {
                    serial,
                    deadline,
                    index,
                    replaced: false,
                });
                leaving.timed = Some(serial);
            }
            // Work queued while this thread was starting or busy found no timed work to wait
            // out then (a future submitted right behind a hung one): it may now.
            let watch = claim_watch(&mut state);
            drop(state);
            if watch {
                start_watch(shared);
            }
            work.run(broken.as_ref());
            state = shared.lock();
            if let Some(serial) = leaving.timed.take()
                && remove_timed(&mut state, serial)
            {
                // Abandoned and replaced: the replacement holds this index now.
                state.retiring -= 1;
                return;
            }
            continue;
        }
        if state.shut_down {
            state.active -= 1;
            state.free_indices.push(index);
            return;
        }
        if !spun && state.spinning + state.handed == 0 {
            // One thread at a time keeps looking for a moment before it parks.
            spun = true;
            state.spinning += 1;
            let seen = shared.handed_out.load(Ordering::Acquire);
            drop(state);
            spin_for_work(shared, seen);
            state = shared.lock();
            if state.handed > 0 {
                state.handed -= 1;
            } else {
                state.spinning -= 1;
            }
            continue;
        }
        spun = false;
        state.idle += 1;
        state = shared
            .work_ready
            .wait(state)
            .unwrap_or_else(PoisonError::into_inner);
        if state.wakeups > 0 {
            state.wakeups -= 1;
        } else {
            // Woken without a wake-up of its own (spurious, or the shutdown broadcast).
            state.idle = state.idle.saturating_sub(1);
        }
    }
}

impl Drop for ThreadPool {
    /// Parked threads end now; busy ones finish the work queued so far, then end.
    fn drop(&mut self) {
        self.shared.lock().shut_down = true;
        self.shared.work_ready.notify_all();
    }
}

impl Pool for ThreadPool {
    fn workers(&self) -> usize {
        self.workers
    }

    fn submit(&self, job: Job) {
        self.queue(Work::Job(job));
    }

    fn target_batch_duration(&self) -> Duration {
        // Queueing a batch and a channel send cost a few microseconds; 2 ms batches hide that
        // while leaving the imbalance at the end of a run at about one batch.
        Duration::from_millis(2)
    }

    fn completion_spin(&self) -> Duration {
        SPIN
    }

    fn max_batch_bytes(&self) -> Option<usize> {
        // 128 KiB of tasks (16384 `u64`s): the calling thread writes a batch and a worker
        // reads it right after; batches this size stay in the cache between the two, and the
        // buffers the dispatcher reuses stay warm. Bigger ones went to memory and back, which
        // cost about a quarter more CPU for 10^6 `x * x` (bench `tiny`). Only tasks under
        // about 120 ns reach this size with 2 ms batches.
        Some(128 * 1024)
    }

    fn verbose_name(&self) -> &'static str {
        "ThreadingBackend"
    }

    fn serves_current_thread(&self) -> bool {
        SERVING.with(|cell| cell.get() == Arc::as_ptr(&self.shared) as usize)
    }
}
