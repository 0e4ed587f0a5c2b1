//! One sandboxed process from spawn to exit: its stdio pumps, its stdin
//! queue, its timeout, and the exit report.
//!
//! Ordering: `Spawned` is sent before any task of the process exists, and
//! `Exited` only after every pump has returned, so a host sees `Spawned`,
//! then output, then `Exited`, and nothing after it.
//!
//! When the process exits, its pumps keep forwarding as long as data keeps
//! coming; once the pipes stay quiet for [`EXIT_GRACE`] (a background child
//! still holds them open) the pumps stop forwarding and a drain task
//! swallows the rest, so the background child never blocks or gets SIGPIPE.

use std::cell::{Cell, RefCell};
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::time::{Duration, Instant};

use cove_protocol::{
    AgentMessage, ExitStatus, MAX_CHUNK, ProcessSpec, SpawnError, SpawnErrorKind, Stream,
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

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

enum StdinCmd {
    Data(Vec<u8>),
    Close,
}

pub(crate) struct Proc {
    pid: u32,
    owner: RefCell<Option<ConnTx>>,
    credit: Cell<u64>,
    credit_changed: Notify,
    stdin: RefCell<Option<mpsc::UnboundedSender<StdinCmd>>>,
    pty: Option<OwnedFd>,
    cgroup: Option<String>,
    exited: watch::Sender<bool>,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.pid
    }

    /// The process group, which is the process itself (it called setsid).
    pub(crate) fn pgid(&self) -> i32 {
        self.pid as i32
    }

    fn owner(&self) -> Option<ConnTx> {
        self.owner.borrow().clone()
    }

    pub(crate) fn disown(&self, tx: &ConnTx) {
        let mut owner = self.owner.borrow_mut();
        if owner.as_ref().is_some_and(|o| o.same_channel(tx)) {
            *owner = None;
            self.credit_changed.notify_waiters();
        }
    }

    pub(crate) fn add_credit(&self, bytes: u64) {
        self.credit.set(self.credit.get().saturating_add(bytes));
        self.credit_changed.notify_waiters();
    }

    /// How many bytes a pump may read now; waits while the owner has
    /// granted no credit. Unowned processes are drained freely.
    async fn take_credit(&self) -> usize {
        loop {
            let changed = self.credit_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if self.owner.borrow().is_none() {
                return MAX_CHUNK;
            }
            let credit = self.credit.get();
            if credit > 0 {
                return credit.min(MAX_CHUNK as u64) as usize;
            }
            changed.await;
        }
    }

    pub(crate) async fn push_stdin(&self, data: Vec<u8>, tx: &ConnTx) {
        let len = data.len() as u64;
        let sent = self
            .stdin
            .borrow()
            .as_ref()
            .is_some_and(|q| q.send(StdinCmd::Data(data)).is_ok());
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
                    started.proc.disown(tx);
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
            Some(cgroups) => match cgroups.create(n) {
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
                self.release_cgroup(cgroup_name.as_deref());
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
        // Close the child's ends in the agent so pipes reach EOF when the
        // process tree is done with them.
        drop(pipes.child_stdin);
        drop(pipes.child_stdout);
        drop(pipes.child_stderr);

        let (stdin_tx, stdin_rx) = mpsc::unbounded_channel();
        let has_stdin = pipes.stdin.is_some();
        let proc = Rc::new(Proc {
            pid: pid.as_raw() as u32,
            owner: RefCell::new(Some(tx.clone())),
            credit: Cell::new(spec.window),
            credit_changed: Notify::new(),
            stdin: RefCell::new(has_stdin.then_some(stdin_tx)),
            pty: pipes.pty_master,
            cgroup: cgroup_name,
            exited: watch::channel(false).0,
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
        let mut pumps = vec![tokio::task::spawn_local(pump(
            proc.clone(),
            Stream::Stdout,
            stdout,
            spec.max_output,
        ))];
        if let Some(stderr) = stderr {
            pumps.push(tokio::task::spawn_local(pump(
                proc.clone(),
                Stream::Stderr,
                stderr,
                spec.max_output,
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
            for (i, pump) in pumps.into_iter().enumerate() {
                let (bytes, truncated) = pump.await.unwrap_or((0, false));
                if i == 0 {
                    (status.stdout_bytes, status.stdout_truncated) = (bytes, truncated);
                } else {
                    (status.stderr_bytes, status.stderr_truncated) = (bytes, truncated);
                }
            }
            if status.signal == Some(libc::SIGKILL) && !timed_out {
                let oom_after = self.config.oom_events.as_ref().and_then(read_oom_kills);
                status.oom_killed = matches!((oom_before, oom_after), (Some(a), Some(b)) if b > a);
            }
            self.procs.borrow_mut().remove(&proc.pid);
            if let Some(owner) = proc.owner() {
                let _ = owner
                    .send(AgentMessage::Exited {
                        pid: proc.pid,
                        status,
                    })
                    .await;
            }
            self.release_cgroup(proc.cgroup.as_deref());
        });
    }

    /// Remove a process's cgroup, or keep it for a later sweep while
    /// something it started still runs.
    fn release_cgroup(&self, name: Option<&str>) {
        if let (Some(cgroups), Some(name)) = (&self.config.cgroups, name)
            && cgroups.remove(name).is_err()
        {
            self.lingering.borrow_mut().push(name.to_string());
        }
    }

    /// SIGKILL the process group, then every member of the process's cgroup.
    pub(crate) fn kill_tree(&self, proc: &Proc) {
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(proc.pgid()),
            nix::sys::signal::Signal::SIGKILL,
        );
        if let (Some(cgroups), Some(name)) = (&self.config.cgroups, &proc.cgroup) {
            cgroups.kill(name);
        }
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

/// Forward one output stream. Returns (bytes produced, truncated).
async fn pump(proc: Rc<Proc>, stream: Stream, fd: OwnedFd, cap: Option<u64>) -> (u64, bool) {
    let fd = match fdio::async_fd(fd) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(%err, "cannot watch an output pipe");
            return (0, false);
        }
    };
    let mut exited = proc.exited.subscribe();
    let mut buf = vec![0u8; MAX_CHUNK];
    let (mut produced, mut forwarded, mut truncated) = (0u64, 0u64, false);
    loop {
        let want = proc.take_credit().await;
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
        let offset = produced;
        produced += n as u64;
        let keep = match cap {
            Some(cap) => (cap.saturating_sub(forwarded)).min(n as u64) as usize,
            None => n,
        };
        if keep < n {
            truncated = true;
        }
        if keep == 0 {
            continue;
        }
        forwarded += keep as u64;
        if let Some(owner) = proc.owner() {
            proc.credit
                .set(proc.credit.get().saturating_sub(keep as u64));
            let data = buf[..keep].to_vec();
            if owner
                .send(AgentMessage::Output {
                    pid: proc.pid,
                    stream,
                    offset,
                    data,
                })
                .await
                .is_err()
            {
                proc.disown(&owner);
            }
        }
    }
    (produced, truncated)
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

async fn feed_stdin(
    proc: Rc<Proc>,
    fd: OwnedFd,
    mut queue: mpsc::UnboundedReceiver<StdinCmd>,
    is_pty: bool,
) {
    let fd = match fdio::async_fd(fd) {
        Ok(fd) => fd,
        Err(err) => {
            tracing::warn!(%err, "cannot watch a stdin pipe");
            return;
        }
    };
    let mut broken: Option<String> = None;
    while let Some(cmd) = queue.recv().await {
        match cmd {
            StdinCmd::Data(data) => {
                let bytes = data.len() as u64;
                if broken.is_none()
                    && let Err(err) = fdio::write_all(&fd, &data).await
                {
                    broken = Some(format!("the process closed its stdin ({err})"));
                }
                if let Some(owner) = proc.owner() {
                    let error = broken.clone();
                    let _ = owner
                        .send(AgentMessage::StdinAck {
                            pid: proc.pid,
                            bytes,
                            error,
                        })
                        .await;
                }
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
