//! The host side of the protocol: one [`AgentClient`] per connection, shared
//! by every task that starts or talks to processes in that sandbox.
//!
//! A reader task routes each incoming frame to the process it belongs to; a
//! writer task owns the socket's write half. Output reaches a [`Process`]
//! through an unbounded channel whose size is bounded by the credit window:
//! the agent never has more than `window` unacknowledged bytes in flight, and
//! [`Process::next_event`] hands credit back as the caller consumes output.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{
    AgentHello, AgentMessage, DecodeError, ExitStatus, FromAgent, Hello, HostCodec, HostMessage,
    MAX_CHUNK, PROTOCOL_VERSION, ProcessInfo, ProcessSpec, SpawnError, Stream,
};

mod chunks;
mod fs;
mod transfer;
pub use chunks::ChunkReader;
pub use fs::{FsDownload, FsUpload, FsWatch};
pub use transfer::{TransferDownload, TransferUpload, transfer_read, transfer_write};

/// Most stdin bytes a [`StdinWriter`] leaves unacknowledged.
const STDIN_IN_FLIGHT: u64 = 4 * MAX_CHUNK as u64;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("agent connection failed: {0}")]
    Decode(#[from] DecodeError),
    #[error("agent speaks protocol version {agent}, this build speaks {ours}")]
    VersionMismatch { agent: u32, ours: u32 },
    #[error("agent handshake failed: {0}")]
    Handshake(String),
    #[error("agent connection lost: {0}")]
    Closed(String),
    #[error("{0}")]
    Spawn(#[from] SpawnError),
    #[error("agent error: {0}")]
    Agent(String),
    /// A file operation failed in the sandbox.
    #[error("{0}")]
    Fs(#[from] crate::fs::FsError),
}

/// What a [`Process`] reports, in order. `Exited` is always last.
#[derive(Debug, Clone, PartialEq)]
pub enum ProcessEvent {
    Output {
        stream: Stream,
        offset: u64,
        data: Bytes,
    },
    /// Bytes `from..to` of `stream` were dropped from the replay buffer
    /// before this reader got them.
    Dropped {
        stream: Stream,
        from: u64,
        to: u64,
    },
    Exited(ExitStatus),
}

/// A connection to one agent. Cheap to clone; all clones share the connection.
#[derive(Debug, Clone)]
pub struct AgentClient {
    outbound: mpsc::Sender<HostMessage>,
    shared: Arc<Mutex<Routes>>,
    hello: Arc<AgentHello>,
}

type Events = mpsc::UnboundedSender<Result<ProcessEvent, ClientError>>;
type Acks = mpsc::UnboundedSender<Result<u64, ClientError>>;
type AttachWaiter = oneshot::Sender<Result<(ProcessRoute, ProcessInfo), ClientError>>;

#[derive(Debug, Default)]
struct Routes {
    next_req: u32,
    next_nonce: u64,
    pending: HashMap<u32, oneshot::Sender<Result<ProcessRoute, SpawnError>>>,
    attaching: HashMap<u32, AttachWaiter>,
    listing: HashMap<u32, oneshot::Sender<Vec<ProcessInfo>>>,
    procs: HashMap<u32, Events>,
    acks: HashMap<u32, Acks>,
    pongs: HashMap<u64, oneshot::Sender<()>>,
    closed: Option<String>,
    /// Open file operations, by request id.
    fs: fs::FsRoutes,
}

#[derive(Debug)]
struct ProcessRoute {
    pid: u32,
    events: mpsc::UnboundedReceiver<Result<ProcessEvent, ClientError>>,
}

impl Routes {
    fn next_req(&mut self) -> u32 {
        self.next_req = self.next_req.wrapping_add(1);
        self.next_req
    }

    fn open_route(&mut self, pid: u32) -> ProcessRoute {
        let (tx, events) = mpsc::unbounded_channel();
        self.procs.insert(pid, tx);
        ProcessRoute { pid, events }
    }
}

fn lock(routes: &Mutex<Routes>) -> std::sync::MutexGuard<'_, Routes> {
    routes.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AgentClient {
    /// Greet the agent on `stream` and start serving the connection.
    pub async fn connect<S>(stream: S, client: &str) -> Result<AgentClient, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (read, write) = tokio::io::split(stream);
        let mut reader = FramedRead::new(read, HostCodec);
        let mut writer = FramedWrite::new(write, HostCodec);
        writer
            .send(HostMessage::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: client.into(),
            }))
            .await?;
        let hello = match reader.next().await {
            Some(Ok(FromAgent::Message(AgentMessage::Hello(hello)))) => hello,
            Some(Ok(FromAgent::Message(AgentMessage::Error { message, .. }))) => {
                return Err(ClientError::Handshake(message));
            }
            Some(Ok(other)) => {
                return Err(ClientError::Handshake(format!(
                    "expected Hello, got {other:?}"
                )));
            }
            Some(Err(err)) => return Err(err.into()),
            None => return Err(ClientError::Handshake("agent closed the connection".into())),
        };
        if hello.version != PROTOCOL_VERSION {
            return Err(ClientError::VersionMismatch {
                agent: hello.version,
                ours: PROTOCOL_VERSION,
            });
        }

        let (outbound, mut rx) = mpsc::channel::<HostMessage>(256);
        let shared = Arc::new(Mutex::new(Routes::default()));
        tokio::spawn(async move {
            while let Some(msg) = rx.recv().await {
                if writer.feed(msg).await.is_err() {
                    return;
                }
                while let Ok(msg) = rx.try_recv() {
                    if writer.feed(msg).await.is_err() {
                        return;
                    }
                }
                if writer.flush().await.is_err() {
                    return;
                }
            }
        });
        let routes = shared.clone();
        tokio::spawn(async move {
            let reason = loop {
                match reader.next().await {
                    Some(Ok(msg)) => route(&routes, msg),
                    Some(Err(err)) => break err.to_string(),
                    None => break "agent closed the connection".to_string(),
                }
            };
            close_all(&routes, reason);
        });
        Ok(AgentClient {
            outbound,
            shared,
            hello: Arc::new(hello),
        })
    }

    /// The agent's greeting.
    pub fn hello(&self) -> &AgentHello {
        &self.hello
    }

    /// Why the connection closed, if it has.
    pub fn closed(&self) -> Option<String> {
        lock(&self.shared).closed.clone()
    }

    async fn send(&self, msg: HostMessage) -> Result<(), ClientError> {
        self.outbound.send(msg).await.map_err(|_| self.lost())
    }

    fn lost(&self) -> ClientError {
        ClientError::Closed(self.closed().unwrap_or_else(|| "connection closed".into()))
    }

    /// Start a process.
    pub async fn spawn(&self, spec: ProcessSpec) -> Result<Process, ClientError> {
        let window = spec.window;
        let wants_stdin = spec.stdin;
        let background = spec.background;
        // A detached process's output is read by attaching, not here.
        let detached = background && !spec.follow;
        let (tx, rx) = oneshot::channel();
        let req = {
            let mut routes = lock(&self.shared);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            let req = routes.next_req();
            routes.pending.insert(req, tx);
            req
        };
        self.send(HostMessage::Spawn { req, spec }).await?;
        let route = rx.await.map_err(|_| self.lost())??;
        let stdin = if wants_stdin {
            Some(self.stdin(route.pid))
        } else {
            None
        };
        if detached {
            lock(&self.shared).procs.remove(&route.pid);
        }
        Ok(Process {
            pid: route.pid,
            client: self.clone(),
            events: route.events,
            stdin,
            window,
            consumed: 0,
            finished: detached,
            owned: !background,
        })
    }

    /// Read a running (or recently finished) process's output from the
    /// given offsets of stdout and stderr. What is still in the agent's
    /// replay buffer comes first; bytes no longer there are reported as
    /// [`ProcessEvent::Dropped`].
    /// With `backpressure`, the process waits for this reader instead of
    /// dropping output the reader has not taken yet.
    pub async fn attach(
        &self,
        pid: u32,
        from: [u64; 2],
        window: u64,
        backpressure: bool,
    ) -> Result<(Process, ProcessInfo), ClientError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut routes = lock(&self.shared);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            routes.attaching.insert(pid, tx);
        }
        self.send(HostMessage::Attach {
            pid,
            stdout_from: from[0],
            stderr_from: from[1],
            window,
            backpressure,
        })
        .await?;
        let (route, info) = rx.await.map_err(|_| self.lost())??;
        let process = Process {
            pid: route.pid,
            client: self.clone(),
            events: route.events,
            stdin: None,
            window,
            consumed: 0,
            finished: false,
            owned: false,
        };
        Ok((process, info))
    }

    /// Every running and recently finished process in the sandbox.
    pub async fn list(&self) -> Result<Vec<ProcessInfo>, ClientError> {
        let (tx, rx) = oneshot::channel();
        let req = {
            let mut routes = lock(&self.shared);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            let req = routes.next_req();
            routes.listing.insert(req, tx);
            req
        };
        self.send(HostMessage::ListProcesses { req }).await?;
        rx.await.map_err(|_| self.lost())
    }

    /// A writer for a process's stdin (one at a time per process on this
    /// connection: a new one takes over the acknowledgements).
    pub fn stdin(&self, pid: u32) -> StdinWriter {
        let (tx, acks) = mpsc::unbounded_channel();
        lock(&self.shared).acks.insert(pid, tx);
        StdinWriter {
            pid,
            client: self.clone(),
            acks,
            in_flight: 0,
            closed: false,
        }
    }

    /// Close a process's stdin.
    pub async fn close_stdin(&self, pid: u32) -> Result<(), ClientError> {
        self.send(HostMessage::CloseStdin { pid }).await
    }

    /// Send a signal to a process (and its group when `group`).
    pub async fn signal(&self, pid: u32, signal: i32, group: bool) -> Result<(), ClientError> {
        self.send(HostMessage::Signal { pid, signal, group }).await
    }

    /// Kill a process and everything it started.
    pub async fn kill(&self, pid: u32) -> Result<(), ClientError> {
        self.send(HostMessage::Kill { pid }).await
    }

    /// Kill without waiting for room in the outgoing queue (for `Drop`).
    pub fn kill_now(&self, pid: u32) {
        let _ = self.outbound.try_send(HostMessage::Kill { pid });
    }

    /// Resize the terminal of a PTY process.
    pub async fn resize(&self, pid: u32, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.send(HostMessage::Resize { pid, rows, cols }).await
    }

    /// Round trip to the agent.
    pub async fn ping(&self) -> Result<(), ClientError> {
        let (tx, rx) = oneshot::channel();
        let nonce = {
            let mut routes = lock(&self.shared);
            routes.next_nonce += 1;
            let nonce = routes.next_nonce;
            routes.pongs.insert(nonce, tx);
            nonce
        };
        self.send(HostMessage::Ping { nonce }).await?;
        rx.await.map_err(|_| self.lost())
    }

    /// Run a process to completion, feeding it `stdin` and collecting its output.
    pub async fn output(
        &self,
        mut spec: ProcessSpec,
        stdin: Option<Vec<u8>>,
    ) -> Result<Output, ClientError> {
        spec.stdin = stdin.is_some();
        let mut process = self.spawn(spec).await?;
        if let (Some(data), Some(mut writer)) = (stdin, process.take_stdin()) {
            // Feed stdin concurrently so a process that writes before it
            // reads cannot deadlock against us.
            tokio::spawn(async move {
                let _ = writer.write_all(&data).await;
                let _ = writer.close().await;
            });
        }
        process.collect().await
    }
}

/// Everything a finished process produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn route(routes: &Mutex<Routes>, msg: FromAgent) {
    let mut routes = lock(routes);
    let (pid, stream, offset, data) = match msg {
        FromAgent::Output {
            pid,
            stream,
            offset,
            data,
        } => (pid, stream, offset, data),
        // (`HostCodec` never leaves output in a message; a copy would do.)
        FromAgent::Message(AgentMessage::Output {
            pid,
            stream,
            offset,
            data,
        }) => (pid, stream, offset, Bytes::from(data)),
        FromAgent::Message(msg) => return route_message(&mut routes, msg),
    };
    if let Some(events) = routes.procs.get(&pid) {
        let _ = events.send(Ok(ProcessEvent::Output {
            stream,
            offset,
            data,
        }));
    }
}

/// Every agent message but output.
fn route_message(routes: &mut Routes, msg: AgentMessage) {
    match msg {
        AgentMessage::Spawned { req, pid } => {
            if let Some(waiter) = routes.pending.remove(&req) {
                let route = routes.open_route(pid);
                let _ = waiter.send(Ok(route));
            }
        }
        AgentMessage::SpawnFailed { req, error } => {
            if let Some(waiter) = routes.pending.remove(&req) {
                let _ = waiter.send(Err(error));
            }
        }
        AgentMessage::Attached { pid, info } => {
            if let Some(waiter) = routes.attaching.remove(&pid) {
                let route = routes.open_route(pid);
                let _ = waiter.send(Ok((route, info)));
            }
        }
        // Routed by `route`.
        AgentMessage::Output { .. } => {}
        AgentMessage::Dropped {
            pid,
            stream,
            from,
            to,
        } => {
            if let Some(events) = routes.procs.get(&pid) {
                let _ = events.send(Ok(ProcessEvent::Dropped { stream, from, to }));
            }
        }
        AgentMessage::StdinAck { pid, bytes, error } => {
            if let Some(acks) = routes.acks.get(&pid) {
                let ack = match error {
                    Some(err) => Err(ClientError::Agent(err)),
                    None => Ok(bytes),
                };
                let _ = acks.send(ack);
            }
        }
        AgentMessage::Exited { pid, status } => {
            if let Some(events) = routes.procs.remove(&pid) {
                let _ = events.send(Ok(ProcessEvent::Exited(status)));
            }
        }
        AgentMessage::Processes { req, list } => {
            if let Some(waiter) = routes.listing.remove(&req) {
                let _ = waiter.send(list);
            }
        }
        AgentMessage::Error {
            pid: Some(pid),
            message,
        } => {
            if let Some(waiter) = routes.attaching.remove(&pid) {
                let _ = waiter.send(Err(ClientError::Agent(message)));
            } else if let Some(acks) = routes.acks.get(&pid) {
                let _ = acks.send(Err(ClientError::Agent(message)));
            } else {
                tracing::debug!(pid, %message, "agent error about a process nobody waits for");
            }
        }
        AgentMessage::Error { pid: None, message } => {
            tracing::warn!(%message, "agent reported a connection error");
        }
        AgentMessage::Pong { nonce } => {
            if let Some(waiter) = routes.pongs.remove(&nonce) {
                let _ = waiter.send(());
            }
        }
        AgentMessage::Hello(_) => {}
        AgentMessage::Fs { req, msg } => routes.fs.route(req, msg),
    }
}

fn close_all(routes: &Mutex<Routes>, reason: String) {
    let mut routes = lock(routes);
    for (_, events) in routes.procs.drain() {
        let _ = events.send(Err(ClientError::Closed(reason.clone())));
    }
    for (_, acks) in routes.acks.drain() {
        let _ = acks.send(Err(ClientError::Closed(reason.clone())));
    }
    for (_, waiter) in routes.attaching.drain() {
        let _ = waiter.send(Err(ClientError::Closed(reason.clone())));
    }
    routes.pending.clear();
    routes.listing.clear();
    routes.pongs.clear();
    routes.fs.clear();
    routes.closed = Some(reason);
}

/// A running process in the sandbox.
#[derive(Debug)]
pub struct Process {
    pid: u32,
    client: AgentClient,
    events: mpsc::UnboundedReceiver<Result<ProcessEvent, ClientError>>,
    stdin: Option<StdinWriter>,
    window: u64,
    consumed: u64,
    /// Exited was seen (or nothing will ever be read: background spawn).
    finished: bool,
    /// This connection spawned it in the foreground: it dies unobserved.
    owned: bool,
}

impl Process {
    /// The process ID inside the sandbox.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The stdin writer, when the process was spawned with `stdin: true`.
    pub fn take_stdin(&mut self) -> Option<StdinWriter> {
        self.stdin.take()
    }

    /// The next output chunk or the exit. Consuming output returns credit to
    /// the agent so it keeps sending.
    pub async fn next_event(&mut self) -> Result<ProcessEvent, ClientError> {
        if self.finished {
            return Err(ClientError::Agent(format!(
                "nothing more to read from process {}",
                self.pid
            )));
        }
        let event = match self.events.recv().await {
            Some(event) => event?,
            None => return Err(self.client.lost()),
        };
        self.consume(event).await
    }

    /// The next event if one has already arrived, without waiting.
    pub async fn try_next_event(&mut self) -> Option<Result<ProcessEvent, ClientError>> {
        if self.finished {
            return None;
        }
        match self.events.try_recv() {
            Ok(Ok(event)) => Some(self.consume(event).await),
            Ok(Err(err)) => Some(Err(err)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(Err(self.client.lost())),
        }
    }

    /// Account for an event handed out: the exit, or output to credit.
    async fn consume(&mut self, event: ProcessEvent) -> Result<ProcessEvent, ClientError> {
        if matches!(event, ProcessEvent::Exited(_)) {
            self.finished = true;
        }
        if let ProcessEvent::Output { data, .. } = &event {
            self.consumed += data.len() as u64;
            if self.consumed >= self.window / 2 {
                let bytes = std::mem::take(&mut self.consumed);
                self.client
                    .send(HostMessage::Credit {
                        pid: self.pid,
                        bytes,
                    })
                    .await?;
            }
        }
        Ok(event)
    }

    /// Read everything up to the exit. Bytes the replay buffer dropped
    /// before they were read mark their stream as truncated.
    pub async fn collect(&mut self) -> Result<Output, ClientError> {
        self.collect_capped(u64::MAX).await
    }

    /// Read up to the exit, keeping at most `cap` bytes of each stream (the
    /// rest is read and discarded, and marks the stream as truncated).
    pub async fn collect_capped(&mut self, cap: u64) -> Result<Output, ClientError> {
        let mut out = Output::default();
        let (mut dropped_out, mut dropped_err) = (false, false);
        let keep = |buf: &mut Vec<u8>, data: &[u8], cut: &mut bool| {
            let room = (cap.saturating_sub(buf.len() as u64)).min(data.len() as u64) as usize;
            buf.extend_from_slice(&data[..room]);
            *cut |= room < data.len();
        };
        loop {
            match self.next_event().await? {
                ProcessEvent::Output {
                    stream: Stream::Stdout,
                    data,
                    ..
                } => keep(&mut out.stdout, &data, &mut dropped_out),
                ProcessEvent::Output {
                    stream: Stream::Stderr,
                    data,
                    ..
                } => keep(&mut out.stderr, &data, &mut dropped_err),
                ProcessEvent::Dropped {
                    stream: Stream::Stdout,
                    ..
                } => dropped_out = true,
                ProcessEvent::Dropped {
                    stream: Stream::Stderr,
                    ..
                } => dropped_err = true,
                ProcessEvent::Exited(status) => {
                    out.status = status;
                    out.status.stdout_truncated |= dropped_out;
                    out.status.stderr_truncated |= dropped_err;
                    return Ok(out);
                }
            }
        }
    }

    /// Send a signal to the process (and its process group when `group`).
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), ClientError> {
        self.client.signal(self.pid, signal, group).await
    }

    /// Resize the process's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client.resize(self.pid, rows, cols).await
    }
}

/// Dropping an unfinished foreground process kills it and everything it
/// started (nobody could read its result any more); dropping a reader of
/// an attached process only stops the reading.
impl Drop for Process {
    fn drop(&mut self) {
        if !self.finished {
            lock(&self.client.shared).procs.remove(&self.pid);
            let msg = if self.owned {
                HostMessage::Kill { pid: self.pid }
            } else {
                HostMessage::Detach { pid: self.pid }
            };
            let _ = self.client.outbound.try_send(msg);
        }
    }
}

/// Writes a process's stdin with bounded bytes in flight.
#[derive(Debug)]
pub struct StdinWriter {
    pid: u32,
    client: AgentClient,
    acks: mpsc::UnboundedReceiver<Result<u64, ClientError>>,
    in_flight: u64,
    closed: bool,
}

impl StdinWriter {
    /// Write all of `data`, waiting for the agent whenever too much is unacknowledged.
    pub async fn write_all(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_CHUNK) {
            while self.in_flight + chunk.len() as u64 > STDIN_IN_FLIGHT {
                self.wait_ack().await?;
            }
            self.in_flight += chunk.len() as u64;
            self.client
                .send(HostMessage::Stdin {
                    pid: self.pid,
                    data: chunk.to_vec(),
                })
                .await?;
        }
        Ok(())
    }

    /// Wait until every byte written so far has reached the process.
    pub async fn flush(&mut self) -> Result<(), ClientError> {
        while self.in_flight > 0 {
            self.wait_ack().await?;
        }
        Ok(())
    }

    async fn wait_ack(&mut self) -> Result<(), ClientError> {
        match self.acks.recv().await {
            Some(Ok(bytes)) => {
                self.in_flight = self.in_flight.saturating_sub(bytes);
                Ok(())
            }
            Some(Err(err)) => Err(err),
            None => Err(self.client.lost()),
        }
    }

    /// Close the process's stdin.
    pub async fn close(mut self) -> Result<(), ClientError> {
        self.closed = true;
        self.client
            .send(HostMessage::CloseStdin { pid: self.pid })
            .await
    }
}

impl StdinWriter {
    /// Stop writing without closing the process's stdin (it stays open for
    /// a later writer).
    pub fn release(mut self) {
        self.closed = true;
    }
}

impl Drop for StdinWriter {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self
                .client
                .outbound
                .try_send(HostMessage::CloseStdin { pid: self.pid });
        }
    }
}
