//! [`MpiPool`]: the [`Pool`] `Parallel` uses on rank 0, a handle on the driver thread.

use std::sync::PoisonError;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use parjob_core::{Backend, Error, Job, Pool, ProcessOptions};
use parjob_remote::{CodeOffset, InitArgs, Nonce, Welcome};

use crate::launch_hint;
use crate::wire::put_u64;

use super::server::RUN_TRAILER;
use super::{Command, DRIVER, Encoded};

/// The MPI backend's pool on rank 0: a handle on the driver thread, using worker ranks
/// `1..=ranks`.
///
/// Made by `Parallel` for [`Backend::Mpi`]. Dropping it leaves the ranks running for the next
/// pool; they stop when the program on rank 0 exits.
#[derive(Debug)]
pub struct MpiPool {
    ranks: usize,
    workers: usize,
    /// The ranks' local pool it uses: 0 for the one each rank starts with, another for a pool
    /// of its own whose workers run an initializer.
    pool: u64,
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
        if let Err(reason) = super::configured_silence_limit() {
            return Err(Error::backend_unavailable(Backend::Mpi, reason));
        }
        let Some(driver) = DRIVER.get() else {
            let reason = if !crate::launched_by_mpi() {
                format!(
                    "this program was not started by an MPI launcher; {}",
                    launch_hint()
                )
            } else if !super::INIT_CALLED.load(Ordering::SeqCst) {
                "parjob::init() was not called first thing in main: under an MPI launcher it \
                 starts MPI and turns every rank but 0 into a worker, and without it every \
                 rank runs main"
                    .to_string()
            } else {
                "MPI did not start on this rank (parjob printed why on stderr), or this is a \
                 worker rank"
                    .to_string()
            };
            return Err(Error::backend_unavailable(Backend::Mpi, reason));
        };
        let (lock, ready) = &driver.ready;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = ready.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
        drop(done);
        if let Some(why) = driver.broken.get() {
            return Err(Error::backend_unavailable(Backend::Mpi, why.clone()));
        }
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
        Ok(MpiPool {
            ranks,
            workers,
            pool: 0,
        })
    }

    /// [`MpiPool::new`] whose tasks run on local workers set up by `options`: each of the
    /// ranks starts a local process pool of its own for it (when `options` asks for anything
    /// the ranks' first pool does not do), and stops it when this pool is dropped. As on the
    /// process backend, every worker process runs the initializer (`initializer` or
    /// `initializer_with`) once before its first task, is replaced after
    /// `max_tasks_per_worker` tasks, prefixes its output with `[rank R worker i] ` when
    /// `prefix_output` is set (`i` its index on rank `R`), and frames above `max_nbytes` go
    /// to it through shared memory. `worker_exe` does not apply: a rank's local workers run the
    /// rank's own executable, which proved at start-up to be rank 0's build.
    ///
    /// # Errors
    /// As [`MpiPool::new`]; [`Error::InvalidConfig`] when the initializer is not in this
    /// program's executable (a rank could not find it). An initializer that panics on a rank
    /// fails the tasks sent there with its message.
    pub fn with_options(ranks: usize, options: &ProcessOptions) -> Result<MpiPool, Error> {
        let (initializer, with_args) = if let Some(with) = &options.initializer_with {
            let (entry, function) = CodeOffset::of_initializer_with(with)?;
            let args = with.args.to_vec();
            (Some(entry), Some(InitArgs { function, args }))
        } else if let Some(initializer) = options.initializer {
            (Some(CodeOffset::of_initializer(initializer)?), None)
        } else if options.max_tasks_per_worker.is_some()
            || options.prefix_output
            || options.max_nbytes != ProcessOptions::default().max_nbytes
        {
            (None, None)
        } else {
            return MpiPool::new(ranks);
        };
        let mut pool = MpiPool::new(ranks)?;
        let Some(driver) = DRIVER.get() else {
            return Ok(pool);
        };
        static NEXT_POOL: AtomicU64 = AtomicU64::new(1);
        pool.pool = NEXT_POOL.fetch_add(1, Ordering::Relaxed);
        // The same message the process backend's driver sends its workers, without its proof
        // (MPI's own launcher vouches for the ranks, and every rank proved it is this build).
        let welcome = Welcome {
            max_nbytes: options.max_nbytes as u64,
            initializer,
            with_args,
            proof: Nonce::from_bytes([0; Nonce::LEN]),
        };
        // `[max_tasks_per_worker u64, 0 for none][prefix_output u8][welcome]`.
        let mut message = Vec::new();
        put_u64(
            &mut message,
            options.max_tasks_per_worker.map_or(0, |n| n.max(1) as u64),
        );
        message.push(u8::from(options.prefix_output));
        message.extend_from_slice(&welcome.encode());
        let _ = driver
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Command::OpenPool {
                pool: pool.pool,
                ranks: pool.ranks,
                welcome: message,
            });
        Ok(pool)
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
        let encoded = Encoded::of(&job, RUN_TRAILER);
        let sent = driver
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Command::Submit {
                job,
                ranks: self.ranks,
                pool: self.pool,
                encoded,
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

impl Drop for MpiPool {
    /// A pool with an initializer has the ranks stop its local workers.
    fn drop(&mut self) {
        if self.pool == 0 {
            return;
        }
        if let Some(driver) = DRIVER.get() {
            let _ = driver
                .commands
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .send(Command::ClosePool { pool: self.pool });
        }
    }
}
