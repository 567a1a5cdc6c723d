//! `PARJOB_BACKEND` and `PARJOB_N_JOBS`: defaults from the environment, like joblib's
//! `parallel_config`. They fill in what the program did not say; they never override an
//! explicit `.backend(..)` or `Parallel::new(n_jobs)`.

use crate::n_jobs::resolve_n_jobs;
use crate::{Backend, Error, cpu_count};

/// The backend `PARJOB_BACKEND` names, if it is set.
///
/// # Errors
/// An unknown name, reported with the variable it came from.
pub fn backend_from_env() -> Result<Option<Backend>, Error> {
    match std::env::var("PARJOB_BACKEND") {
        Ok(name) if !name.trim().is_empty() => {
            Backend::parse_from(&name, " (from PARJOB_BACKEND)").map(Some)
        }
        _ => Ok(None),
    }
}

/// The `n_jobs` `PARJOB_N_JOBS` gives, if it is set.
///
/// # Errors
/// A value that is not an integer, or is 0, reported with the variable it came from.
pub fn n_jobs_from_env() -> Result<Option<i32>, Error> {
    let Ok(text) = std::env::var("PARJOB_N_JOBS") else {
        return Ok(None);
    };
    if text.trim().is_empty() {
        return Ok(None);
    }
    let n: i32 = text.trim().parse().map_err(|_| Error::InvalidEnv {
        var: "PARJOB_N_JOBS",
        value: text.clone(),
        reason: "expected an integer: n > 0 workers, -1 for all CPUs, -k for all but k-1".into(),
    })?;
    resolve_n_jobs(n, || 1, " (from PARJOB_N_JOBS)")?;
    Ok(Some(n))
}

/// The number of workers for `n_jobs`, naming where an invalid value came from.
///
/// # Errors
/// [`Error::InvalidNJobs`] for 0.
pub fn resolve_workers(n_jobs: i32, from_env: bool) -> Result<usize, Error> {
    let note = if from_env {
        " (from PARJOB_N_JOBS)"
    } else {
        ""
    };
    resolve_n_jobs(n_jobs, cpu_count, note)
}
