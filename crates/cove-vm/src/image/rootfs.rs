//! A template's `rootfs/` as a read-only ext4 disk for the guest.
//!
//! `mkfs.ext4 -d` (e2fsprogs) copies a directory into a new filesystem
//! without mounting anything, so it needs no loop device. The image has no
//! journal (the guest never writes it: its writes go to a tmpfs overlay)
//! and is sized from the tree with room for ext4's own metadata.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Progress, VmError};

/// The image file next to a template's `rootfs/`.
pub const ROOTFS_IMAGE: &str = "rootfs.ext4";

/// Build (or find) `template_dir/rootfs.ext4` from `template_dir/rootfs`.
pub fn ensure_rootfs_image(
    template_dir: &Path,
    progress: Progress<'_>,
) -> Result<PathBuf, VmError> {
    let image = template_dir.join(ROOTFS_IMAGE);
    // Templates are immutable once built (a rebuild renames a whole new
    // directory into place), so an existing image is current.
    if image.exists() {
        return Ok(image);
    }
    let rootfs = template_dir.join("rootfs");
    if !rootfs.is_dir() {
        return Err(VmError::Image(format!(
            "{} has no rootfs/ directory; the microVM backend needs a template with its own \
             root filesystem (e.g. `cove template build busybox`), not the host template",
            template_dir.display()
        )));
    }
    progress(0, 2, "measuring the template");
    let (bytes, inodes) = measure(&rootfs)?;
    // Data rounded to blocks, plus inode tables, plus a fixed margin for
    // the superblock, group descriptors and directories.
    let inodes = inodes + inodes / 4 + 256;
    let size = (bytes + bytes / 5 + inodes * 256 + 16 * 1024 * 1024).div_ceil(4096) * 4096;

    progress(1, 2, "writing the ext4 image (mkfs.ext4 -d)");
    let tmp = template_dir.join(format!(".{ROOTFS_IMAGE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let file = std::fs::File::create(&tmp).map_err(VmError::io("create", &tmp))?;
    file.set_len(size).map_err(VmError::io("size", &tmp))?;
    drop(file);
    let out = Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-m",
            "0",
            "-O",
            "^has_journal",
            "-L",
            "cove-rootfs",
        ])
        .arg("-N")
        .arg(inodes.to_string())
        .arg("-E")
        .arg("root_owner=0:0")
        .arg("-d")
        .arg(&rootfs)
        .arg(&tmp)
        .stdin(Stdio::null())
        .output();
    let failure = match out {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "mkfs.ext4 failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!(
            "cannot run mkfs.ext4 ({e}); install Debian's e2fsprogs package"
        )),
    };
    if let Some(detail) = failure {
        let _ = std::fs::remove_file(&tmp);
        return Err(VmError::Tool {
            what: format!("build the root disk of {}", template_dir.display()),
            detail,
        });
    }
    std::fs::rename(&tmp, &image).map_err(VmError::io("rename", &image))?;
    progress(2, 2, "root disk ready");
    Ok(image)
}

/// Bytes (rounded up to 4 KiB blocks) and inodes under `root`, not
/// following symlinks.
fn measure(root: &Path) -> Result<(u64, u64), VmError> {
    let mut bytes = 0u64;
    let mut inodes = 1u64;
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).map_err(VmError::io("read", &dir))? {
            let entry = entry.map_err(VmError::io("read", &dir))?;
            let meta = entry
                .metadata()
                .map_err(VmError::io("stat", &entry.path()))?;
            inodes += 1;
            bytes += meta.size().div_ceil(4096) * 4096;
            if meta.is_dir() {
                bytes += 4096;
                stack.push(entry.path());
            }
        }
    }
    Ok((bytes, inodes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_without_rootfs_is_a_clear_error() {
        let dir = tempfile::tempdir().ok();
        let Some(dir) = dir else { return };
        let err = ensure_rootfs_image(dir.path(), &mut |_, _, _| {});
        assert!(matches!(err, Err(VmError::Image(m)) if m.contains("rootfs/")));
    }

    #[test]
    fn builds_an_ext4_image_once() {
        if Command::new("mkfs.ext4").arg("-V").output().is_err() {
            eprintln!("skipping: mkfs.ext4 is not installed (Debian package e2fsprogs)");
            return;
        }
        let Ok(dir) = tempfile::tempdir() else { return };
        let rootfs = dir.path().join("rootfs");
        let _ = std::fs::create_dir_all(rootfs.join("bin"));
        let _ = std::fs::write(rootfs.join("bin/hello"), b"#!/bin/sh\necho hi\n");
        let mut steps = 0;
        let image = ensure_rootfs_image(dir.path(), &mut |_, _, _| steps += 1);
        let Ok(image) = image else {
            panic!("image build failed: {image:?}");
        };
        assert!(steps > 0);
        let mut magic = [0u8; 2];
        let read = std::fs::File::open(&image).and_then(|mut f| {
            use std::io::{Read, Seek, SeekFrom};
            f.seek(SeekFrom::Start(1024 + 0x38))?;
            f.read_exact(&mut magic)
        });
        assert!(read.is_ok());
        assert_eq!(magic, [0x53, 0xef], "ext4 superblock magic");
        // A second call finds the cached image without rebuilding it.
        let mut again = 0;
        assert_eq!(
            ensure_rootfs_image(dir.path(), &mut |_, _, _| again += 1).ok(),
            Some(image)
        );
        assert_eq!(again, 0);
    }
}
