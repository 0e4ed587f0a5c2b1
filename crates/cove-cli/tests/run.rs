//! `cove run` end to end: real sandboxes (namespaces, overlay, cgroups,
//! seccomp) created by the real binary, checked from inside and outside.
//! These tests need root; CI runs as root.

#![allow(clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    // CI runs as root: a skip there would hide a whole suite.
    assert!(
        std::env::var_os("CI").is_none(),
        "cove run needs root, and CI is set: run the tests as root"
    );
    eprintln!("skipped: cove run needs root");
    false
}

/// A private runtime dir and cgroup parent, so a test can check that its
/// own sandboxes left nothing behind while other tests run in parallel.
struct Env {
    runtime: tempfile::TempDir,
    cgroup_parent: String,
}

impl Env {
    fn new() -> Env {
        let runtime = tempfile::tempdir().unwrap();
        let name = runtime
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .to_lowercase()
            .replace(['.', '_'], "-");
        Env {
            runtime,
            cgroup_parent: format!("cove-test-{name}"),
        }
    }

    fn cmd(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_cove"));
        cmd.env("COVE_RUNTIME_DIR", self.runtime.path())
            .env("COVE_CGROUP_PARENT", &self.cgroup_parent)
            .stdin(Stdio::null());
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.cmd().arg("run").args(args).output().unwrap()
    }

    /// Every cgroup directory a sandbox of this test could have left.
    fn cgroup_children(&self) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified", ""] {
            let dir = Path::new("/sys/fs/cgroup")
                .join(hierarchy)
                .join(&self.cgroup_parent);
            if let Ok(entries) = std::fs::read_dir(&dir) {
                found.extend(
                    entries
                        .flatten()
                        .filter(|e| e.path().is_dir())
                        .map(|e| e.path()),
                );
            }
        }
        found
    }

    fn assert_clean(&self) {
        let leftover = self.cgroup_children();
        assert!(leftover.is_empty(), "cgroups left behind: {leftover:?}");
        let state: Vec<_> = std::fs::read_dir(self.runtime.path().join("run"))
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(state.is_empty(), "state left behind: {state:?}");
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        for hierarchy in ["memory", "pids", "cpu", "freezer", "unified", ""] {
            let _ = std::fs::remove_dir(
                Path::new("/sys/fs/cgroup")
                    .join(hierarchy)
                    .join(&self.cgroup_parent),
            );
        }
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("cove exited normally")
}

#[test]
fn runs_a_command_and_passes_its_output_and_code() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&["--", "uname", "-s"]);
    assert_eq!(
        (code(&out), stdout(&out).as_str()),
        (0, "Linux\n"),
        "{}",
        stderr(&out)
    );
    assert_eq!(code(&env.run(&["--", "sh", "-c", "exit 42"])), 42);
    assert_eq!(code(&env.run(&["--", "sh", "-c", "kill -TERM $$"])), 143);
    let out = env.run(&["--shell", "echo $HOME; echo to-stderr >&2"]);
    assert_eq!(stdout(&out), "/root\n");
    assert_eq!(stderr(&out), "to-stderr\n");
    env.assert_clean();
}

#[test]
fn the_sandbox_is_its_own_pid_namespace() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "--shell",
        "echo $PPID; cat /proc/1/comm; ls /proc | grep -c '^[0-9]'; hostname",
    ]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "1", "the command's parent is the agent, PID 1");
    assert_eq!(lines[1], "cove-agent");
    let visible: usize = lines[2].parse().unwrap();
    assert!(
        visible <= 5,
        "the sandbox sees {visible} processes; host processes leak in"
    );
    assert!(
        lines[3].starts_with("sbx-") && lines[3].len() == 12,
        "hostname is the sandbox ID: {}",
        lines[3]
    );
}

#[test]
fn the_host_filesystem_is_read_only_and_secrets_are_hidden() {
    if !root() {
        return;
    }
    let env = Env::new();
    let marker = format!("cove-test-{}", std::process::id());
    let out = env.run(&[
        "--shell",
        &format!(
            "touch /usr/{marker} 2>&1; echo x > /etc/{marker} 2>&1; wc -c < /etc/shadow; \
             echo private > /tmp/{marker} && cat /tmp/{marker}; echo ok > /workspace/f && cat /workspace/f"
        ),
    ]);
    let text = stdout(&out);
    assert!(text.contains("Read-only file system"), "{text}");
    assert!(!Path::new(&format!("/usr/{marker}")).exists());
    assert!(!Path::new(&format!("/etc/{marker}")).exists());
    assert!(
        text.contains("\n0\n"),
        "/etc/shadow must read as empty: {text}"
    );
    assert!(text.contains("private\nok\n"), "{text}");
    assert!(
        !Path::new(&format!("/tmp/{marker}")).exists(),
        "the sandbox's /tmp is the host's"
    );
    // A second sandbox does not see the first one's files.
    let out = env.run(&[
        "--shell",
        &format!("test -e /tmp/{marker} && echo leaked || echo fresh"),
    ]);
    assert_eq!(stdout(&out), "fresh\n");
}

#[test]
fn only_loopback_is_reachable() {
    if !root() {
        return;
    }
    let env = Env::new();
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let script = format!(
        "ip -o link | cut -d: -f2 | tr -d ' '; \
         bash -c 'echo > /dev/tcp/1.1.1.1/80' 2>&1; \
         bash -c 'echo > /dev/tcp/127.0.0.1/{port}' 2>&1; \
         python3 -c 'import socket; s=socket.socket(); s.bind((\"127.0.0.1\",0)); s.listen(); \
c=socket.create_connection(s.getsockname()); print(\"loopback works\")'"
    );
    let out = env.run(&["--shell", &script]);
    let text = stdout(&out);
    assert!(text.starts_with("lo\n"), "interfaces other than lo: {text}");
    assert!(text.contains("Network is unreachable"), "{text}");
    assert!(
        text.contains("Connection refused"),
        "the host's loopback must not be reachable: {text}"
    );
    assert!(text.contains("loopback works"), "{text}");
}

#[test]
fn no_mounts_no_modules_no_new_namespaces() {
    if !root() {
        return;
    }
    let env = Env::new();
    let script = "mount -t tmpfs none /mnt 2>&1; unshare -m true 2>&1; unshare -U true 2>&1; \
        python3 -c 'import ctypes; l=ctypes.CDLL(None, use_errno=True); r=l.syscall(175, 0, 0, 0); print(\"init_module\", r, ctypes.get_errno())'; \
        grep -E '^(CapEff|CapBnd|NoNewPrivs|Seccomp):' /proc/self/status";
    let out = env.run(&["--shell", script]);
    let text = stdout(&out);
    assert!(
        text.contains("mount: /mnt: permission denied") || text.contains("must be superuser"),
        "{text}"
    );
    assert_eq!(
        text.matches("unshare failed: Operation not permitted")
            .count(),
        2,
        "{text}"
    );
    assert!(text.contains("init_module -1 1"), "{text}");
    assert!(text.contains("NoNewPrivs:\t1"), "{text}");
    assert!(text.contains("Seccomp:\t2"), "{text}");
    let cap_eff = text.lines().find(|l| l.starts_with("CapEff:")).unwrap();
    let mask = u64::from_str_radix(cap_eff.split_whitespace().nth(1).unwrap(), 16).unwrap();
    for (bit, name) in [
        (21, "SYS_ADMIN"),
        (16, "SYS_MODULE"),
        (19, "SYS_PTRACE"),
        (27, "MKNOD"),
        (12, "NET_ADMIN"),
    ] {
        assert_eq!(
            mask & (1 << bit),
            0,
            "CAP_{name} must be dropped: {cap_eff}"
        );
    }
}

#[test]
fn env_workdir_and_user() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "-e",
        "GREETING=hello world",
        "-w",
        "/tmp",
        "--",
        "sh",
        "-c",
        "echo $GREETING; pwd",
    ]);
    assert_eq!(stdout(&out), "hello world\n/tmp\n");
    let out = env.run(&[
        "-u",
        "nobody",
        "--",
        "sh",
        "-c",
        "id -u; id -g; touch /root/x 2>&1 | grep -c denied",
    ]);
    assert_eq!(stdout(&out), "65534\n65534\n1\n");
    let out = env.run(&["-u", "1234:5678", "--", "sh", "-c", "id -u; id -g"]);
    assert_eq!(stdout(&out), "1234\n5678\n");
}

#[test]
fn stdin_is_streamed_in() {
    if !root() {
        return;
    }
    let env = Env::new();
    let mut child = env
        .cmd()
        .args(["run", "--", "sh", "-c", "cat; echo done"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let mut stdin = child.stdin.take().unwrap();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || stdin.write_all(&data))
    };
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert_eq!(out.stdout.len(), data.len() + 5);
    assert!(out.stdout[..data.len()] == data[..]);
    assert_eq!(&out.stdout[data.len()..], b"done\n");
}

#[test]
fn large_and_binary_output_arrives_intact() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&["--", "head", "-c", "209715200", "/dev/zero"]);
    assert_eq!(code(&out), 0);
    assert_eq!(out.stdout.len(), 200 << 20);
    assert!(out.stdout.iter().all(|b| *b == 0));
    let out = env.run(&[
        "--shell",
        "head -c 10485760 /dev/urandom > /tmp/f; sha256sum < /tmp/f >&2; cat /tmp/f",
    ]);
    let mut sha = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    sha.stdin.take().unwrap().write_all(&out.stdout).unwrap();
    let digest = sha.wait_with_output().unwrap();
    assert_eq!(String::from_utf8_lossy(&digest.stdout), stderr(&out));
}

/// Whether a process runs whose command line starts with `argv` (cove's
/// own command line contains the sandboxed command too, so a substring
/// match would find cove before the command exists).
fn host_runs(argv: &[&str]) -> bool {
    let mut prefix = argv.join("\0").into_bytes();
    prefix.push(0);
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .any(|e| std::fs::read(e.path().join("cmdline")).is_ok_and(|c| c.starts_with(&prefix)))
}

fn host_has_process_with(arg: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains(arg))
    })
}

#[test]
fn timeout_kills_grandchildren() {
    if !root() {
        return;
    }
    let env = Env::new();
    // Unique durations, so the check below finds only this test's sleeps.
    let tag = format!("1000.{}", std::process::id());
    let out = env.run(&[
        "--timeout",
        "1s",
        "--",
        "sh",
        "-c",
        &format!("sleep {tag} & setsid sleep {tag} & sleep {tag}"),
    ]);
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("timed out after 1s"),
        "{}",
        stderr(&out)
    );
    assert!(!host_has_process_with(&tag), "a sleep survived the timeout");
    env.assert_clean();
}

#[test]
fn a_memory_hog_is_oom_killed_and_reported() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "--memory",
        "64M",
        "--",
        "python3",
        "-c",
        "x = bytearray(512 << 20)",
    ]);
    assert_eq!(code(&out), 137, "{}", stderr(&out));
    assert!(stderr(&out).contains("out of memory"), "{}", stderr(&out));
    env.assert_clean();
}

#[test]
fn a_fork_bomb_hits_the_pids_limit_and_the_host_is_fine() {
    if !root() {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "--pids",
        "64",
        "--timeout",
        "3s",
        "--",
        "sh",
        "-c",
        // The sleep starts first: a bomb that fills the pids limit must
        // not be able to stop the shell from reaching the timeout.
        // (dash forks each part of a pipeline itself, so the bomb runs in
        // a subshell whose fork failures cannot end the main shell).
        "sleep 10 & (f() { f | f & }; f); wait",
    ]);
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    // The host can still start processes, and the bomb left nothing running.
    assert!(Command::new("true").status().unwrap().success());
    env.assert_clean();
}

#[test]
fn cpu_and_pids_limits_reach_the_cgroups() {
    if !root() {
        return;
    }
    let env = Env::new();
    let tag = format!("30.{}", std::process::id());
    let mut child = env
        .cmd()
        .args(["run", "--cpus", "0.5", "--pids", "77", "--", "sleep", &tag])
        .spawn()
        .unwrap();
    let mut quota = None;
    let mut pids = None;
    for _ in 0..200 {
        let dirs = env.cgroup_children();
        for dir in &dirs {
            if let Ok(q) = std::fs::read_to_string(dir.join("cpu.cfs_quota_us")) {
                quota = Some(q.trim().to_string());
            }
            if let Ok(q) = std::fs::read_to_string(dir.join("cpu.max")) {
                quota = Some(q.split_whitespace().next().unwrap_or("").to_string());
            }
            if let Ok(p) = std::fs::read_to_string(dir.join("pids.max")) {
                pids = Some(p.trim().to_string());
            }
        }
        if quota.is_some() && pids.is_some() && host_runs(&["sleep", &tag]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let status = child.wait().unwrap();
    assert_eq!(
        status.code(),
        Some(143),
        "SIGTERM is forwarded to the command"
    );
    assert_eq!(quota.as_deref(), Some("50000"));
    assert_eq!(pids.as_deref(), Some("77"));
    env.assert_clean();
}

/// `cove run` makes cgroups only where a limit needs one (on a v1 or
/// hybrid host: no memory, pids or cpu directory without --memory, --pids
/// or --cpus), besides the one that kills and freezes the sandbox.
/// The cgroup directories of `env`'s sandbox once its `sleep TAG` runs
/// (waiting up to 5 s; whatever is there then).
fn cgroups_once_running(env: &Env, tag: &str) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for _ in 0..200 {
        dirs = env.cgroup_children();
        if !dirs.is_empty() && host_runs(&["sleep", tag]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    dirs
}

#[test]
fn only_the_cgroups_a_limit_needs() {
    if !root() {
        return;
    }
    let hybrid = Path::new("/sys/fs/cgroup/memory").is_dir();
    let env = Env::new();
    for (limits, want) in [
        (&[][..], &[][..]),
        (&["--pids", "50"][..], &["pids"][..]),
        (&["--memory", "64M"][..], &["memory"][..]),
    ] {
        let tag = format!("31.{}{}", std::process::id(), limits.len());
        let mut child = env
            .cmd()
            .arg("run")
            .args(limits)
            .args(["--", "sleep", &tag])
            .spawn()
            .unwrap();
        let dirs = cgroups_once_running(&env, &tag);
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        child.wait().unwrap();
        assert!(!dirs.is_empty(), "{limits:?}: no cgroup at all");
        if hybrid {
            let limited: Vec<String> = ["memory", "pids", "cpu"]
                .into_iter()
                .filter(|h| {
                    dirs.iter()
                        .any(|d| d.starts_with(Path::new("/sys/fs/cgroup").join(h)))
                })
                .map(String::from)
                .collect();
            assert_eq!(limited, want, "{limits:?}: {dirs:?}");
        }
    }
    env.assert_clean();
}

#[test]
fn bad_input_is_a_clear_error_with_code_125_and_leaves_nothing() {
    if !root() {
        return;
    }
    let env = Env::new();
    for (args, needle) in [
        (
            vec!["--template", "nope", "--", "true"],
            "unknown template \"nope\"",
        ),
        (
            vec!["--memory", "12Q", "--", "true"],
            "\"12Q\" is not a size",
        ),
        (
            vec!["--timeout", "soon", "--", "true"],
            "\"soon\" is not a duration",
        ),
        (
            vec!["-w", "/does/not/exist", "--", "true"],
            "/does/not/exist does not exist",
        ),
        (
            vec!["-u", "ghost", "--", "true"],
            "user \"ghost\" does not exist",
        ),
        (
            vec!["--cpus", "4096", "--", "true"],
            "cpus 4096 is out of range",
        ),
        (vec!["--memory", "1M", "--", "true"], "below the minimum"),
        (vec![], "nothing to run"),
    ] {
        let out = env.run(&args);
        assert_eq!(code(&out), 125, "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(needle),
            "{args:?}: expected {needle:?} in {}",
            stderr(&out)
        );
    }
    let out = env.run(&["--", "no-such-program"]);
    assert_eq!(code(&out), 127);
    assert_eq!(stderr(&out), "no-such-program: command not found\n");
    env.assert_clean();
}

#[test]
fn busybox_template() {
    if !root() {
        return;
    }
    let env = Env::new();
    let data = tempfile::tempdir().unwrap();
    let build = env
        .cmd()
        .env("COVE_DATA_DIR", data.path())
        .args(["template", "build", "busybox"])
        .output()
        .unwrap();
    assert!(build.status.success(), "{}", stderr(&build));
    let out = env
        .cmd()
        .env("COVE_DATA_DIR", data.path())
        .args(["run", "--template", "busybox", "--", "sh", "-c", "readlink /bin/ls; pwd; test -e /usr/lib/x86_64-linux-gnu && echo host-libs || echo self-contained"])
        .output()
        .unwrap();
    assert_eq!(
        stdout(&out),
        "/bin/busybox\n/workspace\nself-contained\n",
        "{}",
        stderr(&out)
    );
    let list = env
        .cmd()
        .env("COVE_DATA_DIR", data.path())
        .args(["template", "ls"])
        .output()
        .unwrap();
    assert!(stdout(&list).contains("busybox"));
    env.assert_clean();
}

#[test]
fn a_hundred_sandboxes_leave_nothing_behind() {
    if !root() {
        return;
    }
    let env = Env::new();
    // Mount points, not a count: tests running alongside (network
    // namespaces, image builds) mount and unmount on the host meanwhile.
    let mount_points = || -> Vec<String> {
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter_map(|l| l.split(' ').nth(4).map(str::to_string))
            .collect()
    };
    let before = mount_points();
    for _ in 0..100 {
        let out = env.run(&["--", "true"]);
        assert_eq!(code(&out), 0, "{}", stderr(&out));
    }
    let runtime = env.runtime.path().to_str().unwrap();
    let new: Vec<String> = mount_points()
        .into_iter()
        .filter(|m| !before.contains(m))
        .collect();
    let ours: Vec<&String> = new.iter().filter(|m| m.starts_with(runtime)).collect();
    assert!(ours.is_empty(), "sandbox mounts left on the host: {ours:?}");
    env.assert_clean();
    assert!(!host_has_process_with(env.runtime.path().to_str().unwrap()));
}

#[test]
fn a_killed_cove_run_is_cleaned_up_by_the_next() {
    if !root() {
        return;
    }
    let env = Env::new();
    // Unique to this test process: other tests run sleeps too.
    let tag = format!("1000.{}", std::process::id());
    let mut child = env
        .cmd()
        .args(["run", "--", "sleep", &tag])
        .spawn()
        .unwrap();
    // Killed once its sandbox runs the command (not half-way through
    // creating it, which is another test's subject).
    for _ in 0..500 {
        if host_runs(&["sleep", &tag]) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(!env.cgroup_children().is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    // The sandbox died with its parent; the next run sweeps the rest.
    let out = env.run(&["--", "true"]);
    assert_eq!(code(&out), 0);
    env.assert_clean();
}

/// Runs `cove ARGS` in a mount namespace whose only cgroup hierarchy is
/// this host's cgroup2 mount, at `/sys/fs/cgroup`: what cove sees on a
/// pure v2 host (one hierarchy, `cgroup.kill`, `cgroup.freeze`), here with
/// no controllers, as a hybrid host's v2 mount has none.
fn v2_only(env: &Env, args: &[&str]) -> std::process::Child {
    const SCRIPT: &str = r#"set -e
mount --make-rprivate /
dir=$(mktemp -d)
mount --bind /sys/fs/cgroup/unified "$dir"
umount -l /sys/fs/cgroup
mount --bind "$dir" /sys/fs/cgroup
umount "$dir"
rmdir "$dir"
exec "$@""#;
    Command::new("unshare")
        .args(["--mount", "--", "sh", "-c", SCRIPT, "sh"])
        .arg(env!("CARGO_BIN_EXE_cove"))
        .args(args)
        .env("COVE_RUNTIME_DIR", env.runtime.path())
        .env("COVE_CGROUP_PARENT", &env.cgroup_parent)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn a_pure_v2_host_runs_sandboxes_in_its_one_hierarchy() {
    if !root() {
        return;
    }
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        eprintln!("this host is pure cgroup v2: every other test here covers it");
        return;
    }
    let unified = Path::new("/sys/fs/cgroup/unified");
    if !unified.join("cgroup.subtree_control").exists() {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI's host has a cgroup2 mount at {}",
            unified.display()
        );
        eprintln!("skipped: no cgroup2 mount next to the v1 ones");
        return;
    }
    let env = Env::new();

    // A sandbox runs, in a cgroup of the v2 hierarchy and no v1 one.
    let tag = format!("1.{}", std::process::id());
    let child = v2_only(
        &env,
        &["run", "--", "sh", "-c", &format!("sleep {tag}; echo ran")],
    );
    let dirs = cgroups_once_running(&env, &tag);
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        (code(&out), stdout(&out).as_str()),
        (0, "ran\n"),
        "{}",
        stderr(&out)
    );
    assert!(!dirs.is_empty(), "no cgroup for the sandbox");
    let parent = unified.join(&env.cgroup_parent);
    assert!(
        dirs.iter().all(|d| d.starts_with(&parent)),
        "cgroups outside the v2 hierarchy: {dirs:?}"
    );

    // A timeout kills the whole tree through cgroup.kill, setsid or not.
    let tag = format!("1000.{}", std::process::id() + 7);
    let out = v2_only(
        &env,
        &[
            "run",
            "--timeout",
            "1s",
            "--",
            "sh",
            "-c",
            &format!("sleep {tag} & setsid sleep {tag} & sleep {tag}"),
        ],
    )
    .wait_with_output()
    .unwrap();
    assert_eq!(code(&out), 124, "{}", stderr(&out));
    assert!(!host_has_process_with(&tag), "a sleep survived the timeout");

    // A limit with no controller behind it is refused, not ignored.
    let out = v2_only(&env, &["run", "--memory", "64M", "--", "true"])
        .wait_with_output()
        .unwrap();
    assert_eq!(code(&out), 125, "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no memory cgroup controller"),
        "{}",
        stderr(&out)
    );
    env.assert_clean();
}
