//! Resource limits, freezing and whole-sandbox kills through cgroups.
//!
//! The host's layout is read once from `/proc/self/mountinfo`:
//!
//! * **pure v2** (most current distributions): one hierarchy; memory, pids
//!   and cpu limits, `cgroup.freeze` and `cgroup.kill` all live in
//!   `<mount>/cove/<id>`.
//! * **hybrid / v1**: limits go to the v1 `memory`, `pids` and `cpu`
//!   hierarchies; freezing and killing use the v2 `unified` mount when it
//!   offers `cgroup.kill` (hybrid hosts do, even with no controllers), the
//!   v1 `freezer` otherwise.
//!
//! A limit the host has no controller for is an error, not a silent no-op.

mod v1;
mod v2;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use cove_agent::CgroupKind;

/// Resource limits of one sandbox. `None` leaves a resource unlimited.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Limits {
    /// Memory in bytes (swap is not allowed on top).
    pub memory: Option<u64>,
    /// CPU bandwidth in CPUs (1.5 = one and a half cores' worth of time).
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    pub pids: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(
        "this host has no {controller} cgroup controller, so a {what} limit cannot be enforced"
    )]
    Unsupported {
        controller: &'static str,
        what: &'static str,
    },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cgroup {path} still has processes after {waited:?}")]
    Busy { path: PathBuf, waited: Duration },
}

fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |source| CgroupError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

pub(crate) fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, value).map_err(io_err("write", path))
}

/// Where each cgroup function lives on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    V2 {
        mount: PathBuf,
    },
    V1 {
        memory: Option<PathBuf>,
        pids: Option<PathBuf>,
        cpu: Option<PathBuf>,
        freezer: Option<PathBuf>,
        unified: Option<PathBuf>,
    },
    None,
}

impl Layout {
    /// Read the layout of the calling process's mount namespace.
    pub fn detect() -> Layout {
        match fs::read_to_string("/proc/self/mountinfo") {
            Ok(text) => Layout::parse(&text),
            Err(_) => Layout::None,
        }
    }

    /// Parse `/proc/self/mountinfo`.
    pub fn parse(mountinfo: &str) -> Layout {
        let mut v2: Option<PathBuf> = None;
        let (mut memory, mut pids, mut cpu, mut freezer) = (None, None, None, None);
        for line in mountinfo.lines() {
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let Some(mount_point) = left.split(' ').nth(4) else {
                continue;
            };
            let mut right = right.split(' ');
            let fstype = right.next().unwrap_or("");
            let options = right.nth(1).unwrap_or("");
            let path = PathBuf::from(mount_point);
            match fstype {
                "cgroup2" => v2 = Some(path),
                "cgroup" => {
                    for opt in options.split(',') {
                        match opt {
                            "memory" => memory = Some(path.clone()),
                            "pids" => pids = Some(path.clone()),
                            "cpu" => cpu = Some(path.clone()),
                            "freezer" => freezer = Some(path.clone()),
                            _ => {}
                        }
                    }
                }
                _ => {}
            }
        }
        let v2_has_controllers = v2.as_ref().is_some_and(|m| {
            fs::read_to_string(m.join("cgroup.controllers"))
                .is_ok_and(|c| c.split_whitespace().any(|c| c == "memory" || c == "pids"))
        });
        let any_v1 = memory.is_some() || pids.is_some() || cpu.is_some() || freezer.is_some();
        match v2 {
            Some(mount) if v2_has_controllers || !any_v1 => Layout::V2 { mount },
            unified if any_v1 => Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
                unified,
            },
            _ => Layout::None,
        }
    }

    /// A short description for diagnostics ("v2", "v1+unified", ...).
    pub fn describe(&self) -> &'static str {
        match self {
            Layout::V2 { .. } => "v2",
            Layout::V1 {
                unified: Some(_), ..
            } => "v1 (hybrid, v2 for kill/freeze)",
            Layout::V1 { .. } => "v1",
            Layout::None => "none",
        }
    }
}

/// The cgroups of one sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxCgroup {
    /// Every directory created for the sandbox, in creation order. The
    /// sandbox's first process joins all of them.
    pub dirs: Vec<PathBuf>,
    /// Where per-process cgroups are created and how they are killed.
    pub kill: Option<(PathBuf, CgroupKindDef)>,
    /// The file that counts OOM kills.
    pub oom_events: Option<PathBuf>,
    /// Where the sandbox is frozen for pause.
    pub freeze: Option<(PathBuf, CgroupKindDef)>,
    /// The memory cgroup, for usage statistics.
    pub memory: Option<(PathBuf, bool)>,
}

/// Serializable mirror of [`CgroupKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CgroupKindDef {
    V2,
    V1Freezer,
}

impl From<CgroupKindDef> for CgroupKind {
    fn from(kind: CgroupKindDef) -> CgroupKind {
        match kind {
            CgroupKindDef::V2 => CgroupKind::V2,
            CgroupKindDef::V1Freezer => CgroupKind::V1Freezer,
        }
    }
}

impl SandboxCgroup {
    /// Create the cgroups of sandbox `id` under `parent` and apply `limits`.
    /// On error nothing is left behind.
    pub fn create(
        layout: &Layout,
        parent: &str,
        id: &str,
        limits: &Limits,
        accounting: bool,
    ) -> Result<SandboxCgroup, CgroupError> {
        let mut cg = SandboxCgroup {
            dirs: Vec::new(),
            kill: None,
            oom_events: None,
            freeze: None,
            memory: None,
        };
        let result = match layout {
            Layout::V2 { mount } => v2::create(&mut cg, mount, parent, id, limits),
            Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
                unified,
            } => v1::create(
                &mut cg,
                v1::Mounts {
                    memory,
                    pids,
                    cpu,
                    freezer,
                    unified,
                },
                parent,
                id,
                limits,
                accounting,
            ),
            Layout::None => {
                if limits.memory.is_some() {
                    Err(CgroupError::Unsupported {
                        controller: "memory",
                        what: "memory",
                    })
                } else if limits.pids.is_some() {
                    Err(CgroupError::Unsupported {
                        controller: "pids",
                        what: "pids",
                    })
                } else if limits.cpus.is_some() {
                    Err(CgroupError::Unsupported {
                        controller: "cpu",
                        what: "cpus",
                    })
                } else {
                    Ok(())
                }
            }
        };
        match result {
            Ok(()) => Ok(cg),
            Err(err) => {
                let _ = cg.remove(Duration::from_millis(100));
                Err(err)
            }
        }
    }

    /// Move the calling process into every cgroup of the sandbox.
    pub fn join(&self, already_in: Option<&Path>) -> Result<(), CgroupError> {
        for dir in &self.dirs {
            if Some(dir.as_path()) == already_in {
                continue;
            }
            // A v1 hierarchy: move this thread through `tasks`. The process
            // is single-threaded, so that moves all of it, and for the
            // caller's own thread the kernel skips the global threadgroup
            // lock that `cgroup.procs` takes (an RCU grace period: several
            // milliseconds per sandbox).
            let tasks = dir.join("tasks");
            if tasks.exists() {
                write(&tasks, "0")?;
            } else {
                write(&dir.join("cgroup.procs"), "0")?;
            }
        }
        Ok(())
    }

    /// The sandbox's cgroup v2 directory, if it has one: its first process
    /// can be born there (`CLONE_INTO_CGROUP`).
    pub fn v2_dir(&self) -> Option<&Path> {
        self.dirs
            .iter()
            .map(PathBuf::as_path)
            .find(|dir| !dir.join("tasks").exists())
    }

    /// Kill every process of the sandbox.
    pub fn kill_all(&self) {
        if let Some((dir, kind)) = &self.kill {
            match kind {
                CgroupKindDef::V2 => {
                    let _ = write(&dir.join("cgroup.kill"), "1");
                }
                CgroupKindDef::V1Freezer => v1::freezer_kill(dir),
            }
        }
    }

    /// Freeze (`true`) or thaw (`false`) every process of the sandbox, and
    /// wait until the kernel reports the new state.
    pub fn set_frozen(&self, frozen: bool) -> Result<(), CgroupError> {
        let Some((dir, kind)) = &self.freeze else {
            return Err(CgroupError::Unsupported {
                controller: "freezer",
                what: "pause",
            });
        };
        match kind {
            CgroupKindDef::V2 => v2::set_frozen(dir, frozen),
            CgroupKindDef::V1Freezer => v1::set_frozen(dir, frozen),
        }
    }

    /// Memory in use by the sandbox, in bytes.
    pub fn memory_usage(&self) -> Option<u64> {
        let (dir, is_v2) = self.memory.as_ref()?;
        let file = if *is_v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
    }

    /// Remove every cgroup of the sandbox, deepest first. Waits up to
    /// `patience` for exiting processes to leave.
    pub fn remove(&self, patience: Duration) -> Result<(), CgroupError> {
        let deadline = Instant::now() + patience;
        let mut last_err = None;
        for dir in self.dirs.iter().rev() {
            if let Err(err) = remove_tree(dir, deadline) {
                last_err = Some(err);
            }
        }
        last_err.map_or(Ok(()), Err)
    }
}

/// rmdir `dir` and its child cgroups, retrying while they are busy.
fn remove_tree(dir: &Path, deadline: Instant) -> Result<(), CgroupError> {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&entry.path(), deadline)?;
            }
        }
    }
    let mut delay = Duration::from_micros(200);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(20));
            }
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                return Err(CgroupError::Busy {
                    path: dir.to_path_buf(),
                    waited: Duration::ZERO,
                });
            }
            Err(source) => {
                return Err(CgroupError::Io {
                    action: "remove",
                    path: dir.to_path_buf(),
                    source,
                });
            }
        }
    }
}

/// Create `path` (and a missing parent), tolerating an existing directory.
pub(crate) fn mkdir(path: &Path) -> Result<(), CgroupError> {
    match fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                mkdir(parent)?;
            }
            fs::create_dir(path)
                .or_else(|e| {
                    if e.kind() == std::io::ErrorKind::AlreadyExists {
                        Ok(())
                    } else {
                        Err(e)
                    }
                })
                .map_err(io_err("create", path))
        }
        Err(e) => Err(CgroupError::Io {
            action: "create",
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

/// Validate a parent name: one or more plain path components.
pub fn valid_parent(parent: &str) -> bool {
    !parent.is_empty()
        && parent
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != ".." && !c.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
34 31 0:31 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
35 31 0:32 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
36 31 0:33 / /sys/fs/cgroup/freezer rw,relatime - cgroup cgroup rw,freezer
40 31 0:37 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn parses_a_hybrid_host() {
        match Layout::parse(HYBRID) {
            Layout::V1 {
                memory,
                pids,
                cpu,
                freezer,
                unified,
            } => {
                assert_eq!(memory.as_deref(), Some(Path::new("/sys/fs/cgroup/memory")));
                assert_eq!(pids.as_deref(), Some(Path::new("/sys/fs/cgroup/pids")));
                assert_eq!(cpu.as_deref(), Some(Path::new("/sys/fs/cgroup/cpu")));
                assert_eq!(
                    freezer.as_deref(),
                    Some(Path::new("/sys/fs/cgroup/freezer"))
                );
                assert_eq!(
                    unified.as_deref(),
                    Some(Path::new("/sys/fs/cgroup/unified"))
                );
            }
            other => panic!("expected v1, got {other:?}"),
        }
    }

    #[test]
    fn parses_a_pure_v2_host() {
        let text = "30 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(
            Layout::parse(text),
            Layout::V2 {
                mount: PathBuf::from("/sys/fs/cgroup")
            }
        );
    }

    #[test]
    fn no_cgroups_at_all() {
        assert_eq!(
            Layout::parse("22 1 0:5 / /proc rw - proc proc rw\n"),
            Layout::None
        );
    }

    #[test]
    fn parent_names() {
        assert!(valid_parent("cove"));
        assert!(valid_parent("system.slice/cove"));
        assert!(!valid_parent("../etc"));
        assert!(!valid_parent(""));
        assert!(!valid_parent("a//b"));
    }
}
