//! The iterators `run_iter` and `run_unordered` return.

use parjob_core::{Error, Task};

enum State<R, E> {
    Running(R),
    Failed(Option<E>),
}

/// Results in input order, as soon as each is ready: made by
/// [`Parallel::run_iter`](crate::Parallel::run_iter).
pub struct RunIter<I, T: Task> {
    state: State<parjob_core::RunIter<I, T>, Error>,
}

impl<I, T: Task> RunIter<I, T> {
    pub(crate) fn started(inner: parjob_core::RunIter<I, T>) -> Self {
        RunIter {
            state: State::Running(inner),
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        RunIter {
            state: State::Failed(Some(error)),
        }
    }
}

impl<I, T> Iterator for RunIter<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    type Item = Result<T::Output, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.state {
            State::Running(inner) => inner.next(),
            State::Failed(error) => error.take().map(Err),
        }
    }
}

/// `(input index, result)` pairs in completion order: made by
/// [`Parallel::run_unordered`](crate::Parallel::run_unordered).
pub struct RunUnordered<I, T: Task> {
    state: State<parjob_core::RunUnordered<I, T>, Error>,
}

impl<I, T: Task> RunUnordered<I, T> {
    pub(crate) fn started(inner: parjob_core::RunUnordered<I, T>) -> Self {
        RunUnordered {
            state: State::Running(inner),
        }
    }

    pub(crate) fn failed(error: Error) -> Self {
        RunUnordered {
            state: State::Failed(Some(error)),
        }
    }
}

impl<I, T> Iterator for RunUnordered<I, T>
where
    I: Iterator<Item = T>,
    T: Task,
{
    type Item = (usize, Result<T::Output, Error>);

    fn next(&mut self) -> Option<Self::Item> {
        match &mut self.state {
            State::Running(inner) => inner.next(),
            State::Failed(error) => error.take().map(|e| (0, Err(e))),
        }
    }
}
