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
mod conn;
mod fdio;
mod files;
mod output_log;
mod port_relay;
mod process;
pub mod spawn;
pub mod users;
pub mod vm_init;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::rc::Rc;

use cove_protocol::{AgentHello, AgentMessage, FrameCodec, HostMessage, PROTOCOL_VERSION};
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::Notify;
use tokio_util::codec::FramedRead;

pub use cgroup::{CgroupKind, ProcessCgroups};
use conn::ConnTx;
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
    /// The sandbox's writable layer (an overlay upper directory), when the
    /// host cannot read it itself: a microVM's lives in guest memory.
    pub writable_layer: Option<OwnedFd>,
}

/// Where connections come from.
#[derive(Debug, Default)]
pub struct Endpoints {
    /// An already connected stream socket (a socketpair end).
    pub connected: Option<OwnedFd>,
    /// A listening unix stream socket.
    pub listener: Option<OwnedFd>,
}

/// Most finished background processes kept for late readers.
const RETAIN_COUNT: usize = 128;
/// Most output bytes kept for finished background processes, in all.
const RETAIN_BYTES: usize = 64 * 1024 * 1024;
/// How long a finished background process stays listed.
const RETAIN_FOR: std::time::Duration = std::time::Duration::from_secs(15 * 60);

pub(crate) struct Agent {
    config: AgentConfig,
    devnull: OwnedFd,
    procs: RefCell<HashMap<u32, Rc<Proc>>>,
    waiters: RefCell<HashMap<i32, tokio::sync::oneshot::Sender<nix::sys::wait::WaitStatus>>>,
    lingering: RefCell<Vec<String>>,
    /// Empty per-process cgroups kept for the next processes.
    spare_cgroups: RefCell<cgroup::SpareCgroups>,
    /// Finished background processes kept for late readers, oldest first.
    retained: RefCell<std::collections::VecDeque<u32>>,
    next_proc: Cell<u64>,
    connections: Cell<usize>,
    serves_listener: bool,
    idle: Notify,
    files: files::Files,
}

/// A connection from a transport tokio has no type for (vsock in a
/// microVM), split into its two directions.
pub type Connection = (Box<dyn AsyncRead + Unpin>, Box<dyn AsyncWrite + Unpin>);

/// Connections the agent serves besides its [`Endpoints`]; it serves them
/// for as long as it runs, as it does a listener.
pub type Incoming = std::pin::Pin<Box<dyn futures::Stream<Item = std::io::Result<Connection>>>>;

/// Run the agent until it has nothing left to serve. Returns the exit code.
pub fn run(config: AgentConfig, endpoints: Endpoints) -> i32 {
    run_with(config, endpoints, None)
}

/// Run the agent on the connections `incoming` yields, for transports that
/// are not unix sockets. `incoming` is called once, inside the agent's
/// runtime, so it may register descriptors with tokio.
pub fn run_incoming(
    config: AgentConfig,
    incoming: impl FnOnce() -> std::io::Result<Incoming>,
) -> i32 {
    run_with(config, Endpoints::default(), Some(Box::new(incoming)))
}

/// Output moves through the agent (and the daemon) in buffers of up to a
/// few hundred KiB, allocated and freed at a high rate. glibc's defaults
/// serve those from fresh `mmap`s or hand the heap's top back to the kernel
/// after each free, so every buffer was faulted in and zeroed again (the
/// agent spent ~30% less CPU per GiB streamed without that). This serves
/// buffers up to 4 MiB from the heap and keeps up to 8 MiB of freed memory
/// for reuse. Call it before the process starts threads.
pub fn keep_freed_buffers() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

type MakeIncoming<'a> = Box<dyn FnOnce() -> std::io::Result<Incoming> + 'a>;

fn run_with(config: AgentConfig, endpoints: Endpoints, incoming: Option<MakeIncoming<'_>>) -> i32 {
    // SAFETY: plain prctl calls on the current process.
    unsafe {
        // No sandboxed process may ptrace the agent or open /proc/1/exe or
        // /proc/1/fd: it holds host-side descriptors.
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NAME, c"cove-agent".as_ptr(), 0, 0, 0);
        libc::signal(libc::SIGPIPE, libc::SIG_IGN);
    }
    keep_freed_buffers();
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
    local.block_on(&runtime, serve(config, endpoints, incoming))
}

/// Create the sandbox's default working directory when its template
/// lacks it (as `docker run -w` and a Dockerfile's `WORKDIR` do), owned by
/// the sandbox's default user, so that commands start where the sandbox
/// was asked to put them rather than in `/`. Failing that (a read-only
/// root), commands fall back to `/`.
fn make_working_dir(config: &AgentConfig) {
    let dir = std::path::Path::new(&config.cwd);
    if !dir.is_absolute() || dir.is_dir() {
        return;
    }
    if let Err(err) = std::fs::create_dir_all(dir) {
        eprintln!(
            "cove-agent: cannot create the working directory {}: {err}",
            dir.display()
        );
        return;
    }
    let owner = match config.user.as_deref() {
        None | Some("root") | Some("0") | Some("0:0") => return,
        Some(user) => users::resolve(&config.root, user),
    };
    if let Ok(who) = owner {
        let _ = std::os::unix::fs::chown(dir, Some(who.uid), Some(who.gid));
    }
}

async fn serve(
    mut config: AgentConfig,
    endpoints: Endpoints,
    incoming: Option<MakeIncoming<'_>>,
) -> i32 {
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
    make_working_dir(&config);
    let files = files::Files::new(
        &config.root,
        &config.cwd,
        config.user.clone(),
        config.hostname.clone(),
        config.writable_layer.take(),
    );
    let agent = Rc::new(Agent {
        config,
        devnull,
        procs: RefCell::default(),
        waiters: RefCell::default(),
        lingering: RefCell::default(),
        spare_cgroups: RefCell::default(),
        retained: RefCell::default(),
        next_proc: Cell::new(0),
        connections: Cell::new(0),
        serves_listener: endpoints.listener.is_some() || incoming.is_some(),
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
    let sweeper = agent.clone();
    tokio::task::spawn_local(async move {
        loop {
            tokio::time::sleep(std::time::Duration::from_secs(30)).await;
            sweeper.enforce_retention();
        }
    });
    if let Some(fd) = endpoints.connected {
        match stream_from(fd) {
            Ok(stream) => {
                agent.connections.set(agent.connections.get() + 1);
                tokio::task::spawn_local(serve_unix(agent.clone(), stream));
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
                                tokio::task::spawn_local(serve_unix(acceptor.clone(), stream));
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
    if let Some(make) = incoming {
        match make() {
            Ok(mut incoming) => {
                let acceptor = agent.clone();
                tokio::task::spawn_local(async move {
                    while let Some(next) = incoming.next().await {
                        match next {
                            Ok((read, write)) => {
                                acceptor.connections.set(acceptor.connections.get() + 1);
                                tokio::task::spawn_local(serve_connection(
                                    acceptor.clone(),
                                    read,
                                    write,
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
            Err(err) => {
                eprintln!("cove-agent: cannot accept connections: {err}");
                return 1;
            }
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

/// A connection over a Unix socket: a bulk file transfer takes it whole
/// (see `files::transfer`); anything else speaks the framed protocol.
async fn serve_unix(agent: Rc<Agent>, stream: UnixStream) {
    let Some(stream) = agent.files.take_transfer(stream).await else {
        agent
            .connections
            .set(agent.connections.get().saturating_sub(1));
        agent.idle.notify_waiters();
        return;
    };
    let (read, write) = stream.into_split();
    serve_connection(agent, read, write).await;
}

async fn serve_connection<R, W>(agent: Rc<Agent>, read: R, write: W)
where
    R: AsyncRead + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let mut reader = FramedRead::new(read, FrameCodec::<HostMessage, AgentMessage>::new());
    let (tx, writer) = conn::channel(write);
    let writer = tokio::task::spawn_local(writer);

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
                    proc.add_credit(tx, bytes);
                }
            }
            HostMessage::Attach {
                pid,
                stdout_from,
                stderr_from,
                window,
                backpressure,
            } => {
                self.attach(tx, pid, [stdout_from, stderr_from], window, backpressure)
                    .await;
            }
            HostMessage::Detach { pid } => {
                if let Some(proc) = self.proc(pid) {
                    proc.unsubscribe(tx);
                    self.retire(&proc);
                }
            }
            HostMessage::ListProcesses { req } => {
                let mut list: Vec<_> = self.procs.borrow().values().map(|p| p.info()).collect();
                list.sort_by_key(|p| (p.started_at, p.pid));
                let _ = tx.send(AgentMessage::Processes { req, list }).await;
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

    /// The connection behind `tx` is gone: its subscriptions end, and the
    /// foreground processes it owned are killed (nobody can read their
    /// result any more). Background processes run on.
    fn disown(&self, tx: &ConnTx) {
        let procs: Vec<Rc<Proc>> = self.procs.borrow().values().cloned().collect();
        for proc in procs {
            if proc.unsubscribe(tx) && !proc.has_exited() {
                self.kill_tree(&proc);
            }
            self.retire(&proc);
        }
        self.files.disconnected(tx);
    }

    /// Keep finished background processes within the budget: at most
    /// [`RETAIN_COUNT`] of them, [`RETAIN_BYTES`] of output, [`RETAIN_FOR`] old.
    pub(crate) fn enforce_retention(&self) {
        let mut retained = self.retained.borrow_mut();
        retained.retain(|pid| self.procs.borrow().contains_key(pid));
        loop {
            let held: usize = retained
                .iter()
                .filter_map(|pid| self.proc(*pid))
                .map(|p| p.held_bytes())
                .sum();
            let oldest_expired = retained
                .front()
                .and_then(|pid| self.proc(*pid))
                .and_then(|p| p.finished_at())
                .is_some_and(|t| t.elapsed() > RETAIN_FOR);
            if retained.len() > RETAIN_COUNT || held > RETAIN_BYTES || oldest_expired {
                if let Some(pid) = retained.pop_front() {
                    self.procs.borrow_mut().remove(&pid);
                }
            } else {
                break;
            }
        }
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
