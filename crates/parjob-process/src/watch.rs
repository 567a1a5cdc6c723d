//! Watching a worker process from the driver: its end (without ever signalling a recycled pid)
//! and its output, forwarded a whole line at a time.

use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use parjob_core::WorkerExit;

/// A child process, killed only while it is known not to be reaped (so a recycled pid is
/// never signalled).
pub(crate) struct ChildWatch {
    pub(crate) pid: u32,
    reaped: Mutex<bool>,
}

impl ChildWatch {
    pub(crate) fn new(pid: u32) -> ChildWatch {
        ChildWatch {
            pid,
            reaped: Mutex::new(false),
        }
    }

    pub(crate) fn kill(&self) {
        let reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        if !*reaped {
            // SAFETY: the process is our child and not reaped, so `pid` still names it.
            unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGKILL) };
        }
    }

    /// Waits for the process to end without reaping it, then reaps it under the lock that
    /// `kill` takes. Returns how it ended.
    pub(crate) fn wait(&self) -> WorkerExit {
        loop {
            // SAFETY: zeroed siginfo_t is a valid out-parameter.
            let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
            // SAFETY: waiting on our own child with a valid out-pointer.
            let r = unsafe {
                libc::waitid(
                    libc::P_PID,
                    self.pid as libc::id_t,
                    &mut info,
                    libc::WEXITED | libc::WNOWAIT,
                )
            };
            if r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
        let mut reaped = self.reaped.lock().unwrap_or_else(PoisonError::into_inner);
        let mut status = 0;
        // SAFETY: reaping our own child, which has exited (or never existed: then -1).
        let r = unsafe { libc::waitpid(self.pid as libc::pid_t, &mut status, 0) };
        *reaped = true;
        if r < 0 {
            return WorkerExit::Lost("lost (its exit status could not be read)".into());
        }
        describe_status(status)
    }
}

/// How a process ended, from its `waitpid` status.
pub(crate) fn describe_status(status: libc::c_int) -> WorkerExit {
    if libc::WIFEXITED(status) {
        WorkerExit::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        WorkerExit::Signaled(libc::WTERMSIG(status))
    } else {
        WorkerExit::Lost(format!("ended with wait status {status:#x}"))
    }
}

/// Starts one of the small threads that watch a worker.
pub(crate) fn spawn_thread(
    name: String,
    body: impl FnOnce() + Send + 'static,
) -> Result<(), String> {
    std::thread::Builder::new()
        .name(name)
        .stack_size(256 << 10)
        .spawn(body)
        .map(drop)
        .map_err(|e| format!("cannot start a thread: {e}"))
}

/// Where a worker's pipe goes.
#[derive(Clone, Copy)]
pub(crate) enum Sink {
    Stdout,
    Stderr,
}

/// Copies a worker's output to ours a whole line at a time, so that lines of different
/// workers never interleave mid-line (stderr is unbuffered: one `eprintln!` may be several
/// writes). With `drop_banner`, the test harness's own `running 1 test` banner is dropped.
/// `done` is dropped when the pipe ends.
pub(crate) fn forward_lines(
    pipe: impl std::io::Read + Send + 'static,
    sink: Sink,
    prefix: Option<String>,
    drop_banner: bool,
    done: Sender<()>,
) {
    use std::io::{BufRead, Write};
    let body = move || {
        let _done = done;
        let mut reader = std::io::BufReader::new(pipe);
        let mut line = Vec::new();
        let mut banner = drop_banner && matches!(sink, Sink::Stdout);
        let prefix = prefix.unwrap_or_default();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if banner {
                if line == b"\n" {
                    continue;
                }
                banner = false;
                if line.starts_with(b"running 1 test") {
                    continue;
                }
            }
            let mut text = Vec::with_capacity(prefix.len() + line.len() + 1);
            text.extend_from_slice(prefix.as_bytes());
            text.extend_from_slice(&line);
            if !text.ends_with(b"\n") {
                text.push(b'\n');
            }
            let _ = match sink {
                Sink::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&text).and_then(|()| out.flush())
                }
                Sink::Stderr => std::io::stderr().lock().write_all(&text),
            };
        }
    };
    // Without the thread the output is lost, not the worker: nothing to report.
    let _ = spawn_thread("parjob-output".into(), body);
}

/// Waits (briefly) until the forwarders whose `done` senders `output_done` belongs to have
/// finished: a dead worker's last output is forwarded before its death is reported.
pub(crate) fn wait_for_output(output_done: &Receiver<()>) {
    let deadline = Instant::now() + Duration::from_millis(500);
    while let Ok(()) | Err(RecvTimeoutError::Timeout) =
        output_done.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    {
        if Instant::now() >= deadline {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_the_shell_says_them() {
        // Wait statuses as waitpid encodes them: exit code in the second byte, signal in the
        // low seven bits.
        assert_eq!(describe_status(3 << 8), WorkerExit::Exited(3));
        assert_eq!(describe_status(3 << 8).to_string(), "exit status 3");
        assert_eq!(describe_status(0), WorkerExit::Exited(0));
        assert_eq!(describe_status(0).to_string(), "exit status 0");
        assert_eq!(
            describe_status(libc::SIGABRT),
            WorkerExit::Signaled(libc::SIGABRT)
        );
        assert_eq!(
            describe_status(libc::SIGABRT).to_string(),
            "killed by signal 6 (SIGABRT)"
        );
        assert_eq!(
            describe_status(libc::SIGKILL).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(
            describe_status(libc::SIGSEGV).to_string(),
            "killed by signal 11 (SIGSEGV)"
        );
        assert_eq!(describe_status(40).to_string(), "killed by signal 40");
    }
}
