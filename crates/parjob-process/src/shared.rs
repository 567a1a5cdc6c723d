//! `SharedSlice` values in `IpcSharedMemory`: made by the driver when a slice is made, sent to a
//! worker the first time a frame refers to them, then named by id (see `wire::Shipment`).

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, Weak};

use ipc_channel::ipc::{IpcSender, IpcSharedMemory};
use parjob_core::{SharedMemory, SharedSegment};

use crate::mapping::Watch;
use crate::registry;
use crate::wire::Shipment;

/// A segment's memory as ipc-channel maps it. Written once, when it is made, and only read
/// after that, by every process that maps it.
pub(crate) struct ShmMemory {
    /// The mapping's registration with the `SIGBUS` guard: a task may cut the segment short,
    /// and the driver must survive reading it then. Declared first so that it is dropped before
    /// the mapping.
    _watch: Watch,
    memory: IpcSharedMemory,
}

impl ShmMemory {
    /// Takes over `memory`, watched by the `SIGBUS` guard for as long as it is mapped here.
    pub(crate) fn new(memory: IpcSharedMemory) -> ShmMemory {
        ShmMemory {
            _watch: Watch::new(memory.as_ptr(), memory.len()),
            memory,
        }
    }
}

impl Drop for ShmMemory {
    fn drop(&mut self) {
        // In the driver: idle workers may still map it; have them let go now.
        registry::segment_dropped();
    }
}

impl SharedMemory for ShmMemory {
    fn bytes(&self) -> &[u8] {
        &self.memory
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn is_shared(&self) -> bool {
        true
    }
}

/// Makes `SharedSlice`s of this process live in shared memory, and leaves room for their file
/// descriptors: what `init()` and `enable_test_support()` both do first.
pub(crate) fn install() {
    parjob_core::set_shared_allocator(allocate);
    raise_descriptor_limit();
}

/// The allocator [`install`] sets: a copy of `bytes` in a new shared segment, or `None` (the
/// slice stays on the heap) when none can be made. ipc-channel cannot map an empty segment and
/// panics when `memfd_create` fails (out of file descriptors), so both are checked first.
fn allocate(bytes: &[u8]) -> Option<Box<dyn SharedMemory>> {
    if bytes.is_empty() || !spare_descriptors(1) {
        return None;
    }
    Some(Box::new(ShmMemory::new(IpcSharedMemory::from_bytes(bytes))))
}

/// Raises this process's soft limit on open files to its hard limit, as Go's runtime does: each
/// shared segment holds a descriptor in the driver and in every worker that maps it, and the
/// common soft limit of 1024 would cap a run at about a thousand live `SharedSlice`s.
fn raise_descriptor_limit() {
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

/// Whether `n` more file descriptors can be opened now: ipc-channel panics instead of
/// returning an error when `memfd_create` or `dup` fails.
pub(crate) fn spare_descriptors(n: usize) -> bool {
    let mut probes = Vec::with_capacity(n);
    for _ in 0..n {
        // SAFETY: memfd_create with a valid C string and flags.
        let fd = unsafe { libc::memfd_create(c"parjob-probe".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            break;
        }
        probes.push(fd);
    }
    let spare = probes.len() == n;
    for fd in probes {
        // SAFETY: closing descriptors this function opened and nothing else holds.
        unsafe { libc::close(fd) };
    }
    spare
}

/// One message a frame's `RUN` announces. Segments are cloned (a descriptor each) only as they
/// are sent, so a frame naming many of them holds two spare descriptors at a time, not one per
/// segment.
pub(crate) enum Planned {
    /// Ready as it is (an arena, or a `Forget`).
    Ready(Shipment),
    /// A segment this worker has not mapped.
    Segment(Arc<SharedSegment>),
}

/// Driver side, per worker: the `SharedSlice` segments the worker has mapped, to send each
/// once and to tell it when the driver drops one.
#[derive(Default)]
pub(crate) struct SentSegments {
    sent: HashMap<u64, Weak<SharedSegment>>,
}

impl SentSegments {
    /// What the worker must receive with a frame that refers to `segments`: the segments it
    /// has not mapped yet, and the ids of those the driver has dropped since.
    pub(crate) fn plan(&mut self, segments: Vec<Arc<SharedSegment>>) -> Vec<Planned> {
        let mut planned = Vec::new();
        let dropped: Vec<u64> = self
            .sent
            .iter()
            .filter(|(_, segment)| segment.strong_count() == 0)
            .map(|(&id, _)| id)
            .collect();
        if !dropped.is_empty() {
            for id in &dropped {
                self.sent.remove(id);
            }
            planned.push(Planned::Ready(Shipment::Forget(dropped)));
        }
        planned.extend(
            segments
                .into_iter()
                .filter(|segment| !self.sent.contains_key(&segment.id()))
                .map(Planned::Segment),
        );
        planned
    }

    /// Sends the planned shipments on `big_tasks`, after the message that counts them. A
    /// segment that cannot be sent although [`can_ship`] said it could (another thread took
    /// the last descriptors meanwhile) is replaced by an empty `Forget`, keeping the count: the
    /// task that refers to it then fails to decode, with an error naming its type and the
    /// segment.
    pub(crate) fn send(
        &mut self,
        big_tasks: &IpcSender<Shipment>,
        planned: Vec<Planned>,
    ) -> Result<(), String> {
        for shipment in planned {
            let shipment = match shipment {
                Planned::Ready(shipment) => shipment,
                Planned::Segment(segment) => {
                    match segment.memory().as_any().downcast_ref::<ShmMemory>() {
                        Some(ShmMemory { memory, .. }) if spare_descriptors(2) => {
                            self.sent.insert(segment.id(), Arc::downgrade(&segment));
                            Shipment::Segment {
                                id: segment.id(),
                                memory: memory.clone(),
                            }
                        }
                        _ => Shipment::Forget(Vec::new()),
                    }
                }
            };
            big_tasks.send(shipment).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Whether every segment `planned` names can be sent: it is this backend's memory, and two file
/// descriptors are spare (segments are sent one at a time, each needing a clone of its
/// descriptor and ipc-channel's own copy of it). Otherwise the frame is encoded again with the
/// values themselves, see `frame::encode_run`.
pub(crate) fn can_ship(planned: &[Planned]) -> bool {
    let mut segments = planned
        .iter()
        .filter_map(|p| match p {
            Planned::Segment(segment) => Some(segment),
            Planned::Ready(_) => None,
        })
        .peekable();
    if segments.peek().is_none() {
        return true;
    }
    segments.all(|s| s.memory().as_any().is::<ShmMemory>()) && spare_descriptors(2)
}

/// Applies a shipment in the worker; returns the arena's memory if it was one.
pub(crate) fn receive(shipment: Shipment) -> Option<IpcSharedMemory> {
    match shipment {
        Shipment::Arena(arena) => return Some(arena),
        Shipment::Segment { id, memory } => {
            parjob_core::receive_shared(SharedSegment::new(id, Box::new(ShmMemory::new(memory))));
        }
        Shipment::Forget(ids) => ids.into_iter().for_each(parjob_core::forget_shared),
        // Only ever the first message on the channel, taken by the handshake.
        Shipment::Channels { .. } => {}
    }
    None
}
