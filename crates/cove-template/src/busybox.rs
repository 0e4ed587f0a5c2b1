//! The busybox template: Debian's statically linked busybox, one symlink
//! per applet, and a minimal /etc. About 2 MB, no download.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::Path;
use std::process::Command;

use crate::layers::LayerInfo;
use crate::{
    ImageConfig, Progress, Template, TemplateError, TemplateKind, TemplateStore,
    create_standard_dirs, io_err, now, tree,
};

/// Where Debian's busybox-static installs its binary.
pub const BUSYBOX_PATH: &str = "/bin/busybox";

const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh
user:x:1000:1000:user:/home/user:/bin/sh
nobody:x:65534:65534:nobody:/nonexistent:/bin/false
";
const GROUP: &str = "root:x:0:
tty:x:5:
users:x:100:user
user:x:1000:
nogroup:x:65534:
";

/// Whether an ELF file asks for a dynamic loader (PT_INTERP).
fn is_dynamic(bytes: &[u8]) -> bool {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" || bytes[4] != 2 {
        return true;
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&bytes[o..o + 8]);
        u64::from_le_bytes(b) as usize
    };
    let (phoff, phentsize, phnum) = (u64_at(32), u16_at(54), u16_at(56));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        at + 4 <= bytes.len()
            && u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]) == 3
    })
}

pub(crate) fn build(
    store: &TemplateStore,
    busybox: &Path,
    progress: Progress<'_>,
) -> Result<Template, TemplateError> {
    let binary = fs::read(busybox).map_err(|e| {
        TemplateError::Build(format!(
            "cannot read {}: {e}; install it with `apt-get install busybox-static`",
            busybox.display()
        ))
    })?;
    if is_dynamic(&binary) {
        return Err(TemplateError::Build(format!(
            "{} is dynamically linked; install Debian's busybox-static package instead of busybox",
            busybox.display()
        )));
    }
    let listing = Command::new(busybox)
        .arg("--list-full")
        .output()
        .map_err(io_err("run", busybox))?;
    if !listing.status.success() {
        return Err(TemplateError::Build(format!(
            "`{} --list-full` failed",
            busybox.display()
        )));
    }
    let applets: Vec<String> = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.contains("..") && !l.starts_with('/'))
        .map(String::from)
        .collect();
    let version = Command::new(busybox)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(String::from)
        })
        .unwrap_or_else(|| "busybox".into());

    let _busy = store.importing()?;
    let layers = store.layers();
    let staging = layers.stage()?;
    let rootfs = staging.fs();
    create_standard_dirs(&rootfs)?;
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin"] {
        let path = rootfs.join(dir);
        fs::create_dir_all(&path).map_err(io_err("create", &path))?;
    }
    let total = applets.len() as u64 + 2;
    progress(0, total, "copying busybox");
    let target = rootfs.join("bin/busybox");
    fs::write(&target, &binary).map_err(io_err("write", &target))?;
    fs::set_permissions(&target, fs::Permissions::from_mode(0o755))
        .map_err(io_err("chmod", &target))?;
    progress(1, total, "linking applets");
    for (i, applet) in applets.iter().enumerate() {
        let link = rootfs.join(applet);
        if link.exists() || link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            fs::create_dir_all(parent).map_err(io_err("create", parent))?;
        }
        symlink("/bin/busybox", &link).map_err(io_err("symlink", &link))?;
        progress(i as u64 + 2, total, applet);
    }
    for (name, contents) in [
        ("etc/passwd", PASSWD),
        ("etc/group", GROUP),
        ("etc/hosts", "127.0.0.1 localhost\n::1 localhost\n"),
        ("etc/hostname", "localhost\n"),
        ("etc/resolv.conf", ""),
    ] {
        let path = rootfs.join(name);
        fs::write(&path, contents).map_err(io_err("write", &path))?;
    }
    let home = rootfs.join("home/user");
    std::os::unix::fs::chown(&home, Some(1000), Some(1000)).map_err(io_err("chown", &home))?;
    let source = format!("{} ({})", busybox.display(), version.trim());
    let summary = tree::tree_digest(&rootfs).map_err(io_err("read", &rootfs))?;
    let digest = summary.digest;
    let info = LayerInfo {
        bytes: summary.bytes,
        entries: summary.entries,
        source: source.clone(),
        created: now(),
    };
    staging.commit(&layers, &digest, &info)?;
    progress(total, total, "done");
    store.install_layers(
        "busybox",
        TemplateKind::Rootfs,
        source,
        ImageConfig {
            env: vec![("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into())],
            working_dir: Some("/workspace".into()),
            user: None,
            entrypoint: Vec::new(),
            cmd: vec!["/bin/sh".into()],
        },
        vec![digest],
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_static_and_dynamic_binaries() {
        let me = fs::read("/proc/self/exe").unwrap();
        // Test binaries are dynamically linked on the gnu target.
        assert!(is_dynamic(&me));
        assert!(is_dynamic(b"not an elf"));
        if let Ok(bb) = fs::read(BUSYBOX_PATH)
            && Command::new("sh")
                .arg("-c")
                .arg("file -L /bin/busybox | grep -q 'statically linked'")
                .status()
                .is_ok_and(|s| s.success())
        {
            assert!(!is_dynamic(&bb));
        }
    }
}
