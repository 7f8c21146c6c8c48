//! `courier`: one binary for the scheduler, the workers and the CLI.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

mod bench;
mod client;
mod dead;
mod dev;
mod seal;
mod service;
mod settings;
mod snapshot_cmd;
mod status;
mod term;
mod validate;

use settings::{Flags, Settings};

#[derive(Debug, Parser)]
#[command(
    name = "courier",
    version,
    about = "Dispatch agent workflows to shared-nothing workers over RabbitMQ"
)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Settings any command may override (see `courier.toml` and `COURIER_*`).
#[derive(Debug, Args)]
struct Global {
    /// Broker URL [env: COURIER_AMQP_URL].
    #[arg(long, global = true)]
    amqp_url: Option<String>,
    /// Prefix of every exchange and queue name [env: COURIER_NAMESPACE].
    #[arg(long, global = true)]
    namespace: Option<String>,
    /// The scheduler's HTTP API, for the CLI [env: COURIER_API_URL].
    #[arg(long, global = true)]
    api_url: Option<String>,
    /// Log format: text or json [env: COURIER_LOG_FORMAT].
    #[arg(long, global = true)]
    log_format: Option<String>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the scheduler: HTTP API, dispatch, results, cron.
    Scheduler {
        /// The config folder [env: COURIER_CONFIG_DIR].
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// The data folder [env: COURIER_DATA_DIR].
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Listen address of the HTTP API [env: COURIER_API_LISTEN].
        #[arg(long)]
        api_listen: Option<SocketAddr>,
        /// Internal: re-executed with its settings on stdin (see `seal`).
        #[arg(long, hide = true)]
        sealed: bool,
    },
    /// Run a worker.
    Worker {
        /// Queue (pool) to consume; repeat for several [env: COURIER_WORKER_QUEUES, comma-separated].
        #[arg(long = "queue")]
        queues: Vec<String>,
        /// Steps run at once [env: COURIER_WORKER_CONCURRENCY].
        #[arg(long)]
        concurrency: Option<usize>,
        /// Name in results and logs [env: COURIER_WORKER_ID].
        #[arg(long)]
        worker_id: Option<String>,
        /// Internal: re-executed with its settings on stdin (see `seal`).
        #[arg(long, hide = true)]
        sealed: bool,
    },
    /// Try it in one terminal: a scheduler and workers on this machine
    /// (through RabbitMQ, which must run), logs together; Ctrl-C stops all.
    Dev {
        /// Workers to start.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=16))]
        workers: u8,
    },
    /// Start a run of a workflow.
    Submit {
        /// Workflow name.
        workflow: String,
        /// Parameter as KEY=VALUE; repeat for several.
        #[arg(long = "param", short = 'p')]
        params: Vec<String>,
        /// Follow the run, print its outputs, exit 0 only if it succeeded.
        #[arg(long)]
        wait: bool,
        /// 0 (lowest) to 9 (highest); among steps held by a limit, higher
        /// priorities are dispatched first [default: 4].
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..=9))]
        priority: Option<u8>,
    },
    /// Approve a step waiting for approval: it succeeds with the comment as
    /// its output, and the run goes on.
    Approve {
        /// The run ID.
        run_id: String,
        /// The approval step.
        step: String,
        /// Recorded as the step's output.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Reject a step waiting for approval: it fails, and what depends on it is skipped.
    Reject {
        /// The run ID.
        run_id: String,
        /// The approval step.
        step: String,
        /// Recorded in the step's error.
        #[arg(long)]
        comment: Option<String>,
    },
    /// Cancel a run (or one step of it): running steps are stopped within
    /// seconds, the rest never start.
    Cancel {
        /// The run ID.
        run_id: String,
        /// Cancel only this step (its dependents are skipped).
        #[arg(long)]
        step: Option<String>,
        /// Why, recorded with the run.
        #[arg(long)]
        reason: Option<String>,
    },
    /// List runs, or show one with its steps.
    Runs {
        /// A run ID.
        run_id: Option<String>,
        /// Only runs of this workflow.
        #[arg(long)]
        workflow: Option<String>,
        /// Only runs in this status (running, succeeded, failed, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// At most this many runs (50 unless given; at most 1000).
        #[arg(long)]
        limit: Option<usize>,
        /// Only runs older than this run: the last ID of one page gives the next.
        #[arg(long)]
        before: Option<String>,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Queues (depth, rates, consumers) and recent runs.
    Status {
        /// Recent runs shown.
        #[arg(long, default_value_t = 10)]
        limit: usize,
        /// Print JSON for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Inspect and replay dead-lettered tasks.
    #[command(subcommand)]
    Dead(dead::DeadCommand),
    /// Measure Courier's end-to-end rate against the raw AMQP ceiling.
    Bench(bench::BenchArgs),
    /// Check a config folder: every workflow and agent resource, all errors at once.
    Validate {
        /// The config folder, holding workflows/ and agents/ [env: COURIER_CONFIG_DIR] [default: config].
        #[arg(long)]
        config_dir: Option<PathBuf>,
        /// Every step's snapshot must fit these.
        #[command(flatten)]
        limits: snapshot_cmd::LimitArgs,
    },
    /// Build and inspect step snapshots.
    #[command(subcommand)]
    Snapshot(snapshot_cmd::SnapshotCommand),
    /// Exit 0 if URL answers 2xx within 5 s (a container healthcheck: the
    /// image has no curl).
    Healthcheck {
        /// A `/healthz` URL.
        url: String,
    },
    /// Internal: a worker's step reaper (see `courier_worker::reaper`).
    #[command(hide = true)]
    ReapSteps,
    /// Internal: one worker of `courier bench`'s raw ceiling, a process of
    /// its own as Courier's workers are (see `bench::raw_worker`).
    #[command(hide = true)]
    BenchRawWorker {
        namespace: String,
        index: usize,
        prefetch: u16,
    },
}

fn main() -> ExitCode {
    seal::at_start();
    exit_quietly_on_closed_output();
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let mut flags = Flags::default();
    flags
        .set("amqp_url", cli.global.amqp_url)
        .set("namespace", cli.global.namespace)
        .set("api_url", cli.global.api_url)
        .set("log_format", cli.global.log_format);
    match cli.command {
        Command::Validate { config_dir, limits } => {
            limits.set(flags.set("config_dir", config_dir));
            let settings = Settings::load(flags.0)?;
            validate::run(&settings.config_dir, settings.snapshot_limits(), settings.task_limits())
        }
        Command::Snapshot(cmd) => snapshot_cmd::run(cmd, flags),
        Command::Scheduler {
            config_dir,
            data_dir,
            api_listen,
            sealed,
        } => {
            if sealed {
                return service::scheduler(seal::unseal()?.settings);
            }
            flags
                .set("config_dir", config_dir)
                .set("data_dir", data_dir)
                .set("api_listen", api_listen);
            match Settings::load(flags.0) {
                // Start again without secrets in the environment (see `seal`).
                Ok(settings) => match seal::reexec("scheduler", settings)? {},
                Err(e) => config_error(e),
            }
        }
        Command::Worker {
            queues,
            concurrency,
            worker_id,
            sealed,
        } => {
            if sealed {
                let sealed = seal::unseal()?;
                return service::worker(sealed.settings, sealed.env);
            }
            flags
                .set("worker_queues", (!queues.is_empty()).then(|| queues.join(",")))
                .set("worker_concurrency", concurrency)
                .set("worker_id", worker_id);
            match Settings::load(flags.0) {
                // Start again without secrets in the environment (see `seal`).
                Ok(settings) => match seal::reexec("worker", settings)? {},
                Err(e) => config_error(e),
            }
        }
        Command::Dev { workers } => {
            let settings = Settings::load(flags.0)?;
            dev::run(&settings, usize::from(workers))
        }
        Command::Status { limit, json } => {
            let settings = Settings::load(flags.0)?;
            runtime()?.block_on(status::run(&settings, limit, json))
        }
        Command::Dead(cmd) => {
            let settings = Settings::load(flags.0)?;
            runtime()?.block_on(dead::run(&settings, cmd))
        }
        Command::Bench(args) => {
            let settings = Settings::load(flags.0)?;
            bench::run(&settings, &args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::BenchRawWorker {
            namespace,
            index,
            prefetch,
        } => {
            let settings = Settings::load(flags.0)?;
            runtime()?.block_on(bench::raw_worker(&settings.amqp_url, namespace, index, prefetch))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::ReapSteps => {
            courier_worker::reaper::serve(std::io::stdin().lock());
            Ok(ExitCode::SUCCESS)
        }
        Command::Healthcheck { url } => runtime()?.block_on(async {
            let response = client::client()?
                .get(&url)
                .timeout(std::time::Duration::from_secs(5))
                .send()
                .await?;
            if !response.status().is_success() {
                anyhow::bail!("{url} answered {}", response.status());
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Submit {
            workflow,
            params,
            wait,
            priority,
        } => {
            let settings = Settings::load(flags.0)?;
            let params = client::parse_params(&params)?;
            let api = client::Api::new(&settings)?;
            runtime()?.block_on(client::submit(&api, &workflow, params, priority, wait))
        }
        Command::Approve { run_id, step, comment } => {
            let settings = Settings::load(flags.0)?;
            let api = client::Api::new(&settings)?;
            runtime()?.block_on(client::decide(&api, &run_id, &step, true, comment.as_deref()))
        }
        Command::Reject { run_id, step, comment } => {
            let settings = Settings::load(flags.0)?;
            let api = client::Api::new(&settings)?;
            runtime()?.block_on(client::decide(&api, &run_id, &step, false, comment.as_deref()))
        }
        Command::Cancel { run_id, step, reason } => {
            let settings = Settings::load(flags.0)?;
            let api = client::Api::new(&settings)?;
            runtime()?.block_on(client::cancel(&api, &run_id, step.as_deref(), reason.as_deref()))
        }
        Command::Runs {
            run_id,
            workflow,
            status,
            limit,
            before,
            json,
        } => {
            let settings = Settings::load(flags.0)?;
            let filters = [
                ("workflow", workflow),
                ("status", status),
                ("limit", limit.map(|l| l.to_string())),
                ("before", before),
            ];
            let api = client::Api::new(&settings)?;
            runtime()?.block_on(client::runs(&api, run_id.as_deref(), json, &filters))
        }
    }
}

/// `courier dead list --json | head -5`: when the reader goes away, Rust's
/// `println!` panics on the broken pipe (Rust ignores SIGPIPE, and restoring
/// it would take `unsafe`). The command's output is no longer wanted: exit
/// quietly, as a program killed by SIGPIPE would, instead of a panic message.
fn exit_quietly_on_closed_output() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if message.starts_with("failed printing to std") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

fn config_error(e: anyhow::Error) -> anyhow::Result<ExitCode> {
    eprintln!("error: {e:#}");
    Ok(ExitCode::from(service::EXIT_CONFIG))
}
