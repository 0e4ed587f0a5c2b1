//! Pure cgroup v2 hosts: one hierarchy with every controller.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use super::{CgroupError, CgroupKindDef, Limits, SandboxCgroup, mkdir, write};

const CPU_PERIOD_US: u64 = 100_000;

/// Enable `controllers` for the children of `dir`, skipping those the
/// parent does not offer.
fn enable_controllers(dir: &Path, controllers: &[&str]) -> Result<(), CgroupError> {
    let available = fs::read_to_string(dir.join("cgroup.controllers")).unwrap_or_default();
    let enabled = fs::read_to_string(dir.join("cgroup.subtree_control")).unwrap_or_default();
    let missing: Vec<String> = controllers
        .iter()
        .filter(|c| available.split_whitespace().any(|a| a == **c))
        .filter(|c| !enabled.split_whitespace().any(|e| e == **c))
        .map(|c| format!("+{c}"))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    write(&dir.join("cgroup.subtree_control"), &missing.join(" "))
}

fn has_controller(dir: &Path, controller: &str) -> bool {
    fs::read_to_string(dir.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|a| a == controller))
}

pub(super) fn create(
    cg: &mut SandboxCgroup,
    mount: &Path,
    parent: &str,
    id: &str,
    limits: &Limits,
) -> Result<(), CgroupError> {
    let wanted = ["memory", "pids", "cpu"];
    let parent_dir = mount.join(parent);
    mkdir(&parent_dir)?;
    // Every level from the mount down to the parent must pass the
    // controllers on.
    let mut level = mount.to_path_buf();
    enable_controllers(&level, &wanted)?;
    for component in Path::new(parent).components() {
        level = level.join(component);
        enable_controllers(&level, &wanted)?;
    }
    let dir = parent_dir.join(id);
    mkdir(&dir)?;
    cg.dirs.push(dir.clone());

    for (limit, controller, what) in [
        (limits.memory.is_some(), "memory", "memory"),
        (limits.pids.is_some(), "pids", "pids"),
        (limits.cpus.is_some(), "cpu", "cpus"),
    ] {
        if limit && !has_controller(&dir, controller) {
            return Err(CgroupError::Unsupported { controller, what });
        }
    }
    if let Some(bytes) = limits.memory {
        write(&dir.join("memory.max"), &bytes.to_string())?;
        let swap = dir.join("memory.swap.max");
        if swap.exists() {
            write(&swap, "0")?;
        }
    }
    if let Some(max) = limits.pids {
        write(&dir.join("pids.max"), &max.to_string())?;
    }
    if let Some(cpus) = limits.cpus {
        let quota = ((cpus * CPU_PERIOD_US as f64).round() as u64).max(1000);
        write(&dir.join("cpu.max"), &format!("{quota} {CPU_PERIOD_US}"))?;
    }
    if dir.join("memory.events").exists() {
        cg.oom_events = Some(dir.join("memory.events"));
        cg.memory = Some((dir.clone(), true));
    }
    if dir.join("cgroup.freeze").exists() {
        cg.freeze = Some((dir.clone(), CgroupKindDef::V2));
    }
    if dir.join("cgroup.kill").exists() {
        cg.kill = Some((dir, CgroupKindDef::V2));
    }
    Ok(())
}

pub(super) fn set_frozen(dir: &Path, frozen: bool) -> Result<(), CgroupError> {
    write(&dir.join("cgroup.freeze"), if frozen { "1" } else { "0" })?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        let events = fs::read_to_string(dir.join("cgroup.events")).unwrap_or_default();
        if events.lines().any(|l| l.trim() == want) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Err(CgroupError::Busy {
        path: dir.to_path_buf(),
        waited: Duration::from_secs(5),
    })
}
