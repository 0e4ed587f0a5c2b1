//! `/v1/sandboxes/{id}/files` and `/v1/sandboxes/{id}/fs/...`: files in a
//! sandbox, done by its agent.
//!
//! Bytes are streamed both ways and never held whole. A file download or
//! upload opens an agent connection of its own (a transfer connection:
//! raw chunks, which the agent splices straight between socket and file),
//! so its speed and its stalls concern nobody else; the socket's buffers
//! bound what is in flight. Tar archives and the other calls share the
//! sandbox's agent connection, with flow control per operation (credit
//! for downloads, acknowledgements for uploads), so a slow client holds
//! back only its own operation.

use std::convert::Infallible;

use axum::Json;
use axum::body::{Body, BodyDataStream, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use cove_api::files::{
    ListQuery, PathQuery, RawBytes, RemoveQuery, StatQuery, UploadQuery, WatchQuery,
};
use cove_api::{
    ErrorBody, ErrorCode, FileEntry, FileList, FileType, MkdirRequest, MoveRequest, Scope,
    TarResult, WatchEvent,
};
use cove_protocol::MAX_CHUNK;
use cove_protocol::client::{
    AgentClient, ClientError, FsDownload, FsUpload, TransferDownload, TransferUpload,
    transfer_read, transfer_write,
};
use cove_protocol::fs::{FileKind, FsDone, FsEntry, FsErrorKind, FsEvent};
use futures::StreamExt;

use super::AppState;
use super::drain;
use super::extract::{ApiJson, ApiQuery, Auth};
use crate::auth::Principal;
use crate::backend::AgentStream;
use crate::error::ApiError;
use crate::exec;

/// Default and largest number of entries a listing returns.
const DEFAULT_LIST_LIMIT: u32 = 10_000;
const MAX_LIST_LIMIT: u32 = 100_000;

/// Map a file operation's failure to an API error.
pub fn file_error(err: ClientError) -> ApiError {
    match err {
        ClientError::Fs(e) => {
            let code = match e.kind {
                FsErrorKind::NotFound => ErrorCode::NotFound,
                FsErrorKind::Invalid | FsErrorKind::Escape => ErrorCode::InvalidRequest,
                FsErrorKind::IsADirectory
                | FsErrorKind::NotADirectory
                | FsErrorKind::Exists
                | FsErrorKind::NotEmpty
                | FsErrorKind::Busy => ErrorCode::Conflict,
                FsErrorKind::PermissionDenied => ErrorCode::Forbidden,
                FsErrorKind::NoSpace => ErrorCode::InsufficientStorage,
                FsErrorKind::Io => ErrorCode::Internal,
            };
            ApiError::new(code, e.message)
        }
        other => exec::client_error(other),
    }
}

fn required(path: Option<String>) -> Result<String, ApiError> {
    required_as(path, "`path` query parameter")
}

/// A path the request must give, named as the client wrote it (a query
/// parameter or a JSON field).
fn required_as(path: Option<String>, what: &str) -> Result<String, ApiError> {
    match path {
        Some(path) if !path.is_empty() => Ok(path),
        _ => Err(ApiError::invalid(format!(
            "missing {what}: the path in the sandbox"
        ))),
    }
}

fn permissions(kind: FileKind, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        FileKind::File => '-',
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::CharDevice => 'c',
        FileKind::BlockDevice => 'b',
    });
    let special = [(0o4000, 's', 'S'), (0o2000, 's', 'S'), (0o1000, 't', 'T')];
    for (i, (bit, set_x, set_nox)) in special.iter().enumerate() {
        let shift = 6 - 3 * i;
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        let x = bits & 1 != 0;
        s.push(match (mode & bit != 0, x) {
            (true, true) => *set_x,
            (true, false) => *set_nox,
            (false, true) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// The API's view of an agent entry.
pub fn file_entry(e: FsEntry) -> FileEntry {
    let ms = e.mtime_sec.max(0) as u64 * 1000 + u64::from(e.mtime_nsec / 1_000_000);
    FileEntry {
        permissions: permissions(e.kind, e.mode),
        kind: match e.kind {
            FileKind::File => FileType::File,
            FileKind::Dir => FileType::Dir,
            FileKind::Symlink => FileType::Symlink,
            FileKind::Fifo => FileType::Fifo,
            FileKind::Socket => FileType::Socket,
            FileKind::CharDevice => FileType::CharDevice,
            FileKind::BlockDevice => FileType::BlockDevice,
        },
        path: e.path,
        name: e.name,
        size: e.size,
        mode: e.mode,
        uid: e.uid,
        gid: e.gid,
        mtime: cove_api::rfc3339_millis(ms),
        link_target: e.link_target,
    }
}

async fn agent(state: &AppState, auth: &Auth, id: &str) -> Result<AgentClient, ApiError> {
    let who = auth.require(Scope::Exec)?;
    Ok(state.manager.agent(who, id).await?.1)
}

/// A download as a response body: chunks as they come, and an error (which
/// aborts the response) if the agent fails half-way.
fn body_of(download: FsDownload) -> Body {
    let stream = futures::stream::unfold(download, |mut download| async move {
        match download.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(Bytes::from(chunk)), download)),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(error = %err, "a download failed half-way");
                Some((Err(std::io::Error::other(err.to_string())), download))
            }
        }
    });
    Body::from_stream(stream)
}

/// The same for a file on a transfer connection of its own.
fn transfer_body(download: TransferDownload<AgentStream>) -> Body {
    let stream = futures::stream::unfold(Some(download), |download| async move {
        let mut download = download?;
        match download.next_chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(download))),
            Ok(None) => None,
            Err(err) => {
                tracing::warn!(error = %err, "a download failed half-way");
                Some((Err(std::io::Error::other(err.to_string())), None))
            }
        }
    });
    Body::from_stream(stream)
}

/// Feed a request body to an upload in chunks of `MAX_CHUNK`, then commit.
async fn feed(mut upload: FsUpload, stream: &mut BodyDataStream) -> Result<FsDone, ApiError> {
    let mut pending: Vec<u8> = Vec::with_capacity(2 * MAX_CHUNK);
    while let Some(frame) = stream.next().await {
        let bytes =
            frame.map_err(|e| ApiError::invalid(format!("the request body broke off: {e}")))?;
        if pending.is_empty() && bytes.len() >= MAX_CHUNK {
            let whole = bytes.len() - bytes.len() % MAX_CHUNK;
            upload.write(&bytes[..whole]).await.map_err(file_error)?;
            pending.extend_from_slice(&bytes[whole..]);
            continue;
        }
        pending.extend_from_slice(&bytes);
        if pending.len() >= MAX_CHUNK {
            let whole = pending.len() - pending.len() % MAX_CHUNK;
            upload.write(&pending[..whole]).await.map_err(file_error)?;
            pending.drain(..whole);
        }
    }
    if !pending.is_empty() {
        upload.write(&pending).await.map_err(file_error)?;
    }
    upload.finish().await.map_err(file_error)
}

/// Smallest piece sent on its own on a transfer connection; smaller body
/// frames are gathered first.
const GATHER: usize = 64 * 1024;

/// Feed a request body to a transfer connection, then commit.
async fn feed_transfer(
    mut upload: TransferUpload<AgentStream>,
    stream: &mut BodyDataStream,
) -> Result<FsEntry, ApiError> {
    let mut pending = BytesMut::new();
    while let Some(frame) = stream.next().await {
        let bytes =
            frame.map_err(|e| ApiError::invalid(format!("the request body broke off: {e}")))?;
        if pending.is_empty() && bytes.len() >= GATHER {
            upload.write(&bytes).await.map_err(file_error)?;
            continue;
        }
        pending.extend_from_slice(&bytes);
        if pending.len() >= GATHER {
            upload.write(&pending).await.map_err(file_error)?;
            pending.clear();
        }
    }
    if !pending.is_empty() {
        upload.write(&pending).await.map_err(file_error)?;
    }
    upload.finish().await.map_err(file_error)
}

/// Download a file's bytes.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), PathQuery),
    responses(
        (status = 200, description = "The file's bytes (Content-Length set when the file has a size)", content_type = "application/octet-stream", body = RawBytes),
        (status = 400, description = "Invalid path (NUL, too long, outside the sandbox)", body = ErrorBody),
        (status = 404, description = "No such file", body = ErrorBody),
        (status = 409, description = "The path is a directory", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn download(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let path = required(query.path)?;
    let who = auth.require(Scope::Exec)?;
    let (size, body) = match state.manager.agent_stream(who, &id).await? {
        Some(stream) => {
            let download = transfer_read(stream, &path).await.map_err(file_error)?;
            (download.entry().size, transfer_body(download))
        }
        // A backend without transfer connections (microVMs): the same
        // bytes, framed over the shared connection.
        None => {
            let agent = agent(&state, &auth, &id).await?;
            let download = agent.fs_read(&path).await.map_err(file_error)?;
            (download.entry().map_or(0, |e| e.size), body_of(download))
        }
    };
    let mut response = body.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    // Files in /proc report size 0 and then have content: no length for those.
    if size > 0 {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    Ok(response)
}

/// Upload a file: the request body is its content.
///
/// Missing parent directories are created. The content is written to a
/// temporary file and renamed into place when the body is complete, so a
/// broken upload leaves the old file (or nothing). A symlink at `path` is
/// replaced, not followed.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/files", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), UploadQuery),
    request_body(content = RawBytes, content_type = "application/octet-stream"),
    responses(
        (status = 200, description = "Written", body = FileEntry),
        (status = 400, description = "Invalid path or mode", body = ErrorBody),
        (status = 409, description = "The path is a directory", body = ErrorBody),
        (status = 507, description = "The sandbox's disk is full", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn upload(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Json<FileEntry>, ApiError> {
    let path = required(query.path)?;
    let who = auth.require(Scope::Exec)?;
    let mode = query.mode.map(|m| m.0);
    let mut body = body.into_data_stream();
    let written = upload_from(&state, &auth, who, &id, &path, mode, &mut body).await;
    if written.is_err() {
        drain(&mut body).await;
    }
    Ok(Json(file_entry(written?)))
}

async fn upload_from(
    state: &AppState,
    auth: &Auth,
    who: &Principal,
    id: &str,
    path: &str,
    mode: Option<u32>,
    body: &mut BodyDataStream,
) -> Result<FsEntry, ApiError> {
    let Some(stream) = state.manager.agent_stream(who, id).await? else {
        let agent = agent(state, auth, id).await?;
        let upload = agent.fs_write(path, mode).await.map_err(file_error)?;
        return match feed(upload, body).await? {
            FsDone::Entry(entry) => Ok(entry),
            other => Err(ApiError::internal(format!(
                "the agent answered an upload with {other:?}"
            ))),
        };
    };
    let upload = transfer_write(stream, path, mode)
        .await
        .map_err(file_error)?;
    feed_transfer(upload, body).await
}

/// Describe a path.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/fs/stat", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), StatQuery),
    responses(
        (status = 200, description = "The entry", body = FileEntry),
        (status = 404, description = "No such path", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn stat(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<StatQuery>,
) -> Result<Json<FileEntry>, ApiError> {
    let path = required(query.path)?;
    let agent = agent(&state, &auth, &id).await?;
    let entry = agent
        .fs_stat(&path, query.follow.unwrap_or(false))
        .await
        .map_err(file_error)?;
    Ok(Json(file_entry(entry)))
}

/// List a directory, `depth` levels down.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/fs/list", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), ListQuery),
    responses(
        (status = 200, description = "Entries, each directory's sorted by name", body = FileList),
        (status = 404, description = "No such directory", body = ErrorBody),
        (status = 409, description = "Not a directory", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<ListQuery>,
) -> Result<Json<FileList>, ApiError> {
    let path = required(query.path)?;
    let limit = query.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return Err(ApiError::invalid(format!(
            "limit {limit} must be between 1 and {MAX_LIST_LIMIT}"
        )));
    }
    let agent = agent(&state, &auth, &id).await?;
    let (entries, truncated) = agent
        .fs_list(&path, query.depth.unwrap_or(1), limit)
        .await
        .map_err(file_error)?;
    Ok(Json(FileList {
        entries: entries.into_iter().map(file_entry).collect(),
        truncated,
    }))
}

/// Create a directory.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/fs/mkdir", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = MkdirRequest,
    responses(
        (status = 201, description = "Created (or, with `parents`, already there)", body = FileEntry),
        (status = 404, description = "The parent does not exist (and `parents` is false)", body = ErrorBody),
        (status = 409, description = "The path exists", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn mkdir(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MkdirRequest>,
) -> Result<Response, ApiError> {
    let path = required_as(Some(req.path), "`path` field")?;
    let agent = agent(&state, &auth, &id).await?;
    let entry = agent
        .fs_mkdir(&path, req.parents, req.mode.map(|m| m.0))
        .await
        .map_err(file_error)?;
    Ok((StatusCode::CREATED, Json(file_entry(entry))).into_response())
}

/// Rename a file or directory.
#[utoipa::path(
    post, path = "/v1/sandboxes/{id}/fs/move", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID")),
    request_body = MoveRequest,
    responses(
        (status = 200, description = "Moved; the entry at its new path", body = FileEntry),
        (status = 404, description = "`from` does not exist", body = ErrorBody),
        (status = 409, description = "`to` exists (and `overwrite` is false), or is a non-empty directory", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn rename(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<MoveRequest>,
) -> Result<Json<FileEntry>, ApiError> {
    let from = required_as(Some(req.from), "`from` field")?;
    let to = required_as(Some(req.to), "`to` field")?;
    let agent = agent(&state, &auth, &id).await?;
    agent
        .fs_move(&from, &to, req.overwrite)
        .await
        .map_err(file_error)?;
    let entry = agent.fs_stat(&to, false).await.map_err(file_error)?;
    Ok(Json(file_entry(entry)))
}

/// Remove a file, a symlink, or a directory (`recursive` for a non-empty one).
#[utoipa::path(
    delete, path = "/v1/sandboxes/{id}/fs", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), RemoveQuery),
    responses(
        (status = 204, description = "Removed"),
        (status = 404, description = "No such path", body = ErrorBody),
        (status = 409, description = "A non-empty directory without `recursive`", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn remove(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<RemoveQuery>,
) -> Result<StatusCode, ApiError> {
    let path = required(query.path)?;
    let agent = agent(&state, &auth, &id).await?;
    agent
        .fs_remove(&path, query.recursive.unwrap_or(false))
        .await
        .map_err(file_error)?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download a tar archive of a file or directory tree.
///
/// Entries are named from the path's last component (`out.txt`, or
/// `dir/`, `dir/a`, …). Symlinks are archived as symlinks; the walk does
/// not descend into other file systems mounted below the path.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/fs/tar", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), PathQuery),
    responses(
        (status = 200, description = "A tar archive", content_type = "application/x-tar", body = RawBytes),
        (status = 404, description = "No such path", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn tar_download(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
) -> Result<Response, ApiError> {
    let path = required(query.path)?;
    let agent = agent(&state, &auth, &id).await?;
    let download = agent.fs_tar_out(&path).await.map_err(file_error)?;
    let mut response = body_of(download).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-tar"),
    );
    Ok(response)
}

/// Extract a tar archive (the request body) into a directory.
///
/// The directory is created if missing. Entries with absolute names or
/// `..`, and entries that would be written through a symlink, are refused
/// with a 400 naming the entry; devices are refused with a 403. Nothing of
/// a refused or broken archive is left behind.
#[utoipa::path(
    put, path = "/v1/sandboxes/{id}/fs/tar", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), PathQuery),
    request_body(content = RawBytes, content_type = "application/x-tar"),
    responses(
        (status = 200, description = "Extracted", body = TarResult),
        (status = 400, description = "A bad entry or a malformed archive", body = ErrorBody),
        (status = 409, description = "An entry conflicts with what is there (a file where a directory is)", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn tar_upload(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<PathQuery>,
    body: Body,
) -> Result<Json<TarResult>, ApiError> {
    let path = required(query.path)?;
    let mut body = body.into_data_stream();
    let extracted = async {
        let agent = agent(&state, &auth, &id).await?;
        let upload = agent.fs_tar_in(&path).await.map_err(file_error)?;
        feed(upload, &mut body).await
    }
    .await;
    if extracted.is_err() {
        drain(&mut body).await;
    }
    match extracted? {
        FsDone::Transferred { bytes, entries } => Ok(Json(TarResult { entries, bytes })),
        other => Err(ApiError::internal(format!(
            "unexpected answer from the agent: {other:?}"
        ))),
    }
}

fn watch_event(event: FsEvent) -> WatchEvent {
    let (kind, path, from, to, dir) = match event {
        FsEvent::Create { path, dir } => ("create", Some(path), None, None, dir),
        FsEvent::Modify { path } => ("modify", Some(path), None, None, false),
        FsEvent::Delete { path, dir } => ("delete", Some(path), None, None, dir),
        FsEvent::Move { from, to, dir } => ("move", None, from, to, dir),
        FsEvent::Overflow => ("overflow", None, None, None, false),
    };
    WatchEvent {
        kind: kind.into(),
        path,
        from,
        to,
        dir,
    }
}

/// Watch a path for changes, as server-sent events.
///
/// Each event's name is its type (`create`, `modify`, `delete`, `move`,
/// `overflow`) and its data a JSON [`WatchEvent`]. The stream ends when
/// the path itself is removed; closing the connection ends the watch.
#[utoipa::path(
    get, path = "/v1/sandboxes/{id}/fs/watch", tag = "files",
    params(("id" = String, Path, description = "Sandbox ID"), WatchQuery),
    responses(
        (status = 200, description = "Server-sent events, each with a WatchEvent as data", content_type = "text/event-stream", body = WatchEvent),
        (status = 404, description = "No such path", body = ErrorBody),
    ),
    security(("bearer" = []), ("api_key" = []))
)]
pub async fn watch(
    State(state): State<AppState>,
    auth: Auth,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<WatchQuery>,
) -> Result<Response, ApiError> {
    let path = required(query.path)?;
    let agent = agent(&state, &auth, &id).await?;
    let watch = agent
        .fs_watch(&path, query.recursive.unwrap_or(false))
        .await
        .map_err(file_error)?;
    let events = futures::stream::unfold(Some(watch), |watch| async move {
        let mut watch = watch?;
        let event = match watch.next_event().await {
            Ok(Some(event)) => {
                let event = watch_event(event);
                Event::default()
                    .event(event.kind.clone())
                    .json_data(&event)
                    .unwrap_or_default()
            }
            Ok(None) => return None,
            Err(err) => {
                let err = file_error(err);
                let body = ErrorBody::new(err.code, err.message);
                let event = Event::default()
                    .event("error")
                    .json_data(&body)
                    .unwrap_or_default();
                return Some((Ok::<Event, Infallible>(event), None));
            }
        };
        Some((Ok(event), Some(watch)))
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(5)))
        .into_response())
}
