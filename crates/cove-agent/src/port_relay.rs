//! The guest's end of a microVM's published ports
//! ([`cove_protocol::relay`]): each vsock connection names a TCP port, and
//! the agent joins it to that port inside the guest. So the host reaches a
//! server that listens on the guest's `localhost` only, and a VM without a
//! network device publishes ports too.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use cove_protocol::relay;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::Incoming;

/// How long the host has to name its port, and a connection in the guest
/// to be made.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Relay every connection `incoming` yields; `address` is the guest's own
/// address on its network device, if it has one. Runs on the agent's
/// `LocalSet` for as long as the agent does.
pub(crate) fn serve(mut incoming: Incoming, address: Option<Ipv4Addr>) {
    tokio::task::spawn_local(async move {
        while let Some(next) = incoming.next().await {
            match next {
                Ok((read, write)) => {
                    tokio::task::spawn_local(relay_one(read, write, address));
                }
                Err(err) => {
                    eprintln!("cove-agent: port relay: accept failed: {err}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    });
}

async fn relay_one(
    mut from_host: impl AsyncRead + Unpin,
    mut to_host: impl AsyncWrite + Unpin,
    address: Option<Ipv4Addr>,
) {
    let mut request = [0u8; 2];
    let asked = tokio::time::timeout(HANDSHAKE_TIMEOUT, from_host.read_exact(&mut request));
    if !matches!(asked.await, Ok(Ok(_))) {
        return;
    }
    let port = relay::requested_port(request);
    let stream = match connect(port, address).await {
        Ok(stream) => stream,
        Err(err) => {
            let status = if err.kind() == std::io::ErrorKind::ConnectionRefused {
                relay::REFUSED
            } else {
                relay::FAILED
            };
            let _ = to_host.write_all(&[status]).await;
            let _ = to_host.shutdown().await;
            return;
        }
    };
    if to_host.write_all(&[relay::CONNECTED]).await.is_err() {
        return;
    }
    let _ = stream.set_nodelay(true);
    let (mut from_port, mut to_port) = stream.into_split();
    // Each direction ends on its own, so a client that shuts down its
    // writing side (the host's end chunk) still gets the answer.
    let inbound = async {
        let _ = relay::copy_chunks(&mut from_host, &mut to_port).await;
        let _ = to_port.shutdown().await;
    };
    let outbound = async {
        let _ = tokio::io::copy(&mut from_port, &mut to_host).await;
        let _ = to_host.shutdown().await;
    };
    futures::join!(inbound, outbound);
}

/// A connection to `port` in the guest: its loopback first (a server that
/// listens on `localhost` only), then its address.
async fn connect(port: u16, address: Option<Ipv4Addr>) -> std::io::Result<TcpStream> {
    let mut targets: Vec<SocketAddr> = vec![
        (Ipv4Addr::LOCALHOST, port).into(),
        (Ipv6Addr::LOCALHOST, port).into(),
    ];
    targets.extend(address.map(|a| SocketAddr::from((a, port))));
    let mut last = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
    for target in targets {
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(target)).await {
            Ok(Ok(stream)) => return Ok(stream),
            Ok(Err(err)) => last = err,
            Err(_) => last = std::io::Error::from(std::io::ErrorKind::TimedOut),
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The relay over a socket pair standing in for vsock: a port that
    /// answers, an echo through it after the client's half-close, and one
    /// nobody listens on.
    #[tokio::test(flavor = "current_thread")]
    async fn joins_a_port_and_refuses_a_closed_one() {
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let server = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                let port = server.local_addr().unwrap().port();
                tokio::spawn(async move {
                    let (mut conn, _) = server.accept().await.unwrap();
                    let mut got = Vec::new();
                    conn.read_to_end(&mut got).await.unwrap();
                    conn.write_all(&got).await.unwrap();
                    conn.write_all(b" back").await.unwrap();
                });

                let (mut host, guest) = tokio::net::UnixStream::pair().unwrap();
                let (read, write) = guest.into_split();
                tokio::task::spawn_local(relay_one(read, write, None));
                host.write_all(&relay::request(port)).await.unwrap();
                let mut status = [0u8; 1];
                host.read_exact(&mut status).await.unwrap();
                assert_eq!(status[0], relay::CONNECTED);
                // The half-close goes as the end chunk; the answer follows.
                let mut host = relay::HostEnd::new(host);
                host.write_all(b"there and").await.unwrap();
                host.shutdown().await.unwrap();
                let mut answer = String::new();
                host.read_to_string(&mut answer).await.unwrap();
                assert_eq!(answer, "there and back");

                // A port nothing listens on: a status, then the end.
                let closed = {
                    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
                    l.local_addr().unwrap().port()
                };
                let (mut host, guest) = tokio::net::UnixStream::pair().unwrap();
                let (read, write) = guest.into_split();
                tokio::task::spawn_local(relay_one(read, write, None));
                host.write_all(&relay::request(closed)).await.unwrap();
                let mut rest = Vec::new();
                host.read_to_end(&mut rest).await.unwrap();
                assert_eq!(rest, [relay::REFUSED]);
            })
            .await;
    }
}
