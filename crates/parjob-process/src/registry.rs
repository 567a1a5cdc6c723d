//! Who wants to hear that a `SharedSlice` segment of this process was dropped: the job queue of
//! every live pool, whose idle supervisors then tell their workers to unmap it.
//!
//! A segment's drop happens deep in user code, far from any pool; this process-wide list is
//! the one link between the two, and it points one way: segments call it, pools register with
//! it, and neither knows the other.

use std::sync::{Mutex, PoisonError, Weak};

/// Something to wake when a segment is dropped.
pub(crate) trait SegmentListener: Send + Sync {
    /// A segment of this process was dropped.
    fn segment_dropped(&self);
}

static LISTENERS: Mutex<Vec<Weak<dyn SegmentListener>>> = Mutex::new(Vec::new());

/// Adds `listener` for as long as it lives (forgetting those that no longer do).
pub(crate) fn register(listener: Weak<dyn SegmentListener>) {
    let mut listeners = LISTENERS.lock().unwrap_or_else(PoisonError::into_inner);
    listeners.retain(|l| l.strong_count() > 0);
    listeners.push(listener);
}

/// Tells every live listener that a segment was dropped.
pub(crate) fn segment_dropped() {
    // Called outside the lock: a listener takes its own (its queue's).
    let live: Vec<_> = LISTENERS
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .iter()
        .filter_map(Weak::upgrade)
        .collect();
    for listener in live {
        listener.segment_dropped();
    }
}
