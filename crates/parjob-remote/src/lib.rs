//! The remote-call mechanism of parjob's out-of-process backends: how a driver asks a worker
//! process (this same program, started again) to run a batch, whatever carries the bytes
//! (ipc-channel for the process backend, MPI messages for a cluster backend).
//!
//! - [`Identity`] and [`build_id()`]: what a worker says about itself at the handshake; a
//!   driver sends code offsets only to a worker that
//!   [`check_same_build`](Identity::check_same_build) accepted.
//! - [`CodeOffset`]: a function named by its offset from the main program's load address.
//!   The driver makes one with [`CodeOffset::of_entry`] (a batch's `RemoteEntry`) or
//!   [`CodeOffset::of_initializer`], which refuse a function outside the executable; the worker
//!   calls it with [`call_entry`] or [`call_initializer`], which refuse an offset outside its
//!   own executable code. One private function turns an address into a function: the crate's
//!   single `unsafe` that trusts another process, audited in `src/code.rs`.
//! - [`HandshakeSecret`]: the per-worker secret both ends of a handshake prove they know
//!   (the worker in its first message, the driver in its [`Welcome`]), handed to the worker
//!   privately, never through the rendezvous a stranger could reach.
//! - [`Welcome`], [`RunHeader`], [`DoneHeader`] (each `RUN` and its `DONE` carry the same
//!   [`FrameTag`]), [`InitFailed`] and [`Kind`]: the messages,
//!   with `encode` and `decode` at both ends; their layout is documented once, in
//!   [`header`]. Decoders return [`RemoteError`] on short or malformed input,
//!   never panic.
//!
//! What a backend keeps for itself: its channels, how it moves big frames (arenas) and shared
//! data, and its own messages (kinds from [`Kind::FIRST_BACKEND`] up).
//!
//! ```
//! use parjob_remote::{call_entry, CodeOffset, FrameAt, FrameTag, RunHeader};
//!
//! // A stand-in for the `RemoteEntry` of a batch (`ErasedBatch::remote_entry`).
//! fn entry(frame: &[u8], out: &mut Vec<u8>, on_start: &mut dyn FnMut(usize)) {
//!     on_start(0);
//!     out.extend_from_slice(frame);
//! }
//!
//! // Driver: name the function and put the frame behind a header.
//! let offset = CodeOffset::of_entry(entry, "doc::entry")?;
//! let header = RunHeader {
//!     tag: FrameTag { generation: 1, seq: 1 },
//!     timeout: None,
//!     entry: offset,
//!     frame: FrameAt::Inline,
//!     attachments: 0,
//! };
//! let mut message = header.encode().to_vec();
//! message.extend_from_slice(b"tasks");
//!
//! // Worker (the same build, checked at the handshake): read the header, call the entry.
//! let (header, frame) = RunHeader::decode(&message)?;
//! let mut out = Vec::new();
//! // SAFETY: the offset was measured in a process of this same build (here, this one).
//! unsafe { call_entry(header.entry, frame, &mut out, &mut |_| {}) }?;
//! assert_eq!(out, b"tasks");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Linux only, like the backends that use it: it reads ELF program headers with
//! `dl_iterate_phdr`.
#![deny(missing_docs)]
#![cfg(target_os = "linux")]

mod build_id;
mod code;
mod error;
pub mod header;
mod program;
mod secret;

pub use build_id::{Identity, LAYOUT, build_id};
pub use code::{CodeOffset, call_entry, call_initializer, call_initializer_with, entry_at};
pub use error::RemoteError;
pub use header::{DoneHeader, FrameAt, FrameTag, InitArgs, InitFailed, Kind, RunHeader, Welcome};
pub use secret::{HandshakeSecret, Nonce};
