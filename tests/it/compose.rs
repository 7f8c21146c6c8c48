//! The shipped `docker-compose.yml`, run for real on images built here with
//! no registry (`tests/compose/build-images.sh`, `tests/compose/local.yml`):
//! scaled, submitted to through the published API, and broken the way a
//! deployment breaks (a worker container killed, the scheduler restarted,
//! workers scaled during a run), asserting from the scheduler's API.
//!
//! They run when `COURIER_COMPOSE=1` (`.ci/run` sets it when a Docker engine
//! answers, after building the images); otherwise each says why it skipped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn enabled(test: &str) -> bool {
    let on = std::env::var("COURIER_COMPOSE").is_ok_and(|v| v == "1");
    if !on {
        eprintln!(
            "{test}: skipped: set COURIER_COMPOSE=1 with a Docker engine, after `bash tests/compose/build-images.sh`"
        );
    }
    on
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

/// A compose project of its own: its env file (fresh secrets, free ports),
/// its config folder (the example's plus the tests' workflows); brought
/// down with its volumes when dropped.
struct Stack {
    project: String,
    /// The compose files, from the repository's root.
    files: &'static [&'static str],
    dir: tempfile::TempDir,
    api: String,
    prometheus: String,
    token: String,
}

/// Every step a command that sleeps, then prints which worker ran it.
fn wide(steps: usize, sleep: &str) -> String {
    let mut yaml = String::from("steps:\n");
    for i in 0..steps {
        yaml.push_str(&format!(
            "  - name: s{i}\n    timeout: 2m\n    command: [sh, -c, 'sleep {sleep}; echo done']\n"
        ));
    }
    yaml
}

const REMEMBER_MODEL: &str = "provider: scripted
model: remember
script:
  - tool_calls:
      - name: propose_memory_update
        arguments: {scope: global, text: 'compose memory survives'}
      - name: output
        arguments: {text: remembered}
";

const REMEMBER: &str = "steps:
  - name: note
    agent: {model: remember, prompt: remember this, tools: [propose_memory_update, output]}
";

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The shipped file on the local images.
const SHIPPED: &[&str] = &["docker-compose.yml", "tests/compose/local.yml"];
/// A three-node RabbitMQ cluster, a scheduler and workers.
const CLUSTER: &[&str] = &["tests/compose/cluster.yml"];

impl Stack {
    fn up(workers: usize) -> Self {
        let stack = Self::new(SHIPPED);
        let started = Instant::now();
        stack.compose(&["up", "-d", "--no-build", "--scale", &format!("worker={workers}")]);
        stack.wait_healthy();
        eprintln!("{}: up and healthy in {:?}", stack.project, started.elapsed());
        stack
    }

    /// The cluster file: the three nodes first, clustered, then Courier.
    fn cluster(workers: usize) -> Self {
        let stack = Self::new(CLUSTER);
        let started = Instant::now();
        stack.compose(&["up", "-d", "rabbit1", "rabbit2", "rabbit3"]);
        stack.wait_cluster(3);
        stack.compose(&[
            "up",
            "-d",
            "--scale",
            &format!("worker={workers}"),
            "scheduler",
            "worker",
        ]);
        stack.wait_healthy();
        eprintln!("{}: cluster and Courier up in {:?}", stack.project, started.elapsed());
        stack
    }

    fn new(files: &'static [&'static str]) -> Self {
        let dir = tempfile::TempDir::new().unwrap();
        let config = dir.path().join("config");
        crate::support::copy_dir(&repo().join("config"), &config);
        std::fs::write(config.join("workflows/wide.yaml"), wide(60, "0.2")).unwrap();
        std::fs::write(config.join("workflows/slow.yaml"), wide(60, "2")).unwrap();
        std::fs::write(config.join("workflows/remember.yaml"), REMEMBER).unwrap();
        std::fs::write(config.join("agents/models/remember.yaml"), REMEMBER_MODEL).unwrap();
        // Read by the scheduler's own user in the container.
        Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(dir.path())
            .status()
            .unwrap();
        for image in [
            "courier-local/courier:latest",
            "courier-local/rabbitmq:latest",
            "courier-local/prometheus:latest",
        ] {
            let found = Command::new("docker")
                .args(["image", "inspect", image])
                .output()
                .unwrap();
            assert!(
                found.status.success(),
                "no image {image} (nothing may be pulled): run `bash tests/compose/build-images.sh` first"
            );
        }
        let secret = || uuid::Uuid::now_v7().simple().to_string();
        let (api_port, prom_port) = (free_port(), free_port());
        let token = secret();
        let env = format!(
            "RABBITMQ_USER=courier\nRABBITMQ_PASSWORD={}\nCOURIER_SIGNING_KEY={}\nCOURIER_API_TOKEN={token}\n\
             GRAFANA_ADMIN_PASSWORD={}\nWORKER_CONCURRENCY=2\nCOURIER_API_PORT={api_port}\n\
             RABBITMQ_UI_PORT={}\nPROMETHEUS_PORT={prom_port}\nGRAFANA_PORT={}\nCOURIER_CONFIG={}\n\
             RABBITMQ_COOKIE={}\n",
            secret(),
            secret(),
            secret(),
            free_port(),
            free_port(),
            config.display(),
            secret(),
        );
        let env_file = dir.path().join("env");
        std::fs::write(&env_file, env).unwrap();
        // It holds the stack's secrets.
        std::fs::set_permissions(&env_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        Self {
            project: format!("courier-it-{}", &uuid::Uuid::now_v7().simple().to_string()[20..]),
            files,
            dir,
            api: format!("http://127.0.0.1:{api_port}"),
            prometheus: format!("http://127.0.0.1:{prom_port}"),
            token,
        }
    }

    /// Wait until the cluster, asked through its first node, has `nodes` running.
    fn wait_cluster(&self, nodes: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let out = self.try_compose(&[
                "exec",
                "-T",
                "rabbit1",
                "rabbitmqctl",
                "-q",
                "cluster_status",
                "--formatter",
                "json",
            ]);
            let status: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
            let running = status["running_nodes"].as_array().map_or(0, Vec::len);
            if running == nodes {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster has {running} nodes running\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The container of a one-replica service.
    fn container(&self, service: &str) -> String {
        self.containers(service).remove(0)
    }

    /// `docker-compose` on the shipped file and the local override; fails the test on error.
    fn compose(&self, args: &[&str]) -> Output {
        let out = self.try_compose(args);
        assert!(
            out.status.success(),
            "docker-compose {args:?}: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        out
    }

    fn try_compose(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("docker-compose");
        // The env file decides: a variable exported in the caller's shell
        // would override it.
        for var in [
            "RABBITMQ_USER",
            "RABBITMQ_PASSWORD",
            "RABBITMQ_COOKIE",
            "COURIER_SIGNING_KEY",
            "COURIER_API_TOKEN",
            "GRAFANA_ADMIN_PASSWORD",
            "WORKER_CONCURRENCY",
            "COURIER_API_PORT",
            "RABBITMQ_UI_PORT",
            "PROMETHEUS_PORT",
            "GRAFANA_PORT",
            "COURIER_CONFIG",
            "OPENAI_API_KEY",
            "ANTHROPIC_API_KEY",
        ] {
            cmd.env_remove(var);
        }
        cmd.current_dir(repo())
            .args(["-p", &self.project, "--env-file"])
            .arg(self.dir.path().join("env"));
        for file in self.files {
            cmd.args(["-f", file]);
        }
        cmd.args(args).output().expect("docker-compose")
    }

    fn logs(&self) -> String {
        let out = self.try_compose(&["logs", "--no-color", "--tail", "40"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_healthy(&self) {
        let deadline = Instant::now() + Duration::from_secs(180);
        loop {
            let ok = reqwest::blocking::get(format!("{}/healthz", self.api)).is_ok_and(|r| r.status().is_success());
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the scheduler never answered\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn client(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        reqwest::blocking::Client::new()
            .request(method, format!("{}{path}", self.api))
            .bearer_auth(&self.token)
    }

    fn submit(&self, workflow: &str) -> String {
        let response = self
            .client(reqwest::Method::POST, "/api/runs")
            .json(&json!({"workflow": workflow}))
            .send()
            .unwrap();
        assert!(response.status().is_success(), "{:?}", response.text());
        response.json::<Value>().unwrap()["id"].as_str().unwrap().to_string()
    }

    fn run(&self, id: &str) -> Value {
        // The scheduler may be restarting: ask again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.client(reqwest::Method::GET, &format!("/api/runs/{id}")).send() {
                Ok(r) if r.status().is_success() => return r.json().unwrap(),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(500)),
                other => panic!("GET run {id}: {other:?}\n{}", self.logs()),
            }
        }
    }

    fn wait_run(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id);
            if run["status"] != "running" {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} still running\n{run:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Wait until every container of `service` is healthy (its healthcheck).
    fn wait_service_healthy(&self, service: &str) {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let ids = self.containers(service);
            let healthy = ids.iter().all(|id| {
                let out = Command::new("docker")
                    .args(["inspect", "-f", "{{.State.Health.Status}}", id])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout).trim() == "healthy"
            });
            if !ids.is_empty() && healthy {
                return;
            }
            assert!(Instant::now() < deadline, "{service} never healthy\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// A counter of the scheduler's `/metrics` (summed over its labels).
    fn counter(&self, name: &str) -> f64 {
        let text = self
            .client(reqwest::Method::GET, "/metrics")
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The run is still running (a disruption landed mid-run).
    fn assert_running(&self, id: &str) {
        assert_eq!(self.run(id)["status"], "running", "the run ended before the disruption");
    }

    /// Every result the scheduler received (since it started) was applied
    /// once or refused as a duplicate (a redelivered task's second result):
    /// received - duplicates = the steps it applied.
    fn assert_applied_once(&self, steps: f64) {
        let received = self.counter("courier_results_received_total");
        let duplicates = self.counter("courier_results_duplicate_total");
        assert_eq!(
            received - duplicates,
            steps,
            "received {received}, duplicates {duplicates}"
        );
        eprintln!("results: {received} received, {duplicates} duplicates");
    }

    /// Steps that succeeded, by the scheduler's records.
    fn succeeded(&self, id: &str) -> usize {
        let run = self.run(id);
        run["steps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["status"] == "succeeded")
            .count()
    }

    fn wait_succeeded(&self, id: &str, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(120);
        while self.succeeded(id) < at_least {
            assert!(Instant::now() < deadline, "run {id} stalled\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    fn containers(&self, service: &str) -> Vec<String> {
        let out = self.compose(&["ps", "-q", service]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect()
    }

    /// Every step succeeded, each applied once (one attempt recorded), and
    /// the workers that ran them.
    fn assert_complete(&self, run: &Value, steps: usize) -> BTreeSet<String> {
        assert_eq!(run["status"], "succeeded", "{run:#}\n{}", self.logs());
        let all = run["steps"].as_array().unwrap();
        assert_eq!(all.len(), steps);
        for s in all {
            assert_eq!(
                (&s["status"], &s["output"], &s["attempts"]),
                (&json!("succeeded"), &json!("done"), &json!(1)),
                "{s:#}"
            );
        }
        all.iter().map(|s| s["worker"].as_str().unwrap().to_string()).collect()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.try_compose(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

#[test]
fn compose_runs_a_wide_run_on_every_worker_and_prometheus_scrapes_them_all() {
    if !enabled("compose_runs_a_wide_run_on_every_worker_and_prometheus_scrapes_them_all") {
        return;
    }
    let stack = Stack::up(3);
    stack.wait_service_healthy("worker");
    let started = Instant::now();
    let id = stack.submit("wide");
    let run = stack.wait_run(&id, Duration::from_secs(120));
    eprintln!("60 steps on 3 workers in {:?}", started.elapsed());
    let workers = stack.assert_complete(&run, 60);
    assert_eq!(workers.len(), 3, "every worker took tasks: {workers:?}");
    stack.assert_applied_once(60.0);
    // Prometheus finds every worker replica and scrapes it.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let targets: Value = reqwest::blocking::get(format!("{}/api/v1/targets", stack.prometheus))
            .and_then(|r| r.json())
            .unwrap_or(Value::Null);
        let up = |job: &str| {
            targets["data"]["activeTargets"]
                .as_array()
                .map(|all| {
                    all.iter()
                        .filter(|t| t["labels"]["job"] == job && t["health"] == "up")
                        .count()
                })
                .unwrap_or(0)
        };
        if (up("courier-worker"), up("courier-scheduler"), up("rabbitmq")) == (3, 1, 1) {
            break;
        }
        assert!(Instant::now() < deadline, "targets: {targets:#}");
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn compose_keeps_agent_memory_in_its_volume_across_down_and_up() {
    if !enabled("compose_keeps_agent_memory_in_its_volume_across_down_and_up") {
        return;
    }
    let stack = Stack::up(1);
    let id = stack.submit("remember");
    let run = stack.wait_run(&id, Duration::from_secs(60));
    assert_eq!(run["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["steps"][0]["error"],
        Value::Null,
        "the memory update was written: {run:#}"
    );
    let memory = || {
        let out = stack.compose(&["exec", "-T", "scheduler", "cat", "/config/agents/memory/MEMORY.md"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(memory().contains("compose memory survives"), "{}", memory());
    stack.compose(&["down", "-t", "5"]);
    stack.compose(&["up", "-d", "--no-build"]);
    stack.wait_healthy();
    assert!(memory().contains("compose memory survives"), "{}", memory());
    // And the run's record survived in the scheduler's volume.
    assert_eq!(stack.run(&id)["status"], "succeeded");
}

#[test]
fn compose_runs_complete_through_a_killed_worker_a_restarted_scheduler_and_scaling() {
    if !enabled("compose_runs_complete_through_a_killed_worker_a_restarted_scheduler_and_scaling") {
        return;
    }
    let stack = Stack::up(3);
    stack.wait_service_healthy("worker");
    let id = stack.submit("slow");
    stack.wait_succeeded(&id, 6);
    // A worker container killed with steps running (each runs two of the
    // 2-second steps at a time): its tasks go to the others.
    let victim = stack.containers("worker").remove(0);
    let killed = Command::new("docker").args(["kill", &victim]).output().unwrap();
    assert!(killed.status.success(), "{killed:?}");
    stack.assert_running(&id);
    stack.wait_succeeded(&id, 12);
    // The scheduler restarted mid-run.
    stack.compose(&["restart", "-t", "10", "scheduler"]);
    stack.wait_healthy();
    stack.assert_running(&id);
    let applied_before_scaling = stack.succeeded(&id);
    // Scaled up (the killed replica back, and three more), then down to
    // one, during the run.
    stack.compose(&["up", "-d", "--no-build", "--no-recreate", "--scale", "worker=6"]);
    assert_eq!(stack.containers("worker").len(), 6);
    stack.assert_running(&id);
    stack.wait_succeeded(&id, 30);
    // Scaled down mid-run: the five replicas drain their steps while the
    // command stops them, which on a slow machine can take as long as what
    // is left of the run, so the run is checked before it, not after.
    stack.assert_running(&id);
    stack.compose(&["up", "-d", "--no-build", "--no-recreate", "--scale", "worker=1"]);
    let run = stack.wait_run(&id, Duration::from_secs(180));
    let workers = stack.assert_complete(&run, 60);
    assert!(workers.len() >= 4, "the scaled-up workers took steps too: {workers:?}");
    // Since its restart, the scheduler applied each of the remaining steps once.
    let remaining = 60 - applied_before_scaling;
    let received = stack.counter("courier_results_received_total");
    let duplicates = stack.counter("courier_results_duplicate_total");
    assert!(
        received - duplicates >= remaining as f64 && received - duplicates <= 60.0,
        "received {received}, duplicates {duplicates}, {remaining} steps left at the restart"
    );
}

/// `docker` with these arguments; fails the test on error.
fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn compose_a_three_node_broker_cluster_loses_nothing_when_a_node_is_cut_off_and_another_stopped() {
    if !enabled("compose_a_three_node_broker_cluster_loses_nothing_when_a_node_is_cut_off_and_another_stopped") {
        return;
    }
    let stack = Stack::cluster(2);
    // Quorum queues declared with `quorum_group_size` 3: a member on each node.
    let out = stack.compose(&[
        "exec",
        "-T",
        "rabbit1",
        "rabbitmqctl",
        "-q",
        "list_queues",
        "name",
        "type",
        "members",
        "--formatter",
        "json",
    ]);
    let queues: Value = serde_json::from_slice(&out.stdout).unwrap();
    let quorum: Vec<&Value> = queues
        .as_array()
        .unwrap()
        .iter()
        .filter(|q| q["type"] == "quorum")
        .collect();
    assert!(
        quorum.len() >= 3,
        "results, dead letters and the default pool: {queues:#}"
    );
    for queue in quorum {
        assert_eq!(queue["members"].as_array().map(Vec::len), Some(3), "{queue:#}");
    }
    // The node everything connected to (the first URL) is cut off the
    // network during a run.
    let first = stack.submit("slow");
    stack.wait_succeeded(&first, 8);
    let network = format!("{}_default", stack.project);
    let rabbit1 = stack.container("rabbit1");
    let before = stack.succeeded(&first);
    let cut = Instant::now();
    docker(&["network", "disconnect", &network, &rabbit1]);
    stack.assert_running(&first);
    stack.wait_succeeded(&first, before + 1);
    eprintln!("rabbit1 cut off: the next step succeeded {:?} later", cut.elapsed());
    let run = stack.wait_run(&first, Duration::from_secs(300));
    stack.assert_complete(&run, 60);
    // Back on the network, and restarted (partition handling `ignore`): it
    // rejoins the cluster.
    docker(&["network", "connect", "--alias", "rabbit1", &network, &rabbit1]);
    stack.compose(&["restart", "-t", "10", "rabbit1"]);
    stack.wait_cluster(3);
    // Another node stopped during a second run.
    let second = stack.submit("slow");
    stack.wait_succeeded(&second, 8);
    let before = stack.succeeded(&second);
    let stopped = Instant::now();
    stack.compose(&["stop", "-t", "5", "rabbit2"]);
    stack.assert_running(&second);
    stack.wait_succeeded(&second, before + 1);
    eprintln!("rabbit2 stopped: the next step succeeded {:?} later", stopped.elapsed());
    let run = stack.wait_run(&second, Duration::from_secs(300));
    stack.assert_complete(&run, 60);
    // The scheduler never restarted: all 120 results went through it, each
    // applied once or refused as a duplicate.
    stack.assert_applied_once(120.0);
}
