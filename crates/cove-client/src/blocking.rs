//! A small blocking wrapper over the async SDK, for programs without an
//! async runtime. Each call runs on a private current-thread runtime.
//!
//! ```no_run
//! let client = cove_client::blocking::Client::from_env()?;
//! let sandbox = client.create(cove_client::SandboxSpec::new())?;
//! let out = sandbox.output(sandbox.command("uname").arg("-a"))?;
//! println!("{}", String::from_utf8_lossy(&out.stdout));
//! sandbox.kill()?;
//! # Ok::<(), cove_client::Error>(())
//! ```

use std::sync::Arc;

use crate::{Command, Error, ExitStatus, Output, SandboxSpec};

fn runtime() -> Result<Arc<tokio::runtime::Runtime>, Error> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map(Arc::new)
        .map_err(|e| Error::Config(format!("cannot start a runtime: {e}")))
}

/// A blocking [`crate::Client`].
#[derive(Debug, Clone)]
pub struct Client {
    inner: crate::Client,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Client {
    /// See [`crate::Client::from_env`].
    pub fn from_env() -> Result<Client, Error> {
        Ok(Client {
            inner: crate::Client::from_env()?,
            runtime: runtime()?,
        })
    }

    /// See [`crate::Client::new`].
    pub fn new(url: impl Into<String>, key: Option<String>) -> Result<Client, Error> {
        Ok(Client {
            inner: crate::Client::new(url, key),
            runtime: runtime()?,
        })
    }

    /// Create a sandbox and wait until it runs.
    pub fn create(&self, spec: SandboxSpec) -> Result<Sandbox, Error> {
        let inner = self.runtime.block_on(self.inner.create(spec))?;
        Ok(Sandbox {
            inner,
            runtime: self.runtime.clone(),
        })
    }

    /// The async client underneath.
    pub fn get_async(&self) -> &crate::Client {
        &self.inner
    }
}

/// A blocking [`crate::Sandbox`].
#[derive(Debug, Clone)]
pub struct Sandbox {
    inner: crate::Sandbox,
    runtime: Arc<tokio::runtime::Runtime>,
}

impl Sandbox {
    /// The sandbox's ID (`sbx-…`).
    pub fn id(&self) -> &str {
        self.inner.id()
    }

    /// A command to configure, then run with [`output`](Self::output),
    /// [`status`](Self::status) or [`run`](Self::run).
    pub fn command(&self, program: impl Into<String>) -> Command {
        self.inner.command(program)
    }

    /// Run `command` and capture its output.
    pub fn output(&self, command: &mut Command) -> Result<Output, Error> {
        self.runtime.block_on(command.output())
    }

    /// Run `command` with this process's stdio.
    pub fn status(&self, command: &mut Command) -> Result<ExitStatus, Error> {
        self.runtime.block_on(command.status())
    }

    /// Run `command`; an unsuccessful exit is an error.
    pub fn run(&self, command: &mut Command) -> Result<(), Error> {
        self.runtime.block_on(command.run())
    }

    /// See [`crate::Sandbox::read`].
    pub fn read(&self, path: &str) -> Result<Vec<u8>, Error> {
        self.runtime.block_on(self.inner.read(path))
    }

    /// See [`crate::Sandbox::write`].
    pub fn write(
        &self,
        path: &str,
        contents: impl Into<bytes::Bytes>,
    ) -> Result<cove_api::FileEntry, Error> {
        self.runtime.block_on(self.inner.write(path, contents))
    }

    /// See [`crate::Sandbox::create_dir_all`].
    pub fn create_dir_all(&self, path: &str) -> Result<cove_api::FileEntry, Error> {
        self.runtime.block_on(self.inner.create_dir_all(path))
    }

    /// See [`crate::Sandbox::read_dir`].
    pub fn read_dir(&self, path: &str) -> Result<Vec<cove_api::FileEntry>, Error> {
        self.runtime.block_on(self.inner.read_dir(path))
    }

    /// See [`crate::Sandbox::remove`].
    pub fn remove(&self, path: &str) -> Result<(), Error> {
        self.runtime.block_on(self.inner.remove(path))
    }

    /// Destroy the sandbox.
    pub fn kill(self) -> Result<(), Error> {
        self.runtime.block_on(self.inner.kill())
    }
}
