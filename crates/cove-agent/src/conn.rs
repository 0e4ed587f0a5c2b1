//! A connection's outgoing side: messages queue in order on a channel, and
//! one writer task turns them into frames. Process output is not copied
//! into an encoded message: its frame is a small head followed by the
//! pieces of the output log as they lie, written with one vectored write.

use std::collections::VecDeque;
use std::io::IoSlice;

use bytes::{Buf, Bytes, BytesMut};
use cove_protocol::{AgentMessage, Stream, encode_frame_into, output_frame_head};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

/// Messages queued on one connection before senders wait.
const QUEUED: usize = 64;

/// Bytes gathered from the queue before they are written (more messages
/// are not waited for: what is queued when the writer wakes goes at once).
const WRITE_BATCH: usize = 1 << 20;

/// Most pieces handed to one `writev`.
const MAX_PIECES: usize = 64;

/// What a connection's writer sends.
#[derive(Debug)]
enum Outgoing {
    Message(AgentMessage),
    /// An `AgentMessage::Output` whose bytes are `parts`, in order.
    Output {
        pid: u32,
        stream: Stream,
        offset: u64,
        parts: Vec<Bytes>,
    },
}

/// The writer task is gone: the connection is closed.
#[derive(Debug)]
pub(crate) struct Closed;

/// The sending side of one connection. Clones send into the same queue;
/// [`ConnTx::same_channel`] tells connections apart.
#[derive(Debug, Clone)]
pub(crate) struct ConnTx(mpsc::Sender<Outgoing>);

impl ConnTx {
    pub(crate) async fn send(&self, msg: AgentMessage) -> Result<(), Closed> {
        self.0
            .send(Outgoing::Message(msg))
            .await
            .map_err(|_| Closed)
    }

    /// Send from a thread outside the agent's runtime.
    pub(crate) fn blocking_send(&self, msg: AgentMessage) -> Result<(), Closed> {
        self.0
            .blocking_send(Outgoing::Message(msg))
            .map_err(|_| Closed)
    }

    /// Send output held in `parts` (which together are at most
    /// `MAX_OUTPUT_CHUNK` bytes) without copying it.
    pub(crate) async fn send_output(
        &self,
        pid: u32,
        stream: Stream,
        offset: u64,
        parts: Vec<Bytes>,
    ) -> Result<(), Closed> {
        let output = Outgoing::Output {
            pid,
            stream,
            offset,
            parts,
        };
        self.0.send(output).await.map_err(|_| Closed)
    }

    pub(crate) fn same_channel(&self, other: &ConnTx) -> bool {
        self.0.same_channel(&other.0)
    }
}

/// A queue whose messages a test reads itself.
#[cfg(test)]
pub(crate) fn test_channel(capacity: usize) -> (ConnTx, TestRx) {
    let (tx, rx) = mpsc::channel(capacity);
    (ConnTx(tx), TestRx(rx))
}

/// The reading end of [`test_channel`]: output comes as the message the
/// host would decode.
#[cfg(test)]
pub(crate) struct TestRx(mpsc::Receiver<Outgoing>);

#[cfg(test)]
impl TestRx {
    pub(crate) fn blocking_recv(&mut self) -> Option<AgentMessage> {
        self.0.blocking_recv().map(|out| match out {
            Outgoing::Message(msg) => msg,
            Outgoing::Output {
                pid,
                stream,
                offset,
                parts,
            } => AgentMessage::Output {
                pid,
                stream,
                offset,
                data: parts.concat(),
            },
        })
    }
}

/// A connection's queue and the writer that drains it into `write`; the
/// writer ends when every [`ConnTx`] is dropped or the peer stops reading.
pub(crate) fn channel<W>(write: W) -> (ConnTx, impl Future<Output = ()>)
where
    W: AsyncWrite + Unpin,
{
    let (tx, rx) = mpsc::channel(QUEUED);
    (ConnTx(tx), write_frames(write, rx))
}

async fn write_frames<W: AsyncWrite + Unpin>(mut write: W, mut rx: mpsc::Receiver<Outgoing>) {
    // Small messages are encoded here, between the pieces of output.
    let mut encoded = BytesMut::new();
    let mut pieces = VecDeque::<Bytes>::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        let mut queued = 0;
        while let Some(out) = next.take() {
            match out {
                Outgoing::Message(msg) => {
                    let before = encoded.len();
                    if let Err(err) = encode_frame_into(&msg, &mut encoded) {
                        tracing::warn!(%err, "cannot encode a message; closing the connection");
                        return;
                    }
                    queued += encoded.len() - before;
                }
                Outgoing::Output {
                    pid,
                    stream,
                    offset,
                    parts,
                } => {
                    let len = parts.iter().map(Bytes::len).sum();
                    match output_frame_head(pid, stream, offset, len) {
                        Ok(head) => encoded.extend_from_slice(&head),
                        Err(err) => {
                            tracing::warn!(%err, "cannot frame output; closing the connection");
                            return;
                        }
                    }
                    pieces.push_back(encoded.split().freeze());
                    pieces.extend(parts.into_iter().filter(|p| !p.is_empty()));
                    queued += len;
                }
            }
            if queued < WRITE_BATCH {
                next = rx.try_recv().ok();
            }
        }
        if !encoded.is_empty() {
            pieces.push_back(encoded.split().freeze());
        }
        if write_pieces(&mut write, &mut pieces).await.is_err() || write.flush().await.is_err() {
            return;
        }
    }
}

/// Write every piece, in order, in as few calls as the writer allows.
async fn write_pieces<W: AsyncWrite + Unpin>(
    write: &mut W,
    pieces: &mut VecDeque<Bytes>,
) -> std::io::Result<()> {
    while !pieces.is_empty() {
        let slices: Vec<IoSlice<'_>> = pieces
            .iter()
            .take(MAX_PIECES)
            .map(|p| IoSlice::new(p))
            .collect();
        let mut written = write.write_vectored(&slices).await?;
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        while written > 0 {
            let Some(front) = pieces.front_mut() else {
                break;
            };
            if written >= front.len() {
                written -= front.len();
                pieces.pop_front();
            } else {
                front.advance(written);
                written = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use cove_protocol::{DecodeError, decode_frame};

    /// A writer that takes at most `step` bytes per call, as a full socket
    /// buffer would.
    struct Trickle {
        out: Vec<u8>,
        step: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            let n = buf.len().min(self.step);
            self.out.extend_from_slice(&buf[..n]);
            std::task::Poll::Ready(Ok(n))
        }

        fn poll_flush(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn poll_shutdown(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::task::Poll::Ready(Ok(()))
        }
    }

    fn decode_all(mut bytes: &[u8]) -> Result<Vec<AgentMessage>, DecodeError> {
        let mut messages = Vec::new();
        while let Some((msg, used)) = decode_frame::<AgentMessage>(bytes)? {
            messages.push(msg);
            bytes = &bytes[used..];
        }
        assert!(bytes.is_empty(), "{} bytes left over", bytes.len());
        Ok(messages)
    }

    #[tokio::test]
    async fn output_in_pieces_and_messages_arrive_as_frames_in_order() {
        for step in [1, 7, 4096, usize::MAX] {
            let (tx, rx) = mpsc::channel(QUEUED);
            let tx = ConnTx(tx);
            let data: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
            let parts = vec![
                Bytes::copy_from_slice(&data[..5]),
                Bytes::new(),
                Bytes::copy_from_slice(&data[5..150_000]),
                Bytes::copy_from_slice(&data[150_000..]),
            ];
            tx.send(AgentMessage::Pong { nonce: 1 }).await.unwrap();
            tx.send_output(9, Stream::Stderr, 42, parts).await.unwrap();
            tx.send(AgentMessage::Pong { nonce: 2 }).await.unwrap();
            drop(tx);
            let mut sink = Trickle {
                out: Vec::new(),
                step,
            };
            write_frames(&mut sink, rx).await;
            let got = decode_all(&sink.out).unwrap();
            let want = vec![
                AgentMessage::Pong { nonce: 1 },
                AgentMessage::Output {
                    pid: 9,
                    stream: Stream::Stderr,
                    offset: 42,
                    data: data.clone(),
                },
                AgentMessage::Pong { nonce: 2 },
            ];
            assert_eq!(got, want, "writes of at most {step} bytes");
        }
    }
}
