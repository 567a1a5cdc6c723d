//! [`Parallel`]: the builder users configure once and run many times.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parjob_core::{
    Backend, BatchSize, Error, LocalTask, LocalWork, Pool, RunIter, RunOptions, RunUnordered,
    SequentialPool, Task, WorkerInit, backend_from_env, check_worker_limit, n_jobs_from_env,
    resolve_workers,
};

use parjob_core::ProcessOptions;

use crate::process::start_process_pool;
use crate::sequential::InitializedSequential;

/// Runs many tasks in parallel, joblib's `Parallel(n_jobs, backend=...)`.
///
/// Configure it with the builder methods, then call [`run`](Parallel::run),
/// [`run_iter`](Parallel::run_iter) or [`run_unordered`](Parallel::run_unordered) as often as
/// you like: the workers start on the first run and are kept until the `Parallel` is dropped.
///
/// ```
/// use parjob::{delayed, Backend, Parallel};
///
/// fn square(x: u64) -> u64 { x * x }
///
/// let parallel = Parallel::new(2).backend(Backend::Threading);
/// let out: Vec<u64> = parallel.run((0..10u64).map(|i| delayed(square, i)))?;
/// assert_eq!(out, [0, 1, 4, 9, 16, 25, 36, 49, 64, 81]);
/// # Ok::<(), parjob::Error>(())
/// ```
#[derive(Debug)]
pub struct Parallel {
    n_jobs: i32,
    n_jobs_from_env: bool,
    /// A value of `PARJOB_N_JOBS` that could not be read, reported by `run`.
    env_error: Option<Error>,
    backend: Option<Backend>,
    pub(crate) options: RunOptions,
    /// Retries, events, insights and traces (`long_runs.rs`).
    pub(crate) long_run: crate::long_runs::LongRun,
    pub(crate) process: ProcessOptions,
    /// `initializer_with`'s function and arguments (threads and sequential only, for now).
    pub(crate) init_with: Option<WorkerInit>,
    /// A pool the user supplied ([`Parallel::with_pool`]): used instead of any backend.
    custom_pool: Option<CustomPool>,
    pool: Mutex<Option<CachedPool>>,
}

/// A user's pool, shown in `Debug` by its name.
#[derive(Clone)]
struct CustomPool(Arc<dyn Pool>);

impl std::fmt::Debug for CustomPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CustomPool")
            .field(&self.0.verbose_name())
            .finish()
    }
}

struct CachedPool {
    backend: Backend,
    workers: usize,
    process: ProcessOptions,
    init_with: Option<WorkerInit>,
    pool: Arc<dyn Pool>,
    /// How `run_local` reaches the same workers, on in-process backends.
    local: Option<Arc<dyn LocalPool>>,
}

/// A pool, and how `run_local` reaches its workers when they are in this process.
type Pools = (Arc<dyn Pool>, Option<Arc<dyn LocalPool>>);

/// An in-process pool that can run `run_local`'s borrowing work on its workers.
pub(crate) trait LocalPool: Send + Sync {
    /// Runs or drops `work`, on a worker (or the calling thread, for sequential).
    fn spawn_local(&self, work: LocalWork);
}

#[cfg(feature = "threading")]
impl LocalPool for parjob_threading::ThreadPool {
    fn spawn_local(&self, work: LocalWork) {
        self.spawn(work);
    }
}

impl LocalPool for SequentialPool {
    fn spawn_local(&self, work: LocalWork) {
        let previous = parjob_core::set_worker_identity(Some((Backend::Sequential, 0)));
        work(Ok(()));
        parjob_core::set_worker_identity(previous);
    }
}

impl std::fmt::Debug for CachedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CachedPool")
            .field("backend", &self.backend)
            .field("workers", &self.workers)
            .finish()
    }
}

impl Default for Parallel {
    /// `n_jobs` from `PARJOB_N_JOBS`, or `-1` (all CPUs) when it is not set.
    fn default() -> Self {
        let (n_jobs, env_error) = match n_jobs_from_env() {
            Ok(n) => (n.unwrap_or(-1), None),
            Err(e) => (-1, Some(e)),
        };
        let mut parallel = Parallel::new(n_jobs);
        parallel.n_jobs_from_env = true;
        parallel.env_error = env_error;
        parallel
    }
}

impl Parallel {
    /// A `Parallel` with `n_jobs` workers, by joblib's rules: `n > 0` workers, `-1` for all
    /// CPUs ([`cpu_count`](crate::cpu_count)), `-k` for all but `k - 1`; a `usize` or `u32`
    /// count works too ([`NJobs`](crate::NJobs)). Never panics: an invalid `n_jobs` (0, or
    /// more workers than the backend starts) is reported by the first run.
    pub fn new(n_jobs: impl Into<crate::NJobs>) -> Parallel {
        let n_jobs = n_jobs.into().get();
        Parallel {
            n_jobs,
            n_jobs_from_env: false,
            env_error: None,
            backend: None,
            options: RunOptions {
                n_jobs,
                ..RunOptions::default()
            },
            long_run: crate::long_runs::LongRun::default(),
            process: ProcessOptions::default(),
            init_with: None,
            custom_pool: None,
            pool: Mutex::new(None),
        }
    }

    /// Runs every task on `pool`, a backend of your own, instead of one of the built-in
    /// [`Backend`]s: `run`, `run_iter`, `run_unordered` and an [`Executor`](crate::Executor)
    /// made from this `Parallel` all use it, with the same ordering, laziness and failure
    /// rules. `n_jobs`, [`backend`](Parallel::backend) and the process settings are then
    /// ignored; the pool says how many workers it has.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use parjob::pool::{Job, Pool};
    /// use parjob::{delayed, Parallel};
    ///
    /// /// Runs each batch on the calling thread and counts them.
    /// #[derive(Default)]
    /// struct Counting(std::sync::atomic::AtomicUsize);
    ///
    /// impl Pool for Counting {
    ///     fn workers(&self) -> usize { 1 }
    ///     fn submit(&self, job: Job) {
    ///         self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    ///         job.run_here();
    ///     }
    ///     fn runs_on_calling_thread(&self) -> bool { true }
    ///     fn verbose_name(&self) -> &'static str { "CountingBackend" }
    /// }
    ///
    /// fn square(x: u64) -> u64 { x * x }
    /// let pool = Arc::new(Counting::default());
    /// let out = Parallel::new(1).with_pool(pool.clone()).run((0..10u64).map(|i| delayed(square, i)))?;
    /// assert_eq!(out[3], 9);
    /// assert!(pool.0.load(std::sync::atomic::Ordering::Relaxed) > 0);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn with_pool(mut self, pool: Arc<dyn Pool>) -> Parallel {
        self.custom_pool = Some(CustomPool(pool));
        self
    }

    /// Where the tasks run. Without this call, `PARJOB_BACKEND` decides, and without that,
    /// [`Backend::Threading`].
    pub fn backend(mut self, backend: Backend) -> Parallel {
        self.backend = Some(backend);
        self
    }

    /// How tasks are grouped into batches: [`BatchSize::Auto`] (the default) adapts to
    /// measured task durations.
    pub fn batch_size(mut self, batch_size: BatchSize) -> Parallel {
        self.options.batch_size = batch_size;
        self
    }

    /// At most `batches` batches dispatched ahead of the results (default: twice the number of
    /// workers). Bounds the memory a run over a huge or endless iterator needs.
    pub fn pre_dispatch(mut self, batches: usize) -> Parallel {
        self.options.pre_dispatch = Some(batches.max(1));
        self
    }

    /// A per-task time limit. A task over it fails with [`Error::Timeout`]. Threads cannot be
    /// stopped, so on the threading and sequential backends the task is reported and left to
    /// finish in the background; the process backend kills its worker.
    ///
    /// A timeout of zero is refused by the first run with [`Error::InvalidConfig`].
    pub fn timeout(mut self, timeout: Duration) -> Parallel {
        self.options.timeout = Some(timeout);
        self
    }

    /// joblib-style progress lines on stderr: 0 (the default) prints nothing, 1 to 10 print
    /// more and more often, above 10 every batch.
    pub fn verbose(mut self, level: u32) -> Parallel {
        self.options.verbose = level;
        self
    }

    /// Draws a progress bar on stderr when it is a terminal. The bar needs the `progress`
    /// feature (on by default); without it this setting is accepted and draws nothing.
    pub fn progress(mut self, enabled: bool) -> Parallel {
        self.options.progress = enabled;
        self
    }

    /// The backend runs use: the explicit one, else `PARJOB_BACKEND`, else threading.
    ///
    /// # Errors
    /// An unknown name in `PARJOB_BACKEND`.
    pub fn effective_backend(&self) -> Result<Backend, Error> {
        match self.backend {
            Some(backend) => Ok(backend),
            None => Ok(backend_from_env()?.unwrap_or(Backend::Threading)),
        }
    }

    /// How many workers runs use: on the MPI backend, worker ranks (at most as many as the
    /// world has, once `parjob::init()` started MPI).
    ///
    /// # Errors
    /// An invalid `n_jobs`.
    pub fn effective_n_jobs(&self) -> Result<usize, Error> {
        if let Some(error) = &self.env_error {
            return Err(error.clone());
        }
        let n_jobs = resolve_workers(self.n_jobs, self.n_jobs_from_env)?;
        if self.effective_backend().ok() == Some(Backend::Mpi)
            && let Some(ranks) = parjob_mpi_ranks_in_world(self.n_jobs)
        {
            return Ok(ranks);
        }
        Ok(n_jobs)
    }

    /// Drops the kept pool (its workers stop once their current jobs are done); the next run
    /// starts a new one. How `Executor::shutdown` releases its workers.
    pub(crate) fn release_pool(&self) {
        self.pool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }

    /// The pool for the current configuration, started on first use and kept. `Executor`
    /// shares it.
    pub(crate) fn pool(&self) -> Result<Arc<dyn Pool>, Error> {
        self.pools().map(|(pool, _)| pool)
    }

    /// The pool a run uses: [`pool`](Parallel::pool), except on one of that pool's own
    /// threads (a task running this same `Parallel` again, e.g. one kept in a `static`),
    /// where a sequential pool runs it on the calling thread: otherwise, once every worker
    /// waited on an inner run, none would be left to run it.
    pub(crate) fn pool_for_run(&self) -> Result<Arc<dyn Pool>, Error> {
        let pool = self.pool()?;
        Ok(if pool.serves_current_thread() {
            Arc::new(SequentialPool)
        } else {
            pool
        })
    }

    /// The pool, and how `run_local` reaches its workers when they are in this process.
    fn pools(&self) -> Result<Pools, Error> {
        // A worker copy of the program that skipped `init()` stops here, on any backend.
        #[cfg(all(feature = "process", target_os = "linux"))]
        parjob_process::leave_if_a_worker_without_init();
        if let Some(CustomPool(pool)) = &self.custom_pool {
            self.check_timeout()?;
            return Ok((Arc::clone(pool), None));
        }
        let (backend, workers) = self.checked_config()?;
        // A poisoned lock only means another run panicked while holding it; the cache is
        // still a valid Option.
        let mut cached = self.pool.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(c) = cached.as_ref().filter(|c| {
            c.backend == backend
                && c.workers == workers
                && c.process == self.process
                && c.init_with == self.init_with
        }) {
            return Ok((Arc::clone(&c.pool), c.local.clone()));
        }
        // Drop the old pool first: its workers must not outlive the cache entry.
        *cached = None;
        let (pool, local) = start_pool(backend, workers, &self.process, self.init_with.as_ref())?;
        *cached = Some(CachedPool {
            backend,
            workers,
            process: self.process.clone(),
            init_with: self.init_with.clone(),
            pool: Arc::clone(&pool),
            local: local.clone(),
        });
        Ok((pool, local))
    }

    /// Checks the configuration a run would start its pool with, without starting it. A run
    /// with a memory checks this first, so that a wrong setting is an error even when every
    /// result is stored.
    #[cfg(feature = "memory")]
    pub(crate) fn check_config(&self) -> Result<(), Error> {
        if self.custom_pool.is_some() {
            self.check_timeout()
        } else {
            self.checked_config().map(|_| ())
        }
    }

    /// The checks of [`check_config`](Parallel::check_config) for a built-in backend: a zero
    /// timeout, the backend (`PARJOB_BACKEND` included), `n_jobs` and the worker limit.
    /// Returns the backend and its number of workers.
    fn checked_config(&self) -> Result<(Backend, usize), Error> {
        self.check_timeout()?;
        let backend = self.effective_backend()?;
        if !built_in(backend) {
            return Err(not_built_in(backend));
        }
        // Checked on every backend, so that an invalid n_jobs fails the same everywhere.
        let n_jobs = self.effective_n_jobs()?;
        let workers = match backend {
            Backend::Sequential => 1,
            // n_jobs counts worker ranks by joblib's rules: n the first n, -1 every one, -k
            // all but k - 1.
            Backend::Mpi => parjob_mpi_ranks(self.n_jobs),
            _ => {
                let note = if self.n_jobs_from_env {
                    " (from PARJOB_N_JOBS)"
                } else {
                    ""
                };
                check_worker_limit(n_jobs, backend, note)?
            }
        };
        Ok((backend, workers))
    }

    /// The configuration check every pool shares, its own included.
    fn check_timeout(&self) -> Result<(), Error> {
        if self.options.timeout == Some(Duration::ZERO) {
            // Every task runs longer than no time at all: say so once, the same on every
            // backend, rather than fail every task (or, polled, let the quick ones pass).
            return Err(Error::InvalidConfig(
                "a timeout of zero lets no task finish in time; set a positive limit, or none"
                    .into(),
            ));
        }
        Ok(())
    }

    /// Runs every task and returns the results in input order.
    ///
    /// Tasks are pulled from `tasks` lazily, as workers free up.
    ///
    /// # Errors
    /// The first task failure ([`Error::TaskPanicked`], [`Error::Timeout`], ...): no new task
    /// is dispatched after it, and running ones finish before it is returned. As in joblib,
    /// the tasks after it in its own batch do not start either (on the process backend: those
    /// not yet sent to a worker, e.g. after a crash); `run_results` and `run_iter` run them. Also an invalid
    /// configuration (`n_jobs` of 0, an unknown `PARJOB_BACKEND`, a backend not built in).
    pub fn run<I, T>(&self, tasks: I) -> Result<Vec<T::Output>, Error>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        let pool = self.pool_for_run()?;
        parjob_core::run(pool, tasks, &self.options)
    }

    /// Yields each task's result in input order, as soon as it and those before it are done
    /// (joblib's `return_as="generator"`). A failed task yields its `Err` and the run goes on.
    /// Dropping the iterator stops the run. An invalid configuration is yielded as the only
    /// item.
    pub fn run_iter<I, T>(&self, tasks: I) -> RunIter<I::IntoIter, T>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        match self.pool_for_run() {
            Ok(pool) => RunIter::new(pool, tasks, &self.options),
            Err(error) => RunIter::failed(error),
        }
    }

    /// Yields `(input index, result)` pairs in the order tasks finish. A failed task yields
    /// its `Err` and the run goes on; an invalid configuration is yielded as the only item,
    /// with index 0.
    pub fn run_unordered<I, T>(&self, tasks: I) -> RunUnordered<I::IntoIter, T>
    where
        I: IntoIterator<Item = T>,
        T: Task,
    {
        match self.pool_for_run() {
            Ok(pool) => RunUnordered::new(pool, tasks, &self.options),
            Err(error) => RunUnordered::failed(error),
        }
    }

    /// Runs tasks that borrow local data, on the threading and sequential backends, and
    /// returns their results in input order: rayon's `par_iter` idiom, and the scoped
    /// counterpart of [`run`](Parallel::run).
    ///
    /// A task is a closure `move || f(x)` or a `delayed(f, x)` whose arguments may be
    /// references (`&[u64]`, `&str`, `&MyStruct`) and whose result is any `Send` type
    /// (`Box<dyn Error + Send>`, `Arc<T>`, a reference into the input): nothing is encoded,
    /// since nothing leaves this process. `run_local` returns only when every task it started
    /// has ended, which is what lets them borrow.
    ///
    /// ```
    /// use parjob::{Parallel, delayed};
    ///
    /// fn total(chunk: &[u64]) -> u64 { chunk.iter().sum() }
    ///
    /// let data: Vec<u64> = (1..=1000).collect();
    /// let parallel = Parallel::new(4);
    /// let sums = parallel.run_local(data.chunks(100).map(|c| delayed(total, c)))?;
    /// assert_eq!(sums.iter().sum::<u64>(), 500_500);
    /// // Closures may capture references too, and return what they like.
    /// let longest = parallel.run_local(data.chunks(250).map(|c| move || c.iter().max()))?;
    /// assert_eq!(longest[3], Some(&1000));
    /// # Ok::<(), parjob::Error>(())
    /// ```
    ///
    /// Batching, `pre_dispatch`, the first-failure rule, initializers and worker state work
    /// as for `run`, on the same workers. A `.timeout` is reported once the task returns
    /// ([`Error::Timeout`]): a task that borrows cannot be left running.
    ///
    /// # Errors
    /// The first task failure, as for [`run`](Parallel::run), or an invalid configuration.
    /// On the process backend, and on a pool of your own ([`with_pool`](Parallel::with_pool)),
    /// [`Error::InvalidConfig`]: another process cannot reach this one's memory; send owned
    /// data with `run`, or share a big array as a [`SharedSlice`](crate::SharedSlice).
    pub fn run_local<'env, I, T>(&self, tasks: I) -> Result<Vec<T::Output>, Error>
    where
        I: IntoIterator<Item = T>,
        T: LocalTask + 'env,
    {
        let (pool, local) = self.pools()?;
        // On one of the pool's own threads: run here (see `pool_for_run`).
        let (pool, local) = if pool.serves_current_thread() {
            in_process(SequentialPool)
        } else {
            (pool, local)
        };
        let Some(local) = local else {
            let place = match self.custom_pool {
                Some(_) => "a pool of your own (`with_pool`)".to_string(),
                None => format!("the {} backend", self.effective_backend()?),
            };
            return Err(Error::InvalidConfig(format!(
                "run_local runs tasks that borrow this process's memory, so only on the \
                 threading and sequential backends, not on {place}: use `run` with owned \
                 arguments, or a `SharedSlice` for a big array"
            )));
        };
        let spawn = |work: LocalWork| local.spawn_local(work);
        // SAFETY: both `LocalPool`s call or drop every work they are given: the sequential
        // ones call it before `spawn_local` returns; the thread pool queues it, and a queued
        // work is run by a thread, failed (called with an error) if no thread can start, or
        // run by the threads that drain the queue after the pool is dropped; `pool` keeps the
        // pool alive here in any case.
        let out = unsafe { parjob_core::run_local(&spawn, pool.workers(), tasks, &self.options) };
        drop(pool);
        out
    }
}

/// Both handles on one in-process pool.
/// The worker ranks `n_jobs` asks for in this MPI world (`parjob_mpi::ranks_for`, with every
/// rank but 0 counted).
#[cfg(all(feature = "mpi", target_os = "linux"))]
fn parjob_mpi_ranks(n_jobs: i32) -> usize {
    let worker_ranks = parjob_mpi::world_size().map_or(0, |size| size.saturating_sub(1));
    parjob_mpi::ranks_for(n_jobs, worker_ranks)
}

/// The worker ranks a pool of `n_jobs` uses in this MPI world, when `init()` started one with
/// worker ranks.
#[cfg(all(feature = "mpi", target_os = "linux"))]
fn parjob_mpi_ranks_in_world(n_jobs: i32) -> Option<usize> {
    let worker_ranks = parjob_mpi::world_size()?.checked_sub(1)?;
    (worker_ranks > 0).then(|| parjob_mpi::ranks_for(n_jobs, worker_ranks).min(worker_ranks))
}

#[cfg(not(all(feature = "mpi", target_os = "linux")))]
fn parjob_mpi_ranks_in_world(_n_jobs: i32) -> Option<usize> {
    None
}

/// Without MPI in this build the pool refuses to start, whatever the count.
#[cfg(not(all(feature = "mpi", target_os = "linux")))]
fn parjob_mpi_ranks(_n_jobs: i32) -> usize {
    1
}

fn in_process<P: Pool + LocalPool + 'static>(pool: P) -> Pools {
    let pool = Arc::new(pool);
    (
        Arc::clone(&pool) as Arc<dyn Pool>,
        Some(pool as Arc<dyn LocalPool>),
    )
}

fn start_pool(
    backend: Backend,
    workers: usize,
    process: &ProcessOptions,
    init_with: Option<&WorkerInit>,
) -> Result<Pools, Error> {
    // In this process an initializer is a closure like any other, with or without arguments.
    let init = init_with
        .cloned()
        .or_else(|| process.initializer.map(|f| WorkerInit::new(f.0)));
    match backend {
        Backend::Sequential => Ok(match init {
            Some(init) => in_process(InitializedSequential::new(init)),
            None => in_process(SequentialPool),
        }),
        #[cfg(feature = "threading")]
        Backend::Threading => Ok(in_process(parjob_threading::ThreadPool::with_initializer(
            workers, init,
        )?)),
        #[cfg(not(feature = "threading"))]
        Backend::Threading => Err(not_built_in(backend)),
        Backend::Process => match init_with.map(WorkerInit::for_processes).transpose()? {
            // With arguments: they travel to each worker, encoded.
            Some(with) => {
                let mut process = process.clone();
                process.initializer_with = with;
                Ok((start_process_pool(workers, &process)?, None))
            }
            None => Ok((start_process_pool(workers, process)?, None)),
        },
        // As on the process backend: each rank's local workers run the initializer.
        #[cfg(all(feature = "mpi", target_os = "linux"))]
        Backend::Mpi => {
            let mut process = process.clone();
            if let Some(with) = init_with.map(WorkerInit::for_processes).transpose()? {
                process.initializer_with = with;
            }
            Ok((
                Arc::new(parjob_mpi::MpiPool::with_options(workers, &process)?),
                None,
            ))
        }
        #[cfg(not(all(feature = "mpi", target_os = "linux")))]
        Backend::Mpi => Err(not_built_in(backend)),
        _ => Err(not_built_in(backend)),
    }
}

/// Whether this build of parjob has `backend`: checked before a pool starts, and by a run
/// with a memory before it looks anything up.
fn built_in(backend: Backend) -> bool {
    match backend {
        Backend::Threading => cfg!(feature = "threading"),
        Backend::Mpi => cfg!(all(feature = "mpi", target_os = "linux")),
        other => matches!(other, Backend::Sequential | Backend::Process),
    }
}

/// The error for a backend this build of parjob does not have (see [`built_in`]).
fn not_built_in(backend: Backend) -> Error {
    let why = match backend {
        Backend::Threading => "parjob was built without its `threading` feature",
        Backend::Mpi => {
            "parjob was built without its `mpi` feature (build with `--features parjob/mpi`, \
             then start the program with `mpirun -n 3 ./prog`); see docs/CLUSTER.md"
        }
        _ => "not built in this version of parjob",
    };
    Error::backend_unavailable(backend, why)
}
