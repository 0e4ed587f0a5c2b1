//! `cove bench`: cove's speed, side by side with its peers, in one run.
//!
//! Every case is timed the same way (wall clock around the whole
//! operation, after warm-up runs) so ratios within one run are meaningful
//! even on a noisy machine. Peers that are not installed or do not work on
//! this host are reported as skipped, with the reason.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cove_isolate::Layout;
use cove_protocol::client::AgentClient;
use cove_protocol::{CommandLine, ProcessSpec};
use cove_template::TemplateStore;

use crate::{ExitCode, Failure, paths};
use cove_server::engine::{self, SandboxOptions};

mod daemon;
mod files;
mod http;

#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Measured iterations per case.
    #[arg(long, short = 'n', default_value_t = 100)]
    pub iterations: usize,
    /// Unmeasured warm-up iterations per case.
    #[arg(long, default_value_t = 5)]
    pub warmup: usize,
    /// Print JSON instead of a Markdown table.
    #[arg(long)]
    pub json: bool,
    /// Bytes streamed in the SSE-versus-pipe case, in MiB.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    pub stream_mib: u64,
    /// Size of the file moved in the file transfer cases, in MiB.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    pub file_mib: u64,
    /// MicroVM boots to measure (seconds each under TCG); 0 skips the
    /// microVM cases.
    #[arg(long, default_value_t = 3)]
    pub vm_runs: usize,
    /// Run only these groups of cases (repeat or comma-separate; default:
    /// all).
    #[arg(long, value_enum, value_delimiter = ',', value_name = "GROUP")]
    pub only: Vec<Group>,
}

/// Groups of cases, for `--only`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Group {
    /// Exec in a running sandbox over the agent protocol, and the same
    /// program started on the host.
    Exec,
    /// `cove run -- true` against bwrap, runc and crun.
    Run,
    /// HTTP exec, create + first exec, 64 clients, runc/podman exec.
    Http,
    /// SSE streaming against a pipe.
    Stream,
    /// File upload and download against `cp`.
    Files,
    /// The microVM boot and vsock exec.
    Vm,
}

impl BenchArgs {
    /// Whether the run includes `group`.
    pub(crate) fn wants(&self, group: Group) -> bool {
        self.only.is_empty() || self.only.contains(&group)
    }
}

/// Timings of one case.
#[derive(Debug, serde::Serialize)]
pub(crate) struct CaseResult {
    pub(crate) name: String,
    command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(crate) skipped: Option<String>,
    samples: usize,
    pub(crate) p50_ms: f64,
    p90_ms: f64,
    p99_ms: f64,
    mean_ms: f64,
}

/// A rate (bytes or operations per second), optionally against a baseline
/// measured in the same run.
#[derive(Debug, serde::Serialize)]
struct Rate {
    name: String,
    command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    skipped: Option<String>,
    value: f64,
    unit: &'static str,
    /// The baseline's name and this rate over the baseline's.
    #[serde(skip_serializing_if = "Option::is_none")]
    versus: Option<(String, f64)>,
}

impl Rate {
    fn new(name: &str, command: &str, value: f64, unit: &'static str) -> Rate {
        Rate {
            name: name.into(),
            command: command.into(),
            skipped: None,
            value,
            unit,
            versus: None,
        }
    }

    fn skipped(name: &str, command: &str, reason: String) -> Rate {
        Rate {
            skipped: Some(reason),
            ..Rate::new(name, command, f64::NAN, "")
        }
    }
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

pub(crate) fn summarize(name: &str, command: &str, mut samples: Vec<Duration>) -> CaseResult {
    samples.sort();
    let mean = if samples.is_empty() {
        f64::NAN
    } else {
        samples.iter().map(|d| d.as_secs_f64()).sum::<f64>() / samples.len() as f64 * 1000.0
    };
    CaseResult {
        name: name.into(),
        command: command.into(),
        skipped: None,
        samples: samples.len(),
        p50_ms: percentile(&samples, 50.0),
        p90_ms: percentile(&samples, 90.0),
        p99_ms: percentile(&samples, 99.0),
        mean_ms: mean,
    }
}

pub(crate) fn skipped(name: &str, command: &str, reason: String) -> CaseResult {
    CaseResult {
        name: name.into(),
        command: command.into(),
        skipped: Some(reason),
        samples: 0,
        p50_ms: f64::NAN,
        p90_ms: f64::NAN,
        p99_ms: f64::NAN,
        mean_ms: f64::NAN,
    }
}

/// Time `make()` commands: warm up, then measure. Fails on the first
/// unsuccessful run, with its stderr.
fn time_commands(
    args: &BenchArgs,
    mut make: impl FnMut(usize) -> Command,
) -> Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(args.iterations);
    for i in 0..args.warmup + args.iterations {
        let elapsed = time_one(make(i))?;
        if i >= args.warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// The command `argv` (program first).
fn command_of(argv: &[&str]) -> Command {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    cmd
}

/// Run `cmd` once (no stdin, output discarded) and time it; an
/// unsuccessful run is an error with the last line of its stderr.
fn time_one(mut cmd: Command) -> Result<Duration, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let start = Instant::now();
    let out = cmd.output().map_err(|e| format!("cannot start: {e}"))?;
    let elapsed = start.elapsed();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "failed ({}): {}",
            out.status,
            err.lines().last().unwrap_or("").trim()
        ));
    }
    Ok(elapsed)
}

/// Time several commands with their runs interleaved (one of each in turn),
/// so that a machine whose load drifts during the run weighs on each alike
/// and their ratio holds. A command that fails is dropped from the rounds
/// that follow; its entry is the error.
fn time_interleaved(args: &BenchArgs, argvs: &[&[&str]]) -> Vec<Result<Vec<Duration>, String>> {
    let mut results: Vec<Result<Vec<Duration>, String>> = argvs
        .iter()
        .map(|_| Ok(Vec::with_capacity(args.iterations)))
        .collect();
    for i in 0..args.warmup + args.iterations {
        for (argv, result) in argvs.iter().zip(results.iter_mut()) {
            let Ok(samples) = result else { continue };
            match time_one(command_of(argv)) {
                Ok(elapsed) if i >= args.warmup => samples.push(elapsed),
                Ok(_) => {}
                Err(reason) => *result = Err(reason),
            }
        }
    }
    results
}

fn command_case(args: &BenchArgs, name: &str, argv: &[&str]) -> CaseResult {
    let shown = argv.join(" ");
    match time_commands(args, |_| command_of(argv)) {
        Ok(samples) => summarize(name, &shown, samples),
        Err(reason) => skipped(name, &shown, reason),
    }
}

fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
}

/// An OCI bundle of the busybox template for runc and crun, running `argv`.
fn busybox_bundle(dir: &Path, name: &str, argv: &[&str]) -> Result<PathBuf, String> {
    let store = TemplateStore::new(paths::default_data_dir().join("templates"));
    let template = match store.get("busybox") {
        Ok(t) => t,
        Err(_) => store
            .build_busybox(&mut |_, _, _| {})
            .map_err(|e| e.to_string())?,
    };
    let bundle = dir.join(name);
    std::fs::create_dir_all(&bundle).map_err(|e| e.to_string())?;
    let runc = which("runc").ok_or("runc is not installed")?;
    let spec = Command::new(runc)
        .args(["spec", "--bundle"])
        .arg(&bundle)
        .output()
        .map_err(|e| e.to_string())?;
    if !spec.status.success() {
        return Err(format!(
            "runc spec failed: {}",
            String::from_utf8_lossy(&spec.stderr)
        ));
    }
    let path = bundle.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut config: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
    config["process"]["terminal"] = false.into();
    config["process"]["args"] = serde_json::json!(argv);
    config["root"]["path"] = template.layers[0].to_string_lossy().into_owned().into();
    config["root"]["readonly"] = true.into();
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&config).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    Ok(bundle)
}

fn oci_runtime_case(
    args: &BenchArgs,
    name: &str,
    runtime: &str,
    bundle: &Result<PathBuf, String>,
) -> CaseResult {
    let shown = format!("{runtime} run --bundle <busybox bundle> ID  (runs /bin/true)");
    let Some(binary) = which(runtime) else {
        return skipped(name, &shown, format!("{runtime} is not installed"));
    };
    let bundle = match bundle {
        Ok(b) => b.clone(),
        Err(e) => return skipped(name, &shown, e.clone()),
    };
    let pid = std::process::id();
    match time_commands(args, |i| {
        let mut cmd = Command::new(&binary);
        cmd.args(["run", "--bundle"])
            .arg(&bundle)
            .arg(format!("cove-bench-{pid}-{i}"));
        cmd
    }) {
        Ok(samples) => summarize(name, &shown, samples),
        Err(reason) => skipped(name, &shown, reason),
    }
}

/// Exec latency of `true` in one running sandbox, over the agent protocol.
fn exec_in_running_sandbox(args: &BenchArgs) -> CaseResult {
    let shown = "agent protocol: spawn `true`, wait for its exit (sandbox already running)";
    let name = "exec `true` in a running sandbox";
    let result = (|| -> Result<Vec<Duration>, String> {
        let store = TemplateStore::new(paths::default_data_dir().join("templates"));
        let template = store
            .get(cove_template::DEFAULT_TEMPLATE)
            .map_err(|e| e.to_string())?;
        let id = engine::new_id();
        let root = paths::default_runtime_dir().join("bench");
        let mut config = engine::sandbox_config(
            &id,
            &template,
            &SandboxOptions {
                cgroup_parent: paths::cgroup_parent(),
                ..SandboxOptions::default()
            },
            &root,
        );
        config.die_with_parent = true;
        // Single-threaded here, as `create` requires.
        let mut sandbox =
            cove_isolate::create(&config, &Layout::detect()).map_err(|e| e.to_string())?;
        let connection = sandbox.take_connection().ok_or("no agent connection")?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let samples = runtime.block_on(async {
            let stream = std::os::unix::net::UnixStream::from(connection);
            stream.set_nonblocking(true).map_err(|e| e.to_string())?;
            let stream = tokio::net::UnixStream::from_std(stream).map_err(|e| e.to_string())?;
            let client = AgentClient::connect(stream, "cove-bench")
                .await
                .map_err(|e| e.to_string())?;
            let mut samples = Vec::new();
            for i in 0..args.warmup + args.iterations {
                let spec = ProcessSpec::new(CommandLine::Argv(vec!["true".into()]));
                let start = Instant::now();
                let out = client.output(spec, None).await.map_err(|e| e.to_string())?;
                let elapsed = start.elapsed();
                if out.status.code != Some(0) {
                    return Err(format!("true exited with {:?}", out.status));
                }
                if i >= args.warmup {
                    samples.push(elapsed);
                }
            }
            Ok(samples)
        });
        drop(runtime);
        let _ = sandbox.destroy();
        samples
    })();
    match result {
        Ok(samples) => summarize(name, shown, samples),
        Err(reason) => skipped(name, shown, reason),
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let kernel = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|k| k.parse::<u64>().ok())
        })
        .map(|kib| kib / 1024 / 1024)
        .unwrap_or(0);
    format!(
        "{cpu}, {cores} cores, {mem_gib} GiB, Linux {kernel}, cgroups {}",
        Layout::detect().describe()
    )
}

pub fn run(args: BenchArgs) -> Result<ExitCode, Failure> {
    if !paths::is_root() {
        return Err(Failure::new(
            "cove bench needs root (it creates sandboxes and runs runc)",
        ));
    }
    let me = std::env::current_exe()
        .map_err(|e| Failure::new(format!("cannot find the cove binary: {e}")))?;
    let me = me.to_string_lossy().into_owned();
    let scratch = tempfile_dir().map_err(Failure::new)?;
    let mut results = Vec::new();
    let mut rates = Vec::new();
    // In-process sandbox first: `create` needs a single-threaded process.
    if args.wants(Group::Exec) {
        results.push(exec_in_running_sandbox(&args));
        // The floor under any exec: starting `true` on the host, no sandbox.
        results.push(command_case(
            &args,
            "host: spawn `true` and wait (no sandbox)",
            &["true"],
        ));
    }
    if args.wants(Group::Run) {
        results.extend(run_cases(&args, &me, &scratch));
    }
    if args.wants(Group::Http) || args.wants(Group::Stream) {
        let sleep_bundle = busybox_bundle(&scratch, "sleep", &["/bin/sleep", "100000"]);
        let (latency, more) = http::cases(&args, &scratch, &sleep_bundle);
        results.extend(latency);
        rates.extend(more);
    }
    if args.wants(Group::Files) {
        rates.extend(files::cases(&args, &scratch));
    }
    let _ = std::fs::remove_dir_all(&scratch);
    // Last: it starts a multi-threaded runtime.
    let mut vm_phases = None;
    if args.wants(Group::Vm) {
        let (vm_results, phases) = crate::bench_vm::cases(&args);
        results.extend(vm_results);
        vm_phases = phases;
    }

    if args.json {
        let doc = serde_json::json!({
            "machine": machine(),
            "iterations": args.iterations,
            "stream_mib": args.stream_mib,
            "file_mib": args.file_mib,
            "results": results,
            "rates": rates,
            "microvm_boot_phases": vm_phases,
        });
        println!(
            "{}",
            serde_json::to_string_pretty(&doc).map_err(|e| Failure::new(e.to_string()))?
        );
        return Ok(ExitCode(0));
    }
    let bwrap = results
        .iter()
        .find(|r| r.name == "bwrap" && r.skipped.is_none())
        .map(|r| r.p50_ms);
    println!("machine: {}", machine());
    println!(
        "iterations: {} (after {} warm-up)\n",
        args.iterations, args.warmup
    );
    println!("| case | p50 ms | p90 ms | p99 ms | mean ms | p50 vs bwrap |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &results {
        match &r.skipped {
            Some(reason) => println!(
                "| {} | skipped: {} | | | | |",
                r.name,
                reason.replace('|', "/")
            ),
            None => {
                let ratio = bwrap
                    .map(|b| format!("{:.2}x", r.p50_ms / b))
                    .unwrap_or_default();
                println!(
                    "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {} |",
                    r.name, r.p50_ms, r.p90_ms, r.p99_ms, r.mean_ms, ratio
                );
            }
        }
    }
    println!("\n| case | rate | versus |");
    println!("|---|---:|---|");
    for r in &rates {
        match &r.skipped {
            Some(reason) => println!("| {} | skipped: {} | |", r.name, reason.replace('|', "/")),
            None => println!(
                "| {} | {:.0} {} | {} |",
                r.name,
                r.value,
                r.unit,
                r.versus
                    .as_ref()
                    .map(|(base, ratio)| format!("{:.0}% of {base}", ratio * 100.0))
                    .unwrap_or_default()
            ),
        }
    }
    println!(
        "\nRates are medians of 3 alternating rounds. N = {} MiB in the streaming cases; {} MiB files in the transfer cases",
        args.stream_mib, args.file_mib
    );
    if let Some(phases) = vm_phases {
        crate::bench_vm::print_phases(&results, &phases);
    }
    Ok(ExitCode(0))
}

/// `cove run -- true` and the runtimes it is compared with.
fn run_cases(args: &BenchArgs, me: &str, scratch: &Path) -> Vec<CaseResult> {
    let cove: &[&str] = &[me, "run", "--", "true"];
    let bwrap: &[&str] = &[
        "bwrap",
        "--unshare-all",
        "--die-with-parent",
        "--ro-bind",
        "/",
        "/",
        "true",
    ];
    // cove and bwrap in turn: their ratio is the figure that matters.
    let mut results = Vec::new();
    if which("bwrap").is_some() {
        let mut timed = time_interleaved(args, &[cove, bwrap]).into_iter();
        for (name, argv) in [("cove run -- true", cove), ("bwrap", bwrap)] {
            let shown = argv.join(" ");
            results.push(match timed.next() {
                Some(Ok(samples)) => summarize(name, &shown, samples),
                Some(Err(reason)) => skipped(name, &shown, reason),
                None => skipped(name, &shown, "not run".into()),
            });
        }
    } else {
        results.push(command_case(args, "cove run -- true", cove));
        results.push(skipped(
            "bwrap",
            "bwrap --unshare-all ...",
            "bwrap is not installed".into(),
        ));
    }
    let bundle = busybox_bundle(scratch, "true", &["/bin/true"]);
    results.push(oci_runtime_case(args, "runc run", "runc", &bundle));
    results.push(oci_runtime_case(args, "crun run", "crun", &bundle));
    results
}

fn tempfile_dir() -> Result<PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("cove-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}
