//! Which kernel modules the guest needs, and in which order to load them.
//!
//! Debian's kernel package ships modules without `modules.dep` (depmod runs
//! when the package is installed, which cove never does), so the order is
//! worked out here from each module's own `.modinfo` ELF section: its
//! `depends=` (hard dependencies, by module name) and `softdep=pre:` (what
//! modprobe would load first, often by alias, e.g. `crypto-crc32c`).

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use crate::VmError;

/// What the guest loads: virtio-mmio transport, the root disk, vsock to the
/// host, and the filesystems of the root (EROFS below, overlay on top).
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "vmw_vsock_virtio_transport",
    "erofs",
    "overlay",
];

/// What a guest with a network device loads on top: the virtio-net driver
/// (and, through its dependencies, the failover modules).
pub const NETWORK_MODULES: &[&str] = &["virtio_net"];

/// The fields of a module's `.modinfo` that matter here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModInfo {
    pub name: String,
    pub depends: Vec<String>,
    /// `softdep=pre:` entries: names or aliases.
    pub pre: Vec<String>,
    pub aliases: Vec<String>,
}

/// Module names use `_`, file names may use `-`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The bytes of the section called `wanted` in a little-endian ELF64 file.
pub fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Option<&'a [u8]> {
    if elf.get(..4)? != b"\x7fELF" || *elf.get(4)? != 2 || *elf.get(5)? != 1 {
        return None;
    }
    let shoff = usize::try_from(u64_at(elf, 0x28)?).ok()?;
    let shentsize = usize::from(u16_at(elf, 0x3a)?);
    let shnum = usize::from(u16_at(elf, 0x3c)?);
    let shstrndx = usize::from(u16_at(elf, 0x3e)?);
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let at = shoff.checked_add(i.checked_mul(shentsize)?)?;
        let name = u32_at(elf, at)?;
        let offset = usize::try_from(u64_at(elf, at + 0x18)?).ok()?;
        let size = usize::try_from(u64_at(elf, at + 0x20)?).ok()?;
        Some((name, offset, size))
    };
    let (_, str_off, str_size) = section(shstrndx)?;
    let names = elf.get(str_off..str_off.checked_add(str_size)?)?;
    for i in 0..shnum {
        let (name, offset, size) = section(i)?;
        let name = names.get(name as usize..)?;
        let end = name.iter().position(|&b| b == 0)?;
        if &name[..end] == wanted.as_bytes() {
            return elf.get(offset..offset.checked_add(size)?);
        }
    }
    None
}

/// Parse a module's `.modinfo` (NUL-separated `key=value` strings).
pub fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = value.to_string(),
            "depends" => info
                .depends
                .extend(value.split(',').filter(|d| !d.is_empty()).map(normalize)),
            "alias" => info.aliases.push(value.to_string()),
            "softdep" => {
                // "pre: a b post: c"
                let mut in_pre = false;
                for word in value.split_whitespace() {
                    match word {
                        "pre:" => in_pre = true,
                        "post:" => in_pre = false,
                        dep if in_pre => info.pre.push(dep.to_string()),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    info
}

/// Every module file under a `lib/modules/<version>` tree, by module name.
pub fn index(modules_root: &Path) -> Result<BTreeMap<String, PathBuf>, VmError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![modules_root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(VmError::io("read", &dir))?;
        for entry in entries {
            let entry = entry.map_err(VmError::io("read", &dir))?;
            let path = entry.path();
            let Ok(kind) = entry.file_type() else {
                continue;
            };
            if kind.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().and_then(|n| n.to_str())
                && let Some(stem) = name.strip_suffix(".ko")
            {
                out.insert(normalize(stem), path);
            }
        }
    }
    Ok(out)
}

fn modinfo(path: &Path) -> Result<ModInfo, VmError> {
    let bytes = std::fs::read(path).map_err(VmError::io("read", path))?;
    let section = elf_section(&bytes, ".modinfo").ok_or_else(|| {
        VmError::Image(format!(
            "{} is not a kernel module (no .modinfo section)",
            path.display()
        ))
    })?;
    Ok(parse_modinfo(section))
}

/// The files to load, dependencies first, for the modules in `wanted`.
/// `builtin` holds names compiled into the kernel (from `modules.builtin`),
/// which need no file.
pub fn load_order(
    files: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    wanted: &[&str],
) -> Result<Vec<PathBuf>, VmError> {
    let mut infos: BTreeMap<String, ModInfo> = BTreeMap::new();
    let mut aliases: Option<BTreeMap<String, Vec<String>>> = None;
    let mut order = Vec::new();
    let mut done = HashSet::new();
    // Iterative depth-first walk; a module is emitted after its dependencies.
    enum Step {
        Visit(String, Vec<String>),
        Emit(String),
    }
    let mut stack: Vec<Step> = wanted
        .iter()
        .rev()
        .map(|w| Step::Visit(normalize(w), Vec::new()))
        .collect();
    while let Some(step) = stack.pop() {
        match step {
            Step::Emit(name) => {
                if done.insert(name.clone())
                    && let Some(path) = files.get(&name)
                {
                    order.push(path.clone());
                }
            }
            Step::Visit(name, chain) => {
                if done.contains(&name) || builtin.contains(&name) {
                    continue;
                }
                if chain.contains(&name) {
                    return Err(VmError::Image(format!(
                        "kernel modules depend on each other in a cycle: {} -> {name}",
                        chain.join(" -> ")
                    )));
                }
                let Some(path) = files.get(&name) else {
                    return Err(VmError::Image(format!(
                        "the guest needs kernel module {name:?} (via {}), which the kernel \
                         package neither ships nor builds in",
                        if chain.is_empty() {
                            "cove".into()
                        } else {
                            chain.join(" -> ")
                        }
                    )));
                };
                if !infos.contains_key(&name) {
                    infos.insert(name.clone(), modinfo(path)?);
                }
                let info = infos.get(&name).cloned().unwrap_or_default();
                let mut next_chain = chain.clone();
                next_chain.push(name.clone());
                stack.push(Step::Emit(name.clone()));
                for dep in info.depends.iter().rev() {
                    stack.push(Step::Visit(dep.clone(), next_chain.clone()));
                }
                for pre in info.pre.iter().rev() {
                    let pre_name = normalize(pre);
                    if files.contains_key(&pre_name) || builtin.contains(&pre_name) {
                        stack.push(Step::Visit(pre_name, next_chain.clone()));
                        continue;
                    }
                    // An alias: find who provides it (scanned once, lazily).
                    if aliases.is_none() {
                        aliases = Some(alias_index(files)?);
                    }
                    let providers = aliases
                        .as_ref()
                        .and_then(|a| a.get(pre.as_str()))
                        .cloned()
                        .unwrap_or_default();
                    // Prefer the portable implementation: a CPU-specific one
                    // (crc32c-intel) fails to load on a CPU without it.
                    let chosen = providers
                        .iter()
                        .find(|p| p.contains("generic"))
                        .or_else(|| providers.first());
                    if let Some(provider) = chosen {
                        stack.push(Step::Visit(provider.clone(), next_chain.clone()));
                    }
                    // No provider: modprobe would skip it too; it may be built in.
                }
            }
        }
    }
    Ok(order)
}

fn alias_index(
    files: &BTreeMap<String, PathBuf>,
) -> Result<BTreeMap<String, Vec<String>>, VmError> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, path) in files {
        // Only crypto and library modules provide the aliases soft
        // dependencies use; reading every driver would take seconds.
        let s = path.to_string_lossy();
        if !(s.contains("/crypto/") || s.contains("/lib/") || s.contains("/arch/")) {
            continue;
        }
        for alias in modinfo(path)?.aliases {
            out.entry(alias).or_default().push(name.clone());
        }
    }
    Ok(out)
}

/// Names from a `modules.builtin` file (`kernel/fs/foo.ko` → `foo`).
pub fn parse_builtin(text: &str) -> HashSet<String> {
    text.lines()
        .filter_map(|l| l.rsplit('/').next())
        .filter_map(|f| f.strip_suffix(".ko"))
        .map(normalize)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_depends_softdeps_and_aliases() {
        let info = parse_modinfo(
            b"license=GPL\0softdep=pre: crypto-crc32c post: foo\0depends=jbd2,mbcache,crc16\0\
              alias=fs-ext4\0name=ext4\0",
        );
        assert_eq!(info.name, "ext4");
        assert_eq!(info.depends, ["jbd2", "mbcache", "crc16"]);
        assert_eq!(info.pre, ["crypto-crc32c"]);
        assert_eq!(info.aliases, ["fs-ext4"]);
        assert!(parse_modinfo(b"depends=\0").depends.is_empty());
    }

    /// A minimal ELF64 with a section table: [null, .shstrtab, .modinfo].
    fn fake_module(modinfo: &[u8]) -> Vec<u8> {
        let shstrtab = b"\0.shstrtab\0.modinfo\0";
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        let str_off = elf.len();
        elf.extend_from_slice(shstrtab);
        let info_off = elf.len();
        elf.extend_from_slice(modinfo);
        let shoff = elf.len();
        elf[0x28..0x30].copy_from_slice(&(shoff as u64).to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        for (name, off, size) in [
            (0u32, 0usize, 0usize),
            (1, str_off, shstrtab.len()),
            (11, info_off, modinfo.len()),
        ] {
            let mut sh = vec![0u8; 64];
            sh[..4].copy_from_slice(&name.to_le_bytes());
            sh[0x18..0x20].copy_from_slice(&(off as u64).to_le_bytes());
            sh[0x20..0x28].copy_from_slice(&(size as u64).to_le_bytes());
            elf.extend_from_slice(&sh);
        }
        elf
    }

    #[test]
    fn finds_sections_and_rejects_garbage() {
        let elf = fake_module(b"name=x\0");
        assert_eq!(elf_section(&elf, ".modinfo"), Some(&b"name=x\0"[..]));
        assert_eq!(elf_section(&elf, ".text"), None);
        assert_eq!(elf_section(b"not an elf", ".modinfo"), None);
        assert_eq!(elf_section(&elf[..70], ".modinfo"), None);
    }

    #[test]
    fn orders_dependencies_first_and_resolves_soft_aliases() -> Result<(), VmError> {
        let dir = tempfile::tempdir().map_err(VmError::io("create", Path::new("tmp")))?;
        let write = |rel: &str, info: &[u8]| {
            let path = dir.path().join(rel);
            if let Some(parent) = path.parent() {
                let _ = std::fs::create_dir_all(parent);
            }
            let _ = std::fs::write(&path, fake_module(info));
        };
        write(
            "kernel/fs/ext4/ext4.ko",
            b"softdep=pre: crypto-crc32c\0depends=jbd2,crc16\0",
        );
        write("kernel/fs/jbd2/jbd2.ko", b"depends=\0");
        write(
            "kernel/crypto/crc32c_generic.ko",
            b"alias=crypto-crc32c\0depends=\0",
        );
        write(
            "kernel/arch/x86/crc32c-intel.ko",
            b"alias=crypto-crc32c\0depends=\0",
        );
        write("kernel/fs/overlayfs/overlay.ko", b"depends=\0");
        let files = index(dir.path())?;
        assert!(files.contains_key("crc32c_intel"));
        let builtin = parse_builtin("kernel/lib/crc16.ko\n");
        let order = load_order(&files, &builtin, &["ext4", "overlay"])?;
        let names: Vec<_> = order
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_string))
            .collect();
        assert_eq!(
            names,
            ["crc32c_generic.ko", "jbd2.ko", "ext4.ko", "overlay.ko"]
        );
        let missing = load_order(&files, &builtin, &["nosuch"]);
        assert!(matches!(missing, Err(VmError::Image(m)) if m.contains("nosuch")));
        Ok(())
    }
}
