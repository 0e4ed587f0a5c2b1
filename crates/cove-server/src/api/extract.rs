//! Request extractors whose rejections are API errors in the native
//! envelope: JSON bodies (content type, size, unknown fields named), query
//! strings, and the caller's key.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::CONTENT_TYPE;
use axum::http::request::Parts;
use cove_api::{ErrorCode, Scope};
use serde::de::DeserializeOwned;

use crate::api::AppState;
use crate::auth::Principal;
use crate::error::ApiError;

/// A JSON body. A missing body reads as `{}`.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// Parse a JSON body the way every endpoint does (shared with the
/// compatibility dialects, which wrap the error in their own envelope).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    let mut de = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let message = if inner.is_syntax() || inner.is_eof() {
            format!("malformed JSON: {inner}")
        } else if path == "." || path.is_empty() {
            format!("invalid request body: {inner}")
        } else {
            format!("invalid value for `{path}`: {inner}")
        };
        ApiError::invalid(message)
    })
}

/// Check the content type and read the body (within the router's limit).
pub async fn read_json_body(req: Request) -> Result<Bytes, ApiError> {
    if let Some(ct) = req.headers().get(CONTENT_TYPE) {
        let ct = ct.to_str().unwrap_or("").to_ascii_lowercase();
        let mime = ct.split(';').next().unwrap_or("").trim();
        if !(mime == "application/json" || mime.ends_with("+json") || mime.is_empty()) {
            return Err(ApiError::new(
                ErrorCode::UnsupportedMediaType,
                format!("the body must be JSON (Content-Type: application/json), not {mime}"),
            ));
        }
    }
    Bytes::from_request(req, &()).await.map_err(|rejection| {
        if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                ErrorCode::PayloadTooLarge,
                "the request body is larger than this daemon accepts",
            )
        } else {
            ApiError::invalid(format!("cannot read the request body: {rejection}"))
        }
    })
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let bytes = read_json_body(req).await?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// A query string.
#[derive(Debug)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or("");
        serde_urlencoded_from_str(query).map(ApiQuery)
    }
}

/// Whether every name and value of `query` is UTF-8 once its
/// percent-escapes are decoded. The form decoder would replace invalid
/// bytes with U+FFFD, and a file path so rewritten names another file.
fn decodes_to_utf8(query: &str) -> bool {
    query.split(['&', '=']).all(|part| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .is_ok()
    })
}

fn serde_urlencoded_from_str<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    if !decodes_to_utf8(query) {
        return Err(ApiError::invalid(
            "the query string holds bytes that are not UTF-8 (a path must be UTF-8; \
             files with other names can be reached through their directory's tar stream)",
        ));
    }
    axum::extract::Query::<T>::try_from_uri(
        &format!("/?{query}")
            .parse()
            .map_err(|_| ApiError::invalid("malformed query string"))?,
    )
    .map(|q| q.0)
    .map_err(|e| ApiError::invalid(format!("invalid query string: {}", e.body_text())))
}

/// Path parameters: one that does not parse (a process ID that is not a
/// number) is a 400 in the native envelope, not axum's plain text.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| ApiPath(p.0))
            .map_err(|e| ApiError::invalid(format!("bad path: {}", e.body_text())))
    }
}

/// The API key of a request, from `Authorization: Bearer <key>` or `X-API-Key`.
pub fn presented_key(parts: &Parts) -> Option<String> {
    if let Some(value) = parts.headers.get("x-api-key").and_then(|v| v.to_str().ok()) {
        return Some(value.trim().to_string());
    }
    let auth = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let (scheme, token) = auth.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Auth(pub Principal);

impl Auth {
    /// Fail with 403 unless the key has `scope`.
    pub fn require(&self, scope: Scope) -> Result<&Principal, ApiError> {
        if self.0.allows(scope) {
            Ok(&self.0)
        } else {
            Err(ApiError::new(
                ErrorCode::Forbidden,
                format!(
                    "this API key lacks the `{}` scope needed here",
                    scope.as_str()
                ),
            ))
        }
    }
}

/// Authenticate from request parts; shared with the compatibility dialects.
pub fn authenticate(parts: &Parts, state: &AppState) -> Result<Principal, ApiError> {
    let Some(key) = presented_key(parts) else {
        return Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "missing API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>` (the local admin key is in {})",
                crate::auth::admin_key_path(&state.data_dir).display()
            ),
        ));
    };
    state
        .keys
        .authenticate(&key)
        .ok_or_else(|| ApiError::new(ErrorCode::Unauthorized, "unknown or revoked API key"))
}

impl FromRequestParts<AppState> for Auth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        authenticate(parts, state).map(Auth)
    }
}

#[cfg(test)]
mod tests {
    use super::decodes_to_utf8;

    #[test]
    fn query_strings_must_decode_to_utf8() {
        assert!(decodes_to_utf8("path=/workspace/a%20b.txt&recursive=true"));
        assert!(decodes_to_utf8("path=/caf%C3%A9&x=%"));
        assert!(decodes_to_utf8(""));
        assert!(!decodes_to_utf8("path=/workspace/%ff"));
        assert!(!decodes_to_utf8("path=/workspace/%C3"));
        assert!(!decodes_to_utf8("%fe=1"));
    }
}
