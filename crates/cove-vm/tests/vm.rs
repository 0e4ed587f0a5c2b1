//! Real microVMs under QEMU (TCG here, KVM where it boots guests), driven
//! through the real agent protocol. Each test is one group that boots one
//! VM and checks several behaviours on it, to keep boots (seconds under
//! TCG) few. Needs root, QEMU, vhost-device-vsock, e2fsprogs and
//! busybox-static (`scripts/vm-deps.sh` installs them); without them each
//! test says why it skips.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use cove_protocol::client::{AgentClient, Output};
use cove_protocol::{CommandLine, ProcessSpec, PtySize};
use cove_vm::{GuestImage, Vm, VmConfig, VmError};

struct Env {
    image: GuestImage,
    rootfs: PathBuf,
    scratch: PathBuf,
}

fn missing_tools() -> Option<String> {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        return Some("needs root".into());
    }
    let qemu = cove_vm::vmm::qemu::binary();
    if Command::new(&qemu).arg("--version").output().is_err() {
        return Some(format!(
            "{} is not installed (Debian package qemu-system-x86)",
            qemu.display()
        ));
    }
    if cove_vm::vmm::qemu::vsock_backend().is_none() {
        return Some(
            "vhost-device-vsock is not installed (cargo install vhost-device-vsock)".into(),
        );
    }
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        return Some("mkfs.erofs is not installed (Debian package erofs-utils)".into());
    }
    if !Path::new(cove_template::BUSYBOX_PATH).exists() {
        return Some("busybox is not installed (Debian package busybox-static)".into());
    }
    None
}

/// The static agent: `COVE_VM_AGENT`, or built here into its own target dir.
fn static_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("COVE_VM_AGENT") {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = workspace.join("target/vm-agent");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "cove-agent",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols",
        )
        .current_dir(&workspace)
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building the static agent failed");
    target.join("x86_64-unknown-linux-gnu/release/cove-agent")
}

fn env(group: &str) -> Option<Env> {
    if let Some(reason) = missing_tools() {
        // CI must prove the backend, not skip it.
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the microVM tests: {reason}; scripts/vm-deps.sh installs it"
        );
        eprintln!("skipping: {reason}");
        return None;
    }
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cove-vm-cache");
    std::fs::create_dir_all(&cache).unwrap();
    // nextest runs each test in its own process: one at a time builds the
    // shared template and images (a template being replaced under a
    // concurrent disk build fails it).
    let lock = std::fs::File::create(cache.join(".test-setup.lock")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    let locked = unsafe { libc::flock(fd, libc::LOCK_EX) };
    assert_eq!(locked, 0);
    let agent = static_agent();
    let image = cove_vm::ensure_guest_image(&cache, &agent, &mut |done, total, what| {
        eprintln!("[image {done}/{total}] {what}");
    })
    .expect("guest image");
    let store = cove_template::TemplateStore::new(cache.join("templates"));
    let template = match store.get("busybox") {
        Ok(t) => t,
        Err(_) => store
            .build_busybox(&mut |_, _, _| {})
            .expect("busybox template"),
    };
    let rootfs =
        cove_vm::ensure_rootfs_image(&template.dir, &mut |_, _, _| {}).expect("rootfs image");
    drop(lock);
    // Short: socket paths must fit in 107 bytes. One per test, since tests
    // of one binary share a PID.
    let scratch = PathBuf::from(format!("/tmp/cove-vm-test-{}-{group}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    Some(Env {
        image,
        rootfs,
        scratch,
    })
}

impl Env {
    fn config(&self, id: &str) -> VmConfig {
        let mut config = VmConfig::new(id, self.rootfs.clone(), self.scratch.join(id));
        config.env = vec![("SANDBOX_VAR".into(), "from-sandbox".into())];
        config.cwd = "/workspace".into();
        config.memory_mib = 256;
        config
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

async fn client(vm: &Vm) -> AgentClient {
    let stream = vm.connect().await.expect("connect");
    AgentClient::connect(stream, "cove-vm-test")
        .await
        .expect("hello")
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new(CommandLine::Shell(script.into()))
}

async fn run(client: &AgentClient, spec: ProcessSpec, stdin: Option<&[u8]>) -> Output {
    tokio::time::timeout(
        Duration::from_secs(120),
        client.output(spec, stdin.map(|s| s.to_vec())),
    )
    .await
    .expect("process finished")
    .expect("process ran")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Processes of this VM still on the host (by its state directory in
/// their command line).
fn host_processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!(
                    "{}: {cmdline}",
                    entry.file_name().to_string_lossy()
                ));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_pause_reattach_and_destroy() {
    let Some(env) = env("exec") else { return };
    let config = env.config("vm-exec");
    let state_dir = config.state_dir.clone();
    let vm = Vm::boot(&env.image, config).await.expect("boot");
    assert!(vm.is_alive());
    let agent = client(&vm).await;
    assert_eq!(agent.hello().hostname, "vm-exec");

    // Exit codes, separate streams, the sandbox's env and cwd, the template's root.
    let out = run(
        &agent,
        sh("echo out; echo err >&2; echo $SANDBOX_VAR; pwd; hostname; exit 3"),
        None,
    )
    .await;
    assert_eq!(out.status.code, Some(3));
    assert_eq!(
        text(&out.stdout),
        "out\nfrom-sandbox\n/workspace\nvm-exec\n"
    );
    assert_eq!(text(&out.stderr), "err\n");
    let out = run(&agent, sh("ls /bin/busybox && cat /proc/1/comm"), None).await;
    assert_eq!(text(&out.stdout), "/bin/busybox\ncove-agent\n");

    // stdin.
    let mut spec = sh("tr a-z A-Z");
    spec.stdin = true;
    let out = run(&agent, spec, Some(b"hello vm")).await;
    assert_eq!(text(&out.stdout), "HELLO VM");

    // The root is writable (overlay on tmpfs) but the disk below is not.
    let out = run(
        &agent,
        sh("echo x > /etc/new && cat /etc/new && grep -c ' / overlay ' /proc/mounts"),
        None,
    )
    .await;
    assert_eq!(text(&out.stdout), "x\n1\n", "{}", text(&out.stderr));

    // A timeout kills the whole tree, including a grandchild in its own session.
    let mut spec = sh("setsid sh -c 'sleep 300' & sleep 300");
    spec.timeout_ms = 500;
    let out = run(&agent, spec, None).await;
    assert!(out.status.timed_out);
    let out = run(&agent, sh("ps -o comm | grep -c '^sleep' || true"), None).await;
    assert_eq!(
        text(&out.stdout).trim(),
        "0",
        "no sleep survives the timeout"
    );

    // A PTY.
    let mut spec = sh("tty; stty size");
    spec.pty = Some(PtySize {
        rows: 33,
        cols: 101,
    });
    let out = run(&agent, spec, None).await;
    let tty = text(&out.stdout);
    assert!(tty.contains("/dev/pts/"), "{tty:?}");
    assert!(tty.contains("33 101"), "{tty:?}");

    // Pause and resume: the guest keeps its state and answers again. A
    // request sent while paused is not answered during the pause, and is
    // answered after it (this once wedged vhost-device-vsock for good).
    vm.pause().await.expect("pause");
    let pending = {
        let agent = agent.clone();
        tokio::spawn(async move { agent.output(sh("echo sent while paused"), None).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!pending.is_finished(), "a paused guest answered");
    vm.resume().await.expect("resume");
    let out = tokio::time::timeout(Duration::from_secs(60), pending)
        .await
        .expect("the request sent during the pause is answered after it")
        .unwrap()
        .expect("process ran");
    assert_eq!(text(&out.stdout), "sent while paused\n");
    let out = run(&agent, sh("echo after resume"), None).await;
    assert_eq!(text(&out.stdout), "after resume\n");
    let again = client(&vm).await;
    let out = run(&again, sh("echo new connection"), None).await;
    assert_eq!(text(&out.stdout), "new connection\n");

    // Reattach from the record, as a restarted daemon would; the VM's
    // processes are not children of this one in any way that matters.
    let record = vm.record();
    let json = serde_json::to_string(&record).unwrap();
    drop(agent);
    drop(vm);
    let vm = Vm::reattach(serde_json::from_str(&json).unwrap())
        .await
        .expect("reattach");
    let agent = client(&vm).await;
    let out = run(&agent, sh("cat /etc/new"), None).await;
    assert_eq!(text(&out.stdout), "x\n", "the same VM, with its state");

    // Destroy leaves no process, socket or file.
    let needle = state_dir.display().to_string();
    assert!(!host_processes_mentioning(&needle).is_empty());
    vm.destroy().await.expect("destroy");
    assert!(!state_dir.exists(), "state directory removed");
    let left = host_processes_mentioning(&needle);
    assert!(left.is_empty(), "processes left behind: {left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_are_detected_with_a_reason() {
    let Some(env) = env("crash") else { return };

    // kill -9 of QEMU.
    let vm = Vm::boot(&env.image, env.config("vm-kill"))
        .await
        .expect("boot");
    let record = vm.record();
    // SAFETY: kill takes no pointers; the pid is the VM's QEMU.
    unsafe { libc::kill(record.vmm_process.pid, libc::SIGKILL) };
    for _ in 0..500 {
        if !vm.is_alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!vm.is_alive());
    assert!(vm.exit_reason().unwrap().contains("killed"));
    assert!(matches!(vm.connect().await, Err(VmError::Stopped { .. })));
    assert!(matches!(
        Vm::reattach(record.clone()).await,
        Err(VmError::Stopped { .. })
    ));
    vm.destroy().await.expect("destroy a dead VM");
    assert!(!record.state_dir.exists());
    assert!(
        record.helpers.iter().all(|h| !h.is_alive()),
        "vsock backend stopped"
    );

    // A guest kernel panic ends the VM and is reported from the console.
    let vm = Vm::boot(&env.image, env.config("vm-panic"))
        .await
        .expect("boot");
    let agent = client(&vm).await;
    // Keep the handle: dropping it would kill the shell before it writes.
    let _crash = agent.spawn(sh("echo c > /proc/sysrq-trigger")).await;
    // Under TCG on a loaded host the panic report alone takes a while.
    for _ in 0..18000 {
        if !vm.is_alive() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(!vm.is_alive(), "the VM ended after the guest panicked");
    let reason = vm.exit_reason().unwrap();
    assert!(reason.contains("panicked"), "{reason}");
    vm.destroy().await.expect("destroy");
}

#[tokio::test]
async fn a_guest_that_never_answers_times_out_with_its_console() {
    let Some(env) = env("bad") else { return };
    let mut config = env.config("vm-bad");
    // A root disk that is not EROFS: the guest's init fails to mount it.
    let bogus = env.scratch.join("bogus.img");
    std::fs::write(&bogus, vec![0u8; 1 << 20]).unwrap();
    config.rootfs_image = bogus;
    let state_dir = config.state_dir.clone();
    let err = Vm::boot(&env.image, config).await.expect_err("boot fails");
    let message = err.to_string();
    assert!(message.contains("cove-vm-init"), "{message}");
    assert!(message.contains("cannot mount"), "{message}");
    assert!(!state_dir.exists(), "a failed boot leaves nothing behind");
    assert!(host_processes_mentioning(&state_dir.display().to_string()).is_empty());
}
