//! A supervisor: the thread that owns one worker process for its whole life and feeds it jobs.
//!
//! It starts the worker (so that the worker's parent-death signal is tied to a thread that
//! outlives it), sends it one frame at a time, and hears about it only through its event
//! channel, fed by three small threads: the handshake's accept, the reader of the results
//! channel, and the waiter on the process. Hearing of the death from the waiter, not only from
//! the channel, is what makes a crash visible even when a grandchild keeps the channel open.
//!
//! A supervisor never dies with a job in hand: user code runs on it (the arguments'
//! `Serialize`, the results' `Deserialize`), and so does ipc-channel, which panics when it runs
//! out of file descriptors. Each job is handled under one `catch_unwind`; a panic becomes the
//! error of the task it concerns, and whatever the panic may have left half done (the worker,
//! mid-message) is replaced, so the job completes and the next one finds the slot working.

use std::ops::Range;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use std::time::{Duration, Instant};

use parjob_core::{Error, Job, WorkerExit, catch_task};
use parjob_remote::{CodeOffset, DoneHeader, FrameAt, FrameTag, RunHeader};

use crate::frame::{Done, encode_ahead, encode_tasks, finish_run, outcomes, records_len};
use crate::mapping::Arena;
use crate::queue::{Next, Queue};
use crate::recovery::Recovery;
use crate::report::{SlotReport, reason};
use crate::spawn::{Event, Settings, Starter, Worker, await_exit};
use crate::wire::{ARENA_KEEP_MAX, Forget, monotonic_nanos};

/// How long a worker told to shut down may take before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// How often a supervisor waiting for a frame's `DONE` looks at the status board (one atomic
/// load), and how long after the board says the `DONE` was sent it may take to arrive before
/// the worker is replaced: bytes a task wrote on the worker's channel make the reader thread
/// take the `DONE` for the rest of a message that never ends.
const REPLY_POLL: Duration = Duration::from_millis(250);
const REPLY_GRACE: Duration = Duration::from_secs(1);

/// How long past the timeout a timed frame may wait for its first task to start before its
/// worker is taken for stopped or stuck and killed.
const START_MARGIN: Duration = Duration::from_millis(250);
/// An untimed frame none of whose tasks started this long after its sending, on a worker
/// that is stopped (SIGSTOP), is taken back: the worker is killed and the frame runs on
/// another (see [`Supervisor::stopped_before_its_first_task`]).
const STOPPED_AFTER: Duration = Duration::from_secs(1);

/// How long before a timed task's limit its supervisor wakes, to watch the last stretch
/// without sleeping (see `Supervisor::recv_until`): a timed sleep of a thread ends up to a
/// millisecond late on a loaded machine, and the first look, timed from the frame's sending,
/// finds the task started a little later and would sleep a second time.
const CLOCK_SPIN: Duration = Duration::from_millis(1);

/// How long at most a slot that lost its worker waits for the pool to go idle before it starts
/// the replacement, while another slot stands idle with a worker (see
/// `Queue::next_without_worker`).
const REPLACE_QUIET: Duration = Duration::from_millis(10);

/// How many times a lost worker's replacement is started before the slot gives up (its jobs
/// then fail with the last start's error), and the pause after the first failed start, doubled
/// after each one up to [`START_PAUSE_MAX`]: a descriptor shortage or a loaded machine usually
/// passes within the 0.3 s that makes.
const START_TRIES: u32 = 6;
const START_PAUSE: Duration = Duration::from_millis(10);
const START_PAUSE_MAX: Duration = Duration::from_millis(500);

/// How one frame ended.
enum FrameEnd {
    /// The `DONE` came back.
    Done(Done),
    /// The worker died (or was killed for a timeout, or for a reply that was not this frame's)
    /// holding task `at` of the frame.
    Died {
        at: usize,
        error: Error,
    },
    /// The worker died before starting any task of the frame.
    Lost {
        pid: u32,
        status: WorkerExit,
    },
    /// Shared memory the worker and the driver map was cut short during the frame: the worker
    /// was replaced, and nothing says which task did it. `error` is for the frame's first task,
    /// if it is the frame's only one.
    Spoiled {
        error: Error,
    },
    Closing,
}

/// What the supervisor is doing in a job, for the error a panic there becomes.
#[derive(Clone, Copy, Debug)]
enum Stage {
    /// Encoding the arguments of the job's tasks `start..end`: their `Serialize` runs.
    Encoding { start: usize, end: usize },
    /// Decoding a frame's outcomes: the results' `Deserialize` runs.
    Decoding,
    /// Anything else: building, sending and awaiting a frame.
    Frame,
}

/// The largest frame sent to a worker while another of its frames is out, and the largest
/// frame behind which one is sent (bytes of tasks): well under a socket's buffer, so that
/// sending it never waits for the worker to read, and always inline (the task arena is the
/// frame's out). Bigger frames take long enough to move that a round trip does not count.
const AHEAD_MAX: usize = 64 << 10;

/// A frame sent to the worker, and what waiting for it needs.
struct Sent {
    tag: FrameTag,
    /// The generation of the worker it was sent to.
    generation: u64,
    /// The input index of its first task.
    first_index: usize,
    /// Its tasks, by position in their job.
    range: Range<usize>,
    in_arena: bool,
    /// The bytes of its `RUN`.
    bytes: usize,
    timeout: Option<Duration>,
    sent_at: Instant,
    /// The `seq` of the frame that was out when this one was sent (see
    /// [`Supervisor::send_ahead`]): until the board says that one's `DONE` was sent, no task
    /// of this frame has started.
    behind: Option<u64>,
    /// The function its tasks call.
    function: &'static str,
}

/// A frame behind which another is sent ([`Supervisor::send_ahead`]) is one of a function
/// whose last frame on this slot took at most this long: pipelining hides a round trip of
/// 10-200 us, which only counts for frames of a few milliseconds (auto batching aims at 5),
/// while a job sent behind a long frame waits there even when another worker frees up or
/// comes up first (a lesson's two 250 ms halves both ran on the first worker of a new pool).
const AHEAD_BEHIND_BUSY_MAX: Duration = Duration::from_millis(20);

/// A job taken from the queue while the slot's worker ran another job's frame, and its first
/// frame, if it was sent then (see [`Supervisor::send_ahead`]). It is the slot's next job.
struct Ahead {
    job: Job,
    /// The job's entry, once checked and the job marked started (`None` if not: the job then
    /// runs as any job taken from the queue).
    entry: Option<CodeOffset>,
    sent: Option<Sent>,
    progress: Progress,
}

/// How a timed frame's task stands against its timeout.
enum Clock {
    /// It ran past it: the worker was killed.
    Over,
    /// No task of the frame started within the timeout (and a margin) of its sending: the
    /// worker, stopped or stuck before its first task, was killed.
    Stuck,
    /// Look again after this long.
    Next(Duration),
    /// The board was cut short: it tells nothing any more.
    Cut,
}

/// A job's progress across its frames (and across a panic, which ends a frame early).
#[derive(Default)]
struct Progress {
    busy: Duration,
    recovery: Recovery,
}

/// One worker slot of a pool.
pub(crate) struct Supervisor {
    index: usize,
    workers: usize,
    settings: Arc<Settings>,
    queue: Arc<Queue>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    worker: Option<Worker>,
    generation: u64,
    /// The number of the last frame sent from this slot (to any of its workers).
    frames: u64,
    stage: Stage,
    /// The `RUN` being built, kept between frames (up to a size) to save its allocation.
    buf: Vec<u8>,
    /// Transport figures and worker changes, reported with each job.
    report: SlotReport,
    /// Workers killed for a timeout and left to die: their waiter threads reap them, and they
    /// are forgotten once reaped (see [`Supervisor::leave_to_die`]); the slot waits for the
    /// rest before it retires, so a dropped pool leaves no zombie.
    graveyard: Vec<Worker>,
    /// The next job, taken while the worker ran the current one (see
    /// [`Supervisor::send_ahead`]).
    ahead: Option<Ahead>,
    /// The function whose last frame on this slot ran within [`AHEAD_BEHIND_BUSY_MAX`]: only
    /// its frames have another sent behind them.
    quick_function: Option<&'static str>,
    /// The `seq` of the frame that was out when the frame awaited now was sent, if any
    /// ([`Sent::behind`], for [`Supervisor::bury`]).
    behind: Option<u64>,
    /// Whether the queue was last told that this slot has a live worker ([`Queue::manned`]).
    manned: bool,
}

impl Supervisor {
    /// Slot `index` of a pool of `workers`, with no worker yet (see [`Supervisor::start_worker`]).
    pub(crate) fn new(
        index: usize,
        workers: usize,
        settings: Arc<Settings>,
        queue: Arc<Queue>,
        events: (Sender<Event>, Receiver<Event>),
    ) -> Supervisor {
        Supervisor {
            index,
            workers,
            settings,
            queue,
            events_tx: events.0,
            events: events.1,
            worker: None,
            generation: 0,
            frames: 0,
            stage: Stage::Frame,
            buf: Vec::new(),
            report: SlotReport::default(),
            graveyard: Vec::new(),
            ahead: None,
            quick_function: None,
            behind: None,
            manned: false,
        }
    }

    /// Serves jobs until the pool closes, then retires the worker. A panic that escapes a job's
    /// own recovery (in the code between jobs) costs the worker, never the slot: serving goes on
    /// with a new one.
    pub(crate) fn run(&mut self) {
        while catch_task(|| self.serve()).is_err() {
            self.discard_worker();
        }
        self.tell_manned();
    }

    /// Tells the queue whether the slot has a live worker, if that changed since it last did.
    fn tell_manned(&mut self) {
        let has_worker = self.worker.is_some();
        if has_worker != self.manned {
            self.manned = has_worker;
            self.queue.manned(has_worker);
        }
    }

    fn serve(&mut self) {
        let mut swept = self.queue.sweep_epoch();
        // When the replacement of a lost worker is due at the latest, if it was not started
        // yet (see `Queue::next_without_worker`).
        let mut replace_at: Option<Instant> = None;
        loop {
            self.tell_manned();
            if let Some(ahead) = self.ahead.take() {
                let lost = match &ahead.sent {
                    Some(sent) => !self.holds(sent),
                    None => self.worker.is_none(),
                };
                if lost && ahead.job.batch().outcomes_len() == 0 && !self.queue.closing() {
                    // Its worker died before running it (nothing of it ran): it goes back to
                    // the queue's front, for a slot whose worker is up rather than to wait
                    // for this one's replacement.
                    self.queue.give_back(ahead.job);
                } else {
                    // Taken (and perhaps sent) while the last job ran: it goes first.
                    self.sweep_graveyard();
                    self.run_ahead(ahead);
                }
            } else {
                let next = match replace_at {
                    Some(at) if self.worker.is_none() => self.queue.next_without_worker(swept, at),
                    _ => self.queue.next(swept, self.worker.is_some()),
                };
                let Some(next) = next else {
                    break;
                };
                self.sweep_graveyard();
                match next {
                    Next::Job(job) => self.run_job(job),
                    Next::Replace => {
                        // If that fails, the next job tries again and reports why.
                        replace_at = None;
                        let _ = self.replace_worker();
                        continue;
                    }
                    Next::Sweep { epoch } => {
                        swept = epoch;
                        // ipc-channel panics when a descriptor cannot be duplicated; the
                        // worker may then have half a FORGET.
                        if catch_task(|| self.forget_dropped_segments()).is_err() {
                            self.discard_worker();
                        }
                    }
                }
            }
            if self.worker.is_none() && replace_at.is_none() && !self.queue.closing() {
                // Replace a dead worker before the next run needs it, but not on the path of
                // the calls right after the loss (see `Queue::next_without_worker`).
                self.tell_manned();
                replace_at = Some(Instant::now() + REPLACE_QUIET);
            }
        }
        self.retire_worker();
        self.tell_manned();
        self.empty_graveyard();
    }

    /// Forgets the workers of the graveyard that have been reaped (their waiter did it).
    fn sweep_graveyard(&mut self) {
        self.graveyard.retain(|worker| !worker.child.is_reaped());
    }

    /// Waits (up to a few seconds) until every worker of the graveyard is reaped and its last
    /// output forwarded, and forgets them.
    fn empty_graveyard(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.graveyard.iter().any(|w| !w.child.is_reaped()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for worker in self.graveyard.drain(..) {
            worker.wait_for_output();
        }
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

    /// Starts a worker in this slot, once. Must be called on the supervisor's thread, which
    /// outlives the worker (its parent-death signal is tied to it).
    ///
    /// # Errors
    /// The start's error (a panic while starting is one too).
    pub(crate) fn start_worker(&mut self) -> Result<(), Error> {
        self.generation += 1;
        let generation = self.generation;
        let starter = Starter {
            index: self.index,
            workers: self.workers,
            settings: &self.settings,
            events_tx: &self.events_tx,
            events: &self.events,
        };
        let index = self.index;
        let started = catch_task(|| starter.start(generation)).unwrap_or_else(|message| {
            Err(Error::worker(
                index,
                format!("starting a worker panicked: {message}"),
            ))
        });
        let worker = started?;
        self.report.started(self.index, worker.pid);
        self.worker = Some(worker);
        Ok(())
    }

    /// Starts a worker to replace a lost one, trying again after a pause when a start fails
    /// (a shortage of file descriptors or memory is often brief), up to [`START_TRIES`] times.
    fn replace_worker(&mut self) -> Result<(), Error> {
        let mut pause = START_PAUSE;
        let mut tries = 1;
        loop {
            match self.start_worker() {
                Ok(()) => return Ok(()),
                Err(error) if tries >= START_TRIES || !self.pause(pause) => return Err(error),
                Err(_) => {
                    tries += 1;
                    pause = (pause * 2).min(START_PAUSE_MAX);
                }
            }
        }
    }

    /// Waits `pause`; returns `false` at once if the pool closes meanwhile (the `Close` is put
    /// back for whoever waits next).
    fn pause(&self, pause: Duration) -> bool {
        let deadline = Instant::now() + pause;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Close) => {
                    let _ = self.events_tx.send(Event::Close);
                    return false;
                }
                Ok(_) => {} // about a worker that is gone
                Err(RecvTimeoutError::Timeout) => return !self.queue.closing(),
                Err(RecvTimeoutError::Disconnected) => return false,
            }
        }
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
                fail_the_rest(&mut job, &mut Recovery::default(), &error);
                job.complete(Duration::ZERO);
                return;
            }
        };
        if !job.mark_started() {
            // Cancelled before it started (`Future::cancel`): complete it without running.
            job.complete(Duration::ZERO);
            return;
        }
        self.finish_job(job, entry, None, Progress::default());
    }

    /// Runs the job taken ahead (see [`Supervisor::send_ahead`]): first the frame sent then,
    /// if it still stands, then the rest as for any job.
    fn run_ahead(&mut self, ahead: Ahead) {
        let Ahead {
            job,
            entry,
            sent,
            progress,
        } = ahead;
        let Some(entry) = entry else {
            // Not checked nor sent: as any job from the queue.
            self.run_job(job);
            return;
        };
        // Its figures are its own: the last job's went with it.
        self.report.swap_ahead();
        self.finish_job(job, entry, sent, progress);
    }

    /// Runs the frames of a started job (beginning by awaiting `sent`, a frame of it already
    /// sent, if any) and completes it.
    fn finish_job(
        &mut self,
        mut job: Job,
        entry: CodeOffset,
        mut sent: Option<Sent>,
        mut progress: Progress,
    ) {
        // One catch_unwind per job (not per task or frame): after a panic the job goes on
        // where it stopped, with the task the panic concerns blamed.
        while let Err(message) = catch_task(|| {
            if let Some(sent) = sent.take() {
                self.finish_frame(&mut job, &sent, &mut progress, true);
            }
            self.run_frames(&mut job, entry, &mut progress);
        }) {
            self.recover_from_panic(&mut job, &mut progress.recovery, &message);
        }
        self.report.deliver(&mut job, self.index);
        job.complete(progress.busy);
    }

    /// Awaits frame `sent` of `job`, sent while another frame was out, and records how it
    /// ended; with `pipeline`, the next job's first frame may be sent behind it meanwhile (see
    /// [`Supervisor::send_ahead`]). A frame whose worker is gone (it died, or was replaced,
    /// during the frame before) is forgotten: its tasks are sent again to the next worker, no
    /// task blamed.
    fn finish_frame(
        &mut self,
        job: &mut Job,
        sent: &Sent,
        progress: &mut Progress,
        pipeline: bool,
    ) {
        if !self.holds(sent) {
            return;
        }
        let end = self.await_frame(sent, pipeline);
        self.frame_ended(job, sent.range.clone(), end, progress);
    }

    /// Whether the slot's worker is the one `sent` went to.
    fn holds(&self, sent: &Sent) -> bool {
        self.worker
            .as_ref()
            .is_some_and(|w| w.generation == sent.generation)
    }

    /// Sends the first frame of the next queued job now, while the worker runs frame `out`,
    /// so that the worker starts it as soon as it sends `out`'s `DONE`,
    /// without waiting a round trip for it: two frames in flight per worker. The job is then
    /// the slot's next one, whether it was sent or not.
    ///
    /// Only for small frames with no timeout, on pools that do not recycle workers, and only
    /// when no other slot with a worker stands idle (it takes the job instead): a timed frame's
    /// clock must start when its first task does, and a recycled worker must not be sent a
    /// frame past its share. A frame sent ahead is inline and small ([`AHEAD_MAX`]), and never
    /// touches the task arena, which the worker may be reading.
    fn send_ahead(&mut self, out: &Sent) {
        if self.ahead.is_some() || !self.may_go_behind(out) {
            return;
        }
        let Some(job) = self.queue.take_ahead(may_go_ahead) else {
            return;
        };
        let mut ahead = Ahead {
            job,
            entry: None,
            sent: None,
            progress: Progress::default(),
        };
        let entry = ahead
            .job
            .batch()
            .remote_entry()
            .and_then(|entry| CodeOffset::of_entry(entry, ahead.job.batch().function_name()));
        let start = ahead.job.batch().outcomes_len();
        let end = ahead.job.batch().len();
        if let Ok(entry) = entry
            && start < end
        {
            // Its tasks may run from now on: `Future::cancel` must fail from here.
            if !ahead.job.mark_started() {
                // Cancelled before it started: complete it without running.
                ahead.job.complete(Duration::ZERO);
                return;
            }
            ahead.entry = Some(entry);
            // A panic in the arguments' Serialize: the job is sent later, as the current one,
            // where the panic is blamed on its task.
            let sent = catch_task(|| self.send_ahead_frame(&ahead.job, entry, start..end, out));
            match sent {
                Ok(sent) => ahead.sent = sent,
                Err(_) => self.stage = Stage::Frame,
            }
        }
        self.ahead = Some(ahead);
    }

    /// Whether a frame may be sent behind `out` (see [`Supervisor::send_ahead`]).
    fn may_go_behind(&self, out: &Sent) -> bool {
        self.quick_function == Some(out.function)
            && out.timeout.is_none()
            && !out.in_arena
            && out.bytes <= AHEAD_MAX + RunHeader::LEN
            && self.settings.options.max_tasks_per_worker.is_none()
            && self.holds(out)
    }

    /// Encodes and sends tasks `range` of `job` behind frame `out`, if they fit
    /// [`AHEAD_MAX`].
    fn send_ahead_frame(
        &mut self,
        job: &Job,
        entry: CodeOffset,
        range: Range<usize>,
        out: &Sent,
    ) -> Option<Sent> {
        let worker = self.worker.as_mut()?;
        let encoding = Instant::now();
        let limit = AHEAD_MAX.min(self.settings.options.max_nbytes);
        let shipments = encode_ahead(&mut self.buf, job.batch(), range.clone(), worker, limit)?;
        self.frames += 1;
        let tag = FrameTag {
            generation: worker.generation,
            seq: self.frames,
        };
        let (send, shipments, in_arena) = finish_run(
            &mut self.buf,
            tag,
            None,
            entry,
            shipments,
            worker,
            self.settings.options.max_nbytes,
        );
        debug_assert!(!in_arena, "a frame sent ahead is inline");
        self.report.encoded_ahead(encoding, self.buf.len());
        worker.expect_reply();
        // A worker that cannot be reached has died: the frame out now hears of it, and this
        // one is sent again to the next worker (see `finish_frame`).
        let _ = worker
            .tasks
            .send(&self.buf[..send])
            .map_err(|e| e.to_string())
            .and_then(|()| worker.segments.send(&worker.big_tasks, shipments));
        Some(Sent {
            tag,
            generation: worker.generation,
            first_index: job.batch().first_index() + range.start,
            range,
            in_arena: false,
            bytes: send,
            timeout: None,
            sent_at: Instant::now(),
            behind: Some(out.tag.seq),
            function: job.batch().function_name(),
        })
    }

    /// Awaits the frame sent ahead, if any, before the current job sends another frame (its
    /// first frame did not end it: the worker runs the frames in the order they were sent, so
    /// the one ahead comes back first). Its outcomes are recorded in its job, which stays the
    /// slot's next.
    fn settle_ahead(&mut self) {
        let Some(mut ahead) = self.ahead.take() else {
            return;
        };
        if ahead.sent.is_some() {
            self.report.swap_ahead();
            let stage = self.stage;
            let Ahead {
                job,
                sent,
                progress,
                ..
            } = &mut ahead;
            while let Err(message) = catch_task(|| {
                if let Some(sent) = sent.take() {
                    // Nothing may go behind it: the current job's next frame goes next.
                    self.finish_frame(job, &sent, progress, false);
                }
            }) {
                self.recover_from_panic(job, &mut progress.recovery, &message);
            }
            self.stage = stage;
            self.report.swap_ahead();
        }
        self.ahead = Some(ahead);
    }

    /// The frames of `job` until every task has an outcome (or the run is cancelled, or the
    /// pool closes).
    fn run_frames(&mut self, job: &mut Job, entry: CodeOffset, progress: &mut Progress) {
        loop {
            let recovery = &mut progress.recovery;
            self.stage = Stage::Frame;
            let start = job.batch().outcomes_len();
            let len = job.batch().len();
            if start >= len {
                return;
            }
            if let Some(error) = recovery.due(start) {
                if matches!(error, Error::WorkerCrashed { .. }) {
                    self.report.report_now(job, Some(&error));
                }
                job.batch_mut().push_failure(error);
                continue;
            }
            // `run` ends at its first failure: the frames after it would only delay the error.
            let failed = job.batch().failures_len() > 0;
            if (failed && job.control().task_failed())
                || job.control().is_cancelled()
                || self.queue.closing()
            {
                return;
            }
            // The frame sent ahead comes back before any other.
            self.settle_ahead();
            // A worker that died while idle is not blamed on this frame: replace it first.
            self.forget_if_dead();
            if self.worker.is_none() {
                if let Err(error) = self.replace_worker() {
                    // Workers cannot be started at all: the rest fails with the reason, but a
                    // task whose crash is known keeps its own error.
                    fail_the_rest(job, recovery, &error);
                    return;
                }
                // The replacement's event comes now, not after the rest of the job.
                self.report.report_now(job, None);
            }
            let room = match (self.settings.options.max_tasks_per_worker, &self.worker) {
                (Some(max), Some(worker)) => Some(max.saturating_sub(worker.tasks_run)),
                _ => None,
            };
            let end = recovery.frame_end(start, len, room);
            let ended = self.run_frame(job, entry, start..end);
            if !self.frame_ended(job, start..end, ended, progress) {
                return;
            }
        }
    }

    /// Records how the frame of tasks `range` of `job` ended. `false` if the pool is closing.
    fn frame_ended(
        &mut self,
        job: &mut Job,
        range: Range<usize>,
        ended: FrameEnd,
        progress: &mut Progress,
    ) -> bool {
        let recovery = &mut progress.recovery;
        let (start, end) = (range.start, range.end);
        match ended {
            FrameEnd::Done(done) => {
                // What its tasks printed is out before their results are (a program that
                // prints after `run` returns would otherwise print first now and then).
                if let Some(worker) = &self.worker {
                    worker.wait_until_printed();
                }
                recovery.frame_done();
                let busy = self.take_outcomes(job, done, range, recovery);
                self.quick_function =
                    (busy <= AHEAD_BEHIND_BUSY_MAX).then(|| job.batch().function_name());
                progress.busy += busy;
            }
            FrameEnd::Lost { pid, status } => {
                self.report.gone(|| format!("it was lost: {status}"));
                let index = job.batch().first_index() + start;
                let worker = self.index;
                recovery.frame_lost(start, || Error::worker_crashed(index, worker, pid, status));
            }
            FrameEnd::Died { at, error } => {
                self.report.gone(|| reason(&error));
                if matches!(error, Error::WorkerCrashed { .. }) {
                    // Said now, before the tasks ahead of it run again and its replacement
                    // starts, not when the job comes back.
                    self.report.report_now(job, Some(&error));
                }
                recovery.worker_died(start + at, error);
            }
            FrameEnd::Spoiled { error } => {
                self.report.gone(|| reason(&error));
                recovery.frame_spoiled(start, end, || error);
            }
            FrameEnd::Closing => return false,
        }
        true
    }

    /// A panic ended a frame of `job` early: blames the task it concerns (its error is
    /// recorded when the job gets to it) and replaces whatever the panic may have left half
    /// done.
    fn recover_from_panic(&mut self, job: &mut Job, recovery: &mut Recovery, message: &str) {
        let next = job.batch().outcomes_len();
        let first_index = job.batch().first_index();
        let function = job.batch().function_name();
        let (at, error) = match self.stage {
            Stage::Encoding { start, end } => {
                // Nothing was sent and the worker was not touched. Find whose arguments panic
                // by encoding them one at a time (only here: a frame is encoded in one go).
                let mut scratch = Vec::new();
                let culprit = (start..end).find_map(|i| {
                    scratch.clear();
                    let encoded = catch_task(|| job.batch().encode_tasks(i..i + 1, &mut scratch));
                    encoded.err().map(|message| (i, message))
                });
                let (at, message) = culprit.unwrap_or_else(|| (start, message.to_string()));
                let index = first_index + at;
                let error = format!(
                    "task {index}: cannot encode the arguments of `{function}`: their Serialize \
                     impl panicked: {message}"
                );
                (at, Error::worker(self.index, error))
            }
            Stage::Decoding => {
                // Outcomes are decoded in order: the panic was in the next one. The worker is
                // idle and kept its result arena (see take_outcomes); the frame's later tasks
                // run again.
                let index = first_index + next;
                let error = format!(
                    "task {index}: cannot decode the result of `{function}`: its Deserialize \
                     impl panicked: {message}"
                );
                (next, Error::worker(self.index, error))
            }
            Stage::Frame => {
                // Mid-frame (a message half sent, an arena half made): the worker cannot be
                // trusted to be in step any more.
                self.discard_worker();
                let index = first_index + next;
                let error = format!(
                    "task {index}: the driver failed while running its frame, and the worker \
                     was replaced: {message}"
                );
                (next, Error::worker(self.index, error))
            }
        };
        self.stage = Stage::Frame;
        recovery.worker_died(at, error);
    }

    /// Decodes the outcomes of the frame of tasks `range` into `job`, keeps the result arena
    /// for the worker, and recycles a worker that has run its share; a task that overran the
    /// frame's timeout is blamed, and its worker killed, as if the driver had caught it running.
    /// Returns the worker's busy time.
    fn take_outcomes(
        &mut self,
        job: &mut Job,
        done: Done,
        range: Range<usize>,
        recovery: &mut Recovery,
    ) -> Duration {
        let Done {
            header,
            bytes,
            arena,
        } = done;
        // The result arena goes back to the worker before any decoding: the worker keeps its
        // own mapping of it, and a panic in a result's Deserialize must not leave the two
        // disagreeing about whether it exists.
        let mut oversized = None;
        match (arena, self.worker.as_mut()) {
            (Some(arena), Some(worker)) if arena.len() <= ARENA_KEEP_MAX => {
                worker.result_arena = Some(arena);
            }
            (arena, _) => oversized = arena,
        }
        let arena = self
            .worker
            .as_ref()
            .and_then(|w| w.result_arena.as_ref())
            .or(oversized.as_ref());
        let sent = range.len();
        // A task past its timeout ends the frame there: the outcomes before it count, its own
        // is the timeout, and the tasks after it run again on a fresh worker.
        let overrun = header
            .overrun
            .and_then(|at| usize::try_from(at).ok())
            .filter(|&at| at < sent && job.control().timeout().is_some());
        let in_arena = match header.outcomes {
            FrameAt::Arena { len } => len,
            FrameAt::Inline => 0,
        };
        self.report
            .replied(bytes.len() as u64 + in_arena, header.busy);
        let before = job.batch().outcomes_len();
        let failure = match outcomes(&bytes, arena) {
            Ok(outcomes) => {
                // Only a frame with an overrun is measured record by record: the others are
                // decoded whole, in one pass.
                let (outcomes, expected) = match overrun {
                    None => (Some(outcomes), sent),
                    Some(at) => (records_len(outcomes, at).map(|len| &outcomes[..len]), at),
                };
                match outcomes {
                    Some(outcomes) => {
                        self.stage = Stage::Decoding;
                        let decoding = Instant::now();
                        let decoded = job.batch_mut().decode_outcomes(outcomes);
                        self.report.decoded(decoding);
                        self.stage = Stage::Frame;
                        (decoded < expected)
                            .then(|| format!("returned {decoded} outcomes for {expected} tasks"))
                    }
                    None => Some(format!(
                        "returned fewer outcomes than the {expected} expected"
                    )),
                }
            }
            Err(reason) => Some(format!("sent a malformed reply ({reason})")),
        };
        if let Some(worker) = &self.worker {
            // The worker may write its result arena again (see `frame::finish_done`).
            worker.board.outcomes_read(header.tag.seq);
        }
        let mut decoded = job.batch().outcomes_len() - before;
        if let Some(failure) = failure {
            // A reply that does not hold every outcome cannot happen between two processes of
            // one build; if it does, the next task fails rather than loop on it forever.
            let index = job.batch().first_index() + job.batch().outcomes_len();
            job.batch_mut().push_failure(Error::worker(
                self.index,
                format!("{failure}; task {index} is reported failed"),
            ));
            decoded += 1;
        } else if let (Some(at), Some(limit)) = (overrun, job.control().timeout()) {
            let index = job.batch().first_index() + range.start + at;
            let error = match &self.worker {
                Some(worker) => Error::timeout_killing(index, limit, self.index, worker.pid),
                None => Error::timeout(index, limit, true),
            };
            self.report.gone(|| reason(&error));
            recovery.worker_died(range.start + at, error);
            self.discard_worker();
        }
        if let Some(worker) = &mut self.worker {
            worker.tasks_run += decoded;
            if self
                .settings
                .options
                .max_tasks_per_worker
                .is_some_and(|max| worker.tasks_run >= max)
            {
                self.report
                    .recycled(self.index, worker.pid, worker.tasks_run);
                self.retire_worker();
            }
        }
        header.busy
    }

    /// Sends tasks `range` of the job to the worker and waits for their outcomes, sending the
    /// next job's first frame meanwhile if it may go (see [`Supervisor::send_ahead`]).
    fn run_frame(&mut self, job: &Job, entry: CodeOffset, range: Range<usize>) -> FrameEnd {
        let sent = match self.send_frame(job, entry, range) {
            Ok(sent) => sent,
            Err(end) => return *end,
        };
        self.await_frame(&sent, true)
    }

    /// Sends tasks `range` of the job to the worker, which has no other frame out. Returns the
    /// frame, or how it ended when it could not be sent.
    fn send_frame(
        &mut self,
        job: &Job,
        entry: CodeOffset,
        range: Range<usize>,
    ) -> Result<Sent, Box<FrameEnd>> {
        let Some(worker) = self.worker.as_mut() else {
            return Err(Box::new(FrameEnd::Closing));
        };
        let timeout = job.control().timeout();
        self.stage = Stage::Encoding {
            start: range.start,
            end: range.end,
        };
        let encoding = Instant::now();
        let shipments = encode_tasks(&mut self.buf, job.batch(), range.clone(), worker);
        self.stage = Stage::Frame;
        self.frames += 1;
        let tag = FrameTag {
            generation: worker.generation,
            seq: self.frames,
        };
        let (send, shipments, in_arena) = finish_run(
            &mut self.buf,
            tag,
            timeout,
            entry,
            shipments,
            worker,
            self.settings.options.max_nbytes,
        );
        self.report.encoded(encoding, self.buf.len());
        worker.board.reset();
        worker.expect_reply();
        let first_index = job.batch().first_index() + range.start;
        if worker.board.is_cut()
            || (in_arena && worker.task_arena.as_ref().is_some_and(|a| a.is_cut()))
        {
            // Cut while it was idle (by a process a task left behind): no task of this frame
            // is to blame.
            let pid = worker.pid;
            self.discard_worker();
            return Err(Box::new(FrameEnd::Lost {
                pid,
                status: WorkerExit::Lost("replaced: its shared memory was cut short".into()),
            }));
        }
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
        if sent.is_err() {
            // The worker is gone; its waiter will say how.
            self.behind = None;
            let end = self.bury(first_index, range.len(), None, false, None, tag);
            return Err(Box::new(end));
        }
        let sent = Sent {
            tag,
            generation,
            first_index,
            range,
            in_arena,
            bytes: send,
            timeout,
            sent_at: Instant::now(),
            behind: None,
            function: job.batch().function_name(),
        };
        Ok(sent)
    }

    /// Waits for the outcomes of frame `sent`, watching its worker (and the clock, if it is
    /// timed) meanwhile. With `pipeline`, the next queued job's first frame is sent behind it,
    /// now or as soon as one is queued (see [`Supervisor::send_ahead`]).
    fn await_frame(&mut self, sent: &Sent, pipeline: bool) -> FrameEnd {
        let pipeline = pipeline && self.may_go_behind(sent);
        if pipeline {
            self.want_ahead(sent);
        }
        let end = self.await_reply(sent, pipeline);
        if pipeline {
            self.queue.unwant(self.index);
        }
        end
    }

    /// Sends the next job's first frame behind `out` if one is queued, or asks the queue to
    /// say when one is ([`Event::Queued`]), unless a job was taken ahead already.
    fn want_ahead(&mut self, out: &Sent) {
        while self.ahead.is_none()
            && !self
                .queue
                .want_ahead(self.index, &self.events_tx, may_go_ahead)
        {
            self.send_ahead(out);
        }
    }

    /// [`Supervisor::await_frame`]'s wait.
    fn await_reply(&mut self, sent: &Sent, pipeline: bool) -> FrameEnd {
        let Sent {
            tag,
            generation,
            first_index,
            ref range,
            in_arena,
            timeout,
            bytes: _,
            sent_at,
            behind,
            function: _,
        } = *sent;
        self.behind = behind;
        let mut timed_out = false;
        // Set when the worker was killed because no task of the frame started in time: the
        // frame is then lost, not any task's fault (see `FrameEnd::Lost`).
        let mut stuck: Option<(u32, Duration)> = None;
        // A timed frame's first look at the board: no task can be over before `limit`.
        // A limit past what `Instant` can hold never comes: such a frame is not timed.
        let mut look_at =
            timeout.and_then(|limit| sent_at.checked_add(limit.saturating_sub(CLOCK_SPIN)));
        // When the board first said this frame's DONE was sent (see `REPLY_POLL`).
        let mut done_seen: Option<Instant> = None;
        let mut poll_at = sent_at + REPLY_POLL;
        loop {
            let clock_at = look_at.filter(|_| timeout.is_some() && !timed_out);
            let wake = clock_at.map_or(poll_at, |at| at.min(poll_at));
            // The last stretch before a task's limit is watched without sleeping.
            let spin = clock_at.is_some_and(|at| {
                at <= poll_at && at.saturating_duration_since(Instant::now()) <= CLOCK_SPIN
            });
            let event = match self.recv_until(wake, spin) {
                Ok(event) => event,
                Err(RecvTimeoutError::Disconnected) => return FrameEnd::Closing,
                Err(RecvTimeoutError::Timeout) if timed_out => {
                    // Killed: waiting for the news of its death.
                    poll_at = Instant::now() + REPLY_POLL;
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    let now = Instant::now();
                    if done_seen.is_none()
                        && self
                            .worker
                            .as_ref()
                            .is_some_and(|w| w.board.last_done() == tag.seq)
                    {
                        done_seen = Some(now);
                    }
                    if let Some(seen) = done_seen {
                        // The worker sent its DONE; the clock no longer runs.
                        look_at = None;
                        if now.duration_since(seen) >= REPLY_GRACE {
                            return self.stray(
                                first_index,
                                "finished the frame but its reply never arrived: something \
                                 else wrote on its channel (a task?)"
                                    .into(),
                            );
                        }
                        poll_at = (seen + REPLY_GRACE).min(now + REPLY_POLL);
                        continue;
                    }
                    if now >= poll_at {
                        poll_at = now + REPLY_POLL;
                    }
                    if timeout.is_none()
                        && now.duration_since(sent_at) >= STOPPED_AFTER
                        && self.stopped_before_its_first_task(tag)
                    {
                        // An untimed frame has no clock to find this: a worker stopped
                        // (SIGSTOP) while idle would hold its frame for ever while other
                        // workers stand idle. No task of it started, so nothing is lost.
                        if let Some(worker) = &self.worker {
                            worker.child.kill();
                        }
                        timed_out = true;
                        stuck = Some((self.worker.as_ref().map_or(0, |w| w.pid), STOPPED_AFTER));
                        continue;
                    }
                    if let (Some(limit), Some(at)) = (timeout, clock_at)
                        && now >= at
                    {
                        match self.check_clock(limit, sent_at) {
                            Clock::Over => {
                                if let Some(end) = self.leave_to_die(
                                    first_index,
                                    range.len(),
                                    tag,
                                    in_arena,
                                    limit,
                                ) {
                                    return end;
                                }
                                timed_out = true;
                            }
                            Clock::Stuck => {
                                timed_out = true;
                                stuck = Some((self.worker.as_ref().map_or(0, |w| w.pid), limit));
                            }
                            Clock::Next(after) => {
                                // Woken early, for the last stretch (see `CLOCK_SPIN`).
                                let early = if after > CLOCK_SPIN {
                                    CLOCK_SPIN
                                } else {
                                    Duration::ZERO
                                };
                                look_at = Instant::now().checked_add(after - early);
                            }
                            Clock::Cut => return self.spoiled(first_index, "status board"),
                        }
                    }
                    continue;
                }
            };
            // A worker killed for being stuck before its first task timed no task out.
            let timed_out_after = timeout.filter(|_| timed_out && stuck.is_none());
            let end = match event {
                Event::Reply {
                    generation: g,
                    bytes,
                    new_arena,
                } if g == generation => {
                    // Its DONE, even one sent just before a kill: the frame is done.
                    return self.reply(bytes, new_arena, tag, in_arena, first_index);
                }
                Event::Broken {
                    generation: g,
                    reason,
                } if g == generation => {
                    return self.stray(first_index, reason);
                }
                Event::Disconnected { generation: g } if g == generation => {
                    self.bury(first_index, range.len(), None, true, timed_out_after, tag)
                }
                Event::Exited {
                    generation: g,
                    status,
                } if g == generation => self.bury(
                    first_index,
                    range.len(),
                    Some(status),
                    false,
                    timed_out_after,
                    tag,
                ),
                Event::Close => {
                    if let Some(worker) = &self.worker {
                        worker.child.kill();
                    }
                    self.bury(first_index, range.len(), None, false, None, tag);
                    return FrameEnd::Closing;
                }
                Event::Queued => {
                    if pipeline && self.holds(sent) {
                        self.want_ahead(sent);
                    }
                    continue;
                }
                _ => continue, // about an earlier worker of this slot
            };
            return match (stuck, end) {
                // Killed before any task of the frame started: whatever the board says now, no
                // task of it is to blame.
                (Some((pid, limit)), FrameEnd::Lost { .. } | FrameEnd::Died { .. }) => {
                    FrameEnd::Lost {
                        pid,
                        status: WorkerExit::Lost(format!(
                            "killed: no task of its frame started within {limit:?} of its \
                             sending (the worker was stopped, or stuck before its first task)"
                        )),
                    }
                }
                (_, end) => end,
            };
        }
    }

    /// The next event, or a timeout at `wake`; with `spin`, the wait polls the channel instead
    /// of sleeping (for at most [`CLOCK_SPIN`], see [`Supervisor::await_reply`]), so that a
    /// task past its limit is killed when the limit comes, not when the scheduler wakes a
    /// sleeping thread.
    fn recv_until(&self, wake: Instant, spin: bool) -> Result<Event, RecvTimeoutError> {
        if spin {
            loop {
                match self.events.try_recv() {
                    Ok(event) => return Ok(event),
                    Err(TryRecvError::Disconnected) => return Err(RecvTimeoutError::Disconnected),
                    Err(TryRecvError::Empty) => {}
                }
                if Instant::now() >= wake {
                    return Err(RecvTimeoutError::Timeout);
                }
                std::hint::spin_loop();
            }
        }
        self.events
            .recv_timeout(wake.saturating_duration_since(Instant::now()))
    }

    /// A reply came from the worker while frame `tag` (whose first task is `first_index`) was
    /// out: its `DONE`, or a sign that the worker cannot be trusted with the frame.
    fn reply(
        &mut self,
        bytes: Vec<u8>,
        new_arena: Option<Arena>,
        tag: FrameTag,
        in_arena: bool,
        first_index: usize,
    ) -> FrameEnd {
        let header = match DoneHeader::decode(&bytes) {
            Ok((header, _)) if header.tag == tag => header,
            Ok((header, _))
                if header.tag.generation == tag.generation && header.tag.seq < tag.seq =>
            {
                // The reply of an earlier frame: the worker was still running it when this one
                // was sent (something else wrote a DONE for it on its line, which the driver
                // took). No task of this frame is to blame: it goes to a fresh worker.
                let pid = self.worker.as_ref().map_or(0, |w| w.pid);
                self.discard_worker();
                return FrameEnd::Lost {
                    pid,
                    status: WorkerExit::Lost(format!(
                        "replaced: it answered frame {} of generation {} after frame {} was sent \
                         (something other than parjob wrote on its line: a task?)",
                        header.tag.seq, header.tag.generation, tag.seq
                    )),
                };
            }
            Ok((header, _)) => {
                // Another process shares the worker's channels (a task forked, and the copy
                // answered too): never take its reply for this frame's.
                return self.stray(
                    first_index,
                    format!(
                        "sent a reply for another frame (frame {} of worker generation {}, while \
                         frame {} of generation {} was out): a process it forked shares its \
                         channels",
                        header.tag.seq, header.tag.generation, tag.seq, tag.generation
                    ),
                );
            }
            Err(e) => return self.stray(first_index, format!("sent a malformed reply ({e})")),
        };
        let kept = self.worker.as_mut().and_then(|w| w.result_arena.take());
        let done = Done::new(header, bytes, new_arena, kept);
        if let Some(what) = self.cut_memory(&done, in_arena) {
            return self.spoiled(first_index, what);
        }
        FrameEnd::Done(done)
    }

    /// Which shared memory of the frame's (the board, the arenas it used) was cut short, if
    /// any. Costs one load of the board when nothing was (and a byte of each arena used).
    fn cut_memory(&self, done: &Done, in_arena: bool) -> Option<&'static str> {
        let worker = self.worker.as_ref()?;
        if worker.board.is_cut() {
            return Some("status board");
        }
        if in_arena && worker.task_arena.as_ref().is_some_and(|a| a.is_cut()) {
            return Some("task arena");
        }
        let in_result_arena = matches!(done.header.outcomes, FrameAt::Arena { .. });
        if in_result_arena && done.arena.as_ref().is_some_and(|a| a.is_cut()) {
            return Some("result arena");
        }
        None
    }

    /// The worker's `what` was cut short during the frame: replaces the worker.
    fn spoiled(&mut self, first_index: usize, what: &str) -> FrameEnd {
        let pid = self.worker.as_ref().map_or(0, |w| w.pid);
        self.discard_worker();
        let message = format!(
            "task {first_index}: its worker (pid {pid}) was killed and replaced: the {what} it \
             shares with the driver was cut short while the task ran (a task must not truncate \
             parjob's shared memory)"
        );
        FrameEnd::Spoiled {
            error: Error::worker(self.index, message),
        }
    }

    /// The worker `did` something no worker of this build does mid-frame: replaces it and
    /// blames the frame's first task.
    fn stray(&mut self, first_index: usize, did: String) -> FrameEnd {
        let pid = self.worker.as_ref().map_or(0, |w| w.pid);
        self.discard_worker();
        let message =
            format!("task {first_index}: its worker (pid {pid}) {did}; it was killed and replaced");
        // Which task of the frame did it, nothing says: blaming the first one failed innocent
        // tasks one after another. Spoiled: the frame's tasks run again one per frame, and a
        // task whose frame, alone, is spoiled twice in a row is blamed
        // (`Recovery::frame_spoiled`).
        FrameEnd::Spoiled {
            error: Error::worker(self.index, message),
        }
    }

    /// Forgets the worker if it died while idle (news of it waits in the event queue), so
    /// that the next frame goes to a fresh one instead of being blamed for the death. A worker
    /// that replied while idle shares its channels with another process: it goes too.
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
                Event::Disconnected { generation: g }
                | Event::Broken { generation: g, .. }
                | Event::Reply { generation: g, .. }
                    if g == generation =>
                {
                    dead = true;
                }
                Event::Close => close = true,
                _ => {}
            }
        }
        if close {
            // Put it back for run_frame's wait loop.
            let _ = self.events_tx.send(Event::Close);
        }
        if dead && let Some(worker) = self.worker.take() {
            self.report.gone(|| "it died while idle".to_string());
            if !reaped {
                worker.child.kill();
                await_exit(&self.events, &self.events_tx, generation);
            }
            // No crash to report: its last output is forwarded as it comes, and dropping it
            // hangs up its line.
            drop(worker);
        }
    }

    /// Kills the worker, which can no longer be trusted with a frame, and waits until it is
    /// reaped.
    fn discard_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        worker.child.kill();
        worker.hang_up();
        await_exit(&self.events, &self.events_tx, worker.generation);
        worker.wait_for_output();
    }

    /// The worker was just killed (`check_clock`) for running a task of frame `tag` past the
    /// timeout: reports the timeout now, without waiting for the process to end, and leaves
    /// the worker to die in the graveyard (its waiter thread reaps it; the slot's next worker
    /// starts meanwhile). Returns `None`, leaving it to [`Supervisor::bury`], when the frame's
    /// `DONE` may already be on its way (the board says it was sent) or the board was cut.
    ///
    /// A `DONE` the worker sends in the moment between the kill and its death is not waited
    /// for: the task it held is reported as timed out, as one that finished just past its
    /// limit is (the tasks before it in the frame run again, as after any kill).
    fn leave_to_die(
        &mut self,
        first_index: usize,
        len: usize,
        tag: FrameTag,
        in_arena: bool,
        limit: Duration,
    ) -> Option<FrameEnd> {
        let worker = self.worker.as_ref()?;
        let started = worker.board.started_count();
        if started == 0 || worker.board.last_done() == tag.seq || worker.board.is_cut() {
            return None;
        }
        let generation = worker.generation;
        // A reply the reader took before the kill is the frame's end, as in `run_frame` (the
        // other news then goes back for whoever waits next). Without one, the news of this
        // worker's death is not needed any more; only a `Close` goes back.
        let mut held = Vec::new();
        let mut reply = None;
        while let Ok(event) = self.events.try_recv() {
            match event {
                Event::Reply {
                    generation: g,
                    bytes,
                    new_arena,
                } if g == generation => {
                    reply = Some((bytes, new_arena));
                    break;
                }
                event => held.push(event),
            }
        }
        for event in held {
            if reply.is_some() || matches!(event, Event::Close) {
                let _ = self.events_tx.send(event);
            }
        }
        if let Some((bytes, new_arena)) = reply {
            return Some(self.reply(bytes, new_arena, tag, in_arena, first_index));
        }
        let mut worker = self.worker.take()?;
        worker.release_memory();
        worker.hang_up();
        let pid = worker.pid;
        self.graveyard.push(worker);
        let at = (started.saturating_sub(1) as usize).min(len.saturating_sub(1));
        Some(FrameEnd::Died {
            at,
            error: Error::timeout_killing(first_index + at, limit, self.index, pid),
        })
    }

    /// Where the task the board shows stands against `limit`: killed if it ran past it, or
    /// when to look again (at the moment it would, so a timeout is reported within about a
    /// millisecond of the limit, and a frame of short tasks wakes about once per `limit`).
    ///
    /// A frame none of whose tasks started within `limit` (plus [`START_MARGIN`]) of `sent`
    /// has a worker that is stopped or stuck before its first task: it is killed too.
    /// Whether the worker is stopped (`T` in `/proc/PID/stat`: SIGSTOP, not a debugger's
    /// trace stop) and no task of frame `tag` has started on it.
    fn stopped_before_its_first_task(&self, tag: FrameTag) -> bool {
        let Some(worker) = &self.worker else {
            return false;
        };
        // Sent behind a frame the worker has not finished: the count is that frame's.
        let counts_this_frame = self
            .behind
            .is_none_or(|seq| worker.board.last_done() >= seq);
        counts_this_frame
            && worker.board.last_done() < tag.seq
            && worker.board.started_count() == 0
            && std::fs::read_to_string(format!("/proc/{}/stat", worker.pid)).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
            })
    }

    fn check_clock(&self, limit: Duration, sent: Instant) -> Clock {
        let Some(worker) = &self.worker else {
            return Clock::Next(limit);
        };
        if worker.board.is_cut() {
            return Clock::Cut;
        }
        let started = worker.board.started_count();
        if started == 0 {
            let waited = sent.elapsed();
            let allowed = limit.saturating_add(START_MARGIN);
            if waited < allowed {
                return Clock::Next(allowed - waited);
            }
            worker.child.kill();
            return Clock::Stuck;
        }
        let since = monotonic_nanos().saturating_sub(worker.board.last_start());
        if worker.board.started_count() != started {
            // The next task started meanwhile: read the board again.
            return Clock::Next(Duration::ZERO);
        }
        let limit_nanos = u64::try_from(limit.as_nanos()).unwrap_or(u64::MAX);
        if since < limit_nanos {
            return Clock::Next(Duration::from_nanos(limit_nanos - since));
        }
        worker.child.kill();
        Clock::Over
    }

    /// The worker died during frame `tag` of `len` tasks starting at input index
    /// `first_index`: learns how (waiting for its waiter if `status` is not known yet), forgets
    /// it, and says which task it held.
    fn bury(
        &mut self,
        first_index: usize,
        len: usize,
        mut status: Option<WorkerExit>,
        mut disconnected: bool,
        timed_out: Option<Duration>,
        tag: FrameTag,
    ) -> FrameEnd {
        let Some(mut worker) = self.worker.take() else {
            return FrameEnd::Closing;
        };
        let generation = worker.generation;
        let mut deadline = Instant::now() + SHUTDOWN_GRACE;
        if status.is_some() {
            // Dead: what it sent is in the line's buffer, which the reader still drains after
            // a hang-up, and then it ends even if a process the worker started (a daemon that
            // left its group) holds the other end.
            worker.hang_up();
            deadline = Instant::now() + Duration::from_millis(100);
        }
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
                    // Dead (see above): the reader ends once it has drained the line.
                    worker.hang_up();
                    deadline = deadline.min(Instant::now() + Duration::from_millis(100));
                }
                Ok(Event::Disconnected { generation: g } | Event::Broken { generation: g, .. })
                    if g == generation =>
                {
                    disconnected = true;
                }
                Ok(Event::Reply {
                    generation: g,
                    bytes,
                    new_arena,
                }) if g == generation => {
                    // Only this frame's own DONE counts; anything else dies with the worker.
                    if let Ok((header, _)) = DoneHeader::decode(&bytes)
                        && header.tag == tag
                    {
                        late_reply = Some((header, bytes, new_arena));
                    }
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
        let pid = worker.pid;
        if worker.board.is_cut() {
            return self.spoiled_dead(first_index, pid, "status board");
        }
        if let Some((header, bytes, new_arena)) = late_reply {
            // The worker is dead: nobody writes its result arena any more.
            let done = Done::new(header, bytes, new_arena, worker.result_arena.take());
            let cut = matches!(done.header.outcomes, FrameAt::Arena { .. })
                && done.arena.as_ref().is_some_and(|a| a.is_cut());
            if cut {
                return self.spoiled_dead(first_index, pid, "result arena");
            }
            return FrameEnd::Done(done);
        }
        if worker.board.last_done() == tag.seq {
            // It sent this frame's DONE, which never came: a task of the frame pointed the
            // worker's line elsewhere or closed it (the driver saw the line hang up, then
            // ended the worker). The board cannot say which task: as for a cut segment.
            let message = format!(
                "task {first_index}: its worker (pid {pid}) finished the frame but its reply \
                 never arrived: a task closed or redirected the worker's channel to the driver \
                 (a descriptor it does not own); it was killed and replaced"
            );
            return FrameEnd::Spoiled {
                error: Error::worker(self.index, message),
            };
        }
        let mut started = worker.board.started_count();
        if self
            .behind
            .is_some_and(|seq| worker.board.last_done() < seq)
        {
            // Sent behind a frame whose DONE the worker had not sent: it never started, and
            // the count is that frame's.
            started = 0;
        }
        if started == 0 && timed_out.is_none() {
            // It died before any task of the frame started (killed while idle, or while
            // receiving the frame): no task is to blame yet.
            return FrameEnd::Lost {
                pid,
                status: status.unwrap_or_else(|| WorkerExit::Lost("lost".into())),
            };
        }
        let at = (started.saturating_sub(1) as usize).min(len.saturating_sub(1));
        let index = first_index + at;
        let error = match timed_out {
            Some(after) => Error::timeout_killing(index, after, self.index, pid),
            None => Error::worker_crashed(
                index,
                self.index,
                pid,
                status.unwrap_or_else(|| WorkerExit::Lost("lost".into())),
            )
            .with_last_words(worker.last_words()),
        };
        FrameEnd::Died { at, error }
    }

    /// [`Supervisor::spoiled`] for a worker that is already dead and forgotten.
    fn spoiled_dead(&mut self, first_index: usize, pid: u32, what: &str) -> FrameEnd {
        let message = format!(
            "task {first_index}: its worker (pid {pid}) died and was replaced: the {what} it \
             shares with the driver was cut short while the task ran (a task must not truncate \
             parjob's shared memory)"
        );
        FrameEnd::Spoiled {
            error: Error::worker(self.index, message),
        }
    }

    /// Tells an idle worker to exit (status 0) and waits until it has; kills it if it takes
    /// longer than `SHUTDOWN_GRACE`.
    fn retire_worker(&mut self) {
        let Some(worker) = self.worker.take() else {
            return;
        };
        if worker
            .tasks
            .send(&[parjob_remote::Kind::Shutdown.byte()])
            .is_err()
        {
            worker.child.kill();
        }
        let mut deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut killed = false;
        let mut close = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Exited { generation: g, .. }) if g == worker.generation => {
                    worker.wait_for_output();
                    break;
                }
                // A worker recycled mid-job: the pool's closing is for the frames to come.
                Ok(Event::Close) => close = true,
                Ok(_) => {}
                Err(_) if !killed => {
                    worker.child.kill();
                    killed = true;
                    deadline = Instant::now() + SHUTDOWN_GRACE;
                }
                Err(_) => break,
            }
        }
        if close {
            let _ = self.events_tx.send(Event::Close);
        }
    }
}

/// Whether `job` may be sent to a worker that is still running another frame (see
/// `Supervisor::send_ahead`): not when it has a timeout (its clock would start before its
/// tasks), nor when someone watches its start (a `Future` that may be cancelled until a worker
/// is free for it), nor once it is cancelled.
fn may_go_ahead(job: &Job) -> bool {
    job.control().timeout().is_none() && !job.start_is_watched() && !job.control().is_cancelled()
}

/// Records `error` as the outcome of every task of `job` that has none, but for a task
/// `recovery` already blames, which keeps its own error (a crash, a timeout).
fn fail_the_rest(job: &mut Job, recovery: &mut Recovery, error: &Error) {
    while job.batch().outcomes_len() < job.batch().len() {
        let next = job.batch().outcomes_len();
        let error = recovery.due(next).unwrap_or_else(|| error.clone());
        job.batch_mut().push_failure(error);
    }
}
