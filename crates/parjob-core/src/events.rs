//! Events: what a run did, as typed values, for a callback of the user's
//! (`Parallel::on_event`), the insights summary and the Chrome trace.
//!
//! The dispatcher reports to an [`Observer`] only when someone listens (a callback, a trace,
//! insights, or `verbose >= 1`); otherwise it holds `None` and each batch costs one branch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::insights::{Insights, InsightsBuilder};
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
    /// A worker process died while running a task; the pool replaces it.
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
    /// The run ended (also when it stopped at a failure, or its iterator was dropped).
    RunFinished {
        /// Whether every task succeeded (`false` also for a run stopped early).
        ok: bool,
        /// The summary of the run.
        insights: Arc<Insights>,
    },
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

/// What the dispatcher reports to while someone listens: the user's callback, the insights
/// being gathered, the trace being recorded, the verbose summary.
pub(crate) struct Observer {
    began: Instant,
    sink: Option<EventSink>,
    insights: InsightsBuilder,
    trace: Option<TraceRecorder>,
    /// `[Parallel(n_jobs=..)]: ` when the summary is printed at the end (`verbose >= 1`).
    print_prefix: Option<String>,
    finished: bool,
}

impl Observer {
    /// An observer if anyone listens, else `None`.
    pub(crate) fn new(options: &crate::RunOptions) -> Option<Box<Observer>> {
        let trace = crate::trace::trace_path(options).map(TraceRecorder::new);
        if options.on_event.is_none() && trace.is_none() && options.verbose == 0 {
            return None;
        }
        Some(Box::new(Observer {
            began: Instant::now(),
            sink: options.on_event.clone(),
            insights: InsightsBuilder::default(),
            trace,
            print_prefix: (options.verbose > 0)
                .then(|| format!("[Parallel(n_jobs={})]: ", options.n_jobs)),
            finished: false,
        }))
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    fn send(&self, event: impl FnOnce() -> Event) {
        if let Some(sink) = &self.sink {
            sink.send(&event());
        }
    }

    pub(crate) fn started(&mut self, backend: &'static str, workers: usize) {
        self.insights.started(backend, workers);
        if let Some(trace) = &mut self.trace {
            trace.started(backend, workers);
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
        self.insights.dispatched(tasks, attempt);
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
    ) {
        let at = self.now();
        self.insights
            .completed(first_index, tasks, failures.len(), worker, busy);
        if batch < crate::retry::RETRY_SEQ_BASE {
            self.insights.counted(tasks);
        }
        if let Some(trace) = &mut self.trace {
            trace.batch(first_index, tasks, failures.len(), worker, busy, at);
        }
        for (_, error) in failures {
            if let Error::WorkerCrashed {
                worker,
                pid,
                status,
                index,
                ..
            } = error
            {
                self.insights.crashed();
                if let Some(trace) = &mut self.trace {
                    trace.instant(format!("worker {worker} (pid {pid}) crashed: {status}"), at);
                }
                self.send(|| Event::WorkerCrashed {
                    worker: *worker,
                    pid: *pid,
                    status: status.clone(),
                    index: *index,
                });
            }
        }
        self.send(|| Event::BatchCompleted {
            batch,
            first_index,
            tasks,
            failed: failures.len(),
            worker,
            busy,
            at,
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
        let ok = ok && insights.failed == 0;
        if let Some(trace) = self.trace.take()
            && let Err(message) = trace.write()
        {
            eprintln!("parjob: {message}");
        }
        if let Some(prefix) = &self.print_prefix {
            for line in insights.to_string().lines() {
                eprintln!("{prefix}{line}");
            }
        }
        self.send(|| Event::RunFinished { ok, insights });
    }
}
