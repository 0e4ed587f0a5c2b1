//! The CLI as a client of `cove serve`: create, ls, inspect, exec, rm,
//! pause, resume, keys. `--url`/`COVE_URL` and `--key`/`COVE_KEY` default
//! to the local daemon and its admin key file.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Read, Write};
use std::time::Duration;

use cove_client::Client;
use cove_client::api::{
    CreateKeyRequest, CreateSandboxRequest, DurationValue, Encoding, ExecRequest, Sandbox, Scope,
    SizeValue,
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

pub fn exec(remote: &Remote, args: ExecArgs) -> Result<ExitCode, Failure> {
    let mut req = ExecRequest {
        env: args.env.into_iter().collect(),
        cwd: args.workdir,
        user: args.user,
        timeout: args.timeout.map(DurationValue),
        encoding: Encoding::Base64,
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
    if !std::io::stdin().is_terminal() {
        let mut input = Vec::new();
        std::io::stdin()
            .read_to_end(&mut input)
            .map_err(|e| Failure::new(format!("reading stdin: {e}")))?;
        if !input.is_empty() {
            use base64::Engine as _;
            req.stdin = Some(base64::engine::general_purpose::STANDARD.encode(input));
        }
    }
    let result = runtime()?
        .block_on(remote.client().exec(&args.id, &req))
        .map_err(fail)?;
    use base64::Engine as _;
    let decode = |s: &str| {
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .unwrap_or_default()
    };
    let _ = std::io::stdout().write_all(&decode(&result.stdout));
    let _ = std::io::stderr().write_all(&decode(&result.stderr));
    if result.timed_out {
        eprintln!("cove: the command timed out and was killed");
    }
    if result.oom_killed {
        eprintln!("cove: the command was killed: out of memory");
    }
    Ok(ExitCode(result.exit_code))
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
