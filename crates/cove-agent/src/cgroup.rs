//! Per-process cgroups inside the sandbox's cgroup.
//!
//! Every process the agent starts gets its own child cgroup, so "kill the
//! whole tree" is exact: even a grandchild that left the process group with
//! `setsid` is still in the cgroup. The agent reaches the sandbox's cgroup
//! through a directory fd opened before the sandbox's root was pivoted; the
//! sandbox's own processes have no path to it.
//!
//! Creating and removing a cgroup is the dearest step of starting a short
//! process (a `mkdir` and an `rmdir` in the cgroup filesystem, ~0.1 ms
//! here), so the cgroups of processes that ended with nothing left in them
//! are kept, a few at a time, for the next processes ([`SpareCgroups`]).
//!
//! Two kinds: cgroup v2 (`cgroup.kill`, available even on hybrid hosts in
//! the `unified` hierarchy) and the v1 freezer (freeze, kill every member,
//! thaw).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat};
use nix::sys::signal::{Signal, kill};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{Pid, UnlinkatFlags, unlinkat};

/// How the sandbox's cgroup directory can kill its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupKind {
    /// cgroup v2: write `1` to `cgroup.kill`.
    V2,
    /// cgroup v1 freezer: freeze, SIGKILL each member, thaw.
    V1Freezer,
}

/// The sandbox's cgroup, as the agent sees it.
#[derive(Debug)]
pub struct ProcessCgroups {
    pub dir: OwnedFd,
    pub kind: CgroupKind,
}

/// One process's cgroup.
#[derive(Debug)]
pub struct ProcCgroup {
    pub name: String,
    /// Open `cgroup.procs` (read and write), written by the child before it
    /// execs. Closed once the child is running, to spare the agent's
    /// descriptors; opened again when the cgroup is kept for reuse.
    pub procs: Option<OwnedFd>,
}

/// Most empty per-process cgroups kept for reuse.
pub const SPARE_CGROUPS: usize = 8;

/// Empty per-process cgroups, each with its `cgroup.procs` open, ready for
/// the next processes.
#[derive(Debug, Default)]
pub struct SpareCgroups(Vec<ProcCgroup>);

fn write_at(dir: &impl AsFd, path: &str, data: &[u8]) -> Result<(), Errno> {
    let fd = openat(dir, path, OFlag::O_WRONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    nix::unistd::write(&fd, data).map(|_| ())
}

fn read_at(dir: &impl AsFd, path: &str) -> Result<String, Errno> {
    let fd = openat(dir, path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())?;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match nix::unistd::read(&fd, &mut buf)? {
            0 => break,
            n => out.extend_from_slice(&buf[..n]),
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

impl ProcessCgroups {
    /// A cgroup for the `n`th process: a spare one if there is one, else a
    /// new one.
    pub fn take(&self, spare: &mut SpareCgroups, n: u64) -> Result<ProcCgroup, Errno> {
        match spare.0.pop() {
            Some(cgroup) => Ok(cgroup),
            None => self.create(n),
        }
    }

    /// Keep the cgroup of a process that has ended for reuse if nothing is
    /// left in it and there is room; otherwise remove it. Returns the name
    /// of a cgroup that could not be removed because something still runs
    /// in it (for a later sweep).
    pub fn release(&self, spare: &mut SpareCgroups, name: String) -> Option<String> {
        if spare.0.len() < SPARE_CGROUPS
            && let Ok(procs) = self.open_procs(&name)
            && is_empty(&procs)
        {
            spare.0.push(ProcCgroup {
                name,
                procs: Some(procs),
            });
            return None;
        }
        self.remove(&name).is_err().then_some(name)
    }

    fn open_procs(&self, name: &str) -> Result<OwnedFd, Errno> {
        openat(
            &self.dir,
            format!("{name}/cgroup.procs").as_str(),
            OFlag::O_RDWR | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
    }

    /// Create the cgroup for the `n`th process.
    pub fn create(&self, n: u64) -> Result<ProcCgroup, Errno> {
        let name = format!("proc-{n}");
        match mkdirat(&self.dir, name.as_str(), Mode::from_bits_truncate(0o755)) {
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
        match self.open_procs(&name) {
            Ok(fd) => Ok(ProcCgroup {
                name,
                procs: Some(fd),
            }),
            Err(e) => {
                let _ = self.remove(&name);
                Err(e)
            }
        }
    }

    /// Kill every process in the cgroup `name`.
    pub fn kill(&self, name: &str) {
        match self.kind {
            CgroupKind::V2 => {
                if let Err(err) = write_at(&self.dir, &format!("{name}/cgroup.kill"), b"1") {
                    tracing::warn!(%err, name, "cgroup.kill failed");
                }
            }
            CgroupKind::V1Freezer => {
                let state = format!("{name}/freezer.state");
                let _ = write_at(&self.dir, &state, b"FROZEN");
                // Members cannot fork while frozen, so one pass reaches all.
                for _ in 0..3 {
                    let Ok(members) = read_at(&self.dir, &format!("{name}/cgroup.procs")) else {
                        break;
                    };
                    let pids: Vec<i32> = members.lines().filter_map(|l| l.parse().ok()).collect();
                    if pids.is_empty() {
                        break;
                    }
                    for pid in pids {
                        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                }
                let _ = write_at(&self.dir, &state, b"THAWED");
            }
        }
    }

    /// Remove the cgroup `name`; `EBUSY` while it still has members. One
    /// that is already gone counts as removed.
    pub fn remove(&self, name: &str) -> Result<(), Errno> {
        match unlinkat(&self.dir, name, UnlinkatFlags::RemoveDir) {
            Err(Errno::ENOENT) => Ok(()),
            other => other,
        }
    }

    /// Whether the cgroup `name` still has members.
    pub fn populated(&self, name: &str) -> bool {
        read_at(&self.dir, &format!("{name}/cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
    }

    /// The raw fd, for diagnostics.
    pub fn raw_fd(&self) -> i32 {
        self.dir.as_raw_fd()
    }
}

/// Whether the cgroup whose `cgroup.procs` is open as `procs` has no member.
fn is_empty(procs: &OwnedFd) -> bool {
    let mut buf = [0u8; 16];
    matches!(nix::sys::uio::pread(procs, &mut buf, 0), Ok(0))
}

/// Read the `oom_kill` counter from a memory cgroup's `memory.events` (v2) or
/// `memory.oom_control` (v1), both of which carry an `oom_kill N` line.
pub fn read_oom_kills(fd: &OwnedFd) -> Option<u64> {
    let mut buf = [0u8; 1024];
    let n = nix::sys::uio::pread(fd, &mut buf, 0).ok()?;
    let text = std::str::from_utf8(&buf[..n]).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
}
