//! [`SharedSlice`]: read-only data that process workers map instead of receiving a copy
//! (joblib's memmapping of large arrays).
//!
//! A `SharedSlice<T>` is a cheap-to-clone view of plain-old-data values behind an `Arc`. Once
//! the process backend is set up (`parjob::init()`), the values of a slice of at least
//! [`SHARED_MIN_BYTES`] live in a shared memory segment made when the slice is made; a task
//! argument holding it travels as a handle of a few bytes, and each worker maps the segment the
//! first time it meets it. After the driver drops the last slice of a segment, the backend tells
//! its workers to let go of it (at once if idle, else with their next frame). Sending the same
//! data again costs nothing but the handle. Smaller slices, and slices made before the backend was set up, stay
//! on the heap and travel by value.
//!
//! Backends hook in through [`set_shared_allocator`] (where segments are made),
//! [`collect_shared`] (which segments a frame refers to) and [`receive_shared`] /
//! [`forget_shared`] (the segments a worker has mapped).

use std::any::Any;
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::marker::PhantomData;
use std::ops::{Bound, Deref, RangeBounds};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytemuck::Pod;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Memory holding a segment's bytes: a backend's shared memory, or the heap.
pub trait SharedMemory:
    Send + Sync + std::panic::UnwindSafe + std::panic::RefUnwindSafe + 'static
{
    /// The bytes. Their start is aligned for the element type of the slices over them (a
    /// shared mapping starts on a page).
    fn bytes(&self) -> &[u8];
    /// The memory as `Any`, for the backend that made it to find its own type.
    fn as_any(&self) -> &dyn Any;
    /// Whether other processes can map this memory (a backend's segment), so that a slice of it
    /// may travel as a handle; heap memory travels by value.
    fn is_shared(&self) -> bool;
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

// `Pod` types are `Copy`, so they hold no `UnsafeCell`: nothing a panic could leave half-changed
// is reachable through `&HeapMemory`.
impl<T: Pod> std::panic::UnwindSafe for HeapMemory<T> {}
impl<T: Pod> std::panic::RefUnwindSafe for HeapMemory<T> {}

impl<T: Pod + Send + Sync> SharedMemory for HeapMemory<T> {
    fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.0)
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn is_shared(&self) -> bool {
        false
    }
}

/// Slices of fewer bytes than this stay on the heap and travel by value: a shared segment costs
/// a file descriptor in every process that maps it, and copying a small slice is cheap.
pub const SHARED_MIN_BYTES: usize = 1 << 20;

/// A copy of `bytes` in shared memory made by the allocator [`set_shared_allocator`] set,
/// whatever their size, or `None` when none is set, `bytes` is empty, or the allocator failed
/// or broke its contract (the wrong length, or not page-aligned). For a backend that receives
/// a segment's bytes from another machine and hands them to its own local workers (the MPI
/// backend's ranks): wrap it with [`SharedSegment::new`] under the sender's id.
pub fn shared_memory_from(bytes: &[u8]) -> Option<Box<dyn SharedMemory>> {
    if bytes.is_empty() {
        return None;
    }
    let memory = ALLOCATOR.get()?(bytes)?;
    let made = memory.bytes();
    // Aligned for any `Pod` element a slice over it may have: a mapping starts on a page.
    let sound = made.len() == bytes.len() && (made.as_ptr() as usize).is_multiple_of(64);
    sound.then_some(memory)
}

/// A copy of `values` in shared memory, if an allocator is set, the slice is big enough, and
/// the allocator kept to its contract (the right length, aligned for `T`).
fn allocate_shared<T: Pod>(values: &[T]) -> Option<Box<dyn SharedMemory>> {
    let bytes: &[u8] = bytemuck::cast_slice(values);
    if bytes.len() < SHARED_MIN_BYTES {
        return None;
    }
    let memory = ALLOCATOR.get()?(bytes)?;
    let made = memory.bytes();
    let sound =
        made.len() == bytes.len() && (made.as_ptr() as usize).is_multiple_of(align_of::<T>());
    sound.then_some(memory)
}

/// An immutable slice of plain-old-data values (`f64`, `u32`, `[f32; 3]`, ...) that process
/// workers read in place: the data is copied once into shared memory when the slice is made,
/// and tasks receive it without a copy, however often it is sent.
///
/// Clone it, or cut it with [`chunks`](SharedSlice::chunks) and [`slice`](SharedSlice::slice),
/// without copying values; it derefs to `&[T]`. On the threading and sequential backends it
/// behaves the same (an `Arc`).
///
/// ```
/// use parjob::{delayed, Parallel, SharedSlice};
///
/// fn total(part: SharedSlice<f64>) -> f64 { part.iter().sum() }
///
/// let data = SharedSlice::from(vec![1.0, 2.0, 3.0, 4.0]);
/// let sums = Parallel::new(2).run(data.chunks(2).map(|part| delayed(total, part)))?;
/// assert_eq!(sums, [3.0, 7.0]);
/// assert_eq!(&data[1..3], &[2.0, 3.0]);
/// # Ok::<(), parjob::Error>(())
/// ```
///
/// Return big results from tasks as a `Vec<T>`: a `SharedSlice` returned by a task travels by
/// value and is then copied into new shared memory in the driver.
///
/// # Memory
///
/// Once `parjob::init()` has set up the process backend, a slice of at least
/// [`SHARED_MIN_BYTES`] is copied into shared memory when it is made, even if it then only
/// meets threads: while `from_vec` copies, the values are in memory twice, and when it
/// returns the `Vec` is freed and they are there once. The copy is made then on purpose.
/// Moving the values later, when a process backend first sends them, would keep them twice for
/// as long as the slice lives: a slice cannot free the memory it started in while other clones
/// of it (every chunk handed to a task) may be reading it through `&[T]`. So a program that
/// only ever uses threads and is short of memory can leave out `parjob::init()` (or the
/// `process` feature): its slices then stay in the `Vec` they were made from, without a copy.
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
    /// Copies `values` into a new segment: shared memory when the process backend is set up
    /// and they fill at least [`SHARED_MIN_BYTES`], the heap otherwise.
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
        let memory =
            allocate_shared(values).unwrap_or_else(|| Box::new(HeapMemory(values.to_vec())));
        SharedSlice::whole(memory, values.len())
    }

    /// Takes `values`: copied into shared memory when the process backend is set up and they
    /// fill at least [`SHARED_MIN_BYTES`], kept as they are otherwise.
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
        let memory = match allocate_shared(&values) {
            Some(memory) => memory,
            None => Box::new(HeapMemory(values)),
        };
        SharedSlice::whole(memory, len)
    }

    /// An empty slice (no segment).
    pub fn empty() -> SharedSlice<T> {
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

    /// The values in `range` (indices into this slice) as a slice of the same segment, without
    /// copying, or `None` if the range is out of bounds (`&data[a..b]` gives a plain `&[T]`).
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Option<SharedSlice<T>> {
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
        if from == to {
            return Some(SharedSlice::empty());
        }
        Some(SharedSlice {
            segment: self.segment.clone(),
            start: self.start + from,
            len: to - from,
            _values: PhantomData,
        })
    }

    /// Consecutive slices of `size` values (the last may be shorter), sharing this one's
    /// segment: the way to hand parts of one array to many tasks. The iterator owns a clone of
    /// the slice, so it may outlive `self`. A `size` of 0 counts as 1 (where `<[T]>::chunks`
    /// would panic).
    pub fn chunks(&self, size: usize) -> impl ExactSizeIterator<Item = SharedSlice<T>> + 'static {
        let size = size.max(1);
        let whole = self.clone();
        (0..whole.len.div_ceil(size)).map(move |i| SharedSlice {
            segment: whole.segment.clone(),
            start: whole.start + i * size,
            len: size.min(whole.len - i * size),
            _values: PhantomData,
        })
    }

    /// Whether the values are in shared memory, so that a process worker reads them in place.
    /// `false` for slices under [`SHARED_MIN_BYTES`], made before `parjob::init()`, or made
    /// when no file descriptor was left: those travel by value, copied on every send.
    pub fn is_shared(&self) -> bool {
        self.segment.as_ref().is_some_and(|s| s.memory.is_shared())
    }

    /// The segment behind this slice (`None` when empty).
    #[cfg(test)]
    fn segment(&self) -> Option<&Arc<SharedSegment>> {
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

impl<T: Pod + Eq> Eq for SharedSlice<T> {}

impl<T: Pod + PartialEq> PartialEq<[T]> for SharedSlice<T> {
    fn eq(&self, other: &[T]) -> bool {
        **self == *other
    }
}

impl<T: Pod + PartialEq> PartialEq<Vec<T>> for SharedSlice<T> {
    fn eq(&self, other: &Vec<T>) -> bool {
        **self == **other
    }
}

impl<T: Pod + std::hash::Hash> std::hash::Hash for SharedSlice<T> {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (**self).hash(state);
    }
}

impl<T: Pod> std::borrow::Borrow<[T]> for SharedSlice<T> {
    fn borrow(&self) -> &[T] {
        self
    }
}

impl<T: Pod + Send + Sync> Default for SharedSlice<T> {
    fn default() -> Self {
        SharedSlice::empty()
    }
}

impl<'a, T: Pod> IntoIterator for &'a SharedSlice<T> {
    type Item = &'a T;
    type IntoIter = std::slice::Iter<'a, T>;
    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

impl<T: Pod + Send + Sync> From<&Vec<T>> for SharedSlice<T> {
    fn from(values: &Vec<T>) -> Self {
        SharedSlice::from_slice(values)
    }
}

impl<T: Pod + Send + Sync, const N: usize> From<[T; N]> for SharedSlice<T> {
    fn from(values: [T; N]) -> Self {
        SharedSlice::from_slice(&values)
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

/// The segments a frame being encoded refers to, in first-seen order, once each.
#[derive(Default)]
struct Outgoing {
    segments: Vec<Arc<SharedSegment>>,
    ids: HashSet<u64>,
}

thread_local! {
    /// While a backend encodes a frame on this thread: the segments it refers to.
    static OUTGOING: RefCell<Option<Outgoing>> = const { RefCell::new(None) };
}

/// Restores the enclosing `collect_shared`'s list, also when the encoding panics.
struct Restore(Option<Option<Outgoing>>);

impl Drop for Restore {
    fn drop(&mut self) {
        if let Some(outer) = self.0.take() {
            OUTGOING.with(|o| *o.borrow_mut() = outer);
        }
    }
}

/// Runs `encode` and returns, beside its result, the segments of every shared-memory
/// [`SharedSlice`] it serialized, once each. Inside, such slices serialize as handles, which only
/// a process that got those segments through [`receive_shared`] can decode; elsewhere (and for
/// heap slices) they serialize by value.
pub fn collect_shared<R>(encode: impl FnOnce() -> R) -> (R, Vec<Arc<SharedSegment>>) {
    let outer = OUTGOING.with(|o| o.borrow_mut().replace(Outgoing::default()));
    let mut restore = Restore(Some(outer));
    let result = encode();
    let outer = restore.0.take().unwrap_or_default();
    let collected = OUTGOING.with(|o| std::mem::replace(&mut *o.borrow_mut(), outer));
    (result, collected.map(|c| c.segments).unwrap_or_default())
}

/// Lists `segment` among the segments the frame being encoded on this thread refers to, as a
/// [`SharedSlice`] of it serialized as a handle would; outside [`collect_shared`] it does
/// nothing. For backends that relay frames encoded elsewhere with handles (the MPI backend's
/// ranks): the local pool that encodes the relayed frame then ships `segment` to its workers
/// like any other.
pub fn note_shared(segment: &Arc<SharedSegment>) {
    OUTGOING.with(|o| {
        if let Some(outgoing) = o.borrow_mut().as_mut()
            && outgoing.ids.insert(segment.id)
        {
            outgoing.segments.push(Arc::clone(segment));
        }
    });
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
        if let Some(segment) = self.segment.as_ref().filter(|s| s.memory.is_shared()) {
            let collected = OUTGOING.with(|o| {
                let mut outgoing = o.borrow_mut();
                let outgoing = outgoing.as_mut()?;
                if outgoing.ids.insert(segment.id) {
                    outgoing.segments.push(Arc::clone(segment));
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
                         (a handle is valid only in the worker it was sent to; the driver may \
                         have run out of file descriptors while sending it)",
                        std::process::id()
                    ))
                })?;
                let (Ok(start), Ok(len)) = (usize::try_from(start), usize::try_from(len)) else {
                    return Err(D::Error::custom(format!(
                        "SharedSlice<{type_name}>: values {start}..+{len} of shared segment \
                         {id:#x} do not fit this machine's address space"
                    )));
                };
                let fits = start
                    .checked_add(len)
                    .and_then(|end| end.checked_mul(size))
                    .is_some_and(|end| end <= segment.memory.bytes().len());
                let aligned =
                    (segment.memory.bytes().as_ptr() as usize).is_multiple_of(align_of::<T>());
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

    /// Memory that claims to be shared, as a backend's segment would.
    struct FakeShared(Vec<u64>);

    impl SharedMemory for FakeShared {
        fn bytes(&self) -> &[u8] {
            bytemuck::cast_slice(&self.0)
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn is_shared(&self) -> bool {
            true
        }
    }

    fn fake_shared(values: Vec<u64>) -> SharedSlice<u64> {
        let len = values.len();
        SharedSlice::whole(Box::new(FakeShared(values)), len)
    }

    fn encode_collecting<T: Serialize>(value: &T) -> (Vec<u8>, Vec<Arc<SharedSegment>>) {
        collect_shared(|| {
            let mut bytes = Vec::new();
            codec::encode_into(value, &mut bytes).expect("encodes");
            bytes
        })
    }

    #[test]
    fn chunks_and_slice_cut_without_copying() {
        let data = SharedSlice::from((0..10u32).collect::<Vec<_>>());
        let parts: Vec<_> = data.chunks(4).collect();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[2], [8, 9][..]);
        assert_eq!(data.slice(3..=4).expect("in range"), vec![3, 4]);
        assert!(data.slice(5..11).is_none());
        assert!(data.slice(..usize::MAX).is_none());
        assert!(Arc::ptr_eq(
            parts[0].segment().expect("not empty"),
            data.segment().expect("not empty")
        ));
        assert_eq!(data.chunks(0).count(), 10);
        let empty = data.slice(5..5).expect("in range");
        assert!(empty.is_empty() && empty.segment().is_none());
        assert!(SharedSlice::<f64>::from_slice(&[]).is_empty());
        assert_eq!((&data).into_iter().sum::<u32>(), 45);
        let owned_chunks = SharedSlice::from([1u8, 2, 3]).chunks(2);
        assert_eq!(owned_chunks.len(), 2, "the iterator outlives the slice");
    }

    #[test]
    fn serializes_by_value_outside_a_backend_frame() {
        let data = fake_shared(vec![15, 25, 35]);
        let mut bytes = Vec::new();
        codec::encode_into(&data.slice(1..).expect("in range"), &mut bytes).expect("encodes");
        let (back, _): (SharedSlice<u64>, _) = codec::decode_prefix(&bytes).expect("decodes");
        assert_eq!(back, vec![25, 35]);
    }

    #[test]
    fn heap_slices_travel_by_value_even_inside_a_frame() {
        let data = SharedSlice::from(vec![1.5f64, 2.5]);
        let (bytes, segments) = encode_collecting(&data);
        assert!(segments.is_empty());
        let (back, _): (SharedSlice<f64>, _) = codec::decode_prefix(&bytes).expect("decodes");
        assert_eq!(back, data);
    }

    #[test]
    fn handles_travel_inside_collect_shared_and_resolve_once_received() {
        let data = fake_shared(vec![7; 1000]);
        let part = data.slice(10..20).expect("in range");
        let (bytes, segments) = encode_collecting(&(part.clone(), part.clone()));
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

        let copy = FakeShared(bytemuck::pod_collect_to_vec(segments[0].memory().bytes()));
        receive_shared(SharedSegment::new(id, Box::new(copy)));
        let (back, _): ((SharedSlice<u64>, SharedSlice<u64>), _) =
            codec::decode_prefix(&bytes).expect("decodes");
        assert_eq!(back.0, [7; 10][..]);
        forget_shared(id);
        assert_eq!(back.1, [7; 10][..], "a decoded slice keeps its segment");
    }

    #[test]
    fn a_handle_past_its_segment_is_an_error_naming_it() {
        let data = fake_shared(vec![1; 16]);
        let (bytes, segments) = encode_collecting(&data);
        let id = segments[0].id();
        receive_shared(SharedSegment::new(id, Box::new(FakeShared(vec![1; 8]))));
        let err = codec::decode_prefix::<SharedSlice<u64>>(&bytes).expect_err("too short");
        assert!(err.contains("do not fit shared segment"), "{err}");
        forget_shared(id);
    }

    #[test]
    fn a_panic_while_encoding_does_not_leave_the_frame_context_behind() {
        let data = fake_shared(vec![3; 4]);
        let caught = std::panic::catch_unwind(|| {
            collect_shared(|| panic!("encoder failed"));
        });
        assert!(caught.is_err());
        let mut bytes = Vec::new();
        codec::encode_into(&data, &mut bytes).expect("encodes");
        assert!(
            bytes.len() > 32,
            "by value again outside a frame: {} bytes",
            bytes.len()
        );
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "8 MiB of values: minutes under Miri, and shared.rs has no unsafe of its own"
    )]
    fn an_allocator_that_breaks_its_contract_is_not_trusted() {
        // The one test that sets this process's allocator: it returns the wrong length.
        fn short(bytes: &[u8]) -> Option<Box<dyn SharedMemory>> {
            Some(Box::new(FakeShared(vec![0; bytes.len() / 16])))
        }
        set_shared_allocator(short);
        let values: Vec<u64> = (0..SHARED_MIN_BYTES as u64).collect();
        let data = SharedSlice::from_slice(&values);
        assert_eq!(data, values);
        assert!(!data.is_shared(), "fell back to the heap");
    }
}
