//! cgroup v1 (and hybrid) hosts: one hierarchy per controller, plus the v2
//! `unified` mount for kill and freeze when it has them.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{CgroupError, CgroupKindDef, Limits, SandboxCgroup, mkdir, write};

pub(super) struct Mounts<'a> {
    pub memory: &'a Option<PathBuf>,
    pub pids: &'a Option<PathBuf>,
    pub cpu: &'a Option<PathBuf>,
    pub freezer: &'a Option<PathBuf>,
    pub unified: &'a Option<PathBuf>,
}

const CFS_PERIOD_US: u64 = 100_000;

pub(super) fn create(
    cg: &mut SandboxCgroup,
    mounts: Mounts<'_>,
    parent: &str,
    id: &str,
    limits: &Limits,
    accounting: bool,
) -> Result<(), CgroupError> {
    if limits.memory.is_some() && mounts.memory.is_none() {
        return Err(CgroupError::Unsupported {
            controller: "memory",
            what: "memory",
        });
    }
    if limits.pids.is_some() && mounts.pids.is_none() {
        return Err(CgroupError::Unsupported {
            controller: "pids",
            what: "pids",
        });
    }
    if limits.cpus.is_some() && mounts.cpu.is_none() {
        return Err(CgroupError::Unsupported {
            controller: "cpu",
            what: "cpus",
        });
    }

    // Without accounting, only the hierarchies a limit needs.
    let wanted = |limit: bool| accounting || limit;
    if let Some(mount) = mounts
        .memory
        .as_ref()
        .filter(|_| wanted(limits.memory.is_some()))
    {
        let dir = mount.join(parent).join(id);
        mkdir(&dir)?;
        cg.dirs.push(dir.clone());
        if let Some(bytes) = limits.memory {
            write(&dir.join("memory.limit_in_bytes"), &bytes.to_string())?;
            let memsw = dir.join("memory.memsw.limit_in_bytes");
            if memsw.exists() {
                write(&memsw, &bytes.to_string())?;
            }
        }
        let oom = dir.join("memory.oom_control");
        if oom.exists() {
            cg.oom_events = Some(oom);
        }
        cg.memory = Some((dir, false));
    }
    if let Some(mount) = mounts
        .pids
        .as_ref()
        .filter(|_| wanted(limits.pids.is_some()))
    {
        let dir = mount.join(parent).join(id);
        mkdir(&dir)?;
        cg.dirs.push(dir.clone());
        if let Some(max) = limits.pids {
            write(&dir.join("pids.max"), &max.to_string())?;
        }
    }
    if let Some(mount) = mounts
        .cpu
        .as_ref()
        .filter(|_| wanted(limits.cpus.is_some()))
    {
        let dir = mount.join(parent).join(id);
        mkdir(&dir)?;
        cg.dirs.push(dir.clone());
        if let Some(cpus) = limits.cpus {
            let quota = ((cpus * CFS_PERIOD_US as f64).round() as u64).max(1000);
            write(&dir.join("cpu.cfs_period_us"), &CFS_PERIOD_US.to_string())?;
            write(&dir.join("cpu.cfs_quota_us"), &quota.to_string())?;
        }
    }
    // The unified hierarchy of a hybrid host has no controllers, but it
    // does have cgroup.kill and cgroup.freeze, which are exact and atomic.
    if let Some(mount) = mounts.unified {
        let dir = mount.join(parent).join(id);
        if mkdir(&dir).is_ok() {
            cg.dirs.push(dir.clone());
            if dir.join("cgroup.kill").exists() {
                cg.kill = Some((dir.clone(), CgroupKindDef::V2));
            }
            if dir.join("cgroup.freeze").exists() {
                cg.freeze = Some((dir, CgroupKindDef::V2));
            }
        }
    }
    // The v1 freezer only for what the unified hierarchy cannot do: one
    // hierarchy less to join and to remove for every sandbox.
    if let Some(mount) = mounts.freezer
        && (cg.kill.is_none() || cg.freeze.is_none())
    {
        let dir = mount.join(parent).join(id);
        mkdir(&dir)?;
        cg.dirs.push(dir.clone());
        cg.freeze
            .get_or_insert_with(|| (dir.clone(), CgroupKindDef::V1Freezer));
        cg.kill.get_or_insert((dir, CgroupKindDef::V1Freezer));
    }
    Ok(())
}

/// Freeze, SIGKILL every member, thaw: members cannot fork while frozen.
pub(super) fn freezer_kill(dir: &Path) {
    let _ = write(&dir.join("freezer.state"), "FROZEN");
    for _ in 0..5 {
        let Ok(text) = fs::read_to_string(dir.join("cgroup.procs")) else {
            break;
        };
        let pids: Vec<i32> = text.lines().filter_map(|l| l.trim().parse().ok()).collect();
        if pids.is_empty() {
            break;
        }
        for pid in pids {
            // SAFETY: kill(2) with a pid read from the cgroup.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    let _ = write(&dir.join("freezer.state"), "THAWED");
}

pub(super) fn set_frozen(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    let want = if frozen { "FROZEN" } else { "THAWED" };
    write(&dir.join("freezer.state"), want)?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let state = fs::read_to_string(dir.join("freezer.state")).unwrap_or_default();
        if state.trim() == want {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(CgroupError::Busy {
        path: dir.to_path_buf(),
        waited: Duration::from_secs(5),
    })
}
