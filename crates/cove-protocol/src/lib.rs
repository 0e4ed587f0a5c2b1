//! The wire protocol between cove's host side (the daemon, `cove run`) and
//! `cove-agent`, the supervisor that runs as PID 1 inside every sandbox.
//!
//! One connection carries many processes at once. Every frame is a 4-byte
//! little-endian length followed by one [postcard]-encoded message; stdio is
//! carried as raw bytes, never as strings, so invalid UTF-8 and NULs travel
//! intact. The first frame in each direction is a `Hello` that names the
//! protocol version; a peer that does not speak a compatible version answers
//! with an error and closes.
//!
//! ```text
//!  host                                     agent
//!   │ Hello{version}          ───────────▶   │
//!   │                         ◀───────────   │ Hello{version, agent}
//!   │ Spawn{req, spec}        ───────────▶   │ fork/exec, own session + cgroup
//!   │                         ◀───────────   │ Spawned{req, pid}
//!   │ Stdin{pid, data}        ───────────▶   │
//!   │                         ◀───────────   │ StdinAck{pid, bytes}
//!   │                         ◀───────────   │ Output{pid, stream, offset, data} (within credit)
//!   │ Credit{pid, bytes}      ───────────▶   │
//!   │                         ◀───────────   │ Exited{pid, status}  (after the last Output)
//! ```
//!
//! Output is flow-controlled per process: the agent sends at most the credit
//! the host has granted (the spawn's initial `window` plus every `Credit`),
//! and stops reading the process's pipes when the credit is spent, so a slow
//! reader pushes back on the process instead of growing any buffer.

pub mod client;
mod codec;
pub mod fs;
pub mod relay;

pub use codec::{
    DecodeError, FrameCodec, FromAgent, HostCodec, MAX_FRAME_LEN, decode_frame, encode_frame,
    encode_frame_into, output_frame_head,
};
use serde::{Deserialize, Serialize};

/// The protocol version this build speaks. Bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 1;

/// Largest stdio chunk the agent puts in one `Output` frame.
pub const MAX_CHUNK: usize = 64 * 1024;

/// Largest piece of a process's output in one `Output` frame: output that
/// has piled up while the host was busy goes in few large frames.
pub const MAX_OUTPUT_CHUNK: usize = 1024 * 1024;

/// Default initial output credit for a process.
pub const DEFAULT_WINDOW: u64 = 1024 * 1024;

/// Messages the host sends to the agent.
///
/// Variant order is part of the wire format: append new variants at the end,
/// and `Hello` stays first forever so any version can read it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum HostMessage {
    Hello(Hello),
    /// Start a process. `req` is chosen by the host and echoed in the answer.
    Spawn {
        req: u32,
        spec: ProcessSpec,
    },
    /// Bytes for a process's stdin (a pipe or its terminal). Acked with `StdinAck`.
    Stdin {
        pid: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Close a process's stdin (end of input).
    CloseStdin {
        pid: u32,
    },
    /// Send `signal` to the process, or to its whole process group.
    Signal {
        pid: u32,
        signal: i32,
        group: bool,
    },
    /// Change the terminal size of a process started with a PTY.
    Resize {
        pid: u32,
        rows: u16,
        cols: u16,
    },
    /// Allow the agent to send `bytes` more output bytes for `pid`.
    Credit {
        pid: u32,
        bytes: u64,
    },
    /// Liveness probe; answered with `Pong` carrying the same nonce.
    Ping {
        nonce: u64,
    },
    /// Kill the process and everything it started (its process group and
    /// its cgroup), as a timeout does.
    Kill {
        pid: u32,
    },
    /// Subscribe this connection to a process's output from the given
    /// offsets (what is still in the replay buffer is sent first). Answered
    /// with `Attached`, then `Output`/`Dropped` within `window` credit, then
    /// `Exited`. Replaces an earlier subscription of this connection. With
    /// `backpressure`, the process waits for this reader instead of
    /// dropping output it has not read.
    Attach {
        pid: u32,
        stdout_from: u64,
        stderr_from: u64,
        window: u64,
        backpressure: bool,
    },
    /// End this connection's subscription to a process.
    Detach {
        pid: u32,
    },
    /// List running and recently finished processes.
    ListProcesses {
        req: u32,
    },
    /// A file operation (see [`fs`]): start one, feed or cancel it.
    Fs {
        req: u32,
        msg: fs::FsRequest,
    },
}

/// Messages the agent sends to the host. Same ordering rule as [`HostMessage`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMessage {
    Hello(AgentHello),
    /// The process for spawn request `req` is running as `pid`.
    Spawned {
        req: u32,
        pid: u32,
    },
    /// The process for spawn request `req` could not be started.
    SpawnFailed {
        req: u32,
        error: SpawnError,
    },
    /// A chunk of output. `offset` is the stream's byte count before this chunk.
    Output {
        pid: u32,
        stream: Stream,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// `bytes` of stdin were written to the process (or `error` says why not).
    StdinAck {
        pid: u32,
        bytes: u64,
        error: Option<String>,
    },
    /// The process ended; no more `Output` for `pid` follows.
    Exited {
        pid: u32,
        status: ExitStatus,
    },
    /// A request about `pid` (or the connection, if `pid` is `None`) failed.
    Error {
        pid: Option<u32>,
        message: String,
    },
    Pong {
        nonce: u64,
    },
    /// Answer to `Attach`.
    Attached {
        pid: u32,
        info: ProcessInfo,
    },
    /// Bytes `from..to` of a stream were overwritten in the replay buffer
    /// before this connection read them.
    Dropped {
        pid: u32,
        stream: Stream,
        from: u64,
        to: u64,
    },
    /// Answer to `ListProcesses`.
    Processes {
        req: u32,
        list: Vec<ProcessInfo>,
    },
    /// Progress or the end of file operation `req` (see [`fs`]).
    Fs {
        req: u32,
        msg: fs::FsReply,
    },
}

/// The host's greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub version: u32,
    /// Who is connecting, for the agent's logs ("cove-run", "cove-serve").
    pub client: String,
}

/// The agent's answer to [`Hello`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentHello {
    pub version: u32,
    /// The agent's build version (the cove release).
    pub agent_version: String,
    /// The sandbox's hostname, which is its ID.
    pub hostname: String,
}

/// What to run and how.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessSpec {
    pub command: CommandLine,
    /// Variables set for this process, applied over the sandbox's environment.
    pub env: Vec<(String, String)>,
    /// Start from an empty environment instead of the sandbox's.
    pub clear_env: bool,
    /// Working directory; the sandbox's default when `None`.
    pub cwd: Option<String>,
    /// `name`, `uid` or `uid:gid`; the sandbox's default user when `None`.
    pub user: Option<String>,
    /// Whether stdin is a pipe the host feeds with `Stdin` frames.
    pub stdin: bool,
    /// Kill the whole process tree after this many milliseconds; 0 = never.
    pub timeout_ms: u64,
    /// Per-stream cap on bytes forwarded; the rest is drained and counted as truncated.
    pub max_output: Option<u64>,
    /// Run on a new pseudo-terminal of this size (stdout and stderr merge into it).
    pub pty: Option<PtySize>,
    /// Initial output credit in bytes.
    pub window: u64,
    /// Run detached: nobody owns the output, which goes to the replay
    /// buffer only (attach to read it), and the process never blocks on a
    /// reader. Otherwise the spawning connection owns the output, reads it
    /// with back-pressure, and the process is killed if that connection
    /// closes before it ends.
    pub background: bool,
    /// With `background`: the spawning connection still reads the output
    /// from its first byte, with back-pressure, as an owner would, but the
    /// process outlives it (a stream that must not lose the start of a
    /// fast writer's output, yet must not die with its client).
    pub follow: bool,
    /// Bytes of each stream the agent keeps for late readers (background)
    /// or buffers ahead of a slow owner (foreground).
    pub replay_bytes: u64,
    /// A label shown in the process list.
    pub tag: Option<String>,
}

/// Default replay buffer of a background process, per stream.
pub const DEFAULT_REPLAY: u64 = 4 * 1024 * 1024;

impl ProcessSpec {
    /// A spec with defaults for everything but the command.
    pub fn new(command: CommandLine) -> Self {
        ProcessSpec {
            command,
            env: Vec::new(),
            clear_env: false,
            cwd: None,
            user: None,
            stdin: false,
            timeout_ms: 0,
            max_output: None,
            pty: None,
            window: DEFAULT_WINDOW,
            background: false,
            follow: false,
            replay_bytes: DEFAULT_REPLAY,
            tag: None,
        }
    }
}

/// A command: an argument vector, or a string for `/bin/sh -c`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandLine {
    Argv(Vec<String>),
    Shell(String),
}

impl CommandLine {
    /// The argument vector the agent executes.
    pub fn to_argv(&self) -> Vec<String> {
        match self {
            CommandLine::Argv(argv) => argv.clone(),
            CommandLine::Shell(script) => vec!["/bin/sh".into(), "-c".into(), script.clone()],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PtySize {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    pub fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// A process as the agent lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    pub pid: u32,
    pub argv: Vec<String>,
    pub tag: Option<String>,
    pub background: bool,
    pub pty: bool,
    /// Whether its stdin pipe is still open for `Stdin` frames.
    pub stdin_open: bool,
    /// Unix milliseconds.
    pub started_at: u64,
    /// Set once the process has exited.
    pub status: Option<ExitStatus>,
    /// Bytes produced on stdout and stderr so far.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

/// Why a process could not be started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpawnError {
    pub kind: SpawnErrorKind,
    pub message: String,
}

impl std::fmt::Display for SpawnError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for SpawnError {}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SpawnErrorKind {
    /// The request itself is wrong (empty argv, NUL in a string, ...).
    InvalidRequest,
    /// The working directory does not exist or is not a directory.
    NoSuchCwd,
    /// The user or group does not exist in the sandbox.
    NoSuchUser,
    /// The sandbox cannot take another process (pids limit, fd limit).
    ResourceLimit,
    /// Any other failure of the agent.
    Internal,
}

/// How a process ended, and what happened to its output.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code when the process exited normally.
    pub code: Option<i32>,
    /// Signal number when the process was killed by a signal.
    pub signal: Option<i32>,
    /// The agent killed the process tree because the timeout passed.
    pub timed_out: bool,
    /// The kernel's OOM killer killed the process (memory limit reached).
    pub oom_killed: bool,
    /// Wall time from start to exit, in milliseconds.
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

impl ExitStatus {
    /// The exit code a shell would report: the code, or 128 + signal.
    /// A timeout reports 124, as GNU `timeout` does.
    pub fn shell_code(&self) -> i32 {
        if self.timed_out {
            124
        } else if let Some(code) = self.code {
            code
        } else if let Some(sig) = self.signal {
            128 + sig
        } else {
            1
        }
    }
}
