//! Running a command step: least privilege (an environment built from
//! nothing, optionally another user), its own process group, a timeout that
//! kills the whole group, and bounded capture of stdout and stderr.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::process::Command;

/// Bounds on what a command may print.
#[derive(Debug, Clone, Copy)]
pub struct CaptureLimits {
    /// Bytes of stdout kept (the step's output; a step writing more fails).
    pub stdout: usize,
    /// Bytes of stderr kept (shown in failures).
    pub stderr: usize,
}

impl Default for CaptureLimits {
    fn default() -> Self {
        Self {
            stdout: 1024 * 1024,
            stderr: 64 * 1024,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// Exit status 0.
    Success,
    /// A non-zero status, or a signal.
    Failure(String),
    /// Killed at the timeout.
    TimedOut(Duration),
    /// Stopped because its run or step was cancelled.
    Cancelled,
    /// It could not be started.
    NotStarted(String),
}

/// What a command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// How it ended.
    pub exit: Exit,
    /// Captured stdout, up to the limit.
    pub stdout: String,
    /// Captured stderr, up to the limit.
    pub stderr: String,
    /// Whether stdout was cut at the limit.
    pub stdout_truncated: bool,
}

/// What a step's process starts from: never the worker's own environment.
#[derive(Debug, Clone, Default)]
pub struct Sandbox {
    /// The whole environment a step starts with (the documented base and the
    /// worker's `worker_env_passthrough` names); the step's own `env` is added.
    pub env: BTreeMap<String, String>,
    /// Run steps as this user and group instead of the worker's.
    pub user: Option<(u32, u32)>,
    /// Kills the steps' process groups should the worker die.
    pub reaper: Option<std::sync::Arc<crate::reaper::Reaper>>,
}

/// How long a cancelled step's process group has between SIGTERM and SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(1);

/// Run `argv` in `sandbox`'s environment plus the step's `env`, until it
/// exits, its timeout passes (the group is killed) or `stop` completes (the
/// group gets SIGTERM, then SIGKILL after [`STOP_GRACE`]).
pub async fn run(
    argv: &[String],
    env: &BTreeMap<String, String>,
    timeout: Duration,
    limits: CaptureLimits,
    sandbox: &Sandbox,
    stop: impl std::future::Future<Output = ()>,
) -> Outcome {
    let not_started = |why: String| Outcome {
        exit: Exit::NotStarted(why),
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated: false,
    };
    let Some((program, args)) = argv.split_first() else {
        return not_started("empty command".into());
    };
    let mut command = Command::new(program);
    command
        .args(args)
        .env_clear()
        .envs(&sandbox.env)
        .envs(env)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    if let Some((uid, gid)) = sandbox.user {
        // std drops supplementary groups when root changes the uid.
        command.uid(uid).gid(gid);
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(e) => return not_started(format!("cannot start \"{program}\": {e}")),
    };
    let group = child.id().and_then(|id| i32::try_from(id).ok()).map(Pid::from_raw);
    let mut group = group.map(|group| crate::reaper::Watched::new(sandbox.reaper.as_deref(), group));
    let mut signal = |signal| {
        if let Some(group) = group.as_mut() {
            group.signal(signal);
        }
    };
    let stdout = tokio::spawn(capture(child.stdout.take(), limits.stdout));
    let stderr = tokio::spawn(capture(child.stderr.take(), limits.stderr));

    let waited = tokio::select! {
        waited = tokio::time::timeout(timeout, child.wait()) => waited,
        () = stop => {
            signal(Signal::SIGTERM);
            if tokio::time::timeout(STOP_GRACE, child.wait()).await.is_err() {
                signal(Signal::SIGKILL);
            }
            // Whatever of the group outlived its leader.
            signal(Signal::SIGKILL);
            let _ = child.wait().await;
            return finish(Exit::Cancelled, stdout, stderr).await;
        }
    };
    let waited = match waited {
        Ok(waited) => waited,
        // The timer fired, but the worker may have been stopped (SIGSTOP, a
        // paused VM) while the child finished in time: ask before blaming it.
        Err(_) => match child.try_wait() {
            Ok(Some(status)) => Ok(status),
            _ => {
                signal(Signal::SIGKILL);
                let _ = child.wait().await;
                return finish(Exit::TimedOut(timeout), stdout, stderr).await;
            }
        },
    };
    let exit = match waited {
        Ok(status) if status.success() => Exit::Success,
        Ok(status) => Exit::Failure(match status.code() {
            Some(code) => format!("exit status {code}"),
            None => format!("killed by {status}"),
        }),
        Err(e) => Exit::Failure(format!("waiting for the process failed: {e}")),
    };
    // Kill what is left of the group: any background process that would hold
    // the pipes open.
    signal(Signal::SIGKILL);
    let _ = child.wait().await;
    finish(exit, stdout, stderr).await
}

async fn finish(
    exit: Exit,
    stdout: tokio::task::JoinHandle<(String, bool)>,
    stderr: tokio::task::JoinHandle<(String, bool)>,
) -> Outcome {
    let (stdout, stdout_truncated) = stdout.await.unwrap_or_default();
    let (stderr, _) = stderr.await.unwrap_or_default();
    Outcome {
        exit,
        stdout,
        stderr,
        stdout_truncated,
    }
}

/// Read a pipe to its end, keeping at most `limit` bytes.
async fn capture(pipe: Option<impl AsyncRead + Unpin>, limit: usize) -> (String, bool) {
    let Some(mut pipe) = pipe else {
        return (String::new(), false);
    };
    let mut kept = Vec::new();
    let mut truncated = false;
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let room = limit.saturating_sub(kept.len());
                kept.extend_from_slice(&buf[..n.min(room)]);
                truncated |= n > room;
            }
        }
    }
    (String::from_utf8_lossy(&kept).into_owned(), truncated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| (*s).to_string()).collect()
    }

    fn sandbox() -> Sandbox {
        Sandbox {
            env: BTreeMap::from([("PATH".to_string(), "/usr/bin:/bin".to_string())]),
            user: None,
            reaper: None,
        }
    }

    #[tokio::test]
    async fn a_step_sees_only_the_sandbox_and_its_own_env() {
        // HOME and CARGO_* are in the test's environment; the step sees none of them.
        let env = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
        let out = run(
            &argv(&["env"]),
            &env,
            Duration::from_secs(5),
            CaptureLimits::default(),
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.exit, Exit::Success);
        let mut lines: Vec<&str> = out.stdout.lines().collect();
        lines.sort_unstable();
        assert_eq!(lines, ["GREETING=hi", "PATH=/usr/bin:/bin"]);
    }

    #[tokio::test]
    async fn captures_stdout_and_env() {
        let env = BTreeMap::from([("GREETING".to_string(), "hi".to_string())]);
        let out = run(
            &argv(&["sh", "-c", "echo $GREETING there"]),
            &env,
            Duration::from_secs(5),
            CaptureLimits::default(),
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.exit, Exit::Success);
        assert_eq!(out.stdout, "hi there\n");
    }

    #[tokio::test]
    async fn non_zero_exit_keeps_stderr() {
        let out = run(
            &argv(&["sh", "-c", "echo boom >&2; exit 3"]),
            &BTreeMap::new(),
            Duration::from_secs(5),
            CaptureLimits::default(),
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.exit, Exit::Failure("exit status 3".into()));
        assert_eq!(out.stderr, "boom\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_process_tree() {
        let dir = std::env::temp_dir().join(format!("courier-tree-{}", std::process::id()));
        let marker = dir.with_extension("alive");
        let _ = std::fs::remove_file(&marker);
        // A grandchild that would touch the marker after 2 s if it survived.
        let script = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let started = std::time::Instant::now();
        let out = run(
            &argv(&["sh", "-c", &script]),
            &BTreeMap::new(),
            Duration::from_millis(300),
            CaptureLimits::default(),
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.exit, Exit::TimedOut(Duration::from_millis(300)));
        assert!(started.elapsed() < Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert!(!marker.exists(), "a grandchild outlived the timeout");
    }

    #[tokio::test]
    async fn output_is_bounded() {
        let limits = CaptureLimits {
            stdout: 1000,
            stderr: 10,
        };
        let out = run(
            &argv(&[
                "sh",
                "-c",
                "head -c 100000 /dev/zero | tr '\\0' x; head -c 50 /dev/zero | tr '\\0' y >&2",
            ]),
            &BTreeMap::new(),
            Duration::from_secs(5),
            limits,
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert_eq!(out.exit, Exit::Success);
        assert_eq!(out.stdout.len(), 1000);
        assert!(out.stdout_truncated);
        assert_eq!(out.stderr, "yyyyyyyyyy");
    }

    #[tokio::test]
    async fn a_missing_program_is_named() {
        let out = run(
            &argv(&["/nonexistent/tool"]),
            &BTreeMap::new(),
            Duration::from_secs(5),
            CaptureLimits::default(),
            &sandbox(),
            std::future::pending(),
        )
        .await;
        assert!(
            matches!(&out.exit, Exit::NotStarted(m) if m.starts_with("cannot start \"/nonexistent/tool\"")),
            "{out:?}"
        );
    }

    #[tokio::test]
    async fn a_stopped_step_gets_sigterm_and_a_deaf_one_sigkill_after_the_grace() {
        for (script, at_least, at_most) in [
            // Dies on SIGTERM at once.
            ("sleep 60", Duration::ZERO, Duration::from_millis(800)),
            // Ignores SIGTERM: killed when the grace is over.
            (
                "trap '' TERM; sleep 60 & wait",
                STOP_GRACE,
                STOP_GRACE + Duration::from_millis(800),
            ),
        ] {
            let started = std::time::Instant::now();
            let stop = tokio::time::sleep(Duration::from_millis(200));
            let out = run(
                &argv(&["sh", "-c", script]),
                &BTreeMap::new(),
                Duration::from_secs(60),
                CaptureLimits::default(),
                &sandbox(),
                stop,
            )
            .await;
            let took = started.elapsed() - Duration::from_millis(200);
            assert_eq!(out.exit, Exit::Cancelled, "{script}");
            assert!(took >= at_least && took < at_most, "{script}: {took:?}");
        }
    }
}
