//! Events: what a run did, as typed values, for a callback of the user's
//! (`Parallel::on_event`), the insights summary, the Chrome trace, the `tracing` bridge, and
//! the verbose lines and progress bar (whose [`Reporter`] consumes the same [`Event`]s).
//!
//! The dispatcher reports to an [`Observer`] only when someone listens (a callback, a trace,
//! insights, `verbose >= 1` or a progress bar); otherwise it holds `None` and each batch
//! costs one branch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::insights::{Insights, InsightsBuilder};
use crate::progress::Reporter;
use crate::trace::TraceRecorder;
use crate::{Error, WorkerExit};

/// Something that happened in a run, in the order the driver saw it. Per batch,
/// [`BatchDispatched`](Event::BatchDispatched) comes before its one
/// [`BatchCompleted`](Event::BatchCompleted); a retry is a batch of its own (one task, its
/// own `batch` number, `attempt` above 1).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use parjob::{delayed, Event, Parallel};
///
/// fn square(x: u64) -> u64 { x * x }
/// let completed = Arc::new(Mutex::new(0));
/// let seen = Arc::clone(&completed);
/// let parallel = Parallel::new(2).on_event(move |event: &Event| {
///     if let Event::BatchCompleted { tasks, .. } = event {
///         *seen.lock().unwrap() += tasks;
///     }
/// });
/// parallel.run((0..100u64).map(|i| delayed(square, i)))?;
/// assert_eq!(*completed.lock().unwrap(), 100);
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Event {
    /// The run began.
    RunStarted {
        /// The pool's name, e.g. `ThreadingBackend`.
        backend: &'static str,
        /// How many workers it has.
        workers: usize,
    },
    /// A batch was handed to the pool.
    BatchDispatched {
        /// The batch's number in this run (retries are numbered from 2^63).
        batch: u64,
        /// Input position of its first task.
        first_index: usize,
        /// How many tasks it holds.
        tasks: usize,
        /// 1 for a first attempt, 2 and more for a retry.
        attempt: u32,
        /// Time since the run began.
        at: Duration,
    },
    /// The input ran out: the run has `tasks` tasks in all (for an input without an exact
    /// length, known only now). The progress bar takes its length from this.
    InputEnded {
        /// How many tasks the input held.
        tasks: usize,
        /// Time since the run began.
        at: Duration,
    },
    /// A batch came back, every task with an outcome (or left without one by a stop).
    BatchCompleted {
        /// The batch's number, as dispatched.
        batch: u64,
        /// Input position of its first task.
        first_index: usize,
        /// How many tasks it holds.
        tasks: usize,
        /// How many of them failed.
        failed: usize,
        /// The worker that ran it, when the pool tells (in-process pools do).
        worker: Option<usize>,
        /// How long its tasks ran, as the pool measured it.
        busy: Duration,
        /// What moving it to another process and back cost, for pools that run batches in
        /// other processes (the process backend); `None` for in-process pools.
        transport: Option<Transport>,
        /// Time since the run began, when it came back.
        at: Duration,
    },
    /// An attempt of a task failed.
    TaskFailed {
        /// Input position of the task.
        index: usize,
        /// Which attempt (1 for the first).
        attempt: u32,
        /// Why.
        error: Error,
        /// Whether it will run again.
        retrying: bool,
    },
    /// A failed task was sent again.
    TaskRetried {
        /// Input position of the task.
        index: usize,
        /// The attempt now starting (2 for the first retry).
        attempt: u32,
        /// How long it waited (the backoff).
        waited: Duration,
    },
    /// A worker process died while running a task; the pool replaces it. The process backend
    /// reports it, and the replacement's [`WorkerReplaced`](Event::WorkerReplaced), as they
    /// happen, not when the batch holding the task comes back (except for a
    /// [`Future`](crate::Future)'s task, whose events come with its outcome).
    WorkerCrashed {
        /// Index of the worker in its pool.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: WorkerExit,
        /// The task it was running.
        index: usize,
    },
    /// A worker process started in an empty slot of the pool (reported with the first batch
    /// its slot completes, so a pool started before the run reports it in its first run).
    WorkerStarted {
        /// Index of the worker in its pool.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// Time since the run began (zero for a start before it).
        at: Duration,
    },
    /// A worker process started in place of one that crashed, was killed or was recycled.
    WorkerReplaced {
        /// Index of the worker in its pool.
        worker: usize,
        /// The process id of the one that went.
        old_pid: u32,
        /// The new process's id.
        new_pid: u32,
        /// Why the old one went.
        reason: String,
        /// Time since the run began (zero for a start before it).
        at: Duration,
    },
    /// A worker process was told to exit after running its share of tasks
    /// (`max_tasks_per_worker`); a [`WorkerReplaced`](Event::WorkerReplaced) follows when the
    /// slot gets work again.
    WorkerRecycled {
        /// Index of the worker in its pool.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How many tasks it ran.
        tasks_run: usize,
        /// Time since the run began.
        at: Duration,
    },
    /// The run ended (also when it stopped at a failure, or its iterator was dropped).
    RunFinished {
        /// Whether every task succeeded (`false` also for a run stopped early).
        ok: bool,
        /// Whether the run stopped before its end: a fail-fast run at a failure, or a
        /// dropped iterator. A run that kept going to its end with failures is not stopped.
        stopped: bool,
        /// The summary of the run.
        insights: Arc<Insights>,
    },
}

/// What tells one worker crash from another: the task it failed and the worker's pid.
fn crash_key(error: &Error) -> Option<(usize, u32)> {
    match error {
        Error::WorkerCrashed { index, pid, .. } => Some((*index, *pid)),
        _ => None,
    }
}

/// A callback that receives a run's [`Event`]s: `Parallel::on_event`'s argument, kept in
/// [`RunOptions`](crate::RunOptions). Two sinks are equal when they are the same callback.
#[derive(Clone)]
pub struct EventSink(Arc<dyn Fn(&Event) + Send + Sync>);

impl EventSink {
    /// Wraps `callback`.
    pub fn new(callback: impl Fn(&Event) + Send + Sync + 'static) -> EventSink {
        EventSink(Arc::new(callback))
    }

    /// Calls the callback.
    pub fn send(&self, event: &Event) {
        (self.0)(event);
    }
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EventSink(..)")
    }
}

impl PartialEq for EventSink {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for EventSink {}

/// What moving one batch to another process and back cost: bytes each way and the time spent
/// encoding the arguments, on the line (the round trip less the worker's busy time) and
/// decoding the outcomes. A pool that runs batches in another process reports it with
/// [`Job::add_transport`](crate::Job::add_transport); in-process pools have none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Transport {
    /// Bytes of encoded tasks sent to the worker (over its socket or through a shared arena).
    pub bytes_sent: u64,
    /// Bytes of encoded outcomes received back.
    pub bytes_received: u64,
    /// Time spent encoding the tasks (their `Serialize`, and framing).
    pub encode: Duration,
    /// Time between sending the tasks and receiving the outcomes that the worker did not
    /// spend running them: the line both ways and the worker's own decoding and encoding.
    pub ipc: Duration,
    /// Time spent decoding the outcomes (their `Deserialize`).
    pub decode: Duration,
}

impl Transport {
    /// Adds `other`'s figures to these.
    pub fn add(&mut self, other: &Transport) {
        self.bytes_sent += other.bytes_sent;
        self.bytes_received += other.bytes_received;
        self.encode += other.encode;
        self.ipc += other.ipc;
        self.decode += other.decode;
    }
}

/// A change to one of a pool's worker processes, as the pool reports it with a job
/// ([`Job::note_worker`](crate::Job::note_worker)); the run turns it into an [`Event`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerChange {
    /// A worker started in an empty slot (its pool's first start there).
    Started {
        /// The slot's index in its pool.
        worker: usize,
        /// The new process's id.
        pid: u32,
    },
    /// A worker started in place of one that is gone.
    Replaced {
        /// The slot's index in its pool.
        worker: usize,
        /// The process id of the one that is gone (0 if it never started).
        old_pid: u32,
        /// The new process's id.
        new_pid: u32,
        /// Why the old one went (a crash, a timeout, recycling).
        reason: String,
    },
    /// A worker was told to exit after running its share of tasks (`max_tasks_per_worker`).
    Recycled {
        /// The slot's index in its pool.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How many tasks it ran.
        tasks_run: usize,
    },
}

/// What the dispatcher reports to while someone listens: the user's callback, the insights
/// being gathered, the trace being recorded, the verbose summary, the verbose lines and bar.
pub(crate) struct Observer {
    began: Instant,
    sink: Option<EventSink>,
    /// The verbose lines and progress bar, fed every event.
    reporter: Option<Reporter>,
    insights: InsightsBuilder,
    trace: Option<TraceRecorder>,
    /// `[Parallel(n_jobs=..)]: ` when the summary is printed at the end (`verbose >= 1`).
    print_prefix: Option<String>,
    finished: bool,
    /// Crashes (task index, worker pid) reported before their batch came back
    /// ([`Observer::noted`]): not reported again with the batch.
    crashes_noted: Vec<(usize, u32)>,
    /// The run as `tracing` spans and events (the `tracing` feature), when a subscriber
    /// listens.
    #[cfg(feature = "tracing")]
    tracing: Option<crate::tracing_bridge::TracingBridge>,
}

impl Observer {
    /// An observer if anyone listens, else `None`. `reporter` shows verbose lines or a bar.
    pub(crate) fn new(
        options: &crate::RunOptions,
        reporter: Option<Reporter>,
    ) -> Option<Box<Observer>> {
        let trace = crate::trace::trace_path(options).map(TraceRecorder::new);
        #[cfg(feature = "tracing")]
        let tracing = crate::tracing_bridge::TracingBridge::new();
        #[cfg(not(feature = "tracing"))]
        let tracing: Option<()> = None;
        if options.on_event.is_none()
            && trace.is_none()
            && options.verbose == 0
            && tracing.is_none()
            && reporter.is_none()
        {
            return None;
        }
        Some(Box::new(Observer {
            began: Instant::now(),
            sink: options.on_event.clone(),
            reporter,
            insights: InsightsBuilder::default(),
            trace,
            print_prefix: (options.verbose > 0)
                .then(|| format!("[Parallel(n_jobs={})]: ", options.n_jobs)),
            finished: false,
            crashes_noted: Vec::new(),
            #[cfg(feature = "tracing")]
            tracing,
        }))
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    /// Builds the event only if the reporter or the user's callback takes it.
    fn send(&mut self, event: impl FnOnce() -> Event) {
        if self.sink.is_none() && self.reporter.is_none() {
            return;
        }
        let event = event();
        if let Some(reporter) = &mut self.reporter {
            reporter.on_event(&event);
        }
        if let Some(sink) = &self.sink {
            sink.send(&event);
        }
    }

    /// The input ran out after `tasks` tasks.
    pub(crate) fn input_ended(&mut self, tasks: usize) {
        let at = self.now();
        self.send(|| Event::InputEnded { tasks, at });
    }

    pub(crate) fn started(&mut self, backend: &'static str, workers: usize) {
        self.insights.started(backend, workers);
        if let Some(trace) = &mut self.trace {
            trace.started(backend, workers);
        }
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &mut self.tracing {
            bridge.started(backend, workers);
        }
        self.send(|| Event::RunStarted { backend, workers });
    }

    pub(crate) fn dispatched(
        &mut self,
        batch: u64,
        first_index: usize,
        tasks: usize,
        attempt: u32,
    ) {
        let at = self.now();
        self.insights.dispatched(tasks);
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &mut self.tracing {
            bridge.dispatched(batch, first_index, tasks, attempt);
        }
        self.send(|| Event::BatchDispatched {
            batch,
            first_index,
            tasks,
            attempt,
            at,
        });
    }

    #[allow(clippy::too_many_arguments)] // one batch's figures, as the event carries them
    pub(crate) fn completed(
        &mut self,
        batch: u64,
        first_index: usize,
        tasks: usize,
        failures: &[(usize, Error)],
        worker: Option<usize>,
        busy: Duration,
        transport: Option<Transport>,
        mut changes: Vec<(Instant, WorkerChange)>,
    ) {
        // Starts come first, then the crashes the batch saw, then the replacements and
        // recycling they led to, then the batch itself.
        for (when, change) in
            changes.extract_if(.., |c| matches!(c.1, WorkerChange::Started { .. }))
        {
            self.worker_changed(change, when);
        }
        let at = self.now();
        self.insights
            .completed(first_index, tasks, failures.len(), worker, busy);
        if let Some(transport) = &transport {
            self.insights.transport(transport);
        }
        if batch < crate::retry::RETRY_SEQ_BASE {
            self.insights.counted(tasks);
        }
        if let Some(trace) = &mut self.trace {
            trace.batch(
                first_index,
                tasks,
                failures.len(),
                worker,
                busy,
                at,
                transport,
            );
        }
        for (_, error) in failures {
            if let Error::Timeout {
                after,
                returned_after,
                killed,
                pid,
                ..
            } = error
            {
                self.insights.timed_out(
                    returned_after.is_none().then_some(*after),
                    pid.filter(|_| *killed),
                );
            }
            if let Some(noted) =
                crash_key(error).and_then(|key| self.crashes_noted.iter().position(|&k| k == key))
            {
                self.crashes_noted.swap_remove(noted);
                continue;
            }
            self.crashed(error, at);
        }
        for (when, change) in changes {
            self.worker_changed(change, when);
        }
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &mut self.tracing {
            bridge.completed(batch, failures.len(), worker, busy, transport.as_ref());
        }
        self.send(|| Event::BatchCompleted {
            batch,
            first_index,
            tasks,
            failed: failures.len(),
            worker,
            busy,
            transport,
            at,
        });
    }

    /// A worker crash among a batch's failures (nothing for other errors), at `at` into the
    /// run.
    fn crashed(&mut self, error: &Error, at: Duration) {
        let Error::WorkerCrashed {
            worker,
            pid,
            status,
            index,
            ..
        } = error
        else {
            return;
        };
        self.insights.crashed(*pid);
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &self.tracing {
            bridge.crashed(*worker, *pid, status, *index);
        }
        if let Some(trace) = &mut self.trace {
            trace.worker_instant(
                *worker,
                format!("worker {worker} (pid {pid}) crashed: {status}"),
                at,
            );
        }
        self.send(|| Event::WorkerCrashed {
            worker: *worker,
            pid: *pid,
            status: status.clone(),
            index: *index,
        });
    }

    /// What a pool said of a batch still out ([`Job::note_now`](crate::Job::note_now)): a
    /// crash of the worker running it, then the changes to its workers, in the order the
    /// batch's completion would report them.
    pub(crate) fn noted(&mut self, changes: Vec<(Instant, WorkerChange)>, crash: Option<Error>) {
        let mut changes = changes;
        for (when, change) in
            changes.extract_if(.., |c| matches!(c.1, WorkerChange::Started { .. }))
        {
            self.worker_changed(change, when);
        }
        if let Some(key) = crash.as_ref().and_then(crash_key)
            && !self.crashes_noted.contains(&key)
            && let Some(crash) = &crash
        {
            let at = self.now();
            self.crashed(crash, at);
            self.crashes_noted.push(key);
        }
        for (when, change) in changes {
            self.worker_changed(change, when);
        }
    }

    /// A change to a worker that a pool reported with a batch; `when` is when it happened
    /// (before the run began counts as its start).
    pub(crate) fn worker_changed(&mut self, change: WorkerChange, when: Instant) {
        let at = when.saturating_duration_since(self.began);
        self.insights.worker_changed(&change);
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &self.tracing {
            bridge.worker_changed(&change);
        }
        if let Some(trace) = &mut self.trace {
            let (worker, name) = match &change {
                WorkerChange::Started { worker, pid } => {
                    (*worker, format!("worker {worker} started (pid {pid})"))
                }
                WorkerChange::Replaced {
                    worker,
                    old_pid,
                    new_pid,
                    reason,
                } => (
                    *worker,
                    format!("worker {worker} replaced (pid {old_pid} -> {new_pid}): {reason}"),
                ),
                WorkerChange::Recycled {
                    worker,
                    pid,
                    tasks_run,
                } => (
                    *worker,
                    format!("worker {worker} (pid {pid}) recycled after {tasks_run} tasks"),
                ),
            };
            trace.worker_instant(worker, name, at);
        }
        self.send(|| match change {
            WorkerChange::Started { worker, pid } => Event::WorkerStarted { worker, pid, at },
            WorkerChange::Replaced {
                worker,
                old_pid,
                new_pid,
                reason,
            } => Event::WorkerReplaced {
                worker,
                old_pid,
                new_pid,
                reason,
                at,
            },
            WorkerChange::Recycled {
                worker,
                pid,
                tasks_run,
            } => Event::WorkerRecycled {
                worker,
                pid,
                tasks_run,
                at,
            },
        });
    }

    pub(crate) fn task_failed(
        &mut self,
        index: usize,
        attempt: u32,
        error: &Error,
        retrying: bool,
    ) {
        if !retrying {
            self.insights.failed(index);
        }
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &self.tracing {
            bridge.task_failed(index, attempt, error, retrying);
        }
        self.send(|| Event::TaskFailed {
            index,
            attempt,
            error: error.clone(),
            retrying,
        });
    }

    pub(crate) fn retried(&mut self, index: usize, attempt: u32, waited: Duration) {
        let at = self.now();
        self.insights.retried();
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &self.tracing {
            bridge.retried(index, attempt, waited);
        }
        if let Some(trace) = &mut self.trace {
            trace.instant(format!("retry task {index} (attempt {attempt})"), at);
        }
        self.send(|| Event::TaskRetried {
            index,
            attempt,
            waited,
        });
    }

    /// Once per run: the summary, the trace file, the last event.
    pub(crate) fn finished(&mut self, ok: bool) {
        if std::mem::replace(&mut self.finished, true) {
            return;
        }
        let insights = Arc::new(self.insights.build(self.now()));
        let stopped = !ok;
        let ok = ok && insights.failed == 0;
        #[cfg(feature = "tracing")]
        if let Some(bridge) = &mut self.tracing {
            bridge.finished(ok);
        }
        if let Some(trace) = self.trace.take()
            && let Err(message) = trace.write()
        {
            eprintln!("parjob: {message}");
        }
        // Printed after the last event, so after `verbose`'s closing "Done ... finished"
        // line, which that event prints: the summary is the last thing a run says.
        let summary = self.print_prefix.as_ref().map(|prefix| {
            insights
                .to_string()
                .lines()
                .map(|line| format!("{prefix}{line}"))
                .collect::<Vec<_>>()
        });
        self.send(|| Event::RunFinished {
            ok,
            stopped,
            insights,
        });
        for line in summary.into_iter().flatten() {
            eprintln!("{line}");
        }
    }
}
