//! Path resolution that cannot leave the sandbox.
//!
//! The agent already runs inside the sandbox's root, but it holds host
//! descriptors (cgroup directories, the OOM events file) that anyone could
//! reach as `/proc/self/fd/N` magic links. So no path from a request is
//! ever handed to a plain `open`:
//!
//! - every lookup is `openat2(root_fd, path, RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS)`: `..` and absolute symlinks stay inside the
//!   root, magic links are refused;
//! - names are created, renamed and removed with `*at` calls relative to a
//!   directory descriptor obtained that way, on a single final component,
//!   so a symlink swapped in after the lookup cannot redirect the call;
//! - walks below a directory open each child with `O_NOFOLLOW` relative to
//!   its parent's descriptor.

use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use cove_protocol::fs::{FileKind, FsEntry, FsError, FsErrorKind};
use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{FileStat, Mode, SFlag};

/// Longest path accepted, as the kernel's `PATH_MAX` (with its NUL).
pub(crate) const PATH_MAX: usize = libc::PATH_MAX as usize - 1;

/// The sandbox's root directory and its default working directory.
#[derive(Debug)]
pub(crate) struct Root {
    fd: OwnedFd,
    cwd: String,
    /// The root as the agent's `/proc/self/fd` links name it (empty for
    /// `/`), to read the sandbox's own paths back from them.
    prefix: String,
}

/// An error for `errno` from an operation on `path`.
pub(crate) fn errno_error(errno: Errno, path: &str) -> FsError {
    let (kind, message) = match errno {
        Errno::ENOENT => (
            FsErrorKind::NotFound,
            format!("{path}: no such file or directory"),
        ),
        Errno::EISDIR => (FsErrorKind::IsADirectory, format!("{path} is a directory")),
        Errno::ENOTDIR => (
            FsErrorKind::NotADirectory,
            format!("{path}: not a directory (or a parent of it is not)"),
        ),
        Errno::EEXIST => (FsErrorKind::Exists, format!("{path} already exists")),
        Errno::ENOTEMPTY => (
            FsErrorKind::NotEmpty,
            format!("{path} is a directory that is not empty"),
        ),
        Errno::EACCES | Errno::EPERM => (
            FsErrorKind::PermissionDenied,
            format!("{path}: permission denied"),
        ),
        Errno::EROFS => (
            FsErrorKind::PermissionDenied,
            format!("{path} is on a read-only file system"),
        ),
        Errno::EXDEV => (
            FsErrorKind::Escape,
            format!("{path} leads outside the sandbox (or across file systems)"),
        ),
        Errno::ELOOP => (
            FsErrorKind::Escape,
            format!(
                "{path} goes through a /proc magic link or a symlink loop, which the agent never follows"
            ),
        ),
        Errno::ENAMETOOLONG => (FsErrorKind::Invalid, format!("{path}: name too long")),
        Errno::ENOSPC | Errno::EDQUOT => (
            FsErrorKind::NoSpace,
            format!("{path}: no space left on the sandbox's disk"),
        ),
        Errno::EBUSY => (
            FsErrorKind::PermissionDenied,
            format!("{path} is in use (a mount point?)"),
        ),
        Errno::EINVAL => (FsErrorKind::Invalid, format!("{path}: invalid argument")),
        Errno::ENOSYS => (
            FsErrorKind::Io,
            "this kernel lacks openat2 (Linux 5.6 or later is needed for file operations)"
                .to_string(),
        ),
        other => (FsErrorKind::Io, format!("{path}: {}", other.desc())),
    };
    FsError::new(kind, message)
}

pub(crate) fn invalid(message: impl Into<String>) -> FsError {
    FsError::new(FsErrorKind::Invalid, message)
}

pub(crate) fn io_error(err: &std::io::Error, path: &str) -> FsError {
    match err.raw_os_error() {
        Some(code) => errno_error(Errno::from_raw(code), path),
        None => FsError::new(FsErrorKind::Io, format!("{path}: {err}")),
    }
}

/// A short, printable form of a path for messages.
pub(crate) fn shown(path: &str) -> String {
    if path.len() > 200 {
        let mut end = 200;
        while !path.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &path[..end])
    } else {
        path.to_string()
    }
}

/// Check a path from a request: not empty, no NUL, not over `PATH_MAX`.
pub(crate) fn validate(path: &str) -> Result<(), FsError> {
    if path.is_empty() {
        return Err(invalid("the path is empty"));
    }
    if path.contains('\0') {
        return Err(invalid(format!(
            "the path {:?} contains a NUL byte",
            shown(path)
        )));
    }
    if path.len() > PATH_MAX {
        return Err(invalid(format!(
            "the path is {} bytes long; the limit is {PATH_MAX}",
            path.len()
        )));
    }
    Ok(())
}

/// Split a relative or absolute path into its parent and its last
/// component, which must be a real name (not `.` or `..`).
pub(crate) fn split(path: &str) -> Result<(&str, &str), FsError> {
    let trimmed = path.trim_end_matches('/');
    if trimmed.is_empty() {
        return Err(invalid(
            "the path is the sandbox's root directory, which this operation cannot use",
        ));
    }
    let (parent, name) = match trimmed.rfind('/') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => ("", trimmed),
    };
    if name == "." || name == ".." {
        return Err(invalid(format!(
            "{}: the last component must be a name, not {name:?}",
            shown(path)
        )));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

pub(crate) fn cstring(bytes: &[u8]) -> Result<CString, FsError> {
    CString::new(bytes).map_err(|_| invalid("a name contains a NUL byte"))
}

/// `path` relative to the root directory, for openat2: `.` for the root.
fn relative(path: &str) -> &str {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() { "." } else { rel }
}

impl Root {
    /// Open `root` (normally `/`) as the anchor of every lookup.
    pub(crate) fn open(root: &std::path::Path, cwd: &str) -> Result<Root, FsError> {
        let fd = nix::fcntl::open(
            root,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(e, &root.to_string_lossy()))?;
        let cwd = if cwd.starts_with('/') {
            cwd.to_string()
        } else {
            format!("/{cwd}")
        };
        let prefix = prefix_of(&fd);
        Ok(Root { fd, cwd, prefix })
    }

    /// A directory already open (an `O_PATH` or read descriptor) as a root.
    pub(crate) fn from_fd(fd: OwnedFd) -> Root {
        let prefix = prefix_of(&fd);
        Root {
            fd,
            cwd: "/".into(),
            prefix,
        }
    }

    /// The absolute form of a request's path: checked, and joined to the
    /// working directory when relative. Not canonicalized: `..` and
    /// symlinks are left to the kernel, which resolves them inside the root.
    pub(crate) fn absolute(&self, path: &str) -> Result<String, FsError> {
        validate(path)?;
        let abs = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.cwd.trim_end_matches('/'))
        };
        if abs.len() > PATH_MAX {
            return Err(invalid(format!(
                "the path is {} bytes long once joined to the working directory; the limit is {PATH_MAX}",
                abs.len()
            )));
        }
        Ok(abs)
    }

    /// `openat2` of an absolute path inside the root. Per-process files
    /// in /proc are refused (see [`Root::is_process_file`]).
    pub(crate) fn open_at(&self, abs: &str, flags: OFlag, mode: u32) -> Result<OwnedFd, FsError> {
        let fd = resolve(
            &self.fd,
            relative(abs),
            flags,
            mode,
            ResolveFlag::RESOLVE_IN_ROOT | ResolveFlag::RESOLVE_NO_MAGICLINKS,
        )
        .map_err(|e| errno_error(e, abs))?;
        if self.is_process_file(&fd) {
            return Err(process_file(abs));
        }
        Ok(fd)
    }

    /// Whether `fd` is a per-process entry of procfs (`/proc/PID/…`,
    /// `/proc/self/…`, `/proc/thread-self/…`). The agent is PID 1 of the
    /// sandbox and reads them as itself: its environment, its memory, its
    /// descriptors are not the sandbox's files. Judged by what `fd` is,
    /// not by the path asked for, so a symlink elsewhere pointing into
    /// /proc/1 is caught too.
    pub(crate) fn is_process_file(&self, fd: &impl AsFd) -> bool {
        if !on_procfs(fd) {
            return false;
        }
        let link = format!("/proc/self/fd/{}", fd.as_fd().as_raw_fd());
        let Ok(target) = nix::fcntl::readlink(link.as_str()) else {
            // Cannot tell: refuse rather than serve the agent's own files.
            return true;
        };
        let target = target.as_bytes();
        let Some(inside) = target.strip_prefix(self.prefix.as_bytes()) else {
            return true;
        };
        is_process_path(inside)
    }

    /// The directory holding `abs` (resolved inside the root) and the
    /// final name, for `*at` calls.
    pub(crate) fn parent(&self, abs: &str) -> Result<(OwnedFd, CString), FsError> {
        let (parent, name) = split(abs)?;
        let dir = self.open_at(parent, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        Ok((dir, cstring(name.as_bytes())?))
    }
}

/// The refusal of a per-process file in /proc.
pub(crate) fn process_file(path: &str) -> FsError {
    FsError::new(
        FsErrorKind::PermissionDenied,
        format!(
            "{} is a per-process file under /proc, which the files API does not serve (it would be the agent's own); read it with exec",
            shown(path)
        ),
    )
}

/// Whether `path` (as the kernel names an open file) is `/proc/PID`,
/// `/proc/self` or `/proc/thread-self`, or below one of them.
fn is_process_path(path: &[u8]) -> bool {
    let Some(rest) = path.strip_prefix(b"/proc/") else {
        return false;
    };
    let first = rest.split(|b| *b == b'/').next().unwrap_or_default();
    first == b"self"
        || first == b"thread-self"
        || (!first.is_empty() && first.iter().all(u8::is_ascii_digit))
}

/// The path the kernel shows for the root `fd`, without a trailing `/`
/// (empty for `/`).
fn prefix_of(fd: &OwnedFd) -> String {
    let link = format!("/proc/self/fd/{}", fd.as_raw_fd());
    nix::fcntl::readlink(link.as_str())
        .map(|p| p.to_string_lossy().trim_end_matches('/').to_string())
        .unwrap_or_default()
}

/// The one place `openat2` is called.
pub(crate) fn resolve(
    dir: &impl AsFd,
    path: &str,
    flags: OFlag,
    mode: u32,
    resolve: ResolveFlag,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(Mode::from_bits_truncate(mode))
        .resolve(resolve);
    loop {
        match nix::fcntl::openat2(dir.as_fd(), path, how) {
            // openat2 answers EAGAIN when a rename raced the lookup; retry.
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

/// `openat2` of raw bytes relative to `dir`, for archive entries: never
/// follows any symlink and never leaves `dir`.
pub(crate) fn resolve_beneath(dir: &impl AsFd, rel: &[u8], flags: OFlag) -> Result<OwnedFd, Errno> {
    let path = OsStr::from_bytes(rel);
    let how = OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_MAGICLINKS,
    );
    loop {
        match nix::fcntl::openat2(dir.as_fd(), path, how) {
            Err(Errno::EAGAIN) | Err(Errno::EINTR) => continue,
            other => return other,
        }
    }
}

pub(crate) fn kind_of(st: &FileStat) -> FileKind {
    match SFlag::from_bits_truncate(st.st_mode & libc::S_IFMT) {
        SFlag::S_IFDIR => FileKind::Dir,
        SFlag::S_IFLNK => FileKind::Symlink,
        SFlag::S_IFIFO => FileKind::Fifo,
        SFlag::S_IFSOCK => FileKind::Socket,
        SFlag::S_IFCHR => FileKind::CharDevice,
        SFlag::S_IFBLK => FileKind::BlockDevice,
        _ => FileKind::File,
    }
}

/// Whether `fd` is on procfs, whose symlinks may be magic links that
/// reveal host paths: their targets are not reported.
pub(crate) fn on_procfs(fd: &impl AsFd) -> bool {
    nix::sys::statfs::fstatfs(fd)
        .map(|s| s.filesystem_type() == nix::sys::statfs::PROC_SUPER_MAGIC)
        .unwrap_or(true)
}

/// Read a symlink's target: `name` in `dir`, or `dir` itself (an
/// `O_PATH | O_NOFOLLOW` descriptor of the link) when `name` is empty.
pub(crate) fn link_target(dir: &impl AsFd, name: &CStr) -> Option<String> {
    let target = nix::fcntl::readlinkat(dir.as_fd(), name).ok()?;
    Some(target.to_string_lossy().into_owned())
}

/// An entry from a stat result.
pub(crate) fn entry(path: String, name: String, st: &FileStat, link: Option<String>) -> FsEntry {
    FsEntry {
        path,
        name,
        kind: kind_of(st),
        size: st.st_size.max(0) as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime_sec: st.st_mtime,
        mtime_nsec: st.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        link_target: link,
    }
}

/// The last component of an absolute path, for an entry's `name`.
pub(crate) fn base_name(abs: &str) -> String {
    let trimmed = abs.trim_end_matches('/');
    match trimmed.rfind('/') {
        Some(i) => trimmed[i + 1..].to_string(),
        None if trimmed.is_empty() => "/".to_string(),
        None => trimmed.to_string(),
    }
}

/// `dir/name` for reported paths.
pub(crate) fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_checked() {
        assert!(validate("").is_err());
        assert_eq!(validate("/a\0b").unwrap_err().kind, FsErrorKind::Invalid);
        assert!(validate(&"a".repeat(PATH_MAX + 1)).is_err());
        assert!(validate("/ok/path").is_ok());
    }

    #[test]
    fn split_names() {
        assert_eq!(split("/a/b").unwrap(), ("/a", "b"));
        assert_eq!(split("/a/b/").unwrap(), ("/a", "b"));
        assert_eq!(split("/a").unwrap(), ("/", "a"));
        assert_eq!(split("a").unwrap(), ("/", "a"));
        assert!(split("/").is_err());
        assert!(split("/a/..").is_err());
        assert!(split("/a/.").is_err());
    }

    #[test]
    fn names() {
        assert_eq!(base_name("/a/b"), "b");
        assert_eq!(base_name("/"), "/");
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
        assert_eq!(relative("/"), ".");
        assert_eq!(relative("/a/b"), "a/b");
    }

    #[test]
    fn process_paths() {
        for path in [
            "/proc/1",
            "/proc/1/environ",
            "/proc/self",
            "/proc/thread-self/x",
        ] {
            assert!(is_process_path(path.as_bytes()), "{path}");
        }
        for path in [
            "/proc",
            "/proc/meminfo",
            "/proc/sys/kernel",
            "/proc/1x",
            "/tmp/proc/1",
        ] {
            assert!(!is_process_path(path.as_bytes()), "{path}");
        }
    }
}
