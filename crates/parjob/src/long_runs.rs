//! What long runs need on [`Parallel`]: keep going past failures, retries, events, insights
//! and a trace of the run. The work is done in `parjob-core`'s dispatcher, so it behaves the
//! same on every backend and on a pool of your own.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use parjob_core::{Error, Event, EventSink, Insights, Retry, Task};

use crate::Parallel;

/// The settings behind `on_event` and `insights`: the user's callback, and where the last
/// run's insights are kept.
#[derive(Debug, Default)]
pub(crate) struct LongRun {
    user_sink: Option<EventSink>,
    collect_insights: bool,
    last_insights: Arc<Mutex<Option<Arc<Insights>>>>,
}

impl Parallel {
    /// Runs every task and returns every outcome in input order, one per task: a failed task
    /// is its `Err` in its place, and the run goes on (joblib's `return_as="list"` without
    /// stopping at the first error). The keep-going counterpart of [`run`](Parallel::run),
    /// with the same ordering and laziness.
    ///
    /// ```
    /// use parjob::{delayed, Error, Parallel};
    ///
    /// fn check(x: u32) -> u32 { assert!(x != 3, "no threes"); x }
    /// let results = Parallel::new(2).run_results((0..5u32).map(|i| delayed(check, i)))?;
    /// assert_eq!(results.len(), 5);
    /// assert_eq!(results[4], Ok(4));
    /// assert!(matches!(results[3], Err(Error::TaskPanicked { index: 3, .. })));
    /// # Ok::<(), parjob::Error>(())
    /// ```
    ///
    /// # Errors
    /// Only a run that cannot start (an invalid configuration, as for `run`); task failures
    /// are in the vector.
    pub fn run_results<I, T>(&self, tasks: I) -> Result<Vec<Result<T::Output, Error>>, Error>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        let pool = self.pool_for_run()?;
        Ok(parjob_core::run_results(pool, tasks, &self.options))
    }

    /// Retries a task whose worker crashed or that timed out, up to `retries` more times, at
    /// once: `retry(Retry::new(retries))`. See [`Retry`] for backoff and panics.
    ///
    /// ```
    /// use parjob::{delayed, Parallel};
    ///
    /// fn square(x: u64) -> u64 { x * x }
    /// let out = Parallel::new(2).retries(3).run((0..4u64).map(|i| delayed(square, i)))?;
    /// assert_eq!(out, [0, 1, 4, 9]);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn retries(self, retries: u32) -> Parallel {
        self.retry(Retry::new(retries))
    }

    /// How failed tasks are retried: how many times, after what wait, and whether panics
    /// count. A retried task runs again as a batch of its own (on the process backend, a
    /// crashed or killed worker has been replaced by then); a task that succeeds on retry
    /// yields its value in its place; one that fails every time fails with
    /// [`Error::RetriesExhausted`], which lists every attempt. Results keep their order and
    /// the input is pulled as lazily as without retries. The dispatcher keeps a copy of every
    /// task's arguments (encoded and decoded once) while its batch is out.
    pub fn retry(mut self, retry: Retry) -> Parallel {
        self.options.retry = retry;
        self
    }

    /// Calls `callback` with every [`Event`] of every run: batches dispatched and completed,
    /// failures, retries, crashed workers, the start and the end (with its [`Insights`]).
    /// Called on the thread that drives the run, in order; keep it short. A run without a
    /// callback, trace, insights or verbose output pays nothing for events.
    pub fn on_event(mut self, callback: impl Fn(&Event) + Send + Sync + 'static) -> Parallel {
        self.long_run.user_sink = Some(EventSink::new(callback));
        self.install_sink();
        self
    }

    /// Gathers each run's [`Insights`] (tasks, failures, retries, time in tasks, busy share
    /// by worker, batch sizes, slowest batches): read them with
    /// [`last_insights`](Parallel::last_insights). `verbose >= 1` prints them at the end of
    /// a run in any case.
    pub fn insights(mut self, enabled: bool) -> Parallel {
        self.long_run.collect_insights = enabled;
        self.install_sink();
        self
    }

    /// The insights of the last run that ended, when [`insights(true)`](Parallel::insights)
    /// (or an `on_event` callback) is set.
    pub fn last_insights(&self) -> Option<Arc<Insights>> {
        self.long_run
            .last_insights
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Writes a Chrome trace-event JSON of each run to `path` (each run replaces the file):
    /// every batch on its worker's row, every crash and retry; open it in
    /// <https://ui.perfetto.dev> or `chrome://tracing`. Without this call, the environment
    /// variable `PARJOB_TRACE=path` does the same. A file that cannot be written is reported
    /// on stderr; the run's results are not affected.
    pub fn trace(mut self, path: impl Into<PathBuf>) -> Parallel {
        self.options.trace = Some(path.into());
        self
    }

    /// Sets the run's event sink: the user's callback, and the capture of insights.
    fn install_sink(&mut self) {
        let user = self.long_run.user_sink.clone();
        if user.is_none() && !self.long_run.collect_insights {
            self.options.on_event = None;
            return;
        }
        let last = Arc::clone(&self.long_run.last_insights);
        self.options.on_event = Some(EventSink::new(move |event: &Event| {
            if let Event::RunFinished { insights, .. } = event {
                *last.lock().unwrap_or_else(PoisonError::into_inner) = Some(Arc::clone(insights));
            }
            if let Some(user) = &user {
                user.send(event);
            }
        }));
    }
}
