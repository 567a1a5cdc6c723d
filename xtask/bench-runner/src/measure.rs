//! How every figure is taken: one warm-up run per implementation, then counted repeats with
//! the implementations interleaved (A B C A B C ...), so that drift on a shared machine hits
//! them all alike.
//!
//! Each implementation runs on a thread of its own, which the bench waits on with a time
//! limit: a backend that hangs is reported as hung and left behind, and the others go on.

use std::hint::black_box;
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Which side of a comparison a row is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Group {
    /// One of parjob's backends.
    Parjob,
    /// Rust code that does the same work without parjob (rayon, std threads, a loop).
    Reference,
    /// Python's joblib or concurrent.futures (`--peers`).
    Peer,
}

/// Why an implementation has no figure.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The backend is not in this build of parjob (`Error::BackendUnavailable`).
    NotBuilt(String),
    /// It ran and went wrong: the error, as the library printed it.
    Failed(String),
}

impl From<parjob::Error> for Failure {
    fn from(error: parjob::Error) -> Self {
        match error {
            parjob::Error::BackendUnavailable { .. } => Failure::NotBuilt(error.to_string()),
            other => Failure::Failed(other.to_string()),
        }
    }
}

/// One timed run: its wall time, or why there is none.
pub type Attempt = Result<Duration, Failure>;

/// One implementation of a scenario's work, ready to be timed many times.
pub struct Candidate {
    /// The scenario's variant this runs (`n_jobs=10`, `warm pool`), or empty.
    pub variant: String,
    /// What runs the work: `parjob threading`, `rayon par_iter`, ...
    pub implementation: String,
    /// Which side of the comparison it is on.
    pub group: Group,
    /// Times one run. Setup that must not be counted happens inside, before the clock starts.
    pub run: Box<dyn FnMut() -> Attempt + Send>,
}

impl Candidate {
    /// A parjob backend whose run is timed as a whole; its result is kept from the optimiser.
    pub fn parjob<T>(
        variant: impl Into<String>,
        backend: parjob::Backend,
        mut run: impl FnMut() -> Result<T, parjob::Error> + Send + 'static,
    ) -> Self {
        Candidate {
            variant: variant.into(),
            implementation: parjob_name(backend),
            group: Group::Parjob,
            run: Box::new(move || {
                let start = Instant::now();
                let out = run()?;
                let elapsed = start.elapsed();
                drop(black_box(out));
                Ok(elapsed)
            }),
        }
    }

    /// A reference implementation that cannot fail, timed as a whole.
    pub fn reference<T>(
        variant: impl Into<String>,
        implementation: impl Into<String>,
        mut run: impl FnMut() -> T + Send + 'static,
    ) -> Self {
        Candidate {
            variant: variant.into(),
            implementation: implementation.into(),
            group: Group::Reference,
            run: Box::new(move || {
                let start = Instant::now();
                let out = run();
                let elapsed = start.elapsed();
                drop(black_box(out));
                Ok(elapsed)
            }),
        }
    }

    /// Any implementation that times itself (to leave setup out of the clock).
    pub fn timed(
        variant: impl Into<String>,
        implementation: impl Into<String>,
        group: Group,
        run: impl FnMut() -> Attempt + Send + 'static,
    ) -> Self {
        Candidate {
            variant: variant.into(),
            implementation: implementation.into(),
            group,
            run: Box::new(run),
        }
    }
}

/// The name a parjob backend's rows carry: `parjob threading`.
pub fn parjob_name(backend: parjob::Backend) -> String {
    format!("parjob {backend}")
}

/// How many runs to make of each implementation.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Plan {
    /// Uncounted runs first (pools start, caches fill, pages fault in).
    pub warmups: usize,
    /// Counted runs; the median of these is quoted.
    pub repeats: usize,
    /// How long one run may take before it is taken as hung.
    #[serde(skip)]
    pub time_limit: Duration,
}

/// How long one run may take in a real bench before it is taken as hung.
pub const HUNG_AFTER: Duration = Duration::from_secs(60);

/// What came of timing one candidate.
pub struct Outcome {
    /// The candidate's variant.
    pub variant: String,
    /// The candidate's implementation name.
    pub implementation: String,
    /// The candidate's group.
    pub group: Group,
    /// Seconds of each counted run, or why there are none.
    pub samples: Result<Vec<f64>, Failure>,
}

/// Implementations that hung earlier in this bench, with the scenario they hung in: they are
/// skipped from then on, so that a hanging backend costs one time limit, not one per scenario.
static HUNG: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());

fn hung_before(implementation: &str) -> Option<String> {
    let hung = HUNG.lock().unwrap_or_else(|e| e.into_inner());
    hung.iter()
        .find(|(name, _)| name == implementation)
        .map(|(_, scenario)| scenario.clone())
}

/// A candidate's own thread: it runs the candidate once per `go` and sends back the result.
struct Runner {
    go: mpsc::Sender<()>,
    done: mpsc::Receiver<Attempt>,
    thread: std::thread::JoinHandle<()>,
    hung: bool,
}

impl Runner {
    fn start(mut run: Box<dyn FnMut() -> Attempt + Send>) -> Runner {
        let (go, go_rx) = mpsc::channel::<()>();
        let (done_tx, done) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("bench-candidate".into())
            .spawn(move || {
                for () in go_rx {
                    if done_tx.send(run()).is_err() {
                        break;
                    }
                }
            })
            .expect("spawning a bench thread: the process can make threads");
        Runner {
            go,
            done,
            thread,
            hung: false,
        }
    }

    /// Ends the thread and waits until it has dropped the candidate (and so shut its pools
    /// down), so that no shutdown overlaps the next scenario. A hung thread is left behind.
    fn finish(self) {
        drop(self.go);
        if !self.hung {
            let _ = self.thread.join();
        }
    }

    /// One run, or why there is none (including a hang or a panic).
    fn once(&mut self, limit: Duration) -> Attempt {
        if self.go.send(()).is_err() {
            return Err(Failure::Failed("its thread ended (it panicked)".into()));
        }
        match self.done.recv_timeout(limit) {
            Ok(attempt) => attempt,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                self.hung = true;
                Err(Failure::Failed(format!(
                    "hung: one run gave no result in {limit:?}; it was left running and skipped"
                )))
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Failure::Failed(
                "it panicked (its message is on stderr above)".into(),
            )),
        }
    }
}

/// Times every candidate: `plan.warmups` runs of each, then `plan.repeats` rounds in which
/// each candidate still standing runs once, in order. A candidate that fails or hangs stops
/// there and keeps its failure; the others go on.
pub fn interleaved(scenario: &str, plan: Plan, candidates: Vec<Candidate>) -> Vec<Outcome> {
    let mut state: Vec<(Outcome, Runner)> = candidates
        .into_iter()
        .map(|c| {
            let samples = match hung_before(&c.implementation) {
                Some(earlier) => Err(Failure::Failed(format!(
                    "skipped: it hung earlier in this bench (in {earlier})"
                ))),
                None => Ok(Vec::with_capacity(plan.repeats)),
            };
            let outcome = Outcome {
                variant: c.variant,
                implementation: c.implementation,
                group: c.group,
                samples,
            };
            (outcome, Runner::start(c.run))
        })
        .collect();
    let rounds = (0..plan.warmups)
        .map(|_| None)
        .chain((0..plan.repeats).map(Some));
    for round in rounds {
        for (outcome, runner) in &mut state {
            let Ok(taken) = &mut outcome.samples else {
                continue;
            };
            match runner.once(plan.time_limit) {
                Ok(elapsed) if round.is_some() => taken.push(elapsed.as_secs_f64()),
                Ok(_) => {}
                Err(failure) => {
                    if runner.hung {
                        HUNG.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((outcome.implementation.clone(), scenario.to_string()));
                    }
                    let name = format!("{} {}", outcome.variant, outcome.implementation);
                    eprintln!("parjob-bench: {scenario} {}: {failure:?}", name.trim());
                    outcome.samples = Err(failure);
                }
            }
        }
    }
    state
        .into_iter()
        .map(|(outcome, runner)| {
            runner.finish();
            outcome
        })
        .collect()
}

/// Median, min and max of samples (seconds). `None` when there are none.
pub fn summary(samples: &[f64]) -> Option<(f64, f64, f64)> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let median = if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    };
    Some((median, sorted[0], sorted[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> Plan {
        Plan {
            warmups: 1,
            repeats: 3,
            time_limit: Duration::from_millis(300),
        }
    }

    #[test]
    fn a_backend_that_is_not_built_is_reported_and_the_others_still_run() {
        let candidates = vec![
            Candidate::parjob("", parjob::Backend::Process, || {
                Err::<(), _>(parjob::Error::backend_unavailable(
                    parjob::Backend::Process,
                    "not in this build",
                ))
            }),
            Candidate::reference("", "loop", || 1 + 1),
        ];
        let out = interleaved("test", plan(), candidates);
        assert!(
            matches!(&out[0].samples, Err(Failure::NotBuilt(r)) if r.contains("not in this build"))
        );
        assert_eq!(out[1].samples.as_ref().map(Vec::len).ok(), Some(3));
    }

    #[test]
    fn a_run_that_hangs_is_reported_and_skipped_later_in_the_bench() {
        let candidates = vec![
            Candidate::reference("", "sleeps too long (test)", || {
                std::thread::sleep(Duration::from_secs(5))
            }),
            Candidate::reference("", "quick (test)", || 1 + 1),
        ];
        let out = interleaved("hangs", plan(), candidates);
        assert!(matches!(&out[0].samples, Err(Failure::Failed(r)) if r.starts_with("hung")));
        assert_eq!(out[1].samples.as_ref().map(Vec::len).ok(), Some(3));
        let again = vec![Candidate::reference("", "sleeps too long (test)", || ())];
        let out = interleaved("later", plan(), again);
        assert!(matches!(&out[0].samples, Err(Failure::Failed(r)) if r.contains("earlier")));
    }

    #[test]
    fn summary_quotes_the_median_min_and_max() {
        assert_eq!(summary(&[3.0, 1.0, 2.0]), Some((2.0, 1.0, 3.0)));
        assert_eq!(summary(&[4.0, 1.0, 2.0, 3.0]), Some((2.5, 1.0, 4.0)));
        assert_eq!(summary(&[]), None);
    }
}
