//! `parallel.memory(&memory)`: runs whose results are cached in a [`Memory`], so that a
//! re-run returns stored results at once and a killed run resumes where it stopped.

use parjob_core::Task;
pub use parjob_memory::{CachedRun, Error as MemoryError, Memory, OnDecodeError, Stats};

use crate::Parallel;

/// A [`Parallel`] with a [`Memory`]: made by [`Parallel::memory`]. Its runs return stored
/// results without running their tasks, run the rest on the `Parallel`'s backend, and store
/// each result as it completes.
#[derive(Debug, Clone, Copy)]
pub struct WithMemory<'p> {
    parallel: &'p Parallel,
    memory: &'p Memory,
}

impl Parallel {
    /// This `Parallel`'s runs, with results cached in `memory` (joblib's `Memory`): a task
    /// whose function, version and arguments were stored before is not run again.
    ///
    /// Results come in the same order, with the same laziness, as without a memory; the
    /// failure of a task is not stored (unless [`Memory::cache_errors`]). Every backend
    /// works, a custom pool too. See docs/MEMORY.md.
    ///
    /// ```
    /// use parjob::{delayed, Memory, Parallel};
    ///
    /// fn cube(x: u64) -> u64 { x * x * x }
    ///
    /// # fn main() -> Result<(), parjob::MemoryError> {
    /// # let dir = tempfile::tempdir().expect("a temporary folder");
    /// let memory = Memory::open(dir.path().join("cache.sqlite"))?;
    /// let parallel = Parallel::new(2);
    /// let out = parallel.memory(&memory).run((0..10u64).map(|i| delayed(cube, i)))?;
    /// assert_eq!(out[3], 27);
    /// // Ten stored, ten more run: results still come in input order.
    /// let out = parallel.memory(&memory).run((0..20u64).map(|i| delayed(cube, i)))?;
    /// assert_eq!(out[15], 3375);
    /// assert_eq!(memory.stats()?.hits, 10);
    /// # Ok(())
    /// # }
    /// ```
    pub fn memory<'p>(&'p self, memory: &'p Memory) -> WithMemory<'p> {
        WithMemory {
            parallel: self,
            memory,
        }
    }
}

impl<'p> WithMemory<'p> {
    fn start<'a, I, T>(&self, tasks: I, ordered: bool) -> CachedRun<'a, I::IntoIter, T>
    where
        'p: 'a,
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Task,
    {
        let parallel = self.parallel;
        let run = CachedRun::new(
            self.memory,
            tasks,
            ordered,
            Box::new(move |misses| Box::new(parallel.run_unordered(misses))),
        );
        // A wrong setting (n_jobs 0, an unknown backend) is an error before anything is
        // looked up, as without a memory, even when every result is stored.
        match parallel.check_config() {
            Ok(()) => run,
            Err(error) => run.failing(error.into()),
        }
    }

    /// Every result in input order, or the first failure, as [`Parallel::run`]; the results
    /// are written to the file before this returns.
    ///
    /// # Errors
    /// A task's failure ([`MemoryError::Task`], naming its position in `tasks`), a stored
    /// result that no longer decodes, a function that is not a `fn` item, or a failure to
    /// read the file. Results that completed before a failure are stored. A failure to
    /// *write* the file (a full disk, a lock held by another process for over 60 s) is not the
    /// run's: every result is returned, a warning on stderr says what could not be stored,
    /// [`Stats::not_stored`](crate::memory::Stats::not_stored) counts them, and they run again
    /// next time.
    pub fn run<I, T>(&self, tasks: I) -> Result<Vec<T::Output>, MemoryError>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        parjob_memory::collect(self.start(tasks, true))
    }

    /// Every result in input order, failures included, as [`Parallel::run_results`]: a
    /// failed task is its `Err` in the vector and the run goes on; the results are written to
    /// the file before this returns.
    ///
    /// ```
    /// use parjob::{delayed, Memory, Parallel};
    ///
    /// fn check(x: u32) -> u32 { assert!(x != 3, "no threes"); x }
    /// # let dir = tempfile::tempdir()?;
    /// let memory = Memory::open(dir.path().join("cache.sqlite"))?;
    /// let results = Parallel::new(2).memory(&memory).run_results((0..5u32).map(|i| delayed(check, i)))?;
    /// assert_eq!(results.len(), 5);
    /// assert_eq!(results[4].as_ref().ok(), Some(&4));
    /// assert!(results[3].is_err());
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// What is about no task: a run that cannot start (an invalid configuration), or a failure
    /// to read the file; task failures are in the vector (a failure to write it is a warning,
    /// as for [`run`](Self::run)).
    pub fn run_results<I, T>(
        &self,
        tasks: I,
    ) -> Result<Vec<Result<T::Output, MemoryError>>, MemoryError>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        parjob_memory::collect_results(self.start(tasks, true))
    }

    /// Each result in input order as soon as it and those before it are ready, as
    /// [`Parallel::run_iter`]: stored results at once. A failed task yields its `Err` and the
    /// run goes on; dropping the iterator stops the run.
    pub fn run_iter<'a, I, T>(
        &self,
        tasks: I,
    ) -> impl Iterator<Item = Result<T::Output, MemoryError>> + use<'a, 'p, I, T>
    where
        'p: 'a,
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Task,
    {
        self.start(tasks, true).map(|(_, result)| result)
    }

    /// `(input index, result)` pairs as results are ready, as [`Parallel::run_unordered`]:
    /// stored results first, as they are found.
    pub fn run_unordered<'a, I, T>(&self, tasks: I) -> CachedRun<'a, I::IntoIter, T>
    where
        'p: 'a,
        I: IntoIterator<Item = T>,
        I::IntoIter: 'a,
        T: Task,
    {
        self.start(tasks, false)
    }
}
