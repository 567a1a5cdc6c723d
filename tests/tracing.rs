//! The `tracing` feature: what a `tracing` subscriber sees of a run (a span per run and per
//! batch, events for failures, retries and worker changes), recorded by a layer of the test's
//! own.
//!
//! Each test runs in a child process of its own: `tracing` caches per call site whether
//! anyone listens, across every thread of the process, and the other tests' runs (on threads
//! with no subscriber) hit the same call sites at the same time; in a shared process the
//! recorder then sometimes saw nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use parjob::{Backend, BatchSize, Parallel, delayed};
use parjob_tests::run_child_test;
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

/// A span as the layer saw it: its name, its fields as text, its parent's name, and whether it
/// was closed.
#[derive(Debug, Clone, Default)]
struct SeenSpan {
    name: &'static str,
    fields: HashMap<String, String>,
    parent: Option<&'static str>,
    closed: bool,
}

#[derive(Debug, Clone, Default)]
struct Seen {
    spans: HashMap<u64, SeenSpan>,
    /// Each event's message and fields, and the name of the span it is in.
    events: Vec<(HashMap<String, String>, Option<&'static str>)>,
}

struct Fields<'a>(&'a mut HashMap<String, String>);

impl Visit for Fields<'_> {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0
            .insert(field.name().to_string(), format!("{value:?}"));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().to_string(), value.to_string());
    }
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Seen>>);

impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let mut span = SeenSpan {
            name: attrs.metadata().name(),
            parent: ctx.span(id).and_then(|s| s.parent()).map(|p| p.name()),
            ..SeenSpan::default()
        };
        attrs.record(&mut Fields(&mut span.fields));
        self.0.lock().unwrap().spans.insert(id.into_u64(), span);
    }
    fn on_record(&self, id: &Id, values: &Record<'_>, _ctx: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
            values.record(&mut Fields(&mut span.fields));
        }
    }
    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let mut fields = HashMap::new();
        event.record(&mut Fields(&mut fields));
        let parent = ctx.event_span(event).map(|s| s.name());
        self.0.lock().unwrap().events.push((fields, parent));
    }
    fn on_close(&self, id: Id, _ctx: Context<'_, S>) {
        if let Some(span) = self.0.lock().unwrap().spans.get_mut(&id.into_u64()) {
            span.closed = true;
        }
    }
}

/// Runs `run` with the recorder as the thread's subscriber and returns what it saw.
fn record(run: impl FnOnce()) -> Seen {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    tracing::subscriber::with_default(subscriber, run);
    recorder.0.lock().unwrap().clone()
}

fn square(x: u64) -> u64 {
    x * x
}

fn aborts_on_three(x: u64) -> u64 {
    if x == 3 {
        std::process::abort();
    }
    x
}

#[test]
fn a_run_is_a_span_and_each_batch_a_closed_child_span_with_its_figures() {
    run_child_test(
        "tracing::child_a_run_is_a_span_and_each_batch_a_closed_child_span_with_its_figures",
        &[],
    );
}

#[test]
#[ignore = "run by a_run_is_a_span_and_each_batch_a_closed_child_span_with_its_figures in a child process"]
fn child_a_run_is_a_span_and_each_batch_a_closed_child_span_with_its_figures() {
    let seen = record(|| {
        let out = Parallel::new(2)
            .backend(Backend::Process)
            .batch_size(BatchSize::Fixed(10))
            .run((0..100u64).map(|i| delayed(square, i)))
            .unwrap();
        assert_eq!(out[9], 81);
    });
    let runs: Vec<_> = seen
        .spans
        .values()
        .filter(|s| s.name == "parjob_run")
        .collect();
    assert_eq!(runs.len(), 1, "{seen:?}");
    assert_eq!(runs[0].fields["ok"], "true");
    assert!(runs[0].closed);
    let batches: Vec<_> = seen
        .spans
        .values()
        .filter(|s| s.name == "parjob_batch")
        .collect();
    assert_eq!(batches.len(), 10, "{seen:?}");
    let mut firsts: Vec<u64> = Vec::new();
    for batch in &batches {
        assert_eq!(batch.parent, Some("parjob_run"));
        assert!(batch.closed);
        assert_eq!(batch.fields["tasks"], "10");
        assert!(batch.fields["worker"].parse::<usize>().unwrap() < 2);
        assert!(batch.fields["bytes_sent"].parse::<u64>().unwrap() > 0);
        firsts.push(batch.fields["first_index"].parse().unwrap());
    }
    firsts.sort();
    assert_eq!(firsts, (0..10).map(|b| b * 10).collect::<Vec<u64>>());
}

#[test]
fn crashes_and_worker_replacements_are_events_in_the_run_span() {
    run_child_test(
        "tracing::child_crashes_and_worker_replacements_are_events_in_the_run_span",
        &[],
    );
}

#[test]
#[ignore = "run by crashes_and_worker_replacements_are_events_in_the_run_span in a child process"]
fn child_crashes_and_worker_replacements_are_events_in_the_run_span() {
    let seen = record(|| {
        let results = Parallel::new(1)
            .backend(Backend::Process)
            .batch_size(BatchSize::Fixed(10))
            .run_results((0..10u64).map(|i| delayed(aborts_on_three, i)))
            .unwrap();
        assert!(results[3].is_err() && results[4].is_ok());
    });
    let messages = |what: &str| {
        seen.events
            .iter()
            .filter(|(fields, parent)| {
                fields.get("message").is_some_and(|m| m == what) && *parent == Some("parjob_run")
            })
            .count()
    };
    assert_eq!(messages("worker crashed"), 1, "{:?}", seen.events);
    assert_eq!(messages("task failed"), 1);
    assert_eq!(messages("worker replaced"), 1);
}

#[test]
fn tracing_chrome_writes_a_trace_with_every_batch() {
    run_child_test(
        "tracing::child_tracing_chrome_writes_a_trace_with_every_batch",
        &[],
    );
}

#[test]
#[ignore = "run by tracing_chrome_writes_a_trace_with_every_batch in a child process"]
fn child_tracing_chrome_writes_a_trace_with_every_batch() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("trace.json");
    let (layer, guard) = tracing_chrome::ChromeLayerBuilder::new()
        .file(&path)
        .trace_style(tracing_chrome::TraceStyle::Async)
        .build();
    let subscriber = tracing_subscriber::registry().with(layer);
    tracing::subscriber::with_default(subscriber, || {
        let out = Parallel::new(2)
            .backend(Backend::Process)
            .batch_size(BatchSize::Fixed(10))
            .run((0..100u64).map(|i| delayed(square, i)))
            .unwrap();
        assert_eq!(out[99], 99 * 99);
    });
    // The file is complete once the guard is dropped.
    drop(guard);
    let text = std::fs::read_to_string(&path).unwrap();
    let events: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let count = |name: &str, phase: &str| {
        events
            .iter()
            .filter(|e| e["name"] == name && e["ph"] == phase)
            .count()
    };
    // Async style: a span is a begin ("b") and an end ("e") event.
    assert_eq!(count("parjob_run", "b"), 1, "{text}");
    assert_eq!(count("parjob_run", "e"), 1, "{text}");
    assert_eq!(count("parjob_batch", "b"), 10, "{text}");
    assert_eq!(count("parjob_batch", "e"), 10, "{text}");
}
