//! The worker's Prometheus metrics (names and help in one place) and its
//! `/metrics` and `/healthz` endpoint on a port of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label: a result status.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Status {
    pub status: String,
}

/// Label: a step kind (`command`, `agent`, `echo`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Kind {
    pub kind: String,
}

/// Labels: a model (`provider/model`) and `input` or `output`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Tokens {
    pub model: String,
    pub direction: String,
}

// Buckets double, so a quantile read from them is within a factor of
// two of the truth at worst (a factor of four let a p95 of 1.5 s read as
// 4.6 s).

/// 5 ms to about 45 minutes.
fn step_duration() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 20))
}

/// 64 B to 32 MiB.
fn snapshot_bytes() -> Histogram {
    Histogram::new(exponential_buckets(64.0, 2.0, 20))
}

/// 10 µs to about 5 s.
fn decode_seconds() -> Histogram {
    Histogram::new(exponential_buckets(0.000_01, 2.0, 20))
}

/// Every metric a worker exports.
#[derive(Debug)]
pub struct Metrics {
    pub tasks_consumed: Counter,
    pub results: Family<Status, Counter>,
    pub dead_lettered: Counter,
    pub redeliveries: Counter,
    pub in_flight: Gauge,
    pub step_duration: Family<Kind, Histogram, fn() -> Histogram>,
    pub snapshot_bytes: Histogram,
    pub snapshot_decode: Histogram,
    pub llm_tokens: Family<Tokens, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self {
            tasks_consumed: Counter::default(),
            results: Family::default(),
            dead_lettered: Counter::default(),
            redeliveries: Counter::default(),
            in_flight: Gauge::default(),
            step_duration: Family::new_with_constructor(step_duration),
            snapshot_bytes: snapshot_bytes(),
            snapshot_decode: decode_seconds(),
            llm_tokens: Family::default(),
        }
    }
}

impl Metrics {
    /// Every result status and step kind counted at 0, so the first one
    /// shows in `rate()` (a series born at 1 has no increase to show).
    pub fn initialize(&self) {
        for status in courier_wire::TaskStatus::ALL {
            let _ = self.results.get_or_create(&Status {
                status: status.as_str().into(),
            });
        }
        for kind in ["command", "echo", "agent"] {
            let _ = self.step_duration.get_or_create(&Kind { kind: kind.into() });
        }
    }

    /// A registry with every metric under the `courier_worker_` prefix, each
    /// series labelled with the worker's ID (`worker`), not its address.
    pub fn registry(&self, worker_id: &str) -> Registry {
        let mut r = Registry::with_labels(std::iter::once((
            std::borrow::Cow::Borrowed("worker"),
            std::borrow::Cow::Owned(worker_id.to_string()),
        )));
        r.register(
            "courier_worker_tasks_consumed",
            "Task deliveries received",
            self.tasks_consumed.clone(),
        );
        r.register(
            "courier_worker_results",
            "Results published, by status",
            self.results.clone(),
        );
        r.register(
            "courier_worker_dead_lettered",
            "Tasks refused and dead-lettered",
            self.dead_lettered.clone(),
        );
        r.register(
            "courier_worker_redeliveries",
            "Deliveries marked redelivered by the broker",
            self.redeliveries.clone(),
        );
        r.register(
            "courier_worker_steps_in_flight",
            "Steps running now",
            self.in_flight.clone(),
        );
        r.register(
            "courier_worker_step_duration_seconds",
            "Step run time, by kind",
            self.step_duration.clone(),
        );
        r.register(
            "courier_worker_snapshot_bytes",
            "Size of snapshots received (compressed)",
            self.snapshot_bytes.clone(),
        );
        r.register(
            "courier_worker_snapshot_decode_seconds",
            "Time to decode a snapshot (cache misses)",
            self.snapshot_decode.clone(),
        );
        r.register(
            "courier_llm_tokens",
            "LLM tokens used by agent steps, by model",
            self.llm_tokens.clone(),
        );
        r
    }
}

/// What the endpoint serves.
#[derive(Debug)]
struct Endpoint {
    registry: Registry,
    connected: Arc<AtomicBool>,
}

/// Serve `/metrics` and `/healthz` on `listen`; returns the bound address.
///
/// # Errors
/// The address cannot be bound.
pub async fn serve(
    listen: SocketAddr,
    metrics: &Metrics,
    worker_id: &str,
    connected: Arc<AtomicBool>,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let addr = listener.local_addr()?;
    let endpoint = Arc::new(Endpoint {
        registry: metrics.registry(worker_id),
        connected,
    });
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .route("/healthz", get(health))
        .with_state(endpoint);
    // Served for the worker's whole life.
    tokio::spawn(courier_http::serve(
        listener,
        app,
        courier_http::Bounds::default(),
        tokio_util::sync::CancellationToken::new(),
    ));
    Ok(addr)
}

async fn render(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &endpoint.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn health(State(endpoint): State<Arc<Endpoint>>) -> impl IntoResponse {
    let ok = endpoint.connected.load(Ordering::Relaxed);
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(serde_json::json!({"status": if ok { "ok" } else { "degraded" }, "broker": ok})),
    )
}
