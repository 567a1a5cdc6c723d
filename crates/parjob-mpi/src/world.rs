//! The MPI world: one thread per rank makes every MPI call (rsmpi's communicator is `!Sync`
//! under Open MPI). On rank 0 it is the driver thread, fed jobs by [`MpiPool`]; on the other
//! ranks it is the rank server, which never returns.
//!
//! Sends are non-blocking (`MPI_Isend`, their buffers kept until `MPI_Test` says they went), so
//! no call ever waits on a rank that may be dead; a rank that stops beating (or whose process
//! is gone, when it shares rank 0's host) is declared lost after a deadline, and after a loss
//! rank 0 leaves with `_exit` rather than wait in `MPI_Finalize`.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use mpi::datatype::Equivalence;
use mpi::ffi;
use mpi::raw::{AsRaw, AsRawMut};
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::Source;
use parjob_core::{Backend, Error, Job, Pool, ProcessOptions, Relayed, RelayedOutcomes, cpu_count};
use parjob_process::ProcessPool;
use parjob_remote::{CodeOffset, DoneHeader, FrameAt, FrameTag, Identity, RunHeader};

use crate::LAUNCH_HINT;
use crate::wire::{
    self, BEAT_EVERY, Hello, PROTOCOL, RECORD_PANICKED, Reader, TAG_BEAT, TAG_BYE, TAG_DONE,
    TAG_HELLO, TAG_RUN, TAG_STOP, TAG_WELCOME, put_bytes, put_u32, put_u64,
};

/// `serve`'s status for "stop without MPI_Finalize, successfully" (a rank was lost).
const EXIT_WITHOUT_FINALIZE: i32 = -1;

/// How long rank 0 waits for every rank's `HELLO` (their local pools start first).
const HELLO_DEADLINE: Duration = Duration::from_secs(60);
/// How long rank 0 waits for `BYE`s at exit before leaving without `MPI_Finalize`.
const BYE_DEADLINE: Duration = Duration::from_secs(5);

/// A rank that sent nothing for this long is lost (`PARJOB_MPI_RANK_TIMEOUT`, in seconds).
fn silence_limit() -> Duration {
    std::env::var("PARJOB_MPI_RANK_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map_or(Duration::from_secs(5), Duration::from_secs_f64)
}

/// What rank 0's driver thread is told.
enum Command {
    /// Run `job` on one of ranks `1..=ranks`.
    Submit { job: Job, ranks: usize },
    /// The program is exiting: stop the ranks.
    Shutdown(Sender<()>),
}

/// A worker rank as rank 0 knows it after its `HELLO`.
#[derive(Debug, Clone)]
struct RankInfo {
    rank: usize,
    host: String,
    pid: u32,
    workers: usize,
}

/// Rank 0's handle on its driver thread.
struct Driver {
    commands: Mutex<Sender<Command>>,
    /// Filled once every rank said hello: the ranks, or why the world cannot work.
    ranks: OnceLock<Result<Vec<RankInfo>, Error>>,
    ready: (Mutex<bool>, std::sync::Condvar),
    lost: AtomicBool,
}

static DRIVER: OnceLock<Arc<Driver>> = OnceLock::new();
static WORLD_SIZE: OnceLock<usize> = OnceLock::new();

/// The number of ranks in the world, once [`init`] started MPI; `None` outside a launcher.
pub fn world_size() -> Option<usize> {
    WORLD_SIZE.get().copied()
}

/// Call first thing in `main` (after the process backend's `init`; `parjob::init()` does
/// both). Outside an MPI launcher it does nothing. Under one, it starts MPI on a thread of its
/// own; on rank 0 it returns, on every other rank it serves rank 0 until the program on rank
/// 0 exits, then ends the process, never returning.
pub fn init() {
    if !crate::launched_by_mpi() || DRIVER.get().is_some() {
        return;
    }
    let (tx, rx) = mpsc::channel();
    let spawned = std::thread::Builder::new()
        .name("parjob-mpi".into())
        .spawn(move || mpi_thread(tx));
    if let Err(e) = spawned {
        eprintln!("parjob: cannot start the MPI thread: {e}; the MPI backend is unavailable");
        return;
    }
    match rx.recv() {
        // Rank 0: the driver thread runs on; main goes on.
        Ok(0) => {}
        // A worker rank: the MPI thread serves and ends the process.
        Ok(_) => loop {
            std::thread::park();
        },
        Err(_) => eprintln!("parjob: MPI did not start; the MPI backend is unavailable"),
    }
}

fn mpi_thread(started: Sender<usize>) {
    let Some((universe, _threading)) = mpi::initialize_with_threading(mpi::Threading::Multiple)
    else {
        return;
    };
    let world = universe.world();
    let rank = usize::try_from(world.rank()).unwrap_or(0);
    let size = usize::try_from(world.size()).unwrap_or(1);
    let _ = WORLD_SIZE.set(size);
    if rank != 0 {
        let _ = started.send(rank);
        let status = serve(&world, rank);
        drop(world);
        if status == 0 {
            drop(universe); // MPI_Finalize: rank 0 said STOP, every rank is finalizing
            std::process::exit(0);
        }
        let status = if status == EXIT_WITHOUT_FINALIZE {
            0
        } else {
            status
        };
        // SAFETY: `_exit` ends the process at once: no MPI_Finalize that would wait for a
        // lost rank.
        unsafe { libc::_exit(status) };
    }
    let (commands, inbox) = mpsc::channel();
    let driver = Arc::new(Driver {
        commands: Mutex::new(commands),
        ranks: OnceLock::new(),
        ready: (Mutex::new(false), std::sync::Condvar::new()),
        lost: AtomicBool::new(false),
    });
    let _ = DRIVER.set(Arc::clone(&driver));
    // SAFETY: `at_exit` is a plain `extern "C" fn()` that does not unwind.
    unsafe { libc::atexit(at_exit) };
    let _ = started.send(0);
    let mut state = DriverState::new(&world, size, Arc::clone(&driver));
    let exiting = state.run(inbox);
    let lost = driver.lost.load(Ordering::SeqCst);
    drop(state);
    drop(world);
    if lost {
        // A lost rank would never join MPI_Finalize: leave without it (the caller of
        // `exit` already flushed Rust's stdout).
        // SAFETY: `_exit` ends the process at once, skipping MPI_Finalize.
        unsafe { libc::_exit(0) };
    }
    drop(universe); // MPI_Finalize, with every rank finalizing after its BYE
    // Only now may the exiting main thread go on (and end the process).
    if let Some(done) = exiting {
        let _ = done.send(());
    }
}

/// Registered with `atexit` on rank 0: stops the ranks and waits for the driver thread, which
/// finalizes MPI (or `_exit`s after a loss).
extern "C" fn at_exit() {
    let Some(driver) = DRIVER.get() else {
        return;
    };
    let (done_tx, done_rx) = mpsc::channel();
    let sent = driver
        .commands
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send(Command::Shutdown(done_tx))
        .is_ok();
    if sent {
        let _ = done_rx.recv_timeout(BYE_DEADLINE + Duration::from_secs(5));
    }
}

/// A non-blocking send in flight: its buffer lives until MPI says it went.
struct PendingSend {
    request: ffi::MPI_Request,
    _buffer: Vec<u8>,
    rank: usize,
}

/// Starts a non-blocking send of `buffer` to `rank` with `tag`.
fn isend(
    world: &SimpleCommunicator,
    rank: usize,
    tag: i32,
    buffer: Vec<u8>,
) -> Result<PendingSend, String> {
    let len = i32::try_from(buffer.len())
        .map_err(|_| format!("a message of {} bytes is over MPI's 2 GiB", buffer.len()))?;
    let dest = i32::try_from(rank).map_err(|_| format!("no rank {rank}"))?;
    // SAFETY: reading an MPI constant the C shim defines.
    let mut request = unsafe { ffi::RSMPI_REQUEST_NULL };
    // SAFETY: `buffer` holds `len` bytes and is kept (in the returned PendingSend, or leaked
    // with it) until MPI_Test says the send completed; the communicator is this world's, used
    // from this thread only.
    let code = unsafe {
        ffi::MPI_Isend(
            buffer.as_ptr().cast(),
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
fn test_sends(sends: &mut Vec<PendingSend>) {
    sends.retain_mut(|send| {
        let mut flag = 0;
        // SAFETY: `request` came from MPI_Isend and was not completed yet.
        let code = unsafe { ffi::MPI_Test(&mut send.request, &mut flag, ffi::RSMPI_STATUS_IGNORE) };
        code == 0 && flag == 0
    });
}

/// The MPI tag `try_receive` reports for a message that began to arrive but stopped halfway
/// (its sender died mid-transfer): the caller treats the sender as lost.
const TAG_BROKEN: i32 = -1;

/// The next message from anyone, if one has arrived: (source rank, tag, bytes).
///
/// The receive itself is non-blocking (`MPI_Imrecv`, then `MPI_Test` until it completes): a
/// big message whose sender dies mid-transfer would block `MPI_Mrecv` for ever. After
/// `silence_limit()` it gives up, leaks the buffer (MPI may still write it) and reports the
/// message as `TAG_BROKEN`.
fn try_receive(world: &SimpleCommunicator) -> Option<(usize, i32, Vec<u8>)> {
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
    let deadline = Instant::now() + silence_limit();
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

/// Waits a little when idle, more the longer it has been idle, so that busy-polling ranks do
/// not starve the workers on an oversubscribed node.
struct Backoff {
    idle_since: Option<Instant>,
}

impl Backoff {
    fn busy(&mut self) {
        self.idle_since = None;
    }
    fn idle(&mut self) {
        let since = *self.idle_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_micros(200) {
            std::thread::yield_now();
        } else if since.elapsed() < Duration::from_millis(20) {
            std::thread::sleep(Duration::from_micros(50));
        } else {
            std::thread::sleep(Duration::from_micros(500));
        }
    }
}

fn host_name() -> String {
    mpi::environment::processor_name().unwrap_or_else(|_| "<unknown host>".into())
}

/// Whether process `pid` of this host is gone (or a zombie).
fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command, which is in parentheses and may hold spaces.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z') || rest.starts_with('X')),
        Err(_) => true,
    }
}

// ---------------------------------------------------------------------------------------
// Rank 0

/// A job out on a rank.
struct Out {
    job: Job,
    rank: usize,
}

struct Slot {
    info: RankInfo,
    alive: bool,
    in_flight: usize,
    last_heard: Instant,
    same_host: bool,
}

struct DriverState<'w> {
    world: &'w SimpleCommunicator,
    size: usize,
    driver: Arc<Driver>,
    slots: Vec<Slot>,
    /// Ranks not heard from yet (handshake), with what they said so far.
    hellos: HashMap<usize, RankInfo>,
    /// Ranks refused at the handshake (another build, no local pool): they wait for `STOP`.
    refused: Vec<usize>,
    hello_error: Option<Error>,
    started: Instant,
    queue: VecDeque<(Job, usize)>,
    out: HashMap<u64, Out>,
    next_id: u64,
    sends: Vec<PendingSend>,
    leaked: Vec<Vec<u8>>,
    host: String,
    last_check: Instant,
    last_beat: Instant,
}

impl<'w> DriverState<'w> {
    fn new(world: &'w SimpleCommunicator, size: usize, driver: Arc<Driver>) -> Self {
        DriverState {
            world,
            size,
            driver,
            slots: Vec::new(),
            hellos: HashMap::new(),
            refused: Vec::new(),
            hello_error: None,
            started: Instant::now(),
            queue: VecDeque::new(),
            out: HashMap::new(),
            next_id: 1,
            sends: Vec::new(),
            leaked: Vec::new(),
            host: host_name(),
            last_check: Instant::now(),
            last_beat: Instant::now(),
        }
    }

    fn handshaken(&self) -> bool {
        self.driver.ranks.get().is_some()
    }

    fn finish_handshake(&mut self, result: Result<Vec<RankInfo>, Error>) {
        let _ = self.driver.ranks.set(result);
        let (lock, ready) = &self.driver.ready;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        ready.notify_all();
    }

    /// The driver loop, until the program exits. Returns who to tell once MPI is finalized.
    fn run(&mut self, inbox: Receiver<Command>) -> Option<Sender<()>> {
        if self.size < 2 {
            self.finish_handshake(Err(Error::backend_unavailable(
                Backend::Mpi,
                format!("the MPI world has only rank 0, so no rank runs tasks; {LAUNCH_HINT}"),
            )));
        }
        let mut backoff = Backoff { idle_since: None };
        loop {
            let mut busy = false;
            // Commands from the pools.
            loop {
                match inbox.try_recv() {
                    Ok(Command::Submit { job, ranks }) => {
                        self.queue.push_back((job, ranks));
                        busy = true;
                    }
                    Ok(Command::Shutdown(done)) => {
                        self.shutdown();
                        return Some(done);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.shutdown();
                        return None;
                    }
                }
            }
            while let Some((from, tag, bytes)) = try_receive(self.world) {
                busy = true;
                self.receive(from, tag, &bytes);
            }
            test_sends(&mut self.sends);
            if self.dispatch() {
                busy = true;
            }
            self.check_ranks();
            if self.size > 1 {
                self.beat();
            }
            if busy {
                backoff.busy();
            } else if self.out.is_empty() && self.queue.is_empty() && self.handshaken() {
                // Nothing to do: wait for a command (beats pile up meanwhile, harmlessly).
                match inbox.recv_timeout(Duration::from_millis(100)) {
                    Ok(Command::Submit { job, ranks }) => self.queue.push_back((job, ranks)),
                    Ok(Command::Shutdown(done)) => {
                        self.shutdown();
                        return Some(done);
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.shutdown();
                        return None;
                    }
                }
                backoff.busy();
            } else {
                backoff.idle();
            }
        }
    }

    fn receive(&mut self, from: usize, tag: i32, bytes: &[u8]) {
        if let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == from) {
            slot.last_heard = Instant::now();
        }
        match tag {
            TAG_HELLO => self.hello(from, bytes),
            TAG_DONE => self.done(from, bytes),
            TAG_BROKEN => self.lose(from, "a message from it stopped halfway"),
            _ => {} // BEAT (already noted), BYE outside shutdown
        }
    }

    fn hello(&mut self, from: usize, bytes: &[u8]) {
        let refuse = |this: &mut Self, message: String| {
            this.hello_error
                .get_or_insert(Error::worker(from, format!("MPI rank {from}: {message}")));
            if let Ok(send) = isend(this.world, from, TAG_WELCOME, vec![0]) {
                this.sends.push(send);
            }
            if !this.refused.contains(&from) {
                this.refused.push(from);
            }
            this.complete_handshake_if_all_answered();
        };
        let Some(hello) = Hello::decode(bytes) else {
            return refuse(self, "sent a malformed HELLO".into());
        };
        let identity = match parjob_remote::Identity::decode(&hello.identity) {
            Ok(identity) => identity,
            Err(e) => return refuse(self, format!("on {}: {e}", hello.host)),
        };
        if let Err(e) = identity.check_same_build(PROTOCOL) {
            return refuse(self, format!("on {}: {e}", hello.host));
        }
        if !hello.error.is_empty() {
            return refuse(
                self,
                format!("on {} (pid {}): {}", hello.host, identity.pid, hello.error),
            );
        }
        let mut welcome = vec![1];
        put_u32(&mut welcome, std::process::id());
        put_bytes(&mut welcome, self.host.as_bytes());
        if let Ok(send) = isend(self.world, from, TAG_WELCOME, welcome) {
            self.sends.push(send);
        }
        self.hellos.insert(
            from,
            RankInfo {
                rank: from,
                host: hello.host,
                pid: identity.pid,
                workers: hello.workers.max(1) as usize,
            },
        );
        self.complete_handshake_if_all_answered();
    }

    /// Once every rank answered (accepted or refused), tells the pools what the world is.
    fn complete_handshake_if_all_answered(&mut self) {
        if self.hellos.len() + self.refused.len() == self.size - 1 && !self.handshaken() {
            let mut ranks: Vec<RankInfo> = self.hellos.values().cloned().collect();
            ranks.sort_by_key(|r| r.rank);
            self.slots = ranks
                .iter()
                .map(|info| Slot {
                    same_host: info.host == self.host,
                    info: info.clone(),
                    alive: true,
                    in_flight: 0,
                    last_heard: Instant::now(),
                })
                .collect();
            let result = match self.hello_error.take() {
                Some(error) => Err(error),
                None => Ok(ranks),
            };
            self.finish_handshake(result);
        }
    }

    /// Sends queued jobs to ranks with room. Returns whether it sent any.
    fn dispatch(&mut self) -> bool {
        if !self.handshaken() {
            return false;
        }
        let mut sent = false;
        while let Some(limit) = self.queue.front().map(|(_, ranks)| *ranks) {
            let candidates = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.info.rank <= limit && s.alive);
            let mut any_alive = false;
            let mut best: Option<usize> = None;
            for (i, slot) in candidates {
                any_alive = true;
                if slot.in_flight < 2 * slot.info.workers
                    && best.is_none_or(|b| {
                        self.slots[b].in_flight * slot.info.workers
                            > slot.in_flight * self.slots[b].info.workers
                    })
                {
                    best = Some(i);
                }
            }
            if !any_alive {
                let Some((mut job, _)) = self.queue.pop_front() else {
                    break;
                };
                let lost: Vec<&Slot> = self.slots.iter().filter(|s| s.info.rank <= limit).collect();
                let (rank, host, pid) = lost.first().map_or((0, String::new(), 0), |s| {
                    (s.info.rank, s.info.host.clone(), s.info.pid)
                });
                fail_rest(&mut job, |index| {
                    Error::rank_lost(
                        index,
                        rank,
                        host.clone(),
                        pid,
                        "every worker rank of this pool was lost",
                    )
                });
                job.complete(Duration::ZERO);
                continue;
            }
            let Some(best) = best else {
                break;
            };
            let Some((job, _)) = self.queue.pop_front() else {
                break;
            };
            self.send_job(job, best);
            sent = true;
        }
        sent
    }

    fn send_job(&mut self, mut job: Job, slot: usize) {
        if job.control().is_cancelled() || !job.mark_started() {
            job.complete(Duration::ZERO);
            return;
        }
        let rank = self.slots[slot].info.rank;
        let id = self.next_id;
        self.next_id += 1;
        let batch = job.batch();
        let entry = match batch
            .remote_entry()
            .and_then(|entry| CodeOffset::of_entry(entry, batch.function_name()))
        {
            Ok(entry) => entry,
            Err(error) => {
                job.batch_mut().push_failure(error);
                job.complete(Duration::ZERO);
                return;
            }
        };
        let len = batch.len();
        // The tasks first and the fixed-size trailer last: the rank then hands the message's
        // own buffer, cut short, to its local pool instead of copying the frame out of it.
        let mut buffer = Vec::with_capacity(RUN_TRAILER + 16 * len);
        // The arguments' `Serialize` is user code: a panic in it fails this job's first task.
        let encoded = parjob_core::catch_task(|| batch.encode_tasks(0..len, &mut buffer));
        if let Err(message) = encoded {
            let index = job.batch().first_index();
            job.batch_mut().push_failure(codec_error(index, message));
            job.complete(Duration::ZERO);
            return;
        }
        put_u64(&mut buffer, batch.first_index() as u64);
        let header = RunHeader {
            tag: FrameTag {
                generation: rank as u64,
                seq: id,
            },
            timeout: job.control().timeout(),
            entry,
            frame: FrameAt::Inline,
            attachments: 0,
        };
        buffer.extend_from_slice(&header.encode());
        match isend(self.world, rank, TAG_RUN, buffer) {
            Ok(send) => {
                self.sends.push(send);
                self.slots[slot].in_flight += 1;
                self.out.insert(id, Out { job, rank });
            }
            Err(message) => {
                let index = job.batch().first_index();
                job.batch_mut()
                    .push_failure(Error::InvalidConfig(format!("task {index}: {message}")));
                job.complete(Duration::ZERO);
            }
        }
    }

    fn done(&mut self, from: usize, bytes: &[u8]) {
        let Ok((header, mut body)) = DoneHeader::decode(bytes) else {
            return self.lose(from, "it sent a malformed DONE");
        };
        let Some(Out { mut job, rank }) = self.out.remove(&header.tag.seq) else {
            return;
        };
        if let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == rank) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        let host = self.host_of(rank);
        while let Some((&kind, rest)) = body.split_first() {
            let mut r = Reader(rest);
            match kind {
                0 => {
                    let (Some(_count), Some(records)) = (r.u32(), r.bytes()) else {
                        break;
                    };
                    job.batch_mut().decode_outcomes(records);
                }
                1 => {
                    let Some(error) = wire::read_failure(&mut r) else {
                        break;
                    };
                    job.batch_mut()
                        .push_failure(Error::on_rank(rank, host.clone(), error));
                }
                _ => break,
            }
            body = r.0;
        }
        job.complete(header.busy);
    }

    fn host_of(&self, rank: usize) -> String {
        self.slots
            .iter()
            .find(|s| s.info.rank == rank)
            .map_or_else(|| "<unknown host>".into(), |s| s.info.host.clone())
    }

    /// Tells every rank still in the world, every `BEAT_EVERY`, that rank 0 is alive: a rank
    /// that stops hearing it (rank 0 killed under `--enable-recovery`) ends itself.
    fn beat(&mut self) {
        if self.last_beat.elapsed() < BEAT_EVERY {
            return;
        }
        self.last_beat = Instant::now();
        // Before the handshake is over, the ranks welcomed so far (they count silence from
        // their WELCOME); after it, those not lost.
        let welcomed: Vec<usize> = if self.handshaken() {
            self.slots
                .iter()
                .filter(|s| s.alive)
                .map(|s| s.info.rank)
                .collect()
        } else {
            self.hellos.keys().copied().collect()
        };
        let ranks: Vec<usize> = welcomed
            .into_iter()
            .chain(self.refused.iter().copied())
            .collect();
        for rank in ranks {
            if let Ok(send) = isend(self.world, rank, TAG_BEAT, Vec::new()) {
                self.sends.push(send);
            }
        }
    }

    /// Declares ranks lost whose process is gone or that went silent.
    fn check_ranks(&mut self) {
        if self.last_check.elapsed() < Duration::from_millis(50) {
            return;
        }
        self.last_check = Instant::now();
        if !self.handshaken() {
            if self.started.elapsed() > HELLO_DEADLINE {
                let missing: Vec<usize> = (1..self.size)
                    .filter(|r| !self.hellos.contains_key(r))
                    .collect();
                self.finish_handshake(Err(Error::backend_unavailable(
                    Backend::Mpi,
                    format!(
                        "MPI ranks {missing:?} did not say hello within {HELLO_DEADLINE:?} \
                         (did their program call parjob::init() first thing in main?)"
                    ),
                )));
            }
            return;
        }
        let limit = silence_limit();
        let mut lost = Vec::new();
        for slot in self.slots.iter().filter(|s| s.alive) {
            if slot.same_host && process_gone(slot.info.pid) {
                lost.push((
                    slot.info.rank,
                    "its process is gone (killed or crashed)".to_string(),
                ));
            } else if slot.last_heard.elapsed() > limit {
                lost.push((
                    slot.info.rank,
                    format!("it sent nothing for {limit:?} (PARJOB_MPI_RANK_TIMEOUT)"),
                ));
            }
        }
        for (rank, reason) in lost {
            self.lose(rank, &reason);
        }
    }

    /// Marks `rank` lost and fails every job out on it.
    fn lose(&mut self, rank: usize, reason: &str) {
        let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == rank) else {
            return;
        };
        if !slot.alive {
            return;
        }
        slot.alive = false;
        slot.in_flight = 0;
        let (host, pid) = (slot.info.host.clone(), slot.info.pid);
        self.driver.lost.store(true, Ordering::SeqCst);
        // Sends toward it may never complete, and MPI may still read their buffers.
        let mut kept = Vec::new();
        for send in self.sends.drain(..) {
            if send.rank == rank {
                self.leaked.push(send._buffer);
            } else {
                kept.push(send);
            }
        }
        self.sends = kept;
        let ids: Vec<u64> = self
            .out
            .iter()
            .filter(|(_, out)| out.rank == rank)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(Out { mut job, .. }) = self.out.remove(&id) {
                fail_rest(&mut job, |index| {
                    Error::rank_lost(index, rank, host.clone(), pid, reason)
                });
                job.complete(Duration::ZERO);
            }
        }
    }

    /// Tells every live rank to stop and waits (with a deadline) for their `BYE`s.
    fn shutdown(&mut self) {
        // Jobs never sent, or out on ranks: complete them (their tasks count as cancelled).
        for (job, _) in self.queue.drain(..) {
            job.complete(Duration::ZERO);
        }
        let ranks: Vec<usize> = if self.handshaken() {
            let alive = self.slots.iter().filter(|s| s.alive).map(|s| s.info.rank);
            alive.chain(self.refused.iter().copied()).collect()
        } else {
            (1..self.size).collect()
        };
        // After a loss no rank may wait in MPI_Finalize for the lost one: they `_exit` too.
        let finalize = u8::from(!self.driver.lost.load(Ordering::SeqCst));
        for &rank in &ranks {
            if let Ok(send) = isend(self.world, rank, TAG_STOP, vec![finalize]) {
                self.sends.push(send);
            }
        }
        let mut waiting: Vec<usize> = ranks;
        let deadline = Instant::now() + BYE_DEADLINE;
        while !waiting.is_empty() && Instant::now() < deadline {
            while let Some((from, tag, bytes)) = try_receive(self.world) {
                if tag == TAG_BYE {
                    waiting.retain(|&r| r != from);
                } else if tag == TAG_DONE {
                    self.done(from, &bytes);
                }
            }
            test_sends(&mut self.sends);
            std::thread::sleep(Duration::from_micros(200));
        }
        for (_, out) in self.out.drain() {
            out.job.complete(Duration::ZERO);
        }
        if !waiting.is_empty() {
            self.driver.lost.store(true, Ordering::SeqCst);
        }
        if self.driver.lost.load(Ordering::SeqCst) {
            // Their buffers may still be read by MPI: never freed (the process is ending).
            for send in self.sends.drain(..) {
                self.leaked.push(send._buffer);
            }
            std::mem::forget(std::mem::take(&mut self.leaked));
        }
    }
}

/// A codec error for a job whose arguments' `Serialize` panicked while encoding.
fn codec_error(index: usize, message: String) -> Error {
    Error::task_panicked(
        index,
        format!("encoding its arguments for an MPI rank panicked: {message}"),
    )
}

/// Records `error(index)` for every task of `job` without an outcome.
fn fail_rest(job: &mut Job, error: impl Fn(usize) -> Error) {
    let batch = job.batch_mut();
    while batch.outcomes_len() < batch.len() {
        let index = batch.first_index() + batch.outcomes_len();
        batch.push_failure(error(index));
    }
}

/// The MPI backend's pool on rank 0: a handle on the driver thread, using worker ranks
/// `1..=ranks`.
///
/// Made by `Parallel` for [`Backend::Mpi`]. Dropping it leaves the ranks running for the next
/// pool; they stop when the program on rank 0 exits.
#[derive(Debug)]
pub struct MpiPool {
    ranks: usize,
    workers: usize,
}

impl MpiPool {
    /// A pool on the first `ranks` worker ranks (every worker rank for 0, or when `ranks` is
    /// more than there are), waiting for every rank's handshake first.
    ///
    /// # Errors
    /// [`Error::BackendUnavailable`] when the program was not started by an MPI launcher (with
    /// how to start it), when MPI did not start, when `parjob::init()` was not called, or when
    /// the world has no rank besides 0; [`Error::Worker`] naming the rank when a rank is
    /// another build or its local pool could not start.
    pub fn new(ranks: usize) -> Result<MpiPool, Error> {
        let Some(driver) = DRIVER.get() else {
            let reason = if crate::launched_by_mpi() {
                "this is a worker rank, or parjob::init() was not called first thing in main \
                 (it starts MPI)"
                    .to_string()
            } else {
                format!("this program was not started by an MPI launcher; {LAUNCH_HINT}")
            };
            return Err(Error::backend_unavailable(Backend::Mpi, reason));
        };
        let (lock, ready) = &driver.ready;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = ready.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
        drop(done);
        let infos = match driver.ranks.get() {
            Some(Ok(infos)) => infos,
            Some(Err(error)) => return Err(error.clone()),
            None => {
                return Err(Error::backend_unavailable(
                    Backend::Mpi,
                    "the MPI handshake did not finish",
                ));
            }
        };
        let ranks = if ranks == 0 || ranks > infos.len() {
            infos.len()
        } else {
            ranks
        };
        let workers = infos.iter().take(ranks).map(|r| r.workers).sum::<usize>();
        Ok(MpiPool { ranks, workers })
    }

    /// How many worker ranks this pool uses.
    pub fn ranks(&self) -> usize {
        self.ranks
    }
}

impl Pool for MpiPool {
    fn workers(&self) -> usize {
        self.workers.max(1)
    }

    fn submit(&self, job: Job) {
        let Some(driver) = DRIVER.get() else {
            return; // the job completes itself as cancelled
        };
        let sent = driver
            .commands
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(Command::Submit {
                job,
                ranks: self.ranks,
            });
        // A driver thread that is gone (the program is exiting) drops the job, which
        // completes itself as cancelled.
        drop(sent);
    }

    fn target_batch_duration(&self) -> Duration {
        // A frame's round trip through MPI and a local worker costs 50-200 us: 10 ms batches
        // hide it and pack thousands of tiny tasks per message.
        Duration::from_millis(10)
    }

    fn enforces_timeout(&self) -> bool {
        true
    }

    fn verbose_name(&self) -> &'static str {
        "MpiBackend"
    }
}

// ---------------------------------------------------------------------------------------
// Worker ranks

/// How many local worker processes this rank runs: `PARJOB_MPI_WORKERS_PER_RANK`, else the
/// CPUs divided among the ranks on this node.
fn local_workers() -> usize {
    if let Some(n) = std::env::var("PARJOB_MPI_WORKERS_PER_RANK")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    // Slurm writes e.g. `3` or `2(x4)` in SLURM_STEP_TASKS_PER_NODE: the leading number is
    // this node's (on a uniform allocation).
    let on_node = [
        "OMPI_COMM_WORLD_LOCAL_SIZE",
        "MPI_LOCALNRANKS",
        "SLURM_NTASKS_PER_NODE",
        "SLURM_STEP_TASKS_PER_NODE",
    ]
    .iter()
    .find_map(|var| {
        let value = std::env::var(var).ok()?;
        let digits: String = value
            .trim()
            .chars()
            .take_while(char::is_ascii_digit)
            .collect();
        digits.parse::<usize>().ok()
    })
    .filter(|&n| n > 0)
    .unwrap_or(1);
    (cpu_count() / on_node).max(1)
}

/// The rank server's loop. Returns the exit status: 0 after rank 0's `STOP`.
fn serve(world: &SimpleCommunicator, rank: usize) -> i32 {
    let host = host_name();
    let workers = local_workers();
    let (pool, error) = match ProcessPool::new(workers, ProcessOptions::default()) {
        Ok(pool) => (Some(pool), String::new()),
        Err(e) => (None, format!("its local process pool did not start: {e}")),
    };
    let hello = Hello {
        identity: Identity::current(PROTOCOL).encode(),
        host,
        workers: u32::try_from(workers).unwrap_or(u32::MAX),
        error,
    };
    let mut sends = Vec::new();
    match isend(world, 0, TAG_HELLO, hello.encode()) {
        Ok(send) => sends.push(send),
        Err(_) => return 1,
    }
    let mut welcomed = false;
    let (done_tx, done_rx) = mpsc::channel::<(u64, u64, RelayedOutcomes)>();
    let mut last_beat = Instant::now();
    // Rank 0's pid and whether it shares this host, from its WELCOME; when it last spoke.
    let mut rank0: Option<(u32, bool)> = None;
    let mut heard_from_0 = Instant::now();
    let mut last_check = Instant::now();
    let my_host = host_name();
    let mut backoff = Backoff { idle_since: None };
    loop {
        let mut busy = false;
        while let Some((from, tag, bytes)) = try_receive(world) {
            busy = true;
            if from != 0 {
                continue;
            }
            heard_from_0 = Instant::now();
            match tag {
                TAG_BROKEN => {
                    // Rank 0 died while sending: nobody will say STOP.
                    drop(pool);
                    return 3;
                }
                // A refused rank (another build, no local pool) gets no RUN: it waits for STOP.
                TAG_WELCOME => {
                    welcomed = bytes.first() == Some(&1);
                    let mut r = Reader(bytes.get(1..).unwrap_or_default());
                    if let (Some(pid), Some(host)) = (r.u32(), r.text()) {
                        rank0 = Some((pid, host == my_host));
                    }
                }
                TAG_RUN if welcomed => {
                    if let Some(pool) = &pool {
                        run_frame(pool, rank, bytes, &done_tx, world, &mut sends);
                    }
                }
                TAG_STOP => {
                    let finalize = bytes.first() == Some(&1);
                    drop(pool);
                    if let Ok(send) = isend(world, 0, TAG_BYE, Vec::new()) {
                        sends.push(send);
                    }
                    let deadline = Instant::now() + BYE_DEADLINE;
                    while !sends.is_empty() && Instant::now() < deadline {
                        test_sends(&mut sends);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    return match (sends.is_empty(), finalize) {
                        (true, true) => 0,
                        // A rank was lost (or the BYE did not go): leave without finalizing.
                        (true, false) => EXIT_WITHOUT_FINALIZE,
                        (false, _) => 1,
                    };
                }
                _ => {}
            }
        }
        while let Ok((id, first_index, outcomes)) = done_rx.try_recv() {
            busy = true;
            let message = encode_done(rank as u64, id, first_index, outcomes);
            if let Ok(send) = isend(world, 0, TAG_DONE, message) {
                sends.push(send);
            }
        }
        test_sends(&mut sends);
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            let gone = match rank0 {
                Some((pid, true)) => process_gone(pid),
                _ => false,
            };
            // Rank 0 beats only once the handshake is over: silence counts from then.
            if gone || (rank0.is_some() && heard_from_0.elapsed() > silence_limit()) {
                // Rank 0 is lost (killed under --enable-recovery): nobody will say STOP. Stop
                // the local workers and leave without MPI_Finalize, rather than serve nobody.
                drop(pool);
                return 3;
            }
        }
        if last_beat.elapsed() >= BEAT_EVERY {
            last_beat = Instant::now();
            if let Ok(send) = isend(world, 0, TAG_BEAT, Vec::new()) {
                sends.push(send);
            }
        }
        if busy {
            backoff.busy();
        } else {
            backoff.idle();
        }
    }
}

/// The bytes after a `RUN`'s tasks frame: `[first index u64][RunHeader]`.
const RUN_TRAILER: usize = 8 + RunHeader::LEN;

/// Hands one `RUN` to the local pool; a frame that cannot be run is answered at once.
fn run_frame(
    pool: &ProcessPool,
    rank: usize,
    mut frame: Vec<u8>,
    done: &Sender<(u64, u64, RelayedOutcomes)>,
    world: &SimpleCommunicator,
    sends: &mut Vec<PendingSend>,
) {
    let Some(at) = frame.len().checked_sub(RUN_TRAILER) else {
        return;
    };
    let mut r = Reader(&frame[at..]);
    let Some(first_index) = r.u64() else {
        return;
    };
    let Ok((header, _)) = RunHeader::decode(r.0) else {
        return;
    };
    frame.truncate(at);
    let id = header.tag.seq;
    let failed = |message: String| {
        let outcomes = RelayedOutcomes {
            busy: Duration::ZERO,
            len: 1,
            records: Vec::new(),
            outcomes: vec![Relayed::Failed(Error::worker(
                rank,
                format!("task {first_index}: {message}"),
            ))],
        };
        encode_done(rank as u64, id, first_index, outcomes)
    };
    // SAFETY: rank 0 sends RUNs only after it checked this rank's identity (the same build,
    // by GNU build-id) and welcomed it; the offset reached here unchanged inside the message.
    let entry = match unsafe { parjob_remote::entry_at(header.entry) } {
        Ok(entry) => entry,
        Err(e) => {
            if let Ok(send) = isend(world, 0, TAG_DONE, failed(e.to_string())) {
                sends.push(send);
            }
            return;
        }
    };
    let done = done.clone();
    let first = first_index;
    let job = Job::relayed(
        usize::try_from(first_index).unwrap_or(usize::MAX),
        entry,
        frame,
        header.timeout,
        move |outcomes| {
            let _ = done.send((id, first, outcomes));
        },
    );
    match job {
        Ok(job) => pool.submit(job),
        Err(e) => {
            if let Ok(send) = isend(world, 0, TAG_DONE, failed(e.to_string())) {
                sends.push(send);
            }
        }
    }
}

/// The `DONE` for frame `id`: consecutive records travel as they are, a panic record or a
/// failure the local pool recorded as a failure entry (rank 0 wraps those in
/// `Error::OnRank`).
fn encode_done(rank: u64, id: u64, first_index: u64, outcomes: RelayedOutcomes) -> Vec<u8> {
    let header = DoneHeader {
        tag: FrameTag {
            generation: rank,
            seq: id,
        },
        busy: outcomes.busy,
        outcomes: FrameAt::Inline,
        new_arena: false,
        overrun: None,
    };
    let records = &outcomes.records;
    let mut out = Vec::with_capacity(DoneHeader::LEN + 16 + records.len());
    out.extend_from_slice(&header.encode());
    // A run of consecutive records travels as one `[0][count u32][len u32][records]` entry,
    // copied span by span (the local pool stores them back to back), its count and length
    // filled in when the run ends.
    let mut run: Option<(usize, u32)> = None; // (where its count is in `out`, records so far)
    let mut span: Option<std::ops::Range<usize>> = None; // records not copied yet
    let flush_span = |out: &mut Vec<u8>, span: &mut Option<std::ops::Range<usize>>| {
        if let Some(span) = span.take() {
            out.extend_from_slice(records.get(span).unwrap_or_default());
        }
    };
    let end_run = |out: &mut Vec<u8>, run: &mut Option<(usize, u32)>| {
        if let Some((at, count)) = run.take() {
            let len = out.len() - at - 8;
            out[at..at + 4].copy_from_slice(&count.to_le_bytes());
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            out[at + 4..at + 8].copy_from_slice(&len.to_le_bytes());
        }
    };
    // By reference: moving each (large) outcome out cost more than encoding it.
    for (position, outcome) in outcomes.outcomes.iter().enumerate() {
        let panicked;
        let failure = match outcome {
            Relayed::Record(at) => {
                let record = records.get(at.clone()).unwrap_or_default();
                if record.first() == Some(&RECORD_PANICKED) {
                    let message = String::from_utf8_lossy(record.get(5..).unwrap_or_default());
                    let index = usize::try_from(first_index).unwrap_or(0) + position;
                    panicked = Error::task_panicked(index, message);
                    &panicked
                } else {
                    if run.is_none() {
                        out.push(0);
                        run = Some((out.len(), 0));
                        out.extend_from_slice(&[0; 8]);
                    }
                    if let Some((_, count)) = &mut run {
                        *count += 1;
                    }
                    match &mut span {
                        Some(s) if s.end == at.start => s.end = at.end,
                        _ => {
                            flush_span(&mut out, &mut span);
                            span = Some(at.clone());
                        }
                    }
                    continue;
                }
            }
            Relayed::Failed(error) => error,
        };
        flush_span(&mut out, &mut span);
        end_run(&mut out, &mut run);
        wire::put_failure(&mut out, failure);
    }
    flush_span(&mut out, &mut span);
    end_run(&mut out, &mut run);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        put_bytes(&mut out, payload);
        out
    }

    /// Consecutive records travel as one entry with the right count and length; a panic
    /// record and a failure split them, in task order.
    #[test]
    fn done_groups_records_and_keeps_failures_in_order() {
        let (a, b) = (record(0, b"aa"), record(0, b"bbb"));
        let panic = record(RECORD_PANICKED, b"boom");
        let d = record(0, b"d");
        let mut records = Vec::new();
        let mut at = |r: &[u8]| {
            let start = records.len();
            records.extend_from_slice(r);
            Relayed::Record(start..records.len())
        };
        let outcomes = vec![
            at(&a),
            at(&b),
            at(&panic),
            Relayed::Failed(Error::timeout(13, Duration::from_millis(5), true)),
            at(&d),
        ];
        let done = encode_done(
            1,
            9,
            10,
            RelayedOutcomes {
                busy: Duration::from_micros(3),
                outcomes,
                records,
                len: 5,
            },
        );
        let (header, body) = DoneHeader::decode(&done).expect("a DONE header");
        assert_eq!((header.tag.generation, header.tag.seq), (1, 9));
        let mut r = Reader(body);
        assert_eq!((r.u8(), r.u32()), (Some(0), Some(2)));
        assert_eq!(r.bytes(), Some([a, b].concat().as_slice()));
        assert_eq!(r.u8(), Some(1));
        assert_eq!(
            wire::read_failure(&mut r),
            Some(Error::task_panicked(12, "boom"))
        );
        assert_eq!(r.u8(), Some(1));
        assert_eq!(
            wire::read_failure(&mut r),
            Some(Error::timeout(13, Duration::from_millis(5), true))
        );
        assert_eq!((r.u8(), r.u32()), (Some(0), Some(1)));
        assert_eq!(r.bytes(), Some(d.as_slice()));
        assert!(r.0.is_empty());
    }
}
