//! Kills the process groups of a worker's running steps when the worker
//! dies, however it dies (SIGKILL included, which no handler sees): a
//! helper process started with the worker is told of each step's group as
//! it starts and ends, over a pipe, and once that pipe ends (the worker is
//! gone: the kernel closes its end) kills every group still listed. Without
//! it, a killed worker's steps would run on past their timeout, beside the
//! attempt the broker redelivers to another worker.
//!
//! The worker's side is a thread of its own that writes to the pipe,
//! blocking, what the steps tell it through a channel: a helper that is
//! slow or stopped (SIGSTOP) holds up no step, and is told everything once
//! it reads again. A helper that is gone (killed by a step of the same
//! user, say) is started again and told of every group still running.
//! A step that leaves its process group (`setsid`) escapes, as it escapes
//! the timeout's kill.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::warn;

/// Lines waiting for the helper beyond which the worker warns (once until
/// they are written): a helper that reads nothing, stopped.
const BACKLOG_WARN: usize = 10_000;

/// The least time between two starts of the helper.
const RESTART_EVERY: Duration = Duration::from_secs(1);

/// The worker's end: tells the helper of each step's process group.
#[derive(Debug)]
pub struct Reaper {
    lines: mpsc::Sender<(bool, i32)>,
    /// Lines sent and not yet written to the helper.
    backlog: Arc<AtomicUsize>,
    warned: AtomicBool,
    /// The helper's process id, for tests.
    #[cfg(test)]
    helper: Arc<std::sync::atomic::AtomicU32>,
}

impl Reaper {
    /// Start the helper, `program args…` (`courier reap-steps`, which runs
    /// [`serve`]), with an empty environment, in a process group of its own
    /// (so a terminal's Ctrl-C, which stops the worker's steps, does not
    /// stop it first), and the thread that writes to it.
    ///
    /// # Errors
    /// The helper or the thread could not be started.
    pub fn start(program: &Path, args: &[&str]) -> std::io::Result<Self> {
        let spawn = {
            let (program, args): (PathBuf, Vec<String>) =
                (program.into(), args.iter().map(ToString::to_string).collect());
            move || helper(&program, &args)
        };
        let first = spawn()?;
        let (lines, received) = mpsc::channel();
        let backlog = Arc::new(AtomicUsize::new(0));
        #[cfg(test)]
        let pid = Arc::new(std::sync::atomic::AtomicU32::new(first.id()));
        std::thread::Builder::new().name("step-reaper".into()).spawn({
            let backlog = backlog.clone();
            #[cfg(test)]
            let pid = pid.clone();
            move || {
                #[cfg(test)]
                let on_start = move |child: &Child| pid.store(child.id(), Ordering::Relaxed);
                #[cfg(not(test))]
                let on_start = |_: &Child| {};
                write(first, spawn, received, &backlog, on_start);
            }
        })?;
        Ok(Self {
            lines,
            backlog,
            warned: AtomicBool::new(false),
            #[cfg(test)]
            helper: pid,
        })
    }

    /// A step's process group started: killed if the worker dies.
    pub fn watch(&self, group: Pid) {
        self.tell(true, group);
    }

    /// A step's process group is over (killed, its leader reaped).
    pub fn release(&self, group: Pid) {
        self.tell(false, group);
    }

    fn tell(&self, watch: bool, group: Pid) {
        // Counted before it is sent: the writer counts it out once written.
        let waiting = self.backlog.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.lines.send((watch, group.as_raw()));
        if waiting == BACKLOG_WARN && !self.warned.swap(true, Ordering::Relaxed) {
            warn!(
                waiting,
                "the step reaper reads nothing (stopped?): should the worker be killed now, steps it was not told of would outlive it"
            );
        } else if waiting == 1 {
            self.warned.store(false, Ordering::Relaxed);
        }
    }
}

fn helper(program: &Path, args: &[String]) -> std::io::Result<Child> {
    Command::new(program)
        .args(args)
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .process_group(0)
        .spawn()
}

/// The writing thread: each line to the helper, blocking; the groups still
/// running kept, to tell a helper started again (at most one start per
/// [`RESTART_EVERY`]; meanwhile lines are only kept). Ends when the
/// worker's `Reaper` is dropped: the helper's input then ends.
fn write(
    first: Child,
    spawn: impl Fn() -> std::io::Result<Child>,
    lines: mpsc::Receiver<(bool, i32)>,
    backlog: &AtomicUsize,
    on_start: impl Fn(&Child),
) {
    let mut running = BTreeSet::new();
    let mut helper = Some(first);
    let mut started = Instant::now();
    for (watch, group) in lines {
        backlog.fetch_sub(1, Ordering::Relaxed);
        if watch {
            running.insert(group);
        } else {
            running.remove(&group);
        }
        let line = format!("{}{group}\n", if watch { '+' } else { '-' });
        if let Some(child) = helper.as_mut()
            && child
                .stdin
                .as_mut()
                .is_some_and(|pipe| pipe.write_all(line.as_bytes()).is_ok())
        {
            continue;
        }
        // Gone (or never started again): reap it, start another, and tell
        // it every group still running.
        if let Some(mut gone) = helper.take() {
            let _ = gone.kill();
            let status = gone.wait().ok();
            warn!(?status, "the step reaper is gone; starting another");
        }
        if started.elapsed() < RESTART_EVERY {
            continue;
        }
        started = Instant::now();
        match spawn() {
            Ok(mut child) => {
                on_start(&child);
                let told = running.iter().try_for_each(|group| {
                    let pipe = child.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
                    pipe.write_all(format!("+{group}\n").as_bytes())
                });
                if told.is_ok() {
                    helper = Some(child);
                }
            }
            Err(e) => warn!(error = %e, "cannot start the step reaper again; trying at the next step"),
        }
    }
}

/// The helper: read `+<group>` and `-<group>` lines until the input ends,
/// then kill every group still listed (SIGKILL).
pub fn serve(input: impl BufRead) {
    let mut groups = BTreeSet::new();
    for line in input.lines() {
        let Ok(line) = line else {
            break;
        };
        let (sign, group) = line.split_at(line.len().min(1));
        // Never 0 (its own group) nor 1 (init's), nor anything unparsable.
        let Some(group) = group.parse::<i32>().ok().filter(|g| *g > 1) else {
            continue;
        };
        match sign {
            "+" => groups.insert(group),
            "-" => groups.remove(&group),
            _ => continue,
        };
    }
    for group in groups {
        let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
    }
}

/// A step's process group, watched while it lives: signalled through
/// [`Watched::signal`] (killed as the step ends, as soon as its leader
/// exits); dropped, it is released, and killed first if it was not (a step
/// whose future is dropped mid-way must not outlive it).
pub(crate) struct Watched<'a> {
    reaper: Option<&'a Reaper>,
    group: Pid,
    killed: bool,
}

impl<'a> Watched<'a> {
    pub(crate) fn new(reaper: Option<&'a Reaper>, group: Pid) -> Self {
        if let Some(reaper) = reaper {
            reaper.watch(group);
        }
        Self {
            reaper,
            group,
            killed: false,
        }
    }

    /// Send the group `signal`; SIGKILL marks it killed.
    pub(crate) fn signal(&mut self, signal: Signal) {
        let _ = killpg(self.group, signal);
        self.killed |= signal == Signal::SIGKILL;
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        if !self.killed {
            let _ = killpg(self.group, Signal::SIGKILL);
        }
        if let Some(reaper) = self.reaper {
            reaper.release(self.group);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt;

    use super::*;

    #[test]
    fn the_helper_kills_the_groups_still_listed_when_its_input_ends() {
        let spawn = || {
            std::process::Command::new("sleep")
                .arg("30")
                .process_group(0)
                .spawn()
                .unwrap()
        };
        let (mut kept, mut released) = (spawn(), spawn());
        let input = format!(
            "+{kept}\n+{released}\n-{released}\nnonsense\n+0\n+1\n-\n",
            kept = kept.id(),
            released = released.id()
        );
        serve(input.as_bytes());
        assert_eq!(kept.wait().unwrap().signal(), Some(9), "killed");
        assert!(released.try_wait().unwrap().is_none(), "released: left alone");
        released.kill().unwrap();
        released.wait().unwrap();
    }

    #[test]
    fn a_helper_that_is_gone_is_started_again_and_told_of_every_group_still_running() {
        let dir = tempfile::TempDir::new().unwrap();
        let told = dir.path().join("told");
        let script = format!("exec cat >> {}", told.display());
        let reaper = Reaper::start(Path::new("/bin/sh"), &["-c", &script]).unwrap();
        let (a, b) = (Pid::from_raw(100_001), Pid::from_raw(100_002));
        reaper.watch(a);
        reaper.watch(b);
        reaper.release(a);
        let first = reaper.helper.load(Ordering::Relaxed);
        let wait_for = |what: &str| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !std::fs::read_to_string(&told).unwrap_or_default().ends_with(what) {
                assert!(Instant::now() < deadline, "{:?}", std::fs::read_to_string(&told));
                std::thread::sleep(Duration::from_millis(10));
            }
        };
        wait_for("-100001\n");
        nix::sys::signal::kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
        std::thread::sleep(RESTART_EVERY);
        // The next line finds it gone: another starts, told of b, the one
        // still running, then of what comes next.
        let c = Pid::from_raw(100_003);
        while reaper.helper.load(Ordering::Relaxed) == first {
            reaper.watch(c);
            std::thread::sleep(Duration::from_millis(50));
        }
        reaper.release(c);
        wait_for("-100003\n");
        let all = std::fs::read_to_string(&told).unwrap();
        let second = &all[all.find("-100001\n").unwrap() + 8..];
        assert!(second.starts_with("+100002\n"), "{second:?}");
    }
}
