//! The guest kernel, taken from Debian's `linux-image-amd64` package without
//! installing it: the `.deb` is downloaded with `apt-get download` and
//! unpacked with `dpkg-deb -x` into a scratch directory, from which the
//! kernel, its config and the few modules the guest needs are kept.
//!
//! The compressed `vmlinuz` is also unpacked to a plain `vmlinux`: QEMU's
//! microvm and Firecracker boot it directly through its PVH entry point,
//! which skips the kernel's self-decompression (seconds under TCG).

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::modules;
use crate::{Progress, VmError};

/// An unpacked kernel in the cache.
#[derive(Debug, Clone)]
pub struct Kernel {
    pub version: String,
    pub dir: PathBuf,
}

impl Kernel {
    pub fn vmlinuz(&self) -> PathBuf {
        self.dir.join("vmlinuz")
    }
    /// The uncompressed, PVH-bootable kernel, when it could be made.
    pub fn vmlinux(&self) -> Option<PathBuf> {
        let path = self.dir.join("vmlinux");
        path.exists().then_some(path)
    }
    pub fn modules_dir(&self) -> PathBuf {
        self.dir.join("modules")
    }
    /// The modules every guest loads, in order.
    pub fn module_order(&self) -> Result<Vec<String>, VmError> {
        self.order_file("modules.order")
    }
    /// The modules a guest with a network device loads after those of
    /// [`Kernel::module_order`], in order.
    pub fn net_module_order(&self) -> Result<Vec<String>, VmError> {
        self.order_file(NET_ORDER)
    }
    fn order_file(&self, name: &str) -> Result<Vec<String>, VmError> {
        let path = self.dir.join(name);
        let text = std::fs::read_to_string(&path).map_err(VmError::io("read", &path))?;
        Ok(text
            .lines()
            .map(str::to_string)
            .filter(|l| !l.is_empty())
            .collect())
    }
}

/// The network modules' order file.
const NET_ORDER: &str = "modules.net.order";

/// The modules a cached kernel was unpacked for; one unpacked for another
/// set (by an older cove) is unpacked again.
const MODULE_SET: &str = "modules.wanted";

fn module_set() -> String {
    format!(
        "{}\n{}\n",
        modules::GUEST_MODULES.join(" "),
        modules::NETWORK_MODULES.join(" ")
    )
}

/// The newest kernel in `cache_dir/kernel`, unpacking one first if there is none.
pub fn ensure_kernel(cache_dir: &Path, progress: Progress<'_>) -> Result<Kernel, VmError> {
    let root = cache_dir.join("kernel");
    if let Some(kernel) = cached(&root)? {
        if unpacked_for_these_modules(&kernel.dir) {
            return Ok(kernel);
        }
        // Unpacked by an older cove, for other modules: again.
        let _ = std::fs::remove_dir_all(&kernel.dir);
    }
    std::fs::create_dir_all(&root).map_err(VmError::io("create", &root))?;
    let scratch = root.join(format!(".tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).map_err(VmError::io("create", &scratch))?;
    let result = build(cache_dir, &root, &scratch, progress);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// Whether the kernel unpacked in `dir` carries the modules this cove loads.
fn unpacked_for_these_modules(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(MODULE_SET)).is_ok_and(|set| set == module_set())
}

fn cached(root: &Path) -> Result<Option<Kernel>, VmError> {
    let Ok(entries) = std::fs::read_dir(root) else {
        return Ok(None);
    };
    let mut versions: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| !n.starts_with('.'))
        .collect();
    versions.sort();
    Ok(versions.pop().map(|version| Kernel {
        dir: root.join(&version),
        version,
    }))
}

fn build(
    cache_dir: &Path,
    root: &Path,
    scratch: &Path,
    progress: Progress<'_>,
) -> Result<Kernel, VmError> {
    progress(0, 4, "finding the guest kernel package");
    let deb = match find_deb(&cache_dir.join("debs"))? {
        Some(deb) => deb,
        None => {
            progress(0, 4, "downloading linux-image-amd64 from Debian's archive");
            download(&cache_dir.join("debs"))?
        }
    };
    progress(1, 4, "unpacking the kernel package");
    let unpacked = scratch.join("deb");
    run(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        "unpack the kernel package (dpkg-deb, from Debian's dpkg package)",
    )?;
    let boot = unpacked.join("boot");
    let version = std::fs::read_dir(&boot)
        .map_err(VmError::io("read", &boot))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .find_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .ok_or_else(|| VmError::Image(format!("{} holds no vmlinuz", deb.display())))?;
    let out = scratch.join("out");
    std::fs::create_dir_all(out.join("modules")).map_err(VmError::io("create", &out))?;
    let vmlinuz = out.join("vmlinuz");
    copy(&boot.join(format!("vmlinuz-{version}")), &vmlinuz)?;
    let config = boot.join(format!("config-{version}"));
    let pvh = std::fs::read_to_string(&config)
        .map(|c| c.lines().any(|l| l == "CONFIG_PVH=y"))
        .unwrap_or(false);

    progress(2, 4, "unpacking vmlinux for direct (PVH) boot");
    if pvh {
        // Not fatal: QEMU boots the compressed kernel too, only slower.
        if let Err(err) = extract_vmlinux(&vmlinuz, &out.join("vmlinux")) {
            tracing::warn!(%err, "booting the compressed kernel instead of vmlinux");
            let _ = std::fs::remove_file(out.join("vmlinux"));
        }
    }

    progress(3, 4, "resolving kernel modules");
    let tree = unpacked.join("lib/modules").join(&version);
    let files = modules::index(&tree)?;
    let builtin = std::fs::read_to_string(tree.join("modules.builtin"))
        .map(|t| modules::parse_builtin(&t))
        .unwrap_or_else(|_| HashSet::new());
    let order = modules::load_order(&files, &builtin, modules::GUEST_MODULES)?;
    let net_order: Vec<PathBuf> = modules::load_order(&files, &builtin, modules::NETWORK_MODULES)?
        .into_iter()
        .filter(|m| !order.contains(m))
        .collect();
    for (list, file) in [(&order, "modules.order"), (&net_order, NET_ORDER)] {
        let mut names = String::new();
        for path in list {
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .ok_or_else(|| VmError::Image(format!("odd module path {}", path.display())))?;
            copy(path, &out.join("modules").join(name))?;
            names.push_str(name);
            names.push('\n');
        }
        let order_file = out.join(file);
        std::fs::write(&order_file, names).map_err(VmError::io("write", &order_file))?;
    }
    let set_file = out.join(MODULE_SET);
    std::fs::write(&set_file, module_set()).map_err(VmError::io("write", &set_file))?;

    let dest = root.join(&version);
    match std::fs::rename(&out, &dest) {
        Ok(()) => {}
        // Another process finished first: theirs is as good as ours.
        Err(_) if dest.exists() => {}
        Err(e) => return Err(VmError::io("rename", &dest)(e)),
    }
    progress(4, 4, "guest kernel ready");
    Ok(Kernel { version, dir: dest })
}

fn copy(from: &Path, to: &Path) -> Result<(), VmError> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(VmError::io("copy", from))
}

/// A versioned kernel package (not the `linux-image-amd64` meta package).
fn find_deb(dir: &Path) -> Result<Option<PathBuf>, VmError> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(None);
    };
    let mut debs: Vec<PathBuf> = entries
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| {
            p.file_name().and_then(|n| n.to_str()).is_some_and(|n| {
                n.starts_with("linux-image-")
                    && !n.starts_with("linux-image-amd64_")
                    && n.ends_with(".deb")
            })
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

fn download(dir: &Path) -> Result<PathBuf, VmError> {
    std::fs::create_dir_all(dir).map_err(VmError::io("create", dir))?;
    let hint = "download the guest kernel (apt-get download linux-image-amd64; \
                run `apt-get update` first, or put a linux-image-*-amd64 .deb in the cache's debs/)";
    run(
        Command::new("apt-get")
            .args(["download", "-q", "linux-image-amd64"])
            .current_dir(dir),
        hint,
    )?;
    let meta = std::fs::read_dir(dir)
        .map_err(VmError::io("read", dir))?
        .filter_map(|e| Some(e.ok()?.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("linux-image-amd64_"))
        })
        .ok_or_else(|| VmError::Image("apt-get download left no linux-image-amd64 .deb".into()))?;
    let depends = output(
        Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&meta)
            .arg("Depends"),
        "read the kernel package's dependencies (dpkg-deb)",
    )?;
    let package = depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or_default())
        .find(|d| d.starts_with("linux-image-") && d.ends_with("-amd64"))
        .ok_or_else(|| {
            VmError::Image(format!(
                "linux-image-amd64 depends on no kernel ({depends})"
            ))
        })?
        .to_string();
    let _ = std::fs::remove_file(&meta);
    run(
        Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(dir),
        hint,
    )?;
    find_deb(dir)?.ok_or_else(|| VmError::Image(format!("apt-get download {package} left no .deb")))
}

fn run(cmd: &mut Command, what: &str) -> Result<(), VmError> {
    output(cmd, what).map(|_| ())
}

fn output(cmd: &mut Command, what: &str) -> Result<String, VmError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| VmError::Tool {
            what: what.to_string(),
            detail: format!("cannot run {program}: {e}"),
        })?;
    if !out.status.success() {
        return Err(VmError::Tool {
            what: what.to_string(),
            detail: format!(
                "{program} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Where the compressed kernel sits in a bzImage, from its setup header.
pub fn bzimage_payload(image: &[u8]) -> Option<&[u8]> {
    if image.get(0x202..0x206)? != b"HdrS" {
        return None;
    }
    let setup_sects = match *image.get(0x1f1)? {
        0 => 4,
        n => usize::from(n),
    };
    let offset = u32::from_le_bytes(image.get(0x248..0x24c)?.try_into().ok()?) as usize;
    let length = u32::from_le_bytes(image.get(0x24c..0x250)?.try_into().ok()?) as usize;
    let start = (setup_sects + 1) * 512 + offset;
    image.get(start..start.checked_add(length)?)
}

fn extract_vmlinux(vmlinuz: &Path, out: &Path) -> Result<(), VmError> {
    let image = std::fs::read(vmlinuz).map_err(VmError::io("read", vmlinuz))?;
    let payload = bzimage_payload(&image)
        .ok_or_else(|| VmError::Image(format!("{} is not a bzImage", vmlinuz.display())))?;
    let (program, args): (&str, &[&str]) = if payload.starts_with(b"\xfd7zXZ\0") {
        // The build appends the uncompressed size after the xz stream.
        ("xz", &["-dc", "--single-stream"])
    } else if payload.starts_with(b"\x1f\x8b") {
        ("gzip", &["-dc"])
    } else if payload.starts_with(b"\x28\xb5\x2f\xfd") {
        ("zstd", &["-dcq"])
    } else {
        return Err(VmError::Image(
            "the kernel's compression is not xz, gzip or zstd".into(),
        ));
    };
    let file = std::fs::File::create(out).map_err(VmError::io("create", out))?;
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| VmError::Tool {
            what: "unpack vmlinux".into(),
            detail: format!("cannot run {program}: {e}"),
        })?;
    let fed = child.stdin.take().map(|mut stdin| stdin.write_all(payload));
    let status = child
        .wait()
        .map_err(VmError::io("wait for", Path::new(program)))?;
    let elf = std::fs::File::open(out)
        .and_then(|mut f| {
            let mut magic = [0u8; 4];
            std::io::Read::read_exact(&mut f, &mut magic).map(|()| magic)
        })
        .map(|m| &m == b"\x7fELF")
        .unwrap_or(false);
    // gzip exits 2 for "trailing garbage ignored", which is expected here.
    if !elf || !(status.success() || status.code() == Some(2)) || matches!(fed, Some(Err(_))) {
        return Err(VmError::Image(format!(
            "{program} could not unpack vmlinux ({status})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_unpacked_for_other_modules_is_stale() {
        let Ok(dir) = tempfile::tempdir() else { return };
        // Unpacked by a cove that wrote no module set (ext4 root disks).
        assert!(!unpacked_for_these_modules(dir.path()));
        std::fs::write(dir.path().join(MODULE_SET), "virtio_blk ext4 overlay\n").unwrap();
        assert!(!unpacked_for_these_modules(dir.path()));
        std::fs::write(dir.path().join(MODULE_SET), module_set()).unwrap();
        assert!(unpacked_for_these_modules(dir.path()));
    }

    #[test]
    fn finds_the_payload_from_the_setup_header() {
        let mut image = vec![0u8; 4096];
        image[0x1f1] = 2;
        image[0x202..0x206].copy_from_slice(b"HdrS");
        image[0x248..0x24c].copy_from_slice(&100u32.to_le_bytes());
        image[0x24c..0x250].copy_from_slice(&6u32.to_le_bytes());
        let start = 3 * 512 + 100;
        image[start..start + 6].copy_from_slice(b"\xfd7zXZ\0");
        assert_eq!(bzimage_payload(&image), Some(&b"\xfd7zXZ\0"[..]));
        image[0x202] = 0;
        assert_eq!(bzimage_payload(&image), None);
        assert_eq!(bzimage_payload(&[0u8; 10]), None);
    }
}
