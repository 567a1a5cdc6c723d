//! The process backend's settings, as plain data: `Parallel`'s builder fills them whether or not
//! the process backend is compiled in, and the backend reads them when it starts a pool.

use std::path::PathBuf;

/// Frames above this many encoded bytes travel through shared memory (joblib's `max_nbytes`).
pub const DEFAULT_MAX_NBYTES: usize = 1 << 20;

/// How a process pool starts and keeps its workers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessOptions {
    /// The executable to run as a worker; `None` for this program (`current_exe()`). It must
    /// be the same build: another one is refused at the handshake.
    pub worker_exe: Option<PathBuf>,
    /// Runs once in every new worker process before its first task.
    pub initializer: Option<Initializer>,
    /// Runs once in every new worker process before its first task, with arguments
    /// (`Parallel::initializer_with`); replaces `initializer` when set.
    pub initializer_with: Option<InitializerWith>,
    /// Replace a worker after it has run this many tasks.
    pub max_tasks_per_worker: Option<usize>,
    /// Frames of more encoded bytes than this travel through shared memory.
    pub max_nbytes: usize,
    /// Prefix each line a worker prints with `[worker i] ` (or `[{label} worker i] `, with
    /// `output_label`).
    pub prefix_output: bool,
    /// Where the pool runs, for those prefixes: the MPI backend sets `rank R` on each rank's
    /// local pool, so that a line reads `[rank R worker i] `. `None` in a pool of this process.
    pub output_label: Option<String>,
}

impl Default for ProcessOptions {
    fn default() -> Self {
        ProcessOptions {
            worker_exe: None,
            initializer: None,
            initializer_with: None,
            max_tasks_per_worker: None,
            max_nbytes: DEFAULT_MAX_NBYTES,
            prefix_output: false,
            output_label: None,
        }
    }
}

/// A function every new worker runs once: a plain `fn()` (or non-capturing closure) of this
/// program, found in the worker by its offset in the same build.
#[derive(Debug, Clone, Copy)]
pub struct Initializer(pub fn());

impl Initializer {
    /// The function's address in this process.
    pub fn address(self) -> usize {
        self.0 as usize
    }
}

/// Compared by address, the only identity a `fn` has.
impl PartialEq for Initializer {
    fn eq(&self, other: &Self) -> bool {
        self.address() == other.address()
    }
}

impl Eq for Initializer {}

/// What a worker process calls to run an initializer with arguments: decodes `args` as the
/// function's argument type and calls the function at `function` with them, catching a panic.
/// The outer error says why the arguments did not decode (nothing was called), the inner one
/// is the panic's message and location.
///
/// # Safety
/// `function` must be the address of a function of the argument type this entry was made
/// for, in this process (the driver measured both from the same build).
pub type InitializerEntry =
    unsafe fn(function: usize, args: &[u8]) -> Result<Result<(), String>, String>;

/// An initializer with arguments as a worker process runs it: made by
/// `Parallel::initializer_with`, with the arguments encoded once by the driver.
#[derive(Clone)]
pub struct InitializerWith {
    /// The entry that decodes the arguments and calls the function.
    pub entry: InitializerEntry,
    /// The address of the user's function (a `fn(A)`) in this process.
    pub function: usize,
    /// The arguments, encoded with parjob's codec.
    pub args: std::sync::Arc<[u8]>,
    /// The function's type, for messages.
    pub type_name: &'static str,
}

impl std::fmt::Debug for InitializerWith {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InitializerWith")
            .field("type", &self.type_name)
            .field("args", &self.args.len())
            .finish()
    }
}

/// The same function, entry and encoded arguments.
impl PartialEq for InitializerWith {
    fn eq(&self, other: &Self) -> bool {
        self.function == other.function
            && self.entry as usize == other.entry as usize
            && self.args == other.args
    }
}

impl Eq for InitializerWith {}

impl InitializerWith {
    /// `f` with `args`, encoded now.
    ///
    /// # Errors
    /// The encoder's message, when `args` cannot be encoded.
    pub fn new<A: serde::Serialize + serde::de::DeserializeOwned + 'static>(
        f: fn(A),
        args: &A,
    ) -> Result<InitializerWith, String> {
        let mut encoded = Vec::new();
        crate::codec::encode_into(args, &mut encoded)?;
        Ok(InitializerWith {
            entry: initializer_entry::<A>,
            function: f as usize,
            args: encoded.into(),
            type_name: std::any::type_name::<fn(A)>(),
        })
    }
}

/// The [`InitializerEntry`] for arguments of type `A`.
///
/// # Safety
/// As for [`InitializerEntry`]: `function` is the address of a `fn(A)` of this process.
unsafe fn initializer_entry<A: serde::de::DeserializeOwned>(
    function: usize,
    args: &[u8],
) -> Result<Result<(), String>, String> {
    let (value, used) = crate::codec::decode_prefix::<A>(args).map_err(|e| {
        format!(
            "cannot decode its arguments ({}): {e}",
            std::any::type_name::<A>()
        )
    })?;
    if used != args.len() {
        return Err(format!(
            "its arguments ({}) came with {} bytes too many",
            std::any::type_name::<A>(),
            args.len() - used
        ));
    }
    // SAFETY: by the caller's contract `function` is the address of a `fn(A)` in this
    // process; a function pointer is the size of a `usize` and never null.
    let f: fn(A) = unsafe { std::mem::transmute_copy::<usize, fn(A)>(&function) };
    Ok(crate::worker::catch_task(move || f(value)))
}
