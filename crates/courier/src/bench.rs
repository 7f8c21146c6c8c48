//! `courier bench`: Courier's end-to-end rate against the raw AMQP ceiling,
//! measured in one run against the same broker.
//!
//! (a) Raw ceiling: a publisher with confirms and a collector on one
//!     connection, worker processes that publish a confirmed reply and then
//!     ack; messages of `--size` bytes; the CPU per task of either side.
//! (b) Courier: a real scheduler and `--workers` worker processes (this same
//!     binary) running `echo` steps whose tasks carry `--size` bytes of
//!     payload; rate from the first dispatch to the last result applied.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use courier_amqp::{Broker, Names, Outgoing};
use tokio::sync::Mutex;

use crate::settings::Settings;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Tasks per measurement.
    #[arg(long, default_value_t = 20_000)]
    tasks: usize,
    /// Message (raw) and task payload (Courier) size in bytes.
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Worker processes (Courier) and worker connections (raw).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Steps in flight per worker (Courier) and prefetch per worker (raw).
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Steps per run (Courier submits tasks / this runs).
    #[arg(long, default_value_t = 100)]
    steps_per_run: usize,
    /// Make each run's last step depend on all the others (a fan-in).
    #[arg(long)]
    fan_in: bool,
    /// Make each run one `foreach` step over `--steps-per-run` items (each
    /// item a task), instead of that many steps.
    #[arg(long, conflicts_with = "fan_in")]
    foreach: bool,
    /// Open loop: submit one-step runs at this many per second (whatever
    /// the answers' pace) for `--duration` seconds, and report the latency
    /// from submit to result applied (no raw ceiling).
    #[arg(long)]
    rate: Option<f64>,
    /// Seconds of open-loop submission.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// With `--rate`: first submit one run of this many steps, and measure
    /// the one-step runs submitted beside it (its own time is reported
    /// too): how much a wide run delays small ones.
    #[arg(long, requires = "rate")]
    beside: Option<usize>,
    /// The pool's `max_queued` (tasks waiting in its broker queue at most,
    /// up to 64 of it in its lane's; 0: no limit), to measure what it costs
    /// and what it buys.
    #[arg(long)]
    max_queued: Option<u32>,
    /// Keep the schedulers' state on this PostgreSQL server instead of
    /// SQLite: the benchmark creates a database of its own there
    /// (`courier_bench_...`, so the role needs CREATEDB) and drops it after.
    #[arg(long)]
    database_url: Option<String>,
    /// Schedulers sharing the database (more than one needs
    /// `--database-url`); submissions are spread over them.
    #[arg(long, default_value_t = 1)]
    schedulers: usize,
    /// Web UI pages kept open during the measurement: each reads the runs
    /// page's live stream (Server-Sent Events), as a browser tab would.
    #[arg(long, default_value_t = 0)]
    ui_streams: usize,
    /// Measure this many times, the raw ceiling and Courier alternated, and
    /// report the median ratio (on a shared machine one pair can be off by
    /// a fifth either way).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
}

/// The raw ceiling, and the CPU its two sides spent per task: the
/// publisher's and collector's (what publishing and consuming alone cost a
/// scheduler on this AMQP client), and all its workers' together.
struct RawReport {
    report: Report,
    scheduler_side_us: f64,
    worker_side_us: f64,
}

struct Report {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// Latencies of an open-loop measurement.
struct Latency {
    runs: usize,
    /// Runs completed per second, from the first submission accepted to
    /// the last result applied.
    rate: f64,
    p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// p50 and p99 of each run's wait from its submission to its task's
    /// dispatch, then from dispatch to its result applied.
    admitted_ms: (f64, f64),
    delivered_ms: (f64, f64),
}

pub fn run(settings: &Settings, args: &BenchArgs) -> anyhow::Result<()> {
    if args.tasks == 0 || args.workers == 0 || args.concurrency == 0 || args.steps_per_run == 0 {
        bail!("--tasks, --workers, --concurrency and --steps-per-run must be at least 1");
    }
    if args.repeat == 0 || args.repeat > 100 || (args.repeat > 1 && args.rate.is_some()) {
        bail!("--repeat takes 1 to 100, and is not for --rate");
    }
    if args.schedulers == 0 || args.schedulers > 16 || (args.schedulers > 1 && args.database_url.is_none()) {
        bail!("--schedulers takes 1 to 16, and more than one needs --database-url (they share PostgreSQL)");
    }
    if args.fan_in && (args.steps_per_run < 2 || args.rate.is_some()) {
        bail!("--fan-in needs at least 2 steps per run, and is not for --rate (one-step runs)");
    }
    if args.foreach && (args.rate.is_some() || args.steps_per_run > 100_000) {
        bail!("--foreach is not for --rate (one-step runs), and takes at most 100000 items per run");
    }
    if args.beside.is_some_and(|n| n == 0 || n > MAX_BESIDE) {
        bail!("--beside takes 1 to {MAX_BESIDE} steps");
    }
    let runtime = tokio::runtime::Runtime::new()?;
    if let Some(rate) = args.rate {
        if !(rate > 0.0 && rate <= 100_000.0) || args.duration == 0 {
            bail!("--rate must be above 0 (at most 100000) and --duration at least 1");
        }
        println!(
            "courier bench (open loop): one-step runs of {} B at {rate}/s for {} s, {} workers x {} in flight",
            args.size, args.duration, args.workers, args.concurrency
        );
        let (latency, wide_ms, rss) = open_loop(settings, args, rate, &runtime)?;
        if let (Some(steps), Some(ms)) = (args.beside, wide_ms) {
            println!(
                "beside        one run of {steps} steps, submitted first: {ms} ms (submit to its last result applied)"
            );
        }
        println!(
            "latency       {} runs   p50 {:.1} ms   p90 {:.1} ms   p99 {:.1} ms   max {:.1} ms   (submit to result applied)",
            latency.runs, latency.p50_ms, latency.p90_ms, latency.p99_ms, latency.max_ms
        );
        println!(
            "phases        submit to dispatch p50 {:.1} ms p99 {:.1} ms   dispatch to result applied p50 {:.1} ms p99 {:.1} ms",
            latency.admitted_ms.0, latency.admitted_ms.1, latency.delivered_ms.0, latency.delivered_ms.1
        );
        println!(
            "throughput    {:.0} runs/s completed (first submission accepted to last result applied)",
            latency.rate
        );
        println!("memory        {rss}");
        return Ok(());
    }
    println!(
        "courier bench: {} tasks of {} B, {} workers x {} in flight, broker {}, {} scheduler(s) on {}",
        args.tasks,
        args.size,
        args.workers,
        args.concurrency,
        settings.amqp_url,
        args.schedulers,
        args.database_url
            .as_deref()
            .map_or_else(|| "SQLite".to_string(), courier_scheduler::db::redact)
    );
    let mut ratios = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let RawReport {
            report: raw,
            scheduler_side_us,
            worker_side_us,
        } = runtime.block_on(raw_ceiling(&settings.amqp_url, args))?;
        println!(
            "raw ceiling   {:>8.0} tasks/s   p50 {:>7.1} ms   p99 {:>7.1} ms   CPU per task: publisher and collector {scheduler_side_us:.0} µs, workers {worker_side_us:.0} µs",
            raw.rate, raw.p50_ms, raw.p99_ms
        );
        let (courier, rss) = courier_end_to_end(settings, args, &runtime)?;
        println!(
            "courier       {:>8.0} tasks/s   p50 {:>7.1} ms   p99 {:>7.1} ms   (dispatch to result applied)",
            courier.rate, courier.p50_ms, courier.p99_ms
        );
        let ratio = 100.0 * courier.rate / raw.rate;
        println!("ratio         {ratio:>8.1} % of the raw ceiling");
        println!("memory        {rss}");
        ratios.push(ratio);
    }
    if ratios.len() > 1 {
        ratios.sort_by(f64::total_cmp);
        println!(
            "median ratio  {:>8.1} % of the raw ceiling over {} measurements ({:.1} to {:.1})",
            percentile(&ratios, 0.5),
            ratios.len(),
            ratios[0],
            ratios[ratios.len() - 1]
        );
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Pseudo-random printable payload: compresses about as well as real text
/// does not, so neither side gains from compression.
fn payload(size: usize) -> String {
    let mut rng = fastrand::Rng::with_seed(7);
    (0..size).map(|_| rng.alphanumeric()).collect()
}

/// What every raw ceiling's namespace starts with.
const RAW_NAMESPACE: &str = "bench-raw-";

/// The raw ceiling in a namespace of its own, whose queues are deleted
/// after, whatever the outcome.
async fn raw_ceiling(url: &str, args: &BenchArgs) -> anyhow::Result<RawReport> {
    let names = Names::new(format!("{RAW_NAMESPACE}{}", uuid::Uuid::now_v7()));
    let pools = vec!["default".to_string()];
    // One connection publishes and collects, as a scheduler's does.
    let broker = Broker::connect(url, names.clone(), "bench-raw-scheduler").await?;
    broker.declare_topology(&pools, 5).await?;
    let measured = raw_measure(url, &names, &broker, args).await;
    // The measurement's own error first, should both fail.
    let deleted = broker.delete_topology(&pools).await;
    let report = measured?;
    deleted?;
    Ok(report)
}

async fn raw_measure(url: &str, names: &Names, broker: &Broker, args: &BenchArgs) -> anyhow::Result<RawReport> {
    let started = Instant::now();
    let body = payload(args.size.max(8));
    let prefetch = u16::try_from(args.concurrency).unwrap_or(u16::MAX);

    // Workers: processes of their own (as Courier's are), so that this
    // process's CPU is the publisher's and collector's alone.
    let exe = std::env::current_exe().context("locating the courier binary")?;
    let mut workers = Processes(Vec::new());
    for i in 0..args.workers {
        let child = Command::new(&exe)
            .args([
                "bench-raw-worker",
                names.namespace(),
                &i.to_string(),
                &prefetch.to_string(),
            ])
            .env("COURIER_AMQP_URL", url)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        workers.0.push((format!("raw worker {i}"), child));
    }
    // Started when each consumes (a process can fail before it does).
    let deadline = Instant::now() + Duration::from_secs(30);
    let gauge = broker.gauge().await?;
    while gauge.depth(&names.task_queue("default")).await?.1 < u32::try_from(args.workers)? {
        if Instant::now() > deadline {
            bail!("the raw ceiling's workers did not start consuming within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let own_cpu = cpu_seconds(std::process::id());
    let workers_cpu: Vec<_> = workers.0.iter().map(|(_, c)| cpu_seconds(c.id())).collect();

    // Collector: latency from the send time carried in the message id;
    // acknowledged 100 at a time (as the scheduler acknowledges a batch).
    let mut results = broker.consumer(&names.results_queue(), 1000, "collector").await?;
    let total = args.tasks;
    let collector = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(total);
        while latencies.len() < total {
            // A minute without a result: a worker is gone (reported below).
            let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(60), results.next()).await else {
                break;
            };
            let sent: f64 = delivery
                .message_id
                .as_deref()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0.0);
            latencies.push(started.elapsed().as_secs_f64() * 1000.0 - sent);
            if latencies.len() % 100 == 0 || latencies.len() == total {
                let _ = delivery.ack_all_up_to().await;
            }
        }
        (latencies, started.elapsed())
    });

    // Publisher: confirmed, up to 1024 in flight.
    let publisher = broker.publisher(1024).await?;
    let exchange = Arc::new(names.tasks_exchange());
    let body = Arc::new(body);
    let t0 = started.elapsed();
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..total {
        let (publisher, exchange, body) = (publisher.clone(), exchange.clone(), body.clone());
        sends.spawn(async move {
            let sent = format!("{:.3}", started.elapsed().as_secs_f64() * 1000.0);
            publisher
                .publish(Outgoing {
                    exchange: &exchange,
                    routing_key: "default",
                    body: body.as_bytes(),
                    message_id: &sent,
                    correlation_id: "bench",
                    headers: Vec::new(),
                })
                .await
        });
        while sends.len() >= 1024 {
            if let Some(r) = sends.join_next().await {
                r??;
            }
        }
    }
    while let Some(r) = sends.join_next().await {
        r??;
    }
    let (mut latencies, t_end) = collector.await?;
    let cpu = |pid: u32, before: Option<(f64, f64)>| {
        let (user, system) = cpu_seconds(pid)?;
        let (u0, s0) = before?;
        Some((user - u0 + system - s0) * 1e6 / total as f64)
    };
    let scheduler_side = cpu(std::process::id(), own_cpu).unwrap_or(f64::NAN);
    let worker_side: f64 = workers
        .0
        .iter()
        .zip(workers_cpu)
        .filter_map(|((_, c), before)| cpu(c.id(), before))
        .sum();
    drop(workers);
    latencies.sort_by(f64::total_cmp);
    if latencies.len() < total {
        bail!("raw run collected {} of {total} replies", latencies.len());
    }
    Ok(RawReport {
        report: Report {
            rate: total as f64 / (t_end - t0).as_secs_f64(),
            p50_ms: percentile(&latencies, 0.50),
            p99_ms: percentile(&latencies, 0.99),
        },
        scheduler_side_us: scheduler_side,
        worker_side_us: worker_side,
    })
}

/// One raw worker (`courier bench-raw-worker`): each task it is given is
/// replied to (confirmed), then acked; until it is killed.
///
/// # Errors
/// A namespace not the raw ceiling's (it would take a real pool's tasks),
/// the broker could not be reached, or the consumer failed.
pub async fn raw_worker(url: &str, namespace: String, index: usize, prefetch: u16) -> anyhow::Result<()> {
    if !namespace.starts_with(RAW_NAMESPACE) {
        bail!("bench-raw-worker serves only a raw ceiling's namespace ({RAW_NAMESPACE}...), not {namespace:?}");
    }
    let names = Names::new(namespace);
    let broker = Broker::connect(url, names.clone(), &format!("bench-worker-{index}")).await?;
    let publisher = broker.publisher(usize::from(prefetch) * 2).await?;
    let mut consumer = broker
        .consumer(&names.task_queue("default"), prefetch, &format!("w{index}"))
        .await?;
    let exchange = Arc::new(names.results_exchange());
    while let Some(delivery) = consumer.next().await {
        let delivery = delivery?;
        let (publisher, exchange) = (publisher.clone(), exchange.clone());
        tokio::spawn(async move {
            let id = delivery.message_id.clone().unwrap_or_default();
            let reply = Outgoing {
                exchange: &exchange,
                routing_key: "results",
                body: &delivery.body,
                message_id: &id,
                correlation_id: &id,
                headers: Vec::new(),
            };
            if publisher.publish(reply).await.is_ok() {
                let _ = delivery.ack().await;
            }
        });
    }
    Ok(())
}

/// Kills the processes it holds when dropped.
struct Processes(Vec<(String, Child)>);

impl Drop for Processes {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// User and system CPU seconds a process has used so far.
fn cpu_seconds(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|t| t / 100.0);
    Some((ticks(11)?, ticks(12)?))
}

/// Context switches so far of a process's threads alive now (Linux keeps
/// no count for the threads that ended, such as tokio's blocking threads
/// idle for 10 s): (voluntary, involuntary). A voluntary one is a thread
/// going to sleep to wait (and being woken): on this benchmark's virtual
/// machine each costs far more than on bare metal, and they were a quarter
/// of the scheduler's CPU samples (README).
fn thread_switches(pid: u32) -> Option<(u64, u64)> {
    let mut sums = (0, 0);
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // a thread that just ended
        };
        for line in status.lines() {
            let count = |prefix: &str| line.strip_prefix(prefix)?.trim().parse::<u64>().ok();
            if let Some(n) = count("voluntary_ctxt_switches:") {
                sums.0 += n;
            } else if let Some(n) = count("nonvoluntary_ctxt_switches:") {
                sums.1 += n;
            }
        }
    }
    Some(sums)
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Samples the resident memory of processes every 500 ms until stopped,
/// and their idle level when told (the stack started, nothing submitted).
struct RssSampler {
    pids: Vec<u32>,
    idle: Vec<f64>,
    /// Each process's CPU (user, system) when it was idle.
    idle_cpu: Vec<Option<(f64, f64)>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: std::thread::JoinHandle<Vec<Vec<f64>>>,
}

/// One process's resident memory over a run, in MiB.
struct Rss {
    idle: f64,
    quarter: f64,
    end: f64,
    peak: f64,
    /// Its CPU seconds (user, system) when idle: before the load.
    idle_cpu: Option<(f64, f64)>,
}

impl RssSampler {
    fn start(pids: Vec<u32>) -> Self {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let sampled = pids.clone();
        let handle = std::thread::spawn(move || {
            let mut samples = vec![Vec::new(); sampled.len()];
            while !flag.load(Ordering::Relaxed) {
                for (i, pid) in sampled.iter().enumerate() {
                    if let Some(mib) = rss_mib(*pid) {
                        samples[i].push(mib);
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            samples
        });
        Self {
            pids,
            idle: Vec::new(),
            idle_cpu: Vec::new(),
            stop,
            handle,
        }
    }

    /// Record each process's idle level: now, before the load.
    fn mark_idle(&mut self) {
        self.idle = self.pids.iter().map(|&pid| rss_mib(pid).unwrap_or(f64::NAN)).collect();
        self.idle_cpu = self.pids.iter().map(|&pid| cpu_seconds(pid)).collect();
    }

    /// Per process: RSS idle, at a quarter of the run, at the end, and the peak.
    fn finish(self) -> Vec<Rss> {
        self.stop.store(true, Ordering::Relaxed);
        let (idle, idle_cpu) = (self.idle, self.idle_cpu);
        self.handle
            .join()
            .unwrap_or_default()
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let at = |f: f64| {
                    s.get(((s.len() as f64 - 1.0) * f) as usize)
                        .copied()
                        .unwrap_or(f64::NAN)
                };
                Rss {
                    idle: idle.get(i).copied().unwrap_or(f64::NAN),
                    quarter: at(0.25),
                    end: at(1.0),
                    peak: s.iter().copied().fold(f64::NAN, f64::max),
                    idle_cpu: idle_cpu.get(i).copied().flatten(),
                }
            })
            .collect()
    }
}

fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// A scheduler and workers of this binary in a namespace and folder of
/// their own, removed when dropped (processes) and by [`Stack::clean_up`].
struct Stack {
    dir: std::path::PathBuf,
    namespace: String,
    /// Each scheduler's API.
    apis: Vec<String>,
    procs: Processes,
    /// The benchmark's own PostgreSQL database, when there is one.
    database: Option<BenchDatabase>,
}

/// A database created on the `--database-url` server for one measurement,
/// dropped afterwards.
struct BenchDatabase {
    server: String,
    name: String,
    url: String,
}

impl BenchDatabase {
    fn create(server: &str) -> anyhow::Result<Self> {
        // The server's URL must name a database to connect to (`/postgres`):
        // the benchmark's own replaces it.
        let path = server
            .split_once("://")
            .map(|(_, rest)| rest)
            .and_then(|rest| rest.split_once('/'));
        if !matches!(path, Some((_, db)) if !db.is_empty() && !db.starts_with('?')) {
            bail!("--database-url must name a database to connect to, as in postgres://user:pass@host:5432/postgres");
        }
        let name = format!("courier_bench_{}", uuid::Uuid::now_v7().simple());
        let server = server.to_string();
        let redacted = courier_scheduler::db::redact(&server);
        let created = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<()> {
                let mut admin = postgres::Client::connect(&server, postgres::NoTls)
                    .with_context(|| format!("connecting to {redacted}"))?;
                admin
                    .batch_execute(&format!("CREATE DATABASE {name}"))
                    .with_context(|| format!("creating database {name} on {redacted} (the role needs CREATEDB)"))?;
                Ok(())
            })
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
        });
        created?;
        let base = server.rsplit_once('/').map_or(server.as_str(), |(base, _)| base);
        let url = format!("{base}/{name}");
        Ok(Self { server, name, url })
    }
}

impl Drop for BenchDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // The client blocks on a runtime of its own: not on a runtime's thread.
        let _ = std::thread::spawn(move || {
            if let Ok(mut admin) = postgres::Client::connect(&server, postgres::NoTls) {
                let _ = admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"));
            }
        })
        .join();
    }
}

impl Stack {
    fn start(settings: &Settings, args: &BenchArgs, steps_per_run: usize) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("courier-bench-{}", uuid::Uuid::now_v7()));
        let config_dir = dir.join("config");
        write_bench_config(&config_dir, steps_per_run, args.fan_in, args.foreach, args.beside)?;
        if let Some(max) = args.max_queued {
            std::fs::write(
                config_dir.join("courier.toml"),
                format!("[pools.default]\nmax_queued = {max}\n"),
            )?;
        }
        let namespace = format!("bench-{}", uuid::Uuid::now_v7());
        let exe = std::env::current_exe().context("locating the courier binary")?;
        let command = |what: &str| {
            let mut cmd = Command::new(&exe);
            cmd.arg(what)
                .env("COURIER_AMQP_URL", &settings.amqp_url)
                .env("COURIER_NAMESPACE", &namespace)
                .env("COURIER_CONFIG_DIR", &config_dir)
                .env("COURIER_DATA_DIR", dir.join("data"))
                .env("COURIER_API_LISTEN", "127.0.0.1:0")
                // Loopback only, and the bench's client sends no token.
                .env_remove("COURIER_API_TOKEN")
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(Stdio::inherit());
            cmd
        };
        let database = args.database_url.as_deref().map(BenchDatabase::create).transpose()?;
        let mut procs = Processes(Vec::new());
        let mut apis = Vec::new();
        for i in 0..args.schedulers {
            // The first scheduler's folder is `data` (its SQLite database, if any).
            let data = if i == 0 {
                dir.join("data")
            } else {
                dir.join(format!("data-{i}"))
            };
            let mut cmd = command("scheduler");
            cmd.env("COURIER_DATA_DIR", &data);
            match &database {
                Some(db) => cmd.env("COURIER_DATABASE_URL", &db.url),
                None => cmd.env_remove("COURIER_DATABASE_URL"),
            };
            procs.0.push((format!("scheduler {i}"), cmd.spawn()?));
            let addr_file = data.join("api.addr");
            let deadline = Instant::now() + Duration::from_secs(30);
            apis.push(loop {
                if let Ok(addr) = std::fs::read_to_string(&addr_file)
                    && !addr.is_empty()
                {
                    break format!("http://{addr}");
                }
                if Instant::now() > deadline {
                    bail!("benchmark scheduler {i} did not start");
                }
                std::thread::sleep(Duration::from_millis(50));
            });
        }
        for i in 0..args.workers {
            let child = command("worker")
                .args([
                    "--worker-id",
                    &format!("bench-{i}"),
                    "--concurrency",
                    &args.concurrency.to_string(),
                ])
                .spawn()?;
            procs.0.push((format!("worker {i}"), child));
        }
        Ok(Self {
            dir,
            namespace,
            apis,
            procs,
            database,
        })
    }

    /// The first scheduler's API (any of them serves every run).
    fn api(&self) -> &str {
        &self.apis[0]
    }

    /// Wait for a scheduler to lead and reach the broker (the others stand
    /// by), and give workers a moment to attach.
    async fn ready(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut leading = false;
            let mut answering = 0;
            for api in &self.apis {
                let health: Option<serde_json::Value> = match client.get(format!("{api}/healthz")).send().await {
                    Ok(r) => r.json().await.ok(),
                    Err(_) => None,
                };
                if let Some(health) = health {
                    answering += 1;
                    leading |= health["status"] == "ok";
                }
            }
            if leading && answering == self.apis.len() {
                break;
            }
            if Instant::now() > deadline {
                bail!("no benchmark scheduler reached the broker as leader");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        Ok(())
    }

    /// Wait until no run is running; fail if one failed.
    async fn finished(&self, client: &reqwest::Client) -> anyhow::Result<()> {
        let api = self.api();
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let running: serde_json::Value = client
                .get(format!("{api}/api/runs?status=running&limit=1"))
                .send()
                .await?
                .json()
                .await?;
            if running.as_array().is_some_and(Vec::is_empty) {
                break;
            }
            if Instant::now() > deadline {
                bail!("benchmark runs still running after 10 minutes");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let failed: serde_json::Value = client
            .get(format!("{api}/api/runs?status=failed&limit=1"))
            .send()
            .await?
            .json()
            .await?;
        if failed.as_array().is_some_and(|a| !a.is_empty()) {
            bail!("a benchmark run failed: {failed}");
        }
        Ok(())
    }

    /// Memory and CPU of each process, as a report's lines; CPU per task
    /// counts from the idle mark, over `tasks`.
    fn usage(&self, samples: Vec<Rss>, tasks: usize) -> String {
        self.procs
            .0
            .iter()
            .zip(samples)
            .map(|((name, child), rss)| {
                let peak = peak_rss_mib(child.id()).unwrap_or(rss.peak);
                let (user, system) = cpu_seconds(child.id()).unwrap_or((f64::NAN, f64::NAN));
                let (idle_user, idle_system) = rss.idle_cpu.unwrap_or((f64::NAN, f64::NAN));
                let per_task = (user - idle_user + system - idle_system) * 1e6 / tasks.max(1) as f64;
                let switches = thread_switches(child.id()).map_or_else(
                    || "unknown".to_string(),
                    |(waits, preempted)| format!("{waits} voluntary, {preempted} involuntary"),
                );
                format!(
                    "\n  {name:<10} RSS idle {:.1} MiB, {:.1} MiB at 25% of the run, {:.1} MiB at the end, peak {peak:.1} MiB ({:+.1} MiB over idle); {:.1} CPU-s ({user:.1} user, {system:.1} system), {per_task:.0} µs per task under load; thread switches (live threads) {switches}",
                    rss.idle,
                    rss.quarter,
                    rss.end,
                    peak - rss.idle,
                    user + system,
                )
            })
            .collect()
    }

    /// Stop the processes; the scheduler's database (read after they stopped).
    /// Stop the processes; the schedulers' database (read after they
    /// stopped, through the store interface, on a thread of its own).
    fn stop(&mut self) -> anyhow::Result<courier_scheduler::db::Db> {
        self.procs = Processes(Vec::new());
        let data = self.dir.join("data");
        let url = self.database.as_ref().map(|d| d.url.clone());
        std::thread::spawn(move || courier_scheduler::db::Db::open_store(&data, url.as_deref()))
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
            .context("opening the benchmark's database")
    }

    /// Delete the namespace's queues (the folder goes when dropped).
    fn clean_up(self, settings: &Settings, runtime: &tokio::runtime::Runtime) {
        runtime.block_on(async {
            let names = Names::new(self.namespace.clone());
            if let Ok(broker) = Broker::connect(&settings.amqp_url, names, "bench-cleanup").await {
                let _ = broker.delete_topology(&["default".to_string()]).await;
            }
        });
    }
}

impl Drop for Stack {
    /// On every path, errors included: the processes stop (their own
    /// drop), then the folder goes.
    fn drop(&mut self) {
        self.procs = Processes(Vec::new());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn courier_end_to_end(
    settings: &Settings,
    args: &BenchArgs,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(Report, String)> {
    let mut stack = Stack::start(settings, args, args.steps_per_run)?;
    let runs = args.tasks.div_ceil(args.steps_per_run);
    let text = payload(args.size);
    let items = serde_json::to_string(&(0..args.steps_per_run).collect::<Vec<_>>())?;
    let params = if args.foreach {
        serde_json::json!({"payload": text, "items": items})
    } else {
        serde_json::json!({"payload": text})
    };
    let mut sampler = RssSampler::start(stack.procs.0.iter().map(|(_, c)| c.id()).collect());
    runtime.block_on(async {
        let client = reqwest::Client::new();
        stack.ready(&client).await?;
        sampler.mark_idle();
        // Open UI pages: each reads the runs page's live stream to the end.
        let mut watchers = tokio::task::JoinSet::new();
        for i in 0..args.ui_streams {
            let url = format!("{}/ui/runs/live", stack.apis[i % stack.apis.len()]);
            let client = client.clone();
            watchers.spawn(async move {
                if let Ok(mut response) = client.get(&url).send().await {
                    while let Ok(Some(_)) = response.chunk().await {}
                }
            });
        }
        let submitted = Arc::new(AtomicUsize::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut submitters = tokio::task::JoinSet::new();
        for i in 0..4 {
            let (client, api, params, submitted, errors) = (
                client.clone(),
                stack.apis[i % stack.apis.len()].clone(),
                params.clone(),
                submitted.clone(),
                errors.clone(),
            );
            submitters.spawn(async move {
                while submitted.fetch_add(1, Ordering::Relaxed) < runs {
                    let body = serde_json::json!({"workflow": "bench", "params": params});
                    match client.post(format!("{api}/api/runs")).json(&body).send().await {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => errors.lock().await.push(r.text().await.unwrap_or_default()),
                        Err(e) => errors.lock().await.push(format!("{:#}", anyhow::Error::from(e))),
                    }
                }
            });
        }
        while submitters.join_next().await.is_some() {}
        if let Some(e) = errors.lock().await.first() {
            bail!("submitting a benchmark run failed: {e}");
        }
        stack.finished(&client).await?;
        if args.ui_streams > 0 {
            // Let the pages see the end, then close them.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            watchers.abort_all();
            println!(
                "ui            {} live runs pages open during the measurement",
                args.ui_streams
            );
        }
        Ok(())
    })?;
    let usage = stack.usage(sampler.finish(), runs * args.steps_per_run);
    // Rate and latency from the scheduler's own records.
    let mut db = stack.stop()?;
    let latencies = db.task_latencies_ms()?;
    let runs = db.runs(Some("bench"), None, None, usize::MAX)?;
    drop(db);
    let first = runs.iter().map(|r| r.created_ms).min().unwrap_or(0);
    let last = runs.iter().filter_map(|r| r.finished_ms).max().unwrap_or(first);
    let tasks = latencies.len();
    let sorted: Vec<f64> = latencies.iter().map(|&l| l as f64).collect();
    let report = Report {
        rate: tasks as f64 / ((last - first).max(1) as f64 / 1000.0),
        p50_ms: percentile(&sorted, 0.50),
        p99_ms: percentile(&sorted, 0.99),
    };
    stack.clean_up(settings, runtime);
    Ok((report, usage))
}

/// Submit one-step runs at `rate` per second for `--duration` seconds, each
/// request on its own (a slow answer does not slow the submissions), then
/// report each run's latency from its submission to its result applied, from
/// the scheduler's records.
/// The widest run `--beside` submits: a workflow's most steps.
const MAX_BESIDE: usize = 20_000;

/// Open-loop latency of one-step runs (and, with `--beside`, the wide
/// run's time in ms).
fn open_loop(
    settings: &Settings,
    args: &BenchArgs,
    rate: f64,
    runtime: &tokio::runtime::Runtime,
) -> anyhow::Result<(Latency, Option<i64>, String)> {
    let mut stack = Stack::start(settings, args, 1)?;
    let text = payload(args.size);
    let total = (rate * args.duration as f64).round() as usize;
    let mut sampler = RssSampler::start(stack.procs.0.iter().map(|(_, c)| c.id()).collect());
    let late = runtime.block_on(async {
        stack.ready(&reqwest::Client::new()).await?;
        sampler.mark_idle();
        if args.beside.is_some() {
            let body = serde_json::json!({"workflow": "wide", "params": {"payload": text}});
            let answer = reqwest::Client::new()
                .post(format!("{}/api/runs", stack.api()))
                .json(&body)
                .send()
                .await?;
            if !answer.status().is_success() {
                bail!(
                    "submitting the wide run failed: {}",
                    answer.text().await.unwrap_or_default()
                );
            }
        }
        // The API serves at most 64 connections from one address: the
        // requests come from CLIENT_ADDRESSES loopback addresses (as from
        // that many clients), each with at most PER_ADDRESS in flight. A request
        // that finds no room waits, and the submitter falls behind its
        // schedule (reported below) instead of being refused.
        let clients = (2..2 + CLIENT_ADDRESSES)
            .map(|i| {
                let address = std::net::IpAddr::from([127, 0, 0, i]);
                let client = reqwest::Client::builder().local_address(address).build()?;
                Ok((client, Arc::new(tokio::sync::Semaphore::new(PER_ADDRESS))))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let errors = Arc::new(Mutex::new(Vec::new()));
        let mut requests = tokio::task::JoinSet::new();
        let start = tokio::time::Instant::now();
        let mut late = Duration::ZERO;
        for i in 0..total {
            let at = start + Duration::from_secs_f64(i as f64 / rate);
            tokio::time::sleep_until(at).await;
            let (client, room) = &clients[i % clients.len()];
            let permit = room.clone().acquire_owned().await?;
            late = late.max(at.elapsed());
            let api = stack.apis[i % stack.apis.len()].clone();
            let (client, text, errors) = (client.clone(), text.clone(), errors.clone());
            requests.spawn(async move {
                let body = serde_json::json!({"workflow": "bench", "params": {"payload": text}});
                // The answer is read to its end, so its connection serves
                // the next request (and no new one is opened meanwhile).
                match client.post(format!("{api}/api/runs")).json(&body).send().await {
                    Ok(r) if r.status().is_success() => drop(r.bytes().await),
                    Ok(r) => errors.lock().await.push(r.text().await.unwrap_or_default()),
                    Err(e) => errors.lock().await.push(format!("{:#}", anyhow::Error::from(e))),
                }
                drop(permit);
            });
        }
        while requests.join_next().await.is_some() {}
        // Their connections close, leaving room for the one that waits.
        drop(clients);
        if let Some(e) = errors.lock().await.first() {
            bail!("submitting a benchmark run failed: {e}");
        }
        stack.finished(&reqwest::Client::new()).await?;
        Ok(late)
    })?;
    if late > Duration::from_millis(50) {
        println!(
            "note          the submitter fell {} ms behind its schedule at worst",
            late.as_millis()
        );
    }
    let usage = stack.usage(sampler.finish(), total + args.beside.unwrap_or(0));
    let mut db = stack.stop()?;
    let runs = db.runs(Some("bench"), None, None, usize::MAX)?;
    let wide_ms = db
        .runs(Some("wide"), None, None, 1)?
        .first()
        .and_then(|r| Some(r.finished_ms? - r.created_ms));
    let phases = db.task_phases_ms("bench")?;
    drop(db);
    let spread = |mut ms: Vec<f64>| {
        ms.sort_by(f64::total_cmp);
        (percentile(&ms, 0.50), percentile(&ms, 0.99))
    };
    let admitted_ms = spread(phases.iter().map(|p| p.0 as f64).collect());
    let delivered_ms = spread(phases.iter().map(|p| p.1 as f64).collect());
    let mut latencies: Vec<f64> = runs
        .iter()
        .filter_map(|r| Some((r.finished_ms? - r.created_ms) as f64))
        .collect();
    latencies.sort_by(f64::total_cmp);
    let first = runs.iter().map(|r| r.created_ms).min().unwrap_or(0);
    let last = runs.iter().filter_map(|r| r.finished_ms).max().unwrap_or(first);
    let latency = Latency {
        runs: latencies.len(),
        rate: latencies.len() as f64 / ((last - first).max(1) as f64 / 1000.0),
        p50_ms: percentile(&latencies, 0.50),
        p90_ms: percentile(&latencies, 0.90),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().copied().unwrap_or(0.0),
        admitted_ms,
        delivered_ms,
    };
    stack.clean_up(settings, runtime);
    Ok((latency, wide_ms, usage))
}

/// Loopback addresses the open-loop submitter sends from (127.0.0.2
/// onwards; 127.0.0.1 waits for the end), and the requests in flight from
/// each at most: under the API's limit of 64 connections per address, as a
/// connection returns to the client's pool a moment after its answer (and
/// 480 in all, under its limit of 512).
const CLIENT_ADDRESSES: u8 = 10;
const PER_ADDRESS: usize = 48;

fn write_bench_config(
    dir: &Path,
    steps: usize,
    fan_in: bool,
    foreach: bool,
    beside: Option<usize>,
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("agents/models"))?;
    std::fs::create_dir_all(dir.join("workflows"))?;
    if let Some(width) = beside {
        let mut yaml = String::from("params:\n  payload: ~\nsteps:\n");
        for i in 0..width {
            yaml.push_str(&format!("  - name: w{i}\n    echo: \"${{payload}}\"\n"));
        }
        std::fs::write(dir.join("workflows/wide.yaml"), yaml)?;
    }
    std::fs::write(dir.join("agents/config.yaml"), "default_model: none\n")?;
    std::fs::write(
        dir.join("agents/models/none.yaml"),
        "provider: scripted\nmodel: none\nscript:\n  - text: unused\n",
    )?;
    if foreach {
        let yaml = "params:\n  payload: ~\n  items: ~\nsteps:\n  - name: each\n    foreach: \"${items}\"\n    max_concurrent: 10000\n    max_items: 100000\n    echo: \"${payload}\"\n";
        std::fs::write(dir.join("workflows/bench.yaml"), yaml)?;
        return Ok(());
    }
    let mut yaml = String::from("params:\n  payload: ~\nsteps:\n");
    let independent = if fan_in { steps - 1 } else { steps };
    for i in 0..independent {
        yaml.push_str(&format!("  - name: s{i}\n    echo: \"${{payload}}\"\n"));
    }
    if fan_in && independent > 0 {
        let all: Vec<String> = (0..independent).map(|i| format!("s{i}")).collect();
        yaml.push_str(&format!(
            "  - name: join\n    depends: [{}]\n    echo: joined\n",
            all.join(", ")
        ));
    }
    std::fs::write(dir.join("workflows/bench.yaml"), yaml)?;
    Ok(())
}
