//! The port relay of a microVM: how the host reaches a TCP port inside the
//! guest (a published port) without a network path to it.
//!
//! Besides its protocol port, the agent in a microVM listens on a second
//! vsock port (`VmInitConfig::relay_port`). Each connection there asks for
//! one TCP port: the host writes the port as two big-endian bytes, the
//! agent connects to it inside the guest (127.0.0.1, then ::1, then the
//! guest's own address) and writes one status byte. After any status but
//! [`CONNECTED`] the agent closes.
//!
//! After [`CONNECTED`] the guest's bytes come back raw, and the host's go
//! as chunks: a `u32` big-endian length, then that many bytes, at most
//! [`MAX_CHUNK`]. The empty chunk says the client has finished sending (a
//! TCP half-close), and the agent shuts down the sending side of its TCP
//! connection in turn. The half-close travels in band because vsock does
//! not carry one reliably: a shutdown of one side can end the whole
//! connection on the way through a vsock backend.
//!
//! ```text
//!  host                                  agent (in the guest)
//!   │ port: u16 (big-endian)  ─────────▶  │ connect 127.0.0.1:port, ::1, eth0
//!   │                         ◀─────────  │ status: u8
//!   │ len: u32, bytes …       ─────────▶  │ → the TCP port   (status CONNECTED)
//!   │ len = 0                 ─────────▶  │ shutdown(SHUT_WR) of the TCP port
//!   │ bytes                   ◀─────────  │ ← the TCP port, then close
//! ```

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The agent is connected to the port; the stream follows.
pub const CONNECTED: u8 = 0;
/// Nothing in the guest listens on the port.
pub const REFUSED: u8 = 1;
/// The connection failed for another reason (timed out, no route).
pub const FAILED: u8 = 2;

/// The request for `port`.
pub fn request(port: u16) -> [u8; 2] {
    port.to_be_bytes()
}

/// The port a request asks for.
pub fn requested_port(request: [u8; 2]) -> u16 {
    u16::from_be_bytes(request)
}

/// The largest chunk of the host's bytes.
pub const MAX_CHUNK: usize = 64 * 1024;

/// The host's end of a relayed connection after [`CONNECTED`]: reads are
/// the guest's raw bytes; each write goes out as one chunk, and
/// `shutdown` sends the empty chunk (the underlying stream is not
/// half-closed).
#[derive(Debug)]
pub struct HostEnd<S> {
    inner: S,
    /// A chunk (head and bytes) accepted but not yet all written.
    pending: Vec<u8>,
    written: usize,
    ended: bool,
}

impl<S: AsyncRead + AsyncWrite + Unpin> HostEnd<S> {
    pub fn new(inner: S) -> HostEnd<S> {
        HostEnd {
            inner,
            pending: Vec::new(),
            written: 0,
            ended: false,
        }
    }

    /// Write out what is pending.
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.pending.len() {
            let n =
                ready!(Pin::new(&mut self.inner).poll_write(cx, &self.pending[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        self.pending.clear();
        self.written = 0;
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for HostEnd<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for HostEnd<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the relayed connection was shut down for writing",
            )));
        }
        ready!(this.poll_drain(cx))?;
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = data.len().min(MAX_CHUNK);
        this.pending.extend_from_slice(&(n as u32).to_be_bytes());
        this.pending.extend_from_slice(&data[..n]);
        // Accepted: what the inner stream does not take now goes out on
        // the next write, flush or shutdown.
        if let Poll::Ready(Err(err)) = this.poll_drain(cx) {
            return Poll::Ready(Err(err));
        }
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_drain(cx))?;
        if !this.ended {
            this.ended = true;
            this.pending.extend_from_slice(&0u32.to_be_bytes());
            ready!(this.poll_drain(cx))?;
        }
        Pin::new(&mut this.inner).poll_flush(cx)
    }
}

/// The agent's side: copy the host's chunks to `to` until the empty chunk
/// (`Ok(true)`: the client has finished sending) or the end of the stream
/// (`Ok(false)`: the host went away).
pub async fn copy_chunks<R, W>(from: &mut R, to: &mut W) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; MAX_CHUNK];
    loop {
        let mut head = [0u8; 4];
        match from.read_exact(&mut head).await {
            Ok(_) => {}
            Err(err) if err.kind() == io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(err) => return Err(err),
        }
        let len = u32::from_be_bytes(head) as usize;
        if len == 0 {
            return Ok(true);
        }
        if len > MAX_CHUNK {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("a relay chunk of {len} bytes (at most {MAX_CHUNK})"),
            ));
        }
        from.read_exact(&mut buf[..len]).await?;
        to.write_all(&buf[..len]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes of any size arrive whole and in order, and a shutdown is
    /// the end chunk while the stream stays open for reading.
    #[tokio::test]
    async fn chunks_carry_bytes_and_the_half_close() {
        let (host, mut guest) = tokio::io::duplex(1000);
        let mut host = HostEnd::new(host);
        let sent: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let writer = {
            let sent = sent.clone();
            tokio::spawn(async move {
                for piece in sent.chunks(70_001) {
                    host.write_all(piece).await.unwrap();
                }
                host.shutdown().await.unwrap();
                // Still readable after the half-close.
                let mut answer = String::new();
                host.read_to_string(&mut answer).await.unwrap();
                answer
            })
        };
        let mut got = Vec::new();
        assert!(copy_chunks(&mut guest, &mut got).await.unwrap());
        assert_eq!(got, sent);
        guest.write_all(b"done").await.unwrap();
        drop(guest);
        assert_eq!(writer.await.unwrap(), "done");
    }

    /// A host that goes away without the end chunk; a chunk over the limit.
    #[tokio::test]
    async fn an_abrupt_end_and_an_oversized_chunk() {
        let mut cut: &[u8] = &[0, 0, 0, 2, b'h', b'i'];
        let mut got = Vec::new();
        assert!(!copy_chunks(&mut cut, &mut got).await.unwrap());
        assert_eq!(got, b"hi");
        let big = ((MAX_CHUNK + 1) as u32).to_be_bytes();
        let mut from: &[u8] = &big;
        let err = copy_chunks(&mut from, &mut Vec::new()).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}
