//! Sandboxes as values: create one from a [`SandboxSpec`], run
//! [`Command`]s in it, and destroy it.

use std::collections::BTreeMap;
use std::time::Duration;

use cove_api::{CreateSandboxRequest, DurationValue, FileEntry, SizeValue};

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

    /// Add a label, which the sandbox listing can filter by
    /// (`label=key=value` in [`Client::list_sandboxes`]).
    pub fn label(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.request.labels.insert(key.into(), value.into());
        self
    }

    /// Keep a free-form JSON value under `key` with the sandbox; it comes
    /// back in [`Sandbox::info`].
    pub fn metadata(mut self, key: impl Into<String>, value: serde_json::Value) -> Self {
        self.request.metadata.insert(key.into(), value);
        self
    }

    /// `namespace` (default) or `microvm`.
    pub fn backend(mut self, backend: impl Into<String>) -> Self {
        self.request.backend = Some(backend.into());
        self
    }
    /// Give the sandbox egress through cove's bridge (docs/network.md);
    /// without it, and without `allow_out`/`deny_out`, it has loopback only.
    pub fn egress(mut self) -> Self {
        self.request.network.mode = Some(cove_api::NetworkMode::Egress);
        self
    }

    /// Let the sandbox connect to a CIDR, address or host name (repeatable;
    /// implies egress). With any `allow_out`, nothing else is reachable.
    pub fn allow_out(mut self, target: impl Into<String>) -> Self {
        self.request.network.allow_out.push(target.into());
        self
    }

    /// Keep the sandbox from a CIDR, address or host name (repeatable;
    /// implies egress); wins over `allow_out`.
    pub fn deny_out(mut self, target: impl Into<String>) -> Self {
        self.request.network.deny_out.push(target.into());
        self
    }

    /// Publish `port` of the sandbox on the host's 127.0.0.1, on a port the
    /// kernel picks ([`Sandbox::published_port`] tells which).
    pub fn expose(mut self, port: u16) -> Self {
        self.request
            .network
            .exposed_ports
            .push(cove_api::PortRequest {
                port,
                host_port: None,
            });
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
    /// The host port (on 127.0.0.1) that reaches `port` of the sandbox,
    /// when it was published at create.
    pub fn published_port(&self, port: u16) -> Option<u16> {
        self.info()
            .network
            .ports
            .iter()
            .find(|p| p.port == port)
            .map(|p| p.host_port)
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

    /// Make a new template of this sandbox's filesystem (it keeps running).
    pub async fn snapshot(&self, name: &str) -> Result<cove_api::TemplateInfo, Error> {
        self.client.snapshot_sandbox(&self.info.id, name).await
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

    /// The whole contents of a file (like `std::fs::read`).
    pub async fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        self.client.read_file(&self.info.id, path).await
    }

    /// A file's contents as text (like `std::fs::read_to_string`); an error
    /// if they are not UTF-8.
    pub async fn read_to_string(&self, path: &str) -> Result<String, Error> {
        String::from_utf8(self.read(path).await?).map_err(|e| {
            Error::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{path} is not UTF-8: {e}"),
            ))
        })
    }

    /// Create or replace a file with `contents` (like `std::fs::write`).
    /// The file appears whole or not at all.
    pub async fn write(
        &self,
        path: &str,
        contents: impl Into<bytes::Bytes>,
    ) -> Result<FileEntry, Error> {
        self.client
            .write_file(&self.info.id, path, contents, None)
            .await
    }

    /// Create a directory and any missing parents (like
    /// `std::fs::create_dir_all`).
    pub async fn create_dir_all(&self, path: &str) -> Result<FileEntry, Error> {
        self.client.mkdir(&self.info.id, path, true, None).await
    }

    /// The entries of a directory (like `std::fs::read_dir`, without `.`
    /// and `..`). A directory over the daemon's listing limit (10,000
    /// entries) is an error rather than a silently short list.
    pub async fn read_dir(&self, path: &str) -> Result<Vec<FileEntry>, Error> {
        let list = self.client.list_dir(&self.info.id, path, 1).await?;
        if list.truncated {
            return Err(Error::Io(std::io::Error::other(format!(
                "{path} has more entries than one listing returns"
            ))));
        }
        Ok(list.entries)
    }

    /// What a path is (like `std::fs::metadata`: symlinks are followed).
    pub async fn metadata(&self, path: &str) -> Result<FileEntry, Error> {
        self.client.stat(&self.info.id, path, true).await
    }

    /// Remove a file, a symlink or a directory with everything in it (like
    /// `std::fs::remove_file` and `remove_dir_all` in one).
    pub async fn remove(&self, path: &str) -> Result<(), Error> {
        self.client.remove(&self.info.id, path, true).await
    }

    /// Rename a file or directory, replacing `to` if it exists (like
    /// `std::fs::rename`).
    pub async fn rename(&self, from: &str, to: &str) -> Result<FileEntry, Error> {
        self.client.move_path(&self.info.id, from, to, true).await
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn network_builders_fill_the_request() {
        let spec = SandboxSpec::new()
            .allow_out("pypi.org")
            .deny_out("10.0.0.0/8")
            .expose(8000);
        let network = &spec.request().network;
        assert_eq!(network.effective_mode(), cove_api::NetworkMode::Egress);
        assert_eq!(network.allow_out, vec!["pypi.org".to_string()]);
        assert_eq!(network.deny_out, vec!["10.0.0.0/8".to_string()]);
        assert_eq!(network.exposed_ports[0].port, 8000);
        let none = SandboxSpec::new().expose(3000);
        assert_eq!(
            none.request().network.effective_mode(),
            cove_api::NetworkMode::None
        );
        assert_eq!(
            SandboxSpec::new()
                .egress()
                .request()
                .network
                .effective_mode(),
            cove_api::NetworkMode::Egress
        );
    }
}
