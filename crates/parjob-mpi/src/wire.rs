//! The backend's own messages between rank 0 and a rank server, and their layout. The frames
//! inside `RUN` and `DONE` are parjob-core's, behind parjob-remote's headers; every integer is
//! little-endian. Decoders return `None` on anything short or malformed, never panic.
//!
//! | MPI tag | direction | layout |
//! | --- | --- | --- |
//! | `HELLO` | rank to 0 | `[identity len u32][Identity][host len u32][host][local workers u32][error len u32][error]` |
//! | `WELCOME` | 0 to rank | `[accepted u8][rank 0 pid u32][host len u32][host][bells len u32][bells]`: 1 = same build, frames will follow; `bells`: for a rank on rank 0's host, `[dir len u32][dir][dev u64][ino u64][dev u64][ino u64]` (the doorbells' directory, and the identities of the rank's FIFO and of rank 0's; see `world/bell.rs`), else empty |
//! | `SEGMENT` | 0 to rank | `[segment id u64]`: a `SharedSlice`'s segment, sent before the first `RUN` that names it on this rank; its bytes follow at once as `SEGMENT_BYTES` (MPI keeps one sender's messages in order) |
//! | `SEGMENT_BYTES` | 0 to rank | the bytes of the segment the `SEGMENT` before it named, sent from the segment's own memory (no copy on rank 0) |
//! | `FORGET` | 0 to rank | `[segment id u64]...`: segments the driver dropped; the rank lets go of them (its local workers unmap them once no job holds them) |
//! | `POOL` | 0 to rank | `[pool u64][Welcome]`: start local pool `pool`, whose workers run the initializer parjob-remote's `Welcome` names (its proof unused) |
//! | `POOL_END` | 0 to rank | `[pool u64]`: stop local pool `pool` (its `MpiPool` was dropped) |
//! | `RUN` | 0 to rank | `[tasks frame][segment id u64 × attachments][pool u64][first index u64][RunHeader]`: the fixed-size trailer last, so the rank hands the received buffer itself, cut short, to its local pool (`pool`, 0 for the one it starts with); the header's `attachments` counts the ids of the segments the frame's handles name |
//! | `UNREADABLE_RUN` | rank to 0 | `[id of the last RUN it could read u64][len u32][why]`: a `RUN` whose trailer it could not read (so not its id either); rank 0 fails the first job it sent that rank after that id |
//! | `DONE` | rank to 0 | `[DoneHeader][local worker u32][held nanos u64]` then entries: `[0][count u32][len u32][outcome records]` or `[1][failure]`; the local worker is `u32::MAX` when the local pool did not say; held: how long the frame was on the rank, from its `RUN` to this `DONE` |
//! | `STOP` | 0 to rank | `[finalize u8]`: stop the local pool, answer `BYE`, then `MPI_Finalize` (1) or `_exit` (0, after a loss) |
//! | `BYE` | rank to 0 | empty |
//! | `BEAT` | either way | every `BEAT_EVERY`: the sender is alive (rank 0 beats once the handshake is over); rank 0's are empty, a rank's are `[rings u8]`: 1 while it rings rank 0's doorbell for every message (one is sent at once when it starts to) |
//!
//! A failure is `[kind u8][task index u64]` then: 1 panicked `[len u32][message]`; 2 local
//! worker crashed `[worker u32][pid u32][status u8][code i32][len u32][text]` (status 0 exited
//! with code, 1 signal code, 2 lost with text); 3 timeout `[nanos u64][killed u8]`; 4 cancelled;
//! 5 anything else `[len u32][its text]`.

use std::time::Duration;

use parjob_core::{Error, WorkerExit};

pub(crate) const TAG_HELLO: i32 = 1;
pub(crate) const TAG_WELCOME: i32 = 2;
pub(crate) const TAG_RUN: i32 = 3;
pub(crate) const TAG_DONE: i32 = 4;
pub(crate) const TAG_STOP: i32 = 5;
pub(crate) const TAG_BYE: i32 = 6;
pub(crate) const TAG_BEAT: i32 = 7;
pub(crate) const TAG_SEGMENT: i32 = 8;
pub(crate) const TAG_FORGET: i32 = 9;
pub(crate) const TAG_POOL: i32 = 10;
pub(crate) const TAG_POOL_END: i32 = 11;
pub(crate) const TAG_UNREADABLE_RUN: i32 = 12;
pub(crate) const TAG_SEGMENT_BYTES: i32 = 13;

/// A `DONE`'s local worker when the rank's pool did not say which worker ran the frame.
pub(crate) const NO_WORKER: u32 = u32::MAX;

/// How often a rank server says it is alive.
pub(crate) const BEAT_EVERY: Duration = Duration::from_millis(250);

/// The protocol version a rank states in its `Identity`.
pub(crate) const PROTOCOL: u32 = 7;

/// parjob-core's outcome record tag for a task that panicked (see `parjob_remote::header`).
pub(crate) const RECORD_PANICKED: u8 = 1;

pub(crate) fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

pub(crate) fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    put_u32(out, len);
    out.extend_from_slice(&bytes[..len as usize]);
}

/// Reads fields off the front of a message.
pub(crate) struct Reader<'a>(pub(crate) &'a [u8]);

impl<'a> Reader<'a> {
    pub(crate) fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    pub(crate) fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|b| b[0])
    }
    pub(crate) fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    pub(crate) fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    pub(crate) fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        self.take(len)
    }
    pub(crate) fn text(&mut self) -> Option<String> {
        Some(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
}

/// A rank's `HELLO`.
#[derive(Debug)]
pub(crate) struct Hello {
    pub(crate) identity: Vec<u8>,
    pub(crate) host: String,
    pub(crate) workers: u32,
    /// Why the rank cannot work (its local pool did not start), or empty.
    pub(crate) error: String,
}

impl Hello {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        put_bytes(&mut out, &self.identity);
        put_bytes(&mut out, self.host.as_bytes());
        put_u32(&mut out, self.workers);
        put_bytes(&mut out, self.error.as_bytes());
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Hello> {
        let mut r = Reader(bytes);
        Some(Hello {
            identity: r.bytes()?.to_vec(),
            host: r.text()?,
            workers: r.u32()?,
            error: r.text()?,
        })
    }
}

/// Appends one failure of a `DONE` entry.
pub(crate) fn put_failure(out: &mut Vec<u8>, error: &Error) {
    out.push(1);
    let index = error.task_index().unwrap_or(0) as u64;
    match error {
        Error::TaskPanicked {
            message,
            worker,
            pid,
            ..
        } => {
            out.push(1);
            put_u64(out, index);
            put_bytes(out, message.as_bytes());
            put_place(out, *worker, *pid);
        }
        Error::WorkerCrashed {
            worker,
            pid,
            status,
            last_words,
            ..
        } => {
            out.push(2);
            put_u64(out, index);
            put_u32(out, u32::try_from(*worker).unwrap_or(u32::MAX));
            put_u32(out, *pid);
            // The text: the status's for `Lost`, else the worker's last words (empty: none).
            let said = last_words.as_deref().unwrap_or_default();
            let (kind, code, text) = match status {
                WorkerExit::Exited(code) => (0u8, *code, said),
                WorkerExit::Signaled(signal) => (1, *signal, said),
                WorkerExit::Lost(text) => (2, 0, text.as_str()),
                _ => (2, 0, "ended in a way this version cannot say"),
            };
            out.push(kind);
            out.extend_from_slice(&code.to_le_bytes());
            put_bytes(out, text.as_bytes());
        }
        Error::Timeout {
            after,
            killed,
            worker,
            pid,
            returned_after,
            ..
        } => {
            out.push(3);
            put_u64(out, index);
            put_u64(out, nanos(*after));
            out.push(u8::from(*killed));
            put_place(out, *worker, *pid);
            // `u64::MAX`: not known.
            put_u64(
                out,
                returned_after.map_or(u64::MAX, |d| nanos(d).min(u64::MAX - 1)),
            );
        }
        Error::Cancelled { .. } => {
            out.push(4);
            put_u64(out, index);
        }
        other => {
            out.push(5);
            put_u64(out, index);
            put_bytes(out, other.to_string().as_bytes());
        }
    }
}

/// Appends where a task ran: its local worker's index and pid, `u32::MAX` for not known.
fn put_place(out: &mut Vec<u8>, worker: Option<usize>, pid: Option<u32>) {
    let worker = worker.map_or(u32::MAX, |w| u32::try_from(w).unwrap_or(u32::MAX - 1));
    put_u32(out, worker);
    put_u32(out, pid.unwrap_or(u32::MAX));
}

/// Reads what [`put_place`] wrote.
fn read_place(r: &mut Reader<'_>) -> Option<(Option<usize>, Option<u32>)> {
    let known = |v: u32| (v != u32::MAX).then_some(v);
    let worker = known(r.u32()?).map(|w| w as usize);
    Some((worker, known(r.u32()?)))
}

/// A duration in nanoseconds, `u64::MAX` past 584 years.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Reads a failure `put_failure` wrote (after its entry byte), as the error it was on the
/// rank; `None` when malformed.
pub(crate) fn read_failure(r: &mut Reader<'_>) -> Option<Error> {
    let kind = r.u8()?;
    let index = usize::try_from(r.u64()?).ok()?;
    Some(match kind {
        1 => {
            let message = r.text()?;
            let (worker, pid) = read_place(r)?;
            Error::task_panicked_on(index, message, worker, pid)
        }
        2 => {
            let worker = r.u32()? as usize;
            let pid = r.u32()?;
            let status_kind = r.u8()?;
            let code = i32::from_le_bytes(r.take(4)?.try_into().ok()?);
            let text = r.text()?;
            let (status, said) = match status_kind {
                0 => (WorkerExit::Exited(code), Some(text)),
                1 => (WorkerExit::Signaled(code), Some(text)),
                _ => (WorkerExit::Lost(text), None),
            };
            let said = said.filter(|said| !said.is_empty());
            Error::worker_crashed(index, worker, pid, status).with_last_words(said)
        }
        3 => {
            let after = Duration::from_nanos(r.u64()?);
            let killed = r.u8()? != 0;
            let (worker, pid) = read_place(r)?;
            let returned_after = Some(r.u64()?).filter(|&n| n != u64::MAX);
            match (worker, pid, returned_after) {
                (Some(worker), Some(pid), None) if killed => {
                    Error::timeout_killing(index, after, worker, pid)
                }
                (_, _, Some(ran)) if !killed => {
                    Error::timeout_on_return(index, after, Duration::from_nanos(ran))
                }
                _ => Error::timeout(index, after, killed),
            }
        }
        4 => Error::cancelled(index),
        // Its words, as the rank wrote them (they name the task).
        5 => Error::remote(index, r.text()?),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_round_trip() {
        for error in [
            Error::task_panicked(3, "boom"),
            Error::task_panicked_on(3, "boom (at src/main.rs:4:5)", Some(1), Some(4242)),
            Error::task_panicked_on(3, "boom", Some(0), None),
            Error::worker_crashed(4, 1, 77, WorkerExit::Signaled(6)),
            Error::worker_crashed(5, 0, 78, WorkerExit::Exited(3)),
            Error::worker_crashed(5, 0, 78, WorkerExit::Signaled(6))
                .with_last_words(Some("thread 'main' has overflowed its stack".into())),
            Error::timeout(6, Duration::from_millis(200), true),
            Error::timeout_killing(6, Duration::from_millis(200), 1, 4242),
            Error::timeout_on_return(6, Duration::from_millis(5), Duration::from_millis(9)),
            Error::timeout(6, Duration::from_millis(200), false),
            Error::cancelled(7),
            Error::remote(8, "task 8: its local pool 1 is not on this rank"),
        ] {
            let mut out = Vec::new();
            put_failure(&mut out, &error);
            let mut r = Reader(&out[1..]);
            assert_eq!(read_failure(&mut r), Some(error));
            assert!(r.0.is_empty());
        }
        // Other errors travel as their text, which names the task: no prefix is added.
        let codec = Error::codec(9, "decode", "u64", "too short");
        let mut out = Vec::new();
        put_failure(&mut out, &codec);
        let back = read_failure(&mut Reader(&out[1..])).unwrap();
        assert_eq!(back.to_string(), codec.to_string());
        assert_eq!(back.task_index(), Some(9));
    }

    #[test]
    fn short_messages_are_refused() {
        let hello = Hello {
            identity: vec![1, 2, 3],
            host: "h".into(),
            workers: 2,
            error: String::new(),
        }
        .encode();
        assert!(Hello::decode(&hello).is_some());
        for cut in 0..hello.len() {
            assert!(Hello::decode(&hello[..cut]).is_none(), "cut at {cut}");
        }
        let mut out = Vec::new();
        put_failure(&mut out, &Error::timeout(1, Duration::from_secs(1), true));
        for cut in 1..out.len() {
            assert!(read_failure(&mut Reader(&out[1..cut])).is_none());
        }
    }
}
