//! The agent on its own: a real `cove-agent` process serving the protocol on
//! a socketpair, driven by the real host-side client. No namespaces here;
//! `crates/cove-cli/tests` covers the agent inside a sandbox.

#![allow(clippy::unwrap_used)]

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::time::Duration;

use cove_protocol::client::{AgentClient, ClientError, Output, ProcessEvent};
use cove_protocol::{CommandLine, ProcessSpec, PtySize, SpawnErrorKind, Stream};

struct Agent {
    child: Child,
    client: AgentClient,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn agent() -> Agent {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove-agent"));
    cmd.args([
        "--fd",
        "3",
        "--hostname",
        "test-agent",
        "--cwd",
        "/tmp",
        "--env",
        "SANDBOX_VAR=from-sandbox",
    ]);
    // SAFETY: dup2 is async-signal-safe; fd 3 is the child's copy of `theirs`
    // without close-on-exec, while `theirs` itself stays close-on-exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let stream = tokio::net::UnixStream::from_std(ours).unwrap();
    let client = AgentClient::connect(stream, "test").await.unwrap();
    Agent { child, client }
}

fn sh(script: &str) -> ProcessSpec {
    ProcessSpec::new(CommandLine::Shell(script.into()))
}

fn argv(args: &[&str]) -> ProcessSpec {
    ProcessSpec::new(CommandLine::Argv(
        args.iter().map(|s| s.to_string()).collect(),
    ))
}

async fn run(agent: &Agent, spec: ProcessSpec) -> Output {
    tokio::time::timeout(Duration::from_secs(60), agent.client.output(spec, None))
        .await
        .expect("process finished")
        .expect("process ran")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[tokio::test]
async fn handshake_reports_the_hostname() {
    let agent = agent().await;
    assert_eq!(agent.client.hello().hostname, "test-agent");
    agent.client.ping().await.unwrap();
}

#[tokio::test]
async fn exit_codes_and_signals() {
    let agent = agent().await;
    let out = run(&agent, sh("exit 42")).await;
    assert_eq!((out.status.code, out.status.signal), (Some(42), None));
    let out = run(&agent, sh("kill -TERM $$")).await;
    assert_eq!((out.status.code, out.status.signal), (None, Some(15)));
    assert_eq!(out.status.shell_code(), 143);
}

#[tokio::test]
async fn stdout_and_stderr_stay_apart() {
    let agent = agent().await;
    let out = run(
        &agent,
        sh("for i in 1 2 3; do echo out$i; echo err$i >&2; done"),
    )
    .await;
    assert_eq!(text(&out.stdout), "out1\nout2\nout3\n");
    assert_eq!(text(&out.stderr), "err1\nerr2\nerr3\n");
}

#[tokio::test]
async fn binary_output_arrives_byte_for_byte() {
    let agent = agent().await;
    let out = run(&agent, sh("printf 'a\\000b\\377\\376c'")).await;
    assert_eq!(out.stdout, b"a\0b\xff\xfec");
    // 8 MiB of random bytes, checked against the sandbox's own digest.
    let out = run(
        &agent,
        sh("head -c 8388608 /dev/urandom > f.$$; sha256sum < f.$$ >&2; cat f.$$; rm f.$$"),
    )
    .await;
    assert_eq!(out.stdout.len(), 8 << 20);
    let digest = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(&out.stdout)?;
            c.wait_with_output()
        })
        .unwrap();
    assert_eq!(text(&digest.stdout), text(&out.stderr));
}

#[tokio::test]
async fn output_over_the_cap_is_cut_and_says_so() {
    let agent = agent().await;
    let mut spec = sh("head -c 100000 /dev/zero; echo small >&2");
    spec.max_output = Some(1000);
    let out = run(&agent, spec).await;
    assert_eq!(out.stdout.len(), 1000);
    assert!(out.status.stdout_truncated);
    assert_eq!(out.status.stdout_bytes, 100_000);
    assert_eq!(text(&out.stderr), "small\n");
    assert!(!out.status.stderr_truncated);
}

#[tokio::test]
async fn a_small_window_loses_nothing() {
    let agent = agent().await;
    let mut spec = sh("head -c 20000000 /dev/zero");
    spec.window = 4096;
    let mut process = agent.client.spawn(spec).await.unwrap();
    let mut total = 0usize;
    let mut expected_offset = 0u64;
    loop {
        match process.next_event().await.unwrap() {
            ProcessEvent::Output { offset, data, .. } => {
                assert_eq!(offset, expected_offset);
                expected_offset += data.len() as u64;
                total += data.len();
                if total < 100_000 {
                    // A slow reader: the agent must wait, not drop.
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            }
            ProcessEvent::Dropped { .. } => panic!("a foreground reader must never lose bytes"),
            ProcessEvent::Exited(status) => {
                assert_eq!(status.code, Some(0));
                break;
            }
        }
    }
    assert_eq!(total, 20_000_000);
}

#[tokio::test]
async fn stdin_round_trip() {
    let agent = agent().await;
    let input: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        agent.client.output(argv(&["cat"]), Some(input.clone())),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input);
}

#[tokio::test]
async fn many_processes_multiplexed_on_one_connection() {
    let agent = agent().await;
    let mut handles = Vec::new();
    for i in 0..20 {
        let client = agent.client.clone();
        handles.push(tokio::spawn(async move {
            let out = client
                .output(sh(&format!("echo {i}; sleep 0.0{}", i % 10)), None)
                .await
                .unwrap();
            (i, text(&out.stdout))
        }));
    }
    for handle in handles {
        let (i, stdout) = handle.await.unwrap();
        assert_eq!(stdout, format!("{i}\n"));
    }
}

#[tokio::test]
async fn environment_layers() {
    let agent = agent().await;
    let mut spec = sh("echo $SANDBOX_VAR $OWN_VAR $HOSTNAME; echo $PATH");
    spec.env = vec![("OWN_VAR".into(), "mine".into())];
    let out = run(&agent, spec).await;
    let stdout = text(&out.stdout);
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("from-sandbox mine test-agent"));
    assert!(lines.next().unwrap().contains("/usr/bin"));

    let mut spec = sh("echo $SANDBOX_VAR");
    spec.env = vec![("SANDBOX_VAR".into(), "overridden".into())];
    assert_eq!(text(&run(&agent, spec).await.stdout), "overridden\n");

    let mut spec = argv(&["/usr/bin/env"]);
    spec.clear_env = true;
    spec.env = vec![("ONLY".into(), "this".into())];
    assert_eq!(text(&run(&agent, spec).await.stdout), "ONLY=this\n");
}

#[tokio::test]
async fn working_directory() {
    let agent = agent().await;
    assert_eq!(text(&run(&agent, argv(&["pwd"])).await.stdout), "/tmp\n");
    let mut spec = argv(&["pwd"]);
    spec.cwd = Some("/usr".into());
    assert_eq!(text(&run(&agent, spec).await.stdout), "/usr\n");
    let mut spec = argv(&["pwd"]);
    spec.cwd = Some("/definitely/not/here".into());
    match agent.client.spawn(spec).await {
        Err(ClientError::Spawn(e)) => {
            assert_eq!(e.kind, SpawnErrorKind::NoSuchCwd);
            assert!(e.message.contains("/definitely/not/here"), "{}", e.message);
        }
        other => panic!("expected a cwd error, got {other:?}"),
    }
}

#[tokio::test]
async fn users() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root");
        return;
    }
    let agent = agent().await;
    let mut spec = sh("id -u; id -g");
    spec.user = Some("nobody".into());
    assert_eq!(text(&run(&agent, spec).await.stdout), "65534\n65534\n");
    let mut spec = sh("id -u; id -g");
    spec.user = Some("1234:5678".into());
    assert_eq!(text(&run(&agent, spec).await.stdout), "1234\n5678\n");
    let mut spec = argv(&["true"]);
    spec.user = Some("no-such-user".into());
    match agent.client.spawn(spec).await {
        Err(ClientError::Spawn(e)) => assert_eq!(e.kind, SpawnErrorKind::NoSuchUser),
        other => panic!("expected a user error, got {other:?}"),
    }
}

#[tokio::test]
async fn missing_commands_behave_like_a_shell() {
    let agent = agent().await;
    let out = run(&agent, argv(&["no-such-command-anywhere", "x"])).await;
    assert_eq!(out.status.code, Some(127));
    assert_eq!(
        text(&out.stderr),
        "no-such-command-anywhere: command not found\n"
    );
    let out = run(&agent, argv(&["/etc/hostname"])).await;
    assert_eq!(out.status.code, Some(126));
    match agent.client.spawn(argv(&[])).await {
        Err(ClientError::Spawn(e)) => assert_eq!(e.kind, SpawnErrorKind::InvalidRequest),
        other => panic!("expected an invalid request, got {other:?}"),
    }
    match agent.client.spawn(argv(&["echo", "nul\0byte"])).await {
        Err(ClientError::Spawn(e)) => assert_eq!(e.kind, SpawnErrorKind::InvalidRequest),
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

fn alive(pid: i32) -> bool {
    // A zombie no longer counts: its parent, the agent, will reap it.
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|rest| !rest.trim_start().starts_with('Z'))
    })
}

#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let agent = agent().await;
    let mut spec = sh("sleep 1000 & echo $!; sleep 1000");
    spec.timeout_ms = 500;
    let out = run(&agent, spec).await;
    assert!(out.status.timed_out);
    assert_eq!(out.status.signal, Some(9));
    assert_eq!(out.status.shell_code(), 124);
    let grandchild: i32 = text(&out.stdout).trim().parse().unwrap();
    for _ in 0..100 {
        if !alive(grandchild) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("background child {grandchild} survived the timeout");
}

#[tokio::test]
async fn a_background_child_does_not_hold_the_result_hostage() {
    let agent = agent().await;
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        agent.client.output(sh("sleep 30 & echo started"), None),
    )
    .await
    .expect("the result arrives while the background child still runs")
    .unwrap();
    assert_eq!(text(&out.stdout), "started\n");
    assert_eq!(out.status.code, Some(0));
}

#[tokio::test]
async fn signals_reach_the_process_group() {
    let agent = agent().await;
    let mut process = agent
        .client
        .spawn(sh("sleep 1000 & sleep 1000"))
        .await
        .unwrap();
    process.signal(libc::SIGTERM, true).await.unwrap();
    loop {
        if let ProcessEvent::Exited(status) = process.next_event().await.unwrap() {
            assert_eq!(status.signal, Some(libc::SIGTERM));
            break;
        }
    }
}

#[tokio::test]
async fn a_pty_is_a_real_terminal() {
    let agent = agent().await;
    let mut spec = sh("tty; stty size; echo TERM=$TERM; test -t 0 && echo interactive");
    spec.pty = Some(PtySize {
        rows: 30,
        cols: 100,
    });
    let out = run(&agent, spec).await;
    let stdout = text(&out.stdout);
    assert!(stdout.contains("/dev/pts/"), "{stdout}");
    assert!(stdout.contains("30 100"), "{stdout}");
    assert!(stdout.contains("TERM=xterm-256color"), "{stdout}");
    assert!(stdout.contains("interactive"), "{stdout}");
    assert!(out.stderr.is_empty());
}

#[tokio::test]
async fn a_pty_takes_input_and_resizes() {
    let agent = agent().await;
    let mut spec = sh("read line; echo got:$line; stty size");
    spec.pty = Some(PtySize { rows: 24, cols: 80 });
    spec.stdin = true;
    let mut process = agent.client.spawn(spec).await.unwrap();
    process.resize(40, 120).await.unwrap();
    let mut stdin = process.take_stdin().unwrap();
    stdin.write_all(b"hello\n").await.unwrap();
    let mut seen = Vec::new();
    loop {
        match process.next_event().await.unwrap() {
            ProcessEvent::Output { stream, data, .. } => {
                assert_eq!(stream, Stream::Stdout);
                seen.extend_from_slice(&data);
            }
            ProcessEvent::Dropped { .. } => panic!("nothing may be dropped"),
            ProcessEvent::Exited(status) => {
                assert_eq!(status.code, Some(0));
                break;
            }
        }
    }
    let seen = text(&seen);
    assert!(seen.contains("got:hello"), "{seen}");
    assert!(seen.contains("40 120"), "{seen}");
}

#[tokio::test]
async fn a_thousand_processes_leave_no_zombie_and_no_fd() {
    let agent = agent().await;
    let pid = agent.child.id();
    let fds = || {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .count()
    };
    run(&agent, argv(&["true"])).await;
    let before = fds();
    for _ in 0..1000 {
        let out = run(&agent, argv(&["true"])).await;
        assert_eq!(out.status.code, Some(0));
    }
    assert_eq!(fds(), before, "the agent leaked file descriptors");
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    assert!(
        children.trim().is_empty(),
        "the agent still has children: {children}"
    );
}

#[tokio::test]
async fn a_bad_peer_gets_an_error_not_a_crash() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    let fd = theirs.as_raw_fd();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove-agent"));
    cmd.args(["--fd", "3"]);
    // SAFETY: as in `agent()`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(fd, 3) < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        });
    }
    let mut child = cmd.spawn().unwrap();
    drop(theirs);
    ours.set_nonblocking(true).unwrap();
    let mut stream = tokio::net::UnixStream::from_std(ours).unwrap();
    // A length prefix far over the limit.
    stream.write_all(&u32::MAX.to_le_bytes()).await.unwrap();
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
    let reply = text(&reply);
    assert!(
        reply.contains("exceeds the limit"),
        "agent replied {reply:?}"
    );
    // With its only connection gone the agent exits cleanly.
    let status = child.wait().unwrap();
    assert!(status.success());
}

/// An agent listening on a socket, for tests that need several connections.
struct ListeningAgent {
    child: Child,
    socket: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for ListeningAgent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ListeningAgent {
    fn start() -> ListeningAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(env!("CARGO_BIN_EXE_cove-agent"))
            .arg("--listen")
            .arg(&socket)
            .arg("--cwd")
            .arg("/tmp")
            .spawn()
            .unwrap();
        for _ in 0..200 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        ListeningAgent {
            child,
            socket,
            _dir: dir,
        }
    }

    async fn connect(&self) -> AgentClient {
        // The socket file appears at bind(), a moment before listen():
        // a connection in between is refused.
        let mut tries = 0;
        let stream = loop {
            match tokio::net::UnixStream::connect(&self.socket).await {
                Ok(stream) => break stream,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused && tries < 200 => {
                    tries += 1;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => panic!("connecting to the agent: {e}"),
            }
        };
        AgentClient::connect(stream, "test").await.unwrap()
    }
}

fn background(script: &str) -> ProcessSpec {
    let mut spec = sh(script);
    spec.background = true;
    spec
}

#[tokio::test]
async fn background_processes_are_attached_to_later() {
    let agent = ListeningAgent::start();
    let starter = agent.connect().await;
    let mut spec = background("echo one; sleep 0.3; echo two >&2; exit 5");
    spec.tag = Some("job".into());
    let pid = starter.spawn(spec).await.unwrap().pid();
    drop(starter);
    // Another connection finds it, lists it, and reads all of it.
    let reader = agent.connect().await;
    let list = reader.list().await.unwrap();
    let info = list.iter().find(|p| p.pid == pid).expect("listed");
    assert_eq!(info.tag.as_deref(), Some("job"));
    assert!(info.background && info.status.is_none());
    let (mut process, _) = reader.attach(pid, [0, 0], 1 << 20, false).await.unwrap();
    let out = process.collect().await.unwrap();
    assert_eq!(text(&out.stdout), "one\n");
    assert_eq!(text(&out.stderr), "two\n");
    assert_eq!(out.status.code, Some(5));
    // After it finished, a late reader still gets the result and output.
    let (mut late, info) = reader.attach(pid, [0, 0], 1 << 20, false).await.unwrap();
    assert_eq!(info.status.as_ref().and_then(|s| s.code), Some(5));
    let out = late.collect().await.unwrap();
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code),
        ("one\n", Some(5))
    );
    // Resuming from an offset skips what was read.
    let (mut resumed, _) = reader.attach(pid, [2, 0], 1 << 20, false).await.unwrap();
    assert_eq!(text(&resumed.collect().await.unwrap().stdout), "e\n");
}

#[tokio::test]
async fn a_followed_background_process_loses_nothing_and_outlives_its_reader() {
    let agent = ListeningAgent::start();
    let starter = agent.connect().await;
    // Eight times the replay buffer, written before anyone reads.
    let mut spec = background("head -c 524288 /dev/zero; echo done >&2; sleep 0.3; echo after");
    spec.follow = true;
    spec.replay_bytes = 65536;
    spec.window = 65536;
    let mut process = starter.spawn(spec).await.unwrap();
    let pid = process.pid();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let listed = starter.list().await.unwrap();
    let info = listed.iter().find(|p| p.pid == pid).unwrap();
    assert!(info.status.is_none(), "held back by its unread follower");
    let mut stdout = 0u64;
    loop {
        match process.next_event().await.unwrap() {
            ProcessEvent::Output {
                stream: Stream::Stdout,
                offset,
                data,
            } => {
                assert_eq!(offset, stdout, "no gap");
                stdout += data.len() as u64;
            }
            ProcessEvent::Output { .. } => {} // "done" on stderr
            other => panic!("unexpected {other:?}"),
        }
        if stdout == 524288 {
            break;
        }
    }
    assert_eq!(stdout, 524288);
    // The follower leaves; the process is not killed and ends on its own.
    drop(process);
    drop(starter);
    let reader = agent.connect().await;
    let (mut late, _) = reader
        .attach(pid, [524288, 0], 1 << 20, false)
        .await
        .unwrap();
    let out = late.collect().await.unwrap();
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code),
        ("after\n", Some(0))
    );
}

#[tokio::test]
async fn a_background_process_never_blocks_and_readers_learn_what_they_missed() {
    let agent = ListeningAgent::start();
    let client = agent.connect().await;
    let mut spec = background("head -c 1000000 /dev/zero; echo done >&2");
    spec.replay_bytes = 65536;
    let pid = client.spawn(spec).await.unwrap().pid();
    // Nobody reads while it runs; it must still finish.
    for _ in 0..500 {
        let list = client.list().await.unwrap();
        if list.iter().any(|p| p.pid == pid && p.status.is_some()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (mut process, _) = client.attach(pid, [0, 0], 1 << 20, false).await.unwrap();
    let mut dropped = None;
    let mut kept = 0;
    loop {
        match process.next_event().await.unwrap() {
            ProcessEvent::Dropped { stream, from, to } => dropped = Some((stream, from, to)),
            ProcessEvent::Output {
                stream: Stream::Stdout,
                offset,
                data,
            } => {
                if kept == 0 {
                    assert_eq!(offset, 1_000_000 - 65536);
                }
                kept += data.len();
            }
            ProcessEvent::Output { .. } => {}
            ProcessEvent::Exited(status) => {
                assert_eq!(status.code, Some(0));
                assert_eq!(status.stdout_bytes, 1_000_000);
                break;
            }
        }
    }
    // The reader was told exactly which bytes it missed, and got the newest.
    assert_eq!(dropped, Some((Stream::Stdout, 0, 1_000_000 - 65536)));
    assert_eq!(kept, 65536);
}

#[tokio::test]
async fn stdin_of_a_background_process_from_another_connection() {
    let agent = ListeningAgent::start();
    let client = agent.connect().await;
    let mut spec = background("cat");
    spec.stdin = true;
    let mut process = client.spawn(spec).await.unwrap();
    let pid = process.pid();
    // The spawner keeps the pipe open without writing.
    process.take_stdin().unwrap().release();
    let other = agent.connect().await;
    let mut writer = other.stdin(pid);
    writer.write_all(b"hello ").await.unwrap();
    writer.write_all(b"world").await.unwrap();
    writer.flush().await.unwrap();
    writer.close().await.unwrap();
    let (mut reader, _) = other.attach(pid, [0, 0], 1 << 20, false).await.unwrap();
    let out = reader.collect().await.unwrap();
    assert_eq!(text(&out.stdout), "hello world");
    // Writing to a finished process's stdin is an error, not a hang.
    let mut late = other.stdin(pid);
    assert!(late.write_all(b"x").await.and(late.flush().await).is_err());
}

#[tokio::test]
async fn a_foreground_process_dies_with_its_connection() {
    use cove_protocol::{AgentMessage, HostMessage, decode_frame, encode_frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = ListeningAgent::start();
    // Speak the protocol by hand, so the connection really closes below.
    let mut stream = tokio::net::UnixStream::connect(&agent.socket)
        .await
        .unwrap();
    let hello = HostMessage::Hello(cove_protocol::Hello {
        version: cove_protocol::PROTOCOL_VERSION,
        client: "raw".into(),
    });
    stream
        .write_all(&encode_frame(&hello).unwrap())
        .await
        .unwrap();
    let spawn = HostMessage::Spawn {
        req: 1,
        spec: sh("sleep 1000 & echo $!; sleep 1000"),
    };
    stream
        .write_all(&encode_frame(&spawn).unwrap())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let grandchild = loop {
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await.unwrap();
        assert!(n > 0, "agent closed early");
        buf.extend_from_slice(&chunk[..n]);
        let mut found = None;
        while let Some((msg, used)) = decode_frame::<AgentMessage>(&buf).unwrap() {
            buf.drain(..used);
            if let AgentMessage::Output { data, .. } = msg {
                found = Some(text(&data).trim().parse::<i32>().unwrap());
            }
        }
        if let Some(pid) = found {
            break pid;
        }
    };
    drop(stream);
    for _ in 0..200 {
        if !alive(grandchild) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the foreground process tree outlived its connection");
}

#[tokio::test]
async fn dropping_a_foreground_process_handle_kills_it() {
    let agent = ListeningAgent::start();
    let client = agent.connect().await;
    let mut process = client
        .spawn(sh("sleep 1000 & echo $!; sleep 1000"))
        .await
        .unwrap();
    let grandchild = match process.next_event().await.unwrap() {
        ProcessEvent::Output { data, .. } => text(&data).trim().parse::<i32>().unwrap(),
        other => panic!("expected the background pid, got {other:?}"),
    };
    drop(process);
    for _ in 0..200 {
        if !alive(grandchild) {
            client.ping().await.unwrap();
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the process outlived its handle");
}

#[tokio::test]
async fn attaching_to_an_unknown_process_is_an_error() {
    let agent = ListeningAgent::start();
    let client = agent.connect().await;
    assert!(matches!(
        client.attach(999_999, [0, 0], 1024, false).await,
        Err(ClientError::Agent(_))
    ));
    client.ping().await.unwrap();
}
