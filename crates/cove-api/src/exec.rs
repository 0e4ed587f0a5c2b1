//! Running a command in a sandbox.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::values::DurationValue;

/// How output (and `stdin`) bytes are written in JSON.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// Text; bytes that are not UTF-8 are replaced and `lossy` is set.
    #[default]
    #[serde(rename = "utf-8", alias = "utf8", alias = "text")]
    Utf8,
    /// Base64 (standard alphabet, padded): every byte exactly.
    Base64,
}

/// A terminal for the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PtyRequest {
    pub rows: u16,
    pub cols: u16,
}

/// `POST /v1/sandboxes/{id}/exec`: give `cmd` (a shell string for
/// `/bin/sh -c`) or `argv` (a list), not both.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    #[serde(default)]
    pub cmd: Option<String>,
    #[serde(default)]
    pub argv: Option<Vec<String>>,
    /// Variables for this process, over the sandbox's.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<String>,
    /// A name, a uid, or uid:gid.
    #[serde(default)]
    pub user: Option<String>,
    /// Bytes to feed on stdin (base64 when `encoding` is `base64`).
    #[serde(default)]
    pub stdin: Option<String>,
    /// Kill the process and everything it started after this long:
    /// seconds, or a string like "1500ms"; 0 = no limit (the default).
    #[serde(default)]
    pub timeout: Option<DurationValue>,
    /// Per-stream cap on returned bytes (default 16 MiB, at most 256 MiB);
    /// the rest is counted and `*_truncated` is set.
    #[serde(default)]
    pub max_output: Option<u64>,
    /// How to encode output in the response (and read `stdin`).
    #[serde(default)]
    pub encoding: Encoding,
    /// Start in the background and answer 202 with the `pid` at once.
    #[serde(default)]
    pub background: bool,
    /// With `background`: keep stdin open for later writes.
    #[serde(default)]
    pub stdin_open: bool,
    /// Run on a terminal of this size.
    #[serde(default)]
    pub pty: Option<PtyRequest>,
    /// A label for the process, shown in the process list.
    #[serde(default)]
    pub tag: Option<String>,
}

/// The result of a finished process.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExecResult {
    /// The exit code; 128+N when killed by signal N; 124 on timeout.
    pub exit_code: i32,
    /// The signal that killed the process, if one did.
    pub signal: Option<i32>,
    /// The timeout killed the process tree.
    pub timed_out: bool,
    /// The kernel's OOM killer killed the process.
    pub oom_killed: bool,
    pub duration_ms: u64,
    pub stdout: String,
    pub stderr: String,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
    /// Total bytes the process wrote to each stream (also past the cap).
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// How `stdout` and `stderr` are encoded.
    pub encoding: Encoding,
    /// With `utf-8`: some bytes were not UTF-8 and were replaced.
    pub lossy: bool,
}

/// `202` answer of a background exec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Started {
    pub pid: u32,
}
