//! What travels between the driver and a worker: the handshake, the message kinds, and the
//! status board (a few shared words the worker writes as tasks start).
//!
//! Batches themselves are opaque frames made by `parjob_core` (`ErasedBatch::encode_tasks`);
//! this module only puts a small header in front of them. See `docs/PROCESS.md`.

use std::sync::atomic::{AtomicU64, Ordering};

use ipc_channel::ipc::{IpcBytesReceiver, IpcBytesSender, IpcReceiver, IpcSender, IpcSharedMemory};
use serde::{Deserialize, Serialize};

/// Bumped whenever a message's layout changes.
pub(crate) const PROTOCOL: u32 = 2;

/// Set in a worker's environment: `<driver pid>:<one-shot server name>`. It makes `init()`
/// enter the worker loop in a process whose parent is that driver.
pub(crate) const ENV_SERVER: &str = "PARJOB_PROCESS_SERVER";
/// The worker's index in its pool.
pub(crate) const ENV_INDEX: &str = "PARJOB_PROCESS_WORKER";

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
    /// Driver to worker: shared segments (arenas for frames over `max_nbytes`, and the data
    /// of `SharedSlice`s), announced by the count in a `MSG_RUN` header.
    pub(crate) big_tasks: IpcSender<Shipment>,
    /// Worker to driver: replies and small outcome frames.
    pub(crate) results: IpcBytesReceiver,
    /// Worker to driver: outcome frames over `max_nbytes`.
    pub(crate) big_results: IpcReceiver<IpcSharedMemory>,
    /// The status board, see [`Board`].
    pub(crate) board: IpcSharedMemory,
}

/// What the driver sends a worker on its `big_tasks` channel before a `MSG_RUN` frame.
#[derive(Serialize, Deserialize)]
pub(crate) enum Shipment {
    /// A new arena for big frames, replacing the previous one.
    Arena(IpcSharedMemory),
    /// The segment of a `SharedSlice` the frame refers to, the first time this worker meets it.
    Segment {
        /// The id handles name it by.
        id: u64,
        /// Its memory, to be mapped.
        memory: IpcSharedMemory,
    },
    /// Segments the driver has dropped: the worker may unmap them.
    Forget(Vec<u64>),
}

/// Driver to worker: `[WELCOME][max_nbytes u64][has initializer u8][initializer offset i64]`.
pub(crate) const MSG_WELCOME: u8 = 1;
/// Driver to worker: `[RUN][flags u8][entry offset i64][shared length u64][shipments u32][frame]`,
/// where `shipments` counts the [`Shipment`]s that follow on `big_tasks`, which the worker takes
/// before it reads the frame.
pub(crate) const MSG_RUN: u8 = 2;
/// Driver to worker: exit with status 0.
pub(crate) const MSG_SHUTDOWN: u8 = 3;
/// Worker to driver: the initializer (if any) ran; ready for frames.
pub(crate) const MSG_READY: u8 = 4;
/// Worker to driver: `[INIT_FAILED][message]`.
pub(crate) const MSG_INIT_FAILED: u8 = 5;
/// Worker to driver: `[DONE][flags u8][busy nanos u64][shared length u64][outcomes]`.
pub(crate) const MSG_DONE: u8 = 6;

/// Driver to worker: `[FORGET][shipments u32]`, then that many `Shipment::Forget` on
/// `big_tasks`; no reply. Sent to an idle worker when the driver drops a segment.
pub(crate) const MSG_FORGET: u8 = 7;

/// Frame flag: the per-task start time is wanted (a timeout is set).
pub(crate) const FLAG_TIMED: u8 = 1;
/// Frame flag: the frame is the first `shared length` bytes of the sender's shared segment
/// (its arena), not in this message.
pub(crate) const FLAG_SHARED: u8 = 2;
/// Outcome flag: a new arena, replacing the previous one, waits on the `big_results` channel.
pub(crate) const FLAG_NEW_ARENA: u8 = 4;

/// Length of a `MSG_RUN` header.
pub(crate) const RUN_HEADER: usize = 22;
/// Length of a `MSG_DONE` header.
pub(crate) const DONE_HEADER: usize = 18;

/// Arenas up to this size are kept for the next big frame (a reused segment is written at
/// memory speed; a new one pays a page fault per page). Bigger ones are used once.
pub(crate) const ARENA_KEEP_MAX: usize = 256 << 20;

/// Reads a little-endian `u32` at `at`.
pub(crate) fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}

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
/// costs the worker one store per task, no message. The worker makes it and sends it in its
/// `Hello`.
pub(crate) struct Board {
    /// Keeps the mapping alive; only accessed through `words`.
    _memory: IpcSharedMemory,
    words: *mut AtomicU64,
}

// SAFETY: the mapping is only accessed through atomics and lives as long as `_memory`.
unsafe impl Send for Board {}
// SAFETY: as above: every access is atomic.
unsafe impl Sync for Board {}

const BOARD_BYTES: usize = 2 * size_of::<u64>();

impl Board {
    /// A new, zeroed board (in the worker) and the handle to send to the driver.
    pub(crate) fn new() -> Option<(Board, IpcSharedMemory)> {
        let memory = IpcSharedMemory::from_byte(0, BOARD_BYTES);
        let handle = memory.clone();
        Some((Board::from_shared(memory)?, handle))
    }

    /// The board a worker sent (in the driver). `None` if it is too small or misaligned.
    pub(crate) fn from_shared(mut memory: IpcSharedMemory) -> Option<Board> {
        // SAFETY: the slice is only turned into a pointer; every later access goes through
        // atomics, by this process and the one other process that maps the same memory.
        let bytes = unsafe { memory.deref_mut() };
        if bytes.len() < BOARD_BYTES || bytes.as_ptr().align_offset(align_of::<AtomicU64>()) != 0 {
            return None;
        }
        let words = bytes.as_mut_ptr().cast::<AtomicU64>();
        Some(Board {
            _memory: memory,
            words,
        })
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < 2);
        // SAFETY: `words` points to a live, page-aligned mapping of at least two u64 words
        // (checked in `from_shared`), only ever accessed atomically.
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
