//! The microVM backend, driven from the daemon: each sandbox is a QEMU
//! `microvm` (or Firecracker) VM from `cove-vm`, whose `/init` is the same
//! agent that runs namespace sandboxes, reached over vsock.
//!
//! ```text
//!  <data>/vm/ (or $COVE_VM_CACHE)   kernel, guest images, accel.json   built once, shared
//!  <data>/templates/<t>/rootfs.erofs the template's root disk          built on first use
//!  <runtime>/vms/<id>/              one VM: sockets, console.log, vm.json
//!  <runtime>/vm-consoles/<id>.log   console of a VM that died on its own
//! ```
//!
//! The VMM runs in its own session and outlives the daemon; a restarted
//! daemon gets the VM back from the record stored with the sandbox
//! (`Vm::reattach`). The backend is always registered, so VMs of an earlier
//! run can be reattached or cleaned up, but it creates nothing on a host
//! that lacks what it needs ([`MicrovmBackend::unavailable`] says what to
//! install).
//!
//! Where the static agent (the guest's `/init`) comes from, in order:
//! `$COVE_VM_AGENT`, then `cove-agent-static` next to the `cove` binary.
//! The daemon never builds it: a build needs the source tree and a
//! toolchain, which an installed daemon does not have (`scripts/vm-deps.sh`
//! builds one).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use cove_vm::{GuestImage, Vm, VmConfig, VmError, VmRecord};
use tokio::sync::{Mutex, OnceCell, RwLock};

use super::{AgentStream, Backend, BackendError, Instance, SandboxSpec, sandbox_dirs};
use crate::engine;

/// The template a microVM sandbox gets when the request names none: the
/// host template has no root filesystem of its own to put on a disk.
pub const DEFAULT_VM_TEMPLATE: &str = "busybox";
/// Guest memory when the sandbox sets no memory limit.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
/// Below this the guest kernel does not boot reliably.
pub const MIN_MEMORY_MIB: u64 = 128;
/// How long a saved console of a dead VM is kept (as long as the daemon
/// lists ended sandboxes).
const CONSOLE_RETENTION: Duration = Duration::from_secs(60 * 60);
/// How much of a console log the API returns (its end).
pub const CONSOLE_MAX: u64 = 1 << 20;

/// Where the guest's `/init` comes from (see the module doc).
pub fn find_static_agent(cove_binary: &Path) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("COVE_VM_AGENT").filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    let beside = cove_binary.parent()?.join("cove-agent-static");
    beside.is_file().then_some(beside)
}

/// What the host lacks for microVMs, as a sentence naming what to install;
/// `None` when it has everything. Runs programs: call it off the runtime.
pub fn probe_host(cove_binary: &Path) -> Result<PathBuf, String> {
    let qemu = cove_vm::vmm::qemu::binary();
    let qemu_ok = std::process::Command::new(&qemu)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let firecracker = cove_vm::vmm::firecracker::find(None).is_some()
        && std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
    if !qemu_ok && !firecracker {
        return Err(format!(
            "QEMU ({}) is not installed: install Debian's qemu-system-x86 package \
             (or set COVE_QEMU), or provide Firecracker and /dev/kvm",
            qemu.display()
        ));
    }
    if qemu_ok && !firecracker && cove_vm::vmm::qemu::vsock_backend().is_none() {
        return Err(
            "vhost-device-vsock is not installed: run `cargo install vhost-device-vsock --locked` \
             (scripts/vm-deps.sh does) or set COVE_VHOST_VSOCK"
                .into(),
        );
    }
    let mkfs = std::process::Command::new("mkfs.erofs")
        .arg("--help")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok();
    if !mkfs {
        return Err("mkfs.erofs is not installed: install Debian's erofs-utils package".into());
    }
    find_static_agent(cove_binary).ok_or_else(|| {
        format!(
            "no static cove-agent for the guest: set COVE_VM_AGENT or install one as {} \
             (scripts/vm-deps.sh builds it)",
            cove_binary
                .parent()
                .unwrap_or(Path::new("."))
                .join("cove-agent-static")
                .display()
        )
    })
}

/// vCPUs and memory of a sandbox's VM, from its limits: CPUs rounded up,
/// memory in MiB (the limit is the guest's whole RAM).
pub fn vm_size(limits: &cove_isolate::Limits) -> Result<(u32, u64), BackendError> {
    let available = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let vcpus = limits
        .cpus
        .map_or(1, |c| (c.ceil() as u32).clamp(1, available));
    let memory_mib = limits.memory.map_or(DEFAULT_MEMORY_MIB, |m| m >> 20);
    if memory_mib < MIN_MEMORY_MIB {
        return Err(BackendError::Invalid(format!(
            "memory {memory_mib}M is too little for a microVM's guest kernel; use at least {MIN_MEMORY_MIB}M"
        )));
    }
    Ok((vcpus, memory_mib))
}

#[derive(Debug)]
pub struct MicrovmBackend {
    /// `<runtime>/vms`: one directory per VM. Short, since unix socket
    /// paths inside it are limited to 107 bytes.
    state_root: PathBuf,
    /// `<runtime>/vm-consoles`: consoles of VMs that died on their own.
    consoles: PathBuf,
    /// Kernel and guest images.
    cache_dir: PathBuf,
    /// The static agent, or why the host cannot run microVMs.
    setup: Result<PathBuf, String>,
    image: OnceCell<GuestImage>,
    /// Serializes root-disk builds (their temporary file is per process).
    disk_builds: Mutex<()>,
}

impl MicrovmBackend {
    /// `setup` is [`probe_host`]'s answer.
    pub fn new(
        runtime_dir: &Path,
        data_dir: &Path,
        setup: Result<PathBuf, String>,
    ) -> MicrovmBackend {
        let cache_dir = std::env::var_os("COVE_VM_CACHE")
            .filter(|p| !p.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| data_dir.join("vm"));
        MicrovmBackend {
            state_root: runtime_dir.join("vms"),
            consoles: runtime_dir.join("vm-consoles"),
            cache_dir,
            setup,
            image: OnceCell::new(),
            disk_builds: Mutex::new(()),
        }
    }

    async fn guest_image(&self, agent: &Path) -> Result<GuestImage, BackendError> {
        self.image
            .get_or_try_init(|| async {
                let cache = self.cache_dir.clone();
                let agent = agent.to_path_buf();
                tokio::task::spawn_blocking(move || {
                    std::fs::create_dir_all(&cache).map_err(|e| {
                        BackendError::Failed(format!("cannot create {}: {e}", cache.display()))
                    })?;
                    cove_vm::ensure_guest_image(&cache, &agent, &mut |_, _, what| {
                        tracing::info!(step = what, "microVM guest image");
                    })
                    .map_err(vm_error)
                })
                .await
                .map_err(|e| BackendError::Failed(e.to_string()))?
            })
            .await
            .cloned()
    }

    async fn root_disk(&self, template: &cove_template::Template) -> Result<PathBuf, BackendError> {
        let _building = self.disk_builds.lock().await;
        let dir = template.dir.clone();
        let layers = template.root_layers().to_vec();
        tokio::task::spawn_blocking(move || {
            cove_vm::ensure_rootfs_image_of(&dir, &layers, &mut |_, _, what| {
                tracing::info!(step = what, "microVM root disk");
            })
        })
        .await
        .map_err(|e| BackendError::Failed(e.to_string()))?
        .map_err(|e| match e {
            // A template without a root filesystem is the request's fault.
            VmError::Image(msg) => BackendError::Invalid(msg),
            other => vm_error(other),
        })
    }

    fn instance(&self, vm: Vm) -> Arc<dyn Instance> {
        Arc::new(MicrovmInstance {
            record: vm.record(),
            vm: RwLock::new(Some(vm)),
            consoles: self.consoles.clone(),
            died: AtomicBool::new(false),
        })
    }

    /// Forget consoles of dead VMs older than the retention.
    fn prune_consoles(&self) {
        let Ok(entries) = std::fs::read_dir(&self.consoles) else {
            return;
        };
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > CONSOLE_RETENTION);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}

fn vm_error(err: VmError) -> BackendError {
    match err {
        VmError::Config(msg) => BackendError::Invalid(msg),
        VmError::NoQemu(_) | VmError::NoVsockBackend | VmError::Agent { .. } => {
            BackendError::Invalid(err.to_string())
        }
        VmError::Transport(_) => BackendError::Unreachable(err.to_string()),
        other => BackendError::Failed(other.to_string()),
    }
}

#[async_trait]
impl Backend for MicrovmBackend {
    fn name(&self) -> &'static str {
        "microvm"
    }

    fn unavailable(&self) -> Option<String> {
        self.setup.as_ref().err().cloned()
    }

    fn default_template(&self) -> Option<&'static str> {
        Some(DEFAULT_VM_TEMPLATE)
    }

    /// Egress through a virtio-net device on a tap in the VMM's own
    /// network namespace, bridged there to the sandbox's veth. Such a VM
    /// runs on QEMU (cove gives Firecracker VMs no network device yet).
    fn supports_network(&self) -> bool {
        true
    }

    /// With or without a network device ([`GuestPorts`]).
    fn supports_published_ports(&self) -> bool {
        true
    }

    fn guest_link(&self) -> Option<&'static str> {
        Some(cove_vm::vmm::GUEST_TAP)
    }

    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Instance>, BackendError> {
        let agent = self
            .setup
            .as_ref()
            .map_err(|why| BackendError::Invalid(format!("microVMs cannot run here: {why}")))?;
        let (vcpus, memory_mib) = vm_size(&spec.options.limits)?;
        self.prune_consoles();
        let image = self.guest_image(agent).await?;
        let disk = self.root_disk(&spec.template).await?;
        // The same environment, directory and user a namespace sandbox of
        // this template would get.
        let settings =
            engine::sandbox_config(&spec.id, &spec.template, &spec.options, &self.state_root).agent;
        let mut config = VmConfig::new(&spec.id, disk, self.state_root.join(&spec.id));
        config.vcpus = vcpus;
        config.memory_mib = memory_mib;
        config.env = settings.env;
        config.cwd = settings.cwd;
        config.user = settings.user;
        // The writable layer is a tmpfs in guest memory: the disk limit
        // caps it, but never above half the guest's memory.
        let disk_mib = spec.options.disk.unwrap_or(engine::DEFAULT_DISK) >> 20;
        config.overlay_size_mib = Some(disk_mib.clamp(1, memory_mib / 2));
        config.pids = spec.options.limits.pids;
        config.network = spec.options.guest_network.clone();
        std::fs::create_dir_all(&self.state_root)
            .map_err(|e| BackendError::Failed(format!("{}: {e}", self.state_root.display())))?;
        let vm = Vm::boot(&image, config).await.map_err(vm_error)?;
        Ok(self.instance(vm))
    }

    async fn reattach(
        &self,
        _id: &str,
        record: serde_json::Value,
    ) -> Result<Arc<dyn Instance>, BackendError> {
        let record: VmRecord = serde_json::from_value(record)
            .map_err(|e| BackendError::Failed(format!("bad record: {e}")))?;
        let vm = Vm::reattach(record).await.map_err(vm_error)?;
        Ok(self.instance(vm))
    }

    async fn clean_up(&self, id: &str, record: Option<serde_json::Value>) {
        let dir = self.state_root.join(id);
        let record = record
            .and_then(|r| serde_json::from_value::<VmRecord>(r).ok())
            .or_else(|| {
                let text = std::fs::read(dir.join("vm.json")).ok()?;
                serde_json::from_slice(&text).ok()
            });
        if let Some(record) = record {
            match Vm::reattach(record.clone()).await {
                Ok(vm) => {
                    let _ = vm.destroy().await;
                }
                Err(_) => {
                    // The VMM is gone; its helpers may not be.
                    let _ = tokio::task::spawn_blocking(move || {
                        for helper in &record.helpers {
                            helper.stop(Duration::from_secs(1));
                        }
                    })
                    .await;
                }
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn known_ids(&self) -> Vec<String> {
        sandbox_dirs(&self.state_root)
    }

    fn saved_console(&self, id: &str) -> Option<PathBuf> {
        let path = self.consoles.join(format!("{id}.log"));
        path.is_file().then_some(path)
    }
}

/// A microVM's published ports: each connection that the guest's address
/// does not take (cove-net tries it first when the VM has egress) is
/// relayed by its agent over vsock to the port in the guest (loopback
/// first), so neither a network device nor a server on the guest's
/// address is needed.
#[derive(Debug)]
struct GuestPorts(cove_vm::TransportRecord);

impl cove_net::PortRelay for GuestPorts {
    fn connect(
        &self,
        port: u16,
    ) -> futures::future::BoxFuture<'_, std::io::Result<Box<dyn cove_net::Duplex>>> {
        Box::pin(async move {
            let stream = self.0.connect_tcp(port).await?;
            Ok(Box::new(stream) as Box<dyn cove_net::Duplex>)
        })
    }
}

struct MicrovmInstance {
    record: VmRecord,
    /// `None` once destroyed. Async lock: `connect` holds it across the
    /// vsock handshake, and `destroy` must not take the VM from under it.
    vm: RwLock<Option<Vm>>,
    consoles: PathBuf,
    /// The VM ended on its own: keep its console when it is destroyed.
    died: AtomicBool,
}

#[async_trait]
impl Instance for MicrovmInstance {
    fn record(&self) -> serde_json::Value {
        serde_json::to_value(&self.record).unwrap_or_default()
    }

    fn network_namespace(&self) -> Result<std::os::fd::OwnedFd, BackendError> {
        self.record.network_namespace().map_err(vm_error)
    }

    fn port_relay(&self) -> Option<Arc<dyn cove_net::PortRelay>> {
        Some(Arc::new(GuestPorts(self.record.transport.clone())))
    }

    async fn connect(&self) -> Result<AgentStream, BackendError> {
        let vm = self.vm.read().await;
        let vm = vm
            .as_ref()
            .ok_or_else(|| BackendError::Unreachable("the VM was destroyed".into()))?;
        match vm.connect().await {
            Ok(stream) => Ok(Box::new(stream)),
            Err(err) => Err(BackendError::Unreachable(err.to_string())),
        }
    }

    fn layer_in_guest(&self) -> bool {
        // The overlay's upper directory is a tmpfs inside the guest.
        true
    }

    fn serves_transfers(&self) -> bool {
        // The guest agent serves vsock connections framed only.
        false
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let vm = self.vm.read().await;
        match vm.as_ref() {
            Some(vm) => vm.pause().await.map_err(vm_error),
            None => Err(BackendError::Failed("the VM was destroyed".into())),
        }
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let vm = self.vm.read().await;
        match vm.as_ref() {
            Some(vm) => vm.resume().await.map_err(vm_error),
            None => Err(BackendError::Failed("the VM was destroyed".into())),
        }
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        let vm = self.vm.write().await.take();
        if self.died.load(Ordering::SeqCst) {
            // Keep what the guest said before it died, for `cove logs --console`.
            let _ = std::fs::create_dir_all(&self.consoles);
            let _ = std::fs::copy(
                &self.record.console_log,
                self.consoles.join(format!("{}.log", self.record.id)),
            );
        }
        match vm {
            Some(vm) => vm.destroy().await.map_err(vm_error),
            None => Ok(()),
        }
    }

    async fn exited(&self) -> String {
        // The VMM is not our child (it daemonizes), so poll it; a quarter
        // second is quick enough to mark a crashed sandbox failed.
        loop {
            let reason = match self.vm.read().await.as_ref() {
                Some(vm) => vm.exit_reason(),
                // Destroyed on purpose: not an exit to report.
                None => break,
            };
            if let Some(reason) = reason {
                self.died.store(true, Ordering::SeqCst);
                return format!("the microVM stopped: {reason}");
            }
            // Without its vsock backend the VM runs but cannot be reached.
            if let Some(helper) = self.record.helpers.iter().find(|h| !h.is_alive()) {
                self.died.store(true, Ordering::SeqCst);
                return format!(
                    "the microVM's vsock backend (pid {}) exited; the VM cannot be reached",
                    helper.pid
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        std::future::pending().await
    }

    fn memory_usage(&self) -> Option<u64> {
        // The guest's RAM is a shared memfd of QEMU's, so it shows in
        // QEMU's resident set as far as the guest has touched it.
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.record.vmm_process.pid))
                .ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        self.record.vmm_process.is_alive().then_some(kib * 1024)
    }

    fn console_log(&self) -> Option<PathBuf> {
        Some(self.record.console_log.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_come_from_the_limits() {
        let none = cove_isolate::Limits::default();
        assert!(matches!(vm_size(&none), Ok((1, DEFAULT_MEMORY_MIB))));
        let some = cove_isolate::Limits {
            memory: Some(512 << 20),
            cpus: Some(0.5),
            pids: None,
        };
        assert!(matches!(vm_size(&some), Ok((1, 512))));
        let small = cove_isolate::Limits {
            memory: Some(64 << 20),
            ..cove_isolate::Limits::default()
        };
        assert!(matches!(vm_size(&small), Err(BackendError::Invalid(m)) if m.contains("128M")));
        let many = cove_isolate::Limits {
            cpus: Some(1.2),
            ..cove_isolate::Limits::default()
        };
        let available = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        assert!(matches!(vm_size(&many), Ok((v, _)) if v == 2.min(available)));
    }

    #[test]
    fn an_unusable_host_refuses_creates_with_the_reason() {
        let dir = std::env::temp_dir();
        let backend = MicrovmBackend::new(&dir, &dir, Err("QEMU is missing".into()));
        assert_eq!(backend.unavailable().as_deref(), Some("QEMU is missing"));
        assert_eq!(backend.default_template(), Some("busybox"));
    }
}
