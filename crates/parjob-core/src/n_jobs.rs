//! joblib's `n_jobs` rules and a CPU count that honours cgroup quotas and affinity.

use crate::Error;

/// The number of CPUs this process may use.
///
/// The smallest of: the CPUs in this thread's affinity mask, and the cgroup CPU quota
/// (cgroup v2 `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`), rounded up. Always at
/// least 1. This is what `n_jobs = -1` means. Read once per process: reading the cgroup
/// files costs tens of microseconds, too much to repeat for every run.
pub fn cpu_count() -> usize {
    static CPU_COUNT: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *CPU_COUNT.get_or_init(read_cpu_count)
}

fn read_cpu_count() -> usize {
    let affinity = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cgroup_quota_cpus() {
        Some(quota) => affinity.min(quota).max(1),
        None => affinity.max(1),
    }
}

/// How many workers `n_jobs` means, by joblib's rules: `n > 0` is `n`; `-1` is
/// [`cpu_count()`]; `-k` is `cpu_count() + 1 - k`, at least 1.
///
/// # Errors
/// `n_jobs == 0` is [`Error::InvalidNJobs`].
///
/// ```
/// use parjob::{cpu_count, effective_n_jobs};
/// assert_eq!(effective_n_jobs(3).unwrap(), 3);
/// assert_eq!(effective_n_jobs(-1).unwrap(), cpu_count());
/// assert!(effective_n_jobs(0).is_err());
/// ```
pub fn effective_n_jobs(n_jobs: i32) -> Result<usize, Error> {
    resolve_n_jobs(n_jobs, cpu_count, "")
}

/// `n_jobs` as `Parallel::new` and `Executor::new` take it, from the integer a program holds:
/// an `i32`, `i64` or `isize` by joblib's rules (`n > 0` workers, `-1` all CPUs, `-k` all but
/// `k - 1`),
/// or a count as a `usize`, `u64` or `u32` (from `cpu_count()`, a `len()`, a clap argument).
///
/// A count above `i32::MAX` counts as `i32::MAX`: more workers than any backend starts, so the
/// run refuses it with [`Error::TooManyWorkers`]. `0` is refused as [`Error::InvalidNJobs`].
///
/// ```
/// use parjob::{cpu_count, Parallel};
///
/// let workers: usize = cpu_count().div_ceil(2);
/// assert_eq!(Parallel::new(workers).effective_n_jobs()?, workers);
/// assert_eq!(Parallel::new(-1).effective_n_jobs()?, cpu_count());
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct NJobs(i32);

impl NJobs {
    /// The value by joblib's rules.
    pub fn get(self) -> i32 {
        self.0
    }
}

impl From<i32> for NJobs {
    fn from(n_jobs: i32) -> NJobs {
        NJobs(n_jobs)
    }
}

impl From<usize> for NJobs {
    fn from(workers: usize) -> NJobs {
        NJobs(i32::try_from(workers).unwrap_or(i32::MAX))
    }
}

impl From<u32> for NJobs {
    fn from(workers: u32) -> NJobs {
        NJobs(i32::try_from(workers).unwrap_or(i32::MAX))
    }
}

impl From<i64> for NJobs {
    /// By joblib's rules, as an `i32`; beyond its range, the nearest `i32` (refused alike).
    fn from(n_jobs: i64) -> NJobs {
        NJobs(i32::try_from(n_jobs).unwrap_or(if n_jobs > 0 { i32::MAX } else { i32::MIN }))
    }
}

impl From<isize> for NJobs {
    /// By joblib's rules, as an `i32`; beyond its range, the nearest `i32` (refused alike).
    fn from(n_jobs: isize) -> NJobs {
        NJobs(i32::try_from(n_jobs).unwrap_or(if n_jobs > 0 { i32::MAX } else { i32::MIN }))
    }
}

impl From<u64> for NJobs {
    fn from(workers: u64) -> NJobs {
        NJobs(i32::try_from(workers).unwrap_or(i32::MAX))
    }
}

/// The most threads the threading backend starts: far above what I/O-bound work needs (a
/// thread blocked in a read costs memory, not CPU), far below what would exhaust the machine's
/// thread or memory limits.
pub const MAX_THREADS: usize = 10_000;

/// The most worker processes the process backend starts: each is a copy of the program (a few
/// MB at least) watched by threads in the driver.
pub const MAX_PROCESSES: usize = 1_024;

/// Refuses a worker count above what `backend` starts, naming where it came from.
///
/// # Errors
/// [`Error::TooManyWorkers`] with the limit and what to do instead.
pub fn check_worker_limit(
    workers: usize,
    backend: crate::Backend,
    source_note: &str,
) -> Result<usize, Error> {
    let (limit, advice) = match backend {
        crate::Backend::Process => (
            MAX_PROCESSES,
            "each worker is a copy of this program; for I/O-bound tasks use the threading \
             backend, for CPU-bound ones n_jobs = -1",
        ),
        _ => (
            MAX_THREADS,
            "I/O-bound tasks rarely gain from more threads than connections the other side \
             serves; CPU-bound ones want n_jobs = -1",
        ),
    };
    if workers > limit {
        return Err(Error::TooManyWorkers {
            requested: workers,
            limit,
            backend,
            source_note: source_note.to_string(),
            advice,
        });
    }
    Ok(workers)
}

/// `cpus` is only asked for negative `n_jobs`.
pub(crate) fn resolve_n_jobs(
    n_jobs: i32,
    cpus: impl FnOnce() -> usize,
    source_note: &str,
) -> Result<usize, Error> {
    match n_jobs {
        0 => Err(Error::InvalidNJobs {
            value: 0,
            source_note: source_note.to_string(),
        }),
        n if n > 0 => Ok(n.unsigned_abs() as usize),
        n => {
            let k = n.unsigned_abs() as usize;
            Ok((cpus() + 1).saturating_sub(k).max(1))
        }
    }
}

/// CPUs allowed by the cgroup this process is in, if it sets a quota.
fn cgroup_quota_cpus() -> Option<usize> {
    let self_cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    for line in self_cgroup.lines() {
        // cgroup v2: "0::/path"; v1: "N:cpu,cpuacct:/path".
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        if controllers.is_empty() {
            let dir = std::path::Path::new("/sys/fs/cgroup").join(path);
            if let Some(n) = read_quota_v2(&dir) {
                return Some(n);
            }
        } else if controllers.split(',').any(|c| c == "cpu") {
            for mount in ["/sys/fs/cgroup/cpu,cpuacct", "/sys/fs/cgroup/cpu"] {
                let dir = std::path::Path::new(mount).join(path);
                if let Some(n) = read_quota_v1(&dir) {
                    return Some(n);
                }
            }
        }
    }
    None
}

fn read_quota_v2(dir: &std::path::Path) -> Option<usize> {
    // The quota may be set on this group or any ancestor; the tightest one counts.
    let mut best: Option<usize> = None;
    let mut dir = Some(dir);
    while let Some(d) = dir {
        if let Ok(text) = std::fs::read_to_string(d.join("cpu.max"))
            && let Some(n) = parse_cgroup_v2_cpu_max(&text)
        {
            best = Some(best.map_or(n, |b| b.min(n)));
        }
        if d == std::path::Path::new("/sys/fs/cgroup") {
            break;
        }
        dir = d.parent();
    }
    best
}

fn read_quota_v1(dir: &std::path::Path) -> Option<usize> {
    let quota = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).ok()?;
    let period = std::fs::read_to_string(dir.join("cpu.cfs_period_us")).ok()?;
    parse_cgroup_v1_quota(&quota, &period)
}

/// Parses cgroup v2's `cpu.max` (`"max 100000"` or `"150000 100000"`) into whole CPUs,
/// rounding up.
pub(crate) fn parse_cgroup_v2_cpu_max(text: &str) -> Option<usize> {
    let mut fields = text.split_whitespace();
    let quota = fields.next()?;
    let period: u64 = fields.next().map_or(Some(100_000), |p| p.parse().ok())?;
    if quota == "max" {
        return None;
    }
    quota_to_cpus(quota.parse().ok()?, period)
}

/// Parses cgroup v1's `cpu.cfs_quota_us` (`-1` for none) and `cpu.cfs_period_us`.
pub(crate) fn parse_cgroup_v1_quota(quota: &str, period: &str) -> Option<usize> {
    let quota: i64 = quota.trim().parse().ok()?;
    let period: u64 = period.trim().parse().ok()?;
    if quota <= 0 {
        return None;
    }
    quota_to_cpus(quota as u64, period)
}

fn quota_to_cpus(quota: u64, period: u64) -> Option<usize> {
    if period == 0 {
        return None;
    }
    Some((quota.div_ceil(period) as usize).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_integer_type_a_flag_parses_to_gives_the_same_n_jobs() {
        assert_eq!(NJobs::from(-1i64), NJobs::from(-1i32));
        assert_eq!(NJobs::from(4i64), NJobs::from(4i32));
        assert_eq!(NJobs::from(4u64), NJobs::from(4usize));
        assert_eq!(NJobs::from(i64::MAX).get(), i32::MAX);
        assert_eq!(NJobs::from(i64::MIN).get(), i32::MIN);
        assert_eq!(NJobs::from(u64::MAX).get(), i32::MAX);
        assert_eq!(NJobs::from(0i64).get(), 0);
        assert_eq!(NJobs::from(-1isize), NJobs::from(-1i32));
        assert_eq!(NJobs::from(-3isize), NJobs::from(-3i64));
        assert_eq!(NJobs::from(isize::MAX).get(), i32::MAX);
        assert_eq!(NJobs::from(isize::MIN).get(), i32::MIN);
    }

    #[test]
    fn absurd_worker_counts_are_refused_with_the_limit_and_the_source() {
        let err = check_worker_limit(
            99_999_999,
            crate::Backend::Threading,
            " (from PARJOB_N_JOBS)",
        )
        .unwrap_err()
        .to_string();
        for part in [
            "99999999",
            "(from PARJOB_N_JOBS)",
            "threading",
            "at most 10000",
        ] {
            assert!(err.contains(part), "{err} lacks {part}");
        }
        let err = check_worker_limit(10_000, crate::Backend::Process, "").unwrap_err();
        assert!(err.to_string().contains("at most 1024"), "{err}");
        assert_eq!(
            check_worker_limit(1_024, crate::Backend::Process, ""),
            Ok(1_024)
        );
        assert_eq!(
            check_worker_limit(5_000, crate::Backend::Threading, ""),
            Ok(5_000)
        );
    }

    #[test]
    fn positive_n_jobs_is_taken_as_is() {
        assert_eq!(resolve_n_jobs(7, || 2, ""), Ok(7));
    }

    #[test]
    fn minus_one_is_all_cpus() {
        assert_eq!(resolve_n_jobs(-1, || 8, ""), Ok(8));
    }

    #[test]
    fn minus_k_leaves_k_minus_one_cpus_free_but_at_least_one_worker() {
        assert_eq!(resolve_n_jobs(-2, || 8, ""), Ok(7));
        assert_eq!(resolve_n_jobs(-2, || 2, ""), Ok(1));
        assert_eq!(resolve_n_jobs(-10, || 2, ""), Ok(1));
        assert_eq!(resolve_n_jobs(i32::MIN, || 2, ""), Ok(1));
    }

    #[test]
    fn zero_is_an_error_that_explains_the_rules() {
        let err = resolve_n_jobs(0, || 2, "").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("invalid n_jobs 0") && text.contains("-1"),
            "{text}"
        );
    }

    #[test]
    fn cgroup_v2_quota_rounds_up() {
        assert_eq!(parse_cgroup_v2_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cgroup_v2_cpu_max("200000 100000\n"), Some(2));
        assert_eq!(parse_cgroup_v2_cpu_max("150000 100000"), Some(2));
        assert_eq!(parse_cgroup_v2_cpu_max("50000 100000"), Some(1));
        assert_eq!(parse_cgroup_v2_cpu_max("garbage"), None);
    }

    #[test]
    fn cgroup_v1_quota_minus_one_means_unlimited() {
        assert_eq!(parse_cgroup_v1_quota("-1\n", "100000\n"), None);
        assert_eq!(parse_cgroup_v1_quota("300000\n", "100000\n"), Some(3));
        assert_eq!(parse_cgroup_v1_quota("1\n", "0\n"), None);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "reads /proc and cgroup files, which Miri isolation refuses"
    )]
    fn cpu_count_is_at_most_available_parallelism() {
        let available = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = cpu_count();
        assert!(n >= 1 && n <= available, "{n} vs {available}");
    }
}
