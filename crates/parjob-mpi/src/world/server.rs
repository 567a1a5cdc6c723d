//! A worker rank's server: its local process pool, the frames rank 0 sends it, and their
//! `DONE`s.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::mpsc::{self, Sender};
use std::time::{Duration, Instant};

use mpi::topology::SimpleCommunicator;
use parjob_core::{
    Error, Initializer, InitializerEntry, InitializerWith, Job, MAX_PROCESSES, Pool,
    ProcessOptions, Relayed, RelayedOutcomes, RemoteEntry, SharedSegment, cpu_count,
    panic_from_record, shared_memory_from,
};
use parjob_process::ProcessPool;
use parjob_remote::{DoneHeader, FrameAt, FrameTag, Identity, RunHeader, Welcome};

use crate::wire::{
    self, BEAT_EVERY, Hello, NO_WORKER, PROTOCOL, RECORD_PANICKED, Reader, TAG_BEAT, TAG_BYE,
    TAG_DONE, TAG_FORGET, TAG_HELLO, TAG_POOL, TAG_POOL_END, TAG_RUN, TAG_SEGMENT,
    TAG_SEGMENT_BYTES, TAG_STOP, TAG_UNREADABLE_RUN, TAG_WELCOME, put_bytes, put_u64,
};

use super::bell;
use super::transport::{
    Awaited, Backoff, Inbox, PendingSend, TAG_BROKEN, host_name, isend, process_gone, say,
    test_sends,
};
use super::{BYE_DEADLINE, EXIT_WITHOUT_FINALIZE, HELLO_DEADLINE, silence_limit};

/// How many local worker processes this rank runs, and what to tell the user about them:
/// `PARJOB_MPI_WORKERS_PER_RANK`, else this rank's share of the node's CPUs (see
/// [`default_workers`]). An unusable `PARJOB_MPI_WORKERS_PER_RANK` is an error naming it (rank
/// 0 reports it), not a guess: 0 or `abc` would otherwise pass unnoticed, and 5000 would start
/// 5000 processes on the node.
fn local_workers() -> Result<(usize, Option<String>), String> {
    let bound = affinity_cpus().unwrap_or_else(cpu_count);
    if let Some(value) = std::env::var_os("PARJOB_MPI_WORKERS_PER_RANK") {
        let text = value.to_string_lossy();
        return match text.trim().parse::<usize>() {
            Ok(n) if (1..=MAX_PROCESSES).contains(&n) => Ok((
                n,
                (n > bound && bound < job_cpus_on_node().unwrap_or(bound)).then(|| {
                    format!(
                        "PARJOB_MPI_WORKERS_PER_RANK={n} worker processes share the {bound} \
                         CPU(s) this rank is bound to (they inherit its binding); {UNBIND}"
                    )
                }),
            )),
            Ok(n) if n > MAX_PROCESSES => Err(format!(
                "PARJOB_MPI_WORKERS_PER_RANK={n} is more local worker processes than a rank \
                 starts (at most {MAX_PROCESSES}, as on the process backend): each is a copy \
                 of this program on this node"
            )),
            _ => Err(format!(
                "PARJOB_MPI_WORKERS_PER_RANK={text:?} is not a number of local worker \
                 processes: give a whole number from 1 to {MAX_PROCESSES}, or unset it to \
                 use this node's CPUs divided among its ranks"
            )),
        };
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
        // (An unusable value, 0 included, gives way to the next variable.)
        digits.parse::<usize>().ok().filter(|&n| n > 0)
    })
    .unwrap_or(1);
    let node = job_cpus_on_node().unwrap_or(bound).max(bound);
    Ok(default_workers(cpu_count(), bound, node, on_node))
}

/// How to give each rank its CPUs, for the notes of [`local_workers`].
const UNBIND: &str = "if the launcher bound it, launch with `mpirun --bind-to none` (Open MPI \
    binds each rank to a core or a socket unless oversubscribed) or give each task its CPUs \
    with `srun --cpus-per-task=N` (see docs/CLUSTER.md, \"Binding\")";

/// A rank's default local workers: its share of the node, the `node` CPUs the job has there
/// (all the node's, unless a cgroup confines the job to fewer) divided among
/// the `on_node` ranks on it, but no more than the `usable` CPUs it may use (its affinity and
/// any cgroup quota). The launcher may have bound each rank to its own CPUs already (`srun
/// --cpus-per-task`, `mpirun --bind-to socket` with a rank per socket): then its `bound` CPUs
/// are its share, not a node to divide again. A rank bound to fewer CPUs than its share also
/// gets a note for the user: part of the node stays idle (Open MPI binds one rank per node to
/// a single socket by default).
fn default_workers(
    usable: usize,
    bound: usize,
    node: usize,
    on_node: usize,
) -> (usize, Option<String>) {
    let share = (node / on_node.max(1)).max(1);
    let workers = usable.min(share).max(1);
    let note = (bound < share).then(|| {
        format!(
            "this rank is bound to {bound} of the {node} CPUs the job has on this node, fewer \
             than its share ({share}: {node} CPUs for {on_node} rank(s) on the node), so its \
             local pool runs {workers} worker process(es) and the rest of its share stays idle; \
             {UNBIND}"
        )
    });
    (workers, note)
}

/// The CPUs this process may run on (its affinity, as the launcher bound it); `None` if it
/// cannot be read.
fn affinity_cpus() -> Option<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes at most its
    // size into it, and CPU_COUNT only reads it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return None;
        }
        usize::try_from(libc::CPU_COUNT(&set))
            .ok()
            .filter(|&n| n > 0)
    }
}

/// The CPUs the job may use on this node: its cgroup's cpuset (Slurm's cgroups, a container's
/// `--cpuset-cpus`), else the node's online CPUs; `None` if neither can be read.
fn job_cpus_on_node() -> Option<usize> {
    cgroup_cpuset_cpus().or_else(|| {
        // SAFETY: sysconf only reads the name.
        let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
        usize::try_from(n).ok().filter(|&n| n > 0)
    })
}

/// The CPUs of this process's cgroup cpuset (v1 or v2), if it has one that can be read.
fn cgroup_cpuset_cpus() -> Option<usize> {
    let own = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let root = std::path::Path::new("/sys/fs/cgroup");
    for line in own.lines() {
        // v2: "0::/path"; v1: "3:cpuset:/path".
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next()?, fields.next()?, fields.next()?);
        let path = path.trim_start_matches('/');
        let (dirs, files): (Vec<_>, &[&str]) = if controllers.is_empty() {
            // The nearest group with the cpuset controller (the root has it).
            let mut dirs = Vec::new();
            for mount in [root.to_path_buf(), root.join("unified")] {
                let mut dir = Some(mount.join(path));
                while let Some(d) = dir.filter(|d| d.starts_with(&mount)) {
                    dir = d.parent().map(std::path::Path::to_path_buf);
                    dirs.push(d);
                }
            }
            (dirs, &["cpuset.cpus.effective"])
        } else if controllers.split(',').any(|c| c == "cpuset") {
            (
                vec![root.join("cpuset").join(path)],
                &["cpuset.effective_cpus", "cpuset.cpus"],
            )
        } else {
            continue;
        };
        for dir in dirs {
            for file in files {
                if let Some(n) = std::fs::read_to_string(dir.join(file))
                    .ok()
                    .and_then(|text| count_cpu_list(&text))
                {
                    return Some(n);
                }
            }
        }
    }
    None
}

/// The CPUs a kernel CPU list names (`0-3,8-11`, `5`); `None` for an empty or malformed one.
fn count_cpu_list(text: &str) -> Option<usize> {
    let mut count = 0usize;
    for part in text.trim().split(',').filter(|p| !p.is_empty()) {
        let (first, last) = match part.split_once('-') {
            Some((a, b)) => (a.parse::<usize>().ok()?, b.parse::<usize>().ok()?),
            None => {
                let n = part.parse::<usize>().ok()?;
                (n, n)
            }
        };
        count = count.checked_add(last.checked_sub(first)?.checked_add(1)?)?;
    }
    (count > 0).then_some(count)
}

/// Marks every descriptor of this rank above 2 close-on-exec, so that its local workers, and
/// what their tasks start, do not inherit the rank's MPI connections: Open MPI opens its
/// sockets without the flag, and a task that closed or wrote into them ended the rank (or kept
/// its connections open after it died). Called before each local pool starts and once rank
/// 0's `WELCOME` came (connections are made as they are first used); the flag changes nothing
/// for the rank itself, which never `exec`s.
fn keep_descriptors_from_workers() {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<libc::c_int> = entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse().ok())
        .filter(|&fd| fd > 2)
        .collect();
    for fd in fds {
        // SAFETY: F_GETFD and F_SETFD on a descriptor number: one closed since the listing
        // gives EBADF, and one opened again under that number only gains close-on-exec.
        unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFD);
            if flags >= 0 && flags & libc::FD_CLOEXEC == 0 {
                libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC);
            }
        }
    }
}

/// The rank server's loop. Returns the exit status: 0 after rank 0's `STOP`.
pub(super) fn serve(world: &SimpleCommunicator, rank: usize) -> i32 {
    let host = host_name();
    keep_descriptors_from_workers();
    let (workers, pool, error) = match local_workers() {
        Ok((workers, note)) => {
            if let Some(note) = note {
                say(&format!("parjob: MPI rank {rank} on {host}: {note}"));
            }
            match ProcessPool::new(workers, ProcessOptions::default()) {
                Ok(pool) => (workers, Some(pool), String::new()),
                Err(e) => (
                    workers,
                    None,
                    format!("its local process pool did not start: {e}"),
                ),
            }
        }
        Err(e) => (0, None, e),
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
    // The `DONE`s of frames the local pool finished, each made on the thread that finished it,
    // and the rings of rank 0's doorbell (see `bell`).
    let (done_tx, done_rx) = mpsc::channel::<Local>();
    let mut last_beat = Instant::now();
    // Rank 0's pid and whether it shares this host, from its WELCOME; when it last spoke.
    let mut rank0: Option<(u32, bool)> = None;
    let mut heard_from_0 = Instant::now();
    let mut last_check = Instant::now();
    let my_host = host_name();
    let mut backoff = Backoff::new();
    let mut segments = Segments::default();
    let mut pools = LocalPools::new(pool, workers, rank);
    // The id of the last RUN whose trailer this rank could read, for an UNREADABLE_RUN.
    let mut last_run = 0u64;
    // Frames handed to the local pools and not answered yet.
    let mut local_jobs = 0usize;
    // When each of those frames arrived, by id.
    let mut received: HashMap<u64, Instant> = HashMap::new();
    let mut inbox = Inbox::default();
    // This rank's doorbell, once it listens (see `bell`): whether it does, and its wakes.
    let mut rings: Option<Arc<bell::Rings>> = None;
    loop {
        let mut busy = false;
        while let Some((from, tag, bytes)) = inbox.next(world) {
            // A beat is no work: it does not start the polling that awaits the next call.
            busy |= tag != TAG_BEAT;
            if from != 0 {
                continue;
            }
            heard_from_0 = Instant::now();
            match tag {
                TAG_BROKEN => {
                    // Rank 0 died while sending: nobody will say STOP.
                    say(&format!(
                        "parjob: MPI rank {rank} on {my_host}: a message from rank 0 stopped \
                         halfway (rank 0 died?); the rank stops its local workers and leaves"
                    ));
                    drop(pools);
                    return 3;
                }
                // A refused rank (another build, no local pool) gets no RUN: it waits for STOP.
                TAG_WELCOME => {
                    welcomed = bytes.first() == Some(&1);
                    // The connection to rank 0 is made by now: keep it from later workers.
                    keep_descriptors_from_workers();
                    let mut r = Reader(bytes.get(1..).unwrap_or_default());
                    if let (Some(pid), Some(host)) = (r.u32(), r.text()) {
                        rank0 = Some((pid, host == my_host));
                    }
                    // Rank 0 shares this host: its doorbells' directory, if it could make one.
                    let bells = r.bytes().unwrap_or_default();
                    if welcomed && !bells.is_empty() && rings.is_none() {
                        let rung = done_tx.clone();
                        let wake = move || rung.send(Local::Rung).is_ok();
                        rings = bell::join(bells, rank, wake);
                        if rings.is_some() {
                            // Rank 0 learns that this rank rings from a beat, now.
                            last_beat = Instant::now().checked_sub(BEAT_EVERY).unwrap_or(last_beat);
                        }
                    }
                }
                TAG_SEGMENT if welcomed => segments.announced(&bytes),
                TAG_SEGMENT_BYTES if welcomed => {
                    segments.receive(&bytes);
                    // Copying a big segment takes seconds on a loaded node: rank 0 was not
                    // silent meanwhile, this rank was busy.
                    heard_from_0 = Instant::now();
                }
                TAG_FORGET => segments.forget(&bytes),
                TAG_POOL if welcomed => pools.open(&bytes),
                TAG_POOL_END => {
                    for frame in pools.close(&bytes) {
                        if let Some(t) = trailer(&frame) {
                            received.remove(&t.header.tag.seq);
                        }
                        // Its tasks never ran: cancelled, as on the process backend.
                        cancel_frame(rank, &frame, world, &mut sends);
                    }
                }
                TAG_RUN if welcomed => {
                    let Some(t) = trailer(&bytes) else {
                        refuse_unreadable(last_run, bytes.len(), world, &mut sends);
                        continue;
                    };
                    last_run = t.header.tag.seq;
                    let route = pools.route(&bytes);
                    if !matches!(route, Route::Refuse(_)) {
                        received.insert(t.header.tag.seq, Instant::now());
                    }
                    match route {
                        Route::Run(pool) => {
                            let frame = (bytes, &segments, &done_tx, &mut received);
                            local_jobs +=
                                usize::from(run_frame(pool, rank, frame, world, &mut sends));
                        }
                        Route::Held => pools.hold(bytes),
                        Route::Refuse(why) => refuse_frame(rank, &bytes, &why, world, &mut sends),
                    }
                }
                TAG_STOP => {
                    let finalize = bytes.first() == Some(&1);
                    drop(segments);
                    drop(pools);
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
        for frame in pools.started() {
            busy = true;
            match pools.route(&frame) {
                Route::Run(pool) => {
                    let frame = (frame, &segments, &done_tx, &mut received);
                    local_jobs += usize::from(run_frame(pool, rank, frame, world, &mut sends));
                }
                Route::Refuse(why) => {
                    if let Some(t) = trailer(&frame) {
                        received.remove(&t.header.tag.seq);
                    }
                    refuse_frame(rank, &frame, &why, world, &mut sends);
                }
                Route::Held => {}
            }
        }
        // A ring is no work: it only says to look at MPI again (next turn) and a while after.
        let mut rung = false;
        while let Ok(local) = done_rx.try_recv() {
            match local {
                Local::Done(done) => {
                    busy = true;
                    local_jobs = local_jobs.saturating_sub(1);
                    send_done(done, world, &mut sends);
                }
                Local::Rung => {
                    bell::looked(rings.as_deref());
                    rung = true;
                }
            }
        }
        inbox.progress();
        busy |= inbox.arriving();
        test_sends(&mut sends);
        if last_check.elapsed() >= Duration::from_millis(100) {
            last_check = Instant::now();
            let gone = match rank0 {
                Some((pid, true)) => process_gone(pid),
                _ => false,
            };
            // Rank 0 beats only once the handshake is over: silence counts from then. Before
            // it, rank 0 answers a HELLO at once (a WELCOME, or a refusal): a rank that heard
            // nothing long after rank 0 stopped waiting for hellos will never hear from it
            // (rank 0 died while starting).
            let never_answered =
                rank0.is_none() && heard_from_0.elapsed() > HELLO_DEADLINE + silence_limit();
            // (A big message from rank 0 still arriving is rank 0 speaking: it has a deadline
            // of its own.)
            let silent = rank0.is_some()
                && heard_from_0.elapsed() > silence_limit()
                && !inbox.arriving_from(0);
            if gone || never_answered || silent {
                // Rank 0 is lost (killed under --enable-recovery): nobody will say STOP. Stop
                // the local workers and leave without MPI_Finalize, rather than serve nobody.
                let why = if gone {
                    "rank 0's process is gone".to_string()
                } else {
                    format!(
                        "it heard nothing from rank 0 for {:?} (PARJOB_MPI_RANK_TIMEOUT)",
                        heard_from_0.elapsed()
                    )
                };
                say(&format!(
                    "parjob: MPI rank {rank} on {my_host}: {why}; the rank stops its local \
                     workers and leaves"
                ));
                drop(pools);
                return 3;
            }
        }
        if last_beat.elapsed() >= BEAT_EVERY {
            last_beat = Instant::now();
            // Whether this rank rings rank 0's doorbell (its listener runs): see `bell`.
            let rings_rank_0 = rings.as_ref().is_some_and(|rings| rings.listening());
            if let Ok(send) = isend(world, 0, TAG_BEAT, vec![u8::from(rings_rank_0)]) {
                sends.push(send);
            }
        }
        if busy {
            backoff.busy();
        } else if rung {
            backoff.woke();
        } else if let Some(wait) = backoff.pause(
            match local_jobs {
                0 => Awaited::Start,
                n if n <= workers => Awaited::Answer,
                _ => Awaited::Hidden,
            },
            // Rank 0 rings for every message it sends here (while this rank listens); MPI
            // moves this rank's own sends on its polls.
            rings.as_ref().is_some_and(|rings| rings.listening()) && sends.is_empty(),
        ) {
            // A local outcome ends the wait at once: its DONE goes without a polling delay.
            // So does a ring from rank 0. Without a doorbell, a RUN is polled for often while
            // the local pool is empty (the caller's next call waits on it), less and less often
            // while its frames run with none behind them (rank 0 may send one more), rarely
            // while one waits behind them.
            match done_rx.recv_timeout(wait) {
                Ok(Local::Done(done)) => {
                    local_jobs = local_jobs.saturating_sub(1);
                    send_done(done, world, &mut sends);
                    backoff.busy();
                }
                // Rank 0 sent something: look for it at once and for a little while (MPI may
                // not have it here yet).
                Ok(Local::Rung) => {
                    bell::looked(rings.as_deref());
                    backoff.woke();
                }
                Err(_) => {}
            }
        }
    }
}

/// Sends a `DONE` the local pool's thread made.
fn send_done(message: Vec<u8>, world: &SimpleCommunicator, sends: &mut Vec<PendingSend>) {
    if let Ok(send) = isend(world, 0, TAG_DONE, message) {
        sends.push(send);
    }
}

/// The most bytes one MPI message holds: MPI counts them in a C `int`.
const MAX_MESSAGE: usize = i32::MAX as usize;

/// `done`, the `DONE` of frame `id` (`len` tasks from `first_index`), if it is at most `limit`
/// bytes; otherwise a `DONE` failing each of those tasks with the reason. A `DONE` that cannot
/// be sent would leave rank 0 waiting for that job for ever.
fn fit_done(
    done: Vec<u8>,
    limit: usize,
    rank: usize,
    id: u64,
    first_index: u64,
    len: usize,
) -> Vec<u8> {
    if done.len() <= limit {
        return done;
    }
    let first = usize::try_from(first_index).unwrap_or(0);
    let why = format!(
        "they come to {} bytes, over the {limit} bytes of one MPI message; return less per \
         task, or give the run a smaller batch_size",
        done.len()
    );
    let outcomes = RelayedOutcomes {
        busy: Duration::ZERO,
        len,
        records: Vec::new(),
        outcomes: (0..len)
            .map(|i| {
                Relayed::Failed(Error::codec(
                    first + i,
                    "send",
                    "the results of its batch to rank 0",
                    why.clone(),
                ))
            })
            .collect(),
        worker: None,
    };
    encode_done(rank as u64, id, first_index, outcomes, Duration::ZERO)
}

/// The `SharedSlice` segments rank 0 sent this rank, each copied once into shared memory of
/// this node that the local worker processes map (the process backend's own segments, so its
/// pool ships them to its workers as it does its driver's).
#[derive(Default)]
struct Segments {
    held: HashMap<u64, Arc<SharedSegment>>,
    /// Segments whose shared memory could not be made here, with why: a frame naming one is
    /// answered with that error.
    failed: HashMap<u64, String>,
    /// The id the last `SEGMENT` announced, whose bytes come next.
    next: Option<u64>,
}

impl Segments {
    /// A `SEGMENT`: `[id u64]`, the id of the segment whose bytes come next.
    fn announced(&mut self, message: &[u8]) {
        self.next = Reader(message).u64();
    }

    /// A `SEGMENT_BYTES`: the bytes of the segment the last `SEGMENT` named.
    fn receive(&mut self, bytes: &[u8]) {
        let Some(id) = self.next.take() else {
            return;
        };
        match shared_memory_from(bytes) {
            Some(memory) => {
                self.held
                    .insert(id, Arc::new(SharedSegment::new(id, memory)));
            }
            None => {
                let why = format!(
                    "the {} bytes of the SharedSlice segment {id:#x} could not be put in \
                     shared memory on this rank (out of file descriptors or memory, or \
                     parjob::init() did not set up the process backend)",
                    bytes.len()
                );
                self.failed.insert(id, why);
            }
        }
    }

    /// A `FORGET`: rank 0 dropped these segments. Jobs still running keep theirs alive; the
    /// local pool tells its workers to unmap a segment once the last of them is dropped.
    fn forget(&mut self, message: &[u8]) {
        for id in message.chunks_exact(8) {
            let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
            self.held.remove(&id);
            self.failed.remove(&id);
        }
    }

    /// The segments `ids` names, or why one of them is not here.
    fn find(&self, ids: &[u8]) -> Result<Vec<Arc<SharedSegment>>, String> {
        ids.chunks_exact(8)
            .map(|id| {
                let id = u64::from_le_bytes(id.try_into().unwrap_or_default());
                match (self.held.get(&id), self.failed.get(&id)) {
                    (Some(segment), _) => Ok(Arc::clone(segment)),
                    (None, Some(why)) => Err(why.clone()),
                    (None, None) => Err(format!(
                        "the SharedSlice segment {id:#x} never reached this rank"
                    )),
                }
            })
            .collect()
    }
}

/// The bytes after a `RUN`'s tasks frame and segment ids: `[pool u64][first index u64]
/// [RunHeader]`.
pub(super) const RUN_TRAILER: usize = 8 + 8 + RunHeader::LEN;

/// What a `RUN`'s trailer says.
struct Trailer {
    /// Where the trailer starts in the message.
    at: usize,
    /// Where the segment ids start (the tasks frame ends).
    ids_at: usize,
    pool: u64,
    first_index: u64,
    header: RunHeader,
}

/// The trailer of `RUN` message `frame`, `None` when it is malformed.
fn trailer(frame: &[u8]) -> Option<Trailer> {
    let at = frame.len().checked_sub(RUN_TRAILER)?;
    let mut r = Reader(&frame[at..]);
    let pool = r.u64()?;
    let first_index = r.u64()?;
    let (header, _) = RunHeader::decode(r.0).ok()?;
    let ids_len = usize::try_from(header.attachments).ok()?.checked_mul(8)?;
    let ids_at = at.checked_sub(ids_len)?;
    Some(Trailer {
        at,
        ids_at,
        pool,
        first_index,
        header,
    })
}

/// Answers `RUN` `frame` at once with a failure of its first task saying `message`.
fn refuse_frame(
    rank: usize,
    frame: &[u8],
    message: &str,
    world: &SimpleCommunicator,
    sends: &mut Vec<PendingSend>,
) {
    if let Some(t) = trailer(frame) {
        let done = failed_done(rank, t.header.tag.seq, t.first_index, message);
        if let Ok(send) = isend(world, 0, TAG_DONE, done) {
            sends.push(send);
        }
    }
}

/// Answers a `RUN` whose pool was dropped on rank 0 before it could start: every task of it
/// is cancelled (a `DONE` whose first task is `Cancelled`; rank 0 cancels the rest).
fn cancel_frame(
    rank: usize,
    frame: &[u8],
    world: &SimpleCommunicator,
    sends: &mut Vec<PendingSend>,
) {
    let Some(t) = trailer(frame) else {
        return;
    };
    let outcomes = RelayedOutcomes {
        busy: Duration::ZERO,
        len: 1,
        records: Vec::new(),
        outcomes: vec![Relayed::Failed(Error::cancelled(
            usize::try_from(t.first_index).unwrap_or(usize::MAX),
        ))],
        worker: None,
    };
    let done = encode_done(
        rank as u64,
        t.header.tag.seq,
        t.first_index,
        outcomes,
        Duration::ZERO,
    );
    if let Ok(send) = isend(world, 0, TAG_DONE, done) {
        sends.push(send);
    }
}

/// Answers a `RUN` of `len` bytes whose trailer (and so its id) cannot be read: rank 0 fails
/// the first job it sent here after `last_run`, the last `RUN` this rank could read (only a
/// faulty rank 0 sends one; without an answer it would wait for that job for ever).
fn refuse_unreadable(
    last_run: u64,
    len: usize,
    world: &SimpleCommunicator,
    sends: &mut Vec<PendingSend>,
) {
    let mut message = Vec::new();
    put_u64(&mut message, last_run);
    let why = format!("a RUN of {len} bytes whose trailer is malformed");
    put_bytes(&mut message, why.as_bytes());
    if let Ok(send) = isend(world, 0, TAG_UNREADABLE_RUN, message) {
        sends.push(send);
    }
}

/// A `DONE` for frame `id` whose first task failed with `message` (the rest count as
/// cancelled).
fn failed_done(rank: usize, id: u64, first_index: u64, message: &str) -> Vec<u8> {
    let outcomes = RelayedOutcomes {
        busy: Duration::ZERO,
        len: 1,
        records: Vec::new(),
        outcomes: vec![Relayed::Failed(Error::remote(
            usize::try_from(first_index).unwrap_or(usize::MAX),
            format!("task {first_index}: {message}"),
        ))],
        worker: None,
    };
    encode_done(rank as u64, id, first_index, outcomes, Duration::ZERO)
}

/// One of the rank's local process pools.
enum LocalPool {
    /// Starting on a thread of its own (its workers run their initializer): the `RUN`s for
    /// it wait here.
    Starting(Vec<Vec<u8>>),
    Ready(ProcessPool),
    /// It did not start: why, for the `RUN`s sent to it.
    Failed(String),
}

/// The rank's local pools: pool 0, started with the rank, and one per `MpiPool` with an
/// initializer on rank 0, started when its `POOL` arrives and stopped at its `POOL_END`.
struct LocalPools {
    pools: HashMap<u64, LocalPool>,
    workers: usize,
    /// This rank, which the pools' `[rank R worker i] ` output prefixes name.
    rank: usize,
    started_tx: Sender<(u64, Result<ProcessPool, Error>)>,
    started_rx: mpsc::Receiver<(u64, Result<ProcessPool, Error>)>,
}

/// What to do with a `RUN`.
enum Route<'a> {
    Run(&'a ProcessPool),
    /// Kept until its pool has started.
    Held,
    Refuse(String),
}

impl LocalPools {
    fn new(first: Option<ProcessPool>, workers: usize, rank: usize) -> LocalPools {
        let (started_tx, started_rx) = mpsc::channel();
        let mut pools = HashMap::new();
        if let Some(pool) = first {
            pools.insert(0, LocalPool::Ready(pool));
        }
        LocalPools {
            pools,
            workers,
            rank,
            started_tx,
            started_rx,
        }
    }

    /// A `POOL`: `[pool u64][Welcome]`. The pool starts on a thread of its own, so that the
    /// rank goes on beating and serving while the initializers run (they may take minutes).
    fn open(&mut self, message: &[u8]) {
        let mut r = Reader(message);
        // Id 0 is the rank's first pool, and a pool in use is never replaced: dropping it here
        // would block this loop (and its heartbeats) while its supervisors are joined. Only a
        // faulty rank 0 sends either; its RUNs for that id meet the pool already there.
        let Some(id) = r
            .u64()
            .filter(|&id| id != 0 && !self.pools.contains_key(&id))
        else {
            return;
        };
        let options = match pool_options(r.0, self.rank) {
            Ok(options) => options,
            Err(why) => {
                self.pools.insert(id, LocalPool::Failed(why));
                return;
            }
        };
        let (workers, started) = (self.workers, self.started_tx.clone());
        keep_descriptors_from_workers();
        let spawned = std::thread::Builder::new()
            .name(format!("parjob-mpi-pool-{id}"))
            .spawn(move || {
                let _ = started.send((id, ProcessPool::new(workers, options)));
            });
        let pool = match spawned {
            Ok(_) => LocalPool::Starting(Vec::new()),
            Err(e) => LocalPool::Failed(format!("cannot start a thread for its local pool: {e}")),
        };
        self.pools.insert(id, pool);
    }

    /// A `POOL_END`: `[pool u64]`. The pool stops on a thread of its own (its supervisors
    /// are joined, its queued jobs answered as cancelled); one still starting is stopped once
    /// it has. Returns the `RUN`s held for it, for the caller to answer.
    fn close(&mut self, message: &[u8]) -> Vec<Vec<u8>> {
        let Some(id) = Reader(message).u64().filter(|&id| id != 0) else {
            return Vec::new();
        };
        match self.pools.remove(&id) {
            Some(LocalPool::Ready(pool)) => stop_aside(pool),
            Some(LocalPool::Starting(held)) => return held,
            _ => {}
        }
        Vec::new()
    }

    fn route(&self, frame: &[u8]) -> Route<'_> {
        let Some(t) = trailer(frame) else {
            return Route::Refuse("a malformed RUN".into());
        };
        match self.pools.get(&t.pool) {
            Some(LocalPool::Ready(pool)) => Route::Run(pool),
            Some(LocalPool::Starting(_)) => Route::Held,
            Some(LocalPool::Failed(why)) => Route::Refuse(why.clone()),
            None => Route::Refuse(format!("its local pool {} is not on this rank", t.pool)),
        }
    }

    fn hold(&mut self, frame: Vec<u8>) {
        if let Some(t) = trailer(&frame)
            && let Some(LocalPool::Starting(held)) = self.pools.get_mut(&t.pool)
        {
            held.push(frame);
        }
    }

    /// The pools that finished starting since the last call: the `RUN`s held for each
    /// (answered with its error if it failed). A pool closed meanwhile is stopped.
    fn started(&mut self) -> Vec<Vec<u8>> {
        let mut ready = Vec::new();
        while let Ok((id, result)) = self.started_rx.try_recv() {
            let Some(LocalPool::Starting(held)) = self.pools.remove(&id) else {
                if let Ok(pool) = result {
                    stop_aside(pool);
                }
                continue;
            };
            let pool = match result {
                Ok(pool) => LocalPool::Ready(pool),
                Err(e) => LocalPool::Failed(format!("its local pool did not start: {e}")),
            };
            self.pools.insert(id, pool);
            ready.extend(held);
        }
        ready
    }
}

/// Stops `pool` on a thread of its own: joining its supervisors may take a moment, and the
/// rank must go on serving meanwhile.
fn stop_aside(pool: ProcessPool) {
    let spawned = std::thread::Builder::new()
        .name("parjob-mpi-pool-stop".into())
        .spawn(move || drop(pool));
    // Without a thread, the pool stops here (the closure, with it, was dropped).
    drop(spawned);
}

/// The options of a local pool from a `POOL` message's options,
/// `[max_tasks_per_worker u64, 0 for none][prefix_output u8][welcome]`, `welcome` a
/// parjob-remote `Welcome` from rank 0 whose initializer is found in this process by its
/// offsets. Output prefixes, when asked for, name `rank`: `[rank R worker i] `.
fn pool_options(message: &[u8], rank: usize) -> Result<ProcessOptions, String> {
    let mut r = Reader(message);
    let (Some(max_tasks), Some(prefix)) = (r.u64(), r.u8()) else {
        return Err("a malformed POOL message".into());
    };
    let welcome = Welcome::decode(r.0).map_err(|e| e.to_string())?;
    let mut options = ProcessOptions::default();
    options.max_tasks_per_worker =
        (max_tasks > 0).then(|| usize::try_from(max_tasks).unwrap_or(usize::MAX));
    options.prefix_output = prefix == 1;
    options.output_label = Some(format!("rank {rank}"));
    options.max_nbytes = usize::try_from(welcome.max_nbytes).unwrap_or(usize::MAX);
    let Some(offset) = welcome.initializer else {
        return Ok(options);
    };
    // SAFETY: rank 0 sends POOL only to ranks it checked are this same build (by GNU
    // build-id) and welcomed; it measured `offset` with `CodeOffset::of_initializer` (or
    // `of_initializer_with`, for its entry), and it reached here unchanged. `entry_at` only
    // checks that the offset leads into this executable's code and turns it into an address.
    let found = unsafe { parjob_remote::entry_at(offset) }.map_err(|e| e.to_string())?;
    match welcome.with_args {
        None => {
            // SAFETY: the address is that of the `fn()` rank 0 measured the offset from (both
            // are function pointers of the same size); the local pool measures it again and
            // its workers call it as a `fn()`.
            let function: fn() = unsafe { std::mem::transmute::<RemoteEntry, fn()>(found) };
            options.initializer = Some(Initializer(function));
        }
        Some(with) => {
            // SAFETY: as above, for the initializer entry `InitializerWith::new` made for the
            // function's argument type, which rank 0 measured the offset from.
            let entry = unsafe { std::mem::transmute::<RemoteEntry, InitializerEntry>(found) };
            // SAFETY: as above: `function` was measured from the user's `fn(A)`; only its
            // address is kept, for the entry made for `A` to call.
            let function =
                unsafe { parjob_remote::entry_at(with.function) }.map_err(|e| e.to_string())?;
            options.initializer_with = Some(InitializerWith {
                entry,
                function: function as usize,
                args: with.args.into(),
                type_name: "the initializer rank 0 gave (a fn(A))",
            });
        }
    }
    Ok(options)
}

/// What wakes a rank server besides MPI.
enum Local {
    /// The `DONE` of a frame the local pool finished, made on the thread that finished it.
    Done(Vec<u8>),
    /// Rank 0 rang this rank's doorbell: a message from it is here.
    Rung,
}

/// Where a frame's outcomes go: `(frame id, first index, outcomes)`.
type DoneSender = Sender<Local>;

/// Hands one `RUN` (with the segments it may name, and where its outcomes go) to the local
/// pool; a frame that cannot be run is answered at once. Returns whether the pool took it
/// (its outcomes will come on the sender).
fn run_frame(
    pool: &ProcessPool,
    rank: usize,
    (mut frame, segments, done, received): (
        Vec<u8>,
        &Segments,
        &DoneSender,
        &mut HashMap<u64, Instant>,
    ),
    world: &SimpleCommunicator,
    sends: &mut Vec<PendingSend>,
) -> bool {
    let Some(Trailer {
        at,
        ids_at,
        first_index,
        header,
        ..
    }) = trailer(&frame)
    else {
        return false;
    };
    let id = header.tag.seq;
    let received_at = received.remove(&id).unwrap_or_else(Instant::now);
    let mut refuse = |message: String| {
        if let Ok(send) = isend(
            world,
            0,
            TAG_DONE,
            failed_done(rank, id, first_index, &message),
        ) {
            sends.push(send);
        }
        false
    };
    let attached = segments.find(&frame[ids_at..at]);
    frame.truncate(ids_at);
    let attached = match attached {
        Ok(attached) => attached,
        Err(why) => return refuse(why),
    };
    // SAFETY: rank 0 sends RUNs only after it checked this rank's identity (the same build,
    // by GNU build-id) and welcomed it; the offset reached here unchanged inside the message.
    let entry = match unsafe { parjob_remote::entry_at(header.entry) } {
        Ok(entry) => entry,
        Err(e) => return refuse(e.to_string()),
    };
    let done = done.clone();
    let first = first_index;
    let job = Job::relayed_with_segments(
        usize::try_from(first_index).unwrap_or(usize::MAX),
        entry,
        frame,
        attached,
        header.timeout,
        // The `DONE` is made here, on the local pool's thread that finished the frame: copying
        // a big result on the MPI thread kept it from beating for longer than a 1 s
        // `PARJOB_MPI_RANK_TIMEOUT`.
        move |outcomes| {
            let len = outcomes.len;
            let held = received_at.elapsed();
            let message = encode_done(rank as u64, id, first, outcomes, held);
            let _ = done.send(Local::Done(fit_done(
                message,
                MAX_MESSAGE,
                rank,
                id,
                first,
                len,
            )));
        },
    );
    match job {
        Ok(job) => {
            pool.submit(job);
            true
        }
        Err(e) => refuse(e.to_string()),
    }
}

/// The `DONE` for frame `id`: consecutive records travel as they are, a panic record or a
/// failure the local pool recorded as a failure entry (rank 0 wraps those in
/// `Error::OnRank`).
fn encode_done(
    rank: u64,
    id: u64,
    first_index: u64,
    outcomes: RelayedOutcomes,
    held: Duration,
) -> Vec<u8> {
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
    let worker = outcomes
        .worker
        .and_then(|w| u32::try_from(w).ok())
        .unwrap_or(NO_WORKER);
    wire::put_u32(&mut out, worker);
    // How long the frame was on this rank (queued behind others, then run): rank 0 takes it
    // out of the round trip, so that what it reports as IPC is the time on the wire.
    wire::put_u64(&mut out, wire::nanos(held));
    // Consecutive records travel as one `[0][count u32][len u32][records]` entry, copied in
    // one piece; a panic record among them ends the entry and travels as a failure.
    let put_records = |out: &mut Vec<u8>, bytes: &[u8], count: usize| {
        if count > 0 {
            out.push(0);
            wire::put_u32(out, u32::try_from(count).unwrap_or(u32::MAX));
            wire::put_bytes(out, bytes);
        }
    };
    let first = usize::try_from(first_index).unwrap_or(0);
    let mut position = 0; // the task the next outcome is for, from the frame's first
    for outcome in &outcomes.outcomes {
        match outcome {
            Relayed::Records { bytes, count } => {
                let run = records.get(bytes.clone()).unwrap_or_default();
                // Only the 5-byte record headers are read, to find panic records.
                let (mut start, mut at, mut pending) = (0, 0, 0);
                for _ in 0..*count {
                    let Some(&tag) = run.get(at) else {
                        break;
                    };
                    let len = run
                        .get(at + 1..at + 5)
                        .map_or(0, |l| u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize);
                    let end = (at + 5 + len).min(run.len());
                    if tag == RECORD_PANICKED {
                        put_records(&mut out, &run[start..at], pending);
                        let payload = &run[(at + 5).min(end)..end];
                        let panicked = panic_from_record(first + position, payload);
                        wire::put_failure(&mut out, &panicked);
                        (start, pending) = (end, 0);
                    } else {
                        pending += 1;
                    }
                    at = end;
                    position += 1;
                }
                put_records(&mut out, &run[start..at], pending);
            }
            Relayed::Failed(error) => {
                wire::put_failure(&mut out, error);
                position += 1;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::put_bytes;

    #[test]
    fn a_rank_runs_its_share_of_the_node_and_is_told_when_bound_to_less() {
        // (usable, bound, node CPUs, ranks on the node) -> (workers, a note?)
        let cases = [
            // Not bound: the node divided among its ranks (this machine under mpirun -n 3).
            ((16, 16, 16, 1), (16, false)),
            ((16, 16, 16, 2), (8, false)),
            ((2, 2, 2, 3), (1, false)),
            // A cgroup quota of 4 CPUs, no binding: 4 workers, nothing to say.
            ((4, 16, 16, 1), (4, false)),
            // srun --cpus-per-task=8, 2 tasks per node: each task's 8 CPUs are its share
            // (dividing them by 2 again left half the node idle).
            ((8, 8, 16, 2), (8, false)),
            // One rank per core, bound to it (mpirun -n 2 here binds each rank to a core).
            ((1, 1, 16, 16), (1, false)),
            ((1, 1, 2, 2), (1, false)),
            // One rank per node that Open MPI bound to one socket of two: told.
            ((8, 8, 16, 1), (8, true)),
            // srun without --cpus-per-task: one CPU per task.
            ((1, 1, 16, 2), (1, true)),
            // Two ranks bound to the same socket of two: their share, not the socket each.
            ((8, 8, 16, 4), (4, false)),
        ];
        for ((usable, bound, node, on_node), (workers, told)) in cases {
            let (got, note) = default_workers(usable, bound, node, on_node);
            assert_eq!(
                (got, note.is_some()),
                (workers, told),
                "{usable} usable, {bound} bound, {node} on the node, {on_node} ranks: {note:?}"
            );
            if let Some(note) = note {
                assert!(
                    note.contains(&format!("bound to {bound} of the {node} CPUs the job has"))
                        && note.contains("--bind-to none")
                        && note.contains("--cpus-per-task"),
                    "{note}"
                );
            }
        }
    }

    #[test]
    fn cpu_lists_are_counted_as_the_kernel_writes_them() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("5"), Some(1));
        assert_eq!(count_cpu_list("0,2,4-5"), Some(4));
        for bad in [
            "",
            "\n",
            "3-1",
            "a-b",
            "1-",
            "-",
            "0-99999999999999999999999",
        ] {
            assert_eq!(count_cpu_list(bad), None, "{bad:?}");
        }
        // This machine's, whatever it is: at least one CPU if readable.
        assert!(cgroup_cpuset_cpus().is_none_or(|n| n >= 1));
    }

    fn record(tag: u8, payload: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        put_bytes(&mut out, payload);
        out
    }

    /// A `DONE` over what one MPI message holds is not sent (rank 0 would wait for it for
    /// ever): each of its tasks fails instead, saying why, in a `DONE` that fits.
    #[test]
    fn a_done_too_big_for_one_message_fails_its_tasks() {
        let records = [record(0, &[7; 64]), record(0, &[8; 64])].concat();
        let outcomes = RelayedOutcomes {
            busy: Duration::ZERO,
            outcomes: vec![Relayed::Records {
                bytes: 0..records.len(),
                count: 2,
            }],
            records,
            len: 2,
            worker: Some(0),
        };
        let done = encode_done(1, 9, 20, outcomes, Duration::ZERO);
        let size = done.len();
        assert_eq!(fit_done(done.clone(), size, 1, 9, 20, 2), done);
        let fitted = fit_done(done, 100, 1, 9, 20, 2);
        let (header, body) = DoneHeader::decode(&fitted).expect("a DONE header");
        assert_eq!(header.tag.seq, 9);
        let mut r = Reader(body);
        r.u32();
        r.u64();
        for index in [20, 21] {
            assert_eq!(r.u8(), Some(1));
            let error = wire::read_failure(&mut r).expect("a failure").to_string();
            assert!(
                error.starts_with(&format!(
                    "task {index}: cannot send the results of its batch to rank 0: they come \
                     to {size} bytes, over the 100 bytes of one MPI message"
                )),
                "{error}"
            );
        }
        assert!(r.0.is_empty());
    }

    /// Consecutive records travel as one entry with the right count and length; a panic
    /// record and a failure split them, in task order.
    #[test]
    fn done_groups_records_and_keeps_failures_in_order() {
        let (a, b) = (record(0, b"aa"), record(0, b"bbb"));
        // A panic record says which local worker (1, pid 777) ran the task, then its message.
        let panic = record(
            RECORD_PANICKED,
            &[&1u32.to_le_bytes()[..], &777u32.to_le_bytes(), b"boom"].concat(),
        );
        let d = record(0, b"d");
        let run = a.len() + b.len() + panic.len();
        let records = [a.clone(), b.clone(), panic, d.clone()].concat();
        let outcomes = vec![
            Relayed::Records {
                bytes: 0..run,
                count: 3,
            },
            Relayed::Failed(Error::timeout(13, Duration::from_millis(5), true)),
            Relayed::Records {
                bytes: run..records.len(),
                count: 1,
            },
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
                worker: Some(2),
            },
            Duration::from_micros(70),
        );
        let (header, body) = DoneHeader::decode(&done).expect("a DONE header");
        assert_eq!((header.tag.generation, header.tag.seq), (1, 9));
        let mut r = Reader(body);
        assert_eq!(r.u32(), Some(2), "the local worker that ran it");
        assert_eq!(r.u64(), Some(70_000), "how long the frame was on the rank");
        assert_eq!((r.u8(), r.u32()), (Some(0), Some(2)));
        assert_eq!(r.bytes(), Some([a, b].concat().as_slice()));
        assert_eq!(r.u8(), Some(1));
        assert_eq!(
            wire::read_failure(&mut r),
            Some(Error::task_panicked_on(12, "boom", Some(1), Some(777)))
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
