//! The run engine over a real SQLite file, without a broker.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;
use std::path::Path;

use courier_config::Config;
use courier_scheduler::db::{Db, RunStatus, StepStatus};
use courier_scheduler::engine::{Engine, EngineLimits, NORMAL_PRIORITY};
use courier_wire::{Limits, StepRun, Task, TaskResult, TaskStatus, decode};
use uuid::Uuid;

fn example() -> Config {
    Config::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config")).unwrap()
}

fn engine(db: &Path) -> Engine {
    Engine::new(example(), Db::open(db).unwrap(), EngineLimits::default())
}

fn result(task: &Task, status: TaskStatus, output: &str) -> TaskResult {
    TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        step: task.step.clone(),
        attempt: task.attempt,
        status,
        output: output.into(),
        error: (status != TaskStatus::Succeeded).then(|| "boom".to_string()),
        started_unix_ms: 1,
        finished_unix_ms: 2,
        worker_id: "w".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

/// The due outbox tasks, decoded.
fn due(engine: &Engine) -> Vec<(Task, String)> {
    let rows = engine.with_db(|db| db.unpublished_tasks(100)).unwrap();
    rows.iter()
        .map(|row| {
            let (body, hash) = engine.task_body(row).unwrap();
            (
                decode::<Task>(
                    &body,
                    &Limits {
                        max_compressed: 1 << 24,
                        max_decompressed: 1 << 24,
                    },
                )
                .unwrap(),
                hash,
            )
        })
        .collect()
}

/// Take the next due task and mark it published, as the outbox would.
fn publish_next(engine: &Engine) -> Task {
    let (task, _) = due(engine).remove(0);
    engine
        .with_db(|db| db.mark_published(&[task.task_id.to_string()]))
        .unwrap();
    task
}

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
    let later = engine.with_db(|db| db.unpublished_tasks(10)).unwrap();
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
    let applied = engine.apply(&[wrong_attempt, wrong_step]).unwrap();
    assert_eq!(applied.applied, 0);
    let reasons: Vec<(usize, &str)> = applied.refused.iter().map(|(i, r)| (*i, r.label())).collect();
    assert_eq!(reasons, [(0, "mismatch"), (1, "mismatch")]);
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
        Db::open(&dir.path().join("courier.db")).unwrap(),
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
