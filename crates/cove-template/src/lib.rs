//! Templates: the read-only root filesystems sandboxes start from.
//!
//! ```text
//!  <data>/templates/
//!    host/      built in: a skeleton root; the host's /usr and /etc are bound in read-only
//!    busybox/   `cove template build busybox`, from Debian's busybox-static
//!      template.json   name, kind, image config (env, workdir, user, entrypoint, cmd),
//!                      and its layers (digests, topmost first)
//!      rootfs -> ../layers/sha256/<hex>/fs   (single-layer templates, for the microVM backend)
//!    python/    `cove template import` / `pull`: an image, one layer per image layer
//!    layers/    every layer once, by digest (see `layers.rs`), shared by templates
//!    .lock      imports hold it shared; garbage collection takes it exclusively
//! ```
//!
//! A sandbox's root is an overlay whose lower directories are its
//! template's layers. A template directory and each layer appear
//! atomically (built in a temporary sibling, then renamed into place), so
//! an interrupted build leaves nothing half-built behind.
//!
//! In use: a sandbox holds a shared `flock` on its template's
//! `template.json` and on each of its layer directories for as long as it
//! runs (the lock lives in its agent), so `remove` refuses a template that
//! a running sandbox stands on — whoever started it (`cove serve` or
//! `cove run`) — and garbage collection never deletes a layer in use.

mod busybox;
mod debian;
mod extract;
mod fsutil;
mod image;
mod import;
pub mod layers;
mod pull;
mod snapshot;
mod tree;

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use cove_isolate::Bind;
use serde::{Deserialize, Serialize};

pub use busybox::BUSYBOX_PATH;
pub use debian::DebianOptions;
pub use import::ImportOptions;
pub use layers::{Digest, LayerInfo, LayerStore};
pub use pull::{PullOptions, default_name_for};
pub use snapshot::{SnapshotSource, StagedSnapshot};

/// The template every sandbox gets when none is named.
pub const DEFAULT_TEMPLATE: &str = "host";

/// Directories every template has, with their modes.
pub const STANDARD_DIRS: &[(&str, u32)] = &[
    ("tmp", 0o1777),
    ("var/tmp", 0o1777),
    ("workspace", 0o755),
    ("home/user", 0o755),
    ("root", 0o700),
    ("proc", 0o555),
    ("dev", 0o755),
    ("sys", 0o555),
    ("run", 0o755),
    ("mnt", 0o755),
    ("etc", 0o755),
];

/// Host files that a sandbox on the host template must not read.
const HOST_SECRETS: &[&str] = &[
    "/etc/shadow",
    "/etc/shadow-",
    "/etc/gshadow",
    "/etc/gshadow-",
    "/etc/security/opasswd",
    "/etc/sudoers",
    "/etc/sudoers.d",
    "/etc/ssl/private",
];

#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("unknown template {name:?}; available: {available}")]
    Unknown { name: String, available: String },
    #[error(
        "template name {0:?} must be 1-64 lowercase letters, digits, '-', '_' or '.' \
         (and not `layers`)"
    )]
    BadName(String),
    #[error(
        "template {0:?} already exists; remove it first (cove template rm {0}) or ask to replace it"
    )]
    Exists(String),
    #[error(
        "template {0:?} is in use by a running sandbox; delete the sandboxes started from it first"
    )]
    InUse(String),
    /// The template predates layered storage and must be rebuilt for this.
    #[error("{0}")]
    Outdated(String),
    /// The image or source is unusable: corrupt, truncated, malicious, unsupported.
    #[error("{0}")]
    Image(String),
    /// The registry failed or refused.
    #[error("{0}")]
    Registry(String),
    /// The registry did not answer in time.
    #[error("{0}")]
    RegistryTimeout(String),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("template {name:?} is damaged: {reason}")]
    Damaged { name: String, reason: String },
    #[error("{0}")]
    Build(String),
    #[error("the {0} template is built in and cannot be removed")]
    BuiltIn(String),
}

pub(crate) fn io_err<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> TemplateError + 'a {
    move |source| TemplateError::Io {
        action,
        path: path.to_path_buf(),
        source,
    }
}

/// What an image says about how to run it (OCI image config, simplified).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default)]
    pub env: Vec<(String, String)>,
    #[serde(default)]
    pub working_dir: Option<String>,
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub entrypoint: Vec<String>,
    #[serde(default)]
    pub cmd: Vec<String>,
}

/// How a template's root is put together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TemplateKind {
    /// A skeleton root plus the host's /usr and /etc, read-only.
    Host,
    /// A self-contained root filesystem (built, or imported from a
    /// directory or tarball).
    Rootfs,
    /// A container image (OCI layout, docker archive, registry).
    Image,
}

impl TemplateKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TemplateKind::Host => "host",
            TemplateKind::Rootfs => "rootfs",
            TemplateKind::Image => "image",
        }
    }
}

/// What long operations report, for progress bars. Called from any thread.
pub trait Observer: Send + Sync {
    /// Progress of one layer: `phase` is `download`, `extract`, `copy`,
    /// `digest`, `verify`, `exists` (already stored) or `done`; `total` is
    /// 0 when unknown.
    fn layer(&self, _layer: &str, _phase: &str, _done: u64, _total: u64) {}
    /// A step without a size.
    fn step(&self, _message: &str) {}
}

/// An observer that ignores everything.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quiet;

impl Observer for Quiet {}

/// The metadata file of a template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub name: String,
    pub kind: TemplateKind,
    /// Where it came from ("built-in", "busybox-static 1.35.0", an image reference).
    pub source: String,
    /// Unix seconds.
    pub created: u64,
    #[serde(default)]
    pub config: ImageConfig,
    /// Layers in the layer store, topmost first. Empty for the host
    /// template and for templates built before layers existed (their
    /// `rootfs/` directory is the only layer).
    #[serde(default)]
    pub layers: Vec<Digest>,
}

/// A template ready to be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub meta: TemplateMeta,
    /// The directory holding the template.
    pub dir: PathBuf,
    /// Overlay layers, topmost first.
    pub layers: Vec<PathBuf>,
    /// Host paths bound into the sandbox.
    pub binds: Vec<Bind>,
    /// Sandbox paths hidden from it.
    pub masks: Vec<String>,
    /// Files a sandbox holds a shared lock on while it runs (its
    /// template.json and its layer directories), so that neither is
    /// removed from under it.
    pub locks: Vec<PathBuf>,
}

impl Template {
    pub fn name(&self) -> &str {
        &self.meta.name
    }

    /// The layers that make the whole root filesystem, topmost first;
    /// empty for the host template, whose root is mostly the host's own
    /// directories bound in.
    pub fn root_layers(&self) -> &[PathBuf] {
        if self.meta.kind == TemplateKind::Host {
            &[]
        } else {
            &self.layers
        }
    }
}

/// The templates in one data directory.
#[derive(Debug, Clone)]
pub struct TemplateStore {
    root: PathBuf,
}

/// Progress of a long operation: (done, total, what is happening).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name != "layers"
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
}

pub(crate) fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Create the standard directories of a root filesystem.
pub fn create_standard_dirs(rootfs: &Path) -> Result<(), TemplateError> {
    for (dir, mode) in STANDARD_DIRS {
        let path = rootfs.join(dir);
        fs::DirBuilder::new()
            .recursive(true)
            .create(&path)
            .map_err(io_err("create", &path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(*mode))
            .map_err(io_err("chmod", &path))?;
    }
    Ok(())
}

impl TemplateStore {
    /// The store under `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> TemplateStore {
        TemplateStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    /// Look a template up by name. The host template is created on demand.
    pub fn get(&self, name: &str) -> Result<Template, TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::BadName(name.to_string()));
        }
        if name == DEFAULT_TEMPLATE {
            return self.host();
        }
        let dir = self.dir(name);
        let meta_path = dir.join("template.json");
        let text = match fs::read_to_string(&meta_path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut available = self.names();
                if !available.iter().any(|n| n == DEFAULT_TEMPLATE) {
                    available.insert(0, DEFAULT_TEMPLATE.to_string());
                }
                let mut listed = available.join(", ");
                if name == "busybox" {
                    listed.push_str(" (build busybox with `cove template build busybox`)");
                }
                return Err(TemplateError::Unknown {
                    name: name.to_string(),
                    available: listed,
                });
            }
            Err(e) => return Err(io_err("read", &meta_path)(e)),
        };
        let meta: TemplateMeta =
            serde_json::from_str(&text).map_err(|e| TemplateError::Damaged {
                name: name.into(),
                reason: e.to_string(),
            })?;
        self.resolve(meta, dir)
    }

    /// The layer store of this template store.
    pub fn layers(&self) -> LayerStore {
        LayerStore::new(self.root.join("layers"))
    }

    /// A template's directories and locks, from its metadata.
    fn resolve(&self, meta: TemplateMeta, dir: PathBuf) -> Result<Template, TemplateError> {
        let store = self.layers();
        let mut layers = Vec::new();
        let mut locks = vec![dir.join("template.json")];
        for digest in &meta.layers {
            let fs_dir = store.fs(digest);
            if !fs_dir.is_dir() {
                return Err(TemplateError::Damaged {
                    name: meta.name.clone(),
                    reason: format!(
                        "its layer {digest} is missing from {}",
                        store.root().display()
                    ),
                });
            }
            layers.push(fs_dir);
            locks.push(store.dir(digest));
        }
        let mut template = Template {
            meta,
            dir,
            layers,
            binds: Vec::new(),
            masks: Vec::new(),
            locks,
        };
        if template.meta.kind == TemplateKind::Host {
            let host = self.host()?;
            template.layers.extend(host.layers);
            template.binds = host.binds;
            template.masks = host.masks;
        } else if template.meta.layers.is_empty() {
            let rootfs = template.dir.join("rootfs");
            if !rootfs.is_dir() {
                return Err(TemplateError::Damaged {
                    name: template.meta.name.clone(),
                    reason: "it has neither layers nor a rootfs/ directory".into(),
                });
            }
            template.layers.push(rootfs);
        }
        Ok(template)
    }

    /// Names of the templates present on disk (the host template is listed
    /// once it has been used).
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.path().join("template.json").is_file())
            .filter_map(|e| e.file_name().into_string().ok())
            .collect();
        names.sort();
        names
    }

    /// Every template, the built-in host template first.
    pub fn list(&self) -> Vec<Template> {
        let mut names = self.names();
        names.retain(|n| n != DEFAULT_TEMPLATE);
        names.insert(0, DEFAULT_TEMPLATE.to_string());
        names.iter().filter_map(|n| self.get(n).ok()).collect()
    }

    /// Remove a template, unless a running sandbox uses it; then remove
    /// the layers no other template uses.
    pub fn remove(&self, name: &str) -> Result<(), TemplateError> {
        if name == DEFAULT_TEMPLATE {
            return Err(TemplateError::BuiltIn(name.into()));
        }
        let template = self.get(name)?;
        let meta_path = template.dir.join("template.json");
        let meta_file = fs::File::open(&meta_path).map_err(io_err("open", &meta_path))?;
        match meta_file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => return Err(TemplateError::InUse(name.into())),
            Err(fs::TryLockError::Error(e)) => return Err(io_err("lock", &meta_path)(e)),
        }
        let trash = self
            .root
            .join(format!(".trash-{name}-{}", std::process::id()));
        fs::rename(&template.dir, &trash).map_err(io_err("remove", &template.dir))?;
        let removed = fs::remove_dir_all(&trash).map_err(io_err("remove", &trash));
        drop(meta_file);
        removed?;
        self.collect_garbage();
        Ok(())
    }

    /// Remove layers no template references and no sandbox uses. Skipped
    /// (left for next time) while an import is running.
    pub fn collect_garbage(&self) -> Vec<Digest> {
        let Ok(lock) = self.lock_file() else {
            return Vec::new();
        };
        if lock.try_lock().is_err() {
            return Vec::new();
        }
        let mut referenced = std::collections::HashSet::new();
        for entry in fs::read_dir(&self.root).into_iter().flatten().flatten() {
            // Templates being built or replaced count too.
            let Ok(text) = fs::read_to_string(entry.path().join("template.json")) else {
                continue;
            };
            match serde_json::from_str::<TemplateMeta>(&text) {
                Ok(meta) => referenced.extend(meta.layers),
                // Unreadable metadata: keep everything rather than guess.
                Err(_) => return Vec::new(),
            }
        }
        self.layers().collect_garbage(&referenced)
    }

    fn lock_file(&self) -> Result<fs::File, TemplateError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io_err("create", &self.root))?;
        let path = self.root.join(".lock");
        fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))
    }

    /// Held (shared) while layers are written and until their template
    /// exists, so that garbage collection leaves them alone.
    pub(crate) fn importing(&self) -> Result<fs::File, TemplateError> {
        let lock = self.lock_file()?;
        lock.lock_shared()
            .map_err(io_err("lock", &self.root.join(".lock")))?;
        Ok(lock)
    }

    /// Refuse early what `install_layers` would refuse at the end.
    pub fn check_new(&self, name: &str, replace: bool) -> Result<(), TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::BadName(name.into()));
        }
        if name == DEFAULT_TEMPLATE {
            return Err(TemplateError::BuiltIn(name.into()));
        }
        if !replace && self.dir(name).join("template.json").is_file() {
            return Err(TemplateError::Exists(name.into()));
        }
        Ok(())
    }

    /// Create template `name` from stored layers (topmost first).
    pub fn install_layers(
        &self,
        name: &str,
        kind: TemplateKind,
        source: String,
        config: ImageConfig,
        layers: Vec<Digest>,
        replace: bool,
    ) -> Result<Template, TemplateError> {
        self.check_new(name, replace)?;
        let staging = self.staging(name)?;
        let result = (|| {
            if let [only] = layers.as_slice()
                && kind != TemplateKind::Host
            {
                // The microVM backend reads a template's rootfs/.
                let link = staging.join("rootfs");
                symlink(format!("../layers/sha256/{}/fs", only.hex()), &link)
                    .map_err(io_err("symlink", &link))?;
            }
            let meta = TemplateMeta {
                name: name.into(),
                kind,
                source,
                created: now(),
                config,
                layers,
            };
            if !replace && self.dir(name).join("template.json").is_file() {
                return Err(TemplateError::Exists(name.into()));
            }
            self.install(&staging, &meta)?;
            self.get(name)
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Move a finished build from `staging` into place as `name`.
    pub fn install(&self, staging: &Path, meta: &TemplateMeta) -> Result<(), TemplateError> {
        let meta_path = staging.join("template.json");
        let json =
            serde_json::to_vec_pretty(meta).map_err(|e| TemplateError::Build(e.to_string()))?;
        fs::write(&meta_path, json).map_err(io_err("write", &meta_path))?;
        let dir = self.dir(&meta.name);
        if dir.exists() {
            let old = staging.with_file_name(format!(
                ".old-{}",
                staging.file_name().and_then(|n| n.to_str()).unwrap_or("x")
            ));
            fs::rename(&dir, &old).map_err(io_err("replace", &dir))?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(staging, &dir).map_err(io_err("install", &dir))
    }

    /// A fresh staging directory for building template `name`.
    pub fn staging(&self, name: &str) -> Result<PathBuf, TemplateError> {
        if !valid_name(name) {
            return Err(TemplateError::BadName(name.to_string()));
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(&self.root)
            .map_err(io_err("create", &self.root))?;
        // Unique per build, also between threads of one process.
        static BUILDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = BUILDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let staging = self
            .root
            .join(format!(".build-{name}-{}-{n}", std::process::id()));
        if staging.exists() {
            fs::remove_dir_all(&staging).map_err(io_err("clean", &staging))?;
        }
        fs::create_dir(&staging).map_err(io_err("create", &staging))?;
        Ok(staging)
    }

    /// Build the busybox template from the host's static busybox.
    pub fn build_busybox(&self, progress: Progress<'_>) -> Result<Template, TemplateError> {
        busybox::build(self, Path::new(BUSYBOX_PATH), progress)
    }

    /// The built-in host template.
    fn host(&self) -> Result<Template, TemplateError> {
        let dir = self.dir(DEFAULT_TEMPLATE);
        let rootfs = dir.join("rootfs");
        let meta = TemplateMeta {
            name: DEFAULT_TEMPLATE.into(),
            kind: TemplateKind::Host,
            source: "built-in: the host's /usr and /etc, read-only".into(),
            created: 0,
            config: ImageConfig {
                working_dir: Some("/workspace".into()),
                ..ImageConfig::default()
            },
            layers: Vec::new(),
        };
        let marker = dir.join("template.json");
        // One builder at a time in this process; other processes are
        // handled by the atomic rename in `install`.
        static HOST_BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _building = HOST_BUILD
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !marker.is_file() {
            let staging = self.staging(DEFAULT_TEMPLATE)?;
            let skeleton = staging.join("rootfs");
            create_standard_dirs(&skeleton)?;
            fs::create_dir_all(skeleton.join("usr")).map_err(io_err("create", &skeleton))?;
            for top in host_top_level() {
                let link = skeleton.join(&top.name);
                match &top.link {
                    Some(target) => symlink(target, &link).map_err(io_err("symlink", &link))?,
                    None => fs::create_dir_all(&link).map_err(io_err("create", &link))?,
                }
            }
            let created = TemplateMeta {
                created: now(),
                ..meta.clone()
            };
            match self.install(&staging, &created) {
                Ok(_) => {}
                // Another process built it at the same moment.
                Err(_) if marker.is_file() => {
                    let _ = fs::remove_dir_all(&staging);
                }
                Err(e) => return Err(e),
            }
        }
        let mut binds = vec![
            Bind {
                source: "/usr".into(),
                target: "/usr".into(),
                writable: false,
            },
            Bind {
                source: "/etc".into(),
                target: "/etc".into(),
                writable: false,
            },
        ];
        for top in host_top_level() {
            if top.link.is_none() {
                binds.push(Bind {
                    source: Path::new("/").join(&top.name),
                    target: format!("/{}", top.name),
                    writable: false,
                });
            }
        }
        let masks = HOST_SECRETS
            .iter()
            .map(|s| s.to_string())
            .chain(ssh_host_keys())
            .collect();
        Ok(Template {
            meta,
            dir,
            layers: vec![rootfs],
            binds,
            masks,
            locks: Vec::new(),
        })
    }
}

struct TopLevel {
    name: String,
    /// Where a merged-/usr symlink points, or `None` for a real directory.
    link: Option<PathBuf>,
}

/// The host's /bin, /sbin and /lib* entries: symlinks into /usr on merged
/// systems (mirrored as symlinks), real directories elsewhere (bound).
fn host_top_level() -> Vec<TopLevel> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir("/") else {
        return out;
    };
    for entry in entries.flatten() {
        let Ok(name) = entry.file_name().into_string() else {
            continue;
        };
        if !(name == "bin" || name == "sbin" || name.starts_with("lib")) {
            continue;
        }
        let path = entry.path();
        match fs::read_link(&path) {
            Ok(target) => out.push(TopLevel {
                name,
                link: Some(target),
            }),
            Err(_) if path.is_dir() => out.push(TopLevel { name, link: None }),
            Err(_) => {}
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn ssh_host_keys() -> Vec<String> {
    fs::read_dir("/etc/ssh")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("ssh_host_") && n.ends_with("_key"))
        .map(|n| format!("/etc/ssh/{n}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(valid_name("busybox"));
        assert!(valid_name("python-3.12"));
        assert!(!valid_name("../x"));
        assert!(!valid_name(".hidden"));
        assert!(!valid_name("Upper"));
        assert!(!valid_name(""));
    }

    #[test]
    fn host_template_is_created_on_demand() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path());
        let host = store.get("host").unwrap();
        assert_eq!(host.meta.kind, TemplateKind::Host);
        let rootfs = &host.layers[0];
        for (d, _) in STANDARD_DIRS {
            assert!(rootfs.join(d).is_dir(), "{d} missing");
        }
        assert!(host.binds.iter().any(|b| b.target == "/usr" && !b.writable));
        assert!(host.masks.iter().any(|m| m == "/etc/shadow"));
        // Second lookup reuses it.
        assert_eq!(store.get("host").unwrap().layers, host.layers);
        assert_eq!(store.names(), vec!["host".to_string()]);
    }

    #[test]
    fn unknown_template_names_the_available_ones() {
        let dir = tempfile::tempdir().unwrap();
        let store = TemplateStore::new(dir.path());
        let err = store.get("busybox").unwrap_err().to_string();
        assert!(err.contains("unknown template \"busybox\""), "{err}");
        assert!(err.contains("cove template build busybox"), "{err}");
        assert!(matches!(
            store.get("../etc"),
            Err(TemplateError::BadName(_))
        ));
        assert!(matches!(
            store.remove("host"),
            Err(TemplateError::BuiltIn(_))
        ));
    }
}
