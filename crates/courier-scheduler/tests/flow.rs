//! The workflow language's flow through the engine, over a real SQLite
//! file and an outbox driven by hand: `foreach` items and `when` conditions.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::BTreeMap;

use courier_scheduler::db::{RunStatus, RunView, StepStatus, StepView};
use courier_scheduler::engine::{Engine, EngineLimits, NORMAL_PRIORITY};
use courier_wire::{StepRun, Task, TaskResult, TaskStatus};

mod support;
use support::*;

fn view(engine: &Engine, run: &str) -> RunView {
    engine.with_db(|db| db.run(run)).unwrap().unwrap()
}

fn step<'a>(view: &'a RunView, name: &str) -> &'a StepView {
    view.steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
}

fn echo(task: &Task) -> String {
    match &task.spec.run {
        StepRun::Echo { text } => text.clone(),
        other => panic!("not an echo: {other:?}"),
    }
}

/// Publish the due tasks, as the outbox would, and return them.
fn publish_all(engine: &Engine) -> Vec<Task> {
    let due: Vec<Task> = due(engine).into_iter().map(|(t, _)| t).collect();
    let ids: Vec<String> = due.iter().map(|t| t.task_id.to_string()).collect();
    engine.with_db(|db| db.mark_published(&ids)).unwrap();
    due
}

/// Answer a task with its own echo text as output (or `status`).
fn answer(task: &Task, status: TaskStatus) -> TaskResult {
    result(task, status, &echo(task))
}

fn submit(engine: &Engine, workflow: &str, params: &[(&str, &str)]) -> String {
    let params = params
        .iter()
        .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
        .collect();
    engine.submit(workflow, &params, NORMAL_PRIORITY).unwrap().id
}

/// Answer every task with its echo text until none is due.
fn drive_echo(engine: &Engine) {
    for _ in 0..100 {
        let tasks = publish_all(engine);
        if tasks.is_empty() {
            return;
        }
        let results: Vec<TaskResult> = tasks.iter().map(|t| answer(t, TaskStatus::Succeeded)).collect();
        engine.apply(&results).unwrap();
    }
    panic!("the run never settled");
}

/// An engine over `workflows` whose tasks may carry 4,096 bytes at most.
fn engine_with_small_tasks(dir: &std::path::Path, workflows: &[(&str, &str)]) -> Engine {
    let limits = EngineLimits {
        task: courier_wire::Limits {
            max_compressed: 4096,
            max_decompressed: 4096,
        },
        ..EngineLimits::default()
    };
    Engine::new(config_with(dir, workflows), support::store(&dir.join("c.db")), limits)
}

/// plan (an echo of `items`) → each (a foreach over it) → join.
fn fan(max_concurrent: u32, extra: &str) -> String {
    format!(
        "params: {{items: ~}}
steps:
  - name: plan
    echo: '${{items}}'
  - name: each
    depends: [plan]
    foreach: '${{plan.json}}'
    max_concurrent: {max_concurrent}
{extra}    echo: '${{index}}=${{item}}'
  - name: join
    depends: [each]
    echo: '${{each.output}}'
"
    )
}

#[test]
fn foreach_runs_each_item_once_at_most_max_concurrent_and_gathers_outputs_in_item_order() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("fan", &fan(2, ""))]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "fan", &[("items", r#"["a", {"k": 1}, "c"]"#)]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    // Two of three at once, each its own task with its item substituted.
    let first = publish_all(&engine);
    let names: Vec<&str> = first.iter().map(|t| t.step.as_str()).collect();
    assert_eq!(names, ["each[0]", "each[1]"]);
    assert_eq!(echo(&first[1]), r#"1={"k":1}"#);
    // An item carries its item, not its step's upstream outputs (which it does not read).
    assert!(first.iter().all(|t| t.upstream.is_empty()));
    assert_eq!(step(&view(&engine, &run), "each").status, StepStatus::Running);
    // The second ends first: the third starts, the output keeps item order.
    engine.apply(&[answer(&first[1], TaskStatus::Succeeded)]).unwrap();
    let third = publish_all(&engine);
    assert_eq!(third.len(), 1);
    assert_eq!((third[0].step.as_str(), echo(&third[0]).as_str()), ("each[2]", "2=c"));
    engine
        .apply(&[
            answer(&third[0], TaskStatus::Succeeded),
            answer(&first[0], TaskStatus::Succeeded),
        ])
        .unwrap();
    let join = publish_all(&engine);
    assert_eq!(echo(&join[0]), r#"["0=a","1={\"k\":1}","2=c"]"#);
    engine.apply(&[answer(&join[0], TaskStatus::Succeeded)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded);
    let items: Vec<(&str, StepStatus)> = v
        .steps
        .iter()
        .filter(|s| s.name.starts_with("each["))
        .map(|s| (s.name.as_str(), s.status))
        .collect();
    assert_eq!(
        items,
        [
            ("each[0]", StepStatus::Succeeded),
            ("each[1]", StepStatus::Succeeded),
            ("each[2]", StepStatus::Succeeded)
        ]
    );
}

#[test]
fn two_thousand_items_never_exceed_max_concurrent_and_come_back_in_order() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("c.db");
    let config = || config_with(dir.path(), &[("fan", &fan(50, ""))]);
    let mut engine = engine_over(config(), &db);
    let items: Vec<String> = (0..2000).map(|i| format!("\"i{i}\"")).collect();
    let run = submit(&engine, "fan", &[("items", &format!("[{}]", items.join(",")))]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let mut in_flight: Vec<Task> = Vec::new();
    let mut answered = 0;
    let mut restarted = false;
    loop {
        in_flight.extend(publish_all(&engine));
        assert!(in_flight.len() <= 50, "{} items in flight", in_flight.len());
        if in_flight.is_empty() {
            break;
        }
        if in_flight[0].step == "join" {
            break;
        }
        // Answer a third of them, newest first (out of order).
        let n = in_flight.len().div_ceil(3);
        let done: Vec<Task> = in_flight.drain(in_flight.len() - n..).collect();
        answered += done.len();
        engine
            .apply(
                &done
                    .iter()
                    .map(|t| answer(t, TaskStatus::Succeeded))
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        if answered > 1000 && !restarted {
            // A restart halfway: the counters are in the database.
            drop(engine);
            engine = engine_over(config(), &db);
            engine.reconcile().unwrap();
            restarted = true;
        }
    }
    assert_eq!(answered, 2000);
    let join = &in_flight[0];
    let outputs: Vec<String> = serde_json::from_str(&echo(join)).unwrap();
    let expected: Vec<String> = (0..2000).map(|i| format!("{i}=i{i}")).collect();
    assert_eq!(outputs, expected);
    engine.apply(&[answer(join, TaskStatus::Succeeded)]).unwrap();
    assert_eq!(view(&engine, &run).status, RunStatus::Succeeded);
}

#[test]
fn a_failed_item_fails_the_step_after_the_others_in_flight_unless_continue_on_failure() {
    let dir = tempfile::TempDir::new().unwrap();
    let config = config_with(
        dir.path(),
        &[
            ("strict", &fan(2, "")),
            ("lenient", &fan(2, "    continue_on_failure: true\n")),
        ],
    );
    let engine = engine_over(config, &dir.path().join("c.db"));
    for (workflow, continues) in [("strict", false), ("lenient", true)] {
        let run = submit(&engine, workflow, &[("items", "[1, 2, 3, 4, 5]")]);
        let plan = publish_all(&engine);
        engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
        let first = publish_all(&engine);
        // Item 1 fails while item 0 still runs.
        engine.apply(&[answer(&first[1], TaskStatus::Failed)]).unwrap();
        let next = publish_all(&engine);
        assert_eq!(
            next.len(),
            usize::from(continues),
            "{workflow}: a new item starts only if failures are tolerated"
        );
        assert_eq!(
            step(&view(&engine, &run), "each").status,
            StepStatus::Running,
            "item 0 is still running"
        );
        engine.apply(&[answer(&first[0], TaskStatus::Succeeded)]).unwrap();
        let v = view(&engine, &run);
        if continues {
            engine.apply(&[result(&next[0], TaskStatus::Succeeded, "out")]).unwrap();
            drive(&engine, |_| TaskStatus::Succeeded);
            let v = view(&engine, &run);
            assert_eq!(v.status, RunStatus::Succeeded, "{:?}", v.error);
            let each = step(&v, "each");
            assert_eq!(each.status, StepStatus::Succeeded);
            assert_eq!(each.output.as_deref(), Some(r#"["0=1",null,"out","out","out"]"#));
            assert_eq!(
                each.error.as_deref(),
                Some("1 of 5 items failed; first, each[1]: boom (null in the output)")
            );
            assert_eq!(step(&v, "join").status, StepStatus::Succeeded);
        } else {
            assert_eq!(v.status, RunStatus::Failed);
            let each = step(&v, "each");
            assert_eq!(each.status, StepStatus::Failed);
            assert_eq!(
                each.error.as_deref(),
                Some("1 of 5 items failed (3 not started); first, each[1]: boom")
            );
            assert_eq!(step(&v, "each[4]").status, StepStatus::Skipped);
            assert_eq!(step(&v, "join").status, StepStatus::Skipped);
            assert_eq!(v.error.as_deref(), Some("step(s) failed: each"));
        }
    }
}

#[test]
fn after_a_failure_items_held_by_a_limit_are_skipped_not_started() {
    let dir = tempfile::TempDir::new().unwrap();
    // Every item is taken at once, but the workflow runs two steps at a time:
    // three items are held.
    let config = config_with(
        dir.path(),
        &[("held", &format!("max_active_steps: 2\n{}", fan(10, "")))],
    );
    let engine = engine_over(config, &dir.path().join("c.db"));
    let run = submit(&engine, "held", &[("items", "[1, 2, 3, 4, 5]")]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let first = publish_all(&engine);
    assert_eq!(first.len(), 2);
    let held = view(&engine, &run);
    assert_eq!(step(&held, "each[4]").status, StepStatus::Waiting);
    engine.apply(&[answer(&first[0], TaskStatus::Failed)]).unwrap();
    engine.admit().unwrap();
    assert!(publish_all(&engine).is_empty(), "no held item starts after the failure");
    let v = view(&engine, &run);
    for i in 2..5 {
        let item = step(&v, &format!("each[{i}]"));
        assert_eq!(item.status, StepStatus::Skipped, "each[{i}]");
        assert_eq!(item.error.as_deref(), Some("not started: an earlier item failed"));
    }
    engine.apply(&[answer(&first[1], TaskStatus::Succeeded)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    assert_eq!(
        step(&v, "each").error.as_deref(),
        Some("1 of 5 items failed (3 not started); first, each[0]: boom")
    );
}

#[test]
fn an_item_skipped_earlier_in_an_admission_pass_is_not_dispatched_later_in_it() {
    let dir = tempfile::TempDir::new().unwrap();
    // Two items run, three wait for a place; the third cannot be planned
    // (its task would be too large), which fails the step and skips the
    // last two while the same pass holds them, read before it failed.
    let workflow = "params: {items: ~}\nmax_active_steps: 2\nsteps:\n  - name: each\n    foreach: '${items}'\n    max_concurrent: 10\n    echo: '${index}=${item}${item}${item}'\n";
    let engine = engine_with_small_tasks(dir.path(), &[("held", workflow)]);
    // Small enough for the step's own fields, too large thrice over.
    let big = "x".repeat(1500);
    let items = format!(r#"["a", "b", "{big}", "c", "d"]"#);
    let run = submit(&engine, "held", &[("items", &items)]);
    let first = publish_all(&engine);
    assert_eq!(first.len(), 2, "{:?}", view(&engine, &run));
    engine.apply(&[answer(&first[0], TaskStatus::Succeeded)]).unwrap();
    assert!(
        publish_all(&engine).is_empty(),
        "no task for an item skipped in the same pass"
    );
    let v = view(&engine, &run);
    assert!(
        step(&v, "each[2]")
            .error
            .as_deref()
            .is_some_and(|e| e.contains("exceed 4096 bytes")),
        "{:?}",
        step(&v, "each[2]").error
    );
    for i in [3, 4] {
        let item = step(&v, &format!("each[{i}]"));
        assert_eq!(item.status, StepStatus::Skipped, "each[{i}]");
    }
    engine.apply(&[answer(&first[1], TaskStatus::Succeeded)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    assert_eq!(
        step(&v, "each")
            .error
            .as_deref()
            .map(|e| e.split(';').next().unwrap_or_default()),
        Some("1 of 5 items failed (2 not started)")
    );
}

#[test]
fn items_whose_tasks_pass_the_kept_bodies_budget_in_one_transaction_are_built_again_for_the_outbox() {
    let dir = tempfile::TempDir::new().unwrap();
    let items: Vec<String> = (0..40).map(|i| i.to_string()).collect();
    let wf = format!(
        "params: {{blob: ~}}\nsteps:\n  - name: each\n    foreach: '[{}]'\n    max_concurrent: 40\n    echo: '${{blob}}-${{item}}'\n",
        items.join(", ")
    );
    let engine = engine_over(config_with(dir.path(), &[("big", &wf)]), &dir.path().join("c.db"));
    // 40 tasks of 700 KiB of random letters and digits (about 525 KiB
    // compressed): 21 MB, past the 16 MiB of bodies a transaction keeps.
    let mut rng = fastrand::Rng::with_seed(7);
    let blob: String = (0..700 * 1024).map(|_| rng.alphanumeric()).collect();
    // The outbox has read the database whole: it is handed what is kept...
    engine
        .with_db(|db| {
            let generation = engine.outbox_generation();
            let (rows, full) = db.unpublished_tasks(100, &Default::default(), &|_| false)?;
            assert!(engine.outbox_read(&rows, full, generation));
            Ok::<_, courier_scheduler::db::DbError>(())
        })
        .unwrap();
    // (never on PostgreSQL, where other schedulers write tasks too).
    assert_eq!(engine.take_fresh(100).is_some(), !engine.shares_database());
    let run = submit(&engine, "big", &[("blob", &blob)]);
    // ...but not every body was: it reads the database again.
    assert!(engine.take_fresh(100).is_none());
    let mut tasks = publish_all(&engine);
    assert_eq!(tasks.len(), 40);
    tasks.sort_by_key(|t| t.step.clone());
    for task in &tasks {
        let index = task.step.trim_start_matches("each[").trim_end_matches(']');
        assert_eq!(echo(task), format!("{blob}-{index}"), "{}", task.step);
    }
    let results: Vec<TaskResult> = tasks.iter().map(|t| result(t, TaskStatus::Succeeded, "ok")).collect();
    engine.apply(&results).unwrap();
    assert_eq!(view(&engine, &run).status, RunStatus::Succeeded);
}

#[test]
fn a_runs_view_keeps_foreach_items_outputs_in_item_order_up_to_its_budget() {
    let dir = tempfile::TempDir::new().unwrap();
    let items: Vec<String> = (0..20).map(|i| i.to_string()).collect();
    let wf = format!(
        "steps:\n  - name: each\n    foreach: '[{}]'\n    max_concurrent: 20\n    echo: '${{item}}'\n",
        items.join(", ")
    );
    let engine = engine_over(config_with(dir.path(), &[("items", &wf)]), &dir.path().join("c.db"));
    let run = submit(&engine, "items", &[]);
    // Just under 1 MiB each: 16 of them and the step's own error fit in 16 MiB.
    let mib = 1024 * 1024 - 1024;
    let results: Vec<TaskResult> = publish_all(&engine)
        .iter()
        .map(|t| result(t, TaskStatus::Succeeded, &"i".repeat(mib)))
        .collect();
    engine.apply(&results).unwrap();
    let v = view(&engine, &run);
    let names: Vec<&str> = v.steps.iter().map(|s| s.name.as_str()).collect();
    let expected: Vec<String> = std::iter::once("each".to_string())
        .chain((0..20).map(|i| format!("each[{i}]")))
        .collect();
    assert_eq!(names, expected, "item order, not name order (each[10] after each[9])");
    let left_out: Vec<&str> = v
        .steps
        .iter()
        .filter(|s| s.left_out_bytes.is_some())
        .map(|s| s.name.as_str())
        .collect();
    assert_eq!(left_out, ["each[16]", "each[17]", "each[18]", "each[19]"]);
    assert_eq!(step(&v, "each[15]").output.as_ref().map(String::len), Some(mib));
}

#[test]
fn an_empty_array_succeeds_at_once_and_anything_else_than_an_array_fails_clearly() {
    let dir = tempfile::TempDir::new().unwrap();
    let capped = fan(2, "    max_items: 3\n");
    let engine = engine_over(
        config_with(dir.path(), &[("fan", &fan(2, "")), ("capped", &capped)]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "fan", &[("items", "[]")]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let join = publish_all(&engine);
    assert_eq!((join[0].step.as_str(), echo(&join[0]).as_str()), ("join", "[]"));
    assert_eq!(step(&view(&engine, &run), "each").output.as_deref(), Some("[]"));

    for (workflow, items, error) in [
        (
            "fan",
            r#"{"a": 1}"#,
            r#"foreach: "${plan.json}" gave "{\"a\":1}", which is not a JSON array"#,
        ),
        ("fan", "not json", "the output of step \"plan\" is not JSON"),
        ("capped", "[1, 2, 3, 4]", "foreach: 4 items, more than max_items (3)"),
    ] {
        let run = submit(&engine, workflow, &[("items", items)]);
        let plan = publish_all(&engine);
        engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
        assert!(publish_all(&engine).is_empty(), "no item is dispatched");
        let v = view(&engine, &run);
        assert_eq!(v.status, RunStatus::Failed);
        let e = step(&v, "each").error.clone().unwrap();
        assert!(e.contains(error), "{e}");
    }
}

#[test]
fn items_retry_on_their_own_and_survive_a_restart_before_publishing() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("c.db");
    let retried = fan(3, "    retry: {limit: 1, backoff: 1ms, max_backoff: 1ms}\n");
    let config = || config_with(dir.path(), &[("fan", &retried)]);
    let engine = engine_over(config(), &db);
    let run = submit(&engine, "fan", &[("items", r#"["x", "y"]"#)]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    // Not yet published when the scheduler restarts: rebuilt identically.
    let before: Vec<Task> = due(&engine).into_iter().map(|(t, _)| t).collect();
    drop(engine);
    let engine = engine_over(config(), &db);
    let after = publish_all(&engine);
    assert_eq!(before, after);
    engine
        .apply(&[
            answer(&after[0], TaskStatus::Failed),
            answer(&after[1], TaskStatus::Succeeded),
        ])
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(5));
    let retry = publish_all(&engine);
    assert_eq!(
        (retry[0].step.as_str(), retry[0].attempt, echo(&retry[0]).as_str()),
        ("each[0]", 2, "0=x")
    );
    engine.apply(&[answer(&retry[0], TaskStatus::Succeeded)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(step(&v, "each").output.as_deref(), Some(r#"["0=x","1=y"]"#));
    assert_eq!(step(&v, "each[0]").attempts, 2);
}

#[test]
fn cancelling_a_foreach_step_cancels_its_items_and_their_unpublished_tasks() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("fan", &fan(2, ""))]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "fan", &[("items", "[1, 2, 3]")]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let running = due(&engine);
    assert_eq!(running.len(), 2);
    engine.cancel(&run, Some("each"), "api:test", "enough").unwrap();
    assert!(due(&engine).is_empty(), "the items' tasks are never published");
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Cancelled);
    for name in ["each", "each[0]", "each[1]", "each[2]"] {
        assert_eq!(step(&v, name).status, StepStatus::Cancelled, "{name}");
    }
    assert_eq!(step(&v, "join").status, StepStatus::Skipped);
    // A late result of an item changes nothing.
    let late = engine.apply(&[answer(&running[0].0, TaskStatus::Succeeded)]).unwrap();
    assert_eq!(late.dispatched, 0);
    assert_eq!(view(&engine, &run).status, RunStatus::Cancelled);
}

#[test]
fn cancelling_one_item_leaves_the_others_and_counts_as_its_failure() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("fan", &fan(3, "    continue_on_failure: true\n"))]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "fan", &[("items", "[1, 2, 3]")]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let items = publish_all(&engine);
    engine
        .cancel(&run, Some("each[1]"), "api:test", "not this one")
        .unwrap();
    engine
        .apply(&[
            answer(&items[0], TaskStatus::Succeeded),
            answer(&items[2], TaskStatus::Succeeded),
        ])
        .unwrap();
    let v = view(&engine, &run);
    assert_eq!(step(&v, "each").output.as_deref(), Some(r#"["0=1",null,"2=3"]"#));
    assert_eq!(step(&v, "each[1]").status, StepStatus::Cancelled);
}

/// gate (a condition on a param) → after (skips with it) and always
/// (`depends_on_skipped: run`), and check (a condition on a JSON output).
const CONDITIONS: &str = "params: {mode: ~}
steps:
  - name: plan
    echo: '{\"risky\": true, \"files\": [\"a\", \"b\"]}'
  - name: gate
    depends: [plan]
    when: params.mode == 'deep'
    echo: deep
  - name: after
    depends: [gate]
    echo: 'after ${gate.output}'
  - name: always
    depends: [gate, plan]
    depends_on_skipped: run
    echo: 'always [${gate.output}]'
  - name: check
    depends: [plan]
    when: steps.plan.json.risky && size(steps.plan.json.files) == 2
    echo: checked
";

#[test]
fn a_false_condition_skips_its_step_and_skips_propagate_unless_a_dependent_runs_anyway() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("cond", CONDITIONS)]),
        &dir.path().join("c.db"),
    );
    // False: gate and after skipped, always runs with gate's output empty.
    let run = submit(&engine, "cond", &[("mode", "quick")]);
    drive_echo(&engine);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded, "{v:?}");
    let gate = step(&v, "gate");
    assert_eq!(gate.status, StepStatus::Skipped);
    assert_eq!(gate.error.as_deref(), Some("when: params.mode == 'deep' is false"));
    assert_eq!(step(&v, "after").status, StepStatus::Skipped);
    assert_eq!(
        step(&v, "after").error.as_deref(),
        Some("upstream step \"gate\" was skipped")
    );
    assert_eq!(step(&v, "always").status, StepStatus::Succeeded);
    assert_eq!(step(&v, "check").status, StepStatus::Succeeded);

    // True: everything runs.
    let run = submit(&engine, "cond", &[("mode", "deep")]);
    let mut texts = BTreeMap::new();
    for _ in 0..5 {
        for t in publish_all(&engine) {
            texts.insert(t.step.clone(), echo(&t));
            engine.apply(&[answer(&t, TaskStatus::Succeeded)]).unwrap();
        }
    }
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded);
    assert!(v.steps.iter().all(|s| s.status == StepStatus::Succeeded));
    assert_eq!(texts["always"], "always [deep]");
    assert_eq!(texts["after"], "after deep");
}

#[test]
fn a_condition_that_fails_to_evaluate_fails_its_step_with_the_reason() {
    let dir = tempfile::TempDir::new().unwrap();
    let wf = "steps:
  - name: plan
    echo: 'not json'
  - name: next
    depends: [plan]
    when: steps.plan.json.count > 3
    echo: x
  - name: root
    when: 'true'
    echo: root
";
    let engine = engine_over(config_with(dir.path(), &[("bad", wf)]), &dir.path().join("c.db"));
    let run = submit(&engine, "bad", &[]);
    drive_echo(&engine);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    assert_eq!(
        step(&v, "root").status,
        StepStatus::Succeeded,
        "a first step's condition is evaluated too"
    );
    let e = step(&v, "next").error.clone().unwrap();
    assert!(
        e.starts_with("when: the condition \"steps.plan.json.count > 3\" failed"),
        "{e}"
    );
}

const INNER: &str = "params: {topic: ~}
steps:
  - name: a
    echo: 'a:${topic}'
  - name: merge
    depends: [a]
    echo: 'merged ${a.output}'
";

const OUTER: &str = "params: {topic: ~}
steps:
  - name: prep
    echo: 'about ${topic}'
  - name: child
    depends: [prep]
    workflow: {name: inner, params: {topic: '${prep.output}'}}
  - name: use
    depends: [child]
    echo: 'got ${child.json.merge}'
";

fn runs_of(engine: &Engine, workflow: &str) -> Vec<RunView> {
    engine
        .with_db(|db| db.runs(Some(workflow), None, None, 100))
        .unwrap()
        .into_iter()
        .map(|r| view(engine, &r.id))
        .collect()
}

#[test]
fn a_sub_workflows_outputs_reach_its_parent_step_as_json() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("inner", INNER), ("outer", OUTER)]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "outer", &[("topic", "queues")]);
    drive_echo(&engine);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded, "{v:#?}");
    let children = runs_of(&engine, "inner");
    assert_eq!(children.len(), 1);
    let child = &children[0];
    assert_eq!(
        (child.parent_run.as_deref(), child.parent_step.as_deref()),
        (Some(run.as_str()), Some("child"))
    );
    assert_eq!(child.params.value()["topic"], "about queues");
    let step = step(&v, "child");
    assert_eq!(
        step.output.as_deref(),
        Some(r#"{"a":"a:about queues","merge":"merged a:about queues"}"#)
    );
    assert_eq!(step.worker.as_deref(), Some(format!("run {}", child.id).as_str()));
    let used = v.steps.iter().find(|s| s.name == "use").unwrap();
    assert_eq!(used.output.as_deref(), Some("got merged a:about queues"));
}

#[test]
fn a_failed_child_fails_its_parent_step_and_cancelling_the_parent_cancels_the_child() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("inner", INNER), ("outer", OUTER)]),
        &dir.path().join("c.db"),
    );
    // The child's first step fails.
    let run = submit(&engine, "outer", &[("topic", "x")]);
    let prep = publish_all(&engine);
    engine.apply(&[answer(&prep[0], TaskStatus::Succeeded)]).unwrap();
    let a = publish_all(&engine);
    assert_eq!(a[0].workflow, "inner");
    engine.apply(&[answer(&a[0], TaskStatus::Failed)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    let child_id = runs_of(&engine, "inner")[0].id.clone();
    assert_eq!(
        step(&v, "child").error.as_deref(),
        Some(format!("child run {child_id} of workflow \"inner\" failed: step(s) failed: a").as_str())
    );
    assert_eq!(step(&v, "use").status, StepStatus::Skipped);

    // Cancelling the parent while the child runs cancels the child.
    let run = submit(&engine, "outer", &[("topic", "y")]);
    let prep = publish_all(&engine);
    engine.apply(&[answer(&prep[0], TaskStatus::Succeeded)]).unwrap();
    let a = publish_all(&engine);
    engine.cancel(&run, None, "api:test", "stop").unwrap();
    let child = view(&engine, &a[0].run_id.to_string());
    assert_eq!(child.status, RunStatus::Cancelled);
    assert_eq!(child.cancelled_by.as_deref(), Some("parent"));
    assert!(
        child
            .error
            .as_deref()
            .unwrap()
            .starts_with(&format!("its parent run {run} was cancelled"))
    );
    // Cancelling the step alone cancels its child too; the parent ends cancelled.
    let run = submit(&engine, "outer", &[("topic", "z")]);
    let prep = publish_all(&engine);
    engine.apply(&[answer(&prep[0], TaskStatus::Succeeded)]).unwrap();
    let a = publish_all(&engine);
    engine.cancel(&run, Some("child"), "api:test", "not needed").unwrap();
    assert_eq!(view(&engine, &a[0].run_id.to_string()).status, RunStatus::Cancelled);
    let v = view(&engine, &run);
    assert_eq!(
        (v.status, step(&v, "child").status),
        (RunStatus::Cancelled, StepStatus::Cancelled)
    );
    // A late result of the child's task changes nothing.
    let late = engine.apply(&[answer(&a[0], TaskStatus::Succeeded)]).unwrap();
    assert_eq!(late.dispatched, 0);
}

#[test]
fn sub_workflows_nest_at_most_eight_deep_even_through_a_config_changed_under_a_run() {
    // A config nesting deeper is refused at load; one changed under a
    // running run can still make its chain deeper: that stops at run time.
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("c.db");
    // w<i> starts w<next> (w7 after its gate), or is a leaf.
    let wf = |i: usize, next: Option<usize>| -> (String, String) {
        let gate = if i == 7 { "  - name: gate\n    echo: go\n" } else { "" };
        let body = match next {
            Some(n) if i == 7 => format!("  - name: down\n    depends: [gate]\n    workflow: {{name: w{n}}}\n"),
            Some(n) => format!("  - name: down\n    workflow: {{name: w{n}}}\n"),
            None => "  - name: leaf\n    echo: leaf\n".to_string(),
        };
        (format!("w{i}"), format!("steps:\n{gate}{body}"))
    };
    let config = |name: &str, chain: &[(String, String)]| {
        let files: Vec<(&str, &str)> = chain.iter().map(|(n, y)| (n.as_str(), y.as_str())).collect();
        let at = dir.path().join(name);
        std::fs::create_dir_all(&at).unwrap();
        config_with(&at, &files)
    };
    // Before: w0 -> ... -> w8, a leaf; the run waits on w7's gate.
    let before: Vec<_> = (0..9).map(|i| wf(i, (i < 8).then_some(i + 1))).collect();
    let run = submit(&engine_over(config("before", &before), &db), "w0", &[]);
    // After: w8 starts w9; w0 is a leaf now (its child is started already),
    // so the config nests eight deep and loads.
    let after: Vec<_> = (0..10).map(|i| wf(i, (i > 0 && i < 9).then_some(i + 1))).collect();
    let engine = engine_over(config("after", &after), &db);
    drive_echo(&engine);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    let deepest = runs_of(&engine, "w8");
    assert_eq!(deepest.len(), 1);
    assert_eq!(
        step(&deepest[0], "down").error.as_deref(),
        Some("sub-workflow: sub-workflows nest at most 8 deep: not starting \"w9\" from a run 8 deep")
    );
    assert!(runs_of(&engine, "w9").is_empty());
}

#[test]
fn a_structured_output_is_checked_by_the_scheduler_too_and_kept_as_json_in_a_foreach() {
    let dir = tempfile::TempDir::new().unwrap();
    let wf = "steps:
  - name: review
    foreach: '[\"a\", \"b\", \"c\"]'
    continue_on_failure: true
    agent:
      model: offline
      prompt: 'review ${item}'
      tools: [output]
      output_schema: {type: object, properties: {severity: {enum: [low, high]}}, required: [severity]}
  - name: sum
    depends: [review]
    when: steps.review.json[0].severity == 'high' && steps.review.json[1] == null
    echo: '${review.json.0.severity}'
";
    let engine = engine_over(config_with(dir.path(), &[("review", wf)]), &dir.path().join("c.db"));
    let run = submit(&engine, "review", &[]);
    let items = publish_all(&engine);
    assert_eq!(items.len(), 3);
    let StepRun::Agent(spec) = &items[0].spec.run else {
        panic!("an agent step")
    };
    assert!(spec.output_schema.as_deref().unwrap().contains("severity"));
    // A worker that did not check (an old one) says it succeeded anyway.
    engine
        .apply(&[
            result(&items[0], TaskStatus::Succeeded, r#"{"severity": "high"}"#),
            result(&items[1], TaskStatus::Succeeded, r#"{"severity": "urgent"}"#),
            result(&items[2], TaskStatus::Succeeded, r#"{"severity": "low"}"#),
        ])
        .unwrap();
    let v = view(&engine, &run);
    let bad = step(&v, "review[1]");
    assert_eq!(bad.status, StepStatus::Failed);
    assert!(
        bad.error
            .as_deref()
            .unwrap()
            .starts_with("the output does not match the step's output_schema: at /severity"),
        "{:?}",
        bad.error
    );
    assert_eq!(
        step(&v, "review").output.as_deref(),
        Some(r#"[{"severity":"high"},null,{"severity":"low"}]"#)
    );
    let sum = publish_all(&engine);
    assert_eq!(echo(&sum[0]), "high");
}

#[test]
fn a_step_that_runs_despite_a_skip_still_starts_after_a_restart() {
    let dir = tempfile::TempDir::new().unwrap();
    let db = dir.path().join("c.db");
    let wf = "steps:
  - name: slow
    echo: slow
  - name: gate
    when: 'false'
    echo: never
  - name: always
    depends: [gate, slow]
    depends_on_skipped: run
    echo: 'always [${gate.output}] after ${slow.output}'
";
    let config = || config_with(dir.path(), &[("skip", wf)]);
    let engine = engine_over(config(), &db);
    let run = submit(&engine, "skip", &[]);
    let slow = publish_all(&engine);
    assert_eq!(slow.len(), 1);
    assert_eq!(step(&view(&engine, &run), "gate").status, StepStatus::Skipped);
    // Restarted while slow runs: the skip still counts as done.
    drop(engine);
    let engine = engine_over(config(), &db);
    engine.reconcile().unwrap();
    assert!(publish_all(&engine).is_empty(), "always waits for slow");
    engine.apply(&[answer(&slow[0], TaskStatus::Succeeded)]).unwrap();
    let always = publish_all(&engine);
    assert_eq!(echo(&always[0]), "always [] after slow");
    engine.apply(&[answer(&always[0], TaskStatus::Succeeded)]).unwrap();
    assert_eq!(view(&engine, &run).status, RunStatus::Succeeded);
}

#[test]
fn a_pending_item_cancelled_before_it_starts_is_passed_over_and_max_concurrent_holds() {
    let dir = tempfile::TempDir::new().unwrap();
    let engine = engine_over(
        config_with(dir.path(), &[("fan", &fan(1, "    continue_on_failure: true\n"))]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "fan", &[("items", "[\"a\", \"b\", \"c\"]")]);
    let plan = publish_all(&engine);
    engine.apply(&[answer(&plan[0], TaskStatus::Succeeded)]).unwrap();
    let first = publish_all(&engine);
    assert_eq!(first.len(), 1);
    // each[2] has not started: cancelled now, it never will.
    engine
        .cancel(&run, Some("each[2]"), "api:test", "not that one")
        .unwrap();
    assert!(publish_all(&engine).is_empty(), "max_concurrent 1: each[0] still runs");
    engine.apply(&[answer(&first[0], TaskStatus::Succeeded)]).unwrap();
    let second = publish_all(&engine);
    assert_eq!(second.iter().map(|t| t.step.as_str()).collect::<Vec<_>>(), ["each[1]"]);
    engine.apply(&[answer(&second[0], TaskStatus::Succeeded)]).unwrap();
    let join = publish_all(&engine);
    assert_eq!(echo(&join[0]), r#"["0=a","1=b",null]"#);
    engine.apply(&[answer(&join[0], TaskStatus::Succeeded)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded, "{v:#?}");
    assert_eq!(step(&v, "each[2]").status, StepStatus::Cancelled);
    assert_eq!(step(&v, "each[2]").attempts, 0);
    let each = step(&v, "each");
    assert_eq!(
        each.error.as_deref(),
        Some("1 of 3 items failed; first, each[2]: not that one (null in the output)")
    );
}

#[test]
fn an_item_of_an_agent_step_may_propose_memory() {
    let dir = tempfile::TempDir::new().unwrap();
    let wf = "steps:
  - name: learn
    foreach: '[1, 2]'
    agent: {model: offline, prompt: 'learn ${item}', tools: [output, propose_memory_update]}
";
    let engine = engine_over(config_with(dir.path(), &[("learn", wf)]), &dir.path().join("c.db"));
    let run = submit(&engine, "learn", &[]);
    let items = publish_all(&engine);
    let results: Vec<TaskResult> = items
        .iter()
        .map(|t| TaskResult {
            memory_updates: vec![courier_wire::MemoryUpdate {
                target: courier_wire::MemoryTarget::Workflow,
                append: format!("- learned from {}\n", t.step),
            }],
            ..result(t, TaskStatus::Succeeded, "ok")
        })
        .collect();
    let applied = engine.apply(&results).unwrap();
    assert!(applied.refused.is_empty(), "{:?}", applied.refused);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded, "{v:#?}");
    let memory = std::fs::read_to_string(dir.path().join("config/agents/memory/workflows/learn/MEMORY.md")).unwrap();
    assert!(
        memory.contains("- learned from learn[0]") && memory.contains("- learned from learn[1]"),
        "{memory}"
    );
}

#[test]
fn a_child_ended_by_admission_still_settles_its_parent_step() {
    let dir = tempfile::TempDir::new().unwrap();
    // Every step goes through admission (a pool limit); c2's only step is a
    // foreach whose item cannot be planned: admission fails it, ending c2.
    let c1 = "steps:\n  - name: one\n    echo: one\n";
    let c2 = "steps:\n  - name: each\n    foreach: '[{\"p\": 1}]'\n    echo: '${item.path}'\n";
    let outer = "steps:
  - name: a
    workflow: {name: c1}
  - name: b
    depends: [a]
    workflow: {name: c2}
";
    let config = config_with(dir.path(), &[("c1", c1), ("c2", c2), ("outer", outer)]);
    let limits = EngineLimits {
        pool_in_flight: BTreeMap::from([("default".to_string(), 10)]),
        ..EngineLimits::default()
    };
    let engine = Engine::new(config, support::store(&dir.path().join("c.db")), limits);
    let run = submit(&engine, "outer", &[]);
    drive_echo(&engine);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed, "{v:#?}");
    let b = step(&v, "b");
    assert_eq!(b.status, StepStatus::Failed);
    assert!(
        b.error.as_deref().unwrap().contains("of workflow \"c2\" failed"),
        "{b:?}"
    );
}

#[test]
fn a_childs_spending_counts_against_its_parents_budget() {
    let dir = tempfile::TempDir::new().unwrap();
    let child = "steps:\n  - name: think\n    agent: {model: offline, prompt: p, tools: [output]}\n  - name: more\n    depends: [think]\n    echo: more\n";
    let (engine, run, think) = child_over_budget(dir.path(), child);
    let v = view(&engine, &run);
    assert_eq!(
        (v.status, v.cancelled_by.as_deref()),
        (RunStatus::Cancelled, Some("budget")),
        "{v:#?}"
    );
    let child = view(&engine, &think[0].run_id.to_string());
    assert_eq!(
        (child.status, child.cancelled_by.as_deref()),
        (RunStatus::Cancelled, Some("parent"))
    );
    assert!(publish_all(&engine).is_empty(), "the child's next step never runs");
}

#[test]
fn a_child_that_ended_in_a_batch_is_not_cancelled_by_its_parent_later_in_it() {
    let dir = tempfile::TempDir::new().unwrap();
    let child = "steps:\n  - name: only\n    echo: done\n";
    let parent = "budget: {tokens: 100}\nsteps:\n  - name: c\n    workflow: {name: child}\n  - name: think\n    agent: {model: offline, prompt: p, tools: [output]}\n";
    let engine = engine_over(
        config_with(dir.path(), &[("child", child), ("parent", parent)]),
        &dir.path().join("c.db"),
    );
    let run = submit(&engine, "parent", &[]);
    let tasks = publish_all(&engine);
    let task = |step: &str| tasks.iter().find(|t| t.step == step).unwrap();
    // One batch: the child's last step, then the parent's agent step
    // spending past the parent's budget.
    let spent = spending(task("think"), 160);
    let applied = engine
        .apply(&[result(task("only"), TaskStatus::Succeeded, "done"), spent])
        .unwrap();
    let child = view(&engine, &task("only").run_id.to_string());
    assert_eq!((child.status, child.cancelled_by), (RunStatus::Succeeded, None));
    let v = view(&engine, &run);
    assert_eq!(
        (v.status, v.cancelled_by.as_deref()),
        (RunStatus::Cancelled, Some("budget"))
    );
    assert_eq!((applied.finished_runs, applied.cancelled_runs), (2, 1));
}

#[test]
fn a_child_whose_last_step_spends_past_its_parents_budget_ends_before_the_parent_is_cancelled() {
    let dir = tempfile::TempDir::new().unwrap();
    let child = "steps:\n  - name: think\n    agent: {model: offline, prompt: p, tools: [output]}\n";
    let (engine, run, think) = child_over_budget(dir.path(), child);
    // The child's work is done: it succeeded; its spending cancels the parent.
    let child = view(&engine, &think[0].run_id.to_string());
    assert_eq!((child.status, child.cancelled_by), (RunStatus::Succeeded, None));
    let v = view(&engine, &run);
    assert_eq!(
        (v.status, v.cancelled_by.as_deref()),
        (RunStatus::Cancelled, Some("budget"))
    );
}

#[test]
fn what_a_cancelled_step_spent_afterwards_still_cancels_its_run_over_budget() {
    let dir = tempfile::TempDir::new().unwrap();
    let wf = "budget: {tokens: 100}\nsteps:\n  - name: think\n    agent: {model: offline, prompt: p, tools: [output]}\n  - name: other\n    echo: o\n";
    let engine = engine_over(config_with(dir.path(), &[("spender", wf)]), &dir.path().join("c.db"));
    let run = submit(&engine, "spender", &[]);
    let tasks = publish_all(&engine);
    let think = tasks.iter().find(|t| t.step == "think").unwrap();
    engine.cancel(&run, Some("think"), "api:test", "not needed").unwrap();
    assert_eq!(view(&engine, &run).status, RunStatus::Running, "`other` goes on");
    // The stopped step's late result reports what it had spent by then.
    engine.apply(&[spending(think, 160)]).unwrap();
    let v = view(&engine, &run);
    assert_eq!(
        (v.status, v.cancelled_by.as_deref(), v.error.as_deref()),
        (
            RunStatus::Cancelled,
            Some("budget"),
            Some("budget exceeded: 160 tokens used, the budget is 100")
        )
    );
    assert_eq!(step(&v, "think").status, StepStatus::Cancelled);
}

#[test]
fn a_childs_outputs_that_grow_past_a_tasks_size_when_escaped_fail_the_parent_step() {
    let dir = tempfile::TempDir::new().unwrap();
    let child = "steps:\n  - name: only\n    echo: x\n";
    let parent = "steps:\n  - name: c\n    workflow: {name: child}\n";
    let engine = engine_with_small_tasks(dir.path(), &[("child", child), ("parent", parent)]);
    let run = submit(&engine, "parent", &[]);
    let only = publish_all(&engine);
    // 1,000 bytes, each escaped as six in JSON.
    engine
        .apply(&[result(&only[0], TaskStatus::Succeeded, &"\u{1}".repeat(1000))])
        .unwrap();
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Failed);
    assert_eq!(
        step(&v, "c").error.as_deref(),
        Some("the child run's outputs together are 6011 bytes as JSON: more than a task may carry (4096 bytes)")
    );
}

#[test]
fn a_runs_list_shows_each_runs_own_spending_as_its_page_does() {
    let dir = tempfile::TempDir::new().unwrap();
    let child = "steps:\n  - name: think\n    agent: {model: offline, prompt: p, tools: [output]}\n";
    let (engine, run, think) = child_over_budget(dir.path(), child);
    let child = think[0].run_id.to_string();
    let listed = engine.with_db(|db| db.runs(None, None, None, 10)).unwrap();
    for id in [&run, &child] {
        let page = view(&engine, id);
        let row = listed.iter().find(|r| &r.id == id).unwrap();
        assert_eq!(
            (row.input_tokens, row.output_tokens, row.cost),
            (page.input_tokens, page.output_tokens, page.cost),
            "{id}"
        );
    }
    // The child's steps spent; the parent's own steps did not (its budget
    // counts the child's spending, its totals do not).
    let own = |id: &str| {
        listed
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.input_tokens, r.output_tokens))
    };
    assert_eq!(own(&child), Some((150, 10)));
    assert_eq!(own(&run), Some((0, 0)));
}

/// An agent step's success that reports `tokens` used (past a budget of 100).
fn spending(task: &Task, tokens: u64) -> TaskResult {
    TaskResult {
        model: Some("scripted/offline-demo".into()),
        usage: Some(courier_wire::TokenUsage {
            input_tokens: tokens - 10,
            output_tokens: 10,
        }),
        ..result(task, TaskStatus::Succeeded, "thought")
    }
}

/// A parent with a budget of 100 tokens running `child`, whose first step
/// (`think`, an agent step) then reports 160: the engine, the parent run,
/// and the child's first tasks.
fn child_over_budget(dir: &std::path::Path, child: &str) -> (Engine, String, Vec<Task>) {
    let parent = "budget: {tokens: 100}\nsteps:\n  - name: c\n    workflow: {name: child}\n";
    let engine = engine_over(
        config_with(dir, &[("child", child), ("parent", parent)]),
        &dir.join("c.db"),
    );
    let run = submit(&engine, "parent", &[]);
    let think = publish_all(&engine);
    engine.apply(&[spending(&think[0], 160)]).unwrap();
    (engine, run, think)
}

#[test]
fn an_item_that_cannot_be_planned_fails_and_frees_its_place_for_the_next() {
    let dir = tempfile::TempDir::new().unwrap();
    // An item holding a NUL cannot become a process argument: its task
    // cannot be built. One item at a time, failures tolerated.
    let each = "params: {items: ~}\nsteps:\n  - name: each\n    foreach: '${items}'\n    max_concurrent: 1\n    continue_on_failure: true\n    command: [\"echo\", \"${item}\"]\n";
    let engine = engine_over(config_with(dir.path(), &[("each", each)]), &dir.path().join("c.db"));
    let run = submit(&engine, "each", &[("items", r#"["a\u0000", "b", "c"]"#)]);
    // The first item failed at planning; the next one was sent in its place.
    let sent = publish_all(&engine);
    assert_eq!(sent.iter().map(|t| t.step.as_str()).collect::<Vec<_>>(), ["each[1]"]);
    engine.apply(&[result(&sent[0], TaskStatus::Succeeded, "b")]).unwrap();
    drive(&engine, |_| TaskStatus::Succeeded);
    let v = view(&engine, &run);
    assert_eq!(v.status, RunStatus::Succeeded, "{:?}", v.error);
    let first = step(&v, "each[0]");
    assert_eq!(first.status, StepStatus::Failed);
    assert!(first.error.as_deref().unwrap().contains("NUL"), "{:?}", first.error);
}
