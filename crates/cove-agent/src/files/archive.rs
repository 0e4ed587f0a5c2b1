//! Tar archives in and out of the sandbox.
//!
//! Out: a walk of one path, each child opened from its parent's descriptor
//! without following symlinks, not crossing into other file systems below
//! the top, hard links kept as links.
//!
//! In: every entry's name is checked before anything is written (no
//! absolute names, no `..`), and every lookup below the destination uses
//! `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`, so an entry can never
//! write through a symlink, whether it was there before or an earlier entry
//! made it. Files, symlinks and links are written under temporary names and
//! renamed into place only once the whole archive has been read (an
//! existing file exchanged with its replacement, so that a failure while
//! renaming can swap it back): an archive that fails half-way leaves
//! nothing of itself behind (the directories it had to create, the
//! destination included, are removed again).

use std::collections::{HashMap, HashSet};
use std::ffi::{CStr, CString, OsStr};
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

use cove_protocol::fs::{FileKind, FsDone, FsError, FsErrorKind, FsReply};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, RenameFlags};
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::unistd::UnlinkatFlags;
use tar::{EntryType, Header};

use super::control::{Ctx, DownloadWriter, UploadReader};
use super::ops::{self, MAX_DEPTH, Owner, Staged, read_names};
use super::path::{
    self, PATH_MAX, Root, base_name, entry, errno_error, invalid, kind_of, on_procfs, shown,
};

/// Most entries one archive may hold (each costs a little memory until commit).
const MAX_ENTRIES: u64 = 1_000_000;

fn tar_error(err: std::io::Error, what: &str) -> FsError {
    FsError::new(FsErrorKind::Io, format!("{what}: {err}"))
}

/// A failure to read the uploaded archive: the upload was cancelled, or
/// the bytes are not a well-formed tar archive (the client's mistake).
fn malformed(ctx: &Ctx, err: std::io::Error) -> FsError {
    if ctx.is_cancelled() {
        super::control::cancelled()
    } else {
        invalid(format!(
            "the upload is not a well-formed tar archive: {err}"
        ))
    }
}

// ---------------------------------------------------------------- out ----

/// Reads exactly `size` bytes of a file in large reads (the tar writer
/// copies in small pieces), padding with zeros if the file shrank meanwhile
/// so that the archive stays well-formed.
struct ExactReader {
    file: std::fs::File,
    remaining: u64,
    buf: Vec<u8>,
    pos: usize,
    len: usize,
}

impl ExactReader {
    fn new(file: std::fs::File, size: u64) -> ExactReader {
        ExactReader {
            file,
            remaining: size,
            buf: vec![0u8; size.min(256 * 1024) as usize],
            pos: 0,
            len: 0,
        }
    }
}

impl Read for ExactReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.len {
            if self.remaining == 0 {
                return Ok(0);
            }
            let want = self.remaining.min(self.buf.len() as u64) as usize;
            let n = loop {
                match self.file.read(&mut self.buf[..want]) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            };
            if n == 0 {
                // Shrank: zeros for the rest.
                self.buf[..want].fill(0);
                self.len = want;
            } else {
                self.len = n;
            }
            self.pos = 0;
            self.remaining -= self.len as u64;
        }
        let n = out.len().min(self.len - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct Packer<'a> {
    builder: tar::Builder<DownloadWriter<'a>>,
    ctx: &'a Ctx,
    /// First archived name of each multiply-linked inode.
    links: HashMap<(u64, u64), Vec<u8>>,
    dev: u64,
    entries: u64,
    /// Packing an overlay upper directory as an image layer: whiteouts
    /// (0/0 character devices) become `.wh.NAME`, opaque directories get
    /// a `.wh..wh..opq` entry.
    layer: bool,
}

/// The xattr overlayfs marks an opaque directory with.
const OPAQUE_XATTR: &CStr = c"trusted.overlay.opaque";

fn header_for(st: &FileStat, kind: EntryType, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(st.st_mode & 0o7777);
    header.set_uid(u64::from(st.st_uid));
    header.set_gid(u64::from(st.st_gid));
    header.set_mtime(st.st_mtime.max(0) as u64);
    header.set_size(size);
    header
}

impl Packer<'_> {
    fn add(
        &mut self,
        dir: &OwnedFd,
        name: &CStr,
        archive_name: &[u8],
        st: &FileStat,
        depth: u32,
    ) -> Result<(), FsError> {
        self.ctx.check()?;
        let shown_name = String::from_utf8_lossy(archive_name).into_owned();
        let name_path = OsStr::from_bytes(archive_name);
        let fail = |e: std::io::Error| tar_error(e, &shown_name);
        if self.layer && kind_of(st) == FileKind::CharDevice && st.st_rdev == 0 {
            // A whiteout: NAME was deleted from the layers below.
            let split = archive_name.iter().rposition(|&b| b == b'/');
            let (parent, base) = match split {
                Some(i) => archive_name.split_at(i + 1),
                None => (&b""[..], archive_name),
            };
            let marker = [parent, b".wh.", base].concat();
            return self.marker(st, &marker, &shown_name);
        }
        match kind_of(st) {
            FileKind::Dir => {
                let mut dir_name = archive_name.to_vec();
                dir_name.push(b'/');
                // A mount point below the top: its contents are another file
                // system's (e.g. /proc), not part of this tree.
                let own = st.st_dev == self.dev;
                if own && depth > 4 * MAX_DEPTH {
                    return Err(invalid(format!("{shown_name} is nested too deeply")));
                }
                let child = if own {
                    let fd = nix::fcntl::openat(
                        dir.as_fd(),
                        name,
                        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
                        Mode::empty(),
                    )
                    .map_err(|e| errno_error(e, &shown_name))?;
                    Some(fd)
                } else {
                    None
                };
                if self.layer
                    && let Some(child) = &child
                {
                    self.xattr_records(child, &shown_name)?;
                }
                let mut header = header_for(st, EntryType::Directory, 0);
                self.builder
                    .append_data(&mut header, OsStr::from_bytes(&dir_name), std::io::empty())
                    .map_err(fail)?;
                self.entries += 1;
                let Some(child) = child else {
                    return Ok(());
                };
                if self.layer && is_opaque(&child) {
                    // Nothing of the layers below shows through.
                    dir_name.extend_from_slice(b".wh..wh..opq");
                    self.marker(st, &dir_name, &shown_name)?;
                }
                self.add_children(&child, archive_name, depth + 1)
            }
            FileKind::File => {
                if st.st_nlink > 1 {
                    let key = (st.st_dev, st.st_ino);
                    if let Some(first) = self.links.get(&key) {
                        let mut header = header_for(st, EntryType::Link, 0);
                        let target = OsStr::from_bytes(first).to_owned();
                        self.builder
                            .append_link(&mut header, name_path, target)
                            .map_err(fail)?;
                        self.entries += 1;
                        return Ok(());
                    }
                    self.links.insert(key, archive_name.to_vec());
                }
                let fd = match nix::fcntl::openat(
                    dir.as_fd(),
                    name,
                    OFlag::O_RDONLY
                        | OFlag::O_NOFOLLOW
                        | OFlag::O_NONBLOCK
                        | OFlag::O_NOCTTY
                        | OFlag::O_CLOEXEC,
                    Mode::empty(),
                ) {
                    Ok(fd) => fd,
                    // Removed (or replaced by a symlink) since the listing.
                    Err(Errno::ENOENT) | Err(Errno::ELOOP) => return Ok(()),
                    Err(e) => return Err(errno_error(e, &shown_name)),
                };
                let st = nix::sys::stat::fstat(&fd).map_err(|e| errno_error(e, &shown_name))?;
                if kind_of(&st) != FileKind::File {
                    return Ok(());
                }
                let size = st.st_size.max(0) as u64;
                if self.layer {
                    self.xattr_records(&fd, &shown_name)?;
                }
                let mut header = header_for(&st, EntryType::Regular, size);
                let data = ExactReader::new(std::fs::File::from(fd), size);
                self.builder
                    .append_data(&mut header, name_path, data)
                    .map_err(fail)?;
                self.entries += 1;
                Ok(())
            }
            FileKind::Symlink => {
                let target = nix::fcntl::readlinkat(dir.as_fd(), name)
                    .map_err(|e| errno_error(e, &shown_name))?;
                let mut header = header_for(st, EntryType::Symlink, 0);
                self.builder
                    .append_link(&mut header, name_path, target)
                    .map_err(fail)?;
                self.entries += 1;
                Ok(())
            }
            FileKind::Fifo | FileKind::CharDevice | FileKind::BlockDevice => {
                let kind = match kind_of(st) {
                    FileKind::Fifo => EntryType::Fifo,
                    FileKind::CharDevice => EntryType::Char,
                    _ => EntryType::Block,
                };
                let mut header = header_for(st, kind, 0);
                let (major, minor) = (libc::major(st.st_rdev), libc::minor(st.st_rdev));
                let _ = header.set_device_major(major);
                let _ = header.set_device_minor(minor);
                self.builder
                    .append_data(&mut header, name_path, std::io::empty())
                    .map_err(fail)?;
                self.entries += 1;
                Ok(())
            }
            // A tar archive cannot hold a socket.
            FileKind::Socket => Ok(()),
        }
    }

    /// The extended attributes of the open file `fd` an image layer may
    /// carry, as PAX `SCHILY.xattr.NAME` records for the entry that follows
    /// (how cove-template's extractor, like Docker's, reads them back).
    fn xattr_records(&mut self, fd: &OwnedFd, shown: &str) -> Result<(), FsError> {
        let records: Vec<(String, Vec<u8>)> = layer_xattrs(fd)
            .into_iter()
            .map(|(name, value)| (format!("SCHILY.xattr.{name}"), value))
            .collect();
        self.builder
            .append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(|e| tar_error(e, shown))
    }

    /// An empty regular file named `name`: a whiteout marker.
    fn marker(&mut self, st: &FileStat, name: &[u8], shown: &str) -> Result<(), FsError> {
        let mut header = header_for(st, EntryType::Regular, 0);
        header.set_mode(0o644);
        self.builder
            .append_data(&mut header, OsStr::from_bytes(name), std::io::empty())
            .map_err(|e| tar_error(e, shown))?;
        self.entries += 1;
        Ok(())
    }

    fn add_children(&mut self, dir: &OwnedFd, prefix: &[u8], depth: u32) -> Result<(), FsError> {
        let shown_prefix = String::from_utf8_lossy(prefix).into_owned();
        let mut names = read_names(dir).map_err(|e| errno_error(e, &shown_prefix))?;
        names.sort();
        for name in names {
            let Ok(st) =
                nix::sys::stat::fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
            else {
                continue;
            };
            let mut child = prefix.to_vec();
            if !child.is_empty() {
                child.push(b'/');
            }
            child.extend_from_slice(name.as_bytes());
            self.add(dir, &name, &child, &st, depth)?;
        }
        Ok(())
    }
}

/// Extended attributes a layer carries: what a program in the sandbox can
/// set and means as part of the file (`user.*`, file capabilities), the
/// rule cove-template applies when it unpacks a layer. overlayfs' own
/// `trusted.overlay.*` markers become whiteout entries instead.
fn carried_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

/// The carried extended attributes of the open file `fd`, by name. Names
/// that are not UTF-8 (a PAX key must be) and values that change while
/// they are read are left out.
fn layer_xattrs(fd: &OwnedFd) -> Vec<(String, Vec<u8>)> {
    let raw = fd.as_raw_fd();
    // SAFETY: a size query: flistxattr writes nothing with a null buffer.
    let len = unsafe { libc::flistxattr(raw, std::ptr::null_mut(), 0) };
    if len <= 0 {
        return Vec::new();
    }
    let mut names = vec![0u8; len as usize];
    // SAFETY: flistxattr writes at most `names.len()` bytes into `names`.
    let len = unsafe { libc::flistxattr(raw, names.as_mut_ptr().cast(), names.len()) };
    if len <= 0 {
        return Vec::new();
    }
    names.truncate(len as usize);
    let mut found = Vec::new();
    for name in names.split(|&b| b == 0).filter(|n| carried_xattr(n)) {
        let (Ok(text), Ok(cname)) = (std::str::from_utf8(name), CString::new(name)) else {
            continue;
        };
        // SAFETY: a size query, as above.
        let size = unsafe { libc::fgetxattr(raw, cname.as_ptr(), std::ptr::null_mut(), 0) };
        if size < 0 {
            continue;
        }
        let mut value = vec![0u8; size as usize];
        // SAFETY: fgetxattr writes at most `value.len()` bytes into `value`.
        let got =
            unsafe { libc::fgetxattr(raw, cname.as_ptr(), value.as_mut_ptr().cast(), value.len()) };
        if got != size {
            continue;
        }
        found.push((text.to_string(), value));
    }
    found
}

/// Whether the directory open as `dir` is an opaque overlay directory.
fn is_opaque(dir: &OwnedFd) -> bool {
    let mut value = [0u8; 4];
    // SAFETY: fgetxattr writes at most `value.len()` bytes into `value`.
    let n = unsafe {
        libc::fgetxattr(
            dir.as_raw_fd(),
            OPAQUE_XATTR.as_ptr(),
            value.as_mut_ptr().cast(),
            value.len(),
        )
    };
    n == 1 && value[0] == b'y'
}

/// Archive the whole of `root`, a writable layer, as an image layer.
pub(crate) fn pack_layer(root: &Root, ctx: &Ctx) -> Result<FsDone, FsError> {
    pack_with(root, ctx, "/", true)
}

/// Stream a tar archive of `path`. Entries are named from the path's last
/// component (`out.txt`, `dir/`, `dir/a`); for `/`, from its children.
pub(crate) fn pack(root: &Root, ctx: &Ctx, path: &str) -> Result<FsDone, FsError> {
    pack_with(root, ctx, path, false)
}

fn pack_with(root: &Root, ctx: &Ctx, path: &str, layer: bool) -> Result<FsDone, FsError> {
    let abs = root.absolute(path)?;
    let is_root = abs.trim_matches('/').is_empty();
    let (dir, name, st) = if is_root {
        let dir = root.open_at("/", OFlag::O_RDONLY | OFlag::O_DIRECTORY, 0)?;
        let st = nix::sys::stat::fstat(&dir).map_err(|e| errno_error(e, &abs))?;
        (dir, CString::default(), st)
    } else {
        let (dir, name) = root.parent(&abs)?;
        let st =
            nix::sys::stat::fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .map_err(|e| errno_error(e, &abs))?;
        (dir, name, st)
    };
    if on_procfs(&dir) {
        return Err(FsError::new(
            FsErrorKind::PermissionDenied,
            format!("{} is in /proc, which cannot be archived", shown(&abs)),
        ));
    }
    ctx.send(FsReply::Ready {
        entry: Some(entry(abs.clone(), base_name(&abs), &st, None)),
    })?;
    let mut packer = Packer {
        builder: tar::Builder::new(DownloadWriter::new(ctx)),
        ctx,
        links: HashMap::new(),
        dev: st.st_dev,
        entries: 0,
        layer,
    };
    if is_root {
        packer.add_children(&dir, b"", 1)?;
    } else {
        let archive_name = name.as_bytes().to_vec();
        packer.add(&dir, &name, &archive_name, &st, 1)?;
    }
    let entries = packer.entries;
    let mut sink = packer
        .builder
        .into_inner()
        .map_err(|e| tar_error(e, "finishing the archive"))?;
    std::io::Write::flush(&mut sink).map_err(|e| tar_error(e, "sending the archive"))?;
    Ok(FsDone::Transferred {
        bytes: sink.total,
        entries,
    })
}

// ----------------------------------------------------------------- in ----

/// An entry's name, checked: relative, no `..`, without `.` and empty parts.
fn clean_name(raw: &[u8], what: &str) -> Result<Vec<Vec<u8>>, FsError> {
    let shown_raw = String::from_utf8_lossy(raw);
    if raw.first() == Some(&b'/') {
        return Err(FsError::new(
            FsErrorKind::Escape,
            format!("archive {what} {shown_raw:?} is an absolute path; entries must be relative"),
        ));
    }
    if raw.len() > PATH_MAX {
        return Err(invalid(format!(
            "archive {what} is {} bytes long; the limit is {PATH_MAX}",
            raw.len()
        )));
    }
    let mut parts = Vec::new();
    for part in raw.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(FsError::new(
                    FsErrorKind::Escape,
                    format!(
                        "archive {what} {shown_raw:?} contains `..` and would leave the destination"
                    ),
                ));
            }
            _ => parts.push(part.to_vec()),
        }
    }
    Ok(parts)
}

fn joined(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.join(&b'/')
}

/// What an extraction has done so far, to commit or to undo.
struct Unpacker {
    dest: OwnedFd,
    dest_path: String,
    owner: Owner,
    /// Files, links and symlinks waiting under temporary names:
    /// final relative name → (parent relative name, temporary name).
    pending: Vec<(Vec<u8>, Vec<u8>, CString)>,
    pending_index: HashMap<Vec<u8>, usize>,
    /// Symlinks this archive will create: nothing may be written below them.
    symlinks: HashSet<Vec<u8>>,
    /// Directories this archive created (relative), in creation order.
    created_dirs: Vec<Vec<u8>>,
    /// Mode and mtime for directory entries, applied at commit.
    dir_meta: Vec<(Vec<u8>, u32, u64)>,
    /// The last parent looked up, as entries of one directory come together.
    cached_parent: Option<(Vec<u8>, OwnedFd)>,
}

/// An entry [`Unpacker::commit`] renamed into place, and how to undo it.
struct Placed {
    dir: OwnedFd,
    name: CString,
    /// Where the replaced file waits (after an exchange).
    temp: CString,
    undo: Undo,
}

enum Undo {
    /// Nothing was there: remove the entry again.
    Remove,
    /// An existing entry was exchanged with the new one: swap them back.
    SwapBack,
    /// An existing entry was replaced for good (the file system cannot
    /// exchange names).
    Keep,
}

impl Placed {
    fn undo(self) {
        let at = |name: &CStr| {
            let _ = nix::unistd::unlinkat(self.dir.as_fd(), name, UnlinkatFlags::NoRemoveDir);
        };
        match self.undo {
            Undo::Remove => at(&self.name),
            Undo::SwapBack => {
                if nix::fcntl::renameat2(
                    self.dir.as_fd(),
                    self.temp.as_c_str(),
                    self.dir.as_fd(),
                    self.name.as_c_str(),
                    RenameFlags::RENAME_EXCHANGE,
                )
                .is_ok()
                {
                    at(&self.temp);
                }
            }
            Undo::Keep => {}
        }
    }

    /// The archive is in place: drop the file it replaced.
    fn finish(self) {
        if let Undo::SwapBack = self.undo {
            let _ = nix::unistd::unlinkat(
                self.dir.as_fd(),
                self.temp.as_c_str(),
                UnlinkatFlags::NoRemoveDir,
            );
        }
    }
}

/// A relative name for openat2: `.` for the destination itself.
fn dot(rel: &[u8]) -> &[u8] {
    if rel.is_empty() { b"." } else { rel }
}

impl Unpacker {
    fn shown(&self, rel: &[u8]) -> String {
        path::join(&self.dest_path, &String::from_utf8_lossy(rel))
    }

    /// The directory `parts` (relative to the destination), created if
    /// missing, never through a symlink.
    fn parent_dir(&mut self, parts: &[Vec<u8>], entry_name: &str) -> Result<OwnedFd, FsError> {
        let rel = joined(parts);
        if let Some((cached, fd)) = &self.cached_parent
            && *cached == rel
        {
            return fd.try_clone().map_err(|e| path::io_error(&e, entry_name));
        }
        let mut dir = self
            .dest
            .try_clone()
            .map_err(|e| path::io_error(&e, entry_name))?;
        let mut so_far: Vec<u8> = Vec::new();
        for part in parts {
            if !so_far.is_empty() {
                so_far.push(b'/');
            }
            so_far.extend_from_slice(part);
            if self.symlinks.contains(&so_far) {
                return Err(self.through_symlink(entry_name, &so_far));
            }
            if self.pending_index.contains_key(&so_far) {
                return Err(FsError::new(
                    FsErrorKind::NotADirectory,
                    format!(
                        "archive entry {entry_name:?} needs {} to be a directory, but an earlier entry of the archive is a file there",
                        self.shown(&so_far)
                    ),
                ));
            }
            let name = path::cstring(part)?;
            let next = match path::resolve_beneath(&dir, part, OFlag::O_PATH | OFlag::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(Errno::ENOENT) => {
                    match nix::sys::stat::mkdirat(
                        dir.as_fd(),
                        name.as_c_str(),
                        Mode::from_bits_truncate(0o755),
                    ) {
                        Ok(()) => {
                            self.created_dirs.push(so_far.clone());
                            if let Some((uid, gid)) = self.owner {
                                let _ = nix::unistd::fchownat(
                                    dir.as_fd(),
                                    name.as_c_str(),
                                    Some(nix::unistd::Uid::from_raw(uid)),
                                    Some(nix::unistd::Gid::from_raw(gid)),
                                    AtFlags::AT_SYMLINK_NOFOLLOW,
                                );
                            }
                        }
                        Err(Errno::EEXIST) => {}
                        Err(e) => return Err(errno_error(e, &self.shown(&so_far))),
                    }
                    path::resolve_beneath(&dir, part, OFlag::O_PATH | OFlag::O_DIRECTORY)
                        .map_err(|e| self.entry_errno(e, entry_name, &so_far))?
                }
                Err(e) => return Err(self.entry_errno(e, entry_name, &so_far)),
            };
            dir = next;
        }
        self.cached_parent = Some((
            rel,
            dir.try_clone()
                .map_err(|e| path::io_error(&e, entry_name))?,
        ));
        Ok(dir)
    }

    fn through_symlink(&self, entry_name: &str, link: &[u8]) -> FsError {
        FsError::new(
            FsErrorKind::Escape,
            format!(
                "archive entry {entry_name:?} would be written through the symlink {}",
                self.shown(link)
            ),
        )
    }

    fn entry_errno(&self, errno: Errno, entry_name: &str, at: &[u8]) -> FsError {
        match errno {
            Errno::ELOOP | Errno::EXDEV => self.through_symlink(entry_name, at),
            Errno::ENOTDIR => FsError::new(
                FsErrorKind::NotADirectory,
                format!(
                    "archive entry {entry_name:?} needs {} to be a directory, but it is not",
                    self.shown(at)
                ),
            ),
            other => errno_error(other, &self.shown(at)),
        }
    }

    /// Forget an earlier entry of the same name (the later one wins).
    fn supersede(&mut self, rel: &[u8]) {
        if let Some(i) = self.pending_index.remove(rel) {
            let (_, parent, temp) = &self.pending[i];
            if let Ok(dir) =
                path::resolve_beneath(&self.dest, dot(parent), OFlag::O_PATH | OFlag::O_DIRECTORY)
            {
                let _ =
                    nix::unistd::unlinkat(dir.as_fd(), temp.as_c_str(), UnlinkatFlags::NoRemoveDir);
            }
            self.pending[i].2 = CString::default();
        }
        self.symlinks.remove(rel);
    }

    fn add_pending(&mut self, rel: Vec<u8>, parent: Vec<u8>, temp: CString) {
        self.pending_index.insert(rel.clone(), self.pending.len());
        self.pending.push((rel, parent, temp));
    }

    fn unpack_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<u64, FsError> {
        let raw = entry.path_bytes().into_owned();
        let entry_name = String::from_utf8_lossy(&raw).into_owned();
        let kind = entry.header().entry_type();
        if matches!(
            kind,
            EntryType::XGlobalHeader
                | EntryType::XHeader
                | EntryType::GNULongName
                | EntryType::GNULongLink
        ) {
            return Ok(0);
        }
        let parts = clean_name(&raw, "entry")?;
        let Some((last, parent_parts)) = parts.split_last() else {
            // The destination itself ("./").
            return Ok(0);
        };
        let rel = joined(&parts);
        let parent_rel = joined(parent_parts);
        let parent = self.parent_dir(parent_parts, &entry_name)?;
        let name = path::cstring(last)?;
        let target_shown = self.shown(&rel);
        let existing = match nix::sys::stat::fstatat(
            parent.as_fd(),
            name.as_c_str(),
            AtFlags::AT_SYMLINK_NOFOLLOW,
        ) {
            Ok(st) => Some(kind_of(&st)),
            Err(Errno::ENOENT) => None,
            Err(e) => return Err(errno_error(e, &target_shown)),
        };
        let mode = entry.header().mode().unwrap_or(0o644) & 0o7777;
        let mtime = entry
            .header()
            .mtime()
            .ok()
            .map(|t| t.min(i64::MAX as u64) as i64);
        if kind == EntryType::Directory {
            self.supersede(&rel);
            match existing {
                Some(FileKind::Dir) => {}
                None => {
                    self.parent_dir(&parts, &entry_name)?;
                }
                Some(_) => {
                    return Err(FsError::new(
                        FsErrorKind::Exists,
                        format!(
                            "archive entry {entry_name:?} is a directory, but {target_shown} exists and is not one"
                        ),
                    ));
                }
            }
            self.dir_meta
                .push((rel, mode, mtime.unwrap_or(0).max(0) as u64));
            return Ok(0);
        }
        if existing == Some(FileKind::Dir) {
            return Err(FsError::new(
                FsErrorKind::IsADirectory,
                format!(
                    "archive entry {entry_name:?} is not a directory, but {target_shown} is one"
                ),
            ));
        }
        self.supersede(&rel);
        let mut bytes = 0;
        let temp = match kind {
            EntryType::Regular | EntryType::Continuous => {
                let parent_fd = parent
                    .try_clone()
                    .map_err(|e| path::io_error(&e, &target_shown))?;
                let mut staged = Staged::create(parent_fd, 0o600, &target_shown)?;
                bytes = ops::copy(entry, &mut staged.file, &target_shown)?;
                staged.finish_metadata(mode, self.owner, mtime, &target_shown)?;
                staged.keep()
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                if target.is_empty() {
                    return Err(invalid(format!(
                        "archive entry {entry_name:?} is a symlink without a target"
                    )));
                }
                let target = path::cstring(&target)?;
                let temp = ops::temp_name();
                nix::unistd::symlinkat(target.as_c_str(), parent.as_fd(), temp.as_c_str())
                    .map_err(|e| errno_error(e, &target_shown))?;
                if let Some((uid, gid)) = self.owner {
                    let _ = nix::unistd::fchownat(
                        parent.as_fd(),
                        temp.as_c_str(),
                        Some(nix::unistd::Uid::from_raw(uid)),
                        Some(nix::unistd::Gid::from_raw(gid)),
                        AtFlags::AT_SYMLINK_NOFOLLOW,
                    );
                }
                self.symlinks.insert(rel.clone());
                temp
            }
            EntryType::Link => {
                let target_raw = entry
                    .link_name_bytes()
                    .map(|t| t.into_owned())
                    .unwrap_or_default();
                let target_parts =
                    clean_name(&target_raw, &format!("entry {entry_name:?} links to"))?;
                let Some((target_last, target_parent)) = target_parts.split_last() else {
                    return Err(invalid(format!(
                        "archive entry {entry_name:?} links to nothing"
                    )));
                };
                let target_rel = joined(&target_parts);
                // Linking to a file of this archive: its temporary name.
                let (link_dir, link_name) = match self.pending_index.get(&target_rel) {
                    Some(&i) => {
                        let (_, p, t) = &self.pending[i];
                        let dir = path::resolve_beneath(
                            &self.dest,
                            dot(p),
                            OFlag::O_PATH | OFlag::O_DIRECTORY,
                        )
                        .map_err(|e| self.entry_errno(e, &entry_name, p))?;
                        (dir, t.clone())
                    }
                    None => {
                        for i in 1..=target_parts.len() {
                            if self.symlinks.contains(&joined(&target_parts[..i])) {
                                return Err(
                                    self.through_symlink(&entry_name, &joined(&target_parts[..i]))
                                );
                            }
                        }
                        let tp = joined(target_parent);
                        let dir = path::resolve_beneath(
                            &self.dest,
                            dot(&tp),
                            OFlag::O_PATH | OFlag::O_DIRECTORY,
                        )
                        .map_err(|e| self.entry_errno(e, &entry_name, &tp))?;
                        (dir, path::cstring(target_last)?)
                    }
                };
                let temp = ops::temp_name();
                nix::unistd::linkat(
                    link_dir.as_fd(),
                    link_name.as_c_str(),
                    parent.as_fd(),
                    temp.as_c_str(),
                    AtFlags::empty(),
                )
                .map_err(|e| match e {
                    Errno::ENOENT => FsError::new(
                        FsErrorKind::NotFound,
                        format!(
                            "archive entry {entry_name:?} is a hard link to {:?}, which does not exist",
                            String::from_utf8_lossy(&target_raw)
                        ),
                    ),
                    other => errno_error(other, &target_shown),
                })?;
                temp
            }
            EntryType::Fifo => {
                let temp = ops::temp_name();
                nix::sys::stat::mknodat(
                    parent.as_fd(),
                    temp.as_c_str(),
                    SFlag::S_IFIFO,
                    Mode::from_bits_truncate(mode & 0o777),
                    0,
                )
                .map_err(|e| errno_error(e, &target_shown))?;
                temp
            }
            EntryType::Char | EntryType::Block => {
                return Err(FsError::new(
                    FsErrorKind::PermissionDenied,
                    format!(
                        "archive entry {entry_name:?} is a device; devices cannot be created in a sandbox"
                    ),
                ));
            }
            other => {
                return Err(invalid(format!(
                    "archive entry {entry_name:?} has a type this agent does not extract ({other:?})"
                )));
            }
        };
        self.add_pending(rel, parent_rel, temp);
        Ok(bytes)
    }

    /// Put everything in place: rename the pending entries, then give the
    /// directories their modes and times (deepest first, after their
    /// contents changed). If one entry cannot be put in place, those
    /// already renamed are undone (a replaced file is swapped back) and the
    /// rest stay pending, for [`Unpacker::roll_back`].
    fn commit(&mut self) -> Result<(), FsError> {
        let pending = std::mem::take(&mut self.pending);
        self.pending_index.clear();
        let mut placed = Vec::new();
        for (i, (rel, parent, temp)) in pending.iter().enumerate() {
            if temp.is_empty() {
                continue;
            }
            match self.place(rel, parent, temp) {
                Ok(done) => placed.push(done),
                Err(err) => {
                    for done in placed.into_iter().rev() {
                        done.undo();
                    }
                    self.pending = pending[i..].to_vec();
                    return Err(err);
                }
            }
        }
        for done in placed {
            done.finish();
        }
        for (rel, mode, mtime) in self.dir_meta.iter().rev() {
            let Ok(dir) =
                path::resolve_beneath(&self.dest, rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            else {
                continue;
            };
            let _ = nix::sys::stat::fchmod(&dir, Mode::from_bits_truncate(*mode));
            let t = nix::sys::time::TimeSpec::new(*mtime as i64, 0);
            let _ = nix::sys::stat::futimens(&dir, &t, &t);
        }
        Ok(())
    }

    /// Rename one pending entry into place, in a way that can be undone:
    /// a new name is created without replacing anything, an existing one
    /// is exchanged with the temporary name (its old file kept there until
    /// the whole archive is in place).
    fn place(&self, rel: &[u8], parent: &[u8], temp: &CStr) -> Result<Placed, FsError> {
        let shown = self.shown(rel);
        let base = rel.rsplit(|b| *b == b'/').next().unwrap_or_default();
        let name = path::cstring(base)?;
        let dir =
            path::resolve_beneath(&self.dest, dot(parent), OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(|e| errno_error(e, &self.shown(parent)))?;
        let rename =
            |flags| nix::fcntl::renameat2(dir.as_fd(), temp, dir.as_fd(), name.as_c_str(), flags);
        let existing = || {
            nix::sys::stat::fstatat(dir.as_fd(), name.as_c_str(), AtFlags::AT_SYMLINK_NOFOLLOW)
                .ok()
                .map(|st| kind_of(&st))
        };
        let undo = match rename(RenameFlags::RENAME_NOREPLACE) {
            Ok(()) => Undo::Remove,
            Err(Errno::EEXIST) => {
                if existing() == Some(FileKind::Dir) {
                    return Err(FsError::new(
                        FsErrorKind::IsADirectory,
                        format!(
                            "archive entry {:?} is not a directory, but {shown} is one",
                            String::from_utf8_lossy(rel)
                        ),
                    ));
                }
                match rename(RenameFlags::RENAME_EXCHANGE) {
                    Ok(()) => Undo::SwapBack,
                    // A file system that cannot exchange: replace for good.
                    Err(Errno::EINVAL) => {
                        rename(RenameFlags::empty()).map_err(|e| errno_error(e, &shown))?;
                        Undo::Keep
                    }
                    Err(e) => return Err(errno_error(e, &shown)),
                }
            }
            // A file system without RENAME_NOREPLACE.
            Err(Errno::EINVAL) => {
                let undo = if existing().is_some() {
                    Undo::Keep
                } else {
                    Undo::Remove
                };
                rename(RenameFlags::empty()).map_err(|e| errno_error(e, &shown))?;
                undo
            }
            Err(e) => return Err(errno_error(e, &shown)),
        };
        Ok(Placed {
            dir,
            name,
            temp: temp.to_owned(),
            undo,
        })
    }

    /// Undo: remove every temporary file and the directories this archive
    /// created (if they are empty again).
    fn roll_back(&mut self) {
        for (_, parent, temp) in std::mem::take(&mut self.pending) {
            if temp.is_empty() {
                continue;
            }
            if let Ok(dir) =
                path::resolve_beneath(&self.dest, dot(&parent), OFlag::O_PATH | OFlag::O_DIRECTORY)
            {
                let _ =
                    nix::unistd::unlinkat(dir.as_fd(), temp.as_c_str(), UnlinkatFlags::NoRemoveDir);
            }
        }
        self.cached_parent = None;
        for rel in self.created_dirs.iter().rev() {
            let (parent, name) = match rel.iter().rposition(|b| *b == b'/') {
                Some(i) => (&rel[..i], &rel[i + 1..]),
                None => (&b""[..], &rel[..]),
            };
            if let (Ok(dir), Ok(name)) = (
                path::resolve_beneath(&self.dest, dot(parent), OFlag::O_PATH | OFlag::O_DIRECTORY),
                path::cstring(name),
            ) {
                let _ =
                    nix::unistd::unlinkat(dir.as_fd(), name.as_c_str(), UnlinkatFlags::RemoveDir);
            }
        }
    }
}

/// Extract the uploaded tar archive into directory `path`.
pub(crate) fn unpack(root: &Root, ctx: &Ctx, path: &str, owner: Owner) -> Result<FsDone, FsError> {
    let abs = root.absolute(path)?;
    // The directories made for the destination go again if the archive
    // is refused.
    let made = ops::make_dirs(root, &abs, 0o755, owner)?;
    let dest = match root
        .open_at(&abs, OFlag::O_PATH | OFlag::O_DIRECTORY, 0)
        .and_then(|dest| ctx.send(FsReply::Ready { entry: None }).map(|()| dest))
    {
        Ok(dest) => dest,
        Err(err) => {
            ops::unmake_dirs(made);
            return Err(err);
        }
    };
    let mut reader = UploadReader::new(ctx);
    let mut unpacker = Unpacker {
        dest,
        dest_path: abs,
        owner,
        pending: Vec::new(),
        pending_index: HashMap::new(),
        symlinks: HashSet::new(),
        created_dirs: Vec::new(),
        dir_meta: Vec::new(),
        cached_parent: None,
    };
    let result = (|| -> Result<(u64, u64), FsError> {
        let mut archive = tar::Archive::new(&mut reader);
        let mut count = 0u64;
        let mut bytes = 0u64;
        let entries = archive.entries().map_err(|e| malformed(ctx, e))?;
        for item in entries {
            ctx.check()?;
            let mut item = item.map_err(|e| malformed(ctx, e))?;
            count += 1;
            if count > MAX_ENTRIES {
                return Err(invalid(format!(
                    "the archive has more than {MAX_ENTRIES} entries"
                )));
            }
            bytes += unpacker.unpack_entry(&mut item)?;
        }
        Ok((count, bytes))
    })();
    // Whatever follows the archive's end marker is read and dropped, so
    // the host's upload completes.
    let result = result.and_then(|counts| reader.drain().map(|()| counts));
    match result.and_then(|counts| unpacker.commit().map(|()| counts)) {
        Ok((entries, bytes)) => Ok(FsDone::Transferred { bytes, entries }),
        Err(err) => {
            unpacker.roll_back();
            ops::unmake_dirs(made);
            Err(err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_names_are_checked() {
        assert_eq!(
            clean_name(b"a/./b//c", "entry").unwrap(),
            vec![b"a".to_vec(), b"b".to_vec(), b"c".to_vec()]
        );
        assert!(clean_name(b"./", "entry").unwrap().is_empty());
        assert_eq!(
            clean_name(b"../x", "entry").unwrap_err().kind,
            FsErrorKind::Escape
        );
        assert_eq!(
            clean_name(b"a/../../x", "entry").unwrap_err().kind,
            FsErrorKind::Escape
        );
        assert_eq!(
            clean_name(b"/etc/passwd", "entry").unwrap_err().kind,
            FsErrorKind::Escape
        );
    }
}
