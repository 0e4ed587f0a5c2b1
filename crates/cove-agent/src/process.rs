//! One sandboxed process from spawn to exit and after: its output logs,
//! the connections reading them, its stdin queue, its timeout, and its
//! result.
//!
//! ```text
//!  pipe ──pump──▶ OutputLog (bounded, with offsets) ──subscription──▶ connection
//!                     ▲ trimmed when the owner has read (back-pressure)
//!                     └ or when full (background: oldest bytes dropped, readers told)
//! ```
//!
//! A foreground process has an *owner*: the connection that spawned it. Its
//! log is a bounded window ahead of the owner: when the owner stops
//! granting credit the log fills, the pump stops reading, and the process
//! blocks on its pipe, so nothing is lost and no memory grows. If the owner
//! goes away the process tree is killed. A background process has no owner:
//! its pumps always read, the log keeps the newest `replay_bytes` of each
//! stream, and any connection may attach from an offset; a reader that
//! falls behind gets a `Dropped` notice for the bytes it missed. The process
//! never blocks on a slow or absent reader. A background process spawned
//! with `follow` is both: its spawning connection reads it from the first
//! byte with back-pressure, like an owner, but the process outlives it.
//!
//! Ordering per subscription: `Spawned` (or `Attached`), then output, then
//! `Exited` once both streams are fully delivered.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use cove_protocol::{
    AgentMessage, ExitStatus, MAX_CHUNK, MAX_OUTPUT_CHUNK, ProcessInfo, ProcessSpec, SpawnError,
    SpawnErrorKind, Stream,
};
use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::cgroup::read_oom_kills;
use crate::fdio;
use crate::output_log::OutputLog;
use crate::spawn::{ChildStdio, Prepared, SpawnFailure};
use crate::users::{self, Identity};
use crate::{Agent, ConnTx};

/// Bytes allocated at a time for a pump's reads (several reads of at most
/// `MAX_CHUNK` share one allocation). A 1 MiB pipe and 1 MiB reads for
/// fast writers were tried: streaming over SSE fell from ~480 to ~280
/// MiB/s (probably as the bytes no longer stay in cache from writer to
/// agent).
const READ_BUFFER: usize = 4 * MAX_CHUNK;

/// How long pipes may stay silent after the process exited before the
/// pumps stop forwarding (a background child still holds them open).
const EXIT_GRACE: Duration = Duration::from_millis(50);

/// Smallest log a process gets, whatever it asks for.
const MIN_LOG: usize = 64 * 1024;
/// Largest replay buffer a process may ask for, per stream.
pub const MAX_REPLAY: u64 = 64 * 1024 * 1024;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

enum StdinCmd {
    Data(Vec<u8>, ConnTx),
    Close,
}

/// One connection reading one process.
struct Subscription {
    conn: ConnTx,
    next: [Cell<u64>; 2],
    credit: Cell<u64>,
    /// The spawning connection of a foreground process: the process dies
    /// if it leaves.
    owner: bool,
    /// The process waits for this reader rather than drop what it has not read.
    backpressure: bool,
    changed: Notify,
    detached: Cell<bool>,
}

pub(crate) struct Proc {
    pid: u32,
    argv: Vec<String>,
    tag: Option<String>,
    background: bool,
    started_at: u64,
    logs: [RefCell<OutputLog>; 2],
    subs: RefCell<Vec<Rc<Subscription>>>,
    /// New output, EOF, or the result: subscriptions look again.
    data: Notify,
    /// The owner read (or left): a blocked pump looks again.
    room: Notify,
    stdin: RefCell<Option<mpsc::UnboundedSender<StdinCmd>>>,
    pty: Option<OwnedFd>,
    /// The process's own cgroup, until it is kept for another process.
    cgroup: RefCell<Option<String>>,
    exited: watch::Sender<bool>,
    status: RefCell<Option<ExitStatus>>,
    finished_at: Cell<Option<Instant>>,
}

fn index(stream: Stream) -> usize {
    match stream {
        Stream::Stdout => 0,
        Stream::Stderr => 1,
    }
}

const STREAMS: [Stream; 2] = [Stream::Stdout, Stream::Stderr];

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The process group, which is the process itself (it called setsid).
    pub(crate) fn pgid(&self) -> i32 {
        self.pid as i32
    }

    pub(crate) fn has_exited(&self) -> bool {
        self.status.borrow().is_some()
    }

    /// The oldest offset of stream `i` some holding reader still needs.
    fn floor(&self, i: usize) -> Option<u64> {
        self.subs
            .borrow()
            .iter()
            .filter(|s| s.backpressure)
            .map(|s| s.next[i].get())
            .min()
    }

    pub(crate) fn info(&self) -> ProcessInfo {
        ProcessInfo {
            pid: self.pid,
            argv: self.argv.clone(),
            tag: self.tag.clone(),
            background: self.background,
            pty: self.pty.is_some(),
            stdin_open: self.stdin.borrow().is_some(),
            started_at: self.started_at,
            status: self.status.borrow().clone(),
            stdout_bytes: self.logs[0].borrow().produced,
            stderr_bytes: self.logs[1].borrow().produced,
        }
    }

    /// Bytes held in the logs (for the retention budget).
    pub(crate) fn held_bytes(&self) -> usize {
        self.logs.iter().map(|l| l.borrow().held()).sum()
    }

    pub(crate) fn finished_at(&self) -> Option<Instant> {
        self.finished_at.get()
    }

    fn subscription(&self, conn: &ConnTx) -> Option<Rc<Subscription>> {
        self.subs
            .borrow()
            .iter()
            .find(|s| s.conn.same_channel(conn))
            .cloned()
    }

    /// Remove `conn`'s subscription; returns whether it owned the process.
    pub(crate) fn unsubscribe(&self, conn: &ConnTx) -> bool {
        let mut owned = false;
        self.subs.borrow_mut().retain(|s| {
            if s.conn.same_channel(conn) {
                owned |= s.owner;
                s.detached.set(true);
                s.changed.notify_waiters();
                false
            } else {
                true
            }
        });
        self.room.notify_waiters();
        owned
    }

    pub(crate) fn add_credit(&self, conn: &ConnTx, bytes: u64) {
        if let Some(sub) = self.subscription(conn) {
            sub.credit.set(sub.credit.get().saturating_add(bytes));
            sub.changed.notify_waiters();
        }
    }

    pub(crate) async fn push_stdin(&self, data: Vec<u8>, tx: &ConnTx) {
        let len = data.len() as u64;
        let sent = self
            .stdin
            .borrow()
            .as_ref()
            .is_some_and(|q| q.send(StdinCmd::Data(data, tx.clone())).is_ok());
        if !sent {
            let error = Some(format!("stdin of process {} is closed", self.pid));
            let _ = tx
                .send(AgentMessage::StdinAck {
                    pid: self.pid,
                    bytes: len,
                    error,
                })
                .await;
        }
    }

    pub(crate) fn close_stdin(&self) {
        if let Some(queue) = self.stdin.borrow_mut().take() {
            let _ = queue.send(StdinCmd::Close);
        }
    }

    pub(crate) fn resize(&self, rows: u16, cols: u16) -> std::io::Result<()> {
        match &self.pty {
            Some(master) => fdio::set_winsize(master, rows, cols),
            None => Err(std::io::Error::other("the process has no terminal")),
        }
    }
}

fn spawn_error(kind: SpawnErrorKind, message: impl Into<String>) -> SpawnError {
    SpawnError {
        kind,
        message: message.into(),
    }
}

fn set_var(env: &mut Vec<(String, String)>, key: &str, value: &str) {
    match env.iter_mut().find(|(k, _)| k == key) {
        Some(slot) => slot.1 = value.to_string(),
        None => env.push((key.to_string(), value.to_string())),
    }
}

struct Pipes {
    child_stdin: OwnedFd,
    child_stdout: OwnedFd,
    child_stderr: OwnedFd,
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    pty_master: Option<OwnedFd>,
}

fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

impl Agent {
    fn identity(&self, spec: &ProcessSpec) -> Result<Identity, SpawnError> {
        match spec.user.as_deref().or(self.config.user.as_deref()) {
            None | Some("root") | Some("0") | Some("0:0") => Ok(Identity::root()),
            Some(user) => users::resolve(&self.config.root, user).map_err(|e| {
                let kind = match e {
                    users::UserError::Malformed(_) => SpawnErrorKind::InvalidRequest,
                    _ => SpawnErrorKind::NoSuchUser,
                };
                spawn_error(kind, e.to_string())
            }),
        }
    }

    fn cwd(&self, spec: &ProcessSpec) -> Result<String, SpawnError> {
        let Some(asked) = spec.cwd.as_deref().filter(|c| !c.is_empty()) else {
            // The default directory may be missing from an image: fall back to /.
            let cwd = &self.config.cwd;
            return Ok(if std::path::Path::new(cwd).is_dir() {
                cwd.clone()
            } else {
                "/".into()
            });
        };
        let path = std::path::Path::new(&self.config.cwd).join(asked);
        match std::fs::metadata(&path) {
            Ok(meta) if meta.is_dir() => Ok(path.to_string_lossy().into_owned()),
            Ok(_) => Err(spawn_error(
                SpawnErrorKind::NoSuchCwd,
                format!("working directory {asked} is not a directory"),
            )),
            Err(_) => Err(spawn_error(
                SpawnErrorKind::NoSuchCwd,
                format!("working directory {asked} does not exist in the sandbox"),
            )),
        }
    }

    fn environment(&self, spec: &ProcessSpec, who: &Identity) -> Vec<(String, String)> {
        let mut env = Vec::new();
        if !spec.clear_env {
            set_var(&mut env, "PATH", DEFAULT_PATH);
            set_var(&mut env, "HOME", &who.home);
            if let Some(name) = &who.name {
                set_var(&mut env, "USER", name);
                set_var(&mut env, "LOGNAME", name);
            }
            set_var(&mut env, "HOSTNAME", &self.config.hostname);
            for (k, v) in &self.config.env {
                set_var(&mut env, k, v);
            }
        }
        if spec.pty.is_some() && !spec.env.iter().any(|(k, _)| k == "TERM") {
            set_var(&mut env, "TERM", "xterm-256color");
        }
        for (k, v) in &spec.env {
            set_var(&mut env, k, v);
        }
        env
    }

    fn pipes(&self, spec: &ProcessSpec) -> std::io::Result<Pipes> {
        if let Some(size) = spec.pty {
            let winsize = nix::pty::Winsize {
                ws_row: size.rows,
                ws_col: size.cols,
                ws_xpixel: 0,
                ws_ypixel: 0,
            };
            let pty = nix::pty::openpty(Some(&winsize), None)?;
            fdio::set_flags(&pty.slave, false)?;
            fdio::set_flags(&pty.master, false)?;
            let master_in = pty.master.try_clone()?;
            let master_resize = pty.master.try_clone()?;
            return Ok(Pipes {
                child_stdin: pty.slave.try_clone()?,
                child_stdout: pty.slave.try_clone()?,
                child_stderr: pty.slave,
                stdin: Some(master_in),
                stdout: pty.master,
                stderr: None,
                pty_master: Some(master_resize),
            });
        }
        let (stdin_read, stdin_write) = if spec.stdin {
            let (r, w) = pipe()?;
            (r, Some(w))
        } else {
            (self.devnull.try_clone()?, None)
        };
        let (stdout_read, stdout_write) = pipe()?;
        let (stderr_read, stderr_write) = pipe()?;
        Ok(Pipes {
            child_stdin: stdin_read,
            child_stdout: stdout_write,
            child_stderr: stderr_write,
            stdin: stdin_write,
            stdout: stdout_read,
            stderr: Some(stderr_read),
            pty_master: None,
        })
    }

    /// Start a process for request `req` on behalf of connection `tx`.
    pub(crate) async fn spawn(self: &Rc<Self>, req: u32, spec: ProcessSpec, tx: &ConnTx) {
        match self.start(&spec, tx) {
            Ok(started) => {
                let pid = started.proc.pid;
                if tx.send(AgentMessage::Spawned { req, pid }).await.is_err() {
                    started.proc.unsubscribe(tx);
                }
                self.clone().supervise(started, spec);
            }
            Err(error) => {
                let _ = tx.send(AgentMessage::SpawnFailed { req, error }).await;
            }
        }
    }

    fn start(&self, spec: &ProcessSpec, tx: &ConnTx) -> Result<Started, SpawnError> {
        let who = self.identity(spec)?;
        let cwd = self.cwd(spec)?;
        let env = self.environment(spec, &who);
        let argv = spec.command.to_argv();
        let prepared = Prepared::new(&argv, &env, &cwd, who)
            .map_err(|e| spawn_error(SpawnErrorKind::InvalidRequest, e.to_string()))?;
        let pipes = self.pipes(spec).map_err(|e| {
            spawn_error(
                SpawnErrorKind::ResourceLimit,
                format!("cannot create pipes: {e}"),
            )
        })?;

        let n = self.next_proc.get() + 1;
        self.next_proc.set(n);
        let mut cgroup = match &self.config.cgroups {
            Some(cgroups) => match cgroups.take(&mut self.spare_cgroups.borrow_mut(), n) {
                Ok(cg) => Some(cg),
                Err(err) => {
                    tracing::warn!(%err, "no per-process cgroup; the process group bounds the tree");
                    None
                }
            },
            None => None,
        };
        let oom_before = self.config.oom_events.as_ref().and_then(read_oom_kills);
        let started_at = Instant::now();
        let stdio = ChildStdio {
            stdin: &pipes.child_stdin,
            stdout: &pipes.child_stdout,
            stderr: &pipes.child_stderr,
            controlling_tty: spec.pty.is_some(),
        };
        let result = prepared.spawn(stdio, cgroup.as_ref().and_then(|c| c.procs.as_ref()));
        let cgroup_name = cgroup.as_mut().map(|c| {
            c.procs = None;
            c.name.clone()
        });
        let pid = match result {
            Ok(pid) => pid,
            Err(failure) => {
                if let Some(name) = cgroup_name {
                    self.release_cgroup(name);
                }
                let kind = match failure {
                    SpawnFailure::Invalid(_) => SpawnErrorKind::InvalidRequest,
                    SpawnFailure::Cwd { .. } => SpawnErrorKind::NoSuchCwd,
                    SpawnFailure::Identity { .. } => SpawnErrorKind::NoSuchUser,
                    SpawnFailure::Fork(_) => SpawnErrorKind::ResourceLimit,
                    SpawnFailure::Setup { .. } => SpawnErrorKind::Internal,
                };
                return Err(spawn_error(kind, failure.to_string()));
            }
        };
        let (exit_tx, exit_rx) = oneshot::channel();
        self.waiters.borrow_mut().insert(pid.as_raw(), exit_tx);
        // Close the child's ends here so pipes reach EOF when the process
        // tree is done with them.
        drop(pipes.child_stdin);
        drop(pipes.child_stdout);
        drop(pipes.child_stderr);

        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let has_stdin = pipes.stdin.is_some();
        let cap = (spec.replay_bytes.min(MAX_REPLAY) as usize).max(MIN_LOG);
        let subs = if spec.background && !spec.follow {
            Vec::new()
        } else {
            vec![Rc::new(Subscription {
                conn: tx.clone(),
                next: [Cell::new(0), Cell::new(0)],
                credit: Cell::new(spec.window),
                owner: !spec.background,
                backpressure: true,
                changed: Notify::new(),
                detached: Cell::new(false),
            })]
        };
        let proc = Rc::new(Proc {
            pid: pid.as_raw() as u32,
            argv,
            tag: spec.tag.clone(),
            background: spec.background,
            started_at: now_ms(),
            logs: [
                RefCell::new(OutputLog::new(cap, spec.max_output)),
                RefCell::new(OutputLog::new(cap, spec.max_output)),
            ],
            subs: RefCell::new(subs),
            data: Notify::new(),
            room: Notify::new(),
            stdin: RefCell::new(has_stdin.then_some(stdin_tx)),
            pty: pipes.pty_master,
            cgroup: RefCell::new(cgroup_name),
            exited: watch::channel(false).0,
            status: RefCell::new(None),
            finished_at: Cell::new(None),
        });
        self.procs.borrow_mut().insert(proc.pid, proc.clone());
        Ok(Started {
            proc,
            exit_rx,
            stdin: pipes.stdin.map(|fd| (fd, stdin_rx)),
            stdout: pipes.stdout,
            stderr: pipes.stderr,
            started_at,
            oom_before,
        })
    }

    fn supervise(self: Rc<Self>, started: Started, spec: ProcessSpec) {
        let Started {
            proc,
            exit_rx,
            stdin,
            stdout,
            stderr,
            started_at,
            oom_before,
        } = started;
        let is_pty = spec.pty.is_some();
        if let Some((fd, queue)) = stdin {
            tokio::task::spawn_local(feed_stdin(proc.clone(), fd, queue, is_pty));
        }
        let owner = proc.subs.borrow().first().cloned();
        if let Some(sub) = owner {
            tokio::task::spawn_local(deliver(self.clone(), proc.clone(), sub));
        }
        let mut pumps = vec![tokio::task::spawn_local(pump(
            proc.clone(),
            Stream::Stdout,
            stdout,
        ))];
        if let Some(stderr) = stderr {
            pumps.push(tokio::task::spawn_local(pump(
                proc.clone(),
                Stream::Stderr,
                stderr,
            )));
        }
        tokio::task::spawn_local(async move {
            let mut exit_rx = exit_rx;
            let mut timed_out = false;
            let wait = if spec.timeout_ms > 0 {
                match tokio::time::timeout(Duration::from_millis(spec.timeout_ms), &mut exit_rx)
                    .await
                {
                    Ok(status) => status,
                    Err(_) => {
                        timed_out = true;
                        self.kill_tree(&proc);
                        exit_rx.await
                    }
                }
            } else {
                exit_rx.await
            };
            let duration_ms = started_at.elapsed().as_millis() as u64;
            if timed_out {
                // Anything that escaped the first kill (forked in between).
                self.kill_tree(&proc);
            }
            let _ = proc.exited.send(true);
            let mut status = ExitStatus {
                timed_out,
                duration_ms,
                ..ExitStatus::default()
            };
            match wait {
                Ok(WaitStatus::Exited(_, code)) => status.code = Some(code),
                Ok(WaitStatus::Signaled(_, sig, _)) => status.signal = Some(sig as i32),
                _ => status.code = Some(255),
            }
            for pump in pumps {
                let _ = pump.await;
            }
            for log in &proc.logs {
                log.borrow_mut().compact();
            }
            {
                let out = proc.logs[0].borrow();
                let err = proc.logs[1].borrow();
                (status.stdout_bytes, status.stdout_truncated) = (out.produced, out.truncated);
                (status.stderr_bytes, status.stderr_truncated) = (err.produced, err.truncated);
            }
            if status.signal == Some(libc::SIGKILL) && !timed_out {
                let oom_after = self.config.oom_events.as_ref().and_then(read_oom_kills);
                status.oom_killed = matches!((oom_before, oom_after), (Some(a), Some(b)) if b > a);
            }
            *proc.status.borrow_mut() = Some(status);
            proc.finished_at.set(Some(Instant::now()));
            proc.data.notify_waiters();
            let cgroup = proc.cgroup.borrow_mut().take();
            if let Some(lingering) = cgroup.and_then(|name| self.release_cgroup(name)) {
                // Still reachable by a kill of this process's tree.
                *proc.cgroup.borrow_mut() = Some(lingering);
            }
            self.retire(&proc);
        });
    }

    /// A process that has exited stays listed while someone reads it, and
    /// (background ones) for a while after, within the retention budget.
    pub(crate) fn retire(&self, proc: &Rc<Proc>) {
        if !proc.has_exited() {
            return;
        }
        if proc.background {
            self.retained.borrow_mut().push_back(proc.pid);
            self.enforce_retention();
        } else if proc.subs.borrow().is_empty() {
            self.procs.borrow_mut().remove(&proc.pid);
        }
    }

    /// Keep an ended process's cgroup for the next process, or remove it,
    /// or, while something it started still runs, keep it for a later
    /// sweep; then its name is returned.
    fn release_cgroup(&self, name: String) -> Option<String> {
        let cgroups = self.config.cgroups.as_ref()?;
        let lingering = cgroups.release(&mut self.spare_cgroups.borrow_mut(), name)?;
        self.lingering.borrow_mut().push(lingering.clone());
        Some(lingering)
    }

    /// SIGKILL the process group, then every member of the process's cgroup.
    pub(crate) fn kill_tree(&self, proc: &Proc) {
        if proc.has_exited() && proc.cgroup.borrow().is_none() {
            return;
        }
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(proc.pgid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let (Some(cgroups), Some(name)) = (&self.config.cgroups, &*proc.cgroup.borrow()) {
            cgroups.kill(name);
        }
    }

    /// Subscribe `conn` to `pid`'s output from the given offsets.
    pub(crate) async fn attach(
        self: &Rc<Self>,
        conn: &ConnTx,
        pid: u32,
        from: [u64; 2],
        window: u64,
        backpressure: bool,
    ) {
        let Some(proc) = self.proc(pid) else {
            let message = format!("no process {pid} (it never ran here, or finished too long ago)");
            let _ = conn
                .send(AgentMessage::Error {
                    pid: Some(pid),
                    message,
                })
                .await;
            return;
        };
        proc.unsubscribe(conn);
        let sub = Rc::new(Subscription {
            conn: conn.clone(),
            next: [Cell::new(from[0]), Cell::new(from[1])],
            credit: Cell::new(window),
            owner: false,
            backpressure: backpressure && !proc.has_exited(),
            changed: Notify::new(),
            detached: Cell::new(false),
        });
        proc.subs.borrow_mut().push(sub.clone());
        if conn
            .send(AgentMessage::Attached {
                pid,
                info: proc.info(),
            })
            .await
            .is_err()
        {
            proc.unsubscribe(conn);
            return;
        }
        tokio::task::spawn_local(deliver(self.clone(), proc, sub));
    }
}

struct Started {
    proc: Rc<Proc>,
    exit_rx: oneshot::Receiver<WaitStatus>,
    stdin: Option<(OwnedFd, mpsc::UnboundedReceiver<StdinCmd>)>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    started_at: Instant,
    oom_before: Option<u64>,
}

/// Read one output stream into its log.
async fn pump(proc: Rc<Proc>, stream: Stream, fd: OwnedFd) {
    let fd = match fdio::async_pipe(fd) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(%err, "cannot watch an output pipe");
            return;
        }
    };
    let i = index(stream);
    let mut exited = proc.exited.subscribe();
    // Reads land here and go to the log without a copy (but for small
    // ones, which it gathers); the buffer moves on to a new allocation
    // when this one is used up.
    let mut buf = BytesMut::new();
    loop {
        // With a holding reader, read only while it is less than a full
        // buffer behind.
        let want = loop {
            let room = proc.room.notified();
            tokio::pin!(room);
            room.as_mut().enable();
            let Some(floor) = proc.floor(i) else {
                break MAX_CHUNK;
            };
            if let Some(want) = proc.logs[i].borrow().room(floor, MAX_CHUNK) {
                break want;
            }
            room.await;
        };
        if buf.capacity() < want {
            buf.reserve(READ_BUFFER);
        }
        let n = if *exited.borrow() {
            match tokio::time::timeout(EXIT_GRACE, fdio::read_buf(&fd, &mut buf, want)).await {
                Ok(result) => result,
                Err(_quiet) => {
                    tokio::task::spawn_local(drain(fd));
                    break;
                }
            }
        } else {
            tokio::select! {
                result = fdio::read_buf(&fd, &mut buf, want) => result,
                _ = exited.changed() => continue,
            }
        };
        if matches!(n, Ok(0) | Err(_)) {
            break;
        }
        let floor = proc.floor(i);
        if proc.logs[i]
            .borrow_mut()
            .append(buf.split().freeze(), floor)
        {
            proc.data.notify_waiters();
        }
    }
    proc.data.notify_waiters();
}

/// Swallow a pipe's remaining output until its last writer closes it.
async fn drain(fd: AsyncFd<OwnedFd>) {
    let mut buf = BytesMut::with_capacity(MAX_CHUNK);
    while let Ok(n) = fdio::read_buf(&fd, &mut buf, MAX_CHUNK).await {
        if n == 0 {
            break;
        }
        buf.clear();
    }
}

/// What a subscriber is sent next.
enum Send {
    Message(AgentMessage),
    Output(Stream, u64, Vec<bytes::Bytes>),
}

/// Send a process's output to one subscriber, then its exit.
async fn deliver(agent: Rc<Agent>, proc: Rc<Proc>, sub: Rc<Subscription>) {
    let pid = proc.pid;
    loop {
        let data = proc.data.notified();
        let credit = sub.changed.notified();
        tokio::pin!(data, credit);
        data.as_mut().enable();
        credit.as_mut().enable();
        if sub.detached.get() {
            return;
        }
        let mut message = None;
        for stream in STREAMS {
            let i = index(stream);
            let log = proc.logs[i].borrow();
            let next = sub.next[i].get();
            if next < log.start() {
                sub.next[i].set(log.start());
                message = Some(Send::Message(AgentMessage::Dropped {
                    pid,
                    stream,
                    from: next,
                    to: log.start(),
                }));
                break;
            }
            let available = log.end().saturating_sub(next);
            let credit = sub.credit.get();
            if available > 0 && credit > 0 {
                let n = available.min(credit).min(MAX_OUTPUT_CHUNK as u64) as usize;
                let parts = log.read(next, n);
                let len = parts.iter().map(|p| p.len() as u64).sum::<u64>();
                sub.next[i].set(next + len);
                sub.credit.set(credit - len);
                message = Some(Send::Output(stream, next, parts));
                break;
            }
        }
        if let Some(message) = message {
            if sub.backpressure {
                proc.room.notify_waiters();
            }
            let sent = match message {
                Send::Message(message) => sub.conn.send(message).await,
                Send::Output(stream, offset, parts) => {
                    sub.conn.send_output(pid, stream, offset, parts).await
                }
            };
            if sent.is_err() {
                proc.unsubscribe(&sub.conn);
                return;
            }
            continue;
        }
        let status = proc.status.borrow().clone();
        if let Some(status) = status {
            let drained = STREAMS
                .iter()
                .all(|s| sub.next[index(*s)].get() >= proc.logs[index(*s)].borrow().end());
            if drained {
                let _ = sub.conn.send(AgentMessage::Exited { pid, status }).await;
                proc.subs.borrow_mut().retain(|s| !Rc::ptr_eq(s, &sub));
                proc.room.notify_waiters();
                agent.retire(&proc);
                return;
            }
        }
        tokio::select! {
            _ = data => {}
            _ = credit => {}
        }
    }
}

async fn feed_stdin(
    proc: Rc<Proc>,
    fd: OwnedFd,
    mut queue: mpsc::UnboundedReceiver<StdinCmd>,
    is_pty: bool,
) {
    let fd = match fdio::async_pipe(fd) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(%err, "cannot watch a stdin pipe");
            return;
        }
    };
    let mut broken: Option<String> = None;
    while let Some(cmd) = queue.recv().await {
        match cmd {
            StdinCmd::Data(data, reply) => {
                let bytes = data.len() as u64;
                if broken.is_none()
                    && let Err(err) = fdio::write_all(&fd, &data).await
                {
                    broken = Some(format!("the process closed its stdin ({err})"));
                }
                let error = broken.clone();
                let _ = reply
                    .send(AgentMessage::StdinAck {
                        pid: proc.pid,
                        bytes,
                        error,
                    })
                    .await;
            }
            StdinCmd::Close => {
                if is_pty {
                    // A terminal has no half-close: send end-of-file (^D).
                    let _ = fdio::write_all(&fd, &[4]).await;
                }
                break;
            }
        }
    }
}
