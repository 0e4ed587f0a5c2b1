//! Rust SDK for cove.
//!
//! ```no_run
//! # async fn demo() -> Result<(), cove_client::Error> {
//! let client = cove_client::Client::from_env()?;
//! let sandbox = client.create_sandbox(&Default::default()).await?;
//! let result = client
//!     .exec(&sandbox.id, &cove_client::api::ExecRequest { cmd: Some("echo hi".into()), ..Default::default() })
//!     .await?;
//! assert_eq!(result.stdout, "hi\n");
//! client.delete_sandbox(&sandbox.id).await?;
//! # Ok(()) }
//! ```

pub mod files;
pub mod paths;

use std::time::Duration;

pub use cove_api as api;
use cove_api::{
    CreateKeyRequest, CreateSandboxRequest, ErrorBody, ExecRequest, ExecResult, KeyCreated,
    KeyList, Sandbox, SandboxList, SetTimeoutRequest, TemplateList,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The daemon's address unless `COVE_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7411";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The daemon could not be reached.
    #[error("cannot reach cove at {url}: {source}")]
    Connect { url: String, source: reqwest::Error },
    #[error("HTTP error: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
    #[error("{0}")]
    Config(String),
}

impl Error {
    /// The API error code, if the daemon sent one.
    pub fn code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// The HTTP status, if the daemon answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A connection to a cove daemon.
#[derive(Debug, Clone)]
pub struct Client {
    base: String,
    key: Option<String>,
    http: reqwest::Client,
}

impl Client {
    /// A client for the daemon at `url` with API key `key`.
    pub fn new(url: impl Into<String>, key: Option<String>) -> Client {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .pool_idle_timeout(Duration::from_secs(30))
            .build()
            .unwrap_or_default();
        Client {
            base: url.into().trim_end_matches('/').to_string(),
            key,
            http,
        }
    }

    /// From `COVE_URL` and `COVE_KEY`; without `COVE_KEY`, the local admin
    /// key file (`$COVE_DATA_DIR/admin.key`, `/var/lib/cove/admin.key` as root).
    pub fn from_env() -> Result<Client, Error> {
        let url = std::env::var("COVE_URL")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| DEFAULT_URL.into());
        let key = match std::env::var("COVE_KEY").ok().filter(|k| !k.is_empty()) {
            Some(key) => Some(key),
            None => paths::local_admin_key(),
        };
        Ok(Client::new(url, key))
    }

    pub fn base_url(&self) -> &str {
        &self.base
    }

    fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        req
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> Result<reqwest::Response, Error> {
        let response = req.send().await.map_err(|source| {
            if source.is_connect() {
                Error::Connect {
                    url: self.base.clone(),
                    source,
                }
            } else {
                Error::Http(source)
            }
        })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        Err(match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => Error::Api {
                status: status.as_u16(),
                code: body.error.code,
                message: body.error.message,
            },
            Err(_) => Error::Api {
                status: status.as_u16(),
                code: "http_error".into(),
                message: String::from_utf8_lossy(&bytes).trim().to_string(),
            },
        })
    }

    async fn json<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, Error> {
        let mut req = self.request(method, path);
        if let Some(body) = body {
            req = req.json(body);
        }
        let response = self.send(req).await?;
        let bytes = response.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    async fn empty(&self, method: Method, path: &str) -> Result<(), Error> {
        let response = self.send(self.request(method, path)).await?;
        debug_assert!(
            response.status() == StatusCode::NO_CONTENT || response.status().is_success()
        );
        Ok(())
    }

    /// Create a sandbox; returns once it runs.
    pub async fn create_sandbox(&self, req: &CreateSandboxRequest) -> Result<Sandbox, Error> {
        self.json(Method::POST, "/v1/sandboxes", Some(req)).await
    }

    /// List sandboxes. `query` is a URL query string such as `state=running`.
    pub async fn list_sandboxes(&self, query: &str) -> Result<SandboxList, Error> {
        let path = if query.is_empty() {
            "/v1/sandboxes".to_string()
        } else {
            format!("/v1/sandboxes?{query}")
        };
        self.json(Method::GET, &path, None::<&()>).await
    }

    pub async fn get_sandbox(&self, id: &str) -> Result<Sandbox, Error> {
        self.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>)
            .await
    }

    pub async fn delete_sandbox(&self, id: &str) -> Result<(), Error> {
        self.empty(Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .await
    }

    pub async fn pause_sandbox(&self, id: &str) -> Result<Sandbox, Error> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            None::<&()>,
        )
        .await
    }

    pub async fn resume_sandbox(&self, id: &str) -> Result<Sandbox, Error> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            None::<&()>,
        )
        .await
    }

    /// Let the sandbox live `ttl` from now (zero: forever).
    pub async fn set_timeout(&self, id: &str, ttl: Duration) -> Result<Sandbox, Error> {
        let body = SetTimeoutRequest {
            timeout: cove_api::DurationValue(ttl),
        };
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/timeout"),
            Some(&body),
        )
        .await
    }

    /// Run a command to completion.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, Error> {
        self.json(Method::POST, &format!("/v1/sandboxes/{id}/exec"), Some(req))
            .await
    }

    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<KeyCreated, Error> {
        self.json(Method::POST, "/v1/keys", Some(req)).await
    }

    pub async fn list_keys(&self) -> Result<KeyList, Error> {
        self.json(Method::GET, "/v1/keys", None::<&()>).await
    }

    pub async fn revoke_key(&self, id: &str) -> Result<(), Error> {
        self.empty(Method::DELETE, &format!("/v1/keys/{id}")).await
    }

    pub async fn templates(&self) -> Result<TemplateList, Error> {
        self.json(Method::GET, "/v1/templates", None::<&()>).await
    }

    /// Whether the daemon answers `/healthz`.
    pub async fn healthy(&self) -> bool {
        self.send(self.request(Method::GET, "/healthz"))
            .await
            .is_ok()
    }
}
