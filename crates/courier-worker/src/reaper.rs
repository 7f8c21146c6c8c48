//! Kills the process groups of a worker's running steps when the worker
//! dies, however it dies (SIGKILL included, which no handler sees): a
//! helper process started with the worker is told of each step's group as
//! it starts and ends, over a pipe, and once that pipe ends (the worker is
//! gone: the kernel closes its end) kills every group still listed. Without
//! it, a killed worker's steps would run on past their timeout, beside the
//! attempt the broker redelivers to another worker.
//!
//! A step that leaves its process group (`setsid`) escapes, as it escapes
//! the timeout's kill.

use std::collections::BTreeSet;
use std::io::{BufRead, Write};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::Mutex;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tracing::warn;

/// The worker's end: tells the helper of each step's process group.
#[derive(Debug)]
pub struct Reaper {
    /// `None` once the helper is gone (a write failed).
    pipe: Mutex<Option<ChildStdin>>,
    _helper: Child,
}

impl Reaper {
    /// Start the helper, `program args…` (`courier reap-steps`, which runs
    /// [`serve`]), with an empty environment, in a process group of its own
    /// (so a terminal's Ctrl-C, which stops the worker's steps, does not
    /// stop it first).
    ///
    /// # Errors
    /// The helper could not be started.
    pub fn start(program: &Path, args: &[&str]) -> std::io::Result<Self> {
        let mut helper = Command::new(program)
            .args(args)
            .env_clear()
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .process_group(0)
            .spawn()?;
        let pipe = helper.stdin.take();
        if let Some(pipe) = &pipe {
            // Never block the worker: a helper that stopped reading loses
            // what it is told (see `tell`).
            fcntl(pipe, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).map_err(std::io::Error::from)?;
        }
        Ok(Self {
            pipe: Mutex::new(pipe),
            _helper: helper,
        })
    }

    /// A step's process group started: killed if the worker dies.
    pub fn watch(&self, group: Pid) {
        self.tell('+', group);
    }

    /// A step's process group is over (killed, its leader reaped).
    pub fn release(&self, group: Pid) {
        self.tell('-', group);
    }

    fn tell(&self, sign: char, group: Pid) {
        let mut pipe = self.pipe.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(writer) = pipe.as_mut() else {
            return;
        };
        // A line is far under PIPE_BUF: written whole or not at all.
        if let Err(e) = writer.write_all(format!("{sign}{group}\n").as_bytes()) {
            warn!(error = %e, "the step reaper is gone: a killed worker's steps would outlive it");
            *pipe = None;
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

/// A step's process group, watched while it lives: released when dropped,
/// and killed too (a step whose future is dropped mid-way must not outlive
/// it; after a step ends, its group is killed already).
pub(crate) struct Watched<'a> {
    reaper: Option<&'a Reaper>,
    group: Pid,
}

impl<'a> Watched<'a> {
    pub(crate) fn new(reaper: Option<&'a Reaper>, group: Pid) -> Self {
        if let Some(reaper) = reaper {
            reaper.watch(group);
        }
        Self { reaper, group }
    }
}

impl Drop for Watched<'_> {
    fn drop(&mut self) {
        let _ = killpg(self.group, Signal::SIGKILL);
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
}
