//! Files in sandboxes, end to end: a real daemon on loopback, real
//! sandboxes, raw HTTP and the `cove` CLI. Round trips (binary, 1 GiB with
//! the daemon's memory watched), metadata, every error, the ways a path
//! or an archive entry could try to leave the sandbox, watches, and
//! `cove cp` both ways.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Daemon, root};
use serde_json::{Value, json};

fn url(d: &Daemon, id: &str, route: &str, query: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse(&format!("{}/v1/sandboxes/{id}/{route}", d.url)).unwrap();
    for (k, v) in query {
        url.query_pairs_mut().append_pair(k, v);
    }
    url.to_string()
}

fn send(req: reqwest::blocking::RequestBuilder) -> (u16, Vec<u8>) {
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.bytes().unwrap().to_vec())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or(Value::Null)
}

fn put(d: &Daemon, id: &str, path: &str, body: Vec<u8>) -> (u16, Value) {
    let (status, bytes) = send(
        d.http
            .put(url(d, id, "files", &[("path", path)]))
            .bearer_auth(&d.admin)
            .body(body),
    );
    (status, json_of(&bytes))
}

/// Upload `len` bytes over a plain socket, all of the body before reading
/// anything: the status line, and whether the whole body went out.
fn raw_put(d: &Daemon, id: &str, path: &str, len: usize) -> (String, bool) {
    let addr = d.url.trim_start_matches("http://");
    let mut sock = std::net::TcpStream::connect(addr).unwrap();
    let head = format!(
        "PUT /v1/sandboxes/{id}/files?path={path} HTTP/1.1\r\nHost: {addr}\r\n\
         Authorization: Bearer {}\r\nContent-Length: {len}\r\n\r\n",
        d.admin
    );
    sock.write_all(head.as_bytes()).unwrap();
    let sent = sock.write_all(&vec![7u8; len]).is_ok();
    let mut status = String::new();
    BufReader::new(sock).read_line(&mut status).unwrap();
    (status.trim_end().to_string(), sent)
}

fn get(d: &Daemon, id: &str, path: &str) -> (u16, Vec<u8>) {
    send(
        d.http
            .get(url(d, id, "files", &[("path", path)]))
            .bearer_auth(&d.admin),
    )
}

fn call(d: &Daemon, method: &str, id: &str, route: &str, query: &[(&str, &str)]) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let (status, bytes) = send(
        d.http
            .request(method, url(d, id, route, query))
            .bearer_auth(&d.admin),
    );
    (status, json_of(&bytes))
}

fn post(d: &Daemon, id: &str, route: &str, body: Value) -> (u16, Value) {
    d.call("POST", &format!("/v1/sandboxes/{id}/{route}"), Some(body))
}

fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

#[test]
fn round_trips_metadata_and_errors() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));

    // Every byte value, NULs and invalid UTF-8 included, and an empty file.
    let mut binary: Vec<u8> = (0..=255u8).collect();
    binary.extend((0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
    let (status, entry) = put(&d, &id, "/workspace/bin/data", binary.clone());
    assert_eq!(status, 200, "{entry}");
    assert_eq!(entry["size"], binary.len() as u64);
    assert_eq!(
        (entry["type"].as_str(), entry["mode"].as_u64()),
        (Some("file"), Some(0o644))
    );
    assert_eq!(get(&d, &id, "/workspace/bin/data"), (200, binary.clone()));
    assert_eq!(put(&d, &id, "/workspace/empty", Vec::new()).0, 200);
    assert_eq!(
        get(&d, &id, "empty"),
        (200, Vec::new()),
        "relative to the working directory"
    );
    // The sandbox sees exactly those bytes.
    let r = d.sh(&id, "head -c 256 /workspace/bin/data | od -An -v -tx1 | tr -d ' \\n'; wc -c < /workspace/bin/data");
    let hex: String = (0..=255u8).map(|b| format!("{b:02x}")).collect();
    assert_eq!(r["stdout"], format!("{hex}{}\n", binary.len()));

    // Mode on upload, kept on replace; owner and mtime as the sandbox sees them.
    let (status, entry) = send(
        d.http
            .put(url(
                &d,
                &id,
                "files",
                &[("path", "/workspace/run.sh"), ("mode", "0750")],
            ))
            .bearer_auth(&d.admin)
            .body("#!/bin/sh\necho ran\n"),
    );
    assert_eq!(status, 200);
    assert_eq!(json_of(&entry)["permissions"], "-rwxr-x---");
    assert_eq!(d.sh(&id, "/workspace/run.sh")["stdout"], "ran\n");
    put(
        &d,
        &id,
        "/workspace/run.sh",
        b"#!/bin/sh\necho again\n".to_vec(),
    );
    let (status, st) = call(&d, "GET", &id, "fs/stat", &[("path", "/workspace/run.sh")]);
    assert_eq!(status, 200, "{st}");
    assert_eq!(st["mode"], 0o750);
    let seen = d.sh(&id, "stat -c '%a %u %g %Y' /workspace/run.sh")["stdout"]
        .as_str()
        .unwrap()
        .trim()
        .to_string();
    let mtime_secs = seen.split(' ').nth(3).unwrap().parse::<u64>().unwrap();
    assert_eq!(
        seen.split(' ').take(3).collect::<Vec<_>>(),
        ["750", "0", "0"]
    );
    assert_eq!(
        st["mtime"].as_str().unwrap()[..19],
        rfc3339(mtime_secs)[..19]
    );
    let (status, err) = send(
        d.http
            .put(url(
                &d,
                &id,
                "files",
                &[("path", "/workspace/x"), ("mode", "999")],
            ))
            .bearer_auth(&d.admin)
            .body("x"),
    );
    assert_eq!((status, code(&json_of(&err))), (400, "invalid_request"));

    // mkdir, list, move, remove.
    let (status, made) = post(
        &d,
        &id,
        "fs/mkdir",
        json!({"path": "/workspace/a/b/c", "parents": true, "mode": "0700"}),
    );
    assert_eq!(
        (status, made["permissions"].as_str()),
        (201, Some("drwx------"))
    );
    let (status, err) = post(&d, &id, "fs/mkdir", json!({"path": "/workspace/a/b/c"}));
    assert_eq!((status, code(&err)), (409, "conflict"));
    let (status, err) = post(&d, &id, "fs/mkdir", json!({"path": "/workspace/none/x"}));
    assert_eq!((status, code(&err)), (404, "not_found"));
    let (status, err) = post(
        &d,
        &id,
        "fs/mkdir",
        json!({"path": "/workspace/m", "mode": 755}),
    );
    assert_eq!((status, code(&err)), (400, "invalid_request"), "{err}");
    d.sh(
        &id,
        "ln -s bin/data /workspace/a/link; echo hi > /workspace/a/b/f",
    );
    let (status, list) = call(
        &d,
        "GET",
        &id,
        "fs/list",
        &[("path", "/workspace/a"), ("depth", "3")],
    );
    assert_eq!(status, 200, "{list}");
    let mut paths: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["path"].as_str().unwrap())
        .collect();
    paths.sort();
    assert_eq!(
        paths,
        [
            "/workspace/a/b",
            "/workspace/a/b/c",
            "/workspace/a/b/f",
            "/workspace/a/link"
        ]
    );
    let link = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "link")
        .unwrap();
    assert_eq!(
        (link["type"].as_str(), link["link_target"].as_str()),
        (Some("symlink"), Some("bin/data"))
    );
    let (_, list) = call(
        &d,
        "GET",
        &id,
        "fs/list",
        &[("path", "/workspace/a"), ("depth", "3"), ("limit", "2")],
    );
    assert_eq!(
        (
            list["entries"].as_array().unwrap().len(),
            list["truncated"].as_bool()
        ),
        (2, Some(true))
    );
    let (status, err) = call(&d, "GET", &id, "fs/list", &[("path", "/workspace/a/b/f")]);
    assert_eq!((status, code(&err)), (409, "conflict"));

    let (status, moved) = post(
        &d,
        &id,
        "fs/move",
        json!({"from": "/workspace/a/b/f", "to": "/workspace/a/g"}),
    );
    assert_eq!(
        (status, moved["path"].as_str()),
        (200, Some("/workspace/a/g"))
    );
    put(&d, &id, "/workspace/a/h", b"h".to_vec());
    let (status, err) = post(
        &d,
        &id,
        "fs/move",
        json!({"from": "/workspace/a/h", "to": "/workspace/a/g"}),
    );
    assert_eq!((status, code(&err)), (409, "conflict"));
    let (status, _) = post(
        &d,
        &id,
        "fs/move",
        json!({"from": "/workspace/a/h", "to": "/workspace/a/g", "overwrite": true}),
    );
    assert_eq!(status, 200);
    assert_eq!(get(&d, &id, "/workspace/a/g").1, b"h");
    let (status, err) = post(
        &d,
        &id,
        "fs/move",
        json!({"from": "/workspace/nope", "to": "/workspace/x"}),
    );
    assert_eq!((status, code(&err)), (404, "not_found"));

    let (status, err) = call(&d, "DELETE", &id, "fs", &[("path", "/workspace/a")]);
    assert_eq!((status, code(&err)), (409, "conflict"));
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not empty")
    );
    let (status, _) = call(
        &d,
        "DELETE",
        &id,
        "fs",
        &[("path", "/workspace/a"), ("recursive", "true")],
    );
    assert_eq!(status, 204);
    let (status, _) = call(&d, "DELETE", &id, "fs", &[("path", "/workspace/a")]);
    assert_eq!(status, 404);
    assert_eq!(d.sh(&id, "test -e /workspace/a; echo $?")["stdout"], "1\n");

    // A directory where a file is expected, and the reverse.
    let (status, body) = get(&d, &id, "/workspace/bin");
    assert_eq!((status, code(&json_of(&body))), (409, "conflict"));
    let (status, err) = put(&d, &id, "/workspace/bin", b"x".to_vec());
    assert_eq!((status, code(&err)), (409, "conflict"));
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is a directory")
    );
    let (status, err) = put(&d, &id, "/workspace/empty/below", b"x".to_vec());
    assert_eq!((status, code(&err)), (409, "conflict"));
    // NUL, over-long paths and names, a missing path, the root itself.
    let (status, body) = get(&d, &id, "/workspace/a\0b");
    assert_eq!((status, code(&json_of(&body))), (400, "invalid_request"));
    assert!(String::from_utf8_lossy(&body).contains("NUL"));
    // A path that is not UTF-8 is refused, not rewritten to another name.
    let (status, body) = send(
        d.request(
            reqwest::Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/workspace/%ff"),
            Some(&d.admin),
        )
        .body("x"),
    );
    assert_eq!((status, code(&json_of(&body))), (400, "invalid_request"));
    assert!(
        d.sh(&id, "ls /workspace")["stdout"]
            .as_str()
            .unwrap()
            .lines()
            .all(|name| name != "\u{fffd}"),
        "a file named U+FFFD was written"
    );
    let long = format!("/workspace/{}", "d/".repeat(2100));
    let (status, body) = get(&d, &id, &long);
    assert_eq!((status, code(&json_of(&body))), (400, "invalid_request"));
    let (status, err) = put(
        &d,
        &id,
        &format!("/workspace/{}", "n".repeat(300)),
        b"x".to_vec(),
    );
    assert_eq!((status, code(&err)), (400, "invalid_request"), "{err}");
    let (status, err) = call(&d, "GET", &id, "fs/stat", &[]);
    assert_eq!((status, code(&err)), (400, "invalid_request"));
    let (status, _) = call(
        &d,
        "DELETE",
        &id,
        "fs",
        &[("path", "/"), ("recursive", "true")],
    );
    assert_eq!(status, 400);
    let (status, body) = get(&d, &id, "/workspace/missing");
    assert_eq!((status, code(&json_of(&body))), (404, "not_found"));
    let (status, body) = get(&d, &id, "/dev/zero");
    assert_eq!(status, 400, "{}", String::from_utf8_lossy(&body));

    // Scope, owner isolation, and a sandbox that does not exist.
    let reader = d.key("default", &["sandboxes:read"]);
    let (status, _) = send(
        d.http
            .get(url(&d, &id, "files", &[("path", "/workspace/empty")]))
            .bearer_auth(&reader),
    );
    assert_eq!(status, 403);
    let other = d.key("someone-else", &["exec"]);
    let (status, _) = send(
        d.http
            .get(url(&d, &id, "files", &[("path", "/workspace/empty")]))
            .bearer_auth(&other),
    );
    assert_eq!(status, 404);
    assert_eq!(get(&d, "sbx-00000000", "/x").0, 404);

    // A full disk is a 507 that leaves the old file whole and no temporary file.
    let small = d.create(json!({"disk": "16M"}));
    assert_eq!(put(&d, &small, "/workspace/keep", b"old".to_vec()).0, 200);
    let (status, err) = put(&d, &small, "/workspace/keep", vec![1u8; 24 << 20]);
    assert_eq!((status, code(&err)), (507, "insufficient_storage"), "{err}");
    assert_eq!(get(&d, &small, "/workspace/keep"), (200, b"old".to_vec()));
    // The daemon reads the rest of a failed upload before answering, so a
    // client that sends its whole body first still gets the error, whether
    // it comes at once (a directory) or half-way (a full disk).
    for (path, expected) in [
        ("/workspace", "HTTP/1.1 409 Conflict"),
        ("/workspace/keep", "HTTP/1.1 507 Insufficient Storage"),
    ] {
        let (status, sent) = raw_put(&d, &small, path, 24 << 20);
        assert_eq!(status, expected, "{path}");
        assert!(sent, "{path}: the daemon stopped reading the body early");
    }
    assert_eq!(d.sh(&small, "ls -A /workspace")["stdout"], "keep\n");

    // What an upload creates belongs to the sandbox's default user.
    let user_box = d.create(json!({"user": "nobody"}));
    let (_, entry) = put(&d, &user_box, "/tmp/up/mine", b"x".to_vec());
    assert_eq!(
        (entry["uid"].as_u64(), entry["gid"].as_u64()),
        (Some(65534), Some(65534))
    );
    assert_eq!(
        d.sh(&user_box, "echo more >> /tmp/up/mine && cat /tmp/up/mine")["stdout"],
        "xmore\n"
    );
}

/// `YYYY-MM-DDTHH:MM:SS` of Unix seconds, via the daemon's own formatter's rules.
fn rfc3339(secs: u64) -> String {
    let out = std::process::Command::new("date")
        .args(["-u", "-d", &format!("@{secs}"), "+%Y-%m-%dT%H:%M:%S"])
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// One MiB of a fixed pseudo-random pattern; block `n` of a stream has `n`
/// in its first 8 bytes so that reordered or repeated blocks are caught.
fn block(n: u64, pattern: &[u8]) -> Vec<u8> {
    let mut b = pattern.to_vec();
    b[..8].copy_from_slice(&n.to_le_bytes());
    b
}

struct Pattern {
    pattern: Vec<u8>,
    next: u64,
    blocks: u64,
    current: Vec<u8>,
    pos: usize,
}

impl Read for Pattern {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.pos == self.current.len() {
            if self.next == self.blocks {
                return Ok(0);
            }
            self.current = block(self.next, &self.pattern);
            self.next += 1;
            self.pos = 0;
        }
        let n = out.len().min(self.current.len() - self.pos);
        out[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn hwm_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn one_gibibyte_moves_without_the_daemon_holding_it() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({"disk": "3G"}));
    let pid = d.child.as_ref().unwrap().id();
    const BLOCKS: u64 = 1024;
    let pattern: Vec<u8> = (0..1u32 << 20)
        .map(|i| (i.wrapping_mul(2_246_822_519) >> 11) as u8)
        .collect();
    let body = Pattern {
        pattern: pattern.clone(),
        next: 0,
        blocks: BLOCKS,
        current: Vec::new(),
        pos: 0,
    };
    let (status, entry) = send(
        d.http
            .put(url(&d, &id, "files", &[("path", "/workspace/big.bin")]))
            .bearer_auth(&d.admin)
            .timeout(Duration::from_secs(600))
            .body(reqwest::blocking::Body::sized(body, BLOCKS << 20)),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&entry));
    assert_eq!(json_of(&entry)["size"], BLOCKS << 20);
    let after_upload = hwm_kib(pid);

    let mut resp = d
        .http
        .get(url(&d, &id, "files", &[("path", "/workspace/big.bin")]))
        .bearer_auth(&d.admin)
        .timeout(Duration::from_secs(600))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.content_length(), Some(BLOCKS << 20));
    let mut buf = vec![0u8; 1 << 20];
    for n in 0..BLOCKS {
        resp.read_exact(&mut buf).unwrap();
        assert!(buf == block(n, &pattern), "block {n} differs");
    }
    assert_eq!(resp.read(&mut buf).unwrap(), 0);
    let after_download = hwm_kib(pid);
    eprintln!(
        "daemon peak RSS: {after_upload} KiB after the upload, {after_download} KiB after the download"
    );
    assert!(
        after_download < 256 * 1024,
        "the daemon's peak RSS reached {after_download} KiB"
    );
    // The sandbox has the same bytes.
    let r = d.sh(&id, "wc -c < /workspace/big.bin");
    assert_eq!(r["stdout"], format!("{}\n", BLOCKS << 20));
}

/// Find anything named `needle` under `dir`.
fn find_named(dir: &Path, needle: &str) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().contains(needle) {
                found.push(e.path());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                found.extend(find_named(&e.path(), needle));
            }
        }
    }
    found
}

/// A raw tar header, so that names the tar crate refuses to write can be tested.
fn raw_entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, data: &[u8]) {
    let mut h = [0u8; 512];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..107].copy_from_slice(b"0000644");
    h[108..115].copy_from_slice(b"0000000");
    h[116..123].copy_from_slice(b"0000000");
    h[124..135].copy_from_slice(format!("{:011o}", data.len()).as_bytes());
    h[136..147].copy_from_slice(b"14000000000");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    h[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(512) * 512, 0);
}

fn tar_put(d: &Daemon, id: &str, dir: &str, archive: Vec<u8>) -> (u16, Value) {
    let (status, bytes) = send(
        d.http
            .put(url(d, id, "fs/tar", &[("path", dir)]))
            .bearer_auth(&d.admin)
            .body(archive),
    );
    (status, json_of(&bytes))
}

#[test]
fn nothing_reaches_outside_the_sandbox() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    // A host file the sandbox must never see, at a path that does not exist inside.
    let host = tempfile::tempdir().unwrap();
    std::fs::write(host.path().join("secret"), "host secret").unwrap();
    let secret = host.path().join("secret").to_string_lossy().into_owned();

    // `..` stops at the sandbox's root: this is the sandbox's own hostname file.
    let (status, body) = get(&d, &id, "/../../../../../etc/hostname");
    assert_eq!(
        (status, String::from_utf8_lossy(&body).trim()),
        (200, id.as_str())
    );
    assert_eq!(get(&d, &id, &format!("/../../../..{secret}")).0, 404);
    // Symlinks made in the sandbox, absolute or climbing, resolve inside it.
    d.sh(&id, &format!("ln -s {secret} /workspace/abs; ln -s ../../../../../../.. /workspace/up; ln -s {} /workspace/absdir", host.path().display()));
    assert_eq!(get(&d, &id, "/workspace/abs").0, 404);
    assert_eq!(get(&d, &id, &format!("/workspace/up{secret}")).0, 404);
    let (status, _) = put(&d, &id, "/workspace/absdir/planted", b"x".to_vec());
    assert_ne!(status, 200);
    assert_eq!(
        std::fs::read_dir(host.path()).unwrap().count(),
        1,
        "nothing was planted on the host"
    );

    // The agent's own descriptors (host cgroup directories, its log) are
    // /proc magic links: refused, whatever the operation.
    let mut attempts = 0;
    for n in 0..16 {
        for base in [format!("/proc/self/fd/{n}"), format!("/proc/1/fd/{n}")] {
            let (status, body) = get(&d, &id, &base);
            assert!(
                status == 400 || status == 404,
                "GET {base}: {status} {}",
                String::from_utf8_lossy(&body)
            );
            let (status, _) = put(&d, &id, &base, b"pwned".to_vec());
            assert!(
                status == 400 || status == 403 || status == 404,
                "PUT {base}: {status}"
            );
            // 403: /proc/self/fd is the agent's own, refused before the link.
            let (status, _) = put(&d, &id, &format!("{base}/pwned-file"), b"pwned".to_vec());
            assert!(
                status == 400 || status == 403 || status == 404,
                "PUT {base}/pwned-file: {status}"
            );
            let (status, _) = post(
                &d,
                &id,
                "fs/mkdir",
                json!({"path": format!("{base}/pwned-dir"), "parents": true}),
            );
            assert!(
                status == 400 || status == 403 || status == 404,
                "mkdir {base}/pwned-dir: {status}"
            );
            let mut archive = Vec::new();
            raw_entry(&mut archive, "pwned-tar", b'0', "", b"x");
            archive.extend_from_slice(&[0u8; 1024]);
            let (status, _) = tar_put(&d, &id, &base, archive);
            assert!(
                status == 400 || status == 403 || status == 404,
                "tar into {base}: {status}"
            );
            attempts += 5;
        }
    }
    let (status, err) = get(&d, &id, "/proc/1/root/etc/hostname");
    assert_eq!((status, code(&json_of(&err))), (400, "invalid_request"));
    let (status, _) = call(&d, "GET", &id, "fs/tar", &[("path", "/proc/1/cwd")]);
    assert!(status == 400 || status == 403, "{status}");

    // A symlink race: the sandbox swaps a directory and a symlink to the
    // agent's descriptors as fast as it can while files are written into it.
    let swapper = std::thread::spawn({
        let (url_base, admin, id) = (d.url.clone(), d.admin.clone(), id.clone());
        move || {
            let script = "end=$(($(date +%s)+6)); i=0; \
                while [ $(date +%s) -lt $end ]; do \
                  i=$((i+1)); rm -rf /workspace/race; ln -s /proc/1/fd/$((i % 12 + 3)) /workspace/race; \
                  rm -f /workspace/race; mkdir /workspace/race; \
                done; echo $i";
            let http = reqwest::blocking::Client::new();
            http.post(format!("{url_base}/v1/sandboxes/{id}/exec"))
                .bearer_auth(&admin)
                .json(&json!({"cmd": script, "timeout": "30s"}))
                .send()
                .unwrap()
                .json::<Value>()
                .unwrap()
        }
    });
    let racer = std::thread::spawn({
        let (url_base, admin, id) = (d.url.clone(), d.admin.clone(), id.clone());
        move || {
            let http = reqwest::blocking::Client::new();
            let end = Instant::now() + Duration::from_secs(6);
            let mut results = std::collections::BTreeMap::<u16, u32>::new();
            while Instant::now() < end {
                let mut u =
                    reqwest::Url::parse(&format!("{url_base}/v1/sandboxes/{id}/files")).unwrap();
                u.query_pairs_mut()
                    .append_pair("path", "/workspace/race/pwned-race");
                let status = http
                    .put(u)
                    .bearer_auth(&admin)
                    .body("x")
                    .send()
                    .unwrap()
                    .status()
                    .as_u16();
                *results.entry(status).or_default() += 1;
            }
            results
        }
    });
    let (url_base, admin) = (d.url.clone(), d.admin.clone());
    let end = Instant::now() + Duration::from_secs(6);
    let http = reqwest::blocking::Client::new();
    while Instant::now() < end {
        let body = json!({"path": "/workspace/race/pwned-race-dir", "parents": true});
        let _ = http
            .post(format!("{url_base}/v1/sandboxes/{id}/fs/mkdir"))
            .bearer_auth(&admin)
            .json(&body)
            .send();
    }
    let results = racer.join().unwrap();
    let swaps = swapper.join().unwrap();
    eprintln!(
        "race: PUT statuses {results:?} against {} swaps, after {attempts} direct attempts",
        swaps["stdout"].as_str().unwrap_or("?").trim()
    );
    assert!(!results.contains_key(&500), "{results:?}");
    // Nothing named pwned anywhere in this daemon's cgroups or state on the host.
    for dir in d.cgroups() {
        assert_eq!(find_named(&dir, "pwned"), Vec::<std::path::PathBuf>::new());
    }
    assert_eq!(
        find_named(&d.runtime_dir(), "pwned"),
        Vec::<std::path::PathBuf>::new()
    );
    assert!(!Path::new("/pwned-race").exists() && !Path::new("/pwned-race-dir").exists());

    // Archive entries: `..`, absolute names, writing through a symlink (one
    // the archive makes, or one already there), hard links out. Each is
    // refused with the entry named, and the good entry before it is gone.
    d.sh(
        &id,
        &format!(
            "mkdir -p /workspace/dest; ln -s {} /workspace/dest/pre",
            host.path().display()
        ),
    );
    type Entries = Vec<(&'static str, u8, &'static str)>;
    let cases: Vec<(&str, Entries)> = vec![
        ("../escape", vec![("../escape", b'0', "")]),
        ("/etc/evil", vec![("/etc/evil", b'0', "")]),
        (
            "out/evil",
            vec![("out", b'2', "/etc"), ("out/evil", b'0', "")],
        ),
        ("pre/evil", vec![("pre/evil", b'0', "")]),
        ("hl", vec![("hl", b'1', "../../etc/passwd")]),
        ("hl2", vec![("hl2", b'1', "/etc/passwd")]),
    ];
    for (entry, items) in cases {
        let mut archive = Vec::new();
        raw_entry(&mut archive, "good/first", b'0', "", b"fine");
        for (name, kind, link) in items {
            raw_entry(
                &mut archive,
                name,
                kind,
                link,
                if kind == b'0' { b"evil" } else { b"" },
            );
        }
        archive.extend_from_slice(&[0u8; 1024]);
        let (status, err) = tar_put(&d, &id, "/workspace/dest", archive);
        assert_eq!(status, 400, "{entry}: {err}");
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains(entry), "{entry}: {message}");
        let left = d.sh(&id, "ls -A /workspace/dest")["stdout"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(left, "pre\n", "{entry}");
    }
    assert_eq!(d.sh(&id, "test -e /etc/evil; echo $?")["stdout"], "1\n");
    assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 1);
    // A truncated archive is an error that leaves nothing either.
    let mut archive = Vec::new();
    raw_entry(&mut archive, "t/file", b'0', "", &[7u8; 10_000]);
    archive.truncate(4000);
    let (status, _) = tar_put(&d, &id, "/workspace/trunc", archive);
    assert_eq!(status, 400);
    assert_eq!(
        d.sh(&id, "test -e /workspace/trunc; echo $?")["stdout"],
        "1\n"
    );
    // Garbage is not an archive.
    let (status, err) = tar_put(&d, &id, "/workspace/garbage", vec![0x42; 2048]);
    assert_eq!((status, code(&err)), (400, "invalid_request"), "{err}");
}

#[test]
fn the_agents_own_proc_files_are_not_served() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    // The agent is PID 1 of the sandbox: /proc/self, /proc/1 and links
    // into them would be its environment, not a file of the sandbox.
    d.sh(
        &id,
        "ln -s /proc/1/environ /workspace/env; ln -s /proc/self /workspace/me",
    );
    for path in [
        "/proc/self/environ",
        "/proc/1/environ",
        "/proc/thread-self/environ",
        "/workspace/env",
        "/workspace/me/environ",
    ] {
        let (status, body) = get(&d, &id, path);
        let err = json_of(&body);
        assert_eq!(
            (status, code(&err)),
            (403, "forbidden"),
            "GET {path}: {err}"
        );
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("exec"), "{path}: {message}");
    }
    for (method, route, path) in [
        ("GET", "fs/stat", "/proc/1"),
        ("GET", "fs/list", "/proc/self"),
        ("GET", "fs/tar", "/proc/1/environ"),
        ("DELETE", "fs", "/proc/1/environ"),
    ] {
        let (status, err) = call(&d, method, &id, route, &[("path", path)]);
        assert_eq!(
            (status, code(&err)),
            (403, "forbidden"),
            "{route} {path}: {err}"
        );
    }
    let (status, err) = put(&d, &id, "/proc/1/environ", b"x".to_vec());
    assert_eq!((status, code(&err)), (403, "forbidden"), "{err}");
    // The rest of /proc is the sandbox's view of the machine, served.
    let (status, body) = get(&d, &id, "/proc/meminfo");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("MemTotal"));
    let (status, list) = call(
        &d,
        "GET",
        &id,
        "fs/list",
        &[("path", "/proc"), ("depth", "2")],
    );
    assert_eq!(status, 200, "{list}");
    let paths: Vec<&str> = list["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["path"].as_str())
        .collect();
    assert!(paths.contains(&"/proc/1"), "{paths:?}");
    assert!(!paths.contains(&"/proc/1/environ"), "{paths:?}");
}

#[test]
fn a_refused_recursive_remove_removes_nothing() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    // /dev holds mount points (/dev/shm, /dev/pts): the whole removal is
    // refused before anything in it goes.
    let before = d.sh(&id, "ls -A /dev")["stdout"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        before.contains("ptmx") && before.contains("shm"),
        "{before}"
    );
    let (status, err) = call(
        &d,
        "DELETE",
        &id,
        "fs",
        &[("path", "/dev"), ("recursive", "true")],
    );
    assert_eq!((status, code(&err)), (403, "forbidden"), "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("mount point"),
        "{err}"
    );
    assert_eq!(d.sh(&id, "ls -A /dev")["stdout"], before);
    // A mount point itself is not emptied either.
    d.sh(&id, "echo kept > /dev/shm/kept");
    let (status, err) = call(
        &d,
        "DELETE",
        &id,
        "fs",
        &[("path", "/dev/shm"), ("recursive", "true")],
    );
    assert_eq!((status, code(&err)), (403, "forbidden"), "{err}");
    assert_eq!(d.sh(&id, "cat /dev/shm/kept")["stdout"], "kept\n");
    // What terminals need is still there.
    assert_eq!(
        d.sh(&id, "test -c /dev/ptmx && test -e /dev/fd/0 && echo ok")["stdout"],
        "ok\n"
    );
}

#[test]
fn moves_that_would_copy_are_refused_as_client_errors() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    assert_eq!(put(&d, &id, "/workspace/f", b"data".to_vec()).0, 200);
    // Another file system: the client has to copy.
    for (from, to) in [
        ("/workspace/f", "/dev/shm/f"),
        ("/usr/bin/ls", "/workspace/ls"),
    ] {
        let (status, err) = post(&d, &id, "fs/move", json!({"from": from, "to": to}));
        assert_eq!(
            (status, code(&err)),
            (400, "invalid_request"),
            "{from}: {err}"
        );
        let message = err["error"]["message"].as_str().unwrap();
        assert!(message.contains("different file systems"), "{message}");
        assert!(message.contains("copy"), "{message}");
    }
    assert_eq!(get(&d, &id, "/workspace/f"), (200, b"data".to_vec()));
    // A directory of the image (an overlay lower layer: /workspace) cannot
    // be renamed in place; that is not a matter of file systems.
    let (status, err) = post(
        &d,
        &id,
        "fs/move",
        json!({"from": "/workspace", "to": "/workspace2"}),
    );
    assert_eq!((status, code(&err)), (400, "invalid_request"), "{err}");
    let message = err["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("copy") && !message.contains("different file systems"),
        "{message}"
    );
    assert_eq!(get(&d, &id, "/workspace/f"), (200, b"data".to_vec()));
}

#[test]
fn uploads_do_not_replace_devices_fifos_or_sockets() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    d.sh(
        &id,
        "mkfifo /workspace/fifo; ln -s nowhere /workspace/link; \
         python3 -c 'import socket; socket.socket(socket.AF_UNIX).bind(\"/workspace/sock\")' 2>/dev/null || true",
    );
    for path in ["/dev/null", "/dev/zero", "/workspace/fifo"] {
        let (status, err) = put(&d, &id, path, b"replaced".to_vec());
        assert_eq!(
            (status, code(&err)),
            (400, "invalid_request"),
            "{path}: {err}"
        );
        assert!(
            err["error"]["message"]
                .as_str()
                .unwrap()
                .contains("regular file"),
            "{err}"
        );
    }
    assert_eq!(
        d.sh(
            &id,
            "test -c /dev/null && test -c /dev/zero && test -p /workspace/fifo && echo ok"
        )["stdout"],
        "ok\n"
    );
    if d.sh(&id, "test -S /workspace/sock && echo y")["stdout"] == "y\n" {
        let (status, _) = put(&d, &id, "/workspace/sock", b"x".to_vec());
        assert_eq!(status, 400);
    }
    // Files and symlinks are still replaced, as documented.
    assert_eq!(
        put(&d, &id, "/workspace/link", b"now a file".to_vec()).0,
        200
    );
    assert_eq!(put(&d, &id, "/workspace/link", b"again".to_vec()).0, 200);
    assert_eq!(
        d.sh(&id, "test -L /workspace/link || cat /workspace/link")["stdout"],
        "again"
    );
}

#[test]
fn a_refused_archive_leaves_nothing_behind() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let end = [0u8; 1024];
    // `fd` is a file, then `fd/x` needs it to be a directory.
    let mut clash = Vec::new();
    for (name, data) in [
        ("aaa", "a"),
        ("bbb", "b"),
        ("fd", "f"),
        ("fd/x", "x"),
        ("zzz", "z"),
    ] {
        raw_entry(&mut clash, name, b'0', "", data.as_bytes());
    }
    clash.extend_from_slice(&end);
    let (status, err) = tar_put(&d, &id, "/workspace/t2/sub", clash.clone());
    assert_eq!((status, code(&err)), (409, "conflict"), "{err}");
    assert_eq!(d.sh(&id, "test -e /workspace/t2; echo $?")["stdout"], "1\n");
    // Into an existing directory: its contents stay as they were.
    d.sh(&id, "mkdir /workspace/t3; echo old > /workspace/t3/aaa");
    let (status, _) = tar_put(&d, &id, "/workspace/t3", clash);
    assert_eq!(status, 409);
    assert_eq!(
        d.sh(&id, "ls -A /workspace/t3; cat /workspace/t3/aaa")["stdout"],
        "aaa\nold\n"
    );
    // An existing directory where the archive has a file, after entries
    // that replace and add files: none of them lands.
    d.sh(&id, "mkdir -p /workspace/t3/zzz");
    let mut late = Vec::new();
    raw_entry(&mut late, "aaa", b'0', "", b"new");
    raw_entry(&mut late, "new", b'0', "", b"new");
    raw_entry(&mut late, "zzz", b'0', "", b"file");
    late.extend_from_slice(&end);
    let (status, err) = tar_put(&d, &id, "/workspace/t3", late);
    assert_eq!((status, code(&err)), (409, "conflict"), "{err}");
    assert_eq!(
        d.sh(&id, "ls -A /workspace/t3; cat /workspace/t3/aaa")["stdout"],
        "aaa\nzzz\nold\n"
    );
    // Broken or hostile archives into a new directory: no directory left.
    let mut dots = Vec::new();
    raw_entry(&mut dots, "good", b'0', "", b"fine");
    raw_entry(&mut dots, "../escape", b'0', "", b"evil");
    dots.extend_from_slice(&end);
    let mut absolute = Vec::new();
    raw_entry(&mut absolute, "good", b'0', "", b"fine");
    raw_entry(&mut absolute, "/etc/evil", b'0', "", b"evil");
    absolute.extend_from_slice(&end);
    let mut truncated = Vec::new();
    raw_entry(&mut truncated, "d/file", b'0', "", &[7u8; 10_000]);
    truncated.truncate(4000);
    let gzip_garbage = [&[0x1f, 0x8b, 0x08, 0x00][..], &[0x55; 2000][..]].concat();
    for (what, archive) in [
        ("..", dots),
        ("absolute", absolute),
        ("truncated", truncated),
        ("random bytes", vec![0x42; 2048]),
        ("gzip garbage", gzip_garbage),
    ] {
        let (status, err) = tar_put(&d, &id, "/workspace/new/deeper", archive);
        assert_eq!(
            (status, code(&err)),
            (400, "invalid_request"),
            "{what}: {err}"
        );
        assert_eq!(
            d.sh(&id, "test -e /workspace/new; echo $?")["stdout"],
            "1\n",
            "{what}"
        );
    }
    // A full disk too.
    let small = d.create(json!({"disk": "16M"}));
    let mut big = Vec::new();
    raw_entry(&mut big, "small", b'0', "", b"x");
    raw_entry(&mut big, "big", b'0', "", &vec![1u8; 24 << 20]);
    big.extend_from_slice(&end);
    let (status, err) = tar_put(&d, &small, "/workspace/full", big);
    assert_eq!((status, code(&err)), (507, "insufficient_storage"), "{err}");
    assert_eq!(
        d.sh(&small, "test -e /workspace/full; echo $?")["stdout"],
        "1\n"
    );
}

/// Agent threads doing file operations in this daemon's sandboxes.
fn file_threads(d: &Daemon) -> usize {
    d.agents()
        .iter()
        .map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/task"))
                .map(|tasks| {
                    tasks
                        .flatten()
                        .filter(|t| {
                            std::fs::read_to_string(t.path().join("comm"))
                                .is_ok_and(|c| c.starts_with("cove-fs"))
                        })
                        .count()
                })
                .unwrap_or(0)
        })
        .sum()
}

#[test]
fn watch_streams_changes_until_the_client_leaves() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    d.sh(&id, "mkdir -p /workspace/w/sub");
    let resp = d
        .http
        .get(url(
            &d,
            &id,
            "fs/watch",
            &[("path", "/workspace/w"), ("recursive", "true")],
        ))
        .bearer_auth(&d.admin)
        .timeout(Duration::from_secs(30))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let (tx, rx) = std::sync::mpsc::channel::<(String, Value)>();
    let reader = std::thread::spawn(move || {
        let mut name = String::new();
        for line in BufReader::new(resp).lines() {
            let Ok(line) = line else { return };
            if let Some(v) = line.strip_prefix("event: ") {
                name = v.to_string();
            } else if let Some(v) = line.strip_prefix("data: ")
                && tx
                    .send((name.clone(), serde_json::from_str(v).unwrap()))
                    .is_err()
            {
                return;
            }
        }
    });
    d.sh(&id, "echo one > /workspace/w/f; echo two >> /workspace/w/f; echo three > /workspace/w/sub/g; mv /workspace/w/f /workspace/w/h; rm /workspace/w/h; rm /workspace/w/sub/g");
    let mut events = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(event) => {
                let last = event.1["path"] == "/workspace/w/sub/g" && event.0 == "delete";
                events.push(event);
                if last {
                    break;
                }
            }
            Err(_) => continue,
        }
    }
    let has = |kind: &str, key: &str, path: &str| {
        events
            .iter()
            .any(|(name, data)| name == kind && data["type"] == kind && data[key] == path)
    };
    assert!(has("create", "path", "/workspace/w/f"), "{events:?}");
    assert!(has("modify", "path", "/workspace/w/f"), "{events:?}");
    assert!(has("create", "path", "/workspace/w/sub/g"), "{events:?}");
    assert!(has("move", "to", "/workspace/w/h"), "{events:?}");
    assert!(has("delete", "path", "/workspace/w/h"), "{events:?}");
    assert!(has("delete", "path", "/workspace/w/sub/g"), "{events:?}");
    assert!(file_threads(&d) >= 1, "the watch runs in the agent");
    // The client goes away: the agent's watch ends.
    drop(rx);
    d.sh(&id, "touch /workspace/w/again");
    let _ = reader.join();
    let deadline = Instant::now() + Duration::from_secs(20);
    while file_threads(&d) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(file_threads(&d), 0, "the watch outlived its client");
    // A path that is not there.
    let (status, err) = call(&d, "GET", &id, "fs/watch", &[("path", "/workspace/none")]);
    assert_eq!((status, code(&err)), (404, "not_found"));
}

fn cove(d: &Daemon, args: &[&str], cwd: &Path) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
        .env("COVE_URL", &d.url)
        .env("COVE_KEY", &d.admin)
        .current_dir(cwd)
        .args(args)
        .output()
        .unwrap()
}

fn ok(out: std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cove_cp_and_files_commands() {
    if !root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = Daemon::start();
    let id = d.create(json!({}));
    let local = tempfile::tempdir().unwrap();
    let src = local.path().join("project");
    std::fs::create_dir_all(src.join("src/deep")).unwrap();
    std::fs::write(src.join("README"), "read me\n").unwrap();
    let bin: Vec<u8> = (0..200_000u32).map(|i| (i % 256) as u8).collect();
    std::fs::write(src.join("src/deep/data.bin"), &bin).unwrap();
    std::fs::write(src.join("src/run.sh"), "#!/bin/sh\necho from-script\n").unwrap();
    std::fs::set_permissions(
        src.join("src/run.sh"),
        std::fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    std::os::unix::fs::symlink("../README", src.join("src/readme-link")).unwrap();

    // A directory tree in: it lands inside the existing directory.
    ok(cove(
        &d,
        &["cp", "project", &format!("{id}:/workspace/")],
        local.path(),
    ));
    assert_eq!(
        d.sh(&id, "/workspace/project/src/run.sh")["stdout"],
        "from-script\n"
    );
    assert_eq!(
        d.sh(&id, "readlink /workspace/project/src/readme-link")["stdout"],
        "../README\n"
    );
    assert_eq!(d.sh(&id, "cmp /workspace/project/src/deep/data.bin /workspace/project/src/deep/data.bin && wc -c < /workspace/project/src/deep/data.bin")["stdout"], "200000\n");
    // Symlinks go in as themselves, under their own names.
    std::os::unix::fs::symlink("project", local.path().join("linkdir")).unwrap();
    std::os::unix::fs::symlink("project/README", local.path().join("mylink")).unwrap();
    for link in ["linkdir", "mylink"] {
        let out = cove(
            &d,
            &["cp", link, &format!("{id}:/workspace/")],
            local.path(),
        );
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("/workspace/{link}")),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        ok(out);
    }
    assert_eq!(
        d.sh(&id, "readlink /workspace/linkdir /workspace/mylink")["stdout"],
        "project\nproject/README\n"
    );
    d.sh(&id, "rm /workspace/linkdir /workspace/mylink");
    // A file in, under a new name.
    ok(cove(
        &d,
        &[
            "cp",
            "project/README",
            &format!("{id}:/workspace/notes.txt"),
        ],
        local.path(),
    ));
    assert_eq!(d.sh(&id, "cat /workspace/notes.txt")["stdout"], "read me\n");
    // A directory's contents into a new directory.
    ok(cove(
        &d,
        &["cp", "project/src/.", &format!("{id}:/workspace/flat")],
        local.path(),
    ));
    assert_eq!(
        d.sh(&id, "ls /workspace/flat | sort | tr '\\n' ' '")["stdout"],
        "deep readme-link run.sh "
    );

    // Out again: a file into a directory, a file to a new name, a tree.
    d.sh(&id, "echo result > /workspace/out.txt");
    ok(cove(
        &d,
        &["cp", &format!("{id}:/workspace/out.txt"), "."],
        local.path(),
    ));
    assert_eq!(
        std::fs::read_to_string(local.path().join("out.txt")).unwrap(),
        "result\n"
    );
    ok(cove(
        &d,
        &["cp", &format!("{id}:/workspace/out.txt"), "renamed.txt"],
        local.path(),
    ));
    assert_eq!(
        std::fs::read_to_string(local.path().join("renamed.txt")).unwrap(),
        "result\n"
    );
    ok(cove(
        &d,
        &["cp", &format!("{id}:/workspace/project"), "back"],
        local.path(),
    ));
    let back = local.path().join("back");
    assert_eq!(std::fs::read(back.join("src/deep/data.bin")).unwrap(), bin);
    assert_eq!(
        std::fs::read_link(back.join("src/readme-link")).unwrap(),
        Path::new("../README")
    );
    assert_eq!(
        std::fs::metadata(back.join("src/run.sh"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o755
    );
    std::fs::create_dir(local.path().join("into")).unwrap();
    ok(cove(
        &d,
        &["cp", &format!("{id}:/workspace/project"), "into"],
        local.path(),
    ));
    assert!(
        local
            .path()
            .join("into/project/src/deep/data.bin")
            .is_file()
    );
    // Errors are cove's (125), with the daemon's message.
    let out = cove(
        &d,
        &["cp", &format!("{id}:/workspace/missing"), "."],
        local.path(),
    );
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such file"));
    let out = cove(&d, &["cp", "a", "b"], local.path());
    assert_eq!(out.status.code(), Some(125));

    // cove files ls | cat | rm
    let listing = ok(cove(
        &d,
        &["files", "ls", &id, "/workspace/project"],
        local.path(),
    ));
    assert!(
        listing.contains("-rw-r--r--") && listing.contains("/workspace/project/README"),
        "{listing}"
    );
    let listing = ok(cove(
        &d,
        &["files", "ls", &id, "/workspace/project", "-d", "3"],
        local.path(),
    ));
    assert!(
        listing.contains("/workspace/project/src/readme-link -> ../README"),
        "{listing}"
    );
    let json = ok(cove(
        &d,
        &["--json", "files", "ls", &id, "/workspace"],
        local.path(),
    ));
    assert!(serde_json::from_str::<Value>(&json).unwrap()["entries"].is_array());
    let cat = cove(
        &d,
        &["files", "cat", &id, "/workspace/project/src/deep/data.bin"],
        local.path(),
    );
    assert!(cat.status.success());
    assert_eq!(cat.stdout, bin);
    let out = cove(
        &d,
        &["files", "rm", &id, "/workspace/project"],
        local.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not empty"));
    ok(cove(
        &d,
        &[
            "files",
            "rm",
            "-r",
            &id,
            "/workspace/project",
            "/workspace/out.txt",
        ],
        local.path(),
    ));
    assert_eq!(
        d.sh(&id, "ls /workspace | sort | tr '\\n' ' '")["stdout"],
        "flat notes.txt "
    );
}
