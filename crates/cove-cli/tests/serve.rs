//! `cove serve` end to end: a real daemon on loopback, real HTTP, real
//! sandboxes. Every endpoint, every error code, auth and owner isolation,
//! restart without loss, and many clients at once.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, host_has_process_with, root};
use serde_json::{Value, json};

#[test]
fn lifecycle_and_exec() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let (status, sandbox) = d.call(
        "POST",
        "/v1/sandboxes",
        Some(json!({"env": {"GREETING": "hello"}, "labels": {"team": "a"}, "metadata": {"n": 1}, "memory": "256M", "pids": 128, "cpus": 0.5})),
    );
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sbx-") && id.len() == 12);
    assert_eq!(sandbox["state"], "running");
    assert_eq!(sandbox["template"], "host");
    assert_eq!(sandbox["limits"]["memory"], 256 << 20);
    assert_eq!(sandbox["labels"]["team"], "a");
    assert_eq!(sandbox["metadata"]["n"], 1);

    let r = d.sh(&id, "echo $GREETING; echo err >&2; exit 3");
    assert_eq!(
        (
            r["exit_code"].as_i64(),
            r["stdout"].as_str(),
            r["stderr"].as_str()
        ),
        (Some(3), Some("hello\n"), Some("err\n"))
    );
    assert_eq!(r["timed_out"], false);

    let (_, r) = d.exec(&id, json!({"argv": ["sh", "-c", "pwd; id -u"], "cwd": "/tmp", "user": "nobody", "env": {"X": "1"}}));
    assert_eq!(r["stdout"], "/tmp\n65534\n");
    let (_, r) = d.exec(&id, json!({"argv": ["cat"], "stdin": "piped in"}));
    assert_eq!(r["stdout"], "piped in");
    let (_, r) = d.exec(&id, json!({"cmd": "sleep 10", "timeout": "500ms"}));
    assert_eq!(
        (r["timed_out"].as_bool(), r["exit_code"].as_i64()),
        (Some(true), Some(124))
    );
    let (_, r) = d.exec(&id, json!({"cmd": "sleep 10", "timeout": 0.5}));
    assert_eq!(r["timed_out"], true);
    let (_, r) = d.exec(
        &id,
        json!({"cmd": "head -c 100000 /dev/zero", "max_output": 10}),
    );
    assert_eq!(
        (r["stdout_truncated"].as_bool(), r["stdout_bytes"].as_u64()),
        (Some(true), Some(100_000))
    );
    assert_eq!(r["stdout"].as_str().unwrap().len(), 10);
    // Bytes that are not UTF-8: lossy with a flag, or exact in base64.
    let (_, r) = d.exec(&id, json!({"cmd": "printf '\\377\\000x'"}));
    assert_eq!(r["lossy"], true);
    let (_, r) = d.exec(
        &id,
        json!({"cmd": "printf '\\377\\000x'", "encoding": "base64"}),
    );
    assert_eq!(
        (
            r["stdout"].as_str(),
            r["lossy"].as_bool(),
            r["encoding"].as_str()
        ),
        (Some("/wB4"), Some(false), Some("base64"))
    );
    let (_, r) = d.exec(
        &id,
        json!({"argv": ["od", "-An", "-tx1"], "stdin": "/wB4", "encoding": "base64"}),
    );
    assert!(r["stdout"].as_str().is_some());

    let (status, got) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!((status, got["id"].as_str()), (200, Some(id.as_str())));
    let (status, list) = d.call("GET", "/v1/sandboxes?state=running&label=team=a", None);
    assert_eq!(status, 200);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    let (_, list) = d.call("GET", "/v1/sandboxes?label=team=b", None);
    assert!(list["sandboxes"].as_array().unwrap().is_empty());

    let (status, paused) = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!((status, paused["state"].as_str()), (200, Some("paused")));
    let (status, err) = d.exec(&id, json!({"cmd": "true"}));
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (409, Some("sandbox_paused"))
    );
    let (status, resumed) = d.call("POST", &format!("/v1/sandboxes/{id}/resume"), None);
    assert_eq!((status, resumed["state"].as_str()), (200, Some("running")));
    assert_eq!(d.sh(&id, "echo back")["stdout"], "back\n");

    let (status, timed) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/timeout"),
        Some(json!({"timeout": "10m"})),
    );
    assert_eq!(status, 200);
    assert!(timed["expires_at"].is_string());
    let (status, waited) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/wait?state=running&timeout=1s"),
        None,
    );
    assert_eq!((status, waited["state"].as_str()), (200, Some("running")));

    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204);
    let (status, gone) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(
        (status, gone["state"].as_str(), gone["reason"].as_str()),
        (200, Some("stopped"), Some("deleted"))
    );
    let (status, err) = d.exec(&id, json!({"cmd": "true"}));
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (410, Some("sandbox_stopped"))
    );
    let (status, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(status, 204, "deleting twice is fine");
    d.assert_nothing_left();
}

#[test]
fn create_without_waiting_and_wait_endpoint() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let (status, sandbox) = d.call("POST", "/v1/sandboxes?wait=false", Some(json!({})));
    assert_eq!(status, 201);
    assert_eq!(sandbox["state"], "starting");
    let id = sandbox["id"].as_str().unwrap();
    let (status, waited) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/wait?state=running&timeout=30s"),
        None,
    );
    assert_eq!((status, waited["state"].as_str()), (200, Some("running")));
    let (status, err) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/wait?state=paused&timeout=200ms"),
        None,
    );
    assert_eq!(
        (status, err["error"]["code"].as_str()),
        (504, Some("timeout"))
    );
}

#[test]
fn ttl_is_enforced_by_the_daemon() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({"timeout": 1}));
    let (status, waited) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/wait?state=stopped&timeout=20s"),
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(waited["state"], "stopped");
    assert!(
        waited["reason"]
            .as_str()
            .unwrap()
            .contains("timeout expired"),
        "{waited}"
    );
    // Extending keeps one alive past its first deadline.
    let id = d.create(json!({"timeout": "1s"}));
    d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/timeout"),
        Some(json!({"timeout": "1h"})),
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        d.call("GET", &format!("/v1/sandboxes/{id}"), None).1["state"],
        "running"
    );
    d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    d.assert_nothing_left();
}

#[test]
fn pagination_follows_the_cursor() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let ids: Vec<String> = (0..3)
        .map(|_| d.create(json!({"labels": {"page": "yes"}})))
        .collect();
    let mut seen = Vec::new();
    let mut path = "/v1/sandboxes?label=page=yes&limit=2".to_string();
    loop {
        let (status, page) = d.call("GET", &path, None);
        assert_eq!(status, 200, "{page}");
        for s in page["sandboxes"].as_array().unwrap() {
            seen.push(s["id"].as_str().unwrap().to_string());
        }
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/v1/sandboxes?label=page=yes&limit=2&cursor={cursor}"),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected);
}

#[test]
fn every_error_has_its_code() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let url = |p: &str| format!("{}{p}", d.url);
    let code = |resp: reqwest::blocking::Response| -> (u16, Value) {
        let status = resp.status().as_u16();
        (status, resp.json().unwrap_or(Value::Null))
    };

    // 400: malformed JSON, unknown field (named), bad values, malformed IDs.
    let (s, e) = code(
        d.http
            .post(url("/v1/sandboxes"))
            .bearer_auth(&d.admin)
            .header("content-type", "application/json")
            .body("{not json")
            .send()
            .unwrap(),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("malformed JSON"),
        "{e}"
    );
    let (s, e) = d.call("POST", "/v1/sandboxes", Some(json!({"tempalte": "host"})));
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("tempalte"),
        "{e}"
    );
    let (s, e) = d.exec(&id, json!({"cmd": "true", "timeout": "soon"}));
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("timeout"),
        "{e}"
    );
    for bad in [
        json!({"memory": -1}),
        json!({"memory": "lots"}),
        json!({"cpus": 9999}),
        json!({"pids": 1}),
        json!({"template": "nope"}),
        json!({"backend": "nope"}),
        json!({"cwd": "relative"}),
    ] {
        let (s, e) = d.call("POST", "/v1/sandboxes", Some(bad.clone()));
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{bad}: {e}"
        );
    }
    let (s, e) = d.exec(&id, json!({}));
    assert_eq!(s, 400, "{e}");
    let (s, e) = d.exec(&id, json!({"cmd": "true", "cwd": "/nope"}));
    assert_eq!(s, 400);
    assert!(
        e["error"]["message"].as_str().unwrap().contains("/nope"),
        "{e}"
    );
    let (s, _) = d.exec(&id, json!({"cmd": "true", "user": "ghost"}));
    assert_eq!(s, 400);
    let (s, e) = d.call("GET", "/v1/sandboxes/not-an-id", None);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("invalid_request"))
    );
    let (s, e) = d.call("GET", "/v1/sandboxes/sbx-00000000", None);
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("not_found")));
    let (s, _) = d.call("GET", "/v1/sandboxes?state=sleeping", None);
    assert_eq!(s, 400);
    let (s, _) = d.call("GET", "/v1/sandboxes?limit=0", None);
    assert_eq!(s, 400);
    // Invalid UTF-8 in the body.
    let (s, _) = code(
        d.http
            .post(url("/v1/sandboxes"))
            .bearer_auth(&d.admin)
            .header("content-type", "application/json")
            .body(vec![b'{', b'"', 0xff, b'"', b':', b'1', b'}'])
            .send()
            .unwrap(),
    );
    assert_eq!(s, 400);

    // 401: no key, bad key.
    let (s, e) = code(d.http.get(url("/v1/sandboxes")).send().unwrap());
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, _) = code(
        d.http
            .get(url("/v1/sandboxes"))
            .bearer_auth("cove_wrong")
            .send()
            .unwrap(),
    );
    assert_eq!(s, 401);
    let (s, _) = code(
        d.http
            .get(url("/v1/sandboxes"))
            .header("x-api-key", &d.admin)
            .send()
            .unwrap(),
    );
    assert_eq!(s, 200, "X-API-Key works too");

    // 403: wrong scope.
    let reader = d.key("alice", &["sandboxes:read"]);
    let (s, e) = d.call_as(&reader, "POST", "/v1/sandboxes", Some(json!({})));
    assert_eq!((s, e["error"]["code"].as_str()), (403, Some("forbidden")));

    // 404 for unknown routes, 405 for wrong methods, 413, 415.
    let (s, e) = d.call("GET", "/v2/nothing", None);
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("no_route")));
    let (s, e) = d.call("PUT", "/v1/sandboxes", None);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (405, Some("method_not_allowed"))
    );
    let big = format!(
        "{{\"cmd\": \"true\", \"stdin\": \"{}\"}}",
        "x".repeat(65 << 20)
    );
    let (s, e) = code(
        d.http
            .post(url(&format!("/v1/sandboxes/{id}/exec")))
            .bearer_auth(&d.admin)
            .header("content-type", "application/json")
            .body(big)
            .send()
            .unwrap(),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (413, Some("payload_too_large"))
    );
    let (s, e) = code(
        d.http
            .post(url("/v1/sandboxes"))
            .bearer_auth(&d.admin)
            .header("content-type", "text/plain")
            .body("{}")
            .send()
            .unwrap(),
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (415, Some("unsupported_media_type"))
    );

    // 410 after delete (409 for paused is covered by the lifecycle test).
    d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    let (s, e) = d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (410, Some("sandbox_stopped"))
    );

    // The daemon is still healthy after all of that.
    let (s, _) = code(d.http.get(url("/healthz")).send().unwrap());
    assert_eq!(s, 200);
}

#[test]
fn an_unresponsive_agent_is_a_502() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let agents = d.agents();
    assert_eq!(agents.len(), 1);
    let pid = nix::unistd::Pid::from_raw(agents[0]);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (s, e) = d.exec(&id, json!({"cmd": "true"}));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (502, Some("agent_unreachable")),
        "{e}"
    );
    assert_eq!(d.sh(&id, "echo recovered")["stdout"], "recovered\n");
}

#[test]
fn keys_scopes_and_owners() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let alice = d.key("alice", &["sandboxes:write", "exec"]);
    let bob = d.key("bob", &["sandboxes:write", "exec"]);
    let (s, sandbox) = d.call_as(&alice, "POST", "/v1/sandboxes", Some(json!({})));
    assert_eq!(s, 201);
    let id = sandbox["id"].as_str().unwrap();
    // Bob cannot see, exec in or delete Alice's sandbox: it does not exist for him.
    for (method, path) in [
        ("GET", format!("/v1/sandboxes/{id}")),
        ("DELETE", format!("/v1/sandboxes/{id}")),
        ("POST", format!("/v1/sandboxes/{id}/pause")),
    ] {
        let (s, e) = d.call_as(&bob, method, &path, None);
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (404, Some("not_found")),
            "{method} {path}"
        );
    }
    let (s, _) = d.call_as(
        &bob,
        "POST",
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"cmd": "true"})),
    );
    assert_eq!(s, 404);
    let (_, list) = d.call_as(&bob, "GET", "/v1/sandboxes", None);
    assert!(list["sandboxes"].as_array().unwrap().is_empty());
    let (_, list) = d.call_as(&alice, "GET", "/v1/sandboxes", None);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    // The admin sees everything; only the admin manages keys.
    let (_, list) = d.call("GET", "/v1/sandboxes", None);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    let (s, _) = d.call_as(&alice, "GET", "/v1/keys", None);
    assert_eq!(s, 403);
    let (s, keys) = d.call("GET", "/v1/keys", None);
    assert_eq!(s, 200);
    let text = keys.to_string();
    assert!(
        !text.contains(&alice) && !text.contains(&d.admin),
        "secrets must never be listed"
    );
    // Revoking works at once.
    let alice_id = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["owner"] == "alice")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _) = d.call("DELETE", &format!("/v1/keys/{alice_id}"), None);
    assert_eq!(s, 204);
    let (s, _) = d.call_as(&alice, "GET", "/v1/sandboxes", None);
    assert_eq!(s, 401);
    // Keys are stored hashed: the database never holds a secret.
    let db = std::fs::read(d.data_dir().join("cove.db")).unwrap();
    let wal = std::fs::read(d.data_dir().join("cove.db-wal")).unwrap_or_default();
    for secret in [&alice, &bob, &d.admin] {
        assert!(!db.windows(secret.len()).any(|w| w == secret.as_bytes()));
        assert!(!wal.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.data_dir().join("admin.key"))
            .unwrap()
            .permissions(),
    );
    assert_eq!(mode & 0o777, 0o600);
}

/// The daemon's sandbox factory: its child running `cove __sandbox-factory`.
fn factory_of(d: &Daemon) -> Option<i32> {
    let daemon = d.child.as_ref()?.id().to_string();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            let ppid = stat.rsplit(") ").next()?.split(' ').nth(1)?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            (ppid == daemon && cmdline.windows(17).any(|w| w == b"__sandbox-factory"))
                .then_some(pid)
        })
}

/// Whether `pid` exits (or is a zombie) within `limit`.
fn gone_within(pid: i32, limit: Duration) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.is_empty() || stat.rsplit(") ").next().is_some_and(|s| s.starts_with('Z')) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

#[test]
fn a_dead_sandbox_factory_is_replaced() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let first = d.create(json!({}));
    let factory = factory_of(&d).expect("the daemon runs a sandbox factory");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(factory),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    assert!(gone_within(factory, Duration::from_secs(5)));
    // The next create starts another factory and works; the sandbox made
    // by the dead one is untouched.
    let second = d.create(json!({}));
    assert_eq!(d.sh(&second, "echo new")["stdout"], "new\n");
    assert_eq!(d.sh(&first, "echo old")["stdout"], "old\n");
    let replacement = factory_of(&d).expect("a new factory");
    assert_ne!(replacement, factory);
    for id in [&first, &second] {
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
    d.assert_nothing_left();
}

#[test]
fn each_sandbox_has_a_network_namespace_of_its_own_with_only_lo_up() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let netns_of = |pid: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/net"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    };
    let host = netns_of("self");
    // Every sandbox gets a network namespace of its own, never the host's
    // or another sandbox's (nor the one its factory runs in).
    let ids: Vec<String> = (0..4).map(|_| d.create(json!({}))).collect();
    let mut seen = vec![host.clone()];
    for id in &ids {
        let r = d.sh(
            id,
            "readlink /proc/self/ns/net; cat /sys/class/net/lo/flags; ls /sys/class/net",
        );
        let out = r["stdout"].as_str().unwrap().to_string();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{r}");
        assert!(
            !seen.contains(&lines[0].to_string()),
            "{id} shares {}",
            lines[0]
        );
        seen.push(lines[0].to_string());
        let flags = u32::from_str_radix(lines[1].trim_start_matches("0x"), 16).unwrap();
        assert_eq!(flags & 1, 1, "lo is down in {id}: {r}");
        assert_eq!(lines[2], "lo", "{id} has more than lo: {r}");
    }
    let factory = factory_of(&d).expect("the daemon runs a sandbox factory");
    assert_eq!(
        netns_of(&factory.to_string()),
        host,
        "the sandbox factory is not in the host's network namespace"
    );
    for id in &ids {
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
    d.assert_nothing_left();
}

#[test]
fn restart_without_loss() {
    if !root() {
        return;
    }
    let mut d = Daemon::start();
    let keep = d.create(json!({"labels": {"role": "keep"}}));
    let doomed = d.create(json!({"labels": {"role": "doomed"}}));
    let paused = d.create(json!({}));
    d.sh(&keep, "echo before > /tmp/state");
    d.call("POST", &format!("/v1/sandboxes/{paused}/pause"), None);
    let doomed_agent = {
        let record: Value = serde_json::from_slice(
            &std::fs::read(
                d.runtime_dir()
                    .join("sandboxes")
                    .join(&doomed)
                    .join("record.json"),
            )
            .unwrap(),
        )
        .unwrap();
        record["pid"].as_i64().unwrap() as i32
    };

    let factory = factory_of(&d).expect("the daemon runs a sandbox factory");
    d.kill();
    // Its sandbox factory leaves with it.
    assert!(
        gone_within(factory, Duration::from_secs(5)),
        "the factory outlived its daemon"
    );
    // While the daemon is down, one sandbox's agent dies.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(doomed_agent),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(100));
    d.spawn();

    let (_, got) = d.call("GET", &format!("/v1/sandboxes/{keep}"), None);
    assert_eq!(got["state"], "running");
    assert_eq!(
        d.sh(&keep, "cat /tmp/state")["stdout"],
        "before\n",
        "the sandbox kept its files"
    );
    let (_, got) = d.call("GET", &format!("/v1/sandboxes/{doomed}"), None);
    assert_eq!(got["state"], "failed");
    assert!(
        got["reason"]
            .as_str()
            .unwrap()
            .contains("exited while the daemon was down"),
        "{got}"
    );
    let (_, got) = d.call("GET", &format!("/v1/sandboxes/{paused}"), None);
    assert_eq!(got["state"], "paused");
    let (s, _) = d.call("POST", &format!("/v1/sandboxes/{paused}/resume"), None);
    assert_eq!(s, 200);
    assert_eq!(d.sh(&paused, "echo thawed")["stdout"], "thawed\n");
    // Nothing of the dead sandbox is left on the host.
    assert!(!d.state_dirs().iter().any(|p| p.ends_with(&doomed)));
    assert!(!d.cgroups().iter().any(|p| p.ends_with(&doomed)));

    // A clean SIGTERM leaves sandboxes running too.
    let status = d.terminate();
    assert!(status.success());
    assert_eq!(d.agents().len(), 2);
    d.spawn();
    assert_eq!(d.sh(&keep, "echo again")["stdout"], "again\n");
    for id in [&keep, &paused] {
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
    }
    d.assert_nothing_left();
}

#[test]
fn a_disconnected_client_leaves_no_process() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    let tag = format!("1000.{}", std::process::id());
    let quick = reqwest::blocking::Client::builder()
        .timeout(Duration::from_millis(500))
        .build()
        .unwrap();
    let result = quick
        .post(format!("{}/v1/sandboxes/{id}/exec", d.url))
        .bearer_auth(&d.admin)
        .json(&json!({"cmd": format!("sleep {tag} & sleep {tag}")}))
        .send();
    assert!(
        result.is_err(),
        "the request should have timed out on the client side"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_has_process_with(&tag) {
        assert!(
            Instant::now() < deadline,
            "the command kept running after its client left"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_metrics_and_openapi() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let id = d.create(json!({}));
    d.sh(&id, "true");
    d.call("GET", "/v1/sandboxes/sbx-00000000", None);
    let health = d.http.get(format!("{}/healthz", d.url)).send().unwrap();
    assert_eq!(health.status(), 200);
    let metrics = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for needle in [
        "cove_sandboxes{state=\"running\"} 1",
        "cove_execs_total 1",
        "cove_exec_duration_seconds_bucket",
        "cove_http_errors_total{code=\"not_found\"} 1",
        "cove_sandbox_creates_total{result=\"ok\"} 1",
    ] {
        assert!(metrics.contains(needle), "missing {needle:?} in\n{metrics}");
    }
    let doc: Value = d
        .http
        .get(format!("{}/openapi.json", d.url))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert!(doc["paths"]["/v1/sandboxes/{id}/exec"]["post"].is_object());
    let resp = d
        .http
        .get(format!("{}/healthz", d.url))
        .header("x-request-id", "trace-me")
        .send()
        .unwrap();
    assert_eq!(resp.headers()["x-request-id"], "trace-me");
}

#[test]
fn fifty_concurrent_clients() {
    if !root() {
        return;
    }
    let d = std::sync::Arc::new(Daemon::start());
    let handles: Vec<_> = (0..50)
        .map(|i| {
            let d = d.clone();
            std::thread::spawn(move || {
                let id = d.create(json!({"labels": {"client": i.to_string()}}));
                for j in 0..3 {
                    let r = d.sh(&id, &format!("echo {i}-{j}"));
                    assert_eq!(r["stdout"], format!("{i}-{j}\n"));
                }
                let (s, _) = d.call("DELETE", &format!("/v1/sandboxes/{id}"), None);
                assert_eq!(s, 204);
            })
        })
        .collect();
    for h in handles {
        h.join().unwrap();
    }
    d.assert_nothing_left();
    let metrics = d
        .http
        .get(format!("{}/metrics", d.url))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        !metrics.contains("cove_http_errors_total{"),
        "errors happened:\n{metrics}"
    );
}

#[test]
fn cli_talks_to_the_daemon() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let cove = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_URL", &d.url)
            .env("COVE_KEY", &d.admin)
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    let out = cove(&["create", "--label", "via=cli"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = cove(&[
        "exec",
        &id,
        "--",
        "sh",
        "-c",
        "echo out; echo err >&2; exit 7",
    ]);
    assert_eq!(out.status.code(), Some(7));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "err\n");
    let out = cove(&["ls"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
    let out = cove(&["ls", "--json", "--label", "via=cli"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 1);
    let out = cove(&["inspect", &id]);
    let got: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(got["labels"]["via"], "cli");
    assert!(cove(&["pause", &id]).status.success());
    let out = cove(&["exec", &id, "--", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("paused"));
    assert!(cove(&["resume", &id]).status.success());
    let out = cove(&[
        "keys",
        "create",
        "--name",
        "ci",
        "--scope",
        "exec,sandboxes:read",
    ]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("cove_"));
    assert!(cove(&["rm", &id]).status.success());
    let out = cove(&["completions", "bash"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("_cove"));
    // A wrong URL is a clear error with code 125.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
        .args(["--url", "http://127.0.0.1:1", "ls"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("is `cove serve` running?"));
}

#[test]
fn a_full_disk_is_a_clear_error_and_loses_nothing() {
    if !root() {
        return;
    }
    // The data directory on a small tmpfs of its own.
    let mnt = tempfile::tempdir().unwrap();
    let status = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(mnt.path())
        .status()
        .unwrap();
    assert!(status.success());
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(mnt.path().to_path_buf());
    let mut d = Daemon::start();
    d.kill();
    let data = mnt.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(d.data_dir()).unwrap().flatten() {
        if entry.path().is_file() {
            std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
        }
    }
    std::fs::remove_dir_all(d.data_dir()).unwrap();
    std::os::unix::fs::symlink(&data, d.data_dir()).unwrap();
    d.spawn();
    let first = d.create(json!({"labels": {"n": "first"}}));

    // Fill the disk.
    let filler = mnt.path().join("filler");
    let _ = std::process::Command::new("dd")
        .args(["if=/dev/zero", "bs=64k"])
        .arg(format!("of={}", filler.display()))
        .stderr(std::process::Stdio::null())
        .status();
    let mut saw_full = false;
    for _ in 0..20 {
        let (s, e) = d.call(
            "POST",
            "/v1/sandboxes",
            Some(json!({"metadata": {"pad": "x".repeat(200_000)}})),
        );
        if s == 507 {
            assert_eq!(e["error"]["code"], "insufficient_storage");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .unwrap()
                    .contains("disk is full"),
                "{e}"
            );
            saw_full = true;
            break;
        }
        assert_eq!(s, 201, "{e}");
    }
    assert!(saw_full, "never ran out of space");
    assert_eq!(
        d.http
            .get(format!("{}/healthz", d.url))
            .send()
            .unwrap()
            .status(),
        200
    );

    // Free the space: everything works again, and nothing written before was lost.
    std::fs::remove_file(&filler).unwrap();
    let second = d.create(json!({}));
    for id in [&first, &second] {
        let (s, got) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
        assert_eq!((s, got["state"].as_str()), (200, Some("running")));
    }
    d.kill();
    d.spawn();
    assert_eq!(d.sh(&first, "echo survived")["stdout"], "survived\n");
}

#[test]
fn the_daemons_environment_does_not_reach_its_sandboxes() {
    if !root() {
        return;
    }
    let secret = format!("s3cr3t-{}", std::process::id());
    let d = Daemon::start_with_env(vec![("COVE_TEST_SECRET".into(), secret.clone())]);
    let id = d.create(json!({}));
    // The agent is forked from the daemon's sandbox factory and keeps that
    // process's environment block: it holds PATH only (and COVE_LOG when
    // the daemon has one), nothing of the daemon's own.
    let agents = d.agents();
    assert!(!agents.is_empty(), "no agent found");
    for pid in agents {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap();
        let vars: Vec<String> = environ
            .split(|b| *b == 0)
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .collect();
        assert!(
            vars.iter()
                .all(|v| v.starts_with("PATH=") || v.starts_with("COVE_LOG=")),
            "agent {pid} has {vars:?}"
        );
    }
    // Nor does a command see it.
    let r = d.sh(&id, "env; cat /proc/1/environ 2>/dev/null | tr '\\0' '\\n'");
    assert!(
        !r["stdout"].as_str().unwrap().contains(&secret),
        "{}",
        r["stdout"]
    );
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
        204
    );
}
