//! Processes end to end over HTTP, SSE and WebSocket against a real daemon:
//! background start/wait/kill, stdin, streams (order, completeness,
//! reconnects, slow readers), and a PTY shell driven through a real
//! pseudo-terminal.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read};
use std::time::{Duration, Instant};

use common::{Daemon, host_has_process_with, root};
use serde_json::{Value, json};

fn background(d: &Daemon, id: &str, body: Value) -> u32 {
    let mut body = body;
    body["background"] = true.into();
    let (status, started) = d.exec(id, body);
    assert_eq!(status, 202, "{started}");
    started["pid"].as_u64().unwrap() as u32
}

#[test]
fn background_start_list_wait_and_kill_the_tree() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let pid = background(
        &d,
        &id,
        json!({"cmd": "echo started; sleep 0.5; echo done >&2; exit 3", "tag": "job"}),
    );
    let (s, list) = d.call("GET", &format!("/v1/sandboxes/{id}/processes"), None);
    assert_eq!(s, 200);
    let me = list["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == pid)
        .unwrap()
        .clone();
    assert_eq!(
        (me["tag"].as_str(), me["background"].as_bool()),
        (Some("job"), Some(true))
    );
    let (s, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30s"),
        None,
    );
    assert_eq!(s, 200, "{r}");
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(3), Some("started\n"), Some("done\n"))
    );
    // A late wait still gets the result.
    let (_, again) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait"),
        None,
    );
    assert_eq!(again["exit_code"], 3);
    let (_, info) = d.call("GET", &format!("/v1/sandboxes/{id}/processes/{pid}"), None);
    assert_eq!(
        (info["state"].as_str(), info["exit"]["exit_code"].as_i64()),
        (Some("exited"), Some(3))
    );

    // KILL reaches the whole tree, even a child that left the process group.
    let tag = format!("1000.{}", std::process::id());
    let pid = background(
        &d,
        &id,
        json!({"cmd": format!("sleep {tag} & setsid sleep {tag} & sleep {tag}")}),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_has_process_with(&tag) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (s, e) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=100ms"),
        None,
    );
    assert_eq!((s, e["error"]["code"].as_str()), (504, Some("timeout")));
    let (s, _) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
        Some(json!({"signal": "KILL"})),
    );
    assert_eq!(s, 200);
    let (_, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30s"),
        None,
    );
    assert_eq!(r["signal"], 9);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_has_process_with(&tag) {
        assert!(
            Instant::now() < deadline,
            "part of the tree survived the kill"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn signals_by_name_and_number_and_errors() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    for signal in [json!("TERM"), json!("SIGTERM"), json!(15), json!("int")] {
        let pid = background(&d, &id, json!({"argv": ["sleep", "100"]}));
        let (s, r) = d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
            Some(json!({"signal": signal})),
        );
        assert_eq!(s, 200, "{signal}: {r}");
        let (_, r) = d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30s"),
            None,
        );
        assert!(r["signal"] == 15 || r["signal"] == 2, "{r}");
    }
    let pid = background(&d, &id, json!({"argv": ["sleep", "100"]}));
    for bad in [json!("NOPE"), json!(0), json!(99), json!(true)] {
        let (s, e) = d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
            Some(json!({"signal": bad})),
        );
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    for path in [
        format!("/v1/sandboxes/{id}/processes/999999"),
        format!("/v1/sandboxes/{id}/processes/999999/wait"),
    ] {
        let method = if path.ends_with("wait") {
            "POST"
        } else {
            "GET"
        };
        let (s, e) = d.call(method, &path, None);
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{path}"
        );
    }
    let (s, _) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/999999/signal"),
        Some(json!({"signal": "TERM"})),
    );
    assert_eq!(s, 404);
    d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/signal"),
        Some(json!({"signal": 9})),
    );
}

#[test]
fn stdin_round_trip_and_closed_pipes() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let pid = background(&d, &id, json!({"argv": ["cat"], "stdin_open": true}));
    let send = |body: &[u8]| {
        let resp = d
            .request(
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{id}/processes/{pid}/stdin"),
                Some(&d.admin),
            )
            .body(body.to_vec())
            .send()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let (s, r) = send(b"hello ");
    assert_eq!((s, r["bytes"].as_u64()), (200, Some(6)));
    let binary: Vec<u8> = (0..=255u8).collect();
    assert_eq!(send(&binary).0, 200);
    let (s, _) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/stdin/close"),
        None,
    );
    assert_eq!(s, 200);
    let (_, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30s&encoding=base64"),
        None,
    );
    let out = base64_simd::STANDARD
        .decode_to_vec(r["stdout"].as_str().unwrap())
        .unwrap();
    let mut expected = b"hello ".to_vec();
    expected.extend_from_slice(&binary);
    assert_eq!(out, expected, "cat echoed every byte, and EOF ended it");
    // Writing to a closed pipe is a 409 with a message.
    let (s, e) = send(b"late");
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{e}"
    );
    // A process started without stdin_open has no stdin to write to.
    let pid2 = background(&d, &id, json!({"argv": ["sleep", "5"]}));
    let resp = d
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/processes/{pid2}/stdin"),
            Some(&d.admin),
        )
        .body("x")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 409);
    // stdin_open without background is refused.
    let (s, _) = d.exec(&id, json!({"cmd": "cat", "stdin_open": true}));
    assert_eq!(s, 400);
}

/// Read SSE events from a response until `exit` (or `limit` events).
fn read_events(
    resp: reqwest::blocking::Response,
    limit: usize,
) -> Vec<(String, Option<String>, Value)> {
    let mut reader = BufReader::new(resp);
    let mut events = Vec::new();
    let (mut name, mut id, mut data) = (String::new(), None, String::new());
    let mut line = String::new();
    while events.len() < limit {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            if !name.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap_or(Value::Null);
                let done = name == "exit";
                events.push((std::mem::take(&mut name), id.take(), value));
                if done {
                    break;
                }
            }
            data.clear();
        } else if let Some(v) = l.strip_prefix("event: ").or(l.strip_prefix("event:")) {
            name = v.to_string();
        } else if let Some(v) = l.strip_prefix("id: ").or(l.strip_prefix("id:")) {
            id = Some(v.to_string());
        } else if let Some(v) = l.strip_prefix("data: ").or(l.strip_prefix("data:")) {
            data.push_str(v);
        }
    }
    events
}

fn bytes_of(event: &Value) -> Vec<u8> {
    let data = event["data"].as_str().unwrap();
    if event["encoding"] == "base64" {
        base64_simd::STANDARD.decode_to_vec(data).unwrap()
    } else {
        data.as_bytes().to_vec()
    }
}

#[test]
fn a_hundred_megabytes_streamed_in_order_and_complete() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    // 50 MB of numbered stdout lines and 50 MB of numbered stderr lines, interleaved.
    let script = "python3 -c '
import sys
o, e = sys.stdout.buffer, sys.stderr.buffer
for i in range(500000):
    o.write(b\"o%09d %s\\n\" % (i, b\"x\" * 88))
    e.write(b\"e%09d %s\\n\" % (i, b\"y\" * 88))
'";
    let resp = d
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/exec/stream"),
            Some(&d.admin),
        )
        .json(&json!({"cmd": script}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut reader = BufReader::new(resp);
    let (mut out, mut err) = (Vec::<u8>::new(), Vec::<u8>::new());
    let (mut name, mut data) = (String::new(), String::new());
    let mut exit = None;
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
        let l = line.trim_end_matches('\n');
        if l.is_empty() {
            if !name.is_empty() {
                let value: Value = serde_json::from_str(&data).unwrap();
                match name.as_str() {
                    "stdout" => {
                        assert_eq!(
                            value["offset"].as_u64().unwrap(),
                            out.len() as u64,
                            "stdout offsets are contiguous"
                        );
                        out.extend(bytes_of(&value));
                    }
                    "stderr" => {
                        assert_eq!(
                            value["offset"].as_u64().unwrap(),
                            err.len() as u64,
                            "stderr offsets are contiguous"
                        );
                        err.extend(bytes_of(&value));
                    }
                    "dropped" => panic!("a reading client lost output: {value}"),
                    "exit" => {
                        exit = Some(value);
                        break;
                    }
                    _ => {}
                }
            }
            name.clear();
            data.clear();
        } else if let Some(v) = l.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = l.strip_prefix("data:") {
            data.push_str(v.trim_start());
        }
    }
    let exit = exit.expect("an exit event");
    assert_eq!(exit["exit_code"], 0);
    assert_eq!(out.len(), 50_000_000);
    assert_eq!(err.len(), 50_000_000);
    for (i, l) in out
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        assert_eq!(
            &l[..10],
            format!("o{i:09}").as_bytes(),
            "stdout line {i} out of order"
        );
    }
    for (i, l) in err
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        assert_eq!(
            &l[..10],
            format!("e{i:09}").as_bytes(),
            "stderr line {i} out of order"
        );
    }
}

#[test]
fn reconnecting_mid_stream_misses_nothing() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let script = "for i in $(seq 1 60); do echo line$i; echo err$i >&2; sleep 0.02; done";
    let resp = d
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/exec/stream"),
            Some(&d.admin),
        )
        .json(&json!({"cmd": script}))
        .send()
        .unwrap();
    let first = read_events(resp, 12);
    assert_eq!(first[0].0, "start");
    let pid = first[0].2["pid"].as_u64().unwrap();
    let last_id = first.last().unwrap().1.clone().unwrap();
    let mut out: Vec<u8> = Vec::new();
    let mut err: Vec<u8> = Vec::new();
    for (name, _, value) in &first {
        match name.as_str() {
            "stdout" => out.extend(bytes_of(value)),
            "stderr" => err.extend(bytes_of(value)),
            _ => {}
        }
    }
    // The client went away; the process went on. Resume with Last-Event-ID.
    std::thread::sleep(Duration::from_millis(300));
    let resp = d
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/processes/{pid}/stream"),
            Some(&d.admin),
        )
        .header("last-event-id", &last_id)
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let rest = read_events(resp, 10_000);
    for (name, _, value) in &rest {
        match name.as_str() {
            "stdout" => out.extend(bytes_of(value)),
            "stderr" => err.extend(bytes_of(value)),
            "dropped" => panic!("nothing should be dropped: {value}"),
            _ => {}
        }
    }
    assert_eq!(rest.last().unwrap().0, "exit");
    let expected_out: String = (1..=60).map(|i| format!("line{i}\n")).collect();
    let expected_err: String = (1..=60).map(|i| format!("err{i}\n")).collect();
    assert_eq!(String::from_utf8(out).unwrap(), expected_out);
    assert_eq!(String::from_utf8(err).unwrap(), expected_err);
    // ?offset= works too: from byte 6 of stdout (the start of line2).
    let resp = d
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/processes/{pid}/stream?stdout_offset=6&stderr_offset=0"),
            Some(&d.admin),
        )
        .send()
        .unwrap();
    let events = read_events(resp, 10_000);
    let out: Vec<u8> = events
        .iter()
        .filter(|e| e.0 == "stdout")
        .flat_map(|e| bytes_of(&e.2))
        .collect();
    assert!(String::from_utf8(out).unwrap().starts_with("line2\n"));
}

/// Peak RSS of a process, in KiB.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn a_stalled_reader_costs_bounded_memory_and_is_told_what_it_lost() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let agent = d.agents()[0] as u32;
    let daemon = d.child.as_ref().unwrap().id();
    let (agent_before, daemon_before) = (peak_rss(agent), peak_rss(daemon));
    let pid = background(&d, &id, json!({"cmd": "head -c 300000000 /dev/zero"}));
    // A lossy reader that stalls: it opens the stream, reads a little, and stops.
    let resp = d
        .request(
            reqwest::Method::GET,
            &format!("/v1/sandboxes/{id}/processes/{pid}/stream"),
            Some(&d.admin),
        )
        .send()
        .unwrap();
    let mut reader = BufReader::new(resp);
    let mut first = [0u8; 256];
    reader.read_exact(&mut first).unwrap();
    // The process is not held back by the stalled reader: it finishes.
    let (s, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=60s&max_output=1024"),
        None,
    );
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    assert_eq!(r["stdout_bytes"], 300_000_000u64);
    assert_eq!(
        r["stdout_truncated"], true,
        "the late reader only got the newest bytes"
    );
    // Neither the agent nor the daemon grew by anything like 300 MB.
    let (agent_after, daemon_after) = (peak_rss(agent), peak_rss(daemon));
    assert!(
        agent_after - agent_before < 64 * 1024,
        "agent grew {} KiB",
        agent_after - agent_before
    );
    assert!(
        daemon_after - daemon_before < 64 * 1024,
        "daemon grew {} KiB",
        daemon_after - daemon_before
    );
    // The stalled reader, when it reads on, is told exactly what it lost.
    let mut rest = String::new();
    let mut line = String::new();
    while reader.read_line(&mut line).unwrap() > 0 {
        rest.push_str(&line);
        if line.starts_with("event: exit") {
            break;
        }
        line.clear();
    }
    assert!(rest.contains("event: dropped"), "no dropped event");
}

/// The per-process cgroups (`proc-N`) under this daemon's sandboxes.
fn process_cgroups(d: &Daemon) -> Vec<String> {
    d.cgroups()
        .iter()
        .filter_map(|sandbox| std::fs::read_dir(sandbox).ok())
        .flat_map(|entries| entries.flatten())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("proc-"))
        .collect()
}

#[test]
fn a_process_cgroup_is_reused_only_when_nothing_is_left_in_it() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let own = "grep -o 'proc-[0-9]*' /proc/self/cgroup | head -n 1";
    let cgroup_of = |script: &str| {
        let r = d.sh(&id, script);
        r["stdout"].as_str().unwrap().trim().to_string()
    };
    let first = cgroup_of(own);
    assert!(first.starts_with("proc-"), "{first:?}");
    assert_eq!(cgroup_of(own), first, "an empty cgroup was not reused");

    // A command that ends but leaves a process behind keeps its cgroup:
    // the next command gets another one.
    let tag = format!("1001.{}", std::process::id());
    let left = cgroup_of(&format!("setsid sleep {tag} >/dev/null 2>&1 & {own}"));
    assert_eq!(left, first);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !host_has_process_with(&tag) {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let next = cgroup_of(own);
    assert_ne!(
        next, left,
        "a new command joined a cgroup with a leftover in it"
    );
    assert!(host_has_process_with(&tag), "the leftover was touched");

    // Once the leftover is gone its cgroup is removed; spares stay few
    // however many processes ran at once.
    d.sh(&id, &format!("pkill -f {tag}; true"));
    for _ in 0..20 {
        background(&d, &id, json!({"cmd": "sleep 0.3"}));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, list) = d.call("GET", &format!("/v1/sandboxes/{id}/processes"), None);
        let running = list["processes"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["state"] == "running")
            .count();
        if running == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    d.sh(&id, "true");
    let cgroups = process_cgroups(&d);
    assert!(
        !cgroups.is_empty() && cgroups.len() <= 8,
        "per-process cgroups left: {cgroups:?}"
    );
    assert!(!cgroups.contains(&left), "{left} outlived its leftover");
}

#[test]
fn a_thousand_execs_leave_no_zombie_and_no_fd() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let agent = d.agents()[0];
    let fds = || {
        std::fs::read_dir(format!("/proc/{agent}/fd"))
            .unwrap()
            .count()
    };
    d.exec(&id, json!({"argv": ["true"]}));
    let before = fds();
    for _ in 0..1000 {
        let (s, r) = d.exec(&id, json!({"argv": ["true"]}));
        assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    }
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(fds(), before, "the agent leaked descriptors");
    let r = d.sh(&id, "ps -eo stat= | grep -c Z || true");
    assert_eq!(
        r["stdout"].as_str().unwrap().trim(),
        "0",
        "zombies in the sandbox"
    );
}

#[test]
fn a_stream_client_that_disconnects_does_not_kill_the_process() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let resp = d
        .request(
            reqwest::Method::POST,
            &format!("/v1/sandboxes/{id}/exec/stream"),
            Some(&d.admin),
        )
        .json(&json!({"cmd": "sleep 1; echo finished"}))
        .send()
        .unwrap();
    let events = read_events(resp, 1);
    let pid = events[0].2["pid"].as_u64().unwrap();
    // The response (and its connection) is gone now.
    let (s, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=30s"),
        None,
    );
    assert_eq!((s, r["stdout"].as_str()), (200, Some("finished\n")));
}

#[test]
fn cli_background_ps_logs_kill() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let cove = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_URL", &d.url)
            .env("COVE_KEY", &d.admin)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = cove(&[
        "exec",
        "-d",
        "--tag",
        "ticker",
        &id,
        "--",
        "sh",
        "-c",
        "for i in 1 2 3; do echo tick$i; done; sleep 100",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pid: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = cove(&["ps", &id]);
    let table = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        table.contains("ticker") && table.contains(&pid.to_string()),
        "{table}"
    );
    let out = cove(&["logs", &id, &pid.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "tick1\ntick2\ntick3\n"
    );
    let out = cove(&["kill", &id, &pid.to_string(), "-s", "KILL"]);
    assert!(out.status.success());
    let out = cove(&["logs", "-f", &id, &pid.to_string()]);
    assert!(out.status.success(), "logs -f ends when the process does");
    // Piped stdin streams into `cove exec`.
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
        .env("COVE_URL", &d.url)
        .env("COVE_KEY", &d.admin)
        .args(["exec", &id, "--", "sh", "-c", "cat; exit 4"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"through the pipe")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).as_ref()
        ),
        (Some(4), "through the pipe")
    );
}

/// Drive `cove exec -it ID bash` through a real pseudo-terminal.
#[test]
fn an_interactive_shell_on_a_real_terminal() {
    if !root() {
        return;
    }
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let d = Daemon::start();
    let id = d.create(json!({}));
    let pty = nix::pty::openpty(
        Some(&nix::pty::Winsize {
            ws_row: 24,
            ws_col: 80,
            ws_xpixel: 0,
            ws_ypixel: 0,
        }),
        None,
    )
    .unwrap();
    let slave = pty.slave.as_raw_fd();
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cove"));
    cmd.env("COVE_URL", &d.url)
        .env("COVE_KEY", &d.admin)
        .env("TERM", "xterm")
        .args(["exec", "-it", &id, "--", "bash", "--norc", "-i"]);
    // SAFETY: setsid/ioctl/dup2 in the child before exec, on fds we own.
    unsafe {
        cmd.pre_exec(move || {
            libc::setsid();
            libc::ioctl(slave, libc::TIOCSCTTY, 0);
            libc::dup2(slave, 0);
            libc::dup2(slave, 1);
            libc::dup2(slave, 2);
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(pty.slave);
    let master = std::fs::File::from(pty.master);
    let master_fd = master.as_raw_fd();
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut reader = master.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut screen = String::new();
    let expect = |needle: &str, screen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !screen.contains(needle) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "never saw {needle:?} in {screen:?}");
            if let Ok(chunk) = rx.recv_timeout(left.min(Duration::from_millis(200))) {
                screen.push_str(&String::from_utf8_lossy(&chunk));
            }
        }
    };
    let type_in = |text: &[u8]| {
        use std::io::Write;
        (&master).write_all(text).unwrap();
    };
    type_in(b"echo tty=$(tty) term=$TERM\r");
    expect("tty=/dev/pts/", &mut screen);
    expect("term=xterm", &mut screen);
    // Window size changes reach the sandboxed terminal.
    let size = libc::winsize {
        ws_row: 40,
        ws_col: 132,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ on our pty master; the kernel sends SIGWINCH to cove.
    unsafe { libc::ioctl(master_fd, libc::TIOCSWINSZ, &size) };
    std::thread::sleep(Duration::from_millis(300));
    type_in(b"stty size\r");
    expect("40 132", &mut screen);
    // ^C interrupts the foreground job in the sandbox, not cove.
    type_in(b"sleep 1000\r");
    std::thread::sleep(Duration::from_millis(500));
    type_in(b"\x03");
    type_in(b"echo after-interrupt\r");
    expect("after-interrupt", &mut screen);
    // Job control works on a real terminal.
    type_in(b"sleep 1000 &\r");
    type_in(b"jobs\r");
    expect("Running", &mut screen);
    type_in(b"kill %1; exit 7\r");
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "cove exec -it did not exit: {screen:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        status.code(),
        Some(7),
        "the shell's exit code passes through"
    );
}

#[test]
fn malformed_pids_and_plain_requests_to_attach_get_json_errors() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    for pid in ["abc", "-1", "4294967296", "1.5"] {
        for tail in ["", "/wait", "/signal"] {
            let method = if tail.is_empty() { "GET" } else { "POST" };
            let (s, e) = d.call(
                method,
                &format!("/v1/sandboxes/{id}/processes/{pid}{tail}"),
                None,
            );
            assert_eq!(s, 400, "{pid}{tail}: {e}");
            assert_eq!(e["error"]["code"], "invalid_request", "{pid}{tail}: {e}");
        }
    }
    // attach without a WebSocket handshake
    let pid = background(&d, &id, json!({"argv": ["sleep", "30"]}));
    let (s, e) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/processes/{pid}/attach"),
        None,
    );
    assert_eq!(s, 400, "{e}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("WebSocket"),
        "{e}"
    );

    // stdin/close answers with the pipe closed.
    let pid = background(
        &d,
        &id,
        json!({"argv": ["sleep", "30"], "stdin_open": true}),
    );
    let (s, info) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/stdin/close"),
        None,
    );
    assert_eq!(
        (s, info["stdin_open"].as_bool()),
        (200, Some(false)),
        "{info}"
    );

    // A zero wait timeout, however written, is no limit (as for exec).
    let pid = background(&d, &id, json!({"cmd": "sleep 0.3; exit 7"}));
    let (s, r) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/processes/{pid}/wait?timeout=0s"),
        None,
    );
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(7)), "{r}");
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
        204
    );
}
