//! Doing things inside a sandbox's network namespace from the daemon.
//!
//! A socket belongs to the namespace it was created in, for its whole
//! life. So the daemon creates sockets (netlink, TCP) on a short-lived
//! thread that has joined the sandbox's namespace, and then uses them from
//! its ordinary runtime threads. The thread exits right after, so no other
//! work of the daemon ever runs in a sandbox's namespace.

use std::io;
use std::os::fd::OwnedFd;

use nix::sched::CloneFlags;

/// Run `f` on a fresh thread that has joined the network namespace `netns`.
pub async fn in_netns<T, F>(netns: &OwnedFd, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let fd = netns.try_clone()?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("cove-netns".into())
        .spawn(move || {
            let result = nix::sched::setns(&fd, CloneFlags::CLONE_NEWNET)
                .map_err(|e| io::Error::other(format!("cannot enter the sandbox's network: {e}")))
                .and_then(|()| f());
            let _ = tx.send(result);
        })?;
    rx.await
        .map_err(|_| io::Error::other("the thread in the sandbox's network namespace died"))?
}

/// A TCP socket (non-blocking, close-on-exec) created in `netns`.
pub async fn tcp_socket(netns: &OwnedFd, v6: bool) -> io::Result<tokio::net::TcpSocket> {
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, socket};
    let family = if v6 {
        AddressFamily::Inet6
    } else {
        AddressFamily::Inet
    };
    let fd = in_netns(netns, move || {
        socket(
            family,
            SockType::Stream,
            SockFlag::SOCK_CLOEXEC | SockFlag::SOCK_NONBLOCK,
            None,
        )
        .map_err(io::Error::from)
    })
    .await?;
    Ok(tokio::net::TcpSocket::from_std_stream(
        std::net::TcpStream::from(fd),
    ))
}

/// Write a sysctl under `/proc/sys/net` as seen from `netns` (the
/// `/proc/sys/net` tree shows the namespace of the thread that opens it).
pub async fn sysctl_in(netns: &OwnedFd, path: String, value: &'static str) -> io::Result<()> {
    in_netns(netns, move || std::fs::write(&path, value)).await
}
