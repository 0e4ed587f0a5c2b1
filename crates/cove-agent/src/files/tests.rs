//! File operations against a temporary directory standing in for the
//! sandbox's root (and, for magic links, against the real `/`).

#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cove_protocol::AgentMessage;
use cove_protocol::fs::{FileKind, FsDone, FsError, FsErrorKind, FsEvent, FsOp, FsReply};

use super::control::{Control, Ctx};
use super::path::Root;
use super::run;

struct Done {
    replies: Vec<FsReply>,
    result: Result<FsDone, FsError>,
}

impl Done {
    fn data(&self) -> Vec<u8> {
        let mut all = Vec::new();
        for reply in &self.replies {
            if let FsReply::Data { data } = reply {
                all.extend_from_slice(data);
            }
        }
        all
    }

    fn err(&self) -> &FsError {
        match &self.result {
            Err(err) => err,
            Ok(done) => panic!("expected an error, got {done:?}"),
        }
    }
}

fn root(dir: &Path) -> Arc<Root> {
    Arc::new(Root::open(dir, "/work").unwrap())
}

/// Run `op` with `upload` fed in as chunks; collect everything it sends.
fn op(root: &Arc<Root>, op: FsOp, upload: &[&[u8]]) -> Done {
    let (tx, mut rx) = crate::conn::test_channel(1024);
    let ctl = Control::new(u64::MAX / 2);
    for chunk in upload {
        ctl.push(chunk.to_vec());
    }
    ctl.end();
    let ctx = Ctx::new(7, tx, ctl);
    let root = root.clone();
    let worker = std::thread::spawn(move || {
        let result = run(&root, &ctx, op, None);
        ctx.finish(result);
    });
    let mut replies = Vec::new();
    loop {
        match rx.blocking_recv() {
            Some(AgentMessage::Fs {
                req: 7,
                msg: FsReply::Done(result),
            }) => {
                worker.join().unwrap();
                return Done { replies, result };
            }
            Some(AgentMessage::Fs { msg, .. }) => replies.push(msg),
            other => panic!("unexpected {other:?}"),
        }
    }
}

fn write(root: &Arc<Root>, path: &str, data: &[u8]) -> Result<FsDone, FsError> {
    op(
        root,
        FsOp::Write {
            path: path.into(),
            mode: None,
        },
        &[data],
    )
    .result
}

fn read(root: &Arc<Root>, path: &str) -> Result<Vec<u8>, FsError> {
    let done = op(
        root,
        FsOp::Read {
            path: path.into(),
            window: 0,
        },
        &[],
    );
    done.result.clone().map(|_| done.data())
}

fn kind(result: Result<impl std::fmt::Debug, FsError>) -> FsErrorKind {
    match result {
        Err(err) => err.kind,
        Ok(v) => panic!("expected an error, got {v:?}"),
    }
}

#[test]
fn write_read_round_trip_and_errors() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let chunks: Vec<&[u8]> = data.chunks(65536).collect();
    let done = op(
        &root,
        FsOp::Write {
            path: "nested/dir/blob".into(),
            mode: Some(0o640),
        },
        &chunks,
    );
    let Ok(FsDone::Entry(entry)) = &done.result else {
        panic!("{:?}", done.result)
    };
    assert_eq!(
        (entry.size, entry.mode, entry.path.as_str()),
        (300_000, 0o640, "/work/nested/dir/blob")
    );
    // Relative paths are taken from the working directory.
    assert_eq!(read(&root, "/work/nested/dir/blob").unwrap(), data);
    assert_eq!(read(&root, "nested/dir/blob").unwrap(), data);
    let meta = std::fs::metadata(dir.path().join("work/nested/dir/blob")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    // Replacing keeps the mode; nothing temporary stays behind.
    write(&root, "/work/nested/dir/blob", b"short").unwrap();
    assert_eq!(read(&root, "nested/dir/blob").unwrap(), b"short");
    let meta = std::fs::metadata(dir.path().join("work/nested/dir/blob")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let names: Vec<_> = std::fs::read_dir(dir.path().join("work/nested/dir"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec!["blob"]);

    assert_eq!(kind(read(&root, "/missing")), FsErrorKind::NotFound);
    assert_eq!(kind(read(&root, "/work")), FsErrorKind::IsADirectory);
    assert_eq!(
        kind(write(&root, "/work/nested", b"x")),
        FsErrorKind::IsADirectory
    );
    assert_eq!(kind(read(&root, "/work/a\0b")), FsErrorKind::Invalid);
    let long = format!("/{}", "a/".repeat(3000));
    assert_eq!(kind(read(&root, &long)), FsErrorKind::Invalid);
    let long_name = format!("/{}", "n".repeat(300));
    assert_eq!(kind(write(&root, &long_name, b"x")), FsErrorKind::Invalid);
    assert_eq!(kind(write(&root, "/work/..", b"x")), FsErrorKind::Invalid);
    assert_eq!(kind(write(&root, "/", b"x")), FsErrorKind::Invalid);
    // A file where a directory is needed.
    assert_eq!(
        kind(write(&root, "/work/nested/dir/blob/x", b"x")),
        FsErrorKind::NotADirectory
    );
}

#[test]
fn an_abandoned_upload_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    std::fs::create_dir(dir.path().join("work")).unwrap();
    std::fs::write(dir.path().join("work/keep"), "old").unwrap();
    let (tx, mut rx) = crate::conn::test_channel(64);
    let ctl = Control::new(0);
    ctl.push(b"new content".to_vec());
    let ctx = Ctx::new(1, tx, ctl.clone());
    let r = root.clone();
    let worker = std::thread::spawn(move || {
        let result = run(
            &r,
            &ctx,
            FsOp::Write {
                path: "keep".into(),
                mode: None,
            },
            None,
        );
        ctx.finish(result);
    });
    // Wait until the first chunk is consumed, then cancel.
    loop {
        if let Some(AgentMessage::Fs {
            msg: FsReply::Ack { .. },
            ..
        }) = rx.blocking_recv()
        {
            break;
        }
    }
    ctl.cancel();
    worker.join().unwrap();
    assert_eq!(std::fs::read(dir.path().join("work/keep")).unwrap(), b"old");
    assert_eq!(
        std::fs::read_dir(dir.path().join("work")).unwrap().count(),
        1
    );
}

#[test]
fn stat_list_mkdir_move_remove() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    let mkdir = |path: &str, parents: bool| {
        op(
            &root,
            FsOp::Mkdir {
                path: path.into(),
                parents,
                mode: Some(0o750),
            },
            &[],
        )
        .result
    };
    let Ok(FsDone::Entry(made)) = mkdir("/a/b/c", true) else {
        panic!()
    };
    assert_eq!((made.kind, made.mode), (FileKind::Dir, 0o750));
    assert_eq!(kind(mkdir("/a/b/c", false)), FsErrorKind::Exists);
    assert_eq!(kind(mkdir("/nope/x", false)), FsErrorKind::NotFound);
    mkdir("/a/b/c", true).unwrap();
    write(&root, "/a/b/file", b"12345").unwrap();
    std::os::unix::fs::symlink("/a/b/file", dir.path().join("a/link")).unwrap();

    let stat = |path: &str, follow: bool| {
        op(
            &root,
            FsOp::Stat {
                path: path.into(),
                follow,
            },
            &[],
        )
        .result
    };
    let Ok(FsDone::Entry(link)) = stat("/a/link", false) else {
        panic!()
    };
    assert_eq!(link.kind, FileKind::Symlink);
    assert_eq!(link.link_target.as_deref(), Some("/a/b/file"));
    let Ok(FsDone::Entry(file)) = stat("/a/link", true) else {
        panic!()
    };
    assert_eq!((file.kind, file.size), (FileKind::File, 5));
    let meta = std::fs::metadata(dir.path().join("a/b/file")).unwrap();
    assert_eq!((file.uid, file.mtime_sec), (meta.uid(), meta.mtime()));

    let list = |path: &str, depth: u32, limit: u32| {
        let done = op(
            &root,
            FsOp::List {
                path: path.into(),
                depth,
                limit,
            },
            &[],
        );
        let mut paths = Vec::new();
        for reply in done.replies {
            if let FsReply::Entries { entries } = reply {
                paths.extend(entries.into_iter().map(|e| e.path));
            }
        }
        (paths, done.result)
    };
    let (paths, result) = list("/a", 1, 100);
    assert_eq!(paths, vec!["/a/b", "/a/link"]);
    assert_eq!(result.unwrap(), FsDone::Listed { truncated: false });
    let (mut paths, _) = list("/a", 3, 100);
    paths.sort();
    assert_eq!(paths, vec!["/a/b", "/a/b/c", "/a/b/file", "/a/link"]);
    let (paths, result) = list("/a", 3, 2);
    assert_eq!(paths.len(), 2);
    assert_eq!(result.unwrap(), FsDone::Listed { truncated: true });
    assert_eq!(kind(list("/a/b/file", 1, 10).1), FsErrorKind::NotADirectory);
    assert_eq!(kind(list("/a", 0, 10).1), FsErrorKind::Invalid);

    let mv = |from: &str, to: &str, overwrite: bool| {
        op(
            &root,
            FsOp::Move {
                from: from.into(),
                to: to.into(),
                overwrite,
            },
            &[],
        )
        .result
    };
    write(&root, "/a/other", b"o").unwrap();
    assert_eq!(
        kind(mv("/a/other", "/a/b/file", false)),
        FsErrorKind::Exists
    );
    mv("/a/other", "/a/b/file", true).unwrap();
    assert_eq!(read(&root, "/a/b/file").unwrap(), b"o");
    assert_eq!(kind(mv("/a/missing", "/a/x", false)), FsErrorKind::NotFound);
    assert_eq!(kind(mv("/a/b", "/a/b/c/d", false)), FsErrorKind::Invalid);

    let rm = |path: &str, recursive: bool| {
        op(
            &root,
            FsOp::Remove {
                path: path.into(),
                recursive,
            },
            &[],
        )
        .result
    };
    assert_eq!(kind(rm("/a/b", false)), FsErrorKind::NotEmpty);
    rm("/a/link", false).unwrap();
    // Removing a symlink never touches its target.
    assert!(dir.path().join("a/b/file").exists());
    rm("/a/b", true).unwrap();
    assert!(!dir.path().join("a/b").exists());
    assert_eq!(kind(rm("/a/b", true)), FsErrorKind::NotFound);
    assert_eq!(kind(rm("/", true)), FsErrorKind::Invalid);
}

#[test]
fn paths_cannot_leave_the_root() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "host secret").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    let secret = outside.path().join("secret");
    let secret = secret.to_str().unwrap();
    // `..` stops at the root.
    let dotdot = format!("/../../../../..{secret}");
    assert_eq!(kind(read(&root, &dotdot)), FsErrorKind::NotFound);
    // An absolute symlink resolves inside the root.
    std::os::unix::fs::symlink(secret, dir.path().join("abs")).unwrap();
    assert_eq!(kind(read(&root, "/abs")), FsErrorKind::NotFound);
    let outside_dir = outside.path().to_str().unwrap();
    std::os::unix::fs::symlink(outside_dir, dir.path().join("absdir")).unwrap();
    assert!(write(&root, "/absdir/planted", b"x").is_err());
    assert!(!outside.path().join("planted").exists());
    // A relative symlink climbing out is clamped too.
    std::os::unix::fs::symlink("../../../../../../..", dir.path().join("up")).unwrap();
    let via_up = format!("/up{secret}");
    assert_eq!(kind(read(&root, &via_up)), FsErrorKind::NotFound);
    // mkdir -p through the symlinks creates inside the root only.
    let made = op(
        &root,
        FsOp::Mkdir {
            path: format!("/up{outside_dir}/made"),
            parents: true,
            mode: None,
        },
        &[],
    );
    made.result.unwrap();
    assert!(!outside.path().join("made").exists());
    assert!(dir.path().join(&outside_dir[1..]).join("made").is_dir());
    // Removing through an absolute symlink removes inside the root only.
    let gone = op(
        &root,
        FsOp::Remove {
            path: "/absdir/secret".into(),
            recursive: false,
        },
        &[],
    );
    assert!(gone.result.is_err());
    assert!(outside.path().join("secret").exists());
}

#[test]
fn magic_links_are_refused() {
    // With the real `/` as the root, /proc/self/fd/N is a magic link to an
    // open file: the agent must not follow it.
    let file = tempfile::NamedTempFile::new().unwrap();
    let root = Arc::new(Root::open(Path::new("/"), "/").unwrap());
    let link = format!("/proc/self/fd/{}", file.as_file().as_raw_fd());
    assert_eq!(kind(read(&root, &link)), FsErrorKind::Escape);
    // Writes resolve the parent, /proc/self/fd, first: a per-process
    // directory, refused before the link is reached.
    assert_eq!(
        kind(write(&root, &link, b"x")),
        FsErrorKind::PermissionDenied
    );
    let dir_fd = std::fs::File::open(std::env::temp_dir()).unwrap();
    let through_dir = format!("/proc/self/fd/{}/planted", dir_fd.as_raw_fd());
    assert_eq!(
        kind(write(&root, &through_dir, b"x")),
        FsErrorKind::PermissionDenied
    );
    let mkdir = op(
        &root,
        FsOp::Mkdir {
            path: through_dir.clone(),
            parents: true,
            mode: None,
        },
        &[],
    );
    assert_eq!(mkdir.err().kind, FsErrorKind::PermissionDenied);
    assert!(!std::env::temp_dir().join("planted").exists());
    let through = op(
        &root,
        FsOp::Stat {
            path: format!("/proc/self/cwd{}", file.path().display()),
            follow: true,
        },
        &[],
    );
    assert_eq!(through.err().kind, FsErrorKind::Escape);
    // Not even described.
    let done = op(
        &root,
        FsOp::Stat {
            path: link,
            follow: false,
        },
        &[],
    );
    assert_eq!(done.err().kind, FsErrorKind::PermissionDenied);
}

#[test]
fn process_files_are_refused() {
    // The agent would read its own environment, memory and descriptors:
    // per-process /proc entries are refused, by what they are, however
    // they are reached; the rest of /proc stays readable.
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink("/proc/self/environ", dir.path().join("env")).unwrap();
    std::os::unix::fs::symlink("/proc/self", dir.path().join("me")).unwrap();
    let root = Arc::new(Root::open(Path::new("/"), "/").unwrap());
    let base = dir.path().display().to_string();
    let pid = std::process::id();
    for path in [
        "/proc/self/environ".to_string(),
        format!("/proc/{pid}/environ"),
        "/proc/thread-self/environ".to_string(),
        format!("{base}/env"),
        format!("{base}/me/environ"),
    ] {
        let err = read(&root, &path).unwrap_err();
        assert_eq!(err.kind, FsErrorKind::PermissionDenied, "{path}: {err:?}");
        assert!(err.message.contains("read it with exec"), "{}", err.message);
    }
    let list = op(
        &root,
        FsOp::List {
            path: "/proc/self".into(),
            depth: 1,
            limit: 10,
        },
        &[],
    );
    assert_eq!(list.err().kind, FsErrorKind::PermissionDenied);
    let stat = op(
        &root,
        FsOp::Stat {
            path: format!("{base}/me"),
            follow: true,
        },
        &[],
    );
    assert_eq!(stat.err().kind, FsErrorKind::PermissionDenied);
    let tar = tar_out(&root, &format!("/proc/{pid}/environ")).unwrap_err();
    assert_eq!(tar.kind, FsErrorKind::PermissionDenied);
    let meminfo = read(&root, "/proc/meminfo").unwrap();
    assert!(String::from_utf8_lossy(&meminfo).contains("MemTotal"));
    // Its symlink itself is an ordinary file of the sandbox.
    let link = op(
        &root,
        FsOp::Stat {
            path: format!("{base}/env"),
            follow: false,
        },
        &[],
    );
    assert!(link.result.is_ok(), "{:?}", link.result);
}

/// A tar header whose name is written raw (the tar crate refuses to build
/// the malicious names these tests need).
fn raw_entry(
    out: &mut tar::Builder<Vec<u8>>,
    name: &str,
    kind: tar::EntryType,
    link: &str,
    data: &[u8],
) {
    let mut header = tar::Header::new_gnu();
    let old = header.as_old_mut();
    old.name[..name.len()].copy_from_slice(name.as_bytes());
    old.linkname[..link.len()].copy_from_slice(link.as_bytes());
    header.set_entry_type(kind);
    header.set_mode(0o644);
    header.set_size(data.len() as u64);
    header.set_mtime(1_700_000_000);
    header.set_cksum();
    out.append(&header, data).unwrap();
}

fn untar(root: &Arc<Root>, dest: &str, archive: &[u8]) -> Result<FsDone, FsError> {
    let chunks: Vec<&[u8]> = archive.chunks(65536).collect();
    op(root, FsOp::TarIn { path: dest.into() }, &chunks).result
}

fn tar_out(root: &Arc<Root>, path: &str) -> Result<Vec<u8>, FsError> {
    let done = op(
        root,
        FsOp::TarOut {
            path: path.into(),
            window: 0,
        },
        &[],
    );
    done.result.clone().map(|_| done.data())
}

#[test]
fn tar_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("sub/deeper")).unwrap();
    std::fs::write(src.join("a.txt"), "alpha").unwrap();
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(src.join("sub/big.bin"), &big).unwrap();
    let long = "l".repeat(150);
    std::fs::write(src.join("sub/deeper").join(&long), "long name").unwrap();
    std::os::unix::fs::symlink("../a.txt", src.join("sub/link")).unwrap();
    std::fs::hard_link(src.join("a.txt"), src.join("sub/hard")).unwrap();
    std::fs::set_permissions(src.join("a.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();

    let archive = tar_out(&root, "/src").unwrap();
    let done = untar(&root, "/dst", &archive).unwrap();
    assert!(matches!(done, FsDone::Transferred { entries, .. } if entries >= 8));
    let dst = dir.path().join("dst/src");
    assert_eq!(std::fs::read(dst.join("a.txt")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(dst.join("sub/big.bin")).unwrap(), big);
    assert_eq!(
        std::fs::read(dst.join("sub/deeper").join(&long)).unwrap(),
        b"long name"
    );
    assert_eq!(
        std::fs::read_link(dst.join("sub/link")).unwrap(),
        Path::new("../a.txt")
    );
    let (a, hard) = (
        std::fs::metadata(dst.join("a.txt")).unwrap(),
        std::fs::metadata(dst.join("sub/hard")).unwrap(),
    );
    assert_eq!(a.ino(), hard.ino());
    assert_eq!(a.permissions().mode() & 0o777, 0o600);
    // A single file.
    let archive = tar_out(&root, "/src/a.txt").unwrap();
    untar(&root, "/one", &archive).unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("one/a.txt")).unwrap(),
        b"alpha"
    );
    assert_eq!(kind(tar_out(&root, "/missing")), FsErrorKind::NotFound);
}

#[test]
fn tar_entries_cannot_escape() {
    let outside = tempfile::tempdir().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    std::fs::create_dir(dir.path().join("dest")).unwrap();
    let outside_dir = outside.path().to_str().unwrap().to_string();
    type Entries<'a> = Vec<(&'a str, tar::EntryType, String)>;
    let attempts: Vec<(&str, Entries<'_>)> = vec![
        (
            "../",
            vec![("../evil", tar::EntryType::Regular, String::new())],
        ),
        (
            "absolute",
            vec![("/tmp/evil", tar::EntryType::Regular, String::new())],
        ),
        (
            "through the symlink",
            vec![
                ("out", tar::EntryType::Symlink, outside_dir.clone()),
                ("out/evil", tar::EntryType::Regular, String::new()),
            ],
        ),
        (
            "through the symlink",
            vec![
                ("up", tar::EntryType::Symlink, "..".into()),
                ("up/evil", tar::EntryType::Regular, String::new()),
            ],
        ),
        (
            "contains `..`",
            vec![("hl", tar::EntryType::Link, "../../etc/passwd".into())],
        ),
        (
            "absolute",
            vec![("hl", tar::EntryType::Link, "/etc/passwd".into())],
        ),
    ];
    for (needle, entries) in attempts {
        let mut out = tar::Builder::new(Vec::new());
        // A good entry first: it must not survive the bad one.
        raw_entry(&mut out, "good/file", tar::EntryType::Regular, "", b"fine");
        for (name, kind, link) in &entries {
            let data: &[u8] = if *kind == tar::EntryType::Regular {
                b"evil"
            } else {
                b""
            };
            raw_entry(&mut out, name, *kind, link, data);
        }
        let archive = out.into_inner().unwrap();
        let err = untar(&root, "/dest", &archive).unwrap_err();
        assert!(matches!(err.kind, FsErrorKind::Escape), "{needle}: {err:?}");
        assert!(err.message.contains(needle), "{needle}: {}", err.message);
        let left: Vec<_> = std::fs::read_dir(dir.path().join("dest"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{needle}: left {left:?}");
        assert!(!dir.path().join("evil").exists());
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
    // A symlink that was already in the destination is not followed either.
    std::os::unix::fs::symlink(&outside_dir, dir.path().join("dest/pre")).unwrap();
    let mut out = tar::Builder::new(Vec::new());
    raw_entry(&mut out, "pre/evil", tar::EntryType::Regular, "", b"evil");
    let err = untar(&root, "/dest", &out.into_inner().unwrap()).unwrap_err();
    assert_eq!(err.kind, FsErrorKind::Escape);
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    // Devices are refused, and a truncated archive leaves nothing.
    let mut out = tar::Builder::new(Vec::new());
    raw_entry(&mut out, "dev", tar::EntryType::Char, "", b"");
    assert_eq!(
        untar(&root, "/dest2", &out.into_inner().unwrap())
            .unwrap_err()
            .kind,
        FsErrorKind::PermissionDenied
    );
    let mut out = tar::Builder::new(Vec::new());
    raw_entry(&mut out, "d/f", tar::EntryType::Regular, "", &[1u8; 5000]);
    let archive = out.into_inner().unwrap();
    assert!(untar(&root, "/dest3", &archive[..3000]).is_err());
    // Not even the destination the request created.
    assert!(!dir.path().join("dest3").exists());
    assert!(!dir.path().join("dest2").exists());
}

#[test]
fn a_refused_archive_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = root(dir.path());
    // A file entry, then an entry below it as if it were a directory.
    let mut out = tar::Builder::new(Vec::new());
    for name in ["aaa", "fd", "fd/x", "zzz"] {
        raw_entry(&mut out, name, tar::EntryType::Regular, "", b"new");
    }
    let clash = out.into_inner().unwrap();
    let err = untar(&root, "/a/b", &clash).unwrap_err();
    assert_eq!(err.kind, FsErrorKind::NotADirectory, "{err:?}");
    assert!(!dir.path().join("a").exists());
    std::fs::create_dir(dir.path().join("old")).unwrap();
    std::fs::write(dir.path().join("old/aaa"), "old").unwrap();
    assert!(untar(&root, "/old", &clash).is_err());
    let names: Vec<_> = std::fs::read_dir(dir.path().join("old"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["aaa"]);
    assert_eq!(std::fs::read(dir.path().join("old/aaa")).unwrap(), b"old");
    // A good archive replaces the file.
    let mut out = tar::Builder::new(Vec::new());
    raw_entry(&mut out, "aaa", tar::EntryType::Regular, "", b"new");
    untar(&root, "/old", &out.into_inner().unwrap()).unwrap();
    assert_eq!(std::fs::read(dir.path().join("old/aaa")).unwrap(), b"new");
    assert_eq!(
        std::fs::read_dir(dir.path().join("old")).unwrap().count(),
        1
    );
}

#[test]
fn a_recursive_remove_that_would_cross_a_mount_removes_nothing() {
    // Needs a mount: a tmpfs below the tree.
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: mounting a tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tree = dir.path().join("tree");
    std::fs::create_dir_all(tree.join("b/mnt")).unwrap();
    std::fs::write(tree.join("a"), "a").unwrap();
    std::fs::write(tree.join("b/c"), "c").unwrap();
    let mnt = tree.join("b/mnt");
    if nix::mount::mount(
        Some("tmpfs"),
        &mnt,
        Some("tmpfs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .is_err()
    {
        eprintln!("skipped: cannot mount a tmpfs here");
        return;
    }
    std::fs::write(mnt.join("kept"), "k").unwrap();
    let root = root(dir.path());
    let done = op(
        &root,
        FsOp::Remove {
            path: "/tree".into(),
            recursive: true,
        },
        &[],
    );
    let err = done.err().clone();
    let _ = nix::mount::umount2(&mnt, nix::mount::MntFlags::MNT_DETACH);
    assert_eq!(err.kind, FsErrorKind::PermissionDenied, "{err:?}");
    assert!(err.message.contains("mount point"), "{}", err.message);
    assert!(tree.join("a").exists() && tree.join("b/c").exists());
}

#[test]
fn watch_reports_changes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("w")).unwrap();
    let root = root(dir.path());
    let (tx, mut rx) = crate::conn::test_channel(64);
    let ctl = Control::new(1000);
    let ctx = Ctx::new(3, tx, ctl.clone());
    let r = root.clone();
    let worker = std::thread::spawn(move || {
        let result = run(
            &r,
            &ctx,
            FsOp::Watch {
                path: "/w".into(),
                recursive: true,
                window: 1000,
            },
            None,
        );
        ctx.finish(result);
    });
    let mut next = || match rx.blocking_recv() {
        Some(AgentMessage::Fs { msg, .. }) => msg,
        other => panic!("{other:?}"),
    };
    assert!(matches!(next(), FsReply::Ready { .. }));
    let w = dir.path().join("w");
    std::fs::write(w.join("f"), "1").unwrap();
    std::fs::create_dir(w.join("sub")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(w.join("sub/inner"), "2").unwrap();
    std::fs::rename(w.join("f"), w.join("g")).unwrap();
    std::fs::remove_file(w.join("g")).unwrap();
    let mut events = Vec::new();
    while events.len() < 8 {
        match next() {
            FsReply::Event { event } => {
                let done = matches!(&event, FsEvent::Delete { path, .. } if path == "/w/g");
                events.push(event);
                if done {
                    break;
                }
            }
            other => panic!("{other:?}"),
        }
    }
    let expect = [
        FsEvent::Create {
            path: "/w/f".into(),
            dir: false,
        },
        FsEvent::Modify {
            path: "/w/f".into(),
        },
        FsEvent::Create {
            path: "/w/sub".into(),
            dir: true,
        },
        FsEvent::Create {
            path: "/w/sub/inner".into(),
            dir: false,
        },
        FsEvent::Move {
            from: Some("/w/f".into()),
            to: Some("/w/g".into()),
            dir: false,
        },
        FsEvent::Delete {
            path: "/w/g".into(),
            dir: false,
        },
    ];
    for e in &expect {
        assert!(events.contains(e), "missing {e:?} in {events:?}");
    }
    ctl.cancel();
    assert!(matches!(next(), FsReply::Done(Ok(FsDone::Ok))));
    worker.join().unwrap();
}

#[test]
fn a_writable_layer_goes_out_as_an_image_layer() {
    let dir = tempfile::tempdir().unwrap();
    let upper = dir.path();
    std::fs::create_dir_all(upper.join("etc")).unwrap();
    std::fs::write(upper.join("etc/new.conf"), "new").unwrap();
    std::fs::create_dir(upper.join("opaque")).unwrap();
    std::fs::write(upper.join("opaque/only"), "only").unwrap();
    // A whiteout (0/0 character device) and an opaque directory, as
    // overlayfs writes them: both need root (CAP_MKNOD, trusted.* xattrs).
    let whiteout = nix::sys::stat::mknod(
        &upper.join("etc/gone"),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o644),
        0,
    );
    let opaque =
        std::ffi::CString::new(upper.join("opaque").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: setxattr reads the NUL-terminated path and name and one byte.
    let set = unsafe {
        libc::setxattr(
            opaque.as_ptr(),
            c"trusted.overlay.opaque".as_ptr(),
            b"y".as_ptr().cast(),
            1,
            0,
        )
    };
    if whiteout.is_err() || set != 0 {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs the tests as root"
        );
        eprintln!("skipped: needs root for mknod and trusted.* xattrs");
        return;
    }
    // A program's own attribute on a file and on a directory: carried.
    for (path, value) in [("etc/new.conf", &b"file"[..]), ("etc", &b"dir"[..])] {
        let path = std::ffi::CString::new(upper.join(path).as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: setxattr reads the NUL-terminated path and name and the value.
        let set = unsafe {
            libc::setxattr(
                path.as_ptr(),
                c"user.cove.test".as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        };
        assert_eq!(set, 0, "user.* xattrs on the test's file system");
    }
    let fd = nix::fcntl::open(
        upper,
        nix::fcntl::OFlag::O_PATH | nix::fcntl::OFlag::O_DIRECTORY,
        nix::sys::stat::Mode::empty(),
    )
    .unwrap();
    let layer = Arc::new(Root::from_fd(fd));
    let done = op(&layer, FsOp::WritableLayer { window: 0 }, &[]);
    assert!(done.result.is_ok(), "{:?}", done.result);
    let data = done.data();
    let mut archive = tar::Archive::new(&data[..]);
    let mut xattrs: Vec<(String, String, Vec<u8>)> = Vec::new();
    let mut entries: Vec<(String, tar::EntryType)> = archive
        .entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
            if let Some(pax) = e.pax_extensions().unwrap() {
                for ext in pax {
                    let ext = ext.unwrap();
                    let key = ext.key().unwrap().to_string();
                    xattrs.push((name.clone(), key, ext.value_bytes().to_vec()));
                }
            }
            (name, e.header().entry_type())
        })
        .collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    xattrs.sort();
    // The program's attributes go out as PAX records; overlayfs' opaque
    // marker does not (it is the `.wh..wh..opq` entry).
    assert_eq!(
        xattrs,
        [
            (
                "etc/".to_string(),
                "SCHILY.xattr.user.cove.test".to_string(),
                b"dir".to_vec()
            ),
            (
                "etc/new.conf".to_string(),
                "SCHILY.xattr.user.cove.test".to_string(),
                b"file".to_vec()
            ),
        ]
    );
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "etc/",
            "etc/.wh.gone",
            "etc/new.conf",
            "opaque/",
            "opaque/.wh..wh..opq",
            "opaque/only"
        ]
    );
    // No device node goes out: the whiteout is an empty regular file.
    assert!(
        entries
            .iter()
            .all(|(_, kind)| matches!(kind, tar::EntryType::Regular | tar::EntryType::Directory)),
        "{entries:?}"
    );
}
