//! `cove`: isolated sandboxes on this machine, in milliseconds.

mod bench;
mod engine;
mod paths;
mod run;
mod template;
mod tty;
mod units;

use clap::{Parser, Subcommand};

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
}

#[derive(Debug, Parser)]
#[command(
    name = "cove",
    version,
    about = "Isolated sandboxes on this machine, in milliseconds",
    long_about = "cove creates isolated sandboxes (namespaces, overlay root, cgroup limits, seccomp) \
                  and runs commands in them.\n\nExit codes of `cove run`: the command's own code; \
                  128+N if it was killed by signal N; 124 if it timed out; 125 if cove itself failed.",
    after_help = "Examples:\n  cove run -- uname -a\n  cove run --memory 256M --timeout 10s --shell 'echo $HOME; ls | wc -l'\n  cove template build busybox && cove run --template busybox -- sh -c 'ls /bin | wc -l'"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one command in a new sandbox, then destroy it (no daemon needed).
    Run(run::RunArgs),
    /// Manage templates.
    #[command(subcommand)]
    Template(template::TemplateCommand),
    /// Measure cove's speed side by side with bubblewrap, runc and crun.
    Bench(bench::BenchArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("COVE_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            // Usage errors are cove's failures (125), not the command's.
            let code = if err.use_stderr() { 125 } else { 0 };
            let _ = err.print();
            std::process::exit(code);
        }
    };
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Template(cmd) => template::run(cmd),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(ExitCode(code)) => std::process::exit(code),
        Err(failure) => {
            eprintln!("cove: {}", failure.message);
            std::process::exit(failure.code);
        }
    }
}
