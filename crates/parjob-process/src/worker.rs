//! The worker side: what `init()` runs in a process the driver started.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use ipc_channel::ipc::{self, IpcReceiver, IpcSender, IpcSharedMemory};
use parjob_core::{Backend, set_worker_identity};
use parjob_remote::{
    DoneHeader, Identity, InitFailed, Kind, RunHeader, Welcome, call_entry, call_initializer,
};

use crate::frame::{finish_done, task_frame};
use crate::mapping::Arena;
use crate::shared::receive;
use crate::wire::{
    ARENA_KEEP_MAX, Board, ENV_INDEX, ENV_SERVER, Forget, Hello, PROTOCOL, Shipment,
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

/// Enters the worker loop if the driver started this process; returns at once otherwise.
pub fn init() {
    // `SharedSlice`s made from now on live in shared memory.
    crate::shared::install();
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
        identity: Identity::current(PROTOCOL).encode(),
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
    let welcome =
        Welcome::decode(&welcome).map_err(|e| format!("the driver's welcome is malformed: {e}"))?;
    let max_nbytes = usize::try_from(welcome.max_nbytes).unwrap_or(usize::MAX);
    if let Some(initializer) = welcome.initializer {
        // SAFETY: the driver sends a welcome only after checking at the handshake that this
        // worker is the same build, and measured this offset with `CodeOffset::of_initializer`.
        if let Err(error) = unsafe { call_initializer(initializer) } {
            let reply = InitFailed {
                reason: error.to_string(),
            };
            let _ = results_tx.send(&reply.encode());
            return Ok(());
        }
    }
    results_tx
        .send(&[Kind::Ready.byte()])
        .map_err(|e| format!("cannot reach the driver: {e}"))?;

    let mut out = Vec::new();
    // The shared segments reused for big frames, see `frame`.
    let mut task_arena: Option<Arena> = None;
    let mut result_arena: Option<Arena> = None;
    loop {
        // The driver gone (dropped without a shutdown, or dead) means: exit too.
        let Ok(message) = tasks_rx.recv() else {
            return Ok(());
        };
        match Kind::of(&message) {
            Ok(Kind::Run) => {}
            Ok(Kind::Shutdown) => return Ok(()),
            Ok(Kind::Backend(Forget::KIND)) => {
                let forget = Forget::decode(&message)
                    .map_err(|e| format!("the driver sent a malformed message: {e}"))?;
                receive_shipments(&big_tasks_rx, forget.shipments, &mut task_arena)?;
                continue;
            }
            Ok(other) => return Err(format!("the driver sent an unexpected {other:?} message")),
            Err(e) => return Err(format!("the driver sent a malformed message: {e}")),
        }
        let (header, inline) = RunHeader::decode(&message)
            .map_err(|e| format!("the driver sent a malformed message: {e}"))?;
        receive_shipments(&big_tasks_rx, header.attachments, &mut task_arena)?;
        let frame = task_frame(&header, inline, task_arena.as_ref())?;
        out.clear();
        out.resize(DoneHeader::LEN, 0);
        let began = Instant::now();
        let mut on_start = |position| board.task_started(position, header.timed);
        // SAFETY: the driver sends frames only after checking at the handshake that this
        // worker is the same build, and measured the entry offset with `CodeOffset::of_entry`.
        unsafe { call_entry(header.entry, frame, &mut out, &mut on_start) }
            .map_err(|e| format!("cannot run a frame: {e}"))?;
        let busy = began.elapsed();
        let send = finish_done(
            &mut out,
            busy,
            max_nbytes,
            &mut result_arena,
            &big_results_tx,
        )?;
        results_tx
            .send(&out[..send])
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

/// Takes the `count` shipments a message announced from `big_tasks` and applies them.
fn receive_shipments(
    big_tasks: &IpcReceiver<Shipment>,
    count: u32,
    task_arena: &mut Option<Arena>,
) -> Result<(), String> {
    for _ in 0..count {
        let shipment = big_tasks
            .recv()
            .map_err(|e| format!("cannot receive shared memory: {e}"))?;
        if let Some(memory) = receive(shipment) {
            *task_arena = Some(Arena::new(memory));
        }
    }
    Ok(())
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

    #[test]
    fn a_process_whose_parent_is_not_the_driver_is_not_a_worker() {
        // This test process was not started by a parjob driver.
        assert!(!started_as_worker());
    }
}
