//! `cove run --backend microvm`: the embedded engine on a microVM. Boot a
//! VM in this process (no daemon), run one command in it with stdio
//! streamed, destroy the VM, exit with the command's status.
//!
//! The VMM runs in its own session (it is built to outlive a daemon), so
//! nothing kills it if `cove run` itself is killed: each VM's directory
//! holds the PID of the `cove run` that owns it, and the next
//! `cove run --backend microvm` destroys VMs whose owner is gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cove_protocol::ProcessSpec;
use cove_server::backend::microvm::{self as backend, DEFAULT_VM_TEMPLATE};
use cove_server::engine::{self, SandboxOptions};
use cove_template::TemplateStore;
use cove_vm::{Vm, VmConfig, VmRecord};

use crate::run::{RunArgs, catch_signals, drive};
use crate::{ExitCode, Failure, paths};

/// Where `cove run` keeps its VMs' state: short, for socket paths.
fn state_root() -> PathBuf {
    paths::default_runtime_dir().join("run-vm")
}

/// The kernel and guest image cache, shared with the daemon's default.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("COVE_VM_CACHE")
        .filter(|p| !p.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| paths::default_data_dir().join("vm"))
}

/// Progress of the one-time image builds, on a terminal only (so scripts
/// see only the command's own stderr).
fn progress(done: u64, total: u64, what: &str) {
    if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        eprintln!("cove: [{done}/{total}] {what}");
    }
}

pub fn run(args: &RunArgs, spec: ProcessSpec) -> Result<ExitCode, Failure> {
    let me = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the cove binary: {e}")))?;
    let agent = backend::probe_host(&me).map_err(|why| {
        Failure::new(format!(
            "the microvm backend is not available on this host: {why}"
        ))
    })?;
    let limits = cove_isolate::Limits {
        memory: args.memory,
        cpus: args.cpus,
        pids: args.pids,
    };
    engine::validate_limits(&limits).map_err(Failure::new)?;
    let (vcpus, memory_mib) = backend::vm_size(&limits).map_err(|e| Failure::new(e.to_string()))?;

    let store = TemplateStore::new(paths::default_data_dir().join("templates"));
    let name = args.template.as_deref().unwrap_or(DEFAULT_VM_TEMPLATE);
    let template = match store.get(name) {
        Ok(t) => t,
        // The microVM default is built on first use, as the host template is.
        Err(cove_template::TemplateError::Unknown { .. }) if name == DEFAULT_VM_TEMPLATE => store
            .build_busybox(&mut progress)
            .map_err(|e| Failure::new(e.to_string()))?,
        Err(e) => return Err(Failure::new(e.to_string())),
    };
    let root = state_root();
    sweep_stale(&root);
    let image = cove_vm::ensure_guest_image(&cache_dir(), &agent, &mut progress)
        .map_err(|e| Failure::new(e.to_string()))?;
    let disk =
        cove_vm::ensure_rootfs_image_of(&template.dir, template.root_layers(), &mut progress)
            .map_err(|e| Failure::new(e.to_string()))?;

    let id = engine::new_id();
    let options = SandboxOptions {
        limits,
        disk: Some(args.disk),
        env: args.env.clone(),
        ..SandboxOptions::default()
    };
    let settings = engine::sandbox_config(&id, &template, &options, &root).agent;
    let mut config = VmConfig::new(&id, disk, root.join(&id));
    config.vcpus = vcpus;
    config.memory_mib = memory_mib;
    config.env = settings.env;
    config.cwd = settings.cwd;
    config.user = settings.user;
    config.overlay_size_mib = Some((args.disk >> 20).clamp(1, memory_mib / 2));
    config.pids = options.limits.pids;
    std::fs::create_dir_all(&root)
        .map_err(|e| Failure::new(format!("cannot create {}: {e}", root.display())))?;

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))?;
    let outcome = rt.block_on(async {
        // Caught before the boot: a ^C while the VM boots reaches the
        // command once it starts, and the VM is destroyed as usual.
        let signals = catch_signals(args.tty);
        let vm = Vm::boot(&image, config)
            .await
            .map_err(|e| Failure::new(e.to_string()))?;
        let owner = vm.record().state_dir.join(OWNER_FILE);
        let _ = std::fs::write(&owner, std::process::id().to_string());
        let result = match vm.connect().await {
            Ok(stream) => drive(signals, stream, spec, args.tty, args.timeout, args.memory).await,
            Err(e) => Err(Failure::new(e.to_string())),
        };
        if let Err(err) = vm.destroy().await {
            eprintln!("cove: warning: cleaning up microVM {id}: {err}");
        }
        result
    });
    // The stdin reader may be blocked on a terminal read forever.
    rt.shutdown_background();
    outcome
}

const OWNER_FILE: &str = "owner.pid";

/// Destroy VMs of `cove run`s that were killed.
fn sweep_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let owner = std::fs::read_to_string(dir.join(OWNER_FILE))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok());
        let alive = match owner {
            Some(pid) => nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok(),
            // Still booting (no owner written yet), unless it is old.
            None => entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < Duration::from_secs(600)),
        };
        if alive {
            continue;
        }
        let record: Option<VmRecord> = std::fs::read(dir.join("vm.json"))
            .ok()
            .and_then(|j| serde_json::from_slice(&j).ok());
        if let Some(record) = record {
            for process in std::iter::once(&record.vmm_process).chain(&record.helpers) {
                process.stop(Duration::from_secs(1));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
