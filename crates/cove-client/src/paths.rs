//! Where cove keeps its files: templates and the daemon's database under the
//! data directory, per-sandbox state under the runtime directory.

use std::path::PathBuf;

/// Whether this process runs as root (effective uid 0); root gets the
/// system-wide directories.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn from_env(var: &str) -> Option<PathBuf> {
    std::env::var_os(var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// `$COVE_DATA_DIR`, else `/var/lib/cove` as root, `$XDG_DATA_HOME/cove` (or
/// `~/.local/share/cove`) otherwise.
pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = from_env("COVE_DATA_DIR") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/var/lib/cove");
    }
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("cove");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp"));
    home.join(".local/share/cove")
}

/// `$COVE_RUNTIME_DIR`, else `/run/cove` as root, `$XDG_RUNTIME_DIR/cove` otherwise.
pub fn default_runtime_dir() -> PathBuf {
    if let Some(dir) = from_env("COVE_RUNTIME_DIR") {
        return dir;
    }
    if is_root() {
        return PathBuf::from("/run/cove");
    }
    match std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        Some(dir) => PathBuf::from(dir).join("cove"),
        None => std::env::temp_dir().join(format!("cove-{}", nix::unistd::geteuid())),
    }
}

/// `$COVE_CGROUP_PARENT`, else `cove`: the cgroup directory sandboxes live under.
pub fn cgroup_parent() -> String {
    std::env::var("COVE_CGROUP_PARENT")
        .ok()
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "cove".into())
}

/// The local admin key written by `cove serve`, if this user can read it.
pub fn local_admin_key() -> Option<String> {
    let text = std::fs::read_to_string(default_data_dir().join("admin.key")).ok()?;
    let key = text.trim();
    (!key.is_empty()).then(|| key.to_string())
}
