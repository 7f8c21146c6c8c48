//! Courier's only AMQP code: connecting (with retry), declaring the topology,
//! publishing with confirms, consuming.
//!
//! A lost connection is not recovered in place: every operation on it fails,
//! and the caller (scheduler, worker) reconnects from scratch and re-declares
//! what it needs. Unacknowledged deliveries go back to their queue on the
//! broker's side, so nothing is lost and there is one recovery path to test.
//!
//! **Architecture invariant:** this is the only crate that uses lapin, and it
//! moves bytes and headers: it never sees task or result types.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, BasicQosOptions, BasicRejectOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ExchangeKind};
use tokio::sync::Semaphore;

/// Default number of unconfirmed publishes a [`Publisher`] allows at once.
pub const DEFAULT_PUBLISH_WINDOW: usize = 1024;
/// Longest wait for the broker's confirm of one publish. Past it the publish
/// counts as failed (the caller keeps the message and retries): a confirm that
/// never comes must not stall a publisher forever.
pub const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for an ack, multiple-ack or reject to be handed to the
/// connection. lapin 4.12 drops (never resolves) a settlement queued just as
/// the connection dies (`InternalRPC::run` skips commands for a channel it no
/// longer knows), which left the scheduler waiting forever across a broker
/// restart; past this the settlement counts as failed and the broker
/// redelivers the message.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default redeliveries a task queue allows before dead-lettering a message.
pub const DEFAULT_DELIVERY_LIMIT: u32 = 5;

/// What can go wrong talking to the broker.
#[derive(Debug, thiserror::Error)]
pub enum AmqpError {
    /// A lapin error (connection, channel or protocol).
    #[error("AMQP: {0}")]
    Lapin(#[from] lapin::Error),
    /// The broker refused a publish (negative confirm).
    #[error("the broker refused the message to {exchange}/{routing_key}")]
    Nacked { exchange: String, routing_key: String },
    /// An ack or reject could not be sent: the delivery's channel is gone, so
    /// the broker will redeliver the message.
    #[error("the delivery's channel is closed; the broker will redeliver the message")]
    NotSettled,
    /// No confirm arrived within [`CONFIRM_TIMEOUT`].
    #[error("the broker did not confirm the message to {exchange}/{routing_key} within {CONFIRM_TIMEOUT:?}")]
    ConfirmTimeout { exchange: String, routing_key: String },
    /// The publisher was shut down.
    #[error("the publisher is closed")]
    Closed,
    /// The connection failed under an operation (see [`Broker::lost`]).
    #[error("the connection to the broker failed")]
    Lost,
    /// A mandatory publish matched no queue.
    #[error("no queue is bound to {exchange} with routing key \"{routing_key}\"")]
    Unroutable { exchange: String, routing_key: String },
    /// A broker URL that does not parse (the URL is not repeated: it may hold a password).
    #[error("invalid broker URL: {0}")]
    BadUrl(String),
}

impl AmqpError {
    /// The broker answered and refused this one message (a negative
    /// confirm, as a full queue with `overflow: reject-publish` gives): the
    /// connection is still good.
    #[must_use]
    pub fn is_refusal(&self) -> bool {
        matches!(self, Self::Nacked { .. })
    }
}

/// The largest AMQP frame asked for when the URL does not say
/// (`?frame_max=`): RabbitMQ's default, the largest frame any AMQP publisher
/// on a default broker can send. A message's headers travel in one frame,
/// and a frame larger than the connection's makes lapin drop the connection:
/// with smaller frames, anyone who can publish could cut a Courier process
/// off with one message of large headers, received again on each reconnect
/// (the hostile test of 2026-11-28 did, at 40 KB, with 32 KiB frames).
/// lapin keeps a receive and a send buffer of 32 frames per connection, so
/// this costs each process about 6 MiB more than 32 KiB frames did (workers
/// 23 MiB in `courier bench --tasks 20000`). A broker configured with a
/// larger `frame_max` needs the same in the URL.
pub const FRAME_MAX: u32 = 128 * 1024;

/// `url` parsed, with [`FRAME_MAX`] unless it names a frame size.
fn broker_uri(url: &str) -> Result<lapin::uri::AMQPUri, AmqpError> {
    let mut uri: lapin::uri::AMQPUri = url.parse().map_err(AmqpError::BadUrl)?;
    uri.query.frame_max.get_or_insert(FRAME_MAX);
    Ok(uri)
}

/// How long the control stream keeps a message: longer than a task may
/// live (24 h of queueing plus a 24 h step at most).
pub const CONTROL_MAX_AGE: &str = "3D";
/// Bytes the control stream keeps at most (a cancellation is ~100 bytes).
const CONTROL_MAX_BYTES: i64 = 256 * 1024 * 1024;
/// Segment size of the control stream: retention drops whole segments.
const CONTROL_SEGMENT_BYTES: i32 = 8 * 1024 * 1024;
/// Control messages in flight to one reader.
const CONTROL_PREFETCH: u16 = 1000;

/// The routing key of a pool's lane, and the name its queue ends with: the
/// pool's second queue, for the tasks of small runs, so that they do not
/// wait behind a wide run's in the pool's own (the scheduler decides which
/// run goes where; workers take from both). Pool names are slugs, without
/// dots, so no pool's name is another's lane key.
pub fn lane_key(pool: &str) -> String {
    format!("{pool}.lane")
}

/// Names of every exchange and queue, under one namespace prefix so that
/// several Courier deployments (or tests) can share one broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Names {
    namespace: String,
}

impl Names {
    /// Names under `namespace` (`courier` in production).
    pub fn new(namespace: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
        }
    }

    /// The namespace prefix.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// Direct exchange tasks are published to, routed by pool name.
    pub fn tasks_exchange(&self) -> String {
        format!("{}.tasks", self.namespace)
    }

    /// Quorum queue of one worker pool (or, given a [`lane_key`], of its
    /// lane).
    pub fn task_queue(&self, pool: &str) -> String {
        format!("{}.tasks.{pool}", self.namespace)
    }

    /// A pool's queues: its own, then its lane's.
    pub fn pool_queues(&self, pool: &str) -> [String; 2] {
        [self.task_queue(pool), self.task_queue(&lane_key(pool))]
    }

    /// Exchange results are published to.
    pub fn results_exchange(&self) -> String {
        format!("{}.results", self.namespace)
    }

    /// Queue the scheduler consumes results from.
    pub fn results_queue(&self) -> String {
        format!("{}.results", self.namespace)
    }

    /// Delay queue of one pool for one delay: messages wait `delay_ms`, then
    /// go to the pool's task queue.
    pub fn delay_queue(&self, pool: &str, delay_ms: u64) -> String {
        format!("{}.delay.{pool}.{delay_ms}", self.namespace)
    }

    /// Stream every worker reads: cancellations (and workers' markers).
    pub fn control(&self) -> String {
        format!("{}.control", self.namespace)
    }

    /// Dead-letter exchange and queue.
    pub fn dead(&self) -> String {
        format!("{}.dead", self.namespace)
    }

    /// Queue of copies of every dead letter, for the scheduler: it fails
    /// the steps whose tasks the broker dead-lettered (their queue's
    /// delivery limit reached), which no worker answered.
    pub fn dead_watch(&self) -> String {
        format!("{}.dead.watch", self.namespace)
    }
}

/// Dead letters `<ns>.dead` keeps at most, and `<ns>.dead.watch` copies of
/// them for the scheduler; past this count or [`DEAD_MAX_BYTES`] the oldest
/// are dropped. A dropped dead letter's attempt was failed when it died
/// (the scheduler read the watch's copy); a dropped copy's step waits for
/// its task's deadline. `<ns>.dead` has no overflow mode of its own, so a
/// policy can lower its bounds or choose `reject-publish`.
pub const DEAD_MAX: i64 = 100_000;
/// See [`DEAD_MAX`].
pub const DEAD_MAX_BYTES: i64 = 256 << 20;

/// Whether the broker refused a declaration as inequivalent to what
/// exists (406 PRECONDITION_FAILED).
fn is_precondition_failed(e: &lapin::Error) -> bool {
    use lapin::protocol::{AMQPErrorKind, AMQPSoftError};
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(p)
        if matches!(p.kind(), AMQPErrorKind::Soft(AMQPSoftError::PRECONDITIONFAILED)))
}

/// A header value: the two kinds Courier uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Header {
    /// A string (or bytes that are UTF-8).
    Str(String),
    /// An integer.
    Int(i64),
}

/// A message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    /// Exchange name.
    pub exchange: &'a str,
    /// Routing key.
    pub routing_key: &'a str,
    /// Body bytes.
    pub body: &'a [u8],
    /// AMQP `message_id`.
    pub message_id: &'a str,
    /// AMQP `correlation_id`.
    pub correlation_id: &'a str,
    /// Application headers.
    pub headers: Vec<(&'static str, Header)>,
}

/// A connection to the broker.
#[derive(Debug, Clone)]
pub struct Broker {
    connection: Arc<Connection>,
    names: Names,
    /// Replicas of each quorum queue it declares (`None`: the broker's
    /// default, every node of the cluster).
    quorum_group_size: Option<u32>,
}

/// How long one node of a list may take to accept a connection before the
/// next is tried (a single URL has no such bound: the broker's own).
pub const NODE_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Per URL list, the node the next connection tries first: the last one that
/// answered. A node refusing connections or unknown by name costs nothing; one
/// that does not answer at all costs at most [`NODE_CONNECT_TIMEOUT`].
static NEXT_NODE: std::sync::Mutex<Option<HashMap<String, usize>>> = std::sync::Mutex::new(None);

/// The broker URLs in `urls`: one, or several separated by commas (the nodes
/// of a cluster), tried in turn. A comma inside a URL (in a password, say)
/// must be percent-encoded (`%2C`).
pub fn broker_urls(urls: &str) -> Vec<&str> {
    urls.split(',').map(str::trim).filter(|u| !u.is_empty()).collect()
}

impl Broker {
    /// Connect once, to the first node of `urls` (see [`broker_urls`]) that
    /// answers, starting from the last one that did.
    ///
    /// # Errors
    /// The last node's connection error.
    pub async fn connect(urls: &str, names: Names, connection_name: &str) -> Result<Self, AmqpError> {
        let nodes = broker_urls(urls);
        let cursor = |update: Option<usize>| {
            let mut next = NEXT_NODE.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let map = next.get_or_insert_with(HashMap::new);
            match update {
                Some(n) => map.insert(urls.to_string(), n).unwrap_or(0),
                None => map.get(urls).copied().unwrap_or(0),
            }
        };
        let start = if nodes.len() > 1 { cursor(None) } else { 0 };
        let mut last = None;
        for i in 0..nodes.len().max(1) {
            let n = (start + i) % nodes.len().max(1);
            let url = nodes.get(n).copied().unwrap_or(urls);
            let properties = ConnectionProperties::default().with_connection_name(connection_name.into());
            let uri = broker_uri(url)?;
            // A node cut off by the network would hold the connect for
            // minutes: with others to try, the next goes after NODE_CONNECT_TIMEOUT.
            let attempt = if nodes.len() > 1 {
                tokio::time::timeout(NODE_CONNECT_TIMEOUT, Connection::connect_uri(uri, properties))
                    .await
                    .unwrap_or_else(|_| Err(lapin::Error::from(std::io::Error::from(std::io::ErrorKind::TimedOut))))
            } else {
                Connection::connect_uri(uri, properties).await
            };
            match attempt {
                Ok(connection) => {
                    if nodes.len() > 1 {
                        cursor(Some(n));
                        tracing::info!(node = n, of = nodes.len(), "connected to the broker");
                    }
                    return Ok(Self {
                        quorum_group_size: None,
                        connection: Arc::new(connection),
                        names,
                    });
                }
                Err(e) => {
                    if nodes.len() > 1 {
                        tracing::warn!(node = n, error = %e, "broker node unreachable; trying the next");
                    }
                    last = Some(e);
                }
            }
        }
        Err(last.map_or(AmqpError::Closed, AmqpError::Lapin))
    }

    /// Connect, retrying with exponential backoff (100 ms doubling to 5 s)
    /// until it succeeds or `give_up` elapses.
    ///
    /// # Errors
    /// The last connection error once `give_up` has elapsed.
    pub async fn connect_with_retry(
        url: &str,
        names: Names,
        connection_name: &str,
        give_up: Duration,
    ) -> Result<Self, AmqpError> {
        let started = tokio::time::Instant::now();
        let mut delay = Duration::from_millis(100);
        loop {
            match Self::connect(url, names.clone(), connection_name).await {
                Ok(broker) => return Ok(broker),
                // Waiting does not mend a URL.
                Err(e @ AmqpError::BadUrl(_)) => return Err(e),
                Err(e) if started.elapsed() + delay < give_up => {
                    tracing::warn!(error = %e, retry_in = ?delay, "cannot reach the broker; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Declare quorum queues with `size` replicas (`x-quorum-initial-group-size`;
    /// a queue that already exists keeps its members).
    #[must_use]
    pub fn with_quorum_group_size(mut self, size: Option<u32>) -> Self {
        self.quorum_group_size = size;
        self
    }

    /// The arguments of a quorum queue.
    fn quorum_args(&self) -> FieldTable {
        let mut args = FieldTable::default();
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
        if let Some(size) = self.quorum_group_size {
            args.insert(
                "x-quorum-initial-group-size".into(),
                AMQPValue::LongInt(size.min(i32::MAX as u32) as i32),
            );
        }
        args
    }

    /// The names this broker connection uses.
    pub fn names(&self) -> &Names {
        &self.names
    }

    /// The arguments of `<ns>.dead`: bounded ([`DEAD_MAX`], [`DEAD_MAX_BYTES`]).
    #[must_use]
    fn dead_args(&self) -> FieldTable {
        let mut args = self.quorum_args();
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(DEAD_MAX));
        args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(DEAD_MAX_BYTES));
        args
    }

    /// Declare `<ns>.dead` bounded. One declared unbounded by a Courier
    /// before 2026-11-28 cannot be given arguments in place (the broker
    /// refuses the declaration and closes the channel): it is kept as it is,
    /// with its dead letters, and a warning says how to bound it. The
    /// channel to go on with (a new one after a refusal).
    async fn declare_dead(&self, channel: Channel, opts: QueueDeclareOptions) -> Result<Channel, AmqpError> {
        let dead = self.names.dead();
        match channel
            .queue_declare(dead.as_str().into(), opts, self.dead_args())
            .await
        {
            Ok(_) => Ok(channel),
            Err(e) if is_precondition_failed(&e) => {
                let channel = self.connection.create_channel().await?;
                let passive = QueueDeclareOptions { passive: true, ..opts };
                let queue = channel
                    .queue_declare(dead.as_str().into(), passive, FieldTable::default())
                    .await?;
                // Once per process: a connection dropped in a loop would
                // say it every half second.
                static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
                if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::warn!(
                        queue = %dead,
                        dead_letters = queue.message_count(),
                        refused = %e,
                        "the dead-letter queue exists with other arguments than this Courier's bounds (an earlier \
                         Courier declared it unbounded) and is kept as it is; bound it with a policy (rabbitmqctl \
                         set_policy <name> '^{}$' '{{\"max-length\":{DEAD_MAX},\"max-length-bytes\":{DEAD_MAX_BYTES}}}' \
                         --apply-to queues), or, once every Courier process is upgraded, delete it when empty \
                         (courier dead list shows what it holds): the next start declares it bounded",
                        dead.replace('.', "\\."),
                    );
                }
                Ok(channel)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Declare every exchange and queue Courier needs, idempotently: task
    /// exchange and two quorum queues per pool, its own and its lane's
    /// (explicit delivery limit, dead-lettering), results queue (single active consumer), dead letters.
    ///
    /// # Errors
    /// A declaration the broker refuses (for example a queue that exists with
    /// other arguments).
    pub async fn declare_topology(&self, pools: &[String], delivery_limit: u32) -> Result<(), AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            let names = &self.names;
            let durable = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            let queue_opts = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            for (exchange, kind) in [
                (names.tasks_exchange(), ExchangeKind::Direct),
                (names.results_exchange(), ExchangeKind::Direct),
                (names.dead(), ExchangeKind::Fanout),
            ] {
                channel
                    .exchange_declare(exchange.as_str().into(), kind, durable, FieldTable::default())
                    .await?;
            }
            let mut watch_args = self.dead_args();
            watch_args.insert("x-overflow".into(), AMQPValue::LongString("drop-head".into()));
            watch_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            let channel = self.declare_dead(channel, queue_opts).await?;
            channel
                .queue_declare(names.dead_watch().as_str().into(), queue_opts, watch_args)
                .await?;
            for queue in [names.dead(), names.dead_watch()] {
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        names.dead().as_str().into(),
                        "".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }

            // The control stream: kept `CONTROL_MAX_AGE` (longer than any task
            // can live: its deadline comes first), bounded in bytes.
            let mut control_args = FieldTable::default();
            control_args.insert("x-queue-type".into(), AMQPValue::LongString("stream".into()));
            control_args.insert("x-max-age".into(), AMQPValue::LongString(CONTROL_MAX_AGE.into()));
            control_args.insert("x-max-length-bytes".into(), AMQPValue::LongLongInt(CONTROL_MAX_BYTES));
            control_args.insert(
                "x-stream-max-segment-size-bytes".into(),
                AMQPValue::LongInt(CONTROL_SEGMENT_BYTES),
            );
            channel
                .queue_declare(names.control().as_str().into(), queue_opts, control_args)
                .await?;

            let mut results_args = self.quorum_args();
            results_args.insert("x-single-active-consumer".into(), AMQPValue::Boolean(true));
            channel
                .queue_declare(names.results_queue().as_str().into(), queue_opts, results_args)
                .await?;
            channel
                .queue_bind(
                    names.results_queue().as_str().into(),
                    names.results_exchange().as_str().into(),
                    "results".into(),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await?;

            for key in pools.iter().flat_map(|p| [p.clone(), lane_key(p)]) {
                let mut args = self.quorum_args();
                args.insert(
                    "x-delivery-limit".into(),
                    AMQPValue::LongInt(delivery_limit.min(i32::MAX as u32) as i32),
                );
                args.insert(
                    "x-dead-letter-exchange".into(),
                    AMQPValue::LongString(names.dead().as_str().into()),
                );
                let queue = names.task_queue(&key);
                channel.queue_declare(queue.as_str().into(), queue_opts, args).await?;
                channel
                    .queue_bind(
                        queue.as_str().into(),
                        names.tasks_exchange().as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            channel.close(200, "topology declared".into()).await?;
            Ok(())
        })
        .await
    }

    /// Delete every queue and exchange of this namespace for the given pools
    /// (tests and `courier` maintenance).
    ///
    /// # Errors
    /// A deletion the broker refuses.
    pub async fn delete_topology(&self, pools: &[String]) -> Result<(), AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            let names = &self.names;
            let mut queues = vec![names.results_queue(), names.dead(), names.dead_watch(), names.control()];
            queues.extend(pools.iter().flat_map(|p| names.pool_queues(p)));
            for queue in queues {
                channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                    .await?;
            }
            for exchange in [names.tasks_exchange(), names.results_exchange(), names.dead()] {
                channel
                    .exchange_delete(
                        exchange.as_str().into(),
                        lapin::options::ExchangeDeleteOptions::default(),
                    )
                    .await?;
            }
            channel.close(200, "topology deleted".into()).await?;
            Ok(())
        })
        .await
    }

    /// Declare (idempotently) the delay queue for `pool` and `delay_ms` and
    /// return its name. Every message in it has the same TTL (no head-of-line
    /// blocking); when it expires, the broker dead-letters it to the task
    /// exchange with the pool as routing key. Classic queues with TTL and
    /// dead-lettering behave the same on RabbitMQ 3.10 and 4.x. The queue
    /// deletes itself a minute after its last declaration plus its delay, by
    /// which time every message in it has moved on; declare it before each use.
    ///
    /// # Errors
    /// A declaration the broker refuses.
    pub async fn declare_delay(&self, pool: &str, delay_ms: u64) -> Result<String, AmqpError> {
        self.guard(async {
            let queue = self.names.delay_queue(pool, delay_ms);
            let ttl = i64::try_from(delay_ms).unwrap_or(i64::MAX);
            let mut args = FieldTable::default();
            args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ttl));
            args.insert("x-expires".into(), AMQPValue::LongLongInt(ttl.saturating_add(60_000)));
            args.insert(
                "x-dead-letter-exchange".into(),
                AMQPValue::LongString(self.names.tasks_exchange().as_str().into()),
            );
            args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(pool.into()));
            let channel = self.connection.create_channel().await?;
            channel
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        durable: true,
                        ..QueueDeclareOptions::default()
                    },
                    args,
                )
                .await?;
            let _ = channel.close(200, "delay queue declared".into()).await;
            Ok(queue)
        })
        .await
    }

    /// Declare a tap: a queue that receives a copy of every task (of `pools`)
    /// and every result, for inspection (tests, debugging).
    ///
    /// # Errors
    /// A declaration the broker refuses.
    pub async fn declare_tap(&self, queue: &str, pools: &[String]) -> Result<(), AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            channel
                .queue_declare(queue.into(), QueueDeclareOptions::default(), FieldTable::default())
                .await?;
            let mut routes: Vec<(String, String)> = pools
                .iter()
                .flat_map(|p| [p.clone(), lane_key(p)])
                .map(|key| (self.names.tasks_exchange(), key))
                .collect();
            routes.push((self.names.results_exchange(), "results".into()));
            for (exchange, key) in routes {
                channel
                    .queue_bind(
                        queue.into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
            }
            let _ = channel.close(200, "tap declared".into()).await;
            Ok(())
        })
        .await
    }

    /// Delete a queue (a tap).
    ///
    /// # Errors
    /// The broker refuses.
    pub async fn delete_queue(&self, queue: &str) -> Result<(), AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            channel
                .queue_delete(queue.into(), QueueDeleteOptions::default())
                .await?;
            let _ = channel.close(200, "queue deleted".into()).await;
            Ok(())
        })
        .await
    }

    /// Messages ready in `queue` and consumers attached to it.
    ///
    /// # Errors
    /// The queue does not exist, or the channel failed.
    pub async fn queue_depth(&self, queue: &str) -> Result<(u32, u32), AmqpError> {
        self.guard(async {
            let gauge = self.gauge().await?;
            let depth = gauge.depth(queue).await;
            let _ = gauge.channel.close(200, "depth read".into()).await;
            depth
        })
        .await
    }

    /// A channel of its own to read queues' depths on, again and again.
    ///
    /// # Errors
    /// The channel could not be opened.
    pub async fn gauge(&self) -> Result<Gauge, AmqpError> {
        self.guard(async {
            Ok(Gauge {
                channel: self.connection.create_channel().await?,
            })
        })
        .await
    }

    /// A publisher on its own confirm-mode channel, allowing `window`
    /// unconfirmed messages at once.
    ///
    /// # Errors
    /// The channel could not be opened.
    pub async fn publisher(&self, window: usize) -> Result<Publisher, AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            channel.confirm_select(ConfirmSelectOptions::default()).await?;
            Ok(Publisher {
                channel,
                window: Arc::new(Semaphore::new(window.max(1))),
            })
        })
        .await
    }

    /// A consumer of `queue` on its own channel, with at most `prefetch`
    /// unacknowledged deliveries.
    ///
    /// # Errors
    /// The channel or the consumer could not be set up.
    pub async fn consumer(&self, queue: &str, prefetch: u16, tag: &str) -> Result<Consumer, AmqpError> {
        self.consume(queue, prefetch, tag, FieldTable::default()).await
    }

    /// A [`Taker`] of `queue`'s messages, on a channel of its own.
    ///
    /// # Errors
    /// The channel could not be opened.
    pub async fn taker(&self, queue: &str) -> Result<Taker, AmqpError> {
        self.guard(async {
            Ok(Taker {
                channel: self.connection.create_channel().await?,
                queue: queue.to_string(),
                connection: self.connection.status().clone(),
            })
        })
        .await
    }

    /// Like [`Broker::consumer`], and the broker lets each delivery stay
    /// unacknowledged for `ack_timeout` before it closes the channel
    /// (`x-consumer-timeout`, RabbitMQ 3.12+; older brokers ignore it and
    /// apply their global `consumer_timeout`).
    ///
    /// # Errors
    /// The channel or the consumer could not be set up.
    pub async fn consumer_with_ack_timeout(
        &self,
        queue: &str,
        prefetch: u16,
        tag: &str,
        ack_timeout: Duration,
    ) -> Result<Consumer, AmqpError> {
        let mut args = FieldTable::default();
        let ms = i64::try_from(ack_timeout.as_millis()).unwrap_or(i64::MAX);
        args.insert("x-consumer-timeout".into(), AMQPValue::LongLongInt(ms));
        self.consume(queue, prefetch, tag, args).await
    }

    /// A consumer of the control stream from its first retained message.
    ///
    /// # Errors
    /// The channel or the consumer could not be set up.
    pub async fn control_consumer(&self, tag: &str) -> Result<Consumer, AmqpError> {
        let mut args = FieldTable::default();
        args.insert("x-stream-offset".into(), AMQPValue::LongString("first".into()));
        self.consume(&self.names.control(), CONTROL_PREFETCH, tag, args).await
    }

    async fn consume(&self, queue: &str, prefetch: u16, tag: &str, args: FieldTable) -> Result<Consumer, AmqpError> {
        self.guard(async {
            let channel = self.connection.create_channel().await?;
            channel.basic_qos(prefetch, BasicQosOptions::default()).await?;
            let consumer = channel
                .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), args)
                .await?;
            Ok(Consumer { channel, consumer })
        })
        .await
    }

    /// `work` (a service's on this connection) to its end, unless the
    /// connection fails under it outside a shutdown: it then has
    /// [`LOST_GRACE`] more to settle what it can (an outbox marking what
    /// the broker confirmed, so that it is not published again), and is
    /// dropped past it with [`AmqpError::Lost`]. During a shutdown `work`
    /// is its own bound (its drain; closes wait [`CLOSE_TIMEOUT`] at most).
    ///
    /// # Errors
    /// `work`'s, or [`AmqpError::Lost`].
    pub async fn serve<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, AmqpError>>,
        shutting_down: impl Fn() -> bool,
    ) -> Result<T, AmqpError> {
        let mut work = std::pin::pin!(work);
        let lost = async {
            self.lost().await;
            if shutting_down() {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = &mut work => r,
            () = lost => tokio::time::timeout(LOST_GRACE, work).await.unwrap_or(Err(AmqpError::Lost)),
        }
    }

    /// `op`, or [`AmqpError::Lost`] should this connection fail first.
    async fn guard<T>(&self, op: impl std::future::Future<Output = Result<T, AmqpError>>) -> Result<T, AmqpError> {
        guarded(self.connection.status(), op).await
    }

    /// Resolves once this connection has failed or closed. lapin 4.12 leaves
    /// some operations unresolved when their connection dies under them (a
    /// consumer or channel being opened, a close): a service runs its work
    /// on a connection against this, so that none waits forever on a dead
    /// one (seen with a message whose headers outgrow the frames: the
    /// scheduler's connection dropped in a loop until one reconnect hung,
    /// deaf to SIGTERM, with `/healthz` still saying `ok`).
    pub async fn lost(&self) {
        lost(self.connection.status()).await;
    }

    /// Close the connection, waiting at most [`CLOSE_TIMEOUT`] for the
    /// broker's answer.
    ///
    /// # Errors
    /// The close handshake failed or timed out (the connection is gone
    /// either way).
    pub async fn close(&self) -> Result<(), AmqpError> {
        tokio::time::timeout(CLOSE_TIMEOUT, self.connection.close(200, "bye".into()))
            .await
            .map_err(|_| AmqpError::Closed)??;
        Ok(())
    }
}

/// How long a service's work on a failed connection may go on settling
/// what it can before it is dropped (see [`Broker::serve`]).
pub const LOST_GRACE: Duration = Duration::from_secs(2);

/// Longest wait for the broker to answer a connection's close.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Resolves once the connection of `status` has failed or closed (read every
/// 100 ms: lapin has no future for it).
async fn lost(status: &lapin::ConnectionStatus) {
    while status.connected() || status.connecting() {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `op`, or [`AmqpError::Lost`] should the connection of `status` fail
/// first (see [`Broker::lost`]).
async fn guarded<T, E: Into<AmqpError>>(
    status: &lapin::ConnectionStatus,
    op: impl std::future::Future<Output = Result<T, E>>,
) -> Result<T, AmqpError> {
    tokio::select! {
        r = op => r.map_err(Into::into),
        () = lost(status) => Err(AmqpError::Lost),
    }
}

/// Publishes with confirms, mandatory routing and a bounded in-flight window.
#[derive(Debug, Clone)]
pub struct Publisher {
    channel: Channel,
    window: Arc<Semaphore>,
}

impl Publisher {
    /// Publish a persistent message and wait until the broker confirms it.
    ///
    /// # Errors
    /// [`AmqpError::Unroutable`] when no queue is bound for the routing key,
    /// [`AmqpError::Nacked`] when the broker refuses it, or a channel error.
    pub async fn publish(&self, msg: Outgoing<'_>) -> Result<(), AmqpError> {
        self.publish_with_priority(msg, None).await
    }

    /// [`Publisher::publish`] with an AMQP priority (0–9): honoured by
    /// classic queues declared with `x-max-priority` and by quorum queues
    /// from RabbitMQ 4.0 (two levels: 5 and above before the rest); RabbitMQ
    /// 3.x quorum queues ignore it.
    ///
    /// # Errors
    /// As [`Publisher::publish`].
    pub async fn publish_with_priority(&self, msg: Outgoing<'_>, priority: Option<u8>) -> Result<(), AmqpError> {
        let _permit = self.window.acquire().await.map_err(|_| AmqpError::Closed)?;
        let mut headers = FieldTable::default();
        for (key, value) in msg.headers {
            let value = match value {
                Header::Str(s) => AMQPValue::LongString(LongString::from(s)),
                Header::Int(i) => AMQPValue::LongLongInt(i),
            };
            headers.insert(key.into(), value);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let properties = BasicProperties::default()
            .with_message_id(ShortString::from(msg.message_id))
            .with_correlation_id(ShortString::from(msg.correlation_id))
            .with_delivery_mode(2)
            .with_timestamp(now)
            .with_headers(headers);
        let properties = match priority {
            Some(p) => properties.with_priority(p),
            None => properties,
        };
        let publish = async {
            self.channel
                .basic_publish(
                    msg.exchange.into(),
                    msg.routing_key.into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..BasicPublishOptions::default()
                    },
                    msg.body,
                    properties,
                )
                .await?
                .await
        };
        let confirm =
            tokio::time::timeout(CONFIRM_TIMEOUT, publish)
                .await
                .map_err(|_| AmqpError::ConfirmTimeout {
                    exchange: msg.exchange.to_string(),
                    routing_key: msg.routing_key.to_string(),
                })??;
        match confirm {
            Confirmation::Ack(None) | Confirmation::NotRequested => Ok(()),
            Confirmation::Ack(Some(_)) => Err(AmqpError::Unroutable {
                exchange: msg.exchange.to_string(),
                routing_key: msg.routing_key.to_string(),
            }),
            Confirmation::Nack(_) => Err(AmqpError::Nacked {
                exchange: msg.exchange.to_string(),
                routing_key: msg.routing_key.to_string(),
            }),
        }
    }

    /// Close the channel every clone of this publisher shares.
    ///
    /// # Errors
    /// The close failed or was not answered within [`CLOSE_TIMEOUT`] (the
    /// channel is gone either way).
    pub async fn close(&self) -> Result<(), AmqpError> {
        tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, "publisher closed".into()))
            .await
            .map_err(|_| AmqpError::Lost)??;
        Ok(())
    }
}

/// Deliveries from one queue.
#[derive(Debug)]
pub struct Consumer {
    channel: Channel,
    consumer: lapin::Consumer,
}

impl Consumer {
    /// The next delivery; `None` means the consumer ended (cancelled, or its
    /// channel closed).
    ///
    /// # Errors
    /// The channel or connection failed: the caller reconnects from scratch.
    pub async fn next(&mut self) -> Option<Result<Delivery, AmqpError>> {
        match self.consumer.next().await? {
            Ok(delivery) => Some(Ok(Delivery::new(delivery, self.channel.clone()))),
            Err(error) => Some(Err(error.into())),
        }
    }

    /// Stop receiving new deliveries; unacknowledged ones stay ackable.
    ///
    /// # Errors
    /// The cancel failed or was not answered within [`CLOSE_TIMEOUT`] (the
    /// channel is gone).
    pub async fn cancel(&self) -> Result<(), AmqpError> {
        tokio::time::timeout(
            CLOSE_TIMEOUT,
            self.channel
                .basic_cancel(self.consumer.tag(), lapin::options::BasicCancelOptions::default()),
        )
        .await
        .map_err(|_| AmqpError::Lost)??;
        Ok(())
    }

    /// Close the consumer's channel (unacknowledged deliveries are requeued).
    ///
    /// # Errors
    /// The close failed or was not answered within [`CLOSE_TIMEOUT`] (the
    /// channel is gone either way).
    pub async fn close(&self) -> Result<(), AmqpError> {
        tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, "consumer closed".into()))
            .await
            .map_err(|_| AmqpError::Lost)??;
        Ok(())
    }
}

/// Reads queues' depths (a passive `queue.declare`) on a channel of its own.
#[derive(Debug)]
pub struct Gauge {
    channel: Channel,
}

impl Gauge {
    /// Messages ready in `queue` (not those delivered and unacknowledged)
    /// and consumers attached to it.
    ///
    /// # Errors
    /// The queue does not exist (which closes the channel), or the channel
    /// failed.
    pub async fn depth(&self, queue: &str) -> Result<(u32, u32), AmqpError> {
        let declared = self
            .channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await?;
        Ok((declared.message_count(), declared.consumer_count()))
    }
}

/// Messages taken from one queue one at a time (`basic.get`), each left
/// unacknowledged until settled. Unlike a [`Consumer`], which the broker
/// fills up to its prefetch, it holds only what it took.
#[derive(Debug)]
pub struct Taker {
    channel: Channel,
    queue: String,
    connection: lapin::ConnectionStatus,
}

impl Taker {
    /// The queue's next message, `None` when it has none ready.
    ///
    /// # Errors
    /// The channel or connection failed.
    pub async fn take(&self) -> Result<Option<Delivery>, AmqpError> {
        let got = guarded(
            &self.connection,
            self.channel
                .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: false }),
        )
        .await?;
        Ok(got.map(|m| Delivery::new(m.delivery, self.channel.clone())))
    }

    /// Close the channel: the messages taken and not settled go back to
    /// the queue.
    ///
    /// # Errors
    /// The close failed or was not answered within [`CLOSE_TIMEOUT`] (the
    /// channel is gone either way).
    pub async fn close(&self) -> Result<(), AmqpError> {
        tokio::time::timeout(CLOSE_TIMEOUT, self.channel.close(200, "taker closed".into()))
            .await
            .map_err(|_| AmqpError::Lost)??;
        Ok(())
    }
}

/// One received message.
#[derive(Debug)]
pub struct Delivery {
    /// Body bytes.
    pub body: Vec<u8>,
    /// AMQP `message_id`.
    pub message_id: Option<String>,
    /// AMQP `correlation_id`.
    pub correlation_id: Option<String>,
    /// Application headers (string and integer values).
    pub headers: BTreeMap<String, Header>,
    /// Whether the broker delivered it before.
    pub redelivered: bool,
    /// The routing key it was published with (the pool, for tasks).
    pub routing_key: String,
    /// The broker's latest dead-lettering of it, if it dead-lettered it.
    pub death: Option<Death>,
    acker: lapin::Acker,
    /// lapin closes a channel when its last handle is dropped, which would
    /// requeue this delivery: keep the channel open while it can be acked.
    _channel: Channel,
}

impl Delivery {
    fn new(d: lapin::message::Delivery, channel: Channel) -> Self {
        let headers = d
            .properties
            .headers()
            .as_ref()
            .map(|table| {
                table
                    .inner()
                    .iter()
                    .filter_map(|(k, v)| {
                        let value = match v {
                            AMQPValue::LongString(s) => Header::Str(String::from_utf8_lossy(s.as_bytes()).into_owned()),
                            AMQPValue::ShortString(s) => Header::Str(s.as_str().to_string()),
                            AMQPValue::LongLongInt(i) => Header::Int(*i),
                            AMQPValue::LongInt(i) => Header::Int(i64::from(*i)),
                            AMQPValue::LongUInt(i) => Header::Int(i64::from(*i)),
                            AMQPValue::ShortInt(i) => Header::Int(i64::from(*i)),
                            AMQPValue::ShortUInt(i) => Header::Int(i64::from(*i)),
                            AMQPValue::ShortShortInt(i) => Header::Int(i64::from(*i)),
                            AMQPValue::ShortShortUInt(i) => Header::Int(i64::from(*i)),
                            _ => return None,
                        };
                        Some((k.as_str().to_string(), value))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let death = d.properties.headers().as_ref().and_then(Death::latest);
        Self {
            body: d.data,
            message_id: d.properties.message_id().as_ref().map(|s| s.as_str().to_string()),
            correlation_id: d.properties.correlation_id().as_ref().map(|s| s.as_str().to_string()),
            headers,
            death,
            redelivered: d.redelivered,
            routing_key: d.routing_key.as_str().to_string(),
            acker: d.acker,
            _channel: channel,
        }
    }

    /// A string header.
    pub fn header_str(&self, key: &str) -> Option<&str> {
        match self.headers.get(key) {
            Some(Header::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// An integer header.
    pub fn header_int(&self, key: &str) -> Option<i64> {
        match self.headers.get(key) {
            Some(Header::Int(i)) => Some(*i),
            _ => None,
        }
    }

    /// Acknowledge: the broker forgets the message.
    ///
    /// # Errors
    /// The channel is gone; the broker will redeliver the message.
    pub async fn ack(&self) -> Result<(), AmqpError> {
        settled(self.acker.ack(BasicAckOptions::default())).await
    }

    /// Acknowledge this delivery and every earlier unacknowledged one on its
    /// channel, in one frame.
    ///
    /// # Errors
    /// The channel is gone; the broker will redeliver the messages.
    pub async fn ack_all_up_to(&self) -> Result<(), AmqpError> {
        settled(self.acker.ack(BasicAckOptions { multiple: true })).await
    }

    /// Reject without requeue: the message is dead-lettered.
    ///
    /// # Errors
    /// The channel is gone; the broker will redeliver the message.
    pub async fn reject(&self) -> Result<(), AmqpError> {
        settled(self.acker.reject(BasicRejectOptions { requeue: false })).await
    }

    /// Reject with requeue: the message goes back to its queue.
    ///
    /// # Errors
    /// The channel is gone; the broker will redeliver the message.
    pub async fn requeue(&self) -> Result<(), AmqpError> {
        settled(self.acker.reject(BasicRejectOptions { requeue: true })).await
    }
}

/// Why and from where the broker dead-lettered a message, from its latest
/// `x-death` entry (the first: a retry's task was dead-lettered from its
/// delay queue before, `expired`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Death {
    /// `delivery_limit`, `expired`, `rejected` or `maxlen`.
    pub reason: String,
    /// The queue it died in.
    pub queue: String,
}

impl Death {
    fn latest(headers: &FieldTable) -> Option<Self> {
        let AMQPValue::FieldArray(deaths) = headers.inner().get("x-death")? else {
            return None;
        };
        let AMQPValue::FieldTable(latest) = deaths.as_slice().first()? else {
            return None;
        };
        let text = |key: &str| match latest.inner().get(key) {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_string()),
            _ => None,
        };
        Some(Self {
            reason: text("reason")?,
            queue: text("queue").unwrap_or_default(),
        })
    }
}

/// Wait for a settlement, at most [`SETTLE_TIMEOUT`]. lapin reports `false`
/// when the delivery's channel is gone or it was already settled: either way
/// (or on timeout) the broker will redeliver it, so say so.
async fn settled(settle: impl std::future::Future<Output = lapin::Result<bool>>) -> Result<(), AmqpError> {
    match tokio::time::timeout(SETTLE_TIMEOUT, settle).await {
        Ok(Ok(true)) => Ok(()),
        Ok(Ok(false)) | Err(_) => Err(AmqpError::NotSettled),
        Ok(Err(e)) => Err(e.into()),
    }
}
