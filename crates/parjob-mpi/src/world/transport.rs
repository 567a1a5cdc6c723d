//! Non-blocking sends and receives (no call ever waits on a rank that may be dead), idling
//! between polls, and this host's name and pids.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::ffi;
use mpi::raw::{AsRaw, AsRawMut};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Source;

use parjob_core::SharedSegment;

use super::silence_limit;

/// A non-blocking send in flight: its buffer lives until MPI says it went.
pub(super) struct PendingSend {
    pub(super) request: ffi::MPI_Request,
    pub(super) _buffer: SendBuffer,
    pub(super) rank: usize,
}

/// The bytes of a send: a message of its own, or a `SharedSlice`'s segment sent from its
/// memory (kept mapped by the `Arc` until the send is done).
pub(super) enum SendBuffer {
    Owned(Vec<u8>),
    Segment(Arc<SharedSegment>),
}

impl SendBuffer {
    pub(super) fn bytes(&self) -> &[u8] {
        match self {
            SendBuffer::Owned(bytes) => bytes,
            SendBuffer::Segment(segment) => segment.memory().bytes(),
        }
    }
}

impl From<Vec<u8>> for SendBuffer {
    fn from(bytes: Vec<u8>) -> SendBuffer {
        SendBuffer::Owned(bytes)
    }
}

/// The MPI count (an `int`) of a message of `len` bytes, or why it does not fit in one.
pub(super) fn message_count(len: usize) -> Result<i32, String> {
    i32::try_from(len).map_err(|_| format!("a message of {len} bytes is over MPI's 2 GiB"))
}

/// Starts a non-blocking send of `buffer` to `rank` with `tag`.
pub(super) fn isend(
    world: &SimpleCommunicator,
    rank: usize,
    tag: i32,
    buffer: impl Into<SendBuffer>,
) -> Result<PendingSend, String> {
    let buffer = buffer.into();
    let bytes = buffer.bytes();
    let len = message_count(bytes.len())?;
    let dest = i32::try_from(rank).map_err(|_| format!("no rank {rank}"))?;
    // SAFETY: reading an MPI constant the C shim defines.
    let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
    // SAFETY: `bytes` are `len` bytes that `buffer` owns (a vector, or a segment's mapping
    // its `Arc` keeps), kept unchanged (in the returned PendingSend, or leaked with it) until
    // MPI_Test says the send completed: MPI only reads them. The communicator is this world's,
    // used from this thread only.
    let code = unsafe {
        ffi::MPI_Isend(
            bytes.as_ptr().cast(),
            len,
            ffi::RSMPI_UINT8_T,
            dest,
            tag,
            world.as_raw(),
            &mut request,
        )
    };
    if code != 0 {
        return Err(format!("MPI_Isend to rank {rank} failed with code {code}"));
    }
    Ok(PendingSend {
        request,
        _buffer: buffer,
        rank,
    })
}

/// Drops the sends that completed; keeps the others.
pub(super) fn test_sends(sends: &mut Vec<PendingSend>) {
    sends.retain_mut(|send| {
        let mut flag = 0;
        // SAFETY: `request` came from MPI_Isend and was not completed yet.
        let code = unsafe { ffi::MPI_Test(&mut send.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        code == 0 && flag == 0
    });
}

/// The MPI tag `try_receive` reports for a message that began to arrive but stopped halfway
/// (its sender died mid-transfer): the caller treats the sender as lost.
pub(super) const TAG_BROKEN: i32 = -1;

/// The next message from anyone, if one has arrived: (source rank, tag, bytes).
///
/// The receive itself is non-blocking (`MPI_Imrecv`, then `MPI_Test` until it completes): a
/// big message whose sender dies mid-transfer would block `MPI_Mrecv` for ever. After
/// `receive_limit` (the silence limit, and more for a big message) it gives up, leaks the
/// buffer (MPI may still write it) and reports the message as `TAG_BROKEN`.
pub(super) fn try_receive(world: &SimpleCommunicator) -> Option<(usize, i32, Vec<u8>)> {
    let (mut message, status) = world.any_process().immediate_matched_probe()?;
    let from = usize::try_from(status.source_rank()).unwrap_or(usize::MAX);
    let count = status.count(u8::equivalent_datatype());
    let len = usize::try_from(count).unwrap_or(0);
    // Not zeroed first (a big frame's memset cost as much as its copy): MPI writes all `len`
    // bytes, and the length is set only once MPI_Test says it did.
    let mut buffer: Vec<u8> = Vec::with_capacity(len);
    // SAFETY: reading an MPI constant the C shim defines.
    let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
    // SAFETY: `buffer` holds `count` bytes and outlives the request (it is returned only once
    // MPI_Test says the receive completed, or leaked); `message` was matched by the probe, and
    // MPI_Imrecv sets it to MPI_MESSAGE_NULL, which is what dropping it expects.
    let code = unsafe {
        ffi::MPI_Imrecv(
            buffer.as_mut_ptr().cast(),
            count,
            ffi::RSMPI_UINT8_T,
            message.as_raw_mut(),
            &mut request,
        )
    };
    if code != 0 {
        std::mem::forget(message);
        std::mem::forget(buffer);
        return Some((from, TAG_BROKEN, Vec::new()));
    }
    let deadline = Instant::now() + receive_limit(len);
    loop {
        let mut flag = 0;
        // SAFETY: `request` came from MPI_Imrecv and has not completed yet.
        let code = unsafe { ffi::MPI_Test(&mut request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        if code == 0 && flag != 0 {
            // SAFETY: the receive completed: MPI wrote the `count` bytes it matched into the
            // first `len` bytes of the buffer's capacity.
            unsafe { buffer.set_len(len) };
            return Some((from, status.tag(), buffer));
        }
        if code != 0 || Instant::now() > deadline {
            std::mem::forget(buffer);
            return Some((from, TAG_BROKEN, Vec::new()));
        }
        std::thread::yield_now();
    }
}

/// The slowest rate a message is expected to arrive at, even with the sender serving other
/// big sends at the same time on a loaded machine: a message slower than this (after the
/// silence limit) is taken for one whose sender died mid-transfer.
const SLOWEST_BYTES_PER_SEC: u64 = 50_000_000;

/// How long receiving a message of `len` bytes may take before its sender is taken for lost:
/// the silence limit, plus the time `len` bytes take at [`SLOWEST_BYTES_PER_SEC`] (two 1.9 GiB
/// `SharedSlice`s sent to two ranks at once shared the sender and took longer than the silence
/// limit alone).
fn receive_limit(len: usize) -> Duration {
    silence_limit() + transfer_allowance(len as u64)
}

/// How long `bytes` may take to cross at [`SLOWEST_BYTES_PER_SEC`]: a rank busy receiving a
/// message that long says nothing meanwhile, and rank 0 adds this to its silence limit for a
/// rank it is still sending that many bytes to.
pub(super) fn transfer_allowance(bytes: u64) -> Duration {
    Duration::from_millis(bytes / (SLOWEST_BYTES_PER_SEC / 1000))
}

/// What an MPI thread with nothing to do waits for, which sets how often it polls MPI
/// ([`Backoff::pause`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Awaited {
    /// A message that starts work on an idle rank (a worker rank with no frame in its local
    /// pool waits for the next `RUN`): nothing runs here that polling could slow down, and the
    /// caller's next call waits on it, so it is polled for every 20 us until 20 ms.
    Start,
    /// An answer to work in progress, or a message that would join it (rank 0 with jobs out
    /// on a rank that has room for more; a worker rank whose local pool runs frames with none
    /// behind them): polled for every 20 us during the first millisecond, then every
    /// sixteenth of the wait so far (up to 500 us), so that a long task's answer is seen at
    /// most about 6% late and the workers keep the CPU (a 15 ms wait costs about 80 polls,
    /// not 750).
    Answer,
    /// A message that queued work hides (every busy rank holds a frame behind the running
    /// ones): every 300 us.
    Hidden,
}

/// Paces an MPI thread's polling when there is nothing to do, so that busy-polling ranks do
/// not starve the workers on an oversubscribed node: a message or a local completion that
/// comes soon after the last one is seen at once (it yields for 300 us), a later one as
/// [`Awaited`] says, and a rank idle for 20 ms polls about 2000 times a second.
pub(super) struct Backoff {
    pub(super) idle_since: Option<Instant>,
}

impl Backoff {
    pub(super) fn busy(&mut self) {
        self.idle_since = None;
    }

    /// Idles a little: yields right after work (the next message is most likely coming),
    /// otherwise returns how long the caller should wait, on a channel that wakes it earlier
    /// for work of its own (its local pool's outcomes, its commands).
    pub(super) fn pause(&mut self, awaited: Awaited) -> Option<Duration> {
        let idle = self.idle_since.get_or_insert_with(Instant::now).elapsed();
        let wait = Self::interval(idle, awaited);
        if wait.is_none() {
            std::thread::yield_now();
        }
        wait
    }

    /// How long to wait after `idle` without news; `None`: yield once and look again.
    fn interval(idle: Duration, awaited: Awaited) -> Option<Duration> {
        const POLL_FAST: Duration = Duration::from_micros(20);
        const POLL_SLOW: Duration = Duration::from_micros(500);
        if idle < Duration::from_micros(300) {
            None
        } else if idle >= Duration::from_millis(20) {
            Some(POLL_SLOW)
        } else {
            match awaited {
                Awaited::Start => Some(POLL_FAST),
                Awaited::Answer if idle < Duration::from_millis(1) => Some(POLL_FAST),
                // Polling every 20 us all through a CPU-bound task took a share of a core
                // from the workers: the seeds' CPU-bound halves over 2 ranks fell from
                // 1.5-1.8x to 0.8-1.4x the 1-rank time.
                Awaited::Answer => Some((idle / 16).clamp(POLL_FAST, POLL_SLOW)),
                Awaited::Hidden => Some(Duration::from_micros(300)),
            }
        }
    }
}

/// Makes this thread's short waits precise: Linux lets a sleep overrun by the thread's timer
/// slack, 50 us by default, which would triple the 20 us polling interval of [`Backoff`].
pub(super) fn tighten_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes a plain integer (nanoseconds) and changes only this
    // thread's timer slack.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 5_000 as libc::c_ulong, 0, 0, 0) };
}

/// Turns off Open MPI's yield in every progress call that finds nothing to do (what
/// `mpi_yield_when_idle` sets, and what Open MPI turns on by itself on an oversubscribed
/// node). parjob never waits inside MPI: its threads poll with non-blocking calls and idle
/// with their own waits ([`Backoff`]). A yield on each empty poll only puts the polling thread
/// behind every busy process of its core, up to a time slice, just when a message may be
/// arriving.
///
/// Open MPI 4 does not show that setting through MPI's tool interface (only the read-only
/// `mpi_yield_when_idle`), so this calls Open MPI's own `opal_progress_set_yield_when_idle`,
/// found by name in the process: other MPIs (MPICH) have no such function and are left as
/// they are. Call after `MPI_Init`, from the thread that makes every MPI call.
pub(super) fn no_yield_in_progress() {
    // SAFETY: dlsym with RTLD_DEFAULT only looks a NUL-terminated name up among the loaded
    // libraries.
    let found = unsafe {
        libc::dlsym(
            libc::RTLD_DEFAULT,
            c"opal_progress_set_yield_when_idle".as_ptr(),
        )
    };
    if found.is_null() {
        return;
    }
    // SAFETY: Open MPI's libopen-pal declares it `bool opal_progress_set_yield_when_idle(bool
    // yieldopt)` (it sets the flag its progress engine reads and returns the old one); C's
    // bool and Rust's have the same ABI. It is called after MPI_Init, on the thread that makes
    // this rank's MPI calls, as Open MPI's own MPI_Init calls it.
    let set: extern "C" fn(bool) -> bool =
        unsafe { std::mem::transmute::<*mut libc::c_void, extern "C" fn(bool) -> bool>(found) };
    set(false);
}

pub(super) fn host_name() -> String {
    mpi::environment::processor_name().unwrap_or_else(|_| "<unknown host>".into())
}

/// Whether process `pid` of this host is gone (or a zombie).
pub(super) fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn us(n: u64) -> Duration {
        Duration::from_micros(n)
    }

    #[test]
    fn a_big_message_may_take_a_second_per_50_mb_beyond_the_silence_limit() {
        assert_eq!(transfer_allowance(0), Duration::ZERO);
        assert_eq!(transfer_allowance(50_000_000), Duration::from_secs(1));
        // Two 1.9 GiB segments to two ranks at once shared rank 0's sends and outlasted the
        // silence limit alone.
        let two_gib = transfer_allowance(2 * 1024 * 1024 * 1024);
        assert!(two_gib > Duration::from_secs(40), "{two_gib:?}");
        assert_eq!(
            receive_limit(100_000_000),
            silence_limit() + Duration::from_secs(2)
        );
    }

    #[test]
    fn an_answer_is_polled_for_fast_for_a_millisecond_then_more_slowly_as_the_wait_grows() {
        use Awaited::*;
        assert_eq!(Backoff::interval(us(100), Answer), None);
        assert_eq!(Backoff::interval(us(400), Answer), Some(us(20)));
        assert_eq!(Backoff::interval(us(999), Answer), Some(us(20)));
        assert_eq!(Backoff::interval(us(1_600), Answer), Some(us(100)));
        assert_eq!(Backoff::interval(us(8_000), Answer), Some(us(500)));
        assert_eq!(Backoff::interval(us(15_000), Answer), Some(us(500)));
        // An idle rank stays quick to start the next call, queued work hides the rest.
        assert_eq!(Backoff::interval(us(15_000), Start), Some(us(20)));
        assert_eq!(Backoff::interval(us(400), Hidden), Some(us(300)));
        for awaited in [Start, Answer, Hidden] {
            assert_eq!(Backoff::interval(us(100), awaited), None);
            assert_eq!(Backoff::interval(us(30_000), awaited), Some(us(500)));
        }
    }

    #[test]
    fn an_answer_awaited_for_15_ms_costs_under_100_polls() {
        let mut idle = us(300);
        let mut polls = 0;
        while idle < Duration::from_millis(15) {
            idle += Backoff::interval(idle, Awaited::Answer).unwrap_or(us(1));
            polls += 1;
        }
        assert!(polls < 100, "{polls} polls");
    }
}
