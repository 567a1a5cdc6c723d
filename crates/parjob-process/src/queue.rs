//! The jobs a pool's supervisors take, one at a time, and the signal that wakes idle ones when
//! a `SharedSlice` segment was dropped.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};

use parjob_core::Job;

use crate::registry::SegmentListener;

/// A pool's queue of jobs, shared by its supervisors.
#[derive(Default)]
pub(crate) struct Queue {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
    closing: AtomicBool,
    /// Bumped when a `SharedSlice` segment is dropped in this process: idle supervisors wake
    /// and tell their workers to unmap it.
    sweep_epoch: AtomicU64,
}

/// What an idle supervisor is woken for.
pub(crate) enum Next {
    Job(Job),
    /// A segment was dropped since the last sweep: tell the worker to let go of it.
    Sweep {
        epoch: u64,
    },
}

impl Queue {
    fn jobs(&self) -> MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding the lock leaves a valid queue behind.
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn push(&self, job: Job) {
        self.jobs().push_back(job);
        self.ready.notify_one();
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
    }

    /// The jobs nobody took.
    pub(crate) fn drain(&self) -> Vec<Job> {
        self.jobs().drain(..).collect()
    }

    /// The sweep epoch a supervisor starts from.
    pub(crate) fn sweep_epoch(&self) -> u64 {
        self.sweep_epoch.load(Ordering::Acquire)
    }

    /// The next job, a sweep if a segment was dropped since epoch `swept`, or `None` once the
    /// pool is closing.
    pub(crate) fn next(&self, swept: u64) -> Option<Next> {
        let mut jobs = self.jobs();
        loop {
            if self.closing() {
                return None;
            }
            if let Some(job) = jobs.pop_front() {
                return Some(Next::Job(job));
            }
            let epoch = self.sweep_epoch();
            if epoch != swept {
                return Some(Next::Sweep { epoch });
            }
            jobs = self
                .ready
                .wait(jobs)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl SegmentListener for Queue {
    fn segment_dropped(&self) {
        // Under the lock, so that a supervisor between its check and its wait still wakes.
        let _jobs = self.jobs();
        self.sweep_epoch.fetch_add(1, Ordering::AcqRel);
        self.ready.notify_all();
    }
}
