//! Per-worker state (mpire's `worker_state`) and the initializers that make it: an
//! initializer runs once on each worker before its first task, and whatever it hands to
//! [`set_worker_state`] is what that worker's tasks reach with [`with_worker_state`].
//!
//! The state lives with the worker: a thread of the threading backend, the process of a
//! process worker, the one worker of the sequential backend. Tasks never share it, so it
//! needs no lock: a task gets `&mut` access to its worker's state.

use std::any::{Any, type_name};
use std::cell::{Cell, RefCell};
use std::sync::Arc;

use crate::Error;
use crate::worker::catch_task;

/// One worker's state: a value of any `Send` type and its type's name.
pub struct WorkerState {
    value: Box<dyn Any + Send>,
    type_name: &'static str,
}

impl std::fmt::Debug for WorkerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerState")
            .field("type", &self.type_name)
            .finish()
    }
}

thread_local! {
    static STATE: RefCell<Option<WorkerState>> = const { RefCell::new(None) };
    /// Set while a `with_worker_state` call holds the state out of `STATE`.
    static LENT: Cell<bool> = const { Cell::new(false) };
}

/// Sets the state of the worker this runs on, replacing what was there: call it from an
/// initializer ([`Parallel::initializer`](../parjob/struct.Parallel.html#method.initializer)),
/// and reach the value from that worker's tasks with [`with_worker_state`]. Outside a worker
/// it sets the calling thread's own state.
///
/// ```
/// struct Model { weight: f64 }
///
/// fn load_model() {
///     parjob::set_worker_state(Model { weight: 2.0 });
/// }
///
/// fn predict(x: f64) -> f64 {
///     parjob::with_worker_state(|model: &mut Model| model.weight * x)
///         .expect("the initializer set a Model")
/// }
///
/// let out = parjob::Parallel::new(2)
///     .initializer(load_model)
///     .run((0..4).map(|i| parjob::delayed(predict, f64::from(i))))?;
/// assert_eq!(out, [0.0, 2.0, 4.0, 6.0]);
/// # Ok::<(), parjob::Error>(())
/// ```
pub fn set_worker_state<S: Any + Send>(state: S) {
    let state = WorkerState {
        value: Box::new(state),
        type_name: type_name::<S>(),
    };
    // Inside `with_worker_state` the slot is empty and the lent state is put back after the
    // closure; the new state wins then (see `Lent::drop`).
    let old = STATE.with(|slot| slot.borrow_mut().replace(state));
    drop(old);
}

/// Calls `f` with the state of the worker this task runs on, as set by its initializer with
/// [`set_worker_state`]. Each worker has its own, so `f` gets it mutably and without a lock.
///
/// # Errors
/// [`Error::NoWorkerState`] when this worker has no state (no initializer set one), holds a
/// state of another type than `S`, or when called again from inside `f`.
pub fn with_worker_state<S: Any + Send, R>(f: impl FnOnce(&mut S) -> R) -> Result<R, Error> {
    let missing = |why: String| Error::NoWorkerState {
        wanted: type_name::<S>(),
        why,
    };
    if LENT.with(Cell::get) {
        return Err(missing(
            "it is in use by an enclosing with_worker_state call on this thread".into(),
        ));
    }
    let Some(state) = STATE.with(|slot| slot.borrow_mut().take()) else {
        return Err(missing(
            "no initializer set one on this worker (set it with parjob::set_worker_state from \
             a function given to .initializer or .initializer_with)"
                .into(),
        ));
    };
    if !state.value.is::<S>() {
        let why = format!("this worker's state is a {}", state.type_name);
        STATE.with(|slot| *slot.borrow_mut() = Some(state));
        return Err(missing(why));
    }
    LENT.with(|lent| lent.set(true));
    // Put back even if `f` panics (the panic then fails the task, and the worker goes on).
    let mut lent = Lent(Some(state));
    let value = lent
        .0
        .as_mut()
        .and_then(|state| state.value.downcast_mut::<S>())
        .expect("the state was put in just above, and its type checked");
    let result = f(value);
    drop(lent);
    Ok(result)
}

/// Puts a lent state back when `with_worker_state` ends (even by a panic in `f`), unless `f`
/// set a new one.
struct Lent(Option<WorkerState>);

impl Drop for Lent {
    fn drop(&mut self) {
        LENT.with(|lent| lent.set(false));
        let Some(state) = self.0.take() else {
            return;
        };
        STATE.with(|slot| {
            let mut slot = slot.borrow_mut();
            if slot.is_none() {
                *slot = Some(state);
            }
        });
    }
}

/// Replaces the calling thread's worker state with `state` and returns what was there.
///
/// For backend implementations whose one worker runs on whichever thread calls it (the
/// sequential backend): lend the worker's state to the thread around each job, then take it
/// back.
pub fn swap_worker_state(state: Option<WorkerState>) -> Option<WorkerState> {
    STATE.with(|slot| std::mem::replace(&mut *slot.borrow_mut(), state))
}

/// What a worker runs once before its first task: `Parallel::initializer`'s `fn()`, or
/// `Parallel::initializer_with`'s function and its arguments (Python's `initargs`).
#[derive(Clone)]
pub struct WorkerInit {
    call: Arc<dyn Fn() + Send + Sync>,
    name: &'static str,
    /// How a worker process runs it (`with_args` only): the arguments encoded, or why they
    /// could not be.
    remote: Option<Result<crate::InitializerWith, String>>,
}

impl std::fmt::Debug for WorkerInit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("WorkerInit").field(&self.name).finish()
    }
}

/// The same initializer: made by the same call (clones of one `WorkerInit`).
impl PartialEq for WorkerInit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.call, &other.call)
    }
}

impl Eq for WorkerInit {}

impl WorkerInit {
    /// An initializer without arguments.
    pub fn new(f: fn()) -> WorkerInit {
        WorkerInit {
            call: Arc::new(f),
            name: "fn()",
            remote: None,
        }
    }

    /// `f(args.clone())` on each worker; a worker process gets `args` encoded, as a task's
    /// arguments are.
    pub fn with_args<A>(f: fn(A), args: A) -> WorkerInit
    where
        A: serde::Serialize + serde::de::DeserializeOwned + Clone + Send + Sync + 'static,
    {
        let remote = crate::InitializerWith::new(f, &args);
        WorkerInit {
            call: Arc::new(move || f(args.clone())),
            name: type_name::<fn(A)>(),
            remote: Some(remote),
        }
    }

    /// How a worker process runs this initializer, if it has arguments: `None` for a plain
    /// `fn()` (which travels as `ProcessOptions::initializer`).
    ///
    /// # Errors
    /// `Error::InvalidConfig` when its arguments could not be encoded.
    pub fn for_processes(&self) -> Result<Option<crate::InitializerWith>, Error> {
        match &self.remote {
            None => Ok(None),
            Some(Ok(remote)) => Ok(Some(remote.clone())),
            Some(Err(message)) => Err(Error::InvalidConfig(format!(
                "the arguments of the initializer `{}` cannot be sent to worker processes: {message}",
                self.name
            ))),
        }
    }

    /// Runs the initializer on this thread as task code: a panic comes back as its message
    /// (and is not printed).
    ///
    /// # Errors
    /// The panic message and location, if the initializer panicked.
    pub fn run(&self) -> Result<(), String> {
        catch_task(|| (self.call)())
    }

    /// The error a worker's tasks fail with when its initializer panicked with `message`.
    pub fn failed(worker: usize, message: &str) -> Error {
        Error::worker(worker, format!("its initializer panicked: {message}"))
    }
}
