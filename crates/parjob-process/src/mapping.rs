//! Shared memory that both processes write: reached through a raw pointer taken once, never as
//! a `&mut [u8]` that claims to be the only way to the bytes.
//!
//! `IpcSharedMemory::deref_mut` is "safe if there is only one reader/writer", which a segment
//! that the other process maps is not. So each mapping we write is turned into a pointer once,
//! in [`raw_parts`], and from then on this process reaches its bytes only through that pointer:
//! the status board through atomics (`wire::Board`), the arenas through [`Arena`]'s `read` and
//! `write`, whose callers say which process may touch the arena when.
//!
//! Any process that holds a segment's file descriptor can also cut the segment short
//! (`ftruncate`), and touching a mapped page past the new end raises `SIGBUS`, which would kill
//! the driver. ipc-channel makes its memfds without `MFD_ALLOW_SEALING` (so they cannot be
//! sealed against shrinking) and has no way to adopt a descriptor of ours, so the driver
//! survives a cut instead: every mapping is registered ([`Watch`]), and the `SIGBUS` handler
//! ([`guard_against_cuts`]) puts a private zero page over a faulting page of a registered
//! mapping and marks the mapping cut. Its owner checks the mark where it matters
//! ([`Watch::is_cut`]) and replaces what was cut; a `SIGBUS` anywhere else goes to the handler
//! that was there before.

use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicUsize, Ordering};

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
    /// The mapping's registration with the `SIGBUS` guard; declared first so that it is dropped
    /// (unregistered) before the mapping goes.
    watch: Watch,
    /// Keeps the mapping alive; never dereferenced.
    backing: Backing,
    start: *mut u8,
    len: usize,
}

/// What an arena's mapping belongs to.
enum Backing {
    /// A segment of ipc-channel's, which travels from the driver to a worker on its channels.
    Ipc(#[allow(dead_code, reason = "kept for its mapping, never read")] IpcSharedMemory),
    /// A memfd of parjob's own, which a worker sends the driver on its line (`link`) with the
    /// descriptor itself: the driver never receives anything through ipc-channel.
    Memfd(Memfd),
}

// SAFETY: `start` points into the mapping `backing` owns, which moves with the arena and is
// unmapped only when it drops; nothing about it is tied to a thread.
unsafe impl Send for Arena {}

impl Arena {
    /// Takes over `memory` (its only handle in this process, but for clones sent away).
    pub(crate) fn new(mut memory: IpcSharedMemory) -> Arena {
        let (start, len) = raw_parts(&mut memory);
        Arena {
            watch: Watch::new(start, len),
            backing: Backing::Ipc(memory),
            start,
            len,
        }
    }

    /// A new arena holding a copy of `bytes`, and the handle to send to the other process (a
    /// second mapping of the same memory).
    pub(crate) fn from_bytes(bytes: &[u8]) -> (Arena, IpcSharedMemory) {
        let memory = IpcSharedMemory::from_bytes(bytes);
        let handle = memory.clone();
        (Arena::new(memory), handle)
    }

    /// Worker: a new arena of parjob's own memfd holding a copy of `bytes`, sealed against
    /// growing and shrinking (so that no process, the worker's tasks included, can cut it short
    /// under the driver), whose descriptor [`Arena::descriptor`] gives, to send.
    ///
    /// # Errors
    /// When the memfd cannot be made or mapped (out of memory or descriptors).
    pub(crate) fn sealed_from_bytes(bytes: &[u8]) -> std::io::Result<Arena> {
        use rustix::fs::{MemfdFlags, SealFlags};
        let fd = rustix::fs::memfd_create(
            "parjob-results",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, bytes.len() as u64)?;
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        // Written with `pwrite` before it is mapped: the kernel allocates and fills each page
        // in one step, without a page fault per page or zeroing pages about to be overwritten
        // (fresh shared pages are what a first big result paid for most).
        let mut done = 0;
        while done < bytes.len() {
            match rustix::io::pwrite(&fd, &bytes[done..], done as u64) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let memfd = Memfd::map(fd, bytes.len())?;
        Ok(Arena::of_memfd(memfd))
    }

    /// Driver: the arena a worker sent as `fd`. The descriptor must be a regular file (a
    /// memfd) open for reading and writing; its size is the arena's.
    ///
    /// # Errors
    /// What is wrong with the descriptor, for the message that replaces its worker.
    pub(crate) fn adopt(fd: std::os::fd::OwnedFd) -> Result<Arena, String> {
        let stat = rustix::fs::fstat(&fd).map_err(|e| format!("cannot inspect it: {e}"))?;
        if rustix::fs::FileType::from_raw_mode(stat.st_mode) != rustix::fs::FileType::RegularFile {
            return Err("it is not shared memory".into());
        }
        // A worker of this build seals its arenas: one that is not sealed could be cut short
        // under the driver (survived, see `Watch`, but never needed).
        let seals =
            rustix::fs::fcntl_get_seals(&fd).map_err(|e| format!("it has no seals: {e}"))?;
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err("it is not sealed against shrinking".into());
        }
        let len = usize::try_from(stat.st_size)
            .map_err(|_| format!("it claims a size of {} bytes", stat.st_size))?;
        let memfd = Memfd::map(fd, len).map_err(|e| format!("cannot map it: {e}"))?;
        Ok(Arena::of_memfd(memfd))
    }

    fn of_memfd(memfd: Memfd) -> Arena {
        let (start, len) = (memfd.start, memfd.len);
        Arena {
            watch: Watch::new(start, len),
            backing: Backing::Memfd(memfd),
            start,
            len,
        }
    }

    /// The descriptor of an arena of parjob's own memfd, to send on the worker's line.
    pub(crate) fn descriptor(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        match &self.backing {
            Backing::Memfd(memfd) => Some(memfd.fd.as_fd()),
            Backing::Ipc(_) => None,
        }
    }

    /// The arena's size in bytes.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether some process cut the arena's segment short (see the module's docs). Reads its
    /// last byte, which faults (and is then marked cut) if the segment no longer reaches it.
    pub(crate) fn is_cut(&self) -> bool {
        if self.len > 0 {
            // SAFETY: `start + len - 1` is inside the live mapping. A volatile read of one byte
            // the other process may be writing yields some value, which is ignored; no write
            // of this process can race it (`write` takes `&mut self`).
            unsafe { std::ptr::read_volatile(self.start.add(self.len - 1)) };
        }
        self.watch.is_cut()
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

/// A shared mapping of a memfd of parjob's own, unmapped when dropped.
struct Memfd {
    fd: std::os::fd::OwnedFd,
    start: *mut u8,
    len: usize,
}

impl Memfd {
    /// Maps the first `len` bytes of `fd`, shared, for reading and writing.
    fn map(fd: std::os::fd::OwnedFd, len: usize) -> std::io::Result<Memfd> {
        use std::os::fd::AsRawFd;
        if len == 0 {
            return Ok(Memfd {
                fd,
                start: std::ptr::null_mut(),
                len: 0,
            });
        }
        // SAFETY: a new shared mapping at an address the kernel chooses, of a descriptor this
        // function owns; nothing in this process refers to it yet. Pages past the file's end
        // (another process may cut it short if it is not sealed) fault with SIGBUS, which the
        // arena's `Watch` turns into a mark.
        let start = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                0,
            )
        };
        if start == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Memfd {
            fd,
            start: start.cast(),
            len,
        })
    }
}

impl Drop for Memfd {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: `start..start + len` is the mapping `map` made, unmapped only here; the
            // arena that owned it (and every slice it lent) is gone.
            unsafe { libc::munmap(self.start.cast(), self.len) };
        }
    }
}

/// How many mappings the `SIGBUS` guard watches at once: every status board, arena and
/// `SharedSlice` segment of this process takes one while it lives. Past that, a new mapping is
/// not watched (a cut of it kills the process, as it would without the guard).
const WATCH_SLOTS: usize = 1 << 14;

/// One watched mapping: `[start, start + len)`, and whether a `SIGBUS` hit it. A free slot has
/// `start == 0`. Only atomics, so the signal handler may read and write it.
struct Slot {
    start: AtomicUsize,
    len: AtomicUsize,
    cut: AtomicBool,
}

static SLOTS: [Slot; WATCH_SLOTS] = [const {
    Slot {
        start: AtomicUsize::new(0),
        len: AtomicUsize::new(0),
        cut: AtomicBool::new(false),
    }
}; WATCH_SLOTS];

/// Where the search for a free slot starts, so that registering stays cheap with many live.
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
/// How many cut mappings the handler has patched in this process, ever.
static CUTS: AtomicU64 = AtomicU64::new(0);
/// The page size, set before the handler is installed.
static PAGE: AtomicUsize = AtomicUsize::new(4096);
/// The `SIGBUS` disposition before ours: its handler (or `SIG_DFL` / `SIG_IGN`) and its flags.
static PREVIOUS_HANDLER: AtomicUsize = AtomicUsize::new(libc::SIG_DFL);
static PREVIOUS_FLAGS: AtomicI32 = AtomicI32::new(0);

/// A mapping's registration with the `SIGBUS` guard, undone when dropped. Whoever holds one
/// must drop it before the mapping is unmapped (declare it before the memory in a struct).
pub(crate) struct Watch {
    slot: Option<usize>,
}

impl Watch {
    /// Watches `[start, start + len)`. An empty mapping needs no watch; with every slot taken,
    /// the mapping goes unwatched.
    pub(crate) fn new(start: *const u8, len: usize) -> Watch {
        let start = start as usize;
        if start == 0 || len == 0 {
            return Watch { slot: None };
        }
        let first = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
        for i in 0..WATCH_SLOTS {
            let index = (first + i) % WATCH_SLOTS;
            let slot = &SLOTS[index];
            if slot
                .start
                .compare_exchange(0, start, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                slot.cut.store(false, Ordering::Release);
                // Last: until `len` is set the handler matches nothing in this slot.
                slot.len.store(len, Ordering::Release);
                return Watch { slot: Some(index) };
            }
        }
        Watch { slot: None }
    }

    /// Whether a `SIGBUS` hit the mapping: the segment was cut short by some process, and the
    /// pages past the cut read as zeros here (and no longer reach the other process).
    pub(crate) fn is_cut(&self) -> bool {
        // One load when nothing was ever cut, which is always but for a hostile task.
        CUTS.load(Ordering::Acquire) != 0
            && self
                .slot
                .is_some_and(|i| SLOTS[i].cut.load(Ordering::Acquire))
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(i) = self.slot {
            // `len` first, so the handler never matches a slot whose range is being reused.
            SLOTS[i].len.store(0, Ordering::Release);
            SLOTS[i].start.store(0, Ordering::Release);
        }
    }
}

/// Installs, once, the `SIGBUS` handler that lets this process survive a cut of a watched
/// mapping (see the module's docs). The driver calls it when it starts its first pool.
pub(crate) fn guard_against_cuts() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        if let Ok(page) = usize::try_from(page)
            && page.is_power_of_two()
        {
            PAGE.store(page, Ordering::Relaxed);
        }
        // SAFETY: sigaction with valid (zeroed, then filled) structures; `on_sigbus` has the
        // signature SA_SIGINFO asks for, and is async-signal-safe (see it).
        unsafe {
            let mut previous: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut previous) != 0 {
                return;
            }
            PREVIOUS_HANDLER.store(previous.sa_sigaction, Ordering::Release);
            PREVIOUS_FLAGS.store(previous.sa_flags, Ordering::Release);
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as extern "C" fn(_, _, _) as usize;
            // On the alternate stack where the thread has one (std gives its threads one).
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut());
        }
    });
}

/// The `SIGBUS` handler: a fault in a watched mapping gets a private zero page over the
/// faulting page (the access then completes on it) and marks the mapping cut; anything else goes
/// to the previous handler. Async-signal-safe: atomics, `mmap`, `sigaction` and `raise` (the
/// last three are system calls), and errno is restored.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler; errno is this
    // thread's.
    let (errno, saved, code, address) = unsafe {
        let errno = libc::__errno_location();
        (errno, *errno, (*info).si_code, (*info).si_addr() as usize)
    };
    // A positive code means the kernel raised it for a fault; a SIGBUS sent with kill() is
    // never ours.
    if code > 0
        && let Some(slot) = watched(address)
    {
        let page = PAGE.load(Ordering::Relaxed);
        let at = address & !(page - 1);
        // SAFETY: the page lies inside a live mapping this process registered (a watched range
        // is unregistered before it is unmapped, and a fault in it means someone is using it),
        // so replacing it with fresh anonymous memory touches nothing else.
        let patched = unsafe {
            libc::mmap(
                at as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
        if patched != libc::MAP_FAILED {
            slot.cut.store(true, Ordering::Release);
            CUTS.fetch_add(1, Ordering::AcqRel);
            // SAFETY: restoring this thread's errno.
            unsafe { *errno = saved };
            return;
        }
    }
    // SAFETY: restoring this thread's errno, then handing the signal to whoever had it.
    unsafe {
        *errno = saved;
        pass_on(signal, info, context);
    }
}

/// The watched mapping `address` lies in, if any.
fn watched(address: usize) -> Option<&'static Slot> {
    SLOTS.iter().find(|slot| {
        let start = slot.start.load(Ordering::Acquire);
        let len = slot.len.load(Ordering::Acquire);
        start != 0 && address >= start && address - start < len
    })
}

/// Gives a `SIGBUS` that is not ours to the disposition there was before ours.
///
/// # Safety
/// Only from the `SIGBUS` handler, with the arguments it was given.
unsafe fn pass_on(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let previous = PREVIOUS_HANDLER.load(Ordering::Acquire);
    if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
        // The default action: restore it and raise the signal again, which ends the process
        // once this handler returns (a fault also recurs when the access is retried).
        // SAFETY: sigaction with a valid, zeroed structure naming SIG_DFL; raise has no
        // preconditions.
        unsafe {
            let mut default: libc::sigaction = std::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &default, std::ptr::null_mut());
            libc::raise(libc::SIGBUS);
        }
    } else if PREVIOUS_FLAGS.load(Ordering::Acquire) & libc::SA_SIGINFO != 0 {
        // SAFETY: a SA_SIGINFO disposition's handler has this signature.
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(previous) };
        handler(signal, info, context);
    } else {
        // SAFETY: a plain disposition's handler takes the signal number only.
        let handler: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
        handler(signal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_one_mapping_of_an_arena_writes_the_other_reads() {
        let (mut driver, handle) = Arena::from_bytes(&[0; 8]);
        let worker = Arena::new(handle);
        assert_eq!(worker.len(), 8);
        // SAFETY: both mappings belong to this test, which takes the turns one at a time.
        unsafe {
            assert!(driver.write(b"frame"));
            assert_eq!(worker.read(5), Some(&b"frame"[..]));
            assert!(!driver.write(b"too long a frame"), "nothing past its end");
            assert_eq!(worker.read(9), None);
        }
    }

    /// The descriptor of the memfd mapped at `start` in this process.
    fn descriptor_of(start: *const u8) -> libc::c_int {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
        let prefix = format!("{:x}-", start as usize);
        let line = maps.lines().find(|l| l.starts_with(&prefix)).unwrap();
        let name = line
            .split_whitespace()
            .skip(5)
            .collect::<Vec<_>>()
            .join(" ");
        for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
            let target = std::fs::read_link(entry.path()).unwrap_or_default();
            if target.to_string_lossy() == name {
                return entry.file_name().to_string_lossy().parse().unwrap();
            }
        }
        panic!("no descriptor for {name}");
    }

    #[test]
    fn a_cut_segment_reads_as_zeros_and_is_marked_instead_of_killing_the_process() {
        guard_against_cuts();
        let (mut arena, _) = Arena::from_bytes(&[7; 3 * 4096]);
        let (untouched, _) = Arena::from_bytes(&[1; 64]);
        assert!(!arena.is_cut());
        // SAFETY: cutting a memfd this test made.
        assert_eq!(unsafe { libc::ftruncate(descriptor_of(arena.start), 0) }, 0);
        assert!(arena.is_cut(), "the last page faulted and was patched");
        // SAFETY: this test is the only process using the arena.
        unsafe {
            assert!(
                arena.write(&[9; 3 * 4096]),
                "writing the cut pages survives too"
            );
            assert_eq!(arena.read(1), Some(&[9][..]));
        }
        assert!(!untouched.is_cut());
        drop(arena);
        // A slot is freed with its mapping: a new one starts uncut.
        let (fresh, _) = Arena::from_bytes(&[2; 64]);
        assert!(!fresh.is_cut());
    }

    #[test]
    fn a_sealed_arena_sent_as_a_descriptor_is_read_by_its_adopter_and_cannot_be_cut() {
        let mut worker = Arena::sealed_from_bytes(b"outcomes").unwrap();
        let fd = worker.descriptor().unwrap().try_clone_to_owned().unwrap();
        // Refused: it is sealed, whoever holds it.
        assert!(rustix::fs::ftruncate(&fd, 0).is_err());
        assert!(rustix::fs::ftruncate(&fd, 1 << 20).is_err());
        let driver = Arena::adopt(fd).unwrap();
        assert_eq!(driver.len(), 8);
        // SAFETY: both mappings belong to this test, which takes the turns one at a time.
        unsafe {
            assert_eq!(driver.read(8), Some(&b"outcomes"[..]));
            assert!(worker.write(b"next"));
            assert_eq!(driver.read(4), Some(&b"next"[..]));
        }
        assert!(!driver.is_cut());
    }

    #[test]
    fn a_descriptor_that_is_not_sealed_shared_memory_is_refused() {
        let (a, _b) = crate::link::pair().unwrap();
        let refused = Arena::adopt(a).err().unwrap();
        assert!(refused.contains("not shared memory"), "{refused}");
        let unsealed =
            rustix::fs::memfd_create("parjob-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&unsealed, 4096).unwrap();
        let refused = Arena::adopt(unsealed).err().unwrap();
        assert!(
            refused.contains("sealed") || refused.contains("seals"),
            "{refused}"
        );
    }
}
