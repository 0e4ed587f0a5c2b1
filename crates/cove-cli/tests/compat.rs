//! The seed platforms' dialects against a real daemon: every example
//! request of each seed document (and of the compatibility notes), checked
//! for status codes, field names, types and values as the seed states
//! them, including the error cases. A dialect's errors never use another
//! dialect's envelope.

#![allow(clippy::unwrap_used)]

mod common;

use common::{Daemon, root};
use serde_json::{Value, json};

/// Send `method path` with `body`, authenticating with `auth` as
/// ("bearer"|"x-api-key"|"none", key). Returns (status, JSON body).
fn send(
    d: &Daemon,
    method: &str,
    path: &str,
    body: Option<Value>,
    auth: (&str, &str),
) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = d.http.request(method, format!("{}{path}", d.url));
    req = match auth {
        ("bearer", key) => req.bearer_auth(key),
        ("x-api-key", key) => req.header("X-API-Key", key),
        _ => req,
    };
    if let Some(body) = body {
        req = req
            .header("Content-Type", "application/json")
            .body(body.to_string());
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn native_envelope(body: &Value) -> bool {
    body["error"]["code"].is_string() && body["error"]["message"].is_string()
}

// ---------------------------------------------------------------- Hyperfleet

#[test]
fn hyperfleet_machines_and_exec() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let hf = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("bearer", &key))
    };

    // Create: pending, with the fields the notes list.
    let (s, m) = hf(
        "POST",
        "/machines",
        Some(
            json!({"name": "web-1", "vcpu_count": 1, "mem_size_mib": 256, "exposed_ports": [8080]}),
        ),
    );
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(m["name"], "web-1");
    assert_eq!(m["status"], "pending");
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(1), Some(256))
    );
    assert_eq!(m["exposed_ports"], json!([8080]));
    assert!(m["created_at"].is_string() && m["updated_at"].is_string());

    // Validation errors.
    for bad in [
        json!({"vcpu_count": 1, "mem_size_mib": 256}),
        json!({"name": "x", "vcpu_count": 0, "mem_size_mib": 256}),
        json!({"name": "x", "vcpu_count": 1, "mem_size_mib": 2}),
        json!({"name": "web-1", "vcpu_count": 1, "mem_size_mib": 256}),
    ] {
        let (s, e) = hf("POST", "/machines", Some(bad.clone()));
        assert_eq!(
            (s, e["error"]["code"].as_str()),
            (400, Some("VALIDATION_ERROR")),
            "{bad}: {e}"
        );
    }

    // Exec before start: 400 BAD_REQUEST, as the seed shows.
    let (s, e) = hf(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["uname", "-a"]})),
    );
    assert_eq!(s, 400);
    assert_eq!(
        e,
        json!({"error": {"code": "BAD_REQUEST", "message": "Machine must be running to execute commands"}})
    );

    let (s, m) = hf("POST", &format!("/machines/{id}/start"), None);
    assert_eq!((s, m["status"].as_str()), (200, Some("running")), "{m}");
    let (s, e) = hf("POST", &format!("/machines/{id}/start"), None);
    assert_eq!(
        (
            s,
            e["error"]["code"].as_str(),
            e["error"]["message"].as_str()
        ),
        (
            400,
            Some("BAD_REQUEST"),
            Some("Cannot start machine in 'running' state")
        )
    );
    let (s, m) = hf(
        "GET",
        &format!("/machines/{id}/wait?status=running&timeout=30"),
        None,
    );
    assert_eq!((s, m["status"].as_str()), (200, Some("running")));

    // The seed's examples, in order.
    let exec = |body: Value| hf("POST", &format!("/machines/{id}/exec"), Some(body));
    let (s, r) = exec(json!({"command": ["ls", "-la", "/"], "timeout": 30}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    assert!(r["stdout"].as_str().unwrap().contains("bin"));
    assert_eq!(
        r.as_object().unwrap().len(),
        3,
        "exactly exit_code, stdout, stderr: {r}"
    );
    let (s, r) = exec(json!({"command": ["uname", "-a"]}));
    assert_eq!(
        (s, r["exit_code"].as_i64(), r["stderr"].as_str()),
        (200, Some(0), Some(""))
    );
    assert!(r["stdout"].as_str().unwrap().starts_with("Linux "));
    let (s, r) = exec(json!({"command": ["cat", "/etc/os-release"]}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    let (s, r) = exec(json!({"command": ["sleep", "5"], "timeout": 10}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    let (s, r) = exec(json!({"command": ["sh", "-c", "echo $HOME && ls -la | head -5"]}));
    assert_eq!(s, 200);
    assert!(r["stdout"].as_str().unwrap().starts_with("/root\n"));
    let (s, r) = exec(json!({"command": ["rc-service", "nginx", "status"]}));
    assert_eq!(
        (s, r["exit_code"].as_i64()),
        (200, Some(127)),
        "a failing command is still a 200: {r}"
    );
    let (s, r) = exec(json!({"command": ["apk", "add", "--no-cache", "nginx"], "timeout": 120}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(127)));
    let (s, r) = exec(json!({"command": ["sh", "-c", "echo 'Hello, World!'"]}));
    assert_eq!((s, r["stdout"].as_str()), (200, Some("Hello, World!\n")));
    let (s, r) = exec(json!({"command": ["invalid-command"]}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(127)));
    assert!(r["stderr"].as_str().unwrap().contains("invalid-command: "));
    assert!(r["stderr"].as_str().unwrap().contains("not found"));
    // `cmd` is an alias; a string command is refused, as the seed warns.
    let (s, r) = exec(json!({"cmd": ["echo", "alias"]}));
    assert_eq!((s, r["stdout"].as_str()), (200, Some("alias\n")));
    let (s, e) = exec(json!({"command": "ls -la /home"}));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("VALIDATION_ERROR"))
    );
    // Timeout: 504 TIMEOUT with the seed's message.
    let (s, e) = exec(json!({"command": ["sleep", "10"], "timeout": 1}));
    assert_eq!(s, 504);
    assert_eq!(
        e,
        json!({"error": {"code": "TIMEOUT", "message": "Command execution timed out after 1 seconds"}})
    );

    // List with filters and paging.
    let (s, list) = hf("GET", "/machines?status=running&limit=50&offset=0", None);
    assert_eq!((s, list["total"].as_u64()), (200, Some(1)));
    assert_eq!(list["machines"][0]["id"], id);
    let (_, list) = hf("GET", "/machines?status=stopped", None);
    assert_eq!(list["total"], 0);

    // Wait that times out.
    let (s, e) = hf(
        "GET",
        &format!("/machines/{id}/wait?status=stopped&timeout=1"),
        None,
    );
    assert_eq!((s, e["error"]["code"].as_str()), (504, Some("TIMEOUT")));
    let (s, e) = hf(
        "GET",
        &format!("/machines/{id}/wait?status=running&timeout=31"),
        None,
    );
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("VALIDATION_ERROR"))
    );

    // Restart, stop, delete.
    let (s, m) = hf("POST", &format!("/machines/{id}/restart"), None);
    assert_eq!((s, m["status"].as_str()), (200, Some("running")));
    let (s, e) = hf("DELETE", &format!("/machines/{id}"), None);
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (400, Some("BAD_REQUEST")),
        "a running machine cannot be deleted"
    );
    let (s, m) = hf("POST", &format!("/machines/{id}/stop"), None);
    assert_eq!((s, m["status"].as_str()), (200, Some("stopped")));
    assert!(
        m.get("error").is_none(),
        "a requested stop is not an error: {m}"
    );
    let (s, e) = hf(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["true"]})),
    );
    assert_eq!((s, e["error"]["code"].as_str()), (400, Some("BAD_REQUEST")));
    let (s, m) = hf("POST", &format!("/machines/{id}/start"), None);
    assert_eq!(
        (s, m["status"].as_str()),
        (200, Some("running")),
        "a stopped machine starts again"
    );
    hf("POST", &format!("/machines/{id}/stop"), None);
    let (s, _) = hf("DELETE", &format!("/machines/{id}"), None);
    assert_eq!(s, 204);
    let (s, e) = hf("GET", &format!("/machines/{id}"), None);
    assert_eq!((s, e["error"]["code"].as_str()), (404, Some("NOT_FOUND")));

    // Auth.
    let (s, e) = send(&d, "GET", "/machines", None, ("none", ""));
    assert_eq!(
        (s, e["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );
    // Malformed JSON stays in Hyperfleet's envelope.
    let resp = d
        .http
        .post(format!("{}/machines", d.url))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body("{oops")
        .send()
        .unwrap();
    assert_eq!(resp.status(), 400);
    let e: Value = resp.json().unwrap();
    assert_eq!(e["error"]["code"], "VALIDATION_ERROR");
}

#[test]
fn hyperfleet_agent_unreachable_is_vsock_error() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let (_, m) = send(
        &d,
        "POST",
        "/machines",
        Some(json!({"name": "m", "vcpu_count": 1, "mem_size_mib": 128})),
        ("bearer", &key),
    );
    let id = m["id"].as_str().unwrap().to_string();
    send(
        &d,
        "POST",
        &format!("/machines/{id}/start"),
        None,
        ("bearer", &key),
    );
    let agent = nix::unistd::Pid::from_raw(d.agents()[0]);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let (s, e) = send(
        &d,
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["true"]})),
        ("bearer", &key),
    );
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert_eq!(s, 502);
    assert_eq!(
        e,
        json!({"error": {"code": "VSOCK_ERROR", "message": "Failed to communicate with VM"}})
    );
}

// ---------------------------------------------------------------------- HopX

#[test]
fn hopx_commands_run() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let id = d.create(json!({}));
    let run = |body: Value| {
        send(
            &d,
            "POST",
            &format!("/hopx/{id}/commands/run"),
            Some(body),
            ("bearer", &key),
        )
    };

    let (s, r) = run(json!({"command": "ls -la /workspace"}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    assert!(r["stdout"].as_str().unwrap().contains("total"));
    assert_eq!(
        r.as_object().unwrap().len(),
        3,
        "exactly stdout, stderr, exit_code: {r}"
    );
    let (s, r) = run(json!({"command": "echo $MY_VAR", "env": {"MY_VAR": "hello"}}));
    assert_eq!((s, r["stdout"].as_str()), (200, Some("hello\n")));
    // env is for this command only.
    let (_, r) = run(json!({"command": "echo ${MY_VAR:-unset}"}));
    assert_eq!(r["stdout"], "unset\n");
    // The default working directory is /workspace.
    let (_, r) = run(json!({"command": "pwd"}));
    assert_eq!(r["stdout"], "/workspace\n");
    // A failed command: 500 carrying the result, as the seed's example.
    let (s, r) = run(json!({"command": "ls -la /nonexistent"}));
    assert_eq!(s, 500);
    assert_eq!(r["exit_code"], 2);
    assert_eq!(r["stdout"], "");
    assert!(r["stderr"].as_str().unwrap().contains("/nonexistent"));
    let (s, r) = run(json!({"command": "pip install requests numpy", "timeout": 120}));
    assert!(
        s == 500 && r["exit_code"].as_i64() != Some(0),
        "no pip or no network: {r}"
    );
    let (s, r) = run(json!({"command": "uname -a && df -h && free -h"}));
    assert_eq!((s, r["exit_code"].as_i64()), (200, Some(0)));
    let (s, r) =
        run(json!({"command": "cat /workspace/data.txt | wc -l", "working_dir": "/workspace"}));
    assert_eq!((s, r["stdout"].as_str()), (200, Some("0\n")));
    let (s, _) = run(
        json!({"command": "git clone https://github.com/user/repo.git && cd repo && git log -1", "working_dir": "/workspace", "timeout": 60}),
    );
    assert_eq!(s, 500, "no network in a default sandbox");
    // The seed's build-and-test example: its project directory does not
    // exist in a fresh sandbox, which is a 400 naming it; once it exists
    // the command runs there (and fails: no npm, or no package.json and
    // no network).
    let build = json!({"command": "npm install && npm test", "working_dir": "/workspace/project", "timeout": 300});
    let (s, e) = run(build.clone());
    assert_eq!(
        (s, e["code"].as_str()),
        (400, Some("INVALID_REQUEST")),
        "{e}"
    );
    assert!(
        e["error"].as_str().unwrap().contains("/workspace/project"),
        "{e}"
    );
    let (s, _) = run(json!({"command": "mkdir -p /workspace/project"}));
    assert_eq!(s, 200);
    let (s, r) = run(build);
    assert_eq!(s, 500, "{r}");
    assert!(r["exit_code"].as_i64().is_some_and(|c| c != 0), "{r}");
    let (s, r) = run(json!({"command": "pwd", "working_dir": "/workspace/project"}));
    assert_eq!(
        (s, r["stdout"].as_str()),
        (200, Some("/workspace/project\n"))
    );
    let (s, _) = run(
        json!({"command": "mkdir -p /workspace/output && python process.py && mv result.csv /workspace/output/", "working_dir": "/workspace"}),
    );
    assert_eq!(s, 500);
    let (s, r) = run(json!({"command": "sleep 10", "timeout": 1}));
    assert_eq!((s, r["exit_code"].as_i64()), (408, Some(124)));
    let (s, e) = run(json!({}));
    assert_eq!(s, 400);
    assert!(e["error"].is_string() && !native_envelope(&e), "{e}");
    let (s, e) = send(
        &d,
        "POST",
        &format!("/hopx/{id}/commands/run"),
        Some(json!({"command": "true"})),
        ("none", ""),
    );
    assert_eq!(s, 401);
    assert!(e["error"].is_string() && !native_envelope(&e));
    let (s, _) = send(
        &d,
        "POST",
        "/hopx/sbx-00000000/commands/run",
        Some(json!({"command": "true"})),
        ("bearer", &key),
    );
    assert_eq!(s, 404);
}

// ---------------------------------------------------------------------- GBOX

#[test]
fn gbox_boxes_and_commands() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let gb = |method: &str, path: &str, body: Option<Value>| {
        send(
            &d,
            method,
            &format!("/api/v1{path}"),
            body,
            ("bearer", &key),
        )
    };

    let (s, b) = gb(
        "POST",
        "/boxes/linux",
        Some(
            json!({"config": {"labels": {"project": "web-automation", "environment": "testing"}, "envs": {"DEBUG": "true", "API_URL": "https://api.example.com"}, "expiresIn": "60m"}}),
        ),
    );
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(
        (b["status"].as_str(), b["type"].as_str()),
        (Some("running"), Some("linux"))
    );
    for field in ["createdAt", "updatedAt", "expiresAt"] {
        assert!(b[field].is_string(), "{field} in {b}");
    }
    assert_eq!(b["config"]["labels"]["project"], "web-automation");
    assert_eq!(b["config"]["envs"]["DEBUG"], "true");
    assert_eq!(b["config"]["workingDir"], "/home/user");

    // The seed's examples.
    let cmd = |body: Value| gb("POST", &format!("/boxes/{id}/commands"), Some(body));
    let (s, r) = cmd(json!({"command": "ls -l"}));
    assert_eq!((s, r["exitCode"].as_i64()), (200, Some(0)));
    assert!(r["stdout"].is_string() && r["stderr"].is_string());
    let (s, r) = cmd(json!({"command": "sleep 10", "timeout": "5s"}));
    assert_eq!(
        (s, r["exitCode"].as_i64()),
        (200, Some(124)),
        "a timed-out command exits 124: {r}"
    );
    // envs, workingDir (default: the box's), and the box's own envs.
    let (_, r) =
        cmd(json!({"command": "echo $DEBUG $NODE_ENV; pwd", "envs": {"NODE_ENV": "production"}}));
    assert_eq!(r["stdout"], "true production\n/home/user\n");
    let (_, r) = cmd(json!({"command": "pwd", "workingDir": "/tmp"}));
    assert_eq!(r["stdout"], "/tmp\n");
    for t in ["500ms", "30s", "5m", "1h"] {
        let (s, _) = cmd(json!({"command": "true", "timeout": t}));
        assert_eq!(s, 200, "{t}");
    }
    // Malformed durations: 400 naming the value, in NestJS's shape.
    let (s, e) = cmd(json!({"command": "true", "timeout": "5 seconds"}));
    assert_eq!(s, 400);
    assert_eq!(
        (e["statusCode"].as_u64(), e["error"].as_str()),
        (Some(400), Some("Bad Request"))
    );
    assert!(e["message"].as_str().unwrap().contains("5 seconds"), "{e}");
    let (s, e) = cmd(json!({}));
    assert_eq!((s, e["statusCode"].as_u64()), (400, Some(400)));

    // List, with the default status filter and labels.
    let (s, list) = gb("GET", "/boxes", None);
    assert_eq!(s, 200);
    assert_eq!(
        (
            list["total"].as_u64(),
            list["page"].as_u64(),
            list["pageSize"].as_u64()
        ),
        (Some(1), Some(1), Some(10))
    );
    assert_eq!(list["data"][0]["id"], id);
    let (_, list) = gb("GET", "/boxes?labels=project=other", None);
    assert_eq!(list["total"], 0);
    let (_, got) = gb("GET", &format!("/boxes/{id}"), None);
    assert_eq!(got["id"], id);

    // A box paused through the native API shows as running, and a command
    // resumes it.
    d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None);
    let (_, got) = gb("GET", &format!("/boxes/{id}"), None);
    assert_eq!(got["status"], "running");
    let (s, out) = cmd(json!({"command": "echo awake"}));
    assert_eq!((s, out["stdout"].as_str()), (200, Some("awake\n")), "{out}");
    let (_, native) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(native["state"], "running");

    // Stop, start, terminate, delete.
    let (s, b) = gb("POST", &format!("/boxes/{id}/stop"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("stopped")));
    let (s, _) = cmd(json!({"command": "true"}));
    assert_eq!(s, 400);
    let (_, list) = gb("GET", "/boxes", None);
    assert_eq!(list["total"], 0, "stopped boxes are not listed by default");
    let (_, list) = gb("GET", "/boxes?status=all", None);
    assert_eq!(list["total"], 1);
    let (s, b) = gb("POST", &format!("/boxes/{id}/start"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("running")));
    let (s, b) = gb("POST", &format!("/boxes/{id}/terminate"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("terminated")));
    let (s, _) = gb("POST", &format!("/boxes/{id}/start"), None);
    assert_eq!(s, 400, "a terminated box does not start again");
    let (s, _) = gb("DELETE", &format!("/boxes/{id}"), None);
    assert_eq!(s, 204);
    let (s, e) = gb("GET", &format!("/boxes/{id}"), None);
    assert_eq!(
        (s, e["statusCode"].as_u64(), e["error"].as_str()),
        (404, Some(404), Some("Not Found"))
    );

    // Create without waiting; create with a bad duration.
    let (s, b) = gb("POST", "/boxes/linux", Some(json!({"wait": false})));
    assert_eq!(s, 201);
    assert!(b["status"] == "pending" || b["status"] == "running", "{b}");
    let (s, e) = gb("POST", "/boxes/linux", Some(json!({"timeout": "forever"})));
    assert_eq!(s, 400);
    assert!(e["message"].as_str().unwrap().contains("forever"));
    let (s, e) = send(&d, "GET", "/api/v1/boxes", None, ("none", ""));
    assert_eq!((s, e["statusCode"].as_u64()), (401, Some(401)));
    assert!(!native_envelope(&e));
}

// -------------------------------------------------------------------- Declaw

#[test]
fn declaw_sandboxes_and_commands() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let dc = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("x-api-key", &key))
    };

    let (s, sbx) = dc(
        "POST",
        "/sandboxes",
        Some(
            json!({"template": "base", "timeout": 300, "envs": {"TEAM": "ml"}, "metadata": {"user": "alice"}}),
        ),
    );
    assert_eq!(s, 201, "{sbx}");
    let id = sbx["sandbox_id"].as_str().unwrap().to_string();
    assert!(id.starts_with("sbx-") && id.len() == 12);
    assert_eq!(sbx["state"], "running");
    for field in ["template_id", "started_at"] {
        assert!(sbx[field].is_string(), "{field}: {sbx}");
    }
    let (s, got) = dc("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(s, 200);
    assert_eq!(
        (got["metadata"]["user"].as_str(), got["timeout"].as_f64()),
        (Some("alice"), Some(300.0))
    );
    assert!(got["resources"]["vcpus"].is_number() && got["end_at"].is_string());
    let (s, list) = dc("GET", "/sandboxes", None);
    assert_eq!(s, 200);
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 1);
    assert!(list.get("next_token").is_some());

    // The seed's foreground example, exactly.
    let cmd = |body: Value| dc("POST", &format!("/sandboxes/{id}/commands"), Some(body));
    let (s, r) = cmd(json!({"cmd": "echo hello"}));
    assert_eq!(s, 200);
    assert_eq!(
        r,
        json!({"stdout": "hello\n", "stderr": "", "exit_code": 0})
    );
    // envs merged over the sandbox's, cwd defaulting to /home/user, timeout 0 = none.
    let (_, r) =
        cmd(json!({"cmd": "echo $TEAM $DEBUG; pwd", "envs": {"DEBUG": "1"}, "timeout": 0}));
    assert_eq!(r["stdout"], "ml 1\n/home/user\n");
    let (_, r) = cmd(json!({"cmd": "pwd; id -u", "cwd": "/tmp", "user": "nobody"}));
    assert_eq!(r["stdout"], "/tmp\n65534\n");
    let (_, r) = cmd(json!({"cmd": "sleep 5", "timeout": 1}));
    assert_eq!(r["exit_code"], 124);

    // The seed's background example, then wait and kill.
    let (s, bg) = cmd(json!({"cmd": "sleep 30", "background": true}));
    assert_eq!(s, 200);
    let pid = bg["pid"].as_u64().unwrap();
    let (s, k) = dc("DELETE", &format!("/sandboxes/{id}/commands/{pid}"), None);
    assert_eq!((s, k["killed"].as_bool()), (200, Some(true)));
    let (s, w) = dc("GET", &format!("/sandboxes/{id}/commands/{pid}/wait"), None);
    assert_eq!((s, w["exit_code"].as_i64()), (200, Some(137)));
    let (_, k) = dc("DELETE", &format!("/sandboxes/{id}/commands/{pid}"), None);
    assert_eq!(k["killed"], false, "already gone");
    let (s, w) = dc(
        "GET",
        &format!("/sandboxes/{id}/commands/999999/wait"),
        None,
    );
    assert_eq!((s, w["exit_code"].as_i64()), (200, Some(1)));
    assert!(w["stderr"].as_str().unwrap().contains("process not found"));
    let (s, e) = dc("GET", &format!("/sandboxes/{id}/commands/abc/wait"), None);
    assert_eq!(s, 400);
    assert!(e["message"].is_string() && !native_envelope(&e));

    // stdin: true reserves a pipe for send-stdin.
    let (_, bg) = cmd(json!({"cmd": "head -n 1", "background": true, "stdin": true}));
    let pid = bg["pid"].as_u64().unwrap();
    let (s, r) = dc(
        "POST",
        &format!("/sandboxes/{id}/commands/{pid}/stdin"),
        Some(json!({"data": "yes\n"})),
    );
    assert_eq!((s, r), (200, json!({})));
    let (_, w) = dc("GET", &format!("/sandboxes/{id}/commands/{pid}/wait"), None);
    assert_eq!(
        (w["stdout"].as_str(), w["exit_code"].as_i64()),
        (Some("yes\n"), Some(0))
    );

    // run-stream: stdout events, then exit.
    let resp = d
        .http
        .post(format!("{}/sandboxes/{id}/commands/stream", d.url))
        .header("X-API-Key", &key)
        .json(&json!({"cmd": "for i in 1 2 3; do echo $i; sleep 0.5; done"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let body = resp.text().unwrap();
    let datas: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    let out: String = datas
        .iter()
        .filter(|v| v["stream"] == "stdout")
        .map(|v| v["data"].as_str().unwrap())
        .collect();
    assert_eq!(out, "1\n2\n3\n");
    assert_eq!(datas.last().unwrap()["exit_code"], 0);
    assert!(body.contains("event: stdout") && body.contains("event: exit"));

    // Errors: 400, 401, 404, 409 paused, 410 killed, each with a message.
    let (s, e) = cmd(json!({}));
    assert_eq!(s, 400);
    assert!(e["message"].is_string() && !native_envelope(&e));
    let (s, e) = send(
        &d,
        "POST",
        &format!("/sandboxes/{id}/commands"),
        Some(json!({"cmd": "true"})),
        ("none", ""),
    );
    assert_eq!(s, 401);
    assert!(e["message"].is_string());
    let (s, e) = dc(
        "POST",
        "/sandboxes/sbx-00000000/commands",
        Some(json!({"cmd": "true"})),
    );
    assert_eq!(s, 404);
    assert!(e["message"].is_string());
    let (s, p) = dc("POST", &format!("/sandboxes/{id}/pause"), None);
    assert_eq!((s, p["state"].as_str()), (200, Some("paused")));
    let (s, e) = cmd(json!({"cmd": "true"}));
    assert_eq!(s, 409);
    assert!(e["message"].as_str().unwrap().contains("paused"));
    let (s, p) = dc("POST", &format!("/sandboxes/{id}/resume"), None);
    assert_eq!((s, p["state"].as_str()), (200, Some("running")));
    let (s, _) = dc("DELETE", &format!("/sandboxes/{id}"), None);
    assert_eq!(s, 204);
    let (s, e) = cmd(json!({"cmd": "true"}));
    assert_eq!(s, 410);
    assert!(e["message"].is_string() && !native_envelope(&e));
    // A bearer token works too.
    let (s, _) = send(&d, "GET", "/sandboxes", None, ("bearer", &key));
    assert_eq!(s, 200);
}

#[test]
fn declaw_lifecycle_pause_on_timeout_and_auto_resume() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let dc = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("x-api-key", &key))
    };
    let (_, sbx) = dc(
        "POST",
        "/sandboxes",
        Some(json!({"timeout": 1, "lifecycle": {"on_timeout": "pause", "auto_resume": true}})),
    );
    let id = sbx["sandbox_id"].as_str().unwrap().to_string();
    let (s, _) = d.call(
        "GET",
        &format!("/v1/sandboxes/{id}/wait?state=paused&timeout=20s"),
        None,
    );
    assert_eq!(s, 200);
    let (_, got) = dc("GET", &format!("/sandboxes/{id}"), None);
    assert_eq!(
        got["state"], "paused",
        "the timeout paused it instead of killing it"
    );
    // auto_resume: a command wakes it.
    let (s, r) = dc(
        "POST",
        &format!("/sandboxes/{id}/commands"),
        Some(json!({"cmd": "echo awake"})),
    );
    assert_eq!((s, r["stdout"].as_str()), (200, Some("awake\n")));
    let (s, e) = dc(
        "POST",
        "/sandboxes",
        Some(json!({"lifecycle": {"on_timeout": "explode"}})),
    );
    assert_eq!(s, 400);
    assert!(e["message"].as_str().unwrap().contains("on_timeout"));
}

// ------------------------------------------------- requests that fit no route

/// Send `body` as it is (not JSON-encoded) with the admin key.
fn send_raw(d: &Daemon, method: &str, path: &str, body: &str) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let resp = d
        .http
        .request(method, format!("{}{path}", d.url))
        .bearer_auth(&d.admin)
        .header("X-API-Key", &d.admin)
        .header("Content-Type", "application/json")
        .body(body.to_string())
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().unwrap();
    let value = serde_json::from_str(&text)
        .unwrap_or_else(|_| panic!("{path}: the body is not JSON: {text:?}"));
    (status, value)
}

#[test]
fn unknown_routes_wrong_methods_and_bad_json_answer_in_each_dialect() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    // Which dialect's envelope a body is; the codes tell Hyperfleet's
    // (upper case) from the native one (snake case).
    let shape = |b: &Value| -> &'static str {
        let obj = b.as_object().unwrap();
        if b["statusCode"].is_u64() && b["message"].is_string() && b["error"].is_string() {
            "gbox"
        } else if b["error"].is_string() && b["code"].is_string() && obj.len() == 2 {
            "hopx"
        } else if b["message"].is_string() && obj.len() == 1 {
            "declaw"
        } else if native_envelope(b) {
            let code = b["error"]["code"].as_str().unwrap();
            if code.chars().all(|c| c.is_ascii_uppercase() || c == '_') {
                "hyperfleet"
            } else {
                "native"
            }
        } else {
            "unknown"
        }
    };
    let cases = [
        // An unknown path under each base.
        ("GET", "/machines/m-1/bogus", "", 404, "hyperfleet"),
        ("GET", "/hopx/sbx-x/bogus", "", 404, "hopx"),
        ("GET", "/api/v1/bogus", "", 404, "gbox"),
        ("GET", "/sandboxes/sbx-x/bogus", "", 404, "declaw"),
        ("GET", "/v1/bogus", "", 404, "native"),
        // A known path with a method it does not take.
        ("PUT", "/machines", "", 405, "hyperfleet"),
        ("GET", "/hopx/sbx-x/commands/run", "", 405, "hopx"),
        ("PATCH", "/api/v1/boxes", "", 405, "gbox"),
        ("GET", "/sandboxes/sbx-x/commands", "", 405, "declaw"),
        ("PUT", "/v1/sandboxes", "", 405, "native"),
        // A body that is not JSON, on each dialect's exec call.
        ("POST", "/machines/m-1/exec", "{not json", 400, "hyperfleet"),
        ("POST", "/hopx/sbx-x/commands/run", "{not json", 400, "hopx"),
        (
            "POST",
            "/api/v1/boxes/b-1/commands",
            "{not json",
            400,
            "gbox",
        ),
        (
            "POST",
            "/sandboxes/sbx-x/commands",
            "{not json",
            400,
            "declaw",
        ),
        (
            "POST",
            "/v1/sandboxes/sbx-x/exec",
            "{not json",
            400,
            "native",
        ),
    ];
    for (method, path, body, status, dialect) in cases {
        let (s, b) = send_raw(&d, method, path, body);
        assert_eq!(s, status, "{method} {path}: {b}");
        assert_eq!(shape(&b), dialect, "{method} {path}: {b}");
        let text = b.to_string();
        assert!(!text.contains("panicked"), "{method} {path}: {b}");
    }
    // The codes a client matches on.
    let (_, b) = send_raw(&d, "GET", "/hopx/sbx-x/commands/run", "");
    assert_eq!(b["code"], "METHOD_NOT_ALLOWED");
    let (_, b) = send_raw(&d, "GET", "/machines/m-1/bogus", "");
    assert_eq!(b["error"]["code"], "NOT_FOUND");
    let (_, b) = send_raw(&d, "PATCH", "/api/v1/boxes", "");
    assert_eq!(b["statusCode"], 405);
}

// ------------------------------------------- paging, expiry and other details

#[test]
fn paging_expiry_stderr_streams_and_unreachable_agents() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let call = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("x-api-key", &key))
    };

    // Hyperfleet: a machine as GET returns it; limit/offset pages.
    let mut machines = Vec::new();
    for n in 0..3 {
        let (s, m) = call(
            "POST",
            "/machines",
            Some(json!({"name": format!("page-{n}"), "vcpu_count": 1, "mem_size_mib": 128})),
        );
        assert_eq!(s, 201, "{m}");
        machines.push(m["id"].as_str().unwrap().to_string());
    }
    let (s, m) = call("GET", &format!("/machines/{}", machines[1]), None);
    assert_eq!((s, m["name"].as_str()), (200, Some("page-1")), "{m}");
    assert_eq!(m["id"], machines[1].as_str());
    assert!(
        m["status"].is_string() && m["created_at"].is_string(),
        "{m}"
    );
    let mut seen = Vec::new();
    for offset in [0, 2] {
        let (s, page) = call("GET", &format!("/machines?limit=2&offset={offset}"), None);
        assert_eq!((s, page["total"].as_u64()), (200, Some(3)), "{page}");
        for m in page["machines"].as_array().unwrap() {
            seen.push(m["id"].as_str().unwrap().to_string());
        }
    }
    seen.sort();
    let mut want = machines.clone();
    want.sort();
    assert_eq!(seen, want, "two pages hold each machine once");

    // GBOX: a box's own workingDir; expiresIn running out stops the box.
    let (s, b) = call(
        "POST",
        "/api/v1/boxes/linux",
        Some(json!({"config": {"workingDir": "/tmp", "expiresIn": "2s"}})),
    );
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    assert_eq!(b["config"]["workingDir"], "/tmp");
    let (s, r) = call(
        "POST",
        &format!("/api/v1/boxes/{id}/commands"),
        Some(json!({"command": "pwd"})),
    );
    assert_eq!((s, r["stdout"].as_str()), (200, Some("/tmp\n")), "{r}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let (_, b) = call("GET", &format!("/api/v1/boxes/{id}"), None);
        if b["status"] == "stopped" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "not stopped: {b}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }

    // Declaw: next_token pages through every sandbox once.
    let mut sandboxes = Vec::new();
    for _ in 0..3 {
        let (s, sbx) = call("POST", "/sandboxes", Some(json!({"timeout": 300})));
        assert_eq!(s, 201, "{sbx}");
        sandboxes.push(sbx["sandbox_id"].as_str().unwrap().to_string());
    }
    let mut seen = Vec::new();
    let mut token = String::new();
    for _ in 0..10 {
        let (s, page) = call(
            "GET",
            &format!("/sandboxes?limit=2&next_token={token}"),
            None,
        );
        assert_eq!(s, 200, "{page}");
        let items = page["sandboxes"].as_array().unwrap();
        assert!(items.len() <= 2, "{page}");
        seen.extend(
            items
                .iter()
                .map(|s| s["sandbox_id"].as_str().unwrap().to_string()),
        );
        match page["next_token"].as_str() {
            Some(t) if !t.is_empty() => token = t.to_string(),
            _ => break,
        }
    }
    for id in &sandboxes {
        assert_eq!(
            seen.iter().filter(|s| *s == id).count(),
            1,
            "{id} in {seen:?}"
        );
    }

    // Declaw's run-stream carries stderr as its own events.
    let sbx = &sandboxes[0];
    let resp = d
        .http
        .post(format!("{}/sandboxes/{sbx}/commands/stream", d.url))
        .header("X-API-Key", &key)
        .json(&json!({"cmd": "echo out; echo err >&2; exit 2"}))
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.text().unwrap();
    let events: Vec<Value> = body
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let of = |stream: &str| -> String {
        events
            .iter()
            .filter(|v| v["stream"] == stream)
            .map(|v| v["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(
        (of("stdout"), of("stderr")),
        ("out\n".into(), "err\n".into()),
        "{body}"
    );
    assert!(body.contains("event: stderr"), "{body}");
    assert_eq!(events.last().unwrap()["exit_code"], 2, "{body}");

    // Declaw: an agent that does not answer is a 502 with a message.
    let agents_before = d.agents();
    let (s, _) = call(
        "POST",
        &format!("/sandboxes/{sbx}/commands"),
        Some(json!({"cmd": "true"})),
    );
    assert_eq!(s, 200);
    let stopped: Vec<_> = agents_before
        .iter()
        .map(|&pid| nix::unistd::Pid::from_raw(pid))
        .collect();
    for &pid in &stopped {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    }
    let (s, e) = call(
        "POST",
        &format!("/sandboxes/{sbx}/commands"),
        Some(json!({"cmd": "true"})),
    );
    for &pid in &stopped {
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    }
    assert_eq!(s, 502, "{e}");
    assert!(e["message"].is_string() && !native_envelope(&e), "{e}");
}

// ------------------------------------------------- faults found by probing

/// GBOX: a refused create leaves no box; a box whose sandbox never ran can
/// still be deleted; sizes that do not fit are refused at create; a
/// working directory the template lacks is made; absurd pages are empty;
/// concurrent starts of one box never answer 500.
#[test]
fn gbox_refused_creates_sizes_working_dirs_and_racing_starts() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let gb = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("bearer", &key))
    };
    let all = || {
        let (s, list) = gb("GET", "/api/v1/boxes?status=all&pageSize=100", None);
        assert_eq!(s, 200, "{list}");
        list["total"].as_u64().unwrap()
    };
    let before = all();
    for config in [
        json!({"memory": 1}),
        json!({"memory": 1.5}),
        json!({"memory": 17_592_186_044_416u64}),
        json!({"storage": 17_179_869_184u64}),
        json!({"cpu": 1000000}),
        json!({"envs": {"A=B": "c"}}),
    ] {
        let (s, e) = gb(
            "POST",
            "/api/v1/boxes/linux",
            Some(json!({ "config": config })),
        );
        assert_eq!(s, 400, "{config}: {e}");
        assert!(e["message"].is_string(), "{e}");
    }
    assert_eq!(all(), before, "a refused create left a box");

    // The working directory is made when the template lacks it.
    let (s, b) = gb(
        "POST",
        "/api/v1/boxes/linux",
        Some(json!({"config": {"workingDir": "/home/user/projects"}})),
    );
    assert_eq!(s, 201, "{b}");
    let id = b["id"].as_str().unwrap().to_string();
    let (s, r) = gb(
        "POST",
        &format!("/api/v1/boxes/{id}/commands"),
        Some(json!({"command": "pwd"})),
    );
    assert_eq!(
        (s, r["stdout"].as_str()),
        (200, Some("/home/user/projects\n")),
        "{r}"
    );

    // Starts racing each other: one wins, the others are told so (4xx).
    assert_eq!(gb("POST", &format!("/api/v1/boxes/{id}/stop"), None).0, 200);
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..5)
            .map(|_| scope.spawn(|| gb("POST", &format!("/api/v1/boxes/{id}/start"), None).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s < 500), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");
    let (s, b) = gb("GET", &format!("/api/v1/boxes/{id}"), None);
    assert_eq!((s, b["status"].as_str()), (200, Some("running")), "{b}");

    // Pages past the end (even absurd ones) are empty, not wrapped round.
    let (s, page) = gb(
        "GET",
        "/api/v1/boxes?status=all&page=18446744073709551615&pageSize=18446744073709551615",
        None,
    );
    assert_eq!(
        (s, page["data"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{page}"
    );

    assert_eq!(gb("DELETE", &format!("/api/v1/boxes/{id}"), None).0, 204);
    assert_eq!(all(), before);
    d.assert_nothing_left();
}

/// Hyperfleet: a memory size cove cannot honour is refused at create,
/// concurrent starts never answer 500, a timeout under a millisecond still
/// times out, and a machine stopped under a running exec answers as
/// stopped, not as an unreachable agent.
#[test]
fn hyperfleet_sizes_racing_starts_tiny_timeouts_and_stops_mid_exec() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let hf = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("bearer", &key))
    };
    for mem in [json!(4), json!(17_592_186_044_416u64)] {
        let (s, e) = hf(
            "POST",
            "/machines",
            Some(json!({"name": format!("m{mem}"), "mem_size_mib": mem})),
        );
        assert_eq!(s, 400, "{mem}: {e}");
    }
    let (s, m) = hf("POST", "/machines", Some(json!({"name": "race"})));
    assert_eq!(s, 201, "{m}");
    let id = m["id"].as_str().unwrap().to_string();
    let statuses: Vec<u16> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..5)
            .map(|_| scope.spawn(|| hf("POST", &format!("/machines/{id}/start"), None).0))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().all(|s| *s < 500), "{statuses:?}");
    assert!(statuses.contains(&200), "{statuses:?}");

    let (s, r) = hf(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["sleep", "2"], "timeout": 0.0001})),
    );
    assert_eq!(s, 504, "a 0.1 ms timeout was taken for none: {r}");

    // Stopped while a command runs: the exec says the machine stopped.
    let stopper = std::thread::scope(|scope| {
        let exec = scope.spawn(|| {
            hf(
                "POST",
                &format!("/machines/{id}/exec"),
                Some(json!({"command": ["sleep", "30"]})),
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(hf("POST", &format!("/machines/{id}/stop"), None).0, 200);
        exec.join().unwrap()
    });
    assert_ne!(stopper.0, 502, "{stopper:?}");
    assert_eq!(hf("DELETE", &format!("/machines/{id}"), None).0, 204);
    d.assert_nothing_left();
}

/// Declaw: a run-stream whose client goes away ends its command; wrong
/// types are 400; a sandbox killed under a command answers 410; pages
/// hold `limit` live sandboxes even with killed ones among them.
#[test]
fn declaw_stream_disconnects_types_kills_and_pages() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let key = d.admin.clone();
    let dc = |method: &str, path: &str, body: Option<Value>| {
        send(&d, method, path, body, ("x-api-key", &key))
    };
    let new_sandbox = || {
        let (s, sb) = dc("POST", "/sandboxes", Some(json!({})));
        assert_eq!(s, 201, "{sb}");
        sb["sandbox_id"].as_str().unwrap().to_string()
    };
    let id = new_sandbox();

    // A run-stream dropped by its client ends its command, even a silent one.
    let tag = format!("777.{}", std::process::id());
    let resp = d
        .http
        .post(format!("{}/sandboxes/{id}/commands/stream", d.url))
        .header("X-API-Key", &key)
        .header("Content-Type", "application/json")
        .body(json!({ "cmd": format!("sleep {tag}") }).to_string())
        .send()
        .unwrap();
    assert_eq!(resp.status(), 200);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(common::host_has_process_with(&tag));
    drop(resp);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while common::host_has_process_with(&tag) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !common::host_has_process_with(&tag),
        "the command outlived its stream"
    );

    // Wrong types are refused, not taken for false.
    for body in [
        json!({"cmd": "ls", "background": "true"}),
        json!({"cmd": "ls", "background": 1}),
    ] {
        let (s, e) = dc(
            "POST",
            &format!("/sandboxes/{id}/commands"),
            Some(body.clone()),
        );
        assert_eq!(s, 400, "{body}: {e}");
    }
    let (s, e) = dc("POST", "/sandboxes", Some(json!([])));
    assert_eq!(s, 400, "{e}");

    // Killed under a running command: 410, as for any route of a killed sandbox.
    let (s, r) = std::thread::scope(|scope| {
        let exec = scope.spawn(|| {
            dc(
                "POST",
                &format!("/sandboxes/{id}/commands"),
                Some(json!({"cmd": "sleep 30"})),
            )
        });
        std::thread::sleep(std::time::Duration::from_millis(500));
        assert_eq!(dc("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
        exec.join().unwrap()
    });
    assert_eq!(s, 410, "{r}");

    // Pages of live sandboxes, with killed ones among them.
    let ids: Vec<String> = (0..4).map(|_| new_sandbox()).collect();
    assert_eq!(dc("DELETE", &format!("/sandboxes/{}", ids[1]), None).0, 204);
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let (s, page) = dc(
            "GET",
            &format!("/sandboxes?limit=1&next_token={token}"),
            None,
        );
        assert_eq!(s, 200, "{page}");
        let items = page["sandboxes"].as_array().unwrap();
        match page["next_token"].as_str() {
            Some(next) => {
                assert_eq!(items.len(), 1, "a short page before the end: {page}");
                token = next.to_string();
            }
            None => {
                seen.extend(
                    items
                        .iter()
                        .map(|s| s["sandbox_id"].as_str().unwrap().to_string()),
                );
                break;
            }
        }
        seen.extend(
            items
                .iter()
                .map(|s| s["sandbox_id"].as_str().unwrap().to_string()),
        );
    }
    assert_eq!(seen, vec![ids[0].clone(), ids[2].clone(), ids[3].clone()]);
    for id in [&ids[0], &ids[2], &ids[3]] {
        assert_eq!(dc("DELETE", &format!("/sandboxes/{id}"), None).0, 204);
    }
    d.assert_nothing_left();
}
