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

const SCHEMA: &str = "
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
";

/// Status of a run.
pub mod run_status {
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
}

/// Status of a step.
pub mod step_status {
    pub const PENDING: &str = "pending";
    pub const RUNNING: &str = "running";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const SKIPPED: &str = "skipped";
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
    pub status: String,
    pub params: serde_json::Value,
    pub created_ms: i64,
    pub finished_ms: Option<i64>,
    pub error: Option<String>,
    pub steps: Vec<StepView>,
}

/// A step as the API shows it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct StepView {
    pub name: String,
    pub queue: String,
    pub status: String,
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
}

/// What a task row says about an attempt.
#[derive(Debug, Clone)]
pub struct TaskRow {
    pub run_id: String,
    pub step: String,
    pub attempt: u32,
    pub status: String,
}

impl Db {
    /// Open (creating if needed) the database at `path`.
    ///
    /// # Errors
    /// SQLite could not open or migrate the file.
    pub fn open(path: &Path) -> Result<Self, DbError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        // Checkpoint less often: pages rewritten in between are copied once.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self { conn })
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
        let mut stmt = self.conn.prepare_cached(
            "SELECT task_id, run_id, step, queue, attempt, snapshot_hash, not_before_ms FROM tasks
             WHERE published = 0 AND status = 'dispatched' ORDER BY not_before_ms LIMIT ?1",
        )?;
        let rows = stmt.query_map(params![limit as i64], |r| {
            Ok(OutboxTask {
                task_id: r.get(0)?,
                run_id: r.get(1)?,
                step: r.get(2)?,
                queue: r.get(3)?,
                attempt: r.get(4)?,
                snapshot_hash: r.get(5)?,
                not_before_ms: r.get(6)?,
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

    /// One run with its steps.
    ///
    /// # Errors
    /// SQLite's.
    pub fn run(&self, id: &str) -> Result<Option<RunView>, DbError> {
        let run = self
            .conn
            .query_row(
                "SELECT id, workflow, status, params, created_ms, finished_ms, error FROM runs WHERE id = ?1",
                [id],
                run_from_row,
            )
            .optional()?;
        let Some(mut run) = run else { return Ok(None) };
        let mut stmt = self.conn.prepare_cached(
            "SELECT name, queue, status, attempts, output, error, worker, started_ms, finished_ms,
                    model, input_tokens, output_tokens, transcript
             FROM steps WHERE run_id = ?1 ORDER BY position",
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
                })
            })?
            .collect::<Result<_, _>>()?;
        Ok(Some(run))
    }

    /// Runs, newest first, optionally filtered.
    ///
    /// # Errors
    /// SQLite's.
    pub fn runs(&self, workflow: Option<&str>, status: Option<&str>, limit: usize) -> Result<Vec<RunView>, DbError> {
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, workflow, status, params, created_ms, finished_ms, error FROM runs
             WHERE (?1 IS NULL OR workflow = ?1) AND (?2 IS NULL OR status = ?2)
             ORDER BY created_ms DESC, id DESC LIMIT ?3",
        )?;
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
    pub fn run_counts(&self) -> Result<Vec<(String, i64)>, DbError> {
        let mut stmt = self
            .conn
            .prepare_cached("SELECT status, COUNT(*) FROM runs GROUP BY status")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        rows.collect()
    }
}

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
        steps: Vec::new(),
    })
}

/// Statements used inside the engine's transactions.
pub mod tx {
    use super::{DbError, OptionalExtension, TaskRow, Transaction, params};

    /// Insert a run.
    pub fn insert_run(
        tx: &Transaction<'_>,
        id: &str,
        workflow: &str,
        params_json: &str,
        now: i64,
    ) -> Result<(), DbError> {
        tx.execute(
            "INSERT INTO runs (id, workflow, status, params, created_ms) VALUES (?1, ?2, 'running', ?3, ?4)",
            params![id, workflow, params_json, now],
        )?;
        Ok(())
    }

    /// Insert a pending step.
    pub fn insert_step(
        tx: &Transaction<'_>,
        run: &str,
        name: &str,
        position: usize,
        queue: &str,
    ) -> Result<(), DbError> {
        tx.prepare_cached(
            "INSERT INTO steps (run_id, name, position, queue, status) VALUES (?1, ?2, ?3, ?4, 'pending')",
        )?
        .execute(params![run, name, position as i64, queue])?;
        Ok(())
    }

    /// Insert a task into the outbox.
    #[allow(clippy::too_many_arguments)]
    pub fn insert_task(
        tx: &Transaction<'_>,
        task_id: &str,
        run: &str,
        step: &str,
        attempt: u32,
        queue: &str,
        snapshot_hash: &str,
        not_before_ms: i64,
        now: i64,
    ) -> Result<(), DbError> {
        tx.prepare_cached(
            "INSERT INTO tasks (task_id, run_id, step, attempt, queue, status, snapshot_hash, not_before_ms, created_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, 'dispatched', ?6, ?7, ?8)",
        )?
        .execute(params![task_id, run, step, attempt, queue, snapshot_hash, not_before_ms, now])?;
        Ok(())
    }

    /// A task row by id.
    pub fn task(tx: &Transaction<'_>, task_id: &str) -> Result<Option<TaskRow>, DbError> {
        tx.prepare_cached("SELECT run_id, step, attempt, status FROM tasks WHERE task_id = ?1")?
            .query_row([task_id], |r| {
                Ok(TaskRow {
                    run_id: r.get(0)?,
                    step: r.get(1)?,
                    attempt: r.get(2)?,
                    status: r.get(3)?,
                })
            })
            .optional()
    }

    /// Record how a task attempt ended.
    pub fn finish_task(tx: &Transaction<'_>, task_id: &str, status: &str, now: i64) -> Result<(), DbError> {
        tx.prepare_cached("UPDATE tasks SET status = ?2, finished_ms = ?3 WHERE task_id = ?1")?
            .execute(params![task_id, status, now])?;
        Ok(())
    }

    /// The run's workflow name and status.
    pub fn run(tx: &Transaction<'_>, run: &str) -> Result<Option<(String, String)>, DbError> {
        tx.prepare_cached("SELECT workflow, status FROM runs WHERE id = ?1")?
            .query_row([run], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
    }

    /// The run's params as JSON.
    pub fn run_params(tx: &Transaction<'_>, run: &str) -> Result<String, DbError> {
        tx.prepare_cached("SELECT params FROM runs WHERE id = ?1")?
            .query_row([run], |r| r.get(0))
    }

    /// One step's status.
    pub fn step_status(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
        tx.prepare_cached("SELECT status FROM steps WHERE run_id = ?1 AND name = ?2")?
            .query_row([run, name], |r| r.get(0))
            .optional()
    }

    /// How many steps of the run are pending or running.
    pub fn open_steps(tx: &Transaction<'_>, run: &str) -> Result<i64, DbError> {
        tx.prepare_cached("SELECT COUNT(*) FROM steps WHERE run_id = ?1 AND status IN ('pending', 'running')")?
            .query_row([run], |r| r.get(0))
    }

    /// Names of the run's failed steps, in workflow order.
    pub fn failed_steps(tx: &Transaction<'_>, run: &str) -> Result<Vec<String>, DbError> {
        let mut stmt =
            tx.prepare_cached("SELECT name FROM steps WHERE run_id = ?1 AND status = 'failed' ORDER BY position")?;
        let rows = stmt.query_map([run], |r| r.get(0))?;
        rows.collect()
    }

    /// The output of one step of a run, if it has one.
    pub fn step_output(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
        tx.prepare_cached("SELECT output FROM steps WHERE run_id = ?1 AND name = ?2 AND status = 'succeeded'")?
            .query_row([run, name], |r| r.get(0))
            .optional()
            .map(Option::flatten)
    }

    /// A step is dispatched for `attempt`.
    pub fn start_step(tx: &Transaction<'_>, run: &str, name: &str, attempt: u32, now: i64) -> Result<(), DbError> {
        tx.prepare_cached(
            "UPDATE steps SET status = 'running', attempts = ?3, started_ms = COALESCE(started_ms, ?4), error = NULL
             WHERE run_id = ?1 AND name = ?2",
        )?
        .execute(params![run, name, attempt, now])?;
        Ok(())
    }

    /// A step reached a final state.
    #[allow(clippy::too_many_arguments)]
    pub fn finish_step(
        tx: &Transaction<'_>,
        run: &str,
        name: &str,
        status: &str,
        output: Option<&str>,
        error: Option<&str>,
        worker: Option<&str>,
        now: i64,
    ) -> Result<(), DbError> {
        tx.prepare_cached(
            "UPDATE steps SET status = ?3, output = ?4, error = ?5, worker = COALESCE(?6, worker), finished_ms = ?7
             WHERE run_id = ?1 AND name = ?2",
        )?
        .execute(params![run, name, status, output, error, worker, now])?;
        Ok(())
    }

    /// Record what an agent step's model did (latest attempt).
    pub fn record_agent(
        tx: &Transaction<'_>,
        run: &str,
        name: &str,
        model: &str,
        usage: (u64, u64),
        transcript_json: &str,
    ) -> Result<(), DbError> {
        tx.prepare_cached(
            "UPDATE steps SET model = ?3, input_tokens = COALESCE(input_tokens, 0) + ?4,
                              output_tokens = COALESCE(output_tokens, 0) + ?5, transcript = ?6
             WHERE run_id = ?1 AND name = ?2",
        )?
        .execute(params![
            run,
            name,
            model,
            usage.0 as i64,
            usage.1 as i64,
            transcript_json
        ])?;
        Ok(())
    }

    /// Record the latest failure of a step that will be retried.
    pub fn note_step_error(
        tx: &Transaction<'_>,
        run: &str,
        name: &str,
        error: &str,
        worker: &str,
    ) -> Result<(), DbError> {
        tx.prepare_cached("UPDATE steps SET error = ?3, worker = ?4 WHERE run_id = ?1 AND name = ?2")?
            .execute(params![run, name, error, worker])?;
        Ok(())
    }

    /// Set a step's error without changing its status (a succeeded step
    /// whose memory update could not be written).
    pub fn set_step_error(tx: &Transaction<'_>, run: &str, name: &str, error: &str) -> Result<(), DbError> {
        tx.prepare_cached("UPDATE steps SET error = ?3 WHERE run_id = ?1 AND name = ?2")?
            .execute(params![run, name, error])?;
        Ok(())
    }

    /// A run reached a final state.
    pub fn finish_run(
        tx: &Transaction<'_>,
        run: &str,
        status: &str,
        error: Option<&str>,
        now: i64,
    ) -> Result<(), DbError> {
        tx.prepare_cached("UPDATE runs SET status = ?2, error = ?3, finished_ms = ?4 WHERE id = ?1")?
            .execute(params![run, status, error, now])?;
        Ok(())
    }
}
