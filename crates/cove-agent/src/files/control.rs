//! The link between one file operation's worker thread and the agent's
//! event loop: credit, upload chunks, cancellation, and the way back to
//! the host.
//!
//! The event loop only ever pushes into a [`Control`] (never blocks); the
//! worker thread waits on it. Memory stays bounded because the host keeps
//! at most its upload window unacknowledged, and downloads wait for credit.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use cove_protocol::fs::{FsError, FsErrorKind, FsReply};
use cove_protocol::{AgentMessage, MAX_CHUNK};

use crate::ConnTx;

#[derive(Debug, Default)]
struct State {
    credit: u64,
    cancelled: bool,
    finished: bool,
    chunks: VecDeque<Vec<u8>>,
    ended: bool,
}

/// Shared between the event loop and one operation's thread.
#[derive(Debug, Default)]
pub(crate) struct Control {
    state: Mutex<State>,
    changed: Condvar,
}

impl Control {
    pub(crate) fn new(credit: u64) -> Arc<Control> {
        Arc::new(Control {
            state: Mutex::new(State {
                credit,
                ..State::default()
            }),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn update(&self, f: impl FnOnce(&mut State)) {
        f(&mut self.lock());
        self.changed.notify_all();
    }

    pub(crate) fn add_credit(&self, amount: u64) {
        self.update(|s| s.credit = s.credit.saturating_add(amount));
    }

    pub(crate) fn push(&self, data: Vec<u8>) {
        self.update(|s| {
            if !s.ended && !s.cancelled {
                s.chunks.push_back(data);
            }
        });
    }

    pub(crate) fn end(&self) {
        self.update(|s| s.ended = true);
    }

    pub(crate) fn cancel(&self) {
        self.update(|s| {
            s.cancelled = true;
            s.chunks.clear();
        });
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.lock().finished
    }

    fn mark_finished(&self) {
        self.update(|s| {
            s.finished = true;
            s.chunks.clear();
        });
    }
}

/// The error an operation ends with once it was cancelled.
pub(crate) fn cancelled() -> FsError {
    FsError::new(FsErrorKind::Io, "the operation was cancelled")
}

/// One operation as its thread sees it.
#[derive(Debug)]
pub(crate) struct Ctx {
    pub(crate) req: u32,
    tx: ConnTx,
    ctl: Arc<Control>,
}

impl Ctx {
    pub(crate) fn new(req: u32, tx: ConnTx, ctl: Arc<Control>) -> Ctx {
        Ctx { req, tx, ctl }
    }

    /// Send a reply; fails (as a cancellation) when the host is gone.
    pub(crate) fn send(&self, msg: FsReply) -> Result<(), FsError> {
        self.tx
            .blocking_send(AgentMessage::Fs { req: self.req, msg })
            .map_err(|_| cancelled())
    }

    /// Send the final answer. The operation counts as finished first, so
    /// the host may reuse `req` as soon as it reads this.
    pub(crate) fn finish(&self, result: Result<cove_protocol::fs::FsDone, FsError>) {
        self.ctl.mark_finished();
        let _ = self.send(FsReply::Done(result));
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.ctl.lock().cancelled
    }

    pub(crate) fn check(&self) -> Result<(), FsError> {
        if self.is_cancelled() {
            Err(cancelled())
        } else {
            Ok(())
        }
    }

    /// Wait for credit; returns how much of `want` may be sent now.
    pub(crate) fn take_credit(&self, want: u64) -> Result<u64, FsError> {
        let mut state = self.ctl.lock();
        loop {
            if state.cancelled {
                return Err(cancelled());
            }
            if state.credit > 0 {
                let n = state.credit.min(want);
                state.credit -= n;
                return Ok(n);
            }
            state = self
                .ctl
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Like [`Ctx::take_credit`] for one unit, but gives up after `timeout`
    /// (a watch polls its cancellation while it waits).
    pub(crate) fn take_one_credit(&self, timeout: Duration) -> Result<bool, FsError> {
        let mut state = self.ctl.lock();
        if state.cancelled {
            return Err(cancelled());
        }
        if state.credit == 0 {
            state = self
                .ctl
                .changed
                .wait_timeout(state, timeout)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if state.cancelled {
            return Err(cancelled());
        }
        if state.credit > 0 {
            state.credit -= 1;
            return Ok(true);
        }
        Ok(false)
    }

    /// The next upload chunk; `None` once the host sent `End`.
    pub(crate) fn next_chunk(&self) -> Result<Option<Vec<u8>>, FsError> {
        let mut state = self.ctl.lock();
        loop {
            if state.cancelled {
                return Err(cancelled());
            }
            if let Some(chunk) = state.chunks.pop_front() {
                return Ok(Some(chunk));
            }
            if state.ended {
                return Ok(None);
            }
            state = self
                .ctl
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Send downloaded bytes within the credit, in chunks of at most `MAX_CHUNK`.
    pub(crate) fn send_data(&self, mut data: &[u8]) -> Result<(), FsError> {
        while !data.is_empty() {
            let want = data.len().min(MAX_CHUNK) as u64;
            let n = self.take_credit(want)? as usize;
            self.send(FsReply::Data {
                data: data[..n].to_vec(),
            })?;
            data = &data[n..];
        }
        Ok(())
    }
}

/// The upload as a byte stream. Each chunk is acknowledged once it has
/// been consumed, which lets the host send more.
#[derive(Debug)]
pub(crate) struct UploadReader<'a> {
    ctx: &'a Ctx,
    chunk: Vec<u8>,
    pos: usize,
    pub(crate) total: u64,
    done: bool,
}

impl<'a> UploadReader<'a> {
    pub(crate) fn new(ctx: &'a Ctx) -> UploadReader<'a> {
        UploadReader {
            ctx,
            chunk: Vec::new(),
            pos: 0,
            total: 0,
            done: false,
        }
    }

    fn ack(&mut self) -> std::io::Result<()> {
        if !self.chunk.is_empty() {
            let bytes = self.chunk.len() as u64;
            self.chunk.clear();
            self.pos = 0;
            self.ctx
                .send(FsReply::Ack { bytes })
                .map_err(|e| std::io::Error::other(e.message))?;
        }
        Ok(())
    }

    /// Read and drop whatever the host still sends, until its `End`
    /// (an archive's end marker can come before the stream's end).
    pub(crate) fn drain(&mut self) -> Result<(), FsError> {
        let mut buf = vec![0u8; MAX_CHUNK];
        loop {
            match self.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(err) => return Err(FsError::new(FsErrorKind::Io, err.to_string())),
            }
        }
    }
}

impl Read for UploadReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.pos >= self.chunk.len() {
            if self.done {
                return Ok(0);
            }
            self.ack()?;
            match self.ctx.next_chunk() {
                Ok(Some(chunk)) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                Ok(None) => {
                    self.done = true;
                    return Ok(0);
                }
                Err(err) => return Err(std::io::Error::other(err.message)),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        self.total += n as u64;
        Ok(n)
    }
}

/// A download as a byte sink: buffers up to `MAX_CHUNK`, sends within credit.
#[derive(Debug)]
pub(crate) struct DownloadWriter<'a> {
    ctx: &'a Ctx,
    buf: Vec<u8>,
    pub(crate) total: u64,
}

impl<'a> DownloadWriter<'a> {
    pub(crate) fn new(ctx: &'a Ctx) -> DownloadWriter<'a> {
        DownloadWriter {
            ctx,
            buf: Vec::with_capacity(MAX_CHUNK),
            total: 0,
        }
    }

    fn send_buffered(&mut self) -> std::io::Result<()> {
        if !self.buf.is_empty() {
            self.ctx
                .send_data(&self.buf)
                .map_err(|e| std::io::Error::other(e.message))?;
            self.buf.clear();
        }
        Ok(())
    }
}

impl Write for DownloadWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(MAX_CHUNK - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.total += n as u64;
        if self.buf.len() >= MAX_CHUNK {
            self.send_buffered()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send_buffered()
    }
}
