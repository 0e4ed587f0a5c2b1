//! Rust SDK for cove.
//!
//! [`Client`] talks to a cove daemon; [`Client::create`] makes a
//! [`Sandbox`], and [`Sandbox::command`] builds a [`Command`] shaped like
//! `std::process::Command` (and tinyrange cc's `exec.Cmd`): `output()`,
//! `combined_output()`, `status()`, `run()`, or `spawn()` for a [`Child`]
//! with async stdin/stdout/stderr pipes. [`blocking`] wraps the same API for
//! code without an async runtime. The lower-level methods on [`Client`]
//! map one to one onto the HTTP API (`docs/api.md`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), cove_client::Error> {
//! use cove_client::{Client, SandboxSpec};
//!
//! let client = Client::from_env()?;
//! let sandbox = client.create(SandboxSpec::new().memory(256 << 20)).await?;
//! let out = sandbox.command("sh").args(["-c", "echo hi; exit 3"]).output().await?;
//! assert_eq!(out.stdout, b"hi\n");
//! assert_eq!(out.status.code(), Some(3));
//! sandbox.kill().await?;
//! # Ok(()) }
//! ```
//!
//! Runnable programs are in `crates/cove-client/examples/`.

#![warn(missing_docs)]

pub mod blocking;
pub mod command;
pub mod files;
pub mod paths;
pub mod sandbox;
mod sse;

pub use command::{
    CancellationToken, Child, ChildStderr, ChildStdin, ChildStdout, Command, ExitStatus, Output,
    Stdio,
};
pub use sandbox::{Sandbox, SandboxSpec};

use std::time::Duration;

pub use cove_api as api;
use cove_api::{
    CreateKeyRequest, CreateSandboxRequest, ErrorBody, ExecRequest, ExecResult, KeyCreated,
    KeyList, SandboxList, SetTimeoutRequest, TemplateList,
};
use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The daemon's address unless `COVE_URL` says otherwise.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7411";

/// What can go wrong in a call of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The daemon answered with an error.
    #[error("{message} ({code}, HTTP {status})")]
    Api {
        /// The HTTP status, such as 404.
        status: u16,
        /// The API error code, such as `not_found` (`http_error` when the
        /// body was not a cove error).
        code: String,
        /// The daemon's message (or the raw body).
        message: String,
    },
    /// The daemon could not be reached.
    #[error("cannot reach cove at {url}: {source}")]
    Connect {
        /// The daemon's base URL.
        url: String,
        /// Why the connection failed.
        source: reqwest::Error,
    },
    /// The HTTP exchange failed after connecting: the connection broke
    /// off, or a response body could not be read.
    #[error("HTTP error: {0}")]
    Http(#[from] reqwest::Error),
    /// The daemon's answer was not what the client expected (not the
    /// expected JSON), or a command's connection ended without an exit status.
    #[error("unexpected answer from the daemon: {0}")]
    Decode(String),
    /// A problem on the client's side: a bad URL or API key, a runtime or
    /// WebSocket that failed, a local file that cannot be opened, a
    /// template with nothing to run. The message says which.
    #[error("{0}")]
    Config(String),
    /// A command ended unsuccessfully ([`Command::run`]).
    #[error("the command failed: {0}")]
    Exit(ExitStatus),
    /// An I/O error: reading a child's piped output failed, or a file's
    /// contents were unusable ([`Sandbox::read_to_string`] of non-UTF-8
    /// bytes, [`Sandbox::read_dir`] of a directory over the listing limit).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
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

    /// The daemon's URL, without a trailing slash.
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
    pub async fn create_sandbox(
        &self,
        req: &CreateSandboxRequest,
    ) -> Result<cove_api::Sandbox, Error> {
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

    /// Describe a sandbox, also one that ended recently. An unknown ID, or
    /// another owner's sandbox, is a 404 [`Error::Api`] (`not_found`).
    pub async fn get_sandbox(&self, id: &str) -> Result<cove_api::Sandbox, Error> {
        self.json(Method::GET, &format!("/v1/sandboxes/{id}"), None::<&()>)
            .await
    }

    /// Destroy a sandbox and everything in it. Deleting a sandbox that has
    /// already ended succeeds; an unknown ID is a 404.
    pub async fn delete_sandbox(&self, id: &str) -> Result<(), Error> {
        self.empty(Method::DELETE, &format!("/v1/sandboxes/{id}"))
            .await
    }

    /// Freeze every process of a sandbox (memory is kept); returns the
    /// sandbox as it is now. Pausing a paused sandbox succeeds; one still
    /// starting is a 503, one that has ended a 410.
    pub async fn pause_sandbox(&self, id: &str) -> Result<cove_api::Sandbox, Error> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            None::<&()>,
        )
        .await
    }

    /// Thaw a paused sandbox; returns the sandbox as it is now. Resuming a
    /// running sandbox succeeds; one still starting is a 503, one that has
    /// ended a 410.
    pub async fn resume_sandbox(&self, id: &str) -> Result<cove_api::Sandbox, Error> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            None::<&()>,
        )
        .await
    }

    /// Let the sandbox live `ttl` from now (zero: forever).
    pub async fn set_timeout(&self, id: &str, ttl: Duration) -> Result<cove_api::Sandbox, Error> {
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

    /// Create an API key; needs an admin key. The secret is in the
    /// answer's `key` field, shown this once and never again.
    pub async fn create_key(&self, req: &CreateKeyRequest) -> Result<KeyCreated, Error> {
        self.json(Method::POST, "/v1/keys", Some(req)).await
    }

    /// Every API key, revoked ones included, without their secrets; needs
    /// an admin key.
    pub async fn list_keys(&self) -> Result<KeyList, Error> {
        self.json(Method::GET, "/v1/keys", None::<&()>).await
    }

    /// Revoke an API key; it stops working at once. Needs an admin key; an
    /// unknown or already revoked key is a 404.
    pub async fn revoke_key(&self, id: &str) -> Result<(), Error> {
        self.empty(Method::DELETE, &format!("/v1/keys/{id}")).await
    }

    /// Every template sandboxes can start from.
    pub async fn templates(&self) -> Result<TemplateList, Error> {
        self.json(Method::GET, "/v1/templates", None::<&()>).await
    }

    /// One template.
    pub async fn template(&self, name: &str) -> Result<cove_api::TemplateInfo, Error> {
        self.json(Method::GET, &format!("/v1/templates/{name}"), None::<&()>)
            .await
    }

    /// Import (`source`: a path on the daemon's host) or pull
    /// (`reference`) a template; needs an admin key.
    pub async fn create_template(
        &self,
        req: &cove_api::CreateTemplateRequest,
    ) -> Result<cove_api::TemplateInfo, Error> {
        self.json(Method::POST, "/v1/templates", Some(req)).await
    }

    /// Remove a template; needs an admin key.
    pub async fn delete_template(&self, name: &str) -> Result<(), Error> {
        self.empty(Method::DELETE, &format!("/v1/templates/{name}"))
            .await
    }

    /// Make template `name` of sandbox `id`'s filesystem.
    pub async fn snapshot_sandbox(
        &self,
        id: &str,
        name: &str,
    ) -> Result<cove_api::TemplateInfo, Error> {
        self.json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(&cove_api::SnapshotRequest { name: name.into() }),
        )
        .await
    }

    /// The daemon's backends and whether each can create sandboxes here.
    pub async fn backends(&self) -> Result<cove_api::BackendList, Error> {
        self.json(Method::GET, "/v1/backends", None::<&()>).await
    }

    /// The end of a microVM sandbox's console log (kernel and guest init).
    pub async fn console(&self, id: &str) -> Result<Vec<u8>, Error> {
        let response = self
            .send(self.request(Method::GET, &format!("/v1/sandboxes/{id}/console")))
            .await?;
        Ok(response.bytes().await?.to_vec())
    }

    /// Whether the daemon answers `/healthz`.
    pub async fn healthy(&self) -> bool {
        self.send(self.request(Method::GET, "/healthz"))
            .await
            .is_ok()
    }
}

/// Processes: background execs, waiting, signals, stdin, output streams
/// and interactive attach.
pub mod process {
    use std::time::Duration;

    use cove_api::{ExecRequest, ExecResult, ProcessInfo, ProcessList, Started, StdinWritten};
    use futures::{Stream, StreamExt};
    use reqwest::Method;
    use serde::Deserialize;

    use super::{Client, Error};
    use crate::sse::SseDecoder;

    /// One event of an output stream (server-sent events).
    #[derive(Debug, Clone, PartialEq)]
    pub enum StreamEvent {
        /// The process started (`exec/stream` only).
        Start {
            /// The process ID inside the sandbox.
            pid: u32,
        },
        /// Output bytes of `stream` ("stdout"/"stderr") starting at `offset`.
        Output {
            /// `"stdout"` or `"stderr"`.
            stream: String,
            /// The position of the first byte of `data` in its stream.
            offset: u64,
            /// The bytes, decoded (base64 on the wire is undone).
            data: Vec<u8>,
        },
        /// Bytes the replay buffer lost before this reader got them.
        Dropped {
            /// `"stdout"` or `"stderr"`.
            stream: String,
            /// The offset of the first lost byte.
            from: u64,
            /// The offset just past the last lost byte.
            to: u64,
        },
        /// The process ended.
        Exit(cove_api::ExitInfo),
        /// The daemon lost the sandbox's agent.
        Error(String),
    }

    #[derive(Deserialize)]
    struct Chunk<'a> {
        offset: u64,
        /// Borrowed from the event when it has no escapes (base64 never
        /// has): the bulk of a stream is not copied here.
        #[serde(borrow)]
        data: std::borrow::Cow<'a, str>,
        encoding: cove_api::Encoding,
    }

    #[derive(Deserialize)]
    struct DroppedBody {
        stream: String,
        from: u64,
        to: u64,
    }

    /// The payload and offset of a base64 chunk in the exact shape the
    /// daemon writes (`{"encoding":"base64","data":"…","offset":N}`),
    /// found without a JSON pass over the payload; `None` for any other
    /// shape, which then goes through the JSON parser.
    fn base64_chunk(data: &[u8]) -> Option<(u64, &[u8])> {
        let rest = data.strip_prefix(br#"{"encoding":"base64","data":""#)?;
        let end = memchr::memchr(b'"', rest)?;
        let offset = rest[end + 1..]
            .strip_prefix(br#","offset":"#)?
            .strip_suffix(b"}")?;
        if offset.is_empty() || !offset.iter().all(u8::is_ascii_digit) {
            return None;
        }
        let offset = std::str::from_utf8(offset).ok()?.parse().ok()?;
        Some((offset, &rest[..end]))
    }

    fn parse_event(name: &str, data: &[u8]) -> Option<StreamEvent> {
        match name {
            "start" => serde_json::from_slice::<serde_json::Value>(data)
                .ok()
                .and_then(|v| v["pid"].as_u64())
                .map(|pid| StreamEvent::Start { pid: pid as u32 }),
            "stdout" | "stderr" => {
                if let Some((offset, encoded)) = base64_chunk(data) {
                    return Some(StreamEvent::Output {
                        stream: name.to_string(),
                        offset,
                        data: base64_simd::STANDARD.decode_to_vec(encoded).ok()?,
                    });
                }
                let chunk: Chunk<'_> = serde_json::from_slice(data).ok()?;
                let bytes = match chunk.encoding {
                    cove_api::Encoding::Utf8 => chunk.data.into_owned().into_bytes(),
                    cove_api::Encoding::Base64 => base64_simd::STANDARD
                        .decode_to_vec(chunk.data.as_bytes())
                        .ok()?,
                };
                Some(StreamEvent::Output {
                    stream: name.to_string(),
                    offset: chunk.offset,
                    data: bytes,
                })
            }
            "dropped" => {
                let d: DroppedBody = serde_json::from_slice(data).ok()?;
                Some(StreamEvent::Dropped {
                    stream: d.stream,
                    from: d.from,
                    to: d.to,
                })
            }
            "exit" => serde_json::from_slice(data).ok().map(StreamEvent::Exit),
            "error" => Some(StreamEvent::Error(
                String::from_utf8_lossy(data).into_owned(),
            )),
            _ => None,
        }
    }

    /// Parse a `text/event-stream` body into events, with the last event ID seen.
    fn events(
        response: reqwest::Response,
    ) -> impl Stream<Item = Result<(StreamEvent, Option<String>), Error>> {
        let bytes = response.bytes_stream();
        futures::stream::unfold(
            (bytes, SseDecoder::default(), false),
            |(mut bytes, mut decoder, done)| async move {
                if done {
                    return None;
                }
                loop {
                    while let Some(sse) = decoder.next_event() {
                        if let Some(event) = parse_event(&sse.name, &sse.data) {
                            return Some((Ok((event, sse.id)), (bytes, decoder, false)));
                        }
                    }
                    match bytes.next().await {
                        Some(Ok(chunk)) => decoder.push(&chunk),
                        Some(Err(e)) => return Some((Err(Error::Http(e)), (bytes, decoder, true))),
                        None => return None,
                    }
                }
            },
        )
    }

    impl Client {
        /// Start a command in the background; returns its pid.
        pub async fn exec_background(&self, id: &str, req: &ExecRequest) -> Result<u32, Error> {
            let mut req = req.clone();
            req.background = true;
            let started: Started = self
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/exec"),
                    Some(&req),
                )
                .await?;
            Ok(started.pid)
        }

        /// The processes of a sandbox: running ones, and background ones
        /// that finished recently; oldest first.
        pub async fn processes(&self, id: &str) -> Result<ProcessList, Error> {
            self.json(
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes"),
                None::<&()>,
            )
            .await
        }

        /// Describe one process. An unknown `pid`, or one that finished
        /// long ago, is a 404.
        pub async fn process(&self, id: &str, pid: u32) -> Result<ProcessInfo, Error> {
            self.json(
                Method::GET,
                &format!("/v1/sandboxes/{id}/processes/{pid}"),
                None::<&()>,
            )
            .await
        }

        /// Wait for a process to exit (at most `timeout`, when given).
        pub async fn wait_process(
            &self,
            id: &str,
            pid: u32,
            timeout: Option<Duration>,
        ) -> Result<ExecResult, Error> {
            let query = timeout
                .map(|t| format!("?timeout={}ms", t.as_millis()))
                .unwrap_or_default();
            self.json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/wait{query}"),
                None::<&()>,
            )
            .await
        }

        /// Send a signal (a name like "TERM" or a number) to a process's group.
        pub async fn signal(&self, id: &str, pid: u32, signal: &str) -> Result<ProcessInfo, Error> {
            let body = serde_json::json!({ "signal": signal });
            self.json(
                Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
                Some(&body),
            )
            .await
        }

        /// Write bytes to a process's open stdin.
        pub async fn write_stdin(&self, id: &str, pid: u32, data: Vec<u8>) -> Result<u64, Error> {
            let req = self
                .request(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
                )
                .body(data);
            let written: StdinWritten = self.send(req).await?.json().await.map_err(Error::Http)?;
            Ok(written.bytes)
        }

        /// Close a process's stdin, so it reads end of file. Closing it
        /// again succeeds; an unknown `pid` is a 404.
        pub async fn close_stdin(&self, id: &str, pid: u32) -> Result<(), Error> {
            let _: ProcessInfo = self
                .json(
                    Method::POST,
                    &format!("/v1/sandboxes/{id}/processes/{pid}/stdin/close"),
                    None::<&()>,
                )
                .await?;
            Ok(())
        }

        /// Stream a process's output from the given offsets. Each item also
        /// carries the event ID to resume from after a disconnect.
        pub async fn stream_process(
            &self,
            id: &str,
            pid: u32,
            from: [u64; 2],
        ) -> Result<impl Stream<Item = Result<(StreamEvent, Option<String>), Error>>, Error>
        {
            let path = format!(
                "/v1/sandboxes/{id}/processes/{pid}/stream?stdout_offset={}&stderr_offset={}",
                from[0], from[1]
            );
            let response = self.send(self.request(Method::GET, &path)).await?;
            Ok(events(response))
        }

        /// Run a command and stream its output as it happens.
        ///
        /// For bulk output, read the stream inside a task of a
        /// multi-threaded runtime (`tokio::spawn`) rather than from
        /// `block_on`'s own thread: the connection is driven on the
        /// runtime's workers, and from outside them every network read is
        /// handed across threads (about 40% more CPU time per GiB in
        /// `cove bench`).
        pub async fn exec_stream(
            &self,
            id: &str,
            req: &ExecRequest,
        ) -> Result<impl Stream<Item = Result<(StreamEvent, Option<String>), Error>>, Error>
        {
            let response = self
                .send(
                    self.request(Method::POST, &format!("/v1/sandboxes/{id}/exec/stream"))
                        .json(req),
                )
                .await?;
            Ok(events(response))
        }

        /// Open an interactive WebSocket to a process (see the API docs for
        /// the frame format).
        pub async fn attach(
            &self,
            id: &str,
            pid: u32,
        ) -> Result<
            tokio_tungstenite::WebSocketStream<
                tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
            >,
            Error,
        > {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let url = format!(
                "{}/v1/sandboxes/{id}/processes/{pid}/attach",
                self.base.replacen("http", "ws", 1)
            );
            let mut request = url
                .into_client_request()
                .map_err(|e| Error::Config(e.to_string()))?;
            if let Some(key) = &self.key {
                let value = format!("Bearer {key}")
                    .parse()
                    .map_err(|_| Error::Config("the API key is not a valid header".into()))?;
                request.headers_mut().insert("authorization", value);
            }
            match tokio_tungstenite::connect_async(request).await {
                Ok((socket, _)) => Ok(socket),
                Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                    let status = response.status().as_u16();
                    let body = response.body().clone().unwrap_or_default();
                    Err(match serde_json::from_slice::<cove_api::ErrorBody>(&body) {
                        Ok(b) => Error::Api {
                            status,
                            code: b.error.code,
                            message: b.error.message,
                        },
                        Err(_) => Error::Api {
                            status,
                            code: "http_error".into(),
                            message: String::from_utf8_lossy(&body).into(),
                        },
                    })
                }
                Err(e) => Err(Error::Config(format!("WebSocket to {}: {e}", self.base))),
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn output_chunks_parse_the_same_with_and_without_the_fast_path() {
            let fast = br#"{"encoding":"base64","data":"AAEC/w==","offset":42}"#;
            assert_eq!(base64_chunk(fast), Some((42, &b"AAEC/w=="[..])));
            let expected = StreamEvent::Output {
                stream: "stdout".into(),
                offset: 42,
                data: vec![0, 1, 2, 255],
            };
            assert_eq!(parse_event("stdout", fast), Some(expected.clone()));
            // Other shapes (fields reordered, spaces, text) take the JSON path.
            let reordered = br#"{"offset": 42, "encoding": "base64", "data": "AAEC/w=="}"#;
            assert_eq!(base64_chunk(reordered), None);
            assert_eq!(parse_event("stdout", reordered), Some(expected));
            let text = br#"{"encoding":"utf-8","data":"a\"b","offset":7}"#;
            assert_eq!(base64_chunk(text), None);
            assert_eq!(
                parse_event("stderr", text),
                Some(StreamEvent::Output {
                    stream: "stderr".into(),
                    offset: 7,
                    data: b"a\"b".to_vec(),
                })
            );
            // A malformed offset or trailing field is not taken for a chunk.
            for bad in [
                &br#"{"encoding":"base64","data":"AA==","offset":}"#[..],
                br#"{"encoding":"base64","data":"AA==","offset":1,"x":2}"#,
                br#"{"encoding":"base64","data":"AA==","offset":-1}"#,
            ] {
                assert_eq!(base64_chunk(bad), None);
            }
        }
    }
}
