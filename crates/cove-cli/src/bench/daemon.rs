//! A private `cove serve` for the benchmarks that go through the HTTP API:
//! its own data and runtime directories and cgroup parent, a free loopback
//! port, and nothing left behind when it is dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use cove_client::Client;

pub(super) struct Daemon {
    child: Child,
    dir: PathBuf,
    cgroup_parent: String,
    pub url: String,
    pub key: String,
}

impl Daemon {
    /// Start `cove serve` under `scratch/name` and wait until it listens.
    pub fn start(scratch: &Path, name: &str) -> Result<Daemon, String> {
        let me = std::env::current_exe().map_err(|e| e.to_string())?;
        let dir = scratch.join(name);
        let cgroup_parent = format!("cove-bench-{name}-{}", std::process::id());
        let mut child = Command::new(me)
            .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"))
            .arg("--runtime-dir")
            .arg(dir.join("run"))
            .args(["--cgroup-parent", &cgroup_parent])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start cove serve: {e}"))?;
        let stdout = child.stdout.take().ok_or("cove serve has no stdout")?;
        let mut daemon = Daemon {
            child,
            dir: dir.clone(),
            cgroup_parent,
            url: String::new(),
            key: String::new(),
        };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)
            .map_err(|e| e.to_string())?;
        daemon.url = line
            .trim()
            .strip_prefix("cove: serving on ")
            .ok_or_else(|| format!("cove serve did not start: {line:?}"))?
            .to_string();
        daemon.key = std::fs::read_to_string(dir.join("data/admin.key"))
            .map_err(|e| format!("cannot read the bench daemon's admin key: {e}"))?
            .trim()
            .to_string();
        Ok(daemon)
    }

    /// The daemon's process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client(&self) -> Client {
        Client::new(self.url.clone(), Some(self.key.clone()))
    }

    /// Delete every sandbox the daemon has (a daemon that stops leaves its
    /// sandboxes running, by design).
    pub async fn delete_all(&self) {
        let client = self.client();
        if let Ok(list) = client.list_sandboxes("").await {
            for sandbox in list.sandboxes {
                let _ = client.delete_sandbox(&sandbox.id).await;
            }
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // Callers delete their sandboxes first (`delete_all`).
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified", ""] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(&self.cgroup_parent),
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
