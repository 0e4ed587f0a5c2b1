//! Small filesystem operations shared by tar extraction and tree copies:
//! ownership, modes, times and extended attributes set without following
//! symlinks, and overlay whiteouts.

use std::ffi::OsStr;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::sys::stat::{Mode, SFlag, UtimensatFlags, makedev, mknod, utimensat};
use nix::sys::time::TimeSpec;

/// The xattr overlayfs reads to treat a lower directory as opaque.
pub const OPAQUE_XATTR: &str = "trusted.overlay.opaque";

/// What a file's metadata should be.
#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Permission bits, including setuid/setgid/sticky.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: i64,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Extended attributes an image may carry into a layer. `trusted.*`
/// (overlayfs' own) and `security.*` labels other than file capabilities
/// are dropped: they would change how the overlay or the host treats the
/// file, not what the file is.
pub fn allowed_xattr(name: &[u8]) -> bool {
    name.starts_with(b"user.") || name == b"security.capability"
}

/// Set owner, mode and xattrs of `path` (not following a symlink there).
/// Times are set separately ([`set_mtime`]): a directory's change as its
/// children are created.
pub fn apply(path: &Path, meta: &Meta, is_symlink: bool) -> io::Result<()> {
    std::os::unix::fs::lchown(path, Some(meta.uid), Some(meta.gid))?;
    if !is_symlink {
        // After chown, which clears setuid/setgid.
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(meta.mode & 0o7777))?;
    }
    for (name, value) in &meta.xattrs {
        match xattr::set(path, OsStr::from_bytes(name), value) {
            Ok(()) => {}
            // Symlinks take no user.* attributes; some filesystems none at all.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOTSUP))
                    && is_symlink => {}
            Err(e) => {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "setting xattr {} on {}: {e}",
                        String::from_utf8_lossy(name),
                        path.display()
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Set a path's modification (and access) time without following symlinks.
pub fn set_mtime(path: &Path, sec: i64, nsec: i64) -> io::Result<()> {
    let t = TimeSpec::new(sec, nsec.clamp(0, 999_999_999));
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

/// An overlayfs whiteout: a character device 0/0 that hides the same name
/// in lower layers.
pub fn make_whiteout(path: &Path) -> io::Result<()> {
    mknod(path, SFlag::S_IFCHR, Mode::empty(), makedev(0, 0)).map_err(io::Error::from)
}

pub fn is_whiteout(meta: &fs::Metadata) -> bool {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    meta.file_type().is_char_device() && meta.rdev() == 0
}

/// Make a FIFO.
pub fn make_fifo(path: &Path, mode: u32) -> io::Result<()> {
    mknod(
        path,
        SFlag::S_IFIFO,
        Mode::from_bits_truncate(mode & 0o777),
        0,
    )
    .map_err(io::Error::from)
}

/// Remove whatever is at `path` (a directory with its contents).
pub fn remove_any(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// The xattrs of `path` (not following symlinks), filtered by `keep`.
pub fn read_xattrs(
    path: &Path,
    keep: impl Fn(&[u8]) -> bool,
) -> io::Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let mut out = Vec::new();
    let names = match xattr::list(path) {
        Ok(names) => names,
        Err(e) if e.raw_os_error() == Some(libc::ENOTSUP) => return Ok(out),
        Err(e) => return Err(e),
    };
    for name in names {
        let bytes = name.as_bytes();
        if !keep(bytes) {
            continue;
        }
        if let Some(value) = xattr::get(path, &name)? {
            out.push((bytes.to_vec(), value));
        }
    }
    out.sort();
    Ok(out)
}
