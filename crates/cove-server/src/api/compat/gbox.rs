//! GBOX (seed `002_…`): `/api/v1/boxes` and `POST /api/v1/boxes/{boxId}/commands`.
//!
//! Durations are strings (`500ms`, `30s`, `5m`, `1h`); a command that times
//! out answers 200 with exit code 124. Errors are NestJS-shaped:
//! `{"statusCode": 400, "message": …, "error": "Bad Request"}`.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use cove_api::{CreateSandboxRequest, DurationValue, ErrorCode, ExecRequest, Scope, SizeValue};
use serde_json::{Value, json};

use super::machines::{self, Machine, MachineState};
use super::{Call, run, text};
use crate::api::AppState;
use crate::error::ApiError;

const KIND: &str = "gbox";

pub(super) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/v1/boxes", get(list))
        .route("/api/v1/boxes/linux", post(create))
        .route("/api/v1/boxes/{id}", get(get_one).delete(delete))
        .route("/api/v1/boxes/{id}/start", post(start))
        .route("/api/v1/boxes/{id}/stop", post(stop))
        .route("/api/v1/boxes/{id}/terminate", post(terminate))
        .route("/api/v1/boxes/{id}/commands", post(commands))
}

pub(super) fn render(err: ApiError) -> Response {
    let status = match err.code {
        ErrorCode::InvalidRequest | ErrorCode::SandboxStopped | ErrorCode::UnsupportedMediaType => {
            StatusCode::BAD_REQUEST
        }
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::NotFound | ErrorCode::NoRoute => StatusCode::NOT_FOUND,
        ErrorCode::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::SandboxPaused | ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Timeout => StatusCode::REQUEST_TIMEOUT,
        ErrorCode::AgentUnreachable => StatusCode::BAD_GATEWAY,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    let body = json!({
        "statusCode": status.as_u16(),
        "message": err.message,
        "error": status.canonical_reason().unwrap_or("Error"),
    });
    let mut response = (status, axum::Json(body)).into_response();
    response.extensions_mut().insert(err.code);
    response
}

fn respond(result: Result<Response, ApiError>) -> Response {
    result.unwrap_or_else(render)
}

/// A GBOX duration: a string with a unit (`500ms`, `30s`, `5m`, `1h`).
fn duration(value: Option<&Value>, default: &str, field: &str) -> Result<Duration, ApiError> {
    let text = match value {
        None | Some(Value::Null) => default.to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "{field} must be a duration string like \"30s\", not {other}"
            )));
        }
    };
    let ok_unit = ["ms", "s", "m", "h"]
        .iter()
        .any(|u| text.trim().ends_with(u));
    match cove_api::units::parse_duration(&text) {
        Ok(d) if ok_unit => Ok(d),
        _ => Err(ApiError::invalid(format!(
            "{field} {text:?} is not a valid duration (use a number and a unit: \"500ms\", \"30s\", \"5m\", \"1h\")"
        ))),
    }
}

fn status_name(state: MachineState) -> &'static str {
    match state {
        MachineState::Pending | MachineState::Starting => "pending",
        MachineState::Running | MachineState::Paused => "running",
        MachineState::Stopping | MachineState::Stopped => "stopped",
        MachineState::Failed => "error",
        MachineState::Terminated => "terminated",
    }
}

fn box_json(m: &Machine) -> Value {
    let spec: Value = serde_json::from_str(&m.row.spec).unwrap_or_default();
    let mut value = json!({
        "id": m.row.id,
        "status": status_name(m.state),
        "createdAt": cove_api::rfc3339_millis(m.row.created_at as u64),
        "updatedAt": cove_api::rfc3339_millis(m.row.updated_at as u64),
        "expiresAt": m.expires_at,
        "type": "linux",
        "config": {
            "os": { "version": spec["template"].as_str().unwrap_or(cove_template::DEFAULT_TEMPLATE) },
            "workingDir": spec["workingDir"],
            "labels": spec["labels"],
            "envs": spec["envs"],
            "cpu": spec["cpu"],
            "memory": spec["memory"],
            "storage": spec["storage"],
        },
    });
    if let Some(reason) = &m.reason {
        value["reason"] = reason.clone().into();
    }
    value
}

fn string_map(value: Option<&Value>, field: &str) -> Result<BTreeMap<String, String>, ApiError> {
    match value {
        None | Some(Value::Null) => Ok(BTreeMap::new()),
        Some(Value::Object(map)) => Ok(map
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.as_str()
                        .map(String::from)
                        .unwrap_or_else(|| v.to_string()),
                )
            })
            .collect()),
        Some(_) => Err(ApiError::invalid(format!(
            "{field} must be an object of strings"
        ))),
    }
}

fn sandbox_request(spec: &Value) -> CreateSandboxRequest {
    CreateSandboxRequest {
        env: serde_json::from_value(spec["envs"].clone()).unwrap_or_default(),
        labels: serde_json::from_value(spec["labels"].clone()).unwrap_or_default(),
        cwd: spec["workingDir"].as_str().map(String::from),
        cpus: spec["cpu"].as_f64(),
        memory: spec["memory"]
            .as_u64()
            .map(|mib| SizeValue(mib.saturating_mul(1 << 20))),
        disk: spec["storage"]
            .as_u64()
            .map(|gib| SizeValue(gib.saturating_mul(1 << 30))),
        timeout: spec["expiresInMs"]
            .as_u64()
            .map(|ms| DurationValue(Duration::from_millis(ms))),
        ..CreateSandboxRequest::default()
    }
}

async fn create(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let body = call.object()?;
            let wait = match body.get("wait") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(ApiError::invalid("wait must be a boolean")),
            };
            let timeout = duration(body.get("timeout"), "30s", "timeout")?;
            if timeout > Duration::from_secs(300) {
                return Err(ApiError::invalid("timeout may be at most \"5m\""));
            }
            let config = body.get("config").cloned().unwrap_or_else(|| json!({}));
            if !config.is_object() {
                return Err(ApiError::invalid("config must be an object"));
            }
            let expires = match config.get("expiresIn") {
                None | Some(Value::Null) => None,
                v => Some(duration(v, "0s", "config.expiresIn")?),
            };
            let working_dir = match config.get("workingDir") {
                None | Some(Value::Null) => "/home/user".to_string(),
                Some(Value::String(d)) if d.starts_with('/') => d.clone(),
                Some(_) => {
                    return Err(ApiError::invalid(
                        "config.workingDir must be an absolute path",
                    ));
                }
            };
            let cpu = match config.get("cpu") {
                None | Some(Value::Null) => None,
                Some(v) if v.as_f64().is_some_and(|n| n > 0.0 && n <= 1024.0) => Some(v.clone()),
                Some(v) => {
                    return Err(ApiError::invalid(format!(
                        "config.cpu must be a number of CPUs above 0 and at most 1024, not {v}"
                    )));
                }
            };
            // Whole MiB and GiB, small enough to count in bytes.
            let size = |field: &str, unit: &str, shift: u32, least: u64| match config.get(field) {
                None | Some(Value::Null) => Ok(None),
                Some(v)
                    if v.as_u64()
                        .is_some_and(|n| n >= least && n.checked_mul(1 << shift).is_some()) =>
                {
                    Ok(Some(v.clone()))
                }
                Some(v) => Err(ApiError::invalid(format!(
                    "config.{field} must be a whole number of {unit}, at least {least}, not {v}"
                ))),
            };
            let spec = json!({
                "envs": string_map(config.get("envs"), "config.envs")?,
                "labels": string_map(config.get("labels"), "config.labels")?,
                "workingDir": working_dir,
                "cpu": cpu,
                "memory": size("memory", "MiB", 20, 8)?,
                "storage": size("storage", "GiB", 30, 1)?,
                "expiresInMs": expires.map(|d| d.as_millis() as u64),
            });
            let name = crate::engine::new_id();
            let row = machines::insert(&state, who, KIND, &name, &spec)
                .await?
                .ok_or_else(|| ApiError::internal("a box with that name already exists"))?;
            let start = machines::start(&state, who, &row, sandbox_request(&spec), false);
            if let Err(err) = start.await {
                // A create that is refused makes no box.
                let _ = machines::remove(&state, &row).await;
                return Err(err);
            }
            if wait {
                let reached = state
                    .manager
                    .wait(who, &row.id, cove_api::SandboxState::Running, timeout)
                    .await;
                match reached {
                    Ok(sandbox) if sandbox.state == cove_api::SandboxState::Running => {}
                    Ok(sandbox) => {
                        let reason = sandbox
                            .reason
                            .unwrap_or_else(|| "the box failed to start".into());
                        return Err(ApiError::internal(reason));
                    }
                    Err(_) => {
                        // Not running in time: the box is removed, as GBOX does.
                        let _ = machines::stop(
                            &state,
                            who,
                            &row,
                            "terminated",
                            "did not start in time",
                        )
                        .await;
                        let _ = machines::remove(&state, &row).await;
                        return Err(ApiError::new(
                            ErrorCode::Timeout,
                            format!(
                                "the box did not reach running within {}",
                                cove_api::units::format_duration(timeout)
                            ),
                        ));
                    }
                }
            }
            let m = machines::load(&state, who, KIND, &row.id).await?;
            Ok((StatusCode::CREATED, axum::Json(box_json(&m))).into_response())
        }
        .await,
    )
}

async fn list(State(state): State<AppState>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesRead)?;
            let mut statuses = call.query_all("status");
            if statuses.is_empty() {
                statuses = vec!["running".into(), "pending".into()];
            }
            let known = [
                "all",
                "pending",
                "running",
                "stopped",
                "error",
                "terminated",
            ];
            if let Some(bad) = statuses.iter().find(|s| !known.contains(&s.as_str())) {
                return Err(ApiError::invalid(format!(
                    "status {bad:?} is not one of {}",
                    known.join(", ")
                )));
            }
            let mut labels = Vec::new();
            for pair in call.query_all("labels") {
                let (k, v) = pair
                    .split_once('=')
                    .or_else(|| pair.split_once(':'))
                    .ok_or_else(|| {
                        ApiError::invalid(format!("label filter {pair:?} must be key=value"))
                    })?;
                labels.push((k.to_string(), v.to_string()));
            }
            let number = |name: &str, default: usize| -> Result<usize, ApiError> {
                match call.query(name) {
                    None => Ok(default),
                    Some(v) => v.parse().ok().filter(|n| *n >= 1).ok_or_else(|| {
                        ApiError::invalid(format!("{name} must be a positive integer"))
                    }),
                }
            };
            let (page, page_size) = (number("page", 1)?, number("pageSize", 10)?);
            let mut boxes = machines::list(&state, who, KIND).await?;
            boxes.retain(|m| {
                let spec: Value = serde_json::from_str(&m.row.spec).unwrap_or_default();
                (statuses
                    .iter()
                    .any(|s| s == "all" || s == status_name(m.state)))
                    && labels
                        .iter()
                        .all(|(k, v)| spec["labels"][k].as_str() == Some(v))
            });
            let total = boxes.len();
            let data: Vec<Value> = boxes
                .iter()
                .skip((page - 1).saturating_mul(page_size))
                .take(page_size)
                .map(box_json)
                .collect();
            Ok(axum::Json(
                json!({ "total": total, "page": page, "pageSize": page_size, "data": data }),
            )
            .into_response())
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
            Ok(axum::Json(box_json(&m)).into_response())
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
            match m.state {
                MachineState::Running | MachineState::Paused | MachineState::Starting => {}
                MachineState::Terminated => {
                    return Err(ApiError::invalid(
                        "the box has been terminated and cannot start",
                    ));
                }
                _ => {
                    let spec: Value = serde_json::from_str(&m.row.spec).unwrap_or_default();
                    machines::start(&state, who, &m.row, sandbox_request(&spec), true).await?;
                }
            }
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(box_json(&m)).into_response())
        }
        .await,
    )
}

async fn stop_as(
    state: AppState,
    id: String,
    req: Request,
    status: &'static str,
    reason: &'static str,
) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            if m.state != MachineState::Terminated {
                machines::stop(&state, who, &m.row, status, reason).await?;
            }
            let m = machines::load(&state, who, KIND, &id).await?;
            Ok(axum::Json(box_json(&m)).into_response())
        }
        .await,
    )
}

async fn stop(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    stop_as(state, id, req, "stopped", "Box stopped by user").await
}

async fn terminate(
    State(state): State<AppState>,
    Path(id): Path<String>,
    req: Request,
) -> Response {
    stop_as(state, id, req, "terminated", "Box terminated by user").await
}

async fn delete(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::SandboxesWrite)?;
            let m = machines::load(&state, who, KIND, &id).await?;
            machines::stop(&state, who, &m.row, "terminated", "Box deleted by user").await?;
            machines::remove(&state, &m.row).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        .await,
    )
}

async fn commands(State(state): State<AppState>, Path(id): Path<String>, req: Request) -> Response {
    respond(
        async {
            let call = Call::accept(&state, req).await?;
            let who = call.require(Scope::Exec)?;
            let body = call.object()?;
            let command = match body.get("command") {
                Some(Value::String(c)) if !c.trim().is_empty() => c.clone(),
                Some(Value::Array(items)) if !items.is_empty() => {
                    // Some clients send an argument vector: join it as a shell line.
                    items
                        .iter()
                        .map(|v| v.as_str().map(shell_quote))
                        .collect::<Option<Vec<_>>>()
                        .ok_or_else(|| ApiError::invalid("command must be a string"))?
                        .join(" ")
                }
                None | Some(Value::Null) => return Err(ApiError::invalid("command is required")),
                Some(_) => return Err(ApiError::invalid("command must be a non-empty string")),
            };
            let timeout = duration(body.get("timeout"), "30s", "timeout")?;
            let m = machines::load(&state, who, KIND, &id).await?;
            match m.state {
                MachineState::Running => {}
                // GBOX has no paused state: a paused box shows as running,
                // so a command resumes it.
                MachineState::Paused => {
                    state.manager.resume(who, &id).await?;
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "box {id} is {}; start it before running commands",
                        status_name(other)
                    )));
                }
            }
            let cwd = match body.get("workingDir") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) => Some(d.clone()),
                Some(_) => return Err(ApiError::invalid("workingDir must be a string")),
            };
            let req = ExecRequest {
                cmd: Some(command),
                env: string_map(body.get("envs"), "envs")?,
                cwd,
                timeout: (!timeout.is_zero()).then_some(DurationValue(timeout)),
                ..ExecRequest::default()
            };
            let out = run(&state, who, &id, req).await?;
            let body = json!({
                "exitCode": out.status.shell_code(),
                "stdout": text(&out.stdout),
                "stderr": text(&out.stderr),
            });
            Ok(axum::Json(body).into_response())
        }
        .await,
    )
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+".contains(&b))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit() {
        assert_eq!(
            duration(Some(&json!("500ms")), "30s", "t").unwrap(),
            Duration::from_millis(500)
        );
        assert_eq!(duration(None, "30s", "t").unwrap(), Duration::from_secs(30));
        for bad in [json!("30"), json!("soon"), json!(30), json!("-1s")] {
            let err = duration(Some(&bad), "30s", "timeout").unwrap_err();
            assert!(err.message.contains("timeout"), "{err:?}");
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("ls"), "ls");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
    }
}
