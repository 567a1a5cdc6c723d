//! What a supervisor reports with each job besides its outcomes: the transport figures of its
//! frames (bytes each way, time encoding, on the line, decoding) and the changes to its
//! worker (started, replaced, recycled), for the run's events, insights and trace.
//!
//! Kept apart from the supervisor's frame logic: the supervisor only says when a frame is
//! encoded, sent, back and decoded, and when its worker starts or goes.

use std::time::{Duration, Instant};

use parjob_core::{Error, Job, Transport, WorkerChange};

/// Why a worker went, said from the worker's side, for [`SlotReport::gone`].
pub(crate) fn reason(error: &Error) -> String {
    match error {
        Error::WorkerCrashed { index, status, .. } => {
            format!("it crashed in task {index}: {status}")
        }
        Error::Timeout { index, after, .. } => {
            format!("it was killed: task {index} ran past its limit of {after:?}")
        }
        other => other.to_string(),
    }
}

/// One slot's figures for the job in hand, and its worker changes not yet reported.
#[derive(Default)]
pub(crate) struct SlotReport {
    transport: Transport,
    /// When the frame out now was sent.
    sent_at: Option<Instant>,
    changes: Vec<(Instant, WorkerChange)>,
    /// The process id of the slot's last worker, once one has started.
    last_pid: Option<u32>,
    /// Why the last worker went, once it has (the first reason given wins).
    gone: Option<String>,
    /// The figures of the frame sent ahead, for its own job (see `Supervisor::send_ahead`),
    /// and when it was sent.
    ahead: Transport,
    ahead_sent_at: Option<Instant>,
    /// When the last reply came back: a frame sent ahead starts in the worker then, not when
    /// it was sent.
    replied_at: Option<Instant>,
}

impl SlotReport {
    /// A frame of `len` bytes was encoded, which took since `began`, and is about to be sent.
    pub(crate) fn encoded(&mut self, began: Instant, len: usize) {
        self.transport.encode += began.elapsed();
        self.transport.bytes_sent += len as u64;
        self.sent_at = Some(Instant::now());
    }

    /// A frame of `len` bytes for the job taken ahead was encoded, which took since `began`,
    /// and is about to be sent: its figures are that job's.
    pub(crate) fn encoded_ahead(&mut self, began: Instant, len: usize) {
        self.ahead.encode += began.elapsed();
        self.ahead.bytes_sent += len as u64;
        self.ahead_sent_at = Some(Instant::now());
    }

    /// Swaps the figures of the job in hand with those of the job taken ahead: called when
    /// the supervisor turns to the other. A frame sent ahead is on the line from the moment
    /// the reply before it came back (the worker ran that frame until then).
    pub(crate) fn swap_ahead(&mut self) {
        std::mem::swap(&mut self.transport, &mut self.ahead);
        std::mem::swap(&mut self.sent_at, &mut self.ahead_sent_at);
        if let (Some(sent_at), Some(replied_at)) = (self.sent_at, self.replied_at) {
            self.sent_at = Some(sent_at.max(replied_at));
        }
    }

    /// The frame's `DONE` came back holding `len` bytes of outcomes after the worker ran its
    /// tasks for `busy`: the rest of the round trip was the line's.
    pub(crate) fn replied(&mut self, len: u64, busy: Duration) {
        self.transport.bytes_received += len;
        let now = Instant::now();
        if let Some(sent_at) = self.sent_at.take() {
            self.transport.ipc += now.duration_since(sent_at).saturating_sub(busy);
        }
        self.replied_at = Some(now);
    }

    /// Decoding the frame's outcomes took since `began`.
    pub(crate) fn decoded(&mut self, began: Instant) {
        self.transport.decode += began.elapsed();
    }

    /// A worker `pid` started in slot `worker`.
    pub(crate) fn started(&mut self, worker: usize, pid: u32) {
        let change = match self.last_pid.replace(pid) {
            None => WorkerChange::Started { worker, pid },
            Some(old_pid) => WorkerChange::Replaced {
                worker,
                old_pid,
                new_pid: pid,
                reason: self
                    .gone
                    .take()
                    .unwrap_or_else(|| "it was lost".to_string()),
            },
        };
        self.gone = None;
        self.changes.push((Instant::now(), change));
    }

    /// The slot's worker went (or is going) for `reason`; the first reason given since it
    /// started is the one its replacement reports.
    pub(crate) fn gone(&mut self, reason: impl FnOnce() -> String) {
        if self.gone.is_none() && self.last_pid.is_some() {
            self.gone = Some(reason());
        }
    }

    /// Worker `pid` of slot `worker` is told to exit after running `tasks_run` tasks.
    pub(crate) fn recycled(&mut self, worker: usize, pid: u32, tasks_run: usize) {
        self.gone(|| format!("recycled after {tasks_run} tasks"));
        self.changes.push((
            Instant::now(),
            WorkerChange::Recycled {
                worker,
                pid,
                tasks_run,
            },
        ));
    }

    /// Tells the run of `job` (in hand, still running) of the worker changes so far and of
    /// `crash`, a crash the job's task just failed with, at once: its events then come as
    /// they happen rather than with the job's completion.
    pub(crate) fn report_now(&mut self, job: &mut Job, crash: Option<&Error>) {
        for (when, change) in self.changes.drain(..) {
            job.note_worker(change, when);
        }
        job.note_now(crash);
    }

    /// Hands the job's figures and the pending worker changes to `job`, which ran on slot
    /// `worker`, and starts afresh for the next job.
    pub(crate) fn deliver(&mut self, job: &mut Job, worker: usize) {
        job.ran_on(worker);
        let transport = std::mem::take(&mut self.transport);
        if transport != Transport::default() {
            job.add_transport(&transport);
        }
        self.sent_at = None;
        for (when, change) in self.changes.drain(..) {
            job.note_worker(change, when);
        }
    }
}
