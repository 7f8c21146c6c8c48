//! Several schedulers on one PostgreSQL database: both serve the API, one
//! leads; the other finishes the runs of a leader killed mid-run, and cron
//! ticks fire once. Run by `.ci/run` with `COURIER_TEST_DATABASE_URL` set
//! (a PostgreSQL server: `postgres://user:pass@host/postgres`).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::Cluster;

/// Tests here share the PostgreSQL server: the one that restarts it holds
/// the write guard.
static SERVER: std::sync::RwLock<()> = std::sync::RwLock::new(());

fn shared_server() -> std::sync::RwLockReadGuard<'static, ()> {
    SERVER.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A database of its own on the test server, dropped afterwards.
struct Database {
    server: String,
    name: String,
    url: String,
}

impl Database {
    /// `None` (and a note) when no server is configured.
    fn create() -> Option<Self> {
        let Some(server) = std::env::var("COURIER_TEST_DATABASE_URL")
            .ok()
            .filter(|s| !s.is_empty())
        else {
            eprintln!("COURIER_TEST_DATABASE_URL is unset: the PostgreSQL tests run in .ci/run");
            return None;
        };
        let name = format!("courier_it_{}", uuid::Uuid::now_v7().simple());
        let mut admin = postgres::Client::connect(&server, postgres::NoTls).unwrap();
        admin.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
        let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Some(Self { server, name, url })
    }

    fn query(&self, sql: &str) -> Vec<postgres::Row> {
        postgres::Client::connect(&self.url, postgres::NoTls)
            .unwrap()
            .query(sql, &[])
            .unwrap()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        if let Ok(mut admin) = postgres::Client::connect(&self.server, postgres::NoTls) {
            let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
    }
}

/// A second scheduler beside a cluster's own: its own data folder, the same
/// database, namespace and config.
struct Standby {
    child: Child,
    api: String,
    log: PathBuf,
}

impl Standby {
    fn start(cluster: &Cluster, name: &str) -> Self {
        let data = cluster.dir.path().join(format!("data-{name}"));
        std::fs::create_dir_all(&data).unwrap();
        let log = cluster.dir.path().join(format!("99-scheduler-{name}.log"));
        let child = cluster
            .courier()
            .env("COURIER_DATA_DIR", &data)
            .arg("scheduler")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        let api = loop {
            if let Ok(addr) = std::fs::read_to_string(data.join("api.addr"))
                && !addr.is_empty()
            {
                break format!("http://{addr}");
            }
            assert!(Instant::now() < deadline, "second scheduler did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        Self { child, api, log }
    }

    fn health(&self) -> Value {
        reqwest::blocking::get(format!("{}/healthz", self.api))
            .unwrap()
            .json()
            .unwrap()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every process's log in a cluster's folder.
fn all_logs(dir: &std::path::Path) -> String {
    let mut files: Vec<_> = std::fs::read_dir(dir).unwrap().flatten().map(|e| e.path()).collect();
    files.sort();
    files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .map(|p| {
            format!(
                "--- {} ---\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect()
}

fn submit(api: &str, workflow: &str) -> String {
    let answer: Value = reqwest::blocking::Client::new()
        .post(format!("{api}/api/runs"))
        .json(&serde_json::json!({ "workflow": workflow }))
        .send()
        .unwrap()
        .json()
        .unwrap();
    answer["id"].as_str().unwrap_or_else(|| panic!("{answer}")).to_string()
}

fn run(api: &str, id: &str) -> Value {
    reqwest::blocking::get(format!("{api}/api/runs/{id}"))
        .unwrap()
        .json()
        .unwrap()
}

fn wait_done(api: &str, id: &str, timeout: Duration, logs: &dyn Fn() -> String) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let run = run(api, id);
        if run["status"] != "running" {
            return run;
        }
        assert!(Instant::now() < deadline, "run {id} still running: {}", logs());
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// 300 steps of 50 ms; each appends its name to `runs.log` in the config
/// folder, so executions can be counted.
fn wide(count: usize) -> String {
    let mut yaml = String::from("steps:\n");
    for i in 0..count {
        yaml.push_str(&format!(
            "  - name: s{i}\n    command: [\"sh\", \"-c\", \"sleep 0.05; echo s{i} >> \\\"$0\\\"; echo s{i}\", \"${{log}}\"]\n"
        ));
    }
    yaml
}

#[test]
fn two_schedulers_share_postgres_and_one_finishes_the_runs_of_the_other_killed_mid_run() {
    let _server = shared_server();
    let Some(db) = Database::create() else { return };
    let log = tempfile::NamedTempFile::new().unwrap();
    let log_path = log.path().display().to_string();
    let yaml = wide(300).replacen("steps:\n", &format!("params:\n  log: \"{log_path}\"\nsteps:\n"), 1);
    let small = "steps:\n  - name: a\n    echo: a\n  - name: b\n    depends: [a]\n    echo: b\n";
    let mut cluster = Cluster::builder()
        .env("COURIER_DATABASE_URL", &db.url)
        .workers(3)
        .workflow("wide", &yaml)
        .workflow("small", small)
        .start();
    let standby = Standby::start(&cluster, "b");
    let dir = cluster.dir.path().to_path_buf();
    let logs = move || all_logs(&dir);
    // The first scheduler leads (once connected to the broker).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let health: Value = reqwest::blocking::get(format!("{}/healthz", cluster.api))
            .unwrap()
            .json()
            .unwrap();
        if health["status"] == "ok" {
            break;
        }
        assert!(Instant::now() < deadline, "the first scheduler does not lead: {health}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while standby.health()["status"] != "standby" {
        assert!(Instant::now() < deadline, "{}", standby.health());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Runs submitted to either complete: the standby's tasks are published by the leader.
    let (on_a, on_b) = (submit(&cluster.api, "small"), submit(&standby.api, "small"));
    for id in [&on_a, &on_b] {
        let done = wait_done(&standby.api, id, Duration::from_secs(30), &logs);
        assert_eq!(done["status"], "succeeded", "{done:#}");
    }

    // A wide run submitted to the leader, which is killed while it runs.
    let id = submit(&cluster.api, "wide");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let view = run(&standby.api, &id);
        let done = view["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .count();
        if done >= 30 {
            assert!(done < 250, "the run nearly finished before the kill: {done}");
            break;
        }
        assert!(Instant::now() < deadline, "the wide run did not start: {}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.kill_scheduler();
    let killed = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(15);
    while standby.health()["status"] != "ok" {
        assert!(Instant::now() < deadline, "the standby never led: {}", logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    let took_over = killed.elapsed();
    let done = wait_done(&standby.api, &id, Duration::from_secs(120), &logs);
    assert_eq!(done["status"], "succeeded", "{done:#}");
    let steps = done["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 300);
    for step in steps {
        assert_eq!(step["status"], "succeeded", "{step}");
        assert_eq!(step["attempts"], 1, "one attempt each: {step}");
        assert_eq!(step["output"], step["name"], "{step}");
    }
    // Applied once: one task row per step, each with one result.
    let rows = db.query(&format!(
        "SELECT COUNT(*), COUNT(DISTINCT step), COUNT(*) FILTER (WHERE status = 'succeeded') FROM tasks WHERE run_id = '{id}'"
    ));
    let (tasks, distinct, succeeded): (i64, i64, i64) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((tasks, distinct, succeeded), (300, 300, 300));
    // Executed: every step at least once; a task the dead leader published
    // but had not yet marked is published again (at-least-once delivery).
    let executed = std::fs::read_to_string(log.path()).unwrap();
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for line in executed.lines() {
        *counts.entry(line).or_default() += 1;
    }
    assert_eq!(counts.len(), 300, "every step ran");
    let again: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    eprintln!(
        "standby led {:.1} s after the kill; {} of 300 steps ran twice: {again:?}",
        took_over.as_secs_f64(),
        again.len()
    );
    assert!(took_over < Duration::from_secs(5), "took over in {took_over:?}");
}

#[test]
fn cron_with_two_schedulers_fires_once_per_tick() {
    let _server = shared_server();
    let Some(db) = Database::create() else { return };
    let yaml = "schedule: \"* * * * * *\"\nsteps:\n  - name: tick\n    echo: tock\n";
    let cluster = Cluster::builder()
        .env("COURIER_DATABASE_URL", &db.url)
        .workers(1)
        .workflow("tick", yaml)
        .start();
    let standby = Standby::start(&cluster, "b");
    std::thread::sleep(Duration::from_secs(6));
    let logs = || format!("{}\n--- scheduler b ---\n{}", cluster.logs(), standby.log());
    // One statement: one snapshot (a tick's claim and its run commit together).
    let rows = db.query(
        "SELECT (SELECT COUNT(*) FROM cron_fires WHERE workflow = 'tick'),
                (SELECT COUNT(DISTINCT tick_ms) FROM cron_fires WHERE workflow = 'tick'),
                (SELECT COUNT(*) FROM runs WHERE workflow = 'tick')",
    );
    let (fired, ticks, runs): (i64, i64, i64) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    // Six seconds of a schedule of every second: about six ticks, not twelve.
    assert!((4..=8).contains(&fired), "ticks fired: {fired}\n{}", logs());
    assert_eq!(fired, ticks, "one claim per tick");
    assert_eq!(runs, fired, "one run per tick\n{}", logs());
    // Both schedulers tried ticks: each lost some to the other, or to itself before.
    let lost = |log: &str| log.matches("this tick was fired already").count();
    let (a, b) = (lost(&cluster.log("scheduler")), lost(&standby.log()));
    assert!(
        a + b >= 3,
        "both schedulers fire the schedule: {a} and {b} ticks lost\n{}",
        logs()
    );
}

#[test]
fn a_postgresql_restart_mid_run_loses_nothing() {
    let _server = SERVER.write().unwrap_or_else(std::sync::PoisonError::into_inner);
    let Some(db) = Database::create() else { return };
    if !(db.server.contains("@127.0.0.1:5432/") || db.server.contains("@localhost:5432/")) {
        eprintln!("the PostgreSQL server is not this machine's cluster on :5432: not restarting it");
        return;
    }
    let Some(version) = std::fs::read_dir("/usr/lib/postgresql")
        .ok()
        .and_then(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).max())
    else {
        eprintln!("no local PostgreSQL cluster to restart");
        return;
    };
    let log = tempfile::NamedTempFile::new().unwrap();
    // About 19 s of steps on 8 slots: longer than a restart and the
    // reconnections after it take on a slow machine (with 0.5 s steps, 6 s
    // of them, every task could end during the outage and the run with
    // the first results applied after it).
    let yaml = wide(100).replace("sleep 0.05", "sleep 1.5").replacen(
        "steps:\n",
        &format!("params:\n  log: \"{}\"\nsteps:\n", log.path().display()),
        1,
    );
    let cluster = Cluster::builder()
        .env("COURIER_DATABASE_URL", &db.url)
        .workers(2)
        .workflow("wide", &yaml)
        .start();
    let standby = Standby::start(&cluster, "b");
    let dir = cluster.dir.path().to_path_buf();
    let logs = move || all_logs(&dir);
    let id = submit(&cluster.api, "wide");
    let deadline = Instant::now() + Duration::from_secs(60);
    while run(&cluster.api, &id)["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "succeeded")
        .count()
        < 10
    {
        assert!(Instant::now() < deadline, "the run did not start: {}", logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    let restarted = std::process::Command::new("pg_ctlcluster")
        .args([&version, "main", "restart", "-m", "fast"])
        .status()
        .unwrap();
    assert!(restarted.success());
    // The restart happened during the run: it is still running once the
    // database answers again.
    let deadline = Instant::now() + Duration::from_secs(30);
    let after = loop {
        let answer = reqwest::blocking::get(format!("{}/api/runs/{id}", standby.api))
            .ok()
            .and_then(|r| r.json::<Value>().ok());
        if let Some(view) = answer.filter(|v| v["status"].is_string()) {
            break view;
        }
        assert!(Instant::now() < deadline, "no answer after the restart: {}", logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        after["status"], "running",
        "the run ended before the restart took effect"
    );
    // Whichever scheduler leads now finishes it; either answers.
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let answer = reqwest::blocking::get(format!("{}/api/runs/{id}", standby.api))
            .ok()
            .and_then(|r| r.json::<Value>().ok());
        if let Some(view) = answer.filter(|v| v["status"].is_string() && v["status"] != "running") {
            break view;
        }
        assert!(
            Instant::now() < deadline,
            "the run did not finish after the restart: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(done["status"], "succeeded", "{done:#}");
    for step in done["steps"].as_array().unwrap() {
        assert_eq!(step["status"], "succeeded", "{step}");
        assert_eq!(step["output"], step["name"], "{step}");
    }
    let rows = db.query(&format!(
        "SELECT COUNT(*), COUNT(DISTINCT step), COUNT(*) FILTER (WHERE status = 'succeeded') FROM tasks WHERE run_id = '{id}'"
    ));
    let (tasks, distinct, succeeded): (i64, i64, i64) = (rows[0].get(0), rows[0].get(1), rows[0].get(2));
    assert_eq!((distinct, succeeded), (100, 100), "{tasks} task rows");
    let all = logs();
    assert!(
        all.contains("PostgreSQL connection lost; reconnecting") || all.contains("leadership connection failed"),
        "no scheduler saw the restart: {all}"
    );
}
