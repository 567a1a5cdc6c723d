//! Rank 0's completers: the threads that run the user code a job's end involves, so that the
//! driver thread never does. On the driver thread, user code that takes seconds would stop rank
//! 0's beats and its polling of MPI, and every rank would leave, taking rank 0 for lost.
//!
//! Two pools, so that one kind of user code never waits behind the other: *decoders* decode
//! every `DONE`'s results (the result type's `Deserialize`), *callbacks* complete the jobs whose
//! completion runs a future's done-callbacks. A pool starts a thread whenever every one of its
//! threads is busy (up to its limit) and a thread with no work for [`IDLE_EXIT`] ends: a
//! done-callback that blocks, even one waiting for another future of the same executor, holds
//! up no decode and, below [`MAX_CALLBACK_THREADS`] blocked callbacks, no other callback.

use std::collections::VecDeque;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use parjob_core::Job;

/// A piece of a job's end, to run on a completer thread.
pub(super) type Work = Box<dyn FnOnce() + Send>;

/// At most this many decoder threads: decoding is CPU work, and more threads than this only
/// share the same cores.
const MAX_DECODER_THREADS: usize = 64;

/// At most this many callback threads: each blocked done-callback holds one; past this many,
/// later callbacks wait for one to return (as on the other backends, whose callbacks run on
/// their pool's threads).
pub(super) const MAX_CALLBACK_THREADS: usize = 256;

/// A completer thread with no work for this long ends.
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// Rank 0's two completer pools.
pub(super) struct Completers {
    decoders: Completer,
    callbacks: Completer,
}

impl Default for Completers {
    fn default() -> Self {
        Completers {
            decoders: Completer::new("parjob-mpi-decode", MAX_DECODER_THREADS, IDLE_EXIT),
            callbacks: Completer::new("parjob-mpi-done", MAX_CALLBACK_THREADS, IDLE_EXIT),
        }
    }
}

impl Completers {
    /// Completes `job` (its tasks without an outcome cancelled): on a callback thread when
    /// that runs a done-callback, here otherwise.
    pub(super) fn complete(&self, job: Job, busy: Duration) {
        complete(&self.callbacks, job, busy);
    }

    /// Runs `decode` on a decoder thread; it gets the callback pool to complete its job with
    /// ([`complete`]).
    pub(super) fn decode(&self, decode: impl FnOnce(&Completer) + Send + 'static) {
        let callbacks = self.callbacks.clone();
        self.decoders.run(Box::new(move || decode(&callbacks)));
    }
}

/// Completes `job`: on a thread of `callbacks` when that runs a done-callback, here otherwise.
pub(super) fn complete(callbacks: &Completer, job: Job, busy: Duration) {
    if job.completes_by_callback() {
        callbacks.run(Box::new(move || job.complete(busy)));
    } else {
        job.complete(busy);
    }
}

/// A pool of completer threads.
#[derive(Clone)]
pub(super) struct Completer {
    shared: Arc<Shared>,
}

struct Shared {
    name: &'static str,
    max_threads: usize,
    idle_exit: Duration,
    state: Mutex<State>,
    work_came: Condvar,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Work>,
    /// Threads waiting for work.
    waiting: usize,
    /// Threads alive.
    threads: usize,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Completer {
    fn new(name: &'static str, max_threads: usize, idle_exit: Duration) -> Completer {
        Completer {
            shared: Arc::new(Shared {
                name,
                max_threads,
                idle_exit,
                state: Mutex::new(State::default()),
                work_came: Condvar::new(),
            }),
        }
    }

    /// Runs `work` on a thread of this pool: one waiting for work, or a new one when every
    /// thread is busy (below the limit). Runs it here only when the pool has no thread and
    /// none can be started.
    pub(super) fn run(&self, work: Work) {
        let shared = &self.shared;
        let mut state = shared.lock();
        state.queue.push_back(work);
        let start = state.queue.len() > state.waiting && state.threads < shared.max_threads;
        if start {
            state.threads += 1;
        }
        drop(state);
        shared.work_came.notify_one();
        if !start {
            return;
        }
        let for_thread = Arc::clone(shared);
        let started = std::thread::Builder::new()
            .name(shared.name.into())
            .spawn(move || serve(&for_thread));
        if started.is_err() {
            let mut state = shared.lock();
            state.threads -= 1;
            if state.threads == 0 {
                // No thread at all (out of threads): run what waits here, late beats and all.
                let pending: Vec<Work> = state.queue.drain(..).collect();
                drop(state);
                for work in pending {
                    let _ = std::panic::catch_unwind(AssertUnwindSafe(work));
                }
            }
        }
    }

    /// Threads alive in this pool.
    #[cfg(test)]
    fn threads(&self) -> usize {
        self.shared.lock().threads
    }
}

/// A completer thread: runs work until none came for the pool's idle time ([`IDLE_EXIT`]).
/// Every waiting thread waits with its own deadline, so idle threads end together.
fn serve(shared: &Shared) {
    let mut state = shared.lock();
    loop {
        if let Some(work) = state.queue.pop_front() {
            drop(state);
            // User code (a callback, a Deserialize) may panic: the thread goes on serving.
            let _ = std::panic::catch_unwind(AssertUnwindSafe(work));
            state = shared.lock();
            continue;
        }
        state.waiting += 1;
        let (guard, waited) = shared
            .work_came
            .wait_timeout(state, shared.idle_exit)
            .unwrap_or_else(PoisonError::into_inner);
        state = guard;
        state.waiting -= 1;
        if waited.timed_out() && state.queue.is_empty() {
            state.threads -= 1;
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::time::Instant;

    /// Work that blocks until later work has run does not stop that later work: each piece of
    /// work that waits gets a thread of its own.
    #[test]
    fn blocked_work_holds_up_no_later_work() {
        let completer = Completer::new("test", 8, IDLE_EXIT);
        let (released_tx, released_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let first_done = done_tx.clone();
        completer.run(Box::new(move || {
            // Blocks until the second piece of work has run.
            let _ = released_rx.recv_timeout(Duration::from_secs(30));
            let _ = first_done.send(1);
        }));
        completer.run(Box::new(move || {
            // Done before it releases the first: the order says which ran first, without a
            // race between the two sends (CI once saw [1, 2] with the release sent first).
            let _ = done_tx.send(2);
            let _ = released_tx.send(());
        }));
        let order: Vec<u32> = (0..2)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        assert_eq!(order, [2, 1]);
    }

    /// Callbacks blocked on every callback thread do not stop decoding: the two pools are
    /// apart.
    #[test]
    fn blocked_callbacks_hold_up_no_decode() {
        let completers = Completers {
            decoders: Completer::new("test-decode", 2, IDLE_EXIT),
            callbacks: Completer::new("test-done", 2, IDLE_EXIT),
        };
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for _ in 0..3 {
            let release_rx = Arc::clone(&release_rx);
            completers.callbacks.run(Box::new(move || {
                let _ = release_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(30));
            }));
        }
        let (decoded_tx, decoded_rx) = mpsc::channel();
        completers.decode(move |_| {
            let _ = decoded_tx.send(());
        });
        assert!(decoded_rx.recv_timeout(Duration::from_secs(10)).is_ok());
        for _ in 0..3 {
            let _ = release_tx.send(());
        }
    }

    #[test]
    fn a_panic_in_work_leaves_the_thread_serving() {
        let completer = Completer::new("test", 1, IDLE_EXIT);
        completer.run(Box::new(|| panic!("a callback's panic")));
        let (done_tx, done_rx) = mpsc::channel();
        completer.run(Box::new(move || {
            let _ = done_tx.send(());
        }));
        assert!(done_rx.recv_timeout(Duration::from_secs(30)).is_ok());
    }

    /// Idle threads end together after the idle time, not one per idle time (they took turns
    /// waiting on one receiver).
    #[test]
    fn idle_threads_end_together() {
        let idle = Duration::from_millis(300);
        let completer = Completer::new("test", 16, idle);
        let (release_tx, release_rx) = mpsc::channel::<()>();
        let release_rx = Arc::new(Mutex::new(release_rx));
        for _ in 0..8 {
            let release_rx = Arc::clone(&release_rx);
            completer.run(Box::new(move || {
                let _ = release_rx.lock().unwrap().recv();
            }));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(completer.threads(), 8);
        for _ in 0..8 {
            release_tx.send(()).unwrap();
        }
        // Eight turns of 300 ms would be 2.4 s.
        let deadline = Instant::now() + idle * 4;
        while completer.threads() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(completer.threads(), 0);
    }
}
