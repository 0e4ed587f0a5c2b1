//! Firecracker: used only where its binary exists and KVM boots guests
//! (it has no emulation fallback). It boots the same `vmlinux` and
//! initramfs as QEMU, attaches the root disk read-only, and provides
//! hybrid vsock on a unix socket itself, so no helper process is needed.
//! Pause and resume are `PATCH /vm` on its API socket.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use futures::future::BoxFuture;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{LaunchSpec, Launched, Vmm, VmmKind, check_socket_path, wait_for_socket};
use crate::proc::ProcessId;
use crate::{Accel, VmError, VmRecord};

#[derive(Debug)]
pub struct Firecracker {
    binary: PathBuf,
}

/// The Firecracker binary to use, if one exists: `explicit`, else
/// `COVE_FIRECRACKER`, else `firecracker` on `PATH`.
pub fn find(explicit: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = explicit {
        return path.is_file().then(|| path.to_path_buf());
    }
    if let Some(path) = std::env::var_os("COVE_FIRECRACKER") {
        let path = PathBuf::from(path);
        return path.is_file().then_some(path);
    }
    std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("firecracker"))
            .find(|p| p.is_file())
    })
}

impl Firecracker {
    pub fn new(binary: PathBuf) -> Self {
        Firecracker { binary }
    }

    /// Firecracker's `--config-file` for `spec`.
    pub fn config(spec: &LaunchSpec) -> Value {
        json!({
            "boot-source": {
                "kernel_image_path": spec.kernel,
                "initrd_path": spec.initramfs,
                "boot_args": spec.cmdline,
            },
            "drives": [{
                "drive_id": "root",
                "path_on_host": spec.rootfs,
                "is_root_device": false,
                "is_read_only": true,
            }],
            "machine-config": {
                "vcpu_count": spec.vcpus,
                "mem_size_mib": spec.memory_mib,
                "smt": false,
            },
            "vsock": {
                "guest_cid": 3,
                "uds_path": spec.vsock_uds,
            },
        })
    }
}

impl Vmm for Firecracker {
    fn kind(&self) -> VmmKind {
        VmmKind::Firecracker
    }

    fn launch(&self, spec: &LaunchSpec) -> Result<Launched, VmError> {
        if spec.accel != Accel::Kvm {
            return Err(VmError::Config(
                "Firecracker needs KVM; this host runs guests under TCG, use QEMU".into(),
            ));
        }
        if spec.network.is_some() {
            return Err(VmError::Config(
                "cove gives Firecracker VMs no network device yet; a VM with a network \
                 runs on QEMU (the automatic choice does that)"
                    .into(),
            ));
        }
        let api = spec.state_dir.join("firecracker.sock");
        check_socket_path(&api)?;
        check_socket_path(&spec.vsock_uds)?;
        let config_path = spec.state_dir.join("firecracker.json");
        let config = serde_json::to_vec_pretty(&Self::config(spec))
            .map_err(|e| VmError::Config(e.to_string()))?;
        std::fs::write(&config_path, config).map_err(VmError::io("write", &config_path))?;
        // Firecracker writes the guest's serial console to its stdout.
        let console = std::fs::File::create(&spec.console_log)
            .map_err(VmError::io("create", &spec.console_log))?;
        let errors = console
            .try_clone()
            .map_err(VmError::io("open", &spec.console_log))?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--api-sock")
            .arg(&api)
            .arg("--config-file")
            .arg(&config_path)
            .arg("--id")
            .arg(&spec.id)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(errors);
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: setsid is async-signal-safe; see qemu.rs for why.
            unsafe {
                cmd.pre_exec(|| {
                    libc::setsid();
                    Ok(())
                });
            }
        }
        let child = cmd.spawn().map_err(|e| VmError::Launch {
            what: "Firecracker".into(),
            detail: format!("cannot run {}: {e}", self.binary.display()),
        })?;
        let vmm = ProcessId::of(child.id() as i32).ok_or_else(|| VmError::Launch {
            what: "Firecracker".into(),
            detail: "it exited at once".into(),
        })?;
        drop(child);
        wait_for_socket(&api, &vmm, "Firecracker", &spec.console_log)?;
        Ok(Launched {
            vmm,
            helpers: Vec::new(),
            control: api,
        })
    }

    fn pause<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(api(
            &record.control,
            "PATCH",
            "/vm",
            json!({"state": "Paused"}),
        ))
    }

    fn resume<'a>(&'a self, record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        Box::pin(api(
            &record.control,
            "PATCH",
            "/vm",
            json!({"state": "Resumed"}),
        ))
    }

    fn quit<'a>(&'a self, _record: &'a VmRecord) -> BoxFuture<'a, Result<(), VmError>> {
        // Firecracker has no "exit now" call; the caller's SIGTERM/SIGKILL
        // is how it stops.
        Box::pin(async { Ok(()) })
    }
}

/// One HTTP/1.1 request on Firecracker's API socket.
async fn api(socket: &Path, method: &str, path: &str, body: Value) -> Result<(), VmError> {
    let command = format!("{method} {path}");
    let err = |detail: String| VmError::Control {
        command: command.clone(),
        detail,
    };
    let body = body.to_string();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|e| err(e.to_string()))?;
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut answer = Vec::new();
    tokio::time::timeout(
        std::time::Duration::from_secs(10),
        stream.read_to_end(&mut answer),
    )
    .await
    .map_err(|_| err("Firecracker did not answer within 10s".into()))?
    .map_err(|e| err(e.to_string()))?;
    let answer = String::from_utf8_lossy(&answer);
    let status_line = answer.lines().next().unwrap_or_default();
    if status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|c| c.starts_with('2'))
    {
        Ok(())
    } else {
        Err(err(answer.trim().to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_describes_the_vm() {
        let spec = LaunchSpec {
            id: "sbx-fc".into(),
            accel: Accel::Kvm,
            kernel: "/k/vmlinux".into(),
            initramfs: "/s/initrd".into(),
            cmdline: "console=ttyS0 -- --vm-init".into(),
            rootfs: "/t/rootfs.erofs".into(),
            vcpus: 2,
            memory_mib: 512,
            state_dir: "/s".into(),
            console_log: "/s/console.log".into(),
            vsock_uds: "/s/vsock.sock".into(),
            network: None,
        };
        let config = Firecracker::config(&spec);
        assert_eq!(config["boot-source"]["kernel_image_path"], "/k/vmlinux");
        assert_eq!(config["boot-source"]["initrd_path"], "/s/initrd");
        assert_eq!(config["drives"][0]["is_read_only"], true);
        assert_eq!(config["drives"][0]["is_root_device"], false);
        assert_eq!(config["machine-config"]["vcpu_count"], 2);
        assert_eq!(config["machine-config"]["mem_size_mib"], 512);
        assert_eq!(config["vsock"]["uds_path"], "/s/vsock.sock");
        let tcg = Firecracker::new("/nonexistent".into()).launch(&LaunchSpec {
            accel: Accel::Tcg,
            ..spec
        });
        assert!(matches!(tcg, Err(VmError::Config(m)) if m.contains("KVM")));
    }

    #[tokio::test]
    async fn api_requests_are_plain_http() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock)?;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = vec![0u8; 1024];
            let n = s.read(&mut buf).await?;
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await?;
            std::io::Result::Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
        });
        api(&sock, "PATCH", "/vm", json!({"state": "Paused"})).await?;
        let request = server.await??;
        assert!(request.starts_with("PATCH /vm HTTP/1.1\r\n"));
        assert!(request.ends_with(r#"{"state":"Paused"}"#));
        Ok(())
    }
}
