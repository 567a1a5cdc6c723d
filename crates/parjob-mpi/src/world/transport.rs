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
use parjob_remote::DoneHeader;

use crate::wire::TAG_DONE;

use super::silence_limit;

/// A non-blocking send in flight: its buffer lives until MPI says it went.
pub(super) struct PendingSend {
    pub(super) request: ffi::MPI_Request,
    pub(super) _buffer: SendBuffer,
    pub(super) rank: usize,
    /// Whether the receiver is rung for this message (not for a beat).
    rings: bool,
    /// Whether the receiver is rung again when the send is done (see [`test_sends`]).
    ring_when_sent: bool,
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
    // A beat wakes nobody: it is noted on the receiver's next turn (within 5 ms).
    let ring = tag != crate::wire::TAG_BEAT;
    if ring {
        super::bell::ring(rank);
    }
    Ok(PendingSend {
        request,
        _buffer: buffer,
        rank,
        rings: ring,
        ring_when_sent: false,
    })
}

/// Drops the sends that completed; keeps the others. A receiver on a doorbell was rung when
/// its message went out; a message still going at its first test (a big one, which moves as
/// the receiver takes it) rings it again once it is sent.
pub(super) fn test_sends(sends: &mut Vec<PendingSend>) {
    sends.retain_mut(|send| {
        let mut flag = 0;
        // SAFETY: `request` came from MPI_Isend and was not completed yet.
        let code = unsafe { ffi::MPI_Test(&mut send.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        let pending = code == 0 && flag == 0;
        if pending {
            send.ring_when_sent = send.rings;
        } else if send.ring_when_sent {
            super::bell::ring(send.rank);
        }
        pending
    });
}

/// The MPI tag an [`Inbox`] reports for a message that began to arrive but stopped halfway
/// (its sender died mid-transfer): the caller treats the sender as lost.
pub(super) const TAG_BROKEN: i32 = -1;

/// Messages of this size or more are left to arrive while the loop goes on; smaller ones are
/// waited for (they take microseconds once their first bytes are here).
const ARRIVES_IN_THE_BACKGROUND: usize = 1 << 20;

/// How much of a big message's buffer is faulted in per turn of the loop, before MPI is asked
/// to receive into it: about 8 ms of page faults where a fresh page costs 4 us.
const FAULTED_PER_TURN: usize = 8 << 20;

/// What an [`Arrival`] is waiting for.
enum Stage {
    /// The buffer's pages are being faulted in, a slice per turn (`faulted` bytes so far): MPI
    /// is not receiving yet. On one node Open MPI copies a message into its buffer in a single
    /// `process_vm_readv`, inside whichever MPI call progresses it: into fresh memory that
    /// copy took 1.5 s for 1.5 GB, with no beat meanwhile; into faulted memory it is a plain
    /// copy (about 0.2 s).
    Faulting {
        message: mpi::point_to_point::Message,
        faulted: usize,
    },
    /// MPI may be writing into the buffer.
    Arriving(ffi::MPI_Request),
    /// Whole (or broken): the buffer is MPI's no more.
    Over,
}

/// A message matched by a probe: whole, or still arriving into its buffer (`MPI_Imrecv`, then
/// `MPI_Test` until it completes: a big message whose sender dies mid-transfer would block
/// `MPI_Mrecv` for ever).
pub(super) struct Arrival {
    from: usize,
    tag: i32,
    stage: Stage,
    buffer: Vec<u8>,
    len: usize,
    /// When a message still arriving is taken for broken (its sender died mid-transfer):
    /// `receive_limit` after MPI began to receive it (faulting its buffer in is this rank's
    /// own work, and waits its turn behind the sender's earlier messages).
    deadline: Instant,
    /// Tests only: the message is not handed over before then, as if it were still arriving.
    hold_until: Option<Instant>,
}

impl Arrival {
    /// Matches the next message from anyone, if one has arrived, and starts receiving it; a
    /// small one is received whole before this returns.
    fn start(world: &SimpleCommunicator) -> Option<Arrival> {
        let (message, status) = world.any_process().immediate_matched_probe()?;
        let from = usize::try_from(status.source_rank()).unwrap_or(usize::MAX);
        let count = status.count(u8::equivalent_datatype());
        let len = usize::try_from(count).unwrap_or(0);
        let mut arrival = Arrival {
            from,
            tag: status.tag(),
            stage: Stage::Faulting {
                message,
                faulted: 0,
            },
            // Not zeroed first (a big frame's memset cost as much as its copy): MPI writes all
            // `len` bytes, and the length is set only once MPI_Test says it did.
            buffer: Vec::with_capacity(len),
            len,
            deadline: Instant::now() + receive_limit(len),
            hold_until: None,
        };
        if len < ARRIVES_IN_THE_BACKGROUND {
            arrival.fault_in();
            while !arrival.test() {
                std::thread::yield_now();
            }
        }
        Some(arrival)
    }

    /// Faults in the next slice of the buffer; once all of it is, asks MPI to receive into it.
    fn fault_in(&mut self) {
        let Stage::Faulting { faulted, .. } = &mut self.stage else {
            return;
        };
        let end = (*faulted + FAULTED_PER_TURN).min(self.len);
        let base = self.buffer.as_mut_ptr();
        for at in (*faulted..end).step_by(4096) {
            // SAFETY: `at < len <= capacity`: a byte of the buffer's allocation, written
            // before MPI is given the buffer (MPI overwrites it).
            unsafe { base.add(at).write_volatile(0) };
        }
        *faulted = end;
        if end < self.len {
            return;
        }
        let Stage::Faulting { mut message, .. } = std::mem::replace(&mut self.stage, Stage::Over)
        else {
            return;
        };
        // SAFETY: reading an MPI constant the C shim defines.
        let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
        // SAFETY: `buffer` holds `len` bytes and outlives the request: the `Arrival` owns
        // both, hands the buffer out only once MPI_Test says the receive completed, and leaks
        // it otherwise (`test` past the deadline, `Drop`); `message` was matched by the probe,
        // and MPI_Imrecv sets it to MPI_MESSAGE_NULL, which is what dropping it expects. `len`
        // came from an MPI count (an `i32`).
        let code = unsafe {
            ffi::MPI_Imrecv(
                self.buffer.as_mut_ptr().cast(),
                i32::try_from(self.len).unwrap_or(i32::MAX),
                ffi::RSMPI_UINT8_T,
                message.as_raw_mut(),
                &mut request,
            )
        };
        if code == 0 {
            self.stage = Stage::Arriving(request);
            self.deadline = Instant::now() + receive_limit(self.len);
        } else {
            std::mem::forget(message);
            self.broken();
        }
    }

    /// Whether the message is whole (or broken: then its tag is `TAG_BROKEN`), and may be
    /// taken.
    fn test(&mut self) -> bool {
        if let Stage::Arriving(request) = &mut self.stage {
            let mut flag = 0;
            // SAFETY: `request` came from MPI_Imrecv and has not completed yet (the stage
            // moves on as soon as it does).
            let code = unsafe { ffi::MPI_Test(request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
            if code == 0 && flag != 0 {
                self.stage = Stage::Over;
                // SAFETY: the receive completed: MPI wrote the `len` bytes it matched into the
                // first `len` bytes of the buffer's capacity.
                unsafe { self.buffer.set_len(self.len) };
            } else if code != 0 || Instant::now() > self.deadline {
                self.broken();
            }
        }
        matches!(self.stage, Stage::Over)
            && self.hold_until.is_none_or(|until| Instant::now() >= until)
    }

    /// Gives up on the message: its buffer is leaked (MPI may still write into it), and it
    /// is reported as `TAG_BROKEN`.
    fn broken(&mut self) {
        if let Stage::Faulting { message, .. } = std::mem::replace(&mut self.stage, Stage::Over) {
            // Matched but never received: dropping it would assert.
            std::mem::forget(message);
        }
        std::mem::forget(std::mem::take(&mut self.buffer));
        self.tag = TAG_BROKEN;
    }

    /// (source rank, tag, bytes) of a message `test` found whole or broken.
    fn take(mut self) -> (usize, i32, Vec<u8>) {
        (self.from, self.tag, std::mem::take(&mut self.buffer))
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if !matches!(self.stage, Stage::Over) {
            // MPI may still write into the buffer (its sender is lost, or the process is
            // ending): never freed.
            self.broken();
        }
    }
}

/// The messages that arrived, handed over whole and in each sender's order, while big ones
/// arrive in the background: a loop that waited for a big message to arrive would neither
/// beat nor hear anyone else meanwhile (a 1.5 GB result took longer than a 1 s
/// `PARJOB_MPI_RANK_TIMEOUT`, and the other ranks left).
#[derive(Default)]
pub(super) struct Inbox {
    /// Per sender, its messages in the order MPI matched them, the first still arriving.
    queues: std::collections::BTreeMap<usize, std::collections::VecDeque<Arrival>>,
    /// Tests only: the `DONE` of this job is held for this long once it is whole.
    hold_done: Option<(u64, Duration)>,
}

impl Inbox {
    /// The next whole message, in its sender's order: (source rank, tag, bytes); `TAG_BROKEN`
    /// for one whose sender stopped halfway. `None` when nothing (more) is whole.
    pub(super) fn next(&mut self, world: &SimpleCommunicator) -> Option<(usize, i32, Vec<u8>)> {
        while let Some(mut arrival) = Arrival::start(world) {
            if !self.arriving_from(arrival.from)
                && arrival.test()
                && !hold(&mut self.hold_done, &mut arrival)
            {
                return Some(arrival.take());
            }
            self.queues
                .entry(arrival.from)
                .or_default()
                .push_back(arrival);
        }
        let Inbox { queues, hold_done } = self;
        let from = queues.iter_mut().find_map(|(from, queue)| {
            let front = queue.front_mut()?;
            (front.test() && !hold(hold_done, front)).then_some(*from)
        })?;
        let queue = queues.get_mut(&from)?;
        let arrival = queue.pop_front()?;
        if queue.is_empty() {
            queues.remove(&from);
        }
        Some(arrival.take())
    }

    /// Faults in one slice of the first big message waiting for it (one per turn of the
    /// caller's loop, whatever the number of messages arriving, so that a turn stays short:
    /// several big results at once, each faulted a slice per call of `next`, kept rank 0 from
    /// beating for over a second).
    pub(super) fn progress(&mut self) {
        if let Some(arrival) = self
            .queues
            .values_mut()
            .filter_map(|queue| queue.front_mut())
            .find(|arrival| matches!(arrival.stage, Stage::Faulting { .. }))
        {
            arrival.fault_in();
        }
    }

    /// Whether a message from `rank` is still arriving (the rank is busy sending it).
    pub(super) fn arriving_from(&self, rank: usize) -> bool {
        self.queues
            .get(&rank)
            .is_some_and(|queue| !queue.is_empty())
    }

    /// Whether any message is still arriving: the loop keeps turning (as it did waiting for a
    /// message whole) instead of idling between polls.
    pub(super) fn arriving(&self) -> bool {
        !self.queues.is_empty()
    }

    /// Drops what `rank` was sending (it is lost): buffers MPI may still write are leaked.
    pub(super) fn forget(&mut self, rank: usize) {
        self.queues.remove(&rank);
    }

    /// Tests only: holds the `DONE` of job `id` for `hold` once it is whole.
    pub(super) fn hold_done(&mut self, id: u64, hold: Duration) {
        self.hold_done = Some((id, hold));
    }
}

/// Whether `arrival`, whole, is the `DONE` a test asked to hold: then it is held from now on.
fn hold(hold_done: &mut Option<(u64, Duration)>, arrival: &mut Arrival) -> bool {
    let Some((id, hold)) = *hold_done else {
        return false;
    };
    let is_it = arrival.tag == TAG_DONE
        && DoneHeader::decode(&arrival.buffer).is_ok_and(|(header, _)| header.tag.seq == id);
    if is_it {
        *hold_done = None;
        arrival.hold_until = Some(Instant::now() + hold);
    }
    is_it
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
    /// Since when nothing happened (`None`: something just did).
    idle_since: Option<Instant>,
    /// When the thread last had work (a message other than a beat, a local outcome, a job).
    worked_at: Instant,
}

impl Backoff {
    pub(super) fn new() -> Backoff {
        Backoff {
            idle_since: None,
            worked_at: Instant::now(),
        }
    }

    /// The thread just had work.
    pub(super) fn busy(&mut self) {
        self.idle_since = None;
        self.worked_at = Instant::now();
    }

    /// The thread was rung: what rang is most likely here, or about to be, so it looks at
    /// once and yields for a while as after work; but a ring is no work, so the polling for
    /// the next call after work does not start again.
    pub(super) fn woke(&mut self) {
        self.idle_since = None;
    }

    /// Idles a little: yields right after work (the next message is most likely coming),
    /// otherwise returns how long the caller should wait, on a channel that wakes it earlier
    /// for work of its own (its local pool's outcomes, its commands) and, when `rung` (every
    /// rank it awaits a message from rings its doorbell, see [`super::bell`]), for a ring: then
    /// it polls MPI only every [`BELL_POLL`](super::bell::BELL_POLL).
    pub(super) fn pause(&mut self, awaited: Awaited, rung: bool) -> Option<Duration> {
        let idle = self.idle_since.get_or_insert_with(Instant::now).elapsed();
        let wait = Self::wait(idle, self.worked_at.elapsed(), awaited, rung);
        if wait.is_none() {
            std::thread::yield_now();
        }
        wait
    }

    /// How long to wait after `idle` without news and `since_work` without work, `rung` or
    /// not; `None`: yield once and look again.
    fn wait(
        idle: Duration,
        since_work: Duration,
        awaited: Awaited,
        rung: bool,
    ) -> Option<Duration> {
        Self::interval(idle, since_work, awaited).map(|wait| {
            // A rank that will be rung sleeps, except while it waits for work in the 20 ms
            // after its last (the caller's next call is most likely coming): on a VM, a vCPU
            // that sleeps for milliseconds is halted, and a RUN that had to wake it started its
            // task 1-5 ms late (the seeds' halves over 2 ranks: 12.3 ms a run instead of 10.0).
            let next_call_soon =
                awaited == Awaited::Start && since_work < Duration::from_millis(20);
            if rung && !next_call_soon {
                super::bell::BELL_POLL
            } else {
                wait
            }
        })
    }

    /// How long to wait after `idle` without news and `since_work` without work, polling;
    /// `None`: yield once and look again.
    fn interval(idle: Duration, since_work: Duration, awaited: Awaited) -> Option<Duration> {
        const POLL_FAST: Duration = Duration::from_micros(20);
        const POLL_SLOW: Duration = Duration::from_micros(500);
        const SOON: Duration = Duration::from_millis(20);
        if idle < Duration::from_micros(300) {
            return None;
        }
        Some(match awaited {
            // The next call most likely comes soon after the last work (not after a beat).
            Awaited::Start if since_work < SOON => POLL_FAST,
            Awaited::Start => POLL_SLOW,
            _ if idle >= SOON => POLL_SLOW,
            Awaited::Answer if idle < Duration::from_millis(1) => POLL_FAST,
            // Polling every 20 us all through a CPU-bound task took a share of a core
            // from the workers: the seeds' CPU-bound halves over 2 ranks fell from
            // 1.5-1.8x to 0.8-1.4x the 1-rank time.
            Awaited::Answer => (idle / 16).clamp(POLL_FAST, POLL_SLOW),
            Awaited::Hidden => Duration::from_micros(300),
        })
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

/// One line on stderr, written whole: every rank of a world may print at the same moment (at
/// start-up, when rank 0 is lost).
pub(super) use parjob_process::say_whole_line as say;

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
        assert_eq!(Backoff::interval(us(100), us(100), Answer), None);
        assert_eq!(Backoff::interval(us(400), us(400), Answer), Some(us(20)));
        assert_eq!(Backoff::interval(us(999), us(999), Answer), Some(us(20)));
        assert_eq!(
            Backoff::interval(us(1_600), us(1_600), Answer),
            Some(us(100))
        );
        assert_eq!(
            Backoff::interval(us(8_000), us(8_000), Answer),
            Some(us(500))
        );
        assert_eq!(
            Backoff::interval(us(15_000), us(15_000), Answer),
            Some(us(500))
        );
        // An idle rank stays quick to start the next call, queued work hides the rest.
        assert_eq!(
            Backoff::interval(us(15_000), us(15_000), Start),
            Some(us(20))
        );
        assert_eq!(Backoff::interval(us(400), us(400), Hidden), Some(us(300)));
    }

    #[test]
    fn a_rank_that_will_be_rung_sleeps_unless_it_just_worked_and_awaits_the_next_call() {
        use Awaited::*;
        let bell = super::super::bell::BELL_POLL;
        // Right after work it yields, rung or not.
        assert_eq!(Backoff::wait(us(100), us(100), Answer, true), None);
        assert_eq!(Backoff::wait(us(100), us(100), Start, true), None);
        // Awaiting an answer, or work hidden behind a queue: it sleeps until a ring.
        assert_eq!(Backoff::wait(us(400), us(400), Answer, true), Some(bell));
        assert_eq!(
            Backoff::wait(us(15_000), us(15_000), Hidden, true),
            Some(bell)
        );
        // Awaiting the next call: polled for as before for 20 ms, then a ring wakes it.
        assert_eq!(Backoff::wait(us(400), us(400), Start, true), Some(us(20)));
        assert_eq!(
            Backoff::wait(us(25_000), us(25_000), Start, true),
            Some(bell)
        );
        // Woken (a ring, a beat) long after its last work: no polling for the next call.
        assert_eq!(Backoff::wait(us(400), us(25_000), Start, true), Some(bell));
        assert_eq!(Backoff::interval(us(400), us(25_000), Start), Some(us(500)));
        // Not rung: the polling intervals.
        assert_eq!(Backoff::wait(us(400), us(400), Answer, false), Some(us(20)));
        assert_eq!(
            Backoff::wait(us(25_000), us(25_000), Start, false),
            Some(us(500))
        );
        for awaited in [Start, Answer, Hidden] {
            assert_eq!(Backoff::interval(us(100), us(100), awaited), None);
            assert_eq!(
                Backoff::interval(us(30_000), us(30_000), awaited),
                Some(us(500))
            );
        }
    }

    #[test]
    fn an_answer_awaited_for_15_ms_costs_under_100_polls() {
        let mut idle = us(300);
        let mut polls = 0;
        while idle < Duration::from_millis(15) {
            idle += Backoff::interval(idle, idle, Awaited::Answer).unwrap_or(us(1));
            polls += 1;
        }
        assert!(polls < 100, "{polls} polls");
    }
}
