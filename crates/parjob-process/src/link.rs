//! The worker's line back to its driver: one end of a UNIX stream socket pair the driver made
//! before spawning the worker (handed over as its standard input), carrying length-prefixed
//! messages and, with a message, at most one file descriptor.
//!
//! Everything the driver receives from a worker comes this way, read by parjob's own code with
//! a limit on every length. The driver never runs ipc-channel's receive on a socket a worker
//! can write: ipc-channel trusts the size the first fragment of a message announces, so a task
//! that forged one (its worker's sockets are in its own process) could make the driver
//! allocate a terabyte and abort. Here a length over the limit is an error for that worker,
//! nothing is allocated for it, and a descriptor nobody asked for is closed.
//!
//! A message is `[len u64 LE][len bytes]`; a descriptor travels as `SCM_RIGHTS` with the first
//! bytes of its message.

use std::io::{IoSlice, IoSliceMut, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, Shutdown, SocketFlags, SocketType,
};

/// The length prefix's size.
const PREFIX: usize = size_of::<u64>();

/// A new connected pair of stream sockets, both close-on-exec: the driver's end and the end
/// to hand to the worker (which `posix_spawn` then duplicates onto its standard input without
/// the flag).
pub(crate) fn pair() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// Ends both directions of `socket` for every process that holds it: a reader blocked on it
/// (in this or the other process) returns at once.
pub(crate) fn hang_up(socket: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(socket, Shutdown::Both);
}

/// The driver stops writing on its end: a program started as a worker that reads its standard
/// input before `init()` (or never calls it) sees the end of its input, not a wait.
pub(crate) fn close_write(socket: BorrowedFd<'_>) {
    let _ = rustix::net::shutdown(socket, Shutdown::Write);
}

/// Worker side: sends `message` (with `fd`, if any) as one message.
///
/// # Errors
/// When the driver's end is gone, or the message is larger than the address space.
pub(crate) fn send(
    socket: BorrowedFd<'_>,
    message: &[u8],
    fd: Option<BorrowedFd<'_>>,
) -> std::io::Result<()> {
    let prefix = (message.len() as u64).to_le_bytes();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let fds;
    let mut control = SendAncillaryBuffer::new(&mut space);
    if let Some(fd) = fd {
        fds = [fd];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("no room for a descriptor"));
        }
    }
    let total = PREFIX + message.len();
    let mut sent = 0usize;
    while sent < total {
        let (head, body) = if sent < PREFIX {
            (&prefix[sent..], message)
        } else {
            (&[][..], &message[sent - PREFIX..])
        };
        let parts = [IoSlice::new(head), IoSlice::new(body)];
        match rustix::net::sendmsg(socket, &parts, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) => {
                sent += n;
                // The descriptor went with the first bytes.
                control.clear();
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// What [`Reader::recv`] found wrong on the line.
#[derive(Debug)]
pub(crate) enum LinkError {
    /// A message announced more bytes than the limit allows.
    TooLong { len: u64, limit: usize },
    /// The line ended inside a message.
    Truncated,
    /// Reading failed.
    Io(std::io::Error),
}

impl std::fmt::Display for LinkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LinkError::TooLong { len, limit } => write!(
                f,
                "announced a message of {len} bytes on its line to the driver, over the limit \
                 of {limit} (something other than parjob wrote on it: a task?)"
            ),
            LinkError::Truncated => write!(f, "its line to the driver ended inside a message"),
            LinkError::Io(e) => write!(f, "cannot read its line to the driver: {e}"),
        }
    }
}

/// One message: its bytes, and the descriptor that came with its first bytes, if any.
pub(crate) struct Message {
    pub(crate) bytes: Vec<u8>,
    pub(crate) fd: Option<OwnedFd>,
}

/// Driver side: reads a worker's messages, one at a time, from its end of the pair.
pub(crate) struct Reader {
    socket: Arc<OwnedFd>,
    stream: UnixStream,
}

impl Reader {
    /// Reads from `socket`, which others may hold to [`hang_up`] on it.
    pub(crate) fn new(socket: Arc<OwnedFd>) -> std::io::Result<Reader> {
        let stream = UnixStream::from(socket.try_clone()?);
        Ok(Reader { socket, stream })
    }

    /// The next message, `Ok(None)` when the line ended between messages. A message longer
    /// than `limit` is an error, found before anything is allocated for it.
    pub(crate) fn recv(&mut self, limit: usize) -> Result<Option<Message>, LinkError> {
        let mut prefix = [0u8; PREFIX];
        let mut got = 0usize;
        let mut fd = None;
        while got < PREFIX {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
            let mut control = RecvAncillaryBuffer::new(&mut space);
            let mut parts = [IoSliceMut::new(&mut prefix[got..])];
            let received = match rustix::net::recvmsg(
                self.socket.as_fd(),
                &mut parts,
                &mut control,
                RecvFlags::CMSG_CLOEXEC,
            ) {
                Ok(received) => received,
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(LinkError::Io(e.into())),
            };
            // Keep the first descriptor of the message; any other is closed when dropped
            // (more than one per read never arrives: the buffer has room for one, and the
            // kernel closes what does not fit).
            for message in control.drain() {
                if let RecvAncillaryMessage::ScmRights(fds) = message {
                    for received_fd in fds {
                        if fd.is_none() {
                            fd = Some(received_fd);
                        }
                    }
                }
            }
            if received.bytes == 0 {
                return if got == 0 {
                    Ok(None)
                } else {
                    Err(LinkError::Truncated)
                };
            }
            got += received.bytes;
        }
        let len = u64::from_le_bytes(prefix);
        let fits = usize::try_from(len).ok().filter(|&len| len <= limit);
        let Some(len) = fits else {
            return Err(LinkError::TooLong { len, limit });
        };
        let mut bytes = vec![0u8; len];
        // A plain read: a descriptor sent inside a message (never by parjob) is closed by
        // the kernel, not received.
        self.stream.read_exact(&mut bytes).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                LinkError::Truncated
            } else {
                LinkError::Io(e)
            }
        })?;
        Ok(Some(Message { bytes, fd }))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn reader(driver: OwnedFd) -> Reader {
        Reader::new(Arc::new(driver)).unwrap()
    }

    #[test]
    fn messages_and_a_descriptor_arrive_whole_and_in_order() {
        let (driver, worker) = pair().unwrap();
        let mut reader = reader(driver);
        let big = vec![7u8; 1 << 20];
        let memfd =
            rustix::fs::memfd_create("parjob-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let sender = std::thread::spawn(move || {
            send(worker.as_fd(), b"hello", None).unwrap();
            send(worker.as_fd(), &big, Some(memfd.as_fd())).unwrap();
            send(worker.as_fd(), b"", None).unwrap();
        });
        let first = reader.recv(2 << 20).unwrap().unwrap();
        assert_eq!(first.bytes, b"hello");
        assert!(first.fd.is_none());
        let second = reader.recv(2 << 20).unwrap().unwrap();
        assert_eq!(second.bytes.len(), 1 << 20);
        assert!(second.bytes.iter().all(|&b| b == 7));
        assert!(second.fd.is_some(), "the descriptor came with its message");
        let third = reader.recv(2 << 20).unwrap().unwrap();
        assert!(third.bytes.is_empty());
        sender.join().unwrap();
        assert!(reader.recv(16).unwrap().is_none(), "the line ended");
    }

    #[test]
    fn a_length_over_the_limit_is_an_error_before_any_allocation() {
        let (driver, worker) = pair().unwrap();
        let mut reader = reader(driver);
        let mut raw = UnixStream::from(worker);
        // 2^46 bytes claimed: reading it would need 64 TiB.
        raw.write_all(&(1u64 << 46).to_le_bytes()).unwrap();
        match reader.recv(1 << 20) {
            Err(LinkError::TooLong { len, limit }) => {
                assert_eq!(len, 1 << 46);
                assert_eq!(limit, 1 << 20);
            }
            other => panic!("{:?}", other.map(|m| m.map(|m| m.bytes.len()))),
        }
        raw.write_all(&u64::MAX.to_le_bytes()).unwrap();
        assert!(matches!(
            reader.recv(1 << 32),
            Err(LinkError::TooLong { .. })
        ));
    }

    #[test]
    fn a_line_cut_inside_a_message_is_truncated() {
        let (driver, worker) = pair().unwrap();
        let mut reader = reader(driver);
        let mut raw = UnixStream::from(worker);
        raw.write_all(&10u64.to_le_bytes()).unwrap();
        raw.write_all(b"abc").unwrap();
        drop(raw);
        assert!(matches!(reader.recv(100), Err(LinkError::Truncated)));
        let (driver, worker) = pair().unwrap();
        let mut reader = self::reader(driver);
        let mut raw = UnixStream::from(worker);
        raw.write_all(&[1, 2, 3]).unwrap();
        drop(raw);
        assert!(matches!(reader.recv(100), Err(LinkError::Truncated)));
    }

    #[test]
    fn hanging_up_wakes_a_blocked_reader() {
        let (driver, _worker) = pair().unwrap();
        let socket = Arc::new(driver);
        let mut reader = Reader::new(Arc::clone(&socket)).unwrap();
        let blocked = std::thread::spawn(move || reader.recv(100).map(|m| m.is_none()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        hang_up(socket.as_fd());
        assert!(blocked.join().unwrap().unwrap(), "the reader saw the end");
    }

    #[test]
    fn a_descriptor_inside_a_message_is_not_received_and_only_one_per_message_is() {
        let (driver, worker) = pair().unwrap();
        let mut reader = reader(driver);
        let memfd =
            rustix::fs::memfd_create("parjob-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let other =
            rustix::fs::memfd_create("parjob-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        let sendmsg = |bytes: &[u8], fds: &[BorrowedFd<'_>]| {
            let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(2))];
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !fds.is_empty() {
                assert!(control.push(SendAncillaryMessage::ScmRights(fds)));
            }
            rustix::net::sendmsg(
                worker.as_fd(),
                &[IoSlice::new(bytes)],
                &mut control,
                SendFlags::empty(),
            )
            .unwrap();
        };
        // A sender that is not parjob: the prefix alone, then the body with a descriptor.
        sendmsg(&4u64.to_le_bytes(), &[]);
        sendmsg(&[1, 2, 3, 4], &[memfd.as_fd()]);
        let inside = reader.recv(100).unwrap().unwrap();
        assert_eq!(inside.bytes, [1, 2, 3, 4]);
        assert!(
            inside.fd.is_none(),
            "a descriptor inside a message is not received"
        );
        // Two descriptors with a prefix: one is received, the other closed.
        let mut message = 1u64.to_le_bytes().to_vec();
        message.push(9);
        sendmsg(&message, &[memfd.as_fd(), other.as_fd()]);
        let two = reader.recv(100).unwrap().unwrap();
        assert_eq!(two.bytes, [9]);
        assert!(
            two.fd.is_some(),
            "the first was received (the kernel closes the second)"
        );
    }
}
