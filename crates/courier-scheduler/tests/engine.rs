//! The run engine over a real SQLite file, without a broker.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;

use courier_config::Config;
use courier_scheduler::db::{Db, RunStatus, StepStatus};
use courier_scheduler::engine::{Engine, EngineLimits, MAX_PRIORITY, NORMAL_PRIORITY};
use courier_wire::{StepRun, Task, TaskResult, TaskStatus};
use uuid::Uuid;

mod support;
use support::*;

/// Submit a research run and let `gather` succeed; the run's ID and its
/// published `analyze` task (retry {limit: 2}).
fn research_at_analyze(engine: &Engine) -> (String, Task) {
    let run = engine
        .submit(
            "research",
            &BTreeMap::from([("topic".to_string(), "q".to_string())]),
            NORMAL_PRIORITY,
        )
        .unwrap();
    let gather = publish_next(engine);
    engine
        .apply(&[result(&gather, TaskStatus::Succeeded, "notes")])
        .unwrap();
    let analyze = publish_next(engine);
    assert_eq!(analyze.step, "analyze");
    (run.id, analyze)
}

#[test]
fn an_unpublished_task_is_rebuilt_identically_after_a_restart() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let params = BTreeMap::from([("text".to_string(), "a b c".to_string())]);
    let before = {
        let engine = engine(&db);
        engine.submit("fanout", &params, NORMAL_PRIORITY).unwrap();
        due(&engine)
    };
    // A new engine over the same database has no kept bodies: it rebuilds.
    let after = due(&engine(&db));
    assert_eq!(before.len(), 1);
    let ((a, hash_a), (b, hash_b)) = (&before[0], &after[0]);
    assert_eq!(a.task_id, b.task_id);
    assert_eq!(a.attempt, b.attempt);
    assert_eq!(a.spec, b.spec);
    assert_eq!(a.snapshot, b.snapshot);
    assert_eq!(hash_a, hash_b);
    let StepRun::Command { argv, .. } = &b.spec.run else {
        panic!("command step")
    };
    assert_eq!(argv[3], "a b c");
}

#[test]
fn a_duplicate_result_is_applied_once() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let run = engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let split = publish_next(&engine);
    let first = engine.apply(&[result(&split, TaskStatus::Succeeded, "9")]).unwrap();
    assert_eq!((first.applied, first.duplicates, first.dispatched), (1, 0, 3));
    // The same result again, and again in one batch: nothing changes.
    let again = engine
        .apply(&[
            result(&split, TaskStatus::Succeeded, "9"),
            result(&split, TaskStatus::Failed, ""),
        ])
        .unwrap();
    assert_eq!((again.applied, again.duplicates, again.dispatched), (0, 2, 0));
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    let split_view = view.steps.iter().find(|s| s.name == "split").unwrap();
    assert_eq!(
        (
            split_view.status.as_str(),
            split_view.attempts,
            split_view.output.as_deref()
        ),
        ("succeeded", 1, Some("9"))
    );
    // The three counters were dispatched once each, with the output substituted.
    let next = due(&engine);
    assert_eq!(next.len(), 3);
    for (task, _) in next {
        let StepRun::Command { argv, .. } = &task.spec.run else {
            panic!("command step")
        };
        assert_eq!(argv[3], "9");
    }
}

#[test]
fn a_result_for_an_unknown_task_is_ignored() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let stray = TaskResult {
        task_id: Uuid::now_v7(),
        run_id: Uuid::now_v7(),
        step: "x".into(),
        attempt: 1,
        status: TaskStatus::Succeeded,
        output: String::new(),
        error: None,
        started_unix_ms: 0,
        finished_unix_ms: 0,
        worker_id: "w".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    };
    let applied = engine.apply(&[stray]).unwrap();
    assert_eq!((applied.applied, applied.duplicates), (0, 1));
}

#[test]
fn a_rejected_task_is_not_retried_even_with_a_retry_policy() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    // `analyze` has retry {limit: 2}; a rejected task is not retried.
    let (run, analyze) = research_at_analyze(&engine);
    let applied = engine.apply(&[result(&analyze, TaskStatus::Rejected, "")]).unwrap();
    assert_eq!((applied.retried, applied.finished_runs), (0, 1));
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Failed);
    let statuses: Vec<(&str, &str)> = view
        .steps
        .iter()
        .map(|s| (s.name.as_str(), s.status.as_str()))
        .collect();
    assert_eq!(
        statuses,
        [("gather", "succeeded"), ("analyze", "failed"), ("write", "skipped")]
    );
}

#[test]
fn a_failed_attempt_with_retries_left_is_scheduled_later() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let (_, analyze) = research_at_analyze(&engine);
    let applied = engine.apply(&[result(&analyze, TaskStatus::Failed, "")]).unwrap();
    assert_eq!(applied.retried, 1);
    // Backoff 2s (minus at most 20% jitter): the new attempt waits 1.6 to 2 s.
    let now = courier_now();
    let later = engine
        .with_db(|db| db.unpublished_tasks(10, &Default::default(), &|_| false))
        .unwrap()
        .0;
    assert_eq!(
        (later.len(), later[0].attempt, later[0].step.as_str()),
        (1, 2, "analyze")
    );
    let wait = later[0].not_before_ms - now;
    assert!((1_500..=2_000).contains(&wait), "retry waits {wait} ms");
}

fn courier_now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

#[test]
fn a_result_that_does_not_match_its_task_is_refused_and_changes_nothing() {
    use courier_scheduler::engine::Refused;
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let (run, analyze) = research_at_analyze(&engine);
    let wrong_attempt = TaskResult {
        attempt: 2,
        ..result(&analyze, TaskStatus::Succeeded, "forged")
    };
    let wrong_step = TaskResult {
        step: "write".into(),
        ..result(&analyze, TaskStatus::Succeeded, "forged")
    };
    let wrong_run = TaskResult {
        run_id: uuid::Uuid::now_v7(),
        ..result(&analyze, TaskStatus::Succeeded, "forged")
    };
    let applied = engine.apply(&[wrong_attempt, wrong_step, wrong_run]).unwrap();
    assert_eq!(applied.applied, 0);
    let reasons: Vec<(usize, &str)> = applied.refused.iter().map(|(i, r)| (*i, r.label())).collect();
    assert_eq!(reasons, [(0, "mismatch"), (1, "mismatch"), (2, "mismatch")]);
    assert!(matches!(&applied.refused[0].1, Refused::Mismatch { claimed, .. } if claimed.ends_with("attempt 2")));
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(
        (view.status.as_str(), view.steps[1].status.as_str()),
        ("running", "running")
    );
    // The real result is still applied afterwards.
    let applied = engine
        .apply(&[result(&analyze, TaskStatus::Succeeded, "real")])
        .unwrap();
    assert_eq!(applied.applied, 1);
}

#[test]
fn only_an_agent_step_with_the_tool_may_propose_memory() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let run = engine
        .submit(
            "research",
            &BTreeMap::from([("topic".to_string(), "q".to_string())]),
            NORMAL_PRIORITY,
        )
        .unwrap();
    let gather = publish_next(&engine);
    let proposal = courier_wire::MemoryUpdate {
        target: courier_wire::MemoryTarget::Global,
        append: "- forged\n".into(),
    };
    let from_command = TaskResult {
        memory_updates: vec![proposal],
        ..result(&gather, TaskStatus::Succeeded, "notes")
    };
    let applied = engine.apply(&[from_command]).unwrap();
    assert_eq!(applied.refused.len(), 1);
    assert_eq!(applied.refused[0].1.label(), "memory_not_allowed");
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.steps[0].status, StepStatus::Running);
}

#[test]
fn a_memory_update_that_cannot_be_written_is_recorded_on_the_step() {
    let dir = tempfile::TempDir::new().unwrap();
    let config_dir = dir.path().join("config");
    let copied = std::process::Command::new("cp")
        .arg("-r")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config"))
        .arg(&config_dir)
        .status()
        .unwrap();
    assert!(copied.success());
    let engine = Engine::new(
        Config::load(&config_dir).unwrap(),
        support::store(&dir.path().join("courier.db")),
        EngineLimits::default(),
    );
    // The workflow's memory file becomes a folder: appending to it fails
    // (even as root, unlike a permission).
    let memory = config_dir.join("agents/memory/workflows/research/MEMORY.md");
    let _ = std::fs::remove_file(&memory);
    std::fs::create_dir_all(&memory).unwrap();
    let (run, analyze) = research_at_analyze(&engine);
    let with_memory = TaskResult {
        memory_updates: vec![courier_wire::MemoryUpdate {
            target: courier_wire::MemoryTarget::Workflow,
            append: "- learned\n".into(),
        }],
        ..result(&analyze, TaskStatus::Succeeded, "analysis")
    };
    let applied = engine.apply(&[with_memory]).unwrap();
    assert_eq!((applied.applied, applied.memory_not_written), (1, 1));
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    let step = &view.steps[1];
    assert_eq!(step.status, StepStatus::Succeeded);
    let error = step.error.as_deref().unwrap();
    assert!(
        error.starts_with("the step's memory update was not written: "),
        "{error}"
    );
}

#[test]
fn memory_stays_within_its_bound_and_a_step_writes_at_most_its_count_of_proposals() {
    use courier_config::{MAX_MEMORY_BYTES, MAX_PROPOSAL_BYTES, MAX_PROPOSALS};
    let dir = tempfile::TempDir::new().unwrap();
    // The workflow's memory is a few bytes short of full.
    let nearly_full = format!("{}\n", "m".repeat(MAX_MEMORY_BYTES - 8));
    let memory_file = "agents/memory/workflows/research/MEMORY.md";
    let config = config_with_files(dir.path(), &[], &[(memory_file, &nearly_full)]);
    let config_dir = dir.path().join("config");
    let memory = config_dir.join(memory_file);
    let engine = engine_over(config, &dir.path().join("courier.db"));
    let proposal = |target, text: &str| courier_wire::MemoryUpdate {
        target,
        append: text.into(),
    };
    let (run, analyze) = research_at_analyze(&engine);
    let (second_run, second_analyze) = research_at_analyze(&engine);
    let (third_run, third_analyze) = research_at_analyze(&engine);
    let over = TaskResult {
        memory_updates: vec![proposal(courier_wire::MemoryTarget::Workflow, "- one fact too many\n")],
        ..result(&analyze, TaskStatus::Succeeded, "analysis")
    };
    let applied = engine.apply(&[over]).unwrap();
    assert_eq!((applied.applied, applied.memory_not_written), (1, 1));
    assert_eq!(std::fs::read_to_string(&memory).unwrap(), nearly_full, "left as it was");
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    let error = view.steps[1].error.as_deref().unwrap();
    assert!(
        error.starts_with(&format!(
            "the step's memory update was not written: memory of workflow \"research\" would hold {} bytes \
             with this proposal, at most {MAX_MEMORY_BYTES}: not written (trim ",
            nearly_full.len() + 20
        )),
        "{error}"
    );
    assert_eq!(view.steps[1].status, StepStatus::Succeeded);
    // A step proposing more than MAX_PROPOSALS: the first ones are written, the rest are not.
    let (run, analyze) = (second_run, second_analyze);
    let many = TaskResult {
        memory_updates: (0..MAX_PROPOSALS + 3)
            .map(|i| proposal(courier_wire::MemoryTarget::Global, &format!("- fact {i}\n")))
            .collect(),
        ..result(&analyze, TaskStatus::Succeeded, "analysis")
    };
    let applied = engine.apply(&[many]).unwrap();
    assert_eq!((applied.applied, applied.memory_not_written), (1, 3));
    let global = std::fs::read_to_string(config_dir.join("agents/memory/MEMORY.md")).unwrap();
    assert!(global.contains(&format!("- fact {}\n", MAX_PROPOSALS - 1)), "{global}");
    assert!(!global.contains(&format!("- fact {MAX_PROPOSALS}\n")), "{global}");
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(
        view.steps[1].error.as_deref(),
        Some(
            format!(
                "the step's memory update was not written: a step makes at most {MAX_PROPOSALS} memory proposals \
                 (and 2 more of its proposals were not written)"
            )
            .as_str()
        )
    );
    // Proposals over MAX_PROPOSAL_BYTES in all: those that fit are written.
    let chunk = "b".repeat(MAX_PROPOSAL_BYTES / 2 - 1) + "\n";
    let heavy = TaskResult {
        memory_updates: vec![proposal(courier_wire::MemoryTarget::Global, &chunk); 3],
        ..result(&third_analyze, TaskStatus::Succeeded, "analysis")
    };
    let applied = engine.apply(&[heavy]).unwrap();
    assert_eq!((applied.applied, applied.memory_not_written), (1, 1));
    let after = std::fs::read_to_string(config_dir.join("agents/memory/MEMORY.md")).unwrap();
    assert_eq!(after.len(), global.len() + MAX_PROPOSAL_BYTES);
    let view = engine.with_db(|db| db.run(&third_run)).unwrap().unwrap();
    assert_eq!(
        view.steps[1].error.as_deref(),
        Some(
            format!(
                "the step's memory update was not written: a step proposes at most {MAX_PROPOSAL_BYTES} bytes of \
                 memory in all"
            )
            .as_str()
        )
    );
}

#[test]
fn an_old_database_is_upgraded_and_a_newer_one_is_refused() {
    use courier_scheduler::db::{OpenError, SCHEMA_VERSION};
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("courier.db");
    // A database written before schema versions: version 0, the first tables, one run.
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE runs (id TEXT PRIMARY KEY, workflow TEXT NOT NULL, status TEXT NOT NULL,
                 params TEXT NOT NULL, created_ms INTEGER NOT NULL, finished_ms INTEGER, error TEXT);
             CREATE TABLE steps (run_id TEXT NOT NULL, name TEXT NOT NULL, position INTEGER NOT NULL,
                 queue TEXT NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, output TEXT,
                 error TEXT, worker TEXT, started_ms INTEGER, finished_ms INTEGER, model TEXT,
                 input_tokens INTEGER, output_tokens INTEGER, transcript TEXT, PRIMARY KEY (run_id, name));
             CREATE TABLE tasks (task_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step TEXT NOT NULL,
                 attempt INTEGER NOT NULL, queue TEXT NOT NULL, status TEXT NOT NULL, snapshot_hash TEXT NOT NULL,
                 published INTEGER NOT NULL DEFAULT 0, not_before_ms INTEGER NOT NULL, created_ms INTEGER NOT NULL,
                 finished_ms INTEGER);
             INSERT INTO runs VALUES ('old-run', 'fanout', 'succeeded', '{}', 1, 2, NULL);
             INSERT INTO steps (run_id, name, position, queue, status, output, input_tokens, output_tokens)
                 VALUES ('old-run', 'a', 0, 'default', 'succeeded', 'x', 30, 4),
                        ('old-run', 'b', 1, 'default', 'succeeded', 'y', 12, NULL);
             INSERT INTO runs VALUES ('held-run', 'fanout', 'running', '{}', 3, NULL, NULL);
             INSERT INTO steps (run_id, name, position, queue, status)
                 VALUES ('held-run', 'late', 7, 'default', 'waiting'),
                        ('held-run', 'early', 2, 'default', 'waiting'),
                        ('held-run', 'done', 0, 'default', 'succeeded');",
        )
        .unwrap();
    }
    let mut db = Db::open(&path).unwrap();
    assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
    // Steps waiting then take their run's turns in order, from 0 at its
    // priority (4: turns from 5 * 2^40).
    let turns: Vec<(String, Option<i64>)> = rusqlite::Connection::open(&path)
        .unwrap()
        .prepare("SELECT name, turn FROM steps WHERE run_id = 'held-run' ORDER BY position")
        .unwrap()
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let base = 5 << 40;
    assert_eq!(
        turns,
        [
            ("done".to_string(), None),
            ("early".to_string(), Some(base)),
            ("late".to_string(), Some(base + 1))
        ]
    );
    let old = db.run("old-run").unwrap().unwrap();
    assert_eq!(
        (old.status, old.priority, old.cost),
        (RunStatus::Succeeded, NORMAL_PRIORITY, 0.0)
    );
    // Its own totals, summed from its steps once, then kept on the run.
    let listed = db.runs(None, None, None, 10).unwrap();
    let listed: Vec<_> = listed.into_iter().filter(|r| r.id == "old-run").collect();
    assert_eq!((listed[0].input_tokens, listed[0].output_tokens), (42, 4));
    assert_eq!((old.input_tokens, old.output_tokens), (42, 4));
    assert_eq!(
        old.params.value(),
        serde_json::json!({}),
        "params moved to their own table"
    );
    drop(db);
    // Written by a newer Courier: refused, with what to do.
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    let error = Db::open(&path).unwrap_err();
    assert!(matches!(error, OpenError::TooNew { .. }));
    assert_eq!(
        error.to_string(),
        format!(
            "the database has schema version {}, newer than this build knows ({SCHEMA_VERSION}): it was written by a newer Courier; run that version, or point this one at another database",
            SCHEMA_VERSION + 1
        )
    );
}

#[test]
fn a_postgres_database_is_created_at_the_current_version_and_a_newer_one_is_refused() {
    use courier_scheduler::db::{OpenError, SCHEMA_VERSION};
    let Some(server) = postgres_server() else {
        eprintln!("COURIER_TEST_DATABASE_URL is unset: PostgreSQL's schema is tested by .ci/run");
        return;
    };
    let dir = tempfile::TempDir::new().unwrap();
    let url = database_for(&server, &dir.path().join("schema.db"));
    let mut db = Db::connect(&url).unwrap();
    assert_eq!(db.schema_version().unwrap(), SCHEMA_VERSION);
    drop(db);
    // Opened again (a second scheduler): nothing to do.
    assert_eq!(Db::connect(&url).unwrap().schema_version().unwrap(), SCHEMA_VERSION);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .execute("UPDATE courier_schema SET version = $1", &[&(SCHEMA_VERSION + 1)])
        .unwrap();
    let error = Db::connect(&url).unwrap_err();
    assert!(matches!(error, OpenError::TooNew { .. }), "{error}");
    assert!(error.to_string().starts_with(&format!(
        "the database has schema version {}, newer than this build knows ({SCHEMA_VERSION})",
        SCHEMA_VERSION + 1
    )));
    // Not a PostgreSQL URL: refused, without echoing it (it may hold a password).
    let error = Db::connect("host=db password=secret").unwrap_err();
    assert!(matches!(error, OpenError::BadUrl));
    assert!(!error.to_string().contains("secret"), "{error}");
    // Passwords never reach messages, in either place a URL may carry one.
    assert_eq!(
        courier_scheduler::db::redact("postgres://courier:s3cret@db:5432/courier?password=s3cret&sslmode=disable"),
        "postgres://courier:***@db:5432/courier?password=***&sslmode=disable"
    );
}

#[test]
fn a_result_after_a_cancel_is_recorded_and_changes_nothing() {
    use courier_scheduler::engine::CancelError;
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let (run, analyze) = research_at_analyze(&engine);
    let done = engine.cancel(&run, None, "api:ana", "stop").unwrap();
    assert_eq!((done.applied.cancelled_runs, done.applied.finished_runs), (1, 1));
    let view = done.run;
    assert_eq!(view.status, RunStatus::Cancelled);
    assert_eq!(view.cancelled_by.as_deref(), Some("api:ana"));
    let statuses: Vec<StepStatus> = view.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Succeeded, StepStatus::Cancelled, StepStatus::Cancelled]
    );
    // The workers are told, once.
    let controls = engine.with_db(|db| db.unpublished_controls(10)).unwrap();
    assert_eq!(controls.len(), 1);
    assert_eq!(
        (controls[0].step.as_deref(), controls[0].reason.as_str()),
        (None, "stop")
    );
    // The step's late success is recorded, and starts nothing.
    let applied = engine
        .apply(&[result(&analyze, TaskStatus::Succeeded, "late")])
        .unwrap();
    assert_eq!((applied.applied, applied.dispatched, applied.finished_runs), (1, 0, 0));
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(
        (view.status, view.steps[1].status),
        (RunStatus::Cancelled, StepStatus::Cancelled)
    );
    assert!(
        engine
            .with_db(|db| db.unpublished_tasks(10, &Default::default(), &|_| false))
            .unwrap()
            .0
            .is_empty()
    );
    // Cancelling a run's last open step ends the run cancelled, counted
    // as such (the metrics read these counts).
    let (second, _) = research_at_analyze(&engine);
    let done = engine
        .cancel(&second, Some("analyze"), "api:ana", "not needed")
        .unwrap();
    assert_eq!(done.run.status, RunStatus::Cancelled);
    assert_eq!((done.applied.cancelled_runs, done.applied.finished_runs), (1, 1));
    // Again: the same answer; an unknown run or step, or a finished one, is refused.
    let again = engine.cancel(&run, None, "api:bob", "again").unwrap();
    assert_eq!(
        (again.run.cancelled_by.as_deref(), again.applied.cancelled_runs),
        (Some("api:ana"), 0)
    );
    assert!(matches!(
        engine.cancel("nope", None, "x", "y"),
        Err(CancelError::NotFound(_))
    ));
    let other = engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert!(matches!(
        engine.cancel(&other.id, Some("nope"), "x", "y"),
        Err(CancelError::NoStep { .. })
    ));
    let split = publish_next(&engine);
    engine.apply(&[result(&split, TaskStatus::Succeeded, "1")]).unwrap();
    let refused = engine.cancel(&other.id, Some("split"), "x", "y").unwrap_err();
    assert_eq!(
        refused.to_string(),
        format!(
            "step \"split\" of run {} already succeeded: there is nothing to cancel",
            other.id
        )
    );
}

#[test]
fn an_unpublished_task_of_a_cancelled_run_is_never_published() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let run = engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(due(&engine).len(), 1);
    engine.cancel(&run.id, None, "x", "stop").unwrap();
    assert!(due(&engine).is_empty());
}

#[test]
fn a_task_lost_past_its_deadline_fails_its_step_and_a_run_past_its_timeout_is_cancelled() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_with(
        dir.path(),
        &[
            ("tiny", "steps:\n  - name: quick\n    timeout: 1s\n    echo: hi\n"),
            (
                "bounded",
                "timeout: 1s\nsteps:\n  - name: long\n    timeout: 1h\n    echo: hi\n",
            ),
        ],
    );
    let limits = EngineLimits {
        max_queue_wait: std::time::Duration::ZERO,
        lost_task_grace: std::time::Duration::ZERO,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let tiny = engine.submit("tiny", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let bounded = engine.submit("bounded", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    for _ in 0..2 {
        publish_next(&engine);
    }
    // Each task carries its deadline: the step's timeout, or the run's, whichever comes first.
    assert_eq!(engine.tick(true).unwrap().applied, 0, "nothing is late yet");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let ticked = engine.tick(true).unwrap();
    assert_eq!(ticked.cancelled_runs, 1);
    let tiny = engine.with_db(|db| db.run(&tiny.id)).unwrap().unwrap();
    assert_eq!(
        (tiny.status, tiny.steps[0].status),
        (RunStatus::Failed, StepStatus::Failed)
    );
    assert!(
        tiny.steps[0]
            .error
            .as_deref()
            .unwrap()
            .starts_with("no result by the task's deadline"),
        "{tiny:?}"
    );
    let bounded = engine.with_db(|db| db.run(&bounded.id)).unwrap().unwrap();
    assert_eq!(bounded.status, RunStatus::Cancelled);
    assert_eq!(bounded.cancelled_by.as_deref(), Some("timeout"));
    assert_eq!(bounded.error.as_deref(), Some("the run's timeout (1s) passed"));
}

#[test]
fn limits_hold_steps_as_waiting_and_admit_them_by_priority() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_with(
        dir.path(),
        &[(
            "capped",
            "max_active_runs: 1\nmax_active_steps: 2\nsteps:\n  - name: a\n    echo: a\n  - name: b\n    echo: b\n  - name: c\n    echo: c\n",
        )],
    );
    let engine = Engine::new(
        config,
        support::store(&dir.path().join("courier.db")),
        EngineLimits::default(),
    );
    let first = engine.submit("capped", &BTreeMap::new(), 0).unwrap();
    let waiting_on = |run: &courier_scheduler::db::RunView| -> Vec<Option<String>> {
        run.steps.iter().map(|s| s.waiting_on.clone()).collect()
    };
    assert_eq!(
        waiting_on(&first),
        [None, None, Some("workflow capped max_active_steps (2)".to_string())]
    );
    let low = engine.submit("capped", &BTreeMap::new(), 0).unwrap();
    let high = engine.submit("capped", &BTreeMap::new(), 9).unwrap();
    assert!(low.steps.iter().all(|s| s.status == StepStatus::Waiting));
    assert_eq!(
        high.steps[0].waiting_on.as_deref(),
        Some("workflow capped max_active_runs (1)")
    );
    // Finish the first run: the high-priority run is admitted before the older low one.
    while let Some((task, _)) = due(&engine).into_iter().next() {
        engine
            .with_db(|db| db.mark_published(&[task.task_id.to_string()]))
            .unwrap();
        if task.run_id.to_string() != first.id {
            break;
        }
        engine.apply(&[result(&task, TaskStatus::Succeeded, "x")]).unwrap();
    }
    let high = engine.with_db(|db| db.run(&high.id)).unwrap().unwrap();
    let low = engine.with_db(|db| db.run(&low.id)).unwrap().unwrap();
    assert_eq!(
        engine.with_db(|db| db.run(&first.id)).unwrap().unwrap().status,
        RunStatus::Succeeded
    );
    assert_eq!(high.steps.iter().filter(|s| s.status == StepStatus::Running).count(), 2);
    assert!(low.steps.iter().all(|s| s.status == StepStatus::Waiting));
}

/// The example config with a workflow `wide` of `width` independent echo
/// steps and a workflow `small` of one.
fn wide_and_small(dir: &Path, width: usize) -> Config {
    let wide: String = std::iter::once("steps:\n".to_string())
        .chain((0..width).map(|i| format!("  - name: s{i}\n    echo: s{i}\n")))
        .collect();
    config_with(
        dir,
        &[("wide", &wide), ("small", "steps:\n  - name: only\n    echo: only\n")],
    )
}

#[test]
fn held_steps_take_turns_between_runs_so_a_small_run_beside_wide_ones_waits_a_turn_per_run() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = wide_and_small(dir.path(), 12);
    let limits = EngineLimits {
        pool_in_flight: BTreeMap::from([("default".to_string(), 3)]),
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let first = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let second = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let small = engine.submit("small", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(
        small.steps[0].waiting_on.as_deref(),
        Some("pool default max_in_flight (3)")
    );
    let name = |task: &Task| {
        let run = task.run_id.to_string();
        if run == first {
            "first"
        } else if run == second {
            "second"
        } else {
            assert_eq!(run, small.id);
            "small"
        }
    };
    // Finish one task at a time: the freed slots go round the runs waiting,
    // the older first among equal turns. The first run took turns 0 to 2;
    // the second and the small run start at 2, the first's next is 3. So the
    // small run's step goes at the second freed slot, not after the 21 wide
    // steps waiting before it; then the wide runs alternate.
    let mut order = Vec::new();
    let mut in_flight: Vec<Task> = Vec::new();
    loop {
        let fresh: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
        let ids: Vec<String> = fresh.iter().map(|t| t.task_id.to_string()).collect();
        engine.with_db(|db| db.mark_published(&ids)).unwrap();
        order.extend(fresh.iter().map(name));
        in_flight.extend(fresh);
        if in_flight.is_empty() {
            break;
        }
        let done = in_flight.remove(0);
        engine.apply(&[result(&done, TaskStatus::Succeeded, "x")]).unwrap();
    }
    assert_eq!(
        order[..10],
        [
            "first", "first", "first", "second", "small", "first", "second", "first", "second", "first"
        ],
        "{order:?}"
    );
    assert_eq!(order.len(), 25);
    for run in [&first, &second, &small.id] {
        let view = engine.with_db(|db| db.run(run)).unwrap().unwrap();
        assert_eq!(view.status, RunStatus::Succeeded);
    }
}

#[test]
fn a_pools_gate_holds_steps_past_its_queue_and_lets_them_go_in_turn_as_the_broker_counts_fewer() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = wide_and_small(dir.path(), 10);
    let limits = EngineLimits {
        default_queued: 2,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    let wide = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let reasons: Vec<Option<&str>> = wide.steps.iter().map(|s| s.waiting_on.as_deref()).collect();
    let gate = Some("pool default max_queued (2)");
    assert_eq!(reasons, [None, None, gate, gate, gate, gate, gate, gate, gate, gate]);
    let second = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(
        second.steps[0].waiting_on.as_deref(),
        gate,
        "behind the steps held there"
    );
    // A small run (at most 8 steps, no foreach) goes at once, to the pool's
    // lane: its own queue, past the wide runs' steps held at the pool's.
    let small = engine.submit("small", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(small.steps[0].waiting_on, None);
    let mut routes = support::routes(&engine);
    routes.sort();
    assert_eq!(
        routes,
        [
            (wide.id.clone(), "s0".to_string(), "default".to_string()),
            (wide.id.clone(), "s1".to_string(), "default".to_string()),
            (small.id.clone(), "only".to_string(), "default.lane".to_string()),
        ]
    );
    // The outbox publishes the three tasks; the broker confirms them.
    let first: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    let ids: Vec<String> = first.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    for (_, _, route) in &routes {
        gates.sent(route, true);
    }
    // Still in the queue: the pool's gate stays shut, and admission lets
    // none go (the lane's, with one task of its two, is not read).
    let [(pool, before)] = gates.to_read().try_into().unwrap();
    assert_eq!(pool, "default");
    assert!(!gates.observed(&pool, 2, before));
    assert_eq!(engine.admit().unwrap(), 0);
    // The workers took them: the gate opens, and the next two in turn go,
    // the first wide run's next step and the second's, not the first's two.
    let [(pool, before)] = gates.to_read().try_into().unwrap();
    assert!(gates.observed(&pool, 0, before));
    assert_eq!(engine.admit().unwrap(), 2);
    let next: Vec<(String, String)> = due(&engine)
        .into_iter()
        .map(|(t, _)| (t.run_id.to_string(), t.step))
        .collect();
    assert_eq!(
        next,
        [
            (wide.id.clone(), "s2".to_string()),
            (second.id.clone(), "s0".to_string())
        ]
    );
}

#[test]
fn a_pools_queue_is_kept_to_its_lanes_limit_while_small_runs_are_about() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = wide_and_small(dir.path(), 100);
    let limits = EngineLimits {
        default_queued: 80,
        // Busy for the whole test, however slow the machine.
        lane_quiet: std::time::Duration::from_secs(3600),
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    // A quiet lane: the pool's queue takes 80 of the wide run's 100 steps.
    let wide = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let gate = "pool default max_queued (80; 64 while its lane is busy)";
    let held = |run: &courier_scheduler::db::RunView| {
        run.steps
            .iter()
            .filter(|s| s.waiting_on.as_deref() == Some(gate))
            .count()
    };
    assert_eq!(held(&wide), 20);
    // A small run's step goes to the lane at once; the lane is busy now.
    let small = engine.submit("small", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(small.steps[0].waiting_on, None);
    let routes = publish(&engine);
    assert_eq!(routes.len(), 81);
    // The workers took 10 of the pool's 80: 70 is over the lane's limit, 64,
    // so none of the 20 goes.
    let reads = gates.to_read();
    let (_, before) = reads.iter().find(|(key, _)| key == "default").unwrap();
    assert!(!gates.observed("default", 70, *before));
    assert_eq!(engine.admit().unwrap(), 0);
    // 20 queued: half of 64 free, a pass fills it, all 20 go.
    let reads = gates.to_read();
    let (_, before) = reads.iter().find(|(key, _)| key == "default").unwrap();
    assert!(gates.observed("default", 20, *before));
    assert_eq!(engine.admit().unwrap(), 20);
    let wide = engine.with_db(|db| db.run(&wide.id)).unwrap().unwrap();
    assert_eq!(held(&wide), 0);
}

#[test]
fn a_pools_lane_has_a_gate_of_its_own_and_small_runs_wait_there_in_turn() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = wide_and_small(dir.path(), 10);
    let limits = EngineLimits {
        default_queued: 1,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    let (runs, reasons): (Vec<String>, Vec<Option<String>>) = (0..3)
        .map(|_| engine.submit("small", &BTreeMap::new(), NORMAL_PRIORITY).unwrap())
        .map(|mut run| (run.id, run.steps.remove(0).waiting_on))
        .unzip();
    let lane = Some("pool default.lane max_queued (1)".to_string());
    assert_eq!(reasons, [None, lane.clone(), lane]);
    // The wide run's steps go to the pool's own queue: its gate is open.
    let wide = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(wide.steps[0].waiting_on, None);
    let published: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    let ids: Vec<String> = published.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    gates.sent("default.lane", true);
    gates.sent("default", true);
    // The lane's queue empties: its next small run goes, in turn.
    let reads = gates.to_read();
    let (_, before) = reads.iter().find(|(key, _)| key == "default.lane").unwrap();
    assert!(gates.observed("default.lane", 0, *before));
    assert_eq!(engine.admit().unwrap(), 1);
    let routes = support::routes(&engine);
    assert_eq!(
        routes,
        [(runs[1].clone(), "only".to_string(), "default.lane".to_string())]
    );
}

/// Publish every due task as the outbox would, the broker confirming each
/// into its queue: their routes (run, step, routing key).
fn publish(engine: &Engine) -> Vec<(String, String, String)> {
    let routes = support::routes(engine);
    let ids: Vec<String> = due(engine).into_iter().map(|(t, _)| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    for (_, _, route) in &routes {
        engine.gates().sent(route, true);
    }
    routes
}

#[test]
fn small_runs_at_their_lanes_gate_go_as_it_empties_past_any_number_of_higher_priority_steps_at_the_pools() {
    let dir = tempfile::TempDir::new().unwrap();
    // More steps held at the pool's gate than an admission pass reads in
    // turn order (10,000), all of them ahead of the small runs' turns.
    let config = wide_and_small(dir.path(), 10_100);
    let limits = EngineLimits {
        default_queued: 4,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    let small: Vec<String> = (0..6)
        .map(|_| engine.submit("small", &BTreeMap::new(), 0).unwrap().id)
        .collect();
    engine.submit("wide", &BTreeMap::new(), MAX_PRIORITY).unwrap();
    let routes = publish(&engine);
    let (lane, pool): (Vec<_>, Vec<_>) = routes.iter().partition(|(_, _, route)| route == "default.lane");
    assert_eq!((lane.len(), pool.len()), (4, 4));
    // The workers took the lane's four; the pool's queue stays full.
    for (key, before) in gates.to_read() {
        let ready = if key == "default" { 4 } else { 0 };
        assert_eq!(gates.observed(&key, ready, before), key == "default.lane", "{key}");
    }
    assert_eq!(engine.admit().unwrap(), 2, "the two small runs held at the lane's gate");
    let mut next: Vec<String> = support::routes(&engine)
        .into_iter()
        .map(|(run, _, route)| {
            assert_eq!(route, "default.lane");
            run
        })
        .collect();
    next.sort();
    assert_eq!(next, small[4..]);
    // None waits at the lane's gate now: a new small run goes at once.
    let another = engine.submit("small", &BTreeMap::new(), 0).unwrap();
    assert_eq!(another.steps[0].waiting_on, None);
}

#[test]
fn small_runs_steps_a_database_from_before_lanes_counts_as_their_pools_take_their_lane_once_reconciled() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let limits = || EngineLimits {
        default_queued: 4,
        ..EngineLimits::default()
    };
    let engine = Engine::new(wide_and_small(dir.path(), 10_100), support::store(&db), limits());
    let small: Vec<String> = (0..6)
        .map(|_| engine.submit("small", &BTreeMap::new(), 0).unwrap().id)
        .collect();
    engine.submit("wide", &BTreeMap::new(), MAX_PRIORITY).unwrap();
    publish(&engine);
    drop(engine);
    // As migration 10 leaves a database: every step counted as its pool's.
    support::execute(&db, "UPDATE steps SET lane = 0");
    let engine = Engine::new(
        Config::load(&dir.path().join("config")).unwrap(),
        support::store(&db),
        limits(),
    );
    engine.reconcile().unwrap();
    // The clock's first pass (a full one) reads the lane's steps, past the
    // 10,096 held at the pool's gate.
    engine.tick(false).unwrap();
    let mut lane: Vec<String> = support::routes(&engine)
        .into_iter()
        .filter(|(_, _, route)| route == "default.lane")
        .map(|(run, _, _)| run)
        .collect();
    lane.sort();
    assert_eq!(lane, small[4..]);
}

#[test]
fn a_gates_steps_are_read_chunk_after_chunk_past_those_other_limits_hold_while_it_has_room() {
    let dir = tempfile::TempDir::new().unwrap();
    let wide: String = std::iter::once("steps:\n".to_string())
        .chain((0..10_100).map(|i| format!("  - name: s{i}\n    echo: s{i}\n")))
        .collect();
    let config = config_with(
        dir.path(),
        &[
            ("wide", &wide),
            ("small", "steps:\n  - name: only\n    echo: only\n"),
            ("capped", "max_active_runs: 1\nsteps:\n  - name: only\n    echo: only\n"),
        ],
    );
    let limits = EngineLimits {
        default_queued: 4,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    // The lane's queue full; five capped runs: the first held at the lane's
    // gate, the four others by their workflow's max_active_runs; a wide run
    // of higher priority held at the pool's gate; then a small run, held at
    // the lane's gate behind the capped ones.
    for _ in 0..4 {
        engine.submit("small", &BTreeMap::new(), 0).unwrap();
    }
    let capped: Vec<String> = (0..5)
        .map(|_| engine.submit("capped", &BTreeMap::new(), 0).unwrap().id)
        .collect();
    engine.submit("wide", &BTreeMap::new(), MAX_PRIORITY).unwrap();
    let last = engine.submit("small", &BTreeMap::new(), 0).unwrap();
    assert_eq!(
        last.steps[0].waiting_on.as_deref(),
        Some("pool default.lane max_queued (4)")
    );
    publish(&engine);
    for (key, before) in gates.to_read() {
        let ready = if key == "default" { 4 } else { 0 };
        gates.observed(&key, ready, before);
    }
    // The lane's room is 4: its first four steps (the capped runs') leave
    // three of it, and the next chunk reaches the small run.
    assert_eq!(engine.admit().unwrap(), 2);
    let mut next: Vec<String> = support::routes(&engine).into_iter().map(|(run, _, _)| run).collect();
    next.sort();
    let mut expected = vec![capped[0].clone(), last.id.clone()];
    expected.sort();
    assert_eq!(next, expected);
}

#[test]
fn a_runs_turns_in_one_pool_do_not_put_its_steps_in_another_pool_behind_that_pools_backlog() {
    let dir = tempfile::TempDir::new().unwrap();
    let wide: String = std::iter::once("steps:\n".to_string())
        .chain((0..20).map(|i| format!("  - name: s{i}\n    echo: s{i}\n")))
        .collect();
    // Ten steps of pool `other`, then one of `default` after the first.
    let mixed: String = std::iter::once("steps:\n".to_string())
        .chain((0..10).map(|i| format!("  - name: o{i}\n    queue: other\n    echo: o{i}\n")))
        .chain(std::iter::once(
            "  - name: a\n    depends: [o0]\n    echo: a\n".to_string(),
        ))
        .collect();
    let config = config_with(dir.path(), &[("wide", &wide), ("mixed", &mixed)]);
    let limits = EngineLimits {
        default_queued: 1,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let mixed = engine.submit("mixed", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    // The broker takes each task of `default` as it comes, one at a time.
    let mut order = Vec::new();
    for _ in 0..20 {
        for (task, _) in due(&engine) {
            engine
                .with_db(|db| db.mark_published(&[task.task_id.to_string()]))
                .unwrap();
            let pool = if task.step.starts_with('o') { "other" } else { "default" };
            gates.sent(pool, true);
            if task.step == "o0" {
                // Its other nine wait in `other` by now; `a` starts waiting.
                engine.apply(&[result(&task, TaskStatus::Succeeded, "o0")]).unwrap();
            }
            if pool == "default" {
                order.push((task.run_id.to_string(), task.step));
            }
        }
        if order.iter().any(|(run, _)| *run == mixed) {
            break;
        }
        let before = gates.to_read().into_iter().find(|(p, _)| p == "default").unwrap().1;
        assert!(gates.observed("default", 0, before));
        engine.admit().unwrap();
    }
    // The wide run's first two steps, then the mixed run's: its ten waiting
    // in `other` do not count in `default`.
    let at = order.iter().position(|(run, _)| *run == mixed);
    assert_eq!(at, Some(2), "{order:?}");
}

#[test]
fn a_retry_that_waited_at_a_shut_gate_is_taken_by_the_first_pass_once_due() {
    let dir = tempfile::TempDir::new().unwrap();
    let flaky = "steps:\n  - name: a\n    retry: {limit: 1, backoff: 50ms, max_backoff: 50ms}\n    echo: a\n";
    let config = config_with(dir.path(), &[("flaky", flaky)]);
    let limits = EngineLimits {
        default_queued: 1,
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("courier.db")), limits);
    let gates = engine.gates();
    let run = engine.submit("flaky", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let [(task, _)] = due(&engine).try_into().unwrap();
    engine
        .with_db(|db| db.mark_published(&[task.task_id.to_string()]))
        .unwrap();
    gates.sent("default.lane", true);
    // Its attempt fails while the gate still counts it in the queue: the
    // retry waits out its backoff at the gate.
    let applied = engine.apply(&[result(&task, TaskStatus::Failed, "")]).unwrap();
    assert_eq!(applied.retried, 1);
    // The count read: the queue is empty, and no step is due at the gate yet.
    let [(pool, before)] = gates.to_read().try_into().unwrap();
    assert!(!gates.observed(&pool, 0, before));
    std::thread::sleep(std::time::Duration::from_millis(60));
    // Due: the first pass (a result's transaction, or the gate loop's) takes
    // it, not only the clock's full pass every 5 s.
    assert_eq!(engine.admit().unwrap(), 1);
    let [(retry, _)] = due(&engine).try_into().unwrap();
    assert_eq!((retry.run_id.to_string(), retry.attempt), (run, 2));
}

#[test]
fn a_token_window_holds_steps_and_real_usage_corrects_it() {
    let dir = tempfile::TempDir::new().unwrap();
    let step = |name: &str| {
        format!(
            "  - name: {name}\n    agent: {{model: metered, prompt: \"{name}\", tools: [output], max_iterations: 1}}\n"
        )
    };
    let config = config_with_files(
        dir.path(),
        &[("metered", &format!("steps:\n{}{}{}", step("a"), step("b"), step("c")))],
        &[(
            "agents/models/metered.yaml",
            "provider: scripted\nmodel: m\nmax_tokens: 1000\nlimits: {tokens_per_minute: 1500}\nscript:\n  - text: hi\n",
        )],
    );
    let engine = Engine::new(
        config,
        support::store(&dir.path().join("courier.db")),
        EngineLimits::default(),
    );
    // Each step is estimated at 1000 tokens (max_tokens) plus its prompt: one fits the minute.
    let run = engine.submit("metered", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let waiting: Vec<Option<&str>> = run.steps.iter().map(|s| s.waiting_on.as_deref()).collect();
    assert_eq!(
        waiting,
        [
            None,
            Some("model metered tokens_per_minute (1500)"),
            Some("model metered tokens_per_minute (1500)")
        ]
    );
    // The first used only 100 tokens: the window is corrected, and one more fits.
    let first = publish_next(&engine);
    let used = TaskResult {
        model: Some("scripted/m".into()),
        usage: Some(courier_wire::TokenUsage {
            input_tokens: 60,
            output_tokens: 40,
        }),
        ..result(&first, TaskStatus::Succeeded, "ok")
    };
    let applied = engine.apply(&[used]).unwrap();
    assert_eq!(applied.dispatched, 1);
    let run = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    let statuses: Vec<StepStatus> = run.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Succeeded, StepStatus::Running, StepStatus::Waiting]
    );
    assert_eq!((run.input_tokens, run.output_tokens), (60, 40));
}

/// A workflow of one agent step on model `limited` (concurrency 1), retried.
const LIMITED_MODEL: &str = "provider: scripted\nmodel: m\nlimits: {concurrency: 1}\nscript:\n  - text: hi\n";

fn limited_step(name: &str) -> String {
    format!(
        "steps:\n  - name: {name}\n    retry: {{limit: 3, backoff: 200ms, max_backoff: 200ms}}\n    agent: {{model: limited, prompt: p, tools: [output], max_iterations: 1}}\n"
    )
}

#[test]
fn a_held_step_retries_through_admission_and_a_hostile_429_or_usage_is_capped() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_with_files(
        dir.path(),
        &[("one", &limited_step("a")), ("two", &limited_step("b"))],
        &[("agents/models/limited.yaml", LIMITED_MODEL)],
    );
    let engine = engine_over(config, &dir.path().join("courier.db"));
    let one = engine.submit("one", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let two = engine.submit("two", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(
        two.steps[0].waiting_on.as_deref(),
        Some("model limited concurrency (1)")
    );
    // The attempt fails with a 429 asking for a century, and reports absurd usage.
    let first = publish_next(&engine);
    let limited = TaskResult {
        rate_limited_ms: Some(u64::MAX),
        model: Some("scripted/m".into()),
        usage: Some(courier_wire::TokenUsage {
            input_tokens: u64::MAX,
            output_tokens: u64::MAX,
        }),
        ..result(&first, TaskStatus::Failed, "")
    };
    let applied = engine.apply(&[limited]).unwrap();
    assert_eq!(applied.retried, 1);
    // The retry waits at admission, not in a delay queue; the model pause is
    // cut to 15 minutes, which also holds the other run's step.
    let view = engine.with_db(|db| db.run(&one.id)).unwrap().unwrap();
    assert_eq!(view.steps[0].status, StepStatus::Waiting);
    assert_eq!(view.steps[0].waiting_on.as_deref(), Some("retry after 900s"));
    assert_eq!(view.steps[0].error.as_deref(), Some("boom"));
    let (cap, max) = (courier_scheduler::engine::MAX_REPORTED_TOKENS, i64::MAX);
    assert_eq!(view.input_tokens, i64::try_from(cap).unwrap_or(max));
    assert!(
        engine
            .with_db(|db| db.unpublished_tasks(10, &Default::default(), &|_| false))
            .unwrap()
            .0
            .is_empty()
    );
    engine.admit().unwrap();
    let other = engine.with_db(|db| db.run(&two.id)).unwrap().unwrap();
    let reason = other.steps[0].waiting_on.as_deref().unwrap();
    assert!(reason.starts_with("model limited paused until "), "{reason}");
    let until = reason.split_whitespace().nth(4).unwrap();
    let until = chrono::DateTime::parse_from_rfc3339(until).unwrap().timestamp_millis();
    let left = until - courier_now();
    assert!(left > 890_000 && left <= 900_000, "paused for {left} ms");
}

#[test]
fn a_waiting_step_whose_workflow_left_the_config_fails_its_run() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let with = config_with_files(
        dir.path(),
        &[("one", &limited_step("a")), ("two", &limited_step("b"))],
        &[("agents/models/limited.yaml", LIMITED_MODEL)],
    );
    let engine = engine_over(with, &db);
    engine.submit("one", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let two = engine.submit("two", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    drop(engine);
    // Restarted without workflow "two": its waiting step cannot be admitted.
    std::fs::remove_file(dir.path().join("config/workflows/two.yaml")).unwrap();
    let engine = engine_over(Config::load(&dir.path().join("config")).unwrap(), &db);
    engine.admit().unwrap();
    let two = engine.with_db(|db| db.run(&two.id)).unwrap().unwrap();
    assert_eq!(
        (two.status, two.steps[0].status),
        (RunStatus::Failed, StepStatus::Skipped)
    );
    assert_eq!(
        two.error.as_deref(),
        Some("step \"b\" of workflow \"two\" is no longer configured")
    );
}

#[test]
fn a_run_the_changed_config_can_no_longer_move_on_fails_at_start_saying_why() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let two = "steps:\n  - name: a\n    echo: x\n  - name: b\n    depends: [a]\n    echo: y\n";
    let names = ["renamed", "grown", "gone", "kept"];
    let engine = engine_over(config_with(dir.path(), &names.map(|n| (n, two))), &db);
    let runs = names.map(|w| engine.submit(w, &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id);
    drop(engine);
    // Restarted with `b` renamed, `b` waiting on a step added since, the
    // workflow removed, and one left as it was; `a` is still in flight.
    let workflows = dir.path().join("config/workflows");
    let write = |name: &str, yaml: &str| std::fs::write(workflows.join(format!("{name}.yaml")), yaml).unwrap();
    write(
        "renamed",
        "steps:\n  - name: a\n    echo: x\n  - name: b2\n    depends: [a]\n    echo: y\n",
    );
    write(
        "grown",
        "steps:\n  - name: a\n    echo: x\n  - name: z\n    echo: z\n  - name: b\n    depends: [a, z]\n    echo: y\n",
    );
    std::fs::remove_file(workflows.join("gone.yaml")).unwrap();
    let engine = engine_over(Config::load(&dir.path().join("config")).unwrap(), &db);
    let applied = engine.reconcile().unwrap();
    let view = |id: &str| engine.with_db(|db| db.run(id)).unwrap().unwrap();
    if postgres_server().is_some() {
        // Other schedulers sharing the database may run a newer config (a
        // rolling deploy): the runs are left as they are, and logged.
        assert_eq!(applied.finished_runs, 0);
        for id in &runs {
            assert_eq!(view(id).status, RunStatus::Running);
        }
        assert!(engine.with_db(|db| db.unpublished_controls(10)).unwrap().is_empty());
        return;
    }
    assert_eq!(applied.finished_runs, 3, "counted for the metrics");
    let expected = [
        Some("step \"b\" of workflow \"renamed\" is no longer configured".to_string()),
        Some(
            "step \"b\" now depends on \"z\", a step this run does not have (workflow \"grown\" changed since it \
             started)"
                .to_string(),
        ),
        Some("workflow \"gone\" is no longer configured".to_string()),
        None,
    ];
    for ((name, id), error) in names.iter().zip(&runs).zip(expected) {
        let run = view(id);
        assert_eq!(run.error, error, "{name}");
        let status = if error.is_some() {
            RunStatus::Failed
        } else {
            RunStatus::Running
        };
        assert_eq!(run.status, status, "{name}");
        if error.is_some() {
            assert!(
                run.steps
                    .iter()
                    .all(|s| !matches!(s.status, StepStatus::Pending | StepStatus::Running)),
                "{name}: {:?}",
                run.steps
            );
        }
    }
    // Workers are told to stop what runs of the failed runs.
    let told: Vec<String> = engine
        .with_db(|db| db.unpublished_controls(10))
        .unwrap()
        .into_iter()
        .map(|c| c.run_id)
        .collect();
    assert_eq!(told, runs[..3]);
    // The failed runs' tasks not yet sent are never sent; the kept run goes on.
    assert_eq!(drive(&engine, |_| TaskStatus::Succeeded), 2);
    assert_eq!(view(&runs[3]).status, RunStatus::Succeeded);
    assert_eq!(view(&runs[0]).status, RunStatus::Failed);
}

#[test]
fn a_runs_view_holds_its_outputs_up_to_a_budget_and_each_step_has_its_own_whole() {
    use courier_scheduler::db::RUN_VIEW_BYTES;
    let dir = tempfile::TempDir::new().unwrap();
    let steps: String = (0..20).map(|i| format!("  - name: s{i:02}\n    echo: x\n")).collect();
    let engine = engine_over(
        config_with(dir.path(), &[("wide", &format!("steps:\n{steps}"))]),
        &dir.path().join("c.db"),
    );
    let run = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    // 20 outputs of 1 MiB: 16 fit the view's 16 MiB, in step order.
    let mib = 1024 * 1024;
    let results: Vec<TaskResult> = due(&engine)
        .iter()
        .map(|(task, _)| {
            let fill = task.step.as_bytes()[2];
            result(task, TaskStatus::Succeeded, &String::from(fill as char).repeat(mib))
        })
        .collect();
    engine.apply(&results).unwrap();
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Succeeded);
    let kept = usize::try_from(RUN_VIEW_BYTES).unwrap() / mib;
    for (i, step) in view.steps.iter().enumerate() {
        assert_eq!(step.name, format!("s{i:02}"));
        if i < kept {
            assert_eq!(step.output.as_ref().map(String::len), Some(mib), "{}", step.name);
            assert_eq!(step.left_out_bytes, None);
        } else {
            assert_eq!(
                (step.output.as_ref(), step.left_out_bytes),
                (None, Some(mib as i64)),
                "{}",
                step.name
            );
            assert_eq!(
                (step.status, step.attempts),
                (StepStatus::Succeeded, 1),
                "{}",
                step.name
            );
        }
    }
    let last = engine.with_db(|db| db.step(&run, "s19")).unwrap().unwrap();
    assert_eq!((last.output.map(|o| o.len()), last.left_out_bytes), (Some(mib), None));
    assert!(engine.with_db(|db| db.step(&run, "nope")).unwrap().is_none());
}

#[test]
fn a_runs_fingerprint_changes_with_what_its_live_page_shows_and_only_then() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let run = engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let print = || engine.with_db(|db| db.run_fingerprint(&run)).unwrap().unwrap();
    let first = print();
    assert!(first.starts_with("running|0|0|0"), "{first}");
    let split = publish_next(&engine);
    assert_eq!(print(), first, "publishing changes nothing shown");
    engine.apply(&[result(&split, TaskStatus::Succeeded, "3")]).unwrap();
    let second = print();
    assert_ne!(second, first, "a step ended and three started");
    assert_eq!(print(), second);
    assert!(engine.with_db(|db| db.run_fingerprint("nope")).unwrap().is_none());
}

/// A fan-out of `width` echo children of `root`, fanned in again by `join`;
/// the child `c7` may fail once (retry).
fn wide(width: usize) -> String {
    let mut yaml = String::from("steps:\n  - name: root\n    echo: r\n");
    for i in 0..width {
        yaml.push_str(&format!(
            "  - name: c{i}\n    depends: [root]\n    retry: {{limit: 1, backoff: 1ms, max_backoff: 1ms}}\n    echo: c\n"
        ));
    }
    let all: Vec<String> = (0..width).map(|i| format!("c{i}")).collect();
    yaml.push_str(&format!(
        "  - name: join\n    depends: [{}]\n    echo: j\n",
        all.join(", ")
    ));
    yaml
}

#[test]
fn readiness_is_counted_not_rescanned_through_fan_out_fan_in_retries_and_a_restart() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let config = || config_with(dir.path(), &[("wide", &wide(300))]);
    let engine = engine_over(config(), &db);
    let run = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    // The root, then every child but the last, c7 failing once.
    let mut failed_once = false;
    let root = publish_next(&engine);
    engine.apply(&[result(&root, TaskStatus::Succeeded, "r")]).unwrap();
    let children = due(&engine);
    assert_eq!(children.len(), 300);
    let (last, rest) = children.split_last().unwrap();
    // All published; the last one's result comes only after a restart.
    let ids: Vec<String> = children.iter().map(|(t, _)| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    let results: Vec<TaskResult> = rest
        .iter()
        .map(|(t, _)| {
            let status = if t.step == "c7" && !failed_once {
                failed_once = true;
                TaskStatus::Failed
            } else {
                TaskStatus::Succeeded
            };
            result(t, status, "c")
        })
        .collect();
    let applied = engine.apply(&results).unwrap();
    assert_eq!((applied.retried, applied.dispatched), (1, 1), "c7's retry only");
    std::thread::sleep(std::time::Duration::from_millis(5));
    drive(&engine, |t| {
        assert_ne!(t.step, "join", "join waits for every child");
        TaskStatus::Succeeded
    });
    // Restarted before the last child's result: the counters are in the database.
    drop(engine);
    let engine = engine_over(config(), &db);
    let applied = engine.apply(&[result(&last.0, TaskStatus::Succeeded, "c")]).unwrap();
    assert_eq!(applied.dispatched, 1, "join starts with the last child");
    let join = publish_next(&engine);
    assert_eq!(
        (join.step.as_str(), join.upstream.len()),
        ("join", 0),
        "its fields read no output"
    );
    let applied = engine.apply(&[result(&join, TaskStatus::Succeeded, "j")]).unwrap();
    assert_eq!(applied.finished_runs, 1);
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Succeeded);
    assert!(view.steps.iter().all(|s| s.status == StepStatus::Succeeded));
}

#[test]
fn a_failed_child_skips_the_fan_in_once_and_the_run_ends_when_the_rest_do() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("wide", &wide(50))]),
        &dir.path().join("courier.db"),
    );
    let run = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    // c3 and c4 fail twice each (retries spent); everything else succeeds.
    let answered = drive(&engine, |t| {
        if t.step == "c3" || t.step == "c4" {
            TaskStatus::Failed
        } else {
            TaskStatus::Succeeded
        }
    });
    assert_eq!(answered, 1 + 50 + 2, "root, 50 children, two retries; join never");
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.error.as_deref(), Some("step(s) failed: c3, c4"));
    let join = view.steps.iter().find(|s| s.name == "join").unwrap();
    assert_eq!(join.status, StepStatus::Skipped);
    // Whichever of the two failed for good first (their retries race) skipped it.
    let error = join.error.as_deref().unwrap();
    assert!(
        error == "upstream step \"c3\" failed" || error == "upstream step \"c4\" failed",
        "{error}"
    );
}

#[test]
fn a_run_started_before_the_counters_finishes_the_old_way() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let engine = engine_over(config_with(dir.path(), &[("wide", &wide(20))]), &db);
    let run = engine.submit("wide", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    // As migration 3 leaves a run started before it: no dependency counts;
    // its open steps counted by the migration (here: left NULL, counted live).
    for sql in [
        format!("UPDATE steps SET pending_deps = NULL WHERE run_id = '{}'", run.id),
        format!("UPDATE runs SET open_steps = NULL WHERE id = '{}'", run.id),
    ] {
        support::execute(&db, &sql);
    }
    let answered = drive(&engine, |_| TaskStatus::Succeeded);
    assert_eq!(answered, 22);
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Succeeded);
}

#[test]
fn dependency_counts_follow_a_config_changed_across_a_restart() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let yaml = |b_depends: &str| {
        format!(
            "steps:\n  - name: a\n    echo: a\n  - name: c\n    echo: c\n  - name: b\n    depends: [{b_depends}]\n    echo: b\n"
        )
    };
    // Submitted with b after [a, c] (fewer) and with b after [a] (more).
    let engine = engine_over(
        config_with(dir.path(), &[("fewer", &yaml("a, c")), ("more", &yaml("a"))]),
        &db,
    );
    let fewer = engine.submit("fewer", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let more = engine.submit("more", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let tasks: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    let ids: Vec<String> = tasks.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    drop(engine);
    // Restarted with the dependencies swapped: b after [a] in "fewer", after [a, c] in "more".
    std::fs::write(dir.path().join("config/workflows/fewer.yaml"), yaml("a")).unwrap();
    std::fs::write(dir.path().join("config/workflows/more.yaml"), yaml("a, c")).unwrap();
    let engine = engine_over(Config::load(&dir.path().join("config")).unwrap(), &db);
    assert_eq!(engine.reconcile().unwrap().dispatched, 0, "nothing is ready yet");
    let task = |run: &str, step: &str| {
        tasks
            .iter()
            .find(|t| t.run_id.to_string() == run && t.step == step)
            .unwrap()
            .clone()
    };
    // a succeeds in both: "fewer"'s b is ready now; "more"'s b still waits for c.
    let applied = engine
        .apply(&[
            result(&task(&fewer.id, "a"), TaskStatus::Succeeded, "a"),
            result(&task(&more.id, "a"), TaskStatus::Succeeded, "a"),
        ])
        .unwrap();
    assert_eq!(applied.dispatched, 1);
    let b = publish_next(&engine);
    assert_eq!((b.run_id.to_string(), b.step.as_str()), (fewer.id.clone(), "b"));
    let applied = engine
        .apply(&[
            result(&task(&fewer.id, "c"), TaskStatus::Succeeded, "c"),
            result(&task(&more.id, "c"), TaskStatus::Succeeded, "c"),
            result(&b, TaskStatus::Succeeded, "b"),
        ])
        .unwrap();
    assert_eq!(
        (applied.dispatched, applied.finished_runs),
        (1, 1),
        "more's b starts; fewer ends"
    );
    let b = publish_next(&engine);
    assert_eq!((b.run_id.to_string(), b.step.as_str()), (more.id.clone(), "b"));
    engine.apply(&[result(&b, TaskStatus::Succeeded, "b")]).unwrap();
    for run in [&fewer.id, &more.id] {
        let view = engine.with_db(|db| db.run(run)).unwrap().unwrap();
        assert_eq!(view.status, RunStatus::Succeeded, "{view:?}");
    }
}

const GATED: &str = "params: {what: ~}\nsteps:\n  - name: plan\n    echo: \"plan for ${what}\"\n  - name: gate\n    depends: [plan]\n    approval: {message: \"ship ${plan.output}?\", timeout: 1h}\n  - name: ship\n    depends: [gate]\n    echo: \"shipped: ${gate.output}\"\n";

/// A run's steps and first tasks are written many per statement (by 64,
/// 32, … 1): a run of 101 steps starts with each first step as it should
/// be (running with its task, or waiting for its approval), each step in
/// its place, and its dependent pending.
#[test]
fn a_broad_run_starts_every_first_step_in_its_place() {
    let dir = tempfile::TempDir::new().unwrap();
    let mut yaml = String::from("steps:\n");
    for i in 0..100 {
        if i == 50 {
            yaml.push_str("  - name: s50\n    approval: {message: \"go?\", timeout: 1h}\n");
        } else {
            yaml.push_str(&format!("  - name: s{i}\n    echo: \"{i}\"\n"));
        }
    }
    yaml.push_str("  - name: after\n    depends: [s0]\n    echo: done\n");
    let engine = engine_over(
        config_with(dir.path(), &[("broad", &yaml)]),
        &dir.path().join("courier.db"),
    );
    let run = engine.submit("broad", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let names: Vec<&str> = run.steps.iter().map(|s| s.name.as_str()).collect();
    let expected: Vec<String> = (0..100).map(|i| format!("s{i}")).chain(["after".to_string()]).collect();
    assert_eq!(names, expected);
    for (i, step) in run.steps.iter().enumerate() {
        let state = (step.status, step.attempts, step.started_ms.is_some());
        match i {
            50 => {
                assert_eq!(state, (StepStatus::WaitingApproval, 0, true), "waiting since");
                assert_eq!(step.waiting_on.as_deref(), Some("approval: go?"));
            }
            100 => assert_eq!(state, (StepStatus::Pending, 0, false)),
            _ => assert_eq!(state, (StepStatus::Running, 1, true), "{}", step.name),
        }
    }
    let tasks = due(&engine);
    let mut sent: Vec<(String, String)> = tasks
        .iter()
        .map(|(task, _)| {
            let StepRun::Echo { text } = &task.spec.run else {
                panic!("echo")
            };
            (task.step.clone(), text.clone())
        })
        .collect();
    sent.sort_by_key(|(step, _)| step[1..].parse::<u32>().unwrap());
    let expected: Vec<(String, String)> = (0..100)
        .filter(|i| *i != 50)
        .map(|i| (format!("s{i}"), i.to_string()))
        .collect();
    assert_eq!(sent, expected);
    // `after` waits for s0 alone: counted one dependency when inserted.
    let ids: Vec<String> = tasks.iter().map(|(t, _)| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    let s0 = tasks.iter().find(|(t, _)| t.step == "s0").unwrap();
    let applied = engine.apply(&[result(&s0.0, TaskStatus::Succeeded, "0")]).unwrap();
    assert_eq!(applied.dispatched, 1, "after starts once s0 succeeded");
    let next: Vec<String> = due(&engine).into_iter().map(|(t, _)| t.step).collect();
    assert_eq!(next, ["after"]);
}

#[test]
fn an_approval_waits_through_a_restart_then_approve_starts_what_depends_on_it() {
    use courier_scheduler::engine::DecideError;
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let config = || config_with(dir.path(), &[("gated", GATED)]);
    let engine = engine_over(config(), &db);
    let params = BTreeMap::from([("what".to_string(), "v2".to_string())]);
    let run = engine.submit("gated", &params, NORMAL_PRIORITY).unwrap();
    let plan = publish_next(&engine);
    engine
        .apply(&[result(&plan, TaskStatus::Succeeded, "plan for v2")])
        .unwrap();
    // Waiting: no task, no worker; the message names what to decide.
    assert!(due(&engine).is_empty());
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.steps[1].status, StepStatus::WaitingApproval);
    assert_eq!(view.steps[1].waiting_on.as_deref(), Some("approval: ship plan for v2?"));
    // Deciding too early, or on a step that is not waiting, is refused.
    assert!(matches!(
        engine.decide(&run.id, "ship", true, "api:ana", "ok"),
        Err(DecideError::NotWaiting { .. })
    ));
    drop(engine);
    let engine = engine_over(config(), &db);
    engine.reconcile().unwrap();
    assert_eq!(engine.tick(true).unwrap().finished_runs, 0, "the approval has an hour");
    let (view, _) = engine.decide(&run.id, "gate", true, "api:ana", "looks good").unwrap();
    let gate = &view.steps[1];
    assert_eq!(
        (gate.status, gate.output.as_deref(), gate.worker.as_deref()),
        (StepStatus::Succeeded, Some("looks good"), Some("api:ana"))
    );
    let ship = publish_next(&engine);
    let StepRun::Echo { text } = &ship.spec.run else {
        panic!("echo")
    };
    assert_eq!(text, "shipped: looks good");
    engine
        .apply(&[result(&ship, TaskStatus::Succeeded, "shipped")])
        .unwrap();
    let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Succeeded);
    // Decided once.
    assert!(matches!(
        engine.decide(&run.id, "gate", false, "api:bob", "no"),
        Err(DecideError::NotWaiting { .. })
    ));
}

#[test]
fn a_rejected_or_expired_approval_fails_its_run_and_a_cancel_ends_the_wait() {
    let dir = tempfile::TempDir::new().unwrap();
    let quick = GATED.replace("timeout: 1h", "timeout: 50ms");
    let engine = engine_over(
        config_with(dir.path(), &[("gated", GATED), ("quick", &quick)]),
        &dir.path().join("courier.db"),
    );
    let params = BTreeMap::from([("what".to_string(), "x".to_string())]);
    let waiting = |name: &str| {
        let run = engine.submit(name, &params, NORMAL_PRIORITY).unwrap();
        let plan = publish_next(&engine);
        engine.apply(&[result(&plan, TaskStatus::Succeeded, "p")]).unwrap();
        run.id
    };
    let rejected = waiting("gated");
    let (view, applied) = engine.decide(&rejected, "gate", false, "api:bob", "not now").unwrap();
    assert_eq!(applied.finished_runs, 1);
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(view.steps[1].error.as_deref(), Some("rejected by api:bob: not now"));
    assert_eq!(view.steps[2].status, StepStatus::Skipped);
    let expired = waiting("quick");
    std::thread::sleep(std::time::Duration::from_millis(100));
    engine.tick(true).unwrap();
    let view = engine.with_db(|db| db.run(&expired)).unwrap().unwrap();
    assert_eq!(view.status, RunStatus::Failed);
    assert_eq!(
        view.steps[1].error.as_deref(),
        Some("no decision within the approval's timeout (50ms)")
    );
    let cancelled = waiting("gated");
    let done = engine.cancel(&cancelled, None, "api:ana", "stop").unwrap();
    assert_eq!(
        (done.run.status, done.run.steps[1].status),
        (RunStatus::Cancelled, StepStatus::Cancelled)
    );
}

#[test]
fn a_step_that_became_an_approval_is_never_sent_to_a_worker() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let v1 = "max_active_steps: 1\nsteps:\n  - name: x\n    echo: x\n";
    let engine = engine_over(config_with(dir.path(), &[("flip", v1)]), &db);
    let first = engine.submit("flip", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    let second = engine.submit("flip", &BTreeMap::new(), NORMAL_PRIORITY).unwrap();
    assert_eq!(second.steps[0].status, StepStatus::Waiting);
    drop(engine);
    // Restarted with x an approval: the waiting one is parked, the unpublished task is not sent.
    let v2 = "max_active_steps: 1\nsteps:\n  - name: x\n    approval: {message: ok?}\n";
    std::fs::write(dir.path().join("config/workflows/flip.yaml"), v2).unwrap();
    let engine = engine_over(Config::load(&dir.path().join("config")).unwrap(), &db);
    engine.admit().unwrap();
    let second = engine.with_db(|db| db.run(&second.id)).unwrap().unwrap();
    assert_eq!(second.steps[0].status, StepStatus::WaitingApproval);
    let row = engine
        .with_db(|db| db.unpublished_tasks(10, &Default::default(), &|_| false))
        .unwrap()
        .0
        .remove(0);
    assert_eq!(row.run_id, first.id);
    let refused = engine.task_body(&row).unwrap_err().to_string();
    assert!(refused.contains("now an approval"), "{refused}");
}

#[test]
fn the_outbox_read_leaves_out_tasks_awaiting_confirms_and_carries_each_runs_priority() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let topic = BTreeMap::from([("topic".to_string(), "q".to_string())]);
    let low = engine.submit("research", &topic, 1).unwrap();
    let high = engine.submit("research", &topic, 8).unwrap();
    let read = |limit: usize, skip: &std::collections::HashSet<String>| {
        engine
            .with_db(|db| db.unpublished_tasks(limit, skip, &|_| false))
            .unwrap()
    };
    let (all, full) = read(10, &Default::default());
    let priorities: BTreeMap<&str, u8> = all.iter().map(|t| (t.run_id.as_str(), t.priority)).collect();
    assert_eq!(
        priorities,
        BTreeMap::from([(low.id.as_str(), 1), (high.id.as_str(), 8)])
    );
    assert!(!full);
    // The first is published and awaits its confirm: left out, and the read
    // of one row still says more may wait.
    let skip = std::collections::HashSet::from([all[0].task_id.clone()]);
    let (rest, _) = read(10, &skip);
    assert_eq!(
        rest.iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>(),
        all[1..].iter().map(|t| t.task_id.as_str()).collect::<Vec<_>>()
    );
    let (none, full) = read(1, &skip);
    assert!(none.is_empty() && full);
}

#[test]
fn runs_submitted_at_once_are_written_together_each_as_submitted() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = std::sync::Arc::new(engine(&dir.path().join("courier.db")));
    let threads: Vec<_> = (0..16_u8)
        .map(|t| {
            let engine = engine.clone();
            std::thread::spawn(move || {
                (0..20)
                    .map(|i| {
                        let topic = format!("t{t}-{i}");
                        let priority = t % 10;
                        let params = BTreeMap::from([("topic".to_string(), topic.clone())]);
                        let run = engine.submit("research", &params, priority).unwrap();
                        (run.id, topic, priority)
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let submitted: Vec<(String, String, u8)> = threads.into_iter().flat_map(|t| t.join().unwrap()).collect();
    assert_eq!(submitted.len(), 320);
    // Each run as submitted, with exactly one first task in the outbox.
    let due = due(&engine);
    assert_eq!(due.len(), 320);
    for (run, topic, priority) in &submitted {
        let view = engine.with_db(|db| db.run(run)).unwrap().unwrap();
        assert_eq!(view.status, RunStatus::Running);
        assert_eq!(view.priority, *priority);
        assert_eq!(view.params.value()["topic"], topic.as_str());
        assert_eq!(view.steps[0].status, StepStatus::Running);
        let tasks: Vec<&Task> = due
            .iter()
            .map(|(t, _)| t)
            .filter(|t| t.run_id.to_string() == *run)
            .collect();
        assert_eq!(tasks.len(), 1, "run {run}");
        assert_eq!(tasks[0].step, "gather");
    }
}

#[test]
fn a_run_that_cannot_be_stored_fails_only_its_own_submit_when_written_with_others() {
    // SQLite, with a trigger that refuses one run's params.
    let dir = tempfile::TempDir::new().unwrap();
    let path = dir.path().join("courier.db");
    let engine = std::sync::Arc::new(Engine::new(
        example(),
        Db::open(&path).unwrap(),
        EngineLimits::default(),
    ));
    rusqlite::Connection::open(&path)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER poison BEFORE INSERT ON run_params WHEN NEW.params LIKE '%poison%'
             BEGIN SELECT RAISE(ABORT, 'poisoned params'); END;",
        )
        .unwrap();
    // Held while the submits queue up: whichever takes it next writes them together.
    let submits = engine.with_db(|_| {
        let submits: Vec<_> = ["a", "b", "poison", "c", "d"]
            .into_iter()
            .map(|topic| {
                let engine = engine.clone();
                std::thread::spawn(move || {
                    let params = BTreeMap::from([("topic".to_string(), topic.to_string())]);
                    (topic, engine.submit("research", &params, NORMAL_PRIORITY))
                })
            })
            .collect();
        std::thread::sleep(std::time::Duration::from_millis(300));
        submits
    });
    let mut stored = 0;
    for submit in submits {
        let (topic, outcome) = submit.join().unwrap();
        match outcome {
            Ok(run) => {
                assert_ne!(topic, "poison");
                let view = engine.with_db(|db| db.run(&run.id)).unwrap().unwrap();
                assert_eq!(view.params.value()["topic"], topic);
                stored += 1;
            }
            Err(e) => {
                assert_eq!(topic, "poison");
                assert!(e.to_string().contains("poisoned params"), "{e}");
            }
        }
    }
    assert_eq!(stored, 4);
    // Nothing of the refused run: four runs, four first tasks.
    assert_eq!(engine.with_db(|db| db.runs(None, None, None, 100)).unwrap().len(), 4);
    assert_eq!(due(&engine).len(), 4);
}

#[test]
fn runs_page_by_a_cursor_through_runs_that_share_a_timestamp() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = store(&dir.path().join("state.db"));
    // Runs written in one batch share their creation time: the id orders them.
    let created: [(&str, i64); 7] = [
        ("a", 1_000),
        ("b", 2_000),
        ("c", 2_000),
        ("d", 2_000),
        ("e", 2_000),
        ("f", 2_000),
        ("g", 3_000),
    ];
    db.transaction(|t| {
        for (id, now) in created {
            courier_scheduler::db::tx::insert_run(
                t,
                &courier_scheduler::db::tx::RunInsert {
                    id,
                    workflow: "w",
                    params_json: "{}",
                    priority: NORMAL_PRIORITY,
                    deadline_ms: None,
                    admitted: true,
                    steps: 1,
                    parent: None,
                },
                now,
            )?;
        }
        Ok::<_, courier_scheduler::db::DbError>(())
    })
    .unwrap();
    // Pages of two, each from the last id of the one before: every run once,
    // newest first.
    let mut seen = Vec::new();
    let mut before: Option<String> = None;
    loop {
        let page = db.runs(None, None, before.as_deref(), 2).unwrap();
        if page.is_empty() {
            break;
        }
        before = page.last().map(|r| r.id.clone());
        seen.extend(page.into_iter().map(|r| r.id));
    }
    assert_eq!(seen, ["g", "f", "e", "d", "c", "b", "a"]);
    // Filters hold across pages.
    let page = db.runs(None, Some(RunStatus::Running), Some("d"), 10).unwrap();
    let ids: Vec<&str> = page.iter().map(|r| r.id.as_str()).collect();
    assert_eq!(ids, ["c", "b", "a"]);
    assert!(db.has_run("d").unwrap());
    assert!(!db.has_run("z").unwrap());
    // An answer held whole stops at its byte budget (about 514 bytes a run
    // here), with at least one run, and pages on from its last.
    let ids = |runs: Vec<courier_scheduler::db::RunView>| runs.into_iter().map(|r| r.id).collect::<Vec<_>>();
    assert_eq!(ids(db.runs_within(None, None, None, 10, 1_500).unwrap()), ["g", "f"]);
    assert_eq!(
        ids(db.runs_within(None, None, Some("f"), 10, 1_500).unwrap()),
        ["e", "d"]
    );
    assert_eq!(ids(db.runs_within(None, None, None, 10, 1).unwrap()), ["g"]);
    assert_eq!(ids(db.runs_within(None, None, None, 10, 1 << 20).unwrap()).len(), 7);
}

#[test]
fn results_of_several_runs_in_one_batch_end_each_run_once_and_free_its_slot() {
    let dir = tempfile::TempDir::new().unwrap();
    let trio =
        "max_active_runs: 2\nsteps:\n  - name: a\n    echo: a\n  - name: b\n    echo: b\n  - name: c\n    echo: c\n";
    let engine = engine_over(
        config_with(dir.path(), &[("trio", trio)]),
        &dir.path().join("courier.db"),
    );
    let runs: Vec<String> = (0..3)
        .map(|_| engine.submit("trio", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id)
        .collect();
    let mut tasks: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    assert_eq!(tasks.len(), 6, "the third run waits for a slot");
    let ids: Vec<String> = tasks.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    // One batch with the two runs' results interleaved: every step of the
    // first succeeds, the second's `b` fails, and its `c` comes twice.
    tasks.sort_by(|x, y| (&x.step, x.run_id).cmp(&(&y.step, y.run_id)));
    let mut batch: Vec<TaskResult> = tasks
        .iter()
        .map(|t| {
            let failed = t.run_id.to_string() == runs[1] && t.step == "b";
            result(
                t,
                if failed {
                    TaskStatus::Failed
                } else {
                    TaskStatus::Succeeded
                },
                "x",
            )
        })
        .collect();
    let last_of_second = tasks.iter().rfind(|t| t.run_id.to_string() == runs[1]).unwrap();
    batch.push(result(last_of_second, TaskStatus::Succeeded, "again"));
    let applied = engine.apply(&batch).unwrap();
    assert_eq!((applied.applied, applied.duplicates), (6, 1));
    assert_eq!(applied.finished_runs, 2, "each run ends once");
    assert_eq!(
        applied.dispatched, 3,
        "the slots they freed admit the third run in the same transaction"
    );
    let view = |id: &str| engine.with_db(|db| db.run(id)).unwrap().unwrap();
    assert_eq!(view(&runs[0]).status, RunStatus::Succeeded);
    let second = view(&runs[1]);
    assert_eq!(
        (second.status, second.error.as_deref()),
        (RunStatus::Failed, Some("step(s) failed: b"))
    );
    assert_eq!(
        second.steps.iter().find(|s| s.name == "c").unwrap().output.as_deref(),
        Some("x")
    );
    // Each ended run's count of open steps went down by each of its steps, once.
    let ended_with_steps_open: i64 = support::store(&dir.path().join("courier.db"))
        .read(|tx| {
            tx.one(
                "SELECT COUNT(*) FROM runs WHERE status <> 'running' AND open_steps <> 0",
                &[],
                |r| r.get(0),
            )
        })
        .unwrap();
    assert_eq!(ended_with_steps_open, 0);
    // The third run's count of open steps is right: it ends with its last step.
    let third = view(&runs[2]);
    assert!(third.steps.iter().all(|s| s.status == StepStatus::Running));
    assert_eq!(drive(&engine, |_| TaskStatus::Succeeded), 3);
    assert_eq!(view(&runs[2]).status, RunStatus::Succeeded);
}

#[test]
fn a_mixed_batch_applies_the_first_matching_result_of_each_task_and_ignores_or_refuses_the_rest() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    // Two fanout runs at `split`: one answered by a forgery first, then for real twice.
    let runs: Vec<String> = (0..2)
        .map(|_| engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id)
        .collect();
    let mut splits: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    assert_eq!(splits.len(), 2);
    splits.sort_by_key(|t| runs.iter().position(|r| *r == t.run_id.to_string()));
    let stray = TaskResult {
        task_id: Uuid::now_v7(),
        ..result(&splits[1], TaskStatus::Succeeded, "stray")
    };
    let forged = TaskResult {
        attempt: 2,
        ..result(&splits[0], TaskStatus::Succeeded, "forged")
    };
    let proposing = TaskResult {
        memory_updates: vec![courier_wire::MemoryUpdate {
            target: courier_wire::MemoryTarget::Global,
            append: "- forged\n".into(),
        }],
        ..result(&splits[1], TaskStatus::Succeeded, "proposing")
    };
    let batch = [
        stray,
        forged,
        result(&splits[0], TaskStatus::Succeeded, "7"),
        proposing,
        result(&splits[0], TaskStatus::Failed, "late copy"),
        result(&splits[1], TaskStatus::Failed, "failed"),
        result(&splits[1], TaskStatus::Succeeded, "late copy"),
    ];
    let applied = engine.apply(&batch).unwrap();
    let reasons: Vec<(usize, &str)> = applied.refused.iter().map(|(i, r)| (*i, r.label())).collect();
    assert_eq!(reasons, [(1, "mismatch"), (3, "memory_not_allowed")]);
    assert_eq!(
        (applied.applied, applied.duplicates),
        (2, 3),
        "the stray result and the two late copies"
    );
    let split_of = |run: &str| {
        let view = engine.with_db(|db| db.run(run)).unwrap().unwrap();
        let split = view.steps.into_iter().find(|s| s.name == "split").unwrap();
        (split.status, split.output)
    };
    assert_eq!(split_of(&runs[0]), (StepStatus::Succeeded, Some("7".to_string())));
    // The first matching result wins: `split` of the second run failed, and so did its run.
    assert_eq!(split_of(&runs[1]), (StepStatus::Failed, None));
    let second = engine.with_db(|db| db.run(&runs[1])).unwrap().unwrap();
    assert_eq!(second.status, RunStatus::Failed);
}

#[test]
fn a_late_result_for_a_step_gone_from_the_config_does_not_fail_a_run_that_just_ended() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("courier.db");
    let both = "steps:\n  - name: x\n    echo: x\n  - name: y\n    echo: y\n";
    let engine = engine_over(config_with(dir.path(), &[("pair", both)]), &db);
    let run = engine.submit("pair", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let tasks: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    let ids: Vec<String> = tasks.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    engine.cancel(&run, Some("x"), "api:ana", "not needed").unwrap();
    drop(engine);
    // `x` leaves the config; its late answer comes in one batch after `y`'s,
    // which ended the run.
    let other = tempfile::TempDir::new().unwrap();
    let only_y = "steps:\n  - name: y\n    echo: y\n";
    let engine = engine_over(config_with(other.path(), &[("pair", only_y)]), &db);
    let task = |step: &str| tasks.iter().find(|t| t.step == step).unwrap();
    engine
        .apply(&[
            result(task("y"), TaskStatus::Succeeded, "y"),
            result(task("x"), TaskStatus::Cancelled, ""),
        ])
        .unwrap();
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    assert_eq!(
        (view.status, view.error.as_deref()),
        (RunStatus::Cancelled, Some("step(s) cancelled: x"))
    );
}

#[test]
fn a_result_carrying_a_nul_character_is_stored_and_a_forged_one_changes_nothing() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let run = engine.submit("fanout", &BTreeMap::new(), NORMAL_PRIORITY).unwrap().id;
    let split = publish_next(&engine);
    // A forged copy naming a step with a NUL, then the real result whose
    // output has one: in one batch, on either store.
    let forged = TaskResult {
        step: "split\0".into(),
        ..result(&split, TaskStatus::Succeeded, "forged")
    };
    let applied = engine
        .apply(&[forged, result(&split, TaskStatus::Succeeded, "9\0")])
        .unwrap();
    assert_eq!((applied.applied, applied.refused.len()), (1, 1));
    let view = engine.with_db(|db| db.run(&run)).unwrap().unwrap();
    let output = view.steps.iter().find(|s| s.name == "split").unwrap().output.clone();
    // PostgreSQL's text cannot hold NUL: it is stored as U+FFFD there.
    let expected = if support::postgres_server().is_some() {
        "9\u{FFFD}"
    } else {
        "9\0"
    };
    assert_eq!(output.as_deref(), Some(expected));
}

/// What the outbox is handed in memory, against what a read of the database
/// (and a rebuild of each task from it) gives.
#[test]
fn committed_tasks_are_handed_to_the_outbox_in_memory_once_it_has_read_the_database_whole() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine(&dir.path().join("courier.db"));
    let read_whole = |engine: &Engine| {
        engine
            .with_db(|db| {
                let generation = engine.outbox_generation();
                let (rows, full) = db.unpublished_tasks(10_000, &Default::default(), &|_| false)?;
                assert!(engine.outbox_read(&rows, full, generation));
                Ok::<_, courier_scheduler::db::DbError>(rows)
            })
            .unwrap()
    };
    // Until the outbox has read the database whole, it reads it.
    engine.submit("fanout", &BTreeMap::new(), 7).unwrap();
    assert!(engine.take_fresh(100).is_none());
    let first = read_whole(&engine);
    assert_eq!(first.len(), 1);
    if engine.shares_database() {
        // On PostgreSQL other schedulers write tasks too: always read.
        engine.submit("fanout", &BTreeMap::new(), 2).unwrap();
        assert!(engine.take_fresh(100).is_none());
        return;
    }
    let (nothing, more) = engine.take_fresh(100).unwrap();
    assert!(nothing.is_empty() && !more);

    // A submit's first task and the tasks a result dispatches (the run's
    // priority read with the result), oldest first, as the database has them.
    let run = engine.submit("fanout", &BTreeMap::new(), 2).unwrap();
    let (taken, more) = engine.take_fresh(100).unwrap();
    assert!(!more);
    assert_eq!(taken.len(), 1);
    let split = decode_task(&taken[0].1);
    assert_eq!((split.step.as_str(), taken[0].0.priority), ("split", 2));
    // As the outbox would read them from the database (a task is there
    // until its result is applied).
    let unpublished = || {
        engine
            .with_db(|db| db.unpublished_tasks(10_000, &Default::default(), &|_| false))
            .unwrap()
            .0
    };
    let mut in_db = unpublished();
    engine.apply(&[result(&split, TaskStatus::Succeeded, "9")]).unwrap();
    // Taken two, then the one left.
    let (two, more) = engine.take_fresh(2).unwrap();
    assert!(more);
    let (one, more) = engine.take_fresh(2).unwrap();
    assert!(!more);
    let handed: Vec<_> = taken.into_iter().chain(two).chain(one).collect();
    let steps: Vec<&str> = handed.iter().map(|(row, _)| row.step.as_str()).collect();
    assert_eq!(steps, ["split", "count-a", "count-b", "count-c"]);
    in_db.extend(unpublished());
    for (row, body) in &handed {
        let stored = in_db.iter().find(|r| r.task_id == row.task_id).unwrap();
        assert_eq!(
            (
                &row.run_id,
                &row.step,
                &row.queue,
                row.attempt,
                &row.snapshot_hash,
                row.not_before_ms,
                row.priority
            ),
            (
                &stored.run_id,
                &stored.step,
                &stored.queue,
                stored.attempt,
                &stored.snapshot_hash,
                stored.not_before_ms,
                stored.priority
            )
        );
        assert_eq!((&row.run_id, row.priority), (&run.id, 2));
        // Its body was handed over, so the engine builds it again.
        let (again, again_hash) = engine.task_body(stored).unwrap();
        let (task, again) = (decode_task(body), decode_task(&again));
        assert_eq!(
            (task.task_id, &task.spec, &task.snapshot, task.attempt),
            (again.task_id, &again.spec, &again.snapshot, again.attempt)
        );
        assert_eq!(row.snapshot_hash, again_hash);
    }

    // A run cancelled before its tasks were taken: they are never handed.
    let cancelled = engine.submit("fanout", &BTreeMap::new(), 4).unwrap();
    engine.cancel(&cancelled.id, None, "api:ana", "stop").unwrap();
    let (none, _) = engine.take_fresh(100).unwrap();
    assert!(none.is_empty(), "{none:?}");

    // Asked to (a new broker connection): the database again, then memory.
    let last = engine.submit("fanout", &BTreeMap::new(), 4).unwrap();
    engine.outbox_incomplete();
    assert!(engine.take_fresh(100).is_none());
    assert!(read_whole(&engine).iter().any(|row| row.run_id == last.id));
    assert!(engine.take_fresh(100).unwrap().0.is_empty());

    // A read begun before the outbox was asked to read again (by a loop
    // stopped while its read waited for the database) changes nothing: the
    // task committed meanwhile is read from the database, not forgotten.
    let generation = engine.outbox_generation();
    let stale = engine
        .with_db(|db| db.unpublished_tasks(10_000, &Default::default(), &|_| false))
        .unwrap()
        .0;
    engine.outbox_incomplete();
    let meanwhile = engine.submit("fanout", &BTreeMap::new(), 4).unwrap();
    assert!(!engine.outbox_read(&stale, false, generation));
    assert!(engine.take_fresh(100).is_none());
    assert!(read_whole(&engine).iter().any(|row| row.run_id == meanwhile.id));
}

fn decode_task(body: &[u8]) -> Task {
    courier_wire::decode::<Task>(
        body,
        &courier_wire::Limits {
            max_compressed: 1 << 24,
            max_decompressed: 1 << 24,
        },
    )
    .unwrap()
}
