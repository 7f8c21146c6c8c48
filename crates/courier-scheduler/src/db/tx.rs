//! Statements used inside the engine's transactions.

use std::collections::HashMap;

use courier_wire::TaskStatus;
use rusqlite::{OptionalExtension, Transaction, params};

use super::{DISPATCHED, DbError, RunStatus, StepStatus, TaskRow};

/// A run as the engine needs it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub workflow: String,
    pub status: RunStatus,
    /// Counted against its workflow's `max_active_runs`.
    pub admitted: bool,
    /// When its timeout stops it.
    pub deadline_ms: Option<i64>,
}

/// A task to write to the outbox.
#[derive(Debug, Clone)]
pub struct NewTask<'a> {
    pub task_id: &'a str,
    pub run: &'a str,
    pub step: &'a str,
    pub attempt: u32,
    pub queue: &'a str,
    pub snapshot_hash: &'a str,
    pub not_before_ms: i64,
    pub deadline_ms: i64,
    /// Agent steps: the model ID, for its limits.
    pub model: Option<&'a str>,
    /// Agent steps: estimated tokens, corrected by the result.
    pub tokens: Option<i64>,
}

/// A step held by a limit, as admission sees it.
#[derive(Debug, Clone)]
pub struct WaitingStep {
    pub run: String,
    pub workflow: String,
    pub step: String,
    pub admitted: bool,
    pub waiting_on: Option<String>,
    /// Attempts dispatched so far (the next is this plus one).
    pub attempts: u32,
}

/// A dispatched task whose deadline has passed without a result.
#[derive(Debug, Clone)]
pub struct LostTask {
    pub task_id: String,
    pub run: String,
    pub step: String,
    pub attempt: u32,
}

/// A run to insert.
#[derive(Debug, Clone)]
pub struct RunInsert<'a> {
    pub id: &'a str,
    pub workflow: &'a str,
    pub params_json: &'a str,
    pub priority: u8,
    pub deadline_ms: Option<i64>,
    /// Counted against its workflow's `max_active_runs`.
    pub admitted: bool,
    /// How many steps it has (all open).
    pub steps: usize,
    /// A child run: its parent run and step, and its depth.
    pub parent: Option<(&'a str, &'a str, u32)>,
}

/// Insert a run.
pub fn insert_run(tx: &Transaction<'_>, run: &RunInsert<'_>, now: i64) -> Result<(), DbError> {
    let (parent_run, parent_step, depth) = run.parent.map_or((None, None, 0), |(r, s, d)| (Some(r), Some(s), d));
    tx.prepare_cached(
        "INSERT INTO runs (id, workflow, status, params, created_ms, priority, deadline_ms, admitted, open_steps,
                           parent_run, parent_step, depth)
         VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
    )?
    .execute(params![
        run.id,
        run.workflow,
        RunStatus::Running,
        now,
        run.priority,
        run.deadline_ms,
        run.admitted,
        run.steps as i64,
        parent_run,
        parent_step,
        depth
    ])?;
    tx.prepare_cached("INSERT INTO run_params (run_id, params) VALUES (?1, ?2)")?
        .execute([run.id, run.params_json])?;
    Ok(())
}

/// Insert a pending step with `depends` dependencies (its run counted it
/// among its open steps when it was inserted).
pub fn insert_step(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
    position: usize,
    queue: &str,
    depends: usize,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO steps (run_id, name, position, queue, status, pending_deps) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        run,
        name,
        position as i64,
        queue,
        StepStatus::Pending,
        depends as i64
    ])?;
    Ok(())
}

/// Set how many of a step's dependencies are still to succeed.
pub fn set_pending_deps(tx: &Transaction<'_>, run: &str, name: &str, left: i64) -> Result<(), DbError> {
    tx.prepare_cached("UPDATE steps SET pending_deps = ?3 WHERE run_id = ?1 AND name = ?2")?
        .execute(params![run, name, left])?;
    Ok(())
}

/// Every running run: (id, workflow).
pub fn running_runs(tx: &Transaction<'_>) -> Result<Vec<(String, String)>, DbError> {
    let mut stmt = tx.prepare_cached("SELECT id, workflow FROM runs WHERE status = 'running'")?;
    let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// A dependency of step `name` succeeded: its status, and how many of its
/// dependencies are still to succeed (`None` for a step counted the old way).
pub fn dependency_done(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
) -> Result<Option<(StepStatus, Option<i64>)>, DbError> {
    tx.prepare_cached(
        "UPDATE steps SET pending_deps = pending_deps - 1 WHERE run_id = ?1 AND name = ?2 AND pending_deps > 0",
    )?
    .execute([run, name])?;
    tx.prepare_cached("SELECT status, pending_deps FROM steps WHERE run_id = ?1 AND name = ?2")?
        .query_row([run, name], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// Insert a task into the outbox.
pub fn insert_task(tx: &Transaction<'_>, task: &NewTask<'_>, now: i64) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO tasks (task_id, run_id, step, attempt, queue, status, snapshot_hash, not_before_ms, created_ms,
                            deadline_ms, model, tokens)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        task.task_id,
        task.run,
        task.step,
        task.attempt,
        task.queue,
        DISPATCHED,
        task.snapshot_hash,
        task.not_before_ms,
        now,
        task.deadline_ms,
        task.model,
        task.tokens
    ])?;
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
                dispatched: r.get::<_, String>(3)? == DISPATCHED,
            })
        })
        .optional()
}

/// Record how a task attempt ended, with the tokens it really used.
pub fn finish_task(
    tx: &Transaction<'_>,
    task_id: &str,
    status: TaskStatus,
    tokens: Option<i64>,
    now: i64,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "UPDATE tasks SET status = ?2, finished_ms = ?3, tokens = COALESCE(?4, tokens) WHERE task_id = ?1",
    )?
    .execute(params![task_id, status.as_str(), now, tokens])?;
    Ok(())
}

/// Tasks of a run (or of one step, a foreach step's items included) not
/// yet published: never published now.
/// Their ids.
pub fn cancel_unpublished(
    tx: &Transaction<'_>,
    run: &str,
    step: Option<&str>,
    now: i64,
) -> Result<Vec<String>, DbError> {
    let ids: Vec<String> = tx
        .prepare_cached(
            "SELECT task_id FROM tasks WHERE run_id = ?1 AND published = 0 AND status = 'dispatched'
             AND (?2 IS NULL OR step = ?2 OR substr(step, 1, length(?2) + 1) = ?2 || '[')",
        )?
        .query_map(params![run, step], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut update = tx.prepare_cached("UPDATE tasks SET status = ?2, finished_ms = ?3 WHERE task_id = ?1")?;
    for id in &ids {
        update.execute(params![id, TaskStatus::Cancelled.as_str(), now])?;
    }
    Ok(ids)
}

/// The run's workflow, status and admission.
pub fn run(tx: &Transaction<'_>, run: &str) -> Result<Option<RunRow>, DbError> {
    tx.prepare_cached("SELECT workflow, status, admitted, deadline_ms FROM runs WHERE id = ?1")?
        .query_row([run], |r| {
            Ok(RunRow {
                workflow: r.get(0)?,
                status: r.get(1)?,
                admitted: r.get(2)?,
                deadline_ms: r.get(3)?,
            })
        })
        .optional()
}

/// The run, and the status of one of its steps, in one statement (the
/// result path's).
pub fn run_and_step(
    tx: &Transaction<'_>,
    run: &str,
    step: &str,
) -> Result<Option<(RunRow, Option<StepStatus>)>, DbError> {
    tx.prepare_cached(
        "SELECT r.workflow, r.status, r.admitted, r.deadline_ms, s.status
         FROM runs r LEFT JOIN steps s ON s.run_id = r.id AND s.name = ?2 WHERE r.id = ?1",
    )?
    .query_row([run, step], |r| {
        Ok((
            RunRow {
                workflow: r.get(0)?,
                status: r.get(1)?,
                admitted: r.get(2)?,
                deadline_ms: r.get(3)?,
            },
            r.get(4)?,
        ))
    })
    .optional()
}

/// The run's params as JSON.
pub fn run_params(tx: &Transaction<'_>, run: &str) -> Result<String, DbError> {
    tx.prepare_cached("SELECT params FROM run_params WHERE run_id = ?1")?
        .query_row([run], |r| r.get(0))
}

/// The run counts against its workflow's `max_active_runs` from now on.
pub fn admit_run(tx: &Transaction<'_>, run: &str) -> Result<(), DbError> {
    tx.prepare_cached("UPDATE runs SET admitted = 1 WHERE id = ?1")?
        .execute([run])?;
    Ok(())
}

/// One step's status.
pub fn step_status(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<StepStatus>, DbError> {
    tx.prepare_cached("SELECT status FROM steps WHERE run_id = ?1 AND name = ?2")?
        .query_row([run, name], |r| r.get(0))
        .optional()
}

/// The run's steps that may still change, with their status.
pub fn open_steps(tx: &Transaction<'_>, run: &str) -> Result<Vec<(String, StepStatus)>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT name, status FROM steps WHERE run_id = ?1 AND status IN ('pending', 'waiting', 'running', 'waiting_approval')
         ORDER BY position",
    )?;
    let rows = stmt.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// How many of the run's steps may still change: its counter (counted for
/// runs started before the counter existed).
pub fn open_step_count(tx: &Transaction<'_>, run: &str) -> Result<i64, DbError> {
    tx.prepare_cached(
        "SELECT COALESCE(open_steps, (SELECT COUNT(*) FROM steps
                                      WHERE run_id = ?1 AND status IN ('pending', 'waiting', 'running', 'waiting_approval')))
         FROM runs WHERE id = ?1",
    )?
    .query_row([run], |r| r.get(0))
}

/// Names of the run's steps with `status`, in workflow order (foreach
/// items are their step's business, not the run's).
pub fn steps_with(tx: &Transaction<'_>, run: &str, status: StepStatus) -> Result<Vec<String>, DbError> {
    // The status as a literal (see the note above `MIGRATIONS`): one of the enum's own names.
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT name FROM steps WHERE run_id = ?1 AND status = '{}' AND parent IS NULL ORDER BY position",
        status.as_str()
    ))?;
    let rows = stmt.query_map([run], |r| r.get(0))?;
    rows.collect()
}

/// The output of one step of a run, if it has one: a skipped step's is empty.
pub fn step_output(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
    tx.prepare_cached(
        "SELECT CASE status WHEN 'succeeded' THEN output ELSE '' END FROM steps
         WHERE run_id = ?1 AND name = ?2 AND status IN ('succeeded', 'skipped')",
    )?
    .query_row([run, name], |r| r.get(0))
    .optional()
    .map(Option::flatten)
}

/// A step is dispatched for `attempt`.
pub fn start_step(tx: &Transaction<'_>, run: &str, name: &str, attempt: u32, now: i64) -> Result<(), DbError> {
    tx.prepare_cached(
        "UPDATE steps SET status = ?5, attempts = ?3, started_ms = COALESCE(started_ms, ?4), error = NULL,
                          waiting_on = NULL, not_before_ms = NULL
         WHERE run_id = ?1 AND name = ?2 AND status IN ('pending', 'waiting', 'running')",
    )?
    .execute(params![run, name, attempt, now, StepStatus::Running])?;
    Ok(())
}

/// A step is ready but held by a limit (named by `reason`, once known), or
/// (a retry) not before `not_before_ms`.
pub fn wait_step(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
    reason: Option<&str>,
    not_before_ms: Option<i64>,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "UPDATE steps SET status = ?3, waiting_on = ?4, not_before_ms = ?5
         WHERE run_id = ?1 AND name = ?2 AND status IN ('pending', 'waiting', 'running')",
    )?
    .execute(params![run, name, StepStatus::Waiting, reason, not_before_ms])?;
    Ok(())
}

/// An approval step waits for a decision until `deadline_ms`; `message`
/// (resolved) is what it shows.
pub fn await_approval(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
    message: &str,
    deadline_ms: i64,
    now: i64,
) -> Result<(), DbError> {
    tx.prepare_cached(
        "UPDATE steps SET status = ?3, waiting_on = ?4, not_before_ms = ?5, started_ms = ?6
         WHERE run_id = ?1 AND name = ?2",
    )?
    .execute(params![
        run,
        name,
        StepStatus::WaitingApproval,
        format!("approval: {message}"),
        deadline_ms,
        now
    ])?;
    Ok(())
}

/// Approval steps whose wait ended before `now`: (run, step).
pub fn approvals_overdue(tx: &Transaction<'_>, now: i64) -> Result<Vec<(String, String)>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT run_id, name FROM steps WHERE status = 'waiting_approval' AND not_before_ms < ?1 LIMIT 1000",
    )?;
    let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Whether a running run of `workflow` waits to be admitted.
pub fn unadmitted_runs(tx: &Transaction<'_>, workflow: &str) -> Result<bool, DbError> {
    tx.prepare_cached("SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'running' AND admitted = 0 AND workflow = ?1)")?
        .query_row([workflow], |r| r.get(0))
}

/// An open step reached a final state (a step already final is left as it
/// is); its run has one open step less.
#[allow(clippy::too_many_arguments)]
pub fn finish_step(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
    status: StepStatus,
    output: Option<&str>,
    error: Option<&str>,
    worker: Option<&str>,
    now: i64,
) -> Result<(), DbError> {
    // A foreach item: whether it had been started (taken), for its step's count.
    let was_pending = if name.ends_with(']') {
        Some(step_status(tx, run, name)? == Some(StepStatus::Pending))
    } else {
        None
    };
    let changed = tx
        .prepare_cached(
            "UPDATE steps SET status = ?3, output = ?4, error = ?5, worker = COALESCE(?6, worker), finished_ms = ?7,
                              waiting_on = NULL
             WHERE run_id = ?1 AND name = ?2 AND status IN ('pending', 'waiting', 'running', 'waiting_approval')",
        )?
        .execute(params![run, name, status, output, error, worker, now])?;
    if changed > 0 {
        tx.prepare_cached("UPDATE runs SET open_steps = open_steps - 1 WHERE id = ?1 AND open_steps IS NOT NULL")?
            .execute([run])?;
        // A foreach item: its step has one item less to wait for.
        if let Some(was_pending) = was_pending {
            tx.prepare_cached(
                "UPDATE steps SET items_left = items_left - 1, items_failed = items_failed + ?3,
                                  items_active = items_active - ?4
                 WHERE run_id = ?1 AND name = (SELECT parent FROM steps WHERE run_id = ?1 AND name = ?2)",
            )?
            .execute(params![
                run,
                name,
                i64::from(status != StepStatus::Succeeded),
                i64::from(!was_pending)
            ])?;
        }
    }
    Ok(())
}

/// A foreach step's counters: items in all, the position to look for the
/// next one to start from, items not yet ended, failed, and started (taken)
/// but not yet ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Items {
    pub total: i64,
    pub next: i64,
    pub left: i64,
    pub failed: i64,
    pub active: i64,
}

/// Start a foreach step: one pending row per item (`name[index]`, at the
/// step's position, its value as JSON), counted among the run's open steps.
pub fn start_foreach(tx: &Transaction<'_>, run: &str, name: &str, items: &[String], now: i64) -> Result<(), DbError> {
    let (position, queue): (i64, String) = tx
        .prepare_cached("SELECT position, queue FROM steps WHERE run_id = ?1 AND name = ?2")?
        .query_row([run, name], |r| Ok((r.get(0)?, r.get(1)?)))?;
    let mut insert = tx.prepare_cached(
        "INSERT INTO steps (run_id, name, position, queue, status, pending_deps, parent, item_index, item)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8)",
    )?;
    for (i, item) in items.iter().enumerate() {
        insert.execute(params![
            run,
            format!("{name}[{i}]"),
            position,
            queue,
            StepStatus::Pending,
            name,
            i as i64,
            item
        ])?;
    }
    let n = items.len() as i64;
    tx.prepare_cached("UPDATE runs SET open_steps = open_steps + ?2 WHERE id = ?1 AND open_steps IS NOT NULL")?
        .execute(params![run, n])?;
    tx.prepare_cached(
        "UPDATE steps SET status = ?3, started_ms = ?4, items_total = ?5, items_next = 0, items_left = ?5,
                          items_failed = 0, items_active = 0, error = NULL, waiting_on = NULL
         WHERE run_id = ?1 AND name = ?2",
    )?
    .execute(params![run, name, StepStatus::Running, now, n])?;
    Ok(())
}

/// A foreach step's counters (`None` for any other step).
pub fn items(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<Items>, DbError> {
    let items = tx
        .prepare_cached(
            "SELECT items_total, items_next, items_left, items_failed, items_active FROM steps
             WHERE run_id = ?1 AND name = ?2 AND items_total IS NOT NULL",
        )?
        .query_row([run, name], |r| {
            Ok(Items {
                total: r.get(0)?,
                next: r.get(1)?,
                left: r.get(2)?,
                failed: r.get(3)?,
                active: r.get(4)?,
            })
        })
        .optional()?;
    Ok(items)
}

/// Take the next item of a foreach step still pending from position
/// `from` on (one cancelled before it started is passed over): its index
/// and value, counted as started. `None`: no item is left to start.
pub fn take_item(tx: &Transaction<'_>, run: &str, name: &str, from: i64) -> Result<Option<(i64, String)>, DbError> {
    let next: Option<(i64, Option<String>)> = tx
        .prepare_cached(
            "SELECT item_index, item FROM steps WHERE run_id = ?1 AND parent = ?2 AND item_index >= ?3
             AND status = 'pending' ORDER BY item_index LIMIT 1",
        )?
        .query_row(params![run, name, from], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    match &next {
        Some((index, _)) => tx
            .prepare_cached(
                "UPDATE steps SET items_next = ?3 + 1, items_active = items_active + 1 WHERE run_id = ?1 AND name = ?2",
            )?
            .execute(params![run, name, index])?,
        None => tx
            .prepare_cached("UPDATE steps SET items_next = items_total WHERE run_id = ?1 AND name = ?2")?
            .execute(params![run, name])?,
    };
    Ok(next.map(|(index, item)| (index, item.unwrap_or_else(|| "null".into()))))
}

/// A foreach item's value, as JSON.
pub fn item(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
    tx.prepare_cached("SELECT item FROM steps WHERE run_id = ?1 AND name = ?2")?
        .query_row([run, name], |r| r.get(0))
        .optional()
        .map(Option::flatten)
}

/// Skip a foreach step's items not yet started (after a failure); how many.
pub fn skip_unstarted_items(tx: &Transaction<'_>, run: &str, name: &str, why: &str, now: i64) -> Result<i64, DbError> {
    let skip = |taken: bool| {
        // Pending: never taken. Waiting with no attempt: taken, but held by
        // a limit before its first dispatch.
        let sql = if taken {
            "UPDATE steps SET status = ?3, error = ?4, finished_ms = ?5, waiting_on = NULL
             WHERE run_id = ?1 AND parent = ?2 AND status = 'waiting' AND attempts = 0"
        } else {
            "UPDATE steps SET status = ?3, error = ?4, finished_ms = ?5
             WHERE run_id = ?1 AND parent = ?2 AND status = 'pending'"
        };
        tx.prepare_cached(sql)?
            .execute(params![run, name, StepStatus::Skipped, why, now])
            .map(|n| n as i64)
    };
    let (never, held) = (skip(false)?, skip(true)?);
    tx.prepare_cached("UPDATE runs SET open_steps = open_steps - ?2 WHERE id = ?1 AND open_steps IS NOT NULL")?
        .execute(params![run, never + held])?;
    tx.prepare_cached(
        "UPDATE steps SET items_next = items_total, items_left = items_left - ?3, items_active = items_active - ?4
         WHERE run_id = ?1 AND name = ?2",
    )?
    .execute(params![run, name, never + held, held])?;
    Ok(never + held)
}

/// A foreach item's end: status, output, error.
pub type ItemResult = (StepStatus, Option<String>, Option<String>);

/// A foreach step's items in order: status, output, error.
pub fn item_results(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Vec<ItemResult>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT status, output, error FROM steps WHERE run_id = ?1 AND parent = ?2 ORDER BY item_index",
    )?;
    let rows = stmt.query_map([run, name], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    rows.collect()
}

/// A foreach step's open items.
pub fn open_items(tx: &Transaction<'_>, run: &str, name: &str) -> Result<Vec<String>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT name FROM steps WHERE run_id = ?1 AND parent = ?2
         AND status IN ('pending', 'waiting', 'running', 'waiting_approval') ORDER BY item_index",
    )?;
    let rows = stmt.query_map([run, name], |r| r.get(0))?;
    rows.collect()
}

/// Record what an agent step's model did (latest attempt), adding its
/// tokens and cost to the step's.
pub fn record_agent(
    tx: &Transaction<'_>,
    run: &str,
    name: &str,
    model: &str,
    usage: (u64, u64),
    cost: Option<f64>,
    transcript_json: &str,
) -> Result<(), DbError> {
    // The run and its ancestors (a child run's spending is its parents' too).
    tx.prepare_cached(
        "WITH RECURSIVE lineage(id) AS (
             SELECT ?1
             UNION ALL SELECT r.parent_run FROM runs r JOIN lineage l ON r.id = l.id WHERE r.parent_run IS NOT NULL
         )
         UPDATE runs SET spent_tokens = spent_tokens + ?2 + ?3, spent_cost = spent_cost + COALESCE(?4, 0.0)
         WHERE id IN lineage",
    )?
    .execute(params![
        run,
        i64::try_from(usage.0).unwrap_or(i64::MAX),
        i64::try_from(usage.1).unwrap_or(i64::MAX),
        cost
    ])?;
    tx.prepare_cached(
        "UPDATE steps SET model = ?3, input_tokens = COALESCE(input_tokens, 0) + ?4,
                          output_tokens = COALESCE(output_tokens, 0) + ?5, transcript = ?6,
                          cost = CASE WHEN ?7 IS NULL THEN cost ELSE COALESCE(cost, 0.0) + ?7 END
         WHERE run_id = ?1 AND name = ?2",
    )?
    .execute(params![
        run,
        name,
        model,
        i64::try_from(usage.0).unwrap_or(i64::MAX),
        i64::try_from(usage.1).unwrap_or(i64::MAX),
        transcript_json,
        cost
    ])?;
    Ok(())
}

/// A run's tokens (input + output) and cost so far: its counters, kept by
/// [`record_agent`] (not a sum over its steps: a result costs the same in a
/// run of any width).
pub fn run_spend(tx: &Transaction<'_>, run: &str) -> Result<(i64, f64), DbError> {
    tx.prepare_cached("SELECT spent_tokens, spent_cost FROM runs WHERE id = ?1")?
        .query_row([run], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Record the latest failure of a step that will be retried.
pub fn note_step_error(tx: &Transaction<'_>, run: &str, name: &str, error: &str, worker: &str) -> Result<(), DbError> {
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

/// A run reached a final state: its parent run and step, for a child run.
pub fn finish_run(
    tx: &Transaction<'_>,
    run: &str,
    status: RunStatus,
    error: Option<&str>,
    cancelled_by: Option<&str>,
    now: i64,
) -> Result<Option<(String, String)>, DbError> {
    let parent: Option<(Option<String>, Option<String>)> = tx
        .prepare_cached(
            "UPDATE runs SET status = ?2, error = ?3, finished_ms = ?4, cancelled_by = ?5 WHERE id = ?1
             RETURNING parent_run, parent_step",
        )?
        .query_row(params![run, status, error, now, cancelled_by], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .optional()?;
    Ok(match parent {
        Some((Some(run), Some(step))) => Some((run, step)),
        _ => None,
    })
}

/// A child run's ancestors, nearest first: (run, workflow).
pub fn ancestors(tx: &Transaction<'_>, run: &str) -> Result<Vec<(String, String)>, DbError> {
    let mut stmt = tx.prepare_cached(
        "WITH RECURSIVE lineage(id, depth) AS (
             SELECT parent_run, 1 FROM runs WHERE id = ?1 AND parent_run IS NOT NULL
             UNION ALL SELECT r.parent_run, l.depth + 1 FROM runs r JOIN lineage l ON r.id = l.id
             WHERE r.parent_run IS NOT NULL
         )
         SELECT r.id, r.workflow FROM lineage l JOIN runs r ON r.id = l.id ORDER BY l.depth",
    )?;
    let rows = stmt.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// A run's priority and how deep it is among sub-workflows (0: started by a submit).
pub fn lineage(tx: &Transaction<'_>, run: &str) -> Result<(u8, u32), DbError> {
    tx.prepare_cached("SELECT priority, depth FROM runs WHERE id = ?1")?
        .query_row([run], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// A `workflow:` step starts, waiting on its child run.
pub fn await_child(tx: &Transaction<'_>, run: &str, step: &str, child: &str, now: i64) -> Result<(), DbError> {
    tx.prepare_cached(
        "UPDATE steps SET status = ?3, waiting_on = ?4, started_ms = ?5, attempts = 1 WHERE run_id = ?1 AND name = ?2",
    )?
    .execute(params![
        run,
        step,
        StepStatus::Running,
        format!("child run {child}"),
        now
    ])?;
    Ok(())
}

/// How a run ended: its workflow, status and error.
pub fn run_end(tx: &Transaction<'_>, run: &str) -> Result<Option<(String, RunStatus, Option<String>)>, DbError> {
    tx.prepare_cached("SELECT workflow, status, error FROM runs WHERE id = ?1")?
        .query_row([run], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()
}

/// The running child runs of a run (of one of its steps, if given).
pub fn running_children(tx: &Transaction<'_>, run: &str, step: Option<&str>) -> Result<Vec<String>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id FROM runs WHERE parent_run = ?1 AND (?2 IS NULL OR parent_step = ?2) AND status = 'running'",
    )?;
    let rows = stmt.query_map(params![run, step], |r| r.get(0))?;
    rows.collect()
}

/// Bytes of output of a run's steps (`parent` `None`) or of one foreach
/// step's items.
pub fn outputs_size(tx: &Transaction<'_>, run: &str, parent: Option<&str>) -> Result<usize, DbError> {
    let bytes: i64 = tx
        .prepare_cached(
            "SELECT COALESCE(SUM(length(CAST(output AS BLOB))), 0) FROM steps
             WHERE run_id = ?1 AND parent IS ?2 AND status = 'succeeded'",
        )?
        .query_row(params![run, parent], |r| r.get(0))?;
    Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// A finished run's steps (not foreach items) and their outputs, in workflow order.
pub fn run_outputs(tx: &Transaction<'_>, run: &str) -> Result<Vec<(String, Option<String>)>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT name, CASE status WHEN 'succeeded' THEN output END FROM steps
         WHERE run_id = ?1 AND parent IS NULL ORDER BY position",
    )?;
    let rows = stmt.query_map([run], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Queue a cancellation for every worker.
pub fn insert_control(
    tx: &Transaction<'_>,
    run: &str,
    step: Option<&str>,
    reason: &str,
    now: i64,
) -> Result<(), DbError> {
    tx.prepare_cached("INSERT INTO controls (run_id, step, reason, created_ms) VALUES (?1, ?2, ?3, ?4)")?
        .execute(params![run, step, reason, now])?;
    Ok(())
}

/// Steps held by a limit and due by `now`, highest priority first, then oldest run.
pub fn waiting_steps(tx: &Transaction<'_>, now: i64, limit: usize) -> Result<Vec<WaitingStep>, DbError> {
    // A literal limit (see `Db::unpublished_tasks`).
    let mut stmt = tx.prepare_cached(&format!(
        "SELECT s.run_id, r.workflow, s.name, r.admitted, s.waiting_on, s.attempts
         FROM steps s JOIN runs r ON r.id = s.run_id
         WHERE s.status = 'waiting' AND (s.not_before_ms IS NULL OR s.not_before_ms <= ?1)
         ORDER BY r.priority DESC, r.created_ms, r.id, s.position, s.item_index LIMIT {limit}"
    ))?;
    let rows = stmt.query_map(params![now], |r| {
        Ok(WaitingStep {
            run: r.get(0)?,
            workflow: r.get(1)?,
            step: r.get(2)?,
            admitted: r.get(3)?,
            waiting_on: r.get(4)?,
            attempts: r.get(5)?,
        })
    })?;
    rows.collect()
}

/// Name the limit that holds a waiting step.
pub fn set_waiting_on(tx: &Transaction<'_>, run: &str, name: &str, reason: &str) -> Result<(), DbError> {
    tx.prepare_cached("UPDATE steps SET waiting_on = ?3 WHERE run_id = ?1 AND name = ?2")?
        .execute(params![run, name, reason])?;
    Ok(())
}

fn counts(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> Result<HashMap<String, i64>, DbError> {
    let mut stmt = tx.prepare_cached(sql)?;
    let rows = stmt.query_map(params, |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Tasks without a result, by pool.
pub fn in_flight_by_pool(tx: &Transaction<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT queue, COUNT(*) FROM tasks WHERE status = 'dispatched' GROUP BY queue",
        [],
    )
}

/// Tasks without a result, by model.
pub fn in_flight_by_model(tx: &Transaction<'_>) -> Result<HashMap<String, i64>, DbError> {
    // Over the in-flight tasks only (a partial index), not every agent task ever.
    let mut by_model = counts(
        tx,
        "SELECT COALESCE(model, ''), COUNT(*) FROM tasks WHERE status = 'dispatched' GROUP BY 1",
        [],
    )?;
    by_model.remove("");
    Ok(by_model)
}

/// A model's tasks due since `since` (ms) and their tokens.
pub fn model_window(tx: &Transaction<'_>, model: &str, since: i64) -> Result<(i64, i64), DbError> {
    tx.prepare_cached(
        "SELECT COUNT(*), COALESCE(SUM(tokens), 0) FROM tasks
         WHERE model = ?1 AND not_before_ms > ?2 AND status != 'cancelled'",
    )?
    .query_row(params![model, since], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Running steps (tasks without a result), by workflow.
pub fn running_steps_by_workflow(tx: &Transaction<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT r.workflow, COUNT(*) FROM tasks t JOIN runs r ON r.id = t.run_id WHERE t.status = 'dispatched'
         GROUP BY 1",
        [],
    )
}

/// Admitted running runs, by workflow.
pub fn active_runs_by_workflow(tx: &Transaction<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT workflow, COUNT(*) FROM runs WHERE status = 'running' AND admitted = 1 GROUP BY 1",
        [],
    )
}

/// Until when (ms) and why a model is paused, if it is after `now`.
pub fn model_pause(tx: &Transaction<'_>, model: &str, now: i64) -> Result<Option<(i64, String)>, DbError> {
    tx.prepare_cached("SELECT until_ms, reason FROM model_pauses WHERE model = ?1 AND until_ms > ?2")?
        .query_row(params![model, now], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
}

/// Pause a model until `until` (ms), keeping a later pause if there is one.
pub fn pause_model(tx: &Transaction<'_>, model: &str, until: i64, reason: &str) -> Result<(), DbError> {
    tx.prepare_cached(
        "INSERT INTO model_pauses (model, until_ms, reason) VALUES (?1, ?2, ?3)
         ON CONFLICT (model) DO UPDATE SET until_ms = excluded.until_ms, reason = excluded.reason
         WHERE excluded.until_ms > model_pauses.until_ms",
    )?
    .execute(params![model, until, reason])?;
    Ok(())
}

/// Running runs whose deadline passed before `now`.
pub fn overdue_runs(tx: &Transaction<'_>, now: i64) -> Result<Vec<(String, String)>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT id, workflow FROM runs WHERE status = 'running' AND deadline_ms IS NOT NULL AND deadline_ms < ?1
         LIMIT 1000",
    )?;
    let rows = stmt.query_map([now], |r| Ok((r.get(0)?, r.get(1)?)))?;
    rows.collect()
}

/// Published tasks still without a result whose deadline passed before `cutoff`.
pub fn lost_tasks(tx: &Transaction<'_>, cutoff: i64) -> Result<Vec<LostTask>, DbError> {
    let mut stmt = tx.prepare_cached(
        "SELECT task_id, run_id, step, attempt FROM tasks
         WHERE status = 'dispatched' AND published = 1 AND deadline_ms < ?1 LIMIT 1000",
    )?;
    let rows = stmt.query_map([cutoff], |r| {
        Ok(LostTask {
            task_id: r.get(0)?,
            run: r.get(1)?,
            step: r.get(2)?,
            attempt: r.get(3)?,
        })
    })?;
    rows.collect()
}
