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
    /// Start from an empty environment: only `env` is set.
    #[serde(default)]
    pub clear_env: bool,
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

/// How a process ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ExitInfo {
    /// The exit code; 128+N when killed by signal N; 124 on timeout.
    pub exit_code: i32,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub oom_killed: bool,
    pub duration_ms: u64,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    pub stdout_truncated: bool,
    pub stderr_truncated: bool,
}

/// A process in a sandbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProcessInfo {
    /// The process ID inside the sandbox.
    pub pid: u32,
    /// What runs: the argument vector (`/bin/sh -c …` for a `cmd`).
    pub argv: Vec<String>,
    pub tag: Option<String>,
    /// `running` or `exited`.
    pub state: String,
    pub background: bool,
    pub pty: bool,
    /// Whether stdin still accepts writes (`…/stdin`).
    pub stdin_open: bool,
    /// RFC 3339.
    pub started_at: String,
    /// Bytes written so far.
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
    /// Set once the process has exited.
    pub exit: Option<ExitInfo>,
}

/// `GET /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    pub processes: Vec<ProcessInfo>,
}

/// `POST …/processes/{pid}/signal`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SignalRequest {
    /// A name (`TERM`, `SIGKILL`, `int`) or a number (`15`).
    #[schema(value_type = String, example = "TERM")]
    pub signal: serde_json::Value,
    /// Signal the whole process group (default true), or only the process.
    #[serde(default)]
    pub group: Option<bool>,
}

/// `POST …/processes/{pid}/stdin`: bytes accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct StdinWritten {
    pub bytes: u64,
}

/// Parse a signal given as a name (with or without `SIG`, any case) or a
/// number.
pub fn parse_signal(value: &serde_json::Value) -> Result<i32, String> {
    const NAMES: &[(&str, i32)] = &[
        ("HUP", 1),
        ("INT", 2),
        ("QUIT", 3),
        ("ILL", 4),
        ("TRAP", 5),
        ("ABRT", 6),
        ("BUS", 7),
        ("FPE", 8),
        ("KILL", 9),
        ("USR1", 10),
        ("SEGV", 11),
        ("USR2", 12),
        ("PIPE", 13),
        ("ALRM", 14),
        ("TERM", 15),
        ("CHLD", 17),
        ("CONT", 18),
        ("STOP", 19),
        ("TSTP", 20),
        ("TTIN", 21),
        ("TTOU", 22),
        ("URG", 23),
        ("XCPU", 24),
        ("XFSZ", 25),
        ("VTALRM", 26),
        ("PROF", 27),
        ("WINCH", 28),
        ("IO", 29),
        ("PWR", 30),
        ("SYS", 31),
    ];
    let bad = || format!("{value} is not a signal (use a name like TERM or a number from 1 to 64)");
    let number = match value {
        serde_json::Value::Number(n) => n.as_i64().ok_or_else(bad)?,
        serde_json::Value::String(s) => {
            let upper = s.trim().to_ascii_uppercase();
            let name = upper.strip_prefix("SIG").unwrap_or(&upper);
            match name.parse::<i64>() {
                Ok(n) => n,
                Err(_) => NAMES
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, v)| *v as i64)
                    .ok_or_else(bad)?,
            }
        }
        _ => return Err(bad()),
    };
    if (1..=64).contains(&number) {
        Ok(number as i32)
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_and_number() {
        for (v, n) in [
            (serde_json::json!("TERM"), 15),
            (serde_json::json!("sigkill"), 9),
            (serde_json::json!(2), 2),
            (serde_json::json!("10"), 10),
        ] {
            assert_eq!(parse_signal(&v), Ok(n));
        }
        for v in [
            serde_json::json!("NOPE"),
            serde_json::json!(0),
            serde_json::json!(99),
            serde_json::json!(true),
            serde_json::json!(-9),
        ] {
            assert!(parse_signal(&v).is_err(), "{v}");
        }
    }
}
