//! `cove-agent`: the supervisor that runs as PID 1 inside a sandbox.
//!
//! It serves the [`cove_protocol`] on one or more connections (a socketpair
//! from `cove run`, a listening unix socket for the daemon, vsock in a
//! microVM), starts processes, moves their stdio, enforces timeouts by
//! killing whole process trees, and reaps every zombie in the sandbox.
//!
//! The agent is single-threaded (a current-thread tokio runtime with a
//! `LocalSet`), which keeps its state in plain `Rc`/`RefCell` and makes
//! `fork` safe. Processes belong to the agent, not to a connection: when a
//! connection drops, its processes keep running and their output is drained
//! so they never block on a full pipe.

mod cgroup;
mod fdio;
mod files;
mod process;
pub mod spawn;
pub mod users;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;

use cove_protocol::{AgentHello, AgentMessage, FrameCodec, HostMessage, PROTOCOL_VERSION};
use futures::{SinkExt, StreamExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{Notify, mpsc};
use tokio_util::codec::{FramedRead, FramedWrite};

pub use cgroup::{CgroupKind, ProcessCgroups};
use process::Proc;

/// How the agent was set up by the backend that started it.
#[derive(Debug)]
pub struct AgentConfig {
    /// The sandbox's hostname (its ID).
    pub hostname: String,
    /// The sandbox's environment, under every process's own.
    pub env: Vec<(String, String)>,
    /// Default working directory.
    pub cwd: String,
    /// Default user (`None` = root).
    pub user: Option<String>,
    /// The sandbox's cgroup, for per-process cgroups and tree kills.
    pub cgroups: Option<ProcessCgroups>,
    /// The memory cgroup's events file, to tell OOM kills from other SIGKILLs.
    pub oom_events: Option<OwnedFd>,
    /// The filesystem root the agent resolves users against (`/`).
    pub root: PathBuf,
}

/// Where connections come from.
#[derive(Debug, Default)]
pub struct Endpoints {
    /// An already connected stream socket (a socketpair end).
    pub connected: Option<OwnedFd>,
    /// A listening unix stream socket.
    pub listener: Option<OwnedFd>,
}

pub(crate) type ConnTx = mpsc::Sender<AgentMessage>;

pub(crate) struct Agent {
    config: AgentConfig,
    devnull: OwnedFd,
    procs: RefCell<HashMap<u32, Rc<Proc>>>,
    waiters: RefCell<HashMap<i32, tokio::sync::oneshot::Sender<nix::sys::wait::WaitStatus>>>,
    lingering: RefCell<Vec<String>>,
    next_proc: Cell<u64>,
    connections: Cell<usize>,
    serves_listener: bool,
    idle: Notify,
    files: files::Files,
}

/// Run the agent until it has nothing left to serve. Returns the exit code.
pub fn run(config: AgentConfig, endpoints: Endpoints) -> i32 {
    // SAFETY: plain prctl calls on the current process.
    unsafe {
        // No sandboxed process may ptrace the agent or open /proc/1/exe or
        // /proc/1/fd: it holds host-side descriptors.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"cove-agent".as_ptr(), 0, 0, 0);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("cove-agent: cannot start its runtime: {err}");
            return 1;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, serve(config, endpoints))
}

async fn serve(config: AgentConfig, endpoints: Endpoints) -> i32 {
    let devnull = match std::fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        Ok(f) => OwnedFd::from(f),
        Err(err) => {
            eprintln!("cove-agent: cannot open /dev/null: {err}");
            return 1;
        }
    };
    let files = files::Files::new(
        &config.root,
        &config.cwd,
        config.user.clone(),
        config.hostname.clone(),
    );
    let agent = Rc::new(Agent {
        config,
        devnull,
        procs: RefCell::default(),
        waiters: RefCell::default(),
        lingering: RefCell::default(),
        next_proc: Cell::new(0),
        connections: Cell::new(0),
        serves_listener: endpoints.listener.is_some(),
        idle: Notify::new(),
        files,
    });
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::child()) {
        Ok(mut sigchld) => {
            let reaper = agent.clone();
            tokio::task::spawn_local(async move {
                loop {
                    reaper.reap();
                    if sigchld.recv().await.is_none() {
                        return;
                    }
                }
            });
        }
        Err(err) => {
            eprintln!("cove-agent: cannot watch SIGCHLD: {err}");
            return 1;
        }
    }
    if let Some(fd) = endpoints.connected {
        match stream_from(fd) {
            Ok(stream) => {
                agent.connections.set(agent.connections.get() + 1);
                tokio::task::spawn_local(serve_connection(agent.clone(), stream));
            }
            Err(err) => eprintln!("cove-agent: bad connection fd: {err}"),
        }
    }
    if let Some(fd) = endpoints.listener {
        let std_listener = std::os::unix::net::UnixListener::from(fd);
        let listener = std_listener
            .set_nonblocking(true)
            .and_then(|()| UnixListener::from_std(std_listener));
        match listener {
            Ok(listener) => {
                let acceptor = agent.clone();
                tokio::task::spawn_local(async move {
                    loop {
                        match listener.accept().await {
                            Ok((stream, _)) => {
                                acceptor.connections.set(acceptor.connections.get() + 1);
                                tokio::task::spawn_local(serve_connection(
                                    acceptor.clone(),
                                    stream,
                                ));
                            }
                            Err(err) => {
                                tracing::warn!(%err, "accept failed");
                                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                            }
                        }
                    }
                });
            }
            Err(err) => eprintln!("cove-agent: bad listener fd: {err}"),
        }
    }
    if agent.serves_listener {
        std::future::pending::<()>().await;
    }
    // Without a listener nobody can reconnect: stop when the last
    // connection is gone. Its processes die with the sandbox.
    while agent.connections.get() > 0 {
        agent.idle.notified().await;
    }
    0
}

fn stream_from(fd: OwnedFd) -> std::io::Result<UnixStream> {
    let std_stream = std::os::unix::net::UnixStream::from(fd);
    std_stream.set_nonblocking(true)?;
    UnixStream::from_std(std_stream)
}

async fn serve_connection(agent: Rc<Agent>, stream: UnixStream) {
    // A bulk file transfer takes its connection whole (see files::transfer).
    let Some(stream) = agent.files.take_transfer(stream).await else {
        agent
            .connections
            .set(agent.connections.get().saturating_sub(1));
        agent.idle.notify_waiters();
        return;
    };
    let (read, write) = stream.into_split();
    let mut reader = FramedRead::new(read, FrameCodec::<HostMessage, AgentMessage>::new());
    let (tx, mut rx) = mpsc::channel::<AgentMessage>(64);
    let writer = tokio::task::spawn_local(async move {
        let mut sink = FramedWrite::new(write, FrameCodec::<HostMessage, AgentMessage>::new());
        while let Some(msg) = rx.recv().await {
            if sink.feed(msg).await.is_err() {
                return;
            }
            while let Ok(msg) = rx.try_recv() {
                if sink.feed(msg).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
    });

    let greeted = match reader.next().await {
        Some(Ok(HostMessage::Hello(hello))) if hello.version == PROTOCOL_VERSION => {
            tracing::debug!(client = %hello.client, "connection greeted");
            tx.send(AgentMessage::Hello(AgentHello {
                version: PROTOCOL_VERSION,
                agent_version: env!("CARGO_PKG_VERSION").into(),
                hostname: agent.config.hostname.clone(),
            }))
            .await
            .is_ok()
        }
        Some(Ok(HostMessage::Hello(hello))) => {
            let message = format!(
                "protocol version {} is not supported; this agent speaks version {PROTOCOL_VERSION}",
                hello.version
            );
            let _ = tx.send(AgentMessage::Error { pid: None, message }).await;
            false
        }
        Some(Ok(_)) => {
            let message = "the first message must be Hello".to_string();
            let _ = tx.send(AgentMessage::Error { pid: None, message }).await;
            false
        }
        Some(Err(err)) => {
            let _ = tx
                .send(AgentMessage::Error {
                    pid: None,
                    message: err.to_string(),
                })
                .await;
            false
        }
        None => false,
    };
    if greeted {
        while let Some(frame) = reader.next().await {
            match frame {
                Ok(msg) => agent.handle(msg, &tx).await,
                Err(err) => {
                    let _ = tx
                        .send(AgentMessage::Error {
                            pid: None,
                            message: err.to_string(),
                        })
                        .await;
                    break;
                }
            }
        }
    }
    agent.disown(&tx);
    drop(tx);
    let _ = writer.await;
    agent
        .connections
        .set(agent.connections.get().saturating_sub(1));
    agent.idle.notify_waiters();
}

impl Agent {
    async fn handle(self: &Rc<Self>, msg: HostMessage, tx: &ConnTx) {
        match msg {
            HostMessage::Hello(_) => {}
            HostMessage::Spawn { req, spec } => self.spawn(req, spec, tx).await,
            HostMessage::Stdin { pid, data } => match self.proc(pid) {
                Some(proc) => proc.push_stdin(data, tx).await,
                None => {
                    let error = Some(format!("no process {pid}"));
                    let _ = tx
                        .send(AgentMessage::StdinAck {
                            pid,
                            bytes: 0,
                            error,
                        })
                        .await;
                }
            },
            HostMessage::CloseStdin { pid } => {
                if let Some(proc) = self.proc(pid) {
                    proc.close_stdin();
                }
            }
            HostMessage::Signal { pid, signal, group } => {
                if let Err(message) = self.signal(pid, signal, group) {
                    let _ = tx
                        .send(AgentMessage::Error {
                            pid: Some(pid),
                            message,
                        })
                        .await;
                }
            }
            HostMessage::Resize { pid, rows, cols } => {
                if let Some(Err(err)) = self.proc(pid).map(|p| p.resize(rows, cols)) {
                    let message = format!("cannot resize the terminal: {err}");
                    let _ = tx
                        .send(AgentMessage::Error {
                            pid: Some(pid),
                            message,
                        })
                        .await;
                }
            }
            HostMessage::Credit { pid, bytes } => {
                if let Some(proc) = self.proc(pid) {
                    proc.add_credit(bytes);
                }
            }
            HostMessage::Kill { pid } => match self.proc(pid) {
                Some(proc) => self.kill_tree(&proc),
                None => {
                    let message = format!("no process {pid}");
                    let _ = tx
                        .send(AgentMessage::Error {
                            pid: Some(pid),
                            message,
                        })
                        .await;
                }
            },
            HostMessage::Ping { nonce } => {
                let _ = tx.send(AgentMessage::Pong { nonce }).await;
            }
            HostMessage::Fs { req, msg } => self.files.handle(req, msg, tx).await,
        }
    }

    fn proc(&self, pid: u32) -> Option<Rc<Proc>> {
        self.procs.borrow().get(&pid).cloned()
    }

    fn signal(&self, pid: u32, signal: i32, group: bool) -> Result<(), String> {
        let sig = nix::sys::signal::Signal::try_from(signal)
            .map_err(|_| format!("{signal} is not a signal number"))?;
        let proc = self.proc(pid).ok_or_else(|| format!("no process {pid}"))?;
        let target = nix::unistd::Pid::from_raw(if group {
            -(proc.pgid())
        } else {
            proc.pid() as i32
        });
        nix::sys::signal::kill(target, sig).map_err(|e| format!("kill failed: {e}"))
    }

    /// The connection behind `tx` is gone: its processes run on unowned.
    fn disown(&self, tx: &ConnTx) {
        for proc in self.procs.borrow().values() {
            proc.disown(tx);
        }
        self.files.disconnected(tx);
    }

    /// Collect every exited child; hand statuses to whoever waits for them.
    fn reap(&self) {
        use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG | WaitPidFlag::__WALL)) {
                Ok(WaitStatus::StillAlive) => break,
                Ok(status) => {
                    if let Some(pid) = status.pid()
                        && let Some(waiter) = self.waiters.borrow_mut().remove(&pid.as_raw())
                    {
                        let _ = waiter.send(status);
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => break,
            }
        }
        self.sweep_cgroups();
    }

    /// Remove per-process cgroups whose last member has gone.
    fn sweep_cgroups(&self) {
        let Some(cgroups) = &self.config.cgroups else {
            return;
        };
        self.lingering
            .borrow_mut()
            .retain(|name| cgroups.remove(name).is_err());
    }
}
