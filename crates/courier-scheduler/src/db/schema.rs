//! The schema of each store, its versions, and the migrations between them.
//!
//! Both stores record the version they hold (SQLite in `user_version`,
//! PostgreSQL in `courier_schema`) and refuse one newer than this build.

use super::sql::{DbError, Tx, p};
use super::{OpenError, SCHEMA_VERSION};

/// SQLite's schema, one migration per version: `SQLITE[i]` takes a
/// database from version `i` to `i + 1`. The version is SQLite's
/// `user_version`; a database from before versioning (tables, version 0)
/// takes migration 0 harmlessly (`IF NOT EXISTS`).
pub(super) const SQLITE: &[&str] = &[
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
    // 6: cron ticks fired, so schedulers sharing a database fire each tick
    // once (the first to insert it starts the run).
    "
CREATE TABLE cron_fires (
    workflow TEXT NOT NULL,
    tick_ms  INTEGER NOT NULL,
    run_id   TEXT NOT NULL,
    PRIMARY KEY (workflow, tick_ms)
);
",
    // 7: a run's own tokens and cost (its steps', not its children's), so
    // a runs list reads them from the run instead of summing its steps'
    // columns, which sit after the outputs and walked their overflow pages
    // (summed here once, in one pass).
    "
ALTER TABLE runs ADD COLUMN input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN output_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cost REAL NOT NULL DEFAULT 0.0;
UPDATE runs SET (input_tokens, output_tokens, cost) = (
    SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0.0)
    FROM steps WHERE steps.run_id = runs.id);
",
    // 8: a waiting step's turn, so admission reads waiting steps in turn
    // order from an index, as many as it can dispatch, instead of sorting
    // every waiting step on every pass; and each priority's virtual time
    // in each pool, the latest turn dispatched there (see `Engine::turn`). Steps already
    // waiting take their run's turns in order from 0.
    "
ALTER TABLE steps ADD COLUMN turn INTEGER;
UPDATE steps SET turn = w.turn
FROM (SELECT s.run_id, s.name, (9 - r.priority) * 1099511627776
             + ROW_NUMBER() OVER (PARTITION BY s.run_id ORDER BY s.position, COALESCE(s.item_index, -1)) - 1 AS turn
      FROM steps s JOIN runs r ON r.id = s.run_id WHERE s.status = 'waiting') w
WHERE steps.run_id = w.run_id AND steps.name = w.name;
DROP INDEX steps_waiting;
CREATE INDEX steps_waiting ON steps (run_id, turn) WHERE status = 'waiting';
CREATE INDEX steps_turns ON steps (turn, run_id, name) WHERE status = 'waiting';
CREATE TABLE turns (priority INTEGER NOT NULL, pool TEXT NOT NULL, vtime INTEGER NOT NULL, PRIMARY KEY (priority, pool));
",
    // 9: a run's last waiting turn per pool (turns of different pools are
    // on different clocks: one run's turns in a busy pool must not put its
    // steps in another pool behind that pool's newcomers).
    "
DROP INDEX steps_waiting;
CREATE INDEX steps_waiting ON steps (run_id, queue, turn) WHERE status = 'waiting';
",
    // 10: whether a step goes through its pool's lane (its run is small),
    // so admission reads the steps waiting at one gate in turn order, past
    // any number waiting at other gates before them: a lane's from an index
    // of their own (wide runs' steps, held at their pools' gates, are not in
    // it: no write for them), a pool's from the turn order's index, which
    // holds their pool and lane to skip the others' without reading their
    // rows. Steps from before count as their pool's until the scheduler's
    // start sets them from its config (`Engine::reconcile`).
    "
ALTER TABLE steps ADD COLUMN lane INTEGER NOT NULL DEFAULT 0;
DROP INDEX steps_turns;
CREATE INDEX steps_turns ON steps (turn, run_id, name, queue, lane) WHERE status = 'waiting';
CREATE INDEX steps_lane ON steps (queue, turn, run_id, name) WHERE status = 'waiting' AND lane = 1;
",
];

/// PostgreSQL's schema as of version [`PG_BASELINE`]: PostgreSQL support
/// began there, so no older PostgreSQL database exists. The same tables,
/// columns and indexes as SQLite's at that version, in PostgreSQL's types
/// (integers are `BIGINT`; flags are `BIGINT` 0/1, as SQLite stores them).
const POSTGRES_BASELINE: &str = "
CREATE TABLE courier_schema (version BIGINT NOT NULL);
CREATE TABLE runs (
    id           TEXT PRIMARY KEY,
    workflow     TEXT NOT NULL,
    status       TEXT NOT NULL,
    params       TEXT NOT NULL,
    created_ms   BIGINT NOT NULL,
    finished_ms  BIGINT,
    error        TEXT,
    priority     BIGINT NOT NULL DEFAULT 4,
    deadline_ms  BIGINT,
    cancelled_by TEXT,
    admitted     BIGINT NOT NULL DEFAULT 1,
    open_steps   BIGINT,
    spent_tokens BIGINT NOT NULL DEFAULT 0,
    spent_cost   DOUBLE PRECISION NOT NULL DEFAULT 0.0,
    parent_run   TEXT,
    parent_step  TEXT,
    depth        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX runs_by_workflow ON runs (workflow, created_ms);
CREATE INDEX runs_by_status ON runs (status, created_ms);
CREATE INDEX runs_by_deadline ON runs (deadline_ms) WHERE status = 'running' AND deadline_ms IS NOT NULL;
CREATE INDEX runs_unadmitted ON runs (workflow) WHERE status = 'running' AND admitted = 0;
CREATE INDEX runs_children ON runs (parent_run) WHERE parent_run IS NOT NULL;
CREATE TABLE run_params (
    run_id TEXT PRIMARY KEY,
    params TEXT NOT NULL
);
CREATE TABLE steps (
    run_id        TEXT NOT NULL,
    name          TEXT NOT NULL,
    position      BIGINT NOT NULL,
    queue         TEXT NOT NULL,
    status        TEXT NOT NULL,
    attempts      BIGINT NOT NULL DEFAULT 0,
    output        TEXT,
    error         TEXT,
    worker        TEXT,
    started_ms    BIGINT,
    finished_ms   BIGINT,
    model         TEXT,
    input_tokens  BIGINT,
    output_tokens BIGINT,
    transcript    TEXT,
    waiting_on    TEXT,
    cost          DOUBLE PRECISION,
    not_before_ms BIGINT,
    pending_deps  BIGINT,
    parent        TEXT,
    item_index    BIGINT,
    item          TEXT,
    items_total   BIGINT,
    items_next    BIGINT,
    items_left    BIGINT,
    items_failed  BIGINT,
    items_active  BIGINT,
    PRIMARY KEY (run_id, name)
);
CREATE INDEX steps_waiting ON steps (run_id) WHERE status = 'waiting';
CREATE INDEX steps_awaiting_approval ON steps (not_before_ms) WHERE status = 'waiting_approval';
CREATE INDEX steps_items ON steps (run_id, parent, item_index) WHERE parent IS NOT NULL;
CREATE TABLE tasks (
    task_id       TEXT PRIMARY KEY,
    run_id        TEXT NOT NULL,
    step          TEXT NOT NULL,
    attempt       BIGINT NOT NULL,
    queue         TEXT NOT NULL,
    status        TEXT NOT NULL,
    snapshot_hash TEXT NOT NULL,
    published     BIGINT NOT NULL DEFAULT 0,
    not_before_ms BIGINT NOT NULL,
    created_ms    BIGINT NOT NULL,
    finished_ms   BIGINT,
    deadline_ms   BIGINT,
    model         TEXT,
    tokens        BIGINT
);
CREATE INDEX tasks_unpublished ON tasks (not_before_ms) WHERE published = 0 AND status = 'dispatched';
CREATE INDEX tasks_in_flight ON tasks (queue) WHERE status = 'dispatched';
CREATE INDEX tasks_by_model ON tasks (model, not_before_ms) WHERE model IS NOT NULL;
CREATE TABLE model_pauses (
    model    TEXT PRIMARY KEY,
    until_ms BIGINT NOT NULL,
    reason   TEXT NOT NULL
);
CREATE TABLE controls (
    id         BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    run_id     TEXT NOT NULL,
    step       TEXT,
    reason     TEXT NOT NULL,
    created_ms BIGINT NOT NULL,
    published  BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX controls_unpublished ON controls (id) WHERE published = 0;
";

/// The version [`POSTGRES_BASELINE`] creates.
const PG_BASELINE: i64 = 5;

/// PostgreSQL's migrations after the baseline: `POSTGRES[i]` takes a
/// database from version `PG_BASELINE + i` to the next.
const POSTGRES: &[&str] = &[
    // 6: as SQLite's.
    "
CREATE TABLE cron_fires (
    workflow TEXT NOT NULL,
    tick_ms  BIGINT NOT NULL,
    run_id   TEXT NOT NULL,
    PRIMARY KEY (workflow, tick_ms)
);
",
    // 7: as SQLite's.
    "
ALTER TABLE runs ADD COLUMN input_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN output_tokens BIGINT NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN cost DOUBLE PRECISION NOT NULL DEFAULT 0.0;
UPDATE runs SET (input_tokens, output_tokens, cost) = (
    SELECT COALESCE(SUM(input_tokens), 0), COALESCE(SUM(output_tokens), 0), COALESCE(SUM(cost), 0.0)
    FROM steps WHERE steps.run_id = runs.id);
",
    // 8: as SQLite's.
    "
ALTER TABLE steps ADD COLUMN turn BIGINT;
UPDATE steps SET turn = w.turn
FROM (SELECT s.run_id, s.name, (9 - r.priority) * 1099511627776
             + ROW_NUMBER() OVER (PARTITION BY s.run_id ORDER BY s.position, COALESCE(s.item_index, -1)) - 1 AS turn
      FROM steps s JOIN runs r ON r.id = s.run_id WHERE s.status = 'waiting') w
WHERE steps.run_id = w.run_id AND steps.name = w.name;
DROP INDEX steps_waiting;
CREATE INDEX steps_waiting ON steps (run_id, turn) WHERE status = 'waiting';
CREATE INDEX steps_turns ON steps (turn, run_id, name) WHERE status = 'waiting';
CREATE TABLE turns (priority BIGINT NOT NULL, pool TEXT NOT NULL, vtime BIGINT NOT NULL, PRIMARY KEY (priority, pool));
",
    // 9: as SQLite's.
    "
DROP INDEX steps_waiting;
CREATE INDEX steps_waiting ON steps (run_id, queue, turn) WHERE status = 'waiting';
",
    // 10: as SQLite's.
    "
ALTER TABLE steps ADD COLUMN lane BIGINT NOT NULL DEFAULT 0;
DROP INDEX steps_turns;
CREATE INDEX steps_turns ON steps (turn, run_id, name, queue, lane) WHERE status = 'waiting';
CREATE INDEX steps_lane ON steps (queue, turn, run_id, name) WHERE status = 'waiting' AND lane = 1;
",
];

/// The schema version the database holds (0: empty).
pub(super) fn version(tx: &Tx<'_>) -> Result<i64, DbError> {
    if tx.is_postgres() {
        let exists: bool = tx.one("SELECT to_regclass('courier_schema') IS NOT NULL", p![], |r| r.get(0))?;
        if !exists {
            return Ok(0);
        }
        tx.one("SELECT COALESCE(MAX(version), 0) FROM courier_schema", p![], |r| {
            r.get(0)
        })
    } else {
        tx.one("PRAGMA user_version", p![], |r| r.get(0))
    }
}

/// Bring the database to [`SCHEMA_VERSION`] in one transaction (on
/// PostgreSQL, holding the write lock, so schedulers starting together
/// migrate it once).
pub(super) fn migrate(tx: &Tx<'_>, postgres: bool) -> Result<(), OpenError> {
    let found = version(tx)?;
    if found > SCHEMA_VERSION {
        return Err(OpenError::TooNew {
            found,
            known: SCHEMA_VERSION,
        });
    }
    if found == SCHEMA_VERSION {
        return Ok(());
    }
    if postgres {
        if found == 0 {
            tx.batch(POSTGRES_BASELINE)?;
        }
        let from = found.max(PG_BASELINE);
        for sql in POSTGRES.iter().skip(usize::try_from(from - PG_BASELINE).unwrap_or(0)) {
            tx.batch(sql)?;
        }
        tx.exec("DELETE FROM courier_schema", p![])?;
        tx.exec("INSERT INTO courier_schema (version) VALUES (?1)", p![SCHEMA_VERSION])?;
    } else {
        for sql in SQLITE.iter().skip(usize::try_from(found).unwrap_or(0)) {
            tx.batch(sql)?;
        }
        tx.batch(&format!("PRAGMA user_version = {SCHEMA_VERSION}"))?;
    }
    tracing::info!(from = found, to = SCHEMA_VERSION, "database schema migrated");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_stores_reach_the_same_version() {
        assert_eq!(PG_BASELINE + POSTGRES.len() as i64, SCHEMA_VERSION);
    }
}
