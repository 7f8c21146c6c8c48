//! Faults caused for real: poison messages, bad signatures, killed workers.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::time::{Duration, Instant};

use courier_amqp::Header;
use courier_wire::{Limits, Snapshot, StepRun, StepSpec, Task, encode, headers};
use serde_json::Value;

use crate::cluster::{Cluster, block_on};
use crate::support::run;

/// A valid task frame for the `fanout` workflow, with the hash header it needs.
pub fn valid_task() -> (Vec<u8>, String) {
    let snapshot = encode(
        &Snapshot {
            workflow: "fanout".into(),
            ..Snapshot::default()
        },
        &Limits::default(),
    )
    .unwrap();
    let hash = courier_wire::ContentHash::of(&snapshot).to_hex();
    let task = Task {
        task_id: uuid::Uuid::now_v7(),
        run_id: uuid::Uuid::now_v7(),
        workflow: "fanout".into(),
        step: "split".into(),
        attempt: 1,
        spec: StepSpec {
            timeout: Duration::from_secs(5),
            run: StepRun::Echo { text: "x".repeat(400) },
        },
        upstream: BTreeMap::new(),
        deadline_unix_ms: now_ms() + 3_600_000,
        snapshot,
        pool: "default".into(),
    };
    (encode(&task, &Limits::default()).unwrap(), hash)
}

/// Milliseconds since the epoch.
pub fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap()
}

fn frame(flags: u8, body: &[u8]) -> Vec<u8> {
    let mut f = b"CTSK\x01".to_vec();
    f.push(flags);
    f.extend_from_slice(body);
    f
}

/// `courier dead list --json`, keyed by task id.
pub fn dead_reasons(cluster: &Cluster) -> BTreeMap<String, String> {
    let (out, stdout, stderr) = run(cluster.courier().args(["dead", "list", "--json"]));
    assert!(out.status.success(), "{stderr}");
    let list: Value = serde_json::from_str(&stdout).unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .map(|d| {
            (
                d["task_id"].as_str().unwrap().to_string(),
                d["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

pub fn wait_dead(cluster: &Cluster, n: u32) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while cluster.dead_depth() < n {
        assert!(
            Instant::now() < deadline,
            "dead letters: {} of {n}\n{}",
            cluster.dead_depth(),
            cluster.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn poison_tasks_are_dead_lettered_with_their_reason_and_the_worker_keeps_serving() {
    let cluster = Cluster::builder().workers(1).start();
    let (good, hash) = valid_task();
    let bomb = {
        // 256 MiB of zeros, streamed (no declared size): meets the 16 MiB cap.
        let mut enc = zstd::stream::Encoder::new(Vec::new(), 1).unwrap();
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..256 {
            enc.write_all(&chunk).unwrap();
        }
        frame(courier_wire::FLAG_ZSTD, &enc.finish().unwrap())
    };
    let oversized = frame(0, &vec![7u8; 5 << 20]);
    let tiny_values = {
        // 2 million empty arguments: 2 MB of body, 48 MB of `String`s decoded.
        let mut task: Task = courier_wire::decode(&good, &Limits::default()).unwrap();
        task.spec.run = StepRun::Command {
            argv: vec![String::new(); 2_000_000],
            env: BTreeMap::new(),
        };
        let body = rmp_serde::to_vec_named(&task).unwrap();
        frame(courier_wire::FLAG_ZSTD, &zstd::bulk::compress(&body, 3).unwrap())
    };
    let missing_fields = frame(0, &rmp_serde_named_workflow_only());
    let mut unknown_version = good.clone();
    unknown_version[4] = 9;
    let hash_header = |h: &str| vec![(headers::SNAPSHOT_HASH, Header::Str(h.to_string()))];
    let poisons: Vec<Poison> = vec![
        ("short", b"hey".to_vec(), vec![], "task frame too short: 3 bytes"),
        (
            "magic",
            b"{\"json\": true}".to_vec(),
            vec![],
            "not a task frame: magic bytes",
        ),
        (
            "truncated",
            good[..good.len() / 2].to_vec(),
            hash_header(&hash),
            "corrupt task compression",
        ),
        (
            "version",
            unknown_version,
            hash_header(&hash),
            "unsupported task format version 9: this build reads versions 1 to 1",
        ),
        ("fields", missing_fields, vec![], "undecodable task body: missing field"),
        (
            "bomb",
            bomb,
            vec![],
            "task too large: decompressed size exceeds the limit of 16777216 bytes",
        ),
        (
            "tiny-values",
            tiny_values,
            vec![],
            "task too large: decoded size exceeds the limit of 16777216 bytes",
        ),
        (
            "oversized",
            oversized,
            vec![],
            "task too large: compressed size exceeds the limit of 4194304 bytes",
        ),
        (
            "hash",
            good.clone(),
            hash_header(&"0".repeat(64)),
            "snapshot hash mismatch: header says 0000",
        ),
    ];
    for (id, body, headers, _) in &poisons {
        cluster.publish_raw("default", body, id, headers.clone());
    }
    wait_dead(&cluster, poisons.len() as u32);
    let reasons = dead_reasons(&cluster);
    for (id, _, _, expected) in &poisons {
        let reason = reasons
            .get(*id)
            .unwrap_or_else(|| panic!("{id} not dead-lettered: {reasons:?}"));
        assert!(reason.contains(expected), "{id}: {reason}");
    }
    // Listing did not consume them.
    assert_eq!(cluster.dead_depth(), poisons.len() as u32);

    // The worker still serves, and the bomb did not blow up its memory.
    let id = cluster.submit("fanout", &[]).unwrap();
    assert_eq!(cluster.wait_run(&id, Duration::from_secs(30))["status"], "succeeded");
    let rss = cluster.worker_peak_rss_mib("w1");
    assert!(rss < 96.0, "worker peak RSS {rss:.1} MiB after a 256 MiB bomb");
    assert!(
        cluster
            .worker_log("w1")
            .contains("COURIER_SIGNING_KEY is not set: tasks are not authenticated")
    );

    // Replaying one sends it back through the worker, which refuses it again.
    let (out, stdout, _) = run(cluster.courier().args(["dead", "requeue", "version"]));
    assert!(out.status.success());
    assert_eq!(stdout, "requeued 1 task(s)\n");
    std::thread::sleep(Duration::from_millis(500));
    wait_dead(&cluster, poisons.len() as u32);
    let (out, _, stderr) = run(cluster.courier().args(["dead", "requeue", "no-such-task"]));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(stderr, "error: no dead-lettered task with id \"no-such-task\"\n");

    // Junk published straight to the dead letters (anyone who can reach the
    // broker could) is skipped, named, and left; the tasks are requeued.
    let dead = courier_amqp::Names::new(cluster.namespace.clone()).dead();
    cluster.publish(&dead, "", b"junk", ("junk-letter", "not-a-run"), vec![]);
    wait_dead(&cluster, poisons.len() as u32 + 1);
    let (out, stdout, stderr) = run(cluster.courier().args(["dead", "requeue", "--all"]));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!(stdout, format!("requeued {} task(s)\n", poisons.len()));
    assert!(
        stderr.starts_with("skipped junk-letter: it names no pool")
            && stderr.ends_with(&format!("1 dead letter(s) skipped, left in {dead}\n")),
        "{stderr}"
    );
    // Refused again by the worker, they are back beside the junk.
    wait_dead(&cluster, poisons.len() as u32 + 1);
}

/// A poison message: its id, body, headers, and the reason expected for it.
type Poison = (&'static str, Vec<u8>, Vec<(&'static str, Header)>, &'static str);

/// MessagePack of `{"workflow": "x"}`: a task missing every other field.
fn rmp_serde_named_workflow_only() -> Vec<u8> {
    // fixmap(1), fixstr(8) "workflow", fixstr(1) "x"
    let mut v = vec![0x81, 0xa8];
    v.extend_from_slice(b"workflow");
    v.extend_from_slice(&[0xa1, b'x']);
    v
}

#[test]
fn with_a_signing_key_unsigned_and_badly_signed_tasks_are_refused() {
    let cluster = Cluster::builder()
        .workers(1)
        .env("COURIER_SIGNING_KEY", "it-signing-secret")
        .start();
    // The scheduler signs: a normal run works.
    let id = cluster.submit("fanout", &[]).unwrap();
    assert_eq!(cluster.wait_run(&id, Duration::from_secs(30))["status"], "succeeded");
    let (good, hash) = valid_task();
    let forged = courier_wire::SigningKey::new("default", b"wrong-secret".to_vec()).sign(&good);
    cluster.publish_raw(
        "default",
        &good,
        "unsigned",
        vec![(headers::SNAPSHOT_HASH, Header::Str(hash.clone()))],
    );
    cluster.publish_raw(
        "default",
        &good,
        "forged",
        vec![
            (headers::SNAPSHOT_HASH, Header::Str(hash)),
            (headers::SIGNATURE, Header::Str(forged)),
        ],
    );
    wait_dead(&cluster, 2);
    let reasons = dead_reasons(&cluster);
    assert_eq!(
        reasons["unsigned"],
        "the task is not signed, and a signing key is set: every task must be signed"
    );
    assert_eq!(
        reasons["forged"],
        "the task signature does not match its body (key \"default\")"
    );
    assert!(!cluster.worker_log("w1").contains("tasks are not authenticated"));
}

#[test]
fn a_worker_killed_mid_step_loses_nothing_and_leaves_no_step_process_behind() {
    let pids = tempfile::NamedTempFile::new().unwrap();
    // The step's shell and its child, in the step's process group, write
    // their pids (`$$` is a template's `$`).
    let script = format!(
        "echo $$$$ >> {0}; sleep 4 & echo $$! >> {0}; wait; echo finished",
        pids.path().display()
    );
    let yaml = format!("steps:\n  - name: slow\n    command: [\"sh\", \"-c\", \"{script}\"]\n");
    let mut cluster = Cluster::builder().workers(2).workflow("slow", &yaml).start();
    let id = cluster.submit("slow", &[]).unwrap();
    // Find the worker running it, and kill it outright.
    let deadline = Instant::now() + Duration::from_secs(10);
    let victim = loop {
        if let Some(w) = ["w1", "w2"]
            .into_iter()
            .find(|w| cluster.worker_log(w).contains("running step"))
        {
            break w;
        }
        assert!(Instant::now() < deadline, "nobody started the step\n{}", cluster.logs());
        std::thread::sleep(Duration::from_millis(50));
    };
    let deadline = Instant::now() + Duration::from_secs(5);
    let victims = loop {
        let pids: Vec<i32> = std::fs::read_to_string(pids.path())
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap_or_else(|_| panic!("{l:?}")))
            .collect();
        if pids.len() >= 2 {
            break pids[..2].to_vec();
        }
        assert!(Instant::now() < deadline, "the step never wrote its pids");
        std::thread::sleep(Duration::from_millis(20));
    };
    cluster.kill_worker(victim);
    // Its step's processes die with it (its reaper kills their group), long
    // before the step would have ended (4 s).
    let alive = |pid: &i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
        })
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while victims.iter().any(alive) {
        assert!(
            Instant::now() < deadline,
            "the killed worker's step processes {victims:?} still run"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let run = cluster.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    let step = &run["steps"][0];
    assert_eq!(step["output"], "finished");
    assert_ne!(step["worker"], victim, "the survivor ran it");
    assert_eq!(
        step["attempts"], 1,
        "a redelivery, not a retry: the result was applied once"
    );
}

#[test]
fn a_task_the_broker_dead_letters_at_its_delivery_limit_fails_its_attempt_at_once_and_a_retry_runs_it() {
    let retried = "steps:\n  - name: a\n    retry: {limit: 1, backoff: 100ms, max_backoff: 100ms}\n    echo: done\n";
    let mut cluster = Cluster::builder()
        .workers(0)
        .env("COURIER_DELIVERY_LIMIT", "1")
        .workflow("once", "steps:\n  - name: a\n    echo: done\n")
        .workflow("retried", retried)
        .start();
    let names = courier_amqp::Names::new(cluster.namespace.clone());
    let lane = names.task_queue(&courier_amqp::lane_key("default"));
    // A worker that takes the task and is lost before it answers (its
    // channel closes): the broker gives the task again, until its delivery
    // limit (1 redelivery) is passed and it dead-letters it.
    let lose_until_dead = |dead: u32| {
        block_on(async {
            let broker = courier_amqp::Broker::connect(&crate::cluster::amqp_url(), names.clone(), "it-lost-worker")
                .await
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut lost = 0;
            while broker.queue_depth(&names.dead()).await.unwrap().0 < dead {
                assert!(Instant::now() < deadline, "lost {lost} times\n{}", cluster.logs());
                let taker = broker.taker(&lane).await.unwrap();
                if taker.take().await.unwrap().is_some() {
                    lost += 1;
                }
                let _ = taker.close().await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            let _ = broker.close().await;
            lost
        })
    };
    let once = cluster.submit("once", &[]).unwrap();
    assert_eq!(lose_until_dead(1), 2, "delivered, then once more");
    // No worker ever answers it: the scheduler fails it at once, not at the
    // run's deadline (a day away), and says why.
    let run = cluster.wait_run(&once, Duration::from_secs(15));
    assert_eq!(run["status"], "failed", "{run:#}");
    let error = run["steps"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("lost: the broker dead-lettered the task at the delivery limit") && error.contains(&lane),
        "{error}"
    );
    // The dead letter stays for `courier dead`, with the broker's reason.
    let reasons = dead_reasons(&cluster);
    assert_eq!(
        reasons.values().collect::<Vec<_>>(),
        ["dead-lettered by the broker: delivery_limit"]
    );
    // With a retry left, the step's next attempt goes out at once (through
    // a delay queue, whose expiry is a death too: the dead letter's reason
    // is the latest); lost as well, the run fails.
    let twice = cluster.submit("retried", &[]).unwrap();
    lose_until_dead(3);
    let run = cluster.wait_run(&twice, Duration::from_secs(15));
    assert_eq!(
        (&run["status"], &run["steps"][0]["attempts"]),
        (&"failed".into(), &2.into()),
        "{run:#}"
    );
    let reasons = dead_reasons(&cluster);
    assert_eq!(
        reasons.values().collect::<BTreeSet<_>>(),
        BTreeSet::from([&"dead-lettered by the broker: delivery_limit".to_string()]),
        "{reasons:?}"
    );
    assert_eq!(reasons.len(), 3);
    // The retry goes to a worker that is there, and the run succeeds.
    let retried = cluster.submit("retried", &[]).unwrap();
    lose_until_dead(4);
    cluster.start_worker("w1", 1);
    let run = cluster.wait_run(&retried, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        (&run["steps"][0]["output"], &run["steps"][0]["attempts"]),
        (&"done".into(), &2.into())
    );
    assert!(
        cluster.scheduler_metrics().contains("courier_tasks_lost_total 4"),
        "{}",
        cluster.scheduler_metrics()
    );
}

pub fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl (run as root)");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_broker_restart_mid_run_loses_nothing_and_applies_each_result_once() {
    let _alone = crate::cluster::exclusive_broker();
    let mut yaml = String::from("steps:\n");
    for i in 0..500 {
        yaml.push_str(&format!(
            "  - name: s{i}\n    command: [\"sh\", \"-c\", \"sleep 0.03; echo {i}\"]\n"
        ));
    }
    let cluster = Cluster::builder()
        .exclusive()
        .workers(3)
        .concurrency(2)
        .workflow("many", &yaml)
        .start();
    let id = cluster.submit("many", &[]).unwrap();
    std::thread::sleep(Duration::from_millis(1200));
    let done_before = cluster.run(&id)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .count();
    assert!(done_before < 500, "the run finished before the restart");
    rabbitmqctl(&["stop_app"]);
    std::thread::sleep(Duration::from_secs(3));
    rabbitmqctl(&["start_app"]);
    let run = cluster.wait_run(&id, Duration::from_secs(180));
    assert_eq!(run["status"], "succeeded", "{}", cluster.logs());
    for (i, step) in run["steps"].as_array().unwrap().iter().enumerate() {
        assert_eq!(step["status"], "succeeded");
        assert_eq!(step["output"], i.to_string());
        assert_eq!(step["attempts"], 1, "step s{i} was retried instead of redelivered");
    }
    // Each result was applied once; any duplicate delivery was counted and
    // ignored. The counters follow a batch's commit, which the run's end
    // shows first: read until the last batch is counted (a few ms).
    let counted = || {
        let metrics = reqwest::blocking::get(format!("{}/metrics", cluster.api))
            .unwrap()
            .text()
            .unwrap();
        let received: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("courier_results_received_total"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum();
        let duplicates: u64 = metrics
            .lines()
            .find(|l| l.starts_with("courier_results_duplicate_total"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0);
        (received, duplicates)
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let (received, duplicates) = loop {
        let (received, duplicates) = counted();
        if received - duplicates >= 500 || std::time::Instant::now() > deadline {
            break (received, duplicates);
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!(
        "broker restart: {done_before} of 500 done before; results received {received}, duplicates ignored {duplicates}"
    );
    assert_eq!(received - duplicates, 500);
}
