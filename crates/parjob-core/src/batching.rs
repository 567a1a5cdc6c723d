//! Auto batching: how many tasks go into the next batch.
//!
//! Start with one task per batch (slow tasks, like 10 ms sleeps, must never be grouped), then
//! size batches from measured task durations so that one batch runs for about the pool's
//! target duration: long enough to hide dispatch cost, short enough to balance the load.
//! Unlike joblib, which doubles step by step, the size jumps straight to the estimate: tiny
//! tasks reach batches of 10^5 after one round trip instead of seventeen.

use std::time::Duration;

/// How tasks are grouped into batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BatchSize {
    /// Adapt the size from measured task durations (the default).
    #[default]
    Auto,
    /// Always this many tasks per batch (at least 1).
    Fixed(usize),
}

/// The largest auto batch: bounds the memory one batch holds.
const MAX_AUTO_BATCH: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Sizer {
    fixed: Option<usize>,
    target: Duration,
    workers: usize,
    /// Smoothed nanoseconds per task, once a batch has reported.
    per_task_nanos: Option<f64>,
}

impl Sizer {
    pub(crate) fn new(batch_size: BatchSize, target: Duration, workers: usize) -> Self {
        Sizer {
            fixed: match batch_size {
                BatchSize::Auto => None,
                BatchSize::Fixed(n) => Some(n.max(1)),
            },
            target,
            workers: workers.max(1),
            per_task_nanos: None,
        }
    }

    /// Size of the next batch; `remaining` is a lower bound on the tasks left to dispatch (0 if
    /// unknown), used to keep at least two batches per worker for balance.
    pub(crate) fn next_size(&self, remaining: usize) -> usize {
        if let Some(n) = self.fixed {
            return n;
        }
        let Some(per_task) = self.per_task_nanos else {
            return 1;
        };
        let ideal = (self.target.as_nanos() as f64 / per_task.max(1.0)) as usize;
        let balanced = match remaining {
            0 => MAX_AUTO_BATCH,
            n => n.div_ceil(2 * self.workers),
        };
        ideal.clamp(1, MAX_AUTO_BATCH).min(balanced)
    }

    /// A batch of `tasks` tasks kept a worker busy for `busy`.
    pub(crate) fn observe(&mut self, tasks: usize, busy: Duration) {
        if tasks == 0 || self.fixed.is_some() {
            return;
        }
        let sample = busy.as_nanos() as f64 / tasks as f64;
        self.per_task_nanos = Some(match self.per_task_nanos {
            None => sample,
            Some(old) => 0.5 * old + 0.5 * sample,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_starts_with_single_tasks() {
        let sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        assert_eq!(sizer.next_size(1_000_000), 1);
    }

    #[test]
    fn slow_tasks_stay_single() {
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 100);
        sizer.observe(1, Duration::from_millis(10));
        assert_eq!(sizer.next_size(99), 1);
    }

    #[test]
    fn fast_tasks_jump_to_the_target_duration() {
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        sizer.observe(1, Duration::from_micros(1));
        assert_eq!(sizer.next_size(usize::MAX / 2), 2000);
    }

    #[test]
    fn batches_leave_work_for_every_worker() {
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        sizer.observe(1000, Duration::from_micros(1));
        assert_eq!(sizer.next_size(1000), 250);
    }

    #[test]
    fn fixed_size_ignores_measurements() {
        let mut sizer = Sizer::new(BatchSize::Fixed(7), Duration::from_millis(2), 2);
        sizer.observe(7, Duration::from_secs(7));
        assert_eq!(sizer.next_size(3), 7);
        assert_eq!(
            Sizer::new(BatchSize::Fixed(0), Duration::ZERO, 1).next_size(9),
            1
        );
    }
}
