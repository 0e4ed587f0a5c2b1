//! File operations for the host: stat, list, read, write, mkdir, move,
//! remove, tar out and in, and watches (see [`cove_protocol::fs`]).
//!
//! Each operation runs on a thread of its own, so a slow disk or a large
//! tree never stalls the agent's event loop (which keeps moving process
//! output). The event loop only routes the host's messages to the
//! operation's [`control::Control`]; the thread answers on the
//! connection's queue directly. Every path is resolved with the rules in
//! [`path`], which keep it inside the sandbox.

mod archive;
mod control;
mod ops;
mod path;
mod transfer;
mod watch;

#[cfg(test)]
mod tests;

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use cove_protocol::AgentMessage;
use cove_protocol::fs::{FsError, FsErrorKind, FsOp, FsReply, FsRequest};

use crate::ConnTx;
use control::{Control, Ctx};
use ops::Owner;
use path::Root;

/// Most file operations running at once, over all connections.
const MAX_OPERATIONS: usize = 64;

struct Connection {
    tx: ConnTx,
    ops: HashMap<u32, Arc<Control>>,
}

/// The file operations of one agent.
pub(crate) struct Files {
    root: Result<Arc<Root>, FsError>,
    /// The writable layer, when the agent is the one to read it (microVMs).
    layer: Option<Arc<Root>>,
    /// The sandbox's root as a path, for reading its /etc/passwd.
    root_path: PathBuf,
    /// The sandbox's default user, who owns what uploads create.
    user: Option<String>,
    /// The sandbox's hostname, for the greeting of transfer connections.
    hostname: String,
    connections: RefCell<Vec<Connection>>,
}

impl Files {
    pub(crate) fn new(
        root: &std::path::Path,
        cwd: &str,
        user: Option<String>,
        hostname: String,
        layer: Option<std::os::fd::OwnedFd>,
    ) -> Files {
        Files {
            root: Root::open(root, cwd).map(Arc::new),
            layer: layer.map(|fd| Arc::new(Root::from_fd(fd))),
            root_path: root.to_path_buf(),
            user,
            hostname,
            connections: RefCell::default(),
        }
    }

    /// If `stream` is a transfer connection (one bulk upload or download,
    /// see [`cove_protocol::fs::TRANSFER_CLIENT`]), serve it on a thread
    /// and return `None`; otherwise hand it back unread.
    pub(crate) async fn take_transfer(
        &self,
        stream: tokio::net::UnixStream,
    ) -> Option<tokio::net::UnixStream> {
        let env = self.root.as_ref().ok().map(|root| transfer::TransferEnv {
            root: root.clone(),
            root_path: self.root_path.clone(),
            user: self.user.clone(),
            hostname: self.hostname.clone(),
        });
        transfer::take(env, stream).await
    }

    fn control(&self, tx: &ConnTx, req: u32) -> Option<Arc<Control>> {
        self.connections
            .borrow()
            .iter()
            .find(|c| c.tx.same_channel(tx))
            .and_then(|c| c.ops.get(&req).cloned())
    }

    /// Route one message from the host.
    pub(crate) async fn handle(&self, req: u32, msg: FsRequest, tx: &ConnTx) {
        match msg {
            FsRequest::Start(op) => {
                if let Err(err) = self.start(req, op, tx) {
                    let msg = FsReply::Done(Err(err));
                    let _ = tx.send(AgentMessage::Fs { req, msg }).await;
                }
            }
            FsRequest::Data { data } => {
                if let Some(ctl) = self.control(tx, req) {
                    ctl.push(data);
                }
            }
            FsRequest::End => {
                if let Some(ctl) = self.control(tx, req) {
                    ctl.end();
                }
            }
            FsRequest::Credit { amount } => {
                if let Some(ctl) = self.control(tx, req) {
                    ctl.add_credit(amount);
                }
            }
            FsRequest::Cancel => {
                if let Some(ctl) = self.control(tx, req) {
                    ctl.cancel();
                }
            }
        }
    }

    fn start(&self, req: u32, op: FsOp, tx: &ConnTx) -> Result<(), FsError> {
        let root = match &op {
            FsOp::WritableLayer { .. } => self.layer.clone().ok_or_else(|| {
                FsError::new(
                    FsErrorKind::Invalid,
                    "this sandbox's writable layer is on the host, which snapshots it itself",
                )
            })?,
            _ => self.root.clone()?,
        };
        let (root_path, user) = (self.root_path.clone(), self.user.clone());
        let ctl = Control::new(match &op {
            FsOp::Read { window, .. }
            | FsOp::TarOut { window, .. }
            | FsOp::WritableLayer { window }
            | FsOp::Watch { window, .. } => *window,
            _ => 0,
        });
        {
            let mut connections = self.connections.borrow_mut();
            let mut running = 0;
            for conn in connections.iter_mut() {
                conn.ops.retain(|_, ctl| !ctl.is_finished());
                running += conn.ops.len();
            }
            if running >= MAX_OPERATIONS {
                return Err(FsError::new(
                    FsErrorKind::Busy,
                    format!(
                        "{MAX_OPERATIONS} file operations are already running in this sandbox; try again when one ends"
                    ),
                ));
            }
            let index = match connections.iter().position(|c| c.tx.same_channel(tx)) {
                Some(i) => i,
                None => {
                    connections.push(Connection {
                        tx: tx.clone(),
                        ops: HashMap::new(),
                    });
                    connections.len() - 1
                }
            };
            let ops = &mut connections[index].ops;
            if ops.contains_key(&req) {
                return Err(path::invalid(format!(
                    "file operation {req} is still running on this connection"
                )));
            }
            ops.insert(req, ctl.clone());
        }
        let ctx = Ctx::new(req, tx.clone(), ctl.clone());
        let spawned = std::thread::Builder::new()
            .name(format!("cove-fs-{req}"))
            .spawn(move || {
                // Resolved on the operation's thread: reading the sandbox's
                // /etc/passwd must never stall the event loop.
                let owner = owner(&root_path, user.as_deref());
                let result = run(&root, &ctx, op, owner);
                ctx.finish(result);
            });
        if let Err(err) = spawned {
            ctl.cancel();
            self.forget(tx, req);
            return Err(FsError::new(
                FsErrorKind::Busy,
                format!(
                    "cannot start a thread for the operation (is the sandbox's pids limit reached?): {err}"
                ),
            ));
        }
        Ok(())
    }

    fn forget(&self, tx: &ConnTx, req: u32) {
        for conn in self.connections.borrow_mut().iter_mut() {
            if conn.tx.same_channel(tx) {
                conn.ops.remove(&req);
            }
        }
    }

    /// The connection behind `tx` closed: cancel its operations (an
    /// unfinished upload is rolled back).
    pub(crate) fn disconnected(&self, tx: &ConnTx) {
        self.connections.borrow_mut().retain(|conn| {
            if conn.tx.same_channel(tx) {
                for ctl in conn.ops.values() {
                    ctl.cancel();
                }
                false
            } else {
                true
            }
        });
    }
}

/// The sandbox's default user's uid and gid (`None` for root, or when the
/// user cannot be found).
fn owner(root: &std::path::Path, user: Option<&str>) -> Owner {
    match user {
        None | Some("root") | Some("0") | Some("0:0") => None,
        Some(user) => crate::users::resolve(root, user)
            .ok()
            .map(|id| (id.uid, id.gid)),
    }
}

/// Run one operation on its thread.
fn run(
    root: &Root,
    ctx: &Ctx,
    op: FsOp,
    owner: Owner,
) -> Result<cove_protocol::fs::FsDone, FsError> {
    use cove_protocol::fs::FsDone;
    match op {
        FsOp::Stat { path, follow } => ops::stat(root, &path, follow).map(FsDone::Entry),
        FsOp::List { path, depth, limit } => ops::list(root, ctx, &path, depth, limit),
        FsOp::Read { path, .. } => ops::read(root, ctx, &path),
        FsOp::Write { path, mode } => ops::write(root, ctx, &path, mode, owner),
        FsOp::Mkdir {
            path,
            parents,
            mode,
        } => ops::mkdir(root, &path, parents, mode, owner).map(FsDone::Entry),
        FsOp::Move {
            from,
            to,
            overwrite,
        } => ops::rename(root, &from, &to, overwrite).map(|()| FsDone::Ok),
        FsOp::Remove { path, recursive } => {
            ops::remove(root, ctx, &path, recursive).map(|()| FsDone::Ok)
        }
        FsOp::TarOut { path, .. } => archive::pack(root, ctx, &path),
        FsOp::WritableLayer { .. } => archive::pack_layer(root, ctx),
        FsOp::TarIn { path } => archive::unpack(root, ctx, &path, owner),
        FsOp::Watch {
            path, recursive, ..
        } => match watch::watch(root, ctx, &path, recursive) {
            // Cancelling is how a watch normally ends.
            Err(_) if ctx.is_cancelled() => Ok(FsDone::Ok),
            other => other,
        },
    }
}
