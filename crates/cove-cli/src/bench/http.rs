//! Cases that go through the daemon's HTTP API, next to their peers:
//! exec in a running sandbox (vs `runc exec`, `podman exec`), create to
//! first exec, many concurrent clients, and output streamed over SSE (vs a
//! plain pipe of the same bytes).

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cove_client::Client;
use cove_client::api::{CreateSandboxRequest, Encoding, ExecRequest};
use cove_client::process::StreamEvent;
use futures::StreamExt;

use super::daemon::Daemon;
use super::{BenchArgs, CaseResult, Group, Rate, skipped, summarize, time_commands, which};

/// Concurrent clients in the throughput case.
const CLIENTS: usize = 64;

fn exec_true() -> ExecRequest {
    ExecRequest {
        argv: Some(vec!["true".into()]),
        ..Default::default()
    }
}

async fn exec_ok(client: &Client, id: &str) -> Result<(), String> {
    let result = client
        .exec(id, &exec_true())
        .await
        .map_err(|e| e.to_string())?;
    if result.exit_code != 0 {
        return Err(format!("true exited with {}", result.exit_code));
    }
    Ok(())
}

async fn create(client: &Client) -> Result<String, String> {
    Ok(client
        .create_sandbox(&CreateSandboxRequest::default())
        .await
        .map_err(|e| e.to_string())?
        .id)
}

/// `POST /v1/sandboxes/{id}/exec` of `true` in one running sandbox.
async fn http_exec(args: &BenchArgs, client: &Client) -> Result<Vec<Duration>, String> {
    let id = create(client).await?;
    let mut samples = Vec::with_capacity(args.iterations);
    let mut outcome = Ok(());
    for i in 0..args.warmup + args.iterations {
        let start = Instant::now();
        outcome = exec_ok(client, &id).await;
        if outcome.is_err() {
            break;
        }
        if i >= args.warmup {
            samples.push(start.elapsed());
        }
    }
    let _ = client.delete_sandbox(&id).await;
    outcome.map(|()| samples)
}

/// `POST /v1/sandboxes` then the first exec; the delete is not timed.
async fn create_to_first_exec(args: &BenchArgs, client: &Client) -> Result<Vec<Duration>, String> {
    let mut samples = Vec::with_capacity(args.iterations);
    for i in 0..args.warmup + args.iterations {
        let start = Instant::now();
        let id = create(client).await?;
        let outcome = exec_ok(client, &id).await;
        let elapsed = start.elapsed();
        let _ = client.delete_sandbox(&id).await;
        outcome?;
        if i >= args.warmup {
            samples.push(elapsed);
        }
    }
    Ok(samples)
}

/// `CLIENTS` clients, each with its own sandbox, exec `true` as fast as they
/// can: per-exec latency under load, and execs per second overall.
async fn concurrent(args: &BenchArgs, client: &Client) -> Result<(Vec<Duration>, f64), String> {
    let mut ids = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        match create(client).await {
            Ok(id) => ids.push(id),
            Err(e) => {
                for id in &ids {
                    let _ = client.delete_sandbox(id).await;
                }
                return Err(e);
            }
        }
    }
    let per_client = (args.iterations / 4).max(5);
    let start = Instant::now();
    let tasks: Vec<_> = ids
        .iter()
        .map(|id| {
            let (client, id) = (client.clone(), id.clone());
            tokio::spawn(async move {
                let mut samples = Vec::with_capacity(per_client);
                for _ in 0..per_client {
                    let start = Instant::now();
                    exec_ok(&client, &id).await?;
                    samples.push(start.elapsed());
                }
                Ok::<_, String>(samples)
            })
        })
        .collect();
    let mut samples = Vec::with_capacity(CLIENTS * per_client);
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(s)) => samples.extend(s),
            Ok(Err(e)) => failure = Some(e),
            Err(e) => failure = Some(e.to_string()),
        }
    }
    let elapsed = start.elapsed();
    for id in &ids {
        let _ = client.delete_sandbox(id).await;
    }
    if let Some(e) = failure {
        return Err(e);
    }
    let rate = samples.len() as f64 / elapsed.as_secs_f64();
    Ok((samples, rate))
}

/// CPU time one streaming round cost each party, in milliseconds: a
/// figure the machine's noise moves far less than the rate.
#[derive(Debug, Default, Clone, Copy)]
struct StreamCpu {
    /// This process: the SDK's HTTP client, SSE parsing, base64 decoding.
    client: f64,
    /// The daemon's threads (the sandbox's agent is not among them).
    daemon: f64,
    /// The sandbox's agent, when it could be found among the daemon's
    /// children.
    agent: Option<f64>,
}

/// User plus system CPU time of this process, all threads, in ms.
fn own_cpu_ms() -> f64 {
    use nix::sys::resource::{UsageWho, getrusage};
    let ms = |t: nix::sys::time::TimeVal| t.tv_sec() as f64 * 1e3 + t.tv_usec() as f64 / 1e3;
    getrusage(UsageWho::RUSAGE_SELF).map_or(f64::NAN, |u| ms(u.user_time()) + ms(u.system_time()))
}

/// User plus system CPU time of process `pid` (its own threads, not its
/// children), in ms, from `/proc/PID/stat`.
fn proc_cpu_ms(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) in parentheses:
    // state is field 3, utime 14 and stime 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    let per_second = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    Some(ticks * 1e3 / per_second)
}

/// The child processes of `pid` (all its threads' children).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// Stream `head -c BYTES /dev/zero` over SSE (`exec/stream`, base64 chunks,
/// decoded by the SDK); returns the bytes received, the time taken and the
/// CPU time each party spent. `daemon` is the daemon's process ID.
async fn sse_stream(
    client: &Client,
    daemon: u32,
    bytes: u64,
) -> Result<(u64, Duration, StreamCpu), String> {
    let before = children(daemon);
    let id = create(client).await?;
    // The new sandbox's agent: the daemon's one new child.
    let agent = match children(daemon)
        .into_iter()
        .filter(|pid| !before.contains(pid))
        .collect::<Vec<_>>()[..]
    {
        [pid] => Some(pid),
        _ => None,
    };
    let outcome = async {
        let req = ExecRequest {
            argv: Some(vec![
                "head".into(),
                "-c".into(),
                bytes.to_string(),
                "/dev/zero".into(),
            ]),
            encoding: Encoding::Base64,
            ..Default::default()
        };
        let cpu_before = (
            own_cpu_ms(),
            proc_cpu_ms(daemon),
            agent.and_then(proc_cpu_ms),
        );
        let start = Instant::now();
        let stream = client
            .exec_stream(&id, &req)
            .await
            .map_err(|e| e.to_string())?;
        let mut stream = std::pin::pin!(stream);
        let mut received = 0u64;
        while let Some(event) = stream.next().await {
            match event.map_err(|e| e.to_string())?.0 {
                StreamEvent::Output { data, .. } => received += data.len() as u64,
                StreamEvent::Dropped { from, to, .. } => {
                    return Err(format!("the stream dropped bytes {from}..{to}"));
                }
                StreamEvent::Error(e) => return Err(e),
                StreamEvent::Exit(_) => break,
                StreamEvent::Start { .. } => {}
            }
        }
        let elapsed = start.elapsed();
        let cpu = StreamCpu {
            client: own_cpu_ms() - cpu_before.0,
            daemon: proc_cpu_ms(daemon)
                .zip(cpu_before.1)
                .map_or(f64::NAN, |(after, before)| after - before),
            agent: agent
                .and_then(proc_cpu_ms)
                .zip(cpu_before.2)
                .map(|(after, before)| after - before),
        };
        Ok((received, elapsed, cpu))
    }
    .await;
    let _ = client.delete_sandbox(&id).await;
    outcome
}

/// The same bytes through a plain pipe: `head -c BYTES /dev/zero` read by
/// this process.
fn pipe_stream(bytes: u64) -> Result<(u64, Duration), String> {
    use std::io::Read;
    let start = Instant::now();
    let mut child = Command::new("head")
        .args(["-c", &bytes.to_string(), "/dev/zero"])
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run head: {e}"))?;
    let mut out = child.stdout.take().ok_or("no stdout")?;
    let mut buf = vec![0u8; 1 << 16];
    let mut received = 0u64;
    loop {
        match out.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => received += n as u64,
            Err(e) => return Err(e.to_string()),
        }
    }
    child.wait().map_err(|e| e.to_string())?;
    Ok((received, start.elapsed()))
}

fn mib_per_s(bytes: u64, elapsed: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / elapsed.as_secs_f64().max(1e-9)
}

/// A container running `sleep` for `runc exec`; deleted on drop.
struct RuncContainer {
    runc: std::path::PathBuf,
    id: String,
}

impl RuncContainer {
    fn start(bundle: &Path) -> Result<RuncContainer, String> {
        let runc = which("runc").ok_or("runc is not installed")?;
        let id = format!("cove-bench-exec-{}", std::process::id());
        // The detached container keeps runc's stdio: a pipe here would
        // never see EOF, so errors go to a file.
        let log = bundle.join("runc-run.log");
        let log_file = std::fs::File::create(&log).map_err(|e| e.to_string())?;
        let status = Command::new(&runc)
            .args(["run", "-d", "--bundle"])
            .arg(bundle)
            .arg(&id)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .status()
            .map_err(|e| format!("cannot run runc: {e}"))?;
        if !status.success() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(format!("runc run -d failed: {}", text.trim()));
        }
        Ok(RuncContainer { runc, id })
    }
}

impl Drop for RuncContainer {
    fn drop(&mut self) {
        let _ = Command::new(&self.runc)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

fn runc_exec(args: &BenchArgs, bundle: &Result<std::path::PathBuf, String>) -> CaseResult {
    let name = "runc exec `true` (running container)";
    let shown = "runc exec ID true  (busybox bundle running sleep)";
    let container = match bundle
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|b| RuncContainer::start(b))
    {
        Ok(c) => c,
        Err(e) => return skipped(name, shown, e),
    };
    match time_commands(args, |_| {
        let mut cmd = Command::new(&container.runc);
        cmd.args(["exec", &container.id, "true"]);
        cmd
    }) {
        Ok(samples) => summarize(name, shown, samples),
        Err(e) => skipped(name, shown, e),
    }
}

fn podman_exec(args: &BenchArgs) -> CaseResult {
    let name = "podman exec `true` (running container)";
    let shown = "podman exec ID true";
    let Some(podman) = which("podman") else {
        return skipped(name, shown, "podman is not installed".into());
    };
    // No container registry is reachable from every host: use an image that
    // is already there, if any.
    let image = Command::new(&podman)
        .args(["images", "--format", "{{.Repository}}:{{.Tag}}"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string));
    let Some(image) = image else {
        return skipped(name, shown, "podman has no local image to run".into());
    };
    let id = format!("cove-bench-{}", std::process::id());
    let started = Command::new(&podman)
        .args(["run", "-d", "--name", &id, &image, "sleep", "100000"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !matches!(started, Ok(s) if s.success()) {
        return skipped(name, shown, format!("podman run -d {image} sleep failed"));
    }
    let result = match time_commands(args, |_| {
        let mut cmd = Command::new(&podman);
        cmd.args(["exec", &id, "true"]);
        cmd
    }) {
        Ok(samples) => summarize(name, shown, samples),
        Err(e) => skipped(name, shown, e),
    };
    let _ = Command::new(&podman)
        .args(["rm", "--force", &id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    result
}

const EXEC: (&str, &str) = (
    "HTTP exec `true` (running sandbox)",
    "POST /v1/sandboxes/ID/exec {\"argv\":[\"true\"]}",
);
const FIRST: (&str, &str) = (
    "HTTP create + first exec",
    "POST /v1/sandboxes, then POST /v1/sandboxes/ID/exec",
);
const LOAD: (&str, &str) = (
    "HTTP exec `true`, 64 concurrent clients",
    "64 clients, a sandbox each, POST …/exec in a loop",
);
const SSE: (&str, &str) = (
    "SSE: head -c N /dev/zero",
    "POST /v1/sandboxes/ID/exec/stream, base64 chunks decoded by cove-client",
);
const PIPE: (&str, &str) = (
    "pipe: head -c N /dev/zero",
    "head -c N /dev/zero | (read by cove bench)",
);

/// Every HTTP case, on a private daemon.
pub(super) fn cases(
    args: &BenchArgs,
    scratch: &Path,
    sleep_bundle: &Result<std::path::PathBuf, String>,
) -> (Vec<CaseResult>, Vec<Rate>) {
    let mut latency = Vec::new();
    let mut rates = Vec::new();
    let (exec_name, exec_shown) = EXEC;
    let (first_name, first_shown) = FIRST;
    let (load_name, load_shown) = LOAD;

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            latency.push(skipped(exec_name, exec_shown, e.to_string()));
            return (latency, rates);
        }
    };
    let daemon = match Daemon::start(scratch, "http") {
        Ok(d) => d,
        Err(e) => {
            for (name, shown) in [
                (exec_name, exec_shown),
                (first_name, first_shown),
                (load_name, load_shown),
            ] {
                latency.push(skipped(name, shown, e.clone()));
            }
            return (latency, rates);
        }
    };
    let client = daemon.client();
    if args.wants(Group::Http) {
        http_latency(
            args,
            &runtime,
            &client,
            sleep_bundle,
            &mut latency,
            &mut rates,
        );
    }
    if args.wants(Group::Stream) {
        stream_rates(args, &runtime, &client, daemon.pid(), &mut rates);
    }
    runtime.block_on(daemon.delete_all());
    drop(daemon);
    (latency, rates)
}

/// HTTP exec, create + first exec, 64 clients, and `runc`/`podman exec`.
fn http_latency(
    args: &BenchArgs,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    sleep_bundle: &Result<std::path::PathBuf, String>,
    latency: &mut Vec<CaseResult>,
    rates: &mut Vec<Rate>,
) {
    let (exec_name, exec_shown) = EXEC;
    let (first_name, first_shown) = FIRST;
    let (load_name, load_shown) = LOAD;
    runtime.block_on(async {
        latency.push(match http_exec(args, client).await {
            Ok(s) => summarize(exec_name, exec_shown, s),
            Err(e) => skipped(exec_name, exec_shown, e),
        });
        latency.push(match create_to_first_exec(args, client).await {
            Ok(s) => summarize(first_name, first_shown, s),
            Err(e) => skipped(first_name, first_shown, e),
        });
        match concurrent(args, client).await {
            Ok((samples, rate)) => {
                latency.push(summarize(load_name, load_shown, samples));
                rates.push(Rate::new(load_name, load_shown, rate, "execs/s"));
            }
            Err(e) => latency.push(skipped(load_name, load_shown, e)),
        }
    });
    latency.push(runc_exec(args, sleep_bundle));
    latency.push(podman_exec(args));
}

/// Rounds of the streaming cases: pipe and SSE alternate, and each reports
/// its median, so a burst of noise on a shared machine hits both or one
/// round only.
const STREAM_ROUNDS: usize = 3;

/// SSE against a plain pipe.
fn stream_rates(
    args: &BenchArgs,
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    daemon: u32,
    rates: &mut Vec<Rate>,
) {
    let (sse_name, sse_shown) = SSE;
    let (pipe_name, pipe_shown) = PIPE;
    let bytes = args.stream_mib << 20;
    let (mut pipe, mut sse) = (Ok(Vec::new()), Ok(Vec::new()));
    let mut cpu = Vec::new();
    for _ in 0..STREAM_ROUNDS {
        if let Ok(rates) = &mut pipe {
            match pipe_stream(bytes) {
                Ok((n, elapsed)) => rates.push(mib_per_s(n, elapsed)),
                Err(e) => pipe = Err(e),
            }
        }
        if let Ok(rates) = &mut sse {
            // The client reads inside a task of the runtime, as a service
            // using the SDK would: from `block_on`'s thread every network
            // read would be handed across threads (~40% more of the
            // client's CPU time).
            let client = client.clone();
            let round = runtime.block_on(async move {
                tokio::spawn(async move { sse_stream(&client, daemon, bytes).await })
                    .await
                    .map_err(|e| e.to_string())?
            });
            match round {
                Ok((n, _, _)) if n != bytes => sse = Err(format!("received {n} bytes of {bytes}")),
                Ok((n, elapsed, spent)) => {
                    rates.push(mib_per_s(n, elapsed));
                    cpu.push(spent);
                }
                Err(e) => sse = Err(e),
            }
        }
    }
    let median = |mut rates: Vec<f64>| {
        rates.sort_by(f64::total_cmp);
        rates[rates.len() / 2]
    };
    let pipe_rate = match pipe {
        Ok(rounds) => {
            let rate = median(rounds);
            rates.push(Rate::new(pipe_name, pipe_shown, rate, "MiB/s"));
            Some(rate)
        }
        Err(e) => {
            rates.push(Rate::skipped(pipe_name, pipe_shown, e));
            None
        }
    };
    match sse {
        Ok(rounds) => {
            let mut rate = Rate::new(sse_name, sse_shown, median(rounds), "MiB/s");
            rate.versus = pipe_rate.map(|p| (pipe_name.to_string(), rate.value / p));
            rates.push(rate);
            let per_gib = |ms: f64| ms * 1024.0 / args.stream_mib.max(1) as f64;
            let parts: [(&str, &str, Vec<f64>); 3] = [
                (
                    "SSE: CPU time of the client",
                    "cove-client: HTTP, SSE parsing, base64 decoding",
                    cpu.iter().map(|c| per_gib(c.client)).collect(),
                ),
                (
                    "SSE: CPU time of the daemon",
                    "cove serve's threads",
                    cpu.iter().map(|c| per_gib(c.daemon)).collect(),
                ),
                (
                    "SSE: CPU time of the agent",
                    "the sandbox's agent (not the command)",
                    cpu.iter().filter_map(|c| c.agent.map(per_gib)).collect(),
                ),
            ];
            for (name, shown, values) in parts {
                if values.is_empty() {
                    rates.push(Rate::skipped(name, shown, "not found".into()));
                } else {
                    rates.push(Rate::new(name, shown, median(values), "ms/GiB"));
                }
            }
        }
        Err(e) => rates.push(Rate::skipped(sse_name, sse_shown, e)),
    }
}
