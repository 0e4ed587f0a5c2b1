//! Declaw (seed `004_…`): `/sandboxes` and `POST /sandboxes/{id}/commands`,
//! with background commands (`wait`, kill, send-stdin) and the run-stream
//! server-sent events. Keys come as `X-API-Key` (a bearer token works too).
//! Errors are `{"message": …}` with 400/401/404/409 (paused)/410
//! (killed)/413/502 (agent unreachable)/503.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use cove_api::{
    CreateSandboxRequest, DurationValue, ErrorCode, ExecRequest, Sandbox, SandboxState, Scope,
};
use cove_protocol::client::ProcessEvent;
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::{Call, boolean, run, seconds, text};
use crate::api::AppState;
use crate::error::ApiError;
use crate::exec;
use crate::manager::ListFilter;

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/sandboxes", post(create).get(list))
        .route("/sandboxes/{id}", get(get_one).delete(kill_sandbox))
        .route("/sandboxes/{id}/pause", post(pause))
        .route("/sandboxes/{id}/resume", post(resume))
        .route("/sandboxes/{id}/commands", post(commands))
        .route("/sandboxes/{id}/commands/stream", post(run_stream))
        .route("/sandboxes/{id}/commands/{pid}", delete(kill_command))
        .route("/sandboxes/{id}/commands/{pid}/wait", get(wait))
        .route("/sandboxes/{id}/commands/{pid}/stdin", post(send_stdin))
}

pub(super) fn render(err: ApiError) -> Response {
    let (status, message) = match err.code {
        ErrorCode::InvalidRequest | ErrorCode::UnsupportedMediaType => {
            (StatusCode::BAD_REQUEST, err.message)
        }
        ErrorCode::Unauthorized => (StatusCode::UNAUTHORIZED, err.message),
        ErrorCode::Forbidden => (StatusCode::FORBIDDEN, err.message),
        ErrorCode::NotFound | ErrorCode::NoRoute => (StatusCode::NOT_FOUND, err.message),
        ErrorCode::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, err.message),
        ErrorCode::SandboxPaused => (
            StatusCode::CONFLICT,
            format!(
                "{} (Sandbox is paused — resume it before running commands)",
                err.message
            ),
        ),
        ErrorCode::Conflict => (StatusCode::CONFLICT, err.message),
        ErrorCode::SandboxStopped => (
            StatusCode::GONE,
            format!("Sandbox has been killed: {}", err.message),
        ),
        ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, err.message),
        ErrorCode::AgentUnreachable => (
            StatusCode::BAD_GATEWAY,
            format!(
                "envd daemon inside the sandbox is unreachable: {}",
                err.message
            ),
        ),
        ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, err.message),
        ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, err.message),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, err.message),
    };
    let mut response = (status, axum::Json(json!({ "message": message }))).into_response();
    response.extensions_mut().insert(err.code);
    response
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(render)
}

fn state_name(state: SandboxState) -> &'static str {
    match state {
        SandboxState::Starting => "creating",
        SandboxState::Running => "running",
        SandboxState::Paused => "paused",
        SandboxState::Stopping | SandboxState::Stopped | SandboxState::Failed => "killed",
    }
}

fn sandbox_json(s: &Sandbox) -> Value {
    let timeout = s
        .metadata
        .get("declaw.timeout")
        .cloned()
        .unwrap_or(Value::Null);
    let metadata: BTreeMap<&String, &Value> = s
        .metadata
        .iter()
        .filter(|(k, _)| !k.starts_with("declaw."))
        .collect();
    json!({
        "sandbox_id": s.id,
        "template_id": s.template,
        "name": s.labels.get("name").cloned().unwrap_or_else(|| s.template.clone()),
        "state": state_name(s.state),
        "timeout": timeout,
        "metadata": metadata,
        "resources": {
            "vcpus": s.limits.cpus.map(|c| c.ceil() as u64).unwrap_or(1),
            "memory_mb": s.limits.memory.map(|m| m >> 20),
        },
        "started_at": s.started_at.clone().unwrap_or_else(|| s.created_at.clone()),
        "end_at": s.expires_at,
        "guest_ip": s.network.address,
        "envd_port": null,
    })
}

/// Declaw's `network: {allow_out, deny_out, allow_public_traffic}`: a
/// sandbox with egress through cove's policy (docs/network.md).
/// `allow_public_traffic` is about inbound URLs Declaw's cloud makes; it
/// is accepted and has no effect here.
fn declaw_network(network: &Value) -> Result<cove_api::NetworkRequest, ApiError> {
    let Some(object) = network.as_object() else {
        return Err(ApiError::invalid("network must be an object"));
    };
    let list = |field: &str| -> Result<Vec<String>, ApiError> {
        match object.get(field) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) => serde_json::from_value(v.clone()).map_err(|_| {
                ApiError::invalid(format!(
                    "network.{field} must be a list of CIDRs, IP addresses or host names"
                ))
            }),
        }
    };
    if let Some(flag) = object.get("allow_public_traffic")
        && !(flag.is_boolean() || flag.is_null())
    {
        return Err(ApiError::invalid(
            "network.allow_public_traffic must be true or false",
        ));
    }
    Ok(cove_api::NetworkRequest {
        mode: Some(cove_api::NetworkMode::Egress),
        allow_out: list("allow_out")?,
        deny_out: list("deny_out")?,
        exposed_ports: Vec::new(),
    })
}

async fn create(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let body = call.object()?;
            let template = match body.get("template") {
                None | Some(Value::Null) => None,
                Some(Value::String(t)) if matches!(t.as_str(), "" | "base" | "default") => None,
                Some(Value::String(t)) => Some(t.clone()),
                Some(_) => return Err(ApiError::invalid("template must be a string")),
            };
            // Declaw's default lifetime is 300 s; 0 means no limit.
            let timeout = seconds(body.get("timeout"), 300.0, "timeout")?;
            let envs: BTreeMap<String, String> = match body.get("envs") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(v) => serde_json::from_value(v.clone())
                    .map_err(|_| ApiError::invalid("envs must be an object of strings"))?,
            };
            let mut metadata: BTreeMap<String, Value> = match body.get("metadata") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(m)) => m.clone().into_iter().collect(),
                Some(_) => return Err(ApiError::invalid("metadata must be an object")),
            };
            metadata.insert("declaw.timeout".into(), json!(timeout.as_secs_f64()));
            let lifecycle = body.get("lifecycle").cloned().unwrap_or(Value::Null);
            let on_timeout = match lifecycle.get("on_timeout") {
                None | Some(Value::Null) => None,
                Some(Value::String(s)) if s == "kill" || s == "pause" => Some(s.clone()),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "lifecycle.on_timeout must be \"kill\" or \"pause\"",
                    ));
                }
            };
            let auto_resume = boolean(&lifecycle, "auto_resume")?;
            let network = match body.get("network").filter(|n| !n.is_null()) {
                None => cove_api::NetworkRequest::default(),
                Some(network) => declaw_network(network)?,
            };
            let req = CreateSandboxRequest {
                template,
                env: envs,
                cwd: Some("/home/user".into()),
                timeout: Some(DurationValue(timeout)),
                metadata,
                on_timeout,
                auto_resume,
                network,
                ..CreateSandboxRequest::default()
            };
            let sandbox = state.manager.create(who, req, true).await?;
            Ok((StatusCode::CREATED, axum::Json(sandbox_json(&sandbox))).into_response())
        }
        .await,
    )
}

async fn list(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            let limit = match call.query("limit") {
                None => 100,
                Some(l) => l
                    .parse::<usize>()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| ApiError::invalid("limit must be between 1 and 1000"))?,
            };
            let after = match call.query("next_token").filter(|t| !t.is_empty()) {
                None => None,
                Some(token) => {
                    let (t, id) = token
                        .split_once(':')
                        .ok_or_else(|| ApiError::invalid("malformed next_token"))?;
                    Some((
                        t.parse()
                            .map_err(|_| ApiError::invalid("malformed next_token"))?,
                        id.to_string(),
                    ))
                }
            };
            let page = state
                .manager
                .list(
                    who,
                    ListFilter {
                        state: None,
                        labels: Vec::new(),
                        limit,
                        after,
                        live_only: true,
                    },
                )
                .await?;
            let live: Vec<Value> = page.sandboxes.iter().map(sandbox_json).collect();
            Ok(
                axum::Json(json!({ "sandboxes": live, "next_token": page.next_cursor }))
                    .into_response(),
            )
        }
        .await,
    )
}

async fn get_one(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            Ok(axum::Json(sandbox_json(&state.manager.get(who, &id).await?)).into_response())
        }
        .await,
    )
}

async fn kill_sandbox(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            state.manager.delete(who, &id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn pause(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            Ok(axum::Json(sandbox_json(&state.manager.pause(who, &id).await?)).into_response())
        }
        .await,
    )
}

async fn resume(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            Ok(axum::Json(sandbox_json(&state.manager.resume(who, &id).await?)).into_response())
        }
        .await,
    )
}

/// Declaw's command request, as the native one.
fn exec_request(body: &Value) -> Result<ExecRequest, ApiError> {
    let cmd = match body.get("cmd").or_else(|| body.get("command")) {
        Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
        None | Some(Value::Null) => return Err(ApiError::invalid("cmd is required")),
        Some(_) => return Err(ApiError::invalid("cmd must be a non-empty string")),
    };
    let timeout = seconds(body.get("timeout"), 0.0, "timeout")?;
    let mut req = ExecRequest {
        cmd: Some(cmd),
        env: match body.get("envs") {
            None | Some(Value::Null) => BTreeMap::new(),
            Some(v) => serde_json::from_value(v.clone())
                .map_err(|_| ApiError::invalid("envs must be an object of strings"))?,
        },
        cwd: match body.get("cwd") {
            None | Some(Value::Null) => Some("/home/user".into()),
            Some(Value::String(c)) => Some(c.clone()),
            Some(_) => return Err(ApiError::invalid("cwd must be a string")),
        },
        user: match body.get("user") {
            None | Some(Value::Null) => None,
            Some(Value::String(u)) => Some(u.clone()),
            Some(_) => return Err(ApiError::invalid("user must be a string")),
        },
        timeout: (!timeout.is_zero()).then_some(DurationValue(timeout)),
        background: boolean(body, "background")?,
        ..ExecRequest::default()
    };
    match body.get("stdin") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        // `true` reserves a pipe for send-stdin.
        Some(Value::Bool(true)) => req.stdin_open = true,
        Some(Value::String(data)) => req.stdin = Some(data.clone()),
        Some(_) => return Err(ApiError::invalid("stdin must be a boolean or a string")),
    }
    if boolean(body, "stdin_open")? {
        req.stdin_open = true;
    }
    if req.stdin_open && !req.background {
        return Err(ApiError::invalid("stdin: true needs background: true"));
    }
    Ok(req)
}

async fn commands(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let req = exec_request(&call.object()?)?;
            if req.background {
                let response = crate::api::processes::start_background(&state, who, &id, req).await?;
                // Declaw answers a background start with 200 and {"pid": …}.
                let (_, body) = response.into_parts();
                let bytes = axum::body::to_bytes(body, 1 << 16).await.map_err(|e| ApiError::internal(e.to_string()))?;
                return Ok((StatusCode::OK, [(axum::http::header::CONTENT_TYPE, "application/json")], bytes).into_response());
            }
            let out = run(&state, who, &id, req).await?;
            let body = json!({ "stdout": text(&out.stdout), "stderr": text(&out.stderr), "exit_code": out.status.shell_code() });
            Ok(axum::Json(body).into_response())
        }
        .await,
    )
}

fn parse_pid(pid: &str) -> Result<u32, ApiError> {
    pid.parse()
        .map_err(|_| ApiError::invalid(format!("pid {pid:?} is not a valid integer")))
}

async fn wait(
    State(state): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
    req: Request,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let pid = parse_pid(&pid)?;
            let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
            let attached = agent.attach(pid, [0, 0], 1 << 20, false).await;
            let Ok((mut process, _)) = attached else {
                // Declaw's documented answer for an unknown pid.
                let body = json!({ "stdout": "", "stderr": format!("process not found: {pid}"), "exit_code": 1 });
                return Ok(axum::Json(body).into_response());
            };
            let out = process.collect_capped(exec::DEFAULT_MAX_OUTPUT).await.map_err(exec::client_error)?;
            let body = json!({ "stdout": text(&out.stdout), "stderr": text(&out.stderr), "exit_code": out.status.shell_code() });
            Ok(axum::Json(body).into_response())
        }
        .await,
    )
}

async fn kill_command(
    State(state): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
    req: Request,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let pid = parse_pid(&pid)?;
            let (_entry, agent) = state.manager.agent(who, &id).await?;
            let list = agent.list().await.map_err(exec::client_error)?;
            let running = list.iter().any(|p| p.pid == pid && p.status.is_none());
            if running {
                agent.kill(pid).await.map_err(exec::client_error)?;
            }
            Ok(axum::Json(json!({ "killed": running })).into_response())
        }
        .await,
    )
}

async fn send_stdin(
    State(state): State<AppState>,
    Path((id, pid)): Path<(String, String)>,
    req: Request,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let pid = parse_pid(&pid)?;
            let body = call.object()?;
            let data = match body.get("data") {
                Some(Value::String(d)) => d.clone(),
                _ => return Err(ApiError::invalid("data must be a string")),
            };
            let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
            let mut writer = agent.stdin(pid);
            let closed = |e| {
                ApiError::new(
                    ErrorCode::Conflict,
                    format!("cannot write to the stdin of process {pid}: {e}"),
                )
            };
            writer.write_all(data.as_bytes()).await.map_err(closed)?;
            writer.flush().await.map_err(closed)?;
            writer.release();
            Ok(axum::Json(json!({})).into_response())
        }
        .await,
    )
}

/// `POST /sandboxes/{id}/commands/stream`: Declaw's run-stream events
/// (`stdout`/`stderr` with `{"stream", "data"}`, then `exit` with
/// `{"exit_code"}`).
async fn run_stream(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let mut req = exec_request(&call.object()?)?;
            req.background = false;
            let (spec, stdin) = exec::process_spec(&req)?;
            let (_entry, agent) = state.manager.fresh_agent(who, &id).await?;
            state.manager.metrics().execs.inc();
            let mut process = exec::spawn_followed(&agent, spec, 1 << 20, stdin, false).await?;
            let pid = process.pid();
            let (tx, rx) = mpsc::channel::<Event>(8);
            tokio::spawn(async move {
                // A foreground command: a client that goes away (even
                // while the command is silent) takes it down with it.
                let guard = exec::KillOnDrop::new(agent.clone(), pid);
                loop {
                    let next = tokio::select! {
                        next = process.next_event() => next,
                        () = tx.closed() => return,
                    };
                    let event = match next {
                        Ok(ProcessEvent::Output { stream, data, .. }) => {
                            Event::default().event(stream.name()).data(
                                json!({ "stream": stream.name(), "data": text(&data) }).to_string(),
                            )
                        }
                        Ok(ProcessEvent::Dropped { .. }) => continue,
                        Ok(ProcessEvent::Exited(status)) => {
                            guard.disarm();
                            let exit = json!({ "exit_code": status.shell_code(), "pid": pid });
                            let _ = tx
                                .send(Event::default().event("exit").data(exit.to_string()))
                                .await;
                            return;
                        }
                        Err(err) => {
                            let _ = tx
                                .send(
                                    Event::default()
                                        .event("error")
                                        .data(json!({ "message": err.to_string() }).to_string()),
                                )
                                .await;
                            return;
                        }
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            });
            let stream = ReceiverStream::new(rx).map(Ok::<_, Infallible>);
            Ok(Sse::new(stream)
                .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
                .into_response())
        }
        .await,
    )
}
