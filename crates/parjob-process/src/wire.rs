//! What the process backend adds to parjob-remote's messages: the channels a worker hands over
//! in its `Hello`, the shared memory it is sent on the side (`Shipment`, announced by `FORGET`
//! and by a `RUN`'s attachments), and the status board.
//!
//! The message headers themselves (`WELCOME`, `RUN`, `DONE`, ...) and their layout are
//! `parjob_remote::header`'s. See `docs/PROCESS.md`.

use std::sync::atomic::{AtomicU64, Ordering};

use ipc_channel::ipc::{IpcBytesReceiver, IpcSharedMemory};
use parjob_remote::{Kind, RemoteError};
use serde::{Deserialize, Serialize};

use crate::mapping::{Watch, raw_parts};

/// This backend's protocol version (its `Hello`, `Shipment` and `FORGET`), compared at the
/// handshake with parjob-remote's `LAYOUT`. Bumped whenever one of them changes (4: the
/// `Hello` carries the worker's proof of its handshake secret; 5: the worker answers frames by
/// their tag and reports a task that overran its timeout; 6: the status board's third word, the
/// last frame whose `DONE` was sent; 7: everything from the worker comes on its line, `link`,
/// and the driver connects to the worker's server).
pub(crate) const PROTOCOL: u32 = 8;

/// Set in a worker's environment: the driver's pid. It makes `init()` enter the worker loop in
/// a process whose parent is that driver, with its line to the driver (`link`) as its
/// standard input.
pub(crate) const ENV_DRIVER: &str = "PARJOB_PROCESS_DRIVER";
/// The worker's own directory, which its driver made private and removes when the worker
/// ends: the worker makes it tempfile's default (its server goes there).
pub(crate) const ENV_HOME: &str = "PARJOB_PROCESS_HOME";
/// The worker's index in its pool.
pub(crate) const ENV_INDEX: &str = "PARJOB_PROCESS_WORKER";
/// The worker's handshake secret (`parjob_remote::HandshakeSecret::to_hex`). The environment
/// of a process is readable only by its own user (`/proc/PID/environ`), unlike its arguments,
/// and never passes through the server's socket, which a stranger may reach first.
pub(crate) const ENV_SECRET: &str = "PARJOB_PROCESS_SECRET";

/// A worker's exit status when its handshake failed after it entered `init()` (`EX_TEMPFAIL`):
/// never 0, which, before the handshake, tells the driver the program never called `init()`.
pub(crate) const EXIT_HANDSHAKE_FAILED: i32 = 75;
/// A worker's exit status when its parent is not the driver that started it, which is alive
/// (`EX_CONFIG`): a `worker_exe` wrapper started it as a child instead of `exec`ing it.
pub(crate) const EXIT_NOT_DRIVERS_CHILD: i32 = 78;
/// A worker copy's exit status when it reached a parallel run without having called
/// `parjob::init()` (it ran `main` from the top): the program never becomes a worker, and the
/// driver starts no more copies of it.
pub(crate) const EXIT_NO_INIT: i32 = 79;
/// A worker's exit status when it refused a welcome that did not prove it comes from its own
/// driver (`EX_NOPERM`); nothing the welcome asked was done.
pub(crate) const EXIT_REFUSED_DRIVER: i32 = 77;

/// The worker's first message, on its line to the driver (`link`): proof that it is the
/// process the driver started, its build, and the name of the one-shot server it opened for
/// the driver to connect to (the driver's channels to the worker go through it).
///
/// `[HELLO][proof 16][name len u16 LE][name][identity]`: plain bytes, read with limits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Hello {
    /// The `worker` half of the handshake secret the driver gave this worker.
    pub(crate) proof: [u8; 16],
    /// The worker's one-shot server (a socket path in its private directory).
    pub(crate) server: String,
    /// `parjob_remote::Identity::encode`: build, protocol, executable, pid.
    pub(crate) identity: Vec<u8>,
}

impl Hello {
    /// The message's kind byte, the second of parjob-remote's backend kinds.
    pub(crate) const KIND: u8 = Kind::FIRST_BACKEND + 1;
    /// The most bytes a `Hello` may take (a long temporary directory and an identity).
    pub(crate) const MAX_LEN: usize = 64 << 10;

    pub(crate) fn encode(&self) -> Vec<u8> {
        let name = self.server.as_bytes();
        let name_len = u16::try_from(name.len()).unwrap_or(u16::MAX);
        let name = &name[..usize::from(name_len)];
        let mut message = Vec::with_capacity(19 + name.len() + self.identity.len());
        message.push(Hello::KIND);
        message.extend_from_slice(&self.proof);
        message.extend_from_slice(&name_len.to_le_bytes());
        message.extend_from_slice(name);
        message.extend_from_slice(&self.identity);
        message
    }

    pub(crate) fn decode(message: &[u8]) -> Result<Hello, RemoteError> {
        let truncated = |needed| RemoteError::Truncated {
            message: "HELLO",
            needed,
            len: message.len(),
        };
        match message.first() {
            Some(&Hello::KIND) => {}
            found => {
                return Err(RemoteError::UnexpectedKind {
                    expected: "HELLO",
                    found: found.copied(),
                });
            }
        }
        let proof: [u8; 16] = message
            .get(1..17)
            .and_then(|p| p.try_into().ok())
            .ok_or(truncated(19))?;
        let name_len: [u8; 2] = message
            .get(17..19)
            .and_then(|p| p.try_into().ok())
            .ok_or(truncated(19))?;
        let end = 19 + usize::from(u16::from_le_bytes(name_len));
        let name = message.get(19..end).ok_or(truncated(end))?;
        let server = String::from_utf8(name.to_vec())
            .ok()
            .filter(|name| !name.contains('\0'))
            .ok_or_else(|| RemoteError::Malformed {
                message: "HELLO",
                reason: "its server name is not a path (not UTF-8, or a NUL in it)".into(),
            })?;
        Ok(Hello {
            proof,
            server,
            identity: message[end..].to_vec(),
        })
    }
}

/// Worker to driver, on its line, no reply: `[WELCOMED]`, sent once the driver's welcome
/// proved it comes from the driver, before the initializer runs. A worker that ends before it
/// has failed its handshake (a stranger may have reached its server first), and its start is
/// tried again; one that ends after it failed in its initializer, which is reported.
pub(crate) const WELCOMED: u8 = Kind::FIRST_BACKEND + 2;

/// What the driver sends a worker on its `big_tasks` channel after a `RUN` or `FORGET`.
#[derive(Serialize, Deserialize)]
pub(crate) enum Shipment {
    /// The first message on the channel the driver connected to the worker's server: the
    /// channel for messages and small frames, and the status board.
    Channels {
        /// Driver to worker: messages, and frames up to `max_nbytes`.
        tasks: IpcBytesReceiver,
        /// The status board, see [`Board`].
        board: IpcSharedMemory,
    },
    /// A new task arena for big frames, replacing the previous one.
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

/// Driver to idle worker, no reply: `[FORGET][shipments u32]`, then that many
/// `Shipment::Forget` on `big_tasks`. Sent when the driver drops a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Forget {
    pub(crate) shipments: u32,
}

impl Forget {
    /// The message's kind byte, the first of parjob-remote's backend kinds.
    pub(crate) const KIND: u8 = Kind::FIRST_BACKEND;

    pub(crate) fn encode(self) -> [u8; 5] {
        let mut message = [Forget::KIND, 0, 0, 0, 0];
        message[1..].copy_from_slice(&self.shipments.to_le_bytes());
        message
    }

    pub(crate) fn decode(message: &[u8]) -> Result<Forget, RemoteError> {
        match message {
            [Forget::KIND, count @ ..] => {
                let count: [u8; 4] = count.get(..4).and_then(|c| c.try_into().ok()).ok_or(
                    RemoteError::Truncated {
                        message: "FORGET",
                        needed: 5,
                        len: message.len(),
                    },
                )?;
                Ok(Forget {
                    shipments: u32::from_le_bytes(count),
                })
            }
            _ => Err(RemoteError::UnexpectedKind {
                expected: "FORGET",
                found: message.first().copied(),
            }),
        }
    }
}

/// Arenas up to this size are kept for the next big frame (a reused segment is written at
/// memory speed; a new one pays a page fault per page). Bigger ones are used once.
pub(crate) const ARENA_KEEP_MAX: usize = 256 << 20;

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

/// Four words of memory shared by the driver and one worker: how many tasks of the current
/// frame have started, (for timed frames) when the last one started, the sequence number
/// of the last frame whose `DONE` the worker sent, and the sequence number of the last frame
/// whose outcomes the driver has finished reading (so that a worker sent a frame before that
/// never writes over outcomes the driver still reads, see `frame::finish_done`). The driver reads it to name the task a
/// crashed worker held, to time tasks from their start in the worker, and to notice a `DONE`
/// that was sent but never arrived (something else wrote on the worker's channel); it costs the
/// worker one store per task and one per frame, no message. The worker makes it and sends it in
/// its `Hello`.
///
/// Who writes what: the worker writes the first two words as each task starts, and right after
/// it sends a frame's `DONE` the count (to 0, before the next frame's first task) and then the
/// third; the driver writes the count (to 0) only before it sends a `RUN` while no other frame
/// is out (the worker waits for that message), and the fourth once it has read a frame's
/// outcomes. Both sides read at any time. Every access, on both sides, is atomic.
pub(crate) struct Board {
    /// The mapping's registration with the `SIGBUS` guard (a task may cut the board's segment
    /// short); declared first so that it is dropped before the mapping.
    watch: Watch,
    /// Keeps the mapping alive; only reached through `words`.
    _memory: IpcSharedMemory,
    words: *mut AtomicU64,
}

// SAFETY: the mapping lives as long as `_memory`, which moves with the board, and every access
// through `words` is atomic.
unsafe impl Send for Board {}
// SAFETY: as above: every access is atomic, so sharing the board between threads is as
// sound as sharing it between processes.
unsafe impl Sync for Board {}

const BOARD_BYTES: usize = 4 * size_of::<u64>();

impl Board {
    /// A new, zeroed board (in the worker) and the handle to send to the driver.
    pub(crate) fn new() -> Option<(Board, IpcSharedMemory)> {
        let memory = IpcSharedMemory::from_byte(0, BOARD_BYTES);
        // A clone is a second mapping of the same memory: the driver's, once sent.
        let handle = memory.clone();
        Some((Board::from_shared(memory)?, handle))
    }

    /// The board a worker sent (in the driver). `None` if it is too small or misaligned.
    pub(crate) fn from_shared(mut memory: IpcSharedMemory) -> Option<Board> {
        let (start, len) = raw_parts(&mut memory);
        if len < BOARD_BYTES || start.align_offset(align_of::<AtomicU64>()) != 0 {
            return None;
        }
        Some(Board {
            watch: Watch::new(start, len),
            _memory: memory,
            words: start.cast::<AtomicU64>(),
        })
    }

    /// Whether the board's segment was cut short (see `mapping`): it then tells nothing, and
    /// its worker must be replaced. Reads the first word, which faults if it is gone.
    pub(crate) fn is_cut(&self) -> bool {
        self.started_count();
        self.watch.is_cut()
    }

    fn word(&self, i: usize) -> &AtomicU64 {
        debug_assert!(i < 4);
        // SAFETY: `words` points to a live, aligned mapping of at least four u64 words (checked
        // in `from_shared`), writable (see `raw_parts`), and every process that maps it
        // accesses it only atomically, so a shared `&AtomicU64` to it is sound.
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

    /// Worker, right after sending the `DONE` of frame `seq` (its `FrameTag::seq`): no task of
    /// the next frame has started. The count goes to 0 first, so a driver that reads `seq` here
    /// knows the count is the next frame's (a frame sent while this one ran, see
    /// `Supervisor::send_ahead`).
    #[inline]
    pub(crate) fn frame_done(&self, seq: u64) {
        self.word(0).store(0, Ordering::Release);
        self.word(2).store(seq, Ordering::Release);
    }

    /// Driver: it has read the outcomes of frame `seq` (and will not read its result arena
    /// again): the worker may write them over.
    pub(crate) fn outcomes_read(&self, seq: u64) {
        self.word(3).store(seq, Ordering::Release);
    }

    /// The `FrameTag::seq` of the last frame whose outcomes the driver has read (0: none yet).
    pub(crate) fn last_read(&self) -> u64 {
        self.word(3).load(Ordering::Acquire)
    }

    /// The `FrameTag::seq` of the last frame whose `DONE` the worker sent (0: none yet).
    pub(crate) fn last_done(&self) -> u64 {
        self.word(2).load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forget_survives_the_round_trip_and_a_short_one_is_an_error() {
        let forget = Forget { shipments: 70_000 };
        assert_eq!(Forget::decode(&forget.encode()), Ok(forget));
        assert!(matches!(
            Forget::decode(&forget.encode()[..3]),
            Err(RemoteError::Truncated { .. })
        ));
        assert!(Forget::decode(&[]).is_err());
        assert!(Forget::decode(&[Kind::Run.byte(), 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn both_mappings_of_a_board_see_the_same_words() {
        let (worker, handle) = Board::new().unwrap();
        let driver = Board::from_shared(handle).unwrap();
        worker.task_started(4, true);
        assert_eq!(driver.started_count(), 5);
        assert!(driver.last_start() > 0);
        assert_eq!(driver.last_done(), 0);
        worker.frame_done(7);
        assert_eq!(driver.last_done(), 7);
        assert_eq!(
            driver.started_count(),
            0,
            "no task of the next frame has started"
        );
        assert_eq!(worker.last_read(), 0);
        driver.outcomes_read(7);
        assert_eq!(worker.last_read(), 7);
        driver.reset();
        assert_eq!(worker.started_count(), 0);
        assert_eq!(worker.last_done(), 7, "a reset leaves the last frame done");
    }
}
