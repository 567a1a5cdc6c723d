//! Shared memory that both processes write: reached through a raw pointer taken once, never as
//! a `&mut [u8]` that claims to be the only way to the bytes.
//!
//! `IpcSharedMemory::deref_mut` is "safe if there is only one reader/writer", which a segment
//! that the other process maps is not. So each mapping we write is turned into a pointer once,
//! in [`raw_parts`], and from then on this process reaches its bytes only through that pointer:
//! the status board through atomics (`wire::Board`), the arenas through [`Arena`]'s `read` and
//! `write`, whose callers say which process may touch the arena when.

use ipc_channel::ipc::IpcSharedMemory;

/// The start and length of `memory`'s mapping in this process, as a pointer that may write.
///
/// The caller must reach the mapping only through this pointer afterwards (not through
/// `Deref`, whose shared reference would claim the bytes do not change while it lives).
pub(crate) fn raw_parts(memory: &mut IpcSharedMemory) -> (*mut u8, usize) {
    // SAFETY: ipc-channel's condition ("only one reader/writer") guards against two live
    // references to the bytes. The `&mut [u8]` made here lives only for this statement, and
    // nothing is read or written through it: it is turned into a pointer at once. No other
    // reference into this mapping exists in this process (we hold `memory` by `&mut`, and a
    // clone is a separate mapping), and the other process's accesses happen outside this
    // program's memory model, as for any shared memory: which of them may happen when is
    // the callers' contract (see `Arena` and `wire::Board`).
    let bytes = unsafe { memory.deref_mut() };
    (bytes.as_mut_ptr(), bytes.len())
}

/// A segment that big frames are copied into instead of going through the channel: the
/// driver writes task frames into the task arena and the worker reads them; the worker writes
/// outcome frames into the result arena and the driver reads them. Turns are taken by
/// messages (`RUN`, `DONE`), so the two processes never touch one arena at the same time.
pub(crate) struct Arena {
    /// Keeps the mapping alive (and is cloned to send it); never dereferenced.
    memory: IpcSharedMemory,
    start: *mut u8,
    len: usize,
}

// SAFETY: `start` points into the mapping `memory` owns, which moves with the arena and is
// unmapped only when it drops; nothing about it is tied to a thread.
unsafe impl Send for Arena {}

impl Arena {
    /// Takes over `memory` (its only handle in this process, but for clones sent away).
    pub(crate) fn new(mut memory: IpcSharedMemory) -> Arena {
        let (start, len) = raw_parts(&mut memory);
        Arena { memory, start, len }
    }

    /// A new arena holding a copy of `bytes`.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Arena {
        Arena::new(IpcSharedMemory::from_bytes(bytes))
    }

    /// The arena's size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// A handle to send to the other process (a new mapping of the same memory: this does
    /// not touch the bytes).
    pub(crate) fn handle(&self) -> IpcSharedMemory {
        self.memory.clone()
    }

    /// Copies `bytes` to the start of the arena. Returns `false` (writing nothing) if they do
    /// not fit.
    ///
    /// # Safety
    /// It must be this process's turn to write the arena: the other process is not reading or
    /// writing it until it gets the message this write precedes.
    pub(crate) unsafe fn write(&mut self, bytes: &[u8]) -> bool {
        if bytes.len() > self.len {
            return false;
        }
        // SAFETY: `start` is valid for `len` bytes, writable (see `raw_parts`), and `bytes`
        // (this process's heap) does not overlap a shared mapping; the caller guarantees the
        // other process keeps off meanwhile, and `&mut self` that no slice of `read` is alive.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.start, bytes.len()) };
        true
    }

    /// The first `len` bytes of the arena, `None` if it is shorter.
    ///
    /// # Safety
    /// It must be this process's turn to read the arena, until the slice is dropped: the other
    /// process has written it before the message that handed it over, and does not write it
    /// again until it gets the next message from this one.
    pub(crate) unsafe fn read(&self, len: usize) -> Option<&[u8]> {
        if len > self.len {
            return None;
        }
        // SAFETY: `start` is valid for `len` bytes for as long as `self` (and so the mapping)
        // lives; the caller guarantees nobody writes them while the slice is alive (the other
        // process by the protocol, this one because `write` takes `&mut self`).
        Some(unsafe { std::slice::from_raw_parts(self.start, len) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_one_mapping_of_an_arena_writes_the_other_reads() {
        let mut driver = Arena::from_bytes(&[0; 8]);
        let worker = Arena::new(driver.handle());
        assert_eq!(worker.len(), 8);
        // SAFETY: both mappings belong to this test, which takes the turns one at a time.
        unsafe {
            assert!(driver.write(b"frame"));
            assert_eq!(worker.read(5), Some(&b"frame"[..]));
            assert!(!driver.write(b"too long a frame"), "nothing past its end");
            assert_eq!(worker.read(9), None);
        }
    }
}
