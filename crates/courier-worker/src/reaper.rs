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

/// What the worker keeps unwritten while the helper's pipe is full, at
/// most: beyond it, what it is told is dropped, whole lines (a warning).
const PENDING_MAX: usize = 1 << 20;

/// The worker's end: tells the helper of each step's process group.
#[derive(Debug)]
pub struct Reaper {
    link: Mutex<Link>,
}

#[derive(Debug)]
struct Link {
    /// `None` once the helper is gone (its end closed).
    pipe: Option<ChildStdin>,
    /// Lines not yet written: the pipe was full (a helper slow to read).
    pending: Vec<u8>,
    /// Lines dropped since the last warning, the pending ones at their bound.
    dropped: usize,
    helper: Child,
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
            link: Mutex::new(Link {
                pipe,
                pending: Vec::new(),
                dropped: 0,
                helper,
            }),
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

    /// Write the line, after those pending. A full pipe keeps them pending
    /// (never closed for it: the helper would take that for the worker's
    /// end and kill every step); only a helper that is gone loses them.
    fn tell(&self, sign: char, group: Pid) {
        let mut link = self.link.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let link = &mut *link;
        let Some(pipe) = link.pipe.as_mut() else {
            return;
        };
        if link.pending.len() < PENDING_MAX {
            link.pending.extend_from_slice(format!("{sign}{group}\n").as_bytes());
        } else {
            link.dropped += 1;
        }
        while !link.pending.is_empty() {
            match pipe.write(&link.pending) {
                Ok(n) => {
                    link.pending.drain(..n);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if link.dropped > 0 {
                        warn!(
                            dropped = link.dropped,
                            "the step reaper reads too slowly: steps it was not told of would outlive a killed worker"
                        );
                        link.dropped = 0;
                    }
                    return;
                }
                Err(e) => {
                    let status = link.helper.try_wait().ok().flatten();
                    warn!(error = %e, ?status, "the step reaper is gone: a killed worker's steps would outlive it");
                    link.pipe = None;
                    link.pending = Vec::new();
                    return;
                }
            }
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
    fn a_full_pipe_keeps_the_lines_pending_and_is_never_closed_for_it() {
        // A helper that reads nothing for a while: 80 KB of lines fill its
        // pipe (64 KiB). Closing it would make a real helper kill them all.
        let reaper = Reaper::start(Path::new("/bin/sh"), &["-c", "sleep 1; exec cat >/dev/null"]).unwrap();
        for group in 0..10_000 {
            reaper.watch(Pid::from_raw(100_000 + group));
        }
        let link = reaper.link.lock().unwrap();
        assert!(link.pipe.is_some(), "still open");
        assert!(!link.pending.is_empty() && link.pending.ends_with(b"+109999\n"));
    }
}
