//! Courier's worker: consume tasks, verify and decode them, mount the snapshot
//! as a read-only store, run the step, publish the result (confirmed), and
//! only then acknowledge the task.
//!
//! **Architecture invariant:** everything a worker knows comes in the task; it
//! never reads the scheduler's files or database.
//!
//! **Architecture invariant:** a task is acked only after the broker confirmed
//! its result. When publishing fails the task is left unacked and the broker
//! redelivers it; the scheduler applies a result once per task id.

pub mod command;
pub mod control;
pub mod metrics;
pub mod reaper;

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::command::{CaptureLimits, Exit};
use courier_amqp::{Broker, Delivery, Header, Names, Outgoing, Publisher};
use courier_config::SnapshotStore;
use courier_wire::{
    ContentHash, Limits, SigningKey, Snapshot, StepRun, Task, TaskResult, TaskStatus, TraceParent, decode,
    encode_message, headers,
};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::{AbortOnDropHandle, TaskTracker};
use tracing::{Instrument, error, info, info_span, warn};

/// Everything a worker is told at start.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Broker URL.
    pub amqp_url: String,
    /// Exchange and queue names.
    pub names: Names,
    /// Worker pools (queues) to consume.
    pub pools: Vec<String>,
    /// Steps run at once; also the prefetch of each queue.
    pub concurrency: usize,
    /// This worker's name in results and logs.
    pub worker_id: String,
    /// Bounds on task frames.
    pub task_limits: Limits,
    /// Bounds on snapshot frames.
    pub snapshot_limits: Limits,
    /// Bounds on captured output.
    pub capture: CaptureLimits,
    /// Redeliveries a task queue allows (declared with the topology).
    pub delivery_limit: u32,
    /// Replicas of each quorum queue it declares (`None`: every node).
    pub quorum_group_size: Option<u32>,
    /// How long in-flight steps may take to finish after a shutdown signal.
    pub shutdown_grace: Duration,
    /// How long to keep trying to reach the broker before giving up.
    pub connect_timeout: Duration,
    /// When set, only tasks signed with this key are run, and results are
    /// signed with it.
    pub signing_key: Option<SigningKey>,
    /// What command steps start from (never the worker's own environment).
    pub sandbox: command::Sandbox,
    /// The worker's environment as it started, held in memory: agent steps
    /// read API keys from it. Never given to a step.
    pub worker_env: Arc<BTreeMap<String, String>>,
    /// Where `/metrics` and `/healthz` listen, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

/// Decoded snapshots by content hash.
type SnapshotCache = Mutex<lru::LruCache<ContentHash, Arc<Snapshot>>>;

/// How long the broker lets a delivery stay unacknowledged: the longest
/// step a workflow may have, plus a margin for publishing its result.
const ACK_TIMEOUT: Duration = Duration::from_secs(courier_config::MAX_STEP_TIMEOUT.as_secs() + 600);

/// Decoded snapshots kept per worker.
const SNAPSHOT_CACHE_ENTRIES: usize = 256;

/// Run until `shutdown` is cancelled, reconnecting when the broker goes away.
///
/// # Errors
/// The broker stayed unreachable past `connect_timeout`.
pub async fn run(config: WorkerConfig, shutdown: CancellationToken) -> Result<(), courier_amqp::AmqpError> {
    let config = Arc::new(config);
    let cache: Arc<SnapshotCache> = Arc::new(Mutex::new(lru::LruCache::new(
        NonZeroUsize::new(SNAPSHOT_CACHE_ENTRIES).unwrap_or(NonZeroUsize::MIN),
    )));
    let slots = Arc::new(Semaphore::new(config.concurrency.max(1)));
    let tracker = TaskTracker::new();
    let metrics = Arc::new(metrics::Metrics::default());
    metrics.initialize();
    let cancellations = Arc::new(control::Cancellations::default());
    let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some(listen) = config.metrics_listen {
        match metrics::serve(listen, &metrics, &config.worker_id, connected.clone()).await {
            Ok(addr) => info!(%addr, "metrics listening"),
            Err(e) => warn!(%listen, error = %e, "cannot serve metrics"),
        }
    }
    info!(worker = %config.worker_id, pools = ?config.pools, concurrency = config.concurrency, "worker starting");
    if config.signing_key.is_none() {
        warn!("COURIER_SIGNING_KEY is not set: tasks are not authenticated");
    }
    while !shutdown.is_cancelled() {
        let broker = tokio::select! {
            b = Broker::connect_with_retry(&config.amqp_url, config.names.clone(), &config.worker_id, config.connect_timeout) => b?.with_quorum_group_size(config.quorum_group_size),
            () = shutdown.cancelled() => break,
        };
        let shared = Serving {
            config: config.clone(),
            cache: cache.clone(),
            metrics: metrics.clone(),
            cancellations: cancellations.clone(),
        };
        // A connection that fails under an operation lapin never resolves
        // ends its work here (see `Broker::serve`); steps in flight go on,
        // in the tracker.
        let served = broker
            .serve(serve(&broker, &shared, &slots, &tracker, &shutdown, &connected), || {
                shutdown.is_cancelled()
            })
            .await;
        connected.store(false, std::sync::atomic::Ordering::Relaxed);
        match served {
            Ok(()) => {
                let _ = broker.close().await;
            }
            Err(e) => {
                warn!(error = %e, "lost the broker; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    drain(&tracker, config.shutdown_grace).await;
    info!(worker = %config.worker_id, "worker stopped");
    Ok(())
}

/// Wait for in-flight steps, at most `grace`.
async fn drain(tracker: &TaskTracker, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            in_flight = tracker.len(),
            "shutdown grace period over; abandoning in-flight steps (they will be redelivered)"
        );
    }
    tracker.reopen();
}

/// What every task handler shares, across reconnections.
#[derive(Debug, Clone)]
struct Serving {
    config: Arc<WorkerConfig>,
    cache: Arc<SnapshotCache>,
    metrics: Arc<metrics::Metrics>,
    cancellations: Arc<control::Cancellations>,
}

/// Consume every pool on one connection until shutdown (`Ok`, once in-flight
/// steps are drained and the channels closed) or a broker failure (`Err`: the
/// caller reconnects). Tasks are taken only once the control stream has been
/// read up to now, so no task of a run cancelled before is started.
async fn serve(
    broker: &Broker,
    shared: &Serving,
    slots: &Arc<Semaphore>,
    tracker: &TaskTracker,
    shutdown: &CancellationToken,
    connected: &Arc<std::sync::atomic::AtomicBool>,
) -> Result<(), courier_amqp::AmqpError> {
    let config = &shared.config;
    broker.declare_topology(&config.pools, config.delivery_limit).await?;
    let publisher = broker.publisher(courier_amqp::DEFAULT_PUBLISH_WINDOW).await?;
    let prefetch = u16::try_from(config.concurrency).unwrap_or(u16::MAX);
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::channel(1);
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    // This connection's tasks stop with its work, even when that is dropped.
    let follower = AbortOnDropHandle::new(tokio::spawn({
        let (broker, publisher, shared, failed_tx) =
            (broker.clone(), publisher.clone(), shared.clone(), failed_tx.clone());
        async move {
            let config = &shared.config;
            let followed = control::follow(
                &broker,
                &publisher,
                &config.worker_id,
                config.signing_key.as_ref(),
                &shared.cancellations,
                ready_tx,
            )
            .await;
            let _ = failed_tx
                .send(followed.err().unwrap_or(courier_amqp::AmqpError::Closed))
                .await;
        }
    }));
    tokio::select! {
        caught_up = ready_rx => if caught_up.is_err() {
            // The follower failed before catching up; its error is in the channel.
            let e = failed_rx.recv().await.unwrap_or(courier_amqp::AmqpError::Closed);
            return Err(e);
        },
        () = shutdown.cancelled() => {
            follower.abort();
            let _ = publisher.close().await;
            return Ok(());
        }
    }
    let mut consumers = Vec::new();
    // Each pool's queue and its lane's (small runs' tasks), each consumer
    // with its own prefetch: a lane's task waits for a free slot, not behind
    // the pool's queue. Slots are taken in the order deliveries ask for them.
    let keys = config
        .pools
        .iter()
        .flat_map(|pool| [(pool, pool.clone()), (pool, courier_amqp::lane_key(pool))]);
    for (pool, key) in keys {
        let queue = broker.names().task_queue(&key);
        let mut consumer = broker
            .consumer_with_ack_timeout(&queue, prefetch, &format!("{}:{key}", config.worker_id), ACK_TIMEOUT)
            .await?;
        let pool = pool.clone();
        let (shared, slots, tracker, publisher, shutdown, failed_tx) = (
            shared.clone(),
            slots.clone(),
            tracker.clone(),
            publisher.clone(),
            shutdown.clone(),
            failed_tx.clone(),
        );
        consumers.push(AbortOnDropHandle::new(tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = consumer.next() => next,
                    () = shutdown.cancelled() => break,
                };
                let delivery = match next {
                    Some(Ok(delivery)) => delivery,
                    Some(Err(e)) => {
                        let _ = failed_tx.send(e).await;
                        return consumer;
                    }
                    None => {
                        let _ = failed_tx.send(courier_amqp::AmqpError::Closed).await;
                        return consumer;
                    }
                };
                // A delivery waiting for a slot (its pool's other queue took
                // them) is given back on shutdown: the channel's close
                // returns it to its queue.
                let permit = tokio::select! {
                    biased;
                    () = shutdown.cancelled() => break,
                    permit = slots.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                };
                let (shared, publisher, pool) = (shared.clone(), publisher.clone(), pool.clone());
                tracker.spawn(async move {
                    shared.metrics.in_flight.inc();
                    handle(delivery, &pool, &shared, &publisher).await;
                    shared.metrics.in_flight.dec();
                    drop(permit);
                });
            }
            // Stop intake; deliveries already received finish and are acked.
            let _ = consumer.cancel().await;
            consumer
        })));
    }
    drop(failed_tx);
    connected.store(true, std::sync::atomic::Ordering::Relaxed);
    info!(queues = ?config.pools.iter().flat_map(|p| broker.names().pool_queues(p)).collect::<Vec<_>>(), "consuming");
    let result = tokio::select! {
        () = shutdown.cancelled() => Ok(()),
        Some(e) = failed_rx.recv() => Err(e),
    };
    follower.abort();
    if result.is_err() {
        // A broken connection: do not wait for consumers stuck on it.
        consumers.iter().for_each(AbortOnDropHandle::abort);
        return result;
    }
    let mut stopped = Vec::new();
    for consumer in consumers {
        stopped.extend(consumer.await.ok());
    }
    drain(tracker, config.shutdown_grace).await;
    // Close the channels before the connection: a channel closed by its last
    // handle being dropped would race the connection's close.
    for consumer in stopped {
        let _ = consumer.close().await;
    }
    let _ = publisher.close().await;
    result
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Why a task was refused before running.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("{0}")]
    Frame(#[from] courier_wire::WireError),
    #[error("snapshot hash mismatch: header says {header}, snapshot is {actual}")]
    HashMismatch { header: String, actual: String },
    #[error("task has no snapshot hash header ({})", headers::SNAPSHOT_HASH)]
    NoHash,
    #[error("{0}")]
    Signature(#[from] courier_wire::SignatureError),
    #[error("the task expired: its deadline ({deadline_unix_ms} ms since the epoch) passed {late_ms} ms ago")]
    Expired { deadline_unix_ms: u64, late_ms: u64 },
    #[error("the task is for pool \"{task}\" but came from the queue of pool \"{queue}\"")]
    WrongPool { task: String, queue: String },
}

impl Refusal {
    /// Whether the refusal may be reported as the task's result: only when
    /// it is about the task's authenticated body. A wrong snapshot-hash header
    /// or a task moved to another pool's queue says nothing about the task a
    /// scheduler published (the header is not signed; the move is someone
    /// else's doing), so with a key such a copy is dead-lettered unanswered.
    fn speaks_for_the_task(&self, signed: bool) -> bool {
        match self {
            Refusal::HashMismatch { .. } | Refusal::NoHash => !signed,
            Refusal::WrongPool { .. } => false,
            Refusal::Frame(_) | Refusal::Signature(_) | Refusal::Expired { .. } => true,
        }
    }
}

/// One delivery from `pool`'s queue, from decode to ack.
async fn handle(delivery: Delivery, pool: &str, shared: &Serving, publisher: &Publisher) {
    let (config, cache, metrics) = (&*shared.config, &*shared.cache, &*shared.metrics);
    let started = now_ms();
    metrics.tasks_consumed.inc();
    if delivery.redelivered {
        metrics.redeliveries.inc();
    }
    // Over the limit: refused before anything (the HMAC included) reads it.
    if delivery.body.len() > config.task_limits.max_compressed {
        let too_large = courier_wire::WireError::TooLarge {
            kind: "task",
            size: courier_wire::SizeKind::Compressed,
            limit: config.task_limits.max_compressed,
        };
        return refuse(
            delivery,
            None,
            Refusal::Frame(too_large),
            started,
            config,
            publisher,
            metrics,
        )
        .await;
    }
    if let Some(key) = &config.signing_key
        && let Err(e) = key.verify("task", &delivery.body, delivery.header_str(headers::SIGNATURE))
    {
        return refuse(
            delivery,
            None,
            Refusal::Signature(e),
            started,
            config,
            publisher,
            metrics,
        )
        .await;
    }
    let task = match decode::<Task>(&delivery.body, &config.task_limits) {
        Ok(task) => task,
        Err(e) => return refuse(delivery, None, Refusal::Frame(e), started, config, publisher, metrics).await,
    };
    // Join the run's trace (W3C trace context from the scheduler). A missing
    // or malformed header costs the trace link, never the task.
    let trace = delivery.header_str(headers::TRACEPARENT).map(TraceParent::parse);
    let span = info_span!(
        "task",
        run = %task.run_id,
        step = %task.step,
        task = %task.task_id,
        attempt = task.attempt,
        trace_id = tracing::field::Empty,
        parent_span = tracing::field::Empty,
    );
    match &trace {
        Some(Ok(tp)) => {
            span.record("trace_id", tp.trace_id_hex());
            span.record("parent_span", tp.parent_id_hex());
            // For a tracing backend (when spans are exported): the step's
            // span is a child of the scheduler's task span.
            use opentelemetry::trace::TraceContextExt as _;
            use tracing_opentelemetry::OpenTelemetrySpanExt as _;
            let parent =
                opentelemetry::Context::new().with_remote_span_context(opentelemetry::trace::SpanContext::new(
                    opentelemetry::trace::TraceId::from_bytes(tp.trace_id),
                    opentelemetry::trace::SpanId::from_bytes(tp.parent_id),
                    opentelemetry::trace::TraceFlags::SAMPLED,
                    true,
                    opentelemetry::trace::TraceState::default(),
                ));
            let _ = span.set_parent(parent);
        }
        Some(Err(e)) => warn!(parent: &span, error = %e, "ignoring the task's trace context"),
        None => {}
    }
    async {
        if !task.pool.is_empty() && task.pool != pool {
            let refusal = Refusal::WrongPool {
                task: task.pool.clone(),
                queue: pool.to_string(),
            };
            return refuse(delivery, Some(&task), refusal, started, config, publisher, metrics).await;
        }
        let now = now_ms();
        if now > task.deadline_unix_ms {
            let refusal = Refusal::Expired {
                deadline_unix_ms: task.deadline_unix_ms,
                late_ms: now - task.deadline_unix_ms,
            };
            return refuse(delivery, Some(&task), refusal, started, config, publisher, metrics).await;
        }
        let guard = match shared.cancellations.start(&task) {
            Ok(guard) => guard,
            Err(reason) => {
                info!(%reason, "the task's run or step is cancelled; answering without running it");
                let mut result = answer(&task, config, started);
                result.status = TaskStatus::Cancelled;
                result.error = Some(format!("cancelled before it started: {reason}"));
                if publish_result(&result, &task.workflow, config, publisher, metrics).await
                    && let Err(e) = delivery.ack().await
                {
                    warn!(error = %e, "ack failed after the result was confirmed");
                }
                return;
            }
        };
        let store = match mount(delivery.header_str(headers::SNAPSHOT_HASH), &task, &config.snapshot_limits, cache, metrics) {
            Ok(store) => store,
            Err(refusal) => return refuse(delivery, Some(&task), refusal, started, config, publisher, metrics).await,
        };
        info!(redelivered = delivery.redelivered, "running step");
        let clock = std::time::Instant::now();
        let result = execute(&task, &store, config, started, &guard).await;
        drop(guard);
        let kind = match &task.spec.run {
            StepRun::Unsupported { .. } => "unsupported",
            known => known.kind(),
        };
        metrics
            .step_duration
            .get_or_create(&metrics::Kind { kind: kind.into() })
            .observe(clock.elapsed().as_secs_f64());
        if let (Some(model), Some(usage)) = (&result.model, &result.usage) {
            for (direction, n) in [("input", usage.input_tokens), ("output", usage.output_tokens)] {
                metrics
                    .llm_tokens
                    .get_or_create(&metrics::Tokens {
                        model: model.clone(),
                        direction: direction.into(),
                    })
                    .inc_by(n);
            }
        }
        info!(status = result.status.as_str(), ms = result.finished_unix_ms.saturating_sub(started), "step finished");
        if publish_result(&result, &task.workflow, config, publisher, metrics).await
            && let Err(e) = delivery.ack().await
        {
            warn!(error = %e, "ack failed after the result was confirmed; the task will be redelivered and its result applied once");
        }
    }
    .instrument(span)
    .await;
}

/// Verify the snapshot against its hash header and mount it read-only,
/// decoding once per content hash: the tasks that carry the same snapshot
/// share the cache's decoded copy.
fn mount(
    header: Option<&str>,
    task: &Task,
    limits: &Limits,
    cache: &SnapshotCache,
    metrics: &metrics::Metrics,
) -> Result<SnapshotStore, Refusal> {
    metrics.snapshot_bytes.observe(task.snapshot.len() as f64);
    let hash = ContentHash::of(&task.snapshot);
    let header = header.ok_or(Refusal::NoHash)?;
    if header != hash.to_hex() {
        return Err(Refusal::HashMismatch {
            header: header.to_string(),
            actual: hash.to_hex(),
        });
    }
    let cached = cache
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .get(&hash)
        .cloned();
    let snapshot = match cached {
        Some(snapshot) => snapshot,
        None => {
            let clock = std::time::Instant::now();
            let snapshot = Arc::new(decode::<Snapshot>(&task.snapshot, limits)?);
            metrics.snapshot_decode.observe(clock.elapsed().as_secs_f64());
            cache
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .put(hash, snapshot.clone());
            snapshot
        }
    };
    Ok(SnapshotStore::new(snapshot))
}

/// A failed result for `task`, to fill in.
fn answer(task: &Task, config: &WorkerConfig, started: u64) -> TaskResult {
    TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        step: task.step.clone(),
        attempt: task.attempt,
        status: TaskStatus::Failed,
        output: String::new(),
        error: None,
        started_unix_ms: started,
        finished_unix_ms: now_ms(),
        worker_id: config.worker_id.clone(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

/// Run the step and describe how it ended; `guard.stop` cancels it.
async fn execute(
    task: &Task,
    store: &SnapshotStore,
    config: &WorkerConfig,
    started: u64,
    guard: &control::Guard<'_>,
) -> TaskResult {
    let mut result = answer(task, config, started);
    let cancelled = || format!("cancelled while running: {}", guard.reason());
    // A step never runs past its task's deadline.
    let left = Duration::from_millis(task.deadline_unix_ms.saturating_sub(now_ms()));
    let timeout = task.spec.timeout.min(left);
    match &task.spec.run {
        StepRun::Command { argv, env } => {
            // One byte over the limit kept: a trailing newline, trimmed
            // below, does not count.
            let capture = CaptureLimits {
                stdout: config.capture.stdout.saturating_add(1),
                ..config.capture
            };
            let out = command::run(argv, env, timeout, capture, &config.sandbox, guard.stop.cancelled()).await;
            result.output = out.stdout.trim_end_matches(['\n', '\r']).to_string();
            let over = out.stdout_truncated || result.output.len() > config.capture.stdout;
            let stderr = out.stderr.trim_end();
            let with_stderr = |what: String| {
                if stderr.is_empty() {
                    what
                } else {
                    format!("{what}: {stderr}")
                }
            };
            (result.status, result.error) = match out.exit {
                // Never a cut output passed on as the step's: what reads it
                // would see data that is not what the step wrote.
                Exit::Success if over => (
                    TaskStatus::Failed,
                    Some(format!(
                        "the step wrote more than output_max_bytes ({} bytes) to stdout, its output; \
                         write large data to a file and print less",
                        config.capture.stdout
                    )),
                ),
                Exit::Success => (TaskStatus::Succeeded, None),
                Exit::Failure(why) => (TaskStatus::Failed, Some(with_stderr(why))),
                Exit::TimedOut(after) => (
                    TaskStatus::TimedOut,
                    Some(with_stderr(format!(
                        "timed out after {}",
                        courier_wire::humanize(after)
                    ))),
                ),
                Exit::NotStarted(why) => (TaskStatus::Failed, Some(why)),
                Exit::Cancelled => (TaskStatus::Cancelled, Some(cancelled())),
            };
        }
        StepRun::Echo { text } => {
            result.status = TaskStatus::Succeeded;
            result.output = text.clone();
        }
        StepRun::Unsupported { kind } => {
            // A newer scheduler's kind: failed (not refused, not dead-lettered),
            // so a retry may land on an upgraded worker.
            result.status = TaskStatus::Failed;
            result.error = Some(format!("this worker does not support step kind \"{kind}\"; upgrade it"));
        }
        StepRun::Agent(spec) => {
            let outcome =
                courier_agent::run_step(spec, store, timeout, &config.worker_env, guard.stop.cancelled()).await;
            result.status = outcome.status;
            result.output = outcome.output;
            result.error = match outcome.status {
                TaskStatus::Cancelled => Some(cancelled()),
                _ => outcome.error,
            };
            result.rate_limited_ms = outcome
                .rate_limited
                .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            result.model = outcome.model;
            result.usage = Some(outcome.usage);
            result.transcript = outcome.transcript;
            result.memory_updates = outcome.memory_updates;
        }
    }
    result.finished_unix_ms = now_ms();
    result
}

/// Refuse a task that cannot run: report it (when its ids are known) and
/// dead-letter it with the reason in its headers, so nothing is lost and the
/// worker keeps serving.
async fn refuse(
    delivery: Delivery,
    task: Option<&Task>,
    refusal: Refusal,
    started: u64,
    config: &WorkerConfig,
    publisher: &Publisher,
    metrics: &metrics::Metrics,
) {
    let reason = refusal.to_string();
    error!(%reason, message_id = ?delivery.message_id, "refusing task; dead-lettering it");
    // Only a task whose body was decoded (and, with a key, verified) is
    // answered, and only for a refusal about that body: the message's AMQP
    // ids and headers are anyone's to write, and a refusal must never speak
    // for a task it could not authenticate.
    let task = task.filter(|_| refusal.speaks_for_the_task(config.signing_key.is_some()));
    if let Some(task) = task {
        let result = TaskResult {
            task_id: task.task_id,
            run_id: task.run_id,
            step: task.step.clone(),
            attempt: task.attempt,
            status: TaskStatus::Rejected,
            output: String::new(),
            error: Some(format!("task rejected: {reason}")),
            started_unix_ms: started,
            finished_unix_ms: now_ms(),
            worker_id: config.worker_id.clone(),
            memory_updates: Vec::new(),
            model: None,
            usage: None,
            transcript: Vec::new(),
            rate_limited_ms: None,
        };
        if !publish_result(&result, &task.workflow, config, publisher, metrics).await {
            return;
        }
    }
    // Our own dead-lettering, so the reason travels in the headers; the broker's
    // (reject) would only say "rejected".
    let mut kept: Vec<(&'static str, Header)> = vec![
        (headers::DEAD_REASON, Header::Str(reason)),
        (headers::POOL, Header::Str(delivery.routing_key.clone())),
    ];
    for name in [headers::ATTEMPT, headers::SNAPSHOT_HASH, headers::SIGNATURE] {
        if let Some(value) = delivery.headers.get(name) {
            kept.push((name, value.clone()));
        }
    }
    let dead = config.names.dead();
    let outcome = publisher
        .publish(Outgoing {
            exchange: &dead,
            routing_key: &delivery.routing_key,
            body: &delivery.body,
            message_id: delivery.message_id.as_deref().unwrap_or_default(),
            correlation_id: delivery.correlation_id.as_deref().unwrap_or_default(),
            headers: kept,
        })
        .await;
    let settled = match outcome {
        Ok(()) => {
            metrics.dead_lettered.inc();
            delivery.ack().await
        }
        Err(e) => {
            warn!(error = %e, "cannot publish to the dead-letter queue; rejecting instead");
            delivery.reject().await
        }
    };
    if let Err(e) = settled {
        warn!(error = %e, "dead-lettering failed; the broker will redeliver the task");
    }
}

/// Encode a result of a step of `workflow`, with the status it travels
/// with. Each part of a result is bounded, but not how many parts an agent
/// step makes: a result over the task limits becomes a failure that says
/// why, so the task is answered all the same. Its stream, for the early abort
/// of incompressible messages, is its workflow and step (a foreach item's
/// step, not the item).
fn encodable(
    result: &TaskResult,
    workflow: &str,
    limits: &Limits,
) -> Result<(Vec<u8>, TaskStatus), courier_wire::WireError> {
    let step = result.step.split('[').next().unwrap_or_default();
    let encode = |result: &TaskResult| encode_message(result, limits, &[workflow, step]);
    match encode(result) {
        Ok(body) => Ok((body, result.status)),
        Err(e) => {
            warn!(error = %e, "the result is too large to send; sending a failure instead");
            let failure = TaskResult {
                status: TaskStatus::Failed,
                output: String::new(),
                error: Some(format!("the step's result could not be sent: {e}")),
                memory_updates: Vec::new(),
                transcript: Vec::new(),
                rate_limited_ms: None,
                ..result.clone()
            };
            Ok((encode(&failure)?, TaskStatus::Failed))
        }
    }
}

/// Publish a result of a step of `workflow` and wait for the broker's
/// confirm; `true` once confirmed.
async fn publish_result(
    result: &TaskResult,
    workflow: &str,
    config: &WorkerConfig,
    publisher: &Publisher,
    metrics: &metrics::Metrics,
) -> bool {
    let (body, status) = match encodable(result, workflow, &config.task_limits) {
        Ok(encoded) => encoded,
        Err(e) => {
            error!(error = %e, "cannot encode the result");
            return false;
        }
    };
    let exchange = config.names.results_exchange();
    let (task_id, run_id) = (result.task_id.to_string(), result.run_id.to_string());
    let mut sent_headers = vec![(headers::ATTEMPT, Header::Int(i64::from(result.attempt)))];
    if let Some(key) = &config.signing_key {
        sent_headers.push((headers::SIGNATURE, Header::Str(key.sign(&body))));
    }
    let outcome = publisher
        .publish(Outgoing {
            exchange: &exchange,
            routing_key: "results",
            body: &body,
            message_id: &task_id,
            correlation_id: &run_id,
            headers: sent_headers,
        })
        .await;
    match outcome {
        Ok(()) => {
            metrics
                .results
                .get_or_create(&metrics::Status {
                    status: status.as_str().into(),
                })
                .inc();
            true
        }
        Err(e) => {
            warn!(error = %e, "result not confirmed; leaving the task unacked for redelivery");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use courier_wire::{SizeKind, TranscriptEntry};
    use uuid::Uuid;

    use super::*;

    fn result() -> TaskResult {
        TaskResult {
            task_id: Uuid::nil(),
            run_id: Uuid::nil(),
            step: "s".into(),
            attempt: 1,
            status: TaskStatus::Succeeded,
            output: "done".into(),
            error: None,
            started_unix_ms: 1,
            finished_unix_ms: 2,
            worker_id: "w".into(),
            memory_updates: Vec::new(),
            model: Some("scripted/demo".into()),
            usage: None,
            transcript: Vec::new(),
            rate_limited_ms: None,
        }
    }

    #[test]
    fn tasks_carrying_the_same_snapshot_share_one_decoded_copy() {
        let snapshot = Snapshot {
            workflow: "wf".into(),
            soul: Some(courier_wire::Soul {
                id: "s".into(),
                body: "a persona. ".repeat(6_000),
                ..courier_wire::Soul::default()
            }),
            ..Snapshot::default()
        };
        let bytes = courier_wire::encode(&snapshot, &Limits::default()).unwrap();
        let hash = ContentHash::of(&bytes).to_hex();
        let task = Task {
            task_id: Uuid::now_v7(),
            run_id: Uuid::now_v7(),
            workflow: "wf".into(),
            step: "s".into(),
            attempt: 1,
            spec: courier_wire::StepSpec {
                timeout: Duration::from_secs(1),
                run: StepRun::Echo { text: String::new() },
            },
            upstream: BTreeMap::new(),
            deadline_unix_ms: u64::MAX,
            snapshot: bytes,
            pool: String::new(),
        };
        let cache: SnapshotCache = Mutex::new(lru::LruCache::new(NonZeroUsize::new(4).unwrap()));
        let metrics = metrics::Metrics::default();
        let mount = |header| mount(header, &task, &Limits::default(), &cache, &metrics);
        let (first, second) = (mount(Some(&hash)).unwrap(), mount(Some(&hash)).unwrap());
        assert_eq!(first.snapshot(), &snapshot);
        // One decoded copy, mounted by both: not a copy per task.
        assert!(std::ptr::eq(first.snapshot(), second.snapshot()));
        assert!(matches!(mount(None), Err(Refusal::NoHash)));
        let other = ContentHash::of(b"another snapshot").to_hex();
        assert!(matches!(mount(Some(&other)), Err(Refusal::HashMismatch { .. })));
    }

    #[test]
    fn a_result_within_the_limits_travels_as_it_is() {
        let (body, status) = encodable(&result(), "wf", &Limits::default()).unwrap();
        assert_eq!(status, TaskStatus::Succeeded);
        assert_eq!(decode::<TaskResult>(&body, &Limits::default()).unwrap(), result());
    }

    #[test]
    fn a_result_over_the_limits_becomes_a_failure_that_says_why() {
        // 100,000 tool calls' worth of transcript: small parts, too many of them.
        let mut big = result();
        big.transcript = vec![
            TranscriptEntry {
                role: "call".into(),
                content: "output({})".into(),
            };
            100_000
        ];
        let (body, status) = encodable(&big, "wf", &Limits::default()).unwrap();
        assert_eq!(status, TaskStatus::Failed);
        let sent = decode::<TaskResult>(&body, &Limits::default()).unwrap();
        let too_large = courier_wire::WireError::TooLarge {
            kind: "result",
            size: SizeKind::Decoded,
            limit: Limits::default().max_decompressed,
        };
        assert_eq!(
            sent.error.as_deref(),
            Some(format!("the step's result could not be sent: {too_large}").as_str())
        );
        assert_eq!(sent.status, TaskStatus::Failed);
        assert!(sent.transcript.is_empty() && sent.output.is_empty());
        assert_eq!(
            (sent.task_id, sent.attempt, sent.worker_id.as_str()),
            (big.task_id, 1, "w")
        );
    }
}
