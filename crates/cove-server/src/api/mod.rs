//! The native HTTP API (`/v1/...`), its OpenAPI document, and the
//! middleware every request passes: request IDs, tracing, body limit,
//! metrics, and JSON errors for unknown routes and methods.

mod backends;
pub(crate) mod compat;
pub mod extract;
pub(crate) mod files;
mod keys;
pub(crate) mod processes;
mod sandboxes;
mod system;
mod templates;

use std::path::PathBuf;
use std::sync::Arc;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Request};
use axum::http::{HeaderValue, Method, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use cove_api::ErrorCode;
use tower_http::request_id::{
    MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer,
};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;

use crate::auth::Keys;
use crate::error::ApiError;
use crate::manager::Manager;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub manager: Manager,
    pub keys: Keys,
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

/// Default limit of a JSON request body.
pub const MAX_BODY: usize = 64 << 20;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cove",
        description = "Isolated sandboxes on your own machine. Every error is \
            `{\"error\": {\"code\", \"message\"}}`; authenticate with `Authorization: Bearer <key>` \
            or `X-API-Key: <key>`.",
        license(name = "Apache-2.0")
    ),
    paths(
        sandboxes::create,
        sandboxes::list,
        sandboxes::get,
        sandboxes::delete,
        sandboxes::pause,
        sandboxes::resume,
        sandboxes::set_timeout,
        sandboxes::wait,
        sandboxes::exec,
        processes::exec_stream,
        processes::list,
        processes::get,
        processes::wait,
        processes::signal,
        processes::stdin,
        processes::close_stdin,
        processes::stream,
        processes::attach,
        files::download,
        files::upload,
        files::stat,
        files::list,
        files::mkdir,
        files::rename,
        files::remove,
        files::tar_download,
        files::tar_upload,
        files::watch,
        keys::create,
        keys::list,
        keys::revoke,
        templates::list,
        templates::get,
        templates::create,
        templates::delete,
        templates::snapshot,
        backends::list,
        backends::console,
        system::healthz,
        system::metrics,
    ),
    components(schemas(cove_api::ErrorBody, cove_api::ErrorCode, cove_api::Scope, cove_api::WatchEvent)),
    modifiers(&SecuritySchemes),
    tags(
        (name = "sandboxes", description = "Create, list, pause, resume and delete sandboxes"),
        (name = "exec", description = "Run commands in sandboxes"),
        (name = "files", description = "Files in sandboxes: transfer, list, watch"),
        (name = "keys", description = "API keys (admin)"),
        (name = "templates", description = "Templates: images, root filesystems, snapshots"),
        (name = "system", description = "Health and metrics"),
    )
)]
#[derive(Debug)]
pub struct ApiDoc;

struct SecuritySchemes;

impl utoipa::Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{
            ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme,
        };
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "api_key",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))),
        );
    }
}

/// Most of a failed upload's body that is read and thrown away, and for
/// how long, before the error is answered.
const DRAIN_LIMIT: u64 = 256 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(30);

/// Read and discard what is left of a request body whose upload failed
/// (a full disk, a closed stdin), within `DRAIN_LIMIT` and `DRAIN_TIME`.
/// Most HTTP clients read the response only once they have sent their
/// body: answering early and closing would give them a broken pipe
/// instead of the error.
pub(crate) async fn drain(body: &mut axum::body::BodyDataStream) {
    use futures::StreamExt;
    let mut seen = 0u64;
    let read = async {
        while let Some(Ok(bytes)) = body.next().await {
            seen += bytes.len() as u64;
            if seen > DRAIN_LIMIT {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// The OpenAPI document as pretty JSON (what `docs/openapi.json` holds).
pub fn openapi_json() -> String {
    ApiDoc::openapi().to_pretty_json().unwrap_or_default() + "\n"
}

#[derive(Clone, Default)]
struct RequestIds {
    next: Arc<std::sync::atomic::AtomicU64>,
    prefix: String,
}

impl MakeRequestId for RequestIds {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let n = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        HeaderValue::from_str(&format!("{}-{n:06}", self.prefix))
            .ok()
            .map(RequestId::new)
    }
}

/// Count requests and errors (by the code handlers attach to responses).
async fn count(
    axum::extract::State(state): axum::extract::State<AppState>,
    req: Request,
    next: Next,
) -> Response {
    let metrics = state.manager.metrics().clone();
    metrics.requests.inc();
    let response = next.run(req).await;
    if let Some(code) = response.extensions().get::<ErrorCode>() {
        metrics
            .errors
            .get_or_create(&vec![("code".into(), code.as_str().into())])
            .inc();
    }
    response
}

async fn no_route(method: Method, uri: Uri) -> Response {
    let path = uri.path();
    compat::render_for_path(
        path,
        ApiError::new(
            ErrorCode::NoRoute,
            format!("no such endpoint: {method} {path}"),
        ),
    )
    .unwrap_or_else(|| {
        ApiError::new(
            ErrorCode::NoRoute,
            format!("no such endpoint: {method} {path}; see /openapi.json for the API"),
        )
        .into_response()
    })
}

async fn wrong_method(method: Method, uri: Uri) -> Response {
    unrouted(
        uri.path(),
        ApiError::new(
            ErrorCode::MethodNotAllowed,
            format!("{} does not accept {method}", uri.path()),
        ),
    )
}

/// `err` in the shape of the API `path` belongs to (a dialect's or the
/// native one).
fn unrouted(path: &str, err: ApiError) -> Response {
    compat::render_for_path(path, err.clone()).unwrap_or_else(|| err.into_response())
}

/// Answer a handler's panic with a 500 in its API's error shape instead of
/// a dropped connection. The panic is logged; the daemon goes on.
async fn shield(req: Request, next: Next) -> Response {
    use futures::FutureExt;
    let path = req.uri().path().to_owned();
    match std::panic::AssertUnwindSafe(next.run(req))
        .catch_unwind()
        .await
    {
        Ok(response) => response,
        Err(panic) => {
            let what = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic".into());
            tracing::error!(%path, panic = %what, "a request handler panicked");
            unrouted(
                &path,
                ApiError::internal("internal error: the request failed inside cove (logged)"),
            )
        }
    }
}

/// Routes of the native API, without state.
pub fn native_routes() -> Router<AppState> {
    use axum::routing::{delete, get, post};
    Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get).delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/timeout", post(sandboxes::set_timeout))
        .route("/v1/sandboxes/{id}/wait", get(sandboxes::wait))
        .route("/v1/sandboxes/{id}/exec", post(sandboxes::exec))
        .route(
            "/v1/sandboxes/{id}/exec/stream",
            post(processes::exec_stream),
        )
        .route("/v1/sandboxes/{id}/processes", get(processes::list))
        .route("/v1/sandboxes/{id}/processes/{pid}", get(processes::get))
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/wait",
            post(processes::wait),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/signal",
            post(processes::signal),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stdin",
            post(processes::stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stdin/close",
            post(processes::close_stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/stream",
            get(processes::stream),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{pid}/attach",
            get(processes::attach),
        )
        .route(
            "/v1/sandboxes/{id}/files",
            get(files::download)
                .put(files::upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/sandboxes/{id}/fs", delete(files::remove))
        .route("/v1/sandboxes/{id}/fs/stat", get(files::stat))
        .route("/v1/sandboxes/{id}/fs/list", get(files::list))
        .route("/v1/sandboxes/{id}/fs/mkdir", post(files::mkdir))
        .route("/v1/sandboxes/{id}/fs/move", post(files::rename))
        .route(
            "/v1/sandboxes/{id}/fs/tar",
            get(files::tar_download)
                .put(files::tar_upload)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/sandboxes/{id}/fs/watch", get(files::watch))
        .route("/v1/keys", post(keys::create).get(keys::list))
        .route("/v1/keys/{id}", delete(keys::revoke))
        .route(
            "/v1/templates",
            get(templates::list).post(templates::create),
        )
        .route(
            "/v1/templates/{name}",
            get(templates::get).delete(templates::delete),
        )
        .route("/v1/sandboxes/{id}/snapshot", post(templates::snapshot))
        .route("/v1/backends", get(backends::list))
        .route("/v1/sandboxes/{id}/console", get(backends::console))
        .route("/healthz", get(system::healthz))
        .route("/metrics", get(system::metrics))
        .route("/openapi.json", get(system::openapi))
}

/// The whole application: native routes plus `extra` (the dialects).
pub fn app(state: AppState, extra: Router<AppState>) -> Router {
    let ids = RequestIds {
        next: Arc::default(),
        prefix: format!("{:08x}", rand::random::<u32>()),
    };
    native_routes()
        .merge(extra)
        .fallback(no_route)
        .method_not_allowed_fallback(wrong_method)
        .layer(axum::middleware::from_fn(shield))
        .layer(axum::middleware::from_fn_with_state(state.clone(), count))
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &axum::http::Request<_>| {
                    let id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("-");
                    tracing::info_span!("request", request_id = %id, method = %req.method(), path = %req.uri().path())
                })
                // A 5xx is not always the daemon's failure (HopX answers a
                // failed command with 500): `ApiError` logs real internal
                // errors itself.
                .on_failure(tower_http::trace::DefaultOnFailure::new().level(tracing::Level::DEBUG)),
        )
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(ids))
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use axum::routing::get;
    use tower::ServiceExt;

    use super::*;

    /// A handler that panics is a 500 in the envelope of its path's API,
    /// and the router goes on serving.
    #[tokio::test]
    async fn a_panicking_handler_is_a_500_in_its_dialect() {
        async fn boom() -> &'static str {
            panic!("boom")
        }
        let app: Router = Router::new()
            .route("/machines/boom", get(boom))
            .route("/sandboxes/boom", get(boom))
            .route("/v1/boom", get(boom))
            .route("/v1/fine", get(|| async { "fine" }))
            .layer(axum::middleware::from_fn(shield));
        let call = |path: &'static str| {
            let app = app.clone();
            async move {
                let response = app
                    .oneshot(Request::get(path).body(Body::empty()).unwrap())
                    .await
                    .unwrap();
                let status = response.status();
                let body = http_body_util::BodyExt::collect(response.into_body())
                    .await
                    .unwrap()
                    .to_bytes();
                (
                    status,
                    serde_json::from_slice::<serde_json::Value>(&body).ok(),
                )
            }
        };
        let (status, body) = call("/machines/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body.unwrap()["error"]["code"], "INTERNAL_ERROR");
        let (status, body) = call("/sandboxes/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        let body = body.unwrap();
        assert!(
            body["message"].is_string() && body.get("error").is_none(),
            "{body}"
        );
        let (status, body) = call("/v1/boom").await;
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body.unwrap()["error"]["code"], "internal");
        let (status, _) = call("/v1/fine").await;
        assert_eq!(status, StatusCode::OK);
    }
}
