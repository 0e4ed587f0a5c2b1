//! File operations on an [`AgentClient`]: one-shot calls, downloads with
//! credit, uploads with acknowledgements, and watches.
//!
//! Each operation has its own route (an unbounded channel fed by the
//! connection's reader task). The channel stays small because the agent
//! sends data only within the credit granted here, and credit is returned
//! only as the caller consumes. Dropping a handle before the operation is
//! over cancels it in the agent (an upload is then rolled back).

use std::collections::HashMap;

use tokio::sync::mpsc;

use super::{AgentClient, ClientError, lock};
use crate::fs::{
    FS_UPLOAD_WINDOW, FS_WATCH_WINDOW, FS_WINDOW, FsDone, FsEntry, FsEvent, FsOp, FsReply,
    FsRequest,
};
use crate::{HostMessage, MAX_CHUNK};

/// Where the replies of each open file operation go.
#[derive(Debug, Default)]
pub(super) struct FsRoutes {
    next_req: u32,
    open: HashMap<u32, mpsc::UnboundedSender<FsReply>>,
}

impl FsRoutes {
    pub(super) fn route(&mut self, req: u32, msg: FsReply) {
        let last = matches!(msg, FsReply::Done(_));
        if let Some(tx) = self.open.get(&req) {
            let _ = tx.send(msg);
        }
        if last {
            self.open.remove(&req);
        }
    }

    /// The connection is gone: every open operation sees its channel close.
    pub(super) fn clear(&mut self) {
        self.open.clear();
    }
}

/// One open operation's replies; cancels the operation if dropped early.
#[derive(Debug)]
struct Handle {
    req: u32,
    client: AgentClient,
    replies: mpsc::UnboundedReceiver<FsReply>,
    finished: bool,
}

impl Handle {
    async fn send(&self, msg: FsRequest) -> Result<(), ClientError> {
        self.client
            .send(HostMessage::Fs { req: self.req, msg })
            .await
    }

    async fn next(&mut self) -> Result<FsReply, ClientError> {
        match self.replies.recv().await {
            Some(reply) => {
                if matches!(reply, FsReply::Done(_)) {
                    self.finished = true;
                }
                Ok(reply)
            }
            None => {
                self.finished = true;
                Err(self.client.lost())
            }
        }
    }

    /// Skip progress messages until the final answer.
    async fn done(&mut self) -> Result<FsDone, ClientError> {
        loop {
            if let FsReply::Done(result) = self.next().await? {
                return result.map_err(ClientError::Fs);
            }
        }
    }

    /// Wait for `Ready` (or the error that replaces it).
    async fn ready(&mut self) -> Result<Option<FsEntry>, ClientError> {
        loop {
            match self.next().await? {
                FsReply::Ready { entry } => return Ok(entry),
                FsReply::Done(Err(err)) => return Err(ClientError::Fs(err)),
                FsReply::Done(Ok(_)) => {
                    return Err(ClientError::Agent(
                        "the agent ended the operation before it started".into(),
                    ));
                }
                _ => {}
            }
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.client.outbound.try_send(HostMessage::Fs {
                req: self.req,
                msg: FsRequest::Cancel,
            });
        }
        lock(&self.client.shared).fs.open.remove(&self.req);
    }
}

fn unexpected(what: &FsDone) -> ClientError {
    ClientError::Agent(format!("unexpected answer from the agent: {what:?}"))
}

impl AgentClient {
    async fn fs_start(&self, op: FsOp) -> Result<Handle, ClientError> {
        let (tx, replies) = mpsc::unbounded_channel();
        let req = {
            let mut routes = lock(&self.shared);
            if let Some(reason) = &routes.closed {
                return Err(ClientError::Closed(reason.clone()));
            }
            let fs = &mut routes.fs;
            let mut req = fs.next_req.wrapping_add(1);
            while fs.open.contains_key(&req) {
                req = req.wrapping_add(1);
            }
            fs.next_req = req;
            fs.open.insert(req, tx);
            req
        };
        let handle = Handle {
            req,
            client: self.clone(),
            replies,
            finished: false,
        };
        handle.send(FsRequest::Start(op)).await?;
        Ok(handle)
    }

    /// Describe `path`; with `follow`, a final symlink is followed.
    pub async fn fs_stat(&self, path: &str, follow: bool) -> Result<FsEntry, ClientError> {
        let op = FsOp::Stat {
            path: path.into(),
            follow,
        };
        match self.fs_start(op).await?.done().await? {
            FsDone::Entry(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }

    /// The entries under directory `path`, `depth` levels down, at most
    /// `limit`; the flag says whether the limit cut the listing short.
    pub async fn fs_list(
        &self,
        path: &str,
        depth: u32,
        limit: u32,
    ) -> Result<(Vec<FsEntry>, bool), ClientError> {
        let op = FsOp::List {
            path: path.into(),
            depth,
            limit,
        };
        let mut handle = self.fs_start(op).await?;
        let mut all = Vec::new();
        loop {
            match handle.next().await? {
                FsReply::Entries { entries } => all.extend(entries),
                FsReply::Done(Ok(FsDone::Listed { truncated })) => return Ok((all, truncated)),
                FsReply::Done(Ok(other)) => return Err(unexpected(&other)),
                FsReply::Done(Err(err)) => return Err(ClientError::Fs(err)),
                _ => {}
            }
        }
    }

    /// Create directory `path` (and its parents with `parents`).
    pub async fn fs_mkdir(
        &self,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<FsEntry, ClientError> {
        let op = FsOp::Mkdir {
            path: path.into(),
            parents,
            mode,
        };
        match self.fs_start(op).await?.done().await? {
            FsDone::Entry(entry) => Ok(entry),
            other => Err(unexpected(&other)),
        }
    }

    /// Rename `from` to `to`.
    pub async fn fs_move(&self, from: &str, to: &str, overwrite: bool) -> Result<(), ClientError> {
        let op = FsOp::Move {
            from: from.into(),
            to: to.into(),
            overwrite,
        };
        self.fs_start(op).await?.done().await.map(drop)
    }

    /// Remove `path` (a directory tree with `recursive`).
    pub async fn fs_remove(&self, path: &str, recursive: bool) -> Result<(), ClientError> {
        let op = FsOp::Remove {
            path: path.into(),
            recursive,
        };
        self.fs_start(op).await?.done().await.map(drop)
    }

    /// Stream a regular file out of the sandbox.
    pub async fn fs_read(&self, path: &str) -> Result<FsDownload, ClientError> {
        let op = FsOp::Read {
            path: path.into(),
            window: FS_WINDOW,
        };
        FsDownload::open(self.fs_start(op).await?).await
    }

    /// Stream a tar archive of `path` out of the sandbox.
    pub async fn fs_tar_out(&self, path: &str) -> Result<FsDownload, ClientError> {
        let op = FsOp::TarOut {
            path: path.into(),
            window: FS_WINDOW,
        };
        FsDownload::open(self.fs_start(op).await?).await
    }

    /// Stream the sandbox's writable layer out as an image layer (see
    /// [`FsOp::WritableLayer`]); agents whose layer is on the host refuse.
    pub async fn fs_writable_layer(&self) -> Result<FsDownload, ClientError> {
        let op = FsOp::WritableLayer { window: FS_WINDOW };
        FsDownload::open(self.fs_start(op).await?).await
    }

    /// Create or replace a regular file; write it with [`FsUpload::write`]
    /// and commit it with [`FsUpload::finish`].
    pub async fn fs_write(&self, path: &str, mode: Option<u32>) -> Result<FsUpload, ClientError> {
        let op = FsOp::Write {
            path: path.into(),
            mode,
        };
        FsUpload::open(self.fs_start(op).await?).await
    }

    /// Extract a tar archive into directory `path`.
    pub async fn fs_tar_in(&self, path: &str) -> Result<FsUpload, ClientError> {
        let op = FsOp::TarIn { path: path.into() };
        FsUpload::open(self.fs_start(op).await?).await
    }

    /// Watch `path` for changes until the returned handle is dropped.
    pub async fn fs_watch(&self, path: &str, recursive: bool) -> Result<FsWatch, ClientError> {
        let op = FsOp::Watch {
            path: path.into(),
            recursive,
            window: FS_WATCH_WINDOW,
        };
        let mut handle = self.fs_start(op).await?;
        handle.ready().await?;
        Ok(FsWatch {
            handle,
            consumed: 0,
        })
    }
}

/// Bytes coming out of the sandbox (a file or a tar archive).
#[derive(Debug)]
pub struct FsDownload {
    handle: Handle,
    entry: Option<FsEntry>,
    consumed: u64,
}

impl FsDownload {
    async fn open(mut handle: Handle) -> Result<FsDownload, ClientError> {
        let entry = handle.ready().await?;
        Ok(FsDownload {
            handle,
            entry,
            consumed: 0,
        })
    }

    /// What is being sent: for a file, its size is exactly the number of
    /// bytes that follow.
    pub fn entry(&self) -> Option<&FsEntry> {
        self.entry.as_ref()
    }

    /// The next chunk, or `None` once everything arrived. An error in the
    /// middle (the file shrank, a read failed) is an error here, never a
    /// silently short stream.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, ClientError> {
        if self.handle.finished {
            return Ok(None);
        }
        loop {
            match self.handle.next().await? {
                FsReply::Data { data } => {
                    self.consumed += data.len() as u64;
                    if self.consumed >= FS_WINDOW / 2 {
                        let amount = std::mem::take(&mut self.consumed);
                        self.handle.send(FsRequest::Credit { amount }).await?;
                    }
                    return Ok(Some(data));
                }
                FsReply::Done(Ok(_)) => return Ok(None),
                FsReply::Done(Err(err)) => return Err(ClientError::Fs(err)),
                _ => {}
            }
        }
    }

    /// Everything, in memory (for small files).
    pub async fn read_to_end(mut self) -> Result<Vec<u8>, ClientError> {
        let mut all = Vec::new();
        while let Some(chunk) = self.next_chunk().await? {
            all.extend_from_slice(&chunk);
        }
        Ok(all)
    }
}

/// Bytes going into the sandbox (a file or a tar archive).
#[derive(Debug)]
pub struct FsUpload {
    handle: Handle,
    in_flight: u64,
}

impl FsUpload {
    async fn open(mut handle: Handle) -> Result<FsUpload, ClientError> {
        handle.ready().await?;
        Ok(FsUpload {
            handle,
            in_flight: 0,
        })
    }

    /// Send `data`, waiting whenever too much is unacknowledged. Fails as
    /// soon as the agent reports an error (disk full, a bad tar entry).
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ClientError> {
        for chunk in data.chunks(MAX_CHUNK) {
            while self.in_flight + chunk.len() as u64 > FS_UPLOAD_WINDOW {
                self.wait_ack().await?;
            }
            self.in_flight += chunk.len() as u64;
            self.handle
                .send(FsRequest::Data {
                    data: chunk.to_vec(),
                })
                .await?;
        }
        Ok(())
    }

    async fn wait_ack(&mut self) -> Result<(), ClientError> {
        loop {
            match self.handle.next().await? {
                FsReply::Ack { bytes } => {
                    self.in_flight = self.in_flight.saturating_sub(bytes);
                    return Ok(());
                }
                FsReply::Done(Err(err)) => return Err(ClientError::Fs(err)),
                FsReply::Done(Ok(other)) => return Err(unexpected(&other)),
                _ => {}
            }
        }
    }

    /// Commit: the agent puts the file (or the extracted entries) in place
    /// and answers with the result.
    pub async fn finish(mut self) -> Result<FsDone, ClientError> {
        self.handle.send(FsRequest::End).await?;
        self.handle.done().await
    }
}

/// Changes under a watched path.
#[derive(Debug)]
pub struct FsWatch {
    handle: Handle,
    consumed: u64,
}

impl FsWatch {
    /// The next change; `None` when the watch ended (its path was removed).
    pub async fn next_event(&mut self) -> Result<Option<FsEvent>, ClientError> {
        if self.handle.finished {
            return Ok(None);
        }
        loop {
            match self.handle.next().await? {
                FsReply::Event { event } => {
                    self.consumed += 1;
                    if self.consumed >= FS_WATCH_WINDOW / 2 {
                        let amount = std::mem::take(&mut self.consumed);
                        self.handle.send(FsRequest::Credit { amount }).await?;
                    }
                    return Ok(Some(event));
                }
                FsReply::Done(Ok(_)) => return Ok(None),
                FsReply::Done(Err(err)) => return Err(ClientError::Fs(err)),
                _ => {}
            }
        }
    }
}
