//! [`SharedSlice`]: read-only data that process workers map instead of receiving a copy
//! (joblib's memmapping of large arrays).
//!
//! A `SharedSlice<T>` is a cheap-to-clone view of plain-old-data values. On threads it is an
//! `Arc`. With the process backend, its values live in a shared memory segment made when the
//! slice is made; a task argument holding it travels as a handle of a few bytes, each worker
//! maps the segment the first time it meets it and keeps it mapped until the driver drops the
//! last slice of it. Sending the same data again costs nothing but the handle.
//!
//! Backends hook in through [`set_shared_allocator`] (where segments are made),
//! [`collect_shared`] (which segments a frame refers to) and [`receive_shared`] /
//! [`forget_shared`] (the segments a worker has mapped).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, Deref, RangeBounds};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Memory holding a segment's bytes: a backend's shared memory, or the heap.
pub trait SharedMemory: Send + Sync + 'static {
    /// The bytes. Their start is aligned for the element type of the slices over them (a
    /// shared mapping starts on a page).
    fn bytes(&self) -> &[u8];
    /// The memory as `Any`, for the backend that made it to find its own type.
    fn as_any(&self) -> &dyn Any;
}

/// One block of memory behind any number of [`SharedSlice`]s, with an id unique across the
/// processes of a run (the making process's pid in the high half).
pub struct SharedSegment {
    id: u64,
    memory: Box<dyn SharedMemory>,
}

impl SharedSegment {
    /// A segment with a known id: how a worker registers one it received.
    pub fn new(id: u64, memory: Box<dyn SharedMemory>) -> SharedSegment {
        SharedSegment { id, memory }
    }

    /// The segment's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The memory holding the bytes.
    pub fn memory(&self) -> &dyn SharedMemory {
        &*self.memory
    }
}

impl fmt::Debug for SharedSegment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedSegment")
            .field("id", &self.id)
            .field("bytes", &self.memory.bytes().len())
            .finish()
    }
}

/// Makes a shared segment holding a copy of the bytes, or `None` to keep them on the heap.
pub type SharedAllocator = fn(&[u8]) -> Option<Box<dyn SharedMemory>>;

static ALLOCATOR: OnceLock<SharedAllocator> = OnceLock::new();

/// Sets where [`SharedSlice`]s made from now on keep their values (the process backend's
/// `init` sets shared memory). The first call wins; without one, values stay on the heap and
/// a backend that needs them shared copies them when it first sends them.
pub fn set_shared_allocator(allocator: SharedAllocator) {
    let _ = ALLOCATOR.set(allocator);
}

fn next_id() -> u64 {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    (u64::from(std::process::id()) << 32) | u64::from(COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Heap memory: values made before any allocator was set, or decoded from an inline copy.
struct HeapMemory<T: Pod>(Vec<T>);

impl<T: Pod + Send + Sync> SharedMemory for HeapMemory<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// An immutable slice of plain-old-data values (`f64`, `u32`, `[f32; 3]`, ...) that process
/// workers read in place: the data is copied once into shared memory when the slice is made,
/// and tasks receive it without a copy, however often it is sent.
///
/// Clone it, or cut it with [`chunks`](SharedSlice::chunks) and [`get`](SharedSlice::get),
/// without copying values; it derefs to `&[T]`. On the threading and sequential backends it
/// behaves the same (an `Arc`).
///
/// ```
/// use parjob_core::{SharedSlice, delayed, run, RunOptions, SequentialPool};
/// use std::sync::Arc;
///
/// fn total(part: SharedSlice<f64>) -> f64 { part.iter().sum() }
///
/// let data = SharedSlice::from(vec![1.0, 2.0, 3.0, 4.0]);
/// let tasks = data.chunks(2).map(|part| delayed(total, part));
/// let sums = run(Arc::new(SequentialPool), tasks, &RunOptions::default())?;
/// assert_eq!(sums, [3.0, 7.0]);
/// # Ok::<(), parjob_core::Error>(())
/// ```
///
/// Values are in the machine's byte order, and a handle is valid only in the run that sent it:
/// a `SharedSlice` serialized anywhere else (or returned from a task) travels as an inline copy.
pub struct SharedSlice<T> {
    /// `None` for an empty slice (no segment: shared memory cannot be empty).
    segment: Option<Arc<SharedSegment>>,
    /// First element, in elements from the segment's start.
    start: usize,
    len: usize,
    _values: PhantomData<T>,
}

impl<T: Pod + Send + Sync> SharedSlice<T> {
    /// Copies `values` into a new segment.
    pub fn from_slice(values: &[T]) -> SharedSlice<T> {
        const {
            assert!(
                size_of::<T>() > 0,
                "SharedSlice cannot hold zero-sized values"
            )
        };
        if values.is_empty() {
            return SharedSlice::empty();
        }
        let memory = ALLOCATOR
            .get()
            .and_then(|allocate| allocate(bytemuck::cast_slice(values)))
            .unwrap_or_else(|| Box::new(HeapMemory(values.to_vec())));
        SharedSlice::whole(memory, values.len())
    }

    /// Takes `values`: moved into shared memory when the process backend is set up (a copy),
    /// kept as they are otherwise.
    pub fn from_vec(values: Vec<T>) -> SharedSlice<T> {
        const {
            assert!(
                size_of::<T>() > 0,
                "SharedSlice cannot hold zero-sized values"
            )
        };
        if values.is_empty() {
            return SharedSlice::empty();
        }
        let len = values.len();
        let memory = match ALLOCATOR
            .get()
            .and_then(|allocate| allocate(bytemuck::cast_slice(&values)))
        {
            Some(memory) => memory,
            None => Box::new(HeapMemory(values)),
        };
        SharedSlice::whole(memory, len)
    }

    fn empty() -> SharedSlice<T> {
        SharedSlice {
            segment: None,
            start: 0,
            len: 0,
            _values: PhantomData,
        }
    }

    fn whole(memory: Box<dyn SharedMemory>, len: usize) -> SharedSlice<T> {
        SharedSlice {
            segment: Some(Arc::new(SharedSegment::new(next_id(), memory))),
            start: 0,
            len,
            _values: PhantomData,
        }
    }

    /// The values in `range` (indices into this slice) as a slice of the same segment, or
    /// `None` if the range is out of bounds.
    pub fn get(&self, range: impl RangeBounds<usize>) -> Option<SharedSlice<T>> {
        let from = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => i.checked_add(1)?,
            Bound::Unbounded => 0,
        };
        let to = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1)?,
            Bound::Excluded(&i) => i,
            Bound::Unbounded => self.len,
        };
        if from > to || to > self.len {
            return None;
        }
        Some(SharedSlice {
            segment: self.segment.clone(),
            start: self.start + from,
            len: to - from,
            _values: PhantomData,
        })
    }

    /// Consecutive slices of `size` values (the last may be shorter), sharing this one's
    /// segment: the way to hand parts of one array to many tasks. A `size` of 0 counts as 1.
    pub fn chunks(&self, size: usize) -> impl ExactSizeIterator<Item = SharedSlice<T>> + '_ {
        let size = size.max(1);
        let count = self.len.div_ceil(size);
        (0..count).map(move |i| SharedSlice {
            segment: self.segment.clone(),
            start: self.start + i * size,
            len: size.min(self.len - i * size),
            _values: PhantomData,
        })
    }

    /// The segment behind this slice (`None` when empty).
    pub fn segment(&self) -> Option<&Arc<SharedSegment>> {
        self.segment.as_ref()
    }
}

impl<T> Clone for SharedSlice<T> {
    fn clone(&self) -> Self {
        SharedSlice {
            segment: self.segment.clone(),
            start: self.start,
            len: self.len,
            _values: PhantomData,
        }
    }
}

impl<T: Pod> Deref for SharedSlice<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        let Some(segment) = &self.segment else {
            return &[];
        };
        let size = size_of::<T>();
        // In bounds and aligned by construction: `get`/`chunks` stay within the slice, a
        // decoded handle is checked against its segment, and segments start aligned.
        bytemuck::cast_slice(&segment.memory.bytes()[self.start * size..][..self.len * size])
    }
}

impl<T: Pod> AsRef<[T]> for SharedSlice<T> {
    fn as_ref(&self) -> &[T] {
        self
    }
}

impl<T: Pod + fmt::Debug> fmt::Debug for SharedSlice<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<T: Pod + PartialEq> PartialEq for SharedSlice<T> {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl<T: Pod + Send + Sync> From<Vec<T>> for SharedSlice<T> {
    fn from(values: Vec<T>) -> Self {
        SharedSlice::from_vec(values)
    }
}

impl<T: Pod + Send + Sync> From<&[T]> for SharedSlice<T> {
    fn from(values: &[T]) -> Self {
        SharedSlice::from_slice(values)
    }
}

impl<T: Pod + Send + Sync> FromIterator<T> for SharedSlice<T> {
    fn from_iter<I: IntoIterator<Item = T>>(iter: I) -> Self {
        SharedSlice::from_vec(iter.into_iter().collect())
    }
}

thread_local! {
    /// While a backend encodes a frame on this thread: the segments it refers to.
    static OUTGOING: RefCell<Option<Vec<Arc<SharedSegment>>>> = const { RefCell::new(None) };
}

/// Runs `encode` and returns, beside its result, the segments of every [`SharedSlice`] it
/// serialized, once each. Inside, slices serialize as handles, which only a process that got
/// those segments through [`receive_shared`] can decode; elsewhere they serialize inline.
pub fn collect_shared<R>(encode: impl FnOnce() -> R) -> (R, Vec<Arc<SharedSegment>>) {
    let outer = OUTGOING.with(|o| o.borrow_mut().replace(Vec::new()));
    let result = encode();
    let segments = OUTGOING.with(|o| std::mem::replace(&mut *o.borrow_mut(), outer));
    (result, segments.unwrap_or_default())
}

fn received() -> std::sync::MutexGuard<'static, HashMap<u64, Arc<SharedSegment>>> {
    static RECEIVED: OnceLock<Mutex<HashMap<u64, Arc<SharedSegment>>>> = OnceLock::new();
    RECEIVED
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
}

/// Registers a segment sent by the driver, for handles that name it.
pub fn receive_shared(segment: SharedSegment) {
    received().insert(segment.id, Arc::new(segment));
}

/// Drops the registration of a segment the driver no longer holds (slices still in use keep
/// it mapped until they are dropped).
pub fn forget_shared(id: u64) {
    received().remove(&id);
}

/// The wire form: the values themselves, or where to find them.
#[derive(Serialize)]
enum Encoded<'a> {
    Inline(&'a serde_bytes::Bytes),
    Handle { id: u64, start: u64, len: u64 },
}

#[derive(Deserialize)]
enum Decoded {
    Inline(serde_bytes::ByteBuf),
    Handle { id: u64, start: u64, len: u64 },
}

impl<T: Pod> Serialize for SharedSlice<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if let Some(segment) = &self.segment {
            let collected = OUTGOING.with(|o| {
                let mut outgoing = o.borrow_mut();
                let list = outgoing.as_mut()?;
                if !list.iter().any(|s| s.id == segment.id) {
                    list.push(Arc::clone(segment));
                }
                Some(())
            });
            if collected.is_some() {
                return Encoded::Handle {
                    id: segment.id,
                    start: self.start as u64,
                    len: self.len as u64,
                }
                .serialize(serializer);
            }
        }
        let bytes: &[u8] = bytemuck::cast_slice(self);
        Encoded::Inline(serde_bytes::Bytes::new(bytes)).serialize(serializer)
    }
}

impl<'de, T: Pod + Send + Sync> Deserialize<'de> for SharedSlice<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error as _;
        let type_name = std::any::type_name::<T>();
        let size = size_of::<T>();
        match Decoded::deserialize(deserializer)? {
            Decoded::Inline(bytes) => {
                if bytes.len() % size != 0 {
                    return Err(D::Error::custom(format!(
                        "SharedSlice<{type_name}>: {} bytes is not a whole number of {size}-byte values",
                        bytes.len()
                    )));
                }
                Ok(SharedSlice::from_vec(bytemuck::pod_collect_to_vec(&bytes)))
            }
            Decoded::Handle { id, start, len } => {
                let segment = received().get(&id).cloned().ok_or_else(|| {
                    D::Error::custom(format!(
                        "SharedSlice<{type_name}>: shared segment {id:#x} is unknown in process {} \
                         (a handle is valid only in the worker it was sent to)",
                        std::process::id()
                    ))
                })?;
                let (start, len) = (start as usize, len as usize);
                let fits = start
                    .checked_add(len)
                    .and_then(|end| end.checked_mul(size))
                    .is_some_and(|end| end <= segment.memory.bytes().len());
                let aligned = (segment.memory.bytes().as_ptr() as usize) % align_of::<T>() == 0;
                if !fits || !aligned {
                    return Err(D::Error::custom(format!(
                        "SharedSlice<{type_name}>: values {start}..{} do not fit shared segment \
                         {id:#x} of {} bytes",
                        start.saturating_add(len),
                        segment.memory.bytes().len()
                    )));
                }
                Ok(SharedSlice {
                    segment: Some(segment),
                    start,
                    len,
                    _values: PhantomData,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec;

    #[test]
    fn chunks_and_get_cut_without_copying() {
        let data = SharedSlice::from((0..10u32).collect::<Vec<_>>());
        let parts: Vec<_> = data.chunks(4).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(&*parts[2], &[8, 9]);
        assert_eq!(&*data.get(3..=4).expect("in range"), &[3, 4]);
        assert!(data.get(5..11).is_none());
        assert!(Arc::ptr_eq(
            parts[0].segment().expect("not empty"),
            data.segment().expect("not empty")
        ));
        assert_eq!(data.chunks(0).count(), 10);
        assert!(SharedSlice::<f64>::from_slice(&[]).is_empty());
    }

    #[test]
    fn serializes_inline_outside_a_backend_frame() {
        let data = SharedSlice::from(vec![1.5f64, 2.5, 3.5]);
        let mut bytes = Vec::new();
        codec::encode_into(&data.get(1..).expect("in range"), &mut bytes).expect("encodes");
        let (back, _): (SharedSlice<f64>, _) = codec::decode_prefix(&bytes).expect("decodes");
        assert_eq!(&*back, &[2.5, 3.5]);
    }

    #[test]
    fn handles_travel_inside_collect_shared_and_resolve_once_received() {
        let data = SharedSlice::from(vec![7u64; 1000]);
        let part = data.get(10..20).expect("in range");
        let (bytes, segments) = collect_shared(|| {
            let mut bytes = Vec::new();
            codec::encode_into(&(part.clone(), part.clone()), &mut bytes).expect("encodes");
            bytes
        });
        assert_eq!(segments.len(), 1, "one segment, listed once");
        assert!(
            bytes.len() < 100,
            "a handle, not the values: {} bytes",
            bytes.len()
        );
        let id = segments[0].id();

        // Unknown in this process until received.
        let err = codec::decode_prefix::<SharedSlice<u64>>(&bytes).expect_err("unknown");
        assert!(err.contains("unknown in process"), "{err}");

        let copy: HeapMemory<u64> =
            HeapMemory(bytemuck::pod_collect_to_vec(segments[0].memory().bytes()));
        receive_shared(SharedSegment::new(id, Box::new(copy)));
        let (back, _): ((SharedSlice<u64>, SharedSlice<u64>), _) =
            codec::decode_prefix(&bytes).expect("decodes");
        assert_eq!(&*back.0, &[7; 10]);
        forget_shared(id);
        assert_eq!(&*back.1, &[7; 10], "a decoded slice keeps its segment");
    }

    #[test]
    fn a_handle_past_its_segment_is_an_error_naming_it() {
        let data = SharedSlice::from(vec![1u8; 16]);
        let (bytes, segments) = collect_shared(|| {
            let mut bytes = Vec::new();
            codec::encode_into(&data, &mut bytes).expect("encodes");
            bytes
        });
        let id = segments[0].id();
        receive_shared(SharedSegment::new(id, Box::new(HeapMemory(vec![1u8; 8]))));
        let err = codec::decode_prefix::<SharedSlice<u8>>(&bytes).expect_err("too short");
        assert!(err.contains("do not fit shared segment"), "{err}");
        forget_shared(id);
    }
}
