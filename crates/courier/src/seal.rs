//! The services' secrets leave their process environment before any step runs.
//!
//! `/proc/<pid>/environ` and `/proc/<pid>/cmdline` show what a process was
//! started with, for as long as it lives, to anyone allowed to read them (the
//! same user, or root), and a step may run as the same user on the same
//! machine. So `courier worker` and `courier scheduler` re-execute themselves
//! once at start:
//! the resolved settings and its environment travel to the new image through
//! an anonymous memory file on its standard input (emptied once read), and the
//! new image starts with only a harmless base environment and no flags. It then
//! marks itself non-dumpable, which also closes its `/proc/<pid>/mem` and
//! `environ` to processes of the same user. What it started with stays in its
//! memory: provider keys for agent steps, the names in `worker_env_passthrough`
//! for command steps. Steps themselves start from nothing (see
//! `courier_worker::command::Sandbox`).

use std::collections::BTreeMap;
use std::io::{Read, Seek, Write};
use std::os::unix::process::CommandExt;

use anyhow::Context;
use serde::{Deserialize, Serialize};

use crate::settings::Settings;

/// The hidden flag of a re-executed service: its settings are on stdin.
pub const SEALED_FLAG: &str = "--sealed";

/// Variables a sealed service keeps: none of them is a secret, and
/// logging, locale and time zone depend on them.
const KEPT: &[&str] = &[
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "RUST_LOG",
    "RUST_BACKTRACE",
    "NO_COLOR",
    "MALLOC_ARENA_MAX",
];

/// glibc's malloc arenas for a sealed service, unless its environment sets
/// `MALLOC_ARENA_MAX`: two for the scheduler, one for a worker. By default
/// glibc gives threads up to eight arenas per core, and tokio's blocking
/// pool runs submissions, results and the outbox on ever-changing threads,
/// so memory freed in one arena is not reused by the others and stays
/// resident. In the 50,000-task soak (`courier bench --tasks 50000 --workers
/// 4 --concurrency 32`) the scheduler peaked 108 MiB over its idle level
/// with glibc's default, 55–58 MiB with one arena; fewer arenas cost CPU
/// in lock contention (`courier bench --tasks 20000`, alternated: scheduler
/// 3.2–3.6 CPU-s with one arena, 2.8–2.9 with two, 2.3–2.4 unbounded), and
/// workers, whose memory is flat, stay under 25 MiB only with one (24.1–24.6
/// MiB; 25.3–25.5 with two).
fn malloc_arenas(service: &str) -> &'static str {
    if service == "scheduler" { "2" } else { "1" }
}

/// What a sealed service received from the image that started it.
#[derive(Serialize, Deserialize)]
pub struct Sealed {
    /// Settings, resolved from every layer before the re-exec.
    pub settings: Settings,
    /// The environment it was started with.
    pub env: BTreeMap<String, String>,
}

/// The first thing every `courier` process does: become non-dumpable (its
/// `/proc/<pid>/environ`, `mem` and `fd` closed to other processes of the same
/// user, until then open to them), and close every file descriptor inherited
/// beyond stdin, stdout and stderr, so no step started later inherits one
/// (a secret file a shell left open, the write end of a pipe).
///
/// A process is dumpable again after every `exec`, until this runs: the
/// windows left are the microseconds from a start (and from the re-exec) to
/// here, for steps of the same user. `step_user` closes them.
pub fn at_start() {
    let _ = nix::sys::prctl::set_dumpable(false);
    let inherited: Vec<i32> = std::fs::read_dir("/proc/self/fd")
        .map(|dir| {
            dir.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // The listing's own descriptor is closed by now: closing it again fails, harmlessly.
    for fd in inherited.into_iter().filter(|fd| *fd > 2) {
        let _ = nix::unistd::close(fd);
    }
}

/// Re-execute this binary as a sealed `service` (`worker` or `scheduler`).
/// Returns only on failure.
///
/// # Errors
/// The memory file could not be made or the binary could not be executed.
pub fn reexec(service: &str, settings: Settings) -> anyhow::Result<std::convert::Infallible> {
    let env: BTreeMap<String, String> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect();
    let mut kept: Vec<(String, String)> = env
        .iter()
        .filter(|(k, _)| KEPT.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    if !env.contains_key("MALLOC_ARENA_MAX") {
        kept.push(("MALLOC_ARENA_MAX".into(), malloc_arenas(service).into()));
    }
    let blob = serde_json::to_vec(&Sealed { settings, env }).context("encoding the settings")?;
    let fd = nix::sys::memfd::memfd_create(c"courier-settings", nix::sys::memfd::MFdFlags::MFD_CLOEXEC)
        .context("creating the memory file that carries the settings")?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&blob)
        .and_then(|()| file.rewind())
        .context("writing the settings")?;
    let exe = std::env::current_exe().context("finding the courier executable")?;
    let error = std::process::Command::new(&exe)
        .args([service, SEALED_FLAG])
        .env_clear()
        .envs(kept)
        .stdin(file)
        .exec();
    Err(error).with_context(|| format!("re-executing {} without secrets in its environment", exe.display()))
}

/// In a re-executed service (started with [`SEALED_FLAG`], non-dumpable since
/// [`at_start`]): read and erase the settings on stdin.
///
/// # Errors
/// Stdin does not carry the settings.
pub fn unseal() -> anyhow::Result<Sealed> {
    // Opening /proc/self/fd/0 gives a file of our own on the memory file, so it
    // can be truncated: once read, nothing of it stays reachable through fd 0.
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/proc/self/fd/0")
        .with_context(|| format!("{SEALED_FLAG} is given, but stdin is not the settings"))?;
    let mut blob = Vec::new();
    file.read_to_end(&mut blob).context("reading the settings")?;
    file.set_len(0).context("erasing the settings")?;
    serde_json::from_slice(&blob).context("decoding the settings")
}
