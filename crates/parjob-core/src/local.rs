//! Runs that borrow: [`LocalTask`]s may hold references to the caller's data and return any
//! `Send` value, because [`run_local`] does not return before every task it started has ended.
//! Only in-process workers can run them (the threading and sequential backends).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

use crate::batching::Sizer;
use crate::task::{Delayed, TaskFn};
use crate::worker::{catch_task, panic_place};
use crate::{Error, RunOptions};

/// A call that [`run_local`] (`Parallel::run_local`) can run: it may borrow the caller's data,
/// and its result is any `Send` type (no serde needed).
///
/// Implemented for every `FnOnce() -> R + Send` closure (`move || total(chunk)`), and for
/// [`delayed`](crate::delayed) calls whose arguments and result are `Send`
/// (`delayed(total, chunk)` with `chunk: &[u64]`).
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a task `run_local` can run",
    label = "not a local task",
    note = "`run_local` takes closures `move || f(x)` or `delayed(f, x)` whose captured values, \
            arguments and result are `Send` (they may borrow local data)"
)]
pub trait LocalTask: Send {
    /// What the call returns.
    type Output: Send;
    /// Makes the call.
    fn call(self) -> Self::Output;
}

impl<F, R> LocalTask for F
where
    F: FnOnce() -> R + Send,
    R: Send,
{
    type Output = R;
    #[inline]
    fn call(self) -> R {
        self()
    }
}

impl<F, A, M> LocalTask for Delayed<F, A, M>
where
    F: TaskFn<A, M>,
    A: Send,
    F::Output: Send,
{
    type Output = F::Output;
    #[inline]
    fn call(self) -> F::Output {
        self.call_local()
    }
}

/// Work for an in-process worker: called with `Ok(())` to run, or with the error that keeps
/// the worker from running it (its initializer failed), and called or dropped exactly once.
pub type LocalWork = Box<dyn FnOnce(Result<(), Error>) + Send + 'static>;

/// A batch's outcomes as they come back: its first input index and one outcome per task.
type Outcomes<R> = (usize, Vec<Result<R, Error>>, Duration);

/// Runs `tasks` on the workers `spawn` hands work to, and returns their results in input
/// order, or the first failure: `Parallel::run_local`.
///
/// Tasks are pulled lazily and batched as in [`run`](crate::run), at most
/// `options.pre_dispatch` batches (default `2 * workers`) ahead. On the first failure no new
/// batch starts, queued ones skip their tasks, and running ones finish before the error is
/// returned. A task over `options.timeout` fails with [`Error::Timeout`] once it returns: a
/// thread cannot be stopped, and a task that borrows cannot be left running.
///
/// # Safety
/// `spawn` must call or drop every [`LocalWork`] it is given, eventually (a pool that runs
/// each on a thread of its own, or on the calling thread). The work borrows from the caller
/// with its lifetime erased; `run_local` waits for each to be called or dropped before it
/// returns or unwinds.
///
/// # Errors
/// The first task failure: [`Error::TaskPanicked`], [`Error::Timeout`], or the error of a
/// worker whose initializer failed.
pub unsafe fn run_local<'env, I, T>(
    spawn: &dyn Fn(LocalWork),
    workers: usize,
    tasks: I,
    options: &RunOptions,
) -> Result<Vec<T::Output>, Error>
where
    I: IntoIterator<Item = T>,
    T: LocalTask + 'env,
{
    let mut tasks = tasks.into_iter();
    let workers = workers.max(1);
    let mut sizer = Sizer::new(options.batch_size, Duration::from_millis(2), workers);
    let max_in_flight = options.pre_dispatch.unwrap_or(2 * workers).max(1);
    let (sender, receiver) = mpsc::channel::<Outcomes<T::Output>>();
    let cancelled = Arc::new(AtomicBool::new(false));
    // Waits for every batch still out however this function ends, even by a panic in the
    // caller's iterator.
    let mut out = InFlight {
        receiver,
        count: 0,
        cancelled: Arc::clone(&cancelled),
    };
    let mut next_index = 0;
    let mut exhausted = false;
    let mut ready: BTreeMap<usize, Vec<T::Output>> = BTreeMap::new();
    let mut failure: Option<(usize, Error)> = None;
    loop {
        while !exhausted && failure.is_none() && out.count < max_in_flight {
            let size = sizer.next_size(tasks.size_hint().0);
            let batch: Vec<T> = tasks.by_ref().take(size).collect();
            exhausted = batch.len() < size;
            if batch.is_empty() {
                break;
            }
            let first = next_index;
            next_index += batch.len();
            let work = LocalBatch {
                first,
                tasks: batch,
                timeout: options.timeout,
                cancelled: Arc::clone(&cancelled),
                sender: Some(sender.clone()),
            };
            let work: Box<dyn FnOnce(Result<(), Error>) + Send + 'env> =
                Box::new(move |ready| work.run(ready));
            // SAFETY: only the lifetime changes. The work sends one message when it has been
            // called or dropped (`LocalBatch::drop`, after its tasks are gone), the caller
            // promises `spawn` calls or drops it, and `InFlight` receives that message before
            // this function returns or unwinds, so nothing it borrows is used after 'env.
            let work: LocalWork = unsafe {
                std::mem::transmute::<
                    Box<dyn FnOnce(Result<(), Error>) + Send + 'env>,
                    Box<dyn FnOnce(Result<(), Error>) + Send + 'static>,
                >(work)
            };
            out.count += 1;
            spawn(work);
        }
        if out.count == 0 {
            break;
        }
        let Some((first, outcomes, busy)) = out.next() else {
            break;
        };
        sizer.observe(outcomes.len(), busy);
        let mut values = Vec::with_capacity(outcomes.len());
        for (position, outcome) in outcomes.into_iter().enumerate() {
            match outcome {
                Ok(value) => values.push(value),
                Err(error) => {
                    // The earliest real failure: a task cancelled because of it says less.
                    let index = first + position;
                    let cancelled_only = |e: &Error| matches!(e, Error::Cancelled { .. });
                    let better = match &failure {
                        None => true,
                        Some((at, kept)) => match (cancelled_only(kept), cancelled_only(&error)) {
                            (true, false) => true,
                            (false, true) => false,
                            _ => index < *at,
                        },
                    };
                    if better {
                        failure = Some((index, error));
                    }
                    cancelled.store(true, Ordering::Relaxed);
                    break;
                }
            }
        }
        ready.insert(first, values);
    }
    drop(out);
    if let Some((_, error)) = failure {
        return Err(error);
    }
    let mut results = Vec::with_capacity(next_index);
    for (_, mut values) in ready {
        results.append(&mut values);
    }
    Ok(results)
}

/// Batches sent out and not yet back.
struct InFlight<R> {
    receiver: Receiver<Outcomes<R>>,
    count: usize,
    cancelled: Arc<AtomicBool>,
}

impl<R> InFlight<R> {
    fn next(&mut self) -> Option<Outcomes<R>> {
        let outcomes = self.receiver.recv().ok()?;
        self.count -= 1;
        Some(outcomes)
    }
}

impl<R> Drop for InFlight<R> {
    fn drop(&mut self) {
        self.cancelled.store(true, Ordering::Relaxed);
        // Every batch sends exactly once, so this ends; `recv` fails only if every sender is
        // gone, which means every batch has sent.
        while self.count > 0 && self.next().is_some() {}
    }
}

/// One batch of local tasks, sent to a worker.
struct LocalBatch<T: LocalTask> {
    first: usize,
    tasks: Vec<T>,
    timeout: Option<Duration>,
    cancelled: Arc<AtomicBool>,
    /// Taken when the outcomes are sent.
    sender: Option<Sender<Outcomes<T::Output>>>,
}

impl<T: LocalTask> LocalBatch<T> {
    fn run(mut self, ready: Result<(), Error>) {
        let began = Instant::now();
        let tasks = std::mem::take(&mut self.tasks);
        let mut outcomes = Vec::with_capacity(tasks.len());
        match ready {
            Err(error) => {
                // Before the outcomes are sent: once they are, the caller may free what the
                // tasks borrow.
                drop(tasks);
                outcomes.push(Err(error));
            }
            Ok(()) => {
                for (position, task) in tasks.into_iter().enumerate() {
                    let index = self.first + position;
                    if self.cancelled.load(Ordering::Relaxed) {
                        outcomes.push(Err(Error::cancelled(index)));
                        break;
                    }
                    let started = Instant::now();
                    let outcome = catch_task(|| task.call()).map_err(|m| {
                        let (worker, pid) = panic_place();
                        Error::task_panicked_on(index, m, worker, pid)
                    });
                    let outcome = match (outcome, self.timeout) {
                        (Ok(_), Some(limit)) if started.elapsed() > limit => {
                            Err(Error::timeout_on_return(index, limit, started.elapsed()))
                        }
                        (outcome, _) => outcome,
                    };
                    let failed = outcome.is_err();
                    outcomes.push(outcome);
                    if failed {
                        break;
                    }
                }
            }
        }
        if let Some(sender) = self.sender.take() {
            let _ = sender.send((self.first, outcomes, began.elapsed()));
        }
    }
}

impl<T: LocalTask> Drop for LocalBatch<T> {
    /// A batch dropped unrun (its pool let it go) reports its first task cancelled, after
    /// its tasks are dropped: the caller may free what they borrow once it hears from it.
    fn drop(&mut self) {
        drop(std::mem::take(&mut self.tasks));
        if let Some(sender) = self.sender.take() {
            let _ = sender.send((
                self.first,
                vec![Err(Error::cancelled(self.first))],
                Duration::ZERO,
            ));
        }
    }
}
