//! [`MpiPool`]: the [`Pool`] `Parallel` uses on rank 0, a handle on the driver thread.

use std::sync::PoisonError;
use std::time::Duration;

use parjob_core::{Backend, Error, Job, Pool};

use crate::LAUNCH_HINT;

use super::{Command, DRIVER};

/// The MPI backend's pool on rank 0: a handle on the driver thread, using worker ranks
/// `1..=ranks`.
///
/// Made by `Parallel` for [`Backend::Mpi`]. Dropping it leaves the ranks running for the next
/// pool; they stop when the program on rank 0 exits.
#[derive(Debug)]
pub struct MpiPool {
    ranks: usize,
    workers: usize,
}

impl MpiPool {
    /// A pool on the first `ranks` worker ranks (every worker rank for 0, or when `ranks` is
    /// more than there are), waiting for every rank's handshake first.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] when the program was not started by an MPI launcher (with
    /// how to start it), when MPI did not start, when `parjob::init()` was not called, or when
    /// the world has no rank besides 0; [`Error::Worker`] naming the rank when a rank is
    /// another build or its local pool could not start.
    pub fn new(ranks: usize) -> Result<MpiPool, Error> {
        let Some(driver) = DRIVER.get() else {
            let reason = if crate::launched_by_mpi() {
                "this is a worker rank, or parjob::init() was not called first thing in main \
                 (it starts MPI)"
                    .to_string()
            } else {
                format!("this program was not started by an MPI launcher; {LAUNCH_HINT}")
            };
            return Err(Error::backend_unavailable(Backend::Mpi, reason));
        };
        let (lock, ready) = &driver.ready;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = ready.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
        drop(done);
        let infos = match driver.ranks.get() {
            Some(Ok(infos)) => infos,
            Some(Err(error)) => return Err(error.clone()),
            None => {
                return Err(Error::backend_unavailable(
                    Backend::Mpi,
                    "the MPI handshake did not finish",
                ));
            }
        };
        let ranks = if ranks == 0 || ranks > infos.len() {
            infos.len()
        } else {
            ranks
        };
        let workers = infos.iter().take(ranks).map(|r| r.workers).sum::<usize>();
        Ok(MpiPool { ranks, workers })
    }

    /// How many worker ranks this pool uses.
    pub fn ranks(&self) -> usize {
        self.ranks
    }
}

impl Pool for MpiPool {
    fn workers(&self) -> usize {
        self.workers.max(1)
    }

    fn submit(&self, job: Job) {
        let Some(driver) = DRIVER.get() else {
            return; // the job completes itself as cancelled
        };
        let sent = driver
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Command::Submit {
                job,
                ranks: self.ranks,
            });
        // A driver thread that is gone (the program is exiting) drops the job, which
        // completes itself as cancelled.
        drop(sent);
    }

    fn target_batch_duration(&self) -> Duration {
        // A frame's round trip through MPI and a local worker costs 50-200 us: 10 ms batches
        // hide it and pack thousands of tiny tasks per message.
        Duration::from_millis(10)
    }

    fn enforces_timeout(&self) -> bool {
        true
    }

    fn verbose_name(&self) -> &'static str {
        "MpiBackend"
    }
}
