//! Directory trees as layers: copying one (a plain rootfs directory, a
//! sandbox's writable layer) with owners, modes, times, hard links and
//! xattrs intact, and naming one by the digest of a canonical listing.
//!
//! The listing walks the tree in byte order of names and hashes, per entry:
//! its path, type, mode, owner, modification time, xattrs, and its content
//! (file bytes, symlink target, or the first path of a hard-linked inode).
//! Two trees with the same digest are the same layer.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::fsutil::{self, Meta};
use crate::layers::Digest;

/// What a copy keeps besides ordinary files.
#[derive(Debug, Clone, Copy)]
pub struct CopyRules {
    /// Keep 0/0 character devices (overlay whiteouts) and overlayfs'
    /// `opaque` xattr: the source is an overlay upper directory.
    pub overlay_upper: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyStats {
    pub bytes: u64,
    pub entries: u64,
    pub skipped: u64,
}

/// Errors of a copy: which path, and whether the source or the target failed.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("cannot read {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{} is a metadata-only copy-up (overlayfs metacopy is on); cove cannot snapshot it", path.display())]
    Metacopy { path: PathBuf },
}

fn read_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Read {
        path: path.to_path_buf(),
        source,
    }
}

fn write_err(path: &Path) -> impl FnOnce(io::Error) -> CopyError + '_ {
    move |source| CopyError::Write {
        path: path.to_path_buf(),
        source,
    }
}

fn keep_xattr(name: &[u8], rules: CopyRules) -> bool {
    fsutil::allowed_xattr(name)
        || (rules.overlay_upper
            && (name == fsutil::OPAQUE_XATTR.as_bytes() || name == b"trusted.overlay.redirect"))
}

/// Entries of `dir`, sorted by name bytes.
fn sorted_entries(dir: &Path) -> io::Result<Vec<fs::DirEntry>> {
    let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
    Ok(entries)
}

struct Copier {
    rules: CopyRules,
    links: HashMap<(u64, u64), PathBuf>,
    stats: CopyStats,
    dir_times: Vec<(PathBuf, i64, i64)>,
}

/// Copy the contents of `src` into the existing directory `dst`.
pub fn copy_tree(src: &Path, dst: &Path, rules: CopyRules) -> Result<CopyStats, CopyError> {
    let mut copier = Copier {
        rules,
        links: HashMap::new(),
        stats: CopyStats::default(),
        dir_times: Vec::new(),
    };
    let root = fs::symlink_metadata(src).map_err(read_err(src))?;
    copier.dir(src, dst)?;
    let meta = copier.meta(src, &root)?;
    fsutil::apply(dst, &meta, false).map_err(write_err(dst))?;
    copier
        .dir_times
        .push((dst.to_path_buf(), meta.mtime, meta.mtime_nsec));
    for (dir, sec, nsec) in copier.dir_times.iter().rev() {
        fsutil::set_mtime(dir, *sec, *nsec).map_err(write_err(dir))?;
    }
    Ok(copier.stats)
}

impl Copier {
    fn meta(&self, path: &Path, m: &fs::Metadata) -> Result<Meta, CopyError> {
        let rules = self.rules;
        let xattrs = fsutil::read_xattrs(path, |n| keep_xattr(n, rules)).map_err(read_err(path))?;
        Ok(Meta {
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            mtime: m.mtime(),
            mtime_nsec: m.mtime_nsec(),
            xattrs,
        })
    }

    fn dir(&mut self, src: &Path, dst: &Path) -> Result<(), CopyError> {
        for entry in sorted_entries(src).map_err(read_err(src))? {
            let from = entry.path();
            let to = dst.join(entry.file_name());
            let m = fs::symlink_metadata(&from).map_err(read_err(&from))?;
            let kind = m.file_type();
            self.stats.entries += 1;
            if !kind.is_dir() && m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    fs::hard_link(first, &to).map_err(write_err(&to))?;
                    continue;
                }
                self.links.insert((m.dev(), m.ino()), to.clone());
            }
            if kind.is_dir() {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(&to)
                    .map_err(write_err(&to))?;
                self.dir(&from, &to)?;
                let meta = self.meta(&from, &m)?;
                fsutil::apply(&to, &meta, false).map_err(write_err(&to))?;
                self.dir_times.push((to, meta.mtime, meta.mtime_nsec));
            } else if kind.is_file() {
                if self.rules.overlay_upper
                    && xattr::get(&from, "trusted.overlay.metacopy")
                        .ok()
                        .flatten()
                        .is_some()
                {
                    return Err(CopyError::Metacopy { path: from });
                }
                let mut input = fs::File::open(&from).map_err(read_err(&from))?;
                let mut output = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&to)
                    .map_err(write_err(&to))?;
                // std copies with copy_file_range/sendfile where it can.
                let n = io::copy(&mut input, &mut output).map_err(|e| CopyError::Write {
                    path: to.clone(),
                    source: e,
                })?;
                self.stats.bytes += n;
                drop(output);
                let meta = self.meta(&from, &m)?;
                fsutil::apply(&to, &meta, false).map_err(write_err(&to))?;
                fsutil::set_mtime(&to, meta.mtime, meta.mtime_nsec).map_err(write_err(&to))?;
            } else if kind.is_symlink() {
                let target = fs::read_link(&from).map_err(read_err(&from))?;
                std::os::unix::fs::symlink(&target, &to).map_err(write_err(&to))?;
                let meta = self.meta(&from, &m)?;
                fsutil::apply(&to, &meta, true).map_err(write_err(&to))?;
                fsutil::set_mtime(&to, meta.mtime, meta.mtime_nsec).map_err(write_err(&to))?;
            } else if kind.is_fifo() {
                fsutil::make_fifo(&to, m.mode()).map_err(write_err(&to))?;
                let meta = self.meta(&from, &m)?;
                fsutil::apply(&to, &meta, false).map_err(write_err(&to))?;
                fsutil::set_mtime(&to, meta.mtime, meta.mtime_nsec).map_err(write_err(&to))?;
            } else if self.rules.overlay_upper && fsutil::is_whiteout(&m) {
                fsutil::make_whiteout(&to).map_err(write_err(&to))?;
            } else {
                // Devices and sockets: not part of a template.
                self.stats.skipped += 1;
            }
        }
        Ok(())
    }
}

/// A tree's digest and size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeSummary {
    pub digest: Digest,
    /// Bytes of file content, hard links counted once.
    pub bytes: u64,
    pub entries: u64,
}

/// The digest of a tree's canonical listing (see the module doc).
pub fn tree_digest(root: &Path) -> io::Result<TreeSummary> {
    let mut walk = Walk {
        hasher: Sha256::new(),
        links: HashMap::new(),
        bytes: 0,
        entries: 0,
        buf: vec![0u8; 1 << 20],
    };
    walk.dir(root, b"")?;
    Ok(TreeSummary {
        digest: Digest::from_sha256(&walk.hasher.finalize()),
        bytes: walk.bytes,
        entries: walk.entries,
    })
}

struct Walk {
    hasher: Sha256,
    links: HashMap<(u64, u64), Vec<u8>>,
    bytes: u64,
    entries: u64,
    buf: Vec<u8>,
}

fn field(hasher: &mut Sha256, bytes: &[u8]) {
    hasher.update((bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

impl Walk {
    fn dir(&mut self, dir: &Path, prefix: &[u8]) -> io::Result<()> {
        for entry in sorted_entries(dir)? {
            let path = entry.path();
            let mut rel = prefix.to_vec();
            if !rel.is_empty() {
                rel.push(b'/');
            }
            rel.extend_from_slice(entry.file_name().as_bytes());
            let m = fs::symlink_metadata(&path)?;
            let kind = m.file_type();
            self.entries += 1;
            field(&mut self.hasher, &rel);
            if !kind.is_dir() && m.nlink() > 1 {
                if let Some(first) = self.links.get(&(m.dev(), m.ino())) {
                    field(&mut self.hasher, b"hardlink");
                    field(&mut self.hasher, first);
                    continue;
                }
                self.links.insert((m.dev(), m.ino()), rel.clone());
            }
            let tag: &[u8] = if kind.is_dir() {
                b"dir"
            } else if kind.is_file() {
                b"file"
            } else if kind.is_symlink() {
                b"symlink"
            } else if kind.is_fifo() {
                b"fifo"
            } else if fsutil::is_whiteout(&m) {
                b"whiteout"
            } else {
                b"other"
            };
            field(&mut self.hasher, tag);
            self.hasher.update(m.mode().to_le_bytes());
            self.hasher.update(m.uid().to_le_bytes());
            self.hasher.update(m.gid().to_le_bytes());
            self.hasher.update(m.mtime().to_le_bytes());
            for (name, value) in fsutil::read_xattrs(&path, |_| true)? {
                field(&mut self.hasher, &name);
                field(&mut self.hasher, &value);
            }
            if kind.is_dir() {
                self.dir(&path, &rel)?;
                field(&mut self.hasher, b"end");
            } else if kind.is_file() {
                self.hasher.update(m.len().to_le_bytes());
                self.bytes += m.len();
                let mut file = fs::File::open(&path)?;
                loop {
                    let n = file.read(&mut self.buf)?;
                    if n == 0 {
                        break;
                    }
                    self.hasher.update(&self.buf[..n]);
                }
            } else if kind.is_symlink() {
                field(
                    &mut self.hasher,
                    fs::read_link(&path)?.as_os_str().as_bytes(),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_keep_links_modes_and_xattrs_and_digests_match() {
        let src = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/b/file"), b"data").unwrap();
        fs::hard_link(s.join("a/b/file"), s.join("a/link")).unwrap();
        std::os::unix::fs::symlink("../nowhere", s.join("a/sym")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(s.join("a/b/file"), fs::Permissions::from_mode(0o4751)).unwrap();
        let has_user_xattrs = xattr::set(s.join("a/b/file"), "user.cove", b"1").is_ok();
        fsutil::make_whiteout(&s.join("gone")).unwrap();

        let dst = tempfile::tempdir().unwrap();
        let stats = copy_tree(
            s,
            dst.path(),
            CopyRules {
                overlay_upper: true,
            },
        )
        .unwrap();
        assert_eq!(stats.bytes, 4);
        let d = dst.path();
        let file = fs::metadata(d.join("a/b/file")).unwrap();
        assert_eq!(file.mode() & 0o7777, 0o4751);
        assert_eq!(file.ino(), fs::metadata(d.join("a/link")).unwrap().ino());
        assert_eq!(
            fs::read_link(d.join("a/sym")).unwrap(),
            PathBuf::from("../nowhere")
        );
        assert!(fsutil::is_whiteout(
            &fs::symlink_metadata(d.join("gone")).unwrap()
        ));
        if has_user_xattrs {
            assert_eq!(
                xattr::get(d.join("a/b/file"), "user.cove").unwrap(),
                Some(b"1".to_vec())
            );
        }
        assert_eq!(tree_digest(s).unwrap(), tree_digest(d).unwrap());
        fs::write(d.join("a/b/file"), b"datA").unwrap();
        assert_ne!(tree_digest(s).unwrap(), tree_digest(d).unwrap());

        // Without the overlay rules, whiteouts are not copied.
        let plain = tempfile::tempdir().unwrap();
        let stats = copy_tree(
            s,
            plain.path(),
            CopyRules {
                overlay_upper: false,
            },
        )
        .unwrap();
        assert_eq!(stats.skipped, 1);
        assert!(!plain.path().join("gone").exists());
    }
}
