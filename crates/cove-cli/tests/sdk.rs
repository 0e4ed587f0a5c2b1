//! The Rust SDK (`cove-client`) against a real daemon: every `Command`
//! method, pipes, cancellation, timeouts, entrypoints, and the blocking
//! wrapper.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Daemon, host_has_process_with, root};
use cove_client::{CancellationToken, Client, Error, SandboxSpec, Stdio};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The daemon harness uses a blocking HTTP client, so it lives outside the
/// runtime; each test drives its async body on a fresh one.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn client(d: &Daemon) -> Client {
    Client::new(d.url.clone(), Some(d.admin.clone()))
}

async fn gone(tag: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while host_has_process_with(tag) {
        assert!(Instant::now() < deadline, "a process with {tag} survived");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[test]
fn output_status_run_and_the_environment() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let client = client(&d);
        let sandbox = client
            .create(
                SandboxSpec::new()
                    .env("FROM_SANDBOX", "yes")
                    .label("sdk", "1")
                    .memory(256 << 20),
            )
            .await
            .unwrap();
        assert!(sandbox.id().starts_with("sbx-"));
        assert_eq!(sandbox.info().labels["sdk"], "1");

        let out = sandbox
            .command("sh")
            .args(["-c", "echo out; echo err >&2; exit 3"])
            .output()
            .await
            .unwrap();
        assert_eq!(
            (out.stdout.as_slice(), out.stderr.as_slice()),
            (&b"out\n"[..], &b"err\n"[..])
        );
        assert_eq!(
            (
                out.status.code(),
                out.status.success(),
                out.status.exit_code()
            ),
            (Some(3), false, 3)
        );

        let mut cmd = sandbox.command("sh");
        cmd.arg("-c")
            .arg("echo $FROM_SANDBOX $MINE; pwd; id -u")
            .env("MINE", "set")
            .current_dir("/tmp")
            .user("nobody");
        assert_eq!(cmd.get_env("MINE"), Some("set"));
        assert_eq!(cmd.environ(), vec!["MINE=set".to_string()]);
        assert_eq!(
            cmd.get_argv(),
            vec!["sh", "-c", "echo $FROM_SANDBOX $MINE; pwd; id -u"]
        );
        let out = cmd.output().await.unwrap();
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            "yes set\n/tmp\n65534\n"
        );

        let out = sandbox
            .command("/usr/bin/env")
            .env_clear()
            .env("ONLY", "this")
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "ONLY=this\n");

        let status = sandbox
            .command("true")
            .stdout(Stdio::null())
            .status()
            .await
            .unwrap();
        assert!(status.success());
        sandbox
            .command("touch")
            .arg("/tmp/marker")
            .run()
            .await
            .unwrap();
        match sandbox.command("sh").args(["-c", "exit 42"]).run().await {
            Err(Error::Exit(status)) => assert_eq!(status.code(), Some(42)),
            other => panic!("expected an exit error, got {other:?}"),
        }
        // Feeding stdin (tinyrange's SetStdin), and a missing program.
        let out = sandbox
            .command("cat")
            .stdin_bytes("hello world")
            .output()
            .await
            .unwrap();
        assert_eq!(out.stdout, b"hello world");
        let out = sandbox.command("no-such-program").output().await.unwrap();
        assert_eq!(out.status.code(), Some(127));
        sandbox.kill().await.unwrap();
    });
}

#[test]
fn combined_output_keeps_arrival_order() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let sandbox = client(&d).create(SandboxSpec::new()).await.unwrap();
        let (status, combined) = sandbox
            .command("sh")
            .args([
                "-c",
                "echo 1; sleep 0.1; echo 2 >&2; sleep 0.1; echo 3; exit 1",
            ])
            .combined_output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8(combined).unwrap(), "1\n2\n3\n");
        assert_eq!(status.code(), Some(1));
    });
}

#[test]
fn pipes_spawn_wait_and_kill() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let sandbox = client(&d).create(SandboxSpec::new()).await.unwrap();

        // Interactive: write, read the echo, close stdin, wait.
        let mut child = sandbox
            .command("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .await
            .unwrap();
        assert!(child.id() > 1);
        let mut stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        stdin.write_all(b"hello\n").await.unwrap();
        let mut buf = [0u8; 6];
        stdout.read_exact(&mut buf).await.unwrap();
        assert_eq!(&buf, b"hello\n");
        stdin.shutdown().await.unwrap();
        drop(stdin);
        let mut rest = Vec::new();
        stdout.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        assert!(child.wait().await.unwrap().success());

        // A lot of data through the pipes, both ways.
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i % 251) as u8).collect();
        let mut child = sandbox
            .command("cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .await
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let writer = {
            let data = data.clone();
            tokio::spawn(async move {
                stdin.write_all(&data).await.unwrap();
                stdin.shutdown().await.unwrap();
            })
        };
        let mut got = Vec::new();
        child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut got)
            .await
            .unwrap();
        writer.await.unwrap();
        assert!(got == data, "{} bytes back of {}", got.len(), data.len());
        assert!(child.wait().await.unwrap().success());

        // kill() takes the whole tree.
        let tag = format!("1000.{}1", std::process::id());
        let mut child = sandbox
            .command("sh")
            .args(["-c", &format!("sleep {tag} & sleep {tag}")])
            .stdout(Stdio::null())
            .spawn()
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        child.kill().await.unwrap();
        assert_eq!(child.wait().await.unwrap().signal(), Some(9));
        gone(&tag).await;
    });
}

#[test]
fn cancellation_by_drop_token_and_timeout() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let sandbox = client(&d).create(SandboxSpec::new()).await.unwrap();

        // Dropping the child kills it.
        let tag = format!("1000.{}2", std::process::id());
        let child = sandbox.command("sleep").arg(&tag).spawn().await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(host_has_process_with(&tag));
        drop(child);
        gone(&tag).await;

        // Dropping the future of output() kills it too.
        let tag = format!("1000.{}3", std::process::id());
        let mut cmd = sandbox.command("sleep");
        cmd.arg(&tag);
        let _ = tokio::time::timeout(Duration::from_millis(500), cmd.output()).await;
        gone(&tag).await;

        // A cancellation token.
        let token = CancellationToken::new();
        let tag = format!("1000.{}4", std::process::id());
        let mut child = sandbox
            .command("sleep")
            .arg(&tag)
            .cancel_on(token.clone())
            .spawn()
            .await
            .unwrap();
        let canceller = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            token.cancel();
        });
        let status = child.wait().await.unwrap();
        canceller.await.unwrap();
        assert_eq!(status.signal(), Some(9));
        gone(&tag).await;

        // The daemon's timeout.
        let status = sandbox
            .command("sleep")
            .arg("10")
            .timeout(Duration::from_millis(300))
            .status()
            .await
            .unwrap();
        assert!(status.timed_out());
        assert_eq!(status.exit_code(), 124);
    });
}

#[test]
fn entrypoint_command_honours_the_template() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let build = std::process::Command::new(env!("CARGO_BIN_EXE_cove"))
            .env("COVE_DATA_DIR", d.data_dir())
            .args(["template", "build", "busybox"])
            .output()
            .unwrap();
        assert!(
            build.status.success(),
            "{}",
            String::from_utf8_lossy(&build.stderr)
        );
        let sandbox = client(&d)
            .create(SandboxSpec::new().template("busybox"))
            .await
            .unwrap();
        // busybox's CMD is /bin/sh: arguments replace it.
        let out = sandbox
            .entrypoint_command(["/bin/sh", "-c", "echo from $0"])
            .await
            .unwrap()
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap(), "from /bin/sh\n");
        // No arguments: the CMD itself (a shell reading empty stdin exits 0).
        let out = sandbox
            .entrypoint_command(Vec::<String>::new())
            .await
            .unwrap()
            .output()
            .await
            .unwrap();
        assert!(out.status.success());
        // The host template has no entrypoint or CMD.
        let host = client(&d).create(SandboxSpec::new()).await.unwrap();
        assert!(host.entrypoint_command(Vec::<String>::new()).await.is_err());
    });
}

#[test]
fn the_blocking_wrapper() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    let client = cove_client::blocking::Client::new(d.url.clone(), Some(d.admin.clone())).unwrap();
    let sandbox = client.create(SandboxSpec::new()).unwrap();
    let out = sandbox
        .output(sandbox.command("echo").arg("blocking"))
        .unwrap();
    assert_eq!(out.stdout, b"blocking\n");
    assert!(
        sandbox
            .status(sandbox.command("true").stdout(Stdio::null()))
            .unwrap()
            .success()
    );
    assert!(
        sandbox
            .run(sandbox.command("false").stdout(Stdio::null()))
            .is_err()
    );
    sandbox.kill().unwrap();
}
