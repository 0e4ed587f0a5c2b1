//! `cove`: isolated sandboxes on this machine, in milliseconds.

mod bench;
mod bench_vm;
mod files;
mod remote;
mod run;
mod run_vm;
mod serve;
mod template;
mod tty;

use clap::{CommandFactory, Parser, Subcommand};

pub(crate) use cove_client::paths;

/// Exit status of the cove process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitCode(pub i32);

/// cove itself failed (as opposed to the sandboxed command): exit 125 with a
/// message, as `docker run` does.
#[derive(Debug)]
pub struct Failure {
    message: String,
    code: i32,
}

impl Failure {
    pub fn new(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 125,
        }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            message: message.into(),
            code: 125,
        }
    }

    pub fn message(&self) -> &str {
        &self.message
    }
}

#[derive(Debug, Parser)]
#[command(
    name = "cove",
    version,
    about = "Isolated sandboxes on this machine, in milliseconds",
    long_about = "cove creates isolated sandboxes (namespaces, overlay root, cgroup limits, seccomp) \
                  and runs commands in them, embedded (`cove run`) or through a daemon (`cove serve`).\n\n\
                  Exit codes of `cove run` and `cove exec`: the command's own code; 128+N if it was \
                  killed by signal N; 124 if it timed out; 125 if cove itself failed.",
    after_help = "Examples:\n  cove run -- uname -a\n  cove run --memory 256M --timeout 10s --shell 'echo $HOME; ls | wc -l'\n  \
                  cove serve &\n  id=$(cove create) && cove exec $id -- uname -a && cove rm $id"
)]
struct Cli {
    #[command(flatten)]
    remote: remote::Remote,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one command in a new sandbox, then destroy it (no daemon needed).
    Run(run::RunArgs),
    /// Run the daemon: the HTTP API on 127.0.0.1:7411.
    Serve(serve::ServeArgs),
    /// Create a sandbox through the daemon and print its ID.
    Create(remote::CreateArgs),
    /// List sandboxes.
    Ls {
        /// Include stopped and failed sandboxes.
        #[arg(short, long)]
        all: bool,
        /// Only sandboxes in this state.
        #[arg(long)]
        state: Option<String>,
        /// Only sandboxes with this label, KEY=VALUE (repeatable).
        #[arg(short, long = "label", value_parser = parse_kv)]
        labels: Vec<(String, String)>,
    },
    /// Show a sandbox as JSON.
    Inspect { id: String },
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(remote::ExecArgs),
    /// List the processes of a sandbox.
    Ps { id: String },
    /// Print a process's output (-f: follow it until it exits), or with
    /// --console a microVM sandbox's console log.
    Logs {
        #[arg(short, long)]
        follow: bool,
        /// Print the sandbox's console (microVM backend): kernel messages,
        /// the guest init's errors, a panic.
        #[arg(long, conflicts_with_all = ["follow", "pid"])]
        console: bool,
        id: String,
        #[arg(required_unless_present = "console")]
        pid: Option<u32>,
    },
    /// Send a signal to a process and its group (default TERM).
    Kill {
        id: String,
        pid: u32,
        #[arg(short, long, default_value = "TERM")]
        signal: String,
    },
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Freeze sandboxes (memory is kept).
    Pause {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Thaw paused sandboxes.
    Resume {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Manage API keys (needs an admin key).
    #[command(subcommand)]
    Keys(remote::KeysCommand),
    /// Manage templates.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Make a new template of a sandbox's filesystem (the sandbox keeps
    /// running; memory and processes are not kept).
    Snapshot { id: String, name: String },
    /// Measure cove's speed side by side with bubblewrap, runc and crun.
    Bench(bench::BenchArgs),
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the daemon's OpenAPI document.
    Openapi,
    /// Copy files or directories between this machine and a sandbox.
    #[command(
        after_help = "Examples:\n  cove cp ./dir ID:/workspace/\n  cove cp ID:/workspace/out.txt .\n  \
                  cove cp ID:/workspace/dir/. ./copy\n  tar -c src | cove cp - ID:/workspace"
    )]
    Cp(files::CpArgs),
    /// Look at and remove files in a sandbox.
    #[command(subcommand)]
    Files(files::FilesCommand),
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Logs go to stderr, filtered by `COVE_LOG` (`tracing` directives). By
/// default the daemon logs its own info lines and every command warnings;
/// the plain level filter is cheaper to set up than directives, which
/// `cove run` would pay on every sandbox.
fn init_logging(serving: bool) {
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match tracing_subscriber::EnvFilter::try_from_env("COVE_LOG") {
        Ok(filter) => logs.with_env_filter(filter).init(),
        Err(_) if serving => logs.with_env_filter("warn,cove_server=info").init(),
        Err(_) => logs.with_max_level(tracing::Level::WARN).init(),
    }
}

fn main() {
    // The daemon's sandbox helper must stay single-threaded: dispatch it
    // before anything else runs.
    match std::env::args().nth(1).as_deref() {
        Some("__create-sandbox") => std::process::exit(cove_server::helper_main()),
        Some("__sandbox-factory") => std::process::exit(cove_server::factory_main()),
        _ => {}
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Usage errors are cove's failures (125), not the command's.
            let code = if err.use_stderr() { 125 } else { 0 };
            let _ = err.print();
            std::process::exit(code);
        }
    };
    init_logging(matches!(cli.command, Command::Serve(_)));
    let remote = &cli.remote;
    let result = match cli.command {
        Command::Run(args) => run::run(args, remote),
        Command::Serve(args) => serve::run(args),
        Command::Create(args) => remote::create(remote, args),
        Command::Ls { all, state, labels } => remote::ls(remote, all, state, labels),
        Command::Inspect { id } => remote::inspect(remote, &id),
        Command::Exec(args) => remote::exec(remote, args),
        Command::Ps { id } => remote::ps(remote, &id),
        Command::Logs {
            console: true, id, ..
        } => remote::console(remote, &id),
        Command::Logs {
            follow,
            id,
            pid: Some(pid),
            ..
        } => remote::logs(remote, &id, pid, follow),
        Command::Logs { pid: None, .. } => Err(Failure::usage("give a process ID, or --console")),
        Command::Kill { id, pid, signal } => remote::kill(remote, &id, pid, &signal),
        Command::Rm { ids } => remote::rm(remote, &ids),
        Command::Pause { ids } => remote::pause(remote, &ids, false),
        Command::Resume { ids } => remote::pause(remote, &ids, true),
        Command::Keys(cmd) => remote::keys(remote, cmd),
        Command::Template(cmd) => template::run(cmd),
        Command::Snapshot { id, name } => remote::snapshot(remote, &id, &name),
        Command::Bench(args) => bench::run(args),
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "cove", &mut std::io::stdout());
            Ok(ExitCode(0))
        }
        Command::Openapi => {
            print!("{}", cove_server::api::openapi_json());
            Ok(ExitCode(0))
        }
        Command::Cp(args) => files::cp(remote, args),
        Command::Files(cmd) => files::run(remote, cmd),
    };
    match result {
        Ok(ExitCode(code)) => std::process::exit(code),
        Err(failure) => {
            eprintln!("cove: {}", failure.message);
            std::process::exit(failure.code);
        }
    }
}
