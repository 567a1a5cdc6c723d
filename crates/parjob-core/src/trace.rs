//! The picture of a run: a Chrome trace-event JSON file (`Parallel::trace(path)` or
//! `PARJOB_TRACE=path`) with one complete event (`"ph": "X"`) per batch on its worker's row,
//! and an instant event per crash and retry. Perfetto (ui.perfetto.dev) and `chrome://tracing`
//! open it.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use crate::events::Transport;

/// Where a run writes its trace: `RunOptions::trace`, else `PARJOB_TRACE` if set and not
/// empty.
pub(crate) fn trace_path(options: &crate::RunOptions) -> Option<PathBuf> {
    if let Some(path) = &options.trace {
        return Some(path.clone());
    }
    std::env::var_os("PARJOB_TRACE")
        .filter(|value| !value.is_empty())
        .map(PathBuf::from)
}

struct Span {
    first_index: usize,
    tasks: usize,
    failed: usize,
    worker: Option<usize>,
    start: Duration,
    busy: Duration,
    transport: Option<Transport>,
}

/// Records batches as they come back, and writes the file at the end of the run.
pub(crate) struct TraceRecorder {
    path: PathBuf,
    backend: &'static str,
    workers: usize,
    spans: Vec<Span>,
    /// Name, time, and the worker's row for an event about one worker (else global).
    instants: Vec<(String, Duration, Option<usize>)>,
}

impl TraceRecorder {
    pub(crate) fn new(path: PathBuf) -> Self {
        TraceRecorder {
            path,
            backend: "",
            workers: 0,
            spans: Vec::new(),
            instants: Vec::new(),
        }
    }

    pub(crate) fn started(&mut self, backend: &'static str, workers: usize) {
        self.backend = backend;
        self.workers = workers;
    }

    /// A batch that came back at `at` (since the run began) after running `busy`.
    #[allow(clippy::too_many_arguments)] // one batch's figures, as the event carries them
    pub(crate) fn batch(
        &mut self,
        first_index: usize,
        tasks: usize,
        failed: usize,
        worker: Option<usize>,
        busy: Duration,
        at: Duration,
        transport: Option<Transport>,
    ) {
        self.spans.push(Span {
            first_index,
            tasks,
            failed,
            worker,
            start: at.saturating_sub(busy),
            busy,
            transport,
        });
    }

    pub(crate) fn instant(&mut self, name: String, at: Duration) {
        self.instants.push((name, at, None));
    }

    /// An event about one worker, on its row.
    pub(crate) fn worker_instant(&mut self, worker: usize, name: String, at: Duration) {
        self.instants.push((name, at, Some(worker)));
    }

    /// The JSON text. Batches whose worker is not known (pools that run them elsewhere) are
    /// laid out on rows by time: each on the first row free when it started.
    pub(crate) fn to_json(&self) -> String {
        let mut rows_free: Vec<Duration> = Vec::new();
        let mut order: Vec<usize> = (0..self.spans.len()).collect();
        order.sort_by_key(|&i| self.spans[i].start);
        let mut rows = vec![0usize; self.spans.len()];
        for i in order {
            let span = &self.spans[i];
            rows[i] = match span.worker {
                Some(worker) => worker,
                None => {
                    let row = rows_free
                        .iter()
                        .position(|&free| free <= span.start)
                        .unwrap_or(rows_free.len());
                    if row == rows_free.len() {
                        rows_free.push(Duration::ZERO);
                    }
                    rows_free[row] = span.start + span.busy;
                    row
                }
            };
        }
        let row_count = rows
            .iter()
            .copied()
            .chain(self.instants.iter().filter_map(|i| i.2))
            .map(|r| r + 1)
            .max()
            .unwrap_or(0)
            .max(self.workers);
        let mut out = String::from("{\"displayTimeUnit\":\"ms\",\"traceEvents\":[\n");
        let _ = write!(
            out,
            "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":1,\"tid\":0,\"args\":{{\"name\":\"parjob run on {} ({} workers)\"}}}}",
            escape(self.backend),
            self.workers
        );
        for row in 0..row_count {
            let _ = write!(
                out,
                ",\n{{\"name\":\"thread_name\",\"ph\":\"M\",\"pid\":1,\"tid\":{row},\"args\":{{\"name\":\"worker {row}\"}}}}"
            );
        }
        for (span, row) in self.spans.iter().zip(&rows) {
            let name = match span.tasks {
                1 => format!("task {}", span.first_index),
                n => format!("tasks {}..{}", span.first_index, span.first_index + n),
            };
            let _ = write!(
                out,
                ",\n{{\"name\":\"{name}\",\"cat\":\"{}\",\"ph\":\"X\",\"ts\":{},\"dur\":{},\"pid\":1,\"tid\":{row},\"args\":{{\"first_index\":{},\"tasks\":{},\"failed\":{}",
                if span.failed > 0 { "failed" } else { "batch" },
                micros(span.start),
                micros(span.busy),
                span.first_index,
                span.tasks,
                span.failed
            );
            if let Some(t) = &span.transport {
                let _ = write!(
                    out,
                    ",\"bytes_sent\":{},\"bytes_received\":{},\"encode_us\":{},\"ipc_us\":{},\"decode_us\":{}",
                    t.bytes_sent,
                    t.bytes_received,
                    micros(t.encode),
                    micros(t.ipc),
                    micros(t.decode)
                );
            }
            out.push_str("}}");
        }
        for (name, at, worker) in &self.instants {
            let (cat, scope, row) = match worker {
                Some(worker) => ("worker", "t", *worker),
                None => ("event", "g", 0),
            };
            let _ = write!(
                out,
                ",\n{{\"name\":\"{}\",\"cat\":\"{cat}\",\"ph\":\"i\",\"s\":\"{scope}\",\"ts\":{},\"pid\":1,\"tid\":{row}}}",
                escape(name),
                micros(*at)
            );
        }
        out.push_str("\n]}\n");
        out
    }

    /// Writes the file; the error says which file and why.
    pub(crate) fn write(&self) -> Result<(), String> {
        std::fs::write(&self.path, self.to_json())
            .map_err(|e| format!("cannot write the trace to {}: {e}", self.path.display()))
    }
}

/// Microseconds with three decimals, as trace events count time.
fn micros(duration: Duration) -> String {
    format!("{:.3}", duration.as_nanos() as f64 / 1000.0)
}

/// `text` as the inside of a JSON string.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_without_a_worker_get_rows_by_time_and_names_are_escaped() {
        let mut trace = TraceRecorder::new(PathBuf::from("unused"));
        trace.started("Test\"Backend", 2);
        let ms = Duration::from_millis;
        trace.batch(0, 4, 0, None, ms(10), ms(10), None);
        trace.batch(4, 4, 0, None, ms(10), ms(12), None);
        trace.batch(8, 1, 1, None, ms(5), ms(20), None);
        trace.instant("a \"quoted\" crash".into(), ms(20));
        let json = trace.to_json();
        assert!(json.contains("Test\\\"Backend"), "{json}");
        assert!(json.contains("a \\\"quoted\\\" crash"), "{json}");
        assert_eq!(json.matches("\"ph\":\"X\"").count(), 3);
        // 0..10 on row 0, 2..12 on row 1, 15..20 back on row 0.
        assert!(json.contains("\"name\":\"task 8\",\"cat\":\"failed\",\"ph\":\"X\",\"ts\":15000.000,\"dur\":5000.000,\"pid\":1,\"tid\":0"), "{json}");
        assert!(
            json.contains("\"ts\":2000.000,\"dur\":10000.000,\"pid\":1,\"tid\":1"),
            "{json}"
        );
    }
}
