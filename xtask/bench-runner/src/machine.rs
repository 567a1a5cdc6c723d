//! Facts about the machine a report came from: figures mean little without them.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// Where a bench ran.
#[derive(Debug, Clone, Serialize)]
pub struct Machine {
    /// CPUs this process may use (`std::thread::available_parallelism`, like `nproc`).
    pub nproc: usize,
    /// CPUs the kernel has online.
    pub nproc_online: usize,
    /// `parjob::cpu_count()`: what `n_jobs = -1` means here.
    pub cpu_count: usize,
    /// `model name` from /proc/cpuinfo.
    pub cpu_model: String,
    /// /proc/loadavg's three load averages when the bench started.
    pub load_start: String,
    /// The same when it ended (filled in at the end).
    pub load_end: String,
    /// The kernel release.
    pub kernel: String,
    /// MemTotal from /proc/meminfo.
    pub memory: String,
    /// When the bench started, UTC.
    pub timestamp: String,
    /// The git commit of the working tree, if git can tell.
    pub commit: String,
    /// The parjob version benched.
    pub parjob_version: String,
}

impl Machine {
    /// Reads the facts now.
    pub fn read() -> Machine {
        let cpuinfo = read("/proc/cpuinfo");
        let field = |name: &str| {
            cpuinfo
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        };
        let nproc_online = cpuinfo
            .lines()
            .filter(|l| l.starts_with("processor"))
            .count();
        let memory = read("/proc/meminfo")
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kb| format!("{:.1} GiB of memory", kb as f64 / 1024.0 / 1024.0))
            .unwrap_or_else(|| "memory unknown".into());
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        Machine {
            nproc: std::thread::available_parallelism().map_or(1, |n| n.get()),
            nproc_online,
            cpu_count: parjob::cpu_count(),
            cpu_model: field("model name").unwrap_or_else(|| "unknown".into()),
            load_start: load_average(),
            load_end: String::new(),
            kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
            memory,
            timestamp: utc_now(),
            commit,
            parjob_version: env!("CARGO_PKG_VERSION").to_string(),
        }
    }
}

/// The three load averages, `0.52 0.31 0.20`.
pub fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `2026-11-22 05:01:09 UTC`, without a date crate.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rest / 3600,
        rest % 3600 / 60,
        rest % 60
    )
}
