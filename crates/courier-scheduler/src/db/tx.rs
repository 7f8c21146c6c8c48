//! Statements used inside the engine's transactions.

use std::collections::HashMap;

use courier_wire::TaskStatus;

use super::sql::{Batched, DbError, Param, Row, Tx, p, values};
use super::{DISPATCHED, RunStatus, StepStatus, TaskRow};

/// A run as the engine needs it.
#[derive(Debug, Clone)]
pub struct RunRow {
    pub workflow: String,
    pub status: RunStatus,
    /// Counted against its workflow's `max_active_runs`.
    pub admitted: bool,
    /// When its timeout stops it.
    pub deadline_ms: Option<i64>,
    /// Its tasks' priority on the broker.
    pub priority: u8,
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
    /// Its turn (see `Engine::turn`).
    pub turn: i64,
    /// Its pool.
    pub queue: String,
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
pub fn insert_run(tx: &Tx<'_>, run: &RunInsert<'_>, now: i64) -> Result<(), DbError> {
    let (parent_run, parent_step, depth) = run.parent.map_or((None, None, 0), |(r, s, d)| (Some(r), Some(s), d));
    tx.exec(
        "INSERT INTO runs (id, workflow, status, params, created_ms, priority, deadline_ms, admitted, open_steps,
                           parent_run, parent_step, depth)
         VALUES (?1, ?2, ?3, '', ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        p![
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
        ],
    )?;
    tx.exec(
        "INSERT INTO run_params (run_id, params) VALUES (?1, ?2)",
        p![run.id, run.params_json],
    )?;
    Ok(())
}

/// A step to insert with `depends` dependencies (its run counted it among
/// its open steps when it was inserted): pending, or already running its
/// first attempt since `started_ms` (a first step whose task is written
/// with it).
#[derive(Debug, Clone)]
pub struct NewStep<'a> {
    pub name: &'a str,
    pub position: usize,
    pub queue: &'a str,
    pub depends: usize,
    pub started_ms: Option<i64>,
    /// Inserted waiting, in this turn, for the limit named (if named):
    /// as [`wait_step`] would mark it.
    pub waiting: Option<(Option<&'a str>, i64)>,
    /// It goes through its pool's lane (its run is small).
    pub lane: bool,
}

/// Insert a run's steps, many per statement ([`Batched`]).
pub fn insert_steps(tx: &Tx<'_>, run: &str, steps: &[NewStep<'_>]) -> Result<(), DbError> {
    let states: Vec<(StepStatus, u32, Option<&str>, Option<i64>)> = steps
        .iter()
        .map(|step| match (step.started_ms, step.waiting) {
            (Some(_), _) => (StepStatus::Running, 1, None, None),
            (None, Some((reason, turn))) => (StepStatus::Waiting, 0, reason, Some(turn)),
            (None, None) => (StepStatus::Pending, 0, None, None),
        })
        .collect();
    let params: Vec<&dyn Param> = steps
        .iter()
        .zip(&states)
        .flat_map(|(step, (status, attempts, waiting_on, turn))| -> [&dyn Param; 11] {
            [
                &run,
                &step.name,
                &step.position,
                &step.queue,
                status,
                &step.depends,
                attempts,
                &step.started_ms,
                waiting_on,
                turn,
                &step.lane,
            ]
        })
        .collect();
    tx.exec_batched(&INSERT_STEPS, 11, &params)?;
    Ok(())
}

static INSERT_STEPS: Batched = Batched::new(|rows| {
    format!(
        "INSERT INTO steps (run_id, name, position, queue, status, pending_deps, attempts, started_ms, waiting_on,
                            turn, lane) {}",
        values(11, rows)
    )
});

static INSERT_TASKS: Batched = Batched::new(|rows| {
    format!(
        "INSERT INTO tasks (task_id, run_id, step, attempt, queue, status, snapshot_hash, not_before_ms, created_ms,
                            deadline_ms, model, tokens) {}",
        values(12, rows)
    )
});

/// Set how many of a step's dependencies are still to succeed.
pub fn set_pending_deps(tx: &Tx<'_>, run: &str, name: &str, left: i64) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET pending_deps = ?3 WHERE run_id = ?1 AND name = ?2",
        p![run, name, left],
    )?;
    Ok(())
}

/// Every running run: (id, workflow).
pub fn running_runs(tx: &Tx<'_>) -> Result<Vec<(String, String)>, DbError> {
    tx.all("SELECT id, workflow FROM runs WHERE status = 'running'", p![], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// A dependency of step `name` succeeded: its status, and how many of its
/// dependencies are still to succeed (`None` for a step counted the old way).
pub fn dependency_done(tx: &Tx<'_>, run: &str, name: &str) -> Result<Option<(StepStatus, Option<i64>)>, DbError> {
    tx.exec(
        "UPDATE steps SET pending_deps = pending_deps - 1 WHERE run_id = ?1 AND name = ?2 AND pending_deps > 0",
        p![run, name],
    )?;
    tx.opt(
        "SELECT status, pending_deps FROM steps WHERE run_id = ?1 AND name = ?2",
        p![run, name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Insert tasks into the outbox, many per statement ([`Batched`]).
pub fn insert_tasks(tx: &Tx<'_>, tasks: &[NewTask<'_>], now: i64) -> Result<(), DbError> {
    if tasks.is_empty() {
        return Ok(());
    }
    tx.wrote_outbox();
    let params: Vec<&dyn Param> = tasks
        .iter()
        .flat_map(|task| -> [&dyn Param; 12] {
            [
                &task.task_id,
                &task.run,
                &task.step,
                &task.attempt,
                &task.queue,
                &DISPATCHED,
                &task.snapshot_hash,
                &task.not_before_ms,
                &now,
                &task.deadline_ms,
                &task.model,
                &task.tokens,
            ]
        })
        .collect();
    tx.exec_batched(&INSERT_TASKS, 12, &params)?;
    Ok(())
}

/// A task row by id.
pub fn task(tx: &Tx<'_>, task_id: &str) -> Result<Option<TaskRow>, DbError> {
    tx.opt(
        "SELECT run_id, step, attempt, status FROM tasks WHERE task_id = ?1",
        p![task_id],
        |r| {
            Ok(TaskRow {
                run_id: r.get(0)?,
                step: r.get(1)?,
                attempt: r.get(2)?,
                dispatched: r.get::<String>(3)? == DISPATCHED,
            })
        },
    )
}

/// How a task attempt ended, with the tokens it really used: the task, if
/// still dispatched for this run, step and attempt, ends with `status`
/// (the common case of a result, in one statement). Whether it did; when it
/// did not, nothing changed.
pub fn finish_dispatched_task(
    tx: &Tx<'_>,
    task_id: &str,
    (run, step, attempt): (&str, &str, u32),
    status: TaskStatus,
    tokens: Option<i64>,
    now: i64,
) -> Result<bool, DbError> {
    let changed = tx.exec(
        "UPDATE tasks SET status = ?5, finished_ms = ?6, tokens = COALESCE(?7, tokens)
         WHERE task_id = ?1 AND status = 'dispatched' AND run_id = ?2 AND step = ?3 AND attempt = ?4",
        p![task_id, run, step, attempt, status.as_str(), now, tokens],
    )?;
    Ok(changed > 0)
}

/// Tasks of a run (or of one step, a foreach step's items included) not
/// yet published: never published now.
/// Their ids.
pub fn cancel_unpublished(tx: &Tx<'_>, run: &str, step: Option<&str>, now: i64) -> Result<Vec<String>, DbError> {
    let ids: Vec<String> = tx.all(
        "SELECT task_id FROM tasks WHERE run_id = ?1 AND published = 0 AND status = 'dispatched'
         AND (CAST(?2 AS TEXT) IS NULL OR step = ?2 OR substr(step, 1, length(CAST(?2 AS TEXT)) + 1) = CAST(?2 AS TEXT) || '[')",
        p![run, step],
        |r| r.get(0),
    )?;
    for id in &ids {
        tx.exec(
            "UPDATE tasks SET status = ?2, finished_ms = ?3 WHERE task_id = ?1",
            p![id, TaskStatus::Cancelled, now],
        )?;
    }
    Ok(ids)
}

/// The run's workflow, status and admission.
pub fn run(tx: &Tx<'_>, run: &str) -> Result<Option<RunRow>, DbError> {
    tx.opt(
        "SELECT workflow, status, admitted, deadline_ms, priority FROM runs WHERE id = ?1",
        p![run],
        |r| {
            Ok(RunRow {
                workflow: r.get(0)?,
                status: r.get(1)?,
                admitted: r.get(2)?,
                deadline_ms: r.get(3)?,
                priority: r.get(4)?,
            })
        },
    )
}

/// The run, and the status of one of its steps, in one statement (the
/// result path's).
pub fn run_and_step(tx: &Tx<'_>, run: &str, step: &str) -> Result<Option<(RunRow, Option<StepStatus>)>, DbError> {
    tx.opt(
        "SELECT r.workflow, r.status, r.admitted, r.deadline_ms, r.priority, s.status
         FROM runs r LEFT JOIN steps s ON s.run_id = r.id AND s.name = ?2 WHERE r.id = ?1",
        p![run, step],
        |r| {
            Ok((
                RunRow {
                    workflow: r.get(0)?,
                    status: r.get(1)?,
                    admitted: r.get(2)?,
                    deadline_ms: r.get(3)?,
                    priority: r.get(4)?,
                },
                r.get(5)?,
            ))
        },
    )
}

/// The run's params as JSON.
pub fn run_params(tx: &Tx<'_>, run: &str) -> Result<String, DbError> {
    tx.one("SELECT params FROM run_params WHERE run_id = ?1", p![run], |r| r.get(0))
}

/// The run counts against its workflow's `max_active_runs` from now on.
pub fn admit_run(tx: &Tx<'_>, run: &str) -> Result<(), DbError> {
    tx.exec("UPDATE runs SET admitted = 1 WHERE id = ?1", p![run])?;
    Ok(())
}

/// One step's status.
pub fn step_status(tx: &Tx<'_>, run: &str, name: &str) -> Result<Option<StepStatus>, DbError> {
    tx.opt(
        "SELECT status FROM steps WHERE run_id = ?1 AND name = ?2",
        p![run, name],
        |r| r.get(0),
    )
}

/// The run's steps that may still change, with their status.
pub fn open_steps(tx: &Tx<'_>, run: &str) -> Result<Vec<(String, StepStatus)>, DbError> {
    tx.all("SELECT name, status FROM steps WHERE run_id = ?1 AND (status = 'pending' OR status = 'waiting' OR status = 'running' OR status = 'waiting_approval')
         ORDER BY position", p![run], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// How many of the run's steps may still change (its counter; counted for
/// runs started before the counter existed), and the run's status.
pub fn open_step_count(tx: &Tx<'_>, run: &str) -> Result<Option<(i64, RunStatus)>, DbError> {
    tx.opt("SELECT COALESCE(open_steps, (SELECT COUNT(*) FROM steps
                                      WHERE run_id = ?1 AND (status = 'pending' OR status = 'waiting' OR status = 'running' OR status = 'waiting_approval'))),
                   status
         FROM runs WHERE id = ?1", p![run], |r| Ok((r.get(0)?, r.get(1)?)))
}

/// Names of the run's failed steps and of its cancelled ones, in workflow
/// order (foreach items are their step's business, not the run's).
pub fn failed_and_cancelled(tx: &Tx<'_>, run: &str) -> Result<(Vec<String>, Vec<String>), DbError> {
    let ended: Vec<(String, StepStatus)> = tx.all(
        "SELECT name, status FROM steps WHERE run_id = ?1 AND (status = 'failed' OR status = 'cancelled')
         AND parent IS NULL ORDER BY position",
        p![run],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    Ok(ended
        .into_iter()
        .partition::<Vec<_>, _>(|(_, status)| *status == StepStatus::Failed))
    .map(|(failed, cancelled)| {
        let names = |v: Vec<(String, StepStatus)>| v.into_iter().map(|(name, _)| name).collect();
        (names(failed), names(cancelled))
    })
}

/// The output of one step of a run, if it has one: a skipped step's is empty.
pub fn step_output(tx: &Tx<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
    tx.opt(
        "SELECT CASE status WHEN 'succeeded' THEN output ELSE '' END FROM steps
         WHERE run_id = ?1 AND name = ?2 AND (status = 'succeeded' OR status = 'skipped')",
        p![run, name],
        |r| r.get(0),
    )
    .map(Option::flatten)
}

/// A waiting step is dispatched for `attempt` by admission: whether it
/// was (not if it ended or started otherwise since it was read).
pub fn start_waiting_step(tx: &Tx<'_>, run: &str, name: &str, attempt: u32, now: i64) -> Result<bool, DbError> {
    let changed = tx.exec(
        "UPDATE steps SET status = ?5, attempts = ?3, started_ms = COALESCE(started_ms, ?4), error = NULL,
                          waiting_on = NULL, not_before_ms = NULL
         WHERE run_id = ?1 AND name = ?2 AND status = 'waiting'",
        p![run, name, attempt, now, StepStatus::Running],
    )?;
    Ok(changed > 0)
}

/// A step is dispatched for `attempt`.
pub fn start_step(tx: &Tx<'_>, run: &str, name: &str, attempt: u32, now: i64) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET status = ?5, attempts = ?3, started_ms = COALESCE(started_ms, ?4), error = NULL,
                          waiting_on = NULL, not_before_ms = NULL
         WHERE run_id = ?1 AND name = ?2 AND (status = 'pending' OR status = 'waiting' OR status = 'running')",
        p![run, name, attempt, now, StepStatus::Running],
    )?;
    Ok(())
}

/// A step is ready but held by a limit (named by `reason`, once known), or
/// (a retry) not before `not_before_ms`.
pub fn wait_step(
    tx: &Tx<'_>,
    run: &str,
    name: &str,
    reason: Option<&str>,
    not_before_ms: Option<i64>,
    turn: i64,
) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET status = ?3, waiting_on = ?4, not_before_ms = ?5, turn = ?6
         WHERE run_id = ?1 AND name = ?2 AND (status = 'pending' OR status = 'waiting' OR status = 'running')",
        p![run, name, StepStatus::Waiting, reason, not_before_ms, turn],
    )?;
    Ok(())
}

/// The turn after a run's last waiting step in a pool, if it has one.
pub fn after_last_turn(tx: &Tx<'_>, run: &str, pool: &str) -> Result<Option<i64>, DbError> {
    tx.one(
        "SELECT MAX(turn) + 1 FROM steps WHERE run_id = ?1 AND queue = ?2 AND status = 'waiting'",
        p![run, pool],
        |r| r.get(0),
    )
}

/// A priority's virtual time in a pool: the latest turn dispatched there.
pub fn virtual_time(tx: &Tx<'_>, priority: u8, pool: &str) -> Result<Option<i64>, DbError> {
    tx.opt(
        "SELECT vtime FROM turns WHERE priority = ?1 AND pool = ?2",
        p![i64::from(priority), pool],
        |r| r.get(0),
    )
}

/// Advance a priority's virtual time in a pool to `turn` (never back).
pub fn advance_virtual_time(tx: &Tx<'_>, priority: u8, pool: &str, turn: i64) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO turns (priority, pool, vtime) VALUES (?1, ?2, ?3)
         ON CONFLICT (priority, pool) DO UPDATE
         SET vtime = CASE WHEN excluded.vtime > turns.vtime THEN excluded.vtime ELSE turns.vtime END",
        p![i64::from(priority), pool, turn],
    )?;
    Ok(())
}

/// An approval step waits for a decision until `deadline_ms`; `message`
/// (resolved) is what it shows.
pub fn await_approval(
    tx: &Tx<'_>,
    run: &str,
    name: &str,
    message: &str,
    deadline_ms: i64,
    now: i64,
) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET status = ?3, waiting_on = ?4, not_before_ms = ?5, started_ms = ?6
         WHERE run_id = ?1 AND name = ?2",
        p![
            run,
            name,
            StepStatus::WaitingApproval,
            format!("approval: {message}"),
            deadline_ms,
            now
        ],
    )?;
    Ok(())
}

/// Approval steps whose wait ended before `now`: (run, step).
pub fn approvals_overdue(tx: &Tx<'_>, now: i64) -> Result<Vec<(String, String)>, DbError> {
    tx.all(
        "SELECT run_id, name FROM steps WHERE status = 'waiting_approval' AND not_before_ms < ?1 LIMIT 1000",
        p![now],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Whether a running run of `workflow` waits to be admitted.
pub fn unadmitted_runs(tx: &Tx<'_>, workflow: &str) -> Result<bool, DbError> {
    tx.one(
        "SELECT EXISTS (SELECT 1 FROM runs WHERE status = 'running' AND admitted = 0 AND workflow = ?1)",
        p![workflow],
        |r| r.get(0),
    )
}

/// An open step reached a final state (a step already final is left as it
/// is): whether it did. Its run's count of open steps is left as it is, to
/// be lowered by [`close_steps`]: the engine ends steps through its
/// `end_step`, which does.
#[allow(clippy::too_many_arguments)]
pub(crate) fn finish_step(
    tx: &Tx<'_>,
    run: &str,
    name: &str,
    status: StepStatus,
    output: Option<&str>,
    error: Option<&str>,
    worker: Option<&str>,
    now: i64,
) -> Result<bool, DbError> {
    // A foreach item: whether it had been started (taken), for its step's count.
    let was_pending = if name.ends_with(']') {
        Some(step_status(tx, run, name)? == Some(StepStatus::Pending))
    } else {
        None
    };
    let changed = tx.exec(
        "UPDATE steps SET status = ?3, output = ?4, error = ?5, worker = COALESCE(?6, worker), finished_ms = ?7,
                              waiting_on = NULL
             WHERE run_id = ?1 AND name = ?2 AND (status = 'pending' OR status = 'waiting' OR status = 'running' OR status = 'waiting_approval')",
        p![run, name, status, output, error, worker, now],
    )?;
    if changed > 0 {
        // A foreach item: its step has one item less to wait for.
        if let Some(was_pending) = was_pending {
            tx.exec(
                "UPDATE steps SET items_left = items_left - 1, items_failed = items_failed + ?3,
                                  items_active = items_active - ?4
                 WHERE run_id = ?1 AND name = (SELECT parent FROM steps WHERE run_id = ?1 AND name = ?2)",
                p![
                    run,
                    name,
                    i64::from(status != StepStatus::Succeeded),
                    i64::from(!was_pending)
                ],
            )?;
        }
    }
    Ok(changed > 0)
}

/// Steps of `run` that ended, `n` of them: its count of open steps goes down
/// by as many (the engine counts a transaction's ends and writes them once).
pub fn close_steps(tx: &Tx<'_>, run: &str, n: i64) -> Result<(), DbError> {
    tx.exec(
        "UPDATE runs SET open_steps = open_steps - ?2 WHERE id = ?1 AND open_steps IS NOT NULL",
        p![run, n],
    )?;
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
pub fn start_foreach(tx: &Tx<'_>, run: &str, name: &str, items: &[String], now: i64) -> Result<(), DbError> {
    let (position, queue): (i64, String) = tx.one(
        "SELECT position, queue FROM steps WHERE run_id = ?1 AND name = ?2",
        p![run, name],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    for (i, item) in items.iter().enumerate() {
        tx.exec(
            "INSERT INTO steps (run_id, name, position, queue, status, pending_deps, parent, item_index, item)
         VALUES (?1, ?2, ?3, ?4, ?5, 0, ?6, ?7, ?8)",
            p![
                run,
                format!("{name}[{i}]"),
                position,
                queue,
                StepStatus::Pending,
                name,
                i as i64,
                item
            ],
        )?;
    }
    let n = items.len() as i64;
    tx.exec(
        "UPDATE runs SET open_steps = open_steps + ?2 WHERE id = ?1 AND open_steps IS NOT NULL",
        p![run, n],
    )?;
    tx.exec(
        "UPDATE steps SET status = ?3, started_ms = ?4, items_total = ?5, items_next = 0, items_left = ?5,
                          items_failed = 0, items_active = 0, error = NULL, waiting_on = NULL
         WHERE run_id = ?1 AND name = ?2",
        p![run, name, StepStatus::Running, now, n],
    )?;
    Ok(())
}

/// A foreach step's counters (`None` for any other step).
pub fn items(tx: &Tx<'_>, run: &str, name: &str) -> Result<Option<Items>, DbError> {
    let items = tx.opt(
        "SELECT items_total, items_next, items_left, items_failed, items_active FROM steps
             WHERE run_id = ?1 AND name = ?2 AND items_total IS NOT NULL",
        p![run, name],
        |r| {
            Ok(Items {
                total: r.get(0)?,
                next: r.get(1)?,
                left: r.get(2)?,
                failed: r.get(3)?,
                active: r.get(4)?,
            })
        },
    )?;
    Ok(items)
}

/// Take the next item of a foreach step still pending from position
/// `from` on (one cancelled before it started is passed over): its index
/// and value, counted as started. `None`: no item is left to start.
pub fn take_item(tx: &Tx<'_>, run: &str, name: &str, from: i64) -> Result<Option<(i64, String)>, DbError> {
    let next: Option<(i64, Option<String>)> = tx.opt(
        "SELECT item_index, item FROM steps WHERE run_id = ?1 AND parent = ?2 AND item_index >= ?3
             AND status = 'pending' ORDER BY item_index LIMIT 1",
        p![run, name, from],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    match &next {
        Some((index, _)) => tx.exec(
            "UPDATE steps SET items_next = ?3 + 1, items_active = items_active + 1 WHERE run_id = ?1 AND name = ?2",
            p![run, name, index],
        )?,
        None => tx.exec(
            "UPDATE steps SET items_next = items_total WHERE run_id = ?1 AND name = ?2",
            p![run, name],
        )?,
    };
    Ok(next.map(|(index, item)| (index, item.unwrap_or_else(|| "null".into()))))
}

/// A foreach item's value, as JSON.
pub fn item(tx: &Tx<'_>, run: &str, name: &str) -> Result<Option<String>, DbError> {
    tx.opt(
        "SELECT item FROM steps WHERE run_id = ?1 AND name = ?2",
        p![run, name],
        |r| r.get(0),
    )
    .map(Option::flatten)
}

/// Skip a foreach step's items not yet started (after a failure); how many.
pub fn skip_unstarted_items(tx: &Tx<'_>, run: &str, name: &str, why: &str, now: i64) -> Result<i64, DbError> {
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
        tx.exec(sql, p![run, name, StepStatus::Skipped, why, now])
            .map(|n| n as i64)
    };
    let (never, held) = (skip(false)?, skip(true)?);
    tx.exec(
        "UPDATE runs SET open_steps = open_steps - ?2 WHERE id = ?1 AND open_steps IS NOT NULL",
        p![run, never + held],
    )?;
    tx.exec(
        "UPDATE steps SET items_next = items_total, items_left = items_left - ?3, items_active = items_active - ?4
         WHERE run_id = ?1 AND name = ?2",
        p![run, name, never + held, held],
    )?;
    Ok(never + held)
}

/// A foreach item's end: status, output, error.
pub type ItemResult = (StepStatus, Option<String>, Option<String>);

/// A foreach step's items in order: status, output, error.
pub fn item_results(tx: &Tx<'_>, run: &str, name: &str) -> Result<Vec<ItemResult>, DbError> {
    tx.all(
        "SELECT status, output, error FROM steps WHERE run_id = ?1 AND parent = ?2 ORDER BY item_index",
        p![run, name],
        |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
    )
}

/// A foreach step's open items.
pub fn open_items(tx: &Tx<'_>, run: &str, name: &str) -> Result<Vec<String>, DbError> {
    tx.all(
        "SELECT name FROM steps WHERE run_id = ?1 AND parent = ?2
         AND (status = 'pending' OR status = 'waiting' OR status = 'running' OR status = 'waiting_approval') ORDER BY item_index",
        p![run, name],
        |r| r.get(0),
    )
}

/// Record what an agent step's model did (latest attempt), adding its
/// tokens and cost to the step's.
pub fn record_agent(
    tx: &Tx<'_>,
    run: &str,
    name: &str,
    model: &str,
    usage: (u64, u64),
    cost: Option<f64>,
    transcript_json: &str,
) -> Result<(), DbError> {
    // The run and its ancestors (a child run's spending is its parents' too);
    // its own totals, the run alone.
    tx.exec("WITH RECURSIVE lineage(id) AS (
             SELECT CAST(?1 AS TEXT)
             UNION ALL SELECT r.parent_run FROM runs r JOIN lineage l ON r.id = l.id WHERE r.parent_run IS NOT NULL
         )
         UPDATE runs SET spent_tokens = spent_tokens + ?2 + ?3, spent_cost = spent_cost + COALESCE(CAST(?4 AS DOUBLE PRECISION), 0.0),
             input_tokens = input_tokens + CASE WHEN id = ?1 THEN ?2 ELSE 0 END,
             output_tokens = output_tokens + CASE WHEN id = ?1 THEN ?3 ELSE 0 END,
             cost = cost + CASE WHEN id = ?1 THEN COALESCE(CAST(?4 AS DOUBLE PRECISION), 0.0) ELSE 0.0 END
         WHERE id IN (SELECT id FROM lineage)", p![
        run,
        i64::try_from(usage.0).unwrap_or(i64::MAX),
        i64::try_from(usage.1).unwrap_or(i64::MAX),
        cost
    ])?;
    tx.exec("UPDATE steps SET model = ?3, input_tokens = COALESCE(input_tokens, 0) + ?4,
                          output_tokens = COALESCE(output_tokens, 0) + ?5, transcript = ?6,
                          cost = CASE WHEN CAST(?7 AS DOUBLE PRECISION) IS NULL THEN cost ELSE COALESCE(cost, 0.0) + ?7 END
         WHERE run_id = ?1 AND name = ?2", p![
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
pub fn run_spend(tx: &Tx<'_>, run: &str) -> Result<(i64, f64), DbError> {
    tx.one(
        "SELECT spent_tokens, spent_cost FROM runs WHERE id = ?1",
        p![run],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Record the latest failure of a step that will be retried.
pub fn note_step_error(tx: &Tx<'_>, run: &str, name: &str, error: &str, worker: &str) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET error = ?3, worker = ?4 WHERE run_id = ?1 AND name = ?2",
        p![run, name, error, worker],
    )?;
    Ok(())
}

/// Set a step's error without changing its status (a succeeded step
/// whose memory update could not be written).
pub fn set_step_error(tx: &Tx<'_>, run: &str, name: &str, error: &str) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET error = ?3 WHERE run_id = ?1 AND name = ?2",
        p![run, name, error],
    )?;
    Ok(())
}

/// A run reached a final state: its parent run and step, for a child run.
pub fn finish_run(
    tx: &Tx<'_>,
    run: &str,
    status: RunStatus,
    error: Option<&str>,
    cancelled_by: Option<&str>,
    now: i64,
) -> Result<Option<(String, String)>, DbError> {
    // Read, then written: on SQLite, `UPDATE … RETURNING` costs about 30,000
    // instructions more than the `UPDATE` alone, five times this `SELECT`.
    let parent: Option<(Option<String>, Option<String>)> =
        tx.opt("SELECT parent_run, parent_step FROM runs WHERE id = ?1", p![run], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    tx.exec(
        "UPDATE runs SET status = ?2, error = ?3, finished_ms = ?4, cancelled_by = ?5 WHERE id = ?1",
        p![run, status, error, now, cancelled_by],
    )?;
    Ok(match parent {
        Some((Some(run), Some(step))) => Some((run, step)),
        _ => None,
    })
}

/// A child run's ancestors, nearest first: (run, workflow).
pub fn ancestors(tx: &Tx<'_>, run: &str) -> Result<Vec<(String, String)>, DbError> {
    tx.all(
        "WITH RECURSIVE lineage(id, depth) AS (
             SELECT parent_run, 1 FROM runs WHERE id = ?1 AND parent_run IS NOT NULL
             UNION ALL SELECT r.parent_run, l.depth + 1 FROM runs r JOIN lineage l ON r.id = l.id
             WHERE r.parent_run IS NOT NULL
         )
         SELECT r.id, r.workflow FROM lineage l JOIN runs r ON r.id = l.id ORDER BY l.depth",
        p![run],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// A run's priority and how deep it is among sub-workflows (0: started by a submit).
pub fn lineage(tx: &Tx<'_>, run: &str) -> Result<(u8, u32), DbError> {
    tx.one("SELECT priority, depth FROM runs WHERE id = ?1", p![run], |r| {
        Ok((r.get(0)?, r.get(1)?))
    })
}

/// A `workflow:` step starts, waiting on its child run.
pub fn await_child(tx: &Tx<'_>, run: &str, step: &str, child: &str, now: i64) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET status = ?3, waiting_on = ?4, started_ms = ?5, attempts = 1 WHERE run_id = ?1 AND name = ?2",
        p![run, step, StepStatus::Running, format!("child run {child}"), now],
    )?;
    Ok(())
}

/// How a run ended: its workflow, status and error.
pub fn run_end(tx: &Tx<'_>, run: &str) -> Result<Option<(String, RunStatus, Option<String>)>, DbError> {
    tx.opt("SELECT workflow, status, error FROM runs WHERE id = ?1", p![run], |r| {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    })
}

/// The running child runs of a run (of one of its steps, if given).
pub fn running_children(tx: &Tx<'_>, run: &str, step: Option<&str>) -> Result<Vec<String>, DbError> {
    tx.all("SELECT id FROM runs WHERE parent_run = ?1 AND (CAST(?2 AS TEXT) IS NULL OR parent_step = ?2) AND status = 'running'", p![run, step], |r| r.get(0))
}

/// Bytes of output of a run's steps (`parent` `None`) or of one foreach
/// step's items.
pub fn outputs_size(tx: &Tx<'_>, run: &str, parent: Option<&str>) -> Result<usize, DbError> {
    let bytes: i64 = tx.one(
        "SELECT COALESCE(SUM(octet_length(output)), 0) FROM steps
             WHERE run_id = ?1 AND parent IS NOT DISTINCT FROM ?2 AND status = 'succeeded'",
        p![run, parent],
        |r| r.get(0),
    )?;
    Ok(usize::try_from(bytes).unwrap_or(usize::MAX))
}

/// A finished run's steps (not foreach items) and their outputs, in workflow order.
pub fn run_outputs(tx: &Tx<'_>, run: &str) -> Result<Vec<(String, Option<String>)>, DbError> {
    tx.all(
        "SELECT name, CASE status WHEN 'succeeded' THEN output END FROM steps
         WHERE run_id = ?1 AND parent IS NULL ORDER BY position",
        p![run],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Queue a cancellation for every worker.
pub fn insert_control(tx: &Tx<'_>, run: &str, step: Option<&str>, reason: &str, now: i64) -> Result<(), DbError> {
    tx.wrote_outbox();
    tx.exec(
        "INSERT INTO controls (run_id, step, reason, created_ms) VALUES (?1, ?2, ?3, ?4)",
        p![run, step, reason, now],
    )?;
    Ok(())
}

/// Steps held by a limit and due by `now`, in turn order (see
/// `Engine::turn`; the older run first among equal turns: run IDs are
/// UUIDv7), after `after` (a turn, run ID and step name), at most `limit`:
/// read from an index.
pub fn waiting_steps(
    tx: &Tx<'_>,
    now: i64,
    after: Option<(i64, &str, &str)>,
    limit: usize,
) -> Result<Vec<WaitingStep>, DbError> {
    let (turn, run, name) = after.unwrap_or((i64::MIN, "", ""));
    // A literal limit (see `Db::unpublished_tasks`).
    tx.all(
        &format!(
            "{WAITING} WHERE s.status = 'waiting' AND {AFTER_DUE} ORDER BY s.turn, s.run_id, s.name LIMIT {limit}"
        ),
        p![now, turn, run, name],
        waiting_step,
    )
}

/// As [`waiting_steps`], those of one pool's queue or (`lane`) its lane's
/// only, past any number waiting at other gates: a lane's from an index of
/// them (`steps_lane`), a pool's from the turn order's, which holds the
/// pool and lane of each (others' steps skipped without reading their rows).
pub fn waiting_at(
    tx: &Tx<'_>,
    now: i64,
    (pool, lane): (&str, bool),
    after: Option<(i64, &str, &str)>,
    limit: usize,
) -> Result<Vec<WaitingStep>, DbError> {
    let (turn, run, name) = after.unwrap_or((i64::MIN, "", ""));
    // A literal lane: a partial index's condition must be the query's.
    let lane = i32::from(lane);
    tx.all(
        &format!(
            "{WAITING} WHERE s.status = 'waiting' AND s.queue = ?5 AND s.lane = {lane} AND {AFTER_DUE}
             ORDER BY s.turn, s.run_id, s.name LIMIT {limit}"
        ),
        p![now, turn, run, name, pool],
        waiting_step,
    )
}

const WAITING: &str = "SELECT s.run_id, r.workflow, s.name, r.admitted, s.waiting_on, s.attempts, s.turn, s.queue
    FROM steps s JOIN runs r ON r.id = s.run_id";

/// After `(?2, ?3, ?4)` in turn order, and due by `?1`.
const AFTER_DUE: &str =
    "(s.turn, s.run_id, s.name) > (?2, ?3, ?4) AND (s.not_before_ms IS NULL OR s.not_before_ms <= ?1)";

fn waiting_step(r: &Row<'_>) -> Result<WaitingStep, DbError> {
    Ok(WaitingStep {
        run: r.get(0)?,
        workflow: r.get(1)?,
        step: r.get(2)?,
        admitted: r.get(3)?,
        waiting_on: r.get(4)?,
        attempts: r.get(5)?,
        turn: r.get(6)?,
        queue: r.get(7)?,
    })
}

/// Whether a run's steps yet to start go through their pools' lanes.
pub fn set_lane(tx: &Tx<'_>, run: &str, lane: bool) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET lane = ?2 WHERE run_id = ?1 AND lane != ?2 AND status IN ('pending', 'waiting')",
        p![run, lane],
    )?;
    Ok(())
}

/// Name the limit that holds a waiting step.
pub fn set_waiting_on(tx: &Tx<'_>, run: &str, name: &str, reason: &str) -> Result<(), DbError> {
    tx.exec(
        "UPDATE steps SET waiting_on = ?3 WHERE run_id = ?1 AND name = ?2 AND status = 'waiting'",
        p![run, name, reason],
    )?;
    Ok(())
}

fn counts(tx: &Tx<'_>, sql: &str) -> Result<HashMap<String, i64>, DbError> {
    Ok(tx.all(sql, p![], |r| Ok((r.get(0)?, r.get(1)?)))?.into_iter().collect())
}

/// Tasks without a result, by pool.
pub fn in_flight_by_pool(tx: &Tx<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT queue, COUNT(*) FROM tasks WHERE status = 'dispatched' GROUP BY queue",
    )
}

/// Tasks without a result, by model.
pub fn in_flight_by_model(tx: &Tx<'_>) -> Result<HashMap<String, i64>, DbError> {
    // Over the in-flight tasks only (a partial index), not every agent task ever.
    let mut by_model = counts(
        tx,
        "SELECT COALESCE(model, ''), COUNT(*) FROM tasks WHERE status = 'dispatched' GROUP BY 1",
    )?;
    by_model.remove("");
    Ok(by_model)
}

/// A model's tasks due since `since` (ms) and their tokens.
pub fn model_window(tx: &Tx<'_>, model: &str, since: i64) -> Result<(i64, i64), DbError> {
    tx.one(
        "SELECT COUNT(*), CAST(COALESCE(SUM(tokens), 0) AS BIGINT) FROM tasks
         WHERE model = ?1 AND not_before_ms > ?2 AND status != 'cancelled'",
        p![model, since],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Running steps (tasks without a result), by workflow.
pub fn running_steps_by_workflow(tx: &Tx<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT r.workflow, COUNT(*) FROM tasks t JOIN runs r ON r.id = t.run_id WHERE t.status = 'dispatched'
         GROUP BY 1",
    )
}

/// Admitted running runs, by workflow.
pub fn active_runs_by_workflow(tx: &Tx<'_>) -> Result<HashMap<String, i64>, DbError> {
    counts(
        tx,
        "SELECT workflow, COUNT(*) FROM runs WHERE status = 'running' AND admitted = 1 GROUP BY 1",
    )
}

/// Until when (ms) and why a model is paused, if it is after `now`.
pub fn model_pause(tx: &Tx<'_>, model: &str, now: i64) -> Result<Option<(i64, String)>, DbError> {
    tx.opt(
        "SELECT until_ms, reason FROM model_pauses WHERE model = ?1 AND until_ms > ?2",
        p![model, now],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Pause a model until `until` (ms), keeping a later pause if there is one.
pub fn pause_model(tx: &Tx<'_>, model: &str, until: i64, reason: &str) -> Result<(), DbError> {
    tx.exec(
        "INSERT INTO model_pauses (model, until_ms, reason) VALUES (?1, ?2, ?3)
         ON CONFLICT (model) DO UPDATE SET until_ms = excluded.until_ms, reason = excluded.reason
         WHERE excluded.until_ms > model_pauses.until_ms",
        p![model, until, reason],
    )?;
    Ok(())
}

/// Running runs whose deadline passed before `now`.
pub fn overdue_runs(tx: &Tx<'_>, now: i64) -> Result<Vec<(String, String)>, DbError> {
    tx.all(
        "SELECT id, workflow FROM runs WHERE status = 'running' AND deadline_ms IS NOT NULL AND deadline_ms < ?1
         LIMIT 1000",
        p![now],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}

/// Published tasks still without a result whose deadline passed before `cutoff`.
pub fn lost_tasks(tx: &Tx<'_>, cutoff: i64) -> Result<Vec<LostTask>, DbError> {
    tx.all(
        "SELECT task_id, run_id, step, attempt FROM tasks
         WHERE status = 'dispatched' AND published = 1 AND deadline_ms < ?1 LIMIT 1000",
        p![cutoff],
        |r| {
            Ok(LostTask {
                task_id: r.get(0)?,
                run: r.get(1)?,
                step: r.get(2)?,
                attempt: r.get(3)?,
            })
        },
    )
}

/// How long fired cron ticks are remembered.
const CRON_MEMORY_MS: i64 = 7 * 24 * 3600 * 1000;

/// Claim the cron tick `tick_ms` of `workflow` for `run`: `false` when
/// another scheduler (or this one, before a restart) already fired it.
pub fn claim_tick(tx: &Tx<'_>, workflow: &str, tick_ms: i64, run: &str) -> Result<bool, DbError> {
    tx.exec(
        "DELETE FROM cron_fires WHERE workflow = ?1 AND tick_ms < ?2",
        p![workflow, tick_ms - CRON_MEMORY_MS],
    )?;
    let claimed = tx.exec(
        "INSERT INTO cron_fires (workflow, tick_ms, run_id) VALUES (?1, ?2, ?3) ON CONFLICT DO NOTHING",
        p![workflow, tick_ms, run],
    )?;
    Ok(claimed == 1)
}
