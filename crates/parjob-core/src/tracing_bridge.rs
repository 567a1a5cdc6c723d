//! The `tracing` feature: a run's events as `tracing` spans and events, for whatever
//! subscriber the program installed (`tracing-subscriber`'s fmt layer, `tracing-chrome`, ...).
//!
//! A run is a span `parjob_run` (backend, workers); each batch is a span `parjob_batch`
//! (batch, first_index, tasks, attempt), a child of the run's, opened when the batch is
//! dispatched and closed when it comes back, with the worker, busy time, failures and
//! transport figures recorded on it then. Failures, retries and worker changes are events
//! inside the run's span. Everything has the target `parjob`.
//!
//! The bridge exists only when a subscriber is interested in `parjob` at the INFO level when
//! the run starts (asked once, on the thread that drives the run).

use std::collections::HashMap;
use std::time::Duration;

use tracing::field::Empty;
use tracing::{Level, Span};

use crate::Error;
use crate::events::{Transport, WorkerChange};

/// The spans of one run.
pub(crate) struct TracingBridge {
    run: Span,
    batches: HashMap<u64, Span>,
}

impl TracingBridge {
    /// A bridge if a subscriber listens to `parjob` at the INFO level.
    pub(crate) fn new() -> Option<TracingBridge> {
        if !tracing::enabled!(target: "parjob", Level::INFO) {
            return None;
        }
        Some(TracingBridge {
            run: Span::none(),
            batches: HashMap::new(),
        })
    }

    pub(crate) fn started(&mut self, backend: &'static str, workers: usize) {
        self.run =
            tracing::info_span!(target: "parjob", "parjob_run", backend, workers, ok = Empty);
    }

    pub(crate) fn dispatched(
        &mut self,
        batch: u64,
        first_index: usize,
        tasks: usize,
        attempt: u32,
    ) {
        let span = tracing::info_span!(
            target: "parjob",
            parent: &self.run,
            "parjob_batch",
            batch,
            first_index,
            tasks,
            attempt,
            worker = Empty,
            busy_us = Empty,
            failed = Empty,
            bytes_sent = Empty,
            bytes_received = Empty,
            encode_us = Empty,
            ipc_us = Empty,
            decode_us = Empty,
        );
        self.batches.insert(batch, span);
    }

    /// Records the batch's figures on its span and closes it.
    pub(crate) fn completed(
        &mut self,
        batch: u64,
        failed: usize,
        worker: Option<usize>,
        busy: Duration,
        transport: Option<&Transport>,
    ) {
        let Some(span) = self.batches.remove(&batch) else {
            return;
        };
        if let Some(worker) = worker {
            span.record("worker", worker);
        }
        span.record("busy_us", micros(busy));
        span.record("failed", failed);
        if let Some(t) = transport {
            span.record("bytes_sent", t.bytes_sent);
            span.record("bytes_received", t.bytes_received);
            span.record("encode_us", micros(t.encode));
            span.record("ipc_us", micros(t.ipc));
            span.record("decode_us", micros(t.decode));
        }
        drop(span);
    }

    pub(crate) fn task_failed(&self, index: usize, attempt: u32, error: &Error, retrying: bool) {
        tracing::warn!(target: "parjob", parent: &self.run, index, attempt, retrying, %error, "task failed");
    }

    pub(crate) fn retried(&self, index: usize, attempt: u32, waited: Duration) {
        tracing::info!(target: "parjob", parent: &self.run, index, attempt, waited_us = micros(waited), "task retried");
    }

    pub(crate) fn crashed(
        &self,
        worker: usize,
        pid: u32,
        status: &crate::WorkerExit,
        index: usize,
    ) {
        tracing::warn!(target: "parjob", parent: &self.run, worker, pid, %status, index, "worker crashed");
    }

    pub(crate) fn worker_changed(&self, change: &WorkerChange) {
        match change {
            WorkerChange::Started { worker, pid } => {
                tracing::info!(target: "parjob", parent: &self.run, worker, pid, "worker started");
            }
            WorkerChange::Replaced {
                worker,
                old_pid,
                new_pid,
                reason,
            } => {
                tracing::info!(target: "parjob", parent: &self.run, worker, old_pid, new_pid, reason = reason.as_str(), "worker replaced");
            }
            WorkerChange::Recycled {
                worker,
                pid,
                tasks_run,
            } => {
                tracing::info!(target: "parjob", parent: &self.run, worker, pid, tasks_run, "worker recycled");
            }
        }
    }

    /// Closes the run's span (and the spans of batches that never came back).
    pub(crate) fn finished(&mut self, ok: bool) {
        self.run.record("ok", ok);
        self.batches.clear();
        self.run = Span::none();
    }
}

fn micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
