//! `SharedSlice` values in `IpcSharedMemory`: made by the driver when a slice is made, sent to a
//! worker the first time a frame refers to them, then named by id (see `wire::Shipment`).

use std::any::Any;
use std::sync::Arc;

use ipc_channel::ipc::IpcSharedMemory;
use parjob_core::{SharedMemory, SharedSegment};

use crate::spawn::Worker;
use crate::wire::Shipment;

/// A segment's memory as ipc-channel maps it.
pub(crate) struct ShmMemory(pub(crate) IpcSharedMemory);

impl SharedMemory for ShmMemory {
    fn bytes(&self) -> &[u8] {
        &self.0
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The allocator `init` installs: a copy of `bytes` in a new shared segment (ipc-channel
/// cannot map an empty one, and an empty slice needs none).
pub(crate) fn allocate(bytes: &[u8]) -> Option<Box<dyn SharedMemory>> {
    (!bytes.is_empty())
        .then(|| Box::new(ShmMemory(IpcSharedMemory::from_bytes(bytes))) as Box<dyn SharedMemory>)
}

/// What `worker` must receive before a frame that refers to `segments`: the segments it has
/// not mapped yet, and the ids of those the driver has dropped since.
pub(crate) fn shipments_for(
    worker: &mut Worker,
    segments: Vec<Arc<SharedSegment>>,
) -> Vec<Shipment> {
    let mut shipments = Vec::new();
    let dropped: Vec<u64> = worker
        .segments
        .iter()
        .filter(|(_, segment)| segment.strong_count() == 0)
        .map(|(&id, _)| id)
        .collect();
    if !dropped.is_empty() {
        for id in &dropped {
            worker.segments.remove(id);
        }
        shipments.push(Shipment::Forget(dropped));
    }
    for segment in segments {
        if worker.segments.contains_key(&segment.id()) {
            continue;
        }
        let memory = match segment.memory().as_any().downcast_ref::<ShmMemory>() {
            Some(shm) => shm.0.clone(),
            // Made on the heap (before `init`, or decoded from an inline copy): share a copy.
            None => IpcSharedMemory::from_bytes(segment.memory().bytes()),
        };
        worker
            .segments
            .insert(segment.id(), Arc::downgrade(&segment));
        shipments.push(Shipment::Segment {
            id: segment.id(),
            memory,
        });
    }
    shipments
}

/// Applies a shipment in the worker; returns the arena if it was one.
pub(crate) fn receive(shipment: Shipment) -> Option<IpcSharedMemory> {
    match shipment {
        Shipment::Arena(arena) => return Some(arena),
        Shipment::Segment { id, memory } => {
            parjob_core::receive_shared(SharedSegment::new(id, Box::new(ShmMemory(memory))));
        }
        Shipment::Forget(ids) => ids.into_iter().for_each(parjob_core::forget_shared),
    }
    None
}
