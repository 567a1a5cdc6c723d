//! Relayed frames: a batch whose tasks arrived already encoded, for a backend that forwards
//! another process's frames to a local pool (the MPI backend's worker ranks hand what rank 0
//! sent to their own process pool).
//!
//! The batch never decodes a task or an outcome: the frame goes to the local pool's workers
//! as it came, and the outcomes they write are kept as records, interleaved with the failures
//! the local pool reports itself (a crashed worker, a timeout), for the relaying backend to
//! send back.

use std::any::Any;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use crate::batch::{RemoteEntry, read_record, sealed};
use crate::pool::{Completion, Job, Reply, RunControl};
use crate::shared::note_shared;
use crate::{ErasedBatch, Error, SharedSegment};

/// What a local pool made of a relayed frame, in task order: each task's outcome record as its
/// remote entry wrote it, or the failure the pool recorded for it. Tasks after the last
/// outcome have none (the pool dropped the job, or the run was cancelled).
#[derive(Debug)]
pub struct RelayedOutcomes {
    /// How long the tasks ran, as the pool measured it.
    pub busy: Duration,
    /// The outcomes of the tasks that have one, in task order: runs of records, and
    /// failures.
    pub outcomes: Vec<Relayed>,
    /// The records the [`Relayed::Records`] entries point into, back to back.
    pub records: Vec<u8>,
    /// How many tasks the frame held.
    pub len: usize,
    /// The local pool's worker that ran the frame, when the pool said ([`Job::ran_on`]).
    pub worker: Option<usize>,
}

/// Outcomes in [`RelayedOutcomes`]: a run of consecutive tasks' records, or one task's
/// failure.
#[derive(Debug)]
pub enum Relayed {
    /// The records (`[tag u8][len u32 LE][payload]` each, back to back) that `count`
    /// consecutive tasks' remote entry wrote: where they are in [`RelayedOutcomes::records`].
    /// One entry for a whole run, not one per task: a relayed frame of tiny tasks holds 10^5
    /// of them, and an entry each cost more than running them.
    Records {
        /// Where the run's records are in [`RelayedOutcomes::records`].
        bytes: Range<usize>,
        /// How many tasks' records the run holds.
        count: usize,
    },
    /// The failure the local pool recorded (its `index` counts from the frame's first index).
    Failed(Error),
}

/// A batch of already encoded tasks (see the module docs).
struct RelayedBatch {
    first_index: usize,
    entry: RemoteEntry,
    frame: Vec<u8>,
    /// Where each task's record is in `frame`.
    tasks: Vec<Range<usize>>,
    outcomes: Vec<Relayed>,
    /// How many tasks have an outcome (the records in `outcomes` counted one per task).
    done: usize,
    records: Vec<u8>,
    /// The shared segments the frame's handles name, listed whenever it is encoded.
    segments: Vec<Arc<SharedSegment>>,
}

impl ErasedBatch for RelayedBatch {
    fn first_index(&self) -> usize {
        self.first_index
    }

    fn len(&self) -> usize {
        self.tasks.len()
    }

    fn outcomes_len(&self) -> usize {
        self.done
    }

    fn run_here(&mut self, control: &RunControl) {
        // An in-process pool runs the frame through its entry, as a worker process would.
        let done = self.done;
        if done >= self.tasks.len() || control.is_cancelled() {
            return;
        }
        let start = self.tasks[done].start;
        let mut out = Vec::new();
        let frame = &self.frame[start..];
        let entry = self.entry;
        match crate::catch_task(|| entry(frame, &mut out, &mut |_| {})) {
            Ok(()) => {
                self.decode_outcomes(&out);
            }
            Err(message) => {
                let index = self.first_index + self.done;
                let (worker, pid) = crate::worker::panic_place();
                self.push_failure(Error::task_panicked_on(index, message, worker, pid));
            }
        }
    }

    fn remote_entry(&self) -> Result<RemoteEntry, Error> {
        Ok(self.entry)
    }

    fn function_name(&self) -> &'static str {
        "a task function of a relayed frame"
    }

    fn encode_tasks(&self, range: Range<usize>, out: &mut Vec<u8>) {
        // Its `SharedSlice`s are handles already: the pool must ship their segments.
        self.segments.iter().for_each(note_shared);
        let (Some(first), Some(last)) = (
            self.tasks.get(range.start),
            range.end.checked_sub(1).and_then(|i| self.tasks.get(i)),
        ) else {
            return;
        };
        out.extend_from_slice(&self.frame[first.start..last.end]);
    }

    fn decode_outcomes(&mut self, bytes: &[u8]) -> usize {
        // The records are kept as they came, copied in one piece, and counted into one run:
        // a relayed batch of tiny tasks holds 10^5 of them, and a copy or an entry each cost
        // more than running them.
        let base = self.records.len();
        let mut rest = bytes;
        let mut used = 0;
        let mut taken = 0;
        while self.done + taken < self.tasks.len() {
            let Some((_, payload, tail)) = read_record(rest) else {
                break;
            };
            used += 5 + payload.len();
            rest = tail;
            taken += 1;
        }
        if taken == 0 {
            return 0;
        }
        self.records.extend_from_slice(&bytes[..used]);
        self.done += taken;
        match self.outcomes.last_mut() {
            // Records follow records: the run goes on (they are back to back).
            Some(Relayed::Records { bytes, count }) if bytes.end == base => {
                bytes.end = base + used;
                *count += taken;
            }
            _ => self.outcomes.push(Relayed::Records {
                bytes: base..base + used,
                count: taken,
            }),
        }
        taken
    }

    fn push_failure(&mut self, error: Error) {
        if self.done < self.tasks.len() {
            self.outcomes.push(Relayed::Failed(error));
            self.done += 1;
        }
    }

    fn failures_len(&self) -> usize {
        self.outcomes
            .iter()
            .filter(|outcome| matches!(outcome, Relayed::Failed(_)))
            .count()
    }
}

impl sealed::Sealed for RelayedBatch {
    fn into_any(self: Box<Self>) -> Box<dyn Any + Send> {
        self
    }
}

impl Job {
    /// A job for tasks that arrived already encoded: `frame` as `ErasedBatch::encode_tasks`
    /// wrote it in another process of this build, `entry` the batch's [`RemoteEntry`] there
    /// (found again in this process, e.g. with `parjob_remote::entry_at`), `first_index` the
    /// input position of its first task (failures are numbered from it). Submit it to a pool
    /// of this process; `done` receives what the pool made of it, exactly once.
    ///
    /// For backends that relay frames (the MPI backend's worker ranks); user code never needs
    /// it.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `frame` is not a sequence of whole records.
    pub fn relayed(
        first_index: usize,
        entry: RemoteEntry,
        frame: Vec<u8>,
        timeout: Option<Duration>,
        done: impl FnOnce(RelayedOutcomes) + Send + Sync + 'static,
    ) -> Result<Job, Error> {
        Job::relayed_with_segments(first_index, entry, frame, Vec::new(), timeout, done)
    }

    /// [`Job::relayed`] for a frame whose `SharedSlice`s are handles naming `segments`
    /// (registered in this process under the ids the frame names, e.g. made with
    /// [`shared_memory_from`](crate::shared_memory_from)): a pool that encodes the frame
    /// ships them to its workers as it does a `SharedSlice`'s segment, and the job keeps them
    /// alive until it completes.
    ///
    /// # Errors
    /// [`Error::InvalidConfig`] when `frame` is not a sequence of whole records.
    pub fn relayed_with_segments(
        first_index: usize,
        entry: RemoteEntry,
        frame: Vec<u8>,
        segments: Vec<Arc<SharedSegment>>,
        timeout: Option<Duration>,
        done: impl FnOnce(RelayedOutcomes) + Send + Sync + 'static,
    ) -> Result<Job, Error> {
        let mut tasks = Vec::new();
        let mut rest = &frame[..];
        let mut at = 0;
        while !rest.is_empty() {
            let Some((_, payload, tail)) = read_record(rest) else {
                return Err(Error::InvalidConfig(format!(
                    "a relayed frame of {} bytes has a malformed record at byte {at}",
                    frame.len()
                )));
            };
            tasks.push(at..at + 5 + payload.len());
            at += 5 + payload.len();
            rest = tail;
        }
        let batch = RelayedBatch {
            first_index,
            entry,
            frame,
            tasks,
            outcomes: Vec::new(),
            done: 0,
            records: Vec::new(),
            segments,
        };
        let reply = Reply::Call(Box::new(move |completion: Completion| {
            let busy = completion.busy;
            let worker = completion.worker;
            let batch = sealed::Sealed::into_any(completion.batch);
            let outcomes = match batch.downcast::<RelayedBatch>() {
                Ok(batch) => RelayedOutcomes {
                    busy,
                    len: batch.tasks.len(),
                    outcomes: batch.outcomes,
                    records: batch.records,
                    worker,
                },
                // Only this function makes the job, with a RelayedBatch, and a pool cannot
                // swap a job's batch: unreachable, but answered rather than panicking.
                Err(_) => RelayedOutcomes {
                    busy,
                    len: 0,
                    outcomes: Vec::new(),
                    records: Vec::new(),
                    worker,
                },
            };
            done(outcomes);
        }));
        Ok(Job::new(
            0,
            Box::new(batch),
            Arc::new(RunControl::new(timeout)),
            None,
            reply,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Pool, SequentialPool};

    fn echo(frame: &[u8], out: &mut Vec<u8>, on_start: &mut dyn FnMut(usize)) {
        let mut rest = frame;
        let mut i = 0;
        while let Some((_, payload, tail)) = read_record(rest) {
            on_start(i);
            i += 1;
            out.push(0);
            out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            out.extend_from_slice(payload);
            rest = tail;
        }
    }

    #[test]
    fn a_relayed_frame_comes_back_as_its_records() {
        let mut frame = Vec::new();
        for payload in [&b"a"[..], b"bc"] {
            frame.push(0);
            frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            frame.extend_from_slice(payload);
        }
        let (tx, rx) = std::sync::mpsc::channel();
        let job = Job::relayed(10, echo, frame.clone(), None, move |o| {
            let _ = tx.send(o);
        })
        .unwrap();
        assert_eq!(job.batch().len(), 2);
        let mut encoded = Vec::new();
        job.batch().encode_tasks(1..2, &mut encoded);
        assert_eq!(encoded, frame[6..]);
        SequentialPool.submit(job);
        let outcomes = rx.recv().unwrap();
        assert_eq!(outcomes.len, 2);
        assert!(
            matches!(&outcomes.outcomes[..], [Relayed::Records { bytes, count: 2 }] if outcomes.records[bytes.clone()] == frame[..])
        );
    }

    /// Records that follow records make one run; a failure splits runs; a frame's tasks are
    /// never over-filled.
    #[test]
    fn relayed_outcomes_are_runs_of_records_split_by_failures() {
        let empty = [0u8, 0, 0, 0, 0];
        let (tx, rx) = std::sync::mpsc::channel();
        let mut job = Job::relayed(4, echo, empty.repeat(4), None, move |o| {
            let _ = tx.send(o);
        })
        .unwrap();
        let batch = job.batch_mut();
        assert_eq!(batch.decode_outcomes(&empty), 1);
        assert_eq!(batch.decode_outcomes(&empty), 1);
        batch.push_failure(Error::task_panicked(6, "no"));
        assert_eq!(
            batch.decode_outcomes(&empty.repeat(3)),
            1,
            "one task was left"
        );
        assert_eq!(batch.outcomes_len(), 4);
        job.complete(Duration::ZERO);
        let outcomes = rx.recv().unwrap();
        match &outcomes.outcomes[..] {
            [
                Relayed::Records { bytes: a, count: 2 },
                Relayed::Failed(_),
                Relayed::Records { bytes: b, count: 1 },
            ] => {
                assert_eq!((a.clone(), b.clone()), (0..10, 10..15));
            }
            other => panic!("unexpected outcomes: {other:?}"),
        }
    }

    /// Memory that claims to be shared, as a backend's segment would.
    struct FakeShared(Vec<u8>);

    impl crate::SharedMemory for FakeShared {
        fn bytes(&self) -> &[u8] {
            &self.0
        }
        fn as_any(&self) -> &dyn Any {
            self
        }
        fn is_shared(&self) -> bool {
            true
        }
    }

    #[test]
    fn a_relayed_frame_lists_its_segments_whenever_it_is_encoded() {
        let segment = Arc::new(SharedSegment::new(77, Box::new(FakeShared(vec![1; 64]))));
        let job = Job::relayed_with_segments(
            0,
            echo,
            vec![0, 0, 0, 0, 0],
            vec![Arc::clone(&segment)],
            None,
            |_| {},
        )
        .unwrap();
        let mut encoded = Vec::new();
        let ((), listed) = crate::collect_shared(|| job.batch().encode_tasks(0..1, &mut encoded));
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].id(), 77);
        drop(listed);
        // Outside a backend's frame: nothing to list, and nothing breaks.
        job.batch().encode_tasks(0..1, &mut encoded);
        assert_eq!(Arc::strong_count(&segment), 2, "the job keeps it alive");
        drop(job);
        assert_eq!(Arc::strong_count(&segment), 1);
    }

    #[test]
    fn a_malformed_frame_is_refused() {
        let err = Job::relayed(0, echo, vec![0, 9, 0, 0, 0], None, |_| {}).unwrap_err();
        assert!(err.to_string().contains("malformed record"), "{err}");
    }

    #[test]
    fn a_dropped_relayed_job_still_answers() {
        let (tx, rx) = std::sync::mpsc::channel();
        let job = Job::relayed(0, echo, vec![0, 0, 0, 0, 0], None, move |o| {
            let _ = tx.send(o);
        })
        .unwrap();
        drop(job);
        let outcomes = rx.recv().unwrap();
        assert_eq!((outcomes.len, outcomes.outcomes.len()), (1, 0));
    }
}
