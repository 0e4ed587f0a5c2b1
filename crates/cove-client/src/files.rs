//! Files in sandboxes: streamed uploads and downloads, tar archives,
//! listings, and watches.
//!
//! ```no_run
//! # async fn demo(client: &cove_client::Client, id: &str) -> Result<(), cove_client::Error> {
//! client.write_file(id, "/workspace/hello.txt", b"hi\n".to_vec(), None).await?;
//! let bytes = client.read_file(id, "/workspace/hello.txt").await?;
//! assert_eq!(bytes, b"hi\n");
//! for entry in client.list_dir(id, "/workspace", 1).await?.entries {
//!     println!("{} {} {}", entry.permissions, entry.size, entry.path);
//! }
//! # Ok(()) }
//! ```

use std::path::Path;

use cove_api::{FileEntry, FileList, MkdirRequest, ModeValue, MoveRequest, TarResult, WatchEvent};
use futures::{Stream, StreamExt};
use reqwest::Method;

use crate::sse::SseDecoder;
use crate::{Client, Error};

/// Bytes coming from the daemon (a file, or a tar archive).
#[derive(Debug)]
pub struct Download {
    response: reqwest::Response,
}

impl Download {
    /// The size in bytes, when the daemon knows it (files, not archives).
    pub fn size(&self) -> Option<u64> {
        self.response.content_length()
    }

    /// The next chunk, or `None` at the end. A transfer that broke off is
    /// an error, never a short read.
    pub async fn chunk(&mut self) -> Result<Option<bytes::Bytes>, Error> {
        self.response.chunk().await.map_err(Error::Http)
    }

    /// The rest as a stream of chunks.
    pub fn into_stream(self) -> impl Stream<Item = Result<bytes::Bytes, Error>> {
        self.response.bytes_stream().map(|r| r.map_err(Error::Http))
    }

    /// Everything, in memory.
    pub async fn bytes(self) -> Result<Vec<u8>, Error> {
        Ok(self.response.bytes().await?.to_vec())
    }
}

/// Changes under a watched path.
#[derive(Debug)]
pub struct Watch {
    response: reqwest::Response,
    decoder: SseDecoder,
}

impl Watch {
    /// The next change; `None` when the daemon ended the stream (the
    /// watched path was removed). Dropping the `Watch` ends the watch.
    pub async fn next_event(&mut self) -> Result<Option<WatchEvent>, Error> {
        loop {
            if let Some(event) = self.decoder.next_event() {
                if event.name == "error" {
                    let body: cove_api::ErrorBody = serde_json::from_slice(&event.data)
                        .map_err(|e| Error::Decode(e.to_string()))?;
                    return Err(Error::Api {
                        status: 200,
                        code: body.error.code,
                        message: body.error.message,
                    });
                }
                return serde_json::from_slice(&event.data)
                    .map(Some)
                    .map_err(|e| Error::Decode(e.to_string()));
            }
            match self.response.chunk().await? {
                Some(chunk) => self.decoder.push(&chunk),
                None => return Ok(None),
            }
        }
    }
}

/// A local file as a request body, read in large chunks.
fn file_body(file: tokio::fs::File) -> reqwest::Body {
    use tokio::io::AsyncReadExt;
    let stream = futures::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 256 * 1024];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok::<_, std::io::Error>(None);
        }
        buf.truncate(n);
        Ok(Some((bytes::Bytes::from(buf), file)))
    });
    reqwest::Body::wrap_stream(stream)
}

impl Client {
    fn files_request(
        &self,
        method: Method,
        id: &str,
        route: &str,
        query: &[(&str, &str)],
    ) -> Result<reqwest::RequestBuilder, Error> {
        let mut url = reqwest::Url::parse(&format!("{}/v1/sandboxes/{id}/{route}", self.base))
            .map_err(|e| Error::Config(format!("bad daemon URL {}: {e}", self.base)))?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                pairs.append_pair(k, v);
            }
        }
        let mut req = self.http.request(method, url);
        if let Some(key) = &self.key {
            req = req.bearer_auth(key);
        }
        Ok(req)
    }

    async fn files_json<T: serde::de::DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, Error> {
        let bytes = self.send(req).await?.bytes().await?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Decode(e.to_string()))
    }

    /// Stream a file out of a sandbox.
    pub async fn download(&self, id: &str, path: &str) -> Result<Download, Error> {
        let req = self.files_request(Method::GET, id, "files", &[("path", path)])?;
        Ok(Download {
            response: self.send(req).await?,
        })
    }

    /// A file's bytes, in memory.
    pub async fn read_file(&self, id: &str, path: &str) -> Result<Vec<u8>, Error> {
        self.download(id, path).await?.bytes().await
    }

    /// Write a file from a stream of chunks (created or replaced; missing
    /// parent directories are created). `mode` is the permission bits.
    pub async fn upload<S, E>(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        body: S,
    ) -> Result<FileEntry, Error>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        self.upload_body(id, path, mode, reqwest::Body::wrap_stream(body))
            .await
    }

    async fn upload_body(
        &self,
        id: &str,
        path: &str,
        mode: Option<u32>,
        body: reqwest::Body,
    ) -> Result<FileEntry, Error> {
        let mode = mode.map(|m| format!("{m:04o}"));
        let mut query = vec![("path", path)];
        if let Some(mode) = &mode {
            query.push(("mode", mode.as_str()));
        }
        let req = self
            .files_request(Method::PUT, id, "files", &query)?
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.files_json(req).await
    }

    /// Write a file from bytes in memory.
    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        data: impl Into<bytes::Bytes>,
        mode: Option<u32>,
    ) -> Result<FileEntry, Error> {
        self.upload_body(id, path, mode, reqwest::Body::from(data.into()))
            .await
    }

    /// Copy a local file into the sandbox, streamed.
    pub async fn upload_file(
        &self,
        id: &str,
        local: &Path,
        path: &str,
        mode: Option<u32>,
    ) -> Result<FileEntry, Error> {
        let file = tokio::fs::File::open(local)
            .await
            .map_err(|e| Error::Config(format!("{}: {e}", local.display())))?;
        self.upload_body(id, path, mode, file_body(file)).await
    }

    /// Describe a path (`follow`: describe a symlink's target instead).
    pub async fn stat(&self, id: &str, path: &str, follow: bool) -> Result<FileEntry, Error> {
        let follow = if follow { "true" } else { "false" };
        let req = self.files_request(
            Method::GET,
            id,
            "fs/stat",
            &[("path", path), ("follow", follow)],
        )?;
        self.files_json(req).await
    }

    /// List a directory, `depth` levels down (1: its own entries).
    pub async fn list_dir(&self, id: &str, path: &str, depth: u32) -> Result<FileList, Error> {
        let depth = depth.to_string();
        let req = self.files_request(
            Method::GET,
            id,
            "fs/list",
            &[("path", path), ("depth", &depth)],
        )?;
        self.files_json(req).await
    }

    /// Create a directory (with `parents`, like `mkdir -p`).
    pub async fn mkdir(
        &self,
        id: &str,
        path: &str,
        parents: bool,
        mode: Option<u32>,
    ) -> Result<FileEntry, Error> {
        let body = MkdirRequest {
            path: path.into(),
            parents,
            mode: mode.map(ModeValue),
        };
        let req = self
            .files_request(Method::POST, id, "fs/mkdir", &[])?
            .json(&body);
        self.files_json(req).await
    }

    /// Rename `from` to `to`.
    pub async fn move_path(
        &self,
        id: &str,
        from: &str,
        to: &str,
        overwrite: bool,
    ) -> Result<FileEntry, Error> {
        let body = MoveRequest {
            from: from.into(),
            to: to.into(),
            overwrite,
        };
        let req = self
            .files_request(Method::POST, id, "fs/move", &[])?
            .json(&body);
        self.files_json(req).await
    }

    /// Remove a path (a directory tree with `recursive`).
    pub async fn remove(&self, id: &str, path: &str, recursive: bool) -> Result<(), Error> {
        let recursive = if recursive { "true" } else { "false" };
        let req = self.files_request(
            Method::DELETE,
            id,
            "fs",
            &[("path", path), ("recursive", recursive)],
        )?;
        self.send(req).await.map(drop)
    }

    /// A tar archive of a file or directory in the sandbox, streamed.
    pub async fn tar_download(&self, id: &str, path: &str) -> Result<Download, Error> {
        let req = self.files_request(Method::GET, id, "fs/tar", &[("path", path)])?;
        Ok(Download {
            response: self.send(req).await?,
        })
    }

    /// Extract a tar archive (a stream of chunks) into directory `dir`.
    pub async fn tar_upload<S, E>(
        &self,
        id: &str,
        dir: &str,
        archive: S,
    ) -> Result<TarResult, Error>
    where
        S: Stream<Item = Result<bytes::Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let req = self
            .files_request(Method::PUT, id, "fs/tar", &[("path", dir)])?
            .header(reqwest::header::CONTENT_TYPE, "application/x-tar")
            .body(reqwest::Body::wrap_stream(archive));
        self.files_json(req).await
    }

    /// Watch a path for changes until the returned [`Watch`] is dropped.
    pub async fn watch(&self, id: &str, path: &str, recursive: bool) -> Result<Watch, Error> {
        let recursive = if recursive { "true" } else { "false" };
        let req = self.files_request(
            Method::GET,
            id,
            "fs/watch",
            &[("path", path), ("recursive", recursive)],
        )?;
        Ok(Watch {
            response: self.send(req).await?,
            decoder: SseDecoder::default(),
        })
    }
}
