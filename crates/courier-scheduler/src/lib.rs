//! Courier's scheduler: runs workflows as DAGs of tasks over RabbitMQ.
//!
//! It publishes ready steps as tasks (each with its snapshot), consumes
//! results and applies each exactly once, keeps run, step and task state in
//! SQLite or PostgreSQL, fires cron schedules, and serves the HTTP API.
//! Several schedulers may share one PostgreSQL database: all serve the API
//! and fire cron ticks (each tick once), one leads (see [`leader`]).
//!
//! **Invariant:** state changes and the tasks they dispatch are written in one
//! transaction (the `tasks` table is the outbox); publishing happens after, and
//! a task is marked published only once the broker confirmed it. A restart
//! republishes what was not confirmed, so no task is lost; a task published
//! twice yields a duplicate result, which is ignored.

pub mod api;
pub mod db;
pub mod engine;
pub mod leader;
pub mod metrics;
pub mod ops;
pub mod trace;
pub mod ui;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use courier_amqp::{AmqpError, Broker, Consumer, Header, Names, Outgoing, Publisher};
use courier_config::Config;
use courier_wire::{Limits, TaskResult, decode, headers};
use prometheus_client::registry::Registry;
use tokio::sync::Notify;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::db::Db;
use crate::engine::{Engine, EngineLimits, now_ms};
use crate::metrics::Metrics;

/// Everything the scheduler is told at start besides the config folder.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// Broker URL.
    pub amqp_url: String,
    /// Exchange and queue names.
    pub names: Names,
    /// Folder of the SQLite database (and `api.addr`).
    pub data_dir: PathBuf,
    /// A PostgreSQL database shared with other schedulers, instead of SQLite.
    pub database_url: Option<String>,
    /// Replicas of each quorum queue declared (`None`: every node).
    pub quorum_group_size: Option<u32>,
    /// RabbitMQ's management API, for the web UI's queues page.
    pub management_url: Option<String>,
    /// Address the HTTP API listens on (port 0 picks one; see `api.addr`).
    pub api_listen: SocketAddr,
    /// Size bounds on snapshots and tasks.
    pub limits: EngineLimits,
    /// Bounds on result frames.
    pub result_limits: Limits,
    /// Redeliveries a task queue allows.
    pub delivery_limit: u32,
    /// How long to keep trying to reach the broker before giving up.
    pub connect_timeout: Duration,
    /// When set, every task is signed with it and every result must be.
    pub signing_key: Option<courier_wire::SigningKey>,
    /// When set, `/api/...` and `/metrics` need it as a bearer token.
    pub api_token: Option<String>,
    /// Where `/metrics` and `/healthz` are also served without the token.
    pub metrics_listen: Option<SocketAddr>,
}

/// Results applied per transaction at most.
const RESULT_BATCH: usize = 512;
/// Outbox rows published per round at most.
const OUTBOX_BATCH: usize = 2048;
/// Retry delays are rounded up to this grain, which bounds the number of
/// delay queues.
const DELAY_GRAIN_MS: i64 = 100;
/// The longest delay a task is published with (a day and an hour: more than
/// any backoff or provider pause).
const MAX_DELAY_MS: i64 = 25 * 3600 * 1000;
/// A delay queue the broker refused is tried again after this long.
const DELAY_RETRY: Duration = Duration::from_secs(10);
/// A delay queue is declared again after this long (it expires when unused).
const DELAY_REDECLARE: Duration = Duration::from_secs(20);

/// State shared by the API and the loops.
#[derive(Debug)]
pub struct Shared {
    engine: Arc<Engine>,
    metrics: Metrics,
    registry: Registry,
    broker_connected: AtomicBool,
    /// This scheduler leads (publishes, applies results, keeps the clock).
    leading: AtomicBool,
    outbox: Notify,
    /// Wakes the control publisher (a cancellation was committed).
    controls: Notify,
    /// The results queue was read to its end since the last connection:
    /// only then may the clock judge deadlines (results may be waiting).
    results_drained: AtomicBool,
}

impl Shared {
    /// Count what an engine pass did.
    pub(crate) fn count(&self, applied: &engine::Applied) {
        let m = &self.metrics;
        m.tasks_retried.inc_by(applied.retried as u64);
        m.runs_finished.inc_by(applied.finished_runs as u64);
        m.runs_cancelled.inc_by(applied.cancelled_runs as u64);
        m.memory_not_written.inc_by(applied.memory_not_written as u64);
        for (model, input, output, cost) in &applied.spend {
            for (direction, n) in [("input", *input), ("output", *output)] {
                m.llm_tokens
                    .get_or_create(&metrics::Tokens {
                        model: model.clone(),
                        direction: direction.into(),
                    })
                    .inc_by(n);
            }
            if let Some(cost) = cost {
                m.llm_cost
                    .get_or_create(&metrics::Model { model: model.clone() })
                    .inc_by(*cost);
            }
        }
    }
}

/// Errors that stop the scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    /// The data folder or database could not be used.
    #[error("database {store}: {source}")]
    Db {
        /// The SQLite file, or the PostgreSQL URL without its password.
        store: String,
        #[source]
        source: db::OpenError,
    },
    /// A file in the data folder could not be written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The API address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The broker stayed unreachable.
    #[error(transparent)]
    Broker(#[from] AmqpError),
    /// The database file was deleted or replaced under the running scheduler.
    #[error(
        "the database {path} was deleted or replaced while the scheduler ran; stopping instead of serving from a file nobody can open again (restore it, or restart to start afresh)"
    )]
    DataGone { path: PathBuf },
}

/// A client's identifier (a run, step or workflow name), quoted for an
/// error message: at most its first 64 characters (a run ID has 36), so an
/// answer never echoes a long input back, and quoted as Rust quotes a
/// string, so a control character (a NUL, a newline) shows escaped.
pub(crate) fn quoted(id: &str) -> String {
    match id.char_indices().nth(64) {
        Some((cut, _)) => {
            let shown = format!("{:?}", &id[..cut]);
            format!("{}…\" ({} bytes in all)", &shown[..shown.len() - 1], id.len())
        }
        None => format!("{id:?}"),
    }
}

/// Run until `shutdown` is cancelled.
///
/// # Errors
/// [`SchedulerError`]: the database, the API address, or a broker that stays
/// unreachable past `connect_timeout`.
pub async fn run(config: Config, sc: SchedulerConfig, shutdown: CancellationToken) -> Result<(), SchedulerError> {
    let io = |path: PathBuf| move |source| SchedulerError::Io { path, source };
    std::fs::create_dir_all(&sc.data_dir).map_err(io(sc.data_dir.clone()))?;
    let db_path = sc.data_dir.join("courier.db");
    let store = sc
        .database_url
        .as_deref()
        .map_or_else(|| db_path.display().to_string(), db::redact);
    // PostgreSQL's client blocks: never on the runtime's threads.
    let (data_dir, url) = (sc.data_dir.clone(), sc.database_url.clone());
    let db = tokio::task::spawn_blocking(move || Db::open_store(&data_dir, url.as_deref()))
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
        .map_err(|source| SchedulerError::Db {
            store: store.clone(),
            source,
        })?;
    let engine = Arc::new(Engine::new(config, db, sc.limits.clone()));
    let metrics = Metrics::default();
    metrics.initialize(engine.config().store.model_ids());
    let mut registry = Registry::default();
    metrics.register(&mut registry);
    let shared = Arc::new(Shared {
        engine,
        metrics,
        registry,
        broker_connected: AtomicBool::new(false),
        leading: AtomicBool::new(false),
        outbox: Notify::new(),
        controls: Notify::new(),
        results_drained: AtomicBool::new(false),
    });

    let (listener, addr) = bind(sc.api_listen).await?;
    let addr_file = sc.data_dir.join("api.addr");
    std::fs::write(&addr_file, addr.to_string()).map_err(io(addr_file))?;
    info!(%addr, authenticated = sc.api_token.is_some(), "HTTP API listening");
    let bounds = courier_http::Bounds::default();
    let mut servers = JoinSet::new();
    servers.spawn(courier_http::serve(
        listener,
        api::router(
            shared.clone(),
            sc.api_token.clone(),
            addr.ip().is_loopback(),
            ui::Operations {
                amqp_url: sc.amqp_url.clone(),
                names: sc.names.clone(),
                management_url: sc.management_url.clone(),
            },
        ),
        bounds,
        shutdown.clone(),
    ));
    if let Some(listen) = sc.metrics_listen {
        let (listener, addr) = bind(listen).await?;
        info!(%addr, "metrics listening (no token)");
        servers.spawn(courier_http::serve(
            listener,
            api::metrics_router(shared.clone()),
            bounds,
            shutdown.clone(),
        ));
    }
    let gone = Arc::new(std::sync::Mutex::new(None));
    let watchdog = sc
        .database_url
        .is_none()
        .then(|| tokio::spawn(watch_database(db_path, shutdown.clone(), gone.clone())));
    // Every scheduler fires cron ticks; the database lets one run start per tick.
    let mut cron = JoinSet::new();
    for wf in shared.engine.config().workflows.values() {
        if let Some(schedule) = &wf.schedule {
            cron.spawn(cron_loop(
                shared.clone(),
                wf.name.clone(),
                schedule.cron.clone(),
                shutdown.clone(),
            ));
        }
    }
    let leadership = leader::campaign(
        sc.database_url.clone(),
        {
            let shared = shared.clone();
            move || {
                shared.outbox.notify_one();
                shared.controls.notify_one();
            }
        },
        shutdown.clone(),
    );

    let mut outcome = Ok(());
    let mut standing_by = false;
    while !shutdown.is_cancelled() {
        let leads = leadership.leads();
        shared.engine.set_publishing(leads);
        shared.leading.store(leads, Ordering::Relaxed);
        if !leads {
            if leadership.lost() {
                error!("the leadership thread died; stopping (restart this scheduler)");
                shutdown.cancel();
                break;
            }
            if !standing_by {
                info!("another scheduler leads: serving the API and waiting to lead");
                standing_by = true;
            }
            tokio::select! {
                () = tokio::time::sleep(leader::POLL / 2) => {}
                () = shutdown.cancelled() => break,
            }
            continue;
        }
        standing_by = false;
        // The lead ends when its lease does (the lock's connection failed or
        // stopped answering), or at shutdown.
        let lead = shutdown.child_token();
        let watcher = tokio::spawn({
            let (leadership, lead) = (leadership.clone(), lead.clone());
            async move {
                while leadership.leads() {
                    tokio::time::sleep(leader::POLL / 2).await;
                }
                lead.cancel();
            }
        });
        outcome = lead_while(&shared, &sc, &store, &lead).await;
        watcher.abort();
        if outcome.is_err() {
            shutdown.cancel();
        }
    }
    shared.leading.store(false, Ordering::Relaxed);
    cron.shutdown().await;
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    while servers.join_next().await.is_some() {}
    info!("scheduler stopped");
    if let Some(gone) = gone.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
        return Err(gone);
    }
    outcome
}

/// The leader's work until `lead` is cancelled: make runs started under an
/// older config consistent, keep the clock, publish and apply results
/// through the broker (reconnecting as needed).
///
/// # Errors
/// The database failed at the start, or the broker stayed unreachable past
/// `connect_timeout`.
async fn lead_while(
    shared: &Arc<Shared>,
    sc: &SchedulerConfig,
    store: &str,
    lead: &CancellationToken,
) -> Result<(), SchedulerError> {
    // Dependency counts were taken from the config of each run's submit. A
    // database that just came back (a restart) may fail the first attempt:
    // tried again each second, for half a minute.
    let mut attempts = 0;
    loop {
        let engine = shared.engine.clone();
        match tokio::task::spawn_blocking(move || engine.reconcile()).await {
            Ok(Ok(applied)) => {
                shared.count(&applied);
                // A run it failed told its workers to stop.
                shared.controls.notify_one();
                if applied.dispatched > 0 {
                    info!(
                        dispatched = applied.dispatched,
                        "steps made ready by the current config started"
                    );
                    shared.outbox.notify_one();
                }
                break;
            }
            Ok(Err(source)) if attempts >= 30 => {
                return Err(SchedulerError::Db {
                    store: store.to_owned(),
                    source: db::OpenError::Store(source),
                });
            }
            Ok(Err(e)) => warn!(error = %e, "cannot reconcile open runs yet; trying again"),
            Err(e) => error!(error = %e, "reconciling panicked"),
        }
        attempts += 1;
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = lead.cancelled() => return Ok(()),
        }
    }
    let clock = tokio::spawn(clock_loop(shared.clone(), lead.clone()));
    let pools = shared.engine.pools();
    let mut outcome = Ok(());
    while !lead.is_cancelled() {
        let broker = tokio::select! {
            b = Broker::connect_with_retry(&sc.amqp_url, sc.names.clone(), "courier-scheduler", sc.connect_timeout) => b,
            () = lead.cancelled() => break,
        };
        let broker = match broker {
            Ok(b) => b.with_quorum_group_size(sc.quorum_group_size),
            Err(e) => {
                outcome = Err(e.into());
                break;
            }
        };
        // A connection that fails under an operation lapin never resolves
        // ends its work here (see `Broker::serve`).
        let served = broker
            .serve(serve(&broker, shared, &pools, sc, lead), || lead.is_cancelled())
            .await;
        match served {
            Ok(()) => {}
            Err(e) => {
                warn!(error = %e, "lost the broker; reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
        shared.broker_connected.store(false, Ordering::Relaxed);
        shared.results_drained.store(false, Ordering::Relaxed);
        let _ = broker.close().await;
    }
    clock.abort();
    outcome
}

async fn bind(addr: SocketAddr) -> Result<(tokio::net::TcpListener, SocketAddr), SchedulerError> {
    let listen = |source| SchedulerError::Listen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(listen)?;
    let local = listener.local_addr().map_err(listen)?;
    Ok((listener, local))
}

/// Stop the scheduler when its database file disappears or is replaced (the
/// data folder deleted under it): SQLite would go on writing to a file no
/// restart can open, and every run would be lost.
async fn watch_database(
    path: PathBuf,
    shutdown: CancellationToken,
    gone: Arc<std::sync::Mutex<Option<SchedulerError>>>,
) {
    use std::os::unix::fs::MetadataExt;
    let identity = |path: &std::path::Path| std::fs::metadata(path).ok().map(|m| (m.dev(), m.ino()));
    let Some(original) = identity(&path) else {
        return;
    };
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            () = shutdown.cancelled() => return,
        }
        if identity(&path) != Some(original) {
            let error = SchedulerError::DataGone { path: path.clone() };
            error!(error = %error, "database gone");
            *gone.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(error);
            shutdown.cancel();
            return;
        }
    }
}

/// Publish the outbox and apply results on one connection until shutdown
/// (`Ok`) or a broker failure (`Err`).
async fn serve(
    broker: &Broker,
    shared: &Arc<Shared>,
    pools: &[String],
    sc: &SchedulerConfig,
    shutdown: &CancellationToken,
) -> Result<(), AmqpError> {
    broker.declare_topology(pools, sc.delivery_limit).await?;
    let publisher = broker.publisher(courier_amqp::DEFAULT_PUBLISH_WINDOW).await?;
    let prefetch = u16::try_from(RESULT_BATCH).unwrap_or(u16::MAX);
    let mut consumer = broker
        .consumer(&broker.names().results_queue(), prefetch, "courier-scheduler")
        .await?;
    shared.broker_connected.store(true, Ordering::Relaxed);
    shared.results_drained.store(false, Ordering::Relaxed);
    info!(pools = ?pools, "connected to the broker; resuming open runs");
    shared.outbox.notify_one();
    let names = broker.names().clone();
    // Separate tasks, so publishing and applying results proceed in parallel;
    // the first to stop (a broker failure) stops the other.
    let mut loops = JoinSet::new();
    let outbox = loops.spawn({
        let shared = shared.clone();
        let key = sc.signing_key.clone();
        let broker = broker.clone();
        let publisher = publisher.clone();
        async move { outbox_loop(&shared, &broker, &publisher, &names, key).await }
    });
    let controls = loops.spawn({
        let shared = shared.clone();
        let key = sc.signing_key.clone();
        let publisher = publisher.clone();
        let names = broker.names().clone();
        async move {
            loop {
                publish_controls(&shared, &publisher, &names, key.as_ref()).await?;
                tokio::select! {
                    () = shared.controls.notified() => {}
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    });
    // Not one of `loops`: a failed read of a queue's count does not end the
    // connection's work (the results loop would be stopped mid-batch); the
    // loops that own the connection notice its failure.
    // Stopped with this connection's work, even when that is dropped.
    let gate = tokio_util::task::AbortOnDropHandle::new(tokio::spawn({
        let shared = shared.clone();
        let broker = broker.clone();
        async move { gate_loop(&shared, &broker).await }
    }));
    let mut intake = ResultIntake {
        limits: sc.result_limits,
        signing_key: sc.signing_key.clone(),
        names: broker.names().clone(),
        dead_channel: None,
    };
    loops.spawn({
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let broker = broker.clone();
        async move {
            let r = tokio::select! {
                r = results_loop(&shared, &broker, &mut consumer, &mut intake) => r,
                () = shutdown.cancelled() => Ok(()),
            };
            let _ = consumer.close().await;
            if let Some(dead_channel) = intake.dead_channel.take() {
                let _ = dead_channel.close().await;
            }
            r
        }
    });
    let mut watch = broker
        .consumer(&broker.names().dead_watch(), DEAD_WATCH_PREFETCH, "courier-scheduler")
        .await?;
    loops.spawn({
        let shared = shared.clone();
        let shutdown = shutdown.clone();
        let (limits, key, delivery_limit) = (sc.limits.task, sc.signing_key.clone(), sc.delivery_limit);
        let names = broker.names().clone();
        async move {
            let r = tokio::select! {
                r = dead_watch_loop(&shared, &mut watch, (limits, key), &names, delivery_limit) => r,
                () = shutdown.cancelled() => Ok(()),
            };
            let _ = watch.close().await;
            r
        }
    });
    let result = tokio::select! {
        Some(joined) = loops.join_next() => joined.unwrap_or(Err(AmqpError::Closed)),
        () = shutdown.cancelled() => Ok(()),
    };
    outbox.abort();
    controls.abort();
    gate.abort();
    if result.is_err() {
        loops.abort_all();
    }
    // On shutdown the results loop stops by itself and closes its channel;
    // close the publisher's too, before the caller closes the connection (a
    // channel closed by its last handle being dropped would race that close).
    while loops.join_next().await.is_some() {}
    let _ = publisher.close().await;
    result
}

/// Publish outbox tasks, confirmed, then mark them published: tasks due now
/// to their pool, retries not yet due to a delay queue for the time left.
/// Publishing is pipelined: new tasks go out while earlier ones wait for the
/// broker's confirms (at most [`OUTBOX_BATCH`] unconfirmed), and what is
/// confirmed is marked in one transaction per wake-up. After a full batch
/// (a backlog), the next read waits for every confirm: a read returns the
/// unconfirmed rows too, and re-reading them would cost more than waiting.
async fn outbox_loop(
    shared: &Arc<Shared>,
    broker: &Broker,
    publisher: &Publisher,
    names: &Names,
    signing_key: Option<courier_wire::SigningKey>,
) -> Result<(), AmqpError> {
    let tasks_exchange = Arc::new(names.tasks_exchange());
    let mut delays = DelayQueues::default();
    let mut publishing: JoinSet<(String, Result<(), AmqpError>)> = JoinSet::new();
    // Published, not yet marked: never sent again meanwhile.
    let mut unconfirmed: std::collections::HashSet<String> = Default::default();
    let mut confirmed: Vec<String> = Vec::new();
    let mut failure = None;
    let mut read = true;
    let mut last_full = false;
    let mut seen = 0;
    // What the last connection published unconfirmed is in the database.
    shared.engine.outbox_incomplete();
    loop {
        while let Some(joined) = publishing.try_join_next() {
            settle(joined, &mut confirmed, &mut failure);
        }
        if failure.is_some() {
            // Nothing more goes out; what is in flight is settled (each
            // publish waits for its confirm at most its timeout), so what
            // the broker took is marked and not published again.
            while let Some(joined) = publishing.join_next().await {
                settle(joined, &mut confirmed, &mut failure);
            }
        }
        if !confirmed.is_empty() {
            let ids = std::mem::take(&mut confirmed);
            for id in &ids {
                unconfirmed.remove(id);
            }
            let published = ids.len() as u64;
            let engine = shared.engine.clone();
            let marked = tokio::task::spawn_blocking(move || engine.with_db(|db| db.mark_published(&ids))).await;
            match &marked {
                Ok(Ok(())) => {}
                Ok(Err(e)) => error!(error = %e, "cannot mark tasks published; they will be published again"),
                Err(e) => error!(error = %e, "marking tasks published panicked"),
            }
            if !matches!(marked, Ok(Ok(()))) {
                // Still unpublished in the database: read them there.
                shared.engine.outbox_incomplete();
            }
            shared.metrics.tasks_published.inc_by(published);
        }
        if let Some(e) = failure.take() {
            return Err(e);
        }
        // Read again when told (new tasks, a wake-up) or while a backlog is
        // left, once there is room: the tasks committed since the last read,
        // as the engine kept them, or else the database.
        if read && room(last_full, unconfirmed.len()) {
            // The gates' dispatches this read can see (see `outbox_empty`).
            seen = shared.engine.gates().seq();
            let fresh = shared.engine.take_fresh(OUTBOX_BATCH - unconfirmed.len());
            let from_db = fresh.is_none();
            let due = if let Some((fresh, more)) = fresh {
                Ok((fresh, more))
            } else {
                let engine = shared.engine.clone();
                // Lent to the read, which leaves those out, and given back.
                let skip = std::mem::take(&mut unconfirmed);
                // Taken now: should this loop be stopped while its read waits
                // for the database, the read speaks for nothing.
                let generation = engine.outbox_generation();
                let (due, skip) = tokio::task::spawn_blocking(move || {
                    let read = engine.with_db(|db| {
                        let small = |wf: &str| engine.config().workflows.get(wf).is_some_and(engine::small);
                        let (rows, full) = db.unpublished_tasks(OUTBOX_BATCH, &skip, &small)?;
                        // Under the database's lock, so no commit comes
                        // between the read and what the engine keeps.
                        let current = engine.outbox_read(&rows, full, generation);
                        Ok::<_, db::DbError>(if current { (rows, full) } else { (Vec::new(), false) })
                    });
                    (read.map(|(rows, full)| (with_bodies(&engine, rows), full)), skip)
                })
                .await
                .map_err(|_| AmqpError::Closed)?;
                unconfirmed = skip;
                due
            };
            // The time after the read, not before: the read can wait for the
            // database behind busy transactions, and a task committed
            // meanwhile would look due later than now and go through a delay
            // queue (seen at 3,000 runs/s: first attempts delayed 100-400 ms).
            let now = now_ms();
            let (due, more) = match due {
                Ok((due, more)) => {
                    // A full read leaves tasks out: read again once every
                    // confirm is in, as the next read would return those
                    // not yet confirmed too.
                    last_full = from_db && more;
                    (due, more)
                }
                Err(e) => {
                    error!(error = %e, "cannot read the outbox");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            shared
                .metrics
                .outbox_pending
                .set(i64::try_from(due.len() + unconfirmed.len()).unwrap_or(i64::MAX));
            let mut sent = 0_usize;
            // Small runs' tasks first: a batch of a wide run's is not
            // published ahead of them.
            let mut due = due;
            due.sort_by_key(|(task, _)| !task.lane);
            for (task, body) in due {
                // A refused delay queue leaves the task in the outbox, to be
                // read there again.
                let Some((exchange, routing_key)) = delays.route(broker, names, &tasks_exchange, &task, now).await
                else {
                    shared.engine.outbox_incomplete();
                    continue;
                };
                let to_queue = Arc::ptr_eq(&exchange, &tasks_exchange);
                let shared = shared.clone();
                let publisher = publisher.clone();
                let signature = signing_key.as_ref().map(|k| k.sign(&body));
                unconfirmed.insert(task.task_id.clone());
                sent += 1;
                publishing.spawn(async move {
                    let mut headers = vec![
                        (headers::ATTEMPT, Header::Int(i64::from(task.attempt))),
                        (headers::SNAPSHOT_HASH, Header::Str(task.snapshot_hash.clone())),
                    ];
                    if let Some(signature) = signature {
                        headers.push((headers::SIGNATURE, Header::Str(signature)));
                    }
                    headers.push((headers::TRACEPARENT, Header::Str(traceparent(&task))));
                    let outgoing = Outgoing {
                        exchange: &exchange,
                        routing_key: &routing_key,
                        body: &body,
                        message_id: &task.task_id,
                        correlation_id: &task.run_id,
                        headers,
                    };
                    let outcome = publisher.publish_with_priority(outgoing, Some(task.priority)).await;
                    // Confirmed: a quorum queue counts it from now on.
                    if outcome.is_ok() {
                        shared.engine.gates().sent(&task.route(), to_queue);
                    }
                    (task.task_id, outcome)
                });
            }
            // A backlog is read again once there is room; a batch that sent
            // nothing (its delay queues were refused) waits for a wake-up.
            read = more && sent > 0;
        }
        if publishing.is_empty() && unconfirmed.is_empty() {
            shared.metrics.outbox_pending.set(0);
            if !read {
                // Nothing is left to publish: what the gates count as
                // unpublished was cancelled before it went.
                shared.engine.gates().outbox_empty(seen);
            }
        }
        // Wait for a confirm, new tasks, or a second (tasks another
        // scheduler wrote, delay queues refused a while ago).
        if read && room(last_full, unconfirmed.len()) {
            continue;
        }
        tokio::select! {
            Some(joined) = publishing.join_next() => settle(joined, &mut confirmed, &mut failure),
            () = shared.outbox.notified() => read = true,
            () = tokio::time::sleep(Duration::from_secs(1)) => read = true,
        }
    }
}

/// How often the broker's count of a pool's queue is read while its gate is
/// shut or steps wait at it.
const GATE_READ: Duration = Duration::from_millis(5);

/// The longest between reads of a queue's count that does not move.
const GATE_READ_MAX: Duration = Duration::from_millis(100);

/// Keep the pools' gates (`engine::gate`) true to the broker: while a gate
/// is shut or holds steps, read its queue's count every [`GATE_READ`] (up
/// to [`GATE_READ_MAX`] while the counts do not move), and admit the steps
/// waiting at a gate that opened. A failed read is tried again; it does not
/// end the connection's other loops.
async fn gate_loop(shared: &Arc<Shared>, broker: &Broker) {
    let gates = shared.engine.gates();
    let mut gauge = None;
    // The counts last read, and how long to wait before the next read:
    // longer while they do not move (a pool without workers), up to
    // GATE_READ_MAX.
    let mut last: std::collections::HashMap<String, u32> = Default::default();
    // Pools whose count could not be read (warned once, until read again):
    // when to try again, and the wait after that (doubling up to
    // GATE_READ_MAX, a new channel each time), apart from the other pools'.
    let mut unread: std::collections::HashMap<String, (tokio::time::Instant, Duration)> = Default::default();
    let mut pause = GATE_READ;
    loop {
        let due = gates.to_read();
        if due.is_empty() {
            last.clear();
            tokio::select! {
                () = gates.shutting() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        let (mut opened, mut moved) = (false, false);
        let now = tokio::time::Instant::now();
        for (pool, before) in due {
            if unread.get(&pool).is_some_and(|(next, _)| *next > now) {
                continue;
            }
            let read = async {
                let gauge = match &mut gauge {
                    Some(gauge) => gauge,
                    None => gauge.insert(broker.gauge().await?),
                };
                gauge.depth(&broker.names().task_queue(&pool)).await
            };
            match read.await {
                Ok((ready, _)) => {
                    if unread.remove(&pool).is_some() {
                        info!(pool = %pool, "the pool's queue length is read again: its gate counts again");
                    }
                    opened |= gates.observed(&pool, ready, before);
                    moved |= last.insert(pool, ready) != Some(ready);
                }
                Err(e) => {
                    // The broker closes the channel on a failed declare.
                    gauge = None;
                    opened |= gates.unread(&pool);
                    // Once per failing spell, not every read.
                    let wait = match unread.get(&pool) {
                        Some((_, wait)) => (*wait * 2).min(GATE_READ_MAX),
                        None => {
                            warn!(pool = %pool, error = %e, "cannot read a pool's queue length: its gate counts only unconfirmed tasks until a read succeeds");
                            GATE_READ
                        }
                    };
                    unread.insert(pool, (now + wait, wait));
                }
            }
        }
        if opened {
            let engine = shared.engine.clone();
            match tokio::task::spawn_blocking(move || engine.admit()).await {
                Ok(Ok(dispatched)) => {
                    if dispatched > 0 {
                        shared.outbox.notify_one();
                    }
                }
                Ok(Err(e)) => error!(error = %e, "cannot admit the steps waiting at a pool's gate"),
                Err(e) => error!(error = %e, "admission panicked"),
            }
        }
        pause = if opened || moved {
            GATE_READ
        } else {
            (pause * 2).min(GATE_READ_MAX)
        };
        tokio::time::sleep(pause).await;
    }
}

/// The delay queues an outbox loop declared, and those the broker refused,
/// with when.
#[derive(Default)]
struct DelayQueues {
    declared: std::collections::HashMap<(String, i64), tokio::time::Instant>,
    refused: std::collections::HashMap<(String, i64), tokio::time::Instant>,
}

impl DelayQueues {
    /// Where `task` goes at `now`: its pool (or its lane) when due, else a
    /// delay queue for the time left, back to the same when it expires (declared first if not lately); `None` while that
    /// queue's declaration is refused (tried again after [`DELAY_RETRY`]).
    async fn route(
        &mut self,
        broker: &Broker,
        names: &Names,
        exchange: &Arc<String>,
        task: &db::OutboxTask,
        now: i64,
    ) -> Option<(Arc<String>, String)> {
        // Delays are bounded by the workflow's max_backoff (at most a day)
        // and the provider pause cap; RabbitMQ refuses a TTL of 2^32 ms.
        let wait = (task.not_before_ms - now).min(MAX_DELAY_MS);
        let route = task.route();
        if wait < DELAY_GRAIN_MS {
            return Some((exchange.clone(), route.into_owned()));
        }
        let delay = (wait + DELAY_GRAIN_MS - 1) / DELAY_GRAIN_MS * DELAY_GRAIN_MS;
        let ttl = u64::try_from(delay).unwrap_or(0);
        let key = (route.into_owned(), delay);
        if self.declared.get(&key).is_none_or(|at| at.elapsed() >= DELAY_REDECLARE) {
            if self.refused.get(&key).is_some_and(|at| at.elapsed() < DELAY_RETRY) {
                return None;
            }
            if let Err(e) = broker.declare_delay(&key.0, ttl).await {
                error!(task = %task.task_id, error = %e, "cannot declare the delay queue; the task stays in the outbox");
                self.refused.insert(key, tokio::time::Instant::now());
                return None;
            }
            self.declared.insert(key.clone(), tokio::time::Instant::now());
        }
        // The default exchange routes to the queue of that name.
        Some((Arc::new(String::new()), names.delay_queue(&key.0, ttl)))
    }
}

/// Whether the outbox may be read: after a full batch (a backlog), once every
/// task is confirmed; otherwise while fewer than [`OUTBOX_BATCH`] are not.
fn room(last_full: bool, unconfirmed: usize) -> bool {
    if last_full {
        unconfirmed == 0
    } else {
        unconfirmed < OUTBOX_BATCH
    }
}

/// Sort out one finished publish: confirmed, or the failure that ends the
/// outbox loop (the task stays in the outbox). A publish that panicked
/// ends it too: its task is not known here, and a new loop starts with
/// nothing unconfirmed.
fn settle(
    joined: Result<(String, Result<(), AmqpError>), tokio::task::JoinError>,
    confirmed: &mut Vec<String>,
    failure: &mut Option<AmqpError>,
) {
    match joined {
        Ok((id, Ok(()))) => confirmed.push(id),
        Ok((id, Err(e))) => {
            warn!(task = %id, error = %e, "task not confirmed; it stays in the outbox");
            *failure = Some(e);
        }
        Err(e) => {
            error!(error = %e, "publish task panicked; starting the outbox again");
            *failure = Some(AmqpError::Closed);
        }
    }
}

/// Publish queued cancellations to the control stream (signed with the
/// key), confirmed, then mark them published. Every worker reads the stream,
/// including workers that start later.
async fn publish_controls(
    shared: &Arc<Shared>,
    publisher: &Publisher,
    names: &Names,
    signing_key: Option<&courier_wire::SigningKey>,
) -> Result<(), AmqpError> {
    let engine = shared.engine.clone();
    let rows = match tokio::task::spawn_blocking(move || engine.with_db(|db| db.unpublished_controls(256))).await {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => {
            error!(error = %e, "cannot read queued cancellations");
            return Ok(());
        }
        Err(_) => return Err(AmqpError::Closed),
    };
    if rows.is_empty() {
        return Ok(());
    }
    let stream = names.control();
    let mut done = Vec::with_capacity(rows.len());
    for row in rows {
        let message = courier_wire::Control::Cancel {
            run_id: uuid::Uuid::parse_str(&row.run_id).unwrap_or_default(),
            step: row.step.clone(),
            reason: row.reason.clone(),
        };
        let body = match courier_wire::encode(&message, &Limits::default()) {
            Ok(body) => body,
            Err(e) => {
                error!(error = %e, run = %row.run_id, "cannot encode a cancellation; dropping it");
                done.push(row.id);
                continue;
            }
        };
        let mut sent = Vec::new();
        if let Some(key) = signing_key {
            sent.push((headers::SIGNATURE, Header::Str(key.sign(&body))));
        }
        publisher
            .publish(Outgoing {
                exchange: "",
                routing_key: &stream,
                body: &body,
                message_id: &format!("cancel-{}", row.id),
                correlation_id: &row.run_id,
                headers: sent,
            })
            .await?;
        info!(run = %row.run_id, step = row.step.as_deref().unwrap_or(""), "cancellation sent to the workers");
        done.push(row.id);
    }
    let engine = shared.engine.clone();
    match tokio::task::spawn_blocking(move || engine.with_db(|db| db.mark_controls_published(&done))).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "cannot mark cancellations sent; they will be sent again"),
        Err(e) => error!(error = %e, "marking cancellations sent panicked"),
    }
    Ok(())
}

/// Every half second: run timeouts, lost tasks, and limits that ease with
/// time (a rolling minute, a provider's pause).
async fn clock_loop(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            () = shutdown.cancelled() => return,
        }
        let engine = shared.engine.clone();
        // Deadlines are judged only once the results waiting in the queue
        // (after a restart or an outage) have been applied.
        let expire = shared.broker_connected.load(Ordering::Relaxed) && shared.results_drained.load(Ordering::Relaxed);
        match tokio::task::spawn_blocking(move || engine.tick(expire)).await {
            Ok(Ok(applied)) => {
                shared.count(&applied);
                if applied.dispatched > 0 {
                    shared.outbox.notify_one();
                }
                if applied.cancelled_runs > 0 {
                    shared.controls.notify_one();
                }
            }
            Ok(Err(e)) => error!(error = %e, "the clock's pass failed; trying again"),
            Err(e) => error!(error = %e, "the clock's pass panicked"),
        }
    }
}

/// The task's W3C trace context: the run's trace, the task as parent span.
fn traceparent(task: &db::OutboxTask) -> String {
    let id = |s: &str| uuid::Uuid::parse_str(s).unwrap_or_default();
    courier_wire::TraceParent::for_task(id(&task.run_id), id(&task.task_id)).to_string()
}

/// Pair outbox rows with their encoded tasks. A task that cannot be built any
/// more (its workflow or step was removed from the config before a restart)
/// fails its step through the normal result path, so the run ends.
fn with_bodies(engine: &Engine, rows: Vec<db::OutboxTask>) -> Vec<engine::ReadyTask> {
    let mut ready = Vec::with_capacity(rows.len());
    let mut failed = Vec::new();
    for mut row in rows {
        match engine.task_body(&row) {
            // A task built again carries the snapshot of now.
            Ok((body, hash)) => {
                row.snapshot_hash = hash;
                ready.push((row, body));
            }
            Err(e) => {
                error!(task = %row.task_id, step = %row.step, error = %e, "cannot rebuild task; failing its step");
                failed.push(engine::scheduler_result(
                    uuid::Uuid::parse_str(&row.task_id).unwrap_or_default(),
                    uuid::Uuid::parse_str(&row.run_id).unwrap_or_default(),
                    row.step.clone(),
                    row.attempt,
                    courier_wire::TaskStatus::Rejected,
                    format!("cannot dispatch: {e}"),
                ));
            }
        }
    }
    if !failed.is_empty()
        && let Err(e) = engine.apply(&failed)
    {
        error!(error = %e, "cannot record undispatchable tasks");
    }
    ready
}

/// What the results loop needs besides the engine.
struct ResultIntake {
    limits: Limits,
    signing_key: Option<courier_wire::SigningKey>,
    names: Names,
    /// The channel dead letters go out on: one of their own, opened when
    /// first needed and again after the broker refused one (a quorum queue
    /// that refused a channel because it was full may go on refusing that
    /// channel once it has room: rabbitmq-server#12206).
    dead_channel: Option<Publisher>,
}

impl ResultIntake {
    /// Verify (with a key) and decode one result; the refusal's metric label
    /// and reason otherwise. Called on a blocking thread, with the apply:
    /// a result decompresses to up to 8 MiB.
    fn open(
        limits: &Limits,
        signing_key: Option<&courier_wire::SigningKey>,
        delivery: &courier_amqp::Delivery,
    ) -> Result<TaskResult, (&'static str, String)> {
        if let Some(key) = signing_key
            && let Err(e) = key.verify("result", &delivery.body, delivery.header_str(headers::SIGNATURE))
        {
            let label = match e {
                courier_wire::SignatureError::Missing { .. } => "unsigned",
                _ => "forged",
            };
            return Err((label, e.to_string()));
        }
        decode::<TaskResult>(&delivery.body, limits).map_err(|e| ("undecodable", e.to_string()))
    }

    /// Publish a refused result to the dead-letter queue with its reason;
    /// the caller acknowledges it once this succeeds.
    async fn dead_letter(
        &mut self,
        broker: &Broker,
        delivery: &courier_amqp::Delivery,
        reason: &str,
    ) -> Result<(), AmqpError> {
        let mut kept = vec![
            (headers::DEAD_REASON, Header::Str(reason.to_string())),
            (headers::KIND, Header::Str("result".into())),
        ];
        for name in [headers::ATTEMPT, headers::SIGNATURE] {
            if let Some(value) = delivery.headers.get(name) {
                kept.push((name, value.clone()));
            }
        }
        let dead = self.names.dead();
        let publisher = match &self.dead_channel {
            Some(publisher) => publisher.clone(),
            None => self.dead_channel.insert(broker.publisher(16).await?).clone(),
        };
        let sent = publisher
            .publish(Outgoing {
                exchange: &dead,
                routing_key: "results",
                body: &delivery.body,
                message_id: delivery.message_id.as_deref().unwrap_or_default(),
                correlation_id: delivery.correlation_id.as_deref().unwrap_or_default(),
                headers: kept,
            })
            .await;
        if sent.as_ref().is_err_and(AmqpError::is_refusal)
            && let Some(refused) = self.dead_channel.take()
        {
            let _ = refused.close().await;
        }
        sent
    }

    /// Dead-letter the held results, oldest first, acknowledging each once
    /// it is; stop at the first the broker refuses.
    async fn retry_held(&mut self, broker: &Broker, held: &mut Vec<Held>) -> Result<(), AmqpError> {
        while let Some(first) = held.first() {
            match self.dead_letter(broker, &first.delivery, &first.reason).await {
                Ok(()) => held.remove(0).delivery.ack().await?,
                Err(e) if e.is_refusal() => {
                    warn!(error = %e, held = held.len(), "the dead-letter queue still refuses the refused results held; trying again in a second");
                    return Ok(());
                }
                Err(e) => return Err(e),
            }
        }
        info!("the refused results held are dead-lettered");
        Ok(())
    }
}

/// A refused result whose dead letter the broker refused (a full
/// dead-letter queue): held unacknowledged, not given back to the broker
/// (where each return would count towards a quorum queue's delivery limit,
/// 20 by default from RabbitMQ 4.0), and dead-lettered again every
/// [`DEAD_LETTER_RETRY`].
struct Held {
    delivery: courier_amqp::Delivery,
    reason: String,
}

/// How often held results are dead-lettered again.
const DEAD_LETTER_RETRY: Duration = Duration::from_secs(1);

/// Dead letters' copies the watch takes at a time.
const DEAD_WATCH_PREFETCH: u16 = 16;

/// Fail the attempts whose tasks the broker dead-lettered at their queue's
/// delivery limit: the worker holding such a task was lost every time
/// (crashed, killed, or taken down by another task it held), and no worker
/// will answer it; its step fails (and retries, as its policy says) instead
/// of waiting for its run's deadline. Every dead letter's copy comes
/// through `<ns>.dead.watch`; the others (a worker's refusal, answered by
/// the worker when it could be; a refused result; an expired task, whose
/// run's deadline is the clock's) are only acknowledged, the dead-letter
/// queue keeps them. A task speaks for itself only signed, with a key set:
/// its ids come from its verified body, never from the message's headers,
/// and it must have died in a queue of its own pool. That it died is the
/// broker's `x-death` header, which a publisher can write too: anyone who
/// may publish to `<ns>.dead` and holds a copy of a live signed task can
/// fail its attempt, as anyone who may read the task queues can withhold
/// their tasks (only Courier should have those rights).
async fn dead_watch_loop(
    shared: &Arc<Shared>,
    watch: &mut Consumer,
    (limits, key): (Limits, Option<courier_wire::SigningKey>),
    names: &Names,
    delivery_limit: u32,
) -> Result<(), AmqpError> {
    loop {
        let mut delivery = watch.next().await.ok_or(AmqpError::Closed)??;
        if let Some(death) = delivery.death.clone().filter(|d| d.reason == "delivery_limit") {
            let (engine, key, names) = (shared.engine.clone(), key.clone(), names.clone());
            let outcome;
            (delivery, outcome) = tokio::task::spawn_blocking(move || {
                let outcome = lost(&limits, key.as_ref(), &delivery, &death.queue, &names, delivery_limit)
                    .map(|result| (engine.apply(std::slice::from_ref(&result)), result));
                (delivery, outcome)
            })
            .await
            .map_err(|_| AmqpError::Closed)?;
            match outcome {
                Ok((Ok(applied), result)) => {
                    if applied.refused.is_empty() && applied.duplicates == 0 {
                        warn!(task = %result.task_id, run = %result.run_id, step = %result.step,
                              "the broker dead-lettered a task at its delivery limit; its attempt failed");
                        shared.metrics.tasks_lost.inc();
                    } else {
                        tracing::debug!(task = %result.task_id, "a task the broker dead-lettered was answered already");
                    }
                    shared.count(&applied);
                    if applied.dispatched > 0 {
                        shared.outbox.notify_one();
                    }
                    if applied.cancelled_runs > 0 {
                        shared.controls.notify_one();
                    }
                }
                Ok((Err(e), _)) => {
                    // Not applied: unacked, the broker gives it again.
                    error!(error = %e, "cannot fail a task the broker dead-lettered; reconnecting to get it again");
                    return Err(AmqpError::Closed);
                }
                Err(reason) => {
                    warn!(%reason, message_id = ?delivery.message_id, "a dead letter from the broker speaks for no task");
                }
            }
        }
        delivery.ack().await?;
    }
}

/// The failure of the task a dead letter holds (verified with a key), lost
/// at the delivery limit of `queue`, one of its pool's two; why it speaks
/// for no task otherwise.
fn lost(
    limits: &Limits,
    key: Option<&courier_wire::SigningKey>,
    delivery: &courier_amqp::Delivery,
    queue: &str,
    names: &Names,
    delivery_limit: u32,
) -> Result<TaskResult, String> {
    if let Some(key) = key {
        key.verify("task", &delivery.body, delivery.header_str(headers::SIGNATURE))
            .map_err(|e| e.to_string())?;
    }
    let task: courier_wire::Task = decode(&delivery.body, limits).map_err(|e| e.to_string())?;
    if !names.pool_queues(&task.pool).iter().any(|q| q == queue) {
        return Err(format!(
            "it died in {queue}, not in a queue of its pool \"{}\"",
            task.pool
        ));
    }
    Ok(engine::scheduler_result(
        task.task_id,
        task.run_id,
        task.step,
        task.attempt,
        courier_wire::TaskStatus::Failed,
        format!(
            "lost: the broker dead-lettered the task at the delivery limit of {queue} ({delivery_limit} \
             redeliveries): each time, the worker holding it let it go unanswered (it crashed, was killed or cut off, \
             or was taken down by another task it held)"
        ),
    ))
}

/// Apply results in batches: verify and decode, one transaction, wake the
/// outbox, ack. A result that is unsigned or forged (with a key set),
/// undecodable, or impossible for its task changes nothing and is
/// dead-lettered with the reason ([`Held`] while the broker refuses that).
async fn results_loop(
    shared: &Arc<Shared>,
    broker: &Broker,
    consumer: &mut Consumer,
    intake: &mut ResultIntake,
) -> Result<(), AmqpError> {
    let mut last_depth_check = std::time::Instant::now();
    let mut last_delivery = std::time::Instant::now();
    // While any result is held, deliveries are acked one by one: a
    // multiple-ack would settle the held ones too.
    let mut held: Vec<Held> = Vec::new();
    let mut retry_at = tokio::time::Instant::now();
    loop {
        if !held.is_empty() && tokio::time::Instant::now() >= retry_at {
            intake.retry_held(broker, &mut held).await?;
            retry_at = tokio::time::Instant::now() + DEAD_LETTER_RETRY;
        }
        let wait = if held.is_empty() {
            Duration::from_secs(1)
        } else {
            retry_at.saturating_duration_since(tokio::time::Instant::now())
        };
        // A quiet queue is a drained one (the broker delivers what it holds
        // within moments of the consumer starting).
        let first = match tokio::time::timeout(wait, consumer.next()).await {
            Ok(next) => next.ok_or(AmqpError::Closed)??,
            Err(_) => {
                if last_delivery.elapsed() >= Duration::from_secs(1) {
                    shared.results_drained.store(true, Ordering::Relaxed);
                }
                continue;
            }
        };
        last_delivery = std::time::Instant::now();
        let mut batch = vec![first];
        let mut buffer_empty = false;
        while batch.len() < RESULT_BATCH {
            match futures_lite::future::poll_once(consumer.next()).await {
                Some(Some(Ok(delivery))) => batch.push(delivery),
                Some(Some(Err(e))) => return Err(e),
                _ => {
                    buffer_empty = true;
                    break;
                }
            }
        }
        // Opened and applied on a blocking thread, off the async threads
        // the outbox and the API share; what could not be opened or applied
        // is dead-lettered after the commit, before the ack.
        let engine = shared.engine.clone();
        let (limits, key) = (intake.limits, intake.signing_key.clone());
        let (batch, opened, unopened, results, applied) = tokio::task::spawn_blocking(move || {
            let mut results = Vec::with_capacity(batch.len());
            let mut opened = Vec::with_capacity(batch.len());
            let mut unopened = Vec::new();
            for (i, delivery) in batch.iter().enumerate() {
                match ResultIntake::open(&limits, key.as_ref(), delivery) {
                    Ok(result) => {
                        results.push(result);
                        opened.push(i);
                    }
                    Err(refusal) => unopened.push((i, refusal)),
                }
            }
            let applied = engine.apply(&results);
            (batch, opened, unopened, results, applied)
        })
        .await
        .map_err(|_| AmqpError::Closed)?;
        let statuses: Vec<&'static str> = results.iter().map(|r| r.status.as_str()).collect();
        match applied {
            Ok(applied) => {
                // What was committed is counted and acted on before anything
                // can fail: should a dead-letter below fail, the batch comes
                // back unacked, and its applied results as duplicates.
                for (i, result) in results.iter().enumerate() {
                    if !applied.refused.iter().any(|(r, _)| *r == i) {
                        trace::task_applied(result);
                    }
                }
                for status in statuses {
                    shared
                        .metrics
                        .results_received
                        .get_or_create(&metrics::Status { status: status.into() })
                        .inc();
                }
                shared.metrics.results_duplicate.inc_by(applied.duplicates as u64);
                shared.count(&applied);
                // Only new tasks (dependents, retries, admitted steps) need
                // the outbox: an empty read costs a transaction.
                if applied.dispatched > 0 {
                    shared.outbox.notify_one();
                }
                if applied.cancelled_runs > 0 {
                    shared.controls.notify_one();
                }
                // Nothing left here nor at the broker: every result sent
                // before now is applied (asked at most once a second).
                if buffer_empty
                    && !shared.results_drained.load(Ordering::Relaxed)
                    && last_depth_check.elapsed() >= Duration::from_secs(1)
                {
                    last_depth_check = std::time::Instant::now();
                    if let Ok((0, _)) = broker.queue_depth(&broker.names().results_queue()).await {
                        shared.results_drained.store(true, Ordering::Relaxed);
                    }
                }
                let refused = unopened
                    .into_iter()
                    .map(|(i, (label, reason))| (i, label, reason))
                    .chain(
                        applied
                            .refused
                            .iter()
                            .map(|(i, refused)| (opened[*i], refused.label(), refused.to_string())),
                    );
                // Dead-lettered, or held when the broker refuses the dead
                // letter (then those after it are held without trying).
                let mut holding = Vec::new();
                for (i, label, reason) in refused {
                    error!(%reason, message_id = ?batch[i].message_id, "result refused; dead-lettering it");
                    shared
                        .metrics
                        .results_refused
                        .get_or_create(&metrics::Reason { reason: label.into() })
                        .inc();
                    if held.is_empty() && holding.is_empty() {
                        match intake.dead_letter(broker, &batch[i], &reason).await {
                            Ok(()) => continue,
                            Err(e) if e.is_refusal() => {
                                error!(error = %e, "cannot dead-letter a refused result: the broker refuses it; holding it, to try again every second");
                                retry_at = tokio::time::Instant::now() + DEAD_LETTER_RETRY;
                            }
                            Err(e) => return Err(e),
                        }
                    }
                    holding.push((i, reason));
                }
                if held.is_empty() && holding.is_empty() {
                    // Results arrive in order on one channel: one multiple-ack
                    // settles the whole batch, dead-lettered copies included.
                    if let Some(last) = batch.last() {
                        last.ack_all_up_to().await?;
                    }
                } else {
                    for (i, delivery) in batch.into_iter().enumerate() {
                        match holding.iter().position(|(h, _)| *h == i) {
                            Some(at) => held.push(Held {
                                delivery,
                                reason: holding.swap_remove(at).1,
                            }),
                            None => delivery.ack().await?,
                        }
                    }
                }
            }
            Err(e) => {
                // Not applied: leave unacked; the broker redelivers after reconnect.
                error!(error = %e, "cannot apply results; reconnecting to get them again");
                return Err(AmqpError::Closed);
            }
        }
    }
}

/// Fire `workflow` at every occurrence of its schedule.
async fn cron_loop(shared: Arc<Shared>, workflow: String, cron: croner::Cron, shutdown: CancellationToken) {
    loop {
        let now = chrono::Utc::now();
        let Ok(next) = cron.find_next_occurrence(&now, false) else {
            warn!(%workflow, "schedule has no next occurrence");
            return;
        };
        // croner keeps the fraction of `now`; a tick is a whole second, the
        // same on every scheduler (the key that fires it once).
        let next = next - chrono::Duration::nanoseconds(i64::from(chrono::Timelike::nanosecond(&next)));
        let next = if next <= now {
            next + chrono::Duration::seconds(1)
        } else {
            next
        };
        let wait = (next - now).to_std().unwrap_or(Duration::ZERO);
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = shutdown.cancelled() => return,
        }
        let engine = shared.engine.clone();
        let wf = workflow.clone();
        let tick = next.timestamp_millis();
        match tokio::task::spawn_blocking(move || engine.submit_scheduled(&wf, tick)).await {
            Ok(Ok(Some(run))) => {
                shared.metrics.runs_submitted.inc();
                shared.outbox.notify_one();
                info!(%workflow, run = %run.id, trace_id = %engine::trace_id(&run.id), "scheduled run started");
            }
            Ok(Ok(None)) => info!(%workflow, tick, "this tick was fired already (by another scheduler)"),
            Ok(Err(e)) => error!(%workflow, error = %e, "scheduled run refused"),
            Err(e) => error!(%workflow, error = %e, "scheduled submit panicked"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::quoted;

    #[test]
    fn an_identifier_is_quoted_whole_up_to_64_characters_then_cut() {
        assert_eq!(quoted("nope"), "\"nope\"");
        let exact = "a".repeat(64);
        assert_eq!(quoted(&exact), format!("\"{exact}\""));
        // Cut on a character, never inside one: 65 three-byte characters.
        let long = "€".repeat(65);
        assert_eq!(quoted(&long), format!("\"{}…\" (195 bytes in all)", "€".repeat(64)));
        // Control characters and quotes show escaped, cut or not.
        assert_eq!(quoted("a\0b\n\"c"), r#""a\0b\n\"c""#);
        let long = format!("\0{}", "x".repeat(70));
        assert_eq!(quoted(&long), format!("\"\\0{}…\" (71 bytes in all)", "x".repeat(63)));
    }
}
