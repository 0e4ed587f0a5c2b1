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
        d.build_template("busybox");
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
    sandbox.create_dir_all("/workspace/b/c").unwrap();
    sandbox.write("/workspace/b/c/f", "blocking file").unwrap();
    assert_eq!(sandbox.read("/workspace/b/c/f").unwrap(), b"blocking file");
    assert_eq!(sandbox.read_dir("/workspace/b").unwrap()[0].name, "c");
    sandbox.remove("/workspace/b").unwrap();
    assert!(sandbox.read_dir("/workspace/b").is_err());
    sandbox.kill().unwrap();
}

#[test]
fn file_helpers_like_std_fs() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let sandbox = client(&d).create(SandboxSpec::new()).await.unwrap();
        // Binary contents survive the round trip, and a command sees them.
        let bytes: Vec<u8> = (0..=255u8).cycle().take(300_000).collect();
        sandbox.create_dir_all("/workspace/a/b/c").await.unwrap();
        let entry = sandbox
            .write("/workspace/a/b/c/data.bin", bytes.clone())
            .await
            .unwrap();
        assert_eq!(entry.size, 300_000);
        assert_eq!(
            sandbox.read("/workspace/a/b/c/data.bin").await.unwrap(),
            bytes
        );
        let out = sandbox
            .command("sh")
            .args(["-c", "wc -c < /workspace/a/b/c/data.bin"])
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), "300000");

        // And a file a command writes is readable.
        sandbox
            .command("sh")
            .args(["-c", "echo made by sh > /workspace/a/note.txt"])
            .run()
            .await
            .unwrap();
        assert_eq!(
            sandbox
                .read_to_string("/workspace/a/note.txt")
                .await
                .unwrap(),
            "made by sh\n"
        );

        let mut names: Vec<String> = sandbox
            .read_dir("/workspace/a")
            .await
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        names.sort();
        assert_eq!(names, ["b", "note.txt"]);
        assert!(
            sandbox.metadata("/workspace/a/b").await.unwrap().kind
                == cove_client::api::FileType::Dir
        );

        sandbox
            .rename("/workspace/a/note.txt", "/workspace/note.txt")
            .await
            .unwrap();
        sandbox.remove("/workspace/a").await.unwrap();
        assert!(sandbox.read_dir("/workspace/a").await.is_err());
        assert_eq!(sandbox.read_dir("/workspace").await.unwrap().len(), 1);

        // Errors say what went wrong, with the API's code.
        match sandbox.read("/workspace/missing").await {
            Err(e) => assert_eq!(e.status(), Some(404), "{e}"),
            Ok(_) => panic!("read a missing file"),
        }
        match sandbox.remove("/workspace/missing").await {
            Err(e) => assert_eq!(e.status(), Some(404), "{e}"),
            Ok(()) => panic!("removed a missing file"),
        }
        sandbox.kill().await.unwrap();
    });
}

#[test]
fn stderr_pipe_and_envs() {
    if !root() {
        return;
    }
    let d = Daemon::start();
    runtime().block_on(async {
        let sandbox = client(&d).create(SandboxSpec::new()).await.unwrap();

        // stderr as its own AsyncRead, apart from stdout.
        let mut child = sandbox
            .command("sh")
            .args(["-c", "echo out; echo err1 >&2; echo err2 >&2; exit 4"])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .await
            .unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let (a, b) = tokio::join!(stdout.read_to_end(&mut out), stderr.read_to_end(&mut err));
        a.unwrap();
        b.unwrap();
        assert_eq!(out, b"out\n");
        assert_eq!(err, b"err1\nerr2\n");
        assert_eq!(child.wait().await.unwrap().code(), Some(4));

        // envs() sets several at once, over the sandbox's environment, and
        // a later env() of the same name wins.
        let out = sandbox
            .command("sh")
            .args(["-c", "echo $A-$B-$C"])
            .envs([("A", "1"), ("B", "2")])
            .envs(vec![("C".to_string(), "3".to_string())])
            .env("B", "two")
            .output()
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "1-two-3\n");
        sandbox.kill().await.unwrap();
    });
}

/// The SDK's example programs, built by scripts/test.sh, run against a real
/// daemon found through `COVE_URL` and `COVE_KEY` (`Client::from_env`).
#[test]
fn the_examples_run_against_a_daemon() {
    if !root() {
        return;
    }
    // target/<profile>/deps/<this test> → target/<profile>/examples/<name>
    let examples = std::env::current_exe()
        .unwrap()
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples");
    if !examples.join("hello").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "{} has no examples: scripts/test.sh builds them \
             (cargo build --workspace --examples)",
            examples.display()
        );
        eprintln!("skipped: build the examples first (cargo build --examples)");
        return;
    }
    let d = Daemon::start();
    let run = |name: &str| {
        let out = std::process::Command::new(examples.join(name))
            .env("COVE_URL", &d.url)
            .env("COVE_KEY", &d.admin)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{name}: {}\n{text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let hello = run("hello");
    assert!(hello.starts_with("created sbx-"), "{hello}");
    assert!(hello.contains("hello from sbx-"), "{hello}");
    assert!(hello.contains("exit code Some(3)"), "{hello}");
    assert!(hello.contains("timed out: true"), "{hello}");
    let pipes = run("pipes");
    assert!(pipes.contains("exited with"), "{pipes}");
    run("blocking");
    // Each example deleted its sandbox.
    let (_, list) = d.call("GET", "/v1/sandboxes", None);
    let sandboxes = list["sandboxes"].as_array().unwrap();
    assert_eq!(sandboxes.len(), 3, "{list}");
    for s in sandboxes {
        let end = (s["state"].as_str(), s["reason"].as_str());
        assert_eq!(end, (Some("stopped"), Some("deleted")), "{list}");
    }
    // A wrong key is an error from from_env's client, not a panic.
    let out = std::process::Command::new(examples.join("hello"))
        .env("COVE_URL", &d.url)
        .env("COVE_KEY", "cove_wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401")
            || String::from_utf8_lossy(&out.stderr)
                .to_lowercase()
                .contains("key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
