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

use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::{FramedRead, FramedWrite};

use crate::{
    AgentHello, AgentMessage, DecodeError, ExitStatus, FrameCodec, Hello, HostMessage, MAX_CHUNK,
    PROTOCOL_VERSION, ProcessSpec, SpawnError, Stream,
};

mod fs;
mod transfer;
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
        data: Vec<u8>,
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

#[derive(Debug, Default)]
struct Routes {
    next_req: u32,
    next_nonce: u64,
    pending: HashMap<u32, oneshot::Sender<Result<ProcessRoute, SpawnError>>>,
    procs: HashMap<u32, RouteTx>,
    pongs: HashMap<u64, oneshot::Sender<()>>,
    closed: Option<String>,
    /// Open file operations, by request id.
    fs: fs::FsRoutes,
}

#[derive(Debug)]
struct RouteTx {
    events: mpsc::UnboundedSender<Result<ProcessEvent, ClientError>>,
    acks: mpsc::UnboundedSender<Result<u64, ClientError>>,
}

#[derive(Debug)]
struct ProcessRoute {
    pid: u32,
    events: mpsc::UnboundedReceiver<Result<ProcessEvent, ClientError>>,
    acks: mpsc::UnboundedReceiver<Result<u64, ClientError>>,
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
        let mut reader = FramedRead::new(read, FrameCodec::<AgentMessage, HostMessage>::new());
        let mut writer = FramedWrite::new(write, FrameCodec::<AgentMessage, HostMessage>::new());
        writer
            .send(HostMessage::Hello(Hello {
                version: PROTOCOL_VERSION,
                client: client.into(),
            }))
            .await?;
        let hello = match reader.next().await {
            Some(Ok(AgentMessage::Hello(hello))) => hello,
            Some(Ok(AgentMessage::Error { message, .. })) => {
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
        let (tx, rx) = oneshot::channel();
        let req = {
            let mut routes = lock(&self.shared);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            routes.next_req = routes.next_req.wrapping_add(1);
            let req = routes.next_req;
            routes.pending.insert(req, tx);
            req
        };
        self.send(HostMessage::Spawn { req, spec }).await?;
        let route = rx.await.map_err(|_| self.lost())??;
        let stdin = wants_stdin.then(|| StdinWriter {
            pid: route.pid,
            client: self.clone(),
            acks: route.acks,
            in_flight: 0,
            closed: false,
        });
        Ok(Process {
            pid: route.pid,
            client: self.clone(),
            events: route.events,
            stdin,
            window,
            consumed: 0,
        })
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
        let mut out = Output::default();
        loop {
            match process.next_event().await? {
                ProcessEvent::Output {
                    stream: Stream::Stdout,
                    data,
                    ..
                } => out.stdout.extend_from_slice(&data),
                ProcessEvent::Output {
                    stream: Stream::Stderr,
                    data,
                    ..
                } => out.stderr.extend_from_slice(&data),
                ProcessEvent::Exited(status) => {
                    out.status = status;
                    return Ok(out);
                }
            }
        }
    }
}

/// Everything a finished process produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

fn route(routes: &Mutex<Routes>, msg: AgentMessage) {
    let mut routes = lock(routes);
    match msg {
        AgentMessage::Spawned { req, pid } => {
            let (events_tx, events) = mpsc::unbounded_channel();
            let (acks_tx, acks) = mpsc::unbounded_channel();
            if let Some(waiter) = routes.pending.remove(&req) {
                routes.procs.insert(
                    pid,
                    RouteTx {
                        events: events_tx,
                        acks: acks_tx,
                    },
                );
                let _ = waiter.send(Ok(ProcessRoute { pid, events, acks }));
            }
        }
        AgentMessage::SpawnFailed { req, error } => {
            if let Some(waiter) = routes.pending.remove(&req) {
                let _ = waiter.send(Err(error));
            }
        }
        AgentMessage::Output {
            pid,
            stream,
            offset,
            data,
        } => {
            if let Some(proc) = routes.procs.get(&pid) {
                let _ = proc.events.send(Ok(ProcessEvent::Output {
                    stream,
                    offset,
                    data,
                }));
            }
        }
        AgentMessage::StdinAck { pid, bytes, error } => {
            if let Some(proc) = routes.procs.get(&pid) {
                let ack = match error {
                    Some(err) => Err(ClientError::Agent(err)),
                    None => Ok(bytes),
                };
                let _ = proc.acks.send(ack);
            }
        }
        AgentMessage::Exited { pid, status } => {
            if let Some(proc) = routes.procs.remove(&pid) {
                let _ = proc.events.send(Ok(ProcessEvent::Exited(status)));
                let _ = proc
                    .acks
                    .send(Err(ClientError::Agent("the process has exited".into())));
            }
        }
        AgentMessage::Error {
            pid: Some(pid),
            message,
        } => {
            if let Some(proc) = routes.procs.get(&pid) {
                let _ = proc.acks.send(Err(ClientError::Agent(message)));
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
    for (_, proc) in routes.procs.drain() {
        let _ = proc.events.send(Err(ClientError::Closed(reason.clone())));
        let _ = proc.acks.send(Err(ClientError::Closed(reason.clone())));
    }
    routes.pending.clear();
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
        let event = match self.events.recv().await {
            Some(event) => event?,
            None => return Err(self.client.lost()),
        };
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

    /// Send a signal to the process (and its process group when `group`).
    pub async fn signal(&self, signal: i32, group: bool) -> Result<(), ClientError> {
        self.client.signal(self.pid, signal, group).await
    }

    /// Resize the process's terminal.
    pub async fn resize(&self, rows: u16, cols: u16) -> Result<(), ClientError> {
        self.client.resize(self.pid, rows, cols).await
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
