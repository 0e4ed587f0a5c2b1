//! Creating the sandbox's first process in new namespaces, and following it
//! with a pidfd.

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use nix::errno::Errno;
use nix::unistd::Pid;

/// The namespaces a sandbox gets at creation. The cgroup namespace is
/// entered later, after the process has joined its cgroups, so that its
/// cgroup root is the sandbox's own cgroup.
pub const CLONE_FLAGS: libc::c_int = libc::CLONE_NEWNS
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWNET;

/// `clone3`'s argument block (`struct clone_args` in linux/sched.h), up to
/// and including `cgroup`.
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// What [`clone_into_namespaces`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forked {
    /// This is the new process.
    Child {
        /// It was born in the cgroup that was asked for.
        in_cgroup: bool,
    },
    /// This is the caller; the new process has this host PID.
    Parent(Pid),
}

/// `fork`, but into new namespaces, and where a cgroup v2 directory is
/// given, born inside it (`CLONE_INTO_CGROUP`): no migration afterwards,
/// which would cost an RCU grace period under the kernel's global
/// threadgroup lock. Falls back to plain `clone` where `clone3` is missing
/// or filtered; the child then learns it still has to join.
///
/// # Safety
/// The caller must be single-threaded: the child is a copy of the calling
/// thread only, exactly as after `fork`.
pub unsafe fn clone_into_namespaces(
    flags: libc::c_int,
    cgroup: Option<BorrowedFd<'_>>,
) -> Result<Forked, Errno> {
    if let Some(cgroup) = cgroup {
        let args = CloneArgs {
            flags: flags as u64 | CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: cgroup.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: as for clone below: no new stack, so the child returns
        // here on a copy of the caller's stack, like fork.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match rc {
            0 => return Ok(Forked::Child { in_cgroup: true }),
            -1 => match Errno::last() {
                // No clone3, or a seccomp profile around us refuses it.
                Errno::ENOSYS | Errno::EPERM | Errno::EINVAL | Errno::EOPNOTSUPP => {}
                other => return Err(other),
            },
            pid => return Ok(Forked::Parent(Pid::from_raw(pid as i32))),
        }
    }
    // SAFETY: a fork-like clone (no new stack, SIGCHLD on exit); the caller
    // guarantees there are no other threads whose locks could be held.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            std::ptr::null_mut::<libc::c_void>(),
            std::ptr::null_mut::<libc::c_int>(),
            std::ptr::null_mut::<libc::c_int>(),
            0 as libc::c_ulong,
        )
    };
    match rc {
        -1 => Err(Errno::last()),
        0 => Ok(Forked::Child { in_cgroup: false }),
        pid => Ok(Forked::Parent(Pid::from_raw(pid as i32))),
    }
}

/// A pidfd for `pid`.
pub fn pidfd_open(pid: Pid) -> Result<OwnedFd, Errno> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: the kernel just returned this fd to us.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Send `signal` through a pidfd (immune to PID reuse).
pub fn pidfd_signal(pidfd: &OwnedFd, signal: i32) -> Result<(), Errno> {
    // SAFETY: pidfd_send_signal with a valid pidfd and no siginfo.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            signal,
            std::ptr::null::<u8>(),
            0,
        )
    };
    if rc < 0 { Err(Errno::last()) } else { Ok(()) }
}

/// Wait until the process behind `pidfd` has exited, up to `timeout_ms`
/// (-1 = forever). Returns whether it has.
pub fn pidfd_wait_exit(pidfd: &OwnedFd, timeout_ms: i32) -> bool {
    use std::os::fd::AsFd;
    let mut fds = [nix::poll::PollFd::new(
        pidfd.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let timeout = if timeout_ms < 0 {
        nix::poll::PollTimeout::NONE
    } else {
        nix::poll::PollTimeout::try_from(timeout_ms).unwrap_or(nix::poll::PollTimeout::MAX)
    };
    loop {
        match nix::poll::poll(&mut fds, timeout) {
            Ok(n) => return n > 0,
            Err(Errno::EINTR) => continue,
            Err(_) => return false,
        }
    }
}

/// Reap the process behind `pidfd` if it is an exited child of ours.
pub fn pidfd_reap(pidfd: &OwnedFd) {
    // SAFETY: waitid(P_PIDFD) writes one siginfo_t into valid memory.
    unsafe {
        let mut info: libc::siginfo_t = std::mem::zeroed();
        libc::waitid(
            libc::P_PIDFD,
            pidfd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG,
        );
    }
}
