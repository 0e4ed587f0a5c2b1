//! Virtual machine monitors behind one trait: QEMU's `microvm` machine
//! (KVM or TCG) and Firecracker (KVM only). A VMM starts the processes that
//! make up a VM and controls them afterwards; it keeps no state of its own,
//! so a restarted daemon controls a VM from its [`VmRecord`] alone.

pub mod firecracker;
pub mod qemu;

use std::fmt;
use std::path::PathBuf;

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

use crate::proc::ProcessId;
use crate::{Accel, VmError, VmRecord};

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmKind {
    Qemu,
    Firecracker,
}

/// What a VM asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmmChoice {
    /// Firecracker when its binary is found and KVM boots guests; QEMU otherwise.
    #[default]
    Auto,
    Qemu,
    /// Firecracker, from this binary or `firecracker` on `PATH` / `COVE_FIRECRACKER`.
    Firecracker(Option<PathBuf>),
}

/// Everything a VMM needs to start a VM.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub id: String,
    pub accel: Accel,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub cmdline: String,
    pub rootfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub state_dir: PathBuf,
    pub console_log: PathBuf,
    /// Host end of the guest's vsock (hybrid vsock unix socket).
    pub vsock_uds: PathBuf,
    /// A network device for the guest; `None` = none.
    pub network: Option<NetDevice>,
}

/// The name of a VM's tap in its VMM's network namespace.
pub const GUEST_TAP: &str = "tap0";

/// The guest's network device: a tap the VMM creates in a network
/// namespace of its own (the VMM runs in it), where cove's network wiring
/// bridges it to the sandbox's veth.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetDevice {
    /// The tap's name in the VMM's namespace.
    pub tap: String,
    /// The guest's MAC address (`aa:bb:…`), unique per sandbox.
    pub mac: String,
}

impl NetDevice {
    /// The device of sandbox `id`: tap `tap0`, and a locally administered
    /// MAC address derived from the ID (every VM on cove's bridge needs
    /// its own; QEMU's default is the same for all).
    pub fn for_sandbox(id: &str) -> NetDevice {
        let mut hash = crate::image::Fnv::default();
        hash.write(id.as_bytes());
        let b = hash.0.to_be_bytes();
        NetDevice {
            tap: GUEST_TAP.into(),
            mac: format!(
                "02:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                b[0], b[1], b[2], b[3], b[4]
            ),
        }
    }
}

/// The processes and sockets of a started VM.
#[derive(Debug, Clone)]
pub struct Launched {
    pub vmm: ProcessId,
    pub helpers: Vec<ProcessId>,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control: PathBuf,
}

/// A virtual machine monitor.
pub trait Vmm: Send + Sync + fmt::Debug {
    fn kind(&self) -> VmmKind;
    /// Start the VM's processes, detached from the caller: their own
    /// session, no parent-death signal.
    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmError>;
    /// Stop the guest's vCPUs (its memory stays).
    fn pause<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>>;
    fn resume<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>>;
    /// Ask the VMM to exit now; the caller kills what is left.
    fn quit<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>>;
}

/// The VMM for a recorded VM.
pub fn for_kind(kind: VmmKind, firecracker_binary: Option<PathBuf>) -> Box<dyn Vmm> {
    match kind {
        VmmKind::Qemu => Box::new(qemu::Qemu),
        VmmKind::Firecracker => Box::new(firecracker::Firecracker::new(
            firecracker_binary.unwrap_or_else(|| PathBuf::from("firecracker")),
        )),
    }
}

/// Unix socket paths are limited to 107 bytes.
pub(crate) fn check_socket_path(path: &std::path::Path) -> Result<(), VmError> {
    if path.as_os_str().len() > 107 {
        return Err(VmError::Config(format!(
            "socket path {} is longer than 107 bytes; use a shorter state directory",
            path.display()
        )));
    }
    Ok(())
}

/// Wait for a process to create its socket.
pub(crate) fn wait_for_socket(
    path: &std::path::Path,
    process: &ProcessId,
    what: &str,
    log: &std::path::Path,
) -> Result<(), VmError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !path.exists() {
        if !process.is_alive() || std::time::Instant::now() > deadline {
            let log = std::fs::read_to_string(log).unwrap_or_default();
            return Err(VmError::Launch {
                what: what.into(),
                detail: format!(
                    "it did not create {} ({}): {}",
                    path.display(),
                    if process.is_alive() {
                        "timed out"
                    } else {
                        "it exited"
                    },
                    log.trim()
                ),
            });
        }
        process.reap();
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    Ok(())
}
