//! The agent as PID 1 of a microVM (`cove-agent --vm-init`).
//!
//! The guest kernel unpacks cove's initramfs and runs the agent as `/init`.
//! Before the agent can serve, this module does what an init system would:
//!
//! ```text
//!  initramfs (rootfs)                      the sandbox's root
//!  ─────────────────                       ──────────────────
//!  mount /dev /proc /sys
//!  read /cove/vm.json
//!  load /cove/modules/*.ko (in order)
//!  wait for the root disk
//!  erofs (ro) ┐
//!  tmpfs (rw) ┴─ overlay ── move onto / ─▶ mount /proc /sys /dev /dev/pts
//!                                          hostname, loopback, cgroup2
//!                                          serve the protocol on vsock
//! ```
//!
//! The initramfs is the kernel's `rootfs`, which cannot be `pivot_root`ed
//! away, so the overlay is moved over `/` and the agent `chroot`s into it
//! (what `switch_root` does). Any failure before serving is printed to the
//! console, where the host picks it up, and the VM powers off: a PID 1 that
//! returns would only panic the kernel with a less useful message.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use nix::fcntl::OFlag;
use nix::mount::{MsFlags, mount};
use nix::sys::stat::Mode;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::{AgentConfig, CgroupKind, Connection, Incoming, ProcessCgroups};

/// Where the host puts the per-VM configuration inside the initramfs.
pub const CONFIG_PATH: &str = "/cove/vm.json";
/// Kernel modules shipped in the initramfs.
pub const MODULES_DIR: &str = "/cove/modules";
/// Module file names (in `MODULES_DIR`), one per line, in load order.
pub const MODULE_ORDER: &str = "/cove/modules.order";
/// The modules a guest with a network device loads after those of
/// [`MODULE_ORDER`] (only then: they cost boot time under TCG).
pub const NET_MODULE_ORDER: &str = "/cove/modules.net.order";

/// The guest's side of a sandbox's network: `eth0` (the VM's virtio-net
/// device) gets `address/prefix`, the default route goes through
/// `gateway`, and `/etc/resolv.conf` names `nameserver`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestNetwork {
    pub address: std::net::Ipv4Addr,
    pub prefix: u8,
    pub gateway: std::net::Ipv4Addr,
    pub nameserver: std::net::Ipv4Addr,
}

/// What the host tells the guest's init, as JSON in [`CONFIG_PATH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInitConfig {
    /// The sandbox's hostname (its ID).
    pub hostname: String,
    /// The sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub cwd: String,
    /// Default user (`None` = root).
    pub user: Option<String>,
    /// The vsock port the agent listens on.
    pub vsock_port: u32,
    /// The template's root filesystem (read-only EROFS).
    pub root_device: String,
    /// Size cap of the writable layer (a tmpfs), in MiB; `None` = the
    /// kernel's default (half the guest's memory).
    pub overlay_size_mib: Option<u64>,
    /// Once the agent listens, connect once to this host vsock port (the
    /// host is CID 2) to say so, then hang up. The host must not send on
    /// vsock before then (see `cove_vm::Vm::boot`).
    #[serde(default)]
    pub ready_port: Option<u32>,
    /// `pids.max` of the cgroup every sandboxed process runs in; `None` =
    /// no limit.
    #[serde(default)]
    pub pids_max: Option<u64>,
    /// The sandbox's network; `None` = loopback only.
    #[serde(default)]
    pub network: Option<GuestNetwork>,
    /// The vsock port where the agent relays the host's connections to
    /// TCP ports in the guest (published ports, [`cove_protocol::relay`]);
    /// `None` = no relay.
    #[serde(default)]
    pub relay_port: Option<u32>,
}

/// The vsock ports the agent answers on and calls, from [`VmInitConfig`].
struct Vsock {
    agent: u32,
    ready: Option<u32>,
    relay: Option<u32>,
    /// The guest's address, which the relay tries after its loopback.
    address: Option<std::net::Ipv4Addr>,
}

/// Run as PID 1 of a microVM. Never returns.
pub fn main() -> ! {
    match prepare() {
        Ok((config, vsock)) => {
            let code = crate::run_incoming(config, move || {
                let incoming = listen(vsock.agent)?;
                if let Some(port) = vsock.relay {
                    // Listening before the host hears "ready": a published
                    // port works from the sandbox's first moment. Without
                    // it the sandbox still runs; its ports do not answer.
                    match listen(port) {
                        Ok(relayed) => crate::port_relay::serve(relayed, vsock.address),
                        Err(err) => eprintln!(
                            "cove-agent: no port relay (published ports will not answer): {err}"
                        ),
                    }
                }
                if let Some(ready) = vsock.ready {
                    tell_host_ready(ready);
                }
                Ok(incoming)
            });
            eprintln!("cove-vm-init: the agent stopped (exit code {code})");
        }
        Err(err) => eprintln!("cove-vm-init: {err}"),
    }
    power_off()
}

fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers; as PID 1 the agent may power
    // the machine off, which is the only way out of a VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::LINUX_REBOOT_CMD_POWER_OFF);
    }
    // Only reached if reboot failed; exiting PID 1 panics the kernel, which
    // also ends the VM (QEMU runs with -no-reboot).
    std::process::exit(1)
}

fn prepare() -> Result<(AgentConfig, Vsock), String> {
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mount_fs("proc", "/proc", "proc", nodev_nosuid_noexec(), None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev_nosuid_noexec(), None)?;

    let text = std::fs::read_to_string(CONFIG_PATH)
        .map_err(|e| format!("cannot read {CONFIG_PATH}: {e}"))?;
    let vm: VmInitConfig =
        serde_json::from_str(&text).map_err(|e| format!("{CONFIG_PATH} is not valid: {e}"))?;

    load_modules(MODULE_ORDER)?;
    if vm.network.is_some() {
        load_modules(NET_MODULE_ORDER)?;
    }
    wait_for(Path::new(&vm.root_device))?;

    for dir in ["/cove/lower", "/cove/rw", "/cove/root"] {
        mkdir(dir)?;
    }
    mount_fs(
        &vm.root_device,
        "/cove/lower",
        "erofs",
        MsFlags::MS_RDONLY | MsFlags::MS_NODEV,
        None,
    )?;
    let size = vm
        .overlay_size_mib
        .map(|mib| format!("size={mib}m,mode=0755"))
        .unwrap_or_else(|| "mode=0755".into());
    mount_fs("tmpfs", "/cove/rw", "tmpfs", MsFlags::MS_NODEV, Some(&size))?;
    mkdir("/cove/rw/upper")?;
    mkdir("/cove/rw/work")?;
    mount_fs(
        "overlay",
        "/cove/root",
        "overlay",
        MsFlags::empty(),
        Some("lowerdir=/cove/lower,upperdir=/cove/rw/upper,workdir=/cove/rw/work"),
    )?;
    // The initramfs stays in memory under the new root: drop what is no
    // longer needed (the modules are loaded, the agent is already mapped).
    let _ = std::fs::remove_dir_all(MODULES_DIR);
    let _ = std::fs::remove_file("/init");
    // Kept open for snapshots: after the switch the upper directory is
    // out of every path's reach, under the new root.
    let upper = nix::fcntl::open(
        "/cove/rw/upper",
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| format!("cannot open the writable layer: {e}"))?;
    switch_root("/cove/root")?;

    for dir in ["/proc", "/sys", "/dev", "/tmp"] {
        mkdir(dir)?;
    }
    mount_fs("proc", "/proc", "proc", nodev_nosuid_noexec(), None)?;
    mount_fs("sysfs", "/sys", "sysfs", nodev_nosuid_noexec(), None)?;
    mount_fs("devtmpfs", "/dev", "devtmpfs", MsFlags::MS_NOSUID, None)?;
    mkdir("/dev/pts")?;
    mount_fs(
        "devpts",
        "/dev/pts",
        "devpts",
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=620,ptmxmode=666"),
    )?;
    mkdir("/dev/shm")?;
    mount_fs(
        "shm",
        "/dev/shm",
        "tmpfs",
        nodev_nosuid_noexec(),
        Some("mode=1777"),
    )?;

    nix::unistd::sethostname(&vm.hostname)
        .map_err(|e| format!("cannot set the hostname {:?}: {e}", vm.hostname))?;
    if let Err(err) = loopback_up() {
        // Not fatal: processes that do not use 127.0.0.1 still work.
        eprintln!("cove-vm-init: cannot bring up the loopback interface: {err}");
    }
    if let Some(net) = &vm.network {
        // Fatal: a sandbox asked for a network it would not have.
        configure_network(net)?;
    }

    let mut env = vm.env;
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push((
            "PATH".into(),
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into(),
        ));
    }
    let config = AgentConfig {
        hostname: vm.hostname,
        env,
        cwd: vm.cwd,
        user: vm.user,
        cgroups: cgroup_root(vm.pids_max)?,
        oom_events: None,
        root: "/".into(),
        writable_layer: Some(upper),
    };
    let vsock = Vsock {
        agent: vm.vsock_port,
        ready: vm.ready_port,
        relay: vm.relay_port,
        address: vm.network.as_ref().map(|net| net.address),
    };
    Ok((config, vsock))
}

fn nodev_nosuid_noexec() -> MsFlags {
    MsFlags::MS_NODEV | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC
}

fn mkdir(path: &str) -> Result<(), String> {
    match std::fs::create_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(format!("cannot create {path}: {e}")),
    }
}

fn mount_fs(
    source: &str,
    target: &str,
    fstype: &str,
    flags: MsFlags,
    data: Option<&str>,
) -> Result<(), String> {
    mkdir(target)?;
    mount(Some(source), target, Some(fstype), flags, data)
        .map_err(|e| format!("cannot mount {fstype} {source} on {target}: {e}"))
}

/// Load the modules listed in `list` ([`MODULE_ORDER`] or
/// [`NET_MODULE_ORDER`]); the host computed the order from each module's
/// `depends=` and soft dependencies, since the guest has no modprobe.
fn load_modules(list: &str) -> Result<(), String> {
    let order = match std::fs::read_to_string(list) {
        Ok(order) => order,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("cannot read {list}: {e}")),
    };
    for name in order.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let path = Path::new(MODULES_DIR).join(name);
        let file = std::fs::File::open(&path)
            .map_err(|e| format!("cannot open module {}: {e}", path.display()))?;
        // SAFETY: finit_module reads the module from an fd we own and an
        // empty, NUL-terminated parameter string.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_finit_module,
                file.as_raw_fd(),
                c"".as_ptr(),
                0 as libc::c_int,
            )
        };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() != Some(libc::EEXIST) {
                return Err(format!("cannot load kernel module {name}: {err}"));
            }
        }
    }
    Ok(())
}

/// Devices appear when their driver probes them, which may finish after
/// `finit_module` returns.
fn wait_for(device: &Path) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !device.exists() {
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the root disk {} did not appear (is the virtio-blk device attached?)",
                device.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    Ok(())
}

fn switch_root(new_root: &str) -> Result<(), String> {
    std::env::set_current_dir(new_root).map_err(|e| format!("cannot enter {new_root}: {e}"))?;
    mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
        .map_err(|e| format!("cannot move {new_root} onto /: {e}"))?;
    nix::unistd::chroot(".").map_err(|e| format!("cannot chroot into {new_root}: {e}"))?;
    std::env::set_current_dir("/").map_err(|e| format!("cannot enter /: {e}"))
}

/// A cgroup v2 hierarchy lets the agent kill exact process trees, as it
/// does in namespace sandboxes. Without one it falls back to process
/// groups. Every sandboxed process runs below `/sys/fs/cgroup/sandbox`,
/// which carries the pids limit (the agent itself stays in the root).
fn cgroup_root(pids_max: Option<u64>) -> Result<Option<ProcessCgroups>, String> {
    let path = "/sys/fs/cgroup";
    if let Err(err) = mount_fs("cgroup2", path, "cgroup2", nodev_nosuid_noexec(), None) {
        if pids_max.is_some() {
            return Err(format!("{err}: the pids limit cannot be enforced"));
        }
        eprintln!("cove-vm-init: {err}; timeouts will kill process groups only");
        return Ok(None);
    }
    let sandbox = format!("{path}/sandbox");
    mkdir(&sandbox)?;
    if let Some(max) = pids_max {
        std::fs::write(format!("{path}/cgroup.subtree_control"), "+pids")
            .and_then(|()| std::fs::write(format!("{sandbox}/pids.max"), max.to_string()))
            .map_err(|e| format!("cannot set the pids limit of {max}: {e}"))?;
    }
    let dir = std::fs::File::open(&sandbox).map_err(|e| format!("{sandbox}: {e}"))?;
    Ok(Some(ProcessCgroups {
        dir: OwnedFd::from(dir),
        kind: CgroupKind::V2,
    }))
}

/// An `AF_INET` datagram socket for interface ioctls.
fn inet_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: socket takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A `sockaddr` holding an IPv4 address (port 0).
fn sockaddr_v4(ip: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size and both are
    // plain old data; the kernel reads the family first.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Give `eth0` the sandbox's address, bring it up, route through the
/// gateway, and name the resolver. The device may still be probing when
/// this starts.
fn configure_network(net: &GuestNetwork) -> Result<(), String> {
    wait_for(Path::new("/sys/class/net/eth0"))
        .map_err(|_| "the network device eth0 did not appear".to_string())?;
    let fail = |what: &str| {
        let err = std::io::Error::last_os_error();
        format!("cannot {what} eth0: {err}")
    };
    let sock = inet_socket().map_err(|e| format!("cannot configure eth0: {e}"))?;
    let mut req = ifreq(c"eth0");
    let mask = std::net::Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(net.prefix))
            .unwrap_or(0),
    );
    // SAFETY: each ioctl reads or writes the ifreq / rtentry we own, which
    // name eth0 and hold valid socket addresses.
    unsafe {
        req.ifr_ifru.ifru_addr = sockaddr_v4(net.address);
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFADDR, &req) < 0 {
            return Err(fail(&format!("set address {} on", net.address)));
        }
        req.ifr_ifru.ifru_netmask = sockaddr_v4(mask);
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFNETMASK, &req) < 0 {
            return Err(fail("set the netmask of"));
        }
        link_up(&sock, c"eth0").map_err(|e| format!("cannot bring up eth0: {e}"))?;
        let mut route: libc::rtentry = std::mem::zeroed();
        route.rt_dst = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
        route.rt_genmask = sockaddr_v4(std::net::Ipv4Addr::UNSPECIFIED);
        route.rt_gateway = sockaddr_v4(net.gateway);
        route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &route) < 0 {
            return Err(fail(&format!("route through {} from", net.gateway)));
        }
    }
    // IPv4 only, as in namespace sandboxes.
    let _ = std::fs::write("/proc/sys/net/ipv6/conf/all/disable_ipv6", "1");
    mkdir("/etc")?;
    // The template's file may be a symlink (into /run, say): replace it.
    let _ = std::fs::remove_file("/etc/resolv.conf");
    std::fs::write(
        "/etc/resolv.conf",
        format!("nameserver {}\n", net.nameserver),
    )
    .map_err(|e| format!("cannot write /etc/resolv.conf: {e}"))
}

fn loopback_up() -> std::io::Result<()> {
    link_up(&inet_socket()?, c"lo")
}

/// An `ifreq` naming interface `name`.
fn ifreq(name: &std::ffi::CStr) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.to_bytes_with_nul()) {
        *dst = *src as libc::c_char;
    }
    req
}

/// Bring interface `name` up, through the ioctl socket `sock`.
fn link_up(sock: &OwnedFd, name: &std::ffi::CStr) -> std::io::Result<()> {
    let mut req = ifreq(name);
    // SAFETY: the ioctls read and write the ifreq we own, which names the
    // interface.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A vsock listener on `port`, accepting from any CID (the host is CID 2).
fn listen(port: u32) -> std::io::Result<Incoming> {
    // SAFETY: socket takes no pointers; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if raw < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    addr.svm_port = port;
    // SAFETY: bind reads `addr`, whose size we pass; listen takes no pointers.
    unsafe {
        if libc::bind(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        ) < 0
        {
            return Err(std::io::Error::last_os_error());
        }
        if libc::listen(sock.as_raw_fd(), 128) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    let listener = crate::fdio::async_fd(sock)?;
    let incoming = futures::stream::unfold(listener, |listener| async move {
        let next = accept(&listener).await;
        Some((next, listener))
    });
    Ok(Box::pin(incoming))
}

/// Connect to the host's vsock `port` and hang up: the host's signal that
/// the agent listens. A failure is only printed: the host then finds the
/// agent by polling, or times out with the console.
fn tell_host_ready(port: u32) {
    // SAFETY: socket takes no pointers; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        eprintln!(
            "cove-agent: cannot tell the host it is ready (it will poll): {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: sockaddr_vm is plain old data; all-zero is a valid value.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_cid = libc::VMADDR_CID_HOST;
    addr.svm_port = port;
    // SAFETY: connect reads `addr`, whose size we pass.
    let rc = unsafe {
        libc::connect(
            sock.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        eprintln!(
            "cove-agent: cannot tell the host it is ready (it will poll): {}",
            std::io::Error::last_os_error()
        );
    }
}

async fn accept(listener: &AsyncFd<OwnedFd>) -> std::io::Result<Connection> {
    loop {
        let mut guard = listener.readable().await?;
        let accepted = guard.try_io(|fd| {
            // SAFETY: accept4 with null address pointers writes nothing back.
            let raw = unsafe {
                libc::accept4(
                    fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if raw < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: accept4 returned a fresh descriptor nobody else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(raw) })
        });
        if let Ok(result) = accepted {
            let fd = std::sync::Arc::new(crate::fdio::async_fd(result?)?);
            return Ok((
                Box::new(VsockHalf(fd.clone())) as Box<dyn AsyncRead + Unpin>,
                Box::new(VsockHalf(fd)) as Box<dyn AsyncWrite + Unpin>,
            ));
        }
    }
}

/// One direction of a connected vsock socket. Reads and writes go straight
/// to the socket; both halves share its readiness registration.
struct VsockHalf(std::sync::Arc<AsyncFd<OwnedFd>>);

impl AsyncRead for VsockHalf {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| {
                // SAFETY: read writes at most `unfilled.len()` bytes into it.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return std::task::Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return std::task::Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockHalf {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        loop {
            let mut guard = std::task::ready!(self.0.poll_write_ready(cx))?;
            match guard.try_io(|fd| {
                // SAFETY: send reads at most `data.len()` bytes from it;
                // MSG_NOSIGNAL turns a closed peer into EPIPE, not SIGPIPE.
                let n = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        data.as_ptr().cast(),
                        data.len(),
                        libc::MSG_NOSIGNAL,
                    )
                };
                if n < 0 {
                    Err(std::io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            }) {
                Ok(result) => return std::task::Poll::Ready(result),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        // SAFETY: shutdown takes no pointers.
        let rc = unsafe { libc::shutdown(self.0.get_ref().as_raw_fd(), libc::SHUT_WR) };
        std::task::Poll::Ready(if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_as_json() {
        let config = VmInitConfig {
            hostname: "sbx-abc".into(),
            env: vec![("A".into(), "b\nc".into())],
            cwd: "/workspace".into(),
            user: None,
            vsock_port: 1024,
            root_device: "/dev/vda".into(),
            overlay_size_mib: Some(256),
            ready_port: Some(1025),
            pids_max: Some(64),
            network: Some(GuestNetwork {
                address: std::net::Ipv4Addr::new(10, 88, 0, 7),
                prefix: 16,
                gateway: std::net::Ipv4Addr::new(10, 88, 0, 1),
                nameserver: std::net::Ipv4Addr::new(10, 88, 0, 1),
            }),
            relay_port: Some(1026),
        };
        let text = serde_json::to_string(&config).unwrap_or_default();
        let back: Result<VmInitConfig, _> = serde_json::from_str(&text);
        assert_eq!(back.ok(), Some(config));
        // A config written before the network field reads as no network.
        let old = text
            .split(",\"network\"")
            .next()
            .unwrap_or_default()
            .to_string()
            + "}";
        let back: Option<VmInitConfig> = serde_json::from_str(&old).ok();
        assert_eq!(back.map(|c| c.network), Some(None), "{old}");
    }
}
