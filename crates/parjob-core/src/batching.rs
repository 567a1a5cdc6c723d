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
pub(crate) const MAX_AUTO_BATCH: usize = 1 << 20;

#[derive(Debug)]
pub(crate) struct Sizer {
    fixed: Option<usize>,
    /// The most tasks an auto batch holds (`MAX_AUTO_BATCH`, or less for a pool that bounds
    /// a batch's bytes).
    max_auto: usize,
    target: Duration,
    workers: usize,
    /// Decaying sums of busy nanoseconds and of tasks over the batches reported so far: their
    /// ratio weighs each batch by its size, so one big batch outweighs the single-task
    /// batches of the start, whose timings are mostly clock and call overhead.
    busy_nanos: f64,
    tasks: f64,
    /// Tasks whose timings were reported so far, in all.
    observed: usize,
}

/// How many tasks' timings make the estimate firm enough to keep tail batches from shrinking
/// below an eighth of the target duration. Until then the estimate may come from one task
/// that happened to be quick among slow ones (40 tasks of 0-4 ms whose first took 2 us
/// estimated 125 tasks to 250 us), and a batch sized from it would take every task left.
const FIRM_ESTIMATE: usize = 64;

impl Sizer {
    pub(crate) fn new(batch_size: BatchSize, target: Duration, workers: usize) -> Self {
        Sizer {
            fixed: match batch_size {
                BatchSize::Auto => None,
                BatchSize::Fixed(n) => Some(n.max(1)),
            },
            max_auto: MAX_AUTO_BATCH,
            target,
            workers: workers.max(1),
            busy_nanos: 0.0,
            tasks: 0.0,
            observed: 0,
        }
    }

    /// Holds auto batches to `max` tasks or fewer (at least 1).
    pub(crate) fn with_max_auto(mut self, max: usize) -> Self {
        self.max_auto = max.clamp(1, MAX_AUTO_BATCH);
        self
    }

    /// Size of the next batch; `remaining` is a lower bound on the tasks left to dispatch (0 if
    /// unknown), used to keep at least two batches per worker for balance.
    pub(crate) fn next_size(&self, remaining: usize) -> usize {
        if let Some(n) = self.fixed {
            return n;
        }
        if self.tasks == 0.0 {
            return 1;
        }
        let per_task = (self.busy_nanos / self.tasks).max(0.1);
        let ideal = ((self.target.as_nanos() as f64 / per_task) as usize).clamp(1, self.max_auto);
        // Near the end, smaller batches balance the load, down to an eighth of the target
        // duration once the estimate is firm: smaller ones would cost more in round trips than
        // they save.
        let balanced = match remaining {
            0 => MAX_AUTO_BATCH,
            n => n.div_ceil(2 * self.workers),
        };
        let floor = if self.observed >= FIRM_ESTIMATE {
            ideal / 8
        } else {
            1
        };
        ideal.min(balanced.max(floor)).max(1)
    }

    /// A batch of `tasks` tasks kept a worker busy for `busy`.
    pub(crate) fn observe(&mut self, tasks: usize, busy: Duration) {
        if tasks == 0 || self.fixed.is_some() {
            return;
        }
        self.busy_nanos = 0.5 * self.busy_nanos + busy.as_nanos() as f64;
        self.tasks = 0.5 * self.tasks + tasks as f64;
        self.observed = self.observed.saturating_add(tasks);
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
        // 100 ns a task: 20,000 fill 2 ms, but 40,000 left make two batches a worker.
        sizer.observe(1000, Duration::from_micros(100));
        assert_eq!(sizer.next_size(40_000), 10_000);
    }

    #[test]
    fn the_tail_does_not_shrink_below_an_eighth_of_the_target() {
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        sizer.observe(1000, Duration::from_micros(1000));
        assert_eq!(sizer.next_size(10), 250);
    }

    #[test]
    fn one_quick_first_task_does_not_take_the_rest_of_a_short_run() {
        // 40 tasks of 0-4 ms on 2 workers, the first of which took 2 us: the estimate says
        // 1000 tasks fill 2 ms, but it rests on one task, so the 39 left are still spread
        // over at least two batches a worker.
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        sizer.observe(1, Duration::from_micros(2));
        assert_eq!(sizer.next_size(39), 10);
        sizer.observe(10, Duration::from_millis(20));
        assert_eq!(sizer.next_size(19), 1);
    }

    #[test]
    fn a_big_batch_outweighs_the_single_task_start() {
        let mut sizer = Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2);
        sizer.observe(1, Duration::from_micros(2));
        sizer.observe(1, Duration::from_micros(2));
        sizer.observe(10_000, Duration::from_micros(10));
        // About 1 ns a task: a 2 ms batch holds about two million, capped at 2^20.
        assert_eq!(sizer.next_size(0), MAX_AUTO_BATCH);
    }

    #[test]
    fn a_bound_on_tasks_holds_tiny_tasks_to_it_and_leaves_slower_ones_alone() {
        let mut sizer =
            Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2).with_max_auto(16_384);
        sizer.observe(10_000, Duration::from_micros(10));
        assert_eq!(sizer.next_size(0), 16_384);
        let mut slower =
            Sizer::new(BatchSize::Auto, Duration::from_millis(2), 2).with_max_auto(16_384);
        slower.observe(1, Duration::from_micros(1));
        assert_eq!(slower.next_size(0), 2000);
        // The bound never makes a batch empty, nor lifts the usual cap.
        assert_eq!(
            Sizer::new(BatchSize::Auto, Duration::ZERO, 1)
                .with_max_auto(0)
                .max_auto,
            1
        );
        assert_eq!(
            Sizer::new(BatchSize::Auto, Duration::ZERO, 1)
                .with_max_auto(usize::MAX)
                .max_auto,
            MAX_AUTO_BATCH
        );
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
