//! The sequential backend with an initializer: its one worker runs the initializer before its
//! first task and keeps the state it set between tasks and runs.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::ThreadId;

use parjob_core::{
    Backend, Error, Job, Pool, WorkerInit, WorkerState, set_worker_identity, swap_worker_state,
};

/// Runs each job on the calling thread, as `SequentialPool` does, with the worker's state
/// lent to that thread for the job.
pub(crate) struct InitializedSequential {
    init: WorkerInit,
    worker: Mutex<Worker>,
    /// Signalled when a thread gives the state back.
    returned: Condvar,
}

enum Worker {
    /// The initializer has not run yet.
    New,
    /// Its state, unless a thread holds it for a job (`lent_to`).
    Ready {
        state: Option<WorkerState>,
        lent_to: Option<ThreadId>,
    },
    /// The initializer panicked: every task fails with this.
    Broken(Error),
}

impl InitializedSequential {
    pub(crate) fn new(init: WorkerInit) -> Self {
        InitializedSequential {
            init,
            worker: Mutex::new(Worker::New),
            returned: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Worker> {
        // No user code runs under the lock but the initializer, whose panic is caught.
        self.worker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn run(&self, job: Job) {
        self.run_with(|ready| match ready {
            Ok(()) => job.run_here(),
            Err(error) => job.fail(&error),
        });
    }

    /// Calls `work` with the worker's state lent to this thread, or with the initializer's
    /// error.
    fn run_with(&self, work: impl FnOnce(Result<(), Error>)) {
        let me = std::thread::current().id();
        let mut worker = self.lock();
        loop {
            match &mut *worker {
                Worker::New => {
                    // On a clean slot, so that the state it sets is the worker's alone.
                    let outer = swap_worker_state(None);
                    let outcome = self.init.run();
                    let state = swap_worker_state(outer);
                    *worker = match outcome {
                        Ok(()) => Worker::Ready {
                            state,
                            lent_to: None,
                        },
                        Err(message) => Worker::Broken(WorkerInit::failed(0, &message)),
                    };
                }
                Worker::Broken(error) => {
                    let error = error.clone();
                    drop(worker);
                    work(Err(error));
                    return;
                }
                // A task of this thread submitted a job to this pool (an executor's task):
                // the thread holds the state already.
                Worker::Ready {
                    lent_to: Some(holder),
                    ..
                } if *holder == me => {
                    drop(worker);
                    work(Ok(()));
                    return;
                }
                // Another thread's job has the worker: one job at a time, as on one worker.
                Worker::Ready {
                    lent_to: Some(_), ..
                } => {
                    worker = self
                        .returned
                        .wait(worker)
                        .unwrap_or_else(PoisonError::into_inner);
                }
                Worker::Ready { state, lent_to } => {
                    let mine = state.take();
                    *lent_to = Some(me);
                    drop(worker);
                    let outer = swap_worker_state(mine);
                    work(Ok(()));
                    let mine = swap_worker_state(outer);
                    if let Worker::Ready { state, lent_to } = &mut *self.lock() {
                        *state = mine;
                        *lent_to = None;
                    }
                    self.returned.notify_all();
                    return;
                }
            }
        }
    }
}

impl crate::parallel::LocalPool for InitializedSequential {
    fn spawn_local(&self, work: parjob_core::LocalWork) {
        let previous = set_worker_identity(Some((Backend::Sequential, 0)));
        self.run_with(work);
        set_worker_identity(previous);
    }
}

impl Pool for InitializedSequential {
    fn workers(&self) -> usize {
        1
    }

    fn submit(&self, job: Job) {
        let previous = set_worker_identity(Some((Backend::Sequential, 0)));
        self.run(job);
        set_worker_identity(previous);
    }

    fn runs_on_calling_thread(&self) -> bool {
        true
    }

    fn default_pre_dispatch(&self) -> usize {
        1
    }

    fn verbose_name(&self) -> &'static str {
        "SequentialBackend"
    }
}
