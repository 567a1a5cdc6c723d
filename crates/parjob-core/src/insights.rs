//! Insights: the summary of a run (mpire's insights), gathered from its events.

use std::time::Duration;

use crate::events::{Transport, WorkerChange};

/// How many of the slowest batches a summary keeps.
const SLOWEST: usize = 5;

/// What a run did, in figures: `Parallel::last_insights()` after a run with
/// `.insights(true)`, [`Event::RunFinished`](crate::Event::RunFinished), and printed at the
/// end of a run with `verbose >= 1`. `Display` gives a few lines.
///
/// ```
/// use parjob::{delayed, Parallel};
///
/// fn square(x: u64) -> u64 { x * x }
/// let parallel = Parallel::new(2).insights(true);
/// parallel.run((0..1000u64).map(|i| delayed(square, i)))?;
/// let insights = parallel.last_insights().expect("the run gathered insights");
/// assert_eq!(insights.tasks, 1000);
/// assert_eq!(insights.failed, 0);
/// println!("{insights}");
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Insights {
    /// The pool's name, e.g. `ThreadingBackend`.
    pub backend: &'static str,
    /// How many workers it has.
    pub workers: usize,
    /// Tasks that came back (first attempts), with or without a value.
    pub tasks: usize,
    /// Tasks that failed for good (after their retries).
    pub failed: usize,
    /// Attempts made again after a failure.
    pub retries: usize,
    /// Worker processes that died while running a task.
    pub worker_crashes: usize,
    /// Tasks that ran past their `timeout` (each attempt counts).
    pub timeouts: usize,
    /// The time the timed-out attempts that were given up at their limit (a killed worker, a
    /// thread left running) held their workers, up to that limit: not part of
    /// [`Insights::busy`]. Attempts seen only when they returned (the sequential backend) are
    /// in `busy` already, and not here.
    pub in_timeouts: Duration,
    /// Worker processes started in empty slots, as the pool reported them during the run.
    pub worker_starts: usize,
    /// Worker processes started in place of one that crashed, was killed or was recycled.
    pub worker_replacements: usize,
    /// Of [`Insights::worker_replacements`], those in place of a worker that no task of
    /// this run lost: one lost at the end of an earlier run (a crash or a timeout that ended
    /// it: its replacement is reported with its slot's next batch, in a later run), or one
    /// that died while idle.
    pub worker_replacements_of_earlier_losses: usize,
    /// Worker processes told to exit after their share of tasks (`max_tasks_per_worker`).
    pub worker_recycles: usize,
    /// What moving batches to other processes and back cost, every batch summed: bytes
    /// each way, time encoding, on the line, decoding. Zero for in-process pools.
    pub transport: Transport,
    /// The run's wall-clock time.
    pub wall: Duration,
    /// The time workers spent running tasks, every batch summed.
    pub busy: Duration,
    /// The same by worker index, for pools that say which worker ran each batch (the
    /// threading, process and MPI backends); empty otherwise.
    pub busy_by_worker: Vec<Duration>,
    /// Batches that came back (retries included).
    pub batches: usize,
    /// Tasks in those batches (retries included): over [`Insights::batches`], the mean
    /// batch size.
    pub tasks_in_batches: usize,
    /// The smallest and largest batch dispatched (retries included), in tasks.
    pub batch_sizes: (usize, usize),
    /// The slowest batches, slowest first: (first task index, tasks, busy time).
    pub slowest: Vec<(usize, usize, Duration)>,
}

impl Insights {
    /// The share of the workers' time (`workers x wall`) spent running tasks, in percent; the
    /// rest went to dispatching, encoding, moving and decoding data, and waiting for work.
    pub fn busy_percent(&self) -> f64 {
        let capacity = self.wall.as_secs_f64() * self.workers.max(1) as f64;
        if capacity <= 0.0 {
            return 0.0;
        }
        (100.0 * self.busy.as_secs_f64() / capacity).min(100.0)
    }
}

impl std::fmt::Display for Insights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mean = self.tasks_in_batches as f64 / self.batches.max(1) as f64;
        writeln!(
            f,
            "Insights: {} tasks in {} batches (sizes {}..{}, mean {mean:.1}), {} failed, {} retries, {} worker crashes, {} timeouts, wall {:.3}s",
            self.tasks,
            self.batches,
            self.batch_sizes.0,
            self.batch_sizes.1,
            self.failed,
            self.retries,
            self.worker_crashes,
            self.timeouts,
            self.wall.as_secs_f64()
        )?;
        // Only a pool that moves batches to other processes encodes, sends and decodes them.
        let moved = self.transport.bytes_sent > 0 || self.transport.bytes_received > 0;
        write!(
            f,
            "  in tasks {:.3}s = {:.0}% of {} workers x wall (the rest: {})",
            self.busy.as_secs_f64(),
            self.busy_percent(),
            self.workers,
            if moved {
                "dispatch, encode, IPC, decode, idle"
            } else {
                "dispatch, idle"
            }
        )?;
        if self.timeouts > 0 && !self.in_timeouts.is_zero() {
            write!(
                f,
                "\n  timed out: {} attempts; given up at their limits, they held their workers {:.3}s (not in the figure above)",
                self.timeouts,
                self.in_timeouts.as_secs_f64()
            )?;
        } else if self.timeouts > 0 {
            write!(
                f,
                "\n  timed out: {} attempts, seen when they returned (their time is in the figure above)",
                self.timeouts
            )?;
        }
        let t = &self.transport;
        if t.bytes_sent > 0 || t.bytes_received > 0 {
            write!(
                f,
                "\n  transport: {} sent, {} received; encode {:.3}s, IPC {:.3}s, decode {:.3}s (vs {:.3}s in tasks)",
                bytes(t.bytes_sent),
                bytes(t.bytes_received),
                t.encode.as_secs_f64(),
                t.ipc.as_secs_f64(),
                t.decode.as_secs_f64(),
                self.busy.as_secs_f64()
            )?;
        }
        if self.worker_starts + self.worker_replacements + self.worker_recycles > 0 {
            let earlier = match self.worker_replacements_of_earlier_losses {
                0 => String::new(),
                n => format!(" ({n} for workers lost outside this run's tasks)"),
            };
            write!(
                f,
                "\n  workers: {} started, {} replaced{earlier}, {} recycled",
                self.worker_starts, self.worker_replacements, self.worker_recycles
            )?;
        }
        if !self.busy_by_worker.is_empty() && !self.wall.is_zero() {
            f.write_str("\n  busy by worker:")?;
            for (worker, busy) in self.busy_by_worker.iter().enumerate() {
                let percent = 100.0 * busy.as_secs_f64() / self.wall.as_secs_f64();
                write!(f, " w{worker} {:.0}%", percent.min(100.0))?;
            }
        }
        if !self.slowest.is_empty() {
            f.write_str("\n  slowest batches:")?;
            for (n, (first, tasks, busy)) in self.slowest.iter().enumerate() {
                let sep = if n == 0 { " " } else { ", " };
                match tasks {
                    1 => write!(f, "{sep}task {first} {:.3}s", busy.as_secs_f64())?,
                    _ => write!(
                        f,
                        "{sep}tasks {first}..{} {:.3}s",
                        first + tasks,
                        busy.as_secs_f64()
                    )?,
                }
            }
        }
        Ok(())
    }
}

/// `n` bytes in B, kB, MB or GB (powers of 1000), three significant digits or so.
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.2} GB", n as f64 / 1e9),
    }
}

/// Gathers [`Insights`] batch by batch.
#[derive(Default)]
pub(crate) struct InsightsBuilder {
    insights: Insights,
    /// The worker processes this run's tasks lost (crashed, killed at a timeout, recycled).
    lost_pids: Vec<u32>,
}

impl InsightsBuilder {
    pub(crate) fn started(&mut self, backend: &'static str, workers: usize) {
        self.insights.backend = backend;
        self.insights.workers = workers;
    }

    pub(crate) fn dispatched(&mut self, tasks: usize) {
        let (low, high) = &mut self.insights.batch_sizes;
        *low = if *low == 0 { tasks } else { (*low).min(tasks) };
        *high = (*high).max(tasks);
    }

    pub(crate) fn completed(
        &mut self,
        first_index: usize,
        tasks: usize,
        _failed: usize,
        worker: Option<usize>,
        busy: Duration,
    ) {
        let insights = &mut self.insights;
        insights.batches += 1;
        insights.tasks_in_batches += tasks;
        insights.busy += busy;
        if let Some(worker) = worker {
            if insights.busy_by_worker.len() <= worker {
                insights.busy_by_worker.resize(worker + 1, Duration::ZERO);
            }
            insights.busy_by_worker[worker] += busy;
        }
        let slowest = &mut insights.slowest;
        if slowest.len() < SLOWEST || slowest.last().is_some_and(|s| s.2 < busy) {
            let at = slowest.partition_point(|s| s.2 >= busy);
            slowest.insert(at, (first_index, tasks, busy));
            slowest.truncate(SLOWEST);
        }
    }

    pub(crate) fn counted(&mut self, tasks: usize) {
        self.insights.tasks += tasks;
    }

    pub(crate) fn failed(&mut self, _index: usize) {
        self.insights.failed += 1;
    }

    pub(crate) fn retried(&mut self) {
        self.insights.retries += 1;
    }

    pub(crate) fn transport(&mut self, transport: &Transport) {
        self.insights.transport.add(transport);
    }

    /// A change to a worker. A replacement of a worker that none of this run's tasks lost
    /// (a crash, a killing timeout, recycling, each reported before the replacement it leads
    /// to) is counted apart.
    pub(crate) fn worker_changed(&mut self, change: &WorkerChange) {
        match change {
            WorkerChange::Started { .. } => self.insights.worker_starts += 1,
            WorkerChange::Replaced { old_pid, .. } => {
                self.insights.worker_replacements += 1;
                if !self.lost_pids.contains(old_pid) {
                    self.insights.worker_replacements_of_earlier_losses += 1;
                }
            }
            WorkerChange::Recycled { pid, .. } => {
                self.insights.worker_recycles += 1;
                self.lost_pids.push(*pid);
            }
        }
    }

    /// A worker process, `pid`, crashed in a task.
    pub(crate) fn crashed(&mut self, pid: u32) {
        self.insights.worker_crashes += 1;
        self.lost_pids.push(pid);
    }

    /// A timed-out attempt; `given_up_after`: its limit, when the run stopped waiting for it
    /// there (its time is then in no batch's busy time); `killed`: the worker process the
    /// pool killed for it, if it says.
    pub(crate) fn timed_out(&mut self, given_up_after: Option<Duration>, killed: Option<u32>) {
        self.lost_pids.extend(killed);
        self.insights.timeouts += 1;
        if let Some(limit) = given_up_after {
            self.insights.in_timeouts += limit;
        }
    }

    pub(crate) fn build(&mut self, wall: Duration) -> Insights {
        let mut insights = self.insights.clone();
        insights.wall = wall;
        insights
    }
}
