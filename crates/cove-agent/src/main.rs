//! The agent as a standalone program. Backends normally start the agent
//! inside a sandbox themselves; this binary serves the same protocol on an
//! inherited socket (`--fd`) or a unix socket path (`--listen`), which is
//! how the agent is tested on its own and how a VM image runs it.

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;

fn usage() -> ! {
    eprintln!(
        "usage: cove-agent (--fd N | --listen PATH) [--hostname NAME] [--cwd DIR] [--env K=V]...\n\
         \x20      cove-agent --vm-init   (as PID 1 of a cove microVM)\n\
         Serves cove's agent protocol on a connected socket fd or a listening unix socket."
    );
    std::process::exit(2)
}

fn main() {
    // The kernel starts the agent as /init of a microVM with `--vm-init`
    // (after `--` on the kernel command line).
    if std::env::args().nth(1).as_deref() == Some("--vm-init") {
        cove_agent::vm_init::main();
    }
    let mut args = std::env::args().skip(1);
    let mut endpoints = cove_agent::Endpoints::default();
    let mut config = cove_agent::AgentConfig {
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        env: Vec::new(),
        cwd: "/".into(),
        user: None,
        cgroups: None,
        oom_events: None,
        root: PathBuf::from("/"),
        writable_layer: None,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage());
        match arg.as_str() {
            "--fd" => {
                let fd: i32 = value().parse().unwrap_or_else(|_| usage());
                if nix::fcntl::fcntl(unsafe_borrow(fd), nix::fcntl::FcntlArg::F_GETFD).is_err() {
                    eprintln!("cove-agent: fd {fd} is not open");
                    std::process::exit(2);
                }
                // SAFETY: the fd was inherited for us and is open (checked above).
                endpoints.connected = Some(unsafe { OwnedFd::from_raw_fd(fd) });
            }
            "--listen" => {
                let path = PathBuf::from(value());
                let _ = std::fs::remove_file(&path);
                match std::os::unix::net::UnixListener::bind(&path) {
                    Ok(listener) => endpoints.listener = Some(OwnedFd::from(listener)),
                    Err(err) => {
                        eprintln!("cove-agent: cannot listen on {}: {err}", path.display());
                        std::process::exit(1);
                    }
                }
            }
            "--hostname" => config.hostname = value(),
            "--cwd" => config.cwd = value(),
            "--env" => {
                let kv = value();
                let Some((k, v)) = kv.split_once('=') else {
                    usage()
                };
                config.env.push((k.into(), v.into()));
            }
            _ => usage(),
        }
    }
    if endpoints.connected.is_none() && endpoints.listener.is_none() {
        usage();
    }
    std::process::exit(cove_agent::run(config, endpoints));
}

fn unsafe_borrow(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for an F_GETFD probe; an invalid fd yields EBADF.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}
