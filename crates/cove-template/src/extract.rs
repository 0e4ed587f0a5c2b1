//! Unpacking one layer (an uncompressed tar stream) into a fresh layer
//! directory, in overlayfs' format, refusing anything that would write
//! outside it.
//!
//! Image layers say "delete X" with a `.wh.X` file and "hide everything
//! below in this directory" with `.wh..wh..opq`. The layers are stacked as
//! separate overlay lower directories (not flattened into one tree, so that
//! images and snapshots share them), so each marker becomes what overlayfs
//! itself reads: a 0/0 character device named X, and the
//! `trusted.overlay.opaque=y` xattr on the directory.
//!
//! Safety: entry names are relative paths without `..`; an entry whose
//! parent path goes through a symlink is refused (tar never produces one
//! from a real tree; it is how an archive writes through a link it planted
//! to a place outside the layer); hard links must point at a file of the
//! same layer. Symlinks themselves may point anywhere: they are resolved
//! inside the sandbox's root, never by cove. Device nodes are skipped
//! (sandboxes get their own /dev and the overlay is mounted `nodev`).

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use tar::EntryType;

use crate::fsutil::{self, Meta, OPAQUE_XATTR};

/// What one extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExtractStats {
    pub bytes: u64,
    pub entries: u64,
    pub whiteouts: u64,
    pub skipped_devices: u64,
    pub dropped_xattrs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExtractError {
    /// The archive asks for something cove refuses.
    #[error("tar entry {entry:?} {problem}")]
    Refused { entry: String, problem: String },
    /// The archive cannot be read: corrupt or truncated.
    #[error("{0}")]
    Corrupt(String),
    /// Writing the layer failed (a host problem, e.g. a full disk).
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
}

fn refused(entry: &Path, problem: impl Into<String>) -> ExtractError {
    ExtractError::Refused {
        entry: entry.display().to_string(),
        problem: problem.into(),
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> ExtractError + '_ {
    move |source| ExtractError::Write {
        path: path.to_path_buf(),
        source,
    }
}

/// An entry name as a relative path inside the layer, or `None` for the
/// layer's root itself.
pub fn clean_path(raw: &[u8]) -> Result<Option<PathBuf>, String> {
    if raw.starts_with(b"/") {
        return Err("is an absolute path".into());
    }
    let mut out = PathBuf::new();
    for component in Path::new(OsStr::from_bytes(raw)).components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => return Err("has a `..` component".into()),
            Component::RootDir | Component::Prefix(_) => {
                return Err("is an absolute path".into());
            }
        }
    }
    Ok((!out.as_os_str().is_empty()).then_some(out))
}

/// Remembers the last 512 bytes read: a complete tar ends with a zero block.
struct Tail<R> {
    inner: R,
    last: Vec<u8>,
}

impl<R: Read> Read for Tail<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n >= 512 {
            self.last.clear();
            self.last.extend_from_slice(&buf[n - 512..n]);
        } else {
            self.last.extend_from_slice(&buf[..n]);
            let excess = self.last.len().saturating_sub(512);
            self.last.drain(..excess);
        }
        Ok(n)
    }
}

struct Extractor<'a> {
    root: &'a Path,
    /// Relative paths known to be real directories of this layer.
    dirs: HashSet<PathBuf>,
    /// Directories whose times are set at the end (children change them).
    dir_times: Vec<(PathBuf, i64)>,
    stats: ExtractStats,
}

/// Unpack `input` into `root` (an empty directory).
pub fn extract(input: impl Read, root: &Path) -> Result<ExtractStats, ExtractError> {
    let mut tail = Tail {
        inner: input,
        last: Vec::with_capacity(512),
    };
    let mut ex = Extractor {
        root,
        dirs: HashSet::new(),
        dir_times: Vec::new(),
        stats: ExtractStats::default(),
    };
    {
        let mut archive = tar::Archive::new(&mut tail);
        let entries = archive
            .entries()
            .map_err(|e| ExtractError::Corrupt(format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry = entry
                .map_err(|e| ExtractError::Corrupt(format!("the tar stream is corrupt: {e}")))?;
            ex.entry(&mut entry)?;
        }
    }
    if tail.last.len() < 512 || tail.last.iter().any(|b| *b != 0) {
        return Err(ExtractError::Corrupt(
            "the tar stream ends without an end-of-archive marker: it is truncated".into(),
        ));
    }
    for (dir, mtime) in ex.dir_times.iter().rev() {
        let path = root.join(dir);
        fsutil::set_mtime(&path, *mtime, 0).map_err(write_err(&path))?;
    }
    Ok(ex.stats)
}

impl Extractor<'_> {
    fn entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>) -> Result<(), ExtractError> {
        let raw = entry.path_bytes().into_owned();
        let shown = PathBuf::from(OsStr::from_bytes(&raw));
        let kind = entry.header().entry_type();
        if matches!(kind, EntryType::XGlobalHeader | EntryType::XHeader) {
            return Ok(());
        }
        let rel = match clean_path(&raw) {
            Ok(Some(rel)) => rel,
            // "./": the layer's root; its metadata is cove's to choose.
            Ok(None) => return Ok(()),
            Err(problem) => return Err(refused(&shown, problem)),
        };
        self.stats.entries += 1;
        let meta = self.meta(entry, &shown)?;
        let name = rel
            .file_name()
            .map(|n| n.as_bytes().to_vec())
            .unwrap_or_default();

        if let Some(hidden) = name.strip_prefix(b".wh.") {
            let parent = self.parent(&rel, &shown)?;
            if hidden == b".wh..opq" {
                xattr::set(&parent, OPAQUE_XATTR, b"y").map_err(write_err(&parent))?;
            } else if !hidden.starts_with(b".wh.") && !hidden.is_empty() {
                let target = parent.join(OsStr::from_bytes(hidden));
                // A name this layer itself creates already hides the lower one.
                if fs::symlink_metadata(&target).is_err() {
                    fsutil::make_whiteout(&target).map_err(write_err(&target))?;
                    self.stats.whiteouts += 1;
                }
            }
            return Ok(());
        }

        let parent = self.parent(&rel, &shown)?;
        let path = parent.join(rel.file_name().unwrap_or_default());
        match kind {
            EntryType::Directory => {
                let existing = fs::symlink_metadata(&path).ok();
                let replaced_whiteout = existing.as_ref().is_some_and(fsutil::is_whiteout);
                if !existing.as_ref().is_some_and(|m| m.is_dir()) {
                    self.replace(&rel, &path)?;
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(&path)
                        .map_err(write_err(&path))?;
                }
                fsutil::apply(&path, &meta, false).map_err(write_err(&path))?;
                if replaced_whiteout {
                    // Deleted below and created again here: nothing of the
                    // lower directory may show through.
                    xattr::set(&path, OPAQUE_XATTR, b"y").map_err(write_err(&path))?;
                }
                self.dirs.insert(rel.clone());
                self.dir_times.push((rel, meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.replace(&rel, &path)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(write_err(&path))?;
                let expected = entry.size();
                let copied = io::copy(entry, &mut file).map_err(|e| {
                    ExtractError::Corrupt(format!(
                        "reading the contents of {}: {e}",
                        shown.display()
                    ))
                })?;
                if copied != expected {
                    return Err(ExtractError::Corrupt(format!(
                        "{} ends after {copied} of its {expected} bytes: the archive is truncated",
                        shown.display()
                    )));
                }
                drop(file);
                self.stats.bytes += copied;
                fsutil::apply(&path, &meta, false).map_err(write_err(&path))?;
                fsutil::set_mtime(&path, meta.mtime, 0).map_err(write_err(&path))?;
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&shown, "is a symlink without a target"))?
                    .into_owned();
                self.replace(&rel, &path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(write_err(&path))?;
                fsutil::apply(&path, &meta, true).map_err(write_err(&path))?;
                fsutil::set_mtime(&path, meta.mtime, 0).map_err(write_err(&path))?;
            }
            EntryType::Link => {
                let raw_target = entry
                    .link_name_bytes()
                    .ok_or_else(|| refused(&shown, "is a hard link without a target"))?
                    .into_owned();
                let target = match clean_path(&raw_target) {
                    Ok(Some(t)) => t,
                    Ok(None) => return Err(refused(&shown, "is a hard link to the root")),
                    Err(problem) => {
                        return Err(refused(
                            &shown,
                            format!(
                                "is a hard link whose target {:?} {problem}",
                                String::from_utf8_lossy(&raw_target)
                            ),
                        ));
                    }
                };
                let source = self.existing_file(&target, &shown)?;
                if target != rel {
                    self.replace(&rel, &path)?;
                    fs::hard_link(&source, &path).map_err(write_err(&path))?;
                }
            }
            EntryType::Fifo => {
                self.replace(&rel, &path)?;
                fsutil::make_fifo(&path, meta.mode).map_err(write_err(&path))?;
                fsutil::apply(&path, &meta, false).map_err(write_err(&path))?;
                fsutil::set_mtime(&path, meta.mtime, 0).map_err(write_err(&path))?;
            }
            EntryType::Char | EntryType::Block => self.stats.skipped_devices += 1,
            other => {
                return Err(refused(
                    &shown,
                    format!("has an entry type cove does not handle ({other:?})"),
                ));
            }
        }
        Ok(())
    }

    fn meta<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        shown: &Path,
    ) -> Result<Meta, ExtractError> {
        let header = entry.header();
        let bad = |what: &str, e: io::Error| refused(shown, format!("has a malformed {what}: {e}"));
        let mode = header.mode().map_err(|e| bad("mode", e))?;
        let uid = header.uid().map_err(|e| bad("uid", e))?;
        let gid = header.gid().map_err(|e| bad("gid", e))?;
        let mtime = header.mtime().map_err(|e| bad("mtime", e))?;
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(refused(shown, "has an owner beyond 32 bits"));
        };
        let mut xattrs = Vec::new();
        if let Some(extensions) = entry.pax_extensions().map_err(|e| {
            ExtractError::Corrupt(format!("{}: bad PAX header: {e}", shown.display()))
        })? {
            for ext in extensions {
                let ext = ext.map_err(|e| {
                    ExtractError::Corrupt(format!("{}: bad PAX header: {e}", shown.display()))
                })?;
                if let Some(name) = ext.key_bytes().strip_prefix(b"SCHILY.xattr.") {
                    if fsutil::allowed_xattr(name) {
                        xattrs.push((name.to_vec(), ext.value_bytes().to_vec()));
                    } else {
                        self.stats.dropped_xattrs += 1;
                    }
                }
            }
        }
        Ok(Meta {
            mode,
            uid,
            gid,
            mtime: i64::try_from(mtime).unwrap_or(0),
            mtime_nsec: 0,
            xattrs,
        })
    }

    /// The absolute parent directory of `rel`, created when missing (tar
    /// may omit directory entries), never reached through a symlink.
    fn parent(&mut self, rel: &Path, shown: &Path) -> Result<PathBuf, ExtractError> {
        let mut current = PathBuf::new();
        if let Some(parent) = rel.parent() {
            for component in parent.components() {
                current.push(component);
                if self.dirs.contains(&current) {
                    continue;
                }
                let abs = self.root.join(&current);
                match fs::symlink_metadata(&abs) {
                    Ok(m) if m.is_dir() => {}
                    Ok(m) if m.file_type().is_symlink() => {
                        return Err(refused(
                            shown,
                            format!(
                                "goes through the symlink {:?} planted earlier in the layer; \
                                 writing through it could land outside the layer",
                                current.display().to_string()
                            ),
                        ));
                    }
                    Ok(m) if fsutil::is_whiteout(&m) => {
                        fs::remove_file(&abs).map_err(write_err(&abs))?;
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&abs)
                            .map_err(write_err(&abs))?;
                        xattr::set(&abs, OPAQUE_XATTR, b"y").map_err(write_err(&abs))?;
                    }
                    Ok(_) => {
                        return Err(refused(
                            shown,
                            format!(
                                "is inside {:?}, which is not a directory",
                                current.display().to_string()
                            ),
                        ));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        fs::DirBuilder::new()
                            .mode(0o755)
                            .create(&abs)
                            .map_err(write_err(&abs))?;
                    }
                    Err(e) => return Err(write_err(&abs)(e)),
                }
                self.dirs.insert(current.clone());
            }
        }
        Ok(self.root.join(rel.parent().unwrap_or(Path::new(""))))
    }

    /// The absolute path of an existing non-directory of this layer that a
    /// hard link points at.
    fn existing_file(&mut self, target: &Path, shown: &Path) -> Result<PathBuf, ExtractError> {
        let mut current = PathBuf::new();
        if let Some(parent) = target.parent() {
            for component in parent.components() {
                current.push(component);
                if self.dirs.contains(&current) {
                    continue;
                }
                match fs::symlink_metadata(self.root.join(&current)) {
                    Ok(m) if m.is_dir() => {
                        self.dirs.insert(current.clone());
                    }
                    _ => {
                        return Err(refused(
                            shown,
                            format!(
                                "is a hard link to {:?}, which is not a file of this layer",
                                target.display().to_string()
                            ),
                        ));
                    }
                }
            }
        }
        let abs = self.root.join(target);
        match fs::symlink_metadata(&abs) {
            Ok(m) if !m.is_dir() && !fsutil::is_whiteout(&m) => Ok(abs),
            _ => Err(refused(
                shown,
                format!(
                    "is a hard link to {:?}, which is not a file of this layer",
                    target.display().to_string()
                ),
            )),
        }
    }

    /// Clear the way for a new entry at `path`.
    fn replace(&mut self, rel: &Path, path: &Path) -> Result<(), ExtractError> {
        if let Ok(m) = fs::symlink_metadata(path) {
            if m.is_dir() {
                self.dirs.retain(|d| !d.starts_with(rel));
                self.dir_times.retain(|(d, _)| !d.starts_with(rel));
            }
            fsutil::remove_any(path).map_err(write_err(path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn header(kind: EntryType, size: u64, mode: u32) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(mode);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h
    }

    /// A tar with raw names (the builder refuses `..`, so names are set by hand).
    fn tar(entries: &[(&str, EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data, link) in entries {
            let mut h = header(*kind, data.len() as u64, 0o644);
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
            if let Some(link) = link {
                let l = &mut h.as_old_mut().linkname;
                l.fill(0);
                l[..link.len()].copy_from_slice(link.as_bytes());
            }
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn paths_are_cleaned_or_refused() {
        assert_eq!(clean_path(b"./a/b/").unwrap(), Some(PathBuf::from("a/b")));
        assert_eq!(clean_path(b"./").unwrap(), None);
        assert!(clean_path(b"/etc/passwd").is_err());
        assert!(clean_path(b"a/../../b").is_err());
    }

    #[test]
    fn whiteouts_opaque_dirs_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let data = tar(&[
            ("etc/", EntryType::Directory, b"", None),
            ("etc/.wh.motd", EntryType::Regular, b"", None),
            ("var/.wh..wh..opq", EntryType::Regular, b"", None),
            ("bin/a", EntryType::Regular, b"hello", None),
            ("bin/b", EntryType::Link, b"", Some("bin/a")),
            ("bin/sh", EntryType::Symlink, b"", Some("/bin/busybox")),
            ("dev/null", EntryType::Char, b"", None),
        ]);
        let stats = extract(&data[..], dir.path()).unwrap();
        assert_eq!(
            (stats.bytes, stats.whiteouts, stats.skipped_devices),
            (5, 1, 1)
        );
        let motd = fs::symlink_metadata(dir.path().join("etc/motd")).unwrap();
        assert!(fsutil::is_whiteout(&motd));
        assert_eq!(
            xattr::get(dir.path().join("var"), OPAQUE_XATTR).unwrap(),
            Some(b"y".to_vec())
        );
        let a = fs::metadata(dir.path().join("bin/a")).unwrap();
        let b = fs::metadata(dir.path().join("bin/b")).unwrap();
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!(
            fs::read_link(dir.path().join("bin/sh")).unwrap(),
            PathBuf::from("/bin/busybox")
        );
        assert!(!dir.path().join("dev/null").exists());
        assert_eq!(a.mtime(), 1_700_000_000);
    }

    #[test]
    fn pax_xattrs_apply_when_a_layer_may_carry_them() {
        // As cove's agent writes a microVM's writable layer: PAX records
        // before the entry they belong to.
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("SCHILY.xattr.user.origin", &b"sandbox"[..]),
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/x"[..]),
        ])
        .unwrap();
        let mut h = header(EntryType::Regular, 2, 0o644);
        b.append_data(&mut h, "tool", &b"hi"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let stats = extract(&data[..], dir.path()).unwrap();
        assert_eq!(stats.dropped_xattrs, 1);
        let tool = dir.path().join("tool");
        assert_eq!(
            xattr::get(&tool, "user.origin").unwrap(),
            Some(b"sandbox".to_vec())
        );
        assert_eq!(xattr::get(&tool, "trusted.overlay.redirect").unwrap(), None);
    }

    #[test]
    fn escapes_are_refused() {
        for (entries, culprit) in [
            (
                vec![("../evil", EntryType::Regular, &b"x"[..], None)],
                "../evil",
            ),
            (
                vec![("/etc/evil", EntryType::Regular, &b"x"[..], None)],
                "/etc/evil",
            ),
            (
                vec![
                    ("link", EntryType::Symlink, &b""[..], Some("/tmp")),
                    ("link/evil", EntryType::Regular, &b"x"[..], None),
                ],
                "link/evil",
            ),
            (
                vec![("hard", EntryType::Link, &b""[..], Some("../../etc/passwd"))],
                "hard",
            ),
            (
                vec![("hard", EntryType::Link, &b""[..], Some("etc/passwd"))],
                "hard",
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let err = extract(&tar(&entries)[..], dir.path()).unwrap_err();
            assert!(
                matches!(&err, ExtractError::Refused { entry, .. } if entry == culprit),
                "{culprit}: {err}"
            );
        }
    }

    #[test]
    fn truncation_is_detected() {
        let data = tar(&[("a", EntryType::Regular, &[7u8; 4000], None)]);
        for cut in [700, 1024 + 512, 512 + 4096] {
            let dir = tempfile::tempdir().unwrap();
            let err = extract(&data[..cut], dir.path()).unwrap_err();
            assert!(
                matches!(err, ExtractError::Corrupt(_)),
                "cut at {cut}: {err}"
            );
        }
    }
}
