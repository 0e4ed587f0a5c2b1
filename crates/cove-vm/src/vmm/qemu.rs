//! QEMU's `microvm` machine: no PCI, no firmware tables beyond ACPI, only
//! virtio-mmio devices — a serial console, the root disk, and vsock.
//!
//! vsock goes through vhost-user: `vhost-device-vsock` (a separate process)
//! implements the device and exposes the guest's ports as a hybrid-vsock
//! unix socket. vhost-user needs the guest's memory in a shared memfd.
//! QEMU runs with `-daemonize`, which returns once the VM is set up and
//! leaves QEMU in its own session, reparented away from the daemon.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures::future::BoxFuture;

use super::{LaunchSpec, Launched, Vmm, VmmKind, check_socket_path, wait_for_socket};
use crate::proc::ProcessId;
use crate::{Accel, VmError, VmRecord, qmp};

/// The QEMU binary (`COVE_QEMU` overrides it).
pub fn binary() -> PathBuf {
    std::env::var_os("COVE_QEMU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("qemu-system-x86_64"))
}

/// The vhost-user vsock backend (`COVE_VHOST_VSOCK` overrides it). Looked
/// for on `PATH`, then where `cargo install` puts it.
pub fn vsock_backend() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("COVE_VHOST_VSOCK") {
        return Some(PathBuf::from(path));
    }
    let name = "vhost-device-vsock";
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("CARGO_HOME") {
        dirs.push(PathBuf::from(home).join("bin"));
    }
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cargo/bin"));
    }
    dirs.push(PathBuf::from("/usr/local/cargo/bin"));
    dirs.into_iter().map(|d| d.join(name)).find(|p| p.is_file())
}

#[derive(Debug, Default)]
pub struct Qemu;

impl Qemu {
    /// QEMU's arguments for `spec`.
    pub fn args(spec: &LaunchSpec, vhost_socket: &Path, qmp: &Path, pidfile: &Path) -> Vec<String> {
        let mem = spec.memory_mib;
        let mut args: Vec<String> = vec![
            "-name".into(),
            format!("cove-{}", spec.id),
            // No legacy PIT/PIC (the guest uses the local APIC timer), the
            // RTC because without it the guest waits seconds for one, and
            // an ISA serial port for the console.
            "-M".into(),
            "microvm,x-option-roms=off,pit=off,pic=off,isa-serial=on,rtc=on,memory-backend=mem"
                .into(),
        ];
        match spec.accel {
            Accel::Kvm => {
                args.extend(["-accel".into(), "kvm".into(), "-cpu".into(), "host".into()])
            }
            Accel::Tcg => args.extend(["-accel".into(), "tcg".into(), "-cpu".into(), "max".into()]),
        }
        args.extend([
            "-smp".into(),
            spec.vcpus.to_string(),
            "-m".into(),
            format!("{mem}M"),
            "-object".into(),
            format!("memory-backend-memfd,id=mem,size={mem}M,share=on"),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-no-reboot".into(),
            "-chardev".into(),
            format!("file,id=console,path={}", spec.console_log.display()),
            "-serial".into(),
            "chardev:console".into(),
            "-kernel".into(),
            spec.kernel.display().to_string(),
            "-initrd".into(),
            spec.initramfs.display().to_string(),
            "-append".into(),
            spec.cmdline.clone(),
            "-drive".into(),
            format!(
                "id=root,file={},format=raw,if=none,read-only=on",
                spec.rootfs.display()
            ),
            "-device".into(),
            "virtio-blk-device,drive=root".into(),
            "-chardev".into(),
            format!("socket,id=vsock,path={}", vhost_socket.display()),
            "-device".into(),
            "vhost-user-vsock-device,chardev=vsock".into(),
        ]);
        if let Some(net) = &spec.network {
            args.extend([
                "-netdev".into(),
                format!("tap,id=net0,ifname={},script=no,downscript=no", net.tap),
                "-device".into(),
                format!("virtio-net-device,netdev=net0,mac={}", net.mac),
            ]);
        }
        args.extend([
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-daemonize".into(),
            "-pidfile".into(),
            pidfile.display().to_string(),
        ]);
        args
    }
}

fn detached(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: setsid is async-signal-safe. A new session keeps the process
    // out of the daemon's process group and terminal, so neither a ^C nor
    // the daemon's exit reaches it.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    }
}

impl Vmm for Qemu {
    fn kind(&self) -> VmmKind {
        VmmKind::Qemu
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmError> {
        let backend = vsock_backend().ok_or(VmError::NoVsockBackend)?;
        let vhost_socket = spec.state_dir.join("vhost.sock");
        let qmp = spec.state_dir.join("qmp.sock");
        let pidfile = spec.state_dir.join("qemu.pid");
        for path in [&vhost_socket, &qmp, &spec.vsock_uds] {
            check_socket_path(path)?;
        }
        let helper_log = spec.state_dir.join("vhost-device-vsock.log");
        let log = std::fs::File::create(&helper_log).map_err(VmError::io("create", &helper_log))?;
        let log2 = log.try_clone().map_err(VmError::io("open", &helper_log))?;
        let child = detached(
            Command::new(&backend)
                .arg("--guest-cid")
                .arg("3")
                .arg("--socket")
                .arg(&vhost_socket)
                .arg("--uds-path")
                .arg(&spec.vsock_uds)
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2),
        )
        .spawn()
        .map_err(|e| VmError::Launch {
            what: "vsock backend".into(),
            detail: format!("cannot run {}: {e}", backend.display()),
        })?;
        let helper = ProcessId::of(child.id() as i32).ok_or_else(|| VmError::Launch {
            what: "vsock backend".into(),
            detail: "it exited at once".into(),
        })?;
        // The daemon reaps it (crate::proc::reap) while it runs; after a
        // restart it is init's child.
        drop(child);
        if let Err(err) = wait_for_socket(&vhost_socket, &helper, "vsock backend", &helper_log) {
            helper.stop(std::time::Duration::from_millis(200));
            return Err(err);
        }

        let qemu_log = spec.state_dir.join("qemu.log");
        let log = std::fs::File::create(&qemu_log).map_err(VmError::io("create", &qemu_log))?;
        let log2 = log.try_clone().map_err(VmError::io("open", &qemu_log))?;
        let mut qemu = Command::new(binary());
        if spec.network.is_some() {
            use std::os::unix::process::CommandExt;
            // SAFETY: unshare is async-signal-safe and touches no memory.
            // QEMU (and its daemonized child) then live in a network
            // namespace of their own, where the guest's tap is created.
            unsafe {
                qemu.pre_exec(|| {
                    if libc::unshare(libc::CLONE_NEWNET) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        }
        let status = qemu
            .args(Self::args(spec, &vhost_socket, &qmp, &pidfile))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status();
        let fail = |detail: String| {
            helper.stop(std::time::Duration::from_millis(200));
            Err(VmError::Launch {
                what: "QEMU".into(),
                detail,
            })
        };
        match status {
            Ok(status) if status.success() => {}
            Ok(status) => {
                let log = std::fs::read_to_string(&qemu_log).unwrap_or_default();
                return fail(format!("{status}: {}", log.trim()));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                helper.stop(std::time::Duration::from_millis(200));
                return Err(VmError::NoQemu(binary()));
            }
            Err(e) => return fail(e.to_string()),
        }
        let pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .and_then(ProcessId::of);
        let Some(vmm) = pid else {
            return fail(format!(
                "it left no usable pid file at {}",
                pidfile.display()
            ));
        };
        Ok(Launched {
            vmm,
            helpers: vec![helper],
            control: qmp,
        })
    }

    /// Pause by stopping QEMU's process (SIGSTOP), not with QMP `stop`.
    ///
    /// QMP `stop` stops every vhost-user device: QEMU sends
    /// `GET_VRING_BASE`, and the backend marks its queues not ready. If the
    /// host then writes to a vsock connection, `vhost-device-vsock` (0.3)
    /// still handles the socket event, fails to walk the stopped TX queue
    /// (`QueueNotReady`), returns the error from its event handler, and
    /// `vhost-user-backend` ends that worker thread: after `cont` no
    /// connection, old or new, is ever served again. Stopping the whole
    /// QEMU process instead freezes the vCPUs while the vrings stay
    /// started, so the backend keeps placing host bytes in the guest's RX
    /// buffers (or leaves them in the socket when there are none) and the
    /// guest sees them, with the pending interrupt, when it runs again.
    fn pause<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(async move {
            let process = record.vmm_process;
            process.signal(libc::SIGSTOP);
            // The group stop completes asynchronously; report paused only
            // once no vCPU thread runs any more.
            for _ in 0..500 {
                if process.is_stopped() {
                    return Ok(());
                }
                if !process.is_alive() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            Err(VmError::Control {
                command: "SIGSTOP".into(),
                detail: format!("QEMU (pid {}) did not stop", process.pid),
            })
        })
    }

    fn resume<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(async move {
            record.vmm_process.signal(libc::SIGCONT);
            // A VM paused with QMP `stop` by an older cove (or by hand)
            // needs `cont` too; on a running VM it is a no-op.
            qmp::execute(&record.control, "cont").await.map(|_| ())
        })
    }

    fn quit<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(async move {
            // A stopped QEMU cannot answer its monitor.
            record.vmm_process.signal(libc::SIGCONT);
            qmp::execute(&record.control, "quit").await.map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_follow_the_spec() {
        let spec = LaunchSpec {
            id: "sbx-test1234".into(),
            accel: Accel::Tcg,
            kernel: "/k/vmlinux".into(),
            initramfs: "/s/initrd".into(),
            cmdline: "console=ttyS0".into(),
            rootfs: "/t/rootfs.erofs".into(),
            vcpus: 2,
            memory_mib: 384,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            vsock_uds: "/s/vsock.sock".into(),
            network: None,
        };
        let args = Qemu::args(
            &spec,
            Path::new("/s/vhost.sock"),
            Path::new("/s/qmp.sock"),
            Path::new("/s/qemu.pid"),
        );
        let joined = args.join(" ");
        assert!(joined.contains("-accel tcg -cpu max"));
        assert!(joined.contains("-smp 2 -m 384M"));
        assert!(joined.contains("memory-backend-memfd,id=mem,size=384M,share=on"));
        assert!(joined.contains("file=/t/rootfs.erofs,format=raw,if=none,read-only=on"));
        assert!(joined.contains("-append console=ttyS0"));
        assert!(joined.contains("-daemonize"));
        let kvm = Qemu::args(
            &LaunchSpec {
                accel: Accel::Kvm,
                ..spec.clone()
            },
            Path::new("a"),
            Path::new("b"),
            Path::new("c"),
        );
        assert!(kvm.join(" ").contains("-accel kvm -cpu host"));
        assert!(!joined.contains("-netdev"), "no network unless asked");
        let net = super::super::NetDevice::for_sandbox("sbx-test1234");
        assert_eq!(net, super::super::NetDevice::for_sandbox("sbx-test1234"));
        assert_ne!(
            net.mac,
            super::super::NetDevice::for_sandbox("sbx-other123").mac
        );
        assert!(
            net.mac.starts_with("02:") && net.mac.len() == 17,
            "{}",
            net.mac
        );
        let with_net = Qemu::args(
            &LaunchSpec {
                network: Some(net.clone()),
                ..spec
            },
            Path::new("a"),
            Path::new("b"),
            Path::new("c"),
        )
        .join(" ");
        assert!(with_net.contains("-netdev tap,id=net0,ifname=tap0,script=no,downscript=no"));
        assert!(with_net.contains(&format!(
            "-device virtio-net-device,netdev=net0,mac={}",
            net.mac
        )));
    }
}
