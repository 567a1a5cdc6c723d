//! What can go wrong on the receiving side of a remote call: a message that does not decode, a
//! peer of another build, an offset that does not lead into this program's code.

use std::fmt;

use crate::Identity;

/// A message that could not be read, or a call that was refused.
///
/// The driver's own refusals (a function outside the executable) are `parjob_core::Error`s,
/// reported as the task's outcome; a `RemoteError` is what a worker (or the driver reading a
/// worker's reply) meets, and says why in its `Display` text.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum RemoteError {
    /// The message ends before the field its layout puts there.
    Truncated {
        /// The message being read, e.g. `RUN`.
        message: &'static str,
        /// How many bytes its layout needs at least.
        needed: usize,
        /// How many it has.
        len: usize,
    },
    /// The message is not of the kind expected here (or of no known kind).
    UnexpectedKind {
        /// What was expected, e.g. `RUN` or `a known kind`.
        expected: &'static str,
        /// The kind byte found, `None` for an empty message.
        found: Option<u8>,
    },
    /// A field holds a value its layout does not allow.
    Malformed {
        /// The message being read.
        message: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// An offset that does not lead into this program's executable code: refused, never
    /// called.
    OutsideExecutable {
        /// The offset from the program's load address.
        offset: u64,
    },
    /// This program's executable code could not be located (the loader listed no executable
    /// segment for it), so no offset can be checked and none is called.
    NoExecutableCode,
    /// The initializer ran and panicked.
    InitializerPanicked {
        /// The panic message and location.
        message: String,
    },
    /// A handshake message that does not carry the proof of the worker's
    /// [`HandshakeSecret`](crate::HandshakeSecret): it comes from a process other than the
    /// worker's own driver or worker, and is refused before anything it says is used.
    WrongSecret {
        /// The message, e.g. `WELCOME`.
        message: &'static str,
    },
    /// The peer is another build of the program (or speaks another protocol): nothing that
    /// names code may be exchanged with it.
    OtherBuild {
        /// What the worker said it is.
        worker: Box<Identity>,
        /// What this driver is.
        driver: Box<Identity>,
    },
}

impl fmt::Display for RemoteError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RemoteError::Truncated {
                message,
                needed,
                len,
            } => write!(
                f,
                "{message} message too short: {len} bytes where its layout needs {needed}"
            ),
            RemoteError::UnexpectedKind {
                expected,
                found: Some(kind),
            } => write!(f, "expected {expected}, got a message of kind {kind}"),
            RemoteError::UnexpectedKind {
                expected,
                found: None,
            } => write!(f, "expected {expected}, got an empty message"),
            RemoteError::Malformed { message, reason } => {
                write!(f, "{message} message malformed: {reason}")
            }
            RemoteError::OutsideExecutable { offset } => write!(
                f,
                "refused to call offset {offset:#x}: it is not in this program's executable code"
            ),
            RemoteError::NoExecutableCode => write!(
                f,
                "this program's executable code cannot be located, so no function offset can \
                 be checked"
            ),
            RemoteError::InitializerPanicked { message } => {
                write!(f, "the initializer panicked: {message}")
            }
            RemoteError::WrongSecret { message } => write!(
                f,
                "refused a {message} that does not prove it knows this worker's handshake \
                 secret: it was not sent by the process that started the worker"
            ),
            RemoteError::OtherBuild { worker, driver } => write!(
                f,
                "refused: worker executable {} (pid {}, build {}, protocol {}) is not the same \
                 build as the driver executable {} (build {}, protocol {}); a worker must be \
                 this very build of the program",
                worker.exe,
                worker.pid,
                worker.build_id,
                worker.protocol_text(),
                driver.exe,
                driver.build_id,
                driver.protocol_text(),
            ),
        }
    }
}

impl std::error::Error for RemoteError {}
