//! Turning a template and user options into a sandbox configuration: the
//! one place that decides a sandbox's environment, directory and files.

use std::path::Path;

use cove_isolate::{AgentSettings, Limits, RootfsSpec, SandboxConfig};
use cove_template::Template;
use rand::Rng;

/// Default cap of a sandbox's writable layer.
pub const DEFAULT_DISK: u64 = 1 << 30;

/// What a user may choose about a new sandbox.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub limits: Limits,
    pub disk: Option<u64>,
    pub env: Vec<(String, String)>,
    pub cwd: Option<String>,
    pub user: Option<String>,
    /// The cgroup directory sandboxes are created under.
    pub cgroup_parent: String,
    /// The sandbox's `/etc/resolv.conf` (egress sandboxes: cove's DNS
    /// forwarder); `None` leaves the template's.
    pub resolv_conf: Option<String>,
    /// The sandbox's address, gateway and resolver, for a backend whose
    /// guest configures its own interface (microVMs); `None` = no egress.
    pub guest_network: Option<cove_agent::vm_init::GuestNetwork>,
}

impl Default for SandboxOptions {
    fn default() -> SandboxOptions {
        SandboxOptions {
            limits: Limits::default(),
            disk: None,
            env: Vec::new(),
            cwd: None,
            user: None,
            cgroup_parent: DEFAULT_CGROUP_PARENT.into(),
            resolv_conf: None,
            guest_network: None,
        }
    }
}

/// The cgroup directory sandboxes live under unless configured otherwise.
pub const DEFAULT_CGROUP_PARENT: &str = "cove";

/// `sbx-` and 8 random lowercase letters or digits.
pub fn new_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut rng = rand::rng();
    let suffix: String = (0..8)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect();
    format!("sbx-{suffix}")
}

/// Check limits before anything is created.
pub fn validate_limits(limits: &Limits) -> Result<(), String> {
    if let Some(memory) = limits.memory
        && memory < 8 << 20
    {
        return Err(format!(
            "memory limit {memory} bytes is below the minimum of 8M"
        ));
    }
    if let Some(pids) = limits.pids
        && pids < 4
    {
        return Err(format!("pids limit {pids} is below the minimum of 4"));
    }
    if let Some(cpus) = limits.cpus {
        let available = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1) as f64;
        if !(cpus >= 0.01 && cpus <= available) {
            return Err(format!(
                "cpus {cpus} is out of range: this host allows 0.01 to {available}"
            ));
        }
    }
    Ok(())
}

/// The full configuration of sandbox `id` from `template`.
pub fn sandbox_config(
    id: &str,
    template: &Template,
    options: &SandboxOptions,
    state_root: &Path,
) -> SandboxConfig {
    let image = &template.meta.config;
    let mut env = image.env.clone();
    for (k, v) in &options.env {
        match env.iter_mut().find(|(key, _)| key == k) {
            Some(slot) => slot.1 = v.clone(),
            None => env.push((k.clone(), v.clone())),
        }
    }
    let cwd = options
        .cwd
        .clone()
        .or_else(|| image.working_dir.clone())
        .unwrap_or_else(|| "/workspace".into());
    let hosts = format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t{id}\n"
    );
    let mut files = vec![
        ("/etc/hostname".into(), format!("{id}\n").into_bytes()),
        ("/etc/hosts".into(), hosts.into_bytes()),
    ];
    if let Some(resolv) = &options.resolv_conf {
        files.push(("/etc/resolv.conf".into(), resolv.clone().into_bytes()));
    }
    SandboxConfig {
        id: id.to_string(),
        rootfs: RootfsSpec {
            layers: template.layers.clone(),
            locks: template.locks.clone(),
            binds: template.binds.clone(),
            masks: template.masks.clone(),
            disk_bytes: options.disk.unwrap_or(DEFAULT_DISK),
            files,
        },
        limits: options.limits.clone(),
        state_dir: state_root.join(id),
        cgroup_parent: options.cgroup_parent.clone(),
        agent: AgentSettings {
            env,
            cwd,
            user: options.user.clone().or_else(|| image.user.clone()),
        },
        die_with_parent: false,
        listen: false,
        agent_log: None,
        accounting: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_declared_shape() {
        for _ in 0..100 {
            let id = new_id();
            assert_eq!(id.len(), 12);
            assert!(id.starts_with("sbx-"));
            assert!(
                id[4..]
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            );
        }
    }

    #[test]
    fn limits_are_checked() {
        assert!(
            validate_limits(&Limits {
                memory: Some(1 << 20),
                ..Limits::default()
            })
            .is_err()
        );
        assert!(
            validate_limits(&Limits {
                cpus: Some(0.0),
                ..Limits::default()
            })
            .is_err()
        );
        assert!(
            validate_limits(&Limits {
                cpus: Some(100000.0),
                ..Limits::default()
            })
            .is_err()
        );
        assert!(
            validate_limits(&Limits {
                pids: Some(1),
                ..Limits::default()
            })
            .is_err()
        );
        assert!(
            validate_limits(&Limits {
                memory: Some(512 << 20),
                pids: Some(64),
                cpus: Some(0.5)
            })
            .is_ok()
        );
    }
}
