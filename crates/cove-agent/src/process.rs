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
use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use cove_protocol::{
    AgentMessage, ExitStatus, MAX_CHUNK, MAX_OUTPUT_CHUNK, ProcessInfo, ProcessSpec, SpawnError,
    SpawnErrorKind, Stream,
};
use nix::sys::wait::WaitStatus;
use tokio::io::unix::AsyncFd;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use crate::cgroup::read_oom_kills;
use crate::fdio;
use crate::spawn::{ChildStdio, Prepared, SpawnFailure};
use crate::users::{self, Identity};
use crate::{Agent, ConnTx};

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

/// The bytes of one output stream still held, with their offsets.
struct OutputLog {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]` in the stream.
    start: u64,
    /// Most bytes held at once.
    cap: usize,
    /// Bytes the process wrote (also those past `limit`).
    produced: u64,
    /// `max_output`: bytes past it are discarded.
    limit: Option<u64>,
    truncated: bool,
}

impl OutputLog {
    fn new(cap: usize, limit: Option<u64>) -> OutputLog {
        OutputLog {
            buf: VecDeque::new(),
            start: 0,
            cap,
            produced: 0,
            limit,
            truncated: false,
        }
    }

    fn end(&self) -> u64 {
        self.start + self.buf.len() as u64
    }

    /// Append what the process wrote; returns whether anything was kept.
    /// The log then keeps its newest `cap` bytes, except that nothing at or
    /// after `floor` (what a holding reader has not read) is ever dropped.
    fn append(&mut self, data: &[u8], floor: Option<u64>) -> bool {
        self.produced += data.len() as u64;
        let keep = match self.limit {
            Some(limit) => (limit.saturating_sub(self.end())).min(data.len() as u64) as usize,
            None => data.len(),
        };
        if keep < data.len() {
            self.truncated = true;
        }
        self.buf.extend(&data[..keep]);
        if self.buf.len() > self.cap {
            let oldest_kept = self.end() - self.cap as u64;
            self.trim_to(floor.map_or(oldest_kept, |f| f.min(oldest_kept)));
        }
        keep > 0
    }

    /// How much a pump may read while a reader holds the process back
    /// (`floor` is what that reader has not read yet), or `None` when the
    /// reader is a full buffer behind. Bytes past `max_output` are
    /// discarded, so they need no room.
    fn room(&self, floor: u64) -> Option<usize> {
        if self.limit.is_some_and(|l| self.end() >= l) {
            return Some(MAX_CHUNK);
        }
        let unread = self.end().saturating_sub(floor) as usize;
        let free = self.cap.saturating_sub(unread);
        (free > 0).then(|| free.min(MAX_CHUNK))
    }

    /// Forget everything before offset `to`.
    fn trim_to(&mut self, to: u64) {
        let n = to.saturating_sub(self.start).min(self.buf.len() as u64) as usize;
        self.buf.drain(..n);
        self.start += n as u64;
    }

    /// Copy up to `max` bytes from offset `from` (which must be >= start).
    fn read(&self, from: u64, max: usize) -> Vec<u8> {
        let skip = ((from - self.start) as usize).min(self.buf.len());
        let n = max.min(self.buf.len() - skip);
        let mut out = Vec::with_capacity(n);
        // The ring buffer's two slices, copied whole, not byte by byte.
        let (front, back) = self.buf.as_slices();
        let from_front = front.len().saturating_sub(skip).min(n);
        if from_front > 0 {
            out.extend_from_slice(&front[skip..skip + from_front]);
        }
        let back_skip = skip.saturating_sub(front.len());
        out.extend_from_slice(&back[back_skip..back_skip + (n - from_front)]);
        out
    }
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
        self.logs.iter().map(|l| l.borrow().buf.len()).sum()
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
    let mut buf = vec![0u8; MAX_CHUNK];
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
            if let Some(want) = proc.logs[i].borrow().room(floor) {
                break want;
            }
            room.await;
        };
        let n = if *exited.borrow() {
            match tokio::time::timeout(EXIT_GRACE, fdio::read(&fd, &mut buf[..want])).await {
                Ok(result) => result,
                Err(_quiet) => {
                    tokio::task::spawn_local(drain(fd));
                    break;
                }
            }
        } else {
            tokio::select! {
                result = fdio::read(&fd, &mut buf[..want]) => result,
                _ = exited.changed() => continue,
            }
        };
        let n = match n {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let floor = proc.floor(i);
        if proc.logs[i].borrow_mut().append(&buf[..n], floor) {
            proc.data.notify_waiters();
        }
    }
    proc.data.notify_waiters();
}

/// Swallow a pipe's remaining output until its last writer closes it.
async fn drain(fd: AsyncFd<OwnedFd>) {
    let mut buf = vec![0u8; MAX_CHUNK];
    while let Ok(n) = fdio::read(&fd, &mut buf).await {
        if n == 0 {
            break;
        }
    }
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
            if next < log.start {
                sub.next[i].set(log.start);
                message = Some(AgentMessage::Dropped {
                    pid,
                    stream,
                    from: next,
                    to: log.start,
                });
                break;
            }
            let available = log.end().saturating_sub(next);
            let credit = sub.credit.get();
            if available > 0 && credit > 0 {
                let n = available.min(credit).min(MAX_OUTPUT_CHUNK as u64) as usize;
                let data = log.read(next, n);
                sub.next[i].set(next + data.len() as u64);
                sub.credit.set(credit - data.len() as u64);
                message = Some(AgentMessage::Output {
                    pid,
                    stream,
                    offset: next,
                    data,
                });
                break;
            }
        }
        if let Some(message) = message {
            if sub.backpressure {
                proc.room.notify_waiters();
            }
            if sub.conn.send(message).await.is_err() {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_keep_offsets_through_trims_and_drops() {
        let mut log = OutputLog::new(8, None);
        assert!(log.append(b"hello", None));
        assert_eq!((log.start, log.end()), (0, 5));
        log.append(b" world", None);
        // Over the cap: the oldest bytes go, offsets stay true.
        assert_eq!((log.start, log.end()), (3, 11));
        assert_eq!(log.read(3, 100), b"lo world");
        log.trim_to(9);
        assert_eq!(log.read(9, 100), b"ld");
        assert_eq!(log.produced, 11);
    }

    #[test]
    fn reads_across_the_ring_buffers_wrap_are_exact() {
        let mut log = OutputLog::new(64, None);
        let stream: Vec<u8> = (0..=255u8).cycle().take(2000).collect();
        let mut written = 0;
        for piece in stream.chunks(23) {
            log.append(piece, None);
            written += piece.len();
            for from in log.start..log.end() {
                for max in [1, 7, 64, 100] {
                    let from_i = from as usize;
                    let end = (from_i + max).min(written);
                    assert_eq!(log.read(from, max), &stream[from_i..end], "{from} {max}");
                }
            }
        }
    }

    #[test]
    fn a_holding_reader_keeps_what_it_has_not_read() {
        let mut log = OutputLog::new(4, None);
        log.append(b"abcd", Some(0));
        assert_eq!(log.room(0), None, "a full buffer ahead of the reader");
        assert_eq!(log.room(2), Some(2));
        log.append(b"ef", Some(2));
        // Read bytes go first; the unread ones stay.
        assert_eq!((log.start, log.read(2, 10)), (2, b"cdef".to_vec()));
    }

    #[test]
    fn logs_cut_at_max_output() {
        let mut log = OutputLog::new(1024, Some(4));
        log.append(b"abcdef", Some(0));
        assert_eq!(log.read(0, 100), b"abcd");
        assert!(log.truncated);
        assert!(!log.append(b"more", Some(0)));
        assert_eq!(log.produced, 10);
    }
}
