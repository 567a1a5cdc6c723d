//! A supervisor: the thread that owns one worker process for its whole life and feeds it jobs.
//!
//! It starts the worker (so that the worker's parent-death signal is tied to a thread that
//! outlives it), sends it one frame at a time, and hears about it only through its event
//! channel, fed by three small threads: the handshake's accept, the reader of the results
//! channel, and the waiter on the process. Hearing of the death from the waiter, not only from
//! the channel, is what makes a crash visible even when a grandchild keeps the channel open.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use parjob_core::{Error, Job, WorkerExit};
use parjob_remote::{CodeOffset, Kind};

use crate::frame::{Done, encode_run};
use crate::queue::{Next, Queue};
use crate::recovery::Recovery;
use crate::spawn::{Event, Settings, Starter, Worker, await_exit};
use crate::wire::{ARENA_KEEP_MAX, Forget, monotonic_nanos};

/// How long a worker told to shut down may take before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How one frame ended.
enum FrameEnd {
    /// The `DONE` came back.
    Done(Done),
    /// The worker died (or was killed for a timeout) holding task `at` of the frame.
    Died {
        at: usize,
        error: Error,
    },
    /// The worker died before starting any task of the frame.
    Lost {
        pid: u32,
        status: WorkerExit,
    },
    Closing,
}

/// One worker slot of a pool.
pub(crate) struct Supervisor {
    pub(crate) index: usize,
    pub(crate) workers: usize,
    pub(crate) settings: Arc<Settings>,
    pub(crate) queue: Arc<Queue>,
    pub(crate) events_tx: Sender<Event>,
    pub(crate) events: Receiver<Event>,
    pub(crate) worker: Option<Worker>,
    pub(crate) generation: u64,
    /// The `RUN` being built, kept between frames (up to a size) to save its allocation.
    pub(crate) buf: Vec<u8>,
}

impl Supervisor {
    /// Serves jobs until the pool closes, then retires the worker.
    pub(crate) fn serve(&mut self) {
        let mut swept = self.queue.sweep_epoch();
        while let Some(next) = self.queue.next(swept) {
            match next {
                Next::Job(job) => self.run_job(job),
                Next::Sweep { epoch } => {
                    swept = epoch;
                    self.forget_dropped_segments();
                }
            }
            if self.worker.is_none() && !self.queue.closing() {
                // Replace a dead worker now so that the next run finds it ready; if that
                // fails, the next job reports why.
                let _ = self.replace_worker();
            }
        }
        self.retire_worker();
    }

    /// Tells an idle worker which of its segments the driver has dropped, so that it unmaps
    /// them now (a frame would carry the same news, but there may be no next frame).
    fn forget_dropped_segments(&mut self) {
        let Some(worker) = self.worker.as_mut() else {
            return;
        };
        let planned = worker.segments.plan(Vec::new());
        if planned.is_empty() {
            return;
        }
        let message = Forget {
            shipments: u32::try_from(planned.len()).unwrap_or(u32::MAX),
        };
        // A worker that cannot be reached has died; its supervisor hears of it with its next
        // frame.
        let _ = worker
            .tasks
            .send(&message.encode())
            .map_err(|e| e.to_string())
            .and_then(|()| worker.segments.send(&worker.big_tasks, planned));
    }

    /// Starts a new worker in this slot.
    pub(crate) fn replace_worker(&mut self) -> Result<(), Error> {
        self.generation += 1;
        let starter = Starter {
            index: self.index,
            workers: self.workers,
            settings: &self.settings,
            events_tx: &self.events_tx,
            events: &self.events,
        };
        self.worker = Some(starter.start(self.generation)?);
        Ok(())
    }

    /// Runs every task of `job`, over as many frames and workers as it takes, and completes it.
    fn run_job(&mut self, mut job: Job) {
        let entry = job
            .batch()
            .remote_entry()
            .and_then(|entry| CodeOffset::of_entry(entry, job.batch().function_name()));
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                fail_the_rest(&mut job, &error);
                job.complete(Duration::ZERO);
                return;
            }
        };
        if !job.mark_started() {
            // Cancelled before it started (`Future::cancel`): complete it without running.
            job.complete(Duration::ZERO);
            return;
        }
        let mut busy = Duration::ZERO;
        let mut recovery = Recovery::default();
        loop {
            let start = job.batch().outcomes_len();
            let len = job.batch().len();
            if start >= len {
                break;
            }
            if let Some(error) = recovery.due(start) {
                job.batch_mut().push_failure(error);
                continue;
            }
            if job.control().is_cancelled() || self.queue.closing() {
                break;
            }
            if self.worker.is_none()
                && let Err(error) = self.replace_worker()
            {
                fail_the_rest(&mut job, &error);
                break;
            }
            let room = match (self.settings.options.max_tasks_per_worker, &self.worker) {
                (Some(max), Some(worker)) => Some(max.saturating_sub(worker.tasks_run)),
                _ => None,
            };
            let end = recovery.frame_end(start, len, room);
            match self.run_frame(&job, entry, start..end) {
                FrameEnd::Done(done) => {
                    recovery.frame_done();
                    busy += self.take_outcomes(&mut job, done, end - start);
                }
                FrameEnd::Lost { pid, status } => {
                    let index = job.batch().first_index() + start;
                    let worker = self.index;
                    recovery
                        .frame_lost(start, || Error::worker_crashed(index, worker, pid, status));
                }
                FrameEnd::Died { at, error } => recovery.worker_died(start + at, error),
                FrameEnd::Closing => break,
            }
        }
        job.complete(busy);
    }

    /// Decodes the outcomes of a frame of `sent` tasks into `job`, keeps the result arena for
    /// the worker, and recycles a worker that has run its share. Returns the worker's busy
    /// time.
    fn take_outcomes(&mut self, job: &mut Job, done: Done, sent: usize) -> Duration {
        let before = job.batch().outcomes_len();
        let mut busy = Duration::ZERO;
        // A reply that does not hold every outcome cannot happen between two processes of one
        // build; if it does, the next task fails rather than loop on it forever.
        let failure = match done.outcomes() {
            Ok((took, outcomes)) => {
                busy = took;
                let decoded = job.batch_mut().decode_outcomes(outcomes);
                (decoded < sent).then(|| format!("returned {decoded} outcomes for {sent} tasks"))
            }
            Err(reason) => Some(format!("sent a malformed reply ({reason})")),
        };
        let mut decoded = job.batch().outcomes_len() - before;
        if let Some(failure) = failure {
            let index = job.batch().first_index() + job.batch().outcomes_len();
            job.batch_mut().push_failure(Error::worker(
                self.index,
                format!("{failure}; task {index} is reported failed"),
            ));
            decoded += 1;
        }
        if let Some(worker) = &mut self.worker {
            if let Some(arena) = done.arena.filter(|a| a.len() <= ARENA_KEEP_MAX) {
                worker.result_arena = Some(arena);
            }
            worker.tasks_run += decoded;
            if self
                .settings
                .options
                .max_tasks_per_worker
                .is_some_and(|max| worker.tasks_run >= max)
            {
                self.retire_worker();
            }
        }
        busy
    }

    /// Sends tasks `range` of the job to the worker and waits for their outcomes.
    fn run_frame(&mut self, job: &Job, entry: CodeOffset, range: Range<usize>) -> FrameEnd {
        self.forget_if_dead();
        if self.worker.is_none() && self.replace_worker().is_err() {
            // Reported by run_job's next attempt, which starts a worker again.
            return FrameEnd::Lost {
                pid: 0,
                status: WorkerExit::Lost("could not be replaced".into()),
            };
        }
        let Some(worker) = self.worker.as_mut() else {
            return FrameEnd::Closing;
        };
        let timeout = job.control().timeout();
        let (send, shipments) = encode_run(
            &mut self.buf,
            job.batch(),
            range.clone(),
            entry,
            timeout.is_some(),
            worker,
            self.settings.options.max_nbytes,
        );
        worker.board.reset();
        // The RUN goes first: the worker reads it, then exactly as many shipments as it
        // announces, so a frame with more shipments than the socket buffers cannot block the
        // driver.
        let sent = worker
            .tasks
            .send(&self.buf[..send])
            .map_err(|e| e.to_string())
            .and_then(|()| worker.segments.send(&worker.big_tasks, shipments));
        if self.buf.capacity() > 64 << 20 {
            self.buf = Vec::new();
        }
        let generation = worker.generation;
        let first_index = job.batch().first_index() + range.start;
        if sent.is_err() {
            // The worker is gone; its waiter will say how.
            return self.bury(first_index, range.len(), None, false, None);
        }
        let mut timed_out = false;
        loop {
            let event = match timeout {
                Some(limit) if !timed_out => {
                    let poll =
                        (limit / 10).clamp(Duration::from_millis(1), Duration::from_millis(20));
                    match self.events.recv_timeout(poll) {
                        Ok(event) => event,
                        Err(RecvTimeoutError::Timeout) => {
                            timed_out = self.kill_if_over(limit);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => return FrameEnd::Closing,
                    }
                }
                _ => match self.events.recv() {
                    Ok(event) => event,
                    Err(_) => return FrameEnd::Closing,
                },
            };
            match event {
                Event::Reply {
                    generation: g,
                    bytes,
                    new_arena,
                } if g == generation && Kind::of(&bytes) == Ok(Kind::Done) => {
                    let kept = self.worker.as_mut().and_then(|w| w.result_arena.take());
                    return FrameEnd::Done(Done::new(bytes, new_arena, kept));
                }
                Event::Disconnected { generation: g } if g == generation => {
                    return self.bury(
                        first_index,
                        range.len(),
                        None,
                        true,
                        timeout.filter(|_| timed_out),
                    );
                }
                Event::Exited {
                    generation: g,
                    status,
                } if g == generation => {
                    return self.bury(
                        first_index,
                        range.len(),
                        Some(status),
                        false,
                        timeout.filter(|_| timed_out),
                    );
                }
                Event::Close => {
                    if let Some(worker) = &self.worker {
                        worker.child.kill();
                    }
                    self.bury(first_index, range.len(), None, false, None);
                    return FrameEnd::Closing;
                }
                _ => {} // about an earlier worker of this slot
            }
        }
    }

    /// Forgets the worker if it died while idle (news of it waits in the event queue), so
    /// that the next frame goes to a fresh one instead of being blamed for the death.
    fn forget_if_dead(&mut self) {
        let Some(generation) = self.worker.as_ref().map(|w| w.generation) else {
            return;
        };
        let mut dead = false;
        let mut reaped = false;
        let mut close = false;
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Exited { generation: g, .. } if g == generation => {
                    dead = true;
                    reaped = true;
                }
                Event::Disconnected { generation: g } if g == generation => dead = true,
                Event::Close => close = true,
                _ => {}
            }
        }
        if close {
            // Put it back for run_frame's wait loop.
            let _ = self.events_tx.send(Event::Close);
        }
        if dead && let Some(worker) = self.worker.take() {
            if !reaped {
                worker.child.kill();
                await_exit(&self.events, &self.events_tx, generation);
            }
            worker.wait_for_output();
        }
    }

    /// Kills the worker if its current task started more than `limit` ago.
    fn kill_if_over(&self, limit: Duration) -> bool {
        let Some(worker) = &self.worker else {
            return false;
        };
        let started = worker.board.started_count();
        if started == 0 {
            return false;
        }
        let since = monotonic_nanos().saturating_sub(worker.board.last_start());
        if u128::from(since) < limit.as_nanos() || worker.board.started_count() != started {
            return false;
        }
        worker.child.kill();
        true
    }

    /// The worker died during a frame of `len` tasks starting at input index `first_index`:
    /// learns how (waiting for its waiter if `status` is not known yet), forgets it, and says
    /// which task it held.
    fn bury(
        &mut self,
        first_index: usize,
        len: usize,
        mut status: Option<WorkerExit>,
        mut disconnected: bool,
        timed_out: Option<Duration>,
    ) -> FrameEnd {
        let Some(mut worker) = self.worker.take() else {
            return FrameEnd::Closing;
        };
        let generation = worker.generation;
        let mut deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut killed = false;
        let mut late_reply = None;
        // Wait for the exit status, and for the reader to drain what the worker sent before
        // it died: a frame that finished just before a kill is not a crash.
        while status.is_none() || (!disconnected && late_reply.is_none()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Exited {
                    generation: g,
                    status: s,
                }) if g == generation => {
                    status = Some(s);
                    // The reader's disconnection follows at once unless a grandchild holds
                    // the channel: do not wait long for it.
                    deadline = deadline.min(Instant::now() + Duration::from_millis(100));
                }
                Ok(Event::Disconnected { generation: g }) if g == generation => {
                    disconnected = true;
                }
                Ok(Event::Reply {
                    generation: g,
                    bytes,
                    new_arena,
                }) if g == generation && Kind::of(&bytes) == Ok(Kind::Done) => {
                    late_reply = Some((bytes, new_arena));
                }
                Ok(_) => {}
                Err(_) => {
                    if status.is_some() {
                        break;
                    }
                    if killed {
                        status = Some(WorkerExit::Lost(
                            "lost (it did not exit after SIGKILL)".into(),
                        ));
                        break;
                    }
                    // Disconnected but still alive (it closed its channel): end it.
                    worker.child.kill();
                    killed = true;
                    deadline = Instant::now() + SHUTDOWN_GRACE;
                }
            }
        }
        worker.wait_for_output();
        if let Some((bytes, new_arena)) = late_reply {
            // The worker is dead: nobody writes its result arena any more.
            return FrameEnd::Done(Done::new(bytes, new_arena, worker.result_arena.take()));
        }
        let started = worker.board.started_count();
        if started == 0 && timed_out.is_none() {
            // It died before any task of the frame started (killed while idle, or while
            // receiving the frame): no task is to blame yet.
            return FrameEnd::Lost {
                pid: worker.pid,
                status: status.unwrap_or_else(|| WorkerExit::Lost("lost".into())),
            };
        }
        let at = (started.saturating_sub(1) as usize).min(len.saturating_sub(1));
        let index = first_index + at;
        let error = match timed_out {
            Some(after) => Error::timeout(index, after, true),
            None => Error::worker_crashed(
                index,
                self.index,
                worker.pid,
                status.unwrap_or_else(|| WorkerExit::Lost("lost".into())),
            ),
        };
        FrameEnd::Died { at, error }
    }

    /// Tells an idle worker to exit (status 0) and waits until it has; kills it if it takes
    /// longer than `SHUTDOWN_GRACE`.
    fn retire_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if worker.tasks.send(&[Kind::Shutdown.byte()]).is_err() {
            worker.child.kill();
        }
        let mut deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut killed = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Exited { generation: g, .. }) if g == worker.generation => {
                    worker.wait_for_output();
                    return;
                }
                Ok(_) => {}
                Err(_) if !killed => {
                    worker.child.kill();
                    killed = true;
                    deadline = Instant::now() + SHUTDOWN_GRACE;
                }
                Err(_) => return,
            }
        }
    }
}

/// Records `error` as the outcome of every task of `job` that has none.
fn fail_the_rest(job: &mut Job, error: &Error) {
    while job.batch().outcomes_len() < job.batch().len() {
        job.batch_mut().push_failure(error.clone());
    }
}
