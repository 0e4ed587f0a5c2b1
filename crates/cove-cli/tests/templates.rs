//! Templates end to end: images built here (from busybox) imported through
//! the API and the CLI, run in real sandboxes with their config (Env,
//! WorkingDir, User, Entrypoint, Cmd); pulled from a local registry;
//! snapshots of running sandboxes; and the errors of each.

#![allow(clippy::unwrap_used)]

mod common;
#[path = "../../cove-template/tests/common/mod.rs"]
mod images;

use std::process::{Command, Stdio};

use common::{Daemon, root};
use images::Entry;
use serde_json::{Value, json};

/// busybox, a hard link, an xattr, files the top layer deletes or hides.
fn base_layer() -> Vec<u8> {
    images::busybox_layer(&[
        Entry::Dir("data/"),
        Entry::FileX("data/tagged", b"tagged", &[("user.cove.test", b"kept")]),
        Entry::File("data/original", b"linked twice", 0o644),
        Entry::HardLink("data/link", "data/original"),
        Entry::File("etc/motd", b"deleted above", 0o644),
        Entry::Dir("var/"),
        Entry::Dir("var/cache/"),
        Entry::File("var/cache/old", b"hidden above", 0o644),
        Entry::Dir("workspace/"),
        Entry::Dir("tmp/"),
    ])
}

fn top_layer() -> Vec<u8> {
    images::layer(&[
        Entry::Dir("etc/"),
        Entry::File("etc/.wh.motd", b"", 0o644),
        Entry::Dir("var/"),
        Entry::Dir("var/cache/"),
        Entry::File("var/cache/.wh..wh..opq", b"", 0o644),
        Entry::File("var/cache/new", b"from the top layer", 0o644),
    ])
}

fn out(r: &Value) -> String {
    assert_eq!(r["exit_code"], 0, "{r}");
    r["stdout"].as_str().unwrap().to_string()
}

/// Import an image through the API; returns the template.
fn import(d: &Daemon, name: &str, source: &std::path::Path) -> (u16, Value) {
    d.call(
        "POST",
        "/v1/templates",
        Some(json!({"name": name, "source": source})),
    )
}

/// What a sandbox of the test image shows.
fn check_sandbox(d: &Daemon, id: &str) {
    // The image's config: WorkingDir, User, Env.
    assert_eq!(
        out(&d.sh(id, "pwd; id -u; echo $GREETING")),
        "/home/app\n1234\nhello from the image\n"
    );
    // Whiteout and opaque directory honoured, hard link kept.
    let r = d.sh(id, "cat /etc/motd");
    assert_ne!(r["exit_code"], 0, "{r}");
    assert_eq!(out(&d.sh(id, "ls /var/cache")), "new\n");
    assert_eq!(out(&d.sh(id, "stat -c %h /data/link")), "2\n");
    assert_eq!(out(&d.sh(id, "cat /data/link")), "linked twice");
}

#[test]
fn images_are_imported_run_and_removed() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let (base, top) = (base_layer(), top_layer());
    let layout = work.path().join("layout");
    images::oci_layout(
        &layout,
        &[base.clone(), top.clone()],
        images::run_settings(),
    );

    let (status, t) = import(&d, "app", &layout);
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["kind"], "image");
    assert_eq!(t["layers"].as_array().unwrap().len(), 2);
    assert_eq!(t["entrypoint"], json!(["/bin/echo", "entry:"]));
    assert_eq!(t["cmd"], json!(["default", "args"]));
    let (status, got) = d.call("GET", "/v1/templates/app", None);
    assert_eq!((status, &got), (200, &t));

    let id = d.create(json!({"template": "app"}));
    check_sandbox(&d, &id);

    // The same image as a docker archive: the same layers.
    let archive = work.path().join("app.tar");
    images::docker_archive(
        &archive,
        &[base.clone(), top.clone()],
        images::run_settings(),
    );
    let (status, t2) = import(&d, "app-docker", &archive);
    assert_eq!(status, 201, "{t2}");
    assert_eq!(t2["layers"], t["layers"]);
    let layer_dirs = std::fs::read_dir(d.data_dir().join("templates/layers/sha256"))
        .unwrap()
        .count();
    assert_eq!(layer_dirs, 2, "layers are stored once");

    // `cove run --entrypoint`: ENTRYPOINT + CMD, or ENTRYPOINT + arguments.
    let run = |args: &[&str]| {
        let tmp = tempfile::tempdir().unwrap();
        Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_DATA_DIR", d.data_dir())
            .env("COVE_RUNTIME_DIR", tmp.path())
            .env("COVE_CGROUP_PARENT", &d.cgroup_parent)
            .args(["run", "--template", "app-docker", "--entrypoint"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = run(&[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout), "entry: default args\n");
    let o = run(&["--", "given"]);
    assert_eq!(String::from_utf8_lossy(&o.stdout), "entry: given\n");

    // Bad input: a corrupt layer blob is a 400 naming the layer, and
    // leaves no template.
    // (A layer not stored yet: a stored one is not read again.)
    let unique = images::layer(&[Entry::File("only-here", &[7u8; 100_000], 0o644)]);
    let bad = work.path().join("bad");
    images::oci_layout(&bad, std::slice::from_ref(&unique), images::run_settings());
    let blob = images::gzip(&unique);
    let path = bad.join("blobs/sha256").join(&images::sha256(&blob)[7..]);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&path, &bytes).unwrap();
    let (status, err) = import(&d, "bad", &bad);
    assert_eq!(status, 400, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("layer 1 of 1"),
        "{err}"
    );
    assert_eq!(d.call("GET", "/v1/templates/bad", None).0, 404);
    // Neither source nor reference; both.
    assert_eq!(
        d.call("POST", "/v1/templates", Some(json!({"name": "x"})))
            .0,
        400
    );
    // Importing needs an admin key.
    let user = d.key("alice", &["sandboxes:read", "sandboxes:write", "exec"]);
    let (status, _) = d.call_as(
        &user,
        "POST",
        "/v1/templates",
        Some(json!({"name": "x", "source": layout})),
    );
    assert_eq!(status, 403);
    // A name that exists.
    assert_eq!(import(&d, "app", &layout).0, 409);

    // In use: refused; after the sandbox is gone: removed, and its layers
    // with it once no template uses them.
    let (status, err) = d.call("DELETE", "/v1/templates/app", None);
    assert_eq!(status, 409, "{err}");
    assert_eq!(
        d.call("DELETE", &format!("/v1/sandboxes/{id}"), None).0,
        204
    );
    assert_eq!(d.call("DELETE", "/v1/templates/app", None).0, 204);
    assert_eq!(d.call("DELETE", "/v1/templates/app-docker", None).0, 204);
    assert_eq!(d.call("GET", "/v1/templates/app", None).0, 404);
    let left = std::fs::read_dir(d.data_dir().join("templates/layers/sha256"))
        .map(|r| r.count())
        .unwrap_or(0);
    assert_eq!(left, 0);
    assert_eq!(d.call("DELETE", "/v1/templates/host", None).0, 400);
}

#[test]
fn the_cli_imports_lists_inspects_and_removes() {
    if !root() {
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    images::oci_layout(
        &layout,
        &[base_layer(), top_layer()],
        images::run_settings(),
    );
    let cove = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_DATA_DIR", data.path())
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = cove(&["template", "import", "app", layout.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(String::from_utf8_lossy(&o.stdout).contains("imported template app (2 layers)"));
    let o = cove(&["template", "ls"]);
    let ls = String::from_utf8_lossy(&o.stdout);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("app ") && l.contains("image")),
        "{ls}"
    );
    let o = cove(&["template", "inspect", "app"]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["meta"]["config"]["user"], "1234");
    assert_eq!(v["layers"].as_array().unwrap().len(), 2);
    assert!(v["layers"][1]["bytes"].as_u64().unwrap() > 100_000);
    // A tarball that escapes: refused, naming the entry.
    let evil = work.path().join("evil.tar");
    std::fs::write(
        &evil,
        images::layer(&[Entry::Raw("../../x", tar::EntryType::Regular, b"x", None)]),
    )
    .unwrap();
    let o = cove(&["template", "import", "evil", evil.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("../../x"));
    let o = cove(&["template", "rm", "app"]);
    assert!(o.status.success());
    let o = cove(&["template", "inspect", "app"]);
    assert!(!o.status.success());
}

#[test]
fn pull_through_the_api_from_a_local_registry() {
    if !root() {
        return;
    }
    let Some(registry) = images::Registry::start() else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let reference = rt.block_on(registry.push(
        "team/app:v2",
        &[base_layer(), top_layer()],
        images::run_settings(),
    ));
    let d = Daemon::start();
    let (status, t) = d.call(
        "POST",
        "/v1/templates",
        Some(json!({"reference": reference, "plain_http": true})),
    );
    assert_eq!(status, 201, "{t}");
    assert_eq!(t["name"], "app-v2");
    let id = d.create(json!({"template": "app-v2"}));
    check_sandbox(&d, &id);

    // The CLI: TLS unless --plain-http; the layers are already stored.
    let pull = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_DATA_DIR", d.data_dir())
            .args(["template", "pull"])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = pull(&["--name", "cli", &reference]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&registry.addr));
    let o = pull(&["--plain-http", "--name", "cli", &reference]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "pulled template cli (2 layers)\n"
    );
    let (_, cli) = d.call("GET", "/v1/templates/cli", None);
    assert_eq!(cli["layers"], t["layers"]);

    // A registry that accepts and never answers: 504 naming it.
    let hang = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = hang.local_addr().unwrap().to_string();
    let (status, err) = d.call(
        "POST",
        "/v1/templates",
        Some(json!({"reference": format!("{addr}/x/y:1"), "plain_http": true, "timeout": 1})),
    );
    assert_eq!(status, 504, "{err}");
    assert!(err["error"]["message"].as_str().unwrap().contains(&addr));
    drop(hang);
}

#[test]
fn snapshots_become_templates_and_the_source_keeps_running() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let work = tempfile::tempdir().unwrap();
    let layout = work.path().join("layout");
    images::oci_layout(
        &layout,
        &[base_layer(), top_layer()],
        images::run_settings(),
    );
    assert_eq!(import(&d, "app", &layout).0, 201);
    let id = d.create(json!({"template": "app", "user": "root"}));
    let script = "echo made > /data/new && rm /data/tagged && \
        rm -rf /var/cache && mkdir /var/cache && echo fresh > /var/cache/fresh && \
        mkdir -p /opt/tool && echo v1 > /opt/tool/version && ln /opt/tool/version /opt/tool/hard && \
        ln -s /opt/tool/version /opt/tool/soft";
    out(&d.sh(&id, script));

    let (status, snap) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshot"),
        Some(json!({"name": "snap"})),
    );
    assert_eq!(status, 201, "{snap}");
    assert_eq!(snap["kind"], "image");
    assert_eq!(snap["layers"].as_array().unwrap().len(), 3);
    assert_eq!(snap["entrypoint"], json!(["/bin/echo", "entry:"]));

    // The source runs on, and what it does next is not in the snapshot.
    let (_, source) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(source["state"], "running");
    out(&d.sh(&id, "echo later > /data/later"));

    let copy = d.create(json!({"template": "snap", "user": "root"}));
    assert_eq!(out(&d.sh(&copy, "cat /data/new")), "made\n");
    assert_ne!(d.sh(&copy, "cat /data/tagged")["exit_code"], 0);
    assert_ne!(d.sh(&copy, "cat /data/later")["exit_code"], 0);
    assert_eq!(out(&d.sh(&copy, "ls /var/cache")), "fresh\n");
    assert_eq!(out(&d.sh(&copy, "stat -c %h /opt/tool/version")), "2\n");
    assert_eq!(out(&d.sh(&copy, "cat /opt/tool/soft")), "v1\n");
    // Lower layers untouched: the base image still has what was deleted.
    let fresh = d.create(json!({"template": "app"}));
    assert_eq!(out(&d.sh(&fresh, "cat /data/tagged")), "tagged");

    // A paused sandbox can be snapshotted too, and stays paused.
    assert_eq!(
        d.call("POST", &format!("/v1/sandboxes/{id}/pause"), None).0,
        200
    );
    let (status, s2) = d.call(
        "POST",
        &format!("/v1/sandboxes/{id}/snapshot"),
        Some(json!({"name": "snap2"})),
    );
    assert_eq!(status, 201, "{s2}");
    let (_, source) = d.call("GET", &format!("/v1/sandboxes/{id}"), None);
    assert_eq!(source["state"], "paused");
    let copy2 = d.create(json!({"template": "snap2"}));
    assert_eq!(out(&d.sh(&copy2, "cat /data/later")), "later\n");

    // Errors: a taken name, a bad name, an unknown sandbox.
    let snap_of = |id: &str, name: &str| {
        d.call(
            "POST",
            &format!("/v1/sandboxes/{id}/snapshot"),
            Some(json!({"name": name})),
        )
    };
    assert_eq!(snap_of(&copy, "snap").0, 409);
    assert_eq!(snap_of(&copy, "Bad Name").0, 400);
    assert_eq!(snap_of("sbx-00000000", "x").0, 404);

    // A snapshot of a sandbox of the host template.
    let host = d.create(json!({}));
    out(&d.sh(
        &host,
        "mkdir -p /workspace && echo on-host > /workspace/note",
    ));
    let (status, hs) = snap_of(&host, "host-snap");
    assert_eq!(status, 201, "{hs}");
    assert_eq!(hs["kind"], "host");
    let copy3 = d.create(json!({"template": "host-snap"}));
    assert_eq!(
        out(&d.sh(&copy3, "cat /workspace/note; ls /usr/bin/env")),
        "on-host\n/usr/bin/env\n"
    );

    // CLI: `cove snapshot ID NAME`.
    let o = Command::new(env!("CARGO_BIN_EXE_cove"))
        .args([
            "--url", &d.url, "--key", &d.admin, "snapshot", &copy3, "via-cli",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(d.call("GET", "/v1/templates/via-cli", None).0, 200);
}

/// `cove template build debian`: debootstrap from Debian's archive (about
/// two minutes, most of it downloading ~90 packages), then python3 and
/// apt work in a sandbox; a second build reuses the template.
#[test]
fn the_debian_template_runs_python_and_apt() {
    if !root() || !common::have_debootstrap() {
        return;
    }
    let d = Daemon::start();
    d.build_template("debian");
    let id = d.create(json!({"template": "debian"}));
    assert_eq!(
        out(&d.sh(
            &id,
            "python3 -c 'import sys; print(sys.version_info[0] * 2)'"
        )),
        "6\n"
    );
    assert!(out(&d.sh(&id, "apt-get --version")).starts_with("apt "));
    assert_eq!(out(&d.sh(&id, "pwd; id -un 1000")), "/workspace\nuser\n");
    // The packages are cached; the template is reused.
    assert!(
        std::fs::read_dir(d.data_dir().join("templates/.cache/debootstrap"))
            .unwrap()
            .flatten()
            .any(|e| e.file_name().to_string_lossy().ends_with(".deb"))
    );
    let o = d.build_template("debian");
    assert!(String::from_utf8_lossy(&o.stderr).contains("already built"));
}
