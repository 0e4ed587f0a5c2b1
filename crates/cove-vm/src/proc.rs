//! The VM's host processes: started in their own session with no parent-
//! death signal, so they outlive the daemon, and identified by PID plus
//! start time, so a reused PID is never mistaken for them after a restart.

use std::path::Path;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process as recorded for reattaching.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessId {
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat` (clock ticks after boot).
    pub start_time: u64,
}

impl ProcessId {
    pub fn of(pid: i32) -> Option<ProcessId> {
        let (start_time, _) = stat(pid)?;
        Some(ProcessId { pid, start_time })
    }

    /// Running (not a zombie) and still the same process.
    pub fn is_alive(&self) -> bool {
        matches!(stat(self.pid), Some((start, state)) if start == self.start_time && state != 'Z' && state != 'X')
    }

    /// Stopped by a signal (`T` in `/proc/<pid>/stat`): every thread of
    /// the process has reached the group stop.
    pub fn is_stopped(&self) -> bool {
        matches!(stat(self.pid), Some((start, 'T')) if start == self.start_time)
    }

    pub fn signal(&self, signal: i32) {
        if self.is_alive() {
            // SAFETY: kill takes no pointers; the PID was checked to still
            // be ours just above (a race with PID reuse needs the process
            // to exit and a new one to get the same PID in between).
            unsafe {
                libc::kill(self.pid, signal);
            }
        }
    }

    /// SIGTERM, then SIGKILL if it has not gone after `grace`.
    pub fn stop(&self, grace: Duration) {
        self.signal(libc::SIGTERM);
        if !self.wait_gone(grace) {
            self.signal(libc::SIGKILL);
            self.wait_gone(Duration::from_secs(5));
        }
    }

    /// If this process is a child of ours that has exited, collect it, so
    /// it does not linger as a zombie while the daemon runs. Only this PID:
    /// waiting for any child would steal exit statuses from other code in
    /// the daemon (and from `Command::status`).
    pub fn reap(&self) {
        let mut status = 0;
        // SAFETY: waitpid writes the status into our local; for a PID that
        // is not our child it fails with ECHILD and changes nothing.
        unsafe {
            libc::waitpid(self.pid, &mut status, libc::WNOHANG);
        }
    }

    pub fn wait_gone(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.is_alive() {
            if Instant::now() > deadline {
                return false;
            }
            self.reap();
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }
}

/// Start time and state of a process, from `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(u64, char)> {
    let text =
        std::fs::read_to_string(Path::new("/proc").join(pid.to_string()).join("stat")).ok()?;
    // The command name may hold spaces and parentheses: fields start after
    // the last ')'.
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // `state` was field 3; start time is field 22.
    let start = fields.nth(18)?.parse().ok()?;
    Some((start, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knows_itself_and_not_a_stranger() {
        let me = ProcessId::of(std::process::id() as i32);
        assert!(me.is_some_and(|p| p.is_alive()));
        let impostor = me.map(|p| ProcessId {
            start_time: p.start_time + 1,
            ..p
        });
        assert!(impostor.is_some_and(|p| !p.is_alive()));
    }
}
