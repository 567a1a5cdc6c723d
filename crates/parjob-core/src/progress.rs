//! Progress reporting: joblib-style verbose lines and an indicatif bar, both on stderr.
//!
//! The [`Reporter`] is one more consumer of a run's [`Event`]s: the dispatcher's observer
//! hands it every event it builds (see [`Reporter::on_event`]), so what the bar and the
//! verbose lines count is exactly what a user's `on_event` callback sees.
//!
//! The bar needs the `progress` cargo feature (on by default). Without it the API is the same
//! and `progress: true` draws nothing; the verbose lines do not depend on the feature.

use std::io::Write;
use std::time::{Duration, Instant};

use bar::Bar;

use crate::Event;

/// Where verbose lines go: stderr, or a buffer in tests.
pub(crate) type Sink = Box<dyn Write + Send>;

/// Follows one run and prints what the user asked for.
pub(crate) struct Reporter {
    verbose: u32,
    prefix: String,
    began: Instant,
    sink: Sink,
    bar: Option<Bar>,
    dispatched_batches: usize,
    /// Known once the input iterator is exhausted.
    total: Option<usize>,
    completed: usize,
    pre_dispatch_tasks: usize,
}

impl Reporter {
    /// A reporter on stderr, or `None` when it would show nothing (`verbose` is 0 and no bar
    /// can be drawn). `pre_dispatch` is how many tasks may be in flight; joblib's line
    /// spacing uses it.
    pub(crate) fn new(
        n_jobs: i32,
        verbose: u32,
        progress: bool,
        total_hint: Option<usize>,
        pre_dispatch: usize,
    ) -> Option<Self> {
        let sink = Box::new(std::io::stderr());
        let reporter = Self::with_sink(n_jobs, verbose, progress, total_hint, pre_dispatch, sink);
        (reporter.verbose > 0 || reporter.bar.is_some()).then_some(reporter)
    }

    /// Follows one event of the run: the only way the dispatcher reports to it.
    pub(crate) fn on_event(&mut self, event: &Event) {
        match event {
            Event::RunStarted { backend, workers } => self.started(backend, *workers),
            Event::BatchDispatched { attempt: 1, .. } => self.dispatched(),
            Event::InputEnded { tasks, .. } => self.exhausted(*tasks),
            // A retry's task was counted with the batch it first ran in.
            Event::BatchCompleted { batch, tasks, .. } if *batch < crate::retry::RETRY_SEQ_BASE => {
                self.completed(*tasks);
            }
            // Finished when the run was not stopped and every task of its input came back
            // (with a value or an error: a run that keeps going finishes with its failures).
            // A stopped run's skipped batches come back too, so the count alone cannot tell.
            Event::RunFinished {
                stopped, insights, ..
            } => {
                let all_back = self.total.is_some_and(|total| self.completed >= total);
                self.finished(!stopped && all_back);
                if *stopped {
                    self.stopped(insights.failed > 0);
                }
            }
            _ => {}
        }
    }

    pub(crate) fn with_sink(
        n_jobs: i32,
        verbose: u32,
        progress: bool,
        total_hint: Option<usize>,
        pre_dispatch: usize,
        sink: Sink,
    ) -> Self {
        let bar = if progress { Bar::new(total_hint) } else { None };
        Reporter {
            verbose,
            prefix: format!("[Parallel(n_jobs={n_jobs})]: "),
            began: Instant::now(),
            sink,
            bar,
            dispatched_batches: 0,
            total: None,
            completed: 0,
            pre_dispatch_tasks: pre_dispatch,
        }
    }

    fn line(&mut self, text: std::fmt::Arguments<'_>) {
        let _ = writeln!(self.sink, "{}{}", self.prefix, text);
    }

    pub(crate) fn started(&mut self, backend_name: &str, workers: usize) {
        if self.verbose > 0 {
            self.line(format_args!(
                "Using backend {backend_name} with {workers} concurrent workers."
            ));
        }
    }

    /// One more batch was sent (joblib spaces its lines by batches while the input is read).
    pub(crate) fn dispatched(&mut self) {
        self.dispatched_batches += 1;
    }

    /// The input ran out after `tasks` tasks.
    pub(crate) fn exhausted(&mut self, tasks: usize) {
        if self.total.is_none() {
            self.total = Some(tasks);
            if let Some(bar) = &self.bar {
                bar.set_length(tasks);
            }
        }
    }

    /// `tasks` more tasks are done. Mirrors joblib's `print_progress`: while the input is
    /// still being read, lines come at increasingly spaced batch counts; once its length is
    /// known, about `verbose` lines over the rest, with an estimate of the time remaining.
    pub(crate) fn completed(&mut self, tasks: usize) {
        self.completed += tasks;
        if let Some(bar) = &self.bar {
            bar.inc(tasks);
        }
        if self.verbose == 0 {
            return;
        }
        let elapsed = self.began.elapsed();
        match self.total {
            Some(total) if self.completed >= total => {}
            None => {
                if !verbosity_filter(self.dispatched_batches, self.verbose) {
                    let done = self.completed;
                    self.line(format_args!(
                        "Done {done:3} tasks      | elapsed: {}",
                        short_format_time(elapsed)
                    ));
                }
            }
            Some(total) => {
                let index = self.completed;
                let cursor = total as i64 + 1 - index as i64 - self.pre_dispatch_tasks as i64;
                let frequency = (total / self.verbose as usize + 1) as i64;
                let is_last = index + 1 == total;
                if is_last || cursor.rem_euclid(frequency) != 0 {
                    return;
                }
                let remaining = elapsed.mul_f64((total - index) as f64 / index.max(1) as f64);
                self.line(format_args!(
                    "Done {index:3} out of {total:3} | elapsed: {} remaining: {}",
                    short_format_time(elapsed),
                    short_format_time(remaining)
                ));
            }
        }
    }

    /// The run is over: `ok` tells whether it finished or stopped on an error.
    /// A run that stopped before its end: says so, and why, instead of "finished".
    fn stopped(&mut self, failed: bool) {
        if self.verbose == 0 {
            return;
        }
        let done = self.completed;
        let elapsed = short_format_time(self.began.elapsed());
        let why = if failed {
            "a task failed, and the run returns its error"
        } else {
            "the run was dropped before its end"
        };
        self.line(format_args!(
            "Stopped after {done:3} tasks | elapsed: {elapsed}: {why}"
        ));
    }

    pub(crate) fn finished(&mut self, ok: bool) {
        if let Some(bar) = self.bar.take() {
            bar.finish(ok);
        }
        if self.verbose > 0 && ok {
            let done = self.completed;
            let elapsed = short_format_time(self.began.elapsed());
            self.line(format_args!(
                "Done {done:3} out of {done:3} | elapsed: {elapsed} finished"
            ));
        }
    }
}

/// The progress bar on stderr, with the `progress` feature: indicatif's.
#[cfg(feature = "progress")]
mod bar {
    use std::io::Write;

    use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

    pub(super) struct Bar {
        bar: ProgressBar,
        /// Where the bar draws (stderr), for the line break after its last drawing.
        terminal: Box<dyn Write + Send>,
    }

    impl Bar {
        /// A bar for `total` tasks (unknown: `None`). indicatif draws nothing when stderr is
        /// not a terminal.
        pub(super) fn new(total: Option<usize>) -> Option<Bar> {
            Some(Bar::drawn_to(
                total,
                ProgressDrawTarget::stderr(),
                Box::new(std::io::stderr()),
            ))
        }

        /// A bar drawn to `target`, which writes to `terminal`.
        pub(super) fn drawn_to(
            total: Option<usize>,
            target: ProgressDrawTarget,
            terminal: Box<dyn Write + Send>,
        ) -> Bar {
            let bar = ProgressBar::with_draw_target(total.map(|n| n as u64), target);
            let style = ProgressStyle::with_template(
                "{elapsed_precise} [{wide_bar}] {pos}/{len} tasks (eta {eta})",
            );
            if let Ok(style) = style {
                bar.set_style(style);
            }
            Bar { bar, terminal }
        }

        pub(super) fn set_length(&self, total: usize) {
            self.bar.set_length(total as u64);
        }

        pub(super) fn inc(&self, tasks: usize) {
            self.bar.inc(tasks as u64);
        }

        /// Leaves the bar full when the run finished (`ok`), where it stopped otherwise, and
        /// the cursor at the start of the next line. indicatif leaves it at the end of the
        /// bar's line (padded to the terminal's width, so that only a terminal that wraps
        /// there moves on), and whatever the program prints next would land on the bar.
        pub(super) fn finish(mut self, ok: bool) {
            if ok {
                self.bar.finish();
            } else {
                self.bar.abandon();
            }
            if !self.bar.is_hidden() {
                let _ = self.terminal.write_all(b"\n");
                let _ = self.terminal.flush();
            }
        }
    }
}

/// Without the `progress` feature there is no bar: none can be made, so `progress: true`
/// draws nothing, and the methods below can never be called.
#[cfg(not(feature = "progress"))]
mod bar {
    pub(super) enum Bar {}

    impl Bar {
        pub(super) fn new(_total: Option<usize>) -> Option<Bar> {
            None
        }

        pub(super) fn set_length(&self, _total: usize) {
            match *self {}
        }

        pub(super) fn inc(&self, _tasks: usize) {
            match *self {}
        }

        pub(super) fn finish(self, _ok: bool) {
            match self {}
        }
    }
}

/// joblib's `_verbosity_filter`: `true` to skip the line for batch `index`.
fn verbosity_filter(index: usize, verbose: u32) -> bool {
    if verbose > 10 || index == 0 {
        return false;
    }
    // Squared by multiplication, which is exact here, as Python's `** 2` on an int is: `powi`
    // may be off by an ulp (it is under Miri), and that moves which batches get a line.
    let steps = f64::from(11 - verbose);
    let scale_base = 0.5 * steps * steps;
    let scale = (index as f64 / scale_base).sqrt();
    let next_scale = ((index + 1) as f64 / scale_base).sqrt();
    scale.trunc() == next_scale.trunc()
}

/// joblib's `short_format_time`: `"  0.5s"` style under a minute, `" 1.5min"` above.
fn short_format_time(t: Duration) -> String {
    let secs = t.as_secs_f64();
    if secs > 60.0 {
        format!("{:4.1}min", secs / 60.0)
    } else {
        format!(" {secs:5.1}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn lines(shared: &Shared) -> Vec<String> {
        let text = String::from_utf8(shared.0.lock().unwrap().clone()).unwrap();
        text.lines().map(str::to_owned).collect()
    }

    #[test]
    fn time_format_matches_joblib() {
        assert_eq!(short_format_time(Duration::from_millis(500)), "   0.5s");
        assert_eq!(short_format_time(Duration::from_secs(90)), " 1.5min");
    }

    /// The events of a run of `n` one-task batches whose input ends after the last one.
    fn events_of_a_run(n: usize) -> Vec<Event> {
        let at = Duration::ZERO;
        let mut events = vec![Event::RunStarted {
            backend: "ThreadingBackend",
            workers: 2,
        }];
        for i in 0..n {
            events.push(Event::BatchDispatched {
                batch: i as u64,
                first_index: i,
                tasks: 1,
                attempt: 1,
                at,
            });
        }
        events.push(Event::InputEnded { tasks: n, at });
        for i in 0..n {
            events.push(Event::BatchCompleted {
                batch: i as u64,
                first_index: i,
                tasks: 1,
                failed: 0,
                worker: Some(i % 2),
                busy: at,
                transport: None,
                at,
            });
        }
        events.push(Event::RunFinished {
            ok: true,
            stopped: false,
            insights: Default::default(),
        });
        events
    }

    #[test]
    fn verbose_run_prints_joblib_lines() {
        let shared = Shared::default();
        let mut reporter = Reporter::with_sink(2, 5, false, None, 4, Box::new(shared.clone()));
        for event in events_of_a_run(100) {
            reporter.on_event(&event);
        }
        let lines = lines(&shared);
        assert_eq!(
            lines[0],
            "[Parallel(n_jobs=2)]: Using backend ThreadingBackend with 2 concurrent workers."
        );
        let last = lines.last().unwrap();
        assert!(
            last.starts_with("[Parallel(n_jobs=2)]: Done 100 out of 100 | elapsed: ")
                && last.ends_with("s finished"),
            "{last}"
        );
        let middle: Vec<_> = lines[1..lines.len() - 1].iter().collect();
        // joblib prints about `verbose` lines once the total is known: here at 13, 34, .. 97.
        assert_eq!(middle.len(), 5, "{middle:?}");
        assert!(
            middle
                .iter()
                .all(|l| l.contains(" out of 100 | elapsed: ") && l.contains("remaining:"))
        );
    }

    #[test]
    fn retries_are_not_counted_twice_and_a_stopped_run_does_not_say_finished() {
        let shared = Shared::default();
        let mut reporter = Reporter::with_sink(2, 1, false, None, 4, Box::new(shared.clone()));
        let mut events = events_of_a_run(10);
        // The last two batches never came back (the run stopped), and a retry came back.
        let finished = events.pop().unwrap();
        events.truncate(events.len() - 2);
        events.push(Event::BatchCompleted {
            batch: crate::retry::RETRY_SEQ_BASE,
            first_index: 3,
            tasks: 1,
            failed: 0,
            worker: None,
            busy: Duration::ZERO,
            transport: None,
            at: Duration::ZERO,
        });
        events.push(finished);
        for event in &events {
            reporter.on_event(event);
        }
        assert_eq!(reporter.completed, 8);
        let lines = lines(&shared);
        assert!(!lines.iter().any(|l| l.ends_with("finished")), "{lines:?}");
    }

    #[test]
    fn a_stopped_run_whose_batches_all_came_back_does_not_say_finished_but_why_it_stopped() {
        for (failed, why) in [
            (1, "a task failed, and the run returns its error"),
            (0, "the run was dropped before its end"),
        ] {
            let shared = Shared::default();
            let mut reporter = Reporter::with_sink(2, 1, false, None, 4, Box::new(shared.clone()));
            let mut events = events_of_a_run(3);
            let last = events.len() - 1;
            events[last] = Event::RunFinished {
                ok: false,
                stopped: true,
                insights: std::sync::Arc::new(crate::Insights {
                    failed,
                    ..Default::default()
                }),
            };
            for event in &events {
                reporter.on_event(event);
            }
            assert_eq!(reporter.completed, 3);
            let lines = lines(&shared);
            assert!(!lines.iter().any(|l| l.ends_with("finished")), "{lines:?}");
            let last = lines.last().unwrap();
            assert!(
                last.starts_with("[Parallel(n_jobs=2)]: Stopped after   3 tasks | elapsed: ")
                    && last.ends_with(why),
                "{last}"
            );
        }
    }

    #[test]
    fn quiet_run_prints_nothing() {
        let shared = Shared::default();
        let mut reporter = Reporter::with_sink(4, 0, false, None, 8, Box::new(shared.clone()));
        for event in events_of_a_run(3) {
            reporter.on_event(&event);
        }
        assert!(lines(&shared).is_empty());
        assert!(Reporter::new(4, 0, false, None, 8).is_none());
    }

    /// A terminal 40 columns wide that records what is drawn on it, escapes included.
    #[cfg(feature = "progress")]
    #[derive(Clone, Default)]
    struct Screen(Shared);

    #[cfg(feature = "progress")]
    impl std::fmt::Debug for Screen {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("Screen")
        }
    }

    #[cfg(feature = "progress")]
    impl indicatif::TermLike for Screen {
        fn width(&self) -> u16 {
            40
        }
        fn move_cursor_up(&self, n: usize) -> std::io::Result<()> {
            self.write_str(&format!("\x1b[{n}A"))
        }
        fn move_cursor_down(&self, n: usize) -> std::io::Result<()> {
            self.write_str(&format!("\x1b[{n}B"))
        }
        fn move_cursor_right(&self, n: usize) -> std::io::Result<()> {
            self.write_str(&format!("\x1b[{n}C"))
        }
        fn move_cursor_left(&self, n: usize) -> std::io::Result<()> {
            self.write_str(&format!("\x1b[{n}D"))
        }
        fn write_line(&self, s: &str) -> std::io::Result<()> {
            self.write_str(&format!("{s}\n"))
        }
        fn write_str(&self, s: &str) -> std::io::Result<()> {
            self.0.0.lock().unwrap().extend_from_slice(s.as_bytes());
            Ok(())
        }
        fn clear_line(&self) -> std::io::Result<()> {
            self.write_str("\r\x1b[2K")
        }
        fn flush(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[cfg(feature = "progress")]
    #[test]
    fn a_finished_bar_leaves_the_cursor_on_a_fresh_line() {
        for ok in [true, false] {
            let screen = Screen::default();
            let target = indicatif::ProgressDrawTarget::term_like(Box::new(screen.clone()));
            let bar = bar::Bar::drawn_to(Some(3), target, Box::new(screen.0.clone()));
            bar.inc(if ok { 3 } else { 1 });
            bar.finish(ok);
            let text = String::from_utf8(screen.0.0.lock().unwrap().clone()).unwrap();
            let drawn = if ok { "3/3 tasks" } else { "1/3 tasks" };
            assert!(text.contains(drawn), "{text:?}");
            // What the program prints next starts a line of its own.
            assert!(text.ends_with('\n'), "{text:?}");
        }
    }

    #[cfg(feature = "progress")]
    #[test]
    fn a_bar_that_is_not_drawn_adds_no_line() {
        let written = Shared::default();
        let target = indicatif::ProgressDrawTarget::hidden();
        let bar = bar::Bar::drawn_to(Some(3), target, Box::new(written.clone()));
        bar.inc(3);
        bar.finish(true);
        assert!(written.0.lock().unwrap().is_empty());
    }

    #[test]
    fn lines_while_reading_input_are_increasingly_spaced() {
        let printed: Vec<usize> = (0..200).filter(|&i| !verbosity_filter(i, 5)).collect();
        assert_eq!(printed[0], 0);
        let gaps: Vec<usize> = printed.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.windows(2).all(|g| g[1] >= g[0]), "{gaps:?}");
        assert!((0..50).all(|i| !verbosity_filter(i, 11)));
    }
}
