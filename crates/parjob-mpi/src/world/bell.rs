//! Doorbells between the ranks on rank 0's host, so that an MPI thread with nothing to do
//! sleeps until a message comes instead of polling MPI for it.
//!
//! MPI has no way to wait for a message and for anything else at once, and Open MPI's own
//! waits spin; so every MPI thread polls, and a thread that polls often enough to answer in
//! microseconds takes CPU from the workers beside it: on a 2-CPU node running the seeds'
//! CPU-bound halves over 2 ranks, rank 0 and the two rank servers used about 3 ms of CPU per
//! 12 ms run between them, and an idle rank polled over 2,000 times a second.
//!
//! Ranks that share rank 0's host ring instead. Rank 0 makes a directory of its own (mode
//! 0700: no other user can ring or listen) with its own FIFO, `0`, and a FIFO for each rank
//! whose `HELLO` names its host; it names the directory in that rank's `WELCOME`. The rank
//! listens on its own FIFO and rings rank 0's. A message goes as before (MPI still carries
//! every byte); after sending it the sender writes its rank number to the receiver's FIFO,
//! which wakes a thread that wakes the receiver's MPI thread. A rank's first ring says it
//! rings: rank 0 removes the directory once every rank it named it to rang, or 10 s after the
//! handshake (the open FIFOs live on), so a run killed later leaves nothing behind.
//!
//! What a FIFO says is not trusted: a listener keeps only rank numbers of the world, at most
//! one wake is on its way to the MPI thread however many rings come, and rank 0 counts as
//! ringing only the ranks it named the directory to. Every FIFO is opened without following a
//! symlink and used only if it is one. A ring that goes missing costs a wait of
//! [`BELL_POLL`], never an answer; a listener that stops (its FIFO gone bad) turns its MPI
//! thread back to polling; ranks on other hosts poll as before.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

/// How often an MPI thread whose every awaited peer rings polls MPI all the same: a missed ring
/// (a message MPI had not delivered yet when it rang) costs at most this, and a rank's beats and
/// liveness are still looked at.
pub(super) const BELL_POLL: Duration = Duration::from_millis(5);

/// How long after the handshake rank 0 keeps the directory for ranks that have not rung yet.
const DIRECTORY_GRACE: Duration = Duration::from_secs(10);

/// The FIFO of `rank` in `dir`.
fn fifo(dir: &Path, rank: usize) -> PathBuf {
    dir.join(rank.to_string())
}

/// Opens `path` for reading and writing without following a symlink and without waiting,
/// and keeps it only if it is a FIFO: a regular file, a device or a link put in its place is
/// refused. Writes never block (a full FIFO drops the ring: its reader has rings to read).
fn open_fifo(path: &Path) -> Option<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(path)
        .ok()?;
    file.metadata()
        .ok()
        .filter(|meta| meta.file_type().is_fifo())?;
    Some(file)
}

/// Makes the FIFO `path` (mode 0600).
fn make_fifo(path: &Path) -> bool {
    let Ok(path) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: `path` is a NUL-terminated path; mkfifo only reads it.
    unsafe { libc::mkfifo(path.as_ptr(), 0o600) == 0 }
}

/// What a listener heard: the ranks that rang since its MPI thread last looked, whether that
/// thread has been told (one wake on its way at most), and whether it still listens.
pub(super) struct Rings {
    heard: Mutex<BTreeSet<usize>>,
    told: AtomicBool,
    listening: AtomicBool,
}

impl Rings {
    /// The ranks heard since the last call; the next ring wakes the MPI thread again.
    pub(super) fn take(&self) -> BTreeSet<usize> {
        self.told.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.heard.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Whether its listener still runs: while it does, a ring wakes the MPI thread.
    pub(super) fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }
}

/// Starts the thread that reads `fifo` (of rank `me` in a world of `size`) and notes the ranks
/// that rang, calling `wake` when the MPI thread was not told yet (until `wake` returns false).
fn listen(
    fifo: File,
    me: usize,
    size: usize,
    wake: impl Fn() -> bool + Send + 'static,
) -> Option<Arc<Rings>> {
    // Blocking reads: a read waits for a ring. (Opened without blocking, so that opening
    // something that is not a FIFO could not hang; checked to be one since.)
    // SAFETY: F_GETFL/F_SETFL on a descriptor `fifo` owns.
    unsafe {
        let flags = libc::fcntl(fifo.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fifo.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK) < 0
        {
            return None;
        }
    }
    let rings = Arc::new(Rings {
        heard: Mutex::new(BTreeSet::new()),
        told: AtomicBool::new(false),
        listening: AtomicBool::new(true),
    });
    let heard = Arc::clone(&rings);
    let mut fifo = fifo;
    let started = std::thread::Builder::new()
        .name("parjob-mpi-bell".into())
        .stack_size(64 << 10)
        .spawn(move || {
            // A multiple of 4: rings are written whole, so reads end between them.
            let mut buffer = [0u8; 256];
            loop {
                let n = match fifo.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
                };
                {
                    let mut ranks = heard.heard.lock().unwrap_or_else(PoisonError::into_inner);
                    // Only ranks of this world: what else comes is no ring.
                    ranks.extend(
                        buffer[..n]
                            .chunks_exact(4)
                            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
                            .filter(|&rank| rank < size && rank != me),
                    );
                }
                if !heard.told.swap(true, Ordering::SeqCst) && !wake() {
                    break;
                }
            }
            // Its MPI thread polls again from now on.
            heard.listening.store(false, Ordering::SeqCst);
            wake();
        });
    started.ok().map(|_| rings)
}

/// Rank 0's bells: its own FIFO, which it listens on, and those of the ranks on its host.
pub(super) struct RankZeroBells {
    /// Removed once every rank it was named to rang (or after [`DIRECTORY_GRACE`]).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    rings: Arc<Rings>,
    /// The ranks the directory was named to: only they can count as ringing.
    named_to: BTreeSet<usize>,
}

impl RankZeroBells {
    /// Makes the directory and rank 0's own FIFO for a world of `size`, and starts a thread
    /// that notes rings on it, calling `wake` when the driver was not told yet. `None` when
    /// this host cannot (no writable temporary directory, no FIFOs): every rank then polls.
    pub(super) fn make(
        size: usize,
        wake: impl Fn() -> bool + Send + 'static,
    ) -> Option<RankZeroBells> {
        // tempfile makes the directory with mode 0700.
        let dir = tempfile::Builder::new()
            .prefix("parjob-mpi-bells-")
            .tempdir()
            .ok()?;
        let own = fifo(dir.path(), 0);
        if !make_fifo(&own) {
            return None;
        }
        let rings = listen(open_fifo(&own)?, 0, size, wake)?;
        Some(RankZeroBells {
            path: dir.path().to_path_buf(),
            dir: Some(dir),
            rings,
            named_to: BTreeSet::new(),
        })
    }

    /// For rank `rank` on this host: makes its FIFO and rings it on every send to it from this
    /// thread from now on. Returns the directory to name in its `WELCOME`, or `None` (it then
    /// polls).
    pub(super) fn add(&mut self, rank: usize) -> Option<Vec<u8>> {
        self.dir.as_ref()?;
        let path = fifo(&self.path, rank);
        if !make_fifo(&path) {
            return None;
        }
        let file = open_fifo(&path)?;
        RINGERS.with(|ringers| ringers.borrow_mut().insert(rank, file));
        self.named_to.insert(rank);
        Some(self.path.as_os_str().as_bytes().to_vec())
    }

    /// The ranks that rang since the last call, of those it was named to.
    pub(super) fn take_rings(&self) -> BTreeSet<usize> {
        let mut rang = self.rings.take();
        rang.retain(|rank| self.named_to.contains(rank));
        rang
    }

    /// Whether a ring still wakes the driver (its listener runs).
    pub(super) fn listening(&self) -> bool {
        self.rings.listening()
    }

    /// Removes the directory when every rank it was named to is in `ringing`, or when the
    /// handshake ended `DIRECTORY_GRACE` ago or more (`None`: not yet).
    pub(super) fn tidy(&mut self, ringing: &BTreeSet<usize>, handshake_ended: Option<Instant>) {
        let Some(ended) = handshake_ended else {
            return;
        };
        if self.named_to.is_subset(ringing) || ended.elapsed() >= DIRECTORY_GRACE {
            self.remove_dir();
        }
    }

    /// Removes the directory and its FIFOs (the open ones live on).
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

/// A rank on rank 0's host: starts listening on its FIFO in `dir` (calling `wake` when its
/// MPI thread was not told yet), rings rank 0 on every send to it from this thread from now
/// on, and tells rank 0 so with a first ring. `None` if it cannot: it then polls.
pub(super) fn join(
    dir: &Path,
    rank: usize,
    size: usize,
    wake: impl Fn() -> bool + Send + 'static,
) -> Option<Arc<Rings>> {
    let own = open_fifo(&fifo(dir, rank))?;
    let rank0 = open_fifo(&fifo(dir, 0))?;
    let rings = listen(own, rank, size, wake)?;
    RINGERS.with(|ringers| ringers.borrow_mut().insert(0, rank0));
    RANK.with(|r| r.set(rank));
    ring(0);
    Some(rings)
}

thread_local! {
    /// The FIFOs this thread rings, by rank: the MPI thread's, filled by
    /// [`RankZeroBells::add`] and [`join`].
    static RINGERS: RefCell<HashMap<usize, File>> = RefCell::new(HashMap::new());
    /// This thread's rank, written with each ring.
    static RANK: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Rings `rank` if this thread rings it (a rank on rank 0's host): after a send to it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Waits for a wake on `woken`, then takes what `rings` heard.
    fn next(woken: &mpsc::Receiver<()>, rings: &Rings) -> BTreeSet<usize> {
        woken
            .recv_timeout(Duration::from_secs(10))
            .expect("a wake within 10 s");
        // The listener may still be adding what came in the same read.
        std::thread::sleep(Duration::from_millis(20));
        rings.take()
    }

    #[test]
    fn a_rank_that_joins_rings_rank_zero_with_its_number_and_is_rung_in_turn() {
        let (to_zero, woken_zero) = mpsc::channel();
        let mut bells = RankZeroBells::make(4, move || to_zero.send(()).is_ok())
            .expect("FIFOs in a temporary directory");
        let named = bells.add(2).expect("rank 2's FIFO");
        let dir = PathBuf::from(std::ffi::OsStr::from_bytes(&named));
        assert!(dir.is_dir() && fifo(&dir, 2).exists() && !fifo(&dir, 1).exists());
        // A rank's thread (here, another thread of this test) joins: its first ring says so.
        let (to_rank, woken_rank) = mpsc::channel();
        let joiner = std::thread::spawn(move || {
            let rings = join(&dir, 2, 4, move || to_rank.send(()).is_ok()).expect("joined");
            ring(0);
            (rings, woken_rank)
        });
        let (rank_rings, woken_rank) = joiner.join().unwrap();
        let rang = next(&woken_zero, &bells.rings);
        assert_eq!(bells.named_to.intersection(&rang).count(), 1, "{rang:?}");
        // Rank 0 rings rank 2.
        ring(2);
        assert_eq!(next(&woken_rank, &rank_rings), BTreeSet::from([0]));
        // Every rank named rang: the directory goes; the FIFOs live on.
        let path = bells.path.clone();
        bells.tidy(&BTreeSet::from([2]), Some(Instant::now()));
        assert!(!path.exists());
        ring(2);
        assert_eq!(next(&woken_rank, &rank_rings), BTreeSet::from([0]));
    }

    #[test]
    fn what_a_fifo_says_beyond_ranks_of_the_world_is_dropped_and_one_wake_stands_for_many() {
        let (to_zero, woken) = mpsc::channel();
        let mut bells = RankZeroBells::make(3, move || to_zero.send(()).is_ok()).expect("FIFOs");
        bells.add(1).expect("rank 1's FIFO");
        let mut writer = open_fifo(&fifo(&bells.path, 0)).expect("rank 0's FIFO");
        // Random words, huge numbers, rank 0 itself, a rank not named, partial words: none of
        // them counts; rank 1 does.
        let mut noise = Vec::new();
        for word in [u32::MAX, 7, 3, 0, 2, 0xDEAD_BEEF] {
            noise.extend_from_slice(&word.to_le_bytes());
        }
        noise.extend_from_slice(&1u32.to_le_bytes());
        writer.write_all(&noise).unwrap();
        assert_eq!(next(&woken, &bells.rings), BTreeSet::from([2, 1]));
        // 2 is of the world but was not named the directory: rank 0 does not count it.
        writer.write_all(&2u32.to_le_bytes()).unwrap();
        woken.recv_timeout(Duration::from_secs(10)).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(bells.take_rings().is_empty());
        // A flood: one wake until the driver looks.
        for _ in 0..10_000 {
            let _ = writer.write(&1u32.to_le_bytes());
        }
        std::thread::sleep(Duration::from_millis(200));
        let wakes = woken.try_iter().count();
        assert!(wakes <= 1, "{wakes} wakes for one look");
        assert_eq!(bells.take_rings(), BTreeSet::from([1]));
        assert!(bells.listening());
    }

    #[test]
    fn a_link_or_a_file_in_place_of_a_fifo_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("0");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_fifo(&link).is_none(), "a symlink is not followed");
        assert!(open_fifo(&target).is_none(), "a regular file is no FIFO");
        assert!(open_fifo(Path::new("/dev/zero")).is_none(), "nor a device");
        assert!(join(dir.path(), 1, 3, || true).is_none());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // A FIFO in its place is taken.
        assert!(make_fifo(&dir.path().join("5")));
        assert!(open_fifo(&dir.path().join("5")).is_some());
    }

    #[test]
    fn with_no_rank_to_ring_the_directory_goes_at_the_handshake_and_otherwise_after_a_grace() {
        let mut alone = RankZeroBells::make(3, || true).expect("FIFOs");
        let path = alone.path.clone();
        alone.tidy(&BTreeSet::new(), None);
        assert!(path.exists(), "kept until the handshake ends");
        alone.tidy(&BTreeSet::new(), Some(Instant::now()));
        assert!(
            !path.exists(),
            "no rank was named it: gone at the handshake"
        );
        let mut waiting = RankZeroBells::make(3, || true).expect("FIFOs");
        waiting.add(1).unwrap();
        let path = waiting.path.clone();
        waiting.tidy(&BTreeSet::new(), Some(Instant::now()));
        assert!(path.exists(), "rank 1 may still ring");
        let long_ago = Instant::now().checked_sub(DIRECTORY_GRACE).unwrap();
        waiting.tidy(&BTreeSet::new(), Some(long_ago));
        assert!(!path.exists(), "not after the grace");
    }
}
