//! Watching a worker process from the driver: its end (without ever signalling a recycled pid)
//! and its output, forwarded a whole line at a time.

use std::io::ErrorKind;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Condvar, Mutex, PoisonError};
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
            // The worker leads its own process group (made at its spawn): killing the group
            // kills the processes its tasks started too, or those a program that never reached
            // `init()` started (the second call is for a worker that left its group).
            // SAFETY: the process is our child and not reaped, so `pid` still names it; Linux
            // never reuses a pid that names a live process group either, so the group `pid`,
            // if there is one, is the one this process made.
            unsafe {
                libc::kill(-(self.pid as libc::pid_t), libc::SIGKILL);
                libc::kill(self.pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }

    /// Whether its waiter has reaped it: the process is gone, and so is its zombie.
    pub(crate) fn is_reaped(&self) -> bool {
        *self.reaped.lock().unwrap_or_else(PoisonError::into_inner)
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
        // Processes its tasks started and left running (in the background, or a crashed
        // task's children) go with it, however it ended (retired, crashed, killed): its group
        // outlives it until it is reaped, so this is still the group it was spawned into.
        // SAFETY: as in `kill`: the process is our child and not reaped yet.
        unsafe { libc::kill(-(self.pid as libc::pid_t), libc::SIGKILL) };
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

/// The longest piece of a line the driver holds before forwarding it: a worker that prints
/// without a newline (200 MB of it, say) cannot make the driver buffer it whole.
const LINE_PIECE_MAX: usize = 64 << 10;

/// One of a worker's output pipes as its forwarder goes through it: how many bytes it has taken
/// from the pipe and how many of those it has written out, so that the driver can wait, when a
/// `DONE` comes, until what the worker printed before sending it is out (see
/// [`Printed::wait_until_out`]).
pub(crate) struct Printed {
    /// The pipe's descriptor, for `poll`: only the forwarder polls it, and only the forwarder
    /// closes it (in [`PrintedCounts::pipe`]).
    fd: std::os::fd::RawFd,
    counts: Mutex<PrintedCounts>,
    changed: Condvar,
}

struct PrintedCounts {
    /// The driver's end of the pipe (non-blocking: it is only read once `poll` says so), closed
    /// when our own output is a pipe whose reader has gone.
    pipe: Option<std::fs::File>,
    /// Bytes read from the pipe: only read with the lock held, so that this plus what the pipe
    /// still holds is everything the worker has written to it.
    taken: u64,
    /// Bytes of those written out (or held as the start of a line not yet ended).
    out: u64,
    /// The pipe has ended, or its forwarder could not be started.
    ended: bool,
    /// A wait gave up on this forwarder (our own stdout does not take its lines, or a process
    /// a task left running keeps its pipe full): later waits do not wait for it until it has
    /// caught up (found its pipe empty).
    stalled: bool,
}

/// How long a `DONE` waits at most for the output printed before it.
const PRINTED_WAIT_MAX: Duration = Duration::from_millis(250);

impl Printed {
    /// Waits until what was written to the pipe so far is out (or the pipe ended), for no
    /// longer than `deadline`. Costs a lock and an `ioctl` when there is nothing to wait for.
    pub(crate) fn wait_until_out(&self, deadline: Instant) {
        let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(pipe) = counts
            .pipe
            .as_ref()
            .filter(|_| !counts.ended && !counts.stalled)
        else {
            return;
        };
        let mut waiting: libc::c_int = 0;
        // SAFETY: FIONREAD on a pipe this struct owns (open: the lock is held), with a valid
        // pointer to an int.
        if unsafe { libc::ioctl(pipe.as_raw_fd(), libc::FIONREAD, &mut waiting) } < 0 {
            return;
        }
        let target = counts.taken + u64::try_from(waiting).unwrap_or(0);
        while counts.out < target && !counts.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                counts.stalled = true;
                return;
            }
            counts = self
                .changed
                .wait_timeout(counts, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Waits until what every pipe of `printed` holds so far is out, for no longer than
    /// [`PRINTED_WAIT_MAX`] in all.
    pub(crate) fn wait_until_all_out(printed: &[std::sync::Arc<Printed>]) {
        let deadline = Instant::now() + PRINTED_WAIT_MAX;
        for pipe in printed {
            pipe.wait_until_out(deadline);
        }
    }

    fn update(&self, change: impl FnOnce(&mut PrintedCounts)) {
        change(&mut self.counts.lock().unwrap_or_else(PoisonError::into_inner));
        self.changed.notify_all();
    }

    /// Reads what the pipe holds into `buf`, waiting in `poll` while it is empty, and counts
    /// it as taken. Finding the pipe empty means the forwarder has caught up: a wait that gave
    /// up on it is made again from then on. `None` at the pipe's end (or an error that ends it).
    fn read(&self, buf: &mut [u8]) -> Option<usize> {
        use std::io::Read;
        loop {
            {
                let mut counts = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
                let read = match counts.pipe.as_ref() {
                    Some(mut pipe) => pipe.read(buf),
                    None => return None,
                };
                match read {
                    Ok(0) => return None,
                    Ok(n) => {
                        counts.taken += n as u64;
                        return Some(n);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => counts.stalled = false,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return None,
                }
            }
            let mut ready = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: polling one valid pollfd, with no timeout.
            let polled = unsafe { libc::poll(&mut ready, 1, -1) };
            if polled < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                return None;
            }
        }
    }
}

/// Copies a worker's output to ours a whole line at a time, so that lines of different
/// workers never interleave mid-line (stderr is unbuffered: one `eprintln!` may be several
/// writes). A line longer than [`LINE_PIECE_MAX`] goes in pieces of that size (another worker's
/// line may then fall between two pieces). With `drop_banner`, the test harness's own `running
/// 1 test` banner is dropped. `done` is dropped when the pipe ends. Returns how far it got, for
/// [`Printed::wait_until_out`].
pub(crate) fn forward_lines(
    pipe: impl Into<OwnedFd>,
    sink: Sink,
    prefix: Option<String>,
    drop_banner: bool,
    last_words: Option<LastWords>,
    done: Sender<()>,
) -> std::sync::Arc<Printed> {
    let pipe: OwnedFd = pipe.into();
    // Non-blocking, so that a read made under the lock never waits (`poll` said it may read,
    // but nothing else is relied on).
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(pipe.as_raw_fd(), libc::F_GETFL);
        if flags >= 0 {
            libc::fcntl(pipe.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
    }
    let printed = std::sync::Arc::new(Printed {
        fd: pipe.as_raw_fd(),
        counts: Mutex::new(PrintedCounts {
            pipe: Some(std::fs::File::from(pipe)),
            taken: 0,
            out: 0,
            ended: false,
            stalled: false,
        }),
        changed: Condvar::new(),
    });
    let forwarder = std::sync::Arc::clone(&printed);
    let body = move || {
        let _done = done;
        let banner = drop_banner && matches!(sink, Sink::Stdout);
        let prefix = prefix.unwrap_or_default();
        let mut lines = Lines::new(prefix.as_bytes(), banner);
        // What one read gives is written in one go (a `yes` left running by a task once took
        // a write per 4-byte line): whole lines, and no other thread of ours writes between.
        let mut text = Vec::new();
        let hear = |text: &[u8]| {
            if let Some(last_words) = &last_words {
                last_words.hear(text);
            }
        };
        let mut buf = vec![0; LINE_PIECE_MAX];
        let mut reader_gone = false;
        while let Some(n) = forwarder.read(&mut buf) {
            lines.feed(&buf[..n], &mut |piece: &[u8]| text.extend_from_slice(piece));
            hear(&text);
            reader_gone = !write_whole(sink, &text);
            text.clear();
            if reader_gone {
                break;
            }
            forwarder.update(|counts| counts.out += n as u64);
            if text.capacity() > 4 * LINE_PIECE_MAX {
                text = Vec::new();
            }
        }
        if !reader_gone {
            lines.end(&mut |piece: &[u8]| text.extend_from_slice(piece));
            hear(&text);
            write_whole(sink, &text);
        }
        // Our output is a pipe whose reader has gone (`prog | head`): closing the worker's
        // pipe gives the task its own broken pipe at its next line (a `println!` panics, as
        // it would on threads) rather than run on with its output dropped. At the pipe's end,
        // closing it now (not when the worker is dropped) lets a pool that waited for `done`
        // have no pipe of a dead worker open.
        forwarder.update(|counts| {
            counts.pipe = None;
            counts.ended = true;
        });
    };
    // Without the thread the output is lost, not the worker: nothing to report.
    if spawn_thread("parjob-output".into(), body).is_err() {
        printed.update(|counts| counts.ended = true);
    }
    printed
}

/// Writes `text` whole to our stdout or stderr, under std's lock (so that no other thread of
/// this process writes between) and straight to the descriptor, waiting while a non-blocking
/// one is full. `false` if its reader has gone (a broken pipe). A closed descriptor drops the
/// text, as std's own `println!` does; any other error (a full disk) is said once on stderr
/// and the text dropped.
fn write_whole(sink: Sink, text: &[u8]) -> bool {
    use std::io::Write;
    let written = match sink {
        Sink::Stdout => {
            let mut out = std::io::stdout().lock();
            let _ = out.flush();
            write_lines_to(libc::STDOUT_FILENO, text)
        }
        Sink::Stderr => {
            let _err = std::io::stderr().lock();
            write_lines_to(libc::STDERR_FILENO, text)
        }
    };
    match written {
        Ok(()) => true,
        Err(e) if e.kind() == ErrorKind::BrokenPipe => false,
        Err(e) if e.raw_os_error() == Some(libc::EBADF) => true,
        Err(e) => {
            static SAID: std::sync::Once = std::sync::Once::new();
            SAID.call_once(|| {
                let which = match sink {
                    Sink::Stdout => "stdout",
                    Sink::Stderr => "stderr",
                };
                crate::say_whole_line(&format!(
                    "parjob: cannot write a worker's output to {which}: {e}; what cannot be \
                     written is dropped"
                ));
            });
            true
        }
    }
}

/// The most bytes one `write` to a pipe puts in it whole, never mixed with another's
/// (POSIX's `PIPE_BUF`, 4096 on Linux).
const ATOMIC_WRITE_MAX: usize = 4096;

/// `write_to` in writes of whole lines of at most [`ATOMIC_WRITE_MAX`] bytes together (a
/// longer line alone), so that when our stdout and stderr are one pipe (`2>&1 | less`), the
/// other forwarder's writes fall between lines, never inside one.
fn write_lines_to(fd: std::os::fd::RawFd, text: &[u8]) -> std::io::Result<()> {
    line_groups(text).try_for_each(|group| write_to(fd, group))
}

/// `text` cut into groups of whole lines of at most [`ATOMIC_WRITE_MAX`] bytes, a longer line
/// (or an unended last one) alone.
fn line_groups(mut text: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || {
        if text.is_empty() {
            return None;
        }
        let cut = if text.len() <= ATOMIC_WRITE_MAX {
            text.len()
        } else {
            match text[..ATOMIC_WRITE_MAX].iter().rposition(|&b| b == b'\n') {
                Some(newline) => newline + 1,
                None => text
                    .iter()
                    .position(|&b| b == b'\n')
                    .map_or(text.len(), |newline| newline + 1),
            }
        };
        let (group, rest) = text.split_at(cut);
        text = rest;
        Some(group)
    })
}

/// `write` until all of `text` is written, waiting in `poll` while `fd` is full.
fn write_to(fd: std::os::fd::RawFd, mut text: &[u8]) -> std::io::Result<()> {
    while !text.is_empty() {
        // SAFETY: writing from a valid buffer of `text.len()` bytes; a descriptor that is not
        // open gives EBADF.
        let n = unsafe { libc::write(fd, text.as_ptr().cast(), text.len()) };
        if n > 0 {
            text = &text[n.unsigned_abs().min(text.len())..];
            continue;
        }
        if n == 0 {
            return Err(ErrorKind::WriteZero.into());
        }
        let e = std::io::Error::last_os_error();
        match e.kind() {
            ErrorKind::Interrupted => {}
            ErrorKind::WouldBlock => {
                let mut ready = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: polling one valid pollfd, with no timeout.
                unsafe { libc::poll(&mut ready, 1, -1) };
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// What [`forward_lines`] does with the bytes it reads, writing through `write`: each line (or
/// piece of a long one) once, its prefix before it, and a newline after a last line that
/// lacks one.
struct Lines<'a> {
    prefix: &'a [u8],
    /// Still to drop the test harness's banner (and the empty lines before it).
    banner: bool,
    /// The line being read, not yet ended (shorter than [`LINE_PIECE_MAX`]).
    piece: Vec<u8>,
    /// Whether the next byte written starts a line.
    at_line_start: bool,
    text: Vec<u8>,
}

impl<'a> Lines<'a> {
    fn new(prefix: &'a [u8], banner: bool) -> Lines<'a> {
        Lines {
            prefix,
            banner,
            piece: Vec::new(),
            at_line_start: true,
            text: Vec::new(),
        }
    }

    /// Takes the next bytes read, writing the lines (and pieces) they complete.
    fn feed(&mut self, mut bytes: &[u8], write: &mut impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            if self.prefix.is_empty() && !self.banner && self.piece.is_empty() {
                // Nothing to add to a line and none held: the whole lines at hand go on as
                // they are, many at once (a `yes` prints 2-byte lines).
                let window = &bytes[..bytes.len().min(LINE_PIECE_MAX)];
                if let Some(newline) = window.iter().rposition(|&b| b == b'\n') {
                    write(&bytes[..=newline]);
                    self.at_line_start = true;
                    bytes = &bytes[newline + 1..];
                    continue;
                }
            }
            let room = LINE_PIECE_MAX - self.piece.len();
            let available = &bytes[..bytes.len().min(room)];
            match available.iter().position(|&b| b == b'\n') {
                Some(newline) => {
                    self.piece.extend_from_slice(&available[..=newline]);
                    bytes = &bytes[newline + 1..];
                    self.write_piece(write);
                }
                None => {
                    self.piece.extend_from_slice(available);
                    bytes = &bytes[available.len()..];
                    if self.piece.len() == LINE_PIECE_MAX {
                        self.write_piece(write);
                    }
                }
            }
        }
    }

    /// The pipe ended: writes what is held, and ends its line.
    fn end(&mut self, write: &mut impl FnMut(&[u8])) {
        if !self.piece.is_empty() {
            self.write_piece(write);
        }
        if !self.at_line_start {
            write(b"\n");
        }
    }

    fn write_piece(&mut self, write: &mut impl FnMut(&[u8])) {
        let ends_line = self.piece.ends_with(b"\n");
        if self.banner && self.at_line_start && ends_line {
            if self.piece == b"\n" {
                self.piece.clear();
                return;
            }
            self.banner = false;
            if self.piece.starts_with(b"running 1 test") {
                self.piece.clear();
                return;
            }
        }
        self.text.clear();
        if self.at_line_start {
            self.text.extend_from_slice(self.prefix);
        }
        self.text.extend_from_slice(&self.piece);
        write(&self.text);
        self.at_line_start = ends_line;
        self.piece.clear();
        if self.text.capacity() > 2 * LINE_PIECE_MAX {
            self.text = Vec::new();
        }
    }
}

/// The lines of a worker's stderr that name why it died, kept as they are forwarded: the Rust
/// runtime's stack overflow and fatal errors, and the C library's heap and stack checks (which
/// abort). A task's own output that happens to say the same is taken for them.
#[derive(Clone, Default)]
pub(crate) struct LastWords(std::sync::Arc<Mutex<Vec<String>>>);

/// Lines that contain one of these name a worker's death.
const FATAL_MARKS: [&str; 10] = [
    "has overflowed its stack",
    "fatal runtime error:",
    "free(): ",
    "malloc(): ",
    "realloc(): ",
    "munmap_chunk(): ",
    "double free or corruption",
    "corrupted size vs. prev_size",
    "*** stack smashing detected ***",
    "*** buffer overflow detected ***",
];

/// How many such lines are kept (the last ones), and how much of each.
const LAST_WORDS_LINES: usize = 2;
const LAST_WORDS_CHARS: usize = 200;

impl LastWords {
    /// Notes the lines of `text` (whole lines, or a piece of a long one) that name a death.
    fn hear(&self, text: &[u8]) {
        let text = String::from_utf8_lossy(text);
        // Most output names none: one search per mark over all of it, not per line.
        if !FATAL_MARKS.iter().any(|mark| text.contains(mark)) {
            return;
        }
        for line in text.split('\n') {
            self.hear_line(line);
        }
    }

    /// Notes `text`, one line, if it names a death.
    fn hear_line(&self, text: &str) {
        let Some(at) = FATAL_MARKS.iter().filter_map(|mark| text.find(mark)).min() else {
            return;
        };
        // From the start of the runtime's sentence (`thread 'main' has overflowed ...`), or
        // from the mark itself.
        let start = text[..at].rfind("thread '").unwrap_or(at);
        let said: String = text[start..]
            .trim_end()
            .chars()
            .take(LAST_WORDS_CHARS)
            .collect();
        let mut kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        kept.push(said);
        if kept.len() > LAST_WORDS_LINES {
            kept.remove(0);
        }
    }

    /// What was heard, the lines joined with `; `; `None` if nothing.
    pub(crate) fn said(&self) -> Option<String> {
        let kept = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        (!kept.is_empty()).then(|| kept.join("; "))
    }
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

    /// What the forwarder writes for `input`, read in chunks of every size from 1 byte up.
    fn forwarded(input: &[u8], prefix: &str, banner: bool) -> Vec<Vec<u8>> {
        let whole = forwarded_in_chunks(input, prefix, banner, input.len().max(1));
        for chunk in [1, 2, 3, 7, LINE_PIECE_MAX - 1, LINE_PIECE_MAX + 1] {
            let chunked = forwarded_in_chunks(input, prefix, banner, chunk);
            assert_eq!(chunked.concat(), whole.concat(), "chunks of {chunk}");
        }
        whole
    }

    fn forwarded_in_chunks(input: &[u8], prefix: &str, banner: bool, chunk: usize) -> Vec<Vec<u8>> {
        let mut writes = Vec::new();
        let mut write = |text: &[u8]| writes.push(text.to_vec());
        let mut lines = Lines::new(prefix.as_bytes(), banner);
        for bytes in input.chunks(chunk) {
            lines.feed(bytes, &mut write);
        }
        lines.end(&mut write);
        writes
    }

    #[test]
    fn a_dying_workers_stack_overflow_and_heap_checks_are_heard_and_nothing_else() {
        let heard = LastWords::default();
        heard.hear(b"computing 3 of 10\n");
        assert_eq!(heard.said(), None);
        heard.hear(b"\n");
        heard.hear(b"thread 'main' has overflowed its stack\n");
        heard.hear(b"fatal runtime error: stack overflow, aborting\n");
        assert_eq!(
            heard.said().as_deref(),
            Some(
                "thread 'main' has overflowed its stack; fatal runtime error: stack overflow, aborting"
            )
        );
        let heard = LastWords::default();
        heard.hear(b"free(): double free detected in tcache 2\n");
        heard.hear(b"an unrelated line\n");
        assert_eq!(
            heard.said().as_deref(),
            Some("free(): double free detected in tcache 2")
        );
        // Only the last two, each cut short.
        let heard = LastWords::default();
        for i in 0..5 {
            heard.hear(format!("malloc(): corrupted top size {i}{}\n", "x".repeat(500)).as_bytes());
        }
        let said = heard.said().unwrap();
        assert!(said.starts_with("malloc(): corrupted top size 3"), "{said}");
        assert_eq!(said.len(), 2 * LAST_WORDS_CHARS + 2, "{said}");
    }

    #[test]
    fn lines_are_forwarded_whole_with_their_prefix() {
        let writes = forwarded(b"one\ntwo\nthree", "[w] ", false);
        assert_eq!(
            writes,
            [&b"[w] one\n"[..], b"[w] two\n", b"[w] three", b"\n"]
        );
        let writes = forwarded(b"\nrunning 1 test\nhello\n", "", true);
        assert_eq!(writes, [b"hello\n"], "the harness's banner is dropped");
    }

    #[test]
    fn whole_lines_without_a_prefix_go_on_many_at_once() {
        let input: Vec<u8> = b"y\n".repeat(3 * LINE_PIECE_MAX / 4);
        let writes = forwarded_in_chunks(&input, "", false, input.len());
        assert_eq!(writes.len(), 2, "a piece's worth of lines at a time");
        assert!(
            writes
                .iter()
                .all(|w| w.len() <= LINE_PIECE_MAX && w.ends_with(b"\n"))
        );
        assert_eq!(writes.concat(), input);
    }

    #[test]
    fn writes_are_whole_lines_of_at_most_a_pipes_atomic_size() {
        let mut text = Vec::new();
        for i in 0..2000 {
            text.extend_from_slice(format!("line {i} {}\n", "x".repeat(i % 90)).as_bytes());
        }
        text.extend_from_slice(&[b'z'; 5000]);
        text.extend_from_slice(b"\nlast, unended");
        let groups: Vec<&[u8]> = line_groups(&text).collect();
        assert_eq!(groups.concat(), text);
        let (last, whole) = groups.split_last().unwrap();
        assert_eq!(*last, b"last, unended");
        for group in whole {
            assert!(group.ends_with(b"\n"));
            let one_long_line = group.iter().filter(|&&b| b == b'\n').count() == 1;
            assert!(group.len() <= ATOMIC_WRITE_MAX || one_long_line);
        }
        assert!(
            groups.iter().any(|g| g.len() == 5001),
            "the long line alone"
        );
    }

    #[test]
    fn a_line_without_a_newline_is_forwarded_in_pieces_not_held_whole() {
        let long = vec![b'x'; 5 * LINE_PIECE_MAX / 2];
        let mut input = long.clone();
        input.extend_from_slice(b"\nnext\n");
        let writes = forwarded(&input, "[w] ", false);
        assert!(writes.iter().all(|w| w.len() <= LINE_PIECE_MAX + 4));
        assert_eq!(writes.len(), 4, "three pieces, then the next line");
        assert!(
            writes[0].starts_with(b"[w] x"),
            "the prefix starts the line only"
        );
        assert!(writes[1].starts_with(b"x") && writes[2].starts_with(b"x"));
        assert_eq!(writes[3], b"[w] next\n");
        let joined: Vec<u8> = writes[..3].concat();
        assert_eq!(joined.len(), 4 + long.len() + 1, "every byte, once");
    }

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
