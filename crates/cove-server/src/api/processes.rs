//! Processes: background exec, listing, waiting, signals, stdin, output
//! streams (server-sent events) and interactive attach (WebSocket).
//!
//! Streaming policy. Every process keeps a bounded replay buffer per stream
//! in the agent (4 MiB by default); neither the agent nor the daemon ever
//! holds more for a reader, however slow. Two behaviours on top:
//! * a *holding* reader (`exec/stream`, `attach`, or `stream?backpressure=true`)
//!   gets every byte: when it falls a full buffer behind, the agent stops
//!   reading the process's pipe and the process blocks until the reader
//!   catches up (back-pressure);
//! * a *lossy* reader (`stream` by default, `wait`) never slows the
//!   process: bytes that leave the buffer before it reads them are reported
//!   in a `dropped` event naming the byte range, and it continues with the
//!   newest bytes.
//!
//! A holding reader that disconnects stops holding; the process runs on.
//! Event IDs are `<stdout offset>.<stderr offset>`; reconnecting with
//! `Last-Event-ID` (or `?stdout_offset=&stderr_offset=`) resumes exactly
//! there.

use std::convert::Infallible;
use std::time::Duration;

use axum::Json;
use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use cove_api::{
    Encoding, ErrorBody, ErrorCode, ExecRequest, ExecResult, ExitInfo, ProcessInfo, ProcessList,
    Scope, SignalRequest, Started, StdinWritten,
};
use cove_protocol::client::{AgentClient, Process, ProcessEvent};
use cove_protocol::{ExitStatus, Stream};
use futures::StreamExt;
use serde::Deserialize;
use tokio::sync::mpsc;
use utoipa::IntoParams;

use super::AppState;
use super::extract::{ApiJson, ApiPath, ApiQuery, Auth};
use crate::error::ApiError;
use crate::exec;

/// Output credit a stream grants the agent at a time.
const STREAM_WINDOW: u64 = 2 << 20;

/// Rendered events a stream holds on their way to the client's socket
/// (each at most `JOIN_OUTPUT` bytes of output, base64 or text).
const EVENTS_IN_FLIGHT: usize = 4;

fn exit_info(status: &ExitStatus) -> ExitInfo {
    ExitInfo {
        exit_code: status.shell_code(),
        signal: status.signal,
        timed_out: status.timed_out,
        oom_killed: status.oom_killed,
        duration_ms: status.duration_ms,
        stdout_bytes: status.stdout_bytes,
        stderr_bytes: status.stderr_bytes,
        stdout_truncated: status.stdout_truncated,
        stderr_truncated: status.stderr_truncated,
    }
}

fn process_info(p: &cove_protocol::ProcessInfo) -> ProcessInfo {
    ProcessInfo {
        pid: p.pid,
        argv: p.argv.clone(),
        tag: p.tag.clone(),
        state: if p.status.is_some() {
            "exited".into()
        } else {
            "running".into()
        },
        background: p.background,
        pty: p.pty,
        stdin_open: p.stdin_open,
        started_at: cove_api::rfc3339_millis(p.started_at),
        stdout_bytes: p.stdout_bytes,
        stderr_bytes: p.stderr_bytes,
        exit: p.status.as_ref().map(exit_info),
    }
}

fn no_process(pid: u32) -> ApiError {
    ApiError::new(
        ErrorCode::NotFound,
        format!("no process {pid} in this sandbox (or it finished long ago)"),
    )
}

fn attach_error(pid: u32, err: cove_protocol::client::ClientError) -> ApiError {
    match err {
        cove_protocol::client::ClientError::Agent(_) => no_process(pid),
        other => exec::client_error(other),
    }
}

async fn find(agent: &AgentClient, pid: u32) -> Result<cove_protocol::ProcessInfo, ApiError> {
    let list = agent.list().await.map_err(exec::client_error)?;
    list.into_iter()
        .find(|p| p.pid == pid)
        .ok_or_else(|| no_process(pid))
}

/// Start a background process; answers 202 with its pid at once.
pub async fn start_background(
    state: &AppState,
    who: &crate::auth::Principal,
    id: &str,
    req: ExecRequest,
) -> Result<Response, ApiError> {
    let (mut spec, stdin) = exec::process_spec(&req)?;
    spec.background = true;
    spec.tag = req.tag.clone();
    spec.max_output = None;
    let (_entry, agent) = state.manager.agent(who, id).await?;
    state.manager.metrics().execs.inc();
    let mut process = exec::spawn(&agent, spec).await?;
    let pid = process.pid();
    if let Some(mut writer) = process.take_stdin() {
        if let Some(data) = stdin {
            writer.write_all(&data).await.map_err(exec::client_error)?;
            writer.flush().await.map_err(exec::client_error)?;
        }
        if req.stdin_open {
            writer.release();
        } else {
            writer.close().await.map_err(exec::client_error)?;
        }
    }
    Ok((StatusCode::ACCEPTED, Json(Started { pid })).into_response())
}

/// List processes (running, and recently finished background ones).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID")),
    responses((status = 200, description = "Processes, oldest first", body = ProcessList)),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let (_entry, agent) = state.manager.agent(who, &id).await?;
    let list = agent.list().await.map_err(exec::client_error)?;
    Ok(Json(ProcessList {
        processes: list.iter().map(process_info).collect(),
    }))
}

/// Describe one process.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    responses(
        (status = 200, description = "The process", body = ProcessInfo),
        (status = 404, description = "No such process", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn get(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let (_entry, agent) = state.manager.agent(who, &id).await?;
    Ok(Json(process_info(&find(&agent, pid).await?)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// How long to wait, e.g. `30s` (default: until it exits).
    timeout: Option<String>,
    /// `utf-8` (default) or `base64`.
    encoding: Option<Encoding>,
    /// Per-stream cap on returned bytes (default 16 MiB, at most 256 MiB).
    max_output: Option<u64>,
}

/// Wait for a process to exit; returns its result as a synchronous exec does.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/wait", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID"), WaitQuery),
    responses(
        (status = 200, description = "The result, with the output still in the replay buffer", body = ExecResult),
        (status = 404, description = "No such process", body = ErrorBody),
        (status = 504, description = "Still running when the timeout passed", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn wait(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(query): ApiQuery<WaitQuery>,
) -> Result<Json<ExecResult>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let timeout = match query.timeout.as_deref() {
        None | Some("") => None,
        // Zero, however written, is no limit (as an exec's timeout).
        Some(t) => Some(cove_api::units::parse_duration(t).map_err(ApiError::invalid)?)
            .filter(|t| !t.is_zero()),
    };
    let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
    let (mut process, _) = agent
        .attach(pid, [0, 0], STREAM_WINDOW, false)
        .await
        .map_err(|e| attach_error(pid, e))?;
    let cap = query.max_output.unwrap_or(exec::DEFAULT_MAX_OUTPUT);
    if cap > exec::MAX_MAX_OUTPUT {
        return Err(ApiError::invalid(format!(
            "max_output {cap} is over the limit of {} bytes",
            exec::MAX_MAX_OUTPUT
        )));
    }
    let collect = process.collect_capped(cap);
    let output = match timeout {
        Some(t) => tokio::time::timeout(t, collect).await.map_err(|_| {
            ApiError::new(
                ErrorCode::Timeout,
                format!(
                    "process {pid} is still running after {}",
                    cove_api::units::format_duration(t)
                ),
            )
        })?,
        None => collect.await,
    }
    .map_err(exec::client_error)?;
    Ok(Json(exec::result(
        &output,
        query.encoding.unwrap_or_default(),
    )))
}

/// Send a signal to a process (by default to its whole process group).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/signal", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    request_body = SignalRequest,
    responses(
        (status = 200, description = "Sent", body = ProcessInfo),
        (status = 400, description = "Not a signal", body = ErrorBody),
        (status = 404, description = "No such process", body = ErrorBody),
        (status = 409, description = "The process has already exited", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn signal(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiJson(req): ApiJson<SignalRequest>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let number = cove_api::parse_signal(&req.signal).map_err(ApiError::invalid)?;
    let (_entry, agent) = state.manager.agent(who, &id).await?;
    let info = find(&agent, pid).await?;
    if info.status.is_some() {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!("process {pid} has already exited"),
        ));
    }
    let group = req.group.unwrap_or(true);
    if number == libc::SIGKILL && group {
        // KILL to the group kills the whole tree: the group and the
        // process's cgroup, which also holds children that left the group.
        agent.kill(pid).await.map_err(exec::client_error)?;
    } else {
        agent
            .signal(pid, number, group)
            .await
            .map_err(exec::client_error)?;
    }
    Ok(Json(process_info(&info)))
}

/// Write the request body (raw bytes) to a process's stdin.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written", body = StdinWritten),
        (status = 404, description = "No such process", body = ErrorBody),
        (status = 409, description = "Its stdin is closed", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn stdin(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    body: Body,
) -> Result<Json<StdinWritten>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
    let info = find(&agent, pid).await?;
    if !info.stdin_open {
        return Err(ApiError::new(
            ErrorCode::Conflict,
            format!(
                "the stdin of process {pid} is closed (it was closed, by a stdin/close or by the process itself, or the process was not started with \"background\": true and \"stdin_open\": true)"
            ),
        ));
    }
    let mut writer = agent.stdin(pid);
    let mut stream = body.into_data_stream();
    let mut written = 0u64;
    let closed = |e| {
        ApiError::new(
            ErrorCode::Conflict,
            format!("cannot write to process {pid}: {e}"),
        )
    };
    while let Some(chunk) = stream.next().await {
        let chunk =
            chunk.map_err(|e| ApiError::invalid(format!("reading the request body: {e}")))?;
        if let Err(e) = writer.write_all(&chunk).await {
            super::drain(&mut stream).await;
            return Err(closed(e));
        }
        written += chunk.len() as u64;
    }
    writer.flush().await.map_err(closed)?;
    writer.release();
    Ok(Json(StdinWritten { bytes: written }))
}

/// Close a process's stdin (end of input).
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/processes/{pid}/stdin/close", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID")),
    responses(
        (status = 200, description = "Closed", body = ProcessInfo),
        (status = 404, description = "No such process", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn close_stdin(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
) -> Result<Json<ProcessInfo>, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let (_entry, agent) = state.manager.agent(who, &id).await?;
    find(&agent, pid).await?;
    agent.close_stdin(pid).await.map_err(exec::client_error)?;
    // Read again: the answer shows the pipe closed.
    let info = find(&agent, pid).await?;
    Ok(Json(process_info(&info)))
}

#[derive(Debug, Default, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct StreamQuery {
    /// Resume stdout from this byte offset (instead of `Last-Event-ID`).
    stdout_offset: Option<u64>,
    /// Resume stderr from this byte offset.
    stderr_offset: Option<u64>,
    /// Both streams from this offset (shorthand).
    offset: Option<u64>,
    /// `utf-8` (default: text, base64 for chunks that are not UTF-8) or `base64`.
    encoding: Option<Encoding>,
    /// Make the process wait for this reader instead of dropping what it
    /// has not read (default: false for `stream`, true for `attach`).
    backpressure: Option<bool>,
}

/// Where a stream starts: `Last-Event-ID` wins, then the query.
fn resume_from(headers: &HeaderMap, query: &StreamQuery) -> Result<[u64; 2], ApiError> {
    if let Some(id) = headers.get("last-event-id").and_then(|v| v.to_str().ok()) {
        let (o, e) = id.split_once('.').ok_or_else(|| {
            ApiError::invalid(format!("Last-Event-ID {id:?} is not <stdout>.<stderr>"))
        })?;
        let parse = |s: &str| {
            s.parse::<u64>().map_err(|_| {
                ApiError::invalid(format!("Last-Event-ID {id:?} is not <stdout>.<stderr>"))
            })
        };
        return Ok([parse(o)?, parse(e)?]);
    }
    let base = query.offset.unwrap_or(0);
    Ok([
        query.stdout_offset.unwrap_or(base),
        query.stderr_offset.unwrap_or(base),
    ])
}

/// One server-sent event, rendered: `event`, `id` and a one-line `data`
/// (JSON never holds a raw newline). Written by hand rather than through
/// axum's `Event`, which copies and scans the data once more: on a fast
/// stream the payload is most of the daemon's work.
fn sse_event(name: &str, id: Option<&str>, data: &str) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 32);
    sse_head(&mut out, name, id);
    out.extend_from_slice(data.as_bytes());
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// The lines of an event before its data, and the `data: ` prefix.
fn sse_head(out: &mut Vec<u8>, name: &str, id: Option<&str>) {
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    if let Some(id) = id {
        out.extend_from_slice(b"\nid: ");
        out.extend_from_slice(id.as_bytes());
    }
    out.extend_from_slice(b"\ndata: ");
}

/// Turns output chunks into SSE events, keeping offsets and holding back an
/// incomplete UTF-8 sequence at the end of a chunk for the next one.
struct EventWriter {
    next: [u64; 2],
    pending: [Vec<u8>; 2],
    encoding: Encoding,
}

impl EventWriter {
    fn id(&self) -> String {
        format!("{}.{}", self.next[0], self.next[1])
    }

    fn event(&self, name: &str, data: &str) -> Bytes {
        sse_event(name, Some(&self.id()), data)
    }

    fn chunk(&mut self, stream: Stream, offset: u64, data: &[u8], last: bool) -> Option<Bytes> {
        let i = if stream == Stream::Stdout { 0 } else { 1 };
        if self.pending[i].is_empty() {
            self.next[i] = offset;
        }
        // Most chunks arrive with nothing held back: use them in place.
        let joined;
        let bytes: &[u8] = if self.pending[i].is_empty() {
            data
        } else {
            let mut held = std::mem::take(&mut self.pending[i]);
            held.extend_from_slice(data);
            joined = held;
            &joined
        };
        // How much of the chunk goes as text; None: all of it as base64.
        let text_len = match self.encoding {
            Encoding::Base64 => None,
            Encoding::Utf8 => match std::str::from_utf8(bytes) {
                Ok(_) => Some(bytes.len()),
                // A character split across chunks: send the rest next time.
                Err(e) if e.error_len().is_none() && !last && e.valid_up_to() + 4 > bytes.len() => {
                    Some(e.valid_up_to())
                }
                // Not text: this chunk goes as base64.
                Err(_) => None,
            },
        };
        let used = text_len.unwrap_or(bytes.len());
        self.pending[i] = bytes[used..].to_vec();
        if used == 0 {
            return None;
        }
        let start = self.next[i];
        self.next[i] += used as u64;
        // The event is written straight into its buffer: the payload is the
        // bulk of it, and base64 needs no escaping.
        let mut out = Vec::with_capacity(used * 4 / 3 + 128);
        sse_head(&mut out, stream.name(), Some(&self.id()));
        match text_len {
            Some(len) => {
                let text = std::str::from_utf8(&bytes[..len]).unwrap_or_default();
                out.extend_from_slice(br#"{"encoding":"utf-8","data":"#);
                let _ = serde_json::to_writer(&mut out, text);
            }
            None => {
                out.extend_from_slice(br#"{"encoding":"base64","data":""#);
                base64_simd::STANDARD.encode_append(&bytes[..used], &mut out);
                out.extend_from_slice(b"\"");
            }
        }
        out.extend_from_slice(format!(r#","offset":{start}}}"#).as_bytes());
        out.extend_from_slice(b"\n\n");
        Some(Bytes::from(out))
    }

    fn flush(&mut self) -> Vec<Bytes> {
        let mut events = Vec::new();
        for stream in [Stream::Stdout, Stream::Stderr] {
            let i = if stream == Stream::Stdout { 0 } else { 1 };
            if !self.pending[i].is_empty() {
                let offset = self.next[i];
                if let Some(event) = self.chunk(stream, offset, &[], true) {
                    events.push(event);
                }
            }
        }
        events
    }
}

/// Most output bytes joined into one SSE event (a single chunk from the
/// agent, at most `MAX_OUTPUT_CHUNK`, is never split).
const JOIN_OUTPUT: usize = 1 << 20;

/// Chunks from the agent at least this large are an event each, uncopied
/// (the agent sends what it holds in one chunk, so a fast writer's chunks
/// are large already).
const JOIN_BELOW: usize = 64 * 1024;

/// How long a stream may be silent before a heartbeat comment goes out
/// (proxies close connections that look idle).
const HEARTBEAT: Duration = Duration::from_secs(15);

/// Relay a process's events into an SSE channel until it exits.
async fn relay(mut process: Process, from: [u64; 2], encoding: Encoding, tx: mpsc::Sender<Bytes>) {
    let mut writer = EventWriter {
        next: from,
        pending: [Vec::new(), Vec::new()],
        encoding,
    };
    // An event read ahead while joining output, to handle next.
    let mut ahead = None;
    loop {
        let next = match ahead.take() {
            Some(next) => next,
            None => process.next_event().await,
        };
        let event = match next {
            Ok(event) => event,
            Err(err) => {
                let data =
                    serde_json::json!({ "message": format!("lost the sandbox's agent: {err}") });
                let _ = tx.send(sse_event("error", None, &data.to_string())).await;
                return;
            }
        };
        let events = match event {
            ProcessEvent::Output {
                stream,
                offset,
                data,
            } if data.len() >= JOIN_BELOW => {
                // Large enough to go alone, from where it was read.
                writer
                    .chunk(stream, offset, &data, false)
                    .into_iter()
                    .collect()
            }
            ProcessEvent::Output {
                stream,
                offset,
                data,
            } => {
                // Small output that has already arrived goes in the same
                // event: a fast writer of small pieces makes few events.
                let mut joined = data.to_vec();
                while joined.len() < JOIN_OUTPUT {
                    match process.try_next_event().await {
                        Some(Ok(ProcessEvent::Output {
                            stream: more_stream,
                            offset: more_offset,
                            data: more,
                        })) if more_stream == stream
                            && more_offset == offset + joined.len() as u64
                            && joined.len() + more.len() <= JOIN_OUTPUT =>
                        {
                            // Grown once, not doubled (and copied) a few times.
                            joined.reserve_exact(JOIN_OUTPUT.saturating_sub(joined.len()));
                            joined.extend_from_slice(&more);
                        }
                        Some(other) => {
                            ahead = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                writer
                    .chunk(stream, offset, &joined, false)
                    .into_iter()
                    .collect()
            }
            ProcessEvent::Dropped { stream, from, to } => {
                let i = if stream == Stream::Stdout { 0 } else { 1 };
                writer.pending[i].clear();
                writer.next[i] = to;
                let data = serde_json::json!({ "stream": stream.name(), "from": from, "to": to });
                vec![writer.event("dropped", &data.to_string())]
            }
            ProcessEvent::Exited(status) => {
                let mut events = writer.flush();
                let data = serde_json::to_string(&exit_info(&status)).unwrap_or_default();
                events.push(writer.event("exit", &data));
                for event in events {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                return;
            }
        };
        for event in events {
            if tx.send(event).await.is_err() {
                // The client left: dropping `process` detaches from it.
                return;
            }
        }
    }
}

/// A `text/event-stream` response of the events sent on `rx`, with a
/// heartbeat comment whenever the stream has been silent for a while.
fn sse(rx: mpsc::Receiver<Bytes>) -> Response {
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let next = match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
            Ok(Some(event)) => event,
            Ok(None) => return None,
            Err(_silent) => Bytes::from_static(b":heartbeat\n\n"),
        };
        Some((Ok::<_, Infallible>(next), rx))
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(events),
    )
        .into_response()
}

/// Run a command in the background and stream its output as server-sent
/// events: `start` (with the pid), `stdout`/`stderr` chunks, `dropped`,
/// then one `exit`. The process keeps running if the client disconnects;
/// reconnect to `…/processes/{pid}/stream` with `Last-Event-ID`.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/exec/stream", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = ExecRequest,
    responses(
        (status = 200, description = "text/event-stream of start, stdout, stderr, dropped, exit"),
        (status = 400, description = "Invalid request", body = ErrorBody),
        (status = 409, description = "The sandbox is paused", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn exec_stream(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecRequest>,
) -> Result<Response, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let (mut spec, stdin) = exec::process_spec(&req)?;
    spec.tag = req.tag.clone();
    let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
    state.manager.metrics().execs.inc();
    let started = exec::spawn_followed(&agent, spec, STREAM_WINDOW, stdin, req.stdin_open).await?;
    let pid = started.pid();
    let (tx, rx) = mpsc::channel(EVENTS_IN_FLIGHT);
    let start = serde_json::json!({ "pid": pid }).to_string();
    let _ = tx.send(sse_event("start", Some("0.0"), &start)).await;
    tokio::spawn(async move {
        let _agent = agent;
        relay(started, [0, 0], req.encoding, tx).await;
    });
    Ok(sse(rx))
}

/// Stream a process's output from an offset (`Last-Event-ID` or query).
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}/stream", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID"), StreamQuery),
    responses(
        (status = 200, description = "text/event-stream of stdout, stderr, dropped, exit"),
        (status = 404, description = "No such process", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn stream(
    State(state): State<AppState>,
    auth: Auth,
    headers: HeaderMap,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(query): ApiQuery<StreamQuery>,
) -> Result<Response, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let from = resume_from(&headers, &query)?;
    let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
    let backpressure = query.backpressure.unwrap_or(false);
    let (process, _) = agent
        .attach(pid, from, STREAM_WINDOW, backpressure)
        .await
        .map_err(|e| attach_error(pid, e))?;
    let (tx, rx) = mpsc::channel(EVENTS_IN_FLIGHT);
    let encoding = query.encoding.unwrap_or_default();
    tokio::spawn(async move {
        let _agent = agent;
        relay(process, from, encoding, tx).await;
    });
    Ok(sse(rx))
}

/// Control messages a WebSocket client may send as text frames.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Control {
    Resize {
        rows: u16,
        cols: u16,
    },
    Signal {
        signal: serde_json::Value,
        group: Option<bool>,
    },
    CloseStdin,
}

/// Attach to a process over a WebSocket: binary frames from the client are
/// stdin; binary frames to the client are output, the first byte naming the
/// stream (1 stdout, 2 stderr); text frames carry control messages
/// (`{"type":"resize","rows":24,"cols":80}`, `{"type":"signal","signal":"INT"}`,
/// `{"type":"close_stdin"}`) and, from the server, `dropped` and the final
/// `{"type":"exit", …}`.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/processes/{pid}/attach", tag = "exec",
    params(("id" = String, Path, description = "Sandbox ID"), ("pid" = u32, Path, description = "Process ID"), StreamQuery),
    responses(
        (status = 101, description = "WebSocket"),
        (status = 404, description = "No such process", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn attach(
    State(state): State<AppState>,
    auth: Auth,
    ApiPath((id, pid)): ApiPath<(String, u32)>,
    ApiQuery(query): ApiQuery<StreamQuery>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let who = auth.require(Scope::Exec)?;
    let upgrade = upgrade.map_err(|e| {
        ApiError::invalid(format!(
            "this endpoint is a WebSocket; connect with a WebSocket client ({})",
            e.body_text()
        ))
    })?;
    let from = [
        query.stdout_offset.or(query.offset).unwrap_or(0),
        query.stderr_offset.or(query.offset).unwrap_or(0),
    ];
    let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
    let backpressure = query.backpressure.unwrap_or(true);
    let (process, info) = agent
        .attach(pid, from, STREAM_WINDOW, backpressure)
        .await
        .map_err(|e| attach_error(pid, e))?;
    Ok(upgrade.on_upgrade(move |socket| websocket(socket, agent, process, info.stdin_open)))
}

async fn websocket(socket: WebSocket, agent: AgentClient, mut process: Process, stdin_open: bool) {
    let pid = process.pid();
    let (mut sink, mut incoming) = socket.split();
    use futures::SinkExt;
    let input_agent = agent.clone();
    let input = tokio::spawn(async move {
        let mut writer = stdin_open.then(|| input_agent.stdin(pid));
        while let Some(Ok(message)) = incoming.next().await {
            match message {
                Message::Binary(data) => {
                    if let Some(w) = writer.as_mut()
                        && w.write_all(&data).await.is_err()
                    {
                        writer = None;
                    }
                }
                Message::Text(text) => match serde_json::from_str::<Control>(&text) {
                    Ok(Control::Resize { rows, cols }) => {
                        let _ = input_agent.resize(pid, rows, cols).await;
                    }
                    Ok(Control::Signal { signal, group }) => {
                        if let Ok(n) = cove_api::parse_signal(&signal) {
                            let _ = input_agent.signal(pid, n, group.unwrap_or(true)).await;
                        }
                    }
                    Ok(Control::CloseStdin) => {
                        if let Some(w) = writer.take() {
                            let _ = w.close().await;
                        }
                    }
                    Err(err) => tracing::debug!(%err, "ignoring a malformed control message"),
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
        if let Some(w) = writer {
            // The socket went away: leave stdin open for a later attach.
            w.release();
        }
    });
    loop {
        let message = match process.next_event().await {
            Ok(ProcessEvent::Output { stream, data, .. }) => {
                let mut frame = Vec::with_capacity(data.len() + 1);
                frame.push(if stream == Stream::Stdout { 1 } else { 2 });
                frame.extend_from_slice(&data);
                Message::Binary(frame.into())
            }
            Ok(ProcessEvent::Dropped { stream, from, to }) => Message::Text(
                serde_json::json!({ "type": "dropped", "stream": stream.name(), "from": from, "to": to }).to_string().into(),
            ),
            Ok(ProcessEvent::Exited(status)) => {
                let mut value = serde_json::to_value(exit_info(&status)).unwrap_or_default();
                value["type"] = "exit".into();
                let _ = sink.send(Message::Text(value.to_string().into())).await;
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
            Err(err) => {
                let value = serde_json::json!({ "type": "error", "message": err.to_string() });
                let _ = sink.send(Message::Text(value.to_string().into())).await;
                break;
            }
        };
        if sink.send(message).await.is_err() {
            break;
        }
    }
    // Let the client answer our Close (the input task reads until it does)
    // before the socket goes: closing with its frames unread would reset
    // the connection and could destroy the exit message in flight.
    let abort = input.abort_handle();
    if tokio::time::timeout(Duration::from_secs(2), input)
        .await
        .is_err()
    {
        abort.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_silent_stream_gets_heartbeats_then_its_events_then_ends() {
        let (tx, rx) = mpsc::channel(EVENTS_IN_FLIGHT);
        let response = sse(rx);
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "text/event-stream"
        );
        let mut body = response.into_body().into_data_stream();
        let mut next = async || body.next().await.map(|b| b.unwrap());
        // Nothing to say for HEARTBEAT: a comment goes out (the paused
        // clock moves on by itself).
        let before = tokio::time::Instant::now();
        assert_eq!(next().await.unwrap(), &b":heartbeat\n\n"[..]);
        assert!(before.elapsed() >= HEARTBEAT);
        tx.send(sse_event("exit", Some("3.0"), r#"{"exit_code":0}"#))
            .await
            .unwrap();
        assert_eq!(
            next().await.unwrap(),
            &b"event: exit\nid: 3.0\ndata: {\"exit_code\":0}\n\n"[..]
        );
        drop(tx);
        assert!(next().await.is_none());
    }

    #[test]
    fn base64_and_text_chunks_render_as_one_event_each() {
        let mut w = EventWriter {
            next: [0, 0],
            pending: [Vec::new(), Vec::new()],
            encoding: Encoding::Utf8,
        };
        let text = w.chunk(Stream::Stdout, 0, b"a\"b\n", false).unwrap();
        assert_eq!(
            &text[..],
            &b"event: stdout\nid: 4.0\ndata: {\"encoding\":\"utf-8\",\"data\":\"a\\\"b\\n\",\"offset\":0}\n\n"[..]
        );
        let binary = w.chunk(Stream::Stderr, 5, &[0, 0xff, 1], false).unwrap();
        assert_eq!(
            &binary[..],
            &b"event: stderr\nid: 4.8\ndata: {\"encoding\":\"base64\",\"data\":\"AP8B\",\"offset\":5}\n\n"[..]
        );
    }

    #[test]
    fn utf8_split_across_chunks_is_held_back() {
        let mut w = EventWriter {
            next: [0, 0],
            pending: [Vec::new(), Vec::new()],
            encoding: Encoding::Utf8,
        };
        let euro = "€".as_bytes();
        assert!(
            w.chunk(Stream::Stdout, 0, &[b'a', euro[0]], false)
                .is_some()
        );
        assert_eq!(w.next[0], 1);
        assert_eq!(w.pending[0], vec![euro[0]]);
        assert!(w.chunk(Stream::Stdout, 2, &euro[1..], false).is_some());
        assert_eq!(w.next[0], 4);
        assert!(w.pending[0].is_empty());
        // Bytes that are not UTF-8 at all go as base64.
        assert!(w.chunk(Stream::Stderr, 0, &[0xff, 0xfe], false).is_some());
        assert_eq!(w.next[1], 2);
    }
}
