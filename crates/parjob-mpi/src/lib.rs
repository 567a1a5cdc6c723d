//! parjob's MPI backend: the same `delayed(...)` tasks on every rank of a world started by
//! `mpirun`/`mpiexec` or Slurm's `srun`.
//!
//! Rank 0 runs `main` and drives; every other rank becomes a *rank server* in
//! [`init`] and never returns: it supervises a local parjob process pool and relays the frames
//! rank 0 sends it to that pool (`Job::relayed`), so a task that aborts, segfaults or exits
//! kills a local worker process, never the rank, and `mpirun` never tears the job down.
//!
//! - [`init`]: under a launcher, turns ranks 1.. into rank servers; elsewhere a no-op.
//! - [`MpiPool`]: the [`Pool`](parjob_core::Pool) `Parallel` uses for
//!   [`Backend::Mpi`](parjob_core::Backend::Mpi).
//! - [`launched_by_mpi`], [`launch_hint`]: whether this process was started by a launcher,
//!   and how to start it so.
//!
//! The backend itself is behind this crate's `mpi` feature (which `parjob`'s `mpi` feature
//! turns on): without it, the crate builds without MPI or libclang, and [`MpiPool::new`]
//! reports the backend unavailable. How it works and what it survives: `docs/CLUSTER.md`.
#![deny(missing_docs)]

/// How to start this program so that the MPI backend can run, for error messages: the
/// commands name the program as it was started (its `argv[0]`, quoted for a shell where it
/// needs it), with its arguments after it. An `argv[0]` that no shell line could hold (control
/// characters, backticks, over 200 bytes) is not repeated: the commands say `./myprog`.
///
/// ```
/// assert!(parjob_mpi::launch_hint().starts_with("start the program under an MPI launcher, e.g. `mpirun -n 3 "));
/// ```
pub fn launch_hint() -> String {
    let started_as = std::env::args_os()
        .next()
        .map(|arg| arg.to_string_lossy().into_owned())
        .unwrap_or_default();
    let program = shell_word(&started_as).unwrap_or_else(|| "./myprog".into());
    format!(
        "start the program under an MPI launcher, e.g. `mpirun -n 3 {program} ...` (rank 0 \
         drives, ranks 1.. run tasks; Open MPI as root also needs --allow-run-as-root, more \
         ranks than cores --oversubscribe) or `srun -n 3 --mpi=pmix {program} ...` under Slurm"
    )
}

/// `program` as a word of a shell command line: as it is when it holds only characters no
/// shell treats specially, else in single quotes; `None` when it is empty, longer than 200
/// bytes, or holds a control character or a backtick (it would not read as one command). A
/// bare name (no `/`) stays bare: the shell found it on `PATH`, and so do the launchers.
fn shell_word(program: &str) -> Option<String> {
    if program.is_empty()
        || program.len() > 200
        || program.chars().any(|c| c.is_control() || c == '`')
    {
        return None;
    }
    let plain = program
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_./-+=:,@%".contains(c));
    Some(if plain {
        program.to_string()
    } else {
        format!("'{}'", program.replace('\'', "'\\''"))
    })
}

/// Whether this process was started by an MPI launcher (Open MPI's `mpirun`, MPICH's Hydra,
/// or Slurm's `srun` with PMI/PMIx), judged by the environment variables they set. Only then
/// does [`init`] start MPI.
pub fn launched_by_mpi() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMIX_RANK",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|var| std::env::var_os(var).is_some())
}

/// How many worker ranks `n_jobs` asks for in a world of `worker_ranks` (every rank but 0), by
/// joblib's rules with worker ranks in place of CPUs: `n > 0` is `n` (a pool uses at most
/// every rank), `-1` every worker rank, `-k` all but `k - 1`, at least 1. `0`, which
/// `Parallel` refuses before this, counts as every rank.
///
/// ```
/// assert_eq!(parjob_mpi::ranks_for(-1, 8), 8);
/// assert_eq!(parjob_mpi::ranks_for(-3, 8), 6);
/// assert_eq!(parjob_mpi::ranks_for(-20, 8), 1);
/// assert_eq!(parjob_mpi::ranks_for(3, 8), 3);
/// ```
pub fn ranks_for(n_jobs: i32, worker_ranks: usize) -> usize {
    match n_jobs {
        0 => worker_ranks.max(1),
        n if n > 0 => n.unsigned_abs() as usize,
        n => (worker_ranks + 1)
            .saturating_sub(n.unsigned_abs() as usize)
            .max(1),
    }
}

#[cfg(all(feature = "mpi", target_os = "linux"))]
mod wire;
#[cfg(all(feature = "mpi", target_os = "linux"))]
mod world;

#[cfg(all(feature = "mpi", target_os = "linux"))]
pub use world::{MpiPool, init, world_size};

/// For the MPI suite only: rank 0 sends its next `RUN` cut short, so that its trailer cannot be
/// read, as only a faulty rank 0 would. The rank must answer it, and the run fail with an
/// error naming the rank, instead of waiting for ever.
#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub fn break_next_run_for_tests() {
    world::BREAK_NEXT_RUN.store(true, std::sync::atomic::Ordering::SeqCst);
}

/// For the MPI suite only: rank 0 takes the `DONE` of the next `RUN` it sends only `hold`
/// after it arrived, as if a big one were still arriving over a slow network. Meanwhile it
/// must go on beating for the other ranks and taking their messages.
#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub fn hold_next_done_for_tests(hold: std::time::Duration) {
    let ms = u64::try_from(hold.as_millis()).unwrap_or(u64::MAX).max(1);
    world::HOLD_NEXT_DONE_MS.store(ms, std::sync::atomic::Ordering::SeqCst);
}

/// For the MPI suite only: rank 0's driver thread panics at its next turn, as a bug of
/// parjob's would make it. Pools made after that must be refused with an error saying so,
/// instead of waiting for ever for a driver that is gone.
#[cfg(all(feature = "mpi", target_os = "linux"))]
#[doc(hidden)]
pub fn panic_driver_for_tests() {
    world::PANIC_DRIVER.store(true, std::sync::atomic::Ordering::SeqCst);
}

#[cfg(not(all(feature = "mpi", target_os = "linux")))]
mod unavailable {
    use parjob_core::{Backend, Error};

    /// The MPI backend's pool: not in this build.
    #[derive(Debug)]
    pub struct MpiPool(());

    impl MpiPool {
        /// Always [`Error::BackendUnavailable`]: this build has no MPI.
        ///
        /// # Errors
        /// Always.
        pub fn new(_ranks: usize) -> Result<MpiPool, Error> {
            Err(Error::backend_unavailable(
                Backend::Mpi,
                "parjob-mpi was built without its `mpi` feature (build with \
                 `--features parjob/mpi`), or not for Linux",
            ))
        }
    }

    impl MpiPool {
        /// Always [`Error::BackendUnavailable`]: this build has no MPI.
        ///
        /// # Errors
        /// Always.
        pub fn with_options(
            ranks: usize,
            _options: &parjob_core::ProcessOptions,
        ) -> Result<MpiPool, Error> {
            MpiPool::new(ranks)
        }
    }

    /// Does nothing: this build has no MPI.
    pub fn init() {}

    /// `None`: this build has no MPI.
    pub fn world_size() -> Option<usize> {
        None
    }
}

#[cfg(not(all(feature = "mpi", target_os = "linux")))]
pub use unavailable::{MpiPool, init, world_size};

#[cfg(test)]
mod tests {
    use super::{ranks_for, shell_word};

    #[test]
    fn the_launch_hint_names_the_program_as_one_shell_word_or_not_at_all() {
        for (program, word) in [
            (
                "target/release/examples/cluster",
                "target/release/examples/cluster",
            ),
            ("cluster", "cluster"),
            (
                "/tmp/dir with space/my prog",
                "'/tmp/dir with space/my prog'",
            ),
            ("it's", "'it'\\''s'"),
        ] {
            assert_eq!(shell_word(program).as_deref(), Some(word), "{program:?}");
        }
        for unusable in ["", "x`rm -rf ~`", "x\nparjob: all good", "a\u{1b}[2J"] {
            assert_eq!(shell_word(unusable), None, "{unusable:?}");
        }
        assert_eq!(shell_word(&"a".repeat(201)), None);
    }

    #[test]
    fn n_jobs_counts_worker_ranks_like_cpus() {
        assert_eq!(ranks_for(-1, 4), 4);
        assert_eq!(ranks_for(-2, 4), 3);
        assert_eq!(ranks_for(-4, 4), 1);
        assert_eq!(ranks_for(-5, 4), 1);
        assert_eq!(ranks_for(i32::MIN, 4), 1);
        assert_eq!(ranks_for(2, 4), 2);
        assert_eq!(ranks_for(9, 4), 9);
        assert_eq!(ranks_for(0, 4), 4);
        assert_eq!(ranks_for(-1, 0), 1);
    }
}
