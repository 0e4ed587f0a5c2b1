//! File operations between the host and the agent.
//!
//! Every operation has a request id `req`, chosen by the host and unique
//! among its open operations on the connection. The host starts it with
//! `FsRequest::Start`; the agent answers with zero or more intermediate
//! replies and exactly one final `FsReply::Done`, after which `req` is free.
//!
//! ```text
//!  one-shot (stat, mkdir, move, remove)      Start ─▶            ◀─ Done
//!  list                                      Start ─▶   ◀─ Entries* ◀─ Done
//!  download (read, tar out)                  Start ─▶ ◀─ Ready ◀─ Data* (within credit) ◀─ Done
//!                                            Credit ─▶ (as the host consumes)
//!  upload (write, tar in)                    Start ─▶ ◀─ Ready, Data* ─▶ ◀─ Ack*, End ─▶ ◀─ Done
//!  watch                                     Start ─▶ ◀─ Ready ◀─ Event* (within credit) … Cancel ─▶ ◀─ Done
//! ```
//!
//! Flow control keeps every transfer bounded: a download never has more
//! than the granted credit in flight (bytes; events for a watch), and an
//! upload's sender keeps at most its own window of unacknowledged bytes.
//! `Cancel` ends any operation early; an upload cancelled before `End`
//! leaves nothing behind.

use serde::{Deserialize, Serialize};

/// The `Hello` client name that makes a connection a *transfer
/// connection*: one bulk file transfer, raw bytes instead of frames.
///
/// ```text
///  host                                      agent
///   │ Hello{client: TRANSFER_CLIENT} ──────▶  │
///   │                          ◀────────────  │ Hello
///   │ Fs{req, Start(Read | Write)}  ───────▶  │
///   │                          ◀────────────  │ Fs{req, Ready} (or Fs{req, Done(Err)} and close)
///   │ write:  [len u32 LE][len bytes]… [0] ─▶ │ ◀─ Fs{req, Done}
///   │ read:   ◀─ [len u32 LE][len bytes]… [0] Fs{req, Done}
/// ```
///
/// Lengths are at most [`TRANSFER_MAX_CHUNK`]. The socket's own buffers are
/// the flow control, and the agent moves the bytes between the socket and
/// the file without copying them through itself (`splice`, `sendfile`).
/// A connection that closes before the zero length aborts the transfer: an
/// upload is rolled back, and a download the host sees end early is an error.
pub const TRANSFER_CLIENT: &str = "cove-transfer";

/// Largest chunk on a transfer connection.
pub const TRANSFER_MAX_CHUNK: u32 = 16 << 20;

/// Default download credit (bytes) a host grants when it starts a transfer.
pub const FS_WINDOW: u64 = 2 * 1024 * 1024;

/// Most unacknowledged upload bytes a host should keep in flight.
pub const FS_UPLOAD_WINDOW: u64 = 2 * 1024 * 1024;

/// Default number of watch events the agent may send before more credit.
pub const FS_WATCH_WINDOW: u64 = 256;

/// What the host says about operation `req` (inside `HostMessage::Fs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FsRequest {
    /// Begin an operation.
    Start(FsOp),
    /// Upload bytes (at most `MAX_CHUNK`), acknowledged with `FsReply::Ack`.
    Data {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// The upload is complete: commit it.
    End,
    /// The agent may send this much more (bytes, or events for a watch).
    Credit { amount: u64 },
    /// Stop the operation; an unfinished upload is rolled back.
    Cancel,
}

/// An operation. Paths are inside the sandbox; a relative path is taken
/// from the sandbox's working directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FsOp {
    /// Describe one path. With `follow`, a final symlink is followed.
    Stat {
        path: String,
        follow: bool,
    },
    /// A directory's entries, `depth` levels down (1 = its own entries),
    /// at most `limit` of them.
    List {
        path: String,
        depth: u32,
        limit: u32,
    },
    /// A regular file's bytes.
    Read {
        path: String,
        window: u64,
    },
    /// Create or replace a regular file. Missing parent directories are
    /// created. The new content replaces the old atomically at `End`.
    Write {
        path: String,
        mode: Option<u32>,
    },
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u32>,
    },
    /// Rename `from` to `to`; without `overwrite`, an existing `to` is an error.
    Move {
        from: String,
        to: String,
        overwrite: bool,
    },
    Remove {
        path: String,
        recursive: bool,
    },
    /// A tar archive of `path` (a file or a directory tree), its entries
    /// named from the path's last component.
    TarOut {
        path: String,
        window: u64,
    },
    /// Extract a tar archive into directory `path` (created if missing).
    TarIn {
        path: String,
    },
    /// Changes under `path` until cancelled.
    Watch {
        path: String,
        recursive: bool,
        window: u64,
    },
    /// A tar archive of the sandbox's writable layer, for a snapshot of a
    /// sandbox whose layer the host cannot read (a microVM's overlay upper
    /// directory lives in guest memory). It is an image layer: what was
    /// deleted from the layers below is a `.wh.NAME` entry, a directory
    /// that hides everything below it holds `.wh..wh..opq`.
    WritableLayer {
        window: u64,
    },
}

/// What the agent says about operation `req` (inside `AgentMessage::Fs`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FsReply {
    /// A stream is open. Downloads carry what is being sent (a read's
    /// `size` is exactly the number of bytes that will follow).
    Ready { entry: Option<FsEntry> },
    /// Downloaded bytes.
    Data {
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Uploaded bytes the agent has consumed.
    Ack { bytes: u64 },
    /// Part of a listing.
    Entries { entries: Vec<FsEntry> },
    /// A change seen by a watch.
    Event { event: FsEvent },
    /// The operation is over; nothing more comes for `req`.
    Done(Result<FsDone, FsError>),
}

/// The result of a finished operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FsDone {
    /// Stat, mkdir, write: the entry as it now is.
    Entry(FsEntry),
    /// A listing ended; `truncated` when `limit` cut it short.
    Listed { truncated: bool },
    /// Move, remove, a cancelled watch.
    Ok,
    /// A download or a tar extraction: how much moved.
    Transferred { bytes: u64, entries: u64 },
}

/// One file, directory or other entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FsEntry {
    /// Absolute path inside the sandbox (as asked, not canonicalized).
    pub path: String,
    /// The last component (lossy UTF-8 if the name is not UTF-8).
    pub name: String,
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits, including setuid, setgid and sticky (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time: seconds and nanoseconds since the Unix epoch.
    pub mtime_sec: i64,
    pub mtime_nsec: u32,
    /// The target of a symlink.
    pub link_target: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Fifo,
    Socket,
    CharDevice,
    BlockDevice,
}

impl FileKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::File => "file",
            FileKind::Dir => "dir",
            FileKind::Symlink => "symlink",
            FileKind::Fifo => "fifo",
            FileKind::Socket => "socket",
            FileKind::CharDevice => "char_device",
            FileKind::BlockDevice => "block_device",
        }
    }
}

/// A change under a watched path.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsEvent {
    Create {
        path: String,
        dir: bool,
    },
    Modify {
        path: String,
    },
    Delete {
        path: String,
        dir: bool,
    },
    /// A rename. `from` is `None` when the entry came from outside the
    /// watched tree, `to` is `None` when it left it.
    Move {
        from: Option<String>,
        to: Option<String>,
        dir: bool,
    },
    /// The kernel's event queue overflowed (the reader was too slow):
    /// events were lost.
    Overflow,
}

/// Why a file operation failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct FsError {
    pub kind: FsErrorKind,
    pub message: String,
}

impl FsError {
    pub fn new(kind: FsErrorKind, message: impl Into<String>) -> FsError {
        FsError {
            kind,
            message: message.into(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FsErrorKind {
    /// The path (or a parent) does not exist.
    NotFound,
    /// A directory where a file was expected.
    IsADirectory,
    /// A file where a directory was expected.
    NotADirectory,
    /// The target exists and may not be replaced.
    Exists,
    /// The directory is not empty.
    NotEmpty,
    /// The sandbox's permissions forbid it (read-only file system included).
    PermissionDenied,
    /// The request is malformed: NUL in a path, too long, `.`/`..` as a name.
    Invalid,
    /// The path or an archive entry would lead outside the sandbox or the
    /// destination directory.
    Escape,
    /// The sandbox's disk is full.
    NoSpace,
    /// Any other failure.
    Io,
    /// The agent is running as many file operations as it allows (or
    /// cannot start a thread): try again later.
    Busy,
}
