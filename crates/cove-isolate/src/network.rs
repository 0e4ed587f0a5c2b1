//! Networking inside the sandbox's own network namespace. With the default
//! policy the namespace has only the loopback interface, brought up here.

use std::os::fd::{AsRawFd, OwnedFd};

use nix::fcntl::OFlag;
use nix::sched::CloneFlags;
use nix::sys::stat::Mode;

use crate::SetupError;

/// Bring `lo` up in the calling process's network namespace.
pub fn loopback_up() -> Result<(), SetupError> {
    let sock = nix::sys::socket::socket(
        nix::sys::socket::AddressFamily::Inet,
        nix::sys::socket::SockType::Datagram,
        nix::sys::socket::SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| SetupError::Network(format!("socket: {e}")))?;
    // SAFETY: `ifreq` is plain old data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write one `ifreq`.
    unsafe {
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) < 0 {
            return Err(SetupError::Network(format!(
                "SIOCGIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            )));
        }
        req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) < 0 {
            return Err(SetupError::Network(format!(
                "SIOCSIFFLAGS lo: {}",
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Network namespaces made ahead of time, so that creating a sandbox does
/// not wait for one: a new network namespace is the dearest part of
/// `clone` (about 1 ms of the ~1.1 ms here; `unshare -n true` takes 1.1 ms
/// longer than `unshare -C true`). Each spare is as a fresh one: only `lo`,
/// up, nothing else. For a long-lived, single-threaded process (the
/// daemon's sandbox factory); the process itself stays in its own network
/// namespace.
#[derive(Debug, Default)]
pub struct NetnsPool {
    spare: Vec<OwnedFd>,
}

impl NetnsPool {
    /// A spare namespace, if one is ready.
    pub fn take(&mut self) -> Option<OwnedFd> {
        self.spare.pop()
    }

    /// Make spares until there are `want`. The calling process must be
    /// single-threaded (`unshare` moves only the calling thread).
    pub fn fill(&mut self, want: usize) -> Result<(), SetupError> {
        let net = |e: nix::errno::Errno| SetupError::Network(e.to_string());
        let own = open_netns("/proc/thread-self/ns/net")?;
        while self.spare.len() < want {
            nix::sched::unshare(CloneFlags::CLONE_NEWNET).map_err(net)?;
            let made = open_netns("/proc/thread-self/ns/net").and_then(|ns| {
                loopback_up()?;
                Ok(ns)
            });
            // Back home before anything else, whatever happened.
            if let Err(err) = nix::sched::setns(&own, CloneFlags::CLONE_NEWNET) {
                eprintln!("cove: cannot return to the host's network namespace: {err}");
                std::process::abort();
            }
            self.spare.push(made?);
        }
        Ok(())
    }
}

fn open_netns(path: &str) -> Result<OwnedFd, SetupError> {
    nix::fcntl::open(path, OFlag::O_RDONLY | OFlag::O_CLOEXEC, Mode::empty())
        .map_err(|e| SetupError::Network(format!("open {path}: {e}")))
}

/// Join the network namespace `ns` (a spare from [`NetnsPool`]).
pub fn enter(ns: &OwnedFd) -> Result<(), SetupError> {
    nix::sched::setns(ns, CloneFlags::CLONE_NEWNET)
        .map_err(|e| SetupError::Network(format!("setns into a spare network namespace: {e}")))
}
