//! [`Memory`]: the handle users hold, the in-memory index of stored keys, and the thread that
//! writes results to the file in batches.

use std::collections::hash_map::Entry;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parjob_core::Task;
use parjob_core::codec;
use rusqlite::Connection;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::Error;
use crate::store::{self, ChunkData, Fetched, FnMeta};

/// Results wait at most this long in memory before they are written.
pub(crate) const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
/// A chunk is written as soon as it holds this many results...
const FLUSH_ENTRIES: usize = 65_536;
/// ... or this many bytes.
const FLUSH_BYTES: usize = 8 << 20;
/// Keys loaded from the file at once that still go into the filter as they are loaded.
const FILTER_LOAD: usize = 65_536;
/// Chunks read back and kept in memory for the next hits, at most.
const CHUNK_CACHE: usize = 16;
/// A chunk being built is handed to the next flush as it is once its records reach this many
/// bytes (or it holds [`CHUNK_ENTRIES`] results), and the results after it go into a new one:
/// SQLite refuses a blob over 1 GB, and while the writer waits (for another process's write
/// lock, or to write a big chunk) results keep coming. (Small in tests, to exercise it.)
const CHUNK_BYTES: usize = if cfg!(test) { 1 << 20 } else { 256 << 20 };
/// ... or this many results (their keys take 32 bytes each).
const CHUNK_ENTRIES: usize = 1 << 22;
/// The biggest record stored, alone in its chunk: under SQLite's 1 GB limit on a blob. A
/// bigger result is returned and not stored (`Stats::not_stored`).
const RECORD_MAX: usize = if cfg!(test) { 3 << 20 } else { 900_000_000 };

/// Tag byte of a stored result.
const TAG_VALUE: u8 = 0;
/// Tag byte of a stored failure (`cache_errors`): the failure's text follows.
const TAG_FAILURE: u8 = 1;

/// What to do with a stored result that no longer decodes as the function's result type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum OnDecodeError {
    /// Fail that task with [`Error::Decode`], which names the function and the fix (the
    /// default: a type change without a version bump is a mistake worth hearing about).
    #[default]
    Fail,
    /// Run the task again and store its new result in place of the old one.
    Recompute,
}

/// What a cache holds and how this handle used it, from [`Memory::stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Results stored in the file (every function, every process), failures included. A
    /// record per stored call, not per distinct key: the same call made twice in one run
    /// (both missing from the cache, so both ran) is stored twice, and a later lookup finds
    /// either.
    pub entries: u64,
    /// Bytes they take in the file: keys, offsets and records (SQLite's own pages aside).
    pub bytes: u64,
    /// Chunks they are stored in (one per function per flush, more when a flush holds over
    /// 256 MB of a function's results).
    pub chunks: u64,
    /// Calls this `Memory` (and its clones) answered from the cache since it was opened.
    pub hits: u64,
    /// Calls this `Memory` had to run since it was opened.
    pub misses: u64,
    /// Stored chunks that failed their checksum when read back; their results were run again.
    pub corrupt_chunks: u64,
    /// Results returned but not cached: their `Serialize` failed or panicked, one was over
    /// the 900 MB a stored result may take, or writing them to the file failed (a full disk,
    /// another process holding the write lock for over 60 s: a warning on stderr says so).
    pub not_stored: u64,
    /// Writes to the file that failed since it was opened (each said why in a warning on
    /// stderr at the end of its run, or in [`Memory::flush`]'s error).
    pub write_failures: u64,
}

/// A disk cache of task results, joblib's `Memory`, in one SQLite file.
///
/// Open it once with [`Memory::open`] and use it for single calls ([`Memory::call`]) or for
/// whole runs (`parallel.memory(&memory).run(tasks)` in the `parjob` crate): a call whose
/// function, version and arguments were stored before returns the stored result without
/// running; the others run and their results are stored as they complete. A run that was
/// killed resumes where it stopped: see docs/MEMORY.md for what a key is made of, what
/// invalidates an entry and what a crash can lose.
///
/// `Memory` is a cheap handle: clones share the file, the index and the writer. Results are
/// written by a background thread in batches (at most every 50 ms, or every 65536 results);
/// [`flush`](Memory::flush) writes what is pending and reports a failure to write. Dropping
/// the last clone writes what is pending too.
///
/// ```
/// use parjob::{delayed, Memory};
///
/// fn slow_square(x: u64) -> u64 { x * x }
///
/// # fn main() -> Result<(), parjob::MemoryError> {
/// let dir = tempfile::tempdir().expect("a temporary folder");
/// let memory = Memory::open(dir.path().join("cache.sqlite"))?;
/// assert_eq!(memory.call(delayed(slow_square, 12))?, 144); // runs
/// assert_eq!(memory.call(delayed(slow_square, 12))?, 144); // from the cache
/// assert_eq!((memory.stats()?.hits, memory.stats()?.misses), (1, 1));
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct Memory {
    handle: Arc<Handle>,
    version: Arc<str>,
    function_versions: Arc<HashMap<&'static str, String>>,
    cache_errors: bool,
    on_decode_error: OnDecodeError,
}

impl std::fmt::Debug for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Memory")
            .field("path", &self.handle.inner.path)
            .field("version", &self.version)
            .field("function_versions", &self.function_versions)
            .field("cache_errors", &self.cache_errors)
            .field("on_decode_error", &self.on_decode_error)
            .finish()
    }
}

/// Owns the writer thread: the last clone of a `Memory` stops it after a final write.
struct Handle {
    inner: Arc<Inner>,
    writer: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        lock(&self.inner.state).stop = true;
        self.inner.wake.notify_all();
        if let Some(thread) = lock(&self.writer).take() {
            let _ = thread.join();
        }
    }
}

/// What every clone shares.
pub(crate) struct Inner {
    path: PathBuf,
    /// Lookups and index loads.
    read: Mutex<Connection>,
    /// Writes: held by the writer for a whole flush, and by `clear`.
    write: Mutex<Connection>,
    state: Mutex<State>,
    /// Wakes the writer.
    wake: Condvar,
    /// Wakes those waiting in `flush`.
    flushed: Condvar,
    hits: AtomicU64,
    misses: AtomicU64,
    corrupt: AtomicU64,
    not_stored: AtomicU64,
    write_failures: AtomicU64,
}

/// A 128-bit slice of a key, used as is as its own hash (keys are BLAKE3 output).
type ShortKey = u128;

/// A cache line of a [`Filter`].
#[derive(Clone, Copy, Default)]
#[repr(align(64))]
struct Block([u64; 8]);

/// A blocked Bloom filter of short keys: each key sets one bit in each of the 8 words of one
/// cache line, so a question costs one memory access, into a table of 8 bytes per key (8 MiB
/// for 10^6 keys, a fraction of the 64 MiB index, and one line per key that `run` fetches
/// ahead). It never forgets a key it was given; it wrongly lets through about 1 key in a
/// million it was not given, which then goes on to the index (and is a miss there). Each key
/// let through sorts the keys this process stored since the last: at 4 bytes per key (1 in
/// 50000 let through) those sorts took 12% of a storing run's calling thread, at 2 bytes
/// (1 in 1000) 3.5% of the whole run's CPU.
#[derive(Default)]
struct Filter {
    /// A power of two of them, or none (an empty filter, which holds nothing).
    blocks: Vec<Block>,
    /// Keys inserted since it was made (with repeats).
    len: usize,
}

impl Filter {
    /// Keys per block at the filter's intended fill: 32 bits per key.
    const KEYS_PER_BLOCK: usize = 8;

    /// An empty filter with room for `keys` keys.
    fn with_capacity(keys: usize) -> Filter {
        let count = keys
            .div_ceil(Self::KEYS_PER_BLOCK)
            .max(32)
            .next_power_of_two();
        Filter {
            blocks: vec![Block::default(); count],
            len: 0,
        }
    }

    /// How many keys it holds at its intended fill.
    fn capacity(&self) -> usize {
        self.blocks.len() * Self::KEYS_PER_BLOCK
    }

    /// The block of `key` (from its high 64 bits) and the bit it sets in each word (from
    /// its low 48 bits): a key's bytes are BLAKE3 output, already uniformly random.
    fn place(&self, key: ShortKey) -> (usize, [u64; 8]) {
        let mask = self.blocks.len().wrapping_sub(1);
        let block = ((key >> 64) as u64 as usize) & mask;
        let low = key as u64;
        let mut bits = [0u64; 8];
        for (i, bit) in bits.iter_mut().enumerate() {
            *bit = 1 << ((low >> (6 * i)) & 63);
        }
        (block, bits)
    }

    fn insert(&mut self, key: ShortKey) {
        self.test_and_insert(key);
    }

    /// Inserts `key`; returns whether it may have been there before (see
    /// [`may_contain`](Filter::may_contain)).
    fn test_and_insert(&mut self, key: ShortKey) -> bool {
        if self.blocks.is_empty() {
            *self = Filter::with_capacity(0);
        }
        let (block, bits) = self.place(key);
        let mut present = true;
        if let Some(block) = self.blocks.get_mut(block) {
            for (word, bit) in block.0.iter_mut().zip(bits) {
                present &= *word & bit != 0;
                *word |= bit;
            }
        }
        self.len += 1;
        present
    }

    /// Asks the CPU to bring `key`'s cache line in, without waiting for it: a run that knows
    /// its next keys asks for their lines together, so that their misses overlap instead of
    /// each lookup waiting for its own (a line from memory costs more than the rest of a
    /// lookup).
    fn prefetch(&self, key: ShortKey) {
        if self.blocks.is_empty() {
            return;
        }
        let (block, _) = self.place(key);
        if let Some(block) = self.blocks.get(block) {
            prefetch_line(block);
        }
    }

    /// False if `key` was never inserted; true if it was (and, rarely, if it was not).
    #[cfg(test)]
    fn may_contain(&self, key: ShortKey) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let (block, bits) = self.place(key);
        self.blocks
            .get(block)
            .is_some_and(|block| block.0.iter().zip(bits).all(|(word, bit)| word & bit != 0))
    }
}

/// Starts loading the cache line of `value` (a hint: nothing is read, nothing can fault).
#[inline]
fn prefetch_line<T>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch reads nothing and cannot fault; SSE is part of every x86_64 target.
    #[allow(unused_unsafe)]
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(value).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// `bytes` as little-endian 64-bit words, the last one zero-padded: what both hashers below
/// mix.
fn le_words(bytes: &[u8]) -> impl Iterator<Item = u64> + '_ {
    bytes.chunks(8).map(|chunk| {
        let mut word = [0u8; 8];
        word[..chunk.len()].copy_from_slice(chunk);
        u64::from_le_bytes(word)
    })
}

/// Hashes a [`ShortKey`] by taking its low 64 bits: they are already uniformly random.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for word in le_words(bytes) {
            self.0 ^= word;
        }
    }
    fn write_u128(&mut self, n: u128) {
        self.0 = n as u64;
    }
}

/// A cheap hasher for the small maps keyed by chunk numbers and function keys (std's
/// SipHash showed in profiles of the lookup path).
#[derive(Default)]
struct FastHasher(u64);

impl FastHasher {
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517C_C1B7_2722_0A95);
    }
}

impl Hasher for FastHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for word in le_words(bytes) {
            self.add(word);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.add(n);
    }
    fn write_i64(&mut self, n: i64) {
        self.add(n as u64);
    }
    fn write_usize(&mut self, n: usize) {
        self.add(n as u64);
    }
}

type FastMap<K, V> = HashMap<K, V, BuildHasherDefault<FastHasher>>;
type FastSet<K> = HashSet<K, BuildHasherDefault<FastHasher>>;

/// Where a stored result is: a chunk (its id when written, or the negative number of a chunk
/// still in memory) and its position there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Loc {
    chunk: i64,
    pos: u32,
}

/// The chunk number of an index entry made by a lookup that found nothing: its `pos` is the
/// entry's place in `FnIndex::slots`, which says where the result is once it is stored.
/// Storing a result then writes a slot (in about the order lookups made them) instead of a
/// second random access into the index.
const SLOT: i64 = i64::MIN;
/// A slot whose result is not stored (yet): chunk numbers are never 0.
const EMPTY: Loc = Loc { chunk: 0, pos: 0 };

/// What storing a result needs to know about its key: the key, and the slot its lookup made
/// in the index (with the index's generation, so that a slot made before a `clear` is not
/// used after it).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    key: [u8; 32],
    slot: Option<(u64, u32)>,
    /// The filter epoch in which the lookup added the key to the filter, if it did: storing
    /// then has nothing to add (one access into the filter per task, not two).
    filtered: Option<u64>,
}

/// Results a run encoded and will store together with [`Memory::store_many`] (one lock per
/// batch of results instead of one per result).
#[derive(Default)]
pub(crate) struct Stored {
    tickets: Vec<Ticket>,
    /// Where each record ends in `records`.
    ends: Vec<u32>,
    records: Vec<u8>,
}

impl Stored {
    /// Encodes `value` as the record of `ticket`'s key. A value that cannot be encoded is
    /// counted as not stored (and returned all the same).
    pub(crate) fn push<R: Serialize>(&mut self, memory: &Memory, ticket: Ticket, value: &R) {
        let start = self.records.len();
        self.records.push(TAG_VALUE);
        let encoded = encode_guarded(value, &mut self.records);
        match (encoded, u32::try_from(self.records.len())) {
            (Ok(()), Ok(end)) => {
                self.tickets.push(ticket);
                self.ends.push(end);
            }
            _ => {
                self.records.truncate(start);
                memory
                    .handle
                    .inner
                    .not_stored
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Results held.
    pub(crate) fn len(&self) -> usize {
        self.tickets.len()
    }

    /// Bytes of records held.
    pub(crate) fn bytes(&self) -> usize {
        self.records.len()
    }

    fn clear(&mut self) {
        self.tickets.clear();
        self.ends.clear();
        self.records.clear();
    }
}

/// Results of one function and version not yet handed to the writer.
#[derive(Default)]
struct Builder {
    keys: Vec<[u8; 32]>,
    data: ChunkData,
}

/// A key this process stored with where its result is, in the order of [`FnIndex::recent`]
/// and [`FnIndex::runs`].
type OwnEntry = (ShortKey, Loc);

/// The index of one function and version: every key this process knows to be stored.
///
/// Three parts, asked in this order: the results this process stored (`recent`, then `runs`,
/// newest first: a result of this process's is the newest of its key), then `map`, the keys
/// loaded from the file (and the slots of misses the filter could not rule out). `filter`
/// holds every key of the three: a key it rules out is a miss without touching any of them,
/// which is what a run into an empty cache asks about every task.
struct FnIndex {
    meta: FnMeta,
    map: HashMap<ShortKey, Loc, BuildHasherDefault<KeyHasher>>,
    /// Every key in `runs` and `recent` (and in `map` if `filter_has_map`), those of misses
    /// looked up in this epoch (whose results are to be stored), and, rarely, a key no longer
    /// in any of them.
    filter: Filter,
    /// Bumped when the filter is rebuilt or emptied: a ticket of an older epoch has its key
    /// added to the filter again when its result is stored.
    filter_epoch: u64,
    /// Whether the filter holds the map's keys too. Loading many keys from the file clears
    /// it (putting each in the filter would cost a cache miss per key to every load, and a
    /// fully cached re-run does not need it); lookups then probe the map, and count in
    /// `probed_misses` the misses that probing cost, until the filter is completed.
    filter_has_map: bool,
    probed_misses: usize,
    /// Keys this process stored since `runs` was last made, in the order they were stored
    /// (appending is a sequential write; a random write into `map` per result cost more than
    /// the rest of storing it).
    recent: Vec<OwnEntry>,
    /// Earlier keys of this process, in sorted runs (oldest first; within a run, equal keys
    /// in the order they were stored), made from `recent` when a lookup the filter could not
    /// rule out needs them; each run is at most a quarter of the one before it.
    runs: Vec<Vec<OwnEntry>>,
    /// Chunks of the file up to this id are in `map`.
    loaded_up_to: i64,
    /// Chunks above `loaded_up_to` that this process wrote (already in `map`).
    own: BTreeSet<i64>,
    builder: Builder,
    /// The (negative) number `map` knows the builder's results by.
    builder_chunk: i64,
    /// Where the last hit was found: the next lookup tries the record after it before the
    /// index, since a re-run asks for results in about the order they were stored.
    cursor: Option<Cursor>,
    /// Where the results of keys whose index entry is a [`SLOT`] are.
    slots: Vec<Loc>,
    /// Bumped when the index is emptied: tickets of an older generation have no slot.
    generation: u64,
    /// The read connection's `PRAGMA data_version` when the index was last refreshed: while
    /// it stays the same, nothing was written to the file since, and a refresh has nothing
    /// to read.
    data_version: Option<i64>,
}

impl FnIndex {
    /// Keys the filter is to hold (with repeats): this process's, and the map's if
    /// [`filter_has_map`](FnIndex::filter_has_map).
    fn keys_held(&self) -> usize {
        let own = self.recent.len() + self.runs.iter().map(Vec::len).sum::<usize>();
        own + if self.filter_has_map {
            self.map.len()
        } else {
            0
        }
    }

    /// Makes the filter hold `additional` more keys at its intended fill, rebuilding it from
    /// the index if it must grow (at least doubling, so that a growing index rebuilds it a
    /// bounded number of times per key).
    fn grow_filter(&mut self, additional: usize) {
        let need = self.filter.len.saturating_add(additional);
        if need <= self.filter.capacity() {
            return;
        }
        let held = self.keys_held();
        self.rebuild_filter(need.max(held.saturating_add(additional)).max(2 * held));
    }

    /// Makes the filter anew for `capacity` keys, with this process's keys and, if
    /// `filter_has_map`, the map's.
    fn rebuild_filter(&mut self, capacity: usize) {
        let mut filter = Filter::with_capacity(capacity);
        if self.filter_has_map {
            for key in self.map.keys() {
                filter.insert(*key);
            }
        }
        for (key, _) in self.runs.iter().flatten().chain(&self.recent) {
            filter.insert(*key);
        }
        self.filter = filter;
        // Keys added by lookups whose results are not stored yet are not in the new filter.
        self.filter_epoch += 1;
    }

    /// Puts the map's keys in the filter, once enough misses paid a probe of the map for it:
    /// a fully cached re-run (whose hits mostly come from the cursor) never builds it, and
    /// a run with many misses builds it after a sixteenth of the map's size of them.
    fn complete_filter_if_due(&mut self) {
        if self.filter_has_map || self.probed_misses < (self.map.len() / 16).max(4096) {
            return;
        }
        self.filter_has_map = true;
        self.probed_misses = 0;
        let held = self.keys_held();
        self.rebuild_filter(2 * held);
    }

    /// Points the index at a result just stored at `loc`: through the slot its lookup made
    /// (if the index was not cleared since), else as one of this process's own results.
    fn place(&mut self, ticket: Ticket, loc: Loc) {
        let slot = match ticket.slot {
            Some((generation, seq)) if generation == self.generation => {
                self.slots.get_mut(seq as usize)
            }
            _ => None,
        };
        match slot {
            // The filter lets this key through already: its lookup made the slot.
            Some(slot) => *slot = loc,
            None => self.add_own(short(&ticket.key), loc, ticket.filtered),
        }
    }

    /// Records a result this process stored (no slot made for it): into `recent` (a
    /// sequential write), and into the filter unless its lookup put it there in this epoch.
    fn add_own(&mut self, key: ShortKey, loc: Loc, filtered: Option<u64>) {
        if filtered != Some(self.filter_epoch) {
            self.filter_test_and_add(key);
        }
        self.recent.push((key, loc));
    }

    /// Whether the filter may hold `key` (false: it holds it from now on, and the index does
    /// not have it), in one access to the filter.
    fn filter_test_and_add(&mut self, key: ShortKey) -> bool {
        if self.filter.len >= self.filter.capacity() {
            self.grow_filter(self.filter.len.max(1024));
        }
        self.filter.test_and_insert(key)
    }

    /// Where this process's newest result of `key` is, if it stored one (without a slot).
    fn own_result(&mut self, key: ShortKey) -> Option<Loc> {
        if !self.recent.is_empty() {
            self.seal_recent();
        }
        self.runs.iter().rev().find_map(|run| {
            // The last of equal keys is the newest: the sorts and merges are stable.
            let end = run.partition_point(|(k, _)| *k <= key);
            let (k, loc) = run.get(end.checked_sub(1)?)?;
            (*k == key).then_some(*loc)
        })
    }

    /// Sorts `recent` into a run, then merges the newest runs while one is not at least
    /// four times the size of the next (so each key is merged a few times in all, and a
    /// lookup searches a few runs).
    fn seal_recent(&mut self) {
        let mut run = std::mem::take(&mut self.recent);
        run.sort_by_key(|(k, _)| *k);
        while let Some(older) = self.runs.pop() {
            if older.len() >= 4 * run.len() {
                self.runs.push(older);
                break;
            }
            run = merge_runs(older, run);
        }
        self.runs.push(run);
    }
}

/// Merges two sorted runs into one; of equal keys, `older`'s come first.
fn merge_runs(older: Vec<OwnEntry>, newer: Vec<OwnEntry>) -> Vec<OwnEntry> {
    let mut out = Vec::with_capacity(older.len() + newer.len());
    let mut a = older.into_iter().peekable();
    let mut b = newer.into_iter().peekable();
    loop {
        let take_older = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => x.0 <= y.0,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => return out,
        };
        let next = if take_older { a.next() } else { b.next() };
        out.extend(next);
    }
}

/// A written chunk (its id) and the position in it the next lookup tries first.
struct Cursor {
    chunk: i64,
    next: usize,
    data: Arc<ChunkData>,
}

/// A chunk handed to the writer and not yet written.
struct Flushing {
    fn_key: [u8; 32],
    meta: FnMeta,
    chunk: i64,
    /// Its keys are in `data.keys`.
    data: Arc<ChunkData>,
}

#[derive(Default)]
struct State {
    functions: FastMap<[u8; 32], FnIndex>,
    next_chunk: i64,
    pending_entries: usize,
    pending_bytes: usize,
    first_pending: Option<Instant>,
    /// Chunks being written, or full and waiting for the next flush (`sealed`), by their
    /// negative number: lookups still find their results.
    in_flight: FastMap<i64, Arc<ChunkData>>,
    /// Chunks that reached [`CHUNK_BYTES`] while being built, in the order they did, for the
    /// next flush (their data is in `in_flight` too).
    sealed: Vec<Flushing>,
    /// Chunks this process wrote: their negative number (which `map` keeps) to their id.
    written: FastMap<i64, i64>,
    /// Chunks read back, most recent last.
    cache: Vec<(i64, Arc<ChunkData>)>,
    /// Chunks found deleted (evicted or cleared elsewhere) or corrupt.
    gone: FastSet<i64>,
    /// Chunks hit since the last flush, for least-recently-used eviction.
    touched: FastSet<i64>,
    last_touched: i64,
    bytes_limit: Option<u64>,
    flush_requested: u64,
    flushed: u64,
    error: Option<Error>,
    stop: bool,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock means a panic elsewhere while it was held; every state it guards is
    // left consistent between statements that can panic.
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// What a lookup found.
pub(crate) enum Lookup<R> {
    /// The stored result.
    Hit(R),
    /// A stored failure (`cache_errors`) or a result that does not decode.
    Failed(Box<Error>),
    /// Nothing usable: run the task.
    Miss,
}

/// What [`Inner::record`] found for a key.
enum Found {
    /// Its record, and whether the cursor found it (rather than the index).
    Record(Record, bool),
    /// No usable record; the index slot the result is to be stored in, if one was made.
    Absent(Option<(u64, u32)>),
    /// Not in the index, as the filter said; the key was added to the filter in this epoch.
    New(u64),
}

/// The record a key points to.
enum Record {
    Shared(Arc<ChunkData>, usize),
    Owned(Vec<u8>),
}

/// Which function a run or a call is about, and its key prefix.
#[derive(Debug, Clone)]
pub(crate) struct Function {
    pub(crate) meta: FnMeta,
}

impl Function {
    /// The key of a call with `args`: BLAKE3 keyed by the function's key, over the codec's
    /// bytes of the arguments. `scratch` is reused between calls.
    pub(crate) fn key_of<A: Serialize>(
        &self,
        args: &A,
        scratch: &mut Vec<u8>,
        index: usize,
    ) -> Result<[u8; 32], Error> {
        scratch.clear();
        encode_guarded(args, scratch).map_err(|message| Error::Key {
            index,
            function: self.meta.name,
            message,
        })?;
        Ok(*blake3::keyed_hash(&self.meta.key, scratch).as_bytes())
    }
}

/// Appends `value`'s encoding to `out`; on an error or a panic of its `Serialize`, `out` is
/// left as it was (half-written bytes would become the start of the next record stored) and
/// the error (or the panic's message) is returned.
fn encode_guarded<V: Serialize + ?Sized>(value: &V, out: &mut Vec<u8>) -> Result<(), String> {
    let start = out.len();
    let encoded = parjob_core::catch_task(|| codec::encode_into(value, &mut *out))
        .unwrap_or_else(|panic| Err(format!("its Serialize impl panicked: {panic}")));
    if encoded.is_err() {
        out.truncate(start);
    }
    encoded
}

/// Decodes a value from the start of `bytes`; a panic of its `Deserialize` is an error.
fn decode_guarded<R: DeserializeOwned>(bytes: &[u8]) -> Result<(R, usize), String> {
    parjob_core::catch_task(|| codec::decode_prefix::<R>(bytes))
        .unwrap_or_else(|panic| Err(format!("its Deserialize impl panicked: {panic}")))
}

/// Warns once per function on stderr when its arguments hold a `HashMap` or `HashSet`
/// (std's or hashbrown's) with a hasher seeded at random in each process (the default: a type
/// name shows no hasher then; a `BuildHasherDefault` one is the same everywhere): it encodes
/// in another order in every process, so a cached call of its is never found by another run.
/// A new user's resumed runs recomputed everything, silently.
fn warn_if_randomly_ordered(function: &'static str, args_type: &str) {
    static WARNED: Mutex<Vec<&'static str>> = Mutex::new(Vec::new());
    if !randomly_ordered(args_type) {
        return;
    }
    let mut warned = lock(&WARNED);
    if warned.contains(&function) {
        return;
    }
    warned.push(function);
    eprintln!(
        "parjob: warning: the arguments of {function} ({args_type}) hold a HashMap or HashSet: \
         its default hasher is seeded at random in each process, so it is written in another \
         order in every process and its cached calls are never found by another run; use a \
         BTreeMap/BTreeSet or a sorted Vec"
    );
}

/// Whether arguments of type `args_type` hold a hash map or set with a randomly seeded hasher.
fn randomly_ordered(args_type: &str) -> bool {
    let hashed = args_type.contains("HashMap<") || args_type.contains("HashSet<");
    hashed && !args_type.contains("BuildHasherDefault")
}

fn short(key: &[u8; 32]) -> ShortKey {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&key[..16]);
    u128::from_le_bytes(bytes)
}

impl Memory {
    /// Opens the cache file at `path`, creating it (and not its folder) if needed.
    ///
    /// Several processes may open the same file at once: SQLite's locking lets them read
    /// together and write one at a time (a writer waits up to 60 s for another).
    ///
    /// # Errors
    /// [`Error::Open`] when the file cannot be opened or made, or is not an SQLite database;
    /// [`Error::Refused`] when it (or its `FILE-shm`) cannot be written, is another program's
    /// SQLite database (which is left as it was), or was made by an incompatible version of
    /// parjob.
    pub fn open(path: impl AsRef<Path>) -> Result<Memory, Error> {
        let path = path.as_ref().to_path_buf();
        let write = store::open(&path)?;
        let read = store::open(&path)?;
        let inner = Arc::new(Inner {
            path: path.clone(),
            read: Mutex::new(read),
            write: Mutex::new(write),
            state: Mutex::new(State {
                next_chunk: -1,
                ..State::default()
            }),
            wake: Condvar::new(),
            flushed: Condvar::new(),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            corrupt: AtomicU64::new(0),
            not_stored: AtomicU64::new(0),
            write_failures: AtomicU64::new(0),
        });
        let writer = {
            let inner = Arc::clone(&inner);
            std::thread::Builder::new()
                .name("parjob-memory-writer".into())
                .spawn(move || inner.writer_loop())
                .map_err(|e| Error::Open {
                    path: path.clone(),
                    source: rusqlite::Error::InvalidParameterName(format!(
                        "cannot start the writer thread: {e}"
                    )),
                })?
        };
        Ok(Memory {
            handle: Arc::new(Handle {
                inner,
                writer: Mutex::new(Some(writer)),
            }),
            version: Arc::from(""),
            function_versions: Arc::new(HashMap::new()),
            cache_errors: false,
            on_decode_error: OnDecodeError::Fail,
        })
    }

    /// The cache file's path.
    pub fn path(&self) -> &Path {
        &self.handle.inner.path
    }

    /// Sets the version every function's key is made with (default: empty). joblib hashes a
    /// function's source to notice that it changed; Rust cannot, so bump this when a
    /// function's results would change: results stored under another version are no longer
    /// found (they stay in the file until cleared or evicted).
    pub fn version(mut self, version: impl Into<String>) -> Memory {
        self.version = Arc::from(version.into());
        self
    }

    /// Sets the version of one function's keys, in place of [`version`](Memory::version).
    ///
    /// ```
    /// # fn main() -> Result<(), parjob::MemoryError> {
    /// fn score(x: u64) -> u64 { x + 1 }
    /// # let dir = tempfile::tempdir().expect("a temporary folder");
    /// let memory = parjob::Memory::open(dir.path().join("c.sqlite"))?.function_version(score, "2");
    /// # Ok(())
    /// # }
    /// ```
    pub fn function_version<F: Copy + 'static>(
        mut self,
        _function: F,
        version: impl Into<String>,
    ) -> Memory {
        Arc::make_mut(&mut self.function_versions)
            .insert(std::any::type_name::<F>(), version.into());
        self
    }

    /// Whether a task's failure (a panic, a timeout, a crashed worker) is stored too, and
    /// returned as [`Error::CachedFailure`] by later calls instead of running the task again.
    /// Off by default: a failure is often the machine's, not the task's.
    pub fn cache_errors(mut self, enabled: bool) -> Memory {
        self.cache_errors = enabled;
        self
    }

    /// What a stored result that no longer decodes does: fail (the default) or run again.
    pub fn on_decode_error(mut self, policy: OnDecodeError) -> Memory {
        self.on_decode_error = policy;
        self
    }

    /// Keeps the stored results at most `bytes` (joblib's `bytes_limit`), by deleting the
    /// least recently used ones after each write; `None` (the default) keeps everything.
    /// Results are evicted a chunk at a time (those written together), so the cache may
    /// fall below the limit by up to one chunk. The limit is shared by every clone.
    pub fn bytes_limit(self, bytes: Option<u64>) -> Memory {
        lock(&self.handle.inner.state).bytes_limit = bytes;
        self
    }

    /// Writes every pending result to the file now, and waits until it is written.
    ///
    /// # Errors
    /// [`Error::Store`] if a write failed since the last `flush` (its results were not
    /// stored, and will run again next time).
    pub fn flush(&self) -> Result<(), Error> {
        let inner = &self.handle.inner;
        let mut state = lock(&inner.state);
        state.flush_requested += 1;
        let want = state.flush_requested;
        inner.wake.notify_all();
        while state.flushed < want && !state.stop {
            state = inner
                .flushed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        match state.error.take() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// Deletes every stored result, of every function, from the file (and those not yet
    /// written). Hit and miss counts are kept.
    ///
    /// # Errors
    /// [`Error::Store`] if the file cannot be written.
    pub fn clear(&self) -> Result<(), Error> {
        let inner = &self.handle.inner;
        let conn = lock(&inner.write);
        store::clear_all(&conn).map_err(|e| Error::store(&inner.path, "clear the cache", e))?;
        let mut state = lock(&inner.state);
        let names: Vec<[u8; 32]> = state.functions.keys().copied().collect();
        for key in names {
            inner.forget_function(&mut state, &key);
        }
        state.cache.clear();
        Ok(())
    }

    /// Deletes the stored results of `function`, every version of it.
    ///
    /// ```
    /// # fn main() -> Result<(), parjob::MemoryError> {
    /// fn score(x: u64) -> u64 { x + 1 }
    /// # let dir = tempfile::tempdir().expect("a temporary folder");
    /// let memory = parjob::Memory::open(dir.path().join("c.sqlite"))?;
    /// memory.call(parjob::delayed(score, 1))?;
    /// memory.clear_function(score)?;
    /// assert_eq!(memory.stats()?.entries, 0);
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    /// [`Error::Store`] if the file cannot be written.
    pub fn clear_function<F: Copy + 'static>(&self, _function: F) -> Result<(), Error> {
        let name = std::any::type_name::<F>();
        let inner = &self.handle.inner;
        let conn = lock(&inner.write);
        store::clear_function(&conn, name)
            .map_err(|e| Error::store(&inner.path, format!("clear the results of {name}"), e))?;
        let mut state = lock(&inner.state);
        let keys: Vec<[u8; 32]> = state
            .functions
            .iter()
            .filter(|(_, f)| f.meta.name == name)
            .map(|(k, _)| *k)
            .collect();
        for key in keys {
            inner.forget_function(&mut state, &key);
        }
        state.cache.clear();
        Ok(())
    }

    /// What the file holds (after writing what is pending) and how this handle used it.
    ///
    /// # Errors
    /// [`Error::Store`] if pending results cannot be written or the file cannot be read.
    pub fn stats(&self) -> Result<Stats, Error> {
        self.flush()?;
        let inner = &self.handle.inner;
        let (entries, bytes, chunks) = store::totals(&lock(&inner.read))
            .map_err(|e| Error::store(&inner.path, "count the stored results", e))?;
        Ok(Stats {
            entries,
            bytes,
            chunks,
            hits: inner.hits.load(Ordering::Relaxed),
            misses: inner.misses.load(Ordering::Relaxed),
            corrupt_chunks: inner.corrupt.load(Ordering::Relaxed),
            not_stored: inner.not_stored.load(Ordering::Relaxed),
            write_failures: inner.write_failures.load(Ordering::Relaxed),
        })
    }

    /// Runs `task` on the calling thread, or returns its stored result: joblib's
    /// `memory.cache(f)(x)`. The result is stored before this returns (it is written to the
    /// file within 50 ms, or by [`flush`](Memory::flush)).
    ///
    /// # Errors
    /// The task's panic as [`Error::Task`] (not stored unless
    /// [`cache_errors`](Memory::cache_errors)), a stored failure, a stored result that does not
    /// decode ([`Error::Decode`]), or a function that is not a `fn` item.
    pub fn call<T: Task>(&self, task: T) -> Result<T::Output, Error> {
        let function = self.function::<T>()?;
        self.refresh(&function)?;
        let mut scratch = Vec::new();
        let key = function.key_of(task.args(), &mut scratch, 0)?;
        let ticket = match self.lookup::<T::Output>(&function, &key, 0) {
            (Lookup::Hit(value), _) => return Ok(value),
            (Lookup::Failed(error), _) => return Err(*error),
            (Lookup::Miss, ticket) => ticket,
        };
        match parjob_core::catch_task(|| task.call()) {
            Ok(value) => {
                self.store(&function, ticket, Ok(&value));
                Ok(value)
            }
            Err(message) => {
                let error = parjob_core::Error::task_panicked(0, message);
                self.store_failure::<T::Output>(&function, ticket, &error);
                Err(Error::Task(error))
            }
        }
    }

    /// The function of tasks of type `T`, with its version and key prefix.
    pub(crate) fn function<T: Task>(&self) -> Result<Function, Error> {
        let name = std::any::type_name::<T::Func>();
        if std::mem::size_of::<T::Func>() != 0
            || name.contains("{{closure}}")
            || name.starts_with("fn(")
            || name.starts_with("fn<")
            || name.contains(" fn(")
        {
            return Err(Error::NotAFunctionItem { function: name });
        }
        let version = self
            .function_versions
            .get(name)
            .cloned()
            .unwrap_or_else(|| self.version.to_string());
        let args_type = std::any::type_name::<T::Args>();
        let output_type = std::any::type_name::<T::Output>();
        warn_if_randomly_ordered(name, args_type);
        let mut hasher = blake3::Hasher::new();
        for part in [
            "parjob-memory key 1",
            name,
            args_type,
            output_type,
            version.as_str(),
        ] {
            hasher.update(&(part.len() as u64).to_le_bytes());
            hasher.update(part.as_bytes());
        }
        Ok(Function {
            meta: FnMeta {
                key: *hasher.finalize().as_bytes(),
                name,
                version,
                args_type,
                output_type,
            },
        })
    }

    /// Loads into the index the keys other processes (or earlier runs) stored for `function`
    /// since the last refresh.
    pub(crate) fn refresh(&self, function: &Function) -> Result<(), Error> {
        let inner = &self.handle.inner;
        let meta = &function.meta;
        let read_error =
            |e| Error::store(&inner.path, format!("read the keys of {}", meta.name), e);
        let conn = lock(&inner.read);
        // Read first: a commit after this is seen by the next refresh.
        let data_version = store::data_version(&conn).map_err(read_error)?;
        let (after, own) = {
            let mut state = lock(&inner.state);
            let index = inner.index_of(&mut state, meta);
            if index.data_version == Some(data_version) {
                // Nothing was committed to the file since the last refresh.
                return Ok(());
            }
            (index.loaded_up_to, index.own.clone())
        };
        // Chunks deleted since (another process's `clear`, `clear_function` or eviction):
        // their results must no longer come from this process's memory of them.
        let (present, highest) = store::chunk_ids(&conn).map_err(read_error)?;
        self.forget_deleted(&present, highest);
        let mut loaded: Vec<(i64, Vec<u8>)> = Vec::new();
        let mut last = after;
        {
            let Some(id) = store::find_function(&conn, &meta.key).map_err(read_error)? else {
                let mut state = lock(&inner.state);
                inner.index_of(&mut state, meta).data_version = Some(data_version);
                return Ok(());
            };
            for chunk in store::chunk_ids_after(&conn, id, after).map_err(read_error)? {
                last = last.max(chunk);
                if own.contains(&chunk) {
                    continue;
                }
                if let Some(keys) = store::chunk_keys(&conn, chunk).map_err(read_error)? {
                    loaded.push((chunk, keys));
                }
            }
        }
        drop(conn);
        let mut state = lock(&inner.state);
        let index = inner.index_of(&mut state, meta);
        let loading = loaded.iter().map(|(_, keys)| keys.len() / 32).sum();
        index.map.reserve(loading);
        // A few keys (a call, a run after another process's short one) go into the filter; a
        // big load leaves the filter without the map's keys until misses make it worth it.
        if index.filter_has_map && loading > FILTER_LOAD {
            index.filter_has_map = false;
            index.probed_misses = 0;
        }
        let into_filter = index.filter_has_map;
        if into_filter {
            index.grow_filter(loading);
        }
        let slots = &index.slots;
        let filter = &mut index.filter;
        for (chunk, keys) in loaded {
            for (pos, key) in keys.chunks_exact(32).enumerate() {
                let mut full = [0u8; 32];
                full.copy_from_slice(key);
                let loc = Loc {
                    chunk,
                    pos: pos as u32,
                };
                if into_filter {
                    filter.insert(short(&full));
                }
                index
                    .map
                    .entry(short(&full))
                    .and_modify(|old| {
                        // A result of this process's is its newest: keep it.
                        let own = match old.chunk {
                            SLOT => slots.get(old.pos as usize).is_some_and(|s| *s != EMPTY),
                            chunk => chunk < 0,
                        };
                        if !own {
                            *old = loc;
                        }
                    })
                    .or_insert(loc);
            }
        }
        index.loaded_up_to = index.loaded_up_to.max(last);
        let up_to = index.loaded_up_to;
        index.own.retain(|&c| c > up_to);
        index.data_version = Some(data_version);
        Ok(())
    }

    /// Marks the chunks this process holds in memory (read back, or its own) that are gone
    /// from the file: ids up to `highest` not in `present`. Lookups then find their results
    /// absent, and run them again.
    fn forget_deleted(&self, present: &store::FastIdSet, highest: i64) {
        let inner = &self.handle.inner;
        let mut state = lock(&inner.state);
        let deleted = |id: i64| id > 0 && id <= highest && !present.contains(&id);
        // Every chunk whose records this process holds: read back (the cache), its own, and
        // those the lookup cursors hold (a cursor keeps its chunk after the cache let it go).
        let cursors = state
            .functions
            .values()
            .filter_map(|index| index.cursor.as_ref().map(|cursor| cursor.chunk));
        let mut gone: Vec<i64> = state
            .cache
            .iter()
            .map(|(id, _)| *id)
            .chain(state.written.values().copied())
            .chain(cursors)
            .filter(|&id| deleted(id))
            .collect();
        if gone.is_empty() {
            return;
        }
        gone.sort_unstable();
        gone.dedup();
        state
            .cache
            .retain(|(id, _)| gone.binary_search(id).is_err());
        for index in state.functions.values_mut() {
            if index
                .cursor
                .as_ref()
                .is_some_and(|c| gone.binary_search(&c.chunk).is_ok())
            {
                index.cursor = None;
            }
        }
        state.gone.extend(gone);
    }

    /// Makes room in `function`'s filter for `additional` more keys (a `run`, which pulls
    /// every task), so that storing does not rebuild it again and again as it grows.
    pub(crate) fn reserve(&self, function: &Function, additional: usize) {
        let inner = &self.handle.inner;
        let mut state = lock(&inner.state);
        let index = inner.index_of(&mut state, &function.meta);
        index.grow_filter(additional.min(1 << 22));
    }

    /// The stored result of `key`, if there is a usable one. Counts a hit or a miss.
    pub(crate) fn lookup<R: DeserializeOwned>(
        &self,
        function: &Function,
        key: &[u8; 32],
        index: usize,
    ) -> (Lookup<R>, Ticket) {
        let inner = &self.handle.inner;
        let mut ticket = Ticket {
            key: *key,
            slot: None,
            filtered: None,
        };
        let decode = |record: &Record| {
            let bytes = match record {
                Record::Shared(chunk, pos) => chunk.record(*pos),
                Record::Owned(bytes) => Some(bytes.as_slice()),
            };
            self.decode(function, bytes, index)
        };
        let mut found = |use_cursor| match inner.record(&function.meta.key, key, use_cursor) {
            Found::Record(record, by_cursor) => (decode(&record), by_cursor),
            Found::New(epoch) => {
                ticket.filtered = Some(epoch);
                (Lookup::Miss, false)
            }
            Found::Absent(slot) => {
                ticket.slot = slot;
                (Lookup::Miss, false)
            }
        };
        let lookup = match found(true) {
            (hit @ Lookup::Hit(_), _) | (hit, false) => hit,
            // The cursor found an older record of this key that is not a usable value (a
            // failure, or bytes that no longer decode): the index knows the newest.
            (_, true) => found(false).0,
        };
        let counter = match lookup {
            Lookup::Miss => &inner.misses,
            _ => &inner.hits,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        (lookup, ticket)
    }

    /// [`lookup`](Memory::lookup) for many keys in one lock: `keys` are `(key, input
    /// position)`; one `(lookup, ticket)` per key is appended to `out`, in order. A key whose
    /// record is in a chunk not in memory is looked up alone afterwards (reading the chunk
    /// without the lock).
    pub(crate) fn lookup_many<R: DeserializeOwned>(
        &self,
        function: &Function,
        keys: &[([u8; 32], usize)],
        out: &mut Vec<(Lookup<R>, Ticket)>,
    ) {
        let inner = &self.handle.inner;
        let fn_key = &function.meta.key;
        let start = out.len();
        let mut alone = Vec::new();
        let (mut hits, mut misses) = (0u64, 0u64);
        {
            let mut state = lock(&inner.state);
            if keys.len() > 1
                && let Some(index) = state.functions.get(fn_key)
            {
                // Their filter lines, asked for together: the misses overlap instead of each
                // lookup waiting for its own.
                for (key, _) in keys {
                    index.filter.prefetch(short(key));
                }
            }
            for &(key, index) in keys {
                let mut ticket = Ticket {
                    key,
                    slot: None,
                    filtered: None,
                };
                let mut answer = |use_cursor| match probe(&mut state, fn_key, &key, use_cursor) {
                    Probe::Done(Found::Record(record, by_cursor)) => {
                        let bytes = match &record {
                            Record::Shared(chunk, pos) => chunk.record(*pos),
                            Record::Owned(bytes) => Some(bytes.as_slice()),
                        };
                        Some((self.decode(function, bytes, index), by_cursor))
                    }
                    Probe::Done(Found::New(epoch)) => {
                        ticket.filtered = Some(epoch);
                        Some((Lookup::Miss, false))
                    }
                    Probe::Done(Found::Absent(slot)) => {
                        ticket.slot = slot;
                        Some((Lookup::Miss, false))
                    }
                    Probe::Fetch(_) => None,
                };
                let lookup = match answer(true) {
                    Some((hit @ Lookup::Hit(_), _)) | Some((hit, false)) => Some(hit),
                    // As in `lookup`: the cursor found an older record of this key that is
                    // not a usable value; the index knows the newest.
                    Some((_, true)) => answer(false).map(|(lookup, _)| lookup),
                    None => None,
                };
                match lookup {
                    Some(lookup) => {
                        match lookup {
                            Lookup::Miss => misses += 1,
                            _ => hits += 1,
                        }
                        out.push((lookup, ticket));
                    }
                    None => {
                        alone.push(out.len());
                        out.push((Lookup::Miss, ticket));
                    }
                }
            }
        }
        inner.hits.fetch_add(hits, Ordering::Relaxed);
        inner.misses.fetch_add(misses, Ordering::Relaxed);
        for at in alone {
            let (key, index) = keys[at - start];
            out[at] = self.lookup(function, &key, index);
        }
    }

    /// Appends the results `batch` holds to the function's chunk being built, in one lock,
    /// and empties `batch`: they are found by lookups at once, and written with the next
    /// flush (as [`store`](Memory::store) does for one).
    pub(crate) fn store_many(&self, function: &Function, batch: &mut Stored) {
        if batch.tickets.is_empty() {
            return;
        }
        let inner = &self.handle.inner;
        let mut state = lock(&inner.state);
        let fn_key = function.meta.key;
        let count = batch.tickets.len();
        let (mut from, mut bytes_from, mut not_stored) = (0, 0usize, 0u64);
        while from < count {
            let index = inner.index_of(&mut state, &function.meta);
            let builder = &index.builder;
            // The records from `from` on that fit into the chunk being built, at once.
            let (held, entries) = (builder.data.records.len(), builder.keys.len());
            let mut to = from;
            // (Records `from..to` join together: as one record of their total size.)
            while to < count
                && fits_in_chunk(
                    held,
                    entries + (to - from),
                    batch.ends[to] as usize - bytes_from,
                )
            {
                to += 1;
            }
            if to == from {
                if entries == 0 {
                    // Alone, over what one chunk holds: returned, not stored.
                    not_stored += 1;
                    bytes_from = batch.ends[from] as usize;
                    from += 1;
                } else {
                    seal(&mut state, &fn_key);
                }
                continue;
            }
            let bytes_to = batch.ends[to - 1] as usize;
            let builder = &mut index.builder;
            let offset = builder.data.records.len();
            builder
                .data
                .records
                .extend_from_slice(&batch.records[bytes_from..bytes_to]);
            builder.keys.reserve(to - from);
            builder.data.ends.reserve(to - from);
            let first = builder.keys.len() as u32;
            for (pos, i) in (first..).zip(from..to) {
                let builder = &mut index.builder;
                let ticket = batch.tickets[i];
                builder.keys.push(ticket.key);
                // Within CHUNK_BYTES or RECORD_MAX: far below u32::MAX.
                builder
                    .data
                    .ends
                    .push((offset + batch.ends[i] as usize - bytes_from) as u32);
                let loc = Loc {
                    chunk: index.builder_chunk,
                    pos,
                };
                index.place(ticket, loc);
            }
            state.pending_entries += to - from;
            state.pending_bytes += bytes_to - bytes_from + 36 * (to - from);
            (from, bytes_from) = (to, bytes_to);
        }
        if not_stored > 0 {
            inner.not_stored.fetch_add(not_stored, Ordering::Relaxed);
        }
        inner.wake_writer_if_due(&mut state);
        drop(state);
        batch.clear();
    }

    fn decode<R: DeserializeOwned>(
        &self,
        function: &Function,
        record: Option<&[u8]>,
        index: usize,
    ) -> Lookup<R> {
        let decode_error = |message: String| match self.on_decode_error {
            OnDecodeError::Recompute => Lookup::Miss,
            _ => Lookup::Failed(Box::new(Error::Decode {
                index,
                function: function.meta.name,
                version: function.meta.version.clone(),
                type_name: function.meta.output_type,
                message,
            })),
        };
        match record {
            Some([TAG_VALUE, value @ ..]) => match decode_guarded::<R>(value) {
                Ok((value, used)) if used == value_len(record) => Lookup::Hit(value),
                Ok(_) => decode_error("bytes are left over after the value".into()),
                Err(message) => decode_error(message),
            },
            Some([TAG_FAILURE, text @ ..]) if self.cache_errors => {
                Lookup::Failed(Box::new(Error::CachedFailure {
                    index,
                    function: function.meta.name,
                    message: String::from_utf8_lossy(text).into_owned(),
                }))
            }
            Some([TAG_FAILURE, ..]) => Lookup::Miss,
            _ => decode_error("the stored record is empty or of an unknown kind".into()),
        }
    }

    /// Stores a task's result (or the text of its failure) under `key`: it is found by
    /// lookups at once, and written with the next flush.
    pub(crate) fn store<R: Serialize>(
        &self,
        function: &Function,
        ticket: Ticket,
        outcome: Result<&R, &str>,
    ) {
        let key = ticket.key;
        let inner = &self.handle.inner;
        let mut state = lock(&inner.state);
        let index = inner.index_of(&mut state, &function.meta);
        let builder = &mut index.builder;
        let start = builder.data.records.len();
        let encoded = match outcome {
            Ok(value) => {
                builder.data.records.push(TAG_VALUE);
                encode_guarded(value, &mut builder.data.records)
            }
            Err(text) => {
                builder.data.records.push(TAG_FAILURE);
                builder.data.records.extend_from_slice(text.as_bytes());
                Ok(())
            }
        };
        let size = builder.data.records.len() - start;
        if encoded.is_err() || size > RECORD_MAX {
            builder.data.records.truncate(start);
            inner.not_stored.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut index = index;
        if !fits_in_chunk(start, index.builder.keys.len(), size) {
            // Into a chunk of its own: the one being built is full.
            let record = index.builder.data.records.split_off(start);
            seal(&mut state, &function.meta.key);
            index = inner.index_of(&mut state, &function.meta);
            index.builder.data.records.extend_from_slice(&record);
        }
        let builder = &mut index.builder;
        // Within CHUNK_BYTES or RECORD_MAX: far below u32::MAX.
        let end = builder.data.records.len() as u32;
        let pos = builder.keys.len() as u32;
        builder.keys.push(key);
        builder.data.ends.push(end);
        let added = size + 36;
        let loc = Loc {
            chunk: index.builder_chunk,
            pos,
        };
        index.place(ticket, loc);
        state.pending_entries += 1;
        state.pending_bytes += added;
        inner.wake_writer_if_due(&mut state);
    }

    /// Stores a task's failure when failures are cached and it is the task's own (a panic,
    /// a timeout, a crashed worker), not the run's (a cancellation).
    pub(crate) fn store_failure<R: Serialize>(
        &self,
        function: &Function,
        ticket: Ticket,
        error: &parjob_core::Error,
    ) {
        let own = matches!(
            error,
            parjob_core::Error::TaskPanicked { .. }
                | parjob_core::Error::Timeout { .. }
                | parjob_core::Error::WorkerCrashed { .. }
        );
        if self.cache_errors && own {
            // Without the task's number: a later run may give the same call another one, and
            // the error it returns names that one ("task 0 panicked" came back as the failure
            // of task 3).
            let text = error.to_string();
            let text = error
                .task_index()
                .and_then(|index| text.strip_prefix(&format!("task {index}")))
                .map_or(text.as_str(), |rest| rest.trim_start_matches([':', ' ']));
            self.store::<R>(function, ticket, Err(text));
        }
    }
}

/// Whether a record of `size` bytes may join a chunk holding `bytes` of records in `entries`
/// results: within [`CHUNK_BYTES`] and [`CHUNK_ENTRIES`], or alone, within [`RECORD_MAX`].
fn fits_in_chunk(bytes: usize, entries: usize, size: usize) -> bool {
    (bytes + size <= CHUNK_BYTES && entries < CHUNK_ENTRIES) || (entries == 0 && size <= RECORD_MAX)
}

/// Hands the chunk `fn_key`'s function is building to the next flush as it is, and starts a
/// new one: lookups find its results among the chunks in flight meanwhile.
fn seal(state: &mut State, fn_key: &[u8; 32]) {
    let State {
        functions,
        next_chunk,
        in_flight,
        sealed,
        ..
    } = state;
    let Some(index) = functions.get_mut(fn_key) else {
        return;
    };
    if index.builder.keys.is_empty() {
        return;
    }
    let builder = std::mem::take(&mut index.builder);
    let mut data = builder.data;
    data.keys = builder.keys;
    let data = Arc::new(data);
    in_flight.insert(index.builder_chunk, Arc::clone(&data));
    sealed.push(Flushing {
        fn_key: *fn_key,
        meta: index.meta.clone(),
        chunk: index.builder_chunk,
        data,
    });
    index.builder_chunk = *next_chunk;
    *next_chunk -= 1;
}

/// What [`probe`] found: an answer, or a chunk to read from the file first.
enum Probe {
    Done(Found),
    Fetch(Loc),
}

/// The part of [`Inner::record`] done under the state lock: the answer, unless the record is
/// in a chunk that must be read from the file (which is done without the lock).
fn probe(state: &mut State, fn_key: &[u8; 32], key: &[u8; 32], use_cursor: bool) -> Probe {
    let Some(index) = state.functions.get_mut(fn_key) else {
        return Probe::Done(Found::Absent(None));
    };
    if use_cursor
        && let Some(cursor) = index.cursor.as_mut()
        && cursor.data.keys.get(cursor.next) == Some(key)
    {
        let pos = cursor.next;
        cursor.next += 1;
        let chunk = cursor.chunk;
        let data = Arc::clone(&cursor.data);
        if state.last_touched != chunk {
            state.last_touched = chunk;
            state.touched.insert(chunk);
        }
        return Probe::Done(Found::Record(Record::Shared(data, pos), true));
    }
    let generation = index.generation;
    let short_key = short(key);
    index.complete_filter_if_due();
    let maybe = index.filter_test_and_add(short_key);
    if !maybe && index.filter_has_map {
        // Neither stored by this process nor loaded from the file: a miss, found
        // without a random access into the index. The key is in the filter from now
        // on (harmless if its result is never stored: a lookup the filter lets
        // through goes on to the index); storing it appends to `recent`.
        return Probe::Done(Found::New(index.filter_epoch));
    }
    // The filter holds every key of this process's: one it rules out is not there.
    let own = if maybe {
        index.own_result(short_key)
    } else {
        None
    };
    let mut loc = match own {
        Some(loc) => loc,
        None => match index.map.entry(short_key) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                // Nothing stored: the entry made here says where the result will be.
                if !index.filter_has_map {
                    index.probed_misses += 1;
                }
                let Ok(seq) = u32::try_from(index.slots.len()) else {
                    return Probe::Done(Found::Absent(None));
                };
                entry.insert(Loc {
                    chunk: SLOT,
                    pos: seq,
                });
                index.slots.push(EMPTY);
                return Probe::Done(Found::Absent(Some((generation, seq))));
            }
        },
    };
    if loc.chunk == SLOT {
        let seq = loc.pos;
        loc = index.slots.get(seq as usize).copied().unwrap_or(EMPTY);
        if loc == EMPTY {
            return Probe::Done(Found::Absent(Some((generation, seq))));
        }
    }
    let pos = loc.pos as usize;
    if loc.chunk == index.builder_chunk {
        return Probe::Done(match index.builder.data.record(pos) {
            Some(r) => Found::Record(Record::Owned(r.to_vec()), false),
            None => Found::Absent(None),
        });
    }
    let mut chunk = loc.chunk;
    if chunk < 0 {
        // This process's own: being written, or written as `written` says.
        if let Some(data) = state.in_flight.get(&chunk) {
            return Probe::Done(Found::Record(Record::Shared(Arc::clone(data), pos), false));
        }
        match state.written.get(&chunk) {
            Some(id) => chunk = *id,
            None => return Probe::Done(Found::Absent(None)),
        }
    }
    if !state.gone.is_empty() && state.gone.contains(&chunk) {
        return Probe::Done(Found::Absent(None));
    }
    if state.last_touched != chunk {
        state.last_touched = chunk;
        state.touched.insert(chunk);
    }
    if let Some(at) = state.cache.iter().rposition(|(id, _)| *id == chunk) {
        let data = Arc::clone(&state.cache[at].1);
        index.cursor = Some(Cursor {
            chunk,
            next: pos + 1,
            data: Arc::clone(&data),
        });
        return Probe::Done(Found::Record(Record::Shared(data, pos), false));
    }
    Probe::Fetch(Loc {
        chunk,
        pos: loc.pos,
    })
}

/// The length of a record's value, after its tag byte.
fn value_len(record: Option<&[u8]>) -> usize {
    record.map_or(0, |r| r.len().saturating_sub(1))
}

impl Inner {
    /// After results were handed over: wakes the writer to time the flush (it sleeps until
    /// something is pending), or to flush at once when enough is.
    fn wake_writer_if_due(&self, state: &mut State) {
        let first = state.first_pending.is_none();
        if first {
            state.first_pending = Some(Instant::now());
        }
        if first || state.pending_entries >= FLUSH_ENTRIES || state.pending_bytes >= FLUSH_BYTES {
            self.wake.notify_all();
        }
    }

    /// The index of `meta`'s function, made empty if this process has not seen it.
    fn index_of<'s>(&self, state: &'s mut State, meta: &FnMeta) -> &'s mut FnIndex {
        let next = &mut state.next_chunk;
        state.functions.entry(meta.key).or_insert_with(|| {
            let chunk = *next;
            *next -= 1;
            FnIndex {
                meta: meta.clone(),
                map: HashMap::default(),
                filter: Filter::default(),
                filter_epoch: 0,
                filter_has_map: true,
                probed_misses: 0,
                recent: Vec::new(),
                runs: Vec::new(),
                loaded_up_to: 0,
                own: BTreeSet::new(),
                builder: Builder::default(),
                builder_chunk: chunk,
                cursor: None,
                slots: Vec::new(),
                generation: 0,
                data_version: None,
            }
        })
    }

    /// Drops what this process knows of a function's results, pending ones included.
    fn forget_function(&self, state: &mut State, key: &[u8; 32]) {
        let Some(index) = state.functions.get_mut(key) else {
            return;
        };
        index.map.clear();
        index.filter = Filter::default();
        index.filter_epoch += 1;
        index.filter_has_map = true;
        index.probed_misses = 0;
        index.recent = Vec::new();
        index.runs = Vec::new();
        index.own.clear();
        index.cursor = None;
        index.data_version = None;
        index.slots = Vec::new();
        index.generation += 1;
        let mut dropped = index.builder.keys.len();
        let mut bytes = index.builder.data.records.len() + 36 * dropped;
        index.builder = Builder::default();
        let (sealed, kept): (Vec<Flushing>, Vec<Flushing>) = std::mem::take(&mut state.sealed)
            .into_iter()
            .partition(|job| job.fn_key == *key);
        state.sealed = kept;
        for job in sealed {
            state.in_flight.remove(&job.chunk);
            dropped += job.data.keys.len();
            bytes += job.data.records.len() + 36 * job.data.keys.len();
        }
        state.pending_entries = state.pending_entries.saturating_sub(dropped);
        state.pending_bytes = state.pending_bytes.saturating_sub(bytes);
    }

    /// The record `key` points to, reading its chunk from the file if needed, and whether it
    /// was found by the cursor (the record after the last hit) rather than the index.
    fn record(&self, fn_key: &[u8; 32], key: &[u8; 32], use_cursor: bool) -> Found {
        let chunk = match probe(&mut lock(&self.state), fn_key, key, use_cursor) {
            Probe::Done(found) => return found,
            Probe::Fetch(chunk) => chunk,
        };
        let fetched = store::fetch_chunk(&lock(&self.read), chunk.chunk);
        let mut guard = lock(&self.state);
        let state = &mut *guard;
        match fetched {
            Ok(Fetched::Chunk(data)) => {
                let data = Arc::new(data);
                if state.cache.len() >= CHUNK_CACHE {
                    state.cache.remove(0);
                }
                state.cache.push((chunk.chunk, Arc::clone(&data)));
                let pos = chunk.pos as usize;
                if let Some(index) = state.functions.get_mut(fn_key) {
                    index.cursor = Some(Cursor {
                        chunk: chunk.chunk,
                        next: pos + 1,
                        data: Arc::clone(&data),
                    });
                }
                Found::Record(Record::Shared(data, pos), false)
            }
            Ok(Fetched::Corrupt) => {
                self.corrupt.fetch_add(1, Ordering::Relaxed);
                state.gone.insert(chunk.chunk);
                Found::Absent(None)
            }
            // Gone, or unreadable now: run the task rather than fail it.
            Ok(Fetched::Gone) | Err(_) => {
                state.gone.insert(chunk.chunk);
                Found::Absent(None)
            }
        }
    }

    /// The writer thread: writes pending results every `FLUSH_INTERVAL`, when enough are
    /// pending, or when asked; a final time when the last `Memory` is dropped.
    fn writer_loop(&self) {
        loop {
            let stop = {
                let mut state = lock(&self.state);
                loop {
                    let due = state
                        .first_pending
                        .is_some_and(|t| t.elapsed() >= FLUSH_INTERVAL);
                    let big = state.pending_entries >= FLUSH_ENTRIES
                        || state.pending_bytes >= FLUSH_BYTES;
                    let asked = state.flush_requested > state.flushed;
                    if state.stop || due || big || asked {
                        break;
                    }
                    let wait = match state.first_pending {
                        Some(t) => FLUSH_INTERVAL.saturating_sub(t.elapsed()),
                        // Touched chunks are written now and then even when nothing else is.
                        None if !state.touched.is_empty() => FLUSH_INTERVAL * 20,
                        None => Duration::from_secs(3600),
                    };
                    let (next, timeout) = self
                        .wake
                        .wait_timeout(state, wait.max(Duration::from_millis(1)))
                        .unwrap_or_else(PoisonError::into_inner);
                    state = next;
                    if timeout.timed_out()
                        && !state.touched.is_empty()
                        && state.first_pending.is_none()
                    {
                        break;
                    }
                }
                state.stop
            };
            self.flush_now();
            if stop {
                let mut state = lock(&self.state);
                state.flushed = state.flush_requested;
                self.flushed.notify_all();
                return;
            }
        }
    }

    /// Writes every pending chunk, and the touched marks, in one transaction.
    fn flush_now(&self) {
        let conn = lock(&self.write);
        let (jobs, touched, target, limit) = {
            let mut state = lock(&self.state);
            // Every chunk being built joins those sealed before (which come first: they were
            // full before these began).
            let building: Vec<[u8; 32]> = state
                .functions
                .iter()
                .filter(|(_, index)| !index.builder.keys.is_empty())
                .map(|(key, _)| *key)
                .collect();
            for key in &building {
                seal(&mut state, key);
            }
            let jobs = std::mem::take(&mut state.sealed);
            state.pending_entries = 0;
            state.pending_bytes = 0;
            state.first_pending = None;
            state.last_touched = 0;
            let touched: Vec<i64> = state.touched.drain().collect();
            (jobs, touched, state.flush_requested, state.bytes_limit)
        };
        let written = if jobs.is_empty() && touched.is_empty() {
            Ok((Vec::new(), Vec::new()))
        } else {
            write_chunks(&conn, &jobs, &touched, limit)
        };
        drop(conn);
        let mut state = lock(&self.state);
        match written {
            Ok((ids, evicted)) => {
                for (job, id) in jobs.iter().zip(ids) {
                    if let Some(index) = state.functions.get_mut(&job.fn_key) {
                        index.own.insert(id);
                    }
                    // The index keeps the chunk's negative number for its keys (re-pointing
                    // each of them cost a random memory access per result, under the lock):
                    // lookups translate it.
                    state.written.insert(job.chunk, id);
                    if state.cache.len() >= CHUNK_CACHE {
                        state.cache.remove(0);
                    }
                    state.cache.push((id, Arc::clone(&job.data)));
                }
                for id in evicted {
                    state.gone.insert(id);
                    state.cache.retain(|(c, _)| *c != id);
                    for index in state.functions.values_mut() {
                        if index.cursor.as_ref().is_some_and(|c| c.chunk == id) {
                            index.cursor = None;
                        }
                    }
                }
            }
            Err(source) => {
                let lost: usize = jobs.iter().map(|j| j.data.keys.len()).sum();
                self.not_stored.fetch_add(lost as u64, Ordering::Relaxed);
                self.write_failures.fetch_add(1, Ordering::Relaxed);
                for job in &jobs {
                    if let Some(index) = state.functions.get_mut(&job.fn_key) {
                        index.map.retain(|_, loc| loc.chunk != job.chunk);
                        index.recent.retain(|(_, loc)| loc.chunk != job.chunk);
                        for run in &mut index.runs {
                            run.retain(|(_, loc)| loc.chunk != job.chunk);
                        }
                        for slot in index.slots.iter_mut().filter(|s| s.chunk == job.chunk) {
                            *slot = EMPTY;
                        }
                    }
                }
                // With no result to store, the write only recorded which chunks hits were
                // read from (for eviction): say that, not "store 0 results".
                let action = if lost == 0 {
                    "record the last use of the stored results this run read (no result was \
                     to be stored; the file may be damaged: `sqlite3 FILE 'PRAGMA \
                     integrity_check'` tells)"
                        .to_string()
                } else {
                    format!("store {lost} results (they will run again next time)")
                };
                state.error = Some(Error::store(&self.path, action, source));
            }
        }
        for job in &jobs {
            state.in_flight.remove(&job.chunk);
        }
        state.flushed = state.flushed.max(target);
        self.flushed.notify_all();
    }
}

/// One transaction: the chunks, the touched marks, then eviction down to `limit`. Returns
/// the new chunks' ids and the evicted ones'.
fn write_chunks(
    conn: &Connection,
    jobs: &[Flushing],
    touched: &[i64],
    limit: Option<u64>,
) -> rusqlite::Result<(Vec<i64>, Vec<i64>)> {
    let tx = store::immediate(conn)?;
    let now = store::now_ms();
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let function = store::function_id(&tx, &job.meta)?;
        ids.push(store::insert_chunk(
            &tx,
            function,
            &job.data.keys,
            &job.data,
            now,
        )?);
    }
    store::touch(&tx, touched, now)?;
    let evicted = match limit {
        Some(limit) => store::evict(&tx, limit)?,
        None => Vec::new(),
    };
    tx.commit()?;
    Ok((ids, evicted))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use parjob_core::delayed;

    use super::*;

    fn key(n: u64) -> ShortKey {
        short(blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn the_filter_never_forgets_a_key_and_rarely_lets_another_through() {
        let mut filter = Filter::with_capacity(100_000);
        assert!(!filter.may_contain(key(0)), "an empty filter holds nothing");
        // Filled to its intended fill exactly.
        let held = filter.capacity() as u64;
        for n in 0..held {
            filter.insert(key(n));
        }
        assert!((0..held).all(|n| filter.may_contain(key(n))));
        let through = (held..held + 1_000_000)
            .filter(|&n| filter.may_contain(key(n)))
            .count();
        // About 1 in 3 million at this fill (0.3 in 10^6 expected; 5 or more about once in
        // 50000 runs); 4 bytes per key let about 20 through, 2 bytes about 1000, and a filter
        // whose bits are not spread lets more.
        assert!(
            through < 5,
            "{through} of 10^6 keys not inserted let through"
        );
        assert!(!Filter::default().may_contain(key(1)));
    }

    static RUNS: AtomicUsize = AtomicUsize::new(0);

    fn triple(x: u64) -> u64 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        x * 3
    }

    static QUINTUPLES: AtomicUsize = AtomicUsize::new(0);

    fn quintuple(x: u64) -> u64 {
        QUINTUPLES.fetch_add(1, Ordering::SeqCst);
        x * 5
    }

    fn double(x: u64) -> u64 {
        x * 2
    }

    /// Sets every bit of every function's filter: every lookup is then a false positive
    /// (or a true one), and must find its answer in the index and the runs.
    fn saturate(memory: &Memory) {
        let mut state = lock(&memory.handle.inner.state);
        for index in state.functions.values_mut() {
            for block in &mut index.filter.blocks {
                block.0 = [u64::MAX; 8];
            }
        }
    }

    #[test]
    fn keys_a_saturated_filter_lets_through_are_answered_by_the_index() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let memory = Memory::open(dir.path().join("c.sqlite")).expect("open");
        let before = RUNS.load(Ordering::SeqCst);
        assert_eq!(memory.call(delayed(triple, 1000)).expect("call"), 3000);
        saturate(&memory);
        // Misses let through: each runs once and gives its own value, never another's.
        for x in 0..300u64 {
            assert_eq!(memory.call(delayed(triple, x)).expect("call"), 3 * x);
        }
        assert_eq!(RUNS.load(Ordering::SeqCst) - before, 301);
        // Hits let through: the results stored by this process are found again.
        for x in (0..300u64).rev() {
            assert_eq!(memory.call(delayed(triple, x)).expect("call"), 3 * x);
        }
        memory.flush().expect("flush");
        saturate(&memory);
        for x in 0..300u64 {
            assert_eq!(memory.call(delayed(triple, x)).expect("call"), 3 * x);
        }
        assert_eq!(
            RUNS.load(Ordering::SeqCst) - before,
            301,
            "nothing ran again"
        );
        let stats = memory.stats().expect("stats");
        assert_eq!((stats.hits, stats.misses), (600, 301));
    }

    #[test]
    fn own_results_are_found_newest_first_across_sorted_runs() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let memory = Memory::open(dir.path().join("c.sqlite")).expect("open");
        memory.call(delayed(double, 1)).expect("call");
        let mut state = lock(&memory.handle.inner.state);
        let index = state.functions.values_mut().next().expect("an index");
        let at = |pos| Loc { chunk: -7, pos };
        // Rounds of overlapping keys, each followed by a lookup (which sorts what was stored
        // since into a run, merged with the newest runs unless they are much bigger).
        let mut newest = HashMap::new();
        let mut pos = 0;
        for (round, size) in [2000u64, 400, 700, 90, 20, 5, 300].into_iter().enumerate() {
            let first = round as u64 * 37;
            for n in first..first + size {
                index.add_own(key(n), at(pos), None);
                newest.insert(n, at(pos));
                pos += 1;
            }
            assert_eq!(index.own_result(key(first)), Some(newest[&first]));
        }
        assert!(index.runs.len() > 1, "the test exercises several runs");
        for (n, loc) in &newest {
            assert_eq!(index.own_result(key(*n)), Some(*loc), "key {n}");
        }
        assert_eq!(index.own_result(key(1_000_000)), None);
    }

    static SEVENS: AtomicUsize = AtomicUsize::new(0);

    fn times_seven(x: u64) -> u64 {
        SEVENS.fetch_add(1, Ordering::SeqCst);
        x * 7
    }

    #[test]
    fn a_big_load_leaves_the_map_out_of_the_filter_until_misses_put_it_in() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        let stored = FILTER_LOAD as u64 + 1000;
        {
            let writer = Memory::open(&path).expect("open");
            for x in 0..stored {
                writer.call(delayed(times_seven, x)).expect("call");
            }
        }
        let ran = SEVENS.load(Ordering::SeqCst);
        let memory = Memory::open(&path).expect("open");
        let has_map = |memory: &Memory| {
            let state = lock(&memory.handle.inner.state);
            state
                .functions
                .values()
                .next()
                .expect("an index")
                .filter_has_map
        };
        // Loaded keys are found through the map while the filter does not hold them.
        for x in (0..stored).step_by(97) {
            assert_eq!(memory.call(delayed(times_seven, x)).expect("call"), 7 * x);
        }
        assert!(
            !has_map(&memory),
            "a big load leaves the map out of the filter"
        );
        // Misses probe the map until there were enough of them to build the whole filter.
        for x in stored..stored + 5000 {
            assert_eq!(memory.call(delayed(times_seven, x)).expect("call"), 7 * x);
        }
        assert!(
            has_map(&memory),
            "5000 misses put the map's keys in the filter"
        );
        // Then the filter holds every key: loaded ones, and those stored here, are found.
        for x in (0..stored + 5000).step_by(89) {
            assert_eq!(memory.call(delayed(times_seven, x)).expect("call"), 7 * x);
        }
        assert_eq!(
            SEVENS.load(Ordering::SeqCst) - ran,
            5000,
            "only the new keys ran"
        );
    }

    #[test]
    fn a_key_another_handle_stores_during_a_run_is_found_after_or_run_again() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        // Two handles on one file have their own indexes and filters, as two processes do.
        let here = Memory::open(&path).expect("open");
        let there = Memory::open(&path).expect("open");
        let before = QUINTUPLES.load(Ordering::SeqCst);
        assert_eq!(here.call(delayed(quintuple, 5)).expect("call"), 25);
        let function = Function {
            meta: lock(&here.handle.inner.state)
                .functions
                .values()
                .next()
                .expect("an index")
                .meta
                .clone(),
        };
        let mut scratch = Vec::new();
        let eight = function.key_of(&8u64, &mut scratch, 0).expect("a key");
        // `here` looks 8 up (as a run does) before `there` stores it: a miss, to be run.
        assert!(matches!(
            here.lookup::<u64>(&function, &eight, 0).0,
            Lookup::Miss
        ));
        assert_eq!(there.call(delayed(quintuple, 7)).expect("call"), 35);
        assert_eq!(there.call(delayed(quintuple, 8)).expect("call"), 40);
        there.flush().expect("flush");
        // A call starts by loading what other handles wrote: 7 and 8 are found, with their
        // values (7 was never looked up here: only loading it put it in the filter).
        assert_eq!(here.call(delayed(quintuple, 7)).expect("call"), 35);
        assert_eq!(here.call(delayed(quintuple, 8)).expect("call"), 40);
        assert_eq!(
            QUINTUPLES.load(Ordering::SeqCst) - before,
            3,
            "5, 7 and 8 ran once"
        );
        assert_eq!(here.stats().expect("stats").hits, 2);
    }

    fn bytes_of(seed: u64, len: usize) -> Vec<u8> {
        vec![seed as u8; len]
    }

    /// Results that overflow the chunk being built (while the writer is busy) go into new
    /// chunks, found meanwhile and stored after; one bigger than a chunk may hold is returned
    /// and not stored. Before, the writer wrote everything pending for a function as one row,
    /// and SQLite refused a blob over 1 GB: all those results were lost and the run failed.
    /// (The limits are 1 MiB a chunk and 3 MiB a result in tests.)
    #[test]
    fn results_past_a_chunk_go_into_chunks_of_their_own_and_one_too_big_is_not_stored() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        let memory = Memory::open(&path).expect("open");
        {
            // The writer waits for this connection: everything stays pending.
            let _writer_held = lock(&memory.handle.inner.write);
            for seed in 0..10u64 {
                let value = memory.call(delayed(bytes_of, (seed, 300_000)));
                assert_eq!(value.expect("call").len(), 300_000);
            }
            // Found while pending, in sealed chunks and in the one being built.
            for seed in [0u64, 4, 9] {
                let value = memory.call(delayed(bytes_of, (seed, 300_000)));
                assert_eq!(value.expect("call")[0], seed as u8);
            }
            let big = memory.call(delayed(bytes_of, (1, 4 << 20)));
            assert_eq!(big.expect("returned all the same").len(), 4 << 20);
            assert_eq!(lock(&memory.handle.inner.state).sealed.len(), 3);
        }
        let stats = memory.stats().expect("stats");
        assert_eq!(
            (stats.entries, stats.chunks),
            (10, 4),
            "3 + 3 + 3 + 1 results"
        );
        assert_eq!((stats.hits, stats.not_stored), (3, 1));
        // Another handle (another process) finds every one of them.
        let other = Memory::open(&path).expect("open");
        for seed in 0..10u64 {
            let value = other
                .call(delayed(bytes_of, (seed, 300_000)))
                .expect("call");
            assert_eq!((value.len(), value[299_999]), (300_000, seed as u8));
        }
        assert_eq!(other.stats().expect("stats").misses, 0);
    }

    /// The same through a run's batches (`store_many`).
    #[test]
    fn a_run_whose_results_overflow_a_chunk_stores_them_all() {
        use std::cell::RefCell;
        use std::rc::Rc;

        use parjob_core::{RunUnordered, SequentialPool};

        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        let memory = Memory::open(&path).expect("open");
        let tasks = || {
            (0..12u64).map(|seed| {
                let len = if seed == 5 { 4 << 20 } else { 250_000 };
                delayed(bytes_of, (seed, len))
            })
        };
        let run = |memory: &Memory| {
            let starts = Rc::new(RefCell::new(0));
            let run = crate::CachedRun::new(
                memory,
                tasks(),
                true,
                Box::new(move |feed| {
                    *starts.borrow_mut() += 1;
                    Box::new(RunUnordered::new(
                        Arc::new(SequentialPool),
                        feed,
                        &Default::default(),
                    ))
                }),
            );
            crate::collect(run).expect("the run")
        };
        // (The run waits for its results to be written at its end: the writer is not held
        // here, and the run's batches outgrow a chunk faster than it writes them.)
        let values = run(&memory);
        assert_eq!(values.len(), 12);
        assert_eq!(values[5].len(), 4 << 20);
        let stats = memory.stats().expect("stats");
        assert_eq!(
            (stats.entries, stats.not_stored),
            (11, 1),
            "all but the 4 MiB one"
        );
        assert!(stats.chunks >= 3, "{} chunks", stats.chunks);
        let other = Memory::open(&path).expect("open");
        let values = run(&other);
        assert_eq!(values[11][0], 11);
        assert_eq!(
            other.stats().expect("stats").misses,
            1,
            "only the one not stored"
        );
    }

    /// A result whose `Serialize` writes half its value, then panics.
    #[derive(Debug, PartialEq, serde::Deserialize)]
    struct Touchy(u64, String);

    impl Serialize for Touchy {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            use serde::ser::SerializeTupleStruct;
            let mut fields = s.serialize_tuple_struct("Touchy", 2)?;
            fields.serialize_field(&self.0)?;
            assert!(self.0 != 7, "seven does not serialize");
            fields.serialize_field(&self.1)?;
            fields.end()
        }
    }

    fn touchy(x: u64) -> Touchy {
        Touchy(x, format!("value-{x}"))
    }

    fn touchy_length(t: Touchy) -> usize {
        t.1.len()
    }

    /// A `Serialize` that panics costs its own result only: it is returned and not stored,
    /// and the next result is stored whole. Before, the half-written bytes stayed and became
    /// the start of the next record: that result failed to decode in every later process.
    /// An argument whose `Serialize` panics is that task's key error, not a panic.
    #[test]
    fn a_serialize_that_panics_costs_only_its_own_result() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let memory = Memory::open(dir.path().join("c.sqlite")).expect("open");
        assert_eq!(memory.call(delayed(touchy, 7)).expect("call"), touchy(7));
        assert_eq!(memory.call(delayed(touchy, 8)).expect("call"), touchy(8));
        assert_eq!(memory.call(delayed(touchy, 8)).expect("a hit"), touchy(8));
        let stats = memory.stats().expect("stats");
        assert_eq!((stats.hits, stats.not_stored, stats.entries), (1, 1, 1));
        let error = memory
            .call(delayed(touchy_length, touchy(7)))
            .expect_err("no key");
        assert!(
            matches!(&error, Error::Key { .. }) && error.to_string().contains("panicked"),
            "{error}"
        );
        assert_eq!(
            memory
                .call(delayed(touchy_length, touchy(3)))
                .expect("call"),
            7
        );
    }

    static DOUBLES: AtomicUsize = AtomicUsize::new(0);

    fn counted_double(x: u64) -> u64 {
        DOUBLES.fetch_add(1, Ordering::SeqCst);
        x * 2
    }

    /// A `clear` by another process is seen at the next call: results this process holds in
    /// memory from before it are not returned. Before, a long-lived process answered them
    /// from its memory of the chunks for ever (and never stored them again).
    #[test]
    fn a_clear_by_another_handle_is_seen_by_one_that_holds_the_results() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        let here = Memory::open(&path).expect("open");
        let there = Memory::open(&path).expect("open");
        let runs = || DOUBLES.load(Ordering::SeqCst);
        let before = runs();
        for x in 0..20 {
            assert_eq!(here.call(delayed(counted_double, x)).expect("call"), 2 * x);
        }
        here.flush().expect("flush");
        for x in 0..20 {
            assert_eq!(here.call(delayed(counted_double, x)).expect("hit"), 2 * x);
        }
        assert_eq!(runs() - before, 20);
        there.clear().expect("clear");
        for x in 0..20 {
            assert_eq!(here.call(delayed(counted_double, x)).expect("call"), 2 * x);
        }
        assert_eq!(
            runs() - before,
            40,
            "every result ran again after the clear"
        );
        here.flush().expect("flush");
        assert_eq!(
            there.stats().expect("stats").entries,
            20,
            "and was stored again"
        );
    }

    static HALVES: AtomicUsize = AtomicUsize::new(0);

    fn counted_half(x: u64) -> u64 {
        HALVES.fetch_add(1, Ordering::SeqCst);
        x / 2
    }

    /// The same when the results come from a lookup cursor whose chunk has left the cache
    /// (other functions' chunks took its place): the cursor let go of nothing before.
    #[test]
    fn a_clear_by_another_handle_reaches_a_cursor_past_the_cache() {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("c.sqlite");
        let here = Memory::open(&path).expect("open");
        let there = Memory::open(&path).expect("open");
        let before = HALVES.load(Ordering::SeqCst);
        for x in 100..102 {
            here.call(delayed(counted_half, x)).expect("call");
        }
        here.flush().expect("flush");
        // A fresh handle reads that chunk back: its cursor stops after 100.
        let reader = Memory::open(&path).expect("open");
        assert_eq!(reader.call(delayed(counted_half, 100)).expect("hit"), 50);
        // Chunks of another function push it out of the cache (16 chunks).
        for seed in 0..(CHUNK_CACHE as u64 + 2) {
            here.call(delayed(bytes_of, (seed, 10))).expect("call");
            here.flush().expect("flush");
            reader.call(delayed(bytes_of, (seed, 10))).expect("hit");
        }
        there.clear().expect("clear");
        assert_eq!(reader.call(delayed(counted_half, 101)).expect("call"), 50);
        assert_eq!(
            HALVES.load(Ordering::SeqCst) - before,
            3,
            "101 ran again after the clear"
        );
    }

    #[test]
    fn hash_maps_with_a_random_seed_are_told_from_ordered_and_seeded_ones() {
        use std::collections::{BTreeMap, HashMap, HashSet};
        type Fx = BuildHasherDefault<FastHasher>;
        assert!(randomly_ordered(std::any::type_name::<(
            HashMap<String, u64>,
        )>()));
        assert!(randomly_ordered(std::any::type_name::<(
            u8,
            Vec<HashSet<u32>>
        )>()));
        assert!(!randomly_ordered(std::any::type_name::<(
            HashMap<String, u64, Fx>,
        )>()));
        assert!(!randomly_ordered(std::any::type_name::<(
            BTreeMap<String, u64>,
        )>()));
    }
}
