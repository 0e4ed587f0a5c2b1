//! Published ports: a TCP listener on the host's 127.0.0.1 per exposed
//! port, and a userspace proxy that forwards each connection into the
//! sandbox.
//!
//! For a namespace sandbox the proxy's outgoing socket is created inside
//! the sandbox's network namespace, so it reaches the port on the
//! sandbox's own loopback: a dev server that listens on `localhost` only is
//! published too, and it works for sandboxes without egress (`network:
//! "none"`) as well. It tries 127.0.0.1, then ::1, then the sandbox's
//! bridge address. A microVM's loopback is in its guest kernel: there the
//! proxy tries the guest's address on the bridge (if it has egress), then
//! a [`PortRelay`] (the guest's agent, over vsock), which makes the
//! namespace's tries from inside the guest.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::netns;

/// How long a connection into the sandbox may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `connect`, given up after [`CONNECT_TIMEOUT`].
async fn within(
    target: SocketAddr,
    connect: impl std::future::Future<Output = io::Result<TcpStream>>,
) -> io::Result<TcpStream> {
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result,
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{target}: no answer"),
        )),
    }
}

/// Bind 127.0.0.1:`host_port` (0: any free port).
pub async fn bind(host_port: u16) -> io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, host_port)).await
}

/// A byte stream both ways: what a [`PortRelay`] connects to.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}

impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Connects to TCP ports inside a sandbox that the host has no socket
/// path to (a microVM's guest).
pub trait PortRelay: Send + Sync + std::fmt::Debug {
    /// A stream to `port` inside the sandbox; nothing listening there is
    /// [`io::ErrorKind::ConnectionRefused`].
    fn connect(&self, port: u16) -> BoxFuture<'_, io::Result<Box<dyn Duplex>>>;
}

/// Where the connections to a published port go.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// A sandbox with a network namespace of its own: its loopback, then
    /// its bridge address (if it has one), connected from inside it.
    Namespace {
        netns: Arc<OwnedFd>,
        address: Option<Ipv4Addr>,
    },
    /// A sandbox reached through a relay (a microVM's agent), and over
    /// its network device first when it has an address on the bridge.
    Relay {
        relay: Arc<dyn PortRelay>,
        address: Option<Ipv4Addr>,
    },
}

/// Forward every connection to `listener` into `port` of the sandbox
/// behind `upstream`.
pub fn serve(listener: TcpListener, upstream: Upstream, port: u16) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let Ok((client, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let upstream = upstream.clone();
            tokio::spawn(async move {
                match connect(&upstream, port).await {
                    Ok(upstream) => proxy(client, upstream).await,
                    Err(err) => {
                        tracing::debug!(port, %err, "published port: nothing answers in the sandbox");
                    }
                }
            });
        }
    })
}

async fn proxy(mut client: TcpStream, mut upstream: Box<dyn Duplex>) {
    let _ = client.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

/// A connection to `port` in the sandbox.
async fn connect(upstream: &Upstream, port: u16) -> io::Result<Box<dyn Duplex>> {
    let (netns, address) = match upstream {
        Upstream::Namespace { netns, address } => (netns, *address),
        Upstream::Relay { relay, address } => {
            // The network device first: under TCG it moved a large
            // download ~6x faster than the vsock relay. The relay then
            // reaches what listens on the guest's loopback only.
            if let Some(address) = address {
                let target = SocketAddr::from((*address, port));
                if let Ok(stream) = within(target, TcpStream::connect(target)).await {
                    let _ = stream.set_nodelay(true);
                    return Ok(Box::new(stream));
                }
            }
            let reached = tokio::time::timeout(CONNECT_TIMEOUT, relay.connect(port)).await;
            return reached.unwrap_or_else(|_| {
                Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("port {port}: the relay does not answer"),
                ))
            });
        }
    };
    let mut targets: Vec<SocketAddr> = vec![
        (Ipv4Addr::LOCALHOST, port).into(),
        (Ipv6Addr::LOCALHOST, port).into(),
    ];
    targets.extend(address.map(|a| SocketAddr::from((a, port))));
    let mut last = io::Error::new(io::ErrorKind::ConnectionRefused, "no address to try");
    for target in targets {
        let socket = match netns::tcp_socket(netns, target.is_ipv6()).await {
            Ok(socket) => socket,
            Err(e) => {
                last = e;
                continue;
            }
        };
        match within(target, socket.connect(target)).await {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                return Ok(Box::new(stream));
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}
