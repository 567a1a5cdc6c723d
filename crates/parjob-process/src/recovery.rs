//! What happens to a batch whose worker dies mid-frame: which task is blamed, and which run
//! again.
//!
//! The board names the task a dead worker held. The tasks before it in the frame ran, but
//! their results died with the worker: they run again on the replacement, then the blamed
//! task gets its error, then the tasks after it run. A worker that dies before starting any
//! task of a frame (killed while idle) blames nobody and the frame is sent again, but a frame
//! that loses two workers in a row that way blames its first task, so it cannot loop.
//!
//! When a worker's shared memory was cut during a frame (a task truncated a segment the driver
//! maps), or something wrote on its line, the board cannot say which task did it: the frame's
//! tasks then run again one per frame, each on a fresh worker, and a task is blamed only when
//! its frame, alone, is spoiled twice in a row. Once is not enough, even alone: a thread an
//! earlier task of the same worker left behind may be what spoiled it.

use parjob_core::Error;

/// The recovery state of one batch, across its frames.
#[derive(Default)]
pub(crate) struct Recovery {
    /// A task that killed its worker, by position in the batch, and its error: recorded once
    /// every task before it has its outcome.
    blamed: Option<(usize, Error)>,
    /// Frames in a row whose worker died before starting any of their tasks.
    lost: u32,
    /// Tasks before this position run one per frame (see the module's docs).
    alone_until: usize,
    /// The task whose frame, alone, was spoiled once: blamed if it is spoiled again.
    spoiled_alone: Option<usize>,
}

impl Recovery {
    /// The error to record now, if the next task without an outcome (at `next`) is the
    /// blamed one.
    pub(crate) fn due(&mut self, next: usize) -> Option<Error> {
        match self.blamed.take() {
            Some((at, error)) if at == next => Some(error),
            other => {
                self.blamed = other;
                None
            }
        }
    }

    /// Where the frame starting at `start` ends: before the blamed task, at the batch's
    /// `len`, and after at most `room` tasks (what the worker may still run before it is
    /// recycled; at least one).
    pub(crate) fn frame_end(&self, start: usize, len: usize, room: Option<usize>) -> usize {
        let mut end = self.blamed.as_ref().map_or(len, |(at, _)| *at);
        if start < self.alone_until {
            end = end.min(start + 1);
        }
        match room {
            Some(room) => end.min(start + room.max(1)),
            None => end,
        }
    }

    /// A frame of the tasks from `start` to `end` lost its worker in a way that does not say
    /// which task is to blame: each of those tasks runs again alone in its frame, and a task
    /// alone in its frame (`end == start + 1`) gets `error()` the second time in a row.
    pub(crate) fn frame_spoiled(
        &mut self,
        start: usize,
        end: usize,
        error: impl FnOnce() -> Error,
    ) {
        if end <= start + 1 && self.spoiled_alone == Some(start) {
            self.spoiled_alone = None;
            self.worker_died(start, error());
        } else if end <= start + 1 {
            self.spoiled_alone = Some(start);
            self.alone_until = self.alone_until.max(end);
        } else {
            self.alone_until = self.alone_until.max(end);
        }
    }

    /// The frame came back.
    pub(crate) fn frame_done(&mut self) {
        self.lost = 0;
        self.spoiled_alone = None;
    }

    /// The worker died before starting any task of the frame that starts at `start`: the
    /// second time in a row, `crash()` (that task's error) is blamed on it.
    pub(crate) fn frame_lost(&mut self, start: usize, crash: impl FnOnce() -> Error) {
        self.lost += 1;
        if self.lost > 1 {
            self.blamed = Some((start, crash()));
        }
    }

    /// The worker died holding the task at `at` (a position in the batch).
    pub(crate) fn worker_died(&mut self, at: usize, error: Error) {
        if self.blamed.as_ref().is_none_or(|(blamed, _)| at < *blamed) {
            self.blamed = Some((at, error));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crash(index: usize) -> Error {
        Error::worker(0, format!("task {index} crashed"))
    }

    #[test]
    fn tasks_before_a_crash_run_again_then_the_crash_is_recorded_then_the_rest_run() {
        let mut r = Recovery::default();
        assert_eq!(r.frame_end(0, 10, None), 10);
        r.worker_died(3, crash(3));
        // The three tasks before it run again, alone in their frame.
        assert!(r.due(0).is_none());
        assert_eq!(r.frame_end(0, 10, None), 3);
        r.frame_done();
        // Then the crash is its outcome, and the rest run.
        assert_eq!(r.due(3), Some(crash(3)));
        assert!(r.due(4).is_none());
        assert_eq!(r.frame_end(4, 10, None), 10);
    }

    #[test]
    fn the_earliest_crash_is_blamed_first() {
        let mut r = Recovery::default();
        r.worker_died(6, crash(6));
        r.worker_died(2, crash(2));
        r.worker_died(4, crash(4));
        assert_eq!(r.frame_end(0, 10, None), 2);
        assert_eq!(r.due(2), Some(crash(2)));
    }

    #[test]
    fn a_frame_that_loses_two_workers_in_a_row_blames_its_first_task() {
        let mut r = Recovery::default();
        r.frame_lost(5, || crash(5));
        assert!(r.due(5).is_none(), "once may be a stray kill");
        r.frame_lost(5, || crash(5));
        assert_eq!(r.due(5), Some(crash(5)));
    }

    #[test]
    fn a_frame_that_comes_back_resets_the_count_of_lost_ones() {
        let mut r = Recovery::default();
        r.frame_lost(0, || crash(0));
        r.frame_done();
        r.frame_lost(4, || crash(4));
        assert!(r.due(4).is_none());
    }

    #[test]
    fn a_spoiled_frame_of_several_tasks_runs_them_alone_and_blames_the_one_spoiled_again() {
        let mut r = Recovery::default();
        r.frame_spoiled(2, 6, || crash(2));
        assert!(r.due(2).is_none(), "nobody is blamed yet");
        for start in 2..6 {
            assert_eq!(r.frame_end(start, 10, None), start + 1);
        }
        assert_eq!(r.frame_end(6, 10, None), 10, "only those tasks run alone");
        // Task 4, alone, spoils its frame: maybe a thread an earlier task left behind; it
        // runs again, alone, on a fresh worker.
        r.frame_spoiled(4, 5, || crash(4));
        assert!(r.due(4).is_none(), "once alone is not enough");
        assert_eq!(r.frame_end(4, 10, None), 5);
        // It spoils that frame too: it is the one.
        r.frame_spoiled(4, 5, || crash(4));
        assert_eq!(r.due(4), Some(crash(4)));
    }

    #[test]
    fn a_task_alone_whose_frame_is_spoiled_once_then_comes_back_is_not_blamed() {
        // A batch of one task (`BatchSize::Fixed(1)`, an Executor's submit): a thread left
        // behind by an earlier task of the same worker spoils its frame.
        let mut r = Recovery::default();
        r.frame_spoiled(0, 1, || crash(0));
        assert!(r.due(0).is_none());
        assert_eq!(r.frame_end(0, 1, None), 1);
        // On a fresh worker its frame comes back: nobody is blamed, and a later spoil of the
        // same task counts from one again.
        r.frame_done();
        r.frame_spoiled(0, 1, || crash(0));
        assert!(r.due(0).is_none());
    }

    #[test]
    fn a_frame_holds_no_more_tasks_than_the_worker_has_left() {
        let r = Recovery::default();
        assert_eq!(r.frame_end(2, 10, Some(3)), 5);
        assert_eq!(r.frame_end(2, 10, Some(0)), 3, "at least one task");
    }
}
