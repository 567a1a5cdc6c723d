//! The process backend as `Parallel` sees it: its builder settings, `init()`, and
//! `enable_test_support!`.

use std::path::PathBuf;

use parjob_core::{Initializer, ProcessOptions, WorkerInit};

use crate::Parallel;

/// Starts a process pool with `options`.
#[cfg(all(feature = "process", target_os = "linux"))]
pub(crate) fn start_process_pool(
    workers: usize,
    options: &ProcessOptions,
) -> Result<std::sync::Arc<dyn parjob_core::Pool>, crate::Error> {
    Ok(std::sync::Arc::new(parjob_process::ProcessPool::new(
        workers,
        options.clone(),
    )?))
}

/// Starts a process pool with `options`: not in this build.
#[cfg(not(all(feature = "process", target_os = "linux")))]
pub(crate) fn start_process_pool(
    _workers: usize,
    _options: &ProcessOptions,
) -> Result<std::sync::Arc<dyn parjob_core::Pool>, crate::Error> {
    Err(crate::Error::backend_unavailable(
        crate::Backend::Process,
        "parjob was built without its `process` feature, or not for Linux",
    ))
}

/// Worker settings: the initializers, on every backend; the rest are the process backend's,
/// which the other backends ignore.
impl Parallel {
    /// Run workers from this executable instead of re-running the current one. It must be the
    /// same build of the same program (a copy, or the same file under another path) and call
    /// [`init`](crate::init) first thing in `main` (a wrapper script must `exec` it); another
    /// build is refused when the pool starts, with an error naming both executables.
    pub fn worker_exe(mut self, path: impl Into<PathBuf>) -> Parallel {
        self.process.worker_exe = Some(path.into());
        self
    }

    /// Runs `f` once on every worker before its first task, on every backend: once in each
    /// worker process (a replacement after a crash or recycling too), once on each thread of
    /// the threading backend (threads are started as work arrives, and a thread replacing
    /// one abandoned after a timeout runs it too; Python's `ThreadPoolExecutor(initializer=)`),
    /// once on the sequential backend, before its first task, and on the MPI backend once in
    /// each local worker process of each rank (docs/CLUSTER.md). `f` typically sets up
    /// per-worker state with [`set_worker_state`](crate::set_worker_state), which that
    /// worker's tasks reach with [`with_worker_state`](crate::with_worker_state).
    ///
    /// A panicking initializer fails the tasks of that worker with
    /// [`Error::Worker`](crate::Error::Worker) carrying the panic message (on processes, the
    /// run fails with it).
    pub fn initializer(mut self, f: fn()) -> Parallel {
        self.process.initializer = Some(Initializer(f));
        self.init_with = None;
        self
    }

    /// [`initializer`](Parallel::initializer) with arguments: runs `f(args.clone())` once on
    /// every worker (Python's `initargs`), on every backend. It replaces an earlier
    /// `initializer`, and the other way round.
    ///
    /// The arguments follow the rules of a task's: a serde type, encoded once when a process
    /// pool starts and decoded in each worker process (a replacement too), and `f` a plain
    /// function of the program (a non-capturing closure coerces to `fn(A)` too). Arguments that
    /// cannot be encoded fail the run with [`Error::InvalidConfig`](crate::Error::InvalidConfig)
    /// when a process pool starts.
    ///
    /// ```
    /// struct Greeting(String);
    ///
    /// fn set_greeting(word: String) {
    ///     parjob::set_worker_state(Greeting(word));
    /// }
    ///
    /// fn greet(name: String) -> String {
    ///     parjob::with_worker_state(|g: &mut Greeting| format!("{} {name}", g.0)).expect("set up")
    /// }
    ///
    /// let out = parjob::Parallel::new(2)
    ///     .initializer_with(set_greeting, "hello".to_string())
    ///     .run(["ann", "bob"].map(|n| parjob::delayed(greet, n.to_string())))?;
    /// assert_eq!(out, ["hello ann", "hello bob"]);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn initializer_with<A>(mut self, f: fn(A), args: A) -> Parallel
    where
        A: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        self.init_with = Some(WorkerInit::with_args(f, args));
        self.process.initializer = None;
        self
    }

    /// Replaces a worker process after it has run `n` tasks (at least 1): a cure for native
    /// code that leaks. Unlimited by default.
    pub fn max_tasks_per_worker(mut self, n: usize) -> Parallel {
        self.process.max_tasks_per_worker = Some(n.max(1));
        self
    }

    /// Batches whose encoded arguments (or results) exceed `bytes` travel through shared
    /// memory instead of the socket (joblib's `max_nbytes`; 1 MiB by default).
    pub fn max_nbytes(mut self, bytes: usize) -> Parallel {
        self.process.max_nbytes = bytes;
        self
    }

    /// Prefixes every line a worker prints (stdout and stderr) with `[worker i] ` (on MPI,
    /// `[rank R worker i] `, `i` the worker's index on rank `R`). Worker output is forwarded a
    /// whole line at a time either way.
    pub fn prefix_worker_output(mut self, enabled: bool) -> Parallel {
        self.process.prefix_output = enabled;
        self
    }
}

/// Call first thing in `main`. In the program that drives a run it does nothing; in a worker
/// process started by the process backend it runs the worker loop and never returns.
///
/// Anything `main` does before `init()` also runs in every worker, so call it before parsing
/// arguments or printing.
///
/// With the process backend compiled in, it also makes big [`SharedSlice`](crate::SharedSlice)s
/// live in shared memory, and raises the soft limit on open files to the hard limit (as Go's
/// runtime does): each shared segment holds a file descriptor.
///
/// With the `mpi` feature, under an MPI launcher (`mpirun`, `srun`), it then starts MPI: rank 0
/// returns and runs `main`; every other rank serves rank 0's tasks in a local process pool and
/// ends when the program on rank 0 exits, never returning from `init`.
pub fn init() {
    #[cfg(all(feature = "process", target_os = "linux"))]
    parjob_process::init();
    #[cfg(all(feature = "mpi", target_os = "linux"))]
    parjob_mpi::init();
}

#[doc(hidden)]
pub fn enable_test_support_now() {
    #[cfg(all(feature = "process", target_os = "linux"))]
    parjob_process::enable_test_support();
}

/// Lets the process backend run inside this test binary: put it once in an integration test
/// crate (or a unit-test module) that uses `Backend::Process`.
///
/// Under `cargo test`, `main` is the test harness, so a worker cannot be entered through
/// `parjob::init()` in `main`. This macro defines a test named `__parjob_test_worker` that
/// calls `init()`, and marks the binary (from a static constructor, before `main`) so that the
/// pool re-runs it as `<test binary> __parjob_test_worker --nocapture --test-threads=1 -q`. In
/// the ordinary test run that test does nothing and passes.
///
/// That test shows in test lists (`cargo test -- --list`) and in the run's output: Rust's
/// test harness has no way to hide a test, and `#[ignore]` would keep it from running in the
/// worker too, which runs it by name without `--ignored`.
///
/// ```ignore
/// parjob::enable_test_support!();
///
/// #[test]
/// fn squares_in_processes() {
///     fn square(x: u64) -> u64 { x * x }
///     let out = parjob::Parallel::new(2)
///         .backend(parjob::Backend::Process)
///         .run((0..10u64).map(|i| parjob::delayed(square, i)))
///         .unwrap();
///     assert_eq!(out[3], 9);
/// }
/// ```
#[macro_export]
macro_rules! enable_test_support {
    () => {
        #[test]
        fn __parjob_test_worker() {
            $crate::init();
        }

        // An ELF static constructor: the process backend exists on Linux only.
        #[cfg(target_os = "linux")]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __PARJOB_ENABLE_TEST_SUPPORT: extern "C" fn() = {
            extern "C" fn enable() {
                $crate::__enable_test_support();
            }
            enable
        };
    };
}
