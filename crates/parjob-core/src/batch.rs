//! Batches: consecutive tasks that travel and run together, seen by backends only through the
//! type-erased [`ErasedBatch`].
//!
//! A backend either runs a batch on one of its threads ([`ErasedBatch::run_here`]) or sends it
//! elsewhere: [`ErasedBatch::encode_tasks`] writes a frame, the other side hands it to the
//! batch's [`RemoteEntry`], and [`ErasedBatch::decode_outcomes`] takes the answer back. Either
//! way every task ends with exactly one outcome, pushed in input order; the dispatcher, which
//! knows the types, takes them out.
//!
//! Frames are sequences of records `[tag: u8][len: u32 LE][len bytes]`; on the way out the tag
//! says whether the arguments could be encoded, on the way back whether the call returned,
//! panicked, or returned a value that could not be encoded. A panic's record says where it
//! happened: `[worker: u32 LE][pid: u32 LE][message]` (`u32::MAX` for not known).

use std::any::{Any, type_name};
use std::ops::Range;

use crate::codec;
use crate::worker::{catch_task, drop_quietly, panic_place};
use crate::{Error, RunControl, Task};

const TAG_OK: u8 = 0;
const TAG_PANICKED: u8 = 1;
const TAG_NOT_ENCODED: u8 = 2;

/// The most tasks run between two looks at the cancel flag.
const MAX_CHUNK: usize = 4096;

/// The function a worker process calls to run one encoded batch of one task type.
///
/// `frame` holds the tasks written by [`ErasedBatch::encode_tasks`]; the outcomes are appended
/// to `out` for [`ErasedBatch::decode_outcomes`]; `on_start(i)` is called before the `i`-th
/// task of the frame starts, so that a watchdog can tell which task hung or crashed.
pub type RemoteEntry = fn(frame: &[u8], out: &mut Vec<u8>, on_start: &mut dyn FnMut(usize));

/// Keeps [`ErasedBatch`] implemented by this crate's batches alone, and holds what only the
/// dispatcher may do with one.
pub(crate) mod sealed {
    /// Implemented by `TypedBatch` only; not nameable outside this crate.
    pub trait Sealed {
        /// Gives the batch to the dispatcher, which knows its concrete type.
        fn into_any(self: Box<Self>) -> Box<dyn std::any::Any + Send>;
    }
}

/// A batch of tasks of one (erased) type, with the outcomes gathered so far: what a
/// [`Pool`](crate::Pool) sees of a [`Job`](crate::Job)'s tasks.
///
/// Sealed: only the dispatcher makes batches, so a pool cannot hand back a batch of its own
/// making. A batch never holds more outcomes than tasks: outcomes past the last task are
/// dropped (and counted as not read by [`decode_outcomes`](ErasedBatch::decode_outcomes)).
pub trait ErasedBatch: Send + sealed::Sealed {
    /// Input position of the first task.
    fn first_index(&self) -> usize;
    /// Number of tasks.
    fn len(&self) -> usize;
    /// Whether the batch has no tasks.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Number of outcomes gathered so far.
    fn outcomes_len(&self) -> usize;
    /// Runs the not yet run tasks on this thread, one after another, catching panics. Stops
    /// early (leaving tasks without outcome) once `control` is cancelled.
    fn run_here(&mut self, control: &RunControl);
    /// The entry a worker process calls for this batch's task type.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when the task's function is not a plain `fn` item (a closure,
    /// even one that captures nothing, or a function pointer), which another process could
    /// not call.
    fn remote_entry(&self) -> Result<RemoteEntry, Error>;
    /// The task function's type name, e.g. `my_crate::square`, for errors about it.
    fn function_name(&self) -> &'static str;
    /// Appends the frame of tasks `range` (positions within the batch) to `out`.
    fn encode_tasks(&self, range: Range<usize>, out: &mut Vec<u8>);
    /// Decodes the outcomes a remote entry wrote, appending them in order, up to the batch's
    /// last task. Returns how many outcomes it took; a malformed record ends the reading.
    fn decode_outcomes(&mut self, bytes: &[u8]) -> usize;
    /// Records `error` as the outcome of the next task without one (nothing if every task
    /// has one).
    fn push_failure(&mut self, error: Error);
    /// Number of failures among the outcomes gathered so far.
    fn failures_len(&self) -> usize;
}

/// The concrete batch the dispatcher makes.
///
/// Outcomes are kept as the values that came back plus the failures with their positions, so
/// that a batch without failures is already the output chunk (no per-task `Result` to unwrap,
/// which would multiply the memory traffic of tiny tasks by the size of `Error`).
pub(crate) struct TypedBatch<T: Task> {
    pub(crate) first_index: usize,
    len: usize,
    tasks: Vec<T>,
    pub(crate) values: Vec<T::Output>,
    /// Position within the batch and error, in increasing position.
    pub(crate) failures: Vec<(usize, Error)>,
    /// Where `run_here` writes values instead of `values`: this batch's slice of the run's
    /// output buffer, whose first `written` slots are initialised.
    pub(crate) destination: Option<Destination<T::Output>>,
    pub(crate) written: usize,
}

/// Stores `count` into `target` when dropped, also during unwinding.
struct WriteBack<'a> {
    count: usize,
    target: &'a mut usize,
}

impl Drop for WriteBack<'_> {
    fn drop(&mut self) {
        *self.target = self.count;
    }
}

/// The start of a batch's slice of a run's output buffer, which the batch fills in place so
/// that `run` need not copy the results into one vector at the end.
pub(crate) struct Destination<R>(std::ptr::NonNull<R>);

// SAFETY: a destination is the exclusive right to write one batch's disjoint slice of the
// output buffer; values of type `R: Send` may be written to it from another thread.
unsafe impl<R: Send> Send for Destination<R> {}

impl<R> Destination<R> {
    /// # Safety
    /// `start` must point at room for the batch's values that nothing else reads or writes
    /// until the batch comes back to the dispatcher, and that outlives the batch.
    pub(crate) unsafe fn new(start: std::ptr::NonNull<R>) -> Self {
        Destination(start)
    }
}

impl<T: Task> TypedBatch<T> {
    pub(crate) fn new(first_index: usize, tasks: Vec<T>) -> Self {
        TypedBatch {
            first_index,
            len: tasks.len(),
            values: Vec::with_capacity(tasks.len()),
            failures: Vec::new(),
            tasks,
            destination: None,
            written: 0,
        }
    }

    /// Like `new`, but `run_here` writes the values to `destination`.
    pub(crate) fn with_destination(
        first_index: usize,
        tasks: Vec<T>,
        destination: Destination<T::Output>,
    ) -> Self {
        TypedBatch {
            destination: Some(destination),
            values: Vec::new(),
            ..TypedBatch::new(first_index, tasks)
        }
    }

    fn done(&self) -> usize {
        self.written + self.values.len() + self.failures.len()
    }

    fn next_index(&self) -> usize {
        self.first_index + self.done()
    }

    /// `run_here` for a batch with a destination: values go straight to the output buffer.
    /// Only `run` uses destinations, and it stops at the first failure, so the batch stops at
    /// its first panic too.
    fn run_in_place(&mut self, control: &RunControl) {
        let Some(destination) = &self.destination else {
            return;
        };
        let start = destination.0;
        let mut buffer = self.pending_tasks();
        let mut tasks = buffer.drain(..);
        // The count lives in a local guard rather than in `self`, so that the compiler can
        // keep it in a register (a raw-pointer write could alias a field), and is stored back
        // even when a task panics, so the panicking task's position is known.
        let mut written = WriteBack {
            count: self.written,
            target: &mut self.written,
        };
        let mut chunk = 1;
        let finished = catch_task(|| {
            while tasks.len() > 0 {
                if control.is_cancelled() {
                    return;
                }
                for task in tasks.by_ref().take(chunk) {
                    let value = task.call();
                    // SAFETY: `count < len`: every write follows taking one of the
                    // `len - count` tasks left. `Destination::new`'s contract gives this
                    // batch `len` writable slots from `start`.
                    unsafe { start.add(written.count).write(value) };
                    written.count += 1;
                }
                chunk = (chunk * 2).min(MAX_CHUNK);
            }
        });
        drop(written);
        // Tasks left by a cancel are dropped here; a panic in their `Drop` must not escape.
        drop_quietly(tasks);
        self.tasks = buffer;
        if let Err(message) = finished {
            let index = self.next_index();
            let (worker, pid) = panic_place();
            self.push_outcome(Err(Error::task_panicked_on(index, message, worker, pid)));
            control.task_failed();
        }
    }

    /// Takes the tasks still to run, dropping those that already have an outcome. The
    /// buffer goes back into `self.tasks` empty once they ran, so that the dispatcher can
    /// fill it again: reusing it saves faulting in fresh pages for every batch.
    fn pending_tasks(&mut self) -> Vec<T> {
        let mut buffer = std::mem::take(&mut self.tasks);
        let done = self.done().min(buffer.len());
        buffer.drain(..done);
        buffer
    }

    /// The task buffer, emptied, for the next batch.
    pub(crate) fn take_buffer(&mut self) -> Vec<T> {
        let mut buffer = std::mem::take(&mut self.tasks);
        buffer.clear();
        buffer
    }

    /// Records the next task's outcome. Returns `false`, recording nothing, when every task
    /// already has one.
    fn push_outcome(&mut self, outcome: Result<T::Output, Error>) -> bool {
        if self.done() >= self.len {
            return false;
        }
        match outcome {
            Ok(value) => self.values.push(value),
            Err(error) => self.failures.push((self.done(), error)),
        }
        true
    }
}

impl<T: Task> ErasedBatch for TypedBatch<T> {
    fn first_index(&self) -> usize {
        self.first_index
    }

    fn len(&self) -> usize {
        self.len
    }

    fn outcomes_len(&self) -> usize {
        self.done()
    }

    fn run_here(&mut self, control: &RunControl) {
        // In place only while every outcome so far was written there: a value or failure a
        // pool recorded otherwise (decoded from elsewhere) must keep its position before the
        // values that follow it.
        if self.destination.is_some() && self.values.is_empty() && self.failures.is_empty() {
            self.run_in_place(control);
            return;
        }
        let mut buffer = self.pending_tasks();
        let mut tasks = buffer.drain(..);
        // Tasks run in chunks that double from 1 to `MAX_CHUNK`: the cancel flag is checked
        // between chunks, so a cancelled batch stops within about the time it has run so
        // far, while tiny tasks run in long `extend` loops the compiler can vectorise.
        let mut chunk = 1;
        loop {
            let values = &mut self.values;
            // One catch_unwind per batch keeps the loop tight. If a task panics, `extend`
            // leaves `values` holding every value written before it, so the panicking task's
            // position is known, and the loop resumes with the next task.
            let finished = catch_task(|| {
                while tasks.len() > 0 {
                    if control.is_cancelled() {
                        return;
                    }
                    values.extend(tasks.by_ref().take(chunk).map(Task::call));
                    chunk = (chunk * 2).min(MAX_CHUNK);
                }
            });
            match finished {
                Ok(()) => break,
                Err(message) => {
                    let index = self.next_index();
                    let (worker, pid) = panic_place();
                    self.push_outcome(Err(Error::task_panicked_on(index, message, worker, pid)));
                    // `run` ends at this failure: the loop then stops at its cancel check.
                    control.task_failed();
                }
            }
        }
        // Tasks left by a cancel are dropped here; a panic in their `Drop` must not escape.
        drop_quietly(tasks);
        self.tasks = buffer;
    }

    fn remote_entry(&self) -> Result<RemoteEntry, Error> {
        remote_callable::<T::Func>()?;
        Ok(remote_entry::<T>)
    }

    fn function_name(&self) -> &'static str {
        type_name::<T::Func>()
    }

    fn encode_tasks(&self, range: Range<usize>, out: &mut Vec<u8>) {
        for task in &self.tasks[range] {
            write_record(out, b"", |buf, start| {
                match codec::encode_into(task.args(), buf) {
                    Ok(()) => TAG_OK,
                    Err(message) => {
                        buf.truncate(start);
                        buf.extend_from_slice(message.as_bytes());
                        TAG_NOT_ENCODED
                    }
                }
            });
        }
    }

    fn decode_outcomes(&mut self, mut bytes: &[u8]) -> usize {
        // The hot loop of a process backend's driver for tiny tasks: the room left is counted
        // once, and a value goes straight to `values` (`push_outcome` would check again).
        let room = self.len - self.done().min(self.len);
        let mut taken = 0;
        while taken < room {
            let Some((tag, payload, rest)) = read_record(bytes) else {
                break;
            };
            bytes = rest;
            taken += 1;
            if tag == TAG_OK
                && let Ok((value, _)) = codec::decode_prefix::<T::Output>(payload)
            {
                self.values.push(value);
                continue;
            }
            let index = self.next_index();
            let error = match tag {
                TAG_OK => Error::Codec {
                    index,
                    action: "decode",
                    type_name: type_name::<T::Output>(),
                    message: codec::decode_prefix::<T::Output>(payload)
                        .err()
                        .unwrap_or_default(),
                },
                TAG_PANICKED => panic_from_record(index, payload),
                _ => codec_failure::<T>(index, payload),
            };
            self.push_outcome(Err(error));
        }
        taken
    }

    fn push_failure(&mut self, error: Error) {
        self.push_outcome(Err(error));
    }

    fn failures_len(&self) -> usize {
        self.failures.len()
    }
}

impl<T: Task> sealed::Sealed for TypedBatch<T> {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

/// Whether a worker process may call a function of type `F` without receiving it: only a
/// `fn` item, whose one value exists in every process running the program.
///
/// A function pointer is a value (an address) that is not sent. A closure is refused even if
/// it captures nothing: a closure capturing only zero-sized values is zero-sized too, and the
/// worker would have to conjure those values, which may stand for something done in the
/// driver process (a token proving a library was initialised there), so conjuring it is not
/// sound. Closures are told apart by their type name, which rustc writes as
/// `path::{{closure}}`; a unit test pins that, so a compiler that changed it fails CI rather
/// than let closures through.
pub(crate) fn remote_callable<F>() -> Result<(), Error> {
    let name = type_name::<F>();
    if std::mem::size_of::<F>() != 0 {
        return Err(Error::InvalidConfig(format!(
            "the task function `{name}` cannot run in another process: it is a function \
             pointer or a closure that captures data; use a plain `fn` item \
             (`fn task(x: u64) -> u64 {{ .. }}`) and pass the data as arguments"
        )));
    }
    if name.contains("{{closure}}") {
        return Err(Error::InvalidConfig(format!(
            "the task function `{name}` cannot run in another process: it is a closure, and a \
             worker can only call a plain `fn` item, found in its own copy of the program; \
             write the closure's body as a `fn` item (closures work on threads)"
        )));
    }
    Ok(())
}

/// Turns a `TAG_NOT_ENCODED` record (`"<side>:<type>:<message>"`) back into an error.
fn codec_failure<T: Task>(index: usize, payload: &[u8]) -> Error {
    let text = String::from_utf8_lossy(payload);
    let (action, type_name, message) = match text.split_once('\u{0}') {
        Some(("result", message)) => ("encode", type_name::<T::Output>(), message),
        Some(("decode", message)) => ("decode", type_name::<T::Args>(), message),
        _ => ("encode", type_name::<T::Args>(), text.as_ref()),
    };
    Error::Codec {
        index,
        action,
        type_name,
        message: message.to_string(),
    }
}

/// Runs one frame of `T` tasks in a worker process: see [`RemoteEntry`].
fn remote_entry<T: Task>(mut frame: &[u8], out: &mut Vec<u8>, on_start: &mut dyn FnMut(usize)) {
    let mut position = 0;
    while let Some((tag, payload, rest)) = read_record(frame) {
        frame = rest;
        on_start(position);
        position += 1;
        if tag != TAG_OK {
            // The driver could not encode these arguments; pass its message back.
            write_record(out, b"", |buf, _| {
                buf.extend_from_slice(payload);
                TAG_NOT_ENCODED
            });
            continue;
        }
        // SAFETY: what is conjured is a value of `T::Func`. `Task` is sealed, so `T` is a
        // `Delayed<F, ..>` with `F: TaskFn`, which on stable Rust only `fn` items, closures and
        // function pointers implement (the `Fn` traits cannot be implemented by hand). This
        // function is handed out only by `TypedBatch::remote_entry`, after
        // `remote_callable::<F>` refused function pointers (not zero-sized) and closures: `F`
        // is a `fn` item type. Such a type has exactly one value, which any code of the
        // program may create by naming the function and which holds no bytes; `zeroed` gives
        // that value (the empty bit pattern), exactly what naming the function here would.
        let func: T::Func = unsafe { std::mem::zeroed() };
        write_record(out, b"result\0", |buf, start| {
            // Decoding the arguments, the call, and encoding the result all run user code
            // (`Deserialize`, the task, `Serialize`) that may panic: one catch for the three,
            // with the step it reached, keeps tiny tasks at one catch each.
            // A `Cell`: the step is read after a panic unwound out of the closure.
            let step = std::cell::Cell::new(Step::Decode);
            let caught = catch_task(|| {
                let args = match codec::decode_prefix::<T::Args>(payload) {
                    Ok((args, _)) => args,
                    Err(message) => return Err(message),
                };
                step.set(Step::Call);
                let value = T::call_with(func, args);
                step.set(Step::Encode);
                codec::encode_into(&value, buf)
            });
            let (side, message) = match (caught, step.get()) {
                (Ok(Ok(())), _) => return TAG_OK,
                (Ok(Err(message)), Step::Decode) => ("decode\0", message),
                (Ok(Err(message)), _) => ("result\0", message),
                (Err(panic), Step::Call) => {
                    buf.truncate(start);
                    write_panic(buf, &panic);
                    return TAG_PANICKED;
                }
                (Err(panic), Step::Decode) => (
                    "decode\0",
                    format!("its Deserialize impl panicked: {panic}"),
                ),
                (Err(panic), Step::Encode) => (
                    "result\0",
                    format!("its Serialize impl panicked (or the value's Drop did): {panic}"),
                ),
            };
            buf.truncate(start);
            buf.extend_from_slice(side.as_bytes());
            buf.extend_from_slice(message.as_bytes());
            TAG_NOT_ENCODED
        });
    }
}

/// Appends a panic record's payload: where the task ran ([`panic_place`]), then `message`.
fn write_panic(buf: &mut Vec<u8>, message: &str) {
    let (worker, pid) = panic_place();
    let worker = worker.map_or(u32::MAX, |w| u32::try_from(w).unwrap_or(u32::MAX - 1));
    buf.extend_from_slice(&worker.to_le_bytes());
    buf.extend_from_slice(&pid.unwrap_or(u32::MAX).to_le_bytes());
    buf.extend_from_slice(message.as_bytes());
}

/// The [`Error::TaskPanicked`] of task `index` whose panic record (tag 1 of a frame of
/// outcomes a [`RemoteEntry`] wrote) had `payload`: for a backend that reads records itself
/// rather than through [`ErasedBatch::decode_outcomes`].
pub fn panic_from_record(index: usize, payload: &[u8]) -> Error {
    let known = |bytes: &[u8]| {
        let value = u32::from_le_bytes(bytes.try_into().ok()?);
        (value != u32::MAX).then_some(value)
    };
    match (payload.get(..4), payload.get(4..8), payload.get(8..)) {
        (Some(worker), Some(pid), Some(message)) => Error::task_panicked_on(
            index,
            String::from_utf8_lossy(message),
            known(worker).map(|w| w as usize),
            known(pid),
        ),
        _ => Error::task_panicked(index, String::from_utf8_lossy(payload)),
    }
}

/// How far a task in a worker got: what a panic or an error is about.
#[derive(Clone, Copy)]
enum Step {
    Decode,
    Call,
    Encode,
}

/// Appends one record. `fill(out, start)` appends the payload (which begins at `start`; it may
/// truncate back to `start` to start over) and returns the tag. A payload too long for the
/// record's `u32` length becomes a `TAG_NOT_ENCODED` record saying so, `side` first (`b""` for
/// arguments, `b"result\0"` for a result).
fn write_record(out: &mut Vec<u8>, side: &[u8], fill: impl FnOnce(&mut Vec<u8>, usize) -> u8) {
    write_record_within(out, side, codec::MAX_VALUE_BYTES, fill);
}

fn write_record_within(
    out: &mut Vec<u8>,
    side: &[u8],
    max_payload: usize,
    fill: impl FnOnce(&mut Vec<u8>, usize) -> u8,
) {
    let header_at = out.len();
    out.extend_from_slice(&[0; 5]);
    let start = out.len();
    let mut tag = fill(out, start);
    let payload = out.len() - start;
    if payload > max_payload {
        out.truncate(start);
        out.extend_from_slice(side);
        out.extend_from_slice(
            format!("encoded to {payload} bytes, more than one value may take ({max_payload})")
                .as_bytes(),
        );
        tag = TAG_NOT_ENCODED;
    }
    let len = u32::try_from(out.len() - start).expect("payloads are held to max_payload");
    out[header_at] = tag;
    out[header_at + 1..start].copy_from_slice(&len.to_le_bytes());
}

pub(crate) fn read_record(bytes: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = bytes.split_first()?;
    let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    let payload = rest.get(4..4 + len)?;
    Some((tag, payload, &rest[4 + len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_payload_over_the_record_limit_becomes_an_error_record_not_a_wrong_length() {
        let mut out = Vec::new();
        write_record_within(&mut out, b"result\0", 8, |buf, _| {
            buf.extend_from_slice(&[7; 20]);
            TAG_OK
        });
        let (tag, payload, rest) = read_record(&out).unwrap();
        assert_eq!(tag, TAG_NOT_ENCODED);
        assert!(rest.is_empty());
        let text = String::from_utf8_lossy(payload);
        assert!(text.starts_with("result\0encoded to 20 bytes"), "{text}");
    }

    fn plain(x: u64) -> u64 {
        x
    }

    #[test]
    fn only_fn_items_are_called_in_another_process() {
        fn name_of<F>(_: &F) -> &'static str {
            type_name::<F>()
        }
        assert!(remote_callable::<fn(u64) -> u64>().is_err());
        let token = std::marker::PhantomData::<u8>;
        let zero_sized_capture = move |x: u64| {
            let _ = token;
            x
        };
        assert_eq!(size_of_val(&zero_sized_capture), 0);
        let no_capture = |x: u64| x;
        // The check relies on how rustc names closure types: pinned here.
        assert!(
            name_of(&no_capture).contains("{{closure}}"),
            "{}",
            name_of(&no_capture)
        );
        fn check<F>(_: &F) -> Result<(), Error> {
            remote_callable::<F>()
        }
        let err = check(&zero_sized_capture).unwrap_err().to_string();
        assert!(err.contains("is a closure"), "{err}");
        assert!(check(&no_capture).is_err());
        assert_eq!(check(&plain), Ok(()));
    }

    #[test]
    fn records_that_claim_more_than_is_there_are_not_read() {
        assert_eq!(read_record(&[TAG_OK, 9, 0, 0, 0, 1, 2]), None);
        assert_eq!(read_record(&[TAG_OK, 255, 255, 255, 255]), None);
        assert_eq!(read_record(&[TAG_OK, 1, 0]), None);
        assert_eq!(read_record(&[]), None);
    }
}
