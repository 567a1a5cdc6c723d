//! The messages a driver and a worker exchange, as typed headers with `encode` and `decode`.
//!
//! This is the one description of their layout; both ends go through it, so no byte offset is
//! written twice. Every integer is little-endian. The first byte of a message is its [`Kind`].
//!
//! | message | direction | layout |
//! | --- | --- | --- |
//! | [`Welcome`] | driver to worker | `[1][max_nbytes u64][initializer u8: 0 none, 1 fn(), 2 with arguments][initializer offset u64][driver proof, 16 bytes]`, then for 2: `[function offset u64][arguments]` |
//! | [`RunHeader`] | driver to worker | `[2][flags u8][entry offset u64][arena length u64][attachments u32][generation u64][seq u64][timeout nanos u64]`, then the frame unless it is in the arena |
//! | `SHUTDOWN` | driver to worker | `[3]`: exit with status 0 |
//! | `READY` | worker to driver | `[4]`: the initializer (if any) ran |
//! | [`InitFailed`] | worker to driver | `[5][reason, UTF-8]` |
//! | [`DoneHeader`] | worker to driver | `[6][flags u8][busy nanos u64][arena length u64][generation u64][seq u64][overrun u32]`, then the outcomes unless they are in the arena |
//! | a backend's own | either | `[64..=255]...`: kinds from [`Kind::FIRST_BACKEND`] up are the backend's |
//!
//! `RUN` flags: 1 = timed (the worker stamps each task's start and measures it against `timeout
//! nanos`), 2 = the frame is the first `arena length` bytes of the task arena. `DONE` flags: 2 =
//! the outcomes are the first `arena length` bytes of the result arena, 4 = that arena is a new
//! one, sent alongside, 8 = task `overrun` of the frame (a position) ran longer than the timeout.
//! The arena length is 0 when the frame is inline; the timeout and the overrun are 0 when their
//! flag is not set. Unknown flags are malformed.
//!
//! `generation` and `seq` name the frame: the driver numbers every `RUN` it sends a worker slot
//! (`seq`, never reused by that slot) and says which of the slot's workers it is for
//! (`generation`); the `DONE` echoes both, so that a reply that belongs to another frame (from
//! a process a task forked, say, which shares the worker's channels) is recognised as such and
//! never taken for this frame's outcomes.
//!
//! The frame itself (tasks on the way out, outcomes on the way back) is parjob-core's:
//! `ErasedBatch::encode_tasks` writes it, the batch's `RemoteEntry` runs it, and
//! `ErasedBatch::decode_outcomes` reads the answer. Its records are `[tag u8][len u32][payload]`.

use std::time::Duration;

use crate::{CodeOffset, Nonce, RemoteError};

/// What a message is: its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Kind {
    /// Driver to worker, once after the handshake: [`Welcome`].
    Welcome,
    /// Driver to worker: run a frame ([`RunHeader`]).
    Run,
    /// Driver to worker: exit with status 0.
    Shutdown,
    /// Worker to driver: ready for frames.
    Ready,
    /// Worker to driver: the initializer failed ([`InitFailed`]).
    InitFailed,
    /// Worker to driver: a frame's outcomes ([`DoneHeader`]).
    Done,
    /// A message of the backend's own, with this kind byte (at least [`Kind::FIRST_BACKEND`]).
    Backend(u8),
}

impl Kind {
    /// The first kind byte a backend may use for its own messages; lower ones are this
    /// crate's.
    pub const FIRST_BACKEND: u8 = 0x40;

    /// The kind of `message`, from its first byte.
    ///
    /// # Errors
    /// [`RemoteError::UnexpectedKind`] for an empty message or an unknown kind below
    /// [`Kind::FIRST_BACKEND`].
    pub fn of(message: &[u8]) -> Result<Kind, RemoteError> {
        let unknown = |found| RemoteError::UnexpectedKind {
            expected: "a known kind",
            found,
        };
        let &byte = message.first().ok_or(unknown(None))?;
        Ok(match byte {
            1 => Kind::Welcome,
            2 => Kind::Run,
            3 => Kind::Shutdown,
            4 => Kind::Ready,
            5 => Kind::InitFailed,
            6 => Kind::Done,
            b if b >= Kind::FIRST_BACKEND => Kind::Backend(b),
            b => return Err(unknown(Some(b))),
        })
    }

    /// The kind's byte, the first of its messages.
    pub fn byte(self) -> u8 {
        match self {
            Kind::Welcome => 1,
            Kind::Run => 2,
            Kind::Shutdown => 3,
            Kind::Ready => 4,
            Kind::InitFailed => 5,
            Kind::Done => 6,
            Kind::Backend(b) => b,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Kind::Welcome => "WELCOME",
            Kind::Run => "RUN",
            Kind::Shutdown => "SHUTDOWN",
            Kind::Ready => "READY",
            Kind::InitFailed => "INIT_FAILED",
            Kind::Done => "DONE",
            Kind::Backend(_) => "backend",
        }
    }
}

/// Where a message's frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FrameAt {
    /// In the message, right after its header.
    Inline,
    /// The first `len` bytes of the sender's arena: memory both processes map, which a big
    /// frame is copied into instead of through the channel.
    Arena {
        /// The frame's length.
        len: u64,
    },
}

impl FrameAt {
    fn arena_len(self) -> u64 {
        match self {
            FrameAt::Inline => 0,
            FrameAt::Arena { len } => len,
        }
    }
}

const FLAG_TIMED: u8 = 1;
const FLAG_ARENA: u8 = 2;
const FLAG_NEW_ARENA: u8 = 4;
const FLAG_OVERRUN: u8 = 8;

/// Which frame a `RUN` carries, echoed by its `DONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameTag {
    /// Which of the worker slot's processes the frame is for (its generation: 1 for the first
    /// worker of the slot, 2 for its first replacement, ...).
    pub generation: u64,
    /// The frame's number, unique among the frames the driver sends that slot.
    pub seq: u64,
}

/// The driver's first message after a successful handshake.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Welcome {
    /// Frames over this many bytes travel in an arena rather than inline.
    pub max_nbytes: u64,
    /// The function the worker runs once before its first frame, if any: a `fn()`, or, with
    /// `with_args`, the entry that decodes the arguments and calls the user's function.
    pub initializer: Option<CodeOffset>,
    /// The user's function and its encoded arguments, for an initializer with arguments
    /// (`initializer` is then its entry).
    pub with_args: Option<InitArgs>,
    /// That this is the worker's own driver: the `driver` half of the
    /// [`HandshakeSecret`](crate::HandshakeSecret) it was given. A worker checks it
    /// ([`Welcome::check`]) before anything else, and does nothing a welcome without it asks.
    pub proof: Nonce,
}

/// An initializer's function and arguments, in a [`Welcome`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitArgs {
    /// The user's function (`CodeOffset::of_initializer_with`).
    pub function: CodeOffset,
    /// Its arguments, encoded with parjob's codec.
    pub args: Vec<u8>,
}

impl Welcome {
    /// Length of an encoded welcome without initializer arguments (which follow it).
    pub const LEN: usize = 34;

    /// The message: the fixed fields, then, for an initializer with arguments, the function's
    /// offset and the arguments.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Writer::<{ Welcome::LEN }>::new(Kind::Welcome);
        out.u64(self.max_nbytes);
        let flag = match (self.initializer, &self.with_args) {
            (None, _) => 0,
            (Some(_), None) => 1,
            (Some(_), Some(_)) => 2,
        };
        out.u8(flag);
        out.u64(self.initializer.map_or(0, CodeOffset::get));
        out.put(&self.proof.to_bytes());
        let mut message = out.finish().to_vec();
        if let (Some(_), Some(with)) = (self.initializer, &self.with_args) {
            message.extend_from_slice(&with.function.get().to_le_bytes());
            message.extend_from_slice(&with.args);
        }
        message
    }

    /// Reads a welcome. Its proof is not checked here: see [`Welcome::check`].
    ///
    /// # Errors
    /// When `message` is not a welcome, is too short (a missing offset or proof is an error,
    /// never zeros), or its initializer flag is not 0 (none), 1 (a `fn()`) or 2 (with
    /// arguments, whose function offset must follow).
    pub fn decode(message: &[u8]) -> Result<Welcome, RemoteError> {
        let mut r = Reader::new(message, Kind::Welcome, Welcome::LEN)?;
        let max_nbytes = r.u64();
        let has_initializer = r.u8();
        let offset = CodeOffset(r.u64());
        let proof = Nonce::from_bytes(r.take());
        let (initializer, with_args) = match has_initializer {
            0 => (None, None),
            1 => (Some(offset), None),
            2 => {
                r.need(8)?;
                let function = CodeOffset(r.u64());
                let args = r.rest().to_vec();
                (Some(offset), Some(InitArgs { function, args }))
            }
            other => return Err(r.malformed(format!("initializer flag {other}"))),
        };
        Ok(Welcome {
            max_nbytes,
            initializer,
            with_args,
            proof,
        })
    }

    /// Checks that this welcome comes from the driver that holds the worker's secret.
    ///
    /// # Errors
    /// [`RemoteError::WrongSecret`] when its proof is not `expected`.
    pub fn check(&self, expected: &Nonce) -> Result<(), RemoteError> {
        if self.proof == *expected {
            Ok(())
        } else {
            Err(RemoteError::WrongSecret { message: "WELCOME" })
        }
    }
}

/// The header of a `RUN`: which frame it is, which function runs it, and where the frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunHeader {
    /// Which frame this is; the `DONE` echoes it.
    pub tag: FrameTag,
    /// The per-task time limit, if one is set: the worker then stamps each task's start time
    /// and reports the first task that ran longer ([`DoneHeader::overrun`]).
    pub timeout: Option<Duration>,
    /// The batch's `RemoteEntry`.
    pub entry: CodeOffset,
    /// Where the frame of tasks is.
    pub frame: FrameAt,
    /// How many side messages (the process backend's shared-memory shipments) follow the
    /// header on their own channel; the worker takes them before it reads the frame.
    pub attachments: u32,
}

impl RunHeader {
    /// Length of the header; an inline frame follows it.
    pub const LEN: usize = 46;

    /// The header's bytes, to put in front of an inline frame or send alone. A timeout
    /// saturates at `u64::MAX` nanoseconds (585 years).
    pub fn encode(&self) -> [u8; RunHeader::LEN] {
        let mut out = Writer::new(Kind::Run);
        let timed = if self.timeout.is_some() {
            FLAG_TIMED
        } else {
            0
        };
        let arena = match self.frame {
            FrameAt::Inline => 0,
            FrameAt::Arena { .. } => FLAG_ARENA,
        };
        out.u8(timed | arena);
        out.u64(self.entry.get());
        out.u64(self.frame.arena_len());
        out.u32(self.attachments);
        out.u64(self.tag.generation);
        out.u64(self.tag.seq);
        out.u64(self.timeout.map_or(0, nanos));
        out.finish()
    }

    /// Reads the header of a `RUN`, returning it and the rest of the message (the inline
    /// frame, empty when the frame is in the arena).
    ///
    /// # Errors
    /// When `message` is not a `RUN`, is shorter than the header (a missing entry offset is
    /// an error, never offset 0), or has unknown flags.
    pub fn decode(message: &[u8]) -> Result<(RunHeader, &[u8]), RemoteError> {
        let mut r = Reader::new(message, Kind::Run, RunHeader::LEN)?;
        let flags = r.flags(FLAG_TIMED | FLAG_ARENA)?;
        let entry = CodeOffset(r.u64());
        let arena_len = r.u64();
        let attachments = r.u32();
        let tag = FrameTag {
            generation: r.u64(),
            seq: r.u64(),
        };
        let timeout = Duration::from_nanos(r.u64());
        let frame = if flags & FLAG_ARENA != 0 {
            FrameAt::Arena { len: arena_len }
        } else {
            FrameAt::Inline
        };
        let header = RunHeader {
            tag,
            timeout: (flags & FLAG_TIMED != 0).then_some(timeout),
            entry,
            frame,
            attachments,
        };
        Ok((header, r.rest()))
    }
}

/// The header of a `DONE`: which frame it answers, the time the frame took, where its outcomes
/// are, and which task (if any) overran the frame's timeout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneHeader {
    /// The tag of the `RUN` this answers.
    pub tag: FrameTag,
    /// Time spent running the frame's tasks in the worker.
    pub busy: Duration,
    /// Where the outcomes are.
    pub outcomes: FrameAt,
    /// The outcomes are in a new arena, replacing the previous one, sent alongside.
    pub new_arena: bool,
    /// In a timed frame, the position (in the frame) of the first task whose run time in the
    /// worker exceeded the `RUN`'s timeout, although it finished before the driver killed it.
    pub overrun: Option<u32>,
}

impl DoneHeader {
    /// Length of the header; inline outcomes follow it.
    pub const LEN: usize = 38;

    /// The header's bytes. The busy time saturates at `u64::MAX` nanoseconds.
    pub fn encode(&self) -> [u8; DoneHeader::LEN] {
        let mut out = Writer::new(Kind::Done);
        let arena = match self.outcomes {
            FrameAt::Inline => 0,
            FrameAt::Arena { .. } if self.new_arena => FLAG_ARENA | FLAG_NEW_ARENA,
            FrameAt::Arena { .. } => FLAG_ARENA,
        };
        let overrun = if self.overrun.is_some() {
            FLAG_OVERRUN
        } else {
            0
        };
        out.u8(arena | overrun);
        out.u64(nanos(self.busy));
        out.u64(self.outcomes.arena_len());
        out.u64(self.tag.generation);
        out.u64(self.tag.seq);
        out.u32(self.overrun.unwrap_or(0));
        out.finish()
    }

    /// Reads the header of a `DONE`, returning it and the rest of the message (the inline
    /// outcomes, empty when they are in the arena).
    ///
    /// # Errors
    /// When `message` is not a `DONE`, is shorter than the header, has unknown flags, or
    /// announces a new arena for inline outcomes.
    pub fn decode(message: &[u8]) -> Result<(DoneHeader, &[u8]), RemoteError> {
        let mut r = Reader::new(message, Kind::Done, DoneHeader::LEN)?;
        let flags = r.flags(FLAG_ARENA | FLAG_NEW_ARENA | FLAG_OVERRUN)?;
        let busy = Duration::from_nanos(r.u64());
        let arena_len = r.u64();
        let tag = FrameTag {
            generation: r.u64(),
            seq: r.u64(),
        };
        let overrun = r.u32();
        let outcomes = if flags & FLAG_ARENA != 0 {
            FrameAt::Arena { len: arena_len }
        } else if flags & FLAG_NEW_ARENA != 0 {
            return Err(r.malformed("a new arena announced for inline outcomes".into()));
        } else {
            FrameAt::Inline
        };
        let header = DoneHeader {
            tag,
            busy,
            outcomes,
            new_arena: flags & FLAG_NEW_ARENA != 0,
            overrun: (flags & FLAG_OVERRUN != 0).then_some(overrun),
        };
        Ok((header, r.rest()))
    }
}

/// A duration in nanoseconds, saturating at `u64::MAX`.
fn nanos(duration: Duration) -> u64 {
    u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX)
}

/// The worker's answer to a [`Welcome`] whose initializer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitFailed {
    /// Why, in a sentence the driver reports as it is.
    pub reason: String,
}

impl InitFailed {
    /// The longest reason a worker sends, in bytes (a longer one is cut at a character
    /// boundary): the driver refuses longer messages from a worker before the first frame.
    pub const MAX_REASON: usize = 16 << 10;

    /// The message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(1 + self.reason.len());
        out.push(Kind::InitFailed.byte());
        out.extend_from_slice(self.reason.as_bytes());
        out
    }

    /// Reads the message; bytes that are not UTF-8 are replaced.
    ///
    /// # Errors
    /// When `message` is not an `INIT_FAILED`.
    pub fn decode(message: &[u8]) -> Result<InitFailed, RemoteError> {
        let r = Reader::new(message, Kind::InitFailed, 1)?;
        Ok(InitFailed {
            reason: String::from_utf8_lossy(r.rest()).into_owned(),
        })
    }
}

/// Builds a fixed-size message field by field.
struct Writer<const N: usize> {
    bytes: [u8; N],
    at: usize,
}

impl<const N: usize> Writer<N> {
    fn new(kind: Kind) -> Self {
        let mut w = Writer {
            bytes: [0; N],
            at: 0,
        };
        w.u8(kind.byte());
        w
    }
    fn put(&mut self, field: &[u8]) {
        self.bytes[self.at..self.at + field.len()].copy_from_slice(field);
        self.at += field.len();
    }
    fn u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    fn u32(&mut self, v: u32) {
        self.put(&v.to_le_bytes());
    }
    fn u64(&mut self, v: u64) {
        self.put(&v.to_le_bytes());
    }
    fn finish(self) -> [u8; N] {
        debug_assert_eq!(self.at, N, "a header's fields fill its length");
        self.bytes
    }
}

/// Reads a message whose kind and minimum length were checked up front, so that reading its
/// fixed fields cannot fail.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
    message: &'static str,
}

impl<'a> Reader<'a> {
    /// A reader past the kind byte of `message`, which must be of `kind` and at least `len`
    /// bytes long.
    fn new(message: &'a [u8], kind: Kind, len: usize) -> Result<Reader<'a>, RemoteError> {
        let found = message.first().copied();
        if found != Some(kind.byte()) {
            return Err(RemoteError::UnexpectedKind {
                expected: kind.name(),
                found,
            });
        }
        Reader::fields(message, kind.name(), len).map(|mut r| {
            r.at = 1;
            r
        })
    }

    /// A reader at the start of `bytes`, which must be at least `len` bytes long.
    pub(crate) fn fields(
        bytes: &'a [u8],
        message: &'static str,
        len: usize,
    ) -> Result<Reader<'a>, RemoteError> {
        if bytes.len() < len {
            return Err(RemoteError::Truncated {
                message,
                needed: len,
                len: bytes.len(),
            });
        }
        Ok(Reader {
            bytes,
            at: 0,
            message,
        })
    }

    fn take<const K: usize>(&mut self) -> [u8; K] {
        let mut field = [0; K];
        // Fixed fields lie within the length checked when the reader was made; were one past
        // it (a layout bug), it would read as zeros rather than panic.
        if let Some(bytes) = self.bytes.get(self.at..self.at + K) {
            field.copy_from_slice(bytes);
        }
        self.at += K;
        field
    }

    /// Checks that `n` more bytes are there (for variable-length fields).
    pub(crate) fn need(&self, n: usize) -> Result<(), RemoteError> {
        let needed = self.at.saturating_add(n);
        if needed > self.bytes.len() {
            return Err(RemoteError::Truncated {
                message: self.message,
                needed,
                len: self.bytes.len(),
            });
        }
        Ok(())
    }

    pub(crate) fn u8(&mut self) -> u8 {
        self.take::<1>()[0]
    }
    pub(crate) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }
    pub(crate) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    /// A flags byte, refusing bits outside `known`.
    fn flags(&mut self, known: u8) -> Result<u8, RemoteError> {
        let flags = self.u8();
        if flags & !known != 0 {
            return Err(self.malformed(format!("unknown flags {flags:#04x}")));
        }
        Ok(flags)
    }

    /// The next `n` bytes (checked with [`Reader::need`] first).
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], RemoteError> {
        self.need(n)?;
        let field = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(field)
    }

    /// Everything after the fields read so far.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.at..).unwrap_or_default()
    }

    pub(crate) fn malformed(&self, reason: String) -> RemoteError {
        RemoteError::Malformed {
            message: self.message,
            reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn offset(n: u64) -> CodeOffset {
        CodeOffset(n)
    }

    /// A `DONE` of inline outcomes with no overrun.
    fn done() -> DoneHeader {
        DoneHeader {
            tag: FrameTag::default(),
            busy: Duration::ZERO,
            outcomes: FrameAt::Inline,
            new_arena: false,
            overrun: None,
        }
    }

    #[test]
    fn a_run_header_survives_the_round_trip_with_its_inline_frame() {
        for header in [
            RunHeader {
                tag: FrameTag::default(),
                timeout: None,
                entry: offset(0x1234),
                frame: FrameAt::Inline,
                attachments: 0,
            },
            RunHeader {
                tag: FrameTag {
                    generation: 3,
                    seq: u64::MAX,
                },
                timeout: Some(Duration::from_millis(250)),
                entry: offset(u64::MAX),
                frame: FrameAt::Arena { len: 5 << 30 },
                attachments: 2000,
            },
        ] {
            let mut message = header.encode().to_vec();
            message.extend_from_slice(b"frame");
            let (back, rest) = RunHeader::decode(&message).unwrap();
            assert_eq!(back, header);
            assert_eq!(rest, b"frame");
        }
    }

    #[test]
    fn a_done_header_survives_the_round_trip() {
        for header in [
            DoneHeader {
                busy: Duration::from_nanos(17),
                ..done()
            },
            DoneHeader {
                tag: FrameTag {
                    generation: 7,
                    seq: 1 << 40,
                },
                busy: Duration::from_secs(3),
                outcomes: FrameAt::Arena { len: 1 << 21 },
                new_arena: true,
                overrun: Some(0),
            },
            DoneHeader {
                outcomes: FrameAt::Arena { len: 1 },
                overrun: Some(u32::MAX),
                ..done()
            },
        ] {
            let message = header.encode();
            let (back, rest) = DoneHeader::decode(&message).unwrap();
            assert_eq!(back, header);
            assert!(rest.is_empty());
        }
    }

    #[test]
    fn a_welcome_and_an_init_failure_survive_the_round_trip() {
        for welcome in [
            Welcome {
                max_nbytes: 1 << 20,
                initializer: None,
                with_args: None,
                proof: Nonce::from_bytes([7; 16]),
            },
            Welcome {
                max_nbytes: u64::MAX,
                initializer: Some(offset(0x42)),
                with_args: None,
                proof: Nonce::from_bytes(*b"0123456789abcdef"),
            },
            Welcome {
                max_nbytes: 7,
                initializer: Some(offset(0x42)),
                with_args: Some(InitArgs {
                    function: offset(0x99),
                    args: b"arguments".to_vec(),
                }),
                proof: Nonce::from_bytes([3; 16]),
            },
        ] {
            let back = Welcome::decode(&welcome.encode()).unwrap();
            assert_eq!(back, welcome);
            assert_eq!(back.proof.to_bytes(), welcome.proof.to_bytes());
        }
        let failed = InitFailed {
            reason: "the initializer panicked: no model".into(),
        };
        assert_eq!(InitFailed::decode(&failed.encode()), Ok(failed));
    }

    #[test]
    fn a_welcome_without_the_workers_secret_is_refused() {
        let secret = Nonce::from_bytes([0x5a; 16]);
        let welcome = Welcome {
            max_nbytes: 1,
            initializer: Some(offset(0x42)),
            with_args: None,
            proof: secret,
        };
        assert_eq!(welcome.check(&secret), Ok(()));
        let mut other = [0x5a; 16];
        other[15] ^= 1;
        assert_eq!(
            welcome.check(&Nonce::from_bytes(other)),
            Err(RemoteError::WrongSecret { message: "WELCOME" })
        );
        // The welcome of the layout before the proof (18 bytes) is too short, not a zero proof.
        assert!(matches!(
            Welcome::decode(&welcome.encode()[..18]),
            Err(RemoteError::Truncated { .. })
        ));
    }

    #[test]
    fn the_busy_time_saturates_instead_of_wrapping() {
        let header = DoneHeader {
            busy: Duration::MAX,
            ..done()
        };
        let (back, _) = DoneHeader::decode(&header.encode()).unwrap();
        assert_eq!(back.busy, Duration::from_nanos(u64::MAX));
    }

    #[test]
    fn a_short_header_is_an_error_never_a_zero_offset() {
        let run = RunHeader {
            tag: FrameTag::default(),
            timeout: None,
            entry: offset(0x99),
            frame: FrameAt::Inline,
            attachments: 0,
        }
        .encode();
        for len in 1..RunHeader::LEN {
            let err = RunHeader::decode(&run[..len]).unwrap_err();
            assert_eq!(
                err,
                RemoteError::Truncated {
                    message: "RUN",
                    needed: RunHeader::LEN,
                    len
                }
            );
        }
        let welcome = Welcome {
            max_nbytes: 1,
            initializer: Some(offset(7)),
            with_args: None,
            proof: Nonce::from_bytes([1; 16]),
        }
        .encode();
        for len in 1..Welcome::LEN {
            assert!(matches!(
                Welcome::decode(&welcome[..len]),
                Err(RemoteError::Truncated { .. })
            ));
        }
        let done = done().encode();
        for len in 1..DoneHeader::LEN {
            assert!(matches!(
                DoneHeader::decode(&done[..len]),
                Err(RemoteError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn a_message_of_another_kind_is_refused() {
        let done = done().encode();
        assert_eq!(
            RunHeader::decode(&done).unwrap_err(),
            RemoteError::UnexpectedKind {
                expected: "RUN",
                found: Some(6)
            }
        );
        assert_eq!(
            DoneHeader::decode(&[]).unwrap_err(),
            RemoteError::UnexpectedKind {
                expected: "DONE",
                found: None
            }
        );
        assert!(InitFailed::decode(&[Kind::Ready.byte()]).is_err());
    }

    #[test]
    fn unknown_flags_and_impossible_combinations_are_malformed() {
        let mut run = RunHeader {
            tag: FrameTag::default(),
            timeout: Some(Duration::ZERO),
            entry: offset(1),
            frame: FrameAt::Inline,
            attachments: 0,
        }
        .encode();
        run[1] |= 0x80;
        let err = RunHeader::decode(&run).unwrap_err();
        assert!(matches!(err, RemoteError::Malformed { message: "RUN", .. }));
        assert!(err.to_string().contains("unknown flags 0x81"), "{err}");

        let mut done = done().encode();
        done[1] = FLAG_NEW_ARENA;
        assert!(matches!(
            DoneHeader::decode(&done),
            Err(RemoteError::Malformed { .. })
        ));

        let mut welcome = Welcome {
            max_nbytes: 1,
            initializer: None,
            with_args: None,
            proof: Nonce::from_bytes([1; 16]),
        }
        .encode();
        welcome[9] = 3;
        assert!(matches!(
            Welcome::decode(&welcome),
            Err(RemoteError::Malformed { .. })
        ));
        // With arguments, but no function offset after the fixed fields: short, not zero.
        welcome[9] = 2;
        assert!(matches!(
            Welcome::decode(&welcome),
            Err(RemoteError::Truncated { .. })
        ));
    }

    #[test]
    fn kinds_are_read_from_the_first_byte_and_backends_own_the_upper_ones() {
        for kind in [
            Kind::Welcome,
            Kind::Run,
            Kind::Shutdown,
            Kind::Ready,
            Kind::InitFailed,
            Kind::Done,
            Kind::Backend(Kind::FIRST_BACKEND),
            Kind::Backend(255),
        ] {
            assert_eq!(Kind::of(&[kind.byte(), 9, 9]), Ok(kind));
        }
        assert!(Kind::of(&[]).is_err());
        assert!(Kind::of(&[0]).is_err());
        assert!(Kind::of(&[7]).is_err());
        assert!(Kind::of(&[Kind::FIRST_BACKEND - 1]).is_err());
    }
}
