//! Doorbells between the ranks on rank 0's host, so that an MPI thread with nothing to do
//! sleeps until a message comes instead of polling MPI for it.
//!
//! MPI has no way to wait for a message and for anything else at once, and Open MPI's own
//! waits spin; so every MPI thread polls, and a thread that polls often enough to answer in
//! microseconds takes CPU from the workers beside it: on a 2-CPU node running the seeds'
//! CPU-bound halves over 2 ranks, rank 0 and the two rank servers used about 3 ms of CPU per
//! 12 ms run between them, and an idle rank polled over 2,000 times a second.
//!
//! Ranks that share rank 0's host ring instead. At the first `HELLO` that names its host, rank
//! 0 makes a directory of its own (mode 0700: no other user can ring or listen) with its own
//! FIFO, `0`, and then a FIFO for each rank on its host; it names the directory in that rank's
//! `WELCOME`, with the device and inode numbers of the two FIFOs the rank is to open. The rank
//! listens on its own FIFO and rings rank 0's. A message goes as before (MPI still carries
//! every byte); after sending it the sender writes its rank number to the receiver's FIFO,
//! which wakes a thread that wakes the receiver's MPI thread. Whether a rank rings, rank 0
//! learns from the rank's beats (an MPI message, one sent at once when it joins), never from a
//! FIFO; it removes the directory once every rank it named it to says it rings, or 10 s after
//! the handshake (the open FIFOs live on), so a run killed later leaves nothing behind.
//!
//! What a FIFO says is not trusted: a ring only wakes a thread to look at MPI, at most one wake
//! is on its way to the MPI thread however many rings come, and whether a rank rings comes
//! from MPI. Every FIFO is opened without following a symlink and used only if it is a FIFO
//! and the very one rank 0 made (its device and inode numbers). A ring that goes missing
//! costs a wait of [`BELL_POLL`], never an answer; a listener that stops (its FIFO gone bad)
//! turns its MPI thread back to polling, and a rank says so in its next beat; ranks on other
//! hosts poll as before.

use std::cell::RefCell;
use std::collections::{BTreeSet, HashMap};
use std::ffi::CString;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::wire::{Reader, put_bytes, put_u64};

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

/// A listener's state: whether its MPI thread has been told of a ring (one wake on its way at
/// most), and whether it still listens.
pub(super) struct Rings {
    told: AtomicBool,
    listening: AtomicBool,
}

impl Rings {
    /// The MPI thread looked: the next ring wakes it again.
    pub(super) fn take(&self) {
        self.told.store(false, Ordering::SeqCst);
    }

    /// Whether its listener still runs: while it does, a ring wakes the MPI thread.
    pub(super) fn listening(&self) -> bool {
        self.listening.load(Ordering::SeqCst)
    }
}

/// The MPI thread woken by `rings` (if it listens) looked: the next ring wakes it again.
pub(super) fn looked(rings: Option<&Rings>) {
    if let Some(rings) = rings {
        rings.take();
    }
}

/// Starts the thread that reads `fifo` and calls `wake` for what it reads when the MPI thread
/// was not told yet (until `wake` returns false). What the bytes say does not matter.
fn listen(fifo: File, wake: impl Fn() -> bool + Send + 'static) -> Option<Arc<Rings>> {
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
        told: AtomicBool::new(false),
        listening: AtomicBool::new(true),
    });
    let heard = Arc::clone(&rings);
    let mut fifo = fifo;
    let started = std::thread::Builder::new()
        .name("parjob-mpi-bell".into())
        .stack_size(64 << 10)
        .spawn(move || {
            let mut buffer = [0u8; 256];
            loop {
                match fifo.read(&mut buffer) {
                    Ok(0) => break,
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => break,
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

/// A FIFO's identity: its device and inode numbers.
type FifoId = (u64, u64);

/// A FIFO's identity ([`FifoId`]).
fn identity(file: &File) -> Option<FifoId> {
    use std::os::unix::fs::MetadataExt;
    file.metadata().ok().map(|meta| (meta.dev(), meta.ino()))
}

/// Rank 0's bells: the directory (made at the first rank on its host), its own FIFO, which it
/// listens on, and those of the ranks on its host.
pub(super) struct RankZeroBells {
    wake: Option<Box<dyn Fn() -> bool + Send + 'static>>,
    /// Removed once every rank it was named to rings (or after [`DIRECTORY_GRACE`]).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// Rank 0's own FIFO's identity and listener, once the directory is made.
    own: Option<(FifoId, Arc<Rings>)>,
    /// The ranks the directory was named to: only they can ring.
    named_to: BTreeSet<usize>,
    /// The directory could not be made (or was removed): no more ranks are named it.
    closed: bool,
}

impl RankZeroBells {
    /// Bells for rank 0, calling `wake` when a ring comes and the driver was not told yet. No
    /// file is made before a rank on this host says hello ([`RankZeroBells::add`]).
    pub(super) fn new(wake: impl Fn() -> bool + Send + 'static) -> RankZeroBells {
        RankZeroBells {
            wake: Some(Box::new(wake)),
            dir: None,
            path: PathBuf::new(),
            own: None,
            named_to: BTreeSet::new(),
            closed: false,
        }
    }

    /// Makes the directory and rank 0's own FIFO, and starts listening on it.
    fn open(&mut self) -> Option<()> {
        let wake = self.wake.take()?;
        // tempfile makes the directory with mode 0700.
        let dir = tempfile::Builder::new()
            .prefix("parjob-mpi-bells-")
            .tempdir()
            .ok()?;
        let path = fifo(dir.path(), 0);
        if !make_fifo(&path) {
            return None;
        }
        let file = open_fifo(&path)?;
        let id = identity(&file)?;
        let rings = listen(file, wake)?;
        self.path = dir.path().to_path_buf();
        self.dir = Some(dir);
        self.own = Some((id, rings));
        Some(())
    }

    /// For rank `rank` on this host: makes its FIFO (and the directory, the first time) and
    /// rings it on every send to it from this thread from now on. Returns what its `WELCOME`
    /// names (see [`welcome_bells`]), or `None`: it then polls.
    pub(super) fn add(&mut self, rank: usize) -> Option<Vec<u8>> {
        if self.closed {
            return None;
        }
        if self.own.is_none() && self.open().is_none() {
            self.closed = true;
            return None;
        }
        let (own_id, _) = self.own.as_ref()?;
        let own_id = *own_id;
        let path = fifo(&self.path, rank);
        if !make_fifo(&path) {
            return None;
        }
        let file = open_fifo(&path)?;
        let id = identity(&file)?;
        RINGERS.with(|ringers| ringers.borrow_mut().insert(rank, file));
        self.named_to.insert(rank);
        Some(welcome_bells(&self.path, id, own_id))
    }

    /// Whether `rank` was named the directory: only such a rank can say it rings.
    pub(super) fn named(&self, rank: usize) -> bool {
        self.named_to.contains(&rank)
    }

    /// The driver looked: the next ring wakes it again.
    pub(super) fn take_rings(&self) {
        if let Some((_, rings)) = &self.own {
            rings.take();
        }
    }

    /// Whether a ring still wakes the driver (its listener runs).
    pub(super) fn listening(&self) -> bool {
        self.own
            .as_ref()
            .is_some_and(|(_, rings)| rings.listening())
    }

    /// Removes the directory when every rank it was named to is in `ringing` (said so in its
    /// beats), or when the handshake ended [`DIRECTORY_GRACE`] ago or more (`None`: not yet).
    pub(super) fn tidy(&mut self, ringing: &BTreeSet<usize>, handshake_ended: Option<Instant>) {
        let Some(ended) = handshake_ended else {
            return;
        };
        if self.dir.is_some()
            && (self.named_to.is_subset(ringing) || ended.elapsed() >= DIRECTORY_GRACE)
        {
            self.remove_dir();
        }
    }

    /// Removes the directory and its FIFOs (the open ones live on); no rank is named it after.
    pub(super) fn remove_dir(&mut self) {
        self.closed = true;
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

/// What a `WELCOME` names for a rank on rank 0's host: the directory, then the device and inode
/// numbers of the rank's FIFO and of rank 0's.
fn welcome_bells(dir: &Path, rank: FifoId, zero: FifoId) -> Vec<u8> {
    let mut out = Vec::new();
    put_bytes(&mut out, dir.as_os_str().as_bytes());
    for n in [rank.0, rank.1, zero.0, zero.1] {
        put_u64(&mut out, n);
    }
    out
}

/// Reads what [`welcome_bells`] wrote: the directory and the two FIFOs' identities.
fn read_welcome_bells(bytes: &[u8]) -> Option<(PathBuf, FifoId, FifoId)> {
    let mut r = Reader(bytes);
    let dir = PathBuf::from(std::ffi::OsStr::from_bytes(r.bytes()?));
    let rank = (r.u64()?, r.u64()?);
    let zero = (r.u64()?, r.u64()?);
    Some((dir, rank, zero))
}

/// A rank on rank 0's host, given what its `WELCOME` named (see [`welcome_bells`]): opens its
/// FIFO and rank 0's, both the very ones rank 0 made, starts listening on its own (calling
/// `wake` when its MPI thread was not told yet) and rings rank 0 on every send to it from this
/// thread from now on. `None` if it cannot: it then polls.
pub(super) fn join(
    named: &[u8],
    rank: usize,
    wake: impl Fn() -> bool + Send + 'static,
) -> Option<Arc<Rings>> {
    let (dir, own_id, zero_id) = read_welcome_bells(named)?;
    let own = open_fifo(&fifo(&dir, rank)).filter(|f| identity(f) == Some(own_id))?;
    let rank0 = open_fifo(&fifo(&dir, 0)).filter(|f| identity(f) == Some(zero_id))?;
    let rings = listen(own, wake)?;
    RINGERS.with(|ringers| ringers.borrow_mut().insert(0, rank0));
    RANK.with(|r| r.set(rank));
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

    /// Waits for a wake on `woken`; the next ring wakes again.
    fn woke(woken: &mpsc::Receiver<()>, rings: &Rings) {
        woken
            .recv_timeout(Duration::from_secs(10))
            .expect("a wake within 10 s");
        rings.take();
    }

    #[test]
    fn a_rank_named_the_directory_joins_and_each_side_rings_the_other() {
        let (to_zero, woken_zero) = mpsc::channel();
        let mut bells = RankZeroBells::new(move || to_zero.send(()).is_ok());
        assert!(
            bells.dir.is_none(),
            "nothing made before a rank on this host says hello"
        );
        let named = bells.add(2).expect("rank 2's FIFO");
        let dir = bells.path.clone();
        assert!(fifo(&dir, 0).exists() && fifo(&dir, 2).exists() && !fifo(&dir, 1).exists());
        assert!(bells.named(2) && !bells.named(1));
        // A rank's thread (here, another thread of this test) joins and rings rank 0.
        let (to_rank, woken_rank) = mpsc::channel();
        let joiner = std::thread::spawn(move || {
            let rings = join(&named, 2, move || to_rank.send(()).is_ok()).expect("joined");
            ring(0);
            rings
        });
        let rank_rings = joiner.join().unwrap();
        let (_, zero_rings) = bells.own.as_ref().unwrap();
        woke(&woken_zero, zero_rings);
        // Rank 0 rings rank 2.
        ring(2);
        woke(&woken_rank, &rank_rings);
        // Rank 2 said it rings (in a beat): the directory goes; the FIFOs live on.
        bells.tidy(&BTreeSet::from([2]), Some(Instant::now()));
        assert!(!dir.exists());
        assert!(
            bells.add(1).is_none(),
            "no rank is named a directory that is gone"
        );
        ring(2);
        woke(&woken_rank, &rank_rings);
    }

    #[test]
    fn many_rings_make_one_wake_until_the_thread_looks() {
        let (to_zero, woken) = mpsc::channel();
        let mut bells = RankZeroBells::new(move || to_zero.send(()).is_ok());
        bells.add(1).expect("rank 1's FIFO");
        let mut writer = open_fifo(&fifo(&bells.path, 0)).expect("rank 0's FIFO");
        for _ in 0..10_000 {
            let _ = writer.write(&[0xFF; 7]);
        }
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(woken.try_iter().count(), 1, "one wake for one look");
        bells.take_rings();
        writer.write_all(b"x").unwrap();
        woken
            .recv_timeout(Duration::from_secs(10))
            .expect("a wake after the look");
        assert!(bells.listening());
    }

    #[test]
    fn a_link_a_file_or_another_fifo_in_place_of_the_one_rank_0_made_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("victim");
        std::fs::write(&target, b"keep me").unwrap();
        let link = dir.path().join("1");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(open_fifo(&link).is_none(), "a symlink is not followed");
        assert!(open_fifo(&target).is_none(), "a regular file is no FIFO");
        assert!(open_fifo(Path::new("/dev/zero")).is_none(), "nor a device");
        assert!(make_fifo(&dir.path().join("0")));
        let zero = identity(&open_fifo(&dir.path().join("0")).unwrap()).unwrap();
        let named = welcome_bells(dir.path(), zero, zero);
        assert!(join(&named, 1, || true).is_none());
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
        // A FIFO swapped in for the one rank 0 made (and named by its numbers) is refused too.
        std::fs::remove_file(&link).unwrap();
        assert!(make_fifo(&link));
        // (Held open, as rank 0 holds it: its inode is not reused.)
        let held = open_fifo(&link).unwrap();
        let made = identity(&held).unwrap();
        std::fs::remove_file(&link).unwrap();
        assert!(make_fifo(&link));
        let named = welcome_bells(dir.path(), made, zero);
        assert!(
            join(&named, 1, || true).is_none(),
            "not the FIFO rank 0 made"
        );
        // The very FIFOs: taken.
        let swapped = identity(&open_fifo(&link).unwrap()).unwrap();
        let named = welcome_bells(dir.path(), swapped, zero);
        assert!(join(&named, 1, || true).is_some());
        // What a WELCOME names, cut short, is no directory.
        assert!(read_welcome_bells(&named[..named.len() - 1]).is_none());
        assert!(read_welcome_bells(&[]).is_none());
    }

    #[test]
    fn the_directory_goes_once_every_rank_named_it_rings_or_after_a_grace() {
        let mut bells = RankZeroBells::new(|| true);
        bells.add(1).unwrap();
        bells.add(2).unwrap();
        let path = bells.path.clone();
        bells.tidy(&BTreeSet::from([1, 2]), None);
        assert!(path.exists(), "kept until the handshake ends");
        bells.tidy(&BTreeSet::from([1]), Some(Instant::now()));
        assert!(path.exists(), "rank 2 may still join");
        let long_ago = Instant::now().checked_sub(DIRECTORY_GRACE).unwrap();
        bells.tidy(&BTreeSet::from([1]), Some(long_ago));
        assert!(!path.exists(), "not after the grace");
    }
}
