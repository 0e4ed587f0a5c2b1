//! A real `cove serve` for black-box tests: its own data directory,
//! runtime directory and cgroup parent, on an ephemeral loopback port.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

pub fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // CI runs as root: a skip there would hide a whole suite.
    assert!(
        std::env::var_os("CI").is_none(),
        "the daemon needs root, and CI is set: run the tests as root"
    );
    eprintln!("skipped: the daemon needs root");
    false
}

/// Whether debootstrap (for the debian template) is here; under CI it must
/// be (scripts/test.sh installs it).
pub fn have_debootstrap() -> bool {
    if Path::new("/usr/sbin/debootstrap").exists() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "scripts/test.sh installs debootstrap"
    );
    eprintln!("skipping: debootstrap is not installed");
    false
}

pub struct Daemon {
    pub child: Option<Child>,
    pub dirs: tempfile::TempDir,
    pub cgroup_parent: String,
    pub url: String,
    pub admin: String,
    pub http: reqwest::blocking::Client,
    /// More arguments of `cove serve`.
    pub extra: Vec<String>,
    /// Extra environment of the daemon process (e.g. the microVM backend's).
    pub env: Vec<(String, String)>,
}

impl Daemon {
    pub fn start() -> Daemon {
        Daemon::start_with_env(Vec::new())
    }

    /// A daemon with more arguments of `cove serve`.
    pub fn start_with(extra: &[String]) -> Daemon {
        Daemon::start_full(extra, Vec::new())
    }

    /// A daemon with `env` added to its environment.
    pub fn start_with_env(env: Vec<(String, String)>) -> Daemon {
        Daemon::start_full(&[], env)
    }

    /// A daemon with more arguments and environment.
    pub fn start_full(extra: &[String], env: Vec<(String, String)>) -> Daemon {
        let dirs = tempfile::tempdir().unwrap();
        let name = dirs
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_lowercase()
            .replace(['.', '_'], "-");
        let cgroup_parent = format!("cove-test-{name}");
        let mut daemon = Daemon {
            child: None,
            dirs,
            cgroup_parent,
            url: String::new(),
            admin: String::new(),
            http: reqwest::blocking::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()
                .unwrap(),
            extra: extra.to_vec(),
            env,
        };
        daemon.spawn();
        daemon
    }

    /// `cove template build NAME` into this daemon's data directory, with
    /// its environment (the microVM backend's too, which builds the VM
    /// images alongside). Fails the test if the build fails.
    pub fn build_template(&self, name: &str) -> std::process::Output {
        let out = Command::new(env!("CARGO_BIN_EXE_cove"))
            .args(["template", "build", name])
            .env("COVE_DATA_DIR", self.data_dir())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cove template build {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dirs.path().join("data")
    }

    pub fn runtime_dir(&self) -> PathBuf {
        self.dirs.path().join("run")
    }

    /// Start (or restart) the daemon process on a fresh port.
    pub fn spawn(&mut self) {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cove"))
            .args(["serve", "--listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--runtime-dir")
            .arg(self.runtime_dir())
            .arg("--cgroup-parent")
            .arg(&self.cgroup_parent)
            .args(&self.extra)
            .env("COVE_LOG", "info")
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("cove: serving on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        self.url = url.to_string();
        self.admin = std::fs::read_to_string(self.data_dir().join("admin.key"))
            .unwrap()
            .trim()
            .to_string();
        self.child = Some(child);
    }

    /// `kill -9` the daemon.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }

    /// SIGTERM the daemon and wait for it.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        child.wait().unwrap()
    }

    pub fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        key: Option<&str>,
    ) -> reqwest::blocking::RequestBuilder {
        let mut req = self.http.request(method, format!("{}{path}", self.url));
        if let Some(key) = key {
            req = req.bearer_auth(key);
        }
        req
    }

    /// Call the API with the admin key; returns (status, JSON body or Null).
    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        self.call_as(&self.admin.clone(), method, path, body)
    }

    pub fn call_as(
        &self,
        key: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.request(method, path, Some(key));
        if let Some(body) = body {
            req = req.json(&body);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        let text = resp.text().unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    pub fn create(&self, body: Value) -> String {
        let (status, sandbox) = self.call("POST", "/v1/sandboxes", Some(body));
        assert_eq!(status, 201, "create failed: {sandbox}");
        sandbox["id"].as_str().unwrap().to_string()
    }

    pub fn exec(&self, id: &str, body: Value) -> (u16, Value) {
        self.call("POST", &format!("/v1/sandboxes/{id}/exec"), Some(body))
    }

    pub fn sh(&self, id: &str, cmd: &str) -> Value {
        let (status, result) = self.exec(id, json!({ "cmd": cmd }));
        assert_eq!(status, 200, "exec failed: {result}");
        result
    }

    /// A key with the given scopes for `owner`; returns the secret.
    pub fn key(&self, owner: &str, scopes: &[&str]) -> String {
        let (status, created) = self.call(
            "POST",
            "/v1/keys",
            Some(json!({ "name": format!("{owner}-{}", scopes.join("-").replace(':', "_")), "owner": owner, "scopes": scopes })),
        );
        assert_eq!(status, 201, "{created}");
        created["key"].as_str().unwrap().to_string()
    }

    /// Every cgroup directory under this daemon's parent.
    pub fn cgroups(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified", ""] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                found.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path()),
                );
            }
        }
        found
    }

    /// State directories of sandboxes.
    pub fn state_dirs(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.runtime_dir().join("sandboxes"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    }

    /// Agent processes whose state directory is this daemon's.
    pub fn agents(&self) -> Vec<i32> {
        let marker = self.runtime_dir().to_string_lossy().into_owned();
        let mut pids = Vec::new();
        for entry in std::fs::read_dir("/proc").unwrap().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim() != "cove-agent" {
                continue;
            }
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap_or_default();
            if status
                .lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
            {
                continue;
            }
            // The agent's cgroup names its sandbox; match it to our parent.
            let cgroup = std::fs::read_to_string(entry.path().join("cgroup")).unwrap_or_default();
            if cgroup.contains(&format!("/{}/", self.cgroup_parent)) || cgroup.contains(&marker) {
                pids.push(pid);
            }
        }
        pids
    }

    pub fn assert_nothing_left(&self) {
        let mut waited = 0;
        loop {
            let (cgroups, states, agents) = (self.cgroups(), self.state_dirs(), self.agents());
            if cgroups.is_empty() && states.is_empty() && agents.is_empty() {
                return;
            }
            waited += 1;
            if waited > 100 {
                panic!("left behind: cgroups {cgroups:?}, state {states:?}, agents {agents:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Destroy what the test left, then stop the daemon.
        if self.child.is_some() {
            if let Ok(resp) = self
                .request(reqwest::Method::GET, "/v1/sandboxes", Some(&self.admin))
                .send()
                && let Ok(list) = resp.json::<Value>()
            {
                for s in list["sandboxes"].as_array().cloned().unwrap_or_default() {
                    if let Some(id) = s["id"].as_str() {
                        let _ = self
                            .request(
                                reqwest::Method::DELETE,
                                &format!("/v1/sandboxes/{id}"),
                                Some(&self.admin),
                            )
                            .send();
                    }
                }
            }
            self.kill();
        }
        for pid in self.agents() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        std::thread::sleep(Duration::from_millis(50));
        for dir in self.cgroups() {
            let _ = std::fs::remove_dir(dir);
        }
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified", ""] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

pub fn host_has_process_with(arg: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(arg))
    })
}
