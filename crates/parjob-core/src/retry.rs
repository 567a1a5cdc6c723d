//! Retries: which failures earn a task another attempt, how many, and how long to wait first.
//!
//! The dispatcher does the retrying, so every [`Pool`](crate::Pool) gets it without a change:
//! a batch comes back with a failure the policy calls retryable, the dispatcher holds the
//! batch back from the consumer, sends a copy of the failed task again as a batch of its own
//! (after the backoff), and puts its outcome in its place. What counts as retryable is decided
//! in one place, [`Retry::retries_on`]: a new cause (an MPI rank lost with its node) is one
//! more arm there.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::dispatch::Finished;
use crate::events::Observer;
use crate::{Error, Task};

/// Retry batches are numbered from here, apart from the run's own batches (`0..`).
pub(crate) const RETRY_SEQ_BASE: u64 = 1 << 63;

/// How failed tasks are retried: `Parallel::retries(n)` or `Parallel::retry(Retry::new(n)...)`.
///
/// A task whose worker crashed or timed out (and, with [`on_panic`](Retry::on_panic), one that
/// panicked) runs again, up to `retries` more times, each time after a wait that starts at
/// [`backoff`](Retry::backoff) and doubles up to [`max_backoff`](Retry::max_backoff). A task
/// that then succeeds yields its value in its place; one that fails every time fails with
/// [`Error::RetriesExhausted`], listing every attempt.
///
/// ```
/// use std::time::Duration;
/// use parjob::{delayed, Parallel, Retry};
///
/// fn square(x: u64) -> u64 { x * x }
/// let parallel = Parallel::new(2)
///     .retry(Retry::new(3).backoff(Duration::from_millis(10)).on_panic(true));
/// assert_eq!(parallel.run((0..4u64).map(|i| delayed(square, i)))?, [0, 1, 4, 9]);
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retry {
    /// How many times a task may run again after its first attempt (0: never).
    pub retries: u32,
    /// The wait before the first retry of a task; each further retry waits twice as long.
    pub backoff: Duration,
    /// The longest wait between two attempts.
    pub max_backoff: Duration,
    /// Whether a panic is retried too (by default only crashes and timeouts are: a panic is
    /// usually the task's own bug and fails the same way again).
    pub on_panic: bool,
}

impl Default for Retry {
    /// No retries.
    fn default() -> Self {
        Retry::new(0)
    }
}

impl Retry {
    /// Up to `retries` more attempts per task, with no wait between them, on crashes and
    /// timeouts.
    pub fn new(retries: u32) -> Retry {
        Retry {
            retries,
            backoff: Duration::ZERO,
            max_backoff: Duration::from_secs(60),
            on_panic: false,
        }
    }

    /// Waits `first` before a task's first retry, doubling for each further one.
    pub fn backoff(mut self, first: Duration) -> Retry {
        self.backoff = first;
        self
    }

    /// Never waits longer than `max` between two attempts.
    pub fn max_backoff(mut self, max: Duration) -> Retry {
        self.max_backoff = max;
        self
    }

    /// Retries panics too.
    pub fn on_panic(mut self, yes: bool) -> Retry {
        self.on_panic = yes;
        self
    }

    /// Whether a task that failed with `error` may run again: its worker crashed (or could
    /// not be reached), it overran its time limit, or, if asked, it panicked. Failures of the
    /// run itself (cancelled, bad configuration) and codec errors, which fail the same way
    /// every time, are not retried.
    pub fn retries_on(&self, error: &Error) -> bool {
        match error {
            Error::WorkerCrashed { .. } | Error::Timeout { .. } => true,
            Error::TaskPanicked { .. } => self.on_panic,
            // The same failures on an MPI rank: the rank says where, the error is the same.
            Error::OnRank { error, .. } => self.retries_on(error),
            _ => false,
        }
    }

    /// The wait before attempt `attempt + 1` of a task (`attempt` >= 1 attempts made so far).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        if self.backoff.is_zero() {
            return Duration::ZERO;
        }
        let doublings = attempt.saturating_sub(1).min(31);
        self.backoff
            .saturating_mul(1u32 << doublings)
            .min(self.max_backoff)
    }
}

/// A failed task waiting for its backoff to end before its next attempt.
struct Waiting<T> {
    at: Instant,
    waited: Duration,
    batch: u64,
    position: usize,
    attempt: u32,
    task: T,
}

/// A batch held back from the consumer while some of its tasks are retried.
struct Parked<T: Task> {
    seq: u64,
    first_index: usize,
    /// Each task's outcome; `None` while it is being retried.
    outcomes: Vec<Option<Result<T::Output, Error>>>,
    /// Copies of the tasks as they were first sent, to copy again for each retry.
    copies: Vec<Option<T>>,
    /// The errors of each retried task's attempts so far.
    attempts: HashMap<usize, Vec<Error>>,
    /// Tasks still being retried.
    waiting: usize,
}

impl<T: Task> Parked<T> {
    fn into_finished(self) -> Finished<T::Output> {
        let len = self.outcomes.len();
        let mut values = Vec::with_capacity(len);
        let mut failures = Vec::new();
        for (position, outcome) in self.outcomes.into_iter().enumerate() {
            match outcome {
                Some(Ok(value)) => values.push(value),
                Some(Err(error)) => failures.push((position, error)),
                None => failures.push((position, Error::cancelled(self.first_index + position))),
            }
        }
        Finished {
            seq: self.seq,
            first_index: self.first_index,
            len,
            values,
            failures,
            in_place: false,
            written: 0,
        }
    }

    /// Ends the retries of the task at `position` with the errors of its attempts.
    fn give_up(&mut self, position: usize) {
        let index = self.first_index + position;
        let attempts = self.attempts.remove(&position).unwrap_or_default();
        let error = if attempts.is_empty() {
            Error::cancelled(index)
        } else {
            final_error(index, attempts)
        };
        self.outcomes[position] = Some(Err(error));
        self.waiting = self.waiting.saturating_sub(1);
    }
}

/// What [`Retrier::take_due`] hands the dispatcher.
pub(crate) enum Due<T: Task> {
    /// A retry to send as a batch of one task numbered `seq`.
    Send {
        seq: u64,
        index: usize,
        attempt: u32,
        waited: Duration,
        task: T,
    },
    /// A held batch whose last retry was given up (the run stopped): ready for the consumer.
    Resolved(Finished<T::Output>),
}

/// The dispatcher's retry bookkeeping, for a run with retries.
pub(crate) struct Retrier<T: Task> {
    policy: Retry,
    /// Copies of the tasks of each batch out, by batch number.
    copies: HashMap<u64, Vec<Option<T>>>,
    parked: HashMap<u64, Parked<T>>,
    /// Retry batches out: their batch and the task's position in it.
    jobs: HashMap<u64, (u64, usize)>,
    waiting: Vec<Waiting<T>>,
    next_seq: u64,
}

impl<T: Task> Retrier<T> {
    pub(crate) fn new(policy: Retry) -> Option<Box<Self>> {
        (policy.retries > 0).then(|| {
            Box::new(Retrier {
                policy,
                copies: HashMap::new(),
                parked: HashMap::new(),
                jobs: HashMap::new(),
                waiting: Vec::new(),
                next_seq: RETRY_SEQ_BASE,
            })
        })
    }

    /// Keeps a copy of each task of batch `seq` (a task is consumed by running it).
    pub(crate) fn keep_copies(&mut self, seq: u64, tasks: &[T]) {
        self.copies
            .insert(seq, tasks.iter().map(Task::copy_for_retry).collect());
    }

    /// The retries due now, or all of them given up once the run is `cancelled`; and how
    /// long until the next one is due.
    pub(crate) fn take_due(&mut self, cancelled: bool) -> (Vec<Due<T>>, Option<Duration>) {
        let mut due = Vec::new();
        if self.waiting.is_empty() {
            return (due, None);
        }
        let now = Instant::now();
        let mut wake: Option<Duration> = None;
        let mut i = 0;
        while i < self.waiting.len() {
            if !cancelled && self.waiting[i].at > now {
                let left = self.waiting[i].at - now;
                wake = Some(wake.map_or(left, |w| w.min(left)));
                i += 1;
                continue;
            }
            let waiting = self.waiting.swap_remove(i);
            let Some(parked) = self.parked.get_mut(&waiting.batch) else {
                continue;
            };
            if cancelled {
                parked.give_up(waiting.position);
                if parked.waiting == 0
                    && let Some(parked) = self.parked.remove(&waiting.batch)
                {
                    due.push(Due::Resolved(parked.into_finished()));
                }
                continue;
            }
            let seq = self.next_seq;
            self.next_seq += 1;
            self.jobs.insert(seq, (waiting.batch, waiting.position));
            due.push(Due::Send {
                seq,
                index: parked.first_index + waiting.position,
                attempt: waiting.attempt,
                waited: waiting.waited,
                task: waiting.task,
            });
        }
        (due, wake)
    }

    /// Schedules attempt `attempt` of the task at `position` of `parked`, if a copy of it
    /// can be made; `false` if not.
    fn schedule(&mut self, batch: u64, position: usize, attempt: u32) -> bool {
        let Some(parked) = self.parked.get(&batch) else {
            return false;
        };
        let Some(task) = parked
            .copies
            .get(position)
            .and_then(Option::as_ref)
            .and_then(Task::copy_for_retry)
        else {
            return false;
        };
        let waited = self.policy.delay_after(attempt - 1);
        let now = Instant::now();
        self.waiting.push(Waiting {
            // A backoff past what `Instant` can hold waits 136 years instead.
            at: now
                .checked_add(waited)
                .unwrap_or_else(|| now + Duration::from_secs(u64::from(u32::MAX))),
            waited,
            batch,
            position,
            attempt,
            task,
        });
        true
    }

    /// A batch or a retry came back: returns the batch to hand to the consumer, if it is
    /// now complete, or `None` while some of its tasks are retried.
    pub(crate) fn settle(
        &mut self,
        finished: Finished<T::Output>,
        cancelled: bool,
        mut observer: Option<&mut Observer>,
    ) -> Option<Finished<T::Output>> {
        if let Some((batch, position)) = self.jobs.remove(&finished.seq) {
            let outcome = finished.into_outcomes().next().map(|(_, outcome)| outcome);
            let parked = self.parked.get_mut(&batch)?;
            let index = parked.first_index + position;
            let made = parked.attempts.get(&position).map_or(0, Vec::len);
            let attempt = u32::try_from(made + 1).unwrap_or(u32::MAX);
            match outcome {
                Some(Ok(value)) => {
                    parked.attempts.remove(&position);
                    parked.outcomes[position] = Some(Ok(value));
                    parked.waiting -= 1;
                }
                Some(Err(error)) if !matches!(error, Error::Cancelled { .. }) => {
                    let again = !cancelled
                        && self.policy.retries_on(&error)
                        && attempt <= self.policy.retries;
                    if let Some(observer) = observer.as_deref_mut() {
                        observer.task_failed(index, attempt, &error, again);
                    }
                    parked.attempts.entry(position).or_default().push(error);
                    if !(again && self.schedule(batch, position, attempt + 1))
                        && let Some(parked) = self.parked.get_mut(&batch)
                    {
                        parked.give_up(position);
                    }
                }
                // Not run: the run stopped. The task ends with the attempts it made.
                _ => parked.give_up(position),
            }
            let parked = self.parked.get(&batch)?;
            if parked.waiting > 0 {
                return None;
            }
            return self.parked.remove(&batch).map(Parked::into_finished);
        }
        let copies = self.copies.remove(&finished.seq);
        let policy = self.policy;
        let retryable = |error: &Error| !cancelled && policy.retries_on(error);
        let Some(copies) = copies.filter(|_| finished.failures.iter().any(|(_, e)| retryable(e)))
        else {
            if let Some(observer) = observer.as_deref_mut() {
                for (position, error) in &finished.failures {
                    observer.task_failed(finished.first_index + position, 1, error, false);
                }
            }
            return Some(finished);
        };
        let seq = finished.seq;
        let first_index = finished.first_index;
        let outcomes: Vec<_> = finished
            .into_outcomes()
            .map(|(_, outcome)| Some(outcome))
            .collect();
        self.parked.insert(
            seq,
            Parked {
                seq,
                first_index,
                outcomes,
                copies,
                attempts: HashMap::new(),
                waiting: 0,
            },
        );
        let failed: Vec<usize> = self.parked[&seq]
            .outcomes
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, Some(Err(_))))
            .map(|(p, _)| p)
            .collect();
        for position in failed {
            let Some(parked) = self.parked.get_mut(&seq) else {
                break;
            };
            let Some(Err(error)) = parked.outcomes[position].take() else {
                continue;
            };
            let has_copy = parked.copies.get(position).is_some_and(Option::is_some);
            let again = retryable(&error) && has_copy;
            if let Some(observer) = observer.as_deref_mut() {
                observer.task_failed(first_index + position, 1, &error, again);
            }
            if !again {
                parked.outcomes[position] = Some(Err(error));
                continue;
            }
            parked.attempts.insert(position, vec![error]);
            parked.waiting += 1;
            if !self.schedule(seq, position, 2)
                && let Some(parked) = self.parked.get_mut(&seq)
            {
                parked.give_up(position);
            }
        }
        if self.parked.get(&seq).is_some_and(|p| p.waiting > 0) {
            return None;
        }
        self.parked.remove(&seq).map(Parked::into_finished)
    }
}

/// The final error of a task that failed `attempts` (oldest first, never empty): the error
/// itself after one attempt, else [`Error::RetriesExhausted`].
pub(crate) fn final_error(index: usize, mut attempts: Vec<Error>) -> Error {
    if attempts.len() == 1 {
        return attempts.pop().unwrap_or(Error::Cancelled { index });
    }
    Error::RetriesExhausted { index, attempts }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_on_an_mpi_rank_are_retried_like_the_same_failures_here() {
        let retry = Retry::new(2);
        let crash = Error::worker_crashed(3, 0, 42, crate::WorkerExit::Signaled(6));
        assert!(retry.retries_on(&Error::on_rank(1, "node1", crash)));
        let codec = Error::codec(3, "decode", "u64", "short");
        assert!(!retry.retries_on(&Error::on_rank(1, "node1", codec)));
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        let retry = Retry::new(5)
            .backoff(Duration::from_millis(10))
            .max_backoff(Duration::from_millis(35));
        let waits: Vec<_> = (1..=4).map(|a| retry.delay_after(a).as_millis()).collect();
        assert_eq!(waits, [10, 20, 35, 35]);
        assert_eq!(Retry::new(3).delay_after(2), Duration::ZERO);
    }

    #[test]
    fn crashes_and_timeouts_are_retried_panics_only_when_asked() {
        let crash = Error::worker_crashed(7, 0, 123, crate::WorkerExit::Signaled(11));
        let panic = Error::task_panicked(7, "boom");
        let retry = Retry::new(1);
        assert!(retry.retries_on(&crash));
        assert!(retry.retries_on(&Error::timeout(7, Duration::from_secs(1), true)));
        assert!(!retry.retries_on(&panic));
        assert!(retry.on_panic(true).retries_on(&panic));
        assert!(!retry.retries_on(&Error::cancelled(7)));
    }

    #[test]
    fn the_final_error_lists_every_attempt() {
        let crash = Error::worker_crashed(7, 0, 123, crate::WorkerExit::Signaled(11));
        let error = final_error(7, vec![crash.clone(), crash.clone(), crash.clone()]);
        let text = error.to_string();
        assert!(
            text.starts_with("task 7 failed 3 times: [1] task 7: worker 0 (pid 123) crashed"),
            "{text}"
        );
        assert!(text.contains("[3] "), "{text}");
        assert_eq!(final_error(7, vec![crash.clone()]), crash);
        assert_eq!(error.clone().with_task_index(9).task_index(), Some(9));
    }
}
