//! The sandbox factory: one single-threaded helper process, started with
//! the daemon, that forks a creator for each namespace sandbox.
//!
//! `cove_isolate::create` must run in a single-threaded process, and the
//! daemon is not one. Running `cove __create-sandbox` for every sandbox
//! works, but executing the (large) cove binary costs milliseconds per
//! sandbox. The factory is executed once; for each sandbox the daemon
//! hands it one end of a fresh socket pair, and a forked copy of the
//! factory (already loaded, still single-threaded) speaks the helper's
//! protocol on it: the configuration in, until the daemon shuts its side
//! for writing; `{"record": …}` or `{"error": …}` out; then it exits.
//!
//! ```text
//!   daemon ── socketpair end (SCM_RIGHTS) ──▶ factory ── fork ──▶ creator
//!      ◀──────────── config / reply over the pair ───────────────────┘
//! ```
//!
//! The factory leaves when the daemon's end of its control socket closes
//! (the daemon exited or was killed). Creators are reaped by the kernel
//! (`SIGCHLD` ignored in the factory); the agents they leave are orphans
//! that, as with the one-shot helper, the daemon (a child subreaper) reaps.
//! Should the factory be gone, the daemon starts another, and should that
//! fail, it falls back to the one-shot helper.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::sys::socket::{ControlMessage, ControlMessageOwned, MsgFlags, recvmsg, sendmsg};

use super::namespace::create_from;

/// The only variable of the factory's (and so every agent's) environment,
/// besides `COVE_LOG` when the daemon has it.
pub(super) const AGENT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `cove __sandbox-factory`: serve creation requests on fd 0 (a Unix
/// socket to the daemon) until it closes. Called from `main` before any
/// thread exists.
pub fn factory_main() -> i32 {
    // Creators exit on their own; nobody waits for them.
    // SAFETY: setting a signal disposition in a single-threaded process.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    loop {
        let fd = match receive_fd(0) {
            Ok(Some(fd)) => fd,
            Ok(None) => return 0,
            Err(nix::errno::Errno::EINTR) => continue,
            Err(err) => {
                eprintln!("cove sandbox factory: {err}");
                return 1;
            }
        };
        // SAFETY: this process is single-threaded, so the child may do
        // anything; it leaves with `exit`.
        match unsafe { nix::unistd::fork() } {
            Ok(nix::unistd::ForkResult::Child) => {
                // SAFETY: as above; the creator waits for its own children,
                // and the control socket is not its business (the fd 0 this
                // frees is filled again by `cove_isolate::create`).
                unsafe {
                    libc::signal(libc::SIGCHLD, libc::SIG_DFL);
                    libc::close(0);
                }
                std::process::exit(serve(UnixStream::from(fd)));
            }
            Ok(nix::unistd::ForkResult::Parent { .. }) => drop(fd),
            Err(err) => {
                let reply = serde_json::json!({
                    "error": format!("cannot fork a sandbox creator: {err}")
                });
                let _ = UnixStream::from(fd).write_all(reply.to_string().as_bytes());
            }
        }
    }
}

/// One creator: the configuration in, the reply out.
fn serve(mut stream: UnixStream) -> i32 {
    let mut input = Vec::new();
    let (reply, code) = match stream.read_to_end(&mut input) {
        Ok(_) => create_from(&input),
        Err(err) => (
            serde_json::json!({ "error": format!("reading the configuration: {err}") }),
            1,
        ),
    };
    let _ = stream.write_all(reply.to_string().as_bytes());
    code
}

/// Receive one descriptor; `None` when the daemon closed the socket.
fn receive_fd(socket: RawFd) -> Result<Option<OwnedFd>, nix::errno::Errno> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut space = nix::cmsg_space!([RawFd; 1]);
    let msg = recvmsg::<()>(
        socket,
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut received = None;
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(fds) = cmsg {
            for fd in fds {
                // SAFETY: the kernel just gave us this descriptor.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                received.get_or_insert(owned);
            }
        }
    }
    match (msg.bytes, received) {
        (0, _) => Ok(None),
        (_, Some(fd)) => Ok(Some(fd)),
        // A message without a descriptor: nothing to serve, wait again.
        (_, None) => receive_fd(socket),
    }
}

/// The daemon's side: a running factory and its control socket.
#[derive(Debug)]
pub struct Factory {
    binary: PathBuf,
    running: std::sync::Mutex<Option<Running>>,
}

#[derive(Debug)]
struct Running {
    control: UnixStream,
    child: Child,
}

impl Drop for Running {
    fn drop(&mut self) {
        // End of its control socket: the factory leaves at once.
        let _ = self.control.shutdown(std::net::Shutdown::Both);
        let _ = self.child.wait();
    }
}

impl Factory {
    pub fn new(binary: &Path) -> Factory {
        Factory {
            binary: binary.to_path_buf(),
            running: std::sync::Mutex::new(None),
        }
    }

    /// Start the factory now, so that the first create does not wait for
    /// it; a failure is logged, and left to `creator` to retry.
    pub fn warm(&self) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        if running.is_none() {
            match self.start() {
                Ok(factory) => *running = Some(factory),
                Err(err) => tracing::warn!(%err, "cannot start the sandbox factory yet"),
            }
        }
    }

    /// A socket on which a fresh creator speaks the helper protocol, or
    /// `None` when no factory can be had (the caller then runs the
    /// one-shot helper).
    pub fn creator(&self) -> Option<UnixStream> {
        let (ours, theirs) = UnixStream::pair().ok()?;
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        // A factory that died is replaced once.
        for _ in 0..2 {
            if running.is_none() {
                *running = self
                    .start()
                    .map_err(|err| {
                        tracing::warn!(%err, "no sandbox factory; creating with one-shot helpers");
                    })
                    .ok();
            }
            let factory = running.as_ref()?;
            let sent = sendmsg::<()>(
                factory.control.as_raw_fd(),
                &[IoSlice::new(&[0])],
                &[ControlMessage::ScmRights(&[theirs.as_raw_fd()])],
                MsgFlags::MSG_NOSIGNAL,
                None,
            );
            match sent {
                Ok(_) => return Some(ours),
                Err(err) => {
                    tracing::warn!(%err, "the sandbox factory is gone; starting another");
                    *running = None;
                }
            }
        }
        None
    }

    fn start(&self) -> std::io::Result<Running> {
        let (control, theirs) = UnixStream::pair()?;
        let mut command = Command::new(&self.binary);
        // Sandboxes' agents are forked from the factory and keep its
        // environment block (`/proc/1/environ` in the sandbox): none of the
        // daemon's variables, which may hold secrets, go with it.
        command.env_clear().env("PATH", AGENT_PATH);
        if let Some(filter) = std::env::var_os("COVE_LOG") {
            command.env("COVE_LOG", filter);
        }
        let child = command
            .arg("__sandbox-factory")
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        Ok(Running { control, child })
    }
}
