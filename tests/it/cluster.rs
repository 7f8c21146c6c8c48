//! A Courier deployment as plain processes: one scheduler and N workers of the
//! real `courier` binary against the real RabbitMQ, in a namespace of its own
//! so tests run in parallel. Dropping it kills the processes and deletes the
//! namespace's queues and exchanges.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde_json::Value;

use crate::support::{copy_dir, example_config};

/// Tests share one broker: ordinary clusters hold a read guard; a test that
/// restarts the broker holds the write guard, so it runs alone.
static BROKER: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Exclusive use of the broker (for tests that stop it).
pub fn exclusive_broker() -> std::sync::RwLockWriteGuard<'static, ()> {
    BROKER.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub fn amqp_url() -> String {
    std::env::var("COURIER_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// Builds a [`Cluster`].
pub struct Builder {
    workflows: Vec<(String, String)>,
    files: Vec<(String, String)>,
    env: Vec<(String, String)>,
    tap: bool,
    exclusive: bool,
    workers: usize,
    concurrency: usize,
    pools: Vec<String>,
}

impl Builder {
    /// Add (or replace) `workflows/NAME.yaml`.
    pub fn workflow(mut self, name: &str, yaml: &str) -> Self {
        self.workflows.push((name.into(), yaml.into()));
        self
    }

    /// Replace any file of the config folder (path relative to it).
    pub fn file(mut self, path: &str, text: &str) -> Self {
        self.files.push((path.into(), text.into()));
        self
    }

    /// Set an environment variable for every process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Copy every task and result into a tap queue (see [`Cluster::tapped`]).
    pub fn tap(mut self) -> Self {
        self.tap = true;
        self
    }

    /// Worker pools the cluster's topology has (default: `default`); workers
    /// consume them all.
    pub fn pools(mut self, pools: &[&str]) -> Self {
        self.pools = pools.iter().map(|p| (*p).to_string()).collect();
        self.env.push(("COURIER_WORKER_QUEUES".into(), self.pools.join(",")));
        self
    }

    /// The caller holds [`exclusive_broker`]; take no shared guard.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }

    /// How many workers to start (default 3).
    pub fn workers(mut self, n: usize) -> Self {
        self.workers = n;
        self
    }

    /// Steps each worker runs at once (default 4).
    #[allow(dead_code)] // used by the benchmark-style tests of later issues
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    pub fn start(self) -> Cluster {
        let guard = (!self.exclusive).then(|| BROKER.read().unwrap_or_else(std::sync::PoisonError::into_inner));
        let dir = tempfile::TempDir::new().expect("tempdir");
        let config_dir = dir.path().join("config");
        copy_dir(&example_config(), &config_dir);
        for (name, yaml) in &self.workflows {
            std::fs::write(config_dir.join("workflows").join(format!("{name}.yaml")), yaml).expect("write workflow");
        }
        for (path, text) in &self.files {
            std::fs::write(config_dir.join(path), text).expect("write config file");
        }
        let mut cluster = Cluster {
            _broker: guard,
            env: self.env,
            has_tap: self.tap,
            namespace: format!("it-{}", uuid::Uuid::now_v7()),
            data_dir: dir.path().join("data"),
            config_dir,
            dir,
            scheduler: None,
            workers: Vec::new(),
            api: String::new(),
            pools: self.pools,
            log_seq: 0,
        };
        if cluster.has_tap {
            let names = courier_amqp::Names::new(cluster.namespace.clone());
            let pools = cluster.pools.clone();
            block_on(async {
                let broker = courier_amqp::Broker::connect(&amqp_url(), names.clone(), "courier-it-tap")
                    .await
                    .expect("connect");
                broker.declare_topology(&pools, 5).await.expect("topology");
                broker
                    .declare_tap(&format!("{}.tap", names.namespace()), &pools)
                    .await
                    .expect("tap");
                let _ = broker.close().await;
            });
        }
        cluster.start_scheduler();
        for i in 0..self.workers {
            cluster.start_worker(&format!("w{}", i + 1), self.concurrency);
        }
        cluster
    }
}

pub struct Cluster {
    pub namespace: String,
    pub config_dir: PathBuf,
    pub data_dir: PathBuf,
    pub dir: tempfile::TempDir,
    scheduler: Option<Child>,
    pub workers: Vec<(String, Child)>,
    pub api: String,
    pools: Vec<String>,
    log_seq: usize,
    env: Vec<(String, String)>,
    has_tap: bool,
    _broker: Option<std::sync::RwLockReadGuard<'static, ()>>,
}

impl Cluster {
    pub fn builder() -> Builder {
        Builder {
            workflows: Vec::new(),
            files: Vec::new(),
            env: Vec::new(),
            tap: false,
            exclusive: false,
            workers: 3,
            concurrency: 4,
            pools: vec!["default".into()],
        }
    }

    /// A `courier` command set up for this cluster (namespace, folders, API).
    pub fn courier(&self) -> Command {
        let mut cmd = crate::support::courier();
        cmd.env("COURIER_AMQP_URL", amqp_url())
            .env("COURIER_NAMESPACE", &self.namespace)
            .env("COURIER_CONFIG_DIR", &self.config_dir)
            .env("COURIER_DATA_DIR", &self.data_dir)
            .env("COURIER_API_LISTEN", "127.0.0.1:0")
            .env("COURIER_API_URL", &self.api)
            .env("COURIER_CONNECT_TIMEOUT_SECS", "30")
            .env("COURIER_SHUTDOWN_GRACE_SECS", "20");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Every message the tap received so far (bodies).
    pub fn tapped(&self) -> Vec<Vec<u8>> {
        assert!(self.has_tap, "the cluster was built without .tap()");
        let names = courier_amqp::Names::new(self.namespace.clone());
        block_on(async {
            let broker = courier_amqp::Broker::connect(&amqp_url(), names.clone(), "courier-it-tap")
                .await
                .expect("connect");
            let mut consumer = broker
                .consumer(&format!("{}.tap", names.namespace()), 1000, "tap")
                .await
                .expect("consume tap");
            let mut bodies = Vec::new();
            while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_millis(500), consumer.next()).await {
                bodies.push(delivery.body.clone());
                delivery.ack().await.expect("ack");
            }
            let _ = broker.close().await;
            bodies
        })
    }

    fn log_file(&mut self, name: &str) -> std::fs::File {
        self.log_seq += 1;
        let path = self.dir.path().join(format!("{:02}-{name}.log", self.log_seq));
        std::fs::File::create(path).expect("log file")
    }

    /// Start the scheduler and wait until its API answers.
    pub fn start_scheduler(&mut self) {
        let addr_file = self.data_dir.join("api.addr");
        let _ = std::fs::remove_file(&addr_file);
        let log = self.log_file("scheduler");
        let child = self
            .courier()
            .arg("scheduler")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start scheduler");
        self.scheduler = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(addr) = std::fs::read_to_string(&addr_file)
                && !addr.is_empty()
            {
                self.api = format!("http://{addr}");
                break;
            }
            assert!(Instant::now() < deadline, "scheduler did not start:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
        // Wait until it is connected to the broker.
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::blocking::get(format!("{}/healthz", self.api)).map_or(true, |r| !r.status().is_success()) {
            assert!(
                Instant::now() < deadline,
                "scheduler never reached the broker:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILL the scheduler.
    pub fn kill_scheduler(&mut self) {
        if let Some(mut child) = self.scheduler.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a worker named `id`.
    pub fn start_worker(&mut self, id: &str, concurrency: usize) {
        let log = self.log_file(&format!("worker-{id}"));
        let child = self
            .courier()
            .args(["worker", "--worker-id", id, "--concurrency", &concurrency.to_string()])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start worker");
        self.workers.push((id.to_string(), child));
    }

    /// SIGKILL worker `id`.
    pub fn kill_worker(&mut self, id: &str) {
        let i = self.workers.iter().position(|(w, _)| w == id).expect("no such worker");
        let (_, mut child) = self.workers.remove(i);
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Peak resident memory of worker `id`, in MiB.
    pub fn worker_peak_rss_mib(&self, id: &str) -> f64 {
        let (_, child) = self.workers.iter().find(|(w, _)| w == id).expect("no such worker");
        peak_rss_mib(child.id())
    }

    /// Peak resident memory of the scheduler, in MiB.
    pub fn scheduler_peak_rss_mib(&self) -> f64 {
        peak_rss_mib(self.scheduler.as_ref().expect("no scheduler").id())
    }

    /// Where worker `id` serves `/metrics` (started with
    /// `COURIER_WORKER_METRICS_LISTEN`), from its log; waits for it.
    pub fn worker_metrics_addr(&self, id: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(addr) = self.worker_log(id).lines().find_map(|l| {
                l.split("metrics listening addr=")
                    .nth(1)
                    .and_then(|a| a.split_whitespace().next())
                    .map(str::to_string)
            }) {
                return addr;
            }
            assert!(
                Instant::now() < deadline,
                "worker {id} logged no metrics address\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The log of worker `id` so far.
    pub fn worker_log(&self, id: &str) -> String {
        self.log(&format!("worker-{id}"))
    }

    /// The log so far of one process: `scheduler` or `worker-<id>` (the
    /// latest, when it was restarted).
    pub fn log(&self, process: &str) -> String {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .expect("dir")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(&format!("-{process}.log")))
            .collect();
        files.sort();
        files
            .last()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Publish raw bytes to a pool's task queue, as a misbehaving producer would.
    pub fn publish_raw(
        &self,
        pool: &str,
        body: &[u8],
        message_id: &str,
        headers: Vec<(&'static str, courier_amqp::Header)>,
    ) {
        let exchange = courier_amqp::Names::new(self.namespace.clone()).tasks_exchange();
        self.publish(&exchange, pool, body, (message_id, "not-a-run"), headers);
    }

    /// Publish a message with these ids (message id, correlation id), as
    /// anyone who can reach the broker could.
    pub fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        body: &[u8],
        (message_id, correlation_id): (&str, &str),
        headers: Vec<(&'static str, courier_amqp::Header)>,
    ) {
        let names = courier_amqp::Names::new(self.namespace.clone());
        block_on(async {
            let broker = courier_amqp::Broker::connect(&amqp_url(), names.clone(), "courier-it-raw")
                .await
                .expect("connect");
            let publisher = broker.publisher(8).await.expect("publisher");
            publisher
                .publish(courier_amqp::Outgoing {
                    exchange,
                    routing_key,
                    body,
                    message_id,
                    correlation_id,
                    headers,
                })
                .await
                .expect("publish");
            let _ = broker.close().await;
        });
    }

    /// Messages ready in the dead-letter queue.
    pub fn dead_depth(&self) -> u32 {
        self.depth(|names| names.dead())
    }

    /// Messages in the results queue, ready or delivered and not yet acked.
    pub fn results_in_queue(&self) -> u32 {
        let names = courier_amqp::Names::new(self.namespace.clone());
        let queue = names.results_queue();
        let out = std::process::Command::new("rabbitmqctl")
            .args(["list_queues", "-q", "--no-table-headers", "name", "messages"])
            .output()
            .expect("rabbitmqctl (run as root)");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .find_map(|l| {
                let (name, n) = l.split_once(char::is_whitespace)?;
                (name == queue).then(|| n.trim().parse().ok())?
            })
            .unwrap_or_else(|| panic!("no queue {queue} listed"))
    }

    /// Messages ready in the queue `queue` names.
    fn depth(&self, queue: impl FnOnce(&courier_amqp::Names) -> String) -> u32 {
        let names = courier_amqp::Names::new(self.namespace.clone());
        let queue = queue(&names);
        block_on(async {
            let broker = courier_amqp::Broker::connect(&amqp_url(), names.clone(), "courier-it")
                .await
                .expect("connect");
            let (depth, _) = broker.queue_depth(&queue).await.expect("queue depth");
            let _ = broker.close().await;
            depth
        })
    }

    /// Send SIGTERM to worker `id` and wait for its exit status.
    pub fn terminate_worker(&mut self, id: &str) -> std::process::ExitStatus {
        let i = self.workers.iter().position(|(w, _)| w == id).expect("no such worker");
        let (_, mut child) = self.workers.remove(i);
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("SIGTERM");
        child.wait().expect("wait worker")
    }

    /// POST a run; `Err` holds the API's error message.
    pub fn submit(&self, workflow: &str, params: &[(&str, &str)]) -> Result<String, String> {
        let params: serde_json::Map<String, Value> =
            params.iter().map(|(k, v)| ((*k).into(), Value::from(*v))).collect();
        let response = self
            .http(reqwest::Method::POST, "/api/runs")
            .json(&serde_json::json!({ "workflow": workflow, "params": params }))
            .send()
            .expect("POST /api/runs");
        let ok = response.status().is_success();
        let body: Value = response.json().expect("JSON answer");
        if ok {
            Ok(body["id"].as_str().expect("run id").to_string())
        } else {
            Err(body["error"].as_str().unwrap_or_default().to_string())
        }
    }

    /// GET a run.
    pub fn run(&self, id: &str) -> Value {
        self.http(reqwest::Method::GET, &format!("/api/runs/{id}"))
            .send()
            .and_then(|r| r.json())
            .expect("GET /api/runs/{id}")
    }

    /// A request to the scheduler's API, with the cluster's token if it has one.
    pub fn http(&self, method: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let request = reqwest::blocking::Client::new().request(method, format!("{}{path}", self.api));
        match self.env.iter().find(|(k, _)| k == "COURIER_API_TOKEN") {
            Some((_, token)) => request.bearer_auth(token),
            None => request,
        }
    }

    /// The scheduler's `/metrics` text.
    pub fn scheduler_metrics(&self) -> String {
        self.http(reqwest::Method::GET, "/metrics")
            .send()
            .and_then(|r| r.text())
            .expect("GET /metrics")
    }

    /// The pid of the scheduler.
    pub fn scheduler_pid(&self) -> Pid {
        let child = self.scheduler.as_ref().expect("no scheduler");
        Pid::from_raw(i32::try_from(child.id()).expect("pid"))
    }

    /// Wait for the scheduler to exit by itself; its exit status.
    pub fn wait_scheduler_exit(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        let child = self.scheduler.as_mut().expect("no scheduler");
        loop {
            if let Some(status) = child.try_wait().expect("try_wait") {
                self.scheduler = None;
                return status;
            }
            assert!(Instant::now() < deadline, "the scheduler is still running");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pid of worker `id`.
    pub fn worker_pid(&self, id: &str) -> Pid {
        let (_, child) = self.workers.iter().find(|(w, _)| w == id).expect("no such worker");
        Pid::from_raw(i32::try_from(child.id()).expect("pid"))
    }

    /// Wait until a run leaves `running`.
    pub fn wait_run(&self, id: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let run = self.run(id);
            if run["status"] != "running" {
                return run;
            }
            assert!(
                Instant::now() < deadline,
                "run {id} still running after {timeout:?}: {run:#}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Messages ready in a pool's task queues: its own and its lane's.
    pub fn queue_depth(&self, pool: &str) -> u32 {
        self.depth(|names| names.task_queue(pool)) + self.depth(|names| names.task_queue(&courier_amqp::lane_key(pool)))
    }

    /// Every process's log, for failure messages.
    pub fn logs(&self) -> String {
        let mut files: Vec<_> = std::fs::read_dir(self.dir.path())
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|e| e == "log"))
                    .collect()
            })
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(p).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(120).collect();
                format!(
                    "--- {} ---\n{}",
                    p.file_name().unwrap_or_default().to_string_lossy(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Peak resident memory of process `pid`, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kib: f64 = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmHWM");
    kib / 1024.0
}

pub fn block_on<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(f)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill_scheduler();
        for (_, child) in &mut self.workers {
            let _ = child.kill();
            let _ = child.wait();
        }
        let names = courier_amqp::Names::new(self.namespace.clone());
        let pools = self.pools.clone();
        let tapped = self.has_tap;
        block_on(async {
            if let Ok(broker) = courier_amqp::Broker::connect(&amqp_url(), names.clone(), "courier-it-cleanup").await {
                if tapped {
                    let _ = broker.delete_queue(&format!("{}.tap", names.namespace())).await;
                }
                let _ = broker.delete_topology(&pools).await;
                let _ = broker.close().await;
            }
        });
    }
}
