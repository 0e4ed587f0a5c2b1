//! Guest images: a kernel, an initramfs whose `/init` is the agent, and a
//! template's root filesystem as a read-only EROFS disk.
//!
//! ```text
//!  <cache>/
//!    debs/                    downloaded kernel package (kept for rebuilds)
//!    kernel/<version>/        vmlinuz, vmlinux, modules/*.ko, modules.order
//!    images/<hash>/           initramfs.cpio + image.json (hash of agent + kernel)
//!  <template>/rootfs.erofs    next to the template's rootfs/
//! ```
//!
//! Every cache entry is built in a temporary sibling and renamed into
//! place, so an interrupted build never leaves a half-written entry.

pub mod cpio;
pub mod kernel;
pub mod modules;
mod rootfs;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use rootfs::{ensure_rootfs_image, ensure_rootfs_image_of};

use crate::{Progress, VmError};
use cove_agent::vm_init::{CONFIG_PATH, MODULE_ORDER, MODULES_DIR, NET_MODULE_ORDER, VmInitConfig};

/// Bumped whenever the initramfs layout changes, so old images are rebuilt.
/// 2: module signatures stripped. 3: network modules, loaded on demand.
/// 4: EROFS instead of ext4 for the root disk.
const IMAGE_FORMAT: u32 = 4;

/// A bootable guest: kernel plus the agent's initramfs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestImage {
    /// The image's cache directory.
    pub dir: PathBuf,
    /// The kernel to boot: `vmlinux` (PVH entry) when available, else `vmlinuz`.
    pub kernel: PathBuf,
    /// The compressed kernel, for VMMs that cannot boot `vmlinux`.
    pub vmlinuz: PathBuf,
    /// The shared initramfs (agent and modules); each VM appends its config.
    pub initramfs: PathBuf,
    pub kernel_version: String,
    /// The cache root, where the KVM probe's answer is kept.
    pub cache_dir: PathBuf,
}

/// Build (or find) the guest image for `agent_binary`, a static `cove-agent`.
pub fn ensure_guest_image(
    cache_dir: &Path,
    agent_binary: &Path,
    progress: Progress<'_>,
) -> Result<GuestImage, VmError> {
    let agent = std::fs::read(agent_binary).map_err(|e| VmError::Agent {
        path: agent_binary.to_path_buf(),
        reason: e.to_string(),
    })?;
    check_static(agent_binary, &agent)?;
    let kernel = kernel::ensure_kernel(cache_dir, progress)?;

    let mut key = Fnv::default();
    key.write(&IMAGE_FORMAT.to_le_bytes());
    key.write(kernel.version.as_bytes());
    // The modules the initramfs carries: a kernel unpacked again for
    // another set makes another image.
    for order in [kernel.module_order()?, kernel.net_module_order()?] {
        key.write(order.join("\n").as_bytes());
        key.write(b"\0");
    }
    key.write(&agent);
    let dir = cache_dir.join("images").join(format!("{:016x}", key.0));
    let kernel_path = kernel.vmlinux().unwrap_or_else(|| kernel.vmlinuz());
    let image = GuestImage {
        initramfs: dir.join("initramfs.cpio"),
        dir: dir.clone(),
        kernel: kernel_path,
        vmlinuz: kernel.vmlinuz(),
        kernel_version: kernel.version.clone(),
        cache_dir: cache_dir.to_path_buf(),
    };
    if image.initramfs.exists() {
        return Ok(image);
    }

    progress(0, 1, "writing the initramfs");
    let parent = cache_dir.join("images");
    std::fs::create_dir_all(&parent).map_err(VmError::io("create", &parent))?;
    let tmp = parent.join(format!(".tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(VmError::io("create", &tmp))?;
    let written = write_initramfs(&tmp.join("initramfs.cpio"), &agent, &kernel).and_then(|()| {
        let meta = tmp.join("image.json");
        let json = serde_json::to_vec_pretty(&image).map_err(|e| VmError::Image(e.to_string()))?;
        std::fs::write(&meta, json).map_err(VmError::io("write", &meta))
    });
    if let Err(err) = written {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(err);
    }
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        Err(_) if image.initramfs.exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(VmError::io("rename", &dir)(e));
        }
    }
    progress(1, 1, "guest image ready");
    Ok(image)
}

/// The agent runs before any filesystem with a libc exists in the guest.
fn check_static(path: &Path, elf: &[u8]) -> Result<(), VmError> {
    if modules::elf_section(elf, ".interp").is_some() {
        return Err(VmError::Agent {
            path: path.to_path_buf(),
            reason: "it is dynamically linked; build it static with \
                     RUSTFLAGS=\"-C target-feature=+crt-static -C strip=symbols\" cargo build --release \
                     --target x86_64-unknown-linux-gnu -p cove-agent"
                .into(),
        });
    }
    if !elf.starts_with(b"\x7fELF") {
        return Err(VmError::Agent {
            path: path.to_path_buf(),
            reason: "it is not an ELF executable".into(),
        });
    }
    Ok(())
}

fn write_initramfs(path: &Path, agent: &[u8], kernel: &kernel::Kernel) -> Result<(), VmError> {
    let file = std::fs::File::create(path).map_err(VmError::io("create", path))?;
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(file));
    let io = VmError::io("write", path);
    let order = kernel.module_order()?;
    let net_order = kernel.net_module_order()?;
    let result = (|| -> std::io::Result<()> {
        for dir in ["dev", "proc", "sys", "cove", MODULES_DIR] {
            w.dir(dir, 0o755)?;
        }
        // The kernel opens /dev/console for init's stdio before anything
        // is mounted, so the node must be in the archive.
        w.char_device("dev/console", 0o600, 5, 1)?;
        w.file("init", 0o755, agent)?;
        for name in order.iter().chain(&net_order) {
            let data = std::fs::read(kernel.modules_dir().join(name))?;
            w.file(
                &format!("{MODULES_DIR}/{name}"),
                0o644,
                without_signature(&data),
            )?;
        }
        for (names, path) in [(&order, MODULE_ORDER), (&net_order, NET_MODULE_ORDER)] {
            let mut list = names.join("\n");
            list.push('\n');
            w.file(path, 0o644, list.as_bytes())?;
        }
        w.finish().map(|_| ())
    })();
    result.map_err(io)
}

/// A module without its appended signature. Debian signs its modules, and
/// the guest kernel verifies a signature whenever one is present (SHA-256
/// over the whole module, then RSA), which under TCG costs more than
/// loading the module; without one it loads the module all the same (the
/// guest does not enforce signatures) and notes a taint. The modules come
/// from Debian's package, whose own signature apt checked.
pub fn without_signature(module: &[u8]) -> &[u8] {
    const MAGIC: &[u8] = b"~Module signature appended~\n";
    // struct module_signature: 12 bytes, its last 4 the signature length
    // (big-endian); the signature sits right before it.
    let Some(body) = module.strip_suffix(MAGIC) else {
        return module;
    };
    let Some(info_at) = body.len().checked_sub(12) else {
        return module;
    };
    let sig_len = u32::from_be_bytes([
        body[info_at + 8],
        body[info_at + 9],
        body[info_at + 10],
        body[info_at + 11],
    ]) as usize;
    match info_at.checked_sub(sig_len) {
        Some(end) => &module[..end],
        None => module,
    }
}

/// Write a VM's initramfs: the shared one with the VM's config appended as
/// a second archive (the kernel unpacks both).
pub fn write_vm_initramfs(
    image: &GuestImage,
    config: &VmInitConfig,
    out: &Path,
) -> Result<(), VmError> {
    std::fs::copy(&image.initramfs, out).map_err(VmError::io("copy", &image.initramfs))?;
    let json = serde_json::to_vec(config).map_err(|e| VmError::Image(e.to_string()))?;
    let file = std::fs::OpenOptions::new()
        .append(true)
        .open(out)
        .map_err(VmError::io("open", out))?;
    let mut w = cpio::CpioWriter::new(std::io::BufWriter::new(file));
    w.file(CONFIG_PATH, 0o600, &json)
        .and_then(|()| w.finish().map(|_| ()))
        .map_err(VmError::io("write", out))
}

/// FNV-1a: a stable hash for cache keys (std's hasher may change between
/// Rust releases, which would orphan every cached image).
#[derive(Debug)]
pub(crate) struct Fnv(pub u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    pub fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_an_appended_module_signature_only() {
        let mut signed = b"\x7fELF module body".to_vec();
        signed.extend_from_slice(&[0xAA; 5]);
        signed.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        signed.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(without_signature(&signed), b"\x7fELF module body");
        assert_eq!(without_signature(b"plain"), b"plain");
        // A length that does not fit is left alone, not a panic.
        let mut bogus = vec![0u8; 8];
        bogus.extend_from_slice(&[0xff; 4]);
        bogus.extend_from_slice(b"~Module signature appended~\n");
        assert_eq!(without_signature(&bogus), &bogus[..]);
    }
}
