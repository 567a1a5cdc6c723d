//! Rows, the table on stdout, `report.md` and `report.json`.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::machine::Machine;
use crate::measure::{Failure, Group, Outcome, summary};
use crate::rules::{Reference, reference_for, target_for};

pub use crate::names::SCENARIOS;

/// Whether a row has figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "reason", rename_all = "snake_case")]
pub enum Status {
    /// Timed: `samples` holds the counted runs.
    Measured,
    /// The backend is not in this build of parjob.
    NotBuilt(String),
    /// It ran and failed.
    Failed(String),
    /// It could not be run here (a Python peer without joblib, a scenario a backend cannot do).
    Unavailable(String),
}

/// One implementation's runs of one scenario variant: what the bench and the Python script
/// both produce (the script writes the same JSON shape).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// One of [`SCENARIOS`].
    pub scenario: String,
    /// `n_jobs=10`, `warm pool`, ... or empty.
    #[serde(default)]
    pub variant: String,
    /// What ran it: `parjob threading`, `rayon par_iter`, `joblib loky`, ...
    pub implementation: String,
    /// parjob, a Rust reference, or a Python peer.
    pub group: Group,
    /// Units of work one run does, for throughput (tasks, GB); 0 when not a throughput.
    #[serde(default)]
    pub work: f64,
    /// The unit of `work`: `tasks`, `GB`, or empty.
    #[serde(default)]
    pub unit: String,
    /// Seconds of each counted run.
    #[serde(default)]
    pub samples: Vec<f64>,
    /// Whether it was measured, and if not, why.
    pub status: Status,
    /// Anything a reader needs to read the figure right (a smaller size, a different task).
    #[serde(default)]
    pub note: String,
}

impl Measurement {
    /// A row with no figures, saying `why`: a variant an implementation cannot run here.
    pub fn unavailable(
        scenario: &str,
        variant: &str,
        implementation: &str,
        group: Group,
        why: impl Into<String>,
    ) -> Measurement {
        Measurement {
            scenario: scenario.into(),
            variant: variant.into(),
            implementation: implementation.into(),
            group,
            work: 0.0,
            unit: String::new(),
            samples: Vec::new(),
            status: Status::Unavailable(why.into()),
            note: String::new(),
        }
    }

    /// Turns a scenario's timing outcomes into rows; `work` gives each one's work and unit.
    pub fn from_outcomes(
        scenario: &str,
        outcomes: Vec<Outcome>,
        work: impl Fn(&str) -> (f64, &'static str),
    ) -> Vec<Measurement> {
        outcomes
            .into_iter()
            .map(|o| {
                let (amount, unit) = work(&o.variant);
                let (samples, status) = match o.samples {
                    Ok(samples) => (samples, Status::Measured),
                    Err(Failure::NotBuilt(reason)) => (Vec::new(), Status::NotBuilt(reason)),
                    Err(Failure::Failed(reason)) => (Vec::new(), Status::Failed(reason)),
                };
                Measurement {
                    scenario: scenario.to_string(),
                    variant: o.variant,
                    implementation: o.implementation,
                    group: o.group,
                    work: amount,
                    unit: unit.to_string(),
                    samples,
                    status,
                    note: String::new(),
                }
            })
            .collect()
    }
}

/// A measurement with its figures worked out: what the table, the Markdown and the JSON show.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The raw measurement.
    #[serde(flatten)]
    pub measurement: Measurement,
    /// Median seconds per run.
    pub median: Option<f64>,
    /// Fastest run, seconds.
    pub min: Option<f64>,
    /// Slowest run, seconds.
    pub max: Option<f64>,
    /// Work units per second at the median.
    pub rate: Option<f64>,
    /// What the ratio is taken against (`rayon par_iter`, `ideal 10 ms`, ...).
    pub reference: Option<String>,
    /// The reference's median seconds.
    pub reference_median: Option<f64>,
    /// Throughput over the reference's (its time over this row's, for equal work): above 1 is
    /// faster than the reference.
    pub ratio: Option<f64>,
    /// The row's target from docs/TARGETS.md, as text.
    pub target: Option<String>,
    /// Whether the target is met; `None` with no target or no figure.
    pub met: Option<bool>,
}

/// Works out medians, throughputs, references, ratios and targets.
pub fn rows(measurements: &[Measurement]) -> Vec<Row> {
    let stats = |m: &Measurement| {
        let s = summary(&m.samples);
        let rate = s.and_then(|(median, _, _)| (m.work > 0.0).then(|| m.work / median));
        (s, rate)
    };
    let mut rows: Vec<Row> = measurements
        .iter()
        .map(|m| {
            let (s, rate) = stats(m);
            let (reference, reference_median, ratio) = match reference_for(m) {
                Reference::Row {
                    variant,
                    implementation,
                } => {
                    let found = measurements.iter().find(|r| {
                        r.scenario == m.scenario
                            && r.variant == variant
                            && r.implementation == implementation
                    });
                    let label = if variant == m.variant {
                        implementation.clone()
                    } else if variant.is_empty() {
                        format!("{implementation} (plain)")
                    } else {
                        format!("{implementation} ({variant})")
                    };
                    let (ref_s, ref_rate) = found.map(stats).unwrap_or((None, None));
                    let ratio = match (rate, ref_rate, s, ref_s) {
                        (Some(r), Some(rr), _, _) => Some(r / rr),
                        (_, _, Some((m, _, _)), Some((rm, _, _))) => Some(rm / m),
                        _ => None,
                    };
                    (Some(label), ref_s.map(|(rm, _, _)| rm), ratio)
                }
                Reference::Ideal { label, seconds } => {
                    (Some(label), Some(seconds), s.map(|(m, _, _)| seconds / m))
                }
                Reference::None => (None, None, None),
            };
            let target = target_for(m);
            Row {
                measurement: m.clone(),
                median: s.map(|s| s.0),
                min: s.map(|s| s.1),
                max: s.map(|s| s.2),
                rate,
                reference,
                reference_median,
                ratio,
                target: target.map(|t| t.describe(&m.unit)),
                met: target.and_then(|t| t.met(s.map(|s| s.0), rate, ratio)),
            }
        })
        .collect();
    // Stable: within a scenario, the order the rows were measured in (parjob, references, peers).
    rows.sort_by_key(|r| {
        SCENARIOS
            .iter()
            .position(|s| *s == r.measurement.scenario)
            .unwrap_or(SCENARIOS.len())
    });
    rows
}

/// `1.23 ms`, `45.6 us`, `789 ns`, `2.10 s`.
pub fn fmt_seconds(s: f64) -> String {
    if s >= 1.0 {
        format!("{s:.2} s")
    } else if s >= 1e-3 {
        format!("{:.3} ms", s * 1e3)
    } else if s >= 1e-6 {
        format!("{:.2} us", s * 1e6)
    } else {
        format!("{:.0} ns", s * 1e9)
    }
}

/// A throughput in its unit: `3.1e7 tasks/s`, `2.40 GB/s`.
pub fn fmt_rate(rate: f64, unit: &str) -> String {
    match unit {
        "GB" => format!("{rate:.2} GB/s"),
        "" => format!("{rate:.3e}/s"),
        unit => format!("{rate:.2e} {unit}/s"),
    }
}

/// `1.23x`, or with enough digits to tell small ratios apart: `0.0042x`.
fn fmt_ratio(r: f64) -> String {
    if r >= 0.1 {
        format!("{r:.2}x")
    } else if r >= 0.001 {
        format!("{r:.4}x")
    } else {
        format!("{r:.1e}x")
    }
}

/// The cells of one row, in table order.
fn cells(row: &Row) -> [String; 10] {
    let m = &row.measurement;
    let dash = || "-".to_string();
    let scenario = if m.variant.is_empty() {
        m.scenario.clone()
    } else {
        format!("{} ({})", m.scenario, m.variant)
    };
    let median = match &m.status {
        Status::Measured => row.median.map(fmt_seconds).unwrap_or_else(dash),
        Status::NotBuilt(_) => "not built".to_string(),
        Status::Failed(_) => "failed".to_string(),
        Status::Unavailable(_) => "unavailable".to_string(),
    };
    let throughput = match (row.rate, m.unit.as_str(), row.median) {
        (Some(rate), "tasks", Some(median)) => {
            let ns = median / m.work * 1e9;
            let per_task = if ns < 10.0 {
                format!("{ns:.2} ns/task")
            } else {
                format!("{ns:.0} ns/task")
            };
            format!("{} ({per_task})", fmt_rate(rate, "tasks"))
        }
        (Some(rate), unit, _) => fmt_rate(rate, unit),
        _ => dash(),
    };
    [
        scenario,
        m.implementation.clone(),
        median,
        row.min.map(fmt_seconds).unwrap_or_else(dash),
        row.max.map(fmt_seconds).unwrap_or_else(dash),
        throughput,
        row.reference.clone().unwrap_or_else(dash),
        row.ratio.map(fmt_ratio).unwrap_or_else(dash),
        row.target.clone().unwrap_or_else(dash),
        match row.met {
            Some(true) => "yes".to_string(),
            Some(false) => "NO".to_string(),
            None => dash(),
        },
    ]
}

const HEADERS: [&str; 10] = [
    "scenario",
    "implementation",
    "median",
    "min",
    "max",
    "throughput",
    "reference",
    "ratio",
    "target",
    "met",
];

/// The table as aligned plain text, for stdout.
pub fn text_table(rows: &[Row]) -> String {
    let all: Vec<[String; 10]> = rows.iter().map(cells).collect();
    let mut widths = HEADERS.map(str::len);
    for r in &all {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    let line = |out: &mut String, cells: &[&str]| {
        let padded: Vec<String> = cells
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        let _ = writeln!(out, "{}", padded.join("  ").trim_end());
    };
    line(&mut out, &HEADERS);
    let mut last = "";
    for (row, c) in rows.iter().zip(&all) {
        if !last.is_empty() && last != row.measurement.scenario {
            out.push('\n');
        }
        last = &row.measurement.scenario;
        line(&mut out, &c.each_ref().map(String::as_str));
    }
    out
}

/// The table in Markdown.
pub fn markdown_table(rows: &[Row]) -> String {
    let mut out = format!("| {} |\n", HEADERS.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(HEADERS.len()));
    for row in rows {
        let c = cells(row).map(|c| c.replace('|', "\\|"));
        let _ = writeln!(out, "| {} |", c.join(" | "));
    }
    out
}

/// Why rows have no figures, each reason once, for below the table.
pub fn reasons(rows: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for row in rows {
        let m = &row.measurement;
        let reason = match &m.status {
            Status::Measured => continue,
            Status::NotBuilt(r) => format!("not built: {r}"),
            Status::Failed(r) => format!("failed: {r}"),
            Status::Unavailable(r) => format!("unavailable: {r}"),
        };
        let line = format!("{} ({}): {reason}", m.implementation, m.scenario);
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

/// Notes attached to rows (a smaller size, a different task), each once.
pub fn notes(rows: &[Row]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for row in rows {
        let m = &row.measurement;
        if m.note.is_empty() {
            continue;
        }
        let line = format!("{} ({}): {}", m.implementation, m.scenario, m.note);
        if !out.contains(&line) {
            out.push(line);
        }
    }
    out
}

/// How the run was made: what the report says about its own method.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// `--quick`: smaller sizes and fewer repeats.
    pub quick: bool,
    /// Warm-up runs per implementation.
    pub warmups: usize,
    /// Counted runs per implementation (startup: `startup_repeats`).
    pub repeats: usize,
    /// Counted runs per implementation in `startup` and `crash`, which are cheap.
    pub startup_repeats: usize,
    /// The parjob backends asked for.
    pub backends: Vec<String>,
    /// The scenarios run.
    pub scenarios: Vec<String>,
    /// Per scenario, what one run does.
    pub sizes: Vec<(String, String)>,
    /// Wall time of the whole bench, seconds.
    pub elapsed: f64,
}

/// Everything one bench run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Where it ran.
    pub machine: Machine,
    /// How.
    pub settings: Settings,
    /// The rows, in scenario order.
    pub rows: Vec<Row>,
    /// Why the Python peers did not run, when they did not.
    pub peers_unavailable: Option<String>,
}

impl Report {
    /// The Markdown report: machine, method, the table, reasons and notes.
    pub fn markdown(&self) -> String {
        let m = &self.machine;
        let s = &self.settings;
        let mut out = String::from("# parjob bench report\n\n");
        let _ = writeln!(
            out,
            "Made by `cargo xtask bench{}` at {} (parjob {}, commit {}).\n",
            if s.quick { " --quick" } else { "" },
            m.timestamp,
            m.parjob_version,
            m.commit
        );
        let _ = writeln!(out, "## Machine\n");
        let _ = writeln!(
            out,
            "- CPU: {} ({} CPUs online, {} usable by this process, parjob::cpu_count() = {})",
            m.cpu_model, m.nproc_online, m.nproc, m.cpu_count
        );
        let _ = writeln!(
            out,
            "- load average (1, 5, 15 min): {} at the start, {} at the end",
            m.load_start, m.load_end
        );
        let _ = writeln!(out, "- kernel {}, {}\n", m.kernel, m.memory);
        let _ = writeln!(out, "## Method\n");
        let _ = writeln!(
            out,
            "{} warm-up run{} per implementation, then {} counted runs ({} in startup and crash) \
             with the implementations interleaved (A B C A B C ...); median, min and max of the \
             counted runs. Ratio: throughput over the reference's (for equal work, the \
             reference's time over this row's), so above 1 is faster. Whole bench: {:.0} s.{}\n",
            s.warmups,
            if s.warmups == 1 { "" } else { "s" },
            s.repeats,
            s.startup_repeats,
            s.elapsed,
            if s.quick {
                " **Quick run**: smaller sizes and fewer than 5 repeats: a smoke test, not \
                 figures to quote."
            } else {
                ""
            }
        );
        for (scenario, size) in &s.sizes {
            let _ = writeln!(out, "- `{scenario}`: {size}");
        }
        let _ = writeln!(out, "\n## Results\n");
        out.push_str(&markdown_table(&self.rows));
        let reasons = reasons(&self.rows);
        if !reasons.is_empty() || self.peers_unavailable.is_some() {
            let _ = writeln!(out, "\n## Rows without figures\n");
            if let Some(why) = &self.peers_unavailable {
                let _ = writeln!(out, "- Python peers: {why}");
            }
            for r in reasons {
                let _ = writeln!(out, "- {r}");
            }
        }
        let notes = notes(&self.rows);
        if !notes.is_empty() {
            let _ = writeln!(out, "\n## Notes\n");
            for n in notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }

    /// Writes `report.md` and `report.json` into `dir`.
    ///
    /// # Errors
    /// The folder or a file cannot be written.
    pub fn write(&self, dir: &Path) -> Result<(), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let md = dir.join("report.md");
        std::fs::write(&md, self.markdown())
            .map_err(|e| format!("cannot write {}: {e}", md.display()))?;
        let json = dir.join("report.json");
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| format!("cannot encode the report as JSON: {e}"))?;
        std::fs::write(&json, text).map_err(|e| format!("cannot write {}: {e}", json.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn measured(scenario: &str, variant: &str, implementation: &str, group: Group) -> Measurement {
        Measurement {
            scenario: scenario.into(),
            variant: variant.into(),
            implementation: implementation.into(),
            group,
            work: 1000.0,
            unit: "tasks".into(),
            samples: vec![0.002, 0.001, 0.003],
            status: Status::Measured,
            note: String::new(),
        }
    }

    #[test]
    fn ratio_is_throughput_over_the_reference() {
        let mut parjob = measured("small", "", "parjob threading", Group::Parjob);
        parjob.samples = vec![0.004; 3];
        let rayon = measured("small", "", "rayon par_iter", Group::Reference);
        let rows = rows(&[parjob, rayon]);
        assert_eq!(rows[0].reference.as_deref(), Some("rayon par_iter"));
        assert_eq!(rows[0].ratio, Some(0.5));
        assert_eq!(rows[0].target.as_deref(), Some(">= 0.9x"));
        assert_eq!(rows[0].met, Some(false));
        assert_eq!(rows[1].ratio, None, "the reference has no reference");
    }

    #[test]
    fn peers_with_less_work_are_compared_on_throughput() {
        let rayon = measured("tiny", "", "rayon par_iter", Group::Reference);
        let mut peer = measured("tiny", "", "joblib loky", Group::Peer);
        peer.work = 10.0; // a hundredth of the calls in the same time
        let rows = rows(&[rayon, peer]);
        let ratio = rows[1].ratio.expect("the peer has a ratio");
        assert!((ratio - 0.01).abs() < 1e-12, "{ratio}");
        assert_eq!(rows[1].target, None, "targets are parjob's alone");
    }

    #[test]
    fn a_backend_not_built_keeps_its_reason_and_has_no_figures() {
        let mut process = measured("tiny", "", "parjob process", Group::Parjob);
        process.samples.clear();
        process.status = Status::NotBuilt("the process backend is not available".into());
        let rows = rows(&[process]);
        assert_eq!(rows[0].median, None);
        assert_eq!(rows[0].met, None);
        assert!(text_table(&rows).contains("not built"));
        assert_eq!(
            reasons(&rows),
            ["parjob process (tiny): not built: the process backend is not available"]
        );
    }

    #[test]
    fn procspawn_s_fresh_pool_is_held_against_starting_a_process() {
        let mut spawn = measured(
            "startup",
            "fresh pool",
            crate::rules::SPAWN,
            Group::Reference,
        );
        spawn.samples = vec![0.002];
        let mut pool = measured("startup", "fresh pool", "procspawn Pool", Group::Peer);
        pool.samples = vec![0.004];
        let mut warm = measured("startup", "warm pool", "procspawn Pool", Group::Peer);
        warm.samples = vec![0.0002];
        let mut rayon = measured("startup", "warm pool", "rayon ThreadPool", Group::Reference);
        rayon.samples = vec![0.0001];
        let rows = rows(&[spawn, pool, warm, rayon]);
        assert_eq!(
            rows[1].reference.as_deref(),
            Some("spawn + wait this executable")
        );
        assert_eq!(rows[1].ratio, Some(0.5));
        assert_eq!(rows[2].reference.as_deref(), Some("rayon ThreadPool"));
        assert_eq!(rows[1].target, None, "targets are parjob's alone");
    }

    #[test]
    fn sleep_io_is_held_against_the_ideal_wall_time() {
        let mut row = measured("sleep_io", "n_jobs=10", "parjob threading", Group::Parjob);
        row.work = 0.0;
        row.samples = vec![0.125];
        let rows = rows(&[row]);
        assert_eq!(rows[0].reference.as_deref(), Some("ideal 100 ms"));
        assert_eq!(rows[0].ratio, Some(0.8));
    }

    #[test]
    fn the_python_script_s_rows_parse() {
        let json = r#"{"scenario": "crash", "variant": "next call", "implementation":
            "ProcessPoolExecutor", "group": "peer", "samples": [],
            "status": {"kind": "unavailable", "reason": "BrokenProcessPool"}}"#;
        let m: Measurement = serde_json::from_str(json).expect("valid peer row");
        assert_eq!(m.status, Status::Unavailable("BrokenProcessPool".into()));
        let json = r#"{"scenario": "tiny", "implementation": "joblib loky", "group": "peer",
            "work": 5000, "unit": "tasks", "samples": [0.1], "status": {"kind": "measured"}}"#;
        let m: Measurement = serde_json::from_str(json).expect("valid peer row");
        assert_eq!(m.status, Status::Measured);
    }
}
