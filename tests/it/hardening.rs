//! The trust model, attacked from outside: secrets a step could read, forged
//! and replayed messages, junk carrying real ids, an unauthenticated API, and
//! the faults the outside testing of the first wave found.

use std::time::{Duration, Instant};

use courier_amqp::{Header, Names};
use courier_wire::{
    Limits, MemoryTarget, MemoryUpdate, SigningKey, Task, TaskResult, TaskStatus, decode, encode, headers,
};
use nix::sys::signal::{Signal, kill};
use serde_json::Value;

use crate::cluster::Cluster;
use crate::reliability::{dead_reasons, now_ms, rabbitmqctl, wait_dead};
use crate::support::{courier, run};

const KEY: &str = "it-hardening-signing-key-5b2e";

/// A RabbitMQ user with a distinctive password, deleted on drop.
struct BrokerUser {
    name: String,
    password: String,
}

impl BrokerUser {
    fn new() -> Self {
        let name = format!("it-{}", uuid::Uuid::now_v7().simple());
        let password = format!("pw-{}", uuid::Uuid::now_v7().simple());
        rabbitmqctl(&["add_user", &name, &password]);
        rabbitmqctl(&["set_permissions", "-p", "/", &name, ".*", ".*", ".*"]);
        Self { name, password }
    }

    fn url(&self) -> String {
        format!("amqp://{}:{}@127.0.0.1:5672/%2f", self.name, self.password)
    }
}

impl Drop for BrokerUser {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["delete_user", &self.name])
            .output();
    }
}

/// The first task the tap saw for `step`.
fn tapped_task(cluster: &Cluster, step: &str) -> (Task, Vec<u8>) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for body in cluster.tapped() {
            if body.starts_with(b"CTSK")
                && let Ok(task) = decode::<Task>(&body, &Limits::default())
                && task.step == step
            {
                return (task, body);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no task for {step} tapped\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const PEEK: &str = r#"steps:
  - name: peek
    command:
      - sh
      - -c
      - |
        env
        echo ---environ---
        tr '\0' '\n' < /proc/$$PPID/environ 2>&1
        echo ---cmdline---
        tr '\0' ' ' < /proc/$$PPID/cmdline 2>&1
        echo
        echo ---stdin---
        head -c 100000 /proc/$$PPID/fd/0 2>&1
        echo ---every-process---
        for p in /proc/[0-9]*; do tr '\0' '\n' < $$p/environ 2>/dev/null; tr '\0' ' ' < $$p/cmdline 2>/dev/null; done
        true
"#;

#[test]
fn a_command_step_sees_none_of_the_workers_secrets() {
    let user = BrokerUser::new();
    // Secrets of this test alone: other tests' processes cannot hold them.
    let key = format!("signing-{}", uuid::Uuid::now_v7().simple());
    let api_key = format!("sk-{}", uuid::Uuid::now_v7().simple());
    let token = format!("token-{}", uuid::Uuid::now_v7().simple());
    let cluster = Cluster::builder()
        .workers(1)
        .workflow("peek", PEEK)
        .env("COURIER_AMQP_URL", &user.url())
        .env("COURIER_SIGNING_KEY", &key)
        .env("COURIER_API_TOKEN", &token)
        .env("OPENAI_API_KEY", &api_key)
        .env("IT_PASSED", "passed-through")
        .env("IT_NOT_PASSED", "kept-back")
        .env("COURIER_WORKER_ENV_PASSTHROUGH", "IT_PASSED")
        .start();
    let id = cluster.submit("peek", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let output = run["steps"][0]["output"].as_str().unwrap();
    // Not in the step's environment, nor in what any process on the machine
    // (the worker and the scheduler included) shows in /proc.
    for secret in [key.as_str(), api_key.as_str(), token.as_str(), user.password.as_str()] {
        assert!(!output.contains(secret), "a secret reached the step:\n{output}");
    }
    let (own, _) = output.split_once("---every-process---").unwrap();
    assert!(!own.contains("COURIER_"), "{own}");
    assert!(!own.contains("amqp://"), "{own}");
    assert!(!own.contains("kept-back"), "{own}");
    let env: Vec<&str> = own.split("---environ---").next().unwrap().lines().collect();
    let names: Vec<&str> = env.iter().filter_map(|l| l.split('=').next()).collect();
    assert!(env.contains(&"IT_PASSED=passed-through"), "{own}");
    for name in &names {
        assert!(
            [
                "PATH",
                "HOME",
                "LANG",
                "LC_ALL",
                "LC_CTYPE",
                "TZ",
                "TMPDIR",
                "IT_PASSED",
                "PWD",
                "SHLVL",
                "_"
            ]
            .contains(name),
            "unexpected variable {name} in the step's environment:\n{own}"
        );
    }
    // What the worker's /proc entries show: no flags, a harmless environment.
    let cmdline = own.split("---cmdline---").nth(1).unwrap();
    let (cmdline, stdin) = cmdline.split_once("---stdin---").unwrap();
    assert!(cmdline.trim().ends_with("/courier worker --sealed"), "{cmdline}");
    // The settings it was re-executed with were erased once read.
    assert_eq!(stdin.trim(), "");
}

#[test]
fn with_step_user_a_step_runs_unprivileged_and_cannot_read_the_worker() {
    let yaml = r#"steps:
  - name: who
    command:
      - sh
      - -c
      - |
        id -un
        cat /proc/$$PPID/environ > /dev/null 2>&1 && echo environ-readable || echo environ-denied
        cat /proc/$$PPID/maps > /dev/null 2>&1 && echo memory-readable || echo memory-denied
        echo "home=$$HOME"
"#;
    let cluster = Cluster::builder()
        .workers(1)
        .workflow("who", yaml)
        .env("COURIER_SIGNING_KEY", KEY)
        .env("COURIER_STEP_USER", "nobody")
        .start();
    let id = cluster.submit("who", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["steps"][0]["output"],
        "nobody\nenviron-denied\nmemory-denied\nhome=/nonexistent"
    );
    assert!(!cluster.worker_log("w1").contains("step_user is not set"));
}

#[test]
fn a_step_user_that_does_not_exist_stops_the_worker_at_start() {
    let dir = tempfile::TempDir::new().unwrap();
    let (out, _, stderr) = run(courier()
        .args(["worker", "--worker-id", "x"])
        .env("COURIER_STEP_USER", "no-such-user-e4c1")
        .env("COURIER_WORKER_ENV_PASSTHROUGH", "IT_A")
        .env("COURIER_DATA_DIR", dir.path()));
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("step_user: no user \"no-such-user-e4c1\" on this machine"),
        "{stderr}"
    );
    // Settings are read whatever the case of their names: so is the refusal.
    for name in ["COURIER_SIGNING_KEY", "courier_signing_key"] {
        let (out, _, stderr) = run(courier()
            .args(["worker"])
            .env("COURIER_WORKER_ENV_PASSTHROUGH", format!("IT_A, {name}")));
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "worker_env_passthrough: {name} is Courier's own setting; COURIER_* variables never reach a step"
            )),
            "{stderr}"
        );
    }
}

/// A result for `task`, as a worker would send it.
fn result_for(task: &Task, output: &str) -> TaskResult {
    TaskResult {
        task_id: task.task_id,
        run_id: task.run_id,
        step: task.step.clone(),
        attempt: task.attempt,
        status: TaskStatus::Succeeded,
        output: output.into(),
        error: None,
        started_unix_ms: 1,
        finished_unix_ms: 2,
        worker_id: "mallory".into(),
        memory_updates: Vec::new(),
        model: None,
        usage: None,
        transcript: Vec::new(),
        rate_limited_ms: None,
    }
}

/// The value of a counter in Prometheus text, 0 when absent.
fn counter(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

/// Tasks and results signed with [`KEY`], a tap, the workflow `plain` (one
/// step printing "real"), and no worker yet: a task waits in its queue
/// while results are forged.
fn signed_cluster_without_workers() -> Cluster {
    let yaml = "steps:\n  - name: only\n    command: [\"sh\", \"-c\", \"echo real\"]\n";
    Cluster::builder()
        .workers(0)
        .tap()
        .workflow("plain", yaml)
        .env("COURIER_SIGNING_KEY", KEY)
        .start()
}

#[test]
fn forged_results_change_nothing_and_are_dead_lettered_with_their_reason() {
    let mut cluster = signed_cluster_without_workers();
    let memory = cluster.config_dir.join("agents/memory/MEMORY.md");
    let memory_before = std::fs::read_to_string(&memory).unwrap();
    let id = cluster.submit("plain", &[]).unwrap();
    let (task, task_body) = tapped_task(&cluster, "only");
    let key = SigningKey::new("default", KEY.as_bytes().to_vec());
    let exchange = Names::new(cluster.namespace.clone()).results_exchange();
    let ids = (task.task_id.to_string(), task.run_id.to_string());
    let publish = |result: &TaskResult, signature: Option<String>| {
        let body = encode(result, &Limits::default()).unwrap();
        let mut sent = vec![(headers::ATTEMPT, Header::Int(1))];
        if let Some(signature) = signature {
            sent.push((headers::SIGNATURE, Header::Str(signature)));
        }
        cluster.publish(&exchange, "results", &body, (&ids.0, &ids.1), sent);
    };
    let forged = result_for(&task, "FORGED");
    let forged_body = encode(&forged, &Limits::default()).unwrap();
    // Unsigned; signed with another key; signed but for another attempt;
    // signed, but a command step proposing memory.
    publish(&forged, None);
    publish(
        &forged,
        Some(SigningKey::new("default", b"guess".to_vec()).sign(&forged_body)),
    );
    let other_attempt = TaskResult {
        attempt: 2,
        ..forged.clone()
    };
    publish(
        &other_attempt,
        Some(key.sign(&encode(&other_attempt, &Limits::default()).unwrap())),
    );
    let with_memory = TaskResult {
        memory_updates: vec![MemoryUpdate {
            target: MemoryTarget::Global,
            append: "- forged fact\n".into(),
        }],
        ..forged.clone()
    };
    publish(
        &with_memory,
        Some(key.sign(&encode(&with_memory, &Limits::default()).unwrap())),
    );
    wait_dead(&cluster, 4);

    let run = cluster.run(&id);
    assert_eq!(run["status"], "running", "{run:#}");
    assert_eq!(run["steps"][0]["status"], "running", "{run:#}");
    let metrics = cluster.scheduler_metrics();
    for reason in ["unsigned", "forged", "mismatch", "memory_not_allowed"] {
        let name = format!("courier_results_refused_total{{reason=\"{reason}\"}}");
        assert_eq!(counter(&metrics, &name), 1.0, "{name}\n{metrics}");
    }
    let (out, stdout, _) = run_cli(&cluster, &["dead", "list"]);
    assert!(out.status.success());
    let lines: Vec<&str> = stdout.lines().filter(|l| l.contains("(result)")).collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let all = stdout.as_str();
    for reason in [
        "the result is not signed, and a signing key is set: every result must be signed",
        "the result signature does not match its body (key \"default\")",
        "it names run",
        "proposes memory updates, but step \"only\" is not an agent step with the propose_memory_update tool",
    ] {
        assert!(all.contains(reason), "{reason} missing from:\n{all}");
    }
    let (out, _, stderr) = run_cli(&cluster, &["dead", "requeue", &ids.0]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("is a refused result, not a task: it cannot be requeued"),
        "{stderr}"
    );
    // A dead copy of the task itself, behind the results carrying its id, is
    // the one requeued.
    let dead = Names::new(cluster.namespace.clone()).dead();
    let attempt = vec![(headers::ATTEMPT, Header::Int(1))];
    cluster.publish(&dead, "default", &task_body, (&ids.0, &ids.1), attempt);
    wait_dead(&cluster, 5);
    assert_eq!(cluster.queue_depth("default"), 1);
    let (out, stdout, stderr) = run_cli(&cluster, &["dead", "requeue", &ids.0]);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("requeued 1 task(s)"), "{stdout}");
    assert_eq!(cluster.queue_depth("default"), 2);
    assert_eq!(cluster.dead_depth(), 4, "the refused results stay");

    // The real worker's signed result is applied; nothing forged ever was.
    cluster.start_worker("w1", 2);
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "real");
    assert_eq!(run["steps"][0]["worker"], "w1");
    assert_eq!(std::fs::read_to_string(&memory).unwrap(), memory_before);
}

/// A broker policy, cleared on drop.
struct Policy(String);

impl Policy {
    /// `definition` applied to the queue named `queue` alone.
    fn on_queue(queue: &str, definition: &str) -> Self {
        let name = format!("it-{}", uuid::Uuid::now_v7().simple());
        let pattern = format!("^{}$", queue.replace('.', "\\."));
        rabbitmqctl(&[
            "set_policy",
            &name,
            &pattern,
            definition,
            "--apply-to",
            "queues",
            "--priority",
            "100",
        ]);
        // Applied to the queue a moment later, asynchronously.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = std::process::Command::new("rabbitmqctl")
                .args(["list_queues", "-q", "--no-table-headers", "name", "policy"])
                .output()
                .expect("rabbitmqctl");
            let listed = String::from_utf8_lossy(&out.stdout).lines().any(|l| {
                let mut columns = l.split_whitespace();
                columns.next() == Some(queue) && columns.next() == Some(name.as_str())
            });
            if listed {
                return Self(name);
            }
            assert!(Instant::now() < deadline, "policy {name} never applied to {queue}");
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Policy {
    fn drop(&mut self) {
        let _ = std::process::Command::new("rabbitmqctl")
            .args(["clear_policy", &self.0])
            .output();
    }
}

#[test]
fn a_refused_result_the_dead_letter_queue_will_not_take_is_held_and_the_rest_go_on() {
    let mut cluster = signed_cluster_without_workers();
    let names = Names::new(cluster.namespace.clone());
    // The dead-letter queue is full and refuses whatever comes (a quorum
    // queue takes one message past its limit: give it that one).
    let full = Policy::on_queue(&names.dead(), r#"{"max-length":0,"overflow":"reject-publish"}"#);
    cluster.publish(&names.dead(), "results", b"filler", ("filler", "filler"), Vec::new());
    wait_dead(&cluster, 1);
    let id = cluster.submit("plain", &[]).unwrap();
    let (task, _) = tapped_task(&cluster, "only");
    let ids = (task.task_id.to_string(), task.run_id.to_string());
    // Two: the second is held behind the first without being tried.
    for output in ["FORGED", "FORGED AGAIN"] {
        let unsigned = encode(&result_for(&task, output), &Limits::default()).unwrap();
        cluster.publish(
            &names.results_exchange(),
            "results",
            &unsigned,
            (&ids.0, &ids.1),
            vec![(headers::ATTEMPT, Header::Int(1))],
        );
    }
    // Refused, and held: the broker would not take its dead letter.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.logs().contains("cannot dead-letter a refused result") {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cluster.dead_depth(), 1);

    // The real result, behind it in the queue, is applied meanwhile, once.
    cluster.start_worker("w1", 2);
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "real", "{run:#}");
    let metrics = cluster.scheduler_metrics();
    let finished = "courier_runs_finished_total";
    assert_eq!(counter(&metrics, finished), 1.0, "{metrics}");
    assert_eq!(
        counter(&metrics, "courier_results_received_total{status=\"succeeded\"}"),
        1.0,
        "{metrics}"
    );

    // Once its limit is lifted, the refused result is there, once, with
    // its reason; nothing is left unacked.
    drop(full);
    wait_dead(&cluster, 3);
    let deadline = Instant::now() + Duration::from_secs(20);
    while cluster.results_in_queue() > 0 {
        assert!(Instant::now() < deadline, "{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(cluster.dead_depth(), 3);
    let reasons = dead_reasons(&cluster);
    assert!(reasons[&ids.0].contains("the result is not signed"), "{reasons:?}");
    let metrics = cluster.scheduler_metrics();
    assert_eq!(counter(&metrics, finished), 1.0, "{metrics}");
    let refused = "courier_results_refused_total{reason=\"unsigned\"}";
    assert_eq!(
        counter(&metrics, refused),
        2.0,
        "each counted once, however long held\n{metrics}"
    );
    let run = cluster.run(&id);
    assert_eq!(run["steps"][0]["output"], "real", "{run:#}");
}

fn run_cli(cluster: &Cluster, args: &[&str]) -> (std::process::Output, String, String) {
    run(cluster.courier().args(args))
}

#[test]
fn junk_carrying_a_running_tasks_ids_speaks_for_no_task() {
    let yaml = "steps:\n  - name: slow\n    command: [\"sh\", \"-c\", \"sleep 1; echo real\"]\n";
    let cluster = Cluster::builder().workers(1).tap().workflow("slow", yaml).start();
    let id = cluster.submit("slow", &[]).unwrap();
    let (task, _) = tapped_task(&cluster, "slow");
    let exchange = Names::new(cluster.namespace.clone()).tasks_exchange();
    let ids = (task.task_id.to_string(), task.run_id.to_string());
    cluster.publish(
        &exchange,
        "default",
        b"junk",
        (&ids.0, &ids.1),
        vec![(headers::ATTEMPT, Header::Int(1))],
    );
    wait_dead(&cluster, 1);
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "real");
    assert_eq!(run["steps"][0]["attempts"], 1);
}

#[test]
fn a_replayed_task_changes_nothing_and_an_expired_one_is_refused() {
    let yaml = "steps:\n  - name: once\n    command: [\"sh\", \"-c\", \"echo ran\"]\n";
    let cluster = Cluster::builder()
        .workers(1)
        .tap()
        .workflow("once", yaml)
        .env("COURIER_SIGNING_KEY", KEY)
        .start();
    let id = cluster.submit("once", &[]).unwrap();
    let (task, body) = tapped_task(&cluster, "once");
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let key = SigningKey::new("default", KEY.as_bytes().to_vec());
    let exchange = Names::new(cluster.namespace.clone()).tasks_exchange();
    let ids = (task.task_id.to_string(), task.run_id.to_string());
    let hash = courier_wire::ContentHash::of(&task.snapshot).to_hex();
    let signed = |body: &[u8]| {
        vec![
            (headers::SNAPSHOT_HASH, Header::Str(hash.clone())),
            (headers::SIGNATURE, Header::Str(key.sign(body))),
        ]
    };
    // A replay within the deadline runs again (at least once), and its result
    // is a duplicate: the run does not change.
    let duplicates = counter(&cluster.scheduler_metrics(), "courier_results_duplicate_total");
    cluster.publish(&exchange, "default", &body, (&ids.0, &ids.1), signed(&body));
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter(&cluster.scheduler_metrics(), "courier_results_duplicate_total") <= duplicates {
        assert!(
            Instant::now() < deadline,
            "the replay's result never arrived\n{}",
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(cluster.run(&id), run);
    // Past its deadline, a task is refused before it runs.
    let expired = Task {
        deadline_unix_ms: now_ms() - 1_000,
        ..task.clone()
    };
    let expired_body = encode(&expired, &Limits::default()).unwrap();
    cluster.publish(
        &exchange,
        "default",
        &expired_body,
        (&ids.0, &ids.1),
        signed(&expired_body),
    );
    wait_dead(&cluster, 1);
    let reasons = dead_reasons(&cluster);
    assert!(
        reasons[&ids.0].starts_with("the task expired: its deadline"),
        "{reasons:?}"
    );
    assert_eq!(cluster.run(&id), run);
    assert_eq!(cluster.worker_log("w1").matches("running step").count(), 2);
}

#[test]
fn a_worker_stopped_past_a_steps_timeout_does_not_blame_the_step() {
    let yaml = "steps:\n  - name: quick\n    timeout: 2s\n    command: [\"sh\", \"-c\", \"sleep 1; echo done\"]\n";
    let cluster = Cluster::builder().workers(1).workflow("quick", yaml).start();
    let id = cluster.submit("quick", &[]).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cluster.worker_log("w1").contains("running step") {
        assert!(Instant::now() < deadline, "the step never started\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
    let worker = cluster.worker_pid("w1");
    kill(worker, Signal::SIGSTOP).unwrap();
    std::thread::sleep(Duration::from_secs(4));
    kill(worker, Signal::SIGCONT).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "done");
}

#[test]
fn deleting_the_data_folder_stops_the_scheduler_with_a_clear_error() {
    let mut cluster = Cluster::builder().workers(0).start();
    std::fs::remove_dir_all(&cluster.data_dir).unwrap();
    let status = cluster.wait_scheduler_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(1));
    let log = cluster.log("scheduler");
    assert!(
        log.contains("was deleted or replaced while the scheduler ran; stopping"),
        "{log}"
    );
}

#[test]
fn the_api_needs_its_token_and_answers_errors_in_json() {
    let token = "it-api-token-0c9d";
    let cluster = Cluster::builder().workers(1).env("COURIER_API_TOKEN", token).start();
    let http = reqwest::blocking::Client::new();
    let url = |path: &str| format!("{}{path}", cluster.api);
    let json = |r: reqwest::blocking::Response| -> (u16, Value) {
        let status = r.status().as_u16();
        let content_type = r.headers()["content-type"].to_str().unwrap().to_string();
        assert_eq!(content_type, "application/json", "{status}");
        (status, r.json().unwrap())
    };
    let unauthorized =
        "missing or wrong API token: send Authorization: Bearer <token> (the CLI sends api_token / COURIER_API_TOKEN)";
    for path in ["/api/runs", "/api/workflows", "/metrics"] {
        let none = http.get(url(path)).send().unwrap();
        assert_eq!(none.headers()["www-authenticate"], "Bearer");
        assert_eq!(
            json(none),
            (401, serde_json::json!({ "error": unauthorized })),
            "{path}"
        );
        let wrong = http.get(url(path)).bearer_auth("it-api-token-0c9e").send().unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path}");
        let right = http.get(url(path)).bearer_auth(token).send().unwrap();
        assert_eq!(right.status().as_u16(), 200, "{path}");
        // The scheme's case does not matter (RFC 9110); the token's does.
        let lower = http
            .get(url(path))
            .header("authorization", format!("bearer {token}"))
            .send()
            .unwrap();
        assert_eq!(lower.status().as_u16(), 200, "{path}");
        let shouted = http
            .get(url(path))
            .header("authorization", format!("BEARER {}", token.to_uppercase()))
            .send()
            .unwrap();
        assert_eq!(shouted.status().as_u16(), 401, "{path}");
    }
    let submit = http
        .post(url("/api/runs"))
        .json(&serde_json::json!({"workflow": "fanout"}));
    assert_eq!(submit.send().unwrap().status().as_u16(), 401);
    // Without the token, an unknown path cannot be told from a known one.
    assert_eq!(json(http.get(url("/api/nothing")).send().unwrap()).0, 401);
    assert_eq!(json(http.delete(url("/api/runs")).send().unwrap()).0, 401);
    assert_eq!(http.get(url("/healthz")).send().unwrap().status().as_u16(), 200);

    // Bad input gets JSON errors too.
    let authed = |m: reqwest::Method, path: &str| http.request(m, url(path)).bearer_auth(token);
    let (status, body) = json(
        authed(reqwest::Method::POST, "/api/runs")
            .header("content-type", "application/json")
            .body("{\"workflow\": ")
            .send()
            .unwrap(),
    );
    assert_eq!(status, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .starts_with("Failed to parse the request body as JSON"),
        "{body}"
    );
    let (status, body) = json(
        authed(reqwest::Method::POST, "/api/runs")
            .body("workflow=fanout")
            .send()
            .unwrap(),
    );
    assert_eq!(status, 415);
    assert!(body["error"].as_str().unwrap().contains("Content-Type"), "{body}");
    let (status, _) = json(authed(reqwest::Method::GET, "/api/runs?limit=many").send().unwrap());
    assert_eq!(status, 400);
    let (status, _) = json(authed(reqwest::Method::GET, "/api/nothing").send().unwrap());
    assert_eq!(status, 404);
    let (status, _) = json(authed(reqwest::Method::DELETE, "/api/runs").send().unwrap());
    assert_eq!(status, 405);

    // The CLI sends the token from the same setting; without it, the API's message.
    let (out, stdout, stderr) = run(cluster.courier().args(["submit", "fanout", "--wait"]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("succeeded"), "{stdout}");
    let (out, _, stderr) = run(cluster.courier().env_remove("COURIER_API_TOKEN").args(["runs"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr, format!("error: {unauthorized}\n"));
}

#[test]
fn without_a_token_the_api_answers_only_at_loopback_names_and_never_drops_a_body() {
    // No worker: the run stays running.
    let cluster = Cluster::builder().workers(0).start();
    let http = reqwest::blocking::Client::new();
    let url = |path: &str| format!("{}{path}", cluster.api);
    // A page on a DNS name rebound to 127.0.0.1 is same-origin for the browser.
    for path in ["/api/runs", "/api/workflows", "/metrics"] {
        let rebound = http.get(url(path)).header("host", "evil.test:8080").send().unwrap();
        assert_eq!(rebound.status().as_u16(), 403, "{path}");
        let body: Value = rebound.json().unwrap();
        assert_eq!(
            body["error"],
            "without api_token the API answers only at an IP address or localhost: set api_token to use a host name"
        );
        for host in ["localhost:8080", "127.0.0.1", "[::1]:8080"] {
            let local = http.get(url(path)).header("host", host).send().unwrap();
            assert_eq!(local.status().as_u16(), 200, "{path} at {host}");
        }
    }
    let submit = http
        .post(url("/api/runs"))
        .header("host", "evil.test")
        .json(&serde_json::json!({"workflow": "fanout"}))
        .send()
        .unwrap();
    assert_eq!(submit.status().as_u16(), 403);
    assert_eq!(
        http.get(url("/api/runs")).send().unwrap().json::<Value>().unwrap(),
        serde_json::json!([]),
        "nothing was submitted"
    );
    // A wrong method is a JSON 405 everywhere.
    for (method, path) in [
        (reqwest::Method::POST, "/healthz"),
        (reqwest::Method::DELETE, "/ui/runs"),
        (reqwest::Method::PUT, "/api/runs"),
    ] {
        let r = http.request(method.clone(), url(path)).send().unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        let body: Value = r.json().unwrap_or_else(|e| panic!("{method} {path}: {e}"));
        assert_eq!(body["error"], "method not allowed on this endpoint");
    }
    // The dead letters page takes them off their queue: never for another site.
    let dead = |site: &str| {
        http.get(url("/ui/dead"))
            .header("sec-fetch-site", site)
            .send()
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(dead("cross-site"), 403);
    assert_eq!(dead("same-site"), 403);
    assert_eq!(dead("same-origin"), 200);
    assert_eq!(dead("none"), 200, "typed in the address bar");
    // A priority that does not fit a byte is the same 400 as one over 9.
    for priority in [300, -1, 10] {
        let r = http
            .post(url("/api/runs"))
            .json(&serde_json::json!({"workflow": "fanout", "priority": priority}))
            .send()
            .unwrap();
        assert_eq!(r.status().as_u16(), 400, "{priority}");
        let body: Value = r.json().unwrap();
        assert_eq!(
            body["error"],
            format!("priority {priority} is out of range: use 0 (lowest) to 9 (highest); 4 is normal")
        );
    }
    // Empty filters, as a form sends them, are no filters.
    let run: Value = http
        .post(url("/api/runs"))
        .json(&serde_json::json!({"workflow": "fanout"}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let id = run["id"].as_str().unwrap();
    let listed: Value = http
        .get(url("/api/runs?workflow=&status=&limit=&before="))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(listed[0]["id"], id);
    // One step whole, over HTTP.
    let step: Value = http
        .get(url(&format!("/api/runs/{id}/steps/split")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(
        (step["name"].as_str(), step["status"].as_str()),
        (Some("split"), Some("running"))
    );
    let missing = http.get(url(&format!("/api/runs/{id}/steps/nope"))).send().unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let body: Value = missing.json().unwrap();
    assert_eq!(body["error"], format!("no step \"nope\" in run \"{id}\""));
    // A cancel whose body is not declared JSON is refused, not read as no
    // body: it named one step, and must not cancel the whole run.
    let cancel = |body: &'static str, content_type: Option<&str>| {
        let mut request = http.post(url(&format!("/api/runs/{id}/cancel"))).body(body);
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request.send().unwrap()
    };
    for content_type in [None, Some("application/x-www-form-urlencoded"), Some("text/plain")] {
        let refused = cancel(r#"{"step": "split"}"#, content_type);
        assert_eq!(refused.status().as_u16(), 415, "{content_type:?}");
        let body: Value = refused.json().unwrap();
        assert_eq!(body["error"], "Expected request with `Content-Type: application/json`");
    }
    let view: Value = http
        .get(url(&format!("/api/runs/{id}")))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(view["status"], "running");
    let approve = http
        .post(url(&format!("/api/runs/{id}/steps/split/approve")))
        .header("content-type", "text/plain")
        .body(r#"{"comment": "lgtm"}"#)
        .send()
        .unwrap();
    assert_eq!(approve.status().as_u16(), 415);
    // Declared JSON, with a charset: one step cancelled, the run goes on.
    let one = cancel(r#"{"step": "split"}"#, Some("application/json; charset=utf-8"));
    assert_eq!(one.status().as_u16(), 200);
    let view: Value = one.json().unwrap();
    assert_eq!(
        view["status"], "cancelled",
        "split was the run's only open step: {view}"
    );
    assert_eq!(view["steps"][0]["status"], "cancelled");
}

#[test]
fn an_api_open_beyond_loopback_by_choice_answers_at_any_host_name() {
    // `api_allow_anonymous`: reached by a service name from other hosts.
    let cluster = Cluster::builder()
        .workers(0)
        .env("COURIER_API_LISTEN", "0.0.0.0:0")
        .env("COURIER_API_ALLOW_ANONYMOUS", "true")
        .start();
    let http = reqwest::blocking::Client::new();
    for path in ["/api/runs", "/ui/runs"] {
        let named = http
            .get(format!("{}{path}", cluster.api))
            .header("host", "scheduler:8080")
            .send()
            .unwrap();
        assert_eq!(named.status().as_u16(), 200, "{path}");
    }
}

#[test]
fn a_scheduler_listening_beyond_loopback_needs_a_token() {
    let dir = tempfile::TempDir::new().unwrap();
    let scheduler = |extra: &[(&str, &str)]| {
        let mut cmd = courier();
        cmd.arg("scheduler")
            .env("COURIER_API_LISTEN", "0.0.0.0:0")
            .env("COURIER_DATA_DIR", dir.path().join("data"))
            .env("COURIER_CONFIG_DIR", crate::support::example_config())
            .env("COURIER_CONNECT_TIMEOUT_SECS", "1")
            .env("COURIER_AMQP_URL", "amqp://guest:guest@127.0.0.1:1/%2f");
        for (k, v) in extra {
            cmd.env(k, v);
        }
        run(&mut cmd)
    };
    let (out, _, stderr) = scheduler(&[]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr.starts_with("error: the API would listen on 0.0.0.0:0 without a token"),
        "{stderr}"
    );
    // A token short enough to guess is refused.
    let (out, _, stderr) = scheduler(&[("COURIER_API_TOKEN", "short-token-15c")]);
    assert_eq!(out.status.code(), Some(78));
    assert!(
        stderr.starts_with("error: api_token is 15 characters: use at least 16"),
        "{stderr}"
    );
    // With a token, or with anonymous access accepted, it starts (and then
    // gives up on the unreachable broker).
    for extra in [
        ("COURIER_API_TOKEN", "a-token-of-16-ch"),
        ("COURIER_API_ALLOW_ANONYMOUS", "true"),
    ] {
        let (out, _, stderr) = scheduler(&[extra]);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains("HTTP API listening"), "{stderr}");
    }
}

#[test]
fn every_command_exits_quietly_when_its_output_is_closed() {
    let (read, write) = nix::unistd::pipe().unwrap();
    drop(read);
    let out = courier()
        .args(["validate", "--config-dir"])
        .arg(crate::support::example_config())
        .stdout(std::process::Stdio::from(write))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(stderr, "");
}

#[test]
fn a_message_over_the_shipped_size_limit_never_reaches_a_worker() {
    // The shipped broker config's limit, applied to the test broker (new
    // channels read it).
    let conf = std::fs::read_to_string(crate::support::example_config().join("rabbitmq/rabbitmq.conf")).unwrap();
    let limit: u64 = conf
        .lines()
        .find_map(|l| l.strip_prefix("max_message_size = "))
        .and_then(|v| v.trim().parse().ok())
        .expect("max_message_size in config/rabbitmq/rabbitmq.conf");
    assert!(limit > 4 * 1024 * 1024, "below task_max_compressed: {limit}");
    rabbitmqctl(&[
        "eval",
        &format!("application:set_env(rabbit, max_message_size, {limit})."),
    ]);
    let cluster = Cluster::builder().workers(1).start();
    let names = Names::new(cluster.namespace.clone());
    let refused = crate::cluster::block_on(async {
        let broker = courier_amqp::Broker::connect(&crate::cluster::amqp_url(), names.clone(), "courier-it-big")
            .await
            .unwrap();
        let publisher = broker.publisher(1).await.unwrap();
        let body = vec![0u8; 100 * 1024 * 1024];
        let sent = publisher
            .publish(courier_amqp::Outgoing {
                exchange: &names.tasks_exchange(),
                routing_key: "default",
                body: &body,
                message_id: "huge",
                correlation_id: "none",
                headers: Vec::new(),
            })
            .await;
        let _ = broker.close().await;
        sent
    });
    let error = refused.expect_err("the broker accepted a 100 MB message").to_string();
    assert!(error.contains("larger than configured max size"), "{error}");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(cluster.dead_depth(), 0);
    let rss = cluster.worker_peak_rss_mib("w1");
    assert!(rss < 64.0, "worker peak RSS {rss:.1} MiB");
}

/// A counter of the worker's `/metrics`, 0 when absent.
/// A worker's counter `metric` for the series that carries `label` (every
/// worker series also carries `worker="<id>"`).
fn worker_counter(cluster: &Cluster, id: &str, metric: &str, label: &str) -> f64 {
    let addr = cluster.worker_metrics_addr(id);
    let text = reqwest::blocking::get(format!("http://{addr}/metrics"))
        .unwrap()
        .text()
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(&format!("{metric}{{")) && l.contains(label) && l.contains(&format!("worker=\"{id}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[test]
fn copies_of_a_signed_task_with_a_wrong_header_or_in_another_pool_speak_for_no_task() {
    let yaml = "steps:\n  - name: only\n    command: [\"sh\", \"-c\", \"echo real\"]\n";
    let mut cluster = Cluster::builder()
        .workers(0)
        .tap()
        .pools(&["default", "other"])
        .workflow("plain", yaml)
        .env("COURIER_SIGNING_KEY", KEY)
        .env("COURIER_WORKER_METRICS_LISTEN", "127.0.0.1:0")
        .start();
    let id = cluster.submit("plain", &[]).unwrap();
    let (task, body) = tapped_task(&cluster, "only");
    assert_eq!(task.pool, "default");
    let key = SigningKey::new("default", KEY.as_bytes().to_vec());
    let exchange = Names::new(cluster.namespace.clone()).tasks_exchange();
    let ids = (task.task_id.to_string(), task.run_id.to_string());
    let hash = courier_wire::ContentHash::of(&task.snapshot).to_hex();
    let signed = |hash: &str| {
        vec![
            (headers::SNAPSHOT_HASH, Header::Str(hash.to_string())),
            (headers::SIGNATURE, Header::Str(key.sign(&body))),
        ]
    };
    // The authentic body, signed, with a snapshot hash header that lies;
    // and the authentic task moved to another pool's queue.
    cluster.publish(&exchange, "default", &body, (&ids.0, &ids.1), signed(&"0".repeat(64)));
    cluster.publish(&exchange, "other", &body, (&ids.0, &ids.1), signed(&hash));
    cluster.start_worker("w1", 1);
    wait_dead(&cluster, 2);
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(run["steps"][0]["output"], "real");
    // Neither copy was answered: the worker sent one result, a success.
    let results = |status: &str| {
        worker_counter(
            &cluster,
            "w1",
            "courier_worker_results_total",
            &format!("status=\"{status}\""),
        )
    };
    assert_eq!((results("succeeded"), results("rejected")), (1.0, 0.0));
    let reasons: Vec<String> = {
        let (out, stdout, _) = run_cli(&cluster, &["dead", "list", "--json"]);
        assert!(out.status.success());
        let list: Value = serde_json::from_str(&stdout).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|d| d["reason"].as_str().unwrap().to_string())
            .collect()
    };
    assert!(
        reasons.iter().any(|r| r.starts_with("snapshot hash mismatch")),
        "{reasons:?}"
    );
    assert!(
        reasons.contains(&"the task is for pool \"default\" but came from the queue of pool \"other\"".to_string()),
        "{reasons:?}"
    );
}

#[test]
fn a_step_inherits_no_file_descriptor_from_the_worker() {
    let yaml = r#"steps:
  - name: fds
    command: ["sh", "-c", "ls /proc/self/fd | tr '\\n' ' '; cat <&7 2>/dev/null || echo no-fd-7"]
"#;
    let cluster = Cluster::builder().workers(0).workflow("fds", yaml).start();
    let secret = cluster.dir.path().join("secret");
    std::fs::write(&secret, "inherited-secret").unwrap();
    // A worker started by a shell that left fd 7 open on a secret file.
    let courier = cluster.courier();
    let mut shell = std::process::Command::new("sh");
    shell
        .args(["-c", "exec \"$0\" worker --worker-id w9 7<\"$1\""])
        .arg(courier.get_program())
        .arg(&secret)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    for (k, v) in courier.get_envs() {
        match v {
            Some(v) => shell.env(k, v),
            None => shell.env_remove(k),
        };
    }
    let mut worker = shell.spawn().unwrap();
    let id = cluster.submit("fds", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(run["status"], "succeeded", "{run:#}");
    // stdin, stdout, stderr, and ls's own listing.
    assert_eq!(run["steps"][0]["output"], "0 1 2 3 no-fd-7");
}

/// Any AMQP publisher can send headers up to the broker's frame size
/// (128 KiB by default): one whose headers outgrow a consumer's frames cuts
/// that consumer's connection, and it gets the message again on reconnect.
/// Courier's connections take frames as large as the broker's default, so
/// such junk on every queue Courier reads is refused like any other.
#[test]
fn junk_with_headers_as_large_as_the_brokers_frames_is_refused_and_service_goes_on() {
    let cluster = Cluster::builder().workers(1).start();
    let names = Names::new(cluster.namespace.clone());
    let large = || vec![("x-junk", Header::Str("R".repeat(100 * 1024)))];
    cluster.publish_raw("default", b"junk", "junk-task", large());
    cluster.publish(
        &names.results_exchange(),
        "results",
        b"junk",
        ("junk-result", "r"),
        large(),
    );
    cluster.publish("", &names.control(), b"junk", ("junk-control", "r"), large());
    wait_dead(&cluster, 2);
    let id = cluster.submit("fanout", &[("text", "a b")]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cluster.logs());
    assert_eq!(cluster.dead_depth(), 2);
    let logs = cluster.logs();
    assert!(!logs.contains("frame too large"), "{logs}");
}

/// RabbitMQ's management API (and protocols other than AMQP) can put a
/// message whose headers outgrow any frame on a queue: the process reading
/// it loses its connection at each delivery. It must go on reconnecting
/// (lapin left an operation unresolved on one such failure, and the
/// scheduler hung for good), and resume once the message is removed.
#[test]
fn a_message_no_frame_can_carry_cuts_its_reader_off_until_it_is_removed_and_never_hangs_it() {
    let mut cluster = Cluster::builder().workers(1).start();
    let names = Names::new(cluster.namespace.clone());
    let results = names.results_queue();
    let body = serde_json::json!({
        "properties": {"headers": {"x-junk": "R".repeat(200_000)}},
        "routing_key": results,
        "payload": "w",
        "payload_encoding": "string",
    });
    let answer = reqwest::blocking::Client::new()
        .post("http://127.0.0.1:15672/api/exchanges/%2f/amq.default/publish")
        .basic_auth("guest", Some("guest"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    assert!(answer.status().is_success(), "{}", answer.text().unwrap_or_default());
    // Long enough for dozens of reconnects: the hang came after 5-25 s.
    let lost = |cluster: &Cluster| cluster.log("scheduler").matches("lost the broker").count();
    let deadline = Instant::now() + Duration::from_secs(20);
    while lost(&cluster) < 20 {
        assert!(Instant::now() < deadline, "{}", cluster.log("scheduler"));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(10));
    let before = lost(&cluster);
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lost(&cluster) > before,
        "the scheduler stopped reconnecting:\n{}",
        cluster.log("scheduler")
    );
    // SIGTERM stops it at once, reconnecting as it is.
    kill(cluster.scheduler_pid(), Signal::SIGTERM).unwrap();
    let status = cluster.wait_scheduler_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", cluster.log("scheduler"));
    // Removed, it resumes.
    rabbitmqctl(&["purge_queue", &results]);
    cluster.start_scheduler();
    let id = cluster.submit("fanout", &[("text", "a b")]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}\n{}", cluster.logs());
}
