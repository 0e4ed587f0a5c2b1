//! Sandboxes as values: create one from a [`SandboxSpec`], run
//! [`Command`]s in it, and destroy it.

use std::collections::BTreeMap;
use std::time::Duration;

use cove_api::{CreateSandboxRequest, DurationValue, SizeValue};

use crate::command::Command;
use crate::{Client, Error};

/// What a new sandbox should be. Every field is optional; the defaults are
/// the daemon's (the `host` template, no limits, no time to live).
#[derive(Debug, Clone, Default)]
pub struct SandboxSpec {
    request: CreateSandboxRequest,
}

impl SandboxSpec {
    /// A spec with every default.
    pub fn new() -> SandboxSpec {
        SandboxSpec::default()
    }

    /// Start from this template (see `cove template ls`).
    pub fn template(mut self, name: impl Into<String>) -> Self {
        self.request.template = Some(name.into());
        self
    }

    /// Set an environment variable of every process in the sandbox.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.env.insert(key.into(), value.into());
        self
    }

    /// The default working directory of processes.
    pub fn current_dir(mut self, dir: impl Into<String>) -> Self {
        self.request.cwd = Some(dir.into());
        self
    }

    /// The default user of processes: a name, a uid, or uid:gid.
    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.request.user = Some(user.into());
        self
    }

    /// Memory limit in bytes.
    pub fn memory(mut self, bytes: u64) -> Self {
        self.request.memory = Some(SizeValue(bytes));
        self
    }

    /// CPU limit in CPUs (1.5 = one and a half cores).
    pub fn cpus(mut self, cpus: f64) -> Self {
        self.request.cpus = Some(cpus);
        self
    }

    /// Most processes and threads at once.
    pub fn pids(mut self, pids: u64) -> Self {
        self.request.pids = Some(pids);
        self
    }

    /// Size cap of the writable layer, in bytes.
    pub fn disk(mut self, bytes: u64) -> Self {
        self.request.disk = Some(SizeValue(bytes));
        self
    }

    /// Destroy the sandbox this long after creation (the daemon enforces it).
    pub fn timeout(mut self, ttl: Duration) -> Self {
        self.request.timeout = Some(DurationValue(ttl));
        self
    }

    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.labels.insert(key.into(), value.into());
        self
    }

    pub fn metadata(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.request.metadata.insert(key.into(), value);
        self
    }

    /// `namespace` (default) or `microvm`.
    pub fn backend(mut self, backend: impl Into<String>) -> Self {
        self.request.backend = Some(backend.into());
        self
    }

    /// The API request this spec sends.
    pub fn request(&self) -> &CreateSandboxRequest {
        &self.request
    }
}

/// A running sandbox. Dropping the value does not destroy the sandbox:
/// call [`Sandbox::kill`] (or let its time to live expire).
#[derive(Debug, Clone)]
pub struct Sandbox {
    pub(crate) client: Client,
    pub(crate) info: cove_api::Sandbox,
}

impl Client {
    /// Create a sandbox and wait until it runs.
    pub async fn create(&self, spec: SandboxSpec) -> Result<Sandbox, Error> {
        let info = self.create_sandbox(&spec.request).await?;
        Ok(Sandbox {
            client: self.clone(),
            info,
        })
    }

    /// A handle on an existing sandbox.
    pub async fn sandbox(&self, id: &str) -> Result<Sandbox, Error> {
        let info = self.get_sandbox(id).await?;
        Ok(Sandbox {
            client: self.clone(),
            info,
        })
    }
}

impl Sandbox {
    /// The sandbox's ID (`sbx-…`).
    pub fn id(&self) -> &str {
        &self.info.id
    }

    /// What the daemon said about the sandbox when this handle was made.
    pub fn info(&self) -> &cove_api::Sandbox {
        &self.info
    }

    /// The client this sandbox talks through.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// A command that runs `program` in this sandbox, like
    /// [`std::process::Command::new`].
    pub fn command(&self, program: impl Into<String>) -> Command {
        Command::new(self.clone(), program.into())
    }

    /// A command that runs the template's configured entrypoint: its
    /// ENTRYPOINT followed by `args`, or by its CMD when `args` is empty
    /// (as `docker run IMAGE [ARGS…]` does).
    pub async fn entrypoint_command<I, S>(&self, args: I) -> Result<Command, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let templates = self.client.templates().await?;
        let template = templates
            .templates
            .into_iter()
            .find(|t| t.name == self.info.template)
            .ok_or_else(|| {
                Error::Config(format!(
                    "template {} is not known to the daemon",
                    self.info.template
                ))
            })?;
        let args: Vec<String> = args.into_iter().map(Into::into).collect();
        let mut argv = template.entrypoint.clone();
        argv.extend(if args.is_empty() {
            template.cmd.clone()
        } else {
            args
        });
        let Some((program, rest)) = argv.split_first() else {
            return Err(Error::Config(format!(
                "template {} has no ENTRYPOINT or CMD, and no arguments were given",
                template.name
            )));
        };
        let mut command = self.command(program.clone());
        command.args(rest.iter().cloned());
        if let Some(dir) = template.working_dir {
            command.current_dir(dir);
        }
        Ok(command)
    }

    /// Refresh what the daemon says about the sandbox.
    pub async fn refresh(&mut self) -> Result<&cove_api::Sandbox, Error> {
        self.info = self.client.get_sandbox(&self.info.id).await?;
        Ok(&self.info)
    }

    /// Freeze every process of the sandbox.
    pub async fn pause(&self) -> Result<(), Error> {
        self.client.pause_sandbox(&self.info.id).await.map(|_| ())
    }

    /// Thaw the sandbox.
    pub async fn resume(&self) -> Result<(), Error> {
        self.client.resume_sandbox(&self.info.id).await.map(|_| ())
    }

    /// Let the sandbox live `ttl` from now (zero: forever).
    pub async fn set_timeout(&self, ttl: Duration) -> Result<(), Error> {
        self.client
            .set_timeout(&self.info.id, ttl)
            .await
            .map(|_| ())
    }

    /// Destroy the sandbox and everything in it.
    pub async fn kill(self) -> Result<(), Error> {
        self.client.delete_sandbox(&self.info.id).await
    }
}

/// The environment a command will run with, as `KEY=VALUE` strings.
pub(crate) fn environ(env: &BTreeMap<String, String>) -> Vec<String> {
    env.iter().map(|(k, v)| format!("{k}={v}")).collect()
}
