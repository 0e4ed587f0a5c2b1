//! The file operations themselves, synchronous and path-safe (see
//! [`super::path`]): stat, list, mkdir, move, remove, read and write.

use std::ffi::{CStr, CString};
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use cove_protocol::MAX_CHUNK;
use cove_protocol::fs::{FileKind, FsDone, FsEntry, FsError, FsErrorKind, FsReply};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode};
use nix::unistd::UnlinkatFlags;

use super::control::{Ctx, UploadReader};
use super::path::{
    self, Root, base_name, entry, errno_error, invalid, io_error, join, kind_of, link_target,
    on_procfs, shown,
};

/// Owner given to what the agent creates: the sandbox's default user,
/// `None` for root (who creates as itself anyway).
pub(crate) type Owner = Option<(u32, u32)>;

/// Entries sent per `Entries` message.
const LIST_BATCH: usize = 512;

/// Size of the reads and writes of file contents.
const READ_BUF: usize = 4 * MAX_CHUNK;

/// Most directory levels a listing or a recursive walk descends.
pub(crate) const MAX_DEPTH: u32 = 64;

fn lstat_at(dir: &impl AsFd, name: &CStr) -> Result<FileStat, Errno> {
    nix::sys::stat::fstatat(dir.as_fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW)
}

fn exists_at(dir: &impl AsFd, name: &CStr) -> Result<Option<FileStat>, Errno> {
    match lstat_at(dir, name) {
        Ok(st) => Ok(Some(st)),
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

fn chown_fd(fd: &impl AsFd, owner: Owner) {
    if let Some((uid, gid)) = owner {
        // Best effort: a file the sandbox's user cannot own is still written.
        let _ = nix::unistd::fchown(
            fd.as_fd(),
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        );
    }
}

/// Describe `path`.
pub(crate) fn stat(root: &Root, path: &str, follow: bool) -> Result<FsEntry, FsError> {
    let abs = root.absolute(path)?;
    let flags = if follow {
        OFlag::O_PATH
    } else {
        OFlag::O_PATH | OFlag::O_NOFOLLOW
    };
    let fd = root.open_at(&abs, flags, 0)?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| errno_error(e, &abs))?;
    let link = if kind_of(&st) == FileKind::Symlink && !on_procfs(&fd) {
        link_target(&fd, c"")
    } else {
        None
    };
    Ok(entry(abs.clone(), base_name(&abs), &st, link))
}

/// List a directory `depth` levels down, sending batches of entries.
/// Returns whether `limit` cut the listing short.
pub(crate) fn list(
    root: &Root,
    ctx: &Ctx,
    path: &str,
    depth: u32,
    limit: u32,
) -> Result<FsDone, FsError> {
    if depth == 0 || depth > MAX_DEPTH {
        return Err(invalid(format!("depth must be between 1 and {MAX_DEPTH}")));
    }
    let abs = root.absolute(path)?;
    let dir = root.open_at(&abs, OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
    let mut batch = Vec::new();
    let mut count = 0u64;
    let mut truncated = false;
    // Depth-first, each child opened from its parent's descriptor without
    // following symlinks.
    let mut stack: Vec<(OwnedFd, String, u32)> = vec![(dir, abs, 1)];
    'walk: while let Some((dir, dir_path, level)) = stack.pop() {
        ctx.check()?;
        let hide_links = on_procfs(&dir);
        let mut names = read_names(&dir).map_err(|e| errno_error(e, &dir_path))?;
        names.sort();
        for name in names {
            if count >= u64::from(limit) {
                truncated = true;
                break 'walk;
            }
            let Ok(st) = lstat_at(&dir, &name) else {
                // Removed while we listed.
                continue;
            };
            let shown_name = name.to_string_lossy().into_owned();
            let entry_path = join(&dir_path, &shown_name);
            let kind = kind_of(&st);
            let link = (kind == FileKind::Symlink && !hide_links)
                .then(|| link_target(&dir, &name))
                .flatten();
            if kind == FileKind::Dir
                && level < depth
                && let Ok(child) = nix::fcntl::openat(
                    dir.as_fd(),
                    name.as_c_str(),
                    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                    Mode::empty(),
                )
                && !(hide_links && root.is_process_file(&child))
            {
                stack.push((child, entry_path.clone(), level + 1));
            }
            batch.push(entry(entry_path, shown_name, &st, link));
            count += 1;
            if batch.len() >= LIST_BATCH {
                ctx.send(FsReply::Entries {
                    entries: std::mem::take(&mut batch),
                })?;
            }
        }
    }
    if !batch.is_empty() {
        ctx.send(FsReply::Entries { entries: batch })?;
    }
    Ok(FsDone::Listed { truncated })
}

/// The names in a directory, without `.` and `..`.
pub(crate) fn read_names(dir: &OwnedFd) -> Result<Vec<CString>, Errno> {
    // `Dir` takes ownership and seeks: give it its own descriptor, opened
    // afresh so the offset is not shared with `dir`.
    let fd = nix::fcntl::openat(
        dir.as_fd(),
        c".",
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    let mut handle = nix::dir::Dir::from_fd(fd)?;
    let mut names = Vec::new();
    for item in handle.iter() {
        let item = item?;
        let name = item.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

fn mode_of(mode: Option<u32>, default: u32) -> Result<u32, FsError> {
    match mode {
        Some(m) if m > 0o7777 => Err(invalid(format!(
            "mode {m:o} is not a permission mode (at most 7777 in octal)"
        ))),
        Some(m) => Ok(m),
        None => Ok(default),
    }
}

/// Create directory `name` in `parent` with `mode` and `owner`; returns
/// whether it was created (false: a directory was already there and
/// `existing_ok`).
fn make_dir(
    parent: &OwnedFd,
    name: &CStr,
    mode: u32,
    owner: Owner,
    existing_ok: bool,
    shown_path: &str,
) -> Result<bool, FsError> {
    match nix::sys::stat::mkdirat(parent.as_fd(), name, Mode::from_bits_truncate(0o700)) {
        Ok(()) => {
            // Exact mode (mkdir applies the umask) and owner, on the
            // directory just made, opened without following anything.
            let fd = nix::fcntl::openat(
                parent.as_fd(),
                name,
                OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| errno_error(e, shown_path))?;
            chown_fd(&fd, owner);
            nix::sys::stat::fchmod(&fd, Mode::from_bits_truncate(mode))
                .map_err(|e| errno_error(e, shown_path))?;
            Ok(true)
        }
        Err(Errno::EEXIST) if existing_ok => match lstat_at(parent, name) {
            Ok(st) if kind_of(&st) == FileKind::Dir => Ok(false),
            // A symlink to a directory is fine for `mkdir -p`; the next
            // lookup follows it (inside the root).
            Ok(st) if kind_of(&st) == FileKind::Symlink => Ok(false),
            _ => Err(FsError::new(
                FsErrorKind::NotADirectory,
                format!("{} exists and is not a directory", shown(shown_path)),
            )),
        },
        Err(e) => Err(errno_error(e, shown_path)),
    }
}

/// Directories made by [`make_dirs`], each as its parent's descriptor and
/// its name, outermost first.
pub(crate) type MadeDirs = Vec<(OwnedFd, CString)>;

/// `mkdir -p`: every missing directory of `abs`, each created relative to
/// its parent's descriptor and the next looked up inside the root.
/// Returns the directories it created.
pub(crate) fn make_dirs(
    root: &Root,
    abs: &str,
    mode: u32,
    owner: Owner,
) -> Result<MadeDirs, FsError> {
    let mut made = Vec::new();
    let mut prefix = String::new();
    for comp in abs.split('/').filter(|c| !c.is_empty() && *c != ".") {
        let parent_path = if prefix.is_empty() { "/" } else { &prefix };
        let parent = root.open_at(parent_path, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)?;
        prefix.push('/');
        prefix.push_str(comp);
        if comp == ".." {
            continue;
        }
        let name = path::cstring(comp.as_bytes())?;
        if make_dir(&parent, &name, mode, owner, true, &prefix)? {
            made.push((parent, name));
        }
    }
    Ok(made)
}

/// Remove again (innermost first) the directories [`make_dirs`] made, those
/// that are still empty.
pub(crate) fn unmake_dirs(made: MadeDirs) {
    for (parent, name) in made.into_iter().rev() {
        let _ = nix::unistd::unlinkat(parent.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir);
    }
}

pub(crate) fn mkdir(
    root: &Root,
    path: &str,
    parents: bool,
    mode: Option<u32>,
    owner: Owner,
) -> Result<FsEntry, FsError> {
    let mode = mode_of(mode, 0o755)?;
    let abs = root.absolute(path)?;
    if parents {
        make_dirs(root, &abs, mode, owner)?;
    } else {
        let (parent, name) = root.parent(&abs)?;
        make_dir(&parent, &name, mode, owner, false, &abs)?;
    }
    stat(root, &abs, true)
}

pub(crate) fn rename(root: &Root, from: &str, to: &str, overwrite: bool) -> Result<(), FsError> {
    let from = root.absolute(from)?;
    let to = root.absolute(to)?;
    let (from_dir, from_name) = root.parent(&from)?;
    let (to_dir, to_name) = root.parent(&to)?;
    let flags = if overwrite {
        RenameFlags::empty()
    } else {
        RenameFlags::RENAME_NOREPLACE
    };
    let result = nix::fcntl::renameat2(
        from_dir.as_fd(),
        from_name.as_c_str(),
        to_dir.as_fd(),
        to_name.as_c_str(),
        flags,
    );
    match result {
        Ok(()) => Ok(()),
        // A file system without RENAME_NOREPLACE: check, then rename.
        Err(Errno::EINVAL) if !overwrite => {
            if exists_at(&to_dir, &to_name)
                .map_err(|e| errno_error(e, &to))?
                .is_some()
            {
                return Err(errno_error(Errno::EEXIST, &to));
            }
            nix::fcntl::renameat(
                from_dir.as_fd(),
                from_name.as_c_str(),
                to_dir.as_fd(),
                to_name.as_c_str(),
            )
            .map_err(|e| match e {
                Errno::EXDEV => cross_device(&from_dir, &from_name, &to_dir, &from, &to),
                e => rename_error(e, &from, &to),
            })
        }
        Err(Errno::EXDEV) => Err(cross_device(&from_dir, &from_name, &to_dir, &from, &to)),
        Err(e) => Err(rename_error(e, &from, &to)),
    }
}

fn rename_error(errno: Errno, from: &str, to: &str) -> FsError {
    match errno {
        Errno::ENOENT => errno_error(errno, from),
        Errno::EINVAL => invalid(format!(
            "cannot move {} into itself ({})",
            shown(from),
            shown(to)
        )),
        _ => errno_error(errno, to),
    }
}

/// The refusal of a move the kernel cannot do as a rename (`EXDEV`): the
/// two paths are on different file systems, or `from` is a directory of
/// an overlay's lower layer (the sandbox's image), which overlayfs cannot
/// rename in place. Either way the client has to copy.
fn cross_device(
    from_dir: &OwnedFd,
    from_name: &CStr,
    to_dir: &OwnedFd,
    from: &str,
    to: &str,
) -> FsError {
    let same_mount = match (lstat_at(from_dir, from_name), nix::sys::stat::fstat(to_dir)) {
        (Ok(st), Ok(to_st)) => {
            kind_of(&st) == FileKind::Dir
                && Mount::of(from_dir, from_name, &st) == Mount::of(to_dir, c"", &to_st)
        }
        _ => false,
    };
    let message = if same_mount {
        format!(
            "{} is a directory of the sandbox's image (an overlay lower layer), which cannot be renamed in place; copy it to {} instead",
            shown(from),
            shown(to)
        )
    } else {
        format!(
            "{} and {} are on different file systems, so it cannot be moved; copy it instead",
            shown(from),
            shown(to)
        )
    };
    invalid(message)
}

/// The mount a file is on: its device, and the kernel's mount id where
/// it reports one (Linux 5.8+). Two bind mounts of one file system share
/// the device but not the mount id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mount {
    dev: u64,
    id: Option<u64>,
}

impl Mount {
    /// The mount of `name` in `dir` (of `dir` itself when `name` is
    /// empty), whose `lstat` is `st`.
    fn of(dir: &impl AsFd, name: &CStr, st: &FileStat) -> Mount {
        Mount {
            dev: st.st_dev,
            id: mount_id(dir, name),
        }
    }

    /// Whether an entry on `child` (of kind `kind`) is on another mount
    /// than its tree's. Devices are compared for directories only: an
    /// overlay reports its lower layers' devices for files.
    fn crossed_by(&self, child: &Mount, kind: FileKind) -> bool {
        let other_id = matches!((self.id, child.id), (Some(a), Some(b)) if a != b);
        other_id || (kind == FileKind::Dir && child.dev != self.dev)
    }
}

fn mount_id(dir: &impl AsFd, name: &CStr) -> Option<u64> {
    let mut flags = libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT;
    if name.is_empty() {
        flags |= libc::AT_EMPTY_PATH;
    }
    let mut stx = std::mem::MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `name` is NUL-terminated and statx writes at most one
    // `struct statx` into `stx`.
    let rc = unsafe {
        libc::statx(
            dir.as_fd().as_raw_fd(),
            name.as_ptr(),
            flags,
            libc::STATX_MNT_ID,
            stx.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return None;
    }
    // SAFETY: statx succeeded, so it filled `stx` (zeroed before).
    let stx = unsafe { stx.assume_init() };
    (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

fn mount_point(path: &str) -> FsError {
    FsError::new(
        FsErrorKind::PermissionDenied,
        format!(
            "{} is a mount point; a recursive remove does not cross file systems",
            shown(path)
        ),
    )
}

/// Remove `path`; a directory needs `recursive` unless it is empty.
/// A recursive removal does not cross into other file systems: the tree is
/// walked first and a mount point anywhere in it refuses the whole removal
/// before anything is removed (and each entry is checked again as it is
/// removed, for a mount that appeared meanwhile).
pub(crate) fn remove(root: &Root, ctx: &Ctx, path: &str, recursive: bool) -> Result<(), FsError> {
    let abs = root.absolute(path)?;
    let (parent, name) = root.parent(&abs)?;
    let st = lstat_at(&parent, &name).map_err(|e| errno_error(e, &abs))?;
    if kind_of(&st) != FileKind::Dir {
        return nix::unistd::unlinkat(parent.as_fd(), name.as_c_str(), UnlinkatFlags::NoRemoveDir)
            .map_err(|e| errno_error(e, &abs));
    }
    if recursive {
        let dir = nix::fcntl::openat(
            parent.as_fd(),
            name.as_c_str(),
            OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| errno_error(e, &abs))?;
        if root.is_process_file(&dir) {
            return Err(path::process_file(&abs));
        }
        let top = Mount::of(&dir, c"", &st);
        let parent_st = nix::sys::stat::fstat(&parent).map_err(|e| errno_error(e, &abs))?;
        if Mount::of(&parent, c"", &parent_st).crossed_by(&top, FileKind::Dir) {
            return Err(mount_point(&abs));
        }
        walk_tree(ctx, &dir, &abs, &top, 0, Pass::Check)?;
        walk_tree(ctx, &dir, &abs, &top, 0, Pass::Empty)?;
    }
    nix::unistd::unlinkat(parent.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir)
        .map_err(|e| errno_error(e, &abs))
}

fn open_child(dir: &OwnedFd, name: &CStr, at: &str) -> Result<OwnedFd, FsError> {
    nix::fcntl::openat(
        dir.as_fd(),
        name,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| errno_error(e, at))
}

/// The two walks of a recursive remove: the whole tree checked first, so
/// that a mount point anywhere refuses it before anything is removed, then
/// emptied (checking each entry again, for a mount that appeared since).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pass {
    Check,
    Empty,
}

fn walk_tree(
    ctx: &Ctx,
    dir: &OwnedFd,
    at: &str,
    top: &Mount,
    depth: u32,
    pass: Pass,
) -> Result<(), FsError> {
    ctx.check()?;
    if depth > 4 * MAX_DEPTH {
        return Err(invalid(format!("{} is nested too deeply", shown(at))));
    }
    for name in read_names(dir).map_err(|e| errno_error(e, at))? {
        let child_path = join(at, &name.to_string_lossy());
        let Ok(st) = lstat_at(dir, &name) else {
            continue;
        };
        let kind = kind_of(&st);
        if top.crossed_by(&Mount::of(dir, &name, &st), kind) {
            let mut err = mount_point(&child_path);
            if pass == Pass::Check {
                err.message.push_str(" (nothing was removed)");
            }
            return Err(err);
        }
        if kind == FileKind::Dir {
            let child = open_child(dir, &name, &child_path)?;
            walk_tree(ctx, &child, &child_path, top, depth + 1, pass)?;
        }
        if pass == Pass::Empty {
            let removed = if kind == FileKind::Dir {
                nix::unistd::unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir)
            } else {
                match nix::unistd::unlinkat(
                    dir.as_fd(),
                    name.as_c_str(),
                    UnlinkatFlags::NoRemoveDir,
                ) {
                    Err(Errno::ENOENT) => Ok(()),
                    other => other,
                }
            };
            removed.map_err(|e| errno_error(e, &child_path))?;
        }
    }
    Ok(())
}

/// Open a regular file for download: its descriptor and its entry.
pub(crate) fn open_read(root: &Root, path: &str) -> Result<(std::fs::File, FsEntry), FsError> {
    let abs = root.absolute(path)?;
    // O_NONBLOCK: opening a FIFO must not hang; it is refused below.
    let fd = root.open_at(
        &abs,
        OFlag::O_RDONLY | OFlag::O_NOCTTY | OFlag::O_NONBLOCK,
        0,
    )?;
    let st = nix::sys::stat::fstat(&fd).map_err(|e| errno_error(e, &abs))?;
    match kind_of(&st) {
        FileKind::File => {}
        FileKind::Dir => {
            return Err(FsError::new(
                FsErrorKind::IsADirectory,
                format!(
                    "{} is a directory; download it as a tar archive (GET …/fs/tar)",
                    shown(&abs)
                ),
            ));
        }
        other => {
            return Err(invalid(format!(
                "{} is a {}, not a regular file",
                shown(&abs),
                other.as_str().replace('_', " ")
            )));
        }
    }
    let info = entry(abs.clone(), base_name(&abs), &st, None);
    Ok((std::fs::File::from(fd), info))
}

/// The error for a file that ended before the size it had when opened.
pub(crate) fn shrank(info: &FsEntry, sent: u64) -> FsError {
    FsError::new(
        FsErrorKind::Io,
        format!(
            "{} shrank from {} to {sent} bytes while it was read",
            shown(&info.path),
            info.size
        ),
    )
}

/// Stream a regular file to the host: `Ready` with its entry, then
/// exactly `size` bytes (or, for a file that reports size 0 such as those
/// in /proc, whatever it yields until end of file).
pub(crate) fn read(root: &Root, ctx: &Ctx, path: &str) -> Result<FsDone, FsError> {
    let (mut file, info) = open_read(root, path)?;
    let size = info.size;
    let abs = info.path.clone();
    ctx.send(FsReply::Ready {
        entry: Some(info.clone()),
    })?;
    // Large reads; `send_data` cuts them into protocol chunks.
    let mut buf = vec![0u8; READ_BUF];
    let mut sent = 0u64;
    loop {
        let want = if size > 0 {
            (size - sent).min(READ_BUF as u64) as usize
        } else {
            READ_BUF
        };
        if want == 0 {
            break;
        }
        let n = match file.read(&mut buf[..want]) {
            Ok(n) => n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(err) => return Err(io_error(&err, &abs)),
        };
        if n == 0 {
            if size > 0 {
                return Err(shrank(&info, sent));
            }
            break;
        }
        ctx.send_data(&buf[..n])?;
        sent += n as u64;
    }
    Ok(FsDone::Transferred {
        bytes: sent,
        entries: 1,
    })
}

/// A file being written under a temporary name next to its destination;
/// removed unless committed.
pub(crate) struct Staged {
    pub(crate) dir: OwnedFd,
    pub(crate) temp: CString,
    pub(crate) file: std::fs::File,
    committed: bool,
}

impl std::fmt::Debug for Staged {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Staged")
            .field("temp", &self.temp)
            .finish_non_exhaustive()
    }
}

/// A name for a temporary file that no archive or user would pick.
pub(crate) fn temp_name() -> CString {
    let mut bytes = [0u8; 8];
    let _ = getrandom(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    CString::new(format!(".cove-tmp-{hex}")).unwrap_or_default()
}

fn getrandom(buf: &mut [u8]) -> Result<(), Errno> {
    // SAFETY: getrandom writes at most `buf.len()` bytes into `buf`.
    let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0) };
    if n < 0 { Err(Errno::last()) } else { Ok(()) }
}

impl Staged {
    /// Create a temporary file in `dir` (exclusive, never through a symlink).
    pub(crate) fn create(dir: OwnedFd, mode: u32, shown_path: &str) -> Result<Staged, FsError> {
        loop {
            let temp = temp_name();
            match nix::fcntl::openat(
                dir.as_fd(),
                temp.as_c_str(),
                OFlag::O_WRONLY
                    | OFlag::O_CREAT
                    | OFlag::O_EXCL
                    | OFlag::O_NOFOLLOW
                    | OFlag::O_CLOEXEC,
                Mode::from_bits_truncate(mode & 0o777),
            ) {
                Ok(fd) => {
                    return Ok(Staged {
                        dir,
                        temp,
                        file: std::fs::File::from(fd),
                        committed: false,
                    });
                }
                Err(Errno::EEXIST) => continue,
                Err(e) => return Err(errno_error(e, shown_path)),
            }
        }
    }

    /// Give the file its final mode, owner and (optionally) mtime.
    pub(crate) fn finish_metadata(
        &self,
        mode: u32,
        owner: Owner,
        mtime: Option<i64>,
        shown_path: &str,
    ) -> Result<(), FsError> {
        chown_fd(&self.file, owner);
        // After chown, which clears setuid/setgid bits.
        nix::sys::stat::fchmod(&self.file, Mode::from_bits_truncate(mode))
            .map_err(|e| errno_error(e, shown_path))?;
        if let Some(secs) = mtime {
            let t = nix::sys::time::TimeSpec::new(secs, 0);
            let _ = nix::sys::stat::futimens(&self.file, &t, &t);
        }
        Ok(())
    }

    /// Rename the temporary file over `name`.
    pub(crate) fn commit(mut self, name: &CStr, shown_path: &str) -> Result<(), FsError> {
        nix::fcntl::renameat(
            self.dir.as_fd(),
            self.temp.as_c_str(),
            self.dir.as_fd(),
            name,
        )
        .map_err(|e| errno_error(e, shown_path))?;
        self.committed = true;
        Ok(())
    }

    /// Keep the temporary file (an archive commits it later).
    pub(crate) fn keep(mut self) -> CString {
        self.committed = true;
        std::mem::take(&mut self.temp)
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.committed {
            let _ = nix::unistd::unlinkat(
                self.dir.as_fd(),
                self.temp.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// Copy everything from `from` into `to`, in large writes (the buffer is
/// filled from several upload chunks before it is written).
pub(crate) fn copy(
    from: &mut impl Read,
    to: &mut impl Write,
    shown_path: &str,
) -> Result<u64, FsError> {
    let mut buf = vec![0u8; READ_BUF];
    let mut total = 0u64;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match from.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(err) if err.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(err) => return Err(FsError::new(FsErrorKind::Io, err.to_string())),
            }
        }
        if filled == 0 {
            return Ok(total);
        }
        to.write_all(&buf[..filled])
            .map_err(|e| io_error(&e, shown_path))?;
        total += filled as u64;
    }
}

/// A file upload between its checks and its commit: the content goes to
/// `staged.file`, [`PreparedWrite::commit`] puts it in place.
#[derive(Debug)]
pub(crate) struct PreparedWrite {
    pub(crate) staged: Staged,
    name: CString,
    abs: String,
    mode: u32,
    owner: Owner,
}

/// Check and prepare an upload to `path`: parents are created, and a
/// temporary file is made in the destination directory. A symlink at the
/// destination will be replaced, never followed.
pub(crate) fn prepare_write(
    root: &Root,
    path: &str,
    mode: Option<u32>,
    owner: Owner,
) -> Result<PreparedWrite, FsError> {
    let abs = root.absolute(path)?;
    let (parent_path, _) = path::split(&abs)?;
    make_dirs(root, parent_path, 0o755, owner)?;
    let (dir, name) = root.parent(&abs)?;
    let existing = exists_at(&dir, &name).map_err(|e| errno_error(e, &abs))?;
    if on_procfs(&dir) {
        // Files cannot be created in /proc, and its symlinks may be magic
        // links: say so rather than report a confusing "not found".
        return Err(match existing.as_ref().map(kind_of) {
            Some(FileKind::Symlink) => errno_error(Errno::ELOOP, &abs),
            _ => FsError::new(
                FsErrorKind::PermissionDenied,
                format!(
                    "{} is in /proc, where files cannot be uploaded",
                    shown(&abs)
                ),
            ),
        });
    }
    let (default_mode, owner) = match &existing {
        Some(st) if kind_of(st) == FileKind::Dir => {
            return Err(FsError::new(
                FsErrorKind::IsADirectory,
                format!(
                    "{} is a directory; give a file path (or upload a tar archive into it)",
                    shown(&abs)
                ),
            ));
        }
        // Replacing a file keeps its mode and owner unless told otherwise.
        Some(st) if kind_of(st) == FileKind::File => {
            (st.st_mode & 0o7777, Some((st.st_uid, st.st_gid)))
        }
        Some(st) if kind_of(st) != FileKind::Symlink => {
            // A device, FIFO or socket is not a file's content to replace
            // (and /dev/null replaced by a file breaks the sandbox).
            return Err(invalid(format!(
                "{} is a {}; an upload replaces only a regular file or a symlink (remove it first to put a file there)",
                shown(&abs),
                kind_of(st).as_str().replace('_', " ")
            )));
        }
        _ => (0o644, owner),
    };
    let mode = mode_of(mode, default_mode)?;
    let staged = Staged::create(dir, 0o600, &abs)?;
    Ok(PreparedWrite {
        staged,
        name,
        abs,
        mode,
        owner,
    })
}

impl PreparedWrite {
    pub(crate) fn shown_path(&self) -> &str {
        &self.abs
    }

    /// Give the file its mode and owner and rename it into place.
    pub(crate) fn commit(self) -> Result<FsEntry, FsError> {
        let PreparedWrite {
            staged,
            name,
            abs,
            mode,
            owner,
        } = self;
        staged.finish_metadata(mode, owner, None, &abs)?;
        let st = nix::sys::stat::fstat(&staged.file).map_err(|e| errno_error(e, &abs))?;
        staged.commit(&name, &abs)?;
        Ok(entry(abs.clone(), base_name(&abs), &st, None))
    }
}

/// Receive a file over the multiplexed connection; see [`prepare_write`].
/// Only `End` renames it into place, so a failed or cancelled upload
/// leaves the old file (or nothing) behind.
pub(crate) fn write(
    root: &Root,
    ctx: &Ctx,
    path: &str,
    mode: Option<u32>,
    owner: Owner,
) -> Result<FsDone, FsError> {
    let mut prepared = prepare_write(root, path, mode, owner)?;
    ctx.send(FsReply::Ready { entry: None })?;
    let mut reader = UploadReader::new(ctx);
    let shown_path = prepared.shown_path().to_string();
    copy(&mut reader, &mut prepared.staged.file, &shown_path)?;
    prepared.commit().map(FsDone::Entry)
}
