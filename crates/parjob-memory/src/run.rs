//! A run with a memory: stored results are yielded at once, the other tasks run on whatever
//! runs tasks (a `Parallel`'s `run_unordered`), and each result is stored as it completes.
//!
//! The user's iterator is pulled on the calling thread, one task at a time: a task whose key
//! is stored is answered from the cache; a task that is not (a miss) is handed to the inner
//! run, which pulls misses through a [`Feed`] as its workers free up. The inner run is
//! unordered, so that every result is stored the moment it completes; this layer puts
//! results back in input order for [`CachedIter`].
//!
//! Laziness: the inner run looks ahead as far as its `pre_dispatch` allows, in misses; to
//! find the next miss the feed skips stored results, keeping at most [`LOOKAHEAD`] of them
//! waiting. When that many wait, the inner run is told its input ended, and a new inner run
//! starts at the next miss. So a run holds at most `LOOKAHEAD` stored results plus the
//! inner run's own look-ahead.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use parjob_core::Task;

use crate::memory::{Function, Lookup, Stored, Ticket};
use crate::{Error, Memory};

/// Stored results a run keeps waiting at most while it looks for the next task to run.
pub const LOOKAHEAD: usize = 4096;

/// Tasks `run` pulls from its input at once, to look their keys up together (in one lock,
/// their filter lines fetched together).
const PULL_BATCH: usize = 64;

/// Results `run` stores at once (in one lock), at most: fewer when the backend has no more
/// ready (they are stored before the run waits for more).
const STORE_BATCH: usize = 256;
/// ... or at most this many bytes of them.
const STORE_BYTES: usize = 1 << 20;

/// What runs the tasks a memory has no result for: given the misses as an iterator, it
/// yields `(position among the misses, result)` in any order, as `Parallel::run_unordered`
/// does.
pub type Runner<'p, I, T> = Box<
    dyn FnMut(
            Feed<I, T>,
        ) -> Box<
            dyn Iterator<Item = (usize, Result<<T as Task>::Output, parjob_core::Error>)> + 'p,
        > + 'p,
>;

type Inner<'p, T> =
    Box<dyn Iterator<Item = (usize, Result<<T as Task>::Output, parjob_core::Error>)> + 'p>;

/// An item of a run with its error boxed (see `CachedRun::next_boxed`).
type Item<R> = (usize, Result<R, Box<Error>>);

/// What looking a task up found, or why it has no key.
type Answer<R> = Result<(Lookup<R>, Ticket), Box<Error>>;

enum Slot<R> {
    Ready(Result<R, Box<Error>>),
    Waiting,
}

enum Pulled<T: Task> {
    Found(usize, Result<T::Output, Box<Error>>),
    Miss(T, usize, Ticket),
    End,
}

/// What the outer stream and the feed share.
struct Source<I, T: Task> {
    tasks: I,
    exhausted: bool,
    next_index: usize,
    memory: Memory,
    function: Function,
    scratch: Vec<u8>,
    /// Tasks pulled from the input at once (1 but for `run`, which collects every result
    /// anyway): their keys are computed together and their filter lines fetched together.
    batch: usize,
    /// Tasks pulled from the input and looked up, not yet answered or handed out, with their
    /// position and what the lookup found (or why the task has no key).
    queue: VecDeque<(T, usize, Answer<T::Output>)>,
    /// The keys and positions of the batch being pulled (reused).
    batch_keys: Vec<([u8; 32], usize)>,
    /// What the batch's lookups found (reused).
    batch_found: Vec<(Lookup<T::Output>, Ticket)>,
    /// Results of this run not yet handed to the memory: at most `store_batch` of them, and
    /// none while the run waits for the backend.
    stored: Stored,
    /// 1 (each result stored as it comes) but for `run`, which stores them in batches.
    store_batch: usize,
    ordered: bool,
    /// Ordered: one slot per task pulled and not yet yielded, from position `base`.
    slots: VecDeque<Slot<T::Output>>,
    base: usize,
    /// Unordered: results found in the cache by the feed, not yet yielded.
    ready: VecDeque<Item<T::Output>>,
    /// A miss found by the outer stream, for the feed to hand out first.
    pending: Option<(T, usize, Ticket)>,
    /// Misses handed to the current inner run, by their position in it: (input position,
    /// key), `None` once its result came back.
    handed: VecDeque<Option<(usize, Ticket)>>,
    handed_base: usize,
    /// The feed told the current inner run that its input ended.
    feed_ended: bool,
    /// Misses pending or handed out whose result has not come back.
    outstanding: usize,
}

impl<I: Iterator<Item = T>, T: Task> Source<I, T> {
    fn pull(&mut self) -> Pulled<T> {
        if self.queue.is_empty() {
            self.fill();
        }
        let Some((task, index, found)) = self.queue.pop_front() else {
            return Pulled::End;
        };
        match found {
            Err(error) => Pulled::Found(index, Err(error)),
            Ok((Lookup::Hit(value), _)) => Pulled::Found(index, Ok(value)),
            Ok((Lookup::Failed(error), _)) => Pulled::Found(index, Err(error)),
            Ok((Lookup::Miss, ticket)) => Pulled::Miss(task, index, ticket),
        }
    }

    /// Pulls up to `batch` tasks from the input, computes their keys and looks them up
    /// together (one lock; their filter lines fetched at once, so that their cache misses
    /// overlap).
    fn fill(&mut self) {
        if self.exhausted {
            return;
        }
        // The user's iterator may take its time (read a file, wait for input): results held
        // are stored first, as before any other wait.
        self.store_held();
        let mut keys = std::mem::take(&mut self.batch_keys);
        keys.clear();
        let mut pulled = Vec::with_capacity(self.batch.max(1));
        while self.queue.len() + pulled.len() < self.batch.max(1) {
            let Some(task) = self.tasks.next() else {
                self.exhausted = true;
                break;
            };
            let index = self.next_index;
            self.next_index += 1;
            let keyless = match self.function.key_of(task.args(), &mut self.scratch, index) {
                Ok(key) => {
                    keys.push((key, index));
                    None
                }
                Err(error) => Some(Box::new(error)),
            };
            pulled.push((task, index, keyless));
        }
        let mut found = std::mem::take(&mut self.batch_found);
        found.clear();
        self.memory.lookup_many(&self.function, &keys, &mut found);
        let mut answers = found.drain(..);
        for (task, index, keyless) in pulled {
            let answer = match keyless {
                Some(error) => Err(error),
                // One answer per key, in order (`lookup_many`'s contract).
                None => answers.next().ok_or_else(|| {
                    Box::new(Error::Key {
                        index,
                        function: self.function.meta.name,
                        message: "internal: a task's key was not looked up".into(),
                    })
                }),
            };
            self.queue.push_back((task, index, answer));
        }
        drop(answers);
        self.batch_found = found;
        self.batch_keys = keys;
    }

    /// Hands the results held to the memory (one lock for all of them).
    fn store_held(&mut self) {
        if self.stored.len() > 0 {
            self.memory.store_many(&self.function, &mut self.stored);
        }
    }

    fn waiting(&self) -> usize {
        if self.ordered {
            self.slots.len()
        } else {
            self.ready.len()
        }
    }

    fn hand(&mut self, index: usize, key: Ticket) {
        self.handed.push_back(Some((index, key)));
    }

    /// The input position and key of the inner run's task `position`, forgotten there.
    fn take_handed(&mut self, position: usize) -> Option<(usize, Ticket)> {
        let at = position.checked_sub(self.handed_base)?;
        let taken = self.handed.get_mut(at)?.take();
        while matches!(self.handed.front(), Some(None)) {
            self.handed.pop_front();
            self.handed_base += 1;
        }
        taken
    }
}

/// The misses of a run with a memory, as the inner run pulls them: the task the outer stream
/// found first, then the user's tasks with stored results skipped (and kept for the outer
/// stream), at most [`LOOKAHEAD`] of them.
pub struct Feed<I, T: Task> {
    source: Rc<RefCell<Source<I, T>>>,
}

impl<I: Iterator<Item = T>, T: Task> Iterator for Feed<I, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        let mut source = self.source.borrow_mut();
        if source.feed_ended {
            return None;
        }
        if let Some((task, index, key)) = source.pending.take() {
            source.hand(index, key);
            return Some(task);
        }
        loop {
            if source.waiting() >= LOOKAHEAD {
                source.feed_ended = true;
                return None;
            }
            match source.pull() {
                Pulled::Found(index, result) => {
                    if source.ordered {
                        source.slots.push_back(Slot::Ready(result));
                    } else {
                        source.ready.push_back((index, result));
                    }
                }
                Pulled::Miss(task, index, key) => {
                    if source.ordered {
                        source.slots.push_back(Slot::Waiting);
                    }
                    source.outstanding += 1;
                    source.hand(index, key);
                    return Some(task);
                }
                Pulled::End => {
                    source.feed_ended = true;
                    return None;
                }
            }
        }
    }
}

/// The results of a run with a memory, made by `parallel.memory(&memory).run_iter(..)` (in
/// input order) or `.run_unordered(..)` (as they complete). Stored results come at once;
/// a failed task yields its `Err` and the run goes on; dropping the iterator stops the run.
pub struct CachedRun<'p, I, T: Task> {
    source: Option<Rc<RefCell<Source<I, T>>>>,
    runner: Runner<'p, I, T>,
    inner: Option<Inner<'p, T>>,
    /// An error to yield before anything else (a function that cannot be cached).
    failed: Option<Error>,
    done: bool,
}

impl<'p, I, T> CachedRun<'p, I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    /// A run of `tasks` with `memory`, whose misses `runner` runs. `ordered`: results in
    /// input order.
    pub fn new(
        memory: &Memory,
        tasks: impl IntoIterator<IntoIter = I>,
        ordered: bool,
        runner: Runner<'p, I, T>,
    ) -> Self {
        let function = memory
            .function::<T>()
            .and_then(|f| memory.refresh(&f).map(|()| f));
        let (source, failed) = match function {
            Ok(function) => {
                let source = Source {
                    tasks: tasks.into_iter(),
                    exhausted: false,
                    next_index: 0,
                    memory: memory.clone(),
                    function,
                    scratch: Vec::new(),
                    batch: 1,
                    queue: VecDeque::new(),
                    batch_keys: Vec::new(),
                    batch_found: Vec::new(),
                    stored: Stored::default(),
                    store_batch: 1,
                    ordered,
                    slots: VecDeque::new(),
                    base: 0,
                    ready: VecDeque::new(),
                    pending: None,
                    handed: VecDeque::new(),
                    handed_base: 0,
                    feed_ended: false,
                    outstanding: 0,
                };
                (Some(Rc::new(RefCell::new(source))), None)
            }
            Err(error) => (None, Some(error)),
        };
        CachedRun {
            source,
            runner,
            inner: None,
            failed,
            done: false,
        }
    }

    /// Readies the run for a caller that takes every result in one loop (`collect`,
    /// `collect_results`); returns how many tasks the input says it holds at least.
    fn pull_everything(&mut self) -> usize {
        self.source.as_ref().map_or(0, |s| {
            let mut s = s.borrow_mut();
            // Every task will be pulled: a few at a time cost no laziness `run` promises.
            s.batch = PULL_BATCH;
            // Nothing runs between two results but the caller's loop: they can be stored a
            // few at a time (and always before the run waits for more).
            s.store_batch = STORE_BATCH;
            let hint = s.tasks.size_hint().0;
            // Every task will be pulled: an empty index can be sized for all of them at once.
            s.memory.reserve(&s.function, hint);
            hint
        })
    }

    /// The same run, failing with `error` before anything else (a configuration its caller
    /// found wrong): `error` is its only item.
    #[must_use]
    pub fn failing(mut self, error: Error) -> Self {
        self.failed = Some(error);
        self
    }

    /// Starts an inner run for the pending miss, unless the current one can still take it.
    fn ensure_inner(&mut self, source: &Rc<RefCell<Source<I, T>>>) {
        let restart = {
            let mut s = source.borrow_mut();
            let restart = self.inner.is_none() || s.feed_ended;
            if restart {
                s.handed.clear();
                s.handed_base = 0;
                s.feed_ended = false;
            }
            restart
        };
        if restart {
            // The old run has nothing left to do: every miss it was handed came back.
            self.inner = None;
            self.inner = Some((self.runner)(Feed {
                source: Rc::clone(source),
            }));
        }
    }

    /// The next result of the inner run, stored, with its input position; `None` if the
    /// inner run ended.
    fn next_from_inner(&mut self, source: &Rc<RefCell<Source<I, T>>>) -> Option<Item<T::Output>> {
        loop {
            // Results held are stored before the run may wait for the backend: a result is
            // never held while nothing else happens (a kill then would lose it).
            let ready = self.inner.as_ref().map_or(0, |inner| inner.size_hint().0);
            if ready == 0 {
                source.borrow_mut().store_held();
            }
            let next = self.inner.as_mut().and_then(Iterator::next);
            let Some((position, result)) = next else {
                // The inner run ended; a miss the outer stream found may still wait for one.
                if source.borrow().pending.is_some() {
                    self.inner = None;
                    self.ensure_inner(source);
                    continue;
                }
                return None;
            };
            let mut s = source.borrow_mut();
            let Some((index, key)) = s.take_handed(position) else {
                if let Err(error) = result {
                    // An error for no task the inner run was handed: it could not start (a
                    // backend not built in, a pool that failed to start). Another inner run
                    // would fail alike, so the run ends with it (`next_boxed`), instead of
                    // starting one after another for ever.
                    drop(s);
                    self.inner = None;
                    self.failed = Some(Error::Task(error));
                    return None;
                }
                continue;
            };
            s.outstanding = s.outstanding.saturating_sub(1);
            let result = match result {
                Ok(value) if s.store_batch > 1 => {
                    let s = &mut *s;
                    s.stored.push(&s.memory, key, &value);
                    if s.stored.len() >= s.store_batch || s.stored.bytes() >= STORE_BYTES {
                        s.store_held();
                    }
                    Ok(value)
                }
                Ok(value) => {
                    s.memory.store(&s.function, key, Ok(&value));
                    Ok(value)
                }
                Err(error) => {
                    s.store_held();
                    let error = error.with_task_index(index);
                    s.memory
                        .store_failure::<T::Output>(&s.function, key, &error);
                    Err(Box::new(Error::Task(error)))
                }
            };
            return Some((index, result));
        }
    }

    /// The end of the run: what is pending is written. A failure to write is a warning on
    /// stderr, not the run's failure: every result was computed and is returned (as joblib's
    /// Memory warns when it cannot write its cache); the results not written are counted in
    /// `Stats::not_stored` and run again next time.
    fn finish(&mut self) -> Option<Item<T::Output>> {
        self.done = true;
        self.inner = None;
        let memory = self.source.as_ref().map(|s| {
            let mut s = s.borrow_mut();
            s.store_held();
            s.memory.clone()
        })?;
        if let Err(error) = memory.flush() {
            // (The failed write may be of results of earlier calls too: the memory is shared.)
            eprintln!(
                "parjob: warning: a write to the cache since its last flush failed: {error}; \
                 this run's results are all returned"
            );
        }
        None
    }

    fn next_ordered(&mut self, source: &Rc<RefCell<Source<I, T>>>) -> Option<Item<T::Output>> {
        loop {
            let mut s = source.borrow_mut();
            match s.slots.front() {
                Some(Slot::Ready(_)) => {
                    let index = s.base;
                    s.base += 1;
                    if let Some(Slot::Ready(result)) = s.slots.pop_front() {
                        return Some((index, result));
                    }
                }
                Some(Slot::Waiting) => {
                    drop(s);
                    match self.next_from_inner(source) {
                        Some((index, result)) => {
                            let mut s = source.borrow_mut();
                            let at = index - s.base;
                            if let Some(slot) = s.slots.get_mut(at) {
                                *slot = Slot::Ready(result);
                            }
                        }
                        None => {
                            let mut s = source.borrow_mut();
                            let index = s.base;
                            if let Some(error) = self.failed.take() {
                                self.done = true;
                                return Some((index, Err(Box::new(error))));
                            }
                            // The inner run ended with tasks unanswered (it was stopped):
                            // say so for the first of them rather than wait for ever.
                            s.base += 1;
                            s.slots.pop_front();
                            return Some((
                                index,
                                Err(Box::new(Error::Task(parjob_core::Error::cancelled(index)))),
                            ));
                        }
                    }
                }
                None => match s.pull() {
                    Pulled::Found(index, result) => {
                        s.base = index + 1;
                        return Some((index, result));
                    }
                    Pulled::Miss(task, index, key) => {
                        s.slots.push_back(Slot::Waiting);
                        s.pending = Some((task, index, key));
                        s.outstanding += 1;
                        drop(s);
                        self.ensure_inner(source);
                    }
                    Pulled::End => {
                        drop(s);
                        return self.finish();
                    }
                },
            }
        }
    }

    fn next_unordered(&mut self, source: &Rc<RefCell<Source<I, T>>>) -> Option<Item<T::Output>> {
        loop {
            let mut s = source.borrow_mut();
            if let Some(item) = s.ready.pop_front() {
                return Some(item);
            }
            if s.outstanding > 0 {
                drop(s);
                if let Some(item) = self.next_from_inner(source) {
                    return Some(item);
                }
                let mut s = source.borrow_mut();
                if let Some(error) = self.failed.take() {
                    self.done = true;
                    let index = s.handed.iter().flatten().map(|(i, _)| *i).min();
                    let index = index.or(s.pending.as_ref().map(|p| p.1)).unwrap_or(0);
                    return Some((index, Err(Box::new(error))));
                }
                // The inner run ended with tasks unanswered (it was stopped): each is
                // reported, never waited for.
                s.outstanding = 0;
                let lost: Vec<usize> = s.handed.drain(..).flatten().map(|(i, _)| i).collect();
                for index in lost {
                    let error = Box::new(Error::Task(parjob_core::Error::cancelled(index)));
                    s.ready.push_back((index, Err(error)));
                }
                continue;
            }
            match s.pull() {
                Pulled::Found(index, result) => return Some((index, result)),
                Pulled::Miss(task, index, key) => {
                    s.pending = Some((task, index, key));
                    s.outstanding += 1;
                    drop(s);
                    self.ensure_inner(source);
                }
                Pulled::End => {
                    drop(s);
                    return self.finish();
                }
            }
        }
    }
}

impl<I, T> Iterator for CachedRun<'_, I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    type Item = (usize, Result<T::Output, Error>);

    fn next(&mut self) -> Option<Self::Item> {
        self.next_boxed()
            .map(|(index, result)| (index, result.map_err(|error| *error)))
    }
}

impl<I, T> CachedRun<'_, I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    /// The next item, its error boxed: results travel through the run's queues in 16 bytes
    /// plus the value rather than the size of an `Error` (moving those showed in profiles).
    fn next_boxed(&mut self) -> Option<Item<T::Output>> {
        if let Some(error) = self.failed.take() {
            self.done = true;
            return Some((0, Err(Box::new(error))));
        }
        if self.done {
            return None;
        }
        let source = Rc::clone(self.source.as_ref()?);
        let ordered = source.borrow().ordered;
        if ordered {
            self.next_ordered(&source)
        } else {
            self.next_unordered(&source)
        }
    }
}

impl<I, T: Task> Drop for CachedRun<'_, I, T> {
    /// Results that came back are stored even when the run is dropped before its end.
    fn drop(&mut self) {
        // The inner run first: it holds the feed, which borrows the source while it pulls.
        self.inner = None;
        if let Some(source) = &self.source
            && let Ok(mut source) = source.try_borrow_mut()
            && source.stored.len() > 0
        {
            let source = &mut *source;
            source
                .memory
                .store_many(&source.function, &mut source.stored);
        }
    }
}

/// Every result in input order, or the first failure: how `run` is built on [`CachedRun`].
/// On a failure, the run stops (tasks not started are skipped) and what was stored is kept.
pub fn collect<I, T>(mut run: CachedRun<'_, I, T>) -> Result<Vec<T::Output>, Error>
where
    I: Iterator<Item = T>,
    T: Task,
{
    let hint = run.pull_everything();
    let mut out = Vec::new();
    // An input may claim more than memory holds; grow as results come instead.
    let _ = out.try_reserve_exact(hint.min(1 << 24));
    while let Some((_, result)) = run.next_boxed() {
        out.push(result.map_err(|error| *error)?);
    }
    Ok(out)
}

/// Every result of `run` in input order, failures included, as `Parallel::run_results`: a
/// failed task is its `Err` in the vector and the run goes on.
///
/// # Errors
/// What is about no task: a run that could not start. (A failure to write the file is a
/// warning: the results are returned, and the ones not written run again next time.)
pub fn collect_results<I, T>(
    mut run: CachedRun<'_, I, T>,
) -> Result<Vec<Result<T::Output, Error>>, Error>
where
    I: Iterator<Item = T>,
    T: Task,
{
    let hint = run.pull_everything();
    let mut out = Vec::new();
    let _ = out.try_reserve_exact(hint.min(1 << 24));
    while let Some((_, result)) = run.next_boxed() {
        match result {
            Ok(value) => out.push(Ok(value)),
            Err(error) if error.task_index().is_some() => out.push(Err(*error)),
            Err(error) => return Err(*error),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use parjob_core::{RunUnordered, SequentialPool, delayed};

    use super::*;

    fn double(x: u64) -> u64 {
        x * 2
    }

    /// What `Parallel::run_unordered` gives when its pool cannot start.
    fn not_started<I: Iterator<Item = T>, T: Task>(_feed: I) -> RunUnordered<I, T> {
        RunUnordered::failed(parjob_core::Error::InvalidConfig("no such pool".into()))
    }

    /// An inner run that cannot start (what `Parallel` gives when its pool fails to start)
    /// ends the run with its error, for the first task waiting: never a loop that starts
    /// one failing inner run after another.
    #[test]
    fn an_inner_run_that_cannot_start_ends_the_run_with_its_error() {
        let dir = tempfile::tempdir().unwrap();
        let memory = Memory::open(dir.path().join("cache.sqlite")).unwrap();
        for ordered in [true, false] {
            let starts = Rc::new(RefCell::new(0));
            let counted = Rc::clone(&starts);
            let run = CachedRun::new(
                &memory,
                (0..5u64).map(|i| delayed(double, i)),
                ordered,
                Box::new(move |feed| {
                    *counted.borrow_mut() += 1;
                    assert!(
                        *counted.borrow() <= 3,
                        "the inner run was restarted over and over"
                    );
                    Box::new(not_started(feed))
                }),
            );
            let items: Vec<_> = run.collect();
            assert_eq!(items.len(), 1, "ordered {ordered}: {items:?}");
            let (index, result) = &items[0];
            assert_eq!(*index, 0);
            let message = result.as_ref().unwrap_err().to_string();
            assert!(message.contains("no such pool"), "{message}");
            assert_eq!(*starts.borrow(), 1, "ordered {ordered}");
        }
        // The same memory still runs tasks once a pool works.
        let run = CachedRun::new(
            &memory,
            (0..5u64).map(|i| delayed(double, i)),
            true,
            Box::new(|feed| {
                Box::new(RunUnordered::new(
                    Arc::new(SequentialPool),
                    feed,
                    &Default::default(),
                ))
            }),
        );
        let values: Vec<u64> = run.map(|(_, r)| r.unwrap()).collect();
        assert_eq!(values, [0, 2, 4, 6, 8]);
    }
}
