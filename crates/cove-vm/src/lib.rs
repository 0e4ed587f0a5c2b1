//! `cove-vm`: the microVM backend. The same agent that runs as PID 1 of a
//! namespace sandbox boots here as `/init` of a small VM, behind a
//! hardware (or, under TCG, an emulation) boundary.
//!
//! ```text
//!  ensure_guest_image ─▶ GuestImage (kernel + agent initramfs)     cached
//!  ensure_rootfs_image ─▶ template/rootfs.erofs                     cached
//!
//!  Vm::boot ──▶ launching ──▶ waiting for Hello ──▶ running ◀──▶ paused
//!                  │               │ (timeout,          │
//!                  ▼               ▼  VMM died)         ├─ VMM killed / guest panic ─▶ dead
//!               error           error + console tail    │   (is_alive false, exit_reason)
//!                                                       └─ destroy ─▶ nothing left
//! ```
//!
//! A VM is a set of host processes (QEMU and its vsock backend, or
//! Firecracker) in their own session, plus a state directory with their
//! sockets and the console log. Nothing ties them to the daemon: a
//! restarted daemon gets a [`Vm`] back from its [`VmRecord`].

pub mod accel;
pub mod image;
mod proc;
mod qmp;
pub mod transport;
pub mod vmm;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use accel::{Accel, AccelChoice};
pub use image::{GuestImage, ensure_guest_image, ensure_rootfs_image, ensure_rootfs_image_of};
pub use proc::ProcessId;
pub use transport::{AGENT_PORT, AgentStream, RELAY_PORT, Transport, TransportRecord};
pub use vmm::{VmmChoice, VmmKind};

/// Progress of a long operation: (done, total, what is happening).
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64, &str);

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("QEMU is not installed ({}); install Debian's qemu-system-x86 package", .0.display())]
    NoQemu(PathBuf),
    #[error(
        "vhost-device-vsock is not installed; run `cargo install vhost-device-vsock --locked` \
         (scripts/vm-deps.sh does) or set COVE_VHOST_VSOCK to its path"
    )]
    NoVsockBackend,
    #[error("the agent binary {} cannot be used in a VM: {reason}", path.display())]
    Agent { path: PathBuf, reason: String },
    #[error("cannot build the guest image: {0}")]
    Image(String),
    #[error("cannot {what}: {detail}")]
    Tool { what: String, detail: String },
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid VM configuration: {0}")]
    Config(String),
    #[error("could not start the VM's {what}: {detail}")]
    Launch { what: String, detail: String },
    #[error(
        "the guest's agent did not answer within {timeout_secs}s; last console lines:\n{console_tail}"
    )]
    NotReady {
        timeout_secs: u64,
        console_tail: String,
    },
    #[error("the VM stopped: {reason}; last console lines:\n{console_tail}")]
    Stopped {
        reason: String,
        console_tail: String,
    },
    #[error("the VMM refused {command}: {detail}")]
    Control { command: String, detail: String },
    #[error("cannot reach the agent: {0}")]
    Transport(String),
}

impl VmError {
    pub(crate) fn io<'a>(
        action: &'static str,
        path: &'a Path,
    ) -> impl FnOnce(std::io::Error) -> VmError + 'a {
        move |source| VmError::Io {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One VM to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// The sandbox ID; the guest's hostname.
    pub id: String,
    /// The template's root disk, from [`ensure_rootfs_image`].
    pub rootfs_image: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// The VM's own directory (sockets, console log, initramfs); created by
    /// `boot`, removed by `destroy`. Keep it short: unix socket paths are
    /// limited to 107 bytes.
    pub state_dir: PathBuf,
    /// The sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub cwd: String,
    /// Default user (`None` = root).
    pub user: Option<String>,
    /// KVM, TCG, or decide by probing.
    pub accel: AccelChoice,
    /// QEMU, Firecracker, or decide.
    pub vmm: VmmChoice,
    /// How long the guest may take to answer; `None` = 15s under KVM, 120s under TCG.
    pub boot_timeout: Option<Duration>,
    /// Cap of the guest's writable layer in MiB; `None` = half the memory.
    pub overlay_size_mib: Option<u64>,
    /// Most processes the sandbox's programs may have at once (the guest's
    /// cgroup `pids.max`); `None` = no limit.
    pub pids: Option<u64>,
    /// The guest's network (a virtio-net device on a tap in the VMM's own
    /// network namespace, see [`Vm::network_namespace`]); `None` = none.
    pub network: Option<cove_agent::vm_init::GuestNetwork>,
}

impl VmConfig {
    /// A config with defaults: 1 vCPU, 256 MiB, root, `/`.
    pub fn new(id: impl Into<String>, rootfs_image: PathBuf, state_dir: PathBuf) -> Self {
        VmConfig {
            id: id.into(),
            rootfs_image,
            vcpus: 1,
            memory_mib: 256,
            state_dir,
            env: Vec::new(),
            cwd: "/".into(),
            user: None,
            accel: AccelChoice::Auto,
            vmm: VmmChoice::Auto,
            boot_timeout: None,
            overlay_size_mib: None,
            pids: None,
            network: None,
        }
    }
}

/// Enough to find a VM again after the daemon restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub id: String,
    pub vmm: VmmKind,
    pub accel: Accel,
    pub state_dir: PathBuf,
    pub vmm_process: ProcessId,
    /// Helper processes (QEMU's vsock backend).
    pub helpers: Vec<ProcessId>,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control: PathBuf,
    pub transport: TransportRecord,
    pub console_log: PathBuf,
    /// The Firecracker binary, when that is the VMM.
    #[serde(default)]
    pub firecracker_binary: Option<PathBuf>,
}

impl VmRecord {
    /// The VMM's network namespace, where the guest's tap is (a VM booted
    /// with [`VmConfig::network`]; without one it is the host's).
    pub fn network_namespace(&self) -> Result<std::os::fd::OwnedFd, VmError> {
        let process = &self.vmm_process;
        let path = PathBuf::from(format!("/proc/{}/ns/net", process.pid));
        let file = std::fs::File::open(&path).map_err(VmError::io("open", &path))?;
        // Opened, then checked: the namespace is that of our VMM, not of a
        // process that took its PID.
        if !process.is_alive() {
            return Err(VmError::io("open", &path)(
                std::io::Error::from_raw_os_error(libc::ESRCH),
            ));
        }
        Ok(file.into())
    }
}

/// Where a boot's time went, on the host's clock (for `cove bench`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootTimings {
    /// Host work before the guest runs: the KVM/TCG choice, the VM's
    /// initramfs, the vsock helper, QEMU set up and daemonized.
    pub launch: Duration,
    /// From then until the agent answered `Hello` over vsock: the guest's
    /// kernel and init, and the host polling for the agent.
    pub until_hello: Duration,
}

/// A running (or dead, not yet destroyed) microVM.
#[derive(Debug)]
pub struct Vm {
    record: VmRecord,
    vmm: Box<dyn vmm::Vmm>,
    transport: Box<dyn Transport>,
    timings: Option<BootTimings>,
}

const RECORD_FILE: &str = "vm.json";

impl Vm {
    /// Boot a VM and return once its agent has answered `Hello`. On any
    /// failure, everything started so far is torn down again.
    pub async fn boot(image: &GuestImage, config: VmConfig) -> Result<Vm, VmError> {
        validate(&config)?;
        let started = Instant::now();
        let image = image.clone();
        let prepared = {
            let config = config.clone();
            tokio::task::spawn_blocking(move || launch(&image, &config))
                .await
                .map_err(|e| VmError::Launch {
                    what: "VMM".into(),
                    detail: e.to_string(),
                })?
        };
        let (mut vm, timeout, ready) = match prepared {
            Ok(prepared) => prepared,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&config.state_dir);
                return Err(err);
            }
        };
        let launch = started.elapsed();
        match vm.wait_ready(timeout, ready).await {
            Ok(()) => {
                vm.timings = Some(BootTimings {
                    launch,
                    until_hello: started.elapsed().saturating_sub(launch),
                });
                Ok(vm)
            }
            Err(err) => {
                let _ = vm.destroy().await;
                Err(err)
            }
        }
    }

    /// Time left to boot: an error if the VMM has exited or `deadline`
    /// (`timeout` after the start) has passed, with the console's tail.
    fn boot_time_left(&self, deadline: Instant, timeout: Duration) -> Result<Duration, VmError> {
        if !self.is_alive() {
            return Err(VmError::Stopped {
                reason: self
                    .exit_reason()
                    .unwrap_or_else(|| "the VMM exited during boot".into()),
                console_tail: self.console_tail(20),
            });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(VmError::NotReady {
                timeout_secs: timeout.as_secs(),
                console_tail: self.console_tail(20),
            });
        }
        Ok(left)
    }

    /// Wait for the guest's "agent listening" signal on `ready`, then
    /// greet the agent.
    ///
    /// The host must not send on vsock before the guest's driver is up:
    /// `vhost-device-vsock` (0.3) accepts a connection as soon as QEMU has
    /// given it the guest's memory, and if the `CONNECT` arrives while
    /// QEMU is still setting up the rings, walking the not-yet-ready RX
    /// queue fails, the error ends its worker thread, and the VM never
    /// answers (seen as an occasional 120 s boot timeout under load).
    /// The guest connecting out first proves its rings are running.
    async fn wait_ready(
        &self,
        timeout: Duration,
        ready: Option<std::os::unix::net::UnixListener>,
    ) -> Result<(), VmError> {
        let deadline = Instant::now() + timeout;
        if let Some(listener) = ready {
            let path = listener
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(Path::to_path_buf));
            let listener = listener
                .set_nonblocking(true)
                .and_then(|()| tokio::net::UnixListener::from_std(listener))
                .map_err(|e| VmError::Transport(format!("ready socket: {e}")))?;
            let waited = loop {
                let left = match self.boot_time_left(deadline, timeout) {
                    Ok(left) => left,
                    Err(err) => break Err(err),
                };
                let wait = left.min(Duration::from_millis(100));
                if let Ok(Ok(_)) = tokio::time::timeout(wait, listener.accept()).await {
                    break Ok(());
                }
            };
            drop(listener);
            if let Some(path) = path {
                let _ = std::fs::remove_file(path);
            }
            waited?;
        }
        loop {
            let left = self.boot_time_left(deadline, timeout)?;
            let attempt = tokio::time::timeout(left.min(Duration::from_secs(5)), async {
                let stream = self.transport.connect().await?;
                cove_protocol::client::AgentClient::connect(stream, "cove-vm-boot")
                    .await
                    .map_err(|e| VmError::Transport(e.to_string()))
            })
            .await;
            if let Ok(Ok(_client)) = attempt {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// A new connection to the agent, for
    /// `cove_protocol::client::AgentClient::connect`.
    pub async fn connect(&self) -> Result<AgentStream, VmError> {
        if !self.is_alive() {
            return Err(self.stopped());
        }
        self.transport.connect().await
    }

    /// Stop the guest's vCPUs; connections stay open but get no answers.
    pub async fn pause(&self) -> Result<(), VmError> {
        if !self.is_alive() {
            return Err(self.stopped());
        }
        self.vmm.pause(&self.record).await
    }

    pub async fn resume(&self) -> Result<(), VmError> {
        if !self.is_alive() {
            return Err(self.stopped());
        }
        self.vmm.resume(&self.record).await
    }

    /// Stop the VMM and its helpers and remove the state directory.
    pub async fn destroy(self) -> Result<(), VmError> {
        if self.record.vmm_process.is_alive() {
            // A clean exit first: QEMU releases its memfd and sockets.
            let _ = tokio::time::timeout(Duration::from_secs(2), self.vmm.quit(&self.record)).await;
        }
        let record = self.record.clone();
        tokio::task::spawn_blocking(move || {
            record.vmm_process.stop(Duration::from_secs(2));
            for helper in &record.helpers {
                helper.stop(Duration::from_secs(1));
            }
            match std::fs::remove_dir_all(&record.state_dir) {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(VmError::io("remove", &record.state_dir)(e)),
            }
        })
        .await
        .map_err(|e| VmError::Launch {
            what: "teardown".into(),
            detail: e.to_string(),
        })?
    }

    pub fn record(&self) -> VmRecord {
        self.record.clone()
    }

    /// How long this VM's boot took, by phase (`None` after a reattach).
    pub fn boot_timings(&self) -> Option<BootTimings> {
        self.timings
    }

    /// Take a VM back from its record (after a daemon restart). Fails if
    /// its VMM is gone, with the reason from the console log.
    pub async fn reattach(record: VmRecord) -> Result<Vm, VmError> {
        let vm = Vm {
            vmm: vmm::for_kind(record.vmm, record.firecracker_binary.clone()),
            transport: record.transport.open(),
            record,
            timings: None,
        };
        if !vm.is_alive() {
            return Err(vm.stopped());
        }
        Ok(vm)
    }

    pub fn console_log(&self) -> PathBuf {
        self.record.console_log.clone()
    }

    /// Whether the VMM process (the same one that was started) still runs.
    /// A guest that panics or powers off ends its VMM (`-no-reboot`).
    pub fn is_alive(&self) -> bool {
        self.record.vmm_process.reap();
        for helper in &self.record.helpers {
            helper.reap();
        }
        self.record.vmm_process.is_alive()
    }

    /// Why the VM is not running (`None` while it is): the guest's last
    /// words from the console when it panicked or its init failed.
    pub fn exit_reason(&self) -> Option<String> {
        if self.is_alive() {
            return None;
        }
        let console = std::fs::read_to_string(&self.record.console_log).unwrap_or_default();
        Some(reason_from_console(&console))
    }

    /// The last `lines` lines of the console log.
    pub fn console_tail(&self, lines: usize) -> String {
        let console = std::fs::read_to_string(&self.record.console_log).unwrap_or_default();
        tail(&console, lines)
    }

    fn stopped(&self) -> VmError {
        VmError::Stopped {
            reason: self
                .exit_reason()
                .unwrap_or_else(|| "the VMM is not running".into()),
            console_tail: self.console_tail(20),
        }
    }
}

fn validate(config: &VmConfig) -> Result<(), VmError> {
    if config.id.is_empty()
        || config.id.len() > 64
        || !config
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(VmError::Config(format!(
            "VM id {:?} must be 1-64 letters, digits, '-' or '_' (it becomes the hostname)",
            config.id
        )));
    }
    if config.vcpus == 0 || config.vcpus > 64 {
        return Err(VmError::Config(format!(
            "{} vCPUs: use 1 to 64",
            config.vcpus
        )));
    }
    if config.memory_mib < 128 {
        return Err(VmError::Config(format!(
            "{} MiB of memory is too little for the guest kernel; use at least 128",
            config.memory_mib
        )));
    }
    if !config.rootfs_image.is_file() {
        return Err(VmError::Config(format!(
            "root disk {} does not exist (build it with ensure_rootfs_image)",
            config.rootfs_image.display()
        )));
    }
    if config.state_dir.join(RECORD_FILE).exists() {
        return Err(VmError::Config(format!(
            "{} already holds a VM; destroy it first or pick another state directory",
            config.state_dir.display()
        )));
    }
    Ok(())
}

/// Everything up to a started VMM (blocking work: files, probes, spawns).
/// The guest's init connects to this host vsock port once its agent
/// listens (see `Vm::wait_ready`).
const READY_PORT: u32 = AGENT_PORT + 1;

type Launch = (Vm, Duration, Option<std::os::unix::net::UnixListener>);

fn launch(image: &GuestImage, config: &VmConfig) -> Result<Launch, VmError> {
    let (accel, host) = accel::choose(image, config.accel)?;
    let firecracker = match &config.vmm {
        VmmChoice::Qemu => None,
        VmmChoice::Firecracker(path) => {
            Some(vmm::firecracker::find(path.as_deref()).ok_or_else(|| {
                VmError::Config(
                    "no firecracker binary found (set COVE_FIRECRACKER or put it on PATH)".into(),
                )
            })?)
        }
        // Firecracker VMs get no network device from cove (yet): a VM with
        // a network runs on QEMU.
        VmmChoice::Auto if accel == Accel::Kvm && config.network.is_none() => {
            vmm::firecracker::find(None)
        }
        VmmChoice::Auto => None,
    };
    let kind = if firecracker.is_some() {
        VmmKind::Firecracker
    } else {
        VmmKind::Qemu
    };

    std::fs::create_dir_all(&config.state_dir).map_err(VmError::io("create", &config.state_dir))?;
    let state_dir = std::fs::canonicalize(&config.state_dir)
        .map_err(VmError::io("resolve", &config.state_dir))?;
    let initramfs = state_dir.join("initramfs.cpio");
    let init = cove_agent::vm_init::VmInitConfig {
        hostname: config.id.clone(),
        env: config.env.clone(),
        cwd: config.cwd.clone(),
        user: config.user.clone(),
        vsock_port: AGENT_PORT,
        ready_port: Some(READY_PORT),
        root_device: "/dev/vda".into(),
        overlay_size_mib: config.overlay_size_mib,
        pids_max: config.pids,
        network: config.network.clone(),
        relay_port: Some(RELAY_PORT),
    };
    image::write_vm_initramfs(image, &init, &initramfs)?;

    // `quiet` keeps the serial console (slow under TCG) to warnings and
    // panics; `panic=-1` turns a guest panic into an exit of the VMM.
    // `nowatchdog`: a pause stops the whole VMM, so the guest's clock jumps
    // on resume, which the soft-lockup detector would report as a stall.
    let mut cmdline = String::from("console=ttyS0 quiet panic=-1 nowatchdog");
    if accel == Accel::Tcg {
        cmdline.push_str(&format!(" tsc_early_khz={}", host.tsc_khz));
    }
    if kind == VmmKind::Firecracker {
        cmdline.push_str(" reboot=k pci=off");
    }
    cmdline.push_str(" -- --vm-init");

    let vsock_uds = state_dir.join("vsock.sock");
    // Guest-initiated connections to host port P arrive on `<uds>_P`; bound
    // before the VMM starts so the signal cannot be missed.
    let ready_path = state_dir.join(format!("vsock.sock_{READY_PORT}"));
    vmm::check_socket_path(&ready_path)?;
    let ready = std::os::unix::net::UnixListener::bind(&ready_path)
        .map_err(VmError::io("bind", &ready_path))?;
    let spec = vmm::LaunchSpec {
        id: config.id.clone(),
        accel,
        kernel: image.kernel.clone(),
        initramfs,
        cmdline,
        rootfs: std::fs::canonicalize(&config.rootfs_image)
            .map_err(VmError::io("resolve", &config.rootfs_image))?,
        vcpus: config.vcpus,
        memory_mib: config.memory_mib,
        console_log: state_dir.join("console.log"),
        state_dir: state_dir.clone(),
        vsock_uds: vsock_uds.clone(),
        network: config
            .network
            .as_ref()
            .map(|_| vmm::NetDevice::for_sandbox(&config.id)),
    };
    let vmm = vmm::for_kind(kind, firecracker.clone());
    let launched = vmm.launch(&spec)?;
    let record = VmRecord {
        id: config.id.clone(),
        vmm: kind,
        accel,
        state_dir: state_dir.clone(),
        vmm_process: launched.vmm,
        helpers: launched.helpers,
        control: launched.control,
        transport: TransportRecord::HybridVsock {
            uds: vsock_uds,
            port: AGENT_PORT,
        },
        console_log: spec.console_log.clone(),
        firecracker_binary: firecracker,
    };
    // On disk too, so an operator (or a daemon that crashed before storing
    // it) can find the processes.
    let path = state_dir.join(RECORD_FILE);
    if let Ok(json) = serde_json::to_vec_pretty(&record) {
        let _ = std::fs::write(&path, json);
    }
    let timeout = config.boot_timeout.unwrap_or(match accel {
        Accel::Kvm => Duration::from_secs(15),
        Accel::Tcg => Duration::from_secs(120),
    });
    let vm = Vm {
        transport: record.transport.open(),
        vmm,
        record,
        timings: None,
    };
    Ok((vm, timeout, Some(ready)))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The most telling line of a dead guest's console.
pub fn reason_from_console(console: &str) -> String {
    let lines: Vec<&str> = console.lines().collect();
    if let Some(line) = lines.iter().find(|l| l.contains("Kernel panic")) {
        return format!("the guest kernel panicked: {}", strip_timestamp(line));
    }
    if let Some(line) = lines.iter().rev().find(|l| l.contains("cove-vm-init:")) {
        return format!("the guest's init failed: {}", strip_timestamp(line));
    }
    if lines.iter().any(|l| l.contains("reboot: Power down")) {
        return "the guest powered off".into();
    }
    "the VMM process exited or was killed (the console shows no guest error)".into()
}

fn strip_timestamp(line: &str) -> &str {
    match line.trim_start().strip_prefix('[') {
        Some(rest) => rest.split_once(']').map_or(line, |(_, r)| r.trim()),
        None => line.trim(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_come_from_the_console() {
        let panic =
            "[    1.0] foo\n[    2.5] Kernel panic - not syncing: Attempted to kill init!\n";
        assert_eq!(
            reason_from_console(panic),
            "the guest kernel panicked: Kernel panic - not syncing: Attempted to kill init!"
        );
        let init = "cove-vm-init: cannot mount erofs /dev/vda on /cove/lower: EINVAL\n[ 3.0] reboot: Power down\n";
        assert!(reason_from_console(init).contains("cannot mount erofs"));
        assert!(reason_from_console("").contains("killed"));
    }

    #[test]
    fn bad_configs_are_refused_with_a_reason() {
        let mut config = VmConfig::new("sbx-ok", "/nonexistent.erofs".into(), "/tmp/x".into());
        assert!(matches!(validate(&config), Err(VmError::Config(m)) if m.contains("root disk")));
        config.id = "bad id".into();
        assert!(matches!(validate(&config), Err(VmError::Config(m)) if m.contains("hostname")));
        config.id = "ok".into();
        config.memory_mib = 16;
        assert!(matches!(validate(&config), Err(VmError::Config(m)) if m.contains("128")));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("", 5), "");
    }
}
