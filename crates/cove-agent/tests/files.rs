//! File operations through the real protocol: a `cove-agent` process on a
//! socketpair, driven by `AgentClient`'s file methods. The agent's root is
//! the host's `/` here, so everything happens in a temporary directory.

#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use cove_protocol::client::{AgentClient, ClientError};
use cove_protocol::fs::{FileKind, FsDone, FsErrorKind, FsEvent};

struct Agent {
    child: Child,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn agent() -> Agent {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove-agent"));
    cmd.args(["--fd", "3", "--cwd", "/tmp"]);
    // SAFETY: dup2 is async-signal-safe; fd 3 is the child's copy of `theirs`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(ours).unwrap();
    let client = AgentClient::connect(stream, "test").await.unwrap();
    Agent { child, client }
}

fn fs_kind(err: ClientError) -> FsErrorKind {
    match err {
        ClientError::Fs(e) => e.kind,
        other => panic!("expected a file error, got {other}"),
    }
}

#[tokio::test]
async fn upload_download_and_friends() {
    let a = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    let file = format!("{base}/sub/data.bin");
    let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut up = a.client.fs_write(&file, Some(0o600)).await.unwrap();
    for chunk in data.chunks(100_000) {
        up.write(chunk).await.unwrap();
    }
    let FsDone::Entry(entry) = up.finish().await.unwrap() else {
        panic!()
    };
    assert_eq!((entry.size, entry.mode), (5_000_000, 0o600));

    let down = a.client.fs_read(&file).await.unwrap();
    assert_eq!(down.entry().unwrap().size, 5_000_000);
    assert_eq!(down.read_to_end().await.unwrap(), data);

    // A download dropped half-way is cancelled; the connection stays usable.
    let mut partial = a.client.fs_read(&file).await.unwrap();
    partial.next_chunk().await.unwrap().unwrap();
    drop(partial);

    let entry = a.client.fs_stat(&file, false).await.unwrap();
    assert_eq!(entry.kind, FileKind::File);
    let (entries, truncated) = a.client.fs_list(&base, 2, 100).await.unwrap();
    assert!(!truncated);
    assert_eq!(entries.len(), 2);
    a.client
        .fs_mkdir(&format!("{base}/m/n"), true, None)
        .await
        .unwrap();
    a.client
        .fs_move(&file, &format!("{base}/m/n/moved"), false)
        .await
        .unwrap();
    assert_eq!(
        fs_kind(a.client.fs_stat(&file, true).await.unwrap_err()),
        FsErrorKind::NotFound
    );
    assert_eq!(
        fs_kind(
            a.client
                .fs_remove(&format!("{base}/m"), false)
                .await
                .unwrap_err()
        ),
        FsErrorKind::NotEmpty
    );
    a.client
        .fs_remove(&format!("{base}/m"), true)
        .await
        .unwrap();
    assert_eq!(
        fs_kind(a.client.fs_read(&base).await.unwrap_err()),
        FsErrorKind::IsADirectory
    );
    assert_eq!(
        fs_kind(a.client.fs_read("/a\0b").await.unwrap_err()),
        FsErrorKind::Invalid
    );
    a.client.ping().await.unwrap();
}

#[tokio::test]
async fn tar_and_watch() {
    let a = agent().await;
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().to_str().unwrap().to_string();
    std::fs::create_dir(dir.path().join("tree")).unwrap();
    std::fs::write(dir.path().join("tree/one"), "1").unwrap();

    let archive = a
        .client
        .fs_tar_out(&format!("{base}/tree"))
        .await
        .unwrap()
        .read_to_end()
        .await
        .unwrap();
    let mut up = a.client.fs_tar_in(&format!("{base}/copy")).await.unwrap();
    up.write(&archive).await.unwrap();
    up.finish().await.unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("copy/tree/one")).unwrap(),
        b"1"
    );
    // Garbage is an error, not a hang.
    let mut up = a.client.fs_tar_in(&format!("{base}/bad")).await.unwrap();
    let _ = up.write(&[7u8; 4096]).await;
    assert!(up.finish().await.is_err());

    let mut watch = a.client.fs_watch(&base, false).await.unwrap();
    std::fs::write(dir.path().join("new"), "x").unwrap();
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next_event())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        event,
        FsEvent::Create {
            path: format!("{base}/new"),
            dir: false
        }
    );
    drop(watch);
    a.client.ping().await.unwrap();
}

/// An agent listening on a unix socket, for transfer connections.
struct Listening {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Listening {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn listening() -> Listening {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let child = Command::new(env!("CARGO_BIN_EXE_cove-agent"))
        .arg("--listen")
        .arg(&socket)
        .args(["--cwd", "/tmp"])
        .spawn()
        .unwrap();
    for _ in 0..200 {
        if socket.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Listening {
        child,
        socket,
        _dir: dir,
    }
}

#[tokio::test]
async fn transfer_connections() {
    use cove_protocol::client::{transfer_read, transfer_write};
    let agent = listening().await;
    let connect = || tokio::net::UnixStream::connect(&agent.socket);
    let dir = tempfile::tempdir().unwrap();
    let file = format!("{}/up/data.bin", dir.path().display());
    let data: Vec<u8> = (0..7_000_000u32).map(|i| (i % 249) as u8).collect();

    let mut up = transfer_write(connect().await.unwrap(), &file, Some(0o640))
        .await
        .unwrap();
    for piece in data.chunks(300_000) {
        up.write(piece).await.unwrap();
    }
    let entry = up.finish().await.unwrap();
    assert_eq!((entry.size, entry.mode), (7_000_000, 0o640));
    assert_eq!(std::fs::read(&file).unwrap(), data);

    let mut down = transfer_read(connect().await.unwrap(), &file)
        .await
        .unwrap();
    assert_eq!(down.entry().size, 7_000_000);
    let mut back = Vec::new();
    while let Some(chunk) = down.next_chunk().await.unwrap() {
        back.extend_from_slice(&chunk);
    }
    assert_eq!(back, data);
    // A file of unknown size (/proc) is read to its end.
    let mut down = transfer_read(connect().await.unwrap(), "/proc/meminfo")
        .await
        .unwrap();
    let mut status = Vec::new();
    while let Some(chunk) = down.next_chunk().await.unwrap() {
        status.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&status).contains("MemTotal"));

    // An upload that breaks off leaves the old file and no temporary file.
    let mut up = transfer_write(connect().await.unwrap(), &file, None)
        .await
        .unwrap();
    up.write(b"partial").await.unwrap();
    drop(up);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(std::fs::read(&file).unwrap(), data);
    assert_eq!(std::fs::read_dir(dir.path().join("up")).unwrap().count(), 1);
    // Errors come back before any byte moves.
    let err = transfer_read(connect().await.unwrap(), dir.path().to_str().unwrap())
        .await
        .unwrap_err();
    assert_eq!(fs_kind(err), FsErrorKind::IsADirectory);
    let err = transfer_write(connect().await.unwrap(), dir.path().to_str().unwrap(), None)
        .await
        .unwrap_err();
    assert_eq!(fs_kind(err), FsErrorKind::IsADirectory);
    // The ordinary protocol still works on the same listener.
    let client = AgentClient::connect(connect().await.unwrap(), "test")
        .await
        .unwrap();
    client.ping().await.unwrap();
    assert_eq!(client.fs_stat(&file, false).await.unwrap().size, 7_000_000);
}
