//! Tasks: a function and its arguments, captured by [`delayed`] and called later, anywhere.

use std::marker::PhantomData;

use serde::Serialize;
use serde::de::DeserializeOwned;

/// Marker for a function of one parameter that receives the whole argument value.
#[derive(Debug)]
pub enum Whole {}

/// Marker for a function of `N` parameters that receives a tuple spread over them.
#[derive(Debug)]
pub enum Spread<const N: usize> {}

/// A function that [`delayed`] can call with `Args`.
///
/// Implemented for every `Fn` of 0 to 8 parameters that is `Copy + Send + Sync + 'static`
/// (plain `fn` items, closures that capture `Copy` data, function pointers; only `fn` items
/// run in worker processes): a one-parameter function takes its argument
/// whole (`delayed(square, 3)`), a function of `N` parameters takes an `N`-tuple spread over
/// them (`delayed(add, (1, 2))`). `Marker` only tells the two apart; it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be called by `delayed` with `{Args}`",
    label = "not a function of these arguments that `delayed` can call",
    note = "`delayed(f, x)` calls `f(x)`, `delayed(f, (a, b))` calls `f(a, b)` (up to 8 \
            parameters), `delayed(f, ())` calls `f()`; `f` is a `fn` item, or a closure that \
            captures only `Copy` values (`Copy + Send + Sync + 'static`)",
    note = "to capture borrowed or non-`Copy` data, use a closure task with \
            `Parallel::run_local` (`move || f(&data)`) on threads"
)]
pub trait TaskFn<Args, Marker>: Copy + Send + Sync + 'static {
    /// What the function returns.
    type Output;
    /// Calls the function with `args`.
    fn call_with(self, args: Args) -> Self::Output;
}

impl<F, A, R> TaskFn<A, Whole> for F
where
    F: Fn(A) -> R + Copy + Send + Sync + 'static,
{
    type Output = R;
    #[inline]
    fn call_with(self, args: A) -> R {
        self(args)
    }
}

macro_rules! spread_impl {
    ($n:literal; $($arg:ident),*) => {
        impl<F, R, $($arg),*> TaskFn<($($arg,)*), Spread<$n>> for F
        where
            F: Fn($($arg),*) -> R + Copy + Send + Sync + 'static,
        {
            type Output = R;
            #[inline]
            #[allow(non_snake_case, clippy::unused_unit)]
            fn call_with(self, args: ($($arg,)*)) -> R {
                let ($($arg,)*) = args;
                self($($arg),*)
            }
        }
    };
}

spread_impl!(0;);
spread_impl!(1; A1);
spread_impl!(2; A1, A2);
spread_impl!(3; A1, A2, A3);
spread_impl!(4; A1, A2, A3, A4);
spread_impl!(5; A1, A2, A3, A4, A5);
spread_impl!(6; A1, A2, A3, A4, A5, A6);
spread_impl!(7; A1, A2, A3, A4, A5, A6, A7);
spread_impl!(8; A1, A2, A3, A4, A5, A6, A7, A8);

/// Keeps [`Task`] implemented by [`Delayed`] alone.
mod sealed {
    pub trait Sealed {}
}

/// One call waiting to happen: what `Parallel::run` and friends consume.
///
/// Every backend can run a `Task`: its arguments and output are `serde` types so that the
/// process backend can send them to another process.
///
/// Sealed: [`delayed`] makes every task. That is what lets a worker process call the function
/// without receiving it: its type is one [`TaskFn`] accepts (a `fn` item, a closure, or a
/// function pointer), and only the zero-sized ones run in another process.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a parjob task: make one with `delayed(f, args)`, whose arguments \
               and result are owned serde types",
    label = "`run`, `run_iter`, `run_unordered` and `submit` need owned, serde arguments and result",
    note = "a task's arguments and result are `Serialize + DeserializeOwned + Send + 'static`, so \
            that every backend, worker processes included, can run it",
    note = "to pass borrowed data (`&[T]`, `&str`) or return a value that is not serde \
            (`Box<dyn Error>`, `Arc<T>`), use `Parallel::run_local` on threads; or own the data \
            (`chunk.to_vec()`), or share a big array as a `parjob::SharedSlice`"
)]
pub trait Task: Send + 'static + sealed::Sealed {
    /// The function type: a `fn` item for the process backend; any `Copy` function for the
    /// others.
    type Func: Copy + Send + Sync + 'static;
    /// The argument value as given to [`delayed`].
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// What the call returns.
    type Output: Serialize + DeserializeOwned + Send + 'static;

    /// Calls the function on the arguments.
    fn call(self) -> Self::Output;
    /// The arguments, for encoding.
    fn args(&self) -> &Self::Args;
    /// Calls `func` on `args`: how a worker process runs a decoded task.
    fn call_with(func: Self::Func, args: Self::Args) -> Self::Output;

    /// The task's own time limit ([`Delayed::timeout`]), which replaces the run's.
    #[doc(hidden)]
    fn own_timeout(&self) -> Option<std::time::Duration> {
        None
    }

    /// Whether tasks of this type may carry a time limit of their own: then each runs in a
    /// batch of its own, under its limit.
    #[doc(hidden)]
    const HAS_OWN_TIMEOUT: bool = false;

    /// A copy of the task for a retry, made through the codec (arguments need not be
    /// `Clone`); `None` if the arguments cannot be encoded and decoded back.
    #[doc(hidden)]
    fn copy_for_retry(&self) -> Option<Self>
    where
        Self: Sized;
}

/// A function and its arguments, made by [`delayed`].
pub struct Delayed<F, A, M> {
    func: F,
    args: A,
    marker: PhantomData<fn() -> M>,
}

impl<F: Copy, A: Clone, M> Clone for Delayed<F, A, M> {
    fn clone(&self) -> Self {
        Delayed {
            func: self.func,
            args: self.args.clone(),
            marker: PhantomData,
        }
    }
}

impl<F, A: std::fmt::Debug, M> std::fmt::Debug for Delayed<F, A, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delayed")
            .field("func", &std::any::type_name::<F>())
            .field("args", &self.args)
            .finish()
    }
}

/// Captures a call of `func` on `args` to run later, joblib's `delayed(f)(x)`.
///
/// A one-parameter function takes `args` whole; a function of several parameters takes a
/// tuple spread over them; a function of none takes `()`.
///
/// ```
/// use parjob::{delayed, Parallel, Task};
///
/// fn square(x: u64) -> u64 { x * x }
/// fn add(a: i32, b: i32) -> i32 { a + b }
/// fn answer() -> u8 { 42 }
///
/// assert_eq!(delayed(square, 3).call(), 9); // `call` runs it here and now
/// assert_eq!(delayed(add, (1, 2)).call(), 3);
/// assert_eq!(delayed(answer, ()).call(), 42);
/// let squares = Parallel::new(2).run((0..4u64).map(|i| delayed(square, i)))?;
/// assert_eq!(squares, [0, 1, 4, 9]);
/// # Ok::<(), parjob::Error>(())
/// ```
///
/// # Reading the signature
///
/// `F: TaskFn<A, M>` says "`func` can be called with `args`". [`TaskFn`] is implemented for
/// every `Fn` of 0 to 8 parameters that is `Copy + Send + Sync + 'static`: a `fn` item, a
/// closure that captures only `Copy` values, a function pointer. `M` is a marker the compiler
/// infers and you never write: [`Whole`] when `func` takes `args` as its one parameter,
/// [`Spread<N>`](Spread) when `func` takes `N` parameters and `args` is an `N`-tuple. It
/// exists only so that both forms can be implemented without overlapping (a one-parameter
/// function of a tuple would otherwise match both). When the call does not fit, the compiler
/// says "cannot be called by `delayed` with ..." and lists the forms.
///
/// The result, [`Delayed<F, A, M>`](Delayed), is a [`Task`] when `A` and the function's
/// output are owned `serde` types. To name it in a signature of your own, write
/// `impl Task<Output = R>`:
///
/// ```
/// use parjob::{delayed, Parallel, Task};
///
/// fn square(x: u64) -> u64 { x * x }
/// fn squares(n: u64) -> impl Iterator<Item = impl Task<Output = u64>> {
///     (0..n).map(|i| delayed(square, i))
/// }
/// assert_eq!(Parallel::new(2).run(squares(3))?, [0, 1, 4]);
/// # Ok::<(), parjob::Error>(())
/// ```
///
/// Borrowed arguments (`&[T]`, `&str`) and results that are not `serde` types are not a
/// `Task`; run such calls with `Parallel::run_local` on threads.
///
/// # In worker processes
///
/// The process backend does not send the function: a worker calls the same function in its
/// own copy of the program. So there `func` must be a plain `fn` item (`square`,
/// `Self::method`, `parse::<u32>`); a closure or a function pointer (`square as fn(u64) -> u64`)
/// is refused with [`Error::InvalidConfig`](crate::Error) naming its type. Closures are
/// refused even when they capture nothing, because a closure capturing only zero-sized
/// values looks the same, and the worker would have to conjure those values. Closures work on
/// the threading and sequential backends.
pub fn delayed<F, A, M>(func: F, args: A) -> Delayed<F, A, M>
where
    F: TaskFn<A, M>,
{
    Delayed {
        func,
        args,
        marker: PhantomData,
    }
}

impl<F, A, M> Delayed<F, A, M> {
    /// Calls the function on the arguments, whatever their types (`run_local`).
    #[inline]
    pub(crate) fn call_local(self) -> F::Output
    where
        F: TaskFn<A, M>,
    {
        self.func.call_with(self.args)
    }
}

impl<F, A, M> sealed::Sealed for Delayed<F, A, M> {}

impl<F, A, M> Task for Delayed<F, A, M>
where
    F: TaskFn<A, M>,
    A: Serialize + DeserializeOwned + Send + 'static,
    F::Output: Serialize + DeserializeOwned + Send + 'static,
    M: 'static,
{
    type Func = F;
    type Args = A;
    type Output = F::Output;

    #[inline]
    fn call(self) -> F::Output {
        self.func.call_with(self.args)
    }

    fn args(&self) -> &A {
        &self.args
    }

    #[inline]
    fn call_with(func: F, args: A) -> F::Output {
        func.call_with(args)
    }

    fn copy_for_retry(&self) -> Option<Self> {
        let mut bytes = Vec::new();
        crate::codec::encode_into(&self.args, &mut bytes).ok()?;
        let (args, _) = crate::codec::decode_prefix::<A>(&bytes).ok()?;
        Some(Delayed {
            func: self.func,
            args,
            marker: PhantomData,
        })
    }
}

impl<F, A, M> Delayed<F, A, M> {
    /// This task with a time limit of its own, which replaces the `Parallel`'s `.timeout` for
    /// it: a task over it fails with [`Error::Timeout`](crate::Error::Timeout) (and, with
    /// retries, is retried). Tasks with a limit of their own run one per batch. Mix tasks with
    /// and without one through [`Timed::new`] with an `Option`.
    ///
    /// ```
    /// use std::time::Duration;
    /// use parjob::{delayed, Parallel};
    ///
    /// fn nap(ms: u64) -> u64 { std::thread::sleep(Duration::from_millis(ms)); ms }
    /// let out = Parallel::new(2).run_results([1, 5_000, 2].map(|ms| {
    ///     delayed(nap, ms).timeout(Duration::from_millis(200))
    /// }))?;
    /// assert_eq!(out[0], Ok(1));
    /// assert!(matches!(out[1], Err(parjob::Error::Timeout { index: 1, .. })));
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn timeout(self, limit: std::time::Duration) -> Timed<Self> {
        Timed {
            task: self,
            limit: Some(limit),
        }
    }
}

/// A task with a time limit of its own, made by [`Delayed::timeout`] or [`Timed::new`].
#[derive(Debug, Clone)]
pub struct Timed<T> {
    task: T,
    limit: Option<std::time::Duration>,
}

impl<T: Task> Timed<T> {
    /// `task` with the limit `limit`, or the run's `.timeout` when `None`: lets one iterator
    /// mix tasks with and without a limit of their own.
    ///
    /// ```
    /// use std::time::Duration;
    /// use parjob::{delayed, Timed};
    ///
    /// fn square(x: u64) -> u64 { x * x }
    /// let tasks = (0..4u64).map(|i| {
    ///     let limit = (i == 3).then(|| Duration::from_secs(60));
    ///     Timed::new(delayed(square, i), limit)
    /// });
    /// assert_eq!(parjob::Parallel::new(2).run(tasks)?, [0, 1, 4, 9]);
    /// # Ok::<(), parjob::Error>(())
    /// ```
    pub fn new(task: T, limit: Option<std::time::Duration>) -> Self {
        Timed { task, limit }
    }
}

impl<T> sealed::Sealed for Timed<T> {}

impl<T: Task> Task for Timed<T> {
    type Func = T::Func;
    type Args = T::Args;
    type Output = T::Output;
    const HAS_OWN_TIMEOUT: bool = true;

    #[inline]
    fn call(self) -> T::Output {
        self.task.call()
    }

    fn args(&self) -> &T::Args {
        self.task.args()
    }

    #[inline]
    fn call_with(func: T::Func, args: T::Args) -> T::Output {
        T::call_with(func, args)
    }

    fn own_timeout(&self) -> Option<std::time::Duration> {
        self.limit
    }

    fn copy_for_retry(&self) -> Option<Self> {
        Some(Timed {
            task: self.task.copy_for_retry()?,
            limit: self.limit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(x: u64) -> u64 {
        x * x
    }
    fn takes_pair(p: (u32, u32)) -> u32 {
        p.0 * p.1
    }
    #[allow(clippy::too_many_arguments)] // the largest arity delayed() spreads
    fn eight(a: u8, b: u8, c: u8, d: u8, e: u8, f: u8, g: u8, h: u8) -> u32 {
        [a, b, c, d, e, f, g, h].iter().map(|&x| u32::from(x)).sum()
    }

    #[test]
    fn one_parameter_takes_the_value_whole() {
        assert_eq!(delayed(square, 12).call(), 144);
        assert_eq!(delayed(takes_pair, (3, 4)).call(), 12);
    }

    #[test]
    fn tuples_spread_over_up_to_eight_parameters() {
        assert_eq!(delayed(eight, (1, 2, 3, 4, 5, 6, 7, 8)).call(), 36);
        assert_eq!(delayed(|a: u8| a + 1, (1,)).call(), 2);
    }

    #[test]
    fn non_capturing_closures_are_tasks() {
        let task = delayed(|s: String, n: usize| s.repeat(n), ("ab".to_string(), 3));
        assert_eq!(task.call(), "ababab");
    }
}
