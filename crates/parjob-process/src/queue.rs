//! The jobs a pool's supervisors take, one at a time, and the signal that wakes idle ones when
//! a `SharedSlice` segment was dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use parjob_core::Job;

use crate::registry::SegmentListener;
use crate::spawn::Event;

/// How long a pool that lost a worker must stand idle before the replacement starts, while
/// another slot still has a worker (see [`Queue::next_without_worker`]): long enough for the
/// call that ended the idle spell to have returned to its caller, so that the start does not
/// take the CPU from the caller's next steps.
const IDLE_GRACE: Duration = Duration::from_millis(1);

/// A pool's queue of jobs, shared by its supervisors.
#[derive(Default)]
pub(crate) struct Queue {
    jobs: Mutex<Jobs>,
    /// Where supervisors with a worker wait ([`Queue::next`]).
    ready: Condvar,
    /// Where supervisors without one wait ([`Queue::next_without_worker`]): woken only for
    /// jobs that the others are too few to take, so a job does not wake them first.
    unmanned: Condvar,
    closing: AtomicBool,
    /// Bumped when a `SharedSlice` segment is dropped in this process: idle supervisors wake
    /// and tell their workers to unmap it.
    sweep_epoch: AtomicU64,
}

/// The queued jobs, and how many supervisors with a worker wait for one.
#[derive(Default)]
struct Jobs {
    queue: VecDeque<Job>,
    /// Supervisors waiting in [`Queue::next`] (those with a worker).
    ready_waiting: usize,
    /// Slots with a live worker, as their supervisors last said ([`Queue::manned`]).
    manned: usize,
    /// Bumped each time the pool goes idle: a slot with a worker comes for a job, finds none,
    /// and every other slot with a worker waits too (see [`Queue::next_without_worker`]).
    idle_epoch: u64,
    /// Supervisors waiting in [`Queue::next_without_worker`].
    unmanned_waiting: usize,
    /// Busy supervisors that want to hear of the next job (see [`Queue::want_ahead`]): their
    /// slot and events channel.
    wanting: Vec<(usize, Sender<Event>)>,
}

/// What an idle supervisor is woken for.
pub(crate) enum Next {
    Job(Job),
    /// A segment was dropped since the last sweep: tell the worker to let go of it.
    Sweep {
        epoch: u64,
    },
    /// Time to start the slot's replacement worker (see [`Queue::next_without_worker`]).
    Replace,
}

impl Queue {
    fn jobs(&self) -> MutexGuard<'_, Jobs> {
        // A panic while holding the lock leaves a valid queue behind.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, job: Job) {
        self.push_at(job, false);
    }

    /// Gives back a job a supervisor took ahead and could not send (its worker died): it goes
    /// first, to whichever supervisor is free first.
    pub(crate) fn give_back(&self, job: Job) {
        self.push_at(job, true);
    }

    fn push_at(&self, job: Job, front: bool) {
        let mut jobs = self.jobs();
        if front {
            jobs.queue.push_front(job);
        } else {
            jobs.queue.push_back(job);
        }
        self.ready.notify_one();
        if jobs.queue.len() > jobs.ready_waiting {
            self.unmanned.notify_one();
        }
        if jobs.ready_waiting == 0
            && let Some((_, tx)) = jobs.wanting.pop()
        {
            // A supervisor that stopped waiting meanwhile ignores it.
            let _ = tx.send(Event::Queued);
        }
    }

    /// Whether the pool is shutting down.
    pub(crate) fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// Starts the shutdown: every waiting supervisor wakes to find no job.
    pub(crate) fn close(&self) {
        self.closing.store(true, Ordering::Release);
        let _jobs = self.jobs();
        self.ready.notify_all();
        self.unmanned.notify_all();
    }

    /// The jobs nobody took.
    pub(crate) fn drain(&self) -> Vec<Job> {
        self.jobs().queue.drain(..).collect()
    }

    /// The sweep epoch a supervisor starts from.
    pub(crate) fn sweep_epoch(&self) -> u64 {
        self.sweep_epoch.load(Ordering::Acquire)
    }

    /// Slot's supervisor says its slot now has a live worker (`true`) or lost it (`false`);
    /// called only on a change. When the last live worker is lost, slots waiting to replace
    /// theirs start at once.
    pub(crate) fn manned(&self, has_worker: bool) {
        let mut jobs = self.jobs();
        if has_worker {
            jobs.manned += 1;
        } else {
            jobs.manned = jobs.manned.saturating_sub(1);
            if jobs.manned == 0 {
                self.unmanned.notify_all();
            }
        }
    }

    /// The next job, a sweep if a segment was dropped since epoch `swept`, or `None` once the
    /// pool is closing. `has_worker`: whether the caller's slot has a live worker (its coming
    /// may make the pool idle).
    pub(crate) fn next(&self, swept: u64, has_worker: bool) -> Option<Next> {
        let mut jobs = self.jobs();
        if jobs.unmanned_waiting > 0
            && has_worker
            && jobs.queue.is_empty()
            && jobs.ready_waiting + 1 >= jobs.manned
        {
            // Every slot with a worker is idle: a replacement may start now without taking a
            // CPU from a job.
            jobs.idle_epoch = jobs.idle_epoch.wrapping_add(1);
            self.unmanned.notify_all();
        }
        loop {
            if self.closing() {
                return None;
            }
            if let Some(job) = jobs.queue.pop_front() {
                return Some(Next::Job(job));
            }
            let epoch = self.sweep_epoch();
            if epoch != swept {
                return Some(Next::Sweep { epoch });
            }
            jobs.ready_waiting += 1;
            jobs = self
                .ready
                .wait(jobs)
                .unwrap_or_else(PoisonError::into_inner);
            jobs.ready_waiting -= 1;
        }
    }

    /// The next job for a supervisor whose worker is busy, to send it ahead (see
    /// `Supervisor::send_ahead`), if `may` says it may go: `None` when the queue is empty, the
    /// pool is closing, or a supervisor with a worker waits for a job (it takes the job
    /// sooner).
    pub(crate) fn take_ahead(&self, may: impl FnOnce(&Job) -> bool) -> Option<Job> {
        let mut jobs = self.jobs();
        if self.closing() || jobs.ready_waiting > 0 || !jobs.queue.front().is_some_and(may) {
            return None;
        }
        jobs.queue.pop_front()
    }

    /// A busy supervisor (slot `slot`) asks to hear of the next job on `events`
    /// ([`Event::Queued`], once), to take it with [`Queue::take_ahead`] if `may` says it may
    /// go. Returns `false` instead, registering nothing, when a job that
    /// [`Queue::take_ahead`] would give is queued already; `true` without registering when the
    /// next job may not go ahead (it waits for a free worker).
    pub(crate) fn want_ahead(
        &self,
        slot: usize,
        events: &Sender<Event>,
        may: impl FnOnce(&Job) -> bool,
    ) -> bool {
        let mut jobs = self.jobs();
        if self.closing() {
            return true;
        }
        if let Some(next) = jobs.queue.front() {
            return !(jobs.ready_waiting == 0 && may(next));
        }
        if !jobs.wanting.iter().any(|(s, _)| *s == slot) {
            jobs.wanting.push((slot, events.clone()));
        }
        true
    }

    /// Slot `slot` no longer wants to hear of the next job.
    pub(crate) fn unwant(&self, slot: usize) {
        let mut jobs = self.jobs();
        if !jobs.wanting.is_empty() {
            jobs.wanting.retain(|(s, _)| *s != slot);
        }
    }

    /// [`Queue::next`] for a supervisor whose worker was lost: its replacement is started
    /// ([`Next::Replace`]) at once if no supervisor with a worker is waiting for a job (a job
    /// would have to wait for it) or no other slot has a live worker left; otherwise once the
    /// pool has stood idle for [`IDLE_GRACE`] (no job queued, every slot with a worker waiting:
    /// the calls that came right after the loss are done), or at `quiet_until` at the latest,
    /// or when more jobs are queued than supervisors with a worker wait for. So the start of a
    /// replacement, which takes a CPU for a millisecond or more, does not compete with the
    /// calls that come right after the loss and that a worker standing idle can take, and a
    /// pool that lost its last worker does not wait to start one.
    pub(crate) fn next_without_worker(&self, swept: u64, quiet_until: Instant) -> Option<Next> {
        let mut jobs = self.jobs();
        if jobs.ready_waiting == 0 && !self.closing() {
            return Some(Next::Replace);
        }
        let mut seen_epoch = jobs.idle_epoch;
        // Since when the pool has stood idle, as far as this supervisor has seen.
        let mut idle_from: Option<Instant> = None;
        loop {
            if self.closing() {
                return None;
            }
            if jobs.manned == 0 {
                return Some(Next::Replace);
            }
            if jobs.queue.len() > jobs.ready_waiting {
                return jobs.queue.pop_front().map(Next::Job);
            }
            let epoch = self.sweep_epoch();
            if epoch != swept {
                return Some(Next::Sweep { epoch });
            }
            let now = Instant::now();
            if jobs.idle_epoch != seen_epoch {
                // The pool just went idle again (this wake is its news).
                seen_epoch = jobs.idle_epoch;
                idle_from = Some(now);
            } else if !(jobs.queue.is_empty() && jobs.ready_waiting >= jobs.manned) {
                idle_from = None;
            } else if idle_from.is_none() {
                idle_from = Some(now);
            }
            let due = idle_from.map_or(quiet_until, |from| (from + IDLE_GRACE).min(quiet_until));
            let left = due.saturating_duration_since(now);
            if left.is_zero() {
                return Some(Next::Replace);
            }
            jobs.unmanned_waiting += 1;
            jobs = self
                .unmanned
                .wait_timeout(jobs, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            jobs.unmanned_waiting -= 1;
        }
    }
}

impl SegmentListener for Queue {
    fn segment_dropped(&self) {
        // Under the lock, so that a supervisor between its check and its wait still wakes.
        let _jobs = self.jobs();
        self.sweep_epoch.fetch_add(1, Ordering::AcqRel);
        self.ready.notify_all();
        self.unmanned.notify_all();
    }
}
