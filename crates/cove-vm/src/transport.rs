//! How the host reaches the agent inside a VM.
//!
//! Both VMMs expose the guest's vsock as a unix socket on the host
//! ("hybrid vsock"): QEMU through the `vhost-device-vsock` backend, since
//! this kind of host has no `/dev/vhost-vsock`, and Firecracker natively.
//! A client connects, writes `CONNECT <port>\n`, reads `OK <host port>\n`,
//! and from then on the socket is a byte stream to the guest's listener.

use std::fmt;
use std::path::{Path, PathBuf};

use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

use crate::VmError;

/// A connection to the agent; hand it to
/// `cove_protocol::client::AgentClient::connect`.
pub type AgentStream = UnixStream;

/// The guest's vsock port the agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// The guest's vsock port where the agent relays connections to TCP ports
/// inside the guest ([`cove_protocol::relay`]). (The host's port 1025,
/// where the guest says it is ready, is another namespace of ports.)
pub const RELAY_PORT: u32 = 1026;

/// Opens new connections to the agent of one VM.
pub trait Transport: Send + Sync + fmt::Debug {
    fn connect(&self) -> BoxFuture<'_, Result<AgentStream, VmError>>;
}

/// How a VM's transport is found again after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TransportRecord {
    /// Firecracker-style hybrid vsock on a unix socket.
    HybridVsock { uds: PathBuf, port: u32 },
}

impl TransportRecord {
    pub fn open(&self) -> Box<dyn Transport> {
        match self {
            TransportRecord::HybridVsock { uds, port } => Box::new(HybridVsock {
                uds: uds.clone(),
                port: *port,
            }),
        }
    }

    /// A stream to TCP `port` inside the guest (its loopback first),
    /// relayed by the guest's agent. Nothing listening there is
    /// [`std::io::ErrorKind::ConnectionRefused`].
    pub async fn connect_tcp(
        &self,
        port: u16,
    ) -> std::io::Result<cove_protocol::relay::HostEnd<AgentStream>> {
        let TransportRecord::HybridVsock { uds, .. } = self;
        let mut stream = hybrid_connect(uds, RELAY_PORT)
            .await
            .map_err(std::io::Error::other)?;
        stream
            .write_all(&cove_protocol::relay::request(port))
            .await?;
        let mut status = [0u8; 1];
        stream.read_exact(&mut status).await.map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("the guest's port relay hung up before answering: {e}"),
            )
        })?;
        match status[0] {
            cove_protocol::relay::CONNECTED => Ok(cove_protocol::relay::HostEnd::new(stream)),
            cove_protocol::relay::REFUSED => Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                format!("nothing listens on port {port} in the guest"),
            )),
            _ => Err(std::io::Error::other(format!(
                "the guest cannot connect to its port {port}"
            ))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct HybridVsock {
    pub uds: PathBuf,
    pub port: u32,
}

impl Transport for HybridVsock {
    fn connect(&self) -> BoxFuture<'_, Result<AgentStream, VmError>> {
        Box::pin(hybrid_connect(&self.uds, self.port))
    }
}

async fn hybrid_connect(uds: &Path, port: u32) -> Result<AgentStream, VmError> {
    let err = |detail: String| VmError::Transport(format!("{}: {detail}", uds.display()));
    let mut stream = UnixStream::connect(uds)
        .await
        .map_err(|e| err(format!("cannot connect: {e}")))?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    // Read the answer a byte at a time: whatever follows the newline
    // belongs to the agent protocol.
    let mut line = Vec::with_capacity(16);
    loop {
        let mut byte = [0u8; 1];
        match stream.read(&mut byte).await {
            Ok(0) => {
                return Err(err(format!(
                    "nothing listens on vsock port {port} in the guest (yet)"
                )));
            }
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if line.len() < 64 => line.push(byte[0]),
            Ok(_) => return Err(err("the vsock handshake answer is too long".into())),
            Err(e) => return Err(err(e.to_string())),
        }
    }
    if line.starts_with(b"OK ") {
        Ok(stream)
    } else {
        Err(err(format!(
            "unexpected vsock handshake answer {:?}",
            String::from_utf8_lossy(&line)
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn speaks_the_connect_handshake() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let uds = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&uds)?;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = [0u8; 13];
            s.read_exact(&mut buf).await?;
            assert_eq!(&buf, b"CONNECT 1024\n");
            s.write_all(b"OK 5000\nhello").await?;
            std::io::Result::Ok(())
        });
        let transport = HybridVsock { uds, port: 1024 };
        let mut stream = transport.connect().await?;
        let mut rest = [0u8; 5];
        stream.read_exact(&mut rest).await?;
        assert_eq!(
            &rest, b"hello",
            "bytes after the handshake are the stream's"
        );
        server.await??;
        Ok(())
    }

    /// The host's side of the port relay: the port asked for, then the
    /// guest's status byte.
    #[tokio::test]
    async fn asks_the_relay_for_a_port() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let uds = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&uds)?;
        tokio::spawn(async move {
            for status in [
                cove_protocol::relay::CONNECTED,
                cove_protocol::relay::REFUSED,
            ] {
                let (mut s, _) = listener.accept().await?;
                let mut connect = [0u8; 13];
                s.read_exact(&mut connect).await?;
                assert_eq!(&connect, b"CONNECT 1026\n");
                s.write_all(b"OK 5001\n").await?;
                let mut port = [0u8; 2];
                s.read_exact(&mut port).await?;
                assert_eq!(u16::from_be_bytes(port), 8000);
                s.write_all(&[status]).await?;
                s.write_all(b"page").await?;
            }
            std::io::Result::Ok(())
        });
        let record = TransportRecord::HybridVsock {
            uds,
            port: AGENT_PORT,
        };
        let mut stream = record.connect_tcp(8000).await?;
        let mut page = [0u8; 4];
        stream.read_exact(&mut page).await?;
        assert_eq!(&page, b"page");
        let refused = record.connect_tcp(8000).await.map(|_| ());
        assert_eq!(
            refused.map_err(|e| e.kind()),
            Err(std::io::ErrorKind::ConnectionRefused)
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_closed_port_is_an_error_not_a_hang() -> Result<(), Box<dyn std::error::Error>> {
        let dir = tempfile::tempdir()?;
        let uds = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&uds)?;
        tokio::spawn(async move {
            // As vhost-device-vsock does: read the request, find no
            // listener on that port, close.
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 10];
                let _ = s.read_exact(&mut buf).await;
            }
        });
        let result = HybridVsock { uds, port: 7 }.connect().await;
        assert!(matches!(result, Err(VmError::Transport(m)) if m.contains("port 7")));
        Ok(())
    }
}
