//! Run, step and task state in SQLite: the scheduler's durable memory.
//!
//! The `tasks` table is also the outbox: a task row is written in the same
//! transaction that decides to dispatch it, and published afterwards; rows not
//! yet confirmed by the broker are published again after a restart. Rows hold
//! no task bodies: a task is rebuilt from its row, the run's params and the
//! upstream outputs, so the database only stores what is needed for that.

use std::path::Path;

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::Serialize;

pub use rusqlite::Error as DbError;

/// The schema, one migration per version: `MIGRATIONS[i]` takes a database
/// from version `i` to `i + 1`. The version is SQLite's `user_version`; a
/// database from before versioning (tables, version 0) takes migration 0
/// harmlessly (`IF NOT EXISTS`).
const MIGRATIONS: &[&str] = &[
    // 1: runs, steps, tasks (the outbox).
    "
CREATE TABLE IF NOT EXISTS runs (
    id          TEXT PRIMARY KEY,
    workflow    TEXT NOT NULL,
    status      TEXT NOT NULL,
    params      TEXT NOT NULL,
    created_ms  INTEGER NOT NULL,
    finished_ms INTEGER,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS runs_by_workflow ON runs (workflow, created_ms);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_ms);
CREATE TABLE IF NOT EXISTS steps (
    run_id      TEXT NOT NULL,
    name        TEXT NOT NULL,
    position    INTEGER NOT NULL,
    queue       TEXT NOT NULL,
    status      TEXT NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    output      TEXT,
    error       TEXT,
    worker      TEXT,
    started_ms  INTEGER,
    finished_ms INTEGER,
    model         TEXT,
    input_tokens  INTEGER,
    output_tokens INTEGER,
    transcript    TEXT,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS tasks (
    task_id       TEXT PRIMARY KEY,
    run_id        TEXT NOT NULL,
    step          TEXT NOT NULL,
    attempt       INTEGER NOT NULL,
    queue         TEXT NOT NULL,
    status        TEXT NOT NULL,
    snapshot_hash TEXT NOT NULL,
    published     INTEGER NOT NULL DEFAULT 0,
    not_before_ms INTEGER NOT NULL,
    created_ms    INTEGER NOT NULL,
    finished_ms   INTEGER
);
CREATE INDEX IF NOT EXISTS tasks_unpublished ON tasks (not_before_ms) WHERE published = 0;
",
    // 2: run control: priorities, deadlines, cancellation, costs, limits.
    "
ALTER TABLE runs ADD COLUMN priority INTEGER NOT NULL DEFAULT 4;
ALTER TABLE runs ADD COLUMN deadline_ms INTEGER;
ALTER TABLE runs ADD COLUMN cancelled_by TEXT;
ALTER TABLE runs ADD COLUMN admitted INTEGER NOT NULL DEFAULT 1;
ALTER TABLE steps ADD COLUMN waiting_on TEXT;
ALTER TABLE steps ADD COLUMN cost REAL;
ALTER TABLE steps ADD COLUMN not_before_ms INTEGER;
ALTER TABLE tasks ADD COLUMN deadline_ms INTEGER;
ALTER TABLE tasks ADD COLUMN model TEXT;
ALTER TABLE tasks ADD COLUMN tokens INTEGER;
CREATE INDEX tasks_in_flight ON tasks (queue) WHERE status = 'dispatched';
CREATE INDEX runs_by_deadline ON runs (deadline_ms) WHERE status = 'running' AND deadline_ms IS NOT NULL;
CREATE INDEX runs_unadmitted ON runs (workflow) WHERE status = 'running' AND admitted = 0;
DROP INDEX tasks_unpublished;
CREATE INDEX tasks_unpublished ON tasks (not_before_ms) WHERE published = 0 AND status = 'dispatched';
CREATE INDEX tasks_by_model ON tasks (model, not_before_ms) WHERE model IS NOT NULL;
CREATE INDEX steps_waiting ON steps (run_id) WHERE status = 'waiting';
CREATE INDEX steps_awaiting_approval ON steps (not_before_ms) WHERE status = 'waiting_approval';
CREATE TABLE model_pauses (
    model    TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL,
    reason   TEXT NOT NULL
);
CREATE TABLE controls (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id     TEXT NOT NULL,
    step       TEXT,
    reason     TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    published  INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX controls_unpublished ON controls (id) WHERE published = 0;
",
    // 3: counters, so a result costs the same in a run of any width: the
    // run's open steps and spending, and each step's dependencies not yet
    // succeeded (NULL for steps of runs started before: they are counted the
    // old way, and recounted by `Engine::reconcile` at start).
    "
ALTER TABLE runs ADD COLUMN open_steps INTEGER;
ALTER TABLE runs ADD COLUMN spent_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN spent_cost REAL NOT NULL DEFAULT 0.0;
ALTER TABLE steps ADD COLUMN pending_deps INTEGER;
UPDATE runs SET
    spent_tokens = (SELECT COALESCE(SUM(COALESCE(input_tokens, 0) + COALESCE(output_tokens, 0)), 0)
                    FROM steps WHERE steps.run_id = runs.id),
    spent_cost = (SELECT COALESCE(SUM(cost), 0.0) FROM steps WHERE steps.run_id = runs.id)
WHERE status = 'running';
UPDATE runs SET open_steps = (SELECT COUNT(*) FROM steps
    WHERE steps.run_id = runs.id AND steps.status IN ('pending', 'waiting', 'running'))
WHERE status = 'running';
",
    // 4: a run's params in a table of their own. SQLite reads a row's columns
    // in order, so with params (often kilobytes, on overflow pages) inside
    // `runs`, every read of a column after them walked the overflow chain.
    "
CREATE TABLE run_params (
    run_id TEXT PRIMARY KEY,
    params TEXT NOT NULL
);
INSERT INTO run_params (run_id, params) SELECT id, params FROM runs;
UPDATE runs SET params = '';
",
    // 5: the workflow language. foreach: each item is a step row of its
    // own (`name[index]`, its value in `item`, its step in `parent`); the
    // foreach step counts its items: how many, where to look for the next
    // to start, how many not yet ended, failed, started and not yet ended. Sub-workflows: a child run names its parent
    // run and step, and how deep it is.
    "
ALTER TABLE runs ADD COLUMN parent_run TEXT;
ALTER TABLE runs ADD COLUMN parent_step TEXT;
ALTER TABLE runs ADD COLUMN depth INTEGER NOT NULL DEFAULT 0;
CREATE INDEX runs_children ON runs (parent_run) WHERE parent_run IS NOT NULL;
ALTER TABLE steps ADD COLUMN parent TEXT;
ALTER TABLE steps ADD COLUMN item_index INTEGER;
ALTER TABLE steps ADD COLUMN item TEXT;
ALTER TABLE steps ADD COLUMN items_total INTEGER;
ALTER TABLE steps ADD COLUMN items_next INTEGER;
ALTER TABLE steps ADD COLUMN items_left INTEGER;
ALTER TABLE steps ADD COLUMN items_failed INTEGER;
ALTER TABLE steps ADD COLUMN items_active INTEGER;
CREATE INDEX steps_items ON steps (run_id, parent, item_index) WHERE parent IS NOT NULL;
",
];

// Statuses are written as values from the enums, but filtered on as
// literals ('pending', 'waiting', 'running', 'succeeded', 'dispatched',
// 'cancelled'; `literals_name_the_statuses` checks them against the enums):
// SQLite re-prepares a statement each time a parameter compared with a
// column that a partial index filters on is bound anew, and that
// re-preparing (with a statement cache too small to keep them all) cost
// about a sixth of the scheduler's CPU at 400 runs/s.

/// The schema version this build writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

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
                f.write_str(self.as_str())
            }
        }

        impl rusqlite::ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<rusqlite::types::ToSqlOutput<'_>> {
                Ok(self.as_str().into())
            }
        }

        impl rusqlite::types::FromSql for $name {
            fn column_result(value: rusqlite::types::ValueRef<'_>) -> rusqlite::types::FromSqlResult<Self> {
                let text = value.as_str()?;
                $name::parse(text).ok_or_else(|| rusqlite::types::FromSqlError::Other(
                    format!("unknown {} \"{text}\"", stringify!($name)).into(),
                ))
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
    /// SQLite failed.
    #[error(transparent)]
    Sqlite(#[from] DbError),
    /// The file was written by a newer Courier.
    #[error(
        "the database has schema version {found}, newer than this build knows ({known}): it was written by a newer Courier; run that version, or point this one at another data folder"
    )]
    TooNew { found: i64, known: i64 },
}

/// The scheduler's database.
#[derive(Debug)]
pub struct Db {
    conn: Connection,
}

/// A run as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct RunView {
    pub id: String,
    pub workflow: String,
    pub status: RunStatus,
    pub params: serde_json::Value,
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
}

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
    /// Open (creating if needed) the database at `path`, migrating it to
    /// [`SCHEMA_VERSION`].
    ///
    /// # Errors
    /// SQLite could not open or migrate the file, or it is newer than this build.
    pub fn open(path: &Path) -> Result<Self, OpenError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // SQLite's default checkpoint size (4 MB of pages). A checkpoint
        // holds the transaction that triggers it: at 10,000 pages each one
        // stalled the scheduler for tens of ms (p99 44 ms at 400 runs/s,
        // 10 ms with this), for no throughput the benchmark could show.
        conn.pragma_update(None, "wal_autocheckpoint", 1_000)?;
        // Every statement of the engine stays prepared (rusqlite keeps 16).
        conn.set_prepared_statement_cache_capacity(128);
        migrate(&mut conn)?;
        Ok(Self { conn })
    }

    /// The schema version of the open database.
    ///
    /// # Errors
    /// SQLite's.
    pub fn schema_version(&self) -> Result<i64, DbError> {
        self.conn.pragma_query_value(None, "user_version", |r| r.get(0))
    }

    /// Run `f` in one transaction, committed when it returns `Ok`.
    ///
    /// # Errors
    /// `f`'s error, or SQLite's.
    pub fn transaction<T, E: From<DbError>>(
        &mut self,
        f: impl FnOnce(&Transaction<'_>) -> Result<T, E>,
    ) -> Result<T, E> {
        let tx = self.conn.transaction()?;
        let value = f(&tx)?;
        tx.commit()?;
        Ok(value)
    }

    /// Tasks not yet confirmed by the broker, soonest first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn unpublished_tasks(&self, limit: usize) -> Result<Vec<OutboxTask>, DbError> {
        // The limit is part of the text: SQLite plans with a bound LIMIT's
        // value, so it would prepare the statement again on every call.
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT t.task_id, t.run_id, t.step, t.queue, t.attempt, t.snapshot_hash, t.not_before_ms, r.priority
             FROM tasks t JOIN runs r ON r.id = t.run_id
             WHERE t.published = 0 AND t.status = 'dispatched' ORDER BY t.not_before_ms LIMIT {limit}"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(OutboxTask {
                task_id: r.get(0)?,
                run_id: r.get(1)?,
                step: r.get(2)?,
                queue: r.get(3)?,
                attempt: r.get(4)?,
                snapshot_hash: r.get(5)?,
                not_before_ms: r.get(6)?,
                priority: r.get(7)?,
            })
        })?;
        rows.collect()
    }

    /// Mark tasks as confirmed by the broker.
    ///
    /// # Errors
    /// SQLite's.
    pub fn mark_published(&mut self, task_ids: &[String]) -> Result<(), DbError> {
        self.transaction(|tx| {
            let mut stmt = tx.prepare_cached("UPDATE tasks SET published = 1 WHERE task_id = ?1")?;
            for id in task_ids {
                stmt.execute([id])?;
            }
            Ok::<_, DbError>(())
        })
    }

    /// Cancellations not yet confirmed by the broker, oldest first.
    ///
    /// # Errors
    /// SQLite's.
    pub fn unpublished_controls(&self, limit: usize) -> Result<Vec<ControlRow>, DbError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "SELECT id, run_id, step, reason FROM controls WHERE published = 0 ORDER BY id LIMIT {limit}"
        ))?;
        let rows = stmt.query_map([], |r| {
            Ok(ControlRow {
                id: r.get(0)?,
                run_id: r.get(1)?,
                step: r.get(2)?,
                reason: r.get(3)?,
            })
        })?;
        rows.collect()
    }

    /// Mark cancellations as confirmed by the broker.
    ///
    /// # Errors
    /// SQLite's.
    pub fn mark_controls_published(&mut self, ids: &[i64]) -> Result<(), DbError> {
        self.transaction(|tx| {
            let mut stmt = tx.prepare_cached("UPDATE controls SET published = 1 WHERE id = ?1")?;
            for id in ids {
                stmt.execute([id])?;
            }
            Ok::<_, DbError>(())
        })
    }

    /// One run with its steps.
    ///
    /// # Errors
    /// SQLite's.
    pub fn run(&self, id: &str) -> Result<Option<RunView>, DbError> {
        let run = self
            .conn
            .prepare_cached(&format!("{RUN_SELECT} WHERE r.id = ?1"))?
            .query_row([id], run_from_row)
            .optional()?;
        let Some(mut run) = run else { return Ok(None) };
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, queue, status, attempts, output, error, worker, started_ms, finished_ms,
                    model, input_tokens, output_tokens, transcript, waiting_on, cost
             FROM steps WHERE run_id = ?1 ORDER BY position, item_index",
        )?;
        run.steps = stmt
            .query_map([id], |r| {
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
                    transcript: r
                        .get::<_, Option<String>>(12)?
                        .and_then(|t| serde_json::from_str(&t).ok()),
                    waiting_on: r.get(13)?,
                    cost: r.get(14)?,
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(run))
    }

    /// Runs, newest first, optionally filtered.
    ///
    /// # Errors
    /// SQLite's.
    pub fn runs(
        &self,
        workflow: Option<&str>,
        status: Option<RunStatus>,
        limit: usize,
    ) -> Result<Vec<RunView>, DbError> {
        let mut stmt = self.conn.prepare_cached(&format!(
            "{RUN_SELECT} WHERE (?1 IS NULL OR r.workflow = ?1) AND (?2 IS NULL OR r.status = ?2)
             ORDER BY r.created_ms DESC, r.id DESC LIMIT ?3"
        ))?;
        let rows = stmt.query_map(params![workflow, status, limit as i64], run_from_row)?;
        rows.collect()
    }

    /// Milliseconds from each task's dispatch (outbox write) to its result
    /// being applied, for every finished task, sorted.
    ///
    /// # Errors
    /// SQLite's.
    pub fn task_latencies_ms(&self) -> Result<Vec<i64>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT finished_ms - created_ms FROM tasks WHERE finished_ms IS NOT NULL ORDER BY 1")?;
        let rows = stmt.query_map([], |r| r.get(0))?;
        rows.collect()
    }

    /// Runs by status, for metrics.
    ///
    /// # Errors
    /// SQLite's.
    pub fn run_counts(&self) -> Result<Vec<(RunStatus, i64)>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT status, COUNT(*) FROM runs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }

    /// Steps waiting on a limit, by what holds them, and steps waiting for
    /// approval (as `approval`), for metrics.
    ///
    /// # Errors
    /// SQLite's.
    pub fn waiting_counts(&self) -> Result<Vec<(String, i64)>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT COALESCE(waiting_on, ''), COUNT(*) FROM steps WHERE status = 'waiting' GROUP BY 1
             UNION ALL SELECT 'approval', COUNT(*) FROM steps WHERE status = 'waiting_approval'",
        )?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }
}

/// Bring the database to [`SCHEMA_VERSION`], one migration per transaction.
fn migrate(conn: &mut Connection) -> Result<(), OpenError> {
    let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(usize::try_from(found).unwrap_or(0)) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", version as i64 + 1)?;
        tx.commit()?;
        tracing::info!(version = version + 1, "database schema migrated");
    }
    Ok(())
}

/// Runs with their token and cost totals.
const RUN_SELECT: &str = "SELECT r.id, r.workflow, r.status,
        (SELECT params FROM run_params WHERE run_id = r.id), r.created_ms, r.finished_ms, r.error,
        r.priority, r.deadline_ms, r.cancelled_by, r.parent_run, r.parent_step,
        (SELECT COALESCE(SUM(input_tokens), 0) FROM steps WHERE run_id = r.id),
        (SELECT COALESCE(SUM(output_tokens), 0) FROM steps WHERE run_id = r.id),
        (SELECT COALESCE(SUM(cost), 0.0) FROM steps WHERE run_id = r.id)
     FROM runs r";

fn run_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RunView> {
    let params: String = r.get(3)?;
    Ok(RunView {
        id: r.get(0)?,
        workflow: r.get(1)?,
        status: r.get(2)?,
        params: serde_json::from_str(&params).unwrap_or(serde_json::Value::Null),
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
}
