//! What travels between the driver and a worker: the handshake, the message kinds, and the
//! status board (a few shared words the worker writes as tasks start).
//!
//! Batches themselves are opaque frames made by `parjob_core` (`ErasedBatch::encode_tasks`);
//! this module only puts a small header in front of them. See `docs/PROCESS.md`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};

use ipc_channel::ipc::{IpcBytesReceiver, IpcBytesSender, IpcReceiver, IpcSender, IpcSharedMemory};
use serde::{Deserialize, Serialize};

/// Bumped whenever a message's layout changes.
pub(crate) const PROTOCOL: u32 = 1;

/// Set in a worker's environment: `<driver pid>:<one-shot server name>`. It makes `init()`
/// enter the worker loop in a process whose parent is that driver.
pub(crate) const ENV_SERVER: &str = "PARJOB_PROCESS_SERVER";
/// The worker's index in its pool.
pub(crate) const ENV_INDEX: &str = "PARJOB_PROCESS_WORKER";
/// The inherited file descriptor of the status board.
pub(crate) const ENV_BOARD_FD: &str = "PARJOB_PROCESS_BOARD_FD";

/// The worker's first message, sent on the channel it connects to the driver's server.
///
/// The worker makes every channel and keeps the ends it uses, so the driver never holds a
/// clone of a sender the worker writes to: when the worker dies, the driver's receivers see
/// the disconnection at once (ipc-channel #281).
#[derive(Serialize, Deserialize)]
pub(crate) struct Hello {
    pub(crate) protocol: u32,
    pub(crate) build_id: String,
    pub(crate) exe: String,
    pub(crate) pid: u32,
    /// Driver to worker: message headers and small frames.
    pub(crate) tasks: IpcBytesSender,
    /// Driver to worker: frames over `max_nbytes`.
    pub(crate) big_tasks: IpcSender<IpcSharedMemory>,
    /// Worker to driver: replies and small outcome frames.
    pub(crate) results: IpcBytesReceiver,
    /// Worker to driver: outcome frames over `max_nbytes`.
    pub(crate) big_results: IpcReceiver<IpcSharedMemory>,
}

/// Driver to worker: `[WELCOME][max_nbytes u64][has initializer u8][initializer offset i64]`.
pub(crate) const MSG_WELCOME: u8 = 1;
/// Driver to worker: `[RUN][flags u8][entry offset i64][shared length u64][frame]`.
pub(crate) const MSG_RUN: u8 = 2;
/// Driver to worker: exit with status 0.
pub(crate) const MSG_SHUTDOWN: u8 = 3;
/// Worker to driver: the initializer (if any) ran; ready for frames.
pub(crate) const MSG_READY: u8 = 4;
/// Worker to driver: `[INIT_FAILED][message]`.
pub(crate) const MSG_INIT_FAILED: u8 = 5;
/// Worker to driver: `[DONE][flags u8][busy nanos u64][shared length u64][outcomes]`.
pub(crate) const MSG_DONE: u8 = 6;

/// Frame flag: the per-task start time is wanted (a timeout is set).
pub(crate) const FLAG_TIMED: u8 = 1;
/// Frame flag: the frame is the first `shared length` bytes of the sender's shared segment
/// (its arena), not in this message.
pub(crate) const FLAG_SHARED: u8 = 2;
/// Frame flag: a new arena, replacing the previous one, waits on the `big_*` channel.
pub(crate) const FLAG_NEW_ARENA: u8 = 4;

/// Length of a `MSG_RUN` header.
pub(crate) const RUN_HEADER: usize = 18;
/// Length of a `MSG_DONE` header.
pub(crate) const DONE_HEADER: usize = 18;

/// Arenas up to this size are kept for the next big frame (a reused segment is written at
/// memory speed; a new one pays a page fault per page). Bigger ones are used once.
pub(crate) const ARENA_KEEP_MAX: usize = 256 << 20;

/// Reads a little-endian `u64` at `at`.
pub(crate) fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
}

/// Nanoseconds on `CLOCK_MONOTONIC`, which every process of the machine shares.
pub(crate) fn monotonic_nanos() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    (now.tv_sec as u64)
        .wrapping_mul(1_000_000_000)
        .wrapping_add(now.tv_nsec as u64)
}

/// Two words of memory shared by the driver and one worker: how many tasks of the current
/// frame have started, and (for timed frames) when the last one started. The driver reads it to
/// name the task a crashed worker held and to time tasks from their start in the worker; it
/// costs the worker one store per task, no message.
pub(crate) struct Board {
    words: *mut AtomicU64,
    /// Kept by the driver until the worker has inherited it.
    fd: Option<OwnedFd>,
}

// SAFETY: the mapping is only accessed through atomics and lives until `Board` is dropped.
unsafe impl Send for Board {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Board {}

const BOARD_BYTES: usize = 2 * size_of::<u64>();

impl Board {
    /// A new board in a fresh memfd (close-on-exec: only the worker it is meant for inherits
    /// it, see `spawn`).
    pub(crate) fn new() -> std::io::Result<Board> {
        // SAFETY: a valid NUL-terminated name and flags.
        let fd = unsafe { libc::memfd_create(c"parjob-board".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `fd` is a valid memfd.
        if unsafe { libc::ftruncate(fd.as_raw_fd(), BOARD_BYTES as libc::off_t) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let mut board = Board::map(fd.as_raw_fd())?;
        board.fd = Some(fd);
        Ok(board)
    }

    /// Maps the board a driver handed down as file descriptor `fd` (in a worker).
    pub(crate) fn inherit(fd: RawFd) -> std::io::Result<Board> {
        let board = Board::map(fd)?;
        // SAFETY: the fd was inherited for this purpose only; the mapping outlives it.
        unsafe { libc::close(fd) };
        Ok(board)
    }

    fn map(fd: RawFd) -> std::io::Result<Board> {
        // SAFETY: mapping BOARD_BYTES of a file at least that long, shared, read-write.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                BOARD_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Board {
            words: ptr.cast(),
            fd: None,
        })
    }

    /// The file descriptor a worker must inherit, while the driver still holds it.
    pub(crate) fn raw_fd(&self) -> Option<RawFd> {
        self.fd.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Closes the driver's copy of the file descriptor once the worker has it.
    pub(crate) fn forget_fd(&mut self) {
        self.fd = None;
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < 2);
        // SAFETY: `words` points to a live, page-aligned mapping of two u64 words, only ever
        // accessed atomically, by this process and the worker.
        unsafe { &*self.words.add(i) }
    }

    /// Driver, before sending a frame: no task of it has started.
    pub(crate) fn reset(&self) {
        self.word(0).store(0, Ordering::Release);
    }

    /// How many tasks of the current frame have started.
    pub(crate) fn started_count(&self) -> u64 {
        self.word(0).load(Ordering::Acquire)
    }

    /// When the last started task started, in [`monotonic_nanos`].
    pub(crate) fn last_start(&self) -> u64 {
        self.word(1).load(Ordering::Acquire)
    }

    /// Worker: task `position` of the frame starts now.
    #[inline]
    pub(crate) fn task_started(&self, position: usize, timed: bool) {
        if timed {
            self.word(1).store(monotonic_nanos(), Ordering::Release);
        }
        self.word(0).store(position as u64 + 1, Ordering::Release);
    }
}

impl Drop for Board {
    fn drop(&mut self) {
        // SAFETY: unmapping the mapping made in `map`; no reference into it outlives `self`.
        unsafe { libc::munmap(self.words.cast(), BOARD_BYTES) };
    }
}
