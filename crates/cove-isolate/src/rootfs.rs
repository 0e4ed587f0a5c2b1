//! The sandbox's root filesystem, built inside its own mount namespace.
//!
//! ```text
//!  <state>                    tmpfs, size = the sandbox's disk limit (over
//!                             the state directory, seen only in here)
//!    ├── upper/ work/         the writable overlay layer
//!    ├── files/               generated /etc/hosts, /etc/hostname
//!    └── root/                overlay(lower = template layers, upper)
//!          ├── <binds>        read-only host directories (the host template)
//!          ├── proc           a new procfs, with Docker's masked paths
//!          ├── dev            tmpfs: null zero full random urandom tty, pts, shm
//!          └── sys            sysfs, read-only
//! ```
//!
//! Every mount lives only in the sandbox's mount namespace, so the kernel
//! takes them all down when the sandbox's last process exits: a crashed
//! sandbox cannot leak a mount on the host.

use std::fs;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::{Mode, SFlag, makedev, mknod};
use serde::{Deserialize, Serialize};

use crate::SetupError;

/// A host path made visible inside the sandbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bind {
    pub source: PathBuf,
    /// Absolute path inside the sandbox.
    pub target: String,
    pub writable: bool,
}

/// Everything needed to build a sandbox's root filesystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootfsSpec {
    /// Read-only overlay layers, topmost first.
    pub layers: Vec<PathBuf>,
    /// Host paths bound in after the overlay is mounted.
    pub binds: Vec<Bind>,
    /// Sandbox paths hidden behind an empty file or directory.
    pub masks: Vec<String>,
    /// Size cap of the writable layer, in bytes.
    pub disk_bytes: u64,
    /// Files generated for this sandbox: (path inside the sandbox, contents).
    pub files: Vec<(String, Vec<u8>)>,
    /// Host files and directories the agent holds a shared `flock` on for
    /// as long as it runs (its template's metadata and layers), so that
    /// they are not removed from under it.
    #[serde(default)]
    pub locks: Vec<PathBuf>,
}

/// Paths under /proc that are hidden (as Docker does).
const PROC_MASKS: &[&str] = &[
    "/proc/acpi",
    "/proc/asound",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// Paths under /proc that are visible but read-only.
const PROC_READONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Character devices in /dev: (name, major, minor).
const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

fn err(what: &str, path: &Path) -> impl FnOnce(nix::Error) -> SetupError {
    let context = format!("{what} {}", path.display());
    move |e| SetupError::Mount(format!("{context}: {e}"))
}

fn io(what: &str, path: &Path) -> impl FnOnce(std::io::Error) -> SetupError {
    let context = format!("{what} {}", path.display());
    move |e| SetupError::Mount(format!("{context}: {e}"))
}

/// Resolve a sandbox path under `root`, refusing `..` components.
fn inside(root: &Path, path: &str) -> Result<PathBuf, SetupError> {
    let rel = path.trim_start_matches('/');
    if Path::new(rel)
        .components()
        .any(|c| !matches!(c, std::path::Component::Normal(_)))
    {
        return Err(SetupError::Config(format!(
            "path {path:?} must be absolute and plain"
        )));
    }
    Ok(root.join(rel))
}

fn mkdir_p(path: &Path, mode: u32) -> Result<(), SetupError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(path)
        .map_err(io("create", path))
}

/// Overlay options must not contain the separators they use.
fn overlay_path(path: &Path) -> Result<String, SetupError> {
    let s = path.to_string_lossy();
    if s.contains([',', ':', '\\']) {
        return Err(SetupError::Config(format!(
            "layer path {s:?} contains ',' ':' or '\\'"
        )));
    }
    Ok(s.into_owned())
}

/// The descriptor number at which the agent keeps its writable layer's
/// directory open (`O_PATH`, close-on-exec: the agent's children do not
/// get it). The layer lives on a tmpfs that is mounted only in the
/// sandbox's mount namespace and detached from its root, so this is the
/// host's one way to it: `/proc/<agent pid>/fd/<UPPER_FD>` (see
/// [`upper_dir`]), which snapshots read.
pub const UPPER_FD: RawFd = 1021;

/// The host path of a running sandbox's writable overlay layer.
pub fn upper_dir(agent_pid: i32) -> PathBuf {
    PathBuf::from(format!("/proc/{agent_pid}/fd/{UPPER_FD}"))
}

/// Build the root under `scratch` and pivot into it. Runs in the sandbox's
/// first process, in its new mount namespace, before any capability is
/// dropped. Leaves the writable layer's directory open at [`UPPER_FD`].
pub fn enter(spec: &RootfsSpec, scratch: &Path) -> Result<(), SetupError> {
    let none: Option<&str> = None;
    // Nothing we mount may propagate back to the host.
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(err("make private", Path::new("/")))?;

    let data = format!("size={},mode=0755", spec.disk_bytes.max(1 << 20));
    mount(
        Some("tmpfs"),
        scratch,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(data.as_str()),
    )
    .map_err(err("mount tmpfs on", scratch))?;
    let (upper, work, root, files) = (
        scratch.join("upper"),
        scratch.join("work"),
        scratch.join("root"),
        scratch.join("files"),
    );
    for dir in [&upper, &work, &root, &files] {
        mkdir_p(dir, 0o755)?;
    }

    if spec.layers.is_empty() {
        return Err(SetupError::Config("the template has no layers".into()));
    }
    let lower = spec
        .layers
        .iter()
        .map(|l| overlay_path(l))
        .collect::<Result<Vec<_>, _>>()?
        .join(":");
    let options = format!(
        "lowerdir={lower},upperdir={},workdir={}",
        overlay_path(&upper)?,
        overlay_path(&work)?
    );
    mount(
        Some("overlay"),
        &root,
        Some("overlay"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
        Some(options.as_str()),
    )
    .map_err(err("mount the overlay on", &root))?;
    keep_upper_open(&upper)?;

    for bind in &spec.binds {
        let target = inside(&root, &bind.target)?;
        let is_dir = fs::metadata(&bind.source)
            .map_err(io("bind", &bind.source))?
            .is_dir();
        if is_dir {
            mkdir_p(&target, 0o755)?;
        } else if !target.exists() {
            if let Some(parent) = target.parent() {
                mkdir_p(parent, 0o755)?;
            }
            fs::write(&target, b"").map_err(io("create", &target))?;
        }
        mount(Some(&bind.source), &target, none, MsFlags::MS_BIND, none)
            .map_err(err("bind", &bind.source))?;
        let mut flags =
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
        if !bind.writable {
            flags |= MsFlags::MS_RDONLY;
        }
        mount(none, &target, none, flags, none).map_err(err("remount", &target))?;
    }

    mount_proc(&root)?;
    mount_dev(&root)?;
    let sys = root.join("sys");
    mkdir_p(&sys, 0o555)?;
    let ro = MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("sysfs"), &sys, Some("sysfs"), ro, none).map_err(err("mount sysfs on", &sys))?;

    for (path, contents) in &spec.files {
        let target = inside(&root, path)?;
        let name = path.trim_start_matches('/').replace('/', "_");
        let source = files.join(name);
        fs::write(&source, contents).map_err(io("write", &source))?;
        fs::set_permissions(&source, fs::Permissions::from_mode(0o644))
            .map_err(io("chmod", &source))?;
        if !target.exists() {
            // Only where the template leaves room for it (a writable /etc).
            if fs::write(&target, b"").is_err() {
                continue;
            }
        }
        mount(Some(&source), &target, none, MsFlags::MS_BIND, none)
            .map_err(err("bind", &target))?;
    }

    for path in PROC_MASKS
        .iter()
        .copied()
        .chain(spec.masks.iter().map(String::as_str))
    {
        mask(&root, path)?;
    }
    for path in PROC_READONLY {
        let target = inside(&root, path)?;
        if target.exists() {
            mount(
                Some(&target),
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                none,
            )
            .map_err(err("bind", &target))?;
            mount(
                none,
                &target,
                none,
                MsFlags::MS_BIND | MsFlags::MS_REMOUNT | ro,
                none,
            )
            .map_err(err("remount read-only", &target))?;
        }
    }

    pivot(&root)
}

/// Take a shared `flock` on each of `paths`; the descriptors stay open
/// (close-on-exec) in the agent, which holds them until it exits.
pub fn hold_locks(paths: &[PathBuf], keep: &mut Vec<RawFd>) -> Result<(), SetupError> {
    for path in paths {
        let fd = nix::fcntl::open(
            path.as_path(),
            nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(err("open", path))?;
        // SAFETY: flock on a descriptor this process owns.
        if unsafe { libc::flock(fd.as_raw_fd(), libc::LOCK_SH) } < 0 {
            return Err(SetupError::Other(format!(
                "lock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            )));
        }
        keep.push(std::os::fd::IntoRawFd::into_raw_fd(fd));
    }
    Ok(())
}

fn keep_upper_open(upper: &Path) -> Result<(), SetupError> {
    let fd = nix::fcntl::open(
        upper,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(err("open", upper))?;
    // SAFETY: dup3 onto a fixed number this process does not otherwise
    // use; the original descriptor is closed right after.
    let placed = unsafe { libc::dup3(fd.as_raw_fd(), UPPER_FD, libc::O_CLOEXEC) };
    if placed < 0 {
        return Err(SetupError::Other(format!(
            "keep {} open: {}",
            upper.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(())
}

fn mount_proc(root: &Path) -> Result<(), SetupError> {
    let proc = root.join("proc");
    mkdir_p(&proc, 0o555)?;
    let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), &proc, Some("proc"), flags, None::<&str>)
        .map_err(err("mount proc on", &proc))
}

fn mount_dev(root: &Path) -> Result<(), SetupError> {
    let none: Option<&str> = None;
    let dev = root.join("dev");
    mkdir_p(&dev, 0o755)?;
    mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("size=64k,mode=0755"),
    )
    .map_err(err("mount tmpfs on", &dev))?;
    for (name, major, minor) in DEVICES {
        let path = dev.join(name);
        mknod(
            &path,
            SFlag::S_IFCHR,
            Mode::from_bits_truncate(0o666),
            makedev(*major, *minor),
        )
        .map_err(err("mknod", &path))?;
        // mknod honours the umask; the nodes must be usable by everyone.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o666))
            .map_err(io("chmod", &path))?;
    }
    let pts = dev.join("pts");
    mkdir_p(&pts, 0o755)?;
    mount(
        Some("devpts"),
        &pts,
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    )
    .map_err(err("mount devpts on", &pts))?;
    let shm = dev.join("shm");
    mkdir_p(&shm, 0o1777)?;
    mount(
        Some("shm"),
        &shm,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=1777,size=64m"),
    )
    .map_err(err("mount tmpfs on", &shm))?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let path = dev.join(link);
        symlink(target, &path).map_err(io("symlink", &path))?;
    }
    let _ = none;
    Ok(())
}

/// Hide `path`: a directory behind an empty read-only tmpfs, a file behind /dev/null.
fn mask(root: &Path, path: &str) -> Result<(), SetupError> {
    let none: Option<&str> = None;
    let target = inside(root, path)?;
    let Ok(meta) = fs::symlink_metadata(&target) else {
        return Ok(());
    };
    if meta.is_dir() {
        mount(
            Some("tmpfs"),
            &target,
            Some("tmpfs"),
            MsFlags::MS_RDONLY,
            Some("size=0"),
        )
        .map_err(err("mask", &target))
    } else if meta.file_type().is_symlink() {
        Ok(())
    } else {
        mount(
            Some(&root.join("dev/null")),
            &target,
            none,
            MsFlags::MS_BIND,
            none,
        )
        .map_err(err("mask", &target))
    }
}

/// Make `root` the root of the mount namespace and drop the old root.
fn pivot(root: &Path) -> Result<(), SetupError> {
    nix::unistd::chdir(root).map_err(err("chdir", root))?;
    nix::unistd::pivot_root(".", ".").map_err(err("pivot_root into", root))?;
    // The old root is now stacked under "."; detach it.
    umount2(".", MntFlags::MNT_DETACH).map_err(err("detach the old root at", root))?;
    nix::unistd::chdir("/").map_err(err("chdir", Path::new("/")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inside_refuses_escapes() {
        let root = Path::new("/r");
        assert_eq!(
            inside(root, "/etc/hosts").unwrap(),
            PathBuf::from("/r/etc/hosts")
        );
        assert!(inside(root, "/etc/../../x").is_err());
        assert!(inside(root, "./x").is_err());
    }

    #[test]
    fn overlay_paths_refuse_separators() {
        assert!(overlay_path(Path::new("/a/b")).is_ok());
        assert!(overlay_path(Path::new("/a,b")).is_err());
        assert!(overlay_path(Path::new("/a:b")).is_err());
    }
}
