//! [`ProcessPool`]: one supervisor thread per worker process, taking jobs from a shared queue.
//!
//! A supervisor owns its worker: it starts it (so the worker's parent-death signal is tied to a
//! thread that outlives it), sends it one frame at a time, and hears about it only through its
//! event channel, fed by three small threads: the handshake's accept, the reader of the
//! results channel, and the waiter on the process. Hearing of the death from the waiter, not
//! only from the channel, is what makes a crash visible even when a grandchild keeps the
//! channel open.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, PoisonError, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ipc_channel::ipc::IpcSharedMemory;
use parjob_core::{Backend, Error, Job, Pool, WorkerExit, collect_shared};

use crate::ProcessOptions;
use crate::shared::{Planned, can_ship, plan_shipments, send_shipments};
use crate::spawn::{Event, Starter, Worker, await_exit, wait_for_output};
use crate::wire::{
    ARENA_KEEP_MAX, DONE_HEADER, FLAG_NEW_ARENA, FLAG_SHARED, FLAG_TIMED, MSG_DONE, MSG_FORGET,
    MSG_RUN, MSG_SHUTDOWN, RUN_HEADER, Shipment, monotonic_nanos, read_u64,
};
use crate::worker::{in_worker_loop, offset_of, started_as_worker};

/// How long a worker told to shut down may take before it is killed.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// A pool of worker processes running parjob jobs.
///
/// Made by `Parallel` for [`Backend::Process`]; use it directly only to drive
/// `parjob_core::run` yourself. Dropping it shuts the workers down (idle ones exit with
/// status 0, busy ones are killed) and reaps them before `drop` returns.
pub struct ProcessPool {
    shared: Arc<Shared>,
    supervisors: Vec<JoinHandle<()>>,
    workers: usize,
}

impl std::fmt::Debug for ProcessPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProcessPool")
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

struct Shared {
    queue: Mutex<VecDeque<Job>>,
    job_ready: Condvar,
    closing: AtomicBool,
    /// Each supervisor's event sender, to wake a busy one when the pool closes.
    wakers: Mutex<Vec<Sender<Event>>>,
    /// Bumped when a `SharedSlice` segment is dropped in this process: idle supervisors wake
    /// and tell their workers to unmap it (see [`segment_dropped`]).
    sweep_epoch: AtomicU64,
}

/// What an idle supervisor is woken for.
enum Next {
    Job(Job),
    /// A segment was dropped since `epoch`: tell the worker to let go of it.
    Sweep {
        epoch: u64,
    },
}

/// Every pool of this process, for [`segment_dropped`].
static POOLS: Mutex<Vec<Weak<Shared>>> = Mutex::new(Vec::new());

/// Called when a shared segment of this process is dropped: wakes the supervisors of every pool,
/// so that workers unmap it now rather than with their next frame.
pub(crate) fn segment_dropped() {
    let pools: Vec<Arc<Shared>> = POOLS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for shared in pools {
        let _queue = shared.queue();
        shared.sweep_epoch.fetch_add(1, Ordering::AcqRel);
        shared.job_ready.notify_all();
    }
}

impl Shared {
    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Job>> {
        // A panic while holding the lock leaves a valid queue behind.
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn closing(&self) -> bool {
        self.closing.load(Ordering::Acquire)
    }

    /// The next job, a sweep if a segment was dropped since `swept`, or `None` once the pool is
    /// closing.
    fn next(&self, swept: u64) -> Option<Next> {
        let mut queue = self.queue();
        loop {
            if self.closing() {
                return None;
            }
            if let Some(job) = queue.pop_front() {
                return Some(Next::Job(job));
            }
            let epoch = self.sweep_epoch.load(Ordering::Acquire);
            if epoch != swept {
                return Some(Next::Sweep { epoch });
            }
            queue = self
                .job_ready
                .wait(queue)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

impl ProcessPool {
    /// Starts `workers` worker processes and waits for each to finish its handshake (and
    /// initializer).
    ///
    /// # Errors
    /// [`Error::Worker`] if a worker cannot be started, is another build of the program, or
    /// fails its initializer; [`Error::BackendUnavailable`] when called in a process that was
    /// started as a worker but did not enter the worker loop (`parjob::init()` missing).
    pub fn new(workers: usize, options: ProcessOptions) -> Result<ProcessPool, Error> {
        if started_as_worker() && !in_worker_loop() {
            return Err(Error::backend_unavailable(
                Backend::Process,
                "this process was started as a parjob worker but did not call \
                 parjob::init() before using the process backend",
            ));
        }
        let workers = workers.max(1);
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            job_ready: Condvar::new(),
            closing: AtomicBool::new(false),
            wakers: Mutex::new(Vec::new()),
            sweep_epoch: AtomicU64::new(0),
        });
        {
            let mut pools = POOLS.lock().unwrap_or_else(PoisonError::into_inner);
            pools.retain(|pool| pool.strong_count() > 0);
            pools.push(Arc::downgrade(&shared));
        }
        let options = Arc::new(options);
        let (started_tx, started_rx) = mpsc::channel();
        let mut pool = ProcessPool {
            shared: Arc::clone(&shared),
            supervisors: Vec::with_capacity(workers),
            workers,
        };
        let mut first_error = None;
        for index in 0..workers {
            let (events_tx, events) = mpsc::channel();
            shared
                .wakers
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(events_tx.clone());
            let mut supervisor = Supervisor {
                index,
                workers,
                options: Arc::clone(&options),
                shared: Arc::clone(&shared),
                events_tx,
                events,
                worker: None,
                generation: 0,
                buf: Vec::new(),
            };
            let started_tx = started_tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("parjob-supervisor-{index}"))
                .spawn(move || {
                    let started = supervisor.replace_worker();
                    let ok = started.is_ok();
                    let _ = started_tx.send(started);
                    drop(started_tx);
                    if ok {
                        supervisor.serve();
                    }
                });
            match spawned {
                Ok(handle) => pool.supervisors.push(handle),
                Err(e) => {
                    first_error = Some(Error::worker(
                        index,
                        format!("cannot start its supervisor thread: {e}"),
                    ));
                    break;
                }
            }
        }
        drop(started_tx);
        // Each supervisor reports once (and keeps its sender): read exactly that many.
        for _ in 0..pool.supervisors.len() {
            match started_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                Err(_) => break,
            }
        }
        match first_error {
            Some(error) => Err(error), // dropping `pool` stops the workers that did start
            None => Ok(pool),
        }
    }
}

impl Drop for ProcessPool {
    fn drop(&mut self) {
        self.shared.closing.store(true, Ordering::Release);
        {
            let _queue = self.shared.queue();
            self.shared.job_ready.notify_all();
        }
        for waker in self
            .shared
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            let _ = waker.send(Event::Close);
        }
        for handle in self.supervisors.drain(..) {
            let _ = handle.join();
        }
        // Jobs nobody took: complete them with no outcomes (their tasks count as cancelled).
        let left: Vec<Job> = self.shared.queue().drain(..).collect();
        for job in left {
            job.complete(Duration::ZERO);
        }
    }
}

impl Pool for ProcessPool {
    fn workers(&self) -> usize {
        self.workers
    }

    fn submit(&self, job: Job) {
        self.shared.queue().push_back(job);
        self.shared.job_ready.notify_one();
    }

    fn target_batch_duration(&self) -> Duration {
        // A frame's round trip costs 10-60 us plus encoding; 5 ms batches hide it while a run
        // still ends within about one batch of the ideal.
        Duration::from_millis(5)
    }

    fn enforces_timeout(&self) -> bool {
        true
    }

    fn verbose_name(&self) -> &'static str {
        "ProcessBackend"
    }
}

/// A `DONE` reply as a frame end: the outcomes are in the message, in the new arena it
/// announced, or in the arena the worker used before (`kept`).
fn done(
    bytes: Vec<u8>,
    new_arena: Option<IpcSharedMemory>,
    kept: Option<IpcSharedMemory>,
) -> FrameEnd {
    let flags = bytes.get(1).copied().unwrap_or(0);
    let arena = if flags & FLAG_NEW_ARENA != 0 {
        new_arena
    } else if flags & FLAG_SHARED != 0 {
        kept
    } else {
        // Not used this time: the worker still has it, so keep it.
        return FrameEnd::Done { bytes, arena: kept };
    };
    FrameEnd::Done { bytes, arena }
}

/// How one frame ended.
enum FrameEnd {
    /// The `DONE` message, and the arena holding the outcomes if they were shared.
    Done {
        bytes: Vec<u8>,
        arena: Option<IpcSharedMemory>,
    },
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

struct Supervisor {
    index: usize,
    workers: usize,
    options: Arc<ProcessOptions>,
    shared: Arc<Shared>,
    events_tx: Sender<Event>,
    events: Receiver<Event>,
    worker: Option<Worker>,
    generation: u64,
    buf: Vec<u8>,
}

impl Supervisor {
    fn serve(&mut self) {
        let mut swept = self.shared.sweep_epoch.load(Ordering::Acquire);
        while let Some(next) = self.shared.next(swept) {
            match next {
                Next::Job(job) => self.run_job(job),
                Next::Sweep { epoch } => {
                    swept = epoch;
                    self.forget_dropped_segments();
                }
            }
            if self.worker.is_none() && !self.shared.closing() {
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
        let planned = plan_shipments(worker, Vec::new());
        if planned.is_empty() {
            return;
        }
        let mut message = [MSG_FORGET, 0, 0, 0, 0];
        message[1..].copy_from_slice(&(planned.len() as u32).to_le_bytes());
        // A worker that cannot be reached has died; its supervisor hears of it with its next
        // frame.
        let _ = worker
            .tasks
            .send(&message)
            .map_err(|e| e.to_string())
            .and_then(|()| send_shipments(worker, planned));
    }

    fn replace_worker(&mut self) -> Result<(), Error> {
        self.generation += 1;
        let starter = Starter {
            index: self.index,
            workers: self.workers,
            options: &self.options,
            events_tx: &self.events_tx,
            events: &self.events,
        };
        self.worker = Some(starter.start(self.generation)?);
        Ok(())
    }

    /// Runs every task of `job`, over as many frames and workers as it takes, and completes it.
    fn run_job(&mut self, mut job: Job) {
        let entry = match job.batch().remote_entry() {
            Ok(entry) => entry,
            Err(error) => {
                while job.batch().outcomes_len() < job.batch().len() {
                    job.batch_mut().push_failure(error.clone());
                }
                job.complete(Duration::ZERO);
                return;
            }
        };
        let offset = offset_of(entry as usize);
        if !job.mark_started() {
            // Cancelled before it started (`Future::cancel`): complete it without running.
            job.complete(Duration::ZERO);
            return;
        }
        let mut busy = Duration::ZERO;
        // A task that killed its worker: its error goes in once the tasks before it have
        // their outcomes (they ran in the dead worker too, but their results died with it).
        let mut pending: Option<(usize, Error)> = None;
        // Frames whose worker died before starting any of their tasks, in a row.
        let mut lost = 0;
        loop {
            let start = job.batch().outcomes_len();
            let len = job.batch().len();
            if start >= len {
                break;
            }
            if pending.as_ref().is_some_and(|(at, _)| *at == start) {
                if let Some((_, error)) = pending.take() {
                    job.batch_mut().push_failure(error);
                }
                continue;
            }
            if job.control().is_cancelled() || self.shared.closing() {
                break;
            }
            if self.worker.is_none()
                && let Err(error) = self.replace_worker()
            {
                while job.batch().outcomes_len() < len {
                    job.batch_mut().push_failure(error.clone());
                }
                break;
            }
            let mut end = pending.as_ref().map_or(len, |(at, _)| *at);
            if let (Some(max), Some(worker)) = (self.options.max_tasks_per_worker, &self.worker) {
                end = end.min(start + max.saturating_sub(worker.tasks_run).max(1));
            }
            match self.run_frame(&job, offset, start..end) {
                FrameEnd::Done { bytes, arena } => {
                    lost = 0;
                    busy += Duration::from_nanos(read_u64(&bytes, 2).unwrap_or(0));
                    let outcomes = if bytes.get(1).is_some_and(|f| f & FLAG_SHARED != 0) {
                        let len = read_u64(&bytes, 10).unwrap_or(0) as usize;
                        arena
                            .as_deref()
                            .and_then(|a| a.get(..len))
                            .unwrap_or_default()
                    } else {
                        bytes.get(DONE_HEADER..).unwrap_or_default()
                    };
                    let mut decoded = job.batch_mut().decode_outcomes(outcomes);
                    if decoded < end - start {
                        // A short frame (it cannot happen between two processes of one
                        // build): fail the next task rather than loop on it forever.
                        let index = job.batch().first_index() + job.batch().outcomes_len();
                        job.batch_mut().push_failure(Error::worker(
                            self.index,
                            format!(
                                "returned {decoded} outcomes for {} tasks; task {index} is \
                                 reported failed",
                                end - start
                            ),
                        ));
                        decoded += 1;
                    }
                    if let Some(worker) = &mut self.worker {
                        if let Some(arena) = arena.filter(|a| a.len() <= ARENA_KEEP_MAX) {
                            worker.result_arena = Some(arena);
                        }
                        worker.tasks_run += decoded;
                        if self
                            .options
                            .max_tasks_per_worker
                            .is_some_and(|max| worker.tasks_run >= max)
                        {
                            self.retire_worker();
                        }
                    }
                }
                FrameEnd::Lost { pid, status } => {
                    lost += 1;
                    if lost > 1 {
                        // Twice in a row: the frame itself kills workers; blame its first task.
                        pending = Some((
                            start,
                            Error::worker_crashed(
                                job.batch().first_index() + start,
                                self.index,
                                pid,
                                status,
                            ),
                        ));
                    }
                }
                FrameEnd::Died { at, error } => {
                    let at = start + at;
                    if pending.as_ref().is_none_or(|(p, _)| at < *p) {
                        pending = Some((at, error));
                    }
                }
                FrameEnd::Closing => break,
            }
        }
        job.complete(busy);
    }

    /// Sends tasks `range` of the job to the worker and waits for their outcomes.
    fn run_frame(&mut self, job: &Job, offset: i64, range: std::ops::Range<usize>) -> FrameEnd {
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
        let mut flags = if timeout.is_some() { FLAG_TIMED } else { 0 };
        self.buf.clear();
        self.buf.extend_from_slice(&[MSG_RUN, flags]);
        self.buf.extend_from_slice(&offset.to_le_bytes());
        self.buf.extend_from_slice(&[0; RUN_HEADER - 10]);
        let buf = &mut self.buf;
        let ((), segments) = collect_shared(|| job.batch().encode_tasks(range.clone(), buf));
        worker.board.reset();
        let mut shipments = plan_shipments(worker, segments);
        if !can_ship(&shipments) {
            // Out of file descriptors: send the slices' values instead of handles (slow, but
            // the tasks run).
            shipments.retain(|planned| matches!(planned, Planned::Ready(_)));
            self.buf.truncate(RUN_HEADER);
            job.batch().encode_tasks(range.clone(), &mut self.buf);
        }
        let len = self.buf.len() - RUN_HEADER;
        let arena_fits = worker.task_arena.as_ref().is_some_and(|a| a.len() >= len);
        // A new arena needs two spare file descriptors (ipc-channel panics without them); with
        // none, the big frame goes over the socket, slower but whole.
        let shared =
            len > self.options.max_nbytes && (arena_fits || crate::shared::spare_descriptors(2));
        if shared {
            flags |= FLAG_SHARED;
            self.buf[10..18].copy_from_slice(&(len as u64).to_le_bytes());
            match worker.task_arena.as_mut().filter(|a| a.len() >= len) {
                Some(arena) => {
                    // SAFETY: the worker reads its arena only between a RUN and its DONE, and the
                    // driver writes it only before sending a RUN: never both at once.
                    let shared = unsafe { arena.deref_mut() };
                    shared[..len].copy_from_slice(&self.buf[RUN_HEADER..]);
                }
                None => {
                    let arena = IpcSharedMemory::from_bytes(&self.buf[RUN_HEADER..]);
                    shipments.push(Planned::Ready(Shipment::Arena(arena.clone())));
                    worker.task_arena = (arena.len() <= ARENA_KEEP_MAX).then_some(arena);
                }
            }
        }
        self.buf[1] = flags;
        // Each shipment carries a file descriptor, so a frame's count is bounded by the
        // process's descriptor limit, far below u32::MAX.
        let count = u32::try_from(shipments.len()).unwrap_or(u32::MAX);
        self.buf[18..RUN_HEADER].copy_from_slice(&count.to_le_bytes());
        let message = if shared {
            &self.buf[..RUN_HEADER]
        } else {
            &self.buf[..]
        };
        // The RUN goes first: the worker reads it, then exactly `count` shipments, so a frame
        // with more shipments than the socket buffers cannot block the driver.
        let sent = worker
            .tasks
            .send(message)
            .map_err(|e| e.to_string())
            .and_then(|()| send_shipments(worker, shipments));
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
                    shared,
                } if g == generation && bytes.first() == Some(&MSG_DONE) => {
                    let kept = self.worker.as_mut().and_then(|w| w.result_arena.take());
                    return done(bytes, shared, kept);
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
            wait_for_output(&worker);
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
        let Some(worker) = self.worker.take() else {
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
                    shared,
                }) if g == generation && bytes.first() == Some(&MSG_DONE) => {
                    late_reply = Some((bytes, shared));
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
        wait_for_output(&worker);
        if let Some((bytes, shared)) = late_reply {
            let mut worker = worker;
            return done(bytes, shared, worker.result_arena.take());
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
        if worker.tasks.send(&[MSG_SHUTDOWN]).is_err() {
            worker.child.kill();
        }
        let mut deadline = Instant::now() + SHUTDOWN_GRACE;
        let mut killed = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Event::Exited { generation: g, .. }) if g == worker.generation => {
                    wait_for_output(&worker);
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
