//! Backend names: what `--backend` flags and `PARJOB_BACKEND` parse into.

use std::fmt;
use std::str::FromStr;

use crate::Error;

/// Where tasks run.
///
/// Parse one from a flag with [`str::parse`]; [`Display`](fmt::Display) gives the canonical
/// name back.
///
/// ```
/// use parjob::Backend;
/// assert_eq!("threads".parse::<Backend>().unwrap(), Backend::Threading);
/// assert_eq!("loky".parse::<Backend>().unwrap(), Backend::Process);
/// assert_eq!(Backend::Process.to_string(), "process");
/// let err = "gpu".parse::<Backend>().unwrap_err().to_string();
/// assert!(err.contains("gpu") && err.contains("threading"));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum Backend {
    /// One task after another on the calling thread: for debugging and `n_jobs = 1`.
    Sequential,
    /// A pool of up to `n_jobs` threads in this process, started as work arrives. The default (`Backend::default()`,
    /// and what a `Parallel` uses when neither `.backend(..)` nor `PARJOB_BACKEND` says).
    #[default]
    Threading,
    /// `n_jobs` worker processes: crash isolation and hard timeouts.
    Process,
    /// The ranks of an MPI world started by `mpirun` or `srun`: rank 0 drives, every other
    /// rank runs tasks in a local process pool (the `mpi` feature of `parjob`; see
    /// docs/CLUSTER.md).
    Mpi,
}

impl Backend {
    /// Every backend, in the order the docs list them.
    pub const ALL: [Backend; 4] = [
        Backend::Sequential,
        Backend::Threading,
        Backend::Process,
        Backend::Mpi,
    ];

    /// The canonical name, as accepted by `FromStr` and printed by `Display`.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sequential => "sequential",
            Backend::Threading => "threading",
            Backend::Process => "process",
            Backend::Mpi => "mpi",
        }
    }

    /// Parses a name, saying in the error where the name came from (e.g. an environment
    /// variable).
    pub(crate) fn parse_from(name: &str, source_note: &str) -> Result<Backend, Error> {
        match name.trim().to_ascii_lowercase().as_str() {
            "sequential" => Ok(Backend::Sequential),
            "threading" | "threads" => Ok(Backend::Threading),
            "process" | "processes" | "loky" | "multiprocessing" => Ok(Backend::Process),
            "mpi" => Ok(Backend::Mpi),
            _ => Err(Error::UnknownBackend {
                name: name.to_string(),
                source_note: source_note.to_string(),
            }),
        }
    }
}

impl FromStr for Backend {
    type Err = Error;

    fn from_str(name: &str) -> Result<Backend, Error> {
        Backend::parse_from(name, "")
    }
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_names_round_trip() {
        for backend in Backend::ALL {
            assert_eq!(backend.to_string().parse::<Backend>(), Ok(backend));
        }
    }

    #[test]
    fn aliases_parse_case_insensitively() {
        assert_eq!("Threads".parse::<Backend>(), Ok(Backend::Threading));
        for alias in ["processes", "LOKY", "multiprocessing"] {
            assert_eq!(alias.parse::<Backend>(), Ok(Backend::Process));
        }
    }

    #[test]
    fn unknown_name_lists_valid_ones() {
        let message = "gpu".parse::<Backend>().unwrap_err().to_string();
        for expected in [
            "\"gpu\"",
            "sequential",
            "threading",
            "threads",
            "process",
            "loky",
        ] {
            assert!(message.contains(expected), "{message} lacks {expected}");
        }
    }
}
