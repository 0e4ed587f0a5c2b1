//! Creating the sandbox's first process in new namespaces, and following it
//! with a pidfd.

use std::os::fd::{FromRawFd, OwnedFd};

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

/// `fork`, but into new namespaces: returns `None` in the child (PID 1 of
/// its PID namespace) and the child's host PID in the parent.
///
/// # Safety
/// The caller must be single-threaded: the child is a copy of the calling
/// thread only, exactly as after `fork`.
pub unsafe fn clone_into_namespaces(flags: libc::c_int) -> Result<Option<Pid>, Errno> {
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
        0 => Ok(None),
        pid => Ok(Some(Pid::from_raw(pid as i32))),
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
    use std::os::fd::AsRawFd;
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
    use std::os::fd::AsRawFd;
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
