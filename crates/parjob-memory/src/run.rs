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

use crate::memory::{Function, Lookup, Ticket};
use crate::{Error, Memory};

/// Stored results a run keeps waiting at most while it looks for the next task to run.
pub const LOOKAHEAD: usize = 4096;

/// Tasks `run` pulls from its input at once, to look their keys up together.
const PULL_BATCH: usize = 32;

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

enum Slot<R> {
    Ready(Result<R, Error>),
    Waiting,
}

enum Pulled<T: Task> {
    Found(usize, Result<T::Output, Error>),
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
    /// Tasks pulled from the input and not yet looked up, with their position and key.
    queue: VecDeque<(T, usize, Result<[u8; 32], Error>)>,
    /// The keys of the last batch (reused).
    batch_keys: Vec<[u8; 32]>,
    ordered: bool,
    /// Ordered: one slot per task pulled and not yet yielded, from position `base`.
    slots: VecDeque<Slot<T::Output>>,
    base: usize,
    /// Unordered: results found in the cache by the feed, not yet yielded.
    ready: VecDeque<(usize, Result<T::Output, Error>)>,
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
        let Some((task, index, key)) = self.queue.pop_front() else {
            return Pulled::End;
        };
        let key = match key {
            Ok(key) => key,
            Err(error) => return Pulled::Found(index, Err(error)),
        };
        match self.memory.lookup(&self.function, &key, index) {
            (Lookup::Hit(value), _) => Pulled::Found(index, Ok(value)),
            (Lookup::Failed(error), _) => Pulled::Found(index, Err(error)),
            (Lookup::Miss, ticket) => Pulled::Miss(task, index, ticket),
        }
    }

    /// Pulls up to `batch` tasks from the input with their keys, and has the lines their
    /// lookups will read fetched meanwhile (their cache misses then overlap).
    fn fill(&mut self) {
        if self.exhausted {
            return;
        }
        let mut keys = std::mem::take(&mut self.batch_keys);
        keys.clear();
        while self.queue.len() < self.batch.max(1) {
            let Some(task) = self.tasks.next() else {
                self.exhausted = true;
                break;
            };
            let index = self.next_index;
            self.next_index += 1;
            let key = self.function.key_of(task.args(), &mut self.scratch, index);
            if let Ok(key) = &key {
                keys.push(*key);
            }
            self.queue.push_back((task, index, key));
        }
        if self.batch > 1 && !keys.is_empty() {
            self.memory.prefetch(&self.function, &keys);
        }
        self.batch_keys = keys;
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
    fn next_from_inner(
        &mut self,
        source: &Rc<RefCell<Source<I, T>>>,
    ) -> Option<(usize, Result<T::Output, Error>)> {
        loop {
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
                continue;
            };
            s.outstanding = s.outstanding.saturating_sub(1);
            let result = match result {
                Ok(value) => {
                    s.memory.store(&s.function, key, Ok(&value));
                    Ok(value)
                }
                Err(error) => {
                    let error = error.with_task_index(index);
                    s.memory
                        .store_failure::<T::Output>(&s.function, key, &error);
                    Err(Error::Task(error))
                }
            };
            return Some((index, result));
        }
    }

    /// The end of the run: what is pending is written, and a failure to write is the last
    /// item.
    fn finish(&mut self, index: usize) -> Option<(usize, Result<T::Output, Error>)> {
        self.done = true;
        self.inner = None;
        let memory = self.source.as_ref().map(|s| s.borrow().memory.clone())?;
        match memory.flush() {
            Ok(()) => None,
            Err(error) => Some((index, Err(error))),
        }
    }

    fn next_ordered(
        &mut self,
        source: &Rc<RefCell<Source<I, T>>>,
    ) -> Option<(usize, Result<T::Output, Error>)> {
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
                            // The inner run ended with tasks unanswered (it was stopped):
                            // say so for the first of them rather than wait for ever.
                            let mut s = source.borrow_mut();
                            let index = s.base;
                            s.base += 1;
                            s.slots.pop_front();
                            return Some((
                                index,
                                Err(Error::Task(parjob_core::Error::cancelled(index))),
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
                        let end = s.next_index;
                        drop(s);
                        return self.finish(end);
                    }
                },
            }
        }
    }

    fn next_unordered(
        &mut self,
        source: &Rc<RefCell<Source<I, T>>>,
    ) -> Option<(usize, Result<T::Output, Error>)> {
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
                // The inner run ended with tasks unanswered (it was stopped): each is
                // reported, never waited for.
                let mut s = source.borrow_mut();
                s.outstanding = 0;
                let lost: Vec<usize> = s.handed.drain(..).flatten().map(|(i, _)| i).collect();
                for index in lost {
                    let error = Error::Task(parjob_core::Error::cancelled(index));
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
                    let end = s.next_index;
                    drop(s);
                    return self.finish(end);
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
        if let Some(error) = self.failed.take() {
            self.done = true;
            return Some((0, Err(error)));
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

/// Every result in input order, or the first failure: how `run` is built on [`CachedRun`].
/// On a failure, the run stops (tasks not started are skipped) and what was stored is kept.
pub fn collect<I, T>(mut run: CachedRun<'_, I, T>) -> Result<Vec<T::Output>, Error>
where
    I: Iterator<Item = T>,
    T: Task,
{
    let hint = run.source.as_ref().map_or(0, |s| {
        let mut s = s.borrow_mut();
        // Every task will be pulled: a few at a time cost no laziness `run` promises.
        s.batch = PULL_BATCH;
        let hint = s.tasks.size_hint().0;
        // Every task will be pulled: an empty index can be sized for all of them at once.
        s.memory.reserve(&s.function, hint);
        hint
    });
    let mut out = Vec::new();
    // An input may claim more than memory holds; grow as results come instead.
    let _ = out.try_reserve_exact(hint.min(1 << 24));
    for (_, result) in run.by_ref() {
        out.push(result?);
    }
    Ok(out)
}
