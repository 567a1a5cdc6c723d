//! Rank 0's completers: the threads that run the user code a job's end involves (decoding its
//! results with the result type's `Deserialize`, and a future's done-callbacks), so that the
//! driver thread never does. On the driver thread, user code that takes seconds would stop rank
//! 0's beats and its polling of MPI, and every rank would leave, taking rank 0 for lost.
//!
//! The threads are as many as there is work waiting, started when needed (up to
//! [`MAX_THREADS`]) and ended after [`IDLE_EXIT`] without work: a done-callback that blocks,
//! even one that waits for another future of the same executor, holds up no other job.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use parjob_core::Job;

/// A job's end, to run on a completer thread.
pub(super) type Work = Box<dyn FnOnce() + Send>;

/// At most this many completer threads at once; more work waits for one of them.
const MAX_THREADS: usize = 256;

/// A completer thread with no work for this long ends.
const IDLE_EXIT: Duration = Duration::from_secs(10);

/// Hands work to the completer threads.
pub(super) struct Completer {
    sender: Sender<Work>,
    shared: Arc<Shared>,
}

struct Shared {
    receiver: Mutex<Receiver<Work>>,
    /// Work sent and not taken by a thread yet.
    queued: AtomicUsize,
    /// Threads waiting for work (none of them running any).
    waiting: AtomicUsize,
    /// Threads alive.
    threads: AtomicUsize,
}

impl Default for Completer {
    fn default() -> Self {
        let (sender, receiver) = mpsc::channel();
        Completer {
            sender,
            shared: Arc::new(Shared {
                receiver: Mutex::new(receiver),
                queued: AtomicUsize::new(0),
                waiting: AtomicUsize::new(0),
                threads: AtomicUsize::new(0),
            }),
        }
    }
}

impl Completer {
    /// Completes `job` (its tasks without an outcome cancelled): on a completer thread when
    /// that runs a done-callback, here otherwise.
    pub(super) fn complete(&self, job: Job, busy: Duration) {
        if !job.completes_by_callback() {
            return job.complete(busy);
        }
        self.run(Box::new(move || job.complete(busy)));
    }

    /// Runs `work` on a completer thread: one waiting for work, or a new one when every
    /// thread is busy (a callback may block for ever). Runs it here only when no thread
    /// exists and none can be started.
    pub(super) fn run(&self, work: Work) {
        let shared = &self.shared;
        shared.queued.fetch_add(1, Ordering::SeqCst);
        if let Err(mpsc::SendError(work)) = self.sender.send(work) {
            shared.queued.fetch_sub(1, Ordering::SeqCst);
            return work();
        }
        if shared.queued.load(Ordering::SeqCst) <= shared.waiting.load(Ordering::SeqCst)
            || shared.threads.load(Ordering::SeqCst) >= MAX_THREADS
        {
            return;
        }
        shared.threads.fetch_add(1, Ordering::SeqCst);
        let for_thread = Arc::clone(shared);
        let started = std::thread::Builder::new()
            .name("parjob-mpi-done".into())
            .spawn(move || serve(&for_thread));
        if started.is_err() {
            shared.threads.fetch_sub(1, Ordering::SeqCst);
            if shared.threads.load(Ordering::SeqCst) == 0 {
                // No thread at all (out of threads): run what waits here, late beats and all.
                let pending = shared
                    .receiver
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .try_iter()
                    .collect::<Vec<_>>();
                for work in pending {
                    shared.queued.fetch_sub(1, Ordering::SeqCst);
                    work();
                }
            }
        }
    }
}

/// A completer thread: runs work until none came for [`IDLE_EXIT`] or the completer is gone.
fn serve(shared: &Shared) {
    loop {
        shared.waiting.fetch_add(1, Ordering::SeqCst);
        let next = shared
            .receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv_timeout(IDLE_EXIT);
        shared.waiting.fetch_sub(1, Ordering::SeqCst);
        match next {
            Ok(work) => {
                shared.queued.fetch_sub(1, Ordering::SeqCst);
                // User code (callbacks) may panic: the thread goes on serving (a job's
                // outcomes were recorded before its callbacks ran).
                let _ = std::panic::catch_unwind(AssertUnwindSafe(work));
            }
            Err(RecvTimeoutError::Timeout) => {
                // Work sent while this thread was giving up, counted on it as waiting: stay.
                if shared.queued.load(Ordering::SeqCst) > shared.waiting.load(Ordering::SeqCst) {
                    continue;
                }
                shared.threads.fetch_sub(1, Ordering::SeqCst);
                return;
            }
            Err(RecvTimeoutError::Disconnected) => {
                shared.threads.fetch_sub(1, Ordering::SeqCst);
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Work that blocks until later work has run does not stop that later work: each piece of
    /// work that waits gets a thread of its own.
    #[test]
    fn blocked_work_holds_up_no_later_work() {
        let completer = Completer::default();
        let (released_tx, released_rx) = mpsc::channel::<()>();
        let (done_tx, done_rx) = mpsc::channel::<u32>();
        let first_done = done_tx.clone();
        completer.run(Box::new(move || {
            // Blocks until the second piece of work has run.
            let _ = released_rx.recv_timeout(Duration::from_secs(30));
            let _ = first_done.send(1);
        }));
        completer.run(Box::new(move || {
            let _ = released_tx.send(());
            let _ = done_tx.send(2);
        }));
        let order: Vec<u32> = (0..2)
            .map(|_| done_rx.recv_timeout(Duration::from_secs(30)).unwrap())
            .collect();
        assert_eq!(order, [2, 1]);
    }

    #[test]
    fn a_panic_in_work_leaves_the_thread_serving() {
        let completer = Completer::default();
        completer.run(Box::new(|| panic!("a callback's panic")));
        let (done_tx, done_rx) = mpsc::channel();
        completer.run(Box::new(move || {
            let _ = done_tx.send(());
        }));
        assert!(done_rx.recv_timeout(Duration::from_secs(30)).is_ok());
    }
}
