//! Transfer connections: one bulk file upload or download per connection,
//! its bytes raw instead of framed (see [`cove_protocol::fs::TRANSFER_CLIENT`]).
//!
//! The multiplexed protocol copies every chunk through several buffers on
//! both sides; here the agent moves bytes between the socket and the file
//! with `splice` and `sendfile`, so the kernel copies them once each way
//! and the socket's buffers are the flow control. The connection belongs
//! to one thread from its `Hello` on; the event loop only recognizes it.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use cove_protocol::fs::{
    FsDone, FsError, FsErrorKind, FsOp, FsReply, FsRequest, TRANSFER_CLIENT, TRANSFER_MAX_CHUNK,
};
use cove_protocol::{
    AgentHello, AgentMessage, HostMessage, MAX_FRAME_LEN, PROTOCOL_VERSION, decode_frame,
    encode_frame,
};
use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, SpliceFFlags};

use super::ops::{self, PreparedWrite};
use super::path::{Root, invalid, io_error};

/// Transfers running at once; more wait for none, they are refused.
const MAX_TRANSFERS: usize = 64;
static RUNNING: AtomicUsize = AtomicUsize::new(0);

/// Bytes moved per `splice`/`sendfile` call, and the pipe's size.
const PIPE_SIZE: usize = 1 << 20;

/// Socket buffer size asked for on transfer connections.
const SOCKET_BUFFER: usize = 4 << 20;

/// What a transfer thread needs from the agent.
#[derive(Debug, Clone)]
pub(crate) struct TransferEnv {
    pub(crate) root: Arc<Root>,
    pub(crate) root_path: PathBuf,
    pub(crate) user: Option<String>,
    pub(crate) hostname: String,
}

/// If `stream` opens with a transfer `Hello`, serve it on a thread of its
/// own and return `None`; otherwise give it back untouched (nothing has
/// been read from it: the `Hello` was only peeked at).
pub(crate) async fn take(
    env: Option<TransferEnv>,
    stream: tokio::net::UnixStream,
) -> Option<tokio::net::UnixStream> {
    let env = env?;
    let mut buf = [0u8; 512];
    let mut waited = Duration::ZERO;
    let peeked = loop {
        if stream.readable().await.is_err() {
            return Some(stream);
        }
        let peek = stream.try_io(tokio::io::Interest::READABLE, || {
            nix::sys::socket::recv(
                stream.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::MSG_PEEK,
            )
            .map_err(std::io::Error::from)
        });
        match peek {
            Ok(0) => return Some(stream),
            Ok(n) => match decode_frame::<HostMessage>(&buf[..n]) {
                Ok(Some((msg, _))) => break msg,
                // A Hello arrives in one write; wait briefly for the rest.
                Ok(None) if n < buf.len() && waited < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    waited += Duration::from_millis(2);
                }
                _ => return Some(stream),
            },
            Err(err) if err.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => return Some(stream),
        }
    };
    match peeked {
        HostMessage::Hello(hello) if hello.client == TRANSFER_CLIENT => {}
        _ => return Some(stream),
    }
    let std_stream = stream.into_std().ok()?;
    if std_stream.set_nonblocking(false).is_err() {
        return None;
    }
    let spawned = std::thread::Builder::new()
        .name("cove-fs-xfer".into())
        .spawn(move || serve(&env, std_stream));
    if let Err(err) = spawned {
        tracing::warn!(%err, "cannot start a thread for a file transfer");
    }
    None
}

fn send(stream: &mut UnixStream, msg: &AgentMessage) -> Result<(), FsError> {
    let frame = encode_frame(msg).map_err(|e| FsError::new(FsErrorKind::Io, e.to_string()))?;
    stream
        .write_all(&frame)
        .map_err(|e| FsError::new(FsErrorKind::Io, format!("the host went away: {e}")))
}

fn reply(stream: &mut UnixStream, req: u32, msg: FsReply) -> Result<(), FsError> {
    send(stream, &AgentMessage::Fs { req, msg })
}

fn read_frame(stream: &mut UnixStream) -> Result<HostMessage, FsError> {
    let lost =
        |e: std::io::Error| FsError::new(FsErrorKind::Io, format!("the host went away: {e}"));
    let mut frame = vec![0u8; 4];
    stream.read_exact(&mut frame).map_err(lost)?;
    let len = u32::from_le_bytes([frame[0], frame[1], frame[2], frame[3]]) as usize;
    if len > MAX_FRAME_LEN {
        return Err(invalid(format!("a frame of {len} bytes is over the limit")));
    }
    frame.resize(4 + len, 0);
    stream.read_exact(&mut frame[4..]).map_err(lost)?;
    match decode_frame::<HostMessage>(&frame) {
        Ok(Some((msg, _))) => Ok(msg),
        Ok(None) => Err(invalid("a truncated frame")),
        Err(e) => Err(invalid(format!("a malformed frame: {e}"))),
    }
}

/// Decrements the count of running transfers when a transfer ends.
struct Slot;

impl Drop for Slot {
    fn drop(&mut self) {
        RUNNING.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve(env: &TransferEnv, mut stream: UnixStream) {
    // More bytes in flight per wakeup of either side (bounded by the
    // host's net.core.wmem_max; the default still works).
    let _ =
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::SndBuf, &SOCKET_BUFFER);
    let _ =
        nix::sys::socket::setsockopt(&stream, nix::sys::socket::sockopt::RcvBuf, &SOCKET_BUFFER);
    let hello = match read_frame(&mut stream) {
        Ok(HostMessage::Hello(hello)) => hello,
        _ => return,
    };
    if hello.version != PROTOCOL_VERSION {
        let message = format!(
            "protocol version {} is not supported; this agent speaks version {PROTOCOL_VERSION}",
            hello.version
        );
        let _ = send(&mut stream, &AgentMessage::Error { pid: None, message });
        return;
    }
    let greeting = AgentMessage::Hello(AgentHello {
        version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").into(),
        hostname: env.hostname.clone(),
    });
    if send(&mut stream, &greeting).is_err() {
        return;
    }
    let (req, op) = match read_frame(&mut stream) {
        Ok(HostMessage::Fs {
            req,
            msg: FsRequest::Start(op),
        }) => (req, op),
        _ => return,
    };
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let _slot = Slot;
    if RUNNING.load(Ordering::SeqCst) > MAX_TRANSFERS {
        let busy = FsError::new(
            FsErrorKind::Busy,
            format!("{MAX_TRANSFERS} file transfers are already running in this sandbox"),
        );
        let _ = reply(&mut stream, req, FsReply::Done(Err(busy)));
        return;
    }
    match op {
        FsOp::Write { path, mode } => {
            let owner = super::owner(&env.root_path, env.user.as_deref());
            let prepared = match ops::prepare_write(&env.root, &path, mode, owner) {
                Ok(p) => p,
                Err(err) => {
                    let _ = reply(&mut stream, req, FsReply::Done(Err(err)));
                    return;
                }
            };
            if reply(&mut stream, req, FsReply::Ready { entry: None }).is_err() {
                return;
            }
            let result = receive(&mut stream, &prepared).and_then(|()| prepared.commit());
            // On an error the staged file is removed when `prepared` drops.
            let _ = reply(&mut stream, req, FsReply::Done(result.map(FsDone::Entry)));
        }
        FsOp::Read { path, .. } => {
            let (file, info) = match ops::open_read(&env.root, &path) {
                Ok(opened) => opened,
                Err(err) => {
                    let _ = reply(&mut stream, req, FsReply::Done(Err(err)));
                    return;
                }
            };
            if reply(
                &mut stream,
                req,
                FsReply::Ready {
                    entry: Some(info.clone()),
                },
            )
            .is_err()
            {
                return;
            }
            // An error after `Ready` cannot be reported in band: the
            // connection is closed before the end marker, which the host
            // sees as a broken transfer.
            if let Ok(bytes) = deliver(&mut stream, file, &info) {
                let done = FsDone::Transferred { bytes, entries: 1 };
                let _ = reply(&mut stream, req, FsReply::Done(Ok(done)));
            }
        }
        _ => {
            let err = invalid("a transfer connection carries only a file read or write");
            let _ = reply(&mut stream, req, FsReply::Done(Err(err)));
        }
    }
}

fn aborted() -> FsError {
    FsError::new(
        FsErrorKind::Io,
        "the upload broke off before its end; nothing was written",
    )
}

fn pipe() -> Result<(OwnedFd, OwnedFd), FsError> {
    let (r, w) = nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| FsError::new(FsErrorKind::Io, format!("pipe: {e}")))?;
    // A larger pipe means fewer splices; the default size works too.
    let _ = nix::fcntl::fcntl(&w, FcntlArg::F_SETPIPE_SZ(PIPE_SIZE as i32));
    Ok((r, w))
}

/// Receive the upload's chunks into the staged file.
fn receive(stream: &mut UnixStream, prepared: &PreparedWrite) -> Result<(), FsError> {
    let file = &prepared.staged.file;
    let shown_path = prepared.shown_path();
    let (pipe_r, pipe_w) = pipe()?;
    let mut spliced = true;
    let mut buf = Vec::new();
    loop {
        let mut header = [0u8; 4];
        stream.read_exact(&mut header).map_err(|_| aborted())?;
        let len = u32::from_le_bytes(header);
        if len == 0 {
            return Ok(());
        }
        if len > TRANSFER_MAX_CHUNK {
            return Err(invalid(format!(
                "an upload chunk of {len} bytes is over the limit"
            )));
        }
        let mut left = len as usize;
        while left > 0 {
            if spliced {
                let n = match nix::fcntl::splice(
                    stream.as_fd(),
                    None,
                    pipe_w.as_fd(),
                    None,
                    left.min(PIPE_SIZE),
                    SpliceFFlags::SPLICE_F_MOVE,
                ) {
                    Ok(0) => return Err(aborted()),
                    Ok(n) => n,
                    Err(Errno::EINTR) => continue,
                    // No splice for this socket or file: copy instead.
                    Err(Errno::EINVAL) => {
                        spliced = false;
                        continue;
                    }
                    Err(e) => return Err(FsError::new(FsErrorKind::Io, format!("receiving: {e}"))),
                };
                let mut in_pipe = n;
                while in_pipe > 0 {
                    match nix::fcntl::splice(
                        pipe_r.as_fd(),
                        None,
                        file.as_fd(),
                        None,
                        in_pipe,
                        SpliceFFlags::SPLICE_F_MOVE,
                    ) {
                        Ok(0) => {
                            return Err(FsError::new(FsErrorKind::Io, "the file took no data"));
                        }
                        Ok(k) => in_pipe -= k,
                        Err(Errno::EINTR) => {}
                        Err(Errno::EINVAL) => {
                            // The file system cannot splice: drain the pipe by hand.
                            let mut rest = vec![0u8; in_pipe];
                            let mut from_pipe = std::fs::File::from(
                                pipe_r.try_clone().map_err(|e| io_error(&e, shown_path))?,
                            );
                            from_pipe
                                .read_exact(&mut rest)
                                .map_err(|e| io_error(&e, shown_path))?;
                            (&*file)
                                .write_all(&rest)
                                .map_err(|e| io_error(&e, shown_path))?;
                            in_pipe = 0;
                            spliced = false;
                        }
                        Err(e) => return Err(super::path::errno_error(e, shown_path)),
                    }
                }
                left -= n;
            } else {
                buf.resize(left.min(PIPE_SIZE), 0);
                let n = match stream.read(&mut buf) {
                    Ok(0) => return Err(aborted()),
                    Ok(n) => n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return Err(aborted()),
                };
                (&*file)
                    .write_all(&buf[..n])
                    .map_err(|e| io_error(&e, shown_path))?;
                left -= n;
            }
        }
    }
}

/// Send the file as chunks, then the end marker; returns the bytes sent.
fn deliver(
    stream: &mut UnixStream,
    mut file: std::fs::File,
    info: &cove_protocol::fs::FsEntry,
) -> Result<u64, FsError> {
    let io = |e: std::io::Error| io_error(&e, &info.path);
    let mut sent = 0u64;
    if info.size == 0 {
        // Files in /proc and the like: no size, read until their end.
        let mut buf = vec![0u8; PIPE_SIZE];
        loop {
            let n = match file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io(e)),
            };
            stream.write_all(&(n as u32).to_le_bytes()).map_err(io)?;
            stream.write_all(&buf[..n]).map_err(io)?;
            sent += n as u64;
        }
    } else {
        let mut copy_buf = Vec::new();
        while sent < info.size {
            let chunk = (info.size - sent).min(PIPE_SIZE as u64) as usize;
            stream
                .write_all(&(chunk as u32).to_le_bytes())
                .map_err(io)?;
            let mut left = chunk;
            while left > 0 {
                let n = if copy_buf.is_empty() {
                    match nix::sys::sendfile::sendfile(stream.as_fd(), file.as_fd(), None, left) {
                        Ok(n) => n,
                        Err(Errno::EINTR) => continue,
                        Err(Errno::EINVAL) | Err(Errno::ENOSYS) => {
                            copy_buf.resize(PIPE_SIZE, 0);
                            continue;
                        }
                        Err(e) => return Err(super::path::errno_error(e, &info.path)),
                    }
                } else {
                    let want = left.min(copy_buf.len());
                    let n = file.read(&mut copy_buf[..want]).map_err(io)?;
                    stream.write_all(&copy_buf[..n]).map_err(io)?;
                    n
                };
                if n == 0 {
                    return Err(ops::shrank(info, sent + (chunk - left) as u64));
                }
                left -= n;
            }
            sent += chunk as u64;
        }
    }
    stream.write_all(&0u32.to_le_bytes()).map_err(io)?;
    Ok(sent)
}
