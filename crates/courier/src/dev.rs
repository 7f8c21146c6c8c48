//! `courier dev`: try Courier in one terminal: a scheduler and workers on
//! this machine, as their own processes (still through RabbitMQ), their logs
//! together, all stopped by Ctrl-C.

use std::net::{TcpStream, ToSocketAddrs};
use std::process::{Child, Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use crate::settings::Settings;

/// Start a scheduler and `workers` workers with these settings; return when
/// interrupted (exit 0) or when one of them stops (exit 1).
///
/// # Errors
/// RabbitMQ is not reachable (with the command that starts it), or a
/// process cannot be started.
pub fn run(settings: &Settings, workers: usize) -> anyhow::Result<ExitCode> {
    broker_reachable(&settings.amqp_url)?;
    let exe = std::env::current_exe().context("locating the courier binary")?;
    let mut children: Vec<(String, Child)> = Vec::new();
    let spawn = |args: &[&str]| Command::new(&exe).args(args).spawn();
    let started = (|| {
        children.push(("scheduler".into(), spawn(&["scheduler"])?));
        for i in 1..=workers {
            let id = format!("dev-w{i}");
            children.push((id.clone(), spawn(&["worker", "--worker-id", &id])?));
        }
        Ok::<_, std::io::Error>(())
    })();
    let stop = |children: &mut Vec<(String, Child)>| {
        for (_, child) in children.iter() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
        }
        for (_, child) in children.iter_mut() {
            let _ = child.wait();
        }
    };
    if let Err(e) = started {
        stop(&mut children);
        return Err(e).context("starting a courier process");
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let code = runtime.block_on(async {
        let ready = wait_ready(settings, &mut children).await;
        match ready {
            Ok(api) => {
                // The CLI looks at api_url: say so when it is not where
                // this scheduler listens.
                let cli = if api == settings.api_url.trim_end_matches('/') {
                    String::new()
                } else {
                    format!("COURIER_API_URL={api} ")
                };
                println!(
                    "courier dev: the scheduler answers on {api} and {workers} worker(s) run. Try: {cli}courier submit triage --wait   (Ctrl-C stops them all)"
                );
            }
            Err(e) => {
                eprintln!("courier dev: {e:#}");
                return ExitCode::FAILURE;
            }
        }
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return ExitCode::SUCCESS,
                _ = terminated() => return ExitCode::SUCCESS,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if let Some(name) = exited(&mut children) {
                        eprintln!("courier dev: {name} stopped; stopping the others");
                        return ExitCode::FAILURE;
                    }
                }
            }
        }
    });
    stop(&mut children);
    Ok(code)
}

/// SIGTERM, as a service manager or a test sends it.
async fn terminated() {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            term.recv().await;
        }
        Err(_) => std::future::pending().await,
    }
}

/// The name of a process that exited, if one did.
fn exited(children: &mut [(String, Child)]) -> Option<String> {
    children
        .iter_mut()
        .find_map(|(name, child)| child.try_wait().ok().flatten().map(|_| name.clone()))
}

/// Wait until the scheduler started here answers `/healthz` where it
/// listens (`api_listen`; the address it wrote to `api.addr` for port 0),
/// 30 s at most: the URL it answers on.
async fn wait_ready(settings: &Settings, children: &mut [(String, Child)]) -> anyhow::Result<String> {
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let listening = || {
        let mut addr = settings.api_listen;
        if addr.port() == 0 {
            addr = std::fs::read_to_string(settings.data_dir.join("api.addr"))
                .ok()
                .and_then(|a| a.trim().parse().ok())?;
        }
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        Some(format!("http://{addr}"))
    };
    loop {
        if let Some(api) = listening()
            && client
                .get(format!("{api}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        {
            return Ok(api);
        }
        if let Some(name) = exited(children) {
            bail!("{name} stopped while starting (its error is above)");
        }
        if Instant::now() > deadline {
            bail!(
                "the scheduler did not answer on {} within 30 s",
                listening().unwrap_or_else(|| settings.api_listen.to_string())
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Fail with the way to start RabbitMQ when the first broker URL does not
/// accept a connection.
fn broker_reachable(amqp_url: &str) -> anyhow::Result<()> {
    let first = courier_amqp::broker_urls(amqp_url).first().copied().unwrap_or(amqp_url);
    let url = reqwest::Url::parse(first).context("amqp_url is not a URL")?;
    let host = url.host_str().unwrap_or("127.0.0.1").to_string();
    let port = url.port().unwrap_or(5672);
    let reachable = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(anyhow::Error::from)
        .and_then(|mut addrs| {
            let addr = addrs.next().context("no address")?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(anyhow::Error::from)
        });
    if let Err(e) = reachable {
        bail!(
            "RabbitMQ is not reachable at {host}:{port} ({e}). Start it with \
             `sudo apt-get install -y rabbitmq-server && sudo rabbitmq-server -detached` \
             (or `docker compose up -d rabbitmq`), or set COURIER_AMQP_URL to yours"
        );
    }
    Ok(())
}
