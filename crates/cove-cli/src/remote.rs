//! The CLI as a client of `cove serve`: create, ls, inspect, exec, rm,
//! pause, resume, keys. `--url`/`COVE_URL` and `--key`/`COVE_KEY` default
//! to the local daemon and its admin key file.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::time::Duration;

use cove_client::Client;
use cove_client::api::{
    CreateKeyRequest, CreateSandboxRequest, DurationValue, ExecRequest, Sandbox, Scope, SizeValue,
};

use crate::run::parse_env;
use crate::{ExitCode, Failure};

/// Where the daemon is.
#[derive(Debug, Clone, clap::Args)]
pub struct Remote {
    /// The daemon's URL.
    #[arg(long, env = "COVE_URL", default_value = cove_client::DEFAULT_URL, global = true)]
    pub url: String,
    /// API key (default: the local admin key file, when readable).
    #[arg(long, env = "COVE_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Remote {
    pub(crate) fn client(&self) -> Client {
        let key = self
            .key
            .clone()
            .or_else(cove_client::paths::local_admin_key);
        Client::new(self.url.clone(), key)
    }
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Template to start from.
    #[arg(long, value_name = "T")]
    pub template: Option<String>,
    #[arg(long, value_parser = cove_api::units::parse_size, value_name = "SIZE")]
    pub memory: Option<u64>,
    #[arg(long, value_name = "N")]
    pub cpus: Option<f64>,
    #[arg(long, value_name = "N")]
    pub pids: Option<u64>,
    #[arg(long, value_parser = cove_api::units::parse_size, value_name = "SIZE")]
    pub disk: Option<u64>,
    /// Destroy the sandbox after this long (e.g. 10m); 0 = never.
    #[arg(long, value_parser = cove_api::units::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    /// Default working directory.
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    /// Default user.
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// A label, KEY=VALUE (repeatable).
    #[arg(short, long = "label", value_name = "KEY=VALUE", value_parser = parse_label)]
    pub labels: Vec<(String, String)>,
    /// Backend: namespace (default) or microvm.
    #[arg(long)]
    pub backend: Option<String>,
    #[command(flatten)]
    pub network: NetworkArgs,
}

/// Network flags of `cove create` and `cove run` (docs/network.md).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct NetworkArgs {
    /// none (default: loopback only) or egress (a veth into cove's bridge,
    /// NAT, filtered by --allow-out/--deny-out).
    #[arg(long, value_name = "MODE", value_parser = ["none", "egress"])]
    pub network: Option<String>,
    /// Where the sandbox may connect: a CIDR, address or host name
    /// (repeatable; implies egress). With any, nothing else is reachable.
    #[arg(long = "allow-out", value_name = "TARGET")]
    pub allow_out: Vec<String>,
    /// Where it may not connect (repeatable; implies egress; wins over --allow-out).
    #[arg(long = "deny-out", value_name = "TARGET")]
    pub deny_out: Vec<String>,
    /// Publish a port on the host's 127.0.0.1: PORT (host port picked
    /// for you) or HOST_PORT:PORT (repeatable).
    #[arg(short = 'p', long = "publish", value_name = "[HOST_PORT:]PORT", value_parser = parse_publish)]
    pub publish: Vec<cove_api::PortRequest>,
}

impl NetworkArgs {
    pub fn request(&self) -> cove_api::NetworkRequest {
        cove_api::NetworkRequest {
            mode: self.network.as_deref().map(|m| match m {
                "egress" => cove_api::NetworkMode::Egress,
                _ => cove_api::NetworkMode::None,
            }),
            allow_out: self.allow_out.clone(),
            deny_out: self.deny_out.clone(),
            exposed_ports: self.publish.clone(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.network.is_none()
            && self.allow_out.is_empty()
            && self.deny_out.is_empty()
            && self.publish.is_empty()
    }
}

fn parse_publish(s: &str) -> Result<cove_api::PortRequest, String> {
    let port = |p: &str| {
        p.parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .ok_or_else(|| format!("{p:?} is not a port (1-65535)"))
    };
    match s.split_once(':') {
        Some((host, inner)) => Ok(cove_api::PortRequest {
            port: port(inner)?,
            host_port: Some(port(host)?),
        }),
        None => Ok(cove_api::PortRequest {
            port: port(s)?,
            host_port: None,
        }),
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

#[derive(Debug, clap::Args)]
pub struct ExecArgs {
    /// The sandbox.
    pub id: String,
    #[arg(short, long = "env", value_name = "KEY=VALUE", value_parser = parse_env)]
    pub env: Vec<(String, String)>,
    #[arg(short = 'w', long, value_name = "DIR")]
    pub workdir: Option<String>,
    #[arg(short, long, value_name = "USER")]
    pub user: Option<String>,
    /// Kill the command (and everything it started) after this long.
    #[arg(long, value_parser = cove_api::units::parse_duration, value_name = "DURATION")]
    pub timeout: Option<Duration>,
    /// Run this string with /bin/sh -c instead of CMD.
    #[arg(long, value_name = "SCRIPT", conflicts_with = "command")]
    pub shell: Option<String>,
    /// Start in the background and print the process ID.
    #[arg(short = 'd', long)]
    pub detach: bool,
    /// Pass stdin to the command (implied when stdin is not a terminal).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (with -i: an interactive shell).
    #[arg(short, long)]
    pub tty: bool,
    /// A label for the process, shown by `cove ps`.
    #[arg(long)]
    pub tag: Option<String>,
    /// The command and its arguments.
    #[arg(trailing_var_arg = true, value_name = "CMD")]
    pub command: Vec<String>,
}

#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once.
    Create {
        #[arg(long)]
        name: String,
        /// Whose sandboxes the key sees (default: the name).
        #[arg(long)]
        owner: Option<String>,
        /// Comma-separated: sandboxes:read, sandboxes:write, exec, admin.
        #[arg(long, value_delimiter = ',', value_parser = parse_scope, required = true)]
        scope: Vec<Scope>,
    },
    /// List keys.
    Ls,
    /// Revoke a key.
    Revoke { id: String },
}

fn parse_scope(s: &str) -> Result<Scope, String> {
    Scope::parse(s).ok_or_else(|| {
        format!("{s:?} is not a scope (sandboxes:read, sandboxes:write, exec, admin)")
    })
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::new(format!("cannot start the runtime: {e}")))
}

pub(crate) fn fail(err: cove_client::Error) -> Failure {
    let mut message = err.to_string();
    if matches!(err, cove_client::Error::Connect { .. }) {
        message.push_str("; is `cove serve` running? (set --url or COVE_URL for a remote daemon)");
    }
    if err.status() == Some(401) {
        message
            .push_str("; pass --key or COVE_KEY, or run as a user who can read the admin key file");
    }
    Failure::new(message)
}

fn print_json(value: &impl serde::Serialize) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| Failure::new(e.to_string()))?;
    println!("{text}");
    Ok(())
}

fn ago(rfc3339: &str) -> String {
    rfc3339
        .replace('T', " ")
        .trim_end_matches('Z')
        .split('.')
        .next()
        .unwrap_or("")
        .to_string()
}

fn print_table(sandboxes: &[Sandbox]) {
    println!(
        "{:<13} {:<9} {:<10} {:<20} {:<20} LABELS",
        "ID", "STATE", "TEMPLATE", "CREATED", "EXPIRES"
    );
    for s in sandboxes {
        let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!(
            "{:<13} {:<9} {:<10} {:<20} {:<20} {}",
            s.id,
            s.state.as_str(),
            s.template,
            ago(&s.created_at),
            s.expires_at
                .as_deref()
                .map(ago)
                .unwrap_or_else(|| "-".into()),
            labels.join(",")
        );
    }
}

pub fn create(remote: &Remote, args: CreateArgs) -> Result<ExitCode, Failure> {
    let req = CreateSandboxRequest {
        template: args.template,
        env: args.env.into_iter().collect::<BTreeMap<_, _>>(),
        cwd: args.workdir,
        user: args.user,
        memory: args.memory.map(SizeValue),
        cpus: args.cpus,
        pids: args.pids,
        disk: args.disk.map(SizeValue),
        timeout: args.timeout.map(DurationValue),
        labels: args.labels.into_iter().collect(),
        backend: args.backend,
        network: args.network.request(),
        ..CreateSandboxRequest::default()
    };
    let sandbox = runtime()?
        .block_on(remote.client().create_sandbox(&req))
        .map_err(fail)?;
    if remote.json {
        print_json(&sandbox)?;
    } else {
        println!("{}", sandbox.id);
    }
    Ok(ExitCode(0))
}

pub fn ls(
    remote: &Remote,
    all: bool,
    state: Option<String>,
    labels: Vec<(String, String)>,
) -> Result<ExitCode, Failure> {
    let mut query = Vec::new();
    if let Some(state) = state {
        query.push(format!("state={state}"));
    }
    if !labels.is_empty() {
        let joined: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        query.push(format!("label={}", joined.join(",")));
    }
    let client = remote.client();
    let rt = runtime()?;
    let mut sandboxes = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut q = query.clone();
        if let Some(c) = &cursor {
            q.push(format!("cursor={c}"));
        }
        let page = rt
            .block_on(client.list_sandboxes(&q.join("&")))
            .map_err(fail)?;
        sandboxes.extend(page.sandboxes);
        match page.next_cursor {
            Some(next) => cursor = Some(next),
            None => break,
        }
    }
    if !all {
        sandboxes.retain(|s| !s.state.is_final());
    }
    if remote.json {
        print_json(&sandboxes)?;
    } else {
        print_table(&sandboxes);
    }
    Ok(ExitCode(0))
}

pub fn inspect(remote: &Remote, id: &str) -> Result<ExitCode, Failure> {
    let sandbox = runtime()?
        .block_on(remote.client().get_sandbox(id))
        .map_err(fail)?;
    print_json(&sandbox)?;
    Ok(ExitCode(0))
}

pub fn rm(remote: &Remote, ids: &[String]) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    let mut code = 0;
    for id in ids {
        match rt.block_on(client.delete_sandbox(id)) {
            Ok(()) => println!("{id}"),
            Err(err) => {
                eprintln!("cove: {id}: {}", fail(err).message());
                code = 1;
            }
        }
    }
    Ok(ExitCode(code))
}

pub fn pause(remote: &Remote, ids: &[String], resume: bool) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    let mut code = 0;
    for id in ids {
        let result = if resume {
            rt.block_on(client.resume_sandbox(id))
        } else {
            rt.block_on(client.pause_sandbox(id))
        };
        match result {
            Ok(s) => println!("{} {}", s.id, s.state.as_str()),
            Err(err) => {
                eprintln!("cove: {id}: {}", fail(err).message());
                code = 1;
            }
        }
    }
    Ok(ExitCode(code))
}

/// `cove snapshot ID NAME`: a new template of a sandbox's filesystem.
pub fn snapshot(remote: &Remote, id: &str, name: &str) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    let info = rt
        .block_on(client.snapshot_sandbox(id, name))
        .map_err(fail)?;
    println!(
        "{} (snapshot of {id}, {} layers)",
        info.name,
        info.layers.len()
    );
    Ok(ExitCode(0))
}

pub fn exec(remote: &Remote, args: ExecArgs) -> Result<ExitCode, Failure> {
    let stdin_is_tty = std::io::stdin().is_terminal();
    let forward_stdin = args.interactive || (!stdin_is_tty && !args.detach);
    let mut req = ExecRequest {
        env: args.env.into_iter().collect(),
        cwd: args.workdir,
        user: args.user,
        timeout: args.timeout.map(DurationValue),
        tag: args.tag,
        background: true,
        stdin_open: forward_stdin,
        ..ExecRequest::default()
    };
    match (args.shell, args.command.is_empty()) {
        (Some(script), _) => req.cmd = Some(script),
        (None, false) => req.argv = Some(args.command),
        (None, true) => {
            return Err(Failure::new(
                "nothing to run: give a command after `--`, or --shell 'SCRIPT'",
            ));
        }
    }
    if args.tty {
        let (rows, cols) = crate::tty::size().unwrap_or((24, 80));
        req.pty = Some(cove_client::api::PtyRequest { rows, cols });
    }
    let client = remote.client();
    let rt = runtime()?;
    let pid = rt
        .block_on(client.exec_background(&args.id, &req))
        .map_err(fail)?;
    if args.detach {
        println!("{pid}");
        return Ok(ExitCode(0));
    }
    let raw = if args.tty && stdin_is_tty {
        crate::tty::RawMode::enable()
    } else {
        None
    };
    let code = rt.block_on(interact(&client, &args.id, pid, forward_stdin, args.tty));
    drop(raw);
    // The stdin reader may be blocked on a terminal read forever: do not
    // wait for it.
    rt.shutdown_background();
    code
}

/// Attach to a process: stdin in, output out, signals and window size
/// passed on, until it exits. Returns its exit code.
async fn interact(
    client: &Client,
    id: &str,
    pid: u32,
    forward_stdin: bool,
    tty: bool,
) -> Result<ExitCode, Failure> {
    use futures::{SinkExt, StreamExt};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::signal::unix::{SignalKind, signal};
    use tokio_tungstenite::tungstenite::Message;

    let socket = client.attach(id, pid).await.map_err(fail)?;
    let (mut sink, mut source) = socket.split();
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(16);
    tokio::spawn(async move {
        while let Some(message) = rx.recv().await {
            if sink.send(message).await.is_err() {
                break;
            }
        }
    });
    if forward_stdin {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut input = tokio::io::stdin();
            let mut buf = vec![0u8; 32 * 1024];
            loop {
                match input.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if tx
                            .send(Message::Binary(buf[..n].to_vec().into()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = tx
                .send(Message::Text(r#"{"type":"close_stdin"}"#.into()))
                .await;
        });
    }
    let mut kinds = vec![
        (SignalKind::terminate(), "TERM"),
        (SignalKind::hangup(), "HUP"),
    ];
    if !tty {
        // On a terminal ^C and ^\ travel as bytes to the sandbox's terminal.
        kinds.push((SignalKind::interrupt(), "INT"));
        kinds.push((SignalKind::quit(), "QUIT"));
    }
    for (kind, name) in kinds {
        let Ok(mut stream) = signal(kind) else {
            continue;
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                let text = format!(r#"{{"type":"signal","signal":"{name}"}}"#);
                let _ = tx.send(Message::Text(text.into())).await;
            }
        });
    }
    if tty && let Ok(mut winch) = signal(SignalKind::window_change()) {
        let tx = tx.clone();
        tokio::spawn(async move {
            while winch.recv().await.is_some() {
                if let Some((rows, cols)) = crate::tty::size() {
                    let text = format!(r#"{{"type":"resize","rows":{rows},"cols":{cols}}}"#);
                    let _ = tx.send(Message::Text(text.into())).await;
                }
            }
        });
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    let mut last = String::from("end of stream");
    while let Some(message) = source.next().await {
        match message {
            Ok(Message::Binary(frame)) if !frame.is_empty() => {
                let (stream, data) = (frame[0], &frame[1..]);
                if stream == 2 {
                    let _ = stderr.write_all(data).await;
                    let _ = stderr.flush().await;
                } else {
                    let _ = stdout.write_all(data).await;
                    let _ = stdout.flush().await;
                }
            }
            Ok(Message::Text(text)) => {
                let value: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
                match value["type"].as_str() {
                    Some("exit") => {
                        if value["timed_out"] == true {
                            eprintln!("cove: the command timed out and was killed");
                        }
                        if value["oom_killed"] == true {
                            eprintln!("cove: the command was killed: out of memory");
                        }
                        return Ok(ExitCode(value["exit_code"].as_i64().unwrap_or(1) as i32));
                    }
                    Some("dropped") => eprintln!("cove: some output was lost: {text}"),
                    Some("error") => {
                        return Err(Failure::new(format!(
                            "lost the process: {}",
                            value["message"]
                        )));
                    }
                    _ => {}
                }
            }
            Ok(Message::Close(frame)) => {
                last = format!("closed by the daemon: {frame:?}");
                break;
            }
            Err(err) => {
                last = err.to_string();
                break;
            }
            Ok(_) => {}
        }
    }
    Err(Failure::new(format!(
        "the connection to process {pid} ended before it exited ({last}); it may still run (`cove ps {id}`)"
    )))
}

pub fn ps(remote: &Remote, id: &str) -> Result<ExitCode, Failure> {
    let list = runtime()?
        .block_on(remote.client().processes(id))
        .map_err(fail)?;
    if remote.json {
        print_json(&list.processes)?;
        return Ok(ExitCode(0));
    }
    println!(
        "{:<8} {:<8} {:<6} {:<12} {:<20} COMMAND",
        "PID", "STATE", "EXIT", "TAG", "STARTED"
    );
    for p in list.processes {
        let exit = p
            .exit
            .as_ref()
            .map(|e| e.exit_code.to_string())
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<8} {:<8} {:<6} {:<12} {:<20} {}",
            p.pid,
            p.state,
            exit,
            p.tag.as_deref().unwrap_or("-"),
            ago(&p.started_at),
            p.argv.join(" ")
        );
    }
    Ok(ExitCode(0))
}

pub fn logs(remote: &Remote, id: &str, pid: u32, follow: bool) -> Result<ExitCode, Failure> {
    use cove_client::process::StreamEvent;
    use futures::StreamExt;
    let client = remote.client();
    let rt = runtime()?;
    rt.block_on(async {
        // Without -f, stop at what the process had written when we asked.
        let info = client.process(id, pid).await.map_err(fail)?;
        let until = [info.stdout_bytes, info.stderr_bytes];
        let events = client.stream_process(id, pid, [0, 0]).await.map_err(fail)?;
        futures::pin_mut!(events);
        let mut seen = [0u64, 0u64];
        while let Some(item) = events.next().await {
            let (event, _) = item.map_err(fail)?;
            match event {
                StreamEvent::Output {
                    stream,
                    offset,
                    data,
                } => {
                    let i = usize::from(stream == "stderr");
                    seen[i] = offset + data.len() as u64;
                    if i == 1 {
                        let _ = std::io::stderr().write_all(&data);
                    } else {
                        let _ = std::io::stdout().write_all(&data);
                        let _ = std::io::stdout().flush();
                    }
                }
                StreamEvent::Dropped { stream, from, to } => {
                    eprintln!(
                        "cove: {} bytes {from}..{to} of {stream} are no longer kept",
                        to - from
                    );
                    seen[usize::from(stream == "stderr")] = to;
                }
                StreamEvent::Exit(_) | StreamEvent::Error(_) => break,
                StreamEvent::Start { .. } => {}
            }
            if !follow && seen[0] >= until[0] && seen[1] >= until[1] {
                break;
            }
        }
        Ok(ExitCode(0))
    })
}

/// `cove logs --console ID`: a microVM's serial console.
pub fn console(remote: &Remote, id: &str) -> Result<ExitCode, Failure> {
    let log = runtime()?
        .block_on(remote.client().console(id))
        .map_err(fail)?;
    let mut out = std::io::stdout();
    let _ = out.write_all(&log);
    let _ = out.flush();
    Ok(ExitCode(0))
}

pub fn kill(remote: &Remote, id: &str, pid: u32, signal: &str) -> Result<ExitCode, Failure> {
    runtime()?
        .block_on(remote.client().signal(id, pid, signal))
        .map_err(fail)?;
    Ok(ExitCode(0))
}

pub fn keys(remote: &Remote, command: KeysCommand) -> Result<ExitCode, Failure> {
    let client = remote.client();
    let rt = runtime()?;
    match command {
        KeysCommand::Create { name, owner, scope } => {
            let created = rt
                .block_on(client.create_key(&CreateKeyRequest {
                    name,
                    owner,
                    scopes: scope,
                }))
                .map_err(fail)?;
            if remote.json {
                print_json(&created)?;
            } else {
                println!("{}", created.key);
                eprintln!(
                    "created {} for owner {}; the key above is shown only once",
                    created.info.id, created.info.owner
                );
            }
        }
        KeysCommand::Ls => {
            let keys = rt.block_on(client.list_keys()).map_err(fail)?;
            if remote.json {
                print_json(&keys)?;
            } else {
                println!(
                    "{:<13} {:<16} {:<16} {:<8} SCOPES",
                    "ID", "NAME", "OWNER", "REVOKED"
                );
                for k in keys.keys {
                    let scopes: Vec<&str> = k.scopes.iter().map(|s| s.as_str()).collect();
                    println!(
                        "{:<13} {:<16} {:<16} {:<8} {}",
                        k.id,
                        k.name,
                        k.owner,
                        if k.revoked { "yes" } else { "no" },
                        scopes.join(",")
                    );
                }
            }
        }
        KeysCommand::Revoke { id } => {
            rt.block_on(client.revoke_key(&id)).map_err(fail)?;
            println!("revoked {id}");
        }
    }
    Ok(ExitCode(0))
}
