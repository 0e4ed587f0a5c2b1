//! The host side of transfer connections: one bulk file upload or
//! download on a connection of its own, raw bytes in length-prefixed
//! chunks (see [`crate::fs::TRANSFER_CLIENT`]). Nothing is buffered beyond
//! one read; the socket's buffers are the flow control.

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ClientError;
use crate::fs::{FsDone, FsEntry, FsOp, FsReply, FsRequest, TRANSFER_CLIENT, TRANSFER_MAX_CHUNK};
use crate::{
    AgentMessage, Hello, HostMessage, MAX_FRAME_LEN, PROTOCOL_VERSION, decode_frame, encode_frame,
};

/// The request id of the one operation on a transfer connection.
const REQ: u32 = 1;

/// Largest piece handed out by [`TransferDownload::next_chunk`].
const READ_PIECE: usize = 256 * 1024;

fn lost(err: std::io::Error) -> ClientError {
    ClientError::Closed(format!("the transfer connection broke: {err}"))
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, msg: &HostMessage) -> Result<(), ClientError> {
    let frame = encode_frame(msg)?;
    stream.write_all(&frame).await.map_err(lost)
}

async fn receive<S: AsyncRead + Unpin>(stream: &mut S) -> Result<AgentMessage, ClientError> {
    let mut frame = vec![0u8; 4];
    stream.read_exact(&mut frame).await.map_err(lost)?;
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(ClientError::Agent(format!(
            "a frame of {len} bytes is over the limit"
        )));
    }
    frame.resize(4 + len, 0);
    stream.read_exact(&mut frame[4..]).await.map_err(lost)?;
    match decode_frame::<AgentMessage>(&frame)? {
        Some((msg, _)) => Ok(msg),
        None => Err(ClientError::Agent("a truncated frame".into())),
    }
}

/// Greet the agent as a transfer, start `op`, and wait for `Ready`.
async fn start<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    op: FsOp,
) -> Result<Option<FsEntry>, ClientError> {
    let hello = HostMessage::Hello(Hello {
        version: PROTOCOL_VERSION,
        client: TRANSFER_CLIENT.into(),
    });
    send(stream, &hello).await?;
    match receive(stream).await? {
        AgentMessage::Hello(h) if h.version == PROTOCOL_VERSION => {}
        AgentMessage::Hello(h) => {
            return Err(ClientError::VersionMismatch {
                agent: h.version,
                ours: PROTOCOL_VERSION,
            });
        }
        AgentMessage::Error { message, .. } => return Err(ClientError::Handshake(message)),
        other => {
            return Err(ClientError::Handshake(format!(
                "expected Hello, got {other:?}"
            )));
        }
    }
    let msg = HostMessage::Fs {
        req: REQ,
        msg: FsRequest::Start(op),
    };
    send(stream, &msg).await?;
    match receive(stream).await? {
        AgentMessage::Fs {
            msg: FsReply::Ready { entry },
            ..
        } => Ok(entry),
        AgentMessage::Fs {
            msg: FsReply::Done(Err(err)),
            ..
        } => Err(ClientError::Fs(err)),
        other => Err(ClientError::Agent(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

async fn done<S: AsyncRead + Unpin>(stream: &mut S) -> Result<FsDone, ClientError> {
    match receive(stream).await? {
        AgentMessage::Fs {
            msg: FsReply::Done(result),
            ..
        } => result.map_err(ClientError::Fs),
        other => Err(ClientError::Agent(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

/// A regular file coming out of the sandbox on its own connection.
#[derive(Debug)]
pub struct TransferDownload<S> {
    stream: S,
    entry: FsEntry,
    left_in_chunk: usize,
    finished: bool,
}

/// Start downloading `path` on `stream`, a fresh connection to the agent.
pub async fn transfer_read<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
) -> Result<TransferDownload<S>, ClientError> {
    let op = FsOp::Read {
        path: path.into(),
        window: 0,
    };
    let entry = start(&mut stream, op)
        .await?
        .ok_or_else(|| ClientError::Agent("the agent did not describe the file".into()))?;
    Ok(TransferDownload {
        stream,
        entry,
        left_in_chunk: 0,
        finished: false,
    })
}

impl<S: AsyncRead + AsyncWrite + Unpin> TransferDownload<S> {
    /// The file: its size is exactly the number of bytes that follow
    /// (0 for files such as those in /proc, which are read to their end).
    pub fn entry(&self) -> &FsEntry {
        &self.entry
    }

    /// The next piece of the file, or `None` at its end. A transfer that
    /// breaks off is an error, never a short file.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, ClientError> {
        if self.finished {
            return Ok(None);
        }
        if self.left_in_chunk == 0 {
            let mut header = [0u8; 4];
            self.stream.read_exact(&mut header).await.map_err(lost)?;
            let len = u32::from_le_bytes(header);
            if len == 0 {
                self.finished = true;
                done(&mut self.stream).await?;
                return Ok(None);
            }
            if len > TRANSFER_MAX_CHUNK {
                return Err(ClientError::Agent(format!(
                    "a chunk of {len} bytes is over the limit"
                )));
            }
            self.left_in_chunk = len as usize;
        }
        let want = self.left_in_chunk.min(READ_PIECE);
        let mut buf = BytesMut::with_capacity(want);
        let n = (&mut self.stream)
            .take(want as u64)
            .read_buf(&mut buf)
            .await
            .map_err(lost)?;
        if n == 0 {
            return Err(ClientError::Closed(
                "the agent ended the download early (the file changed, or a read failed)".into(),
            ));
        }
        self.left_in_chunk -= n;
        Ok(Some(buf.freeze()))
    }
}

/// A regular file going into the sandbox on its own connection.
#[derive(Debug)]
pub struct TransferUpload<S> {
    stream: S,
}

/// Start uploading to `path` on `stream`, a fresh connection to the agent.
pub async fn transfer_write<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    path: &str,
    mode: Option<u32>,
) -> Result<TransferUpload<S>, ClientError> {
    let op = FsOp::Write {
        path: path.into(),
        mode,
    };
    start(&mut stream, op).await?;
    Ok(TransferUpload { stream })
}

impl<S: AsyncRead + AsyncWrite + Unpin> TransferUpload<S> {
    /// Send `data`. When the agent has given up (a full disk), the error
    /// is the agent's own.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(TRANSFER_MAX_CHUNK as usize) {
            let header = (chunk.len() as u32).to_le_bytes();
            let sent = async {
                self.stream.write_all(&header).await?;
                self.stream.write_all(chunk).await
            }
            .await;
            if let Err(err) = sent {
                return Err(self.why(err).await);
            }
        }
        Ok(())
    }

    /// The write failed: the agent closed the connection, normally after
    /// saying why.
    async fn why(&mut self, err: std::io::Error) -> ClientError {
        let answer =
            tokio::time::timeout(std::time::Duration::from_secs(5), done(&mut self.stream)).await;
        match answer {
            Ok(Err(ClientError::Fs(fs))) => ClientError::Fs(fs),
            _ => lost(err),
        }
    }

    /// Commit: the agent renames the file into place and describes it.
    pub async fn finish(mut self) -> Result<FsEntry, ClientError> {
        if let Err(err) = self.stream.write_all(&0u32.to_le_bytes()).await {
            return Err(self.why(err).await);
        }
        self.stream.flush().await.map_err(lost)?;
        match done(&mut self.stream).await? {
            FsDone::Entry(entry) => Ok(entry),
            other => Err(ClientError::Agent(format!(
                "unexpected answer from the agent: {other:?}"
            ))),
        }
    }
}
