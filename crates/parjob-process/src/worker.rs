//! The worker side: what `init()` runs in a process the driver started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender, IpcSharedMemory};
use parjob_core::{Backend, RemoteEntry, set_worker_identity};

use crate::build_id::build_id;
use crate::shared::receive;
use crate::wire::{
    ARENA_KEEP_MAX, Board, DONE_HEADER, ENV_INDEX, ENV_SERVER, FLAG_NEW_ARENA, FLAG_SHARED,
    FLAG_TIMED, Hello, MSG_DONE, MSG_FORGET, MSG_INIT_FAILED, MSG_READY, MSG_RUN, MSG_SHUTDOWN,
    MSG_WELCOME, PROTOCOL, RUN_HEADER, Shipment, read_u32, read_u64,
};

static IN_WORKER: AtomicBool = AtomicBool::new(false);

/// Whether this process was started as a worker (it may not have reached the loop yet).
pub(crate) fn started_as_worker() -> bool {
    server_name().is_some()
}

/// The driver's pid, as the worker marker gives it.
fn driver_pid() -> Option<libc::pid_t> {
    let value = std::env::var(ENV_SERVER).ok()?;
    value.split_once(':')?.0.parse().ok()
}

/// The driver's server name, if this process is a worker the driver started itself.
///
/// The variable reads `<driver pid>:<server name>`. A process a task starts inherits it, but
/// its parent is the worker, not the driver: it is not a worker (a parjob program a task runs
/// works normally).
fn server_name() -> Option<String> {
    let value = std::env::var(ENV_SERVER).ok()?;
    let (driver, name) = value.split_once(':')?;
    // SAFETY: getppid has no preconditions.
    let parent = unsafe { libc::getppid() };
    (driver.parse::<libc::pid_t>().ok()? == parent).then(|| name.to_string())
}

/// Whether this process is running the worker loop.
pub(crate) fn in_worker_loop() -> bool {
    IN_WORKER.load(Ordering::Relaxed)
}

/// The function every offset is measured from. Any function of this crate would do; this one
/// exists so that the choice is explicit and never inlined away.
#[inline(never)]
pub(crate) fn anchor() -> usize {
    std::hint::black_box(0x5eed)
}

/// Offset of `f` from [`anchor`] in this build.
pub(crate) fn offset_of(f: usize) -> i64 {
    (f as i64).wrapping_sub(anchor_address() as i64)
}

fn anchor_address() -> usize {
    let anchor: fn() -> usize = anchor;
    anchor as usize
}

/// The address at `offset` from [`anchor`] in this build.
fn address_at(offset: i64) -> usize {
    (anchor_address() as i64).wrapping_add(offset) as usize
}

/// Enters the worker loop if the driver started this process; returns at once otherwise.
pub fn init() {
    // `SharedSlice`s made from now on live in shared memory.
    parjob_core::set_shared_allocator(crate::shared::allocate);
    raise_descriptor_limit();
    let Some(server) = server_name() else {
        return;
    };
    IN_WORKER.store(true, Ordering::Relaxed);
    // Die with the driver (more exactly, with its thread that started this process). Set here
    // rather than between fork and exec, so that the driver can spawn with posix_spawn, whose
    // cost does not grow with the driver's memory as fork's does.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal number.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    // SAFETY: getppid has no preconditions.
    if driver_pid() != Some(unsafe { libc::getppid() }) {
        // The driver died before the signal was set: nobody is waiting for this worker.
        std::process::exit(0);
    }
    let code = match serve(server) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("parjob worker (pid {}): {message}", std::process::id());
            70
        }
    };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    std::process::exit(code);
}

fn serve(server: String) -> Result<(), String> {
    let index: usize = std::env::var(ENV_INDEX)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{ENV_INDEX} is missing or not a number"))?;
    set_worker_identity(Some((Backend::Process, index)));
    tune_malloc();
    let (board, board_handle) = Board::new().ok_or("cannot make the status board")?;
    let channel_error = |e: std::io::Error| format!("cannot make a channel: {e}");
    let (tasks_tx, tasks_rx) = ipc::bytes_channel().map_err(channel_error)?;
    let (big_tasks_tx, big_tasks_rx) = ipc::channel::<Shipment>().map_err(channel_error)?;
    let (results_tx, results_rx) = ipc::bytes_channel().map_err(channel_error)?;
    let (big_results_tx, big_results_rx) =
        ipc::channel::<IpcSharedMemory>().map_err(channel_error)?;
    let hello = Hello {
        protocol: PROTOCOL,
        build_id: build_id().to_string(),
        exe: std::env::current_exe()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| "<unknown executable>".into()),
        pid: std::process::id(),
        tasks: tasks_tx,
        big_tasks: big_tasks_tx,
        results: results_rx,
        big_results: big_results_rx,
        board: board_handle,
    };
    let door = IpcSender::<Hello>::connect(server)
        .map_err(|e| format!("cannot connect to the driver: {e}"))?;
    door.send(hello)
        .map_err(|e| format!("cannot greet the driver: {e}"))?;
    drop(door);

    // A driver that refuses this worker (another build) drops the channel: exit quietly.
    let Ok(welcome) = tasks_rx.recv() else {
        return Ok(());
    };
    if welcome.first() != Some(&MSG_WELCOME) || welcome.len() < 18 {
        return Err("the driver's welcome is malformed".into());
    }
    let max_nbytes = read_u64(&welcome, 1).unwrap_or(u64::MAX) as usize;
    if welcome[9] == 1 {
        let offset = read_u64(&welcome, 10).unwrap_or(0) as i64;
        // SAFETY: the driver sends offsets only after checking at the handshake that this
        // worker is the same build (same build-id), so `anchor + offset` is the address of the
        // `fn()` the driver measured in its own copy of this very binary.
        let initializer: fn() = unsafe { std::mem::transmute::<usize, fn()>(address_at(offset)) };
        if let Err(message) = catch_initializer(initializer) {
            let mut reply = vec![MSG_INIT_FAILED];
            reply.extend_from_slice(message.as_bytes());
            let _ = results_tx.send(&reply);
            return Ok(());
        }
    }
    results_tx
        .send(&[MSG_READY])
        .map_err(|e| format!("cannot reach the driver: {e}"))?;

    let mut out = Vec::new();
    // The shared segments reused for big frames, see `wire::FLAG_SHARED`.
    let mut task_arena: Option<IpcSharedMemory> = None;
    let mut result_arena: Option<IpcSharedMemory> = None;
    loop {
        // The driver gone (dropped without a shutdown, or dead) means: exit too.
        let Ok(message) = tasks_rx.recv() else {
            return Ok(());
        };
        match message.first() {
            Some(&MSG_RUN) if message.len() >= RUN_HEADER => {}
            Some(&MSG_FORGET) if message.len() >= 5 => {
                receive_shipments(
                    &big_tasks_rx,
                    read_u32(&message, 1).unwrap_or(0),
                    &mut task_arena,
                )?;
                continue;
            }
            Some(&MSG_SHUTDOWN) => return Ok(()),
            _ => return Err("the driver sent a malformed message".into()),
        }
        let flags = message[1];
        let offset = read_u64(&message, 2).unwrap_or(0) as i64;
        receive_shipments(
            &big_tasks_rx,
            read_u32(&message, 18).unwrap_or(0),
            &mut task_arena,
        )?;
        let frame: &[u8] = if flags & FLAG_SHARED != 0 {
            let len = read_u64(&message, 10).unwrap_or(0) as usize;
            task_arena
                .as_deref()
                .and_then(|arena| arena.get(..len))
                .ok_or("the driver announced a shared frame it did not send")?
        } else {
            &message[RUN_HEADER..]
        };
        // SAFETY: as for the initializer above: same build, checked at the handshake, so the
        // offset leads to the `RemoteEntry` the driver took from `ErasedBatch::remote_entry`.
        let entry: RemoteEntry =
            unsafe { std::mem::transmute::<usize, RemoteEntry>(address_at(offset)) };
        let timed = flags & FLAG_TIMED != 0;
        out.clear();
        out.extend_from_slice(&[MSG_DONE; DONE_HEADER]);
        let began = Instant::now();
        entry(frame, &mut out, &mut |position| {
            board.task_started(position, timed);
        });
        let busy = u64::try_from(began.elapsed().as_nanos()).unwrap_or(u64::MAX);
        out[1] = 0;
        out[2..10].copy_from_slice(&busy.to_le_bytes());
        let len = out.len() - DONE_HEADER;
        out[10..DONE_HEADER].copy_from_slice(&(len as u64).to_le_bytes());
        if len > max_nbytes {
            out[1] = FLAG_SHARED;
            match result_arena.as_mut().filter(|arena| arena.len() >= len) {
                Some(arena) => {
                    // SAFETY: the driver reads this arena only between a DONE and the next RUN,
                    // and this worker writes it only while running a frame: never both at once.
                    let shared = unsafe { arena.deref_mut() };
                    shared[..len].copy_from_slice(&out[DONE_HEADER..]);
                }
                None => {
                    out[1] |= FLAG_NEW_ARENA;
                    let arena = IpcSharedMemory::from_bytes(&out[DONE_HEADER..]);
                    big_results_tx
                        .send(arena.clone())
                        .map_err(|e| format!("cannot send shared outcomes: {e}"))?;
                    result_arena = (arena.len() <= ARENA_KEEP_MAX).then_some(arena);
                }
            }
            results_tx.send(&out[..DONE_HEADER])
        } else {
            results_tx.send(&out)
        }
        .map_err(|e| format!("cannot send outcomes: {e}"))?;
        if task_arena
            .as_ref()
            .is_some_and(|a| a.len() > ARENA_KEEP_MAX)
        {
            task_arena = None;
        }
        if out.capacity() > 64 << 20 {
            out = Vec::new();
        }
    }
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does: each
/// shared segment holds a descriptor in the driver and in every worker that maps it, and the
/// common soft limit of 1024 would cap a run at about a thousand live `SharedSlice`s.
pub(crate) fn raise_descriptor_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid resource and a valid, writable rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// Takes the `count` shipments a message announced from `big_tasks` and applies them.
fn receive_shipments(
    big_tasks: &IpcReceiver<Shipment>,
    count: u32,
    task_arena: &mut Option<IpcSharedMemory>,
) -> Result<(), String> {
    for _ in 0..count {
        let shipment = big_tasks
            .recv()
            .map_err(|e| format!("cannot receive shared memory: {e}"))?;
        if let Some(arena) = receive(shipment) {
            *task_arena = Some(arena);
        }
    }
    Ok(())
}

/// Runs the initializer, returning its panic message and location instead of printing them
/// (with `RUST_BACKTRACE=1` the default hook would also print a backtrace): the driver
/// reports the failure.
fn catch_initializer(initializer: fn()) -> Result<(), String> {
    parjob_core::catch_task(initializer)
}

/// Keeps big freed blocks in the worker's heap (glibc) instead of unmapping them.
///
/// A worker decodes each big argument into a fresh allocation; by default glibc maps every
/// block over 32 MiB anew and unmaps it when freed, so each big task pays a page fault per
/// page (a 50 MB `Vec<f64>` decoded in 45 ms instead of 11 ms). Blocks up to 256 MiB now come
/// from the heap, and up to 256 MiB of freed memory stays there for the next task. Set
/// `PARJOB_KEEP_MALLOC_DEFAULTS` to keep glibc's defaults (and its lower memory use).
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    if std::env::var_os("PARJOB_KEEP_MALLOC_DEFAULTS").is_none() {
        // SAFETY: mallopt only changes allocator parameters; called before the worker
        // allocates anything big, and a refused value (returned 0) leaves the defaults.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn twice(x: u64) -> u64 {
        x * 2
    }

    #[test]
    fn an_offset_from_the_anchor_leads_back_to_the_function() {
        let f: fn(u64) -> u64 = twice;
        let offset = offset_of(f as usize);
        // SAFETY: the address is `twice`'s own, in this same binary.
        let back: fn(u64) -> u64 = unsafe { std::mem::transmute(address_at(offset)) };
        assert_eq!(back(21), 42);
    }

    #[test]
    fn a_process_whose_parent_is_not_the_driver_is_not_a_worker() {
        // This test process was not started by a parjob driver.
        assert!(!started_as_worker());
    }
}
