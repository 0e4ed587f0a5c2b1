//! Starting one sandboxed process (clone + exec).
//!
//! Everything the child needs is prepared beforehand (C strings, fds,
//! messages), so the child runs only async-signal-safe system calls. The
//! child puts itself in its own session and process group, joins its
//! per-process cgroup, takes its stdio, and drops to its user. A failure
//! before `exec` becomes a spawn error; a failure *of* `exec` is what a
//! shell would do: a message on the process's stderr and exit status 127
//! (not found) or 126 (not executable).

use std::ffi::CString;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::Path;

use nix::errno::Errno;
use nix::unistd::Pid;

use crate::users::Identity;

/// A fully prepared process, ready to start.
#[derive(Debug)]
pub struct Prepared {
    path: Option<CString>,
    argv: Vec<CString>,
    envp: Vec<CString>,
    cwd: CString,
    identity: Identity,
    not_found: Vec<u8>,
    not_executable: Vec<u8>,
}

/// The file descriptors the child takes as 0, 1 and 2.
#[derive(Debug)]
pub struct ChildStdio<'a> {
    pub stdin: &'a OwnedFd,
    pub stdout: &'a OwnedFd,
    pub stderr: &'a OwnedFd,
    /// Make stdin the controlling terminal (PTY processes).
    pub controlling_tty: bool,
}

/// The `oom_score_adj` for sandboxed processes: 0 when the agent could
/// protect itself with -1000, otherwise 500 so that under memory pressure
/// the kernel picks a sandboxed process long before the agent (which stays
/// at 0 and is small).
fn child_oom_score_adj() -> &'static [u8] {
    static VALUE: std::sync::OnceLock<&'static [u8]> = std::sync::OnceLock::new();
    VALUE.get_or_init(|| {
        let own = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap_or_default();
        match own.trim().parse::<i32>() {
            Ok(adj) if adj < 0 => b"0",
            _ => b"500",
        }
    })
}

/// The signals whose disposition in the agent is not the default (ignored,
/// or caught by a handler): the child resets them before it execs. Looked up
/// once, at the first spawn: by then the agent has set every disposition it
/// ever sets (SIGPIPE ignored, tokio's SIGCHLD handler, Rust's SIGSEGV and
/// SIGBUS handlers), and it also finds those it inherited. Resetting only
/// these spares the child ~30 system calls.
fn signals_to_reset() -> &'static [libc::c_int] {
    static SIGNALS: std::sync::OnceLock<Vec<libc::c_int>> = std::sync::OnceLock::new();
    SIGNALS.get_or_init(|| {
        (1..libc::SIGRTMIN())
            .filter(|&sig| sig != libc::SIGKILL && sig != libc::SIGSTOP)
            .filter(|&sig| {
                let mut old = empty_action();
                // SAFETY: a query (no new action) into a valid sigaction.
                let rc = unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) };
                rc != 0 || old.sa_sigaction != libc::SIG_DFL
            })
            .collect()
    })
}

fn empty_action() -> libc::sigaction {
    // SAFETY: sigaction is plain data; all-zero is SIG_DFL with no flags.
    unsafe { std::mem::zeroed() }
}

/// Setup steps in the child, reported on the error pipe.
const STEP_CWD: u32 = 1;
const STEP_GROUPS: u32 = 2;
const STEP_GID: u32 = 3;
const STEP_UID: u32 = 4;
const STEP_STDIO: u32 = 5;
const STEP_TTY: u32 = 6;

#[derive(Debug, thiserror::Error)]
pub enum SpawnFailure {
    #[error("{0}")]
    Invalid(String),
    #[error("cannot fork: {0} (is the sandbox's pids limit reached?)")]
    Fork(Errno),
    #[error("cannot enter working directory {cwd}: {errno}")]
    Cwd { cwd: String, errno: Errno },
    #[error("cannot switch to uid {uid} gid {gid}: {errno}")]
    Identity { uid: u32, gid: u32, errno: Errno },
    #[error("cannot set up the process's {what}: {errno}")]
    Setup { what: &'static str, errno: Errno },
}

fn cstring(what: &str, s: &str) -> Result<CString, SpawnFailure> {
    CString::new(s).map_err(|_| SpawnFailure::Invalid(format!("{what} contains a NUL byte")))
}

/// Search `PATH` the way `execvp` would, but before the child exists.
fn search_path(program: &str, env: &[(String, String)]) -> Option<String> {
    if program.contains('/') {
        return Some(program.to_string());
    }
    let path = env
        .iter()
        .rev()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or("/usr/local/bin:/usr/bin:/bin");
    path.split(':')
        .filter(|dir| !dir.is_empty())
        .find_map(|dir| {
            let candidate = Path::new(dir).join(program);
            let meta = std::fs::metadata(&candidate).ok()?;
            use std::os::unix::fs::PermissionsExt;
            (meta.is_file() && meta.permissions().mode() & 0o111 != 0)
                .then(|| candidate.to_string_lossy().into_owned())
        })
}

impl Prepared {
    pub fn new(
        argv: &[String],
        env: &[(String, String)],
        cwd: &str,
        identity: Identity,
    ) -> Result<Prepared, SpawnFailure> {
        let Some(program) = argv.first() else {
            return Err(SpawnFailure::Invalid("the command is empty".into()));
        };
        if program.is_empty() {
            return Err(SpawnFailure::Invalid(
                "the command's program name is empty".into(),
            ));
        }
        let path = search_path(program, env)
            .map(|p| cstring("the program path", &p))
            .transpose()?;
        let argv = argv
            .iter()
            .map(|a| cstring("an argument", a))
            .collect::<Result<_, _>>()?;
        let envp = env
            .iter()
            .map(|(k, v)| {
                if k.is_empty() || k.contains('=') {
                    return Err(SpawnFailure::Invalid(format!(
                        "environment variable name {k:?} is empty or contains '='"
                    )));
                }
                cstring("an environment variable", &format!("{k}={v}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(Prepared {
            path,
            argv,
            envp,
            cwd: cstring("the working directory", cwd)?,
            identity,
            not_found: format!("{program}: command not found\n").into_bytes(),
            not_executable: format!(
                "{program}: cannot execute: permission denied or not a program\n"
            )
            .into_bytes(),
        })
    }

    /// Start the process. `cgroup_procs` is the open `cgroup.procs` of the
    /// process's own cgroup, joined by the child before it runs anything.
    ///
    /// The child shares the agent's memory and the agent waits until it has
    /// exec'd or exited (`CLONE_VM | CLONE_VFORK`, as `posix_spawn` does), so
    /// no page tables are copied; a setup failure is written straight into
    /// `report`, which the agent reads once the child is gone.
    pub fn spawn(
        &self,
        stdio: ChildStdio<'_>,
        cgroup_procs: Option<&OwnedFd>,
    ) -> Result<Pid, SpawnFailure> {
        let argv: Vec<*const libc::c_char> = self
            .argv
            .iter()
            .map(|a| a.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let envp: Vec<*const libc::c_char> = self
            .envp
            .iter()
            .map(|e| e.as_ptr())
            .chain(std::iter::once(std::ptr::null()))
            .collect();
        let groups: Vec<libc::gid_t> = self.identity.groups.clone();
        let fds = [
            stdio.stdin.as_raw_fd(),
            stdio.stdout.as_raw_fd(),
            stdio.stderr.as_raw_fd(),
        ];
        let cgroup_fd = cgroup_procs.map(|fd| fd.as_raw_fd());
        // Computed before the child runs: it may not allocate or read files.
        let _ = child_oom_score_adj();
        let mut report: [i32; 2] = [0, 0];
        let report_ptr = report.as_mut_ptr();
        let args = ChildArgs {
            path: self.path.as_ref().map(|p| p.as_ptr()),
            argv: argv.as_ptr(),
            envp: envp.as_ptr(),
            cwd: self.cwd.as_ptr(),
            uid: self.identity.uid,
            gid: self.identity.gid,
            groups: &groups,
            fds,
            ctty: stdio.controlling_tty,
            cgroup_fd,
            report: report_ptr,
            not_found: &self.not_found,
            not_executable: &self.not_executable,
            reset_signals: signals_to_reset(),
        };

        // Signals stay blocked until the child has reset every handler: it
        // shares our memory, so one of our handlers must never run in it.
        let mut all: libc::sigset_t = unsafe_zeroed();
        let mut saved: libc::sigset_t = unsafe_zeroed();
        let mut stack = vec![0u8; CHILD_STACK];
        // SAFETY: sigfillset/pthread_sigmask on valid sigset_t values.
        unsafe {
            libc::sigfillset(&mut all);
            libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut saved);
        }
        let callback = Box::new(|| -> isize {
            // SAFETY: runs in the vfork-style child; `child` never returns.
            unsafe { child(&args) }
        });
        // SAFETY: CLONE_VM|CLONE_VFORK suspends this thread until the child
        // execs or exits; the child runs on its own stack and only makes
        // async-signal-safe system calls.
        let result = unsafe {
            nix::sched::clone(
                callback,
                &mut stack,
                nix::sched::CloneFlags::CLONE_VM | nix::sched::CloneFlags::CLONE_VFORK,
                Some(libc::SIGCHLD),
            )
        };
        // SAFETY: restore the mask saved above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &saved, std::ptr::null_mut()) };
        let child = result.map_err(SpawnFailure::Fork)?;
        // SAFETY: the child has exec'd or exited; nobody else writes `report`.
        let [step, errno] = unsafe { std::ptr::read_volatile(report_ptr.cast::<[i32; 2]>()) };
        if step != 0 {
            let errno = Errno::from_raw(errno);
            return Err(match step as u32 {
                STEP_CWD => SpawnFailure::Cwd {
                    cwd: self.cwd.to_string_lossy().into_owned(),
                    errno,
                },
                STEP_GROUPS | STEP_GID | STEP_UID => SpawnFailure::Identity {
                    uid: self.identity.uid,
                    gid: self.identity.gid,
                    errno,
                },
                STEP_TTY => SpawnFailure::Setup {
                    what: "controlling terminal",
                    errno,
                },
                _ => SpawnFailure::Setup {
                    what: "stdio",
                    errno,
                },
            });
        }
        Ok(child)
    }
}

/// Stack of the short-lived child between clone and exec.
const CHILD_STACK: usize = 64 * 1024;

fn unsafe_zeroed() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; all-zero is a valid (empty) set.
    unsafe { std::mem::zeroed() }
}

struct ChildArgs<'a> {
    path: Option<*const libc::c_char>,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
    cwd: *const libc::c_char,
    uid: u32,
    gid: u32,
    groups: &'a [libc::gid_t],
    fds: [RawFd; 3],
    ctty: bool,
    cgroup_fd: Option<RawFd>,
    report: *mut i32,
    not_found: &'a [u8],
    not_executable: &'a [u8],
    reset_signals: &'a [libc::c_int],
}

/// # Safety
/// Must only be called in the vfork-style child created by `spawn`.
unsafe fn child(a: &ChildArgs<'_>) -> ! {
    // SAFETY: raw system calls on valid pointers prepared by the parent.
    unsafe {
        let fail = |step: u32| -> ! {
            let errno = *libc::__errno_location();
            std::ptr::write_volatile(a.report, step as i32);
            std::ptr::write_volatile(a.report.add(1), errno);
            libc::_exit(126);
        };

        // Default signal dispositions (the agent ignores SIGPIPE and has
        // handlers the process must not inherit), then an empty mask.
        for &sig in a.reset_signals {
            libc::signal(sig, libc::SIG_DFL);
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());

        libc::setsid();
        if let Some(fd) = a.cgroup_fd {
            // Best effort: without it the process group still bounds the tree.
            libc::write(fd, b"0".as_ptr().cast(), 1);
        }
        // The agent shields itself from the OOM killer; its children must
        // be the OOM killer's first choice instead.
        let adj = libc::open(
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if adj >= 0 {
            let value = child_oom_score_adj();
            libc::write(adj, value.as_ptr().cast(), value.len());
            libc::close(adj);
        }

        for (target, fd) in a.fds.iter().enumerate() {
            if libc::dup2(*fd, target as i32) < 0 {
                fail(STEP_STDIO);
            }
        }
        if a.ctty && libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
            fail(STEP_TTY);
        }
        if libc::chdir(a.cwd) < 0 {
            fail(STEP_CWD);
        }
        // Raw system calls, not libc's wrappers: once the agent has other
        // threads (file operations run on their own), glibc's setuid family
        // would try to switch every thread of the process it believes it is
        // in, from a child that only shares its memory.
        if libc::syscall(libc::SYS_setgroups, a.groups.len(), a.groups.as_ptr()) < 0 {
            fail(STEP_GROUPS);
        }
        if libc::syscall(libc::SYS_setgid, a.gid) < 0 {
            fail(STEP_GID);
        }
        if libc::syscall(libc::SYS_setuid, a.uid) < 0 {
            fail(STEP_UID);
        }

        let errno = match a.path {
            Some(path) => {
                libc::execve(path, a.argv, a.envp);
                *libc::__errno_location()
            }
            None => libc::ENOENT,
        };
        let (msg, code) = if errno == libc::ENOENT || errno == libc::ENOTDIR {
            (a.not_found, 127)
        } else {
            (a.not_executable, 126)
        };
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(code);
    }
}
