//! cove's namespace backend: a sandbox is a process tree in fresh mount,
//! PID, UTS, IPC, network and cgroup namespaces, on an overlay root, under
//! cgroup limits, with a reduced capability set, `no_new_privs` and a
//! seccomp filter. Its PID 1 is `cove-agent`.
//!
//! ```text
//!  create():  state dir ─▶ cgroups + limits ─▶ clone(NEWNS|NEWPID|NEWUTS|NEWIPC|NEWNET)
//!                                                   │ child (PID 1)
//!                                                   ├─ join cgroups, unshare(NEWCGROUP)
//!                                                   ├─ rootfs: tmpfs + overlay + binds + /proc /dev /sys, pivot_root
//!                                                   ├─ hostname, loopback
//!                                                   ├─ close stray fds, oom_score_adj -1000
//!                                                   ├─ capabilities, no_new_privs, seccomp
//!                                                   └─ "ready" on the status pipe ─▶ cove_agent::run
//!  destroy(): cgroup.kill / SIGKILL PID 1 ─▶ wait ─▶ rmdir cgroups ─▶ remove state dir
//! ```
//!
//! Mounts exist only inside the sandbox's mount namespace and vanish with
//! it; the cgroups and the state directory are removed by `destroy`.

pub mod capabilities;
pub mod cgroups;
pub mod namespaces;
pub mod network;
pub mod rootfs;
pub mod seccomp;

use std::fs;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{AddressFamily, SockFlag, SockType, socketpair};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use cgroups::{CgroupError, Layout, Limits, SandboxCgroup};
pub use rootfs::{Bind, RootfsSpec};

/// What the agent of a new sandbox is told.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSettings {
    pub env: Vec<(String, String)>,
    pub cwd: String,
    pub user: Option<String>,
}

/// Everything needed to create one sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SandboxConfig {
    /// The sandbox ID; also its hostname and its cgroup's name.
    pub id: String,
    pub rootfs: RootfsSpec,
    pub limits: Limits,
    /// A host directory owned by this sandbox (removed on destroy).
    pub state_dir: PathBuf,
    /// The cgroup directory sandboxes are created under, e.g. `cove`.
    pub cgroup_parent: String,
    pub agent: AgentSettings,
    /// Kill the sandbox if the creating thread exits (`cove run`).
    pub die_with_parent: bool,
    /// Also listen on `<state_dir>/agent.sock` (the daemon reconnects there).
    pub listen: bool,
    /// Where the agent's own diagnostics go (`/dev/null` when `None`).
    pub agent_log: Option<PathBuf>,
    /// On a v1 (or hybrid) host, a cgroup in the memory, pids and cpu
    /// hierarchies even where no limit asks for one, so the sandbox's use
    /// can be read (the daemon reports it). `cove run` reads nothing and
    /// saves the directories.
    pub accounting: bool,
}

/// Errors of the namespace backend.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("cannot {action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the sandbox's namespaces: {0} (cove needs root, or CAP_SYS_ADMIN)")]
    Clone(nix::Error),
    #[error("sandbox setup failed: {0}")]
    Setup(String),
    #[error("{0}")]
    Sys(String),
}

/// Failures inside the new sandbox before its agent starts.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Mount(String),
    #[error("seccomp: {0}")]
    Seccomp(String),
    #[error("capabilities: {0}")]
    Capabilities(String),
    #[error("network: {0}")]
    Network(String),
    #[error(transparent)]
    Cgroup(#[from] CgroupError),
    #[error("{0}")]
    Other(String),
}

/// A running sandbox, as its creator (or a reattaching daemon) holds it.
#[derive(Debug)]
pub struct Sandbox {
    pub id: String,
    /// Host PID of the sandbox's PID 1 (the agent).
    pub pid: i32,
    pidfd: OwnedFd,
    /// Whether the agent is this process's child (must be reaped here).
    is_child: bool,
    pub cgroup: SandboxCgroup,
    pub state_dir: PathBuf,
    connection: Option<OwnedFd>,
}

/// The on-disk record of a sandbox, enough to find it again after a restart
/// or to clean up after a creator that died. `create` keeps it in
/// `<state_dir>/record.json` from the moment the cgroups exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxRecord {
    pub id: String,
    /// Host PID of the agent; 0 until it has been started.
    pub pid: i32,
    /// Host PID of the process that created the sandbox.
    pub owner: u32,
    pub cgroup: SandboxCgroup,
    pub state_dir: PathBuf,
}

impl SandboxRecord {
    fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("record.json")
    }

    /// Write the record. The first write goes straight to its place (the
    /// state directory is new, so no reader can see an older record);
    /// later ones replace it atomically.
    fn save(&self, first: bool) {
        if let Ok(json) = serde_json::to_vec(self) {
            if first {
                let _ = fs::write(Self::path(&self.state_dir), json);
                return;
            }
            let tmp = self.state_dir.join("record.json.tmp");
            if fs::write(&tmp, json).is_ok() {
                let _ = fs::rename(&tmp, Self::path(&self.state_dir));
            }
        }
    }

    /// Read the record in `state_dir`.
    pub fn load(state_dir: &Path) -> Option<SandboxRecord> {
        serde_json::from_slice(&fs::read(Self::path(state_dir)).ok()?).ok()
    }

    /// Remove whatever is left of a sandbox whose agent is gone (or never
    /// started): kill stragglers through the cgroup, remove the cgroups and
    /// the state directory. Use [`Sandbox::reattach`] + `destroy` when the
    /// agent may still run.
    pub fn clean_up(&self) -> Result<(), Error> {
        self.cgroup.kill_all();
        let _ = self.cgroup.set_frozen(false);
        let removed = self.cgroup.remove(Duration::from_secs(2));
        let _ = fs::remove_dir_all(&self.state_dir);
        Ok(removed?)
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// The agent's listening socket path in a state directory.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.sock")
}

/// Create a sandbox and start its agent.
///
/// The calling process must be single-threaded (call this before starting
/// any runtime, or from a dedicated helper process): the sandbox's PID 1 is
/// a fork of the caller.
pub fn create(config: &SandboxConfig, layout: &Layout) -> Result<Sandbox, Error> {
    if !valid_id(&config.id) {
        return Err(Error::Config(format!(
            "sandbox ID {:?} must be 1-64 lowercase letters, digits or '-'",
            config.id
        )));
    }
    if !cgroups::valid_parent(&config.cgroup_parent) {
        return Err(Error::Config(format!(
            "cgroup parent {:?} is not a plain relative path",
            config.cgroup_parent
        )));
    }
    occupy_stdio()?;
    let state_dir = &config.state_dir;
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(state_dir)
        .map_err(|source| Error::Io {
            action: "create",
            path: state_dir.clone(),
            source,
        })?;
    let cleanup_dir = || {
        let _ = fs::remove_dir_all(state_dir);
    };

    let cgroup = match SandboxCgroup::create(
        layout,
        &config.cgroup_parent,
        &config.id,
        &config.limits,
        config.accounting,
    ) {
        Ok(cg) => cg,
        Err(err) => {
            cleanup_dir();
            return Err(err.into());
        }
    };
    let mut record = SandboxRecord {
        id: config.id.clone(),
        pid: 0,
        owner: std::process::id(),
        cgroup: cgroup.clone(),
        state_dir: state_dir.clone(),
    };
    record.save(true);
    let fail = |err: Error| {
        let _ = cgroup.remove(Duration::from_secs(1));
        cleanup_dir();
        err
    };

    let programs = seccomp::programs().map_err(|e| fail(Error::Setup(e.to_string())))?;
    let (host_end, sandbox_end) = socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )
    .map_err(|e| fail(Error::Sys(format!("socketpair: {e}"))))?;
    let listener = if config.listen {
        let path = socket_path(state_dir);
        let _ = fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).map_err(|source| {
            fail(Error::Io {
                action: "listen on",
                path: path.clone(),
                source,
            })
        })?;
        Some(OwnedFd::from(listener))
    } else {
        None
    };
    let (status_read, status_write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| fail(Error::Sys(format!("pipe: {e}"))))?;

    // Born in its v2 cgroup where there is one (no migration needed).
    let v2_dir = cgroup.v2_dir().map(Path::to_path_buf);
    let v2_fd = v2_dir.as_deref().and_then(|dir| open_dir(dir).ok());
    // SAFETY: documented precondition of `create`: the caller is single-threaded.
    let forked = unsafe {
        namespaces::clone_into_namespaces(
            namespaces::CLONE_FLAGS,
            v2_fd.as_ref().map(|fd| fd.as_fd()),
        )
    };
    drop(v2_fd);
    let pid = match forked {
        Err(errno) => return Err(fail(Error::Clone(errno))),
        Ok(namespaces::Forked::Child { in_cgroup }) => {
            drop(host_end);
            drop(status_read);
            let joined = if in_cgroup { v2_dir.as_deref() } else { None };
            let code = sandbox_main(
                config,
                &cgroup,
                joined,
                &programs,
                sandbox_end,
                listener,
                status_write,
            );
            // SAFETY: _exit skips the parent's atexit handlers and buffers,
            // which this copy of the process must not run twice.
            unsafe { libc::_exit(code) }
        }
        Ok(namespaces::Forked::Parent(pid)) => pid,
    };
    drop(sandbox_end);
    drop(listener);
    drop(status_write);

    let mut status = Vec::new();
    let _ = fs::File::from(status_read).read_to_end(&mut status);
    if status.first() != Some(&b'K') {
        let reason = match status.split_first() {
            Some((b'E', msg)) => String::from_utf8_lossy(msg).into_owned(),
            _ => "the sandbox's first process died during setup".to_string(),
        };
        let _ = nix::sys::wait::waitpid(pid, None);
        return Err(fail(Error::Setup(reason)));
    }
    let pidfd = match namespaces::pidfd_open(pid) {
        Ok(fd) => fd,
        Err(e) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            let _ = nix::sys::wait::waitpid(pid, None);
            return Err(fail(Error::Sys(format!("pidfd_open: {e}"))));
        }
    };
    // Only a sandbox that outlives its creator is ever found again by its
    // agent's PID; one bound to its creator (`cove run`) is cleaned up
    // through its cgroups, which the first record already names.
    if !config.die_with_parent {
        record.pid = pid.as_raw();
        record.save(false);
    }
    Ok(Sandbox {
        id: config.id.clone(),
        pid: pid.as_raw(),
        pidfd,
        is_child: true,
        cgroup,
        state_dir: state_dir.clone(),
        connection: Some(host_end),
    })
}

/// The sandbox's first process: set everything up, report, become the agent.
fn sandbox_main(
    config: &SandboxConfig,
    cgroup: &SandboxCgroup,
    joined: Option<&Path>,
    programs: &[seccompiler::BpfProgram],
    connection: OwnedFd,
    listener: Option<OwnedFd>,
    status: OwnedFd,
) -> i32 {
    if config.die_with_parent {
        // SAFETY: prctl on the calling process.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    }
    let mut keep = vec![connection.as_raw_fd(), status.as_raw_fd()];
    keep.extend(listener.as_ref().map(|l| l.as_raw_fd()));
    match setup(config, cgroup, joined, programs, &mut keep) {
        Ok((cgroups, oom_events)) => {
            let _ = nix::unistd::write(&status, b"K");
            drop(status);
            let agent = cove_agent::AgentConfig {
                hostname: config.id.clone(),
                env: config.agent.env.clone(),
                cwd: config.agent.cwd.clone(),
                user: config.agent.user.clone(),
                cgroups,
                oom_events,
                root: PathBuf::from("/"),
                writable_layer: None,
            };
            cove_agent::run(
                agent,
                cove_agent::Endpoints {
                    connected: Some(connection),
                    listener,
                },
            )
        }
        Err(err) => {
            let _ = nix::unistd::write(&status, format!("E{err}").as_bytes());
            1
        }
    }
}

fn open_dir(path: &Path) -> Result<OwnedFd, SetupError> {
    nix::fcntl::open(
        path,
        nix::fcntl::OFlag::O_DIRECTORY | nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
        nix::sys::stat::Mode::empty(),
    )
    .map_err(|e| SetupError::Other(format!("open {}: {e}", path.display())))
}

type AgentCgroups = (Option<cove_agent::ProcessCgroups>, Option<OwnedFd>);

fn setup(
    config: &SandboxConfig,
    cgroup: &SandboxCgroup,
    joined: Option<&Path>,
    programs: &[seccompiler::BpfProgram],
    keep: &mut Vec<RawFd>,
) -> Result<AgentCgroups, SetupError> {
    cgroup.join(joined)?;
    // SAFETY: unshare on the calling (only) thread.
    if unsafe { libc::unshare(libc::CLONE_NEWCGROUP) } < 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINVAL) {
            return Err(SetupError::Other(format!(
                "unshare(CLONE_NEWCGROUP): {err}"
            )));
        }
    }
    // Host paths must be opened before the root changes.
    let process_cgroups = match &cgroup.kill {
        Some((dir, kind)) => {
            let fd = open_dir(dir)?;
            keep.push(fd.as_raw_fd());
            Some(cove_agent::ProcessCgroups {
                dir: fd,
                kind: (*kind).into(),
            })
        }
        None => None,
    };
    let oom_events = match &cgroup.oom_events {
        Some(path) => {
            let fd = nix::fcntl::open(
                path,
                nix::fcntl::OFlag::O_RDONLY | nix::fcntl::OFlag::O_CLOEXEC,
                nix::sys::stat::Mode::empty(),
            )
            .map_err(|e| SetupError::Other(format!("open {}: {e}", path.display())))?;
            keep.push(fd.as_raw_fd());
            Some(fd)
        }
        None => None,
    };
    let log = match &config.agent_log {
        Some(path) => Some(
            fs::File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| SetupError::Other(format!("open {}: {e}", path.display())))?,
        ),
        None => None,
    };

    rootfs::hold_locks(&config.rootfs.locks, keep)?;
    // The sandbox's own tmpfs goes over its state directory, in its own
    // mount namespace only: the host keeps seeing the record.
    rootfs::enter(&config.rootfs, &config.state_dir)?;
    keep.push(rootfs::UPPER_FD);
    nix::unistd::sethostname(&config.id)
        .map_err(|e| SetupError::Other(format!("sethostname: {e}")))?;
    network::loopback_up()?;

    // stdio: /dev/null in, the log (or /dev/null) out.
    let null = fs::File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| SetupError::Other(format!("open /dev/null: {e}")))?;
    let out = log.as_ref().map_or(null.as_raw_fd(), |l| l.as_raw_fd());
    // SAFETY: dup2 onto the standard descriptors.
    unsafe {
        libc::dup2(null.as_raw_fd(), 0);
        libc::dup2(out, 1);
        libc::dup2(out, 2);
    }
    drop(null);
    drop(log);
    close_stray_fds(keep);

    // Keep the OOM killer off the agent. Lowering the score needs
    // CAP_SYS_RESOURCE, which some hosts withhold even from root; the agent
    // then raises its children's scores instead (see cove-agent).
    let _ = std::fs::write("/proc/self/oom_score_adj", "-1000");
    capabilities::restrict()?;
    seccomp::apply(programs)?;
    Ok((process_cgroups, oom_events))
}

/// Open `/dev/null` on whichever of fds 0-2 is closed (a caller started
/// with `<&-`), so that no descriptor the sandbox keeps lands there: its
/// agent replaces 0-2 with its own stdio.
fn occupy_stdio() -> Result<(), Error> {
    for fd in 0..=2 {
        // SAFETY: F_GETFD only asks whether the descriptor is open.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
            continue;
        }
        let null = fs::File::options()
            .read(true)
            .write(true)
            .open("/dev/null")
            .map_err(|source| Error::Io {
                action: "open",
                path: PathBuf::from("/dev/null"),
                source,
            })?;
        let raw = null.as_raw_fd();
        if raw == fd {
            // The lowest free descriptor is this one: keep it open.
            let _ = std::os::fd::IntoRawFd::into_raw_fd(null);
        } else {
            // SAFETY: dup2 onto a descriptor that is closed.
            unsafe { libc::dup2(raw, fd) };
        }
    }
    Ok(())
}

/// Close every descriptor above 2 that is not in `keep`: the sandbox must
/// not inherit whatever its creator had open.
fn close_stray_fds(keep: &[RawFd]) {
    let Ok(dir) = fs::read_dir("/proc/self/fd") else {
        return;
    };
    let fds: Vec<RawFd> = dir
        .flatten()
        .filter_map(|e| e.file_name().to_str().and_then(|s| s.parse().ok()))
        .filter(|fd| *fd > 2 && !keep.contains(fd))
        .collect();
    for fd in fds {
        // SAFETY: closing descriptors this process does not use; the one
        // the directory iterator used is already closed (EBADF is harmless).
        unsafe { libc::close(fd) };
    }
}

impl Sandbox {
    /// Take the host end of the socketpair to the agent (once).
    pub fn take_connection(&mut self) -> Option<OwnedFd> {
        self.connection.take()
    }

    /// The record that finds this sandbox again after a restart.
    pub fn record(&self) -> SandboxRecord {
        SandboxRecord {
            id: self.id.clone(),
            pid: self.pid,
            owner: std::process::id(),
            cgroup: self.cgroup.clone(),
            state_dir: self.state_dir.clone(),
        }
    }

    /// Find a sandbox again from its record. Fails if its agent is gone or
    /// the PID now belongs to another process.
    pub fn reattach(record: SandboxRecord) -> Result<Sandbox, Error> {
        let pid = Pid::from_raw(record.pid);
        let pidfd = namespaces::pidfd_open(pid).map_err(|e| {
            Error::Sys(format!(
                "the sandbox's agent (pid {}) is gone: {e}",
                record.pid
            ))
        })?;
        // The PID could have been reused: the agent must sit in the sandbox's cgroup.
        let cgroups =
            fs::read_to_string(format!("/proc/{}/cgroup", record.pid)).unwrap_or_default();
        let marker = format!("/{}", record.id);
        if !cgroups.lines().any(|l| l.ends_with(&marker)) {
            return Err(Error::Sys(format!(
                "pid {} is no longer the agent of sandbox {}",
                record.pid, record.id
            )));
        }
        Ok(Sandbox {
            id: record.id,
            pid: record.pid,
            pidfd,
            is_child: false,
            cgroup: record.cgroup,
            state_dir: record.state_dir,
            connection: None,
        })
    }

    /// The pidfd of the sandbox's agent: readable once it has exited.
    pub fn pidfd(&self) -> &OwnedFd {
        &self.pidfd
    }

    /// Whether the sandbox's agent is still running.
    pub fn is_alive(&self) -> bool {
        !namespaces::pidfd_wait_exit(&self.pidfd, 0)
    }

    /// Freeze every process of the sandbox.
    pub fn pause(&self) -> Result<(), Error> {
        Ok(self.cgroup.set_frozen(true)?)
    }

    /// Thaw the sandbox.
    pub fn resume(&self) -> Result<(), Error> {
        Ok(self.cgroup.set_frozen(false)?)
    }

    /// Kill everything in the sandbox and remove what it left on the host.
    /// Blocks until the processes are gone (milliseconds).
    pub fn destroy(self) -> Result<(), Error> {
        self.cgroup.kill_all();
        let _ = namespaces::pidfd_signal(&self.pidfd, libc::SIGKILL);
        // A frozen sandbox cannot die until it is thawed.
        let _ = self.cgroup.set_frozen(false);
        if self.is_child {
            while let Err(nix::errno::Errno::EINTR) =
                nix::sys::wait::waitpid(Pid::from_raw(self.pid), None)
            {}
        } else {
            namespaces::pidfd_wait_exit(&self.pidfd, 10_000);
            // A daemon that is a child subreaper inherits orphaned agents:
            // reap ours if it is (ECHILD otherwise, which is fine).
            namespaces::pidfd_reap(&self.pidfd);
        }
        let removed = self.cgroup.remove(Duration::from_secs(5));
        let _ = fs::remove_dir_all(&self.state_dir);
        Ok(removed?)
    }
}
