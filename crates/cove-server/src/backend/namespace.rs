//! The namespace backend, driven from the daemon.
//!
//! `cove_isolate::create` forks the calling process, which must then be
//! single-threaded; the daemon is not. So a single-threaded copy of the
//! cove binary creates each sandbox: a creator forked by the sandbox
//! factory (see [`super::factory`]), or, without one, a short-lived
//! helper (`cove __create-sandbox`). Either reads the sandbox's
//! configuration, creates it, answers with its record, and exits. The agent it leaves behind listens on `<state>/agent.sock` and is
//! not tied to the daemon: it outlives daemon restarts. The daemon is a
//! child subreaper, so orphaned agents become its children and are reaped.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use cove_isolate::{Layout, Sandbox, SandboxConfig, SandboxRecord};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::factory::Factory;
use super::{AgentStream, Backend, BackendError, Instance, SandboxSpec, sandbox_dirs};
use crate::engine;

/// Run the namespace backend's one-shot helper: read a [`SandboxConfig`]
/// as JSON on stdin, create the sandbox, print `{"record": …}` or
/// `{"error": "…"}`. Called from `main` before any thread exists.
pub fn helper_main() -> i32 {
    let mut input = Vec::new();
    let (reply, code) = match std::io::Read::read_to_end(&mut std::io::stdin(), &mut input) {
        Ok(_) => create_from(&input),
        Err(err) => (
            serde_json::json!({ "error": format!("reading the configuration: {err}") }),
            1,
        ),
    };
    println!("{reply}");
    code
}

/// Create the sandbox a JSON [`SandboxConfig`] describes, in this
/// (single-threaded) process: the reply for the daemon and an exit code.
pub(crate) fn create_from(input: &[u8]) -> (serde_json::Value, i32) {
    let config: SandboxConfig = match serde_json::from_slice(input) {
        Ok(c) => c,
        Err(err) => {
            return (
                serde_json::json!({ "error": format!("bad configuration: {err}") }),
                1,
            );
        }
    };
    match cove_isolate::create(&config, &Layout::detect()) {
        Ok(sandbox) => (serde_json::json!({ "record": sandbox.record() }), 0),
        Err(err) => (serde_json::json!({ "error": err.to_string() }), 1),
    }
}

#[derive(Debug)]
pub struct NamespaceBackend {
    /// Where sandboxes' state directories go.
    state_root: PathBuf,
    /// The cove binary, run as `cove __create-sandbox`.
    helper: PathBuf,
    /// The same binary as a factory of creators (the fast path).
    factory: Factory,
}

impl NamespaceBackend {
    pub fn new(state_root: PathBuf, helper: PathBuf) -> NamespaceBackend {
        let factory = Factory::new(&helper);
        factory.warm();
        NamespaceBackend {
            state_root,
            helper,
            factory,
        }
    }

    /// Create through a creator the factory forked: the configuration
    /// out, then the reply back, on one socket.
    async fn create_with(
        &self,
        creator: std::os::unix::net::UnixStream,
        input: &[u8],
    ) -> Result<serde_json::Value, BackendError> {
        let failed = |what: &str, e: std::io::Error| {
            BackendError::Failed(format!("talking to the sandbox creator ({what}): {e}"))
        };
        creator
            .set_nonblocking(true)
            .map_err(|e| failed("setup", e))?;
        let mut creator =
            tokio::net::UnixStream::from_std(creator).map_err(|e| failed("setup", e))?;
        creator
            .write_all(input)
            .await
            .map_err(|e| failed("configuration", e))?;
        creator
            .shutdown()
            .await
            .map_err(|e| failed("configuration", e))?;
        let mut reply = Vec::new();
        creator
            .read_to_end(&mut reply)
            .await
            .map_err(|e| failed("reply", e))?;
        serde_json::from_slice(&reply).map_err(|_| {
            BackendError::Failed(format!(
                "the sandbox creator failed without a reply ({})",
                String::from_utf8_lossy(&reply).trim()
            ))
        })
    }

    /// Create through a one-shot `cove __create-sandbox`.
    async fn create_with_helper(&self, input: &[u8]) -> Result<serde_json::Value, BackendError> {
        let mut child = tokio::process::Command::new(&self.helper)
            // As the factory's: the agent keeps this environment block.
            .env_clear()
            .env("PATH", super::factory::AGENT_PATH)
            .arg("__create-sandbox")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| {
                BackendError::Failed(format!("cannot run {}: {e}", self.helper.display()))
            })?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(input)
                .await
                .map_err(|e| BackendError::Failed(format!("helper stdin: {e}")))?;
        }
        let output = child
            .wait_with_output()
            .await
            .map_err(|e| BackendError::Failed(format!("helper: {e}")))?;
        serde_json::from_slice(&output.stdout).map_err(|_| {
            BackendError::Failed(format!(
                "the sandbox helper failed ({}): {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ))
        })
    }

    fn instance(&self, record: SandboxRecord) -> Result<Arc<dyn Instance>, BackendError> {
        let sandbox =
            Sandbox::reattach(record.clone()).map_err(|e| BackendError::Failed(e.to_string()))?;
        let pidfd = sandbox
            .pidfd()
            .try_clone()
            .map_err(|e| BackendError::Failed(format!("pidfd: {e}")))?;
        // SAFETY: the OwnedFd stays open, and is the same description, for
        // as long as the AsyncFd owns it.
        let exit = unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE) }
            .map_err(|e| {
                BackendError::Failed(format!("watching the agent: {}", e.into_parts().1))
            })?;
        Ok(Arc::new(NamespaceInstance {
            record,
            sandbox: Mutex::new(Some(sandbox)),
            exit,
        }))
    }
}

#[async_trait]
impl Backend for NamespaceBackend {
    fn name(&self) -> &'static str {
        "namespace"
    }

    async fn create(&self, spec: SandboxSpec) -> Result<Arc<dyn Instance>, BackendError> {
        let mut config =
            engine::sandbox_config(&spec.id, &spec.template, &spec.options, &self.state_root);
        config.listen = true;
        config.agent_log = Some(config.state_dir.join("agent.log"));
        let input = serde_json::to_vec(&config).map_err(|e| BackendError::Failed(e.to_string()))?;
        let reply = match self.factory.creator() {
            Some(creator) => self.create_with(creator, &input).await?,
            None => self.create_with_helper(&input).await?,
        };
        if let Some(error) = reply.get("error").and_then(|e| e.as_str()) {
            return Err(classify(error));
        }
        let record: SandboxRecord = reply
            .get("record")
            .cloned()
            .ok_or_else(|| BackendError::Failed("the sandbox helper printed no record".into()))
            .and_then(|r| {
                serde_json::from_value(r).map_err(|e| BackendError::Failed(e.to_string()))
            })?;
        match self.instance(record.clone()) {
            Ok(instance) => Ok(instance),
            Err(err) => {
                let _ = record.clean_up();
                Err(err)
            }
        }
    }
    async fn reattach(
        &self,
        _id: &str,
        record: serde_json::Value,
    ) -> Result<Arc<dyn Instance>, BackendError> {
        let record: SandboxRecord = serde_json::from_value(record)
            .map_err(|e| BackendError::Failed(format!("bad record: {e}")))?;
        self.instance(record)
    }

    async fn clean_up(&self, id: &str, record: Option<serde_json::Value>) {
        let record = record
            .and_then(|r| serde_json::from_value::<SandboxRecord>(r).ok())
            .or_else(|| SandboxRecord::load(&self.state_root.join(id)));
        let Some(record) = record else {
            let _ = std::fs::remove_dir_all(self.state_root.join(id));
            return;
        };
        let _ = tokio::task::spawn_blocking(move || match Sandbox::reattach(record.clone()) {
            Ok(sandbox) => sandbox.destroy(),
            Err(_) => record.clean_up(),
        })
        .await;
    }

    fn known_ids(&self) -> Vec<String> {
        sandbox_dirs(&self.state_root)
    }

    fn supports_network(&self) -> bool {
        true
    }
}

/// Setup errors that are the request's fault become 4xx.
fn classify(error: &str) -> BackendError {
    if error.contains("cannot be enforced") || error.contains("must be") {
        BackendError::Invalid(error.to_string())
    } else {
        BackendError::Failed(error.to_string())
    }
}

struct NamespaceInstance {
    record: SandboxRecord,
    sandbox: Mutex<Option<Sandbox>>,
    exit: AsyncFd<std::os::fd::OwnedFd>,
}

impl NamespaceInstance {
    fn with<R>(&self, f: impl FnOnce(&Sandbox) -> R) -> Option<R> {
        self.sandbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .map(f)
    }
}

#[async_trait]
impl Instance for NamespaceInstance {
    fn record(&self) -> serde_json::Value {
        serde_json::to_value(&self.record).unwrap_or_default()
    }

    async fn connect(&self) -> Result<AgentStream, BackendError> {
        let path = cove_isolate::socket_path(&self.record.state_dir);
        let stream = tokio::net::UnixStream::connect(&path).await.map_err(|e| {
            BackendError::Unreachable(format!(
                "cannot connect to the agent at {}: {e}",
                path.display()
            ))
        })?;
        Ok(Box::new(stream))
    }

    async fn pause(&self) -> Result<(), BackendError> {
        let cgroup = self.record.cgroup.clone();
        tokio::task::spawn_blocking(move || cgroup.set_frozen(true))
            .await
            .map_err(|e| BackendError::Failed(e.to_string()))?
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    async fn resume(&self) -> Result<(), BackendError> {
        let cgroup = self.record.cgroup.clone();
        tokio::task::spawn_blocking(move || cgroup.set_frozen(false))
            .await
            .map_err(|e| BackendError::Failed(e.to_string()))?
            .map_err(|e| BackendError::Failed(e.to_string()))
    }

    async fn destroy(&self) -> Result<(), BackendError> {
        let sandbox = self
            .sandbox
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let record = self.record.clone();
        tokio::task::spawn_blocking(move || match sandbox {
            Some(sandbox) => sandbox.destroy(),
            None => record.clean_up(),
        })
        .await
        .map_err(|e| BackendError::Failed(e.to_string()))?
        .map_err(|e| BackendError::Failed(e.to_string()))
    }

    async fn exited(&self) -> String {
        loop {
            match self.exit.readable().await {
                Ok(mut guard) => {
                    guard.retain_ready();
                    break;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        }
        let log =
            std::fs::read_to_string(self.record.state_dir.join("agent.log")).unwrap_or_default();
        let tail = log
            .lines()
            .rev()
            .take(3)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect::<Vec<_>>()
            .join("; ");
        if tail.is_empty() {
            "the sandbox's agent exited unexpectedly".into()
        } else {
            format!("the sandbox's agent exited unexpectedly: {tail}")
        }
    }

    fn memory_usage(&self) -> Option<u64> {
        self.with(|s| s.cgroup.memory_usage()).flatten()
    }

    fn network_namespace(&self) -> Result<std::os::fd::OwnedFd, BackendError> {
        // The agent is PID 1 of the sandbox; while it lives, its pidfd pins
        // the PID, so the path cannot name another process's namespace.
        if self.with(|s| s.is_alive()) != Some(true) {
            return Err(BackendError::Failed("the sandbox's agent is gone".into()));
        }
        let path = format!("/proc/{}/ns/net", self.record.pid);
        std::fs::File::open(&path)
            .map(std::os::fd::OwnedFd::from)
            .map_err(|e| BackendError::Failed(format!("cannot open {path}: {e}")))
    }

    fn writable_layer(&self) -> Result<std::path::PathBuf, BackendError> {
        let path = cove_isolate::rootfs::upper_dir(self.record.pid);
        if path.is_dir() {
            Ok(path)
        } else {
            Err(BackendError::Failed(format!(
                "the writable layer of sandbox {} is not reachable at {} \
                 (was it started by an older cove?)",
                self.record.id,
                path.display()
            )))
        }
    }
}
