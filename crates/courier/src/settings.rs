//! Runtime settings, layered: built-in defaults < `<config-dir>/courier.toml`
//! < `COURIER_*` environment variables < command-line flags.
//!
//! Unknown keys in `courier.toml` are errors. Every key can be set in the
//! environment as `COURIER_<KEY>` (for example `COURIER_AMQP_URL`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Every runtime setting, with its built-in default.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Broker URL.
    pub amqp_url: String,
    /// Prefix of every exchange and queue name.
    pub namespace: String,
    /// The config folder (workflows/ and agents/).
    pub config_dir: PathBuf,
    /// The scheduler's data folder (its SQLite database when `database_url`
    /// is unset, and `api.addr`).
    pub data_dir: PathBuf,
    /// A PostgreSQL database (`postgres://user:pass@host/db`) instead of
    /// SQLite in the data folder: several schedulers may share it.
    pub database_url: Option<String>,
    /// Replicas of each quorum queue when it is first declared
    /// (`x-quorum-initial-group-size`; unset: every node of the cluster).
    pub quorum_group_size: Option<u32>,
    /// Where the scheduler's HTTP API listens.
    pub api_listen: SocketAddr,
    /// Where the CLI finds the scheduler's HTTP API.
    pub api_url: String,
    /// RabbitMQ's management API, for `courier status` (credentials in the URL).
    pub management_url: String,
    /// Steps a worker runs at once.
    pub worker_concurrency: usize,
    /// Pools a worker consumes, comma-separated.
    pub worker_queues: String,
    /// A worker's name (default: hostname and process id).
    pub worker_id: Option<String>,
    /// Where a worker serves `/metrics` and `/healthz` (off when unset).
    pub worker_metrics_listen: Option<SocketAddr>,
    /// Redeliveries a task queue allows before dead-lettering.
    pub delivery_limit: u32,
    /// Largest snapshot frame, bytes.
    pub snapshot_max_compressed: usize,
    /// Largest decoded snapshot, bytes.
    pub snapshot_max_decompressed: usize,
    /// Largest task or result frame, bytes.
    pub task_max_compressed: usize,
    /// Largest decoded task or result, bytes.
    pub task_max_decompressed: usize,
    /// Seconds a due task may wait for a worker before it expires (workers
    /// refuse a task after that plus its step's timeout).
    pub task_max_wait_secs: u64,
    /// The most a command may write to stdout, its output: more fails the step.
    pub output_max_bytes: usize,
    /// Seconds in-flight steps get to finish after SIGTERM.
    pub shutdown_grace_secs: u64,
    /// Seconds to keep trying to reach the broker.
    pub connect_timeout_secs: u64,
    /// Log format: `text` or `json`.
    pub log_format: String,
    /// An OTLP/HTTP receiver (`http://jaeger:4318`): spans exported there.
    pub otlp_endpoint: Option<String>,
    /// HMAC key: the scheduler signs tasks, workers refuse unsigned ones.
    pub signing_key: Option<String>,
    /// ID of the signing key, carried in the signature (for rotation).
    pub signing_key_id: String,
    /// Bearer token every `/api/...` request must carry (and the CLI sends).
    pub api_token: Option<String>,
    /// Let the API listen beyond loopback without a token.
    pub api_allow_anonymous: bool,
    /// Where the scheduler also serves `/metrics` and `/healthz` without the
    /// token (for Prometheus inside a private network; off when unset).
    pub scheduler_metrics_listen: Option<SocketAddr>,
    /// Worker environment variables passed on to command steps, comma-separated.
    pub worker_env_passthrough: String,
    /// Run command steps as this user (name or numeric uid) instead of the worker's.
    pub step_user: Option<String>,
    /// Per-pool limits the scheduler enforces (`[pools.<name>]` in courier.toml).
    #[serde(default)]
    pub pools: std::collections::BTreeMap<String, PoolSettings>,
}

/// `[pools.<name>]`: limits on one worker pool, whatever the number of workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSettings {
    /// Tasks of the pool dispatched and without a result at most; more steps wait.
    pub max_in_flight: Option<u32>,
    /// Tasks waiting in the pool's broker queue at most (256 by default; up
    /// to 64 of it in its lane's, and in the pool's own while the lane is
    /// busy); more steps wait at the scheduler, taking turns between runs.
    /// 0: no limit (the broker's queues hold the backlog, first come first
    /// served).
    pub max_queued: Option<u32>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Everything but the signing key.
        let redacted = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("Settings")
            .field("namespace", &self.namespace)
            .field("config_dir", &self.config_dir)
            .field("data_dir", &self.data_dir)
            .field(
                "database_url",
                &self.database_url.as_deref().map(courier_scheduler::db::redact),
            )
            .field("signing_key", &redacted(&self.signing_key))
            .field("api_token", &redacted(&self.api_token))
            .finish_non_exhaustive()
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            amqp_url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            namespace: "courier".into(),
            config_dir: "config".into(),
            data_dir: "data".into(),
            database_url: None,
            quorum_group_size: None,
            api_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_url: "http://127.0.0.1:8080".into(),
            management_url: "http://guest:guest@127.0.0.1:15672".into(),
            worker_concurrency: 4,
            worker_queues: courier_config::DEFAULT_QUEUE.into(),
            worker_id: None,
            worker_metrics_listen: None,
            delivery_limit: courier_amqp::DEFAULT_DELIVERY_LIMIT,
            snapshot_max_compressed: courier_wire::DEFAULT_MAX_COMPRESSED,
            snapshot_max_decompressed: courier_wire::DEFAULT_MAX_DECOMPRESSED,
            task_max_compressed: 4 * 1024 * 1024,
            task_max_decompressed: 16 * 1024 * 1024,
            task_max_wait_secs: courier_scheduler::engine::DEFAULT_MAX_QUEUE_WAIT.as_secs(),
            output_max_bytes: 1024 * 1024,
            shutdown_grace_secs: 30,
            connect_timeout_secs: 60,
            log_format: "text".into(),
            otlp_endpoint: None,
            signing_key: None,
            signing_key_id: "default".into(),
            api_token: None,
            api_allow_anonymous: false,
            scheduler_metrics_listen: None,
            worker_env_passthrough: String::new(),
            step_user: None,
            pools: std::collections::BTreeMap::new(),
        }
    }
}

/// Keys accepted from the environment (as `COURIER_<KEY>`).
const ENV_KEYS: &[&str] = &[
    "amqp_url",
    "namespace",
    "config_dir",
    "data_dir",
    "database_url",
    "quorum_group_size",
    "api_listen",
    "api_url",
    "management_url",
    "worker_concurrency",
    "worker_queues",
    "worker_id",
    "worker_metrics_listen",
    "delivery_limit",
    "snapshot_max_compressed",
    "snapshot_max_decompressed",
    "task_max_compressed",
    "task_max_decompressed",
    "task_max_wait_secs",
    "output_max_bytes",
    "shutdown_grace_secs",
    "connect_timeout_secs",
    "log_format",
    "otlp_endpoint",
    "signing_key",
    "signing_key_id",
    "api_token",
    "api_allow_anonymous",
    "scheduler_metrics_listen",
    "worker_env_passthrough",
    "step_user",
];

impl Settings {
    /// Load the layers. `flags` holds only the flags given on the command line.
    ///
    /// # Errors
    /// A bad `courier.toml` (syntax, unknown key, wrong type) or a bad value.
    pub fn load(flags: serde_json::Map<String, serde_json::Value>) -> anyhow::Result<Self> {
        let env = || Env::prefixed("COURIER_").only(ENV_KEYS);
        // The config folder decides where courier.toml is, so resolve it first.
        let config_dir: PathBuf = Figment::from(Serialized::defaults(Settings::default()))
            .merge(env())
            .merge(Serialized::defaults(&flags))
            .extract_inner("config_dir")
            .context("config_dir")?;
        let file = config_dir.join("courier.toml");
        let settings: Settings = Figment::from(Serialized::defaults(Settings::default()))
            .merge(Toml::file(&file))
            .merge(env())
            .merge(Serialized::defaults(&flags))
            .extract()
            .with_context(|| format!("settings (defaults < {} < COURIER_* < flags)", file.display()))?;
        if !matches!(settings.log_format.as_str(), "text" | "json") {
            anyhow::bail!(
                "log_format must be \"text\" or \"json\", not \"{}\"",
                settings.log_format
            );
        }
        if let Some(endpoint) = &settings.otlp_endpoint
            && !endpoint.starts_with("http://")
        {
            anyhow::bail!("otlp_endpoint must be an http:// URL (an OTLP/HTTP receiver, port 4318; no TLS)");
        }
        if settings.quorum_group_size == Some(0) {
            anyhow::bail!("quorum_group_size must be at least 1 (leave it out for every node)");
        }
        if let Some(pool) = settings.pools.keys().find(|p| !courier_config::is_slug(p)) {
            anyhow::bail!(
                "pools.{pool}: a pool's name is a slug (lowercase letters, digits and '-'); a pool's lane has no settings of its own, [pools.<pool>] covers both its queues"
            );
        }
        if let Some((pool, _)) = settings.pools.iter().find(|(_, p)| p.max_in_flight == Some(0)) {
            anyhow::bail!("pools.{pool}.max_in_flight must be at least 1 (leave it out for none)");
        }
        Ok(settings)
    }

    /// Exchange and queue names.
    pub fn names(&self) -> courier_amqp::Names {
        courier_amqp::Names::new(self.namespace.clone())
    }

    /// Snapshot size bounds.
    pub fn snapshot_limits(&self) -> courier_wire::Limits {
        courier_wire::Limits {
            max_compressed: self.snapshot_max_compressed,
            max_decompressed: self.snapshot_max_decompressed,
        }
    }

    /// Task and result size bounds.
    pub fn task_limits(&self) -> courier_wire::Limits {
        courier_wire::Limits {
            max_compressed: self.task_max_compressed,
            max_decompressed: self.task_max_decompressed,
        }
    }

    /// The signing key, when one is configured.
    pub fn signing_key(&self) -> Option<courier_wire::SigningKey> {
        self.signing_key
            .as_ref()
            .filter(|k| !k.is_empty())
            .map(|k| courier_wire::SigningKey::new(self.signing_key_id.clone(), k.as_bytes().to_vec()))
    }

    /// The API token, when one is configured (an empty value is none).
    pub fn api_token(&self) -> Option<&str> {
        self.api_token.as_deref().filter(|t| !t.is_empty())
    }

    /// The config folder, for messages.
    pub fn config_dir(&self) -> &Path {
        &self.config_dir
    }
}

/// Collect flags that were given into a map for the top layer.
#[derive(Debug, Default)]
pub struct Flags(pub serde_json::Map<String, serde_json::Value>);

impl Flags {
    /// Set `key` when the flag was given.
    pub fn set<T: Serialize>(&mut self, key: &str, value: Option<T>) -> &mut Self {
        if let Some(v) = value.and_then(|v| serde_json::to_value(v).ok()) {
            self.0.insert(key.to_string(), v);
        }
        self
    }
}
