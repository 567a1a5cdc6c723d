//! The dispatcher: pulls tasks lazily from the user's iterator, groups them into batches,
//! keeps a bounded number in flight on a [`Pool`], and hands finished batches to the three
//! ways of consuming a run ([`run`], [`RunIter`], [`RunUnordered`]).
//!
//! Data flows one way: user iterator -> batches -> pool -> completions -> reorder -> user.
//! The user's iterator never leaves the calling thread, so it may borrow local data.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use crate::batch::{Destination, ErasedBatch, TypedBatch};
use crate::batching::{BatchSize, Sizer};
use crate::events::{EventSink, Observer};
use crate::pool::{Completion, Job, JobReport, Message, Pool, RunControl, StartStamp};
use crate::progress::Reporter;
use crate::retry::{Retrier, Retry};
use crate::{Error, Task};

/// How one run is carried out: everything `Parallel`'s builder sets apart from the pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOptions {
    /// `n_jobs` as the user gave it, for verbose lines.
    pub n_jobs: i32,
    /// How tasks are grouped.
    pub batch_size: BatchSize,
    /// At most this many batches in flight; `None` for twice the number of workers.
    pub pre_dispatch: Option<usize>,
    /// Per-task timeout.
    pub timeout: Option<Duration>,
    /// joblib's verbosity level: 0 is silent, above 10 reports every batch.
    pub verbose: u32,
    /// Whether to draw a progress bar on stderr (only drawn on a terminal).
    pub progress: bool,
    /// How failed tasks are retried (by default they are not).
    pub retry: Retry,
    /// Who receives the run's [`Event`](crate::Event)s, if anyone.
    pub on_event: Option<EventSink>,
    /// Where to write a Chrome trace of the run; without it, `PARJOB_TRACE` if set.
    pub trace: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            n_jobs: 1,
            batch_size: BatchSize::Auto,
            pre_dispatch: None,
            timeout: None,
            verbose: 0,
            progress: false,
            retry: Retry::default(),
            on_event: None,
            trace: None,
        }
    }
}

/// One finished batch, types restored.
pub(crate) struct Finished<R> {
    pub(crate) seq: u64,
    pub(crate) first_index: usize,
    pub(crate) len: usize,
    pub(crate) values: Vec<R>,
    /// Position within the batch and error, by increasing position.
    pub(crate) failures: Vec<(usize, Error)>,
    /// Whether the batch owned its slice of the in-place output buffer (see `run`).
    pub(crate) in_place: bool,
    /// How many values the batch wrote at the start of that slice.
    pub(crate) written: usize,
}

impl<R> Finished<R> {
    /// The outcome of a run that could not start (an invalid configuration, a closed
    /// executor): its only item is `error`, with index 0.
    fn could_not_start(error: Error) -> Self {
        Finished {
            seq: 0,
            first_index: 0,
            len: 1,
            values: Vec::new(),
            failures: vec![(0, error)],
            in_place: false,
            written: 0,
        }
    }

    /// The earliest failure of a batch that has one (or a task without outcome): failures
    /// are recorded in position order, and tasks left without outcome come after the rest.
    pub(crate) fn into_first_error(self) -> Error {
        let done = self.written + self.values.len() + self.failures.len();
        match self.failures.into_iter().next() {
            Some((_, error)) => error,
            None => Error::Cancelled {
                index: self.first_index + done,
            },
        }
    }

    /// Every task's outcome with its input index, in input order.
    pub(crate) fn into_outcomes(self) -> FinishedIter<R> {
        FinishedIter {
            next_index: self.first_index,
            end: self.first_index + self.len,
            first_index: self.first_index,
            values: self.values.into_iter(),
            failures: self.failures.into_iter().peekable(),
        }
    }
}

pub(crate) struct FinishedIter<R> {
    next_index: usize,
    end: usize,
    first_index: usize,
    values: std::vec::IntoIter<R>,
    failures: std::iter::Peekable<std::vec::IntoIter<(usize, Error)>>,
}

impl<R> Iterator for FinishedIter<R> {
    type Item = (usize, Result<R, Error>);

    fn next(&mut self) -> Option<Self::Item> {
        if self.next_index >= self.end {
            return None;
        }
        let index = self.next_index;
        self.next_index += 1;
        let position = index - self.first_index;
        if self.failures.peek().is_some_and(|(p, _)| *p == position) {
            let (_, error) = self.failures.next()?;
            return Some((index, Err(error)));
        }
        // Tasks without an outcome were never run: the run was cancelled first.
        Some((index, self.values.next().ok_or(Error::Cancelled { index })))
    }
}

/// `duration` in nanoseconds, saturating: `Duration::MAX` as a timeout means "never".
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// A batch running under a timeout the dispatcher watches itself.
struct Watched {
    seq: u64,
    first_index: usize,
    started: Arc<StartStamp>,
    /// The task's limit: its own, or the run's.
    timeout: Duration,
}

pub(crate) struct Dispatcher<I, T: Task> {
    tasks: I,
    exhausted: bool,
    next_index: usize,
    next_seq: u64,
    pool: Arc<dyn Pool>,
    control: Arc<RunControl>,
    reply: Sender<Message>,
    completions: Receiver<Message>,
    /// Batches submitted and neither completed nor abandoned.
    running: usize,
    /// Every batch submitted and not yet back, by number: its first index and length. A
    /// completion is trusted only if it matches one of these.
    outstanding: HashMap<u64, (usize, usize)>,
    max_in_flight: usize,
    watched: Vec<Watched>,
    abandoned: HashSet<u64>,
    sizer: Sizer,
    /// Whether the observer was told the input ran out.
    input_end_reported: bool,
    /// Whether the dispatcher watches timeouts itself (asked of the pool once: an answer that
    /// changed between calls must not make a batch both in place and abandonable).
    watch_timeouts: bool,
    /// How long `wait` polls for a completion before it blocks ([`Pool::completion_spin`]).
    spin: Duration,
    /// The output buffer batches write into directly, when `run` asked for one.
    in_place: Option<InPlace<T::Output>>,
    /// Emptied task buffers of finished batches, to fill again.
    spare_buffers: Vec<Vec<T>>,
    /// Events, insights and the trace, when anyone listens.
    pub(crate) observer: Option<Box<Observer>>,
    /// Retries, when the run has any.
    retrier: Option<Box<Retrier<T>>>,
    /// Batches ready for the consumer that `wait` has not returned yet (retries resolved).
    ready: VecDeque<Finished<T::Output>>,
    marker: std::marker::PhantomData<fn() -> T>,
}

impl<I, T> Dispatcher<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    pub(crate) fn new(pool: Arc<dyn Pool>, tasks: I, options: &RunOptions) -> Self {
        let workers = pool.workers().max(1);
        let watch_timeouts =
            (options.timeout.is_some() || T::HAS_OWN_TIMEOUT) && !pool.enforces_timeout();
        // A thread cannot be stopped, so a timed-out batch is abandoned whole: keep batches to
        // one task so that a timeout abandons only the task that caused it. A task with a
        // limit of its own runs alone under it.
        let batch_size = if watch_timeouts || T::HAS_OWN_TIMEOUT {
            BatchSize::Fixed(1)
        } else {
            options.batch_size
        };
        let (reply, completions) = mpsc::channel();
        let total_hint = match tasks.size_hint() {
            (low, Some(high)) if low == high => Some(low),
            _ => None,
        };
        let max_in_flight = options
            .pre_dispatch
            .unwrap_or_else(|| pool.default_pre_dispatch())
            .max(1);
        let reporter = Reporter::new(
            options.n_jobs,
            options.verbose,
            options.progress,
            total_hint,
            max_in_flight,
        );
        let mut observer = Observer::new(options, reporter);
        if let Some(observer) = observer.as_mut() {
            observer.started(pool.verbose_name(), workers);
        }
        Dispatcher {
            tasks,
            exhausted: false,
            next_index: 0,
            next_seq: 0,
            sizer: Sizer::new(batch_size, pool.target_batch_duration(), workers).with_max_auto(
                pool.max_batch_bytes()
                    .map_or(usize::MAX, |bytes| bytes / std::mem::size_of::<T>().max(1)),
            ),
            control: Arc::new(RunControl::new(options.timeout)),
            // Spinning longer than this would only burn CPU a blocked wait leaves free.
            spin: pool.completion_spin().min(Duration::from_millis(1)),
            pool,
            reply,
            completions,
            running: 0,
            outstanding: HashMap::new(),
            max_in_flight,
            watched: Vec::new(),
            abandoned: HashSet::new(),
            input_end_reported: false,
            watch_timeouts,
            in_place: None,
            spare_buffers: Vec::new(),
            observer,
            retrier: Retrier::new(options.retry),
            ready: VecDeque::new(),
            marker: std::marker::PhantomData,
        }
    }

    /// Makes batches that fall within the first `len` input positions write their values
    /// straight into one output vector, at their input index, instead of returning them; `run`
    /// takes it with [`take_in_place`](Dispatcher::take_in_place). Does nothing when timeouts
    /// are watched (an abandoned batch could write after the run returned) or when `len`
    /// values do not fit in memory. The dispatcher owns that vector, and its `Drop` waits for
    /// every batch that may write into it before freeing it.
    pub(crate) fn collect_in_place(&mut self, len: usize) {
        // With retries a batch's values are put together from several attempts.
        if self.watch_timeouts || self.retrier.is_some() {
            return;
        }
        let mut buffer = Vec::new();
        if buffer.try_reserve_exact(len).is_ok() {
            self.in_place = Some(InPlace {
                buffer,
                capacity: len,
                out: 0,
                placed: Vec::new(),
            });
        }
    }

    /// The in-place output, once every batch has come back complete: its length is the number
    /// of positions the in-place batches covered, all written.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] if the written slices do not cover that prefix exactly (which
    /// the dispatcher's own bookkeeping rules out; checked because `set_len` relies on it).
    pub(crate) fn take_in_place(&mut self) -> Result<Vec<T::Output>, Error> {
        let Some(in_place) = self.in_place.as_mut() else {
            return Ok(Vec::new());
        };
        in_place.placed.sort_unstable();
        let mut covered = 0;
        for &(first, count) in &in_place.placed {
            if first != covered || in_place.out != 0 {
                return Err(Error::InvalidConfig(
                    "internal: batches written in place do not cover the output's start".into(),
                ));
            }
            covered += count;
        }
        let mut buffer = std::mem::take(&mut in_place.buffer);
        in_place.placed.clear();
        // SAFETY: slots `0..covered` were written by batches that all came back (`out` is 0)
        // and tile that range exactly (checked above); nothing else owns them now that
        // `placed` is cleared.
        unsafe { buffer.set_len(covered) };
        Ok(buffer)
    }

    pub(crate) fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }

    pub(crate) fn running(&self) -> usize {
        self.running
    }

    /// Batches handed out so far (their `seq` values are `0..dispatched()`).
    pub(crate) fn dispatched(&self) -> u64 {
        self.next_seq
    }

    pub(crate) fn cancel(&mut self) {
        self.control.cancel();
    }

    /// Makes the run's batches stop at their first failure ([`RunControl::task_failed`]):
    /// for `run`, which ends there anyway, unless failed tasks are retried. Only before the
    /// first batch is out (the control is not shared yet).
    pub(crate) fn stop_at_first_failure(&mut self) {
        if self.retrier.is_none()
            && let Some(control) = Arc::get_mut(&mut self.control)
        {
            control.stop_at_first_failure();
        }
    }

    fn watches_timeouts(&self) -> bool {
        self.watch_timeouts
    }

    /// Pulls the next batch from the input and submits it. `false` once the input is empty.
    pub(crate) fn dispatch_one(&mut self) -> bool {
        if self.exhausted || self.control.is_cancelled() {
            return false;
        }
        let size = self.sizer.next_size(self.tasks.size_hint().0);
        // A fixed batch size is the user's and may be huge: reserve no more than an auto
        // batch would hold, and let the vector grow if the input really has that many.
        let room = size.min(crate::batching::MAX_AUTO_BATCH);
        let mut tasks = match self.spare_buffers.pop() {
            Some(spare) if spare.capacity() >= room => spare,
            // Growing an empty spare would have `realloc` copy its whole old capacity.
            _ => Vec::with_capacity(room),
        };
        tasks.extend(self.tasks.by_ref().take(size));
        if tasks.len() < size {
            self.exhausted = true;
        }
        if tasks.is_empty() {
            self.report_input_end();
            return false;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let first_index = self.next_index;
        self.next_index += tasks.len();
        if let Some(observer) = self.observer.as_mut() {
            observer.dispatched(seq, first_index, tasks.len(), 1);
        }
        if self.exhausted {
            self.report_input_end();
        }
        if let Some(retrier) = self.retrier.as_mut() {
            retrier.keep_copies(seq, &tasks);
        }
        let (control, timeout) = self.control_for(&tasks);
        let started = self.watch(seq, first_index, timeout);
        let batch = match self.in_place.as_mut() {
            Some(in_place)
                if started.is_none() && first_index + tasks.len() <= in_place.capacity =>
            {
                let start = in_place.buffer.as_mut_ptr();
                // SAFETY: the slots `first_index..first_index + len` are within the buffer's
                // capacity (checked above) and belong to this batch alone (batches cover
                // disjoint index ranges). The buffer outlives the batch: the dispatcher owns
                // it, and neither `take_in_place` (which needs `out == 0`) nor `Drop` (which
                // waits until `out == 0`) lets it go while this batch is out. A watched
                // batch (`started`), which may be abandoned, never gets a destination.
                let destination = unsafe {
                    Destination::new(std::ptr::NonNull::new_unchecked(start.add(first_index)))
                };
                in_place.out += 1;
                Box::new(TypedBatch::with_destination(
                    first_index,
                    tasks,
                    destination,
                ))
            }
            _ => Box::new(TypedBatch::new(first_index, tasks)),
        };
        self.outstanding
            .insert(seq, (first_index, self.next_index - first_index));
        let job = Job::new(seq, batch, control, started, self.reply.clone());
        self.running += 1;
        self.pool.submit(job);
        true
    }

    /// The control a batch runs under, and the time limit of its task: the run's, or, for a
    /// task with a limit of its own (alone in its batch), a control carrying that limit.
    fn control_for(&self, tasks: &[T]) -> (Arc<RunControl>, Option<Duration>) {
        if T::HAS_OWN_TIMEOUT
            && let [task] = tasks
            && let Some(limit) = task.own_timeout()
        {
            return (
                Arc::new(self.control.with_timeout(Some(limit))),
                Some(limit),
            );
        }
        (Arc::clone(&self.control), self.control.timeout())
    }

    /// The start stamp of a batch whose time the dispatcher watches itself, if it does.
    fn watch(
        &mut self,
        seq: u64,
        first_index: usize,
        timeout: Option<Duration>,
    ) -> Option<Arc<StartStamp>> {
        let timeout = timeout.filter(|_| self.watches_timeouts())?;
        let started = Arc::new(StartStamp::new(0));
        self.watched.push(Watched {
            seq,
            first_index,
            started: Arc::clone(&started),
            timeout,
        });
        Some(started)
    }

    /// Sends the retries whose backoff is over (or, once the run is stopped, gives up on
    /// them); returns how long until the next one is due.
    fn send_due_retries(&mut self) -> Option<Duration> {
        let retrier = self.retrier.as_mut()?;
        let cancelled = self.control.is_cancelled();
        let (due, wake) = retrier.take_due(cancelled);
        for retry in due {
            match retry {
                crate::retry::Due::Send {
                    seq,
                    index,
                    attempt,
                    waited,
                    task,
                } => {
                    if let Some(observer) = self.observer.as_mut() {
                        observer.retried(index, attempt, waited);
                        observer.dispatched(seq, index, 1, attempt);
                    }
                    let tasks = vec![task];
                    let (control, timeout) = self.control_for(&tasks);
                    let started = self.watch(seq, index, timeout);
                    self.outstanding.insert(seq, (index, 1));
                    let batch = Box::new(TypedBatch::new(index, tasks));
                    let job = Job::new(seq, batch, control, started, self.reply.clone());
                    self.pool.submit(job);
                }
                crate::retry::Due::Resolved(finished) => {
                    self.running -= 1;
                    self.ready.push_back(finished);
                }
            }
        }
        wake
    }

    /// A batch (or a retry) that came back: reports it, and either hands it to the consumer
    /// (through `ready`) or holds it while its failed tasks are retried.
    fn settle(
        &mut self,
        finished: Finished<T::Output>,
        worker: Option<usize>,
        busy: Duration,
        report: Option<Box<JobReport>>,
    ) {
        if let Some(observer) = self.observer.as_mut() {
            let (transport, changes) = match report {
                Some(report) => (report.transport, report.changes),
                None => (None, Vec::new()),
            };
            observer.completed(
                finished.seq,
                finished.first_index,
                finished.len,
                &finished.failures,
                worker,
                busy,
                transport,
                changes,
            );
        }
        let Some(retrier) = self.retrier.as_mut() else {
            if let Some(observer) = self.observer.as_mut() {
                for (position, error) in &finished.failures {
                    observer.task_failed(finished.first_index + position, 1, error, false);
                }
            }
            self.running -= 1;
            self.ready.push_back(finished);
            return;
        };
        let cancelled = self.control.is_cancelled();
        let settled = retrier.settle(finished, cancelled, self.observer.as_deref_mut());
        if let Some(finished) = settled {
            self.running -= 1;
            self.ready.push_back(finished);
        }
    }

    /// Waits for the next finished batch; `None` when none is running.
    pub(crate) fn wait(&mut self) -> Option<Finished<T::Output>> {
        loop {
            if let Some(finished) = self.ready.pop_front() {
                return Some(finished);
            }
            if self.running == 0 {
                return None;
            }
            let retry_wake = self.send_due_retries();
            if !self.ready.is_empty() {
                continue;
            }
            let message = if self.watches_timeouts() || retry_wake.is_some() {
                let mut limit = retry_wake.unwrap_or(Duration::MAX);
                if self.watches_timeouts() {
                    limit = limit.min(self.next_timeout_check());
                }
                match self.completions.recv_timeout(limit) {
                    Ok(message) => message,
                    Err(RecvTimeoutError::Timeout) => {
                        if self.watches_timeouts()
                            && let Some(finished) = self.abandon_timed_out()
                        {
                            self.settle(finished, None, Duration::ZERO, None);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Disconnected) => return None,
                }
            } else {
                self.recv()?
            };
            let mut completion = match message {
                Message::Done(completion) => completion,
                Message::Note {
                    seq,
                    changes,
                    crash,
                } => {
                    self.noted(seq, changes, crash);
                    continue;
                }
            };
            if !self.take_outstanding(&completion) {
                continue;
            }
            if self.abandoned.remove(&completion.seq) {
                continue;
            }
            let timeout = self
                .watched
                .iter()
                .find(|w| w.seq == completion.seq)
                .map(|w| w.timeout);
            self.watched.retain(|w| w.seq != completion.seq);
            let (worker, busy) = (completion.worker, completion.busy);
            let report = completion.report.take();
            let finished = self.restore(completion, timeout);
            self.settle(finished, worker, busy, report);
        }
    }

    /// The next completion, polled for up to `spin` before blocking: a thread woken for
    /// each completion costs a system call on the worker and a trip through the scheduler
    /// here, which add up over the short batches auto batching starts with.
    fn recv(&self) -> Option<Message> {
        if !self.spin.is_zero() {
            let began = Instant::now();
            loop {
                for _ in 0..64 {
                    match self.completions.try_recv() {
                        Ok(message) => return Some(message),
                        Err(TryRecvError::Disconnected) => return None,
                        Err(TryRecvError::Empty) => std::hint::spin_loop(),
                    }
                }
                if began.elapsed() >= self.spin {
                    break;
                }
                // Workers may share this CPU: let them run.
                std::thread::yield_now();
            }
        }
        // The dispatcher holds a sender itself, so this only fails if a pool dropped a job
        // without completing it while nothing else runs: treat as no work.
        self.completions.recv().ok()
    }

    fn restore(
        &mut self,
        completion: Completion,
        timeout: Option<Duration>,
    ) -> Finished<T::Output> {
        let len = completion.batch.len();
        self.sizer
            .observe(completion.batch.outcomes_len(), completion.busy);
        let mut batch = completion
            .batch
            .into_any()
            .downcast::<TypedBatch<T>>()
            .expect("a pool returns the batch the dispatcher gave it, so the type matches");
        let buffer = batch.take_buffer();
        if buffer.capacity() > 0 && self.spare_buffers.len() < self.max_in_flight {
            self.spare_buffers.push(buffer);
        }
        let in_place = batch.destination.is_some();
        if in_place {
            self.place(&mut batch);
        }
        let mut finished = Finished {
            seq: completion.seq,
            first_index: batch.first_index,
            len,
            in_place,
            written: batch.written,
            values: batch.values,
            failures: batch.failures,
        };
        // A watched task (alone in its batch) that came back after its timeout failed all the
        // same: the sequential pool runs it on this very thread, so only now can it be seen,
        // and on threads its completion may beat the timer.
        if let Some(timeout) = timeout
            && len == 1
            && completion.busy > timeout
        {
            finished.values.clear();
            finished.failures = vec![(
                0,
                Error::timeout_on_return(finished.first_index, timeout, completion.busy),
            )];
        }
        finished
    }

    /// How long to wait before looking for timed-out tasks again.
    fn next_timeout_check(&self) -> Duration {
        let timeout = self.control.timeout().unwrap_or(Duration::from_secs(1));
        let now = self.control_nanos();
        let soonest = self
            .watched
            .iter()
            .filter_map(|w| match w.started.load(Ordering::Acquire) {
                0 => None,
                started => Some((started - 1).saturating_add(nanos(w.timeout))),
            })
            .min();
        let poll = timeout
            .min(Duration::from_millis(50))
            .max(Duration::from_millis(1));
        match soonest {
            Some(deadline) => Duration::from_nanos(deadline.saturating_sub(now)).min(poll),
            None => poll,
        }
    }

    /// Now, on the clock `Job::mark_started` uses.
    fn control_nanos(&self) -> u64 {
        self.control.nanos_since_start()
    }

    fn abandon_timed_out(&mut self) -> Option<Finished<T::Output>> {
        let now = self.control_nanos();
        let position = self.watched.iter().position(|w| {
            let started = w.started.load(Ordering::Acquire);
            started != 0 && now.saturating_sub(started - 1) >= nanos(w.timeout)
        })?;
        let watched = self.watched.swap_remove(position);
        let timeout = watched.timeout;
        self.abandoned.insert(watched.seq);
        Some(Finished {
            seq: watched.seq,
            first_index: watched.first_index,
            len: 1,
            values: Vec::new(),
            in_place: false,
            written: 0,
            failures: vec![(
                0,
                Error::timeout_left_running(watched.first_index, timeout, watched.started.worker()),
            )],
        })
    }

    pub(crate) fn finish_report(&mut self, ok: bool) {
        if let Some(observer) = self.observer.as_mut() {
            observer.finished(ok);
        }
    }

    /// Tells the observer, once, how many tasks the input held.
    fn report_input_end(&mut self) {
        if !std::mem::replace(&mut self.input_end_reported, true)
            && let Some(observer) = self.observer.as_mut()
        {
            observer.input_ended(self.next_index);
        }
    }
}

impl<I, T: Task> Dispatcher<I, T> {
    /// Whether `completion` is a batch this dispatcher sent and has not had back: only then
    /// are its outcomes and its count of values written in place trusted. Jobs are made here
    /// alone and complete once, so this holds by construction; the check keeps it so.
    /// News of job `seq`, still out, from its pool ([`Job::note_now`]): its worker events go
    /// to the observer now.
    fn noted(
        &mut self,
        seq: u64,
        changes: Vec<(std::time::Instant, crate::WorkerChange)>,
        crash: Option<Error>,
    ) {
        // Trusted only from a job the run has out, like a completion.
        if !self.outstanding.contains_key(&seq) {
            return;
        }
        if let Some(observer) = self.observer.as_mut() {
            observer.noted(changes, crash);
        }
    }

    fn take_outstanding(&mut self, completion: &Completion) -> bool {
        match self.outstanding.get(&completion.seq) {
            Some(&(first_index, len))
                if completion.batch.first_index() == first_index
                    && completion.batch.len() == len =>
            {
                self.outstanding.remove(&completion.seq);
                true
            }
            _ => false,
        }
    }
}

impl<I, T: Task> Drop for Dispatcher<I, T> {
    fn drop(&mut self) {
        if let Some(observer) = self.observer.as_mut() {
            // A run that stopped early (a failure, a dropped iterator); nothing if it finished.
            observer.finished(false);
        }
        let Some(out) = self.in_place.as_ref().map(|in_place| in_place.out) else {
            return;
        };
        if out > 0 {
            // Batches still out write into the output buffer, which is freed with the
            // dispatcher: stop them and wait (a failed run, or unwinding from a panic in the
            // user's iterator or in a pool).
            self.control.cancel();
            while self
                .in_place
                .as_ref()
                .is_some_and(|in_place| in_place.out > 0)
            {
                let Ok(message) = self.completions.recv() else {
                    break;
                };
                let Message::Done(completion) = message else {
                    continue;
                };
                if !self.take_outstanding(&completion) {
                    continue;
                }
                if let Ok(mut batch) = completion.batch.into_any().downcast::<TypedBatch<T>>()
                    && batch.destination.is_some()
                {
                    self.place(&mut batch);
                }
            }
        }
        if let Some(in_place) = self.in_place.as_mut() {
            in_place.drop_placed();
        }
    }
}

/// The output vector in-place batches write into, and what they wrote.
struct InPlace<R> {
    /// Length 0; its capacity holds the values batches wrote (see `placed`).
    buffer: Vec<R>,
    /// How many input positions it covers.
    capacity: usize,
    /// Batches with a destination in it that have not come back.
    out: usize,
    /// Initialised slices, as (input index, count), of batches that came back.
    placed: Vec<(usize, usize)>,
}

impl<R> InPlace<R> {
    /// Drops the values batches wrote before a run failed.
    fn drop_placed(&mut self) {
        for (first, count) in self.placed.drain(..) {
            if !std::mem::needs_drop::<R>() {
                continue;
            }
            // SAFETY: a batch wrote `count` values from index `first`, within the capacity,
            // and came back; `buffer`'s length is 0 and `placed` forgets the slice here, so
            // these values are dropped exactly once.
            unsafe {
                let start = self.buffer.as_mut_ptr().add(first);
                std::ptr::drop_in_place(std::ptr::slice_from_raw_parts_mut(start, count));
            }
        }
    }
}

impl<I, T: Task> Dispatcher<I, T> {
    /// Records what an in-place batch that came back wrote, first moving into place the
    /// values a pool that ran it elsewhere returned (when the batch is complete).
    fn place(&mut self, batch: &mut TypedBatch<T>) {
        let Some(in_place) = self.in_place.as_mut() else {
            return;
        };
        in_place.out = in_place.out.saturating_sub(1);
        let complete = batch.failures.is_empty()
            && batch.written + batch.values.len() == ErasedBatch::len(&*batch);
        if complete && !batch.values.is_empty() {
            let at = batch.first_index + batch.written;
            // SAFETY: slots `at..at + values.len()` are this batch's (`written + values.len()`
            // is its length), in bounds, and not yet initialised (`run_here` writes from
            // `written` on, and writes in place only while `values` is empty); `set_len(0)`
            // hands the moved values' ownership to the buffer.
            unsafe {
                let source = batch.values.as_ptr();
                let target = in_place.buffer.as_mut_ptr().add(at);
                std::ptr::copy_nonoverlapping(source, target, batch.values.len());
                batch.written += batch.values.len();
                batch.values.set_len(0);
            }
        }
        in_place.placed.push((batch.first_index, batch.written));
    }
}

/// Runs every task and returns the results in input order, or the first failure.
///
/// On the first failure no new task is dispatched, tasks already queued are skipped, running
/// ones finish (or, after a timeout on threads, are left behind), and the error is returned.
///
/// When the input knows its exact length, in-process batches write their values straight
/// into the output vector at their input index (as rayon's `collect` does), which saves
/// copying every result once more at the end; other batches are appended in order.
pub fn run<I, T>(
    pool: Arc<dyn Pool>,
    tasks: I,
    options: &RunOptions,
) -> Result<Vec<T::Output>, Error>
where
    I: IntoIterator<Item = T>,
    T: Task,
{
    let tasks = tasks.into_iter();
    let exact_len = match tasks.size_hint() {
        (low, Some(high)) if low == high => Some(low),
        _ => None,
    };
    let mut dispatcher = Dispatcher::new(pool, tasks, options);
    dispatcher.stop_at_first_failure();
    // An input may claim a length no memory can hold (`0..usize::MAX`): then the results are
    // gathered batch by batch instead, for as long as the run goes.
    if let Some(len) = exact_len {
        dispatcher.collect_in_place(len);
    }
    // Values of batches that did not write in place, by batch number.
    let mut appended: BTreeMap<u64, Vec<T::Output>> = BTreeMap::new();
    loop {
        while dispatcher.running() < dispatcher.max_in_flight() && dispatcher.dispatch_one() {}
        let Some(finished) = dispatcher.wait() else {
            break;
        };
        let complete = finished.failures.is_empty()
            && finished.written + finished.values.len() == finished.len;
        if !complete {
            // Deterministic: the failure of the lowest task index among every batch that had
            // come back once the run stopped (a stopped task, `Cancelled`, only if nothing
            // else failed), not whichever batch happened to come back first.
            let mut error = finished.into_first_error();
            dispatcher.cancel();
            if !matches!(error, Error::Timeout { killed: false, .. }) {
                while let Some(finished) = dispatcher.wait() {
                    let complete = finished.failures.is_empty()
                        && finished.written + finished.values.len() == finished.len;
                    if !complete {
                        error = earlier_failure(error, finished.into_first_error());
                    }
                }
            }
            // Dropping the dispatcher waits for any batch still writing in place, then drops
            // the values written so far.
            drop(dispatcher);
            return Err(error);
        }
        if !finished.in_place {
            appended.insert(finished.seq, finished.values);
        }
    }
    dispatcher.finish_report(true);
    // In-place batches form a prefix of the input (a batch writes in place only if it ends
    // within the announced length, and batches come in input order), all of it written.
    let mut out = dispatcher.take_in_place()?;
    drop(dispatcher);
    for (_, mut values) in appended {
        if out.is_empty() && values.capacity() >= out.capacity() {
            out = values;
        } else {
            out.append(&mut values);
        }
    }
    Ok(out)
}

/// Of two failures, the one to report: a task that failed before one that was only stopped
/// (`Cancelled`), else the lower task index.
fn earlier_failure(a: Error, b: Error) -> Error {
    let rank = |e: &Error| {
        (
            matches!(e, Error::Cancelled { .. }),
            e.task_index().unwrap_or(usize::MAX),
        )
    };
    if rank(&b) < rank(&a) { b } else { a }
}

/// Runs every task and returns every outcome, in input order: the keep-going form of [`run`].
/// A failed task is its `Err`, in its place, and the run goes on; exactly one outcome per
/// input task. Pulls the input as lazily as `run`.
pub fn run_results<I, T>(
    pool: Arc<dyn Pool>,
    tasks: I,
    options: &RunOptions,
) -> Vec<Result<T::Output, Error>>
where
    I: IntoIterator<Item = T>,
    T: Task,
{
    RunIter::new(pool, tasks, options).collect()
}

/// What [`RunIter`] and [`RunUnordered`] share: a dispatcher kept topped up, and the outcomes
/// of finished batches handed out one task at a time, either in input order or as batches
/// finish.
struct Stream<I, T: Task> {
    /// `None` for a run that could not start.
    dispatcher: Option<Dispatcher<I, T>>,
    /// Whether outcomes come in input order (batches held in `ready` until their turn).
    ordered: bool,
    /// Batches that finished before their turn, by number (ordered streams only).
    ready: BTreeMap<u64, Finished<T::Output>>,
    /// The number of the batch whose outcomes come next (ordered streams only).
    next_seq: u64,
    current: Option<FinishedIter<T::Output>>,
    done: bool,
}

impl<I, T> Stream<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    fn new(pool: Arc<dyn Pool>, tasks: I, options: &RunOptions, ordered: bool) -> Self {
        let mut stream = Stream {
            dispatcher: Some(Dispatcher::new(pool, tasks, options)),
            ordered,
            ready: BTreeMap::new(),
            next_seq: 0,
            current: None,
            done: false,
        };
        stream.top_up();
        stream
    }

    fn failed(error: Error) -> Self {
        Stream {
            dispatcher: None,
            ordered: true,
            ready: BTreeMap::new(),
            next_seq: 0,
            current: Some(Finished::could_not_start(error).into_outcomes()),
            done: true,
        }
    }

    /// Keeps `max_in_flight` batches dispatched and not yet handed out: an ordered stream
    /// counts the batches held for their turn too, so that a slow batch bounds the look-ahead.
    fn top_up(&mut self) {
        let Some(dispatcher) = self.dispatcher.as_mut() else {
            return;
        };
        let max = dispatcher.max_in_flight();
        if self.ordered {
            while dispatcher.dispatched() - self.next_seq < max as u64 && dispatcher.dispatch_one()
            {
            }
        } else {
            while dispatcher.running() < max && dispatcher.dispatch_one() {}
        }
    }

    /// Outcomes of the batch being handed out that are still to come: `next_outcome`
    /// returns them without waiting.
    fn ready_now(&self) -> usize {
        self.current
            .as_ref()
            .map_or(0, |current| current.end.saturating_sub(current.next_index))
    }

    fn next_outcome(&mut self) -> Option<(usize, Result<T::Output, Error>)> {
        loop {
            if let Some(item) = self.current.as_mut().and_then(Iterator::next) {
                return Some(item);
            }
            self.current = None;
            if let Some(finished) = self.ready.remove(&self.next_seq) {
                // No top-up here: it comes before the next wait. On the sequential pool a
                // dispatch runs the batch at once, which would delay this result.
                self.next_seq += 1;
                self.current = Some(finished.into_outcomes());
                continue;
            }
            if self.done {
                return None;
            }
            self.top_up();
            let dispatcher = self.dispatcher.as_mut()?;
            match dispatcher.wait() {
                Some(finished) if self.ordered => {
                    self.ready.insert(finished.seq, finished);
                }
                Some(finished) => self.current = Some(finished.into_outcomes()),
                None => {
                    self.done = true;
                    dispatcher.finish_report(true);
                }
            }
        }
    }
}

impl<I, T: Task> Drop for Stream<I, T> {
    fn drop(&mut self) {
        if let Some(dispatcher) = &self.dispatcher {
            dispatcher.control.cancel();
        }
    }
}

/// The results of a run in input order, each as soon as it and all before it are done:
/// joblib's `return_as="generator"`. Made by `Parallel::run_iter`.
///
/// A failed task yields its `Err` and the run goes on. Dropping the iterator stops pulling
/// tasks from the input and skips the queued ones.
pub struct RunIter<I, T: Task>(Stream<I, T>);

impl<I, T> RunIter<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    /// Starts a run on `pool`.
    pub fn new(
        pool: Arc<dyn Pool>,
        tasks: impl IntoIterator<IntoIter = I>,
        options: &RunOptions,
    ) -> Self {
        RunIter(Stream::new(pool, tasks.into_iter(), options, true))
    }

    /// A run that could not start: `error` is its only item.
    pub fn failed(error: Error) -> Self {
        RunIter(Stream::failed(error))
    }
}

impl<I, T> Iterator for RunIter<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_outcome().map(|(_, outcome)| outcome)
    }
}

/// The results of a run as `(input index, result)` in completion order. Made by
/// `Parallel::run_unordered`.
///
/// A failed task yields its `Err` and the run goes on. Dropping the iterator stops pulling
/// tasks from the input and skips the queued ones.
pub struct RunUnordered<I, T: Task>(Stream<I, T>);

impl<I, T> RunUnordered<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    /// Starts a run on `pool`.
    pub fn new(
        pool: Arc<dyn Pool>,
        tasks: impl IntoIterator<IntoIter = I>,
        options: &RunOptions,
    ) -> Self {
        RunUnordered(Stream::new(pool, tasks.into_iter(), options, false))
    }

    /// A run that could not start: `(0, Err(error))` is its only item.
    pub fn failed(error: Error) -> Self {
        RunUnordered(Stream::failed(error))
    }
}

impl<I, T> Iterator for RunUnordered<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    type Item = (usize, Result<T::Output, Error>);

    fn next(&mut self) -> Option<Self::Item> {
        self.0.next_outcome()
    }

    /// The lower bound is the number of outcomes ready now, of a batch that came back: that
    /// many calls of `next` return without waiting (a caller that batches its own work on
    /// the results, as a `Memory` storing them does, finishes it before one that may wait).
    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.0.ready_now(), None)
    }
}

#[cfg(test)]
mod ready_now_tests {
    use std::sync::Arc;

    use crate::{BatchSize, RunOptions, RunUnordered, SequentialPool, delayed};

    fn double(x: u32) -> u32 {
        x * 2
    }

    /// `size_hint` counts the outcomes of the batch being handed out, which come without
    /// waiting: a caller batching its own work on the results (a `Memory` storing them)
    /// relies on it to finish that work before a call that may wait.
    #[test]
    fn an_unordered_run_hints_the_outcomes_ready_now() {
        let options = RunOptions {
            batch_size: BatchSize::Fixed(4),
            ..RunOptions::default()
        };
        let tasks = (0..10u32).map(|i| delayed(double, i));
        let mut run = RunUnordered::new(Arc::new(SequentialPool), tasks, &options);
        assert_eq!(
            run.size_hint().0,
            0,
            "nothing is handed out before the first call"
        );
        let mut hints = Vec::new();
        while run.next().is_some() {
            hints.push(run.size_hint().0);
        }
        assert_eq!(hints, [3, 2, 1, 0, 3, 2, 1, 0, 1, 0]);
    }
}
