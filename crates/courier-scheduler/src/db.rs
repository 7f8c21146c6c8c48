//! Run, step and task state, in SQLite or PostgreSQL: the scheduler's durable memory.
//!
//! The `tasks` table is also the outbox: a task row is written in the same
//! transaction that decides to dispatch it, and published afterwards; rows not
//! yet confirmed by the broker are published again after a restart. Rows hold
//! no task bodies: a task is rebuilt from its row, the run's params and the
//! upstream outputs, so the database only stores what is needed for that.

use std::collections::HashSet;
use std::path::Path;
use std::time::Duration;

use rusqlite::Connection;
use serde::Serialize;

pub use sql::{DbError, Row, Tx};
use sql::{PgStatements, p};

// Statuses are written as values from the enums, but filtered on as
// literals ('pending', 'waiting', 'running', 'succeeded', 'dispatched',
// 'cancelled'; `literals_name_the_statuses` checks them against the enums):
// SQLite re-prepares a statement each time a parameter compared with a
// column that a partial index filters on is bound anew, and that
// re-preparing (with a statement cache too small to keep them all) cost
// about a sixth of the scheduler's CPU at 400 runs/s.

/// A step's columns whole, as [`step_from_row`] reads them (none left out).
macro_rules! step_columns {
    () => {
        "SELECT name, queue, status, attempts, output, error, worker, started_ms, finished_ms,
                model, input_tokens, output_tokens, transcript, waiting_on, cost, CAST(NULL AS BIGINT)"
    };
}
/// A run's own columns, as [`run_from_row`] reads them first.
macro_rules! run_columns {
    () => {
        "SELECT r.id, r.workflow, r.status,
        (SELECT params FROM run_params WHERE run_id = r.id), r.created_ms, r.finished_ms, r.error,
        r.priority, r.deadline_ms, r.cancelled_by, r.parent_run, r.parent_step,"
    };
}

/// About the most an API runs list (held whole in memory) reads of its
/// runs' params: past it the list stops early, and the client pages on with
/// `before=`. (The UI's list reads no params: `Db::run_summaries`.)
pub const MAX_LIST_BYTES: usize = 8 * 1024 * 1024;

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = schema::SQLITE.len() as i64;

/// Declares a status enum stored as snake_case text, shown as the same text.
macro_rules! status_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vdoc])* $variant),+ }

        impl $name {
            /// Every status, in declaration order.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The stored and displayed name.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            /// The status of that name.
            pub fn parse(s: &str) -> Option<Self> {
                match s { $($text => Some($name::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.pad(self.as_str())
            }
        }
    };
}

status_enum!(
    /// Status of a run.
    RunStatus {
        /// Steps are pending, waiting or running.
        Running => "running",
        /// Every step succeeded.
        Succeeded => "succeeded",
        /// A step failed (the rest were skipped or finished).
        Failed => "failed",
        /// Cancelled by a person, its timeout or its budget.
        Cancelled => "cancelled",
    }
);

status_enum!(
    /// Status of a step.
    StepStatus {
        /// Its dependencies have not all succeeded yet.
        Pending => "pending",
        /// Ready, held by a limit (`waiting_on` names it).
        Waiting => "waiting",
        /// A task of it is dispatched.
        Running => "running",
        /// An approval step: waits for `courier approve` or `reject`.
        WaitingApproval => "waiting_approval",
        /// Done.
        Succeeded => "succeeded",
        /// Failed for good (retries spent).
        Failed => "failed",
        /// Never ran: an upstream step failed or was cancelled.
        Skipped => "skipped",
        /// Cancelled before it finished.
        Cancelled => "cancelled",
    }
);

impl StepStatus {
    /// Whether the step may still change (the run is not done while one is).
    pub fn is_open(self) -> bool {
        matches!(
            self,
            StepStatus::Pending | StepStatus::Waiting | StepStatus::Running | StepStatus::WaitingApproval
        )
    }
}

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] DbError),
    /// The database was written by a newer Courier.
    #[error(
        "the database has schema version {found}, newer than this build knows ({known}): it was written by a newer Courier; run that version, or point this one at another database"
    )]
    TooNew { found: i64, known: i64 },
    /// `database_url` is not one this build can use (not echoed: it may
    /// hold a password).
    #[error("database_url is not a postgres:// or postgresql:// URL (leave it unset for SQLite in the data folder)")]
    BadUrl,
    /// The WAL checkpointer's thread could not start.
    #[error("cannot start the database's checkpoint thread: {0}")]
    Thread(#[source] std::io::Error),
}

impl From<rusqlite::Error> for OpenError {
    fn from(e: rusqlite::Error) -> Self {
        OpenError::Store(e.into())
    }
}

impl From<postgres::Error> for OpenError {
    fn from(e: postgres::Error) -> Self {
        OpenError::Store(e.into())
    }
}

/// The scheduler's database: a SQLite file of its own, or a PostgreSQL
/// database shared with other schedulers.
pub struct Db {
    store: Store,
    /// SQLite: the thread that checkpoints its WAL, stopped when this is
    /// dropped (its channel closes).
    _checkpoints: Option<std::sync::mpsc::Sender<()>>,
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// A WAL this long (pages, 40 MB) is started over even if commits must
/// wait for it (see `checkpoint_in_background`).
const WAL_RESTART_PAGES: i64 = 10_000;

/// Checkpoint the SQLite database at `path` from a connection of its own,
/// every [`CHECKPOINT_EVERY`], until `stop`'s sender is dropped. A PASSIVE
/// checkpoint copies what it can without waiting for the writer or readers,
/// and the writer never waits for it: with SQLite's automatic checkpoint at
/// 1,000 pages, the transaction that crossed them did the whole copy and
/// held the engine for it (p99 at 400 one-step runs/s: 17–23 ms before, see
/// the README's benchmarks). The WAL starts over once a checkpoint has
/// caught up. Commits that never leave it a gap would keep it from ever
/// catching up (SQLite's own checkpoint in the committing thread finds
/// this one busy most of the time, and the WAL grew to 122 MB): past
/// [`WAL_RESTART_PAGES`] a RESTART checkpoint makes writers wait while it
/// copies the rest, and the next commit starts the WAL over.
fn checkpoint_in_background(path: &Path, stop: std::sync::mpsc::Receiver<()>) -> Result<(), OpenError> {
    let conn = Connection::open(path)?;
    // Only RESTART waits (PASSIVE never does): for the engine's current
    // transaction, not for as long as an outside reader may hold the WAL.
    conn.busy_timeout(std::time::Duration::from_millis(100))?;
    std::thread::Builder::new()
        .name("sqlite-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(CHECKPOINT_EVERY) {
                // (busy, frames in the WAL, frames copied)
                let frames = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                    Ok((r.get::<_, i64>(1)?, r.get::<_, i64>(2)?))
                });
                // Commits that never leave a gap: wait for the writer (briefly:
                // a RESTART that gives up is tried again next time), copy the
                // rest, and make the next commit start the WAL over. A WAL
                // copied whole starts over at the next commit by itself.
                let checkpointed = match frames {
                    Ok((log, copied)) if log >= WAL_RESTART_PAGES && copied < log => {
                        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))
                    }
                    other => other.map(|_| ()),
                };
                if let Err(e) = checkpointed {
                    tracing::warn!(error = %e, "WAL checkpoint failed; the next one tries again");
                }
            }
        })
        .map_err(OpenError::Thread)?;
    Ok(())
}

// One per scheduler: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Store {
    Sqlite(Connection),
    Postgres {
        url: String,
        /// `None` once dropped, or after a failed reconnection.
        client: Option<postgres::Client>,
        /// Statements prepared on `client`, kept for its life.
        stmts: PgStatements,
    },
}

impl Drop for Db {
    fn drop(&mut self) {
        // PostgreSQL's client closes by blocking on its own runtime, which
        // panics on a thread of another runtime: close it on a thread of its own.
        if let Store::Postgres { client, .. } = &mut self.store
            && tokio::runtime::Handle::try_current().is_ok()
            && let Some(client) = client.take()
        {
            std::thread::spawn(move || drop(client));
        }
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self.store {
            Store::Sqlite(_) => "Db(SQLite)",
            Store::Postgres { .. } => "Db(PostgreSQL)",
        })
    }
}

/// The PostgreSQL advisory lock every writing transaction holds until it
/// ends: the schedulers sharing a database change it one at a time, as
/// SQLite's single writer does, so the engine's read-then-write steps see
/// no other scheduler's half-done change.
const WRITE_LOCK: i64 = 0x636f_7572_6965_7201;

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunView {
    pub id: String,
    pub workflow: String,
    pub status: RunStatus,
    /// As stored: JSON text, served as it is (not parsed and re-escaped).
    pub params: JsonText,
    /// 0 (lowest) to 9; 4 is normal.
    pub priority: u8,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// When the run's `timeout` stops it.
    pub deadline_ms: Option<i64>,
    pub error: Option<String>,
    /// Who cancelled it (`timeout` and `budget` for those).
    pub cancelled_by: Option<String>,
    /// A child run: the run and the `workflow:` step that started it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_run: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_step: Option<String>,
    /// Prompt tokens of every agent step.
    pub input_tokens: i64,
    /// Completion tokens of every agent step.
    pub output_tokens: i64,
    /// Cost of every agent step whose model has prices.
    pub cost: f64,
    pub steps: Vec<StepView>,
}

/// JSON text read from the store, served verbatim: a run's params (often
/// the largest part of a run, such as a prompt) are neither parsed into a
/// tree when read nor escaped again when served.
#[derive(Debug, Clone, Serialize)]
#[serde(transparent)]
pub struct JsonText(Box<serde_json::value::RawValue>);

impl JsonText {
    /// The text if it is JSON, else `null` (a row from before params were
    /// kept apart holds an empty string).
    fn new(text: String) -> Self {
        Self(serde_json::value::RawValue::from_string(text).unwrap_or_default())
    }

    /// The text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// Parsed, for callers that look inside.
    pub fn value(&self) -> serde_json::Value {
        serde_json::from_str(self.0.get()).unwrap_or_default()
    }
}

impl PartialEq for JsonText {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

/// A run as a list shows it ([`Db::run_summaries`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub id: String,
    pub workflow: String,
    pub status: RunStatus,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    /// Tokens spent by the run's agent steps and its sub-workflows' runs.
    pub tokens: i64,
    /// Their cost, where the models have prices.
    pub cost: f64,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepView {
    pub name: String,
    pub queue: String,
    pub status: StepStatus,
    /// A waiting step: the limit that holds it.
    pub waiting_on: Option<String>,
    pub attempts: i64,
    pub output: Option<String>,
    pub error: Option<String>,
    pub worker: Option<String>,
    pub started_ms: Option<i64>,
    pub finished_ms: Option<i64>,
    /// Agent steps: `provider/model`.
    pub model: Option<String>,
    /// Agent steps: prompt tokens.
    pub input_tokens: Option<i64>,
    /// Agent steps: completion tokens.
    pub output_tokens: Option<i64>,
    /// Agent steps whose model has prices: what the attempts cost.
    pub cost: Option<f64>,
    /// Agent steps: the conversation (`[{role, content}]`).
    pub transcript: Option<serde_json::Value>,
    /// Bytes of the output, error and transcript, when they are left out of a
    /// run's view (past [`RUN_VIEW_BYTES`]; the step then shows its name,
    /// queue, status and attempts alone): `GET /api/runs/{id}/steps/{name}`
    /// has it whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub left_out_bytes: Option<i64>,
}

/// Most bytes of outputs, errors and transcripts a run's view holds, in step
/// order; the steps past it are shown without them (a foreach of 10,000
/// items of 1 MiB each would otherwise be a 10 GB answer, built in memory).
pub const RUN_VIEW_BYTES: i64 = 16 * 1024 * 1024;

/// A task row to publish.
#[derive(Debug, Clone)]
pub struct OutboxTask {
    pub task_id: String,
    pub run_id: String,
    pub step: String,
    pub queue: String,
    pub attempt: u32,
    pub snapshot_hash: String,
    /// Not to run before this time (ms since the epoch): retries wait in a
    /// delay queue until then.
    pub not_before_ms: i64,
    /// The run's priority.
    pub priority: u8,
    /// Its run is small: it goes to its pool's lane (see
    /// `courier_amqp::lane_key`). Read from the database, it is the
    /// engine's to set, from the run's workflow.
    pub lane: bool,
}

impl OutboxTask {
    /// Its routing key: its pool, or its pool's lane.
    pub fn route(&self) -> std::borrow::Cow<'_, str> {
        if self.lane {
            courier_amqp::lane_key(&self.queue).into()
        } else {
            self.queue.as_str().into()
        }
    }
}

/// What a task row says about an attempt.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    /// No result has been applied for it yet.
    pub dispatched: bool,
}

/// A cancellation to broadcast to every worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlRow {
    pub id: i64,
    pub run_id: String,
    pub step: Option<String>,
    pub reason: String,
}

/// The status stored for a task with no result yet.
pub const DISPATCHED: &str = "dispatched";

impl Db {
    /// Open the store `database_url` names (PostgreSQL), or, when it is
    /// unset, the SQLite file in `data_dir`.
    ///
    /// # Errors
    /// As [`Db::open`] and [`Db::connect`].
    pub fn open_store(data_dir: &Path, database_url: Option<&str>) -> Result<Self, OpenError> {
        match database_url {
            Some(url) => Self::connect(url),
            None => Self::open(&data_dir.join("courier.db")),
        }
    }

    /// Open (creating if needed) the SQLite database at `path`, migrating it
    /// to [`SCHEMA_VERSION`].
    ///
    /// # Errors
    /// SQLite could not open or migrate the file, or it is newer than this build.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Checkpoints run on a thread of their own (see
        // `checkpoint_in_background`), which also starts the WAL over past
        // WAL_RESTART_PAGES. SQLite's own checkpoint at the same length is
        // the last resort should that thread stall. The file is cut back
        // to 64 MiB when it starts over.
        conn.pragma_update(None, "wal_autocheckpoint", WAL_RESTART_PAGES)?;
        conn.pragma_update(None, "journal_size_limit", 64 * 1024 * 1024)?;
        // A statement over many rows (64 inserted or marked at once) keeps
        // its statement journal past 64 KiB in memory, not in a temporary
        // file created, written and deleted each time (about 40 of them,
        // 4,400 writes, per 20,000 tasks).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        // Every statement of the engine stays prepared (rusqlite keeps 16).
        conn.set_prepared_statement_cache_capacity(256);
        let (checkpoints, stop) = std::sync::mpsc::channel();
        checkpoint_in_background(path, stop)?;
        let mut db = Self {
            store: Store::Sqlite(conn),
            _checkpoints: Some(checkpoints),
        };
        db.migrate()?;
        Ok(db)
    }

    /// Connect to the PostgreSQL database at `url` (`postgres://...`),
    /// migrating it to [`SCHEMA_VERSION`] (one scheduler at a time).
    ///
    /// # Errors
    /// The URL is not PostgreSQL's, the server refused, or the schema is
    /// newer than this build.
    pub fn connect(url: &str) -> Result<Self, OpenError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Err(OpenError::BadUrl);
        }
        let client = pg_client(url)?;
        let mut db = Self {
            store: Store::Postgres {
                url: url.to_owned(),
                client: Some(client),
                stmts: PgStatements::new(),
            },
            _checkpoints: None,
        };
        db.migrate()?;
        Ok(db)
    }

    /// Whether this is a PostgreSQL database (shared by several schedulers).
    pub fn is_shared(&self) -> bool {
        matches!(self.store, Store::Postgres { .. })
    }

    /// The schema version of the open database.
    ///
    /// # Errors
    /// The store's.
    pub fn schema_version(&mut self) -> Result<i64, DbError> {
        self.read(schema::version)
    }

    fn migrate(&mut self) -> Result<(), OpenError> {
        let shared = self.is_shared();
        self.begin(true, |tx| schema::migrate(tx, shared))
    }

    /// Run `f` in one transaction, committed when it returns `Ok`: on
    /// PostgreSQL, it holds the write lock (`WRITE_LOCK`) throughout.
    ///
    /// # Errors
    /// `f`'s error, or the store's.
    pub fn transaction<T, E: From<DbError>>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        self.begin(true, f)
    }

    /// Run reads in one transaction (a consistent view; no write lock).
    ///
    /// # Errors
    /// `f`'s error, or the store's.
    pub fn read<T, E: From<DbError>>(&mut self, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        self.begin(false, f)
    }

    fn begin<T, E: From<DbError>>(&mut self, write: bool, f: impl FnOnce(&Tx<'_>) -> Result<T, E>) -> Result<T, E> {
        let tx = match &mut self.store {
            Store::Sqlite(conn) => Tx::sqlite(sql::SqliteTx::begin(conn, write).map_err(DbError::from)?),
            Store::Postgres { url, client, stmts } => {
                // A server that restarted ended the session: found out by
                // polling the connection (no round trip), then a new one,
                // whose statements are prepared anew.
                let dead = client.as_mut().is_none_or(|c| {
                    use postgres::fallible_iterator::FallibleIterator;
                    c.is_closed() || c.notifications().iter().next().is_err()
                });
                if dead {
                    tracing::warn!("PostgreSQL connection lost; reconnecting");
                    stmts.clear();
                    *client = None;
                    *client = Some(pg_client(url)?);
                }
                let client = client
                    .as_mut()
                    .ok_or_else(|| DbError::new("PostgreSQL", "not connected"))?;
                let pg = if write {
                    let mut pg = client.transaction().map_err(DbError::from)?;
                    pg.execute("SELECT pg_advisory_xact_lock($1)", &[&WRITE_LOCK])
                        .map_err(DbError::from)?;
                    pg
                } else {
                    // One snapshot for every statement of the read.
                    client
                        .build_transaction()
                        .isolation_level(postgres::IsolationLevel::RepeatableRead)
                        .read_only(true)
                        .start()
                        .map_err(DbError::from)?
                };
                Tx::postgres(pg, stmts)
            }
        };
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Tasks not yet confirmed by the broker, soonest first: of the first
    /// `limit`, those not in `skip` (published, their confirms awaited),
    /// and whether there were `limit` of them (more may wait). `small` says
    /// which workflows' runs are small (their tasks take the lanes).
    ///
    /// # Errors
    /// The store's.
    pub fn unpublished_tasks(
        &mut self,
        limit: usize,
        skip: &HashSet<String>,
        small: &dyn Fn(&str) -> bool,
    ) -> Result<(Vec<OutboxTask>, bool), DbError> {
        // The limit is part of the text: SQLite plans with a bound LIMIT's
        // value, so it would prepare the statement again on every call.
        let sql = format!(
            "SELECT t.task_id, t.run_id, t.step, t.queue, t.attempt, t.snapshot_hash, t.not_before_ms, r.priority, r.workflow
             FROM tasks t JOIN runs r ON r.id = t.run_id
             WHERE t.published = 0 AND t.status = 'dispatched' ORDER BY t.not_before_ms LIMIT {limit}"
        );
        self.read(|tx| {
            let rows = tx.all(&sql, p![], |r| {
                let task_id: String = r.get(0)?;
                if skip.contains(&task_id) {
                    return Ok(None);
                }
                Ok(Some(OutboxTask {
                    task_id,
                    run_id: r.get(1)?,
                    step: r.get(2)?,
                    queue: r.get(3)?,
                    attempt: r.get(4)?,
                    snapshot_hash: r.get(5)?,
                    not_before_ms: r.get(6)?,
                    priority: r.get(7)?,
                    lane: small(&r.get::<String>(8)?),
                }))
            })?;
            let full = rows.len() == limit;
            Ok((rows.into_iter().flatten().collect(), full))
        })
    }

    /// Mark tasks as confirmed by the broker, many per statement
    /// ([`sql::Batched`]).
    ///
    /// # Errors
    /// The store's.
    pub fn mark_published(&mut self, task_ids: &[String]) -> Result<(), DbError> {
        static MARK: sql::Batched = sql::Batched::new(|n| {
            format!(
                "UPDATE tasks SET published = 1 WHERE task_id IN ({})",
                sql::placeholders(1, n)
            )
        });
        self.transaction(|tx| {
            let params: Vec<&dyn sql::Param> = task_ids.iter().map(|id| id as &dyn sql::Param).collect();
            tx.exec_batched(&MARK, 1, &params)?;
            Ok(())
        })
    }

    /// Cancellations not yet confirmed by the broker, oldest first.
    ///
    /// # Errors
    /// The store's.
    pub fn unpublished_controls(&mut self, limit: usize) -> Result<Vec<ControlRow>, DbError> {
        let sql =
            format!("SELECT id, run_id, step, reason FROM controls WHERE published = 0 ORDER BY id LIMIT {limit}");
        self.read(|tx| {
            tx.all(&sql, p![], |r| {
                Ok(ControlRow {
                    id: r.get(0)?,
                    run_id: r.get(1)?,
                    step: r.get(2)?,
                    reason: r.get(3)?,
                })
            })
        })
    }

    /// Mark cancellations as confirmed by the broker.
    ///
    /// # Errors
    /// The store's.
    pub fn mark_controls_published(&mut self, ids: &[i64]) -> Result<(), DbError> {
        self.transaction(|tx| {
            for id in ids {
                tx.exec("UPDATE controls SET published = 1 WHERE id = ?1", p![id])?;
            }
            Ok(())
        })
    }

    /// One step of a run (a foreach item: `name[i]`), its output and
    /// transcript whole.
    ///
    /// # Errors
    /// The store's.
    pub fn step(&mut self, run: &str, name: &str) -> Result<Option<StepView>, DbError> {
        self.read(|tx| {
            tx.opt(
                concat!(step_columns!(), " FROM steps WHERE run_id = ?1 AND name = ?2"),
                p![run, name],
                step_from_row,
            )
        })
    }

    /// One run with its steps, their outputs, errors and transcripts up to
    /// [`RUN_VIEW_BYTES`] in step order (those past it left out, with their
    /// size: [`Db::step`] has them).
    ///
    /// # Errors
    /// The store's.
    pub fn run(&mut self, id: &str) -> Result<Option<RunView>, DbError> {
        self.read(|tx| {
            // The totals are kept on the run. The steps' outputs and
            // transcripts are sized from their rows' headers (octet_length
            // reads no text): a run within the budget, nearly every one, is
            // read in one plain pass; a larger one ranks its steps first, so
            // a step past the budget is never read whole.
            let sql = concat!(
                run_columns!(),
                " r.input_tokens, r.output_tokens, r.cost,
                  (SELECT CAST(COALESCE(SUM(COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0)
                                            + COALESCE(octet_length(transcript), 0)), 0)
                          AS BIGINT) FROM steps WHERE run_id = r.id)
                 FROM runs r WHERE r.id = ?1"
            );
            let Some((mut run, total)) = tx.opt(sql, p![id], |r| Ok((run_from_row(r)?, r.get::<i64>(15)?)))? else {
                return Ok(None);
            };
            run.steps = if total <= RUN_VIEW_BYTES {
                tx.all(
                    concat!(
                        step_columns!(),
                        " FROM steps WHERE run_id = ?1 ORDER BY position, COALESCE(item_index, -1)"
                    ),
                    p![id],
                    step_from_row,
                )?
            } else {
                budgeted_steps(tx, id)?
            };
            Ok(Some(run))
        })
    }

    /// The newest `limit` runs, optionally filtered, as a list shows them:
    /// no params and no steps, and the spending kept on each run (its own
    /// and its sub-workflows'), so a list read often (the web UI's live
    /// runs page) costs the same whatever its runs hold.
    ///
    /// # Errors
    /// The store's.
    pub fn run_summaries(
        &mut self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunSummary>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT id, workflow, status, created_ms, finished_ms, spent_tokens, spent_cost FROM runs
                 WHERE (CAST(?1 AS TEXT) IS NULL OR workflow = ?1) AND (CAST(?2 AS TEXT) IS NULL OR status = ?2)
                 ORDER BY created_ms DESC, id DESC LIMIT ?3",
                p![workflow, status, limit],
                |r| {
                    Ok(RunSummary {
                        id: r.get(0)?,
                        workflow: r.get(1)?,
                        status: r.get(2)?,
                        created_ms: r.get(3)?,
                        finished_ms: r.get(4)?,
                        tokens: r.get(5)?,
                        cost: r.get(6)?,
                    })
                },
            )
        })
    }

    /// Runs, newest first, optionally filtered; with `before` (a run's id),
    /// only those older than it: the next page after a page ending with it.
    ///
    /// # Errors
    /// The store's.
    pub fn runs(
        &mut self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        before: Option<&str>,
        limit: usize,
    ) -> Result<Vec<RunView>, DbError> {
        self.runs_within(workflow, status, before, limit, usize::MAX)
    }

    /// [`Db::runs`] for an answer held in memory whole: read a few runs at
    /// a time, and stop once their params pass `max_bytes` (at least one
    /// run is given; `usize::MAX`: no bound, one read). The caller pages on
    /// with the last id as `before`.
    ///
    /// # Errors
    /// The store's.
    pub fn runs_within(
        &mut self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        before: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<RunView>, DbError> {
        let sql = format!(
            "{RUN_SELECT} WHERE (CAST(?1 AS TEXT) IS NULL OR r.workflow = ?1) AND (CAST(?2 AS TEXT) IS NULL OR r.status = ?2)
               AND (CAST(?4 AS TEXT) IS NULL OR (r.created_ms, r.id) < (SELECT created_ms, id FROM runs WHERE id = ?4))
             ORDER BY r.created_ms DESC, r.id DESC LIMIT ?3"
        );
        self.read(|tx| {
            let mut runs: Vec<RunView> = Vec::new();
            let mut bytes = 0;
            let mut cursor = before.map(str::to_string);
            while runs.len() < limit {
                let chunk = (limit - runs.len()).min(if max_bytes == usize::MAX { usize::MAX } else { 16 });
                let page = tx.all(&sql, p![workflow, status, chunk, cursor.as_deref()], run_from_row)?;
                let last = page.len() < chunk;
                for run in page {
                    // The params, and about as much again for the rest.
                    bytes += run.params.get().len() + 512;
                    if bytes > max_bytes && !runs.is_empty() {
                        return Ok(runs);
                    }
                    cursor = Some(run.id.clone());
                    runs.push(run);
                }
                if last {
                    break;
                }
            }
            Ok(runs)
        })
    }

    /// Whether a run of that id exists.
    ///
    /// # Errors
    /// The store's.
    pub fn has_run(&mut self, id: &str) -> Result<bool, DbError> {
        self.read(|tx| {
            Ok(tx
                .opt("SELECT 1 FROM runs WHERE id = ?1", p![id], |_| Ok(()))?
                .is_some())
        })
    }

    /// What a run's live page shows changing, read without touching any
    /// output (a step's status and attempts come before it in the row; a
    /// waiting step has none): the run's status and spending, its steps'
    /// count and attempts per status, the length of waiting steps' labels,
    /// its child runs' count per status; a few aggregates, whatever the
    /// run's width. `None` for an unknown run.
    ///
    /// # Errors
    /// The store's.
    pub fn run_fingerprint(&mut self, id: &str) -> Result<Option<String>, DbError> {
        self.read(|tx| {
            tx.opt(
                "SELECT r.status || '|' || CAST(r.input_tokens AS TEXT) || '|' || CAST(r.output_tokens AS TEXT)
                        || '|' || CAST(r.cost AS TEXT) || '|'
                        || COALESCE((SELECT string_agg(g.status || ':' || CAST(g.n AS TEXT) || ':' || CAST(g.a AS TEXT)
                                                       || ':' || CAST(g.w AS TEXT), ',' ORDER BY g.status)
                                     FROM (SELECT s.status, COUNT(*) AS n, SUM(s.attempts) AS a,
                                                  SUM(CASE WHEN s.status = 'waiting'
                                                      THEN 1 + length(COALESCE(s.waiting_on, '')) ELSE 0 END) AS w
                                           FROM steps s WHERE s.run_id = r.id GROUP BY s.status) g), '') || '|'
                        || COALESCE((SELECT string_agg(c.status || ':' || CAST(c.n AS TEXT), ',' ORDER BY c.status)
                                     FROM (SELECT status, COUNT(*) AS n FROM runs WHERE parent_run = r.id
                                           GROUP BY status) c), '')
                 FROM runs r WHERE r.id = ?1",
                p![id],
                |r| r.get(0),
            )
        })
    }

    /// A run's child runs (started by its `workflow:` steps): id, workflow, status.
    ///
    /// # Errors
    /// The store's.
    pub fn child_runs(&mut self, parent: &str) -> Result<Vec<(String, String, RunStatus)>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT id, workflow, status FROM runs WHERE parent_run = ?1 ORDER BY created_ms, id",
                p![parent],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
    }

    /// Milliseconds from each task's dispatch (outbox write) to its result
    /// being applied, for every finished task, sorted.
    ///
    /// # Errors
    /// The store's.
    pub fn task_latencies_ms(&mut self) -> Result<Vec<i64>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT finished_ms - created_ms FROM tasks WHERE finished_ms IS NOT NULL ORDER BY 1",
                p![],
                |r| r.get(0),
            )
        })
    }

    /// For each finished task of the runs of `workflow`: milliseconds from
    /// its run's submission to its dispatch (outbox write), and from its
    /// dispatch to its result applied. Where a one-step run's time goes.
    ///
    /// # Errors
    /// The store's.
    pub fn task_phases_ms(&mut self, workflow: &str) -> Result<Vec<(i64, i64)>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT t.created_ms - r.created_ms, t.finished_ms - t.created_ms
                   FROM tasks t JOIN runs r ON r.id = t.run_id
                  WHERE r.workflow = ?1 AND t.finished_ms IS NOT NULL",
                p![workflow],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }

    /// Tasks by status and whether they were published, and the steps'
    /// attempts by status: what `courier bench` checks after a run.
    ///
    /// # Errors
    /// The store's.
    pub fn task_counts(&mut self) -> Result<Vec<(String, bool, i64)>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT status, published, COUNT(*) FROM tasks GROUP BY status, published ORDER BY 1, 2",
                p![],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
        })
    }

    /// Runs by status, for metrics.
    ///
    /// # Errors
    /// The store's.
    pub fn run_counts(&mut self) -> Result<Vec<(RunStatus, i64)>, DbError> {
        self.read(|tx| {
            tx.all("SELECT status, COUNT(*) FROM runs GROUP BY status", p![], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })
        })
    }

    /// Steps waiting on a limit, by what holds them, and steps waiting for
    /// approval (as `approval`), for metrics.
    ///
    /// # Errors
    /// The store's.
    pub fn waiting_counts(&mut self) -> Result<Vec<(String, i64)>, DbError> {
        self.read(|tx| {
            tx.all(
                "SELECT COALESCE(waiting_on, ''), COUNT(*) FROM steps WHERE status = 'waiting' GROUP BY 1
                 UNION ALL SELECT 'approval', COUNT(*) FROM steps WHERE status = 'waiting_approval'",
                p![],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
        })
    }
}

/// A PostgreSQL connection (no TLS: on a private network or a local socket),
/// bounded in time: it gives up connecting after 5 s and notices a peer
/// gone silent within about 10 s (keepalives, `tcp_user_timeout`); the
/// server ends a session left idle inside a transaction after 30 s (a
/// paused scheduler must not hold the write lock for ever), a statement
/// after 2 minutes, and a wait for a lock after one.
pub(crate) fn pg_client(url: &str) -> Result<postgres::Client, DbError> {
    let mut config: postgres::Config = url.parse()?;
    config
        .connect_timeout(Duration::from_secs(5))
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(2))
        .keepalives_retries(3)
        .tcp_user_timeout(Duration::from_secs(10));
    let mut client = config.connect(postgres::NoTls)?;
    client.batch_execute(
        "SET idle_in_transaction_session_timeout = '30s'; SET statement_timeout = '120s'; SET lock_timeout = '60s'",
    )?;
    Ok(client)
}

/// A URL without its password (in the authority or a `password=` query
/// parameter), for messages.
pub fn redact(url: &str) -> String {
    let mut out = match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let user_end = url[scheme + 3..at].find(':').map_or(at, |i| scheme + 3 + i);
            format!("{}:***{}", &url[..user_end], &url[at..])
        }
        _ => url.to_owned(),
    };
    while let Some(start) = out.find("password=").map(|i| i + "password=".len()) {
        if out[start..].starts_with("***") {
            break;
        }
        let end = out[start..].find(['&', ' ']).map_or(out.len(), |i| start + i);
        out.replace_range(start..end, "***");
    }
    out
}

/// The steps of a run whose outputs, errors and transcripts pass
/// [`RUN_VIEW_BYTES`], in step order: those within it (and those with
/// none) whole; the others with their name, queue, status, attempts and
/// size alone. In SQLite a row's columns are read in order, and every
/// other column of a step comes after its output: reading any of them
/// would read the whole output. So the ranking reads only what comes
/// first (a foreach item's index is in its name), and each kept step is
/// then read by its key.
fn budgeted_steps(tx: &Tx<'_>, run: &str) -> Result<Vec<StepView>, DbError> {
    static KEPT: sql::Batched = sql::Batched::new(|n| {
        format!(
            concat!(step_columns!(), " FROM steps WHERE run_id = ?1 AND name IN ({})"),
            sql::placeholders(2, n)
        )
    });
    let mut sized: Vec<(String, i64, String, StepStatus, i64, i64)> = tx.all(
        "SELECT name, position, queue, status, attempts,
                CAST(COALESCE(octet_length(output), 0) + COALESCE(octet_length(error), 0)
                     + COALESCE(octet_length(transcript), 0) AS BIGINT)
         FROM steps WHERE run_id = ?1",
        p![run],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?, r.get(5)?)),
    )?;
    let item = |name: &str| -> i64 {
        name.strip_suffix(']')
            .and_then(|n| n.rsplit_once('['))
            .and_then(|(_, i)| i.parse().ok())
            .unwrap_or(-1)
    };
    sized.sort_by_key(|(name, position, ..)| (*position, item(name)));
    // The prefix within the budget (and every step holding nothing), read
    // by name, 64 at a time; the rest as they were ranked.
    let mut used = 0_i64;
    let mut kept: Vec<&String> = Vec::new();
    for (name, .., size) in &sized {
        if *size == 0 || used + size <= RUN_VIEW_BYTES {
            used += size;
            kept.push(name);
        } else {
            used = RUN_VIEW_BYTES;
        }
    }
    let names: Vec<&dyn sql::Param> = kept.iter().map(|n| *n as &dyn sql::Param).collect();
    let mut read: std::collections::HashMap<String, StepView> = tx
        .all_batched(&KEPT, p![run], &names, step_from_row)?
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    Ok(sized
        .into_iter()
        .map(|(name, _, queue, status, attempts, size)| {
            read.remove(&name).unwrap_or(StepView {
                name,
                queue,
                status,
                waiting_on: None,
                attempts,
                output: None,
                error: None,
                worker: None,
                started_ms: None,
                finished_ms: None,
                model: None,
                input_tokens: None,
                output_tokens: None,
                cost: None,
                transcript: None,
                left_out_bytes: Some(size),
            })
        })
        .collect())
}

/// A step as [`Db::run`] and [`Db::step`] read it.
fn step_from_row(r: &Row<'_>) -> Result<StepView, DbError> {
    Ok(StepView {
        name: r.get(0)?,
        queue: r.get(1)?,
        status: r.get(2)?,
        attempts: r.get(3)?,
        output: r.get(4)?,
        error: r.get(5)?,
        worker: r.get(6)?,
        started_ms: r.get(7)?,
        finished_ms: r.get(8)?,
        model: r.get(9)?,
        input_tokens: r.get(10)?,
        output_tokens: r.get(11)?,
        transcript: r.get::<Option<String>>(12)?.and_then(|t| serde_json::from_str(&t).ok()),
        waiting_on: r.get(13)?,
        cost: r.get(14)?,
        left_out_bytes: r.get(15)?,
    })
}

/// Runs with their own token and cost totals (kept on the run).
const RUN_SELECT: &str = concat!(
    run_columns!(),
    "
        r.input_tokens, r.output_tokens, r.cost
     FROM runs r"
);

fn run_from_row(r: &Row<'_>) -> Result<RunView, DbError> {
    let params: String = r.get(3)?;
    Ok(RunView {
        id: r.get(0)?,
        workflow: r.get(1)?,
        status: r.get(2)?,
        params: JsonText::new(params),
        created_ms: r.get(4)?,
        finished_ms: r.get(5)?,
        error: r.get(6)?,
        priority: r.get(7)?,
        deadline_ms: r.get(8)?,
        cancelled_by: r.get(9)?,
        parent_run: r.get(10)?,
        parent_step: r.get(11)?,
        input_tokens: r.get(12)?,
        output_tokens: r.get(13)?,
        cost: r.get(14)?,
        steps: Vec::new(),
    })
}

mod schema;
pub mod sql;

/// Statements used inside the engine's transactions.
pub mod tx;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_name_the_statuses() {
        // The literals the queries filter on (see the note above MIGRATIONS).
        for text in [
            "pending",
            "waiting",
            "running",
            "waiting_approval",
            "succeeded",
            "failed",
            "skipped",
            "cancelled",
        ] {
            assert_eq!(StepStatus::parse(text).map(StepStatus::as_str), Some(text));
        }
        for text in ["running", "succeeded", "failed", "cancelled"] {
            assert_eq!(RunStatus::parse(text).map(RunStatus::as_str), Some(text));
        }
        assert_eq!(DISPATCHED, "dispatched");
        assert_eq!(courier_wire::TaskStatus::Cancelled.as_str(), "cancelled");
    }

    /// Marking goes by chunks of 64, 32, … 1: every id given is marked,
    /// whatever their number, and no other (an unknown id changes nothing).
    #[test]
    fn mark_published_marks_exactly_the_ids_given() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut db = Db::open(&dir.path().join("courier.db")).expect("open");
        let ids: Vec<String> = (0..200).map(|i| format!("task-{i}")).collect();
        db.transaction(|t| {
            for id in &ids {
                t.exec(
                    "INSERT INTO tasks (task_id, run_id, step, attempt, queue, status, snapshot_hash, not_before_ms, created_ms)
                     VALUES (?1, 'run', 'step', 1, 'pool', 'dispatched', 'hash', 0, 0)",
                    p![id],
                )?;
            }
            Ok::<_, DbError>(())
        })
        .expect("insert");
        db.mark_published(&[]).expect("nothing to mark");
        // 134 ids (64 + 64 + 4 + 2): 133 of them, every third one left out, and one unknown.
        let mut chosen: Vec<String> = ids
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 2)
            .map(|(_, id)| id.clone())
            .collect();
        chosen.truncate(133);
        chosen.push("no-such-task".into());
        db.mark_published(&chosen).expect("mark");
        let published: Vec<String> = db
            .read(|t| {
                t.all(
                    "SELECT task_id FROM tasks WHERE published = 1 ORDER BY rowid",
                    p![],
                    |r| r.get(0),
                )
            })
            .expect("read");
        chosen.pop();
        assert_eq!(published, chosen);
    }

    /// Write `rounds` transactions of `rows` params of `bytes` each to a new
    /// database, pausing `pause` after each: the WAL's largest size seen,
    /// and the database (with its folder).
    fn wal_peak(rounds: usize, rows: usize, bytes: usize, pause: std::time::Duration) -> (u64, Db, tempfile::TempDir) {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut db = Db::open(&dir.path().join("courier.db")).expect("open");
        let wal = dir.path().join("courier.db-wal");
        let params = "x".repeat(bytes);
        let mut largest = 0;
        for round in 0..rounds {
            db.transaction(|t| {
                for i in 0..rows {
                    t.exec(
                        "INSERT INTO run_params (run_id, params) VALUES (?1, ?2)",
                        p![format!("{round}-{i}"), params.as_str()],
                    )?;
                }
                Ok::<_, DbError>(())
            })
            .expect("write");
            largest = largest.max(std::fs::metadata(&wal).map_or(0, |m| m.len()));
            std::thread::sleep(pause);
        }
        (largest, db, dir)
    }

    /// The WAL is checkpointed by the background thread, so it starts over
    /// long before the engine's own checkpoint (10,000 pages) would, and
    /// what was written stays readable.
    #[test]
    fn the_wal_is_checkpointed_in_the_background() {
        // 20 rounds of about 170 KiB each: 3.4 MB of pages without checkpoints.
        let (largest, mut db, _dir) = wal_peak(20, 10, 16 * 1024, CHECKPOINT_EVERY * 2);
        assert!(largest < 1024 * 1024, "the WAL grew to {largest} bytes");
        let rows: i64 = db
            .read(|t| t.one("SELECT COUNT(*) FROM run_params", p![], |r| r.get(0)))
            .expect("read");
        assert_eq!(rows, 200);
    }

    /// Commits that never leave the background checkpointer a gap still
    /// make the WAL start over past 10,000 pages (40 MB, plus what this
    /// test commits, at over 200 MB/s, while the thread's PASSIVE
    /// checkpoint copies them: 50–69 MB seen on a quiet machine, 84 MB
    /// beside a CI run). With only SQLite's own checkpoint as the backstop,
    /// it grew to 122 MB of 132 MB written in one run of three: a WAL that
    /// never starts over holds nearly all of the 264 MB written here.
    #[test]
    fn back_to_back_commits_keep_the_wal_bounded() {
        // About 264 MB written in all.
        let (largest, _db, _dir) = wal_peak(4_000, 1, 64 * 1024, std::time::Duration::ZERO);
        assert!(largest < 128 * 1024 * 1024, "the WAL grew to {largest} bytes");
    }
}
