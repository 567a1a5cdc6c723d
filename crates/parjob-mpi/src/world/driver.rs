//! Rank 0's driver thread: the handshake, dispatching jobs to worker ranks, their `DONE`s,
//! beats, lost ranks and the shutdown.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, PoisonError, Weak};
use std::time::{Duration, Instant};

use mpi::topology::SimpleCommunicator;
use parjob_core::{Backend, Error, Job, SharedSegment, Transport, catch_task};
use parjob_remote::{DoneHeader, FrameAt, FrameTag, RunHeader};

use crate::wire::{
    self, BEAT_EVERY, Hello, NO_WORKER, PROTOCOL, Reader, TAG_BEAT, TAG_BYE, TAG_DONE, TAG_FORGET,
    TAG_HELLO, TAG_POOL, TAG_POOL_END, TAG_RUN, TAG_SEGMENT, TAG_SEGMENT_BYTES, TAG_STOP,
    TAG_UNREADABLE_RUN, TAG_WELCOME, put_bytes, put_u32, put_u64,
};

use super::bell::RankZeroBells;
use super::completer::{self, Completers};
use super::server::RUN_TRAILER;
use super::transport::{
    Awaited, Backoff, Inbox, PendingSend, SendBuffer, TAG_BROKEN, host_name, isend, message_count,
    process_gone, test_sends, transfer_allowance,
};
use super::{BYE_DEADLINE, Command, Driver, Encoded, HELLO_DEADLINE, RankInfo, silence_limit};

/// A job waiting for a rank with room: the ranks it may go to (`1..=ranks`), the ranks' local
/// pool it runs in, and its tasks, already encoded.
struct Queued {
    job: Job,
    ranks: usize,
    pool: u64,
    encoded: Result<Encoded, Error>,
}

/// A job out on a rank.
struct Out {
    job: Job,
    rank: usize,
    /// When the `RUN` was handed to MPI, and what making it cost: the batch's transport
    /// figures.
    sent_at: Instant,
    encode: Duration,
    bytes_sent: u64,
}

struct Slot {
    info: RankInfo,
    alive: bool,
    in_flight: usize,
    last_heard: Instant,
    same_host: bool,
    /// The index of the rank's first local worker among the workers of every rank before it
    /// (ranks in order): a batch's worker is this plus the local worker its `DONE` names.
    first_worker: usize,
    /// The `SharedSlice` segments this rank holds: each is sent once, before the first `RUN`
    /// that names it, and forgotten once the driver dropped it.
    segments: HashMap<u64, Weak<SharedSegment>>,
    /// Until when the rank may be silent beyond the silence limit: it is receiving segments
    /// rank 0 sent it and copying them into shared memory.
    quiet_until: Instant,
}

pub(super) struct DriverState<'w> {
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
    /// Jobs not sent yet, with the ranks and the local pool they may run on.
    queue: VecDeque<Queued>,
    /// The local pools with an initializer the ranks run, and on which ranks (`1..=ranks`).
    pools: HashMap<u64, usize>,
    out: HashMap<u64, Out>,
    next_id: u64,
    sends: Vec<PendingSend>,
    leaked: Vec<SendBuffer>,
    /// The ranks' messages, big ones arriving while the loop goes on.
    inbox: Inbox,
    host: String,
    last_check: Instant,
    last_beat: Instant,
    completers: Completers,
    /// The doorbells of the ranks on this host (`None` where FIFOs could not be made).
    bells: Option<RankZeroBells>,
    /// The ranks that rang rank 0 at least once: they ring for every message they send.
    ringing: BTreeSet<usize>,
    /// When every rank had answered the handshake.
    handshake_ended: Option<Instant>,
}

impl<'w> DriverState<'w> {
    pub(super) fn new(
        world: &'w SimpleCommunicator,
        size: usize,
        driver: Arc<Driver>,
        bells: Option<RankZeroBells>,
    ) -> Self {
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
            pools: HashMap::new(),
            out: HashMap::new(),
            next_id: 1,
            sends: Vec::new(),
            leaked: Vec::new(),
            inbox: Inbox::default(),
            host: host_name(),
            last_check: Instant::now(),
            last_beat: Instant::now(),
            completers: Completers::default(),
            bells,
            ringing: BTreeSet::new(),
            handshake_ended: None,
        }
    }

    fn handshaken(&self) -> bool {
        self.driver.ranks.get().is_some()
    }

    fn finish_handshake(&mut self, result: Result<Vec<RankInfo>, Error>) {
        self.handshake_ended.get_or_insert_with(Instant::now);
        let _ = self.driver.ranks.set(result);
        let (lock, ready) = &self.driver.ready;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        ready.notify_all();
    }

    /// After a panic of the driver loop: ends every job it holds, their tasks without an
    /// outcome failing with `why` (a job handed over just before the panic came back as
    /// "cancelled before it ran", which hid it), and keeps the buffers of sends MPI may still
    /// read for good.
    pub(super) fn abandon(mut self, why: &str) {
        if let Some(bells) = &mut self.bells {
            bells.remove_dir();
        }
        std::mem::forget(std::mem::take(&mut self.sends));
        std::mem::forget(std::mem::take(&mut self.leaked));
        let held = self
            .queue
            .drain(..)
            .map(|queued| queued.job)
            .chain(self.out.drain().map(|(_, out)| out.job));
        for mut job in held.collect::<Vec<_>>() {
            fail_rest(&mut job, |_| {
                Error::backend_unavailable(Backend::Mpi, why.to_string())
            });
            self.completers.complete(job, Duration::ZERO);
        }
    }

    /// The driver loop, until the program exits. Returns who to tell once MPI is finalized.
    pub(super) fn run(&mut self, inbox: Receiver<Command>) -> Option<Sender<()>> {
        if self.size < 2 {
            self.finish_handshake(Err(Error::backend_unavailable(
                Backend::Mpi,
                "the MPI world has only rank 0, so no rank runs tasks: start 2 ranks or more \
                 (`mpirun -n 3 ...`, `srun -n 3 ...`)"
                    .to_string(),
            )));
        }
        let mut backoff = Backoff::new();
        loop {
            assert!(
                !super::PANIC_DRIVER.swap(false, Ordering::Relaxed),
                "panic_driver_for_tests"
            );
            let mut busy = false;
            // Commands from the pools.
            loop {
                match inbox.try_recv() {
                    Ok(Command::Shutdown(done)) => {
                        self.shutdown();
                        return Some(done);
                    }
                    Ok(command) => {
                        self.command(command);
                        busy = true;
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.shutdown();
                        return None;
                    }
                }
            }
            while let Some((from, tag, bytes)) = self.inbox.next(self.world) {
                // A beat is no answer: the wait for the answers goes on as it was.
                busy |= tag != TAG_BEAT;
                self.receive(from, tag, bytes);
            }
            self.inbox.progress();
            busy |= self.inbox.arriving();
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
                    Ok(Command::Shutdown(done)) => {
                        self.shutdown();
                        return Some(done);
                    }
                    Ok(command) => self.command(command),
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.shutdown();
                        return None;
                    }
                }
                backoff.busy();
            } else if let Some(wait) = backoff.pause(
                if self.waiting_on_a_rank() {
                    Awaited::Answer
                } else {
                    Awaited::Hidden
                },
                self.every_awaited_rank_rings(),
            ) {
                // Jobs are out: poll MPI again, and take a new job at once.
                match inbox.recv_timeout(wait) {
                    Ok(Command::Shutdown(done)) => {
                        self.shutdown();
                        return Some(done);
                    }
                    Ok(command) => {
                        self.command(command);
                        backoff.busy();
                    }
                    Err(mpsc::RecvTimeoutError::Timeout) => {}
                    Err(mpsc::RecvTimeoutError::Disconnected) => {
                        self.shutdown();
                        return None;
                    }
                }
            }
        }
    }

    /// Whether a `DONE` is awaited that nothing else hides: a rank with jobs out has room
    /// for more (one the caller may be waiting on). While every busy rank is full, each holds
    /// a job queued behind the running ones, and a `DONE` picked up a little later costs
    /// nothing; polling less often then leaves the CPU to the workers.
    fn waiting_on_a_rank(&self) -> bool {
        self.slots
            .iter()
            .any(|s| s.alive && s.in_flight > 0 && s.in_flight < 2 * s.info.workers)
    }

    /// Whether every rank with jobs out rings rank 0's doorbell when it answers, a ring
    /// still wakes the driver, and nothing rank 0 sends is still going (MPI moves it on this
    /// thread's polls): then the driver sleeps until a ring instead of polling MPI for the
    /// answers.
    fn every_awaited_rank_rings(&self) -> bool {
        self.sends.is_empty()
            && self.bells.as_ref().is_some_and(RankZeroBells::listening)
            && self
                .slots
                .iter()
                .filter(|s| s.alive && s.in_flight > 0)
                .all(|s| self.ringing.contains(&s.info.rank))
    }

    /// A ring on rank 0's doorbell: the driver looks at MPI (the loop turns again), and the
    /// next ring wakes it again.
    fn rang(&mut self) {
        if let Some(bells) = &self.bells {
            bells.take_rings();
        }
    }

    /// A rank's beat: `[1]` when it rings rank 0's doorbell for every message (see `bell`),
    /// `[0]` or nothing when it does not (or no longer does). Only a rank rank 0 named the
    /// doorbells' directory to counts.
    fn beat_from(&mut self, rank: usize, bytes: &[u8]) {
        let Some(bells) = &mut self.bells else {
            return;
        };
        if bytes.first() == Some(&1) && bells.named(rank) {
            self.ringing.insert(rank);
        } else {
            self.ringing.remove(&rank);
        }
        bells.tidy(&self.ringing, self.handshake_ended);
    }

    /// A pool's command other than `Shutdown`.
    fn command(&mut self, command: Command) {
        match command {
            Command::Submit {
                job,
                ranks,
                pool,
                encoded,
            } => self.queue.push_back(Queued {
                job,
                ranks,
                pool,
                encoded,
            }),
            Command::OpenPool {
                pool,
                ranks,
                welcome,
            } => {
                self.pools.insert(pool, ranks);
                // Before any RUN for it: MPI keeps one sender's messages to a rank in order.
                let mut message = Vec::with_capacity(8 + welcome.len());
                put_u64(&mut message, pool);
                message.extend_from_slice(&welcome);
                self.send_to_ranks(ranks, TAG_POOL, &message);
            }
            Command::ClosePool { pool } => {
                // Jobs still queued for it (a daemon executor dropped with tasks pending)
                // would reach ranks that stopped the pool: they end now, their tasks
                // cancelled before they ran, as on the process backend.
                // (Ended on a completer thread: a future's done-callbacks may run.)
                let (closed, kept) = std::mem::take(&mut self.queue)
                    .into_iter()
                    .partition::<VecDeque<_>, _>(|queued| queued.pool == pool);
                self.queue = kept;
                for Queued { job, .. } in closed {
                    self.completers.complete(job, Duration::ZERO);
                }
                if let Some(ranks) = self.pools.remove(&pool) {
                    self.send_to_ranks(ranks, TAG_POOL_END, &pool.to_le_bytes());
                }
            }
            Command::Rang => self.rang(),
            Command::Shutdown(_) => {}
        }
    }

    /// Sends `message` to every live rank of `1..=ranks`.
    fn send_to_ranks(&mut self, ranks: usize, tag: i32, message: &[u8]) {
        let live: Vec<usize> = self
            .slots
            .iter()
            .filter(|s| s.alive && s.info.rank <= ranks)
            .map(|s| s.info.rank)
            .collect();
        for rank in live {
            if let Ok(send) = isend(self.world, rank, tag, message.to_vec()) {
                self.sends.push(send);
            }
        }
    }

    fn receive(&mut self, from: usize, tag: i32, bytes: Vec<u8>) {
        // A rank sends nothing while it receives a segment and copies it: once MPI is done
        // sending it every segment, anything it says ends its grace (a rank that hangs later
        // is lost after the silence limit, not after the grace).
        let sends = &self.sends;
        if let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == from) {
            let now = Instant::now();
            slot.last_heard = now;
            // (The pending sends are looked at only during a grace, not for every message.)
            if slot.quiet_until > now
                && !sends
                    .iter()
                    .any(|send| send.rank == from && matches!(send._buffer, SendBuffer::Segment(_)))
            {
                slot.quiet_until = now;
            }
        }
        match tag {
            TAG_HELLO => self.hello(from, &bytes),
            TAG_DONE => self.done(from, bytes),
            TAG_UNREADABLE_RUN => self.unreadable_run(from, &bytes),
            TAG_BROKEN => self.lose(from, "a message from it stopped halfway"),
            TAG_BEAT => self.beat_from(from, &bytes),
            _ => {} // BYE outside shutdown
        }
    }

    fn hello(&mut self, from: usize, bytes: &[u8]) {
        let refuse = |this: &mut Self, message: String| {
            this.hello_error
                .get_or_insert(Error::worker(from, format!("MPI rank {from}: {message}")));
            // Refused, with rank 0's pid and host all the same: the rank then notices rank 0's
            // end (it waits for STOP until then).
            let mut refusal = vec![0];
            put_u32(&mut refusal, std::process::id());
            put_bytes(&mut refusal, this.host.as_bytes());
            if let Ok(send) = isend(this.world, from, TAG_WELCOME, refusal) {
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
        // A rank on this host gets the doorbells' directory (see `bell`), the others nothing.
        let bells = match &mut self.bells {
            Some(bells) if hello.host == self.host => bells.add(from).unwrap_or_default(),
            _ => Vec::new(),
        };
        put_bytes(&mut welcome, &bells);
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
            let mut first_worker = 0;
            self.slots = ranks
                .iter()
                .map(|info| {
                    first_worker += info.workers;
                    Slot {
                        same_host: info.host == self.host,
                        info: info.clone(),
                        alive: true,
                        in_flight: 0,
                        last_heard: Instant::now(),
                        first_worker: first_worker - info.workers,
                        segments: HashMap::new(),
                        quiet_until: Instant::now(),
                    }
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
        while let Some(limit) = self.queue.front().map(|queued| queued.ranks) {
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
                let Some(Queued { mut job, .. }) = self.queue.pop_front() else {
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
                self.completers.complete(job, Duration::ZERO);
                continue;
            }
            let Some(best) = best else {
                break;
            };
            let Some(queued) = self.queue.pop_front() else {
                break;
            };
            self.send_job(queued, best);
            sent = true;
        }
        sent
    }

    fn send_job(&mut self, queued: Queued, slot: usize) {
        let Queued {
            mut job,
            pool,
            encoded,
            ..
        } = queued;
        if job.control().is_cancelled() || !job.mark_started() {
            self.completers.complete(job, Duration::ZERO);
            return;
        }
        let rank = self.slots[slot].info.rank;
        let id = self.next_id;
        self.next_id += 1;
        let Encoded {
            entry,
            tasks: mut buffer,
            segments,
            took: encode,
        } = match encoded {
            Ok(encoded) => encoded,
            Err(error) => {
                job.batch_mut().push_failure(error);
                self.completers.complete(job, Duration::ZERO);
                return;
            }
        };
        // Each segment the rank does not hold yet goes first, once (MPI keeps one sender's
        // messages to one rank in order, so it is there before the RUN).
        let mut bytes_sent = 0u64;
        for segment in &segments {
            if self.slots[slot].segments.contains_key(&segment.id()) {
                continue;
            }
            // The id, then the bytes straight from the segment's memory: a copy of a big
            // segment here took seconds per rank, with no beat meanwhile.
            let len = segment.memory().bytes().len();
            match self.send_segment(rank, segment) {
                Ok(()) => {
                    bytes_sent += 8 + len as u64;
                    let slot = &mut self.slots[slot];
                    slot.segments.insert(segment.id(), Arc::downgrade(segment));
                    // The rank says nothing while it receives the bytes and then copies them
                    // into shared memory of its node: give it that long, twice over.
                    let quiet = 2 * transfer_allowance(len as u64);
                    slot.quiet_until = slot.quiet_until.max(Instant::now()) + quiet;
                }
                Err(message) => {
                    let index = job.batch().first_index();
                    job.batch_mut().push_failure(Error::InvalidConfig(format!(
                        "task {index}: cannot send a SharedSlice's segment to MPI rank \
                         {rank}: {message}"
                    )));
                    self.completers.complete(job, Duration::ZERO);
                    return;
                }
            }
        }
        for segment in &segments {
            put_u64(&mut buffer, segment.id());
        }
        put_u64(&mut buffer, pool);
        put_u64(&mut buffer, job.batch().first_index() as u64);
        let header = RunHeader {
            tag: FrameTag {
                generation: rank as u64,
                seq: id,
            },
            timeout: job.control().timeout(),
            entry,
            frame: FrameAt::Inline,
            // The segment ids before the trailer: as many as a frame names, far below u32::MAX
            // (each is a shared memory segment of at least `SHARED_MIN_BYTES`).
            attachments: u32::try_from(segments.len()).unwrap_or(u32::MAX),
        };
        drop(segments);
        buffer.extend_from_slice(&header.encode());
        if super::BREAK_NEXT_RUN.swap(false, Ordering::SeqCst) {
            buffer.truncate(RUN_TRAILER / 2);
        }
        bytes_sent += buffer.len() as u64;
        match isend(self.world, rank, TAG_RUN, buffer) {
            Ok(send) => {
                let hold = super::HOLD_NEXT_DONE_MS.swap(0, Ordering::SeqCst);
                if hold > 0 {
                    self.inbox.hold_done(id, Duration::from_millis(hold));
                }
                self.sends.push(send);
                self.slots[slot].in_flight += 1;
                let out = Out {
                    job,
                    rank,
                    sent_at: Instant::now(),
                    encode,
                    bytes_sent,
                };
                self.out.insert(id, out);
            }
            Err(message) => {
                let index = job.batch().first_index();
                job.batch_mut().push_failure(Error::InvalidConfig(format!(
                    "task {index}: cannot send its batch to MPI rank {rank}: {message}; an MPI \
                     message holds at most 2 GiB: give big arguments as SharedSlices (sent \
                     once per rank, each in a message of its own) or set a smaller batch_size"
                )));
                self.completers.complete(job, Duration::ZERO);
            }
        }
    }

    /// Sends `segment` to `rank`: `SEGMENT` (its id), then `SEGMENT_BYTES` from its memory.
    fn send_segment(&mut self, rank: usize, segment: &Arc<SharedSegment>) -> Result<(), String> {
        // Over MPI's 2 GiB: refused before the id goes, so the rank never waits for bytes.
        message_count(segment.memory().bytes().len())?;
        let id = segment.id().to_le_bytes().to_vec();
        self.sends.push(isend(self.world, rank, TAG_SEGMENT, id)?);
        // (If this fails, the id's send stays in `sends`: MPI may still read its buffer. The
        // rank drops an announced id when the next `SEGMENT` comes.)
        let bytes = SendBuffer::Segment(Arc::clone(segment));
        self.sends
            .push(isend(self.world, rank, TAG_SEGMENT_BYTES, bytes)?);
        Ok(())
    }

    fn done(&mut self, from: usize, bytes: Vec<u8>) {
        let Ok((header, body)) = DoneHeader::decode(&bytes) else {
            return self.lose(from, "it sent a malformed DONE");
        };
        let mut r = Reader(body);
        let (Some(local_worker), Some(held)) = (r.u32(), r.u64()) else {
            return self.lose(from, "it sent a malformed DONE");
        };
        let body_at = bytes.len() - r.0.len();
        let received_at = Instant::now();
        let Some(Out {
            mut job,
            rank,
            sent_at,
            encode,
            bytes_sent,
        }) = self.out.remove(&header.tag.seq)
        else {
            return;
        };
        if let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == rank) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
            // The pool's workers are every rank's local workers, rank by rank: the trace and
            // the insights place the batch on the row of the local worker that ran it.
            if local_worker != NO_WORKER && (local_worker as usize) < slot.info.workers {
                job.ran_on(slot.first_worker + local_worker as usize);
            }
        }
        let host = self.host_of(rank);
        // `Transport` is non-exhaustive: filled field by field.
        let mut transport = Transport::default();
        transport.bytes_sent = bytes_sent;
        transport.bytes_received = bytes.len() as u64;
        transport.encode = encode;
        // The round trip less the time the frame spent on the rank (waiting behind other
        // frames for a local worker, then running): MPI's share both ways.
        transport.ipc = received_at
            .saturating_duration_since(sent_at)
            .saturating_sub(Duration::from_nanos(held).max(header.busy));
        let busy = header.busy;
        // Decoding runs the result type's `Deserialize`: user code, off the driver thread
        // (even cheap records add up: 12000 of 2 ms each stopped the beats for 24 s), and
        // apart from done-callbacks, which may block.
        self.completers.decode(move |callbacks| {
            read_outcomes(&mut job, &bytes[body_at..], rank, &host);
            transport.decode = received_at.elapsed();
            job.add_transport(&transport);
            completer::complete(callbacks, job, busy);
        });
    }

    /// An `UNREADABLE_RUN`: `rank` could not read the trailer of a `RUN` (nor its id). MPI
    /// keeps one sender's messages to one rank in order and ids grow in sending order, so it
    /// is the first job out on that rank after the last `RUN` it could read: that job fails
    /// with an error naming the rank, instead of waiting for a `DONE` that never comes.
    fn unreadable_run(&mut self, from: usize, bytes: &[u8]) {
        let mut r = Reader(bytes);
        let (Some(after), Some(why)) = (r.u64(), r.text()) else {
            return self.lose(from, "it sent a malformed UNREADABLE_RUN");
        };
        let Some(id) = self
            .out
            .iter()
            .filter(|(id, out)| out.rank == from && **id > after)
            .map(|(&id, _)| id)
            .min()
        else {
            return;
        };
        let Some(Out { mut job, .. }) = self.out.remove(&id) else {
            return;
        };
        if let Some(slot) = self.slots.iter_mut().find(|s| s.info.rank == from) {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        let host = self.host_of(from);
        let index = job.batch().first_index() + job.batch().outcomes_len();
        let error = Error::remote(
            index,
            format!(
                "task {index}: MPI rank {from} could not read the RUN message rank 0 sent it \
                 ({why}), so its tasks never ran"
            ),
        );
        job.batch_mut()
            .push_failure(Error::on_rank(from, host, error));
        self.completers.complete(job, Duration::ZERO);
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
        if let Some(bells) = &mut self.bells {
            bells.tidy(&self.ringing, self.handshake_ended);
        }
        if !self.handshaken() {
            if self.started.elapsed() > HELLO_DEADLINE {
                let missing: Vec<usize> = (1..self.size)
                    .filter(|r| !self.hellos.contains_key(r))
                    .collect();
                self.finish_handshake(Err(Error::backend_unavailable(
                    Backend::Mpi,
                    format!(
                        "MPI ranks {missing:?} did not say hello within {HELLO_DEADLINE:?}: \
                         they died or hung while starting (before their local pools were up), \
                         or their program does not call parjob::init() first thing in main"
                    ),
                )));
            }
            return;
        }
        self.forget_dropped_segments();
        let limit = silence_limit();
        let mut lost = Vec::new();
        for slot in self.slots.iter().filter(|s| s.alive) {
            if slot.same_host && process_gone(slot.info.pid) {
                lost.push((
                    slot.info.rank,
                    "its process is gone (killed or crashed)".to_string(),
                ));
            } else if slot.last_heard.elapsed() > limit
                && Instant::now() > slot.quiet_until
                && !self.inbox.arriving_from(slot.info.rank)
            {
                // (A rank receiving a big segment from rank 0, then copying it, says nothing
                // until it is done: `quiet_until`. One whose big message is still arriving is
                // speaking: that message has a deadline of its own.)
                let heard = slot.last_heard.elapsed();
                lost.push((
                    slot.info.rank,
                    format!(
                        "it sent nothing for {heard:.1?} (PARJOB_MPI_RANK_TIMEOUT is {limit:?})"
                    ),
                ));
            }
        }
        for (rank, reason) in lost {
            self.lose(rank, &reason);
        }
    }

    /// Tells each live rank which of the segments it holds the driver has dropped (the last
    /// `SharedSlice` of them is gone, and with it every job that named them), as the process
    /// backend tells its idle workers: the rank then frees its copy.
    fn forget_dropped_segments(&mut self) {
        for slot in self.slots.iter_mut().filter(|s| s.alive) {
            let dropped: Vec<u64> = slot
                .segments
                .iter()
                .filter(|(_, segment)| segment.strong_count() == 0)
                .map(|(&id, _)| id)
                .collect();
            if dropped.is_empty() {
                continue;
            }
            let mut message = Vec::with_capacity(8 * dropped.len());
            for id in dropped {
                slot.segments.remove(&id);
                put_u64(&mut message, id);
            }
            if let Ok(send) = isend(self.world, slot.info.rank, TAG_FORGET, message) {
                self.sends.push(send);
            }
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
        // What it was still sending will not come (MPI may still write those buffers).
        self.inbox.forget(rank);
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
                self.completers.complete(job, Duration::ZERO);
            }
        }
    }

    /// Tells every live rank to stop and waits (with a deadline) for their `BYE`s.
    fn shutdown(&mut self) {
        if let Some(bells) = &mut self.bells {
            bells.remove_dir();
        }
        // Jobs never sent, or out on ranks: complete them (their tasks count as cancelled).
        for Queued { job, .. } in self.queue.drain(..) {
            self.completers.complete(job, Duration::ZERO);
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
            while let Some((from, tag, bytes)) = self.inbox.next(self.world) {
                if tag == TAG_BYE {
                    waiting.retain(|&r| r != from);
                } else if tag == TAG_DONE {
                    self.done(from, bytes);
                }
            }
            self.inbox.progress();
            test_sends(&mut self.sends);
            std::thread::sleep(Duration::from_micros(200));
        }
        for (_, out) in self.out.drain() {
            self.completers.complete(out.job, Duration::ZERO);
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

/// Records `error(index)` for every task of `job` without an outcome.
fn fail_rest(job: &mut Job, error: impl Fn(usize) -> Error) {
    let batch = job.batch_mut();
    while batch.outcomes_len() < batch.len() {
        let index = batch.first_index() + batch.outcomes_len();
        batch.push_failure(error(index));
    }
}

/// Reads the outcomes of a `DONE`'s body (records and failures, in order) into `job`'s batch.
fn read_outcomes(job: &mut Job, mut body: &[u8], rank: usize, host: &str) {
    while let Some((&kind, rest)) = body.split_first() {
        let mut r = Reader(rest);
        match kind {
            0 => {
                let (Some(_count), Some(records)) = (r.u32(), r.bytes()) else {
                    break;
                };
                decode_guarded(job, records, rank, host);
            }
            1 => {
                let Some(error) = wire::read_failure(&mut r) else {
                    break;
                };
                // A task cancelled before it ran did not fail on the rank: it is reported as
                // any cancelled task is.
                let error = match error {
                    Error::Cancelled { .. } => error,
                    error => Error::on_rank(rank, host.to_string(), error),
                };
                job.batch_mut().push_failure(error);
            }
            _ => break,
        }
        body = r.0;
    }
}

/// Decodes the outcome `records` of `rank` into `job`'s batch, on a completer thread.
/// Decoding runs the result type's `Deserialize` (user code): a panic there fails the task
/// whose record it was, with the message the process backend gives, and the records after it
/// are decoded in turn.
fn decode_guarded(job: &mut Job, mut records: &[u8], rank: usize, host: &str) {
    loop {
        let before = job.batch().outcomes_len();
        let Err(message) = catch_task(|| job.batch_mut().decode_outcomes(records)) else {
            return;
        };
        // Outcomes are decoded in order: the panic was in the record after those taken.
        let taken = job.batch().outcomes_len().saturating_sub(before);
        for _ in 0..=taken {
            records = match skip_record(records) {
                Some(rest) => rest,
                None => &[],
            };
        }
        let index = job.batch().first_index() + job.batch().outcomes_len();
        let function = job.batch().function_name();
        let error = Error::codec(
            index,
            "decode the result of",
            function,
            format!("its Deserialize impl panicked: {message}"),
        );
        job.batch_mut()
            .push_failure(Error::on_rank(rank, host.to_string(), error));
        if records.is_empty() {
            return;
        }
    }
}

/// The records after the first of `records` (`[tag u8][len u32 LE][payload]` each).
fn skip_record(records: &[u8]) -> Option<&[u8]> {
    let len = records.get(1..5)?;
    let len = u32::from_le_bytes(len.try_into().ok()?) as usize;
    records.get(5 + len..)
}
