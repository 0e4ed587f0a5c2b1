//! The daemon-level behaviours that matter, proven on both backends: each
//! suite below is one function taking the backend's name, run once for
//! `namespace` and once for `microvm`. A microVM boots in seconds under TCG,
//! so each suite boots one VM and checks many behaviours on it.
//!
//! The microVM runs need root, QEMU, vhost-device-vsock, e2fsprogs and
//! busybox-static (`scripts/vm-deps.sh` installs them). Without them a test
//! says why and skips, except under CI (`CI` set), where a missing piece
//! fails it: CI must prove the backend, not skip it.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, host_has_process_with, root};
use serde_json::{Value, json};

const NS: &str = "namespace";
const VM: &str = "microvm";

/// Why this host cannot run microVMs, if it cannot.
fn missing_vm_tools() -> Option<String> {
    let qemu = std::env::var("COVE_QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    if Command::new(&qemu).arg("--version").output().is_err() {
        return Some(format!(
            "{qemu} is missing (Debian package qemu-system-x86)"
        ));
    }
    let vhost = std::env::var_os("COVE_VHOST_VSOCK")
        .map(PathBuf::from)
        .or_else(|| {
            let home = std::env::var_os("HOME").map(PathBuf::from)?;
            let mut dirs: Vec<PathBuf> =
                std::env::split_paths(&std::env::var_os("PATH")?).collect();
            dirs.push(home.join(".cargo/bin"));
            dirs.into_iter()
                .map(|d| d.join("vhost-device-vsock"))
                .find(|p| p.is_file())
        });
    if vhost.is_none() {
        return Some("vhost-device-vsock is missing (cargo install vhost-device-vsock)".into());
    }
    if Command::new("mkfs.erofs").arg("--help").output().is_err() {
        return Some("mkfs.erofs is missing (Debian package erofs-utils)".into());
    }
    if !Path::new(cove_template::BUSYBOX_PATH).exists() {
        return Some("busybox is missing (Debian package busybox-static)".into());
    }
    None
}

/// The static agent: `COVE_VM_AGENT`, or built here as scripts/vm-deps.sh does.
fn static_agent() -> PathBuf {
    if let Some(path) = std::env::var_os("COVE_VM_AGENT").filter(|p| !p.is_empty()) {
        return PathBuf::from(path);
    }
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let target = workspace.join("target/vm-agent");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--release",
            "--target",
            "x86_64-unknown-linux-gnu",
            "-p",
            "cove-agent",
        ])
        .arg("--target-dir")
        .arg(&target)
        .env(
            "RUSTFLAGS",
            "-C target-feature=+crt-static -C strip=symbols",
        )
        .current_dir(&workspace)
        .status()
        .unwrap();
    assert!(status.success(), "building the static agent failed");
    target.join("x86_64-unknown-linux-gnu/release/cove-agent")
}

/// A daemon for `backend`, or `None` (after saying why) when this host
/// cannot run it outside CI.
fn daemon(backend: &str) -> Option<Daemon> {
    daemon_with(backend, &[])
}

/// [`daemon`], with `extra` flags for `cove serve`.
fn daemon_with(backend: &str, extra: &[String]) -> Option<Daemon> {
    if !root() {
        return None;
    }
    if backend == NS {
        return Some(Daemon::start_with(extra));
    }
    if let Some(why) = missing_vm_tools() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI must run the microVM tests: {why}; scripts/vm-deps.sh installs it"
        );
        eprintln!("skipped: {why}");
        return None;
    }
    // The kernel and guest image cache is shared by every test (and with
    // cove-vm's tests), so the kernel is fetched and unpacked once.
    let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("cove-vm-cache");
    let d = Daemon::start_full(
        extra,
        vec![
            ("COVE_VM_AGENT".into(), static_agent().display().to_string()),
            ("COVE_VM_CACHE".into(), cache.display().to_string()),
        ],
    );
    // The microVM backend's default template (the build also makes the
    // microVM images, from the same agent and cache).
    d.build_template("busybox");
    Some(d)
}

fn cli(d: &Daemon) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove"));
    cmd.env("COVE_URL", &d.url).env("COVE_KEY", &d.admin);
    cmd
}

/// Create a sandbox with the CLI (`cove create --backend B`).
fn create_with_cli(d: &Daemon, backend: &str, extra: &[&str]) -> String {
    let out = cli(d)
        .args(["create", "--backend", backend, "-e", "GREETING=hello"])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cove create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn path(id: &str, rest: &str) -> String {
    format!("/v1/sandboxes/{id}{rest}")
}

/// Nothing of the daemon's sandboxes is left: no state directory, no
/// process mentioning the runtime directory (agents, QEMU, vsock helpers),
/// no cgroup.
fn assert_nothing_left(d: &Daemon) {
    d.assert_nothing_left();
    let runtime = d.runtime_dir();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let vms: Vec<_> = std::fs::read_dir(runtime.join("vms"))
            .map(|r| r.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        // VM processes name their state directory; the daemon names only
        // the runtime directory.
        let processes = host_has_process_with(&runtime.join("vms").display().to_string());
        if vms.is_empty() && !processes {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "left behind: VM dirs {vms:?}, processes: {processes}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Read SSE events until `exit`.
fn read_events(resp: reqwest::blocking::Response) -> Vec<(String, Value)> {
    let mut reader = BufReader::new(resp);
    let mut events = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            if !name.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let done = name == "exit";
                events.push((std::mem::take(&mut name), value));
                if done {
                    break;
                }
            }
            data.clear();
        } else if let Some(v) = l.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    events
}

/// Exec in every form, stdin, timeouts, PTY, pause/resume and the TTL.
fn exec_suite(backend: &str) {
    let Some(d) = daemon(backend) else { return };
    let id = create_with_cli(&d, backend, &["--memory", "256M", "--cpus", "1"]);
    let (_, sandbox) = d.call("GET", &path(&id, ""), None);
    assert_eq!(
        (sandbox["state"].as_str(), sandbox["backend"].as_str()),
        (Some("running"), Some(backend))
    );

    // Sync exec: exit code, separate streams, the sandbox's env.
    let r = d.sh(&id, "echo $GREETING; echo err >&2; exit 3");
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(3), Some("hello\n"), Some("err\n"))
    );
    // argv, cwd, user, per-process env.
    let (_, r) = d.exec(
        &id,
        json!({"argv": ["sh", "-c", "pwd; id -u; echo $X"], "cwd": "/tmp", "user": "nobody", "env": {"X": "1"}}),
    );
    assert_eq!(r["stdout"], "/tmp\n65534\n1\n", "{r}");
    // stdin.
    let (_, r) = d.exec(&id, json!({"argv": ["cat"], "stdin": "piped in"}));
    assert_eq!(r["stdout"], "piped in");
    // A timeout kills the whole tree, even a grandchild in its own session.
    let (_, r) = d.exec(
        &id,
        json!({"cmd": "setsid sh -c 'sleep 300' & sleep 300", "timeout": "1s"}),
    );
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].as_i64()),
        (Some(true), Some(124)),
        "{r}"
    );
    let r = d.sh(&id, "sleep 0.3; ps -o comm | grep -c '^sleep' || true");
    assert_eq!(r["stdout"], "0\n", "no sleep survives the timeout");

    // Background: start, wait for the result.
    let (s, started) = d.exec(
        &id,
        json!({"cmd": "echo started; sleep 0.3; echo done >&2; exit 5", "background": true}),
    );
    assert_eq!(s, 202, "{started}");
    let pid = started["pid"].as_u64().unwrap();
    let (s, r) = d.call(
        "POST",
        &path(&id, &format!("/processes/{pid}/wait?timeout=60s")),
        None,
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(5), Some("started\n"), Some("done\n"))
    );
    // Background with stdin kept open, fed later.
    let (s, started) = d.exec(
        &id,
        json!({"argv": ["tr", "a-z", "A-Z"], "background": true, "stdin_open": true}),
    );
    assert_eq!(s, 202, "{started}");
    let pid = started["pid"].as_u64().unwrap();
    let (s, _) = d
        .request(
            reqwest::Method::POST,
            &path(&id, &format!("/processes/{pid}/stdin")),
            Some(&d.admin),
        )
        .body("later input")
        .send()
        .map(|r| (r.status().as_u16(), ()))
        .unwrap();
    assert_eq!(s, 200);
    let (s, _) = d.call(
        "POST",
        &path(&id, &format!("/processes/{pid}/stdin/close")),
        None,
    );
    assert!(s == 200 || s == 204, "{s}");
    let (_, r) = d.call(
        "POST",
        &path(&id, &format!("/processes/{pid}/wait?timeout=60s")),
        None,
    );
    assert_eq!(r["stdout"], "LATER INPUT", "{r}");

    // Streaming (SSE): output in order, then the exit.
    let resp = d
        .request(
            reqwest::Method::POST,
            &path(&id, "/exec/stream"),
            Some(&d.admin),
        )
        .json(&json!({"cmd": "for i in 1 2 3; do echo line$i; done; echo e >&2; exit 2"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let events = read_events(resp);
    let stdout: String = events
        .iter()
        .filter(|(n, _)| n == "stdout")
        .map(|(_, v)| v["data"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(stdout, "line1\nline2\nline3\n", "{events:?}");
    assert!(events.iter().any(|(n, _)| n == "stderr"), "{events:?}");
    let exit = events.iter().find(|(n, _)| n == "exit").unwrap();
    assert_eq!(exit.1["exit_code"], 2, "{events:?}");

    // A terminal of the asked size.
    let (_, r) = d.exec(
        &id,
        json!({"cmd": "tty; stty size", "pty": {"rows": 33, "cols": 101}}),
    );
    let out = r["stdout"].as_str().unwrap_or_default();
    assert!(out.contains("/dev/pts/") && out.contains("33 101"), "{r}");

    // Pause: exec is refused while paused, works again after resume, and
    // the sandbox kept its state.
    d.sh(&id, "echo kept > /tmp/state");
    let (s, r) = d.call("POST", &path(&id, "/pause"), None);
    assert_eq!((s, r["state"].as_str()), (200, Some("paused")), "{r}");
    let (s, r) = d.exec(&id, json!({"cmd": "true"}));
    assert_eq!(
        (s, r["error"]["code"].as_str()),
        (409, Some("sandbox_paused"))
    );
    std::thread::sleep(Duration::from_millis(500));
    let (s, r) = d.call("POST", &path(&id, "/resume"), None);
    assert_eq!((s, r["state"].as_str()), (200, Some("running")), "{r}");
    assert_eq!(d.sh(&id, "cat /tmp/state")["stdout"], "kept\n");

    // Files: upload, stat, download (every byte value, bigger than one
    // chunk), a listing and a tar archive out.
    let content: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let resp = d
        .request(
            reqwest::Method::PUT,
            &path(&id, "/files?path=/tmp/up/blob.bin"),
            Some(&d.admin),
        )
        .body(content.clone())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let entry: Value = resp.json().unwrap();
    assert_eq!(entry["size"], content.len() as u64, "{entry}");
    let (s, stat) = d.call("GET", &path(&id, "/fs/stat?path=/tmp/up/blob.bin"), None);
    assert_eq!((s, stat["type"].as_str()), (200, Some("file")), "{stat}");
    let resp = d
        .request(
            reqwest::Method::GET,
            &path(&id, "/files?path=/tmp/up/blob.bin"),
            Some(&d.admin),
        )
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.bytes().unwrap() == content,
        "download differs from upload"
    );
    assert_eq!(
        d.sh(&id, "wc -c < /tmp/up/blob.bin | tr -d ' '")["stdout"],
        format!("{}\n", content.len())
    );
    let (s, list) = d.call("GET", &path(&id, "/fs/list?path=/tmp/up"), None);
    assert_eq!(s, 200, "{list}");
    assert!(list.to_string().contains("blob.bin"), "{list}");
    let resp = d
        .request(
            reqwest::Method::GET,
            &path(&id, "/files?path=/etc/../../tmp/nope"),
            Some(&d.admin),
        )
        .send()
        .unwrap();
    assert_eq!(resp.status(), 404);

    // The console: a microVM's serial log; namespace sandboxes have none.
    let resp = d
        .request(reqwest::Method::GET, &path(&id, "/console"), Some(&d.admin))
        .send()
        .unwrap();
    if backend == VM {
        assert_eq!(resp.status(), 200);
    } else {
        assert_eq!(resp.status(), 404);
        let body: Value = resp.json().unwrap();
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("no console"),
            "{body}"
        );
    }

    // Snapshots make a template of the sandbox on both backends (a
    // microVM's agent sends its writable layer). On the microVM (busybox):
    // a new file, a deleted one and a directory deleted and made again
    // (opaque: nothing of the template's shows through) are what a sandbox
    // of the snapshot sees. (The namespace sandbox runs the host template,
    // whose /usr is read-only; templates.rs covers its whiteouts.)
    if backend == VM {
        let r = d.sh(
            &id,
            "echo kept > /workspace/kept && rm /usr/sbin/chroot && rm -rf /usr/bin && \
             mkdir /usr/bin && echo mine > /usr/bin/only",
        );
        assert_eq!(r["exit_code"], 0, "{r}");
    }
    let (s, body) = d.call(
        "POST",
        &path(&id, "/snapshot"),
        Some(json!({"name": "suite-snap"})),
    );
    assert_eq!(s, 201, "{body}");
    if backend == VM {
        let copy = d.create(json!({"template": "suite-snap", "backend": NS}));
        let r = d.sh(
            &copy,
            "cat /workspace/kept; ls /usr/bin; test -e /usr/sbin/chroot || echo chroot-gone; \
         test -e /usr/sbin/telnetd && echo sbin-kept",
        );
        assert_eq!(r["stdout"], "kept\nonly\nchroot-gone\nsbin-kept\n", "{r}");
        let (s, _) = d.call("DELETE", &path(&copy, ""), None);
        assert_eq!(s, 204);
        // A paused microVM's agent cannot read its layer: a 409 that says
        // to resume it.
        let (s, _) = d.call("POST", &path(&id, "/pause"), None);
        assert_eq!(s, 200);
        let (s, body) = d.call(
            "POST",
            &path(&id, "/snapshot"),
            Some(json!({"name": "paused-snap"})),
        );
        assert_eq!(s, 409, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("resume"),
            "{body}"
        );
        let (s, _) = d.call("POST", &path(&id, "/resume"), None);
        assert_eq!(s, 200);
    }
    let (s, _) = d.call("DELETE", "/v1/templates/suite-snap", None);
    assert!(s == 204 || s == 200, "{s}");

    // The TTL is enforced by the daemon, even on a paused sandbox, and
    // leaves nothing behind.
    let (s, _) = d.call("POST", &path(&id, "/pause"), None);
    assert_eq!(s, 200);
    let (s, _) = d.call(
        "POST",
        &path(&id, "/timeout"),
        Some(json!({"timeout": "1s"})),
    );
    assert_eq!(s, 200);
    let (_, r) = d.call("GET", &path(&id, "/wait?state=stopped&timeout=60s"), None);
    assert_eq!(r["state"], "stopped", "{r}");
    assert_nothing_left(&d);
}

#[test]
fn exec_suite_on_namespace() {
    exec_suite(NS);
}

#[test]
fn exec_suite_on_microvm() {
    exec_suite(VM);
}

/// `GET /` on the host's published `port`; `None` when it fails.
fn get_published(port: u64) -> Option<String> {
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10"])
        .arg(format!("http://127.0.0.1:{port}/"))
        .output()
        .unwrap();
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Send `data` to the host's published `port`, shut down the sending
/// side, and read the answer to its end; `None` when nothing came back.
fn half_closed_exchange(port: u64, data: &[u8]) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port as u16)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    stream.write_all(data).ok()?;
    stream.shutdown(std::net::Shutdown::Write).ok()?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).ok()?;
    (!answer.is_empty()).then_some(answer)
}

/// [`get_published`], retried while the server in the sandbox starts.
fn fetch_published(port: u64) -> Option<String> {
    for _ in 0..50 {
        if let Some(page) = get_published(port) {
            return Some(page);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    None
}

/// A daemon restart (even while paused) loses nothing; delete leaves nothing.
/// A published port (no egress, a server on the sandbox's localhost only)
/// works before and after the restart.
fn restart_suite(backend: &str) {
    let Some(mut d) = daemon(backend) else { return };
    let id = d.create(json!({"backend": backend, "network": {"exposed_ports": [8000, 8001]}}));
    let (_, sandbox) = d.call("GET", &path(&id, ""), None);
    let host_port = sandbox["network"]["ports"][0]["host_port"]
        .as_u64()
        .unwrap_or_else(|| panic!("no published port: {sandbox}"));
    let counter_port = sandbox["network"]["ports"][1]["host_port"]
        .as_u64()
        .unwrap();
    // Nothing listens yet: the client is turned away, the daemon is fine.
    assert_eq!(get_published(host_port), None);
    let r = d.sh(
        &id,
        "mkdir -p /tmp/www && echo published > /tmp/www/index.html && \
         busybox httpd -p 127.0.0.1:8000 -h /tmp/www",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    assert_eq!(fetch_published(host_port).as_deref(), Some("published\n"));
    // A server that answers only once the client has finished sending
    // (a TCP half-close): the relay carries the half-close in band.
    let r = d.sh(
        &id,
        "printf '#!/bin/sh\necho \"got $(wc -c)\"\n' > /tmp/count && chmod +x /tmp/count && \
         (while true; do busybox nc -l -p 8001 -e /tmp/count; done) > /dev/null 2>&1 &",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let counted = (0..50)
        .map(|_| {
            let answer = half_closed_exchange(counter_port, b"hello world");
            if answer.is_none() {
                std::thread::sleep(Duration::from_millis(200));
            }
            answer
        })
        .find_map(|answer| answer);
    assert_eq!(counted.as_deref(), Some("got 11\n"));
    d.sh(&id, "echo before > /tmp/f");
    d.kill();
    d.spawn();
    assert_eq!(d.sh(&id, "cat /tmp/f")["stdout"], "before\n");
    assert_eq!(fetch_published(host_port).as_deref(), Some("published\n"));

    // Restart while paused: still paused after, and resumes.
    let (s, _) = d.call("POST", &path(&id, "/pause"), None);
    assert_eq!(s, 200);
    d.kill();
    d.spawn();
    let (_, r) = d.call("GET", &path(&id, ""), None);
    assert_eq!(r["state"], "paused", "{r}");
    let (s, _) = d.call("POST", &path(&id, "/resume"), None);
    assert_eq!(s, 200);
    assert_eq!(d.sh(&id, "cat /tmp/f")["stdout"], "before\n");

    let (s, _) = d.call("DELETE", &path(&id, ""), None);
    assert_eq!(s, 204);
    let (_, r) = d.call("GET", &path(&id, ""), None);
    assert_eq!(r["state"], "stopped");
    assert_eq!(
        get_published(host_port),
        None,
        "the port closes with the sandbox"
    );
    assert_nothing_left(&d);
}

#[test]
fn restart_suite_on_namespace() {
    restart_suite(NS);
}

#[test]
fn restart_suite_on_microvm() {
    restart_suite(VM);
}

/// A guest kernel panic fails the sandbox with the reason from the
/// console, which `cove logs --console` still shows afterwards.
#[test]
fn a_guest_panic_fails_the_sandbox_with_its_console() {
    let Some(d) = daemon(VM) else { return };
    let id = d.create(json!({"backend": VM}));
    let (s, _) = d.exec(
        &id,
        json!({"cmd": "echo c > /proc/sysrq-trigger", "background": true}),
    );
    assert!(s == 202 || s == 502, "{s}");
    let (_, r) = d.call("GET", &path(&id, "/wait?state=failed&timeout=120s"), None);
    assert_eq!(r["state"], "failed", "{r}");
    let reason = r["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("panicked"), "{reason}");
    let out = cli(&d).args(["logs", "--console", &id]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("Kernel panic"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    assert_nothing_left(&d);
}

/// Without QEMU the backend says what to install, as a 400.
#[test]
fn a_host_without_qemu_gets_a_clear_400() {
    if !root() {
        return;
    }
    let d = Daemon::start_with_env(vec![
        ("COVE_QEMU".into(), "/nonexistent/qemu-system-x86_64".into()),
        ("COVE_FIRECRACKER".into(), "/nonexistent/firecracker".into()),
        ("PATH".into(), "/usr/sbin:/usr/bin:/sbin:/bin".into()),
    ]);
    let (s, r) = d.call("POST", "/v1/sandboxes", Some(json!({"backend": VM})));
    assert_eq!(s, 400, "{r}");
    let message = r["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("qemu-system-x86"), "{message}");
    let (s, r) = d.call("GET", "/v1/backends", None);
    assert_eq!(s, 200);
    let vm = r["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == VM)
        .unwrap()
        .clone();
    assert_eq!(vm["available"], false, "{r}");
    let (s, r) = d.call("POST", "/v1/sandboxes", Some(json!({"backend": "xen"})));
    assert_eq!(s, 400, "{r}");
    assert_nothing_left(&d);
}

/// `cove run --backend microvm`: stdio streamed, exit codes, timeout 124.
#[test]
fn cove_run_on_a_microvm() {
    let Some(d) = daemon(VM) else { return };
    let run = |args: &[&str], stdin: &[u8]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cove"))
            .args(["run", "--backend", "microvm"])
            .args(args)
            .env("COVE_DATA_DIR", d.data_dir())
            .env("COVE_RUNTIME_DIR", d.runtime_dir())
            .envs(d.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    };
    let out = run(
        &[
            "-e",
            "V=from-env",
            "--shell",
            "cat; echo $V; echo oops >&2; hostname | grep -c sbx-; exit 7",
        ],
        b"from stdin\n",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "from stdin\nfrom-env\n1\n"
    );
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    assert_eq!(out.status.code(), Some(7));

    let out = run(&["--timeout", "1s", "--", "sleep", "100"], b"");
    assert_eq!(out.status.code(), Some(124), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("timed out"));
    // Nothing of either VM is left.
    assert!(
        std::fs::read_dir(d.runtime_dir().join("run-vm"))
            .map(|r| r.count() == 0)
            .unwrap_or(true)
    );
    assert!(!host_has_process_with(
        &d.runtime_dir().join("run-vm").display().to_string()
    ));
}

/// A daemon whose default backend is the microVM gives the dialects,
/// whose clients cannot name a backend, microVMs: a Hyperfleet machine
/// boots as one, runs its commands in the guest and publishes its port.
/// A default backend that does not exist stops the daemon at start.
#[test]
fn the_default_backend_gives_the_dialects_microvms() {
    if !root() {
        return;
    }
    let dirs = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_cove"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--default-backend",
            "vmware",
        ])
        .arg("--data-dir")
        .arg(dirs.path().join("data"))
        .arg("--runtime-dir")
        .arg(dirs.path().join("run"))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("default backend \"vmware\" is unknown; choose one of:"),
        "{stderr}"
    );

    let flags = ["--default-backend".to_string(), VM.to_string()];
    let Some(d) = daemon_with(VM, &flags) else {
        return;
    };
    let (_, backends) = d.call("GET", "/v1/backends", None);
    let default: Vec<&str> = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| b["default"] == true)
        .filter_map(|b| b["name"].as_str())
        .collect();
    assert_eq!(default, [VM], "{backends}");

    let (s, m) = d.call(
        "POST",
        "/machines",
        Some(
            json!({"name": "vm-1", "vcpu_count": 1, "mem_size_mib": 256, "exposed_ports": [8080]}),
        ),
    );
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    let (s, m) = d.call("POST", &format!("/machines/{id}/start"), None);
    assert_eq!((s, m["status"].as_str()), (200, Some("running")), "{m}");
    let (_, sandbox) = d.call("GET", &path(&id, ""), None);
    assert_eq!(sandbox["backend"], VM, "{sandbox}");
    let (s, r) = d.call(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["sh", "-c",
            "mkdir -p /tmp/w && echo machine > /tmp/w/index.html && httpd -p 127.0.0.1:8080 -h /tmp/w && cat /proc/cmdline"]})),
    );
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)), "{r}");
    // The guest kernel's command line, which cove wrote.
    assert!(r["stdout"].as_str().unwrap().contains("--vm-init"), "{r}");
    let host_port = sandbox["network"]["ports"][0]["host_port"]
        .as_u64()
        .unwrap();
    assert_eq!(fetch_published(host_port).as_deref(), Some("machine\n"));

    // Hyperfleet stops a machine before deleting it.
    let (s, m) = d.call("POST", &format!("/machines/{id}/stop"), None);
    assert_eq!(s, 200, "{m}");
    let (s, _) = d.call("DELETE", &format!("/machines/{id}"), None);
    assert_eq!(s, 204);
    assert_nothing_left(&d);
}

/// A seed platform's dialect on a microVM sandbox: HopX's API is scoped to
/// any sandbox by ID and calls the same exec path as the native API. (The
/// other dialects create their own sandboxes, on the default backend.)
#[test]
fn hopx_dialect_on_a_microvm() {
    let Some(d) = daemon(VM) else { return };
    let id = d.create(json!({"backend": VM}));
    let send = |method: &str, path: &str, body: Value| {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let req = d
            .http
            .request(method, format!("{}{path}", d.url))
            .bearer_auth(&d.admin);
        let resp = req.json(&body).send().unwrap();
        let status = resp.status().as_u16();
        let body: Value = serde_json::from_str(&resp.text().unwrap()).unwrap_or(Value::Null);
        (status, body)
    };

    // HopX: a shell string; a non-zero exit is a 500 carrying the result;
    // a timeout is a 408.
    let (s, r) = send(
        "POST",
        &format!("/hopx/{id}/commands/run"),
        json!({"command": "pwd; exit 3"}),
    );
    assert_eq!(
        (s, r["exit_code"].as_i64(), r["stdout"].as_str()),
        (500, Some(3), Some("/workspace\n")),
        "{r}"
    );
    let (s, r) = send(
        "POST",
        &format!("/hopx/{id}/commands/run"),
        json!({"command": "sleep 10", "timeout": 1}),
    );
    assert_eq!((s, r["exit_code"].as_i64()), (408, Some(124)), "{r}");

    let (s, _) = d.call("DELETE", &path(&id, ""), None);
    assert_eq!(s, 204);
    assert_nothing_left(&d);
}

/// A template of several layers (here a snapshot over busybox) boots as a
/// microVM: its root disk is the layers' overlay, whiteouts applied.
#[test]
fn a_snapshot_boots_as_a_microvm() {
    let Some(d) = daemon(VM) else { return };
    let source = d.create(json!({"template": "busybox", "backend": NS}));
    let r = d.sh(
        &source,
        "echo made > /workspace/made && rm /linuxrc && mkdir -p /opt/app && echo v2 > /opt/app/version",
    );
    assert_eq!(r["exit_code"], 0, "{r}");
    let (s, snap) = d.call(
        "POST",
        &path(&source, "/snapshot"),
        Some(json!({"name": "layered"})),
    );
    assert_eq!(s, 201, "{snap}");
    assert!(snap["layers"].as_array().unwrap().len() >= 2, "{snap}");

    let vm = d.create(json!({"template": "layered", "backend": VM, "pids": 16}));
    let r = d.sh(
        &vm,
        "cat /workspace/made /opt/app/version; test -e /linuxrc && echo linuxrc-back; ls /bin/busybox",
    );
    assert_eq!(r["stdout"], "made\nv2\n/bin/busybox\n", "{r}");
    // The pids limit holds inside the guest too.
    let r = d.sh(&vm, "for i in $(seq 40); do sleep 1 & done; wait");
    assert!(
        r["stderr"].as_str().unwrap().contains("fork"),
        "40 processes under pids 16: {r}"
    );
    // Once those are gone, a few processes are fine.
    std::thread::sleep(Duration::from_millis(1500));
    let r = d.sh(
        &vm,
        "for i in $(seq 8); do sleep 0.1 & done; wait; echo fine",
    );
    assert_eq!(r["stdout"], "fine\n", "{r}");
    for id in [&vm, &source] {
        let (s, _) = d.call("DELETE", &path(id, ""), None);
        assert_eq!(s, 204);
    }
    let (s, _) = d.call("DELETE", "/v1/templates/layered", None);
    assert!(s == 204 || s == 200, "{s}");
    assert_nothing_left(&d);
}
