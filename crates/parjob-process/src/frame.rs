//! Frames as this backend moves them: a `RUN` carries its tasks inline or in the task arena,
//! a `DONE` its outcomes inline or in the result arena, and whatever shared memory a frame
//! needs travels as shipments after its `RUN`. Both sides' halves are here; the headers are
//! parjob-remote's.
//!
//! Turns on the arenas: the driver writes the task arena only before it sends a `RUN` while no
//! other frame is out (a frame sent while another runs is always inline), and the worker reads
//! it only between that `RUN` and its `DONE`; the worker writes the result arena only before it
//! sends a `DONE`, and only once the board says the driver has read the outcomes the arena held
//! (otherwise the outcomes go to a new arena), and the driver reads it only between that `DONE`
//! and saying so. So the two processes never touch one arena at the same time.

use std::ops::Range;
use std::time::Duration;

use parjob_core::{ErasedBatch, collect_shared};
use parjob_remote::{CodeOffset, DoneHeader, FrameAt, FrameTag, RunHeader};

use crate::mapping::Arena;
use crate::shared::{Planned, ShmMemory, can_ship, spare_descriptors};
use crate::spawn::Worker;
use crate::wire::{ARENA_KEEP_MAX, Shipment};

/// Driver: encodes tasks `range` of `batch` into `buf` (cleared first, leaving room for the
/// `RUN` header), and plans the shipments the frame needs. This is the step that runs user
/// code (the arguments' `Serialize`), kept apart from the rest of the `RUN` so that a panic in
/// it is known to have touched nothing but `buf`.
pub(crate) fn encode_tasks(
    buf: &mut Vec<u8>,
    batch: &dyn ErasedBatch,
    range: Range<usize>,
    worker: &mut Worker,
) -> Vec<Planned> {
    buf.clear();
    buf.resize(RunHeader::LEN, 0);
    let ((), segments) = collect_shared(|| batch.encode_tasks(range.clone(), buf));
    let mut shipments = worker.segments.plan(segments);
    if !can_ship(&shipments) {
        // Out of file descriptors: send the slices' values instead of handles (slow, but the
        // tasks run).
        shipments.retain(|planned| matches!(planned, Planned::Ready(_)));
        buf.truncate(RunHeader::LEN);
        batch.encode_tasks(range, buf);
    }
    shipments
}

/// Driver: [`encode_tasks`] for a frame to send while another frame of the worker is out (see
/// `Supervisor::send_ahead`): `None`, with nothing planned, when the encoded tasks take more
/// than `limit` bytes or their shared segments cannot be shipped, so that the frame never goes
/// to the task arena (which the worker may be reading) and the worker's record of its segments
/// stays as it was.
pub(crate) fn encode_ahead(
    buf: &mut Vec<u8>,
    batch: &dyn ErasedBatch,
    range: Range<usize>,
    worker: &mut Worker,
    limit: usize,
) -> Option<Vec<Planned>> {
    buf.clear();
    buf.resize(RunHeader::LEN, 0);
    let ((), segments) = collect_shared(|| batch.encode_tasks(range, buf));
    if buf.len() - RunHeader::LEN > limit {
        return None;
    }
    let planned = segments
        .iter()
        .all(|s| s.memory().as_any().is::<ShmMemory>());
    if !planned || (!segments.is_empty() && !spare_descriptors(2)) {
        return None;
    }
    Some(worker.segments.plan(segments))
}

/// Driver: turns `buf` (as [`encode_tasks`] left it) into the `RUN` to send, moving a frame
/// over `max_nbytes` into the worker's task arena. Returns how many bytes of `buf` to send, the
/// shipments that follow them, and whether the frame is in the arena.
pub(crate) fn finish_run(
    buf: &mut [u8],
    tag: FrameTag,
    timeout: Option<Duration>,
    entry: CodeOffset,
    mut shipments: Vec<Planned>,
    worker: &mut Worker,
    max_nbytes: usize,
) -> (usize, Vec<Planned>, bool) {
    let len = buf.len() - RunHeader::LEN;
    let arena_fits = worker.task_arena.as_ref().is_some_and(|a| a.len() >= len);
    // A new arena needs two spare file descriptors (ipc-channel panics without them); with
    // none, the big frame goes over the socket, slower but whole.
    let in_arena = len > max_nbytes && (arena_fits || spare_descriptors(2));
    if in_arena {
        let frame = &buf[RunHeader::LEN..];
        let written = match worker.task_arena.as_mut().filter(|a| a.len() >= len) {
            // SAFETY: the driver's turn: the worker reads its task arena only between a RUN
            // and its DONE, this RUN is not sent yet, and no other frame is out (the previous
            // DONE came back; a frame sent ahead is never in the arena, see `ahead_fits`).
            Some(arena) => unsafe { arena.write(frame) },
            None => false,
        };
        if !written {
            let (arena, handle) = Arena::from_bytes(frame);
            shipments.push(Planned::Ready(Shipment::Arena(handle)));
            worker.task_arena = (len <= ARENA_KEEP_MAX).then_some(arena);
        }
    }
    let header = RunHeader {
        tag,
        timeout,
        entry,
        frame: if in_arena {
            FrameAt::Arena { len: len as u64 }
        } else {
            FrameAt::Inline
        },
        // Each shipment carries a file descriptor, so a frame's count is bounded by the
        // process's descriptor limit, far below u32::MAX.
        attachments: u32::try_from(shipments.len()).unwrap_or(u32::MAX),
    };
    buf[..RunHeader::LEN].copy_from_slice(&header.encode());
    let send = if in_arena { RunHeader::LEN } else { buf.len() };
    (send, shipments, in_arena)
}

/// Driver: a `DONE` as it came back, with the result arena to keep for the worker: the one it
/// just announced, or the one it had (which holds the outcomes if they are in an arena).
pub(crate) struct Done {
    pub(crate) header: DoneHeader,
    pub(crate) bytes: Vec<u8>,
    pub(crate) arena: Option<Arena>,
}

impl Done {
    /// `header` is `bytes`'s, `new_arena` the arena the reply came with, `kept` the worker's
    /// previous one.
    pub(crate) fn new(
        header: DoneHeader,
        bytes: Vec<u8>,
        new_arena: Option<Arena>,
        kept: Option<Arena>,
    ) -> Done {
        let arena = if header.new_arena { new_arena } else { kept };
        Done {
            header,
            bytes,
            arena,
        }
    }
}

/// Driver: the outcomes a `DONE` (`message`) carries, inline or in `arena`.
///
/// # Errors
/// A message naming what is wrong with a malformed reply.
pub(crate) fn outcomes<'a>(
    message: &'a [u8],
    arena: Option<&'a Arena>,
) -> Result<&'a [u8], String> {
    let (header, inline) = DoneHeader::decode(message).map_err(|e| e.to_string())?;
    match header.outcomes {
        FrameAt::Inline => Ok(inline),
        FrameAt::Arena { len } => {
            let arena = arena.ok_or("announced outcomes in a result arena it never sent")?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            // SAFETY: the driver's turn: the worker wrote the arena before this DONE and
            // writes it again only once the board says these outcomes were read, which the
            // supervisor says after decoding them (the slice does not outlive the borrow of
            // the arena).
            unsafe { arena.read(len) }
                .ok_or_else(|| "announced more outcomes than its arena holds".into())
        }
    }
}

/// The length of the first `n` records of a frame of outcomes, `None` if it holds fewer. The
/// records are parjob-core's, `[tag u8][len u32 LE][payload]` (see `parjob_remote::header`):
/// only their lengths are read here, to keep the outcomes of the tasks before one that is to
/// be reported otherwise (it overran its timeout).
pub(crate) fn records_len(outcomes: &[u8], n: usize) -> Option<usize> {
    let mut at = 0usize;
    for _ in 0..n {
        let len: [u8; 4] = outcomes.get(at + 1..at + 5)?.try_into().ok()?;
        at = at
            .checked_add(5)?
            .checked_add(usize::try_from(u32::from_le_bytes(len)).ok()?)?;
        if at > outcomes.len() {
            return None;
        }
    }
    Some(at)
}

/// Worker: the frame a `RUN` carries, inline after its header or in the task arena.
///
/// # Errors
/// When the frame is said to be in an arena that was not sent, or is shorter than announced.
pub(crate) fn task_frame<'a>(
    header: &RunHeader,
    inline: &'a [u8],
    task_arena: Option<&'a Arena>,
) -> Result<&'a [u8], String> {
    match header.frame {
        FrameAt::Inline => Ok(inline),
        FrameAt::Arena { len } => {
            let arena = task_arena.ok_or("the driver announced a shared frame it did not send")?;
            let len = usize::try_from(len).unwrap_or(usize::MAX);
            // SAFETY: the worker's turn: the driver wrote the arena before this RUN and writes
            // it again only after this worker's DONE, which is sent once the frame has run
            // (the caller drops the slice before that).
            unsafe { arena.read(len) }.ok_or_else(|| {
                format!(
                    "the driver announced a shared frame of {len} bytes in an arena of {}",
                    arena.len()
                )
            })
        }
    }
}

/// Worker: turns `out` (room for a `DONE` header, then the outcomes) into the `DONE` to send
/// for the frame `tag`, moving outcomes over `max_nbytes` into the result arena, or into a new
/// one when they do not fit it. Returns how many bytes of `out` to send, and the new arena,
/// whose descriptor goes with them (the caller keeps it for the next frames, or not).
///
/// # Errors
/// When a new arena cannot be made (out of memory or descriptors).
pub(crate) fn finish_done(
    out: &mut [u8],
    tag: FrameTag,
    busy: Duration,
    overrun: Option<u32>,
    max_nbytes: usize,
    result_arena: &mut Option<Arena>,
) -> Result<(usize, Option<Arena>), String> {
    let outcomes = &out[DoneHeader::LEN..];
    let len = outcomes.len();
    let mut header = DoneHeader {
        tag,
        busy,
        outcomes: FrameAt::Inline,
        new_arena: false,
        overrun,
    };
    let mut new_arena = None;
    if len > max_nbytes {
        header.outcomes = FrameAt::Arena { len: len as u64 };
        let written = match result_arena.as_mut() {
            // SAFETY: the worker's turn: the driver reads the result arena only between a
            // DONE and saying on the board that it read it, and the caller passes the arena
            // only once the board says so for the last DONE that used it.
            Some(arena) => unsafe { arena.write(outcomes) },
            None => false,
        };
        if !written {
            header.new_arena = true;
            // The old one is of no more use, and the driver drops its mapping on this DONE.
            *result_arena = None;
            new_arena = Some(
                Arena::sealed_from_bytes(outcomes)
                    .map_err(|e| format!("cannot make shared memory for outcomes: {e}"))?,
            );
        }
    }
    out[..DoneHeader::LEN].copy_from_slice(&header.encode());
    let send = if header.outcomes == FrameAt::Inline {
        out.len()
    } else {
        DoneHeader::LEN
    };
    Ok((send, new_arena))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_outcomes_of_the_first_tasks_are_found_by_their_lengths() {
        let mut frame = Vec::new();
        for payload in [&b"ab"[..], b"", b"xyz"] {
            frame.push(1);
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            frame.extend_from_slice(payload);
        }
        assert_eq!(records_len(&frame, 0), Some(0));
        assert_eq!(records_len(&frame, 1), Some(7));
        assert_eq!(records_len(&frame, 2), Some(12));
        assert_eq!(records_len(&frame, 3), Some(frame.len()));
        assert_eq!(records_len(&frame, 4), None, "there are only three");
        assert_eq!(records_len(&frame[..10], 3), None, "a record cut short");
        let lying = [1, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(records_len(&lying, 1), None, "a length past the end");
    }
}
