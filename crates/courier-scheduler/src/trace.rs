//! Spans a tracing backend can show (OpenTelemetry, when `otlp_endpoint`
//! is set): a root span per run, and a span per task attempt whose ID is
//! the parent span the task's `traceparent` header names, so each worker's
//! step span (a child of that header) joins the run's trace: one trace per
//! run, across processes. The IDs come from the run and task IDs
//! ([`courier_wire::TraceParent::for_task`]), so no state is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    Span as _, SpanBuilder, SpanContext, SpanId, SpanKind, TraceContextExt as _, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Context, KeyValue, global};
use uuid::Uuid;

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Export spans (the process installed an OpenTelemetry tracer provider).
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The run's root span ID.
fn root(run: Uuid) -> SpanId {
    let mut id = [0u8; 8];
    id.copy_from_slice(&run.as_bytes()[8..16]);
    SpanId::from_bytes(id)
}

fn at(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// A run was submitted: its root span (the moment of its submission).
pub fn run_started(run_id: &str, workflow: &str, created_ms: i64) {
    let (true, Ok(run)) = (enabled(), Uuid::parse_str(run_id)) else {
        return;
    };
    let tracer = global::tracer("courier-scheduler");
    let mut span = SpanBuilder::from_name(format!("run {workflow}"))
        .with_kind(SpanKind::Internal)
        .with_trace_id(TraceId::from_bytes(*run.as_bytes()))
        .with_span_id(root(run))
        .with_start_time(at(created_ms))
        .with_attributes([
            KeyValue::new("courier.run", run_id.to_string()),
            KeyValue::new("courier.workflow", workflow.to_string()),
        ])
        .start(&tracer);
    span.end_with_timestamp(at(created_ms));
}

/// A task attempt's result was applied: its span, from when the worker
/// started it to now, child of the run's root span.
pub fn task_applied(result: &courier_wire::TaskResult) {
    if !enabled() {
        return;
    }
    let ids = courier_wire::TraceParent::for_task(result.run_id, result.task_id);
    let parent = Context::new().with_remote_span_context(SpanContext::new(
        TraceId::from_bytes(ids.trace_id),
        root(result.run_id),
        TraceFlags::SAMPLED,
        true,
        TraceState::default(),
    ));
    let tracer = global::tracer("courier-scheduler");
    let started = i64::try_from(result.started_unix_ms).unwrap_or(0);
    let mut span = SpanBuilder::from_name(format!("task {}", result.step))
        .with_kind(SpanKind::Producer)
        .with_span_id(SpanId::from_bytes(ids.parent_id))
        .with_start_time(at(started))
        .with_attributes([
            KeyValue::new("courier.run", result.run_id.to_string()),
            KeyValue::new("courier.step", result.step.clone()),
            KeyValue::new("courier.task", result.task_id.to_string()),
            KeyValue::new("courier.attempt", i64::from(result.attempt)),
            KeyValue::new("courier.status", result.status.as_str()),
            KeyValue::new("courier.worker", result.worker_id.clone()),
        ])
        .start_with_context(&tracer, &parent);
    span.end();
}
