//! What a task can learn about where it runs, and how task panics are caught quietly.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

use crate::Backend;

/// Where the calling code runs, as [`worker_info()`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// The backend whose worker this is, or `None` outside any parjob worker.
    pub backend: Option<Backend>,
    /// The worker's index in its pool (`0..n_jobs`), or `None` outside any parjob worker.
    pub worker: Option<usize>,
    /// This process's id.
    pub pid: u32,
    /// This thread's name, e.g. `parjob-worker-1`, or `None` for an unnamed thread.
    pub thread_name: Option<String>,
    /// The MPI rank this process belongs to, when it was started by an MPI launcher or is a
    /// local worker of such a rank (the MPI backend's workers: `worker` is then the local
    /// worker's index in its rank's pool), read from the launcher's environment
    /// (`OMPI_COMM_WORLD_RANK`, `PMIX_RANK`, `PMI_RANK`).
    pub rank: Option<usize>,
    /// This machine's host name, for telling the nodes of a cluster apart.
    pub host: String,
}

thread_local! {
    static IDENTITY: Cell<Option<(Backend, usize)>> = const { Cell::new(None) };
    static IN_TASK: Cell<bool> = const { Cell::new(false) };
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Tells a task where it runs: backend, worker index, process id and thread name.
///
/// ```
/// let info = parjob::worker_info();
/// assert_eq!(info.pid, std::process::id());
/// assert_eq!(info.worker, None); // not inside a parjob worker
/// ```
pub fn worker_info() -> WorkerInfo {
    let identity = IDENTITY.with(Cell::get);
    WorkerInfo {
        backend: identity.map(|(b, _)| b),
        worker: identity.map(|(_, i)| i),
        pid: std::process::id(),
        thread_name: std::thread::current().name().map(str::to_owned),
        rank: place().0,
        host: place().1.clone(),
    }
}

/// This process's MPI rank and host name, read once.
fn place() -> &'static (Option<usize>, String) {
    static PLACE: std::sync::OnceLock<(Option<usize>, String)> = std::sync::OnceLock::new();
    PLACE.get_or_init(|| {
        let rank = ["OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"]
            .iter()
            .find_map(|var| std::env::var(var).ok()?.trim().parse().ok());
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|name| name.trim().to_string())
            .unwrap_or_default();
        (rank, host)
    })
}

/// Marks the current thread as worker `index` of a `backend` pool, for [`worker_info()`].
///
/// For backend implementations: call it once on each worker thread (or process) before it
/// runs tasks. Returns what was set before, to restore it with [`set_worker_identity`] later.
pub fn set_worker_identity(identity: Option<(Backend, usize)>) -> Option<(Backend, usize)> {
    IDENTITY.with(|cell| cell.replace(identity))
}

/// The index of the worker this thread is, if it is one (for events).
pub(crate) fn current_worker() -> Option<usize> {
    IDENTITY.with(Cell::get).map(|(_, index)| index)
}

/// Where a task on this thread runs, as [`Error::TaskPanicked`](crate::Error::TaskPanicked)
/// names it: the worker's index, and its process id when the worker is a process of its own.
/// Nothing on the sequential backend (the calling thread) or outside any worker.
pub(crate) fn panic_place() -> (Option<usize>, Option<u32>) {
    match IDENTITY.with(Cell::get) {
        Some((Backend::Process, index)) => (Some(index), Some(std::process::id())),
        Some((Backend::Sequential, _)) | None => (None, None),
        Some((_, index)) => (Some(index), None),
    }
}

/// Installs, once per process, a panic hook that stays quiet for panics inside tasks: it
/// records their message and location for the `TaskPanicked` error instead of printing them
/// (and a backtrace, which costs about 70 ms with `RUST_BACKTRACE=1`). Panics elsewhere, and
/// every panic when `PARJOB_TASK_BACKTRACE` is set, go to the hook that was there before.
pub(crate) fn install_quiet_panic_hook() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        let previous = panic::take_hook();
        let verbose = std::env::var_os("PARJOB_TASK_BACKTRACE").is_some();
        panic::set_hook(Box::new(move |info| {
            if IN_TASK.with(Cell::get) {
                let message = panic_message(info.payload());
                let text = match info.location() {
                    Some(at) => {
                        format!("{message} (at {}:{}:{})", at.file(), at.line(), at.column())
                    }
                    None => message,
                };
                LAST_PANIC.with(|last| *last.borrow_mut() = Some(text));
                if !verbose {
                    return;
                }
            }
            previous(info);
        }));
    });
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// Runs `body` as task code: a panic inside it comes back as `Err(message and location)` and
/// is not printed (nor its backtrace captured) unless `PARJOB_TASK_BACKTRACE` is set.
///
/// For backend implementations, e.g. to run a worker's initializer.
pub fn catch_task<R>(body: impl FnOnce() -> R) -> Result<R, String> {
    install_quiet_panic_hook();
    let was_in_task = IN_TASK.with(|t| t.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(body));
    IN_TASK.with(|t| t.set(was_in_task));
    result.map_err(|payload| {
        let message = LAST_PANIC
            .with(|last| last.borrow_mut().take())
            .unwrap_or_else(|| panic_message(&*payload));
        drop_quietly(payload);
        message
    })
}

/// Drops a panic payload (or anything a task owned) without letting a panic in its `Drop`
/// escape: that would unwind out of the worker (rayon then aborts the process). The payload
/// of such a panic is dropped the same way; after a few payloads that each panic again, the
/// last is forgotten rather than dropped, so this always returns.
pub(crate) fn drop_quietly<T>(value: T) {
    let Err(mut payload) = panic::catch_unwind(AssertUnwindSafe(|| drop(value))) else {
        return;
    };
    for _ in 0..8 {
        match panic::catch_unwind(AssertUnwindSafe(|| drop(payload))) {
            Ok(()) => return,
            Err(again) => payload = again,
        }
    }
    std::mem::forget(payload);
}
