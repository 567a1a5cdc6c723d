//! The one error type of `parjob::Memory`.

use std::path::PathBuf;

/// Everything that can go wrong when results are cached.
///
/// A task's own failure keeps its `parjob::Error` ([`Error::Task`]); the rest name the cache
/// file, the function and, where there is one, the task's position in the input.
///
/// `Debug` prints the same text as `Display`, so that `fn main() -> Result<(), Box<dyn
/// std::error::Error>>` reports a failure readably.
#[derive(thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A task failed while it ran (it panicked, timed out, its worker crashed, ...), exactly
    /// as a run without a memory reports it.
    #[error(transparent)]
    Task(#[from] parjob_core::Error),

    /// The cache file could not be opened or set up.
    #[error("cannot open the cache file {path}: {source} ({})", open_hint(source))]
    #[non_exhaustive]
    Open {
        /// The file.
        path: PathBuf,
        /// What SQLite said.
        source: rusqlite::Error,
    },

    /// The file is not one a `Memory` may use: it (or its WAL index `FILE-shm`) cannot be
    /// written, it is another program's SQLite database, or a cache of an incompatible
    /// version of parjob.
    #[error("cannot use {path} as a cache file: {reason}")]
    #[non_exhaustive]
    Refused {
        /// The file.
        path: PathBuf,
        /// Why, and what to do.
        reason: String,
    },

    /// Reading from or writing to the cache file failed.
    #[error("cache file {path}: cannot {action}: {source}")]
    #[non_exhaustive]
    Store {
        /// The file.
        path: PathBuf,
        /// What was being done, e.g. `store 4096 results`.
        action: String,
        /// What SQLite said.
        source: rusqlite::Error,
    },

    /// The function cannot be cached: a call is keyed by its function's type name, which only
    /// a plain `fn` item has on its own.
    #[error(
        "{function} cannot be cached: Memory keys a call by its function's name, and a closure \
         or a function pointer shares its name with others; pass a plain `fn` item (`square`, \
         `Self::method`, `parse::<u32>`)"
    )]
    #[non_exhaustive]
    NotAFunctionItem {
        /// The function's type name.
        function: &'static str,
    },

    /// A task's arguments could not be encoded, so no key could be made for it.
    #[error(
        "task {index} ({function}): cannot encode its arguments to make its cache key: {message}"
    )]
    #[non_exhaustive]
    Key {
        /// Position of the task in the input (0 for [`Memory::call`](crate::Memory::call)).
        index: usize,
        /// The function's type name.
        function: &'static str,
        /// What the codec said.
        message: String,
    },

    /// A stored result does not decode as the function's result type: the type changed
    /// without a version bump (or cannot be decoded at all, as the codec's message says).
    #[error(
        "task {index}: the stored result of {function} (version {version:?}) does not decode as \
         {type_name}: {message}. If its result type changed without a version bump, set a new \
         version (`memory.version(..)`, or `memory.function_version({function}, ..)`), forget \
         its results (`memory.clear_function({function})`), or let Memory recompute such \
         results (`.on_decode_error(OnDecodeError::Recompute)`)"
    )]
    #[non_exhaustive]
    Decode {
        /// Position of the task in the input (0 for [`Memory::call`](crate::Memory::call)).
        index: usize,
        /// The function's type name.
        function: &'static str,
        /// The version the key was made with.
        version: String,
        /// The result type.
        type_name: &'static str,
        /// What the codec said.
        message: String,
    },

    /// The task failed in an earlier run, and failures are cached
    /// ([`Memory::cache_errors`](crate::Memory::cache_errors)): the failure is returned
    /// again without running the task.
    #[error(
        "task {index} ({function}) failed in an earlier run and its failure was cached \
         (cache_errors): {message}; memory.clear_function({function}) forgets it"
    )]
    #[non_exhaustive]
    CachedFailure {
        /// Position of the task in the input (0 for [`Memory::call`](crate::Memory::call)).
        index: usize,
        /// The function's type name.
        function: &'static str,
        /// The failure as it was reported when the task ran.
        message: String,
    },
}

impl std::fmt::Debug for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Error {
    /// The position in the input of the task this error is about, if it is about one.
    pub fn task_index(&self) -> Option<usize> {
        match self {
            Error::Task(e) => e.task_index(),
            Error::Key { index, .. }
            | Error::Decode { index, .. }
            | Error::CachedFailure { index, .. } => Some(*index),
            _ => None,
        }
    }

    pub(crate) fn store(
        path: &std::path::Path,
        action: impl Into<String>,
        source: rusqlite::Error,
    ) -> Error {
        Error::Store {
            path: path.to_path_buf(),
            action: action.into(),
            source,
        }
    }
}

/// What to check when opening failed with `source`.
fn open_hint(source: &rusqlite::Error) -> &'static str {
    match source.sqlite_error_code() {
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked) => {
            "another process held the file's lock for longer than the 60 s an open waits: \
             try again once it is done"
        }
        _ => "is the folder writable, and the file an SQLite database made by parjob::Memory?",
    }
}
