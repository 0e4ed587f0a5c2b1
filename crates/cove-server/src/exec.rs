//! Running a command for an API request: the one implementation every
//! dialect's exec calls.

use cove_api::{Encoding, ErrorCode, ExecRequest, ExecResult};
use cove_protocol::client::{AgentClient, ClientError, Output};
use cove_protocol::{CommandLine, ProcessSpec, PtySize, SpawnErrorKind};

use crate::error::ApiError;

/// Default per-stream output cap of a synchronous exec.
pub const DEFAULT_MAX_OUTPUT: u64 = 16 << 20;
/// Largest per-stream cap a request may ask for.
pub const MAX_MAX_OUTPUT: u64 = 256 << 20;

/// The agent's view of a request: the spec, and stdin bytes to feed.
pub fn process_spec(req: &ExecRequest) -> Result<(ProcessSpec, Option<Vec<u8>>), ApiError> {
    let command = match (&req.cmd, &req.argv) {
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "give either `cmd` (a shell string) or `argv` (a list), not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "missing command: give `cmd` (a shell string) or `argv` (a list)",
            ));
        }
        (Some(cmd), None) if cmd.trim().is_empty() => {
            return Err(ApiError::invalid("`cmd` is empty"));
        }
        (Some(cmd), None) => CommandLine::Shell(cmd.clone()),
        (None, Some(argv)) if argv.is_empty() || argv[0].is_empty() => {
            return Err(ApiError::invalid(
                "`argv` is empty: its first element is the program to run",
            ));
        }
        (None, Some(argv)) => CommandLine::Argv(argv.clone()),
    };
    let max_output = req.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
    if max_output > MAX_MAX_OUTPUT {
        return Err(ApiError::invalid(format!(
            "max_output {max_output} is over the limit of {MAX_MAX_OUTPUT} bytes; stream large output instead"
        )));
    }
    let stdin = match (&req.stdin, req.encoding) {
        (None, _) => None,
        (Some(text), Encoding::Utf8) => Some(text.clone().into_bytes()),
        (Some(text), Encoding::Base64) => {
            Some(base64_simd::STANDARD.decode_to_vec(text).map_err(|_| {
                ApiError::invalid("`stdin` is not valid base64 (standard alphabet, with padding)")
            })?)
        }
    };
    let mut spec = ProcessSpec::new(command);
    spec.env = req
        .env
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    spec.clear_env = req.clear_env;
    spec.cwd = req.cwd.clone();
    spec.user = req.user.clone();
    // Whole milliseconds, rounded up: a timeout under 1 ms is 1 ms, never
    // 0 (which means none).
    spec.timeout_ms = req
        .timeout
        .map(|t| u64::try_from(t.0.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX))
        .unwrap_or(0);
    spec.max_output = Some(max_output);
    spec.pty = req.pty.map(|p| PtySize {
        rows: p.rows,
        cols: p.cols,
    });
    spec.stdin = stdin.is_some() || req.stdin_open;
    Ok((spec, stdin))
}

/// Map a failed spawn or a lost connection to an API error.
pub fn client_error(err: ClientError) -> ApiError {
    match err {
        ClientError::Spawn(e) => match e.kind {
            SpawnErrorKind::InvalidRequest
            | SpawnErrorKind::NoSuchCwd
            | SpawnErrorKind::NoSuchUser => ApiError::invalid(e.message),
            SpawnErrorKind::ResourceLimit => ApiError::new(ErrorCode::Conflict, e.message),
            SpawnErrorKind::Internal => ApiError::internal(e.message),
        },
        other => ApiError::new(
            ErrorCode::AgentUnreachable,
            format!("lost the sandbox's agent: {other}"),
        ),
    }
}

/// Kills the process tree if the request goes away before the process ends
/// (a client that disconnects mid-exec leaves nothing running).
#[derive(Debug)]
pub struct KillOnDrop {
    agent: AgentClient,
    pid: Option<u32>,
}

impl KillOnDrop {
    pub fn new(agent: AgentClient, pid: u32) -> KillOnDrop {
        KillOnDrop {
            agent,
            pid: Some(pid),
        }
    }

    pub fn disarm(mut self) {
        self.pid = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.pid {
            self.agent.kill_now(pid);
        }
    }
}

/// How long the agent may take to confirm a spawn before it counts as unreachable.
pub const SPAWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Start a process, failing with 502 if the agent does not answer in time.
pub async fn spawn(
    agent: &AgentClient,
    spec: ProcessSpec,
) -> Result<cove_protocol::client::Process, ApiError> {
    match tokio::time::timeout(SPAWN_TIMEOUT, agent.spawn(spec)).await {
        Ok(result) => result.map_err(client_error),
        Err(_) => Err(ApiError::new(
            ErrorCode::AgentUnreachable,
            format!(
                "the sandbox's agent did not answer within {}s",
                SPAWN_TIMEOUT.as_secs()
            ),
        )),
    }
}

/// Start a process for a stream: in the background, so that it outlives
/// the client, and followed, so that this connection reads its output from
/// the first byte with back-pressure (nothing dropped, however fast it
/// writes). `stdin` is fed alongside, so a process that writes before it
/// has read all of its input cannot deadlock against the stream; then
/// stdin is closed, or left open for later writes with `keep_stdin_open`.
pub async fn spawn_followed(
    agent: &AgentClient,
    mut spec: ProcessSpec,
    window: u64,
    stdin: Option<Vec<u8>>,
    keep_stdin_open: bool,
) -> Result<cove_protocol::client::Process, ApiError> {
    spec.background = true;
    spec.follow = true;
    spec.window = window;
    spec.max_output = None;
    let mut process = spawn(agent, spec).await?;
    if let Some(mut writer) = process.take_stdin() {
        tokio::spawn(async move {
            if let Some(data) = stdin {
                let _ = writer.write_all(&data).await;
                let _ = writer.flush().await;
            }
            if keep_stdin_open {
                writer.release();
            } else {
                let _ = writer.close().await;
            }
        });
    }
    Ok(process)
}

/// Run a process to completion and collect its output.
pub async fn run(
    agent: &AgentClient,
    spec: ProcessSpec,
    stdin: Option<Vec<u8>>,
) -> Result<Output, ApiError> {
    let mut process = spawn(agent, spec).await?;
    let guard = KillOnDrop::new(agent.clone(), process.pid());
    if let Some(mut writer) = process.take_stdin() {
        tokio::spawn(async move {
            if let Some(data) = stdin {
                let _ = writer.write_all(&data).await;
            }
            let _ = writer.close().await;
        });
    }
    let out = process.collect().await.map_err(client_error)?;
    guard.disarm();
    Ok(out)
}

/// Encode bytes for JSON; returns the text and whether bytes were replaced.
pub fn encode(bytes: &[u8], encoding: Encoding) -> (String, bool) {
    match encoding {
        Encoding::Base64 => (base64_simd::STANDARD.encode_to_string(bytes), false),
        Encoding::Utf8 => match std::str::from_utf8(bytes) {
            Ok(text) => (text.to_string(), false),
            Err(_) => (String::from_utf8_lossy(bytes).into_owned(), true),
        },
    }
}

/// The API result of a finished process.
pub fn result(out: &Output, encoding: Encoding) -> ExecResult {
    let (stdout, lossy_out) = encode(&out.stdout, encoding);
    let (stderr, lossy_err) = encode(&out.stderr, encoding);
    let status = &out.status;
    ExecResult {
        exit_code: status.shell_code(),
        signal: status.signal,
        timed_out: status.timed_out,
        oom_killed: status.oom_killed,
        duration_ms: status.duration_ms,
        stdout,
        stderr,
        stdout_truncated: status.stdout_truncated,
        stderr_truncated: status.stderr_truncated,
        stdout_bytes: status.stdout_bytes,
        stderr_bytes: status.stderr_bytes,
        encoding,
        lossy: lossy_out || lossy_err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_checked() {
        let req = |cmd: Option<&str>, argv: Option<Vec<&str>>| ExecRequest {
            cmd: cmd.map(String::from),
            argv: argv.map(|a| a.into_iter().map(String::from).collect()),
            ..ExecRequest::default()
        };
        assert!(process_spec(&req(None, None)).is_err());
        assert!(process_spec(&req(Some("ls"), Some(vec!["ls"]))).is_err());
        assert!(process_spec(&req(None, Some(vec![]))).is_err());
        assert!(process_spec(&req(Some("  "), None)).is_err());
        let (spec, stdin) = process_spec(&req(Some("echo hi"), None)).unwrap();
        assert_eq!(spec.command, CommandLine::Shell("echo hi".into()));
        assert!(stdin.is_none() && !spec.stdin);
        let mut r = req(None, Some(vec!["cat"]));
        r.stdin = Some("aGk=".into());
        r.encoding = Encoding::Base64;
        let (spec, stdin) = process_spec(&r).unwrap();
        assert_eq!(stdin.as_deref(), Some(&b"hi"[..]));
        assert!(spec.stdin);
        r.stdin = Some("!!".into());
        assert!(process_spec(&r).is_err());
        r.stdin = None;
        r.max_output = Some(MAX_MAX_OUTPUT + 1);
        assert!(process_spec(&r).is_err());
        // A timeout under a millisecond is one, not none.
        let mut r = req(Some("sleep 2"), None);
        r.timeout = Some(cove_api::DurationValue(std::time::Duration::from_micros(
            100,
        )));
        assert_eq!(process_spec(&r).unwrap().0.timeout_ms, 1);
        r.timeout = Some(cove_api::DurationValue(std::time::Duration::from_micros(
            1500,
        )));
        assert_eq!(process_spec(&r).unwrap().0.timeout_ms, 2);
        r.timeout = Some(cove_api::DurationValue(std::time::Duration::ZERO));
        assert_eq!(process_spec(&r).unwrap().0.timeout_ms, 0);
    }

    #[test]
    fn encodings() {
        assert_eq!(encode(b"hi", Encoding::Utf8), ("hi".into(), false));
        assert_eq!(encode(b"\xff", Encoding::Utf8), ("\u{fffd}".into(), true));
        assert_eq!(
            encode(b"\xff\x00", Encoding::Base64),
            ("/wA=".into(), false)
        );
    }
}
