//! Hyperfleet (seed `000_…`): `/machines` and `POST /machines/{id}/exec`.
//!
//! A machine is created `pending`, started and stopped explicitly, and
//! runs commands given as an argument vector with a timeout in seconds.
//! Errors are `{"error":{"code":"NOT_FOUND","message":…}}` with Hyperfleet's
//! codes: `NOT_FOUND`, `BAD_REQUEST`, `VALIDATION_ERROR`, `TIMEOUT`,
//! `VSOCK_ERROR`, `UNAUTHORIZED`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cove_api::{CreateSandboxRequest, ErrorCode, ExecRequest, Scope, SizeValue};
use serde_json::{Value, json};

use super::machines::{self, Machine, MachineState};
use super::{Call, run, seconds, text};
use crate::api::AppState;
use crate::error::ApiError;

const KIND: &str = "hyperfleet";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/machines", post(create).get(list))
        .route("/machines/{id}", get(get_one).delete(delete))
        .route("/machines/{id}/start", post(start))
        .route("/machines/{id}/stop", post(stop))
        .route("/machines/{id}/restart", post(restart))
        .route("/machines/{id}/wait", get(wait))
        .route("/machines/{id}/exec", post(exec))
}

/// Hyperfleet's error envelope.
fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({ "error": { "code": code, "message": message.into() } })),
    )
        .into_response()
}

/// A native error in Hyperfleet's terms.
pub(super) fn render(err: ApiError) -> Response {
    let (status, code) = match err.code {
        ErrorCode::InvalidRequest => (StatusCode::BAD_REQUEST, "VALIDATION_ERROR"),
        ErrorCode::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        ErrorCode::Forbidden => (StatusCode::FORBIDDEN, "FORBIDDEN"),
        ErrorCode::NotFound | ErrorCode::NoRoute => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        ErrorCode::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
        ErrorCode::SandboxPaused | ErrorCode::SandboxStopped | ErrorCode::Conflict => {
            (StatusCode::BAD_REQUEST, "BAD_REQUEST")
        }
        ErrorCode::PayloadTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "PAYLOAD_TOO_LARGE"),
        ErrorCode::UnsupportedMediaType => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "BAD_REQUEST"),
        ErrorCode::AgentUnreachable => (StatusCode::BAD_GATEWAY, "VSOCK_ERROR"),
        ErrorCode::Timeout => (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT"),
        ErrorCode::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
    };
    let mut response = error(status, code, err.message);
    response.extensions_mut().insert(err.code);
    response
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(render)
}

fn status_name(state: MachineState) -> &'static str {
    match state {
        MachineState::Pending => "pending",
        MachineState::Starting => "starting",
        MachineState::Running => "running",
        MachineState::Paused => "paused",
        MachineState::Stopping => "stopping",
        MachineState::Stopped | MachineState::Terminated => "stopped",
        MachineState::Failed => "failed",
    }
}

fn machine_json(m: &Machine) -> Value {
    let spec: Value = serde_json::from_str(&m.row.spec).unwrap_or_default();
    let mut value = json!({
        "id": m.row.id,
        "name": m.row.name,
        "status": status_name(m.state),
        "vcpu_count": spec["vcpu_count"],
        "mem_size_mib": spec["mem_size_mib"],
        "exposed_ports": spec.get("exposed_ports").cloned().unwrap_or_else(|| json!([])),
        "created_at": cove_api::rfc3339_millis(m.row.created_at as u64),
        "updated_at": cove_api::rfc3339_millis(m.row.updated_at as u64),
    });
    // `error` explains a failure; a stop the client asked for is not one.
    if m.state == MachineState::Failed
        && let Some(reason) = &m.reason
    {
        value["error"] = reason.clone().into();
    }
    value
}

fn bad_request(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorCode::Conflict, message)
}

fn validation(message: impl Into<String>) -> ApiError {
    ApiError::invalid(message)
}

/// The sandbox a machine's spec asks for.
fn sandbox_request(m: &Machine) -> CreateSandboxRequest {
    let spec: Value = serde_json::from_str(&m.row.spec).unwrap_or_default();
    let mut labels = BTreeMap::new();
    labels.insert("hyperfleet.name".to_string(), m.row.name.clone());
    CreateSandboxRequest {
        cpus: spec["vcpu_count"].as_u64().map(|n| {
            let available = std::thread::available_parallelism()
                .map(|p| p.get())
                .unwrap_or(1) as f64;
            (n as f64).min(available)
        }),
        memory: spec["mem_size_mib"]
            .as_u64()
            .map(|mib| SizeValue(mib.saturating_mul(1 << 20))),
        labels,
        // Published on the host's 127.0.0.1, on ports the kernel picks
        // (GET /v1/sandboxes/{id} shows them); the machine has no egress.
        network: cove_api::NetworkRequest {
            exposed_ports: spec["exposed_ports"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|p| p.as_u64())
                .filter_map(|p| u16::try_from(p).ok())
                .map(|port| cove_api::PortRequest {
                    port,
                    host_port: None,
                })
                .collect(),
            ..cove_api::NetworkRequest::default()
        },
        ..CreateSandboxRequest::default()
    }
}

async fn create(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let body = call.object()?;
            let name = match &body["name"] {
                Value::String(n) if !n.trim().is_empty() => n.trim().to_string(),
                Value::Null => return Err(validation("name is required")),
                _ => return Err(validation("name must be a non-empty string")),
            };
            let vcpu = match &body["vcpu_count"] {
                Value::Null => 1,
                v => v
                    .as_u64()
                    .filter(|n| *n >= 1)
                    .ok_or_else(|| validation("vcpu_count must be an integer of at least 1"))?,
            };
            // cove's smallest memory limit is 8 MiB; the largest is what
            // still counts in bytes.
            let mem = match &body["mem_size_mib"] {
                Value::Null => 512,
                v => v
                    .as_u64()
                    .filter(|n| *n >= 8 && n.checked_mul(1 << 20).is_some())
                    .ok_or_else(|| {
                        validation(format!(
                            "mem_size_mib must be a whole number of MiB, at least 8, not {v}"
                        ))
                    })?,
            };
            let ports = match &body["exposed_ports"] {
                Value::Null => json!([]),
                Value::Array(items)
                    if items
                        .iter()
                        .all(|p| p.as_u64().is_some_and(|p| (1..=65535).contains(&p))) =>
                {
                    body["exposed_ports"].clone()
                }
                _ => {
                    return Err(validation(
                        "exposed_ports must be a list of port numbers (1-65535)",
                    ));
                }
            };
            let spec = json!({ "vcpu_count": vcpu, "mem_size_mib": mem, "exposed_ports": ports });
            let Some(row) = machines::insert(&state, who, KIND, &name, &spec).await? else {
                return Err(validation(format!(
                    "a machine named {name:?} already exists"
                )));
            };
            let m = Machine {
                row,
                state: MachineState::Pending,
                reason: None,
                expires_at: None,
            };
            Ok((StatusCode::CREATED, axum::Json(machine_json(&m))).into_response())
        }
        .await,
    )
}

async fn list(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            let status = call.query("status").filter(|s| !s.is_empty());
            let number = |name: &str, default: usize| -> Result<usize, ApiError> {
                match call.query(name) {
                    None => Ok(default),
                    Some(v) => v
                        .parse()
                        .map_err(|_| validation(format!("{name} must be a non-negative integer"))),
                }
            };
            let (limit, offset) = (number("limit", 50)?, number("offset", 0)?);
            if limit == 0 || limit > 1000 {
                return Err(validation("limit must be between 1 and 1000"));
            }
            let mut all = machines::list(&state, who, KIND).await?;
            if let Some(status) = &status {
                all.retain(|m| status_name(m.state) == status);
            }
            let total = all.len();
            let page: Vec<Value> = all
                .iter()
                .skip(offset)
                .take(limit)
                .map(machine_json)
                .collect();
            Ok(axum::Json(json!({ "machines": page, "total": total })).into_response())
        }
        .await,
    )
}

async fn get_one(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(machine_json(&m)).into_response())
        }
        .await,
    )
}

async fn delete(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if !matches!(
                m.state,
                MachineState::Stopped
                    | MachineState::Pending
                    | MachineState::Failed
                    | MachineState::Terminated
            ) {
                return Err(bad_request(format!(
                    "Cannot delete machine in '{}' state; stop it first",
                    status_name(m.state)
                )));
            }
            machines::remove(&state, &m.row).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn start(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if !matches!(
                m.state,
                MachineState::Stopped | MachineState::Pending | MachineState::Failed
            ) {
                return Err(bad_request(format!(
                    "Cannot start machine in '{}' state",
                    status_name(m.state)
                )));
            }
            machines::start(&state, who, &m.row, sandbox_request(&m), true).await?;
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(machine_json(&m)).into_response())
        }
        .await,
    )
}

async fn stop(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if !matches!(
                m.state,
                MachineState::Running | MachineState::Paused | MachineState::Starting
            ) {
                return Err(bad_request(format!(
                    "Cannot stop machine in '{}' state",
                    status_name(m.state)
                )));
            }
            machines::stop(&state, who, &m.row, "stopped", "stopped by request").await?;
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(machine_json(&m)).into_response())
        }
        .await,
    )
}

async fn restart(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if !matches!(m.state, MachineState::Running | MachineState::Paused) {
                return Err(bad_request(format!(
                    "Cannot restart machine in '{}' state",
                    status_name(m.state)
                )));
            }
            machines::stop(&state, who, &m.row, "stopped", "restarting").await?;
            machines::start(&state, who, &m.row, sandbox_request(&m), true).await?;
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(machine_json(&m)).into_response())
        }
        .await,
    )
}

async fn wait(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            let want = call.query("status").unwrap_or_else(|| "running".into());
            let timeout = match call.query("timeout") {
                None => Duration::from_secs(30),
                Some(t) => {
                    let secs: f64 = t.parse().map_err(|_| {
                        validation(format!("timeout {t:?} must be a number of seconds"))
                    })?;
                    if !(0.0..=30.0).contains(&secs) {
                        return Err(validation("timeout must be between 0 and 30 seconds"));
                    }
                    Duration::from_secs_f64(secs)
                }
            };
            let deadline = Instant::now() + timeout;
            loop {
                let m = machines::load(&state, who, KIND, &id).await?;
                if status_name(m.state) == want {
                    return Ok(axum::Json(machine_json(&m)).into_response());
                }
                if Instant::now() >= deadline {
                    return Err(ApiError::new(
                        ErrorCode::Timeout,
                        format!(
                            "machine did not reach '{want}' within {}s (it is '{}')",
                            timeout.as_secs(),
                            status_name(m.state)
                        ),
                    ));
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        }
        .await,
    )
}

async fn exec(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let body = call.object()?;
            let command = match body.get("command").or_else(|| body.get("cmd")) {
                Some(Value::Array(items)) if !items.is_empty() => items
                    .iter()
                    .map(|v| v.as_str().map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| validation("command must be an array of strings"))?,
                Some(Value::Array(_)) => return Err(validation("command must not be empty")),
                Some(Value::String(_)) => {
                    return Err(validation(
                        "command must be an array of strings, e.g. [\"ls\", \"-la\"]; use [\"sh\", \"-c\", \"…\"] for a shell string",
                    ));
                }
                Some(_) => return Err(validation("command must be an array of strings")),
                None => return Err(validation("command is required")),
            };
            let timeout = seconds(body.get("timeout"), 30.0, "timeout")?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if m.state != MachineState::Running {
                return Err(bad_request("Machine must be running to execute commands"));
            }
            let req = ExecRequest {
                argv: Some(command),
                timeout: (!timeout.is_zero()).then_some(cove_api::DurationValue(timeout)),
                ..ExecRequest::default()
            };
            let out = run(&state, who, &m.row.id, req).await.map_err(|e| {
                if e.code == ErrorCode::AgentUnreachable {
                    ApiError::new(ErrorCode::AgentUnreachable, "Failed to communicate with VM")
                } else {
                    e
                }
            })?;
            if out.status.timed_out {
                return Err(ApiError::new(
                    ErrorCode::Timeout,
                    format!("Command execution timed out after {} seconds", timeout.as_secs()),
                ));
            }
            let result = json!({
                "exit_code": out.status.shell_code(),
                "stdout": text(&out.stdout),
                "stderr": text(&out.stderr),
            });
            Ok(axum::Json(result).into_response())
        }
        .await,
    )
}
