//! The seed platforms' dialects. Each adapter parses its platform's
//! requests, calls the same manager and exec functions as the native API,
//! and renders its platform's responses and error envelope — never the
//! native one. No exec logic lives here.
//!
//! | dialect | base | errors |
//! |---|---|---|
//! | Hyperfleet | `/machines` | `{"error":{"code":"NOT_FOUND","message":…}}` |
//! | HopX | `/hopx/{sandbox_id}` | `{"error":…,"code":…}`; a failed command is a 500 with its result |
//! | GBOX | `/api/v1` | `{"statusCode":404,"message":…,"error":"Not Found"}` |
//! | Declaw | `/sandboxes` | `{"message":…}` |

mod declaw;
mod gbox;
mod hopx;
mod hyperfleet;
pub(crate) mod machines;

use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::Request;
use axum::http::request::Parts;
use cove_api::{ExecRequest, Scope};
use cove_protocol::client::Output;

use super::AppState;
use super::extract::{authenticate, read_json_body};
use crate::auth::Principal;
use crate::error::ApiError;
use crate::exec;

/// Every dialect's routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .merge(hyperfleet::routes())
        .merge(hopx::routes())
        .merge(gbox::routes())
        .merge(declaw::routes())
}

/// `err` in the error shape of the dialect that owns `path`, or `None` for
/// a path of no dialect (the native API's). Requests that reach no handler
/// (an unknown path, a wrong method, a handler that panicked) are answered
/// through this, so a dialect's client never sees another's envelope.
pub(crate) fn render_for_path(path: &str, err: ApiError) -> Option<axum::response::Response> {
    let under = |base: &str| {
        path.strip_prefix(base)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
    };
    if under("/machines") {
        Some(hyperfleet::render(err))
    } else if path.starts_with("/hopx/") {
        Some(hopx::render(err))
    } else if under("/api/v1") {
        Some(gbox::render(err))
    } else if under("/sandboxes") {
        Some(declaw::render(err))
    } else {
        None
    }
}

/// A dialect request: the caller and the JSON body.
pub(crate) struct Call {
    pub who: Principal,
    pub parts: Parts,
    pub body: Bytes,
}

impl Call {
    /// Authenticate and read the body, with errors in `ApiError` terms for
    /// the dialect to render.
    pub async fn accept(state: &AppState, req: Request) -> Result<Call, ApiError> {
        let (parts, body) = req.into_parts();
        let who = authenticate(&parts, state)?;
        let body = read_json_body(Request::from_parts(parts.clone(), body)).await?;
        Ok(Call { who, parts, body })
    }

    pub fn require(&self, scope: Scope) -> Result<&Principal, ApiError> {
        super::extract::Auth(self.who.clone()).require(scope)?;
        Ok(&self.who)
    }

    /// The body as `T`; a missing body reads as `{}`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, ApiError> {
        super::extract::parse_json(&self.body)
    }

    /// The body as a JSON object (what every dialect's requests are): an
    /// array, a string or a number is a 400 naming what was expected.
    pub fn object(&self) -> Result<serde_json::Value, ApiError> {
        let body: serde_json::Value = self.json()?;
        if !body.is_object() {
            return Err(ApiError::invalid(
                "the request body must be a JSON object ({...})",
            ));
        }
        Ok(body)
    }

    /// A query parameter.
    pub fn query(&self, name: &str) -> Option<String> {
        let query = self.parts.uri.query()?;
        form_pairs(query)
            .into_iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v)
    }

    /// Every value of a query parameter (repeated, or comma-separated).
    pub fn query_all(&self, name: &str) -> Vec<String> {
        let Some(query) = self.parts.uri.query() else {
            return Vec::new();
        };
        form_pairs(query)
            .into_iter()
            .filter(|(k, _)| k == name || k == &format!("{name}[]"))
            .flat_map(|(_, v)| v.split(',').map(str::to_string).collect::<Vec<_>>())
            .filter(|v| !v.is_empty())
            .collect()
    }
}

fn form_pairs(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Run a command for a dialect: the same path as the native exec. Returns
/// the output; a timeout shows as `status.timed_out`.
pub(crate) async fn run(
    state: &AppState,
    who: &Principal,
    id: &str,
    req: ExecRequest,
) -> Result<Output, ApiError> {
    let (spec, stdin) = exec::process_spec(&req)?;
    let (entry, agent) = state.manager.agent(who, id).await?;
    let metrics = state.manager.metrics().clone();
    metrics.execs.inc();
    let started = Instant::now();
    let output = match exec::run(&agent, spec, stdin).await {
        Ok(output) => output,
        Err(err) => return Err(state.manager.agent_error(&entry, err).await),
    };
    metrics
        .exec_seconds
        .observe(started.elapsed().as_secs_f64());
    Ok(output)
}

/// A boolean field of a dialect's request: absent or null is `false`;
/// anything but `true` or `false` is a 400 (not silently `false`).
pub(crate) fn boolean(body: &serde_json::Value, field: &str) -> Result<bool, ApiError> {
    match body.get(field) {
        None | Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(other) => Err(ApiError::invalid(format!(
            "{field} must be true or false, not {other}"
        ))),
    }
}

/// Seconds as the dialects write them (a number, possibly fractional).
pub(crate) fn seconds(
    value: Option<&serde_json::Value>,
    default: f64,
    field: &str,
) -> Result<Duration, ApiError> {
    match value {
        None | Some(serde_json::Value::Null) => Ok(Duration::from_secs_f64(default)),
        Some(serde_json::Value::Number(n)) => match n.as_f64() {
            Some(s) if s.is_finite() && (0.0..=1e9).contains(&s) => Ok(Duration::from_secs_f64(s)),
            _ => Err(ApiError::invalid(format!(
                "`{field}` must be a non-negative number of seconds, not {n}"
            ))),
        },
        Some(other) => Err(ApiError::invalid(format!(
            "`{field}` must be a number of seconds, not {other}"
        ))),
    }
}

/// Text of captured bytes (dialects speak UTF-8 strings).
pub(crate) fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings() {
        assert_eq!(percent_decode("a%20b+c"), "a b c");
        assert_eq!(percent_decode("100%"), "100%");
        assert_eq!(
            form_pairs("status=running&labels=a%3D1"),
            vec![
                ("status".into(), "running".into()),
                ("labels".into(), "a=1".into())
            ]
        );
    }
}
