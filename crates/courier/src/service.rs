//! `courier scheduler` and `courier worker`: settings, logs, signals, then the
//! library's `run`, bounded by the shutdown grace period.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use courier_config::Config;
use tokio_util::sync::CancellationToken;

use crate::settings::Settings;

/// Logs to stderr, `RUST_LOG`-style filter (default `info`), text or JSON;
/// with `otlp_endpoint` set, spans are exported there too (OTLP over HTTP,
/// JSON encoding) as `service`. The provider returned flushes them when
/// shut down (at exit).
pub fn init_logging(
    format: &str,
    otlp: Option<(&str, &'static str)>,
) -> Option<opentelemetry_sdk::trace::SdkTracerProvider> {
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,lapin=warn,amq_protocol=warn"));
    // Colours only on a terminal: log files and collectors get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (otel, provider) = match otlp.map(|(endpoint, service)| otlp_provider(endpoint, service)) {
        Some(Ok(provider)) => {
            use opentelemetry::trace::TracerProvider as _;
            let tracer = provider.tracer("courier");
            opentelemetry::global::set_tracer_provider(provider.clone());
            (Some(tracing_opentelemetry::layer().with_tracer(tracer)), Some(provider))
        }
        Some(Err(e)) => {
            eprintln!("warning: OpenTelemetry export is off: {e}");
            (None, None)
        }
        None => (None, None),
    };
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_ansi(ansi),
            )
            .init();
    }
    provider
}

/// An OTLP/HTTP (JSON) span exporter to `endpoint` (`http://host:4318`),
/// batched on a thread of its own.
fn otlp_provider(endpoint: &str, service: &'static str) -> anyhow::Result<opentelemetry_sdk::trace::SdkTracerProvider> {
    use opentelemetry_otlp::{Protocol, WithExportConfig as _};
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .with_timeout(Duration::from_secs(10))
        .build()
        .context("building the OTLP exporter")?;
    Ok(opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build())
}

/// Send the spans not yet exported.
fn flush(traces: Option<opentelemetry_sdk::trace::SdkTracerProvider>) {
    if let Some(provider) = traces
        && let Err(e) = provider.shutdown()
    {
        tracing::warn!(error = %e, "exporting the last spans failed");
    }
}

/// A token cancelled on SIGTERM or SIGINT.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    token
}

/// Exit code for a configuration that cannot be used (EX_CONFIG).
pub const EXIT_CONFIG: u8 = 78;

/// The shortest API token the scheduler accepts.
const MIN_API_TOKEN_CHARS: usize = 16;

pub fn scheduler(settings: Settings) -> anyhow::Result<ExitCode> {
    let traces = init_logging(
        &settings.log_format,
        settings.otlp_endpoint.as_deref().map(|e| (e, "courier-scheduler")),
    );
    if traces.is_some() {
        courier_scheduler::trace::enable();
    }
    if !settings.api_listen.ip().is_loopback() && settings.api_token().is_none() && !settings.api_allow_anonymous {
        eprintln!(
            "error: the API would listen on {} without a token: anyone who can reach it could submit runs. \
             Set api_token (COURIER_API_TOKEN), listen on 127.0.0.1, or set api_allow_anonymous = true to accept that.",
            settings.api_listen
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    // Wrong guesses are answered at once (no delay, no lockout: a delay
    // would only hold connections), so the token itself must resist them.
    if let Some(token) = settings.api_token()
        && token.chars().count() < MIN_API_TOKEN_CHARS
    {
        eprintln!(
            "error: api_token is {} characters: use at least {MIN_API_TOKEN_CHARS} (e.g. `openssl rand -hex 24`); \
             the API answers every guess at once, so a short token can be found by trying",
            token.chars().count()
        );
        return Ok(ExitCode::from(EXIT_CONFIG));
    }
    let config = match Config::load(settings.config_dir()) {
        Ok(config) => config,
        Err(errors) => {
            eprint!("{errors}");
            return Ok(ExitCode::from(EXIT_CONFIG));
        }
    };
    let sc = courier_scheduler::SchedulerConfig {
        amqp_url: settings.amqp_url.clone(),
        names: settings.names(),
        data_dir: settings.data_dir.clone(),
        database_url: settings.database_url.clone(),
        quorum_group_size: settings.quorum_group_size,
        management_url: Some(settings.management_url.clone()),
        api_listen: settings.api_listen,
        limits: courier_scheduler::engine::EngineLimits {
            snapshot: settings.snapshot_limits(),
            task: settings.task_limits(),
            max_queue_wait: Duration::from_secs(settings.task_max_wait_secs),
            pool_in_flight: settings
                .pools
                .iter()
                .filter_map(|(pool, p)| Some((pool.clone(), p.max_in_flight?)))
                .collect(),
            pool_queued: settings
                .pools
                .iter()
                .filter_map(|(pool, p)| Some((pool.clone(), p.max_queued?)))
                .collect(),
            default_queued: courier_scheduler::engine::gate::DEFAULT_MAX_QUEUED,
            ..courier_scheduler::engine::EngineLimits::default()
        },
        result_limits: settings.task_limits(),
        delivery_limit: settings.delivery_limit,
        connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
        signing_key: settings.signing_key(),
        api_token: settings.api_token().map(String::from),
        metrics_listen: settings.scheduler_metrics_listen,
    };
    // The engine runs on blocking threads, one at a time (one database
    // connection behind a mutex): more threads than this only wait, each
    // with its stack and its zstd contexts (512, tokio's default, held
    // +100 MiB at 2,500 submissions/s). The async side (intake, outbox, API)
    // keeps tokio's default threads: one thread switched threads less but
    // used no less CPU, alternated (README, "Tenth sitting"), and would leave
    // every loop waiting behind any slow poll.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(32)
        .build()
        .context("starting the async runtime")?;
    let outcome = runtime.block_on(async {
        let shutdown = shutdown_on_signals();
        courier_scheduler::run(config, sc, shutdown).await
    });
    flush(traces);
    outcome?;
    Ok(ExitCode::SUCCESS)
}

/// Run a worker. `env` is the environment it was started with (kept in
/// memory only: see `seal`).
pub fn worker(settings: Settings, env: BTreeMap<String, String>) -> anyhow::Result<ExitCode> {
    let traces = init_logging(
        &settings.log_format,
        settings.otlp_endpoint.as_deref().map(|e| (e, "courier-worker")),
    );
    let sandbox = sandbox(&settings, &env)?;
    let pools: Vec<String> = settings
        .worker_queues
        .split(',')
        .map(str::trim)
        .filter(|q| !q.is_empty())
        .map(String::from)
        .collect();
    if let Some(bad) = pools.iter().find(|q| !courier_config::is_slug(q)) {
        anyhow::bail!("\"{bad}\" is not a queue name (lower-case letters, digits and single hyphens)");
    }
    if pools.is_empty() || settings.worker_concurrency == 0 {
        anyhow::bail!("a worker needs at least one queue and a concurrency of at least 1");
    }
    let worker_id = settings.worker_id.clone().unwrap_or_else(default_worker_id);
    let config = courier_worker::WorkerConfig {
        amqp_url: settings.amqp_url.clone(),
        names: settings.names(),
        pools,
        concurrency: settings.worker_concurrency,
        worker_id,
        task_limits: settings.task_limits(),
        snapshot_limits: settings.snapshot_limits(),
        capture: courier_worker::command::CaptureLimits {
            stdout: settings.output_max_bytes,
            ..Default::default()
        },
        delivery_limit: settings.delivery_limit,
        quorum_group_size: settings.quorum_group_size,
        shutdown_grace: Duration::from_secs(settings.shutdown_grace_secs),
        connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
        signing_key: settings.signing_key(),
        metrics_listen: settings.worker_metrics_listen,
        sandbox,
        worker_env: std::sync::Arc::new(env),
    };
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    let outcome = runtime.block_on(async {
        let shutdown = shutdown_on_signals();
        courier_worker::run(config, shutdown).await
    });
    flush(traces);
    outcome?;
    Ok(ExitCode::SUCCESS)
}

fn default_worker_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "worker".into());
    format!("{host}-{}", std::process::id())
}

/// Variables a command step gets from the worker's environment when they are
/// set there: the base every program expects, none of them a secret.
pub const STEP_BASE_ENV: &[&str] = &["PATH", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR"];

/// `PATH` for steps when the worker has none.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What command steps start from: [`STEP_BASE_ENV`], `HOME` (and `USER`,
/// `LOGNAME` with `step_user`), and the `worker_env_passthrough` names.
fn sandbox(settings: &Settings, env: &BTreeMap<String, String>) -> anyhow::Result<courier_worker::command::Sandbox> {
    use courier_worker::reaper::Reaper;
    let mut step_env: BTreeMap<String, String> = STEP_BASE_ENV
        .iter()
        .filter_map(|k| env.get(*k).map(|v| ((*k).to_string(), v.clone())))
        .collect();
    step_env.entry("PATH".into()).or_insert_with(|| DEFAULT_PATH.into());
    if let Some(home) = env.get("HOME") {
        step_env.insert("HOME".into(), home.clone());
    }
    for name in settings
        .worker_env_passthrough
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
    {
        // Settings are read from the environment whatever the case of their names.
        if name.to_ascii_uppercase().starts_with("COURIER_") {
            anyhow::bail!(
                "worker_env_passthrough: {name} is Courier's own setting; COURIER_* variables never reach a step"
            );
        }
        if let Some(value) = env.get(name) {
            step_env.insert(name.to_string(), value.clone());
        }
    }
    let user = match settings.step_user.as_deref().filter(|u| !u.is_empty()) {
        None => {
            if nix::unistd::geteuid().is_root() {
                tracing::warn!(
                    "the worker runs as root and step_user is not set: steps run as root and can read the worker's memory"
                );
            }
            None
        }
        Some(name) => {
            let found = match name.parse::<u32>() {
                Ok(uid) => nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)),
                Err(_) => nix::unistd::User::from_name(name),
            }
            .with_context(|| format!("step_user: looking up \"{name}\""))?
            .with_context(|| format!("step_user: no user \"{name}\" on this machine"))?;
            let me = nix::unistd::geteuid();
            if !me.is_root() && me != found.uid {
                anyhow::bail!("step_user = \"{name}\" needs a worker running as root (this one runs as uid {me})");
            }
            step_env.insert("HOME".into(), found.dir.to_string_lossy().into_owned());
            step_env.insert("USER".into(), found.name.clone());
            step_env.insert("LOGNAME".into(), found.name.clone());
            Some((found.uid.as_raw(), found.gid.as_raw()))
        }
    };
    // The binary itself, as `courier reap-steps`.
    let reaper = match std::env::current_exe().and_then(|exe| Reaper::start(&exe, &["reap-steps"])) {
        Ok(reaper) => Some(std::sync::Arc::new(reaper)),
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the step reaper: a killed worker's steps would outlive it");
            None
        }
    };
    Ok(courier_worker::command::Sandbox {
        env: step_env,
        user,
        reaper,
    })
}
