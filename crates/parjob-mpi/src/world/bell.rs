//! Doorbells between the ranks on rank 0's host, so that an MPI thread with nothing to do
//! sleeps until a message comes instead of polling MPI for it.
//!
//! MPI has no way to wait for a message and for anything else at once, and Open MPI's own
//! waits spin; so every MPI thread polls, and a thread that polls often enough to answer in
//! microseconds takes CPU from the workers beside it: on a 2-CPU node running the seeds'
//! CPU-bound halves over 2 ranks, rank 0 and the two rank servers used about 3 ms of CPU per
//! 12 ms run between them, and an idle rank polled every 20 us.
//!
//! Ranks that share rank 0's host ring instead. Rank 0 makes a FIFO per rank in a directory of
//! its own (mode 0700: no other user can ring or listen), names the directory in its `WELCOME`,
//! and every rank on its host listens on its own FIFO and rings rank 0's. A message goes as
//! before (MPI still carries every byte); after sending it, and again once it is sent, the
//! sender writes its rank number to the receiver's FIFO, which wakes a thread that wakes the
//! receiver's MPI thread. A rank that rings also says so: its first ring is its rank number, so
//! rank 0 learns which ranks ring and removes the directory once every rank on its host did
//! (the open FIFOs live on). A ring that goes missing costs a wait of [`BELL_POLL`], never an
//! answer; ranks on other hosts poll as before.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How often an MPI thread whose every awaited peer rings polls MPI all the same: a missed ring
/// (a message MPI had not delivered yet when it rang) costs at most this, and a rank's beats and
/// liveness are still looked at.
pub(super) const BELL_POLL: Duration = Duration::from_millis(5);

/// The FIFO of `rank` in `dir`.
fn fifo(dir: &Path, rank: usize) -> PathBuf {
    dir.join(rank.to_string())
}

/// Opens a FIFO so that writing to it never blocks (a full FIFO drops the ring: the reader has
/// rings to read already) and opening never waits for the other end.
fn open_ringer(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
}

/// Rank 0's bells: its own FIFO, which it listens on, and the FIFOs of the other ranks.
pub(super) struct RankZeroBells {
    /// Removed once every rank on this host rang; `None` after that.
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// Each rank's FIFO, opened for writing, by rank (rank 0's own is not here).
    ringers: HashMap<usize, File>,
}

impl RankZeroBells {
    /// Makes a FIFO for every rank of a world of `size` and starts a thread that calls
    /// `rang` with the rank numbers it reads from rank 0's (until `rang` returns false).
    /// `None` when this host cannot (no writable temporary directory, no FIFOs): every rank
    /// then polls.
    pub(super) fn make(
        size: usize,
        rang: impl FnMut(Vec<usize>) -> bool + Send + 'static,
    ) -> Option<RankZeroBells> {
        // tempfile makes the directory with mode 0700.
        let dir = tempfile::Builder::new()
            .prefix("parjob-mpi-bells-")
            .tempdir()
            .ok()?;
        for rank in 0..size {
            let path = CString::new(fifo(dir.path(), rank).as_os_str().as_bytes()).ok()?;
            // SAFETY: `path` is a NUL-terminated path; mkfifo only reads it.
            if unsafe { libc::mkfifo(path.as_ptr(), 0o600) } != 0 {
                return None;
            }
        }
        // Blocking reads, from a descriptor that also holds the FIFO open for writing, so that
        // a read waits for a ring instead of seeing the end of the file.
        let own = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(fifo(dir.path(), 0))
            .ok()?;
        let mut ringers = HashMap::new();
        for rank in 1..size {
            ringers.insert(rank, open_ringer(&fifo(dir.path(), rank)).ok()?);
        }
        listen(own, rang)?;
        Some(RankZeroBells {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            ringers,
        })
    }

    /// The directory to name in `WELCOME`s (empty once removed: every rank on this host rings
    /// already).
    pub(super) fn dir(&self) -> &Path {
        if self.dir.is_some() {
            &self.path
        } else {
            Path::new("")
        }
    }

    /// Rings `rank` on every send to it from this thread, from now on.
    pub(super) fn ring_on_sends_to(&mut self, rank: usize) {
        if let Some(file) = self.ringers.remove(&rank) {
            RINGERS.with(|ringers| ringers.borrow_mut().insert(rank, file));
        }
    }

    /// Removes the directory and its FIFOs (the open ones live on): every rank that could
    /// ring rank 0 does, or the world is ending.
    pub(super) fn remove_dir(&mut self) {
        if let Some(dir) = self.dir.take() {
            let _ = dir.close();
        }
    }
}

impl Drop for RankZeroBells {
    fn drop(&mut self) {
        self.remove_dir();
    }
}

/// A rank on rank 0's host: starts listening on its FIFO in `dir` (calling `rang` for each
/// ring, until it returns false), rings rank 0 on every send to it from this thread from now
/// on, and tells rank 0 so with a first ring. Returns whether it could.
pub(super) fn join(
    dir: &Path,
    rank: usize,
    rang: impl FnMut(Vec<usize>) -> bool + Send + 'static,
) -> bool {
    let own = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(fifo(dir, rank));
    let Ok(own) = own else { return false };
    let Ok(rank0) = open_ringer(&fifo(dir, 0)) else {
        return false;
    };
    if listen(own, rang).is_none() {
        return false;
    }
    RINGERS.with(|ringers| ringers.borrow_mut().insert(0, rank0));
    RANK.with(|r| r.set(rank));
    ring(0);
    true
}

thread_local! {
    /// The FIFOs this thread rings, by rank: the MPI thread's, filled by
    /// [`RankZeroBells::ring_on_sends_to`] and [`join`].
    static RINGERS: RefCell<HashMap<usize, File>> = RefCell::new(HashMap::new());
    /// This thread's rank, written with each ring.
    static RANK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Rings `rank` if this thread rings it (a rank on rank 0's host): after a send to it, and
/// again when that send is done.
pub(super) fn ring(rank: usize) {
    RINGERS.with(|ringers| {
        if let Some(file) = ringers.borrow_mut().get_mut(&rank) {
            let me = u32::try_from(RANK.with(std::cell::Cell::get)).unwrap_or(u32::MAX);
            // Four bytes, written whole (a FIFO writes up to PIPE_BUF bytes at once). A full
            // FIFO refuses them: the listener has rings to read already.
            let _ = file.write(&me.to_le_bytes());
        }
    });
}

/// Whether this thread rings `rank`.
pub(super) fn rings(rank: usize) -> bool {
    RINGERS.with(|ringers| ringers.borrow().contains_key(&rank))
}

/// Starts the thread that reads `fifo` and calls `rang` with the ranks that rang.
fn listen(mut fifo: File, mut rang: impl FnMut(Vec<usize>) -> bool + Send + 'static) -> Option<()> {
    std::thread::Builder::new()
        .name("parjob-mpi-bell".into())
        .spawn(move || {
            // A multiple of 4: rings are written whole, so reads end between them.
            let mut buffer = [0u8; 256];
            loop {
                match fifo.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => {
                        let mut ranks: Vec<usize> = buffer[..n]
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                            .collect();
                        ranks.sort_unstable();
                        ranks.dedup();
                        if !rang(ranks) {
                            return;
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(_) => return,
                }
            }
        })
        .ok()
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_rank_that_joins_rings_rank_zero_with_its_number_and_is_rung_in_turn() {
        let (to_zero, at_zero) = mpsc::channel();
        let mut bells = RankZeroBells::make(3, move |ranks| to_zero.send(ranks).is_ok())
            .expect("FIFOs in a temporary directory");
        let dir = bells.dir().to_path_buf();
        assert!(dir.is_dir());
        // A rank's thread (here, another thread of this test) joins: its first ring says so.
        let (to_rank, at_rank) = mpsc::channel();
        let joiner = std::thread::spawn(move || {
            assert!(join(&dir, 2, move |ranks| to_rank.send(ranks).is_ok()));
            assert!(rings(0) && !rings(1));
            ring(0);
        });
        joiner.join().unwrap();
        let wait = Duration::from_secs(10);
        let mut heard = at_zero.recv_timeout(wait).unwrap();
        while heard.len() < 2 {
            match at_zero.recv_timeout(Duration::from_millis(200)) {
                Ok(more) => heard.extend(more),
                Err(_) => break,
            }
        }
        assert_eq!(heard.first(), Some(&2), "{heard:?}");
        // Rank 0 rings rank 2, and no other rank.
        bells.ring_on_sends_to(2);
        assert!(rings(2) && !rings(1));
        ring(2);
        assert_eq!(at_rank.recv_timeout(wait).unwrap(), vec![0]);
        let path = bells.dir().to_path_buf();
        bells.remove_dir();
        assert!(!path.exists());
        assert_eq!(bells.dir(), Path::new(""));
        // The FIFOs live on once their directory is gone.
        ring(2);
        assert_eq!(at_rank.recv_timeout(wait).unwrap(), vec![0]);
    }
}
