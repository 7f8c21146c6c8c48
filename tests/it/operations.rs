//! Operations: the compose file, the Dockerfile, metrics and the dashboard.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::cluster::Cluster;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

/// The secrets the compose file requires from `.env`.
const COMPOSE_SECRETS: &[&str] = &[
    "RABBITMQ_USER",
    "RABBITMQ_PASSWORD",
    "COURIER_SIGNING_KEY",
    "COURIER_API_TOKEN",
    "GRAFANA_ADMIN_PASSWORD",
];

/// `docker-compose <args>` on the shipped file with these variables only (an
/// empty env file, so a developer's `.env` does not count).
fn compose(args: &[&str], vars: &[(&str, &str)]) -> std::process::Output {
    let empty = tempfile::NamedTempFile::new().unwrap();
    let mut cmd = std::process::Command::new("docker-compose");
    cmd.arg("--env-file").arg(empty.path()).args(args).current_dir(repo());
    for name in COMPOSE_SECRETS
        .iter()
        .chain(["WORKER_CONCURRENCY", "OPENAI_API_KEY", "ANTHROPIC_API_KEY"].iter())
    {
        cmd.env_remove(name);
    }
    cmd.envs(vars.iter().copied());
    cmd.output()
        .expect("docker-compose is needed: apt-get install docker-compose")
}

fn all_secrets() -> Vec<(&'static str, &'static str)> {
    COMPOSE_SECRETS.iter().map(|k| (*k, "it-value")).collect()
}

#[test]
fn the_compose_file_validates_and_names_every_service() {
    let out = compose(&["config", "-q"], &all_secrets());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = compose(&["--profile", "local-llm", "config", "--services"], &all_secrets());
    let services: BTreeSet<String> = String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect();
    for s in [
        "rabbitmq",
        "scheduler",
        "worker",
        "prometheus",
        "grafana",
        "ollama",
        "ollama-pull",
    ] {
        assert!(services.contains(s), "no {s} service in {services:?}");
    }
    let compose = std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap();
    for file in [
        "config/rabbitmq/enabled_plugins",
        "config/rabbitmq/rabbitmq.conf",
        "config/prometheus/prometheus.yml",
        "config/grafana/provisioning",
        "config/grafana/dashboards",
    ] {
        assert!(compose.contains(&format!("./{file}")), "compose does not mount {file}");
        assert!(repo().join(file).exists(), "{file} is missing");
    }
}

#[test]
fn the_compose_file_refuses_to_start_without_its_secrets() {
    for missing in COMPOSE_SECRETS {
        let vars: Vec<(&str, &str)> = all_secrets().into_iter().filter(|(k, _)| k != missing).collect();
        let out = compose(&["config", "-q"], &vars);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "compose accepted a missing {missing}");
        assert!(
            stderr.contains(&format!("set {missing} in .env (see .env.example)")),
            "{missing}: {stderr}"
        );
    }
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    assert!(ignored.lines().any(|l| l == ".env"), "{ignored}");
}

#[test]
fn the_compose_file_publishes_only_on_loopback_and_keeps_the_broker_inside() {
    let out = compose(&["--profile", "local-llm", "config"], &all_secrets());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let resolved: serde_yaml_ng::Value = serde_yaml_ng::from_slice(&out.stdout).unwrap();
    let mut published = BTreeSet::new();
    for (name, service) in resolved["services"].as_mapping().unwrap() {
        let name = name.as_str().unwrap();
        for port in service["ports"].as_sequence().into_iter().flatten() {
            let port = port
                .as_str()
                .unwrap_or_else(|| panic!("{name}: long-form port {port:?}"));
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
            published.insert(format!("{name} {port}"));
        }
    }
    assert_eq!(
        published,
        BTreeSet::from([
            "grafana 127.0.0.1:3000:3000/tcp".to_string(),
            "prometheus 127.0.0.1:9090:9090/tcp".to_string(),
            "rabbitmq 127.0.0.1:15672:15672/tcp".to_string(),
            "scheduler 127.0.0.1:8080:8080/tcp".to_string(),
        ])
    );
    // Workers start without waiting for the model download.
    let worker = &resolved["services"]["worker"];
    let depends: Vec<&str> = match &worker["depends_on"] {
        serde_yaml_ng::Value::Mapping(m) => m.keys().filter_map(|k| k.as_str()).collect(),
        other => other
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str())
            .collect(),
    };
    assert_eq!(depends, ["rabbitmq"]);
    for service in ["scheduler", "worker"] {
        let test = &resolved["services"][service]["healthcheck"]["test"];
        assert_eq!(test[1], "courier", "{service}: {test:?}");
        assert!(test[3].as_str().unwrap().ends_with("/healthz"), "{service}: {test:?}");
    }
}

#[test]
fn the_dockerfile_names_binaries_and_paths_that_exist() {
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    let toolchain = std::fs::read_to_string(repo().join("rust-toolchain.toml")).unwrap();
    let channel = toolchain
        .lines()
        .find_map(|l| l.strip_prefix("channel = "))
        .map(|c| c.trim_matches('"'))
        .unwrap();
    let minor: String = channel.split('.').take(2).collect::<Vec<_>>().join(".");
    assert!(
        dockerfile.contains(&format!("FROM rust:{minor}-")),
        "build stage must use the pinned toolchain {channel}"
    );
    // The package and binary it builds exist.
    assert!(dockerfile.contains("cargo build --release --locked -p courier"));
    assert!(dockerfile.contains("target/release/courier"));
    assert_eq!(env!("CARGO_PKG_NAME"), "courier");
    assert!(Path::new(env!("CARGO_BIN_EXE_courier")).ends_with("courier"));
    // What it copies exists, and the runtime stage runs as a non-root user.
    assert!(dockerfile.contains("COPY --chown=courier config /config"));
    assert!(repo().join("config/workflows").is_dir() && repo().join("config/agents").is_dir());
    assert!(dockerfile.contains("USER courier"));
    assert!(dockerfile.contains("ENTRYPOINT [\"courier\"]"));
}

/// Metric names in an exposition: sample names and `# TYPE` names, with the
/// `_total`, `_bucket`, `_sum`, `_count` suffixes also stripped.
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let name = match line.strip_prefix("# TYPE ") {
            Some(rest) => rest.split_whitespace().next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        };
        if let Some(name) = name.filter(|n| !n.is_empty()) {
            names.insert(name.to_string());
            for suffix in ["_total", "_bucket", "_sum", "_count"] {
                if let Some(base) = name.strip_suffix(suffix) {
                    names.insert(base.to_string());
                }
            }
        }
    }
    names
}

fn get(url: &str) -> String {
    reqwest::blocking::get(url)
        .and_then(|r| r.text())
        .unwrap_or_else(|e| panic!("GET {url}: {e}"))
}

/// A metric value (sum over label sets matching `filter`).
fn value(text: &str, name: &str, filter: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name)
                && (l.as_bytes().get(name.len()) == Some(&b'{') || l.as_bytes().get(name.len()) == Some(&b' '))
        })
        .filter(|l| l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_move_across_a_clean_run_and_cover_the_dashboard() {
    // An agent step on the scripted model too, so token metrics have samples.
    let offline = "steps:\n  - name: a\n    agent:\n      model: offline\n      prompt: hi\n      tools: [output]\n";
    let cluster = Cluster::builder()
        .workers(1)
        .workflow("offline", offline)
        .env("COURIER_WORKER_METRICS_LISTEN", "127.0.0.1:0")
        .start();
    let id = cluster.submit("fanout", &[]).unwrap();
    assert_eq!(cluster.wait_run(&id, Duration::from_secs(30))["status"], "succeeded");
    let id = cluster.submit("offline", &[]).unwrap();
    assert_eq!(cluster.wait_run(&id, Duration::from_secs(30))["status"], "succeeded");
    let worker_addr = cluster.worker_metrics_addr("w1");
    let health = reqwest::blocking::get(format!("http://{worker_addr}/healthz")).unwrap();
    assert_eq!(health.status(), 200);

    let scheduler = get(&format!("{}/metrics", cluster.api));
    let worker = get(&format!("http://{worker_addr}/metrics"));
    // Clean runs of 5 + 1 steps: published = consumed = succeeded = 6.
    assert_eq!(
        value(&scheduler, "courier_tasks_published_total", ""),
        6.0,
        "{scheduler}"
    );
    assert_eq!(
        value(&scheduler, "courier_results_received_total", "status=\"succeeded\""),
        6.0
    );
    assert_eq!(value(&scheduler, "courier_results_duplicate_total", ""), 0.0);
    assert_eq!(value(&scheduler, "courier_runs", "status=\"succeeded\""), 2.0);
    assert_eq!(
        value(&worker, "courier_worker_tasks_consumed_total", ""),
        6.0,
        "{worker}"
    );
    assert_eq!(
        value(&worker, "courier_worker_results_total", "status=\"succeeded\""),
        6.0
    );
    assert_eq!(
        value(
            &worker,
            "courier_worker_step_duration_seconds_count",
            "kind=\"command\""
        ),
        5.0
    );
    assert_eq!(
        value(&worker, "courier_worker_step_duration_seconds_count", "kind=\"agent\""),
        1.0
    );
    assert_eq!(
        value(&worker, "courier_llm_tokens_total", "model=\"scripted/offline-demo\""),
        0.0
    );
    assert_eq!(value(&worker, "courier_worker_steps_in_flight", ""), 0.0);

    // Every metric the dashboard queries is exported by Courier or by
    // RabbitMQ's Prometheus plugin (enabled by .ci/run).
    let mut known = exported(&scheduler);
    known.extend(exported(&worker));
    let broker = format!(
        "{}\n{}",
        get("http://127.0.0.1:15692/metrics"),
        get("http://127.0.0.1:15692/metrics/per-object")
    );
    known.extend(exported(&broker));
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("config/grafana/dashboards/courier.json")).unwrap())
            .unwrap();
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            for token in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                if token.starts_with("courier_") || token.starts_with("rabbitmq_") {
                    queried.insert(token.to_string());
                }
            }
        }
    }
    assert!(queried.len() >= 15, "{queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|m| !known.contains(*m)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries metrics nobody exports: {missing:?}"
    );
}

#[test]
fn a_steps_worker_logs_join_the_schedulers_trace() {
    let cluster = Cluster::builder().workers(2).env("COURIER_LOG_FORMAT", "json").start();
    let id = cluster.submit("fanout", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded");

    let json_lines = |log: &str| -> Vec<serde_json::Value> {
        log.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}")))
            .collect()
    };
    // The scheduler names the run's trace when it accepts and finishes it.
    let scheduler = json_lines(&cluster.log("scheduler"));
    let trace_of = |message: &str| {
        scheduler
            .iter()
            .find(|l| l["message"] == message && l["run"] == id.as_str())
            .and_then(|l| l["trace_id"].as_str())
            .unwrap_or_else(|| panic!("no \"{message}\" line with a trace_id for run {id}"))
            .to_string()
    };
    let trace_id = trace_of("run submitted");
    assert_eq!(trace_id.len(), 32);
    assert_eq!(trace_of("run finished"), trace_id);

    // Every step's lines on the workers carry that trace ID (from the task's
    // traceparent header) in their span, with the task as parent span.
    let mut steps_seen = BTreeSet::new();
    for worker in ["w1", "w2"] {
        for line in json_lines(&cluster.worker_log(worker)) {
            let Some(span) = line.get("span").filter(|s| s["name"] == "task") else {
                continue;
            };
            assert_eq!(span["run"], id.as_str(), "{line}");
            assert_eq!(span["trace_id"], trace_id.as_str(), "{line}");
            let task = span["task"].as_str().unwrap().replace('-', "");
            assert_eq!(span["parent_span"].as_str().unwrap(), &task[16..], "{line}");
            steps_seen.insert(span["step"].as_str().unwrap().to_string());
        }
    }
    let steps: BTreeSet<String> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(steps_seen, steps, "every step logged under the run's trace");
}

#[test]
fn status_shows_this_deployments_queues_and_recent_runs() {
    let cluster = Cluster::builder().workers(2).start();
    let id = cluster.submit("fanout", &[]).unwrap();
    assert_eq!(cluster.wait_run(&id, Duration::from_secs(30))["status"], "succeeded");
    let tasks = format!("{}.tasks.default", cluster.namespace);
    let lane = format!("{}.tasks.default.lane", cluster.namespace);
    let results = format!("{}.results", cluster.namespace);
    let dead = format!("{}.dead", cluster.namespace);
    let watch = format!("{}.dead.watch", cluster.namespace);
    let control = format!("{}.control", cluster.namespace);

    // The management API samples every few seconds: wait for both workers.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        let out = cluster.courier().args(["status", "--json"]).output().unwrap();
        let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // RabbitMQ 3.10's management API sometimes answers 500 while another
        // test deletes its queues: `status` says so and exits 1; ask again.
        assert!(
            out.status.success() || status["queues_error"].is_string(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let consumers = status["queues"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|q| q["name"] == tasks.as_str())
            .map(|q| q["consumers"].clone());
        if consumers == Some(2.into()) {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never saw 2 consumers: {status:#}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let queues = status["queues"].as_array().unwrap();
    let names: BTreeSet<&str> = queues.iter().map(|q| q["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            tasks.as_str(),
            lane.as_str(),
            results.as_str(),
            dead.as_str(),
            watch.as_str(),
            control.as_str()
        ])
    );
    // The control stream keeps what it received (workers' markers): only the queues drain.
    for q in queues.iter().filter(|q| q["name"] != control.as_str()) {
        assert_eq!(q["ready"], 0, "{q}");
        assert_eq!(q["unacked"], 0, "{q}");
        assert!(q["publish_rate"].as_f64().is_some(), "{q}");
    }
    let results_queue = queues.iter().find(|q| q["name"] == results.as_str()).unwrap();
    assert_eq!(results_queue["consumers"], 1, "the scheduler consumes results");
    assert_eq!(status["runs"][0]["id"], id.as_str());
    assert_eq!(status["runs"][0]["status"], "succeeded");

    // The table a person reads.
    let out = cluster.courier().arg("status").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("CONSUMERS") && text.contains(&tasks) && text.contains(&id),
        "{text}"
    );

    // An unreachable management API: said plainly (without the password),
    // runs still shown, exit non-zero.
    let out = cluster
        .courier()
        .arg("status")
        .env("COURIER_MANAGEMENT_URL", "http://guest:hunter2@127.0.0.1:1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{text}");
    assert!(
        text.contains("cannot reach RabbitMQ's management API at http://guest@127.0.0.1:1/"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(text.contains(&id), "{text}");
}

#[test]
fn workers_ask_the_broker_to_wait_for_the_longest_step() {
    let cluster = Cluster::builder().workers(1).start();
    let tasks = format!("{}.tasks.default", cluster.namespace);
    // Each task consumer carries x-consumer-timeout = the longest allowed
    // step (24 h) plus 10 minutes, so no valid step is cut by the broker
    // (RabbitMQ 3.12+ honours it; older brokers use rabbitmq.conf's global).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let consumers: serde_json::Value = reqwest::blocking::Client::new()
            .get("http://127.0.0.1:15672/api/consumers/%2F")
            .basic_auth("guest", Some("guest"))
            .send()
            .unwrap()
            .json()
            .unwrap();
        let mine: Vec<&serde_json::Value> = consumers
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["queue"]["name"] == tasks.as_str())
            .collect();
        if let [consumer] = mine.as_slice() {
            assert_eq!(
                consumer["arguments"]["x-consumer-timeout"],
                (24 * 3600 + 600) * 1000,
                "{consumer}"
            );
            assert_eq!(consumer["consumer_tag"], "w1:default");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no consumer on {tasks}: {consumers}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A Prometheus server from Debian's package, scraping `targets`
/// (job name, address, path) every second; killed when dropped.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[(&str, String, &str)]) -> Option<Self> {
        if !std::path::Path::new("/usr/bin/prometheus").exists() {
            eprintln!("prometheus is not installed (apt-get install prometheus): the dashboard's queries are not run");
            return None;
        }
        let dir = tempfile::TempDir::new().unwrap();
        let mut config = String::from("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n");
        for (job, addr, path) in targets {
            config.push_str(&format!(
                "  - job_name: {job}\n    metrics_path: {path}\n    static_configs:\n      - targets: ['{addr}']\n"
            ));
        }
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new("/usr/bin/prometheus")
            .arg(format!("--config.file={}", dir.path().join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reqwest::blocking::get(format!("{url}/-/ready")).map_or(true, |r| !r.status().is_success()) {
            assert!(std::time::Instant::now() < deadline, "prometheus did not start");
            std::thread::sleep(Duration::from_millis(200));
        }
        Some(Self { child, url, _dir: dir })
    }

    fn query(&self, expr: &str) -> serde_json::Value {
        reqwest::blocking::Client::new()
            .get(format!("{}/api/v1/query", self.url))
            .query(&[("query", expr)])
            .send()
            .unwrap()
            .json()
            .unwrap()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn every_dashboard_query_returns_data_from_a_deployment_after_traffic() {
    let offline = "steps:\n  - name: a\n    agent:\n      model: offline\n      prompt: hi\n      tools: [output]\n";
    let failing = "steps:\n  - name: f\n    retry: {limit: 1, backoff: 100ms}\n    command: [\"false\"]\n";
    let cluster = Cluster::builder()
        .workers(2)
        .workflow("offline", offline)
        .workflow("failing", failing)
        .env("COURIER_WORKER_METRICS_LISTEN", "127.0.0.1:0")
        .start();
    let worker_addr = |id: &str| cluster.worker_metrics_addr(id);
    let scheduler = cluster.api.trim_start_matches("http://").to_string();
    let Some(prometheus) = Prometheus::start(&[
        ("scheduler", scheduler, "/metrics"),
        ("worker1", worker_addr("w1"), "/metrics"),
        ("worker2", worker_addr("w2"), "/metrics"),
        ("rabbitmq", "127.0.0.1:15692".into(), "/metrics"),
        ("rabbitmq_queues", "127.0.0.1:15692".into(), "/metrics/per-object"),
    ]) else {
        return;
    };
    // Traffic once Prometheus watches: runs, an agent step, a failure with
    // a retry, a poison message.
    std::thread::sleep(Duration::from_secs(3));
    for workflow in ["fanout", "offline", "failing", "fanout"] {
        let id = cluster.submit(workflow, &[]).unwrap();
        cluster.wait_run(&id, Duration::from_secs(30));
    }
    cluster.publish_raw("default", b"not a task", "poison-dashboard", vec![]);
    crate::reliability::wait_dead(&cluster, 1);
    std::thread::sleep(Duration::from_secs(4));

    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(repo().join("config/grafana/dashboards/courier.json")).unwrap())
            .unwrap();
    let mut empty = Vec::new();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"]
                .as_str()
                .unwrap()
                .replace("$namespace", &cluster.namespace);
            let answer = prometheus.query(&expr);
            assert_eq!(answer["status"], "success", "{expr}: {answer}");
            checked += 1;
            if answer["data"]["result"].as_array().is_none_or(Vec::is_empty) {
                empty.push(format!("{}: {expr}", panel["title"].as_str().unwrap_or("?")));
            }
        }
    }
    assert!(checked >= 20, "{checked} queries");
    assert!(empty.is_empty(), "dashboard queries with no data: {empty:#?}");
    // Series name what they count: workers by their ID, queues of this namespace.
    let in_flight = prometheus.query("sum by (worker) (courier_worker_steps_in_flight)");
    let workers: std::collections::BTreeSet<String> = in_flight["data"]["result"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["metric"]["worker"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(workers, ["w1".to_string(), "w2".to_string()].into(), "{in_flight}");
}

/// An OTLP/HTTP receiver: keeps every span posted to `/v1/traces` (JSON).
struct OtlpReceiver {
    url: String,
    spans: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>>,
    _runtime: tokio::runtime::Runtime,
}

impl OtlpReceiver {
    fn start() -> Self {
        use axum::routing::post;
        let spans: std::sync::Arc<std::sync::Mutex<Vec<(String, serde_json::Value)>>> = Default::default();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let kept = spans.clone();
        let app = axum::Router::new().route(
            "/v1/traces",
            post(move |body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
                    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
                        let service = resource["resource"]["attributes"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .find(|a| a["key"] == "service.name")
                            .and_then(|a| a["value"]["stringValue"].as_str())
                            .unwrap_or_default()
                            .to_string();
                        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                            for span in scope["spans"].as_array().into_iter().flatten() {
                                kept.lock().unwrap().push((service.clone(), span.clone()));
                            }
                        }
                    }
                    "{}"
                }
            }),
        );
        runtime.spawn(async move { axum::serve(listener, app).await });
        Self {
            url,
            spans,
            _runtime: runtime,
        }
    }
}

#[test]
fn a_runs_spans_reach_an_otlp_receiver_as_one_trace_across_processes() {
    let receiver = OtlpReceiver::start();
    let cluster = Cluster::builder()
        .workers(2)
        .env("COURIER_OTLP_ENDPOINT", &receiver.url)
        .start();
    let id = cluster.submit("fanout", &[]).unwrap();
    let run = cluster.wait_run(&id, Duration::from_secs(30));
    assert_eq!(run["status"], "succeeded");
    let steps: BTreeSet<String> = run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect();
    let trace_id = id.replace('-', "");
    // Spans are exported in batches (every 5 s).
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let spans = receiver.spans.lock().unwrap().clone();
        let of_run: Vec<&(String, serde_json::Value)> = spans
            .iter()
            .filter(|(_, s)| s["traceId"] == trace_id.as_str())
            .collect();
        let root = of_run
            .iter()
            .find(|(service, s)| service == "courier-scheduler" && s["name"] == "run fanout");
        let tasks: Vec<&serde_json::Value> = of_run
            .iter()
            .filter(|(service, s)| {
                service == "courier-scheduler" && s["name"].as_str().unwrap_or("").starts_with("task ")
            })
            .map(|(_, s)| s)
            .collect();
        let worker_steps: Vec<&serde_json::Value> = of_run
            .iter()
            .filter(|(service, s)| service == "courier-worker" && s["name"] == "task")
            .map(|(_, s)| s)
            .collect();
        if let Some((_, root)) = root
            && tasks.len() == steps.len()
            && worker_steps.len() == steps.len()
        {
            // The scheduler's task spans hang from the run's root span, and
            // each worker's step span from its task's span.
            for task in &tasks {
                assert_eq!(task["parentSpanId"], root["spanId"], "{task}");
            }
            let task_ids: BTreeSet<&str> = tasks.iter().map(|t| t["spanId"].as_str().unwrap()).collect();
            for step in &worker_steps {
                assert!(task_ids.contains(step["parentSpanId"].as_str().unwrap()), "{step}");
            }
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "run {id}: root {}, {} task spans and {} worker spans of {} steps\n{spans:#?}",
            root.is_some(),
            tasks.len(),
            worker_steps.len(),
            steps.len()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// `courier bench`, the source of the README's figures, runs end to end:
/// the raw ceiling (with its two sides' CPU per task) and Courier
/// alternated with their median ratio, the
/// open-loop latency mode, alone and beside a wide run; a bad argument is
/// refused with the reason.
#[test]
fn bench_measures_the_ratio_repeatedly_and_the_open_loop_latency() {
    use crate::support::{courier, run};
    let url = crate::cluster::amqp_url();
    let (out, stdout, stderr) = run(courier().args([
        "bench",
        "--tasks",
        "200",
        "--steps-per-run",
        "20",
        "--repeat",
        "2",
        "--amqp-url",
        &url,
    ]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let rate = |line: &str| -> f64 { line.split_whitespace().nth(1).unwrap().parse().unwrap() };
    let lines = |prefix: &str| stdout.lines().filter(|l| l.starts_with(prefix)).count();
    assert_eq!(lines("raw ceiling "), 2, "{stdout}");
    assert_eq!(lines("ratio "), 2, "{stdout}");
    for line in stdout
        .lines()
        .filter(|l| l.starts_with("courier ") && l.contains("tasks/s"))
    {
        assert!(rate(line) > 0.0, "{line}");
    }
    let median = stdout.lines().find(|l| l.starts_with("median ratio")).expect(&stdout);
    assert!(median.contains("over 2 measurements"), "{median}");
    assert!(stdout.contains("CPU-s (") && stdout.contains(" user, "), "{stdout}");
    assert!(stdout.contains(" µs per task under load"), "{stdout}");
    // The raw side's CPU per task, each side counted: its workers are
    // processes of their own.
    for line in stdout.lines().filter(|l| l.starts_with("raw ceiling ")) {
        let after = |label: &str| -> f64 {
            let rest = &line[line.find(label).expect(line) + label.len()..];
            rest.split_whitespace().next().unwrap().parse().expect(line)
        };
        assert!(after("publisher and collector ") > 0.0, "{line}");
        assert!(after("workers ") > 0.0, "{line}");
    }

    // Its internal worker takes no real pool's tasks.
    let (out, _, stderr) = run(courier().args(["bench-raw-worker", "courier", "0", "64", "--amqp-url", &url]));
    assert!(!out.status.success());
    assert!(stderr.contains("serves only a raw ceiling's namespace"), "{stderr}");

    let (out, stdout, stderr) = run(courier().args(["bench", "--rate", "40", "--duration", "1", "--amqp-url", &url]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let latency = stdout.lines().find(|l| l.starts_with("latency")).expect(&stdout);
    assert!(latency.contains(" 40 runs "), "{latency}");

    // Beside a wide run: its time, and the small runs' latency.
    let (out, stdout, stderr) = run(courier().args([
        "bench",
        "--rate",
        "20",
        "--duration",
        "1",
        "--beside",
        "300",
        "--amqp-url",
        &url,
    ]));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let beside = stdout.lines().find(|l| l.starts_with("beside")).expect(&stdout);
    assert!(beside.contains("one run of 300 steps, submitted first: "), "{beside}");
    let latency = stdout.lines().find(|l| l.starts_with("latency")).expect(&stdout);
    assert!(latency.contains(" 20 runs "), "{latency}");
    let (out, _, stderr) = run(courier().args(["bench", "--beside", "10", "--amqp-url", &url]));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("--rate"), "{stderr}");

    let (out, _, stderr) = run(courier().args(["bench", "--repeat", "0", "--amqp-url", &url]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("--repeat takes 1 to 100"), "{stderr}");
}
