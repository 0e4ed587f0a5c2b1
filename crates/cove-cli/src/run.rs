//! `cove run`: the embedded engine. Create a sandbox in this process, run
//! one command in it with stdio streamed to the terminal, destroy it, and
//! exit with the command's status.

use std::path::{Path, PathBuf};
use std::time::Duration;

use cove_isolate::{Layout, Limits, Sandbox, SandboxRecord};
use cove_protocol::client::{AgentClient, ProcessEvent};
use cove_protocol::{CommandLine, ProcessSpec, PtySize, Stream};
use cove_template::TemplateStore;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use cove_api::units;
use cove_server::engine::{self, SandboxOptions};

use crate::{ExitCode, Failure, paths, tty};

/// `cove run` arguments.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// Template to start from (see `cove template ls`) [default: host;
    /// busybox with --backend microvm].
    #[arg(long, value_name = "T")]
    pub template: Option<String>,
    /// Where the sandbox runs: namespace (on this kernel, milliseconds to
    /// start) or microvm (its own kernel in a QEMU microVM, seconds).
    #[arg(long, value_name = "B", default_value = "namespace", value_parser = ["namespace", "microvm"])]
    pub backend: String,
    /// Memory limit, e.g. 512M or 2G.
    #[arg(long, value_parser = units::parse_size, value_name = "SIZE")]
    pub memory: Option<u64>,
    /// CPU limit in CPUs, e.g. 0.5 or 1.5.
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    /// Maximum number of processes and threads.
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    /// Size cap of the sandbox's writable layer (memory-backed).
    #[arg(long, value_parser = units::parse_size, value_name = "SIZE", default_value = "1G")]
    pub disk: u64,
    /// Kill the command and everything it started after this long, e.g.
    /// 30s, 1500ms, 5m; 0 = no limit. Exit code 124 on timeout.
    #[arg(long, value_parser = units::parse_duration, value_name = "DURATION", default_value = "0")]
    pub timeout: Duration,
    /// Set an environment variable (repeatable).
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Working directory inside the sandbox.
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// User to run as: a name, a uid, or uid:gid.
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Allocate a terminal for the command (for interactive programs).
    #[arg(short, long)]
    pub tty: bool,
    /// Run this string with /bin/sh -c instead of CMD.
    #[arg(long, value_name = "SCRIPT", conflicts_with = "command")]
    pub shell: Option<String>,
    /// Network (--network, --allow-out, --deny-out, -p): a sandbox with
    /// any of these is created by the local daemon (`cove serve`), which
    /// owns the bridge, nftables table and DNS forwarder.
    #[command(flatten)]
    pub network: crate::remote::NetworkArgs,
    /// Run the template's ENTRYPOINT with CMD as its arguments, as
    /// `docker run IMAGE [ARGS…]` does: arguments given replace CMD.
    #[arg(long, conflicts_with = "shell")]
    pub entrypoint: bool,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

pub fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some(("", _)) => Err(format!("{s:?}: the variable name is empty")),
        Some((k, v)) => Ok((k.to_string(), v.to_string())),
        None => match std::env::var(s) {
            // `-e NAME` passes the variable through, as docker does.
            Ok(v) => Ok((s.to_string(), v)),
            Err(_) => Err(format!("{s:?} is not KEY=VALUE and is not set here")),
        },
    }
}

/// What `--entrypoint` runs: ENTRYPOINT, then `args`, or CMD when no
/// arguments are given.
pub fn entrypoint_argv(config: &cove_template::ImageConfig, args: &[String]) -> Vec<String> {
    let mut argv = config.entrypoint.clone();
    if args.is_empty() {
        argv.extend(config.cmd.iter().cloned());
    } else {
        argv.extend(args.iter().cloned());
    }
    argv
}

/// Where `cove run` keeps its sandboxes' state.
fn state_root() -> PathBuf {
    paths::default_runtime_dir().join("run")
}

pub fn run(mut args: RunArgs, remote: &crate::remote::Remote) -> Result<ExitCode, Failure> {
    let store = TemplateStore::new(paths::default_data_dir().join("templates"));
    if args.entrypoint {
        let name = args
            .template
            .as_deref()
            .unwrap_or(if args.backend == "microvm" {
                cove_server::backend::microvm::DEFAULT_VM_TEMPLATE
            } else {
                cove_template::DEFAULT_TEMPLATE
            });
        let template = store.get(name).map_err(|e| Failure::new(e.to_string()))?;
        let argv = entrypoint_argv(&template.meta.config, &args.command);
        if argv.is_empty() {
            return Err(Failure::usage(format!(
                "template {name} has no ENTRYPOINT or CMD; give a command"
            )));
        }
        args.command = argv;
        args.entrypoint = false;
    }
    if !args.network.is_empty() {
        return run_through_daemon(args, remote);
    }
    let command = match (&args.shell, args.command.is_empty()) {
        (Some(script), _) => CommandLine::Shell(script.clone()),
        (None, false) => CommandLine::Argv(args.command.clone()),
        (None, true) => {
            return Err(Failure::usage(
                "nothing to run: give a command after `--`, --shell 'SCRIPT', \
                 or --entrypoint (the template's ENTRYPOINT and CMD)",
            ));
        }
    };
    if !paths::is_root() {
        return Err(Failure::new(
            "cove run needs root to create namespaces and cgroups (try sudo)",
        ));
    }
    if args.backend == "microvm" {
        let spec = process_spec(&args, command);
        return crate::run_vm::run(&args, spec);
    }
    let limits = Limits {
        memory: args.memory,
        cpus: args.cpus,
        pids: args.pids,
    };
    engine::validate_limits(&limits).map_err(Failure::new)?;
    let template = store
        .get(
            args.template
                .as_deref()
                .unwrap_or(cove_template::DEFAULT_TEMPLATE),
        )
        .map_err(|e| Failure::new(e.to_string()))?;
    let options = SandboxOptions {
        limits,
        disk: Some(args.disk),
        env: args.env.clone(),
        cwd: None,
        user: None,
        cgroup_parent: paths::cgroup_parent(),
        ..SandboxOptions::default()
    };

    let root = state_root();
    sweep_stale(&root);
    let id = engine::new_id();
    let mut config = engine::sandbox_config(&id, &template, &options, &root);
    config.die_with_parent = true;
    // Nothing reads the sandbox's use: no cgroup where no limit needs one.
    config.accounting = false;

    // Still single-threaded here, as `create` requires.
    let layout = Layout::detect();
    let mut sandbox =
        cove_isolate::create(&config, &layout).map_err(|e| Failure::new(e.to_string()))?;
    let Some(connection) = sandbox.take_connection() else {
        let _ = sandbox.destroy();
        return Err(Failure::new(
            "internal error: the sandbox has no agent connection",
        ));
    };

    let spec = process_spec(&args, command);

    let outcome = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))
        .and_then(|rt| {
            let outcome = rt.block_on(async {
                let signals = catch_signals(args.tty);
                let stream = std::os::unix::net::UnixStream::from(connection);
                stream
                    .set_nonblocking(true)
                    .map_err(|e| Failure::new(format!("agent socket: {e}")))?;
                let stream = tokio::net::UnixStream::from_std(stream)
                    .map_err(|e| Failure::new(format!("agent socket: {e}")))?;
                drive(signals, stream, spec, args.tty, args.timeout, args.memory).await
            });
            // The stdin reader may be blocked on a terminal read forever:
            // do not wait for it.
            rt.shutdown_background();
            outcome
        });
    let destroyed = sandbox.destroy();
    let code = outcome?;
    if let Err(err) = destroyed {
        eprintln!("cove: warning: cleaning up sandbox {id}: {err}");
    }
    Ok(code)
}

/// The command as the agent runs it.
fn process_spec(args: &RunArgs, command: CommandLine) -> ProcessSpec {
    let mut spec = ProcessSpec::new(command);
    spec.cwd = args.workdir.clone();
    spec.user = args.user.clone();
    spec.timeout_ms = args.timeout.as_millis() as u64;
    spec.stdin = true;
    if args.tty {
        let (rows, cols) = tty::size().unwrap_or((24, 80));
        spec.pty = Some(PtySize { rows, cols });
    }
    spec
}

/// Talk to the agent on `stream` until the command ends. Returns the exit
/// code. `signals` were caught before the sandbox started, so none is lost.
pub(crate) async fn drive(
    signals: Signals,
    stream: tokio::net::UnixStream,
    spec: ProcessSpec,
    tty: bool,
    timeout: Duration,
    memory: Option<u64>,
) -> Result<ExitCode, Failure> {
    let client = AgentClient::connect(stream, "cove-run")
        .await
        .map_err(|e| Failure::new(e.to_string()))?;
    let mut process = client
        .spawn(spec)
        .await
        .map_err(|e| Failure::new(e.to_string()))?;

    let raw = if tty { tty::RawMode::enable() } else { None };
    if let Some(mut stdin) = process.take_stdin() {
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if stdin.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
            let _ = stdin.flush().await;
            let _ = stdin.close().await;
        });
    }
    forward_signals(signals, &client, process.pid());

    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let status = loop {
        match process.next_event().await {
            Ok(ProcessEvent::Output {
                stream: Stream::Stdout,
                data,
                ..
            }) => {
                let _ = stdout.write_all(&data).await;
                let _ = stdout.flush().await;
            }
            Ok(ProcessEvent::Output {
                stream: Stream::Stderr,
                data,
                ..
            }) => {
                let _ = stderr.write_all(&data).await;
                let _ = stderr.flush().await;
            }
            Ok(ProcessEvent::Exited(status)) => break status,
            Ok(ProcessEvent::Dropped { .. }) => {}
            Err(err) => {
                drop(raw);
                return Err(Failure::new(format!("lost the sandbox's agent: {err}")));
            }
        }
    };
    drop(raw);
    if status.timed_out {
        eprintln!(
            "cove: the command timed out after {} and was killed",
            units::format_duration(timeout)
        );
    } else if status.oom_killed {
        let limit = memory
            .map(units::format_size)
            .unwrap_or_else(|| "the host's".into());
        eprintln!("cove: the command was killed: out of memory (memory limit {limit})");
    }
    if status.stdout_truncated || status.stderr_truncated {
        eprintln!("cove: output was truncated");
    }
    Ok(ExitCode(status.shell_code()))
}

/// Signals a user sends to `cove run`, caught from the start so that none
/// is lost (or kills cove) before the command's PID is known.
pub(crate) struct Signals {
    streams: Vec<(tokio::signal::unix::Signal, i32)>,
    winch: Option<tokio::signal::unix::Signal>,
}

pub(crate) fn catch_signals(tty: bool) -> Signals {
    use tokio::signal::unix::{SignalKind, signal};
    let mut kinds = vec![
        (SignalKind::terminate(), libc::SIGTERM),
        (SignalKind::hangup(), libc::SIGHUP),
    ];
    if !tty {
        // On a terminal, ^C and ^\ travel to the command as bytes instead.
        kinds.push((SignalKind::interrupt(), libc::SIGINT));
        kinds.push((SignalKind::quit(), libc::SIGQUIT));
    }
    Signals {
        streams: kinds
            .into_iter()
            .filter_map(|(kind, n)| signal(kind).ok().map(|s| (s, n)))
            .collect(),
        winch: if tty {
            signal(SignalKind::window_change()).ok()
        } else {
            None
        },
    }
}

/// Pass caught signals on to the command's process group, and terminal
/// size changes to its terminal.
fn forward_signals(signals: Signals, client: &AgentClient, pid: u32) {
    for (mut stream, number) in signals.streams {
        let client = client.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let _ = client.signal(pid, number, true).await;
            }
        });
    }
    if let Some(mut winch) = signals.winch {
        let client = client.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some((rows, cols)) = tty::size() {
                    let _ = client.resize(pid, rows, cols).await;
                }
            }
        });
    }
}

/// Clean up after `cove run`s that were killed: their sandbox died with
/// them (it is bound to its creator), but cgroups and state remain.
fn sweep_stale(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let Some(record) = SandboxRecord::load(&entry.path()) else {
            continue;
        };
        let owner = nix::unistd::Pid::from_raw(record.owner as i32);
        if nix::sys::signal::kill(owner, None).is_ok() {
            continue;
        }
        let result = match Sandbox::reattach(record.clone()) {
            Ok(sandbox) => sandbox.destroy(),
            Err(_) => record.clean_up(),
        };
        if let Err(err) = result {
            tracing::warn!(%err, id = %record.id, "cannot clean up a stale sandbox");
        }
    }
}

/// `cove run` with network flags: create the sandbox through the daemon,
/// run the command attached, delete the sandbox whatever happened.
fn run_through_daemon(args: RunArgs, remote: &crate::remote::Remote) -> Result<ExitCode, Failure> {
    if args.shell.is_none() && args.command.is_empty() {
        return Err(Failure::usage(
            "nothing to run: give a command after `--`, or --shell 'SCRIPT'",
        ));
    }
    let req = cove_api::CreateSandboxRequest {
        template: args.template.clone(),
        backend: Some(args.backend.clone()),
        env: args.env.iter().cloned().collect(),
        memory: args.memory.map(cove_api::SizeValue),
        cpus: args.cpus,
        pids: args.pids,
        disk: Some(cove_api::SizeValue(args.disk)),
        network: args.network.request(),
        ..cove_api::CreateSandboxRequest::default()
    };
    let client = remote.client();
    let sandbox = crate::remote::runtime()?
        .block_on(client.create_sandbox(&req))
        .map_err(|e| {
            let failure = crate::remote::fail(e);
            Failure::new(format!(
                "{} (cove run with network flags needs the daemon: cove serve)",
                failure.message
            ))
        })?;
    for port in &sandbox.network.ports {
        eprintln!(
            "cove: port {} of {} is published on {}:{}",
            port.port, sandbox.id, port.host_ip, port.host_port
        );
    }
    let exec = crate::remote::ExecArgs {
        id: sandbox.id.clone(),
        env: Vec::new(),
        workdir: args.workdir,
        user: args.user,
        timeout: (!args.timeout.is_zero()).then_some(args.timeout),
        shell: args.shell,
        detach: false,
        interactive: args.tty,
        tty: args.tty,
        tag: None,
        command: args.command,
    };
    let code = crate::remote::exec(remote, exec);
    let deleted = crate::remote::runtime()?.block_on(client.delete_sandbox(&sandbox.id));
    if let Err(err) = deleted {
        eprintln!("cove: cannot delete sandbox {}: {err}", sandbox.id);
    }
    code
}
