//! A template's root filesystem as a read-only EROFS disk for the guest.
//!
//! `mkfs.erofs` (erofs-utils) copies a directory into a new, uncompressed
//! image without mounting anything, so it needs no loop device. EROFS is
//! read-only by design (the guest's writes go to a tmpfs overlay), sizes
//! itself, and its driver is an eighth of ext4's with its journal and
//! checksum modules: loading those in the guest was most of the ~0.4 s its
//! root disk took to mount under TCG.
//!
//! The tree is the template's `rootfs/`, or its one layer, or, for a
//! template of several layers (an image with many, a snapshot over its
//! base), their overlay: mounted read-only in a mount namespace of
//! `mkfs.erofs`'s own, so the kernel applies whiteouts and opaque
//! directories and the mount vanishes with the process.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{Progress, VmError};

/// The image file next to a template's `rootfs/`.
pub const ROOTFS_IMAGE: &str = "rootfs.erofs";

/// What earlier versions built in its place (ext4), removed when the new
/// image is written.
const OLD_ROOTFS_IMAGE: &str = "rootfs.ext4";

/// Build (or find) `template_dir/rootfs.erofs` from `template_dir/rootfs`.
pub fn ensure_rootfs_image(
    template_dir: &Path,
    progress: Progress<'_>,
) -> Result<PathBuf, VmError> {
    ensure_rootfs_image_of(template_dir, &[], progress)
}

/// Build (or find) `template_dir/rootfs.erofs` from `template_dir/rootfs`,
/// or, without one, from `layers` (topmost first, as overlayfs stacks them).
pub fn ensure_rootfs_image_of(
    template_dir: &Path,
    layers: &[PathBuf],
    progress: Progress<'_>,
) -> Result<PathBuf, VmError> {
    let image = template_dir.join(ROOTFS_IMAGE);
    // Templates are immutable once built (a rebuild renames a whole new
    // directory into place), so an existing image is current.
    if image.exists() {
        return Ok(image);
    }
    let rootfs = template_dir.join("rootfs");
    let source: &[PathBuf] = if rootfs.is_dir() {
        std::slice::from_ref(&rootfs)
    } else {
        layers
    };
    if source.is_empty() {
        return Err(VmError::Image(format!(
            "{} has no rootfs/ directory; the microVM backend needs a template with its own \
             root filesystem (e.g. `cove template build busybox`), not the host template",
            template_dir.display()
        )));
    }
    if let Some(bad) = source
        .iter()
        .find(|l| l.to_string_lossy().contains([':', ',']))
    {
        return Err(VmError::Image(format!(
            "layer path {} contains ':' or ',', which an overlay mount cannot name",
            bad.display()
        )));
    }
    progress(0, 1, "writing the root disk (mkfs.erofs)");
    let tmp = template_dir.join(format!(".{ROOTFS_IMAGE}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    // One tree as it is; several through a private overlay mount.
    let merged = template_dir.join(format!(".rootfs-merge-{}", std::process::id()));
    let tree = match source {
        [only] => only.clone(),
        _ => {
            let _ = std::fs::create_dir(&merged);
            merged.clone()
        }
    };
    let mut mkfs = Command::new("mkfs.erofs");
    if source.len() > 1 {
        let lower = source
            .iter()
            .map(|l| l.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(":");
        let options = std::ffi::CString::new(format!("lowerdir={lower}"))
            .map_err(|_| VmError::Image("a layer path contains a NUL byte".into()))?;
        let target = std::ffi::CString::new(merged.as_os_str().as_encoded_bytes())
            .map_err(|_| VmError::Image("the template path contains a NUL byte".into()))?;
        // SAFETY: only system calls on C strings prepared above run
        // between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut mkfs, move || {
                let fail = || Err(std::io::Error::last_os_error());
                if libc::unshare(libc::CLONE_NEWNS) != 0 {
                    return fail();
                }
                if libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
                {
                    return fail();
                }
                if libc::mount(
                    c"overlay".as_ptr(),
                    target.as_ptr(),
                    c"overlay".as_ptr(),
                    libc::MS_RDONLY,
                    options.as_ptr().cast(),
                ) != 0
                {
                    return fail();
                }
                Ok(())
            });
        }
    }
    // Owners, modes, times and extended attributes come from the tree;
    // no compression (the guest would need the decompressor and spend CPU
    // on every read).
    let out = mkfs
        .arg("--quiet")
        .arg(&tmp)
        .arg(&tree)
        .stdin(Stdio::null())
        .output();
    let _ = std::fs::remove_dir(&merged);
    let failure = match out {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "mkfs.erofs failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) if source.len() > 1 => Some(format!(
            "cannot overlay the template's {} layers for mkfs.erofs, or run it: {e}",
            source.len()
        )),
        Err(e) => Some(format!(
            "cannot run mkfs.erofs ({e}); install Debian's erofs-utils package"
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
    let _ = std::fs::remove_file(template_dir.join(OLD_ROOTFS_IMAGE));
    progress(1, 1, "root disk ready");
    Ok(image)
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
    fn merges_layers_with_their_whiteouts() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if !root || Command::new("dump.erofs").arg("-V").output().is_err() {
            eprintln!("skipping: needs root and erofs-utils");
            return;
        }
        let Ok(dir) = tempfile::tempdir() else { return };
        let (lower, upper) = (dir.path().join("lower"), dir.path().join("upper"));
        let template = dir.path().join("template");
        for d in [lower.join("etc"), upper.join("etc"), template.clone()] {
            std::fs::create_dir_all(&d).unwrap();
        }
        std::fs::write(lower.join("etc/keep"), b"old").unwrap();
        std::fs::write(lower.join("etc/gone"), b"old").unwrap();
        std::fs::write(upper.join("etc/new"), b"new").unwrap();
        // An overlayfs whiteout: a 0/0 character device.
        let gone =
            std::ffi::CString::new(upper.join("etc/gone").into_os_string().into_encoded_bytes())
                .unwrap();
        // SAFETY: mknod on a valid C string.
        let made = unsafe { libc::mknod(gone.as_ptr(), libc::S_IFCHR | 0o600, 0) };
        assert_eq!(made, 0);
        let image = ensure_rootfs_image_of(&template, &[upper, lower], &mut |_, _, _| {});
        let Ok(image) = image else {
            panic!("image build failed: {image:?}");
        };
        let listing = Command::new("dump.erofs")
            .args(["--ls", "--path=/etc"])
            .arg(&image)
            .output()
            .unwrap();
        let listing = String::from_utf8_lossy(&listing.stdout);
        // "NID TYPE FILENAME" rows after the inode's own description.
        let names: Vec<&str> = listing
            .lines()
            .skip_while(|l| !l.contains("FILENAME"))
            .skip(1)
            .filter_map(|l| l.split_whitespace().nth(2))
            .filter(|n| !n.starts_with('.'))
            .collect();
        assert_eq!(names, ["keep", "new"], "{listing}");
        // Nothing of the merge is left in the template directory.
        let left: Vec<_> = std::fs::read_dir(&template)
            .unwrap()
            .flatten()
            .map(|e| e.file_name())
            .collect();
        assert_eq!(left, [std::ffi::OsString::from(ROOTFS_IMAGE)]);
    }

    #[test]
    fn builds_an_erofs_image_once() {
        if Command::new("mkfs.erofs").arg("--help").output().is_err() {
            eprintln!("skipping: mkfs.erofs is not installed (Debian package erofs-utils)");
            return;
        }
        let Ok(dir) = tempfile::tempdir() else { return };
        let rootfs = dir.path().join("rootfs");
        let _ = std::fs::create_dir_all(rootfs.join("bin"));
        let _ = std::fs::write(rootfs.join("bin/hello"), b"#!/bin/sh\necho hi\n");
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        if root {
            std::os::unix::fs::chown(rootfs.join("bin/hello"), Some(1000), Some(1001)).unwrap();
        }
        // What an earlier version built goes once the new image is there.
        let _ = std::fs::write(dir.path().join(OLD_ROOTFS_IMAGE), b"old");
        let mut steps = 0;
        let image = ensure_rootfs_image(dir.path(), &mut |_, _, _| steps += 1);
        let Ok(image) = image else {
            panic!("image build failed: {image:?}");
        };
        assert!(steps > 0);
        let mut magic = [0u8; 4];
        let read = std::fs::File::open(&image).and_then(|mut f| {
            use std::io::{Read, Seek, SeekFrom};
            f.seek(SeekFrom::Start(1024))?;
            f.read_exact(&mut magic)
        });
        assert!(read.is_ok());
        assert_eq!(
            u32::from_le_bytes(magic),
            0xE0F5_E1E2,
            "EROFS superblock magic"
        );
        assert!(!dir.path().join(OLD_ROOTFS_IMAGE).exists());
        if root
            && let Ok(out) = Command::new("dump.erofs")
                .arg("--path=/bin/hello")
                .arg(&image)
                .output()
        {
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("Uid: 1000   Gid: 1001"), "owner lost: {text}");
        }
        // A second call finds the cached image without rebuilding it.
        let mut again = 0;
        assert_eq!(
            ensure_rootfs_image(dir.path(), &mut |_, _, _| again += 1).ok(),
            Some(image)
        );
        assert_eq!(again, 0);
    }
}
