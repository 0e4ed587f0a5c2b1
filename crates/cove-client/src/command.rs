//! Commands in a sandbox, in the shape of [`std::process::Command`] (and
//! of tinyrange `cc`'s `os/exec`-style API): build with `arg`, `env`,
//! `current_dir`…, then `output()`, `combined_output()`, `status()`,
//! `run()`, or `spawn()` a [`Child`] with piped stdin, stdout and stderr.
//!
//! Under the hood a command is a background process in the sandbox and a
//! WebSocket attached to it: stdin goes out as it is written, output comes
//! back as it is produced, in order, with back-pressure (a child whose
//! piped stdout nobody reads blocks, as a local one would).
//!
//! Cancellation: dropping a [`Child`] (or the future of `output()` and
//! friends) before the process ended kills it and everything it started;
//! so does a [`CancellationToken`] given to [`Command::cancel_on`], and
//! [`Command::timeout`] has the daemon do it.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use cove_api::{DurationValue, ExecRequest, PtyRequest};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;
pub use tokio_util::sync::CancellationToken;

use crate::Error;
use crate::sandbox::{Sandbox, environ};

/// Buffer of each pipe between the caller and the connection.
const PIPE_BUFFER: usize = 256 * 1024;

/// What to connect a child's stdin, stdout or stderr to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stdio {
    /// This process's own stdin/stdout/stderr.
    Inherit,
    /// Nothing: stdin is empty, output is discarded.
    Null,
    /// A pipe the caller reads or writes ([`Child::stdout`] …).
    Piped,
}

impl Stdio {
    /// [`Stdio::Inherit`], as [`std::process::Stdio::inherit`].
    pub fn inherit() -> Stdio {
        Stdio::Inherit
    }

    /// [`Stdio::Null`], as [`std::process::Stdio::null`].
    pub fn null() -> Stdio {
        Stdio::Null
    }

    /// [`Stdio::Piped`], as [`std::process::Stdio::piped`].
    pub fn piped() -> Stdio {
        Stdio::Piped
    }
}

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    exit_code: i32,
    signal: Option<i32>,
    timed_out: bool,
    oom_killed: bool,
}

impl ExitStatus {
    /// The exit code, or `None` if a signal killed the process.
    pub fn code(&self) -> Option<i32> {
        if self.signal.is_some() {
            None
        } else {
            Some(self.exit_code)
        }
    }

    /// The signal that killed the process.
    pub fn signal(&self) -> Option<i32> {
        self.signal
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.signal.is_none() && self.exit_code == 0
    }

    /// The code as a shell reports it: the exit code, 128+N for signal N,
    /// 124 when the timeout killed it (tinyrange's `ExitCode`).
    pub fn exit_code(&self) -> i32 {
        self.exit_code
    }

    /// [`Command::timeout`] killed the process tree.
    pub fn timed_out(&self) -> bool {
        self.timed_out
    }

    /// The kernel's OOM killer killed it.
    pub fn oom_killed(&self) -> bool {
        self.oom_killed
    }

    fn from_exit(value: &serde_json::Value) -> ExitStatus {
        ExitStatus {
            exit_code: value["exit_code"].as_i64().unwrap_or(1) as i32,
            signal: value["signal"].as_i64().map(|s| s as i32),
            timed_out: value["timed_out"].as_bool().unwrap_or(false),
            oom_killed: value["oom_killed"].as_bool().unwrap_or(false),
        }
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.timed_out, self.signal) {
            (true, _) => write!(f, "timed out (exit code {})", self.exit_code),
            (false, Some(sig)) => write!(f, "killed by signal {sig}"),
            (false, None) => write!(f, "exit code {}", self.exit_code),
        }
    }
}

/// Everything a finished command wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// How the process ended.
    pub status: ExitStatus,
    /// Everything it wrote to stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote to stderr.
    pub stderr: Vec<u8>,
}

/// A command to run in a sandbox. See the [module docs](self).
#[derive(Debug, Clone)]
pub struct Command {
    sandbox: Sandbox,
    program: String,
    args: Vec<String>,
    env: BTreeMap<String, String>,
    env_clear: bool,
    cwd: Option<String>,
    user: Option<String>,
    timeout: Option<Duration>,
    stdin: Option<Stdio>,
    stdout: Option<Stdio>,
    stderr: Option<Stdio>,
    stdin_bytes: Option<Vec<u8>>,
    pty: Option<(u16, u16)>,
    tag: Option<String>,
    cancel: Option<CancellationToken>,
}

impl Command {
    pub(crate) fn new(sandbox: Sandbox, program: String) -> Command {
        Command {
            sandbox,
            program,
            args: Vec::new(),
            env: BTreeMap::new(),
            env_clear: false,
            cwd: None,
            user: None,
            timeout: None,
            stdin: None,
            stdout: None,
            stderr: None,
            stdin_bytes: None,
            pty: None,
            tag: None,
            cancel: None,
        }
    }

    /// Add an argument.
    pub fn arg(&mut self, arg: impl Into<String>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    /// Add arguments.
    pub fn args<I, S>(&mut self, args: I) -> &mut Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Set an environment variable (over the sandbox's).
    pub fn env(&mut self, key: impl Into<String>, value: impl Into<String>) -> &mut Self {
        self.env.insert(key.into(), value.into());
        self
    }

    /// Set environment variables.
    pub fn envs<I, K, V>(&mut self, vars: I) -> &mut Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env
            .extend(vars.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Forget a variable set with [`env`](Self::env).
    pub fn env_remove(&mut self, key: &str) -> &mut Self {
        self.env.remove(key);
        self
    }

    /// Start from an empty environment instead of the sandbox's.
    pub fn env_clear(&mut self) -> &mut Self {
        self.env_clear = true;
        self.env.clear();
        self
    }

    /// A variable set on this command (tinyrange's `GetEnv`).
    pub fn get_env(&self, key: &str) -> Option<&str> {
        self.env.get(key).map(String::as_str)
    }

    /// The variables set on this command.
    pub fn get_envs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The variables set on this command as `KEY=VALUE` (tinyrange's `Environ`).
    pub fn environ(&self) -> Vec<String> {
        environ(&self.env)
    }

    /// The working directory inside the sandbox.
    pub fn current_dir(&mut self, dir: impl Into<String>) -> &mut Self {
        self.cwd = Some(dir.into());
        self
    }

    /// Run as this user: a name, a uid, or uid:gid.
    pub fn user(&mut self, user: impl Into<String>) -> &mut Self {
        self.user = Some(user.into());
        self
    }

    /// Kill the process and everything it started after this long.
    pub fn timeout(&mut self, timeout: Duration) -> &mut Self {
        self.timeout = Some(timeout);
        self
    }

    /// Where stdin comes from. The default is empty for
    /// [`output`](Self::output) and [`combined_output`](Self::combined_output),
    /// this process's stdin for [`status`](Self::status) and
    /// [`spawn`](Self::spawn); [`stdin_bytes`](Self::stdin_bytes) wins over it.
    pub fn stdin(&mut self, stdin: Stdio) -> &mut Self {
        self.stdin = Some(stdin);
        self
    }

    /// Where stdout goes. The default is captured for
    /// [`output`](Self::output), this process's stdout for
    /// [`status`](Self::status) and [`spawn`](Self::spawn).
    pub fn stdout(&mut self, stdout: Stdio) -> &mut Self {
        self.stdout = Some(stdout);
        self
    }

    /// Where stderr goes. The default is captured for
    /// [`output`](Self::output), this process's stderr for
    /// [`status`](Self::status) and [`spawn`](Self::spawn);
    /// [`combined_output`](Self::combined_output) ignores it.
    pub fn stderr(&mut self, stderr: Stdio) -> &mut Self {
        self.stderr = Some(stderr);
        self
    }

    /// Feed these bytes on stdin, then end it (tinyrange's `SetStdin`).
    pub fn stdin_bytes(&mut self, data: impl Into<Vec<u8>>) -> &mut Self {
        self.stdin_bytes = Some(data.into());
        self
    }

    /// Run on a terminal of this size.
    pub fn pty(&mut self, rows: u16, cols: u16) -> &mut Self {
        self.pty = Some((rows, cols));
        self
    }

    /// A label shown in the sandbox's process list.
    pub fn tag(&mut self, tag: impl Into<String>) -> &mut Self {
        self.tag = Some(tag.into());
        self
    }

    /// Kill the process when `token` is cancelled (tinyrange's
    /// `CommandContext`).
    pub fn cancel_on(&mut self, token: CancellationToken) -> &mut Self {
        self.cancel = Some(token);
        self
    }

    /// The program and its arguments.
    pub fn get_argv(&self) -> Vec<&str> {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .collect()
    }

    /// Run to completion, capturing stdout and stderr (stdin is empty
    /// unless set).
    pub async fn output(&mut self) -> Result<Output, Error> {
        let child = self
            .spawn_with(Stdio::Null, Stdio::Piped, Stdio::Piped, false)
            .await?;
        child.wait_with_output().await
    }

    /// Run to completion, capturing stdout and stderr together, in the order
    /// the process wrote them (tinyrange's `CombinedOutput`).
    pub async fn combined_output(&mut self) -> Result<(ExitStatus, Vec<u8>), Error> {
        let mut child = self
            .spawn_with(Stdio::Null, Stdio::Piped, Stdio::Piped, true)
            .await?;
        let mut combined = Vec::new();
        if let Some(mut out) = child.stdout.take() {
            out.read_to_end(&mut combined).await.map_err(Error::Io)?;
        }
        let status = child.wait().await?;
        Ok((status, combined))
    }

    /// Run to completion with this process's stdio (unless set); return how
    /// it ended.
    pub async fn status(&mut self) -> Result<ExitStatus, Error> {
        let mut child = self
            .spawn_with(Stdio::Inherit, Stdio::Inherit, Stdio::Inherit, false)
            .await?;
        child.wait().await
    }

    /// Run to completion; an unsuccessful exit is [`Error::Exit`] (tinyrange's `Run`).
    pub async fn run(&mut self) -> Result<(), Error> {
        let status = self.status().await?;
        if status.success() {
            Ok(())
        } else {
            Err(Error::Exit(status))
        }
    }

    /// Start the process and return at once; stdio defaults to inherit.
    pub async fn spawn(&mut self) -> Result<Child, Error> {
        self.spawn_with(Stdio::Inherit, Stdio::Inherit, Stdio::Inherit, false)
            .await
    }

    async fn spawn_with(
        &mut self,
        stdin: Stdio,
        stdout: Stdio,
        stderr: Stdio,
        combined: bool,
    ) -> Result<Child, Error> {
        let stdin = if self.stdin_bytes.is_some() {
            Stdio::Piped
        } else {
            self.stdin.unwrap_or(stdin)
        };
        let stdout = self.stdout.unwrap_or(stdout);
        let stderr = if combined {
            Stdio::Piped
        } else {
            self.stderr.unwrap_or(stderr)
        };
        let req = ExecRequest {
            argv: Some(self.get_argv().into_iter().map(String::from).collect()),
            env: self.env.clone(),
            clear_env: self.env_clear,
            cwd: self.cwd.clone(),
            user: self.user.clone(),
            timeout: self.timeout.map(DurationValue),
            stdin_open: stdin != Stdio::Null,
            pty: self.pty.map(|(rows, cols)| PtyRequest { rows, cols }),
            tag: self.tag.clone(),
            ..ExecRequest::default()
        };
        let client = self.sandbox.client.clone();
        let id = self.sandbox.info.id.clone();
        let pid = client.exec_background(&id, &req).await?;
        let socket = match client.attach(&id, pid).await {
            Ok(socket) => socket,
            Err(err) => {
                let _ = client.signal(&id, pid, "KILL").await;
                return Err(err);
            }
        };
        let (sink, source) = socket.split();
        let (frames_tx, mut frames_rx) = mpsc::channel::<Message>(16);
        tokio::spawn(async move {
            let mut sink = sink;
            while let Some(frame) = frames_rx.recv().await {
                if sink.send(frame).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        });

        // stdin: the caller's pipe (or bytes, or this process's stdin) → frames.
        let mut child_stdin = None;
        if stdin != Stdio::Null {
            let source: Box<dyn AsyncRead + Send + Unpin> = match (&self.stdin_bytes, stdin) {
                (Some(bytes), _) => Box::new(std::io::Cursor::new(bytes.clone())),
                (None, Stdio::Inherit) => Box::new(tokio::io::stdin()),
                _ => {
                    let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
                    child_stdin = Some(ChildStdin { inner: ours });
                    Box::new(theirs)
                }
            };
            tokio::spawn(forward_stdin(source, frames_tx.clone()));
        }

        // Output: frames → the caller's pipes (or this process's stdio, or nowhere).
        let (out_pipe, child_stdout) = pipe_for(stdout);
        let (err_pipe, child_stderr) = if combined {
            (None, None)
        } else {
            pipe_for(stderr)
        };
        let out_sink = sink_for(stdout, out_pipe, Sink::Stdout);
        let err_sink = if combined {
            out_sink.clone()
        } else {
            sink_for(stderr, err_pipe, Sink::Stderr)
        };
        let (exit_tx, exit_rx) = oneshot::channel();
        tokio::spawn(receive(source, out_sink, err_sink, exit_tx));

        Ok(Child {
            sandbox_id: id,
            client,
            pid,
            stdin: child_stdin,
            stdout: child_stdout,
            stderr: child_stderr,
            exit: Some(exit_rx),
            status: None,
            cancel: self.cancel.clone(),
            _frames: frames_tx,
        })
    }
}

fn pipe_for(stdio: Stdio) -> (Option<DuplexStream>, Option<ChildOutput>) {
    if stdio == Stdio::Piped {
        let (ours, theirs) = tokio::io::duplex(PIPE_BUFFER);
        (Some(theirs), Some(ChildOutput { inner: ours }))
    } else {
        (None, None)
    }
}

/// Where received output goes.
#[derive(Clone)]
enum Sink {
    Pipe(Arc<tokio::sync::Mutex<DuplexStream>>),
    Stdout,
    Stderr,
    Null,
}

/// The sink for one stream: its pipe, `inherited` (our own stdout or
/// stderr), or nothing.
fn sink_for(stdio: Stdio, pipe: Option<DuplexStream>, inherited: Sink) -> Sink {
    match (stdio, pipe) {
        (_, Some(pipe)) => Sink::Pipe(Arc::new(tokio::sync::Mutex::new(pipe))),
        (Stdio::Inherit, None) => inherited,
        _ => Sink::Null,
    }
}

impl Sink {
    async fn write(&mut self, data: &[u8]) {
        match self {
            Sink::Pipe(pipe) => {
                // A reader that went away just stops receiving.
                if pipe.lock().await.write_all(data).await.is_err() {
                    *self = Sink::Null;
                }
            }
            Sink::Stdout => {
                let mut out = tokio::io::stdout();
                let _ = out.write_all(data).await;
                let _ = out.flush().await;
            }
            Sink::Stderr => {
                let mut err = tokio::io::stderr();
                let _ = err.write_all(data).await;
                let _ = err.flush().await;
            }
            Sink::Null => {}
        }
    }
}

async fn forward_stdin(
    mut source: Box<dyn AsyncRead + Send + Unpin>,
    frames: mpsc::Sender<Message>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match source.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if frames
                    .send(Message::Binary(buf[..n].to_vec().into()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        }
    }
    let _ = frames
        .send(Message::Text(r#"{"type":"close_stdin"}"#.into()))
        .await;
}

type Source = futures::stream::SplitStream<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
>;

async fn receive(
    mut source: Source,
    mut out: Sink,
    mut err: Sink,
    exit: oneshot::Sender<Result<ExitStatus, Error>>,
) {
    let result = loop {
        match source.next().await {
            Some(Ok(Message::Binary(frame))) if !frame.is_empty() => {
                if frame[0] == 2 {
                    err.write(&frame[1..]).await;
                } else {
                    out.write(&frame[1..]).await;
                }
            }
            Some(Ok(Message::Text(text))) => {
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                match value["type"].as_str() {
                    Some("exit") => break Ok(ExitStatus::from_exit(&value)),
                    Some("error") => {
                        break Err(Error::Decode(format!(
                            "the daemon lost the process: {}",
                            value["message"]
                        )));
                    }
                    _ => {}
                }
            }
            Some(Ok(Message::Close(_))) | None => {
                break Err(Error::Decode(
                    "the connection closed before the process exited".into(),
                ));
            }
            Some(Err(e)) => {
                break Err(Error::Config(format!(
                    "the connection to the process failed: {e}"
                )));
            }
            Some(Ok(_)) => {}
        }
    };
    // Close the pipes so readers see end of file.
    drop(out);
    drop(err);
    let _ = exit.send(result);
}

/// A running command. Dropping it before the process ended kills the
/// process and everything it started.
#[derive(Debug)]
pub struct Child {
    sandbox_id: String,
    client: crate::Client,
    pid: u32,
    /// The process's stdin, when [`Stdio::Piped`]; shut it down (or drop
    /// it) to send end of file.
    pub stdin: Option<ChildStdin>,
    /// The process's stdout, when [`Stdio::Piped`].
    pub stdout: Option<ChildOutput>,
    /// The process's stderr, when [`Stdio::Piped`].
    pub stderr: Option<ChildOutput>,
    exit: Option<oneshot::Receiver<Result<ExitStatus, Error>>>,
    status: Option<ExitStatus>,
    cancel: Option<CancellationToken>,
    _frames: mpsc::Sender<Message>,
}

/// A child's stdout or stderr.
pub type ChildStdout = ChildOutput;
/// A child's stderr.
pub type ChildStderr = ChildOutput;

impl Child {
    /// The process ID inside the sandbox.
    pub fn id(&self) -> u32 {
        self.pid
    }

    /// Wait for the process to exit. Close [`stdin`](Self::stdin) first if
    /// the process reads it to the end.
    pub async fn wait(&mut self) -> Result<ExitStatus, Error> {
        if let Some(status) = self.status {
            return Ok(status);
        }
        self.stdin.take();
        let Some(exit) = self.exit.take() else {
            return Err(Error::Decode(
                "the process's result was already lost".into(),
            ));
        };
        let result = match self.cancel.clone() {
            Some(token) => {
                tokio::pin!(exit);
                tokio::select! {
                    result = &mut exit => result,
                    _ = token.cancelled() => {
                        self.kill_now().await?;
                        exit.await
                    }
                }
            }
            None => exit.await,
        };
        let status =
            result.map_err(|_| Error::Decode("the process's connection ended".into()))??;
        self.status = Some(status);
        Ok(status)
    }

    /// Wait for the exit, collecting whatever is left on piped stdout and stderr.
    pub async fn wait_with_output(mut self) -> Result<Output, Error> {
        self.stdin.take();
        let mut stdout = Vec::new();
        let mut stderr = Vec::new();
        let out = self.stdout.take();
        let err = self.stderr.take();
        let read_out = async {
            if let Some(mut out) = out {
                out.read_to_end(&mut stdout).await.map_err(Error::Io)?;
            }
            Ok::<_, Error>(())
        };
        let read_err = async {
            if let Some(mut err) = err {
                err.read_to_end(&mut stderr).await.map_err(Error::Io)?;
            }
            Ok::<_, Error>(())
        };
        tokio::try_join!(read_out, read_err)?;
        let status = self.wait().await?;
        Ok(Output {
            status,
            stdout,
            stderr,
        })
    }

    /// Kill the process and everything it started, then wait for it.
    pub async fn kill(&mut self) -> Result<(), Error> {
        if self.status.is_none() {
            self.kill_now().await?;
            self.wait().await?;
        }
        Ok(())
    }

    async fn kill_now(&self) -> Result<(), Error> {
        match self.client.signal(&self.sandbox_id, self.pid, "KILL").await {
            Ok(_) => Ok(()),
            // Already exited.
            Err(err) if err.status() == Some(409) => Ok(()),
            Err(err) => Err(err),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        // A finished process whose status nobody collected needs nothing.
        if let Some(exit) = self.exit.as_mut()
            && !matches!(exit.try_recv(), Err(oneshot::error::TryRecvError::Empty))
        {
            return;
        }
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let (client, id, pid) = (self.client.clone(), self.sandbox_id.clone(), self.pid);
            handle.spawn(async move {
                let _ = client.signal(&id, pid, "KILL").await;
            });
        }
    }
}

/// A child's stdin: an [`AsyncWrite`]. Shutting it down (or dropping it)
/// ends the process's input.
#[derive(Debug)]
pub struct ChildStdin {
    inner: DuplexStream,
}

impl AsyncWrite for ChildStdin {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A child's stdout or stderr: an [`AsyncRead`] that ends when the
/// process has exited and everything it wrote was read.
#[derive(Debug)]
pub struct ChildOutput {
    inner: DuplexStream,
}

impl AsyncRead for ChildOutput {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}
