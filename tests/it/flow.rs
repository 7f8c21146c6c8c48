//! The workflow language end to end, with real workers on the real broker:
//! `foreach` items spread over workers and bounded by `max_concurrent`
//! (measured on the workers), cancelling a foreach stops its items, and a
//! step kind from a newer scheduler is answered "upgrade it", not dead-lettered.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use courier_amqp::{Header, Names};
use courier_wire::headers;
use courier_wire::{Frame, Limits, Task, decode, encode};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::cluster::Cluster;

/// Items that append their start and end (nanoseconds) to `log`, sleep,
/// then print their item.
const FAN: &str = r#"params: {count: '12', log: ~}
steps:
  - name: plan
    command: [sh, -c, 'seq 0 $$(($$1 - 1)) | paste -sd, | sed "s/.*/[&]/"', plan, '${count}']
  - name: each
    depends: [plan]
    foreach: '${plan.json}'
    max_concurrent: 3
    env: {ITEM: '${item}', LOG: '${log}'}
    command: [sh, -c, 'echo "start $$(date +%s%N)" >> "$$LOG"; sleep 0.4; echo "end $$(date +%s%N)" >> "$$LOG"; echo "item $$ITEM"']
  - name: join
    depends: [each]
    echo: '${each.output}'
"#;

/// The most lines of `log` between a `start` and its `end` at any moment.
fn peak_overlap(log: &str) -> usize {
    let mut events: Vec<(u128, i32)> = log
        .lines()
        .filter_map(|l| {
            let (what, at) = l.split_once(' ')?;
            Some((at.trim().parse().ok()?, if what == "start" { 1 } else { -1 }))
        })
        .collect();
    // An end before a start at the same instant.
    events.sort();
    let (mut now, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        now += delta;
        peak = peak.max(now);
    }
    usize::try_from(peak).unwrap_or(0)
}

#[test]
fn foreach_items_spread_over_workers_never_more_than_max_concurrent_and_come_back_in_order() {
    let cluster = Cluster::builder()
        .workers(3)
        .concurrency(2)
        .workflow("fan", FAN)
        .start();
    let log = cluster.data_dir.join("items.log");
    let id = cluster.submit("fan", &[("log", log.to_str().unwrap())]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cluster.logs());
    let expected: Vec<String> = (0..12).map(|i| format!("item {i}")).collect();
    let each = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "each")
        .unwrap();
    let outputs: Vec<String> = serde_json::from_str(each["output"].as_str().unwrap()).unwrap();
    assert_eq!(outputs, expected);
    let joined = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "join")
        .unwrap();
    assert_eq!(joined["output"], each["output"]);
    // Every item its own step, run once, by more than one worker.
    let items: Vec<&Value> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["name"].as_str().unwrap().starts_with("each["))
        .collect();
    assert_eq!(items.len(), 12);
    assert!(items.iter().all(|s| s["status"] == "succeeded" && s["attempts"] == 1));
    let workers: std::collections::BTreeSet<&str> = items.iter().map(|s| s["worker"].as_str().unwrap()).collect();
    assert!(workers.len() > 1, "{workers:?}");
    // Measured on the workers: 3 at a time (6 slots were free).
    let log = std::fs::read_to_string(&log).unwrap();
    assert_eq!(log.lines().count(), 24, "{log}");
    let peak = peak_overlap(&log);
    assert!((2..=3).contains(&peak), "peak {peak} items at once\n{log}");
}

#[test]
fn cancelling_a_foreach_step_stops_its_running_items_on_the_workers() {
    let slow = "steps:
  - name: each
    foreach: '[1, 2, 3, 4, 5, 6]'
    max_concurrent: 4
    command: [sleep, '60']
  - name: after
    depends: [each]
    echo: never
";
    let cluster = Cluster::builder()
        .workers(2)
        .concurrency(2)
        .workflow("slow", slow)
        .start();
    let id = cluster.submit("slow", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while (1..=2)
        .map(|w| cluster.worker_log(&format!("w{w}")).matches("running step").count())
        .sum::<usize>()
        < 4
    {
        assert!(Instant::now() < deadline, "the items never started\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let asked = Instant::now();
    let response = cluster
        .http(reqwest::Method::POST, &format!("/api/runs/{id}/cancel"))
        .json(&json!({"step": "each", "reason": "enough"}))
        .send()
        .unwrap();
    assert!(response.status().is_success(), "{:?}", response.text());
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "cancelled", "{run:#}");
    // The four running items are stopped, not left to sleep their minute.
    let deadline = Instant::now() + Duration::from_secs(10);
    while (1..=2)
        .map(|w| {
            cluster
                .worker_log(&format!("w{w}"))
                .matches("step finished status=\"cancelled\"")
                .count()
        })
        .sum::<usize>()
        < 4
    {
        assert!(
            Instant::now() < deadline,
            "the items were not stopped\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("items stopped {:?} after the cancel", asked.elapsed());
    let statuses: Vec<(&str, &str)> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    assert_eq!(statuses[0], ("each", "cancelled"));
    assert!(statuses[1..7].iter().all(|(_, s)| *s == "cancelled"), "{statuses:?}");
    assert_eq!(statuses.last(), Some(&("after", "skipped")));
}

/// A task as a newer scheduler writes it, with a step kind this build
/// does not know.
#[derive(Serialize, Deserialize)]
struct FutureTask {
    task_id: uuid::Uuid,
    run_id: uuid::Uuid,
    workflow: String,
    step: String,
    attempt: u32,
    spec: FutureSpec,
    upstream: BTreeMap<String, String>,
    deadline_unix_ms: u64,
    #[serde(with = "serde_bytes")]
    snapshot: Vec<u8>,
    pool: String,
}

#[derive(Serialize, Deserialize)]
struct FutureSpec {
    #[serde(with = "humantime_serde")]
    timeout: Duration,
    run: BTreeMap<String, BTreeMap<String, String>>,
}

impl Frame for FutureTask {
    const KIND: &'static str = "task";
    const MAGIC: [u8; 4] = Task::MAGIC;
    const VERSION: u8 = Task::VERSION;
    const MIN_VERSION: u8 = Task::MIN_VERSION;
}

#[test]
fn a_step_kind_from_a_newer_scheduler_fails_with_upgrade_it_and_is_not_dead_lettered() {
    let yaml = "steps:\n  - name: look\n    command: [\"sh\", \"-c\", \"echo ran\"]\n";
    // No worker yet: the real task waits in its queue and is swapped.
    let mut cluster = Cluster::builder().workers(0).tap().workflow("look", yaml).start();
    let id = cluster.submit("look", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let (task, _) = loop {
        let found = cluster.tapped().into_iter().find_map(|body| {
            let task = decode::<Task>(&body, &Limits::default()).ok()?;
            Some((task, body))
        });
        if let Some(found) = found {
            break found;
        }
        assert!(Instant::now() < deadline, "no task tapped\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(200));
    };
    let names = Names::new(cluster.namespace.clone());
    for queue in names.pool_queues("default") {
        let purged = std::process::Command::new("rabbitmqctl")
            .args(["purge_queue", &queue])
            .output()
            .unwrap();
        assert!(purged.status.success(), "{purged:?}");
    }
    let future = FutureTask {
        task_id: task.task_id,
        run_id: task.run_id,
        workflow: task.workflow.clone(),
        step: task.step.clone(),
        attempt: task.attempt,
        spec: FutureSpec {
            timeout: task.spec.timeout,
            run: BTreeMap::from([(
                "browser".to_string(),
                BTreeMap::from([("url".to_string(), "https://example.com".to_string())]),
            )]),
        },
        upstream: BTreeMap::new(),
        deadline_unix_ms: task.deadline_unix_ms,
        snapshot: task.snapshot.clone(),
        pool: task.pool.clone(),
    };
    let body = encode(&future, &Limits::default()).unwrap();
    let hash = courier_wire::ContentHash::of(&task.snapshot).to_hex();
    cluster.publish(
        &names.tasks_exchange(),
        "default",
        &body,
        (&task.task_id.to_string(), &task.run_id.to_string()),
        vec![(headers::SNAPSHOT_HASH, Header::Str(hash))],
    );
    cluster.start_worker("w1", 1);
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "failed", "{run:#}");
    assert_eq!(
        run["steps"][0]["error"],
        "this worker does not support step kind \"browser\"; upgrade it"
    );
    assert_eq!(cluster.dead_depth(), 0, "not dead-lettered as poison");
}

/// The step named `name` of a run, as the API shows it.
fn step_of<'a>(run: &'a Value, name: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no step {name} in {run:#}"))
}

#[test]
fn the_triage_example_plans_fans_out_gates_and_combines_offline() {
    let cluster = Cluster::builder().workers(2).start();
    let id = cluster.submit("triage", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while step_of(&cluster.run(&id), "approve")["status"] != "waiting_approval" {
        assert!(
            Instant::now() < deadline,
            "never reached the approval\n{:#}\n{}",
            cluster.run(&id),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let run = cluster.run(&id);
    // The plan's three issues, each reviewed by its own agent step.
    let reviews: Vec<Value> = serde_json::from_str(step_of(&run, "review")["output"].as_str().unwrap()).unwrap();
    assert_eq!(reviews.len(), 3);
    assert!(reviews.iter().all(|r| r["severity"] == "high"), "{reviews:?}");
    for i in 0..3 {
        let item = step_of(&run, &format!("review[{i}]"));
        assert_eq!(
            (item["status"].as_str(), item["model"].as_str()),
            (Some("succeeded"), Some("scripted/triage-reviewer"))
        );
    }
    // High severity found: the condition held.
    assert_eq!(step_of(&run, "urgent")["status"], "succeeded");
    let waiting_on = step_of(&run, "approve")["waiting_on"].as_str().unwrap();
    assert!(
        waiting_on.starts_with("approval: Publish the triage of [\"Login fails"),
        "{waiting_on}"
    );
    let (out, _, stderr) =
        crate::support::run(
            cluster
                .courier()
                .args(["approve", &id, "approve", "--comment", "ship it"]),
        );
    assert!(out.status.success(), "{stderr}");
    let run = cluster.wait_run(&id, Duration::from_secs(20));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let published = step_of(&run, "publish")["output"].as_str().unwrap();
    assert!(
        published.starts_with("Triage (approved: ship it): [{\"severity\":\"high\""),
        "{published}"
    );
}
